//! `masnet-wgpu train`.

use super::{embedded_training, folder_training, parse_range, progress_bar};
use anyhow::{Context, Result};
use clap::Args;
use masnet_wgpu::data::sampler::PatchSampler;
use masnet_wgpu::data::volume::LabelMap;
use masnet_wgpu::nn::{MixSpec, ModelConfig};
use masnet_wgpu::schedule::LrSchedule;
use masnet_wgpu::train::{InjectedFault, TrainEvent, TrainOptions, TrainOutcome, Trainer};
use masnet_wgpu::GpuContext;
use serde::Deserialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// Train a DU-Net (MixACB or baseline) on patches of T1+T2 images
#[derive(Args, Clone, Debug, Default)]
pub struct TrainArgs {
    /// TOML file with [model], [train] and [data] sections (see docs/training.md);
    /// flags given here override it
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Folder of iSeg-style subjects (subject-<id>-T1/-T2/-label); default: the embedded
    /// brain (trained on its x < 48 half)
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Label values in the files for classes 0..3, e.g. 0,10,150,250 for iSeg
    #[arg(long)]
    pub label_map: Option<String>,
    /// Network: dunet (the paper's 3D-MASNet backbone), unet3d, ccfcn, buinet or nlunet;
    /// its widths go in the [model] section of --config
    #[arg(long, default_value = "dunet")]
    pub model: String,
    /// Training recipe of the paper's Table 1 (dunet, unet3d, ccfcn, buinet, nlunet);
    /// applied before the configuration file and the flags [default: the model's]
    #[arg(long)]
    pub preset: Option<String>,
    /// Block of dense layers and down transitions: mixacb or conv
    #[arg(long)]
    pub block: Option<String>,
    /// MixACB mix ratio, e.g. 3:1
    #[arg(long)]
    pub mix: Option<String>,
    /// Channels each dense layer adds [paper: 16]
    #[arg(long)]
    pub growth: Option<usize>,
    /// Channels of the initial convolution [paper: 32]
    #[arg(long)]
    pub init_features: Option<usize>,
    /// Dense layers per block [paper: 3]
    #[arg(long)]
    pub layers: Option<usize>,
    /// Bottleneck width [paper: 64]
    #[arg(long)]
    pub bottleneck: Option<usize>,
    /// Down transitions [paper: 3]
    #[arg(long)]
    pub levels: Option<usize>,
    /// Patch edge in voxels [paper: 32]
    #[arg(long)]
    pub patch: Option<usize>,
    /// Patches per step [paper: 16]
    #[arg(long)]
    pub batch: Option<usize>,
    /// Epochs [paper: 500]
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Steps per epoch [paper: 62]
    #[arg(long)]
    pub steps_per_epoch: Option<usize>,
    /// Learning-rate schedule: constant:LR, cosine:MAX:MIN:PERIOD or
    /// step:LR1,LR2,...:EVERY [paper: cosine:3e-4:1e-6:50]
    #[arg(long)]
    pub lr_schedule: Option<String>,
    /// Seed of initialisation, sampling and dropout
    #[arg(long)]
    pub seed: Option<u64>,
    /// Checkpoint every N epochs (and at the end)
    #[arg(long)]
    pub checkpoint_every: Option<usize>,
    /// Also refresh latest.safetensors mid-epoch every N minutes (0 = off) [default 15]
    #[arg(long)]
    pub checkpoint_minutes: Option<f64>,
    /// Probability of centring a patch on a labelled voxel [default 0: uniform corners]
    #[arg(long)]
    pub foreground_bias: Option<f64>,
    /// Restrict patches along x to START:END (e.g. one hemisphere)
    #[arg(long)]
    pub region: Option<String>,
    /// Validate after every epoch (mean Dice of CSF, GM, WM, logged as val_dice):
    /// `held-out` = the embedded brain's x >= 49 half, or a folder of labelled iSeg-style
    /// subjects
    #[arg(long)]
    pub val: Option<String>,
    /// Output folder (checkpoints, metrics.jsonl)
    #[arg(short, long, default_value = "runs/train")]
    pub output: PathBuf,
    /// Continue the run saved in this checkpoint exactly (model, optimiser, schedule,
    /// sampler)
    #[arg(long)]
    pub resume: Option<PathBuf>,
}

/// The `[data]` section of the configuration file (also saved in checkpoints, so that
/// `--resume` samples the same data).
#[derive(Deserialize, serde::Serialize, Default, Debug, Clone)]
#[serde(default, deny_unknown_fields)]
struct DataSection {
    dir: Option<PathBuf>,
    label_map: Option<String>,
    region: Option<String>,
    foreground_bias: Option<f64>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(default, deny_unknown_fields)]
struct ConfigFile {
    model: Option<toml::Table>,
    train: TrainOptions,
    data: DataSection,
}

/// Checkpoint metadata key of the data settings.
const KEY_DATA: &str = "masnet.run.data";

/// Everything a run needs, after merging the file and the flags.
pub struct Plan {
    /// Network configuration.
    pub model: ModelConfig,
    /// Optimisation.
    pub train: TrainOptions,
    data: DataSection,
}

impl TrainArgs {
    /// Merges the configuration file (if any) with the flags.
    pub fn plan(&self) -> Result<Plan> {
        // The preset (the model's own recipe unless --preset), then the file's [train]
        // keys on top of it, then the flags.
        let preset = masnet_wgpu::train::preset(self.preset.as_deref().unwrap_or(&self.model))?;
        let mut f = match &self.config {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading {}", p.display()))?;
                let bad = || format!("{}: invalid configuration", p.display());
                let mut table: toml::Table = toml::from_str(&text).with_context(bad)?;
                let mut train = toml::Value::try_from(&preset)?;
                if let (Some(t), Some(toml::Value::Table(file))) =
                    (train.as_table_mut(), table.remove("train"))
                {
                    t.extend(file);
                }
                table.insert("train".into(), train);
                toml::Value::Table(table)
                    .try_into::<ConfigFile>()
                    .with_context(bad)?
            }
            None => ConfigFile {
                train: preset,
                ..ConfigFile::default()
            },
        };
        let fields = serde_json::to_value(f.model.take().unwrap_or_default())?;
        let mut model = ModelConfig::from_fields(&self.model, fields)?;
        if let Some(b) = &self.block {
            model.set_block(b.parse()?);
        }
        if let Some(x) = &self.mix {
            model.set_mix(MixSpec::parse(x)?);
        }
        let dunet_flags = [
            self.growth,
            self.init_features,
            self.layers,
            self.bottleneck,
            self.levels,
        ];
        match &mut model {
            ModelConfig::Dunet(m) => {
                set(&mut m.growth, self.growth);
                set(&mut m.init_features, self.init_features);
                set(&mut m.layers_per_block, self.layers);
                set(&mut m.bottleneck, self.bottleneck);
                set(&mut m.levels, self.levels);
            }
            #[allow(unreachable_patterns)]
            _ if dunet_flags.iter().any(Option::is_some) => anyhow::bail!(
                "--growth, --init-features, --layers, --bottleneck and --levels apply to dunet; \
                 set {}'s widths in the [model] section of --config",
                self.model
            ),
            #[allow(unreachable_patterns)]
            _ => {}
        }
        let t = &mut f.train;
        set(&mut t.patch, self.patch);
        set(&mut t.batch, self.batch);
        set(&mut t.epochs, self.epochs);
        set(&mut t.steps_per_epoch, self.steps_per_epoch);
        set(&mut t.seed, self.seed);
        set(&mut t.checkpoint_every, self.checkpoint_every);
        set(&mut t.checkpoint_minutes, self.checkpoint_minutes);
        if let Some(s) = &self.lr_schedule {
            t.schedule = s.parse::<LrSchedule>()?;
        }
        t.validate()?;
        let d = &mut f.data;
        if self.data.is_some() {
            d.dir = self.data.clone();
        }
        if self.label_map.is_some() {
            d.label_map = self.label_map.clone();
        }
        if self.region.is_some() {
            d.region = self.region.clone();
        }
        if self.foreground_bias.is_some() {
            d.foreground_bias = self.foreground_bias;
        }
        let m = model.input_multiple();
        if !f.train.patch.is_multiple_of(m) {
            anyhow::bail!(
                "patch {} must be a multiple of {m} for {}",
                f.train.patch,
                self.model
            );
        }
        Ok(Plan {
            model,
            train: f.train,
            data: f.data,
        })
    }
}

fn set<T>(dst: &mut T, v: Option<T>) {
    if let Some(v) = v {
        *dst = v;
    }
}

impl Plan {
    /// The patch sampler over the configured data.
    pub fn sampler(&self) -> Result<PatchSampler> {
        let (volumes, default_region) = match &self.data.dir {
            Some(dir) => {
                let map = match &self.data.label_map {
                    Some(s) => LabelMap::parse(s)?,
                    None => LabelMap::identity(self.model.classes())?,
                };
                (folder_training(dir, &map)?, None)
            }
            None => (vec![embedded_training()?.0], Some(0..48)),
        };
        let mut s = PatchSampler::new(volumes, self.train.seed)?;
        let region = match &self.data.region {
            Some(r) => Some(parse_range(r)?),
            None => default_region,
        };
        if let Some(r) = region {
            s = s.with_region(r)?;
        }
        if let Some(q) = self.data.foreground_bias {
            s = s.with_foreground_bias(q)?;
        }
        Ok(s)
    }
}

/// Runs `train`; returns whether it finished (false: interrupted, checkpoint saved).
pub fn run(ctx: &GpuContext, args: &TrainArgs, stop: Arc<AtomicBool>) -> Result<bool> {
    std::fs::create_dir_all(&args.output)
        .with_context(|| format!("creating {}", args.output.display()))?;
    let (mut trainer, mut sampler) = match &args.resume {
        Some(ckpt) => {
            let t = Trainer::resume(ctx, ckpt, &args.output)?;
            let mut plan = args.plan()?;
            plan.train = t.state.options.clone();
            plan.model = t.model.config();
            if let Some(saved) = t.run_metadata.get(KEY_DATA) {
                let mut d: DataSection = serde_json::from_str(saved)
                    .with_context(|| format!("{}: bad {KEY_DATA}", ckpt.display()))?;
                // Flags given with --resume still override the saved settings.
                if args.data.is_some() {
                    d.dir = args.data.clone();
                }
                if args.label_map.is_some() {
                    d.label_map = args.label_map.clone();
                }
                if args.region.is_some() {
                    d.region = args.region.clone();
                }
                if args.foreground_bias.is_some() {
                    d.foreground_bias = args.foreground_bias;
                }
                plan.data = d;
            }
            let s = plan.sampler()?;
            (t, s)
        }
        None => {
            let plan = args.plan()?;
            let s = plan.sampler()?;
            let mut t = Trainer::new(
                ctx,
                plan.model.clone(),
                plan.train.clone(),
                s.state(),
                &args.output,
            )?;
            t.run_metadata
                .insert(KEY_DATA.into(), serde_json::to_string(&plan.data)?);
            (t, s)
        }
    };
    if let Some(v) = &args.val {
        trainer.set_validator(validator(
            ctx,
            v,
            trainer.state.options.patch,
            trainer.model.channels().1,
        )?);
    }
    let o = trainer.state.options.clone();
    eprintln!(
        "training {} ({} parameters) on {} for {} epochs x {} steps, batch {}, patch {}^3, lr {}",
        trainer.model.config().name(),
        trainer.store.trainable_count(),
        ctx.adapter_name(),
        o.epochs,
        o.steps_per_epoch,
        o.batch,
        o.patch,
        o.schedule
    );
    let total = (o.epochs * o.steps_per_epoch) as u64;
    let pb = progress_bar(
        total,
        "{bar:30} {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]",
    );
    pb.set_position(trainer.state.global_step);
    if let Ok(f) = std::env::var("MASNET_INJECT_FAULT") {
        let (step, fault) = InjectedFault::parse(&f)?;
        eprintln!("MASNET_INJECT_FAULT: step {step} will fail ({fault:?})");
        trainer.inject_fault(step, fault);
    }
    // One line per step, written as it happens: a killed run keeps its loss curve.
    let steps_path = args.output.join("steps.jsonl");
    let mut steps_log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&steps_path)
        .with_context(|| format!("opening {}", steps_path.display()))?;
    let log_path = args.output.join("metrics.jsonl");
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let mut log_err = None;
    let outcome = trainer.run(&mut sampler, &stop, |ev| match ev {
        TrainEvent::Step { global_step, epoch, step, loss, lr, patches_per_s } => {
            let line = serde_json::json!({"step": global_step, "epoch": epoch + 1, "step_in_epoch": step, "loss": loss, "lr": lr});
            if let Err(e) = writeln!(steps_log, "{line}") {
                log_err = Some(e);
            }
            pb.set_message(format!(
                "epoch {} step {step}/{} loss {loss:.4} lr {lr:.2e} {patches_per_s:.1} patches/s",
                epoch + 1,
                o.steps_per_epoch
            ));
            pb.inc(1);
        }
        TrainEvent::Epoch {
            epoch,
            mean_loss,
            lr,
            seconds,
            val_dice,
        } => {
            let line = serde_json::json!({"epoch": epoch + 1, "mean_loss": mean_loss, "lr": lr, "seconds": seconds, "val_dice": val_dice});
            if let Err(e) = writeln!(log, "{line}") {
                log_err = Some(e);
            }
            let val = val_dice.map(|d| format!(", validation Dice {d:.4}")).unwrap_or_default();
            pb.println(format!(
                "epoch {} mean loss {mean_loss:.4}{val} ({seconds:.1} s)",
                epoch + 1
            ));
        }
        TrainEvent::Checkpoint(p) => pb.println(format!("checkpoint {}", p.display())),
    })?;
    pb.finish_and_clear();
    if let Some(e) = log_err {
        return Err(e).with_context(|| format!("writing {}", log_path.display()));
    }
    Ok(outcome == TrainOutcome::Finished)
}

/// The latest checkpoint a finished run wrote.
pub fn latest(out: &Path) -> PathBuf {
    out.join("latest.safetensors")
}

/// Mean Dice (CSF, GM, WM) of the fused model on the validation data.
fn validator<'c>(
    ctx: &'c GpuContext,
    spec: &str,
    patch: usize,
    classes: usize,
) -> Result<masnet_wgpu::train::Validator<'c>> {
    use masnet_wgpu::metrics::dice;
    use masnet_wgpu::nn::ModelForm;
    use masnet_wgpu::segment::{segment_volume, SegmentOptions};
    // (volume, region along x where Dice counts)
    let vols: Vec<(
        masnet_wgpu::data::sampler::TrainingVolume,
        std::ops::Range<usize>,
    )> = if spec == "held-out" {
        let tv = embedded_training()?.0;
        let x = 49..tv.dims[0];
        vec![(tv, x)]
    } else {
        let map = LabelMap::identity(classes)?;
        folder_training(Path::new(spec), &map)?
            .into_iter()
            .map(|v| {
                let x = 0..v.dims[0];
                (v, x)
            })
            .collect()
    };
    Ok(Box::new(move |model, store| {
        // Validate the inference form, as `segment` would run it.
        let (m, s) = model.convert(ctx, store, ModelForm::Folded)?;
        let mut total = 0.0;
        let mut n = 0.0;
        for (v, xr) in &vols {
            let mask: Vec<bool> = v.t1.iter().map(|&t| t != 0.0).collect();
            let opts = SegmentOptions {
                patch,
                step: patch,
                batch: 2,
                blend: false,
            };
            let labels =
                segment_volume(ctx, &m, &s, &v.t1, &v.t2, &mask, v.dims, opts, |_, _| {})?.labels;
            let keep = |a: &[u8]| -> Vec<u8> {
                a.iter()
                    .enumerate()
                    .filter(|(i, _)| xr.contains(&(i % v.dims[0])))
                    .map(|(_, &l)| l)
                    .collect()
            };
            let (p, t) = (keep(&labels), keep(&v.labels));
            for c in 1..classes as u8 {
                total += dice(&p, &t, c)?;
                n += 1.0;
            }
        }
        Ok(if n > 0.0 { total / n } else { 0.0 })
    }))
}
