//! Qwen2-VL on ONNX Runtime: the recaptioner's engine.
//!
//! The model directory is the three-file ONNX layout of transformers.js / onnx-community
//! (`onnx/vision_encoder.onnx`, `onnx/embed_tokens.onnx`, `onnx/decoder_model_merged.onnx`) plus
//! `tokenizer.json`, `config.json`, `generation_config.json` and `preprocessor_config.json`, as
//! written by `export/qwen2vl/export_qwen2vl.py` from any Hugging Face Qwen2-VL checkpoint.
//!
//! - [`model_dir`]: the directory, checked at start-up (missing files, inconsistent configs).
//! - [`preprocess`]: Qwen2-VL's image processor (smart resize, PIL bicubic, CLIP mean/std,
//!   temporal repeat, 1176-value patches, grid sizes).
//! - [`prompt`]: the chat template and the image placeholder expansion.
//! - [`rope`]: M-RoPE 3-D position ids.
//! - [`sampling`]: greedy and seeded temperature / top-p sampling.
//! - [`engine`]: [`Qwen2Vl`], batched generation with the key/value cache.
//! - `prefix_cache`: the key/value cache of prompt prefixes shared across rows and calls.
//!
//! The engine is tested token for token against HF transformers' `generate` on a tiny random
//! Qwen2-VL (`tests/tests/recap_qwen2vl.rs`).

pub mod engine;
pub mod model_dir;
mod prefix_cache;
pub mod preprocess;
pub mod prompt;
pub mod rope;
pub mod sampling;

pub use engine::{
    EngineOptions, FinishReason, Generation, GenerationParams, GenerationStats, Qwen2Vl, Request,
    TrtProfile,
};
pub use model_dir::{ModelConfig, ModelDir, PreprocessConfig};
pub use preprocess::{smart_resize, ImageProcessor, PreparedImage};
pub use prompt::{render_chat, Message, Part, Prompt};
pub use rope::{rope_index, RopePositions};
pub use sampling::{Sampler, Sampling};
