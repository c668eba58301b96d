//! Building blocks shared by the networks: conv+BN, the MixACB/conv block slot, the
//! transposed-conv up layer, and their conversion to inference forms.

use crate::autograd::{Graph, ParamKind, ParamStore, Var};
use crate::error::{Error, Result};
use crate::gpu::GpuContext;
use crate::init::Init;
use crate::nn::layers::{read_checked, BatchNorm, Builder, Conv, ConvTranspose};
use crate::nn::mixacb::{fused_conv, FusedMixAcb, MixAcb, MixSpec};
use crate::ops::batchnorm::BatchNormSpec;
use crate::ops::conv3d::Conv3dSpec;
use crate::tensor::Shape5;
use serde::{Deserialize, Serialize};

/// Which block the dense layers and down transitions use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockKind {
    /// MixACB (3D-MASNet).
    Mixacb,
    /// 3×3×3 conv with bias + BN (the baseline DU-Net).
    Conv,
}

impl std::str::FromStr for BlockKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "mixacb" => Ok(Self::Mixacb),
            "conv" => Ok(Self::Conv),
            _ => Err(Error::InvalidArgument(format!(
                "block '{s}': expected mixacb or conv"
            ))),
        }
    }
}

/// Which form the parameters are in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelForm {
    /// Branched MixACB with per-branch BN (training graph).
    Training,
    /// MixACB folded to one conv per group; other BNs kept (the paper's fused count).
    Fused,
    /// MixACB folded to one block-diagonal conv per block; other BNs kept.
    FusedMerged,
    /// One conv per MixACB group and every remaining conv+BN pair folded into
    /// conv+bias.
    Folded,
    /// One block-diagonal conv per MixACB and every remaining BN folded.
    FoldedMerged,
}

impl ModelForm {
    /// Whether the conv+BN pairs outside MixACB are folded.
    pub fn folds_bn(self) -> bool {
        matches!(self, ModelForm::Folded | ModelForm::FoldedMerged)
    }
    /// Whether each MixACB becomes one block-diagonal conv.
    pub fn merges(self) -> bool {
        matches!(self, ModelForm::FusedMerged | ModelForm::FoldedMerged)
    }
}

/// Batch norm as in the paper (Keras: momentum 0.99, eps 1e-3).
pub fn bn_spec() -> BatchNormSpec {
    BatchNormSpec::keras()
}

/// A conv followed by BN (or, once folded, a conv with bias alone).
#[derive(Clone, Debug)]
pub struct ConvBn {
    /// The convolution.
    pub conv: Conv,
    /// Its BN; `None` once folded.
    pub bn: Option<BatchNorm>,
}

impl ConvBn {
    /// A `k×k×k` conv with bias ("same" padding, `stride`) and its BN under `b`.
    pub fn new(
        b: &mut Builder<'_>,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
    ) -> Result<Self> {
        let spec = Conv3dSpec::same([k; 3]).with_stride([stride; 3]);
        let conv = Conv::new(
            &mut b.sub("conv"),
            cin,
            cout,
            [k; 3],
            spec,
            true,
            Init::HeNormalTruncated,
            ParamKind::ConvWeight,
        )?;
        let bn = Some(BatchNorm::new(&mut b.sub("bn"), cout, bn_spec())?);
        Ok(Self { conv, bn })
    }

    /// conv (reading channels `offset..` of `x`) then BN.
    pub fn forward(&self, g: &mut Graph<'_>, s: &ParamStore, x: Var, offset: usize) -> Result<Var> {
        let y = self.conv.forward_from(g, s, x, offset)?;
        match &self.bn {
            Some(bn) => {
                let z = bn.forward(g, s, y)?;
                g.release(y)?;
                Ok(z)
            }
            None => Ok(y),
        }
    }

    /// `relu(forward(x))`; without a BN (folded) the ReLU runs in the conv's epilogue.
    pub fn forward_relu(
        &self,
        g: &mut Graph<'_>,
        s: &ParamStore,
        x: Var,
        offset: usize,
    ) -> Result<Var> {
        match &self.bn {
            Some(bn) => {
                let y = self.conv.forward_from(g, s, x, offset)?;
                bn.forward_relu_release(g, s, y)
            }
            None => self.conv.forward_from_relu(g, s, x, offset, true),
        }
    }

    /// [`ConvBn::forward_relu`] written into channels `dst_offset..` of `dst` (no-grad
    /// graphs): straight from the conv's epilogue when there is no BN.
    pub fn forward_relu_into(
        &self,
        g: &mut Graph<'_>,
        s: &ParamStore,
        x: Var,
        offset: usize,
        dst: Var,
        dst_offset: usize,
    ) -> Result<()> {
        match &self.bn {
            Some(_) => {
                let y = self.forward_relu(g, s, x, offset)?;
                g.write_channels(y, dst, dst_offset)?;
                g.release(y)
            }
            None => self
                .conv
                .forward_into(g, s, x, offset, true, dst, dst_offset),
        }
    }

    /// Copies (or with `fold`, folds the BN into) this layer into `b`.
    pub fn convert(
        &self,
        ctx: &GpuContext,
        s: &ParamStore,
        b: &mut Builder<'_>,
        fold: bool,
    ) -> Result<Self> {
        let c = &self.conv;
        let len = c.cout * c.cin * c.kernel.iter().product::<usize>();
        let w = read_checked(ctx, s, c.weight, len)?;
        let bias = match c.bias {
            Some(id) => read_checked(ctx, s, id, c.cout)?,
            None => vec![0.0; c.cout],
        };
        let shape = [c.cout, c.cin, c.kernel[0], c.kernel[1], c.kernel[2]];
        match (&self.bn, fold) {
            (Some(bn), true) => {
                let (scale, shift) = bn.affine(ctx, s)?;
                let per = len / c.cout;
                let w: Vec<f32> = w
                    .iter()
                    .enumerate()
                    .map(|(i, v)| v * scale[i / per])
                    .collect();
                let bias: Vec<f32> = (0..c.cout).map(|o| bias[o] * scale[o] + shift[o]).collect();
                let conv = fused_conv(&mut b.sub("conv"), shape, &w, &bias, c.spec)?;
                Ok(Self { conv, bn: None })
            }
            _ => {
                let conv = fused_conv(&mut b.sub("conv"), shape, &w, &bias, c.spec)?;
                let bn = self
                    .bn
                    .as_ref()
                    .map(|bn| copy_bn(ctx, s, bn, &mut b.sub("bn")))
                    .transpose()?;
                Ok(Self { conv, bn })
            }
        }
    }
}

/// Copies a BN's parameters and statistics into `b`.
pub fn copy_bn(
    ctx: &GpuContext,
    s: &ParamStore,
    bn: &BatchNorm,
    b: &mut Builder<'_>,
) -> Result<BatchNorm> {
    let c = bn.channels;
    let shape = Shape5::new(1, c, 1, 1, 1);
    let mut add = |name: &str, id, kind| -> Result<_> {
        b.add(name, shape, &read_checked(ctx, s, id, c)?, kind)
    };
    Ok(BatchNorm {
        weight: add("weight", bn.weight, ParamKind::Affine)?,
        bias: add("bias", bn.bias, ParamKind::Affine)?,
        running_mean: add("running_mean", bn.running_mean, ParamKind::Buffer)?,
        running_var: add("running_var", bn.running_var, ParamKind::Buffer)?,
        spec: bn.spec,
        channels: c,
    })
}

/// The block of a dense layer or down transition, in any form.
#[derive(Clone, Debug)]
pub enum Block {
    /// Branched MixACB.
    Mixacb(MixAcb),
    /// Fused MixACB.
    Fused(FusedMixAcb),
    /// Baseline 3×3×3 conv (+ BN unless folded).
    Conv(ConvBn),
}

impl Block {
    /// A MixACB (`kind` mixacb) or 3×3×3 conv+BN block `cin -> cout` under `b`.
    pub fn new(
        b: &mut Builder<'_>,
        kind: BlockKind,
        mix: &MixSpec,
        cin: usize,
        cout: usize,
        stride: usize,
    ) -> Result<Self> {
        match kind {
            BlockKind::Mixacb => Ok(Block::Mixacb(MixAcb::new(
                b,
                cin,
                cout,
                stride,
                mix,
                bn_spec(),
            )?)),
            BlockKind::Conv => Ok(Block::Conv(ConvBn::new(b, cin, cout, 3, stride)?)),
        }
    }

    /// Applies the block to channels `offset..` of `x` (no ReLU).
    pub fn forward(&self, g: &mut Graph<'_>, s: &ParamStore, x: Var, offset: usize) -> Result<Var> {
        match self {
            Block::Mixacb(m) => m.forward(g, s, x, offset),
            Block::Fused(f) => f.forward(g, s, x, offset),
            Block::Conv(c) => c.forward(g, s, x, offset),
        }
    }

    /// `relu(forward(x))`, with the ReLU in the convolutions' epilogue where the block
    /// ends in a convolution (fused MixACB, folded conv).
    pub fn forward_relu(
        &self,
        g: &mut Graph<'_>,
        s: &ParamStore,
        x: Var,
        offset: usize,
    ) -> Result<Var> {
        match self {
            Block::Mixacb(m) => {
                let y = m.forward(g, s, x, offset)?;
                let r = g.relu(y)?;
                g.release(y)?;
                Ok(r)
            }
            Block::Fused(f) => f.forward_relu(g, s, x, offset),
            Block::Conv(c) => c.forward_relu(g, s, x, offset),
        }
    }

    /// [`Block::forward_relu`] written into channels `dst_offset..` of `dst` (no-grad
    /// graphs), from the convolutions' epilogue where the block ends in convolutions.
    pub fn forward_relu_into(
        &self,
        g: &mut Graph<'_>,
        s: &ParamStore,
        x: Var,
        offset: usize,
        dst: Var,
        dst_offset: usize,
    ) -> Result<()> {
        match self {
            Block::Mixacb(_) => {
                let y = self.forward_relu(g, s, x, offset)?;
                g.write_channels(y, dst, dst_offset)?;
                g.release(y)
            }
            Block::Fused(f) => f.forward_relu_into(g, s, x, offset, dst, dst_offset),
            Block::Conv(c) => c.forward_relu_into(g, s, x, offset, dst, dst_offset),
        }
    }

    /// This block in `form` (MixACB fused or merged; conv+BN folded when the form
    /// folds), created under `b`.
    pub fn convert(
        &self,
        ctx: &GpuContext,
        s: &ParamStore,
        b: &mut Builder<'_>,
        form: ModelForm,
    ) -> Result<Self> {
        Ok(match self {
            Block::Mixacb(m) => match form {
                ModelForm::Training => {
                    return Err(Error::InvalidArgument("cannot un-fuse a model".into()))
                }
                _ => Block::Fused(m.fuse(ctx, s, b, form.merges())?),
            },
            Block::Fused(f) => Block::Fused(copy_fused(ctx, s, f, b)?),
            Block::Conv(c) => Block::Conv(c.convert(ctx, s, b, form.folds_bn())?),
        })
    }
}

fn copy_fused(
    ctx: &GpuContext,
    s: &ParamStore,
    f: &FusedMixAcb,
    b: &mut Builder<'_>,
) -> Result<FusedMixAcb> {
    let copy = |c: &Conv, b: &mut Builder<'_>| -> Result<Conv> {
        let len = c.cout * c.cin * c.kernel.iter().product::<usize>();
        let w = read_checked(ctx, s, c.weight, len)?;
        let bias = match c.bias {
            Some(id) => read_checked(ctx, s, id, c.cout)?,
            None => vec![0.0; c.cout],
        };
        fused_conv(
            b,
            [c.cout, c.cin, c.kernel[0], c.kernel[1], c.kernel[2]],
            &w,
            &bias,
            c.spec,
        )
    };
    Ok(match f {
        FusedMixAcb::Merged(c) => FusedMixAcb::Merged(copy(c, &mut b.sub("conv"))?),
        FusedMixAcb::Groups { cout, groups } => FusedMixAcb::Groups {
            cout: *cout,
            groups: groups
                .iter()
                .enumerate()
                .map(|(i, (io, oo, c))| {
                    Ok((*io, *oo, copy(c, &mut b.sub(&format!("groups.{i}.conv")))?))
                })
                .collect::<Result<_>>()?,
        },
    })
}

/// Transposed-conv up-sampling + BN (unless folded).
#[derive(Clone, Debug)]
pub struct UpLayer {
    /// 3×3×3 stride-2 transposed conv with bias.
    pub up: ConvTranspose,
    /// Its BN; `None` once folded.
    pub bn: Option<BatchNorm>,
}

/// An up layer copied, or with `fold` its BN folded into the transposed conv, under `b`.
pub fn convert_up(
    ctx: &GpuContext,
    s: &ParamStore,
    u: &UpLayer,
    b: &mut Builder<'_>,
    fold: bool,
) -> Result<UpLayer> {
    let t = &u.up;
    let k: usize = t.kernel.iter().product();
    let w = read_checked(ctx, s, t.weight, t.cin * t.cout * k)?;
    let bias = match t.bias {
        Some(id) => read_checked(ctx, s, id, t.cout)?,
        None => vec![0.0; t.cout],
    };
    let (w, bias, bn) = match (&u.bn, fold) {
        (Some(bn), true) => {
            let (scale, shift) = bn.affine(ctx, s)?;
            // Weight [Cin, Cout, k..]: output channel is the second index.
            let w: Vec<f32> = w
                .iter()
                .enumerate()
                .map(|(i, v)| v * scale[(i / k) % t.cout])
                .collect();
            let bias: Vec<f32> = (0..t.cout).map(|o| bias[o] * scale[o] + shift[o]).collect();
            (w, bias, None)
        }
        _ => (
            w,
            bias,
            u.bn.as_ref()
                .map(|bn| copy_bn(ctx, s, bn, &mut b.sub("bn")))
                .transpose()?,
        ),
    };
    let mut cb = b.sub("conv");
    let weight = cb.add(
        "weight",
        Shape5::new(t.cin, t.cout, t.kernel[0], t.kernel[1], t.kernel[2]),
        &w,
        ParamKind::ConvWeight,
    )?;
    let bias = cb.add(
        "bias",
        Shape5::new(1, t.cout, 1, 1, 1),
        &bias,
        ParamKind::Affine,
    )?;
    Ok(UpLayer {
        up: ConvTranspose {
            weight,
            bias: Some(bias),
            ..t.clone()
        },
        bn,
    })
}
