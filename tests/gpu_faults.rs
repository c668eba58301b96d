//! GPU faults and limits surface as `Err`, never as panics: a command that fails wgpu
//! validation, a lost device, a storage-binding limit lowered below what a window
//! needs (segmentation then shrinks its windows, or fails naming the limit).

mod common;

use masnet_wgpu::autograd::{Graph, Mode, ParamStore};
use masnet_wgpu::gpu::parse_bytes;
use masnet_wgpu::nn::{Dunet, DunetConfig, Model, ModelForm};
use masnet_wgpu::ops::elementwise::relu_forward;
use masnet_wgpu::rng::Rng;
use masnet_wgpu::segment::{segment_volume, SegmentOptions};
use masnet_wgpu::{Error, GpuContext, GpuOptions, Shape5, Tensor};

fn shape(n: usize) -> Shape5 {
    Shape5::new(1, 1, 1, 1, n)
}

#[test]
fn invalid_commands_become_errors_and_the_context_stays_usable() {
    let ctx = common::gpu();
    let t = Tensor::from_slice(&ctx, shape(4), &[1.0, -2.0, 3.0, -4.0], "t").unwrap();
    let bad = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("over-sized"),
        size: ctx.limits.max_buffer_size + 4096,
        usage: wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    });
    let mut rec = ctx.recorder();
    rec.encoder
        .copy_buffer_to_buffer(&bad, 0, t.buffer(), 0, 16);
    ctx.submit(rec);
    match t.to_vec(&ctx) {
        Err(Error::Gpu { message, .. }) => {
            assert!(message.contains("over-sized"), "{message}")
        }
        other => panic!("expected a captured wgpu error, got {other:?}"),
    }
    // The failed submission ran nothing: t is unchanged, and new work runs normally.
    assert_eq!(t.to_vec(&ctx).unwrap(), vec![1.0, -2.0, 3.0, -4.0]);
    let y = Tensor::empty(&ctx, shape(4), "y").unwrap();
    let mut rec = ctx.recorder();
    relu_forward(&ctx, &mut rec, &t, &y).unwrap();
    ctx.submit(rec);
    assert_eq!(y.to_vec(&ctx).unwrap(), vec![1.0, 0.0, 3.0, 0.0]);
}

fn assert_lost<T: std::fmt::Debug>(r: masnet_wgpu::Result<T>, what: &str) {
    match r {
        Err(e @ Error::DeviceLost(_)) => {
            let msg = e.to_string();
            assert!(msg.contains("device lost"), "{what}: {msg}");
        }
        other => panic!("{what}: expected DeviceLost, got {other:?}"),
    }
}

#[test]
fn a_lost_device_fails_every_later_call_without_panicking() {
    let ctx = common::gpu();
    let mut store = ParamStore::new();
    let cfg = DunetConfig {
        init_features: 4,
        growth: 4,
        layers_per_block: 1,
        bottleneck: 4,
        levels: 1,
        ..DunetConfig::default()
    };
    let model = Dunet::new(&ctx, &mut store, cfg, 3).unwrap();
    let x = Tensor::from_slice(&ctx, Shape5::new(1, 2, 8, 8, 8), &[0.5; 1024], "x").unwrap();
    ctx.device.destroy();
    // wgpu reports the loss when the device is next polled; calls before that must not
    // panic (they may still succeed).
    let mut rec = ctx.recorder();
    let _ = relu_forward(&ctx, &mut rec, &x, &x);
    ctx.submit(rec);
    let _ = Tensor::from_slice(&ctx, shape(4), &[0.0; 4], "before poll");
    assert_lost(x.to_vec(&ctx), "readback");
    assert_lost(ctx.alive(), "alive");
    assert_lost(Tensor::from_slice(&ctx, shape(4), &[0.0; 4], "u"), "upload");
    assert_lost(Tensor::empty(&ctx, shape(4), "e"), "allocation");
    let mut rec = ctx.recorder();
    assert_lost(relu_forward(&ctx, &mut rec, &x, &x), "launch");
    drop(rec);
    // A whole network forward: the first allocation or launch fails, cleanly.
    let mut g = Graph::no_grad(&ctx, Mode::Eval);
    let xv = g.input(x);
    assert_lost(model.forward(&mut g, &store, xv, 0), "DU-Net forward");
    assert_lost(ctx.wait(), "wait");
}

#[test]
fn byte_counts_parse_with_units() {
    assert_eq!(parse_bytes("4096").unwrap(), 4096);
    assert_eq!(parse_bytes("64MiB").unwrap(), 64 << 20);
    assert_eq!(parse_bytes(" 2 GiB ").unwrap(), 2 << 30);
    assert_eq!(parse_bytes("3KiB").unwrap(), 3072);
    for bad in ["", "0", "-1", "12MB", "lots", "99999999999999999999GiB"] {
        let e = parse_bytes(bad).unwrap_err().to_string();
        assert!(e.contains("byte count"), "{bad}: {e}");
    }
}

fn capped(bytes: u64) -> GpuContext {
    let mut o = GpuOptions::from_env().unwrap();
    o.max_binding = Some(bytes);
    GpuContext::new(&o).unwrap()
}

#[test]
fn a_lowered_binding_limit_refuses_big_tensors_up_front() {
    let ctx = capped(4096);
    assert_eq!(ctx.max_binding_bytes(), 4096);
    assert!(Tensor::empty(&ctx, shape(1024), "fits").is_ok());
    match Tensor::empty(&ctx, shape(1025), "too big") {
        Err(e @ Error::Limit(_)) => {
            let m = e.to_string();
            assert!(
                m.contains("too big") && m.contains("4100") && m.contains("4096"),
                "{m}"
            );
        }
        other => panic!("expected Limit, got {other:?}"),
    }
}

/// A small random DU-Net (2 levels: windows are multiples of 4) in folded form, and a
/// synthetic 20×18×22 volume with a brain mask.
fn tiny_model(ctx: &GpuContext) -> (Model, ParamStore) {
    let cfg = DunetConfig {
        init_features: 8,
        growth: 4,
        layers_per_block: 1,
        bottleneck: 8,
        levels: 2,
        ..DunetConfig::default()
    };
    let mut store = ParamStore::new();
    let m = Model::Dunet(Dunet::new(ctx, &mut store, cfg, 11).unwrap());
    m.convert(ctx, &store, ModelForm::Folded).unwrap()
}

const DIMS: [usize; 3] = [20, 18, 22];

fn volume() -> (Vec<f32>, Vec<f32>, Vec<bool>) {
    let n = DIMS.iter().product();
    let mut rng = Rng::new(5);
    let t1 = rng.vec_f32(n, -1.0, 1.0);
    let t2 = rng.vec_f32(n, -1.0, 1.0);
    let mask = (0..n).map(|i| i % 7 != 0).collect();
    (t1, t2, mask)
}

#[test]
fn segmentation_shrinks_windows_to_fit_a_lowered_limit() {
    let (t1, t2, mask) = volume();
    let want = SegmentOptions {
        patch: 16,
        step: 8,
        batch: 4,
        blend: false,
    };
    // 64 KiB: a 16³ window of 8 channels (128 KiB) does not fit, 8³ ones (16 KiB) do
    // (the largest packed weight is 34 KiB).
    let small = capped(64 << 10);
    let (m, s) = tiny_model(&small);
    let got = segment_volume(&small, &m, &s, &t1, &t2, &mask, DIMS, want, |_, _| {}).unwrap();
    assert!(got.used.patch < want.patch, "used {:?}", got.used);
    assert_eq!(got.used.batch, 1);
    assert_eq!(got.labels.len(), DIMS.iter().product::<usize>());
    // Same answer as an unlimited adapter running the geometry that was used.
    let full = common::gpu();
    let (m2, s2) = tiny_model(&full);
    let reference =
        segment_volume(&full, &m2, &s2, &t1, &t2, &mask, DIMS, got.used, |_, _| {}).unwrap();
    assert_eq!(reference.used, got.used);
    assert_eq!(reference.labels, got.labels);
    for (a, b) in reference.probs.iter().zip(&got.probs) {
        common::assert_close(a, b, 1e-5, 1e-6, "probabilities under the lowered limit");
    }

    // Whole-volume tiles shrink the same way and keep their blending.
    let tiles = SegmentOptions::tiles(64, 4, 4, DIMS).unwrap();
    assert_eq!((tiles.patch, tiles.step, tiles.batch), (24, 20, 1));
    let got = segment_volume(&small, &m, &s, &t1, &t2, &mask, DIMS, tiles, |_, _| {}).unwrap();
    assert!(
        got.used.patch < tiles.patch && got.used.blend,
        "{:?}",
        got.used
    );

    // Too low for even the smallest window, though the model's weights fit (here the
    // packed input of a 4³ window, its W extent rounded up to a 16-voxel tile: 31,104
    // bytes): an error naming the limit and the remedy.
    let tiny = capped(30_000);
    let (m, s) = tiny_model(&tiny);
    let e = segment_volume(&tiny, &m, &s, &t1, &t2, &mask, DIMS, want, |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("30000") && e.contains("--max-binding"),
        "message should name the limit and the remedy: {e}"
    );
}

#[test]
fn blending_ramps_weight_tiles_towards_their_inner_edges() {
    use masnet_wgpu::data::sampler::ProbAccumulator;
    use masnet_wgpu::segment::blend_ramp;
    // A tile at the volume's start: full weight there, ramp down over 3 voxels at its
    // inner end; a middle tile ramps at both ends; a tile reaching the end keeps 1 there.
    assert_eq!(
        blend_ramp(6, 0, 10, 3),
        vec![1.0, 1.0, 1.0, 0.75, 0.5, 0.25]
    );
    assert_eq!(
        blend_ramp(6, 2, 10, 3),
        vec![0.25, 0.5, 0.75, 0.75, 0.5, 0.25]
    );
    assert_eq!(
        blend_ramp(6, 4, 10, 3),
        vec![0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    );
    assert_eq!(blend_ramp(4, 0, 4, 3), vec![1.0; 4]);
    // Two 1-D tiles over x = 0..10 (6 voxels each, overlap 2): class-1 probability 1.0
    // from the left tile, 0.0 from the right; in the overlap the result is the weighted
    // mean, elsewhere the tile's own value.
    let mut acc = ProbAccumulator::new([10, 1, 1], 2).unwrap();
    let tile = |p1: f32| [vec![1.0 - p1; 6], vec![p1; 6]].concat();
    for (start, p1) in [(0usize, 1.0f32), (4, 0.0)] {
        let w = blend_ramp(6, start, 10, 2);
        acc.add_weighted(
            [start, 0, 0],
            [6, 1, 1],
            &tile(p1),
            Some([&w, &[1.0], &[1.0]]),
        )
        .unwrap();
    }
    let (labels, probs) = acc.finish();
    let l = blend_ramp(6, 0, 10, 2);
    let r = blend_ramp(6, 4, 10, 2);
    for x in 0..10 {
        let (wl, wr) = (
            if x < 6 { l[x] } else { 0.0 },
            if x >= 4 { r[x - 4] } else { 0.0 },
        );
        let want = wl / (wl + wr);
        assert!(
            (probs[1][x] - want).abs() < 1e-6,
            "x={x}: {} vs {want}",
            probs[1][x]
        );
        assert_eq!(labels[x], u8::from(want > 0.5), "x={x}");
    }
    // Non-positive weights are refused.
    let mut acc = ProbAccumulator::new([4, 1, 1], 1).unwrap();
    let e = acc
        .add_weighted(
            [0, 0, 0],
            [4, 1, 1],
            &[1.0; 4],
            Some([&[1.0, 0.0, 1.0, 1.0], &[1.0], &[1.0]]),
        )
        .unwrap_err();
    assert!(e.to_string().contains("axis 0"), "{e}");
}
