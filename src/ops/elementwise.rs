//! Elementwise ops: ReLU / ReLU6 forward and backward, add, scale, axpy, fill,
//! channel-range copy/add (DenseNet concatenation and its backward: concat of k tensors
//! is k [`copy_channels`], its backward k slices the other way) and seeded dropout whose
//! mask is recomputed from `(seed, index)` instead of stored.
//!
//! Every launcher records into a [`Recorder`]; outputs are allocated by the caller.
//! Where the output is the same tensor as an input (`std::ptr::eq`) and the op is safe
//! elementwise, an in-place kernel with a single `read_write` binding is used, because
//! wgpu forbids binding one buffer both read-only and read-write in one dispatch.
//! The `*_f64` functions are plain-loop CPU references.

use crate::error::{Error, Result};
use crate::gpu::{GpuContext, PipelineKey, Recorder};
use crate::ops::conv3d::u32s;
use crate::ops::params::{launch, Arg};
use crate::tensor::{ChannelSlice, Tensor};
use ndarray::{s, Array5};

const SRC: &str = include_str!("../../shaders/elementwise.wgsl");

/// Every shader of this family (for the portability test).
pub fn shader_variants() -> Vec<(String, String)> {
    vec![("elementwise".to_string(), SRC.to_string())]
}

/// The shader's `Params` block (12 u32 words, see `shaders/elementwise.wgsl`).
#[derive(Default, Clone, Copy)]
struct Params {
    total: usize,
    alpha: f32,
    seed: u32,
    threshold: u32,
    vox: usize,
    count: usize,
    src_c: usize,
    src_off: usize,
    dst_c: usize,
    dst_off: usize,
}

impl Params {
    fn elements(total: usize) -> Self {
        Self {
            total,
            ..Self::default()
        }
    }

    fn words(&self) -> Result<Vec<u32>> {
        let sizes = u32s(&[
            self.total,
            self.vox,
            self.count,
            self.src_c,
            self.src_off,
            self.dst_c,
            self.dst_off,
        ])?;
        Ok(vec![
            sizes[0],
            self.alpha.to_bits(),
            self.seed,
            self.threshold,
            sizes[1],
            sizes[2],
            sizes[3],
            sizes[4],
            sizes[5],
            sizes[6],
            0,
            0,
        ])
    }
}

fn run(
    ctx: &GpuContext,
    rec: &mut Recorder,
    entry: &'static str,
    args: &[Arg<'_>],
    p: &Params,
) -> Result<()> {
    launch(
        ctx,
        rec,
        PipelineKey::new("elementwise", entry),
        SRC,
        args,
        &p.words()?,
        p.total,
    )
}

/// Checks that every tensor has the shape of the first; returns the element count.
fn same_shapes(op: &str, ts: &[&Tensor]) -> Result<usize> {
    let first = ts[0];
    for t in &ts[1..] {
        if t.shape() != first.shape() {
            return Err(Error::Shape(format!(
                "{op}: '{}' {} and '{}' {} do not match",
                first.name,
                first.shape(),
                t.name,
                t.shape()
            )));
        }
    }
    first.shape().numel()
}

fn finite(op: &str, what: &str, v: f32) -> Result<()> {
    if v.is_finite() {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "{op}: {what} must be finite, got {v}"
        )))
    }
}

// ---- ReLU / ReLU6 ---------------------------------------------------------------------

fn unary(
    ctx: &GpuContext,
    rec: &mut Recorder,
    op: &str,
    entries: (&'static str, &'static str),
    x: &Tensor,
    y: &Tensor,
    mut p: Params,
) -> Result<()> {
    p.total = same_shapes(op, &[x, y])?;
    if std::ptr::eq(x, y) {
        run(ctx, rec, entries.1, &[Arg::Write(y)], &p)
    } else {
        run(ctx, rec, entries.0, &[Arg::Read(x), Arg::Write(y)], &p)
    }
}

/// Records `y = max(x, 0)`; `y` may be `x` (in place).
pub fn relu_forward(ctx: &GpuContext, rec: &mut Recorder, x: &Tensor, y: &Tensor) -> Result<()> {
    let e = ("relu_forward", "relu_forward_inplace");
    unary(ctx, rec, "relu_forward", e, x, y, Params::default())
}

/// Records `y = min(max(x, 0), 6)`; `y` may be `x` (in place).
pub fn relu6_forward(ctx: &GpuContext, rec: &mut Recorder, x: &Tensor, y: &Tensor) -> Result<()> {
    let e = ("relu6_forward", "relu6_forward_inplace");
    unary(ctx, rec, "relu6_forward", e, x, y, Params::default())
}

fn gated_backward(
    ctx: &GpuContext,
    rec: &mut Recorder,
    op: &str,
    entries: (&'static str, &'static str),
    saved: &Tensor,
    dy: &Tensor,
    dx: &Tensor,
) -> Result<()> {
    let p = Params::elements(same_shapes(op, &[saved, dy, dx])?);
    if std::ptr::eq(saved, dx) {
        return Err(Error::InvalidArgument(format!(
            "{op}: the gradient '{}' must not be the saved tensor '{}'",
            dx.name, saved.name
        )));
    }
    if std::ptr::eq(dy, dx) {
        run(ctx, rec, entries.1, &[Arg::Read(saved), Arg::Write(dx)], &p)
    } else {
        let args = [Arg::Read(saved), Arg::Read(dy), Arg::Write(dx)];
        run(ctx, rec, entries.0, &args, &p)
    }
}

/// Records `dx = dy` where `y_or_x > 0`, else 0. Pass the saved forward output `y` or
/// input `x` (equivalent for ReLU). `dx` may be `dy` (in place) but not `y_or_x`.
pub fn relu_backward(
    ctx: &GpuContext,
    rec: &mut Recorder,
    y_or_x: &Tensor,
    dy: &Tensor,
    dx: &Tensor,
) -> Result<()> {
    let e = ("relu_backward", "relu_backward_inplace");
    gated_backward(ctx, rec, "relu_backward", e, y_or_x, dy, dx)
}

/// Records `dx = dy` where `0 < x < 6` (saved forward input `x`), else 0. `dx` may be
/// `dy` (in place) but not `x`.
pub fn relu6_backward(
    ctx: &GpuContext,
    rec: &mut Recorder,
    x: &Tensor,
    dy: &Tensor,
    dx: &Tensor,
) -> Result<()> {
    let e = ("relu6_backward", "relu6_backward_inplace");
    gated_backward(ctx, rec, "relu6_backward", e, x, dy, dx)
}

// ---- add, scale, axpy, fill -----------------------------------------------------------

/// Records `out = a + b`; any of the three may be the same tensor.
pub fn add(
    ctx: &GpuContext,
    rec: &mut Recorder,
    a: &Tensor,
    b: &Tensor,
    out: &Tensor,
) -> Result<()> {
    same_shapes("add", &[a, b, out])?;
    match (std::ptr::eq(a, out), std::ptr::eq(b, out)) {
        (true, true) => scale(ctx, rec, out, 2.0, out),
        (true, false) => add_assign(ctx, rec, out, b),
        (false, true) => add_assign(ctx, rec, out, a),
        (false, false) => {
            let p = Params::elements(a.shape().numel()?);
            let args = [Arg::Read(a), Arg::Read(b), Arg::Write(out)];
            run(ctx, rec, "add", &args, &p)
        }
    }
}

/// Records `dst += src` (gradient accumulation); `src` may be `dst` (doubles it).
pub fn add_assign(ctx: &GpuContext, rec: &mut Recorder, dst: &Tensor, src: &Tensor) -> Result<()> {
    axpy_named(ctx, rec, "add_assign", 1.0, src, dst)
}

/// Records `y = alpha * x`; `y` may be `x` (in place). `alpha` must be finite.
pub fn scale(
    ctx: &GpuContext,
    rec: &mut Recorder,
    x: &Tensor,
    alpha: f32,
    y: &Tensor,
) -> Result<()> {
    finite("scale", "alpha", alpha)?;
    let p = Params {
        alpha,
        ..Params::default()
    };
    unary(ctx, rec, "scale", ("scale", "scale_inplace"), x, y, p)
}

/// Records `y += alpha * x`; `x` may be `y` (then `y *= 1 + alpha`). `alpha` must be
/// finite.
pub fn axpy(
    ctx: &GpuContext,
    rec: &mut Recorder,
    alpha: f32,
    x: &Tensor,
    y: &Tensor,
) -> Result<()> {
    axpy_named(ctx, rec, "axpy", alpha, x, y)
}

fn axpy_named(
    ctx: &GpuContext,
    rec: &mut Recorder,
    op: &str,
    alpha: f32,
    x: &Tensor,
    y: &Tensor,
) -> Result<()> {
    finite(op, "alpha", alpha)?;
    let total = same_shapes(op, &[x, y])?;
    if std::ptr::eq(x, y) {
        return scale(ctx, rec, y, 1.0 + alpha, y);
    }
    let p = Params {
        total,
        alpha,
        ..Params::default()
    };
    run(ctx, rec, "axpy", &[Arg::Read(x), Arg::Write(y)], &p)
}

/// Records `t = value` everywhere (the bits of `value` are stored, so ±inf work).
pub fn fill(ctx: &GpuContext, rec: &mut Recorder, t: &Tensor, value: f32) -> Result<()> {
    let p = Params {
        total: t.shape().numel()?,
        alpha: value,
        ..Params::default()
    };
    run(ctx, rec, "fill", &[Arg::Write(t)], &p)
}

// ---- channel ranges -------------------------------------------------------------------

fn check_slice(op: &str, role: &str, s: &ChannelSlice<'_>) -> Result<()> {
    let c = s.tensor.shape().c();
    if s.count == 0 || s.offset.checked_add(s.count).is_none_or(|e| e > c) {
        return Err(Error::Shape(format!(
            "{op}: {role} channel range {}..{} is outside '{}' {} ({c} channels)",
            s.offset,
            s.offset.saturating_add(s.count),
            s.tensor.name,
            s.tensor.shape()
        )));
    }
    Ok(())
}

fn channel_op(
    ctx: &GpuContext,
    rec: &mut Recorder,
    op: &'static str,
    src: ChannelSlice<'_>,
    dst: ChannelSlice<'_>,
) -> Result<()> {
    check_slice(op, "source", &src)?;
    check_slice(op, "destination", &dst)?;
    let (ss, ds) = (src.tensor.shape(), dst.tensor.shape());
    if std::ptr::eq(src.tensor, dst.tensor) {
        return Err(Error::InvalidArgument(format!(
            "{op}: source and destination are the same tensor '{}'; use two tensors",
            src.tensor.name
        )));
    }
    if ss.n() != ds.n() || ss.spatial() != ds.spatial() {
        return Err(Error::Shape(format!(
            "{op}: batch or spatial size of '{}' {ss} and '{}' {ds} do not match",
            src.tensor.name, dst.tensor.name
        )));
    }
    if src.count != dst.count {
        return Err(Error::Shape(format!(
            "{op}: {} channels of '{}' do not match {} channels of '{}'",
            src.count, src.tensor.name, dst.count, dst.tensor.name
        )));
    }
    let vox = ss.voxels();
    let total = ss
        .n()
        .checked_mul(src.count)
        .and_then(|v| v.checked_mul(vox))
        .ok_or_else(|| Error::Shape(format!("{op}: '{}' is too large", src.tensor.name)))?;
    let p = Params {
        total,
        vox,
        count: src.count,
        src_c: ss.c(),
        src_off: src.offset,
        dst_c: ds.c(),
        dst_off: dst.offset,
        ..Params::default()
    };
    run(
        ctx,
        rec,
        op,
        &[Arg::Read(src.tensor), Arg::Write(dst.tensor)],
        &p,
    )
}

/// Records `dst[:, dst range] = src[:, src range]`. Batch and spatial sizes and the
/// channel counts must match; the tensors must differ.
pub fn copy_channels(
    ctx: &GpuContext,
    rec: &mut Recorder,
    src: ChannelSlice<'_>,
    dst: ChannelSlice<'_>,
) -> Result<()> {
    channel_op(ctx, rec, "copy_channels", src, dst)
}

/// Records `dst[:, dst range] += src[:, src range]` (same rules as [`copy_channels`]).
pub fn add_channels(
    ctx: &GpuContext,
    rec: &mut Recorder,
    src: ChannelSlice<'_>,
    dst: ChannelSlice<'_>,
) -> Result<()> {
    channel_op(ctx, rec, "add_channels", src, dst)
}

// ---- dropout --------------------------------------------------------------------------

/// PCG-RXS-M-XS 32-bit output hash ("pcg_hash", Jarzynski & Olano 2020); a bijection.
pub fn pcg_hash(v: u32) -> u32 {
    let state = v.wrapping_mul(747_796_405).wrapping_add(2_891_336_453);
    let word = ((state >> ((state >> 28) + 4)) ^ state).wrapping_mul(277_803_737);
    (word >> 22) ^ word
}

/// The dropout hash of element `i` under `seed`: `pcg(pcg(i) ^ pcg(seed))` (same in WGSL).
pub fn dropout_hash(seed: u32, i: u32) -> u32 {
    pcg_hash(pcg_hash(i) ^ pcg_hash(seed))
}

/// Keep threshold on 24-bit hash values: `ceil(p * 2^24)`, so that
/// `(h >> 8) >= threshold` iff the uniform `(h >> 8) / 2^24` in `[0, 1)` is `>= p`.
pub fn dropout_threshold(p: f32) -> u32 {
    (f64::from(p) * f64::from(1u32 << 24)).ceil() as u32
}

/// Whether dropout with probability `p` and `seed` keeps element `i` (GPU and CPU agree
/// bit for bit: the decision is made on integers).
pub fn dropout_keeps(seed: u32, i: u32, p: f32) -> bool {
    (dropout_hash(seed, i) >> 8) >= dropout_threshold(p)
}

fn check_p(op: &str, p: f32) -> Result<()> {
    if (0.0..1.0).contains(&p) {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "{op}: drop probability p = {p} is outside [0, 1)"
        )))
    }
}

fn dropout_named(
    ctx: &GpuContext,
    rec: &mut Recorder,
    op: &str,
    x: &Tensor,
    y: &Tensor,
    p: f32,
    seed: u32,
) -> Result<()> {
    check_p(op, p)?;
    let params = Params {
        alpha: (1.0 / (1.0 - f64::from(p))) as f32,
        seed,
        threshold: dropout_threshold(p),
        ..Params::default()
    };
    unary(ctx, rec, op, ("dropout", "dropout_inplace"), x, y, params)
}

/// Records `y = x * keep(seed, i) / (1 - p)` with `keep` from [`dropout_keeps`]; `p` in
/// `[0, 1)`. `y` may be `x`. No mask is stored: [`dropout_backward`] recomputes it.
pub fn dropout_forward(
    ctx: &GpuContext,
    rec: &mut Recorder,
    x: &Tensor,
    y: &Tensor,
    p: f32,
    seed: u32,
) -> Result<()> {
    dropout_named(ctx, rec, "dropout_forward", x, y, p, seed)
}

/// Records `dx = dy * keep(seed, i) / (1 - p)` (the forward's `p` and `seed`); `dx` may
/// be `dy`.
pub fn dropout_backward(
    ctx: &GpuContext,
    rec: &mut Recorder,
    dy: &Tensor,
    dx: &Tensor,
    p: f32,
    seed: u32,
) -> Result<()> {
    dropout_named(ctx, rec, "dropout_backward", dy, dx, p, seed)
}

// ---- CPU references (f64, plain loops) ------------------------------------------------

/// CPU reference of [`relu_forward`] (NaN propagates, as in PyTorch).
pub fn relu_forward_f64(x: &[f64]) -> Vec<f64> {
    x.iter().map(|&v| if v < 0.0 { 0.0 } else { v }).collect()
}

/// CPU reference of [`relu_backward`]: `dy` where `y_or_x > 0`.
pub fn relu_backward_f64(y_or_x: &[f64], dy: &[f64]) -> Vec<f64> {
    y_or_x
        .iter()
        .zip(dy)
        .map(|(&v, &g)| if v > 0.0 { g } else { 0.0 })
        .collect()
}

/// CPU reference of [`relu6_forward`].
pub fn relu6_forward_f64(x: &[f64]) -> Vec<f64> {
    x.iter().map(|&v| v.clamp(0.0, 6.0)).collect()
}

/// CPU reference of [`relu6_backward`]: `dy` where `0 < x < 6`.
pub fn relu6_backward_f64(x: &[f64], dy: &[f64]) -> Vec<f64> {
    x.iter()
        .zip(dy)
        .map(|(&v, &g)| if v > 0.0 && v < 6.0 { g } else { 0.0 })
        .collect()
}

/// CPU reference of [`add`].
pub fn add_f64(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(&u, &v)| u + v).collect()
}

/// CPU reference of [`scale`].
pub fn scale_f64(x: &[f64], alpha: f64) -> Vec<f64> {
    x.iter().map(|&v| alpha * v).collect()
}

/// CPU reference of [`axpy`]: returns the new `y`.
pub fn axpy_f64(alpha: f64, x: &[f64], y: &[f64]) -> Vec<f64> {
    x.iter().zip(y).map(|(&u, &v)| v + alpha * u).collect()
}

/// CPU reference of [`copy_channels`]: `dst` with channels `dst_off..dst_off + count`
/// replaced by `src` channels `src_off..src_off + count`.
pub fn copy_channels_f64(
    src: &Array5<f64>,
    src_off: usize,
    dst: &Array5<f64>,
    dst_off: usize,
    count: usize,
) -> Array5<f64> {
    let mut out = dst.clone();
    out.slice_mut(s![.., dst_off..dst_off + count, .., .., ..])
        .assign(&src.slice(s![.., src_off..src_off + count, .., .., ..]));
    out
}

/// CPU reference of [`add_channels`]: `dst` with `src` channels added to its range.
pub fn add_channels_f64(
    src: &Array5<f64>,
    src_off: usize,
    dst: &Array5<f64>,
    dst_off: usize,
    count: usize,
) -> Array5<f64> {
    let mut out = dst.clone();
    let (n, d, h, w) = (
        dst.shape()[0],
        dst.shape()[2],
        dst.shape()[3],
        dst.shape()[4],
    );
    for b in 0..n {
        for c in 0..count {
            for z in 0..d {
                for y in 0..h {
                    for x in 0..w {
                        out[[b, dst_off + c, z, y, x]] += src[[b, src_off + c, z, y, x]];
                    }
                }
            }
        }
    }
    out
}

/// CPU reference of [`dropout_forward`] (same hash, so the same mask as the GPU).
pub fn dropout_forward_f64(x: &[f64], p: f32, seed: u32) -> Vec<f64> {
    let keep_scale = 1.0 / (1.0 - f64::from(p));
    x.iter()
        .enumerate()
        .map(|(i, &v)| {
            if dropout_keeps(seed, i as u32, p) {
                v * keep_scale
            } else {
                0.0
            }
        })
        .collect()
}

/// CPU reference of [`dropout_backward`].
pub fn dropout_backward_f64(dy: &[f64], p: f32, seed: u32) -> Vec<f64> {
    dropout_forward_f64(dy, p, seed)
}
