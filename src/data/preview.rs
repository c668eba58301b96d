//! A quick-look PNG of a volume and its segmentation: the axial, coronal and sagittal
//! central slices side by side, T1 in greyscale with the labels overlaid in colour.
//!
//! Orientation assumes voxel axes roughly RAS (x towards one side, y anterior, z superior,
//! as NIfTI/Analyze files usually are): the **axial** panel (slice `z = Z/2`) has x to the
//! right and anterior (high y) up; the **coronal** panel (`y = Y/2`) has x to the right and
//! superior (high z) up; the **sagittal** panel (`x = X/2`) has y (anterior) to the right
//! and superior up. Panels are left to right axial, coronal, sagittal, top-aligned,
//! separated by [`PANEL_GAP`] black columns, black below shorter panels.
//!
//! Anisotropic voxels are shown at their physical aspect ratio: each axis is resampled
//! (nearest neighbour) to `round(n * spacing / min_spacing)` pixels, `min_spacing` being
//! the smallest of the three spacings; isotropic volumes keep one pixel per voxel.
//!
//! Greyscale: voxels equal to 0 (background) are black; the others map linearly from
//! `min(0, p1)` (black) to `p99` (white), p1/p99 the 1st/99th percentiles of the non-zero
//! finite T1 voxels of the whole volume, clamped. Overlay, blended with alpha
//! [`OVERLAY_ALPHA`]: CSF (1) blue [`CSF_COLOUR`], GM (2) green [`GM_COLOUR`], WM (3)
//! yellow [`WM_COLOUR`], any other non-zero label magenta [`OTHER_COLOUR`].

use crate::data::sampler::{voxel_count, voxel_index};
use crate::error::{Error, Result};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Overlay colour of CSF (label 1): blue.
pub const CSF_COLOUR: [u8; 3] = [30, 110, 255];
/// Overlay colour of GM (label 2): green.
pub const GM_COLOUR: [u8; 3] = [0, 200, 60];
/// Overlay colour of WM (label 3): yellow.
pub const WM_COLOUR: [u8; 3] = [255, 220, 0];
/// Overlay colour of any other non-zero label: magenta.
pub const OTHER_COLOUR: [u8; 3] = [255, 0, 255];
/// Opacity of the label overlay.
pub const OVERLAY_ALPHA: f32 = 0.45;
/// Black columns between panels.
pub const PANEL_GAP: usize = 2;
/// Largest width or height of the image, in pixels.
pub const MAX_SIDE: usize = 16384;

/// The overlay colour of `label` (`None` for background).
pub fn overlay_colour(label: u8) -> Option<[u8; 3]> {
    match label {
        0 => None,
        1 => Some(CSF_COLOUR),
        2 => Some(GM_COLOUR),
        3 => Some(WM_COLOUR),
        _ => Some(OTHER_COLOUR),
    }
}

/// The RGB pixel for greyscale value `grey` under `label`.
pub fn overlay_pixel(grey: u8, label: u8) -> [u8; 3] {
    match overlay_colour(label) {
        None => [grey; 3],
        Some(c) => c.map(|ch| {
            ((1.0 - OVERLAY_ALPHA) * grey as f32 + OVERLAY_ALPHA * ch as f32).round() as u8
        }),
    }
}

/// Pixels along each axis after resampling to the physical aspect ratio.
fn axis_pixels(dims: [usize; 3], spacing: [f32; 3]) -> Result<[usize; 3]> {
    if let Some(a) = (0..3).find(|&a| !(spacing[a].is_finite() && spacing[a] > 0.0)) {
        return Err(Error::InvalidArgument(format!(
            "preview: spacing {spacing:?} must be positive and finite (axis {a})"
        )));
    }
    let unit = spacing.iter().copied().fold(f32::INFINITY, f32::min) as f64;
    let mut out = [0; 3];
    for a in 0..3 {
        let px = (dims[a] as f64 * spacing[a] as f64 / unit).round().max(1.0);
        if px > MAX_SIDE as f64 {
            return Err(Error::InvalidArgument(format!(
                "preview: axis {a} would be {px} pixels (dims {dims:?}, spacing {spacing:?}); \
                 the limit is {MAX_SIDE}"
            )));
        }
        out[a] = px as usize;
    }
    Ok(out)
}

/// Width and height in pixels of the preview of a volume of `dims` and `spacing`.
pub fn preview_size(dims: [usize; 3], spacing: [f32; 3]) -> Result<(usize, usize)> {
    voxel_count(dims, "preview: volume")?;
    let [nx, ny, nz] = axis_pixels(dims, spacing)?;
    let w = nx + PANEL_GAP + nx + PANEL_GAP + ny;
    let h = ny.max(nz);
    if w > MAX_SIDE {
        return Err(Error::InvalidArgument(format!(
            "preview: image would be {w} pixels wide (dims {dims:?}); the limit is {MAX_SIDE}"
        )));
    }
    Ok((w, h))
}

/// The `q`-quantile (nearest rank) of `v`, reordering it; `v` must be non-empty.
fn quantile(v: &mut [f32], q: f64) -> f32 {
    let k = ((v.len() - 1) as f64 * q).round() as usize;
    *v.select_nth_unstable_by(k, |a, b| a.total_cmp(b)).1
}

/// Nearest-neighbour source index of output pixel `j` of `out` pixels over `n` voxels.
fn nearest(j: usize, out: usize, n: usize) -> usize {
    (((j as f64 + 0.5) * n as f64 / out as f64) as usize).min(n - 1)
}

/// Renders the preview as RGB8 rows (`preview_size` wide and high).
pub fn render_preview(
    t1: &[f32],
    labels: &[u8],
    dims: [usize; 3],
    spacing: [f32; 3],
) -> Result<(usize, usize, Vec<u8>)> {
    let n = voxel_count(dims, "preview: volume")?;
    if t1.len() != n || labels.len() != n {
        return Err(Error::Shape(format!(
            "preview: T1 has {} and labels {} voxels but dims {dims:?} give {n}",
            t1.len(),
            labels.len()
        )));
    }
    let (w, h) = preview_size(dims, spacing)?;
    let [nx, ny, nz] = axis_pixels(dims, spacing)?;

    let mut fg: Vec<f32> = t1
        .iter()
        .copied()
        .filter(|v| v.is_finite() && *v != 0.0)
        .collect();
    let (lo, hi) = if fg.is_empty() {
        (0.0, 1.0)
    } else {
        let p1 = quantile(&mut fg, 0.01);
        let p99 = quantile(&mut fg, 0.99);
        let lo = p1.min(0.0);
        (lo, if p99 > lo { p99 } else { lo + 1.0 })
    };
    drop(fg);
    let grey = |v: f32| -> u8 {
        if !v.is_finite() || v == 0.0 {
            0
        } else {
            (((v - lo) / (hi - lo)).clamp(0.0, 1.0) * 255.0).round() as u8
        }
    };

    let mut img = vec![0u8; w * h * 3];
    let (cx, cy, cz) = (dims[0] / 2, dims[1] / 2, dims[2] / 2);
    // Each panel: left column, width, height, and the voxel at (column, row-from-top).
    type Panel<'a> = (usize, usize, usize, Box<dyn Fn(usize, usize) -> usize + 'a>);
    let panels: [Panel; 3] = [
        (
            0,
            nx,
            ny,
            Box::new(|i, j| {
                let x = nearest(i, nx, dims[0]);
                let y = dims[1] - 1 - nearest(j, ny, dims[1]);
                voxel_index(dims, x, y, cz)
            }),
        ),
        (
            nx + PANEL_GAP,
            nx,
            nz,
            Box::new(|i, j| {
                let x = nearest(i, nx, dims[0]);
                let z = dims[2] - 1 - nearest(j, nz, dims[2]);
                voxel_index(dims, x, cy, z)
            }),
        ),
        (
            2 * (nx + PANEL_GAP),
            ny,
            nz,
            Box::new(|i, j| {
                let y = nearest(i, ny, dims[1]);
                let z = dims[2] - 1 - nearest(j, nz, dims[2]);
                voxel_index(dims, cx, y, z)
            }),
        ),
    ];
    for (left, pw, ph, voxel) in &panels {
        for j in 0..*ph {
            for i in 0..*pw {
                let v = voxel(i, j);
                let px = overlay_pixel(grey(t1[v]), labels[v]);
                let o = (j * w + left + i) * 3;
                img[o..o + 3].copy_from_slice(&px);
            }
        }
    }
    Ok((w, h, img))
}

/// Writes the preview PNG (RGB8, see the module docs) to `path` atomically: `<path>.tmp`
/// in the same folder, fsync, rename; on failure `path` is untouched.
pub fn write_preview(
    path: &Path,
    t1: &[f32],
    labels: &[u8],
    dims: [usize; 3],
    spacing: [f32; 3],
) -> Result<()> {
    let (w, h, rgb) = render_preview(t1, labels, dims, spacing)?;
    let png_err = |e: png::EncodingError| Error::Io {
        path: path.display().to_string(),
        source: std::io::Error::other(format!("PNG encoding failed: {e}")),
    };
    let mut bytes = Vec::new();
    {
        // Sizes are at most MAX_SIDE, so they fit u32.
        let mut enc = png::Encoder::new(&mut bytes, w as u32, h as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().map_err(png_err)?;
        writer.write_image_data(&rgb).map_err(png_err)?;
        writer.finish().map_err(png_err)?;
    }
    let tmp = tmp_path(path);
    let io = |p: &Path| {
        let p = p.display().to_string();
        move |source| Error::Io { path: p, source }
    };
    let result = (|| -> Result<()> {
        let mut file = File::create(&tmp).map_err(io(&tmp))?;
        file.write_all(&bytes).map_err(io(&tmp))?;
        file.sync_all().map_err(io(&tmp))?;
        drop(file);
        std::fs::rename(&tmp, path).map_err(io(path))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// `<path>.tmp`.
fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}
