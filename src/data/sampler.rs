//! Training patches and the sliding-window inference plan.
//!
//! # Layout conventions (defined here, once)
//!
//! - A **volume** is a flat slice in NIfTI order, x fastest: voxel `(x, y, z)` of a volume
//!   with `dims = [X, Y, Z]` is at [`voxel_index`] `= x + X * (y + Y * z)`.
//! - A **patch size** or **corner** is given as `[x, y, z]`, in the same order as `dims`.
//! - The network consumes NCDHW with **D = z, H = y, W = x**: a patch of size
//!   `[px, py, pz]` is the tensor `[C, pz, py, px]`, element `(c, z, y, x)` at
//!   [`patch_index`] `= x + px * (y + py * (z + pz * c))`. A batch is `[B, C, pz, py, px]`,
//!   patch `b` starting at `b * C * pz * py * px`. Both layouts are x fastest, so a patch
//!   is a crop of the volume with the same memory order.
//! - Images have 2 channels, `c = 0` T1 and `c = 1` T2 (normalised, background 0); label
//!   patches have 1 channel holding class ids as exact small f32 integers.
//!
//! # Sampling (training recipe)
//!
//! [`PatchSampler`] draws the subject uniformly and the corner uniformly over the valid
//! positions, and redraws a patch whose T1 is all zero (at most
//! [`PatchSampler::with_max_redraws`] times in a row, then an error). Optionally, with
//! probability `q` the patch is instead centred on a uniformly drawn labelled voxel
//! (label != 0) and clamped into the valid range (the patch then always contains that
//! voxel). A region (sub-box) restricts corners so that every patch lies entirely inside
//! it, e.g. one hemisphere for training and the other for evaluation.
//!
//! **Volumes smaller than the patch are zero-padded**: along an axis where the volume (and
//! the region, which must then span the whole axis) is shorter than the patch, the corner
//! is 0 and the voxels past the border read 0 in images and class 0 (background) in labels.
//! A region shorter than the patch on an axis where the volume is not is an error (padding
//! there would read voxels outside the region).
//!
//! # Sliding window (inference)
//!
//! [`window_starts`] / [`windows`] give the positions 0, step, 2·step, … plus one last
//! window flush with the far border; [`extract_patch`] crops a 2-channel input (zero
//! outside the volume); [`ProbAccumulator`] averages the softmax of overlapping windows per
//! voxel and takes the argmax; [`majority_vote`] merges the label maps of an ensemble.

use crate::error::{Error, Result};
use crate::rng::Rng;
use std::ops::Range;

/// Input channels of the network: T1 then T2.
pub const IN_CHANNELS: usize = 2;

/// The SplitMix64 increment added to [`Rng`]'s state by every draw.
const SPLITMIX_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// Default bound on consecutive redraws of an all-zero-T1 patch.
pub const DEFAULT_MAX_REDRAWS: usize = 1000;

/// Index of voxel `(x, y, z)` in an x-fastest volume of size `dims = [X, Y, Z]`.
#[inline]
pub fn voxel_index(dims: [usize; 3], x: usize, y: usize, z: usize) -> usize {
    x + dims[0] * (y + dims[1] * z)
}

/// Index of element `(c, z, y, x)` in a `[C, pz, py, px]` patch of size `patch = [px, py, pz]`.
#[inline]
pub fn patch_index(patch: [usize; 3], c: usize, x: usize, y: usize, z: usize) -> usize {
    x + patch[0] * (y + patch[1] * (z + patch[2] * c))
}

/// Number of voxels of `dims`, erroring (naming `what`) on a zero size or overflow.
pub fn voxel_count(dims: [usize; 3], what: &str) -> Result<usize> {
    if dims.contains(&0) {
        return Err(Error::Shape(format!(
            "{what}: size {dims:?} has a zero extent"
        )));
    }
    dims.iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| Error::Shape(format!("{what}: size {dims:?} overflows usize")))
}

/// Copies the `patch`-sized box at `start` of the x-fastest `src` into `out` (x-fastest
/// `[pz, py, px]`), mapping values with `f`; voxels outside the volume are `fill`.
fn copy_box<T: Copy, U: Copy>(
    src: &[T],
    dims: [usize; 3],
    start: [usize; 3],
    patch: [usize; 3],
    out: &mut [U],
    fill: U,
    f: impl Fn(T) -> U,
) {
    out.fill(fill);
    let x_end = start[0].saturating_add(patch[0]).min(dims[0]);
    if start[0] >= x_end {
        return;
    }
    let nx = x_end - start[0];
    for pz in 0..patch[2] {
        let z = start[2].saturating_add(pz);
        if z >= dims[2] {
            break;
        }
        for py in 0..patch[1] {
            let y = start[1].saturating_add(py);
            if y >= dims[1] {
                break;
            }
            let s = voxel_index(dims, start[0], y, z);
            let o = patch_index(patch, 0, 0, py, pz);
            for (d, &v) in out[o..o + nx].iter_mut().zip(&src[s..s + nx]) {
                *d = f(v);
            }
        }
    }
}

/// Whether the `patch`-sized box at `start` holds any voxel with `pred` true (voxels
/// outside the volume or past the end of `src` count as false).
fn box_any<T: Copy>(
    src: &[T],
    dims: [usize; 3],
    start: [usize; 3],
    patch: [usize; 3],
    pred: impl Fn(T) -> bool,
) -> bool {
    let x_end = start[0].saturating_add(patch[0]).min(dims[0]);
    if start[0] >= x_end {
        return false;
    }
    for z in start[2]..start[2].saturating_add(patch[2]).min(dims[2]) {
        for y in start[1]..start[1].saturating_add(patch[1]).min(dims[1]) {
            let s = voxel_index(dims, start[0], y, z);
            let row = src.get(s..s + (x_end - start[0])).unwrap_or(&[]);
            if row.iter().any(|&v| pred(v)) {
                return true;
            }
        }
    }
    false
}

/// One training subject: normalised T1 and T2 (background 0) and class labels, all
/// x-fastest with size `dims`.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainingVolume {
    /// Normalised T1 (background exactly 0).
    pub t1: Vec<f32>,
    /// Normalised T2 (background exactly 0).
    pub t2: Vec<f32>,
    /// Class ids (0 background, 1 CSF, 2 GM, 3 WM).
    pub labels: Vec<u8>,
    /// Size `[X, Y, Z]`.
    pub dims: [usize; 3],
}

impl TrainingVolume {
    /// A subject after checking that every array has `X * Y * Z` voxels.
    pub fn new(t1: Vec<f32>, t2: Vec<f32>, labels: Vec<u8>, dims: [usize; 3]) -> Result<Self> {
        let v = Self {
            t1,
            t2,
            labels,
            dims,
        };
        v.validate("training volume")?;
        Ok(v)
    }

    /// Checks the array lengths against `dims`; `what` names the subject in errors.
    fn validate(&self, what: &str) -> Result<()> {
        let n = voxel_count(self.dims, what)?;
        for (name, len) in [
            ("T1", self.t1.len()),
            ("T2", self.t2.len()),
            ("labels", self.labels.len()),
        ] {
            if len != n {
                return Err(Error::Shape(format!(
                    "{what}: {name} has {len} voxels but dims {:?} give {n}",
                    self.dims
                )));
            }
        }
        Ok(())
    }
}

/// Where one sampled patch came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PatchOrigin {
    /// Index of the subject in the sampler.
    pub subject: usize,
    /// Corner `[x, y, z]` of the patch in the subject's volume.
    pub corner: [usize; 3],
}

/// A batch of training patches (layout in the module docs).
#[derive(Clone, Debug, PartialEq)]
pub struct PatchBatch {
    /// Images `[B, 2, pz, py, px]` (T1, T2).
    pub images: Vec<f32>,
    /// Class ids as f32, `[B, 1, pz, py, px]`.
    pub labels: Vec<f32>,
    /// Subject and corner of each patch, in batch order.
    pub origins: Vec<PatchOrigin>,
    /// Patch size `[px, py, pz]`.
    pub patch: [usize; 3],
}

impl PatchBatch {
    /// Number of patches `B`.
    pub fn batch(&self) -> usize {
        self.origins.len()
    }

    /// NCDHW shape of [`PatchBatch::images`]: `[B, 2, pz, py, px]`.
    pub fn image_shape(&self) -> [usize; 5] {
        [
            self.batch(),
            IN_CHANNELS,
            self.patch[2],
            self.patch[1],
            self.patch[0],
        ]
    }

    /// NCDHW shape of [`PatchBatch::labels`]: `[B, 1, pz, py, px]`.
    pub fn label_shape(&self) -> [usize; 5] {
        [self.batch(), 1, self.patch[2], self.patch[1], self.patch[0]]
    }

    /// `(images, labels)`.
    pub fn into_parts(self) -> (Vec<f32>, Vec<f32>) {
        (self.images, self.labels)
    }
}

/// Seeded random patch sampler over a set of subjects (see the module docs).
///
/// Its whole random state is one `u64` ([`PatchSampler::state`] /
/// [`PatchSampler::set_state`]); restoring it, with the same subjects and configuration,
/// continues the identical sequence of batches, which is what `--resume` needs.
/// [`Rng`] keeps its state private, so the sampler keeps a copy: SplitMix64's state is
/// the seed plus one fixed increment per draw, every draw made here is exactly one
/// `next_u64` (`below`, `uniform`), and `Rng::new(state)` rebuilds the generator.
#[derive(Clone, Debug)]
pub struct PatchSampler {
    subjects: Vec<TrainingVolume>,
    rng: Rng,
    state: u64,
    region: [Option<Range<usize>>; 3],
    foreground_prob: f64,
    /// Per subject, the labelled voxels inside the region (filled when the bias is on).
    foreground: Vec<Vec<u32>>,
    max_redraws: usize,
}

impl PatchSampler {
    /// A sampler over `subjects` (at least one) seeded with `seed`: uniform corners over
    /// the whole volumes, no foreground bias.
    pub fn new(subjects: Vec<TrainingVolume>, seed: u64) -> Result<Self> {
        if subjects.is_empty() {
            return Err(Error::InvalidArgument(
                "patch sampler: no subjects given".into(),
            ));
        }
        for (i, s) in subjects.iter().enumerate() {
            s.validate(&format!("patch sampler: subject {i}"))?;
        }
        Ok(Self {
            subjects,
            rng: Rng::new(seed),
            state: seed,
            region: [None, None, None],
            foreground_prob: 0.0,
            foreground: Vec::new(),
            max_redraws: DEFAULT_MAX_REDRAWS,
        })
    }

    /// Restricts patches to lie entirely within `x_range` along x (whole volume along y
    /// and z), e.g. one hemisphere; `x_range` must be non-empty and inside every volume.
    pub fn with_region(self, x_range: Range<usize>) -> Result<Self> {
        let [_, y, z] = self.region.clone();
        self.with_axes([Some(x_range), y, z])
    }

    /// Restricts patches to lie entirely within the box `[x_range, y_range, z_range]`,
    /// which must be non-empty and inside every subject's volume.
    pub fn with_box(self, region: [Range<usize>; 3]) -> Result<Self> {
        let [x, y, z] = region;
        self.with_axes([Some(x), Some(y), Some(z)])
    }

    fn with_axes(mut self, region: [Option<Range<usize>>; 3]) -> Result<Self> {
        for (a, r) in region.iter().enumerate() {
            let Some(r) = r else { continue };
            if r.start >= r.end {
                return Err(Error::InvalidArgument(format!(
                    "patch sampler: region {}..{} is empty along {}",
                    r.start, r.end, AXES[a]
                )));
            }
            for (i, s) in self.subjects.iter().enumerate() {
                if r.end > s.dims[a] {
                    return Err(Error::InvalidArgument(format!(
                        "patch sampler: region {}..{} along {} extends past subject {i}'s \
                         volume {:?}",
                        r.start, r.end, AXES[a], s.dims
                    )));
                }
            }
        }
        self.region = region;
        self.rebuild_foreground()?;
        Ok(self)
    }

    /// With probability `q` in `[0, 1]`, centre each patch on a uniformly drawn labelled
    /// voxel (label != 0, inside the region) instead of a uniform corner; a subject with no
    /// such voxel falls back to a uniform corner.
    pub fn with_foreground_bias(mut self, q: f64) -> Result<Self> {
        if !(0.0..=1.0).contains(&q) {
            return Err(Error::InvalidArgument(format!(
                "patch sampler: foreground probability {q} is outside [0, 1]"
            )));
        }
        self.foreground_prob = q;
        self.rebuild_foreground()?;
        Ok(self)
    }

    /// Bound on consecutive redraws of an all-zero-T1 patch before [`PatchSampler::sample`]
    /// errors (default [`DEFAULT_MAX_REDRAWS`]).
    pub fn with_max_redraws(mut self, n: usize) -> Self {
        self.max_redraws = n;
        self
    }

    /// The subjects sampled from.
    pub fn subjects(&self) -> &[TrainingVolume] {
        &self.subjects
    }

    /// The region patches are confined to, per axis `[x, y, z]` (`None`: the whole axis).
    pub fn region(&self) -> &[Option<Range<usize>>; 3] {
        &self.region
    }

    /// The foreground-bias probability `q` (0 when off).
    pub fn foreground_bias(&self) -> f64 {
        self.foreground_prob
    }

    /// The whole random state, to be saved for an exact resume.
    pub fn state(&self) -> u64 {
        debug_assert_eq!(Rng::new(self.state), self.rng);
        self.state
    }

    /// Restores a state from [`PatchSampler::state`]: the following batches are those that
    /// followed when it was saved (same subjects and configuration assumed).
    pub fn set_state(&mut self, state: u64) {
        self.state = state;
        self.rng = Rng::new(state);
    }

    /// Uniform in `0..n`, one draw.
    fn below(&mut self, n: usize) -> usize {
        self.state = self.state.wrapping_add(SPLITMIX_GAMMA);
        self.rng.below(n)
    }

    /// Uniform in `[0, 1)`, one draw.
    fn uniform(&mut self) -> f64 {
        self.state = self.state.wrapping_add(SPLITMIX_GAMMA);
        self.rng.uniform()
    }

    fn rebuild_foreground(&mut self) -> Result<()> {
        self.foreground.clear();
        if self.foreground_prob <= 0.0 {
            return Ok(());
        }
        for (i, s) in self.subjects.iter().enumerate() {
            let d = s.dims;
            let r: [Range<usize>; 3] =
                std::array::from_fn(|a| self.region[a].clone().unwrap_or(0..d[a]));
            let mut list = Vec::new();
            for z in r[2].clone() {
                for y in r[1].clone() {
                    for x in r[0].clone() {
                        let v = voxel_index(d, x, y, z);
                        if s.labels[v] != 0 {
                            let v = u32::try_from(v).map_err(|_| {
                                Error::Shape(format!(
                                    "patch sampler: subject {i} has more than 2^32 voxels; \
                                     the foreground bias indexes voxels as u32"
                                ))
                            })?;
                            list.push(v);
                        }
                    }
                }
            }
            self.foreground.push(list);
        }
        Ok(())
    }

    /// Valid corners `lo..=hi` per axis for subject `s` and `patch`.
    fn corner_ranges(&self, s: usize, patch: [usize; 3]) -> Result<[(usize, usize); 3]> {
        let d = self.subjects[s].dims;
        let mut out = [(0, 0); 3];
        for a in 0..3 {
            let r = self.region[a].clone().unwrap_or(0..d[a]);
            out[a] = if r.end - r.start >= patch[a] {
                (r.start, r.end - patch[a])
            } else if r.start == 0 && r.end == d[a] {
                (0, 0) // volume shorter than the patch: zero padding
            } else {
                return Err(Error::InvalidArgument(format!(
                    "patch sampler: region {}..{} along {} is shorter than the patch \
                     ({}) while subject {s}'s volume is not ({}); padding would read \
                     voxels outside the region",
                    r.start, r.end, AXES[a], patch[a], d[a]
                )));
            };
        }
        Ok(out)
    }

    /// Draws one patch position (redrawing all-zero-T1 patches).
    fn draw(&mut self, patch: [usize; 3]) -> Result<PatchOrigin> {
        let n = self.subjects.len();
        for _ in 0..=self.max_redraws {
            let s = self.below(n);
            let ranges = self.corner_ranges(s, patch)?;
            let mut corner = [0; 3];
            let biased = self.foreground_prob > 0.0
                && self.uniform() < self.foreground_prob
                && !self.foreground[s].is_empty();
            if biased {
                let len = self.foreground[s].len();
                let k = self.below(len);
                let v = self.foreground[s][k] as usize;
                let d = self.subjects[s].dims;
                let c = [v % d[0], (v / d[0]) % d[1], v / (d[0] * d[1])];
                for a in 0..3 {
                    corner[a] = c[a]
                        .saturating_sub(patch[a] / 2)
                        .clamp(ranges[a].0, ranges[a].1);
                }
            } else {
                for a in 0..3 {
                    let (lo, hi) = ranges[a];
                    corner[a] = lo + self.below(hi - lo + 1);
                }
            }
            let sub = &self.subjects[s];
            if box_any(&sub.t1, sub.dims, corner, patch, |v: f32| v != 0.0) {
                return Ok(PatchOrigin { subject: s, corner });
            }
        }
        Err(Error::InvalidArgument(format!(
            "patch sampler: {} draws in a row gave a patch whose T1 is all zero (patch \
             {patch:?}, region {:?}): the volumes or the region hold (almost) no brain, or \
             T1 is not normalised with background 0",
            self.max_redraws + 1,
            self.region
        )))
    }

    /// Draws `batch` patches of size `patch = [px, py, pz]`: images `[B, 2, pz, py, px]`
    /// and labels `[B, 1, pz, py, px]` (module docs for the rules).
    pub fn sample(&mut self, batch: usize, patch: [usize; 3]) -> Result<PatchBatch> {
        if batch == 0 {
            return Err(Error::InvalidArgument(
                "patch sampler: batch size is 0".into(),
            ));
        }
        let pn = voxel_count(patch, "patch sampler: patch")?;
        let total = batch
            .checked_mul(pn)
            .and_then(|v| v.checked_mul(IN_CHANNELS))
            .ok_or_else(|| {
                Error::Shape(format!(
                    "patch sampler: batch {batch} of patch {patch:?} overflows usize"
                ))
            })?;
        let mut images = vec![0f32; total];
        let mut labels = vec![0f32; batch * pn];
        let mut origins = Vec::with_capacity(batch);
        for b in 0..batch {
            let o = self.draw(patch)?;
            let s = &self.subjects[o.subject];
            let img = &mut images[b * IN_CHANNELS * pn..(b + 1) * IN_CHANNELS * pn];
            let (c0, c1) = img.split_at_mut(pn);
            copy_box(&s.t1, s.dims, o.corner, patch, c0, 0.0, |v| v);
            copy_box(&s.t2, s.dims, o.corner, patch, c1, 0.0, |v| v);
            let lab = &mut labels[b * pn..(b + 1) * pn];
            copy_box(&s.labels, s.dims, o.corner, patch, lab, 0.0, f32::from);
            origins.push(o);
        }
        Ok(PatchBatch {
            images,
            labels,
            origins,
            patch,
        })
    }
}

const AXES: [&str; 3] = ["x", "y", "z"];

/// Window starts along one axis: `0, step, 2·step, …` while the window fits, plus one last
/// window flush with the border (`len - patch`) when the regular ones leave voxels
/// uncovered; no duplicates. When `len <= patch` the single window is `[0]` (the caller
/// zero-pads past the border). `patch` and `step` of 0 are treated as 1.
pub fn window_starts(len: usize, patch: usize, step: usize) -> Vec<usize> {
    let patch = patch.max(1);
    let step = step.max(1);
    if len <= patch {
        return vec![0];
    }
    let last = len - patch;
    let mut out: Vec<usize> = (0..=last).step_by(step).collect();
    if out.last() != Some(&last) {
        out.push(last);
    }
    out
}

/// Window corners `[x, y, z]` covering a volume of `dims` with windows of `patch`
/// (`[px, py, pz]`) and the same `step` on every axis: the product of [`window_starts`],
/// x fastest.
pub fn windows(dims: [usize; 3], patch: [usize; 3], step: usize) -> Vec<[usize; 3]> {
    let sx = window_starts(dims[0], patch[0], step);
    let sy = window_starts(dims[1], patch[1], step);
    let sz = window_starts(dims[2], patch[2], step);
    let mut out = Vec::with_capacity(sx.len() * sy.len() * sz.len());
    for &z in &sz {
        for &y in &sy {
            for &x in &sx {
                out.push([x, y, z]);
            }
        }
    }
    out
}

/// Whether the window at `start` of size `patch` holds a brain voxel of `mask` (voxels
/// past the volume, or past the end of `mask`, count as no brain).
pub fn window_has_brain(
    mask: &[bool],
    dims: [usize; 3],
    start: [usize; 3],
    patch: [usize; 3],
) -> bool {
    box_any(mask, dims, start, patch, |v| v)
}

/// The 2-channel input `[2, pz, py, px]` (T1, T2) of the window at `start` of size
/// `patch = [px, py, pz]`; voxels outside the volume are 0.
pub fn extract_patch(
    t1: &[f32],
    t2: &[f32],
    dims: [usize; 3],
    start: [usize; 3],
    patch: [usize; 3],
) -> Result<Vec<f32>> {
    let n = voxel_count(dims, "extract_patch: volume")?;
    let pn = voxel_count(patch, "extract_patch: patch")?;
    if t1.len() != n || t2.len() != n {
        return Err(Error::Shape(format!(
            "extract_patch: T1 has {} and T2 {} voxels but dims {dims:?} give {n}",
            t1.len(),
            t2.len()
        )));
    }
    let mut out = vec![0f32; IN_CHANNELS * pn];
    let (c0, c1) = out.split_at_mut(pn);
    copy_box(t1, dims, start, patch, c0, 0.0, |v| v);
    copy_box(t2, dims, start, patch, c1, 0.0, |v| v);
    Ok(out)
}

/// Per-voxel average of the class probabilities of overlapping windows.
#[derive(Clone, Debug)]
pub struct ProbAccumulator {
    dims: [usize; 3],
    /// Per class, the sum of the probabilities over the windows (x-fastest volume).
    sums: Vec<Vec<f32>>,
    /// Number of windows covering each voxel.
    counts: Vec<u32>,
    /// Sum of the blending weights of those windows (the count when unweighted).
    weights: Vec<f32>,
}

impl ProbAccumulator {
    /// An empty accumulator for a volume of `dims` and `classes` classes (1 to 256).
    pub fn new(dims: [usize; 3], classes: usize) -> Result<Self> {
        let n = voxel_count(dims, "ProbAccumulator: volume")?;
        if classes == 0 || classes > 256 {
            return Err(Error::InvalidArgument(format!(
                "ProbAccumulator: {classes} classes; need 1 to 256 (labels are u8)"
            )));
        }
        Ok(Self {
            dims,
            sums: vec![vec![0.0; n]; classes],
            counts: vec![0; n],
            weights: vec![0.0; n],
        })
    }

    /// Number of classes.
    pub fn classes(&self) -> usize {
        self.sums.len()
    }

    /// Number of windows that covered each voxel so far (x-fastest).
    pub fn coverage(&self) -> &[u32] {
        &self.counts
    }

    /// Adds the probabilities `probs` (`[C, pz, py, px]`, e.g. a softmax) of the window at
    /// `start` of size `patch = [px, py, pz]`; the part past the volume is ignored.
    pub fn add(&mut self, start: [usize; 3], patch: [usize; 3], probs: &[f32]) -> Result<()> {
        self.add_weighted(start, patch, probs, None)
    }

    /// [`ProbAccumulator::add`] with a separable blending weight `w[0][x]·w[1][y]·w[2][z]`
    /// per window voxel (`axis_weights[a]` has `patch[a]` positive values).
    pub fn add_weighted(
        &mut self,
        start: [usize; 3],
        patch: [usize; 3],
        probs: &[f32],
        axis_weights: Option<[&[f32]; 3]>,
    ) -> Result<()> {
        let pn = voxel_count(patch, "ProbAccumulator::add: patch")?;
        if let Some(w) = axis_weights {
            if let Some(a) = (0..3).find(|&a| {
                w[a].len() != patch[a] || w[a].iter().any(|&v| !(v.is_finite() && v > 0.0))
            }) {
                return Err(Error::InvalidArgument(format!(
                    "ProbAccumulator::add: blending weights along axis {a} must be {} positive \
                     values",
                    patch[a]
                )));
            }
        }
        let c = self.classes();
        if probs.len() != c * pn {
            return Err(Error::Shape(format!(
                "ProbAccumulator::add: probabilities have {} values, expected {c} classes x \
                 patch {patch:?} = {}",
                probs.len(),
                c * pn
            )));
        }
        if (0..3).any(|a| start[a] >= self.dims[a]) {
            return Err(Error::InvalidArgument(format!(
                "ProbAccumulator::add: window start {start:?} is outside the volume {:?}",
                self.dims
            )));
        }
        if let Some(i) = probs.iter().position(|v| !v.is_finite()) {
            return Err(Error::InvalidArgument(format!(
                "ProbAccumulator::add: probability {i} of the window at {start:?} is not \
                 finite ({})",
                probs[i]
            )));
        }
        let d = self.dims;
        let ez = start[2].saturating_add(patch[2]).min(d[2]);
        let ey = start[1].saturating_add(patch[1]).min(d[1]);
        let nx = start[0].saturating_add(patch[0]).min(d[0]) - start[0];
        for z in start[2]..ez {
            for y in start[1]..ey {
                let v = voxel_index(d, start[0], y, z);
                let (pz, py) = (z - start[2], y - start[1]);
                for cnt in &mut self.counts[v..v + nx] {
                    *cnt += 1;
                }
                match axis_weights {
                    None => {
                        for w in &mut self.weights[v..v + nx] {
                            *w += 1.0;
                        }
                        for (k, sum) in self.sums.iter_mut().enumerate() {
                            let p = patch_index(patch, k, 0, py, pz);
                            for (s, &q) in sum[v..v + nx].iter_mut().zip(&probs[p..p + nx]) {
                                *s += q;
                            }
                        }
                    }
                    Some(aw) => {
                        let wyz = aw[1][py] * aw[2][pz];
                        let wx = &aw[0][..nx];
                        for (w, &x) in self.weights[v..v + nx].iter_mut().zip(wx) {
                            *w += x * wyz;
                        }
                        for (k, sum) in self.sums.iter_mut().enumerate() {
                            let p = patch_index(patch, k, 0, py, pz);
                            let q = &probs[p..p + nx];
                            for ((s, &q), &x) in sum[v..v + nx].iter_mut().zip(q).zip(wx) {
                                *s += q * x * wyz;
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The labels (argmax of the averaged probabilities, ties to the lowest class) and the
    /// averaged probabilities per class; voxels no window covered are background
    /// (label 0, probability 1 for class 0 and 0 for the others).
    pub fn finish(self) -> (Vec<u8>, Vec<Vec<f32>>) {
        let Self {
            mut sums,
            counts,
            weights,
            ..
        } = self;
        let mut labels = vec![0u8; counts.len()];
        for (v, &n) in counts.iter().enumerate() {
            if n == 0 {
                for (k, s) in sums.iter_mut().enumerate() {
                    s[v] = if k == 0 { 1.0 } else { 0.0 };
                }
                continue;
            }
            let mut best = 0usize;
            let mut best_p = f32::NEG_INFINITY;
            for (k, s) in sums.iter_mut().enumerate() {
                s[v] /= weights[v];
                if s[v] > best_p {
                    best_p = s[v];
                    best = k;
                }
            }
            labels[v] = best as u8;
        }
        (labels, sums)
    }
}

/// Voxel-wise majority vote of label maps (an ensemble), ties to the lowest label. Errors
/// when `maps` is empty or the maps differ in length.
pub fn majority_vote(maps: &[Vec<u8>]) -> Result<Vec<u8>> {
    let first = maps
        .first()
        .ok_or_else(|| Error::InvalidArgument("majority_vote: no label maps given".into()))?;
    let n = first.len();
    if let Some((i, m)) = maps.iter().enumerate().find(|(_, m)| m.len() != n) {
        return Err(Error::Shape(format!(
            "majority_vote: label map {i} has {} voxels but map 0 has {n}",
            m.len()
        )));
    }
    let max = maps
        .iter()
        .filter_map(|m| m.iter().copied().max())
        .max()
        .unwrap_or(0) as usize;
    let mut counts = vec![0u32; max + 1];
    let mut out = vec![0u8; n];
    for (v, o) in out.iter_mut().enumerate() {
        counts.fill(0);
        for m in maps {
            counts[m[v] as usize] += 1;
        }
        let mut best = 0usize;
        for (k, &c) in counts.iter().enumerate() {
            if c > counts[best] {
                best = k;
            }
        }
        *o = best as u8;
    }
    Ok(out)
}
