//! Evaluation metrics: Dice, MHD and ASD against closed forms counted by hand (identical,
//! shifted, nested, disjoint cubes, single voxels, empty sets, anisotropic spacing), the
//! distance transform and the directed distances against brute force on random masks,
//! the line-vector MHD against a literal transcription of its definition, a full-size
//! 97×115×97 volume (no timing assertion), JSON output and bad input.
//!
//! Cube coordinates below are relative to the cube's own corner; every volume is padded
//! so that no object touches the volume border unless the test says so. Boundary = mask
//! voxels with a 6-neighbour outside the mask (see `masnet_wgpu::metrics`).

use masnet_wgpu::metrics::{
    asd, boundary, dice, directed_distances, distance_transform, evaluate, metrics_json, mhd,
    mhd_line_vectors, tissue_metrics, TissueMetrics, ISEG_CLASSES,
};
use masnet_wgpu::rng::Rng;

/// Closed forms are evaluated in f64 from a handful of operations, and the engine sums at
/// most a few hundred exact distances: agreement within 1e-9 leaves a wide margin.
const TOL: f64 = 1e-9;

fn close(got: f64, want: f64, what: &str) {
    assert!(
        (got - want).abs() <= TOL * want.abs().max(1.0),
        "{what}: got {got}, want {want}"
    );
}

const ISO: [f64; 3] = [1.0, 1.0, 1.0];

/// A volume of `dims` (all 0) with the boxes `[lo, hi)` painted with their labels.
fn paint(dims: [usize; 3], boxes: &[([usize; 3], [usize; 3], u8)]) -> Vec<u8> {
    let mut v = vec![0u8; dims[0] * dims[1] * dims[2]];
    for &(lo, hi, label) in boxes {
        for z in lo[2]..hi[2] {
            for y in lo[1]..hi[1] {
                for x in lo[0]..hi[0] {
                    v[x + dims[0] * (y + dims[1] * z)] = label;
                }
            }
        }
    }
    v
}

/// `(x, y, z)` of linear index `i`.
fn coords(i: usize, dims: [usize; 3]) -> [usize; 3] {
    [
        i % dims[0],
        (i / dims[0]) % dims[1],
        i / (dims[0] * dims[1]),
    ]
}

fn dist(a: [usize; 3], b: [usize; 3], s: [f64; 3]) -> f64 {
    (0..3)
        .map(|k| ((a[k] as f64 - b[k] as f64) * s[k]).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// Boundary by the definition, written independently of the library (coordinate checks).
fn brute_boundary(mask: &[bool], dims: [usize; 3]) -> Vec<[usize; 3]> {
    let inside = |c: [i64; 3]| {
        (0..3).all(|k| c[k] >= 0 && c[k] < dims[k] as i64)
            && mask[c[0] as usize + dims[0] * (c[1] as usize + dims[1] * c[2] as usize)]
    };
    let mut out = Vec::new();
    for (i, _) in mask.iter().enumerate().filter(|(_, &m)| m) {
        let c = coords(i, dims);
        let c = [c[0] as i64, c[1] as i64, c[2] as i64];
        let offs = [
            [1, 0, 0],
            [-1, 0, 0],
            [0, 1, 0],
            [0, -1, 0],
            [0, 0, 1],
            [0, 0, -1],
        ];
        if offs
            .iter()
            .any(|o| !inside([c[0] + o[0], c[1] + o[1], c[2] + o[2]]))
        {
            out.push([c[0] as usize, c[1] as usize, c[2] as usize]);
        }
    }
    out
}

/// `h(C, D)` by brute force over all pairs.
fn brute_directed(c: &[[usize; 3]], d: &[[usize; 3]], s: [f64; 3]) -> f64 {
    let sum: f64 = c
        .iter()
        .map(|&a| {
            d.iter()
                .map(|&b| dist(a, b, s))
                .fold(f64::INFINITY, f64::min)
        })
        .sum();
    sum / c.len() as f64
}

fn all_three(pred: &[u8], truth: &[u8], dims: [usize; 3], s: [f64; 3]) -> TissueMetrics {
    let m = tissue_metrics(pred, truth, dims, s, 1).unwrap();
    // The single-metric entry points agree with the combined one.
    assert_eq!(m.dice, dice(pred, truth, 1).unwrap());
    assert_eq!(m.mhd, mhd(pred, truth, dims, s, 1).unwrap());
    assert_eq!(m.asd, asd(pred, truth, dims, s, 1).unwrap());
    m
}

#[test]
fn identical_cubes() {
    let dims = [7, 6, 8];
    let v = paint(dims, &[([1, 1, 2], [5, 4, 6], 1)]);
    let m = all_three(&v, &v, dims, [0.9, 1.1, 1.3]);
    assert_eq!(m.dice, 1.0);
    assert_eq!(m.mhd, 0.0);
    assert_eq!(m.asd, 0.0);
}

/// Cube of side 4 and the same cube shifted by 1 along x. ∂ of a 4³ cube = 64 − 2³ = 56
/// voxels. For the unshifted cube A: its x=0 face (16 voxels) lies 1 voxel before B's
/// x=0 face → distance 1·sx each; its x=3 face's 4 inner voxels (y, z ∈ {1, 2}) lie
/// inside B, 1 voxel from B's x=3 face (sx) and 1 voxel from B's side faces (sy or sz)
/// → min(sx, sy, sz); every other boundary voxel of A is also on ∂B → 0. The shifted
/// cube is the mirror image, so h(∂A,∂B) = h(∂B,∂A) = (16·s_shift + 4·s_min)/56, which is
/// both MHD and ASD; isotropic: 20/56 = 5/14. Dice = 2·3·16/(2·64) = 3/4.
#[test]
fn shifted_cube_n4_k1() {
    let dims = [8, 6, 6];
    let a = paint(dims, &[([1, 1, 1], [5, 5, 5], 1)]);
    let b = paint(dims, &[([2, 1, 1], [6, 5, 5], 1)]);
    let m = all_three(&a, &b, dims, ISO);
    close(m.dice, 0.75, "dice");
    close(m.mhd, 5.0 / 14.0, "mhd");
    close(m.asd, 5.0 / 14.0, "asd");
    let (h_ab, h_ba) = directed_distances(&a, &b, dims, ISO, 1).unwrap();
    close(h_ab, 5.0 / 14.0, "h(A,B)");
    close(h_ba, 5.0 / 14.0, "h(B,A)");
}

/// Side 4 shifted by 2: A's x=0 face (16) → 2; A's x=1 ring (12, the only boundary voxels
/// of that slice) → 1 (B's x=0 face is the next slice); A's x=2 ring (12) → 0 (on ∂B);
/// A's x=3 face: ring (12) on ∂B → 0, 4 inner voxels inside B, 1 from B's side faces → 1.
/// h = (32 + 12 + 4)/56 = 6/7 both ways. Dice = 2·2·16/128 = 1/2.
#[test]
fn shifted_cube_n4_k2() {
    let dims = [9, 6, 6];
    let a = paint(dims, &[([1, 1, 1], [5, 5, 5], 1)]);
    let b = paint(dims, &[([3, 1, 1], [7, 5, 5], 1)]);
    let m = all_three(&a, &b, dims, ISO);
    close(m.dice, 0.5, "dice");
    close(m.mhd, 6.0 / 7.0, "mhd");
    close(m.asd, 6.0 / 7.0, "asd");
}

/// Side n shifted by 1 along x, n = 3..7: by the n=4 argument, the x=0 face (n² voxels)
/// → 1 and the (n−2)² inner voxels of the far face → 1, all else 0, over n³ − (n−2)³
/// boundary voxels. Dice = (n−1)/n.
#[test]
fn shifted_cube_k1_general_n() {
    for n in 3..=7usize {
        let dims = [n + 3, n + 2, n + 2];
        let a = paint(dims, &[([1, 1, 1], [n + 1, n + 1, n + 1], 1)]);
        let b = paint(dims, &[([2, 1, 1], [n + 2, n + 1, n + 1], 1)]);
        let m = all_three(&a, &b, dims, ISO);
        let inner = (n - 2) * (n - 2);
        let h = (n * n + inner) as f64 / (n * n * n - inner * (n - 2)) as f64;
        close(m.dice, (n - 1) as f64 / n as f64, &format!("dice n={n}"));
        close(m.mhd, h, &format!("mhd n={n}"));
        close(m.asd, h, &format!("asd n={n}"));
    }
}

/// The n=4, k=1 shift under anisotropic spacing: h = (16·s_shift + 4·min(s))/56. Only the
/// 16 face voxels scale with the shift axis' spacing: the 4 inner ones are nearest to a
/// side face, i.e. they take the smallest spacing.
#[test]
fn shifted_cube_anisotropic_spacing() {
    let dims = [8, 8, 8];
    let a = paint(dims, &[([1, 1, 1], [5, 5, 5], 1)]);
    let shifted = |axis: usize| {
        let mut lo = [1, 1, 1];
        let mut hi = [5, 5, 5];
        lo[axis] += 1;
        hi[axis] += 1;
        paint(dims, &[(lo, hi, 1)])
    };
    let h = |s_shift: f64, s: [f64; 3]| (16.0 * s_shift + 4.0 * s[0].min(s[1]).min(s[2])) / 56.0;
    let cases: [(usize, [f64; 3]); 5] = [
        (0, [2.5, 1.0, 1.0]), // 44/56 = 11/14
        (0, [2.5, 2.5, 2.5]), // uniform scaling: 2.5 · 5/14
        (2, [2.5, 1.5, 1.0]), // shift along z at 1 mm: unchanged 5/14
        (1, [1.0, 2.5, 0.8]),
        (2, [0.6, 0.7, 3.0]),
    ];
    for (axis, s) in cases {
        let b = shifted(axis);
        let m = all_three(&a, &b, dims, s);
        let want = h(s[axis], s);
        close(m.dice, 0.75, "dice");
        close(m.mhd, want, &format!("mhd axis {axis} spacing {s:?}"));
        close(m.asd, want, &format!("asd axis {axis} spacing {s:?}"));
    }
    close(h(2.5, [2.5, 1.0, 1.0]), 11.0 / 14.0, "closed form 11/14");
    let m = all_three(&a, &shifted(0), dims, [2.5; 3]);
    close(m.mhd, 2.5 * 5.0 / 14.0, "uniform 2.5 mm scales by 2.5");
    let m = all_three(&a, &shifted(2), dims, [2.5, 1.5, 1.0]);
    close(m.mhd, 5.0 / 14.0, "z shift at 1 mm unchanged");
}

/// Truth: cube of side 6 (∂ = 216 − 64 = 152 voxels); prediction: the centred cube of side
/// 2 (all 8 voxels on its boundary). Each inner voxel is 2 from the nearest outer face:
/// h(∂P,∂T) = 2. For an outer boundary voxel the nearest inner voxel is found per axis:
/// coordinate 0|5 → 2, 1|4 → 1, 2|3 → 0, each value taken by 2 coordinates; boundary
/// voxels are the triples with at least one 2. Summing sqrt(u²+v²+w²) over those 19 value
/// triples (weight 2³ each, 19·8 = 152): one 2: 3·(√4 + 2√5 + √6); two 2s: 3·(√8 + √9);
/// three: √12. h(∂T,∂P) = (15 + 6√5 + 3√6 + 6√2 + 2√3)/19. Dice = 2·8/(8 + 216) = 1/14.
#[test]
fn nested_cubes() {
    let dims = [8, 8, 8];
    let truth = paint(dims, &[([1, 1, 1], [7, 7, 7], 1)]);
    let pred = paint(dims, &[([3, 3, 3], [5, 5, 5], 1)]);
    let h_tp =
        (15.0 + 6.0 * 5f64.sqrt() + 3.0 * 6f64.sqrt() + 6.0 * 2f64.sqrt() + 2.0 * 3f64.sqrt())
            / 19.0;
    let (h_pt, h_tp_got) = directed_distances(&pred, &truth, dims, ISO, 1).unwrap();
    close(h_pt, 2.0, "h(inner, outer)");
    close(h_tp_got, h_tp, "h(outer, inner)");
    let m = all_three(&pred, &truth, dims, ISO);
    close(m.dice, 1.0 / 14.0, "dice");
    close(m.mhd, h_tp, "mhd");
    close(m.asd, 0.5 * (2.0 + h_tp), "asd");
}

/// Two 2³ cubes (every voxel a boundary voxel) at x ∈ {1, 2} and x ∈ {11, 12}: each
/// voxel's nearest partner lies straight along x, at 10 (x=1 ↔ 11) or 9 (x=2 ↔ 11), and
/// half of the voxels take each: mean 9.5 both ways.
#[test]
fn disjoint_far_apart_cubes() {
    let dims = [14, 4, 4];
    let a = paint(dims, &[([1, 1, 1], [3, 3, 3], 1)]);
    let b = paint(dims, &[([11, 1, 1], [13, 3, 3], 1)]);
    let m = all_three(&a, &b, dims, ISO);
    assert_eq!(m.dice, 0.0);
    close(m.mhd, 9.5, "mhd");
    close(m.asd, 9.5, "asd");
    // Spacing across the shift axis does not matter; along it, distances scale.
    let m = all_three(&a, &b, dims, [0.5, 2.0, 3.0]);
    close(m.mhd, 4.75, "mhd anisotropic");
    close(m.asd, 4.75, "asd anisotropic");
}

#[test]
fn single_voxel_objects() {
    let dims = [6, 5, 5];
    let s = [0.7, 1.3, 2.0];
    let p = paint(dims, &[([1, 2, 3], [2, 3, 4], 1)]);
    let t = paint(dims, &[([4, 0, 3], [5, 1, 4], 1)]);
    let d = ((3.0 * 0.7f64).powi(2) + (2.0 * 1.3f64).powi(2)).sqrt();
    let m = all_three(&p, &t, dims, s);
    assert_eq!(m.dice, 0.0);
    close(m.mhd, d, "mhd of two single voxels");
    close(m.asd, d, "asd of two single voxels");

    let m = all_three(&p, &p, dims, s);
    assert_eq!((m.dice, m.mhd, m.asd), (1.0, 0.0, 0.0));

    // One voxel at the centre of a 3³ cube: the centre is 1 from the face centres, the
    // cube's 26 boundary voxels are 1 (6 faces), √2 (12 edges), √3 (8 corners) from it.
    let dims = [5, 5, 5];
    let p = paint(dims, &[([2, 2, 2], [3, 3, 3], 1)]);
    let t = paint(dims, &[([1, 1, 1], [4, 4, 4], 1)]);
    let h_tp = (6.0 + 12.0 * 2f64.sqrt() + 8.0 * 3f64.sqrt()) / 26.0;
    let m = all_three(&p, &t, dims, ISO);
    close(m.dice, 2.0 / 28.0, "dice voxel vs cube");
    close(m.mhd, h_tp, "mhd voxel vs cube");
    close(m.asd, 0.5 * (1.0 + h_tp), "asd voxel vs cube");
}

#[test]
fn empty_sets() {
    let dims = [6, 6, 6];
    let empty = vec![0u8; 216];
    let cube = paint(dims, &[([1, 1, 1], [4, 4, 4], 1)]);
    // Empty prediction, non-empty truth (and the reverse).
    for (p, t) in [(&empty, &cube), (&cube, &empty)] {
        let m = all_three(p, t, dims, ISO);
        assert_eq!(m.dice, 0.0);
        assert_eq!(m.mhd, f64::INFINITY);
        assert_eq!(m.asd, f64::INFINITY);
        let (a, b) = directed_distances(p, t, dims, ISO, 1).unwrap();
        assert_eq!((a, b), (f64::INFINITY, f64::INFINITY));
    }
    // Both empty: perfect agreement.
    let m = all_three(&empty, &empty, dims, ISO);
    assert_eq!((m.dice, m.mhd, m.asd), (1.0, 0.0, 0.0));
    // Other labels present but not the evaluated class.
    let other = paint(dims, &[([0, 0, 0], [3, 3, 3], 2)]);
    let m = all_three(&other, &empty, dims, ISO);
    assert_eq!((m.dice, m.mhd, m.asd), (1.0, 0.0, 0.0));
}

#[test]
fn boundary_definition() {
    // 3³ cube inside a 5³ volume: 26 boundary voxels, the centre is not one.
    let dims = [5, 5, 5];
    let v = paint(dims, &[([1, 1, 1], [4, 4, 4], 1)]);
    let mask: Vec<bool> = v.iter().map(|&l| l == 1).collect();
    let b = boundary(&mask, dims).unwrap();
    assert_eq!(b.iter().filter(|&&x| x).count(), 26);
    assert!(!b[2 + 5 * (2 + 5 * 2)]);
    // A mask filling the volume: the volume border counts as outside → its outer layer.
    let dims = [4, 5, 3];
    let full = vec![true; 60];
    let b = boundary(&full, dims).unwrap();
    assert_eq!(b.iter().filter(|&&x| x).count(), 60 - 2 * 3);
    // A single-slice volume: everything is on the border.
    let b = boundary(&[true; 12], [4, 3, 1]).unwrap();
    assert!(b.iter().all(|&x| x));
    // Random masks against the coordinate-based definition.
    let mut rng = Rng::new(11);
    for dims in [[6, 5, 4], [1, 7, 3], [5, 1, 1], [3, 3, 3]] {
        let n = dims.iter().product();
        let mask: Vec<bool> = (0..n).map(|_| rng.uniform() < 0.6).collect();
        let got: Vec<[usize; 3]> = boundary(&mask, dims)
            .unwrap()
            .iter()
            .enumerate()
            .filter(|(_, &x)| x)
            .map(|(i, _)| coords(i, dims))
            .collect();
        assert_eq!(got, brute_boundary(&mask, dims), "dims {dims:?}");
    }
}

/// The distance transform against brute force on random masks with random anisotropic
/// spacing: dense, sparse (a few features), one feature, and none (all infinite).
#[test]
fn distance_transform_matches_brute_force() {
    let mut rng = Rng::new(2024);
    let shapes = [
        [7, 5, 6],
        [1, 9, 4],
        [11, 1, 1],
        [4, 4, 4],
        [9, 8, 3],
        [2, 13, 5],
    ];
    for (case, dims) in shapes.iter().cycle().take(24).enumerate() {
        let dims = *dims;
        let n: usize = dims.iter().product();
        let spacing = [
            0.5 + 2.5 * rng.uniform(),
            0.5 + 2.5 * rng.uniform(),
            0.5 + 2.5 * rng.uniform(),
        ];
        let density = [0.5, 0.15, 0.03, 0.0][case % 4];
        let mut feat: Vec<bool> = (0..n).map(|_| rng.uniform() < density).collect();
        if case % 4 == 2 {
            feat.iter_mut().for_each(|f| *f = false);
            feat[rng.below(n)] = true;
        }
        let got = distance_transform(&feat, dims, spacing).unwrap();
        let fs: Vec<[usize; 3]> = (0..n)
            .filter(|&i| feat[i])
            .map(|i| coords(i, dims))
            .collect();
        for (i, &g) in got.iter().enumerate() {
            let c = coords(i, dims);
            let want = fs
                .iter()
                .map(|&f| dist(c, f, spacing))
                .fold(f64::INFINITY, f64::min);
            if want.is_infinite() {
                assert_eq!(
                    g,
                    f64::INFINITY,
                    "case {case}: voxel {c:?} should be infinite"
                );
            } else {
                close(g, want, &format!("case {case} dims {dims:?} voxel {c:?}"));
            }
        }
    }
}

/// Directed distances, MHD and ASD against brute force over the boundary sets, on random
/// blobby label volumes with anisotropic spacing, for every class.
#[test]
fn distances_match_brute_force_on_random_volumes() {
    let mut rng = Rng::new(7);
    for case in 0..8 {
        let dims = [5 + rng.below(6), 4 + rng.below(6), 3 + rng.below(6)];
        let spacing = [
            0.6 + 2.0 * rng.uniform(),
            0.6 + 2.0 * rng.uniform(),
            0.6 + 2.0 * rng.uniform(),
        ];
        let random_boxes = |rng: &mut Rng| {
            let mut boxes = Vec::new();
            for _ in 0..6 {
                let lo = [rng.below(dims[0]), rng.below(dims[1]), rng.below(dims[2])];
                let hi = [
                    lo[0] + 1 + rng.below(dims[0] - lo[0]),
                    lo[1] + 1 + rng.below(dims[1] - lo[1]),
                    lo[2] + 1 + rng.below(dims[2] - lo[2]),
                ];
                boxes.push((lo, hi, 1 + rng.below(3) as u8));
            }
            paint(dims, &boxes)
        };
        let pred = random_boxes(&mut rng);
        let truth = random_boxes(&mut rng);
        for class in 1..=3u8 {
            let mp: Vec<bool> = pred.iter().map(|&l| l == class).collect();
            let mt: Vec<bool> = truth.iter().map(|&l| l == class).collect();
            let (bp, bt) = (brute_boundary(&mp, dims), brute_boundary(&mt, dims));
            let (a, b) = directed_distances(&pred, &truth, dims, spacing, class).unwrap();
            if bp.is_empty() || bt.is_empty() {
                let want = if bp.is_empty() && bt.is_empty() {
                    0.0
                } else {
                    f64::INFINITY
                };
                assert_eq!((a, b), (want, want), "case {case} class {class}");
                continue;
            }
            let (wa, wb) = (
                brute_directed(&bp, &bt, spacing),
                brute_directed(&bt, &bp, spacing),
            );
            let what = format!("case {case} class {class} dims {dims:?}");
            close(a, wa, &format!("{what} h(P,T)"));
            close(b, wb, &format!("{what} h(T,P)"));
            close(
                mhd(&pred, &truth, dims, spacing, class).unwrap(),
                wa.max(wb),
                &what,
            );
            close(
                asd(&pred, &truth, dims, spacing, class).unwrap(),
                0.5 * (wa + wb),
                &what,
            );
        }
    }
}

/// A volume of the real size completes (no timing assertion): random labels (nearly
/// every voxel a boundary voxel) and concentric shells at 1 mm × 1 mm × 1 mm.
#[test]
fn full_size_volume_completes() {
    let dims = [97, 115, 97];
    let n = dims[0] * dims[1] * dims[2];
    let mut rng = Rng::new(5);
    let pred: Vec<u8> = (0..n).map(|_| rng.below(4) as u8).collect();
    let truth: Vec<u8> = (0..n).map(|_| rng.below(4) as u8).collect();
    let rows = evaluate(&pred, &truth, dims, [1.0, 1.0, 1.0], &ISEG_CLASSES).unwrap();
    assert_eq!(rows.len(), 4);
    for (name, m) in &rows {
        assert!(m.dice > 0.15 && m.dice < 0.35, "{name}: {m:?}");
        assert!(
            m.mhd.is_finite() && m.mhd >= 0.0 && m.mhd < 2.0,
            "{name}: {m:?}"
        );
        assert!(
            m.asd.is_finite() && m.asd >= 0.0 && m.asd <= m.mhd,
            "{name}: {m:?}"
        );
    }

    // Concentric ellipsoidal shells WM ⊂ GM ⊂ CSF, prediction with slightly larger radii.
    let shells = |grow: f64| -> Vec<u8> {
        let mut v = vec![0u8; n];
        for z in 0..dims[2] {
            for y in 0..dims[1] {
                for x in 0..dims[0] {
                    let r = (((x as f64 - 48.0) / 40.0).powi(2)
                        + ((y as f64 - 57.0) / 50.0).powi(2)
                        + ((z as f64 - 48.0) / 40.0).powi(2))
                    .sqrt();
                    v[x + dims[0] * (y + dims[1] * z)] = if r < 0.5 + grow {
                        3
                    } else if r < 0.8 + grow {
                        2
                    } else if r < 1.0 {
                        1
                    } else {
                        0
                    };
                }
            }
        }
        v
    };
    let rows = evaluate(
        &shells(0.03),
        &shells(0.0),
        dims,
        [1.0, 1.2, 0.9],
        &ISEG_CLASSES,
    )
    .unwrap();
    for (name, m) in &rows {
        assert!(m.dice > 0.8 && m.dice <= 1.0, "{name}: {m:?}");
        assert!(
            m.mhd.is_finite() && m.mhd > 0.0 && m.mhd < 3.0,
            "{name}: {m:?}"
        );
        assert!(m.asd > 0.0 && m.asd <= m.mhd, "{name}: {m:?}");
    }
}

#[test]
fn evaluate_rows_mean_and_json() {
    let dims = [8, 6, 6];
    let truth = paint(
        dims,
        &[([1, 1, 1], [5, 5, 5], 1), ([6, 0, 0], [7, 2, 2], 2)],
    );
    let pred = paint(
        dims,
        &[([2, 1, 1], [6, 5, 5], 1), ([6, 0, 0], [7, 2, 2], 2)],
    );
    let rows = evaluate(
        &pred,
        &truth,
        dims,
        ISO,
        &[(1, "csf"), (2, "gm"), (3, "wm")],
    )
    .unwrap();
    let names: Vec<&str> = rows.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["csf", "gm", "wm", "mean"]);
    close(rows[0].1.dice, 0.75, "csf dice");
    close(rows[0].1.mhd, 5.0 / 14.0, "csf mhd");
    assert_eq!(
        (rows[1].1.dice, rows[1].1.mhd, rows[1].1.asd),
        (1.0, 0.0, 0.0)
    );
    assert_eq!(
        (rows[2].1.dice, rows[2].1.mhd, rows[2].1.asd),
        (1.0, 0.0, 0.0)
    ); // absent
    close(rows[3].1.dice, (0.75 + 2.0) / 3.0, "mean dice");
    close(rows[3].1.mhd, 5.0 / 42.0, "mean mhd");
    close(rows[3].1.asd, 5.0 / 42.0, "mean asd");

    let json = metrics_json(&rows).unwrap();
    assert!(json.starts_with("{\"csf\":{\"dice\":"), "{json}");
    let order: Vec<usize> = ["\"csf\"", "\"gm\"", "\"wm\"", "\"mean\""]
        .iter()
        .map(|k| json.find(k).unwrap())
        .collect();
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "row order kept: {json}"
    );
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["csf"]["dice"], 0.75);
    assert_eq!(v["gm"]["mhd"], 0.0);
    assert_eq!(v["wm"]["asd"], 0.0);
    assert_eq!(v.as_object().unwrap().len(), 4);

    // A class missing from the prediction: infinite distances, JSON null, infinite mean.
    let pred_no_gm = paint(dims, &[([2, 1, 1], [6, 5, 5], 1)]);
    let rows = evaluate(&pred_no_gm, &truth, dims, ISO, &ISEG_CLASSES).unwrap();
    assert_eq!(rows[1].1.mhd, f64::INFINITY);
    assert_eq!(rows[3].1.asd, f64::INFINITY);
    let v: serde_json::Value = serde_json::from_str(&metrics_json(&rows).unwrap()).unwrap();
    assert!(v["gm"]["mhd"].is_null());
    assert_eq!(v["gm"]["dice"], 0.0);
}

#[test]
fn bad_input_is_rejected() {
    let dims = [4, 3, 2];
    let a = vec![1u8; 24];
    let short = vec![1u8; 23];
    let err = |r: masnet_wgpu::Result<f64>| r.unwrap_err().to_string();

    let e = err(dice(&a, &short, 1));
    assert!(
        e.contains("dice") && e.contains("24") && e.contains("23"),
        "{e}"
    );
    let e = err(mhd(&a, &short, dims, ISO, 1));
    assert!(
        e.contains("mhd") && e.contains("24") && e.contains("23"),
        "{e}"
    );
    let e = err(asd(&short, &short, dims, ISO, 1));
    assert!(e.contains("asd") && e.contains("dims [4, 3, 2]"), "{e}");
    let e = err(mhd(&a, &a, [4, 3, 0], ISO, 1));
    assert!(e.contains("zero extent"), "{e}");
    let e = err(mhd(&a, &a, [usize::MAX, 2, 2], ISO, 1));
    assert!(e.contains("overflow"), "{e}");
    for bad in [
        [0.0, 1.0, 1.0],
        [1.0, -1.0, 1.0],
        [1.0, 1.0, f64::NAN],
        [f64::INFINITY, 1.0, 1.0],
    ] {
        let e = err(asd(&a, &a, dims, bad, 1));
        assert!(e.contains("spacing"), "{e}");
    }
    let e = err(mhd_line_vectors(&a, &short, dims, 1));
    assert!(e.contains("mhd_line_vectors"), "{e}");

    let e = evaluate(&a, &short, dims, ISO, &ISEG_CLASSES)
        .unwrap_err()
        .to_string();
    assert!(e.contains("evaluate") && e.contains("23"), "{e}");
    let e = evaluate(&a, &a, [5, 3, 2], ISO, &ISEG_CLASSES)
        .unwrap_err()
        .to_string();
    assert!(e.contains("dims [5, 3, 2] hold 30"), "{e}");
    let e = evaluate(&a, &a, dims, ISO, &[]).unwrap_err().to_string();
    assert!(e.contains("no classes"), "{e}");
    let e = boundary(&[true; 5], dims).unwrap_err().to_string();
    assert!(e.contains("boundary") && e.contains("5"), "{e}");
    let e = distance_transform(&[true; 24], dims, [1.0, 0.0, 1.0])
        .unwrap_err()
        .to_string();
    assert!(e.contains("spacing"), "{e}");
}

/// Literal transcription of `MHD_3D` (Wang et al.): lines as points, no deduplication.
fn naive_line_mhd(pred: &[u8], truth: &[u8], dims: [usize; 3], class: u8) -> f64 {
    let lines = |v: &[u8], axis: usize| -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let (a, b) = match axis {
            0 => (1, 2),
            1 => (0, 2),
            _ => (0, 1),
        };
        for j in 0..dims[b] {
            for i in 0..dims[a] {
                let mut c = [0usize; 3];
                c[a] = i;
                c[b] = j;
                out.push(
                    (0..dims[axis])
                        .map(|k| {
                            c[axis] = k;
                            u8::from(v[c[0] + dims[0] * (c[1] + dims[1] * c[2])] == class)
                        })
                        .collect(),
                );
            }
        }
        out
    };
    let directed = |a: &[Vec<u8>], b: &[Vec<u8>]| -> f64 {
        a.iter()
            .map(|la| {
                b.iter()
                    .map(|lb| {
                        let sq: i64 = la
                            .iter()
                            .zip(lb)
                            .map(|(&x, &y)| (x as i64 - y as i64).pow(2))
                            .sum();
                        (sq as f64).sqrt()
                    })
                    .fold(f64::INFINITY, f64::min)
            })
            .sum::<f64>()
            / a.len() as f64
    };
    (0..3)
        .map(|axis| {
            let (a, b) = (lines(pred, axis), lines(truth, axis));
            directed(&a, &b).max(directed(&b, &a))
        })
        .sum::<f64>()
        / 3.0
}

#[test]
fn line_vector_mhd() {
    // dims [2,2,1], prediction {(0,0,0)}, truth {(1,0,0)}. Lines along x: P {[1,0],[0,0]},
    // T {[0,1],[0,0]} → [1,0] is 1 from [0,0], mean 1/2 both ways. Along y: P {[1,0],[0,0]},
    // T {[0,0],[1,0]}: the same set → 0. Along z (length 1): both sets {[1],[0]} → 0.
    // Mean over the axes = 1/6.
    let dims = [2, 2, 1];
    let p = [1, 0, 0, 0];
    let t = [0, 1, 0, 0];
    close(
        mhd_line_vectors(&p, &t, dims, 1).unwrap(),
        1.0 / 6.0,
        "2x2 example",
    );
    // dims [3,1,1], prediction [1,1,0], truth empty: along x one line each, Hamming 2 → √2;
    // along y and z three 1-long lines: P {1,1,0} → (1+1+0)/3 = 2/3, T → 0; max 2/3.
    let dims = [3, 1, 1];
    let got = mhd_line_vectors(&[1, 1, 0], &[0, 0, 0], dims, 1).unwrap();
    close(got, (2f64.sqrt() + 4.0 / 3.0) / 3.0, "3x1x1 example");
    // Identical volumes → 0; always finite, even for an empty class.
    let dims = [5, 4, 3];
    let v = paint(dims, &[([1, 1, 1], [4, 3, 2], 2)]);
    assert_eq!(mhd_line_vectors(&v, &v, dims, 2).unwrap(), 0.0);
    assert_eq!(mhd_line_vectors(&v, &v, dims, 3).unwrap(), 0.0);
    // Random volumes (including lines longer than 64 voxels) against the transcription.
    let mut rng = Rng::new(99);
    for dims in [[6, 5, 4], [3, 7, 5], [70, 3, 2], [4, 4, 4]] {
        let n = dims.iter().product();
        let p: Vec<u8> = (0..n).map(|_| rng.below(3) as u8).collect();
        let mut t = p.clone();
        for _ in 0..n / 4 {
            t[rng.below(n)] = rng.below(3) as u8;
        }
        for class in 0..3u8 {
            close(
                mhd_line_vectors(&p, &t, dims, class).unwrap(),
                naive_line_mhd(&p, &t, dims, class),
                &format!("dims {dims:?} class {class}"),
            );
        }
    }
}
