//! MixACB: mixed-scale asymmetric convolution blocks, in the branched training form and
//! the fused inference forms (one conv per group, or one block-diagonal conv).
//!
//! A group of kernel size k is a 3D-AC block: four bias-free convs (k×k×k, 1×k×k,
//! k×1×k, k×k×1; zero padding k/2 except on the unit axis), each with its own
//! BatchNorm, summed. Groups take consecutive channel ranges of input and output
//! (kernel sizes 3, 5, …), split by the mix ratio; their outputs are concatenated.

use crate::autograd::{ConvGroup, Graph, ParamKind, ParamStore, Var};
use crate::error::{Error, Result};
use crate::gpu::GpuContext;
use crate::init::Init;
use crate::nn::layers::{read_checked, BatchNorm, Builder, Conv};
use crate::ops::batchnorm::BatchNormSpec;
use crate::ops::conv3d::Conv3dSpec;
use crate::tensor::Shape5;
use serde::{Deserialize, Serialize};

/// Groups and mix ratio of a MixACB (paper default: 2 groups, kernels 3 and 5, 3:1).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MixSpec {
    /// Relative channel shares of the groups, kernel sizes 3, 5, … in order.
    pub ratio: Vec<usize>,
}

impl Default for MixSpec {
    fn default() -> Self {
        Self { ratio: vec![3, 1] }
    }
}

impl MixSpec {
    /// Parses `3:1` (two groups), `1:1:1` (three), …
    pub fn parse(s: &str) -> Result<Self> {
        let ratio = s
            .split(':')
            .map(|p| p.trim().parse::<usize>())
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|_| {
                Error::InvalidArgument(format!("mix ratio '{s}': expected integers like 3:1"))
            })?;
        let spec = Self { ratio };
        spec.validate()?;
        Ok(spec)
    }

    /// At least one group and a positive total.
    pub fn validate(&self) -> Result<()> {
        if self.ratio.is_empty() || self.ratio.iter().sum::<usize>() == 0 {
            return Err(Error::InvalidArgument(format!(
                "mix ratio {:?} needs at least one positive share",
                self.ratio
            )));
        }
        Ok(())
    }

    /// Kernel size of group `i`: 3, 5, 7, …
    pub fn kernel(i: usize) -> usize {
        2 * i + 3
    }

    /// Channel counts per group: `floor(c / sum) * r_i` for all but the last group,
    /// which takes the rest (3:1 on 46 channels gives 33 and 13).
    pub fn split(&self, c: usize) -> Vec<usize> {
        let unit = c / self.ratio.iter().sum::<usize>().max(1);
        let mut v: Vec<usize> = self.ratio.iter().map(|r| unit * r).collect();
        let head: usize = v[..v.len() - 1].iter().sum();
        if let Some(last) = v.last_mut() {
            *last = c - head;
        }
        v
    }
}

/// The four branches of a 3D-AC block: name, kernel, padding.
pub fn branches(k: usize) -> [(&'static str, [usize; 3], [usize; 3]); 4] {
    let p = k / 2;
    [
        ("cubic", [k, k, k], [p, p, p]),
        ("axial", [1, k, k], [0, p, p]),
        ("coronal", [k, 1, k], [p, 0, p]),
        ("sagittal", [k, k, 1], [p, p, 0]),
    ]
}

/// One 3D-AC group of a MixACB (training form).
#[derive(Clone, Debug)]
pub struct AcGroup {
    /// Kernel size.
    pub k: usize,
    /// First input channel (relative to the block's input).
    pub in_offset: usize,
    /// First output channel.
    pub out_offset: usize,
    /// (conv, its BN) per branch: cubic, axial, coronal, sagittal.
    pub branches: Vec<(Conv, BatchNorm)>,
}

/// A MixACB in training form.
#[derive(Clone, Debug)]
pub struct MixAcb {
    /// Input channels.
    pub cin: usize,
    /// Output channels.
    pub cout: usize,
    /// Stride (1 or 2), shared by every branch.
    pub stride: usize,
    /// Non-empty groups.
    pub groups: Vec<AcGroup>,
}

impl MixAcb {
    /// Creates the block's parameters under `b` (`groups.{i}.{branch}.conv|bn`).
    pub fn new(
        b: &mut Builder<'_>,
        cin: usize,
        cout: usize,
        stride: usize,
        mix: &MixSpec,
        bn: BatchNormSpec,
    ) -> Result<Self> {
        mix.validate()?;
        let (ins, outs) = (mix.split(cin), mix.split(cout));
        let mut groups = Vec::new();
        let (mut io, mut oo) = (0, 0);
        for (i, (&ci, &co)) in ins.iter().zip(&outs).enumerate() {
            if ci == 0 && co == 0 {
                continue;
            }
            if ci == 0 || co == 0 {
                return Err(Error::InvalidArgument(format!(
                    "MixACB {} -> {cout}: mix ratio {:?} gives group {i} {ci} input but {co} \
                     output channels",
                    b.path(""),
                    mix.ratio
                )));
            }
            let k = MixSpec::kernel(i);
            let mut br = Vec::new();
            for (name, kernel, pad) in branches(k) {
                let mut gb = b.sub(&format!("groups.{i}.{name}"));
                let spec = Conv3dSpec {
                    stride: [stride; 3],
                    pad_lo: pad,
                    pad_hi: pad,
                    relu: false,
                };
                let conv = Conv::new(
                    &mut gb.sub("conv"),
                    ci,
                    co,
                    kernel,
                    spec,
                    false,
                    Init::HeNormalTruncated,
                    ParamKind::ConvWeight,
                )?;
                let norm = BatchNorm::new(&mut gb.sub("bn"), co, bn)?;
                br.push((conv, norm));
            }
            groups.push(AcGroup {
                k,
                in_offset: io,
                out_offset: oo,
                branches: br,
            });
            io += ci;
            oo += co;
        }
        Ok(Self {
            cin,
            cout,
            stride,
            groups,
        })
    }

    /// Applies the block to channels `offset .. offset + cin` of `x` (no ReLU).
    pub fn forward(
        &self,
        g: &mut Graph<'_>,
        store: &ParamStore,
        x: Var,
        offset: usize,
    ) -> Result<Var> {
        let mut sums = Vec::new();
        for gr in &self.groups {
            let mut branch_outputs = Vec::new();
            for (conv, bn) in &gr.branches {
                let y = conv.forward_from(g, store, x, offset + gr.in_offset)?;
                branch_outputs.push(bn.forward(g, store, y)?);
                g.release(y)?;
            }
            sums.push(branch_outputs);
        }
        // Each group's branch sum lands directly in its channel range of the output.
        let out = g.concat_of_sums(&sums)?;
        for v in sums.iter().flatten() {
            g.release(*v)?;
        }
        Ok(out)
    }

    /// Folds every branch's BN (its own epsilon) into its kernel, adds the asymmetric
    /// kernels into the centre slices of the cubic one and sums the biases: one
    /// `k×k×k` conv with bias per group, `(weight [co, ci, k, k, k], bias [co])`.
    pub fn fused_group_weights(
        &self,
        ctx: &GpuContext,
        store: &ParamStore,
    ) -> Result<Vec<(Vec<f32>, Vec<f32>)>> {
        let mut out = Vec::new();
        for gr in &self.groups {
            let k = gr.k;
            let (co, ci) = (gr.branches[0].0.cout, gr.branches[0].0.cin);
            let mut w = vec![0f32; co * ci * k * k * k];
            let mut bias = vec![0f32; co];
            for (conv, bn) in &gr.branches {
                let [kd, kh, kw] = conv.kernel;
                let wb = read_checked(ctx, store, conv.weight, co * ci * kd * kh * kw)?;
                let (scale, shift) = bn.affine(ctx, store)?;
                // A unit axis sits in the centre slice of the cubic kernel.
                let (od, oh, ow) = ((k - kd) / 2, (k - kh) / 2, (k - kw) / 2);
                for o in 0..co {
                    bias[o] += shift[o];
                    for i in 0..ci {
                        for z in 0..kd {
                            for y in 0..kh {
                                for x in 0..kw {
                                    let src = (((o * ci + i) * kd + z) * kh + y) * kw + x;
                                    let dst =
                                        (((o * ci + i) * k + z + od) * k + y + oh) * k + x + ow;
                                    w[dst] += wb[src] * scale[o];
                                }
                            }
                        }
                    }
                }
            }
            out.push((w, bias));
        }
        Ok(out)
    }

    /// The inference form: one conv per group (`merge = false`) or one block-diagonal
    /// conv of the largest kernel (`merge = true`), created under `b`.
    pub fn fuse(
        &self,
        ctx: &GpuContext,
        store: &ParamStore,
        b: &mut Builder<'_>,
        merge: bool,
    ) -> Result<FusedMixAcb> {
        let fused = self.fused_group_weights(ctx, store)?;
        let spec_for = |k: usize| Conv3dSpec::same([k; 3]).with_stride([self.stride; 3]);
        if merge {
            let kmax = self.groups.iter().map(|g| g.k).max().unwrap_or(3);
            let (co_all, ci_all) = (self.cout, self.cin);
            let mut w = vec![0f32; co_all * ci_all * kmax.pow(3)];
            let mut bias = vec![0f32; co_all];
            for (gr, (gw, gb)) in self.groups.iter().zip(&fused) {
                let (k, co, ci) = (gr.k, gb.len(), gw.len() / gb.len() / gr.k.pow(3));
                let off = (kmax - k) / 2;
                for o in 0..co {
                    bias[gr.out_offset + o] = gb[o];
                    for i in 0..ci {
                        for z in 0..k {
                            for y in 0..k {
                                for x in 0..k {
                                    let src = (((o * ci + i) * k + z) * k + y) * k + x;
                                    let dst = ((((gr.out_offset + o) * ci_all + gr.in_offset + i)
                                        * kmax
                                        + z
                                        + off)
                                        * kmax
                                        + y
                                        + off)
                                        * kmax
                                        + x
                                        + off;
                                    w[dst] = gw[src];
                                }
                            }
                        }
                    }
                }
            }
            let conv = fused_conv(
                &mut b.sub("conv"),
                [co_all, ci_all, kmax, kmax, kmax],
                &w,
                &bias,
                spec_for(kmax),
            )?;
            return Ok(FusedMixAcb::Merged(conv));
        }
        let mut groups = Vec::new();
        for (i, (gr, (gw, gb))) in self.groups.iter().zip(&fused).enumerate() {
            let k = gr.k;
            let co = gb.len();
            let ci = gw.len() / co / k.pow(3);
            let conv = fused_conv(
                &mut b.sub(&format!("groups.{i}.conv")),
                [co, ci, k, k, k],
                gw,
                gb,
                spec_for(k),
            )?;
            groups.push((gr.in_offset, gr.out_offset, conv));
        }
        Ok(FusedMixAcb::Groups {
            cout: self.cout,
            groups,
        })
    }
}

/// A conv with bias from explicit values.
pub(crate) fn fused_conv(
    b: &mut Builder<'_>,
    shape: [usize; 5],
    w: &[f32],
    bias: &[f32],
    spec: Conv3dSpec,
) -> Result<Conv> {
    let weight = b.add("weight", Shape5(shape), w, ParamKind::ConvWeight)?;
    let bias = b.add(
        "bias",
        Shape5::new(1, shape[0], 1, 1, 1),
        bias,
        ParamKind::Affine,
    )?;
    Ok(Conv {
        weight,
        bias: Some(bias),
        spec,
        cin: shape[1],
        cout: shape[0],
        kernel: [shape[2], shape[3], shape[4]],
    })
}

/// A MixACB in inference form.
#[derive(Clone, Debug)]
pub enum FusedMixAcb {
    /// One conv per group, each writing its output channel range in place.
    Groups {
        /// Output channels of the block.
        cout: usize,
        /// (input offset, output offset, conv) per group.
        groups: Vec<(usize, usize, Conv)>,
    },
    /// One block-diagonal conv of the largest kernel: one dispatch.
    Merged(Conv),
}

impl FusedMixAcb {
    /// Applies the block to channels `offset ..` of `x` (no ReLU).
    pub fn forward(
        &self,
        g: &mut Graph<'_>,
        store: &ParamStore,
        x: Var,
        offset: usize,
    ) -> Result<Var> {
        self.forward_maybe_relu(g, store, x, offset, false)
    }

    /// `relu(forward(x))`: in the convolutions' epilogue in no-grad graphs.
    pub fn forward_relu(
        &self,
        g: &mut Graph<'_>,
        store: &ParamStore,
        x: Var,
        offset: usize,
    ) -> Result<Var> {
        if g.grad_enabled() {
            let y = self.forward(g, store, x, offset)?;
            let r = g.relu(y)?;
            g.release(y)?;
            return Ok(r);
        }
        self.forward_maybe_relu(g, store, x, offset, true)
    }

    /// `relu(forward(x))` written into channels `dst_offset..` of `dst` (no-grad
    /// graphs): each group's conv writes its range from its epilogue.
    pub fn forward_relu_into(
        &self,
        g: &mut Graph<'_>,
        store: &ParamStore,
        x: Var,
        offset: usize,
        dst: Var,
        dst_offset: usize,
    ) -> Result<()> {
        match self {
            FusedMixAcb::Merged(conv) => {
                conv.forward_into(g, store, x, offset, true, dst, dst_offset)
            }
            FusedMixAcb::Groups { groups, .. } => {
                for (io, oo, conv) in groups {
                    conv.forward_into(g, store, x, offset + io, true, dst, dst_offset + oo)?;
                }
                Ok(())
            }
        }
    }

    fn forward_maybe_relu(
        &self,
        g: &mut Graph<'_>,
        store: &ParamStore,
        x: Var,
        offset: usize,
        relu: bool,
    ) -> Result<Var> {
        match self {
            FusedMixAcb::Merged(conv) => conv.forward_from_relu(g, store, x, offset, relu),
            FusedMixAcb::Groups { cout, groups } => {
                let mut gs = Vec::new();
                for (io, oo, conv) in groups {
                    gs.push(ConvGroup {
                        in_offset: offset + io,
                        out_offset: *oo,
                        weight: g.param(store, conv.weight)?,
                        bias: conv.bias.map(|b| g.param(store, b)).transpose()?,
                        spec: Conv3dSpec {
                            relu: conv.spec.relu || relu,
                            ..conv.spec
                        },
                    });
                }
                g.conv3d_grouped(x, *cout, &gs)
            }
        }
    }
}
