//! Saving and loading models: a safetensors checkpoint of the parameter store with the
//! model configuration (JSON) under `masnet.config` (see `docs/checkpoint-format.md`).

use crate::autograd::ParamStore;
use crate::checkpoint::{Checkpoint, KEY_CONFIG};
use crate::error::{Error, Result};
use crate::gpu::GpuContext;
use crate::nn::blocks::ModelForm;
use crate::nn::model::Model;
pub use crate::nn::model::ModelConfig;
use std::collections::BTreeMap;
use std::path::Path;

/// Writes `store` with `model`'s configuration and `extra` metadata, atomically.
pub fn save_model(
    ctx: &GpuContext,
    path: &Path,
    model: &Model,
    store: &ParamStore,
    extra: BTreeMap<String, String>,
) -> Result<()> {
    model_checkpoint(ctx, model, store, extra)?.write(path)
}

/// The checkpoint [`save_model`] writes, to add tensors to before writing.
pub fn model_checkpoint(
    ctx: &GpuContext,
    model: &Model,
    store: &ParamStore,
    extra: BTreeMap<String, String>,
) -> Result<Checkpoint> {
    let mut meta = extra;
    let config = serde_json::to_string(&model.config())
        .map_err(|e| Error::InvalidArgument(format!("model configuration: {e}")))?;
    meta.insert(KEY_CONFIG.to_string(), config);
    Checkpoint::from_store(ctx, store, meta)
}

/// The configuration stored in a checkpoint, with the checkpoint's file name in errors.
pub fn model_config(ckpt: &Checkpoint, path: &Path) -> Result<ModelConfig> {
    let raw = ckpt.metadata.get(KEY_CONFIG).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "{}: no model configuration ('{KEY_CONFIG}' metadata); not a masnet-wgpu model",
            path.display()
        ))
    })?;
    serde_json::from_str(raw).map_err(|e| {
        Error::InvalidArgument(format!(
            "{}: model configuration is not valid: {e}",
            path.display()
        ))
    })
}

/// Builds the model a checkpoint describes and loads its parameters (every name and
/// shape checked first); returns the checkpoint too (metadata, optimiser state).
pub fn load_model(ctx: &GpuContext, path: &Path) -> Result<(Model, ParamStore, Checkpoint)> {
    let ckpt = Checkpoint::read(path)?;
    let config = model_config(&ckpt, path)?;
    let (model, store) = build(ctx, &config)?;
    ckpt.load_into_filtered(ctx, &store, &[crate::checkpoint::OPTIMIZER_PREFIX])
        .map_err(|e| Error::InvalidArgument(format!("{}: {e}", path.display())))?;
    Ok((model, store, ckpt))
}

/// A model of `config` (any form) with placeholder values, ready to be loaded into.
pub fn build(ctx: &GpuContext, config: &ModelConfig) -> Result<(Model, ParamStore)> {
    let mut store = ParamStore::new();
    let model = config.training().build(ctx, &mut store, 0)?;
    if config.form() == ModelForm::Training {
        return Ok((model, store));
    }
    model.convert(ctx, &store, config.form())
}
