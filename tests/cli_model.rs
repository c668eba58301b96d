//! `masnet-wgpu summary` and `masnet-wgpu fuse` through the real binary.

mod common;

use masnet_wgpu::autograd::ParamStore;
use masnet_wgpu::nn::io::{load_model, save_model};
use masnet_wgpu::nn::{Dunet, DunetConfig, ModelForm};
use std::process::Command;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_masnet-wgpu"));
    c.env("XDG_RUNTIME_DIR", std::env::temp_dir());
    c
}

fn temp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("masnet-cli-model-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

#[test]
fn summary_prints_the_papers_counts() {
    let out = bin()
        .args(["summary", "--model", "dunet", "--block", "mixacb"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for n in [
        "3,109,521",
        "3,117,549",
        "2,341,141",
        "2,344,401",
        "dense7.layers.2",
        "down3.strided",
    ] {
        assert!(text.contains(n), "missing {n} in:\n{text}");
    }
    let out = bin().args(["summary", "--block", "conv"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(text.contains("2,492,795"), "{text}");
    let out = bin()
        .args(["summary", "--block", "resnet"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected mixacb or conv"));
}

#[test]
fn fuse_converts_a_training_checkpoint_and_refuses_bad_input() {
    let ctx = common::gpu();
    let small = DunetConfig {
        init_features: 8,
        growth: 4,
        layers_per_block: 1,
        bottleneck: 8,
        levels: 1,
        ..DunetConfig::default()
    };
    let mut store = ParamStore::new();
    let model = Dunet::new(&ctx, &mut store, small, 3).unwrap();
    let src = temp("train.safetensors");
    save_model(
        &ctx,
        &src,
        &masnet_wgpu::nn::Model::Dunet(model),
        &store,
        Default::default(),
    )
    .unwrap();
    let dst = temp("fused.safetensors");
    let out = bin()
        .args([
            "fuse",
            "--model",
            src.to_str().unwrap(),
            "-o",
            dst.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (fused, fstore, _) = load_model(&ctx, &dst).unwrap();
    assert_eq!(fused.form(), ModelForm::Folded);
    assert_eq!(
        fstore.total_count(),
        fstore.trainable_count(),
        "no BN buffers left"
    );
    // Fusing a fused model, a missing file and a non-model file fail without output.
    let again = temp("again.safetensors");
    for input in [
        dst.clone(),
        temp("missing.safetensors"),
        src.with_extension("txt"),
    ] {
        if input.extension().is_some_and(|e| e == "txt") {
            std::fs::write(&input, b"not a checkpoint").unwrap();
        }
        let out = bin()
            .args([
                "fuse",
                "--model",
                input.to_str().unwrap(),
                "-o",
                again.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{input:?} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("error:") && err.contains(input.file_name().unwrap().to_str().unwrap()),
            "{err}"
        );
        assert!(!again.exists(), "partial output after {input:?}");
    }
}

#[test]
fn summary_covers_the_other_networks() {
    for (model, trainable, total) in [
        ("unet3d", "3,117,568", "3,123,008"),
        ("ccfcn", "2,038,948", "2,043,492"),
        ("nlunet", "2,447,684", "2,453,828"),
        ("buinet", "1,814,400", "1,822,104"),
    ] {
        let out = bin().args(["summary", "--model", model]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{model}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains(trainable) && text.contains(total),
            "{model}:\n{text}"
        );
        assert!(text.contains("every BN folded"), "{model}:\n{text}");
    }
    let out = bin()
        .args(["summary", "--model", "unet3d", "--growth", "8"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn other_networks_train_save_and_segment_through_the_cli() {
    let d = temp("nets");
    std::fs::create_dir_all(&d).unwrap();
    let t1 = masnet_wgpu::data::volume::embedded_dir().join("T1w.nii.gz");
    let t2 = masnet_wgpu::data::volume::embedded_dir().join("T2w.nii.gz");
    let mask = masnet_wgpu::data::volume::embedded_dir().join("brain_mask.nii.gz");
    // NLU-Net's global attention is quadratic in the bottom level's positions, so it
    // segments with small windows (as the paper, 32^3 with 3 levels).
    for (model, table, window) in [
        ("unet3d", "widths = [4, 8]", "48"),
        ("buinet", "init_features = 4\ngrowth = 4\nlayers_per_block = 1\nblocks = 2", "48"),
        ("nlunet", "features = 4\nlevels = 2\nbottom_heads = 1", "16"),
        ("ccfcn", "encoder_layers = [1, 1]\nencoder_widths = [4, 4]\ndecoder_layers = [1, 1]\ndecoder_width = 4\nskip_width = 4", "48"),
    ] {
        let cfg = d.join(format!("{model}.toml"));
        std::fs::write(&cfg, format!("[model]\n{table}\n[train]\npatch = 8\nbatch = 2\nepochs = 1\nsteps_per_epoch = 2\n")).unwrap();
        let out_dir = d.join(model);
        let o = bin()
            .args(["train", "--model", model, "--config", cfg.to_str().unwrap(), "-o", out_dir.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(o.status.success(), "{model} train: {}", String::from_utf8_lossy(&o.stderr));
        let ckpt = out_dir.join("latest.safetensors");
        let (m, _, _) = load_model(&common::gpu(), &ckpt).unwrap();
        assert_eq!(m.config().name(), model);
        let seg = d.join(format!("{model}-seg.nii.gz"));
        let o = bin()
            .args([
                "segment", "--model", ckpt.to_str().unwrap(), "--t1", t1.to_str().unwrap(), "--t2",
                t2.to_str().unwrap(), "--mask", mask.to_str().unwrap(), "--patch", window, "--step", window, "-o",
                seg.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{model} segment: {}", String::from_utf8_lossy(&o.stderr));
        assert!(seg.exists());
    }
}
