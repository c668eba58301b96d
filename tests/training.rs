//! End-to-end training on the GPU: a small conv–BN–ReLU–pool–transposed-conv–softmax
//! network learns a synthetic 3-D segmentation task (bright boxes in noise) with Adam;
//! the loss must fall by a stated factor in a fixed number of steps, with a fixed seed,
//! and a second run with the same seed must reproduce the same losses exactly.

mod common;

use common::gpu;
use masnet_wgpu::autograd::{Graph, Mode, ParamId, ParamKind, ParamStore};
use masnet_wgpu::init;
use masnet_wgpu::ops::adam::AdamConfig;
use masnet_wgpu::ops::batchnorm::BatchNormSpec;
use masnet_wgpu::ops::conv3d::Conv3dSpec;
use masnet_wgpu::ops::conv_transpose3d::ConvTranspose3dSpec;
use masnet_wgpu::ops::pool::PoolSpec;
use masnet_wgpu::optim::{check_step, non_finite_counts, Adam};
use masnet_wgpu::rng::Rng;
use masnet_wgpu::schedule::LrSchedule;
use masnet_wgpu::{Error, GpuContext, Shape5, Tensor};
use std::rc::Rc;

const S: usize = 8;
const BATCH: usize = 4;
const STEPS: usize = 40;
/// The final loss (mean of the last 5 steps) must be below the first one divided by this.
const FALL: f64 = 4.0;

struct Block {
    w: ParamId,
    gamma: ParamId,
    beta: ParamId,
    mean: ParamId,
    var: ParamId,
}

struct Model {
    store: ParamStore,
    b1: Block,
    b2: Block,
    up: ParamId,
    up_b: ParamId,
    head: ParamId,
    head_b: ParamId,
}

fn block(
    ctx: &GpuContext,
    s: &mut ParamStore,
    rng: &mut Rng,
    name: &str,
    cin: usize,
    cout: usize,
) -> Block {
    let shape = [cout, cin, 3, 3, 3];
    let w = init::Init::HeNormalTruncated.fill(rng, shape).unwrap();
    let c = Shape5::new(1, cout, 1, 1, 1);
    let add = |s: &mut ParamStore, n: &str, v: Vec<f32>, sh: Shape5, k| {
        s.add(ctx, &format!("{name}.{n}"), sh, &v, k).unwrap()
    };
    Block {
        w: add(s, "conv.weight", w, Shape5(shape), ParamKind::ConvWeight),
        gamma: add(s, "bn.weight", init::ones(cout), c, ParamKind::Affine),
        beta: add(s, "bn.bias", init::zeros(cout), c, ParamKind::Affine),
        mean: add(
            s,
            "bn.running_mean",
            init::zeros(cout),
            c,
            ParamKind::Buffer,
        ),
        var: add(s, "bn.running_var", init::ones(cout), c, ParamKind::Buffer),
    }
}

fn model(ctx: &GpuContext, seed: u64) -> Model {
    let mut rng = Rng::new(seed);
    let mut store = ParamStore::new();
    let b1 = block(ctx, &mut store, &mut rng, "enc", 1, 8);
    let b2 = block(ctx, &mut store, &mut rng, "mid", 8, 8);
    let up_shape = [8, 8, 2, 2, 2];
    let up_w = init::Init::GlorotUniform
        .fill_transposed(&mut rng, up_shape)
        .unwrap();
    let up = store
        .add(
            ctx,
            "up.weight",
            Shape5(up_shape),
            &up_w,
            ParamKind::ConvWeight,
        )
        .unwrap();
    let up_b = store
        .add(
            ctx,
            "up.bias",
            Shape5::new(1, 8, 1, 1, 1),
            &init::zeros(8),
            ParamKind::Affine,
        )
        .unwrap();
    let head_w = init::Init::GlorotUniform
        .fill(&mut rng, [2, 8, 1, 1, 1])
        .unwrap();
    let head = store
        .add(
            ctx,
            "head.weight",
            Shape5::new(2, 8, 1, 1, 1),
            &head_w,
            ParamKind::ConvWeight,
        )
        .unwrap();
    let head_b = store
        .add(
            ctx,
            "head.bias",
            Shape5::new(1, 2, 1, 1, 1),
            &init::zeros(2),
            ParamKind::Affine,
        )
        .unwrap();
    Model {
        store,
        b1,
        b2,
        up,
        up_b,
        head,
        head_b,
    }
}

/// Bright boxes of random size and place in Gaussian-ish noise; label 1 inside.
fn data(seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut rng = Rng::new(seed);
    let mut x = Vec::new();
    let mut y = Vec::new();
    for _ in 0..BATCH {
        let lo: Vec<usize> = (0..3).map(|_| rng.below(4)).collect();
        let hi: Vec<usize> = lo.iter().map(|&l| l + 2 + rng.below(3)).collect();
        for z in 0..S {
            for r in 0..S {
                for c in 0..S {
                    let p = [z, r, c];
                    let inside = (0..3).all(|a| p[a] >= lo[a] && p[a] < hi[a]);
                    y.push(f32::from(u8::from(inside)));
                    x.push(if inside { 1.0 } else { 0.0 } + rng.uniform_f32(-0.5, 0.5));
                }
            }
        }
    }
    (x, y)
}

fn conv_bn_relu(
    g: &mut Graph<'_>,
    m: &Model,
    b: &Block,
    x: masnet_wgpu::autograd::Var,
) -> masnet_wgpu::autograd::Var {
    let w = g.param(&m.store, b.w).unwrap();
    let gm = g.param(&m.store, b.gamma).unwrap();
    let bt = g.param(&m.store, b.beta).unwrap();
    let h = g.conv3d(x, w, None, Conv3dSpec::same([3; 3])).unwrap();
    let rm = m.store.tensor(b.mean).unwrap().clone();
    let rv = m.store.tensor(b.var).unwrap().clone();
    let spec = BatchNormSpec {
        momentum: 0.9,
        ..BatchNormSpec::keras()
    };
    let h = g.batchnorm(h, gm, bt, rm, rv, spec).unwrap();
    g.relu(h).unwrap()
}

fn train(ctx: &GpuContext, seed: u64) -> Vec<f64> {
    let m = model(ctx, seed);
    let (x, y) = data(seed + 1);
    let mut adam = Adam::new(AdamConfig {
        l2: 1e-4,
        ..AdamConfig::default()
    })
    .unwrap();
    let schedule = LrSchedule::Constant(1e-2);
    let mut losses = Vec::new();
    for step in 0..STEPS {
        let mut g = Graph::new(ctx, Mode::Train);
        let xv = g.input(Tensor::from_slice(ctx, Shape5::new(BATCH, 1, S, S, S), &x, "x").unwrap());
        let yv =
            g.input(Tensor::from_slice(ctx, Shape5::new(BATCH, 1, S, S, S), &y, "labels").unwrap());
        let h = conv_bn_relu(&mut g, &m, &m.b1, xv);
        let p = g.maxpool3d(h, PoolSpec::cube(2, 2, 0)).unwrap();
        let h = conv_bn_relu(&mut g, &m, &m.b2, p);
        let (up, up_b) = (
            g.param(&m.store, m.up).unwrap(),
            g.param(&m.store, m.up_b).unwrap(),
        );
        let h = g
            .conv_transpose3d(
                h,
                up,
                Some(up_b),
                ConvTranspose3dSpec::keras_same([2; 3], [2; 3]),
            )
            .unwrap();
        let h = g.relu(h).unwrap();
        let (hw, hb) = (
            g.param(&m.store, m.head).unwrap(),
            g.param(&m.store, m.head_b).unwrap(),
        );
        let logits = g.conv3d(h, hw, Some(hb), Conv3dSpec::default()).unwrap();
        let loss = g.softmax_cross_entropy(logits, yv).unwrap();
        let grads = g.backward(loss).unwrap();
        assert_eq!(grads.len(), 10, "every trainable tensor gets a gradient");
        let lr = schedule.lr_at(0, step, STEPS) as f32;
        adam.step(ctx, g.recorder(), &m.store, &grads, lr).unwrap();
        let l2 = adam.l2_terms(ctx, g.recorder(), &m.store).unwrap().unwrap();
        g.submit();
        let ce = g.value(loss).unwrap().to_vec(ctx).unwrap()[0] as f64;
        let total = ce + adam.l2_value(&l2.to_vec(ctx).unwrap());
        check_step(step as u64 + 1, total, &[], &m.store).unwrap();
        losses.push(total);
    }
    losses
}

#[test]
fn small_segmentation_network_learns() {
    let ctx = gpu();
    let losses = train(&ctx, 2024);
    let first = losses[0];
    let last = losses[STEPS - 5..].iter().sum::<f64>() / 5.0;
    eprintln!("losses: {losses:?}");
    assert!(
        last < first / FALL,
        "loss fell from {first} to {last} only (need / {FALL})"
    );
    // Same seed, same adapter: the same losses bit for bit (no atomics anywhere).
    let again = train(&ctx, 2024);
    assert_eq!(losses, again, "training is not reproducible");
}

#[test]
fn a_nan_input_stops_training_naming_the_step() {
    let ctx = gpu();
    let m = model(&ctx, 1);
    let (mut x, y) = data(2);
    x[17] = f32::NAN;
    let mut adam = Adam::new(AdamConfig::default()).unwrap();
    let mut g = Graph::new(&ctx, Mode::Train);
    let xv = g.input(Tensor::from_slice(&ctx, Shape5::new(BATCH, 1, S, S, S), &x, "x").unwrap());
    let yv =
        g.input(Tensor::from_slice(&ctx, Shape5::new(BATCH, 1, S, S, S), &y, "labels").unwrap());
    let h = conv_bn_relu(&mut g, &m, &m.b1, xv);
    let (hw, hb) = (
        g.param(&m.store, m.head).unwrap(),
        g.param(&m.store, m.head_b).unwrap(),
    );
    let logits = g.conv3d(h, hw, Some(hb), Conv3dSpec::default()).unwrap();
    let loss = g.softmax_cross_entropy(logits, yv).unwrap();
    let grads = g.backward(loss).unwrap();
    adam.step(&ctx, g.recorder(), &m.store, &grads, 1e-3)
        .unwrap();
    let counts = non_finite_counts(&ctx, g.recorder(), &m.store).unwrap();
    g.submit();
    let value: Rc<Tensor> = g.value(loss).unwrap().clone();
    let l = value.to_vec(&ctx).unwrap()[0] as f64;
    let counts = counts.to_vec(&ctx).unwrap();
    // The NaN reaches the batch statistics and, through them, the running statistics
    // and the updated parameters, whatever the driver does with NaN in comparisons
    // (the loss itself may or may not be NaN).
    assert!(
        counts.iter().any(|&c| c > 0.0),
        "no NaN detected: {counts:?}"
    );
    let e = check_step(7, l, &counts, &m.store).unwrap_err();
    assert!(matches!(e, Error::Diverged { step: 7, .. }), "{e}");
    assert!(e.to_string().contains("step 7"), "{e}");
    // A clean step passes the same check.
    check_step(8, 0.5, &vec![0.0; counts.len()], &m.store).unwrap();
}
