//! The tool's data commands: train, segment, eval and the demo (binary-side code; the
//! engine, models and data handling live in the library).

pub mod demo;
pub mod eval;
pub mod segment;
pub mod train;

use anyhow::{Context, Result};
use masnet_wgpu::data::preprocess::zscore;
use masnet_wgpu::data::sampler::TrainingVolume;
use masnet_wgpu::data::volume::{self, LabelMap};
use std::path::Path;

/// Normalised T1/T2 and the brain mask used for them (given mask > 0.5, else T1 > 0).
pub struct Normalised {
    /// z-scored T1 (background 0).
    pub t1: Vec<f32>,
    /// z-scored T2 (background 0).
    pub t2: Vec<f32>,
    /// Brain voxels.
    pub mask: Vec<bool>,
}

/// z-scores both modalities over the brain mask, as the paper's pre-processing.
pub fn normalise(t1: &[f32], t2: &[f32], mask: Option<&[f32]>) -> Result<Normalised> {
    let mask: Vec<bool> = match mask {
        Some(m) => m.iter().map(|&v| v > 0.5).collect(),
        None => t1.iter().map(|&v| v > 0.0).collect(),
    };
    Ok(Normalised {
        t1: zscore(t1, Some(&mask)).context("normalising T1")?,
        t2: zscore(t2, Some(&mask)).context("normalising T2")?,
        mask,
    })
}

/// The embedded brain as a training volume, and its geometry.
pub fn embedded_training() -> Result<(TrainingVolume, volume::EmbeddedBrain)> {
    let brain = volume::load_embedded().context("loading the embedded brain")?;
    let n = normalise(&brain.t1.data, &brain.t2.data, Some(&brain.mask.data))?;
    let tv = TrainingVolume::new(n.t1, n.t2, brain.labels.clone(), brain.t1.dims)?;
    Ok((tv, brain))
}

/// Every labelled subject of an iSeg-style folder as training volumes.
pub fn folder_training(dir: &Path, map: &LabelMap) -> Result<Vec<TrainingVolume>> {
    let subjects = volume::discover(dir)?;
    let mut out = Vec::new();
    for s in subjects {
        let Some(label) = &s.label else { continue };
        let t1 = volume::read(&s.t1)?;
        let t2 = volume::read(&s.t2)?;
        volume::check_pair(&t1, &s.t1, &t2, &s.t2)?;
        let lab = volume::read(label)?;
        volume::check_pair(&t1, &s.t1, &lab, label)?;
        let n = normalise(&t1.data, &t2.data, None).with_context(|| format!("subject {}", s.id))?;
        out.push(TrainingVolume::new(
            n.t1,
            n.t2,
            map.to_classes(&lab)?,
            t1.dims,
        )?);
    }
    if out.is_empty() {
        anyhow::bail!(
            "{}: no subject with a -label file to train on",
            dir.display()
        );
    }
    Ok(out)
}

/// Parses `a:b` into a range.
pub fn parse_range(s: &str) -> Result<std::ops::Range<usize>> {
    let (a, b) = s
        .split_once(':')
        .with_context(|| format!("range '{s}': expected start:end, e.g. 0:48"))?;
    let a: usize = a
        .trim()
        .parse()
        .with_context(|| format!("range '{s}': bad start"))?;
    let b: usize = b
        .trim()
        .parse()
        .with_context(|| format!("range '{s}': bad end"))?;
    if a >= b {
        anyhow::bail!("range '{s}' is empty");
    }
    Ok(a..b)
}

/// A progress bar on stderr (hidden when stderr is not a terminal).
pub fn progress_bar(total: u64, template: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb
}
