//! BatchNorm3d: GPU training / eval forward and backward against the f64 CPU
//! references (odd shapes, N > 1, and sizes that split each channel into several
//! chunks), the CPU backward against finite differences with BN inside a small graph,
//! conv+BN folding, determinism, the M = 1 edge case, and bad input returning errors.

mod common;

use common::{assert_close, gpu, random};
use masnet_wgpu::ops::batchnorm::{
    batchnorm_backward, batchnorm_backward_f64, batchnorm_eval_backward,
    batchnorm_eval_backward_f64, batchnorm_eval_forward, batchnorm_eval_forward_f64,
    batchnorm_fold, batchnorm_relu_backward, batchnorm_relu_train_forward, batchnorm_train_forward,
    batchnorm_train_forward_f64, BatchNormSpec,
};
use masnet_wgpu::ops::conv3d::{conv3d_forward_f64, Conv3dSpec};
use masnet_wgpu::rng::Rng;
use masnet_wgpu::{GpuContext, Shape5, Tensor};
use ndarray::Array5;

/// Normalised outputs are O(1): f32 sums of up to 8k values (chunked) and one divide.
const Y_TOL: f32 = 1e-4;
/// Per-channel statistics (mean, invstd, running values): relative f32 rounding of sums.
const STAT_TOL: f32 = 1e-4;
/// dgamma / dbeta sum up to 8k products of O(1) values: absolute error grows with the sum.
const SUM_RTOL: f32 = 1e-4;
const SUM_ATOL: f32 = 2e-3;
/// dx = a·dy + s·(x − mean) + u: the per-channel coefficients carry the sums' error.
const DX_TOL: f32 = 2e-4;

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&a| a as f32).collect()
}

fn flat(a: &Array5<f64>) -> Vec<f32> {
    a.iter().map(|&v| v as f32).collect()
}

fn chan(ctx: &GpuContext, v: &[f64], name: &str) -> Tensor {
    Tensor::from_slice(ctx, Shape5::new(1, v.len(), 1, 1, 1), &f32s(v), name).unwrap()
}

fn chan_zeros(ctx: &GpuContext, c: usize, name: &str) -> Tensor {
    Tensor::zeros(ctx, Shape5::new(1, c, 1, 1, 1), name).unwrap()
}

/// Random per-channel values in [lo, hi), rounded to f32 so GPU and CPU see the same.
fn rvec(c: usize, lo: f32, hi: f32, seed: u64) -> Vec<f64> {
    Rng::new(seed)
        .vec_f32(c, lo, hi)
        .into_iter()
        .map(f64::from)
        .collect()
}

/// Input with a non-zero, channel-dependent mean (exercises the two-pass variance).
fn input(shape: [usize; 5], seed: u64) -> Array5<f32> {
    let mut x = random(shape, seed);
    for ((_, c, _, _, _), v) in x.indexed_iter_mut() {
        *v = *v * (1.0 + c as f32 * 0.5) + 3.0 - c as f32;
    }
    x
}

fn check_case(ctx: &GpuContext, shape: [usize; 5], spec: BatchNormSpec, seed: u64) {
    let c = shape[1];
    let x = input(shape, seed);
    let x64 = x.mapv(f64::from);
    let gamma = rvec(c, 0.5, 1.5, seed + 1);
    let beta = rvec(c, -0.5, 0.5, seed + 2);
    let rmean = rvec(c, -1.0, 1.0, seed + 3);
    let rvar = rvec(c, 0.5, 2.0, seed + 4);
    let dy = random(shape, seed + 5);
    let dy64 = dy.mapv(f64::from);
    let what = |s: &str| format!("{s} {shape:?} {spec:?}");

    let xt = Tensor::from_array(ctx, &x, "x").unwrap();
    let dyt = Tensor::from_array(ctx, &dy, "dy").unwrap();
    let gt = chan(ctx, &gamma, "gamma");
    let bt = chan(ctx, &beta, "beta");
    let rmt = chan(ctx, &rmean, "running_mean");
    let rvt = chan(ctx, &rvar, "running_var");
    let s = Shape5(shape);
    let y = Tensor::zeros(ctx, s, "y").unwrap();
    let sm = chan_zeros(ctx, c, "save_mean");
    let si = chan_zeros(ctx, c, "save_invstd");
    let dx = Tensor::zeros(ctx, s, "dx").unwrap();
    let dg = chan_zeros(ctx, c, "dgamma");
    let db = chan_zeros(ctx, c, "dbeta");

    // Training forward then backward in one recorder (backward reads the saved stats).
    let mut rec = ctx.recorder();
    batchnorm_train_forward(
        ctx, &mut rec, &xt, &gt, &bt, &rmt, &rvt, &spec, &y, &sm, &si,
    )
    .unwrap();
    batchnorm_backward(ctx, &mut rec, &xt, &dyt, &gt, &sm, &si, &dx, &dg, &db).unwrap();
    ctx.submit(rec);
    ctx.check("train").unwrap();
    let want = batchnorm_train_forward_f64(&x64, &gamma, &beta, &rmean, &rvar, &spec);
    assert_close(
        &y.to_vec(ctx).unwrap(),
        &flat(&want.y),
        Y_TOL,
        Y_TOL,
        &what("y"),
    );
    let st = |t: &Tensor, w: &[f64], n: &str| {
        assert_close(
            &t.to_vec(ctx).unwrap(),
            &f32s(w),
            STAT_TOL,
            STAT_TOL,
            &what(n),
        )
    };
    st(&sm, &want.mean, "save_mean");
    st(&si, &want.invstd, "save_invstd");
    st(&rmt, &want.running_mean, "running_mean");
    st(&rvt, &want.running_var, "running_var");
    let g = batchnorm_backward_f64(&x64, &dy64, &gamma, &want.mean, &want.invstd);
    assert_close(
        &dx.to_vec(ctx).unwrap(),
        &flat(&g.dx),
        DX_TOL,
        DX_TOL,
        &what("dx"),
    );
    assert_close(
        &dg.to_vec(ctx).unwrap(),
        &f32s(&g.dgamma),
        SUM_RTOL,
        SUM_ATOL,
        &what("dgamma"),
    );
    assert_close(
        &db.to_vec(ctx).unwrap(),
        &f32s(&g.dbeta),
        SUM_RTOL,
        SUM_ATOL,
        &what("dbeta"),
    );

    // Eval forward and backward with the (original) running statistics.
    let rmt = chan(ctx, &rmean, "running_mean");
    let rvt = chan(ctx, &rvar, "running_var");
    let mut rec = ctx.recorder();
    batchnorm_eval_forward(ctx, &mut rec, &xt, &gt, &bt, &rmt, &rvt, spec.eps, &y).unwrap();
    batchnorm_eval_backward(
        ctx, &mut rec, &xt, &dyt, &gt, &rmt, &rvt, spec.eps, &dx, &dg, &db,
    )
    .unwrap();
    ctx.submit(rec);
    let eps = f64::from(spec.eps);
    let want_y = batchnorm_eval_forward_f64(&x64, &gamma, &beta, &rmean, &rvar, eps);
    // Eval outputs reach |x - mean| / std ~ 5 here, hence the looser atol.
    assert_close(
        &y.to_vec(ctx).unwrap(),
        &flat(&want_y),
        Y_TOL,
        5e-4,
        &what("eval y"),
    );
    let g = batchnorm_eval_backward_f64(&x64, &dy64, &gamma, &rmean, &rvar, eps);
    assert_close(
        &dx.to_vec(ctx).unwrap(),
        &flat(&g.dx),
        DX_TOL,
        DX_TOL,
        &what("eval dx"),
    );
    assert_close(
        &dg.to_vec(ctx).unwrap(),
        &f32s(&g.dgamma),
        SUM_RTOL,
        SUM_ATOL,
        &what("eval dgamma"),
    );
    assert_close(
        &db.to_vec(ctx).unwrap(),
        &f32s(&g.dbeta),
        SUM_RTOL,
        SUM_ATOL,
        &what("eval dbeta"),
    );
}

#[test]
fn odd_shapes_match_cpu() {
    let ctx = gpu();
    check_case(&ctx, [2, 5, 3, 7, 6], BatchNormSpec::keras(), 1);
    check_case(&ctx, [3, 2, 1, 5, 1], BatchNormSpec::pytorch(0.1, 1e-5), 2);
    check_case(&ctx, [1, 4, 2, 3, 3], BatchNormSpec::keras(), 3);
}

#[test]
fn split_reductions_match_cpu() {
    let ctx = gpu();
    // 16^3 = 4096 voxels: 4 full chunks per (n, c).
    check_case(&ctx, [2, 3, 16, 16, 16], BatchNormSpec::keras(), 10);
    // 11·10·11 = 1210 voxels: one full chunk and a partial one.
    check_case(
        &ctx,
        [2, 3, 11, 10, 11],
        BatchNormSpec::pytorch(0.1, 1e-5),
        11,
    );
}

/// Two training steps in one recorder: the running statistics are read-modify-written
/// in place and the second step sees the first one's update.
#[test]
fn running_statistics_accumulate_over_steps() {
    let ctx = gpu();
    let shape = [2, 3, 4, 5, 3];
    let spec = BatchNormSpec {
        eps: 1e-3,
        momentum: 0.7,
        unbiased_running_var: true,
    };
    let (x1, x2) = (input(shape, 20), input(shape, 21).mapv(|v| v * 0.5));
    let gamma = rvec(3, 0.5, 1.5, 22);
    let beta = rvec(3, -0.5, 0.5, 23);
    let (rm0, rv0) = (vec![0.0; 3], vec![1.0; 3]);
    let (gt, bt) = (chan(&ctx, &gamma, "gamma"), chan(&ctx, &beta, "beta"));
    let rmt = chan(&ctx, &rm0, "running_mean");
    let rvt = chan(&ctx, &rv0, "running_var");
    let (sm, si) = (chan_zeros(&ctx, 3, "sm"), chan_zeros(&ctx, 3, "si"));
    let y = Tensor::zeros(&ctx, Shape5(shape), "y").unwrap();
    // Both inputs stay alive until the submit: a dropped tensor's pooled buffer could be
    // handed to the second upload, whose queue write lands before the recorded commands.
    let xs = [&x1, &x2].map(|x| Tensor::from_array(&ctx, x, "x").unwrap());
    let mut rec = ctx.recorder();
    for xt in &xs {
        batchnorm_train_forward(
            &ctx, &mut rec, xt, &gt, &bt, &rmt, &rvt, &spec, &y, &sm, &si,
        )
        .unwrap();
    }
    ctx.submit(rec);
    let s1 = batchnorm_train_forward_f64(&x1.mapv(f64::from), &gamma, &beta, &rm0, &rv0, &spec);
    let s2 = batchnorm_train_forward_f64(
        &x2.mapv(f64::from),
        &gamma,
        &beta,
        &s1.running_mean,
        &s1.running_var,
        &spec,
    );
    let tol = STAT_TOL;
    let rm = rmt.to_vec(&ctx).unwrap();
    assert_close(&rm, &f32s(&s2.running_mean), tol, tol, "running_mean");
    let rv = rvt.to_vec(&ctx).unwrap();
    assert_close(&rv, &f32s(&s2.running_var), tol, tol, "running_var");
    assert_close(&y.to_vec(&ctx).unwrap(), &flat(&s2.y), Y_TOL, Y_TOL, "y");
}

/// The split reductions have a fixed order: repeated runs are bitwise identical.
#[test]
fn results_are_deterministic() {
    let ctx = gpu();
    let shape = [2, 3, 9, 10, 13];
    let x = Tensor::from_array(&ctx, &input(shape, 30), "x").unwrap();
    let dy = Tensor::from_array(&ctx, &random(shape, 31), "dy").unwrap();
    let gt = chan(&ctx, &[1.0, 0.5, 2.0], "gamma");
    let bt = chan(&ctx, &[0.0, 0.1, -0.2], "beta");
    let run = || {
        let rm = chan(&ctx, &[0.0; 3], "rm");
        let rv = chan(&ctx, &[1.0; 3], "rv");
        let (sm, si) = (chan_zeros(&ctx, 3, "sm"), chan_zeros(&ctx, 3, "si"));
        let y = Tensor::zeros(&ctx, Shape5(shape), "y").unwrap();
        let dx = Tensor::zeros(&ctx, Shape5(shape), "dx").unwrap();
        let (dg, db) = (chan_zeros(&ctx, 3, "dg"), chan_zeros(&ctx, 3, "db"));
        let mut rec = ctx.recorder();
        let spec = BatchNormSpec::keras();
        batchnorm_train_forward(&ctx, &mut rec, &x, &gt, &bt, &rm, &rv, &spec, &y, &sm, &si)
            .unwrap();
        batchnorm_backward(&ctx, &mut rec, &x, &dy, &gt, &sm, &si, &dx, &dg, &db).unwrap();
        ctx.submit(rec);
        [&y, &rm, &rv, &sm, &si, &dx, &dg, &db].map(|t| t.to_vec(&ctx).unwrap())
    };
    let (a, b) = (run(), run());
    for (i, (u, v)) in a.iter().zip(&b).enumerate() {
        let same = u.iter().zip(v).all(|(p, q)| p.to_bits() == q.to_bits());
        assert!(same, "output {i} differs between identical runs");
    }
}

/// M = N·D·H·W = 1: the batch variance is 0, so y = beta, invstd = 1/sqrt(eps) and the
/// (biased) running variance decays towards 0. The unbiased update is an error.
#[test]
fn one_value_per_channel() {
    let ctx = gpu();
    let s = Shape5::new(1, 3, 1, 1, 1);
    let x = Tensor::from_slice(&ctx, s, &[1.0, -2.0, 5.0], "x").unwrap();
    let gt = chan(&ctx, &[1.0, 2.0, 3.0], "gamma");
    let bt = chan(&ctx, &[0.5, -0.25, 0.0], "beta");
    let rm = chan(&ctx, &[0.0; 3], "rm");
    let rv = chan(&ctx, &[1.0; 3], "rv");
    let (sm, si) = (chan_zeros(&ctx, 3, "sm"), chan_zeros(&ctx, 3, "si"));
    let y = Tensor::zeros(&ctx, s, "y").unwrap();
    let spec = BatchNormSpec::keras();
    let mut rec = ctx.recorder();
    batchnorm_train_forward(&ctx, &mut rec, &x, &gt, &bt, &rm, &rv, &spec, &y, &sm, &si).unwrap();
    ctx.submit(rec);
    assert_eq!(y.to_vec(&ctx).unwrap(), vec![0.5, -0.25, 0.0]);
    let inv = 1.0 / (1e-3f32).sqrt();
    assert_close(&si.to_vec(&ctx).unwrap(), &[inv; 3], 1e-6, 0.0, "invstd");
    assert_close(
        &rv.to_vec(&ctx).unwrap(),
        &[0.99; 3],
        1e-6,
        0.0,
        "running_var",
    );
    let e = batchnorm_train_forward(
        &ctx,
        &mut ctx.recorder(),
        &x,
        &gt,
        &bt,
        &rm,
        &rv,
        &BatchNormSpec::pytorch(0.1, 1e-5),
        &y,
        &sm,
        &si,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("unbiased"), "{e}");
}

/// L = Σ r ⊙ BN(a ⊙ x + b): the training-mode statistics depend on x, so the central
/// differences perturb through them; the analytic gradient comes from the CPU backward.
#[test]
fn cpu_backward_passes_finite_differences() {
    let shape = [2, 3, 3, 4, 2];
    let x = random(shape, 40).mapv(f64::from);
    let a = random(shape, 41).mapv(|v| 1.0 + 0.5 * f64::from(v));
    let b = random(shape, 42).mapv(|v| 2.0 * f64::from(v));
    let r = random(shape, 43).mapv(f64::from);
    let gamma = vec![0.7, 1.3, -0.4];
    let beta = vec![0.1, -0.2, 0.3];
    let (rmean, rvar) = (vec![0.2, -0.1, 0.5], vec![0.8, 1.5, 0.3]);
    let spec = BatchNormSpec::keras();
    let eps = f64::from(spec.eps);
    let train = |x: &Array5<f64>, g: &[f64], be: &[f64]| -> f64 {
        let z = &a * x + &b;
        (&r * &batchnorm_train_forward_f64(&z, g, be, &rmean, &rvar, &spec).y).sum()
    };
    let eval = |x: &Array5<f64>, g: &[f64], be: &[f64]| -> f64 {
        let z = &a * x + &b;
        (&r * &batchnorm_eval_forward_f64(&z, g, be, &rmean, &rvar, eps)).sum()
    };
    let z = &a * &x + &b;
    let fwd = batchnorm_train_forward_f64(&z, &gamma, &beta, &rmean, &rvar, &spec);
    let gt = batchnorm_backward_f64(&z, &r, &gamma, &fwd.mean, &fwd.invstd);
    let ge = batchnorm_eval_backward_f64(&z, &r, &gamma, &rmean, &rvar, eps);
    let h = 1e-6;
    let close = |fd: f64, an: f64, what: &str| {
        assert!(
            (fd - an).abs() <= 1e-7 + 1e-6 * fd.abs(),
            "{what}: finite difference {fd} vs analytic {an}"
        );
    };
    for (loss, g, mode) in [
        (
            &train as &dyn Fn(&Array5<f64>, &[f64], &[f64]) -> f64,
            &gt,
            "train",
        ),
        (&eval, &ge, "eval"),
    ] {
        let mut rng = Rng::new(44);
        for _ in 0..25 {
            let i = shape.map(|s| rng.below(s));
            let (mut xp, mut xm) = (x.clone(), x.clone());
            xp[i] += h;
            xm[i] -= h;
            let fd = (loss(&xp, &gamma, &beta) - loss(&xm, &gamma, &beta)) / (2.0 * h);
            close(fd, a[i] * g.dx[i], &format!("{mode} dx{i:?}"));
        }
        for c in 0..3 {
            let (mut gp, mut gm) = (gamma.clone(), gamma.clone());
            gp[c] += h;
            gm[c] -= h;
            let fd = (loss(&x, &gp, &beta) - loss(&x, &gm, &beta)) / (2.0 * h);
            close(fd, g.dgamma[c], &format!("{mode} dgamma[{c}]"));
            let (mut bp, mut bm) = (beta.clone(), beta.clone());
            bp[c] += h;
            bm[c] -= h;
            let fd = (loss(&x, &gamma, &bp) - loss(&x, &gamma, &bm)) / (2.0 * h);
            close(fd, g.dbeta[c], &format!("{mode} dbeta[{c}]"));
        }
    }
}

/// eval-BN(conv(x, w, b)) equals conv(x, w', b') with the folded weights.
#[test]
fn folding_matches_conv_then_bn() {
    let x = random([2, 3, 5, 4, 6], 50).mapv(f64::from);
    let w = random([4, 3, 3, 1, 3], 51);
    let bias: Vec<f32> = vec![0.1, -0.3, 0.2, 0.0];
    let gamma: Vec<f32> = vec![0.9, 1.2, -0.7, 0.4];
    let beta: Vec<f32> = vec![0.05, 0.0, -0.1, 0.3];
    let mean: Vec<f32> = vec![0.2, -0.4, 0.1, 1.0];
    let var: Vec<f32> = vec![1.5, 0.3, 2.0, 0.8];
    let eps = 1e-3f32;
    let to64 = |v: &[f32]| v.iter().map(|&a| f64::from(a)).collect::<Vec<_>>();
    let spec = Conv3dSpec::same([3, 1, 3]);
    let w64 = w.mapv(f64::from);
    for b in [Some(&bias[..]), None] {
        let y = conv3d_forward_f64(&x, 0, &w64, b.map(to64).as_deref(), &spec).unwrap();
        let want = batchnorm_eval_forward_f64(
            &y,
            &to64(&gamma),
            &to64(&beta),
            &to64(&mean),
            &to64(&var),
            f64::from(eps),
        );
        let wf: Vec<f32> = w.iter().copied().collect();
        let (w2, b2) = batchnorm_fold(&wf, b, &gamma, &beta, &mean, &var, eps).unwrap();
        let w2 = Array5::from_shape_vec([4, 3, 3, 1, 3], w2)
            .unwrap()
            .mapv(f64::from);
        let got = conv3d_forward_f64(&x, 0, &w2, Some(&to64(&b2)), &spec).unwrap();
        // Folded weights are rounded to f32 once.
        assert_close(&flat(&got), &flat(&want), 1e-5, 1e-5, "folded conv");
    }
    let e = batchnorm_fold(&[1.0; 10], None, &gamma, &beta, &mean, &var, eps)
        .unwrap_err()
        .to_string();
    assert!(e.contains("multiple of Cout"), "{e}");
    let e = batchnorm_fold(&[1.0; 8], None, &gamma, &beta[..3], &mean, &var, eps)
        .unwrap_err()
        .to_string();
    assert!(e.contains("beta"), "{e}");
    assert!(batchnorm_fold(&[1.0; 8], None, &gamma, &beta, &mean, &var, 0.0).is_err());
}

#[test]
fn bad_input_is_an_error() {
    let ctx = gpu();
    let s = Shape5::new(2, 3, 2, 3, 4);
    let x = Tensor::zeros(&ctx, s, "x").unwrap();
    let y = Tensor::zeros(&ctx, s, "y").unwrap();
    let y_bad = Tensor::zeros(&ctx, Shape5::new(2, 3, 2, 3, 5), "y_bad").unwrap();
    let g = chan_zeros(&ctx, 3, "gamma");
    let g4 = chan_zeros(&ctx, 4, "gamma4");
    let b = chan_zeros(&ctx, 3, "beta");
    let rm = chan_zeros(&ctx, 3, "rm");
    let rv = chan_zeros(&ctx, 3, "rv");
    let sm = chan_zeros(&ctx, 3, "sm");
    let si = chan_zeros(&ctx, 3, "si");
    let keras = BatchNormSpec::keras();
    let mut rec = ctx.recorder();
    let train = |rec: &mut _, gamma: &Tensor, spec: &BatchNormSpec, y: &Tensor, rmv: &Tensor| {
        batchnorm_train_forward(&ctx, rec, &x, gamma, &b, &rm, rmv, spec, y, &sm, &si)
            .unwrap_err()
            .to_string()
    };
    let e = train(&mut rec, &g4, &keras, &y, &rv);
    assert!(e.contains("'gamma4'") && e.contains("3 channels"), "{e}");
    for eps in [0.0, -1e-3, f32::NAN] {
        let e = train(&mut rec, &g, &BatchNormSpec { eps, ..keras }, &y, &rv);
        assert!(e.contains("eps"), "{e}");
    }
    for momentum in [1.5, -0.1, f32::NAN] {
        let e = train(&mut rec, &g, &BatchNormSpec { momentum, ..keras }, &y, &rv);
        assert!(e.contains("momentum"), "{e}");
    }
    let e = train(&mut rec, &g, &keras, &y_bad, &rv);
    assert!(e.contains("'y_bad'") && e.contains("do not match"), "{e}");
    // In place (y = x) and running_var = running_mean are rejected.
    let e = train(&mut rec, &g, &keras, &x, &rv);
    assert!(e.contains("shares"), "{e}");
    let e = train(&mut rec, &g, &keras, &y, &rm);
    assert!(e.contains("shares"), "{e}");

    let e = batchnorm_eval_forward(&ctx, &mut rec, &x, &g, &b, &rm, &g4, 1e-3, &y)
        .unwrap_err()
        .to_string();
    assert!(e.contains("'gamma4'"), "{e}");
    let e = batchnorm_eval_forward(&ctx, &mut rec, &x, &g, &b, &rm, &rv, 0.0, &y)
        .unwrap_err()
        .to_string();
    assert!(e.contains("eps"), "{e}");

    let dx = Tensor::zeros(&ctx, s, "dx").unwrap();
    let (dg, db) = (chan_zeros(&ctx, 3, "dg"), chan_zeros(&ctx, 3, "db"));
    let e = batchnorm_backward(&ctx, &mut rec, &x, &y_bad, &g, &sm, &si, &dx, &dg, &db)
        .unwrap_err()
        .to_string();
    assert!(e.contains("'y_bad'"), "{e}");
    let e = batchnorm_backward(&ctx, &mut rec, &x, &y, &g, &sm, &si, &dx, &g4, &db)
        .unwrap_err()
        .to_string();
    assert!(e.contains("'gamma4'"), "{e}");
    let e = batchnorm_eval_backward(&ctx, &mut rec, &x, &y, &g, &rm, &rv, -1.0, &dx, &dg, &db)
        .unwrap_err()
        .to_string();
    assert!(e.contains("eps"), "{e}");
    let e = batchnorm_eval_backward(&ctx, &mut rec, &x, &y, &g, &rm, &rv, 1e-3, &dx, &dg, &dg)
        .unwrap_err()
        .to_string();
    assert!(e.contains("shares"), "{e}");
    ctx.submit(rec);
    ctx.check("after errors").unwrap();
}

/// The paper's size (N=2, C=32, 32^3 voxels): 32 chunks per (n, c), 64 partials per channel.
#[test]
#[ignore = "realistic size: about 2M values, slow on software Vulkan"]
fn realistic_size_matches_cpu() {
    let ctx = gpu();
    let t = std::time::Instant::now();
    check_case(&ctx, [2, 32, 32, 32, 32], BatchNormSpec::keras(), 60);
    eprintln!(
        "realistic size: {:?} (upload, GPU, readback, f64 reference)",
        t.elapsed()
    );
}

/// BN + ReLU fused in training (`batchnorm_relu_train_forward` / `_backward`): the
/// forward equals relu(bn(x)) of the CPU reference and the backward its BN backward of
/// dy masked to y > 0, with about half the outputs clamped; a small and a split-reduction
/// shape.
#[test]
fn fused_relu_matches_bn_then_relu() {
    let ctx = gpu();
    for (shape, seed) in [([2, 3, 4, 5, 6], 900), ([1, 2, 40, 40, 40], 910)] {
        let c = shape[1];
        let spec = BatchNormSpec::keras();
        let x = input(shape, seed);
        let x64 = x.mapv(f64::from);
        let gamma = rvec(c, 0.5, 1.5, seed + 1);
        let beta = rvec(c, -0.5, 0.5, seed + 2);
        let (rmean, rvar) = (vec![0.0; c], vec![1.0; c]);
        let dy = random(shape, seed + 5);
        let want = batchnorm_train_forward_f64(&x64, &gamma, &beta, &rmean, &rvar, &spec);
        let want_y = want.y.mapv(|v| if v < 0.0 { 0.0 } else { v });
        let clamped = want_y.iter().filter(|&&v| v == 0.0).count();
        assert!(clamped > want_y.len() / 5 && clamped < want_y.len() * 4 / 5);
        let dy_masked = ndarray::Zip::from(&dy).and(&want_y).map_collect(|&d, &y| {
            if y > 0.0 {
                f64::from(d)
            } else {
                0.0
            }
        });
        let g = batchnorm_backward_f64(&x64, &dy_masked, &gamma, &want.mean, &want.invstd);

        let s = Shape5(shape);
        let xt = Tensor::from_array(&ctx, &x, "x").unwrap();
        let dyt = Tensor::from_array(&ctx, &dy, "dy").unwrap();
        let (gt, bt) = (chan(&ctx, &gamma, "gamma"), chan(&ctx, &beta, "beta"));
        let (rmt, rvt) = (chan(&ctx, &rmean, "rm"), chan(&ctx, &rvar, "rv"));
        let (sm, si) = (chan_zeros(&ctx, c, "sm"), chan_zeros(&ctx, c, "si"));
        let y = Tensor::zeros(&ctx, s, "y").unwrap();
        let dx = Tensor::zeros(&ctx, s, "dx").unwrap();
        let (dg, db) = (chan_zeros(&ctx, c, "dg"), chan_zeros(&ctx, c, "db"));
        let mut rec = ctx.recorder();
        batchnorm_relu_train_forward(
            &ctx, &mut rec, &xt, &gt, &bt, &rmt, &rvt, &spec, &y, &sm, &si,
        )
        .unwrap();
        batchnorm_relu_backward(&ctx, &mut rec, &xt, &y, &dyt, &gt, &sm, &si, &dx, &dg, &db)
            .unwrap();
        ctx.submit(rec);
        let what = format!("{shape:?}");
        assert_close(
            &y.to_vec(&ctx).unwrap(),
            &flat(&want_y),
            Y_TOL,
            Y_TOL,
            &what,
        );
        assert_close(
            &dx.to_vec(&ctx).unwrap(),
            &flat(&g.dx),
            DX_TOL,
            DX_TOL,
            &what,
        );
        assert_close(
            &dg.to_vec(&ctx).unwrap(),
            &f32s(&g.dgamma),
            SUM_RTOL,
            SUM_ATOL,
            &what,
        );
        assert_close(
            &db.to_vec(&ctx).unwrap(),
            &f32s(&g.dbeta),
            SUM_RTOL,
            SUM_ATOL,
            &what,
        );
        // dx must not alias the output it masks by.
        let mut rec = ctx.recorder();
        let e = batchnorm_relu_backward(&ctx, &mut rec, &xt, &y, &dyt, &gt, &sm, &si, &y, &dg, &db)
            .unwrap_err()
            .to_string();
        assert!(e.contains("batchnorm_relu_backward"), "{e}");
    }
}
