//! 3-D max / average pooling: GPU forward and backward against the f64 CPU references
//! on odd shapes, argmax tie-breaking (constant inputs, planted ties, padding, NaN),
//! finite differences of the CPU backward with the pool inside a small graph, and bad
//! input returning errors.

mod common;

use common::{assert_close, gpu, random};
use masnet_wgpu::ops::pool::{
    avgpool3d_backward, avgpool3d_backward_f64, avgpool3d_forward, avgpool3d_forward_f64,
    maxpool3d_backward, maxpool3d_backward_f64, maxpool3d_forward, maxpool3d_forward_f64,
    shader_variants, PoolSpec,
};
use masnet_wgpu::rng::Rng;
use masnet_wgpu::{GpuContext, Shape5, Tensor};
use ndarray::Array5;

/// Average forward: a mean of at most 27 f32 values, one rounding each.
const AVG_RTOL: f32 = 1e-5;
const AVG_ATOL: f32 = 1e-6;
/// Backward passes: sums of at most 8 (max) / 27 (avg) terms of size <= 1.
const GRAD_RTOL: f32 = 1e-5;
const GRAD_ATOL: f32 = 1e-5;

fn flat(a: &Array5<f64>) -> Vec<f32> {
    a.iter().map(|&v| v as f32).collect()
}

/// A tensor prefilled with NaN, so an element the kernel forgets to write shows up.
fn poisoned(ctx: &GpuContext, shape: Shape5, name: &str) -> Tensor {
    let n = shape.numel().unwrap();
    Tensor::from_slice(ctx, shape, &vec![f32::NAN; n], name).unwrap()
}

/// Runs the GPU maxpool forward; returns (y, argmax) as flat vectors.
fn gpu_max(ctx: &GpuContext, x: &Array5<f32>, spec: &PoolSpec) -> (Vec<f32>, Vec<f32>) {
    let xt = Tensor::from_array(ctx, x, "x").unwrap();
    let os = spec.output_shape(xt.shape()).unwrap();
    let y = poisoned(ctx, os, "y");
    let am = poisoned(ctx, os, "argmax");
    let mut rec = ctx.recorder();
    maxpool3d_forward(ctx, &mut rec, &xt, &y, &am, spec).unwrap();
    ctx.submit(rec);
    (y.to_vec(ctx).unwrap(), am.to_vec(ctx).unwrap())
}

fn specs() -> Vec<PoolSpec> {
    vec![
        PoolSpec::cube(2, 2, 0),
        PoolSpec::cube(3, 2, 1),
        PoolSpec {
            kernel: [2, 1, 2],
            stride: [2, 1, 2],
            pad: [0, 0, 0],
        },
        // Overlapping windows with stride 1 and mixed padding.
        PoolSpec {
            kernel: [3, 2, 1],
            stride: [1, 2, 1],
            pad: [1, 1, 0],
        },
    ]
}

fn check_case(ctx: &GpuContext, size: [usize; 3], spec: &PoolSpec, seed: u64) {
    let what = format!("{size:?} {spec:?}");
    let [d, h, w] = size;
    let x = random([2, 3, d, h, w], seed);
    let x64 = x.mapv(f64::from);
    let xt = Tensor::from_array(ctx, &x, "x").unwrap();
    let os = spec.output_shape(xt.shape()).unwrap();

    // Max forward: the values are copies, so exact; argmax exactly equal.
    let (want_y, want_am) = maxpool3d_forward_f64(&x64, spec).unwrap();
    let y = poisoned(ctx, os, "y");
    let am = poisoned(ctx, os, "argmax");
    let mut rec = ctx.recorder();
    maxpool3d_forward(ctx, &mut rec, &xt, &y, &am, spec).unwrap();
    ctx.submit(rec);
    assert_close(
        &y.to_vec(ctx).unwrap(),
        &flat(&want_y),
        0.0,
        0.0,
        &format!("maxpool y {what}"),
    );
    let got_am = am.to_vec(ctx).unwrap();
    let want_am_f: Vec<f32> = want_am.iter().map(|&i| i as f32).collect();
    assert_eq!(got_am, want_am_f, "maxpool argmax {what}");

    // Max backward (gather), twice: bitwise identical runs.
    let dy = random(os.0, seed + 1);
    let dyt = Tensor::from_array(ctx, &dy, "dy").unwrap();
    let want_dx = maxpool3d_backward_f64(&dy.mapv(f64::from), &want_am, size, spec).unwrap();
    let mut runs = Vec::new();
    for _ in 0..2 {
        let dx = poisoned(ctx, xt.shape(), "dx");
        let mut rec = ctx.recorder();
        maxpool3d_backward(ctx, &mut rec, &dyt, &am, &dx, spec).unwrap();
        ctx.submit(rec);
        runs.push(dx.to_vec(ctx).unwrap());
    }
    assert_close(
        &runs[0],
        &flat(&want_dx),
        GRAD_RTOL,
        GRAD_ATOL,
        &format!("maxpool dx {what}"),
    );
    assert!(
        runs[0]
            .iter()
            .zip(&runs[1])
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "maxpool backward is not deterministic {what}"
    );

    // Average forward and backward.
    let want_y = avgpool3d_forward_f64(&x64, spec).unwrap();
    let y = poisoned(ctx, os, "y");
    let dx = poisoned(ctx, xt.shape(), "dx");
    let mut rec = ctx.recorder();
    avgpool3d_forward(ctx, &mut rec, &xt, &y, spec).unwrap();
    avgpool3d_backward(ctx, &mut rec, &dyt, &dx, spec).unwrap();
    ctx.submit(rec);
    assert_close(
        &y.to_vec(ctx).unwrap(),
        &flat(&want_y),
        AVG_RTOL,
        AVG_ATOL,
        &format!("avgpool y {what}"),
    );
    let want_dx = avgpool3d_backward_f64(&dy.mapv(f64::from), size, spec).unwrap();
    assert_close(
        &dx.to_vec(ctx).unwrap(),
        &flat(&want_dx),
        GRAD_RTOL,
        GRAD_ATOL,
        &format!("avgpool dx {what}"),
    );
}

#[test]
fn gpu_matches_cpu_on_odd_shapes() {
    let ctx = gpu();
    for (i, spec) in specs().iter().enumerate() {
        check_case(&ctx, [7, 6, 5], spec, 100 + 10 * i as u64);
        check_case(&ctx, [5, 3, 4], spec, 200 + 10 * i as u64);
    }
}

#[test]
fn output_sizes_follow_the_floor_formula() {
    assert_eq!(
        PoolSpec::cube(2, 2, 0).output_size([7, 6, 5]).unwrap(),
        [3, 3, 2]
    );
    assert_eq!(
        PoolSpec::cube(3, 2, 1).output_size([7, 6, 5]).unwrap(),
        [4, 3, 3]
    );
    let s = PoolSpec {
        kernel: [2, 1, 2],
        stride: [2, 1, 2],
        pad: [0, 0, 0],
    };
    assert_eq!(s.output_size([7, 6, 5]).unwrap(), [3, 6, 2]);
}

#[test]
fn ties_go_to_the_first_index() {
    let ctx = gpu();
    // Constant input: every window's argmax is its first real voxel (never padding).
    for spec in specs() {
        let x = Array5::<f32>::from_elem([2, 3, 7, 6, 5], 0.5);
        let (y, am) = gpu_max(&ctx, &x, &spec);
        assert!(y.iter().all(|&v| v == 0.5));
        let [od, oh, ow] = spec.output_size([7, 6, 5]).unwrap();
        let first = |o: usize, a: usize| (o * spec.stride[a]).saturating_sub(spec.pad[a]);
        let mut want = Vec::new();
        for _ in 0..6 {
            for zd in 0..od {
                for zh in 0..oh {
                    for zw in 0..ow {
                        want.push(((first(zd, 0) * 6 + first(zh, 1)) * 5 + first(zw, 2)) as f32);
                    }
                }
            }
        }
        assert_eq!(am, want, "constant input {spec:?}");
        let (_, cpu_am) = maxpool3d_forward_f64(&x.mapv(f64::from), &spec).unwrap();
        let cpu: Vec<f32> = cpu_am.iter().map(|&i| i as f32).collect();
        assert_eq!(cpu, want, "CPU reference, constant input {spec:?}");

        // Gradient of constant input: everything goes to the first voxels.
        let xt = Tensor::from_array(&ctx, &x, "x").unwrap();
        let os = spec.output_shape(xt.shape()).unwrap();
        let amt = Tensor::from_slice(&ctx, os, &am, "argmax").unwrap();
        let dy = random(os.0, 7);
        let dyt = Tensor::from_array(&ctx, &dy, "dy").unwrap();
        let dx = poisoned(&ctx, xt.shape(), "dx");
        let mut rec = ctx.recorder();
        maxpool3d_backward(&ctx, &mut rec, &dyt, &amt, &dx, &spec).unwrap();
        ctx.submit(rec);
        let want_dx =
            maxpool3d_backward_f64(&dy.mapv(f64::from), &cpu_am, [7, 6, 5], &spec).unwrap();
        assert_close(
            &dx.to_vec(&ctx).unwrap(),
            &flat(&want_dx),
            GRAD_RTOL,
            GRAD_ATOL,
            &format!("constant input dx {spec:?}"),
        );
    }

    // Planted ties: values from {0, 1, 2}, so most windows hold a tied maximum.
    let mut rng = Rng::new(3);
    let x = Array5::from_shape_fn([2, 3, 7, 6, 5], |_| rng.below(3) as f32);
    for spec in specs() {
        let (_, am) = gpu_max(&ctx, &x, &spec);
        let (_, cpu_am) = maxpool3d_forward_f64(&x.mapv(f64::from), &spec).unwrap();
        let cpu: Vec<f32> = cpu_am.iter().map(|&i| i as f32).collect();
        assert_eq!(am, cpu, "planted ties {spec:?}");
    }

    // Hand-made windows along W (kernel 4, stride 4): [1, 3, 3, 2] -> index 1, and a
    // tie across rows (h = 0 and 1) goes to the earlier row.
    let line = |v: &[f32]| Array5::from_shape_vec([1, 1, 1, 1, v.len()], v.to_vec()).unwrap();
    let spec_w4 = PoolSpec {
        kernel: [1, 1, 4],
        stride: [1, 1, 4],
        pad: [0, 0, 0],
    };
    let (y, am) = gpu_max(
        &ctx,
        &line(&[1.0, 3.0, 3.0, 2.0, 7.0, 7.0, 7.0, 7.0]),
        &spec_w4,
    );
    assert_eq!((y, am), (vec![3.0, 7.0], vec![1.0, 4.0]));
    let x = Array5::from_shape_vec([1, 1, 1, 2, 2], vec![0.0, 5.0, 5.0, 1.0]).unwrap();
    let spec_hw = PoolSpec {
        kernel: [1, 2, 2],
        stride: [1, 2, 2],
        pad: [0, 0, 0],
    };
    let (y, am) = gpu_max(&ctx, &x, &spec_hw);
    assert_eq!((y, am), (vec![5.0], vec![1.0]));
}

#[test]
fn padding_never_wins_and_nan_propagates() {
    let ctx = gpu();
    let line = |v: &[f32]| Array5::from_shape_vec([1, 1, 1, 1, v.len()], v.to_vec()).unwrap();
    // Kernel 3, stride 2, pad 1 over 3 negative values: windows [pad, 0, 1] and [1, 2, pad].
    let spec = PoolSpec {
        kernel: [1, 1, 3],
        stride: [1, 1, 2],
        pad: [0, 0, 1],
    };
    let (y, am) = gpu_max(&ctx, &line(&[-5.0, -7.0, -6.0]), &spec);
    assert_eq!((y, am), (vec![-5.0, -6.0], vec![0.0, 2.0]));
    // Average over real voxels only.
    let xt = Tensor::from_array(&ctx, &line(&[-5.0, -7.0, -6.0]), "x").unwrap();
    let yt = poisoned(&ctx, Shape5::new(1, 1, 1, 1, 2), "y");
    let mut rec = ctx.recorder();
    avgpool3d_forward(&ctx, &mut rec, &xt, &yt, &spec).unwrap();
    ctx.submit(rec);
    assert_eq!(yt.to_vec(&ctx).unwrap(), vec![-6.0, -6.5]);

    // NaN beats every number; the first NaN wins. -inf windows still pick their first.
    let spec_w4 = PoolSpec {
        kernel: [1, 1, 4],
        stride: [1, 1, 4],
        pad: [0, 0, 0],
    };
    let ninf = f32::NEG_INFINITY;
    let v = [
        1.0,
        f32::NAN,
        5.0,
        f32::NAN,
        ninf,
        ninf,
        ninf,
        ninf,
        2.0,
        f32::INFINITY,
        3.0,
        f32::NAN,
    ];
    let (y, am) = gpu_max(&ctx, &line(&v), &spec_w4);
    assert!(y[0].is_nan() && y[2].is_nan(), "{y:?}");
    assert_eq!(y[1], ninf);
    assert_eq!(am, vec![1.0, 4.0, 11.0]);
    let (cy, cam) = maxpool3d_forward_f64(&line(&v).mapv(f64::from), &spec_w4).unwrap();
    assert!(cy[[0, 0, 0, 0, 0]].is_nan() && cy[[0, 0, 0, 0, 2]].is_nan());
    assert_eq!(cam.iter().copied().collect::<Vec<_>>(), vec![1, 4, 11]);
}

/// Finite differences in f64 of L = sum(r * pool(a * x + b)) with respect to x, a and b
/// (a, b elementwise like x), so the upstream gradient r is not all ones.
fn finite_difference_check(is_max: bool) {
    let size = [5, 4, 5];
    let shape = [2, 2, size[0], size[1], size[2]];
    let spec = PoolSpec::cube(3, 2, 1);
    let n: usize = shape.iter().product();
    let mut rng = Rng::new(if is_max { 11 } else { 12 });
    // z = a * x + b takes distinct values 0.01 apart (a permutation of a grid), so the
    // max is differentiable and small steps never change a window's winner.
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        order.swap(i, rng.below(i + 1));
    }
    let z: Vec<f64> = order.iter().map(|&k| k as f64 * 0.01 - 1.0).collect();
    let a = Array5::from_shape_fn(shape, |_| {
        let m = 0.5 + rng.uniform();
        if rng.uniform() < 0.5 {
            -m
        } else {
            m
        }
    });
    let b = Array5::from_shape_fn(shape, |_| rng.uniform() - 0.5);
    let z = Array5::from_shape_vec(shape, z).unwrap();
    let x = (&z - &b) / &a;
    let os = spec.output_size(size).unwrap();
    let r = random([2, 2, os[0], os[1], os[2]], 13).mapv(f64::from);

    let pool = |v: &Array5<f64>| -> Array5<f64> {
        if is_max {
            maxpool3d_forward_f64(v, &spec).unwrap().0
        } else {
            avgpool3d_forward_f64(v, &spec).unwrap()
        }
    };
    let loss = |x: &Array5<f64>, a: &Array5<f64>, b: &Array5<f64>| -> f64 {
        let v = a * x + b;
        (&r * &pool(&v)).sum()
    };
    let zz = &a * &x + &b;
    let g = if is_max {
        let (_, am) = maxpool3d_forward_f64(&zz, &spec).unwrap();
        maxpool3d_backward_f64(&r, &am, size, &spec).unwrap()
    } else {
        avgpool3d_backward_f64(&r, size, &spec).unwrap()
    };
    let dx = &a * &g;
    let da = &x * &g;
    let db = g.clone();
    let what = if is_max { "maxpool" } else { "avgpool" };
    common::check_affine_graph_fd(&loss, &x, &a, &b, [&dx, &da, &db], 40, 5, what);
    // The graph really routes gradient through the pool (not all zeros).
    // (max: one winner per window, 72 windows; avg: every voxel)
    let nonzero = g.iter().filter(|&&v| v != 0.0).count();
    assert!(
        nonzero >= if is_max { 30 } else { n },
        "{what}: {nonzero} nonzero"
    );
}

#[test]
fn maxpool_cpu_gradient_passes_finite_differences() {
    finite_difference_check(true);
}

#[test]
fn avgpool_cpu_gradient_passes_finite_differences() {
    finite_difference_check(false);
}

fn err_text(r: masnet_wgpu::Result<()>) -> String {
    r.expect_err("expected an error").to_string()
}

#[test]
fn bad_input_is_an_error() {
    let ctx = gpu();
    let s = Shape5::new;
    let x = Tensor::zeros(&ctx, s(2, 3, 7, 6, 5), "x").unwrap();
    let spec = PoolSpec::cube(2, 2, 0);
    let y = Tensor::zeros(&ctx, s(2, 3, 3, 3, 2), "y").unwrap();
    let am = Tensor::zeros(&ctx, s(2, 3, 3, 3, 2), "argmax").unwrap();
    let mut rec = ctx.recorder();

    let bad = PoolSpec {
        kernel: [0, 2, 2],
        ..spec
    };
    let e = err_text(maxpool3d_forward(&ctx, &mut rec, &x, &y, &am, &bad));
    assert!(e.contains("kernel") && e.contains("at least 1"), "{e}");
    let bad = PoolSpec {
        stride: [2, 0, 2],
        ..spec
    };
    let e = err_text(avgpool3d_forward(&ctx, &mut rec, &x, &y, &bad));
    assert!(e.contains("stride") && e.contains("at least 1"), "{e}");
    let e = err_text(avgpool3d_forward(
        &ctx,
        &mut rec,
        &x,
        &y,
        &PoolSpec::cube(2, 2, 2),
    ));
    assert!(e.contains("pad") && e.contains("at most half"), "{e}");
    let thin = Tensor::zeros(&ctx, s(2, 3, 2, 6, 5), "thin").unwrap();
    let e = err_text(avgpool3d_forward(
        &ctx,
        &mut rec,
        &thin,
        &y,
        &PoolSpec::cube(3, 1, 0),
    ));
    assert!(
        e.contains("larger than the padded input") && e.contains("'thin'"),
        "{e}"
    );

    // Output, argmax and gradient shapes.
    let y_bad = Tensor::zeros(&ctx, s(2, 3, 3, 3, 3), "y_bad").unwrap();
    let e = err_text(maxpool3d_forward(&ctx, &mut rec, &x, &y_bad, &am, &spec));
    assert!(
        e.contains("'y_bad'") && e.contains("[2, 3, 3, 3, 2]"),
        "{e}"
    );
    let y_c4 = Tensor::zeros(&ctx, s(2, 4, 3, 3, 2), "y_c4").unwrap();
    let e = err_text(avgpool3d_forward(&ctx, &mut rec, &x, &y_c4, &spec));
    assert!(e.contains("'y_c4'"), "{e}");
    let e = err_text(maxpool3d_forward(&ctx, &mut rec, &x, &y, &y_bad, &spec));
    assert!(e.contains("argmax 'y_bad'"), "{e}");
    let e = err_text(maxpool3d_backward(&ctx, &mut rec, &y, &y_bad, &x, &spec));
    assert!(e.contains("argmax 'y_bad'"), "{e}");
    let dx_bad = Tensor::zeros(&ctx, s(2, 3, 5, 6, 5), "dx_bad").unwrap();
    let e = err_text(maxpool3d_backward(&ctx, &mut rec, &y, &am, &dx_bad, &spec));
    assert!(e.contains("'dx_bad'") && e.contains("'y'"), "{e}");
    let e = err_text(avgpool3d_backward(&ctx, &mut rec, &y_bad, &x, &spec));
    assert!(e.contains("'y_bad'"), "{e}");
    let e = err_text(maxpool3d_forward(&ctx, &mut rec, &x, &y, &y, &spec));
    assert!(e.contains("distinct"), "{e}");

    // Volumes past 2^24 voxels cannot hold exact f32 argmax indices.
    let big = Tensor::empty(&ctx, s(1, 1, 257, 256, 256), "big").unwrap();
    let e = err_text(maxpool3d_forward(&ctx, &mut rec, &big, &y, &am, &spec));
    assert!(e.contains("'big'") && e.contains("16777216"), "{e}");
    drop(rec);
    ctx.check("after errors").unwrap();

    // CPU references reject bad specs too.
    let e = maxpool3d_forward_f64(&Array5::zeros([1, 1, 2, 2, 2]), &PoolSpec::cube(3, 1, 0))
        .unwrap_err()
        .to_string();
    assert!(e.contains("larger than the padded input"), "{e}");
}

#[test]
fn shader_sections_are_all_exported() {
    let names: Vec<String> = shader_variants().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            "pool maxpool_forward",
            "pool maxpool_backward",
            "pool avgpool"
        ]
    );
}
