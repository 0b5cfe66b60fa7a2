//! HQ-CLIP training on libtorch (tch).
//!
//! - [`data`]: the training data pipeline: webdataset shards to batches of image tensors, tokens,
//!   hard negatives and tag targets, with open_clip's transforms, mixed-text policy, shuffling and
//!   an exactly resumable position.
//! - [`device`]: choosing where training runs, with a clear error instead of a silent CPU run when
//!   a GPU was asked for and libtorch cannot see one.
//! - [`model`]: CLIP with open_clip's architecture and state-dict names (configs, presets,
//!   safetensors checkpoints that load both ways).

pub mod data;
pub mod device;
pub mod error;
pub mod model;

pub use error::TrainError;
