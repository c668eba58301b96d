//! Data preparation: z-score normalisation, the training patch sampler, the sliding
//! window plan with probability averaging, ensemble voting and the preview PNG.

use masnet_wgpu::data::preprocess::{brain_mask_from, mask_stats, zscore};
use masnet_wgpu::data::preview::{
    overlay_pixel, preview_size, write_preview, CSF_COLOUR, GM_COLOUR, PANEL_GAP, WM_COLOUR,
};
use masnet_wgpu::data::sampler::{
    extract_patch, majority_vote, patch_index, voxel_index, window_has_brain, window_starts,
    windows, PatchBatch, PatchSampler, ProbAccumulator, TrainingVolume,
};
use masnet_wgpu::rng::Rng;

/// Error text of a `Result` that must be `Err`.
fn err_text<T: std::fmt::Debug>(r: masnet_wgpu::Result<T>) -> String {
    r.expect_err("expected an error").to_string()
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / n;
    (m, var.sqrt())
}

// ---------------------------------------------------------------- z-score

#[test]
fn zscore_over_positive_voxels_by_hand() {
    let v = [0.0, 1.0, 2.0, 0.0, 3.0, 4.0, -1.0];
    let z = zscore(&v, None).unwrap();
    let (m, s) = (2.5f64, 1.25f64.sqrt());
    let want = [
        0.0,
        ((1.0 - m) / s) as f32,
        ((2.0 - m) / s) as f32,
        0.0,
        ((3.0 - m) / s) as f32,
        ((4.0 - m) / s) as f32,
        0.0, // negative: not > 0, so background
    ];
    assert_eq!(z, want);
    let st = mask_stats(&v, None).unwrap();
    assert_eq!(st.count, 4);
    assert!((st.mean - m).abs() < 1e-12 && (st.std - s).abs() < 1e-12);
    assert_eq!(
        brain_mask_from(&v),
        vec![false, true, true, false, true, true, false]
    );
}

#[test]
fn zscore_with_mask_has_mean_zero_population_std_one() {
    let mut rng = Rng::new(7);
    let n = 5000;
    let v: Vec<f32> = (0..n).map(|_| rng.uniform_f32(-20.0, 300.0)).collect();
    let mask: Vec<bool> = (0..n).map(|i| i % 3 != 0).collect();
    let z = zscore(&v, Some(&mask)).unwrap();
    let inside: Vec<f64> = z
        .iter()
        .zip(&mask)
        .filter(|(_, &m)| m)
        .map(|(&x, _)| x as f64)
        .collect();
    let (m, s) = mean_std(&inside);
    assert!(m.abs() < 1e-5, "mean {m}");
    assert!((s - 1.0).abs() < 1e-5, "population std {s}");
    for (i, (&x, &m)) in z.iter().zip(&mask).enumerate() {
        if !m {
            assert_eq!(x.to_bits(), 0.0f32.to_bits(), "background voxel {i} is {x}");
        }
    }
    // The mask decides, not the sign: negative voxels inside are normalised.
    let v2 = [-1.0, 1.0, 5.0];
    let z2 = zscore(&v2, Some(&[true, true, false])).unwrap();
    assert_eq!(z2, vec![-1.0, 1.0, 0.0]);
}

#[test]
fn zscore_errors_name_the_problem() {
    let e = err_text(zscore(&[1.0, 2.0], Some(&[false, false])));
    assert!(e.contains("empty mask"), "{e}");
    let e = err_text(zscore(&[0.0, -3.0, 0.0], None));
    assert!(e.contains("empty mask") && e.contains("> 0"), "{e}");
    let e = err_text(zscore(&[0.0, 5.0, 5.0, 5.0], None));
    assert!(e.contains("zero standard deviation"), "{e}");
    let e = err_text(zscore(&[1.0, 2.0, 3.0], Some(&[true, true])));
    assert!(e.contains("mask has 2 voxels") && e.contains("3"), "{e}");
    // NaN is not > 0, so it is background without a mask; inside a mask it is an error.
    assert_eq!(
        zscore(&[1.0, f32::NAN, 3.0], None).unwrap(),
        vec![-1.0, 0.0, 1.0]
    );
    let e = err_text(zscore(&[1.0, f32::NAN, 3.0], Some(&[true, true, true])));
    assert!(e.contains("not finite"), "{e}");
}

// ---------------------------------------------------------------- sampler fixtures

/// A subject whose brain is an ellipsoid inside the box: T1/T2 non-zero inside, 0
/// outside; labels 1..=3 inside by shell.
fn ellipsoid_subject(dims: [usize; 3], seed: u64) -> TrainingVolume {
    let mut rng = Rng::new(seed);
    let n = dims.iter().product();
    let (mut t1, mut t2, mut lab) = (vec![0f32; n], vec![0f32; n], vec![0u8; n]);
    let c = dims.map(|d| (d as f64 - 1.0) / 2.0);
    let r = dims.map(|d| d as f64 * 0.3);
    for z in 0..dims[2] {
        for y in 0..dims[1] {
            for x in 0..dims[0] {
                let p = [x, y, z];
                let q: f64 = (0..3).map(|a| ((p[a] as f64 - c[a]) / r[a]).powi(2)).sum();
                if q <= 1.0 {
                    let v = voxel_index(dims, x, y, z);
                    t1[v] = rng.uniform_f32(0.5, 2.0);
                    t2[v] = rng.uniform_f32(-2.0, -0.5);
                    lab[v] = if q > 0.6 {
                        1
                    } else if q > 0.25 {
                        2
                    } else {
                        3
                    };
                }
            }
        }
    }
    TrainingVolume::new(t1, t2, lab, dims).unwrap()
}

fn assert_t1_nonzero(b: &PatchBatch) {
    let pn: usize = b.patch.iter().product();
    for i in 0..b.batch() {
        let t1 = &b.images[i * 2 * pn..i * 2 * pn + pn];
        assert!(t1.iter().any(|&v| v != 0.0), "patch {i} has an all-zero T1");
    }
}

// ---------------------------------------------------------------- sampler

#[test]
fn sampler_same_seed_same_batches_different_seed_different() {
    let subs = vec![
        ellipsoid_subject([20, 18, 16], 1),
        ellipsoid_subject([22, 17, 15], 2),
    ];
    let mut a = PatchSampler::new(subs.clone(), 42).unwrap();
    let mut b = PatchSampler::new(subs.clone(), 42).unwrap();
    let mut c = PatchSampler::new(subs, 43).unwrap();
    for _ in 0..5 {
        let (ba, bb, bc) = (
            a.sample(4, [6, 5, 4]).unwrap(),
            b.sample(4, [6, 5, 4]).unwrap(),
            c.sample(4, [6, 5, 4]).unwrap(),
        );
        assert_eq!(ba, bb);
        assert_ne!(ba.origins, bc.origins);
        assert_eq!(ba.image_shape(), [4, 2, 4, 5, 6]);
        assert_eq!(ba.label_shape(), [4, 1, 4, 5, 6]);
        assert_eq!(ba.images.len(), 4 * 2 * 4 * 5 * 6);
        assert_eq!(ba.labels.len(), 4 * 4 * 5 * 6);
    }
}

#[test]
fn sampler_never_all_zero_t1_and_corners_in_bounds() {
    // A small brain in a large box: most uniform corners give an empty patch.
    let subs = vec![
        ellipsoid_subject([30, 28, 26], 3),
        ellipsoid_subject([24, 30, 20], 4),
    ];
    let patch = [4, 4, 4];
    let mut s = PatchSampler::new(subs.clone(), 5).unwrap();
    let mut seen = [0usize; 2];
    for _ in 0..50 {
        let b = s.sample(8, patch).unwrap();
        assert_t1_nonzero(&b);
        for o in &b.origins {
            seen[o.subject] += 1;
            let d = subs[o.subject].dims;
            for a in 0..3 {
                assert!(o.corner[a] + patch[a] <= d[a], "{o:?} out of {d:?}");
            }
        }
    }
    // Subjects are drawn uniformly: 400 draws, each about 200 (5 sigma is 50).
    assert!(seen[0] > 150 && seen[1] > 150, "{seen:?}");
}

#[test]
fn sampler_region_confines_patches() {
    let dims = [24, 16, 16];
    let subs = vec![ellipsoid_subject(dims, 6), ellipsoid_subject(dims, 7)];
    let patch = [6, 6, 6];
    for (range, bias) in [(0..12, 0.0), (12..24, 0.0), (3..17, 0.7)] {
        let mut s = PatchSampler::new(subs.clone(), 8)
            .unwrap()
            .with_foreground_bias(bias)
            .unwrap()
            .with_region(range.clone())
            .unwrap();
        let mut xs = std::collections::BTreeSet::new();
        for _ in 0..40 {
            let b = s.sample(4, patch).unwrap();
            assert_t1_nonzero(&b);
            for o in &b.origins {
                assert!(o.corner[0] >= range.start, "{o:?} before {range:?}");
                assert!(o.corner[0] + patch[0] <= range.end, "{o:?} past {range:?}");
                assert!(o.corner[1] + 6 <= 16 && o.corner[2] + 6 <= 16);
                xs.insert(o.corner[0]);
            }
        }
        // The region's ends are reached (uniform over few positions, 160 draws).
        if bias == 0.0 {
            assert!(
                xs.contains(&range.start) && xs.contains(&(range.end - 6)),
                "{xs:?}"
            );
        }
    }
    // A general box.
    let mut s = PatchSampler::new(subs.clone(), 9)
        .unwrap()
        .with_box([4..20, 2..12, 5..16])
        .unwrap();
    for _ in 0..40 {
        for o in s.sample(4, patch).unwrap().origins {
            let c = o.corner;
            assert!(c[0] >= 4 && c[0] + 6 <= 20, "{c:?}");
            assert!(c[1] >= 2 && c[1] + 6 <= 12, "{c:?}");
            assert!(c[2] >= 5 && c[2] + 6 <= 16, "{c:?}");
        }
    }
    // Errors: narrower than the patch, outside the volume, empty.
    let e = err_text(
        PatchSampler::new(subs.clone(), 1)
            .unwrap()
            .with_region(0..4)
            .unwrap()
            .sample(1, patch),
    );
    assert!(e.contains("shorter than the patch"), "{e}");
    let e = err_text(
        PatchSampler::new(subs.clone(), 1)
            .unwrap()
            .with_region(10..30),
    );
    assert!(e.contains("extends past") && e.contains("subject 0"), "{e}");
    let e = err_text(PatchSampler::new(subs, 1).unwrap().with_region(5..5));
    assert!(e.contains("empty"), "{e}");
}

#[test]
fn foreground_bias_raises_labelled_fraction() {
    // T1 non-zero everywhere, labels only in a 4^3 cube at 10..14 of a 24^3 volume.
    let dims = [24, 24, 24];
    let n = 24 * 24 * 24;
    let mut labels = vec![0u8; n];
    for z in 10..14 {
        for y in 10..14 {
            for x in 10..14 {
                labels[voxel_index(dims, x, y, z)] = 2;
            }
        }
    }
    let vol = TrainingVolume::new(vec![1.0; n], vec![1.0; n], labels, dims).unwrap();
    let fraction = |q: f64| {
        let mut s = PatchSampler::new(vec![vol.clone()], 11)
            .unwrap()
            .with_foreground_bias(q)
            .unwrap();
        let b = s.sample(400, [4, 4, 4]).unwrap();
        b.labels.iter().filter(|&&l| l != 0.0).count() as f64 / b.labels.len() as f64
    };
    // Uniform: each labelled voxel is in a patch with probability (4/21)^3, so the
    // expected labelled fraction is about 0.007. Biased (q = 0.8): a centred patch
    // overlaps the cube by (3/4)^3 on average, so about 0.8 * 0.42 = 0.34. Bounds are
    // many standard errors away (400 patches).
    let (f0, f8) = (fraction(0.0), fraction(0.8));
    assert!(f0 < 0.05, "uniform labelled fraction {f0}");
    assert!(f8 > 0.2, "biased labelled fraction {f8}");
    // q = 1: every patch contains a labelled voxel.
    let mut s = PatchSampler::new(vec![vol], 12)
        .unwrap()
        .with_foreground_bias(1.0)
        .unwrap();
    let b = s.sample(100, [4, 4, 4]).unwrap();
    for (i, l) in b.labels.chunks(64).enumerate() {
        assert!(
            l.iter().any(|&v| v != 0.0),
            "patch {i} has no labelled voxel"
        );
    }
    let e = err_text(
        PatchSampler::new(vec![ellipsoid_subject([8, 8, 8], 1)], 1)
            .unwrap()
            .with_foreground_bias(1.5),
    );
    assert!(e.contains("foreground probability"), "{e}");
}

/// Value encoding the voxel position, never 0.
fn code(x: usize, y: usize, z: usize) -> f32 {
    (1 + x + 100 * y + 10000 * z) as f32
}

#[test]
fn sampled_labels_align_with_image_positions() {
    let dims = [13, 11, 9];
    let n = 13 * 11 * 9;
    let (mut t1, mut t2, mut lab) = (vec![0f32; n], vec![0f32; n], vec![0u8; n]);
    let f = |x: usize, y: usize, z: usize| ((x + 2 * y + 3 * z) % 4) as u8;
    for z in 0..dims[2] {
        for y in 0..dims[1] {
            for x in 0..dims[0] {
                let v = voxel_index(dims, x, y, z);
                t1[v] = code(x, y, z);
                t2[v] = -code(x, y, z);
                lab[v] = f(x, y, z);
            }
        }
    }
    let vol = TrainingVolume::new(t1, t2, lab, dims).unwrap();
    let patch = [5, 4, 3];
    let mut s = PatchSampler::new(vec![vol], 21).unwrap();
    let b = s.sample(20, patch).unwrap();
    let pn = 5 * 4 * 3;
    for (i, o) in b.origins.iter().enumerate() {
        let [cx, cy, cz] = o.corner;
        let img = &b.images[i * 2 * pn..(i + 1) * 2 * pn];
        let lab = &b.labels[i * pn..(i + 1) * pn];
        for z in 0..3 {
            for y in 0..4 {
                for x in 0..5 {
                    let (gx, gy, gz) = (cx + x, cy + y, cz + z);
                    assert_eq!(img[patch_index(patch, 0, x, y, z)], code(gx, gy, gz));
                    assert_eq!(img[patch_index(patch, 1, x, y, z)], -code(gx, gy, gz));
                    assert_eq!(lab[patch_index(patch, 0, x, y, z)], f(gx, gy, gz) as f32);
                    // NCDHW with D = z, H = y, W = x.
                    assert_eq!(patch_index(patch, 1, x, y, z), x + 5 * (y + 4 * (z + 3)));
                }
            }
        }
    }
}

#[test]
fn small_volume_is_zero_padded() {
    let dims = [4, 10, 3];
    let n = 4 * 10 * 3;
    let vol = TrainingVolume::new(vec![1.0; n], vec![2.0; n], vec![3; n], dims).unwrap();
    let patch = [6, 6, 6];
    let mut s = PatchSampler::new(vec![vol], 2).unwrap();
    let b = s.sample(10, patch).unwrap();
    let pn = 216;
    for (i, o) in b.origins.iter().enumerate() {
        assert_eq!((o.corner[0], o.corner[2]), (0, 0));
        assert!(o.corner[1] <= 4);
        for z in 0..6 {
            for y in 0..6 {
                for x in 0..6 {
                    let inside = x < 4 && z < 3;
                    let p = patch_index(patch, 0, x, y, z);
                    let (t1, t2) = (b.images[i * 2 * pn + p], b.images[i * 2 * pn + pn + p]);
                    let l = b.labels[i * pn + p];
                    if inside {
                        assert_eq!((t1, t2, l), (1.0, 2.0, 3.0));
                    } else {
                        assert_eq!((t1, t2, l), (0.0, 0.0, 0.0));
                    }
                }
            }
        }
    }
}

#[test]
fn sampler_state_restore_continues_identical_sequence() {
    let subs = vec![
        ellipsoid_subject([20, 18, 16], 1),
        ellipsoid_subject([18, 20, 16], 2),
    ];
    for bias in [0.0, 0.5] {
        let make = |seed| {
            PatchSampler::new(subs.clone(), seed)
                .unwrap()
                .with_foreground_bias(bias)
                .unwrap()
                .with_region(2..16)
                .unwrap()
        };
        let mut a = make(100);
        for _ in 0..3 {
            a.sample(4, [5, 5, 5]).unwrap();
        }
        let saved = a.state();
        let next: Vec<PatchBatch> = (0..3).map(|_| a.sample(4, [5, 5, 5]).unwrap()).collect();
        // Same sampler, rewound.
        a.set_state(saved);
        for want in &next {
            assert_eq!(&a.sample(4, [5, 5, 5]).unwrap(), want);
        }
        // A fresh sampler with another seed, given the saved state (as after --resume).
        let mut b = make(999);
        b.set_state(saved);
        for want in &next {
            assert_eq!(&b.sample(4, [5, 5, 5]).unwrap(), want);
        }
        // The state survives a JSON round trip exactly (u64, not f64).
        let json = serde_json::to_string(&saved).unwrap();
        assert_eq!(serde_json::from_str::<u64>(&json).unwrap(), saved);
    }
}

#[test]
fn sampler_bad_inputs() {
    let e = err_text(PatchSampler::new(vec![], 1));
    assert!(e.contains("no subjects"), "{e}");
    let e = err_text(TrainingVolume::new(
        vec![1.0; 8],
        vec![1.0; 7],
        vec![0; 8],
        [2, 2, 2],
    ));
    assert!(e.contains("T2 has 7 voxels"), "{e}");
    let mut bad = ellipsoid_subject([6, 6, 6], 1);
    bad.labels.pop();
    let e = err_text(PatchSampler::new(vec![bad], 1));
    assert!(e.contains("subject 0") && e.contains("labels"), "{e}");
    let mut s = PatchSampler::new(vec![ellipsoid_subject([8, 8, 8], 1)], 1).unwrap();
    assert!(err_text(s.sample(0, [4, 4, 4])).contains("batch size is 0"));
    assert!(err_text(s.sample(1, [4, 0, 4])).contains("zero extent"));
    // All-zero T1: bounded redraws, then an error naming the problem.
    let empty = TrainingVolume::new(vec![0.0; 512], vec![1.0; 512], vec![0; 512], [8, 8, 8]);
    let mut s = PatchSampler::new(vec![empty.unwrap()], 1)
        .unwrap()
        .with_max_redraws(20);
    let e = err_text(s.sample(1, [4, 4, 4]));
    assert!(
        e.contains("21 draws") && e.contains("T1 is all zero"),
        "{e}"
    );
}

// ---------------------------------------------------------------- sliding window

#[test]
fn window_starts_hand_cases() {
    let mut want: Vec<usize> = (0..=64).step_by(8).collect();
    want.push(65);
    assert_eq!(window_starts(97, 32, 8), want);
    assert_eq!(window_starts(32, 32, 8), vec![0]);
    assert_eq!(window_starts(20, 32, 8), vec![0]);
    assert_eq!(window_starts(33, 32, 8), vec![0, 1]);
    assert_eq!(
        window_starts(96, 32, 8),
        (0..=64).step_by(8).collect::<Vec<_>>()
    );
    assert_eq!(window_starts(100, 32, 32), vec![0, 32, 64, 68]);
    assert_eq!(window_starts(10, 3, 0), (0..=7).collect::<Vec<_>>());
    // No duplicates, increasing, last flush with the border, for many cases.
    for len in 1..60 {
        for patch in 1..20 {
            for step in 1..20 {
                let s = window_starts(len, patch, step);
                assert!(
                    s.windows(2).all(|w| w[0] < w[1]),
                    "{len} {patch} {step}: {s:?}"
                );
                assert_eq!(*s.last().unwrap(), len.saturating_sub(patch));
                assert!(s.windows(2).all(|w| w[1] - w[0] <= step));
            }
        }
    }
}

#[test]
fn windows_cover_every_voxel() {
    for (dims, patch, step) in [
        ([17, 9, 12], [5, 4, 6], 3),
        ([8, 8, 8], [8, 8, 8], 2),
        ([3, 20, 7], [5, 6, 4], 4),
    ] {
        let ws = windows(dims, patch, step);
        let mut acc = ProbAccumulator::new(dims, 1).unwrap();
        let pn: usize = patch.iter().product();
        for w in &ws {
            acc.add(*w, patch, &vec![1.0; pn]).unwrap();
        }
        assert!(acc.coverage().iter().all(|&c| c > 0), "{dims:?} {patch:?}");
        // x fastest in the list.
        assert_eq!(ws[0], [0, 0, 0]);
        if ws.len() > 1 && dims[0] > patch[0] {
            assert_eq!(ws[1], [step.min(dims[0] - patch[0]), 0, 0]);
        }
        let n = |a: usize| window_starts(dims[a], patch[a], step).len();
        assert_eq!(ws.len(), n(0) * n(1) * n(2));
    }
}

#[test]
fn extract_patch_crops_and_pads() {
    let dims = [6, 5, 4];
    let n = 120;
    let (mut t1, mut t2) = (vec![0f32; n], vec![0f32; n]);
    for z in 0..4 {
        for y in 0..5 {
            for x in 0..6 {
                t1[voxel_index(dims, x, y, z)] = code(x, y, z);
                t2[voxel_index(dims, x, y, z)] = -code(x, y, z);
            }
        }
    }
    let patch = [4, 3, 2];
    let p = extract_patch(&t1, &t2, dims, [4, 3, 3], patch).unwrap();
    assert_eq!(p.len(), 2 * 24);
    for z in 0..2 {
        for y in 0..3 {
            for x in 0..4 {
                let (gx, gy, gz) = (4 + x, 3 + y, 3 + z);
                let inside = gx < 6 && gy < 5 && gz < 4;
                let want = if inside { code(gx, gy, gz) } else { 0.0 };
                assert_eq!(p[patch_index(patch, 0, x, y, z)], want);
                assert_eq!(p[patch_index(patch, 1, x, y, z)], -want);
            }
        }
    }
    let e = err_text(extract_patch(&t1, &t2[1..], dims, [0, 0, 0], patch));
    assert!(e.contains("T2 119"), "{e}");
}

#[test]
fn window_has_brain_finds_the_voxel() {
    let dims = [10, 8, 6];
    let mut mask = vec![false; 480];
    mask[voxel_index(dims, 7, 2, 4)] = true;
    assert!(window_has_brain(&mask, dims, [4, 0, 2], [4, 4, 4]));
    assert!(window_has_brain(&mask, dims, [7, 2, 4], [1, 1, 1]));
    assert!(window_has_brain(&mask, dims, [6, 1, 3], [32, 32, 32])); // past the border
    assert!(!window_has_brain(&mask, dims, [0, 0, 0], [7, 8, 6]));
    assert!(!window_has_brain(&mask, dims, [8, 0, 0], [4, 8, 6]));
    assert!(!window_has_brain(&mask, dims, [0, 3, 0], [10, 5, 6]));
}

#[test]
fn prob_accumulator_two_windows_by_hand() {
    // 1-D along x: dims [5, 1, 1], two classes, windows of 3 at x = 0 and x = 1; voxel 4
    // is uncovered. Values are dyadic so the averages are exact.
    let mut acc = ProbAccumulator::new([5, 1, 1], 2).unwrap();
    acc.add(
        [0, 0, 0],
        [3, 1, 1],
        &[0.75, 0.625, 0.25, /* c1 */ 0.25, 0.375, 0.75],
    )
    .unwrap();
    acc.add(
        [1, 0, 0],
        [3, 1, 1],
        &[0.375, 0.5, 0.125, /* c1 */ 0.625, 0.5, 0.875],
    )
    .unwrap();
    assert_eq!(acc.coverage(), &[1, 2, 2, 1, 0]);
    let (labels, probs) = acc.finish();
    assert_eq!(probs[0], vec![0.75, 0.5, 0.375, 0.125, 1.0]);
    assert_eq!(probs[1], vec![0.25, 0.5, 0.625, 0.875, 0.0]);
    // Voxel 1 is a tie 0.5 / 0.5: lowest class.
    assert_eq!(labels, vec![0, 0, 1, 1, 0]);

    // Three classes, tie between 1 and 2 -> 1.
    let mut acc = ProbAccumulator::new([1, 1, 1], 3).unwrap();
    acc.add([0, 0, 0], [1, 1, 1], &[0.2, 0.4, 0.4]).unwrap();
    assert_eq!(acc.finish().0, vec![1]);
}

#[test]
fn prob_accumulator_uses_the_patch_layout() {
    // A 2x2x2 window at x = 1 of a 3x2x2 volume, probabilities distinct per position.
    let dims = [3, 2, 2];
    let patch = [2, 2, 2];
    let probs: Vec<f32> = (0..16).map(|i| i as f32).collect();
    let mut acc = ProbAccumulator::new(dims, 2).unwrap();
    acc.add([1, 0, 0], patch, &probs).unwrap();
    let (labels, avg) = acc.finish();
    for z in 0..2 {
        for y in 0..2 {
            for x in 0..3 {
                let v = voxel_index(dims, x, y, z);
                if x == 0 {
                    assert_eq!((avg[0][v], avg[1][v], labels[v]), (1.0, 0.0, 0));
                } else {
                    for c in 0..2 {
                        assert_eq!(avg[c][v], probs[patch_index(patch, c, x - 1, y, z)]);
                    }
                    assert_eq!(labels[v], 1);
                }
            }
        }
    }
}

#[test]
fn prob_accumulator_bad_inputs() {
    assert!(err_text(ProbAccumulator::new([2, 2, 2], 0)).contains("0 classes"));
    assert!(err_text(ProbAccumulator::new([2, 0, 2], 4)).contains("zero extent"));
    let mut acc = ProbAccumulator::new([4, 4, 4], 2).unwrap();
    let e = err_text(acc.add([0, 0, 0], [2, 2, 2], &[0.5; 15]));
    assert!(e.contains("15 values") && e.contains("16"), "{e}");
    let e = err_text(acc.add([0, 4, 0], [2, 2, 2], &[0.5; 16]));
    assert!(e.contains("outside the volume"), "{e}");
    let mut p = vec![0.5; 16];
    p[3] = f32::NAN;
    let e = err_text(acc.add([0, 0, 0], [2, 2, 2], &p));
    assert!(e.contains("not finite"), "{e}");
}

#[test]
fn majority_vote_ties_to_lowest() {
    let maps = vec![
        vec![1, 2, 3, 0, 3],
        vec![1, 1, 2, 3, 3],
        vec![2, 2, 1, 2, 1],
    ];
    assert_eq!(majority_vote(&maps).unwrap(), vec![1, 2, 1, 0, 3]);
    let two = vec![vec![3, 1, 2], vec![2, 3, 2]];
    assert_eq!(majority_vote(&two).unwrap(), vec![2, 1, 2]);
    let four = vec![vec![3], vec![3], vec![1], vec![1]];
    assert_eq!(majority_vote(&four).unwrap(), vec![1]);
    assert_eq!(majority_vote(&[vec![0, 3]]).unwrap(), vec![0, 3]);
    assert!(err_text(majority_vote(&[])).contains("no label maps"));
    let e = err_text(majority_vote(&[vec![1, 2], vec![1]]));
    assert!(e.contains("map 1 has 1 voxels"), "{e}");
}

// ---------------------------------------------------------------- preview

fn decode_png(path: &std::path::Path) -> (usize, usize, Vec<u8>) {
    let file = std::io::BufReader::new(std::fs::File::open(path).unwrap());
    let mut reader = png::Decoder::new(file).read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    buf.truncate(info.buffer_size());
    (info.width as usize, info.height as usize, buf)
}

/// Whether `px` is the overlay of `label` on some grey level.
fn is_overlay(px: &[u8], label: u8) -> bool {
    (0..=255u8).any(|g| overlay_pixel(g, label) == [px[0], px[1], px[2]])
}

#[test]
fn preview_png_has_size_and_colours() {
    let dir = std::env::temp_dir().join(format!("masnet-preview-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sub = ellipsoid_subject([20, 24, 16], 3);
    // Mark the top row of the coronal slice (z = Z-1, y = Y/2) as WM, T1 non-zero there.
    let (mut t1, mut labels) = (sub.t1.clone(), sub.labels.clone());
    for x in 0..20 {
        let v = voxel_index(sub.dims, x, 12, 15);
        t1[v] = 1.0;
        labels[v] = 3;
    }
    for (spacing, want) in [([1.0, 1.0, 1.0], (68, 24)), ([1.0, 1.0, 2.0], (68, 32))] {
        assert_eq!(preview_size(sub.dims, spacing).unwrap(), want);
        let path = dir.join("p.png");
        write_preview(&path, &t1, &labels, sub.dims, spacing).unwrap();
        assert!(!dir.join("p.png.tmp").exists());
        let (w, h, rgb) = decode_png(&path);
        assert_eq!((w, h), want);
        assert_eq!(w, 20 + PANEL_GAP + 20 + PANEL_GAP + 24);
        let px: Vec<&[u8]> = rgb.chunks(3).collect();
        for (label, colour) in [(1u8, CSF_COLOUR), (2, GM_COLOUR), (3, WM_COLOUR)] {
            let n = px.iter().filter(|p| is_overlay(p, label)).count();
            assert!(n >= 5, "label {label} ({colour:?}): {n} pixels");
        }
        // Superior up: the coronal panel's top row is the WM line.
        let left = 20 + PANEL_GAP;
        for i in 0..20 {
            assert!(is_overlay(px[left + i], 3), "coronal top row pixel {i}");
        }
        // The gap columns are black.
        for j in 0..h {
            assert_eq!(px[j * w + 20], &[0, 0, 0]);
        }
    }
    let e = err_text(write_preview(
        &dir.join("q.png"),
        &t1,
        &labels,
        sub.dims,
        [1.0, 0.0, 1.0],
    ));
    assert!(e.contains("spacing"), "{e}");
    let e = err_text(write_preview(
        &dir.join("q.png"),
        &t1[1..],
        &labels,
        sub.dims,
        [1.0; 3],
    ));
    assert!(e.contains("T1 has"), "{e}");
    assert!(!dir.join("q.png").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
