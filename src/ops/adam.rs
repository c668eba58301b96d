//! The optimiser: one Adam (or AdamW) step per parameter tensor on the GPU, with an
//! optional L2 penalty folded into the gradient, and a deterministic sum of squares used
//! to report the L2 term of the loss.
//!
//! The update is Adam in PyTorch's form (Kingma & Ba, Algorithm 1 with bias-corrected
//! moments; `eps` added to `sqrt(v̂)`):
//!
//! ```text
//! g' = g + 2·l2·w                      (only when the caller asks for L2 on this tensor)
//! m  = β1·m + (1 − β1)·g'
//! v  = β2·v + (1 − β2)·g'²
//! w ← w − lr·wd·w − lr · m̂ / (sqrt(v̂) + eps),   m̂ = m/(1 − β1^t),  v̂ = v/(1 − β2^t)
//! ```
//!
//! `2·l2·w` is the gradient of `l2·Σw²`, the penalty Keras' `kernel_regularizer=l2(l2)`
//! adds to the loss (3D-MASNet uses it on conv kernels only: the caller decides per
//! tensor). The decoupled decay `lr·wd·w` (AdamW, Loshchilov & Hutter) uses the weight
//! before this step, as PyTorch's `AdamW` does; it is skipped when `weight_decay` is 0.
//!
//! Difference from Keras: Keras' `Adam` computes `lr_t = lr·sqrt(1 − β2^t)/(1 − β1^t)`
//! and `w ← w − lr_t·m/(sqrt(v) + eps)`, i.e. it adds `eps` to the *uncorrected*
//! `sqrt(v)`. That equals this form with `eps_here = eps_keras / sqrt(1 − β2^t)`; the
//! two differ only while `sqrt(v̂)` is comparable to `eps` (1e-7 in the paper), so for
//! practical gradients the trajectories coincide.
//!
//! The bias-correction factors `1/(1 − β^t)` are computed on the CPU in f64 and passed
//! as f32, so they stay accurate for large `t`.

use crate::error::{Error, Result};
use crate::gpu::{Binding, GpuContext, PipelineKey, Recorder};
use crate::ops::conv3d::u32s;
use crate::ops::params::{dispatch, launch, uniform_u32, Arg};
use crate::tensor::{Shape5, Tensor};

const SRC: &str = include_str!("../../shaders/adam.wgsl");

/// Hyper-parameters of [`adam_step`] (3D-MASNet: β1 0.9, β2 0.999, eps 1e-7, l2 1e-4).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamConfig {
    /// Learning rate (> 0).
    pub lr: f32,
    /// First-moment decay, in `[0, 1)`.
    pub beta1: f32,
    /// Second-moment decay, in `[0, 1)`.
    pub beta2: f32,
    /// Added to `sqrt(v̂)` (> 0).
    pub eps: f32,
    /// L2 penalty coefficient: `l2·Σw²` is added to the loss of tensors stepped with
    /// `apply_l2 = true` (>= 0).
    pub l2: f32,
    /// Decoupled weight decay (AdamW) per unit learning rate; 0 disables it (>= 0).
    pub weight_decay: f32,
}

impl Default for AdamConfig {
    /// The paper's settings: lr 3e-4, β1 0.9, β2 0.999, eps 1e-7, l2 1e-4, no decay.
    fn default() -> Self {
        Self {
            lr: 3e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-7,
            l2: 1e-4,
            weight_decay: 0.0,
        }
    }
}

impl AdamConfig {
    /// Checks the ranges: lr, eps > 0; betas in `[0, 1)`; l2, weight_decay >= 0; all finite.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str, v: f32, need: &str| {
            Err(Error::InvalidArgument(format!(
                "adam_step: {what} = {v} must be {need}"
            )))
        };
        let fields = [
            ("lr", self.lr),
            ("beta1", self.beta1),
            ("beta2", self.beta2),
            ("eps", self.eps),
            ("l2", self.l2),
            ("weight_decay", self.weight_decay),
        ];
        for (name, v) in fields {
            if !v.is_finite() {
                return bad(name, v, "finite");
            }
        }
        if self.lr <= 0.0 {
            return bad("lr", self.lr, "> 0");
        }
        if self.eps <= 0.0 {
            return bad("eps", self.eps, "> 0");
        }
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return bad(name, b, "in [0, 1)");
            }
        }
        if self.l2 < 0.0 {
            return bad("l2", self.l2, ">= 0");
        }
        if self.weight_decay < 0.0 {
            return bad("weight_decay", self.weight_decay, ">= 0");
        }
        Ok(())
    }
}

/// `(1/(1 − β1^t), 1/(1 − β2^t))` in f64 for step `t >= 1`.
fn bias_corrections(cfg: &AdamConfig, step: u32) -> (f64, f64) {
    let t = f64::from(step);
    (
        1.0 / (1.0 - f64::from(cfg.beta1).powf(t)),
        1.0 / (1.0 - f64::from(cfg.beta2).powf(t)),
    )
}

/// Records one Adam/AdamW step (see the module docs) updating `param`, `m` and `v` in
/// place from `grad`; `step` is the 1-based step count `t`, `apply_l2` adds `2·l2·w` to
/// the gradient of this tensor. The four tensors need equal element counts (their
/// shapes may differ) and must be distinct buffers.
#[allow(clippy::too_many_arguments)]
pub fn adam_step(
    ctx: &GpuContext,
    rec: &mut Recorder,
    param: &Tensor,
    grad: &Tensor,
    m: &Tensor,
    v: &Tensor,
    step: u32,
    cfg: &AdamConfig,
    apply_l2: bool,
) -> Result<()> {
    cfg.validate()?;
    if step == 0 {
        return Err(Error::InvalidArgument(format!(
            "adam_step on '{}': step is 1-based, got 0",
            param.name
        )));
    }
    let n = param.shape().numel()?;
    for t in [grad, m, v] {
        if t.shape().numel()? != n {
            return Err(Error::Shape(format!(
                "adam_step: '{}' {} has {} elements but parameter '{}' {} has {n}",
                t.name,
                t.shape(),
                t.shape().numel()?,
                param.name,
                param.shape()
            )));
        }
    }
    let all = [param, grad, m, v];
    for (i, a) in all.iter().enumerate() {
        for b in &all[i + 1..] {
            if a.buffer() == b.buffer() {
                return Err(Error::InvalidArgument(format!(
                    "adam_step: '{}' and '{}' are the same buffer; param, grad, m and v must \
                     be distinct tensors",
                    a.name, b.name
                )));
            }
        }
    }
    let (inv_bc1, inv_bc2) = bias_corrections(cfg, step);
    let l2x2 = if apply_l2 { 2.0 * cfg.l2 } else { 0.0 };
    let decay = (f64::from(cfg.lr) * f64::from(cfg.weight_decay)) as f32;
    let mut params = u32s(&[n])?;
    params.extend([
        cfg.lr.to_bits(),
        cfg.beta1.to_bits(),
        cfg.beta2.to_bits(),
        cfg.eps.to_bits(),
        l2x2.to_bits(),
        decay.to_bits(),
        (inv_bc1 as f32).to_bits(),
        (inv_bc2 as f32).to_bits(),
        0,
        0,
        0,
    ]);
    // Not `launch`: the uniform sits at binding 2 (shared with the sum-of-squares
    // entries of the same shader), before the moment buffers.
    let key = PipelineKey::new("adam", "adam_step");
    let pipe = ctx.pipelines.get(
        &ctx.device,
        &key,
        SRC,
        &[
            Binding::ReadOnly,
            Binding::ReadWrite,
            Binding::Uniform,
            Binding::ReadWrite,
            Binding::ReadWrite,
        ],
    )?;
    let uniform = uniform_u32(ctx, &params)?;
    let grid = crate::gpu::workgroup_grid(
        n.div_ceil(64) as u64,
        ctx.limits.max_compute_workgroups_per_dimension,
    )?;
    dispatch(
        ctx,
        rec,
        &pipe,
        &[
            (grad.buffer(), grad.bytes()),
            (param.buffer(), param.bytes()),
            (&uniform, uniform.size()),
            (m.buffer(), m.bytes()),
            (v.buffer(), v.bytes()),
        ],
        grid,
    )
}

/// Records `out_scalar[0] = Σ t²` (deterministic: fixed-order two-pass sum, no atomics);
/// `out_scalar` must hold exactly one element.
pub fn sum_of_squares(
    ctx: &GpuContext,
    rec: &mut Recorder,
    t: &Tensor,
    out_scalar: &Tensor,
) -> Result<()> {
    let k = out_scalar.shape().numel()?;
    if k != 1 {
        return Err(Error::Shape(format!(
            "sum_of_squares of '{}': output '{}' {} must hold exactly one element, has {k}",
            t.name,
            out_scalar.name,
            out_scalar.shape()
        )));
    }
    sum_of_squares_at(ctx, rec, t, out_scalar, 0)
}

/// Records `out[index] = Σ t²` leaving the other elements of `out` untouched, so the
/// sums of many tensors can land in one buffer and be read back at once.
///
/// Pass 1 sums squares over rows of `len = max(64, ceil(sqrt(n)))` contiguous values
/// (the last row may be short) into a temporary; pass 2 sums the rows in order. The
/// split depends only on `n`, so results are bit-reproducible.
pub fn sum_of_squares_at(
    ctx: &GpuContext,
    rec: &mut Recorder,
    t: &Tensor,
    out: &Tensor,
    index: usize,
) -> Result<()> {
    let k = out.shape().numel()?;
    if index >= k {
        return Err(Error::Shape(format!(
            "sum_of_squares of '{}': index {index} is outside output '{}' {} ({k} elements)",
            t.name,
            out.name,
            out.shape()
        )));
    }
    if t.buffer() == out.buffer() {
        return Err(Error::InvalidArgument(format!(
            "sum_of_squares: input '{}' and output '{}' are the same buffer",
            t.name, out.name
        )));
    }
    let n = t.shape().numel()?;
    let len = sumsq_row_len(n);
    let rows = n.div_ceil(len);
    let partial = Tensor::empty(ctx, Shape5::new(1, 1, 1, 1, rows), "sumsq_partial")?;
    // AdamParams layout: total, 8 unused words, len, rows, index.
    let params = u32s(&[n, 0, 0, 0, 0, 0, 0, 0, 0, len, rows, index])?;
    launch(
        ctx,
        rec,
        PipelineKey::new("adam", "sumsq_rows"),
        SRC,
        &[Arg::Read(t), Arg::Write(&partial)],
        &params,
        rows,
    )?;
    launch(
        ctx,
        rec,
        PipelineKey::new("adam", "sumsq_finish"),
        SRC,
        &[Arg::Read(&partial), Arg::Write(out)],
        &params,
        1,
    )
}

/// Values per row of the first pass of [`sum_of_squares_at`] for `n` elements.
fn sumsq_row_len(n: usize) -> usize {
    let mut r = (n as f64).sqrt().ceil() as usize;
    while r.saturating_mul(r) < n {
        r += 1;
    }
    r.max(64)
}

/// CPU reference of [`adam_step`] in f64, plain loops; updates `w`, `m`, `v` in place.
#[allow(clippy::too_many_arguments)]
pub fn adam_step_f64(
    w: &mut [f64],
    g: &[f64],
    m: &mut [f64],
    v: &mut [f64],
    step: u32,
    cfg: &AdamConfig,
    apply_l2: bool,
) {
    let b1 = f64::from(cfg.beta1);
    let b2 = f64::from(cfg.beta2);
    let lr = f64::from(cfg.lr);
    let eps = f64::from(cfg.eps);
    let l2 = if apply_l2 { f64::from(cfg.l2) } else { 0.0 };
    let wd = f64::from(cfg.weight_decay);
    let t = i32::try_from(step).unwrap_or(i32::MAX);
    for i in 0..w.len() {
        let gi = g[i] + 2.0 * l2 * w[i];
        m[i] = b1 * m[i] + (1.0 - b1) * gi;
        v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
        let m_hat = m[i] / (1.0 - b1.powi(t));
        let v_hat = v[i] / (1.0 - b2.powi(t));
        w[i] = w[i] - lr * wd * w[i] - lr * m_hat / (v_hat.sqrt() + eps);
    }
}

/// CPU reference of [`sum_of_squares`] in f64.
pub fn sum_of_squares_f64(x: &[f64]) -> f64 {
    x.iter().map(|a| a * a).sum()
}

/// Every shader of this family (for the portability test).
pub fn shader_variants() -> Vec<(String, String)> {
    vec![("adam".to_string(), SRC.to_string())]
}
