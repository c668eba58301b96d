//! The conv3d autotuner: a choice is timed once, written to the cache file and reused by
//! a later context without timing; a corrupt cache is ignored; disabled tuning gives the
//! heuristic; `Auto` gives exactly the chosen kernel's results; tuning inside an open
//! recording leaves that recording's buffers alone.

mod common;

use common::{assert_close, gpu, random};
use masnet_wgpu::ops::conv3d::{
    conv3d_forward, conv3d_forward_choice, conv3d_forward_cpu, conv3d_forward_kernel, Conv3dSpec,
    Conv3dVariant, ConvKernel,
};
use masnet_wgpu::ops::conv3d_backward::{backward_input_choice, conv3d_backward_input};
use masnet_wgpu::ops::tune::{self, TuneSource};
use masnet_wgpu::{Shape5, Tensor};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

/// The tuner's state is per process: tests that change it take turns.
static LOCK: Mutex<()> = Mutex::new(());

/// Serialises the test and points the tuner at a fresh cache file.
fn setup(name: &str) -> (MutexGuard<'static, ()>, PathBuf) {
    let guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    assert!(
        std::env::var_os("MASNET_CONV_VARIANT").is_none(),
        "unset MASNET_CONV_VARIANT to run the tuner tests"
    );
    let path = std::env::temp_dir().join(format!(
        "masnet-tune-test-{}-{name}/tune.json",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&path);
    tune::set_cache_path(Some(path.clone()));
    tune::set_enabled(true);
    (guard, path)
}

const X: Shape5 = Shape5([2, 5, 6, 7, 8]);
const W: Shape5 = Shape5([9, 5, 3, 3, 3]);

fn spec() -> Conv3dSpec {
    Conv3dSpec::same([3, 3, 3]).with_relu(true)
}

#[test]
fn choice_is_cached_on_disk_and_reused_by_a_new_context() {
    let (_g, path) = setup("reuse");
    let ctx = gpu();
    let before = tune::measurement_count();
    let (k1, src) = conv3d_forward_choice(&ctx, X, W, true, &spec()).unwrap();
    assert_eq!(src, TuneSource::Measured);
    assert_eq!(tune::measurement_count(), before + 1);
    assert!(ConvKernel::candidates(&ctx, 9).contains(&k1));
    // Same process, same class: the in-memory cache answers.
    let (k2, src) = conv3d_forward_choice(&ctx, X, W, false, &spec()).unwrap();
    assert_eq!((k2, src), (k1, TuneSource::Cache));
    let text = std::fs::read_to_string(&path).expect("cache file written");
    let json: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let entries = json["entries"].as_object().unwrap();
    assert_eq!(entries.len(), 1, "{text}");
    assert!(entries.keys().next().unwrap().contains("conv3d.fwd"));
    // A new context after forgetting memory (as a new process): read from the file.
    tune::forget();
    drop(ctx);
    let ctx2 = gpu();
    let (k3, src) = conv3d_forward_choice(&ctx2, X, W, true, &spec()).unwrap();
    assert_eq!((k3, src), (k1, TuneSource::Cache));
    assert_eq!(
        tune::measurement_count(),
        before + 1,
        "a cache hit timed again"
    );
    // The input gradient is its own op: timed once, then cached too.
    let (_, src) = backward_input_choice(&ctx2, X, W, false, &spec()).unwrap();
    assert_eq!(src, TuneSource::Measured);
    let (_, src) = backward_input_choice(&ctx2, X, W, false, &spec()).unwrap();
    assert_eq!(src, TuneSource::Cache);
    assert_eq!(tune::cached_entries(&ctx2).len(), 2);
}

#[test]
fn corrupt_cache_file_is_ignored_and_replaced() {
    let (_g, path) = setup("corrupt");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, "{ not json").unwrap();
    tune::forget();
    let ctx = gpu();
    let (_, src) = conv3d_forward_choice(&ctx, X, W, true, &spec()).unwrap();
    assert_eq!(src, TuneSource::Measured);
    let text = std::fs::read_to_string(&path).unwrap();
    serde_json::from_str::<serde_json::Value>(&text).expect("rewritten as valid JSON");
    // A directory where the file should be: unreadable, still no error.
    let dir_path = path.with_extension("dir");
    std::fs::create_dir_all(&dir_path).unwrap();
    tune::set_cache_path(Some(dir_path));
    let (_, src) = conv3d_forward_choice(&ctx, X, W, true, &spec()).unwrap();
    assert_eq!(src, TuneSource::Measured);
}

#[test]
fn disabled_tuning_gives_the_heuristic() {
    let (_g, path) = setup("disabled");
    let ctx = gpu();
    tune::set_enabled(false);
    let before = tune::measurement_count();
    let (k, src) = conv3d_forward_choice(&ctx, X, W, true, &spec()).unwrap();
    tune::set_enabled(true);
    assert_eq!(src, TuneSource::Disabled);
    assert_eq!(k, ConvKernel::heuristic(&ctx));
    let want = if ctx.subgroup_size.is_some_and(|s| s >= 8) {
        ConvKernel::Subgroup
    } else {
        ConvKernel::Tiled
    };
    assert_eq!(k, want);
    assert_eq!(tune::measurement_count(), before);
    assert!(!path.exists(), "disabled tuning wrote a cache file");
}

/// `Auto` runs the chosen kernel: bit-identical to calling it directly. The tuning
/// happens while the caller's recording is open and holds freed buffers that its
/// pending commands still read; the tuner's own temporaries must not reuse them.
#[test]
fn auto_matches_the_chosen_kernel_and_spares_the_open_recording() {
    let (_g, _path) = setup("auto");
    let ctx = gpu();
    let spec = spec();
    let x = random(X.0, 1);
    let w = random(W.0, 2);
    let b = random([1, 9, 1, 1, 1], 3);
    let want = conv3d_forward_cpu(&x, 0, &w, Some(b.as_slice().unwrap()), &spec).unwrap();
    let wt = Tensor::from_array(&ctx, &w, "w").unwrap();
    let bt = Tensor::from_array(&ctx, &b, "b").unwrap();
    let oshape = Shape5::new(2, 9, 6, 7, 8);
    let first = Tensor::empty(&ctx, oshape, "first").unwrap();
    let auto = Tensor::empty(&ctx, oshape, "auto").unwrap();
    {
        let xt = Tensor::from_array(&ctx, &x, "x").unwrap();
        ctx.wait().unwrap();
        let mut rec = ctx.recorder();
        // Reads x, then x (and the packed temporaries) are freed inside the recording.
        conv3d_forward_kernel(
            &ctx,
            &mut rec,
            xt.all(),
            &wt,
            Some(&bt),
            first.all(),
            &spec,
            ConvKernel::Tiled,
        )
        .unwrap();
        let x2 = Tensor::from_array(&ctx, &x, "x2").unwrap();
        drop(xt);
        // Tunes now (same shapes: the tuner's temporaries are in x's size class).
        conv3d_forward(
            &ctx,
            &mut rec,
            x2.all(),
            &wt,
            Some(&bt),
            auto.all(),
            &spec,
            Conv3dVariant::Auto,
        )
        .unwrap();
        ctx.submit(rec);
    }
    let want: Vec<f32> = want.iter().copied().collect();
    assert_close(
        &first.to_vec(&ctx).unwrap(),
        &want,
        1e-4,
        1e-5,
        "recorded before tuning",
    );
    let got_auto = auto.to_vec(&ctx).unwrap();
    assert_close(&got_auto, &want, 1e-4, 1e-5, "auto");
    let (k, src) = conv3d_forward_choice(&ctx, X, W, true, &spec).unwrap();
    assert_eq!(src, TuneSource::Cache);
    let xt = Tensor::from_array(&ctx, &x, "x").unwrap();
    let direct = Tensor::empty(&ctx, oshape, "direct").unwrap();
    let mut rec = ctx.recorder();
    conv3d_forward_kernel(
        &ctx,
        &mut rec,
        xt.all(),
        &wt,
        Some(&bt),
        direct.all(),
        &spec,
        k,
    )
    .unwrap();
    ctx.submit(rec);
    assert_eq!(direct.to_vec(&ctx).unwrap(), got_auto, "auto != {k:?}");
    // The input gradient under Auto (tuned inside the recording) is right as well.
    let g = random(oshape.0, 4);
    let gt = Tensor::from_array(&ctx, &g, "dy").unwrap();
    let dx = Tensor::empty(&ctx, X, "dx").unwrap();
    let mut rec = ctx.recorder();
    conv3d_backward_input(
        &ctx,
        &mut rec,
        gt.all(),
        &wt,
        dx.all(),
        &spec,
        Conv3dVariant::Auto,
    )
    .unwrap();
    ctx.submit(rec);
    let want_dx = masnet_wgpu::ops::conv3d_backward::conv3d_backward_input_f64(
        &g.mapv(f64::from),
        &w.mapv(f64::from),
        [6, 7, 8],
        &spec,
    );
    let want_dx: Vec<f32> = want_dx.iter().map(|&v| v as f32).collect();
    assert_close(&dx.to_vec(&ctx).unwrap(), &want_dx, 1e-4, 1e-4, "auto dx");
}

#[test]
fn tuning_inside_an_open_recording_reuses_its_own_temporaries() {
    // Each timed run allocates packed copies of the input and weights. Inside an open
    // recording those used to pile up until the recording was submitted (24 GB for a
    // DU-Net training step on lavapipe); the tuner now reuses them, and they are free
    // for the caller once tuning ends.
    let (_g, _path) = setup("memory");
    let ctx = gpu();
    let x_shape = Shape5::new(1, 8, 24, 24, 24);
    let w_shape = Shape5::new(8, 8, 3, 3, 3);
    let x = Tensor::zeros(&ctx, x_shape, "x").unwrap();
    let w = Tensor::zeros(&ctx, w_shape, "w").unwrap();
    let y = Tensor::empty(&ctx, x_shape, "y").unwrap();
    ctx.wait().unwrap();
    let held = ctx.pool.memory().held;
    let mut rec = ctx.recorder();
    let before = tune::measurement_count();
    conv3d_forward(
        &ctx,
        &mut rec,
        x.all(),
        &w,
        None,
        y.all(),
        &Conv3dSpec::same([3, 3, 3]),
        Conv3dVariant::Auto,
    )
    .unwrap();
    assert_eq!(tune::measurement_count(), before + 1, "the call was tuned");
    ctx.submit(rec);
    ctx.wait().unwrap();
    // One candidate's temporaries (input, weights, output, packed input and weights) are
    // about 4 × the input here; every run allocating its own was 10 × or more.
    let grown = ctx.pool.memory().held - held;
    let x_bytes = x.bytes();
    assert!(
        grown <= 6 * x_bytes,
        "tuning grew the pool by {grown} bytes ({:.1} × the input)",
        grown as f64 / x_bytes as f64
    );
}
