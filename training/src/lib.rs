//! HQ-CLIP training on libtorch (tch).
//!
//! - [`data`]: the training data pipeline: webdataset shards to batches of image tensors, tokens,
//!   hard negatives and tag targets, with open_clip's transforms, mixed-text policy, shuffling and
//!   an exactly resumable position.
//! - [`device`]: choosing where training runs, with a clear error instead of a silent CPU run when
//!   a GPU was asked for and libtorch cannot see one.
//! - [`encoder`]: [`TchEncoder`], the model behind `hq_eval::Encoder` for evaluation.
//! - [`checkpoint`]: training checkpoints (atomic directories with checksums, verified on load).
//! - [`config`]: [`TrainConfig`], the run settings (TOML, overrides, validation).
//! - [`optim`], [`schedule`]: AdamW with savable state; warm-up + cosine learning rate.
//! - [`step`]: one optimizer step of the HQ-CLIP objective (gradient accumulation included).
//! - [`train`]: a whole run ([`run`]): checkpoints, resume, metrics, evaluation, plots.
//! - [`metrics`]: `metrics.jsonl` and the PNG curves; [`tensorboard`]: its mirror as TensorBoard
//!   event files.
//! - [`ablation`]: the ablation table and chart over variants and seeds.
//! - [`precision`]: bf16 autocast on CUDA.
//! - [`model`]: CLIP with open_clip's architecture and state-dict names (configs, presets,
//!   safetensors checkpoints that load both ways).

pub mod ablation;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod device;
pub mod distributed;
pub mod encoder;
pub mod error;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod precision;
pub mod schedule;
pub mod step;
pub mod tensorboard;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod train;

pub use config::{TrainConfig, Variant};
pub use encoder::TchEncoder;
pub use error::TrainError;
pub use train::{run, RunRequest, RunSummary};
