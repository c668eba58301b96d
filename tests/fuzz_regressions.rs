//! The fuzz targets' seeds and findings (see `docs/reliability.md`, `fuzz/`).
//!
//! Every seed in `fuzz/seeds/<target>/` goes through the same entry points as its fuzz
//! target (`volume::read_from_bytes`, `Checkpoint::from_bytes` + `nn::io::model_config`)
//! and must load, so the seeds stay meaningful as the formats evolve. Minimised inputs
//! of crashes the fuzzers found are replayed and must give an error naming the problem.
//! The seeds are written by the ignored test `write_seeds` (it needs a GPU adapter to
//! build the models whose checkpoints it saves):
//! `cargo test --test fuzz_regressions -- --ignored write_seeds`.

mod common;

use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use flate2::Compression;
use masnet_wgpu::checkpoint::{Checkpoint, CheckpointTensor, KEY_CONFIG};
use masnet_wgpu::data::volume::{self, read_from_bytes, DataType, Volume};
use masnet_wgpu::nn::blocks::{BlockKind, ModelForm};
use masnet_wgpu::nn::dunet::DunetConfig;
use masnet_wgpu::nn::io::{model_checkpoint, model_config};
use masnet_wgpu::nn::unet3d::Unet3dConfig;
use masnet_wgpu::nn::ModelConfig;
use masnet_wgpu::Result;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

fn seeds(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join("seeds")
        .join(target)
}

/// The files of a seed folder, sorted.
fn seed_files(target: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(seeds(target))
        .unwrap_or_else(|e| panic!("{}: {e}", seeds(target).display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// Where a pair input is split (as in `fuzz/fuzz_targets/nifti_reader.rs`).
const SPLITS: [usize; 8] = [348, 540, 352, 344, 0, 100, 544, 1024];

/// The `nifti_reader` fuzz target's reading of an input, kept in step with
/// `fuzz/fuzz_targets/nifti_reader.rs`: the first byte picks `.nii`, `.nii.gz` (as is),
/// `.nii.gz` (compressed here) or a `.hdr`/`.img` pair (split point, gzip of each).
fn read_fuzz_input(data: &[u8]) -> Result<Volume> {
    let (&ctl, rest) = data.split_first().expect("a fuzz input has a control byte");
    match ctl & 3 {
        0 => read_from_bytes(Path::new("fuzz-input.nii"), rest, None),
        1 => read_from_bytes(Path::new("fuzz-input.nii.gz"), rest, None),
        2 => read_from_bytes(Path::new("fuzz-input.nii.gz"), &gzip(rest), None),
        _ => {
            let split = SPLITS[usize::from((ctl >> 2) & 7)].min(rest.len());
            let (hdr, img) = rest.split_at(split);
            let (hdr_name, hdr) = if ctl & 0x20 != 0 {
                ("fuzz-input.hdr.gz", gzip(hdr))
            } else {
                ("fuzz-input.hdr", hdr.to_vec())
            };
            let (img_name, img) = if ctl & 0x40 != 0 {
                ("fuzz-input.img.gz", gzip(img))
            } else {
                ("fuzz-input.img", img.to_vec())
            };
            read_from_bytes(Path::new(hdr_name), &hdr, Some((Path::new(img_name), &img)))
        }
    }
}

/// The files `read_fuzz_input` presents, written to `dir`; returns the path to read.
fn write_fuzz_input(dir: &Path, data: &[u8]) -> PathBuf {
    let (&ctl, rest) = data.split_first().unwrap();
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    match ctl & 3 {
        0 => write("fuzz-input.nii", rest),
        1 => write("fuzz-input.nii.gz", rest),
        2 => write("fuzz-input.nii.gz", &gzip(rest)),
        _ => {
            let split = SPLITS[usize::from((ctl >> 2) & 7)].min(rest.len());
            let (hdr, img) = rest.split_at(split);
            if ctl & 0x40 != 0 {
                write("fuzz-input.img.gz", &gzip(img));
            } else {
                write("fuzz-input.img", img);
            }
            if ctl & 0x20 != 0 {
                write("fuzz-input.hdr.gz", &gzip(hdr))
            } else {
                write("fuzz-input.hdr", hdr)
            }
        }
    }
}

#[test]
fn every_nifti_seed_loads() {
    let files = seed_files("nifti_reader");
    assert!(
        files.len() >= 8,
        "expected the nifti_reader seeds, got {files:?}"
    );
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fuzz-seeds");
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        let v = read_fuzz_input(&bytes)
            .unwrap_or_else(|e| panic!("seed {} does not load: {e}", f.display()));
        // read_from_bytes and the path-based reader agree.
        let w = volume::read(&write_fuzz_input(&tmp, &bytes))
            .unwrap_or_else(|e| panic!("seed {} as files: {e}", f.display()));
        assert_eq!(
            (w.dims, w.spacing, w.affine, w.format(), &w.data),
            (v.dims, v.spacing, v.affine, v.format(), &v.data),
            "seed {}",
            f.display()
        );
        assert_eq!(v.dims, [6, 5, 4], "seed {}", f.display());
        assert_eq!(v.data.len(), 120, "seed {}", f.display());
        assert!(
            v.data.iter().all(|x| x.is_finite()) && v.data.iter().any(|&x| x != 0.0),
            "seed {}: voxels {:?}",
            f.display(),
            v.data
        );
    }
}

#[test]
fn read_from_bytes_errors_name_the_file_and_the_problem() {
    let seed = std::fs::read(seeds("nifti_reader").join("nii-u8-scaled.bin")).unwrap();
    let err = read_fuzz_input(&seed[..400]).unwrap_err().to_string();
    assert!(
        err.contains("fuzz-input.nii") && err.contains("truncated"),
        "{err}"
    );
    let pair = std::fs::read(seeds("nifti_reader").join("pair-analyze.bin")).unwrap();
    let err = read_fuzz_input(&pair[..1 + 348 + 10])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("fuzz-input.img") && err.contains("truncated"),
        "{err}"
    );
}

#[test]
fn every_checkpoint_seed_loads_with_its_model_configuration() {
    let files = seed_files("checkpoint_loader");
    assert!(
        files.len() >= 3,
        "expected the checkpoint seeds, got {files:?}"
    );
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        let origin = f.display().to_string();
        let ckpt = Checkpoint::from_bytes(&bytes, &origin)
            .unwrap_or_else(|e| panic!("seed {origin} does not parse: {e}"));
        assert!(!ckpt.tensors.is_empty(), "seed {origin} has no tensors");
        let config = model_config(&ckpt, &f).unwrap_or_else(|e| panic!("seed {origin}: {e}"));
        assert!(config.classes() > 0, "seed {origin}: {config:?}");
        // The file as the loader reads it from disk gives the same checkpoint.
        assert_eq!(Checkpoint::read(&f).unwrap(), ckpt, "seed {origin}");
    }
}

// ---------------------------------------------------------------------------------------
// Findings
// ---------------------------------------------------------------------------------------

/// A fuzz input (`nifti_reader` format: control byte, then the file) from `tests/fuzz_regressions/`.
fn finding(name: &str) -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fuzz_regressions")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// NIfTI-2 `.nii` (2x1x1 uint8) in metres whose sform diagonal is 1e307: finite in the
/// file, ±Inf once converted to mm. The reader returned a volume with an infinite affine
/// (the fuzz target's invariant check); now the sform counts as unusable in mm and the
/// affine falls back (no qform here) to diag(spacing) in mm, like any unusable sform.
#[test]
fn nifti2_sform_that_overflows_in_mm_is_not_used() {
    let input = finding("nifti2-sform-overflows-in-mm.bin");
    for v in [
        read_fuzz_input(&input).unwrap(),
        // The same file through the path-based reader.
        {
            let p = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fuzz-sform-overflow.nii");
            std::fs::write(&p, &input[1..]).unwrap();
            volume::read(&p).unwrap()
        },
    ] {
        assert_eq!(v.dims, [2, 1, 1]);
        assert_eq!(v.spacing, [1000.0; 3], "1 m voxels");
        assert_eq!(
            v.affine,
            [
                [1000.0, 0.0, 0.0, 0.0],
                [0.0, 1000.0, 0.0, 0.0],
                [0.0, 0.0, 1000.0, 0.0],
                [0.0, 0.0, 0.0, 1.0]
            ]
        );
        assert_eq!(v.data, [5.0, 6.0]);
    }
}

// ---------------------------------------------------------------------------------------
// Seed generation
// ---------------------------------------------------------------------------------------

/// The embedded T1w image, uncompressed (NIfTI-1, u8 with scl_slope 1/255, 97x115x97).
fn embedded_raw(name: &str) -> Vec<u8> {
    let path = volume::embedded_dir().join(format!("{name}.nii.gz"));
    let mut out = Vec::new();
    GzDecoder::new(std::fs::File::open(&path).unwrap())
        .read_to_end(&mut out)
        .unwrap();
    out
}

/// A 6x5x4 block of u8 voxels from the middle of an embedded image.
fn crop(raw: &[u8]) -> Vec<u8> {
    let (nx, ny) = (97, 115);
    let mut v = Vec::new();
    for z in 45..49 {
        for y in 55..60 {
            for x in 45..51 {
                v.push(raw[352 + x + nx * (y + ny * z)]);
            }
        }
    }
    v
}

fn put(b: &mut [u8], off: usize, bytes: &[u8]) {
    b[off..off + bytes.len()].copy_from_slice(bytes);
}

/// The 348-byte header of an embedded image with dims 6x5x4 (`ndim` 3 or 4 with t = 1),
/// `vox_offset` and `magic`.
fn nifti1_header(raw: &[u8], ndim: i16, vox_offset: f32, magic: &[u8; 4]) -> Vec<u8> {
    let mut h = raw[..348].to_vec();
    for (i, d) in [ndim, 6, 5, 4, 1, 1, 1, 1].iter().enumerate() {
        put(&mut h, 40 + 2 * i, &d.to_le_bytes());
    }
    put(&mut h, 108, &vox_offset.to_le_bytes());
    put(&mut h, 344, magic);
    h
}

/// Byte-swaps every numeric field of a little-endian NIfTI-1 header (offset, width, count).
fn to_big_endian(h: &mut [u8]) {
    let fields: [(usize, usize, usize); 13] = [
        (0, 4, 1),    // sizeof_hdr
        (32, 4, 1),   // extents
        (36, 2, 1),   // session_error
        (40, 2, 8),   // dim
        (56, 4, 3),   // intent_p1..3
        (68, 2, 4),   // intent_code, datatype, bitpix, slice_start
        (76, 4, 11),  // pixdim, vox_offset, scl_slope, scl_inter
        (120, 2, 1),  // slice_end
        (124, 4, 4),  // cal_max, cal_min, slice_duration, toffset
        (140, 4, 2),  // glmax, glmin
        (252, 2, 2),  // qform_code, sform_code
        (256, 4, 6),  // quatern_b..qoffset_z
        (280, 4, 12), // srow_x, srow_y, srow_z
    ];
    for (off, w, n) in fields {
        for i in 0..n {
            h[off + i * w..off + (i + 1) * w].reverse();
        }
    }
}

/// A NIfTI-2 header (540 bytes) for 6x5x4 f32 voxels, 2 mm, with an sform.
fn nifti2_header(vox_offset: i64, magic: &[u8; 8]) -> Vec<u8> {
    let mut h = vec![0u8; 540];
    put(&mut h, 0, &540i32.to_le_bytes());
    put(&mut h, 4, magic);
    put(&mut h, 12, &16i16.to_le_bytes()); // float32
    put(&mut h, 14, &32i16.to_le_bytes());
    for (i, d) in [3i64, 6, 5, 4, 1, 1, 1, 1].iter().enumerate() {
        put(&mut h, 16 + 8 * i, &d.to_le_bytes());
    }
    for (i, p) in [1.0f64, 2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0]
        .iter()
        .enumerate()
    {
        put(&mut h, 104 + 8 * i, &p.to_le_bytes());
    }
    put(&mut h, 168, &vox_offset.to_le_bytes());
    put(&mut h, 348, &2i32.to_le_bytes()); // sform_code
    let srow = [
        [2.0f64, 0.0, 0.0, -90.0],
        [0.0, 2.0, 0.0, -126.0],
        [0.0, 0.0, 2.0, -72.0],
    ];
    for (r, row) in srow.iter().enumerate() {
        for (c, v) in row.iter().enumerate() {
            put(&mut h, 400 + 32 * r + 8 * c, &v.to_le_bytes());
        }
    }
    put(&mut h, 500, &2i32.to_le_bytes()); // mm
    h
}

fn with_ctl(ctl: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut v = vec![ctl];
    for p in parts {
        v.extend_from_slice(p);
    }
    v
}

/// Writes `fuzz/seeds/*`: small cut-downs of the embedded brain in every layout the
/// reader takes, and checkpoints of tiny models saved by the crate.
#[test]
#[ignore = "regenerates fuzz/seeds; needs a GPU adapter"]
fn write_seeds() {
    let dir = seeds("nifti_reader");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let t1 = embedded_raw("T1w");
    let labels = embedded_raw("labels");
    let ext = [0u8; 4];
    let vox = crop(&t1);
    let nii = [&nifti1_header(&t1, 3, 352.0, b"n+1\0")[..], &ext, &vox].concat();
    let analyze = nifti1_header(&t1, 3, 0.0, &[0; 4]);
    let ni1 = nifti1_header(&t1, 3, 0.0, b"ni1\0");
    let labels4d = [
        &nifti1_header(&labels, 4, 352.0, b"n+1\0")[..],
        &ext,
        &crop(&labels),
    ]
    .concat();
    // Big-endian int16 with a qform instead of the sform, and a header extension.
    let mut be = nifti1_header(&t1, 3, 368.0, b"n+1\0");
    put(&mut be, 70, &4i16.to_le_bytes());
    put(&mut be, 72, &16i16.to_le_bytes());
    put(&mut be, 112, &0.5f32.to_le_bytes());
    put(&mut be, 116, &(-10.0f32).to_le_bytes());
    put(&mut be, 252, &1i16.to_le_bytes());
    put(&mut be, 254, &0i16.to_le_bytes());
    for (i, q) in [0.0f32, 0.0, 1.0, 90.0, 126.0, -72.0].iter().enumerate() {
        put(&mut be, 256 + 4 * i, &q.to_le_bytes());
    }
    to_big_endian(&mut be);
    let mut extension = vec![1u8, 0, 0, 0];
    extension.extend_from_slice(&16i32.to_be_bytes());
    extension.extend_from_slice(&0i32.to_be_bytes());
    extension.extend_from_slice(&[0; 8]);
    let be_vox: Vec<u8> = vox
        .iter()
        .flat_map(|&v| (i16::from(v) * 3 - 100).to_be_bytes())
        .collect();
    let f32_vox: Vec<u8> = vox
        .iter()
        .flat_map(|&v| (f32::from(v) / 255.0).to_le_bytes())
        .collect();

    let mut files: Vec<(&str, Vec<u8>)> = vec![
        ("nii-u8-scaled.bin", with_ctl(0, &[&nii])),
        ("nii-gz-stream.bin", with_ctl(1, &[&gzip(&nii)])),
        ("nii-gz-compressed-by-target.bin", with_ctl(2, &[&nii])),
        ("nii-4d-labels-t1.bin", with_ctl(0, &[&labels4d])),
        (
            "nii-i16-big-endian-qform.bin",
            with_ctl(0, &[&be, &extension, &be_vox]),
        ),
        ("pair-analyze.bin", with_ctl(3, &[&analyze, &vox])),
        ("pair-ni1-gz.bin", with_ctl(0x63, &[&ni1, &vox])),
        (
            "nii2-f32.bin",
            with_ctl(
                0,
                &[&nifti2_header(544, b"n+2\0\r\n\x1a\n"), &ext, &f32_vox],
            ),
        ),
        (
            "pair-ni2-f32.bin",
            with_ctl(7, &[&nifti2_header(0, b"ni2\0\r\n\x1a\n"), &f32_vox]),
        ),
    ];
    // A file written by the crate: the first seed's volume as float32.
    let v = read_fuzz_input(&files[0].1).unwrap();
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fuzz-seed-written.nii");
    volume::write_like(&tmp, &v, &v.data, DataType::F32).unwrap();
    files.push((
        "nii-f32-written-by-crate.bin",
        with_ctl(0, &[&std::fs::read(&tmp).unwrap()]),
    ));
    for (name, bytes) in &files {
        std::fs::write(dir.join(name), bytes).unwrap();
    }

    let dir = seeds("checkpoint_loader");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ctx = common::gpu();
    let dunet = ModelConfig::Dunet(DunetConfig {
        init_features: 2,
        growth: 2,
        layers_per_block: 1,
        bottleneck: 2,
        levels: 1,
        block: BlockKind::Conv,
        ..DunetConfig::default()
    });
    let unet = ModelConfig::Unet3d(Unet3dConfig {
        widths: vec![4, 4],
        ..Unet3dConfig::default()
    });
    for (name, config, form) in [
        (
            "dunet-conv-training.safetensors",
            &dunet,
            ModelForm::Training,
        ),
        ("dunet-conv-folded.safetensors", &dunet, ModelForm::Folded),
        ("unet3d-mixacb-fused.safetensors", &unet, ModelForm::Fused),
    ] {
        let mut store = masnet_wgpu::autograd::ParamStore::new();
        let model = config.build(&ctx, &mut store, 1).unwrap();
        let (model, store) = if form == ModelForm::Training {
            (model, store)
        } else {
            model.convert(&ctx, &store, form).unwrap()
        };
        let mut extra = BTreeMap::new();
        extra.insert("masnet.step".to_string(), "7".to_string());
        let mut ckpt = model_checkpoint(&ctx, &model, &store, extra).unwrap();
        if form == ModelForm::Training {
            // Optimiser state, as a training checkpoint carries it.
            let first = ckpt.tensors[0].clone();
            ckpt.tensors.push(CheckpointTensor {
                name: format!("optimizer.adam_m.{}", first.name),
                data: vec![0.0; first.data.len()],
                ..first
            });
        }
        assert!(ckpt.metadata.contains_key(KEY_CONFIG));
        ckpt.write(&dir.join(name)).unwrap();
    }
}
