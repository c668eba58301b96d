//! 1x1x1 convolutions (stride 1, no padding) read straight from NCDHW: the register-
//! tiled family's kernel for them (`Tiled` / `Subgroup`), with no input packing. See
//! `shaders/conv3d_pointwise.wgsl`. The weight is packed as for `conv3d.wgsl`.

use crate::error::{Error, Result};
use crate::gpu::{Binding, GpuContext, PipelineKey, Recorder};
use crate::ops::conv3d::{as_u32, grid_for, u32s, weight_lines, Conv3dSpec, ConvTile};
use crate::ops::params::{dispatch, uniform_u32};
use crate::tensor::{ChannelSlice, Tensor};

const SRC: &str = include_str!("../../shaders/conv3d_pointwise.wgsl");
const WG: usize = 64;

/// Whether the pointwise kernel can run `spec` with `kernel` on `voxels` output voxels:
/// 1x1x1, stride 1, no padding, and whole vec4 of voxels per channel.
pub fn applies(kernel: [usize; 3], spec: &Conv3dSpec, voxels: usize) -> bool {
    kernel == [1; 3]
        && spec.stride == [1; 3]
        && spec.pad_lo == [0; 3]
        && spec.pad_hi == [0; 3]
        && voxels.is_multiple_of(4)
}

/// Output channels x vec4 of voxels per invocation: equal tiles of up to 32 channels
/// when that gives a multiple of 8 (whole subgroup weight blocks), else the register-
/// tiled kernel's channel tile; one vec4 of voxels. lavapipe, DU-Net folded 1x32^3, its
/// 21 bottlenecks C->64 (`bench dunet --profile`): TC=32 560-606 ms per 4 forwards,
/// TC=16 821-899, TC=22 921, TC=64 1190. C194->64: one vec4 34 ms, two 48 (TC=16).
pub fn tile_for(cout: usize) -> (usize, usize) {
    let wide = cout.max(1).div_ceil(cout.max(1).div_ceil(32));
    let tc = if wide.is_multiple_of(8) {
        wide
    } else {
        ConvTile::for_channels(cout).tc
    };
    (tc, 1)
}

/// How the pointwise kernel's epilogue stores (see `shaders/conv3d_pointwise.wgsl`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Epilogue {
    /// A channel range of an NCDHW tensor.
    Channels,
    /// conv3d's packed input layout (`tc` a multiple of 4).
    Packed,
    /// A k = s = 2 transposed conv's output, both W classes of a channel per store
    /// (`tc` even).
    Pairs,
}

/// Generates the unrolled parts of `shaders/conv3d_pointwise.wgsl` for `epilogue`.
pub fn pointwise_source(tc: usize, xv: usize, subgroup: bool, epilogue: Epilogue) -> String {
    let packed = epilogue == Epilogue::Packed;
    use std::fmt::Write;
    let mut acc = String::new();
    let mut mac = String::new();
    let mut epi = String::new();
    for c in 0..tc {
        for v in 0..xv {
            let _ = writeln!(acc, "    var a{c}_{v} = vec4<f32>(0.0);");
            if epilogue == Epilogue::Channels {
                let _ = writeln!(epi, "    put(n, co0 + {c}u, v0 + {v}u, a{c}_{v});");
            }
        }
    }
    if epilogue == Epilogue::Pairs {
        let _ = writeln!(epi, "    let pq = (co0 / 2u) / p.cb;");
        let _ = writeln!(epi, "    let pco = (co0 / 2u) % p.cb;");
        for v in 0..xv {
            for i in 0..tc / 2 {
                let _ = writeln!(
                    epi,
                    "    put_pairs(n, pq, pco + {i}u, v0 + {v}u, a{}_{v}, a{}_{v});",
                    2 * i,
                    2 * i + 1
                );
            }
        }
    }
    if packed {
        for v in 0..xv {
            let _ = writeln!(epi, "    let pb{v} = packed_base(n, v0 + {v}u);");
            for c in (0..tc).step_by(4) {
                let _ = writeln!(
                    epi,
                    "    put_packed(pb{v}, co0 + {c}u, v0 + {v}u, a{c}_{v}, a{}_{v}, a{}_{v}, \
                     a{}_{v});",
                    c + 1,
                    c + 2,
                    c + 3
                );
            }
        }
    }
    let mut voxels = String::new();
    let mut full = String::new();
    let mut tail = String::new();
    for v in 0..xv {
        let _ = writeln!(voxels, "    let vv{v} = min(v0 + {v}u, p.vol4 - 1u);");
    }
    for k in 0..4 {
        for v in 0..xv {
            let _ = writeln!(
                full,
                "        let x{k}_{v} = inp[cb + {k}u * p.vol4 + vv{v}];"
            );
            let _ = writeln!(tail, "        let x{k}_{v} = load_in(n, c + {k}u, vv{v});");
        }
    }
    let (loads, weights) = weight_lines(tc, "TC", subgroup);
    mac.push_str(&loads);
    for (c, line) in weights.iter().enumerate() {
        mac.push_str(line);
        for v in 0..xv {
            let _ = writeln!(
                mac,
                "        a{c}_{v} = a{c}_{v} + w{c}.x * x0_{v} + w{c}.y * x1_{v} + w{c}.z * x2_{v} \
                 + w{c}.w * x3_{v};"
            );
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
    SRC.replace("//{{ENTRY_ARGS}}", args)
        .replace("//{{SETUP}}", setup)
        .replace("    //{{ACC_DECL}}\n", &acc)
        .replace("    //{{VOXELS}}\n", &voxels)
        .replace("        //{{LOADS_FULL}}\n", &full)
        .replace("        //{{LOADS_TAIL}}\n", &tail)
        .replace("        //{{MAC_BLOCK}}\n", &mac)
        .replace("    //{{EPILOGUE}}\n", &epi)
}

/// The shader as the launcher specialises it, with and without subgroups (name, WGSL),
/// for the portability test.
pub fn shader_variants() -> Vec<(String, String)> {
    use Epilogue::*;
    [
        (16, 2, false, Channels),
        (4, 4, true, Channels),
        (16, 2, true, Channels),
        (32, 1, true, Packed),
        (8, 2, false, Packed),
        (32, 1, true, Pairs),
        (8, 2, false, Pairs),
    ]
    .into_iter()
    .map(|(tc, xv, sub, epi)| {
        let key = key(tc, xv, sub.then_some(32), epi);
        (
            format!("conv3d_pointwise tc{tc} xv{xv} subgroup={sub} {epi:?}"),
            format!("{}{}", key.prelude(), pointwise_source(tc, xv, sub, epi)),
        )
    })
    .collect()
}

fn key(tc: usize, xv: usize, subgroup: Option<u32>, epilogue: Epilogue) -> PipelineKey {
    let mut k = PipelineKey::new(
        if subgroup.is_some() {
            "conv3d_pointwise_subgroup"
        } else {
            "conv3d_pointwise"
        },
        "conv3d_pointwise",
    )
    .with_const("TC", tc as u32)
    .with_const("XV", xv as u32);
    if let Some(s) = subgroup {
        k = k.with_const("SG", s);
    }
    match epilogue {
        Epilogue::Channels => k,
        Epilogue::Packed => k.with_const("PACKED", 1),
        Epilogue::Pairs => k.with_const("PAIRS", 1),
    }
}

/// Where a pointwise conv stores its result.
pub(crate) enum PointwiseOut<'a> {
    /// A channel range of an NCDHW tensor.
    Channels(ChannelSlice<'a>),
    /// conv3d's packed input layout: `tensor` is `[N, 4 * c4, ext]` (borders zeroed by
    /// the caller), voxel (0, 0, 0) at `origin`.
    Packed {
        tensor: &'a Tensor,
        ext: [usize; 3],
        origin: [usize; 3],
    },
    /// A k = s = 2 transposed conv's output range (spatial extents twice the input's),
    /// `cb` channels, product channels ordered as in [`Epilogue::Pairs`].
    Pairs { output: ChannelSlice<'a>, cb: usize },
}

/// Records `output = input · weight (+ bias) (ReLU)` for a 1x1x1 conv whose checks the
/// caller did ([`applies`] holds); `packed_w` is `conv3d::pack_weight(.., tc)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv_pointwise(
    ctx: &GpuContext,
    rec: &mut Recorder,
    input: ChannelSlice<'_>,
    packed_w: &Tensor,
    tile: (usize, usize),
    subgroup: Option<u32>,
    bias: Option<&Tensor>,
    output: ChannelSlice<'_>,
    relu: bool,
) -> Result<()> {
    let cout = output.count;
    conv_pointwise_to(
        ctx,
        rec,
        input,
        packed_w,
        tile,
        subgroup,
        bias,
        cout,
        PointwiseOut::Channels(output),
        relu,
    )
}

/// [`conv_pointwise`] of `cout` channels into `out`; a packed `out` needs `tc` and W
/// multiples of 4.
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv_pointwise_to(
    ctx: &GpuContext,
    rec: &mut Recorder,
    input: ChannelSlice<'_>,
    packed_w: &Tensor,
    (tc, xv): (usize, usize),
    subgroup: Option<u32>,
    bias: Option<&Tensor>,
    cout: usize,
    out: PointwiseOut<'_>,
    relu: bool,
) -> Result<()> {
    let is = input.tensor.shape();
    let n = is.n();
    let [d, h, w] = is.spatial();
    let vol4 = d * h * w / 4;
    let epilogue = match out {
        PointwiseOut::Channels(_) => Epilogue::Channels,
        PointwiseOut::Packed { .. } => Epilogue::Packed,
        PointwiseOut::Pairs { .. } => Epilogue::Pairs,
    };
    let bad = match &out {
        PointwiseOut::Channels(_) => false,
        PointwiseOut::Packed { .. } => !tc.is_multiple_of(4) || !w.is_multiple_of(4),
        PointwiseOut::Pairs { output, cb } => {
            !tc.is_multiple_of(2)
                || !cb.is_multiple_of(tc / 2)
                || cout != 8 * cb
                || output.count != *cb
                || !w.is_multiple_of(4)
                || output.tensor.shape().spatial() != [2 * d, 2 * h, 2 * w]
        }
    };
    if bad {
        return Err(Error::InvalidArgument(format!(
            "pointwise conv: {epilogue:?} output does not fit tile {tc}, {cout} channels, \
             input {d}x{h}x{w}"
        )));
    }
    let (obuf, obytes, out_c_total, out_c_off) = match &out {
        PointwiseOut::Channels(o) | PointwiseOut::Pairs { output: o, .. } => (
            o.tensor.buffer(),
            o.tensor.bytes(),
            o.tensor.shape().c(),
            o.offset,
        ),
        PointwiseOut::Packed { tensor, .. } => (tensor.buffer(), tensor.bytes(), 0, 0),
    };
    let (pc4, ext, origin) = match &out {
        PointwiseOut::Packed {
            tensor,
            ext,
            origin,
        } => (tensor.shape().c() / 4, *ext, *origin),
        _ => (0, [0; 3], [0; 3]),
    };
    let cb = match &out {
        PointwiseOut::Pairs { cb, .. } => *cb,
        _ => 0,
    };
    let v_tiles = vol4.div_ceil(xv);
    let co_tiles = cout.div_ceil(tc);
    let sblocks = v_tiles.div_ceil(WG);
    let grid = grid_for(ctx, sblocks * co_tiles * n)?;
    let key = key(tc, xv, subgroup, epilogue)
        .with_override("HAS_BIAS", f64::from(u8::from(bias.is_some())))
        .with_override("RELU", f64::from(u8::from(relu)));
    let pipe = ctx.pipelines.get(
        &ctx.device,
        &key,
        &pointwise_source(tc, xv, subgroup.is_some(), epilogue),
        &[
            Binding::ReadOnly,
            Binding::ReadOnly,
            Binding::ReadOnly,
            Binding::ReadWrite,
            Binding::Uniform,
        ],
    )?;
    let params = uniform_u32(
        ctx,
        &u32s(&[
            n,
            input.count,
            input.count.div_ceil(4),
            cout,
            is.c(),
            input.offset,
            out_c_total,
            out_c_off,
            vol4,
            v_tiles,
            co_tiles,
            sblocks,
            as_u32(grid.total as usize, "pointwise workgroups")? as usize,
            0,
            0,
            0,
            w,
            h,
            pc4,
            ext[0],
            ext[1],
            ext[2],
            origin[0],
            origin[1],
            origin[2],
            d,
            cb,
            0,
        ])?,
    )?;
    // Without a bias the kernel never reads binding 2; bind the weight as a stand-in.
    let (bbuf, bbytes) = match bias {
        Some(b) => (b.buffer(), b.bytes()),
        None => (packed_w.buffer(), packed_w.bytes()),
    };
    dispatch(
        ctx,
        rec,
        &pipe,
        &[
            (input.tensor.buffer(), input.tensor.bytes()),
            (packed_w.buffer(), packed_w.bytes()),
            (bbuf, bbytes),
            (obuf, obytes),
            (&params, params.size()),
        ],
        grid,
    )
}
