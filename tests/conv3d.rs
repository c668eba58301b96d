//! GPU conv3d forward against the CPU reference: every MixACB kernel shape, odd
//! sizes, stride 2, asymmetric padding, channel offsets, N > 1, odd channel counts,
//! both kernel variants; and bad input returning errors.

mod common;

use common::{assert_close, gpu, random, variants};
use masnet_wgpu::ops::conv3d::{
    conv3d_forward, conv3d_forward_cpu, conv3d_forward_kernel, Conv3dSpec, Conv3dVariant,
    ConvKernel,
};
use masnet_wgpu::ops::conv3d_gemm::GemmTile;
use masnet_wgpu::{GpuContext, Shape5, Tensor};

/// Relative and absolute tolerance of GPU f32 against the f64-accumulated reference.
const RTOL: f32 = 1e-4;
const ATOL: f32 = 1e-5;

struct Case {
    n: usize,
    cin_total: usize,
    in_off: usize,
    cin: usize,
    cout: usize,
    out_total: usize,
    out_off: usize,
    size: [usize; 3],
    kernel: [usize; 3],
    spec: Conv3dSpec,
    bias: bool,
}

/// The values of batch item `n`, channel `c`.
fn plane(a: &ndarray::Array5<f32>, n: usize, c: usize) -> Vec<f32> {
    a.slice(ndarray::s![n, c, .., .., ..])
        .iter()
        .copied()
        .collect()
}

fn run_case(ctx: &GpuContext, c: &Case, variant: Conv3dVariant, seed: u64) {
    run_case_on(ctx, c, Ok(variant), seed);
}

/// Runs `c` with a variant (through `conv3d_forward`) or a concrete kernel.
fn run_case_on(ctx: &GpuContext, c: &Case, which: Result<Conv3dVariant, ConvKernel>, seed: u64) {
    let [d, h, w] = c.size;
    let x = random([c.n, c.cin_total, d, h, w], seed);
    let [kd, kh, kw] = c.kernel;
    let wt = random([c.cout, c.cin, kd, kh, kw], seed + 1);
    let b: Vec<f32> = random([1, c.cout, 1, 1, 1], seed + 2)
        .iter()
        .copied()
        .collect();
    let bias = c.bias.then_some(b.as_slice());
    let want = conv3d_forward_cpu(&x, c.in_off, &wt, bias, &c.spec).unwrap();
    let [_, _, od, oh, ow] = [
        want.shape()[0],
        want.shape()[1],
        want.shape()[2],
        want.shape()[3],
        want.shape()[4],
    ];

    let xt = Tensor::from_array(ctx, &x, "x").unwrap();
    let wt_t = Tensor::from_array(ctx, &wt, "w").unwrap();
    let bt = Tensor::from_slice(ctx, Shape5::new(1, c.cout, 1, 1, 1), &b, "b").unwrap();
    // Fill the output with a sentinel so writes outside the channel range are caught.
    let oshape = Shape5::new(c.n, c.out_total, od, oh, ow);
    let sentinel = vec![7.5f32; oshape.numel().unwrap()];
    let out = Tensor::from_slice(ctx, oshape, &sentinel, "out").unwrap();
    let mut rec = ctx.recorder();
    let (xs, os) = (
        xt.channels(c.in_off, c.cin).unwrap(),
        out.channels(c.out_off, c.cout).unwrap(),
    );
    let b = c.bias.then_some(&bt);
    match which {
        Ok(v) => conv3d_forward(ctx, &mut rec, xs, &wt_t, b, os, &c.spec, v),
        Err(k) => conv3d_forward_kernel(ctx, &mut rec, xs, &wt_t, b, os, &c.spec, k),
    }
    .unwrap();
    ctx.submit(rec);
    let variant = which;
    let got = out.to_array(ctx).unwrap();
    for nn in 0..c.n {
        for ch in 0..c.out_total {
            let g = plane(&got, nn, ch);
            if ch >= c.out_off && ch < c.out_off + c.cout {
                let e = plane(&want, nn, ch - c.out_off);
                assert_close(
                    &g,
                    &e,
                    RTOL,
                    ATOL,
                    &format!("{variant:?} k{:?} n{nn} c{ch}", c.kernel),
                );
            } else {
                assert!(
                    g.iter().all(|&v| v == 7.5),
                    "channel {ch} outside the range was written"
                );
            }
        }
    }
}

fn simple(kernel: [usize; 3], size: [usize; 3], cin: usize, cout: usize) -> Case {
    Case {
        n: 2,
        cin_total: cin,
        in_off: 0,
        cin,
        cout,
        out_total: cout,
        out_off: 0,
        size,
        kernel,
        spec: Conv3dSpec::same(kernel),
        bias: true,
    }
}

#[test]
fn every_mixacb_kernel_shape_matches_cpu() {
    let ctx = gpu();
    let shapes = [
        [3, 3, 3],
        [5, 5, 5],
        [1, 3, 3],
        [3, 1, 3],
        [3, 3, 1],
        [1, 5, 5],
        [5, 1, 5],
        [5, 5, 1],
        [1, 1, 1],
    ];
    for (i, k) in shapes.iter().enumerate() {
        for v in variants(&ctx) {
            run_case(&ctx, &simple(*k, [7, 9, 11], 3, 10), v, 100 + i as u64);
        }
    }
}

#[test]
fn stride_two_asymmetric_padding_and_relu() {
    let ctx = gpu();
    let mut c = simple([3, 3, 3], [7, 9, 11], 5, 9);
    c.spec = Conv3dSpec {
        stride: [2, 2, 2],
        pad_lo: [1, 0, 2],
        pad_hi: [0, 1, 1],
        relu: true,
    };
    for v in variants(&ctx) {
        run_case(&ctx, &c, v, 7);
    }
    // Stride differs per axis, kernel 5 with stride 2.
    let mut c = simple([5, 5, 5], [9, 8, 13], 4, 6);
    c.spec = Conv3dSpec::same([5, 5, 5]).with_stride([2, 1, 2]);
    c.bias = false;
    for v in variants(&ctx) {
        run_case(&ctx, &c, v, 8);
    }
}

#[test]
fn channel_offsets_read_and_write_ranges() {
    let ctx = gpu();
    let c = Case {
        n: 3,
        cin_total: 11,
        in_off: 4,
        cin: 5,
        cout: 7,
        out_total: 13,
        out_off: 5,
        size: [5, 6, 7],
        kernel: [3, 1, 3],
        spec: Conv3dSpec::same([3, 1, 3]),
        bias: true,
    };
    for v in variants(&ctx) {
        run_case(&ctx, &c, v, 21);
    }
}

#[test]
fn channel_counts_not_multiples_of_tiles() {
    let ctx = gpu();
    for (cin, cout) in [(1, 1), (2, 17), (13, 3)] {
        for v in variants(&ctx) {
            run_case(
                &ctx,
                &simple([3, 3, 3], [6, 5, 9], cin, cout),
                v,
                31 + cin as u64,
            );
        }
    }
}

/// The register tile follows the channel count (4x16, 10x8, 12x8, 15x4, 14x4 ...);
/// widths that are not multiples of the tile's 16 or 8 voxels cover the ragged W edge.
#[test]
fn every_tile_width_matches_cpu() {
    let ctx = gpu();
    for (cin, cout) in [(5, 4), (6, 10), (9, 12), (4, 30), (3, 40), (2, 2)] {
        let tile = masnet_wgpu::ops::conv3d::ConvTile::for_channels(cout);
        assert!(tile.tc <= 16 && tile.tc * cout.div_ceil(tile.tc) < cout + tile.tc);
        for v in variants(&ctx) {
            run_case(
                &ctx,
                &simple([3, 3, 3], [3, 4, 19], cin, cout),
                v,
                71 + cout as u64,
            );
        }
    }
}

/// 1x1x1 convs with a whole number of voxel vec4s run the pointwise kernel (no input
/// packing): channel ranges in and out, Cin not a multiple of 4, ragged voxel and
/// channel tiles, several voxel workgroups per channel tile, ReLU, no bias; odd voxel
/// counts take the packed kernel.
#[test]
fn pointwise_convs_match_cpu() {
    let ctx = gpu();
    let mut cases = Vec::new();
    for (cin, cout, size) in [
        (5, 16, [2, 3, 6]),
        (13, 3, [4, 4, 5]),
        (8, 40, [3, 5, 4]),
        (3, 7, [3, 3, 3]),
        // 32-channel tiles.
        (6, 64, [2, 2, 4]),
        // Several workgroups of voxels (64 lanes x 4 voxels each) x channel tiles.
        (10, 40, [8, 8, 12]),
    ] {
        for (in_off, out_off, relu, bias) in [(0, 0, false, true), (2, 3, true, false)] {
            cases.push(Case {
                n: 2,
                cin_total: cin + in_off + 1,
                in_off,
                cin,
                cout,
                out_total: cout + out_off + 2,
                out_off,
                size,
                kernel: [1; 3],
                spec: Conv3dSpec::default().with_relu(relu),
                bias,
            });
        }
    }
    assert!(masnet_wgpu::ops::conv3d_pointwise::applies(
        [1; 3],
        &cases[0].spec,
        36
    ));
    for (i, c) in cases.iter().enumerate() {
        for v in variants(&ctx) {
            run_case(&ctx, c, v, 90 + i as u64);
        }
    }
}

fn conv_err(ctx: &GpuContext, x: Shape5, w: Shape5, out: Shape5, spec: Conv3dSpec) -> String {
    let xt = Tensor::zeros(ctx, x, "x").unwrap();
    let wt = Tensor::zeros(ctx, w, "w").unwrap();
    let ot = Tensor::zeros(ctx, out, "out").unwrap();
    let mut rec = ctx.recorder();
    let r = conv3d_forward(
        ctx,
        &mut rec,
        xt.all(),
        &wt,
        None,
        ot.all(),
        &spec,
        Conv3dVariant::Auto,
    );
    ctx.check("test").unwrap();
    r.expect_err("bad input must be an error").to_string()
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let ctx = gpu();
    let s = Shape5::new;
    let same = Conv3dSpec::same([3, 3, 3]);
    let e = conv_err(
        &ctx,
        s(1, 4, 8, 8, 8),
        s(2, 3, 3, 3, 3),
        s(1, 2, 8, 8, 8),
        same,
    );
    assert!(e.contains("input channels"), "{e}");
    let e = conv_err(
        &ctx,
        s(1, 3, 8, 8, 8),
        s(2, 3, 3, 3, 3),
        s(1, 2, 8, 8, 7),
        same,
    );
    assert!(e.contains("do not fit"), "{e}");
    let e = conv_err(
        &ctx,
        s(1, 3, 2, 8, 8),
        s(2, 3, 5, 3, 3),
        s(1, 2, 2, 8, 8),
        Conv3dSpec::default(),
    );
    assert!(e.contains("larger than the padded input"), "{e}");
    let e = conv_err(
        &ctx,
        s(1, 3, 8, 8, 8),
        s(2, 3, 3, 3, 3),
        s(1, 2, 8, 8, 8),
        same.with_stride([1, 0, 1]),
    );
    assert!(e.contains("stride"), "{e}");
    let z = Tensor::zeros(&ctx, s(1, 0, 4, 4, 4), "zero");
    assert!(z.err().unwrap().to_string().contains("zero-sized"));
    let x = Tensor::zeros(&ctx, s(1, 3, 4, 4, 4), "x").unwrap();
    assert!(x.channels(2, 2).is_err());
    let w = Tensor::zeros(&ctx, s(2, 3, 3, 3, 3), "w").unwrap();
    let b = Tensor::zeros(&ctx, s(1, 3, 1, 1, 1), "b").unwrap();
    let r = masnet_wgpu::ops::conv3d(&ctx, &x, &w, Some(&b), &same);
    assert!(r.err().unwrap().to_string().contains("bias has 3 values"));
}

/// The GL backend has no subgroups: the tiled kernel must be right there too.
#[test]
fn gl_backend_without_subgroups_matches_cpu() {
    let opts = masnet_wgpu::GpuOptions {
        backend: masnet_wgpu::BackendChoice::Gl,
        ..Default::default()
    };
    let ctx = GpuContext::new(&opts).expect("a GL adapter (Mesa llvmpipe on CI)");
    assert!(!ctx.subgroups, "GL was expected to have no subgroups");
    let mut c = simple([3, 1, 3], [5, 7, 9], 6, 11);
    c.spec = c.spec.with_stride([2, 1, 2]).with_relu(true);
    run_case(&ctx, &c, Conv3dVariant::Auto, 77);
}

/// Every GEMM tile on sizes that are not multiples of it: M = N·D·H·W, Cout and
/// K = ceil(Cin/4)·27 cross tile edges; Cin 1, Cout 1, 13, 17, 33, 65; channel offsets
/// on both sides with sentinels around the written range.
#[test]
fn gemm_tiles_cover_ragged_edges() {
    let ctx = gpu();
    let tiles = [
        GemmTile::M64_N32,
        GemmTile::M64_N64,
        GemmTile::M32_N32,
        GemmTile::M64_N16,
        GemmTile {
            bm: 16,
            bn: 8,
            bk: 3,
            tm: 1,
            tn: 2,
        },
    ];
    let cases = [(1, 1), (1, 13), (13, 17), (6, 33), (9, 65), (17, 1)];
    for (i, &(cin, cout)) in cases.iter().enumerate() {
        let mut c = simple([3, 3, 3], [5, 6, 7], cin, cout);
        c.cin_total = cin + 3;
        c.in_off = 2;
        c.out_total = cout + 4;
        c.out_off = 3;
        c.bias = i % 2 == 0;
        c.spec = c.spec.with_relu(i % 3 == 0);
        for t in tiles {
            run_case_on(&ctx, &c, Err(ConvKernel::Gemm(t)), 300 + i as u64);
        }
    }
    // Stride and asymmetric kernels with padding on one side only.
    let mut c = simple([1, 3, 5], [7, 5, 9], 5, 19);
    c.spec = Conv3dSpec {
        stride: [2, 1, 3],
        pad_lo: [0, 1, 2],
        pad_hi: [1, 0, 0],
        relu: true,
    };
    for t in tiles {
        run_case_on(&ctx, &c, Err(ConvKernel::Gemm(t)), 320);
    }
}

#[test]
fn gemm_tile_and_variant_parsing() {
    assert_eq!(GemmTile::parse("64x32x8x8x4"), Some(GemmTile::M64_N32));
    assert_eq!(
        GemmTile::parse("64x32x8x4x4"),
        None,
        "8x8 = 64 lanes, 16 given"
    );
    assert_eq!(GemmTile::parse("48x32x8x6x4"), None, "BM must divide 64");
    assert_eq!(GemmTile::parse("64x32"), None);
    assert!(GemmTile::M64_N64.validate().is_ok());
    assert_eq!(Conv3dVariant::parse("GEMM").unwrap(), Conv3dVariant::Gemm);
    let e = Conv3dVariant::parse("fast").unwrap_err().to_string();
    assert!(e.contains("unknown conv3d variant 'fast'"), "{e}");
}

/// The GEMM kernel needs no subgroups: it must be right on GL too.
#[test]
fn gl_backend_runs_the_gemm_kernel() {
    let opts = masnet_wgpu::GpuOptions {
        backend: masnet_wgpu::BackendChoice::Gl,
        ..Default::default()
    };
    let ctx = GpuContext::new(&opts).expect("a GL adapter (Mesa llvmpipe on CI)");
    let mut c = simple([3, 3, 1], [5, 7, 9], 6, 21);
    c.spec = c.spec.with_stride([2, 1, 2]).with_relu(true);
    run_case(&ctx, &c, Conv3dVariant::Gemm, 78);
    run_case_on(&ctx, &c, Err(ConvKernel::Gemm(GemmTile::M64_N64)), 79);
}

/// One reader of [`pointwise_into_convs_matches_the_cpu_chain`]'s pointwise result.
struct Reader {
    in_off: usize,
    cin: usize,
    cout: usize,
    kernel: [usize; 3],
    spec: Conv3dSpec,
    out_off: usize,
}

/// A 1x1x1 conv feeding convolutions over channel ranges of its result
/// (`pointwise_into_convs`: a DenseNet bottleneck feeding a MixACB's groups in
/// inference) against the CPU chain: the fused form (the result stored straight in the
/// packed layout, one packing padded for the widest reader) with every register-tiled
/// family, and the two-step form where it does not apply (GEMM family, W not a multiple
/// of 4, a range off a 4-channel boundary). Output channels nobody writes keep a
/// sentinel.
#[test]
fn pointwise_into_convs_matches_the_cpu_chain() {
    use masnet_wgpu::ops::conv3d_chain::{pointwise_into_convs, ChainedConv};
    let ctx = gpu();
    let r = |in_off, cin, cout, kernel: [usize; 3], spec: Conv3dSpec, out_off| Reader {
        in_off,
        cin,
        cout,
        kernel,
        spec,
        out_off,
    };
    let same = |k: [usize; 3]| Conv3dSpec::same(k).with_relu(true);
    // (n, input channels, offset read, Cin, pointwise Cout, size, readers, fusable)
    let cases = [
        // DU-Net's dense layer in small: 3:1 groups, 3^3 and 5^3.
        (
            2,
            13,
            2,
            10,
            16,
            [6, 5, 8],
            vec![
                r(0, 12, 3, [3; 3], same([3; 3]), 1),
                r(12, 4, 1, [5; 3], same([5; 3]), 5),
            ],
            true,
        ),
        // Asymmetric kernels, a reader without ReLU, overlapping ranges.
        (
            1,
            7,
            0,
            7,
            8,
            [4, 6, 12],
            vec![
                r(0, 8, 5, [1, 3, 3], same([1, 3, 3]), 0),
                r(4, 4, 2, [3, 3, 1], Conv3dSpec::same([3, 3, 1]), 5),
            ],
            true,
        ),
        // A strided reader (the packing still holds every voxel).
        (
            2,
            6,
            1,
            5,
            12,
            [5, 6, 8],
            vec![r(4, 8, 3, [3; 3], same([3; 3]).with_stride([2; 3]), 0)],
            true,
        ),
        // W = 6: a voxel vec4 would straddle rows.
        (
            1,
            5,
            0,
            5,
            8,
            [4, 2, 6],
            vec![r(0, 8, 3, [3; 3], same([3; 3]), 0)],
            false,
        ),
        // A range starting inside a 4-channel group.
        (
            1,
            5,
            0,
            5,
            8,
            [4, 4, 4],
            vec![r(2, 6, 3, [3; 3], same([3; 3]), 0)],
            false,
        ),
        // One ending inside a group (the next range's values would ride along).
        (
            1,
            5,
            0,
            5,
            8,
            [4, 4, 4],
            vec![r(0, 6, 3, [3; 3], same([3; 3]), 0)],
            false,
        ),
        // A voxel count the pointwise kernel cannot tile (3 voxels): two-step form.
        (
            2,
            5,
            0,
            5,
            8,
            [1, 1, 3],
            vec![r(0, 8, 3, [3; 3], same([3; 3]), 0)],
            false,
        ),
    ];
    for (i, (n, ctot, in_off, cin, mid, size, readers, fusable)) in cases.iter().enumerate() {
        let seed = 300 + 10 * i as u64;
        let [d, h, w] = *size;
        let x = random([*n, *ctot, d, h, w], seed);
        let wp = random([*mid, *cin, 1, 1, 1], seed + 1);
        let bp: Vec<f32> = random([1, *mid, 1, 1, 1], seed + 2)
            .iter()
            .copied()
            .collect();
        let pspec = Conv3dSpec::same([1; 3]).with_relu(true);
        let y = conv3d_forward_cpu(&x, *in_off, &wp, Some(&bp), &pspec).unwrap();
        let mut weights = Vec::new();
        let mut wants = Vec::new();
        for (j, rd) in readers.iter().enumerate() {
            let [kd, kh, kw] = rd.kernel;
            let wr = random([rd.cout, rd.cin, kd, kh, kw], seed + 3 + 2 * j as u64);
            let br: Vec<f32> = random([1, rd.cout, 1, 1, 1], seed + 4 + 2 * j as u64)
                .iter()
                .copied()
                .collect();
            wants.push(conv3d_forward_cpu(&y, rd.in_off, &wr, Some(&br), &rd.spec).unwrap());
            weights.push((
                Tensor::from_array(&ctx, &wr, "reader w").unwrap(),
                Tensor::from_slice(&ctx, Shape5::new(1, rd.cout, 1, 1, 1), &br, "reader b")
                    .unwrap(),
            ));
        }
        let ws = wants[0].shape().to_vec();
        let out_total = readers.iter().map(|rd| rd.out_off + rd.cout).max().unwrap() + 1;
        let oshape = Shape5::new(*n, out_total, ws[2], ws[3], ws[4]);
        for v in variants(&ctx) {
            let xt = Tensor::from_array(&ctx, &x, "x").unwrap();
            let wpt = Tensor::from_array(&ctx, &wp, "pointwise w").unwrap();
            let bpt = Tensor::from_slice(&ctx, Shape5::new(1, *mid, 1, 1, 1), &bp, "pw b").unwrap();
            let out = Tensor::from_slice(&ctx, oshape, &vec![7.5; oshape.numel().unwrap()], "out")
                .unwrap();
            let convs: Vec<ChainedConv<'_>> = readers
                .iter()
                .zip(&weights)
                .map(|(rd, (wt, bt))| ChainedConv {
                    in_offset: rd.in_off,
                    weight: wt,
                    bias: Some(bt),
                    spec: rd.spec,
                    output: out.channels(rd.out_off, rd.cout).unwrap(),
                })
                .collect();
            let mut rec = ctx.recorder();
            let fused = pointwise_into_convs(
                &ctx,
                &mut rec,
                xt.channels(*in_off, *cin).unwrap(),
                &wpt,
                Some(&bpt),
                &pspec,
                &convs,
                v,
            )
            .unwrap();
            ctx.submit(rec);
            assert_eq!(
                fused,
                *fusable && v != Conv3dVariant::Gemm,
                "case {i} {v:?}"
            );
            let got = out.to_array(&ctx).unwrap();
            for nn in 0..*n {
                for ch in 0..out_total {
                    let g = plane(&got, nn, ch);
                    match readers
                        .iter()
                        .position(|rd| ch >= rd.out_off && ch < rd.out_off + rd.cout)
                    {
                        Some(j) => {
                            let e = plane(&wants[j], nn, ch - readers[j].out_off);
                            assert_close(
                                &g,
                                &e,
                                RTOL,
                                ATOL,
                                &format!("case {i} {v:?} n{nn} c{ch}"),
                            );
                        }
                        None => assert!(
                            g.iter().all(|&v| v == 7.5),
                            "case {i}: channel {ch} written"
                        ),
                    }
                }
            }
        }
    }
    // Bad input: a reader past the pointwise result's channels.
    let xt = Tensor::zeros(&ctx, Shape5::new(1, 4, 4, 4, 4), "x").unwrap();
    let wpt = Tensor::zeros(&ctx, Shape5::new(8, 4, 1, 1, 1), "pointwise w").unwrap();
    let wr = Tensor::zeros(&ctx, Shape5::new(2, 8, 3, 3, 3), "reader w").unwrap();
    let out = Tensor::zeros(&ctx, Shape5::new(1, 2, 4, 4, 4), "out").unwrap();
    let convs = [ChainedConv {
        in_offset: 4,
        weight: &wr,
        bias: None,
        spec: Conv3dSpec::same([3; 3]),
        output: out.all(),
    }];
    let mut rec = ctx.recorder();
    let err = pointwise_into_convs(
        &ctx,
        &mut rec,
        xt.all(),
        &wpt,
        None,
        &Conv3dSpec::same([1; 3]),
        &convs,
        Conv3dVariant::Auto,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("reader w") && err.contains("4..12"), "{err}");
}
