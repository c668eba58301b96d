//! The parameter store: every trainable tensor and every running statistic of a model,
//! under a stable dotted name (`block1.conv.weight`) that checkpoints use.

use crate::error::{Error, Result};
use crate::gpu::GpuContext;
use crate::tensor::{Shape5, Tensor};
use std::collections::HashMap;
use std::rc::Rc;

/// Index of a parameter in its store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ParamId(pub usize);

/// What a stored tensor is, which decides whether it trains and gets the L2 penalty.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    /// A convolution kernel (trainable, L2-penalised as in the paper).
    ConvWeight,
    /// A bias, BN scale or BN shift (trainable, not penalised).
    Affine,
    /// Any other trainable tensor (e.g. attention projections), not penalised.
    Other,
    /// A running statistic or other state updated outside the optimiser.
    Buffer,
}

impl ParamKind {
    /// Whether the optimiser updates it.
    pub fn trainable(self) -> bool {
        self != ParamKind::Buffer
    }
    /// Whether the L2 penalty applies.
    pub fn penalised(self) -> bool {
        self == ParamKind::ConvWeight
    }
}

/// One stored tensor.
pub struct ParamEntry {
    /// Dotted name.
    pub name: String,
    /// The values (shared with graphs that use them).
    pub value: Rc<Tensor>,
    /// Role.
    pub kind: ParamKind,
}

/// All parameters and buffers of a model, in creation order.
#[derive(Default)]
pub struct ParamStore {
    entries: Vec<ParamEntry>,
    by_name: HashMap<String, ParamId>,
}

impl ParamStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a tensor initialised with `data`; names must be unique.
    pub fn add(
        &mut self,
        ctx: &GpuContext,
        name: &str,
        shape: Shape5,
        data: &[f32],
        kind: ParamKind,
    ) -> Result<ParamId> {
        if self.by_name.contains_key(name) {
            return Err(Error::InvalidArgument(format!(
                "parameter '{name}' is defined twice"
            )));
        }
        let t = Tensor::from_slice(ctx, shape, data, name)?;
        let id = ParamId(self.entries.len());
        self.entries.push(ParamEntry {
            name: name.to_string(),
            value: Rc::new(t),
            kind,
        });
        self.by_name.insert(name.to_string(), id);
        Ok(id)
    }

    /// The entry of `id`.
    pub fn entry(&self, id: ParamId) -> Result<&ParamEntry> {
        self.entries
            .get(id.0)
            .ok_or_else(|| Error::InvalidArgument(format!("no parameter #{} in the store", id.0)))
    }

    /// The tensor of `id`.
    pub fn tensor(&self, id: ParamId) -> Result<&Rc<Tensor>> {
        Ok(&self.entry(id)?.value)
    }

    /// Overwrites the values of `id` (shape unchanged); call with no recording open.
    pub fn set(&self, ctx: &GpuContext, id: ParamId, data: &[f32]) -> Result<()> {
        let e = self.entry(id)?;
        let n = e.value.shape().numel()?;
        if data.len() != n {
            return Err(Error::Shape(format!(
                "parameter '{}' {} needs {n} values, {} given",
                e.name,
                e.value.shape(),
                data.len()
            )));
        }
        ctx.queue
            .write_buffer(e.value.buffer(), 0, bytemuck::cast_slice(data));
        e.value.clear_derived();
        Ok(())
    }

    /// Freezes every parameter ([`Tensor::freeze`]): an inference-form model whose
    /// packed weights are then computed once. The optimiser refuses frozen parameters.
    pub fn freeze(&self) {
        for e in &self.entries {
            e.value.freeze();
        }
    }

    /// Reads the values of `id` back to the CPU.
    pub fn read(&self, ctx: &GpuContext, id: ParamId) -> Result<Vec<f32>> {
        self.entry(id)?.value.to_vec(ctx)
    }

    /// The id of `name`.
    pub fn id(&self, name: &str) -> Result<ParamId> {
        self.by_name
            .get(name)
            .copied()
            .ok_or_else(|| Error::InvalidArgument(format!("no parameter named '{name}'")))
    }

    /// All entries with their ids, in creation order.
    pub fn iter(&self) -> impl Iterator<Item = (ParamId, &ParamEntry)> {
        self.entries
            .iter()
            .enumerate()
            .map(|(i, e)| (ParamId(i), e))
    }

    /// Number of stored tensors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Number of trainable scalars.
    pub fn trainable_count(&self) -> usize {
        self.count(|k| k.trainable())
    }

    /// Number of scalars in all tensors, buffers included.
    pub fn total_count(&self) -> usize {
        self.count(|_| true)
    }

    fn count(&self, f: impl Fn(ParamKind) -> bool) -> usize {
        self.entries
            .iter()
            .filter(|e| f(e.kind))
            .map(|e| e.value.shape().numel().unwrap_or(0))
            .sum()
    }
}
