//! webdataset tar shards in img2dataset's layout: `key.jpg|png|webp` (image), `key.txt` (raw
//! alt-text), `key.json` (metadata, with HQ-CLIP's refined texts under
//! [`crate::sample::REFINED_JSON_KEY`]).
//!
//! - [`spec`]: shard lists from brace ranges (`shard-{00000..00099}.tar`), `{a,b}` lists, globs,
//!   list files and `::`-joined specifications, expanded as webdataset does.
//! - [`reader`]: a streaming, sequential [`ShardReader`] yielding `Result<Sample, SampleError>`,
//!   with per-shard and total [`ReadStats`]; every bad sample, and every cut or damaged shard, is a
//!   [`crate::SampleError`] record and reading goes on.
//! - [`parallel`]: [`read_parallel`], worker threads feeding a bounded channel, for throughput.
//! - [`writer`]: [`ShardWriter`], deterministic and atomic (`prefix-00000.tar`, ...).
//! - [`sidecar`]: refined texts shipped as JSONL keyed by sample id, and the join onto samples.
//! - [`annotations`]: side-car files matched to shards (per shard or one index), joined while
//!   reading, with a field mapping for foreign layouts.
//! - [`images`]: image probing and decoding with a pixel limit.

pub mod annotations;
pub mod images;
pub mod parallel;
pub mod reader;
pub mod sidecar;
pub mod spec;
mod tario;
pub mod writer;

pub use annotations::{AnnotationCounts, AnnotationSpec, Annotations, ShardAnnotations};
pub use images::{decode_image, probe_image, validate_image, ImageInfo, DEFAULT_MAX_PIXELS};
pub use parallel::{read_parallel, ParallelOptions, ParallelReader};
pub use reader::{
    open_shard, split_key, ImageCheck, ReadOptions, ReadStats, SampleResult, ShardReader,
    ShardStats, TarSamples,
};
pub use sidecar::{FieldMap, JoinOptions, JoinReport, Sidecar, SidecarJoin};
pub use spec::{brace_expand, expand_shard_spec, expand_shards, expand_shards_with, ExpandOptions};
pub use writer::{ShardWriter, ShardWriterOptions};
