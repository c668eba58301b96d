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

/// One axis of a transposed conv: (input, kernel, stride, pad_lo, pad_hi, output_padding).
type Axis = (usize, usize, usize, usize, usize, usize);

/// Every small axis geometry `ConvTranspose3dSpec` accepts (checked on that axis alone):
/// kernels 1..4, strides 1..3 (kernel below, equal to and above the stride), cropping
/// 0..3 at either end (including more than a kernel's reach), every output padding.
fn axis_geometries() -> Vec<Axis> {
    let mut v = Vec::new();
    for n in 1..=3 {
        for k in 1..=4 {
            for s in 1..=3 {
                for pl in 0..=3 {
                    for ph in 0..=3 {
                        for op in 0..s {
                            let spec = ConvTranspose3dSpec {
                                stride: [s, 1, 1],
                                pad_lo: [pl, 0, 0],
                                pad_hi: [ph, 0, 0],
                                output_padding: [op, 0, 0],
                                relu: false,
                            };
                            let ok = conv_transpose3d_check(
                                Shape5::new(1, 1, n, 1, 1),
                                1,
                                Shape5::new(1, 1, k, 1, 1),
                                None,
                                &spec,
                            )
                            .is_ok();
                            if ok {
                                v.push((n, k, s, pl, ph, op));
                            }
                        }
                    }
                }
            }
        }
    }
    v
}

/// The 3-D geometry with axis configurations `d`, `h`, `w`: (input, kernel, spec).
fn geometry(d: Axis, h: Axis, w: Axis) -> ([usize; 3], [usize; 3], ConvTranspose3dSpec) {
    let ax = [d, h, w];
    (
        ax.map(|a| a.0),
        ax.map(|a| a.1),
        ConvTranspose3dSpec {
            stride: ax.map(|a| a.2),
            pad_lo: ax.map(|a| a.3),
            pad_hi: ax.map(|a| a.4),
            output_padding: ax.map(|a| a.5),
            relu: false,
        },
    )
}

fn max_diff(a: &Array5<f64>, b: &Array5<f64>) -> f64 {
    assert_eq!(a.shape(), b.shape());
    (a - b).mapv(f64::abs).fold(0.0f64, |m, &v| m.max(v))
}

#[test]
fn phase_decomposition_equals_scatter_definition_for_every_geometry() {
    // CPU only: phase weights + stride-1 convs + interleave against the scatter loop.
    let axes = axis_geometries();
    assert!(axes.len() > 300, "{} geometries", axes.len());
    let len = axes.len();
    for i in 0..len {
        let (input, kernel, spec) =
            geometry(axes[i], axes[(i * 7 + 3) % len], axes[(i * 13 + 5) % len]);
        let x = arr64([2, 2, input[0], input[1], input[2]], 100 + i as u64);
        let w = arr64([2, 3, kernel[0], kernel[1], kernel[2]], 200 + i as u64);
        let b = [0.5, -0.25, 0.125];
        let want = conv_transpose3d_forward_f64(&x, &w, Some(&b), &spec).unwrap();
        let got = conv_transpose3d_forward_phased_f64(&x, &w, Some(&b), &spec).unwrap();
        let d = max_diff(&got, &want);
        assert!(
            d < 1e-12,
            "{input:?} {kernel:?} {spec:?}: max difference {d}"
        );
    }
}

#[test]
fn phase_plan_of_the_paper_geometries() {
    // k=2 s=2: one 1x1x1 convolution Cin -> 8 Cout.
    let p = PhasePlan::new(
        [5, 4, 3],
        [2; 3],
        &ConvTranspose3dSpec::keras_same([2; 3], [2; 3]),
    )
    .unwrap();
    assert_eq!(p.blocks, 8);
    assert_eq!(p.groups.len(), 1);
    assert_eq!(p.groups[0].taps, [1; 3]);
    assert_eq!(p.extent, [5, 4, 3]);
    // k=3 s=2: eight convolutions with 2 or 1 taps per axis, one class each.
    let p = PhasePlan::new(
        [5, 4, 3],
        [3; 3],
        &ConvTranspose3dSpec::keras_same([3; 3], [2; 3]),
    )
    .unwrap();
    assert_eq!(p.blocks, 8);
    assert_eq!(p.groups.len(), 8);
    assert_eq!(p.groups[0].taps, [2; 3]);
    assert_eq!(p.groups[7].taps, [1; 3]);
    assert_eq!(p.extent, [5, 4, 3]);
    // Kernel below the stride: classes past the kernel have no taps (bias only).
    let p = PhasePlan::new(
        [3; 3],
        [1, 2, 3],
        &ConvTranspose3dSpec::keras_same([1, 2, 3], [3; 3]),
    )
    .unwrap();
    assert_eq!(p.blocks, 2 * 3);
    assert_eq!(p.output, [9; 3]);
}

/// GPU forward (phase path) against the f64 reference: N=2, Cin=3, Cout=5, written into
/// channels 2..7 of a 9-channel output filled with a sentinel that must survive.
fn check_forward(input: [usize; 3], kernel: [usize; 3], spec: ConvTranspose3dSpec, seed: u64) {
    check_forward_channels(input, kernel, spec, seed, false, 5);
}

/// [`check_forward`] with the fused ReLU when `relu`.
fn check_forward_relu(
    input: [usize; 3],
    kernel: [usize; 3],
    spec: ConvTranspose3dSpec,
    seed: u64,
    relu: bool,
) {
    check_forward_channels(input, kernel, spec, seed, relu, 5);
}

/// [`check_forward_relu`] with `cout` output channels (written into channels 2.. of
/// `cout + 4`).
fn check_forward_channels(
    input: [usize; 3],
    kernel: [usize; 3],
    spec: ConvTranspose3dSpec,
    seed: u64,
    relu: bool,
    cout: usize,
) {
    let ctx = gpu();
    let (n, cin, off, ctot) = (2, 3, 2, cout + 4);
    let x = random([n, cin + 1, input[0], input[1], input[2]], seed);
    let w = random([cin, cout, kernel[0], kernel[1], kernel[2]], seed + 1);
    let b: Vec<f32> = Rng::new(seed + 2).vec_f32(cout, -1.0, 1.0);
    let b64: Vec<f64> = b.iter().map(|&v| v as f64).collect();
    // The input range is channels 1..4 of x.
    let x_in = x.slice(s![.., 1.., .., .., ..]).mapv(f64::from);
    let want = conv_transpose3d_forward_f64(&x_in, &w.mapv(f64::from), Some(&b64), &spec).unwrap();
    let want = if relu {
        want.mapv(|v| v.max(0.0))
    } else {
        want
    };
    let ws = want.shape().to_vec();
    let oshape = Shape5::new(n, ctot, ws[2], ws[3], ws[4]);
    const SENTINEL: f32 = 7.5;
    let xt = Tensor::from_array(&ctx, &x, "x").unwrap();
    let wt = Tensor::from_array(&ctx, &w, "w").unwrap();
    let bt = Tensor::from_slice(&ctx, Shape5::new(1, cout, 1, 1, 1), &b, "b").unwrap();
    for v in variants(&ctx) {
        let yt = Tensor::from_slice(&ctx, oshape, &vec![SENTINEL; oshape.numel().unwrap()], "y")
            .unwrap();
        let mut rec = ctx.recorder();
        conv_transpose3d_forward(
            &ctx,
            &mut rec,
            xt.channels(1, cin).unwrap(),
            &wt,
            Some(&bt),
            yt.channels(off, cout).unwrap(),
            &spec.with_relu(relu),
            v,
        )
        .unwrap();
        ctx.submit(rec);
        let got = yt.to_array(&ctx).unwrap();
        let what = format!("{input:?} {kernel:?} {spec:?} {v:?}");
        let inside: Vec<f32> = got
            .slice(s![.., off..off + cout, .., .., ..])
            .iter()
            .copied()
            .collect();
        assert_close(
            &inside,
            &flat(&want),
            RTOL,
            ATOL,
            &format!("forward {what}"),
        );
        for (c, plane) in got.axis_iter(ndarray::Axis(1)).enumerate() {
            if !(off..off + cout).contains(&c) {
                assert!(
                    plane.iter().all(|&v| v == SENTINEL),
                    "{what}: channel {c} outside the range was written"
                );
            }
        }
    }
}

#[test]
fn forward_into_channel_range_for_unusual_geometries() {
    let axes = axis_geometries();
    let find = |n, k, s, pl, ph, op| {
        let a = (n, k, s, pl, ph, op);
        assert!(axes.contains(&a), "{a:?} is not a valid axis");
        a
    };
    let cases = [
        // Kernel below the stride (bias-only classes), stride 3, stride 1.
        (
            find(3, 1, 2, 0, 0, 1),
            find(2, 2, 3, 0, 0, 1),
            find(3, 3, 1, 1, 1, 0),
        ),
        // Cropping more than a kernel's reach at the start (torch k=2 s=2 p=1).
        (
            find(3, 2, 2, 1, 1, 0),
            find(3, 2, 2, 2, 0, 1),
            find(2, 4, 3, 3, 0, 2),
        ),
        // Cropping at the end beyond the kernel; k=4 s=2 p=1 (common doubling).
        (
            find(3, 2, 2, 0, 2, 1),
            find(3, 4, 2, 1, 1, 0),
            find(2, 3, 2, 0, 3, 1),
        ),
    ];
    for (i, (d, h, w)) in cases.into_iter().enumerate() {
        let (input, kernel, spec) = geometry(d, h, w);
        check_forward(input, kernel, spec, 300 + 10 * i as u64);
    }
    check_forward(
        [3, 4, 5],
        [3; 3],
        ConvTranspose3dSpec::keras_same([3; 3], [2; 3]),
        400,
    );
    check_forward(
        [3, 4, 5],
        [2; 3],
        ConvTranspose3dSpec::keras_same([2; 3], [2; 3]),
        410,
    );
}

/// A random plan-shaped phase tensor through the GPU interleave kernel against the
/// scatter reference: odd extents, N=2, an output channel range with sentinels around.
fn check_interleave(input: [usize; 3], kernel: [usize; 3], spec: ConvTranspose3dSpec, bias: bool) {
    let ctx = gpu();
    let plan = PhasePlan::new(input, kernel, &spec).unwrap();
    let (n, cout, off, ctot) = (2, 3, 1, 6);
    let [td, th, tw] = plan.extent;
    let ph = random([n, plan.blocks * cout, td, th, tw], 500);
    let b: Vec<f32> = Rng::new(501).vec_f32(cout, -1.0, 1.0);
    let b64: Vec<f64> = b.iter().map(|&v| v as f64).collect();
    let want =
        conv_transpose3d_interleave_f64(&ph.mapv(f64::from), &plan, bias.then_some(b64.as_slice()));
    let [od, oh, ow] = plan.output;
    let oshape = Shape5::new(n, ctot, od, oh, ow);
    const SENTINEL: f32 = -3.25;
    let out = Tensor::from_slice(
        &ctx,
        oshape,
        &vec![SENTINEL; oshape.numel().unwrap()],
        "out",
    )
    .unwrap();
    let pt = Tensor::from_array(&ctx, &ph, "phases").unwrap();
    let bt = Tensor::from_slice(&ctx, Shape5::new(1, cout, 1, 1, 1), &b, "b").unwrap();
    let mut rec = ctx.recorder();
    conv_transpose3d_interleave(
        &ctx,
        &mut rec,
        &pt,
        &plan,
        bias.then_some(&bt),
        out.channels(off, cout).unwrap(),
    )
    .unwrap();
    ctx.submit(rec);
    let got = out.to_array(&ctx).unwrap();
    let what = format!("interleave {input:?} {kernel:?} {spec:?} bias {bias}");
    let inside: Vec<f32> = got
        .slice(s![.., off..off + cout, .., .., ..])
        .iter()
        .copied()
        .collect();
    // A copy plus one addition: exact up to the f32 rounding of the sum.
    assert_close(&inside, &flat(&want), 1e-6, 1e-6, &what);
    for (c, plane) in got.axis_iter(ndarray::Axis(1)).enumerate() {
        if !(off..off + cout).contains(&c) {
            assert!(
                plane.iter().all(|&v| v == SENTINEL),
                "{what}: channel {c} written"
            );
        }
    }
}

#[test]
fn interleave_kernel_matches_reference() {
    // keras k3 s2 (8 groups), odd extents; output rows of 8 (the vec4-store kernel).
    check_interleave(
        [3, 5, 4],
        [3; 3],
        ConvTranspose3dSpec::keras_same([3; 3], [2; 3]),
        true,
    );
    // Output padding and crop at both ends, stride 3 and 1, no bias; output [9, 8, 2]
    // (rows of 2: the scalar-store kernel).
    check_interleave(
        [3, 4, 2],
        [4, 2, 3],
        ConvTranspose3dSpec {
            stride: [3, 2, 1],
            pad_lo: [2, 1, 1],
            pad_hi: [1, 0, 1],
            output_padding: [2, 1, 0],
            relu: false,
        },
        false,
    );
    // Kernel below the stride: bias-only positions; rows of 12.
    check_interleave(
        [2, 3, 3],
        [1, 2, 3],
        ConvTranspose3dSpec::keras_same([1, 2, 3], [2, 3, 4]),
        true,
    );
}

#[test]
fn phase_weight_kernel_matches_reference() {
    let ctx = gpu();
    for (kernel, spec) in [
        ([3; 3], ConvTranspose3dSpec::keras_same([3; 3], [2; 3])),
        (
            [4, 2, 3],
            ConvTranspose3dSpec::torch([3, 2, 1], [1, 0, 1], [0, 1, 0]),
        ),
    ] {
        let plan = PhasePlan::new([4; 3], kernel, &spec).unwrap();
        let w = random([3, 5, kernel[0], kernel[1], kernel[2]], 600);
        let wt = Tensor::from_array(&ctx, &w, "w").unwrap();
        for g in &plan.groups {
            let want = conv_transpose3d_phase_weight_f64(&w.mapv(f64::from), &plan, g);
            let mut rec = ctx.recorder();
            let got = conv_transpose3d_phase_weight(&ctx, &mut rec, &wt, &plan, g).unwrap();
            ctx.submit(rec);
            assert_eq!(got.shape().0.to_vec(), want.shape().to_vec());
            // A permutation: exact.
            assert_close(
                &got.to_vec(&ctx).unwrap(),
                &flat(&want),
                0.0,
                0.0,
                &format!("phase weight {kernel:?} {g:?}"),
            );
        }
    }
}

#[test]
fn packed_phase_weights_match_reference() {
    let ctx = gpu();
    for (kernel, spec, cin, cout) in [
        // DU-Net's transition up: eight groups of one class.
        (
            [3; 3],
            ConvTranspose3dSpec::keras_same([3; 3], [2; 3]),
            6,
            5,
        ),
        // One group of eight classes.
        (
            [2; 3],
            ConvTranspose3dSpec::keras_same([2; 3], [2; 3]),
            3,
            7,
        ),
        (
            [4, 2, 3],
            ConvTranspose3dSpec::torch([3, 2, 1], [1, 0, 1], [0, 1, 0]),
            5,
            3,
        ),
    ] {
        let plan = PhasePlan::new([4; 3], kernel, &spec).unwrap();
        let w = random([cin, cout, kernel[0], kernel[1], kernel[2]], 610);
        let wt = Tensor::from_array(&ctx, &w, "w").unwrap();
        // Tile widths that divide a group's channels and ones that leave a partial tile.
        let tcs: Vec<usize> = (0..plan.groups.len())
            .map(|g| [4, 5, 16, 1][g % 4])
            .collect();
        let want = conv_transpose3d_pack_phase_weights_f64(&w.mapv(f64::from), &plan, &tcs);
        let mut rec = ctx.recorder();
        let (got, offs) =
            conv_transpose3d_pack_phase_weights(&ctx, &mut rec, &wt, &plan, &tcs).unwrap();
        ctx.submit(rec);
        assert_eq!(offs, packed_phase_offsets(&plan, cin, cout, &tcs));
        assert_eq!(offs.last().copied(), Some(want.len() / 4));
        let want: Vec<f32> = want.iter().map(|&v| v as f32).collect();
        // A permutation with zero fill: exact.
        assert_close(
            &got.to_vec(&ctx).unwrap(),
            &want,
            0.0,
            0.0,
            &format!("packed phase weights {kernel:?}"),
        );
    }
    // Tile widths that do not match the groups are refused.
    let spec = ConvTranspose3dSpec::keras_same([3; 3], [2; 3]);
    let plan = PhasePlan::new([4; 3], [3; 3], &spec).unwrap();
    let wt = Tensor::zeros(&ctx, Shape5::new(2, 2, 3, 3, 3), "w").unwrap();
    let mut rec = ctx.recorder();
    for tcs in [vec![4; 7], vec![0; 8]] {
        let e = conv_transpose3d_pack_phase_weights(&ctx, &mut rec, &wt, &plan, &tcs)
            .unwrap_err()
            .to_string();
        assert!(e.contains("tile widths"), "{e}");
    }
    let w2 = Tensor::zeros(&ctx, Shape5::new(2, 2, 2, 2, 2), "w2").unwrap();
    let e = conv_transpose3d_pack_phase_weights(&ctx, &mut rec, &w2, &plan, &[4; 8])
        .unwrap_err()
        .to_string();
    assert!(e.contains("'w2'"), "{e}");
}

#[test]
fn interleave_and_phase_weight_reject_bad_input() {
    let ctx = gpu();
    let spec = ConvTranspose3dSpec::keras_same([3; 3], [2; 3]);
    let plan = PhasePlan::new([2, 3, 4], [3; 3], &spec).unwrap();
    let cout = 2;
    let good = Tensor::zeros(&ctx, Shape5::new(1, 8 * cout, 2, 3, 4), "phases").unwrap();
    let out = Tensor::zeros(&ctx, Shape5::new(1, 3, 4, 6, 8), "out").unwrap();
    let mut rec = ctx.recorder();
    let err = |r: masnet_wgpu::Result<()>| r.unwrap_err().to_string();
    // Phase tensor with the wrong block count, extents or batch.
    for (shape, name) in [
        (Shape5::new(1, 7 * cout, 2, 3, 4), "few_blocks"),
        (Shape5::new(1, 8 * cout, 2, 3, 5), "wrong_extent"),
        (Shape5::new(2, 8 * cout, 2, 3, 4), "wrong_batch"),
    ] {
        let bad = Tensor::zeros(&ctx, shape, name).unwrap();
        let e = err(conv_transpose3d_interleave(
            &ctx,
            &mut rec,
            &bad,
            &plan,
            None,
            out.channels(1, cout).unwrap(),
        ));
        assert!(e.contains(name) && e.contains("blocks"), "{e}");
    }
    // Output of the wrong spatial size.
    let small = Tensor::zeros(&ctx, Shape5::new(1, 2, 4, 6, 7), "small_out").unwrap();
    let e = err(conv_transpose3d_interleave(
        &ctx,
        &mut rec,
        &good,
        &plan,
        None,
        small.all(),
    ));
    assert!(e.contains("small_out") && e.contains("[4, 6, 8]"), "{e}");
    // Bias of the wrong length.
    let b3 = Tensor::zeros(&ctx, Shape5::new(1, 3, 1, 1, 1), "b3").unwrap();
    let e = err(conv_transpose3d_interleave(
        &ctx,
        &mut rec,
        &good,
        &plan,
        Some(&b3),
        out.channels(0, cout).unwrap(),
    ));
    assert!(e.contains("b3") && e.contains("2 values"), "{e}");
    // Phases and output the same tensor.
    let same = Tensor::zeros(&ctx, Shape5::new(1, 8 * cout, 4, 6, 8), "same").unwrap();
    let other = PhasePlan::new(
        [4, 6, 8],
        [1; 3],
        &ConvTranspose3dSpec::torch([1; 3], [0; 3], [0; 3]),
    )
    .unwrap();
    assert_eq!(other.blocks, 1);
    let e = err(conv_transpose3d_interleave(
        &ctx,
        &mut rec,
        &same,
        &other,
        None,
        same.all(),
    ));
    assert!(e.contains("same tensor"), "{e}");
    // Phase weight: a weight of another kernel, a group of another plan.
    let w2 = Tensor::zeros(&ctx, Shape5::new(2, cout, 2, 2, 2), "w_k2").unwrap();
    let e = conv_transpose3d_phase_weight(&ctx, &mut rec, &w2, &plan, &plan.groups[0])
        .unwrap_err()
        .to_string();
    assert!(e.contains("w_k2") && e.contains("[3, 3, 3]"), "{e}");
    let w3 = Tensor::zeros(&ctx, Shape5::new(2, cout, 3, 3, 3), "w").unwrap();
    let mut foreign = plan.groups[0];
    foreign.block = 5;
    let e = conv_transpose3d_phase_weight(&ctx, &mut rec, &w3, &plan, &foreign)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a group of the plan"), "{e}");
    // A plan for an invalid geometry is an error, not a panic.
    assert!(PhasePlan::new(
        [4; 3],
        [2; 3],
        &ConvTranspose3dSpec::torch([2; 3], [0; 3], [2; 3])
    )
    .is_err());
}

/// The fused ReLU in both forward paths: direct phase stores (k >= s, register-tiled
/// kernels) and the interleave pass (GEMM variant, and k < s).
#[test]
fn fused_relu_in_every_forward_path() {
    check_forward_relu(
        [3, 4, 5],
        [3; 3],
        ConvTranspose3dSpec::keras_same([3; 3], [2; 3]),
        500,
        true,
    );
    check_forward_relu(
        [3, 2, 4],
        [1, 2, 2],
        ConvTranspose3dSpec::torch([2; 3], [0; 3], [1, 0, 0]),
        510,
        true,
    );
}

/// Phase convolutions with wide channel tiles (13-16 channels; k=3 s=2 runs them 8
/// voxels long along W, k=2 s=2 4 long), ragged along W.
#[test]
fn wide_channel_tiles() {
    for (cout, seed) in [(30, 520), (16, 530), (13, 540)] {
        check_forward_channels(
            [2, 3, 5],
            [3; 3],
            ConvTranspose3dSpec::keras_same([3; 3], [2; 3]),
            seed,
            cout == 30,
            cout,
        );
    }
    check_forward_channels(
        [2, 3, 5],
        [2; 3],
        ConvTranspose3dSpec::keras_same([2; 3], [2; 3]),
        550,
        false,
        16,
    );
}

/// A fused ReLU has no backward: gradient graphs refuse it, no-grad graphs run it.
#[test]
fn fused_relu_is_refused_in_gradient_graphs() {
    use masnet_wgpu::autograd::{Graph, Mode};
    let ctx = gpu();
    let spec = ConvTranspose3dSpec::keras_same([3; 3], [2; 3]).with_relu(true);
    let x = random([1, 2, 2, 2, 2], 600);
    let w = random([2, 3, 3, 3, 3], 601);
    let run = |grad: bool| {
        let mut g = if grad {
            Graph::new(&ctx, Mode::Eval)
        } else {
            Graph::no_grad(&ctx, Mode::Eval)
        };
        let xv = g.variable(Tensor::from_array(&ctx, &x, "x").unwrap());
        let wv = g.input(Tensor::from_array(&ctx, &w, "w").unwrap());
        g.conv_transpose3d(xv, wv, None, spec).map(|_| ())
    };
    let e = run(true).unwrap_err().to_string();
    assert!(e.contains("fused ReLU"), "{e}");
    assert!(run(false).is_ok());
}

/// The k = s = 2 pairs form's weight packing against its CPU reference: tiles that
/// divide 8 Cout and one that leaves a partial tile, Cin not a multiple of 4; odd tiles
/// and other kernels refused.
#[test]
fn packed_pair_weights_match_reference() {
    let ctx = gpu();
    for (cin, cout, tc) in [(5, 4, 8), (3, 8, 16), (6, 16, 32), (4, 3, 10)] {
        let w = random([cin, cout, 2, 2, 2], 620 + tc as u64);
        let wt = Tensor::from_array(&ctx, &w, "w").unwrap();
        let want: Vec<f32> = conv_transpose3d_pack_pair_weights_f64(&w.mapv(f64::from), tc)
            .iter()
            .map(|&v| v as f32)
            .collect();
        let mut rec = ctx.recorder();
        let got = conv_transpose3d_pack_pair_weights(&ctx, &mut rec, &wt, tc).unwrap();
        ctx.submit(rec);
        // A permutation with zero fill: exact.
        assert_close(
            &got.to_vec(&ctx).unwrap(),
            &want,
            0.0,
            0.0,
            &format!("pair weights cin {cin} cout {cout} tc {tc}"),
        );
    }
    let mut rec = ctx.recorder();
    let w3 = Tensor::zeros(&ctx, Shape5::new(2, 2, 3, 3, 3), "w3").unwrap();
    let e = conv_transpose3d_pack_pair_weights(&ctx, &mut rec, &w3, 8)
        .unwrap_err()
        .to_string();
    assert!(e.contains("'w3'") && e.contains("2x2x2"), "{e}");
    let w2 = Tensor::zeros(&ctx, Shape5::new(2, 2, 2, 2, 2), "w2").unwrap();
    let e = conv_transpose3d_pack_pair_weights(&ctx, &mut rec, &w2, 7)
        .unwrap_err()
        .to_string();
    assert!(e.contains("tile 7"), "{e}");
}

/// k = s = 2 with input W a multiple of 4 runs the pairs form (one product over 8 Cout
/// channels, both W classes per store): Cout choosing 32-, 16- and 8-channel tiles, a
/// ragged voxel count, ReLU, channel ranges in and out; Cout 6 (not a multiple of 4)
/// takes the phase form. Every family.
#[test]
fn k2_s2_pairs_form() {
    let spec = ConvTranspose3dSpec::keras_same([2; 3], [2; 3]);
    for (input, cout, relu, seed) in [
        ([2, 3, 4], 16, false, 700),
        ([3, 2, 8], 8, true, 710),
        ([1, 5, 12], 4, false, 720),
        ([4, 4, 4], 32, true, 730),
        ([2, 2, 4], 6, false, 740),
    ] {
        check_forward_channels(input, [2; 3], spec, seed, relu, cout);
    }
    // Front cropping with output padding also gives twice the input, but shifted by a
    // voxel: the phase form runs it (the input gradient of a k=2 s=2 conv padded in
    // front is this transposed conv).
    let cropped = ConvTranspose3dSpec {
        stride: [2; 3],
        pad_lo: [1; 3],
        pad_hi: [0; 3],
        output_padding: [1; 3],
        relu: false,
    };
    check_forward_channels([2, 3, 4], [2; 3], cropped, 750, false, 8);
}
