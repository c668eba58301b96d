//! The crate's error type: every failure names what it was about.

use thiserror::Error;

/// Everything that can go wrong in the engine.
#[derive(Debug, Error)]
pub enum Error {
    /// No GPU adapter could be found or opened.
    #[error("no GPU adapter: {0}")]
    NoAdapter(String),
    /// The device could not be created or was lost.
    #[error("GPU device error: {0}")]
    Device(String),
    /// The device was lost (driver reset, GPU removed or out of memory); nothing more
    /// can run on it.
    #[error("GPU device lost ({0}); restart the program (a training run continues with --resume)")]
    DeviceLost(String),
    /// A GPU fault stopped training; `advice` says what was saved and how to go on.
    #[error("GPU fault at training step {step}: {cause}. {advice}")]
    TrainingFault {
        /// 1-based step that failed.
        step: u64,
        /// The error wgpu or the engine reported.
        cause: Box<Error>,
        /// What was saved and how to continue.
        advice: String,
    },
    /// A tensor shape does not fit the operation.
    #[error("shape error: {0}")]
    Shape(String),
    /// An argument is outside its valid range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A buffer would exceed the adapter's limits.
    #[error("GPU limit exceeded: {0}")]
    Limit(String),
    /// wgpu reported a validation or out-of-memory error.
    #[error("GPU error in {context}: {message}")]
    Gpu {
        /// What the engine was doing.
        context: String,
        /// wgpu's own message.
        message: String,
    },
    /// Training produced a non-finite loss or parameter.
    #[error("training diverged at step {step}: {detail} (lower the learning rate, check the inputs for NaN/Inf)")]
    Diverged {
        /// 1-based step at which it was detected.
        step: u64,
        /// What is non-finite.
        detail: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file concerned.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// Result alias for the engine.
pub type Result<T> = std::result::Result<T, Error>;

/// Shorthand for a shape error with a formatted message.
#[macro_export]
macro_rules! shape_err {
    ($($arg:tt)*) => { $crate::error::Error::Shape(format!($($arg)*)) };
}

impl Error {
    /// Whether this is a fault of the GPU or its driver (validation, out of memory,
    /// device lost) rather than of the input.
    pub fn is_gpu_fault(&self) -> bool {
        matches!(
            self,
            Error::Gpu { .. } | Error::Device(_) | Error::DeviceLost(_)
        )
    }
}
