//! Reliability through the real binary: SIGKILL at a random moment leaves loadable
//! checkpoints and `--resume` reproduces the uninterrupted loss curve exactly; injected
//! GPU faults end with a clear error and a resumable state; equal seeds give
//! byte-identical checkpoints; a lowered binding limit still segments.

mod common;

use masnet_wgpu::checkpoint::Checkpoint;
use masnet_wgpu::data::volume;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn cmd(env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_masnet-wgpu"));
    c.env("XDG_RUNTIME_DIR", std::env::temp_dir());
    // One kernel-choice cache for every run of this file: the reference run tunes, the
    // others reuse its choices (identical kernels are part of identical results).
    c.env(
        "MASNET_TUNE_CACHE",
        std::env::temp_dir().join(format!(
            "masnet-reliability-{}-tune.json",
            std::process::id()
        )),
    );
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    cmd(env).args(args).output().expect("run masnet-wgpu")
}

fn ok(args: &[&str]) -> String {
    let o = run(args, &[]);
    assert!(
        o.status.success(),
        "{args:?} failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir()
        .join(format!("masnet-reliability-{}", std::process::id()))
        .join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// 8 epochs of 2 steps, a checkpoint after every epoch.
fn run_args() -> Vec<&'static str> {
    let mut a = common::tiny_train_args("8");
    a.extend(["--foreground-bias", "0.5"]);
    a
}

fn train(out: &Path, seed: &str, env: &[(&str, &str)]) -> Output {
    let mut a = run_args();
    a.extend(["--seed", seed, "-o", out.to_str().unwrap()]);
    run(&a, env)
}

/// (global step, loss) per line of `steps.jsonl`; a torn last line (SIGKILL) is skipped.
fn losses(out: &Path) -> Vec<(u64, f64)> {
    let text = std::fs::read_to_string(out.join("steps.jsonl")).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

fn assert_same_curve(reference: &[(u64, f64)], part: &[(u64, f64)], what: &str) {
    assert!(!part.is_empty(), "{what}: no steps logged");
    for &(s, l) in part {
        let r = reference.iter().find(|(rs, _)| *rs == s).map(|&(_, l)| l);
        assert_eq!(r, Some(l), "{what}: loss of step {s}");
    }
}

/// Milliseconds the run in `out` spent in epochs 2 and later (`metrics.jsonl`).
fn remaining_epochs_ms(out: &Path) -> u64 {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let seconds: f64 = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["epoch"].as_u64().unwrap() >= 2)
        .map(|v| v["seconds"].as_f64().unwrap())
        .sum();
    (seconds * 1000.0) as u64
}

fn bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The uninterrupted reference run, shared by the tests of this file.
fn reference() -> &'static (PathBuf, Vec<(u64, f64)>) {
    static REF: std::sync::OnceLock<(PathBuf, Vec<(u64, f64)>)> = std::sync::OnceLock::new();
    REF.get_or_init(|| {
        let out = dir("reference");
        let o = train(&out, "5", &[]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let l = losses(&out);
        assert_eq!(l.len(), 16, "reference run logged {} steps", l.len());
        (out, l)
    })
}

#[test]
fn same_seed_gives_byte_identical_checkpoints() {
    let (a, la) = reference();
    let b = dir("same-seed");
    assert!(train(&b, "5", &[]).status.success());
    for e in 1..=8 {
        let f = format!("epoch-{e:04}.safetensors");
        assert!(bytes(&a.join(&f)) == bytes(&b.join(&f)), "{f} differs");
    }
    assert_eq!(&losses(&b), la);
    // A different seed gives a different model (the comparison can fail).
    let c = dir("other-seed");
    assert!(train(&c, "6", &[]).status.success());
    let f = "epoch-0008.safetensors";
    assert!(bytes(&a.join(f)) != bytes(&c.join(f)));
}

#[test]
fn sigkill_at_a_random_moment_then_resume_reproduces_the_run() {
    let (reference_dir, reference_losses) = reference();
    let out = dir("killed");
    let mut a = run_args();
    a.extend(["--seed", "5", "-o", out.to_str().unwrap()]);
    let mut child = cmd(&[])
        .args(&a)
        .stderr(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // Random moment after the first checkpoint (so there is something to resume from)
    // and before the run ends: within the time the reference took for epochs 2..8 (a
    // fixed window let a fast machine finish the run first), which may be inside a step
    // or a checkpoint write.
    let window_ms = remaining_epochs_ms(reference_dir).max(1);
    let t0 = Instant::now();
    while !out.join("latest.safetensors").exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "no checkpoint appeared"
        );
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let delay = Duration::from_millis(u64::from(nanos) % window_ms);
    std::thread::sleep(delay);
    child.kill().unwrap(); // SIGKILL on Unix
    child.wait().unwrap();
    let what = format!("killed {delay:?} after the first checkpoint");

    // Every checkpoint left behind loads (checksums verified); temp files are the only
    // possible leftovers of an interrupted write.
    let mut found = 0;
    for e in std::fs::read_dir(&out).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with(".safetensors") {
            Checkpoint::read(&p).unwrap_or_else(|e| panic!("{what}: {name}: {e}"));
            found += 1;
        } else {
            assert!(
                name.ends_with(".tmp") || name.ends_with(".jsonl"),
                "{what}: unexpected {name}"
            );
        }
    }
    assert!(found >= 1, "{what}");
    // The killed run's log agrees with the reference as far as it got.
    assert_same_curve(reference_losses, &losses(&out), &what);

    let resumed = dir("resumed");
    let latest = out.join("latest.safetensors");
    let state = Checkpoint::read(&latest).unwrap();
    let at: serde_json::Value =
        serde_json::from_str(&state.metadata["masnet.train_state"]).unwrap();
    let at = at["global_step"].as_u64().unwrap();
    ok(&[
        "train",
        "--resume",
        latest.to_str().unwrap(),
        "-o",
        resumed.to_str().unwrap(),
    ]);
    let l = losses(&resumed);
    assert_eq!(
        l.first().map(|x| x.0),
        Some(at + 1).filter(|_| at < 16),
        "{what}"
    );
    if at < 16 {
        assert_same_curve(reference_losses, &l, &what);
    }
    let f = "epoch-0008.safetensors";
    assert!(
        bytes(&reference_dir.join(f)) == bytes(&resumed.join(f)),
        "{what}: final checkpoint differs from the uninterrupted run"
    );
}

#[test]
fn injected_gpu_faults_end_with_a_clear_error_and_a_resumable_state() {
    let (reference_dir, reference_losses) = reference();
    let f = "epoch-0008.safetensors";

    // A command that fails validation in step 5: the state after step 4 is saved.
    let out = dir("fault-invalid");
    let o = train(&out, "5", &[("MASNET_INJECT_FAULT", "invalid@5")]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    for want in [
        "GPU fault at training step 5",
        "injected fault",
        "state after step 4 was saved",
        "fault.safetensors",
        "--resume",
    ] {
        assert!(err.contains(want), "stderr lacks '{want}':\n{err}");
    }
    let resumed = dir("fault-invalid-resumed");
    let saved = out.join("fault.safetensors");
    ok(&[
        "train",
        "--resume",
        saved.to_str().unwrap(),
        "-o",
        resumed.to_str().unwrap(),
    ]);
    assert_eq!(losses(&resumed).first().map(|x| x.0), Some(5));
    assert_same_curve(
        reference_losses,
        &losses(&resumed),
        "after the invalid-command fault",
    );
    assert!(bytes(&reference_dir.join(f)) == bytes(&resumed.join(f)));

    // The device lost before step 5's submission: nothing can be read back, so the
    // message points at the last checkpoint (after epoch 2 = step 4).
    let out = dir("fault-lost");
    let o = train(&out, "5", &[("MASNET_INJECT_FAULT", "lost@5")]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    for want in [
        "GPU fault at training step 5",
        "device lost",
        "epoch-0002.safetensors (step 4)",
        "--resume",
    ] {
        assert!(err.contains(want), "stderr lacks '{want}':\n{err}");
    }
    assert!(!out.join("fault.safetensors").exists());
    let resumed = dir("fault-lost-resumed");
    ok(&[
        "train",
        "--resume",
        out.join("epoch-0002.safetensors").to_str().unwrap(),
        "-o",
        resumed.to_str().unwrap(),
    ]);
    assert!(bytes(&reference_dir.join(f)) == bytes(&resumed.join(f)));

    // A malformed injection spec is refused.
    let o = train(&dir("fault-bad"), "5", &[("MASNET_INJECT_FAULT", "melt@x")]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("invalid@STEP"));
}

#[test]
fn a_lowered_binding_limit_still_segments_or_fails_up_front() {
    let (reference_dir, _) = reference();
    let model = reference_dir.join("latest.safetensors");
    let d = dir("segment-limit");
    let data = |n: &str| volume::embedded_dir().join(n).display().to_string();
    let (t1, t2, mask) = (
        data("T1w.nii.gz"),
        data("T2w.nii.gz"),
        data("brain_mask.nii.gz"),
    );
    let seg = |out: &Path, limit: &str| {
        run(
            &[
                "segment",
                "--model",
                model.to_str().unwrap(),
                "--t1",
                &t1,
                "--t2",
                &t2,
                "--mask",
                &mask,
                "--tile",
                "96",
                "--max-binding",
                limit,
                "-o",
                out.to_str().unwrap(),
            ],
            &[],
        )
    };
    // 2 MiB: the whole-brain tile (96x112x96 x 8 channels = 33 MiB) is split.
    let out = d.join("capped.nii.gz");
    let o = seg(&out, "2MiB");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("exceeded the storage-binding limit of 2097152"),
        "{err}"
    );
    let v = volume::read(&out).unwrap();
    assert!(v.data.iter().any(|&l| l > 0.0));
    // 1 KiB: even the weights do not fit; a clear error and no output file.
    let out = d.join("refused.nii.gz");
    let o = seg(&out, "1KiB");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("1024 bytes per storage buffer"), "{err}");
    assert!(!out.exists());
}
