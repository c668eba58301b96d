//! Basic layers over the tape: convolution, batch norm, transposed convolution, and the
//! builder that creates their parameters under dotted names.

use crate::autograd::{Graph, Mode, ParamId, ParamKind, ParamStore, Var};
use crate::error::{Error, Result};
use crate::gpu::GpuContext;
use crate::init::Init;
use crate::ops::batchnorm::{batchnorm_fold, BatchNormSpec};
use crate::ops::conv3d::Conv3dSpec;
use crate::ops::conv_transpose3d::ConvTranspose3dSpec;
use crate::rng::Rng;
use crate::tensor::Shape5;

/// Creates parameters in a store under a dotted prefix, with seeded initialisers.
pub struct Builder<'a> {
    ctx: &'a GpuContext,
    store: &'a mut ParamStore,
    rng: &'a mut Rng,
    prefix: String,
}

impl<'a> Builder<'a> {
    /// A builder at the root of `store`.
    pub fn new(ctx: &'a GpuContext, store: &'a mut ParamStore, rng: &'a mut Rng) -> Self {
        Self {
            ctx,
            store,
            rng,
            prefix: String::new(),
        }
    }

    /// A builder for the sub-module `name`.
    pub fn sub(&mut self, name: &str) -> Builder<'_> {
        let prefix = self.path(name);
        Builder {
            ctx: self.ctx,
            store: self.store,
            rng: self.rng,
            prefix,
        }
    }

    /// The full dotted name of `name` here.
    pub fn path(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// Adds a parameter with explicit values.
    pub fn add(
        &mut self,
        name: &str,
        shape: Shape5,
        data: &[f32],
        kind: ParamKind,
    ) -> Result<ParamId> {
        let full = self.path(name);
        self.store.add(self.ctx, &full, shape, data, kind)
    }

    /// Adds a conv weight `[Cout, Cin, k..]` initialised by `init`.
    pub fn conv_weight(
        &mut self,
        name: &str,
        shape: [usize; 5],
        init: Init,
        kind: ParamKind,
    ) -> Result<ParamId> {
        let data = init.fill(self.rng, shape)?;
        self.add(name, Shape5(shape), &data, kind)
    }

    /// Adds a transposed-conv weight `[Cin, Cout, k..]` initialised by `init`.
    pub fn transposed_weight(
        &mut self,
        name: &str,
        shape: [usize; 5],
        init: Init,
    ) -> Result<ParamId> {
        let data = init.fill_transposed(self.rng, shape)?;
        self.add(name, Shape5(shape), &data, ParamKind::ConvWeight)
    }
}

/// Per-channel tensor shape `[1, C, 1, 1, 1]`.
pub fn channel_shape(c: usize) -> Shape5 {
    Shape5::new(1, c, 1, 1, 1)
}

/// A 3-D convolution with optional bias.
#[derive(Clone, Debug)]
pub struct Conv {
    /// `[Cout, Cin, kd, kh, kw]`.
    pub weight: ParamId,
    /// `Cout` values.
    pub bias: Option<ParamId>,
    /// Geometry.
    pub spec: Conv3dSpec,
    /// Input channels.
    pub cin: usize,
    /// Output channels.
    pub cout: usize,
    /// Kernel extents.
    pub kernel: [usize; 3],
}

impl Conv {
    /// Creates `weight` (and `bias`, zeros) under `b`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        b: &mut Builder<'_>,
        cin: usize,
        cout: usize,
        kernel: [usize; 3],
        spec: Conv3dSpec,
        bias: bool,
        init: Init,
        kind: ParamKind,
    ) -> Result<Self> {
        let weight = b.conv_weight(
            "weight",
            [cout, cin, kernel[0], kernel[1], kernel[2]],
            init,
            kind,
        )?;
        let bias = if bias {
            Some(b.add(
                "bias",
                channel_shape(cout),
                &vec![0.0; cout],
                ParamKind::Affine,
            )?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            spec,
            cin,
            cout,
            kernel,
        })
    }

    /// Applies the convolution to input channels `offset .. offset + cin` of `x`.
    pub fn forward_from(
        &self,
        g: &mut Graph<'_>,
        store: &ParamStore,
        x: Var,
        offset: usize,
    ) -> Result<Var> {
        self.forward_from_relu(g, store, x, offset, false)
    }

    /// [`Conv::forward_from`] with ReLU applied in the convolution's epilogue when
    /// `relu` (one dispatch for conv + bias + ReLU).
    pub fn forward_from_relu(
        &self,
        g: &mut Graph<'_>,
        store: &ParamStore,
        x: Var,
        offset: usize,
        relu: bool,
    ) -> Result<Var> {
        let w = g.param(store, self.weight)?;
        let b = self.bias.map(|b| g.param(store, b)).transpose()?;
        let spec = Conv3dSpec {
            relu: self.spec.relu || relu,
            ..self.spec
        };
        g.conv3d_channels(x, offset, self.cin, w, b, spec)
    }

    /// [`Conv::forward_from_relu`] writing into channels `dst_offset..` of `dst`
    /// (no-grad graphs).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_into(
        &self,
        g: &mut Graph<'_>,
        store: &ParamStore,
        x: Var,
        offset: usize,
        relu: bool,
        dst: Var,
        dst_offset: usize,
    ) -> Result<()> {
        let w = g.param(store, self.weight)?;
        let b = self.bias.map(|b| g.param(store, b)).transpose()?;
        let spec = Conv3dSpec {
            relu: self.spec.relu || relu,
            ..self.spec
        };
        g.conv3d_channels_into(x, offset, self.cin, w, b, spec, dst, dst_offset)
    }

    /// Applies the convolution to all channels of `x`.
    pub fn forward(&self, g: &mut Graph<'_>, store: &ParamStore, x: Var) -> Result<Var> {
        self.forward_from(g, store, x, 0)
    }

    /// Multiply-adds per output voxel (for FLOP counts).
    pub fn macs_per_voxel(&self) -> usize {
        self.cout * self.cin * self.kernel.iter().product::<usize>()
    }
}

/// BatchNorm3d with its running statistics.
#[derive(Clone, Debug)]
pub struct BatchNorm {
    /// Scale (gamma).
    pub weight: ParamId,
    /// Shift (beta).
    pub bias: ParamId,
    /// Running mean (buffer).
    pub running_mean: ParamId,
    /// Running variance (buffer).
    pub running_var: ParamId,
    /// Epsilon and momentum.
    pub spec: BatchNormSpec,
    /// Channels.
    pub channels: usize,
}

impl BatchNorm {
    /// gamma 1, beta 0, running mean 0, running var 1.
    pub fn new(b: &mut Builder<'_>, c: usize, spec: BatchNormSpec) -> Result<Self> {
        let s = channel_shape(c);
        Ok(Self {
            weight: b.add("weight", s, &vec![1.0; c], ParamKind::Affine)?,
            bias: b.add("bias", s, &vec![0.0; c], ParamKind::Affine)?,
            running_mean: b.add("running_mean", s, &vec![0.0; c], ParamKind::Buffer)?,
            running_var: b.add("running_var", s, &vec![1.0; c], ParamKind::Buffer)?,
            spec,
            channels: c,
        })
    }

    /// Normalises `x` (batch statistics in training mode, running ones in eval mode).
    pub fn forward(&self, g: &mut Graph<'_>, store: &ParamStore, x: Var) -> Result<Var> {
        let gamma = g.param(store, self.weight)?;
        let beta = g.param(store, self.bias)?;
        let mean = store.tensor(self.running_mean)?.clone();
        let var = store.tensor(self.running_var)?.clone();
        g.batchnorm(x, gamma, beta, mean, var, self.spec)
    }

    /// `relu(forward(x))` for a caller that is done with `x` (released here): fused in
    /// training graphs (`Graph::batchnorm_relu`); in eval graphs `x` is released before
    /// the ReLU runs, so inference holds two activations at a time, not three.
    pub fn forward_relu_release(
        &self,
        g: &mut Graph<'_>,
        store: &ParamStore,
        x: Var,
    ) -> Result<Var> {
        if g.mode() != Mode::Train {
            let z = self.forward(g, store, x)?;
            g.release(x)?;
            let r = g.relu(z)?;
            g.release(z)?;
            return Ok(r);
        }
        let gamma = g.param(store, self.weight)?;
        let beta = g.param(store, self.bias)?;
        let mean = store.tensor(self.running_mean)?.clone();
        let var = store.tensor(self.running_var)?.clone();
        let r = g.batchnorm_relu(x, gamma, beta, mean, var, self.spec)?;
        g.release(x)?;
        Ok(r)
    }

    /// Eval-mode `(scale, shift)` per channel: `bn(x) = scale * x + shift`.
    pub fn affine(&self, ctx: &GpuContext, store: &ParamStore) -> Result<(Vec<f32>, Vec<f32>)> {
        let gamma = store.read(ctx, self.weight)?;
        let beta = store.read(ctx, self.bias)?;
        let mean = store.read(ctx, self.running_mean)?;
        let var = store.read(ctx, self.running_var)?;
        // Folding a 1-element identity "weight" per channel gives the affine map.
        let (scale, shift) = batchnorm_fold(
            &vec![1.0; self.channels],
            None,
            &gamma,
            &beta,
            &mean,
            &var,
            self.spec.eps,
        )?;
        Ok((scale, shift))
    }
}

/// Transposed convolution `[Cin, Cout, k..]` with optional bias.
#[derive(Clone, Debug)]
pub struct ConvTranspose {
    /// `[Cin, Cout, kd, kh, kw]`.
    pub weight: ParamId,
    /// `Cout` values.
    pub bias: Option<ParamId>,
    /// Geometry.
    pub spec: ConvTranspose3dSpec,
    /// Input channels.
    pub cin: usize,
    /// Output channels.
    pub cout: usize,
    /// Kernel extents.
    pub kernel: [usize; 3],
}

impl ConvTranspose {
    /// Creates `weight` (He-normal) and `bias` (zeros) under `b`.
    pub fn new(
        b: &mut Builder<'_>,
        cin: usize,
        cout: usize,
        kernel: [usize; 3],
        spec: ConvTranspose3dSpec,
        bias: bool,
    ) -> Result<Self> {
        let weight = b.transposed_weight(
            "weight",
            [cin, cout, kernel[0], kernel[1], kernel[2]],
            Init::HeNormalTruncated,
        )?;
        let bias = if bias {
            Some(b.add(
                "bias",
                channel_shape(cout),
                &vec![0.0; cout],
                ParamKind::Affine,
            )?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            spec,
            cin,
            cout,
            kernel,
        })
    }

    /// Applies it to `x`.
    pub fn forward(&self, g: &mut Graph<'_>, store: &ParamStore, x: Var) -> Result<Var> {
        let w = g.param(store, self.weight)?;
        let b = self.bias.map(|b| g.param(store, b)).transpose()?;
        g.conv_transpose3d(x, w, b, self.spec)
    }
}

/// Reads a parameter's values, checking its element count.
pub(crate) fn read_checked(
    ctx: &GpuContext,
    store: &ParamStore,
    id: ParamId,
    len: usize,
) -> Result<Vec<f32>> {
    let v = store.read(ctx, id)?;
    if v.len() != len {
        return Err(Error::Shape(format!(
            "parameter '{}' has {} values, {len} expected",
            store.entry(id)?.name,
            v.len()
        )));
    }
    Ok(v)
}
