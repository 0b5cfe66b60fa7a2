//! HQ-CLIP evaluation, model-free: it sits below the model crates so that `hq-train` (periodic
//! zero-shot evaluation), `hq-runtime` (the ONNX encoder) and the `hq-eval` command all share it.
//!
//! - [`encoder`]: the [`Encoder`] trait every backend implements.

pub mod encoder;

pub use encoder::{EncodeError, Encoder};
