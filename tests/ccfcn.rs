//! CC-3D-FCN: parameter counts of the published configuration (baseline and MixACB,
//! every form), forward shapes and input checks, a few training steps with a falling
//! loss, and equivalence of the eval-mode training graph with every converted form.

mod common;

use common::gpu;
use masnet_wgpu::autograd::{Graph, Mode, ParamStore, Var};
use masnet_wgpu::nn::ccfcn::{Ccfcn, CcfcnConfig};
use masnet_wgpu::nn::{BlockKind, ModelForm, Network};
use masnet_wgpu::ops::adam::AdamConfig;
use masnet_wgpu::ops::batchnorm::BatchNormSpec;
use masnet_wgpu::optim::Adam;
use masnet_wgpu::rng::Rng;
use masnet_wgpu::{GpuContext, Shape5, Tensor};

const FORMS: [ModelForm; 4] = [
    ModelForm::Fused,
    ModelForm::FusedMerged,
    ModelForm::Folded,
    ModelForm::FoldedMerged,
];

fn config(block: BlockKind) -> CcfcnConfig {
    CcfcnConfig {
        block,
        ..CcfcnConfig::default()
    }
}

/// (trainable, total) of the training graph and of each form in `FORMS`.
fn all_counts(ctx: &GpuContext, block: BlockKind) -> Vec<(usize, usize)> {
    let mut s = ParamStore::new();
    let m = Ccfcn::new(ctx, &mut s, config(block), 1).unwrap();
    let mut v = vec![common::counts(&s)];
    for form in FORMS {
        let (_, fs) = m.convert(ctx, &s, form).unwrap();
        v.push(common::counts(&fs));
    }
    v
}

#[test]
fn parameter_counts_of_the_published_configuration() {
    let ctx = gpu();
    let base = all_counts(&ctx, BlockKind::Conv);
    let mix = all_counts(&ctx, BlockKind::Mixacb);
    let names = [
        "training graph",
        "fused",
        "fused-merged",
        "folded",
        "folded-merged",
    ];
    for (name, (b, m)) in names.iter().zip(base.iter().zip(&mix)) {
        eprintln!(
            "{name:>15}: baseline trainable {:>9} total {:>9} | MixACB trainable {:>9} total {:>9}",
            b.0, b.1, m.0, m.1
        );
    }
    assert_eq!(
        base,
        vec![
            (1_385_988, 1_387_268),
            (1_385_988, 1_387_268),
            (1_385_988, 1_387_268),
            (1_384_708, 1_384_708),
            (1_384_708, 1_384_708),
        ],
        "baseline CC-3D-FCN"
    );
    assert_eq!(
        mix,
        vec![
            (2_038_948, 2_043_492),
            (1_221_060, 1_221_252),
            (5_398_980, 5_399_172),
            (1_220_868, 1_220_868),
            (5_398_788, 5_398_788),
        ],
        "CC-3D-FCN + MixACB"
    );
}

#[test]
fn every_kernel_is_glorot_uniform() {
    let ctx = gpu();
    let mut s = ParamStore::new();
    Ccfcn::new(&ctx, &mut s, CcfcnConfig::default(), 2).unwrap();
    let mut kernels = 0;
    for (id, e) in s.iter() {
        if !e.name.ends_with("weight") || e.name.ends_with("bn.weight") {
            continue;
        }
        kernels += 1;
        let [a, b, kd, kh, kw] = e.value.shape().0;
        let rf = kd * kh * kw;
        // Glorot needs fan_in + fan_out = (a + b) · k³ for conv [Cout, Cin, k..] and
        // transposed-conv [Cin, Cout, k..] weights alike.
        let limit = (6.0 / ((a + b) * rf) as f64).sqrt() as f32;
        let v = s.read(&ctx, id).unwrap();
        let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
        // Uniform on [-l, l): inside the bound and reaching close to it (He-normal
        // draws would pass 1.3 l).
        assert!(
            max <= limit && max > 0.9 * limit,
            "{}: max |w| {max} vs Glorot limit {limit}",
            e.name
        );
    }
    // 1 + 10 × 8 MixACB branches (2 groups × 4) + 3 transposed + 3 skip + head.
    assert_eq!(kernels, 1 + 80 + 3 + 3 + 1);
}

#[test]
fn forward_shapes_and_bad_input() {
    let ctx = gpu();
    let mut s = ParamStore::new();
    let m = Ccfcn::new(&ctx, &mut s, CcfcnConfig::default(), 3).unwrap();
    assert_eq!(m.input_multiple(), 8);
    assert_eq!(Network::channels(&m), (2, 4));
    let run = |shape: Shape5| {
        let mut g = Graph::no_grad(&ctx, Mode::Eval);
        let x = Rng::new(4).vec_f32(shape.numel().unwrap(), -1.0, 1.0);
        let xv = g.input(Tensor::from_slice(&ctx, shape, &x, "x").unwrap());
        let y = m
            .forward(&mut g, &s, xv)
            .map(|y| g.value(y).unwrap().shape());
        g.submit();
        y
    };
    // Odd but valid: three different multiples of 8, batch of two.
    let y = run(Shape5::new(2, 2, 8, 24, 16)).unwrap();
    assert_eq!(y, Shape5::new(2, 4, 8, 24, 16));
    for bad in [Shape5::new(1, 2, 8, 12, 16), Shape5::new(1, 3, 8, 8, 8)] {
        let e = run(bad).unwrap_err().to_string();
        assert!(e.contains("CC-3D-FCN input"), "{e}");
    }
    // Configurations that cannot be built are errors, not panics.
    for (cfg, what) in [
        (
            CcfcnConfig {
                decoder_layers: vec![1, 2],
                ..CcfcnConfig::default()
            },
            "up groups",
        ),
        (
            CcfcnConfig {
                encoder_layers: vec![3, 0, 1],
                ..CcfcnConfig::default()
            },
            "at least one conv",
        ),
        (
            CcfcnConfig {
                head_kernel: 2,
                ..CcfcnConfig::default()
            },
            "odd",
        ),
        (
            CcfcnConfig {
                form: ModelForm::Fused,
                ..CcfcnConfig::default()
            },
            "training form",
        ),
    ] {
        let e = Ccfcn::new(&ctx, &mut ParamStore::new(), cfg, 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains(what), "{e}");
    }
    // The configuration round-trips through TOML and rejects unknown keys.
    let cfg = CcfcnConfig::default();
    let text = toml::to_string(&cfg).unwrap();
    assert_eq!(toml::from_str::<CcfcnConfig>(&text).unwrap(), cfg);
    assert!(toml::from_str::<CcfcnConfig>("widths = [1]").is_err());
}

/// Three nested random boxes labelled 1..3 over background 0; the two channels
/// encode the label with noise, so the classes are learnable but not trivially.
fn batch(n: usize, size: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut rng = Rng::new(seed);
    let vox = size * size * size;
    let mut x = vec![0f32; n * 2 * vox];
    let mut y = vec![0f32; n * vox];
    for b in 0..n {
        for class in 1..=3usize {
            let lo: Vec<usize> = (0..3).map(|_| rng.below(size / 2)).collect();
            let hi: Vec<usize> = lo.iter().map(|&l| l + 3 + rng.below(size / 2)).collect();
            for z in lo[0]..hi[0].min(size) {
                for r in lo[1]..hi[1].min(size) {
                    for c in lo[2]..hi[2].min(size) {
                        y[b * vox + (z * size + r) * size + c] = class as f32;
                    }
                }
            }
        }
        for i in 0..vox {
            let class = y[b * vox + i] as usize;
            x[(b * 2) * vox + i] = class as f32 / 3.0 + rng.uniform_f32(-0.3, 0.3);
            x[(b * 2 + 1) * vox + i] = (class % 2) as f32 + rng.uniform_f32(-0.3, 0.3);
        }
    }
    (x, y)
}

/// A narrow CC-3D-FCN (same six-group layout, fewer channels) that trains in seconds
/// on a software adapter.
fn small(block: BlockKind) -> CcfcnConfig {
    CcfcnConfig {
        encoder_layers: vec![2, 1, 1],
        encoder_widths: vec![16, 16, 16],
        decoder_layers: vec![1, 1, 1],
        decoder_width: 8,
        skip_width: 8,
        block,
        ..CcfcnConfig::default()
    }
}

const STEPS: usize = 12;
/// The mean of the last 3 losses must be below the first loss divided by this.
const FALL: f64 = 4.0;

#[test]
fn a_few_training_steps_lower_the_loss() {
    let ctx = gpu();
    let (n, size) = (2, 16);
    let (x, y) = batch(n, size, 11);
    let mut s = ParamStore::new();
    let m = Ccfcn::new(&ctx, &mut s, small(BlockKind::Mixacb), 7).unwrap();
    let mut adam = Adam::new(AdamConfig::default()).unwrap();
    let mut losses = Vec::new();
    for _ in 0..STEPS {
        let mut g = Graph::new(&ctx, Mode::Train);
        let xs = Shape5::new(n, 2, size, size, size);
        let ys = Shape5::new(n, 1, size, size, size);
        let xv = g.input(Tensor::from_slice(&ctx, xs, &x, "x").unwrap());
        let yv = g.input(Tensor::from_slice(&ctx, ys, &y, "labels").unwrap());
        let logits = m.forward(&mut g, &s, xv).unwrap();
        let loss = g.softmax_cross_entropy(logits, yv).unwrap();
        let grads = g.backward(loss).unwrap();
        // Every trainable tensor (skip convs and transposed convs included) is used.
        let trainable = s.iter().filter(|(_, e)| e.kind.trainable()).count();
        assert_eq!(
            grads.len(),
            trainable,
            "every trainable tensor gets a gradient"
        );
        adam.step(&ctx, g.recorder(), &s, &grads, 3e-3).unwrap();
        g.submit();
        losses.push(g.value(loss).unwrap().to_vec(&ctx).unwrap()[0] as f64);
    }
    eprintln!("losses: {losses:?}");
    assert!(losses.iter().all(|l| l.is_finite()));
    let last = losses[STEPS - 3..].iter().sum::<f64>() / 3.0;
    assert!(
        last < losses[0] / FALL,
        "loss fell from {} to {last} only (need / {FALL})",
        losses[0]
    );
}

fn fusion_matches(block: BlockKind) {
    let ctx = gpu();
    let mut s = ParamStore::new();
    let mut m = Ccfcn::new(&ctx, &mut s, config(block), 5).unwrap();
    let xs = Shape5::new(1, 2, 16, 16, 16);
    let x = Rng::new(7).vec_f32(xs.numel().unwrap(), -1.0, 1.0);
    let input =
        |g: &mut Graph<'_>| -> Var { g.input(Tensor::from_slice(&ctx, xs, &x, "x").unwrap()) };
    // Running statistics = the batch statistics of one pass (momentum 0), then
    // perturbed: blind statistics would blow the logits up in a deep net.
    m.for_each_bn_mut(&mut |bn| bn.spec.momentum = 0.0);
    {
        let mut g = Graph::no_grad(&ctx, Mode::Train);
        let xv = input(&mut g);
        m.forward(&mut g, &s, xv).unwrap();
        g.submit();
        ctx.wait().unwrap();
    }
    m.for_each_bn_mut(&mut |bn| bn.spec = BatchNormSpec::keras());
    common::perturb_bn(&ctx, &s, 6, true);
    let probs = |model: &Ccfcn, store: &ParamStore| -> Vec<f32> {
        let mut g = Graph::no_grad(&ctx, Mode::Eval);
        let xv = input(&mut g);
        let logits = model.forward(&mut g, store, xv).unwrap();
        let p = g.softmax_channels(logits).unwrap();
        g.submit();
        p.to_vec(&ctx).unwrap()
    };
    let want = probs(&m, &s);
    for form in FORMS {
        let (fm, fs) = m.convert(&ctx, &s, form).unwrap();
        assert_eq!(fm.config.form, form);
        let d = common::max_abs_diff(&probs(&fm, &fs), &want);
        eprintln!("{block:?} {form:?}: max |diff| of the softmax {d}");
        assert!(
            d <= 1e-4,
            "{block:?} {form:?}: max |diff| of the softmax {d}"
        );
    }
    // A converted model cannot go back to the training form.
    assert!(m
        .convert(&ctx, &s, ModelForm::Fused)
        .and_then(|(fm, fs)| fm.convert(&ctx, &fs, ModelForm::Training))
        .is_err());
}

#[test]
fn mixacb_forms_equal_the_eval_graph() {
    fusion_matches(BlockKind::Mixacb);
}

#[test]
fn baseline_forms_equal_the_eval_graph() {
    fusion_matches(BlockKind::Conv);
}

/// Inference releases every value after its last use: six more layers at full
/// resolution leave the no-grad forward's peak memory as it was (each layer's output
/// alone is 256 KiB; kept, they would add at least 3 MiB).
#[test]
fn inference_peak_does_not_grow_with_depth() {
    let ctx = gpu();
    let peak = |layers: usize| {
        let mut s = ParamStore::new();
        let cfg = CcfcnConfig {
            encoder_layers: vec![layers, 1, 1],
            ..small(BlockKind::Conv)
        };
        let m = Ccfcn::new(&ctx, &mut s, cfg, 8).unwrap();
        common::inference_peak(&ctx, &m, &s, Shape5::new(1, 2, 16, 16, 16))
    };
    let (shallow, deep) = (peak(2), peak(8));
    eprintln!("CC-3D-FCN 16^3 inference peak: 2 top layers {shallow} B, 8 top layers {deep} B");
    let layer = 16 * 16 * 16 * 16 * 4;
    assert!(deep <= shallow + layer, "{shallow} B -> {deep} B");
}
