//! The training data pipeline: webdataset shards in, [`Batch`]es of tensors out.
//!
//! ```text
//! reader threads (one per open shard, bounded channels)
//!   -> sampler thread: deterministic round-robin interleave + shuffle buffer      [stream]
//!   -> decode thread: per-sample text policy, tokenizer, image decode + augment
//!      on a rayon pool                                                 [text_policy, transform]
//!   -> batch thread: skip bad samples, assemble tensors, tag CSR      [loader, tags]
//!   -> bounded queue of ready batches -> DataLoader::next()
//! ```
//!
//! - [`transform`]: open_clip's train (RandomResizedCrop) and eval (resize + centre crop)
//!   transforms with PIL-exact bicubic resampling and CLIP normalisation.
//! - [`text_policy`]: mixed training texts (refined segment with probability r, else raw) and
//!   hard negatives.
//! - [`tags`]: the STC tag vocabulary (one streaming pass) and CSR targets.
//! - [`stream`]: worker shard split, per-epoch shard order, round-robin readers, shuffle buffer,
//!   resumable position.
//! - [`mixture`]: weighted mixtures of several sources, resampled and step-based.
//! - [`loader`]: [`DataLoader`], [`LoaderConfig`], [`LoaderState`] (save / restore as JSON).
//!
//! # Determinism
//! Everything random is drawn from ChaCha8 generators keyed by (seed, epoch, draw number,
//! purpose) ([`derive_rng`]): the shard order, each shuffle-buffer draw, each sample's crop and
//! each sample's text choices. Thread count, timing and prefetch depth change nothing, and a
//! loader restored from a saved [`LoaderState`] yields exactly the batches the uninterrupted run
//! would have yielded.

pub mod loader;
pub mod mixture;
pub mod stream;
pub mod tags;
pub mod text_policy;
/// Re-exported from `hq-data`, where evaluation and the ONNX runtime share it.
pub use hq_data::transform;

pub use loader::{Batch, DataLoader, LoaderConfig, LoaderState, SourceConfig, SourceWeighting};
pub use mixture::MixState;
pub use stream::AnnotationLog;
pub use tags::{
    build_tag_vocab, build_tag_vocab_with, count_tags, count_tags_with, tag_csr,
    DEFAULT_TAG_VOCAB_SIZE,
};
pub use text_policy::{ChosenTexts, NegativePairing, NegativeSource, TextPolicy, TextSource};
pub use transform::{ImageTransform, TransformKind, CLIP_MEAN, CLIP_STD};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// What a derived generator is for, so that one use never shifts another's numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RngPurpose {
    ShardOrder = 1,
    Shuffle = 2,
    Image = 3,
    Text = 4,
    Mixture = 5,
}

/// The generator for (seed, epoch, index, purpose).
pub fn derive_rng(seed: u64, epoch: u64, index: u64, purpose: RngPurpose) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[0..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&epoch.to_le_bytes());
    key[16..24].copy_from_slice(&index.to_le_bytes());
    key[24..28].copy_from_slice(&(purpose as u32).to_le_bytes());
    key[28..32].copy_from_slice(b"HQLD");
    ChaCha8Rng::from_seed(key)
}

/// Why a sample was skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SkipReason {
    /// A bad record from the shard reader: damaged or cut shard, unreadable shard, missing or
    /// invalid members (`.txt` not UTF-8, bad `.json`, no image member).
    Record,
    /// The image is missing or cannot be decoded (damaged data, unsupported format, over the pixel
    /// limit).
    Image,
    /// No usable text (empty alt-text and no refined segment) or the tokenizer failed.
    Text,
}

impl SkipReason {
    pub fn name(self) -> &'static str {
        match self {
            SkipReason::Record => "record",
            SkipReason::Image => "image",
            SkipReason::Text => "text",
        }
    }
}

/// Skipped samples by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkipCounts {
    pub record: u64,
    pub image: u64,
    pub text: u64,
}

impl SkipCounts {
    pub fn total(&self) -> u64 {
        self.record + self.image + self.text
    }

    pub fn add(&mut self, reason: SkipReason) {
        match reason {
            SkipReason::Record => self.record += 1,
            SkipReason::Image => self.image += 1,
            SkipReason::Text => self.text += 1,
        }
    }

    pub fn merge(&mut self, other: &SkipCounts) {
        self.record += other.record;
        self.image += other.image;
        self.text += other.text;
    }
}

impl std::fmt::Display for SkipCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} skipped ({} bad records, {} bad images, {} without text)",
            self.total(),
            self.record,
            self.image,
            self.text
        )
    }
}
