//! `masnet-wgpu`: the command-line tool.

mod commands;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use masnet_wgpu::bench::{
    bench_conv_backward_w1, bench_conv_forward, bench_dunet_forward, bench_mixacb, bench_segment,
    bench_train_step, conv_forward_runner, conv_workloads, round_robin, tconv_forward_runner,
    tconv_workloads, BenchResult,
};
use masnet_wgpu::gpu::list_adapters;
use masnet_wgpu::nn::io::load_model;
use masnet_wgpu::ops::Conv3dVariant;
use masnet_wgpu::segment::inference_form;
use masnet_wgpu::{BackendChoice, GpuContext, GpuOptions};
use std::path::PathBuf;

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
    /// Bind at most this many bytes per storage buffer, e.g. 64MiB (below the adapter's
    /// limit, to leave headroom) [env: MASNET_MAX_BINDING]
    #[arg(long, global = true)]
    max_binding: Option<String>,
    /// Do not time kernel variants; use the fixed choice (subgroup kernel where usable,
    /// else tiled) [env: MASNET_NO_TUNE=1]. Choices are cached per adapter in
    /// $XDG_CACHE_HOME/masnet-wgpu/tune.json (MASNET_TUNE_CACHE overrides the path)
    #[arg(long, global = true)]
    no_tune: bool,
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
        if let Some(b) = &self.max_binding {
            o.max_binding = Some(masnet_wgpu::gpu::parse_bytes(b)?);
        }
        Ok(o)
    }

    fn open(&self) -> Result<GpuContext> {
        if self.no_tune {
            masnet_wgpu::ops::tune::set_enabled(false);
        }
        Ok(GpuContext::new(&self.options()?)?)
    }
}

#[derive(Subcommand)]
enum Command {
    /// List every adapter with backend, device type, driver and the limits that matter
    Info,
    /// Run benchmarks and print a table (or JSON lines with --json)
    Bench(BenchArgs),
    /// Print a model's layers and parameter counts (training graph, fused, folded)
    Summary(SummaryArgs),
    /// Convert a training checkpoint to the inference form (MixACB and BN folded)
    Fuse(FuseArgs),
    /// Train a DU-Net on T1+T2 patches (default data: the embedded brain)
    Train(Box<commands::train::TrainArgs>),
    /// Segment a T1+T2 pair with one or more models
    Segment(commands::segment::SegmentArgs),
    /// Dice, MHD and ASD per tissue of a segmentation against the truth
    Eval(commands::eval::EvalArgs),
    /// Train, fuse, segment and evaluate on the embedded brain in a few minutes
    Demo(commands::demo::DemoArgs),
}

#[derive(Args)]
struct SummaryArgs {
    /// Network: dunet, unet3d, ccfcn, buinet or nlunet
    #[arg(long, default_value = "dunet")]
    model: String,
    /// Block of the convolutions MixACB replaces: mixacb or conv (baseline)
    #[arg(long, default_value = "mixacb")]
    block: String,
    /// MixACB mix ratio of the kernel-3, kernel-5, ... groups
    #[arg(long, default_value = "3:1")]
    mix: String,
    /// DU-Net: channels each dense layer adds [16]
    #[arg(long)]
    growth: Option<usize>,
    /// DU-Net: channels of the initial convolution [32]
    #[arg(long)]
    init_features: Option<usize>,
    /// DU-Net: dense layers per dense block [3]
    #[arg(long)]
    layers: Option<usize>,
}

#[derive(Clone, Copy, ValueEnum)]
enum FuseForm {
    /// One conv per MixACB group; the other BNs kept (the paper's fused model)
    Groups,
    /// One block-diagonal conv per MixACB; the other BNs kept
    Merged,
    /// One conv per MixACB group and every other conv+BN pair folded into conv+bias
    Folded,
    /// One block-diagonal conv per MixACB and every other BN folded
    FoldedMerged,
}

#[derive(Args)]
struct FuseArgs {
    /// Training checkpoint (.safetensors) written by `masnet-wgpu train`
    #[arg(long)]
    model: std::path::PathBuf,
    /// Output checkpoint
    #[arg(short, long)]
    output: std::path::PathBuf,
    /// Inference form (see docs/models.md for the measured speed of each)
    #[arg(long, value_enum, default_value = "folded")]
    form: FuseForm,
}

#[derive(Clone, Copy, ValueEnum)]
enum BenchSuite {
    /// conv3d forward W1 (N2 C32->32 32^3 3x3x3), W2 (1x3x3, 3x1x3, 3x3x1), W3 (N2 C8->8
    /// 5x5x5), and W1's backward (input and weight gradients)
    Conv,
    /// Transposed conv forward N2 C64->32 16^3 -> 32^3 (k=2 and k=3, stride 2): phase
    /// form and the dilated form it replaced, with W1's forward for reference
    Tconv,
    /// MixACB of a dense layer (N2 C64->16 32^3): branched vs fused vs merged
    Mixacb,
    /// DU-Net+MixACB forward on a 32^3 patch in each form
    Dunet,
    /// DU-Net+MixACB training step (paper configuration, 32^3 patches) at batch 2, and at
    /// the paper's batch 16 where the adapter's binding limit allows; peak memory
    Train,
    /// Segmentation of the embedded brain with --model (default: the demo's
    /// demo-output/fused.safetensors): 32^3 windows at step 8 vs whole-volume tiles
    Segment,
    /// Everything above
    All,
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
    /// Model for the segment suite
    #[arg(long, default_value = "demo-output/fused.safetensors")]
    model: PathBuf,
    /// Tile edge of the segment suite's whole-volume mode
    #[arg(long, default_value_t = 128)]
    tile: usize,
    /// Also time every dispatch on its own and print where the time goes, per pipeline
    /// (slows the run; the benchmark's own figures then include the profiling overhead)
    #[arg(long)]
    profile: bool,
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
    println!(
        "{:<28} {:>10} {:>10} {:>10} {:>6}",
        "benchmark", "ms", "GFLOP/s", "peak MiB", "Dice"
    );
    let opt = |v: Option<f64>, digits: usize| {
        v.map(|x| format!("{x:.digits$}"))
            .unwrap_or_else(|| "-".into())
    };
    for r in results {
        println!(
            "{:<28} {:>10.2} {:>10.2} {:>10} {:>6}",
            r.name,
            r.ms,
            r.gflops,
            opt(r.peak_mib, 1),
            opt(r.dice, 3)
        );
    }
    Ok(())
}

fn bench(gpu: &GpuArgs, args: &BenchArgs) -> Result<()> {
    let mut ctx = gpu.open()?;
    if args.profile {
        ctx.enable_profiling();
    }
    let mut results = Vec::new();
    let wants = |s: BenchSuite| {
        matches!(args.suite, BenchSuite::All)
            || std::mem::discriminant(&args.suite) == std::mem::discriminant(&s)
    };
    let mut extra: Vec<BenchResult> = Vec::new();
    if wants(BenchSuite::Mixacb) {
        extra.extend(bench_mixacb(&ctx, args.reps).context("benchmark mixacb")?);
    }
    if wants(BenchSuite::Dunet) {
        extra.extend(bench_dunet_forward(&ctx, args.reps).context("benchmark dunet")?);
    }
    if wants(BenchSuite::Tconv) {
        let named = |name: &str| {
            args.filter
                .as_ref()
                .is_none_or(|f| name.contains(f.as_str()))
        };
        // The bar is relative to W1's forward: W1 runs in the same rounds as the
        // transposed convs (`all` measures it again with the conv suite).
        let mut runners = Vec::new();
        let w1 = &conv_workloads()[0];
        if named(w1.name) {
            let mut r = conv_forward_runner(&ctx, w1, Conv3dVariant::Auto)
                .with_context(|| format!("benchmark {}", w1.name))?;
            r.name = format!("{} (tconv rounds)", w1.name);
            runners.push(r);
        }
        for w in tconv_workloads() {
            for dilated in [false, true] {
                if (dilated && !w.dilated)
                    || !named(&format!(
                        "{}{}",
                        w.name,
                        if dilated { ".dilated" } else { "" }
                    ))
                {
                    continue;
                }
                runners.push(
                    tconv_forward_runner(&ctx, &w, dilated, Conv3dVariant::Auto)
                        .with_context(|| format!("benchmark {}", w.name))?,
                );
            }
        }
        extra.extend(round_robin(&ctx, args.reps, runners).context("benchmark tconv")?);
    }
    if wants(BenchSuite::Train) {
        let b2 = bench_train_step(&ctx, 2, args.reps).context("benchmark training step")?;
        let mut points: Vec<(usize, f64)> = b2.peak_mib.map(|m| (2, m)).into_iter().collect();
        extra.push(b2);
        match bench_train_step(&ctx, 16, args.reps) {
            Ok(r) => extra.push(r),
            // The paper's batch needs buffers above some adapters' binding limit: measure
            // the batches that fit and state how the peak grows per sample.
            Err(masnet_wgpu::Error::Limit(why)) => {
                eprintln!("dunet.train_step.b16: not run on this adapter: {why}");
                for batch in [1, 4] {
                    match bench_train_step(&ctx, batch, args.reps) {
                        Ok(r) => {
                            points.extend(r.peak_mib.map(|m| (batch, m)));
                            extra.push(r);
                        }
                        Err(masnet_wgpu::Error::Limit(why)) => {
                            eprintln!("dunet.train_step.b{batch}: not run on this adapter: {why}")
                        }
                        Err(e) => {
                            return Err(e).with_context(|| format!("training step, batch {batch}"))
                        }
                    }
                }
                if let Some((base, per)) = masnet_wgpu::bench::peak_per_sample(&points) {
                    let batches: Vec<String> = points.iter().map(|p| format!("b{}", p.0)).collect();
                    eprintln!(
                        "dunet.train_step.b16: peak memory {base:.1} MiB + {per:.1} MiB per \
                         sample (least squares over {}): batch 16 would need about {:.0} MiB \
                         (an estimate, not a measurement)",
                        batches.join(", "),
                        base + 16.0 * per
                    );
                }
            }
            Err(e) => return Err(e).context("benchmark training step, batch 16"),
        }
    }
    if wants(BenchSuite::Segment) {
        if args.model.exists() {
            let (model, store, _) = load_model(&ctx, &args.model)
                .with_context(|| format!("loading {}", args.model.display()))?;
            let (model, store) = inference_form(&ctx, model, store)?;
            extra.extend(
                bench_segment(&ctx, &model, &store, args.tile, args.reps.min(3))
                    .context("benchmark segmentation")?,
            );
        } else if matches!(args.suite, BenchSuite::Segment) {
            anyhow::bail!(
                "{} not found: run `masnet-wgpu demo` first or pass --model",
                args.model.display()
            );
        } else {
            eprintln!(
                "segment suite skipped: {} not found (run `masnet-wgpu demo` first)",
                args.model.display()
            );
        }
    }
    match args.suite {
        BenchSuite::Mixacb
        | BenchSuite::Dunet
        | BenchSuite::Tconv
        | BenchSuite::Train
        | BenchSuite::Segment => {}
        BenchSuite::Conv | BenchSuite::All => {
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
    results.extend(extra.into_iter().filter(|r| {
        args.filter
            .as_ref()
            .is_none_or(|f| r.name.contains(f.as_str()))
    }));
    print_results(&results, args.json)?;
    if args.profile {
        let mut rows: Vec<_> = ctx.profile().into_iter().collect();
        rows.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1));
        let total: f64 = rows.iter().map(|r| r.1 .1).sum();
        println!("\nprofile (each dispatch run alone; copies count with the next dispatch):");
        println!(
            "{:<44} {:>9} {:>10} {:>6}",
            "pipeline", "dispatches", "ms", "%"
        );
        for (name, (n, secs)) in rows {
            println!(
                "{name:<44} {n:>9} {:>10.1} {:>6.1}",
                secs * 1e3,
                100.0 * secs / total.max(1e-12)
            );
        }
    }
    Ok(())
}

fn summary(gpu: &GpuArgs, args: &SummaryArgs) -> Result<()> {
    use masnet_wgpu::autograd::ParamStore;
    use masnet_wgpu::nn::summary::{summary_rows, thousands};
    use masnet_wgpu::nn::{BlockKind, MixSpec, ModelConfig, ModelForm};
    let mut config = ModelConfig::from_fields(&args.model, serde_json::Value::Null)?;
    let block: BlockKind = args.block.parse()?;
    config.set_block(block);
    config.set_mix(MixSpec::parse(&args.mix)?);
    match &mut config {
        ModelConfig::Dunet(c) => {
            c.growth = args.growth.unwrap_or(c.growth);
            c.init_features = args.init_features.unwrap_or(c.init_features);
            c.layers_per_block = args.layers.unwrap_or(c.layers_per_block);
        }
        _ if args.growth.or(args.init_features).or(args.layers).is_some() => {
            anyhow::bail!("--growth, --init-features and --layers apply to dunet only")
        }
        _ => {}
    }
    let ctx = gpu.open()?;
    let mut store = ParamStore::new();
    let model = config.build(&ctx, &mut store, 0)?;
    println!("{}, block {}, mix {}", args.model, args.block, args.mix);
    println!("{:<28} {:>12} {:>12}", "module", "trainable", "BN buffers");
    for r in summary_rows(&store) {
        println!(
            "{:<28} {:>12} {:>12}",
            r.module,
            thousands(r.trainable),
            thousands(r.buffers)
        );
    }
    let line = |what: &str, s: &ParamStore| {
        println!(
            "{:<46} trainable {:>11}   total {:>11}",
            what,
            thousands(s.trainable_count()),
            thousands(s.total_count())
        )
    };
    println!();
    line("training graph", &store);
    if block == BlockKind::Mixacb {
        let (_, fused) = model.convert(&ctx, &store, ModelForm::Fused)?;
        line("MixACB fused (other BNs kept, as the paper)", &fused);
        let (_, merged) = model.convert(&ctx, &store, ModelForm::FusedMerged)?;
        line("MixACB merged block-diagonal (other BNs kept)", &merged);
    }
    let (_, folded) = model.convert(&ctx, &store, ModelForm::Folded)?;
    line("every BN folded (inference)", &folded);
    Ok(())
}

fn fuse(gpu: &GpuArgs, args: &FuseArgs) -> Result<()> {
    use masnet_wgpu::nn::io::save_model;
    use masnet_wgpu::nn::ModelForm;
    let ctx = gpu.open()?;
    let (model, store, ckpt) = load_model(&ctx, &args.model)?;
    let form = match args.form {
        FuseForm::Groups => ModelForm::Fused,
        FuseForm::Merged => ModelForm::FusedMerged,
        FuseForm::Folded => ModelForm::Folded,
        FuseForm::FoldedMerged => ModelForm::FoldedMerged,
    };
    if model.form() != ModelForm::Training {
        anyhow::bail!(
            "{}: already in {:?} form; fuse needs a training checkpoint",
            args.model.display(),
            model.form()
        );
    }
    let (fused, fstore) = model.convert(&ctx, &store, form)?;
    let mut meta: std::collections::BTreeMap<String, String> = ckpt
        .metadata
        .into_iter()
        .filter(|(k, _)| !k.starts_with("masnet."))
        .collect();
    meta.insert("masnet.fused_from".into(), args.model.display().to_string());
    save_model(&ctx, &args.output, &fused, &fstore, meta)?;
    println!(
        "{} -> {} ({:?}): {} parameters (was {})",
        args.model.display(),
        args.output.display(),
        form,
        fstore.total_count(),
        store.total_count()
    );
    Ok(())
}

fn train(gpu: &GpuArgs, a: &commands::train::TrainArgs) -> Result<()> {
    let ctx = gpu.open()?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    // Ctrl-C: finish the current step, save a checkpoint, exit with 130.
    ctrlc::set_handler(move || flag.store(true, std::sync::atomic::Ordering::SeqCst))
        .context("installing the Ctrl-C handler")?;
    if commands::train::run(&ctx, a, stop)? {
        println!("done: {}", commands::train::latest(&a.output).display());
        Ok(())
    } else {
        eprintln!(
            "interrupted: checkpoint saved to {}",
            a.output.join("interrupted.safetensors").display()
        );
        std::process::exit(130);
    }
}

fn main() {
    let cli = Cli::parse();
    let r = match &cli.command {
        Command::Info => info(&cli.gpu),
        Command::Bench(a) => bench(&cli.gpu, a),
        Command::Summary(a) => summary(&cli.gpu, a),
        Command::Fuse(a) => fuse(&cli.gpu, a),
        Command::Train(a) => train(&cli.gpu, a),
        Command::Segment(a) => cli
            .gpu
            .open()
            .and_then(|ctx| commands::segment::run(&ctx, a)),
        Command::Eval(a) => commands::eval::run(a),
        Command::Demo(a) => cli.gpu.open().and_then(|ctx| commands::demo::run(&ctx, a)),
    };
    if let Err(e) = r {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
