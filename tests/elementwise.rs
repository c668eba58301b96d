//! Elementwise ops (ReLU/ReLU6, add/scale/axpy/fill, channel copy/add, dropout) and the
//! reductions `max_rows`/`mean_rows`/`sum_all`: GPU against the f64 CPU references on
//! odd shapes with N > 1 (in-place forms included), the CPU backward references against
//! finite differences in f64 inside a small graph, dropout mask statistics and
//! reproducibility, and bad input returning errors.

mod common;

use common::{assert_close, gpu, random};
use masnet_wgpu::ops::elementwise::{
    add, add_assign, add_channels, add_channels_f64, add_f64, axpy, axpy_f64, copy_channels,
    copy_channels_f64, dropout_backward, dropout_backward_f64, dropout_forward,
    dropout_forward_f64, dropout_hash, dropout_keeps, fill, relu6_backward, relu6_backward_f64,
    relu6_forward, relu6_forward_f64, relu_backward, relu_backward_f64, relu_forward,
    relu_forward_f64, scale, scale_f64,
};
use masnet_wgpu::ops::reduce::{
    max_rows, max_rows_f64, mean_rows, mean_rows_f64, sum_all, sum_all_f64, SUM_ALL_BLOCK,
};
use masnet_wgpu::rng::Rng;
use masnet_wgpu::tensor::ChannelSlice;
use masnet_wgpu::{GpuContext, Shape5, Tensor};
use ndarray::Array5;

/// Elementwise results are one or two f32 roundings of the f64 value (axpy may or may
/// not be fused), so a few ulps relative plus a tiny absolute term.
const RTOL: f32 = 1e-6;
const ATOL: f32 = 1e-6;
/// Row means of up to ~40 values in [-1, 1): sequential f32 sums, error <= len·eps·Σ|x|.
const ROW_RTOL: f32 = 1e-5;
const ROW_ATOL: f32 = 1e-5;
/// sum_all: each pass is a depth-22 summation (16 sequential adds + 6 tree levels), so
/// the worst-case error is <= 22·passes·eps·Σ|x|; with <= 3 passes 1e-5·Σ|x| bounds it.
const SUM_ALL_REL_TO_ABS_SUM: f64 = 1e-5;
/// Finite differences: central, h = 1e-6, on f64 (piecewise-linear ops away from kinks
/// give errors ~1e-10).
const FD_H: f64 = 1e-6;
const FD_TOL: f64 = 1e-6;

/// The standard odd test shape: N = 2, C = 3, 5x7x6.
const SHAPE: [usize; 5] = [2, 3, 5, 7, 6];

fn shape(s: [usize; 5]) -> Shape5 {
    Shape5(s)
}

fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

fn to32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

fn upload(ctx: &GpuContext, data: &[f32], s: [usize; 5], name: &str) -> Tensor {
    Tensor::from_slice(ctx, shape(s), data, name).unwrap()
}

/// Random data uniform in [lo, hi).
fn uniform(len: usize, lo: f32, hi: f32, seed: u64) -> Vec<f32> {
    Rng::new(seed).vec_f32(len, lo, hi)
}

fn numel(s: [usize; 5]) -> usize {
    s.iter().product()
}

#[test]
fn relu_and_relu6_match_cpu_including_in_place() {
    let ctx = gpu();
    let n = numel(SHAPE);
    // Covers both kinks of relu6.
    let x = uniform(n, -3.0, 9.0, 1);
    let dy = uniform(n, -1.0, 1.0, 2);
    let (x64, dy64) = (to64(&x), to64(&dy));
    let xt = upload(&ctx, &x, SHAPE, "x");
    let dyt = upload(&ctx, &dy, SHAPE, "dy");
    let y = Tensor::zeros(&ctx, shape(SHAPE), "y").unwrap();
    let y6 = Tensor::zeros(&ctx, shape(SHAPE), "y6").unwrap();
    let dx = Tensor::zeros(&ctx, shape(SHAPE), "dx").unwrap();
    let dx6 = Tensor::zeros(&ctx, shape(SHAPE), "dx6").unwrap();
    let dx_from_x = Tensor::zeros(&ctx, shape(SHAPE), "dx_from_x").unwrap();
    let mut rec = ctx.recorder();
    relu_forward(&ctx, &mut rec, &xt, &y).unwrap();
    relu6_forward(&ctx, &mut rec, &xt, &y6).unwrap();
    // From the saved output (what autodiff passes) and from the input: same result.
    relu_backward(&ctx, &mut rec, &y, &dyt, &dx).unwrap();
    relu_backward(&ctx, &mut rec, &xt, &dyt, &dx_from_x).unwrap();
    relu6_backward(&ctx, &mut rec, &xt, &dyt, &dx6).unwrap();
    ctx.submit(rec);
    let want_y = relu_forward_f64(&x64);
    assert_close(&y.to_vec(&ctx).unwrap(), &to32(&want_y), 0.0, 0.0, "relu");
    assert_close(
        &y6.to_vec(&ctx).unwrap(),
        &to32(&relu6_forward_f64(&x64)),
        0.0,
        0.0,
        "relu6",
    );
    let want_dx = to32(&relu_backward_f64(&want_y, &dy64));
    assert_close(&dx.to_vec(&ctx).unwrap(), &want_dx, 0.0, 0.0, "relu dx");
    assert_close(
        &dx_from_x.to_vec(&ctx).unwrap(),
        &to32(&relu_backward_f64(&x64, &dy64)),
        0.0,
        0.0,
        "relu dx from x",
    );
    let want_dx6 = to32(&relu6_backward_f64(&x64, &dy64));
    assert_close(&dx6.to_vec(&ctx).unwrap(), &want_dx6, 0.0, 0.0, "relu6 dx");

    // In place: forward (x is y) and backward (dx is dy).
    let inplace = upload(&ctx, &x, SHAPE, "inplace");
    let inplace6 = upload(&ctx, &x, SHAPE, "inplace6");
    let g = upload(&ctx, &dy, SHAPE, "g");
    let g6 = upload(&ctx, &dy, SHAPE, "g6");
    let mut rec = ctx.recorder();
    relu_backward(&ctx, &mut rec, &xt, &g, &g).unwrap();
    relu6_backward(&ctx, &mut rec, &xt, &g6, &g6).unwrap();
    relu_forward(&ctx, &mut rec, &inplace, &inplace).unwrap();
    relu6_forward(&ctx, &mut rec, &inplace6, &inplace6).unwrap();
    ctx.submit(rec);
    assert_close(
        &inplace.to_vec(&ctx).unwrap(),
        &to32(&want_y),
        0.0,
        0.0,
        "relu in place",
    );
    assert_close(
        &inplace6.to_vec(&ctx).unwrap(),
        &to32(&relu6_forward_f64(&x64)),
        0.0,
        0.0,
        "relu6 in place",
    );
    assert_close(
        &g.to_vec(&ctx).unwrap(),
        &want_dx,
        0.0,
        0.0,
        "relu dx in place",
    );
    assert_close(
        &g6.to_vec(&ctx).unwrap(),
        &want_dx6,
        0.0,
        0.0,
        "relu6 dx in place",
    );
}

#[test]
fn add_scale_axpy_fill_match_cpu_including_aliases() {
    let ctx = gpu();
    let n = numel(SHAPE);
    let a = uniform(n, -1.0, 1.0, 3);
    let b = uniform(n, -1.0, 1.0, 4);
    let (a64, b64) = (to64(&a), to64(&b));
    let at = upload(&ctx, &a, SHAPE, "a");
    let bt = upload(&ctx, &b, SHAPE, "b");
    let sum = Tensor::zeros(&ctx, shape(SHAPE), "sum").unwrap();
    let twice = Tensor::zeros(&ctx, shape(SHAPE), "twice").unwrap();
    let scaled = Tensor::zeros(&ctx, shape(SHAPE), "scaled").unwrap();
    let acc = upload(&ctx, &b, SHAPE, "acc");
    let ax = upload(&ctx, &b, SHAPE, "ax");
    let ax_self = upload(&ctx, &a, SHAPE, "ax_self");
    let in_a = upload(&ctx, &a, SHAPE, "in_a");
    let all_same = upload(&ctx, &a, SHAPE, "all_same");
    let sc_self = upload(&ctx, &a, SHAPE, "sc_self");
    let filled = Tensor::zeros(&ctx, shape(SHAPE), "filled").unwrap();
    let neg_inf = Tensor::zeros(&ctx, shape([1, 1, 1, 1, 7]), "neg_inf").unwrap();
    let alpha = -0.37f32;
    let mut rec = ctx.recorder();
    add(&ctx, &mut rec, &at, &bt, &sum).unwrap();
    add(&ctx, &mut rec, &at, &at, &twice).unwrap();
    add(&ctx, &mut rec, &in_a, &bt, &in_a).unwrap();
    add(&ctx, &mut rec, &all_same, &all_same, &all_same).unwrap();
    scale(&ctx, &mut rec, &at, alpha, &scaled).unwrap();
    scale(&ctx, &mut rec, &sc_self, alpha, &sc_self).unwrap();
    add_assign(&ctx, &mut rec, &acc, &at).unwrap();
    add_assign(&ctx, &mut rec, &acc, &at).unwrap();
    axpy(&ctx, &mut rec, alpha, &at, &ax).unwrap();
    axpy(&ctx, &mut rec, alpha, &ax_self, &ax_self).unwrap();
    fill(&ctx, &mut rec, &filled, 0.25).unwrap();
    fill(&ctx, &mut rec, &neg_inf, f32::NEG_INFINITY).unwrap();
    ctx.submit(rec);
    let al = f64::from(alpha);
    let want_sum = to32(&add_f64(&a64, &b64));
    let check = |t: &Tensor, want: &[f64], what: &str| {
        assert_close(&t.to_vec(&ctx).unwrap(), &to32(want), RTOL, ATOL, what);
    };
    assert_close(&sum.to_vec(&ctx).unwrap(), &want_sum, RTOL, ATOL, "add");
    check(&twice, &add_f64(&a64, &a64), "add a + a");
    check(&in_a, &add_f64(&a64, &b64), "add into a");
    check(&all_same, &scale_f64(&a64, 2.0), "add a + a into a");
    check(&scaled, &scale_f64(&a64, al), "scale");
    check(&sc_self, &scale_f64(&a64, al), "scale in place");
    check(
        &acc,
        &add_f64(&add_f64(&b64, &a64), &a64),
        "add_assign twice",
    );
    check(&ax, &axpy_f64(al, &a64, &b64), "axpy");
    check(&ax_self, &axpy_f64(al, &a64, &a64), "axpy x = y");
    assert!(filled.to_vec(&ctx).unwrap().iter().all(|&v| v == 0.25));
    assert!(neg_inf
        .to_vec(&ctx)
        .unwrap()
        .iter()
        .all(|&v| v == f32::NEG_INFINITY));
}

#[test]
fn concat_by_copy_channels_and_its_backward_match_cpu() {
    let ctx = gpu();
    // Three inputs of 2, 3 and 1 channels concatenated into 6 channels (DenseNet).
    let sizes = [2usize, 3, 1];
    let ins: Vec<Array5<f32>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &c)| random([2, c, 3, 5, 4], 20 + i as u64))
        .collect();
    let in_t: Vec<Tensor> = ins
        .iter()
        .enumerate()
        .map(|(i, a)| Tensor::from_array(&ctx, a, &format!("in{i}")).unwrap())
        .collect();
    let cat_shape = [2, 6, 3, 5, 4];
    let cat = Tensor::zeros(&ctx, shape(cat_shape), "cat").unwrap();
    let mut rec = ctx.recorder();
    let mut off = 0;
    for t in &in_t {
        let c = t.shape().c();
        copy_channels(&ctx, &mut rec, t.all(), cat.channels(off, c).unwrap()).unwrap();
        off += c;
    }
    ctx.submit(rec);
    let mut want = Array5::<f64>::zeros(cat_shape);
    let mut off = 0;
    for a in &ins {
        let c = a.shape()[1];
        want = copy_channels_f64(&a.mapv(f64::from), 0, &want, off, c);
        off += c;
    }
    assert_close(
        &cat.to_vec(&ctx).unwrap(),
        &want.iter().map(|&v| v as f32).collect::<Vec<_>>(),
        0.0,
        0.0,
        "concat",
    );

    // Backward: slices of the concat gradient, accumulated into existing gradients
    // (add_channels) and copied into fresh ones (copy_channels), plus a partial copy
    // between offsets of two wide tensors that must leave the other channels alone.
    let dcat = random(cat_shape, 30);
    let dcat_t = Tensor::from_array(&ctx, &dcat, "dcat").unwrap();
    let dcat64 = dcat.mapv(f64::from);
    let mut rec = ctx.recorder();
    let mut grads = Vec::new();
    let mut off = 0;
    for (i, &c) in sizes.iter().enumerate() {
        let pre = random([2, c, 3, 5, 4], 40 + i as u64);
        let g = Tensor::from_array(&ctx, &pre, &format!("d_in{i}")).unwrap();
        add_channels(&ctx, &mut rec, dcat_t.channels(off, c).unwrap(), g.all()).unwrap();
        grads.push((pre, g, off, c));
        off += c;
    }
    let wide_pre = random([2, 5, 3, 5, 4], 50);
    let wide = Tensor::from_array(&ctx, &wide_pre, "wide").unwrap();
    copy_channels(
        &ctx,
        &mut rec,
        dcat_t.channels(3, 2).unwrap(),
        wide.channels(1, 2).unwrap(),
    )
    .unwrap();
    ctx.submit(rec);
    for (pre, g, off, c) in &grads {
        let want = add_channels_f64(&dcat64, *off, &pre.mapv(f64::from), 0, *c);
        assert_close(
            &g.to_vec(&ctx).unwrap(),
            &want.iter().map(|&v| v as f32).collect::<Vec<_>>(),
            RTOL,
            ATOL,
            &format!("add_channels slice at {off}"),
        );
    }
    let want = copy_channels_f64(&dcat64, 3, &wide_pre.mapv(f64::from), 1, 2);
    assert_close(
        &wide.to_vec(&ctx).unwrap(),
        &want.iter().map(|&v| v as f32).collect::<Vec<_>>(),
        0.0,
        0.0,
        "copy between channel offsets",
    );
}

#[test]
fn dropout_matches_cpu_mask_bit_for_bit() {
    let ctx = gpu();
    let n = numel(SHAPE);
    let x = uniform(n, -1.0, 1.0, 5);
    let dy = uniform(n, -1.0, 1.0, 6);
    for &(p, seed) in &[(0.0f32, 1u32), (0.3, 7), (0.5, 0xDEAD_BEEF), (0.9, 3)] {
        let xt = upload(&ctx, &x, SHAPE, "x");
        let dyt = upload(&ctx, &dy, SHAPE, "dy");
        let y = Tensor::zeros(&ctx, shape(SHAPE), "y").unwrap();
        let dx = Tensor::zeros(&ctx, shape(SHAPE), "dx").unwrap();
        let inplace = upload(&ctx, &x, SHAPE, "inplace");
        let mut rec = ctx.recorder();
        dropout_forward(&ctx, &mut rec, &xt, &y, p, seed).unwrap();
        dropout_backward(&ctx, &mut rec, &dyt, &dx, p, seed).unwrap();
        dropout_forward(&ctx, &mut rec, &inplace, &inplace, p, seed).unwrap();
        ctx.submit(rec);
        let want_y = dropout_forward_f64(&to64(&x), p, seed);
        let want_dx = dropout_backward_f64(&to64(&dy), p, seed);
        let got_y = y.to_vec(&ctx).unwrap();
        let got_dx = dx.to_vec(&ctx).unwrap();
        let what = format!("dropout p={p} seed={seed}");
        assert_close(&got_y, &to32(&want_y), RTOL, ATOL, &what);
        assert_close(&got_dx, &to32(&want_dx), RTOL, ATOL, &format!("{what} dx"));
        assert_close(
            &inplace.to_vec(&ctx).unwrap(),
            &to32(&want_y),
            RTOL,
            ATOL,
            &format!("{what} in place"),
        );
        // The masks themselves, exactly (x and dy are never exactly 0 here).
        for i in 0..n {
            let keep = dropout_keeps(seed, i as u32, p);
            assert_eq!(got_y[i] != 0.0, keep, "{what}: forward mask at {i}");
            assert_eq!(got_dx[i] != 0.0, keep, "{what}: backward mask at {i}");
        }
    }
}

#[test]
fn dropout_keeps_about_one_minus_p_and_seeds_matter() {
    let ctx = gpu();
    // 2 x 4 x 16 x 16 x 32 = 65536 ones: y is exactly 1/(1-p) or 0.
    let s = [2, 4, 16, 16, 32];
    let n = numel(s);
    let ones = upload(&ctx, &vec![1.0; n], s, "ones");
    let p = 0.3f32;
    let masks: Vec<Vec<bool>> = [11u32, 11, 12]
        .iter()
        .map(|&seed| {
            let y = Tensor::zeros(&ctx, shape(s), "y").unwrap();
            let mut rec = ctx.recorder();
            dropout_forward(&ctx, &mut rec, &ones, &y, p, seed).unwrap();
            ctx.submit(rec);
            let v = y.to_vec(&ctx).unwrap();
            let kept = (1.0 / (1.0 - f64::from(p))) as f32;
            assert!(
                v.iter().all(|&e| e == 0.0 || e == kept),
                "values 0 or 1/(1-p)"
            );
            v.iter().map(|&e| e != 0.0).collect()
        })
        .collect();
    // Kept fraction: Binomial(n, 1 - p) / n has std sqrt(p(1-p)/n) = 0.0018; allow 5 std.
    let frac = masks[0].iter().filter(|&&k| k).count() as f64 / n as f64;
    let std = (f64::from(p) * (1.0 - f64::from(p)) / n as f64).sqrt();
    assert!(
        (frac - 0.7).abs() <= 5.0 * std,
        "kept fraction {frac} vs 0.7 ± {}",
        5.0 * std
    );
    assert_eq!(masks[0], masks[1], "same seed, same mask");
    // Independent masks differ on a fraction 2p(1-p) = 0.42 of elements; require > 0.3.
    let differ = masks[0]
        .iter()
        .zip(&masks[2])
        .filter(|(a, b)| a != b)
        .count() as f64
        / n as f64;
    assert!(differ > 0.3, "seeds 11 and 12 differ on only {differ}");
    // Neighbouring seeds/indices must not give shifted copies of one stream.
    assert_ne!(dropout_hash(11, 1), dropout_hash(12, 0));
}

#[test]
fn reductions_max_mean_sum_all_match_cpu() {
    let ctx = gpu();
    let (rows, len) = (7usize, 37usize);
    let src = uniform(rows * len, -1.0, 1.0, 60);
    let st = upload(&ctx, &src, [1, 1, 1, rows, len], "src");
    let mx = Tensor::zeros(&ctx, shape([1, 1, 1, 1, rows]), "max").unwrap();
    let mn = Tensor::zeros(&ctx, shape([1, 1, 1, 1, rows]), "mean").unwrap();
    let mut rec = ctx.recorder();
    max_rows(&ctx, &mut rec, &st, rows, len, &mx).unwrap();
    mean_rows(&ctx, &mut rec, &st, rows, len, &mn).unwrap();
    ctx.submit(rec);
    let s64 = to64(&src);
    assert_close(
        &mx.to_vec(&ctx).unwrap(),
        &to32(&max_rows_f64(&s64, rows, len)),
        0.0,
        0.0,
        "max_rows",
    );
    assert_close(
        &mn.to_vec(&ctx).unwrap(),
        &to32(&mean_rows_f64(&s64, rows, len)),
        ROW_RTOL,
        ROW_ATOL,
        "mean_rows",
    );

    // sum_all: one block, one partial block, two passes, and three passes.
    for (i, &n) in [
        1usize,
        SUM_ALL_BLOCK - 1,
        SUM_ALL_BLOCK + 1,
        numel(SHAPE),
        70_001,
        SUM_ALL_BLOCK * SUM_ALL_BLOCK + 5,
    ]
    .iter()
    .enumerate()
    {
        let data = uniform(n, -1.0, 1.0, 70 + i as u64);
        let t = upload(&ctx, &data, [1, 1, 1, 1, n], "data");
        let d1 = Tensor::zeros(&ctx, shape([1, 1, 1, 1, 1]), "total").unwrap();
        let d2 = Tensor::zeros(&ctx, shape([1, 1, 1, 1, 1]), "total again").unwrap();
        let mut rec = ctx.recorder();
        sum_all(&ctx, &mut rec, &t, &d1).unwrap();
        sum_all(&ctx, &mut rec, &t, &d2).unwrap();
        ctx.submit(rec);
        let got = d1.to_vec(&ctx).unwrap()[0];
        let again = d2.to_vec(&ctx).unwrap()[0];
        assert_eq!(got.to_bits(), again.to_bits(), "sum_all is deterministic");
        let d64 = to64(&data);
        let want = sum_all_f64(&d64);
        let abs: f64 = d64.iter().map(|v| v.abs()).sum();
        assert!(
            (f64::from(got) - want).abs() <= SUM_ALL_REL_TO_ABS_SUM * abs,
            "sum_all of {n}: gpu {got} vs cpu {want}"
        );
    }

    // A tensor whose sum is exact in f32: integers.
    let ints: Vec<f32> = (0..3003).map(|i| (i % 17) as f32 - 8.0).collect();
    let t = upload(&ctx, &ints, [3, 1, 1, 1, 1001], "ints");
    let d = Tensor::zeros(&ctx, shape([1, 1, 1, 1, 1]), "total").unwrap();
    let mut rec = ctx.recorder();
    sum_all(&ctx, &mut rec, &t, &d).unwrap();
    ctx.submit(rec);
    let want: f64 = ints.iter().map(|&v| f64::from(v)).sum();
    assert_eq!(
        f64::from(d.to_vec(&ctx).unwrap()[0]),
        want,
        "integer sum exact"
    );
}

// ---- finite differences (f64, CPU references) -----------------------------------------

/// Graph inputs: x, and random a, b, r of length n; z = a ⊙ x + b.
struct Graph {
    x: Vec<f64>,
    a: Vec<f64>,
    b: Vec<f64>,
    r: Vec<f64>,
}

impl Graph {
    /// `z` spread over [lo, hi), kept at least 0.01 away from each kink.
    fn new(n: usize, lo: f64, hi: f64, kinks: &[f64], seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let mut v = |lo: f64, hi: f64| -> Vec<f64> {
            (0..n).map(|_| lo + (hi - lo) * rng.uniform()).collect()
        };
        let x = v(-1.0, 1.0);
        let a = v(0.5, 1.5);
        let mut b = v(lo, hi);
        let r = v(-1.0, 1.0);
        for i in 0..n {
            while kinks.iter().any(|&k| (a[i] * x[i] + b[i] - k).abs() < 0.01) {
                b[i] += 0.05;
            }
        }
        Self { x, a, b, r }
    }

    fn z(&self, x: &[f64]) -> Vec<f64> {
        (0..x.len()).map(|i| self.a[i] * x[i] + self.b[i]).collect()
    }

    fn loss(&self, y: &[f64]) -> f64 {
        y.iter().zip(&self.r).map(|(y, r)| y * r).sum()
    }

    /// Checks `dx = a ⊙ back(r, z)` against central differences of `Σ r ⊙ op(z(x))`.
    fn check(
        &self,
        what: &str,
        op: impl Fn(&[f64]) -> Vec<f64>,
        back: impl Fn(&[f64], &[f64]) -> Vec<f64>,
    ) {
        let z = self.z(&self.x);
        let dz = back(&self.r, &z);
        for i in 0..self.x.len() {
            let analytic = self.a[i] * dz[i];
            let (mut xp, mut xm) = (self.x.clone(), self.x.clone());
            xp[i] += FD_H;
            xm[i] -= FD_H;
            let fd = (self.loss(&op(&self.z(&xp))) - self.loss(&op(&self.z(&xm)))) / (2.0 * FD_H);
            assert!(
                (fd - analytic).abs() <= FD_TOL * (1.0 + fd.abs()),
                "{what}: dx[{i}] fd {fd} vs analytic {analytic}"
            );
        }
    }
}

#[test]
fn cpu_backward_references_pass_finite_differences() {
    let n = 60;
    let g = Graph::new(n, -2.0, 2.0, &[0.0], 1);
    // ReLU backward from the saved output y (what autodiff passes) and from z.
    g.check("relu (from y)", relu_forward_f64, |dy, z| {
        relu_backward_f64(&relu_forward_f64(z), dy)
    });
    g.check("relu (from x)", relu_forward_f64, |dy, z| {
        relu_backward_f64(z, dy)
    });
    let g6 = Graph::new(n, -2.0, 8.0, &[0.0, 6.0], 2);
    g6.check("relu6", relu6_forward_f64, |dy, z| {
        relu6_backward_f64(z, dy)
    });
    for &(p, seed) in &[(0.0f32, 4u32), (0.4, 5)] {
        g.check(
            &format!("dropout p={p}"),
            |z| dropout_forward_f64(z, p, seed),
            |dy, _| dropout_backward_f64(dy, p, seed),
        );
    }
    let alpha = -1.7;
    g.check(
        "scale",
        |z| scale_f64(z, alpha),
        |dy, _| scale_f64(dy, alpha),
    );
    // add: out = z + w(const); backward passes dy to both inputs unchanged.
    let w: Vec<f64> = Rng::new(3)
        .vec_f32(n, -1.0, 1.0)
        .iter()
        .map(|&v| f64::from(v))
        .collect();
    g.check("add (first input)", |z| add_f64(z, &w), |dy, _| dy.to_vec());
    g.check(
        "add (second input)",
        |z| add_f64(&w, z),
        |dy, _| dy.to_vec(),
    );
    // axpy: y_new = y + alpha z, dL/dz = alpha dy.
    g.check(
        "axpy",
        |z| axpy_f64(alpha, z, &w),
        |dy, _| scale_f64(dy, alpha),
    );

    // Channel concat: x (2 channels) goes into channels 1..3 of a 4-channel tensor
    // whose other channels are constants; the backward is the slice copied back out,
    // and add_channels' backward w.r.t. its source is the same slice.
    let xs = [2usize, 2, 1, 3, 5];
    let cat_s = [2usize, 4, 1, 3, 5];
    let m: usize = xs.iter().product();
    let gc = Graph::new(m, -1.0, 1.0, &[], 6);
    let base = random(cat_s, 7).mapv(f64::from);
    let rc: Vec<f64> = random(cat_s, 8).iter().map(|&v| f64::from(v)).collect();
    let as5 = |v: &[f64], s: [usize; 5]| Array5::from_shape_vec(s, v.to_vec()).unwrap();
    for (what, op) in [
        (
            "copy_channels",
            copy_channels_f64 as fn(&_, _, &_, _, _) -> _,
        ),
        ("add_channels", add_channels_f64),
    ] {
        let loss = |x: &[f64]| -> f64 {
            let cat = op(&as5(&gc.z(x), xs), 0, &base, 1, 2);
            cat.iter().zip(&rc).map(|(c, r)| c * r).sum()
        };
        let dcat = as5(&rc, cat_s);
        let dz = copy_channels_f64(&dcat, 1, &Array5::zeros(xs), 0, 2);
        for (i, &dzi) in dz.iter().enumerate() {
            let analytic = gc.a[i] * dzi;
            let (mut xp, mut xm) = (gc.x.clone(), gc.x.clone());
            xp[i] += FD_H;
            xm[i] -= FD_H;
            let fd = (loss(&xp) - loss(&xm)) / (2.0 * FD_H);
            assert!(
                (fd - analytic).abs() <= FD_TOL * (1.0 + fd.abs()),
                "{what}: dx[{i}] fd {fd} vs analytic {analytic}"
            );
        }
    }
}

// ---- bad input ------------------------------------------------------------------------

fn err_of(r: masnet_wgpu::Result<()>) -> String {
    r.expect_err("expected an error").to_string()
}

#[test]
fn bad_input_is_an_error_naming_the_problem() {
    let ctx = gpu();
    let t = |s: [usize; 5], name: &str| Tensor::zeros(&ctx, shape(s), name).unwrap();
    let x = t([2, 3, 4, 4, 4], "x");
    let y = t([2, 3, 4, 4, 4], "y");
    let odd = t([2, 3, 4, 4, 5], "odd");
    let mut rec = ctx.recorder();

    let e = err_of(relu_forward(&ctx, &mut rec, &x, &odd));
    assert!(
        e.contains("'x'") && e.contains("'odd'") && e.contains("do not match"),
        "{e}"
    );
    let e = err_of(relu6_backward(&ctx, &mut rec, &x, &odd, &y));
    assert!(e.contains("'odd'"), "{e}");
    let e = err_of(relu_backward(&ctx, &mut rec, &y, &x, &y));
    assert!(e.contains("must not be the saved tensor"), "{e}");
    let e = err_of(add(&ctx, &mut rec, &x, &y, &odd));
    assert!(e.contains("add") && e.contains("'odd'"), "{e}");
    let e = err_of(add_assign(&ctx, &mut rec, &odd, &x));
    assert!(e.contains("add_assign"), "{e}");
    let e = err_of(scale(&ctx, &mut rec, &x, f32::NAN, &y));
    assert!(e.contains("alpha must be finite"), "{e}");
    let e = err_of(axpy(&ctx, &mut rec, f32::INFINITY, &x, &y));
    assert!(e.contains("axpy") && e.contains("finite"), "{e}");

    for p in [1.0f32, -0.1, f32::NAN, 1.5] {
        let e = err_of(dropout_forward(&ctx, &mut rec, &x, &y, p, 1));
        assert!(e.contains("outside [0, 1)"), "p = {p}: {e}");
        let e = err_of(dropout_backward(&ctx, &mut rec, &x, &y, p, 1));
        assert!(e.contains("dropout_backward"), "p = {p}: {e}");
    }
    let e = err_of(dropout_forward(&ctx, &mut rec, &x, &odd, 0.5, 1));
    assert!(e.contains("'odd'"), "{e}");

    // Channel ops.
    let wide = t([2, 5, 4, 4, 4], "wide");
    let other_n = t([1, 3, 4, 4, 4], "other_n");
    let e = err_of(copy_channels(
        &ctx,
        &mut rec,
        x.all(),
        wide.channels(0, 2).unwrap(),
    ));
    assert!(
        e.contains("3 channels of 'x'") && e.contains("2 channels of 'wide'"),
        "{e}"
    );
    let e = err_of(copy_channels(&ctx, &mut rec, other_n.all(), x.all()));
    assert!(e.contains("'other_n'") && e.contains("do not match"), "{e}");
    let e = err_of(add_channels(&ctx, &mut rec, odd.all(), x.all()));
    assert!(e.contains("add_channels") && e.contains("'odd'"), "{e}");
    let e = err_of(copy_channels(
        &ctx,
        &mut rec,
        wide.channels(0, 2).unwrap(),
        wide.channels(2, 2).unwrap(),
    ));
    assert!(e.contains("same tensor 'wide'"), "{e}");
    let outside = ChannelSlice {
        tensor: &x,
        offset: 2,
        count: 2,
    };
    let e = err_of(copy_channels(
        &ctx,
        &mut rec,
        outside,
        wide.channels(0, 2).unwrap(),
    ));
    assert!(
        e.contains("source channel range 2..4 is outside 'x'"),
        "{e}"
    );
    let empty = ChannelSlice {
        tensor: &wide,
        offset: 0,
        count: 0,
    };
    let e = err_of(add_channels(
        &ctx,
        &mut rec,
        x.channels(0, 1).unwrap(),
        empty,
    ));
    assert!(e.contains("destination channel range 0..0"), "{e}");

    // Reductions.
    let flat_t = t([1, 1, 1, 1, 10], "flat");
    let e = err_of(max_rows(&ctx, &mut rec, &x, 3, 0, &flat_t));
    assert!(e.contains("max_rows") && e.contains("0 values"), "{e}");
    let e = err_of(mean_rows(&ctx, &mut rec, &flat_t, 4, 5, &x));
    assert!(e.contains("too small"), "{e}");
    let e = err_of(max_rows(&ctx, &mut rec, &x, 2, 4, &x));
    assert!(e.contains("same tensor"), "{e}");
    let e = err_of(sum_all(&ctx, &mut rec, &x, &x));
    assert!(e.contains("sum_all") && e.contains("'x'"), "{e}");
    drop(rec);
    ctx.check("after errors").unwrap();
}

#[test]
fn dropout_masks_of_cpu_reference_are_statistically_sound() {
    // CPU only, many seeds: per-seed kept fraction over 4096 elements stays within 5 std.
    let n = 4096u32;
    for p in [0.1f32, 0.5, 0.8] {
        let std = (f64::from(p) * (1.0 - f64::from(p)) / f64::from(n)).sqrt();
        for seed in 0..50u32 {
            let kept = (0..n).filter(|&i| dropout_keeps(seed, i, p)).count() as f64;
            let frac = kept / f64::from(n);
            assert!(
                (frac - (1.0 - f64::from(p))).abs() <= 5.0 * std,
                "p={p} seed={seed}: kept {frac}"
            );
        }
    }
}

#[test]
fn count_non_finite_matches_cpu_on_every_pass_count() {
    use masnet_wgpu::ops::reduce::{count_non_finite, count_non_finite_cpu};
    let ctx = gpu();
    for (len, seed) in [(1usize, 1u64), (1000, 2), (5000, 3), (1024 * 1024 + 7, 4)] {
        let mut rng = Rng::new(seed);
        let mut v = rng.vec_f32(len, -1.0, 1.0);
        // Plant NaN, +Inf, -Inf and a subnormal (finite) at random places.
        for (k, bad) in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e-40]
            .iter()
            .enumerate()
        {
            if k < len {
                let i = rng.below(len);
                v[i] = *bad;
            }
        }
        let t = Tensor::from_slice(&ctx, Shape5::new(1, 1, 1, 1, len), &v, "t").unwrap();
        let out = Tensor::empty(&ctx, Shape5::new(1, 1, 1, 1, 1), "count").unwrap();
        let mut rec = ctx.recorder();
        count_non_finite(&ctx, &mut rec, &t, &out).unwrap();
        ctx.submit(rec);
        let got = out.to_vec(&ctx).unwrap()[0];
        assert_eq!(got as usize, count_non_finite_cpu(&v), "length {len}");
    }
}
