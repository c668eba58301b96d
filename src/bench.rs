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
#[derive(Clone, Debug, Serialize)]
pub struct BenchResult {
    /// Workload name, e.g. `conv3d.fwd.W1`.
    pub name: String,
    /// Median milliseconds per run.
    pub ms: f64,
    /// Useful GFLOP/s at the median.
    pub gflops: f64,
    /// Adapter it ran on.
    pub adapter: String,
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

/// The standard forward workloads: W1 (3x3x3), W2 (the three asymmetric kernels), W3 (5x5x5).
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

/// Times one conv3d forward workload with the given kernel variant.
pub fn bench_conv_forward(
    ctx: &GpuContext,
    w: &ConvWorkload,
    variant: Conv3dVariant,
    reps: usize,
) -> Result<BenchResult> {
    let mut rng = Rng::new(1);
    let xs = Shape5::new(w.n, w.cin, w.size, w.size, w.size);
    let [kd, kh, kw] = w.kernel;
    let ws = Shape5::new(w.cout, w.cin, kd, kh, kw);
    let spec = Conv3dSpec::same(w.kernel);
    let os = conv3d_check(xs, (0, w.cin), ws, Some(w.cout), &spec)?;
    let x = Tensor::from_slice(ctx, xs, &rng.vec_f32(xs.numel()?, -1.0, 1.0), "x")?;
    let wt = Tensor::from_slice(ctx, ws, &rng.vec_f32(ws.numel()?, -0.1, 0.1), "w")?;
    let b = Tensor::from_slice(
        ctx,
        Shape5::new(1, w.cout, 1, 1, 1),
        &rng.vec_f32(w.cout, -0.1, 0.1),
        "b",
    )?;
    let out = Tensor::empty(ctx, os, "out")?;
    let ms = median_ms(reps, || {
        let mut rec = ctx.recorder();
        conv3d_forward(
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
    })?;
    Ok(BenchResult {
        name: w.name.to_string(),
        ms,
        gflops: conv3d_flops(os, ws) / (ms * 1e6),
        adapter: ctx.adapter_name(),
    })
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
    })
    .collect())
}
