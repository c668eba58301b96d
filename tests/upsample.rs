//! Nearest and trilinear (align_corners=False) upsampling: hand-computed cases, GPU
//! forward and backward against the f64 CPU references on odd shapes, finite
//! differences of the CPU backward with the upsampling inside a small graph, and bad
//! input returning errors.

mod common;

use common::{assert_close, gpu, random};
use masnet_wgpu::ops::upsample::{
    upsample_nearest_backward, upsample_nearest_backward_f64, upsample_nearest_forward,
    upsample_nearest_forward_f64, upsample_output_shape, upsample_trilinear_backward,
    upsample_trilinear_backward_f64, upsample_trilinear_forward, upsample_trilinear_forward_f64,
};
use masnet_wgpu::{GpuContext, Shape5, Tensor};
use ndarray::Array5;

/// Forward: at most 8 weighted terms with weights from exact integer ratios.
const FWD_RTOL: f32 = 1e-5;
const FWD_ATOL: f32 = 1e-6;
/// Backward: sums of up to 3^3 * s^3 weighted terms of size <= 1.
const GRAD_RTOL: f32 = 1e-5;
const GRAD_ATOL: f32 = 2e-5;

fn flat(a: &Array5<f64>) -> Vec<f32> {
    a.iter().map(|&v| v as f32).collect()
}

/// A tensor prefilled with NaN, so an element the kernel forgets to write shows up.
fn poisoned(ctx: &GpuContext, shape: Shape5, name: &str) -> Tensor {
    let n = shape.numel().unwrap();
    Tensor::from_slice(ctx, shape, &vec![f32::NAN; n], name).unwrap()
}

#[derive(Clone, Copy, Debug)]
enum Mode {
    Nearest,
    Trilinear,
}

fn gpu_forward(ctx: &GpuContext, mode: Mode, x: &Array5<f32>, scale: [usize; 3]) -> Vec<f32> {
    let xt = Tensor::from_array(ctx, x, "x").unwrap();
    let y = poisoned(ctx, upsample_output_shape(xt.shape(), scale).unwrap(), "y");
    let mut rec = ctx.recorder();
    match mode {
        Mode::Nearest => upsample_nearest_forward(ctx, &mut rec, &xt, &y, scale),
        Mode::Trilinear => upsample_trilinear_forward(ctx, &mut rec, &xt, &y, scale),
    }
    .unwrap();
    ctx.submit(rec);
    y.to_vec(ctx).unwrap()
}

fn gpu_backward(ctx: &GpuContext, mode: Mode, dy: &Array5<f32>, scale: [usize; 3]) -> Vec<f32> {
    let dyt = Tensor::from_array(ctx, dy, "dy").unwrap();
    let s = dyt.shape();
    let in_shape = Shape5::new(
        s.n(),
        s.c(),
        s.0[2] / scale[0],
        s.0[3] / scale[1],
        s.0[4] / scale[2],
    );
    let dx = poisoned(ctx, in_shape, "dx");
    let mut rec = ctx.recorder();
    match mode {
        Mode::Nearest => upsample_nearest_backward(ctx, &mut rec, &dyt, &dx, scale),
        Mode::Trilinear => upsample_trilinear_backward(ctx, &mut rec, &dyt, &dx, scale),
    }
    .unwrap();
    ctx.submit(rec);
    dx.to_vec(ctx).unwrap()
}

fn line(v: &[f64]) -> Array5<f64> {
    Array5::from_shape_vec([1, 1, 1, 1, v.len()], v.to_vec()).unwrap()
}

#[test]
fn hand_computed_cases() {
    let ctx = gpu();
    let close = |got: &[f64], want: &[f64], what: &str| {
        assert_eq!(got.len(), want.len(), "{what}");
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{what}: {got:?} vs {want:?}");
        }
    };
    // [0, 1] x2 -> [0, 0.25, 0.75, 1] (PyTorch align_corners=False).
    let y = upsample_trilinear_forward_f64(&line(&[0.0, 1.0]), [1, 1, 2]).unwrap();
    close(y.as_slice().unwrap(), &[0.0, 0.25, 0.75, 1.0], "x2 line");
    // [0, 1] x3 -> [0, 0, 1/3, 2/3, 1, 1].
    let y = upsample_trilinear_forward_f64(&line(&[0.0, 1.0]), [1, 1, 3]).unwrap();
    close(
        y.as_slice().unwrap(),
        &[0.0, 0.0, 1.0 / 3.0, 2.0 / 3.0, 1.0, 1.0],
        "x3 line",
    );
    // [a, b, c] x2 along D -> [a, .75a+.25b, .25a+.75b, .75b+.25c, .25b+.75c, c].
    let x = Array5::from_shape_vec([1, 1, 3, 1, 1], vec![1.0, 3.0, -2.0]).unwrap();
    let y = upsample_trilinear_forward_f64(&x, [2, 1, 1]).unwrap();
    close(
        y.as_slice().unwrap(),
        &[1.0, 1.5, 2.5, 1.75, -0.75, -2.0],
        "x2 along D",
    );
    // 2-D [[0, 1], [2, 3]] x2: out[1][1] samples (0.25, 0.25) -> 0.75.
    let x = Array5::from_shape_vec([1, 1, 1, 2, 2], vec![0.0, 1.0, 2.0, 3.0]).unwrap();
    let y = upsample_trilinear_forward_f64(&x, [1, 2, 2]).unwrap();
    assert!((y[[0, 0, 0, 1, 1]] - 0.75).abs() < 1e-12);
    assert!((y[[0, 0, 0, 3, 3]] - 3.0).abs() < 1e-12);
    // Nearest [a, b] x2 -> [a, a, b, b].
    let y = upsample_nearest_forward_f64(&line(&[4.0, -1.0]), [1, 1, 2]).unwrap();
    close(
        y.as_slice().unwrap(),
        &[4.0, 4.0, -1.0, -1.0],
        "nearest line",
    );

    // The GPU gives the same numbers.
    let g = gpu_forward(
        &ctx,
        Mode::Trilinear,
        &line(&[0.0, 1.0]).mapv(|v| v as f32),
        [1, 1, 2],
    );
    assert_eq!(g, vec![0.0, 0.25, 0.75, 1.0]);
    let g = gpu_forward(
        &ctx,
        Mode::Trilinear,
        &line(&[0.0, 1.0]).mapv(|v| v as f32),
        [1, 1, 3],
    );
    assert_close(
        &g,
        &[0.0, 0.0, 1.0 / 3.0, 2.0 / 3.0, 1.0, 1.0],
        1e-6,
        1e-7,
        "GPU x3 line",
    );
    // Backward of the x2 line: input 0 gets 1 + .75 + .25 of a unit dy, input 1 likewise.
    let dy = Array5::from_shape_vec([1, 1, 1, 1, 4], vec![1.0f32, 10.0, 100.0, 1000.0]).unwrap();
    let dx = gpu_backward(&ctx, Mode::Trilinear, &dy, [1, 1, 2]);
    assert_eq!(dx, vec![1.0 + 7.5 + 25.0, 2.5 + 75.0 + 1000.0]);
    let dx = gpu_backward(&ctx, Mode::Nearest, &dy, [1, 1, 2]);
    assert_eq!(dx, vec![11.0, 1100.0]);
}

fn check_case(ctx: &GpuContext, size: [usize; 3], scale: [usize; 3], seed: u64) {
    let [d, h, w] = size;
    let x = random([2, 3, d, h, w], seed);
    let x64 = x.mapv(f64::from);
    let os = [2, 3, d * scale[0], h * scale[1], w * scale[2]];
    let dy = random(os, seed + 1);
    let dy64 = dy.mapv(f64::from);
    for mode in [Mode::Nearest, Mode::Trilinear] {
        let what = format!("{mode:?} {size:?} x {scale:?}");
        let (want_y, want_dx) = match mode {
            Mode::Nearest => (
                upsample_nearest_forward_f64(&x64, scale).unwrap(),
                upsample_nearest_backward_f64(&dy64, scale).unwrap(),
            ),
            Mode::Trilinear => (
                upsample_trilinear_forward_f64(&x64, scale).unwrap(),
                upsample_trilinear_backward_f64(&dy64, scale).unwrap(),
            ),
        };
        assert_close(
            &gpu_forward(ctx, mode, &x, scale),
            &flat(&want_y),
            FWD_RTOL,
            FWD_ATOL,
            &format!("forward {what}"),
        );
        let a = gpu_backward(ctx, mode, &dy, scale);
        assert_close(
            &a,
            &flat(&want_dx),
            GRAD_RTOL,
            GRAD_ATOL,
            &format!("backward {what}"),
        );
        let b = gpu_backward(ctx, mode, &dy, scale);
        assert!(
            a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()),
            "backward is not deterministic {what}"
        );
    }
}

#[test]
fn gpu_matches_cpu_on_odd_shapes() {
    let ctx = gpu();
    check_case(&ctx, [7, 6, 5], [2, 2, 2], 1);
    check_case(&ctx, [5, 3, 4], [3, 1, 2], 2);
    check_case(&ctx, [1, 4, 3], [2, 3, 1], 3);
}

/// The backward references are the adjoints of the forward ones:
/// <up(x), y> = <x, up_backward(y)>.
#[test]
fn cpu_backward_is_the_adjoint_of_forward() {
    let x = random([2, 2, 3, 4, 5], 4).mapv(f64::from);
    let y = random([2, 2, 6, 4, 15], 5).mapv(f64::from);
    let scale = [2, 1, 3];
    for (f, b) in [
        (
            upsample_nearest_forward_f64(&x, scale).unwrap(),
            upsample_nearest_backward_f64(&y, scale).unwrap(),
        ),
        (
            upsample_trilinear_forward_f64(&x, scale).unwrap(),
            upsample_trilinear_backward_f64(&y, scale).unwrap(),
        ),
    ] {
        let lhs = (&f * &y).sum();
        let rhs = (&x * &b).sum();
        assert!((lhs - rhs).abs() < 1e-10, "{lhs} vs {rhs}");
    }
}

/// Finite differences in f64 of L = sum(r * up(a * x + b)) with respect to x, a and b
/// (elementwise like x), so the upstream gradient r is not all ones.
fn finite_difference_check(mode: Mode) {
    let size = [3, 4, 3];
    let scale = [2, 3, 2];
    let shape = [2, 2, size[0], size[1], size[2]];
    let x = random(shape, 21).mapv(f64::from);
    let a = random(shape, 22).mapv(f64::from);
    let b = random(shape, 23).mapv(f64::from);
    let os = [
        2,
        2,
        size[0] * scale[0],
        size[1] * scale[1],
        size[2] * scale[2],
    ];
    let r = random(os, 24).mapv(f64::from);
    let up = |v: &Array5<f64>| match mode {
        Mode::Nearest => upsample_nearest_forward_f64(v, scale).unwrap(),
        Mode::Trilinear => upsample_trilinear_forward_f64(v, scale).unwrap(),
    };
    let loss = |x: &Array5<f64>, a: &Array5<f64>, b: &Array5<f64>| -> f64 {
        let v = a * x + b;
        (&r * &up(&v)).sum()
    };
    let g = match mode {
        Mode::Nearest => upsample_nearest_backward_f64(&r, scale).unwrap(),
        Mode::Trilinear => upsample_trilinear_backward_f64(&r, scale).unwrap(),
    };
    let dx = &a * &g;
    let da = &x * &g;
    common::check_affine_graph_fd(
        &loss,
        &x,
        &a,
        &b,
        [&dx, &da, &g],
        30,
        6,
        &format!("{mode:?}"),
    );
}

#[test]
fn nearest_cpu_gradient_passes_finite_differences() {
    finite_difference_check(Mode::Nearest);
}

#[test]
fn trilinear_cpu_gradient_passes_finite_differences() {
    finite_difference_check(Mode::Trilinear);
}

fn err_text(r: masnet_wgpu::Result<()>) -> String {
    r.expect_err("expected an error").to_string()
}

#[test]
fn bad_input_is_an_error() {
    let ctx = gpu();
    let s = Shape5::new;
    let x = Tensor::zeros(&ctx, s(2, 3, 3, 4, 5), "x").unwrap();
    let y = Tensor::zeros(&ctx, s(2, 3, 6, 8, 10), "y").unwrap();
    let mut rec = ctx.recorder();
    let e = err_text(upsample_trilinear_forward(
        &ctx,
        &mut rec,
        &x,
        &y,
        [2, 0, 2],
    ));
    assert!(e.contains("scale") && e.contains("at least 1"), "{e}");
    let e = err_text(upsample_nearest_forward(&ctx, &mut rec, &x, &y, [2, 2, 1]));
    assert!(
        e.contains("'y'") && e.contains("'x'") && e.contains("[2, 3, 6, 8, 5]"),
        "{e}"
    );
    let y_c = Tensor::zeros(&ctx, s(2, 4, 6, 8, 10), "y_c").unwrap();
    let e = err_text(upsample_trilinear_forward(
        &ctx,
        &mut rec,
        &x,
        &y_c,
        [2, 2, 2],
    ));
    assert!(e.contains("'y_c'"), "{e}");
    let dx_bad = Tensor::zeros(&ctx, s(2, 3, 3, 4, 4), "dx_bad").unwrap();
    let e = err_text(upsample_trilinear_backward(
        &ctx,
        &mut rec,
        &y,
        &dx_bad,
        [2, 2, 2],
    ));
    assert!(e.contains("'dx_bad'") && e.contains("'y'"), "{e}");
    let e = err_text(upsample_nearest_backward(
        &ctx,
        &mut rec,
        &y,
        &dx_bad,
        [2, 2, 2],
    ));
    assert!(e.contains("'dx_bad'"), "{e}");
    let e = err_text(upsample_nearest_forward(&ctx, &mut rec, &x, &x, [1, 1, 1]));
    assert!(e.contains("distinct"), "{e}");
    drop(rec);
    ctx.check("after errors").unwrap();

    // CPU references.
    let e = upsample_trilinear_backward_f64(&Array5::zeros([1, 1, 3, 4, 4]), [2, 2, 2])
        .unwrap_err()
        .to_string();
    assert!(e.contains("multiple of the scale"), "{e}");
    assert!(upsample_nearest_forward_f64(&Array5::zeros([1, 1, 1, 1, 1]), [0, 1, 1]).is_err());
}
