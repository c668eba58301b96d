//! DU-Net (densely connected U-Net) as configured in 3D-MASNet, with MixACB or the
//! baseline 3×3×3 conv+BN in the dense layers and down transitions; the training
//! form, the fused inference form and the fully folded form share this definition.
//! Layer-by-layer reference: `../shared/reference/dunet-mixacb-spec.md`, summarised in
//! `docs/models.md`.

use crate::autograd::{ConvGroup, Graph, Mode, ParamKind, ParamStore, Var};
use crate::error::{Error, Result};
use crate::gpu::GpuContext;
use crate::init::Init;
use crate::nn::blocks::convert_up;
pub use crate::nn::blocks::{bn_spec, Block, BlockKind, ConvBn, ModelForm, UpLayer};
use crate::nn::layers::{read_checked, BatchNorm, Builder, Conv, ConvTranspose};
use crate::nn::mixacb::{FusedMixAcb, MixSpec};
use crate::ops::conv3d::Conv3dSpec;
use crate::ops::conv_transpose3d::ConvTranspose3dSpec;
use crate::rng::Rng;
use crate::tensor::Shape5;
use serde::{Deserialize, Serialize};

/// DU-Net hyper-parameters (defaults = the paper's).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DunetConfig {
    /// Input modalities (T1, T2).
    pub in_channels: usize,
    /// Output classes (background, CSF, GM, WM).
    pub classes: usize,
    /// Channels of the initial conv.
    pub init_features: usize,
    /// Channels each dense layer adds.
    pub growth: usize,
    /// Dense layers per dense block.
    pub layers_per_block: usize,
    /// Width of the 1×1×1 bottleneck.
    pub bottleneck: usize,
    /// Down transitions (the U has `2 * levels + 1` dense blocks).
    pub levels: usize,
    /// Dropout after each dense layer's block (training only).
    pub dropout: f32,
    /// MixACB or conv.
    pub block: BlockKind,
    /// MixACB groups and ratio.
    pub mix: MixSpec,
    /// Parameter form.
    pub form: ModelForm,
}

impl Default for DunetConfig {
    fn default() -> Self {
        Self {
            in_channels: 2,
            classes: 4,
            init_features: 32,
            growth: 16,
            layers_per_block: 3,
            bottleneck: 64,
            levels: 3,
            dropout: 0.1,
            block: BlockKind::Mixacb,
            mix: MixSpec::default(),
            form: ModelForm::Training,
        }
    }
}

/// Dense layer: 1×1×1 bottleneck conv+BN+ReLU, block, ReLU, dropout.
#[derive(Clone, Debug)]
pub struct DenseLayer {
    /// 1×1×1 conv + BN.
    pub bottleneck: ConvBn,
    /// MixACB or conv.
    pub block: Block,
    /// Slot name of the block (`mixacb` or `conv3`).
    slot: &'static str,
}

impl DenseLayer {
    /// Inference (no-grad): the layer on channels `..c` of `buf`, its new channels
    /// written at `c..`. A folded bottleneck feeding a per-group MixACB stores its
    /// result straight in the packed layout the groups read (`pointwise_into_groups`).
    fn forward_into(&self, g: &mut Graph<'_>, s: &ParamStore, buf: Var, c: usize) -> Result<()> {
        if let (None, Block::Fused(FusedMixAcb::Groups { groups, .. })) =
            (&self.bottleneck.bn, &self.block)
        {
            let mut gs = Vec::new();
            for (io, oo, conv) in groups {
                gs.push(ConvGroup {
                    in_offset: *io,
                    out_offset: c + oo,
                    weight: g.param(s, conv.weight)?,
                    bias: conv.bias.map(|b| g.param(s, b)).transpose()?,
                    spec: conv.spec.with_relu(true),
                });
            }
            let conv = &self.bottleneck.conv;
            let w = g.param(s, conv.weight)?;
            let b = conv.bias.map(|b| g.param(s, b)).transpose()?;
            return g.pointwise_into_groups(buf, 0, w, b, conv.spec.with_relu(true), &gs, buf);
        }
        let b = self.bottleneck.forward_relu(g, s, buf, 0)?;
        self.block.forward_relu_into(g, s, b, 0, buf, c)?;
        g.release(b)
    }
}

/// The whole network.
#[derive(Clone, Debug)]
pub struct Dunet {
    /// Its configuration.
    pub config: DunetConfig,
    init: ConvBn,
    dense: Vec<Vec<DenseLayer>>,
    down: Vec<(Block, Block)>,
    up: Vec<UpLayer>,
    head: Conv,
}

fn slot(kind: BlockKind) -> &'static str {
    match kind {
        BlockKind::Mixacb => "mixacb",
        BlockKind::Conv => "conv3",
    }
}

impl Dunet {
    /// Creates a freshly initialised training-form model in `store` (seeded).
    pub fn new(
        ctx: &GpuContext,
        store: &mut ParamStore,
        config: DunetConfig,
        seed: u64,
    ) -> Result<Self> {
        if config.form != ModelForm::Training {
            return Err(Error::InvalidArgument(
                "a new model starts in training form; fuse it afterwards".into(),
            ));
        }
        if config.levels == 0 || config.layers_per_block == 0 || config.growth == 0 {
            return Err(Error::InvalidArgument(format!(
                "DU-Net needs levels, layers per block and growth >= 1 (got {}, {}, {})",
                config.levels, config.layers_per_block, config.growth
            )));
        }
        if !(0.0..1.0).contains(&config.dropout) {
            return Err(Error::InvalidArgument(format!(
                "dropout {} must be in [0, 1)",
                config.dropout
            )));
        }
        let mut rng = Rng::new(seed);
        let mut b = Builder::new(ctx, store, &mut rng);
        let c = &config;
        let init = ConvBn::new(&mut b.sub("init"), c.in_channels, c.init_features, 3, 1)?;
        let mut ch = c.init_features;
        let mut dense = Vec::new();
        let mut down = Vec::new();
        let mut up = Vec::new();
        let mut skips = Vec::new();
        let blocks = 2 * c.levels + 1;
        for d in 0..blocks {
            let mut db = b.sub(&format!("dense{}", d + 1));
            let mut layers = Vec::new();
            for l in 0..c.layers_per_block {
                let mut lb = db.sub(&format!("layers.{l}"));
                let bottleneck = ConvBn::new(&mut lb.sub("bottleneck"), ch, c.bottleneck, 1, 1)?;
                let block = Block::new(
                    &mut lb.sub(slot(c.block)),
                    c.block,
                    &c.mix,
                    c.bottleneck,
                    c.growth,
                    1,
                )?;
                layers.push(DenseLayer {
                    bottleneck,
                    block,
                    slot: slot(c.block),
                });
                ch += c.growth;
            }
            dense.push(layers);
            if d < c.levels {
                skips.push(ch);
                let half = ch / 2;
                let mut tb = b.sub(&format!("down{}", d + 1));
                let reduce = Block::new(&mut tb.sub("reduce"), c.block, &c.mix, ch, half, 1)?;
                let strided = Block::new(&mut tb.sub("strided"), c.block, &c.mix, half, half, 2)?;
                down.push((reduce, strided));
                ch = half;
            } else if d < blocks - 1 {
                let half = ch / 2;
                let mut ub = b.sub(&format!("up{}", d + 1));
                let spec = ConvTranspose3dSpec::keras_same([3; 3], [2; 3]);
                let t = ConvTranspose::new(&mut ub.sub("conv"), ch, half, [3; 3], spec, true)?;
                let bn = Some(BatchNorm::new(&mut ub.sub("bn"), half, bn_spec())?);
                up.push(UpLayer { up: t, bn });
                let skip = skips
                    .pop()
                    .ok_or_else(|| Error::InvalidArgument("DU-Net skip mismatch".into()))?;
                ch = skip + half;
            }
        }
        let head = Conv::new(
            &mut b.sub("head"),
            ch,
            c.classes,
            [1; 3],
            Conv3dSpec::default(),
            false,
            Init::GlorotUniform,
            ParamKind::Other,
        )?;
        Ok(Self {
            config,
            init,
            dense,
            down,
            up,
            head,
        })
    }

    /// For encoder dense block `d`: the up-sampling layer feeding its decoder block and
    /// that block's layer count.
    fn decoder_of(&self, d: usize) -> Option<(&UpLayer, usize)> {
        let levels = self.config.levels;
        if d >= levels {
            return None;
        }
        let up = self.up.get(levels - d - 1)?;
        Some((up, self.dense.get(2 * levels - d)?.len()))
    }

    /// Logits `[N, classes, D, H, W]` for input `[N, in_channels, D, H, W]`; spatial
    /// sizes must be multiples of `2^levels`. `dropout_seed` varies the dropout masks
    /// per step (training mode only).
    pub fn forward(
        &self,
        g: &mut Graph<'_>,
        s: &ParamStore,
        x: Var,
        dropout_seed: u32,
    ) -> Result<Var> {
        let shape = g.value(x)?.shape();
        let m = super::model::pow2(self.config.levels);
        if shape.c() != self.config.in_channels || shape.spatial().iter().any(|&d| d % m != 0) {
            return Err(Error::Shape(format!(
                "DU-Net input {shape}: needs {} channels and D, H, W multiples of {m}",
                self.config.in_channels
            )));
        }
        // Each stage's input as channel parts (the decoder's skip and up-sampled
        // tensor); every value is released after its last use, so inference reuses
        // buffers by liveness and training keeps only what backward closures hold.
        let mut parts = vec![Part::Value(self.init.forward_relu(g, s, x, 0)?)];
        let mut skips = Vec::new();
        let mut layer_index = 0u32;
        // Channels of the current block's buffer in use (in-place inference).
        let mut used = 0;
        // Inference writes each dense block's concatenation into one buffer through
        // channel offsets (no copies of the growing input per layer).
        let in_place = !g.grad_enabled() && g.mode() == Mode::Eval;
        for (d, layers) in self.dense.iter().enumerate() {
            let mut h = if in_place {
                let mut shapes = Vec::new();
                for p in &parts {
                    shapes.push(match p {
                        Part::Value(v) => g.value(*v)?.shape(),
                        Part::Held(v, used) => {
                            let [n, _, dd, hh, ww] = g.value(*v)?.shape().0;
                            Shape5::new(n, *used, dd, hh, ww)
                        }
                        Part::Up(v, u) => {
                            let hs = g.value(*v)?.shape();
                            let [od, oh, ow] =
                                u.up.spec.output_spatial(hs.spatial(), u.up.kernel)?;
                            Shape5::new(hs.n(), u.up.cout, od, oh, ow)
                        }
                    });
                }
                let c0: usize = shapes.iter().map(|s| s.c()).sum();
                let total = c0 + layers.len() * self.config.growth;
                let [n, _, dd, hh, ww] = shapes[0].0;
                let buf = match parts.first() {
                    // The encoder's buffer already holds the skip and has room for the rest.
                    Some(Part::Held(v, _)) => {
                        let have = g.value(*v)?.shape().c();
                        if have < total {
                            return Err(Error::InvalidArgument(format!(
                                "DU-Net: dense block {d} needs {total} channels, its buffer has {have}"
                            )));
                        }
                        *v
                    }
                    _ => {
                        // An encoder block also leaves room for its decoder: the
                        // up-sampled channels and the decoder's layers (no skip copy).
                        let room = match self.decoder_of(d) {
                            Some((up, dec)) => up.up.cout + dec * self.config.growth,
                            None => 0,
                        };
                        g.buffer(Shape5::new(n, total + room, dd, hh, ww), "dense block")?
                    }
                };
                let mut c = 0;
                for (p, ps) in parts.iter().zip(&shapes) {
                    match p {
                        Part::Held(..) => {}
                        Part::Value(v) => {
                            g.write_channels(*v, buf, c)?;
                            g.release(*v)?;
                        }
                        // Transposed conv + bias + ReLU straight into the buffer.
                        Part::Up(v, u) => {
                            let w = g.param(s, u.up.weight)?;
                            let b = u.up.bias.map(|b| g.param(s, b)).transpose()?;
                            g.conv_transpose3d_into(*v, w, b, u.up.spec.with_relu(true), buf, c)?;
                            g.release(*v)?;
                        }
                    }
                    c += ps.c();
                }
                for layer in layers {
                    layer.forward_into(g, s, buf, c)?;
                    c += self.config.growth;
                }
                used = c;
                buf
            } else {
                let mut vs = Vec::new();
                for p in &parts {
                    match p {
                        Part::Value(v) => vs.push(*v),
                        Part::Held(..) | Part::Up(..) => {
                            return Err(Error::InvalidArgument(
                                "DU-Net: a pending up-sampling outside in-place inference".into(),
                            ))
                        }
                    }
                }
                // Gradient graphs too: one buffer per block, each part and each layer's
                // new channels appended (`append_channels`), every layer reading the
                // channels so far, so backward holds one buffer, not every layer's
                // growing concatenation.
                let mut shapes = Vec::new();
                for &v in &vs {
                    shapes.push(g.value(v)?.shape());
                }
                match (vs.as_slice(), layers.is_empty()) {
                    ([one], true) => *one,
                    _ => {
                        let c0: usize = shapes.iter().map(|s| s.c()).sum();
                        let [n, _, dd, hh, ww] = shapes[0].0;
                        let total = c0 + layers.len() * self.config.growth;
                        let mut h = g.buffer(Shape5::new(n, total, dd, hh, ww), "dense block")?;
                        let mut c = 0;
                        for (&v, vs) in vs.iter().zip(&shapes) {
                            let next = g.append_channels(h, v, c)?;
                            g.release(h)?;
                            g.release(v)?;
                            h = next;
                            c += vs.c();
                        }
                        used = c;
                        h
                    }
                }
            };
            for layer in layers.iter().filter(|_| !in_place) {
                let b = layer.bottleneck.forward_relu(g, s, h, 0)?;
                let n = layer.block.forward_relu(g, s, b, 0)?;
                g.release(b)?;
                layer_index += 1;
                let seed =
                    dropout_seed.wrapping_mul(0x9E37_79B1) ^ layer_index.wrapping_mul(0x85EB_CA6B);
                let dropped = g.dropout(n, self.config.dropout, seed)?;
                let next = g.append_channels(h, dropped, used)?;
                used += self.config.growth;
                for v in [h, n, dropped] {
                    g.release(v)?;
                }
                h = next;
            }
            if let Some((reduce, strided)) = self.down.get(d) {
                skips.push((h, used));
                let r = reduce.forward_relu(g, s, h, 0)?;
                parts = vec![Part::Value(strided.forward_relu(g, s, r, 0)?)];
                g.release(r)?;
            } else if let Some(u) = self.up.get(d - self.config.levels) {
                let (skip, skip_used) = skips
                    .pop()
                    .ok_or_else(|| Error::InvalidArgument("DU-Net skip mismatch".into()))?;
                let first = if in_place {
                    Part::Held(skip, skip_used)
                } else {
                    Part::Value(skip)
                };
                if in_place && u.bn.is_none() {
                    // Written by the next block straight into its buffer.
                    parts = vec![first, Part::Up(h, u)];
                    continue;
                }
                let t = u.up.forward(g, s, h)?;
                g.release(h)?;
                let r = match &u.bn {
                    Some(bn) => bn.forward_relu_release(g, s, t)?,
                    None => {
                        let r = g.relu(t)?;
                        g.release(t)?;
                        r
                    }
                };
                parts = vec![first, Part::Value(r)];
            } else {
                parts = vec![Part::Value(h)];
            }
        }
        let h = match parts.as_slice() {
            [Part::Value(one)] => *one,
            _ => return Err(Error::InvalidArgument("DU-Net ends in a skip".into())),
        };
        let out = self.head.forward(g, s, h)?;
        g.release(h)?;
        Ok(out)
    }

    /// Calls `f` on every BatchNorm of the model (e.g. to change momentum for a
    /// statistics recalibration pass).
    pub fn for_each_bn_mut(&mut self, mut f: impl FnMut(&mut BatchNorm)) {
        let block = |b: &mut Block, f: &mut dyn FnMut(&mut BatchNorm)| match b {
            Block::Mixacb(m) => m
                .groups
                .iter_mut()
                .flat_map(|g| g.branches.iter_mut())
                .for_each(|(_, bn)| f(bn)),
            Block::Conv(c) => c.bn.iter_mut().for_each(f),
            Block::Fused(_) => {}
        };
        self.init.bn.iter_mut().for_each(&mut f);
        for layer in self.dense.iter_mut().flatten() {
            layer.bottleneck.bn.iter_mut().for_each(&mut f);
            block(&mut layer.block, &mut f);
        }
        for (r, s) in &mut self.down {
            block(r, &mut f);
            block(s, &mut f);
        }
        for u in &mut self.up {
            u.bn.iter_mut().for_each(&mut f);
        }
    }

    /// This model converted to `form` (MixACB fused per group or merged; with
    /// `Folded`, every other BN folded too) in a new store with the same names for the
    /// layers that are only copied.
    pub fn convert(
        &self,
        ctx: &GpuContext,
        s: &ParamStore,
        form: ModelForm,
    ) -> Result<(Dunet, ParamStore)> {
        let mut store = ParamStore::new();
        let mut rng = Rng::new(0);
        let mut b = Builder::new(ctx, &mut store, &mut rng);
        let fold = form.folds_bn();
        let init = self.init.convert(ctx, s, &mut b.sub("init"), fold)?;
        let mut dense = Vec::new();
        for (d, layers) in self.dense.iter().enumerate() {
            let mut db = b.sub(&format!("dense{}", d + 1));
            let mut out = Vec::new();
            for (l, layer) in layers.iter().enumerate() {
                let mut lb = db.sub(&format!("layers.{l}"));
                out.push(DenseLayer {
                    bottleneck: layer.bottleneck.convert(
                        ctx,
                        s,
                        &mut lb.sub("bottleneck"),
                        fold,
                    )?,
                    block: layer.block.convert(ctx, s, &mut lb.sub(layer.slot), form)?,
                    slot: layer.slot,
                });
            }
            dense.push(out);
        }
        let mut down = Vec::new();
        for (i, (r, st)) in self.down.iter().enumerate() {
            let mut tb = b.sub(&format!("down{}", i + 1));
            let r = r.convert(ctx, s, &mut tb.sub("reduce"), form)?;
            let st = st.convert(ctx, s, &mut tb.sub("strided"), form)?;
            down.push((r, st));
        }
        let mut up = Vec::new();
        for (i, u) in self.up.iter().enumerate() {
            let mut ub = b.sub(&format!("up{}", self.config.levels + i + 1));
            up.push(convert_up(ctx, s, u, &mut ub, fold)?);
        }
        let h = &self.head;
        let hw = read_checked(ctx, s, h.weight, h.cout * h.cin)?;
        let head = Conv {
            weight: b.sub("head").add(
                "weight",
                Shape5::new(h.cout, h.cin, 1, 1, 1),
                &hw,
                ParamKind::Other,
            )?,
            ..h.clone()
        };
        let config = DunetConfig {
            form,
            ..self.config.clone()
        };
        let model = Dunet {
            config,
            init,
            dense,
            down,
            up,
            head,
        };
        Ok((model, store))
    }
}

/// A channel part of a dense block's input: a value, or the decoder's up-sampling of a
/// value (transposed conv + ReLU) that in-place inference writes straight into the
/// block's buffer.
enum Part<'m> {
    Value(Var),
    /// An encoder block's buffer holding this many channels (the skip), with room for
    /// the decoder block's other parts and layers.
    Held(Var, usize),
    Up(Var, &'m UpLayer),
}
