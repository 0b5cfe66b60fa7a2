//! The generation engine: three ONNX Runtime sessions, batched prompts, the key/value cache kept
//! between steps, and greedy or sampled decoding.
//!
//! One call to [`Qwen2Vl::generate`] runs a batch of prompts of different lengths and image sizes:
//! 1. each image goes through the vision encoder in its own run (the encoder's attention is
//!    block-diagonal per image, so a joint run would compute and discard every cross-image score:
//!    quadratic in the batch's total patch count);
//! 2. each prompt is embedded and its image features replace its `<|image_pad|>` embeddings; M-RoPE
//!    positions come from [`rope_index`] per row;
//! 3. the prompt step (prefill) runs one row at a time without padding, in chunks of
//!    [`DEFAULT_PREFILL_CHUNK`] tokens (the attention scores of a chunk stay in cache, and the
//!    causal half above a chunk is never computed); the rows' caches are then laid out as one
//!    left-padded batch cache. A prompt whose leading chunks were seen before (the shared
//!    instruction and exemplar of recaption prompts) starts its prefill from their stored cache
//!    (`prefix_cache`; bit-for-bit the same result, see there). Each decode step feeds the previous step's `present.*` values back
//!    as `past_key_values.*` without copying them into Rust arrays, and embeds the new tokens from
//!    a cache of embedding rows (one `embed_tokens` run only for ids not seen before);
//! 4. a row that emits an end token or reaches `max_new_tokens` leaves the batch at once: its rows of
//!    the cache and mask are dropped (and leading columns that are padding for every remaining row
//!    are trimmed), so finished sequences cost nothing afterwards.
//!
//! Conventions (those of HF `generate`, so outputs match token for token): left padding, the padding
//! masked out of every attention row, decode positions `max prompt position + 1 + k` on all three
//! axes (HF's `rope_deltas`), greedy = first maximum.
//!
//! On a GPU the decoder's outputs are read back to host memory by ONNX Runtime each step; binding
//! the cache to device memory (IoBinding) is the next step for GPU throughput and is not done yet.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{Session as OrtSession, SessionInputValue};
use ort::value::{DynTensorValueType, DynValue, Tensor, TensorRef};
use tokenizers::Tokenizer;

use crate::env::{init, Runtime};
use crate::error::{Result, RuntimeError};
use crate::provider::ExecutionProvider;
use crate::qwen2vl::model_dir::{ModelDir, DECODER, EMBED_TOKENS, VISION_ENCODER};
use crate::qwen2vl::prefix_cache::PrefixCache;
use crate::qwen2vl::preprocess::ImageProcessor;
use crate::qwen2vl::prompt::{Message, Prompt};
use crate::qwen2vl::rope::rope_index;
use crate::qwen2vl::sampling::{Sampler, Sampling};
use crate::qwen2vl::PreparedImage;

/// Prompt tokens per prefill decoder run unless [`Qwen2Vl::set_prefill_chunk`] says otherwise.
pub const DEFAULT_PREFILL_CHUNK: usize = 128;

/// Prompt-prefix cache budget (MiB) unless [`EngineOptions::prefix_cache_mib`] says otherwise. A
/// 7B model's cache is ~56 KiB per token, so this holds a few thousand prefix tokens.
pub const DEFAULT_PREFIX_CACHE_MIB: usize = 256;

/// Shape limits for TensorRT's optimisation profiles (a shape outside them makes TensorRT rebuild
/// its engine, which takes minutes for a 7B model).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TrtProfile {
    /// Largest batch.
    pub max_batch: usize,
    /// Longest prompt (tokens, image tokens included).
    pub max_prompt_tokens: usize,
    /// Longest prompt + generated length (the cache's length).
    pub max_total_tokens: usize,
    /// Most vision patches in one vision-encoder run (all images of a batch).
    pub max_patches: usize,
    /// Most images in one vision-encoder run.
    pub max_images: usize,
}

impl Default for TrtProfile {
    fn default() -> Self {
        Self {
            max_batch: 8,
            max_prompt_tokens: 2048,
            max_total_tokens: 2560,
            max_patches: 8 * 1024,
            max_images: 8,
        }
    }
}

/// How to load the engine.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineOptions {
    /// Where the three sessions run. For TensorRT without a cache folder, `<model dir>/trt_cache`
    /// is used, so the engines (the `.engine`/`.plan` files) and the timing cache are built once and
    /// shipped with the model directory.
    pub provider: ExecutionProvider,
    /// Threads inside one operator (`None`: ONNX Runtime's default, one per core).
    pub intra_threads: Option<usize>,
    /// TensorRT optimisation profiles.
    pub trt_profile: TrtProfile,
    /// Overrides the processor's `max_pixels` (vision tokens dominate the cost).
    pub max_pixels: Option<u64>,
    /// Overrides the processor's `min_pixels`.
    pub min_pixels: Option<u64>,
    /// Keep the key/value cache in the provider's memory between steps (IoBinding). `None`: on
    /// for CUDA and TensorRT, off on the CPU (where it changes nothing); `Some(true)` on the CPU
    /// runs the same binding code path, which is how it is tested without a GPU.
    pub device_cache: Option<bool>,
    /// Memory (MiB, host) for the key/value cache of prompt prefixes reused across prompts
    /// (`None`: [`DEFAULT_PREFIX_CACHE_MIB`]; `Some(0)` turns reuse off).
    pub prefix_cache_mib: Option<usize>,
}

/// Where the bound key/value cache lives.
#[derive(Debug, Clone, PartialEq, Eq)]
enum CacheDevice {
    Cpu,
    Cuda(i32),
}

impl CacheDevice {
    fn memory_info(&self) -> ort::Result<MemoryInfo<'static>> {
        match self {
            Self::Cpu => MemoryInfo::new(
                AllocationDevice::CPU,
                0,
                AllocatorType::Device,
                MemoryType::Default,
            ),
            Self::Cuda(id) => MemoryInfo::new(
                AllocationDevice::CUDA,
                *id,
                AllocatorType::Device,
                MemoryType::Default,
            ),
        }
    }
}

/// Decoding parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GenerationParams {
    /// Tokens to generate at most (the end token counts).
    pub max_new_tokens: usize,
    /// Greedy or sampled.
    pub sampling: Sampling,
}

impl Default for GenerationParams {
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            sampling: Sampling::Greedy,
        }
    }
}

/// One prompt to complete.
#[derive(Debug, Clone)]
pub struct Request {
    /// The tokenised prompt and its images.
    pub prompt: Prompt,
    /// Seed of this request's sampler (ignored when greedy).
    pub seed: u64,
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end token was produced (it is the last of `tokens`).
    Stop,
    /// `max_new_tokens` reached.
    Length,
}

/// One completed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    /// Generated ids, the end token included when `finish` is `Stop`.
    pub tokens: Vec<u32>,
    /// The decoded text without special tokens.
    pub text: String,
    /// Why it stopped.
    pub finish: FinishReason,
    /// Prompt length in tokens (image tokens included).
    pub prompt_tokens: usize,
}

/// Where the time of the last [`Qwen2Vl::generate`] call went (wall time per phase, summed over
/// steps), for profiling and the benchmark's breakdown.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationStats {
    /// Vision encoder run (patches gathered, features read back).
    pub vision: std::time::Duration,
    /// Prompt token embedding and image feature scatter.
    pub prompt_embed: std::time::Duration,
    /// The prompt (prefill) decoder runs and laying their caches out as one batch.
    pub prefill: std::time::Duration,
    /// Prefill decoder runs (one per row and chunk).
    pub prefill_runs: usize,
    /// Prompt tokens over all rows (image tokens included, no padding).
    pub prompt_tokens: usize,
    /// Of those, tokens whose prefill was skipped by reusing a stored prompt prefix.
    pub prefix_reused_tokens: usize,
    /// Decode steps run.
    pub steps: usize,
    /// Token choice over all steps.
    pub sampling: std::time::Duration,
    /// Dropping finished rows from the cache.
    pub cache_trim: std::time::Duration,
    /// Embedding the new tokens (all steps).
    pub step_embed: std::time::Duration,
    /// Building masks and positions (all steps).
    pub step_inputs: std::time::Duration,
    /// Decoder runs of the decode steps (inputs bound, run, logits read).
    pub step_decoder: std::time::Duration,
    /// Turning tokens into text.
    pub detokenize: std::time::Duration,
    /// The whole call.
    pub total: std::time::Duration,
}

impl std::ops::AddAssign<&GenerationStats> for GenerationStats {
    /// Sums two passes' statistics (benchmarks add up several calls).
    fn add_assign(&mut self, s: &GenerationStats) {
        self.vision += s.vision;
        self.prompt_embed += s.prompt_embed;
        self.prefill += s.prefill;
        self.prefill_runs += s.prefill_runs;
        self.prompt_tokens += s.prompt_tokens;
        self.prefix_reused_tokens += s.prefix_reused_tokens;
        self.steps += s.steps;
        self.sampling += s.sampling;
        self.cache_trim += s.cache_trim;
        self.step_embed += s.step_embed;
        self.step_inputs += s.step_inputs;
        self.step_decoder += s.step_decoder;
        self.detokenize += s.detokenize;
        self.total += s.total;
    }
}

/// Most bytes the embedding row cache holds (4,681 rows of a 7B model's 3,584-wide embedding).
const EMBED_CACHE_BYTES: usize = 64 << 20;

/// Embedding rows of generated token ids. `embed_tokens` is a pure table lookup, so a row computed
/// once is reused: a decode step then usually needs no `embed_tokens` run at all (one session run
/// per step costs more than the lookup itself at small batch sizes).
struct EmbeddingCache {
    rows: std::collections::HashMap<i64, Box<[f32]>>,
    hidden: usize,
    capacity: usize,
}

impl EmbeddingCache {
    fn new(hidden: usize) -> Self {
        Self {
            rows: std::collections::HashMap::new(),
            hidden,
            capacity: (EMBED_CACHE_BYTES / (hidden.max(1) * 4)).max(64),
        }
    }

    /// Adds the rows `[ids.len(), hidden]` of `ids`; a full cache is emptied first (generation
    /// keeps going; the rows are recomputed on demand).
    fn insert(&mut self, ids: &[i64], rows: &[f32]) {
        if self.rows.len() + ids.len() > self.capacity {
            self.rows.clear();
        }
        for (id, row) in ids.iter().zip(rows.chunks_exact(self.hidden)) {
            self.rows.insert(*id, row.into());
        }
    }
}

/// The inputs of one decoder run.
struct Step {
    /// `[batch, seq, hidden]` flattened.
    embeds: Vec<f32>,
    batch: usize,
    seq: usize,
    /// `[batch, total]` flattened.
    mask: Vec<i64>,
    total: usize,
    /// `[3, batch, seq]` flattened.
    positions: Vec<i64>,
    /// The cache, one value per `past_key_values.*` input.
    past: Vec<DynValue>,
}

/// A loaded Qwen2-VL model.
pub struct Qwen2Vl {
    dir: ModelDir,
    tokenizer: Tokenizer,
    processor: ImageProcessor,
    vision: OrtSession,
    embed: OrtSession,
    decoder: OrtSession,
    past_names: Vec<String>,
    present_names: Vec<String>,
    provider: ExecutionProvider,
    eos: Vec<u32>,
    cache_device: Option<CacheDevice>,
    stats: GenerationStats,
    prefill_chunk: usize,
    embed_cache: EmbeddingCache,
    prefix_cache: PrefixCache,
}

impl std::fmt::Debug for Qwen2Vl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qwen2Vl")
            .field("dir", &self.dir.root)
            .field("provider", &self.provider)
            .finish_non_exhaustive()
    }
}

fn gen_err(message: impl Into<String>) -> RuntimeError {
    RuntimeError::Generation(message.into())
}

fn ort_err(what: &str) -> impl Fn(ort::Error) -> RuntimeError + '_ {
    move |e| RuntimeError::Run {
        model: what.to_string(),
        message: e.to_string(),
    }
}

fn shape_list(parts: &[(String, Vec<usize>)]) -> String {
    parts
        .iter()
        .map(|(n, d)| {
            let dims: Vec<String> = d.iter().map(ToString::to_string).collect();
            format!("{n}:{}", dims.join("x"))
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// min / opt / max shape lists of one graph's dynamic inputs.
type ProfileShapes = (String, String, String);

fn build_session(
    rt: &Runtime,
    path: &Path,
    opts: &EngineOptions,
    trt_cache: &Path,
    profile: &ProfileShapes,
) -> Result<OrtSession> {
    let label = path.display().to_string();
    let create_err = |message: String| RuntimeError::SessionCreate {
        model: label.clone(),
        provider: opts.provider.to_string(),
        message,
    };
    let mut b = OrtSession::builder(&rt.env).map_err(|e| create_err(e.to_string()))?;
    if let Some(n) = opts.intra_threads {
        b = b
            .with_intra_threads(n)
            .map_err(|e| create_err(e.to_string()))?;
    }
    if opts.provider.is_gpu() {
        for name in opts.provider.ort_names() {
            if !crate::provider::ep_available(name)? {
                return Err(RuntimeError::ProviderUnavailable {
                    provider: name,
                    requested: opts.provider.to_string(),
                    dylib: rt.dylib().to_path_buf(),
                    available: rt.available_providers()?.join(", "),
                });
            }
        }
        let dispatches = match &opts.provider {
            ExecutionProvider::TensorRt {
                device_id,
                cache_dir,
                fp16,
            } => {
                use ort::ep::{TensorRT, CUDA};
                let dir = cache_dir.clone().unwrap_or_else(|| trt_cache.to_path_buf());
                std::fs::create_dir_all(&dir).map_err(|source| RuntimeError::Io {
                    action: "creating the TensorRT cache folder",
                    path: dir.clone(),
                    source,
                })?;
                let dir_str = dir.to_str().ok_or_else(|| RuntimeError::InvalidOption {
                    option: "cache_dir",
                    message: format!("`{}` is not valid UTF-8", dir.display()),
                })?;
                let device =
                    i32::try_from(*device_id).map_err(|_| RuntimeError::InvalidOption {
                        option: "device_id",
                        message: format!("{device_id} is out of range"),
                    })?;
                let mut trt = TensorRT::default()
                    .with_device_id(device)
                    .with_fp16(*fp16)
                    .with_engine_cache(true)
                    .with_engine_cache_path(dir_str)
                    .with_timing_cache(true)
                    .with_timing_cache_path(dir_str);
                if !profile.0.is_empty() {
                    trt = trt
                        .with_profile_min_shapes(&profile.0)
                        .with_profile_opt_shapes(&profile.1)
                        .with_profile_max_shapes(&profile.2);
                }
                vec![
                    ("TensorrtExecutionProvider", trt.build().error_on_failure()),
                    (
                        "CUDAExecutionProvider",
                        CUDA::default()
                            .with_device_id(device)
                            .build()
                            .error_on_failure(),
                    ),
                ]
            }
            other => other.dispatches()?,
        };
        for (name, dispatch) in dispatches {
            b = b.with_execution_providers([dispatch]).map_err(|e| {
                RuntimeError::ProviderRegistration {
                    provider: name,
                    requested: opts.provider.to_string(),
                    message: e.to_string(),
                }
            })?;
        }
    }
    b.commit_from_file(path)
        .map_err(|e| create_err(e.to_string()))
}

fn i64_tensor(shape: Vec<usize>, data: Vec<i64>) -> Result<DynValue> {
    Tensor::from_array((shape, data))
        .map(Tensor::into_dyn)
        .map_err(|e| gen_err(format!("creating an int64 input: {e}")))
}

fn f32_tensor(shape: Vec<usize>, data: Vec<f32>) -> Result<DynValue> {
    Tensor::from_array((shape, data))
        .map(Tensor::into_dyn)
        .map_err(|e| gen_err(format!("creating a float input: {e}")))
}

/// A host-readable value's shape and f32 data, borrowed from ONNX Runtime.
fn view_f32<'v>(value: &'v DynValue, name: &str) -> Result<(Vec<usize>, &'v [f32])> {
    let (shape, data) = value
        .try_extract_tensor::<f32>()
        .map_err(|e| RuntimeError::Output {
            name: name.to_string(),
            message: e.to_string(),
        })?;
    let dims = shape
        .iter()
        .map(|&d| usize::try_from(d).unwrap_or(0))
        .collect();
    Ok((dims, data))
}

/// Copies a value's f32 data and shape out of ONNX Runtime.
fn read_f32(value: &DynValue, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
    let (dims, data) = view_f32(value, name)?;
    Ok((dims, data.to_vec()))
}

/// `value` itself when host code can read it, else a copy in host memory (a cache bound to GPU
/// memory).
fn to_host(value: DynValue, name: &str) -> Result<DynValue> {
    let out_err = |e: ort::Error| RuntimeError::Output {
        name: name.to_string(),
        message: e.to_string(),
    };
    let tensor = value.downcast::<DynTensorValueType>().map_err(out_err)?;
    let tensor = if tensor.memory_info().is_cpu_accessible() {
        tensor
    } else {
        tensor.to(AllocationDevice::CPU, 0).map_err(out_err)?
    };
    Ok(tensor.into_dyn())
}

/// Rows `keep` and sequence columns `from..` of a `[batch, heads, seq, dim]` cache value.
fn gather_cache(value: DynValue, name: &str, keep: &[usize], from: usize) -> Result<DynValue> {
    // A cache bound to GPU memory is copied to the host first (only when rows leave the batch).
    let value = to_host(value, name)?;
    let (d, data) = view_f32(&value, name)?;
    if d.len() != 4 {
        return Err(gen_err(format!("{name} has rank {}, expected 4", d.len())));
    }
    let (heads, seq, dim) = (d[1], d[2], d[3]);
    let new_seq = seq - from;
    let mut out = Vec::with_capacity(keep.len() * heads * new_seq * dim);
    for &r in keep {
        for h in 0..heads {
            let base = ((r * heads + h) * seq + from) * dim;
            out.extend_from_slice(&data[base..base + new_seq * dim]);
        }
    }
    f32_tensor(vec![keep.len(), heads, new_seq, dim], out)
}

impl Qwen2Vl {
    /// Opens a model directory (checked first: missing files are an error naming them) and creates
    /// the three sessions on the requested provider.
    pub fn load(dir: impl AsRef<Path>, opts: &EngineOptions) -> Result<Self> {
        let dir = ModelDir::open(dir)?;
        let tok_path = dir.path("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&tok_path).map_err(|e| RuntimeError::ModelDir {
            path: tok_path.clone(),
            message: format!("cannot load the tokenizer: {e}"),
        })?;
        let cfg = &dir.config;
        for (name, id) in [
            ("<|image_pad|>", cfg.image_token_id),
            ("<|vision_start|>", cfg.vision_start_token_id),
            ("<|vision_end|>", cfg.vision_end_token_id),
        ] {
            if tokenizer.token_to_id(name) != Some(id) {
                return Err(RuntimeError::ModelDir {
                    path: tok_path.clone(),
                    message: format!(
                        "token {name} has id {:?} in tokenizer.json but {id} in config.json",
                        tokenizer.token_to_id(name)
                    ),
                });
            }
        }
        let mut eos = dir.eos_token_ids.clone();
        if let Some(im_end) = tokenizer.token_to_id("<|im_end|>") {
            if !eos.contains(&im_end) {
                eos.push(im_end);
            }
        }
        if eos.is_empty() {
            return Err(RuntimeError::ModelDir {
                path: dir.root.clone(),
                message: "no end token: generation_config.json has no eos_token_id and the tokenizer has no <|im_end|>".into(),
            });
        }
        let processor = ImageProcessor::new(dir.preprocess.clone(), cfg.in_channels)
            .with_pixel_budget(opts.min_pixels, opts.max_pixels)?;

        let rt = init()?;
        let trt_cache = dir.path("trt_cache");
        let p = &opts.trt_profile;
        let patch_dim = cfg.patch_dim();
        let m2 = cfg.spatial_merge_size * cfg.spatial_merge_size;
        let vision_profile = (
            shape_list(&[
                ("pixel_values".into(), vec![m2, patch_dim]),
                ("grid_thw".into(), vec![1, 3]),
            ]),
            shape_list(&[
                ("pixel_values".into(), vec![p.max_patches / 2, patch_dim]),
                ("grid_thw".into(), vec![p.max_images.div_ceil(2), 3]),
            ]),
            shape_list(&[
                ("pixel_values".into(), vec![p.max_patches, patch_dim]),
                ("grid_thw".into(), vec![p.max_images, 3]),
            ]),
        );
        let embed_profile = (
            shape_list(&[("input_ids".into(), vec![1, 1])]),
            shape_list(&[(
                "input_ids".into(),
                vec![p.max_batch, p.max_prompt_tokens / 2],
            )]),
            shape_list(&[("input_ids".into(), vec![p.max_batch, p.max_prompt_tokens])]),
        );
        let (kv, hd, hidden) = (cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size);
        let dec_shapes = |b: usize, s: usize, past: usize| {
            let mut v = vec![
                ("inputs_embeds".to_string(), vec![b, s, hidden]),
                ("attention_mask".to_string(), vec![b, past + s]),
                ("position_ids".to_string(), vec![3, b, s]),
            ];
            for i in 0..cfg.num_layers {
                for kind in ["key", "value"] {
                    v.push((format!("past_key_values.{i}.{kind}"), vec![b, kv, past, hd]));
                }
            }
            shape_list(&v)
        };
        let decoder_profile = (
            dec_shapes(1, 1, 0),
            dec_shapes(p.max_batch, 1, p.max_total_tokens / 2),
            dec_shapes(
                p.max_batch,
                p.max_prompt_tokens,
                p.max_total_tokens - p.max_prompt_tokens.min(p.max_total_tokens),
            ),
        );
        let vision = build_session(
            rt,
            &dir.path(VISION_ENCODER),
            opts,
            &trt_cache,
            &vision_profile,
        )?;
        let embed = build_session(
            rt,
            &dir.path(EMBED_TOKENS),
            opts,
            &trt_cache,
            &embed_profile,
        )?;
        let decoder = build_session(rt, &dir.path(DECODER), opts, &trt_cache, &decoder_profile)?;

        let mut past_names = Vec::new();
        let mut present_names = Vec::new();
        for i in 0..cfg.num_layers {
            for kind in ["key", "value"] {
                past_names.push(format!("past_key_values.{i}.{kind}"));
                present_names.push(format!("present.{i}.{kind}"));
            }
        }
        let check = |session: &OrtSession,
                     file: &str,
                     inputs: &[&str],
                     outputs: &[&str]|
         -> Result<()> {
            let have_in: Vec<&str> = session.inputs().iter().map(|o| o.name()).collect();
            let have_out: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
            let missing: Vec<&str> = inputs
                .iter()
                .filter(|n| !have_in.contains(n))
                .chain(outputs.iter().filter(|n| !have_out.contains(n)))
                .copied()
                .collect();
            let extra: Vec<&str> = have_in
                .iter()
                .filter(|n| !inputs.contains(n))
                .copied()
                .collect();
            if !missing.is_empty() || !extra.is_empty() {
                return Err(RuntimeError::ModelDir {
                    path: dir.path(file),
                    message: format!(
                        "does not match config.json ({} layers): missing {missing:?}, unexpected inputs {extra:?}",
                        cfg.num_layers
                    ),
                });
            }
            Ok(())
        };
        check(
            &vision,
            VISION_ENCODER,
            &["pixel_values", "grid_thw"],
            &["image_features"],
        )?;
        check(&embed, EMBED_TOKENS, &["input_ids"], &["inputs_embeds"])?;
        let mut dec_in: Vec<&str> = vec!["inputs_embeds", "attention_mask", "position_ids"];
        dec_in.extend(past_names.iter().map(String::as_str));
        let mut dec_out: Vec<&str> = vec!["logits"];
        dec_out.extend(present_names.iter().map(String::as_str));
        check(&decoder, DECODER, &dec_in, &dec_out)?;

        let prefix_cache = PrefixCache::new(
            opts.prefix_cache_mib.unwrap_or(DEFAULT_PREFIX_CACHE_MIB) << 20,
            cfg.head_dim,
        );
        Ok(Self {
            dir,
            tokenizer,
            processor,
            vision,
            embed,
            decoder,
            past_names,
            present_names,
            provider: opts.provider.clone(),
            eos,
            cache_device: match (opts.device_cache, &opts.provider) {
                (Some(false), _) | (None, ExecutionProvider::Cpu) => None,
                (_, ExecutionProvider::Cpu) => Some(CacheDevice::Cpu),
                (
                    _,
                    ExecutionProvider::Cuda { device_id }
                    | ExecutionProvider::TensorRt { device_id, .. },
                ) => Some(CacheDevice::Cuda(i32::try_from(*device_id).unwrap_or(0))),
            },
            stats: GenerationStats::default(),
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
            embed_cache: EmbeddingCache::new(hidden),
            prefix_cache,
        })
    }

    /// Where the time of the last [`Self::generate`] call went.
    pub fn last_stats(&self) -> &GenerationStats {
        &self.stats
    }

    /// Sets how many prompt tokens one prefill decoder run takes at most (default
    /// [`DEFAULT_PREFILL_CHUNK`]). Smaller chunks keep the `[heads, chunk, total]` attention scores in
    /// cache; the results are the same up to floating-point summation order. Stored prompt
    /// prefixes are dropped (reuse is in whole chunks).
    pub fn set_prefill_chunk(&mut self, tokens: usize) -> Result<()> {
        if tokens == 0 {
            return Err(gen_err("the prefill chunk must be at least one token"));
        }
        if tokens != self.prefill_chunk {
            self.prefix_cache.clear();
        }
        self.prefill_chunk = tokens;
        Ok(())
    }

    /// Host memory held by stored prompt prefixes (bytes).
    pub fn prefix_cache_bytes(&self) -> usize {
        self.prefix_cache.bytes()
    }

    /// The checked model directory.
    pub fn model_dir(&self) -> &ModelDir {
        &self.dir
    }

    /// The model directory's path.
    pub fn root(&self) -> &PathBuf {
        &self.dir.root
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The image processor (cheap to clone into decoding threads).
    pub fn processor(&self) -> &ImageProcessor {
        &self.processor
    }

    /// The provider the sessions run on.
    pub fn provider(&self) -> &ExecutionProvider {
        &self.provider
    }

    /// Token ids that end generation.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos
    }

    /// Replaces the token ids that end generation (default: `generation_config.json`'s plus
    /// `<|im_end|>`), e.g. to stop at a custom delimiter.
    pub fn set_eos_token_ids(&mut self, ids: Vec<u32>) -> Result<()> {
        if ids.is_empty() {
            return Err(gen_err("at least one end token is needed"));
        }
        self.eos = ids;
        Ok(())
    }

    /// Builds a request from chat messages and processed images.
    pub fn prompt(&self, messages: &[Message], images: Vec<PreparedImage>) -> Result<Prompt> {
        Prompt::from_messages(
            &self.tokenizer,
            self.dir.config.image_token_id,
            messages,
            images,
        )
    }

    /// Decodes ids to text without special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| RuntimeError::Tokenizer(format!("decoding: {e}")))
    }

    /// Runs the vision encoder on every image of `requests`: `[tokens, hidden]` rows in image
    /// order. One run per image: the encoder's attention is block-diagonal (one block per image
    /// frame), so a run over several images computes and masks away all the cross-image scores
    /// (quadratic in the total patch count), while one run per image costs only its own block.
    fn image_features(&mut self, requests: &[Request]) -> Result<Vec<f32>> {
        let patch_dim = self.dir.config.patch_dim();
        let hidden = self.dir.config.hidden_size;
        let mut features = Vec::new();
        for im in requests.iter().flat_map(|r| r.prompt.images.iter()) {
            if im.patch_dim != patch_dim {
                return Err(gen_err(format!(
                    "image patches have {} values, the model expects {patch_dim}",
                    im.patch_dim
                )));
            }
            let patches = im.num_patches();
            let grid: Vec<i64> = im.grid_thw.iter().map(|&g| g as i64).collect();
            let inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = vec![
                (
                    "pixel_values".into(),
                    TensorRef::from_array_view(([patches, patch_dim], &im.pixel_values[..]))
                        .map_err(|e| gen_err(format!("creating the pixel input: {e}")))?
                        .into(),
                ),
                ("grid_thw".into(), i64_tensor(vec![1, 3], grid)?.into()),
            ];
            let out = self.vision.run(inputs).map_err(ort_err(VISION_ENCODER))?;
            let value = out
                .get("image_features")
                .ok_or_else(|| gen_err("the vision encoder returned no image_features"))?;
            let (shape, data) = view_f32(value, "image_features")?;
            if shape != [im.num_tokens, hidden] {
                return Err(gen_err(format!(
                    "image_features has shape {shape:?}, expected [{}, {hidden}]",
                    im.num_tokens
                )));
            }
            features.extend_from_slice(data);
        }
        Ok(features)
    }

    fn embed_ids(&mut self, ids: Vec<i64>, batch: usize, seq: usize) -> Result<Vec<f32>> {
        let inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = vec![(
            "input_ids".into(),
            i64_tensor(vec![batch, seq], ids)?.into(),
        )];
        let out = self.embed.run(inputs).map_err(ort_err(EMBED_TOKENS))?;
        let value = out
            .get("inputs_embeds")
            .ok_or_else(|| gen_err("embed_tokens returned no inputs_embeds"))?;
        let (shape, data) = read_f32(value, "inputs_embeds")?;
        if shape != [batch, seq, self.dir.config.hidden_size] {
            return Err(gen_err(format!(
                "inputs_embeds has shape {shape:?}, expected [{batch}, {seq}, {}]",
                self.dir.config.hidden_size
            )));
        }
        Ok(data)
    }

    /// The embeddings `[ids.len(), hidden]` of generated tokens: rows already seen come from the
    /// cache, the others from one `embed_tokens` run over the distinct new ids.
    fn embed_generated(&mut self, ids: &[i64]) -> Result<Vec<f32>> {
        let mut missing: Vec<i64> = ids
            .iter()
            .copied()
            .filter(|id| !self.embed_cache.rows.contains_key(id))
            .collect();
        missing.sort_unstable();
        missing.dedup();
        if !missing.is_empty() {
            let n = missing.len();
            let rows = self.embed_ids(missing.clone(), 1, n)?;
            self.embed_cache.insert(&missing, &rows);
        }
        let hidden = self.dir.config.hidden_size;
        let mut out = Vec::with_capacity(ids.len() * hidden);
        for id in ids {
            let row = match self.embed_cache.rows.get(id) {
                Some(row) => row,
                None => return Err(gen_err("internal: an embedding row missing from the cache")),
            };
            out.extend_from_slice(row);
        }
        Ok(out)
    }

    /// An empty cache (`past` length 0) for `batch` rows.
    fn empty_past(&self, batch: usize) -> Result<Vec<DynValue>> {
        let cfg = &self.dir.config;
        (0..self.past_names.len())
            .map(|_| {
                f32_tensor(
                    vec![batch, cfg.num_key_value_heads, 0, cfg.head_dim],
                    Vec::new(),
                )
            })
            .collect()
    }

    /// The longest stored prefix of a row's prompt `ids` within its first `limit` tokens: its
    /// length and its cache as `past_key_values` (length 0 and an empty cache when none).
    fn reused_prefix(&mut self, ids: &[i64], limit: usize) -> Result<(usize, Vec<DynValue>)> {
        let (len, values) = self.prefix_cache.lookup(ids, limit, self.prefill_chunk);
        if len == 0 {
            return Ok((0, self.empty_past(1)?));
        }
        let cfg = &self.dir.config;
        let shape = vec![1, cfg.num_key_value_heads, len, cfg.head_dim];
        let past = values
            .into_iter()
            .map(|v| f32_tensor(shape.clone(), v))
            .collect::<Result<Vec<_>>>()?;
        Ok((len, past))
    }

    /// Stores the whole prefill chunks of a row's plain-id prefix (its first `limit` tokens) from
    /// its finished prompt cache `past` (`[1, heads, len, dim]` per value), unless the first
    /// `reused` tokens already came from the store and nothing longer is to be had. Returns the
    /// cache (read back to host memory when it was stored from).
    fn store_prefix(
        &mut self,
        ids: &[i64],
        limit: usize,
        reused: usize,
        past: Vec<DynValue>,
    ) -> Result<Vec<DynValue>> {
        let store = limit / self.prefill_chunk * self.prefill_chunk;
        if !self.prefix_cache.enabled() || store <= reused {
            return Ok(past);
        }
        let host = past
            .into_iter()
            .zip(&self.present_names)
            .map(|(v, name)| to_host(v, name))
            .collect::<Result<Vec<_>>>()?;
        let cfg = &self.dir.config;
        let expected = [1, cfg.num_key_value_heads, ids.len(), cfg.head_dim];
        let mut views = Vec::with_capacity(host.len());
        for (value, name) in host.iter().zip(&self.present_names) {
            let (shape, data) = view_f32(value, name)?;
            if shape != expected {
                return Err(gen_err(format!(
                    "{name} has shape {shape:?}, expected {expected:?}"
                )));
            }
            views.push(data);
        }
        self.prefix_cache.insert(ids, store, ids.len(), &views);
        Ok(host)
    }

    /// Lays the per-row prompt caches (`[1, heads, len_b, dim]` each) out as one left-padded batch
    /// cache `[batch, heads, seq, dim]`: row b's entries at columns `seq - len_b..`, zeros before
    /// (those columns are masked out, as HF's left padding is).
    fn merge_row_caches(
        &self,
        rows: Vec<Vec<DynValue>>,
        lens: &[usize],
        seq: usize,
    ) -> Result<Vec<DynValue>> {
        let cfg = &self.dir.config;
        let (heads, dim) = (cfg.num_key_value_heads, cfg.head_dim);
        let batch = rows.len();
        let mut merged: Vec<Vec<f32>> = (0..self.present_names.len())
            .map(|_| vec![0f32; batch * heads * seq * dim])
            .collect();
        for (b, (row, &len)) in rows.into_iter().zip(lens).enumerate() {
            if row.len() != merged.len() {
                return Err(gen_err(
                    "internal: a row cache with the wrong number of values",
                ));
            }
            for ((value, out), name) in row.into_iter().zip(&mut merged).zip(&self.present_names) {
                let value = to_host(value, name)?;
                let (shape, data) = view_f32(&value, name)?;
                let expected = [1, heads, len, dim];
                if shape != expected {
                    return Err(gen_err(format!(
                        "{name} has shape {shape:?}, expected {expected:?}"
                    )));
                }
                let pad = seq - len;
                for h in 0..heads {
                    let dst = ((b * heads + h) * seq + pad) * dim;
                    let src = h * len * dim;
                    out[dst..dst + len * dim].copy_from_slice(&data[src..src + len * dim]);
                }
            }
        }
        merged
            .into_iter()
            .map(|data| f32_tensor(vec![batch, heads, seq, dim], data))
            .collect()
    }

    /// One decoder run: returns the last-position logits `[batch][vocab]` (flattened) and the
    /// `present.*` values.
    fn decode_step(&mut self, step: Step) -> Result<(Vec<f32>, Vec<DynValue>)> {
        let Step {
            embeds,
            batch,
            seq,
            mask,
            total,
            positions,
            past,
        } = step;
        let hidden = self.dir.config.hidden_size;
        let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> =
            Vec::with_capacity(3 + past.len());
        inputs.push((
            "inputs_embeds".into(),
            f32_tensor(vec![batch, seq, hidden], embeds)?.into(),
        ));
        inputs.push((
            "attention_mask".into(),
            i64_tensor(vec![batch, total], mask)?.into(),
        ));
        inputs.push((
            "position_ids".into(),
            i64_tensor(vec![3, batch, seq], positions)?.into(),
        ));
        if let Some(device) = self.cache_device.clone() {
            return self.decode_step_bound(inputs, past, batch, seq, &device);
        }
        for (name, value) in self.past_names.iter().zip(past) {
            inputs.push((Cow::Owned(name.clone()), value.into()));
        }
        let mut out = self.decoder.run(inputs).map_err(ort_err(DECODER))?;
        let logits = last_logits(&out, batch, seq)?;
        let mut present = Vec::with_capacity(self.present_names.len());
        for name in &self.present_names {
            present.push(
                out.remove(name)
                    .ok_or_else(|| gen_err(format!("the decoder returned no {name}")))?,
            );
        }
        Ok((logits, present))
    }

    /// [`Self::decode_step`] through an IoBinding whose `present.*` outputs stay in `device`
    /// memory: on a GPU the cache never travels to the host between steps (only the logits do).
    fn decode_step_bound(
        &mut self,
        inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)>,
        past: Vec<DynValue>,
        batch: usize,
        seq: usize,
        device: &CacheDevice,
    ) -> Result<(Vec<f32>, Vec<DynValue>)> {
        let bind_err = |e: ort::Error| RuntimeError::Run {
            model: DECODER.to_string(),
            message: format!("binding: {e}"),
        };
        let mut binding = self.decoder.create_binding().map_err(bind_err)?;
        for (name, value) in inputs {
            match value {
                SessionInputValue::Owned(v) => {
                    binding.bind_input(name.as_ref(), &v).map_err(bind_err)?
                }
                _ => return Err(gen_err("internal: a borrowed decoder input")),
            }
        }
        for (name, value) in self.past_names.iter().zip(&past) {
            binding.bind_input(name.as_str(), value).map_err(bind_err)?;
        }
        let host = MemoryInfo::new(
            AllocationDevice::CPU,
            0,
            AllocatorType::Device,
            MemoryType::Default,
        )
        .map_err(bind_err)?;
        let cache_mem = device.memory_info().map_err(bind_err)?;
        binding
            .bind_output_to_device("logits", &host)
            .map_err(bind_err)?;
        for name in &self.present_names {
            binding
                .bind_output_to_device(name.as_str(), &cache_mem)
                .map_err(bind_err)?;
        }
        let mut out = self
            .decoder
            .run_binding(&binding)
            .map_err(ort_err(DECODER))?;
        let logits = last_logits(&out, batch, seq)?;
        let mut present = Vec::with_capacity(self.present_names.len());
        for name in &self.present_names {
            present.push(
                out.remove(name)
                    .ok_or_else(|| gen_err(format!("the decoder returned no {name}")))?,
            );
        }
        drop(past);
        Ok((logits, present))
    }
}

/// The last position's logits, `[batch][vocab]` flattened, from the decoder's outputs.
fn last_logits(
    out: &ort::session::SessionOutputs<'_>,
    batch: usize,
    seq: usize,
) -> Result<Vec<f32>> {
    let value = out
        .get("logits")
        .ok_or_else(|| gen_err("the decoder returned no logits"))?;
    let (d, data) = view_f32(value, "logits")?;
    if d.len() != 3 || d[0] != batch || d[1] == 0 {
        return Err(gen_err(format!(
            "logits has shape {d:?}, expected [{batch}, 1 or {seq}, vocab]"
        )));
    }
    let (positions_out, vocab) = (d[1], d[2]);
    // The exporter writes the last position only; onnx-community's files write all of them.
    let mut logits = Vec::with_capacity(batch * vocab);
    for b in 0..batch {
        let start = (b * positions_out + positions_out - 1) * vocab;
        logits.extend_from_slice(&data[start..start + vocab]);
    }
    Ok(logits)
}

impl Qwen2Vl {
    /// Generates a completion for each request (a batch of any prompt lengths and image sizes).
    pub fn generate(
        &mut self,
        requests: &[Request],
        params: &GenerationParams,
    ) -> Result<Vec<Generation>> {
        params.sampling.validate()?;
        let call_start = Instant::now();
        let mut stats = GenerationStats::default();
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        if params.max_new_tokens == 0 {
            return Ok(requests
                .iter()
                .map(|r| Generation {
                    tokens: Vec::new(),
                    text: String::new(),
                    finish: FinishReason::Length,
                    prompt_tokens: r.prompt.input_ids.len(),
                })
                .collect());
        }
        let cfg = self.dir.config.clone();
        let hidden = cfg.hidden_size;
        let batch = requests.len();
        let seq = requests
            .iter()
            .map(|r| r.prompt.input_ids.len())
            .max()
            .unwrap_or(0);
        if seq == 0 {
            return Err(gen_err("empty prompt"));
        }

        // Positions first: they validate placeholders against images before any model runs.
        let mut ropes = Vec::with_capacity(batch);
        for r in requests {
            let grids: Vec<[usize; 3]> = r.prompt.images.iter().map(|im| im.grid_thw).collect();
            ropes.push(rope_index(
                &r.prompt.input_ids,
                cfg.image_token_id,
                &grids,
                cfg.spatial_merge_size,
            )?);
        }
        let t = Instant::now();
        let features = self.image_features(requests)?;
        stats.vision = t.elapsed();

        // The prompt step, one row at a time (no padding, chunks of `prefill_chunk` tokens: the
        // attention scores stay small), then the rows' caches are laid out left-padded to `seq`.
        let image_token = i64::from(cfg.image_token_id);
        let mut feature_rows = features.chunks_exact(hidden);
        let mut logits = Vec::new();
        let mut row_caches = Vec::with_capacity(batch);
        for (b, r) in requests.iter().enumerate() {
            let t = Instant::now();
            let ids: Vec<i64> = r.prompt.input_ids.iter().map(|&t| i64::from(t)).collect();
            let len = ids.len();
            stats.prompt_tokens += len;
            let mut embeds = self.embed_ids(ids.clone(), 1, len)?;
            for (k, &id) in ids.iter().enumerate() {
                if id == image_token {
                    let row = feature_rows
                        .next()
                        .ok_or_else(|| gen_err("fewer image features than image tokens"))?;
                    embeds[k * hidden..(k + 1) * hidden].copy_from_slice(row);
                }
            }
            stats.prompt_embed += t.elapsed();
            let t = Instant::now();
            let rope = &ropes[b];
            // Plain-id prefix: up to the first image token, and at least one token left to run.
            let limit = ids
                .iter()
                .position(|&id| id == image_token)
                .unwrap_or(len)
                .min(len.saturating_sub(1));
            let (reused, mut past) = self.reused_prefix(&ids, limit)?;
            stats.prefix_reused_tokens += reused;
            let mut from = reused;
            let mut row_logits = Vec::new();
            while from < len {
                let to = (from + self.prefill_chunk).min(len);
                let mut positions = Vec::with_capacity(3 * (to - from));
                for axis in &rope.axes {
                    positions.extend_from_slice(&axis[from..to]);
                }
                let (l, p) = self.decode_step(Step {
                    embeds: embeds[from * hidden..to * hidden].to_vec(),
                    batch: 1,
                    seq: to - from,
                    mask: vec![1; to],
                    total: to,
                    positions,
                    past,
                })?;
                row_logits = l;
                past = p;
                from = to;
                stats.prefill_runs += 1;
            }
            logits.extend_from_slice(&row_logits);
            let past = self.store_prefix(&ids, limit, reused, past)?;
            row_caches.push(past);
            stats.prefill += t.elapsed();
        }
        if feature_rows.next().is_some() {
            return Err(gen_err("more image features than image tokens"));
        }
        let t = Instant::now();
        let lens: Vec<usize> = requests.iter().map(|r| r.prompt.input_ids.len()).collect();
        let mut past = self.merge_row_caches(row_caches, &lens, seq)?;
        let mask: Vec<i64> = lens
            .iter()
            .flat_map(|&len| (0..seq).map(move |k| i64::from(k >= seq - len)))
            .collect();
        stats.prefill += t.elapsed();
        let vocab = logits.len() / batch;

        // Per active row: its request index, its mask row, its next position.
        let mut active: Vec<usize> = (0..batch).collect();
        let mut mask_rows: Vec<Vec<i64>> = mask.chunks_exact(seq).map(<[i64]>::to_vec).collect();
        let mut next_pos: Vec<i64> = ropes.iter().map(|r| r.next).collect();
        let mut samplers: Vec<Sampler> = requests
            .iter()
            .map(|r| Sampler::new(params.sampling, r.seed))
            .collect();
        let mut tokens: Vec<Vec<u32>> = vec![Vec::new(); batch];
        let mut finish: Vec<Option<FinishReason>> = vec![None; batch];

        loop {
            let t = Instant::now();
            let mut keep_slots = Vec::with_capacity(active.len());
            for (slot, &req) in active.iter().enumerate() {
                let row = &logits[slot * vocab..(slot + 1) * vocab];
                let tok = samplers[req].next_token(row) as u32;
                tokens[req].push(tok);
                if self.eos.contains(&tok) {
                    finish[req] = Some(FinishReason::Stop);
                } else if tokens[req].len() >= params.max_new_tokens {
                    finish[req] = Some(FinishReason::Length);
                } else {
                    keep_slots.push(slot);
                }
            }
            stats.sampling += t.elapsed();
            if keep_slots.is_empty() {
                break;
            }
            let t = Instant::now();
            if keep_slots.len() != active.len() {
                // Finished rows leave; trim columns that are padding for every remaining row.
                let rows: Vec<&Vec<i64>> = keep_slots.iter().map(|&s| &mask_rows[s]).collect();
                let from = rows
                    .iter()
                    .map(|r| r.iter().take_while(|&&v| v == 0).count())
                    .min()
                    .unwrap_or(0);
                past = past
                    .into_iter()
                    .zip(&self.present_names)
                    .map(|(v, name)| gather_cache(v, name, &keep_slots, from))
                    .collect::<Result<Vec<_>>>()?;
                mask_rows = keep_slots
                    .iter()
                    .map(|&s| mask_rows[s][from..].to_vec())
                    .collect();
                active = keep_slots.iter().map(|&s| active[s]).collect();
            }
            stats.cache_trim += t.elapsed();
            let t = Instant::now();
            let b = active.len();
            let new_ids: Vec<i64> = active
                .iter()
                .map(|&r| i64::from(*tokens[r].last().unwrap_or(&0)))
                .collect();
            let step_embeds = self.embed_generated(&new_ids)?;
            stats.step_embed += t.elapsed();
            let t = Instant::now();
            for row in &mut mask_rows {
                row.push(1);
            }
            let total = mask_rows[0].len();
            let flat_mask: Vec<i64> = mask_rows.iter().flatten().copied().collect();
            let mut pos = vec![0i64; 3 * b];
            for (slot, &r) in active.iter().enumerate() {
                for a in 0..3 {
                    pos[a * b + slot] = next_pos[r];
                }
                next_pos[r] += 1;
            }
            stats.step_inputs += t.elapsed();
            let t = Instant::now();
            let (l, p) = self.decode_step(Step {
                embeds: step_embeds,
                batch: b,
                seq: 1,
                mask: flat_mask,
                total,
                positions: pos,
                past,
            })?;
            stats.step_decoder += t.elapsed();
            stats.steps += 1;
            logits = l;
            past = p;
        }

        let t = Instant::now();
        let out = requests
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let toks = std::mem::take(&mut tokens[i]);
                Ok(Generation {
                    text: self.decode(&toks)?,
                    tokens: toks,
                    finish: finish[i].unwrap_or(FinishReason::Length),
                    prompt_tokens: r.prompt.input_ids.len(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        stats.detokenize = t.elapsed();
        stats.total = call_start.elapsed();
        self.stats = stats;
        Ok(out)
    }
}
