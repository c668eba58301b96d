//! Sliding-window segmentation of a whole volume with a (fused) model: windows at 0,
//! step, 2·step, … plus one flush with the border, windows without brain skipped,
//! softmax probabilities averaged per voxel, argmax (ties to the lowest class).

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
}

impl Default for SegmentOptions {
    /// The paper's protocol: 32³ windows, step 8.
    fn default() -> Self {
        Self {
            patch: 32,
            step: 8,
            batch: 4,
        }
    }
}

/// A model ready for inference: fused and folded unless it already is.
pub fn inference_form(
    ctx: &GpuContext,
    model: Model,
    store: ParamStore,
) -> Result<(Model, ParamStore)> {
    if model.form() == ModelForm::Training {
        model.convert(ctx, &store, ModelForm::Folded)
    } else {
        Ok((model, store))
    }
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
) -> Result<(Vec<u8>, Vec<Vec<f32>>)> {
    let m = model.input_multiple();
    if opts.patch == 0 || !opts.patch.is_multiple_of(m) || opts.step == 0 || opts.batch == 0 {
        return Err(Error::InvalidArgument(format!(
            "segment: patch {} must be a positive multiple of {m} for this model; step {} and \
             batch {} must be >= 1",
            opts.patch, opts.step, opts.batch
        )));
    }
    let p = [opts.patch; 3];
    let todo: Vec<[usize; 3]> = windows(dims, p, opts.step)
        .into_iter()
        .filter(|&s| window_has_brain(mask, dims, s, p))
        .collect();
    let (c, classes) = model.channels();
    let mut acc = ProbAccumulator::new(dims, classes)?;
    let pv = opts.patch.pow(3);
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
            acc.add(s, p, &probs[i * classes * pv..(i + 1) * classes * pv])?;
        }
        progress(
            (done * opts.batch + chunk.len()).min(todo.len()),
            todo.len(),
        );
    }
    Ok(acc.finish())
}
