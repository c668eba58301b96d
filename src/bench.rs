//! Benchmark workloads shared by `masnet-wgpu bench` and the criterion benches:
//! each returns the median wall time of a GPU op and its GFLOP/s.

use crate::error::Result;
use crate::gpu::GpuContext;
use crate::ops::conv3d::{conv3d_check, conv3d_flops, conv3d_forward, Conv3dSpec, Conv3dVariant};
use crate::rng::Rng;
use crate::tensor::{Shape5, Tensor};
use serde::Serialize;
use std::time::Instant;

/// One benchmark result, printed as a table row or a JSON line.
#[derive(Clone, Debug, Default, Serialize)]
pub struct BenchResult {
    /// Workload name, e.g. `conv3d.fwd.W1`.
    pub name: String,
    /// Median milliseconds per run.
    pub ms: f64,
    /// Useful GFLOP/s at the median.
    pub gflops: f64,
    /// Adapter it ran on.
    pub adapter: String,
    /// Peak bytes of live tensors during one run, in MiB (where measured).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_mib: Option<f64>,
    /// Mean Dice of CSF, GM and WM (segmentation benchmarks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dice: Option<f64>,
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 20)
}

/// A conv3d workload: batch, channels, cube size, kernel.
#[derive(Clone, Debug)]
pub struct ConvWorkload {
    /// Name reported.
    pub name: &'static str,
    /// Batch.
    pub n: usize,
    /// Input channels.
    pub cin: usize,
    /// Output channels.
    pub cout: usize,
    /// Cube edge.
    pub size: usize,
    /// Kernel extents.
    pub kernel: [usize; 3],
}

/// The standard forward workloads: W1 (3x3x3), W2 (the three asymmetric kernels), W3 (5x5x5),
/// and a DenseNet bottleneck (1x1x1).
pub fn conv_workloads() -> Vec<ConvWorkload> {
    let w = |name, cin, cout, kernel| ConvWorkload {
        name,
        n: 2,
        cin,
        cout,
        size: 32,
        kernel,
    };
    vec![
        w("conv3d.fwd.W1", 32, 32, [3, 3, 3]),
        w("conv3d.fwd.W2.1x3x3", 32, 32, [1, 3, 3]),
        w("conv3d.fwd.W2.3x1x3", 32, 32, [3, 1, 3]),
        w("conv3d.fwd.W2.3x3x1", 32, 32, [3, 3, 1]),
        w("conv3d.fwd.W3", 8, 8, [5, 5, 5]),
        // A DenseNet bottleneck (DU-Net's dense7: 1x1x1, C194->64), the pointwise kernel.
        w("conv3d.fwd.bottleneck", 194, 64, [1, 1, 1]),
    ]
}

/// Median of `reps` timed runs of `f` (after one warm-up run).
pub fn median_ms(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

/// One prepared benchmark: its name, FLOPs per run, and a closure that records,
/// submits and waits for one run.
pub struct Runner<'a> {
    /// Row name.
    pub name: String,
    /// Floating-point operations of one run.
    pub flops: f64,
    /// One run (record, submit, wait).
    pub run: Box<dyn FnMut() -> Result<()> + 'a>,
}

/// Median milliseconds of each runner after one warm-up run of each, the runners taking
/// turns rep by rep so a shared machine's drifting speed affects them alike.
pub fn round_robin(
    ctx: &GpuContext,
    reps: usize,
    mut runners: Vec<Runner<'_>>,
) -> Result<Vec<BenchResult>> {
    let mut times = vec![Vec::new(); runners.len()];
    for rep in 0..=reps.max(1) {
        for (r, t) in runners.iter_mut().zip(times.iter_mut()) {
            let s = Instant::now();
            (r.run)()?;
            if rep > 0 {
                t.push(s.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    Ok(runners
        .iter()
        .zip(times.iter_mut())
        .map(|(r, t)| {
            t.sort_by(f64::total_cmp);
            let ms = t[t.len() / 2];
            BenchResult {
                name: r.name.clone(),
                ms,
                gflops: r.flops / (ms * 1e6),
                adapter: ctx.adapter_name(),
                ..BenchResult::default()
            }
        })
        .collect())
}

/// A conv3d forward workload with the given kernel variant, ready to time.
pub fn conv_forward_runner<'a>(
    ctx: &'a GpuContext,
    w: &ConvWorkload,
    variant: Conv3dVariant,
) -> Result<Runner<'a>> {
    let xs = Shape5::new(w.n, w.cin, w.size, w.size, w.size);
    let [kd, kh, kw] = w.kernel;
    let ws = Shape5::new(w.cout, w.cin, kd, kh, kw);
    let spec = Conv3dSpec::same(w.kernel);
    let os = conv3d_check(xs, (0, w.cin), ws, Some(w.cout), &spec)?;
    let t = random_operands(ctx, 1, xs, ws, w.cout, os)?;
    Ok(op_runner(
        ctx,
        w.name.to_string(),
        conv3d_flops(os, ws),
        t,
        spec,
        variant,
        conv3d_forward,
    ))
}

/// Signature shared by the conv and transposed-conv forward launchers.
type ConvLikeOp<S> = fn(
    &GpuContext,
    &mut crate::gpu::Recorder,
    crate::tensor::ChannelSlice<'_>,
    &Tensor,
    Option<&Tensor>,
    crate::tensor::ChannelSlice<'_>,
    &S,
    Conv3dVariant,
) -> Result<()>;

/// Uniform random input, weight and bias (`seed`) and an output tensor.
fn random_operands(
    ctx: &GpuContext,
    seed: u64,
    xs: Shape5,
    ws: Shape5,
    cout: usize,
    os: Shape5,
) -> Result<[Tensor; 4]> {
    let mut rng = Rng::new(seed);
    Ok([
        Tensor::from_slice(ctx, xs, &rng.vec_f32(xs.numel()?, -1.0, 1.0), "x")?,
        Tensor::from_slice(ctx, ws, &rng.vec_f32(ws.numel()?, -0.1, 0.1), "w")?,
        Tensor::from_slice(
            ctx,
            Shape5::new(1, cout, 1, 1, 1),
            &rng.vec_f32(cout, -0.1, 0.1),
            "b",
        )?,
        Tensor::empty(ctx, os, "out")?,
    ])
}

/// A runner recording `op` on operands `[x, w, b, out]` (all channels), then submitting
/// and waiting.
fn op_runner<'a, S: 'a>(
    ctx: &'a GpuContext,
    name: String,
    flops: f64,
    [x, wt, b, out]: [Tensor; 4],
    spec: S,
    variant: Conv3dVariant,
    op: ConvLikeOp<S>,
) -> Runner<'a> {
    Runner {
        name,
        flops,
        run: Box::new(move || {
            let mut rec = ctx.recorder();
            op(
                ctx,
                &mut rec,
                x.all(),
                &wt,
                Some(&b),
                out.all(),
                &spec,
                variant,
            )?;
            ctx.submit(rec);
            ctx.wait()
        }),
    }
}

/// Times one conv3d forward workload with the given kernel variant.
pub fn bench_conv_forward(
    ctx: &GpuContext,
    w: &ConvWorkload,
    variant: Conv3dVariant,
    reps: usize,
) -> Result<BenchResult> {
    let r = conv_forward_runner(ctx, w, variant)?;
    Ok(round_robin(ctx, reps, vec![r])?.remove(0))
}

/// Times conv3d backward for W1: input gradient (`conv3d.bwd_input.W1`) and weight
/// gradient (`conv3d.bwd_weight.W1`); FLOPs counted as for the forward.
pub fn bench_conv_backward_w1(ctx: &GpuContext, reps: usize) -> Result<Vec<BenchResult>> {
    use crate::ops::conv3d_backward::{conv3d_backward_input, conv3d_backward_weight};
    let w = &conv_workloads()[0];
    let mut rng = Rng::new(2);
    let xs = Shape5::new(w.n, w.cin, w.size, w.size, w.size);
    let ws = Shape5::new(w.cout, w.cin, 3, 3, 3);
    let spec = Conv3dSpec::same(w.kernel);
    let os = conv3d_check(xs, (0, w.cin), ws, None, &spec)?;
    let x = Tensor::from_slice(ctx, xs, &rng.vec_f32(xs.numel()?, -1.0, 1.0), "x")?;
    let wt = Tensor::from_slice(ctx, ws, &rng.vec_f32(ws.numel()?, -0.1, 0.1), "w")?;
    let g = Tensor::from_slice(ctx, os, &rng.vec_f32(os.numel()?, -1.0, 1.0), "dy")?;
    let dx = Tensor::empty(ctx, xs, "dx")?;
    let dw = Tensor::empty(ctx, ws, "dw")?;
    let flops = conv3d_flops(os, ws);
    let input_ms = median_ms(reps, || {
        let mut rec = ctx.recorder();
        conv3d_backward_input(
            ctx,
            &mut rec,
            g.all(),
            &wt,
            dx.all(),
            &spec,
            Conv3dVariant::Auto,
        )?;
        ctx.submit(rec);
        ctx.wait()
    })?;
    let weight_ms = median_ms(reps, || {
        let mut rec = ctx.recorder();
        conv3d_backward_weight(
            ctx,
            &mut rec,
            x.all(),
            g.all(),
            &dw,
            &spec,
            Conv3dVariant::Auto,
        )?;
        ctx.submit(rec);
        ctx.wait()
    })?;
    Ok([
        ("conv3d.bwd_input.W1", input_ms),
        ("conv3d.bwd_weight.W1", weight_ms),
    ]
    .into_iter()
    .map(|(name, ms)| BenchResult {
        name: name.to_string(),
        ms,
        gflops: flops / (ms * 1e6),
        adapter: ctx.adapter_name(),
        ..BenchResult::default()
    })
    .collect())
}

/// A transposed-conv forward workload (Keras "same": n -> n * stride).
#[derive(Clone, Debug)]
pub struct TconvWorkload {
    /// Name reported (the dilated form gets `.dilated` appended).
    pub name: &'static str,
    /// Batch.
    pub n: usize,
    /// Input channels.
    pub cin: usize,
    /// Output channels.
    pub cout: usize,
    /// Input cube edge.
    pub size: usize,
    /// Kernel edge.
    pub kernel: usize,
    /// Stride (the up-sampling factor).
    pub stride: usize,
    /// Whether the zero-inserted form is timed too (too slow for the large ones).
    pub dilated: bool,
}

/// The decoder up-sampling workloads: the N2 C64->32 16^3 -> 32^3 (k=2 and k=3,
/// stride 2), and DU-Net's largest, trans6 (N1 C229->114 16^3 -> 32^3, k=3 s=2).
pub fn tconv_workloads() -> Vec<TconvWorkload> {
    let w = |name, kernel| TconvWorkload {
        name,
        n: 2,
        cin: 64,
        cout: 32,
        size: 16,
        kernel,
        stride: 2,
        dilated: true,
    };
    let up6 = TconvWorkload {
        n: 1,
        cin: 229,
        cout: 114,
        dilated: false,
        ..w("convT.fwd.k3s2.dunet_up6", 3)
    };
    vec![w("convT.fwd.k2s2", 2), w("convT.fwd.k3s2", 3), up6]
}

/// One transposed-conv forward workload in the phase form (`dilated`: false, the
/// operator) or the dilated form it replaced (zeros inserted, dense convolution), ready
/// to time. FLOPs count the useful work `2 N Cin Cout k^3 n_in^3` for both.
pub fn tconv_forward_runner<'a>(
    ctx: &'a GpuContext,
    w: &TconvWorkload,
    dilated: bool,
    variant: Conv3dVariant,
) -> Result<Runner<'a>> {
    use crate::ops::conv_transpose3d::{
        conv_transpose3d_check, conv_transpose3d_flops, conv_transpose3d_forward,
        conv_transpose3d_forward_dilated, ConvTranspose3dSpec,
    };
    let xs = Shape5::new(w.n, w.cin, w.size, w.size, w.size);
    let k = w.kernel;
    let ws = Shape5::new(w.cin, w.cout, k, k, k);
    let spec = ConvTranspose3dSpec::keras_same([k; 3], [w.stride; 3]);
    let os = conv_transpose3d_check(xs, w.cin, ws, Some(w.cout), &spec)?;
    let t = random_operands(ctx, 5, xs, ws, w.cout, os)?;
    let name = if dilated {
        format!("{}.dilated", w.name)
    } else {
        w.name.to_string()
    };
    let op: ConvLikeOp<ConvTranspose3dSpec> = if dilated {
        conv_transpose3d_forward_dilated
    } else {
        conv_transpose3d_forward
    };
    Ok(op_runner(
        ctx,
        name,
        conv_transpose3d_flops(xs, ws),
        t,
        spec,
        variant,
        op,
    ))
}

/// Times one transposed-conv forward workload (see [`tconv_forward_runner`]).
pub fn bench_tconv_forward(
    ctx: &GpuContext,
    w: &TconvWorkload,
    dilated: bool,
    variant: Conv3dVariant,
    reps: usize,
) -> Result<BenchResult> {
    let r = tconv_forward_runner(ctx, w, dilated, variant)?;
    Ok(round_robin(ctx, reps, vec![r])?.remove(0))
}

/// A named graph builder for [`bench_graphs`].
type GraphBuild<'a> = (
    &'a str,
    Box<dyn FnMut(&mut crate::autograd::Graph<'_>) -> Result<()> + 'a>,
);

/// Times the no-grad eval-mode forward of each graph (built by its closure), reporting
/// each graph's own FLOP count and the most live tensor bytes above what was live before
/// it (activations and temporaries; weights and their cached packings stay resident). The forms run round-robin, one rep
/// of each in turn after a warm-up of each, so a shared machine's drifting speed
/// affects them alike and their ratios hold within the run.
fn bench_graphs(
    ctx: &GpuContext,
    reps: usize,
    mut forms: Vec<GraphBuild<'_>>,
) -> Result<Vec<BenchResult>> {
    use crate::autograd::{Graph, Mode};
    let mut times = vec![Vec::new(); forms.len()];
    let mut flops = vec![0.0; forms.len()];
    let mut peaks = vec![0u64; forms.len()];
    for rep in 0..=reps.max(1) {
        for (i, (_, build)) in forms.iter_mut().enumerate() {
            ctx.wait()?;
            ctx.pool.reset_peak();
            let resident = ctx.pool.memory().in_use;
            let start = Instant::now();
            let mut g = Graph::no_grad(ctx, Mode::Eval);
            build(&mut g)?;
            flops[i] = g.forward_flops();
            g.submit();
            ctx.wait()?;
            drop(g);
            let peak = ctx.pool.memory().peak_in_use.saturating_sub(resident);
            peaks[i] = peaks[i].max(peak);
            // Rep 0 warms up (pipelines, tuning, packed weights).
            if rep > 0 {
                times[i].push(start.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    Ok(forms
        .iter()
        .zip(times.iter_mut())
        .enumerate()
        .map(|(i, ((name, _), t))| {
            t.sort_by(f64::total_cmp);
            let ms = t[t.len() / 2];
            BenchResult {
                name: name.to_string(),
                ms,
                gflops: flops[i] / (ms * 1e6),
                adapter: ctx.adapter_name(),
                peak_mib: Some(mib(peaks[i])),
                dice: None,
            }
        })
        .collect())
}

/// MixACB of a dense layer (N2 C64->16 32^3, the paper's 3:1 split) in its three
/// inference forms: branched eval graph (`mixacb.branched`: 8 convs + 8 BNs + sums +
/// concat), one conv per group writing its channel range (`mixacb.fused`), one
/// block-diagonal 5x5x5 conv (`mixacb.merged`). GFLOP/s counts each form's own work.
pub fn bench_mixacb(ctx: &GpuContext, reps: usize) -> Result<Vec<BenchResult>> {
    use crate::autograd::ParamStore;
    use crate::nn::layers::Builder;
    use crate::nn::mixacb::{MixAcb, MixSpec};
    use crate::ops::batchnorm::BatchNormSpec;
    let mut store = ParamStore::new();
    let mut rng = Rng::new(3);
    let block = MixAcb::new(
        &mut Builder::new(ctx, &mut store, &mut rng).sub("m"),
        64,
        16,
        1,
        &MixSpec::default(),
        BatchNormSpec::keras(),
    )?;
    let mut fs = ParamStore::new();
    let mut r2 = Rng::new(0);
    let fused = block.fuse(
        ctx,
        &store,
        &mut Builder::new(ctx, &mut fs, &mut r2).sub("m"),
        false,
    )?;
    let mut ms_ = ParamStore::new();
    let merged = block.fuse(
        ctx,
        &store,
        &mut Builder::new(ctx, &mut ms_, &mut r2).sub("m"),
        true,
    )?;
    for st in [&store, &fs, &ms_] {
        st.freeze();
    }
    let xs = Shape5::new(2, 64, 32, 32, 32);
    let x = std::rc::Rc::new(Tensor::from_slice(
        ctx,
        xs,
        &rng.vec_f32(xs.numel()?, -1.0, 1.0),
        "x",
    )?);
    let input = |g: &mut crate::autograd::Graph<'_>| g.input_shared(x.clone());
    bench_graphs(
        ctx,
        reps,
        vec![
            (
                "mixacb.branched",
                Box::new(|g| {
                    let xv = input(g);
                    block.forward(g, &store, xv, 0).map(|_| ())
                }),
            ),
            (
                "mixacb.fused",
                Box::new(|g| {
                    let xv = input(g);
                    fused.forward(g, &fs, xv, 0).map(|_| ())
                }),
            ),
            (
                "mixacb.merged",
                Box::new(|g| {
                    let xv = input(g);
                    merged.forward(g, &ms_, xv, 0).map(|_| ())
                }),
            ),
        ],
    )
}

/// DU-Net+MixACB (paper configuration) forward on one 32^3 two-channel patch, eval
/// mode, in each form: `dunet.forward.branched` (training graph), `.fused` (one conv
/// per MixACB group), `.merged` (one block-diagonal conv per MixACB), `.folded` (per
/// group, every BN folded), `.folded_merged` (merged, every BN folded).
pub fn bench_dunet_forward(ctx: &GpuContext, reps: usize) -> Result<Vec<BenchResult>> {
    use crate::autograd::ParamStore;
    use crate::nn::{Dunet, DunetConfig, ModelForm};
    let mut store = ParamStore::new();
    let model = Dunet::new(ctx, &mut store, DunetConfig::default(), 1)?;
    // Inference in every form: weights fixed, so their packed layouts are computed once
    // (as `segment` does), for the branched graph too.
    store.freeze();
    let xs = Shape5::new(1, 2, 32, 32, 32);
    let mut rng = Rng::new(4);
    let x = std::rc::Rc::new(Tensor::from_slice(
        ctx,
        xs,
        &rng.vec_f32(xs.numel()?, -1.0, 1.0),
        "x",
    )?);
    let mut converted = Vec::new();
    for (form, name) in [
        (ModelForm::Fused, "dunet.forward.fused"),
        (ModelForm::FusedMerged, "dunet.forward.merged"),
        (ModelForm::Folded, "dunet.forward.folded"),
        (ModelForm::FoldedMerged, "dunet.forward.folded_merged"),
    ] {
        let (m, s) = model.convert(ctx, &store, form)?;
        s.freeze();
        converted.push((name, m, s));
    }
    let mut forms: Vec<GraphBuild<'_>> = vec![(
        "dunet.forward.branched",
        Box::new(|g| {
            let xv = g.input_shared(x.clone());
            model.forward(g, &store, xv, 0).map(|_| ())
        }),
    )];
    for (name, m, s) in &converted {
        let x = x.clone();
        forms.push((
            name,
            Box::new(move |g| {
                let xv = g.input_shared(x.clone());
                m.forward(g, s, xv, 0).map(|_| ())
            }),
        ));
    }
    bench_graphs(ctx, reps, forms)
}

/// One DU-Net+MixACB training step (paper configuration, `batch` × 32³ patches: forward,
/// backward, Adam, loss read back) as `dunet.train_step.b<batch>`, with the peak bytes
/// of live tensors (parameters, Adam moments, activations kept for backward,
/// gradients). GFLOP/s counts 3 × the forward's FLOPs (forward, input and weight
/// gradients), the usual convention.
pub fn bench_train_step(ctx: &GpuContext, batch: usize, reps: usize) -> Result<BenchResult> {
    use crate::autograd::{Graph, Mode};
    use crate::nn::{DunetConfig, ModelConfig};
    use crate::train::{TrainOptions, Trainer};
    let options = TrainOptions {
        batch,
        patch: 32,
        ..TrainOptions::default()
    };
    let dir = std::env::temp_dir();
    let mut trainer = Trainer::new(
        ctx,
        ModelConfig::Dunet(DunetConfig::default()),
        options,
        0,
        &dir,
    )?;
    let mut rng = Rng::new(9);
    let voxels = batch * 32 * 32 * 32;
    let x = rng.vec_f32(2 * voxels, -1.0, 1.0);
    let y: Vec<f32> = (0..voxels).map(|_| (rng.next_u64() % 4) as f32).collect();
    // FLOPs scale with the batch: count one patch (an inference graph, so nothing here
    // allocates more than the training step itself).
    let flops = {
        let mut g = Graph::no_grad(ctx, Mode::Eval);
        let xv = g.input(Tensor::from_slice(
            ctx,
            Shape5::new(1, 2, 32, 32, 32),
            &x[..2 * 32 * 32 * 32],
            "x",
        )?);
        trainer.model.forward(&mut g, &trainer.store, xv, 0)?;
        g.forward_flops() * batch as f64
    };
    // The first step creates the Adam moments; the peak covers the steady state.
    trainer.train_step(&x, &y, 1e-4)?;
    ctx.pool.reset_peak();
    let ms = median_ms(reps, || trainer.train_step(&x, &y, 1e-4).map(|_| ()))?;
    Ok(BenchResult {
        name: format!("dunet.train_step.b{batch}"),
        ms,
        gflops: 3.0 * flops / (ms * 1e6),
        adapter: ctx.adapter_name(),
        peak_mib: Some(mib(ctx.pool.memory().peak_in_use)),
        dice: None,
    })
}

/// Least-squares line through `(batch, peak MiB)` points of training steps: (MiB at
/// batch 0, MiB per sample), to estimate batches an adapter cannot bind. `None` with
/// fewer than two distinct batches.
pub fn peak_per_sample(points: &[(usize, f64)]) -> Option<(f64, f64)> {
    let n = points.len() as f64;
    let mean_b = points.iter().map(|p| p.0 as f64).sum::<f64>() / n;
    let mean_m = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sbb: f64 = points.iter().map(|p| (p.0 as f64 - mean_b).powi(2)).sum();
    if points.len() < 2 || sbb == 0.0 {
        return None;
    }
    let sbm: f64 = points
        .iter()
        .map(|p| (p.0 as f64 - mean_b) * (p.1 - mean_m))
        .sum();
    let slope = sbm / sbb;
    Some((mean_m - slope * mean_b, slope))
}

/// Segmentation of the embedded brain with `model` in both modes: the paper's 32³
/// windows at step 8 (`segment.windows32_step8`) and whole-volume tiles of edge `tile`
/// overlapping by 16 (`segment.tiles<tile>`); time per volume, peak tensor memory and
/// mean Dice (CSF, GM, WM) on the held-out hemisphere (x >= 49) of the demo.
pub fn bench_segment(
    ctx: &GpuContext,
    model: &crate::nn::Model,
    store: &crate::autograd::ParamStore,
    tile: usize,
    reps: usize,
) -> Result<Vec<BenchResult>> {
    use crate::data::preprocess::zscore;
    use crate::data::volume::load_embedded;
    use crate::metrics::dice;
    use crate::segment::{segment_volume, SegmentOptions};
    let brain = load_embedded()?;
    let dims = brain.t1.dims;
    let mask: Vec<bool> = brain.mask.data.iter().map(|&v| v > 0.5).collect();
    let t1 = zscore(&brain.t1.data, Some(&mask))?;
    let t2 = zscore(&brain.t2.data, Some(&mask))?;
    let held_out = |v: &[u8]| -> Vec<u8> {
        v.iter()
            .enumerate()
            .filter(|(i, _)| i % dims[0] >= 49)
            .map(|(_, &l)| l)
            .collect()
    };
    let truth = held_out(&brain.labels);
    let modes = [
        (
            "segment.windows32_step8".to_string(),
            SegmentOptions::default(),
        ),
        (
            format!("segment.tiles{tile}"),
            SegmentOptions::tiles(tile, 16, model.input_multiple(), dims)?,
        ),
    ];
    let mut out = Vec::new();
    for (name, opts) in modes {
        // Recording one forward compiles the pipelines: a whole-volume run is timed
        // without a warm-up run of its own (it would double the benchmark's time).
        match forward_flops(ctx, model, store, opts.patch) {
            Ok(_) | Err(crate::Error::Limit(_)) => {} // segment_volume shrinks the tile
            Err(e) => return Err(e),
        }
        let mut labels = Vec::new();
        let mut ran = (0, opts.patch);
        let mut times = Vec::new();
        ctx.wait()?;
        ctx.pool.reset_peak();
        for _ in 0..reps.max(1) {
            let t = Instant::now();
            let s = segment_volume(ctx, model, store, &t1, &t2, &mask, dims, opts, |_, _| {})?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
            labels = s.labels;
            ran = (s.windows, s.used.patch);
        }
        times.sort_by(f64::total_cmp);
        let ms = times[times.len() / 2];
        let peak = ctx.pool.memory().peak_in_use;
        let flops = ran.0 as f64 * forward_flops(ctx, model, store, ran.1)?;
        let pred = held_out(&labels);
        let mut d = 0.0;
        for class in 1..=3u8 {
            d += dice(&pred, &truth, class)? / 3.0;
        }
        out.push(BenchResult {
            name,
            ms,
            gflops: flops / (ms * 1e6),
            adapter: ctx.adapter_name(),
            peak_mib: Some(mib(peak)),
            dice: Some(d),
        });
    }
    Ok(out)
}

/// FLOPs of one forward pass of `model` on a `patch`³ window (shapes only: nothing runs).
fn forward_flops(
    ctx: &GpuContext,
    model: &crate::nn::Model,
    store: &crate::autograd::ParamStore,
    patch: usize,
) -> Result<f64> {
    use crate::autograd::{Graph, Mode};
    let (c, _) = model.channels();
    let mut g = Graph::no_grad(ctx, Mode::Eval);
    let xv = g.input(Tensor::zeros(
        ctx,
        Shape5::new(1, c, patch, patch, patch),
        "x",
    )?);
    model.forward(&mut g, store, xv, 0)?;
    Ok(g.forward_flops())
}

#[cfg(test)]
mod tests {
    use super::peak_per_sample;

    #[test]
    fn peak_per_sample_fits_a_line_and_refuses_one_batch() {
        // Exact line 100 + 50 b, then noisy points whose least-squares line is known.
        let (base, per) = peak_per_sample(&[(1, 150.0), (2, 200.0), (4, 300.0)]).unwrap();
        assert!((base - 100.0).abs() < 1e-9 && (per - 50.0).abs() < 1e-9);
        let (base, per) = peak_per_sample(&[(1, 1.0), (2, 3.0), (3, 2.0)]).unwrap();
        assert!((per - 0.5).abs() < 1e-9 && (base - 1.0).abs() < 1e-9);
        assert!(peak_per_sample(&[(2, 10.0), (2, 12.0)]).is_none());
        assert!(peak_per_sample(&[(2, 10.0)]).is_none());
        assert!(peak_per_sample(&[]).is_none());
    }
}
