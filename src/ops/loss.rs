//! Segmentation losses on NCDHW logits: softmax over channels (inference output),
//! softmax cross-entropy and soft Dice, forward and backward, with f64 CPU references.
//!
//! Conventions shared by every op here:
//! - `logits` is `[N, C, D, H, W]` (C ≥ 1 classes), `labels` is `[N, 1, D, H, W]` holding
//!   class ids as f32 values that are exact integers in `0..C`.
//! - A label that is not such an integer (out of range, fractional, NaN) is never used as
//!   an index on the GPU: the loss written is NaN, the cross-entropy gradient of that voxel
//!   is NaN and the whole Dice gradient is NaN (its class sums are meaningless). The CPU
//!   references return `Err` instead. Checking labels on the host would need a readback.
//! - Losses are written into a caller-allocated 1-element tensor; backward passes read
//!   the upstream gradient (dTotal/dLoss, 1.0 at the root) from a 1-element tensor on the
//!   GPU, so a training step needs no readback.
//! - Sums over voxels are deterministic split reductions (lane partials in
//!   `shaders/loss.wgsl`, then `reduce::sum_rows`), no atomics.

use crate::error::{Error, Result};
use crate::gpu::{GpuContext, PipelineKey, Recorder};
use crate::ops::conv3d::u32s;
use crate::ops::params::{launch, Arg};
use crate::ops::reduce::sum_rows;
use crate::tensor::{Shape5, Tensor};
use ndarray::Array5;

const SRC: &str = include_str!("../../shaders/loss.wgsl");

/// Sizes of one loss launch.
struct Dims {
    n: usize,
    c: usize,
    vox: usize,
    total: usize,
    lanes: usize,
    chunks: usize,
}

impl Dims {
    fn params(&self, eps: f32) -> Result<Vec<u32>> {
        let mut v = u32s(&[
            self.n,
            self.c,
            self.vox,
            self.total,
            self.lanes,
            self.chunks,
        ])?;
        // Offsets like (3C + 1) * lanes and n*C*V + c*V + v must fit in u32 too.
        u32s(&[
            self.total.saturating_mul(self.c),
            (3 * self.c + 1).saturating_mul(self.lanes),
        ])?;
        v.push(eps.to_bits());
        v.push(f32::NAN.to_bits());
        Ok(v)
    }
}

fn check_logits(op: &str, logits: &Tensor) -> Result<Dims> {
    let s = logits.shape();
    if s.has_zero() {
        return Err(Error::Shape(format!(
            "{op}: logits '{}' {s} has a zero-sized dimension",
            logits.name
        )));
    }
    let vox = s.voxels();
    let total = s.n() * vox;
    // Lanes ≈ sqrt(total), a multiple of 64: balances the per-lane loop and the row sums.
    let lanes = ((total as f64).sqrt().ceil() as usize).div_ceil(64).max(1) * 64;
    Ok(Dims {
        n: s.n(),
        c: s.c(),
        vox,
        total,
        lanes,
        chunks: total.div_ceil(lanes),
    })
}

fn check_labels(op: &str, logits: &Tensor, labels: &Tensor) -> Result<Dims> {
    let d = check_logits(op, logits)?;
    let (s, l) = (logits.shape(), labels.shape());
    if l.c() != 1 || l.n() != s.n() || l.spatial() != s.spatial() {
        return Err(Error::Shape(format!(
            "{op}: labels '{}' {l} must be [N, 1, D, H, W] = [{}, 1, {}, {}, {}] to match \
             logits '{}' {s} (one class id per voxel)",
            labels.name,
            s.n(),
            s.0[2],
            s.0[3],
            s.0[4],
            logits.name
        )));
    }
    if labels.buffer() == logits.buffer() {
        return Err(Error::InvalidArgument(format!(
            "{op}: labels '{}' and logits '{}' are the same tensor",
            labels.name, logits.name
        )));
    }
    Ok(d)
}

fn check_scalar(op: &str, what: &str, t: &Tensor) -> Result<()> {
    if t.shape().numel()? != 1 {
        return Err(Error::Shape(format!(
            "{op}: {what} '{}' {} must hold exactly 1 element",
            t.name,
            t.shape()
        )));
    }
    Ok(())
}

fn check_out(op: &str, what: &str, out: &Tensor, like: &Tensor, inputs: &[&Tensor]) -> Result<()> {
    if out.shape() != like.shape() {
        return Err(Error::Shape(format!(
            "{op}: {what} '{}' {} must have the shape of '{}' {}",
            out.name,
            out.shape(),
            like.name,
            like.shape()
        )));
    }
    check_distinct(op, out, inputs)
}

fn check_distinct(op: &str, out: &Tensor, inputs: &[&Tensor]) -> Result<()> {
    if let Some(t) = inputs.iter().find(|t| t.buffer() == out.buffer()) {
        return Err(Error::InvalidArgument(format!(
            "{op}: output '{}' must not alias input '{}'",
            out.name, t.name
        )));
    }
    Ok(())
}

fn check_eps(op: &str, eps: f32) -> Result<()> {
    if !eps.is_finite() || eps < 0.0 {
        return Err(Error::InvalidArgument(format!(
            "{op}: eps = {eps} must be finite and >= 0"
        )));
    }
    Ok(())
}

/// Records one loss-shader dispatch with the shared binding layout.
#[allow(clippy::too_many_arguments)]
fn run(
    ctx: &GpuContext,
    rec: &mut Recorder,
    entry: &'static str,
    d: &Dims,
    eps: f32,
    logits: &Tensor,
    labels: Option<&Tensor>,
    aux: Option<&Tensor>,
    upstream: Option<&Tensor>,
    out: &Tensor,
    threads: usize,
) -> Result<()> {
    let dummy = logits;
    launch(
        ctx,
        rec,
        PipelineKey::new("loss", entry),
        SRC,
        &[
            Arg::Read(logits),
            Arg::Read(labels.unwrap_or(dummy)),
            Arg::Read(aux.unwrap_or(dummy)),
            Arg::Read(upstream.unwrap_or(dummy)),
            Arg::Write(out),
        ],
        &d.params(eps)?,
        threads,
    )
}

/// Records `probs = softmax(logits)` over the channel axis, per voxel (max-subtracted).
pub fn softmax_channels(
    ctx: &GpuContext,
    rec: &mut Recorder,
    logits: &Tensor,
    probs: &Tensor,
) -> Result<()> {
    let op = "softmax_channels";
    let d = check_logits(op, logits)?;
    check_out(op, "probs", probs, logits, &[logits])?;
    run(
        ctx,
        rec,
        "softmax_channels",
        &d,
        0.0,
        logits,
        None,
        None,
        None,
        probs,
        d.total,
    )
}

/// Records `loss_out[0] = mean over N·D·H·W voxels of -log softmax(logits)[label]`
/// (log-sum-exp, stable for large logits); NaN if any label is not an integer in `0..C`.
pub fn softmax_cross_entropy_forward(
    ctx: &GpuContext,
    rec: &mut Recorder,
    logits: &Tensor,
    labels: &Tensor,
    loss_out: &Tensor,
) -> Result<()> {
    let op = "softmax_cross_entropy_forward";
    let d = check_labels(op, logits, labels)?;
    check_scalar(op, "loss_out", loss_out)?;
    check_distinct(op, loss_out, &[logits, labels])?;
    let partial = Tensor::empty(ctx, Shape5::new(1, 1, 1, 2, d.lanes), "ce partials")?;
    let sums = Tensor::empty(ctx, Shape5::new(1, 1, 1, 1, 2), "ce sums")?;
    run(
        ctx,
        rec,
        "ce_partial",
        &d,
        0.0,
        logits,
        Some(labels),
        None,
        None,
        &partial,
        d.lanes,
    )?;
    sum_rows(ctx, rec, &partial, 2, d.lanes, &sums)?;
    run(
        ctx,
        rec,
        "ce_final",
        &d,
        0.0,
        logits,
        Some(labels),
        Some(&sums),
        None,
        loss_out,
        1,
    )
}

/// Records `dlogits = (softmax(logits) - onehot(labels)) * upstream[0] / (N·D·H·W)`;
/// the voxels of labels outside `0..C` get NaN.
pub fn softmax_cross_entropy_backward(
    ctx: &GpuContext,
    rec: &mut Recorder,
    logits: &Tensor,
    labels: &Tensor,
    upstream: &Tensor,
    dlogits: &Tensor,
) -> Result<()> {
    let op = "softmax_cross_entropy_backward";
    let d = check_labels(op, logits, labels)?;
    check_scalar(op, "upstream", upstream)?;
    check_out(op, "dlogits", dlogits, logits, &[logits, labels, upstream])?;
    run(
        ctx,
        rec,
        "ce_backward",
        &d,
        0.0,
        logits,
        Some(labels),
        None,
        Some(upstream),
        dlogits,
        d.total,
    )
}

/// Records the Dice class sums `[Σp·g (C), Σp (C), Σg (C), bad labels (1)]` into a new
/// `[1, 1, 1, 1, 3C + 1]` tensor.
fn dice_sums(
    ctx: &GpuContext,
    rec: &mut Recorder,
    d: &Dims,
    logits: &Tensor,
    labels: &Tensor,
) -> Result<Tensor> {
    let rows = 3 * d.c + 1;
    let partial = Tensor::empty(ctx, Shape5::new(1, 1, 1, rows, d.lanes), "dice partials")?;
    let sums = Tensor::empty(ctx, Shape5::new(1, 1, 1, 1, rows), "dice sums")?;
    run(
        ctx,
        rec,
        "dice_partial",
        d,
        0.0,
        logits,
        Some(labels),
        None,
        None,
        &partial,
        d.lanes * d.c,
    )?;
    sum_rows(ctx, rec, &partial, rows, d.lanes, &sums)?;
    Ok(sums)
}

/// Records the soft Dice loss `loss_out[0] = 1 - mean_c (2 Σ p_c g_c + eps) / (Σ p_c +
/// Σ g_c + eps)`, p = softmax over channels, g = one-hot labels, sums over all voxels of
/// the batch; NaN if any label is not an integer in `0..C`.
pub fn dice_loss_forward(
    ctx: &GpuContext,
    rec: &mut Recorder,
    logits: &Tensor,
    labels: &Tensor,
    loss_out: &Tensor,
    eps: f32,
) -> Result<()> {
    let op = "dice_loss_forward";
    let d = check_labels(op, logits, labels)?;
    check_scalar(op, "loss_out", loss_out)?;
    check_distinct(op, loss_out, &[logits, labels])?;
    check_eps(op, eps)?;
    let sums = dice_sums(ctx, rec, &d, logits, labels)?;
    run(
        ctx,
        rec,
        "dice_final",
        &d,
        eps,
        logits,
        Some(labels),
        Some(&sums),
        None,
        loss_out,
        1,
    )
}

/// Records `dlogits = upstream[0] · d(dice loss)/d(logits)` (class sums recomputed; all
/// NaN if any label is not an integer in `0..C`).
pub fn dice_loss_backward(
    ctx: &GpuContext,
    rec: &mut Recorder,
    logits: &Tensor,
    labels: &Tensor,
    upstream: &Tensor,
    dlogits: &Tensor,
    eps: f32,
) -> Result<()> {
    let op = "dice_loss_backward";
    let d = check_labels(op, logits, labels)?;
    check_scalar(op, "upstream", upstream)?;
    check_out(op, "dlogits", dlogits, logits, &[logits, labels, upstream])?;
    check_eps(op, eps)?;
    let sums = dice_sums(ctx, rec, &d, logits, labels)?;
    run(
        ctx,
        rec,
        "dice_backward",
        &d,
        eps,
        logits,
        Some(labels),
        Some(&sums),
        Some(upstream),
        dlogits,
        d.total,
    )
}

// ---------------------------------------------------------------- CPU references (f64)

fn check_labels_f64(op: &str, logits: &Array5<f64>, labels: &Array5<f64>) -> Result<Array5<usize>> {
    let s = logits.shape();
    let l = labels.shape();
    if s.contains(&0) {
        return Err(Error::Shape(format!(
            "{op}: logits {s:?} have a zero-sized dimension"
        )));
    }
    if l != [s[0], 1, s[2], s[3], s[4]] {
        return Err(Error::Shape(format!(
            "{op}: labels {l:?} must be [N, 1, D, H, W] to match logits {s:?}"
        )));
    }
    let c = s[1];
    let mut out = Array5::<usize>::zeros(labels.raw_dim());
    for (idx, &v) in labels.indexed_iter() {
        if !(v >= 0.0 && v < c as f64 && v.fract() == 0.0) {
            return Err(Error::InvalidArgument(format!(
                "{op}: label {v} at {idx:?} is not a class id in 0..{c}"
            )));
        }
        out[idx] = v as usize;
    }
    Ok(out)
}

/// f64 reference of [`softmax_channels`].
pub fn softmax_channels_f64(logits: &Array5<f64>) -> Array5<f64> {
    let s = logits.shape();
    let mut p = Array5::<f64>::zeros(logits.raw_dim());
    for n in 0..s[0] {
        for z in 0..s[2] {
            for y in 0..s[3] {
                for x in 0..s[4] {
                    let m = (0..s[1])
                        .map(|c| logits[[n, c, z, y, x]])
                        .fold(f64::NEG_INFINITY, f64::max);
                    let tot: f64 = (0..s[1]).map(|c| (logits[[n, c, z, y, x]] - m).exp()).sum();
                    for c in 0..s[1] {
                        p[[n, c, z, y, x]] = (logits[[n, c, z, y, x]] - m).exp() / tot;
                    }
                }
            }
        }
    }
    p
}

/// f64 reference of [`softmax_cross_entropy_forward`] (Err for a bad label or shape).
pub fn softmax_cross_entropy_forward_f64(
    logits: &Array5<f64>,
    labels: &Array5<f64>,
) -> Result<f64> {
    let op = "softmax_cross_entropy_forward_f64";
    let lab = check_labels_f64(op, logits, labels)?;
    let s = logits.shape();
    let mut total = 0.0;
    for n in 0..s[0] {
        for z in 0..s[2] {
            for y in 0..s[3] {
                for x in 0..s[4] {
                    let m = (0..s[1])
                        .map(|c| logits[[n, c, z, y, x]])
                        .fold(f64::NEG_INFINITY, f64::max);
                    let lse = m
                        + (0..s[1])
                            .map(|c| (logits[[n, c, z, y, x]] - m).exp())
                            .sum::<f64>()
                            .ln();
                    total += lse - logits[[n, lab[[n, 0, z, y, x]], z, y, x]];
                }
            }
        }
    }
    Ok(total / (s[0] * s[2] * s[3] * s[4]) as f64)
}

/// f64 reference of [`softmax_cross_entropy_backward`]: `(softmax - onehot) · upstream / voxels`.
pub fn softmax_cross_entropy_backward_f64(
    logits: &Array5<f64>,
    labels: &Array5<f64>,
    upstream: f64,
) -> Result<Array5<f64>> {
    let op = "softmax_cross_entropy_backward_f64";
    let lab = check_labels_f64(op, logits, labels)?;
    let s = logits.shape();
    let count = (s[0] * s[2] * s[3] * s[4]) as f64;
    let mut g = softmax_channels_f64(logits);
    for ((n, c, z, y, x), v) in g.indexed_iter_mut() {
        if lab[[n, 0, z, y, x]] == c {
            *v -= 1.0;
        }
        *v *= upstream / count;
    }
    Ok(g)
}

/// Per-class sums (Σ p·g, Σ p, Σ g) of the soft Dice loss.
fn dice_class_sums(p: &Array5<f64>, lab: &Array5<usize>) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let c = p.shape()[1];
    let (mut inter, mut psum, mut gsum) = (vec![0.0; c], vec![0.0; c], vec![0.0; c]);
    for ((n, k, z, y, x), &v) in p.indexed_iter() {
        psum[k] += v;
        if lab[[n, 0, z, y, x]] == k {
            inter[k] += v;
            gsum[k] += 1.0;
        }
    }
    (inter, psum, gsum)
}

/// f64 reference of [`dice_loss_forward`].
pub fn dice_loss_forward_f64(logits: &Array5<f64>, labels: &Array5<f64>, eps: f64) -> Result<f64> {
    let lab = check_labels_f64("dice_loss_forward_f64", logits, labels)?;
    let p = softmax_channels_f64(logits);
    let (inter, psum, gsum) = dice_class_sums(&p, &lab);
    let c = inter.len();
    let mean: f64 = (0..c)
        .map(|k| (2.0 * inter[k] + eps) / (psum[k] + gsum[k] + eps))
        .sum::<f64>()
        / c as f64;
    Ok(1.0 - mean)
}

/// f64 reference of [`dice_loss_backward`]: dLoss/dp by the quotient rule, then the full
/// softmax Jacobian `dp_c/dx_k = p_c (δ_ck - p_k)`, times `upstream`.
pub fn dice_loss_backward_f64(
    logits: &Array5<f64>,
    labels: &Array5<f64>,
    upstream: f64,
    eps: f64,
) -> Result<Array5<f64>> {
    let lab = check_labels_f64("dice_loss_backward_f64", logits, labels)?;
    let p = softmax_channels_f64(logits);
    let (inter, psum, gsum) = dice_class_sums(&p, &lab);
    let s = logits.shape();
    let c = s[1];
    let mut dx = Array5::<f64>::zeros(logits.raw_dim());
    for n in 0..s[0] {
        for z in 0..s[2] {
            for y in 0..s[3] {
                for x in 0..s[4] {
                    // dLoss/dp_c at this voxel.
                    let dp: Vec<f64> = (0..c)
                        .map(|k| {
                            let g = if lab[[n, 0, z, y, x]] == k { 1.0 } else { 0.0 };
                            let num = 2.0 * inter[k] + eps;
                            let den = psum[k] + gsum[k] + eps;
                            -(2.0 * g * den - num) / (den * den) / c as f64
                        })
                        .collect();
                    for k in 0..c {
                        let mut acc = 0.0;
                        for (j, dpj) in dp.iter().enumerate() {
                            let delta = if j == k { 1.0 } else { 0.0 };
                            acc += dpj * p[[n, j, z, y, x]] * (delta - p[[n, k, z, y, x]]);
                        }
                        dx[[n, k, z, y, x]] = acc * upstream;
                    }
                }
            }
        }
    }
    Ok(dx)
}

/// Every shader of this family (for the portability test).
pub fn shader_variants() -> Vec<(String, String)> {
    vec![("loss".to_string(), SRC.to_string())]
}
