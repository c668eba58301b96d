//! `masnet-wgpu segment`.

use super::{normalise, progress_bar};
use anyhow::{Context, Result};
use clap::Args;
use masnet_wgpu::data::preview::write_preview;
use masnet_wgpu::data::sampler::majority_vote;
use masnet_wgpu::data::volume::{self, DataType, LabelMap};
use masnet_wgpu::nn::io::load_model;
use masnet_wgpu::segment::{inference_form, segment_volume, SegmentOptions};
use masnet_wgpu::GpuContext;
use std::path::PathBuf;

/// Segment a T1+T2 pair into background, CSF, GM and WM with one or more models
#[derive(Args, Clone, Debug)]
pub struct SegmentArgs {
    /// Model checkpoint (training or fused); several = majority-vote ensemble (ties to
    /// the lowest label)
    #[arg(long = "model", required = true)]
    pub models: Vec<PathBuf>,
    /// T1-weighted image (.nii, .nii.gz or Analyze .hdr/.img)
    #[arg(long)]
    pub t1: PathBuf,
    /// T2-weighted image on the same grid
    #[arg(long)]
    pub t2: PathBuf,
    /// Output label map (keeps the T1's header and affine)
    #[arg(short, long)]
    pub output: PathBuf,
    /// Brain mask (> 0.5); default: voxels where T1 > 0 (skull-stripped input)
    #[arg(long)]
    pub mask: Option<PathBuf>,
    /// Window edge [paper: 32]
    #[arg(long, default_value_t = 32)]
    pub patch: usize,
    /// Distance between windows [paper: 8]
    #[arg(long, default_value_t = 8)]
    pub step: usize,
    /// Windows per GPU submission
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Whole-volume mode: run the network on tiles of this edge (the whole brain when it
    /// fits; halved automatically while a tile exceeds the binding limit), blended over
    /// --overlap voxels, instead of --patch/--step windows
    #[arg(long)]
    pub tile: Option<usize>,
    /// Overlap between tiles in whole-volume mode
    #[arg(long, default_value_t = 16)]
    pub overlap: usize,
    /// Also write the class probabilities as a 4-D f32 image
    #[arg(long)]
    pub prob: Option<PathBuf>,
    /// Also write a PNG with axial, coronal and sagittal slices and the labels overlaid
    #[arg(long)]
    pub preview: Option<PathBuf>,
    /// Values written for classes 0..3, e.g. 0,10,150,250 for iSeg
    #[arg(long)]
    pub label_map: Option<String>,
}

/// Runs `segment`.
pub fn run(ctx: &GpuContext, a: &SegmentArgs) -> Result<()> {
    let t1 = volume::read(&a.t1)?;
    let t2 = volume::read(&a.t2)?;
    volume::check_pair(&t1, &a.t1, &t2, &a.t2)?;
    let mask = match &a.mask {
        Some(p) => {
            let m = volume::read(p)?;
            volume::check_pair(&t1, &a.t1, &m, p)?;
            Some(m.data)
        }
        None => None,
    };
    let n = normalise(&t1.data, &t2.data, mask.as_deref())?;
    let mut maps = Vec::new();
    let mut prob_sum: Option<Vec<Vec<f32>>> = None;
    let mut classes = 0;
    for path in &a.models {
        let (model, store, _) = load_model(ctx, path)?;
        let (model, store) = inference_form(ctx, model, store)?;
        classes = model.channels().1;
        let opts = match a.tile {
            Some(t) => SegmentOptions::tiles(t, a.overlap, model.input_multiple(), t1.dims)?,
            None => SegmentOptions {
                patch: a.patch,
                step: a.step,
                batch: a.batch,
                blend: false,
            },
        };
        let pb = progress_bar(
            0,
            "{bar:30} {pos}/{len} windows {msg} [{elapsed_precise} < {eta_precise}]",
        );
        pb.set_message(path.display().to_string());
        let seg = segment_volume(
            ctx,
            &model,
            &store,
            &n.t1,
            &n.t2,
            &n.mask,
            t1.dims,
            opts,
            |d, t| {
                pb.set_length(t as u64);
                pb.set_position(d as u64);
            },
        )
        .with_context(|| format!("segmenting with {}", path.display()))?;
        pb.finish_and_clear();
        if seg.used != opts {
            eprintln!(
                "note: {}^3 windows in batches of {} exceeded the storage-binding limit of {} \
                 bytes; ran {}^3 windows (step {}) in batches of {}",
                opts.patch,
                opts.batch,
                ctx.max_binding_bytes(),
                seg.used.patch,
                seg.used.step,
                seg.used.batch
            );
        }
        let probs = seg.probs;
        maps.push(seg.labels);
        match &mut prob_sum {
            None => prob_sum = Some(probs),
            Some(s) => s
                .iter_mut()
                .zip(&probs)
                .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(x, y)| *x += y)),
        }
    }
    let labels = if maps.len() == 1 {
        maps.swap_remove(0)
    } else {
        majority_vote(&maps)?
    };
    let map = match &a.label_map {
        Some(s) => LabelMap::parse(s)?,
        None => LabelMap::identity(classes)?,
    };
    volume::write_like(&a.output, &t1, &map.from_classes(&labels)?, DataType::U8)?;
    if let (Some(p), Some(mut probs)) = (&a.prob, prob_sum) {
        let k = a.models.len() as f32;
        probs
            .iter_mut()
            .for_each(|c| c.iter_mut().for_each(|v| *v /= k));
        volume::write_4d_like(p, &t1, &probs)?;
    }
    if let Some(p) = &a.preview {
        write_preview(p, &t1.data, &labels, t1.dims, t1.spacing)?;
    }
    let counts: Vec<usize> = (0..classes as u8)
        .map(|c| labels.iter().filter(|&&l| l == c).count())
        .collect();
    println!(
        "{} written: voxels per class {counts:?}",
        a.output.display()
    );
    Ok(())
}
