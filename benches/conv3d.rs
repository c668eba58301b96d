//! Criterion benchmarks of the conv3d forward workloads (W1, W2, W3), of the W1
//! backward (input and weight gradients) and of the transposed-conv forward (phase and
//! dilated forms) on the default adapter; `masnet-wgpu bench conv` and `bench tconv`
//! run the same workloads and print GFLOP/s.

use criterion::{criterion_group, criterion_main, Criterion};
use masnet_wgpu::bench::{
    bench_conv_backward_w1, bench_conv_forward, bench_tconv_forward, conv_workloads,
    tconv_workloads,
};
use masnet_wgpu::ops::Conv3dVariant;
use masnet_wgpu::GpuContext;
use std::time::Duration;

fn conv3d_forward(c: &mut Criterion) {
    let ctx = GpuContext::from_env().expect("a GPU adapter (see `masnet-wgpu info`)");
    let mut g = c.benchmark_group("conv3d");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    for w in conv_workloads() {
        g.bench_function(w.name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let r = bench_conv_forward(&ctx, &w, Conv3dVariant::Auto, 1).expect("bench");
                    total += Duration::from_secs_f64(r.ms / 1e3);
                }
                total
            })
        });
    }
    g.finish();
}

fn conv3d_backward(c: &mut Criterion) {
    let ctx = GpuContext::from_env().expect("a GPU adapter (see `masnet-wgpu info`)");
    let mut g = c.benchmark_group("conv3d");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    for (i, name) in ["conv3d.bwd_input.W1", "conv3d.bwd_weight.W1"]
        .into_iter()
        .enumerate()
    {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    // Times both gradients, reports the one this benchmark is about.
                    let r = bench_conv_backward_w1(&ctx, 1).expect("bench");
                    total += Duration::from_secs_f64(r[i].ms / 1e3);
                }
                total
            })
        });
    }
    g.finish();
}

fn conv_transpose3d_forward(c: &mut Criterion) {
    let ctx = GpuContext::from_env().expect("a GPU adapter (see `masnet-wgpu info`)");
    let mut g = c.benchmark_group("conv_transpose3d");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    for w in tconv_workloads() {
        for (dilated, name) in [
            (false, w.name.to_string()),
            (true, format!("{}.dilated", w.name)),
        ] {
            // The zero-inserted form only where the workload asks for it (too slow for
            // DU-Net's trans6).
            if dilated && !w.dilated {
                continue;
            }
            g.bench_function(name, |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let r = bench_tconv_forward(&ctx, &w, dilated, Conv3dVariant::Auto, 1)
                            .expect("bench");
                        total += Duration::from_secs_f64(r.ms / 1e3);
                    }
                    total
                })
            });
        }
    }
    g.finish();
}

criterion_group!(
    benches,
    conv3d_forward,
    conv3d_backward,
    conv_transpose3d_forward
);
criterion_main!(benches);
