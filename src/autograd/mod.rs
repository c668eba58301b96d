//! Reverse-mode automatic differentiation on a tape (define-by-run).
//!
//! A [`Graph`] records one forward pass: each differentiable op appends a node holding
//! its output and a backward closure that captures exactly what its gradient needs
//! (`Rc` handles to input or output tensors). [`Graph::backward`] walks the tape in
//! reverse, accumulating gradients when a value feeds several ops (DenseNet
//! concatenation), and frees each node's gradient and saved tensors once used.
//!
//! All GPU work of a step (forward, backward, optimiser) is recorded into the graph's
//! one [`Recorder`] and submitted once by [`Graph::submit`]; nothing is read back unless
//! asked for.

mod functions;

pub use functions::{ConvGroup, Upsample};
pub mod params;

pub use params::{ParamId, ParamKind, ParamStore};

use crate::error::{Error, Result};
use crate::gpu::{GpuContext, Recorder};
use crate::ops::elementwise::{add_assign, add_channels, copy_channels};
use crate::tensor::{Shape5, Tensor};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, Ordering};

/// Whether layers behave as in training (batch statistics, dropout) or inference.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Batch-norm uses batch statistics and updates running ones; dropout drops.
    Train,
    /// Batch-norm uses running statistics; dropout is the identity.
    Eval,
}

/// A value on a graph's tape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Var {
    graph: u32,
    index: usize,
}

/// Computes the gradients of an op's inputs from the gradient of its output, which it
/// owns (an op whose input gradient is that gradient passes it on without a copy). Gets
/// the inputs' "needs a gradient" flags; returns one entry per input.
type BackwardFn =
    Box<dyn FnOnce(&GpuContext, &mut Recorder, Tensor, &[bool]) -> Result<Vec<Option<Tensor>>>>;

struct Node {
    /// `None` once released ([`Graph::release`]): backward closures keep their own
    /// handles to what they need, so releasing frees a value nothing else needs.
    value: Option<Rc<Tensor>>,
    op: &'static str,
    requires_grad: bool,
    param: Option<ParamId>,
    inputs: Vec<Var>,
    /// Per input (empty: none): `Some((offset, shape))` when the backward's contribution
    /// covers only channels `offset ..` of an input of `shape` (a conv reading a channel
    /// range), so accumulation touches that range instead of a zero-padded full tensor.
    partial: Vec<Option<(usize, Shape5)>>,
    backward: Option<BackwardFn>,
}

/// Gradients of the parameters a backward pass reached.
#[derive(Default)]
pub struct Gradients {
    map: HashMap<ParamId, Tensor>,
}

impl Gradients {
    /// The gradient of `id`, if the loss depended on it.
    pub fn get(&self, id: ParamId) -> Option<&Tensor> {
        self.map.get(&id)
    }
    /// Number of parameters with a gradient.
    pub fn len(&self) -> usize {
        self.map.len()
    }
    /// Whether no parameter received a gradient.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

static NEXT_GRAPH: AtomicU32 = AtomicU32::new(1);

/// The tape of one forward (and backward) pass.
pub struct Graph<'c> {
    ctx: &'c GpuContext,
    rec: Recorder,
    nodes: Vec<Node>,
    id: u32,
    mode: Mode,
    grad_enabled: bool,
    params: HashMap<ParamId, Var>,
    grads: HashMap<usize, Tensor>,
    flops: f64,
}

impl<'c> Graph<'c> {
    /// A graph that records gradients (training step).
    pub fn new(ctx: &'c GpuContext, mode: Mode) -> Self {
        Self {
            ctx,
            rec: ctx.recorder(),
            nodes: Vec::new(),
            id: NEXT_GRAPH.fetch_add(1, Ordering::Relaxed),
            mode,
            grad_enabled: true,
            params: HashMap::new(),
            grads: HashMap::new(),
            flops: 0.0,
        }
    }

    /// A graph that records nothing for backward (inference, `no_grad`).
    pub fn no_grad(ctx: &'c GpuContext, mode: Mode) -> Self {
        let mut g = Self::new(ctx, mode);
        g.grad_enabled = false;
        g
    }

    /// Training or evaluation behaviour.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Whether ops record backward closures.
    pub fn grad_enabled(&self) -> bool {
        self.grad_enabled
    }

    /// Floating-point operations of the convolutions and matrix products recorded in
    /// the forward pass so far (2 per multiply-add; transposed convs counted without
    /// the zeros of their dilated form).
    pub fn forward_flops(&self) -> f64 {
        self.flops
    }

    /// The GPU context.
    pub fn ctx(&self) -> &'c GpuContext {
        self.ctx
    }

    /// The recorder all of this graph's work goes into (e.g. for the optimiser step).
    pub fn recorder(&mut self) -> &mut Recorder {
        &mut self.rec
    }

    /// Submits everything recorded so far and starts a new recording (does not wait).
    pub fn submit(&mut self) {
        let rec = std::mem::replace(&mut self.rec, self.ctx.recorder());
        self.ctx.submit(rec);
    }

    /// A constant input (no gradient).
    pub fn input(&mut self, t: Tensor) -> Var {
        self.leaf(Rc::new(t), false, None, "input")
    }

    /// A constant input shared with the caller (no copy, no gradient).
    pub fn input_shared(&mut self, t: Rc<Tensor>) -> Var {
        self.leaf(t, false, None, "input")
    }

    /// A leaf whose gradient [`Graph::grad`] can return after backward.
    pub fn variable(&mut self, t: Tensor) -> Var {
        let g = self.grad_enabled;
        self.leaf(Rc::new(t), g, None, "variable")
    }

    /// The parameter `id` of `store` (one node per parameter, so uses accumulate).
    pub fn param(&mut self, store: &ParamStore, id: ParamId) -> Result<Var> {
        if let Some(&v) = self.params.get(&id) {
            return Ok(v);
        }
        let entry = store.entry(id)?;
        let requires = self.grad_enabled && entry.kind.trainable();
        let v = self.leaf(entry.value.clone(), requires, Some(id), "param");
        self.params.insert(id, v);
        Ok(v)
    }

    pub(crate) fn leaf(
        &mut self,
        value: Rc<Tensor>,
        requires_grad: bool,
        param: Option<ParamId>,
        op: &'static str,
    ) -> Var {
        self.nodes.push(Node {
            value: Some(value),
            op,
            requires_grad,
            param,
            inputs: Vec::new(),
            partial: Vec::new(),
            backward: None,
        });
        Var {
            graph: self.id,
            index: self.nodes.len() - 1,
        }
    }

    fn node(&self, v: Var) -> Result<&Node> {
        if v.graph != self.id {
            return Err(Error::InvalidArgument(format!(
                "value #{} belongs to another graph",
                v.index
            )));
        }
        self.nodes.get(v.index).ok_or_else(|| {
            Error::InvalidArgument(format!("value #{} is not on this graph's tape", v.index))
        })
    }

    /// The tensor holding `v`'s value (valid once the graph is submitted and finished).
    pub fn value(&self, v: Var) -> Result<&Rc<Tensor>> {
        let n = self.node(v)?;
        n.value.as_ref().ok_or_else(|| {
            Error::InvalidArgument(format!(
                "value #{} ('{}') was released after its last use",
                v.index, n.op
            ))
        })
    }

    /// The tape's position, for [`Graph::release_since`].
    pub fn mark(&self) -> usize {
        self.nodes.len()
    }

    /// Drops the tape's hold on `v`'s value (liveness: call after its last use). The
    /// buffer returns to the pool for later ops of the same recording unless something
    /// else holds it: a backward closure that needs it (so a training graph keeps only
    /// what backward needs), the caller, or a parameter store. Inputs, variables and
    /// parameters stay; releasing twice is harmless.
    pub fn release(&mut self, v: Var) -> Result<()> {
        self.node(v)?;
        let n = &mut self.nodes[v.index];
        if !matches!(n.op, "input" | "variable" | "param") {
            n.value = None;
        }
        Ok(())
    }

    /// [`Graph::release`] for every value recorded since `mark` except `keep` (the
    /// intermediates of a block once its output exists).
    pub fn release_since(&mut self, mark: usize, keep: &[Var]) -> Result<()> {
        for i in mark..self.nodes.len() {
            let v = Var {
                graph: self.id,
                index: i,
            };
            if !keep.contains(&v) {
                self.release(v)?;
            }
        }
        Ok(())
    }

    /// Whether a gradient flows to `v`.
    pub fn requires_grad(&self, v: Var) -> Result<bool> {
        Ok(self.node(v)?.requires_grad)
    }

    /// Appends an op's output. `backward` is kept only when some input needs a gradient.
    pub(crate) fn push(
        &mut self,
        op: &'static str,
        value: Rc<Tensor>,
        inputs: &[Var],
        backward: impl FnOnce(&GpuContext, &mut Recorder, &Tensor, &[bool]) -> Result<Vec<Option<Tensor>>>
            + 'static,
    ) -> Result<Var> {
        self.push_partial(op, value, inputs, Vec::new(), backward)
    }

    /// [`Graph::push`] where `partial[k] = Some((offset, shape))` says the backward's
    /// contribution to input `k` covers only its channels `offset ..` (see `Node`).
    pub(crate) fn push_partial(
        &mut self,
        op: &'static str,
        value: Rc<Tensor>,
        inputs: &[Var],
        partial: Vec<Option<(usize, Shape5)>>,
        backward: impl FnOnce(&GpuContext, &mut Recorder, &Tensor, &[bool]) -> Result<Vec<Option<Tensor>>>
            + 'static,
    ) -> Result<Var> {
        self.push_owning(op, value, inputs, partial, move |ctx, rec, gy, needs| {
            backward(ctx, rec, &gy, needs)
        })
    }

    /// [`Graph::push_partial`] with a backward that owns the output's gradient, for ops
    /// that pass it on as an input's gradient (reshape, append, slice, add).
    pub(crate) fn push_owning(
        &mut self,
        op: &'static str,
        value: Rc<Tensor>,
        inputs: &[Var],
        partial: Vec<Option<(usize, Shape5)>>,
        backward: impl FnOnce(&GpuContext, &mut Recorder, Tensor, &[bool]) -> Result<Vec<Option<Tensor>>>
            + 'static,
    ) -> Result<Var> {
        let mut requires = false;
        for &i in inputs {
            requires |= self.node(i)?.requires_grad;
        }
        let requires = requires && self.grad_enabled;
        self.nodes.push(Node {
            value: Some(value),
            op,
            requires_grad: requires,
            param: None,
            inputs: inputs.to_vec(),
            partial,
            backward: requires.then(|| Box::new(backward) as BackwardFn),
        });
        Ok(Var {
            graph: self.id,
            index: self.nodes.len() - 1,
        })
    }

    /// Records the backward pass from the scalar `loss` (seed gradient 1) and returns the
    /// parameters' gradients. Gradients of [`Graph::variable`] leaves stay available
    /// through [`Graph::grad`]. Call once per graph.
    pub fn backward(&mut self, loss: Var) -> Result<Gradients> {
        let n = self.node(loss)?;
        if !n.requires_grad {
            return Err(Error::InvalidArgument(format!(
                "backward from '{}' (value #{}): it does not depend on anything that needs a \
                 gradient (no_grad graph, or only constant inputs)",
                n.op, loss.index
            )));
        }
        let shape = self.value(loss)?.shape();
        if shape.numel()? != 1 {
            return Err(Error::Shape(format!(
                "backward needs a scalar loss; '{}' has shape {shape}",
                n.op,
            )));
        }
        let seed = Tensor::from_slice_recorded(self.ctx, &mut self.rec, shape, &[1.0], "dloss")?;
        self.grads.insert(loss.index, seed);
        let mut out = Gradients::default();
        for i in (0..=loss.index).rev() {
            let Some(grad) = self.grads.remove(&i) else {
                continue;
            };
            let node = &mut self.nodes[i];
            if let Some(id) = node.param {
                out.map.insert(id, grad);
                continue;
            }
            let Some(backward) = node.backward.take() else {
                // A variable leaf: keep its gradient for `grad`.
                self.grads.insert(i, grad);
                continue;
            };
            let inputs = node.inputs.clone();
            let partial = std::mem::take(&mut node.partial);
            let op = node.op;
            let needs: Vec<bool> = inputs
                .iter()
                .map(|v| self.nodes[v.index].requires_grad)
                .collect();
            let contributions =
                backward(self.ctx, &mut self.rec, grad, &needs).map_err(|e| annotate(e, op, i))?;
            for (k, (v, g)) in inputs.iter().zip(contributions).enumerate() {
                let Some(g) = g else { continue };
                if !self.nodes[v.index].requires_grad {
                    continue;
                }
                let range = partial.get(k).copied().flatten();
                self.accumulate(v.index, g, range)
                    .map_err(|e| annotate(e, op, i))?;
            }
        }
        Ok(out)
    }

    /// Adds `g` to value `index`'s gradient: the whole gradient, or with `range =
    /// Some((offset, shape))` channels `offset ..` of a gradient of `shape` (zero
    /// elsewhere; a first partial contribution becomes a zeroed full tensor).
    fn accumulate(
        &mut self,
        index: usize,
        g: Tensor,
        range: Option<(usize, Shape5)>,
    ) -> Result<()> {
        let (ctx, rec) = (self.ctx, &mut self.rec);
        match (self.grads.get(&index), range) {
            (Some(acc), None) => add_assign(ctx, rec, acc, &g),
            (Some(acc), Some((off, _))) => {
                add_channels(ctx, rec, g.all(), acc.channels(off, g.shape().c())?)
            }
            (None, None) => {
                self.grads.insert(index, g);
                Ok(())
            }
            (None, Some((off, shape))) => {
                let full = Tensor::zeros_recorded(ctx, rec, shape, "gradient")?;
                copy_channels(ctx, rec, g.all(), full.channels(off, g.shape().c())?)?;
                self.grads.insert(index, full);
                Ok(())
            }
        }
    }

    /// The gradient of a [`Graph::variable`] leaf after [`Graph::backward`].
    pub fn grad(&self, v: Var) -> Result<&Tensor> {
        let n = self.node(v)?;
        if !n.requires_grad {
            return Err(Error::InvalidArgument(format!(
                "no gradient for '{}' (value #{}): it is not on the gradient tape",
                n.op, v.index
            )));
        }
        self.grads.get(&v.index).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "no gradient for '{}' (value #{}): backward has not reached it",
                n.op, v.index
            ))
        })
    }
}

impl Drop for Graph<'_> {
    fn drop(&mut self) {
        // Work recorded but never submitted would be silently lost; submit it so pooled
        // buffers are not reused under it by later uploads.
        let rec = std::mem::replace(&mut self.rec, self.ctx.recorder());
        self.ctx.submit(rec);
    }
}

fn annotate(e: Error, op: &str, index: usize) -> Error {
    match e {
        Error::Shape(m) => Error::Shape(format!("backward of '{op}' (value #{index}): {m}")),
        Error::InvalidArgument(m) => {
            Error::InvalidArgument(format!("backward of '{op}' (value #{index}): {m}"))
        }
        other => other,
    }
}
