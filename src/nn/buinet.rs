//! BuiNet: the skip-connected 3-D DenseNet of Bui, Shin & Moon (2019, "3D-SkipDenseSeg"),
//! one of the five networks 3D-MASNet transplants MixACB into. Each dense layer's
//! 3×3×3 convolution is a [`Block`]: a MixACB (`BlockKind::Mixacb`) or the original
//! bias-free 3×3×3 conv (`BlockKind::Conv`, the baseline); every other layer is as in
//! the authors' release. Widths, layer order and the sources of every choice:
//! `docs/models/buinet.md`.
//!
//! Layout (pre-activation DenseNet-BC, `c` = channels):
//! - stem at full resolution: conv 2→32, BN, ReLU, conv 32→32, BN, ReLU, conv 32→32
//!   (its raw output is kept for the classifier), BN, ReLU, 2×2×2 stride-2 conv;
//! - four dense blocks of four layers (BN, ReLU, 1×1×1 conv → 64, BN, ReLU, block → 16,
//!   dropout 0.2, concat), with transitions between them (BN, ReLU, 1×1×1 conv → ⌊c/2⌋,
//!   BN, ReLU, 2×2×2 stride-2 conv with bias);
//! - after each dense block a grouped transposed conv (groups = classes, one output
//!   channel per group, kernel `s + 2`, stride `s`, padding 1) up-samples straight to
//!   full resolution (`s` = 2, 4, 8, 16);
//! - classifier: concat [up1..up4, stem features], BN, ReLU, 1×1×1 conv with bias.

use crate::autograd::{Graph, ParamId, ParamKind, ParamStore, Var};
use crate::error::{Error, Result};
use crate::gpu::GpuContext;
use crate::gpu::PipelineKey;
use crate::init::Init;
use crate::nn::blocks::{bn_spec, copy_bn, Block, BlockKind, ConvBn, ModelForm};
use crate::nn::layers::{read_checked, BatchNorm, Builder, Conv};
use crate::nn::mixacb::MixSpec;
use crate::nn::model::Network;
use crate::ops::conv3d::{u32s, Conv3dSpec, Conv3dVariant};
use crate::ops::conv_transpose3d::{
    conv_transpose3d_backward_input, conv_transpose3d_backward_weight, conv_transpose3d_check,
    ConvTranspose3dSpec,
};
use crate::ops::params::{launch, Arg};
use crate::rng::Rng;
use crate::tensor::{ChannelSlice, Shape5, Tensor};
use serde::{Deserialize, Serialize};
use std::rc::Rc;

/// BuiNet hyper-parameters (defaults = the authors' release as 3D-MASNet trained it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BuinetConfig {
    /// Input modalities (T1, T2).
    pub in_channels: usize,
    /// Output classes (background, CSF, GM, WM); also the number of up-sampling groups.
    pub classes: usize,
    /// Channels of the three stem convs and the stem's stride-2 conv.
    pub init_features: usize,
    /// Channels each dense layer adds (k).
    pub growth: usize,
    /// Dense layers per dense block.
    pub layers_per_block: usize,
    /// Dense blocks (a transition between each two; input multiple `2^blocks`).
    pub blocks: usize,
    /// Bottleneck width in units of `growth` (DenseNet-BC `bn_size`: 4 → 64 channels).
    pub bottleneck_factor: usize,
    /// Transition compression θ: `⌊θ·c⌋` output channels.
    pub compression: f32,
    /// Dropout on each dense layer's new features (training only).
    pub dropout: f32,
    /// MixACB or the original 3×3×3 conv in the dense layers.
    pub block: BlockKind,
    /// MixACB groups and ratio.
    pub mix: MixSpec,
    /// Parameter form.
    pub form: ModelForm,
}

impl Default for BuinetConfig {
    fn default() -> Self {
        Self {
            in_channels: 2,
            classes: 4,
            init_features: 32,
            growth: 16,
            layers_per_block: 4,
            blocks: 4,
            bottleneck_factor: 4,
            compression: 0.5,
            dropout: 0.2,
            block: BlockKind::Mixacb,
            mix: MixSpec::default(),
            form: ModelForm::Training,
        }
    }
}

impl BuinetConfig {
    /// Channels after a transition from `c`: `⌊θ·c⌋`, at least 1.
    fn compress(&self, c: usize) -> usize {
        ((c as f64 * f64::from(self.compression)).floor() as usize).max(1)
    }

    /// Channel count at the end of each dense block (what each up-sampling reads).
    pub fn block_channels(&self) -> Vec<usize> {
        let mut ch = self.init_features;
        let mut out = Vec::new();
        for d in 0..self.blocks {
            ch += self.layers_per_block * self.growth;
            out.push(ch);
            if d + 1 < self.blocks {
                ch = self.compress(ch);
            }
        }
        out
    }

    fn validate(&self) -> Result<()> {
        let c = self;
        if c.in_channels == 0
            || c.classes == 0
            || c.init_features == 0
            || c.growth == 0
            || c.layers_per_block == 0
            || c.blocks == 0
            || c.bottleneck_factor == 0
        {
            return Err(Error::InvalidArgument(format!(
                "BuiNet needs every width and depth >= 1 (in_channels {}, classes {}, \
                 init_features {}, growth {}, layers_per_block {}, blocks {}, \
                 bottleneck_factor {})",
                c.in_channels,
                c.classes,
                c.init_features,
                c.growth,
                c.layers_per_block,
                c.blocks,
                c.bottleneck_factor
            )));
        }
        if c.blocks > 8 {
            return Err(Error::InvalidArgument(format!(
                "BuiNet with {} dense blocks: at most 8 (input multiple 2^blocks)",
                c.blocks
            )));
        }
        if !(c.compression > 0.0 && c.compression <= 1.0) {
            return Err(Error::InvalidArgument(format!(
                "BuiNet compression {} must be in (0, 1]",
                c.compression
            )));
        }
        if !(0.0..1.0).contains(&c.dropout) {
            return Err(Error::InvalidArgument(format!(
                "dropout {} must be in [0, 1)",
                c.dropout
            )));
        }
        for (d, ch) in c.block_channels().into_iter().enumerate() {
            if ch % c.classes != 0 {
                return Err(Error::InvalidArgument(format!(
                    "BuiNet dense block {} ends with {ch} channels, which the grouped \
                     up-sampling cannot split into {} groups (one per class)",
                    d + 1,
                    c.classes
                )));
            }
        }
        Ok(())
    }
}

/// Stem: three 3×3×3 convs at full resolution and a 2×2×2 stride-2 conv.
#[derive(Clone, Debug)]
struct Stem {
    conv0: ConvBn,
    conv1: ConvBn,
    /// Its raw output also feeds the classifier.
    conv2: Conv,
    norm: BatchNorm,
    pool: Conv,
}

/// Pre-activation DenseNet-BC layer.
#[derive(Clone, Debug)]
struct DenseLayer {
    norm: BatchNorm,
    bottleneck: ConvBn,
    block: Block,
    slot: &'static str,
}

/// BN, ReLU, 1×1×1 conv + BN, ReLU, 2×2×2 stride-2 conv with bias.
#[derive(Clone, Debug)]
struct Transition {
    norm: BatchNorm,
    reduce: ConvBn,
    pool: Conv,
}

/// Grouped transposed conv: group `g` reads input channels `g·cin_g ..` and writes
/// output channel range `g·cout_g ..`; weights `[cin_g, cout_g, k, k, k]`, no bias.
#[derive(Clone, Debug)]
struct GroupedUp {
    weights: Vec<ParamId>,
    cin_g: usize,
    cout_g: usize,
    kernel: usize,
    spec: ConvTranspose3dSpec,
}

/// BN, ReLU, 1×1×1 conv with bias.
#[derive(Clone, Debug)]
struct Classifier {
    norm: BatchNorm,
    conv: Conv,
}

/// The whole network.
#[derive(Clone, Debug)]
pub struct Buinet {
    /// Its configuration.
    pub config: BuinetConfig,
    stem: Stem,
    dense: Vec<Vec<DenseLayer>>,
    trans: Vec<Transition>,
    ups: Vec<GroupedUp>,
    classifier: Classifier,
}

fn slot(kind: BlockKind) -> &'static str {
    match kind {
        BlockKind::Mixacb => "mixacb",
        BlockKind::Conv => "conv3",
    }
}

/// A bias-free conv (He-normal) under `b`.
fn plain_conv(
    b: &mut Builder<'_>,
    cin: usize,
    cout: usize,
    k: usize,
    spec: Conv3dSpec,
) -> Result<Conv> {
    Conv::new(
        b,
        cin,
        cout,
        [k; 3],
        spec,
        false,
        Init::HeNormalTruncated,
        ParamKind::ConvWeight,
    )
}

/// A bias-free conv followed by BN (`….conv.*`, `….bn.*`), as in the release.
fn conv_bn(b: &mut Builder<'_>, cin: usize, cout: usize, k: usize) -> Result<ConvBn> {
    let conv = plain_conv(&mut b.sub("conv"), cin, cout, k, Conv3dSpec::same([k; 3]))?;
    let bn = Some(BatchNorm::new(&mut b.sub("bn"), cout, bn_spec())?);
    Ok(ConvBn { conv, bn })
}

/// 2×2×2 stride-2 down-sampling conv.
fn down_spec() -> Conv3dSpec {
    Conv3dSpec::default().with_stride([2; 3])
}

impl Buinet {
    /// Creates a freshly initialised training-form model in `store` (seeded).
    pub fn new(
        ctx: &GpuContext,
        store: &mut ParamStore,
        config: BuinetConfig,
        seed: u64,
    ) -> Result<Self> {
        if config.form != ModelForm::Training {
            return Err(Error::InvalidArgument(
                "a new model starts in training form; fuse it afterwards".into(),
            ));
        }
        config.validate()?;
        let mut rng = Rng::new(seed);
        let mut b = Builder::new(ctx, store, &mut rng);
        let c = &config;
        let f = c.init_features;
        let stem = {
            let mut sb = b.sub("stem");
            Stem {
                conv0: conv_bn(&mut sb.sub("conv0"), c.in_channels, f, 3)?,
                conv1: conv_bn(&mut sb.sub("conv1"), f, f, 3)?,
                conv2: plain_conv(&mut sb.sub("conv2"), f, f, 3, Conv3dSpec::same([3; 3]))?,
                norm: BatchNorm::new(&mut sb.sub("norm"), f, bn_spec())?,
                pool: plain_conv(&mut sb.sub("pool"), f, f, 2, down_spec())?,
            }
        };
        let width = c.bottleneck_factor * c.growth;
        let mut ch = f;
        let mut dense = Vec::new();
        let mut trans = Vec::new();
        let mut ups = Vec::new();
        for d in 0..c.blocks {
            let mut db = b.sub(&format!("dense{}", d + 1));
            let mut layers = Vec::new();
            for l in 0..c.layers_per_block {
                let mut lb = db.sub(&format!("layers.{l}"));
                let norm = BatchNorm::new(&mut lb.sub("norm"), ch, bn_spec())?;
                let bottleneck = conv_bn(&mut lb.sub("bottleneck"), ch, width, 1)?;
                let block = match c.block {
                    BlockKind::Mixacb => {
                        Block::new(&mut lb.sub("mixacb"), c.block, &c.mix, width, c.growth, 1)?
                    }
                    // The original layer: a bias-free 3×3×3 conv, no BN after it (the
                    // next layer's pre-activation BN normalises it).
                    BlockKind::Conv => Block::Conv(ConvBn {
                        conv: plain_conv(
                            &mut lb.sub("conv3").sub("conv"),
                            width,
                            c.growth,
                            3,
                            Conv3dSpec::same([3; 3]),
                        )?,
                        bn: None,
                    }),
                };
                layers.push(DenseLayer {
                    norm,
                    bottleneck,
                    block,
                    slot: slot(c.block),
                });
                ch += c.growth;
            }
            dense.push(layers);
            let s = 1usize << (d + 1);
            let mut ub = b.sub(&format!("up{}", d + 1));
            let cin_g = ch / c.classes;
            let k = s + 2;
            let mut weights = Vec::new();
            for g in 0..c.classes {
                weights.push(ub.sub(&format!("groups.{g}")).transposed_weight(
                    "weight",
                    [cin_g, 1, k, k, k],
                    Init::HeNormalTruncated,
                )?);
            }
            ups.push(GroupedUp {
                weights,
                cin_g,
                cout_g: 1,
                kernel: k,
                spec: ConvTranspose3dSpec::torch([s; 3], [1; 3], [0; 3]),
            });
            if d + 1 < c.blocks {
                let out = c.compress(ch);
                let mut tb = b.sub(&format!("trans{}", d + 1));
                let norm = BatchNorm::new(&mut tb.sub("norm"), ch, bn_spec())?;
                let reduce = conv_bn(&mut tb.sub("reduce"), ch, out, 1)?;
                let pool = Conv::new(
                    &mut tb.sub("pool"),
                    out,
                    out,
                    [2; 3],
                    down_spec(),
                    true,
                    Init::HeNormalTruncated,
                    ParamKind::ConvWeight,
                )?;
                trans.push(Transition { norm, reduce, pool });
                ch = out;
            }
        }
        let cat = c.blocks * c.classes + f;
        let mut cb = b.sub("classifier");
        let classifier = Classifier {
            norm: BatchNorm::new(&mut cb.sub("norm"), cat, bn_spec())?,
            conv: Conv::new(
                &mut cb.sub("conv"),
                cat,
                c.classes,
                [1; 3],
                Conv3dSpec::default(),
                true,
                Init::HeNormalTruncated,
                ParamKind::ConvWeight,
            )?,
        };
        Ok(Self {
            config,
            stem,
            dense,
            trans,
            ups,
            classifier,
        })
    }

    /// Spatial sizes must be multiples of this (`2^blocks`).
    pub fn input_multiple(&self) -> usize {
        super::model::pow2(self.config.blocks)
    }

    /// Logits `[N, classes, D, H, W]` for input `[N, in_channels, D, H, W]`; spatial
    /// sizes must be multiples of `2^blocks`. `dropout_seed` varies the dropout masks
    /// per step (training mode only).
    pub fn forward(
        &self,
        g: &mut Graph<'_>,
        s: &ParamStore,
        x: Var,
        dropout_seed: u32,
    ) -> Result<Var> {
        let shape = g.value(x)?.shape();
        let m = self.input_multiple();
        if shape.c() != self.config.in_channels
            || shape.n() == 0
            || shape.spatial().iter().any(|&d| d == 0 || d % m != 0)
        {
            return Err(Error::Shape(format!(
                "BuiNet input {shape}: needs {} channels and D, H, W positive multiples of {m}",
                self.config.in_channels
            )));
        }
        // Every value is released after its last use (`Graph::release`, `release_since`
        // with what stays live; the caller's `x` is recorded before any mark), so
        // inference reuses activation buffers.
        let st = &self.stem;
        let mark = g.mark();
        let h = st.conv0.forward_relu(g, s, x, 0)?;
        let h = st.conv1.forward_relu(g, s, h, 0)?;
        let features = st.conv2.forward(g, s, h)?;
        let h = st.norm.forward(g, s, features)?;
        let h = g.relu(h)?;
        let mut h = st.pool.forward(g, s, h)?;
        g.release_since(mark, &[features, h])?;
        let mut ups = Vec::new();
        let mut layer_index = 0u32;
        for (d, layers) in self.dense.iter().enumerate() {
            for layer in layers {
                let mark = g.mark();
                let t = layer.norm.forward(g, s, h)?;
                let t = g.relu(t)?;
                let t = layer.bottleneck.forward_relu(g, s, t, 0)?;
                let t = layer.block.forward(g, s, t, 0)?;
                layer_index += 1;
                let seed =
                    dropout_seed.wrapping_mul(0x9E37_79B1) ^ layer_index.wrapping_mul(0x85EB_CA6B);
                let t = g.dropout(t, self.config.dropout, seed)?;
                let c = g.concat(&[h, t])?;
                g.release(h)?;
                g.release_since(mark, &[c])?;
                h = c;
            }
            let up = &self.ups[d];
            let weights = up
                .weights
                .iter()
                .map(|&w| g.param(s, w))
                .collect::<Result<Vec<_>>>()?;
            let mark = g.mark();
            let u = grouped_conv_transpose3d(g, h, &weights, up.spec)?;
            g.release_since(mark, &[u])?;
            ups.push(u);
            if let Some(t) = self.trans.get(d) {
                let mark = g.mark();
                let r = t.norm.forward(g, s, h)?;
                let r = g.relu(r)?;
                let r = t.reduce.forward_relu(g, s, r, 0)?;
                let p = t.pool.forward(g, s, r)?;
                g.release_since(mark, &[p])?;
                g.release(h)?;
                h = p;
            }
        }
        g.release(h)?;
        ups.push(features);
        let cat = g.concat(&ups)?;
        for u in ups {
            g.release(u)?;
        }
        let c = &self.classifier;
        let mark = g.mark();
        let h = c.norm.forward(g, s, cat)?;
        let h = g.relu(h)?;
        let out = c.conv.forward(g, s, h)?;
        g.release(cat)?;
        g.release_since(mark, &[out])?;
        Ok(out)
    }

    /// Calls `f` on every BatchNorm of the model (e.g. to change momentum for a
    /// statistics recalibration pass).
    pub fn for_each_bn_mut(&mut self, mut f: impl FnMut(&mut BatchNorm)) {
        let st = &mut self.stem;
        st.conv0.bn.iter_mut().for_each(&mut f);
        st.conv1.bn.iter_mut().for_each(&mut f);
        f(&mut st.norm);
        for layer in self.dense.iter_mut().flatten() {
            f(&mut layer.norm);
            layer.bottleneck.bn.iter_mut().for_each(&mut f);
            match &mut layer.block {
                Block::Mixacb(m) => m
                    .groups
                    .iter_mut()
                    .flat_map(|g| g.branches.iter_mut())
                    .for_each(|(_, bn)| f(bn)),
                Block::Conv(c) => c.bn.iter_mut().for_each(&mut f),
                Block::Fused(_) => {}
            }
        }
        for t in &mut self.trans {
            f(&mut t.norm);
            t.reduce.bn.iter_mut().for_each(&mut f);
        }
        f(&mut self.classifier.norm);
    }

    /// This model converted to `form` (MixACB fused per group or merged; with the
    /// folded forms, every conv→BN pair folded into conv+bias too) in a new store with
    /// the same names for the layers that are only copied. The pre-activation BNs
    /// (BN → ReLU → conv) have no conv before them to fold into and stay.
    pub fn convert(
        &self,
        ctx: &GpuContext,
        s: &ParamStore,
        form: ModelForm,
    ) -> Result<(Buinet, ParamStore)> {
        let mut store = ParamStore::new();
        let mut rng = Rng::new(0);
        let mut b = Builder::new(ctx, &mut store, &mut rng);
        let fold = form.folds_bn();
        let st = &self.stem;
        let stem = {
            let mut sb = b.sub("stem");
            Stem {
                conv0: convert_conv_bn(ctx, s, &st.conv0, &mut sb.sub("conv0"), fold)?,
                conv1: convert_conv_bn(ctx, s, &st.conv1, &mut sb.sub("conv1"), fold)?,
                conv2: copy_conv(ctx, s, &st.conv2, &mut sb.sub("conv2"))?,
                norm: copy_bn(ctx, s, &st.norm, &mut sb.sub("norm"))?,
                pool: copy_conv(ctx, s, &st.pool, &mut sb.sub("pool"))?,
            }
        };
        let mut dense = Vec::new();
        for (d, layers) in self.dense.iter().enumerate() {
            let mut db = b.sub(&format!("dense{}", d + 1));
            let mut out = Vec::new();
            for (l, layer) in layers.iter().enumerate() {
                let mut lb = db.sub(&format!("layers.{l}"));
                let norm = copy_bn(ctx, s, &layer.norm, &mut lb.sub("norm"))?;
                let bottleneck =
                    convert_conv_bn(ctx, s, &layer.bottleneck, &mut lb.sub("bottleneck"), fold)?;
                let mut bb = lb.sub(layer.slot);
                let block = match &layer.block {
                    Block::Conv(c) => Block::Conv(convert_conv_bn(ctx, s, c, &mut bb, fold)?),
                    other => other.convert(ctx, s, &mut bb, form)?,
                };
                out.push(DenseLayer {
                    norm,
                    bottleneck,
                    block,
                    slot: layer.slot,
                });
            }
            dense.push(out);
        }
        let mut ups = Vec::new();
        for (d, up) in self.ups.iter().enumerate() {
            let mut ub = b.sub(&format!("up{}", d + 1));
            let shape = [up.cin_g, up.cout_g, up.kernel, up.kernel, up.kernel];
            let len = shape.iter().product();
            let mut weights = Vec::new();
            for (g, &w) in up.weights.iter().enumerate() {
                let v = read_checked(ctx, s, w, len)?;
                weights.push(ub.sub(&format!("groups.{g}")).add(
                    "weight",
                    Shape5(shape),
                    &v,
                    ParamKind::ConvWeight,
                )?);
            }
            ups.push(GroupedUp {
                weights,
                ..up.clone()
            });
        }
        let mut trans = Vec::new();
        for (d, t) in self.trans.iter().enumerate() {
            let mut tb = b.sub(&format!("trans{}", d + 1));
            trans.push(Transition {
                norm: copy_bn(ctx, s, &t.norm, &mut tb.sub("norm"))?,
                reduce: convert_conv_bn(ctx, s, &t.reduce, &mut tb.sub("reduce"), fold)?,
                pool: copy_conv(ctx, s, &t.pool, &mut tb.sub("pool"))?,
            });
        }
        let cl = &self.classifier;
        let mut cb = b.sub("classifier");
        let classifier = Classifier {
            norm: copy_bn(ctx, s, &cl.norm, &mut cb.sub("norm"))?,
            conv: copy_conv(ctx, s, &cl.conv, &mut cb.sub("conv"))?,
        };
        let config = BuinetConfig {
            form,
            ..self.config.clone()
        };
        let model = Buinet {
            config,
            stem,
            dense,
            trans,
            ups,
            classifier,
        };
        Ok((model, store))
    }
}

/// Copies a conv's weight (and bias, if it has one) into `b`.
fn copy_conv(ctx: &GpuContext, s: &ParamStore, c: &Conv, b: &mut Builder<'_>) -> Result<Conv> {
    let shape = [c.cout, c.cin, c.kernel[0], c.kernel[1], c.kernel[2]];
    let w = read_checked(ctx, s, c.weight, shape.iter().product())?;
    let kind = s.entry(c.weight)?.kind;
    let weight = b.add("weight", Shape5(shape), &w, kind)?;
    let bias = match c.bias {
        Some(id) => {
            let v = read_checked(ctx, s, id, c.cout)?;
            Some(b.add(
                "bias",
                Shape5::new(1, c.cout, 1, 1, 1),
                &v,
                ParamKind::Affine,
            )?)
        }
        None => None,
    };
    Ok(Conv {
        weight,
        bias,
        ..c.clone()
    })
}

/// A conv(+BN) copied, or with `fold` its BN folded into a conv with bias.
fn convert_conv_bn(
    ctx: &GpuContext,
    s: &ParamStore,
    cb: &ConvBn,
    b: &mut Builder<'_>,
    fold: bool,
) -> Result<ConvBn> {
    if fold && cb.bn.is_some() {
        return cb.convert(ctx, s, b, true);
    }
    Ok(ConvBn {
        conv: copy_conv(ctx, s, &cb.conv, &mut b.sub("conv"))?,
        bn: cb
            .bn
            .as_ref()
            .map(|bn| copy_bn(ctx, s, bn, &mut b.sub("bn")))
            .transpose()?,
    })
}

/// The gather form of a transposed convolution (see [`grouped_conv_transpose3d`]).
const UP_SRC: &str = include_str!("../../shaders/conv_transpose3d_gather.wgsl");

/// The WGSL this module compiles (name, source), for the portability check.
pub fn shader_variants() -> Vec<(String, String)> {
    vec![("conv_transpose3d_gather".to_string(), UP_SRC.to_string())]
}

/// Records `y[:, out] = conv_transpose3d(x[:, in], w)` (no bias) by gathering, for
/// each output voxel, only the input voxels whose kernel footprint covers it: the cost
/// is that of the transposed convolution itself, not of the stride-dilated dense
/// convolution (`s³` times more) the generic operator runs.
fn up_forward(
    ctx: &GpuContext,
    rec: &mut crate::gpu::Recorder,
    x: ChannelSlice<'_>,
    w: &Tensor,
    y: ChannelSlice<'_>,
    spec: &ConvTranspose3dSpec,
) -> Result<()> {
    let [cin_g, cout_g, kd, kh, kw] = w.shape().0;
    let cubic = |a: [usize; 3]| a[0] == a[1] && a[1] == a[2];
    if !cubic([kd, kh, kw])
        || !cubic(spec.stride)
        || !cubic(spec.pad_lo)
        || spec.pad_lo != spec.pad_hi
        || spec.output_padding != [0; 3]
    {
        return Err(Error::InvalidArgument(format!(
            "BuiNet up-sampling: needs a cubic kernel, stride and padding (weight {}, {spec:?})",
            w.shape()
        )));
    }
    let expect = conv_transpose3d_check(x.tensor.shape(), x.count, w.shape(), None, spec)?;
    let ys = y.tensor.shape();
    if y.count != cout_g || ys.n() != expect.n() || ys.spatial() != expect.spatial() {
        return Err(Error::Shape(format!(
            "BuiNet up-sampling: output '{}' {ys} channels {}..{} do not fit {expect}",
            y.tensor.name,
            y.offset,
            y.offset + y.count
        )));
    }
    let xs = x.tensor.shape();
    let [id, ih, iw] = xs.spatial();
    let [od, oh, ow] = ys.spatial();
    let total = ys.n() * cout_g * od * oh * ow;
    let params = u32s(&[
        total,
        cin_g,
        cout_g,
        xs.c(),
        x.offset,
        ys.c(),
        y.offset,
        id,
        ih,
        iw,
        od,
        oh,
        ow,
        kd,
        spec.stride[0],
        spec.pad_lo[0],
    ])?;
    launch(
        ctx,
        rec,
        PipelineKey::new("buinet_up", "main"),
        UP_SRC,
        &[Arg::Read(x.tensor), Arg::Read(w), Arg::Write(y.tensor)],
        &params,
        total,
    )
}

/// Grouped transposed convolution without bias (PyTorch `ConvTranspose3d(groups=G,
/// bias=False)` with its weight split along the first axis): group `i` reads the
/// `i`-th consecutive range of `x`'s channels and writes the `i`-th range of the
/// output, in place. `weights[i]` is `[Cin/G, Cout/G, k, k, k]` (cubic kernel, stride
/// and padding). Forward gathers (cost of the operator itself); the input gradient
/// is the strided convolution and the weight gradient that convolution's weight
/// gradient, both from `ops::conv_transpose3d`.
pub fn grouped_conv_transpose3d(
    g: &mut Graph<'_>,
    x: Var,
    weights: &[Var],
    spec: ConvTranspose3dSpec,
) -> Result<Var> {
    let xt = g.value(x)?.clone();
    let ws = weights
        .iter()
        .map(|&w| Ok(g.value(w)?.clone()))
        .collect::<Result<Vec<Rc<Tensor>>>>()?;
    let Some(first) = ws.first() else {
        return Err(Error::InvalidArgument(
            "grouped conv_transpose3d: no groups".into(),
        ));
    };
    let [cin_g, cout_g, ..] = first.shape().0;
    if ws.iter().any(|w| w.shape() != first.shape()) || cin_g * ws.len() != xt.shape().c() {
        return Err(Error::Shape(format!(
            "grouped conv_transpose3d: {} groups of weight {} do not tile the {} channels \
             of '{}' {}",
            ws.len(),
            first.shape(),
            xt.shape().c(),
            xt.name,
            xt.shape()
        )));
    }
    let one = conv_transpose3d_check(xt.shape(), cin_g, first.shape(), None, &spec)?;
    let [n, _, d, h, w] = one.0;
    let ctx = g.ctx();
    let y = Rc::new(Tensor::empty(
        ctx,
        Shape5::new(n, cout_g * ws.len(), d, h, w),
        "grouped conv_transpose3d",
    )?);
    for (i, wt) in ws.iter().enumerate() {
        up_forward(
            ctx,
            g.recorder(),
            xt.channels(i * cin_g, cin_g)?,
            wt,
            y.channels(i * cout_g, cout_g)?,
            &spec,
        )?;
    }
    let mut inputs = vec![x];
    inputs.extend_from_slice(weights);
    g.push(
        "grouped_conv_transpose3d",
        y,
        &inputs,
        move |ctx, rec, gy, needs| {
            let mut out: Vec<Option<Tensor>> = vec![None];
            if needs[0] {
                // The groups tile the input channels: each overwrites its own range.
                let dx = Tensor::empty(ctx, xt.shape(), "grouped conv_transpose3d dx")?;
                for (i, wt) in ws.iter().enumerate() {
                    conv_transpose3d_backward_input(
                        ctx,
                        rec,
                        gy.channels(i * cout_g, cout_g)?,
                        wt,
                        dx.channels(i * cin_g, cin_g)?,
                        &spec,
                        Conv3dVariant::Auto,
                    )?;
                }
                out[0] = Some(dx);
            }
            for (i, wt) in ws.iter().enumerate() {
                out.push(if needs[i + 1] {
                    let dw = Tensor::empty(ctx, wt.shape(), "grouped conv_transpose3d dw")?;
                    conv_transpose3d_backward_weight(
                        ctx,
                        rec,
                        xt.channels(i * cin_g, cin_g)?,
                        gy.channels(i * cout_g, cout_g)?,
                        &dw,
                        &spec,
                        Conv3dVariant::Auto,
                    )?;
                    Some(dw)
                } else {
                    None
                });
            }
            Ok(out)
        },
    )
}

impl Network for Buinet {
    type Config = BuinetConfig;
    fn new(
        ctx: &GpuContext,
        store: &mut ParamStore,
        config: BuinetConfig,
        seed: u64,
    ) -> Result<Self> {
        Buinet::new(ctx, store, config, seed)
    }
    fn forward(&self, g: &mut Graph<'_>, store: &ParamStore, x: Var, seed: u32) -> Result<Var> {
        Buinet::forward(self, g, store, x, seed)
    }
    fn convert(
        &self,
        ctx: &GpuContext,
        store: &ParamStore,
        form: ModelForm,
    ) -> Result<(Self, ParamStore)> {
        Buinet::convert(self, ctx, store, form)
    }
    fn config(&self) -> &BuinetConfig {
        &self.config
    }
    fn form(&self) -> ModelForm {
        self.config.form
    }
    fn input_multiple(&self) -> usize {
        Buinet::input_multiple(self)
    }
    fn channels(&self) -> (usize, usize) {
        (self.config.in_channels, self.config.classes)
    }
    fn for_each_bn_mut(&mut self, f: &mut dyn FnMut(&mut BatchNorm)) {
        Buinet::for_each_bn_mut(self, f)
    }
}
