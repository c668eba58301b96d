//! masnet-wgpu: a GPU tensor engine on wgpu/WGSL that trains and runs 3D-MASNet.
//!
//! Layers, lowest first: [`gpu`] (device, buffers, pipelines) → [`tensor`] → [`ops`]
//! (WGSL kernels with CPU references) → [`autograd`] (tape, parameter store) → [`optim`]
//! (Adam), with [`schedule`] and [`init`] beside them; [`bench`] measures the kernels. Lower layers never import higher ones.

pub mod autograd;
pub mod bench;
pub mod checkpoint;
pub mod data;
pub mod error;
pub mod gpu;
pub mod init;
pub mod metrics;
pub mod nn;
pub mod ops;
pub mod optim;
pub mod rng;
pub mod schedule;
pub mod segment;
pub mod tensor;
pub mod train;

pub use error::{Error, Result};
pub use gpu::{BackendChoice, GpuContext, GpuOptions};
pub use tensor::{Shape5, Tensor};
