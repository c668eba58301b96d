//! Adam/AdamW step and sum of squares: GPU against the f64 CPU reference over several
//! steps on random data (L2 on/off, weight decay, large step counts), Adam's first-step
//! property (each weight moves by ≈ lr·sign(g)), the L2 gradient against finite
//! differences, determinism of the sum of squares, and bad input returning errors.

mod common;

use common::{assert_close, gpu};
use masnet_wgpu::ops::adam::{
    adam_step, adam_step_f64, sum_of_squares, sum_of_squares_at, sum_of_squares_f64, AdamConfig,
};
use masnet_wgpu::rng::Rng;
use masnet_wgpu::{GpuContext, Shape5, Tensor};

/// Weights: each f32 step rounds w (|w| <= ~1.1, half an ulp ≈ 6e-8) and the update
/// carries f32 relative error ~1e-6 times lr <= 1e-2; a few steps stay far below 1e-6.
const W_ATOL: f32 = 1e-6;
const W_RTOL: f32 = 1e-6;
/// Moments: f32 relative rounding ~1e-7 per step; m may cancel towards 0 (absolute
/// error ~1e-7·max|g|), v is a sum of positive terms (relative error only).
const M_RTOL: f32 = 1e-5;
const M_ATOL: f32 = 1e-6;
const V_RTOL: f32 = 1e-5;
const V_ATOL: f32 = 1e-10;
/// Sum of squares: f32 sums of ~sqrt(n) positive terms per pass, n <= ~5000.
const SS_RTOL: f64 = 1e-5;

fn f32s(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}
fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| f64::from(v)).collect()
}

struct Run {
    w: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
}

/// Runs `steps` steps starting at step `t0` from the given state on the GPU and in f64,
/// with fresh random gradients each step, and compares the final states.
#[allow(clippy::too_many_arguments)]
fn check_steps(
    ctx: &GpuContext,
    shape: Shape5,
    cfg: &AdamConfig,
    apply_l2: bool,
    t0: u32,
    steps: u32,
    warm_state: bool,
    seed: u64,
) -> Run {
    let n = shape.numel().unwrap();
    let mut rng = Rng::new(seed);
    let w0 = rng.vec_f32(n, -1.0, 1.0);
    let (m0, v0) = if warm_state {
        (rng.vec_f32(n, -0.1, 0.1), rng.vec_f32(n, 0.0, 0.05))
    } else {
        (vec![0.0; n], vec![0.0; n])
    };
    // Parameters keep their shape; the moments may be stored flat (equal counts suffice).
    let w = Tensor::from_slice(ctx, shape, &w0, "w").unwrap();
    let flat = Shape5::new(1, 1, 1, 1, n);
    let m = Tensor::from_slice(ctx, flat, &m0, "m").unwrap();
    let v = Tensor::from_slice(ctx, flat, &v0, "v").unwrap();
    let (mut rw, mut rm, mut rv) = (f64s(&w0), f64s(&m0), f64s(&v0));
    for k in 0..steps {
        let g = rng.vec_f32(n, -1.0, 1.0);
        let gt = Tensor::from_slice(ctx, shape, &g, "g").unwrap();
        let mut rec = ctx.recorder();
        adam_step(ctx, &mut rec, &w, &gt, &m, &v, t0 + k, cfg, apply_l2).unwrap();
        ctx.submit(rec);
        adam_step_f64(&mut rw, &f64s(&g), &mut rm, &mut rv, t0 + k, cfg, apply_l2);
    }
    let out = Run {
        w: w.to_vec(ctx).unwrap(),
        m: m.to_vec(ctx).unwrap(),
        v: v.to_vec(ctx).unwrap(),
    };
    let what = format!("{shape} l2={apply_l2} wd={} t0={t0}", cfg.weight_decay);
    assert_close(&out.w, &f32s(&rw), W_RTOL, W_ATOL, &format!("w {what}"));
    assert_close(&out.m, &f32s(&rm), M_RTOL, M_ATOL, &format!("m {what}"));
    assert_close(&out.v, &f32s(&rv), V_RTOL, V_ATOL, &format!("v {what}"));
    out
}

fn cfg(lr: f32, l2: f32, wd: f32) -> AdamConfig {
    AdamConfig {
        lr,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-7,
        l2,
        weight_decay: wd,
    }
}

#[test]
fn adam_matches_reference_over_several_steps() {
    let ctx = gpu();
    let shapes = [
        Shape5::new(7, 5, 3, 3, 3),
        Shape5::new(1, 1, 1, 1, 1),
        Shape5::new(2, 3, 5, 7, 6),
    ];
    for (s, &shape) in shapes.iter().enumerate() {
        let seed = 100 * s as u64;
        // Plain Adam, L2 on (a large l2 so the term matters), L2 off with l2 set.
        let with_l2 = check_steps(&ctx, shape, &cfg(1e-2, 0.05, 0.0), true, 1, 5, false, seed);
        let no_l2 = check_steps(&ctx, shape, &cfg(1e-2, 0.05, 0.0), false, 1, 5, false, seed);
        let plain = check_steps(&ctx, shape, &cfg(1e-2, 0.0, 0.0), true, 1, 5, false, seed);
        assert_eq!(no_l2.w, plain.w, "apply_l2 = false must ignore l2");
        assert_ne!(with_l2.w, plain.w, "L2 had no effect");
        // AdamW.
        let adamw = check_steps(&ctx, shape, &cfg(1e-2, 0.0, 0.1), false, 1, 5, false, seed);
        assert_ne!(adamw.w, plain.w, "weight decay had no effect");
        // Paper settings, resumed at a large step count from a warm state.
        check_steps(
            &ctx,
            shape,
            &AdamConfig::default(),
            true,
            10_000,
            3,
            true,
            seed + 1,
        );
        // Mid-training step count, where the bias corrections are far from 1 and 0.
        check_steps(
            &ctx,
            shape,
            &cfg(3e-3, 1e-4, 0.01),
            true,
            7,
            4,
            true,
            seed + 2,
        );
    }
}

/// Adam's first step is `lr·g/(|g| + eps)` ≈ `lr·sign(g)` whatever the scale of g; a
/// missing or wrong bias correction would move weights by ~3.16·lr (or 0.1·lr).
#[test]
fn first_step_moves_each_weight_by_lr_sign_g() {
    let ctx = gpu();
    let n = 999;
    let lr = 1e-2f32;
    let mut rng = Rng::new(7);
    let w0 = rng.vec_f32(n, -1.0, 1.0);
    // |g| in [1e-2, 10): scale-free, and eps/|g| <= 1e-5.
    let g: Vec<f32> = (0..n)
        .map(|_| {
            let mag = 10f32.powf(rng.uniform_f32(-2.0, 1.0));
            if rng.uniform() < 0.5 {
                -mag
            } else {
                mag
            }
        })
        .collect();
    let shape = Shape5::new(1, 3, 3, 3, 37);
    let w = Tensor::from_slice(&ctx, shape, &w0, "w").unwrap();
    let gt = Tensor::from_slice(&ctx, shape, &g, "g").unwrap();
    let m = Tensor::zeros(&ctx, shape, "m").unwrap();
    let v = Tensor::zeros(&ctx, shape, "v").unwrap();
    let mut rec = ctx.recorder();
    adam_step(
        &ctx,
        &mut rec,
        &w,
        &gt,
        &m,
        &v,
        1,
        &cfg(lr, 0.0, 0.0),
        false,
    )
    .unwrap();
    ctx.submit(rec);
    let w1 = w.to_vec(&ctx).unwrap();
    let moved: Vec<f32> = w1.iter().zip(&w0).map(|(a, b)| a - b).collect();
    let want: Vec<f32> = g.iter().map(|gi| -lr * gi.signum()).collect();
    // lr·eps/|g| <= 1e-7 plus rounding of w (|w| < 1: ulp 1.2e-7).
    assert_close(&moved, &want, 0.0, 1e-6, "first step = -lr·sign(g)");
}

/// The L2 option equals plain Adam on the gradient of `Σ r·w + l2·Σw²` taken by central
/// differences, i.e. the penalty gradient is `2·l2·w`.
#[test]
fn l2_term_is_the_gradient_of_the_penalty() {
    let mut rng = Rng::new(11);
    let n = 17;
    let w: Vec<f64> = (0..n).map(|_| rng.uniform() * 2.0 - 1.0).collect();
    let r: Vec<f64> = (0..n).map(|_| rng.uniform() * 2.0 - 1.0).collect();
    let c = cfg(1e-3, 0.3, 0.0);
    let l2 = f64::from(c.l2);
    let loss = |w: &[f64]| -> f64 {
        w.iter().zip(&r).map(|(a, b)| a * b).sum::<f64>() + l2 * sum_of_squares_f64(w)
    };
    let h = 1e-6;
    let fd: Vec<f64> = (0..n)
        .map(|i| {
            let (mut a, mut b) = (w.clone(), w.clone());
            a[i] += h;
            b[i] -= h;
            (loss(&a) - loss(&b)) / (2.0 * h)
        })
        .collect();
    // One step from a warm state at t = 3, with L2 folded in vs on the full gradient.
    let m0: Vec<f64> = (0..n).map(|_| rng.uniform() * 0.2 - 0.1).collect();
    let v0: Vec<f64> = (0..n).map(|_| rng.uniform() * 0.05).collect();
    let (mut w1, mut m1, mut v1) = (w.clone(), m0.clone(), v0.clone());
    let (mut w2, mut m2, mut v2) = (w.clone(), m0, v0);
    adam_step_f64(&mut w1, &r, &mut m1, &mut v1, 3, &c, true);
    adam_step_f64(&mut w2, &fd, &mut m2, &mut v2, 3, &c, false);
    for i in 0..n {
        assert!(
            (m1[i] - m2[i]).abs() < 1e-8 && (w1[i] - w2[i]).abs() < 1e-9,
            "element {i}: L2 step {} vs finite-difference step {}",
            w1[i],
            w2[i]
        );
    }
}

#[test]
fn sum_of_squares_matches_reference_and_is_deterministic() {
    let ctx = gpu();
    for (k, &n) in [1usize, 63, 64, 65, 945, 4097, 5000].iter().enumerate() {
        let mut rng = Rng::new(300 + k as u64);
        let x = rng.vec_f32(n, -2.0, 2.0);
        let t = Tensor::from_slice(&ctx, Shape5::new(1, 1, 1, 1, n), &x, "x").unwrap();
        let out = Tensor::zeros(&ctx, Shape5::new(1, 1, 1, 1, 1), "ss").unwrap();
        let mut rec = ctx.recorder();
        sum_of_squares(&ctx, &mut rec, &t, &out).unwrap();
        ctx.submit(rec);
        let a = out.to_vec(&ctx).unwrap()[0];
        let want = sum_of_squares_f64(&f64s(&x));
        assert!(
            (f64::from(a) - want).abs() <= SS_RTOL * want,
            "n={n}: gpu {a} vs cpu {want}"
        );
        let mut rec = ctx.recorder();
        sum_of_squares(&ctx, &mut rec, &t, &out).unwrap();
        ctx.submit(rec);
        let b = out.to_vec(&ctx).unwrap()[0];
        assert_eq!(a.to_bits(), b.to_bits(), "n={n}: not deterministic");
    }

    // Several tensors into one buffer, other elements untouched.
    let xs: Vec<Vec<f32>> = (0..3)
        .map(|k| Rng::new(k).vec_f32(50 + k as usize * 31, -1.0, 1.0))
        .collect();
    let ts: Vec<Tensor> = xs
        .iter()
        .map(|x| Tensor::from_slice(&ctx, Shape5::new(1, 1, 1, 1, x.len()), x, "x").unwrap())
        .collect();
    let out = Tensor::from_slice(&ctx, Shape5::new(1, 1, 1, 1, 5), &[-1.0; 5], "sums").unwrap();
    let mut rec = ctx.recorder();
    for (i, t) in ts.iter().enumerate() {
        sum_of_squares_at(&ctx, &mut rec, t, &out, i + 1).unwrap();
    }
    ctx.submit(rec);
    let got = out.to_vec(&ctx).unwrap();
    assert_eq!(got[0], -1.0);
    assert_eq!(got[4], -1.0);
    for (i, x) in xs.iter().enumerate() {
        let want = sum_of_squares_f64(&f64s(x));
        assert!(
            (f64::from(got[i + 1]) - want).abs() <= SS_RTOL * want,
            "slot {}: gpu {} vs cpu {want}",
            i + 1,
            got[i + 1]
        );
    }
}

fn err_text<T>(r: masnet_wgpu::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_input_is_rejected() {
    let ctx = gpu();
    let s = Shape5::new(1, 2, 3, 3, 3);
    let w = Tensor::zeros(&ctx, s, "w").unwrap();
    let g = Tensor::zeros(&ctx, s, "g").unwrap();
    let m = Tensor::zeros(&ctx, s, "m").unwrap();
    let v = Tensor::zeros(&ctx, s, "v").unwrap();
    let short = Tensor::zeros(&ctx, Shape5::new(1, 2, 3, 3, 2), "v_short").unwrap();
    let ok = cfg(1e-3, 1e-4, 0.0);
    let mut rec = ctx.recorder();

    let e = err_text(adam_step(&ctx, &mut rec, &w, &g, &m, &short, 1, &ok, true));
    assert!(e.contains("v_short") && e.contains("elements"), "{e}");
    let e = err_text(adam_step(&ctx, &mut rec, &w, &g, &m, &v, 0, &ok, true));
    assert!(e.contains("1-based"), "{e}");
    let e = err_text(adam_step(&ctx, &mut rec, &w, &g, &w, &v, 1, &ok, true));
    assert!(e.contains("same buffer"), "{e}");

    let bad_cfgs: [(&str, AdamConfig); 9] = [
        ("lr", AdamConfig { lr: 0.0, ..ok }),
        ("lr", AdamConfig { lr: f32::NAN, ..ok }),
        ("eps", AdamConfig { eps: 0.0, ..ok }),
        ("beta1", AdamConfig { beta1: 1.0, ..ok }),
        ("beta1", AdamConfig { beta1: -0.1, ..ok }),
        ("beta2", AdamConfig { beta2: 1.5, ..ok }),
        ("l2", AdamConfig { l2: -1e-4, ..ok }),
        (
            "weight_decay",
            AdamConfig {
                weight_decay: -0.1,
                ..ok
            },
        ),
        (
            "weight_decay",
            AdamConfig {
                weight_decay: f32::INFINITY,
                ..ok
            },
        ),
    ];
    for (field, c) in bad_cfgs {
        let e = err_text(adam_step(&ctx, &mut rec, &w, &g, &m, &v, 1, &c, true));
        assert!(e.contains(field), "{field}: {e}");
    }
    // Beta 0 is allowed (no momentum).
    adam_step(
        &ctx,
        &mut rec,
        &w,
        &g,
        &m,
        &v,
        1,
        &AdamConfig { beta1: 0.0, ..ok },
        true,
    )
    .unwrap();

    let two = Tensor::zeros(&ctx, Shape5::new(1, 1, 1, 1, 2), "two").unwrap();
    let e = err_text(sum_of_squares(&ctx, &mut rec, &w, &two));
    assert!(e.contains("two") && e.contains("exactly one"), "{e}");
    let e = err_text(sum_of_squares_at(&ctx, &mut rec, &w, &two, 2));
    assert!(e.contains("index 2"), "{e}");
    let e = err_text(sum_of_squares_at(&ctx, &mut rec, &w, &w, 0));
    assert!(e.contains("same buffer"), "{e}");
    ctx.submit(rec);
    ctx.wait().unwrap();
}
