//! DU-Net and MixACB: the paper's parameter counts, and equivalence of the eval-mode
//! training graph with the fused forms (per group, merged block-diagonal, all BN
//! folded) on random weights and random BN statistics.

mod common;

use common::gpu;
use masnet_wgpu::autograd::{Graph, Mode, ParamStore};
use masnet_wgpu::nn::layers::Builder;
use masnet_wgpu::nn::{BlockKind, Dunet, DunetConfig, MixAcb, MixSpec, ModelForm};
use masnet_wgpu::ops::batchnorm::BatchNormSpec;
use masnet_wgpu::rng::Rng;
use masnet_wgpu::{Shape5, Tensor};

#[test]
fn parameter_counts_equal_the_papers() {
    let ctx = gpu();
    let mut s = ParamStore::new();
    let cfg = DunetConfig {
        block: BlockKind::Conv,
        ..DunetConfig::default()
    };
    Dunet::new(&ctx, &mut s, cfg, 1).unwrap();
    assert_eq!(s.trainable_count(), 2_492_795, "baseline DU-Net trainable");

    let mut s = ParamStore::new();
    let m = Dunet::new(&ctx, &mut s, DunetConfig::default(), 1).unwrap();
    assert_eq!(
        common::counts(&s),
        (3_109_521, 3_117_549),
        "DU-Net+MixACB training graph"
    );
    let (_, fused) = m.convert(&ctx, &s, ModelForm::Fused).unwrap();
    assert_eq!(
        common::counts(&fused),
        (2_341_141, 2_344_401),
        "DU-Net+MixACB fused"
    );
    let (_, folded) = m.convert(&ctx, &s, ModelForm::Folded).unwrap();
    // Folding removes the 4 scalars per channel of every BN outside MixACB (every such
    // conv already has a bias); the fused model's 3,260 buffer scalars are 2 per channel.
    let bn_scalars = 2 * (2_344_401 - 2_341_141);
    assert_eq!(
        common::counts(&folded),
        (2_344_401 - bn_scalars, 2_344_401 - bn_scalars)
    );
}

#[test]
fn fused_mixacb_equals_the_eval_graph() {
    let ctx = gpu();
    for (stride, cin, cout, size) in [
        (1, 23, 18, [7, 9, 5]),
        (2, 23, 13, [7, 8, 9]),
        (1, 6, 10, [5, 5, 5]),
    ] {
        let mut store = ParamStore::new();
        let mut rng = Rng::new(stride as u64);
        let block = MixAcb::new(
            &mut Builder::new(&ctx, &mut store, &mut rng).sub("m"),
            cin,
            cout,
            stride,
            &MixSpec::default(),
            BatchNormSpec::keras(),
        )
        .unwrap();
        common::perturb_bn(&ctx, &store, 9, false);
        // The block reads channels 2.. of a wider input.
        let xs = Shape5::new(2, cin + 2, size[0], size[1], size[2]);
        let x = Rng::new(3).vec_f32(xs.numel().unwrap(), -1.0, 1.0);
        let run = |store: &ParamStore,
                   f: &dyn Fn(
            &mut Graph<'_>,
            masnet_wgpu::autograd::Var,
        ) -> masnet_wgpu::autograd::Var|
         -> Vec<f32> {
            let mut g = Graph::no_grad(&ctx, Mode::Eval);
            let xv = g.input(Tensor::from_slice(&ctx, xs, &x, "x").unwrap());
            let y = f(&mut g, xv);
            let p = g.softmax_channels(y).unwrap();
            g.submit();
            let _ = store;
            p.to_vec(&ctx).unwrap()
        };
        let want = run(&store, &|g, xv| block.forward(g, &store, xv, 2).unwrap());
        for merge in [false, true] {
            let mut fs = ParamStore::new();
            let mut r = Rng::new(0);
            let fused = block
                .fuse(
                    &ctx,
                    &store,
                    &mut Builder::new(&ctx, &mut fs, &mut r).sub("m"),
                    merge,
                )
                .unwrap();
            let got = run(&fs, &|g, xv| fused.forward(g, &fs, xv, 2).unwrap());
            let d = common::max_abs_diff(&got, &want);
            assert!(
                d <= 1e-4,
                "stride {stride} cin {cin} merge {merge}: max |diff| {d}"
            );
        }
    }
}

#[test]
fn fused_dunet_equals_the_eval_graph_on_a_32_cube() {
    let ctx = gpu();
    let mut s = ParamStore::new();
    let mut m = Dunet::new(&ctx, &mut s, DunetConfig::default(), 5).unwrap();
    let xs = Shape5::new(1, 2, 32, 32, 32);
    let x = Rng::new(7).vec_f32(xs.numel().unwrap(), -1.0, 1.0);
    // Statistics drawn blindly from fixed ranges do not normalise a 40-layer network:
    // its logits reach thousands and f32 rounding alone moves the softmax by 1e-3. So
    // first set every running statistic to the batch statistic of one pass (momentum
    // 0), then perturb them and randomise the affine parameters and biases.
    m.for_each_bn_mut(|bn| bn.spec.momentum = 0.0);
    {
        let mut g = Graph::no_grad(&ctx, Mode::Train);
        let xv = g.input(Tensor::from_slice(&ctx, xs, &x, "x").unwrap());
        m.forward(&mut g, &s, xv, 0).unwrap();
        g.submit();
        ctx.wait().unwrap();
    }
    m.for_each_bn_mut(|bn| bn.spec = BatchNormSpec::keras());
    common::perturb_bn(&ctx, &s, 6, true);
    // `grad`: an eval graph that records backward, where dense blocks concatenate by
    // copying; without it (inference) they are written in place through channel offsets
    // and ReLUs run in the conv epilogues.
    let probs_with = |model: &Dunet, store: &ParamStore, grad: bool| -> Vec<f32> {
        let mut g = if grad {
            Graph::new(&ctx, Mode::Eval)
        } else {
            Graph::no_grad(&ctx, Mode::Eval)
        };
        let xv = g.input(Tensor::from_slice(&ctx, xs, &x, "x").unwrap());
        let logits = model.forward(&mut g, store, xv, 0).unwrap();
        let p = g.softmax_channels(logits).unwrap();
        g.submit();
        p.to_vec(&ctx).unwrap()
    };
    let probs = |model: &Dunet, store: &ParamStore| probs_with(model, store, false);
    let want = probs_with(&m, &s, true);
    let d = common::max_abs_diff(&probs(&m, &s), &want);
    assert!(
        d <= 1e-6,
        "in-place dense blocks: max |diff| of the softmax {d}"
    );
    for form in [
        ModelForm::Fused,
        ModelForm::FusedMerged,
        ModelForm::Folded,
        ModelForm::FoldedMerged,
    ] {
        let (fm, fs) = m.convert(&ctx, &s, form).unwrap();
        let d = common::max_abs_diff(&probs(&fm, &fs), &want);
        eprintln!("{form:?}: max |diff| of the softmax {d}");
        assert!(d <= 1e-4, "{form:?}: max |diff| of the softmax {d}");
    }
}

#[test]
fn mixacb_training_gradients_match_directional_finite_differences() {
    let ctx = gpu();
    let mut store = ParamStore::new();
    let mut rng = Rng::new(12);
    let block = MixAcb::new(
        &mut Builder::new(&ctx, &mut store, &mut rng).sub("m"),
        9,
        6,
        2,
        &MixSpec::default(),
        BatchNormSpec::keras(),
    )
    .unwrap();
    common::perturb_bn(&ctx, &store, 13, false);
    let xs = Shape5::new(2, 11, 5, 6, 4);
    let x0 = Rng::new(14).vec_f32(xs.numel().unwrap(), -1.0, 1.0);
    let r = Rng::new(15).vec_f32(2 * 6 * 3 * 3 * 2, -1.0, 1.0);
    // L = sum r * MixACB(x[:, 2..11]) in training mode (batch statistics).
    let eval = |x: &[f32], grad: bool| -> (f64, Vec<f32>) {
        let mut g = Graph::new(&ctx, Mode::Train);
        let xv = g.variable(Tensor::from_slice(&ctx, xs, x, "x").unwrap());
        let y = block.forward(&mut g, &store, xv, 2).unwrap();
        let ys = g.value(y).unwrap().shape();
        let rv = g.input(Tensor::from_slice(&ctx, ys, &r, "r").unwrap());
        let w = Shape5::new(1, 1, 1, 1, ys.numel().unwrap());
        let yf = g.reshape(y, w).unwrap();
        let rf = g.reshape(rv, w).unwrap();
        let l = g.batched_matmul(yf, rf, false, true).unwrap();
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
    // Channels 0..2 are not read: their gradient is exactly zero.
    let vox = 5 * 6 * 4;
    assert!(gx[..2 * vox].iter().all(|&v| v == 0.0));
    let mut rng = Rng::new(16);
    let h = 1e-2f32;
    for trial in 0..3 {
        let u = rng.vec_f32(x0.len(), -1.0, 1.0);
        let sh = |s: f32| -> Vec<f32> { x0.iter().zip(&u).map(|(a, b)| a + s * b).collect() };
        let fd = (eval(&sh(h), false).0 - eval(&sh(-h), false).0) / (2.0 * h as f64);
        let an: f64 = gx.iter().zip(&u).map(|(a, b)| *a as f64 * *b as f64).sum();
        assert!(
            (fd - an).abs() <= 1e-2 * fd.abs().max(an.abs()) + 1e-3,
            "trial {trial}: fd {fd} vs {an}"
        );
    }
}

/// A DU-Net training graph (dense blocks appended into one buffer per block, skips,
/// transposed convs, BN in training mode) has the input gradient of a directional
/// finite difference of its loss. Its many ReLUs make the difference quotient move by a
/// few per cent with the step (0.219-0.225 for h = 1e-2..2e-3 against the gradient's
/// 0.210, which the concatenating graph computed identically), hence 5 %; a missing
/// path through a block's buffer would be off by far more.
#[test]
fn training_graph_input_gradient_matches_finite_differences() {
    let ctx = gpu();
    let mut s = ParamStore::new();
    let cfg = DunetConfig {
        init_features: 4,
        growth: 4,
        layers_per_block: 2,
        bottleneck: 4,
        levels: 1,
        dropout: 0.0,
        ..DunetConfig::default()
    };
    let m = Dunet::new(&ctx, &mut s, cfg, 3).unwrap();
    let xs = Shape5::new(2, 2, 4, 4, 4);
    let mut rng = Rng::new(80);
    let x = rng.vec_f32(xs.numel().unwrap(), -1.0, 1.0);
    let labels: Vec<f32> = (0..2 * 64).map(|_| rng.below(4) as f32).collect();
    let run = |x: &[f32]| -> (f64, Vec<f32>) {
        let mut g = Graph::new(&ctx, Mode::Train);
        let xv = g.variable(Tensor::from_slice(&ctx, xs, x, "x").unwrap());
        let lv = g.input(
            Tensor::from_slice(&ctx, Shape5::new(2, 1, 4, 4, 4), &labels, "labels").unwrap(),
        );
        let logits = m.forward(&mut g, &s, xv, 0).unwrap();
        let l = g.softmax_cross_entropy(logits, lv).unwrap();
        g.backward(l).unwrap();
        g.submit();
        let loss = g.value(l).unwrap().to_vec(&ctx).unwrap()[0] as f64;
        (loss, g.grad(xv).unwrap().to_vec(&ctx).unwrap())
    };
    let (_, gx) = run(&x);
    let h = 1e-3f32;
    for seed in [81, 82] {
        let u = Rng::new(seed).vec_f32(x.len(), -1.0, 1.0);
        let at = |t: f32| -> Vec<f32> { x.iter().zip(&u).map(|(a, d)| a + t * d).collect() };
        let fd = (run(&at(h)).0 - run(&at(-h)).0) / (2.0 * h as f64);
        let an: f64 = gx
            .iter()
            .zip(&u)
            .map(|(g, d)| (*g as f64) * (*d as f64))
            .sum();
        assert!(
            (fd - an).abs() <= 5e-2 * fd.abs().max(an.abs()) + 2e-4,
            "direction {seed}: finite difference {fd} vs gradient {an}"
        );
    }
}

/// Inputs whose bottom dense block has a voxel count the pointwise kernel cannot tile
/// (24^3 with three levels: 3^3; 40^3: 5^3): the folded network still runs (its
/// bottlenecks fall back from the packed chain) and equals the eval graph.
#[test]
fn folded_dunet_runs_on_odd_bottom_blocks() {
    let ctx = gpu();
    let mut s = ParamStore::new();
    let config = DunetConfig {
        init_features: 8,
        growth: 4,
        layers_per_block: 1,
        bottleneck: 16,
        ..DunetConfig::default()
    };
    let m = Dunet::new(&ctx, &mut s, config, 5).unwrap();
    common::perturb_bn(&ctx, &s, 6, true);
    let (fm, fs) = m.convert(&ctx, &s, ModelForm::Folded).unwrap();
    for size in [24, 40] {
        let xs = Shape5::new(1, 2, size, size, size);
        let x = Rng::new(8).vec_f32(xs.numel().unwrap(), -1.0, 1.0);
        let logits = |model: &Dunet, store: &ParamStore| -> Vec<f32> {
            let mut g = Graph::no_grad(&ctx, Mode::Eval);
            let xv = g.input(Tensor::from_slice(&ctx, xs, &x, "x").unwrap());
            let y = model.forward(&mut g, store, xv, 0).unwrap();
            g.submit();
            g.value(y).unwrap().to_vec(&ctx).unwrap()
        };
        let (want, got) = (logits(&m, &s), logits(&fm, &fs));
        let d = common::max_abs_diff(&got, &want);
        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        assert!(
            d <= 1e-4 * scale.max(1.0),
            "{size}^3: max |diff| {d} (scale {scale})"
        );
    }
}
