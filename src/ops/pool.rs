//! 3-D max and average pooling (NCDHW, each channel on its own), forward and backward,
//! for the DU-Net encoder's down-sampling.
//!
//! Conventions (PyTorch `MaxPool3d` / `AvgPool3d` with `ceil_mode=False`,
//! `dilation=1`):
//! - output size per axis `floor((n + 2p - k) / s) + 1`; zero or symmetric padding with
//!   `p <= k / 2` (as PyTorch), so every window holds at least one real voxel;
//! - padded positions never win a max and are **excluded** from averages
//!   (`count_include_pad = False`; note PyTorch's own default is `True`; both agree
//!   when `p = 0`);
//! - max ties go to the **first** voxel in scan order (d, then h, then w); a NaN beats
//!   every number and the first NaN of a window wins (the output is NaN, its gradient
//!   goes to that NaN voxel);
//! - `argmax` is an f32 tensor shaped like the output holding, per output element, the
//!   flat index `d*H*W + h*W + w` of the winning voxel within its (n, c) volume as an
//!   exact integer (so a volume may have at most 2^24 voxels).
//!
//! Backward passes are gathers (one invocation per input voxel, looping over the windows
//! that contain it), deterministic and free of atomics, valid for overlapping windows.

use crate::error::{Error, Result};
use crate::gpu::{GpuContext, PipelineKey, Recorder};
use crate::ops::conv3d::u32s;
use crate::ops::params::{launch, Arg};
use crate::tensor::{Shape5, Tensor};
use ndarray::Array5;

const SRC: &str = include_str!("../../shaders/pool.wgsl");

/// Sections of `shaders/pool.wgsl`, each compiled with the common part as one module.
const SECTIONS: [&str; 3] = ["maxpool_forward", "maxpool_backward", "avgpool"];

/// Largest (n, c) volume whose flat indices are exact in f32 (`argmax`).
pub const MAX_ARGMAX_VOXELS: usize = 1 << 24;

/// Window geometry of a 3-D pooling: kernel, stride and symmetric zero padding per axis
/// (D, H, W).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PoolSpec {
    /// Window extent per axis.
    pub kernel: [usize; 3],
    /// Step between windows per axis.
    pub stride: [usize; 3],
    /// Padding on each side per axis (at most `kernel / 2`).
    pub pad: [usize; 3],
}

impl PoolSpec {
    /// Kernel `k`, stride `s`, padding `p` on every axis.
    pub fn cube(k: usize, s: usize, p: usize) -> Self {
        Self {
            kernel: [k; 3],
            stride: [s; 3],
            pad: [p; 3],
        }
    }

    /// Output extents for input extents `input` (D, H, W), or why the spec does not fit.
    pub fn output_size(&self, input: [usize; 3]) -> Result<[usize; 3]> {
        let mut out = [0; 3];
        for a in 0..3 {
            let (k, s, p, n) = (self.kernel[a], self.stride[a], self.pad[a], input[a]);
            if k == 0 || s == 0 {
                return Err(Error::InvalidArgument(format!(
                    "pool: kernel {:?} and stride {:?} must be at least 1 on every axis",
                    self.kernel, self.stride
                )));
            }
            if p > k / 2 {
                return Err(Error::InvalidArgument(format!(
                    "pool: pad {:?} must be at most half the kernel {:?} on every axis",
                    self.pad, self.kernel
                )));
            }
            let padded = p
                .checked_mul(2)
                .and_then(|v| v.checked_add(n))
                .ok_or_else(|| Error::InvalidArgument(format!("pool: pad {p} is too large")))?;
            if n == 0 || k > padded {
                return Err(Error::Shape(format!(
                    "pool: kernel {:?} is larger than the padded input {:?} (pad {:?})",
                    self.kernel, input, self.pad
                )));
            }
            out[a] = (padded - k) / s + 1;
        }
        Ok(out)
    }

    /// Output shape for input shape `x` (same N and C).
    pub fn output_shape(&self, x: Shape5) -> Result<Shape5> {
        let [d, h, w] = self.output_size(x.spatial())?;
        Ok(Shape5::new(x.n(), x.c(), d, h, w))
    }
}

/// The WGSL of one section: the common part followed by that section.
fn section(name: &str) -> Result<String> {
    let mut parts = SRC.split("\n// @section ");
    let common = parts.next().unwrap_or_default();
    for part in parts {
        let (head, body) = part.split_once('\n').unwrap_or((part, ""));
        if head.trim() == name {
            return Ok(format!("{common}\n// section {name}\n{body}"));
        }
    }
    Err(Error::InvalidArgument(format!(
        "pool: shaders/pool.wgsl has no section '{name}'"
    )))
}

fn distinct(op: &str, ts: &[&Tensor]) -> Result<()> {
    for (i, a) in ts.iter().enumerate() {
        for b in &ts[i + 1..] {
            if std::ptr::eq(*a, *b) {
                return Err(Error::InvalidArgument(format!(
                    "{op}: '{}' is passed twice; inputs and outputs must be distinct tensors",
                    a.name
                )));
            }
        }
    }
    Ok(())
}

/// Checks that `big` (input side) and `small` (output side) fit `spec`; returns the
/// uniform parameters (`total` left at 0).
fn check(op: &str, big: &Tensor, small: &Tensor, spec: &PoolSpec) -> Result<Vec<u32>> {
    let want = spec
        .output_shape(big.shape())
        .map_err(|e| prefix(op, big, e))?;
    if small.shape() != want {
        return Err(Error::Shape(format!(
            "{op}: '{}' is {} but pooling '{}' {} with kernel {:?} stride {:?} pad {:?} \
             gives {want}",
            small.name,
            small.shape(),
            big.name,
            big.shape(),
            spec.kernel,
            spec.stride,
            spec.pad
        )));
    }
    u32s(&[big.shape().numel()?, small.shape().numel()?])?;
    let [id, ih, iw] = big.shape().spatial();
    let [od, oh, ow] = want.spatial();
    let [kd, kh, kw] = spec.kernel;
    let [sd, sh, sw] = spec.stride;
    let [pd, ph, pw] = spec.pad;
    u32s(&[
        0, id, ih, iw, od, oh, ow, kd, kh, kw, sd, sh, sw, pd, ph, pw,
    ])
}

fn prefix(op: &str, t: &Tensor, e: Error) -> Error {
    match e {
        Error::Shape(m) => Error::Shape(format!("{op} on '{}' {}: {m}", t.name, t.shape())),
        Error::InvalidArgument(m) => {
            Error::InvalidArgument(format!("{op} on '{}' {}: {m}", t.name, t.shape()))
        }
        other => other,
    }
}

fn check_argmax_volume(op: &str, x: &Tensor) -> Result<()> {
    if x.shape().voxels() > MAX_ARGMAX_VOXELS {
        return Err(Error::Limit(format!(
            "{op}: '{}' {} has {} voxels per channel; argmax indices are exact f32 only up \
             to {MAX_ARGMAX_VOXELS} voxels",
            x.name,
            x.shape(),
            x.shape().voxels()
        )));
    }
    Ok(())
}

fn run(
    ctx: &GpuContext,
    rec: &mut Recorder,
    sec: &str,
    entry: &'static str,
    args: &[Arg<'_>],
    mut params: Vec<u32>,
    threads: usize,
) -> Result<()> {
    params[0] = u32s(&[threads])?[0];
    let src = section(sec)?;
    launch(
        ctx,
        rec,
        PipelineKey::new("pool", entry),
        &src,
        args,
        &params,
        threads,
    )
}

/// Records `y = maxpool(x)` and `argmax` (winning flat index per output, exact f32).
pub fn maxpool3d_forward(
    ctx: &GpuContext,
    rec: &mut Recorder,
    x: &Tensor,
    y: &Tensor,
    argmax: &Tensor,
    spec: &PoolSpec,
) -> Result<()> {
    let op = "maxpool3d_forward";
    distinct(op, &[x, y, argmax])?;
    check_argmax_volume(op, x)?;
    let params = check(op, x, y, spec)?;
    if argmax.shape() != y.shape() {
        return Err(Error::Shape(format!(
            "{op}: argmax '{}' is {} but output '{}' is {}; they must match",
            argmax.name,
            argmax.shape(),
            y.name,
            y.shape()
        )));
    }
    let threads = y.shape().numel()?;
    run(
        ctx,
        rec,
        "maxpool_forward",
        "maxpool_forward",
        &[Arg::Read(x), Arg::Write(y), Arg::Write(argmax)],
        params,
        threads,
    )
}

/// Records `dx[i] = sum of dy over the windows whose argmax is i` (dx is overwritten).
pub fn maxpool3d_backward(
    ctx: &GpuContext,
    rec: &mut Recorder,
    dy: &Tensor,
    argmax: &Tensor,
    dx: &Tensor,
    spec: &PoolSpec,
) -> Result<()> {
    let op = "maxpool3d_backward";
    distinct(op, &[dy, argmax, dx])?;
    check_argmax_volume(op, dx)?;
    let params = check(op, dx, dy, spec)?;
    if argmax.shape() != dy.shape() {
        return Err(Error::Shape(format!(
            "{op}: argmax '{}' is {} but gradient '{}' is {}; they must match",
            argmax.name,
            argmax.shape(),
            dy.name,
            dy.shape()
        )));
    }
    let threads = dx.shape().numel()?;
    run(
        ctx,
        rec,
        "maxpool_backward",
        "maxpool_backward",
        &[Arg::Read(dy), Arg::Read(argmax), Arg::Write(dx)],
        params,
        threads,
    )
}

/// Records `y = avgpool(x)` (mean over the real voxels of each window).
pub fn avgpool3d_forward(
    ctx: &GpuContext,
    rec: &mut Recorder,
    x: &Tensor,
    y: &Tensor,
    spec: &PoolSpec,
) -> Result<()> {
    let op = "avgpool3d_forward";
    distinct(op, &[x, y])?;
    let params = check(op, x, y, spec)?;
    let threads = y.shape().numel()?;
    run(
        ctx,
        rec,
        "avgpool",
        "avgpool_forward",
        &[Arg::Read(x), Arg::Write(y)],
        params,
        threads,
    )
}

/// Records `dx[i] = sum of dy[o] / count(o)` over the windows `o` containing `i`
/// (dx is overwritten).
pub fn avgpool3d_backward(
    ctx: &GpuContext,
    rec: &mut Recorder,
    dy: &Tensor,
    dx: &Tensor,
    spec: &PoolSpec,
) -> Result<()> {
    let op = "avgpool3d_backward";
    distinct(op, &[dy, dx])?;
    let params = check(op, dx, dy, spec)?;
    let threads = dx.shape().numel()?;
    run(
        ctx,
        rec,
        "avgpool",
        "avgpool_backward",
        &[Arg::Read(dy), Arg::Write(dx)],
        params,
        threads,
    )
}

// ---------------------------------------------------------------------------------
// CPU references (f64, plain loops).

fn dims5(a: &Array5<f64>) -> [usize; 5] {
    let s = a.shape();
    [s[0], s[1], s[2], s[3], s[4]]
}

/// Input range `[lo, hi)` of window `o` along one axis (padding clipped away).
fn window_cpu(o: usize, k: usize, s: usize, p: usize, n: usize) -> (usize, usize) {
    let start = (o * s) as i64 - p as i64;
    let lo = start.max(0) as usize;
    let hi = (start + k as i64).min(n as i64) as usize;
    (lo, hi)
}

/// One pooling window: its output index and the real input voxels it covers.
type Window = ([usize; 3], Vec<[usize; 3]>);

/// Windows (output index triples, with their real voxels) of an input of `size`.
fn windows(size: [usize; 3], spec: &PoolSpec) -> Result<Vec<Window>> {
    let out = spec.output_size(size)?;
    let mut v = Vec::new();
    for od in 0..out[0] {
        for oh in 0..out[1] {
            for ow in 0..out[2] {
                let o = [od, oh, ow];
                let r: Vec<(usize, usize)> = (0..3)
                    .map(|a| window_cpu(o[a], spec.kernel[a], spec.stride[a], spec.pad[a], size[a]))
                    .collect();
                let mut cells = Vec::new();
                for d in r[0].0..r[0].1 {
                    for h in r[1].0..r[1].1 {
                        for w in r[2].0..r[2].1 {
                            cells.push([d, h, w]);
                        }
                    }
                }
                v.push((o, cells));
            }
        }
    }
    Ok(v)
}

/// CPU reference of [`maxpool3d_forward`]: `(y, argmax)` with argmax as flat
/// `d*H*W + h*W + w` indices (first index on ties, first NaN wins).
pub fn maxpool3d_forward_f64(
    x: &Array5<f64>,
    spec: &PoolSpec,
) -> Result<(Array5<f64>, Array5<usize>)> {
    let [n, c, d, h, w] = dims5(x);
    let [od, oh, ow] = spec.output_size([d, h, w])?;
    let mut y = Array5::<f64>::zeros([n, c, od, oh, ow]);
    let mut am = Array5::<usize>::zeros([n, c, od, oh, ow]);
    let wins = windows([d, h, w], spec)?;
    for b in 0..n {
        for ch in 0..c {
            for (o, cells) in &wins {
                let mut best: Option<(f64, usize)> = None;
                for &[zd, zh, zw] in cells {
                    let v = x[[b, ch, zd, zh, zw]];
                    let idx = (zd * h + zh) * w + zw;
                    best = match best {
                        None => Some((v, idx)),
                        Some((bv, _)) if !bv.is_nan() && (v.is_nan() || v > bv) => Some((v, idx)),
                        keep => keep,
                    };
                }
                let (bv, bi) = best.ok_or_else(|| {
                    Error::InvalidArgument("maxpool3d_forward_f64: empty window".into())
                })?;
                y[[b, ch, o[0], o[1], o[2]]] = bv;
                am[[b, ch, o[0], o[1], o[2]]] = bi;
            }
        }
    }
    Ok((y, am))
}

/// CPU reference of [`maxpool3d_backward`]: scatters each `dy` to its argmax voxel of
/// an input with spatial extents `input`.
pub fn maxpool3d_backward_f64(
    dy: &Array5<f64>,
    argmax: &Array5<usize>,
    input: [usize; 3],
    spec: &PoolSpec,
) -> Result<Array5<f64>> {
    let [n, c, od, oh, ow] = dims5(dy);
    if spec.output_size(input)? != [od, oh, ow] || argmax.shape() != dy.shape() {
        return Err(Error::Shape(format!(
            "maxpool3d_backward_f64: dy {:?} / argmax {:?} do not fit input {input:?}",
            dy.shape(),
            argmax.shape()
        )));
    }
    let [d, h, w] = input;
    let mut dx = Array5::<f64>::zeros([n, c, d, h, w]);
    for ((b, ch, zd, zh, zw), &g) in dy.indexed_iter() {
        let i = argmax[[b, ch, zd, zh, zw]];
        if i >= d * h * w {
            return Err(Error::InvalidArgument(format!(
                "maxpool3d_backward_f64: argmax {i} is outside the {input:?} volume"
            )));
        }
        dx[[b, ch, i / (h * w), (i / w) % h, i % w]] += g;
    }
    Ok(dx)
}

/// CPU reference of [`avgpool3d_forward`] (padding excluded from the count).
pub fn avgpool3d_forward_f64(x: &Array5<f64>, spec: &PoolSpec) -> Result<Array5<f64>> {
    let [n, c, d, h, w] = dims5(x);
    let [od, oh, ow] = spec.output_size([d, h, w])?;
    let mut y = Array5::<f64>::zeros([n, c, od, oh, ow]);
    let wins = windows([d, h, w], spec)?;
    for b in 0..n {
        for ch in 0..c {
            for (o, cells) in &wins {
                let s: f64 = cells
                    .iter()
                    .map(|&[zd, zh, zw]| x[[b, ch, zd, zh, zw]])
                    .sum();
                y[[b, ch, o[0], o[1], o[2]]] = s / cells.len() as f64;
            }
        }
    }
    Ok(y)
}

/// CPU reference of [`avgpool3d_backward`]: scatters `dy / count` over each window of
/// an input with spatial extents `input`.
pub fn avgpool3d_backward_f64(
    dy: &Array5<f64>,
    input: [usize; 3],
    spec: &PoolSpec,
) -> Result<Array5<f64>> {
    let [n, c, od, oh, ow] = dims5(dy);
    if spec.output_size(input)? != [od, oh, ow] {
        return Err(Error::Shape(format!(
            "avgpool3d_backward_f64: dy {:?} does not fit input {input:?}",
            dy.shape()
        )));
    }
    let [d, h, w] = input;
    let mut dx = Array5::<f64>::zeros([n, c, d, h, w]);
    let wins = windows(input, spec)?;
    for b in 0..n {
        for ch in 0..c {
            for (o, cells) in &wins {
                let g = dy[[b, ch, o[0], o[1], o[2]]] / cells.len() as f64;
                for &[zd, zh, zw] in cells {
                    dx[[b, ch, zd, zh, zw]] += g;
                }
            }
        }
    }
    Ok(dx)
}

/// Every shader of this family (for the portability test): one module per section.
pub fn shader_variants() -> Vec<(String, String)> {
    SECTIONS
        .iter()
        .filter_map(|s| section(s).ok().map(|src| (format!("pool {s}"), src)))
        .collect()
}
