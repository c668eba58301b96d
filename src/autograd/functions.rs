//! Differentiable ops on a [`Graph`]: each runs the forward kernel and records a
//! backward closure built from the ops' backward kernels.

use super::{Graph, Mode, Var};
use crate::error::{Error, Result};
use crate::gpu::GpuContext;
use crate::ops::batchnorm::{self, BatchNormSpec};
use crate::ops::conv3d::{conv3d_check, conv3d_flops, conv3d_forward, Conv3dSpec, Conv3dVariant};
use crate::ops::conv3d_backward::{
    conv3d_backward_bias, conv3d_backward_input, conv3d_backward_weight,
};
use crate::ops::conv3d_chain::{pointwise_into_convs, ChainedConv};
use crate::ops::conv_transpose3d::{
    conv_transpose3d_backward_bias, conv_transpose3d_backward_input,
    conv_transpose3d_backward_weight, conv_transpose3d_check, conv_transpose3d_flops,
    conv_transpose3d_forward, ConvTranspose3dSpec,
};
use crate::ops::elementwise;
use crate::ops::loss;
use crate::ops::matmul;
use crate::ops::pool::{self, PoolSpec};
use crate::ops::upsample;
use crate::tensor::{Shape5, Tensor};
use std::rc::Rc;

const AUTO: Conv3dVariant = Conv3dVariant::Auto;

fn empty(ctx: &GpuContext, shape: Shape5, name: &str) -> Result<Tensor> {
    Tensor::empty(ctx, shape, name)
}

/// Input, weight, optional bias and the bias length of a conv-like op.
type ConvOperands = (Rc<Tensor>, Rc<Tensor>, Option<Rc<Tensor>>, Option<usize>);
impl Graph<'_> {
    fn tensor(&self, v: Var) -> Result<Rc<Tensor>> {
        Ok(self.value(v)?.clone())
    }

    fn require_no_grad(&self, op: &str) -> Result<()> {
        if self.grad_enabled() {
            return Err(Error::InvalidArgument(format!(
                "{op} writes into an existing value, which backward cannot follow: only in \
                 no-grad graphs"
            )));
        }
        Ok(())
    }

    /// An uninitialised value of `shape` that later ops fill channel range by channel
    /// range (e.g. a DenseNet block's concatenation, written in place): through
    /// [`Graph::append_channels`] in any graph, or the `*_into` ops in no-grad graphs.
    pub fn buffer(&mut self, shape: Shape5, name: &str) -> Result<Var> {
        let t = empty(self.ctx, shape, name)?;
        Ok(self.leaf(Rc::new(t), false, None, "buffer"))
    }

    /// `dst` with `src` copied into its channels `offset..`, as a new value sharing
    /// `dst`'s buffer (no copy of what `dst` held). Earlier versions stay valid for
    /// the channels their readers used because appends only fill channels that nothing
    /// read yet (a DenseNet block: each layer reads the channels so far and appends its
    /// own). Gradient: `src` gets its channel range of the result's gradient, `dst` all
    /// of it (readers of later channels pass through to the appends that wrote them).
    pub fn append_channels(&mut self, dst: Var, src: Var, offset: usize) -> Result<Var> {
        let (st, dt) = (self.tensor(src)?, self.tensor(dst)?);
        let count = st.shape().c();
        elementwise::copy_channels(
            self.ctx,
            &mut self.rec,
            st.all(),
            dt.channels(offset, count)?,
        )?;
        let src_shape = st.shape();
        self.push_owning(
            "append_channels",
            dt,
            &[dst, src],
            Vec::new(),
            move |ctx, rec, gy, needs| {
                let mut out = vec![None, None];
                if needs[1] {
                    let g = empty(ctx, src_shape, "append_channels d_src")?;
                    elementwise::copy_channels(ctx, rec, gy.channels(offset, count)?, g.all())?;
                    out[1] = Some(g);
                }
                // The previous version's gradient is the whole incoming one, passed on.
                if needs[0] {
                    out[0] = Some(gy);
                }
                Ok(out)
            },
        )
    }

    /// Copies all channels of `src` into channels `offset..` of `dst` (no-grad graphs).
    pub fn write_channels(&mut self, src: Var, dst: Var, offset: usize) -> Result<()> {
        self.require_no_grad("write_channels")?;
        let (st, dt) = (self.tensor(src)?, self.tensor(dst)?);
        let range = dt.channels(offset, st.shape().c())?;
        elementwise::copy_channels(self.ctx, &mut self.rec, st.all(), range)
    }

    /// The tensors of a conv-like op's input, weight and optional bias, and the bias
    /// length for its shape check.
    fn conv_operands(&self, x: Var, w: Var, b: Option<Var>) -> Result<ConvOperands> {
        let (xt, wt) = (self.tensor(x)?, self.tensor(w)?);
        let bt = b.map(|b| self.tensor(b)).transpose()?;
        let bias_len = bt.as_ref().map(|b| b.shape().numel()).transpose()?;
        Ok((xt, wt, bt, bias_len))
    }

    /// A transposed conv (+ ReLU when `spec.relu`) writing into channels `out_offset..`
    /// of `dst` instead of a new value (no-grad graphs).
    pub fn conv_transpose3d_into(
        &mut self,
        x: Var,
        w: Var,
        b: Option<Var>,
        spec: ConvTranspose3dSpec,
        dst: Var,
        out_offset: usize,
    ) -> Result<()> {
        self.require_no_grad("conv_transpose3d_into")?;
        let (xt, wt, bt, bias_len) = self.conv_operands(x, w, b)?;
        let dt = self.tensor(dst)?;
        let oshape =
            conv_transpose3d_check(xt.shape(), xt.shape().c(), wt.shape(), bias_len, &spec)?;
        conv_transpose3d_forward(
            self.ctx,
            &mut self.rec,
            xt.all(),
            &wt,
            bt.as_deref(),
            dt.channels(out_offset, oshape.c())?,
            &spec,
            AUTO,
        )?;
        self.flops += conv_transpose3d_flops(xt.shape(), wt.shape());
        Ok(())
    }

    /// `relu?(1x1x1 conv of channels offset .. offset + Cin of x)` read only by `groups`
    /// (each reading its channel range of that result and writing its channel range of
    /// `dst`), no-grad graphs: the result goes straight into the packed layout the
    /// groups' convolutions read, with no intermediate value (`ops::conv3d_chain`).
    #[allow(clippy::too_many_arguments)]
    pub fn pointwise_into_groups(
        &mut self,
        x: Var,
        offset: usize,
        w: Var,
        b: Option<Var>,
        spec: Conv3dSpec,
        groups: &[ConvGroup],
        dst: Var,
    ) -> Result<()> {
        self.require_no_grad("pointwise_into_groups")?;
        let (xt, wt, bt, bias_len) = self.conv_operands(x, w, b)?;
        let dt = self.tensor(dst)?;
        let cin = wt.shape().0[1];
        let yshape = conv3d_check(xt.shape(), (offset, cin), wt.shape(), bias_len, &spec)?;
        self.flops += conv3d_flops(yshape, wt.shape());
        let mut tensors = Vec::new();
        for gr in groups {
            let gw = self.tensor(gr.weight)?;
            let gb = gr.bias.map(|b| self.tensor(b)).transpose()?;
            let gbl = gb.as_ref().map(|b| b.shape().numel()).transpose()?;
            let oshape = conv3d_check(
                yshape,
                (gr.in_offset, gw.shape().0[1]),
                gw.shape(),
                gbl,
                &gr.spec,
            )?;
            self.flops += conv3d_flops(oshape, gw.shape());
            tensors.push((gw, gb, oshape.c()));
        }
        let convs = groups
            .iter()
            .zip(&tensors)
            .map(|(gr, (gw, gb, cout))| {
                Ok(ChainedConv {
                    in_offset: gr.in_offset,
                    weight: gw,
                    bias: gb.as_deref(),
                    spec: gr.spec,
                    output: dt.channels(gr.out_offset, *cout)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        pointwise_into_convs(
            self.ctx,
            &mut self.rec,
            xt.channels(offset, cin)?,
            &wt,
            bt.as_deref(),
            &spec,
            &convs,
            AUTO,
        )
        .map(|_| ())
    }

    /// [`Graph::conv3d_channels`] writing its result into channels `out_offset..` of `dst`
    /// instead of a new value (no-grad graphs).
    #[allow(clippy::too_many_arguments)]
    pub fn conv3d_channels_into(
        &mut self,
        x: Var,
        offset: usize,
        count: usize,
        w: Var,
        b: Option<Var>,
        spec: Conv3dSpec,
        dst: Var,
        out_offset: usize,
    ) -> Result<()> {
        self.require_no_grad("conv3d_channels_into")?;
        let (xt, wt, bt, bias_len) = self.conv_operands(x, w, b)?;
        let dt = self.tensor(dst)?;
        let oshape = conv3d_check(xt.shape(), (offset, count), wt.shape(), bias_len, &spec)?;
        let out = dt.channels(out_offset, oshape.c())?;
        conv3d_forward(
            self.ctx,
            &mut self.rec,
            xt.channels(offset, count)?,
            &wt,
            bt.as_deref(),
            out,
            &spec,
            AUTO,
        )?;
        self.flops += conv3d_flops(oshape, wt.shape());
        Ok(())
    }

    /// `conv3d(x, w) + b`, ReLU fused when `spec.relu`.
    pub fn conv3d(&mut self, x: Var, w: Var, b: Option<Var>, spec: Conv3dSpec) -> Result<Var> {
        let c = self.value(x)?.shape().c();
        self.conv3d_channels(x, 0, c, w, b, spec)
    }

    /// Like [`Graph::conv3d`] on input channels `offset .. offset + count` of `x`
    /// (MixACB groups read their channel range in place).
    pub fn conv3d_channels(
        &mut self,
        x: Var,
        offset: usize,
        count: usize,
        w: Var,
        b: Option<Var>,
        spec: Conv3dSpec,
    ) -> Result<Var> {
        let (xt, wt, bt, bias_len) = self.conv_operands(x, w, b)?;
        let oshape = conv3d_check(xt.shape(), (offset, count), wt.shape(), bias_len, &spec)?;
        let ctx = self.ctx;
        let y = Rc::new(empty(ctx, oshape, "conv3d")?);
        conv3d_forward(
            ctx,
            &mut self.rec,
            xt.channels(offset, count)?,
            &wt,
            bt.as_deref(),
            y.all(),
            &spec,
            AUTO,
        )?;
        self.flops += conv3d_flops(oshape, wt.shape());
        let saved_y = spec.relu.then(|| y.clone());
        let mut inputs = vec![x, w];
        inputs.extend(b);
        let has_bias = b.is_some();
        // A conv reading a channel range contributes only that range's gradient.
        let full = offset == 0 && count == xt.shape().c();
        let partial = vec![(!full).then_some((offset, xt.shape()))];
        self.push_partial("conv3d", y, &inputs, partial, move |ctx, rec, gy, needs| {
            let masked = match &saved_y {
                Some(y) => {
                    let g = empty(ctx, gy.shape(), "relu grad")?;
                    elementwise::relu_backward(ctx, rec, y, gy, &g)?;
                    Some(g)
                }
                None => None,
            };
            let g = masked.as_ref().unwrap_or(gy);
            let mut out = vec![None, None, None];
            if needs[0] {
                let s = xt.shape();
                let dx = empty(
                    ctx,
                    Shape5::new(s.n(), count, s.0[2], s.0[3], s.0[4]),
                    "conv3d dx",
                )?;
                conv3d_backward_input(ctx, rec, g.all(), &wt, dx.all(), &spec, AUTO)?;
                out[0] = Some(dx);
            }
            if needs[1] {
                let dw = empty(ctx, wt.shape(), "conv3d dw")?;
                conv3d_backward_weight(
                    ctx,
                    rec,
                    xt.channels(offset, count)?,
                    g.all(),
                    &dw,
                    &spec,
                    AUTO,
                )?;
                out[1] = Some(dw);
            }
            if has_bias && needs[2] {
                let db = empty(ctx, Shape5::new(1, g.shape().c(), 1, 1, 1), "conv3d db")?;
                conv3d_backward_bias(ctx, rec, g.all(), &db)?;
                out[2] = Some(db);
            }
            out.truncate(if has_bias { 3 } else { 2 });
            Ok(out)
        })
    }

    /// Transposed convolution (weight `[Cin, Cout, k..]`) plus bias.
    pub fn conv_transpose3d(
        &mut self,
        x: Var,
        w: Var,
        b: Option<Var>,
        spec: ConvTranspose3dSpec,
    ) -> Result<Var> {
        if spec.relu && self.grad_enabled {
            return Err(Error::InvalidArgument(
                "conv_transpose3d: a fused ReLU has no backward; use relu() in gradient graphs"
                    .into(),
            ));
        }
        let (xt, wt, bt, bias_len) = self.conv_operands(x, w, b)?;
        let oshape =
            conv_transpose3d_check(xt.shape(), xt.shape().c(), wt.shape(), bias_len, &spec)?;
        let ctx = self.ctx;
        let y = Rc::new(empty(ctx, oshape, "conv_transpose3d")?);
        conv_transpose3d_forward(
            ctx,
            &mut self.rec,
            xt.all(),
            &wt,
            bt.as_deref(),
            y.all(),
            &spec,
            AUTO,
        )?;
        self.flops += conv_transpose3d_flops(xt.shape(), wt.shape());
        let mut inputs = vec![x, w];
        inputs.extend(b);
        let has_bias = b.is_some();
        self.push(
            "conv_transpose3d",
            y,
            &inputs,
            move |ctx, rec, gy, needs| {
                let mut out = vec![None, None, None];
                if needs[0] {
                    let dx = empty(ctx, xt.shape(), "conv_transpose3d dx")?;
                    conv_transpose3d_backward_input(
                        ctx,
                        rec,
                        gy.all(),
                        &wt,
                        dx.all(),
                        &spec,
                        AUTO,
                    )?;
                    out[0] = Some(dx);
                }
                if needs[1] {
                    let dw = empty(ctx, wt.shape(), "conv_transpose3d dw")?;
                    conv_transpose3d_backward_weight(
                        ctx,
                        rec,
                        xt.all(),
                        gy.all(),
                        &dw,
                        &spec,
                        AUTO,
                    )?;
                    out[1] = Some(dw);
                }
                if has_bias && needs[2] {
                    let db = empty(
                        ctx,
                        Shape5::new(1, gy.shape().c(), 1, 1, 1),
                        "conv_transpose3d db",
                    )?;
                    conv_transpose3d_backward_bias(ctx, rec, gy.all(), &db)?;
                    out[2] = Some(db);
                }
                out.truncate(if has_bias { 3 } else { 2 });
                Ok(out)
            },
        )
    }

    /// `max(x, 0)`.
    pub fn relu(&mut self, x: Var) -> Result<Var> {
        let xt = self.tensor(x)?;
        let ctx = self.ctx;
        let y = Rc::new(empty(ctx, xt.shape(), "relu")?);
        elementwise::relu_forward(ctx, &mut self.rec, &xt, &y)?;
        let saved = y.clone();
        self.push("relu", y, &[x], move |ctx, rec, gy, _| {
            let dx = empty(ctx, gy.shape(), "relu dx")?;
            elementwise::relu_backward(ctx, rec, &saved, gy, &dx)?;
            Ok(vec![Some(dx)])
        })
    }

    /// `min(max(x, 0), 6)`.
    pub fn relu6(&mut self, x: Var) -> Result<Var> {
        let xt = self.tensor(x)?;
        let ctx = self.ctx;
        let y = Rc::new(empty(ctx, xt.shape(), "relu6")?);
        elementwise::relu6_forward(ctx, &mut self.rec, &xt, &y)?;
        self.push("relu6", y, &[x], move |ctx, rec, gy, _| {
            let dx = empty(ctx, gy.shape(), "relu6 dx")?;
            elementwise::relu6_backward(ctx, rec, &xt, gy, &dx)?;
            Ok(vec![Some(dx)])
        })
    }

    /// Inverted dropout with drop probability `p` (identity in eval mode); the mask is a
    /// hash of (`seed`, element index), recomputed in backward.
    pub fn dropout(&mut self, x: Var, p: f32, seed: u32) -> Result<Var> {
        if self.mode == Mode::Eval || p == 0.0 {
            return Ok(x);
        }
        let xt = self.tensor(x)?;
        let ctx = self.ctx;
        let y = Rc::new(empty(ctx, xt.shape(), "dropout")?);
        elementwise::dropout_forward(ctx, &mut self.rec, &xt, &y, p, seed)?;
        self.push("dropout", y, &[x], move |ctx, rec, gy, _| {
            let dx = empty(ctx, gy.shape(), "dropout dx")?;
            elementwise::dropout_backward(ctx, rec, gy, &dx, p, seed)?;
            Ok(vec![Some(dx)])
        })
    }

    /// `a + b` (same shapes).
    pub fn add(&mut self, a: Var, b: Var) -> Result<Var> {
        let (at, bt) = (self.tensor(a)?, self.tensor(b)?);
        let ctx = self.ctx;
        let y = Rc::new(empty(ctx, at.shape(), "add")?);
        elementwise::add(ctx, &mut self.rec, &at, &bt, &y)?;
        self.push_owning("add", y, &[a, b], Vec::new(), move |ctx, rec, gy, needs| {
            // Both inputs receive the same gradient: the second a copy, so each owner
            // can accumulate into its own tensor.
            let second = (needs[0] && needs[1])
                .then(|| gy.duplicate(ctx, rec, "add db"))
                .transpose()?;
            Ok(match (needs[0], second) {
                (true, second) => vec![Some(gy), second],
                (false, _) => vec![None, Some(gy)],
            })
        })
    }

    /// Sum of several values of the same shape.
    pub fn sum(&mut self, xs: &[Var]) -> Result<Var> {
        let (&first, rest) = xs
            .split_first()
            .ok_or_else(|| Error::InvalidArgument("sum of no values".into()))?;
        rest.iter().try_fold(first, |acc, &x| self.add(acc, x))
    }

    /// `alpha * x`.
    pub fn scale(&mut self, x: Var, alpha: f32) -> Result<Var> {
        let xt = self.tensor(x)?;
        let ctx = self.ctx;
        let y = Rc::new(empty(ctx, xt.shape(), "scale")?);
        elementwise::scale(ctx, &mut self.rec, &xt, alpha, &y)?;
        self.push("scale", y, &[x], move |ctx, rec, gy, _| {
            let dx = empty(ctx, gy.shape(), "scale dx")?;
            elementwise::scale(ctx, rec, gy, alpha, &dx)?;
            Ok(vec![Some(dx)])
        })
    }

    /// Channel concatenation (each value written into its channel range of the output;
    /// the gradient of each is its range of the output's gradient).
    pub fn concat(&mut self, xs: &[Var]) -> Result<Var> {
        let groups: Vec<Vec<Var>> = xs.iter().map(|&v| vec![v]).collect();
        self.concat_of_sums(&groups)
    }

    /// Channels `offset .. offset + count` of `x` as a new value.
    pub fn slice_channels(&mut self, x: Var, offset: usize, count: usize) -> Result<Var> {
        let xt = self.tensor(x)?;
        let src = xt.channels(offset, count)?;
        let s = xt.shape();
        let ctx = self.ctx;
        let y = Rc::new(empty(
            ctx,
            Shape5::new(s.n(), count, s.0[2], s.0[3], s.0[4]),
            "slice",
        )?);
        elementwise::copy_channels(ctx, &mut self.rec, src, y.all())?;
        let partial = vec![Some((offset, s))];
        self.push_owning("slice_channels", y, &[x], partial, move |_, _, gy, _| {
            // The whole gradient is the input's channel range (the tape places it).
            Ok(vec![Some(gy)])
        })
    }
}

/// Which up-sampling interpolation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Upsample {
    /// Nearest neighbour.
    Nearest,
    /// Trilinear, `align_corners = False`.
    Trilinear,
}

impl Graph<'_> {
    /// BatchNorm3d: batch statistics (and a running-statistics update) in training
    /// mode, running statistics in eval mode. `running_mean`/`running_var` are the
    /// store's buffers.
    pub fn batchnorm(
        &mut self,
        x: Var,
        gamma: Var,
        beta: Var,
        running_mean: Rc<Tensor>,
        running_var: Rc<Tensor>,
        spec: BatchNormSpec,
    ) -> Result<Var> {
        if self.mode == Mode::Train {
            return self.batchnorm_train(x, gamma, beta, [running_mean, running_var], spec, false);
        }
        let (xt, gt, bt) = (self.tensor(x)?, self.tensor(gamma)?, self.tensor(beta)?);
        let ctx = self.ctx;
        let y = Rc::new(empty(ctx, xt.shape(), "batchnorm")?);
        let c1 = Shape5::new(1, xt.shape().c(), 1, 1, 1);
        let eps = spec.eps;
        batchnorm::batchnorm_eval_forward(
            ctx,
            &mut self.rec,
            &xt,
            &gt,
            &bt,
            &running_mean,
            &running_var,
            eps,
            &y,
        )?;
        self.push("batchnorm", y, &[x, gamma, beta], move |ctx, rec, gy, _| {
            let dx = empty(ctx, xt.shape(), "bn dx")?;
            let dg = empty(ctx, c1, "bn dgamma")?;
            let db = empty(ctx, c1, "bn dbeta")?;
            batchnorm::batchnorm_eval_backward(
                ctx,
                rec,
                &xt,
                gy,
                &gt,
                &running_mean,
                &running_var,
                eps,
                &dx,
                &dg,
                &db,
            )?;
            Ok(vec![Some(dx), Some(dg), Some(db)])
        })
    }

    /// `relu(batchnorm(x))`. In training mode one fused op: the ReLU runs in the BN's
    /// apply pass and its mask inside the BN backward (no ReLU pass or tensor of its
    /// own); eval mode composes the two ops.
    pub fn batchnorm_relu(
        &mut self,
        x: Var,
        gamma: Var,
        beta: Var,
        running_mean: Rc<Tensor>,
        running_var: Rc<Tensor>,
        spec: BatchNormSpec,
    ) -> Result<Var> {
        if self.mode != Mode::Train {
            let y = self.batchnorm(x, gamma, beta, running_mean, running_var, spec)?;
            let r = self.relu(y)?;
            self.release(y)?;
            return Ok(r);
        }
        self.batchnorm_train(x, gamma, beta, [running_mean, running_var], spec, true)
    }

    /// Training-mode BN (batch statistics, running ones updated), with the ReLU fused
    /// when `relu`; backward holds x, the saved statistics and (with the ReLU) y.
    fn batchnorm_train(
        &mut self,
        x: Var,
        gamma: Var,
        beta: Var,
        [running_mean, running_var]: [Rc<Tensor>; 2],
        spec: BatchNormSpec,
        relu: bool,
    ) -> Result<Var> {
        let (xt, gt, bt) = (self.tensor(x)?, self.tensor(gamma)?, self.tensor(beta)?);
        let ctx = self.ctx;
        let op = if relu { "batchnorm_relu" } else { "batchnorm" };
        let y = Rc::new(empty(ctx, xt.shape(), op)?);
        let c1 = Shape5::new(1, xt.shape().c(), 1, 1, 1);
        let mean = empty(ctx, c1, "bn saved mean")?;
        let invstd = empty(ctx, c1, "bn saved invstd")?;
        let forward = if relu {
            batchnorm::batchnorm_relu_train_forward
        } else {
            batchnorm::batchnorm_train_forward
        };
        forward(
            ctx,
            &mut self.rec,
            &xt,
            &gt,
            &bt,
            &running_mean,
            &running_var,
            &spec,
            &y,
            &mean,
            &invstd,
        )?;
        let saved_y = relu.then(|| y.clone());
        self.push(op, y, &[x, gamma, beta], move |ctx, rec, gy, _| {
            let dx = empty(ctx, xt.shape(), "bn dx")?;
            let dg = empty(ctx, c1, "bn dgamma")?;
            let db = empty(ctx, c1, "bn dbeta")?;
            match &saved_y {
                Some(y) => batchnorm::batchnorm_relu_backward(
                    ctx, rec, &xt, y, gy, &gt, &mean, &invstd, &dx, &dg, &db,
                )?,
                None => batchnorm::batchnorm_backward(
                    ctx, rec, &xt, gy, &gt, &mean, &invstd, &dx, &dg, &db,
                )?,
            }
            Ok(vec![Some(dx), Some(dg), Some(db)])
        })
    }

    /// Max pooling; the arg-max is saved for backward (ties go to the first voxel).
    pub fn maxpool3d(&mut self, x: Var, spec: PoolSpec) -> Result<Var> {
        let xt = self.tensor(x)?;
        let oshape = spec.output_shape(xt.shape())?;
        let ctx = self.ctx;
        let y = Rc::new(empty(ctx, oshape, "maxpool3d")?);
        let argmax = empty(ctx, oshape, "maxpool3d argmax")?;
        pool::maxpool3d_forward(ctx, &mut self.rec, &xt, &y, &argmax, &spec)?;
        let ishape = xt.shape();
        drop(xt);
        self.push("maxpool3d", y, &[x], move |ctx, rec, gy, _| {
            let dx = empty(ctx, ishape, "maxpool3d dx")?;
            pool::maxpool3d_backward(ctx, rec, gy, &argmax, &dx, &spec)?;
            Ok(vec![Some(dx)])
        })
    }

    /// Average pooling.
    pub fn avgpool3d(&mut self, x: Var, spec: PoolSpec) -> Result<Var> {
        let xt = self.tensor(x)?;
        let oshape = spec.output_shape(xt.shape())?;
        let ctx = self.ctx;
        let y = Rc::new(empty(ctx, oshape, "avgpool3d")?);
        pool::avgpool3d_forward(ctx, &mut self.rec, &xt, &y, &spec)?;
        let ishape = xt.shape();
        self.push("avgpool3d", y, &[x], move |ctx, rec, gy, _| {
            let dx = empty(ctx, ishape, "avgpool3d dx")?;
            pool::avgpool3d_backward(ctx, rec, gy, &dx, &spec)?;
            Ok(vec![Some(dx)])
        })
    }

    /// Up-sampling by an integer factor per axis.
    pub fn upsample(&mut self, x: Var, scale: [usize; 3], mode: Upsample) -> Result<Var> {
        let xt = self.tensor(x)?;
        let oshape = upsample::upsample_output_shape(xt.shape(), scale)?;
        let ctx = self.ctx;
        let y = Rc::new(empty(ctx, oshape, "upsample")?);
        match mode {
            Upsample::Nearest => {
                upsample::upsample_nearest_forward(ctx, &mut self.rec, &xt, &y, scale)?
            }
            Upsample::Trilinear => {
                upsample::upsample_trilinear_forward(ctx, &mut self.rec, &xt, &y, scale)?
            }
        }
        let ishape = xt.shape();
        self.push("upsample", y, &[x], move |ctx, rec, gy, _| {
            let dx = empty(ctx, ishape, "upsample dx")?;
            match mode {
                Upsample::Nearest => upsample::upsample_nearest_backward(ctx, rec, gy, &dx, scale)?,
                Upsample::Trilinear => {
                    upsample::upsample_trilinear_backward(ctx, rec, gy, &dx, scale)?
                }
            }
            Ok(vec![Some(dx)])
        })
    }

    /// Mean softmax cross-entropy over channels; `labels` holds class ids `[N, 1, D, H, W]`.
    pub fn softmax_cross_entropy(&mut self, logits: Var, labels: Var) -> Result<Var> {
        let (lt, yt) = (self.tensor(logits)?, self.tensor(labels)?);
        let ctx = self.ctx;
        let out = Rc::new(empty(ctx, Shape5::new(1, 1, 1, 1, 1), "cross-entropy")?);
        loss::softmax_cross_entropy_forward(ctx, &mut self.rec, &lt, &yt, &out)?;
        self.push(
            "softmax_cross_entropy",
            out,
            &[logits, labels],
            move |ctx, rec, g, _| {
                let dl = empty(ctx, lt.shape(), "cross-entropy dlogits")?;
                loss::softmax_cross_entropy_backward(ctx, rec, &lt, &yt, g, &dl)?;
                Ok(vec![Some(dl), None])
            },
        )
    }

    /// Soft Dice loss over classes (softmax over channels first).
    pub fn dice_loss(&mut self, logits: Var, labels: Var, eps: f32) -> Result<Var> {
        let (lt, yt) = (self.tensor(logits)?, self.tensor(labels)?);
        let ctx = self.ctx;
        let out = Rc::new(empty(ctx, Shape5::new(1, 1, 1, 1, 1), "dice")?);
        loss::dice_loss_forward(ctx, &mut self.rec, &lt, &yt, &out, eps)?;
        self.push(
            "dice_loss",
            out,
            &[logits, labels],
            move |ctx, rec, g, _| {
                let dl = empty(ctx, lt.shape(), "dice dlogits")?;
                loss::dice_loss_backward(ctx, rec, &lt, &yt, g, &dl, eps)?;
                Ok(vec![Some(dl), None])
            },
        )
    }

    /// Softmax over channels (no gradient; inference output).
    pub fn softmax_channels(&mut self, logits: Var) -> Result<Rc<Tensor>> {
        let lt = self.tensor(logits)?;
        let p = Rc::new(empty(self.ctx, lt.shape(), "softmax")?);
        loss::softmax_channels(self.ctx, &mut self.rec, &lt, &p)?;
        Ok(p)
    }

    /// Batched `op(A) · op(B)` over tensors read as `[.., .., batch, rows, cols]`
    /// (see [`crate::ops::matmul`]); the result is `[1, 1, batch, M, N]`.
    pub fn batched_matmul(&mut self, a: Var, b: Var, trans_a: bool, trans_b: bool) -> Result<Var> {
        let (at, bt) = (self.tensor(a)?, self.tensor(b)?);
        let (sa, sb) = (at.shape().0, bt.shape().0);
        let batch = sa[0] * sa[1] * sa[2];
        let m = if trans_a { sa[4] } else { sa[3] };
        let n = if trans_b { sb[3] } else { sb[4] };
        let ctx = self.ctx;
        let c = Rc::new(empty(ctx, Shape5::new(1, 1, batch, m, n), "matmul")?);
        matmul::batched_matmul(ctx, &mut self.rec, &at, &bt, &c, trans_a, trans_b)?;
        let k = if trans_a { sa[3] } else { sa[4] };
        self.flops += 2.0 * (batch * m * n * k) as f64;
        self.push("batched_matmul", c, &[a, b], move |ctx, rec, gc, needs| {
            let da = needs[0]
                .then(|| empty(ctx, at.shape(), "matmul da"))
                .transpose()?;
            let db = needs[1]
                .then(|| empty(ctx, bt.shape(), "matmul db"))
                .transpose()?;
            matmul::batched_matmul_backward(
                ctx,
                rec,
                &at,
                &bt,
                gc,
                da.as_ref(),
                db.as_ref(),
                trans_a,
                trans_b,
            )?;
            Ok(vec![da, db])
        })
    }

    /// Softmax along the last axis (attention weights over positions).
    pub fn softmax_rows(&mut self, x: Var) -> Result<Var> {
        let xt = self.tensor(x)?;
        let ctx = self.ctx;
        let y = Rc::new(empty(ctx, xt.shape(), "softmax_rows")?);
        matmul::softmax_rows_forward(ctx, &mut self.rec, &xt, &y)?;
        let saved = y.clone();
        self.push("softmax_rows", y, &[x], move |ctx, rec, gy, _| {
            let dx = empty(ctx, gy.shape(), "softmax_rows dx")?;
            matmul::softmax_rows_backward(ctx, rec, &saved, gy, &dx)?;
            Ok(vec![Some(dx)])
        })
    }

    /// The same values under another shape with the same element count (a copy).
    pub fn reshape(&mut self, x: Var, shape: Shape5) -> Result<Var> {
        let xt = self.tensor(x)?;
        let from = xt.shape();
        let ctx = self.ctx;
        let y = xt
            .duplicate(ctx, &mut self.rec, "reshape")?
            .reshaped(shape)?;
        self.push_owning(
            "reshape",
            Rc::new(y),
            &[x],
            Vec::new(),
            move |_, _, gy, _| Ok(vec![Some(gy.reshaped(from)?)]),
        )
    }
}

/// One group of [`Graph::conv3d_grouped`]: reads input channels
/// `in_offset .. in_offset + Cin(weight)`, writes output channels
/// `out_offset .. out_offset + Cout(weight)`.
#[derive(Clone, Copy, Debug)]
pub struct ConvGroup {
    /// First input channel read.
    pub in_offset: usize,
    /// First output channel written.
    pub out_offset: usize,
    /// `[Cout_g, Cin_g, k..]`.
    pub weight: Var,
    /// `Cout_g` values.
    pub bias: Option<Var>,
    /// Geometry (all groups must give the same output size).
    pub spec: Conv3dSpec,
}

impl Graph<'_> {
    /// Several convolutions over disjoint input channel ranges, each writing its own
    /// output channel range of one tensor directly (a fused MixACB: no concat copy).
    /// Output ranges must tile `0..out_channels` exactly.
    pub fn conv3d_grouped(
        &mut self,
        x: Var,
        out_channels: usize,
        groups: &[ConvGroup],
    ) -> Result<Var> {
        let xt = self.tensor(x)?;
        if self.grad_enabled() && groups.iter().any(|gr| gr.spec.relu) {
            // The backward below has no ReLU mask: fused ReLU is for inference graphs.
            return Err(Error::InvalidArgument(
                "conv3d_grouped: a fused ReLU needs a no-grad graph; apply relu after it".into(),
            ));
        }
        let mut ws = Vec::new();
        let mut bs = Vec::new();
        let mut covered = vec![false; out_channels];
        let mut read = vec![false; xt.shape().c()];
        let mut oshape = None;
        for (i, gr) in groups.iter().enumerate() {
            let w = self.tensor(gr.weight)?;
            let b = gr.bias.map(|b| self.tensor(b)).transpose()?;
            let [cout, cin, ..] = w.shape().0;
            let bias_len = b.as_ref().map(|b| b.shape().numel()).transpose()?;
            let s = conv3d_check(
                xt.shape(),
                (gr.in_offset, cin),
                w.shape(),
                bias_len,
                &gr.spec,
            )?;
            if oshape.is_some_and(|o: Shape5| o.spatial() != s.spatial()) {
                return Err(Error::Shape(format!(
                    "conv3d_grouped: group {i} gives {s}, other groups another size"
                )));
            }
            oshape = Some(s);
            for (flags, off, cnt, what) in [
                (&mut covered, gr.out_offset, cout, "output"),
                (&mut read, gr.in_offset, cin, "input"),
            ] {
                let total = flags.len();
                let range = flags.get_mut(off..off + cnt).ok_or_else(|| {
                    Error::Shape(format!(
                        "conv3d_grouped: group {i} {what} channels {off}..{} exceed {total}",
                        off + cnt
                    ))
                })?;
                if range.iter().any(|&c| c) {
                    return Err(Error::Shape(format!(
                        "conv3d_grouped: group {i} {what} channels {off}..{} overlap another group",
                        off + cnt
                    )));
                }
                range.fill(true);
            }
            ws.push(w);
            bs.push(b);
        }
        let Some(os) = oshape else {
            return Err(Error::InvalidArgument("conv3d_grouped: no groups".into()));
        };
        if covered.iter().any(|&c| !c) {
            return Err(Error::Shape(format!(
                "conv3d_grouped: the groups do not cover all {out_channels} output channels"
            )));
        }
        let ctx = self.ctx;
        let y = Rc::new(empty(
            ctx,
            Shape5::new(os.n(), out_channels, os.0[2], os.0[3], os.0[4]),
            "conv3d_grouped",
        )?);
        let mut inputs = vec![x];
        for (gr, (w, b)) in groups.iter().zip(ws.iter().zip(&bs)) {
            let [cout, cin, ..] = w.shape().0;
            conv3d_forward(
                ctx,
                &mut self.rec,
                xt.channels(gr.in_offset, cin)?,
                w,
                b.as_deref(),
                y.channels(gr.out_offset, cout)?,
                &gr.spec,
                AUTO,
            )?;
            self.flops += conv3d_flops(y.channels(gr.out_offset, cout)?.tensor.shape(), w.shape())
                * cout as f64
                / out_channels as f64;
            inputs.push(gr.weight);
            inputs.extend(gr.bias);
        }
        let groups = groups.to_vec();
        self.push("conv3d_grouped", y, &inputs, move |ctx, rec, gy, needs| {
            let mut out: Vec<Option<Tensor>> = vec![None];
            if needs[0] {
                out[0] = Some(Tensor::zeros_recorded(
                    ctx,
                    rec,
                    xt.shape(),
                    "conv3d_grouped dx",
                )?);
            }
            let mut k = 1;
            for (gr, w) in groups.iter().zip(&ws) {
                let [cout, cin, ..] = w.shape().0;
                let g = gy.channels(gr.out_offset, cout)?;
                if let Some(dx) = &out[0] {
                    conv3d_backward_input(
                        ctx,
                        rec,
                        g,
                        w,
                        dx.channels(gr.in_offset, cin)?,
                        &gr.spec,
                        AUTO,
                    )?;
                }
                out.push(if needs[k] {
                    let dw = empty(ctx, w.shape(), "conv3d_grouped dw")?;
                    conv3d_backward_weight(
                        ctx,
                        rec,
                        xt.channels(gr.in_offset, cin)?,
                        g,
                        &dw,
                        &gr.spec,
                        AUTO,
                    )?;
                    Some(dw)
                } else {
                    None
                });
                k += 1;
                if gr.bias.is_some() {
                    out.push(if needs[k] {
                        let db = empty(ctx, Shape5::new(1, cout, 1, 1, 1), "conv3d_grouped db")?;
                        conv3d_backward_bias(ctx, rec, g, &db)?;
                        Some(db)
                    } else {
                        None
                    });
                    k += 1;
                }
            }
            Ok(out)
        })
    }
}

impl Graph<'_> {
    /// Channel concatenation of sums: output channel range `i` holds the sum of
    /// `groups[i]` (values of equal shape), written in place — a MixACB's groups each
    /// sum their branches straight into their range of the block's output.
    pub fn concat_of_sums(&mut self, groups: &[Vec<Var>]) -> Result<Var> {
        let mut ts: Vec<Vec<Rc<Tensor>>> = Vec::new();
        for g in groups {
            if g.is_empty() {
                return Err(Error::InvalidArgument(
                    "concat_of_sums: an empty group".into(),
                ));
            }
            ts.push(g.iter().map(|&v| self.tensor(v)).collect::<Result<_>>()?);
        }
        let first = ts
            .first()
            .ok_or_else(|| Error::InvalidArgument("concat_of_sums of no groups".into()))?[0]
            .shape();
        let mut c = 0;
        for group in &ts {
            let s = group[0].shape();
            for t in group {
                if t.shape() != s || s.n() != first.n() || s.spatial() != first.spatial() {
                    return Err(Error::Shape(format!(
                        "concat_of_sums: '{}' {} does not match '{}' {first}",
                        t.name,
                        t.shape(),
                        ts[0][0].name
                    )));
                }
            }
            c += s.c();
        }
        let [n, _, d, h, w] = first.0;
        let ctx = self.ctx;
        let y = Rc::new(empty(ctx, Shape5::new(n, c, d, h, w), "concat_of_sums")?);
        let mut ranges = Vec::new();
        let mut inputs = Vec::new();
        let mut off = 0;
        for (group, vars) in ts.iter().zip(groups) {
            let k = group[0].shape().c();
            let dst = y.channels(off, k)?;
            elementwise::copy_channels(ctx, &mut self.rec, group[0].all(), dst)?;
            for t in &group[1..] {
                elementwise::add_channels(ctx, &mut self.rec, t.all(), dst)?;
            }
            for &v in vars {
                ranges.push((off, k));
                inputs.push(v);
            }
            off += k;
        }
        self.push("concat_of_sums", y, &inputs, move |ctx, rec, gy, needs| {
            let mut out = Vec::new();
            for (&(off, k), &need) in ranges.iter().zip(needs) {
                out.push(if need {
                    let s = gy.shape();
                    let dx = empty(
                        ctx,
                        Shape5::new(s.n(), k, s.0[2], s.0[3], s.0[4]),
                        "concat_of_sums dx",
                    )?;
                    elementwise::copy_channels(ctx, rec, gy.channels(off, k)?, dx.all())?;
                    Some(dx)
                } else {
                    None
                });
            }
            Ok(out)
        })
    }
}
