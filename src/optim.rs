//! Adam over a [`ParamStore`]: moment buffers per parameter, the step count, and the
//! paper's L2 penalty on convolution kernels (applied in the update kernel; its value
//! for the reported loss is computed only when asked).

use crate::autograd::{Gradients, ParamId, ParamStore};
use crate::error::{Error, Result};
use crate::gpu::{GpuContext, Recorder};
use crate::ops::adam::{adam_step, sum_of_squares_at, AdamConfig};
use crate::ops::reduce::count_non_finite;
use crate::tensor::{Shape5, Tensor};
use std::collections::HashMap;

/// The optimiser's position before a step (see [`Adam::mark`]).
#[derive(Clone, Debug)]
pub struct AdamMark {
    step: u32,
    ids: std::collections::HashSet<ParamId>,
}

/// The Adam optimiser's state.
pub struct Adam {
    /// Hyper-parameters; `lr` is overwritten by the schedule each step.
    pub config: AdamConfig,
    step: u32,
    moments: HashMap<ParamId, (Tensor, Tensor)>,
}

impl Adam {
    /// A fresh optimiser (step 0, zero moments created on first use).
    pub fn new(config: AdamConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config,
            step: 0,
            moments: HashMap::new(),
        })
    }

    /// Number of steps taken.
    pub fn steps(&self) -> u32 {
        self.step
    }

    /// Records one update of every trainable parameter that has a gradient, at `lr`.
    /// Parameters without a gradient (unused this step) keep their moments unchanged.
    pub fn step(
        &mut self,
        ctx: &GpuContext,
        rec: &mut Recorder,
        store: &ParamStore,
        grads: &Gradients,
        lr: f32,
    ) -> Result<()> {
        let cfg = AdamConfig { lr, ..self.config };
        cfg.validate()?;
        self.step = self
            .step
            .checked_add(1)
            .ok_or_else(|| Error::InvalidArgument("Adam step count overflow".into()))?;
        let step = self.step;
        for (id, entry) in store.iter() {
            if !entry.kind.trainable() {
                continue;
            }
            let Some(g) = grads.get(id) else { continue };
            if entry.value.is_frozen() {
                return Err(Error::InvalidArgument(format!(
                    "parameter '{}' is frozen (an inference-form model); train the training form",
                    entry.name
                )));
            }
            let (m, v) = match self.moments.entry(id) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    let shape = entry.value.shape();
                    let m =
                        Tensor::zeros_recorded(ctx, rec, shape, &format!("{}.adam_m", entry.name))?;
                    let v =
                        Tensor::zeros_recorded(ctx, rec, shape, &format!("{}.adam_v", entry.name))?;
                    e.insert((m, v))
                }
            };
            adam_step(
                ctx,
                rec,
                &entry.value,
                g,
                m,
                v,
                step,
                &cfg,
                entry.kind.penalised(),
            )?;
        }
        Ok(())
    }

    /// Records the L2 penalty terms `Σw²` of every penalised tensor into one tensor;
    /// [`Adam::l2_value`] turns its read-back values into the loss term.
    pub fn l2_terms(
        &self,
        ctx: &GpuContext,
        rec: &mut Recorder,
        store: &ParamStore,
    ) -> Result<Option<Tensor>> {
        let ids: Vec<ParamId> = store
            .iter()
            .filter(|(_, e)| e.kind.penalised())
            .map(|(id, _)| id)
            .collect();
        if ids.is_empty() || self.config.l2 == 0.0 {
            return Ok(None);
        }
        let out = Tensor::empty(ctx, Shape5::new(1, 1, 1, 1, ids.len()), "l2 terms")?;
        for (i, &id) in ids.iter().enumerate() {
            sum_of_squares_at(ctx, rec, store.tensor(id)?, &out, i)?;
        }
        Ok(Some(out))
    }

    /// `l2 · Σ terms` (the penalty added to the reported loss).
    pub fn l2_value(&self, terms: &[f32]) -> f64 {
        f64::from(self.config.l2) * terms.iter().map(|&t| f64::from(t)).sum::<f64>()
    }

    /// Where the optimiser stands before a step, for [`Adam::rewind`].
    pub fn mark(&self) -> AdamMark {
        AdamMark {
            step: self.step,
            ids: self.moments.keys().copied().collect(),
        }
    }

    /// Forgets a step that never ran on the GPU (its submission failed): restores the
    /// step count and drops moments the step created (they were never zeroed).
    pub fn rewind(&mut self, mark: &AdamMark) {
        self.step = mark.step;
        self.moments.retain(|id, _| mark.ids.contains(id));
    }

    /// Restores the step count (when resuming).
    pub fn set_steps(&mut self, steps: u32) {
        self.step = steps;
    }

    /// Restores the moments of `id` (when resuming); call with no recording open.
    pub fn set_moments(
        &mut self,
        ctx: &GpuContext,
        store: &ParamStore,
        id: ParamId,
        m: &[f32],
        v: &[f32],
    ) -> Result<()> {
        let e = store.entry(id)?;
        let shape = e.value.shape();
        let m = Tensor::from_slice(ctx, shape, m, &format!("{}.adam_m", e.name))?;
        let v = Tensor::from_slice(ctx, shape, v, &format!("{}.adam_v", e.name))?;
        self.moments.insert(id, (m, v));
        Ok(())
    }

    /// The moment tensors of a parameter, once it has been stepped (for checkpoints).
    pub fn moments(&self, id: ParamId) -> Option<(&Tensor, &Tensor)> {
        self.moments.get(&id).map(|(m, v)| (m, v))
    }
}

/// Records, for every tensor of `store` (parameters and buffers, in store order), the
/// number of its NaN/Inf values into one tensor (bit-level test, so it holds on drivers
/// that assume no NaNs and may squash them in comparisons).
pub fn non_finite_counts(
    ctx: &GpuContext,
    rec: &mut Recorder,
    store: &ParamStore,
) -> Result<Tensor> {
    let out = Tensor::empty(
        ctx,
        Shape5::new(1, 1, 1, 1, store.len().max(1)),
        "non-finite",
    )?;
    rec.encoder.clear_buffer(out.buffer(), 0, Some(out.bytes()));
    let one = Tensor::empty(ctx, Shape5::new(1, 1, 1, 1, 1), "non-finite one")?;
    for (id, entry) in store.iter() {
        count_non_finite(ctx, rec, &entry.value, &one)?;
        rec.encoder
            .copy_buffer_to_buffer(one.buffer(), 0, out.buffer(), (id.0 * 4) as u64, 4);
    }
    Ok(out)
}

/// Returns [`Error::Diverged`] naming `step` when the loss read back is NaN or infinite,
/// or when `counts` (from [`non_finite_counts`], may be empty) shows a stored tensor
/// with NaN/Inf values (the loss alone can look finite when a driver squashes NaNs in
/// ReLU comparisons).
pub fn check_step(step: u64, loss: f64, counts: &[f32], store: &ParamStore) -> Result<()> {
    if !loss.is_finite() {
        return Err(Error::Diverged {
            step,
            detail: format!("the loss is {loss}"),
        });
    }
    for ((_, entry), &c) in store.iter().zip(counts) {
        if c > 0.0 {
            return Err(Error::Diverged {
                step,
                detail: format!("'{}' holds {c} NaN/Inf values", entry.name),
            });
        }
    }
    Ok(())
}
