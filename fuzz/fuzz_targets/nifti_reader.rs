//! Arbitrary bytes through the NIfTI-1/NIfTI-2/Analyze reader
//! (`masnet_wgpu::data::volume::read_from_bytes`, the parser `read` uses).
//!
//! The first byte picks how the rest is presented (the fuzzer mutates it like any other):
//! - bits 0-1: 0 = `.nii`; 1 = `.nii.gz` given as is (the bytes are the gzip stream);
//!   2 = `.nii.gz` holding the bytes gzip-compressed here (a valid stream, so the header
//!   and data checks behind the decoder are reached); 3 = a `.hdr` + `.img` pair;
//! - for a pair: bits 2-4 pick where the bytes are split into header and image, bit 5
//!   gzips the header (`.hdr.gz`), bit 6 the image (`.img.gz`).
//!
//! Checked: no panic, no hang, no runaway allocation (libFuzzer's limits); an error
//! names the file; a volume that loads is consistent (voxel count, finite values,
//! spacing and affine).
#![no_main]

use flate2::write::GzEncoder;
use flate2::Compression;
use libfuzzer_sys::fuzz_target;
use masnet_wgpu::data::volume::{read_from_bytes, Volume};
use masnet_wgpu::Result;
use std::io::Write;
use std::path::Path;

/// Where a pair input is split: the NIfTI-1/Analyze and NIfTI-2 header sizes first.
const SPLITS: [usize; 8] = [348, 540, 352, 344, 0, 100, 544, 1024];

/// Every file name starts with this, so errors can be checked to name the file.
const STEM: &str = "fuzz-input";

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::fast());
    e.write_all(bytes).expect("gzip to memory");
    e.finish().expect("gzip to memory")
}

fn check(r: Result<Volume>) {
    match r {
        Ok(v) => {
            assert!(v.dims.iter().all(|&d| d > 0), "dims {:?}", v.dims);
            assert_eq!(v.data.len(), v.num_voxels(), "voxel count");
            assert!(v.data.iter().all(|x| x.is_finite()), "non-finite voxel");
            assert!(
                v.spacing.iter().all(|s| s.is_finite() && *s > 0.0),
                "spacing {:?}",
                v.spacing
            );
            assert!(
                v.affine.iter().flatten().all(|x| x.is_finite()),
                "affine {:?}",
                v.affine
            );
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains(STEM), "error does not name the file: {msg}");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    match ctl & 3 {
        0 => check(read_from_bytes(Path::new("fuzz-input.nii"), rest, None)),
        1 => check(read_from_bytes(Path::new("fuzz-input.nii.gz"), rest, None)),
        2 => check(read_from_bytes(
            Path::new("fuzz-input.nii.gz"),
            &gzip(rest),
            None,
        )),
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
            check(read_from_bytes(
                Path::new(hdr_name),
                &hdr,
                Some((Path::new(img_name), &img)),
            ))
        }
    }
});
