//! The training loop: batches from a seeded source, one submission per step (forward,
//! backward, Adam), the loss read back for progress, divergence checks, atomic
//! checkpoints that carry everything `--resume` needs to continue the run exactly
//! (parameters, BN statistics, Adam moments and step, schedule position, sampler RNG).

use crate::autograd::{Graph, Mode, ParamStore};
use crate::checkpoint::{CheckpointTensor, OPTIMIZER_PREFIX};
use crate::error::{Error, Result};
use crate::gpu::GpuContext;
use crate::nn::io::{load_model, model_checkpoint};
use crate::nn::{Model, ModelConfig};
use crate::ops::adam::AdamConfig;
use crate::optim::{check_step, non_finite_counts, Adam};
use crate::schedule::LrSchedule;
use crate::tensor::{Shape5, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Metadata key of the training state in a checkpoint.
pub const KEY_TRAIN_STATE: &str = "masnet.train_state";

/// Where training batches come from (the patch sampler, or a synthetic source).
pub trait BatchSource {
    /// The next batch: images `[B, C, D, H, W]` and class ids `[B, 1, D, H, W]`.
    fn next_batch(&mut self, batch: usize, patch: [usize; 3]) -> Result<(Vec<f32>, Vec<f32>)>;
    /// The RNG state, saved in checkpoints.
    fn state(&self) -> u64;
    /// Restores the RNG state.
    fn set_state(&mut self, state: u64);
}

impl BatchSource for crate::data::sampler::PatchSampler {
    fn next_batch(&mut self, batch: usize, patch: [usize; 3]) -> Result<(Vec<f32>, Vec<f32>)> {
        Ok(self.sample(batch, patch)?.into_parts())
    }
    fn state(&self) -> u64 {
        crate::data::sampler::PatchSampler::state(self)
    }
    fn set_state(&mut self, state: u64) {
        crate::data::sampler::PatchSampler::set_state(self, state)
    }
}

/// Hyper-parameters of a run (defaults: the paper's recipe).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainOptions {
    /// Patches per step.
    pub batch: usize,
    /// Patch edge (cubic patches).
    pub patch: usize,
    /// Epochs.
    pub epochs: usize,
    /// Steps per epoch.
    pub steps_per_epoch: usize,
    /// Learning-rate schedule.
    pub schedule: LrSchedule,
    /// Adam hyper-parameters (`lr` is taken from the schedule).
    pub beta1: f32,
    /// Adam beta2.
    pub beta2: f32,
    /// Adam epsilon.
    pub eps: f32,
    /// L2 penalty on convolution kernels.
    pub l2: f32,
    /// Decoupled weight decay (AdamW), 0 = off.
    pub weight_decay: f32,
    /// Seed of initialisation, sampling and dropout.
    pub seed: u64,
    /// Write a checkpoint every this many epochs (and at the end).
    pub checkpoint_every: usize,
    /// Also refresh `latest.safetensors` mid-epoch once this many minutes passed since
    /// the last checkpoint (0 = never), so a killed run loses at most that much work.
    pub checkpoint_minutes: f64,
    /// Check every stored tensor for NaN/Inf every this many steps (the loss is
    /// checked at every step).
    pub check_every: usize,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            batch: 16,
            patch: 32,
            epochs: 500,
            steps_per_epoch: 62,
            schedule: LrSchedule::CosineRestarts {
                max: 3e-4,
                min: 1e-6,
                period_epochs: 50,
            },
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-7,
            l2: 1e-4,
            weight_decay: 0.0,
            seed: 1,
            checkpoint_every: 10,
            checkpoint_minutes: 15.0,
            check_every: 50,
        }
    }
}

impl TrainOptions {
    /// The Adam configuration at learning rate `lr`.
    pub fn adam(&self, lr: f32) -> AdamConfig {
        AdamConfig {
            lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            l2: self.l2,
            weight_decay: self.weight_decay,
        }
    }

    /// Ranges that would otherwise fail deep inside a step.
    pub fn validate(&self) -> Result<()> {
        if self.batch == 0 || self.patch == 0 || self.epochs == 0 || self.steps_per_epoch == 0 {
            return Err(Error::InvalidArgument(format!(
                "batch ({}), patch ({}), epochs ({}) and steps per epoch ({}) must be >= 1",
                self.batch, self.patch, self.epochs, self.steps_per_epoch
            )));
        }
        if !(self.checkpoint_minutes.is_finite() && self.checkpoint_minutes >= 0.0) {
            return Err(Error::InvalidArgument(format!(
                "checkpoint_minutes {} must be a number >= 0 (0 = only per-epoch checkpoints)",
                self.checkpoint_minutes
            )));
        }
        self.schedule.validate()?;
        self.adam(1e-3).validate()
    }
}

/// Where a run stands: saved in checkpoints, restored by `--resume`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Epochs completed.
    pub epoch: usize,
    /// Steps completed in the current epoch.
    pub step_in_epoch: usize,
    /// Steps completed in total.
    pub global_step: u64,
    /// Batch-source RNG state before the next step.
    pub sampler_state: u64,
    /// Sum of the losses of the current epoch so far (for the epoch mean).
    pub epoch_loss_sum: f64,
    /// The options of the run.
    pub options: TrainOptions,
}

/// What the loop reports to its caller (progress bar, logs).
#[derive(Clone, Debug)]
pub enum TrainEvent {
    /// A step finished.
    Step {
        /// 1-based step count over the whole run.
        global_step: u64,
        /// 0-based epoch.
        epoch: usize,
        /// 1-based step within the epoch.
        step: usize,
        /// Loss of this step (cross-entropy + L2 when reported).
        loss: f64,
        /// Learning rate used.
        lr: f64,
        /// Patches per second of this step.
        patches_per_s: f64,
    },
    /// An epoch finished.
    Epoch {
        /// 0-based epoch.
        epoch: usize,
        /// Mean loss over its steps.
        mean_loss: f64,
        /// Learning rate at its last step.
        lr: f64,
        /// Seconds it took.
        seconds: f64,
        /// Mean Dice on the validation data, when a validator is set.
        val_dice: Option<f64>,
    },
    /// A checkpoint was written.
    Checkpoint(PathBuf),
}

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrainOutcome {
    /// Every epoch ran.
    Finished,
    /// Stopped by the interrupt flag after saving a checkpoint.
    Interrupted,
}

/// A fault [`Trainer::inject_fault`] triggers, to test the fault path without a
/// broken GPU (the CLI reads `MASNET_INJECT_FAULT=invalid@STEP|lost@STEP`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InjectedFault {
    /// A command that fails wgpu validation (a buffer over the size limit) inside the
    /// step's submission: wgpu drops the whole command buffer, as it does on
    /// out-of-memory.
    InvalidCommands,
    /// `device.destroy()` before the step's submission: the device is lost.
    DeviceLost,
}

impl InjectedFault {
    /// Parses `invalid@STEP` or `lost@STEP` (1-based step).
    pub fn parse(s: &str) -> Result<(u64, Self)> {
        let bad = || {
            Error::InvalidArgument(format!(
                "fault '{s}': expected invalid@STEP or lost@STEP (STEP >= 1)"
            ))
        };
        let (kind, step) = s.trim().split_once('@').ok_or_else(bad)?;
        let step: u64 = step.parse().ok().filter(|&n| n >= 1).ok_or_else(bad)?;
        let kind = match kind {
            "invalid" => Self::InvalidCommands,
            "lost" => Self::DeviceLost,
            _ => return Err(bad()),
        };
        Ok((step, kind))
    }
}

/// A model being trained, its optimiser and where it writes.
pub struct Trainer<'c> {
    ctx: &'c GpuContext,
    /// The network.
    pub model: Model,
    /// Its parameters.
    pub store: ParamStore,
    adam: Adam,
    /// Progress of the run.
    pub state: TrainState,
    out_dir: PathBuf,
    validator: Option<Validator<'c>>,
    fault: Option<(u64, InjectedFault)>,
    last_checkpoint: Option<(PathBuf, u64)>,
    last_save: Instant,
    /// Extra `masnet.run.*` metadata saved in every checkpoint and restored by
    /// [`Trainer::resume`] (the CLI keeps its data settings here).
    pub run_metadata: BTreeMap<String, String>,
}

/// Prefix of the metadata keys kept in [`Trainer::run_metadata`].
pub const RUN_METADATA_PREFIX: &str = "masnet.run.";

/// Scores the model (e.g. mean Dice on validation volumes) after each epoch.
pub type Validator<'a> = Box<dyn FnMut(&Model, &ParamStore) -> Result<f64> + 'a>;

impl<'c> Trainer<'c> {
    /// A fresh run: the model is initialised from `options.seed`.
    pub fn new(
        ctx: &'c GpuContext,
        config: ModelConfig,
        options: TrainOptions,
        sampler_state: u64,
        out_dir: &Path,
    ) -> Result<Self> {
        options.validate()?;
        let mut store = ParamStore::new();
        let model = config.build(ctx, &mut store, options.seed)?;
        let adam = Adam::new(options.adam(1e-3))?;
        Ok(Self {
            ctx,
            model,
            store,
            adam,
            state: TrainState {
                sampler_state,
                options,
                ..TrainState::default()
            },
            out_dir: out_dir.to_path_buf(),
            validator: None,
            fault: None,
            last_checkpoint: None,
            last_save: Instant::now(),
            run_metadata: BTreeMap::new(),
        })
    }

    /// Makes step `step` (1-based, global) fail with `fault` (testing the fault path).
    pub fn inject_fault(&mut self, step: u64, fault: InjectedFault) {
        self.fault = Some((step, fault));
    }

    /// Runs `v` after every epoch and reports its score as `val_dice`.
    pub fn set_validator(&mut self, v: Validator<'c>) {
        self.validator = Some(v);
    }

    /// Continues the run saved in `checkpoint` (parameters, statistics, Adam state,
    /// position, sampler state).
    pub fn resume(ctx: &'c GpuContext, checkpoint: &Path, out_dir: &Path) -> Result<Self> {
        let (model, store, ckpt) = load_model(ctx, checkpoint)?;
        let raw = ckpt.metadata.get(KEY_TRAIN_STATE).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{}: no training state; it is not a checkpoint written by `train`",
                checkpoint.display()
            ))
        })?;
        let state: TrainState = serde_json::from_str(raw).map_err(|e| {
            Error::InvalidArgument(format!("{}: bad training state: {e}", checkpoint.display()))
        })?;
        let adam_steps: u32 = ckpt
            .metadata
            .get("masnet.adam_steps")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut adam = Adam::new(state.options.adam(1e-3))?;
        adam.set_steps(adam_steps);
        let resumed_from = (checkpoint.to_path_buf(), state.global_step);
        for (id, e) in store.iter() {
            let m = ckpt.get(&format!("{OPTIMIZER_PREFIX}adam_m.{}", e.name));
            let v = ckpt.get(&format!("{OPTIMIZER_PREFIX}adam_v.{}", e.name));
            if let (Some(m), Some(v)) = (m, v) {
                adam.set_moments(ctx, &store, id, &m.data, &v.data)?;
            }
        }
        Ok(Self {
            ctx,
            model,
            store,
            adam,
            state,
            out_dir: out_dir.to_path_buf(),
            validator: None,
            fault: None,
            last_checkpoint: Some(resumed_from),
            last_save: Instant::now(),
            run_metadata: ckpt
                .metadata
                .iter()
                .filter(|(k, _)| k.starts_with(RUN_METADATA_PREFIX))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        })
    }

    /// Writes `<out>/<name>` with the model, its Adam moments and the run state.
    pub fn save(&self, name: &str) -> Result<PathBuf> {
        let path = self.out_dir.join(name);
        let mut meta = BTreeMap::new();
        meta.insert(
            KEY_TRAIN_STATE.to_string(),
            serde_json::to_string(&self.state)
                .map_err(|e| Error::InvalidArgument(format!("training state: {e}")))?,
        );
        meta.insert("masnet.adam_steps".into(), self.adam.steps().to_string());
        for (k, v) in &self.run_metadata {
            if k.starts_with(RUN_METADATA_PREFIX) {
                meta.insert(k.clone(), v.clone());
            }
        }
        let mut ckpt = model_checkpoint(self.ctx, &self.model, &self.store, meta)?;
        for (id, e) in self.store.iter() {
            if let Some((m, v)) = self.adam.moments(id) {
                let shape = crate::checkpoint::file_shape(e.value.shape(), e.kind);
                for (kind, t) in [("adam_m", m), ("adam_v", v)] {
                    ckpt.tensors.push(CheckpointTensor {
                        name: format!("{OPTIMIZER_PREFIX}{kind}.{}", e.name),
                        shape: shape.clone(),
                        data: t.to_vec(self.ctx)?,
                    });
                }
            }
        }
        ckpt.write(&path)?;
        Ok(path)
    }

    /// Runs until the last epoch, or until `stop` is set (then saves `interrupted.safetensors`).
    pub fn run(
        &mut self,
        source: &mut dyn BatchSource,
        stop: &AtomicBool,
        mut on_event: impl FnMut(TrainEvent),
    ) -> Result<TrainOutcome> {
        let opts = self.state.options.clone();
        let patch = [opts.patch; 3];
        let c = self.model.channels().0;
        source.set_state(self.state.sampler_state);
        while self.state.epoch < opts.epochs {
            let epoch = self.state.epoch;
            let started = Instant::now();
            let mut lr = 0.0;
            while self.state.step_in_epoch < opts.steps_per_epoch {
                if stop.load(Ordering::SeqCst) {
                    let p = self.save("interrupted.safetensors")?;
                    on_event(TrainEvent::Checkpoint(p));
                    return Ok(TrainOutcome::Interrupted);
                }
                let t0 = Instant::now();
                let step = self.state.step_in_epoch;
                lr = opts.schedule.lr_at(epoch, step, opts.steps_per_epoch);
                let (x, y) = source.next_batch(opts.batch, patch)?;
                let mark = self.adam.mark();
                let loss = match self.step(&x, &y, c, patch, lr as f32) {
                    Ok(l) => l,
                    Err(e) if e.is_gpu_fault() => {
                        self.adam.rewind(&mark);
                        return Err(self.fault_error(e, &mut on_event));
                    }
                    Err(e) => return Err(e),
                };
                self.state.step_in_epoch += 1;
                self.state.global_step += 1;
                self.state.sampler_state = source.state();
                self.state.epoch_loss_sum += loss;
                on_event(TrainEvent::Step {
                    global_step: self.state.global_step,
                    epoch,
                    step: step + 1,
                    loss,
                    lr,
                    patches_per_s: opts.batch as f64 / t0.elapsed().as_secs_f64(),
                });
                let minutes = opts.checkpoint_minutes;
                if minutes > 0.0
                    && self.state.step_in_epoch < opts.steps_per_epoch
                    && self.last_save.elapsed().as_secs_f64() >= minutes * 60.0
                {
                    let p = self.save("latest.safetensors")?;
                    self.saved(&p);
                    on_event(TrainEvent::Checkpoint(p));
                }
            }
            let seconds = started.elapsed().as_secs_f64();
            let val_dice = match &mut self.validator {
                Some(v) => Some(v(&self.model, &self.store)?),
                None => None,
            };
            on_event(TrainEvent::Epoch {
                epoch,
                mean_loss: self.state.epoch_loss_sum / opts.steps_per_epoch as f64,
                lr,
                seconds,
                val_dice,
            });
            self.state.epoch += 1;
            self.state.step_in_epoch = 0;
            self.state.epoch_loss_sum = 0.0;
            let last = self.state.epoch == opts.epochs;
            if last
                || self
                    .state
                    .epoch
                    .is_multiple_of(opts.checkpoint_every.max(1))
            {
                let p = self.save(&format!("epoch-{:04}.safetensors", self.state.epoch))?;
                self.saved(&p);
                on_event(TrainEvent::Checkpoint(p.clone()));
                let latest = self.out_dir.join("latest.safetensors");
                std::fs::copy(&p, latest.with_extension("safetensors.tmp"))
                    .and_then(|_| {
                        std::fs::rename(latest.with_extension("safetensors.tmp"), &latest)
                    })
                    .map_err(|e| Error::Io {
                        path: latest.display().to_string(),
                        source: e,
                    })?;
            }
        }
        Ok(TrainOutcome::Finished)
    }

    fn saved(&mut self, path: &Path) {
        self.last_checkpoint = Some((path.to_path_buf(), self.state.global_step));
        self.last_save = Instant::now();
    }

    /// Saves the last good state after a GPU fault where the device still works, and
    /// says where to continue from.
    fn fault_error(&mut self, cause: Error, on_event: &mut impl FnMut(TrainEvent)) -> Error {
        let step = self.state.global_step + 1;
        let resume =
            |p: &Path| format!("continue with `masnet-wgpu train --resume {}`", p.display());
        // A failed submission is dropped whole by wgpu, so the GPU still holds the state
        // after the previous step (docs/reliability.md).
        let saved = match self.ctx.alive() {
            Ok(()) => match self.save("fault.safetensors") {
                Ok(p) => {
                    on_event(TrainEvent::Checkpoint(p.clone()));
                    Ok(p)
                }
                Err(e) => Err(e.to_string()),
            },
            Err(e) => Err(e.to_string()),
        };
        let advice = match (saved, &self.last_checkpoint) {
            (Ok(p), _) => format!(
                "The state after step {} was saved to {}; {}",
                step - 1,
                p.display(),
                resume(&p)
            ),
            (Err(why), Some((p, s))) => format!(
                "Nothing more could be saved ({why}); the last checkpoint is {} (step {s}); {}",
                p.display(),
                resume(p)
            ),
            (Err(why), None) => format!(
                "Nothing could be saved ({why}) and no checkpoint was written yet; start the \
                 run again"
            ),
        };
        Error::TrainingFault {
            step,
            cause: Box::new(cause),
            advice,
        }
    }

    /// One optimisation step on a batch outside the loop (benchmarks): images
    /// `[B, C, p, p, p]`, class ids `[B, 1, p, p, p]` with p = the run's patch.
    pub fn train_step(&mut self, x: &[f32], y: &[f32], lr: f32) -> Result<f64> {
        let p = self.state.options.patch;
        let c = self.model.channels().0;
        self.step(x, y, c, [p; 3], lr)
    }

    /// One optimisation step; returns the loss (cross-entropy + L2 term).
    fn step(&mut self, x: &[f32], y: &[f32], c: usize, patch: [usize; 3], lr: f32) -> Result<f64> {
        let ctx = self.ctx;
        let b = x.len() / (c * patch.iter().product::<usize>()).max(1);
        let step_no = self.state.global_step + 1;
        let mut g = Graph::new(ctx, Mode::Train);
        let xs = Shape5::new(b, c, patch[2], patch[1], patch[0]);
        let ys = Shape5::new(b, 1, patch[2], patch[1], patch[0]);
        let xv = g.input(Tensor::from_slice(ctx, xs, x, "batch images")?);
        let yv = g.input(Tensor::from_slice(ctx, ys, y, "batch labels")?);
        let seed = (self.state.options.seed as u32) ^ (step_no as u32).wrapping_mul(0x2545_F491);
        let logits = self.model.forward(&mut g, &self.store, xv, seed)?;
        let loss = g.softmax_cross_entropy(logits, yv)?;
        let grads = g.backward(loss)?;
        self.adam.step(ctx, g.recorder(), &self.store, &grads, lr)?;
        let l2 = self.adam.l2_terms(ctx, g.recorder(), &self.store)?;
        let check = self.state.options.check_every.max(1);
        let counts = if step_no.is_multiple_of(check as u64) {
            Some(non_finite_counts(ctx, g.recorder(), &self.store)?)
        } else {
            None
        };
        let _invalid = match self.fault {
            Some((at, fault)) if at == step_no => inject(ctx, g.recorder(), fault)?,
            _ => None,
        };
        g.submit();
        let ce = g.value(loss)?.to_vec(ctx)?[0] as f64;
        let l2v = match &l2 {
            Some(t) => self.adam.l2_value(&t.to_vec(ctx)?),
            None => 0.0,
        };
        let counts = counts
            .map(|t| t.to_vec(ctx))
            .transpose()?
            .unwrap_or_default();
        let total = ce + l2v;
        check_step(step_no, total, &counts, &self.store)?;
        Ok(total)
    }
}

/// Records (or performs) `fault` into the step's commands; returns what must outlive
/// the recording.
fn inject(
    ctx: &GpuContext,
    rec: &mut crate::gpu::Recorder,
    fault: InjectedFault,
) -> Result<Option<(wgpu::Buffer, Tensor)>> {
    match fault {
        InjectedFault::InvalidCommands => {
            let target = Tensor::empty(ctx, Shape5::new(1, 1, 1, 1, 4), "fault target")?;
            let bad = ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("injected fault: over-sized buffer"),
                size: ctx.limits.max_buffer_size.saturating_add(4096),
                usage: wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            });
            rec.encoder
                .copy_buffer_to_buffer(&bad, 0, target.buffer(), 0, 16);
            Ok(Some((bad, target)))
        }
        InjectedFault::DeviceLost => {
            ctx.device.destroy();
            Ok(None)
        }
    }
}

/// The training recipe of one of the paper's networks (its Table 1): batch, patch,
/// epochs × steps and learning-rate schedule; the rest stays at the defaults.
pub fn preset(name: &str) -> Result<TrainOptions> {
    let step = |values: &[f64], every| LrSchedule::Step {
        values: values.to_vec(),
        every_epochs: every,
    };
    let base = TrainOptions::default();
    Ok(match name {
        // 1000 patches per epoch of batch 16.
        "dunet" => base,
        // 80 epochs of 5000 patches, lr 3e-4, 1e-4, 1e-5, 1e-6 every 20 epochs.
        "unet3d" | "ccfcn" => TrainOptions {
            batch: 10,
            patch: 32,
            epochs: 80,
            steps_per_epoch: 500,
            schedule: step(&[3e-4, 1e-4, 1e-5, 1e-6], 20),
            ..base
        },
        // 20,000 iterations, 2e-4 decreased by 0.1 every 5000: 4 epochs of 5000 steps.
        "buinet" => TrainOptions {
            batch: 4,
            patch: 64,
            epochs: 4,
            steps_per_epoch: 5000,
            schedule: step(&[2e-4, 2e-5, 2e-6, 2e-7], 1),
            checkpoint_every: 1,
            ..base
        },
        // 80 epochs of 5000 patches, constant 1e-3.
        "nlunet" => TrainOptions {
            batch: 5,
            patch: 32,
            epochs: 80,
            steps_per_epoch: 1000,
            schedule: LrSchedule::Constant(1e-3),
            ..base
        },
        other => {
            return Err(Error::InvalidArgument(format!(
                "preset '{other}': expected dunet, unet3d, ccfcn, buinet or nlunet"
            )))
        }
    })
}
