//! Segmentation losses (softmax over channels, cross-entropy, soft Dice): GPU against the
//! f64 CPU references on odd shapes with N > 1, the CPU backward against finite
//! differences inside a small graph, stability with ±1e4 logits, invalid labels and bad
//! input.

mod common;

use common::{assert_close, gpu, random};
use masnet_wgpu::ops::loss::{
    dice_loss_backward, dice_loss_backward_f64, dice_loss_forward, dice_loss_forward_f64,
    softmax_channels, softmax_channels_f64, softmax_cross_entropy_backward,
    softmax_cross_entropy_backward_f64, softmax_cross_entropy_forward,
    softmax_cross_entropy_forward_f64,
};
use masnet_wgpu::rng::Rng;
use masnet_wgpu::{GpuContext, Shape5, Tensor};
use ndarray::Array5;

/// Probabilities and losses are O(1) values from a few f32 ops per voxel, and sums of a
/// few hundred O(1) terms: f32 rounding stays well below 1e-5 relative.
const LOSS_RTOL: f32 = 1e-5;
const LOSS_ATOL: f32 = 1e-6;
/// Gradients are O(1/voxels) (~1e-3 here); atol is well under their size.
const GRAD_RTOL: f32 = 1e-4;
const GRAD_ATOL: f32 = 1e-7;
const EPS: f32 = 1e-5;

fn flat(a: &Array5<f64>) -> Vec<f32> {
    a.iter().map(|&v| v as f32).collect()
}

fn labels(shape: [usize; 5], classes: usize, seed: u64) -> Array5<f32> {
    let mut rng = Rng::new(seed);
    Array5::from_shape_fn(shape, |_| rng.below(classes) as f32)
}

fn scalar(ctx: &GpuContext, v: f32, name: &str) -> Tensor {
    Tensor::from_slice(ctx, Shape5::new(1, 1, 1, 1, 1), &[v], name).unwrap()
}

struct Setup {
    x: Array5<f32>,
    lab: Array5<f32>,
    xt: Tensor,
    lt: Tensor,
}

fn setup(ctx: &GpuContext, n: usize, c: usize, dhw: [usize; 3], scale: f32, seed: u64) -> Setup {
    let [d, h, w] = dhw;
    let x = random([n, c, d, h, w], seed).mapv(|v| v * scale);
    let lab = labels([n, 1, d, h, w], c, seed + 1);
    let xt = Tensor::from_array(ctx, &x, "logits").unwrap();
    let lt = Tensor::from_array(ctx, &lab, "labels").unwrap();
    Setup { x, lab, xt, lt }
}

#[test]
fn softmax_channels_matches_cpu() {
    let ctx = gpu();
    for (i, c) in [1usize, 3, 4].iter().enumerate() {
        let s = setup(&ctx, 2, *c, [5, 7, 6], 4.0, 10 + i as u64);
        let probs = Tensor::zeros(&ctx, s.xt.shape(), "probs").unwrap();
        let mut rec = ctx.recorder();
        softmax_channels(&ctx, &mut rec, &s.xt, &probs).unwrap();
        ctx.submit(rec);
        let want = softmax_channels_f64(&s.x.mapv(f64::from));
        assert_close(
            &probs.to_vec(&ctx).unwrap(),
            &flat(&want),
            LOSS_RTOL,
            LOSS_ATOL,
            &format!("softmax C={c}"),
        );
    }
}

#[test]
fn cross_entropy_matches_cpu() {
    let ctx = gpu();
    for (i, (c, dhw)) in [
        (3usize, [5usize, 7, 6]),
        (4, [3, 9, 11]),
        (2, [1, 1, 1]),
        // 5120 voxels: 128 reduction lanes of 40 voxels each.
        (3, [10, 16, 16]),
    ]
    .iter()
    .enumerate()
    {
        let s = setup(&ctx, 2, *c, *dhw, 3.0, 20 + i as u64);
        let loss = Tensor::zeros(&ctx, Shape5::new(1, 1, 1, 1, 1), "loss").unwrap();
        let up = scalar(&ctx, -0.7, "upstream");
        let dx = Tensor::zeros(&ctx, s.xt.shape(), "dlogits").unwrap();
        let mut rec = ctx.recorder();
        softmax_cross_entropy_forward(&ctx, &mut rec, &s.xt, &s.lt, &loss).unwrap();
        softmax_cross_entropy_backward(&ctx, &mut rec, &s.xt, &s.lt, &up, &dx).unwrap();
        ctx.submit(rec);
        let (x64, l64) = (s.x.mapv(f64::from), s.lab.mapv(f64::from));
        let want = softmax_cross_entropy_forward_f64(&x64, &l64).unwrap();
        assert_close(
            &loss.to_vec(&ctx).unwrap(),
            &[want as f32],
            LOSS_RTOL,
            LOSS_ATOL,
            &format!("CE loss C={c} {dhw:?}"),
        );
        let want_dx = softmax_cross_entropy_backward_f64(&x64, &l64, -0.7).unwrap();
        assert_close(
            &dx.to_vec(&ctx).unwrap(),
            &flat(&want_dx),
            GRAD_RTOL,
            GRAD_ATOL,
            &format!("CE gradient C={c} {dhw:?}"),
        );
    }
}

#[test]
fn dice_matches_cpu() {
    let ctx = gpu();
    for (i, (c, dhw, eps)) in [
        (4usize, [5usize, 7, 6], EPS),
        (3, [5, 7, 6], 1.0),
        (3, [2, 3, 17], 0.0),
        (4, [10, 16, 16], EPS),
    ]
    .iter()
    .enumerate()
    {
        let s = setup(&ctx, 2, *c, *dhw, 3.0, 30 + i as u64);
        let loss = Tensor::zeros(&ctx, Shape5::new(1, 1, 1, 1, 1), "loss").unwrap();
        let up = scalar(&ctx, 1.3, "upstream");
        let dx = Tensor::zeros(&ctx, s.xt.shape(), "dlogits").unwrap();
        let mut rec = ctx.recorder();
        dice_loss_forward(&ctx, &mut rec, &s.xt, &s.lt, &loss, *eps).unwrap();
        dice_loss_backward(&ctx, &mut rec, &s.xt, &s.lt, &up, &dx, *eps).unwrap();
        ctx.submit(rec);
        let (x64, l64) = (s.x.mapv(f64::from), s.lab.mapv(f64::from));
        let want = dice_loss_forward_f64(&x64, &l64, *eps as f64).unwrap();
        assert_close(
            &loss.to_vec(&ctx).unwrap(),
            &[want as f32],
            LOSS_RTOL,
            LOSS_ATOL,
            &format!("Dice loss C={c} eps={eps}"),
        );
        let want_dx = dice_loss_backward_f64(&x64, &l64, 1.3, *eps as f64).unwrap();
        assert_close(
            &dx.to_vec(&ctx).unwrap(),
            &flat(&want_dx),
            GRAD_RTOL,
            GRAD_ATOL,
            &format!("Dice gradient C={c} eps={eps}"),
        );
    }
}

#[test]
fn cross_entropy_is_stable_for_huge_logits() {
    let ctx = gpu();
    let (n, c, d, h, w) = (2, 3, 3, 4, 5);
    let mut rng = Rng::new(7);
    // Values in {-1e4, 0, 1e4} plus small offsets: exp() of them would overflow.
    let x = Array5::from_shape_fn([n, c, d, h, w], |_| {
        (rng.below(3) as f32 - 1.0) * 1e4 + rng.uniform_f32(-2.0, 2.0)
    });
    let lab = labels([n, 1, d, h, w], c, 8);
    let xt = Tensor::from_array(&ctx, &x, "logits").unwrap();
    let lt = Tensor::from_array(&ctx, &lab, "labels").unwrap();
    let loss = Tensor::zeros(&ctx, Shape5::new(1, 1, 1, 1, 1), "loss").unwrap();
    let up = scalar(&ctx, 1.0, "upstream");
    let dx = Tensor::zeros(&ctx, xt.shape(), "dlogits").unwrap();
    let mut rec = ctx.recorder();
    softmax_cross_entropy_forward(&ctx, &mut rec, &xt, &lt, &loss).unwrap();
    softmax_cross_entropy_backward(&ctx, &mut rec, &xt, &lt, &up, &dx).unwrap();
    ctx.submit(rec);
    let (x64, l64) = (x.mapv(f64::from), lab.mapv(f64::from));
    let want = softmax_cross_entropy_forward_f64(&x64, &l64).unwrap();
    assert!(want > 1e3, "test data should give a large loss, got {want}");
    let got = loss.to_vec(&ctx).unwrap();
    assert!(got[0].is_finite(), "CE loss with ±1e4 logits is {}", got[0]);
    // f32 logits near 1e4 carry ~1e-3 absolute rounding; relative 1e-6 of a loss > 1e3.
    assert_close(&got, &[want as f32], 1e-6, 1e-2, "CE loss with ±1e4 logits");
    let want_dx = softmax_cross_entropy_backward_f64(&x64, &l64, 1.0).unwrap();
    assert_close(
        &dx.to_vec(&ctx).unwrap(),
        &flat(&want_dx),
        GRAD_RTOL,
        GRAD_ATOL,
        "CE gradient with ±1e4 logits",
    );
}

/// Labels outside 0..C or non-integer: the GPU writes NaN (loss; CE gradient of that
/// voxel; whole Dice gradient) and never reads out of bounds; the CPU reference errs.
#[test]
fn invalid_labels_give_nan_on_gpu_and_err_on_cpu() {
    let ctx = gpu();
    let (n, c, d, h, w) = (2, 3, 5, 7, 6);
    for (k, bad) in [3.0f32, -1.0, 1.5, 1e9, f32::NAN].iter().enumerate() {
        let s = setup(&ctx, n, c, [d, h, w], 1.0, 50 + k as u64);
        let mut lab = s.lab.clone();
        let at = [1, 0, 2, 3, 4];
        lab[at] = *bad;
        let lt = Tensor::from_array(&ctx, &lab, "labels").unwrap();
        let ce = Tensor::zeros(&ctx, Shape5::new(1, 1, 1, 1, 1), "ce").unwrap();
        let dice = Tensor::zeros(&ctx, Shape5::new(1, 1, 1, 1, 1), "dice").unwrap();
        let up = scalar(&ctx, 1.0, "upstream");
        let dce = Tensor::zeros(&ctx, s.xt.shape(), "dce").unwrap();
        let ddice = Tensor::zeros(&ctx, s.xt.shape(), "ddice").unwrap();
        let mut rec = ctx.recorder();
        softmax_cross_entropy_forward(&ctx, &mut rec, &s.xt, &lt, &ce).unwrap();
        softmax_cross_entropy_backward(&ctx, &mut rec, &s.xt, &lt, &up, &dce).unwrap();
        dice_loss_forward(&ctx, &mut rec, &s.xt, &lt, &dice, EPS).unwrap();
        dice_loss_backward(&ctx, &mut rec, &s.xt, &lt, &up, &ddice, EPS).unwrap();
        ctx.submit(rec);
        ctx.wait().unwrap();
        assert!(ce.to_vec(&ctx).unwrap()[0].is_nan(), "CE loss, label {bad}");
        assert!(
            dice.to_vec(&ctx).unwrap()[0].is_nan(),
            "Dice loss, label {bad}"
        );
        let g = dce.to_array(&ctx).unwrap();
        for ((i, _, z, y, x), v) in g.indexed_iter() {
            let here = [i, 0, z, y, x] == at;
            assert_eq!(
                v.is_nan(),
                here,
                "CE gradient at {:?}, label {bad}",
                (i, z, y, x)
            );
        }
        assert!(
            ddice.to_vec(&ctx).unwrap().iter().all(|v| v.is_nan()),
            "Dice gradient, label {bad}"
        );
        let (x64, l64) = (s.x.mapv(f64::from), lab.mapv(f64::from));
        let e = softmax_cross_entropy_forward_f64(&x64, &l64)
            .unwrap_err()
            .to_string();
        assert!(e.contains("label") && e.contains("0..3"), "{e}");
        assert!(softmax_cross_entropy_backward_f64(&x64, &l64, 1.0).is_err());
        assert!(dice_loss_forward_f64(&x64, &l64, 1e-5).is_err());
        assert!(dice_loss_backward_f64(&x64, &l64, 1.0, 1e-5).is_err());
    }
}

/// Finite differences in f64 with the loss inside a graph: logits = a ⊙ x + b,
/// L = r · loss(logits) with a random scalar r (the upstream gradient).
#[test]
fn cpu_loss_gradients_pass_finite_differences() {
    let shape = [2, 3, 2, 3, 4];
    let x = random(shape, 1).mapv(|v| 2.0 * f64::from(v));
    let a = random(shape, 2).mapv(f64::from);
    let b = random(shape, 3).mapv(f64::from);
    let lab = labels([2, 1, 2, 3, 4], 3, 4).mapv(f64::from);
    let r = 0.8137;
    let eps_dice = 1e-3;
    type Fwd<'a> = Box<dyn Fn(&Array5<f64>) -> f64 + 'a>;
    type Bwd<'a> = Box<dyn Fn(&Array5<f64>, f64) -> Array5<f64> + 'a>;
    let cases: Vec<(&str, Fwd, Bwd)> = vec![
        (
            "cross-entropy",
            Box::new(|z| softmax_cross_entropy_forward_f64(z, &lab).unwrap()),
            Box::new(|z, u| softmax_cross_entropy_backward_f64(z, &lab, u).unwrap()),
        ),
        (
            "dice",
            Box::new(|z| dice_loss_forward_f64(z, &lab, eps_dice).unwrap()),
            Box::new(|z, u| dice_loss_backward_f64(z, &lab, u, eps_dice).unwrap()),
        ),
    ];
    for (name, fwd, bwd) in &cases {
        let total = |x: &Array5<f64>, a: &Array5<f64>| r * fwd(&(a * x + &b));
        let dz = bwd(&(&a * &x + &b), r);
        let dx = &a * &dz;
        let da = &x * &dz;
        let h = 1e-6;
        let mut rng = Rng::new(9);
        for _ in 0..30 {
            let i = [
                rng.below(2),
                rng.below(3),
                rng.below(2),
                rng.below(3),
                rng.below(4),
            ];
            let (mut xp, mut xm) = (x.clone(), x.clone());
            xp[i] += h;
            xm[i] -= h;
            let fd = (total(&xp, &a) - total(&xm, &a)) / (2.0 * h);
            assert!(
                (fd - dx[i]).abs() <= 1e-8 + 1e-6 * fd.abs().max(dx[i].abs()),
                "{name} dx{i:?}: fd {fd} vs {}",
                dx[i]
            );
            let (mut ap, mut am) = (a.clone(), a.clone());
            ap[i] += h;
            am[i] -= h;
            let fd = (total(&x, &ap) - total(&x, &am)) / (2.0 * h);
            assert!(
                (fd - da[i]).abs() <= 1e-8 + 1e-6 * fd.abs().max(da[i].abs()),
                "{name} da{i:?}: fd {fd} vs {}",
                da[i]
            );
        }
    }
}

#[test]
fn bad_input_is_an_error_naming_the_problem() {
    let ctx = gpu();
    let s = Shape5::new;
    let x = Tensor::zeros(&ctx, s(2, 3, 4, 5, 6), "logits").unwrap();
    let lab = Tensor::zeros(&ctx, s(2, 1, 4, 5, 6), "labels").unwrap();
    let wrong_c = Tensor::zeros(&ctx, s(2, 3, 4, 5, 6), "labels3").unwrap();
    let wrong_sp = Tensor::zeros(&ctx, s(2, 1, 4, 5, 7), "labels_sp").unwrap();
    let wrong_n = Tensor::zeros(&ctx, s(1, 1, 4, 5, 6), "labels_n").unwrap();
    let loss = Tensor::zeros(&ctx, s(1, 1, 1, 1, 1), "loss").unwrap();
    let loss2 = Tensor::zeros(&ctx, s(1, 1, 1, 1, 2), "loss2").unwrap();
    let up = Tensor::zeros(&ctx, s(1, 1, 1, 1, 1), "up").unwrap();
    let up2 = Tensor::zeros(&ctx, s(1, 2, 1, 1, 1), "up2").unwrap();
    let dx = Tensor::zeros(&ctx, s(2, 3, 4, 5, 6), "dx").unwrap();
    let dx_bad = Tensor::zeros(&ctx, s(2, 4, 4, 5, 6), "dx_bad").unwrap();
    let mut rec = ctx.recorder();
    let r = &mut rec;
    let msg = |e: masnet_wgpu::Error| e.to_string();

    for bad in [&wrong_c, &wrong_sp, &wrong_n] {
        let e = msg(softmax_cross_entropy_forward(&ctx, r, &x, bad, &loss).unwrap_err());
        assert!(
            e.contains(&format!("'{}'", bad.name)) && e.contains("[N, 1, D, H, W]"),
            "{e}"
        );
        let e = msg(dice_loss_backward(&ctx, r, &x, bad, &up, &dx, 1e-5).unwrap_err());
        assert!(e.contains(&format!("'{}'", bad.name)), "{e}");
    }
    let e = msg(softmax_cross_entropy_forward(&ctx, r, &x, &lab, &loss2).unwrap_err());
    assert!(
        e.contains("'loss2'") && e.contains("exactly 1 element"),
        "{e}"
    );
    let e = msg(dice_loss_forward(&ctx, r, &x, &lab, &loss2, 1e-5).unwrap_err());
    assert!(e.contains("'loss2'"), "{e}");
    let e = msg(softmax_cross_entropy_backward(&ctx, r, &x, &lab, &up2, &dx).unwrap_err());
    assert!(e.contains("upstream 'up2'"), "{e}");
    let e = msg(softmax_cross_entropy_backward(&ctx, r, &x, &lab, &up, &dx_bad).unwrap_err());
    assert!(e.contains("dlogits 'dx_bad'"), "{e}");
    let e = msg(softmax_channels(&ctx, r, &x, &dx_bad).unwrap_err());
    assert!(e.contains("probs 'dx_bad'"), "{e}");
    let e = msg(softmax_channels(&ctx, r, &x, &x).unwrap_err());
    assert!(e.contains("alias"), "{e}");
    let e = msg(softmax_cross_entropy_backward(&ctx, r, &x, &lab, &up, &x).unwrap_err());
    assert!(e.contains("alias"), "{e}");
    for eps in [-1.0, f32::NAN, f32::INFINITY] {
        let e = msg(dice_loss_forward(&ctx, r, &x, &lab, &loss, eps).unwrap_err());
        assert!(e.contains("eps"), "{e}");
        let e = msg(dice_loss_backward(&ctx, r, &x, &lab, &up, &dx, eps).unwrap_err());
        assert!(e.contains("eps"), "{e}");
    }
    // CPU references reject bad shapes too.
    let x64 = Array5::<f64>::zeros([2, 3, 4, 5, 6]);
    let l64 = Array5::<f64>::zeros([2, 3, 4, 5, 6]);
    let e = softmax_cross_entropy_forward_f64(&x64, &l64)
        .unwrap_err()
        .to_string();
    assert!(e.contains("labels"), "{e}");
    drop(rec);
    ctx.check("after errors").unwrap();
}
