//! Upsampling of NCDHW volumes by an integer factor per axis (D, H, W), nearest and
//! trilinear, forward and backward, for the DU-Net decoder.
//!
//! Output extents are `(D*sd, H*sh, W*sw)`. Semantics follow PyTorch
//! `nn.Upsample(scale_factor=(sd, sh, sw))`:
//! - nearest: output `o` reads input `floor(o / s)` on each axis;
//! - trilinear, `align_corners=False`: on each axis the source coordinate is
//!   `src = max((o + 0.5) / s - 0.5, 0)`, the neighbours are `i0 = floor(src)` and
//!   `i1 = min(i0 + 1, n - 1)` (clamped to the edge), with weights `1 - l` and `l`,
//!   `l = src - i0`; the output is the product of the three axes' weights applied to the
//!   eight neighbours. E.g. the line `[0, 1]` upsampled x2 gives `[0, 0.25, 0.75, 1]`.
//!
//! Backward passes are gathers (one invocation per input voxel sums over the output
//! voxels whose interpolation uses it, recomputing the weights): deterministic, no
//! atomics. Gradients overwrite `dx`.

use crate::error::{Error, Result};
use crate::gpu::{GpuContext, PipelineKey, Recorder};
use crate::ops::conv3d::u32s;
use crate::ops::params::{launch, Arg};
use crate::tensor::{Shape5, Tensor};
use ndarray::Array5;

const SRC: &str = include_str!("../../shaders/upsample.wgsl");

/// Shape of `x` upsampled by `scale` (D, H, W factors), or why that is invalid.
pub fn upsample_output_shape(x: Shape5, scale: [usize; 3]) -> Result<Shape5> {
    if scale.contains(&0) {
        return Err(Error::InvalidArgument(format!(
            "upsample: scale factors {scale:?} must be at least 1 on every axis"
        )));
    }
    let [d, h, w] = x.spatial();
    let mul = |n: usize, s: usize| {
        n.checked_mul(s)
            .ok_or_else(|| Error::Shape(format!("upsample: {x} times {scale:?} overflows")))
    };
    let out = Shape5::new(
        x.n(),
        x.c(),
        mul(d, scale[0])?,
        mul(h, scale[1])?,
        mul(w, scale[2])?,
    );
    out.numel()?;
    Ok(out)
}

/// Validates `small` (input side) against `big` (output side); returns the uniform.
fn check(
    op: &str,
    small: &Tensor,
    big: &Tensor,
    scale: [usize; 3],
    threads: usize,
) -> Result<Vec<u32>> {
    if std::ptr::eq(small, big) {
        return Err(Error::InvalidArgument(format!(
            "{op}: '{}' is passed twice; input and output must be distinct tensors",
            small.name
        )));
    }
    let want = upsample_output_shape(small.shape(), scale).map_err(|e| match e {
        Error::InvalidArgument(m) => Error::InvalidArgument(format!("{op}: {m}")),
        Error::Shape(m) => Error::Shape(format!("{op}: {m}")),
        other => other,
    })?;
    if big.shape() != want {
        return Err(Error::Shape(format!(
            "{op}: '{}' is {} but '{}' {} upsampled by {scale:?} is {want}",
            big.name,
            big.shape(),
            small.name,
            small.shape()
        )));
    }
    let [id, ih, iw] = small.shape().spatial();
    u32s(&[big.shape().numel()?])?;
    u32s(&[threads, id, ih, iw, scale[0], scale[1], scale[2], 0])
}

fn run(
    ctx: &GpuContext,
    rec: &mut Recorder,
    entry: &'static str,
    input: &Tensor,
    output: &Tensor,
    params: &[u32],
    threads: usize,
) -> Result<()> {
    launch(
        ctx,
        rec,
        PipelineKey::new("upsample", entry),
        SRC,
        &[Arg::Read(input), Arg::Write(output)],
        params,
        threads,
    )
}

/// Records `y = upsample_nearest(x, scale)`; `y` is `(N, C, D*sd, H*sh, W*sw)`.
pub fn upsample_nearest_forward(
    ctx: &GpuContext,
    rec: &mut Recorder,
    x: &Tensor,
    y: &Tensor,
    scale: [usize; 3],
) -> Result<()> {
    let threads = y.shape().numel()?;
    let params = check("upsample_nearest_forward", x, y, scale, threads)?;
    run(ctx, rec, "nearest_forward", x, y, &params, threads)
}

/// Records `dx` = sum of `dy` over each input voxel's `sd x sh x sw` output block.
pub fn upsample_nearest_backward(
    ctx: &GpuContext,
    rec: &mut Recorder,
    dy: &Tensor,
    dx: &Tensor,
    scale: [usize; 3],
) -> Result<()> {
    let threads = dx.shape().numel()?;
    let params = check("upsample_nearest_backward", dx, dy, scale, threads)?;
    run(ctx, rec, "nearest_backward", dy, dx, &params, threads)
}

/// Records `y = upsample_trilinear(x, scale)` (`align_corners=False`).
pub fn upsample_trilinear_forward(
    ctx: &GpuContext,
    rec: &mut Recorder,
    x: &Tensor,
    y: &Tensor,
    scale: [usize; 3],
) -> Result<()> {
    let threads = y.shape().numel()?;
    let params = check("upsample_trilinear_forward", x, y, scale, threads)?;
    run(ctx, rec, "trilinear_forward", x, y, &params, threads)
}

/// Records `dx` = sum over outputs of interpolation weight * `dy` (gather form).
pub fn upsample_trilinear_backward(
    ctx: &GpuContext,
    rec: &mut Recorder,
    dy: &Tensor,
    dx: &Tensor,
    scale: [usize; 3],
) -> Result<()> {
    let threads = dx.shape().numel()?;
    let params = check("upsample_trilinear_backward", dx, dy, scale, threads)?;
    run(ctx, rec, "trilinear_backward", dy, dx, &params, threads)
}

// ---------------------------------------------------------------------------------
// CPU references (f64, plain loops).

fn dims5(a: &Array5<f64>) -> [usize; 5] {
    let s = a.shape();
    [s[0], s[1], s[2], s[3], s[4]]
}

fn check_scale(op: &str, scale: [usize; 3]) -> Result<()> {
    if scale.contains(&0) {
        return Err(Error::InvalidArgument(format!(
            "{op}: scale factors {scale:?} must be at least 1 on every axis"
        )));
    }
    Ok(())
}

/// Input extents of a gradient `dy` upsampled by `scale`.
fn input_dims(op: &str, dy: &Array5<f64>, scale: [usize; 3]) -> Result<[usize; 3]> {
    check_scale(op, scale)?;
    let [_, _, d, h, w] = dims5(dy);
    if d % scale[0] != 0 || h % scale[1] != 0 || w % scale[2] != 0 {
        return Err(Error::Shape(format!(
            "{op}: dy {:?} is not a multiple of the scale {scale:?}",
            dy.shape()
        )));
    }
    Ok([d / scale[0], h / scale[1], w / scale[2]])
}

/// PyTorch's `align_corners=False` source index and weights along one axis:
/// `(i0, i1, w0, w1)`.
pub fn linear_source_f64(o: usize, s: usize, n: usize) -> (usize, usize, f64, f64) {
    let src = ((o as f64 + 0.5) / s as f64 - 0.5).max(0.0);
    let last = n.saturating_sub(1);
    let i0 = (src.floor() as usize).min(last);
    let i1 = if i0 < last { i0 + 1 } else { i0 };
    let l1 = (src - i0 as f64).clamp(0.0, 1.0);
    (i0, i1, 1.0 - l1, l1)
}

/// CPU reference of [`upsample_nearest_forward`].
pub fn upsample_nearest_forward_f64(x: &Array5<f64>, scale: [usize; 3]) -> Result<Array5<f64>> {
    check_scale("upsample_nearest_forward_f64", scale)?;
    let [n, c, d, h, w] = dims5(x);
    let out = [n, c, d * scale[0], h * scale[1], w * scale[2]];
    Ok(Array5::from_shape_fn(out, |(b, ch, zd, zh, zw)| {
        x[[b, ch, zd / scale[0], zh / scale[1], zw / scale[2]]]
    }))
}

/// CPU reference of [`upsample_nearest_backward`]: scatters each `dy` to its source.
pub fn upsample_nearest_backward_f64(dy: &Array5<f64>, scale: [usize; 3]) -> Result<Array5<f64>> {
    let [d, h, w] = input_dims("upsample_nearest_backward_f64", dy, scale)?;
    let [n, c, ..] = dims5(dy);
    let mut dx = Array5::<f64>::zeros([n, c, d, h, w]);
    for ((b, ch, zd, zh, zw), &g) in dy.indexed_iter() {
        dx[[b, ch, zd / scale[0], zh / scale[1], zw / scale[2]]] += g;
    }
    Ok(dx)
}

/// CPU reference of [`upsample_trilinear_forward`].
pub fn upsample_trilinear_forward_f64(x: &Array5<f64>, scale: [usize; 3]) -> Result<Array5<f64>> {
    check_scale("upsample_trilinear_forward_f64", scale)?;
    let [n, c, d, h, w] = dims5(x);
    let out = [n, c, d * scale[0], h * scale[1], w * scale[2]];
    Ok(Array5::from_shape_fn(out, |(b, ch, zd, zh, zw)| {
        let (d0, d1, wd0, wd1) = linear_source_f64(zd, scale[0], d);
        let (h0, h1, wh0, wh1) = linear_source_f64(zh, scale[1], h);
        let (w0, w1, ww0, ww1) = linear_source_f64(zw, scale[2], w);
        let mut v = 0.0;
        for (id, wd) in [(d0, wd0), (d1, wd1)] {
            for (ih, wh) in [(h0, wh0), (h1, wh1)] {
                for (iw, ww) in [(w0, ww0), (w1, ww1)] {
                    v += wd * wh * ww * x[[b, ch, id, ih, iw]];
                }
            }
        }
        v
    }))
}

/// CPU reference of [`upsample_trilinear_backward`]: scatters each `dy`, times the
/// interpolation weights, to its eight neighbours.
pub fn upsample_trilinear_backward_f64(dy: &Array5<f64>, scale: [usize; 3]) -> Result<Array5<f64>> {
    let [d, h, w] = input_dims("upsample_trilinear_backward_f64", dy, scale)?;
    let [n, c, ..] = dims5(dy);
    let mut dx = Array5::<f64>::zeros([n, c, d, h, w]);
    for ((b, ch, zd, zh, zw), &g) in dy.indexed_iter() {
        let (d0, d1, wd0, wd1) = linear_source_f64(zd, scale[0], d);
        let (h0, h1, wh0, wh1) = linear_source_f64(zh, scale[1], h);
        let (w0, w1, ww0, ww1) = linear_source_f64(zw, scale[2], w);
        for (id, wd) in [(d0, wd0), (d1, wd1)] {
            for (ih, wh) in [(h0, wh0), (h1, wh1)] {
                for (iw, ww) in [(w0, ww0), (w1, ww1)] {
                    dx[[b, ch, id, ih, iw]] += wd * wh * ww * g;
                }
            }
        }
    }
    Ok(dx)
}

/// Every shader of this family (for the portability test).
pub fn shader_variants() -> Vec<(String, String)> {
    vec![("upsample".to_string(), SRC.to_string())]
}
