//! Arbitrary bytes through the checkpoint loader: `Checkpoint::from_bytes` (the parser
//! `Checkpoint::read` uses) and, when a file parses, what `nn::io::load_model` does with
//! it before it needs a GPU: the model configuration under `masnet.config`
//! (`nn::io::model_config`) and the configuration checks that exist without a GPU.
//! Building the model (and so the parameter shapes to match the tensors against) needs
//! a `GpuContext`, so it is not fuzzed.
//!
//! Checked: no panic, no hang, no runaway allocation (libFuzzer's limits); errors name
//! the file; a parsed checkpoint is consistent (values = product of the shape) and
//! survives saving and reading back bit for bit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use masnet_wgpu::checkpoint::{Checkpoint, FORMAT_VERSION, KEY_CHECKSUM, KEY_FORMAT_VERSION};
use masnet_wgpu::nn::blocks::ModelForm;
use masnet_wgpu::nn::io::model_config;
use masnet_wgpu::nn::ModelConfig;
use std::path::Path;

const ORIGIN: &str = "fuzz-input.safetensors";

fuzz_target!(|data: &[u8]| {
    let ckpt = match Checkpoint::from_bytes(data, ORIGIN) {
        Ok(c) => c,
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains(ORIGIN), "error does not name the file: {msg}");
            return;
        }
    };
    for t in &ckpt.tensors {
        let n = t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        assert_eq!(n, Some(t.data.len()), "tensor '{}' {:?}", t.name, t.shape);
    }

    // Saving what was loaded (e.g. resuming training) and reading it back.
    if let Ok(bytes) = ckpt.to_bytes() {
        let again = Checkpoint::from_bytes(&bytes, ORIGIN).expect("a re-saved checkpoint loads");
        assert_eq!(again.tensors.len(), ckpt.tensors.len());
        for (a, b) in again.tensors.iter().zip(&ckpt.tensors) {
            assert_eq!((&a.name, &a.shape), (&b.name, &b.shape));
            assert!(a
                .data
                .iter()
                .map(|v| v.to_bits())
                .eq(b.data.iter().map(|v| v.to_bits())));
        }
        for (k, v) in &ckpt.metadata {
            if k != KEY_CHECKSUM {
                assert_eq!(again.metadata.get(k), Some(v), "metadata '{k}'");
            }
        }
        assert_eq!(
            again.metadata.get(KEY_FORMAT_VERSION).map(String::as_str),
            Some(FORMAT_VERSION)
        );
    }

    // load_model up to the point where it builds the model on the GPU.
    match model_config(&ckpt, Path::new(ORIGIN)) {
        Ok(config) => {
            let _ = (config.name(), config.classes());
            assert_eq!(config.training().form(), ModelForm::Training);
            let _ = match &config {
                ModelConfig::Ccfcn(c) => c.validate(),
                ModelConfig::Unet3d(c) => c.validate(),
                ModelConfig::Dunet(c) => c.mix.validate(),
                ModelConfig::Buinet(c) => c.mix.validate(),
                ModelConfig::Nlunet(c) => c.mix.validate(),
            };
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains(ORIGIN), "error does not name the file: {msg}");
        }
    }
});
