//! BatchNorm3d over NCDHW tensors: per channel `c`, statistics over the `M = N·D·H·W`
//! values of that channel. Training forward (batch statistics, running-statistics
//! update, saved mean / invstd for backward), eval forward (running statistics),
//! training- and eval-mode backward, and conv+BN folding on the CPU.
//!
//! Reductions are deterministic (fixed order, no atomics): one workgroup per
//! `(n, c, chunk of CHUNK voxels)` writes a partial sum, then one invocation per
//! channel adds its `N·ceil(DHW / CHUNK)` partials in order. The variance is two-pass
//! (mean first, then the mean of squared deviations), so large means do not cancel.
//! See `shaders/batchnorm.wgsl`.
//!
//! Per-channel tensors (gamma, beta, running and saved statistics, dgamma, dbeta) may
//! have any shape holding exactly `C` values, e.g. `[1, C, 1, 1, 1]`.

use crate::error::{Error, Result};
use crate::gpu::{GpuContext, PipelineKey, Recorder};
use crate::ops::conv3d::u32s;
use crate::ops::params::{launch, Arg};
use crate::tensor::{Shape5, Tensor};
use ndarray::Array5;

const SRC: &str = include_str!("../../shaders/batchnorm.wgsl");

/// Voxels of one `(n, c)` volume reduced by one workgroup (64 invocations x 16).
const CHUNK: usize = 1024;

/// Hyper-parameters of a batch-norm layer, with Keras semantics.
///
/// `running = momentum * running + (1 - momentum) * batch_stat`, so Keras' default
/// momentum 0.99 keeps 99 % of the old value; PyTorch's `momentum = m` is `1 - m` here
/// (PyTorch's default 0.1 is 0.9). Normalisation always uses the biased batch variance;
/// the running variance is updated with the biased one (Keras) or, when
/// `unbiased_running_var`, with `M / (M - 1)` times it (PyTorch).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchNormSpec {
    /// Added to the variance before the square root; must be > 0.
    pub eps: f32,
    /// Weight of the old running statistic, in `[0, 1]` (Keras convention).
    pub momentum: f32,
    /// Update the running variance with the unbiased batch variance (PyTorch) instead
    /// of the biased one (Keras).
    pub unbiased_running_var: bool,
}

impl Default for BatchNormSpec {
    /// Keras defaults, as in the paper: momentum 0.99, eps 1e-3, biased running var.
    fn default() -> Self {
        Self::keras()
    }
}

impl BatchNormSpec {
    /// Keras defaults: momentum 0.99, eps 1e-3, running variance from the biased variance.
    pub fn keras() -> Self {
        Self {
            eps: 1e-3,
            momentum: 0.99,
            unbiased_running_var: false,
        }
    }

    /// PyTorch semantics for PyTorch's `momentum` and `eps` (defaults 0.1 and 1e-5):
    /// Keras momentum `1 - momentum`, running variance from the unbiased variance.
    pub fn pytorch(momentum: f32, eps: f32) -> Self {
        Self {
            eps,
            momentum: 1.0 - momentum,
            unbiased_running_var: true,
        }
    }

    /// Checks `eps > 0` (finite) and `momentum` in `[0, 1]`.
    pub fn validate(&self, op: &str) -> Result<()> {
        check_eps(op, self.eps)?;
        if !(0.0..=1.0).contains(&self.momentum) {
            return Err(Error::InvalidArgument(format!(
                "{op}: momentum {} is outside [0, 1] (Keras convention: weight of the old \
                 running value; PyTorch's momentum m is 1 - m here)",
                self.momentum
            )));
        }
        Ok(())
    }
}

fn check_eps(op: &str, eps: f32) -> Result<()> {
    if !(eps.is_finite() && eps > 0.0) {
        return Err(Error::InvalidArgument(format!(
            "{op}: eps {eps} must be finite and > 0"
        )));
    }
    Ok(())
}

/// Sizes of one launch: batch, channels, voxels per volume, chunks per volume.
struct Geo {
    n: usize,
    c: usize,
    vox: usize,
    nchunk: usize,
}

impl Geo {
    fn of(x: &Tensor) -> Result<Self> {
        let s = x.shape();
        s.numel()?;
        let vox = s.voxels();
        Ok(Self {
            n: s.n(),
            c: s.c(),
            vox,
            nchunk: vox.div_ceil(CHUNK),
        })
    }

    /// Values per channel, `M = N·D·H·W`.
    fn count(&self) -> usize {
        self.n * self.vox
    }

    /// The uniform block (see `BnParams` in the shader).
    fn params(
        &self,
        total: usize,
        flag: u32,
        eps: f32,
        momentum: f32,
        var_scale: f32,
    ) -> Result<Vec<u32>> {
        let mut v = u32s(&[self.n, self.c, self.vox, CHUNK, self.nchunk, total])?;
        v.extend([
            flag,
            eps.to_bits(),
            momentum.to_bits(),
            var_scale.to_bits(),
            (self.count() as f32).to_bits(),
            0,
        ]);
        Ok(v)
    }

    /// [`Geo::params`] with the fused ReLU flag set.
    fn params_relu(&self, total: usize, flag: u32, eps: f32, relu: bool) -> Result<Vec<u32>> {
        let mut v = self.params(total, flag, eps, 0.0, 1.0)?;
        v[11] = u32::from(relu);
        Ok(v)
    }

    /// Partial-sum tensor of `sets` x C x (N·nchunk) values.
    fn partials(&self, ctx: &GpuContext, sets: usize) -> Result<Tensor> {
        Tensor::empty(
            ctx,
            Shape5::new(1, 1, sets, self.c, self.n * self.nchunk),
            "batchnorm partial sums",
        )
    }
}

fn same_shape(op: &str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.shape() != b.shape() {
        return Err(Error::Shape(format!(
            "{op}: '{}' {} and '{}' {} do not match",
            a.name,
            a.shape(),
            b.name,
            b.shape()
        )));
    }
    Ok(())
}

fn per_channel(op: &str, x: &Tensor, ts: &[&Tensor]) -> Result<()> {
    let c = x.shape().c();
    for t in ts {
        let k = t.shape().numel()?;
        if k != c {
            return Err(Error::Shape(format!(
                "{op}: '{}' {} holds {k} values but '{}' {} has {c} channels",
                t.name,
                t.shape(),
                x.name,
                x.shape()
            )));
        }
    }
    Ok(())
}

fn key(entry: &'static str) -> PipelineKey {
    PipelineKey::new("batchnorm", entry)
}

/// Records the training-mode forward pass.
///
/// Computes the batch mean and biased variance of each channel of `x`, writes
/// `y = gamma * (x - mean) * invstd + beta` with `invstd = 1 / sqrt(var + eps)`,
/// updates `running_mean` / `running_var` in place
/// (`running = momentum * running + (1 - momentum) * batch_stat`, the variance times
/// `M / (M - 1)` if `spec.unbiased_running_var`), and saves `mean` and `invstd` for
/// [`batchnorm_backward`]. With `M = N·D·H·W = 1` the batch variance is 0, so
/// `y = beta` and `invstd = 1 / sqrt(eps)`; the unbiased running update is then
/// undefined and returns an error.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_train_forward(
    ctx: &GpuContext,
    rec: &mut Recorder,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    spec: &BatchNormSpec,
    y: &Tensor,
    save_mean: &Tensor,
    save_invstd: &Tensor,
) -> Result<()> {
    let stats = [running_mean, running_var, save_mean, save_invstd];
    train_forward(ctx, rec, x, gamma, beta, stats, spec, y, false)
}

/// [`batchnorm_train_forward`] then ReLU, in the same pass: `y = relu(bn(x))`.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_relu_train_forward(
    ctx: &GpuContext,
    rec: &mut Recorder,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    spec: &BatchNormSpec,
    y: &Tensor,
    save_mean: &Tensor,
    save_invstd: &Tensor,
) -> Result<()> {
    let stats = [running_mean, running_var, save_mean, save_invstd];
    train_forward(ctx, rec, x, gamma, beta, stats, spec, y, true)
}

/// The training forward; `stats` = running mean, running variance, saved mean, saved
/// invstd.
#[allow(clippy::too_many_arguments)]
fn train_forward(
    ctx: &GpuContext,
    rec: &mut Recorder,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    [running_mean, running_var, save_mean, save_invstd]: [&Tensor; 4],
    spec: &BatchNormSpec,
    y: &Tensor,
    relu: bool,
) -> Result<()> {
    let op = if relu {
        "batchnorm_relu_train_forward"
    } else {
        "batchnorm_train_forward"
    };
    spec.validate(op)?;
    same_shape(op, x, y)?;
    per_channel(
        op,
        x,
        &[
            gamma,
            beta,
            running_mean,
            running_var,
            save_mean,
            save_invstd,
        ],
    )?;
    check_outputs(
        op,
        &[y, running_mean, running_var, save_mean, save_invstd],
        &[x, gamma, beta],
    )?;
    let g = Geo::of(x)?;
    let m = g.count();
    let var_scale = if spec.unbiased_running_var {
        if m < 2 {
            return Err(Error::InvalidArgument(format!(
                "{op}: '{}' {} has one value per channel: the unbiased running variance \
                 (M / (M - 1)) is undefined; use unbiased_running_var = false",
                x.name,
                x.shape()
            )));
        }
        (m as f64 / (m - 1) as f64) as f32
    } else {
        1.0
    };
    let part = g.partials(ctx, 1)?;
    let items = g.n * g.c * g.nchunk;
    let p_sum = g.params(items, 0, spec.eps, spec.momentum, var_scale)?;
    let p_sq = g.params(items, 1, spec.eps, spec.momentum, var_scale)?;
    let p_ch = g.params(g.c, 0, spec.eps, spec.momentum, var_scale)?;
    let p_all = g.params_relu(x.shape().numel()?, 0, spec.eps, relu)?;
    // Mean: partial sums of x, then per channel.
    launch(
        ctx,
        rec,
        key("bn_partial"),
        SRC,
        &[Arg::Read(x), Arg::Read(save_mean), Arg::Write(&part)],
        &p_sum,
        items * 64,
    )?;
    launch(
        ctx,
        rec,
        key("bn_mean"),
        SRC,
        &[Arg::Read(&part), Arg::Write(save_mean)],
        &p_ch,
        g.c,
    )?;
    // Variance: partial sums of squared deviations, then per channel with the updates.
    launch(
        ctx,
        rec,
        key("bn_partial"),
        SRC,
        &[Arg::Read(x), Arg::Read(save_mean), Arg::Write(&part)],
        &p_sq,
        items * 64,
    )?;
    launch(
        ctx,
        rec,
        key("bn_var"),
        SRC,
        &[
            Arg::Read(&part),
            Arg::Read(save_mean),
            Arg::Write(save_invstd),
            Arg::Write(running_mean),
            Arg::Write(running_var),
        ],
        &p_ch,
        g.c,
    )?;
    launch(
        ctx,
        rec,
        key("bn_apply"),
        SRC,
        &[
            Arg::Read(x),
            Arg::Read(gamma),
            Arg::Read(beta),
            Arg::Read(save_mean),
            Arg::Read(save_invstd),
            Arg::Write(y),
        ],
        &p_all,
        x.shape().numel()?,
    )
}

/// Records the eval-mode forward pass:
/// `y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta`.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_eval_forward(
    ctx: &GpuContext,
    rec: &mut Recorder,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f32,
    y: &Tensor,
) -> Result<()> {
    let op = "batchnorm_eval_forward";
    check_eps(op, eps)?;
    same_shape(op, x, y)?;
    per_channel(op, x, &[gamma, beta, running_mean, running_var])?;
    check_outputs(op, &[y], &[x, gamma, beta, running_mean, running_var])?;
    let g = Geo::of(x)?;
    let total = x.shape().numel()?;
    launch(
        ctx,
        rec,
        key("bn_apply"),
        SRC,
        &[
            Arg::Read(x),
            Arg::Read(gamma),
            Arg::Read(beta),
            Arg::Read(running_mean),
            Arg::Read(running_var),
            Arg::Write(y),
        ],
        &g.params(total, 1, eps, 0.0, 1.0)?,
        total,
    )
}

/// Shared backward: `stat` is invstd (training, `eval = false`) or the running
/// variance (eval).
#[allow(clippy::too_many_arguments)]
fn backward(
    op: &str,
    ctx: &GpuContext,
    rec: &mut Recorder,
    x: &Tensor,
    dy: &Tensor,
    gamma: &Tensor,
    mean: &Tensor,
    stat: &Tensor,
    eps: f32,
    eval: bool,
    relu_y: Option<&Tensor>,
    dx: &Tensor,
    dgamma: &Tensor,
    dbeta: &Tensor,
) -> Result<()> {
    same_shape(op, x, dy)?;
    same_shape(op, x, dx)?;
    if let Some(y) = relu_y {
        same_shape(op, x, y)?;
        check_outputs(op, &[dx], &[y])?;
    }
    // Without the ReLU the kernels never read `y`; dy stands in for the binding.
    let (relu, y) = (relu_y.is_some(), relu_y.unwrap_or(dy));
    per_channel(op, x, &[gamma, mean, stat, dgamma, dbeta])?;
    check_outputs(op, &[dx, dgamma, dbeta], &[x, dy, gamma, mean, stat])?;
    let g = Geo::of(x)?;
    let flag = u32::from(eval);
    let total = x.shape().numel()?;
    let items = g.n * g.c * g.nchunk;
    let part = g.partials(ctx, 2)?;
    let coef = Tensor::empty(
        ctx,
        Shape5::new(1, 1, 1, g.c, 4),
        "batchnorm dx coefficients",
    )?;
    launch(
        ctx,
        rec,
        key("bn_grad_partial"),
        SRC,
        &[
            Arg::Read(x),
            Arg::Read(dy),
            Arg::Read(mean),
            Arg::Write(&part),
            Arg::Read(y),
        ],
        &g.params_relu(items, flag, eps, relu)?,
        items * 64,
    )?;
    launch(
        ctx,
        rec,
        key("bn_grad_finalize"),
        SRC,
        &[
            Arg::Read(&part),
            Arg::Read(gamma),
            Arg::Read(mean),
            Arg::Read(stat),
            Arg::Write(dgamma),
            Arg::Write(dbeta),
            Arg::Write(&coef),
        ],
        &g.params(g.c, flag, eps, 0.0, 1.0)?,
        g.c,
    )?;
    launch(
        ctx,
        rec,
        key("bn_grad_input"),
        SRC,
        &[
            Arg::Read(x),
            Arg::Read(dy),
            Arg::Read(&coef),
            Arg::Write(dx),
            Arg::Read(y),
        ],
        &g.params_relu(total, flag, eps, relu)?,
        total,
    )
}

/// Records the training-mode backward pass (batch statistics depend on `x`):
/// `dbeta = Σ dy`, `dgamma = Σ dy·x̂`, `dx = gamma·invstd/M · (M·dy − dbeta − x̂·dgamma)`
/// with `x̂ = (x − save_mean)·save_invstd`, `M = N·D·H·W`. All outputs are overwritten.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_backward(
    ctx: &GpuContext,
    rec: &mut Recorder,
    x: &Tensor,
    dy: &Tensor,
    gamma: &Tensor,
    save_mean: &Tensor,
    save_invstd: &Tensor,
    dx: &Tensor,
    dgamma: &Tensor,
    dbeta: &Tensor,
) -> Result<()> {
    backward(
        "batchnorm_backward",
        ctx,
        rec,
        x,
        dy,
        gamma,
        save_mean,
        save_invstd,
        1.0,
        false,
        None,
        dx,
        dgamma,
        dbeta,
    )
}

/// The training backward of [`batchnorm_relu_train_forward`] from its output `y`: the
/// same as [`batchnorm_backward`] of `dy` masked to `y > 0`, in the same passes.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_relu_backward(
    ctx: &GpuContext,
    rec: &mut Recorder,
    x: &Tensor,
    y: &Tensor,
    dy: &Tensor,
    gamma: &Tensor,
    save_mean: &Tensor,
    save_invstd: &Tensor,
    dx: &Tensor,
    dgamma: &Tensor,
    dbeta: &Tensor,
) -> Result<()> {
    backward(
        "batchnorm_relu_backward",
        ctx,
        rec,
        x,
        dy,
        gamma,
        save_mean,
        save_invstd,
        1.0,
        false,
        Some(y),
        dx,
        dgamma,
        dbeta,
    )
}

/// Records the eval-mode backward pass (running statistics are constants):
/// `dx = gamma·invstd·dy`, `dgamma = Σ dy·x̂`, `dbeta = Σ dy` with
/// `x̂ = (x − running_mean)·invstd`, `invstd = 1/sqrt(running_var + eps)`. All outputs
/// are overwritten.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_eval_backward(
    ctx: &GpuContext,
    rec: &mut Recorder,
    x: &Tensor,
    dy: &Tensor,
    gamma: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f32,
    dx: &Tensor,
    dgamma: &Tensor,
    dbeta: &Tensor,
) -> Result<()> {
    let op = "batchnorm_eval_backward";
    check_eps(op, eps)?;
    backward(
        op,
        ctx,
        rec,
        x,
        dy,
        gamma,
        running_mean,
        running_var,
        eps,
        true,
        None,
        dx,
        dgamma,
        dbeta,
    )
}

/// Outputs must be distinct tensors, none of them also an input (a buffer bound both
/// read-only and writable in one dispatch is invalid, and in-place use would race).
fn check_outputs(op: &str, outputs: &[&Tensor], inputs: &[&Tensor]) -> Result<()> {
    for (i, o) in outputs.iter().enumerate() {
        let clash = outputs[i + 1..]
            .iter()
            .chain(inputs.iter())
            .find(|t| t.buffer() == o.buffer());
        if let Some(t) = clash {
            return Err(Error::InvalidArgument(format!(
                "{op}: output '{}' shares its buffer with '{}' (in-place batch norm is not \
                 supported; pass distinct tensors)",
                o.name, t.name
            )));
        }
    }
    Ok(())
}

/// Folds an eval-mode batch norm into the preceding convolution:
/// `w'[co] = w[co]·gamma/sqrt(var+eps)`, `b' = beta + (b − mean)·gamma/sqrt(var+eps)`.
///
/// `weight` is `[Cout, ...]` row-major (`Cout` = `gamma.len()`); a missing conv bias is
/// zero. Computed in f64, returned as f32.
pub fn batchnorm_fold(
    weight: &[f32],
    bias: Option<&[f32]>,
    gamma: &[f32],
    beta: &[f32],
    mean: &[f32],
    var: &[f32],
    eps: f32,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let op = "batchnorm_fold";
    check_eps(op, eps)?;
    let cout = gamma.len();
    let lens = [
        ("beta", beta.len()),
        ("mean", mean.len()),
        ("var", var.len()),
        ("bias", bias.map_or(cout, |b| b.len())),
    ];
    if let Some((name, len)) = lens.iter().find(|(_, l)| *l != cout) {
        return Err(Error::Shape(format!(
            "{op}: {name} has {len} values but gamma has {cout}"
        )));
    }
    if cout == 0 || weight.is_empty() || !weight.len().is_multiple_of(cout) {
        return Err(Error::Shape(format!(
            "{op}: weight has {} values, not a positive multiple of Cout = {cout}",
            weight.len()
        )));
    }
    let per = weight.len() / cout;
    let mut w = Vec::with_capacity(weight.len());
    let mut b = Vec::with_capacity(cout);
    for co in 0..cout {
        let scale = f64::from(gamma[co]) / (f64::from(var[co]) + f64::from(eps)).sqrt();
        w.extend(
            weight[co * per..(co + 1) * per]
                .iter()
                .map(|&v| (f64::from(v) * scale) as f32),
        );
        let b0 = bias.map_or(0.0, |b| f64::from(b[co]));
        b.push((f64::from(beta[co]) + (b0 - f64::from(mean[co])) * scale) as f32);
    }
    Ok((w, b))
}

/// Result of [`batchnorm_train_forward_f64`].
#[derive(Clone, Debug)]
pub struct BatchNormTrainF64 {
    /// Normalised output.
    pub y: Array5<f64>,
    /// Batch mean per channel.
    pub mean: Vec<f64>,
    /// `1 / sqrt(biased batch variance + eps)` per channel.
    pub invstd: Vec<f64>,
    /// Updated running mean.
    pub running_mean: Vec<f64>,
    /// Updated running variance.
    pub running_var: Vec<f64>,
}

/// Gradients from [`batchnorm_backward_f64`] / [`batchnorm_eval_backward_f64`].
#[derive(Clone, Debug)]
pub struct BatchNormGradsF64 {
    /// dL/dx.
    pub dx: Array5<f64>,
    /// dL/dgamma per channel.
    pub dgamma: Vec<f64>,
    /// dL/dbeta per channel.
    pub dbeta: Vec<f64>,
}

/// Values of channel `c` (all n, d, h, w) in order.
fn channel_values(x: &Array5<f64>, c: usize) -> Vec<f64> {
    let s = x.shape();
    let mut v = Vec::new();
    for n in 0..s[0] {
        for d in 0..s[2] {
            for h in 0..s[3] {
                for w in 0..s[4] {
                    v.push(x[[n, c, d, h, w]]);
                }
            }
        }
    }
    v
}

/// CPU reference of [`batchnorm_train_forward`] (plain loops, f64).
pub fn batchnorm_train_forward_f64(
    x: &Array5<f64>,
    gamma: &[f64],
    beta: &[f64],
    running_mean: &[f64],
    running_var: &[f64],
    spec: &BatchNormSpec,
) -> BatchNormTrainF64 {
    let cs = x.shape()[1];
    let eps = f64::from(spec.eps);
    let mom = f64::from(spec.momentum);
    let mut out = BatchNormTrainF64 {
        y: x.clone(),
        mean: vec![0.0; cs],
        invstd: vec![0.0; cs],
        running_mean: vec![0.0; cs],
        running_var: vec![0.0; cs],
    };
    for c in 0..cs {
        let v = channel_values(x, c);
        let m = v.len() as f64;
        let mean = v.iter().sum::<f64>() / m;
        let var = v.iter().map(|a| (a - mean) * (a - mean)).sum::<f64>() / m;
        let invstd = 1.0 / (var + eps).sqrt();
        out.mean[c] = mean;
        out.invstd[c] = invstd;
        let run_var = if spec.unbiased_running_var {
            var * m / (m - 1.0)
        } else {
            var
        };
        out.running_mean[c] = mom * running_mean[c] + (1.0 - mom) * mean;
        out.running_var[c] = mom * running_var[c] + (1.0 - mom) * run_var;
    }
    for ((_, c, _, _, _), y) in out.y.indexed_iter_mut() {
        *y = gamma[c] * (*y - out.mean[c]) * out.invstd[c] + beta[c];
    }
    out
}

/// CPU reference of [`batchnorm_eval_forward`] (f64).
pub fn batchnorm_eval_forward_f64(
    x: &Array5<f64>,
    gamma: &[f64],
    beta: &[f64],
    running_mean: &[f64],
    running_var: &[f64],
    eps: f64,
) -> Array5<f64> {
    let mut y = x.clone();
    for ((_, c, _, _, _), v) in y.indexed_iter_mut() {
        *v = gamma[c] * (*v - running_mean[c]) / (running_var[c] + eps).sqrt() + beta[c];
    }
    y
}

/// CPU reference of [`batchnorm_backward`] (training mode, f64) from the saved batch
/// mean and invstd.
pub fn batchnorm_backward_f64(
    x: &Array5<f64>,
    dy: &Array5<f64>,
    gamma: &[f64],
    mean: &[f64],
    invstd: &[f64],
) -> BatchNormGradsF64 {
    let s = x.shape();
    let cs = s[1];
    let m = (s[0] * s[2] * s[3] * s[4]) as f64;
    let mut dgamma = vec![0.0; cs];
    let mut dbeta = vec![0.0; cs];
    for ((_, c, _, _, _), &g) in dy.indexed_iter() {
        dbeta[c] += g;
    }
    for (((_, c, _, _, _), &g), &xv) in dy.indexed_iter().zip(x.iter()) {
        dgamma[c] += g * (xv - mean[c]) * invstd[c];
    }
    let mut dx = x.clone();
    for (((_, c, _, _, _), v), &g) in dx.indexed_iter_mut().zip(dy.iter()) {
        let xhat = (*v - mean[c]) * invstd[c];
        *v = gamma[c] * invstd[c] / m * (m * g - dbeta[c] - xhat * dgamma[c]);
    }
    BatchNormGradsF64 { dx, dgamma, dbeta }
}

/// CPU reference of [`batchnorm_eval_backward`] (f64).
pub fn batchnorm_eval_backward_f64(
    x: &Array5<f64>,
    dy: &Array5<f64>,
    gamma: &[f64],
    running_mean: &[f64],
    running_var: &[f64],
    eps: f64,
) -> BatchNormGradsF64 {
    let cs = x.shape()[1];
    let invstd: Vec<f64> = running_var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    let mut dgamma = vec![0.0; cs];
    let mut dbeta = vec![0.0; cs];
    let mut dx = x.clone();
    for (((_, c, _, _, _), v), &g) in dx.indexed_iter_mut().zip(dy.iter()) {
        dbeta[c] += g;
        dgamma[c] += g * (*v - running_mean[c]) * invstd[c];
        *v = gamma[c] * invstd[c] * g;
    }
    BatchNormGradsF64 { dx, dgamma, dbeta }
}

/// Every shader of this family (for the portability test).
pub fn shader_variants() -> Vec<(String, String)> {
    vec![("batchnorm".to_string(), SRC.to_string())]
}
