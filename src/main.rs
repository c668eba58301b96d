//! `masnet-wgpu`: the command-line tool.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use masnet_wgpu::bench::{bench_conv_backward_w1, bench_conv_forward, conv_workloads, BenchResult};
use masnet_wgpu::gpu::list_adapters;
use masnet_wgpu::ops::Conv3dVariant;
use masnet_wgpu::{BackendChoice, GpuContext, GpuOptions};

/// GPU engine for 3D-MASNet (DU-Net + MixACB) infant brain MRI segmentation, on any
/// Vulkan, Metal, DX12 or GL adapter.
#[derive(Parser)]
#[command(name = "masnet-wgpu", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    gpu: GpuArgs,
    #[command(subcommand)]
    command: Command,
}

/// Adapter selection, shared by every command.
#[derive(Args)]
struct GpuArgs {
    /// Graphics API: auto, vulkan, metal, dx12 or gl [env: MASNET_BACKEND]
    #[arg(long, global = true)]
    backend: Option<String>,
    /// Adapter index from `masnet-wgpu info` [env: MASNET_ADAPTER]
    #[arg(long, global = true)]
    adapter: Option<usize>,
    /// Never use subgroup kernels (as on adapters without subgroup support)
    #[arg(long, global = true)]
    no_subgroups: bool,
}

impl GpuArgs {
    fn options(&self) -> Result<GpuOptions> {
        let mut o = GpuOptions::from_env()?;
        if let Some(b) = &self.backend {
            o.backend = BackendChoice::parse(b)?;
        }
        if self.adapter.is_some() {
            o.adapter = self.adapter;
        }
        o.no_subgroups |= self.no_subgroups;
        Ok(o)
    }

    fn open(&self) -> Result<GpuContext> {
        Ok(GpuContext::new(&self.options()?)?)
    }
}

#[derive(Subcommand)]
enum Command {
    /// List every adapter with backend, device type, driver and the limits that matter
    Info,
    /// Run benchmarks and print a table (or JSON lines with --json)
    Bench(BenchArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum BenchSuite {
    /// conv3d forward W1 (N2 C32->32 32^3 3x3x3), W2 (1x3x3, 3x1x3, 3x3x1), W3 (N2 C8->8
    /// 5x5x5), and W1's backward (input and weight gradients)
    Conv,
}

#[derive(Args)]
struct BenchArgs {
    /// Which benchmark suite
    #[arg(value_enum, default_value = "conv")]
    suite: BenchSuite,
    /// One JSON object per line: name, ms (median), gflops, adapter
    #[arg(long)]
    json: bool,
    /// Timed repetitions per workload (the median is reported)
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Only workloads whose name contains this text
    #[arg(long)]
    filter: Option<String>,
}

fn info(args: &GpuArgs) -> Result<()> {
    let backend = args.options()?.backend;
    let adapters = list_adapters(backend);
    if adapters.is_empty() {
        anyhow::bail!(
            "no adapter found. On headless Linux install Mesa's lavapipe: \
             apt-get install -y mesa-vulkan-drivers libvulkan1"
        );
    }
    for a in adapters {
        let l = &a.limits;
        println!(
            "[{}] {} ({:?}, {:?})",
            a.index, a.info.name, a.info.backend, a.info.device_type
        );
        println!("    driver: {} {}", a.info.driver, a.info.driver_info);
        println!(
            "    max storage binding {} MiB, max buffer {} MiB, workgroup storage {} KiB, \
             invocations/workgroup {}, workgroups/dim {}",
            l.max_storage_buffer_binding_size >> 20,
            l.max_buffer_size >> 20,
            l.max_compute_workgroup_storage_size >> 10,
            l.max_compute_invocations_per_workgroup,
            l.max_compute_workgroups_per_dimension
        );
        println!(
            "    subgroups: {}{}",
            if a.subgroups { "yes" } else { "no" },
            if a.subgroups {
                format!(
                    " (size {}..{})",
                    a.info.subgroup_min_size, a.info.subgroup_max_size
                )
            } else {
                String::new()
            }
        );
    }
    Ok(())
}

fn print_results(results: &[BenchResult], json: bool) -> Result<()> {
    if json {
        for r in results {
            println!("{}", serde_json::to_string(r)?);
        }
        return Ok(());
    }
    if let Some(r) = results.first() {
        println!("adapter: {}", r.adapter);
    }
    println!("{:<24} {:>10} {:>10}", "benchmark", "ms", "GFLOP/s");
    for r in results {
        println!("{:<24} {:>10.2} {:>10.2}", r.name, r.ms, r.gflops);
    }
    Ok(())
}

fn bench(gpu: &GpuArgs, args: &BenchArgs) -> Result<()> {
    let ctx = gpu.open()?;
    let mut results = Vec::new();
    match args.suite {
        BenchSuite::Conv => {
            for w in conv_workloads() {
                if args
                    .filter
                    .as_ref()
                    .is_some_and(|f| !w.name.contains(f.as_str()))
                {
                    continue;
                }
                let r = bench_conv_forward(&ctx, &w, Conv3dVariant::Auto, args.reps)
                    .with_context(|| format!("benchmark {}", w.name))?;
                if !args.json {
                    eprintln!("{}: {:.2} ms", r.name, r.ms);
                }
                results.push(r);
            }
            if args
                .filter
                .as_ref()
                .is_none_or(|f| "conv3d.bwd_input.W1 conv3d.bwd_weight.W1".contains(f.as_str()))
            {
                for r in bench_conv_backward_w1(&ctx, args.reps)
                    .context("benchmark conv3d backward W1")?
                {
                    if !args.json {
                        eprintln!("{}: {:.2} ms", r.name, r.ms);
                    }
                    results.push(r);
                }
            }
        }
    }
    print_results(&results, args.json)
}

fn main() {
    let cli = Cli::parse();
    let r = match &cli.command {
        Command::Info => info(&cli.gpu),
        Command::Bench(a) => bench(&cli.gpu, a),
    };
    if let Err(e) = r {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
