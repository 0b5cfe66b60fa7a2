//! HQ-CLIP's data layer, the bottom of the workspace: every other crate reads and writes samples
//! through it.
//!
//! - [`sample`]: one image-text sample with its optional four refined texts.
//! - [`recaption_format`]: the recaptioner's strict four-field answer format (render + parse).
//! - [`text`]: the CLIP tokenizer (open_clip's ids), caption segmentation, tag vocabularies.
//! - [`synth`]: the built-in synthetic corpus (`hq-data synth`): scenes, images, noisy alt-text,
//!   oracle refined texts, held-out sets in DataComp and ARO layouts, corpus statistics.
//! - [`quality`]: recaption quality against the synthetic corpus's scene ground truth
//!   (`hq-data quality`): a small scene-claims reader, the metrics, JSON / Markdown / PNG reports.
//! - [`transform`]: open_clip's train and eval image transforms, PIL-exact bicubic, CLIP
//!   normalisation (shared by training, evaluation and the ONNX runtime).
//! - [`atomic`], [`progress`]: atomic file output and the progress bar every long job shows.

pub mod atomic;
pub mod error;
pub mod progress;
pub mod quality;
pub mod recaption_format;
pub mod sample;
pub mod shards;
pub mod synth;
pub mod text;
pub mod transform;

pub use error::{DataError, Result, SampleError};
pub use sample::{ImageBytes, RefinedTexts, Sample};
