//! HQ-CLIP evaluation, model-free: it sits below the model crates so that `hq-train` (periodic
//! zero-shot evaluation), `hq-runtime` (the ONNX encoder) and the `hq-eval` command all share it.
//!
//! - [`encoder`]: the [`Encoder`] trait every backend implements.
//! - [`metrics`]: CLIP_benchmark / DataComp / WILDS / ARO metrics on plain buffers.
//! - [`wds`], [`npy`]: the DataComp / CLIP_benchmark webdataset layout.
//! - [`pipeline`]: decode on a rayon pool while the encoder embeds the previous batch.
//! - [`evaluate`]: one dataset folder -> every metric of its kind.
//! - [`tasks`]: DataComp's 38 tasks and ARO (folders, kinds, main metrics, groups).
//! - [`results`], [`run`], [`report`]: per-task results saved as they finish, DataComp's
//!   aggregates with partial marking, terminal / Markdown tables, comparison, PNG chart.
//! - [`builtin`]: the synthetic corpus's held-out sets as a suite ([`evaluate_builtin`]).

pub mod alignment;
pub mod builtin;
pub mod encoder;
pub mod error;
pub mod evaluate;
pub mod metrics;
pub mod npy;
pub mod pipeline;
pub mod probe;
pub mod report;
pub mod results;
pub mod run;
pub mod tasks;
pub mod wds;

pub use builtin::{evaluate_builtin, BuiltinReport};
pub use encoder::{EncodeError, Encoder};
pub use error::EvalError;
pub use pipeline::RunOptions;
