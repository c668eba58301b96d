//! Batched matmul (all four transpose combinations) and row softmax, forward and
//! backward: GPU against the f64 CPU references, the CPU backward against finite
//! differences inside a small graph, and bad input.

mod common;

use common::{assert_close, gpu, random};
use masnet_wgpu::ops::matmul::{
    batched_matmul, batched_matmul_backward, batched_matmul_backward_f64, batched_matmul_f64,
    softmax_rows_backward, softmax_rows_backward_f64, softmax_rows_f64, softmax_rows_forward,
};
use masnet_wgpu::rng::Rng;
use masnet_wgpu::{GpuContext, Shape5, Tensor};
use ndarray::Array5;

/// Sums of up to 64 products of values in [-1, 1): f32 rounding ~1e-6 · sqrt(K) · |terms|.
const MM_RTOL: f32 = 1e-4;
const MM_ATOL: f32 = 1e-5;
/// Softmax probabilities and their gradients: a few f32 ops per element plus a row sum.
const SM_RTOL: f32 = 1e-5;
const SM_ATOL: f32 = 1e-6;

fn flat(a: &Array5<f64>) -> Vec<f32> {
    a.iter().map(|&v| v as f32).collect()
}

/// `[1, 1, batch, rows, cols]`.
fn mat(batch: usize, rows: usize, cols: usize) -> [usize; 5] {
    [1, 1, batch, rows, cols]
}

/// Stored shapes of A and B for op(A) = M x K, op(B) = K x N.
fn stored(
    batch: usize,
    m: usize,
    k: usize,
    n: usize,
    ta: bool,
    tb: bool,
) -> ([usize; 5], [usize; 5]) {
    let a = if ta {
        mat(batch, k, m)
    } else {
        mat(batch, m, k)
    };
    let b = if tb {
        mat(batch, n, k)
    } else {
        mat(batch, k, n)
    };
    (a, b)
}

fn check_matmul(ctx: &GpuContext, sa: [usize; 5], sb: [usize; 5], ta: bool, tb: bool, seed: u64) {
    let a = random(sa, seed);
    let b = random(sb, seed + 1);
    let (a64, b64) = (a.mapv(f64::from), b.mapv(f64::from));
    let want = batched_matmul_f64(&a64, &b64, ta, tb).unwrap();
    let cs = want.shape().to_vec();
    let dc = random([cs[0], cs[1], cs[2], cs[3], cs[4]], seed + 2);
    let (want_da, want_db) =
        batched_matmul_backward_f64(&a64, &b64, &dc.mapv(f64::from), ta, tb).unwrap();
    let at = Tensor::from_array(ctx, &a, "a").unwrap();
    let bt = Tensor::from_array(ctx, &b, "b").unwrap();
    let dct = Tensor::from_array(ctx, &dc, "dc").unwrap();
    let ct = Tensor::zeros(ctx, Shape5::new(cs[0], cs[1], cs[2], cs[3], cs[4]), "c").unwrap();
    let da = Tensor::zeros(ctx, at.shape(), "da").unwrap();
    let db = Tensor::zeros(ctx, bt.shape(), "db").unwrap();
    let mut rec = ctx.recorder();
    batched_matmul(ctx, &mut rec, &at, &bt, &ct, ta, tb).unwrap();
    batched_matmul_backward(ctx, &mut rec, &at, &bt, &dct, Some(&da), Some(&db), ta, tb).unwrap();
    ctx.submit(rec);
    let what = format!("A {sa:?} B {sb:?} trans ({ta}, {tb})");
    assert_close(
        &ct.to_vec(ctx).unwrap(),
        &flat(&want),
        MM_RTOL,
        MM_ATOL,
        &format!("C of {what}"),
    );
    assert_close(
        &da.to_vec(ctx).unwrap(),
        &flat(&want_da),
        MM_RTOL,
        MM_ATOL,
        &format!("dA of {what}"),
    );
    assert_close(
        &db.to_vec(ctx).unwrap(),
        &flat(&want_db),
        MM_RTOL,
        MM_ATOL,
        &format!("dB of {what}"),
    );
}

const TRANSPOSES: [(bool, bool); 4] = [(false, false), (false, true), (true, false), (true, true)];

#[test]
fn matmul_matches_cpu_for_all_transposes() {
    let ctx = gpu();
    for (i, (ta, tb)) in TRANSPOSES.iter().enumerate() {
        let (sa, sb) = stored(3, 5, 7, 6, *ta, *tb);
        check_matmul(&ctx, sa, sb, *ta, *tb, 10 + 3 * i as u64);
    }
}

#[test]
fn matmul_matches_cpu_on_larger_and_ragged_blocks() {
    let ctx = gpu();
    // One full 64^3 product, then sizes that straddle the 32 x 32 block and the K step 8.
    let (sa, sb) = stored(1, 64, 64, 64, false, false);
    check_matmul(&ctx, sa, sb, false, false, 40);
    for (i, (ta, tb)) in TRANSPOSES.iter().enumerate() {
        let (sa, sb) = stored(2, 33, 17, 35, *ta, *tb);
        check_matmul(&ctx, sa, sb, *ta, *tb, 50 + 3 * i as u64);
    }
    let (sa, sb) = stored(2, 1, 1, 1, false, true);
    check_matmul(&ctx, sa, sb, false, true, 70);
    // Leading dims fold into the batch: [3, 1, 1, ..] times [1, 1, 3, ..].
    check_matmul(&ctx, [3, 1, 1, 5, 7], [1, 1, 3, 7, 6], false, false, 80);
}

#[test]
fn matmul_backward_writes_only_the_requested_gradient() {
    let ctx = gpu();
    let (sa, sb) = stored(3, 5, 7, 6, true, false);
    let a = random(sa, 1);
    let b = random(sb, 2);
    let dc = random(mat(3, 5, 6), 3);
    let (_, want_db) = batched_matmul_backward_f64(
        &a.mapv(f64::from),
        &b.mapv(f64::from),
        &dc.mapv(f64::from),
        true,
        false,
    )
    .unwrap();
    let at = Tensor::from_array(&ctx, &a, "a").unwrap();
    let bt = Tensor::from_array(&ctx, &b, "b").unwrap();
    let dct = Tensor::from_array(&ctx, &dc, "dc").unwrap();
    let db = Tensor::zeros(&ctx, bt.shape(), "db").unwrap();
    let mut rec = ctx.recorder();
    batched_matmul_backward(&ctx, &mut rec, &at, &bt, &dct, None, Some(&db), true, false).unwrap();
    ctx.submit(rec);
    assert_close(
        &db.to_vec(&ctx).unwrap(),
        &flat(&want_db),
        MM_RTOL,
        MM_ATOL,
        "dB only",
    );
}

#[test]
fn softmax_rows_match_cpu() {
    let ctx = gpu();
    for (i, shape) in [
        [2, 3, 1, 5, 37],
        [1, 1, 2, 3, 150],
        [1, 2, 1, 3, 1],
        [2, 1, 5, 7, 6],
    ]
    .iter()
    .enumerate()
    {
        let x = random(*shape, 100 + i as u64).mapv(|v| 5.0 * v);
        let dy = random(*shape, 200 + i as u64);
        let y64 = softmax_rows_f64(&x.mapv(f64::from));
        let want_dx = softmax_rows_backward_f64(&y64, &dy.mapv(f64::from)).unwrap();
        let s = Shape5::new(shape[0], shape[1], shape[2], shape[3], shape[4]);
        let xt = Tensor::from_array(&ctx, &x, "x").unwrap();
        let yt = Tensor::zeros(&ctx, s, "y").unwrap();
        let dyt = Tensor::from_array(&ctx, &dy, "dy").unwrap();
        let dxt = Tensor::zeros(&ctx, s, "dx").unwrap();
        let mut rec = ctx.recorder();
        softmax_rows_forward(&ctx, &mut rec, &xt, &yt).unwrap();
        // The backward reads the GPU's own y.
        softmax_rows_backward(&ctx, &mut rec, &yt, &dyt, &dxt).unwrap();
        ctx.submit(rec);
        assert_close(
            &yt.to_vec(&ctx).unwrap(),
            &flat(&y64),
            SM_RTOL,
            SM_ATOL,
            &format!("row softmax {shape:?}"),
        );
        assert_close(
            &dxt.to_vec(&ctx).unwrap(),
            &flat(&want_dx),
            SM_RTOL,
            SM_ATOL,
            &format!("row softmax gradient {shape:?}"),
        );
    }
}

#[test]
fn softmax_rows_are_stable_for_huge_values() {
    let ctx = gpu();
    let x = random([1, 1, 2, 3, 70], 5).mapv(|v| 1e4 * v);
    let xt = Tensor::from_array(&ctx, &x, "x").unwrap();
    let yt = Tensor::zeros(&ctx, xt.shape(), "y").unwrap();
    let mut rec = ctx.recorder();
    softmax_rows_forward(&ctx, &mut rec, &xt, &yt).unwrap();
    ctx.submit(rec);
    let want = softmax_rows_f64(&x.mapv(f64::from));
    assert_close(
        &yt.to_vec(&ctx).unwrap(),
        &flat(&want),
        SM_RTOL,
        SM_ATOL,
        "huge rows",
    );
}

fn fd_check(
    name: &str,
    total: impl Fn(&Array5<f64>, &Array5<f64>) -> f64,
    x: &Array5<f64>,
    a: &Array5<f64>,
    dx: &Array5<f64>,
    da: &Array5<f64>,
) {
    let h = 1e-6;
    let mut rng = Rng::new(11);
    let s = x.shape().to_vec();
    for _ in 0..30 {
        let i = [
            rng.below(s[0]),
            rng.below(s[1]),
            rng.below(s[2]),
            rng.below(s[3]),
            rng.below(s[4]),
        ];
        let (mut xp, mut xm) = (x.clone(), x.clone());
        xp[i] += h;
        xm[i] -= h;
        let fd = (total(&xp, a) - total(&xm, a)) / (2.0 * h);
        assert!(
            (fd - dx[i]).abs() <= 1e-7 + 1e-6 * fd.abs(),
            "{name} dx{i:?}: fd {fd} vs {}",
            dx[i]
        );
        let (mut ap, mut am) = (a.clone(), a.clone());
        ap[i] += h;
        am[i] -= h;
        let fd = (total(x, &ap) - total(x, &am)) / (2.0 * h);
        assert!(
            (fd - da[i]).abs() <= 1e-7 + 1e-6 * fd.abs(),
            "{name} da{i:?}: fd {fd} vs {}",
            da[i]
        );
    }
}

/// Finite differences in f64: A = a ⊙ x + b, L = Σ R ⊙ (op(A) · op(B)) for every
/// transpose pair (dL/dx, dL/da through dA; dL/dB directly).
#[test]
fn cpu_matmul_gradients_pass_finite_differences() {
    for (i, (ta, tb)) in TRANSPOSES.iter().enumerate() {
        let (sa, sb) = stored(2, 3, 4, 5, *ta, *tb);
        let seed = 10 * i as u64;
        let x = random(sa, seed).mapv(f64::from);
        let a = random(sa, seed + 1).mapv(f64::from);
        let b = random(sa, seed + 2).mapv(f64::from);
        let bm = random(sb, seed + 3).mapv(f64::from);
        let r = random(mat(2, 3, 5), seed + 4).mapv(f64::from);
        let loss = |x: &Array5<f64>, a: &Array5<f64>, bm: &Array5<f64>| {
            let c = batched_matmul_f64(&(a * x + &b), bm, *ta, *tb).unwrap();
            (&r * &c).sum()
        };
        let (d_a, d_b) = batched_matmul_backward_f64(&(&a * &x + &b), &bm, &r, *ta, *tb).unwrap();
        let name = format!("matmul trans ({ta}, {tb})");
        fd_check(
            &name,
            |x, a| loss(x, a, &bm),
            &x,
            &a,
            &(&a * &d_a),
            &(&x * &d_a),
        );
        // dB against finite differences in B itself.
        let h = 1e-6;
        for (idx, &g) in d_b.indexed_iter() {
            let (mut bp, mut bmn) = (bm.clone(), bm.clone());
            bp[idx] += h;
            bmn[idx] -= h;
            let fd = (loss(&x, &a, &bp) - loss(&x, &a, &bmn)) / (2.0 * h);
            assert!(
                (fd - g).abs() <= 1e-7 + 1e-6 * fd.abs(),
                "{name} dB{idx:?}: fd {fd} vs {g}"
            );
        }
    }
}

/// Finite differences in f64: z = a ⊙ x + b, L = Σ R ⊙ softmax_rows(z).
#[test]
fn cpu_softmax_rows_gradient_passes_finite_differences() {
    let shape = [2, 1, 3, 4, 7];
    let x = random(shape, 1).mapv(|v| 2.0 * f64::from(v));
    let a = random(shape, 2).mapv(f64::from);
    let b = random(shape, 3).mapv(f64::from);
    let r = random(shape, 4).mapv(f64::from);
    let total = |x: &Array5<f64>, a: &Array5<f64>| (&r * &softmax_rows_f64(&(a * x + &b))).sum();
    let y = softmax_rows_f64(&(&a * &x + &b));
    let dz = softmax_rows_backward_f64(&y, &r).unwrap();
    fd_check("row softmax", total, &x, &a, &(&a * &dz), &(&x * &dz));
}

#[test]
fn bad_input_is_an_error_naming_the_problem() {
    let ctx = gpu();
    let t = |s: [usize; 5], name: &str| {
        Tensor::zeros(&ctx, Shape5::new(s[0], s[1], s[2], s[3], s[4]), name).unwrap()
    };
    let a = t(mat(3, 5, 7), "a");
    let b = t(mat(3, 7, 6), "b");
    let c = t(mat(3, 5, 6), "c");
    let b_k = t(mat(3, 8, 6), "b_k");
    let b_batch = t(mat(2, 7, 6), "b_batch");
    let c_bad = t(mat(3, 6, 5), "c_bad");
    let mut rec = ctx.recorder();
    let r = &mut rec;
    let msg = |e: masnet_wgpu::Error| e.to_string();

    let e = msg(batched_matmul(&ctx, r, &a, &b_k, &c, false, false).unwrap_err());
    assert!(e.contains("inner dimensions") && e.contains("'b_k'"), "{e}");
    let e = msg(batched_matmul(&ctx, r, &a, &b_batch, &c, false, false).unwrap_err());
    assert!(
        e.contains("batch counts differ") && e.contains("'b_batch'"),
        "{e}"
    );
    let e = msg(batched_matmul(&ctx, r, &a, &b, &c_bad, false, false).unwrap_err());
    assert!(e.contains("'c_bad'") && e.contains("5x6"), "{e}");
    // A transposed no longer fits B.
    let e = msg(batched_matmul(&ctx, r, &a, &b, &c, true, false).unwrap_err());
    assert!(
        e.contains("inner dimensions") && e.contains("trans_a = true"),
        "{e}"
    );
    let sq = t(mat(3, 5, 5), "sq");
    let sq2 = t(mat(3, 5, 5), "sq2");
    let e = msg(batched_matmul(&ctx, r, &sq, &sq2, &sq, false, false).unwrap_err());
    assert!(e.contains("alias"), "{e}");
    let e = msg(
        batched_matmul_backward(&ctx, r, &a, &b, &c, Some(&b), None, false, false).unwrap_err(),
    );
    assert!(e.contains("da 'b'"), "{e}");
    let e = msg(
        batched_matmul_backward(&ctx, r, &a, &b, &c_bad, None, None, false, false).unwrap_err(),
    );
    assert!(e.contains("'c_bad'"), "{e}");

    let x = t([1, 1, 2, 3, 4], "x");
    let y_bad = t([1, 1, 2, 4, 3], "y_bad");
    let e = msg(softmax_rows_forward(&ctx, r, &x, &y_bad).unwrap_err());
    assert!(e.contains("'y_bad'") && e.contains("shape"), "{e}");
    let e = msg(softmax_rows_forward(&ctx, r, &x, &x).unwrap_err());
    assert!(e.contains("alias"), "{e}");
    let y = t([1, 1, 2, 3, 4], "y");
    let e = msg(softmax_rows_backward(&ctx, r, &y, &y_bad, &x).unwrap_err());
    assert!(e.contains("'y_bad'"), "{e}");
    // CPU references check shapes too.
    let e = batched_matmul_f64(
        &Array5::zeros(mat(1, 2, 3)),
        &Array5::zeros(mat(1, 4, 2)),
        false,
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("do not multiply"), "{e}");
    drop(rec);
    ctx.check("after errors").unwrap();
}
