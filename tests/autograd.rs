//! The tape: gradients of a composite graph against directional finite differences of
//! the GPU forward, accumulation when a value is used twice, eval/no-grad behaviour,
//! and misuse reported as errors.

mod common;

use common::gpu;
use masnet_wgpu::autograd::{Graph, Mode, ParamId, ParamKind, ParamStore, Var};
use masnet_wgpu::ops::batchnorm::BatchNormSpec;
use masnet_wgpu::ops::conv3d::Conv3dSpec;
use masnet_wgpu::ops::conv_transpose3d::ConvTranspose3dSpec;
use masnet_wgpu::ops::pool::PoolSpec;
use masnet_wgpu::rng::Rng;
use masnet_wgpu::{GpuContext, Shape5, Tensor};
use std::rc::Rc;

struct Net {
    store: ParamStore,
    w1: ParamId,
    b1: ParamId,
    gamma: ParamId,
    beta: ParamId,
    rm: ParamId,
    rv: ParamId,
    wt: ParamId,
    w2: ParamId,
}

#[allow(clippy::too_many_arguments)]
fn add(
    ctx: &GpuContext,
    s: &mut ParamStore,
    name: &str,
    shape: [usize; 5],
    rng: &mut Rng,
    lo: f32,
    hi: f32,
    kind: ParamKind,
) -> ParamId {
    let n = shape.iter().product();
    s.add(ctx, name, Shape5(shape), &rng.vec_f32(n, lo, hi), kind)
        .unwrap()
}

fn net(ctx: &GpuContext) -> Net {
    let mut rng = Rng::new(7);
    let mut store = ParamStore::new();
    let w1 = add(
        ctx,
        &mut store,
        "conv1.weight",
        [4, 2, 3, 3, 3],
        &mut rng,
        -0.3,
        0.3,
        ParamKind::ConvWeight,
    );
    let b1 = add(
        ctx,
        &mut store,
        "conv1.bias",
        [1, 4, 1, 1, 1],
        &mut rng,
        -0.1,
        0.1,
        ParamKind::Affine,
    );
    let gamma = add(
        ctx,
        &mut store,
        "bn.weight",
        [1, 4, 1, 1, 1],
        &mut rng,
        0.5,
        1.5,
        ParamKind::Affine,
    );
    let beta = add(
        ctx,
        &mut store,
        "bn.bias",
        [1, 4, 1, 1, 1],
        &mut rng,
        -0.2,
        0.2,
        ParamKind::Affine,
    );
    let rm = add(
        ctx,
        &mut store,
        "bn.running_mean",
        [1, 4, 1, 1, 1],
        &mut rng,
        -0.1,
        0.1,
        ParamKind::Buffer,
    );
    let rv = add(
        ctx,
        &mut store,
        "bn.running_var",
        [1, 4, 1, 1, 1],
        &mut rng,
        0.5,
        1.5,
        ParamKind::Buffer,
    );
    let wt = add(
        ctx,
        &mut store,
        "up.weight",
        [8, 3, 2, 2, 2],
        &mut rng,
        -0.3,
        0.3,
        ParamKind::ConvWeight,
    );
    let w2 = add(
        ctx,
        &mut store,
        "head.weight",
        [3, 3, 1, 1, 1],
        &mut rng,
        -0.5,
        0.5,
        ParamKind::ConvWeight,
    );
    Net {
        store,
        w1,
        b1,
        gamma,
        beta,
        rm,
        rv,
        wt,
        w2,
    }
}

/// conv+bias -> BN -> concat with itself (reuse) -> avgpool -> transposed conv -> 1x1
/// conv -> cross-entropy. Smooth everywhere, so finite differences are meaningful.
fn forward(g: &mut Graph<'_>, n: &Net, x: Var, labels: Var) -> Var {
    let p = |g: &mut Graph<'_>, id| g.param(&n.store, id).unwrap();
    let (w1, b1, gm, bt, wt, w2) = (
        p(g, n.w1),
        p(g, n.b1),
        p(g, n.gamma),
        p(g, n.beta),
        p(g, n.wt),
        p(g, n.w2),
    );
    let h = g.conv3d(x, w1, Some(b1), Conv3dSpec::same([3; 3])).unwrap();
    let rm = n.store.tensor(n.rm).unwrap().clone();
    let rv = n.store.tensor(n.rv).unwrap().clone();
    let h = g
        .batchnorm(h, gm, bt, rm, rv, BatchNormSpec::keras())
        .unwrap();
    let h = g.concat(&[h, h]).unwrap();
    let h = g.avgpool3d(h, PoolSpec::cube(2, 2, 0)).unwrap();
    let h = g
        .conv_transpose3d(h, wt, None, ConvTranspose3dSpec::keras_same([2; 3], [2; 3]))
        .unwrap();
    let logits = g.conv3d(h, w2, None, Conv3dSpec::default()).unwrap();
    g.softmax_cross_entropy(logits, labels).unwrap()
}

fn inputs(ctx: &GpuContext) -> (Vec<f32>, Vec<f32>) {
    let mut rng = Rng::new(11);
    let x = rng.vec_f32(2 * 2 * 4 * 6 * 4, -1.0, 1.0);
    let labels = (0..2 * 4 * 6 * 4).map(|_| rng.below(3) as f32).collect();
    let _ = ctx;
    (x, labels)
}

fn loss_value(ctx: &GpuContext, n: &Net, x: &[f32], labels: &[f32]) -> f64 {
    let mut g = Graph::new(ctx, Mode::Train);
    let xv = g.input(Tensor::from_slice(ctx, Shape5::new(2, 2, 4, 6, 4), x, "x").unwrap());
    let lv =
        g.input(Tensor::from_slice(ctx, Shape5::new(2, 1, 4, 6, 4), labels, "labels").unwrap());
    let l = forward(&mut g, n, xv, lv);
    g.submit();
    g.value(l).unwrap().to_vec(ctx).unwrap()[0] as f64
}

#[test]
fn gradients_match_directional_finite_differences() {
    let ctx = gpu();
    let n = net(&ctx);
    let (x, labels) = inputs(&ctx);
    let mut g = Graph::new(&ctx, Mode::Train);
    let xv = g.variable(Tensor::from_slice(&ctx, Shape5::new(2, 2, 4, 6, 4), &x, "x").unwrap());
    let lv =
        g.input(Tensor::from_slice(&ctx, Shape5::new(2, 1, 4, 6, 4), &labels, "labels").unwrap());
    let l = forward(&mut g, &n, xv, lv);
    let grads = g.backward(l).unwrap();
    g.submit();
    let gx = g.grad(xv).unwrap().to_vec(&ctx).unwrap();
    let mut checked = Vec::new();
    // One random direction per tensor: (L(p + h u) - L(p - h u)) / 2h = <dL/dp, u>.
    let h = 1e-2f32;
    let mut rng = Rng::new(99);
    for (id, name) in [
        (n.w1, "w1"),
        (n.b1, "b1"),
        (n.gamma, "gamma"),
        (n.beta, "beta"),
        (n.wt, "wt"),
        (n.w2, "w2"),
    ] {
        let t: &Rc<Tensor> = n.store.tensor(id).unwrap();
        let p0 = t.to_vec(&ctx).unwrap();
        let grad = grads
            .get(id)
            .unwrap_or_else(|| panic!("no gradient for {name}"))
            .to_vec(&ctx)
            .unwrap();
        let u = rng.vec_f32(p0.len(), -1.0, 1.0);
        let set = |s: f32| {
            let v: Vec<f32> = p0.iter().zip(&u).map(|(a, b)| a + s * b).collect();
            ctx.queue
                .write_buffer(t.buffer(), 0, bytemuck::cast_slice(&v));
        };
        set(h);
        let lp = loss_value(&ctx, &n, &x, &labels);
        set(-h);
        let lm = loss_value(&ctx, &n, &x, &labels);
        set(0.0);
        let fd = (lp - lm) / (2.0 * h as f64);
        let an: f64 = grad
            .iter()
            .zip(&u)
            .map(|(a, b)| (*a as f64) * (*b as f64))
            .sum();
        checked.push((name, fd, an));
        assert!(
            (fd - an).abs() <= 2e-2 * fd.abs().max(an.abs()) + 2e-4,
            "{name}: finite difference {fd} vs gradient {an}"
        );
    }
    let u = rng.vec_f32(x.len(), -1.0, 1.0);
    let shifted = |s: f32| -> Vec<f32> { x.iter().zip(&u).map(|(a, b)| a + s * b).collect() };
    let fd = (loss_value(&ctx, &n, &shifted(h), &labels)
        - loss_value(&ctx, &n, &shifted(-h), &labels))
        / (2.0 * h as f64);
    let an: f64 = gx
        .iter()
        .zip(&u)
        .map(|(a, b)| (*a as f64) * (*b as f64))
        .sum();
    assert!(
        (fd - an).abs() <= 2e-2 * fd.abs().max(an.abs()) + 2e-4,
        "x: finite difference {fd} vs gradient {an}"
    );
    // Buffers never get gradients.
    assert!(grads.get(n.rm).is_none() && grads.get(n.rv).is_none());
    assert_eq!(grads.len(), 6, "{checked:?}");
}

#[test]
fn a_value_used_twice_accumulates_its_gradient() {
    let ctx = gpu();
    let mut rng = Rng::new(3);
    let mut store = ParamStore::new();
    let w = add(
        &ctx,
        &mut store,
        "w",
        [3, 2, 3, 3, 3],
        &mut rng,
        -0.5,
        0.5,
        ParamKind::ConvWeight,
    );
    let x = rng.vec_f32(2 * 2 * 5 * 4 * 3, -1.0, 1.0);
    let labels: Vec<f32> = (0..2 * 5 * 4 * 3).map(|_| rng.below(3) as f32).collect();
    let run = |twice: bool| -> Vec<f32> {
        let mut g = Graph::new(&ctx, Mode::Train);
        let xv = g.input(Tensor::from_slice(&ctx, Shape5::new(2, 2, 5, 4, 3), &x, "x").unwrap());
        let lv =
            g.input(Tensor::from_slice(&ctx, Shape5::new(2, 1, 5, 4, 3), &labels, "l").unwrap());
        let wv = g.param(&store, w).unwrap();
        let y = g.conv3d(xv, wv, None, Conv3dSpec::same([3; 3])).unwrap();
        let y2 = if twice {
            // y feeds two ops, and the parameter is fetched twice (same node).
            let w_again = g.param(&store, w).unwrap();
            assert_eq!(w_again, wv);
            g.add(y, y).unwrap()
        } else {
            g.scale(y, 2.0).unwrap()
        };
        let l = g.softmax_cross_entropy(y2, lv).unwrap();
        let grads = g.backward(l).unwrap();
        g.submit();
        grads.get(w).unwrap().to_vec(&ctx).unwrap()
    };
    let a = run(true);
    let b = run(false);
    common::assert_close(&a, &b, 1e-5, 1e-6, "add(y, y) vs scale(y, 2)");
    assert!(a.iter().any(|v| v.abs() > 1e-4));
}

#[test]
fn no_grad_and_misuse_are_errors() {
    let ctx = gpu();
    let mut rng = Rng::new(5);
    let mut store = ParamStore::new();
    let w = add(
        &ctx,
        &mut store,
        "w",
        [2, 1, 1, 1, 1],
        &mut rng,
        -0.5,
        0.5,
        ParamKind::ConvWeight,
    );
    let x = Tensor::from_slice(&ctx, Shape5::new(1, 1, 2, 2, 2), &[0.5; 8], "x").unwrap();
    let lab = Tensor::from_slice(&ctx, Shape5::new(1, 1, 2, 2, 2), &[1.0; 8], "l").unwrap();
    let mut g = Graph::no_grad(&ctx, Mode::Eval);
    let xv = g.input(x);
    let lv = g.input(lab);
    let wv = g.param(&store, w).unwrap();
    let y = g.conv3d(xv, wv, None, Conv3dSpec::default()).unwrap();
    let l = g.softmax_cross_entropy(y, lv).unwrap();
    let e = g
        .backward(l)
        .err()
        .expect("backward on a no_grad graph")
        .to_string();
    assert!(
        e.contains("does not depend on anything that needs a gradient"),
        "{e}"
    );
    // A gradient for a constant input.
    let e = g.grad(xv).expect_err("grad of an input").to_string();
    assert!(e.contains("not on the gradient tape"), "{e}");
    // A value from another graph.
    let mut other = Graph::new(&ctx, Mode::Train);
    let e = other.relu(y).expect_err("foreign value").to_string();
    assert!(e.contains("another graph"), "{e}");
    // Backward from a non-scalar.
    let xv2 = other
        .variable(Tensor::from_slice(&ctx, Shape5::new(1, 1, 2, 2, 2), &[0.5; 8], "x2").unwrap());
    let r = other.relu(xv2).unwrap();
    let e = other
        .backward(r)
        .err()
        .expect("non-scalar loss")
        .to_string();
    assert!(e.contains("scalar"), "{e}");
    // Shape mismatch inside an op names it.
    let wv2 = other.param(&store, w).unwrap();
    let bad = other
        .conv3d(r, wv2, Some(xv2), Conv3dSpec::default())
        .expect_err("bias shape")
        .to_string();
    assert!(bad.contains("bias"), "{bad}");
}

/// relu6 -> dropout -> reshape -> self-attention (matmul, row softmax, matmul) ->
/// reshape -> max pool -> trilinear up-sampling -> nearest up-sampling of a pooled
/// copy, summed -> 1x1 conv -> cross-entropy + Dice: every remaining tape op.
fn attention_loss(g: &mut Graph<'_>, x: Var, w: Var, labels: Var) -> Var {
    use masnet_wgpu::autograd::Upsample;
    let h = g.scale(x, 3.0).unwrap();
    let h = g.relu6(h).unwrap();
    let h = g.dropout(h, 0.3, 1234).unwrap();
    let r = g.reshape(h, Shape5::new(1, 1, 1, 6, 32)).unwrap();
    let scores = g.batched_matmul(r, r, false, true).unwrap();
    let att = g.softmax_rows(scores).unwrap();
    let o = g.batched_matmul(att, r, false, false).unwrap();
    let o = g.reshape(o, Shape5::new(1, 6, 2, 4, 4)).unwrap();
    let p = g.maxpool3d(o, PoolSpec::cube(2, 2, 0)).unwrap();
    let up = g.upsample(p, [2, 2, 2], Upsample::Trilinear).unwrap();
    let a = g.avgpool3d(o, PoolSpec::cube(2, 2, 0)).unwrap();
    let near = g.upsample(a, [2, 2, 2], Upsample::Nearest).unwrap();
    let u = g.sum(&[up, near, o]).unwrap();
    let logits = g.conv3d(u, w, None, Conv3dSpec::default()).unwrap();
    let ce = g.softmax_cross_entropy(logits, labels).unwrap();
    let dice = g.dice_loss(logits, labels, 1.0).unwrap();
    g.add(ce, dice).unwrap()
}

#[test]
fn every_tape_op_passes_a_directional_finite_difference_check() {
    let ctx = gpu();
    let mut rng = Rng::new(21);
    // Values at least 0.05 from ReLU6's kink at 0 (finite differences must not cross
    // it; h below is small enough that max-pool winners do not change either).
    let x0: Vec<f32> = rng
        .vec_f32(6 * 32, -1.0, 1.0)
        .iter()
        .map(|v| v.signum() * (0.05 + 0.95 * v.abs()))
        .collect();
    let w0 = rng.vec_f32(3 * 6, -0.5, 0.5);
    let labels: Vec<f32> = (0..32).map(|_| rng.below(3) as f32).collect();
    let xs = Shape5::new(1, 6, 2, 4, 4);
    let ws = Shape5::new(3, 6, 1, 1, 1);
    let ls = Shape5::new(1, 1, 2, 4, 4);
    let eval = |x: &[f32], w: &[f32], want_grads: bool| -> (f64, Vec<f32>, Vec<f32>) {
        let mut g = Graph::new(&ctx, Mode::Train);
        let xv = g.variable(Tensor::from_slice(&ctx, xs, x, "x").unwrap());
        let wv = g.variable(Tensor::from_slice(&ctx, ws, w, "w").unwrap());
        let lv = g.input(Tensor::from_slice(&ctx, ls, &labels, "labels").unwrap());
        let l = attention_loss(&mut g, xv, wv, lv);
        if want_grads {
            g.backward(l).unwrap();
        }
        g.submit();
        let loss = g.value(l).unwrap().to_vec(&ctx).unwrap()[0] as f64;
        if !want_grads {
            return (loss, vec![], vec![]);
        }
        let gx = g.grad(xv).unwrap().to_vec(&ctx).unwrap();
        let gw = g.grad(wv).unwrap().to_vec(&ctx).unwrap();
        (loss, gx, gw)
    };
    let (_, gx, gw) = eval(&x0, &w0, true);
    let h = 1e-3f32;
    let dot =
        |a: &[f32], u: &[f32]| -> f64 { a.iter().zip(u).map(|(p, q)| *p as f64 * *q as f64).sum() };
    let shift = |v: &[f32], u: &[f32], s: f32| -> Vec<f32> {
        v.iter().zip(u).map(|(a, b)| a + s * b).collect()
    };
    for trial in 0..2 {
        let ux = rng.vec_f32(x0.len(), -1.0, 1.0);
        let uw = rng.vec_f32(w0.len(), -1.0, 1.0);
        let fdx = (eval(&shift(&x0, &ux, h), &w0, false).0
            - eval(&shift(&x0, &ux, -h), &w0, false).0)
            / (2.0 * h as f64);
        let fdw = (eval(&x0, &shift(&w0, &uw, h), false).0
            - eval(&x0, &shift(&w0, &uw, -h), false).0)
            / (2.0 * h as f64);
        let (ax, aw) = (dot(&gx, &ux), dot(&gw, &uw));
        assert!(
            (fdx - ax).abs() <= 3e-2 * fdx.abs().max(ax.abs()) + 3e-4,
            "trial {trial} x: fd {fdx} vs {ax}"
        );
        assert!(
            (fdw - aw).abs() <= 3e-2 * fdw.abs().max(aw.abs()) + 3e-4,
            "trial {trial} w: fd {fdw} vs {aw}"
        );
    }
}

/// Liveness: a released value's buffer goes back to the pool at once in a no-grad
/// graph (a chain of 20 ops peaks at a few live tensors), while in a training graph
/// the values backward needs stay alive in its closures, so gradients are unchanged.
#[test]
fn released_values_free_memory_and_keep_gradients() {
    let ctx = gpu();
    let shape = Shape5::new(1, 4, 16, 16, 16);
    let bytes = 4 * shape.numel().unwrap() as u64;
    let data = Rng::new(5).vec_f32(shape.numel().unwrap(), -1.0, 1.0);
    let chain_peak = |release: bool| {
        ctx.wait().unwrap();
        let before = ctx.pool.memory().in_use;
        ctx.pool.reset_peak();
        let mut g = Graph::no_grad(&ctx, Mode::Eval);
        let mut h = g.input(Tensor::from_slice(&ctx, shape, &data, "x").unwrap());
        for _ in 0..20 {
            let next = g.scale(h, 0.9).unwrap();
            if release {
                g.release(h).unwrap();
            }
            h = next;
        }
        let out = g.value(h).unwrap().clone();
        g.submit();
        drop(g);
        let peak = ctx.pool.memory().peak_in_use - before;
        (peak, out.to_vec(&ctx).unwrap())
    };
    let (kept, a) = chain_peak(false);
    let (freed, b) = chain_peak(true);
    assert_eq!(a, b, "releasing must not change values");
    assert!(kept >= 20 * bytes, "without release: peak {kept} B");
    assert!(
        freed <= 3 * bytes,
        "with release: peak {freed} B for {bytes} B tensors"
    );

    let n = net(&ctx);
    let (x, labels) = inputs(&ctx);
    let grads = |release: bool| -> Vec<Vec<f32>> {
        let mut g = Graph::new(&ctx, Mode::Train);
        let xv = g.input(Tensor::from_slice(&ctx, Shape5::new(2, 2, 4, 6, 4), &x, "x").unwrap());
        let lv = g.input(
            Tensor::from_slice(&ctx, Shape5::new(2, 1, 4, 6, 4), &labels, "labels").unwrap(),
        );
        let mark = g.mark();
        let l = forward(&mut g, &n, xv, lv);
        if release {
            g.release_since(mark, &[l]).unwrap();
            assert!(
                g.value(l).is_ok() && g.value(xv).is_ok(),
                "kept values stay"
            );
        }
        let got = g.backward(l).unwrap();
        g.submit();
        [n.w1, n.b1, n.gamma, n.beta, n.wt, n.w2]
            .iter()
            .map(|&id| got.get(id).unwrap().to_vec(&ctx).unwrap())
            .collect()
    };
    assert_eq!(grads(false), grads(true));

    // Reading a released value is an error that says so.
    let mut g = Graph::no_grad(&ctx, Mode::Eval);
    let v = g.input(Tensor::from_slice(&ctx, shape, &data, "x").unwrap());
    let y = g.scale(v, 2.0).unwrap();
    g.release(y).unwrap();
    g.release(v).unwrap();
    let msg = g.value(y).unwrap_err().to_string();
    assert!(msg.contains("released"), "{msg}");
    assert!(g.value(v).is_ok(), "inputs are never released");
}

/// Frozen (inference-form) parameters cache their packed convolution layouts (conv,
/// 1x1x1 and transposed conv here); overwriting a value through the store drops the
/// cache, and the optimiser refuses frozen parameters.
#[test]
fn frozen_parameters_cache_packed_weights_until_overwritten() {
    use masnet_wgpu::ops::adam::AdamConfig;
    use masnet_wgpu::optim::Adam;
    let ctx = gpu();
    let n = net(&ctx);
    let (x, labels) = inputs(&ctx);
    let before = loss_value(&ctx, &n, &x, &labels);
    n.store.freeze();
    assert_eq!(
        loss_value(&ctx, &n, &x, &labels),
        before,
        "filling the cache"
    );
    assert_eq!(loss_value(&ctx, &n, &x, &labels), before, "from the cache");

    let mut rng = Rng::new(99);
    let mut new_values = Vec::new();
    for id in [n.w1, n.wt, n.w2] {
        let len = n.store.tensor(id).unwrap().shape().numel().unwrap();
        let v = rng.vec_f32(len, -0.4, 0.4);
        n.store.set(&ctx, id, &v).unwrap();
        new_values.push((id, v));
    }
    let fresh = net(&ctx);
    for (id, v) in &new_values {
        fresh.store.set(&ctx, *id, v).unwrap();
    }
    let after = loss_value(&ctx, &n, &x, &labels);
    assert_ne!(after, before);
    assert_eq!(
        after,
        loss_value(&ctx, &fresh, &x, &labels),
        "stale packed weights"
    );

    let mut g = Graph::new(&ctx, Mode::Train);
    let xv = g.input(Tensor::from_slice(&ctx, Shape5::new(2, 2, 4, 6, 4), &x, "x").unwrap());
    let lv =
        g.input(Tensor::from_slice(&ctx, Shape5::new(2, 1, 4, 6, 4), &labels, "labels").unwrap());
    let l = forward(&mut g, &n, xv, lv);
    let grads = g.backward(l).unwrap();
    let mut adam = Adam::new(AdamConfig::default()).unwrap();
    let err = adam
        .step(&ctx, g.recorder(), &n.store, &grads, 1e-3)
        .unwrap_err()
        .to_string();
    assert!(err.contains("frozen"), "{err}");
}

/// A DenseNet-style block built in one buffer (`buffer` + `append_channels`, each
/// layer reading the channels so far through `conv3d_channels`) gives the loss and
/// gradients of the same block built with `concat`, and its input gradient matches a
/// directional finite difference.
#[test]
fn append_channels_matches_concat_and_finite_differences() {
    let ctx = gpu();
    let xs = Shape5::new(2, 3, 4, 4, 4);
    let mut rng = Rng::new(70);
    let x = rng.vec_f32(xs.numel().unwrap(), -1.0, 1.0);
    let w1s = Shape5::new(2, 3, 1, 1, 1);
    let w2s = Shape5::new(2, 5, 3, 3, 3);
    let whs = Shape5::new(3, 7, 1, 1, 1);
    let w1 = rng.vec_f32(w1s.numel().unwrap(), -0.5, 0.5);
    let w2 = rng.vec_f32(w2s.numel().unwrap(), -0.3, 0.3);
    let wh = rng.vec_f32(whs.numel().unwrap(), -0.5, 0.5);
    let labels: Vec<f32> = (0..2 * 64).map(|i| ((i * 7) % 3) as f32).collect();
    // (loss, [dx, dw1, dw2, dwh]) with the block built by concat or in one buffer.
    let run = |x: &[f32], in_buffer: bool| -> (f64, Vec<Vec<f32>>) {
        let mut g = Graph::new(&ctx, Mode::Train);
        let t = |s: Shape5, v: &[f32], n: &str| Tensor::from_slice(&ctx, s, v, n).unwrap();
        let xv = g.variable(t(xs, x, "x"));
        let w1v = g.variable(t(w1s, &w1, "w1"));
        let w2v = g.variable(t(w2s, &w2, "w2"));
        let whv = g.variable(t(whs, &wh, "wh"));
        let lv = g.input(t(Shape5::new(2, 1, 4, 4, 4), &labels, "labels"));
        let pw = Conv3dSpec::same([1; 3]);
        let k3 = Conv3dSpec::same([3; 3]);
        let h = if in_buffer {
            let b = g.buffer(Shape5::new(2, 7, 4, 4, 4), "block").unwrap();
            let b = g.append_channels(b, xv, 0).unwrap();
            let y1 = g.conv3d_channels(b, 0, 3, w1v, None, pw).unwrap();
            let b = g.append_channels(b, y1, 3).unwrap();
            let y2 = g.conv3d_channels(b, 0, 5, w2v, None, k3).unwrap();
            g.append_channels(b, y2, 5).unwrap()
        } else {
            let y1 = g.conv3d(xv, w1v, None, pw).unwrap();
            let h1 = g.concat(&[xv, y1]).unwrap();
            let y2 = g.conv3d(h1, w2v, None, k3).unwrap();
            g.concat(&[h1, y2]).unwrap()
        };
        let logits = g.conv3d(h, whv, None, pw).unwrap();
        let l = g.softmax_cross_entropy(logits, lv).unwrap();
        g.backward(l).unwrap();
        g.submit();
        let loss = g.value(l).unwrap().to_vec(&ctx).unwrap()[0] as f64;
        let grads = [xv, w1v, w2v, whv]
            .iter()
            .map(|&v| g.grad(v).unwrap().to_vec(&ctx).unwrap())
            .collect();
        (loss, grads)
    };
    let (l_cat, g_cat) = run(&x, false);
    let (l_buf, g_buf) = run(&x, true);
    assert!(
        (l_cat - l_buf).abs() <= 1e-6 * l_cat.abs(),
        "{l_cat} vs {l_buf}"
    );
    for (i, (a, b)) in g_cat.iter().zip(&g_buf).enumerate() {
        common::assert_close(b, a, 1e-4, 1e-6, &format!("gradient {i}"));
    }
    // <dL/dx, u> against (L(x + h u) - L(x - h u)) / 2h.
    let h = 1e-2f32;
    let u = Rng::new(71).vec_f32(x.len(), -1.0, 1.0);
    let shifted = |s: f32| -> Vec<f32> { x.iter().zip(&u).map(|(a, d)| a + s * d).collect() };
    let fd = (run(&shifted(h), true).0 - run(&shifted(-h), true).0) / (2.0 * h as f64);
    let an: f64 = g_buf[0]
        .iter()
        .zip(&u)
        .map(|(g, d)| (*g as f64) * (*d as f64))
        .sum();
    assert!((fd - an).abs() <= 1e-3 + 1e-2 * an.abs(), "fd {fd} vs {an}");
}

/// Zero-pads a `[cout, cnt, k, k, k]` weight to `[cout, cin, k, k, k]` with its values on
/// input channels `off .. off + cnt`.
fn pad_in_channels(
    w: &[f32],
    cout: usize,
    cnt: usize,
    k3: usize,
    cin: usize,
    off: usize,
) -> Vec<f32> {
    let mut out = vec![0.0; cout * cin * k3];
    for o in 0..cout {
        for c in 0..cnt {
            let src = (o * cnt + c) * k3;
            let dst = (o * cin + off + c) * k3;
            out[dst..dst + k3].copy_from_slice(&w[src..src + k3]);
        }
    }
    out
}

#[test]
fn channel_range_gradients_accumulate_into_their_range() {
    // Convs and a slice reading (overlapping) channel ranges of x contribute only their
    // range's gradient, which the tape adds in place (first contribution partial or
    // full). Reference: the same maths with full-range reads (weights zero-padded over
    // the other channels, the slice as a 1x1x1 selection conv), which contribute whole
    // tensors. Both tape orders are checked.
    let ctx = gpu();
    let mut rng = Rng::new(21);
    let (n, cin, sp) = (2, 6, [4, 3, 5]);
    let xs = Shape5::new(n, cin, sp[0], sp[1], sp[2]);
    let x = rng.vec_f32(xs.numel().unwrap(), -1.0, 1.0);
    let vox = n * sp.iter().product::<usize>();
    let labels: Vec<f32> = (0..vox).map(|_| rng.below(8) as f32).collect();
    // (offset, count) of the two convs (3x3x3, 2 outputs each) and the slice.
    let ranges = [(1usize, 3usize), (2, 4)];
    let (s_off, s_cnt) = (0usize, 2usize);
    let w1 = rng.vec_f32(2 * 3 * 27, -0.3, 0.3);
    let w2 = rng.vec_f32(2 * 4 * 27, -0.3, 0.3);
    let w3 = rng.vec_f32(2 * cin * 27, -0.3, 0.3);
    let mut sel = vec![0.0; s_cnt * cin];
    for c in 0..s_cnt {
        sel[c * cin + s_off + c] = 1.0;
    }
    let run = |ranged: bool, full_first: bool| -> Vec<f32> {
        let mut g = Graph::new(&ctx, Mode::Train);
        let t = |d: &[f32], s: [usize; 5]| Tensor::from_slice(&ctx, Shape5(s), d, "t").unwrap();
        let xv = g.variable(t(&x, xs.0));
        let lv = g.input(t(&labels, [n, 1, sp[0], sp[1], sp[2]]));
        let spec = Conv3dSpec::same([3; 3]);
        let full = |g: &mut Graph<'_>| {
            let w = g.input(t(&w3, [2, cin, 3, 3, 3]));
            g.conv3d(xv, w, None, spec).unwrap()
        };
        let mut parts = Vec::new();
        if full_first {
            parts.push(full(&mut g));
        }
        for ((off, cnt), w) in ranges.iter().zip([&w1, &w2]) {
            parts.push(if ranged {
                let wv = g.input(t(w, [2, *cnt, 3, 3, 3]));
                g.conv3d_channels(xv, *off, *cnt, wv, None, spec).unwrap()
            } else {
                let wp = pad_in_channels(w, 2, *cnt, 27, cin, *off);
                let wv = g.input(t(&wp, [2, cin, 3, 3, 3]));
                g.conv3d(xv, wv, None, spec).unwrap()
            });
        }
        parts.push(if ranged {
            g.slice_channels(xv, s_off, s_cnt).unwrap()
        } else {
            let wv = g.input(t(&sel, [s_cnt, cin, 1, 1, 1]));
            g.conv3d(xv, wv, None, Conv3dSpec::same([1; 3])).unwrap()
        });
        if !full_first {
            parts.push(full(&mut g));
        }
        let logits = g.concat(&parts).unwrap();
        let l = g.softmax_cross_entropy(logits, lv).unwrap();
        g.backward(l).unwrap();
        g.submit();
        g.grad(xv).unwrap().to_vec(&ctx).unwrap()
    };
    for full_first in [false, true] {
        let reference = run(false, full_first);
        let ranged = run(true, full_first);
        assert_eq!(ranged.len(), x.len());
        common::assert_close(&ranged, &reference, 1e-5, 1e-6, "ranged vs full reads");
        // Every channel gets a gradient (channel 5 only through the full conv).
        for c in 0..cin {
            let vol = sp.iter().product::<usize>();
            assert!(ranged[c * vol..(c + 1) * vol]
                .iter()
                .any(|v| v.abs() > 1e-6));
        }
    }
}

#[test]
fn fused_batchnorm_relu_equals_batchnorm_then_relu() {
    // The training-mode fused op against the two ops it replaces (each checked against
    // finite differences above): loss, input, gamma and beta gradients, and the
    // running statistics it updates.
    let ctx = gpu();
    let mut rng = Rng::new(31);
    let xs = Shape5::new(2, 3, 3, 4, 5);
    let x = rng.vec_f32(xs.numel().unwrap(), -1.0, 1.0);
    let labels: Vec<f32> = (0..2 * 60).map(|_| rng.below(3) as f32).collect();
    let gamma = rng.vec_f32(3, 0.5, 1.5);
    let beta = rng.vec_f32(3, -0.3, 0.3);
    let run = |fused: bool| -> Vec<Vec<f32>> {
        let c1 = Shape5::new(1, 3, 1, 1, 1);
        let t = |v: &[f32], s: Shape5| Tensor::from_slice(&ctx, s, v, "t").unwrap();
        let (rm, rv) = (Rc::new(t(&[0.0; 3], c1)), Rc::new(t(&[1.0; 3], c1)));
        let mut g = Graph::new(&ctx, Mode::Train);
        let xv = g.variable(t(&x, xs));
        let gv = g.variable(t(&gamma, c1));
        let bv = g.variable(t(&beta, c1));
        let lv = g.input(t(&labels, Shape5::new(2, 1, 3, 4, 5)));
        let spec = BatchNormSpec::keras();
        let r = if fused {
            g.batchnorm_relu(xv, gv, bv, rm.clone(), rv.clone(), spec)
                .unwrap()
        } else {
            let y = g
                .batchnorm(xv, gv, bv, rm.clone(), rv.clone(), spec)
                .unwrap();
            g.relu(y).unwrap()
        };
        let l = g.softmax_cross_entropy(r, lv).unwrap();
        g.backward(l).unwrap();
        g.submit();
        let mut out = vec![g.value(l).unwrap().to_vec(&ctx).unwrap()];
        for v in [xv, gv, bv] {
            out.push(g.grad(v).unwrap().to_vec(&ctx).unwrap());
        }
        out.push(rm.to_vec(&ctx).unwrap());
        out.push(rv.to_vec(&ctx).unwrap());
        out.push(g.value(r).unwrap().to_vec(&ctx).unwrap());
        out
    };
    let (a, b) = (run(true), run(false));
    for (i, (p, q)) in a.iter().zip(&b).enumerate() {
        common::assert_close(p, q, 1e-5, 1e-6, &format!("output {i}"));
    }
    let clamped = a[6].iter().filter(|v| **v == 0.0).count();
    assert!(
        clamped > 90 && clamped < 270,
        "{clamped} of 360 outputs clamped"
    );
}

#[test]
fn conv_bn_relu_inference_holds_two_activations() {
    // An eval-mode no-grad chain of conv + BN + ReLU layers: each layer's conv output is
    // released before its ReLU runs. Live at most: the input (never released), the
    // layer's input, and two of conv output / BN output / ReLU output: four activations
    // (five if the ReLU ran while the conv output was still held).
    use masnet_wgpu::nn::blocks::ConvBn;
    use masnet_wgpu::nn::layers::Builder;
    let ctx = gpu();
    let mut store = ParamStore::new();
    let mut rng = Rng::new(41);
    let layers: Vec<ConvBn> = (0..4)
        .map(|i| {
            ConvBn::new(
                &mut Builder::new(&ctx, &mut store, &mut rng).sub(&format!("l{i}")),
                8,
                8,
                1,
                1,
            )
            .unwrap()
        })
        .collect();
    let xs = Shape5::new(1, 8, 16, 16, 16);
    let act = (xs.numel().unwrap() * 4) as u64;
    let x = rng.vec_f32(xs.numel().unwrap(), -1.0, 1.0);
    ctx.wait().unwrap();
    let before = ctx.pool.memory().in_use;
    ctx.pool.reset_peak();
    let mut g = Graph::no_grad(&ctx, Mode::Eval);
    let mut h = g.input(Tensor::from_slice(&ctx, xs, &x, "x").unwrap());
    for (i, l) in layers.iter().enumerate() {
        let next = l.forward_relu(&mut g, &store, h, 0).unwrap();
        if i > 0 {
            g.release(h).unwrap();
        }
        h = next;
    }
    g.submit();
    ctx.wait().unwrap();
    let peak = ctx.pool.memory().peak_in_use.saturating_sub(before);
    assert!(
        peak < 4 * act + act / 2,
        "peak {peak} bytes, activation {act}"
    );
    assert!(
        peak >= 4 * act,
        "peak {peak} bytes, activation {act}: fewer than expected"
    );
}
