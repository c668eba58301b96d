//! 3D U-Net (Çiçek et al. 2016) as configured in 3D-MASNet (section 2.5): four
//! resolution levels with one 3×3×3 conv + BN + ReLU per level and path, 2×2×2 max
//! pooling down, 2×2×2 stride-2 transposed convs up, and same-level features summed
//! (not concatenated). Every 3×3×3 conv except the input conv is a [`Block`] slot
//! (MixACB or the baseline conv+BN); the training form and every inference form share
//! this definition. Choices and parameter counts: `docs/models/unet3d.md`.

use crate::autograd::{Graph, ParamKind, ParamStore, Var};
use crate::error::{Error, Result};
use crate::gpu::GpuContext;
use crate::init::Init;
use crate::nn::blocks::{convert_up, Block, BlockKind, ConvBn, ModelForm, UpLayer};
use crate::nn::layers::{read_checked, BatchNorm, Builder, Conv, ConvTranspose};
use crate::nn::mixacb::MixSpec;
use crate::nn::model::Network;
use crate::ops::conv3d::Conv3dSpec;
use crate::ops::conv_transpose3d::ConvTranspose3dSpec;
use crate::ops::pool::PoolSpec;
use crate::rng::Rng;
use crate::tensor::Shape5;
use serde::{Deserialize, Serialize};

/// Most resolution levels accepted (keeps `2^(levels-1)` far from overflow).
const MAX_LEVELS: usize = 12;

/// 3D U-Net hyper-parameters (defaults = the configuration in `docs/models/unet3d.md`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Unet3dConfig {
    /// Input modalities (T1, T2).
    pub in_channels: usize,
    /// Output classes (background, CSF, GM, WM).
    pub classes: usize,
    /// Channels of each resolution level, finest first; the last is the bottom level.
    /// `widths.len()` is the number of levels (the paper: 4).
    pub widths: Vec<usize>,
    /// MixACB or conv in every 3×3×3 conv but the input conv.
    pub block: BlockKind,
    /// MixACB groups and ratio.
    pub mix: MixSpec,
    /// Parameter form.
    pub form: ModelForm,
}

impl Default for Unet3dConfig {
    fn default() -> Self {
        Self {
            in_channels: 2,
            classes: 4,
            widths: vec![32, 64, 128, 256],
            block: BlockKind::Mixacb,
            mix: MixSpec::default(),
            form: ModelForm::Training,
        }
    }
}

impl Unet3dConfig {
    /// Resolution levels (`widths.len()`).
    pub fn levels(&self) -> usize {
        self.widths.len()
    }

    /// Checks sizes: at least two levels, every width, channel and class count >= 1.
    pub fn validate(&self) -> Result<()> {
        if !(2..=MAX_LEVELS).contains(&self.levels()) {
            return Err(Error::InvalidArgument(format!(
                "3D U-Net widths {:?}: needs 2 to {MAX_LEVELS} levels",
                self.widths
            )));
        }
        if self.widths.contains(&0) || self.in_channels == 0 || self.classes == 0 {
            return Err(Error::InvalidArgument(format!(
                "3D U-Net needs widths, in_channels and classes >= 1 (got widths {:?}, \
                 in_channels {}, classes {})",
                self.widths, self.in_channels, self.classes
            )));
        }
        self.mix.validate()
    }
}

/// The whole network.
#[derive(Clone, Debug)]
pub struct Unet3d {
    /// Its configuration.
    pub config: Unet3dConfig,
    /// Level-1 input conv (3×3×3, bias, BN): never a MixACB.
    input: ConvBn,
    /// Encoder blocks of levels 2..=L (the last is the bottom), each after a max pool.
    enc: Vec<Block>,
    /// Up layers to levels L-1 down to 1 (2×2×2 stride-2 transposed conv, bias, no BN).
    up: Vec<UpLayer>,
    /// Decoder blocks of levels L-1 down to 1, each after the skip sum.
    dec: Vec<Block>,
    /// 1×1×1 conv to the classes (no bias).
    head: Conv,
    /// Slot name of the blocks (`mixacb` or `conv3`).
    slot: &'static str,
}

fn slot(kind: BlockKind) -> &'static str {
    match kind {
        BlockKind::Mixacb => "mixacb",
        BlockKind::Conv => "conv3",
    }
}

fn up_spec() -> ConvTranspose3dSpec {
    // k = s = 2: no overlap, output = 2 × input.
    ConvTranspose3dSpec::keras_same([2; 3], [2; 3])
}

impl Unet3d {
    /// Creates a freshly initialised training-form model in `store` (seeded).
    pub fn new(
        ctx: &GpuContext,
        store: &mut ParamStore,
        config: Unet3dConfig,
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
        let w = &c.widths;
        let levels = c.levels();
        let slot = slot(c.block);
        let input = ConvBn::new(&mut b.sub("enc1"), c.in_channels, w[0], 3, 1)?;
        let mut enc = Vec::new();
        for l in 1..levels {
            let mut lb = b.sub(&format!("enc{}", l + 1));
            enc.push(Block::new(
                &mut lb.sub(slot),
                c.block,
                &c.mix,
                w[l - 1],
                w[l],
                1,
            )?);
        }
        let mut up = Vec::new();
        let mut dec = Vec::new();
        for l in (0..levels - 1).rev() {
            let mut ub = b.sub(&format!("up{}", l + 1));
            let t =
                ConvTranspose::new(&mut ub.sub("conv"), w[l + 1], w[l], [2; 3], up_spec(), true)?;
            up.push(UpLayer { up: t, bn: None });
            let mut db = b.sub(&format!("dec{}", l + 1));
            dec.push(Block::new(
                &mut db.sub(slot),
                c.block,
                &c.mix,
                w[l],
                w[l],
                1,
            )?);
        }
        let head = Conv::new(
            &mut b.sub("head"),
            w[0],
            c.classes,
            [1; 3],
            Conv3dSpec::default(),
            false,
            Init::GlorotUniform,
            ParamKind::Other,
        )?;
        Ok(Self {
            config,
            input,
            enc,
            up,
            dec,
            head,
            slot,
        })
    }

    /// Spatial sizes must be multiples of this: `2^(levels - 1)`.
    pub fn input_multiple(&self) -> usize {
        1 << (self.config.levels() - 1)
    }

    /// Logits `[N, classes, D, H, W]` for input `[N, in_channels, D, H, W]`; spatial
    /// sizes must be multiples of [`Unet3d::input_multiple`]. No dropout, so no seed.
    pub fn forward(&self, g: &mut Graph<'_>, s: &ParamStore, x: Var) -> Result<Var> {
        let shape = g.value(x)?.shape();
        let m = self.input_multiple();
        if shape.c() != self.config.in_channels || shape.spatial().iter().any(|&d| d % m != 0) {
            return Err(Error::Shape(format!(
                "3D U-Net input {shape}: needs {} channels and D, H, W multiples of {m}",
                self.config.in_channels
            )));
        }
        // Every value is released after its last use (see `Graph::release`).
        let y = self.input.forward(g, s, x, 0)?;
        let mut h = g.relu(y)?;
        g.release(y)?;
        let mut skips = Vec::new();
        for block in &self.enc {
            skips.push(h);
            let p = g.maxpool3d(h, PoolSpec::cube(2, 2, 0))?;
            let y = block.forward(g, s, p, 0)?;
            h = g.relu(y)?;
            g.release(p)?;
            g.release(y)?;
        }
        for (u, block) in self.up.iter().zip(&self.dec) {
            let up = u.up.forward(g, s, h)?;
            g.release(h)?;
            let t = match &u.bn {
                Some(bn) => bn.forward(g, s, up)?,
                None => up,
            };
            let skip = skips
                .pop()
                .ok_or_else(|| Error::InvalidArgument("3D U-Net skip mismatch".into()))?;
            let sum = g.add(skip, t)?;
            for v in [up, t, skip] {
                g.release(v)?;
            }
            let y = block.forward(g, s, sum, 0)?;
            h = g.relu(y)?;
            g.release(sum)?;
            g.release(y)?;
        }
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
        self.input.bn.iter_mut().for_each(&mut f);
        for b in self.enc.iter_mut().chain(self.dec.iter_mut()) {
            block(b, &mut f);
        }
        for u in &mut self.up {
            u.bn.iter_mut().for_each(&mut f);
        }
    }

    /// This model converted to `form` (MixACB fused per group or merged; with the
    /// folded forms every other BN folded too) in a new store, under the same names
    /// for the layers that are only copied.
    pub fn convert(
        &self,
        ctx: &GpuContext,
        s: &ParamStore,
        form: ModelForm,
    ) -> Result<(Unet3d, ParamStore)> {
        let mut store = ParamStore::new();
        let mut rng = Rng::new(0);
        let mut b = Builder::new(ctx, &mut store, &mut rng);
        let fold = form.folds_bn();
        let levels = self.config.levels();
        let input = self.input.convert(ctx, s, &mut b.sub("enc1"), fold)?;
        let mut enc = Vec::new();
        for (i, block) in self.enc.iter().enumerate() {
            let mut lb = b.sub(&format!("enc{}", i + 2));
            enc.push(block.convert(ctx, s, &mut lb.sub(self.slot), form)?);
        }
        let mut up = Vec::new();
        let mut dec = Vec::new();
        for (i, (u, block)) in self.up.iter().zip(&self.dec).enumerate() {
            let level = levels - 1 - i;
            let mut ub = b.sub(&format!("up{level}"));
            up.push(convert_up(ctx, s, u, &mut ub, fold)?);
            let mut db = b.sub(&format!("dec{level}"));
            dec.push(block.convert(ctx, s, &mut db.sub(self.slot), form)?);
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
        let model = Unet3d {
            config: Unet3dConfig {
                form,
                ..self.config.clone()
            },
            input,
            enc,
            up,
            dec,
            head,
            slot: self.slot,
        };
        Ok((model, store))
    }
}

impl Network for Unet3d {
    type Config = Unet3dConfig;
    fn new(
        ctx: &GpuContext,
        store: &mut ParamStore,
        config: Unet3dConfig,
        seed: u64,
    ) -> Result<Self> {
        Unet3d::new(ctx, store, config, seed)
    }
    fn forward(&self, g: &mut Graph<'_>, store: &ParamStore, x: Var, _seed: u32) -> Result<Var> {
        Unet3d::forward(self, g, store, x)
    }
    fn convert(
        &self,
        ctx: &GpuContext,
        store: &ParamStore,
        form: ModelForm,
    ) -> Result<(Self, ParamStore)> {
        Unet3d::convert(self, ctx, store, form)
    }
    fn config(&self) -> &Unet3dConfig {
        &self.config
    }
    fn form(&self) -> ModelForm {
        self.config.form
    }
    fn input_multiple(&self) -> usize {
        Unet3d::input_multiple(self)
    }
    fn channels(&self) -> (usize, usize) {
        (self.config.in_channels, self.config.classes)
    }
    fn for_each_bn_mut(&mut self, f: &mut dyn FnMut(&mut BatchNorm)) {
        Unet3d::for_each_bn_mut(self, f)
    }
}
