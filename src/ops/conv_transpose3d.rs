//! 3-D transposed convolution (PyTorch `ConvTranspose3d` weight layout
//! `[Cin, Cout, kd, kh, kw]`), derived entirely from the convolution:
//! - forward = the input gradient of the convolution it transposes
//!   (`conv3d_backward::transposed_conv`, with a bias epilogue);
//! - input gradient = that convolution's forward;
//! - weight gradient = that convolution's weight gradient with the roles of input and
//!   gradient swapped.
//!
//! The geometry is written as the convolution that maps the output back to the input.
//! Keras "same" (the paper's up-sampling, n -> n*s): padding `max(k - s, 0)` split with
//! the smaller half first, i.e. k=2 s=2 has none and k=3 s=2 pads one voxel at the end,
//! which equals PyTorch k=3 s=2 p=0 with the last voxel per axis dropped.

use crate::error::{Error, Result};
use crate::gpu::{GpuContext, Recorder};
use crate::ops::conv3d::{conv3d_check, conv3d_forward, Conv3dSpec, Conv3dVariant};
use crate::ops::conv3d_backward::{
    conv3d_backward_bias, conv3d_backward_weight, conv3d_backward_weight_f64, transposed_conv,
};
use crate::tensor::{ChannelSlice, Shape5, Tensor};
use ndarray::Array5;

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
        }
    }

    /// PyTorch `ConvTranspose3d(kernel, stride, padding, output_padding)`.
    pub fn torch(stride: [usize; 3], padding: [usize; 3], output_padding: [usize; 3]) -> Self {
        Self {
            stride,
            pad_lo: padding,
            pad_hi: padding,
            output_padding,
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

/// Records `output[:, range] = conv_transpose3d(input[:, range], weight) + bias`.
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
    let bias_len = bias.map(|b| b.shape().numel()).transpose()?;
    let expect = conv_transpose3d_check(
        input.tensor.shape(),
        input.count,
        weight.shape(),
        bias_len,
        spec,
    )?;
    check_output("conv_transpose3d", expect, &output, &input)?;
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

/// The gather-form kernel used by BuiNet's grouped up-sampling (launched from
/// `nn::buinet` for now; it belongs here once the stride-2 path is phase-decomposed).
pub fn shader_variants() -> Vec<(String, String)> {
    vec![(
        "conv_transpose3d_gather".to_string(),
        include_str!("../../shaders/conv_transpose3d_gather.wgsl").to_string(),
    )]
}
