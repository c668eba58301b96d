//! `masnet-wgpu eval`.

use anyhow::Result;
use clap::Args;
use masnet_wgpu::data::volume::{self, LabelMap};
use masnet_wgpu::metrics::{evaluate, metrics_json, TissueMetrics, ISEG_CLASSES};
use std::path::PathBuf;

/// Dice, MHD and ASD (mm) per tissue between a segmentation and the truth
#[derive(Args, Clone, Debug)]
pub struct EvalArgs {
    /// Predicted label map
    #[arg(long)]
    pub pred: PathBuf,
    /// Ground-truth label map on the same grid
    #[arg(long)]
    pub truth: PathBuf,
    /// Label values in both files for classes 0..3, e.g. 0,10,150,250 for iSeg
    #[arg(long)]
    pub label_map: Option<String>,
    /// Print JSON: {"csf": {"dice", "mhd", "asd"}, "gm": .., "wm": .., "mean": ..}
    #[arg(long)]
    pub json: bool,
}

/// Metrics of `pred` against `truth` (same grid required).
pub fn metrics(a: &EvalArgs) -> Result<Vec<(String, TissueMetrics)>> {
    let pred = volume::read(&a.pred)?;
    let truth = volume::read(&a.truth)?;
    volume::check_pair(&pred, &a.pred, &truth, &a.truth)?;
    let map = match &a.label_map {
        Some(s) => LabelMap::parse(s)?,
        None => LabelMap::identity(4)?,
    };
    let p = map.to_classes(&pred)?;
    let t = map.to_classes(&truth)?;
    let spacing = pred.spacing.map(f64::from);
    Ok(evaluate(&p, &t, pred.dims, spacing, &ISEG_CLASSES)?)
}

/// Prints the metrics as a table or JSON.
pub fn print(rows: &[(String, TissueMetrics)], json: bool) -> Result<()> {
    if json {
        println!("{}", metrics_json(rows)?);
        return Ok(());
    }
    println!(
        "{:<8} {:>8} {:>10} {:>10}",
        "tissue", "Dice", "MHD (mm)", "ASD (mm)"
    );
    for (name, m) in rows {
        println!(
            "{:<8} {:>8.4} {:>10.3} {:>10.3}",
            name, m.dice, m.mhd, m.asd
        );
    }
    Ok(())
}

/// Runs `eval`.
pub fn run(a: &EvalArgs) -> Result<()> {
    print(&metrics(a)?, a.json)
}
