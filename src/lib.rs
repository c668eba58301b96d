//! masnet-wgpu: a GPU tensor engine on wgpu/WGSL that trains and runs 3D-MASNet.
//!
//! Layers, lowest first: [`gpu`] (device, buffers, pipelines) → [`tensor`] → [`ops`]
//! (WGSL kernels with CPU references) → [`bench`]. Lower layers never import higher ones.

pub mod bench;
pub mod error;
pub mod gpu;
pub mod ops;
pub mod rng;
pub mod tensor;

pub use error::{Error, Result};
pub use gpu::{BackendChoice, GpuContext, GpuOptions};
pub use tensor::{Shape5, Tensor};
