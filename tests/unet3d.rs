//! 3D U-Net (baseline and MixACB): exact parameter counts of every form, output shape
//! and input checks, a few Adam steps on the GPU with falling loss, and equivalence of
//! the eval-mode training graph with every converted form.

mod common;

use common::gpu;
use masnet_wgpu::autograd::{Graph, Mode, ParamStore, Var};
use masnet_wgpu::nn::unet3d::{Unet3d, Unet3dConfig};
use masnet_wgpu::nn::{BlockKind, ModelForm, Network};
use masnet_wgpu::ops::adam::AdamConfig;
use masnet_wgpu::ops::batchnorm::BatchNormSpec;
use masnet_wgpu::optim::{check_step, Adam};
use masnet_wgpu::rng::Rng;
use masnet_wgpu::{GpuContext, Shape5, Tensor};
use std::time::Instant;

fn config(block: BlockKind) -> Unet3dConfig {
    Unet3dConfig {
        block,
        ..Unet3dConfig::default()
    }
}

const FORMS: [ModelForm; 4] = [
    ModelForm::Fused,
    ModelForm::FusedMerged,
    ModelForm::Folded,
    ModelForm::FoldedMerged,
];

/// (trainable, total) per form for the default widths 32, 64, 128, 256.
#[test]
fn parameter_counts() {
    let t = Instant::now();
    let ctx = gpu();
    // block kind, training form, then Fused, FusedMerged, Folded, FoldedMerged.
    let expected: [(BlockKind, [(usize, usize); 5]); 2] = [
        (
            BlockKind::Conv,
            [
                (2_090_080, 2_091_488),
                (2_090_080, 2_091_488),
                (2_090_080, 2_091_488),
                (2_088_672, 2_088_672),
                (2_088_672, 2_088_672),
            ],
        ),
        (
            BlockKind::Mixacb,
            [
                (3_117_568, 3_123_008),
                (1_830_688, 1_830_752),
                (8_410_912, 8_410_976),
                (1_830_624, 1_830_624),
                (8_410_848, 8_410_848),
            ],
        ),
    ];
    for (kind, want) in expected {
        let mut s = ParamStore::new();
        let m = Unet3d::new(&ctx, &mut s, config(kind), 1).unwrap();
        let mut got = vec![common::counts(&s)];
        for form in FORMS {
            let (fm, fs) = m.convert(&ctx, &s, form).unwrap();
            assert_eq!(fm.form(), form);
            got.push(common::counts(&fs));
        }
        eprintln!("{kind:?} (trainable, total): training, fused, fused-merged, folded, folded-merged = {got:?}");
        assert_eq!(got, want.to_vec(), "{kind:?}");
    }
    // Folding removes every BN outside MixACB (4 scalars per channel, 2 of them
    // buffers); with MixACB that is only the input conv's 32 channels.
    eprintln!("parameter_counts: {:.1} s", t.elapsed().as_secs_f64());
}

#[test]
fn parameter_names_mirror_the_module_tree() {
    let ctx = gpu();
    let mut s = ParamStore::new();
    Unet3d::new(&ctx, &mut s, config(BlockKind::Conv), 1).unwrap();
    let names: Vec<&str> = s.iter().map(|(_, e)| e.name.as_str()).collect();
    for n in [
        "enc1.conv.weight",
        "enc1.bn.running_var",
        "enc4.conv3.conv.weight",
        "up3.conv.weight",
        "up1.conv.bias",
        "dec3.conv3.bn.weight",
        "dec1.conv3.conv.bias",
        "head.weight",
    ] {
        assert!(names.contains(&n), "{n} missing from {names:?}");
    }
    let mut s = ParamStore::new();
    Unet3d::new(&ctx, &mut s, Unet3dConfig::default(), 1).unwrap();
    s.id("dec2.mixacb.groups.1.sagittal.bn.running_mean")
        .unwrap();
    // The input conv (2 channels cannot be split 3:1) stays a plain conv.
    s.id("enc1.conv.weight").unwrap();
}

#[test]
fn forward_shape_and_bad_input() {
    let t = Instant::now();
    let ctx = gpu();
    let mut s = ParamStore::new();
    let m = Unet3d::new(&ctx, &mut s, Unet3dConfig::default(), 3).unwrap();
    assert_eq!(m.input_multiple(), 8);
    assert_eq!(Network::channels(&m), (2, 4));
    let run = |shape: Shape5| {
        let x = Rng::new(4).vec_f32(shape.numel().unwrap(), -1.0, 1.0);
        let mut g = Graph::no_grad(&ctx, Mode::Train);
        let xv = g.input(Tensor::from_slice(&ctx, shape, &x, "x").unwrap());
        let y = m.forward(&mut g, &s, xv);
        g.submit();
        y.map(|y| g.value(y).unwrap().shape())
    };
    // Odd but valid: anisotropic, N = 2.
    let y = run(Shape5::new(2, 2, 8, 24, 16)).unwrap();
    assert_eq!(y, Shape5::new(2, 4, 8, 24, 16));
    for bad in [
        Shape5::new(1, 2, 8, 12, 16),
        Shape5::new(1, 2, 4, 8, 8),
        Shape5::new(1, 3, 8, 8, 8),
    ] {
        let e = run(bad).unwrap_err().to_string();
        assert!(e.contains("3D U-Net input"), "{bad}: {e}");
    }
    // Bad configurations are errors too.
    for cfg in [
        Unet3dConfig {
            widths: vec![32],
            ..Unet3dConfig::default()
        },
        Unet3dConfig {
            widths: vec![32, 0, 64],
            ..Unet3dConfig::default()
        },
        Unet3dConfig {
            form: ModelForm::Fused,
            ..Unet3dConfig::default()
        },
    ] {
        assert!(Unet3d::new(&ctx, &mut ParamStore::new(), cfg.clone(), 1).is_err());
    }
    // A MixACB whose split leaves a group without input channels names the block.
    let e = Unet3d::new(
        &ctx,
        &mut ParamStore::new(),
        Unet3dConfig {
            widths: vec![2, 8],
            ..Unet3dConfig::default()
        },
        1,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("enc2.mixacb"), "{e}");
    // The configuration round-trips through serde and rejects unknown keys.
    let json = serde_json::to_string(&Unet3dConfig::default()).unwrap();
    let back: Unet3dConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(back, Unet3dConfig::default());
    assert!(serde_json::from_str::<Unet3dConfig>(r#"{"width": [1, 2]}"#).is_err());
    eprintln!(
        "forward_shape_and_bad_input: {:.1} s",
        t.elapsed().as_secs_f64()
    );
}

const S: usize = 16;
const BATCH: usize = 2;
const STEPS: usize = 10;
/// The final loss (mean of the last 3 steps) must be below the first one divided by this.
const FALL: f64 = 3.0;

/// Labels constant on random 4×4×4 cells; the two channels encode the class with noise
/// (channel 0 ≈ class / 3, channel 1 ≈ class odd), so the class is learnable locally.
fn data(seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut rng = Rng::new(seed);
    let cells = S / 4;
    let mut x = Vec::new();
    let mut y = Vec::new();
    for _ in 0..BATCH {
        let cls: Vec<usize> = (0..cells.pow(3)).map(|_| rng.below(4)).collect();
        let at = |z: usize, r: usize, c: usize| cls[((z / 4) * cells + r / 4) * cells + c / 4];
        let mut x0 = Vec::new();
        let mut x1 = Vec::new();
        for z in 0..S {
            for r in 0..S {
                for c in 0..S {
                    let k = at(z, r, c);
                    y.push(k as f32);
                    x0.push(k as f32 / 3.0 + rng.uniform_f32(-0.3, 0.3));
                    x1.push((k % 2) as f32 + rng.uniform_f32(-0.3, 0.3));
                }
            }
        }
        x.extend(x0);
        x.extend(x1);
    }
    (x, y)
}

fn train(ctx: &GpuContext, kind: BlockKind) -> Vec<f64> {
    let mut store = ParamStore::new();
    let m = Unet3d::new(ctx, &mut store, config(kind), 2024).unwrap();
    let (x, y) = data(7);
    let mut adam = Adam::new(AdamConfig {
        lr: 1e-3,
        ..AdamConfig::default()
    })
    .unwrap();
    let trainable = store.iter().filter(|(_, e)| e.kind.trainable()).count();
    let mut losses = Vec::new();
    for step in 0..STEPS {
        let mut g = Graph::new(ctx, Mode::Train);
        let xv = g.input(Tensor::from_slice(ctx, Shape5::new(BATCH, 2, S, S, S), &x, "x").unwrap());
        let yv =
            g.input(Tensor::from_slice(ctx, Shape5::new(BATCH, 1, S, S, S), &y, "labels").unwrap());
        let logits = Network::forward(&m, &mut g, &store, xv, step as u32).unwrap();
        let loss = g.softmax_cross_entropy(logits, yv).unwrap();
        let grads = g.backward(loss).unwrap();
        assert_eq!(
            grads.len(),
            trainable,
            "every trainable tensor gets a gradient"
        );
        adam.step(ctx, g.recorder(), &store, &grads, 1e-3).unwrap();
        g.submit();
        let ce = g.value(loss).unwrap().to_vec(ctx).unwrap()[0] as f64;
        check_step(step as u64 + 1, ce, &[], &store).unwrap();
        losses.push(ce);
    }
    losses
}

#[test]
fn a_few_adam_steps_reduce_the_loss() {
    let ctx = gpu();
    for kind in [BlockKind::Mixacb, BlockKind::Conv] {
        let t = Instant::now();
        let losses = train(&ctx, kind);
        let first = losses[0];
        let last = losses[STEPS - 3..].iter().sum::<f64>() / 3.0;
        eprintln!(
            "{kind:?}: {:.1} s, losses {losses:.4?}",
            t.elapsed().as_secs_f64()
        );
        assert!(
            last < first / FALL,
            "{kind:?}: loss fell from {first} to {last} only (need / {FALL})"
        );
    }
}

#[test]
fn every_converted_form_equals_the_eval_graph() {
    let ctx = gpu();
    let xs = Shape5::new(2, 2, S, S, S);
    let x = Rng::new(7).vec_f32(xs.numel().unwrap(), -1.0, 1.0);
    for kind in [BlockKind::Mixacb, BlockKind::Conv] {
        let t = Instant::now();
        let mut s = ParamStore::new();
        let mut m = Unet3d::new(&ctx, &mut s, config(kind), 5).unwrap();
        // Calibrate: every running statistic becomes the batch statistic of one pass
        // (momentum 0), then perturb them and randomise affine parameters and biases,
        // so eval-mode activations stay normalised and folding sees non-trivial BNs.
        m.for_each_bn_mut(|bn| bn.spec.momentum = 0.0);
        {
            let mut g = Graph::no_grad(&ctx, Mode::Train);
            let xv = g.input(Tensor::from_slice(&ctx, xs, &x, "x").unwrap());
            m.forward(&mut g, &s, xv).unwrap();
            g.submit();
            ctx.wait().unwrap();
        }
        m.for_each_bn_mut(|bn| bn.spec = BatchNormSpec::keras());
        common::perturb_bn(&ctx, &s, 6, true);
        let probs = |model: &Unet3d, store: &ParamStore| -> Vec<f32> {
            let mut g = Graph::no_grad(&ctx, Mode::Eval);
            let xv: Var = g.input(Tensor::from_slice(&ctx, xs, &x, "x").unwrap());
            let logits = model.forward(&mut g, store, xv).unwrap();
            let p = g.softmax_channels(logits).unwrap();
            g.submit();
            p.to_vec(&ctx).unwrap()
        };
        let want = probs(&m, &s);
        // The network must not be trivially saturated: probabilities vary.
        let spread = want.iter().cloned().fold(0.0f32, f32::max)
            - want.iter().cloned().fold(1.0f32, f32::min);
        assert!(spread > 0.1, "{kind:?}: softmax spread {spread}");
        for form in FORMS {
            let (fm, fs) = m.convert(&ctx, &s, form).unwrap();
            let d = common::max_abs_diff(&probs(&fm, &fs), &want);
            eprintln!("{kind:?} {form:?}: max |diff| of the softmax {d:.2e}");
            assert!(
                d <= 1e-4,
                "{kind:?} {form:?}: max |diff| of the softmax {d}"
            );
            // A converted form converts again (e.g. fused -> folded) to the same output.
            if form == ModelForm::Fused {
                let (fm2, fs2) = fm.convert(&ctx, &fs, ModelForm::Folded).unwrap();
                let d2 = common::max_abs_diff(&probs(&fm2, &fs2), &want);
                assert!(d2 <= 1e-4, "{kind:?} fused -> folded: {d2}");
            }
        }
        eprintln!("{kind:?} equivalence: {:.1} s", t.elapsed().as_secs_f64());
    }
}
