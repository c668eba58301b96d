//! Shared test helpers: the GPU context (a missing adapter fails the test, never
//! skips it), random tensors and tolerance checks.
#![allow(dead_code)]

use masnet_wgpu::ops::Conv3dVariant;
use masnet_wgpu::rng::Rng;
use masnet_wgpu::{GpuContext, GpuOptions};
use ndarray::Array5;

/// Opens the default adapter; panics with the engine's message if there is none.
pub fn gpu() -> GpuContext {
    let opts = GpuOptions::from_env().expect("GPU options");
    match GpuContext::new(&opts) {
        Ok(c) => c,
        Err(e) => panic!("GPU tests need an adapter: {e}"),
    }
}

/// Random array uniform in [-1, 1).
pub fn random(shape: [usize; 5], seed: u64) -> Array5<f32> {
    let mut rng = Rng::new(seed);
    let n: usize = shape.iter().product();
    Array5::from_shape_vec(shape, rng.vec_f32(n, -1.0, 1.0)).unwrap()
}

/// Asserts `|a - b| <= atol + rtol * |b|` everywhere, reporting the worst element.
pub fn assert_close(a: &[f32], b: &[f32], rtol: f32, atol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    let mut worst = (0usize, 0f32);
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        assert!(x.is_finite(), "{what}: non-finite value {x} at {i}");
        let excess = (x - y).abs() - (atol + rtol * y.abs());
        if excess > worst.1 {
            worst = (i, excess);
        }
    }
    let i = worst.0;
    assert!(
        worst.1 <= 0.0,
        "{what}: element {i} differs: gpu {} vs cpu {} (rtol {rtol}, atol {atol})",
        a[i],
        b[i]
    );
}

/// The conv3d kernel variants this adapter can run (the subgroup one needs fixed
/// subgroups of 8 or more; tiled and gemm run everywhere).
pub fn variants(ctx: &GpuContext) -> Vec<Conv3dVariant> {
    let mut v = vec![Conv3dVariant::Tiled, Conv3dVariant::Gemm];
    if ctx.subgroup_size.is_some_and(|s| s >= 8) {
        v.push(Conv3dVariant::Subgroup);
    }
    v
}

/// (trainable, total) scalars of a store.
pub fn counts(store: &masnet_wgpu::autograd::ParamStore) -> (usize, usize) {
    (store.trainable_count(), store.total_count())
}

/// Largest absolute difference of two equally long slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Random BN affine parameters (γ in [0.7, 1.3)), random biases, and running
/// statistics: perturbed around the current (calibrated) ones when `calibrated`, drawn
/// from fixed ranges otherwise. Fusion must use all of them.
pub fn perturb_bn(
    ctx: &GpuContext,
    s: &masnet_wgpu::autograd::ParamStore,
    seed: u64,
    calibrated: bool,
) {
    let mut rng = Rng::new(seed);
    for (id, e) in s.iter() {
        let n = e.value.shape().numel().unwrap();
        let old = s.read(ctx, id).unwrap();
        let v: Vec<f32> = if e.name.ends_with("bn.weight") {
            rng.vec_f32(n, 0.7, 1.3)
        } else if e.name.ends_with("bias") {
            rng.vec_f32(n, -0.2, 0.2)
        } else if e.name.ends_with("running_var") {
            let f = rng.vec_f32(n, 0.7, 1.4);
            if calibrated {
                old.iter().zip(f).map(|(a, b)| a * b).collect()
            } else {
                f
            }
        } else if e.name.ends_with("running_mean") {
            let var_id = s
                .id(&e.name.replace("running_mean", "running_var"))
                .unwrap();
            let var = s.read(ctx, var_id).unwrap();
            let f = rng.vec_f32(n, -0.2, 0.2);
            if calibrated {
                old.iter()
                    .zip(f)
                    .zip(var)
                    .map(|((a, b), v)| a + b * v.sqrt())
                    .collect()
            } else {
                f
            }
        } else {
            continue;
        };
        s.set(ctx, id, &v).unwrap();
    }
}

/// Central finite differences (h = 1e-6, tolerance 1e-6 · (1 + |fd|)) of
/// `loss(x, a, b)` — an op inside the small graph L = Σ r ⊙ op(a ⊙ x + b) — against the
/// analytic gradients `[dx, da, db]`: every element of x, `samples` random elements of
/// a and b.
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
pub fn check_affine_graph_fd(
    loss: &dyn Fn(&Array5<f64>, &Array5<f64>, &Array5<f64>) -> f64,
    x: &Array5<f64>,
    a: &Array5<f64>,
    b: &Array5<f64>,
    [dx, da, db]: [&Array5<f64>; 3],
    samples: usize,
    seed: u64,
    what: &str,
) {
    let h = 1e-6;
    let tol = |fd: f64| 1e-6 + 1e-6 * fd.abs();
    let fd_at = |which: usize, i: (usize, usize, usize, usize, usize)| -> f64 {
        let mut args = [x.clone(), a.clone(), b.clone()];
        args[which][i] += h;
        let p = loss(&args[0], &args[1], &args[2]);
        args[which][i] -= 2.0 * h;
        let m = loss(&args[0], &args[1], &args[2]);
        (p - m) / (2.0 * h)
    };
    for (i, _) in x.indexed_iter() {
        let fd = fd_at(0, i);
        assert!(
            (fd - dx[i]).abs() <= tol(fd),
            "{what} dx{i:?}: fd {fd} vs {}",
            dx[i]
        );
    }
    let s = x.shape();
    let mut rng = Rng::new(seed);
    for _ in 0..samples {
        let i = (
            rng.below(s[0]),
            rng.below(s[1]),
            rng.below(s[2]),
            rng.below(s[3]),
            rng.below(s[4]),
        );
        for (which, name, g) in [(1, "da", da), (2, "db", db)] {
            let fd = fd_at(which, i);
            assert!(
                (fd - g[i]).abs() <= tol(fd),
                "{what} {name}{i:?}: fd {fd} vs {}",
                g[i]
            );
        }
    }
}

/// `train` on the embedded brain with a tiny DU-Net (4 features, one level), 8³ patches,
/// batch 2, 2 steps per epoch, a checkpoint every epoch and a constant learning rate;
/// CLI tests add epochs, seed and output.
pub fn tiny_train_args(epochs: &'static str) -> Vec<&'static str> {
    vec![
        "train",
        "--patch",
        "8",
        "--batch",
        "2",
        "--growth",
        "4",
        "--init-features",
        "4",
        "--layers",
        "1",
        "--bottleneck",
        "4",
        "--levels",
        "1",
        "--steps-per-epoch",
        "2",
        "--epochs",
        epochs,
        "--checkpoint-every",
        "1",
        "--lr-schedule",
        "constant:1e-3",
    ]
}

/// Peak pool bytes above what was live before of `net`'s no-grad forward on `shape`
/// (random input): with every value released after its last use, it does not grow with
/// the number of layers.
#[allow(dead_code)]
pub fn inference_peak<N: masnet_wgpu::nn::Network>(
    ctx: &GpuContext,
    net: &N,
    store: &masnet_wgpu::autograd::ParamStore,
    shape: masnet_wgpu::Shape5,
) -> u64 {
    use masnet_wgpu::autograd::{Graph, Mode};
    let x = Rng::new(9).vec_f32(shape.numel().unwrap(), -1.0, 1.0);
    ctx.wait().unwrap();
    let before = ctx.pool.memory().in_use;
    ctx.pool.reset_peak();
    let mut g = Graph::no_grad(ctx, Mode::Eval);
    let xv = g.input(masnet_wgpu::Tensor::from_slice(ctx, shape, &x, "x").unwrap());
    net.forward(&mut g, store, xv, 0).unwrap();
    g.submit();
    ctx.wait().unwrap();
    ctx.pool.memory().peak_in_use.saturating_sub(before)
}
