//! conv3d backward, derived from forward machinery where the maths allows:
//! - input gradient = a stride-1 convolution of the gradient, dilated by the stride, with
//!   the weight's channels swapped and kernel mirrored (a transposed convolution), run by
//!   the forward kernel on differently packed operands;
//! - weight gradient = a split reduction over N·D·H·W (partials per chunk of output
//!   planes, then `reduce::sum_chunks`), no float atomics;
//! - bias gradient = per-channel sums (`reduce::sum_rows`, `sum_chunks`).
//!
//! These are gradients of the convolution itself: a fused ReLU epilogue must be
//! back-propagated through (masked) before calling them.

use crate::error::{Error, Result};
use crate::gpu::{Binding, GpuContext, PipelineKey, Recorder};
use crate::ops::conv3d::{
    as_u32, conv3d_check, conv_packed, for_each_tap, grid_for, pack_input, pack_weight,
    resolve_auto, subgroup_size_for, tile_for, time_on_temporaries, u32s, Conv3dSpec,
    Conv3dVariant, ConvKernel, PackedConv,
};
use crate::ops::conv3d_gemm::{gemm_packed, GemmConv};
use crate::ops::conv3d_pointwise;
use crate::ops::conv_transpose3d::{conv_transpose3d_forward, ConvTranspose3dSpec};
use crate::ops::params::{dispatch, uniform_u32};
use crate::ops::reduce::{sum_chunks, sum_rows};
use crate::ops::tune::{self, TuneSource};
use crate::tensor::{ChannelSlice, Shape5, Tensor};
use ndarray::Array5;

const WEIGHT_GRAD_SRC: &str = include_str!("../../shaders/conv3d_backward_weight.wgsl");

/// Checks that `grad_out` has the shape the forward of `input` x `weight` produces.
fn check_grad_out(
    input: Shape5,
    in_range: (usize, usize),
    weight: Shape5,
    grad_out: &ChannelSlice<'_>,
    spec: &Conv3dSpec,
    what: &str,
) -> Result<Shape5> {
    let expect = conv3d_check(input, in_range, weight, None, spec)?;
    let g = grad_out.tensor.shape();
    if grad_out.count != expect.c() || g.n() != expect.n() || g.spatial() != expect.spatial() {
        return Err(Error::Shape(format!(
            "{what}: gradient '{}' {g} channels {}..{} do not match the forward output {expect}",
            grad_out.tensor.name,
            grad_out.offset,
            grad_out.offset + grad_out.count
        )));
    }
    Ok(expect)
}

/// Records `grad_in[:, range] = dL/dx` for `y = conv3d(x, weight)` given `grad_out = dL/dy`
/// (overwrites the range). A strided conv's runs as the transposed conv it is, in the
/// phase form (`conv_transpose3d_forward`: only the useful multiply-adds; the dilated
/// form below does s^3 times as many).
#[allow(clippy::too_many_arguments)]
pub fn conv3d_backward_input(
    ctx: &GpuContext,
    rec: &mut Recorder,
    grad_out: ChannelSlice<'_>,
    weight: &Tensor,
    grad_in: ChannelSlice<'_>,
    spec: &Conv3dSpec,
    variant: Conv3dVariant,
) -> Result<()> {
    if spec.stride.iter().all(|&s| s == 1) {
        return transposed_conv(ctx, rec, grad_out, weight, None, grad_in, spec, variant);
    }
    check_transposed(&grad_out, weight, &grad_in, spec)?;
    let [_, _, kd, kh, kw] = weight.shape().0;
    let tspec = input_gradient_spec(
        grad_in.tensor.shape().spatial(),
        grad_out.tensor.shape().spatial(),
        [kd, kh, kw],
        spec,
    );
    conv_transpose3d_forward(ctx, rec, grad_out, weight, None, grad_in, &tspec, variant)
}

/// The transposed conv whose output is the input gradient of `spec`'s conv from `input`
/// to `output` extents: same stride, the conv's front padding cropped, and at the end
/// the rest cropped or, where the conv never read the last voxels, zeros added
/// (`output_padding`, < stride). `output` must be the conv's output for `input` (the
/// caller checked the shapes).
pub(crate) fn input_gradient_spec(
    input: [usize; 3],
    output: [usize; 3],
    kernel: [usize; 3],
    spec: &Conv3dSpec,
) -> ConvTranspose3dSpec {
    let mut t = ConvTranspose3dSpec {
        stride: spec.stride,
        pad_lo: spec.pad_lo,
        pad_hi: [0; 3],
        output_padding: [0; 3],
        relu: false,
    };
    for a in 0..3 {
        // Full transposed extent minus the front crop, against the input extent.
        let over = ((output[a] - 1) * spec.stride[a] + kernel[a]) as isize
            - spec.pad_lo[a] as isize
            - input[a] as isize;
        if over >= 0 {
            t.pad_hi[a] = over as usize;
        } else {
            t.output_padding[a] = (-over) as usize;
        }
    }
    t
}

/// [`conv3d_backward_input`] with a concrete kernel (no tuning), always in the form
/// that runs the forward kernel on the gradient (dilated by the stride when it is > 1;
/// the tuned entry point runs strided cases as phase-form transposed convs instead).
pub fn conv3d_backward_input_kernel(
    ctx: &GpuContext,
    rec: &mut Recorder,
    grad_out: ChannelSlice<'_>,
    weight: &Tensor,
    grad_in: ChannelSlice<'_>,
    spec: &Conv3dSpec,
    kernel: ConvKernel,
) -> Result<()> {
    transposed_conv_kernel(ctx, rec, grad_out, weight, None, grad_in, spec, kernel)
}

/// The input gradient of `spec`'s convolution as an operator (a transposed convolution):
/// `dst = conv3d_backward_input(src) + bias`. Shared with `conv_transpose3d`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn transposed_conv(
    ctx: &GpuContext,
    rec: &mut Recorder,
    grad_out: ChannelSlice<'_>,
    weight: &Tensor,
    bias: Option<&Tensor>,
    grad_in: ChannelSlice<'_>,
    spec: &Conv3dSpec,
    variant: Conv3dVariant,
) -> Result<()> {
    check_transposed(&grad_out, weight, &grad_in, spec)?;
    let cin = weight.shape().0[1];
    let kernel = match ConvKernel::for_variant(ctx, variant, cin)? {
        Some(k) => k,
        None => {
            let gi = grad_in.tensor.shape();
            let [id, ih, iw] = gi.spatial();
            let ishape = Shape5::new(gi.n(), grad_in.count, id, ih, iw);
            backward_input_choice(ctx, ishape, weight.shape(), bias.is_some(), spec)?.0
        }
    };
    transposed_conv_kernel(ctx, rec, grad_out, weight, bias, grad_in, spec, kernel)
}

fn check_transposed(
    grad_out: &ChannelSlice<'_>,
    weight: &Tensor,
    grad_in: &ChannelSlice<'_>,
    spec: &Conv3dSpec,
) -> Result<()> {
    check_grad_out(
        grad_in.tensor.shape(),
        (grad_in.offset, grad_in.count),
        weight.shape(),
        grad_out,
        spec,
        "conv3d_backward_input",
    )?;
    if std::ptr::eq(grad_in.tensor, grad_out.tensor) {
        return Err(Error::InvalidArgument(
            "conv3d_backward_input: gradient input and output are the same tensor".into(),
        ));
    }
    Ok(())
}

/// What `Auto` runs for the input gradient of a convolution of `input` (its shape; all
/// channels used) x `weight` (see `conv3d::conv3d_forward_choice`).
pub fn backward_input_choice(
    ctx: &GpuContext,
    input: Shape5,
    weight: Shape5,
    bias: bool,
    spec: &Conv3dSpec,
) -> Result<(ConvKernel, TuneSource)> {
    let [cout, cin, kd, kh, kw] = weight.0;
    let oshape = conv3d_check(input, (0, input.c()), weight, None, spec)?;
    let class = tune::shape_class(
        [kd, kh, kw],
        spec.stride,
        cout,
        cin,
        input.n() * input.voxels(),
    );
    let shapes = [oshape, weight, Shape5::new(1, cin, 1, 1, 1), input];
    resolve_auto(ctx, "conv3d.bwd_input", &class, cin, |kernel, give_up| {
        time_on_temporaries(ctx, shapes, give_up, |r, [g, w, b, dx]| {
            transposed_conv_kernel(
                ctx,
                r,
                g.all(),
                w,
                bias.then_some(b),
                dx.all(),
                spec,
                kernel,
            )
        })
    })
}

/// [`transposed_conv`] with a concrete kernel (no tuning).
#[allow(clippy::too_many_arguments)]
pub(crate) fn transposed_conv_kernel(
    ctx: &GpuContext,
    rec: &mut Recorder,
    grad_out: ChannelSlice<'_>,
    weight: &Tensor,
    bias: Option<&Tensor>,
    grad_in: ChannelSlice<'_>,
    spec: &Conv3dSpec,
    kernel: ConvKernel,
) -> Result<()> {
    check_transposed(&grad_out, weight, &grad_in, spec)?;
    let gi = grad_in.tensor.shape();
    let [cout, cin, kd, kh, kw] = weight.shape().0;
    let k = [kd, kh, kw];
    let [id, ih, iw] = gi.spatial();
    let ext = |tx: usize| [id - 1 + kd, ih - 1 + kh, iw.div_ceil(tx) * tx - 1 + kw];
    // Gradient voxel o sits at dilated position o * s; the mirrored kernel then needs
    // k - 1 - pad_lo positions before it.
    let pad: [isize; 3] = std::array::from_fn(|a| k[a] as isize - 1 - spec.pad_lo[a] as isize);
    if let ConvKernel::Gemm(tile) = kernel {
        let padded = ext(1);
        let packed_g = pack_input(ctx, rec, grad_out, spec.stride, pad, padded)?;
        let packed_w = pack_weight(ctx, rec, weight, true, tile.bn)?;
        return gemm_packed(
            ctx,
            rec,
            &GemmConv {
                input: &packed_g,
                weight: &packed_w,
                c4: cout.div_ceil(4),
                kernel: k,
                stride: [1, 1, 1],
                padded,
                tile,
            },
            bias,
            grad_in,
            false,
        );
    }
    let sub = match kernel {
        ConvKernel::Subgroup => subgroup_size_for(ctx, Conv3dVariant::Subgroup)?,
        _ => None,
    };
    // A 1x1x1 stride-1 conv's input gradient is a 1x1x1 conv too: no packing needed.
    if conv3d_pointwise::applies(k, spec, id * ih * iw) {
        let tile = conv3d_pointwise::tile_for(cin);
        let packed_w = pack_weight(ctx, rec, weight, true, tile.0)?;
        return conv3d_pointwise::conv_pointwise(
            ctx, rec, grad_out, &packed_w, tile, sub, bias, grad_in, false,
        );
    }
    let tile = tile_for(cin);
    let padded = ext(tile.tx);
    let packed_g = pack_input(ctx, rec, grad_out, spec.stride, pad, padded)?;
    let packed_w = pack_weight(ctx, rec, weight, true, tile.tc)?;
    conv_packed(
        ctx,
        rec,
        &PackedConv {
            input: &packed_g,
            weight: &packed_w,
            c4: cout.div_ceil(4),
            kernel: k,
            stride: [1, 1, 1],
            padded,
            tile,
            subgroup: sub,
            in_off: [0; 3],
            phase: None,
            w_off: 0,
            in_c4: (cout.div_ceil(4), 0),
        },
        bias,
        grad_in,
        false,
    )
}

/// Output positions along W that one weight-gradient step covers (one 8-lane block).
const WGRAD_BLOCK: usize = 8;

/// Generates the unrolled parts of `shaders/conv3d_backward_weight.wgsl` for kernel
/// width `kw`, stride `sw`, `tco` output channels per invocation, and the subgroup
/// (gradients shared by shuffles) or plain variant.
pub fn backward_weight_source(kw: usize, sw: usize, tco: usize, subgroup: bool) -> String {
    use std::fmt::Write;
    let (mut rows, mut acc, mut mac, mut epi) =
        (String::new(), String::new(), String::new(), String::new());
    let span = (WGRAD_BLOCK - 1) * sw + kw;
    for m in 0..span {
        let _ = writeln!(mac, "                let x{m} = xp[xb + {m}u];");
    }
    for c in 0..tco {
        let _ = writeln!(
            rows,
            "    let g{c} = (gc + min(co0 + {c}u, p.cout - 1u)) * vol;"
        );
        if subgroup {
            let _ = writeln!(
                mac,
                "                let dl{c} = grad_at(g{c} + grow, ox0, j);"
            );
        }
        for x in 0..kw {
            let _ = writeln!(acc, "    var a{c}_{x} = vec4<f32>(0.0);");
            let _ = writeln!(
                epi,
                "    store(chunk, co0, {c}u, ci4, kbase, {x}u, kvol, a{c}_{x});"
            );
        }
    }
    for t in 0..WGRAD_BLOCK {
        for c in 0..tco {
            if subgroup {
                let _ = writeln!(
                    mac,
                    "                let d{c}_{t} = subgroupShuffle(dl{c}, blk + {t}u);"
                );
            } else {
                let _ = writeln!(
                    mac,
                    "                let d{c}_{t} = grad_at(g{c} + grow, ox0, {t}u);"
                );
            }
            for x in 0..kw {
                let _ = writeln!(
                    mac,
                    "                a{c}_{x} = a{c}_{x} + d{c}_{t} * x{};",
                    t * sw + x
                );
            }
        }
    }
    let (args, setup) = if subgroup {
        (
            "@builtin(subgroup_invocation_id) sg_lane: u32,",
            "let j = sg_lane & 7u;\n    let blk = sg_lane & (SG - 8u);",
        )
    } else {
        ("", "")
    };
    WEIGHT_GRAD_SRC
        .replace("//{{ENTRY_ARGS}}", args)
        .replace("//{{SETUP}}", setup)
        .replace("    //{{GRAD_ROWS}}\n", &rows)
        .replace("    //{{ACC_DECL}}\n", &acc)
        .replace("                //{{MAC_BLOCK}}\n", &mac)
        .replace("    //{{EPILOGUE}}\n", &epi)
}

/// Output channels per weight-gradient invocation (env `MASNET_WGRAD_TCO` overrides).
fn weight_grad_tco(cout: usize) -> usize {
    let default = if cout >= 8 { 8 } else { 4 };
    std::env::var("MASNET_WGRAD_TCO")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|t| (1..=16).contains(t))
        .unwrap_or(default)
}

fn weight_grad_key(
    k: [usize; 3],
    s: [usize; 3],
    tco: usize,
    subgroup: Option<u32>,
) -> Result<PipelineKey> {
    let name = if subgroup.is_some() {
        "conv3d_backward_weight_subgroup"
    } else {
        "conv3d_backward_weight"
    };
    let mut key = PipelineKey::new(name, "conv3d_backward_weight");
    if let Some(sg) = subgroup {
        key = key.with_const("SG", sg);
    }
    Ok(key
        .with_const("TCO", as_u32(tco, "channel tile")?)
        .with_const("KD", as_u32(k[0], "kernel D")?)
        .with_const("KH", as_u32(k[1], "kernel H")?)
        .with_const("KW", as_u32(k[2], "kernel W")?)
        .with_const("SD", as_u32(s[0], "stride D")?)
        .with_const("SH", as_u32(s[1], "stride H")?)
        .with_const("SW", as_u32(s[2], "stride W")?))
}

/// Records `grad_weight = dL/dW` (`[Cout, Cin, kd, kh, kw]`, overwritten) for
/// `y = conv3d(input[:, range], W)` given `grad_out = dL/dy`.
pub fn conv3d_backward_weight(
    ctx: &GpuContext,
    rec: &mut Recorder,
    input: ChannelSlice<'_>,
    grad_out: ChannelSlice<'_>,
    grad_weight: &Tensor,
    spec: &Conv3dSpec,
    variant: Conv3dVariant,
) -> Result<()> {
    let xs = input.tensor.shape();
    let ws = grad_weight.shape();
    let o = check_grad_out(
        xs,
        (input.offset, input.count),
        ws,
        &grad_out,
        spec,
        "conv3d_backward_weight",
    )?;
    let [cout, cin, kd, kh, kw] = ws.0;
    let [od, oh, ow] = o.spatial();
    let [sd, sh, sw] = spec.stride;
    let n = xs.n();
    let c4 = cin.div_ceil(4);
    let sub = subgroup_size_for(ctx, variant)?;
    // W covers whole blocks of WGRAD_BLOCK output positions (the kernel reads them all).
    let ow_blocks = ow.div_ceil(WGRAD_BLOCK) * WGRAD_BLOCK;
    let ext = [
        (od - 1) * sd + kd,
        (oh - 1) * sh + kh,
        (ow_blocks - 1) * sw + kw,
    ];
    let packed_x = pack_input(
        ctx,
        rec,
        input,
        [1, 1, 1],
        spec.pad_lo.map(|p| p as isize),
        ext,
    )?;
    // Output planes per chunk: as few as keep the partial sums under 64 MiB and the
    // adapter's binding limit (more chunks = more parallelism, more memory).
    let len = ws.numel()?;
    let budget = (ctx.max_binding_bytes().min(64 << 20) / 4) as usize;
    let max_chunks = (budget / len).max(1);
    let zblocks_max = (max_chunks / n).max(1).min(od);
    let zc = od.div_ceil(zblocks_max);
    let zblocks = od.div_ceil(zc);
    let chunks = n * zblocks;
    let partial = Tensor::empty(
        ctx,
        Shape5::new(1, 1, 1, chunks, len),
        "conv3d weight partials",
    )?;
    let tco = weight_grad_tco(cout);
    let co_tiles = cout.div_ceil(tco);
    let inner = c4 * kd * kh;
    let inner_pad = inner.div_ceil(8) * 8;
    let total = chunks * co_tiles * inner_pad;
    let pipe = ctx.pipelines.get(
        &ctx.device,
        &weight_grad_key([kd, kh, kw], spec.stride, tco, sub)?,
        &backward_weight_source(kw, sw, tco, sub.is_some()),
        &[
            Binding::ReadOnly,
            Binding::ReadOnly,
            Binding::ReadWrite,
            Binding::Uniform,
        ],
    )?;
    let g = grad_out.tensor.shape();
    let params = uniform_u32(
        ctx,
        &u32s(&[
            n,
            c4,
            cout,
            cin,
            g.c(),
            grad_out.offset,
            ext[0],
            ext[1],
            ext[2],
            od,
            oh,
            ow,
            co_tiles,
            total,
            zc,
            zblocks,
            inner,
            inner_pad,
            0,
            0,
        ])?,
    )?;
    dispatch(
        ctx,
        rec,
        &pipe,
        &[
            (packed_x.buffer(), packed_x.bytes()),
            (grad_out.tensor.buffer(), grad_out.tensor.bytes()),
            (partial.buffer(), partial.bytes()),
            (&params, params.size()),
        ],
        grid_for(ctx, total.div_ceil(64))?,
    )?;
    sum_chunks(ctx, rec, &partial, chunks, len, grad_weight)
}

/// Records `grad_bias[c] = sum over n, z, y, x of grad_out[n, range.start + c, ...]`.
pub fn conv3d_backward_bias(
    ctx: &GpuContext,
    rec: &mut Recorder,
    grad_out: ChannelSlice<'_>,
    grad_bias: &Tensor,
) -> Result<()> {
    let g = grad_out.tensor.shape();
    if grad_bias.shape().numel()? != grad_out.count {
        return Err(Error::Shape(format!(
            "conv3d_backward_bias: bias gradient '{}' {} must hold {} values",
            grad_bias.name,
            grad_bias.shape(),
            grad_out.count
        )));
    }
    let (n, ct) = (g.n(), g.c());
    let per_item = Tensor::empty(ctx, Shape5::new(1, 1, 1, n, ct), "bias partials")?;
    sum_rows(ctx, rec, grad_out.tensor, n * ct, g.voxels(), &per_item)?;
    let per_channel = Tensor::empty(ctx, Shape5::new(1, 1, 1, 1, ct), "bias sums")?;
    sum_chunks(ctx, rec, &per_item, n, ct, &per_channel)?;
    rec.encoder.copy_buffer_to_buffer(
        per_channel.buffer(),
        (grad_out.offset * 4) as u64,
        grad_bias.buffer(),
        0,
        (grad_out.count * 4) as u64,
    );
    Ok(())
}

/// Every shader of this family (for the portability test).
pub fn shader_variants() -> Vec<(String, String)> {
    let mut v = Vec::new();
    for (k, s, t) in [(3, 1, 8), (5, 2, 4), (1, 1, 8)] {
        for sub in [None, Some(8), Some(32)] {
            let key = weight_grad_key([k; 3], [s; 3], t, sub).expect("small constants");
            v.push((
                format!("{} k{k} s{s} tco{t} sg{sub:?}", key.shader),
                format!(
                    "{}{}",
                    key.prelude(),
                    backward_weight_source(k, s, t, sub.is_some())
                ),
            ));
        }
    }
    v
}

/// CPU reference of the input gradient in f64: `dx` of shape `[N, Cin, input]`.
pub fn conv3d_backward_input_f64(
    grad_out: &Array5<f64>,
    weight: &Array5<f64>,
    input: [usize; 3],
    spec: &Conv3dSpec,
) -> Array5<f64> {
    let g = grad_out.shape();
    let w = weight.shape();
    let (n, cout, cin) = (g[0], w[0], w[1]);
    let mut dx = Array5::<f64>::zeros([n, cin, input[0], input[1], input[2]]);
    for b in 0..n {
        for co in 0..cout {
            for z in 0..g[2] {
                for y in 0..g[3] {
                    for x in 0..g[4] {
                        let gv = grad_out[[b, co, z, y, x]];
                        for_each_tap(spec, [z, y, x], [w[2], w[3], w[4]], input, |k, i| {
                            for ci in 0..cin {
                                dx[[b, ci, i[0], i[1], i[2]]] +=
                                    gv * weight[[co, ci, k[0], k[1], k[2]]];
                            }
                        });
                    }
                }
            }
        }
    }
    dx
}

/// CPU reference of the weight gradient in f64: `[Cout, Cin, kd, kh, kw]`.
pub fn conv3d_backward_weight_f64(
    input: &Array5<f64>,
    in_off: usize,
    grad_out: &Array5<f64>,
    kernel: [usize; 3],
    spec: &Conv3dSpec,
) -> Array5<f64> {
    let g = grad_out.shape();
    let s = input.shape();
    let (n, cout) = (g[0], g[1]);
    let cin = s[1] - in_off;
    let mut dw = Array5::<f64>::zeros([cout, cin, kernel[0], kernel[1], kernel[2]]);
    for b in 0..n {
        for co in 0..cout {
            for z in 0..g[2] {
                for y in 0..g[3] {
                    for x in 0..g[4] {
                        let gv = grad_out[[b, co, z, y, x]];
                        for_each_tap(spec, [z, y, x], kernel, [s[2], s[3], s[4]], |k, i| {
                            for ci in 0..cin {
                                dw[[co, ci, k[0], k[1], k[2]]] +=
                                    gv * input[[b, in_off + ci, i[0], i[1], i[2]]];
                            }
                        });
                    }
                }
            }
        }
    }
    dw
}

/// CPU reference of the bias gradient: per-channel sums of `grad_out`.
pub fn conv3d_backward_bias_f64(grad_out: &Array5<f64>) -> Vec<f64> {
    let c = grad_out.shape()[1];
    (0..c)
        .map(|ch| grad_out.slice(ndarray::s![.., ch, .., .., ..]).sum())
        .collect()
}
