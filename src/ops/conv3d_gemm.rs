//! conv3d as a workgroup-shared tiled implicit GEMM (`Conv3dVariant::Gemm`): the kernel
//! family for real GPUs, where staging operands in workgroup memory beats per-lane loads.
//! Needs no subgroups, so it runs on every backend (GL included). It reads the same packed
//! operands as the register-tiled kernel (`conv3d::pack_input`, `conv3d::pack_weight`
//! with `tc = BN`), so the input gradient (a forward on re-packed operands) uses it too.
//! See `shaders/conv3d_gemm.wgsl`.

use crate::error::{Error, Result};
use crate::gpu::{Binding, GpuContext, PipelineKey, Recorder};
use crate::ops::conv3d::{as_u32, grid_for, u32s};
use crate::ops::params::{dispatch, uniform_u32};
use crate::tensor::{ChannelSlice, Tensor};

const SRC: &str = include_str!("../../shaders/conv3d_gemm.wgsl");
const WG: usize = 64;

/// Tile configuration of the GEMM kernel (sizes in output voxels, output channels and
/// vec4 of K).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct GemmTile {
    /// Output voxels per workgroup (divides 64).
    pub bm: usize,
    /// Output channels per workgroup (divides 64).
    pub bn: usize,
    /// K slice staged in workgroup memory per step, in vec4 (4 input channels each).
    pub bk: usize,
    /// Output voxels per invocation.
    pub tm: usize,
    /// Output channels per invocation.
    pub tn: usize,
}

impl GemmTile {
    /// 64 voxels x 32 channels, 8 vec4 of K per step, 8x4 per invocation.
    pub const M64_N32: Self = Self {
        bm: 64,
        bn: 32,
        bk: 8,
        tm: 8,
        tn: 4,
    };
    /// 64 voxels x 64 channels, 4 vec4 of K per step, 8x8 per invocation.
    pub const M64_N64: Self = Self {
        bm: 64,
        bn: 64,
        bk: 4,
        tm: 8,
        tn: 8,
    };
    /// 32 voxels x 32 channels, 8 vec4 of K per step, 4x4 per invocation.
    pub const M32_N32: Self = Self {
        bm: 32,
        bn: 32,
        bk: 8,
        tm: 4,
        tn: 4,
    };
    /// 64 voxels x 16 channels, 8 vec4 of K per step, 4x4 per invocation (few channels).
    pub const M64_N16: Self = Self {
        bm: 64,
        bn: 16,
        bk: 8,
        tm: 4,
        tn: 4,
    };

    /// The default tile for `cout` output channels (`MASNET_GEMM_TILE=BMxBNxBKxTMxTN`
    /// overrides it for experiments).
    pub fn for_channels(cout: usize) -> Self {
        if let Some(t) = std::env::var("MASNET_GEMM_TILE")
            .ok()
            .and_then(|v| Self::parse(&v))
        {
            return t;
        }
        if cout <= 16 {
            Self::M64_N16
        } else {
            Self::M64_N32
        }
    }

    /// The candidates the autotuner times for `cout` output channels (best guess first).
    pub fn candidates(cout: usize) -> Vec<Self> {
        if cout <= 16 {
            vec![Self::M64_N16, Self::M32_N32]
        } else if cout <= 32 {
            vec![Self::M64_N32, Self::M32_N32]
        } else {
            vec![Self::M64_N32, Self::M64_N64]
        }
    }

    /// Parses `BMxBNxBKxTMxTN`; `None` if malformed or invalid.
    pub fn parse(s: &str) -> Option<Self> {
        let v: Vec<usize> = s
            .split('x')
            .map(|p| p.trim().parse().ok())
            .collect::<Option<_>>()?;
        let [bm, bn, bk, tm, tn] = v[..] else {
            return None;
        };
        let t = Self { bm, bn, bk, tm, tn };
        t.validate().ok().map(|_| t)
    }

    /// Checks the constraints the shader relies on.
    pub fn validate(&self) -> Result<()> {
        let divides = |a: usize| a > 0 && WG.is_multiple_of(a);
        let ok = divides(self.bm)
            && divides(self.bn)
            && (1..=16).contains(&self.bk)
            && self.tm > 0
            && self.tn > 0
            && self.bm.is_multiple_of(self.tm)
            && self.bn.is_multiple_of(self.tn)
            && (self.bm / self.tm) * (self.bn / self.tn) == WG;
        if ok {
            Ok(())
        } else {
            Err(Error::InvalidArgument(format!(
                "conv3d gemm tile {self:?}: BM and BN must divide 64, BK 1..=16, and \
                 (BM/TM)*(BN/TN) must be 64"
            )))
        }
    }

    /// Workgroup memory the tile needs, in bytes.
    pub fn shared_bytes(&self) -> usize {
        (self.bm + self.bn) * self.bk * 16
    }

    /// Short name, e.g. `64x32x8`.
    pub fn label(&self) -> String {
        format!("{}x{}x{}", self.bm, self.bn, self.bk)
    }
}

/// Generates `shaders/conv3d_gemm.wgsl` with the register tile of `tile` unrolled.
pub fn gemm_source(tile: GemmTile) -> String {
    use std::fmt::Write;
    let (sm, sn) = (tile.bm / tile.tm, tile.bn / tile.tn);
    let (mut acc, mut mac, mut epi) = (String::new(), String::new(), String::new());
    for i in 0..tile.tm {
        let _ = writeln!(mac, "            let x{i} = a_tile[ar + {}u];", i * sm);
        let _ = writeln!(epi, "    let om{i} = m0 + tm + {}u;", i * sm);
    }
    for j in 0..tile.tn {
        let _ = writeln!(mac, "            let y{j} = b_tile[br + {}u];", j * sn);
    }
    for i in 0..tile.tm {
        for j in 0..tile.tn {
            let _ = writeln!(acc, "    var a{i}_{j} = 0.0;");
            let _ = writeln!(mac, "            a{i}_{j} = a{i}_{j} + dot(x{i}, y{j});");
            let _ = writeln!(
                epi,
                "    store(om{i}, c0 + tn + {}u, ovol, a{i}_{j});",
                j * sn
            );
        }
    }
    SRC.replace("    //{{ACC_DECL}}\n", &acc)
        .replace("            //{{MAC_BLOCK}}\n", &mac)
        .replace("    //{{EPILOGUE}}\n", &epi)
}

fn gemm_key(tile: GemmTile, kernel: [usize; 3]) -> Result<PipelineKey> {
    tile.validate()?;
    Ok(PipelineKey::new("conv3d_gemm", "conv3d_gemm")
        .with_const("BM", as_u32(tile.bm, "gemm BM")?)
        .with_const("BN", as_u32(tile.bn, "gemm BN")?)
        .with_const("BK", as_u32(tile.bk, "gemm BK")?)
        .with_const("TM", as_u32(tile.tm, "gemm TM")?)
        .with_const("TN", as_u32(tile.tn, "gemm TN")?)
        .with_const("KD", as_u32(kernel[0], "kernel D")?)
        .with_const("KH", as_u32(kernel[1], "kernel H")?)
        .with_const("KW", as_u32(kernel[2], "kernel W")?))
}

/// The GEMM shader specialised as the launcher would (for the portability test).
pub fn shader_variants() -> Vec<(String, String)> {
    let mut v = Vec::new();
    for (tile, k) in [
        (GemmTile::M64_N32, [3, 3, 3]),
        (GemmTile::M64_N64, [1, 3, 3]),
        (GemmTile::M32_N32, [5, 5, 5]),
        (GemmTile::M64_N16, [3, 3, 1]),
    ] {
        let key = gemm_key(tile, k).expect("valid built-in tile");
        v.push((
            format!("conv3d_gemm {} k{k:?}", tile.label()),
            format!("{}{}", key.prelude(), gemm_source(tile)),
        ));
    }
    v
}

/// Packed operands of one GEMM convolution pass (see `conv3d::PackedConv`).
pub(crate) struct GemmConv<'a> {
    /// `pack_input` output: `[N][c4][padded]` vec4.
    pub input: &'a Tensor,
    /// `pack_weight` output with `tc = tile.bn`.
    pub weight: &'a Tensor,
    pub c4: usize,
    pub kernel: [usize; 3],
    pub stride: [usize; 3],
    pub padded: [usize; 3],
    pub tile: GemmTile,
}

/// Records the GEMM kernel on packed operands into `output`'s channel range.
pub(crate) fn gemm_packed(
    ctx: &GpuContext,
    rec: &mut Recorder,
    g: &GemmConv<'_>,
    bias: Option<&Tensor>,
    output: ChannelSlice<'_>,
    relu: bool,
) -> Result<()> {
    let tile = g.tile;
    let need = tile.shared_bytes();
    let have = ctx.limits.max_compute_workgroup_storage_size as usize;
    if need > have {
        return Err(Error::Limit(format!(
            "conv3d gemm tile {} needs {need} bytes of workgroup memory; '{}' has {have}",
            tile.label(),
            ctx.info.name
        )));
    }
    let oshape = output.tensor.shape();
    let [od, oh, ow] = oshape.spatial();
    let n = oshape.n();
    let cout = output.count;
    let [kd, kh, kw] = g.kernel;
    let m = n * od * oh * ow;
    let k4 = g.c4 * kd * kh * kw;
    let n_tiles = cout.div_ceil(tile.bn);
    let m_tiles = m.div_ceil(tile.bm);
    let grid = grid_for(ctx, m_tiles * n_tiles)?;
    let key = gemm_key(tile, g.kernel)?
        .with_override("HAS_BIAS", f64::from(u8::from(bias.is_some())))
        .with_override("RELU", f64::from(u8::from(relu)));
    let pipe = ctx.pipelines.get(
        &ctx.device,
        &key,
        &gemm_source(tile),
        &[
            Binding::ReadOnly,
            Binding::ReadOnly,
            Binding::ReadOnly,
            Binding::ReadWrite,
            Binding::Uniform,
        ],
    )?;
    let [dp, hp, wp] = g.padded;
    let [sd, sh, sw] = g.stride;
    let params = uniform_u32(
        ctx,
        &u32s(&[
            m,
            k4,
            cout,
            g.c4,
            dp,
            hp,
            wp,
            sd,
            sh,
            sw,
            od,
            oh,
            ow,
            oshape.c(),
            output.offset,
            n_tiles,
            grid.total as usize,
            k4 * tile.bn,
            0,
            0,
        ])?,
    )?;
    // Without a bias the kernel never reads binding 2; bind the weight as a stand-in.
    let (bbuf, bbytes) = match bias {
        Some(b) => (b.buffer(), b.bytes()),
        None => (g.weight.buffer(), g.weight.bytes()),
    };
    dispatch(
        ctx,
        rec,
        &pipe,
        &[
            (g.input.buffer(), g.input.bytes()),
            (g.weight.buffer(), g.weight.bytes()),
            (bbuf, bbytes),
            (output.tensor.buffer(), output.tensor.bytes()),
            (&params, params.size()),
        ],
        grid,
    )
}
