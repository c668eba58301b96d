//! NLU-Net (non-local U-Net): parameter counts (baseline = the authors' release,
//! MixACB, every inference form), the global aggregation block against an f64 CPU
//! reference and finite differences, forward shapes and input errors, a few training
//! steps on the GPU, and equivalence of the eval-mode training graph with every
//! converted form.

mod common;

use common::gpu;
use masnet_wgpu::autograd::{Graph, Mode, ParamStore, Var};
use masnet_wgpu::nn::layers::Builder;
use masnet_wgpu::nn::nlunet::{GlobalAggregation, Nlunet, NlunetConfig, Query};
use masnet_wgpu::nn::{BlockKind, ModelForm, Network};
use masnet_wgpu::ops::adam::AdamConfig;
use masnet_wgpu::ops::batchnorm::BatchNormSpec;
use masnet_wgpu::optim::Adam;
use masnet_wgpu::rng::Rng;
use masnet_wgpu::{GpuContext, Shape5, Tensor};
use std::time::Instant;

fn config(block: BlockKind) -> NlunetConfig {
    NlunetConfig {
        block,
        ..NlunetConfig::default()
    }
}

const FORMS: [ModelForm; 4] = [
    ModelForm::Fused,
    ModelForm::FusedMerged,
    ModelForm::Folded,
    ModelForm::FoldedMerged,
];

#[test]
fn parameter_counts() {
    let ctx = gpu();
    // (kind, form) -> (trainable, total).
    // Baseline = the authors' release (bias-free convs): 1,760,452 trainable, also
    // counted by hand layer by layer (docs/models/nlunet.md). Folding the 5 conv+BN
    // slots (320 channels) trades 4 BN scalars per channel for 1 bias.
    let want = [
        (BlockKind::Conv, None, (1_760_452, 1_762_116)),
        (
            BlockKind::Conv,
            Some(ModelForm::Fused),
            (1_760_452, 1_762_116),
        ),
        (
            BlockKind::Conv,
            Some(ModelForm::Folded),
            (1_760_132, 1_761_156),
        ),
        (BlockKind::Mixacb, None, (2_447_684, 2_453_828)),
        (
            BlockKind::Mixacb,
            Some(ModelForm::Fused),
            (1_588_420, 1_589_444),
        ),
        (
            BlockKind::Mixacb,
            Some(ModelForm::FusedMerged),
            (5_975_236, 5_976_260),
        ),
        (
            BlockKind::Mixacb,
            Some(ModelForm::Folded),
            (1_588_420, 1_589_444),
        ),
        (
            BlockKind::Mixacb,
            Some(ModelForm::FoldedMerged),
            (5_975_236, 5_976_260),
        ),
    ];
    for (kind, form, expected) in want {
        let mut s = ParamStore::new();
        let m = Nlunet::new(&ctx, &mut s, config(kind), 1).unwrap();
        let got = match form {
            None => common::counts(&s),
            Some(f) => {
                let (fm, fs) = m.convert(&ctx, &s, f).unwrap();
                assert_eq!(fm.form(), f);
                common::counts(&fs)
            }
        };
        eprintln!(
            "NLU-Net {kind:?} {form:?}: trainable {}, total {}",
            got.0, got.1
        );
        assert_eq!(got, expected, "{kind:?} {form:?} (trainable, total)");
    }
}

/// `[N, C, P]` channel-major values of a `[N, C, D, H, W]` tensor.
fn as_ncp(v: &[f32], n: usize, c: usize) -> Vec<Vec<Vec<f64>>> {
    let p = v.len() / n / c;
    (0..n)
        .map(|i| {
            (0..c)
                .map(|ch| (0..p).map(|j| v[(i * c + ch) * p + j] as f64).collect())
                .collect()
        })
        .collect()
}

/// A 1×1×1 conv with bias on `[N, Cin, P]`.
fn pointwise_f64(x: &[Vec<Vec<f64>>], w: &[f32], b: &[f32]) -> Vec<Vec<Vec<f64>>> {
    let cin = x[0].len();
    let cout = b.len();
    x.iter()
        .map(|xs| {
            (0..cout)
                .map(|o| {
                    (0..xs[0].len())
                        .map(|j| {
                            b[o] as f64
                                + (0..cin)
                                    .map(|i| w[o * cin + i] as f64 * xs[i][j])
                                    .sum::<f64>()
                        })
                        .collect()
                })
                .collect()
        })
        .collect()
}

/// Multi-head attention written out: head `h` owns channels `h·d .. (h+1)·d` of q, k
/// and v; `o[c][i] = Σ_j softmax_j(Σ_e q[e][i] k[e][j] / √d_k) v[c][j]`.
fn attention_f64(
    q: &[Vec<Vec<f64>>],
    k: &[Vec<Vec<f64>>],
    v: &[Vec<Vec<f64>>],
    heads: usize,
) -> Vec<Vec<Vec<f64>>> {
    let (dk, dv) = (q[0].len() / heads, v[0].len() / heads);
    let (pq, pk) = (q[0][0].len(), k[0][0].len());
    let mut out = vec![vec![vec![0.0; pq]; v[0].len()]; q.len()];
    for n in 0..q.len() {
        for h in 0..heads {
            for i in 0..pq {
                let logits: Vec<f64> = (0..pk)
                    .map(|j| {
                        (0..dk)
                            .map(|e| q[n][h * dk + e][i] * k[n][h * dk + e][j])
                            .sum::<f64>()
                            / (dk as f64).sqrt()
                    })
                    .collect();
                let max = logits.iter().cloned().fold(f64::MIN, f64::max);
                let ex: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
                let z: f64 = ex.iter().sum();
                for c in 0..dv {
                    out[n][h * dv + c][i] = (0..pk).map(|j| ex[j] / z * v[n][h * dv + c][j]).sum();
                }
            }
        }
    }
    out
}

#[test]
fn global_aggregation_matches_the_f64_reference() {
    let ctx = gpu();
    // (up-sampling query, heads): size-preserving with 2 heads, up-sampling with 1.
    for (up, heads) in [(false, 2), (true, 1), (true, 2)] {
        let (n, cin, key, value, out) = (2, 6, 4, 6, 5);
        let xs = Shape5::new(n, cin, 2, 3, 2);
        let mut store = ParamStore::new();
        let mut rng = Rng::new(40 + heads as u64);
        let ga = GlobalAggregation::new(
            &mut Builder::new(&ctx, &mut store, &mut rng).sub("ga"),
            cin,
            key,
            value,
            out,
            heads,
            up,
        )
        .unwrap();
        // Non-zero biases so that every bias is exercised.
        for (id, e) in store.iter() {
            if e.name.ends_with("bias") {
                let len = e.value.shape().numel().unwrap();
                store
                    .set(&ctx, id, &Rng::new(id.0 as u64).vec_f32(len, -0.3, 0.3))
                    .unwrap();
            }
        }
        let x = Rng::new(7).vec_f32(xs.numel().unwrap(), -1.0, 1.0);
        let mut g = Graph::no_grad(&ctx, Mode::Eval);
        let xv = g.input(Tensor::from_slice(&ctx, xs, &x, "x").unwrap());
        let y = ga.forward(&mut g, &store, xv, 0.5, 1).unwrap();
        // The query as the GPU computes it (a transposed conv for the up-sampling block:
        // tested on its own elsewhere); everything after it is checked here.
        let qv = match &ga.query {
            Query::Same(c) => c.forward(&mut g, &store, xv).unwrap(),
            Query::Up(t) => t.forward(&mut g, &store, xv).unwrap(),
        };
        g.submit();
        let ys = g.value(y).unwrap().shape();
        let got = g.value(y).unwrap().to_vec(&ctx).unwrap();
        let qt = g.value(qv).unwrap();
        let qshape = qt.shape();
        let e = if up { [4, 6, 4] } else { [2, 3, 2] };
        assert_eq!(ys, Shape5::new(n, out, e[0], e[1], e[2]));
        let read = |id| store.read(&ctx, id).unwrap();
        let xr = as_ncp(&x, n, cin);
        let q = match &ga.query {
            Query::Same(c) => pointwise_f64(&xr, &read(c.weight), &read(c.bias.unwrap())),
            Query::Up(_) => as_ncp(&qt.to_vec(&ctx).unwrap(), n, qshape.c()),
        };
        let k = pointwise_f64(&xr, &read(ga.key.weight), &read(ga.key.bias.unwrap()));
        let v = pointwise_f64(&xr, &read(ga.value.weight), &read(ga.value.bias.unwrap()));
        let o = attention_f64(&q, &k, &v, heads);
        let want = pointwise_f64(&o, &read(ga.out.weight), &read(ga.out.bias.unwrap()));
        let want: Vec<f32> = want
            .into_iter()
            .flatten()
            .flatten()
            .map(|v| v as f32)
            .collect();
        // f32 matmuls of length <= 48 and a softmax over <= 12 positions.
        common::assert_close(&got, &want, 1e-4, 1e-5, &format!("up {up} heads {heads}"));
    }
}

#[test]
fn global_aggregation_gradients_match_directional_finite_differences() {
    let ctx = gpu();
    for up in [false, true] {
        let mut store = ParamStore::new();
        let mut rng = Rng::new(50);
        let ga = GlobalAggregation::new(
            &mut Builder::new(&ctx, &mut store, &mut rng).sub("ga"),
            5,
            4,
            6,
            3,
            2,
            up,
        )
        .unwrap();
        let xs = Shape5::new(2, 5, 2, 2, 3);
        let x0 = Rng::new(51).vec_f32(xs.numel().unwrap(), -1.0, 1.0);
        let rlen = 2 * 3 * xs.voxels() * if up { 8 } else { 1 };
        let r = Rng::new(52).vec_f32(rlen, -1.0, 1.0);
        // L = Σ r ⊙ GA(x), attention dropout active but with a fixed mask.
        let eval = |x: &[f32], grad: bool| -> (f64, Vec<f32>) {
            let mut g = Graph::new(&ctx, Mode::Train);
            let xv = g.variable(Tensor::from_slice(&ctx, xs, x, "x").unwrap());
            let y = ga.forward(&mut g, &store, xv, 0.25, 9).unwrap();
            let ys = g.value(y).unwrap().shape();
            let flat = Shape5::new(1, 1, 1, 1, ys.numel().unwrap());
            let rv = g.input(Tensor::from_slice(&ctx, flat, &r, "r").unwrap());
            let yf = g.reshape(y, flat).unwrap();
            let l = g.batched_matmul(yf, rv, false, true).unwrap();
            if grad {
                g.backward(l).unwrap();
            }
            g.submit();
            let lv = g.value(l).unwrap().to_vec(&ctx).unwrap()[0] as f64;
            let gx = if grad {
                g.grad(xv).unwrap().to_vec(&ctx).unwrap()
            } else {
                vec![]
            };
            (lv, gx)
        };
        let (_, gx) = eval(&x0, true);
        let mut rng = Rng::new(53);
        let h = 1e-2f32;
        for trial in 0..3 {
            let u = rng.vec_f32(x0.len(), -1.0, 1.0);
            let sh = |s: f32| -> Vec<f32> { x0.iter().zip(&u).map(|(a, b)| a + s * b).collect() };
            let fd = (eval(&sh(h), false).0 - eval(&sh(-h), false).0) / (2.0 * h as f64);
            let an: f64 = gx.iter().zip(&u).map(|(a, b)| *a as f64 * *b as f64).sum();
            assert!(
                (fd - an).abs() <= 1e-2 * fd.abs().max(an.abs()) + 1e-3,
                "up {up} trial {trial}: finite difference {fd} vs analytic {an}"
            );
        }
    }
}

#[test]
fn forward_shapes_and_input_errors() {
    let ctx = gpu();
    for kind in [BlockKind::Mixacb, BlockKind::Conv] {
        let mut s = ParamStore::new();
        let m = Nlunet::new(&ctx, &mut s, config(kind), 3).unwrap();
        assert_eq!(m.input_multiple(), 4);
        assert_eq!(m.channels(), (2, 4));
        let run = |shape: Shape5, mode: Mode| {
            let x = Rng::new(4).vec_f32(shape.numel().unwrap(), -1.0, 1.0);
            let mut g = Graph::no_grad(&ctx, mode);
            let xv = g.input(Tensor::from_slice(&ctx, shape, &x, "x").unwrap());
            let y = m
                .forward(&mut g, &s, xv, 0)
                .map(|y| g.value(y).unwrap().shape());
            g.submit();
            y
        };
        // Non-cubic, not powers of two, bottom at 2×3×5 (30 positions).
        for mode in [Mode::Train, Mode::Eval] {
            let y = run(Shape5::new(2, 2, 8, 12, 20), mode).unwrap();
            assert_eq!(y, Shape5::new(2, 4, 8, 12, 20), "{kind:?} {mode:?}");
        }
        let e = run(Shape5::new(1, 2, 8, 10, 8), Mode::Eval).unwrap_err();
        assert!(e.to_string().contains("multiples of 4"), "{e}");
        let e = run(Shape5::new(1, 3, 8, 8, 8), Mode::Eval).unwrap_err();
        assert!(e.to_string().contains("2 channels"), "{e}");
    }
    // Bad configurations are errors, not panics.
    let mut s = ParamStore::new();
    for bad in [
        NlunetConfig {
            bottom_heads: 3,
            ..NlunetConfig::default()
        },
        NlunetConfig {
            levels: 0,
            ..NlunetConfig::default()
        },
        NlunetConfig {
            dropout: 1.0,
            ..NlunetConfig::default()
        },
        NlunetConfig {
            form: ModelForm::Fused,
            ..NlunetConfig::default()
        },
    ] {
        assert!(
            Nlunet::new(&ctx, &mut s, bad.clone(), 1).is_err(),
            "{bad:?}"
        );
    }
}

/// Training patches: 8³ (bottom block at 2³, up-sampling block 64 × 8 positions).
const S: usize = 8;
/// Equivalence test input: 16³.
const SE: usize = 16;
const BATCH: usize = 2;
const STEPS: usize = 12;
/// The mean of the last 3 losses must be below the first divided by this.
const FALL: f64 = 2.0;

/// Two boxes of random size and place in noise, one per input channel; the label says
/// which boxes cover the voxel (0 none, 1 first, 2 second, 3 both).
fn data(seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut rng = Rng::new(seed);
    let mut x = vec![0f32; BATCH * 2 * S * S * S];
    let mut y = vec![0f32; BATCH * S * S * S];
    for n in 0..BATCH {
        let boxes: Vec<([usize; 3], [usize; 3])> = (0..2)
            .map(|_| {
                let lo = [0; 3].map(|_| rng.below(S / 2));
                let hi = lo.map(|l| l + 3 + rng.below(S / 2 - 2));
                (lo, hi)
            })
            .collect();
        for v in 0..S * S * S {
            let p = [v / (S * S), (v / S) % S, v % S];
            let mut label = 0;
            for (c, (lo, hi)) in boxes.iter().enumerate() {
                let inside = (0..3).all(|a| p[a] >= lo[a] && p[a] < hi[a]);
                x[(n * 2 + c) * S * S * S + v] =
                    f32::from(u8::from(inside)) + rng.uniform_f32(-0.5, 0.5);
                label += usize::from(inside) << c;
            }
            y[n * S * S * S + v] = label as f32;
        }
    }
    (x, y)
}

fn train(ctx: &GpuContext, kind: BlockKind) -> Vec<f64> {
    let mut s = ParamStore::new();
    let m = Nlunet::new(ctx, &mut s, config(kind), 11).unwrap();
    let (x, y) = data(12);
    // The release's optimiser: Adam, lr 1e-3, L2 2e-6 on kernels, TF's epsilon.
    let mut adam = Adam::new(AdamConfig {
        lr: 1e-3,
        eps: 1e-8,
        l2: 2e-6,
        ..AdamConfig::default()
    })
    .unwrap();
    let mut losses = Vec::new();
    for step in 0..STEPS {
        let mut g = Graph::new(ctx, Mode::Train);
        let xv = g.input(Tensor::from_slice(ctx, Shape5::new(BATCH, 2, S, S, S), &x, "x").unwrap());
        let yv =
            g.input(Tensor::from_slice(ctx, Shape5::new(BATCH, 1, S, S, S), &y, "labels").unwrap());
        let logits = m.forward(&mut g, &s, xv, step as u32).unwrap();
        let loss = g.softmax_cross_entropy(logits, yv).unwrap();
        let grads = g.backward(loss).unwrap();
        adam.step(ctx, g.recorder(), &s, &grads, 1e-3).unwrap();
        g.submit();
        let l = g.value(loss).unwrap().to_vec(ctx).unwrap()[0] as f64;
        assert!(l.is_finite(), "{kind:?} step {step}: loss {l}");
        losses.push(l);
    }
    losses
}

#[test]
fn training_steps_reduce_the_loss() {
    let ctx = gpu();
    for kind in [BlockKind::Mixacb, BlockKind::Conv] {
        let t = Instant::now();
        let losses = train(&ctx, kind);
        let first = losses[0];
        let last = losses[STEPS - 3..].iter().sum::<f64>() / 3.0;
        eprintln!(
            "{kind:?}: {STEPS} steps in {:.1} s, losses {losses:?}",
            t.elapsed().as_secs_f64()
        );
        assert!(
            last < first / FALL,
            "{kind:?}: loss fell from {first} to {last} only (need / {FALL})"
        );
    }
}

#[test]
fn converted_forms_equal_the_eval_graph() {
    let ctx = gpu();
    let xs = Shape5::new(1, 2, SE, SE, SE);
    let x = Rng::new(21).vec_f32(xs.numel().unwrap(), -1.0, 1.0);
    let input =
        |g: &mut Graph<'_>| -> Var { g.input(Tensor::from_slice(&ctx, xs, &x, "x").unwrap()) };
    for kind in [BlockKind::Mixacb, BlockKind::Conv] {
        let mut s = ParamStore::new();
        let mut m = Nlunet::new(&ctx, &mut s, config(kind), 20).unwrap();
        // Running statistics from one training-mode pass (momentum 0), then perturbed,
        // so that the logits stay in a range where f32 rounding is not the story.
        m.for_each_bn_mut(&mut |bn| bn.spec.momentum = 0.0);
        {
            let mut g = Graph::no_grad(&ctx, Mode::Train);
            let xv = input(&mut g);
            m.forward(&mut g, &s, xv, 0).unwrap();
            g.submit();
            ctx.wait().unwrap();
        }
        m.for_each_bn_mut(&mut |bn| bn.spec = BatchNormSpec::keras());
        common::perturb_bn(&ctx, &s, 22, true);
        let probs = |model: &Nlunet, store: &ParamStore| -> Vec<f32> {
            let mut g = Graph::no_grad(&ctx, Mode::Eval);
            let xv = input(&mut g);
            let logits = model.forward(&mut g, store, xv, 0).unwrap();
            let p = g.softmax_channels(logits).unwrap();
            g.submit();
            p.to_vec(&ctx).unwrap()
        };
        let want = probs(&m, &s);
        for form in FORMS {
            let (fm, fs) = m.convert(&ctx, &s, form).unwrap();
            let d = common::max_abs_diff(&probs(&fm, &fs), &want);
            eprintln!("{kind:?} -> {form:?}: max |diff| of the softmax {d}");
            assert!(
                d <= 1e-4,
                "{kind:?} -> {form:?}: max |diff| of the softmax {d}"
            );
            // A converted model converts again (e.g. a fused checkpoint folded later).
            if form == ModelForm::Fused {
                let (gm, gs) = fm.convert(&ctx, &fs, ModelForm::Folded).unwrap();
                let d = common::max_abs_diff(&probs(&gm, &gs), &want);
                assert!(d <= 1e-4, "{kind:?} -> Fused -> Folded: {d}");
            }
        }
    }
}

/// Inference releases every value after its last use: the no-grad forward's peak is
/// a bounded number of full-resolution 8-channel activations (measured 10.1; a block's
/// own intermediates live until its output exists). Without releases it was 30.1.
#[test]
fn inference_peak_is_a_few_activations() {
    let ctx = gpu();
    let mut s = ParamStore::new();
    let cfg = NlunetConfig {
        features: 8,
        levels: 3,
        ..config(BlockKind::Conv)
    };
    let m = Nlunet::new(&ctx, &mut s, cfg, 8).unwrap();
    let peak = common::inference_peak(&ctx, &m, &s, Shape5::new(1, 2, 16, 16, 16));
    let activation = 8 * 16 * 16 * 16 * 4;
    eprintln!(
        "NLU-Net 16^3 inference peak {peak} B = {:.1} activations",
        peak as f64 / activation as f64
    );
    assert!(peak < 15 * activation, "{peak} B");
}
