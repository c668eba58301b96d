//! `masnet-wgpu demo`: train a small DU-Net+MixACB on one hemisphere of the embedded
//! brain, fuse it, segment the brain and report the metrics on the other hemisphere.

use super::{embedded_training, progress_bar};
use anyhow::{Context, Result};
use clap::Args;
use masnet_wgpu::data::preview::write_preview;
use masnet_wgpu::data::sampler::PatchSampler;
use masnet_wgpu::data::volume::{self, DataType};
use masnet_wgpu::metrics::{evaluate, ISEG_CLASSES};
use masnet_wgpu::nn::io::save_model;
use masnet_wgpu::nn::{DunetConfig, ModelForm};
use masnet_wgpu::schedule::LrSchedule;
use masnet_wgpu::segment::{segment_volume, SegmentOptions};
use masnet_wgpu::train::{TrainEvent, TrainOptions, Trainer};
use masnet_wgpu::GpuContext;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

/// Train on the x < 48 half of the embedded brain, segment, evaluate on the x >= 49 half
#[derive(Args, Clone, Debug)]
pub struct DemoArgs {
    /// Output folder (checkpoints, segmentation, preview)
    #[arg(short, long, default_value = "demo-output")]
    pub output: PathBuf,
    /// Training steps
    #[arg(long, default_value_t = 300)]
    pub steps: usize,
    /// Patches per step
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Training patch edge
    #[arg(long, default_value_t = 16)]
    pub patch: usize,
    /// Segmentation window edge (the fused network is fully convolutional)
    #[arg(long, default_value_t = 48)]
    pub window: usize,
    /// Distance between segmentation windows
    #[arg(long, default_value_t = 40)]
    pub window_step: usize,
    /// Seed
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}

/// The demo's small DU-Net+MixACB (same structure as the paper's, narrower, 2 levels).
pub fn demo_config() -> DunetConfig {
    DunetConfig {
        init_features: 16,
        growth: 8,
        layers_per_block: 1,
        bottleneck: 16,
        levels: 1,
        dropout: 0.0,
        ..DunetConfig::default()
    }
}

/// Runs the demo.
pub fn run(ctx: &GpuContext, a: &DemoArgs) -> Result<()> {
    let t0 = Instant::now();
    std::fs::create_dir_all(&a.output)
        .with_context(|| format!("creating {}", a.output.display()))?;
    let (tv, brain) = embedded_training()?;
    let dims = tv.dims;
    let held_out = 49..dims[0];
    let (t1n, t2n) = (tv.t1.clone(), tv.t2.clone());
    let mut sampler = PatchSampler::new(vec![tv], a.seed)?
        .with_region(0..48)?
        .with_foreground_bias(0.5)?;
    let options = TrainOptions {
        batch: a.batch,
        patch: a.patch,
        epochs: 1,
        steps_per_epoch: a.steps,
        schedule: LrSchedule::CosineRestarts {
            max: 3e-3,
            min: 1e-4,
            period_epochs: 1,
        },
        seed: a.seed,
        checkpoint_every: 1,
        ..TrainOptions::default()
    };
    let mut trainer = Trainer::new(
        ctx,
        masnet_wgpu::nn::ModelConfig::Dunet(demo_config()),
        options,
        sampler.state(),
        &a.output,
    )?;
    println!(
        "demo: training a DU-Net+MixACB ({} parameters) on the x < 48 half of the embedded brain, {} steps of {} patches of {}^3, on {}",
        trainer.store.trainable_count(),
        a.steps,
        a.batch,
        a.patch,
        ctx.adapter_name()
    );
    let pb = progress_bar(
        a.steps as u64,
        "{bar:30} {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]",
    );
    let stop = AtomicBool::new(false);
    trainer.run(&mut sampler, &stop, |ev| {
        if let TrainEvent::Step {
            loss,
            patches_per_s,
            ..
        } = ev
        {
            pb.set_message(format!("loss {loss:.4} {patches_per_s:.1} patches/s"));
            pb.inc(1);
        }
    })?;
    pb.finish_and_clear();
    let train_s = t0.elapsed().as_secs_f64();
    let (model, store) = trainer
        .model
        .convert(ctx, &trainer.store, ModelForm::Folded)?;
    let fused_path = a.output.join("fused.safetensors");
    save_model(ctx, &fused_path, &model, &store, Default::default())?;
    let t1 = Instant::now();
    let mask: Vec<bool> = brain.mask.data.iter().map(|&v| v > 0.5).collect();
    let opts = SegmentOptions {
        patch: a.window,
        step: a.window_step,
        batch: 2,
        blend: false,
    };
    let pb = progress_bar(
        0,
        "{bar:30} {pos}/{len} windows [{elapsed_precise} < {eta_precise}]",
    );
    let labels = segment_volume(
        ctx,
        &model,
        &store,
        &t1n,
        &t2n,
        &mask,
        dims,
        opts,
        |d, t| {
            pb.set_length(t as u64);
            pb.set_position(d as u64);
        },
    )?
    .labels;
    pb.finish_and_clear();
    let seg_s = t1.elapsed().as_secs_f64();
    let seg_path = a.output.join("segmentation.nii.gz");
    volume::write_like(
        &seg_path,
        &brain.t1,
        &labels.iter().map(|&l| f32::from(l)).collect::<Vec<_>>(),
        DataType::U8,
    )?;
    let preview = a.output.join("preview.png");
    write_preview(&preview, &brain.t1.data, &labels, dims, brain.t1.spacing)?;
    // Metrics on the held-out half only.
    let crop = |v: &[u8]| -> Vec<u8> {
        let mut out = Vec::new();
        for z in 0..dims[2] {
            for y in 0..dims[1] {
                for x in held_out.clone() {
                    out.push(v[x + dims[0] * (y + dims[1] * z)]);
                }
            }
        }
        out
    };
    let cdims = [held_out.len(), dims[1], dims[2]];
    let rows = evaluate(
        &crop(&labels),
        &crop(&brain.labels),
        cdims,
        brain.t1.spacing.map(f64::from),
        &ISEG_CLASSES,
    )?;
    println!(
        "held-out hemisphere (x >= 49), {} mm voxels:",
        brain.t1.spacing[0]
    );
    super::eval::print(&rows, false)?;
    println!(
        "training {train_s:.0} s, fusion + segmentation {seg_s:.0} s (brain windows of {}^3, step {}); wrote {}, {}, {}",
        a.window,
        a.window_step,
        fused_path.display(),
        seg_path.display(),
        preview.display()
    );
    Ok(())
}
