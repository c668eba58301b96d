//! Medical-image IO: the embedded brain, round trips through every format, hand-crafted
//! headers (all datatypes, scaling, qform, NIfTI-2, Analyze, big-endian), every
//! malformed-input error (each naming the file and the problem), label maps, dataset
//! discovery and atomic writes. CPU only; synthetic files live in a temp folder.

use masnet_wgpu::data::volume::{
    self, check_pair, discover, embedded_dir, load_embedded, read, read_channels, write_4d_like,
    write_like, DataType, LabelMap, Volume,
};
use nifti::{NiftiObject, ReaderOptions};
use std::fmt::Debug;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// A fresh folder under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "masnet-volume-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The error message of a call expected to fail.
fn err_of<T: Debug>(r: masnet_wgpu::Result<T>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.to_string(),
    }
}

/// Asserts the message names `path` and contains every word (case-insensitive).
fn assert_names(msg: &str, path: &Path, words: &[&str]) {
    let p = path.display().to_string();
    assert!(msg.contains(&p), "message does not name {p}: {msg}");
    for w in words {
        assert!(
            msg.to_lowercase().contains(&w.to_lowercase()),
            "message lacks {w:?}: {msg}"
        );
    }
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// Deterministic pseudo-random bytes.
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 33) as u8
        })
        .collect()
}

/// A NIfTI-1 / Analyze header written field by field from the specification's offsets
/// (independent of the reader under test).
#[derive(Clone)]
struct Hdr {
    dim: [i16; 8],
    datatype: i16,
    bitpix: i16,
    pixdim: [f32; 8],
    vox_offset: f32,
    slope: f32,
    inter: f32,
    xyzt_units: u8,
    qform_code: i16,
    sform_code: i16,
    quatern: [f32; 6],
    srow: [[f32; 4]; 3],
    magic: [u8; 4],
    big: bool,
    /// Analyze `orient` + `originator` bytes at 252..263 (overlap qform/sform in NIfTI).
    analyze_junk: bool,
}

impl Hdr {
    /// 3-D (or more) f32 single-file NIfTI-1, 2 mm voxels, sform with a translation.
    fn new(dims: &[i16]) -> Hdr {
        let mut dim = [1i16; 8];
        dim[0] = dims.len() as i16;
        dim[1..=dims.len()].copy_from_slice(dims);
        Hdr {
            dim,
            datatype: 16,
            bitpix: 32,
            pixdim: [1.0, 2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0],
            vox_offset: 352.0,
            slope: 0.0,
            inter: 0.0,
            xyzt_units: 2,
            qform_code: 0,
            sform_code: 1,
            quatern: [0.0; 6],
            srow: [
                [2.0, 0.0, 0.0, -10.0],
                [0.0, 2.0, 0.0, -20.0],
                [0.0, 0.0, 2.0, -30.0],
            ],
            magic: *b"n+1\0",
            big: false,
            analyze_junk: false,
        }
    }
    fn analyze(dims: &[i16], datatype: i16, bitpix: i16, pixdim: [f32; 3]) -> Hdr {
        let mut h = Hdr::new(dims);
        h.datatype = datatype;
        h.bitpix = bitpix;
        h.pixdim = [0.0, pixdim[0], pixdim[1], pixdim[2], 0.0, 0.0, 0.0, 0.0];
        h.vox_offset = 0.0;
        h.magic = [0; 4];
        h.analyze_junk = true;
        h.xyzt_units = 0;
        h
    }
    fn bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; 348];
        let big = self.big;
        let mut put = |off: usize, v: &[u8]| b[off..off + v.len()].copy_from_slice(v);
        let i16b = |v: i16| {
            if big {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            }
        };
        let i32b = |v: i32| {
            if big {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            }
        };
        let f32b = |v: f32| {
            if big {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            }
        };
        put(0, &i32b(348));
        put(38, b"r");
        for i in 0..8 {
            put(40 + 2 * i, &i16b(self.dim[i]));
            put(76 + 4 * i, &f32b(self.pixdim[i]));
        }
        put(70, &i16b(self.datatype));
        put(72, &i16b(self.bitpix));
        put(108, &f32b(self.vox_offset));
        put(112, &f32b(self.slope));
        put(116, &f32b(self.inter));
        put(123, &[self.xyzt_units]);
        put(148, b"crafted by tests/volume.rs");
        if self.analyze_junk {
            put(252, b"\x01SPMorigin");
        } else {
            put(252, &i16b(self.qform_code));
            put(254, &i16b(self.sform_code));
            for i in 0..6 {
                put(256 + 4 * i, &f32b(self.quatern[i]));
            }
            for r in 0..3 {
                for c in 0..4 {
                    put(280 + 16 * r + 4 * c, &f32b(self.srow[r][c]));
                }
            }
        }
        put(344, &self.magic);
        b
    }
    /// A single `.nii` file: header, 4 extension bytes, data.
    fn nii(&self, data: &[u8]) -> Vec<u8> {
        let mut v = self.bytes();
        v.extend_from_slice(&[0; 4]);
        v.extend_from_slice(data);
        v
    }
}

/// Encodes values as the given NIfTI datatype.
fn encode(code: i16, values: &[f64], big: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for &v in values {
        macro_rules! e {
            ($t:ty) => {{
                let x = v as $t;
                out.extend_from_slice(&if big {
                    x.to_be_bytes()
                } else {
                    x.to_le_bytes()
                })
            }};
        }
        match code {
            2 => e!(u8),
            256 => e!(i8),
            4 => e!(i16),
            512 => e!(u16),
            8 => e!(i32),
            768 => e!(u32),
            16 => e!(f32),
            64 => e!(f64),
            _ => panic!("no encoder for {code}"),
        }
    }
    out
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn ramp(n: usize) -> Vec<f32> {
    (0..n).map(|i| i as f32 * 0.25 - 3.0).collect()
}

fn assert_same_geometry(a: &Volume, b: &Volume) {
    assert_eq!(a.dims, b.dims);
    assert_eq!(a.spacing, b.spacing);
    for r in 0..4 {
        for c in 0..4 {
            assert!(
                (a.affine[r][c] - b.affine[r][c]).abs() < 1e-9,
                "affine[{r}][{c}]: {} vs {}",
                a.affine[r][c],
                b.affine[r][c]
            );
        }
    }
}

const MNI_AFFINE: [[f64; 4]; 4] = [
    [2.0, 0.0, 0.0, -96.5],
    [0.0, 2.0, 0.0, -132.5],
    [0.0, 0.0, 2.0, -78.5],
    [0.0, 0.0, 0.0, 1.0],
];

// ---------------------------------------------------------------------------------------
// The embedded brain
// ---------------------------------------------------------------------------------------

#[test]
fn embedded_brain_matches_its_readme() {
    let b = load_embedded().unwrap();
    for v in [&b.t1, &b.t2, &b.mask] {
        assert_eq!(v.dims, [97, 115, 97]);
        assert_eq!(v.spacing, [2.0, 2.0, 2.0]);
        assert_eq!(v.affine, MNI_AFFINE);
        assert_eq!(v.data.len(), 97 * 115 * 97);
        assert_eq!(v.format(), "NIfTI-1");
    }
    let mut counts = [0usize; 4];
    for &l in &b.labels {
        counts[l as usize] += 1;
    }
    assert_eq!(counts, [846195, 16022, 131243, 88575]);
    for (i, ((&t1, &t2), &m)) in
        b.t1.data
            .iter()
            .zip(&b.t2.data)
            .zip(&b.mask.data)
            .enumerate()
    {
        assert!(
            (0.0..=1.0).contains(&t1) && (0.0..=1.0).contains(&t2),
            "voxel {i}"
        );
        assert!(m == 0.0 || m == 1.0, "mask not binary at {i}: {m}");
        if m == 0.0 {
            assert_eq!(
                (t1, t2, b.labels[i]),
                (0.0, 0.0, 0),
                "outside the mask at {i}"
            );
        }
    }
    // Class means (tissue contrast: the scaling 1/255 was applied). GM and WM are the
    // README's values; for CSF the README says T1 0.41 / T2 0.75, but the shipped files
    // give 0.381 / 0.656 (checked independently with Python), so those are used here.
    let expect = [(0.381, 0.656), (0.71, 0.57), (0.91, 0.43)];
    for (c, (e1, e2)) in expect.iter().enumerate() {
        let class = c as u8 + 1;
        let (mut s1, mut s2, mut n) = (0.0f64, 0.0f64, 0usize);
        for i in 0..b.labels.len() {
            if b.labels[i] == class {
                s1 += b.t1.data[i] as f64;
                s2 += b.t2.data[i] as f64;
                n += 1;
            }
        }
        let (m1, m2) = (s1 / n as f64, s2 / n as f64);
        assert!((m1 - e1).abs() < 0.02, "class {class} T1 mean {m1} vs {e1}");
        assert!((m2 - e2).abs() < 0.02, "class {class} T2 mean {m2} vs {e2}");
    }
    // The raw T1 is the full head: brighter than zero outside the brain too.
    let raw = read(&embedded_dir().join("T1w.nii.gz")).unwrap();
    let outside = raw
        .data
        .iter()
        .zip(&b.mask.data)
        .filter(|(&v, &m)| m == 0.0 && v > 0.1)
        .count();
    assert!(
        outside > 10_000,
        "raw T1 has only {outside} bright voxels outside the brain"
    );
}

#[test]
fn embedded_brain_agrees_with_the_nifti_crate() {
    for name in ["T1w", "labels"] {
        let path = embedded_dir().join(format!("{name}.nii.gz"));
        let ours = read(&path).unwrap();
        let obj = ReaderOptions::new().read_file(&path).unwrap();
        let h = obj.header().clone();
        assert_eq!(&h.dim[..4], &[3, 97, 115, 97]);
        let slope = if h.scl_slope == 0.0 { 1.0 } else { h.scl_slope };
        let raw: Vec<u8> = obj.into_volume().into_nifti_typed_data().unwrap();
        assert_eq!(raw.len(), ours.data.len());
        for (i, (&r, &v)) in raw.iter().zip(&ours.data).enumerate() {
            let want = (r as f64 * slope as f64 + h.scl_inter as f64) as f32;
            assert_eq!(v, want, "{name} voxel {i}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Round trips
// ---------------------------------------------------------------------------------------

#[test]
fn round_trip_nii_and_nii_gz() {
    let dir = TempDir::new("roundtrip");
    let b = load_embedded().unwrap();
    let label_values: Vec<f32> = b.labels.iter().map(|&c| c as f32).collect();
    for ext in ["nii", "nii.gz"] {
        let img = dir.join(&format!("t1.{ext}"));
        write_like(&img, &b.t1, &b.t1.data, DataType::F32).unwrap();
        let back = read(&img).unwrap();
        assert_same_geometry(&back, &b.t1);
        assert_eq!(back.affine, MNI_AFFINE);
        assert_eq!(back.data, b.t1.data, "{ext}: f32 data");

        let lab = dir.join(&format!("labels.{ext}"));
        write_like(&lab, &b.t1, &label_values, DataType::U8).unwrap();
        let back = read(&lab).unwrap();
        assert_same_geometry(&back, &b.t1);
        assert_eq!(
            LabelMap::identity(4).unwrap().to_classes(&back).unwrap(),
            b.labels
        );

        // An independent reader sees the same header and data.
        let obj = ReaderOptions::new().read_file(&img).unwrap();
        let h = obj.header();
        assert_eq!(&h.dim[..5], &[3, 97, 115, 97, 1]);
        assert_eq!((h.datatype, h.bitpix, h.sform_code), (16, 32, 2));
        assert_eq!(h.srow_x, [2.0, 0.0, 0.0, -96.5]);
        assert_eq!(h.srow_z, [0.0, 0.0, 2.0, -78.5]);
        assert_eq!(&h.magic, b"n+1\0");
        let data: Vec<f32> = obj.into_volume().into_nifti_typed_data().unwrap();
        assert_eq!(data, b.t1.data);
        let obj = ReaderOptions::new().read_file(&lab).unwrap();
        assert_eq!((obj.header().datatype, obj.header().bitpix), (2, 8));
        let data: Vec<u8> = obj.into_volume().into_nifti_typed_data().unwrap();
        assert_eq!(data, b.labels);
    }
    // Writing the scaled uint8 T1 as f32 must not keep the reference's 1/255 slope.
    let back = read(&dir.join("t1.nii")).unwrap();
    assert!(back.data.iter().all(|v| (0.0..=1.0).contains(v)));
    assert_eq!(
        dir.names(),
        ["labels.nii", "labels.nii.gz", "t1.nii", "t1.nii.gz"],
        "no temporary files left"
    );
    // The gzipped file really is compressed.
    let gz = std::fs::metadata(dir.join("labels.nii.gz")).unwrap().len();
    assert!(gz < 200_000, "labels.nii.gz is {gz} bytes");
}

#[test]
fn analyze_pair_reads_and_round_trips() {
    let dir = TempDir::new("analyze");
    let dims = [5i16, 4, 3];
    let n = 60;
    let values: Vec<f64> = (0..n).map(|i| (i as f64 - 20.0) * 7.0).collect();
    for big in [false, true] {
        let mut h = Hdr::analyze(&dims, 4, 16, [1.5, 1.25, 2.0]);
        h.big = big;
        let stem = if big { "be" } else { "le" };
        let hdr = dir.join(&format!("{stem}.hdr"));
        let img = dir.join(&format!("{stem}.img"));
        std::fs::write(&hdr, h.bytes()).unwrap();
        std::fs::write(&img, encode(4, &values, big)).unwrap();
        let a = read(&hdr).unwrap();
        let b = read(&img).unwrap();
        assert_eq!(a.format(), "Analyze 7.5");
        assert_eq!(a.dims, [5, 4, 3]);
        assert_eq!(a.spacing, [1.5, 1.25, 2.0]);
        assert_eq!(
            a.affine,
            [
                [1.5, 0.0, 0.0, 0.0],
                [0.0, 1.25, 0.0, 0.0],
                [0.0, 0.0, 2.0, 0.0],
                [0.0, 0.0, 0.0, 1.0]
            ]
        );
        let want: Vec<f32> = values.iter().map(|&v| v as f32).collect();
        assert_eq!(a.data, want, "{stem}");
        assert_eq!(b.data, want);
        assert_same_geometry(&a, &b);

        // Analyze → .nii, .nii.gz, and a NIfTI-1 pair; each reads back identically.
        for out in ["out.nii", "out.nii.gz", "out.hdr"] {
            let p = dir.join(&format!("{stem}-{out}"));
            write_like(&p, &a, &a.data, DataType::F32).unwrap();
            let back = read(&p).unwrap();
            assert_same_geometry(&back, &a);
            assert_eq!(back.data, want, "{stem}-{out}");
            assert_eq!(back.format(), "NIfTI-1");
        }
        // The NIfTI-1 pair can be named by its .img too, and the nifti crate reads it.
        let back = read(&dir.join(&format!("{stem}-out.img"))).unwrap();
        assert_eq!(back.data, want);
        let obj = ReaderOptions::new()
            .read_file(dir.join(&format!("{stem}-out.hdr")))
            .unwrap();
        assert_eq!(&obj.header().magic, b"ni1\0");
        let data: Vec<f32> = obj.into_volume().into_nifti_typed_data().unwrap();
        assert_eq!(data, want);
    }
    // Writing a pair by its .img name creates both files; u8 labels too.
    let a = read(&dir.join("le.hdr")).unwrap();
    let labels: Vec<f32> = (0..n).map(|i| (i % 4) as f32).collect();
    let p = dir.join("lab.img");
    write_like(&p, &a, &labels, DataType::U8).unwrap();
    assert!(dir.join("lab.hdr").is_file());
    assert_eq!(read(&dir.join("lab.hdr")).unwrap().data, labels);
    // Upper-case names keep their case; a gzipped image next to a plain header reads.
    write_like(&dir.join("UP.HDR"), &a, &labels, DataType::U8).unwrap();
    assert!(dir.join("UP.IMG").is_file());
    assert_eq!(read(&dir.join("UP.IMG")).unwrap().data, labels);
    let h = Hdr::analyze(&dims, 4, 16, [1.5, 1.25, 2.0]);
    std::fs::write(dir.join("zipped.hdr"), h.bytes()).unwrap();
    std::fs::write(dir.join("zipped.img.gz"), gzip(&encode(4, &values, false))).unwrap();
    let z = read(&dir.join("zipped.img.gz")).unwrap();
    assert_eq!(z.data, read(&dir.join("zipped.hdr")).unwrap().data);
    assert_eq!(z.data, a.data);
    assert!(dir.names().iter().all(|n| !n.ends_with(".tmp")));
}

#[test]
fn nifti2_single_file() {
    let dir = TempDir::new("nifti2");
    let mut b = vec![0u8; 544];
    let mut put = |off: usize, v: &[u8]| b[off..off + v.len()].copy_from_slice(v);
    put(0, &540i32.to_le_bytes());
    put(4, b"n+2\0\r\n\x1a\n");
    put(12, &64i16.to_le_bytes()); // float64
    put(14, &64i16.to_le_bytes());
    let dim: [i64; 8] = [3, 3, 2, 2, 1, 1, 1, 1];
    let pixdim: [f64; 8] = [1.0, 0.5, 0.75, 1.5, 1.0, 1.0, 1.0, 1.0];
    for i in 0..8 {
        put(16 + 8 * i, &dim[i].to_le_bytes());
        put(104 + 8 * i, &pixdim[i].to_le_bytes());
    }
    put(168, &544i64.to_le_bytes());
    put(176, &2.0f64.to_le_bytes()); // slope
    put(184, &1.0f64.to_le_bytes()); // intercept
    put(348, &1i32.to_le_bytes()); // sform_code
    let srow = [
        [0.5, 0.0, 0.0, 1.0],
        [0.0, 0.75, 0.0, 2.0],
        [0.0, 0.0, 1.5, 3.0f64],
    ];
    for (r, row) in srow.iter().enumerate() {
        for (c, v) in row.iter().enumerate() {
            put(400 + 32 * r + 8 * c, &v.to_le_bytes());
        }
    }
    put(500, &2i32.to_le_bytes()); // mm
    let values: Vec<f64> = (0..12).map(|i| i as f64 * 0.5).collect();
    b.extend(encode(64, &values, false));
    let p = dir.join("two.nii");
    std::fs::write(&p, &b).unwrap();
    let v = read(&p).unwrap();
    assert_eq!(v.format(), "NIfTI-2");
    assert_eq!(v.dims, [3, 2, 2]);
    assert_eq!(v.spacing, [0.5, 0.75, 1.5]);
    assert_eq!(&v.affine[..3], &srow);
    let want: Vec<f32> = values.iter().map(|x| (x * 2.0 + 1.0) as f32).collect();
    assert_eq!(v.data, want);
    // Written back as NIfTI-1 with the same geometry.
    let out = dir.join("one.nii.gz");
    write_like(&out, &v, &v.data, DataType::F32).unwrap();
    let back = read(&out).unwrap();
    assert_eq!(back.format(), "NIfTI-1");
    assert_same_geometry(&back, &v);
    assert_eq!(back.data, want);
}

// ---------------------------------------------------------------------------------------
// Datatypes, scaling, orientation
// ---------------------------------------------------------------------------------------

#[test]
fn every_datatype_with_and_without_scaling() {
    let dir = TempDir::new("dtypes");
    let types: [(i16, i16, Vec<f64>); 8] = [
        (2, 8, vec![0.0, 1.0, 7.0, 128.0, 255.0, 3.0]),
        (256, 8, vec![-128.0, -1.0, 0.0, 5.0, 127.0, 3.0]),
        (4, 16, vec![-32768.0, -5.0, 0.0, 300.0, 32767.0, 3.0]),
        (512, 16, vec![0.0, 1.0, 40000.0, 65535.0, 2.0, 3.0]),
        (
            8,
            32,
            vec![-2147483648.0, -7.0, 0.0, 1e6, 2147483647.0, 3.0],
        ),
        (768, 32, vec![0.0, 1.0, 3e9, 4294967295.0, 2.0, 3.0]),
        (16, 32, vec![-1.5, 0.0, 0.25, 1e30, -1e-30, 3.0]),
        (64, 64, vec![-1.5, 0.0, 0.125, 1e38, -1e-300, 3.0]),
    ];
    for (code, bitpix, values) in &types {
        for big in [false, true] {
            for (slope, inter) in [(0.0f32, 5.0f32), (0.5, -3.0), (1.0, 0.0)] {
                let mut h = Hdr::new(&[3, 2, 1]);
                h.datatype = *code;
                h.bitpix = *bitpix;
                h.slope = slope;
                h.inter = inter;
                h.big = big;
                let p = dir.join(&format!("t{code}-{big}-{slope}.nii"));
                std::fs::write(&p, h.nii(&encode(*code, values, big))).unwrap();
                let v = read(&p).unwrap();
                let (s, i) = if slope == 0.0 {
                    (1.0, 0.0) // slope 0 means no scaling; the intercept is ignored too
                } else {
                    (slope as f64, inter as f64)
                };
                let want: Vec<f32> = values.iter().map(|&x| (x * s + i) as f32).collect();
                assert_eq!(
                    v.data, want,
                    "datatype {code}, big-endian {big}, slope {slope}"
                );
            }
        }
    }
}

#[test]
fn qform_sform_and_units() {
    let dir = TempDir::new("affine");
    // 180° about z (a = 0 branch), qfac -1: affine diag(-2, -3, -4) + offset.
    let mut h = Hdr::new(&[2, 2, 2]);
    h.sform_code = 0;
    h.qform_code = 1;
    h.pixdim[..4].copy_from_slice(&[-1.0, 2.0, 3.0, 4.0]);
    h.quatern = [0.0, 0.0, 1.0, 10.0, 20.0, 30.0];
    let p = dir.join("q180.nii");
    std::fs::write(&p, h.nii(&f32_bytes(&[0.0; 8]))).unwrap();
    let v = read(&p).unwrap();
    assert_eq!(
        &v.affine[..3],
        &[
            [-2.0, 0.0, 0.0, 10.0],
            [0.0, -3.0, 0.0, 20.0],
            [0.0, 0.0, -4.0, 30.0]
        ]
    );
    assert_eq!(v.spacing, [2.0, 3.0, 4.0]);
    // 90° about z, qfac +1.
    h.pixdim[0] = 1.0;
    h.quatern = [0.0, 0.0, std::f32::consts::FRAC_1_SQRT_2, 1.0, 2.0, 3.0];
    let p = dir.join("q90.nii");
    std::fs::write(&p, h.nii(&f32_bytes(&[0.0; 8]))).unwrap();
    let v = read(&p).unwrap();
    let want = [
        [0.0, -3.0, 0.0, 1.0],
        [2.0, 0.0, 0.0, 2.0],
        [0.0, 0.0, 4.0, 3.0],
    ];
    for (got, want) in v.affine.iter().flatten().zip(want.iter().flatten()) {
        assert!((got - want).abs() < 1e-6, "{:?}", v.affine);
    }
    // sform wins over qform when both are set; written files keep both.
    h.sform_code = 2;
    let p = dir.join("both.nii");
    std::fs::write(&p, h.nii(&f32_bytes(&[0.0; 8]))).unwrap();
    let v = read(&p).unwrap();
    assert_eq!(v.affine[0], [2.0, 0.0, 0.0, -10.0]);
    let out = dir.join("both-out.nii");
    write_like(&out, &v, &v.data, DataType::F32).unwrap();
    let obj = ReaderOptions::new().read_file(&out).unwrap();
    assert_eq!((obj.header().qform_code, obj.header().sform_code), (1, 2));
    assert_eq!(obj.header().quatern_d, std::f32::consts::FRAC_1_SQRT_2);
    // Neither set: diag(pixdim), no translation.
    h.sform_code = 0;
    h.qform_code = 0;
    let p = dir.join("none.nii");
    std::fs::write(&p, h.nii(&f32_bytes(&[0.0; 8]))).unwrap();
    assert_eq!(read(&p).unwrap().affine[1], [0.0, 3.0, 0.0, 0.0]);
    // Units in metres: spacing and affine converted to mm.
    let mut h = Hdr::new(&[2, 2, 2]);
    h.xyzt_units = 1;
    h.pixdim[1..4].copy_from_slice(&[0.002, 0.002, 0.003]);
    h.srow = [
        [0.002, 0.0, 0.0, 0.1],
        [0.0, 0.002, 0.0, 0.0],
        [0.0, 0.0, 0.003, 0.0],
    ];
    let p = dir.join("metres.nii");
    std::fs::write(&p, h.nii(&f32_bytes(&[0.0; 8]))).unwrap();
    let v = read(&p).unwrap();
    for (s, want) in v.spacing.iter().zip([2.0, 2.0, 3.0]) {
        assert!((s - want).abs() < 1e-4, "{:?}", v.spacing);
    }
    assert!((v.affine[0][3] - 100.0).abs() < 1e-4 && (v.affine[2][2] - 3.0).abs() < 1e-4);
}

// ---------------------------------------------------------------------------------------
// 4-D
// ---------------------------------------------------------------------------------------

#[test]
fn four_d_images() {
    let dir = TempDir::new("fourd");
    let values = ramp(24);
    let one = dir.join("t1.nii");
    std::fs::write(&one, Hdr::new(&[4, 3, 2, 1]).nii(&f32_bytes(&values))).unwrap();
    let v = read(&one).unwrap();
    assert_eq!((v.dims, &v.data), ([4, 3, 2], &values));
    // 4-D, 1 volume, written back as 3-D.
    let out = dir.join("t1-out.nii");
    write_like(&out, &v, &v.data, DataType::F32).unwrap();
    assert_eq!(
        ReaderOptions::new().read_file(&out).unwrap().header().dim[0],
        3
    );

    let two = dir.join("t2.nii");
    let values = ramp(48);
    std::fs::write(&two, Hdr::new(&[4, 3, 2, 2]).nii(&f32_bytes(&values))).unwrap();
    let msg = err_of(read(&two));
    assert_names(&msg, &two, &["2 volumes", "4-D"]);
    let ch = read_channels(&two).unwrap();
    assert_eq!(ch.len(), 2);
    assert_eq!(ch[0].data, values[..24]);
    assert_eq!(ch[1].data, values[24..]);
    // 5-D with t = 1 is one volume; 5-D with 2 along dim 5 is not.
    let five = dir.join("five.nii");
    std::fs::write(&five, Hdr::new(&[4, 3, 2, 1, 2]).nii(&f32_bytes(&values))).unwrap();
    assert_names(&err_of(read(&five)), &five, &["2 volumes"]);
    assert_names(&err_of(read_channels(&five)), &five, &["5-D"]);
}

#[test]
fn write_4d_round_trip() {
    let dir = TempDir::new("write4d");
    let b = load_embedded().unwrap();
    let n = b.t1.num_voxels();
    let channels: Vec<Vec<f32>> = (0..3)
        .map(|c| {
            (0..n)
                .map(|i| ((i * (c + 1)) % 1000) as f32 / 1000.0)
                .collect()
        })
        .collect();
    let p = dir.join("probs.nii.gz");
    write_4d_like(&p, &b.t1, &channels).unwrap();
    let back = read_channels(&p).unwrap();
    assert_eq!(back.len(), 3);
    for (c, v) in back.iter().enumerate() {
        assert_same_geometry(v, &b.t1);
        assert_eq!(v.data, channels[c], "channel {c}");
    }
    assert_names(&err_of(read(&p)), &p, &["3 volumes"]);
    let obj = ReaderOptions::new().read_file(&p).unwrap();
    assert_eq!(&obj.header().dim[..6], &[4, 97, 115, 97, 3, 1]);
    // A channel of the wrong length is refused before anything is written.
    let bad = vec![channels[0].clone(), vec![0.0; 10]];
    let q = dir.join("bad.nii");
    assert_names(
        &err_of(write_4d_like(&q, &b.t1, &bad)),
        &q,
        &["channel 1", "10 values"],
    );
    assert!(!q.exists());
    assert_eq!(dir.names(), ["probs.nii.gz"]);
}

// ---------------------------------------------------------------------------------------
// Malformed input
// ---------------------------------------------------------------------------------------

#[test]
fn missing_files() {
    let dir = TempDir::new("missing");
    for name in ["nope.nii", "nope.nii.gz", "nope.hdr", "nope.img"] {
        let p = dir.join(name);
        let msg = err_of(read(&p));
        assert_names(&msg, &p, &[]);
        assert!(
            msg.contains("No such file") || msg.contains("no such file"),
            "{msg}"
        );
    }
    // A header without its image, and the reverse.
    let h = dir.join("lonely.hdr");
    std::fs::write(&h, Hdr::analyze(&[2, 2, 2], 2, 8, [1.0; 3]).bytes()).unwrap();
    assert_names(&err_of(read(&h)), &h, &["no matching image"]);
    let i = dir.join("alone.img");
    std::fs::write(&i, [0u8; 8]).unwrap();
    assert_names(&err_of(read(&i)), &i, &["no matching header"]);
    let t = dir.join("notes.txt");
    std::fs::write(&t, "x").unwrap();
    assert_names(&err_of(read(&t)), &t, &["unrecognised"]);
    assert_names(
        &err_of(read(&dir.0.join("x.nii"))),
        &dir.0.join("x.nii"),
        &[],
    );
}

#[test]
fn truncated_files() {
    let dir = TempDir::new("truncated");
    // The embedded T1 cut in half.
    let full = std::fs::read(embedded_dir().join("T1w.nii.gz")).unwrap();
    let p = dir.join("half.nii.gz");
    std::fs::write(&p, &full[..full.len() / 2]).unwrap();
    assert_names(&err_of(read(&p)), &p, &["truncated"]);
    // One byte changed inside the deflate data: caught by the stream or its CRC.
    let mut flipped = std::fs::read(embedded_dir().join("labels.nii.gz")).unwrap();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x10;
    let p = dir.join("flipped.nii.gz");
    std::fs::write(&p, &flipped).unwrap();
    let msg = err_of(read(&p));
    assert_names(&msg, &p, &["corrupt"]);
    // Only the 8-byte gzip trailer (CRC, length) missing: the voxels are all there, but
    // the file is still refused.
    let full_labels = std::fs::read(embedded_dir().join("labels.nii.gz")).unwrap();
    let p = dir.join("no-trailer.nii.gz");
    std::fs::write(&p, &full_labels[..full_labels.len() - 8]).unwrap();
    assert_names(&err_of(read(&p)), &p, &["truncated"]);
    // Cut inside the gzip header / the NIfTI header.
    let p = dir.join("tiny.nii.gz");
    std::fs::write(&p, &full[..40]).unwrap();
    assert_names(&err_of(read(&p)), &p, &["truncated"]);
    let p = dir.join("short.nii");
    std::fs::write(&p, &Hdr::new(&[2, 2, 2]).bytes()[..100]).unwrap();
    assert_names(&err_of(read(&p)), &p, &["truncated", "too short"]);
    // Header dims larger than the data (plain and gzipped, single file and pair).
    let h = Hdr::new(&[4, 5, 6]);
    let data = f32_bytes(&ramp(60)); // half of 120
    let p = dir.join("dims.nii");
    std::fs::write(&p, h.nii(&data)).unwrap();
    assert_names(
        &err_of(read(&p)),
        &p,
        &["truncated", "4x5x6 float32", "only"],
    );
    let p = dir.join("dims.nii.gz");
    std::fs::write(&p, gzip(&h.nii(&data))).unwrap();
    assert_names(&err_of(read(&p)), &p, &["truncated", "4x5x6 float32"]);
    let a = Hdr::analyze(&[4, 5, 6], 16, 32, [1.0; 3]);
    std::fs::write(dir.join("pair.hdr"), a.bytes()).unwrap();
    let img = dir.join("pair.img");
    std::fs::write(&img, &data).unwrap();
    assert_names(&err_of(read(&dir.join("pair.hdr"))), &img, &["truncated"]);
}

#[test]
fn absurd_dims_fail_fast_without_allocating() {
    let dir = TempDir::new("absurd");
    let mut h = Hdr::new(&[10000, 10000, 10000]); // 10^12 voxels
    h.datatype = 2;
    h.bitpix = 8;
    let cases = [
        ("huge.nii", h.nii(&[0; 16])),
        ("huge.nii.gz", gzip(&h.nii(&[0; 16]))),
    ];
    for (name, bytes) in cases {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        let t = Instant::now();
        let msg = err_of(read(&p));
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "took {:?}",
            t.elapsed()
        );
        assert_names(&msg, &p, &["1000000000000 voxels", "limit"]);
    }
    // Under the voxel cap (10^9) but far beyond what the file can hold.
    let h = {
        let mut h = Hdr::new(&[1000, 1000, 1000]);
        h.datatype = 2;
        h.bitpix = 8;
        h
    };
    let p = dir.join("big.nii");
    std::fs::write(&p, h.nii(&[0; 16])).unwrap();
    let t = Instant::now();
    assert_names(
        &err_of(read(&p)),
        &p,
        &["truncated", "1000x1000x1000", "only 368 bytes"],
    );
    let p = dir.join("big.nii.gz");
    std::fs::write(&p, gzip(&h.nii(&[0; 16]))).unwrap();
    assert_names(&err_of(read(&p)), &p, &["truncated", "gzip file can hold"]);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t.elapsed()
    );
}

#[test]
fn random_bytes_and_bad_headers() {
    let dir = TempDir::new("garbage");
    let p = dir.join("noise.nii");
    std::fs::write(&p, noise(5000, 1)).unwrap();
    assert_names(&err_of(read(&p)), &p, &["not a NIfTI"]);
    let p = dir.join("noise.nii.gz");
    std::fs::write(&p, noise(5000, 2)).unwrap();
    assert_names(&err_of(read(&p)), &p, &["gzip"]);
    let p = dir.join("noise.hdr");
    std::fs::write(&p, noise(348, 3)).unwrap();
    std::fs::write(dir.join("noise.img"), noise(100, 4)).unwrap();
    assert_names(&err_of(read(&p)), &p, &["not a NIfTI"]);
    // Gzipped noise: valid gzip, garbage inside.
    let p = dir.join("gznoise.nii.gz");
    std::fs::write(&p, gzip(&noise(5000, 5))).unwrap();
    assert_names(&err_of(read(&p)), &p, &["not a NIfTI"]);

    let write = |name: &str, h: &Hdr, data: &[u8]| {
        let p = dir.join(name);
        std::fs::write(&p, h.nii(data)).unwrap();
        p
    };
    let data = f32_bytes(&ramp(24));
    let mut h = Hdr::new(&[4, 3, 2]);
    h.dim[2] = 0;
    let p = write("zero.nii", &h, &data);
    assert_names(&err_of(read(&p)), &p, &["dimension 2 is 0", "positive"]);
    h.dim[2] = -3;
    let p = write("negative.nii", &h, &data);
    assert_names(&err_of(read(&p)), &p, &["dimension 2 is -3", "positive"]);
    let mut h = Hdr::new(&[4, 3, 2]);
    h.dim[0] = 0;
    let p = write("dim0.nii", &h, &data);
    assert_names(&err_of(read(&p)), &p, &["dim[0]"]);
    let mut h = Hdr::new(&[4, 3, 2]);
    h.pixdim[2] = f32::NAN;
    let p = write("pixdim.nii", &h, &data);
    assert_names(&err_of(read(&p)), &p, &["voxel size", "pixdim[2]"]);
    let mut h = Hdr::new(&[4, 3, 2]);
    h.vox_offset = 100.0;
    let p = write("offset.nii", &h, &data);
    assert_names(&err_of(read(&p)), &p, &["vox_offset"]);
    for (code, name) in [
        (32i16, "complex64"),
        (128, "rgb24"),
        (1024, "int64"),
        (7, ""),
    ] {
        let mut h = Hdr::new(&[4, 3, 2]);
        h.datatype = code;
        let p = write(&format!("dtype{code}.nii"), &h, &[0; 24 * 16]);
        assert_names(
            &err_of(read(&p)),
            &p,
            &["unsupported datatype", &code.to_string(), name],
        );
    }
    // Analyze header (no magic) in a .nii, NIfTI n+1 header in a .hdr.
    let a = Hdr::analyze(&[4, 3, 2], 16, 32, [1.0; 3]);
    let p = dir.join("analyze.nii");
    std::fs::write(&p, a.bytes()).unwrap();
    assert_names(&err_of(read(&p)), &p, &["separate .img"]);
    let p = dir.join("single.hdr");
    std::fs::write(&p, Hdr::new(&[4, 3, 2]).nii(&data)).unwrap();
    std::fs::write(dir.join("single.img"), &data).unwrap();
    assert_names(&err_of(read(&p)), &p, &["rename it to .nii"]);
}

#[test]
fn non_finite_voxels_are_refused() {
    let dir = TempDir::new("nan");
    let mut values = ramp(24);
    values[1 + 4 * (2 + 3)] = f32::NAN; // (1, 2, 1) in 4x3x2... index = 1 + 4*(2 + 3*1)
    let p = dir.join("nan.nii.gz");
    std::fs::write(&p, gzip(&Hdr::new(&[4, 3, 2]).nii(&f32_bytes(&values)))).unwrap();
    assert_names(&err_of(read(&p)), &p, &["1 non-finite", "(1, 2, 1)"]);
    values[0] = f32::INFINITY;
    values[5] = f32::NEG_INFINITY;
    let p = dir.join("inf.nii");
    std::fs::write(&p, Hdr::new(&[4, 3, 2]).nii(&f32_bytes(&values))).unwrap();
    assert_names(&err_of(read(&p)), &p, &["3 non-finite", "(0, 0, 0)"]);
    // Finite float64 that overflows float32 after scaling.
    let mut h = Hdr::new(&[2, 1, 1]);
    h.datatype = 64;
    h.bitpix = 64;
    let p = dir.join("overflow.nii");
    std::fs::write(&p, h.nii(&encode(64, &[1.0, 1e300], false))).unwrap();
    assert_names(&err_of(read(&p)), &p, &["1 non-finite", "(1, 0, 0)"]);
}

// ---------------------------------------------------------------------------------------
// Pairs and label maps
// ---------------------------------------------------------------------------------------

#[test]
fn check_pair_names_both_files() {
    let eye = |t: f64| {
        [
            [1.0, 0.0, 0.0, t],
            [0.0, 1.0, 0.0, 0.0],
            [0.0, 0.0, 1.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    };
    let a = Volume::new([4, 5, 6], [1.0; 3], eye(0.0), vec![0.0; 120]).unwrap();
    let b = Volume::new([4, 5, 7], [1.0; 3], eye(0.0), vec![0.0; 140]).unwrap();
    let (pa, pb) = (
        Path::new("data/sub-1-T1.nii"),
        Path::new("data/sub-1-T2.hdr"),
    );
    let msg = err_of(check_pair(&a, pa, &b, pb));
    assert_names(&msg, pa, &["4x5x6", "4x5x7"]);
    assert_names(&msg, pb, &[]);
    let c = Volume::new([4, 5, 6], [1.0; 3], eye(0.5), vec![0.0; 120]).unwrap();
    let msg = err_of(check_pair(&a, pa, &c, pb));
    assert_names(&msg, pa, &["affine", "0.5", "[0][3]"]);
    assert_names(&msg, pb, &[]);
    let d = Volume::new([4, 5, 6], [1.0; 3], eye(5e-5), vec![0.0; 120]).unwrap();
    check_pair(&a, pa, &d, pb).unwrap();
    // The embedded images share a grid.
    let t1 = embedded_dir().join("T1w.nii.gz");
    let t2 = embedded_dir().join("T2w.nii.gz");
    check_pair(&read(&t1).unwrap(), &t1, &read(&t2).unwrap(), &t2).unwrap();
}

#[test]
fn label_maps() {
    let m = LabelMap::parse("0, 10,150 ,250").unwrap();
    assert_eq!(m.values(), &[0.0, 10.0, 150.0, 250.0]);
    assert_eq!(m.len(), 4);
    assert_eq!(m.to_string(), "0,10,150,250");
    assert_eq!("0,10,150,250".parse::<LabelMap>().unwrap(), m);
    assert_eq!(
        LabelMap::identity(4).unwrap().values(),
        &[0.0, 1.0, 2.0, 3.0]
    );
    for bad in ["", "0,a", "1,1", "0,nan", "0,,2"] {
        assert!(LabelMap::parse(bad).is_err(), "{bad:?} accepted");
    }
    assert!(LabelMap::identity(0).is_err() && LabelMap::identity(257).is_err());

    let dir = TempDir::new("labels");
    let reference = Volume::new([4, 3, 2], [1.0; 3], MNI_AFFINE, vec![0.0; 24]).unwrap();
    let classes: Vec<u8> = (0..24).map(|i| (i % 4) as u8).collect();
    let values = m.from_classes(&classes).unwrap();
    let p = dir.join("label.nii.gz");
    write_like(&p, &reference, &values, DataType::U8).unwrap();
    let v = read(&p).unwrap();
    assert_eq!(m.to_classes(&v).unwrap(), classes);
    assert!(m
        .from_classes(&[0, 4])
        .unwrap_err()
        .to_string()
        .contains("class 4"));

    // A value not in the map: the error names the file, the value and a voxel.
    let mut values = values;
    values[6] = 7.0; // voxel (2, 1, 0): 2 + 4 * 1
    values[20] = 7.0;
    let p = dir.join("odd-label.nii");
    write_like(&p, &reference, &values, DataType::U8).unwrap();
    let v = read(&p).unwrap();
    let msg = err_of(m.to_classes(&v));
    assert_names(
        &msg,
        &p,
        &["label value 7", "(2, 1, 0)", "2 voxels", "0,10,150,250"],
    );
}

// ---------------------------------------------------------------------------------------
// Atomic writes
// ---------------------------------------------------------------------------------------

#[test]
fn writes_are_atomic_and_validated() {
    let dir = TempDir::new("atomic");
    let v = Volume::new([4, 3, 2], [1.0; 3], MNI_AFFINE, ramp(24)).unwrap();
    let p = dir.join("out.nii.gz");
    write_like(&p, &v, &v.data, DataType::F32).unwrap();
    assert_eq!(dir.names(), ["out.nii.gz"]);
    let before = std::fs::read(&p).unwrap();

    // Failed writes leave the existing file as it was and no temporary behind.
    let mut nan = v.data.clone();
    nan[3] = f32::NAN;
    assert_names(
        &err_of(write_like(&p, &v, &nan, DataType::F32)),
        &p,
        &["value NaN", "(3, 0, 0)", "finite"],
    );
    let mut big = vec![1.0; 24];
    big[13] = 300.0;
    assert_names(
        &err_of(write_like(&p, &v, &big, DataType::U8)),
        &p,
        &["300", "0..=255"],
    );
    big[13] = 1.5;
    assert_names(
        &err_of(write_like(&p, &v, &big, DataType::U8)),
        &p,
        &["1.5"],
    );
    assert_names(
        &err_of(write_like(&p, &v, &[0.0; 5], DataType::F32)),
        &p,
        &["5 values", "4x3x2"],
    );
    let q = dir.join("out.mgz");
    assert_names(
        &err_of(write_like(&q, &v, &v.data, DataType::F32)),
        &q,
        &["unrecognised"],
    );
    assert_eq!(std::fs::read(&p).unwrap(), before);
    assert_eq!(dir.names(), ["out.nii.gz"]);

    // A folder that does not exist: error naming the path, nothing created.
    for name in ["missing/out.nii", "missing/out.hdr"] {
        let q = dir.join(name);
        let msg = err_of(write_like(&q, &v, &v.data, DataType::F32));
        assert_names(&msg, &q, &[]);
        assert!(!q.exists());
    }
    assert!(!dir.join("missing").exists());
    assert_eq!(dir.names(), ["out.nii.gz"]);

    // A reference whose geometry was edited after reading is refused.
    let mut moved = read(&p).unwrap();
    moved.affine[0][3] += 1.0;
    assert_names(
        &err_of(write_like(
            &dir.join("moved.nii"),
            &moved,
            &v.data,
            DataType::F32,
        )),
        &dir.join("moved.nii"),
        &["affine changed", "Volume::new"],
    );
    // Overwriting replaces the file whole.
    let doubled: Vec<f32> = v.data.iter().map(|x| x * 2.0).collect();
    write_like(&p, &v, &doubled, DataType::F32).unwrap();
    assert_eq!(read(&p).unwrap().data, doubled);
    assert_eq!(dir.names(), ["out.nii.gz"]);
}

#[test]
fn volume_helpers() {
    let v = Volume::new([4, 3, 2], [1.0, 2.0, 3.0], MNI_AFFINE, ramp(24)).unwrap();
    assert_eq!(v.num_voxels(), 24);
    assert_eq!(v.index(1, 2, 1), 1 + 4 * (2 + 3));
    let w = v.with_data(vec![1.0; 24]).unwrap();
    assert_same_geometry(&v, &w);
    assert!(v.with_data(vec![1.0; 23]).is_err());
    assert!(Volume::new([4, 3, 2], [1.0; 3], MNI_AFFINE, vec![0.0; 23]).is_err());
    assert!(Volume::new([4, 0, 2], [1.0; 3], MNI_AFFINE, vec![]).is_err());
    assert!(Volume::new([4, 3, 2], [0.0, 1.0, 1.0], MNI_AFFINE, ramp(24)).is_err());
    assert!(format!("{v:?}").contains("[24 f32]"));
    let max = volume::MAX_VOXELS;
    assert!(
        max >= 512 * 512 * 512,
        "cap {max} too small for 0.5 mm brains"
    );
}

// ---------------------------------------------------------------------------------------
// Dataset discovery
// ---------------------------------------------------------------------------------------

#[test]
fn discover_iseg_layout() {
    let dir = TempDir::new("discover");
    let touch = |name: &str| std::fs::write(dir.join(name), b"").unwrap();
    for m in ["T1", "T2", "label"] {
        touch(&format!("subject-1-{m}.hdr"));
        touch(&format!("subject-1-{m}.img"));
    }
    touch("subject-10-T1.nii.gz");
    touch("subject-10-T2.nii.gz");
    touch("subject-2-T1.nii");
    touch("subject-2-T2.nii");
    touch("subject-2-label.nii");
    touch("subject-abc-T1.nii");
    touch("subject-abc-T2.nii");
    touch("README.txt");
    touch("subject-3-T1.txt");
    let s = discover(&dir.0).unwrap();
    let ids: Vec<&str> = s.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["1", "2", "10", "abc"]);
    assert_eq!(s[0].t1, dir.join("subject-1-T1.hdr"));
    assert_eq!(s[0].t2, dir.join("subject-1-T2.hdr"));
    assert_eq!(s[0].label, Some(dir.join("subject-1-label.hdr")));
    assert_eq!(s[1].label, Some(dir.join("subject-2-label.nii")));
    assert_eq!(s[2].t1, dir.join("subject-10-T1.nii.gz"));
    assert_eq!(s[2].label, None);

    // A T1 without its T2.
    touch("subject-7-T1.nii.gz");
    let msg = err_of(discover(&dir.0));
    assert_names(&msg, &dir.0, &["subject 7", "no T2", "subject-7-T1.nii.gz"]);
    std::fs::remove_file(dir.join("subject-7-T1.nii.gz")).unwrap();
    // A .hdr without its .img.
    std::fs::remove_file(dir.join("subject-1-T2.img")).unwrap();
    let msg = err_of(discover(&dir.0));
    assert_names(&msg, &dir.0, &["subject-1-T2.hdr", "no matching .img"]);
    touch("subject-1-T2.img");
    // One image in two formats.
    touch("subject-2-T1.nii.gz");
    let msg = err_of(discover(&dir.0));
    assert_names(&msg, &dir.0, &["subject-2-T1", "more than one format"]);
    std::fs::remove_file(dir.join("subject-2-T1.nii.gz")).unwrap();
    assert_eq!(discover(&dir.0).unwrap().len(), 4);

    let empty = TempDir::new("discover-empty");
    assert_names(&err_of(discover(&empty.0)), &empty.0, &["no subjects"]);
    let gone = empty.join("gone");
    assert_names(&err_of(discover(&gone)), &gone, &[]);
}

#[test]
fn mutated_headers_never_panic() {
    // Random byte changes in the header of a valid file, and truncations at every length:
    // each read returns Ok or an error naming the file, never a panic (the reader's
    // last-resort guard would report a panic as "internal error").
    let dir = TempDir::new("fuzz");
    let mut h = Hdr::new(&[4, 3, 2]);
    h.qform_code = 1;
    h.quatern = [0.1, 0.2, 0.3, 1.0, 2.0, 3.0];
    let valid = h.nii(&f32_bytes(&ramp(24)));
    let r = noise(4 * 1500, 99);
    let p = dir.join("fuzz.nii");
    for k in 0..1500 {
        let mut bytes = valid.clone();
        for j in 0..1 + (r[4 * k] % 4) as usize {
            let off = (r[4 * k + 1] as usize * 7 + r[4 * k + 2] as usize + j * 31) % 352;
            bytes[off] = r[4 * k + 3].wrapping_add(j as u8 * 17);
        }
        std::fs::write(&p, &bytes).unwrap();
        if let Err(e) = read(&p) {
            let msg = e.to_string();
            assert_names(&msg, &p, &[]);
            assert!(!msg.contains("internal error"), "case {k}: {msg}");
        }
    }
    let gz = gzip(&valid);
    let q = dir.join("cut.nii.gz");
    for len in 0..gz.len() {
        std::fs::write(&p, &valid[..len.min(valid.len())]).unwrap();
        std::fs::write(&q, &gz[..len]).unwrap();
        for f in [&p, &q] {
            let msg = err_of(read(f));
            assert_names(&msg, f, &[]);
            assert!(!msg.contains("internal error"), "length {len}: {msg}");
        }
    }
}
