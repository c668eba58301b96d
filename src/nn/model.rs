//! The networks the tool trains and runs, behind one interface: build from a
//! configuration, forward on a tape, convert to an inference form.

use crate::autograd::{Graph, ParamStore, Var};
use crate::error::{Error, Result};
use crate::gpu::GpuContext;
use crate::nn::blocks::{BlockKind, ModelForm};
use crate::nn::buinet::{Buinet, BuinetConfig};
use crate::nn::ccfcn::{Ccfcn, CcfcnConfig};
use crate::nn::dunet::{Dunet, DunetConfig};
use crate::nn::layers::BatchNorm;
use crate::nn::mixacb::MixSpec;
use crate::nn::nlunet::{Nlunet, NlunetConfig};
use crate::nn::unet3d::{Unet3d, Unet3dConfig};
use serde::{Deserialize, Serialize};

/// What every network provides.
pub trait Network: Sized + Clone {
    /// Its hyper-parameters (serialised into checkpoints).
    type Config: Clone + Serialize + for<'de> Deserialize<'de>;
    /// A freshly initialised training-form network in `store` (seeded).
    fn new(
        ctx: &GpuContext,
        store: &mut ParamStore,
        config: Self::Config,
        seed: u64,
    ) -> Result<Self>;
    /// Logits `[N, classes, D, H, W]` for an input `[N, in_channels, D, H, W]`.
    fn forward(
        &self,
        g: &mut Graph<'_>,
        store: &ParamStore,
        x: Var,
        dropout_seed: u32,
    ) -> Result<Var>;
    /// The network in `form` with its parameters in a new store.
    fn convert(
        &self,
        ctx: &GpuContext,
        store: &ParamStore,
        form: ModelForm,
    ) -> Result<(Self, ParamStore)>;
    /// Its configuration.
    fn config(&self) -> &Self::Config;
    /// The form its parameters are in.
    fn form(&self) -> ModelForm;
    /// Spatial sizes must be multiples of this.
    fn input_multiple(&self) -> usize;
    /// Input channels and output classes.
    fn channels(&self) -> (usize, usize);
    /// Calls `f` on every BatchNorm (e.g. to recalibrate statistics).
    fn for_each_bn_mut(&mut self, f: &mut dyn FnMut(&mut BatchNorm));
}

/// Every network: enum variant, type, configuration type, CLI name.
macro_rules! networks {
    ($mac:ident) => {
        $mac! {
            Dunet(Dunet, DunetConfig, "dunet"),
            Unet3d(Unet3d, Unet3dConfig, "unet3d"),
            Ccfcn(Ccfcn, CcfcnConfig, "ccfcn"),
            Buinet(Buinet, BuinetConfig, "buinet"),
            Nlunet(Nlunet, NlunetConfig, "nlunet"),
        }
    };
}

macro_rules! define {
    ($($v:ident($t:ty, $c:ty, $name:literal)),* $(,)?) => {
        /// The configuration stored in a checkpoint: which network and its
        /// hyper-parameters.
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "model", rename_all = "lowercase")]
        pub enum ModelConfig {
            $(
                #[doc = concat!("`", $name, "`.")]
                $v($c),
            )*
        }

        /// Any network.
        // One value per process; the size difference between networks does not matter.
        #[allow(clippy::large_enum_variant)]
        #[derive(Clone, Debug)]
        pub enum Model {
            $(
                #[doc = concat!("`", $name, "`.")]
                $v($t),
            )*
        }

        /// The CLI names of every network.
        pub const MODEL_NAMES: &[&str] = &[$($name),*];

        impl ModelConfig {
            /// The network's name (`dunet`, …).
            pub fn name(&self) -> &'static str {
                match self { $(ModelConfig::$v(_) => $name,)* }
            }

            /// A freshly initialised network of this configuration.
            pub fn build(&self, ctx: &GpuContext, store: &mut ParamStore, seed: u64) -> Result<Model> {
                Ok(match self {
                    $(ModelConfig::$v(c) => Model::$v(<$t as Network>::new(ctx, store, c.clone(), seed)?),)*
                })
            }

            /// The same configuration in training form (fused checkpoints are built this
            /// way and then converted).
            pub fn training(&self) -> ModelConfig {
                let mut c = self.clone();
                match &mut c { $(ModelConfig::$v(x) => x.form = ModelForm::Training,)* }
                c
            }

            /// The form the configuration describes.
            pub fn form(&self) -> ModelForm {
                match self { $(ModelConfig::$v(c) => c.form,)* }
            }

            /// Sets the block kind of the convolutions MixACB replaces.
            pub fn set_block(&mut self, kind: BlockKind) {
                match self { $(ModelConfig::$v(c) => c.block = kind,)* }
            }

            /// Sets the MixACB groups and ratio.
            pub fn set_mix(&mut self, mix: MixSpec) {
                match self { $(ModelConfig::$v(c) => c.mix = mix,)* }
            }

            /// Output classes.
            pub fn classes(&self) -> usize {
                match self { $(ModelConfig::$v(c) => c.classes,)* }
            }
        }

        impl Model {
            /// Logits for `x`.
            pub fn forward(&self, g: &mut Graph<'_>, store: &ParamStore, x: Var, dropout_seed: u32) -> Result<Var> {
                match self { $(Model::$v(m) => Network::forward(m, g, store, x, dropout_seed),)* }
            }

            /// The model in `form`.
            pub fn convert(&self, ctx: &GpuContext, store: &ParamStore, form: ModelForm) -> Result<(Model, ParamStore)> {
                Ok(match self {
                    $(Model::$v(m) => {
                        let (m, s) = Network::convert(m, ctx, store, form)?;
                        (Model::$v(m), s)
                    })*
                })
            }

            /// Its configuration (what a checkpoint stores).
            pub fn config(&self) -> ModelConfig {
                match self { $(Model::$v(m) => ModelConfig::$v(Network::config(m).clone()),)* }
            }

            /// The form of its parameters.
            pub fn form(&self) -> ModelForm {
                match self { $(Model::$v(m) => Network::form(m),)* }
            }

            /// Spatial sizes must be multiples of this.
            pub fn input_multiple(&self) -> usize {
                match self { $(Model::$v(m) => Network::input_multiple(m),)* }
            }

            /// Input channels and output classes.
            pub fn channels(&self) -> (usize, usize) {
                match self { $(Model::$v(m) => Network::channels(m),)* }
            }

            /// Calls `f` on every BatchNorm.
            pub fn for_each_bn_mut(&mut self, f: &mut dyn FnMut(&mut BatchNorm)) {
                match self { $(Model::$v(m) => Network::for_each_bn_mut(m, f),)* }
            }
        }
    };
}

networks!(define);

impl ModelConfig {
    /// The configuration of network `name` from a JSON object of its fields (missing
    /// fields take the defaults, unknown ones are an error).
    pub fn from_fields(name: &str, fields: serde_json::Value) -> Result<ModelConfig> {
        if !MODEL_NAMES.contains(&name) {
            return Err(Error::InvalidArgument(format!(
                "model '{name}': expected one of {}",
                MODEL_NAMES.join(", ")
            )));
        }
        let mut obj = match fields {
            serde_json::Value::Object(m) => m,
            serde_json::Value::Null => serde_json::Map::new(),
            other => {
                return Err(Error::InvalidArgument(format!(
                    "model settings must be a table, not {other}"
                )))
            }
        };
        obj.insert("model".into(), serde_json::Value::String(name.to_string()));
        serde_json::from_value(serde_json::Value::Object(obj))
            .map_err(|e| Error::InvalidArgument(format!("model '{name}': {e}")))
    }

    /// Spatial sizes must be multiples of this (builds nothing on the GPU).
    pub fn input_multiple(&self) -> usize {
        match self {
            ModelConfig::Dunet(c) => pow2(c.levels),
            ModelConfig::Ccfcn(c) => pow2(c.encoder_layers.len()),
            ModelConfig::Unet3d(c) => pow2(c.widths.len().saturating_sub(1)),
            ModelConfig::Nlunet(c) => pow2(c.levels.saturating_sub(1)),
            ModelConfig::Buinet(c) => pow2(c.blocks),
        }
    }
}

impl Network for Dunet {
    type Config = DunetConfig;
    fn new(
        ctx: &GpuContext,
        store: &mut ParamStore,
        config: DunetConfig,
        seed: u64,
    ) -> Result<Self> {
        Dunet::new(ctx, store, config, seed)
    }
    fn forward(&self, g: &mut Graph<'_>, store: &ParamStore, x: Var, seed: u32) -> Result<Var> {
        Dunet::forward(self, g, store, x, seed)
    }
    fn convert(
        &self,
        ctx: &GpuContext,
        store: &ParamStore,
        form: ModelForm,
    ) -> Result<(Self, ParamStore)> {
        Dunet::convert(self, ctx, store, form)
    }
    fn config(&self) -> &DunetConfig {
        &self.config
    }
    fn form(&self) -> ModelForm {
        self.config.form
    }
    fn input_multiple(&self) -> usize {
        pow2(self.config.levels)
    }
    fn channels(&self) -> (usize, usize) {
        (self.config.in_channels, self.config.classes)
    }
    fn for_each_bn_mut(&mut self, f: &mut dyn FnMut(&mut BatchNorm)) {
        Dunet::for_each_bn_mut(self, f)
    }
}

/// `2^n`, saturating (a level count read from a file must not overflow a shift).
pub(crate) fn pow2(n: usize) -> usize {
    u32::try_from(n)
        .ok()
        .and_then(|n| 1usize.checked_shl(n))
        .unwrap_or(usize::MAX)
}
