//! Layers and models over the tape: basic layers, MixACB (branched and fused), DU-Net,
//! and the parameter summary.

pub mod blocks;
pub mod buinet;
pub mod ccfcn;
pub mod dunet;
pub mod io;
pub mod layers;
pub mod mixacb;
pub mod model;
pub mod nlunet;
pub mod summary;
pub mod unet3d;

pub use dunet::{BlockKind, Dunet, DunetConfig, ModelForm};
pub use mixacb::{FusedMixAcb, MixAcb, MixSpec};
pub use model::{Model, ModelConfig, Network};
