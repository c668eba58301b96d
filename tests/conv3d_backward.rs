//! conv3d backward (input, weight, bias gradients): GPU against the CPU reference on
//! random data, the CPU reference against finite differences in f64 with the conv in
//! the middle of a small graph, and bad input returning errors.

mod common;

use common::{assert_close, gpu, random, variants};
use masnet_wgpu::ops::conv3d::ConvKernel;
use masnet_wgpu::ops::conv3d::{conv3d_forward_f64, Conv3dSpec, Conv3dVariant};
use masnet_wgpu::ops::conv3d_backward::conv3d_backward_input_kernel;
use masnet_wgpu::ops::conv3d_backward::{
    conv3d_backward_bias, conv3d_backward_bias_f64, conv3d_backward_input,
    conv3d_backward_input_f64, conv3d_backward_weight, conv3d_backward_weight_f64,
};
use masnet_wgpu::ops::conv3d_gemm::GemmTile;
use masnet_wgpu::rng::Rng;
use masnet_wgpu::{GpuContext, Shape5, Tensor};
use ndarray::Array5;

/// GPU f32 against the f64 reference; gradients sum many products, hence the atol.
const RTOL: f32 = 1e-4;
const ATOL: f32 = 1e-4;

struct Case {
    n: usize,
    cin_total: usize,
    in_off: usize,
    cin: usize,
    cout: usize,
    size: [usize; 3],
    kernel: [usize; 3],
    spec: Conv3dSpec,
}

fn flat(a: &Array5<f64>) -> Vec<f32> {
    a.iter().map(|&v| v as f32).collect()
}

fn check_case(ctx: &GpuContext, c: &Case, seed: u64) {
    let [d, h, w] = c.size;
    let [kd, kh, kw] = c.kernel;
    let x = random([c.n, c.cin_total, d, h, w], seed);
    let wt = random([c.cout, c.cin, kd, kh, kw], seed + 1);
    let y = conv3d_forward_f64(
        &x.mapv(f64::from),
        c.in_off,
        &wt.mapv(f64::from),
        None,
        &c.spec,
    )
    .unwrap();
    let os = y.shape().to_vec();
    // The gradient lives in channels 2.. of a wider tensor (a channel-offset read).
    let g_total = c.cout + 3;
    let g_full = random([c.n, g_total, os[2], os[3], os[4]], seed + 2);
    let g = g_full
        .slice(ndarray::s![.., 2..2 + c.cout, .., .., ..])
        .to_owned();
    let g64 = g.mapv(f64::from);

    let xt = Tensor::from_array(ctx, &x, "x").unwrap();
    let wtt = Tensor::from_array(ctx, &wt, "w").unwrap();
    let gt = Tensor::from_array(ctx, &g_full, "dy").unwrap();
    let gslice = gt.channels(2, c.cout).unwrap();

    // Weight and bias gradients.
    let x_used = x
        .slice(ndarray::s![.., c.in_off..c.in_off + c.cin, .., .., ..])
        .to_owned();
    let want_dw = conv3d_backward_weight_f64(&x_used.mapv(f64::from), 0, &g64, c.kernel, &c.spec);
    let db = Tensor::zeros(ctx, Shape5::new(1, c.cout, 1, 1, 1), "db").unwrap();
    for v in variants(ctx) {
        let dw = Tensor::zeros(ctx, Shape5::new(c.cout, c.cin, kd, kh, kw), "dw").unwrap();
        let mut rec = ctx.recorder();
        let xs = xt.channels(c.in_off, c.cin).unwrap();
        conv3d_backward_weight(ctx, &mut rec, xs, gslice, &dw, &c.spec, v).unwrap();
        conv3d_backward_bias(ctx, &mut rec, gslice, &db).unwrap();
        ctx.submit(rec);
        assert_close(
            &dw.to_vec(ctx).unwrap(),
            &flat(&want_dw),
            RTOL,
            ATOL,
            &format!("weight gradient {v:?}"),
        );
    }
    let want_db: Vec<f32> = conv3d_backward_bias_f64(&g64)
        .iter()
        .map(|&v| v as f32)
        .collect();
    assert_close(
        &db.to_vec(ctx).unwrap(),
        &want_db,
        RTOL,
        ATOL,
        "bias gradient",
    );

    // Input gradient, written into a channel range of a wider tensor.
    let want_dx = conv3d_backward_input_f64(&g64, &wt.mapv(f64::from), c.size, &c.spec);
    for v in variants(ctx) {
        let dx = Tensor::zeros(ctx, Shape5::new(c.n, c.cin_total, d, h, w), "dx").unwrap();
        let mut rec = ctx.recorder();
        let dxs = dx.channels(c.in_off, c.cin).unwrap();
        conv3d_backward_input(ctx, &mut rec, gslice, &wtt, dxs, &c.spec, v).unwrap();
        ctx.submit(rec);
        let got = dx.to_array(ctx).unwrap();
        let got_range: Vec<f32> = got
            .slice(ndarray::s![.., c.in_off..c.in_off + c.cin, .., .., ..])
            .iter()
            .copied()
            .collect();
        assert_close(
            &got_range,
            &flat(&want_dx),
            RTOL,
            ATOL,
            &format!("input gradient {v:?}"),
        );
        let outside = got.iter().filter(|&&v| v != 0.0).count()
            - got_range.iter().filter(|&&v| v != 0.0).count();
        assert_eq!(outside, 0, "input gradient wrote outside its channel range");
    }
}

fn case(kernel: [usize; 3], spec: Conv3dSpec) -> Case {
    Case {
        n: 2,
        cin_total: 7,
        in_off: 1,
        cin: 5,
        cout: 6,
        size: [5, 7, 9],
        kernel,
        spec,
    }
}

#[test]
fn gradients_match_cpu_for_mixacb_kernels() {
    let ctx = gpu();
    for (i, k) in [
        [3, 3, 3],
        [1, 3, 3],
        [3, 1, 3],
        [3, 3, 1],
        [5, 5, 5],
        [1, 1, 1],
    ]
    .iter()
    .enumerate()
    {
        check_case(&ctx, &case(*k, Conv3dSpec::same(*k)), 10 + i as u64);
    }
    // 1x1x1 on a whole number of voxel vec4s: the input gradient runs the pointwise
    // kernel (Cin 5 and Cout 6 are not multiples of 4).
    let mut pointwise = case([1; 3], Conv3dSpec::default());
    pointwise.size = [4, 3, 6];
    check_case(&ctx, &pointwise, 17);
}

#[test]
fn gradients_match_cpu_for_stride_two_and_asymmetric_padding() {
    let ctx = gpu();
    check_case(
        &ctx,
        &case(
            [3, 3, 3],
            Conv3dSpec::same([3, 3, 3]).with_stride([2, 2, 2]),
        ),
        40,
    );
    let spec = Conv3dSpec {
        stride: [2, 1, 2],
        pad_lo: [0, 1, 2],
        pad_hi: [1, 0, 1],
        relu: false,
    };
    check_case(&ctx, &case([3, 3, 3], spec), 41);
    check_case(
        &ctx,
        &case(
            [5, 1, 5],
            Conv3dSpec::same([5, 1, 5]).with_stride([2, 2, 2]),
        ),
        42,
    );
    // Convs that never read the last voxel of an axis (5, 7, 9 with k=2 s=2; 7 and 9
    // with k=3 s=2 unpadded): the input gradient there is zero (the transposed conv's
    // output_padding).
    let unpadded = Conv3dSpec {
        stride: [2; 3],
        pad_lo: [0; 3],
        pad_hi: [0; 3],
        relu: false,
    };
    check_case(&ctx, &case([2, 2, 2], unpadded), 43);
    check_case(&ctx, &case([3, 3, 3], unpadded), 44);
    // k=2 s=2 padded in front on even extents, Cin 8 and the gradient's W 4: the
    // transposed conv of the input gradient has twice the gradient's extents but a
    // front crop.
    let front = Conv3dSpec {
        stride: [2; 3],
        pad_lo: [1; 3],
        pad_hi: [0; 3],
        relu: false,
    };
    let c = Case {
        cin_total: 9,
        cin: 8,
        size: [4, 6, 8],
        ..case([2, 2, 2], front)
    };
    check_case(&ctx, &c, 45);
}

/// Finite differences in f64 on the CPU reference, with the conv inside a graph:
/// L = 0.5 * sum(r * conv(x, w, b)^2), so dL/dy = r * y is not all ones.
#[test]
fn cpu_reference_gradients_pass_finite_differences() {
    let spec = Conv3dSpec {
        stride: [2, 1, 1],
        pad_lo: [1, 0, 1],
        pad_hi: [1, 1, 0],
        relu: false,
    };
    let x = random([2, 3, 5, 4, 5], 1).mapv(f64::from);
    let w = random([4, 3, 3, 2, 3], 2).mapv(f64::from);
    let b: Vec<f64> = vec![0.1, -0.2, 0.3, 0.05];
    let y0 = conv3d_forward_f64(&x, 0, &w, Some(&b), &spec).unwrap();
    let r = random(
        [
            y0.shape()[0],
            y0.shape()[1],
            y0.shape()[2],
            y0.shape()[3],
            y0.shape()[4],
        ],
        3,
    )
    .mapv(f64::from);
    let loss = |x: &Array5<f64>, w: &Array5<f64>, b: &[f64]| -> f64 {
        let y = conv3d_forward_f64(x, 0, w, Some(b), &spec).unwrap();
        0.5 * (&r * &y * &y).sum()
    };
    let g = &r * &y0;
    let dx = conv3d_backward_input_f64(&g, &w, [5, 4, 5], &spec);
    let dw = conv3d_backward_weight_f64(&x, 0, &g, [3, 2, 3], &spec);
    let db = conv3d_backward_bias_f64(&g);
    let eps = 1e-6;
    let mut rng = Rng::new(9);
    for _ in 0..20 {
        let i = [
            rng.below(2),
            rng.below(3),
            rng.below(5),
            rng.below(4),
            rng.below(5),
        ];
        let (mut xp, mut xm) = (x.clone(), x.clone());
        xp[i] += eps;
        xm[i] -= eps;
        let fd = (loss(&xp, &w, &b) - loss(&xm, &w, &b)) / (2.0 * eps);
        assert!(
            (fd - dx[i]).abs() <= 1e-6 + 1e-6 * fd.abs(),
            "dx{i:?}: fd {fd} vs {}",
            dx[i]
        );
        let j = [
            rng.below(4),
            rng.below(3),
            rng.below(3),
            rng.below(2),
            rng.below(3),
        ];
        let (mut wp, mut wm) = (w.clone(), w.clone());
        wp[j] += eps;
        wm[j] -= eps;
        let fd = (loss(&x, &wp, &b) - loss(&x, &wm, &b)) / (2.0 * eps);
        assert!(
            (fd - dw[j]).abs() <= 1e-6 + 1e-6 * fd.abs(),
            "dw{j:?}: fd {fd} vs {}",
            dw[j]
        );
    }
    for c in 0..4 {
        let (mut bp, mut bm) = (b.clone(), b.clone());
        bp[c] += eps;
        bm[c] -= eps;
        let fd = (loss(&x, &w, &bp) - loss(&x, &w, &bm)) / (2.0 * eps);
        assert!(
            (fd - db[c]).abs() <= 1e-6 + 1e-6 * fd.abs(),
            "db[{c}]: fd {fd} vs {}",
            db[c]
        );
    }
}

#[test]
fn mismatched_gradient_shapes_are_errors() {
    let ctx = gpu();
    let s = Shape5::new;
    let x = Tensor::zeros(&ctx, s(1, 3, 6, 6, 6), "x").unwrap();
    let w = Tensor::zeros(&ctx, s(4, 3, 3, 3, 3), "w").unwrap();
    let bad_g = Tensor::zeros(&ctx, s(1, 4, 5, 6, 6), "dy").unwrap();
    let dx = Tensor::zeros(&ctx, s(1, 3, 6, 6, 6), "dx").unwrap();
    let spec = Conv3dSpec::same([3, 3, 3]);
    let mut rec = ctx.recorder();
    let e = conv3d_backward_input(
        &ctx,
        &mut rec,
        bad_g.all(),
        &w,
        dx.all(),
        &spec,
        Conv3dVariant::Auto,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("'dy'") && e.contains("do not match"), "{e}");
    let dw = Tensor::zeros(&ctx, s(4, 3, 3, 3, 3), "dw").unwrap();
    let e = conv3d_backward_weight(
        &ctx,
        &mut rec,
        x.all(),
        bad_g.all(),
        &dw,
        &spec,
        Conv3dVariant::Auto,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("do not match"), "{e}");
    let db = Tensor::zeros(&ctx, s(1, 5, 1, 1, 1), "db").unwrap();
    let e = conv3d_backward_bias(&ctx, &mut rec, bad_g.all(), &db)
        .unwrap_err()
        .to_string();
    assert!(e.contains("'db'"), "{e}");
    ctx.check("after errors").unwrap();
}

#[test]
fn reductions_match_cpu() {
    use masnet_wgpu::ops::reduce::{sum_chunks, sum_chunks_cpu, sum_rows, sum_rows_cpu};
    let ctx = gpu();
    let mut rng = Rng::new(5);
    let (chunks, len) = (13, 777);
    let data = rng.vec_f32(chunks * len, -1.0, 1.0);
    let src = Tensor::from_slice(&ctx, Shape5::new(1, 1, 1, chunks, len), &data, "src").unwrap();
    let by_chunk = Tensor::zeros(&ctx, Shape5::new(1, 1, 1, 1, len), "chunks").unwrap();
    let by_row = Tensor::zeros(&ctx, Shape5::new(1, 1, 1, 1, chunks), "rows").unwrap();
    let mut rec = ctx.recorder();
    sum_chunks(&ctx, &mut rec, &src, chunks, len, &by_chunk).unwrap();
    sum_rows(&ctx, &mut rec, &src, chunks, len, &by_row).unwrap();
    ctx.submit(rec);
    let tol = 1e-5;
    assert_close(
        &by_chunk.to_vec(&ctx).unwrap(),
        &sum_chunks_cpu(&data, chunks, len),
        tol,
        tol,
        "sum_chunks",
    );
    assert_close(
        &by_row.to_vec(&ctx).unwrap(),
        &sum_rows_cpu(&data, chunks, len),
        tol,
        1e-4,
        "sum_rows",
    );
    let mut rec = ctx.recorder();
    assert!(sum_rows(&ctx, &mut rec, &src, chunks + 1, len, &by_row).is_err());
}

/// The input gradient through every GEMM tile, with channel counts that are not tile
/// multiples (the GEMM's N is the forward's Cin here, its K the forward's Cout) and
/// stride 2 (dilated packing).
#[test]
fn input_gradient_through_every_gemm_tile() {
    let ctx = gpu();
    let spec = Conv3dSpec {
        stride: [2, 1, 2],
        pad_lo: [1, 1, 0],
        pad_hi: [1, 0, 1],
        relu: false,
    };
    for (i, &(cin, cout)) in [(17, 5), (1, 13), (33, 2)].iter().enumerate() {
        let (n, size, k) = (2, [5, 6, 7], [3, 3, 3]);
        let wt = random([cout, cin, k[0], k[1], k[2]], 60 + i as u64);
        let probe = conv3d_forward_f64(
            &Array5::zeros([n, cin, size[0], size[1], size[2]]),
            0,
            &wt.mapv(f64::from),
            None,
            &spec,
        )
        .unwrap();
        let os = probe.shape();
        let g = random([n, cout, os[2], os[3], os[4]], 70 + i as u64);
        let want = conv3d_backward_input_f64(&g.mapv(f64::from), &wt.mapv(f64::from), size, &spec);
        let gt = Tensor::from_array(&ctx, &g, "dy").unwrap();
        let wtt = Tensor::from_array(&ctx, &wt, "w").unwrap();
        for t in [
            GemmTile::M64_N32,
            GemmTile::M64_N64,
            GemmTile::M32_N32,
            GemmTile::M64_N16,
        ] {
            // Sentinel channels on both sides of the written range.
            let shape = Shape5::new(n, cin + 2, size[0], size[1], size[2]);
            let fill = vec![7.5f32; shape.numel().unwrap()];
            let dx = Tensor::from_slice(&ctx, shape, &fill, "dx").unwrap();
            let mut rec = ctx.recorder();
            let dxs = dx.channels(1, cin).unwrap();
            conv3d_backward_input_kernel(
                &ctx,
                &mut rec,
                gt.all(),
                &wtt,
                dxs,
                &spec,
                ConvKernel::Gemm(t),
            )
            .unwrap();
            ctx.submit(rec);
            let got = dx.to_array(&ctx).unwrap();
            let inside: Vec<f32> = got
                .slice(ndarray::s![.., 1..1 + cin, .., .., ..])
                .iter()
                .copied()
                .collect();
            assert_close(&inside, &flat(&want), RTOL, ATOL, &format!("gemm {t:?} dx"));
            for ch in [0, cin + 1] {
                assert!(
                    got.slice(ndarray::s![.., ch, .., .., ..])
                        .iter()
                        .all(|&v| v == 7.5),
                    "gemm {t:?} wrote sentinel channel {ch}"
                );
            }
        }
    }
}
