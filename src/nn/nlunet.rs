//! NLU-Net (non-local U-Net, Wang et al. 2020) as evaluated in 3D-MASNet: a
//! pre-activation residual U-Net with three resolution levels whose bottom block and
//! first up-sampling block are global aggregation blocks (multi-head dot-product
//! attention over all voxels), with MixACB or the baseline 3×3×3 conv in the
//! residual blocks' convolution slots. Architecture, sources and every choice:
//! `docs/models/nlunet.md`.
//!
//! BN placement. The original is pre-activation (BN → ReLU6 → conv). A `Block` carries
//! its BN *after* its conv, so the first slot of a residual block takes over the
//! original second pre-activation BN (conv1 → BN2 is exactly a conv+BN pair), and only
//! ReLU6 follows it. The second slot ends the residual branch, where the original has a
//! bare conv: the baseline (`BlockKind::Conv`) keeps a bare bias-free conv there, while
//! a MixACB necessarily brings its per-branch BNs. The first pre-activation BN of every
//! block acts on the residual stream (a sum), not on a conv output, and stays a
//! separate BN in every form.

use crate::autograd::{Graph, ParamId, ParamKind, ParamStore, Var};
use crate::error::{Error, Result};
use crate::gpu::GpuContext;
use crate::init::Init;
use crate::nn::blocks::{bn_spec, copy_bn, Block, BlockKind, ConvBn, ModelForm};
use crate::nn::layers::{BatchNorm, Builder, Conv, ConvTranspose};
use crate::nn::mixacb::MixSpec;
use crate::nn::model::Network;
use crate::ops::conv3d::Conv3dSpec;
use crate::ops::conv_transpose3d::ConvTranspose3dSpec;
use crate::rng::Rng;
use crate::tensor::Shape5;
use serde::{Deserialize, Serialize};

/// NLU-Net hyper-parameters (defaults = the authors' release: 32 initial features,
/// 3 levels, 2 heads at the bottom, 1 in the up-sampling block, dropout 0.5).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NlunetConfig {
    /// Input modalities (T1, T2).
    pub in_channels: usize,
    /// Output classes (background, CSF, GM, WM).
    pub classes: usize,
    /// Channels of the initial conv and the first level; level `l` has
    /// `features · 2^l`.
    pub features: usize,
    /// Resolution levels (the bottom block works at level `levels - 1`).
    pub levels: usize,
    /// Attention heads of the bottom global aggregation block.
    pub bottom_heads: usize,
    /// Attention heads of the up-sampling global aggregation block.
    pub up_heads: usize,
    /// Dropout on the attention weights (training only).
    pub attention_dropout: f32,
    /// Dropout before the output 1×1×1 conv (training only).
    pub dropout: f32,
    /// MixACB or conv in the residual blocks' 3×3×3 slots.
    pub block: BlockKind,
    /// MixACB groups and ratio.
    pub mix: MixSpec,
    /// Parameter form.
    pub form: ModelForm,
}

impl Default for NlunetConfig {
    fn default() -> Self {
        Self {
            in_channels: 2,
            classes: 4,
            features: 32,
            levels: 3,
            bottom_heads: 2,
            up_heads: 1,
            attention_dropout: 0.5,
            dropout: 0.5,
            block: BlockKind::Mixacb,
            mix: MixSpec::default(),
            form: ModelForm::Training,
        }
    }
}

impl NlunetConfig {
    /// Channels at level `l` (0 = full resolution).
    pub fn width(&self, l: usize) -> usize {
        self.features << l
    }
}

/// Pre-activation residual block: `x + conv2(relu6(conv1(relu6(bn(x)))))`, with a
/// 1×1×1 projection of `relu6(bn(x))` as the shortcut where it has one.
#[derive(Clone, Debug)]
pub struct ResBlock {
    /// The first pre-activation BN (on the residual stream).
    pub bn: BatchNorm,
    /// 1×1×1 projection shortcut (stride of the block, no bias); identity if `None`.
    pub proj: Option<Conv>,
    /// First 3×3×3 slot (stride of the block), its BN = the original second BN.
    pub conv1: Block,
    /// Second 3×3×3 slot (stride 1), end of the residual branch.
    pub conv2: Block,
}

/// How the queries are computed.
#[derive(Clone, Debug)]
pub enum Query {
    /// 1×1×1 conv with bias (size-preserving block).
    Same(Conv),
    /// 3×3×3 stride-2 transposed conv with bias (up-sampling block).
    Up(ConvTranspose),
}

/// Multi-head dot-product attention over all voxels with 1×1×1 projections (the
/// global aggregation block's core): `out(concat_h softmax(Q_h K_hᵀ / √d_k) V_h)`.
#[derive(Clone, Debug)]
pub struct GlobalAggregation {
    /// Number of heads (divides the key and value channels).
    pub heads: usize,
    /// Query projection.
    pub query: Query,
    /// Key projection (1×1×1, bias).
    pub key: Conv,
    /// Value projection (1×1×1, bias).
    pub value: Conv,
    /// Output projection (1×1×1, bias).
    pub out: Conv,
}

/// `shortcut(relu6(bn(x))) + attention(relu6(bn(x)))`: the bottom block (identity
/// shortcut on `x` itself) or the up-sampling residual block (transposed-conv
/// shortcut).
#[derive(Clone, Debug)]
pub struct AttentionBlock {
    /// Pre-activation BN.
    pub bn: BatchNorm,
    /// 3×3×3 stride-2 transposed conv (no bias); `None`: identity on the input.
    pub shortcut: Option<ConvTranspose>,
    /// The global aggregation.
    pub attention: GlobalAggregation,
}

/// Up-sampling step of the decoder.
#[derive(Clone, Debug)]
pub enum Up {
    /// Up-sampling global aggregation residual block (deepest decoder level).
    Attention(Box<AttentionBlock>),
    /// Bare 3×3×3 stride-2 transposed conv, no bias (the other levels).
    Deconv(ConvTranspose),
}

/// The whole network.
#[derive(Clone, Debug)]
pub struct Nlunet {
    /// Its configuration.
    pub config: NlunetConfig,
    init: Conv,
    enc: Vec<ResBlock>,
    bottom: AttentionBlock,
    /// (up-sampling step, regular residual block), deepest first.
    dec: Vec<(Up, ResBlock)>,
    out_bn: BatchNorm,
    out: Conv,
}

fn same3(stride: usize) -> Conv3dSpec {
    Conv3dSpec::same([3; 3]).with_stride([stride; 3])
}

fn up_spec() -> ConvTranspose3dSpec {
    ConvTranspose3dSpec::keras_same([3; 3], [2; 3])
}

/// A 3×3×3 slot: MixACB, or a bias-free conv followed by BN (`bn`) or not.
fn slot(
    b: &mut Builder<'_>,
    c: &NlunetConfig,
    cin: usize,
    cout: usize,
    stride: usize,
    bn: bool,
) -> Result<Block> {
    match c.block {
        BlockKind::Mixacb => Block::new(b, BlockKind::Mixacb, &c.mix, cin, cout, stride),
        BlockKind::Conv => {
            let conv = Conv::new(
                &mut b.sub("conv"),
                cin,
                cout,
                [3; 3],
                same3(stride),
                false,
                Init::HeNormalTruncated,
                ParamKind::ConvWeight,
            )?;
            let bn = if bn {
                Some(BatchNorm::new(&mut b.sub("bn"), cout, bn_spec())?)
            } else {
                None
            };
            Ok(Block::Conv(ConvBn { conv, bn }))
        }
    }
}

/// A 1×1×1 conv (`bias` or not), He-normal, L2-penalised like every kernel of the
/// original.
fn pointwise(
    b: &mut Builder<'_>,
    cin: usize,
    cout: usize,
    stride: usize,
    bias: bool,
) -> Result<Conv> {
    Conv::new(
        b,
        cin,
        cout,
        [1; 3],
        Conv3dSpec::default().with_stride([stride; 3]),
        bias,
        Init::HeNormalTruncated,
        ParamKind::ConvWeight,
    )
}

impl ResBlock {
    fn new(
        b: &mut Builder<'_>,
        c: &NlunetConfig,
        cin: usize,
        cout: usize,
        stride: usize,
        projection: bool,
    ) -> Result<Self> {
        let bn = BatchNorm::new(&mut b.sub("bn"), cin, bn_spec())?;
        let proj = if projection {
            Some(pointwise(&mut b.sub("proj"), cin, cout, stride, false)?)
        } else {
            None
        };
        let conv1 = slot(&mut b.sub("conv1"), c, cin, cout, stride, true)?;
        let conv2 = slot(&mut b.sub("conv2"), c, cout, cout, 1, false)?;
        Ok(Self {
            bn,
            proj,
            conv1,
            conv2,
        })
    }

    fn forward(&self, g: &mut Graph<'_>, s: &ParamStore, x: Var) -> Result<Var> {
        let a = self.bn.forward(g, s, x)?;
        let a = g.relu6(a)?;
        let shortcut = match &self.proj {
            Some(p) => p.forward(g, s, a)?,
            None => x,
        };
        let h = self.conv1.forward(g, s, a, 0)?;
        let h = g.relu6(h)?;
        let h = self.conv2.forward(g, s, h, 0)?;
        g.add(h, shortcut)
    }

    fn convert(
        &self,
        ctx: &GpuContext,
        s: &ParamStore,
        b: &mut Builder<'_>,
        form: ModelForm,
    ) -> Result<Self> {
        Ok(Self {
            bn: copy_bn(ctx, s, &self.bn, &mut b.sub("bn"))?,
            proj: self
                .proj
                .as_ref()
                .map(|p| copy_conv(ctx, s, p, &mut b.sub("proj")))
                .transpose()?,
            conv1: convert_slot(ctx, s, &self.conv1, &mut b.sub("conv1"), form)?,
            conv2: convert_slot(ctx, s, &self.conv2, &mut b.sub("conv2"), form)?,
        })
    }

    fn for_each_bn_mut(&mut self, f: &mut dyn FnMut(&mut BatchNorm)) {
        f(&mut self.bn);
        for block in [&mut self.conv1, &mut self.conv2] {
            match block {
                Block::Mixacb(m) => m
                    .groups
                    .iter_mut()
                    .flat_map(|g| g.branches.iter_mut())
                    .for_each(|(_, bn)| f(bn)),
                Block::Conv(c) => c.bn.iter_mut().for_each(&mut *f),
                Block::Fused(_) => {}
            }
        }
    }
}

impl GlobalAggregation {
    /// Projections for `cin` input channels, `key` = query channels, `value` channels
    /// and `out` output channels; `up` makes the query a stride-2 transposed conv.
    pub fn new(
        b: &mut Builder<'_>,
        cin: usize,
        key: usize,
        value: usize,
        out: usize,
        heads: usize,
        up: bool,
    ) -> Result<Self> {
        if heads == 0 || !key.is_multiple_of(heads) || !value.is_multiple_of(heads) {
            return Err(Error::InvalidArgument(format!(
                "global aggregation {}: {heads} heads must divide the key ({key}) and value \
                 ({value}) channels",
                b.path("")
            )));
        }
        let query = if up {
            Query::Up(ConvTranspose::new(
                &mut b.sub("query"),
                cin,
                key,
                [3; 3],
                up_spec(),
                true,
            )?)
        } else {
            Query::Same(pointwise(&mut b.sub("query"), cin, key, 1, true)?)
        };
        Ok(Self {
            heads,
            query,
            key: pointwise(&mut b.sub("key"), cin, key, 1, true)?,
            value: pointwise(&mut b.sub("value"), cin, value, 1, true)?,
            out: pointwise(&mut b.sub("out"), value, out, 1, true)?,
        })
    }

    /// Attention of every query voxel over every key voxel of `x` (`dropout` on the
    /// attention weights in training mode, mask seeded by `seed`).
    pub fn forward(
        &self,
        g: &mut Graph<'_>,
        s: &ParamStore,
        x: Var,
        dropout: f32,
        seed: u32,
    ) -> Result<Var> {
        let q = match &self.query {
            Query::Same(c) => c.forward(g, s, x)?,
            Query::Up(t) => t.forward(g, s, x)?,
        };
        let k = self.key.forward(g, s, x)?;
        let v = self.value.forward(g, s, x)?;
        let (qs, ks, vs) = (
            g.value(q)?.shape(),
            g.value(k)?.shape(),
            g.value(v)?.shape(),
        );
        let n = qs.n();
        let h = self.heads;
        let (dk, dv) = (qs.c() / h, vs.c() / h);
        let (pq, pk) = (qs.voxels(), ks.voxels());
        // NCDHW keeps each head's channels contiguous per sample, so the per-head
        // matrices `[d, P]` (channels x positions) are plain reshapes; the transposes
        // are the matmul's trans flags.
        let q = g.scale(q, (dk as f32).powf(-0.5))?;
        let q = g.reshape(q, Shape5::new(1, 1, n * h, dk, pq))?;
        let k = g.reshape(k, Shape5::new(1, 1, n * h, dk, pk))?;
        let v = g.reshape(v, Shape5::new(1, 1, n * h, dv, pk))?;
        // logits [n·h, Pq, Pk] = Qᵀ K; softmax over key positions.
        let logits = g.batched_matmul(q, k, true, false)?;
        let w = g.softmax_rows(logits)?;
        let w = g.dropout(w, dropout, seed)?;
        // [n·h, dv, Pq] = V Wᵀ: the heads' outputs already channel-major.
        let o = g.batched_matmul(v, w, false, true)?;
        let [d, hh, ww] = qs.spatial();
        let o = g.reshape(o, Shape5::new(n, h * dv, d, hh, ww))?;
        self.out.forward(g, s, o)
    }

    fn convert(&self, ctx: &GpuContext, s: &ParamStore, b: &mut Builder<'_>) -> Result<Self> {
        Ok(Self {
            heads: self.heads,
            query: match &self.query {
                Query::Same(c) => Query::Same(copy_conv(ctx, s, c, &mut b.sub("query"))?),
                Query::Up(t) => Query::Up(copy_transposed(ctx, s, t, &mut b.sub("query"))?),
            },
            key: copy_conv(ctx, s, &self.key, &mut b.sub("key"))?,
            value: copy_conv(ctx, s, &self.value, &mut b.sub("value"))?,
            out: copy_conv(ctx, s, &self.out, &mut b.sub("out"))?,
        })
    }
}

impl AttentionBlock {
    fn forward(
        &self,
        g: &mut Graph<'_>,
        s: &ParamStore,
        x: Var,
        dropout: f32,
        seed: u32,
    ) -> Result<Var> {
        let a = self.bn.forward(g, s, x)?;
        let a = g.relu6(a)?;
        let shortcut = match &self.shortcut {
            Some(t) => t.forward(g, s, a)?,
            None => x,
        };
        let h = self.attention.forward(g, s, a, dropout, seed)?;
        g.add(h, shortcut)
    }

    fn convert(&self, ctx: &GpuContext, s: &ParamStore, b: &mut Builder<'_>) -> Result<Self> {
        Ok(Self {
            bn: copy_bn(ctx, s, &self.bn, &mut b.sub("bn"))?,
            shortcut: self
                .shortcut
                .as_ref()
                .map(|t| copy_transposed(ctx, s, t, &mut b.sub("shortcut")))
                .transpose()?,
            attention: self.attention.convert(ctx, s, &mut b.sub("attention"))?,
        })
    }
}

/// Copies one parameter (shape and kind kept) to `name` under `b`.
fn copy_param(
    ctx: &GpuContext,
    s: &ParamStore,
    id: ParamId,
    b: &mut Builder<'_>,
    name: &str,
) -> Result<ParamId> {
    let e = s.entry(id)?;
    let (shape, kind) = (e.value.shape(), e.kind);
    b.add(name, shape, &s.read(ctx, id)?, kind)
}

fn copy_conv(ctx: &GpuContext, s: &ParamStore, c: &Conv, b: &mut Builder<'_>) -> Result<Conv> {
    Ok(Conv {
        weight: copy_param(ctx, s, c.weight, b, "weight")?,
        bias: c
            .bias
            .map(|id| copy_param(ctx, s, id, b, "bias"))
            .transpose()?,
        ..c.clone()
    })
}

fn copy_transposed(
    ctx: &GpuContext,
    s: &ParamStore,
    t: &ConvTranspose,
    b: &mut Builder<'_>,
) -> Result<ConvTranspose> {
    Ok(ConvTranspose {
        weight: copy_param(ctx, s, t.weight, b, "weight")?,
        bias: t
            .bias
            .map(|id| copy_param(ctx, s, id, b, "bias"))
            .transpose()?,
        ..t.clone()
    })
}

/// A slot in `form`: MixACB fused (per group or merged), conv+BN folded when the form
/// folds; a bare conv (no BN, no bias) stays exactly that.
fn convert_slot(
    ctx: &GpuContext,
    s: &ParamStore,
    block: &Block,
    b: &mut Builder<'_>,
    form: ModelForm,
) -> Result<Block> {
    match block {
        Block::Conv(c) if c.bn.is_some() && form.folds_bn() => {
            Ok(Block::Conv(c.convert(ctx, s, b, true)?))
        }
        Block::Conv(c) => Ok(Block::Conv(ConvBn {
            conv: copy_conv(ctx, s, &c.conv, &mut b.sub("conv"))?,
            bn: c
                .bn
                .as_ref()
                .map(|bn| copy_bn(ctx, s, bn, &mut b.sub("bn")))
                .transpose()?,
        })),
        _ => block.convert(ctx, s, b, form),
    }
}

fn dropout_seed(seed: u32, site: u32) -> u32 {
    seed.wrapping_mul(0x9E37_79B1) ^ site.wrapping_mul(0x85EB_CA6B)
}

impl Nlunet {
    fn validate(c: &NlunetConfig) -> Result<()> {
        if c.levels == 0 || c.features == 0 || c.in_channels == 0 || c.classes == 0 {
            return Err(Error::InvalidArgument(format!(
                "NLU-Net needs levels, features, input channels and classes >= 1 (got {}, \
                 {}, {}, {})",
                c.levels, c.features, c.in_channels, c.classes
            )));
        }
        for (name, p) in [
            ("dropout", c.dropout),
            ("attention dropout", c.attention_dropout),
        ] {
            if !(0.0..1.0).contains(&p) {
                return Err(Error::InvalidArgument(format!(
                    "NLU-Net {name} {p} must be in [0, 1)"
                )));
            }
        }
        c.mix.validate()
    }

    fn skip_mismatch() -> Error {
        Error::InvalidArgument("NLU-Net skip mismatch".into())
    }
}

impl Network for Nlunet {
    type Config = NlunetConfig;

    fn new(
        ctx: &GpuContext,
        store: &mut ParamStore,
        config: NlunetConfig,
        seed: u64,
    ) -> Result<Self> {
        if config.form != ModelForm::Training {
            return Err(Error::InvalidArgument(
                "a new model starts in training form; fuse it afterwards".into(),
            ));
        }
        Self::validate(&config)?;
        let c = &config;
        let mut rng = Rng::new(seed);
        let mut b = Builder::new(ctx, store, &mut rng);
        let init = Conv::new(
            &mut b.sub("init"),
            c.in_channels,
            c.features,
            [3; 3],
            same3(1),
            false,
            Init::HeNormalTruncated,
            ParamKind::ConvWeight,
        )?;
        // Encoder: the input residual block (stride 1) and the down-sampling residual
        // blocks (stride 2); every one has the 1×1×1 projection shortcut, as in the
        // release (its encoding layer always passes one).
        let mut enc = Vec::new();
        let mut ch = c.features;
        for l in 0..c.levels {
            let stride = if l == 0 { 1 } else { 2 };
            let w = c.width(l);
            enc.push(ResBlock::new(
                &mut b.sub(&format!("enc{}", l + 1)),
                c,
                ch,
                w,
                stride,
                true,
            )?);
            ch = w;
        }
        let bottom = AttentionBlock {
            bn: BatchNorm::new(&mut b.sub("bottom").sub("bn"), ch, bn_spec())?,
            shortcut: None,
            attention: GlobalAggregation::new(
                &mut b.sub("bottom").sub("attention"),
                ch,
                ch,
                ch,
                ch,
                c.bottom_heads,
                false,
            )?,
        };
        let mut dec = Vec::new();
        for l in (0..c.levels - 1).rev() {
            let w = c.width(l);
            let mut ub = b.sub(&format!("up{}", l + 1));
            let up = if l == c.levels - 2 {
                Up::Attention(Box::new(AttentionBlock {
                    bn: BatchNorm::new(&mut ub.sub("bn"), ch, bn_spec())?,
                    shortcut: Some(ConvTranspose::new(
                        &mut ub.sub("shortcut"),
                        ch,
                        w,
                        [3; 3],
                        up_spec(),
                        false,
                    )?),
                    attention: GlobalAggregation::new(
                        &mut ub.sub("attention"),
                        ch,
                        w,
                        w,
                        w,
                        c.up_heads,
                        true,
                    )?,
                }))
            } else {
                Up::Deconv(ConvTranspose::new(
                    &mut ub.sub("deconv"),
                    ch,
                    w,
                    [3; 3],
                    up_spec(),
                    false,
                )?)
            };
            let rb = ResBlock::new(&mut b.sub(&format!("dec{}", l + 1)), c, w, w, 1, false)?;
            dec.push((up, rb));
            ch = w;
        }
        let out_bn = BatchNorm::new(&mut b.sub("out").sub("bn"), ch, bn_spec())?;
        let out = pointwise(&mut b.sub("out").sub("conv"), ch, c.classes, 1, true)?;
        Ok(Self {
            config,
            init,
            enc,
            bottom,
            dec,
            out_bn,
            out,
        })
    }

    /// Logits `[N, classes, D, H, W]`; D, H, W must be multiples of `2^(levels-1)`.
    fn forward(
        &self,
        g: &mut Graph<'_>,
        s: &ParamStore,
        x: Var,
        dropout_seed_base: u32,
    ) -> Result<Var> {
        let shape = g.value(x)?.shape();
        let m = self.input_multiple();
        if shape.c() != self.config.in_channels
            || shape.n() == 0
            || shape.spatial().iter().any(|&d| d == 0 || d % m != 0)
        {
            return Err(Error::Shape(format!(
                "NLU-Net input {shape}: needs N >= 1, {} channels and D, H, W positive \
                 multiples of {m}",
                self.config.in_channels
            )));
        }
        // Every value is released after its last use (`Graph::release_since` a mark,
        // keeping what stays live; never the caller's `x`), so inference reuses
        // activation buffers.
        let c = &self.config;
        let h0 = self.init.forward(g, s, x)?;
        let mut h = h0;
        let mut skips = Vec::new();
        for rb in &self.enc {
            let mark = g.mark();
            let next = rb.forward(g, s, h)?;
            g.release_since(mark, &[next])?;
            // Encoder outputs are skips, released when their decoder level used them.
            if h == h0 {
                g.release(h0)?;
            }
            h = next;
            skips.push(h);
        }
        // The bottom block's identity shortcut is the deepest encoder output itself.
        skips.pop().ok_or_else(Self::skip_mismatch)?;
        let seed = |site| dropout_seed(dropout_seed_base, site);
        let mark = g.mark();
        let b = self.bottom.forward(g, s, h, c.attention_dropout, seed(1))?;
        g.release_since(mark, &[b])?;
        g.release(h)?;
        h = b;
        for (i, (up, rb)) in self.dec.iter().enumerate() {
            let mark = g.mark();
            let u = match up {
                Up::Attention(a) => a.forward(g, s, h, c.attention_dropout, seed(2 + i as u32))?,
                Up::Deconv(t) => t.forward(g, s, h)?,
            };
            let skip = skips.pop().ok_or_else(Self::skip_mismatch)?;
            let sum = g.add(u, skip)?;
            let next = rb.forward(g, s, sum)?;
            g.release_since(mark, &[next])?;
            g.release(h)?;
            g.release(skip)?;
            h = next;
        }
        let mark = g.mark();
        let a = self.out_bn.forward(g, s, h)?;
        let a = g.relu6(a)?;
        let a = g.dropout(a, c.dropout, seed(0))?;
        let out = self.out.forward(g, s, a)?;
        g.release_since(mark, &[out])?;
        g.release(h)?;
        Ok(out)
    }

    /// The model in `form` (MixACB fused per group or merged; with the folded forms the
    /// baseline's conv+BN slots folded too) in a new store.
    fn convert(
        &self,
        ctx: &GpuContext,
        s: &ParamStore,
        form: ModelForm,
    ) -> Result<(Self, ParamStore)> {
        let mut store = ParamStore::new();
        let mut rng = Rng::new(0);
        let mut b = Builder::new(ctx, &mut store, &mut rng);
        let init = copy_conv(ctx, s, &self.init, &mut b.sub("init"))?;
        let enc = self
            .enc
            .iter()
            .enumerate()
            .map(|(l, rb)| rb.convert(ctx, s, &mut b.sub(&format!("enc{}", l + 1)), form))
            .collect::<Result<Vec<_>>>()?;
        let bottom = self.bottom.convert(ctx, s, &mut b.sub("bottom"))?;
        let levels = self.config.levels;
        let mut dec = Vec::new();
        for (i, (up, rb)) in self.dec.iter().enumerate() {
            let l = levels - 1 - i;
            let mut ub = b.sub(&format!("up{l}"));
            let up = match up {
                Up::Attention(a) => Up::Attention(Box::new(a.convert(ctx, s, &mut ub)?)),
                Up::Deconv(t) => Up::Deconv(copy_transposed(ctx, s, t, &mut ub.sub("deconv"))?),
            };
            let rb = rb.convert(ctx, s, &mut b.sub(&format!("dec{l}")), form)?;
            dec.push((up, rb));
        }
        let out_bn = copy_bn(ctx, s, &self.out_bn, &mut b.sub("out").sub("bn"))?;
        let out = copy_conv(ctx, s, &self.out, &mut b.sub("out").sub("conv"))?;
        let config = NlunetConfig {
            form,
            ..self.config.clone()
        };
        let model = Self {
            config,
            init,
            enc,
            bottom,
            dec,
            out_bn,
            out,
        };
        Ok((model, store))
    }

    fn config(&self) -> &NlunetConfig {
        &self.config
    }

    fn form(&self) -> ModelForm {
        self.config.form
    }

    fn input_multiple(&self) -> usize {
        1 << (self.config.levels - 1)
    }

    fn channels(&self) -> (usize, usize) {
        (self.config.in_channels, self.config.classes)
    }

    fn for_each_bn_mut(&mut self, f: &mut dyn FnMut(&mut BatchNorm)) {
        for rb in &mut self.enc {
            rb.for_each_bn_mut(f);
        }
        f(&mut self.bottom.bn);
        for (up, rb) in &mut self.dec {
            if let Up::Attention(a) = up {
                f(&mut a.bn);
            }
            rb.for_each_bn_mut(f);
        }
        f(&mut self.out_bn);
    }
}
