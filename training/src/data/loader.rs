//! [`DataLoader`]: the threaded pipeline from shards to [`Batch`]es, and its resumable position
//! [`LoaderState`].
//!
//! Stages (each a thread; every hand-over is a bounded crossbeam channel, so memory stays bounded
//! and a slow consumer makes every stage wait instead of queueing without limit):
//! 1. shard readers, one per open shard ([`super::stream`]);
//! 2. the sampler: round-robin interleave + shuffle buffer; it cuts the draws into chunks of
//!    `chunk_size` samples and records the stream position before each chunk;
//! 3. the decoder: per chunk, text policy + tokenizer + image decode and augmentation for every
//!    sample in parallel on a rayon pool (`threads` threads), results kept in draw order;
//! 4. the batcher: drops bad samples (counted by reason, the first `max_logged_skips` logged to
//!    stderr), fills batches of exactly `batch_size` good samples in draw order, builds the tensors
//!    and the tag CSR, and queues up to `prefetch_batches` ready batches.
//!
//! A batch's position is (the stream position before the chunk holding its last sample, the number
//! of draws of that chunk it used). Restoring re-opens the stream there and discards those draws,
//! so the batches after a restore equal those of an uninterrupted run; skip counts are carried
//! over exactly too.

use super::mixture::{source_seed, MixState, MixStream, SourcePlan};
use super::stream::{
    worker_shards, Annotated, AnnotationLog, Drawn, EpochStream, JoinCtx, StreamConfig, StreamState,
};
use super::tags::tag_csr;
use super::text_policy::{TextPolicy, TextSource};
use super::transform::{ImageTransform, TransformKind, DEFAULT_CROP_RATIO, DEFAULT_CROP_SCALE};
use super::{derive_rng, RngPurpose, SkipCounts, SkipReason};
use crate::error::TrainError;
use crate::model::ClipConfig;
use crossbeam_channel::{bounded, Receiver, Sender};
use hq_data::shards::{
    expand_shards, AnnotationCounts, AnnotationSpec, Annotations, ImageCheck, ReadOptions,
    DEFAULT_MAX_PIXELS,
};
use hq_data::text::tags::TagVocab;
use hq_data::text::tokenizer::ClipTokenizer;
use hq_data::text::TextTokenizer;
use hq_data::SampleError;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use tch::{Device, Kind, Tensor};

/// Version of the [`LoaderState`] layout.
pub const LOADER_STATE_VERSION: u32 = 1;

/// Settings of a [`DataLoader`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoaderConfig {
    /// Shard specifications (brace ranges, globs, list files; see [`hq_data::shards::spec`]).
    pub shards: Vec<String>,
    /// This worker's rank and the number of workers: the worker reads shards
    /// `rank, rank + world_size, ...`.
    pub rank: usize,
    pub world_size: usize,
    /// Good samples per batch (N).
    pub batch_size: usize,
    /// Output image size.
    pub image_height: u32,
    pub image_width: u32,
    /// Train (random resized crop) or eval (resize + centre crop) transform.
    pub transform: TransformKind,
    /// Token row length (the text tower's context length, 77 for CLIP).
    pub context_length: usize,
    pub text_policy: TextPolicy,
    /// Seed of every random choice (see [`super::derive_rng`]).
    pub seed: u64,
    /// Shuffle-buffer size in samples (0 or 1: no sample shuffling).
    pub shuffle_buffer: usize,
    /// Permute the shard order every epoch.
    pub shuffle_shards: bool,
    /// Shards read at once by this worker (one thread each), interleaved round-robin.
    pub readers: usize,
    /// Samples each reader may read ahead.
    pub reader_capacity: usize,
    /// Decode/augment threads of the rayon pool (0: one per core).
    pub threads: usize,
    /// Ready batches kept in the queue.
    pub prefetch_batches: usize,
    /// Samples per decode job (0: the batch size, at most 256).
    pub chunk_size: usize,
    /// Stop after this many epochs (`None`: run forever).
    pub epochs: Option<u64>,
    /// Drop the last, incomplete batch of each epoch (training); else yield it short.
    pub drop_last: bool,
    /// Pixel limit of a decoded image.
    pub max_pixels: u64,
    /// Skipped samples logged to stderr one by one (then only counted).
    pub max_logged_skips: usize,
    /// Side-car annotations joined onto the samples while reading (`None`: the shards' own texts).
    #[serde(default)]
    pub annotations: Option<AnnotationSpec>,
    /// A weighted mixture instead of `shards` (see [`super::mixture`]): when not empty, `shards`
    /// and `annotations` are unused, there are no epochs (`epochs` is ignored) and the stream
    /// never ends.
    #[serde(default)]
    pub sources: Vec<SourceConfig>,
    /// What a source's weight means (see [`SourceWeighting`]).
    #[serde(default)]
    pub source_weighting: SourceWeighting,
    /// The pixel normalisation (`None`: CLIP's); a pretrained checkpoint's `preprocess_cfg`
    /// sets it.
    #[serde(default)]
    pub normalize: Option<Normalization>,
}

/// Per-channel `(mean, std)` of the pixel normalisation.
pub type Normalization = ([f64; 3], [f64; 3]);

fn one() -> f64 {
    1.0
}

/// What the weights of a mixture mean.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SourceWeighting {
    /// Source i gives `w_i / sum(w)` of the samples, whatever its size.
    #[default]
    Share,
    /// open_clip's `--train-data-upsampling-factors`: every shard of source i has weight `w_i`,
    /// so source i gives `w_i * shards_i / sum(w_j * shards_j)` of the samples (equal weights mix
    /// the sources in proportion to their shard counts).
    PerShard,
}

/// One source of a mixture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Shard specifications of this source.
    pub shards: Vec<String>,
    /// Relative sampling weight (> 0, default 1): the source gives `weight / sum of weights` of
    /// the samples (see [`SourceWeighting`] for the other meaning).
    #[serde(default = "one")]
    pub weight: f64,
    /// Side-car annotations of this source's shards.
    #[serde(default)]
    pub annotations: Option<AnnotationSpec>,
}

impl LoaderConfig {
    /// Training defaults: open_clip's train transform, HQ-CLIP's text policy, a 5000-sample
    /// shuffle buffer (open_clip's `_SAMPLE_SHUFFLE_SIZE`), 2 readers, 77 tokens.
    pub fn new(shards: Vec<String>, batch_size: usize, image_size: u32) -> Self {
        LoaderConfig {
            shards,
            rank: 0,
            world_size: 1,
            batch_size,
            image_height: image_size,
            image_width: image_size,
            transform: TransformKind::Train {
                scale: DEFAULT_CROP_SCALE,
                ratio: DEFAULT_CROP_RATIO,
            },
            context_length: hq_data::text::tokenizer::DEFAULT_CONTEXT_LENGTH,
            text_policy: TextPolicy::default(),
            seed: 0,
            shuffle_buffer: 5000,
            shuffle_shards: true,
            readers: 2,
            reader_capacity: 256,
            threads: 0,
            prefetch_batches: 2,
            chunk_size: 0,
            epochs: None,
            drop_last: true,
            max_pixels: DEFAULT_MAX_PIXELS,
            max_logged_skips: 20,
            annotations: None,
            sources: Vec::new(),
            source_weighting: SourceWeighting::Share,
            normalize: None,
        }
    }

    /// [`LoaderConfig::new`] with the image size and context length of `model`.
    pub fn for_model(model: &ClipConfig, shards: Vec<String>, batch_size: usize) -> Self {
        let mut c = Self::new(shards, batch_size, 224);
        c.image_height = model.vision_cfg.image_size.height().max(1) as u32;
        c.image_width = model.vision_cfg.image_size.width().max(1) as u32;
        c.context_length = model.text_cfg.context_length.max(1) as usize;
        c
    }

    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |m: String| Err(TrainError::DataLoader(m));
        if self.batch_size == 0 {
            return bad("batch size must be at least 1".into());
        }
        if self.world_size == 0 || self.rank >= self.world_size {
            return bad(format!(
                "rank {} is not below the world size {}",
                self.rank, self.world_size
            ));
        }
        if self.readers == 0 {
            return bad("at least one shard reader is needed".into());
        }
        if self.context_length < 2 {
            return bad(format!(
                "context length {} leaves no room for the start and end tokens",
                self.context_length
            ));
        }
        for (i, src) in self.sources.iter().enumerate() {
            if !(src.weight.is_finite() && src.weight > 0.0) {
                return bad(format!(
                    "mixture source {i} has weight {}; weights must be > 0",
                    src.weight
                ));
            }
            if src.shards.is_empty() {
                return bad(format!("mixture source {i} names no shards"));
            }
        }
        self.text_policy
            .validate()
            .map_err(TrainError::DataLoader)?;
        ImageTransform::new(self.transform, self.image_height, self.image_width)
            .map_err(TrainError::DataLoader)?;
        Ok(())
    }

    fn chunk(&self) -> usize {
        if self.chunk_size > 0 {
            self.chunk_size
        } else {
            self.batch_size.clamp(1, 256)
        }
    }
}

/// One training batch.
#[derive(Debug)]
pub struct Batch {
    /// `[N, 3, H, W]` float32, normalised with CLIP's mean and std.
    pub images: Tensor,
    /// `[N, context_length]` int64 token ids of each sample's positive text.
    pub texts: Tensor,
    /// `[N * N-, context_length]` int64: sample i's hard negatives are rows `i * N- .. (i+1) * N-`.
    /// Samples without negatives hold the empty text (`<start_of_text> <end_of_text>`) there.
    pub negatives: Tensor,
    /// `[N]` bool: whether sample i has hard negatives (the HNI loss skips the others).
    pub has_negative: Tensor,
    /// N-: negatives per sample.
    pub negatives_per_sample: usize,
    /// Tag targets as CSR: sample i's class ids are `tag_indices[tag_offsets[i]..tag_offsets[i+1]]`
    /// (sorted, distinct; empty without a vocabulary or refined texts).
    pub tag_offsets: Vec<i64>,
    pub tag_indices: Vec<i64>,
    /// Sample keys, in batch order.
    pub keys: Vec<String>,
    /// Whether each sample's positive text is a refined segment (else the raw alt-text).
    pub refined_text: Vec<bool>,
    /// Samples skipped since the previous batch, by reason.
    pub skipped: SkipCounts,
    /// Epoch and index of the batch within it.
    pub epoch: u64,
    pub index: u64,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Samples `range` as a batch of their own (views of the same tensors; no skip counts): a
    /// micro-batch, or one rank's share of a global batch.
    pub fn rows(&self, range: std::ops::Range<usize>) -> Batch {
        let (a, len) = (range.start as i64, range.len() as i64);
        let k = self.negatives_per_sample as i64;
        let first_tag = self.tag_offsets[range.start];
        Batch {
            images: self.images.narrow(0, a, len),
            texts: self.texts.narrow(0, a, len),
            negatives: self.negatives.narrow(0, k * a, k * len),
            has_negative: self.has_negative.narrow(0, a, len),
            negatives_per_sample: self.negatives_per_sample,
            tag_offsets: self.tag_offsets[range.start..=range.end]
                .iter()
                .map(|o| o - first_tag)
                .collect(),
            tag_indices: self.tag_indices[first_tag as usize..self.tag_offsets[range.end] as usize]
                .to_vec(),
            keys: self.keys[range.clone()].to_vec(),
            refined_text: self.refined_text[range].to_vec(),
            skipped: SkipCounts::default(),
            epoch: self.epoch,
            index: self.index,
        }
    }

    /// Dense multi-hot tag targets `[N, num_classes]` float32 from the CSR (ids at or above
    /// `num_classes` are ignored).
    pub fn tag_targets(&self, num_classes: usize) -> Tensor {
        let n = self.len();
        let mut dense = vec![0f32; n * num_classes];
        for i in 0..n {
            let (a, b) = (
                self.tag_offsets[i] as usize,
                self.tag_offsets[i + 1] as usize,
            );
            for &c in &self.tag_indices[a..b] {
                if (c as usize) < num_classes {
                    dense[i * num_classes + c as usize] = 1.0;
                }
            }
        }
        Tensor::from_slice(&dense).view([n as i64, num_classes as i64])
    }
}

/// The loader's position after the last batch it returned; save it with a checkpoint and pass it
/// to [`DataLoader::new`] to continue with exactly the batches that would have come next.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderState {
    pub version: u32,
    // Settings the position depends on (checked on restore).
    pub seed: u64,
    pub rank: usize,
    pub world_size: usize,
    /// This worker's shard count and a digest of their file names.
    pub worker_shards: usize,
    pub shards_digest: String,
    pub readers: usize,
    pub shuffle_buffer: usize,
    pub shuffle_shards: bool,
    pub batch_size: usize,
    /// Stream position before the chunk holding the last batch's last sample...
    pub stream: StreamState,
    /// ...and the draws of that chunk already used.
    pub skip_draws: u64,
    /// Batches returned in the current epoch, and in all.
    pub batches_in_epoch: u64,
    pub batches_total: u64,
    /// Samples returned in all.
    pub samples_total: u64,
    /// Samples skipped in all, by reason.
    pub skipped_total: SkipCounts,
    /// Drawn samples with and without a side-car annotation, in all (`joined`, `missing`).
    #[serde(default)]
    pub annotations_total: AnnotationCounts,
    /// A mixture's position (then `stream` is unused) before the chunk holding the last batch's
    /// last sample.
    #[serde(default)]
    pub mixture: Option<MixState>,
    /// Samples returned from each mixture source, in all (empty without a mixture).
    #[serde(default)]
    pub source_samples: Vec<u64>,
}

impl LoaderState {
    /// The epoch the next batch comes from (or the one just finished, at its end).
    pub fn epoch(&self) -> u64 {
        self.stream.epoch
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_json(json: &str) -> Result<Self, TrainError> {
        let s: LoaderState = serde_json::from_str(json)
            .map_err(|e| TrainError::LoaderState(format!("invalid JSON: {e}")))?;
        if s.version != LOADER_STATE_VERSION {
            return Err(TrainError::LoaderState(format!(
                "version {} is not the supported {LOADER_STATE_VERSION}",
                s.version
            )));
        }
        Ok(s)
    }

    /// Write as JSON, atomically.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), TrainError> {
        hq_data::atomic::write_atomic(path, self.to_json().as_bytes())?;
        Ok(())
    }

    pub fn load(path: impl AsRef<Path>) -> Result<Self, TrainError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| TrainError::LoaderState(format!("{}: {e}", path.display())))?;
        Self::from_json(&text)
    }

    fn fresh(cfg: &LoaderConfig, worker: &[PathBuf], readers: usize) -> Self {
        LoaderState {
            version: LOADER_STATE_VERSION,
            seed: cfg.seed,
            rank: cfg.rank,
            world_size: cfg.world_size,
            worker_shards: worker.len(),
            shards_digest: shards_digest(worker),
            readers,
            shuffle_buffer: cfg.shuffle_buffer,
            shuffle_shards: cfg.shuffle_shards,
            batch_size: cfg.batch_size,
            stream: StreamState::start(0, readers),
            skip_draws: 0,
            batches_in_epoch: 0,
            batches_total: 0,
            samples_total: 0,
            skipped_total: SkipCounts::default(),
            annotations_total: AnnotationCounts::default(),
            mixture: None,
            source_samples: Vec::new(),
        }
    }

    /// Why this state cannot continue a loader with `fresh`'s settings, if it cannot.
    fn mismatch(&self, fresh: &LoaderState) -> Option<String> {
        let pairs: [(&str, String, String); 9] = [
            ("seed", self.seed.to_string(), fresh.seed.to_string()),
            ("rank", self.rank.to_string(), fresh.rank.to_string()),
            (
                "world size",
                self.world_size.to_string(),
                fresh.world_size.to_string(),
            ),
            (
                "worker shard count",
                self.worker_shards.to_string(),
                fresh.worker_shards.to_string(),
            ),
            (
                "shard names digest",
                self.shards_digest.clone(),
                fresh.shards_digest.clone(),
            ),
            (
                "readers",
                self.readers.to_string(),
                fresh.readers.to_string(),
            ),
            (
                "shuffle buffer",
                self.shuffle_buffer.to_string(),
                fresh.shuffle_buffer.to_string(),
            ),
            (
                "shard shuffling",
                self.shuffle_shards.to_string(),
                fresh.shuffle_shards.to_string(),
            ),
            (
                "batch size",
                self.batch_size.to_string(),
                fresh.batch_size.to_string(),
            ),
        ];
        pairs
            .iter()
            .find(|(_, a, b)| a != b)
            .map(|(what, a, b)| format!("saved {what} {a} differs from this loader's {b}"))
    }
}

/// FNV-1a over the shards' file names (not folders, so a moved dataset still resumes).
fn shards_digest(shards: &[PathBuf]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in shards {
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
        for b in name.unwrap_or_default().bytes().chain([0u8]) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

/// The digest of a mixture: each source's weight and shard names.
fn mixture_digest(plans: &[SourcePlan]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in plans {
        let names = format!("{}:{}", p.weight, shards_digest(&p.worker));
        for b in names.bytes().chain([0u8]) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

/// What the sampler thread reads: one stream or a mixture.
enum Plan {
    Single {
        cfg: StreamConfig,
        worker: Vec<PathBuf>,
    },
    Mix(Vec<SourcePlan>),
}

impl Plan {
    /// This rank's shards (every source's, in source order).
    fn worker_shards(&self) -> Vec<PathBuf> {
        match self {
            Plan::Single { worker, .. } => worker.clone(),
            Plan::Mix(plans) => plans.iter().flat_map(|p| p.worker.clone()).collect(),
        }
    }
}

// ---- pipeline messages ----

/// A stream position before a chunk of draws: one stream's, or a mixture's.
#[derive(Debug, Clone)]
struct StartPos {
    stream: StreamState,
    mix: Option<MixState>,
}

enum JobMsg {
    Draws {
        epoch: u64,
        start: Arc<StartPos>,
        /// Each draw with its mixture source (0 without a mixture).
        items: Vec<(usize, Drawn)>,
    },
    EpochEnd {
        errors: Vec<SampleError>,
    },
    Finished,
    Fatal(String),
}

struct Ready {
    source: usize,
    key: String,
    pixels: Vec<f32>,
    tokens: Vec<i64>,
    negatives: Vec<i64>,
    refined: bool,
    tags: Vec<u32>,
}

struct Skip {
    reason: SkipReason,
    what: String,
}

struct ProcItem {
    errors: Vec<SampleError>,
    annotated: Annotated,
    result: Result<Ready, Skip>,
}

enum ProcMsg {
    Items {
        epoch: u64,
        start: Arc<StartPos>,
        items: Vec<ProcItem>,
    },
    EpochEnd {
        errors: Vec<SampleError>,
    },
    Finished,
    Fatal(String),
}

enum OutMsg {
    Batch(Box<Batch>, Box<LoaderState>),
    End,
    Fatal(String),
}

/// What the decode stage needs.
struct DecodeCtx {
    seed: u64,
    transform: ImageTransform,
    policy: TextPolicy,
    tokenizer: Arc<TextTokenizer>,
    vocab: Option<Arc<TagVocab>>,
    max_pixels: u64,
}

impl DecodeCtx {
    fn process(&self, epoch: u64, source: usize, d: Drawn) -> ProcItem {
        let Drawn {
            draw,
            sample,
            errors,
            shard,
            annotated,
        } = d;
        let what = |m: String| format!("{}: {}: {m}", shard.display(), sample.key);
        let result = (|| {
            let mut trng = derive_rng(self.seed, epoch, draw, RngPurpose::Text);
            let chosen = self.policy.choose(&sample, &mut trng).map_err(|m| Skip {
                reason: SkipReason::Text,
                what: what(m),
            })?;
            let tok_err = |e: hq_data::DataError| Skip {
                reason: SkipReason::Text,
                what: what(e.to_string()),
            };
            let tokens = self.tokenizer.tokenize(&chosen.text).map_err(tok_err)?;
            let mut negatives = Vec::with_capacity(chosen.negatives.len() * tokens.len());
            for (t, _) in &chosen.negatives {
                negatives.extend(self.tokenizer.tokenize(t).map_err(tok_err)?);
            }
            let image = sample.image.as_ref().ok_or_else(|| Skip {
                reason: SkipReason::Image,
                what: what("no image member".into()),
            })?;
            let mut irng = derive_rng(self.seed, epoch, draw, RngPurpose::Image);
            let pixels = self
                .transform
                .decode_apply(&image.bytes, self.max_pixels, &mut irng)
                .map_err(|m| Skip {
                    reason: SkipReason::Image,
                    what: what(m),
                })?;
            let tags = match (&self.vocab, &sample.refined) {
                (Some(v), Some(r)) => v.indices(&r.tags_positive),
                _ => Vec::new(),
            };
            Ok(Ready {
                source,
                key: sample.key.clone(),
                pixels,
                tokens,
                negatives,
                refined: chosen.source == TextSource::Refined,
                tags,
            })
        })();
        ProcItem {
            errors,
            annotated,
            result,
        }
    }
}

/// The training data loader (see the module docs). Iterate it for batches; [`DataLoader::state`]
/// is the position after the last batch returned.
pub struct DataLoader {
    rx: Option<Receiver<OutMsg>>,
    threads: Vec<JoinHandle<()>>,
    state: LoaderState,
    finished: bool,
    worker_shards: Vec<PathBuf>,
    annotation_log: Option<Arc<AnnotationLog>>,
}

impl DataLoader {
    /// Start a loader with open_clip's tokenizer (the bundled vocabulary). `vocab` gives the tag
    /// targets (none: empty CSR rows). `resume` continues from a saved position.
    pub fn new(
        config: LoaderConfig,
        vocab: Option<Arc<TagVocab>>,
        resume: Option<LoaderState>,
    ) -> Result<Self, TrainError> {
        let tokenizer =
            ClipTokenizer::from_bundled()?.with_context_length(config.context_length)?;
        Self::with_tokenizer(config, Arc::new(tokenizer.into()), vocab, resume)
    }

    /// [`DataLoader::new`] with a given tokenizer (its context length must be the config's).
    pub fn with_tokenizer(
        config: LoaderConfig,
        tokenizer: Arc<TextTokenizer>,
        vocab: Option<Arc<TagVocab>>,
        resume: Option<LoaderState>,
    ) -> Result<Self, TrainError> {
        config.validate()?;
        if tokenizer.context_length() != config.context_length {
            return Err(TrainError::DataLoader(format!(
                "tokenizer context length {} differs from the loader's {}",
                tokenizer.context_length(),
                config.context_length
            )));
        }
        let log = Arc::new(AnnotationLog::new(config.max_logged_skips));
        let mut any_annotations = false;
        // One source's shards for this rank, and its side-car join.
        let mut source = |specs: &[String],
                          ann: &Option<AnnotationSpec>,
                          what: &str,
                          resampled: bool|
         -> Result<(Vec<PathBuf>, Option<JoinCtx>, usize), TrainError> {
            let all = expand_shards(specs)?;
            let mut worker = worker_shards(&all, config.rank, config.world_size);
            if worker.is_empty() && resampled && !all.is_empty() {
                // A mixture samples with replacement anyway: a source with fewer shards than
                // ranks is read whole by every rank (each in its own order) rather than refused.
                worker = all.clone();
            }
            if worker.is_empty() {
                return Err(TrainError::DataLoader(format!(
                    "worker {} of {} gets no shard of {what} ({} shard(s) in all)",
                    config.rank,
                    config.world_size,
                    all.len()
                )));
            }
            let join = match ann {
                Some(spec) => {
                    let annotations = Annotations::open(spec)?;
                    // A wrong folder, id field or mapping stops here, not after hours of raw
                    // texts.
                    annotations.check(&worker)?;
                    any_annotations = true;
                    Some(JoinCtx {
                        annotations: Arc::new(annotations),
                        log: Arc::clone(&log),
                    })
                }
                None => None,
            };
            Ok((worker, join, all.len()))
        };
        let stream_cfg = |seed: u64, readers: usize, join: Option<JoinCtx>| StreamConfig {
            seed,
            shuffle_shards: config.shuffle_shards,
            buffer_size: config.shuffle_buffer,
            readers,
            reader_capacity: config.reader_capacity,
            read_opts: ReadOptions {
                image_check: ImageCheck::None,
                ..ReadOptions::default()
            },
            join,
        };
        let (plan, fresh) = if config.sources.is_empty() {
            let (worker, join, _) = source(&config.shards, &config.annotations, "the data", false)?;
            let readers = config.readers.min(worker.len()).max(1);
            let fresh = LoaderState::fresh(&config, &worker, readers);
            let cfg = stream_cfg(config.seed, readers, join);
            (Plan::Single { cfg, worker }, fresh)
        } else {
            let mut plans = Vec::with_capacity(config.sources.len());
            for (i, src) in config.sources.iter().enumerate() {
                let (worker, join, shards) = source(
                    &src.shards,
                    &src.annotations,
                    &format!("mixture source {i}"),
                    true,
                )?;
                let readers = config.readers.min(worker.len()).max(1);
                plans.push(SourcePlan {
                    cfg: stream_cfg(source_seed(config.seed, i), readers, join),
                    worker,
                    weight: match config.source_weighting {
                        SourceWeighting::Share => src.weight,
                        SourceWeighting::PerShard => src.weight * shards as f64,
                    },
                });
            }
            let all: Vec<PathBuf> = plans.iter().flat_map(|p| p.worker.clone()).collect();
            let readers = plans.iter().map(SourcePlan::readers).sum();
            let mut fresh = LoaderState::fresh(&config, &all, readers);
            fresh.shards_digest = mixture_digest(&plans);
            fresh.mixture = Some(MixState {
                drawn: 0,
                sources: plans
                    .iter()
                    .map(|p| StreamState::start(0, p.readers()))
                    .collect(),
            });
            fresh.source_samples = vec![0; plans.len()];
            (Plan::Mix(plans), fresh)
        };
        let annotation_log = any_annotations.then_some(log);
        let start = match resume {
            Some(s) => {
                if let Some(why) = s.mismatch(&fresh) {
                    return Err(TrainError::LoaderState(why));
                }
                if s.mixture.is_some() != fresh.mixture.is_some() {
                    return Err(TrainError::LoaderState(
                        "the saved position is from a mixture loader and this one is not, or the \
                         other way round"
                            .into(),
                    ));
                }
                s
            }
            None => fresh,
        };
        if let (Some(e), Plan::Single { .. }) = (config.epochs, &plan) {
            if start.stream.epoch > e {
                return Err(TrainError::LoaderState(format!(
                    "the saved position is in epoch {}, past the {e} epoch(s) configured",
                    start.stream.epoch
                )));
            }
        }
        let mut transform =
            ImageTransform::new(config.transform, config.image_height, config.image_width)
                .map_err(TrainError::DataLoader)?;
        if let Some((mean, std)) = config.normalize {
            transform = transform.with_normalization(mean, std);
        }
        let pool = {
            let mut b =
                rayon::ThreadPoolBuilder::new().thread_name(|i| format!("hq-data-decode-{i}"));
            if config.threads > 0 {
                b = b.num_threads(config.threads);
            }
            b.build()
                .map_err(|e| TrainError::DataLoader(format!("cannot start the decode pool: {e}")))?
        };
        let empty_tokens = tokenizer.tokenize("")?;
        let ctx = Arc::new(DecodeCtx {
            seed: config.seed,
            transform,
            policy: config.text_policy,
            tokenizer,
            vocab,
            max_pixels: config.max_pixels,
        });
        let (job_tx, job_rx) = bounded::<JobMsg>(2);
        let (proc_tx, proc_rx) = bounded::<ProcMsg>(2);
        let (out_tx, out_rx) = bounded::<OutMsg>(config.prefetch_batches.max(1));
        let mut threads = Vec::new();
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.to_string())
                .spawn(f)
                .map_err(|e| TrainError::DataLoader(format!("cannot start thread {name}: {e}")))
        };
        let worker_list = plan.worker_shards();
        {
            let start = start.clone();
            let chunk = config.chunk();
            let epochs = config.epochs;
            let seed = config.seed;
            let run: Box<dyn FnOnce() + Send> = match plan {
                Plan::Single { cfg, worker } => {
                    Box::new(move || sampler_main(cfg, worker, start, chunk, epochs, job_tx))
                }
                Plan::Mix(plans) => {
                    Box::new(move || mix_sampler_main(seed, plans, start, chunk, job_tx))
                }
            };
            threads.push(spawn("hq-data-sampler", run)?);
        }
        {
            let ctx = Arc::clone(&ctx);
            threads.push(spawn(
                "hq-data-decoder",
                Box::new(move || decoder_main(ctx, pool, job_rx, proc_tx)),
            )?);
        }
        {
            let batcher = Batcher {
                cfg: config.clone(),
                empty_tokens,
                state: start.clone(),
                pending: Vec::new(),
                since: SkipCounts::default(),
                ann_since: AnnotationCounts::default(),
                logged: 0,
                last_pos: None,
            };
            threads.push(spawn(
                "hq-data-batcher",
                Box::new(move || batcher.run(proc_rx, out_tx)),
            )?);
        }
        Ok(DataLoader {
            rx: Some(out_rx),
            threads,
            state: start,
            finished: false,
            worker_shards: worker_list,
            annotation_log,
        })
    }

    /// Annotation counts: joined and missing over every batch so far (resumed with the state),
    /// orphans, bad records and missing files as this process found them. `None` without
    /// annotations.
    pub fn annotation_counts(&self) -> Option<AnnotationCounts> {
        let log = self.annotation_log.as_ref()?;
        let mut c = log.counts();
        c.joined = self.state.annotations_total.joined;
        c.missing = self.state.annotations_total.missing;
        Some(c)
    }

    /// The position after the last batch returned (the start position before the first).
    pub fn state(&self) -> &LoaderState {
        &self.state
    }

    /// Samples returned from each mixture source so far (resumed with the state; empty without
    /// a mixture).
    pub fn source_samples(&self) -> &[u64] {
        &self.state.source_samples
    }

    /// The shards this worker reads (every mixture source's, in source order).
    pub fn worker_shards(&self) -> &[PathBuf] {
        &self.worker_shards
    }

    fn shutdown(&mut self) {
        self.rx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Iterator for DataLoader {
    type Item = Result<Batch, TrainError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.finished {
            return None;
        }
        let msg = self.rx.as_ref()?.recv();
        match msg {
            Ok(OutMsg::Batch(b, s)) => {
                self.state = *s;
                Some(Ok(*b))
            }
            Ok(OutMsg::End) => {
                self.finished = true;
                self.shutdown();
                None
            }
            Ok(OutMsg::Fatal(m)) => {
                self.finished = true;
                self.shutdown();
                Some(Err(TrainError::DataLoader(m)))
            }
            Err(_) => {
                self.finished = true;
                self.shutdown();
                Some(Err(TrainError::DataLoader(
                    "the data pipeline stopped unexpectedly (a pipeline thread panicked)".into(),
                )))
            }
        }
    }
}

impl Drop for DataLoader {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn sampler_main(
    cfg: StreamConfig,
    worker: Vec<PathBuf>,
    start: LoaderState,
    chunk: usize,
    epochs: Option<u64>,
    tx: Sender<JobMsg>,
) {
    let mut state = start.stream;
    let mut skip = start.skip_draws;
    let readers = state.readers.len();
    loop {
        if epochs.is_some_and(|e| state.epoch >= e) {
            let _ = tx.send(JobMsg::Finished);
            return;
        }
        let mut stream = match EpochStream::open(&cfg, &worker, &state) {
            Ok(s) => s,
            Err(e) => {
                let _ = tx.send(JobMsg::Fatal(e.to_string()));
                return;
            }
        };
        // Draws the restored position has already used.
        for _ in 0..skip {
            match stream.draw() {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    let _ = tx.send(JobMsg::Fatal(e.to_string()));
                    return;
                }
            }
        }
        skip = 0;
        loop {
            let start = Arc::new(StartPos {
                stream: stream.snapshot(),
                mix: None,
            });
            let mut items = Vec::with_capacity(chunk);
            let mut ended = false;
            while items.len() < chunk {
                match stream.draw() {
                    Ok(Some(d)) => items.push((0, d)),
                    Ok(None) => {
                        ended = true;
                        break;
                    }
                    Err(e) => {
                        let _ = tx.send(JobMsg::Fatal(e.to_string()));
                        return;
                    }
                }
            }
            if !items.is_empty() {
                let msg = JobMsg::Draws {
                    epoch: stream.epoch(),
                    start,
                    items,
                };
                if tx.send(msg).is_err() {
                    return;
                }
            }
            if ended {
                let errors = stream.take_pending_errors();
                if tx.send(JobMsg::EpochEnd { errors }).is_err() {
                    return;
                }
                break;
            }
        }
        let next = stream.epoch() + 1;
        drop(stream);
        state = StreamState::start(next, readers);
    }
}

/// The sampler of a mixture: endless chunks of mixture draws (see [`super::mixture`]).
fn mix_sampler_main(
    seed: u64,
    plans: Vec<SourcePlan>,
    start: LoaderState,
    chunk: usize,
    tx: Sender<JobMsg>,
) {
    let fatal = |e: TrainError| {
        let _ = tx.send(JobMsg::Fatal(e.to_string()));
    };
    let Some(state) = start.mixture.as_ref() else {
        return fatal(TrainError::LoaderState(
            "a mixture loader needs a mixture position".into(),
        ));
    };
    let mut mix = match MixStream::open(seed, &plans, state) {
        Ok(m) => m,
        Err(e) => return fatal(e),
    };
    // Draws the restored position has already used.
    for _ in 0..start.skip_draws {
        if let Err(e) = mix.draw() {
            return fatal(e);
        }
    }
    loop {
        let start = Arc::new(StartPos {
            stream: start.stream.clone(),
            mix: Some(mix.snapshot()),
        });
        let mut items = Vec::with_capacity(chunk);
        while items.len() < chunk {
            match mix.draw() {
                Ok(d) => items.push(d),
                Err(e) => return fatal(e),
            }
        }
        let msg = JobMsg::Draws {
            epoch: 0,
            start,
            items,
        };
        if tx.send(msg).is_err() {
            return;
        }
    }
}

fn decoder_main(
    ctx: Arc<DecodeCtx>,
    pool: rayon::ThreadPool,
    rx: Receiver<JobMsg>,
    tx: Sender<ProcMsg>,
) {
    for msg in rx {
        let out = match msg {
            JobMsg::Draws {
                epoch,
                start,
                items,
            } => {
                let items: Vec<ProcItem> = pool.install(|| {
                    items
                        .into_par_iter()
                        .map(|(src, d)| ctx.process(epoch, src, d))
                        .collect()
                });
                ProcMsg::Items {
                    epoch,
                    start,
                    items,
                }
            }
            JobMsg::EpochEnd { errors } => ProcMsg::EpochEnd { errors },
            JobMsg::Finished => ProcMsg::Finished,
            JobMsg::Fatal(m) => ProcMsg::Fatal(m),
        };
        let last = matches!(out, ProcMsg::Finished | ProcMsg::Fatal(_));
        if tx.send(out).is_err() || last {
            return;
        }
    }
    let _ = tx.send(ProcMsg::Fatal(
        "the sampler thread stopped unexpectedly (it panicked)".into(),
    ));
}

/// The batch stage's state.
struct Batcher {
    cfg: LoaderConfig,
    empty_tokens: Vec<i64>,
    /// Position after the last batch sent.
    state: LoaderState,
    pending: Vec<Ready>,
    since: SkipCounts,
    ann_since: AnnotationCounts,
    logged: usize,
    /// Position after the last sample added to `pending`: (chunk start, draws used).
    last_pos: Option<(Arc<StartPos>, u64)>,
}

impl Batcher {
    fn skip(&mut self, reason: SkipReason, what: &str) {
        self.since.add(reason);
        self.state.skipped_total.add(reason);
        if self.logged < self.cfg.max_logged_skips {
            self.logged += 1;
            eprintln!("hq-train data: skipped sample ({}): {what}", reason.name());
            if self.logged == self.cfg.max_logged_skips {
                eprintln!(
                    "hq-train data: {} skips logged; further ones are only counted (see \
                     Batch::skipped)",
                    self.logged
                );
            }
        }
    }

    fn run(mut self, rx: Receiver<ProcMsg>, tx: Sender<OutMsg>) {
        for msg in rx {
            match msg {
                ProcMsg::Items {
                    epoch,
                    start,
                    items,
                } => {
                    for (m, item) in items.into_iter().enumerate() {
                        for e in &item.errors {
                            self.skip(SkipReason::Record, &e.to_string());
                        }
                        match item.annotated {
                            Some(true) => self.ann_since.joined += 1,
                            Some(false) => self.ann_since.missing += 1,
                            None => {}
                        }
                        match item.result {
                            Ok(r) => self.pending.push(r),
                            Err(s) => self.skip(s.reason, &s.what),
                        }
                        self.last_pos = Some((Arc::clone(&start), m as u64 + 1));
                        if self.pending.len() == self.cfg.batch_size && !self.emit(epoch, &tx) {
                            return;
                        }
                    }
                }
                ProcMsg::EpochEnd { errors } => {
                    for e in &errors {
                        self.skip(SkipReason::Record, &e.to_string());
                    }
                    if !self.pending.is_empty() {
                        if self.cfg.drop_last {
                            self.pending.clear();
                        } else {
                            let epoch = self.state.stream.epoch;
                            let epoch = self
                                .last_pos
                                .as_ref()
                                .map_or(epoch, |(s, _)| s.stream.epoch);
                            if !self.emit(epoch, &tx) {
                                return;
                            }
                        }
                    }
                    self.state.batches_in_epoch = 0;
                }
                ProcMsg::Finished => {
                    let _ = tx.send(OutMsg::End);
                    return;
                }
                ProcMsg::Fatal(m) => {
                    let _ = tx.send(OutMsg::Fatal(m));
                    return;
                }
            }
        }
        let _ = tx.send(OutMsg::Fatal(
            "the decode thread stopped unexpectedly (it panicked)".into(),
        ));
    }

    /// Build and send a batch of everything pending; false when the consumer is gone.
    fn emit(&mut self, epoch: u64, tx: &Sender<OutMsg>) -> bool {
        let items = std::mem::take(&mut self.pending);
        if let Some((start, used)) = &self.last_pos {
            self.state.stream = start.stream.clone();
            self.state.mixture = start.mix.clone();
            self.state.skip_draws = *used;
        }
        if self.state.mixture.is_some() {
            for it in &items {
                if self.state.source_samples.len() <= it.source {
                    self.state.source_samples.resize(it.source + 1, 0);
                }
                self.state.source_samples[it.source] += 1;
            }
        }
        let index = self.state.batches_in_epoch;
        self.state.batches_in_epoch += 1;
        self.state.batches_total += 1;
        self.state.samples_total += items.len() as u64;
        let skipped = std::mem::take(&mut self.since);
        let annotations = std::mem::take(&mut self.ann_since);
        self.state.annotations_total.merge(&annotations);
        let msg = match self.build(items, skipped, epoch, index) {
            Ok(b) => OutMsg::Batch(Box::new(b), Box::new(self.state.clone())),
            Err(e) => OutMsg::Fatal(format!("cannot build a batch: {e}")),
        };
        let fatal = matches!(msg, OutMsg::Fatal(_));
        tx.send(msg).is_ok() && !fatal
    }

    fn build(
        &self,
        items: Vec<Ready>,
        skipped: SkipCounts,
        epoch: u64,
        index: u64,
    ) -> Result<Batch, TrainError> {
        let n = items.len();
        let (h, w) = (self.cfg.image_height as i64, self.cfg.image_width as i64);
        let ctx = self.cfg.context_length;
        let nneg = self.cfg.text_policy.negatives;
        let per_image = 3 * (h * w) as usize;
        let mut pixels = Vec::with_capacity(n * per_image);
        let mut texts = Vec::with_capacity(n * ctx);
        let mut negs = Vec::with_capacity(n * nneg * ctx);
        let mut has_neg = Vec::with_capacity(n);
        let mut keys = Vec::with_capacity(n);
        let mut refined = Vec::with_capacity(n);
        let mut tag_rows = Vec::with_capacity(n);
        for it in items {
            pixels.extend_from_slice(&it.pixels);
            texts.extend_from_slice(&it.tokens);
            let has = nneg > 0 && !it.negatives.is_empty();
            if has {
                negs.extend_from_slice(&it.negatives);
            } else {
                for _ in 0..nneg {
                    negs.extend_from_slice(&self.empty_tokens);
                }
            }
            has_neg.push(has);
            keys.push(it.key);
            refined.push(it.refined);
            tag_rows.push(it.tags);
        }
        let (tag_offsets, tag_indices) = tag_csr(&tag_rows);
        let opts = (Kind::Float, Device::Cpu);
        let images = if n == 0 {
            Tensor::zeros([0, 3, h, w], opts)
        } else {
            Tensor::f_from_slice(&pixels)?.f_view([n as i64, 3, h, w])?
        };
        let texts = Tensor::f_from_slice(&texts)?.f_view([n as i64, ctx as i64])?;
        let negatives = Tensor::f_from_slice(&negs)?.f_view([(n * nneg) as i64, ctx as i64])?;
        let has_negative = Tensor::f_from_slice(&has_neg)?;
        Ok(Batch {
            images,
            texts,
            negatives,
            has_negative,
            negatives_per_sample: nneg,
            tag_offsets,
            tag_indices,
            keys,
            refined_text: refined,
            skipped,
            epoch,
            index,
        })
    }
}
