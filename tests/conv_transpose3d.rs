//! conv_transpose3d: GPU forward and backward against the f64 scatter-definition
//! reference, the reference's gradients against finite differences inside a small graph,
//! Keras "same" = PyTorch p=0 with the last voxel dropped, and bad input.

mod common;

use common::{assert_close, gpu, random, variants};
use masnet_wgpu::ops::conv_transpose3d::*;
use masnet_wgpu::rng::Rng;
use masnet_wgpu::{Shape5, Tensor};
use ndarray::{s, Array5};

/// f32 GPU against the f64 reference (sums of up to a few hundred products).
const RTOL: f32 = 1e-4;
const ATOL: f32 = 1e-4;

fn flat(a: &Array5<f64>) -> Vec<f32> {
    a.iter().map(|&v| v as f32).collect()
}

fn arr64(shape: [usize; 5], seed: u64) -> Array5<f64> {
    random(shape, seed).mapv(f64::from)
}

fn check(kernel: [usize; 3], spec: ConvTranspose3dSpec, size: [usize; 3], seed: u64) {
    let ctx = gpu();
    let (n, cin, cout) = (2, 3, 5);
    let x = random([n, cin, size[0], size[1], size[2]], seed);
    let w = random([cin, cout, kernel[0], kernel[1], kernel[2]], seed + 1);
    let b: Vec<f32> = Rng::new(seed + 2).vec_f32(cout, -1.0, 1.0);
    let b64: Vec<f64> = b.iter().map(|&v| v as f64).collect();
    let y = conv_transpose3d_forward_f64(&x.mapv(f64::from), &w.mapv(f64::from), Some(&b64), &spec)
        .unwrap();
    let ys = y.shape().to_vec();
    let dy = random([n, cout, ys[2], ys[3], ys[4]], seed + 3);
    let want_dx =
        conv_transpose3d_backward_input_f64(&dy.mapv(f64::from), &w.mapv(f64::from), &spec)
            .unwrap();
    let want_dw = conv_transpose3d_backward_weight_f64(
        &x.mapv(f64::from),
        &dy.mapv(f64::from),
        kernel,
        &spec,
    );
    let want_db: Vec<f32> = (0..cout)
        .map(|c| {
            dy.slice(s![.., c, .., .., ..])
                .iter()
                .map(|&v| v as f64)
                .sum::<f64>() as f32
        })
        .collect();

    let xt = Tensor::from_array(&ctx, &x, "x").unwrap();
    let wt = Tensor::from_array(&ctx, &w, "w").unwrap();
    let bt = Tensor::from_slice(&ctx, Shape5::new(1, cout, 1, 1, 1), &b, "b").unwrap();
    let dyt = Tensor::from_array(&ctx, &dy, "dy").unwrap();
    for v in variants(&ctx) {
        let yt = Tensor::empty(&ctx, Shape5::new(n, cout, ys[2], ys[3], ys[4]), "y").unwrap();
        let dx = Tensor::empty(&ctx, xt.shape(), "dx").unwrap();
        let dw = Tensor::empty(&ctx, wt.shape(), "dw").unwrap();
        let db = Tensor::empty(&ctx, bt.shape(), "db").unwrap();
        let mut rec = ctx.recorder();
        conv_transpose3d_forward(&ctx, &mut rec, xt.all(), &wt, Some(&bt), yt.all(), &spec, v)
            .unwrap();
        conv_transpose3d_backward_input(&ctx, &mut rec, dyt.all(), &wt, dx.all(), &spec, v)
            .unwrap();
        conv_transpose3d_backward_weight(&ctx, &mut rec, xt.all(), dyt.all(), &dw, &spec, v)
            .unwrap();
        conv_transpose3d_backward_bias(&ctx, &mut rec, dyt.all(), &db).unwrap();
        ctx.submit(rec);
        let what = format!("{kernel:?} {spec:?} {v:?}");
        assert_close(
            &yt.to_vec(&ctx).unwrap(),
            &flat(&y),
            RTOL,
            ATOL,
            &format!("forward {what}"),
        );
        assert_close(
            &dx.to_vec(&ctx).unwrap(),
            &flat(&want_dx),
            RTOL,
            ATOL,
            &format!("dx {what}"),
        );
        assert_close(
            &dw.to_vec(&ctx).unwrap(),
            &flat(&want_dw),
            RTOL,
            ATOL,
            &format!("dw {what}"),
        );
        assert_close(
            &db.to_vec(&ctx).unwrap(),
            &want_db,
            RTOL,
            ATOL,
            &format!("db {what}"),
        );
    }
}

#[test]
fn keras_same_k2_s2() {
    let spec = ConvTranspose3dSpec::keras_same([2; 3], [2; 3]);
    assert_eq!(spec.output_spatial([5, 4, 3], [2; 3]).unwrap(), [10, 8, 6]);
    check([2; 3], spec, [5, 4, 3], 10);
}

#[test]
fn keras_same_k3_s2() {
    let spec = ConvTranspose3dSpec::keras_same([3; 3], [2; 3]);
    assert_eq!(spec.output_spatial([3, 5, 4], [3; 3]).unwrap(), [6, 10, 8]);
    check([3; 3], spec, [3, 5, 4], 20);
}

#[test]
fn torch_general_geometries() {
    // k=3 s=2 p=1 output_padding=1 (another common "doubling" choice).
    let spec = ConvTranspose3dSpec::torch([2; 3], [1; 3], [1; 3]);
    assert_eq!(spec.output_spatial([4, 3, 5], [3; 3]).unwrap(), [8, 6, 10]);
    check([3; 3], spec, [4, 3, 5], 30);
    // Anisotropic kernel and stride, stride 1 on one axis.
    let spec = ConvTranspose3dSpec::torch([2, 1, 3], [0, 1, 1], [1, 0, 0]);
    check([3, 3, 4], spec, [3, 4, 3], 40);
}

#[test]
fn keras_k3_equals_torch_p0_with_last_voxel_dropped() {
    let x = arr64([2, 2, 3, 4, 3], 50);
    let w = arr64([2, 3, 3, 3, 3], 51);
    let keras = conv_transpose3d_forward_f64(
        &x,
        &w,
        None,
        &ConvTranspose3dSpec::keras_same([3; 3], [2; 3]),
    )
    .unwrap();
    let torch = conv_transpose3d_forward_f64(
        &x,
        &w,
        None,
        &ConvTranspose3dSpec::torch([2; 3], [0; 3], [0; 3]),
    )
    .unwrap();
    assert_eq!(torch.shape(), &[2, 3, 7, 9, 7]);
    let cropped = torch.slice(s![.., .., ..6, ..8, ..6]).to_owned();
    assert_eq!(keras.shape(), cropped.shape());
    let diff = (&keras - &cropped)
        .mapv(f64::abs)
        .fold(0.0f64, |a, &b| a.max(b));
    assert!(diff < 1e-12, "max difference {diff}");
}

#[test]
fn reference_gradients_match_finite_differences() {
    // L = sum r * convT(a * x + c, W): upstream gradient r, input scaled and shifted.
    let spec = ConvTranspose3dSpec::keras_same([3; 3], [2; 3]);
    let x = arr64([2, 2, 2, 3, 2], 60);
    let a = arr64([2, 2, 2, 3, 2], 61);
    let c = arr64([2, 2, 2, 3, 2], 62);
    let w = arr64([2, 3, 3, 3, 3], 63);
    let loss = |x: &Array5<f64>, w: &Array5<f64>| -> (f64, Array5<f64>) {
        let y = conv_transpose3d_forward_f64(&(&a * x + &c), w, None, &spec).unwrap();
        let r = arr64([2, 3, 4, 6, 4], 64);
        ((&r * &y).sum(), r)
    };
    let (_, r) = loss(&x, &w);
    let dx = conv_transpose3d_backward_input_f64(&r, &w, &spec).unwrap() * &a;
    let dw = conv_transpose3d_backward_weight_f64(&(&a * &x + &c), &r, [3; 3], &spec);
    let h = 1e-6;
    for (i, idx) in [[0, 0, 0, 0, 0], [1, 1, 1, 2, 1], [0, 1, 1, 0, 1]]
        .iter()
        .enumerate()
    {
        let (mut xp, mut xm) = (x.clone(), x.clone());
        xp[*idx] += h;
        xm[*idx] -= h;
        let fd = (loss(&xp, &w).0 - loss(&xm, &w).0) / (2.0 * h);
        assert!(
            (fd - dx[*idx]).abs() < 1e-6 * (1.0 + fd.abs()),
            "dx {i}: fd {fd} vs {}",
            dx[*idx]
        );
    }
    for idx in [[0, 0, 0, 0, 0], [1, 2, 2, 1, 0], [0, 1, 1, 1, 2]] {
        let (mut wp, mut wm) = (w.clone(), w.clone());
        wp[idx] += h;
        wm[idx] -= h;
        let fd = (loss(&x, &wp).0 - loss(&x, &wm).0) / (2.0 * h);
        assert!(
            (fd - dw[idx]).abs() < 1e-6 * (1.0 + fd.abs()),
            "dw {idx:?}: fd {fd} vs {}",
            dw[idx]
        );
    }
}

#[test]
fn bad_input_is_an_error() {
    let ctx = gpu();
    let spec = ConvTranspose3dSpec::keras_same([2; 3], [2; 3]);
    let x = Tensor::zeros(&ctx, Shape5::new(1, 3, 4, 4, 4), "x").unwrap();
    let w = Tensor::zeros(&ctx, Shape5::new(4, 2, 2, 2, 2), "w").unwrap();
    let y = Tensor::zeros(&ctx, Shape5::new(1, 2, 8, 8, 8), "y").unwrap();
    let mut rec = ctx.recorder();
    let v = masnet_wgpu::ops::Conv3dVariant::Auto;
    let e = conv_transpose3d_forward(&ctx, &mut rec, x.all(), &w, None, y.all(), &spec, v)
        .unwrap_err()
        .to_string();
    assert!(e.contains("expects 4 input channels"), "{e}");
    let w = Tensor::zeros(&ctx, Shape5::new(3, 2, 2, 2, 2), "w").unwrap();
    let y_bad = Tensor::zeros(&ctx, Shape5::new(1, 2, 8, 8, 7), "y_bad").unwrap();
    let e = conv_transpose3d_forward(&ctx, &mut rec, x.all(), &w, None, y_bad.all(), &spec, v)
        .unwrap_err()
        .to_string();
    assert!(e.contains("y_bad"), "{e}");
    let bad = ConvTranspose3dSpec::torch([2; 3], [0; 3], [2; 3]);
    assert!(bad.output_spatial([4; 3], [2; 3]).is_err());
    let bad = ConvTranspose3dSpec::torch([0, 2, 2], [0; 3], [0; 3]);
    assert!(bad.output_spatial([4; 3], [2; 3]).is_err());
}
