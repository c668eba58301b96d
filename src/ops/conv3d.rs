//! 3-D convolution forward (NCDHW input, `[Cout, Cin, kd, kh, kw]` weights): any kernel
//! extent, per-axis asymmetric zero padding, stride per axis, optional bias and fused
//! ReLU, and channel ranges on input and output (no copies for groups or concat).

use crate::error::{Error, Result};
use crate::gpu::{workgroup_grid, Binding, GpuContext, PipelineKey, Recorder};
use crate::ops::conv3d_gemm::{gemm_packed, GemmConv, GemmTile};
use crate::ops::conv3d_pointwise;
use crate::ops::params::{dispatch, uniform_u32};
use crate::ops::tune::{self, TuneSource};
use crate::tensor::{ChannelSlice, Shape5, Tensor};
use ndarray::Array5;
use std::rc::Rc;

/// Geometry of a convolution besides the kernel extent (which the weight gives).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv3dSpec {
    /// Stride per axis (D, H, W), each >= 1.
    pub stride: [usize; 3],
    /// Zero padding before each axis.
    pub pad_lo: [usize; 3],
    /// Zero padding after each axis.
    pub pad_hi: [usize; 3],
    /// Apply ReLU to the output (fused epilogue).
    pub relu: bool,
}

impl Default for Conv3dSpec {
    fn default() -> Self {
        Self {
            stride: [1; 3],
            pad_lo: [0; 3],
            pad_hi: [0; 3],
            relu: false,
        }
    }
}

impl Conv3dSpec {
    /// Symmetric padding `k / 2` per axis ("same" size at stride 1 for odd kernels).
    pub fn same(kernel: [usize; 3]) -> Self {
        let p = kernel.map(|k| k / 2);
        Self {
            pad_lo: p,
            pad_hi: p,
            ..Self::default()
        }
    }

    /// The same geometry with another stride.
    pub fn with_stride(mut self, stride: [usize; 3]) -> Self {
        self.stride = stride;
        self
    }

    /// The same geometry with ReLU fused or not.
    pub fn with_relu(mut self, relu: bool) -> Self {
        self.relu = relu;
        self
    }

    /// Output extents for `input` extents and `kernel`; errors name the axis.
    pub fn output_spatial(&self, input: [usize; 3], kernel: [usize; 3]) -> Result<[usize; 3]> {
        let mut out = [0; 3];
        for a in 0..3 {
            let axis = ["D", "H", "W"][a];
            if self.stride[a] == 0 {
                return Err(Error::InvalidArgument(format!(
                    "conv3d stride along {axis} is 0"
                )));
            }
            if kernel[a] == 0 {
                return Err(Error::InvalidArgument(format!(
                    "conv3d kernel along {axis} is 0"
                )));
            }
            let padded = input[a] + self.pad_lo[a] + self.pad_hi[a];
            if padded < kernel[a] {
                return Err(Error::Shape(format!(
                    "conv3d kernel {} along {axis} is larger than the padded input {padded} \
                     ({} + padding {} + {})",
                    kernel[a], input[a], self.pad_lo[a], self.pad_hi[a]
                )));
            }
            out[a] = (padded - kernel[a]) / self.stride[a] + 1;
        }
        Ok(out)
    }
}

/// Which conv3d kernel family runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conv3dVariant {
    /// Subgroup kernel when the adapter has fixed-size subgroups of 8 or more, else tiled.
    Auto,
    /// Register-tiled kernel, runs everywhere.
    Tiled,
    /// Register-tiled kernel sharing weights through subgroup shuffles.
    Subgroup,
    /// Workgroup-shared tiled implicit GEMM (`ops::conv3d_gemm`), runs everywhere.
    /// The weight gradient has no GEMM kernel yet and runs its best other kernel.
    Gemm,
}

impl Conv3dVariant {
    /// Parses `auto|tiled|subgroup|gemm` (case-insensitive).
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(Self::Auto),
            "tiled" => Ok(Self::Tiled),
            "subgroup" => Ok(Self::Subgroup),
            "gemm" => Ok(Self::Gemm),
            other => Err(Error::InvalidArgument(format!(
                "unknown conv3d variant '{other}' (expected auto, tiled, subgroup or gemm)"
            ))),
        }
    }
}

/// A concrete conv3d kernel: what a variant (`Auto` through the tuner) resolves to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum ConvKernel {
    /// The register-tiled kernel.
    Tiled,
    /// The register-tiled kernel with subgroup shuffles.
    Subgroup,
    /// The workgroup-shared GEMM kernel with this tile.
    Gemm(GemmTile),
}

impl ConvKernel {
    /// The variant that runs this kernel family.
    pub fn variant(&self) -> Conv3dVariant {
        match self {
            Self::Tiled => Conv3dVariant::Tiled,
            Self::Subgroup => Conv3dVariant::Subgroup,
            Self::Gemm(_) => Conv3dVariant::Gemm,
        }
    }

    /// Short name, e.g. `tiled`, `gemm 64x32x8`.
    pub fn label(&self) -> String {
        match self {
            Self::Tiled => "tiled".into(),
            Self::Subgroup => "subgroup".into(),
            Self::Gemm(t) => format!("gemm {}", t.label()),
        }
    }

    /// The kernel an explicit `variant` names (`None` for `Auto`); errors if the
    /// subgroup kernel is asked for on an adapter without usable subgroups.
    pub fn for_variant(
        ctx: &GpuContext,
        variant: Conv3dVariant,
        cout: usize,
    ) -> Result<Option<Self>> {
        Ok(match variant {
            Conv3dVariant::Auto => None,
            Conv3dVariant::Tiled => Some(Self::Tiled),
            Conv3dVariant::Subgroup => {
                subgroup_size_for(ctx, Conv3dVariant::Subgroup)?;
                Some(Self::Subgroup)
            }
            Conv3dVariant::Gemm => Some(Self::Gemm(GemmTile::for_channels(cout))),
        })
    }

    /// The fixed choice without tuning: subgroup kernel where usable, else tiled.
    pub fn heuristic(ctx: &GpuContext) -> Self {
        if usable_subgroup(ctx).is_some() {
            Self::Subgroup
        } else {
            Self::Tiled
        }
    }

    /// What the tuner times for `cout` output channels on this adapter (the GEMM family
    /// only on GPU adapters).
    pub fn candidates(ctx: &GpuContext, cout: usize) -> Vec<Self> {
        let mut v = Vec::new();
        if usable_subgroup(ctx).is_some() {
            v.push(Self::Subgroup);
        }
        v.push(Self::Tiled);
        // On CPU adapters workgroup memory is ordinary memory and every barrier switches
        // lane coroutines: the GEMM lost every class by 3-50x on lavapipe, and timing it
        // on whole-brain windows took a minute (up to 5 s per run), so it is not tried.
        if ctx.info.device_type == wgpu::DeviceType::Cpu {
            return v;
        }
        let mem = ctx.limits.max_compute_workgroup_storage_size as usize;
        v.extend(
            GemmTile::candidates(cout)
                .into_iter()
                .filter(|t| t.shared_bytes() <= mem)
                .map(Self::Gemm),
        );
        v
    }
}

/// Resolves `Auto` for one call: `MASNET_CONV_VARIANT` if set, else the heuristic when
/// tuning is off, else the tuner (`time` runs one candidate and returns its ms).
pub(crate) fn resolve_auto(
    ctx: &GpuContext,
    op: &str,
    class: &str,
    cout: usize,
    time: impl FnMut(ConvKernel, f64) -> Result<f64>,
) -> Result<(ConvKernel, TuneSource)> {
    if let Ok(v) = std::env::var("MASNET_CONV_VARIANT") {
        let v = Conv3dVariant::parse(&v)
            .map_err(|e| Error::InvalidArgument(format!("MASNET_CONV_VARIANT: {e}")))?;
        if let Some(k) = ConvKernel::for_variant(ctx, v, cout)? {
            return Ok((k, TuneSource::Forced));
        }
    }
    if !tune::enabled() {
        return Ok((ConvKernel::heuristic(ctx), TuneSource::Disabled));
    }
    tune::resolve(ctx, op, class, &ConvKernel::candidates(ctx, cout), time)
}

/// Checks every shape involved and returns the output shape `conv3d_forward` writes.
pub fn conv3d_check(
    input: Shape5,
    in_channels: (usize, usize),
    weight: Shape5,
    bias_len: Option<usize>,
    spec: &Conv3dSpec,
) -> Result<Shape5> {
    let [cout, cin, kd, kh, kw] = weight.0;
    if weight.has_zero() || input.has_zero() {
        return Err(Error::Shape(format!(
            "conv3d: zero-sized dimension (input {input}, weight {weight})"
        )));
    }
    let (off, cnt) = in_channels;
    if off + cnt > input.c() {
        return Err(Error::Shape(format!(
            "conv3d: input channels {off}..{} exceed the input's {} channels",
            off + cnt,
            input.c()
        )));
    }
    if cnt != cin {
        return Err(Error::Shape(format!(
            "conv3d: weight {weight} expects {cin} input channels but {cnt} were given"
        )));
    }
    if let Some(b) = bias_len {
        if b != cout {
            return Err(Error::Shape(format!(
                "conv3d: bias has {b} values but the weight {weight} has {cout} output channels"
            )));
        }
    }
    let o = spec.output_spatial(input.spatial(), [kd, kh, kw])?;
    Ok(Shape5::new(input.n(), cout, o[0], o[1], o[2]))
}

pub(crate) fn as_u32(v: usize, what: &str) -> Result<u32> {
    u32::try_from(v)
        .map_err(|_| Error::Limit(format!("conv3d: {what} = {v} exceeds 32-bit indexing")))
}

const CONV_SRC: &str = include_str!("../../shaders/conv3d.wgsl");
const PACK_INPUT_SRC: &str = include_str!("../../shaders/conv3d_pack_input.wgsl");
const PACK_WEIGHT_SRC: &str = include_str!("../../shaders/conv3d_pack_weight.wgsl");
const WG: usize = 64;

/// Register tile of one invocation: output channels x output voxels along W.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvTile {
    /// Output channels per invocation.
    pub tc: usize,
    /// Output voxels along W per invocation.
    pub tx: usize,
}

impl ConvTile {
    /// The tile for `cout` output channels. Output channels a tile leaves unused are
    /// wasted work, and MixACB's groups have few (DU-Net: 12 and 4, transitions 30 and
    /// 10), so the channel count is split into equal tiles of at most 16; narrow tiles
    /// take more voxels along W. lavapipe, 1x32^3: C16->4 5^3 8x8 30 ms, 4x16 20-27 ms;
    /// C48->12 3^3 8x8 52 ms, 12x8 38 ms; W1 (32 channels) 16x4 best, W3 8x8.
    pub fn for_channels(cout: usize) -> Self {
        let cout = cout.max(1);
        let tiles = cout.div_ceil(16);
        let tc = cout.div_ceil(tiles);
        let tx = match tc {
            13.. => 4,
            5..=12 => 8,
            _ => 16,
        };
        Self { tc, tx }
    }
}

/// Generates the unrolled parts of `shaders/conv3d.wgsl` for one tile, kernel width,
/// stride and variant (`subgroup`: weights shared by shuffles in 8-lane blocks;
/// `phase`: values go to strided output positions through `phase_store`).
pub fn conv3d_source(tile: ConvTile, kw: usize, sw: usize, subgroup: bool, phase: bool) -> String {
    use std::fmt::Write;
    let (tc, tx) = (tile.tc, tile.tx);
    let row = (tx - 1) * sw + kw;
    let nw = tc * kw;
    let mut acc = String::new();
    let mut mac = String::new();
    let mut epi = String::new();
    for c in 0..tc {
        if phase {
            let _ = writeln!(epi, "    let pc{c} = phase_chan(n, oz, oy, co0 + {c}u);");
        }
        for t in 0..tx {
            let _ = writeln!(acc, "    var a{c}_{t} = 0.0;");
            if phase {
                let _ = writeln!(epi, "    phase_store(pc{c}, ox0, {t}u, a{c}_{t});");
            } else {
                let _ = writeln!(
                    epi,
                    "    store(obase, ostride, {c}u, {t}u, co0, ox0, a{c}_{t});"
                );
            }
        }
    }
    for r in 0..row {
        let _ = writeln!(mac, "                let i{r} = inp[rb + {r}u];");
    }
    let (loads, weights) = weight_lines(nw, "NW", subgroup);
    mac.push_str(&loads);
    for (idx, line) in weights.iter().enumerate() {
        let (c, kx) = (idx / kw, idx % kw);
        mac.push_str(line);
        for t in 0..tx {
            let _ = writeln!(
                mac,
                "                a{c}_{t} = a{c}_{t} + dot(w{idx}, i{});",
                t * sw + kx
            );
        }
    }
    let (args, setup) = if subgroup {
        (
            "@builtin(subgroup_invocation_id) sg_lane: u32,",
            "// Lane j of each 8-lane block loads weight vec4s j, j+8, ...; blk is the\n    \
             // block's first lane (a const 0 when subgroups are 8 wide).\n    \
             let j = sg_lane & 7u;\n    let blk = sg_lane & (SG - 8u);",
        )
    } else {
        ("", "")
    };
    CONV_SRC
        .replace("//{{ENTRY_ARGS}}", args)
        .replace("//{{SETUP}}", setup)
        .replace("    //{{ACC_DECL}}\n", &acc)
        .replace("                //{{MAC_BLOCK}}\n", &mac)
        .replace("    //{{EPILOGUE}}\n", &epi)
}

/// Generated WGSL for the `count` weight `vec4`s of one step (`w0`, `w1`, ...) at `wb`:
/// with subgroups, lane j of each 8-lane block loads vec4s j, j+8, ... (bounded by the
/// const `last`) and each weight is a shuffle from its block; without, one load each.
/// Returns the block loads and one line per weight.
pub(crate) fn weight_lines(count: usize, last: &str, subgroup: bool) -> (String, Vec<String>) {
    let mut loads = String::new();
    if subgroup {
        for r in 0..count.div_ceil(8) {
            loads += &format!(
                "        let wl{r} = wts[wb + min({}u + j, {last} - 1u)];\n",
                r * 8
            );
        }
    }
    let lines = (0..count)
        .map(|i| {
            if subgroup {
                format!(
                    "        let w{i} = subgroupShuffle(wl{}, blk + {}u);\n",
                    i / 8,
                    i % 8
                )
            } else {
                format!("        let w{i} = wts[wb + {i}u];\n")
            }
        })
        .collect();
    (loads, lines)
}

/// Every shader of this op family, specialised as the launcher would (name, WGSL),
/// for the portability test that translates each to SPIR-V, MSL and HLSL.
pub fn shader_variants() -> Vec<(String, String)> {
    let mut v = vec![
        ("conv3d_pack_input".to_string(), PACK_INPUT_SRC.to_string()),
        (
            "conv3d_pack_weight".to_string(),
            PACK_WEIGHT_SRC.to_string(),
        ),
    ];
    for (subgroup, name) in [(false, "conv3d tiled"), (true, "conv3d subgroup")] {
        for (k, s, tile) in [
            (3, 1, ConvTile::for_channels(32)),
            (5, 2, ConvTile::for_channels(8)),
            (1, 1, ConvTile { tc: 3, tx: 5 }),
        ] {
            let key = PipelineKey::new("conv3d", "conv3d_forward")
                .with_const("TC", tile.tc as u32)
                .with_const("TX", tile.tx as u32)
                .with_const("KD", k)
                .with_const("KH", k)
                .with_const("KW", k)
                .with_const("SD", s)
                .with_const("SH", s)
                .with_const("SW", s)
                .with_const("NW", (tile.tc * k as usize) as u32)
                .with_const("SG", 32);
            for phase in [false, true] {
                let src = conv3d_source(tile, k as usize, s as usize, subgroup, phase);
                v.push((
                    format!("{name} k{k} s{s}{}", if phase { " phase" } else { "" }),
                    format!("{}{src}", key.prelude()),
                ));
            }
        }
    }
    v
}

pub(crate) fn tile_for(cout: usize) -> ConvTile {
    tile_override().unwrap_or_else(|| ConvTile::for_channels(cout))
}

/// The tile of a transposed conv's phase convolutions: as [`tile_for`], but at least 8
/// voxels along W when some phase has more than one tap (kernel > stride): their rows
/// are short (taps of 1-2 along W), so a longer tile pays. lavapipe, k=3 s=2: DU-Net's
/// trans6 (N1 C229->114 16^3) 139 ms with 15x8 against 164 with 15x4, N2 C64->32 25 ms
/// with 16x8 against 27-28; one tap (k=2 s=2) 13.3 ms with 16x8 against 10.3-11.0, and
/// W1 (3 taps along W, 48 weights per step) 84-88 ms against 63.5.
pub(crate) fn phase_tile_for(cout: usize, multi_tap: bool) -> ConvTile {
    tile_override().unwrap_or_else(|| {
        let mut t = ConvTile::for_channels(cout);
        if multi_tap {
            t.tx = t.tx.max(8);
        }
        t
    })
}

/// MASNET_CONV_TILE=TCxTX lets benchmarks try other tiles without rebuilding (read once
/// per process: every conv asks).
fn tile_override() -> Option<ConvTile> {
    static TILE: std::sync::OnceLock<Option<ConvTile>> = std::sync::OnceLock::new();
    *TILE.get_or_init(|| {
        std::env::var("MASNET_CONV_TILE").ok().and_then(|v| {
            let (a, b) = v.split_once('x')?;
            let (tc, tx) = (a.parse().ok()?, b.parse().ok()?);
            ((1..=16).contains(&tc) && (1..=16).contains(&tx)).then_some(ConvTile { tc, tx })
        })
    })
}

/// The subgroup size the kernel may rely on for `variant`, or `None` for the tiled kernel.
/// (`Gemm` here means the weight gradient's best non-GEMM kernel, as `Auto`.)
pub(crate) fn subgroup_size_for(ctx: &GpuContext, variant: Conv3dVariant) -> Result<Option<u32>> {
    let usable = usable_subgroup(ctx);
    match variant {
        Conv3dVariant::Tiled => Ok(None),
        Conv3dVariant::Auto | Conv3dVariant::Gemm => Ok(usable),
        Conv3dVariant::Subgroup => usable.map(Some).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "conv3d subgroup kernel needs fixed subgroups of 8 or more; '{}' has none",
                ctx.info.name
            ))
        }),
    }
}

fn usable_subgroup(ctx: &GpuContext) -> Option<u32> {
    ctx.subgroup_size.filter(|&s| s >= 8)
}

pub(crate) fn grid_for(ctx: &GpuContext, workgroups: usize) -> Result<crate::gpu::WorkgroupGrid> {
    workgroup_grid(
        workgroups as u64,
        ctx.limits.max_compute_workgroups_per_dimension,
    )
}

pub(crate) fn u32s(vals: &[usize]) -> Result<Vec<u32>> {
    vals.iter().map(|&v| as_u32(v, "a size")).collect()
}

/// Checks a forward call's operands and returns the output shape the call writes.
fn forward_check(
    input: &ChannelSlice<'_>,
    weight: &Tensor,
    bias: Option<&Tensor>,
    output: &ChannelSlice<'_>,
    spec: &Conv3dSpec,
) -> Result<Shape5> {
    let ishape = input.tensor.shape();
    let bias_len = bias.map(|b| b.shape().numel()).transpose()?;
    let expect = conv3d_check(
        ishape,
        (input.offset, input.count),
        weight.shape(),
        bias_len,
        spec,
    )?;
    let oshape = output.tensor.shape();
    if output.count != expect.c()
        || oshape.n() != expect.n()
        || oshape.spatial() != expect.spatial()
    {
        return Err(Error::Shape(format!(
            "conv3d: output '{}' {oshape} channels {}..{} do not fit the result {expect}",
            output.tensor.name,
            output.offset,
            output.offset + output.count
        )));
    }
    if std::ptr::eq(input.tensor, output.tensor) {
        return Err(Error::InvalidArgument(format!(
            "conv3d: input and output are the same tensor '{}'",
            input.tensor.name
        )));
    }
    Ok(expect)
}

/// Records `output[:, range] = conv3d(input[:, range], weight) + bias` (ReLU if asked).
///
/// `weight` is `[Cout, Cin, kd, kh, kw]`; `bias` holds `Cout` values (any shape).
/// The input range and weight are first packed (4 channels per vec4, zero borders);
/// see `shaders/conv3d.wgsl` and `shaders/conv3d_gemm.wgsl`. `Auto` resolves through
/// [`conv3d_forward_choice`] (may time the candidates once per shape class, submitting
/// its own work; the caller's recording is left untouched).
#[allow(clippy::too_many_arguments)]
pub fn conv3d_forward(
    ctx: &GpuContext,
    rec: &mut Recorder,
    input: ChannelSlice<'_>,
    weight: &Tensor,
    bias: Option<&Tensor>,
    output: ChannelSlice<'_>,
    spec: &Conv3dSpec,
    variant: Conv3dVariant,
) -> Result<()> {
    let expect = forward_check(&input, weight, bias, &output, spec)?;
    let kernel = match ConvKernel::for_variant(ctx, variant, expect.c())? {
        Some(k) => k,
        None => {
            let s = input.tensor.shape();
            let ishape = Shape5::new(
                s.n(),
                input.count,
                s.spatial()[0],
                s.spatial()[1],
                s.spatial()[2],
            );
            conv3d_forward_choice(ctx, ishape, weight.shape(), bias.is_some(), spec)?.0
        }
    };
    conv3d_forward_kernel(ctx, rec, input, weight, bias, output, spec, kernel)
}

/// What `Auto` runs for a forward on `input` (all its channels are used) x `weight`:
/// the cached or freshly timed kernel, the heuristic when tuning is off, or the family
/// `MASNET_CONV_VARIANT` names. Timing submits and waits on its own temporaries.
pub fn conv3d_forward_choice(
    ctx: &GpuContext,
    input: Shape5,
    weight: Shape5,
    bias: bool,
    spec: &Conv3dSpec,
) -> Result<(ConvKernel, TuneSource)> {
    let cout = weight.0[0];
    let oshape = conv3d_check(input, (0, input.c()), weight, bias.then_some(cout), spec)?;
    let [_, cin, kd, kh, kw] = weight.0;
    let class = tune::shape_class(
        [kd, kh, kw],
        spec.stride,
        cin,
        cout,
        oshape.n() * oshape.voxels(),
    );
    let shapes = [input, weight, Shape5::new(1, cout, 1, 1, 1), oshape];
    resolve_auto(ctx, "conv3d.fwd", &class, cout, |kernel, give_up| {
        time_on_temporaries(ctx, shapes, give_up, |r, [x, w, b, out]| {
            conv3d_forward_kernel(
                ctx,
                r,
                x.all(),
                w,
                bias.then_some(b),
                out.all(),
                spec,
                kernel,
            )
        })
    })
}

/// Median milliseconds of `record` (then submit and wait) on zero-filled temporaries of
/// `shapes` (operand, weight, bias, result), allocated so they never alias buffers an
/// open recording of the caller may still read (see `BufferPool::settled_only`).
pub(crate) fn time_on_temporaries(
    ctx: &GpuContext,
    shapes: [Shape5; 4],
    give_up_ms: f64,
    record: impl Fn(&mut Recorder, [&Tensor; 4]) -> Result<()>,
) -> Result<f64> {
    let _settled = ctx.pool.settled_only();
    let names = ["tune operand", "tune weight", "tune bias", "tune result"];
    let t: Vec<Tensor> = shapes
        .iter()
        .zip(names)
        .map(|(&s, n)| Tensor::empty(ctx, s, n))
        .collect::<Result<_>>()?;
    let ts = [&t[0], &t[1], &t[2], &t[3]];
    zero_fill(ctx, &ts);
    tune::median_ms(3, give_up_ms, || {
        let mut r = ctx.recorder();
        record(&mut r, ts)?;
        ctx.submit(r);
        ctx.wait()
    })
}

/// Submits zero fills of `tensors` (tuning temporaries: contents must not be NaN or
/// denormal garbage that could skew timings).
pub(crate) fn zero_fill(ctx: &GpuContext, tensors: &[&Tensor]) {
    let mut r = ctx.recorder();
    for t in tensors {
        r.encoder.clear_buffer(t.buffer(), 0, Some(t.bytes()));
    }
    ctx.submit(r);
}

/// [`conv3d_forward`] with a concrete kernel (no tuning).
#[allow(clippy::too_many_arguments)]
pub fn conv3d_forward_kernel(
    ctx: &GpuContext,
    rec: &mut Recorder,
    input: ChannelSlice<'_>,
    weight: &Tensor,
    bias: Option<&Tensor>,
    output: ChannelSlice<'_>,
    spec: &Conv3dSpec,
    kernel: ConvKernel,
) -> Result<()> {
    let expect = forward_check(&input, weight, bias, &output, spec)?;
    let [cout, cin, kd, kh, kw] = weight.shape().0;
    let [od, oh, ow] = expect.spatial();
    let [sd, sh, sw] = spec.stride;
    let c4 = cin.div_ceil(4);
    let pad = spec.pad_lo.map(|p| p as isize);
    // Packed extents: exactly what the output positions read (for the tiled kernels,
    // the last W tile included).
    let ext = |tx: usize| {
        [
            (od - 1) * sd + kd,
            (oh - 1) * sh + kh,
            (ow.div_ceil(tx) * tx - 1) * sw + kw,
        ]
    };
    if let ConvKernel::Gemm(tile) = kernel {
        let padded = ext(1);
        let packed_in = pack_input(ctx, rec, input, [1, 1, 1], pad, padded)?;
        let packed_w = packed_weight(ctx, rec, weight, tile.bn)?;
        return gemm_packed(
            ctx,
            rec,
            &GemmConv {
                input: &packed_in,
                weight: &packed_w,
                c4,
                kernel: [kd, kh, kw],
                stride: spec.stride,
                padded,
                tile,
            },
            bias,
            output,
            spec.relu,
        );
    }
    let sub = match kernel {
        ConvKernel::Subgroup => subgroup_size_for(ctx, Conv3dVariant::Subgroup)?,
        _ => None,
    };
    if conv3d_pointwise::applies([kd, kh, kw], spec, od * oh * ow) {
        let tile = conv3d_pointwise::tile_for(cout);
        let packed_w = packed_weight(ctx, rec, weight, tile.0)?;
        return conv3d_pointwise::conv_pointwise(
            ctx, rec, input, &packed_w, tile, sub, bias, output, spec.relu,
        );
    }
    let tile = tile_for(cout);
    let padded = ext(tile.tx);
    let packed_in = pack_input(ctx, rec, input, [1, 1, 1], pad, padded)?;
    let packed_w = packed_weight(ctx, rec, weight, tile.tc)?;
    conv_packed(
        ctx,
        rec,
        &PackedConv {
            input: &packed_in,
            weight: &packed_w,
            c4,
            kernel: [kd, kh, kw],
            stride: spec.stride,
            padded,
            tile,
            subgroup: sub,
            in_off: [0; 3],
            phase: None,
            w_off: 0,
            in_c4: (c4, 0),
        },
        bias,
        output,
        spec.relu,
    )
}

/// Packs `src` into `[N][ceil(C/4)][ext]` vec4 with zero borders: packed position
/// `pad + u * dil` holds source voxel `u` (dilation > 1 for strided input gradients).
pub(crate) fn pack_input(
    ctx: &GpuContext,
    rec: &mut Recorder,
    src: ChannelSlice<'_>,
    dil: [usize; 3],
    pad: [isize; 3],
    ext: [usize; 3],
) -> Result<Tensor> {
    let s = src.tensor.shape();
    let [id, ih, iw] = s.spatial();
    let n = s.n();
    let c4 = src.count.div_ceil(4);
    let [dp, hp, wp] = ext;
    let packed = Tensor::empty(
        ctx,
        Shape5::new(n, c4 * 4, dp, hp, wp),
        "conv3d packed input",
    )?;
    // Must match XV in the shader: positions per invocation.
    let x_chunks = wp.div_ceil(4);
    let total = n * c4 * dp * hp * x_chunks;
    let dilated = dil.iter().any(|&d| d != 1);
    let key = PipelineKey::new("conv3d_pack_input", "pack_input")
        .with_override("DILATED", f64::from(u8::from(dilated)));
    let pipe = ctx.pipelines.get(
        &ctx.device,
        &key,
        PACK_INPUT_SRC,
        &[Binding::ReadOnly, Binding::ReadWrite, Binding::Uniform],
    )?;
    let pads: Vec<u32> = pad
        .iter()
        .map(|&p| i32::try_from(p).map(|v| v as u32))
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| Error::Limit("conv3d: padding exceeds 32-bit range".into()))?;
    let mut vals = u32s(&[
        n,
        src.count,
        s.c(),
        src.offset,
        id,
        ih,
        iw,
        c4,
        dp,
        hp,
        wp,
        total,
    ])?;
    vals.extend_from_slice(&pads);
    vals.push(as_u32(x_chunks, "conv3d pack chunks")?);
    vals.extend(u32s(&[dil[0], dil[1], dil[2], 0])?);
    let params = uniform_u32(ctx, &vals)?;
    dispatch(
        ctx,
        rec,
        &pipe,
        &[
            (src.tensor.buffer(), src.tensor.bytes()),
            (packed.buffer(), packed.bytes()),
            (&params, params.size()),
        ],
        grid_for(ctx, total.div_ceil(WG))?,
    )?;
    Ok(packed)
}

/// The forward's packed weight for `tc`-channel tiles: recorded now, or the cached one
/// of a frozen (inference-form) weight.
pub(crate) fn packed_weight(
    ctx: &GpuContext,
    rec: &mut Recorder,
    weight: &Tensor,
    tc: usize,
) -> Result<Rc<Tensor>> {
    weight.derived(
        || format!("conv3d packed tc{tc}"),
        || pack_weight(ctx, rec, weight, false, tc),
    )
}

/// Packs a `[Cout, Cin, kd, kh, kw]` weight into per-step blocks of `tc` output channels;
/// with `flip`, the weight of the input gradient (channels swapped, kernel mirrored).
pub(crate) fn pack_weight(
    ctx: &GpuContext,
    rec: &mut Recorder,
    weight: &Tensor,
    flip: bool,
    tc: usize,
) -> Result<Tensor> {
    let [wco, wci, kd, kh, kw] = weight.shape().0;
    let (cout, cin) = if flip { (wci, wco) } else { (wco, wci) };
    let c4 = cin.div_ceil(4);
    let total = cout.div_ceil(tc) * c4 * kd * kh * tc * kw;
    let packed = Tensor::empty(ctx, Shape5::new(1, 1, 1, total, 4), "conv3d packed weight")?;
    let key = PipelineKey::new("conv3d_pack_weight", "pack_weight");
    let pipe = ctx.pipelines.get(
        &ctx.device,
        &key,
        PACK_WEIGHT_SRC,
        &[Binding::ReadOnly, Binding::ReadWrite, Binding::Uniform],
    )?;
    let params = uniform_u32(
        ctx,
        &u32s(&[
            cout,
            cin,
            c4,
            tc,
            kd,
            kh,
            kw,
            total,
            usize::from(flip),
            0,
            0,
            0,
        ])?,
    )?;
    dispatch(
        ctx,
        rec,
        &pipe,
        &[
            (weight.buffer(), weight.bytes()),
            (packed.buffer(), packed.bytes()),
            (&params, params.size()),
        ],
        grid_for(ctx, total.div_ceil(WG))?,
    )?;
    Ok(packed)
}

/// Packed operands of one convolution pass.
pub(crate) struct PackedConv<'a> {
    pub input: &'a Tensor,
    pub weight: &'a Tensor,
    pub c4: usize,
    pub kernel: [usize; 3],
    pub stride: [usize; 3],
    pub padded: [usize; 3],
    pub tile: ConvTile,
    pub subgroup: Option<u32>,
    /// Where reading starts in the packed input (beyond its own padding).
    pub in_off: [usize; 3],
    /// Strided output positions (a transposed conv's phases) instead of a dense output.
    pub phase: Option<PhaseStore>,
    /// First vec4 of this convolution's weight in `weight`.
    pub w_off: usize,
    /// 4-channel groups of `input` per batch item and the first this conv reads (`c4`
    /// and 0 unless it reads a channel range of a shared packing).
    pub in_c4: (usize, usize),
}

/// How a phase convolution's values map to the transposed conv's output: channel `c`
/// is class block `c / cb`, output channel `c % cb`; phase position `u` of class `l`
/// (per axis, over `classes`) goes to `u * stride + l + off`, dropped outside the output.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PhaseStore {
    /// Phase extents the convolution computes.
    pub extent: [usize; 3],
    /// Output channels per class block.
    pub cb: usize,
    /// Classes per axis.
    pub classes: [usize; 3],
    /// Output stride per axis.
    pub stride: [usize; 3],
    /// First class minus cropping, per axis.
    pub off: [isize; 3],
}

/// Runs the register-tiled kernel on packed operands into `output`'s channel range.
pub(crate) fn conv_packed(
    ctx: &GpuContext,
    rec: &mut Recorder,
    pc: &PackedConv<'_>,
    bias: Option<&Tensor>,
    output: ChannelSlice<'_>,
    relu: bool,
) -> Result<()> {
    let oshape = output.tensor.shape();
    let [od, oh, ow] = pc.phase.map_or(oshape.spatial(), |ph| ph.extent);
    let n = oshape.n();
    let cout = output.count;
    let [kd, kh, kw] = pc.kernel;
    let [sd, sh, sw] = pc.stride;
    let [dp, hp, wp] = pc.padded;
    let tile = pc.tile;
    let nw = tile.tc * kw;
    let x_tiles = ow.div_ceil(tile.tx);
    let co_tiles = cout.div_ceil(tile.tc);
    let spatial_tiles = od * oh * x_tiles;
    let sblocks = spatial_tiles.div_ceil(WG);
    let grid = grid_for(ctx, sblocks * co_tiles * n)?;
    let name = if pc.subgroup.is_some() {
        "conv3d_subgroup"
    } else {
        "conv3d_tiled"
    };
    let mut key = PipelineKey::new(name, "conv3d_forward")
        .with_const("TC", tile.tc as u32)
        .with_const("TX", tile.tx as u32)
        .with_const("KD", as_u32(kd, "kernel D")?)
        .with_const("KH", as_u32(kh, "kernel H")?)
        .with_const("KW", as_u32(kw, "kernel W")?)
        .with_const("SD", as_u32(sd, "stride D")?)
        .with_const("SH", as_u32(sh, "stride H")?)
        .with_const("SW", as_u32(sw, "stride W")?)
        .with_const("NW", as_u32(nw, "weight row")?)
        .with_override("HAS_BIAS", f64::from(u8::from(bias.is_some())))
        .with_override("RELU", f64::from(u8::from(relu)));
    if let Some(s) = pc.subgroup {
        key = key.with_const("SG", s);
    }
    if pc.phase.is_some() {
        key = key.with_const("PHASE", 1);
    }
    let src = conv3d_source(tile, kw, sw, pc.subgroup.is_some(), pc.phase.is_some());
    let pipe = ctx.pipelines.get(
        &ctx.device,
        &key,
        &src,
        &[
            Binding::ReadOnly,
            Binding::ReadOnly,
            Binding::ReadOnly,
            Binding::ReadWrite,
            Binding::Uniform,
        ],
    )?;
    let [out_d, out_h, out_w] = oshape.spatial();
    let ph = pc.phase.unwrap_or(PhaseStore {
        extent: [od, oh, ow],
        cb: cout.max(1),
        classes: [1; 3],
        stride: [1; 3],
        off: [0; 3],
    });
    let mut vals = u32s(&[
        n,
        pc.c4,
        cout,
        oshape.c(),
        output.offset,
        dp,
        hp,
        wp,
        od,
        oh,
        ow,
        x_tiles,
        spatial_tiles,
        co_tiles,
        grid.total as usize,
        sblocks,
        pc.in_off[0],
        pc.in_off[1],
        pc.in_off[2],
        ph.cb,
        out_d,
        out_h,
        out_w,
        ph.classes[1],
        ph.classes[2],
        ph.stride[0],
        ph.stride[1],
        ph.stride[2],
    ])?;
    for o in ph.off {
        let v = i32::try_from(o)
            .map_err(|_| Error::Limit(format!("conv3d: phase offset {o} exceeds 32 bits")))?;
        vals.push(v as u32);
    }
    vals.push(as_u32(pc.w_off, "weight offset")?);
    vals.extend(u32s(&[pc.in_c4.0, pc.in_c4.1])?);
    let params = uniform_u32(ctx, &vals)?;
    // Without a bias the kernel never reads binding 2; bind the weight as a stand-in.
    let (bbuf, bbytes) = match bias {
        Some(b) => (b.buffer(), b.bytes()),
        None => (pc.weight.buffer(), pc.weight.bytes()),
    };
    dispatch(
        ctx,
        rec,
        &pipe,
        &[
            (pc.input.buffer(), pc.input.bytes()),
            (pc.weight.buffer(), pc.weight.bytes()),
            (bbuf, bbytes),
            (output.tensor.buffer(), output.tensor.bytes()),
            (&params, params.size()),
        ],
        grid,
    )?;
    Ok(())
}

/// Allocates the output, runs the convolution and submits it (does not wait).
pub fn conv3d(
    ctx: &GpuContext,
    input: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    spec: &Conv3dSpec,
) -> Result<Tensor> {
    let bias_len = bias.map(|b| b.shape().numel()).transpose()?;
    let oshape = conv3d_check(
        input.shape(),
        (0, input.shape().c()),
        weight.shape(),
        bias_len,
        spec,
    )?;
    let out = Tensor::empty(ctx, oshape, "conv3d output")?;
    let mut rec = ctx.recorder();
    conv3d_forward(
        ctx,
        &mut rec,
        input.all(),
        weight,
        bias,
        out.all(),
        spec,
        Conv3dVariant::Auto,
    )?;
    ctx.submit(rec);
    Ok(out)
}

/// CPU reference: plain loops, f64 accumulation. Reads input channels
/// `in_off .. in_off + Cin` and returns only the `Cout` computed channels.
pub fn conv3d_forward_cpu(
    input: &Array5<f32>,
    in_off: usize,
    weight: &Array5<f32>,
    bias: Option<&[f32]>,
    spec: &Conv3dSpec,
) -> Result<Array5<f32>> {
    let bias: Option<Vec<f64>> = bias.map(|b| b.iter().map(|&v| v as f64).collect());
    let out = conv3d_forward_f64(
        &input.mapv(f64::from),
        in_off,
        &weight.mapv(f64::from),
        bias.as_deref(),
        spec,
    )?;
    Ok(out.mapv(|v| v as f32))
}

/// The CPU reference in f64 (used for finite-difference checks).
pub fn conv3d_forward_f64(
    input: &Array5<f64>,
    in_off: usize,
    weight: &Array5<f64>,
    bias: Option<&[f64]>,
    spec: &Conv3dSpec,
) -> Result<Array5<f64>> {
    let s = input.shape();
    let ishape = Shape5::new(s[0], s[1], s[2], s[3], s[4]);
    let w = weight.shape();
    let wshape = Shape5::new(w[0], w[1], w[2], w[3], w[4]);
    let oshape = conv3d_check(ishape, (in_off, w[1]), wshape, bias.map(|b| b.len()), spec)?;
    let [n, cout, od, oh, ow] = oshape.0;
    let cin = w[1];
    let mut out = Array5::<f64>::zeros(oshape.0);
    for b in 0..n {
        for co in 0..cout {
            for z in 0..od {
                for y in 0..oh {
                    for x in 0..ow {
                        let mut acc = bias.map_or(0.0, |bb| bb[co]);
                        for_each_tap(
                            spec,
                            [z, y, x],
                            [w[2], w[3], w[4]],
                            ishape.spatial(),
                            |k, i| {
                                for ci in 0..cin {
                                    acc += input[[b, in_off + ci, i[0], i[1], i[2]]]
                                        * weight[[co, ci, k[0], k[1], k[2]]];
                                }
                            },
                        );
                        out[[b, co, z, y, x]] = if spec.relu && acc < 0.0 { 0.0 } else { acc };
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Calls `f(tap, input voxel)` for every kernel tap of output voxel `o` that lands
/// inside the (unpadded) input.
pub(crate) fn for_each_tap(
    spec: &Conv3dSpec,
    o: [usize; 3],
    kernel: [usize; 3],
    input: [usize; 3],
    mut f: impl FnMut([usize; 3], [usize; 3]),
) {
    let pos = |a: usize, k: usize| -> Option<usize> {
        let i = (o[a] * spec.stride[a] + k) as isize - spec.pad_lo[a] as isize;
        (i >= 0 && (i as usize) < input[a]).then_some(i as usize)
    };
    for kz in 0..kernel[0] {
        let Some(iz) = pos(0, kz) else { continue };
        for ky in 0..kernel[1] {
            let Some(iy) = pos(1, ky) else { continue };
            for kx in 0..kernel[2] {
                let Some(ix) = pos(2, kx) else { continue };
                f([kz, ky, kx], [iz, iy, ix]);
            }
        }
    }
}

/// Floating-point operations of one forward (2 per multiply-add, padding included).
pub fn conv3d_flops(output: Shape5, weight: Shape5) -> f64 {
    let [_, cin, kd, kh, kw] = weight.0;
    2.0 * output.numel().unwrap_or(0) as f64 * (cin * kd * kh * kw) as f64
}
