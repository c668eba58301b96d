//! CC-3D-FCN (Nie et al. 2019, "3-D fully convolutional networks for multimodal
//! isointense infant brain image segmentation"), the "convolution and concatenate"
//! 3-D FCN of 3D-MASNet's section 2.5, with MixACB or the baseline 3×3×3 conv+BN in the
//! places the paper replaces.
//!
//! Six groups of 3×3×3 conv layers: three on the way down (2×2×2 max pooling, stride 2,
//! after each), three on the way up, each of those opened by a stride-2 transposed conv
//! of the feature maps below. A 1×1×1 conv (+ ReLU) transforms the features of the
//! down group of the same resolution, which are concatenated with the up-sampled ones
//! before the group's convs fuse them. Xavier (Keras `glorot_uniform`) initialisation
//! everywhere. Widths and layer counts follow the authors' published Caffe definition;
//! every choice and its source is in `docs/models/ccfcn.md`.

use crate::autograd::{Graph, ParamId, ParamKind, ParamStore, Var};
use crate::error::{Error, Result};
use crate::gpu::GpuContext;
use crate::init::Init;
use crate::nn::blocks::{convert_up, Block, BlockKind, ConvBn, ModelForm, UpLayer};
use crate::nn::layers::{read_checked, BatchNorm, Builder, Conv, ConvTranspose};
use crate::nn::mixacb::{fused_conv, FusedMixAcb, MixSpec};
use crate::nn::model::Network;
use crate::ops::conv3d::Conv3dSpec;
use crate::ops::conv_transpose3d::ConvTranspose3dSpec;
use crate::ops::pool::PoolSpec;
use crate::rng::Rng;
use crate::tensor::Shape5;
use serde::{Deserialize, Serialize};

/// CC-3D-FCN hyper-parameters (defaults = Nie et al.'s published network).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CcfcnConfig {
    /// Input modalities (T1, T2).
    pub in_channels: usize,
    /// Output classes (background, CSF, GM, WM).
    pub classes: usize,
    /// 3×3×3 conv layers of each down group, top first (each group ends in a pooling).
    pub encoder_layers: Vec<usize>,
    /// Channels of each down group's convs, top first.
    pub encoder_widths: Vec<usize>,
    /// 3×3×3 conv layers of each up group, bottom first (same count as down groups).
    pub decoder_layers: Vec<usize>,
    /// Channels of the transposed convs and of the up groups' convs.
    pub decoder_width: usize,
    /// Channels of the 1×1×1 transformation convs on the skip paths.
    pub skip_width: usize,
    /// Kernel of the stride-2 transposed convs (output = 2 × input for any k >= 2).
    pub up_kernel: usize,
    /// Kernel of the classifier conv (odd; "same" padding).
    pub head_kernel: usize,
    /// MixACB or conv.
    pub block: BlockKind,
    /// MixACB groups and ratio.
    pub mix: MixSpec,
    /// Parameter form.
    pub form: ModelForm,
}

impl Default for CcfcnConfig {
    fn default() -> Self {
        Self {
            in_channels: 2,
            classes: 4,
            encoder_layers: vec![3, 2, 1],
            encoder_widths: vec![96, 64, 64],
            decoder_layers: vec![1, 2, 2],
            decoder_width: 32,
            skip_width: 32,
            up_kernel: 4,
            head_kernel: 3,
            block: BlockKind::Mixacb,
            mix: MixSpec::default(),
            form: ModelForm::Training,
        }
    }
}

impl CcfcnConfig {
    /// Checks the shape of the configuration (group counts, widths, kernels).
    pub fn validate(&self) -> Result<()> {
        let levels = self.encoder_layers.len();
        let bad = |m: String| Err(Error::InvalidArgument(format!("CC-3D-FCN: {m}")));
        if levels == 0 {
            return bad("needs at least one down group".into());
        }
        if self.encoder_widths.len() != levels || self.decoder_layers.len() != levels {
            return bad(format!(
                "{levels} down groups need {levels} encoder widths and {levels} up groups \
                 (got {} and {})",
                self.encoder_widths.len(),
                self.decoder_layers.len()
            ));
        }
        if levels > 16 {
            return bad(format!("{levels} down groups is more than 16"));
        }
        let zero = |v: &[usize]| v.contains(&0);
        if zero(&self.encoder_layers) || zero(&self.decoder_layers) {
            return bad("every group needs at least one conv layer".into());
        }
        if zero(&self.encoder_widths)
            || self.decoder_width == 0
            || self.skip_width == 0
            || self.in_channels == 0
            || self.classes == 0
        {
            return bad("channel counts must be positive".into());
        }
        if self.up_kernel < 2 {
            return bad(format!(
                "transposed-conv kernel {} must be at least the stride 2",
                self.up_kernel
            ));
        }
        if self.head_kernel.is_multiple_of(2) {
            return bad(format!(
                "classifier kernel {} must be odd",
                self.head_kernel
            ));
        }
        self.mix.validate()
    }
}

/// One 3×3×3 conv layer: a block (MixACB or conv+BN), then ReLU in the forward pass.
#[derive(Clone, Debug)]
struct Layer {
    block: Block,
    /// Sub-module name: `mixacb`, or `conv3` for a conv+BN.
    slot: &'static str,
}

/// An up group: transposed conv + ReLU, 1×1×1 skip conv + ReLU, concat, conv layers.
#[derive(Clone, Debug)]
struct UpGroup {
    /// Stride-2 transposed conv with bias (no BN).
    up: UpLayer,
    /// 1×1×1 transformation conv with bias on the skip path.
    skip: Conv,
    /// Fusion layers.
    layers: Vec<Layer>,
}

/// The whole network.
#[derive(Clone, Debug)]
pub struct Ccfcn {
    /// Its configuration.
    pub config: CcfcnConfig,
    /// Down groups (the first layer of the first group is always a conv+BN).
    down: Vec<Vec<Layer>>,
    /// Up groups, bottom first.
    up: Vec<UpGroup>,
    /// Classifier conv with bias.
    head: Conv,
}

/// Sub-module name of a block of `kind`.
fn slot_name(kind: BlockKind) -> &'static str {
    match kind {
        BlockKind::Mixacb => "mixacb",
        BlockKind::Conv => "conv3",
    }
}

/// Sub-module name of `block` (kept through conversions).
fn slot(block: &Block) -> &'static str {
    match block {
        Block::Conv(_) => slot_name(BlockKind::Conv),
        Block::Mixacb(_) | Block::Fused(_) => slot_name(BlockKind::Mixacb),
    }
}

impl Ccfcn {
    /// Creates a freshly initialised training-form model in `store` (seeded).
    pub fn new(
        ctx: &GpuContext,
        store: &mut ParamStore,
        config: CcfcnConfig,
        seed: u64,
    ) -> Result<Self> {
        if config.form != ModelForm::Training {
            return Err(Error::InvalidArgument(
                "a new model starts in training form; fuse it afterwards".into(),
            ));
        }
        config.validate()?;
        let mut rng = Rng::new(seed);
        let c = &config;
        let (down, up, head) = {
            let mut b = Builder::new(ctx, store, &mut rng);
            let mut ch = c.in_channels;
            let mut taps = Vec::new();
            let mut down = Vec::new();
            for (g, (&n, &width)) in c.encoder_layers.iter().zip(&c.encoder_widths).enumerate() {
                let mut gb = b.sub(&format!("group{}", g + 1));
                let mut layers = Vec::new();
                for l in 0..n {
                    let mut lb = gb.sub(&format!("layers.{l}"));
                    // The input conv sees the modalities: a 3:1 MixACB split of 2
                    // channels leaves the kernel-3 group without input, so it stays a
                    // conv (as DU-Net's initial conv does).
                    let block = if g == 0 && l == 0 {
                        Block::Conv(ConvBn::new(&mut lb.sub("conv3"), ch, width, 3, 1)?)
                    } else {
                        let name = slot_name(c.block);
                        Block::new(&mut lb.sub(name), c.block, &c.mix, ch, width, 1)?
                    };
                    layers.push(Layer {
                        slot: slot(&block),
                        block,
                    });
                    ch = width;
                    if l == 0 {
                        taps.push(ch);
                    }
                }
                down.push(layers);
            }
            let mut up = Vec::new();
            for (i, &n) in c.decoder_layers.iter().enumerate() {
                let mut gb = b.sub(&format!("group{}", c.encoder_layers.len() + i + 1));
                let spec = ConvTranspose3dSpec::keras_same([c.up_kernel; 3], [2; 3]);
                let t = ConvTranspose::new(
                    &mut gb.sub("up").sub("conv"),
                    ch,
                    c.decoder_width,
                    [c.up_kernel; 3],
                    spec,
                    true,
                )?;
                let tap = taps
                    .pop()
                    .ok_or_else(|| Error::InvalidArgument("CC-3D-FCN skip mismatch".into()))?;
                let skip = Conv::new(
                    &mut gb.sub("skip"),
                    tap,
                    c.skip_width,
                    [1; 3],
                    Conv3dSpec::default(),
                    true,
                    Init::GlorotUniform,
                    ParamKind::ConvWeight,
                )?;
                ch = c.skip_width + c.decoder_width;
                let mut layers = Vec::new();
                for l in 0..n {
                    let mut lb = gb.sub(&format!("layers.{l}"));
                    let name = slot_name(c.block);
                    let block =
                        Block::new(&mut lb.sub(name), c.block, &c.mix, ch, c.decoder_width, 1)?;
                    layers.push(Layer {
                        slot: slot(&block),
                        block,
                    });
                    ch = c.decoder_width;
                }
                up.push(UpGroup {
                    up: UpLayer { up: t, bn: None },
                    skip,
                    layers,
                });
            }
            let head = Conv::new(
                &mut b.sub("head"),
                ch,
                c.classes,
                [c.head_kernel; 3],
                Conv3dSpec::same([c.head_kernel; 3]),
                true,
                Init::GlorotUniform,
                ParamKind::Other,
            )?;
            (down, up, head)
        };
        let model = Self {
            config,
            down,
            up,
            head,
        };
        // The shared constructors draw He-normal kernels; CC-3D-FCN uses Xavier
        // (Glorot-uniform) for every kernel, MixACB branches included.
        for (id, shape, transposed) in model.kernels() {
            let v = if transposed {
                Init::GlorotUniform.fill_transposed(&mut rng, shape)?
            } else {
                Init::GlorotUniform.fill(&mut rng, shape)?
            };
            store.set(ctx, id, &v)?;
        }
        Ok(model)
    }

    /// Every conv kernel: (id, shape, whether it is a transposed-conv weight
    /// `[Cin, Cout, k..]`), in creation order.
    fn kernels(&self) -> Vec<(ParamId, [usize; 5], bool)> {
        fn conv(c: &Conv, out: &mut Vec<(ParamId, [usize; 5], bool)>) {
            let [kd, kh, kw] = c.kernel;
            out.push((c.weight, [c.cout, c.cin, kd, kh, kw], false));
        }
        fn block(b: &Block, out: &mut Vec<(ParamId, [usize; 5], bool)>) {
            match b {
                Block::Conv(cb) => conv(&cb.conv, out),
                Block::Mixacb(m) => m
                    .groups
                    .iter()
                    .flat_map(|g| g.branches.iter())
                    .for_each(|(c, _)| conv(c, out)),
                Block::Fused(FusedMixAcb::Merged(c)) => conv(c, out),
                Block::Fused(FusedMixAcb::Groups { groups, .. }) => {
                    groups.iter().for_each(|(_, _, c)| conv(c, out))
                }
            }
        }
        let mut out = Vec::new();
        for layer in self.down.iter().flatten() {
            block(&layer.block, &mut out);
        }
        for u in &self.up {
            let t = &u.up.up;
            let [kd, kh, kw] = t.kernel;
            out.push((t.weight, [t.cin, t.cout, kd, kh, kw], true));
            conv(&u.skip, &mut out);
            for layer in &u.layers {
                block(&layer.block, &mut out);
            }
        }
        conv(&self.head, &mut out);
        out
    }

    /// Spatial sizes must be multiples of this (`2^down groups`).
    pub fn input_multiple(&self) -> usize {
        super::model::pow2(self.config.encoder_layers.len())
    }

    /// Logits `[N, classes, D, H, W]` for input `[N, in_channels, D, H, W]`; spatial
    /// sizes must be multiples of [`Ccfcn::input_multiple`]. No dropout.
    pub fn forward(&self, g: &mut Graph<'_>, s: &ParamStore, x: Var) -> Result<Var> {
        let shape = g.value(x)?.shape();
        let m = self.input_multiple();
        if shape.c() != self.config.in_channels || shape.spatial().iter().any(|&d| d % m != 0) {
            return Err(Error::Shape(format!(
                "CC-3D-FCN input {shape}: needs {} channels and D, H, W multiples of {m}",
                self.config.in_channels
            )));
        }
        // Every value is released after its last use (see `Graph::release`; not `x`, the
        // caller's), so inference reuses activation buffers.
        let mut h = x;
        let mut taps = Vec::new();
        for layers in &self.down {
            for (l, layer) in layers.iter().enumerate() {
                let y = layer.block.forward(g, s, h, 0)?;
                let r = g.relu(y)?;
                g.release(y)?;
                if h != x && !taps.contains(&h) {
                    g.release(h)?;
                }
                h = r;
                // Nie et al.'s definition taps each down group after its first layer.
                if l == 0 {
                    taps.push(h);
                }
            }
            let p = g.maxpool3d(h, PoolSpec::cube(2, 2, 0))?;
            if h != x && !taps.contains(&h) {
                g.release(h)?;
            }
            h = p;
        }
        for u in &self.up {
            let mark = g.mark();
            let t = u.up.up.forward(g, s, h)?;
            let t = match &u.up.bn {
                Some(bn) => bn.forward(g, s, t)?,
                None => t,
            };
            let t = g.relu(t)?;
            let tap = taps
                .pop()
                .ok_or_else(|| Error::InvalidArgument("CC-3D-FCN skip mismatch".into()))?;
            let k = u.skip.forward(g, s, tap)?;
            let k = g.relu(k)?;
            let c = g.concat(&[k, t])?;
            g.release(h)?;
            g.release(tap)?;
            g.release_since(mark, &[c])?;
            h = c;
            for layer in &u.layers {
                let y = layer.block.forward(g, s, h, 0)?;
                let r = g.relu(y)?;
                g.release(y)?;
                g.release(h)?;
                h = r;
            }
        }
        let out = self.head.forward(g, s, h)?;
        if h != x {
            g.release(h)?;
        }
        Ok(out)
    }

    /// Calls `f` on every BatchNorm of the model.
    pub fn for_each_bn_mut(&mut self, f: &mut dyn FnMut(&mut BatchNorm)) {
        let mut block = |b: &mut Block| match b {
            Block::Mixacb(m) => m
                .groups
                .iter_mut()
                .flat_map(|g| g.branches.iter_mut())
                .for_each(|(_, bn)| f(bn)),
            Block::Conv(c) => c.bn.iter_mut().for_each(&mut *f),
            Block::Fused(_) => {}
        };
        for layer in self.down.iter_mut().flatten() {
            block(&mut layer.block);
        }
        for u in &mut self.up {
            for layer in &mut u.layers {
                block(&mut layer.block);
            }
        }
        // The transposed convs have no BN (Nie et al.); kept general for the UpLayer.
        for u in &mut self.up {
            u.up.bn.iter_mut().for_each(&mut *f);
        }
    }

    /// This model converted to `form` (MixACB fused per group or merged; with
    /// `Folded`/`FoldedMerged` every conv+BN folded too) in a new store, same names for
    /// the layers that are only copied.
    pub fn convert(
        &self,
        ctx: &GpuContext,
        s: &ParamStore,
        form: ModelForm,
    ) -> Result<(Ccfcn, ParamStore)> {
        if form == ModelForm::Training && self.config.form != ModelForm::Training {
            return Err(Error::InvalidArgument(format!(
                "cannot un-fuse a CC-3D-FCN in {:?} form",
                self.config.form
            )));
        }
        let mut store = ParamStore::new();
        let mut rng = Rng::new(0);
        let mut b = Builder::new(ctx, &mut store, &mut rng);
        let fold = form.folds_bn();
        let convert_layers = |layers: &[Layer], gb: &mut Builder<'_>| -> Result<Vec<Layer>> {
            let mut out = Vec::new();
            for (l, layer) in layers.iter().enumerate() {
                let mut lb = gb.sub(&format!("layers.{l}"));
                let block = layer.block.convert(ctx, s, &mut lb.sub(layer.slot), form)?;
                out.push(Layer {
                    block,
                    slot: layer.slot,
                });
            }
            Ok(out)
        };
        let mut down = Vec::new();
        for (g, layers) in self.down.iter().enumerate() {
            let mut gb = b.sub(&format!("group{}", g + 1));
            down.push(convert_layers(layers, &mut gb)?);
        }
        let mut up = Vec::new();
        for (i, u) in self.up.iter().enumerate() {
            let mut gb = b.sub(&format!("group{}", self.down.len() + i + 1));
            let t = convert_up(ctx, s, &u.up, &mut gb.sub("up"), fold)?;
            let skip = copy_conv(ctx, s, &u.skip, &mut gb.sub("skip"), ParamKind::ConvWeight)?;
            let layers = convert_layers(&u.layers, &mut gb)?;
            up.push(UpGroup {
                up: t,
                skip,
                layers,
            });
        }
        let head = copy_conv(ctx, s, &self.head, &mut b.sub("head"), ParamKind::Other)?;
        let config = CcfcnConfig {
            form,
            ..self.config.clone()
        };
        Ok((
            Ccfcn {
                config,
                down,
                up,
                head,
            },
            store,
        ))
    }
}

/// A conv with bias copied into `b` (`weight` of `kind`, `bias` affine).
fn copy_conv(
    ctx: &GpuContext,
    s: &ParamStore,
    c: &Conv,
    b: &mut Builder<'_>,
    kind: ParamKind,
) -> Result<Conv> {
    let [kd, kh, kw] = c.kernel;
    let shape = [c.cout, c.cin, kd, kh, kw];
    let w = read_checked(ctx, s, c.weight, shape.iter().product())?;
    let bias = match c.bias {
        Some(id) => read_checked(ctx, s, id, c.cout)?,
        None => vec![0.0; c.cout],
    };
    if kind == ParamKind::ConvWeight {
        return fused_conv(b, shape, &w, &bias, c.spec);
    }
    let weight = b.add("weight", Shape5(shape), &w, kind)?;
    let bias = b.add(
        "bias",
        Shape5::new(1, c.cout, 1, 1, 1),
        &bias,
        ParamKind::Affine,
    )?;
    Ok(Conv {
        weight,
        bias: Some(bias),
        ..c.clone()
    })
}

impl Network for Ccfcn {
    type Config = CcfcnConfig;
    fn new(
        ctx: &GpuContext,
        store: &mut ParamStore,
        config: CcfcnConfig,
        seed: u64,
    ) -> Result<Self> {
        Ccfcn::new(ctx, store, config, seed)
    }
    fn forward(&self, g: &mut Graph<'_>, store: &ParamStore, x: Var, _seed: u32) -> Result<Var> {
        Ccfcn::forward(self, g, store, x)
    }
    fn convert(
        &self,
        ctx: &GpuContext,
        store: &ParamStore,
        form: ModelForm,
    ) -> Result<(Self, ParamStore)> {
        Ccfcn::convert(self, ctx, store, form)
    }
    fn config(&self) -> &CcfcnConfig {
        &self.config
    }
    fn form(&self) -> ModelForm {
        self.config.form
    }
    fn input_multiple(&self) -> usize {
        Ccfcn::input_multiple(self)
    }
    fn channels(&self) -> (usize, usize) {
        (self.config.in_channels, self.config.classes)
    }
    fn for_each_bn_mut(&mut self, f: &mut dyn FnMut(&mut BatchNorm)) {
        Ccfcn::for_each_bn_mut(self, f)
    }
}
