//! The recaption job behind `hq-recap-trt`: stage 1 of HQ-CLIP (paper, section 3.2).
//!
//! Every (image, alt-text) sample of the inputs goes through the recaptioner with the paper's
//! prompt ([`prompt`]) and ends as exactly one record ([`output::RecapRecord`]): the four texts of
//! `hq_data::recaption_format` when the answer parses, else (after `max_attempts` tries with new
//! seeds and exemplars) an error record with the reason and the last raw answer. Samples that
//! cannot be read or decoded get error records too.
//!
//! - [`input`]: webdataset tar shards (every member kept), JSONL and CSV lists of image paths.
//! - [`prompt`]: instruction, format, seeded exemplar choice.
//! - [`generator`]: the model as a trait ([`Qwen2VlGenerator`] for the ONNX engine).
//! - [`job`]: the pipeline ([`run_job`]), worker split, summary.
//! - [`output`]: records, the crash-safe per-shard log, atomic tar or side-car output.
//! - [`teacher`]: teacher answers to LLaVA / ShareGPT fine-tuning conversations.

pub mod generator;
pub mod input;
pub mod job;
pub mod output;
pub mod prompt;
pub mod teacher;

pub use generator::{GenInput, GenOutput, Generator, Qwen2VlGenerator};
pub use job::{run_job, select_inputs, split_from_env, JobOptions, JobSummary};
pub use output::{OutputFormat, RecapRecord, ShardPaths};
pub use prompt::{Exemplar, ExemplarSet};
