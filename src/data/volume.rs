//! Medical-image IO: NIfTI-1, NIfTI-2 and Analyze 7.5 volumes in, NIfTI-1 out.
//!
//! Reading accepts `.nii`, `.nii.gz` and `.hdr`/`.img` pairs (given either file, either
//! one optionally gzipped), little- or big-endian, datatypes u8/i8/i16/u16/i32/u32/f32/f64,
//! and returns f32 voxels in NIfTI order (x fastest) with `scl_slope`/`scl_inter` applied.
//! The header is parsed here rather than by the `nifti` crate because that crate rejects
//! Analyze headers (no magic), does not read NIfTI-2, reads dims as `u16` (a negative
//! `i16` dim becomes a large size), sizes the data from `bitpix` and reserves the whole
//! buffer from the header before reading a byte. Here every size is validated first:
//! dims must be positive, at most [`MAX_VOXELS`] voxels, and the data must fit in the
//! file (for gzip, within the largest possible deflate ratio) before anything is
//! allocated, and the buffer then grows only as data actually arrive. A gzip stream is
//! read to its end so its CRC-32 is checked. Malformed input gives an error naming the
//! file and the problem, never a panic (a last-resort `catch_unwind` turns any panic
//! into an error too).
//!
//! Conventions: the datatype (not `bitpix`) gives the voxel size; `scl_slope` 0 or
//! non-finite means no scaling (SPM's Analyze scale factor sits at the same offset and
//! is honoured the same way); spacing and affine are converted to mm from metre/micron
//! units; Analyze files get `diag(|pixdim|)` (their `orient` byte is ignored); a voxel
//! that is NaN/±Inf after scaling makes the read fail.
//!
//! Writing ([`write_like`], [`write_4d_like`]) copies a reference volume's geometry
//! (dims, pixdim, qform, sform, units) into a fresh NIfTI-1 header with the new datatype
//! (u8 label maps or f32 probabilities) and no scaling, to `.nii`, `.nii.gz` or a
//! `.hdr`/`.img` pair, atomically: temporary `<path>.tmp` files are written, synced and
//! renamed over the targets, so a failed write never leaves a partial file.
//!
//! Also here: T1/T2 grid checks ([`check_pair`]), label value maps ([`LabelMap`]),
//! iSeg-style dataset discovery ([`discover`]) and the embedded MNI152 brain
//! ([`load_embedded`]).

use crate::error::{Error, Result};
use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;
use flate2::Compression;
use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Largest number of voxels (all volumes together) a file may declare: 2^30 (4 GiB of f32).
pub const MAX_VOXELS: u64 = 1 << 30;

/// Largest affine difference (mm) under which two volumes share a grid in [`check_pair`].
pub const AFFINE_TOLERANCE_MM: f64 = 1e-4;

/// Deflate cannot expand data by more than about 1032:1; a gzip file of `n` bytes never
/// holds more than this many times `n` bytes (plus [`GZ_SLACK`]).
const MAX_DEFLATE_RATIO: u64 = 1032;
const GZ_SLACK: u64 = 1 << 16;

/// Data after the voxels of a gzip file decoded (and discarded) to reach its CRC check.
const GZ_TRAILING_LIMIT: u64 = 1 << 20;

/// Initial capacity of the data buffer for compressed input: it grows as data arrive.
const INITIAL_GZ_CAPACITY: u64 = 1 << 26;

/// NIfTI-1 header size and the offset of the data in a single `.nii` file we write.
const NIFTI1_HEADER: usize = 348;
const NIFTI2_HEADER: usize = 540;
const NIFTI1_VOX_OFFSET: usize = 352;

/// Where the source of an in-memory volume is named.
const IN_MEMORY: &str = "<in-memory volume>";

/// One 3-D image: geometry, f32 voxels in NIfTI order (x fastest) and the header it came
/// with (kept to write results back on the same grid). `dims`, `spacing` and `affine`
/// describe that header: change `data` freely, but build a new grid with [`Volume::new`]
/// ([`write_like`] refuses a reference whose dims or affine no longer match its header).
#[derive(Clone)]
pub struct Volume {
    /// Voxels along x, y, z.
    pub dims: [usize; 3],
    /// Voxel size in mm along x, y, z (`|pixdim|`, converted from the file's units).
    pub spacing: [f32; 3],
    /// Voxel index (i, j, k, 1) → RAS mm: from the sform if set, else the qform, else
    /// `diag(spacing)` (NIfTI "method 1", also used for Analyze files).
    pub affine: [[f64; 4]; 4],
    /// Voxel values, `x + dims[0] * (y + dims[1] * z)`, scaling applied.
    pub data: Vec<f32>,
    /// The file it was read from (names it in later errors).
    pub source: PathBuf,
    header: Header,
}

impl fmt::Debug for Volume {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Volume")
            .field("source", &self.source)
            .field("dims", &self.dims)
            .field("spacing", &self.spacing)
            .field("affine", &self.affine)
            .field("data", &format_args!("[{} f32]", self.data.len()))
            .field("format", &self.header.format)
            .finish()
    }
}

impl Volume {
    /// A volume built in memory: NIfTI-1 header with the affine as sform (code 2,
    /// aligned anatomical), no qform, units mm.
    pub fn new(
        dims: [usize; 3],
        spacing: [f32; 3],
        affine: [[f64; 4]; 4],
        data: Vec<f32>,
    ) -> Result<Volume> {
        let n = checked_voxels(dims).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{IN_MEMORY}: dims {} must be positive and hold at most {MAX_VOXELS} voxels",
                fmt_dims(&dims)
            ))
        })?;
        if data.len() != n {
            return Err(Error::Shape(format!(
                "{IN_MEMORY}: {} values for dims {} ({n} voxels)",
                data.len(),
                fmt_dims(&dims)
            )));
        }
        if spacing.iter().any(|s| !s.is_finite() || *s <= 0.0) {
            return Err(Error::InvalidArgument(format!(
                "{IN_MEMORY}: spacing {spacing:?} must be finite and positive"
            )));
        }
        if affine.iter().flatten().any(|v| !v.is_finite()) {
            return Err(Error::InvalidArgument(format!(
                "{IN_MEMORY}: affine {affine:?} must be finite"
            )));
        }
        let mut header = Header::blank();
        header.dim = [
            3,
            dims[0] as i64,
            dims[1] as i64,
            dims[2] as i64,
            1,
            1,
            1,
            1,
        ];
        header.pixdim = [
            1.0,
            spacing[0] as f64,
            spacing[1] as f64,
            spacing[2] as f64,
            1.0,
            1.0,
            1.0,
            1.0,
        ];
        header.sform_code = 2;
        for (r, row) in header.srow.iter_mut().enumerate() {
            *row = affine[r];
        }
        Ok(Volume {
            dims,
            spacing,
            affine: [affine[0], affine[1], affine[2], [0.0, 0.0, 0.0, 1.0]],
            data,
            source: PathBuf::from(IN_MEMORY),
            header,
        })
    }

    /// The same grid and header with other voxel values (e.g. a preprocessed image).
    pub fn with_data(&self, data: Vec<f32>) -> Result<Volume> {
        if data.len() != self.num_voxels() {
            return Err(Error::Shape(format!(
                "{}: {} values for a {} volume ({} voxels)",
                self.source.display(),
                data.len(),
                fmt_dims(&self.dims),
                self.num_voxels()
            )));
        }
        Ok(Volume {
            data,
            ..self.clone_geometry()
        })
    }

    /// Number of voxels, `dims[0] * dims[1] * dims[2]`.
    pub fn num_voxels(&self) -> usize {
        self.dims.iter().product()
    }

    /// Flat index of voxel (x, y, z): `x + dims[0] * (y + dims[1] * z)`.
    pub fn index(&self, x: usize, y: usize, z: usize) -> usize {
        x + self.dims[0] * (y + self.dims[1] * z)
    }

    /// Which format the file was (NIfTI-1, NIfTI-2, Analyze 7.5; "NIfTI-1" when built in memory).
    pub fn format(&self) -> &'static str {
        self.header.format.name()
    }

    fn clone_geometry(&self) -> Volume {
        Volume {
            dims: self.dims,
            spacing: self.spacing,
            affine: self.affine,
            data: Vec::new(),
            source: self.source.clone(),
            header: self.header.clone(),
        }
    }
}

/// Reads one 3-D volume (see the module docs for formats). A 4-D or higher image is
/// accepted only when it holds a single volume (t = 1).
pub fn read(path: &Path) -> Result<Volume> {
    let mut v = read_guarded(path, || read_inner(path, false))?;
    v.pop()
        .ok_or_else(|| Error::InvalidArgument(format!("{}: no volume in the file", path.display())))
}

/// Reads a 4-D file (x, y, z, c), e.g. probability maps from [`write_4d_like`], as one
/// 3-D volume per channel; a 3-D file gives one channel. Dims 5..7 must be 1.
pub fn read_channels(path: &Path) -> Result<Vec<Volume>> {
    read_guarded(path, || read_inner(path, true))
}

/// [`read`] on files held in memory, through the same parser: `bytes` is the file
/// `path` (a `.nii`/`.nii.gz`, or the `.hdr` when `img` gives the pair's image file);
/// a name ending in `.gz` means gzip. The names only pick the compression and name the
/// files in errors; nothing is opened.
pub fn read_from_bytes(path: &Path, bytes: &[u8], img: Option<(&Path, &[u8])>) -> Result<Volume> {
    let mut v = read_guarded(path, || {
        let img = img.map(|(p, b)| -> (PathBuf, DataOpener<'_>) {
            (
                p.to_path_buf(),
                Box::new(move || Ok((decoder(p, b), b.len() as u64))),
            )
        });
        read_streams(
            path,
            path,
            decoder(path, bytes),
            bytes.len() as u64,
            img,
            false,
        )
    })?;
    v.pop()
        .ok_or_else(|| Error::InvalidArgument(format!("{}: no volume in the file", path.display())))
}

/// Voxel type of a written file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataType {
    /// uint8: label maps; every value must be an integer in 0..=255.
    U8,
    /// float32: probability and intensity maps; every value must be finite.
    F32,
}

/// Writes `data` (NIfTI order, `reference.dims`) with the reference's geometry (dims,
/// pixdim, qform, sform, units) as `datatype`, to `.nii`, `.nii.gz` or a `.hdr`/`.img`
/// pair (given either name), atomically. No scaling is stored (slope 1, intercept 0).
pub fn write_like(path: &Path, reference: &Volume, data: &[f32], datatype: DataType) -> Result<()> {
    write_impl(path, reference, &[data], datatype, false)
}

/// Writes several channels (e.g. class probabilities) as one 4-D f32 file with dims
/// (x, y, z, c) and the reference's geometry; see [`write_like`].
pub fn write_4d_like(path: &Path, reference: &Volume, channels: &[Vec<f32>]) -> Result<()> {
    let refs: Vec<&[f32]> = channels.iter().map(|c| c.as_slice()).collect();
    write_impl(path, reference, &refs, DataType::F32, true)
}

/// Checks that a T1 and a T2 share one voxel grid: same dims and affines within
/// [`AFFINE_TOLERANCE_MM`]; the error names both files and the difference.
pub fn check_pair(t1: &Volume, t1_path: &Path, t2: &Volume, t2_path: &Path) -> Result<()> {
    if t1.dims != t2.dims {
        return Err(Error::Shape(format!(
            "{} is {} voxels but {} is {}: the two images must share one voxel grid \
             (resample one onto the other first)",
            t1_path.display(),
            fmt_dims(&t1.dims),
            t2_path.display(),
            fmt_dims(&t2.dims)
        )));
    }
    let mut worst = (0.0f64, 0usize, 0usize);
    for r in 0..4 {
        for c in 0..4 {
            let d = (t1.affine[r][c] - t2.affine[r][c]).abs();
            if d > worst.0 || d.is_nan() {
                worst = (d, r, c);
            }
        }
    }
    let (d, r, c) = worst;
    if d > AFFINE_TOLERANCE_MM || d.is_nan() {
        return Err(Error::InvalidArgument(format!(
            "{} and {} have different voxel-to-world affines: entry [{r}][{c}] is {} vs {} \
             (difference {d:.6} mm, tolerance {AFFINE_TOLERANCE_MM} mm); the two images must \
             share one grid (register and resample them first)",
            t1_path.display(),
            t2_path.display(),
            t1.affine[r][c],
            t2.affine[r][c]
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Label maps
// ---------------------------------------------------------------------------------------

/// File label values in class order: class `i` is stored as value `self.0[i]`, e.g.
/// iSeg's `0,10,150,250` for background/CSF/GM/WM.
#[derive(Clone, Debug, PartialEq)]
pub struct LabelMap(Vec<f32>);

/// Voxel values match a label within this tolerance (relative above magnitude 1).
const LABEL_TOLERANCE: f32 = 1e-3;

impl LabelMap {
    /// A map from its values: 1..=256 finite, distinct values.
    pub fn new(values: Vec<f32>) -> Result<LabelMap> {
        if values.is_empty() || values.len() > 256 {
            return Err(Error::InvalidArgument(format!(
                "label map must have 1 to 256 values, got {}",
                values.len()
            )));
        }
        if let Some(v) = values.iter().find(|v| !v.is_finite()) {
            return Err(Error::InvalidArgument(format!(
                "label map value {v} is not finite"
            )));
        }
        for (i, a) in values.iter().enumerate() {
            for b in &values[..i] {
                if (a - b).abs() <= 2.0 * LABEL_TOLERANCE * a.abs().max(b.abs()).max(1.0) {
                    return Err(Error::InvalidArgument(format!(
                        "label map values {b} and {a} are not distinct"
                    )));
                }
            }
        }
        Ok(LabelMap(values))
    }

    /// The identity map 0, 1, ..., n-1 (n in 1..=256).
    pub fn identity(n: usize) -> Result<LabelMap> {
        LabelMap::new((0..n).map(|i| i as f32).collect())
    }

    /// Parses a comma-separated list, e.g. `"0,10,150,250"`.
    pub fn parse(s: &str) -> Result<LabelMap> {
        let values = s
            .split(',')
            .map(|t| {
                t.trim().parse::<f32>().map_err(|_| {
                    Error::InvalidArgument(format!(
                        "label map {s:?}: {:?} is not a number (expected e.g. \"0,10,150,250\")",
                        t.trim()
                    ))
                })
            })
            .collect::<Result<Vec<f32>>>()?;
        LabelMap::new(values)
    }

    /// The file values, class order.
    pub fn values(&self) -> &[f32] {
        &self.0
    }

    /// Number of classes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Always false: a map has at least one value.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The class whose value matches `v`, if any.
    pub fn class_of(&self, v: f32) -> Option<u8> {
        self.0
            .iter()
            .position(|&m| (v - m).abs() <= LABEL_TOLERANCE * m.abs().max(1.0))
            .map(|i| i as u8)
    }

    /// Maps a label volume's values to classes 0..n-1; a value not in the map is an error
    /// naming the file, the value, a voxel holding it and how many voxels are affected.
    pub fn to_classes(&self, volume: &Volume) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(volume.data.len());
        let mut bad = 0usize;
        let mut first: Option<(usize, f32)> = None;
        let mut seen: Vec<f32> = Vec::new();
        for (i, &v) in volume.data.iter().enumerate() {
            match self.class_of(v) {
                Some(c) => out.push(c),
                None => {
                    bad += 1;
                    first.get_or_insert((i, v));
                    if seen.len() < 8 && !seen.contains(&v) {
                        seen.push(v);
                    }
                    out.push(0);
                }
            }
        }
        if let Some((i, v)) = first {
            let [x, y, z] = position(i, volume.dims);
            let seen: Vec<String> = seen.iter().map(|v| v.to_string()).collect();
            return Err(Error::InvalidArgument(format!(
                "{}: label value {v} at voxel ({x}, {y}, {z}) is not in the label map [{self}] \
                 ({bad} voxels hold values outside the map: {}); give the map of this file's \
                 values in class order, e.g. \"0,10,150,250\" for iSeg",
                volume.source.display(),
                seen.join(", ")
            )));
        }
        Ok(out)
    }

    /// Maps classes back to file values for writing; a class >= `len()` is an error.
    pub fn from_classes(&self, classes: &[u8]) -> Result<Vec<f32>> {
        classes
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                self.0.get(c as usize).copied().ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "class {c} at index {i} is outside the label map [{self}] ({} classes)",
                        self.0.len()
                    ))
                })
            })
            .collect()
    }
}

impl fmt::Display for LabelMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s: Vec<String> = self.0.iter().map(|v| v.to_string()).collect();
        f.write_str(&s.join(","))
    }
}

impl FromStr for LabelMap {
    type Err = Error;
    fn from_str(s: &str) -> Result<LabelMap> {
        LabelMap::parse(s)
    }
}

// ---------------------------------------------------------------------------------------
// Dataset discovery
// ---------------------------------------------------------------------------------------

/// One iSeg-style subject: `subject-<id>-T1`, `-T2` and optionally `-label` images (for
/// `.hdr`/`.img` pairs the path is the `.hdr`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subject {
    /// The `<id>` of the file names.
    pub id: String,
    /// T1-weighted image.
    pub t1: PathBuf,
    /// T2-weighted image.
    pub t2: PathBuf,
    /// Label map, when present (test subjects have none).
    pub label: Option<PathBuf>,
}

const MODALITIES: [&str; 3] = ["-T1", "-T2", "-label"];
const EXTENSIONS: [&str; 4] = [".nii.gz", ".nii", ".hdr", ".img"];

/// Finds `subject-<id>-{T1,T2,label}.{hdr,img,nii,nii.gz}` in `dir` (not recursive),
/// sorted by id (numeric ids in numeric order, before other ids). Errors: unreadable
/// folder, no subjects, a T1 without T2 (or the reverse), a label without images, a
/// `.hdr` without its `.img` (or the reverse), one image in two formats.
pub fn discover(dir: &Path) -> Result<Vec<Subject>> {
    let io = |source| Error::Io {
        path: dir.display().to_string(),
        source,
    };
    // id -> modality index -> extension -> path
    let mut found: BTreeMap<String, [BTreeMap<&'static str, PathBuf>; 3]> = BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = name.strip_prefix("subject-") else {
            continue;
        };
        let Some(ext) = EXTENSIONS.iter().find(|e| rest.ends_with(*e)) else {
            continue;
        };
        let stem = &rest[..rest.len() - ext.len()];
        let Some((m, id)) = MODALITIES
            .iter()
            .enumerate()
            .find_map(|(m, suffix)| stem.strip_suffix(suffix).map(|id| (m, id)))
        else {
            continue;
        };
        if id.is_empty() {
            continue;
        }
        let slot = found.entry(id.to_string()).or_default();
        slot[m].insert(ext, entry.path());
    }
    let mut subjects = Vec::new();
    for (id, slots) in &found {
        let mut paths: [Option<PathBuf>; 3] = [None, None, None];
        for (m, exts) in slots.iter().enumerate() {
            paths[m] = resolve_format(dir, id, MODALITIES[m], exts)?;
        }
        let [t1, t2, label] = paths;
        let what = |m: &str| format!("subject-{id}{m}.{{hdr/img, nii, nii.gz}}");
        match (t1, t2) {
            (Some(t1), Some(t2)) => subjects.push(Subject {
                id: id.clone(),
                t1,
                t2,
                label,
            }),
            (Some(p), None) | (None, Some(p)) => {
                let missing = if slots[0].is_empty() { "-T1" } else { "-T2" };
                return Err(Error::InvalidArgument(format!(
                    "{}: subject {id} has {} but no {} image (expected {})",
                    dir.display(),
                    p.display(),
                    &missing[1..],
                    what(missing)
                )));
            }
            (None, None) => {
                let p = label.map(|p| p.display().to_string()).unwrap_or_default();
                return Err(Error::InvalidArgument(format!(
                    "{}: subject {id} has a label map {p} but no T1/T2 images (expected {} and {})",
                    dir.display(),
                    what("-T1"),
                    what("-T2")
                )));
            }
        }
    }
    if subjects.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{}: no subjects found (expected iSeg-style files subject-<id>-T1 and \
             subject-<id>-T2 (+ optional subject-<id>-label) as .hdr/.img, .nii or .nii.gz)",
            dir.display()
        )));
    }
    subjects.sort_by_key(|s| id_key(&s.id));
    Ok(subjects)
}

fn id_key(id: &str) -> (u8, u128, String) {
    match id.parse::<u128>() {
        Ok(n) if id.bytes().all(|b| b.is_ascii_digit()) => (0, n, id.to_string()),
        _ => (1, 0, id.to_string()),
    }
}

/// Picks the one format an image is stored in; `.hdr` and `.img` must come together.
fn resolve_format(
    dir: &Path,
    id: &str,
    modality: &str,
    exts: &BTreeMap<&'static str, PathBuf>,
) -> Result<Option<PathBuf>> {
    if exts.is_empty() {
        return Ok(None);
    }
    let err = |msg: String| {
        Error::InvalidArgument(format!("{}: subject-{id}{modality}: {msg}", dir.display()))
    };
    match (exts.get(".hdr"), exts.get(".img")) {
        (Some(h), None) => return Err(err(format!("{} has no matching .img", h.display()))),
        (None, Some(i)) => return Err(err(format!("{} has no matching .hdr", i.display()))),
        _ => {}
    }
    let formats = exts.len() - usize::from(exts.contains_key(".img"));
    if formats > 1 {
        let list: Vec<String> = exts.values().map(|p| p.display().to_string()).collect();
        return Err(err(format!(
            "stored in more than one format ({}); keep one",
            list.join(", ")
        )));
    }
    Ok(exts
        .get(".hdr")
        .or_else(|| exts.get(".nii.gz"))
        .or_else(|| exts.get(".nii"))
        .cloned())
}

// ---------------------------------------------------------------------------------------
// The embedded brain
// ---------------------------------------------------------------------------------------

/// `<crate>/data/mni152-2009c-2mm`: the MNI152 2009c template at 2 mm (see its README).
pub fn embedded_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("data")
        .join("mni152-2009c-2mm")
}

/// The embedded brain, skull-stripped like iSeg data.
#[derive(Clone, Debug)]
pub struct EmbeddedBrain {
    /// T1-weighted, 0..1, multiplied by the binary mask.
    pub t1: Volume,
    /// T2-weighted, 0..1, multiplied by the binary mask.
    pub t2: Volume,
    /// Brain mask binarised at 0.5 (values 0 or 1).
    pub mask: Volume,
    /// Classes per voxel: 0 background, 1 CSF, 2 GM, 3 WM.
    pub labels: Vec<u8>,
}

/// Class names of the embedded labels (and of iSeg), class order.
pub const CLASS_NAMES: [&str; 4] = ["background", "CSF", "GM", "WM"];

/// Loads [`embedded_dir`]: T1w, T2w, brain_mask, labels; checks they share one grid.
pub fn load_embedded() -> Result<EmbeddedBrain> {
    let dir = embedded_dir();
    let paths = ["T1w", "T2w", "brain_mask", "labels"].map(|n| dir.join(format!("{n}.nii.gz")));
    let mut t1 = read(&paths[0])?;
    let mut t2 = read(&paths[1])?;
    let mut mask = read(&paths[2])?;
    let labels = read(&paths[3])?;
    for (v, p) in [(&t2, &paths[1]), (&mask, &paths[2]), (&labels, &paths[3])] {
        check_pair(&t1, &paths[0], v, p)?;
    }
    for m in mask.data.iter_mut() {
        *m = if *m > 0.5 { 1.0 } else { 0.0 };
    }
    for (a, m) in t1.data.iter_mut().zip(&mask.data) {
        *a *= m;
    }
    for (a, m) in t2.data.iter_mut().zip(&mask.data) {
        *a *= m;
    }
    let labels = LabelMap::identity(CLASS_NAMES.len())?.to_classes(&labels)?;
    Ok(EmbeddedBrain {
        t1,
        t2,
        mask,
        labels,
    })
}

// ---------------------------------------------------------------------------------------
// Header
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Nifti1,
    Nifti2,
    Analyze,
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Format::Nifti1 => "NIfTI-1",
            Format::Nifti2 => "NIfTI-2",
            Format::Analyze => "Analyze 7.5",
        }
    }
}

/// The header fields of NIfTI-1/NIfTI-2/Analyze in NIfTI-2 precision. Analyze files
/// have the NIfTI-only fields (qform, sform, units, slice timing) zeroed.
#[derive(Clone, Debug, PartialEq)]
struct Header {
    format: Format,
    big_endian: bool,
    /// Data follow the header in the same file (`n+1`/`n+2`).
    single_file: bool,
    dim: [i64; 8],
    datatype: i64,
    pixdim: [f64; 8],
    vox_offset: f64,
    scl_slope: f64,
    scl_inter: f64,
    dim_info: u8,
    slice_start: i64,
    slice_end: i64,
    slice_code: u8,
    xyzt_units: u8,
    slice_duration: f64,
    toffset: f64,
    aux_file: [u8; 24],
    qform_code: i64,
    sform_code: i64,
    /// quatern_b, c, d, qoffset_x, y, z.
    quatern: [f64; 6],
    srow: [[f64; 4]; 3],
}

impl Header {
    fn blank() -> Header {
        Header {
            format: Format::Nifti1,
            big_endian: false,
            single_file: true,
            dim: [3, 1, 1, 1, 1, 1, 1, 1],
            datatype: 16,
            pixdim: [1.0; 8],
            vox_offset: NIFTI1_VOX_OFFSET as f64,
            scl_slope: 1.0,
            scl_inter: 0.0,
            dim_info: 0,
            slice_start: 0,
            slice_end: 0,
            slice_code: 0,
            xyzt_units: 2,
            slice_duration: 0.0,
            toffset: 0.0,
            aux_file: [0; 24],
            qform_code: 0,
            sform_code: 0,
            quatern: [0.0; 6],
            srow: [[0.0; 4]; 3],
        }
    }
}

/// Fixed-offset field reader over a header buffer (never panics: out-of-range reads are 0).
struct Fields<'a> {
    b: &'a [u8],
    big: bool,
}

impl Fields<'_> {
    fn bytes<const N: usize>(&self, off: usize) -> [u8; N] {
        let mut a = [0u8; N];
        if let Some(s) = self.b.get(off..off + N) {
            a.copy_from_slice(s);
        }
        a
    }
    fn u8(&self, off: usize) -> u8 {
        self.bytes::<1>(off)[0]
    }
    fn i16(&self, off: usize) -> i64 {
        let a = self.bytes(off);
        (if self.big {
            i16::from_be_bytes(a)
        } else {
            i16::from_le_bytes(a)
        }) as i64
    }
    fn i32(&self, off: usize) -> i64 {
        let a = self.bytes(off);
        (if self.big {
            i32::from_be_bytes(a)
        } else {
            i32::from_le_bytes(a)
        }) as i64
    }
    fn i64(&self, off: usize) -> i64 {
        let a = self.bytes(off);
        if self.big {
            i64::from_be_bytes(a)
        } else {
            i64::from_le_bytes(a)
        }
    }
    fn f32(&self, off: usize) -> f64 {
        let a = self.bytes(off);
        (if self.big {
            f32::from_be_bytes(a)
        } else {
            f32::from_le_bytes(a)
        }) as f64
    }
    fn f64(&self, off: usize) -> f64 {
        let a = self.bytes(off);
        if self.big {
            f64::from_be_bytes(a)
        } else {
            f64::from_le_bytes(a)
        }
    }
}

/// Parses a 348-byte NIfTI-1/Analyze header.
fn parse_nifti1(b: &[u8], big: bool) -> Header {
    let r = Fields { b, big };
    let magic: [u8; 4] = r.bytes(344);
    let (format, single_file) = match &magic {
        b"n+1\0" => (Format::Nifti1, true),
        b"ni1\0" => (Format::Nifti1, false),
        _ => (Format::Analyze, false),
    };
    let nifti = format == Format::Nifti1;
    let nz = |v: i64| if nifti { v } else { 0 };
    let nzf = |v: f64| if nifti { v } else { 0.0 };
    let mut dim = [0i64; 8];
    let mut pixdim = [0f64; 8];
    for i in 0..8 {
        dim[i] = r.i16(40 + 2 * i);
        pixdim[i] = r.f32(76 + 4 * i);
    }
    let mut quatern = [0f64; 6];
    for (i, q) in quatern.iter_mut().enumerate() {
        *q = nzf(r.f32(256 + 4 * i));
    }
    let mut srow = [[0f64; 4]; 3];
    for (row, s) in srow.iter_mut().enumerate() {
        for (col, v) in s.iter_mut().enumerate() {
            *v = nzf(r.f32(280 + 16 * row + 4 * col));
        }
    }
    Header {
        format,
        big_endian: big,
        single_file,
        dim,
        datatype: r.i16(70),
        pixdim,
        vox_offset: r.f32(108),
        // Analyze (SPM) keeps a scale factor at the same offset (funused1/funused2).
        scl_slope: r.f32(112),
        scl_inter: r.f32(116),
        dim_info: nz(r.u8(39) as i64) as u8,
        slice_start: nz(r.i16(74)),
        slice_end: nz(r.i16(120)),
        slice_code: nz(r.u8(122) as i64) as u8,
        xyzt_units: nz(r.u8(123) as i64) as u8,
        slice_duration: nzf(r.f32(132)),
        toffset: nzf(r.f32(136)),
        aux_file: if nifti { r.bytes(228) } else { [0; 24] },
        qform_code: nz(r.i16(252)),
        sform_code: nz(r.i16(254)),
        quatern,
        srow,
    }
}

/// Parses a 540-byte NIfTI-2 header (magic checked by the caller).
fn parse_nifti2(b: &[u8], big: bool) -> Header {
    let r = Fields { b, big };
    let mut dim = [0i64; 8];
    let mut pixdim = [0f64; 8];
    for i in 0..8 {
        dim[i] = r.i64(16 + 8 * i);
        pixdim[i] = r.f64(104 + 8 * i);
    }
    let mut quatern = [0f64; 6];
    for (i, q) in quatern.iter_mut().enumerate() {
        *q = r.f64(352 + 8 * i);
    }
    let mut srow = [[0f64; 4]; 3];
    for (row, s) in srow.iter_mut().enumerate() {
        for (col, v) in s.iter_mut().enumerate() {
            *v = r.f64(400 + 32 * row + 8 * col);
        }
    }
    Header {
        format: Format::Nifti2,
        big_endian: big,
        single_file: &r.bytes::<4>(4) == b"n+2\0",
        dim,
        datatype: r.i16(12),
        pixdim,
        vox_offset: r.i64(168) as f64,
        scl_slope: r.f64(176),
        scl_inter: r.f64(184),
        dim_info: r.u8(524),
        slice_start: r.i64(224),
        slice_end: r.i64(232),
        slice_code: r.i32(496).clamp(0, 255) as u8,
        xyzt_units: r.i32(500).clamp(0, 255) as u8,
        slice_duration: r.f64(208),
        toffset: r.f64(216),
        aux_file: r.bytes(320),
        qform_code: r.i32(344),
        sform_code: r.i32(348),
        quatern,
        srow,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DType {
    U8,
    I8,
    I16,
    U16,
    I32,
    U32,
    F32,
    F64,
}

impl DType {
    fn from_code(code: i64) -> std::result::Result<DType, &'static str> {
        Ok(match code {
            2 => DType::U8,
            4 => DType::I16,
            8 => DType::I32,
            16 => DType::F32,
            64 => DType::F64,
            256 => DType::I8,
            512 => DType::U16,
            768 => DType::U32,
            0 => return Err("unknown/none"),
            1 => return Err("binary"),
            32 => return Err("complex64"),
            128 => return Err("rgb24"),
            1024 => return Err("int64"),
            1280 => return Err("uint64"),
            1536 => return Err("float128"),
            1792 => return Err("complex128"),
            2048 => return Err("complex256"),
            2304 => return Err("rgba32"),
            _ => return Err("not a NIfTI datatype code"),
        })
    }
    fn size(self) -> u64 {
        match self {
            DType::U8 | DType::I8 => 1,
            DType::I16 | DType::U16 => 2,
            DType::I32 | DType::U32 | DType::F32 => 4,
            DType::F64 => 8,
        }
    }
    fn name(self) -> &'static str {
        match self {
            DType::U8 => "uint8",
            DType::I8 => "int8",
            DType::I16 => "int16",
            DType::U16 => "uint16",
            DType::I32 => "int32",
            DType::U32 => "uint32",
            DType::F32 => "float32",
            DType::F64 => "float64",
        }
    }
}

/// What the validated header says about the data.
struct Layout {
    dims: [usize; 3],
    channels: usize,
    dtype: DType,
    spacing: [f32; 3],
    affine: [[f64; 4]; 4],
    /// Byte offset of the data in the data file.
    offset: u64,
    nbytes: u64,
    slope: f64,
    inter: f64,
}

impl Layout {
    fn describe(&self) -> String {
        let c = if self.channels > 1 {
            format!(" x {}", self.channels)
        } else {
            String::new()
        };
        format!("{}{c} {}", fmt_dims(&self.dims), self.dtype.name())
    }
}

/// Validates a header: everything the reader allocates from is checked here.
fn layout(h: &Header, origin: &str, allow_channels: bool) -> Result<Layout> {
    let bad = |msg: String| Error::InvalidArgument(format!("{origin}: {msg}"));
    let ndim = h.dim[0];
    if !(1..=7).contains(&ndim) {
        return Err(bad(format!(
            "invalid header: dim[0] (number of dimensions) is {ndim}, must be 1..7 \
             (corrupt {} header?)",
            h.format.name()
        )));
    }
    let ndim = ndim as usize;
    let dim_list: Vec<String> = h.dim[1..=ndim].iter().map(|d| d.to_string()).collect();
    let dim_list = dim_list.join(" x ");
    for i in 1..=ndim {
        if h.dim[i] < 1 {
            return Err(bad(format!(
                "invalid header: dimension {i} is {} (dims {dim_list}); every dimension must \
                 be positive",
                h.dim[i]
            )));
        }
    }
    let d = |i: usize| if i <= ndim { h.dim[i] as u64 } else { 1 };
    let extra: Option<u64> = (4..=ndim).try_fold(1u64, |a, i| a.checked_mul(d(i)));
    let total = [1, 2, 3]
        .iter()
        .try_fold(1u64, |a, &i| a.checked_mul(d(i)))
        .zip(extra)
        .and_then(|(a, b)| a.checked_mul(b));
    let Some(total) = total.filter(|&t| t <= MAX_VOXELS) else {
        return Err(bad(format!(
            "header declares {dim_list} voxels, more than the limit of {MAX_VOXELS} \
             ({} voxels; corrupt header?)",
            total.map_or("over 2^64".to_string(), |t| t.to_string())
        )));
    };
    let extra = extra.unwrap_or(u64::MAX);
    let channels = if allow_channels {
        if (5..=ndim).any(|i| d(i) > 1) {
            return Err(bad(format!(
                "{ndim}-D image with dims {dim_list}: only x, y, z and one channel axis \
                 (4th dimension) are supported"
            )));
        }
        d(4)
    } else {
        if extra > 1 {
            return Err(bad(format!(
                "{ndim}-D image with {extra} volumes (dims {dim_list}): expected one 3-D \
                 volume (a 4-D image with t = 1 is fine); split it into 3-D files first"
            )));
        }
        1
    };
    let dtype = DType::from_code(h.datatype).map_err(|name| {
        bad(format!(
            "unsupported datatype {} ({name}); supported: uint8, int8, int16, uint16, \
             int32, uint32, float32, float64",
            h.datatype
        ))
    })?;
    let unit = unit_to_mm(h.xyzt_units);
    let mut spacing = [1f32; 3];
    for (i, s) in spacing.iter_mut().enumerate() {
        let p = h.pixdim[i + 1];
        if p.is_finite() && p != 0.0 {
            *s = (p.abs() * unit) as f32;
        } else if i < ndim {
            return Err(bad(format!(
                "invalid voxel size: pixdim[{}] is {p} (must be finite and non-zero)",
                i + 1
            )));
        }
        if !s.is_finite() || *s <= 0.0 {
            return Err(bad(format!(
                "invalid voxel size: pixdim[{}] = {p} gives {s} mm",
                i + 1
            )));
        }
    }
    let min_offset = if h.single_file {
        match h.format {
            Format::Nifti2 => NIFTI2_HEADER,
            _ => NIFTI1_HEADER,
        }
    } else {
        0
    };
    let off = h.vox_offset;
    if !off.is_finite() || off < min_offset as f64 || off.fract() != 0.0 || off > 1e15 {
        return Err(bad(format!(
            "invalid header: vox_offset is {off} (must be a whole number >= {min_offset})"
        )));
    }
    let (slope, inter) = scaling(h.scl_slope, h.scl_inter);
    Ok(Layout {
        dims: [d(1) as usize, d(2) as usize, d(3) as usize],
        channels: channels as usize,
        dtype,
        spacing,
        affine: affine_of(h, unit),
        offset: off as u64,
        nbytes: total * dtype.size(),
        slope,
        inter,
    })
}

/// Effective scaling: slope 0 or non-finite means none (NIfTI-1 rule, as nibabel does);
/// a non-finite intercept counts as 0.
fn scaling(slope: f64, inter: f64) -> (f64, f64) {
    if slope == 0.0 || !slope.is_finite() {
        (1.0, 0.0)
    } else {
        (slope, if inter.is_finite() { inter } else { 0.0 })
    }
}

fn unit_to_mm(xyzt_units: u8) -> f64 {
    match xyzt_units & 7 {
        1 => 1000.0, // metre
        3 => 0.001,  // micron
        _ => 1.0,    // mm or unknown
    }
}

/// sform if set and usable, else qform if set and usable, else diag(|pixdim|) — scaled to mm.
/// Usable means finite and non-singular in mm: a finite matrix in metres (a NIfTI-2 f64
/// up to 1.8e308) can overflow to ±Inf when converted.
fn affine_of(h: &Header, unit: f64) -> [[f64; 4]; 4] {
    let usable = |m: &[[f64; 4]; 3]| m.iter().flatten().all(|v| v.is_finite()) && det3(m) != 0.0;
    let in_mm = |m: [[f64; 4]; 3]| m.map(|r| r.map(|v| v * unit));
    let finish = |m: [[f64; 4]; 3]| [m[0], m[1], m[2], [0.0, 0.0, 0.0, 1.0]];
    if h.format != Format::Analyze && h.sform_code > 0 {
        let s = in_mm(h.srow);
        if usable(&s) {
            return finish(s);
        }
    }
    if h.format != Format::Analyze && h.qform_code > 0 {
        let q = in_mm(qform_matrix(h));
        if usable(&q) {
            return finish(q);
        }
    }
    let p = |i: usize| {
        let v = h.pixdim[i].abs();
        if v.is_finite() && v > 0.0 {
            v
        } else {
            1.0
        }
    };
    finish(in_mm([
        [p(1), 0.0, 0.0, 0.0],
        [0.0, p(2), 0.0, 0.0],
        [0.0, 0.0, p(3), 0.0],
    ]))
}

/// NIfTI-1 "method 2" (nifti1_io.c `quatern_to_mat44`).
fn qform_matrix(h: &Header) -> [[f64; 4]; 3] {
    let [mut b, mut c, mut d, qx, qy, qz] = h.quatern;
    let s = b * b + c * c + d * d;
    let a = if 1.0 - s < 1e-7 {
        let n = s.sqrt();
        if n > 0.0 {
            b /= n;
            c /= n;
            d /= n;
        }
        0.0
    } else {
        (1.0 - s).sqrt()
    };
    let r = [
        [
            a * a + b * b - c * c - d * d,
            2.0 * (b * c - a * d),
            2.0 * (b * d + a * c),
        ],
        [
            2.0 * (b * c + a * d),
            a * a + c * c - b * b - d * d,
            2.0 * (c * d - a * b),
        ],
        [
            2.0 * (b * d - a * c),
            2.0 * (c * d + a * b),
            a * a + d * d - c * c - b * b,
        ],
    ];
    let pos = |v: f64| if v > 0.0 { v } else { 1.0 };
    let (xd, yd) = (pos(h.pixdim[1]), pos(h.pixdim[2]));
    let zd = if h.pixdim[0] < 0.0 {
        -pos(h.pixdim[3])
    } else {
        pos(h.pixdim[3])
    };
    let t = [qx, qy, qz];
    let mut m = [[0.0; 4]; 3];
    for i in 0..3 {
        m[i] = [r[i][0] * xd, r[i][1] * yd, r[i][2] * zd, t[i]];
    }
    m
}

fn det3(m: &[[f64; 4]; 3]) -> f64 {
    m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
        - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
}

// ---------------------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------------------

/// Which files hold the header and the data.
enum Files {
    Single { path: PathBuf },
    Pair { hdr: PathBuf, img: PathBuf },
}

fn lower_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default()
}

fn is_gz(path: &Path) -> bool {
    lower_name(path).ends_with(".gz")
}

/// `path` with its last `strip` characters replaced by each suffix, first existing one.
fn sibling(path: &Path, gz: bool, suffixes: &[&str]) -> Option<PathBuf> {
    let base = strip_ext(path, gz);
    suffixes
        .iter()
        .map(|suf| {
            let mut s = base.clone().into_os_string();
            s.push(suf);
            PathBuf::from(s)
        })
        .find(|p| p.is_file())
}

/// `path` without its extension (`x.hdr` → `x`; with `gz`, `x.hdr.gz` → `x`), byte-exact.
fn strip_ext(path: &Path, gz: bool) -> PathBuf {
    let once = path.with_extension("");
    if gz {
        once.with_extension("")
    } else {
        once
    }
}

fn classify(path: &Path) -> Result<Files> {
    let name = lower_name(path);
    let origin = path.display();
    if name.ends_with(".nii") || name.ends_with(".nii.gz") {
        return Ok(Files::Single {
            path: path.to_path_buf(),
        });
    }
    let imgs = [".img", ".img.gz", ".IMG", ".IMG.GZ"];
    let hdrs = [".hdr", ".hdr.gz", ".HDR", ".HDR.GZ"];
    for (ext, other, kind) in [
        (".hdr", &imgs, true),
        (".hdr.gz", &imgs, true),
        (".img", &hdrs, false),
        (".img.gz", &hdrs, false),
    ] {
        if name.ends_with(ext) {
            if !path.exists() {
                return Err(Error::Io {
                    path: origin.to_string(),
                    source: io::Error::new(io::ErrorKind::NotFound, "no such file"),
                });
            }
            let found = sibling(path, ext.ends_with(".gz"), other).ok_or_else(|| {
                let what = if kind {
                    "image (.img)"
                } else {
                    "header (.hdr)"
                };
                Error::InvalidArgument(format!(
                    "{origin}: no matching {what} file next to it; Analyze/NIfTI pairs need \
                     both the .hdr and the .img"
                ))
            })?;
            let (hdr, img) = if kind {
                (path.to_path_buf(), found)
            } else {
                (found, path.to_path_buf())
            };
            return Ok(Files::Pair { hdr, img });
        }
    }
    Err(Error::InvalidArgument(format!(
        "{origin}: unrecognised file name: expected .nii, .nii.gz, or a .hdr/.img pair"
    )))
}

fn open(path: &Path) -> Result<(Box<dyn Read>, u64)> {
    let io = |source| Error::Io {
        path: path.display().to_string(),
        source,
    };
    let f = File::open(path).map_err(io)?;
    let meta = f.metadata().map_err(io)?;
    if meta.is_dir() {
        return Err(Error::InvalidArgument(format!(
            "{}: is a folder, not an image file",
            path.display()
        )));
    }
    Ok((decoder(path, BufReader::new(f)), meta.len()))
}

/// `r` as is, or gunzipped when `path` ends in `.gz`.
fn decoder<'a>(path: &Path, r: impl Read + 'a) -> Box<dyn Read + 'a> {
    if is_gz(path) {
        Box::new(MultiGzDecoder::new(r))
    } else {
        Box::new(r)
    }
}

/// Opens the data file of a pair (after its header has been checked): reader and size.
type DataOpener<'a> = Box<dyn FnOnce() -> Result<(Box<dyn Read + 'a>, u64)> + 'a>;

/// A read error while parsing: short reads and bad gzip data are format problems.
fn read_error(path: &Path, what: &str, e: io::Error) -> Error {
    let origin = path.display();
    match e.kind() {
        io::ErrorKind::UnexpectedEof => Error::InvalidArgument(format!(
            "{origin}: truncated file (too short): it ends inside {what}"
        )),
        io::ErrorKind::InvalidInput | io::ErrorKind::InvalidData => {
            Error::InvalidArgument(format!(
                "{origin}: corrupt data while reading {what}: {e} (truncated or damaged gzip \
                 file, or not gzip at all?)"
            ))
        }
        _ => Error::Io {
            path: origin.to_string(),
            source: e,
        },
    }
}

fn read_guarded<T>(path: &Path, read: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(read)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(Error::InvalidArgument(format!(
                "{}: internal error while reading the image ({msg}); the file is probably \
                 malformed",
                path.display()
            )))
        }
    }
}

fn read_inner(path: &Path, allow_channels: bool) -> Result<Vec<Volume>> {
    let (hdr_path, img) = match classify(path)? {
        Files::Single { path } => (path, None),
        Files::Pair { hdr, img } => {
            let opener: DataOpener<'static> = {
                let img = img.clone();
                Box::new(move || open(&img))
            };
            (hdr, Some((img, opener)))
        }
    };
    let (hr, hdr_len) = open(&hdr_path)?;
    read_streams(path, &hdr_path, hr, hdr_len, img, allow_channels)
}

/// Parses an image whose header file `hdr_path` is `hr` (`hdr_len` bytes on disk): the
/// data follow in `hr`, or come from the pair's image file `img` (opened only once the
/// header is valid). `path` is the name the caller gave.
fn read_streams<'a>(
    path: &Path,
    hdr_path: &Path,
    mut hr: Box<dyn Read + 'a>,
    hdr_len: u64,
    img: Option<(PathBuf, DataOpener<'a>)>,
    allow_channels: bool,
) -> Result<Vec<Volume>> {
    let origin = path.display().to_string();
    let mut buf = vec![0u8; NIFTI2_HEADER];
    hr.read_exact(&mut buf[..NIFTI1_HEADER])
        .map_err(|e| read_error(hdr_path, "the 348-byte header", e))?;
    let size_le = i32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let size_be = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let (size, big) = if size_le == 348 || size_le == 540 {
        (size_le as usize, false)
    } else if size_be == 348 || size_be == 540 {
        (size_be as usize, true)
    } else {
        return Err(Error::InvalidArgument(format!(
            "{}: not a NIfTI-1, NIfTI-2 or Analyze 7.5 image: the header-size field reads \
             {size_le} (expected 348 or 540)",
            hdr_path.display()
        )));
    };
    let header = if size == NIFTI2_HEADER {
        hr.read_exact(&mut buf[NIFTI1_HEADER..])
            .map_err(|e| read_error(hdr_path, "the 540-byte NIfTI-2 header", e))?;
        let magic = &buf[4..8];
        if magic != b"n+2\0" && magic != b"ni2\0" {
            return Err(Error::InvalidArgument(format!(
                "{}: NIfTI-2 header size but magic {:?} is neither \"n+2\" nor \"ni2\"",
                hdr_path.display(),
                String::from_utf8_lossy(magic)
            )));
        }
        parse_nifti2(&buf, big)
    } else {
        parse_nifti1(&buf[..NIFTI1_HEADER], big)
    };
    let lay = layout(&header, &origin, allow_channels)?;

    // The data: same stream after the header, or the .img file.
    let (mut data_reader, data_path, data_len, consumed) = match img {
        None => {
            if !header.single_file {
                return Err(Error::InvalidArgument(format!(
                    "{origin}: the header ({}) says the voxel data are in a separate .img \
                     file, but this is a single .nii file",
                    if header.format == Format::Analyze {
                        "Analyze, no NIfTI magic"
                    } else {
                        "magic ni1/ni2"
                    }
                )));
            }
            (hr, hdr_path.to_path_buf(), hdr_len, size as u64)
        }
        Some((img, open_img)) => {
            if header.single_file {
                return Err(Error::InvalidArgument(format!(
                    "{}: the header magic (n+1/n+2) says the data follow the header in the \
                     same file: rename it to .nii",
                    hdr_path.display()
                )));
            }
            drop(hr);
            let (r, len) = open_img()?;
            (r, img, len, 0)
        }
    };
    let needed = lay.offset.saturating_add(lay.nbytes);
    let data_origin = data_path.display();
    let gz = is_gz(&data_path);
    let capacity = if gz {
        let most = data_len
            .saturating_mul(MAX_DEFLATE_RATIO)
            .saturating_add(GZ_SLACK);
        if needed > most {
            return Err(Error::InvalidArgument(format!(
                "{data_origin}: truncated or corrupt: the header declares {} voxels \
                 ({} bytes of data at offset {}), more than a {data_len}-byte gzip file \
                 can hold",
                lay.describe(),
                lay.nbytes,
                lay.offset
            )));
        }
        lay.nbytes.min(INITIAL_GZ_CAPACITY)
    } else {
        if needed > data_len {
            return Err(Error::InvalidArgument(format!(
                "{data_origin}: truncated: the header declares {} voxels ({} bytes of data \
                 at offset {}) but the file has only {data_len} bytes",
                lay.describe(),
                lay.nbytes,
                lay.offset
            )));
        }
        lay.nbytes
    };
    let skip = lay.offset.saturating_sub(consumed);
    let skipped = io::copy(&mut (&mut data_reader).take(skip), &mut io::sink())
        .map_err(|e| read_error(&data_path, "the header extensions", e))?;
    if skipped < skip {
        return Err(Error::InvalidArgument(format!(
            "{data_origin}: truncated: the file ends before the voxel data (offset {})",
            lay.offset
        )));
    }
    let mut raw = Vec::with_capacity(capacity as usize);
    let got = (&mut data_reader)
        .take(lay.nbytes)
        .read_to_end(&mut raw)
        .map_err(|e| read_error(&data_path, "the voxel data", e))? as u64;
    if got < lay.nbytes {
        return Err(Error::InvalidArgument(format!(
            "{data_origin}: truncated: the header declares {} voxels ({} bytes of data) but \
             the file holds only {got} bytes of data",
            lay.describe(),
            lay.nbytes
        )));
    }
    if gz {
        // Read to the end of the gzip stream so its CRC-32 and length are verified: a
        // damaged deflate stream can decode to wrong voxels without any other error.
        // Trailing data past GZ_TRAILING_LIMIT is left unchecked rather than decoded.
        io::copy(
            &mut (&mut data_reader).take(GZ_TRAILING_LIMIT),
            &mut io::sink(),
        )
        .map_err(|e| read_error(&data_path, "the gzip trailer (CRC check)", e))?;
    }
    let values = decode(&raw, lay.dtype, header.big_endian, lay.slope, lay.inter);
    drop(raw);
    let nonfinite = values.iter().filter(|v| !v.is_finite()).count();
    if nonfinite > 0 {
        let first = values.iter().position(|v| !v.is_finite()).unwrap_or(0);
        let n = lay.dims.iter().product::<usize>().max(1);
        let [x, y, z] = position(first % n, lay.dims);
        let chan = if lay.channels > 1 {
            format!(", channel {}", first / n)
        } else {
            String::new()
        };
        return Err(Error::InvalidArgument(format!(
            "{origin}: {nonfinite} non-finite voxel values (NaN or ±Inf), the first at voxel \
             ({x}, {y}, {z}{chan}) = {}; the image is corrupt or badly scaled \
             (scl_slope {}, scl_inter {})",
            values[first], header.scl_slope, header.scl_inter
        )));
    }
    let mut vheader = header;
    if lay.channels > 1 {
        vheader.dim[0] = 3;
        for d in &mut vheader.dim[4..] {
            *d = 1;
        }
    }
    let make = |data: Vec<f32>| Volume {
        dims: lay.dims,
        spacing: lay.spacing,
        affine: lay.affine,
        data,
        source: path.to_path_buf(),
        header: vheader.clone(),
    };
    if lay.channels == 1 {
        return Ok(vec![make(values)]);
    }
    let n = lay.dims.iter().product::<usize>();
    Ok(values.chunks(n.max(1)).map(|c| make(c.to_vec())).collect())
}

/// Raw bytes → f32 with scaling `v * slope + inter` (computed in f64).
fn decode(raw: &[u8], dt: DType, big: bool, slope: f64, inter: f64) -> Vec<f32> {
    let identity = slope == 1.0 && inter == 0.0;
    let scale = |v: f64| {
        if identity {
            v as f32
        } else {
            (v * slope + inter) as f32
        }
    };
    macro_rules! conv {
        ($t:ty, $n:expr) => {
            raw.chunks_exact($n)
                .map(|c| {
                    let mut a = [0u8; $n];
                    a.copy_from_slice(c);
                    let v = if big {
                        <$t>::from_be_bytes(a)
                    } else {
                        <$t>::from_le_bytes(a)
                    };
                    scale(v as f64)
                })
                .collect()
        };
    }
    match dt {
        DType::U8 => raw.iter().map(|&v| scale(v as f64)).collect(),
        DType::I8 => raw.iter().map(|&v| scale(v as i8 as f64)).collect(),
        DType::I16 => conv!(i16, 2),
        DType::U16 => conv!(u16, 2),
        DType::I32 => conv!(i32, 4),
        DType::U32 => conv!(u32, 4),
        DType::F32 => conv!(f32, 4),
        DType::F64 => conv!(f64, 8),
    }
}

// ---------------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------------

enum Target {
    Single { path: PathBuf, gz: bool },
    Pair { hdr: PathBuf, img: PathBuf },
}

fn target(path: &Path) -> Result<Target> {
    let name = lower_name(path);
    let upper = path
        .extension()
        .is_some_and(|e| e.to_string_lossy().chars().all(|c| c.is_ascii_uppercase()));
    let swap = |ext: &str| {
        let ext = if upper {
            ext.to_ascii_uppercase()
        } else {
            ext.to_string()
        };
        path.with_extension(ext)
    };
    if name.ends_with(".nii") || name.ends_with(".nii.gz") {
        Ok(Target::Single {
            path: path.to_path_buf(),
            gz: name.ends_with(".gz"),
        })
    } else if name.ends_with(".hdr") {
        Ok(Target::Pair {
            hdr: path.to_path_buf(),
            img: swap("img"),
        })
    } else if name.ends_with(".img") {
        Ok(Target::Pair {
            hdr: swap("hdr"),
            img: path.to_path_buf(),
        })
    } else {
        Err(Error::InvalidArgument(format!(
            "{}: unrecognised output name: expected .nii, .nii.gz, .hdr or .img",
            path.display()
        )))
    }
}

fn write_impl(
    path: &Path,
    reference: &Volume,
    channels: &[&[f32]],
    dt: DataType,
    four_d: bool,
) -> Result<()> {
    let origin = path.display();
    let target = target(path)?;
    let dims = reference.dims;
    let h = &reference.header;
    let ndim = h.dim[0].clamp(0, 7) as usize;
    let hdims = [1, 2, 3].map(|i| {
        if i <= ndim {
            h.dim[i].max(0) as usize
        } else {
            1
        }
    });
    if hdims != dims || affine_of(h, unit_to_mm(h.xyzt_units)) != reference.affine {
        return Err(Error::InvalidArgument(format!(
            "{origin}: the reference {} has had its dims or affine changed after it was \
             read; the written geometry comes from its header, so build a reference with \
             Volume::new instead",
            reference.source.display()
        )));
    }
    let n = checked_voxels(dims).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "{origin}: reference {} has invalid dims {}",
            reference.source.display(),
            fmt_dims(&dims)
        ))
    })?;
    if channels.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{origin}: no channels to write"
        )));
    }
    for (c, data) in channels.iter().enumerate() {
        if data.len() != n {
            return Err(Error::Shape(format!(
                "{origin}: {}{} values, but the reference {} is {} = {n} voxels",
                if four_d {
                    format!("channel {c} has ")
                } else {
                    String::new()
                },
                data.len(),
                reference.source.display(),
                fmt_dims(&dims)
            )));
        }
        let bad = match dt {
            DataType::U8 => data
                .iter()
                .position(|v| !(v.is_finite() && v.fract() == 0.0 && (0.0..=255.0).contains(v))),
            DataType::F32 => data.iter().position(|v| !v.is_finite()),
        };
        if let Some(i) = bad {
            let [x, y, z] = position(i, dims);
            let need = match dt {
                DataType::U8 => "an integer in 0..=255 for a uint8 label map",
                DataType::F32 => "finite",
            };
            let chan = if four_d {
                format!(", channel {c}")
            } else {
                String::new()
            };
            return Err(Error::InvalidArgument(format!(
                "{origin}: value {} at voxel ({x}, {y}, {z}{chan}) must be {need}; nothing written",
                data[i]
            )));
        }
    }
    let single = matches!(target, Target::Single { .. });
    let hdr = nifti1_header(
        path,
        &reference.header,
        dims,
        four_d.then_some(channels.len()),
        dt,
        single,
    )?;
    let size = match dt {
        DataType::U8 => 1,
        DataType::F32 => 4,
    };
    let mut bytes = Vec::with_capacity(n * channels.len() * size);
    for data in channels {
        match dt {
            DataType::U8 => bytes.extend(data.iter().map(|&v| v as u8)),
            DataType::F32 => {
                for v in data.iter() {
                    bytes.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
    }
    match target {
        Target::Single { path: p, gz } => {
            let ext = [0u8; 4];
            commit(&[(&p, gz, &[&hdr[..], &ext[..], &bytes[..]])])
        }
        // The header's temporary is created first (a bad folder is reported under the
        // name given), the image is renamed into place first.
        Target::Pair { hdr: h, img } => {
            commit(&[(&h, false, &[&hdr[..]]), (&img, false, &[&bytes[..]])])
        }
    }
}

/// A NIfTI-1 little-endian header with the reference's geometry.
fn nifti1_header(
    path: &Path,
    r: &Header,
    dims: [usize; 3],
    channels: Option<usize>,
    dt: DataType,
    single: bool,
) -> Result<[u8; NIFTI1_HEADER]> {
    let mut b = [0u8; NIFTI1_HEADER];
    let i16_of = |v: usize, what: &str| {
        i16::try_from(v).map_err(|_| {
            Error::InvalidArgument(format!(
                "{}: {what} {v} exceeds the NIfTI-1 limit of 32767",
                path.display()
            ))
        })
    };
    let mut dim = [1i16; 8];
    dim[0] = if channels.is_some() { 4 } else { 3 };
    for i in 0..3 {
        dim[i + 1] = i16_of(dims[i], "dimension")?;
    }
    if let Some(c) = channels {
        dim[4] = i16_of(c, "channel count")?;
    }
    let small = |v: i64| i16::try_from(v).unwrap_or(0);
    let put = |b: &mut [u8; NIFTI1_HEADER], off: usize, bytes: &[u8]| {
        b[off..off + bytes.len()].copy_from_slice(bytes);
    };
    let f = |v: f64| (v as f32).to_le_bytes();
    put(&mut b, 0, &348i32.to_le_bytes());
    b[38] = b'r';
    b[39] = r.dim_info;
    for (i, d) in dim.iter().enumerate() {
        put(&mut b, 40 + 2 * i, &d.to_le_bytes());
    }
    let (code, bitpix): (i16, i16) = match dt {
        DataType::U8 => (2, 8),
        DataType::F32 => (16, 32),
    };
    put(&mut b, 70, &code.to_le_bytes());
    put(&mut b, 72, &bitpix.to_le_bytes());
    put(&mut b, 74, &small(r.slice_start).to_le_bytes());
    let mut pixdim = [1f64; 8];
    pixdim[0] = if r.pixdim[0] < 0.0 && r.format != Format::Analyze {
        -1.0
    } else {
        1.0
    };
    for (i, (out, &p)) in pixdim.iter_mut().zip(&r.pixdim).enumerate().skip(1) {
        if p.is_finite() && p != 0.0 && (i <= 3 || channels.is_none()) {
            *out = p;
        }
    }
    for (i, p) in pixdim.iter().enumerate() {
        put(&mut b, 76 + 4 * i, &f(*p));
    }
    let vox_offset = if single {
        NIFTI1_VOX_OFFSET as f64
    } else {
        0.0
    };
    put(&mut b, 108, &f(vox_offset));
    put(&mut b, 112, &f(1.0)); // scl_slope
    put(&mut b, 116, &f(0.0)); // scl_inter
    put(&mut b, 120, &small(r.slice_end).to_le_bytes());
    b[122] = r.slice_code;
    b[123] = r.xyzt_units;
    let fin = |v: f64| if v.is_finite() { v } else { 0.0 };
    put(&mut b, 132, &f(fin(r.slice_duration)));
    put(&mut b, 136, &f(fin(r.toffset)));
    put(&mut b, 148, b"masnet-wgpu");
    put(&mut b, 228, &r.aux_file);
    put(&mut b, 252, &small(r.qform_code).to_le_bytes());
    put(&mut b, 254, &small(r.sform_code).to_le_bytes());
    for (i, q) in r.quatern.iter().enumerate() {
        put(&mut b, 256 + 4 * i, &f(*q));
    }
    for (row, s) in r.srow.iter().enumerate() {
        for (col, v) in s.iter().enumerate() {
            put(&mut b, 280 + 16 * row + 4 * col, &f(*v));
        }
    }
    put(&mut b, 344, if single { b"n+1\0" } else { b"ni1\0" });
    Ok(b)
}

/// `<path>.tmp`.
fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

/// Writes every file to `<target>.tmp` (gzipped if asked) in order, syncs, then renames
/// them over their targets in reverse order; on any failure the temporaries are removed
/// and no target has been touched (unless the second rename of a pair fails, which
/// leaves the first, complete file in place).
fn commit(files: &[(&Path, bool, &[&[u8]])]) -> Result<()> {
    let mut tmps: Vec<PathBuf> = Vec::new();
    let result = (|| -> Result<()> {
        for (target, gz, parts) in files {
            let tmp = tmp_path(target);
            tmps.push(tmp.clone());
            write_file(&tmp, *gz, parts).map_err(|source| Error::Io {
                path: target.display().to_string(),
                source,
            })?;
        }
        for ((target, _, _), tmp) in files.iter().zip(&tmps).rev() {
            std::fs::rename(tmp, target).map_err(|source| Error::Io {
                path: target.display().to_string(),
                source,
            })?;
        }
        Ok(())
    })();
    if result.is_err() {
        for t in &tmps {
            let _ = std::fs::remove_file(t);
        }
        return result;
    }
    if let Some((p, _, _)) = files.first() {
        sync_parent(p);
    }
    Ok(())
}

fn write_file(tmp: &Path, gz: bool, parts: &[&[u8]]) -> io::Result<()> {
    let file = File::create(tmp)?;
    let w = BufWriter::new(file);
    let w = if gz {
        let mut e = GzEncoder::new(w, Compression::new(6));
        for p in parts {
            e.write_all(p)?;
        }
        e.finish()?
    } else {
        let mut w = w;
        for p in parts {
            w.write_all(p)?;
        }
        w
    };
    let file = w.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()
}

/// Makes the rename durable where the platform allows (best effort).
fn sync_parent(path: &Path) {
    #[cfg(unix)]
    {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn fmt_dims(d: &[usize; 3]) -> String {
    format!("{}x{}x{}", d[0], d[1], d[2])
}

fn checked_voxels(dims: [usize; 3]) -> Option<usize> {
    if dims.contains(&0) {
        return None;
    }
    dims.iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .filter(|&n| n as u64 <= MAX_VOXELS)
}

/// (x, y, z) of flat index `i` in NIfTI order.
fn position(i: usize, dims: [usize; 3]) -> [usize; 3] {
    let nx = dims[0].max(1);
    let ny = dims[1].max(1);
    [i % nx, (i / nx) % ny, i / (nx * ny)]
}
