//! A 1x1x1 conv whose result only feeds convolutions over channel ranges of it (a
//! DenseNet bottleneck feeding a fused MixACB's groups, in inference): the pointwise
//! kernel stores its result straight in the packed layout those convolutions read
//! (`shaders/conv3d_pointwise.wgsl`, packed output), so there is no NCDHW intermediate
//! and no packing pass. One packing serves every reader: it is padded for the widest
//! kernel and each conv starts reading at its own offset (`PackedConv::in_off`) and
//! 4-channel group (`PackedConv::in_c4`).

use crate::error::{Error, Result};
use crate::gpu::{GpuContext, Recorder};
use crate::ops::conv3d::{
    conv3d_check, conv3d_forward, conv3d_forward_choice, conv_packed, packed_weight,
    subgroup_size_for, tile_for, Conv3dSpec, Conv3dVariant, ConvKernel, PackedConv,
};
use crate::ops::conv3d_pointwise::{self, conv_pointwise_to, PointwiseOut};
use crate::tensor::{ChannelSlice, Shape5, Tensor};

/// One convolution reading channels `in_offset ..` (its weight's Cin of them) of the
/// pointwise result and writing `output`.
pub struct ChainedConv<'a> {
    /// First channel of the pointwise result it reads.
    pub in_offset: usize,
    /// `[Cout, Cin, kd, kh, kw]`.
    pub weight: &'a Tensor,
    /// `Cout` values.
    pub bias: Option<&'a Tensor>,
    /// Geometry, ReLU.
    pub spec: Conv3dSpec,
    /// Where it writes.
    pub output: ChannelSlice<'a>,
}

/// Records `y = pointwise(input) (+ bias) (ReLU per spec)` and then every `convs[i]` on
/// its channel range of `y`, all with `variant` (`Auto`: the tuner's choice per conv).
/// Runs the fused form when every kernel is register-tiled (not the GEMM family), each
/// range starts and ends on a 4-channel boundary (or ends at the last channel), no
/// reader is itself 1x1x1, the pointwise tile is a multiple of 4 channels and W and the
/// voxel count are multiples of 4; otherwise `y` is a temporary and each conv runs as
/// usual (same results). Returns whether the fused form ran.
#[allow(clippy::too_many_arguments)]
pub fn pointwise_into_convs(
    ctx: &GpuContext,
    rec: &mut Recorder,
    input: ChannelSlice<'_>,
    weight: &Tensor,
    bias: Option<&Tensor>,
    spec: &Conv3dSpec,
    convs: &[ChainedConv<'_>],
    variant: Conv3dVariant,
) -> Result<bool> {
    let s = input.tensor.shape();
    let cout = weight.shape().0[0];
    let bias_len = |b: Option<&Tensor>| b.map(|b| b.shape().numel()).transpose();
    let yshape = conv3d_check(
        s,
        (input.offset, input.count),
        weight.shape(),
        bias_len(bias)?,
        spec,
    )?;
    let [_, _, kd, kh, kw] = weight.shape().0;
    if [kd, kh, kw] != [1; 3]
        || spec.stride != [1; 3]
        || spec.pad_lo != [0; 3]
        || spec.pad_hi != [0; 3]
    {
        return Err(Error::InvalidArgument(format!(
            "pointwise_into_convs: '{}' {} is not a 1x1x1 stride-1 unpadded conv",
            weight.name,
            weight.shape()
        )));
    }
    for c in convs {
        let cin = c.weight.shape().0[1];
        if c.in_offset + cin > cout {
            return Err(Error::Shape(format!(
                "pointwise_into_convs: '{}' reads channels {}..{} of a {cout}-channel result",
                c.weight.name,
                c.in_offset,
                c.in_offset + cin
            )));
        }
        let expect = conv3d_check(
            yshape,
            (c.in_offset, cin),
            c.weight.shape(),
            bias_len(c.bias)?,
            &c.spec,
        )?;
        let o = c.output.tensor.shape();
        if c.output.count != expect.c() || o.n() != expect.n() || o.spatial() != expect.spatial() {
            return Err(Error::Shape(format!(
                "pointwise_into_convs: output '{}' {o} channels {}..{} do not fit the \
                 result {expect} of '{}'",
                c.output.tensor.name,
                c.output.offset,
                c.output.offset + c.output.count,
                c.weight.name
            )));
        }
    }
    match fused_plan(ctx, yshape, weight, bias, spec, convs, variant)? {
        Some(plan) => run_fused(ctx, rec, input, weight, bias, spec, convs, &plan).map(|_| true),
        None => {
            let y = Tensor::empty(ctx, yshape, "pointwise result")?;
            conv3d_forward(ctx, rec, input, weight, bias, y.all(), spec, variant)?;
            for c in convs {
                let cin = c.weight.shape().0[1];
                conv3d_forward(
                    ctx,
                    rec,
                    y.channels(c.in_offset, cin)?,
                    c.weight,
                    c.bias,
                    c.output,
                    &c.spec,
                    variant,
                )?;
            }
            Ok(false)
        }
    }
}

/// The fused form's kernels and shared packing geometry.
struct Plan {
    pointwise: ConvKernel,
    convs: Vec<ConvKernel>,
    /// Packed extents and where voxel (0, 0, 0) sits.
    ext: [usize; 3],
    origin: [usize; 3],
}

/// The fused form's plan, or `None` where it does not apply (see
/// [`pointwise_into_convs`]).
fn fused_plan(
    ctx: &GpuContext,
    yshape: Shape5,
    weight: &Tensor,
    bias: Option<&Tensor>,
    spec: &Conv3dSpec,
    convs: &[ChainedConv<'_>],
    variant: Conv3dVariant,
) -> Result<Option<Plan>> {
    let cout = yshape.c();
    let size = yshape.spatial();
    let (tc, _) = conv3d_pointwise::tile_for(cout);
    let voxels = size.iter().product::<usize>();
    if !tc.is_multiple_of(4)
        || !size[2].is_multiple_of(4)
        || !conv3d_pointwise::applies([1; 3], spec, voxels)
    {
        return Ok(None);
    }
    let in_shape = Shape5::new(yshape.n(), weight.shape().0[1], size[0], size[1], size[2]);
    let choose = |input: Shape5, w: &Tensor, b: bool, spec: &Conv3dSpec| -> Result<ConvKernel> {
        match ConvKernel::for_variant(ctx, variant, w.shape().0[0])? {
            Some(k) => Ok(k),
            None => Ok(conv3d_forward_choice(ctx, input, w.shape(), b, spec)?.0),
        }
    };
    let pointwise = choose(in_shape, weight, bias.is_some(), spec)?;
    if matches!(pointwise, ConvKernel::Gemm(_)) {
        return Ok(None);
    }
    let mut kernels = Vec::new();
    let mut origin = [0; 3];
    for c in convs {
        let [_, cin, kd, kh, kw] = c.weight.shape().0;
        let ishape = Shape5::new(yshape.n(), cin, size[0], size[1], size[2]);
        let k = choose(ishape, c.weight, c.bias.is_some(), &c.spec)?;
        // A range must also end on a 4-channel boundary (or at the end, where the
        // packing's extra channels are zero): otherwise its last group would carry the
        // next range's values into this conv (times zero weights, but a NaN would
        // survive that).
        let end = c.in_offset + cin;
        if matches!(k, ConvKernel::Gemm(_))
            || !c.in_offset.is_multiple_of(4)
            || !(end.is_multiple_of(4) || end == cout)
            || conv3d_pointwise::applies([kd, kh, kw], &c.spec, voxels)
        {
            return Ok(None);
        }
        kernels.push(k);
        origin = std::array::from_fn(|a| origin[a].max(c.spec.pad_lo[a]));
    }
    // Each conv reads from origin - its own padding; the extents cover every conv's
    // reads (the last W tile included) and the data itself.
    let mut ext: [usize; 3] = std::array::from_fn(|a| origin[a] + size[a]);
    for c in convs {
        let [_, _, k0, k1, k2] = c.weight.shape().0;
        let k = [k0, k1, k2];
        let o = c.output.tensor.shape().spatial();
        let tx = tile_for(c.weight.shape().0[0]).tx;
        let reach = [
            (o[0] - 1) * c.spec.stride[0] + k[0],
            (o[1] - 1) * c.spec.stride[1] + k[1],
            (o[2].div_ceil(tx) * tx - 1) * c.spec.stride[2] + k[2],
        ];
        ext = std::array::from_fn(|a| ext[a].max(origin[a] - c.spec.pad_lo[a] + reach[a]));
    }
    Ok(Some(Plan {
        pointwise,
        convs: kernels,
        ext,
        origin,
    }))
}

#[allow(clippy::too_many_arguments)]
fn run_fused(
    ctx: &GpuContext,
    rec: &mut Recorder,
    input: ChannelSlice<'_>,
    weight: &Tensor,
    bias: Option<&Tensor>,
    spec: &Conv3dSpec,
    convs: &[ChainedConv<'_>],
    plan: &Plan,
) -> Result<()> {
    let n = input.tensor.shape().n();
    let cout = weight.shape().0[0];
    let c4 = cout.div_ceil(4);
    let [dp, hp, wp] = plan.ext;
    // Zero borders: the pointwise conv writes only the interior.
    let packed = Tensor::zeros_recorded(
        ctx,
        rec,
        Shape5::new(n, c4 * 4, dp, hp, wp),
        "pointwise result, packed",
    )?;
    let tile = conv3d_pointwise::tile_for(cout);
    let packed_w = packed_weight(ctx, rec, weight, tile.0)?;
    conv_pointwise_to(
        ctx,
        rec,
        input,
        &packed_w,
        tile,
        subgroup_size_for(ctx, plan.pointwise.variant())?,
        bias,
        cout,
        PointwiseOut::Packed {
            tensor: &packed,
            ext: plan.ext,
            origin: plan.origin,
        },
        spec.relu,
    )?;
    for (c, &k) in convs.iter().zip(&plan.convs) {
        let [ccout, cin, kd, kh, kw] = c.weight.shape().0;
        let ctile = tile_for(ccout);
        let cw = packed_weight(ctx, rec, c.weight, ctile.tc)?;
        conv_packed(
            ctx,
            rec,
            &PackedConv {
                input: &packed,
                weight: &cw,
                c4: cin.div_ceil(4),
                kernel: [kd, kh, kw],
                stride: c.spec.stride,
                padded: plan.ext,
                tile: ctile,
                subgroup: subgroup_size_for(ctx, k.variant())?,
                in_off: std::array::from_fn(|a| plan.origin[a] - c.spec.pad_lo[a]),
                phase: None,
                w_off: 0,
                in_c4: (c4, c.in_offset / 4),
            },
            c.bias,
            c.output,
            c.spec.relu,
        )?;
    }
    Ok(())
}
