//! Intensity pre-processing: per-modality z-score normalisation over the brain and the
//! brain mask, as the reference pipeline does before training and inference.
//!
//! Volumes are plain x-fastest slices (NIfTI order, see [`crate::data::sampler`]); this
//! module never looks at dims, only at voxel values, so it works on any layout.

use crate::error::{Error, Result};

/// Mean and population standard deviation of the voxels a z-score is taken over.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MaskStats {
    /// Mean over the selected voxels.
    pub mean: f64,
    /// Population standard deviation (divide by `count`, not `count - 1`).
    pub std: f64,
    /// Number of selected voxels.
    pub count: usize,
}

/// The voxels a z-score is taken over: `mask` when given, else the voxels `> 0`.
fn selected(values: &[f32], mask: Option<&[bool]>) -> Result<Vec<bool>> {
    match mask {
        Some(m) if m.len() != values.len() => Err(Error::Shape(format!(
            "zscore: mask has {} voxels but the volume has {}",
            m.len(),
            values.len()
        ))),
        Some(m) => Ok(m.to_vec()),
        None => Ok(values.iter().map(|&v| v > 0.0).collect()),
    }
}

/// Mean and population std of `values` over `mask` (or over the voxels `> 0` when no mask
/// is given), accumulated in f64. Errors for a length mismatch, an empty selection, a
/// non-finite selected value or a zero (or non-finite) standard deviation.
pub fn mask_stats(values: &[f32], mask: Option<&[bool]>) -> Result<MaskStats> {
    let sel = selected(values, mask)?;
    let what = if mask.is_some() {
        "the mask"
    } else {
        "the voxels > 0"
    };
    let mut count = 0usize;
    let mut sum = 0f64;
    for (i, (&v, &s)) in values.iter().zip(&sel).enumerate() {
        if s {
            if !v.is_finite() {
                return Err(Error::InvalidArgument(format!(
                    "zscore: voxel {i} inside {what} is not finite ({v})"
                )));
            }
            count += 1;
            sum += v as f64;
        }
    }
    if count == 0 {
        return Err(Error::InvalidArgument(format!(
            "zscore: empty mask: no voxel selected ({what}) among {} voxels",
            values.len()
        )));
    }
    let mean = sum / count as f64;
    let var = values
        .iter()
        .zip(&sel)
        .filter(|(_, &s)| s)
        .map(|(&v, _)| {
            let d = v as f64 - mean;
            d * d
        })
        .sum::<f64>()
        / count as f64;
    let std = var.sqrt();
    // A spread this small relative to the mean is a constant image up to rounding.
    let tiny = 1e-12 * mean.abs().max(1.0);
    if !std.is_finite() || std <= tiny {
        return Err(Error::InvalidArgument(format!(
            "zscore: zero standard deviation over {what} ({count} voxels, all equal to \
             {mean}): cannot normalise a constant image"
        )));
    }
    Ok(MaskStats { mean, std, count })
}

/// Z-score normalisation of one modality: `(v - mean) / std` inside the mask (or inside
/// the voxels `> 0` when `mask` is `None`), with mean and population std taken over the
/// same voxels; every other voxel is exactly 0. Errors as [`mask_stats`].
pub fn zscore(values: &[f32], mask: Option<&[bool]>) -> Result<Vec<f32>> {
    let stats = mask_stats(values, mask)?;
    let sel = selected(values, mask)?;
    Ok(values
        .iter()
        .zip(&sel)
        .map(|(&v, &s)| {
            if s {
                ((v as f64 - stats.mean) / stats.std) as f32
            } else {
                0.0
            }
        })
        .collect())
}

/// The brain mask of a raw (not normalised) T1: voxels with `t1 > 0`.
pub fn brain_mask_from(t1: &[f32]) -> Vec<bool> {
    t1.iter().map(|&v| v > 0.0).collect()
}
