//! End to end through the real binary on the embedded brain: train a tiny model for a
//! few steps, resume exactly, segment, evaluate; and bad input exiting non-zero with a
//! clear message and no partial output.

mod common;

use masnet_wgpu::checkpoint::Checkpoint;
use masnet_wgpu::data::volume::{self, DataType, Volume};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_masnet-wgpu"))
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .args(args)
        .output()
        .expect("run masnet-wgpu")
}

fn ok(args: &[&str]) -> String {
    let o = bin(args);
    assert!(
        o.status.success(),
        "{args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn fails(args: &[&str], expect: &str, no_file: &Path) {
    let o = bin(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{args:?} succeeded");
    assert!(
        err.contains(expect),
        "{args:?}: stderr lacks '{expect}':\n{err}"
    );
    assert!(!no_file.exists(), "{args:?} left {}", no_file.display());
}

fn dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("masnet-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn data(name: &str) -> String {
    volume::embedded_dir().join(name).display().to_string()
}

#[test]
fn train_resume_segment_eval_on_the_embedded_brain() {
    let d = dir();
    let run_a = d.join("a");
    let mut args = common::tiny_train_args("2");
    args.extend(["--seed", "5"]);
    let a = run_a.to_str().unwrap();
    args.extend(["-o", a, "--val", "held-out"]);
    ok(&args);
    for f in [
        "epoch-0001.safetensors",
        "epoch-0002.safetensors",
        "latest.safetensors",
        "metrics.jsonl",
    ] {
        assert!(run_a.join(f).exists(), "{f} missing");
    }
    let log = std::fs::read_to_string(run_a.join("metrics.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 2, "{log}");
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let d = v["val_dice"].as_f64().unwrap_or(-1.0);
        assert!((0.0..=1.0).contains(&d), "validation Dice {d} in {line}");
    }

    // Resume from epoch 1 in another folder: epoch 2 must be bit-identical.
    let run_b = d.join("b");
    let e1 = run_a.join("epoch-0001.safetensors");
    ok(&[
        "train",
        "--resume",
        e1.to_str().unwrap(),
        "-o",
        run_b.to_str().unwrap(),
    ]);
    let ca = Checkpoint::read(&run_a.join("epoch-0002.safetensors")).unwrap();
    let cb = Checkpoint::read(&run_b.join("epoch-0002.safetensors")).unwrap();
    assert_eq!(ca.tensors.len(), cb.tensors.len());
    for (x, y) in ca.tensors.iter().zip(&cb.tensors) {
        assert_eq!(x.name, y.name);
        assert!(x.data == y.data, "{} differs after resume", x.name);
    }

    // Segment with the training checkpoint (fused on the fly), probabilities, preview.
    let seg = d.join("seg.nii.gz");
    let prob = d.join("prob.nii.gz");
    let png = d.join("seg.png");
    let latest = run_a.join("latest.safetensors");
    let (t1, t2, mask) = (
        data("T1w.nii.gz"),
        data("T2w.nii.gz"),
        data("brain_mask.nii.gz"),
    );
    let seg_args = |out: &Path| -> Vec<String> {
        [
            "segment",
            "--model",
            latest.to_str().unwrap(),
            "--t1",
            &t1,
            "--t2",
            &t2,
            "--mask",
            &mask,
            "--patch",
            "32",
            "--step",
            "32",
            "-o",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let mut a1 = seg_args(&seg);
    a1.extend([
        "--prob".into(),
        prob.display().to_string(),
        "--preview".into(),
        png.display().to_string(),
    ]);
    ok(&a1.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    let s = volume::read(&seg).unwrap();
    let reference = volume::read(Path::new(&t1)).unwrap();
    assert_eq!(s.dims, reference.dims);
    assert_eq!(s.affine, reference.affine);
    assert!(s
        .data
        .iter()
        .all(|&v| (0.0..=3.0).contains(&v) && v.fract() == 0.0));
    assert_eq!(volume::read_channels(&prob).unwrap().len(), 4);
    assert!(std::fs::metadata(&png).unwrap().len() > 100);

    // Evaluate against the truth.
    let json = ok(&[
        "eval",
        "--pred",
        seg.to_str().unwrap(),
        "--truth",
        &data("labels.nii.gz"),
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    for t in ["csf", "gm", "wm", "mean"] {
        let dice = v[t]["dice"].as_f64().unwrap_or(-1.0);
        assert!((0.0..=1.0).contains(&dice), "{t} dice {dice}: {json}");
    }

    // Bad input: nothing written, non-zero exit, a message naming the problem.
    let out = d.join("bad.nii.gz");
    let bad = |t1: &str, t2: &str| -> Vec<String> {
        let mut v = seg_args(&out);
        v[4] = t1.to_string();
        v[6] = t2.to_string();
        v
    };
    let missing = d.join("missing.nii.gz");
    let a2 = bad(missing.to_str().unwrap(), &t2);
    fails(
        &a2.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        "missing.nii.gz",
        &out,
    );
    let corrupt = d.join("corrupt.nii.gz");
    let bytes = std::fs::read(&t1).unwrap();
    std::fs::write(&corrupt, &bytes[..bytes.len() / 2]).unwrap();
    let a3 = bad(corrupt.to_str().unwrap(), &t2);
    fails(
        &a3.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        "corrupt.nii.gz",
        &out,
    );
    let small = d.join("small.nii.gz");
    let sv = Volume::new(
        [10, 12, 14],
        [2.0; 3],
        reference.affine,
        vec![0.5; 10 * 12 * 14],
    )
    .unwrap();
    volume::write_like(&small, &sv, &sv.data, DataType::F32).unwrap();
    let a4 = bad(&t1, small.to_str().unwrap());
    fails(
        &a4.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        "small.nii.gz",
        &out,
    );
    let four_d = d.join("four.nii.gz");
    volume::write_4d_like(
        &four_d,
        &reference,
        &[reference.data.clone(), reference.data.clone()],
    )
    .unwrap();
    let a5 = bad(four_d.to_str().unwrap(), &t2);
    fails(
        &a5.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        "four.nii.gz",
        &out,
    );
    fails(&["segment", "--frobnicate"], "unexpected argument", &out);
    fails(
        &[
            "eval",
            "--pred",
            small.to_str().unwrap(),
            "--truth",
            &data("labels.nii.gz"),
        ],
        "small.nii.gz",
        &out,
    );
}

/// An iSeg-style folder (Analyze pairs, labels 0/10/150/250) cut from the embedded brain.
fn iseg_folder(d: &Path) -> PathBuf {
    let brain = volume::load_embedded().unwrap();
    let f = d.join("iseg");
    std::fs::create_dir_all(&f).unwrap();
    let map = volume::LabelMap::parse("0,10,150,250").unwrap();
    for id in ["1", "2"] {
        let p = |m: &str| f.join(format!("subject-{id}-{m}.hdr"));
        volume::write_like(&p("T1"), &brain.t1, &brain.t1.data, DataType::F32).unwrap();
        volume::write_like(&p("T2"), &brain.t2, &brain.t2.data, DataType::F32).unwrap();
        let labels = map.from_classes(&brain.labels).unwrap();
        volume::write_like(&p("label"), &brain.t1, &labels, DataType::U8).unwrap();
    }
    f
}

#[test]
fn config_file_iseg_folder_ensemble_and_ctrl_c() {
    let d = dir().join("more");
    std::fs::create_dir_all(&d).unwrap();
    let iseg = iseg_folder(&d);
    let cfg = d.join("run.toml");
    std::fs::write(
        &cfg,
        format!(
            "[model]\ninit_features = 4\ngrowth = 4\nlayers_per_block = 1\nbottleneck = 4\nlevels = 1\n\
             [train]\npatch = 8\nbatch = 2\nepochs = 1\nsteps_per_epoch = 2\nseed = 9\n\
             [data]\ndir = {:?}\nlabel_map = \"0,10,150,250\"\nforeground_bias = 0.5\n",
            iseg.display().to_string()
        ),
    )
    .unwrap();
    let out = d.join("run");
    ok(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    let model = out.join("latest.safetensors");
    assert!(model.exists());
    // An unknown key in the file is an error naming the file.
    let bad_cfg = d.join("bad.toml");
    std::fs::write(&bad_cfg, "[train]\nbatchsize = 3\n").unwrap();
    fails(
        &[
            "train",
            "--config",
            bad_cfg.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ],
        "bad.toml",
        &d.join("none"),
    );

    // Two models = majority vote; labels written back with the iSeg values (Analyze).
    let seg = d.join("subject-1-seg.hdr");
    let t1 = iseg.join("subject-1-T1.hdr");
    let t2 = iseg.join("subject-1-T2.hdr");
    ok(&[
        "segment",
        "--model",
        model.to_str().unwrap(),
        "--model",
        out.join("epoch-0001.safetensors").to_str().unwrap(),
        "--t1",
        t1.to_str().unwrap(),
        "--t2",
        t2.to_str().unwrap(),
        "--patch",
        "48",
        "--step",
        "48",
        "--label-map",
        "0,10,150,250",
        "-o",
        seg.to_str().unwrap(),
    ]);
    let s = volume::read(&seg).unwrap();
    assert!(s.data.iter().all(|v| [0.0, 10.0, 150.0, 250.0].contains(v)));
    let json = ok(&[
        "eval",
        "--pred",
        seg.to_str().unwrap(),
        "--truth",
        iseg.join("subject-1-label.hdr").to_str().unwrap(),
        "--label-map",
        "0,10,150,250",
        "--json",
    ]);
    assert!(json.contains("\"gm\""), "{json}");

    // Ctrl-C (SIGINT) during a long run: exit 130 and a loadable checkpoint.
    let long = d.join("long");
    let mut child = Command::new(env!("CARGO_BIN_EXE_masnet-wgpu"))
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .args([
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--steps-per-epoch",
            "100000",
            "-o",
            long.to_str().unwrap(),
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until training has started (the metrics log is created before step 1).
    let t0 = std::time::Instant::now();
    while !long.join("metrics.jsonl").exists() && t0.elapsed().as_secs() < 120 {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    std::thread::sleep(std::time::Duration::from_secs(2));
    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "exit status after Ctrl-C");
    let ck = Checkpoint::read(&long.join("interrupted.safetensors")).unwrap();
    assert!(ck.metadata.contains_key("masnet.train_state"));
}
