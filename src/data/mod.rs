//! Data for training and inference: medical-image IO ([`volume`]: NIfTI/Analyze read and
//! write, label maps, iSeg-style dataset discovery, the embedded MNI brain), intensity
//! pre-processing ([`preprocess`]) and patch sampling ([`sampler`]).

pub mod preprocess;
pub mod preview;
pub mod sampler;
pub mod volume;
