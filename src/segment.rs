//! Segmentation of a whole volume with a (fused) model, two ways:
//! - the paper's protocol: windows at 0, step, 2·step, … plus one flush with the border,
//!   softmax probabilities averaged per voxel;
//! - tiles ([`SegmentOptions::tiles`]): the network is fully convolutional, so large tiles
//!   (the whole brain when it fits) overlap only by a margin and are blended with weights
//!   that fall linearly towards tile edges inside the volume.
//!
//! Windows without brain are skipped (their voxels stay background); argmax ties go to
//! the lowest class. When a window batch needs a buffer above the adapter's binding
//! limit, the batch and then the window are halved until it fits (reported in
//! [`Segmentation::used`]), or the call fails naming the limit.

use crate::autograd::{Graph, Mode, ParamStore};
use crate::data::sampler::{extract_patch, window_has_brain, windows, ProbAccumulator};
use crate::error::{Error, Result};
use crate::gpu::GpuContext;
use crate::nn::{Model, ModelForm};
use crate::tensor::{Shape5, Tensor};

/// Window geometry and batching.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentOptions {
    /// Cubic window edge (a multiple of `2^levels` of the model).
    pub patch: usize,
    /// Distance between window starts.
    pub step: usize,
    /// Windows per GPU submission.
    pub batch: usize,
    /// Blend overlapping windows with linear ramps over the overlap (`patch - step`)
    /// instead of a plain average.
    pub blend: bool,
}

impl Default for SegmentOptions {
    /// The paper's protocol: 32³ windows, step 8.
    fn default() -> Self {
        Self {
            patch: 32,
            step: 8,
            batch: 4,
            blend: false,
        }
    }
}

impl SegmentOptions {
    /// Whole-volume inference: tiles of edge `tile` (rounded up to a multiple of
    /// `multiple`, and no larger than the volume needs) overlapping by `overlap` voxels,
    /// one tile per submission, blended.
    pub fn tiles(tile: usize, overlap: usize, multiple: usize, dims: [usize; 3]) -> Result<Self> {
        let m = multiple.max(1);
        let round_up = |v: usize| v.div_ceil(m) * m;
        let largest = dims.iter().copied().max().unwrap_or(0);
        if tile == 0 || largest == 0 {
            return Err(Error::InvalidArgument(format!(
                "segment: tile {tile} and volume {dims:?} must be non-empty"
            )));
        }
        let patch = round_up(tile).min(round_up(largest));
        if overlap >= patch {
            return Err(Error::InvalidArgument(format!(
                "segment: overlap {overlap} must be smaller than the tile ({patch})"
            )));
        }
        Ok(Self {
            patch,
            step: patch - overlap,
            batch: 1,
            blend: true,
        })
    }

    /// The next smaller geometry to try when a batch does not fit the binding limit:
    /// half the batch, then half the window (keeping the overlap where possible).
    fn smaller(&self, multiple: usize) -> Option<Self> {
        if self.batch > 1 {
            return Some(Self {
                batch: self.batch / 2,
                ..*self
            });
        }
        let m = multiple.max(1);
        let patch = (self.patch / 2) / m * m;
        if patch == 0 || patch >= self.patch {
            return None;
        }
        let overlap = self.patch - self.step.min(self.patch);
        let step = if self.blend {
            patch.saturating_sub(overlap).max(patch / 2).max(1)
        } else {
            self.step.min(patch)
        };
        Some(Self {
            patch,
            step,
            ..*self
        })
    }
}

/// What [`segment_volume`] produced.
#[derive(Clone, Debug)]
pub struct Segmentation {
    /// Class per voxel (x-fastest).
    pub labels: Vec<u8>,
    /// Probability per class and voxel.
    pub probs: Vec<Vec<f32>>,
    /// The geometry that ran (smaller than requested when the binding limit forced it).
    pub used: SegmentOptions,
    /// Windows (tiles) the network ran on.
    pub windows: usize,
}

/// A model ready for inference: fused and folded unless it already is, parameters frozen.
pub fn inference_form(
    ctx: &GpuContext,
    model: Model,
    store: ParamStore,
) -> Result<(Model, ParamStore)> {
    let (model, store) = if model.form() == ModelForm::Training {
        model.convert(ctx, &store, ModelForm::Folded)?
    } else {
        (model, store)
    };
    // Weights never change from here: pack them once, not per window.
    store.freeze();
    Ok((model, store))
}

/// Class labels and per-class probabilities of a normalised T1/T2 pair (`dims`
/// x-fastest); `mask` marks brain voxels (windows without any are skipped and their
/// voxels stay background). `progress(done, total)` is called after each batch.
#[allow(clippy::too_many_arguments)]
pub fn segment_volume(
    ctx: &GpuContext,
    model: &Model,
    store: &ParamStore,
    t1: &[f32],
    t2: &[f32],
    mask: &[bool],
    dims: [usize; 3],
    opts: SegmentOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<Segmentation> {
    let m = model.input_multiple();
    if opts.patch == 0 || !opts.patch.is_multiple_of(m) || opts.step == 0 || opts.batch == 0 {
        return Err(Error::InvalidArgument(format!(
            "segment: patch {} must be a positive multiple of {m} for this model; step {} and \
             batch {} must be >= 1",
            opts.patch, opts.step, opts.batch
        )));
    }
    let mut o = opts;
    loop {
        match run_windows(ctx, model, store, t1, t2, mask, dims, o, &mut progress) {
            Err(Error::Limit(why)) => {
                o = o.smaller(m).ok_or_else(|| {
                    Error::Limit(format!(
                        "{why}; even {}^3 windows one at a time do not fit. Raise the limit \
                         (--max-binding) if the adapter allows, or use a smaller model",
                        o.patch
                    ))
                })?;
            }
            other => return other,
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run_windows(
    ctx: &GpuContext,
    model: &Model,
    store: &ParamStore,
    t1: &[f32],
    t2: &[f32],
    mask: &[bool],
    dims: [usize; 3],
    opts: SegmentOptions,
    progress: &mut impl FnMut(usize, usize),
) -> Result<Segmentation> {
    let p = [opts.patch; 3];
    let todo: Vec<[usize; 3]> = windows(dims, p, opts.step)
        .into_iter()
        .filter(|&s| window_has_brain(mask, dims, s, p))
        .collect();
    let (c, classes) = model.channels();
    let mut acc = ProbAccumulator::new(dims, classes)?;
    let pv = opts.patch.pow(3);
    let overlap = opts.patch - opts.step.min(opts.patch);
    for (done, chunk) in todo.chunks(opts.batch).enumerate() {
        let mut x = Vec::with_capacity(chunk.len() * c * pv);
        for &s in chunk {
            x.extend(extract_patch(t1, t2, dims, s, p)?);
        }
        let mut g = Graph::no_grad(ctx, Mode::Eval);
        let shape = Shape5::new(chunk.len(), c, opts.patch, opts.patch, opts.patch);
        let xv = g.input(Tensor::from_slice(ctx, shape, &x, "windows")?);
        let logits = model.forward(&mut g, store, xv, 0)?;
        let probs = g.softmax_channels(logits)?;
        g.submit();
        let probs = probs.to_vec(ctx)?;
        for (i, &s) in chunk.iter().enumerate() {
            let window = &probs[i * classes * pv..(i + 1) * classes * pv];
            if opts.blend {
                let w: [Vec<f32>; 3] =
                    std::array::from_fn(|a| blend_ramp(opts.patch, s[a], dims[a], overlap));
                acc.add_weighted(s, p, window, Some([&w[0], &w[1], &w[2]]))?;
            } else {
                acc.add(s, p, window)?;
            }
        }
        progress(
            (done * opts.batch + chunk.len()).min(todo.len()),
            todo.len(),
        );
    }
    let (labels, probs) = acc.finish();
    Ok(Segmentation {
        labels,
        probs,
        used: opts,
        windows: todo.len(),
    })
}

/// Blending weights along one axis of a window of `len` voxels starting at `start` in
/// an axis of `dim` voxels: rising linearly over `overlap` voxels from edges that lie
/// inside the volume (a neighbouring window covers them), 1 at the volume's borders.
pub fn blend_ramp(len: usize, start: usize, dim: usize, overlap: usize) -> Vec<f32> {
    let ramp = (overlap + 1) as f32;
    (0..len)
        .map(|d| {
            let lo = if start == 0 {
                1.0
            } else {
                ((d + 1) as f32 / ramp).min(1.0)
            };
            let hi = if start + len >= dim {
                1.0
            } else {
                ((len - d) as f32 / ramp).min(1.0)
            };
            lo.min(hi)
        })
        .collect()
}
