//! 3-D transposed convolution (PyTorch `ConvTranspose3d` weight layout
//! `[Cin, Cout, kd, kh, kw]`):
//! - forward = phase decomposition: each class of output positions (by
//!   `(o + pad_lo) mod stride` per axis) is a stride-1 convolution of the input with a
//!   mirrored sub-kernel (`conv3d_forward`, all classes of one kernel extent as one
//!   convolution). When every class has taps (k >= s) and the register-tiled kernels
//!   run, the convolutions share one packing of the input and store straight into the
//!   strided output positions (with the bias); otherwise (k < s, or the GEMM family)
//!   they write consecutive channel blocks of a phase tensor and one interleave kernel
//!   scatters them (`shaders/conv_transpose3d_interleave.wgsl`). Direct stores measured
//!   10-20 % faster on lavapipe and need no phase tensor. Only useful multiply-adds
//!   run; the dilated form (zeros inserted, `s^3` times the work) stays for benchmarks;
//! - input gradient = the forward of the convolution it transposes;
//! - weight gradient = that convolution's weight gradient with the roles of input and
//!   gradient swapped.
//!
//! The geometry is written as the convolution that maps the output back to the input.
//! Keras "same" (the paper's up-sampling, n -> n*s): padding `max(k - s, 0)` split with
//! the smaller half first, i.e. k=2 s=2 has none and k=3 s=2 pads one voxel at the end,
//! which equals PyTorch k=3 s=2 p=0 with the last voxel per axis dropped.

use crate::error::{Error, Result};
use crate::gpu::{GpuContext, PipelineKey, Recorder};
use crate::ops::conv3d::{
    conv3d_check, conv3d_forward, conv3d_forward_choice, conv3d_forward_f64, conv_packed,
    pack_input, phase_tile_for, subgroup_size_for, u32s, Conv3dSpec, Conv3dVariant, ConvKernel,
    PackedConv, PhaseStore,
};
use crate::ops::conv3d_backward::{
    conv3d_backward_bias, conv3d_backward_weight, conv3d_backward_weight_f64, transposed_conv,
};
use crate::ops::conv3d_pointwise::{conv_pointwise_to, PointwiseOut};
use crate::ops::params::{launch, Arg};
use crate::tensor::{ChannelSlice, Shape5, Tensor};
use ndarray::Array5;

/// Floating-point operations of a transposed conv's useful work (2 per multiply-add):
/// every input value times every output channel and tap, `2 N Cin Cout k^3 n_in^3`
/// (cropped border taps included; the zeros of the dilated form are not).
pub fn conv_transpose3d_flops(input: Shape5, weight: Shape5) -> f64 {
    let [cin, cout, kd, kh, kw] = weight.0;
    let [id, ih, iw] = input.spatial();
    2.0 * (input.n() * cin * id * ih * iw) as f64 * (cout * kd * kh * kw) as f64
}

/// Geometry of a transposed convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvTranspose3dSpec {
    /// Stride per axis (the up-sampling factor).
    pub stride: [usize; 3],
    /// Voxels cropped at the start of each axis (padding of the transposed conv).
    pub pad_lo: [usize; 3],
    /// Voxels cropped at the end of each axis.
    pub pad_hi: [usize; 3],
    /// Extra voxels at the end of each axis (PyTorch `output_padding`, < stride).
    pub output_padding: [usize; 3],
    /// Apply ReLU to the output (fused epilogue; inference only, like `Conv3dSpec::relu`).
    pub relu: bool,
}

impl ConvTranspose3dSpec {
    /// Keras `padding="same"`: output = input * stride.
    pub fn keras_same(kernel: [usize; 3], stride: [usize; 3]) -> Self {
        let total: [usize; 3] = std::array::from_fn(|a| kernel[a].saturating_sub(stride[a]));
        let lo = total.map(|t| t / 2);
        Self {
            stride,
            pad_lo: lo,
            pad_hi: std::array::from_fn(|a| total[a] - lo[a]),
            // With k < s the cropped conv would be too short; pad the end instead.
            output_padding: std::array::from_fn(|a| stride[a].saturating_sub(kernel[a])),
            relu: false,
        }
    }

    /// The same geometry with ReLU in the epilogue or not.
    pub fn with_relu(mut self, relu: bool) -> Self {
        self.relu = relu;
        self
    }

    /// PyTorch `ConvTranspose3d(kernel, stride, padding, output_padding)`.
    pub fn torch(stride: [usize; 3], padding: [usize; 3], output_padding: [usize; 3]) -> Self {
        Self {
            stride,
            pad_lo: padding,
            pad_hi: padding,
            output_padding,
            relu: false,
        }
    }

    /// The convolution this operator transposes (maps the output back to the input).
    pub fn conv_spec(&self) -> Conv3dSpec {
        Conv3dSpec {
            stride: self.stride,
            pad_lo: self.pad_lo,
            // Output padding voxels are never read by the convolution (its floor drops them).
            pad_hi: self.pad_hi,
            relu: false,
        }
    }

    /// Output extents: `(n - 1) * s - pad_lo - pad_hi + k + output_padding` per axis.
    pub fn output_spatial(&self, input: [usize; 3], kernel: [usize; 3]) -> Result<[usize; 3]> {
        let mut out = [0; 3];
        for a in 0..3 {
            let axis = ["D", "H", "W"][a];
            let (s, k) = (self.stride[a], kernel[a]);
            if s == 0 || k == 0 || input[a] == 0 {
                return Err(Error::InvalidArgument(format!(
                    "conv_transpose3d: stride {s}, kernel {k} and input {} along {axis} must be \
                     positive",
                    input[a]
                )));
            }
            if self.output_padding[a] >= s && self.output_padding[a] > 0 {
                return Err(Error::InvalidArgument(format!(
                    "conv_transpose3d: output padding {} along {axis} must be smaller than the \
                     stride {s}",
                    self.output_padding[a]
                )));
            }
            let full = (input[a] - 1) * s + k + self.output_padding[a];
            let crop = self.pad_lo[a] + self.pad_hi[a];
            if full <= crop {
                return Err(Error::Shape(format!(
                    "conv_transpose3d: padding {} + {} along {axis} removes the whole output \
                     ({full} voxels)",
                    self.pad_lo[a], self.pad_hi[a]
                )));
            }
            out[a] = full - crop;
        }
        Ok(out)
    }
}

/// Checks the shapes and returns the output shape; `weight` is `[Cin, Cout, kd, kh, kw]`.
pub fn conv_transpose3d_check(
    input: Shape5,
    in_count: usize,
    weight: Shape5,
    bias_len: Option<usize>,
    spec: &ConvTranspose3dSpec,
) -> Result<Shape5> {
    let [wci, wco, kd, kh, kw] = weight.0;
    if weight.has_zero() || input.has_zero() {
        return Err(Error::Shape(format!(
            "conv_transpose3d: zero-sized dimension (input {input}, weight {weight})"
        )));
    }
    if in_count != wci {
        return Err(Error::Shape(format!(
            "conv_transpose3d: weight {weight} ([Cin, Cout, k..]) expects {wci} input channels \
             but {in_count} were given"
        )));
    }
    if let Some(b) = bias_len {
        if b != wco {
            return Err(Error::Shape(format!(
                "conv_transpose3d: bias has {b} values but the weight {weight} has {wco} output \
                 channels"
            )));
        }
    }
    let o = spec.output_spatial(input.spatial(), [kd, kh, kw])?;
    let out = Shape5::new(input.n(), wco, o[0], o[1], o[2]);
    // The transposing convolution must map the output exactly back onto the input.
    let back = conv3d_check(out, (0, wco), weight, None, &spec.conv_spec())?;
    if back.spatial() != input.spatial() {
        return Err(Error::Shape(format!(
            "conv_transpose3d: geometry {spec:?} does not invert to input {input}"
        )));
    }
    Ok(out)
}

fn check_output(
    what: &str,
    expect: Shape5,
    out: &ChannelSlice<'_>,
    other: &ChannelSlice<'_>,
) -> Result<()> {
    let s = out.tensor.shape();
    if out.count != expect.c() || s.n() != expect.n() || s.spatial() != expect.spatial() {
        return Err(Error::Shape(format!(
            "{what}: '{}' {s} channels {}..{} do not fit {expect}",
            out.tensor.name,
            out.offset,
            out.offset + out.count
        )));
    }
    if std::ptr::eq(out.tensor, other.tensor) {
        return Err(Error::InvalidArgument(format!(
            "{what}: input and output are the same tensor '{}'",
            out.tensor.name
        )));
    }
    Ok(())
}

/// Records `output[:, range] = conv_transpose3d(input[:, range], weight) + bias` (then
/// ReLU when `spec.relu`) by phase decomposition (see [`PhasePlan`]): one stride-1
/// convolution per kernel extent, storing straight into the output or through a phase
/// tensor and [`conv_transpose3d_interleave`].
#[allow(clippy::too_many_arguments)]
pub fn conv_transpose3d_forward(
    ctx: &GpuContext,
    rec: &mut Recorder,
    input: ChannelSlice<'_>,
    weight: &Tensor,
    bias: Option<&Tensor>,
    output: ChannelSlice<'_>,
    spec: &ConvTranspose3dSpec,
    variant: Conv3dVariant,
) -> Result<()> {
    let relu = spec.relu;
    let bias_len = bias.map(|b| b.shape().numel()).transpose()?;
    let ishape = input.tensor.shape();
    let expect = conv_transpose3d_check(ishape, input.count, weight.shape(), bias_len, spec)?;
    check_output("conv_transpose3d", expect, &output, &input)?;
    let [_, cout, kd, kh, kw] = weight.shape().0;
    let plan = PhasePlan::new(ishape.spatial(), [kd, kh, kw], spec)?;
    // Direct stores need every output position in some class with taps (k >= s).
    let every_class_has_taps = (0..3).all(|a| plan.kernel[a] >= plan.stride[a]);
    if every_class_has_taps {
        // The largest group decides the kernel family; GEMM keeps the interleave path.
        let g0 = &plan.groups[0];
        let blocks = g0.classes.iter().product::<usize>();
        let wshape = Shape5::new(
            blocks * cout,
            input.count,
            g0.taps[0],
            g0.taps[1],
            g0.taps[2],
        );
        let kernel = match ConvKernel::for_variant(ctx, variant, wshape.0[0])? {
            Some(k) => k,
            None => {
                let [id, ih, iw] = ishape.spatial();
                let xs = Shape5::new(ishape.n(), input.count, id, ih, iw);
                conv3d_forward_choice(ctx, xs, wshape, false, &plan.conv_spec(g0))?.0
            }
        };
        if !matches!(kernel, ConvKernel::Gemm(_)) {
            // The subgroup size of the subgroup family, `None` for the tiled one.
            let sub = match kernel {
                ConvKernel::Subgroup => subgroup_size_for(ctx, Conv3dVariant::Subgroup)?,
                _ => None,
            };
            if let Some(tc) = pairs_tile(&plan, cout, ishape.spatial(), expect.spatial()) {
                return forward_pairs(ctx, rec, input, weight, bias, output, sub, tc, relu);
            }
            return forward_direct(ctx, rec, input, weight, bias, output, &plan, sub, relu);
        }
    }
    let [td, th, tw] = plan.extent;
    let phases = Tensor::empty(
        ctx,
        Shape5::new(ishape.n(), plan.blocks * cout, td, th, tw),
        "conv_transpose3d phases",
    )?;
    for g in &plan.groups {
        let w = conv_transpose3d_phase_weight(ctx, rec, weight, &plan, g)?;
        let blocks = g.classes.iter().product::<usize>();
        conv3d_forward(
            ctx,
            rec,
            input,
            &w,
            None,
            phases.channels(g.block * cout, blocks * cout)?,
            &plan.conv_spec(g),
            variant,
        )?;
    }
    interleave(ctx, rec, &phases, &plan, bias, output, relu)
}

/// The channel tile of the pairs form of a k = s = 2 transposed conv (see
/// [`forward_pairs`]), where it applies: kernel 2 and stride 2 on every axis, no
/// front cropping (pad_lo 0) and output twice the input, input W a multiple of 4, Cout a
/// multiple of 4.
fn pairs_tile(
    plan: &PhasePlan,
    cout: usize,
    input: [usize; 3],
    output: [usize; 3],
) -> Option<usize> {
    // Output position o takes class o mod 2 of input voxel o div 2 only without front
    // cropping (the pairs epilogue stores at 2u + class).
    let applies = plan.kernel == [2; 3]
        && plan.stride == [2; 3]
        && plan.pad_lo == [0; 3]
        && output == input.map(|v| 2 * v)
        && input[2].is_multiple_of(4);
    // Both W classes of TC / 2 channels of one class pair per tile, whole 8-lane blocks.
    [32, 16, 8]
        .into_iter()
        .find(|tc| cout.is_multiple_of(tc / 2))
        .filter(|_| applies)
}

/// A k = s = 2 transposed conv without cropping is one 1x1x1 product of the input
/// (read straight from NCDHW) with 8 Cout channels: the pointwise kernel, its weight
/// ordered so a tile holds both W classes of its channels and stores each voxel's 8
/// outputs along W as two `vec4`s (`shaders/conv3d_pointwise.wgsl`, pairs). No input
/// packing, no scalar strided stores.
#[allow(clippy::too_many_arguments)]
fn forward_pairs(
    ctx: &GpuContext,
    rec: &mut Recorder,
    input: ChannelSlice<'_>,
    weight: &Tensor,
    bias: Option<&Tensor>,
    output: ChannelSlice<'_>,
    sub: Option<u32>,
    tc: usize,
    relu: bool,
) -> Result<()> {
    let cout = weight.shape().0[1];
    let packed_w = weight.derived(
        || format!("convT pairs tc{tc}"),
        || conv_transpose3d_pack_pair_weights(ctx, rec, weight, tc),
    )?;
    conv_pointwise_to(
        ctx,
        rec,
        input,
        &packed_w,
        (tc, 1),
        sub,
        bias,
        8 * cout,
        PointwiseOut::Pairs { output, cb: cout },
        relu,
    )
}

/// Packs a k = s = 2 transposed conv's `[Cin, Cout, 2, 2, 2]` weight for the pairs form:
/// the pointwise kernel's `[co_tile][ci4][tc]` vec4 layout over 8 Cout product channels,
/// channel `j = (q * Cout + co) * 2 + pw` holding kernel position `(q / 2, q % 2, pw)`.
pub fn conv_transpose3d_pack_pair_weights(
    ctx: &GpuContext,
    rec: &mut Recorder,
    weight: &Tensor,
    tc: usize,
) -> Result<Tensor> {
    let ws = weight.shape();
    let [cin, cout, kd, kh, kw] = ws.0;
    if [kd, kh, kw] != [2; 3] || ws.has_zero() || tc == 0 || !tc.is_multiple_of(2) {
        return Err(Error::Shape(format!(
            "conv_transpose3d_pack_pair_weights: weight '{}' {ws} is not a 2x2x2 kernel, \
             or tile {tc} is not even",
            weight.name
        )));
    }
    let c4 = cin.div_ceil(4);
    let total = (8 * cout).div_ceil(tc) * c4 * tc;
    let out = Tensor::empty(
        ctx,
        Shape5::new(1, 1, 1, total, 4),
        "conv_transpose3d packed pair weights",
    )?;
    let params = u32s(&[cin, cout, c4, tc, total, 0, 0, 0])?;
    weight_pass(ctx, rec, "pack_pair_weights", weight, &out, &params, total)?;
    Ok(out)
}

/// The phase convolutions on one shared packing of the input, each storing straight
/// into its strided output positions (see `shaders/conv3d.wgsl`, `phase_store`).
#[allow(clippy::too_many_arguments)]
fn forward_direct(
    ctx: &GpuContext,
    rec: &mut Recorder,
    input: ChannelSlice<'_>,
    weight: &Tensor,
    bias: Option<&Tensor>,
    output: ChannelSlice<'_>,
    plan: &PhasePlan,
    sub: Option<u32>,
    relu: bool,
) -> Result<()> {
    let cout = weight.shape().0[1];
    // Every group reads the packing from `most - taps` on, `most` = the longest taps.
    let most: [usize; 3] =
        std::array::from_fn(|a| plan.groups.iter().map(|g| g.taps[a]).max().unwrap_or(1));
    let multi_tap = plan.groups.iter().any(|g| g.taps != [1; 3]);
    let tiles: Vec<_> = plan
        .groups
        .iter()
        .map(|g| phase_tile_for(g.classes.iter().product::<usize>() * cout, multi_tap))
        .collect();
    let [td, th, tw] = plan.extent;
    let wp = tiles
        .iter()
        .map(|t| most[2] - 1 + tw.div_ceil(t.tx) * t.tx)
        .max()
        .unwrap_or(most[2] - 1 + tw);
    let padded = [most[0] - 1 + td, most[1] - 1 + th, wp];
    let pad = most.map(|m| (m - 1) as isize);
    let packed_in = pack_input(ctx, rec, input, [1, 1, 1], pad, padded)?;
    let tcs: Vec<usize> = tiles.iter().map(|t| t.tc).collect();
    let key = || format!("convT phases s{:?} tc{tcs:?}", plan.stride);
    let packed_w = weight.derived(key, || {
        Ok(conv_transpose3d_pack_phase_weights(ctx, rec, weight, plan, &tcs)?.0)
    })?;
    let w_offs = packed_phase_offsets(plan, input.count, cout, &tcs);
    for ((g, tile), w_off) in plan.groups.iter().zip(tiles).zip(w_offs) {
        let off: [isize; 3] =
            std::array::from_fn(|a| g.first[a] as isize - plan.pad_lo[a] as isize);
        conv_packed(
            ctx,
            rec,
            &PackedConv {
                input: &packed_in,
                weight: &packed_w,
                c4: input.count.div_ceil(4),
                kernel: g.taps,
                stride: [1; 3],
                padded,
                tile,
                subgroup: sub,
                in_off: std::array::from_fn(|a| most[a] - g.taps[a]),
                w_off,
                in_c4: (input.count.div_ceil(4), 0),
                phase: Some(PhaseStore {
                    extent: plan.extent,
                    cb: cout,
                    classes: g.classes,
                    stride: plan.stride,
                    off,
                }),
            },
            bias,
            ChannelSlice {
                tensor: output.tensor,
                offset: output.offset,
                count: g.classes.iter().product::<usize>() * cout,
            },
            relu,
        )?;
    }
    Ok(())
}

/// The dilated form: the input packed with `s - 1` zeros between voxels, then the
/// dense convolution (`conv3d_backward::transposed_conv`), `s^3` times the useful work.
/// Kept to measure the phase form against (`masnet-wgpu bench tconv`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv_transpose3d_forward_dilated(
    ctx: &GpuContext,
    rec: &mut Recorder,
    input: ChannelSlice<'_>,
    weight: &Tensor,
    bias: Option<&Tensor>,
    output: ChannelSlice<'_>,
    spec: &ConvTranspose3dSpec,
    variant: Conv3dVariant,
) -> Result<()> {
    let bias_len = bias.map(|b| b.shape().numel()).transpose()?;
    let expect = conv_transpose3d_check(
        input.tensor.shape(),
        input.count,
        weight.shape(),
        bias_len,
        spec,
    )?;
    check_output("conv_transpose3d", expect, &output, &input)?;
    if spec.relu {
        return Err(Error::InvalidArgument(
            "conv_transpose3d (dilated benchmark form): no fused ReLU".into(),
        ));
    }
    transposed_conv(
        ctx,
        rec,
        input,
        weight,
        bias,
        output,
        &spec.conv_spec(),
        variant,
    )
}

/// One convolution of the phase decomposition: the tap classes of one kernel extent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PhaseGroup {
    /// Class set per axis: 0 = classes `[0, e)`, 1 = classes `[e, s)` (see [`PhasePlan`]).
    pub sets: [usize; 3],
    /// Taps per axis (the sub-kernel's extent, >= 1).
    pub taps: [usize; 3],
    /// First class per axis.
    pub first: [usize; 3],
    /// Classes per axis (the group has their product, each a block of `Cout` channels).
    pub classes: [usize; 3],
    /// The group's first channel block in the phase tensor.
    pub block: usize,
}

/// The phase decomposition of a transposed convolution. Along an axis with stride `s`,
/// kernel `K` and cropping `pad_lo`, output `o` sums the taps `k = c + s*m` of input
/// `u - m`, where `q = o + pad_lo`, `u = q / s` and the class `c = q mod s`: class `c`
/// is the stride-1 convolution of the input with the `ceil((K - c) / s)` taps
/// `w[c + s*m]`. Classes `c < e = K mod s` have `ceil(K/s)` taps, the others
/// `floor(K/s)` (none when `K < s`: those positions get the bias only). Each triple of
/// class sets is one convolution writing consecutive blocks of `Cout` channels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PhasePlan {
    /// Stride per axis.
    pub stride: [usize; 3],
    /// Kernel extents.
    pub kernel: [usize; 3],
    /// Cropping at the start of each axis.
    pub pad_lo: [usize; 3],
    /// Classes with the longer sub-kernel per axis (`K mod s`).
    pub split: [usize; 3],
    /// Input extents.
    pub input: [usize; 3],
    /// Output extents.
    pub output: [usize; 3],
    /// Phase tensor extents: every `u` an output position reads (at least the input's).
    pub extent: [usize; 3],
    /// The convolutions, in block order.
    pub groups: Vec<PhaseGroup>,
    /// Blocks of `Cout` channels in the phase tensor.
    pub blocks: usize,
}

impl PhasePlan {
    /// Plans the decomposition for `input` extents and `kernel` (errors as
    /// [`ConvTranspose3dSpec::output_spatial`]).
    pub fn new(input: [usize; 3], kernel: [usize; 3], spec: &ConvTranspose3dSpec) -> Result<Self> {
        let output = spec.output_spatial(input, kernel)?;
        let (s, k) = (spec.stride, kernel);
        let split: [usize; 3] = std::array::from_fn(|a| k[a] % s[a]);
        // u = (o + pad_lo) / s for o < output; the convolutions need pad_hi = extent - n.
        let extent: [usize; 3] =
            std::array::from_fn(|a| ((output[a] - 1 + spec.pad_lo[a]) / s[a] + 1).max(input[a]));
        let set = |a: usize, g: usize| -> (usize, usize, usize) {
            // (first class, classes, taps)
            if g == 0 {
                (0, split[a], k[a].div_ceil(s[a]))
            } else {
                (split[a], s[a] - split[a], k[a] / s[a])
            }
        };
        let mut groups = Vec::new();
        let mut blocks = 0;
        for g in 0..8 {
            let sets = [(g >> 2) & 1, (g >> 1) & 1, g & 1];
            let parts: [(usize, usize, usize); 3] = std::array::from_fn(|a| set(a, sets[a]));
            if parts
                .iter()
                .any(|&(_, count, taps)| count == 0 || taps == 0)
            {
                continue;
            }
            let classes = parts.map(|p| p.1);
            groups.push(PhaseGroup {
                sets,
                taps: parts.map(|p| p.2),
                first: parts.map(|p| p.0),
                classes,
                block: blocks,
            });
            blocks += classes.iter().product::<usize>();
        }
        Ok(Self {
            stride: s,
            kernel: k,
            pad_lo: spec.pad_lo,
            split,
            input,
            output,
            extent,
            groups,
            blocks,
        })
    }

    /// The stride-1 convolution of `group`: sub-kernel mirrored, `taps - 1` voxels of
    /// zero padding in front, and at the end whatever makes its output the phase extent.
    pub fn conv_spec(&self, group: &PhaseGroup) -> Conv3dSpec {
        Conv3dSpec {
            stride: [1; 3],
            pad_lo: group.taps.map(|t| t - 1),
            pad_hi: std::array::from_fn(|a| self.extent[a] - self.input[a]),
            relu: false,
        }
    }

    /// The group of the class-set triple `sets`, if it has taps.
    fn group_of(&self, sets: [usize; 3]) -> Option<&PhaseGroup> {
        self.groups.iter().find(|g| g.sets == sets)
    }
}

const INTERLEAVE_SRC: &str = include_str!("../../shaders/conv_transpose3d_interleave.wgsl");
/// The compiled forms of `conv_transpose3d_interleave.wgsl`: (entry point, sections).
const MODULES: [(&str, &[&str]); 5] = [
    ("phase_weight", &["phase_weight"]),
    ("pack_phase_weights", &["pack_phase_weights"]),
    ("pack_pair_weights", &["pack_pair_weights"]),
    ("interleave", &["interleave", "scalar"]),
    ("interleave_vec4", &["interleave", "vec4"]),
];

/// The WGSL of `entry`: the common part of `conv_transpose3d_interleave.wgsl` followed
/// by the sections it needs, in order.
fn module_source(entry: &str) -> Result<String> {
    let missing = || {
        Error::InvalidArgument(format!(
            "conv_transpose3d: shaders/conv_transpose3d_interleave.wgsl has no entry '{entry}' \
             or lacks one of its sections"
        ))
    };
    let (_, names) = MODULES
        .iter()
        .find(|(e, _)| *e == entry)
        .ok_or_else(missing)?;
    let mut parts = INTERLEAVE_SRC.split("\n// @section ");
    let mut out = parts.next().unwrap_or_default().to_string();
    let sections: Vec<(&str, &str)> = parts
        .map(|part| {
            let (head, body) = part.split_once('\n').unwrap_or((part, ""));
            (head.trim(), body)
        })
        .collect();
    for name in names.iter() {
        let (_, body) = sections
            .iter()
            .find(|(h, _)| h == name)
            .ok_or_else(missing)?;
        out.push_str(&format!("\n// section {name}\n{body}"));
    }
    Ok(out)
}

fn check_group(what: &str, plan: &PhasePlan, group: &PhaseGroup) -> Result<()> {
    if plan.group_of(group.sets) != Some(group) {
        return Err(Error::InvalidArgument(format!(
            "{what}: {group:?} is not a group of the plan"
        )));
    }
    Ok(())
}

/// Records the weight of `group`'s convolution, `[classes * Cout, Cin, taps..]`, from
/// the transposed conv's `[Cin, Cout, k..]` `weight` (returned, a new tensor): block `b`
/// is class `first + (b as index over classes)`, tap `t` kernel position
/// `c + s * (taps - 1 - t)`.
pub fn conv_transpose3d_phase_weight(
    ctx: &GpuContext,
    rec: &mut Recorder,
    weight: &Tensor,
    plan: &PhasePlan,
    group: &PhaseGroup,
) -> Result<Tensor> {
    check_group("conv_transpose3d_phase_weight", plan, group)?;
    let ws = weight.shape();
    let [cin, cout, kd, kh, kw] = ws.0;
    if [kd, kh, kw] != plan.kernel || ws.has_zero() {
        return Err(Error::Shape(format!(
            "conv_transpose3d_phase_weight: weight '{}' {ws} does not have the plan's kernel \
             {:?}",
            weight.name, plan.kernel
        )));
    }
    let [md, mh, mw] = group.taps;
    let blocks = group.classes.iter().product::<usize>();
    let shape = Shape5::new(blocks * cout, cin, md, mh, mw);
    let out = Tensor::empty(ctx, shape, "conv_transpose3d phase weight")?;
    let total = shape.numel()?;
    let [sd, sh, sw] = plan.stride;
    let [fd, fh, fw] = group.first;
    let [nd, nh, nw] = group.classes;
    let params = u32s(&[
        cin, cout, kd, kh, kw, md, mh, mw, sd, sh, sw, total, fd, fh, fw, 0, nd, nh, nw, 0,
    ])?;
    weight_pass(ctx, rec, "phase_weight", weight, &out, &params, total)?;
    Ok(out)
}

/// Runs `entry` of the weight sections over `total` elements: `weight` in, `out` out.
fn weight_pass(
    ctx: &GpuContext,
    rec: &mut Recorder,
    entry: &'static str,
    weight: &Tensor,
    out: &Tensor,
    params: &[u32],
    total: usize,
) -> Result<()> {
    launch(
        ctx,
        rec,
        PipelineKey::new("conv_transpose3d_interleave", entry),
        &module_source(entry)?,
        &[Arg::Read(weight), Arg::Write(out)],
        params,
        total,
    )
}

/// vec4s of `group`'s weight packed for `tc`-channel tiles: `[co_tile][ci4][taps..][tc]`.
fn packed_group_len(group: &PhaseGroup, cin: usize, cout: usize, tc: usize) -> usize {
    let channels = group.classes.iter().product::<usize>() * cout;
    channels.div_ceil(tc) * cin.div_ceil(4) * group.taps.iter().product::<usize>() * tc
}

/// First vec4 of each group's weight in [`conv_transpose3d_pack_phase_weights`]'s
/// output, and the total length last.
pub fn packed_phase_offsets(
    plan: &PhasePlan,
    cin: usize,
    cout: usize,
    tcs: &[usize],
) -> Vec<usize> {
    let mut offs = vec![0];
    for (g, &tc) in plan.groups.iter().zip(tcs) {
        let last = offs[offs.len() - 1];
        offs.push(last + packed_group_len(g, cin, cout, tc));
    }
    offs
}

/// Records every group's convolution weight (as [`conv_transpose3d_phase_weight`])
/// already packed for conv3d's register tile of `tcs[g]` channels, all in one tensor
/// and one dispatch; returns it with [`packed_phase_offsets`].
pub fn conv_transpose3d_pack_phase_weights(
    ctx: &GpuContext,
    rec: &mut Recorder,
    weight: &Tensor,
    plan: &PhasePlan,
    tcs: &[usize],
) -> Result<(Tensor, Vec<usize>)> {
    let ws = weight.shape();
    let [cin, cout, kd, kh, kw] = ws.0;
    if [kd, kh, kw] != plan.kernel || ws.has_zero() {
        return Err(Error::Shape(format!(
            "conv_transpose3d_pack_phase_weights: weight '{}' {ws} does not have the plan's \
             kernel {:?}",
            weight.name, plan.kernel
        )));
    }
    if tcs.len() != plan.groups.len() || tcs.contains(&0) {
        return Err(Error::InvalidArgument(format!(
            "conv_transpose3d_pack_phase_weights: {} tile widths {tcs:?} for {} groups \
             (each >= 1)",
            tcs.len(),
            plan.groups.len()
        )));
    }
    let offs = packed_phase_offsets(plan, cin, cout, tcs);
    let total = offs[offs.len() - 1];
    let out = Tensor::empty(
        ctx,
        Shape5::new(1, 1, 1, total, 4),
        "conv_transpose3d packed phase weights",
    )?;
    let mut params = u32s(&[
        cin,
        cout,
        cin.div_ceil(4),
        plan.groups.len(),
        kd,
        kh,
        kw,
        total,
        plan.stride[0],
        plan.stride[1],
        plan.stride[2],
        0,
    ])?;
    for (i, (g, &tc)) in plan.groups.iter().zip(tcs).enumerate() {
        let [md, mh, mw] = g.taps;
        let [fd, fh, fw] = g.first;
        let [nd, nh, nw] = g.classes;
        params.extend(u32s(&[
            offs[i],
            offs[i + 1],
            tc,
            0,
            md,
            mh,
            mw,
            0,
            fd,
            fh,
            fw,
            0,
            nd,
            nh,
            nw,
            0,
        ])?);
    }
    params.resize(12 + 32 * 4, 0);
    weight_pass(ctx, rec, "pack_phase_weights", weight, &out, &params, total)?;
    Ok((out, offs))
}

/// Records `output[:, range] = interleave(phases) + bias`: each output position takes
/// its class's value from the phase tensor `[N, blocks * Cout, extent..]` (zero for a
/// class without taps) plus the bias; other channels of `output` are not touched.
pub fn conv_transpose3d_interleave(
    ctx: &GpuContext,
    rec: &mut Recorder,
    phases: &Tensor,
    plan: &PhasePlan,
    bias: Option<&Tensor>,
    output: ChannelSlice<'_>,
) -> Result<()> {
    interleave(ctx, rec, phases, plan, bias, output, false)
}

fn interleave(
    ctx: &GpuContext,
    rec: &mut Recorder,
    phases: &Tensor,
    plan: &PhasePlan,
    bias: Option<&Tensor>,
    output: ChannelSlice<'_>,
    relu: bool,
) -> Result<()> {
    let ps = phases.shape();
    let os = output.tensor.shape();
    let cout = output.count;
    if ps.c() != plan.blocks * cout || ps.spatial() != plan.extent || ps.n() != os.n() {
        return Err(Error::Shape(format!(
            "conv_transpose3d_interleave: phases '{}' {ps} must be [{}, {} blocks x {cout}, \
             {:?}]",
            phases.name,
            os.n(),
            plan.blocks,
            plan.extent
        )));
    }
    if os.spatial() != plan.output || output.offset + cout > os.c() || cout == 0 {
        return Err(Error::Shape(format!(
            "conv_transpose3d_interleave: output '{}' {os} channels {}..{} do not fit the \
             plan's output {:?}",
            output.tensor.name,
            output.offset,
            output.offset + cout,
            plan.output
        )));
    }
    if let Some(b) = bias {
        if b.shape().numel()? != cout {
            return Err(Error::Shape(format!(
                "conv_transpose3d_interleave: bias '{}' {} must hold {cout} values",
                b.name,
                b.shape()
            )));
        }
    }
    if std::ptr::eq(phases, output.tensor) {
        return Err(Error::InvalidArgument(format!(
            "conv_transpose3d_interleave: phases and output are the same tensor '{}'",
            phases.name
        )));
    }
    let [od, oh, ow] = plan.output;
    let [td, th, tw] = plan.extent;
    let [sd, sh, sw] = plan.stride;
    let [pd, ph, pw] = plan.pad_lo;
    let [ed, eh, ew] = plan.split;
    let rows = os.n() * cout * od * oh;
    let mut params = u32s(&[
        rows,
        cout,
        os.c(),
        output.offset,
        od,
        oh,
        ow,
        ps.c(),
        td,
        th,
        tw,
        usize::from(bias.is_some()),
        sd,
        sh,
        sw,
        usize::from(relu),
        pd,
        ph,
        pw,
        0,
        ed,
        eh,
        ew,
        0,
    ])?;
    for g in 0..8 {
        let sets = [(g >> 2) & 1, (g >> 1) & 1, g & 1];
        params.push(match plan.group_of(sets) {
            Some(grp) => u32s(&[grp.block])?[0],
            None => u32::MAX,
        });
    }
    // Rows of a multiple of 4 voxels (every row then starts on a vec4) store vec4s.
    let entry = if ow % 4 == 0 {
        "interleave_vec4"
    } else {
        "interleave"
    };
    // Without a bias the kernel never reads binding 1; bind the phases as a stand-in.
    launch(
        ctx,
        rec,
        PipelineKey::new("conv_transpose3d_interleave", entry),
        &module_source(entry)?,
        &[
            Arg::Read(phases),
            Arg::Read(bias.unwrap_or(phases)),
            Arg::Write(output.tensor),
        ],
        &params,
        rows,
    )
}

/// Records `grad_in = dL/dx` (overwrites the range) given `grad_out = dL/dy`.
pub fn conv_transpose3d_backward_input(
    ctx: &GpuContext,
    rec: &mut Recorder,
    grad_out: ChannelSlice<'_>,
    weight: &Tensor,
    grad_in: ChannelSlice<'_>,
    spec: &ConvTranspose3dSpec,
    variant: Conv3dVariant,
) -> Result<()> {
    // Shapes are checked by the convolution (its output is the gradient of our input).
    conv3d_forward(
        ctx,
        rec,
        grad_out,
        weight,
        None,
        grad_in,
        &spec.conv_spec(),
        variant,
    )
}

/// Records `grad_weight = dL/dW` (`[Cin, Cout, k..]`, overwritten).
pub fn conv_transpose3d_backward_weight(
    ctx: &GpuContext,
    rec: &mut Recorder,
    input: ChannelSlice<'_>,
    grad_out: ChannelSlice<'_>,
    grad_weight: &Tensor,
    spec: &ConvTranspose3dSpec,
    variant: Conv3dVariant,
) -> Result<()> {
    conv3d_backward_weight(
        ctx,
        rec,
        grad_out,
        input,
        grad_weight,
        &spec.conv_spec(),
        variant,
    )
}

/// Records `grad_bias = dL/db` (per-channel sums of `grad_out`).
pub fn conv_transpose3d_backward_bias(
    ctx: &GpuContext,
    rec: &mut Recorder,
    grad_out: ChannelSlice<'_>,
    grad_bias: &Tensor,
) -> Result<()> {
    conv3d_backward_bias(ctx, rec, grad_out, grad_bias)
}

/// CPU reference in f64 by the scatter definition:
/// `y[n, co, i*s - pad_lo + k] += x[n, ci, i] * w[ci, co, k]`, cropped to the output.
pub fn conv_transpose3d_forward_f64(
    input: &Array5<f64>,
    weight: &Array5<f64>,
    bias: Option<&[f64]>,
    spec: &ConvTranspose3dSpec,
) -> Result<Array5<f64>> {
    let s = input.shape();
    let w = weight.shape();
    let ishape = Shape5::new(s[0], s[1], s[2], s[3], s[4]);
    let wshape = Shape5::new(w[0], w[1], w[2], w[3], w[4]);
    let oshape = conv_transpose3d_check(ishape, s[1], wshape, bias.map(|b| b.len()), spec)?;
    let [n, cout, od, oh, ow] = oshape.0;
    let mut out = Array5::<f64>::zeros(oshape.0);
    let pos = |i: usize, k: usize, a: usize, ext: usize| -> Option<usize> {
        let p = (i * spec.stride[a] + k) as isize - spec.pad_lo[a] as isize;
        (p >= 0 && (p as usize) < ext).then_some(p as usize)
    };
    for b in 0..n {
        for ci in 0..s[1] {
            for z in 0..s[2] {
                for y in 0..s[3] {
                    for x in 0..s[4] {
                        let v = input[[b, ci, z, y, x]];
                        for kz in 0..w[2] {
                            let Some(oz) = pos(z, kz, 0, od) else {
                                continue;
                            };
                            for ky in 0..w[3] {
                                let Some(oy) = pos(y, ky, 1, oh) else {
                                    continue;
                                };
                                for kx in 0..w[4] {
                                    let Some(ox) = pos(x, kx, 2, ow) else {
                                        continue;
                                    };
                                    for co in 0..cout {
                                        out[[b, co, oz, oy, ox]] +=
                                            v * weight[[ci, co, kz, ky, kx]];
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    if let Some(bias) = bias {
        for ((_, co, _, _, _), v) in out.indexed_iter_mut() {
            *v += bias[co];
        }
    }
    Ok(out)
}

/// CPU reference of the input gradient: the transposing convolution of `grad_out`.
pub fn conv_transpose3d_backward_input_f64(
    grad_out: &Array5<f64>,
    weight: &Array5<f64>,
    spec: &ConvTranspose3dSpec,
) -> Result<Array5<f64>> {
    crate::ops::conv3d::conv3d_forward_f64(grad_out, 0, weight, None, &spec.conv_spec())
}

/// CPU reference of the weight gradient `[Cin, Cout, k..]`.
pub fn conv_transpose3d_backward_weight_f64(
    input: &Array5<f64>,
    grad_out: &Array5<f64>,
    kernel: [usize; 3],
    spec: &ConvTranspose3dSpec,
) -> Array5<f64> {
    conv3d_backward_weight_f64(grad_out, 0, input, kernel, &spec.conv_spec())
}

/// CPU reference of [`conv_transpose3d_phase_weight`] in f64: for block `b` (class
/// `first + (b over classes)`), `out[b * Cout + co, ci, t] = w[ci, co, c + s * (taps - 1 - t)]`.
pub fn conv_transpose3d_phase_weight_f64(
    weight: &Array5<f64>,
    plan: &PhasePlan,
    group: &PhaseGroup,
) -> Array5<f64> {
    let w = weight.shape();
    let (cin, cout) = (w[0], w[1]);
    let [nd, nh, nw] = group.classes;
    let [md, mh, mw] = group.taps;
    let s = plan.stride;
    let mut out = Array5::<f64>::zeros([nd * nh * nw * cout, cin, md, mh, mw]);
    let mut b = 0;
    for ld in 0..nd {
        for lh in 0..nh {
            for lw in 0..nw {
                let c = [
                    group.first[0] + ld,
                    group.first[1] + lh,
                    group.first[2] + lw,
                ];
                for co in 0..cout {
                    for ci in 0..cin {
                        for t0 in 0..md {
                            for t1 in 0..mh {
                                for t2 in 0..mw {
                                    out[[b * cout + co, ci, t0, t1, t2]] = weight[[
                                        ci,
                                        co,
                                        c[0] + s[0] * (md - 1 - t0),
                                        c[1] + s[1] * (mh - 1 - t1),
                                        c[2] + s[2] * (mw - 1 - t2),
                                    ]];
                                }
                            }
                        }
                    }
                }
                b += 1;
            }
        }
    }
    out
}

/// CPU reference of [`conv_transpose3d_pack_phase_weights`] in f64: each group's
/// [`conv_transpose3d_phase_weight_f64`] in conv3d's packed layout, 4 values per vec4.
pub fn conv_transpose3d_pack_phase_weights_f64(
    weight: &Array5<f64>,
    plan: &PhasePlan,
    tcs: &[usize],
) -> Vec<f64> {
    let mut out = Vec::new();
    for (g, &tc) in plan.groups.iter().zip(tcs) {
        let w = conv_transpose3d_phase_weight_f64(weight, plan, g);
        let [cout, cin, md, mh, mw] = [w.shape()[0], w.shape()[1], g.taps[0], g.taps[1], g.taps[2]];
        for cot in 0..cout.div_ceil(tc) {
            for ci4 in 0..cin.div_ceil(4) {
                for td in 0..md {
                    for th in 0..mh {
                        for c in 0..tc {
                            for tw in 0..mw {
                                for k in 0..4 {
                                    let (co, ci) = (cot * tc + c, ci4 * 4 + k);
                                    out.push(if co < cout && ci < cin {
                                        w[[co, ci, td, th, tw]]
                                    } else {
                                        0.0
                                    });
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

/// CPU reference of [`conv_transpose3d_pack_pair_weights`]: the packed vec4s as a flat
/// list of values.
pub fn conv_transpose3d_pack_pair_weights_f64(weight: &Array5<f64>, tc: usize) -> Vec<f64> {
    let [cin, cout] = [weight.shape()[0], weight.shape()[1]];
    let mut out = Vec::new();
    for cot in 0..(8 * cout).div_ceil(tc) {
        for ci4 in 0..cin.div_ceil(4) {
            for c in 0..tc {
                let j = cot * tc + c;
                let (pw, co, q) = (j % 2, (j / 2) % cout, j / 2 / cout);
                for k in 0..4 {
                    let ci = ci4 * 4 + k;
                    out.push(if q < 4 && ci < cin {
                        weight[[ci, co, q / 2, q % 2, pw]]
                    } else {
                        0.0
                    });
                }
            }
        }
    }
    out
}

/// CPU reference of [`conv_transpose3d_interleave`] in f64, as a scatter: the output
/// starts as the bias (zero without), and block `b` of class `c` at phase position `u`
/// lands on output position `u * s + c - pad_lo` when that is inside the output.
pub fn conv_transpose3d_interleave_f64(
    phases: &Array5<f64>,
    plan: &PhasePlan,
    bias: Option<&[f64]>,
) -> Array5<f64> {
    let p = phases.shape();
    let n = p[0];
    let cout = p[1] / plan.blocks.max(1);
    let [od, oh, ow] = plan.output;
    let mut out = Array5::<f64>::zeros([n, cout, od, oh, ow]);
    if let Some(bias) = bias {
        for ((_, co, _, _, _), v) in out.indexed_iter_mut() {
            *v = bias[co];
        }
    }
    let pos = |u: usize, c: usize, a: usize| -> Option<usize> {
        let o = (u * plan.stride[a] + c) as isize - plan.pad_lo[a] as isize;
        (o >= 0 && (o as usize) < plan.output[a]).then_some(o as usize)
    };
    for g in &plan.groups {
        let mut b = g.block;
        for ld in 0..g.classes[0] {
            for lh in 0..g.classes[1] {
                for lw in 0..g.classes[2] {
                    let c = [g.first[0] + ld, g.first[1] + lh, g.first[2] + lw];
                    for nb in 0..n {
                        for co in 0..cout {
                            for uz in 0..p[2] {
                                let Some(oz) = pos(uz, c[0], 0) else { continue };
                                for uy in 0..p[3] {
                                    let Some(oy) = pos(uy, c[1], 1) else { continue };
                                    for ux in 0..p[4] {
                                        let Some(ox) = pos(ux, c[2], 2) else { continue };
                                        out[[nb, co, oz, oy, ox]] +=
                                            phases[[nb, b * cout + co, uz, uy, ux]];
                                    }
                                }
                            }
                        }
                    }
                    b += 1;
                }
            }
        }
    }
    out
}

/// The phase decomposition on the CPU in f64 (phase weights, `conv3d_forward_f64` per
/// group, interleave): equals [`conv_transpose3d_forward_f64`] for every geometry.
pub fn conv_transpose3d_forward_phased_f64(
    input: &Array5<f64>,
    weight: &Array5<f64>,
    bias: Option<&[f64]>,
    spec: &ConvTranspose3dSpec,
) -> Result<Array5<f64>> {
    let s = input.shape();
    let w = weight.shape();
    conv_transpose3d_check(
        Shape5::new(s[0], s[1], s[2], s[3], s[4]),
        s[1],
        Shape5::new(w[0], w[1], w[2], w[3], w[4]),
        bias.map(|b| b.len()),
        spec,
    )?;
    let plan = PhasePlan::new([s[2], s[3], s[4]], [w[2], w[3], w[4]], spec)?;
    let cout = w[1];
    let [td, th, tw] = plan.extent;
    let mut phases = Array5::<f64>::zeros([s[0], plan.blocks * cout, td, th, tw]);
    for g in &plan.groups {
        let pw = conv_transpose3d_phase_weight_f64(weight, &plan, g);
        let y = conv3d_forward_f64(input, 0, &pw, None, &plan.conv_spec(g))?;
        let c0 = g.block * cout;
        phases
            .slice_mut(ndarray::s![.., c0..c0 + y.shape()[1], .., .., ..])
            .assign(&y);
    }
    Ok(conv_transpose3d_interleave_f64(&phases, &plan, bias))
}

/// The shaders of this module: the phase weight and the two interleave kernels (one
/// module per entry point of `conv_transpose3d_interleave.wgsl`), and the gather-form
/// kernel used by BuiNet's grouped up-sampling (launched from `nn::buinet`).
pub fn shader_variants() -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = MODULES
        .iter()
        .filter_map(|(e, _)| {
            module_source(e)
                .ok()
                .map(|src| (format!("conv_transpose3d_interleave {e}"), src))
        })
        .collect();
    v.push((
        "conv_transpose3d_gather".to_string(),
        include_str!("../../shaders/conv_transpose3d_gather.wgsl").to_string(),
    ));
    v
}
