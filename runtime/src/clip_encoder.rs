//! The exported CLIP (`hq-export --format onnx`) on ONNX Runtime, behind [`hq_eval::Encoder`].
//!
//! An export directory holds `image_encoder.onnx` (`pixel_values` f32 `[batch, 3, H, W]` ->
//! `image_embeds` f32 `[batch, D]`) and `text_encoder.onnx` (`input_ids` i64 `[batch, L]` ->
//! `text_embeds` f32 `[batch, D]`); each model's metadata carries the sizes (`hq_clip.*` keys), so
//! the encoder needs nothing but the directory. Loading checks the declared inputs and outputs
//! against the metadata and fails with a message naming the file and the key or tensor.
//!
//! # Providers
//! [`ExecutionProvider`] picks CPU (default), CUDA or TensorRT; a provider that the loaded ONNX
//! Runtime lacks or that fails to register is an error, never a quiet CPU fallback (see
//! [`crate::provider`]). For TensorRT, [`OnnxEncoderOptions`] adds what makes engines reusable:
//! - an engine cache and a timing cache folder (`trt_cache_dir`, or the provider's own), where the
//!   built engines (the deployable `.engine` / `.plan` artefacts) are stored and found again while
//!   the model, the profile and the TensorRT version stay the same;
//! - fp16 / bf16 kernels;
//! - one optimisation profile over the batch dimension, `1 ..= max_batch` tuned for `opt_batch`:
//!   every batch size the encoder runs (full chunks of `max_batch` rows and the remainder) falls in
//!   it, so no call ever triggers an engine rebuild.
//!
//! # Batching and I/O binding
//! Calls with more than `max_batch` rows are cut into chunks. On the CPU the input is passed to ONNX
//! Runtime as a view of the caller's buffer (no copy). On a GPU provider the encoder uses I/O binding
//! with page-locked (CUDA pinned) host buffers for the input and the output, reused across chunks of
//! the same size, so host-device copies are DMA transfers from memory the driver does not have to
//! stage first; `io_binding` forces the choice either way (on the CPU it binds plain CPU buffers,
//! which the tests use to check the bound path gives the same numbers).
//!
//! Outputs are whatever the export wrote: unnormalised embeddings unless it was exported with
//! `--normalize` ([`OnnxClipEncoder::normalized`] says which). Evaluation normalises either way.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use hq_data::transform::{ImageTransform, Preprocess, TransformKind};
use hq_eval::{EncodeError, Encoder};
use ort::ep::{ExecutionProviderDispatch, TensorRT, CUDA};
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{IoBinding, SessionInputValue};
use ort::value::{Tensor, TensorElementType, TensorRef, ValueType};

use crate::env::{init, Runtime};
use crate::error::{Result, RuntimeError};
use crate::provider::ExecutionProvider;

/// Image model file name in an export directory.
pub const IMAGE_MODEL_FILE: &str = "image_encoder.onnx";
/// Text model file name in an export directory.
pub const TEXT_MODEL_FILE: &str = "text_encoder.onnx";
/// Image model input.
pub const IMAGE_INPUT: &str = "pixel_values";
/// Image model output.
pub const IMAGE_OUTPUT: &str = "image_embeds";
/// Text model input.
pub const TEXT_INPUT: &str = "input_ids";
/// Text model output.
pub const TEXT_OUTPUT: &str = "text_embeds";

/// Rows per run unless changed with [`OnnxEncoderOptions::max_batch`].
pub const DEFAULT_MAX_BATCH: usize = 256;

/// Options of [`OnnxClipEncoder::load`] beyond the provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnnxEncoderOptions {
    /// Threads inside one operator (CPU); `None` keeps ONNX Runtime's default (one per core).
    pub intra_threads: Option<usize>,
    /// Most rows per run; larger calls are split. Also the top of the TensorRT profile.
    pub max_batch: usize,
    /// The batch size TensorRT tunes its kernels for (default: `max_batch`).
    pub opt_batch: Option<usize>,
    /// TensorRT engine and timing cache folder (created if missing); overrides the provider's.
    pub trt_cache_dir: Option<PathBuf>,
    /// TensorRT fp16 kernels (also on when the provider asks for them).
    pub trt_fp16: bool,
    /// TensorRT bf16 kernels.
    pub trt_bf16: bool,
    /// TensorRT builder optimisation level 0-5 (`None`: TensorRT's default, 3).
    pub trt_builder_optimization_level: Option<u8>,
    /// I/O binding with reusable host buffers: `None` = on for GPU providers, off on the CPU.
    pub io_binding: Option<bool>,
    /// Whether idle intra-op threads spin before sleeping (`None`: ONNX Runtime's default, on).
    /// Spinning is fastest on an otherwise idle machine; turn it off where cores are shared.
    pub intra_op_spinning: Option<bool>,
}

impl Default for OnnxEncoderOptions {
    fn default() -> Self {
        Self {
            intra_threads: None,
            max_batch: DEFAULT_MAX_BATCH,
            opt_batch: None,
            trt_cache_dir: None,
            trt_fp16: false,
            trt_bf16: false,
            trt_builder_optimization_level: None,
            io_binding: None,
            intra_op_spinning: None,
        }
    }
}

/// What the export's metadata says about the model.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipModelInfo {
    /// Model name, when the export recorded one.
    pub model_name: Option<String>,
    /// Embedding width.
    pub embed_dim: usize,
    /// Image height and width.
    pub image_size: (usize, usize),
    /// Token positions per text.
    pub context_length: usize,
    /// Token ids must be below this.
    pub vocab_size: usize,
    /// Whether the models output L2-normalised embeddings.
    pub normalized: bool,
    /// `fp32` or `fp16`.
    pub precision: String,
    /// SHA-256 of the checkpoint the models were exported from.
    pub source_sha256: Option<String>,
    /// The open_clip model config (JSON).
    pub model_config: Option<String>,
    /// The checkpoint's `logit_scale` (log of the inverse temperature).
    pub logit_scale: Option<f32>,
}

/// One tower's session plus its reusable bound buffers.
struct Tower {
    session: ort::session::Session,
    path: PathBuf,
    input: &'static str,
    output: &'static str,
    /// Per-row input shape after the batch dimension.
    row_shape: Vec<usize>,
    /// I/O binding state, when used: (rows, input tensor, output tensor) of the last chunk size.
    bound: Option<Bound>,
    binding: Option<IoBinding>,
    host_device: Option<AllocationDevice<'static>>,
}

struct Bound {
    rows: usize,
    input: BoundInput,
    output: Tensor<f32>,
}

enum BoundInput {
    F32(Tensor<f32>),
    I64(Tensor<i64>),
}

/// Input data of one chunk.
enum Chunk<'a> {
    F32(&'a [f32]),
    I64(&'a [i64]),
}

/// CLIP's image and text encoders exported by `hq-export`, on ONNX Runtime.
pub struct OnnxClipEncoder {
    image: Tower,
    text: Tower,
    info: ClipModelInfo,
    transform: ImageTransform,
    provider: ExecutionProvider,
    dir: PathBuf,
    max_batch: usize,
    /// The model's Hugging Face tokenizer (CLIPA), copied into the export by `hq-export`.
    tokenizer: Option<std::sync::Arc<hq_data::text::TextTokenizer>>,
}

/// The Hugging Face tokenizer in `model_dir` when the exported model config names one (`None`:
/// the model reads open_clip's CLIP BPE).
fn model_tokenizer(
    model_config: Option<&str>,
    model_dir: &Path,
) -> hq_data::Result<Option<std::sync::Arc<hq_data::text::TextTokenizer>>> {
    let Some(json) = model_config else {
        return Ok(None);
    };
    let config: serde_json::Value = serde_json::from_str(json).map_err(|e| {
        hq_data::DataError::Tokenizer(format!("the model config in the metadata: {e}"))
    })?;
    let text_cfg = config.get("text_cfg").unwrap_or(&serde_json::Value::Null);
    let spec = hq_data::text::TokenizerSpec::from_text_cfg(text_cfg)?;
    if spec.hf_tokenizer_name.is_none() {
        return Ok(None);
    }
    let tokenizer = hq_data::text::TextTokenizer::for_model(&spec, Some(model_dir))?;
    Ok(Some(std::sync::Arc::new(tokenizer)))
}

impl std::fmt::Debug for OnnxClipEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnnxClipEncoder")
            .field("dir", &self.dir)
            .field("provider", &self.provider)
            .field("info", &self.info)
            .field("max_batch", &self.max_batch)
            .finish_non_exhaustive()
    }
}

fn create_err(
    model: &Path,
    provider: &ExecutionProvider,
    message: impl Into<String>,
) -> RuntimeError {
    RuntimeError::SessionCreate {
        model: model.display().to_string(),
        provider: provider.to_string(),
        message: message.into(),
    }
}

fn invalid(option: &'static str, message: impl Into<String>) -> RuntimeError {
    RuntimeError::InvalidOption {
        option,
        message: message.into(),
    }
}

fn cache_dir_string(dir: &Path) -> Result<String> {
    std::fs::create_dir_all(dir).map_err(|source| RuntimeError::Io {
        action: "creating the TensorRT cache folder",
        path: dir.to_path_buf(),
        source,
    })?;
    dir.to_str().map(str::to_owned).ok_or_else(|| {
        invalid(
            "trt_cache_dir",
            format!("`{}` is not valid UTF-8", dir.display()),
        )
    })
}

fn device_i32(device_id: u32) -> Result<i32> {
    i32::try_from(device_id)
        .map_err(|_| invalid("device_id", format!("{device_id} is out of range")))
}

/// The TensorRT profile for one model input: `name:1xROW`, `name:OPTxROW`, `name:MAXxROW`.
#[derive(Debug, Clone)]
struct Profile {
    input: &'static str,
    row_shape: Vec<usize>,
    opt: usize,
    max: usize,
}

impl Profile {
    fn shape(&self, batch: usize) -> String {
        let mut dims = vec![batch.to_string()];
        dims.extend(self.row_shape.iter().map(ToString::to_string));
        format!("{}:{}", self.input, dims.join("x"))
    }
}

fn dispatches(
    provider: &ExecutionProvider,
    options: &OnnxEncoderOptions,
    profile: &Profile,
) -> Result<Vec<(&'static str, ExecutionProviderDispatch)>> {
    let cuda = |device_id: u32| -> Result<ExecutionProviderDispatch> {
        Ok(CUDA::default()
            .with_device_id(device_i32(device_id)?)
            .build()
            .error_on_failure())
    };
    match provider {
        ExecutionProvider::Cpu => Ok(Vec::new()),
        ExecutionProvider::Cuda { device_id } => {
            Ok(vec![("CUDAExecutionProvider", cuda(*device_id)?)])
        }
        ExecutionProvider::TensorRt {
            device_id,
            cache_dir,
            fp16,
        } => {
            let mut trt = TensorRT::default()
                .with_device_id(device_i32(*device_id)?)
                .with_fp16(*fp16 || options.trt_fp16)
                .with_bf16(options.trt_bf16)
                .with_profile_min_shapes(profile.shape(1))
                .with_profile_opt_shapes(profile.shape(profile.opt))
                .with_profile_max_shapes(profile.shape(profile.max));
            if let Some(dir) = options.trt_cache_dir.as_ref().or(cache_dir.as_ref()) {
                let dir = cache_dir_string(dir)?;
                trt = trt
                    .with_engine_cache(true)
                    .with_engine_cache_path(&dir)
                    .with_timing_cache(true)
                    .with_timing_cache_path(&dir);
            }
            if let Some(level) = options.trt_builder_optimization_level {
                if level > 5 {
                    return Err(invalid(
                        "trt_builder_optimization_level",
                        format!("{level} is not in 0..=5"),
                    ));
                }
                trt = trt.with_builder_optimization_level(level);
            }
            Ok(vec![
                ("TensorrtExecutionProvider", trt.build().error_on_failure()),
                ("CUDAExecutionProvider", cuda(*device_id)?),
            ])
        }
    }
}

fn build_session(
    rt: &Runtime,
    path: &Path,
    provider: &ExecutionProvider,
    options: &OnnxEncoderOptions,
    profile: &Profile,
    metadata_only: bool,
) -> Result<ort::session::Session> {
    if !path.is_file() {
        return Err(create_err(
            path,
            provider,
            "no such model file (export one with `hq-export --format onnx`)",
        ));
    }
    let mut b = ort::session::Session::builder(&rt.env)
        .map_err(|e| create_err(path, provider, e.to_string()))?;
    if metadata_only {
        // Only the metadata is read: skip graph optimisation and use one thread.
        b = b
            .with_optimization_level(ort::session::builder::GraphOptimizationLevel::Disable)
            .map_err(|e| create_err(path, provider, e.to_string()))?
            .with_intra_threads(1)
            .map_err(|e| create_err(path, provider, e.to_string()))?;
    } else {
        // All of ONNX Runtime's graph optimisations (its default, stated so it stays so): the
        // export is written for its fusions (MatMul + Add -> Gemm on token rows, the erf GELU ->
        // Gelu, LayerNormalization kept as one op).
        b = b
            .with_optimization_level(ort::session::builder::GraphOptimizationLevel::All)
            .map_err(|e| create_err(path, provider, e.to_string()))?;
        if let Some(n) = options.intra_threads {
            b = b
                .with_intra_threads(n)
                .map_err(|e| create_err(path, provider, e.to_string()))?;
        }
        if let Some(spin) = options.intra_op_spinning {
            b = b
                .with_intra_op_spinning(spin)
                .map_err(|e| create_err(path, provider, e.to_string()))?;
        }
    }
    if provider.is_gpu() {
        for name in provider.ort_names() {
            if !crate::provider::ep_available(name)? {
                return Err(RuntimeError::ProviderUnavailable {
                    provider: name,
                    requested: provider.to_string(),
                    dylib: rt.dylib().to_path_buf(),
                    available: rt.available_providers()?.join(", "),
                });
            }
        }
        for (name, dispatch) in dispatches(provider, options, profile)? {
            b = b.with_execution_providers([dispatch]).map_err(|e| {
                RuntimeError::ProviderRegistration {
                    provider: name,
                    requested: provider.to_string(),
                    message: e.to_string(),
                }
            })?;
        }
    }
    b.commit_from_file(path)
        .map_err(|e| create_err(path, provider, e.to_string()))
}

/// Reads a metadata value; `None` when absent.
fn meta(session: &ort::session::Session, path: &Path, key: &str) -> Result<Option<String>> {
    let md = session.metadata().map_err(|e| RuntimeError::Run {
        model: path.display().to_string(),
        message: format!("reading metadata: {e}"),
    })?;
    Ok(md.custom(key))
}

/// The image preprocessing the export states (`hq_clip.image_mean`, `.image_std`,
/// `.resize_mode`); CLIP's where a key is missing (exports older than the keys).
fn read_preprocess(session: &ort::session::Session, path: &Path) -> Result<Preprocess> {
    let bad = |key: &str, v: &str| RuntimeError::Run {
        model: path.display().to_string(),
        message: format!("metadata {key} = {v:?}: expected 3 comma-separated positive numbers"),
    };
    let three = |key: &str| -> Result<Option<[f64; 3]>> {
        let Some(v) = meta(session, path, key)? else {
            return Ok(None);
        };
        let xs: Vec<f64> = v
            .split(',')
            .map(|x| x.trim().parse::<f64>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| bad(key, &v))?;
        match xs[..] {
            [a, b, c] if xs.iter().all(|x| x.is_finite()) => Ok(Some([a, b, c])),
            _ => Err(bad(key, &v)),
        }
    };
    let mut p = Preprocess::default();
    if let Some(m) = three(keys::IMAGE_MEAN)? {
        p.mean = m;
    }
    if let Some(s) = three(keys::IMAGE_STD)? {
        if s.iter().any(|&x| x <= 0.0) {
            return Err(bad(keys::IMAGE_STD, &format!("{s:?}")));
        }
        p.std = s;
    }
    p.squash = match meta(session, path, keys::RESIZE_MODE)?.as_deref() {
        None | Some("shortest") => false,
        Some("squash") => true,
        Some(other) => {
            return Err(RuntimeError::Run {
                model: path.display().to_string(),
                message: format!(
                    "metadata {} = {other:?}: expected shortest or squash",
                    keys::RESIZE_MODE
                ),
            })
        }
    };
    Ok(p)
}

fn meta_required(
    session: &ort::session::Session,
    path: &Path,
    provider: &ExecutionProvider,
    key: &str,
) -> Result<String> {
    meta(session, path, key)?.ok_or_else(|| {
        create_err(
            path,
            provider,
            format!(
                "metadata `{key}` is missing: not a model written by `hq-export --format onnx`"
            ),
        )
    })
}

fn meta_usize(
    session: &ort::session::Session,
    path: &Path,
    provider: &ExecutionProvider,
    key: &str,
) -> Result<usize> {
    let v = meta_required(session, path, provider, key)?;
    v.trim()
        .parse::<usize>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| {
            create_err(
                path,
                provider,
                format!("metadata `{key}` = {v:?} is not a positive integer"),
            )
        })
}

/// Checks a session's single input and output against what the metadata implies.
fn check_io(
    session: &ort::session::Session,
    path: &Path,
    provider: &ExecutionProvider,
    input: (&str, TensorElementType, &[usize]),
    output: (&str, usize),
) -> Result<()> {
    let describe = |o: &ort::value::Outlet| format!("{} {:?}", o.name(), o.dtype());
    let inputs = session.inputs();
    let Some(i) = inputs.iter().find(|o| o.name() == input.0) else {
        return Err(create_err(
            path,
            provider,
            format!(
                "no input `{}` (inputs: {:?})",
                input.0,
                inputs.iter().map(describe).collect::<Vec<_>>()
            ),
        ));
    };
    if inputs.len() != 1 {
        return Err(create_err(
            path,
            provider,
            format!(
                "expected one input, found {:?}",
                inputs.iter().map(describe).collect::<Vec<_>>()
            ),
        ));
    }
    let tensor_dims = |o: &ort::value::Outlet| -> Option<(TensorElementType, Vec<i64>)> {
        match o.dtype() {
            ValueType::Tensor { ty, shape, .. } => Some((*ty, shape.iter().copied().collect())),
            _ => None,
        }
    };
    let mut want: Vec<i64> = vec![-1];
    want.extend(input.2.iter().map(|&d| d as i64));
    match tensor_dims(i) {
        Some((ty, dims))
            if ty == input.1
                && dims.len() == want.len()
                && dims[1..] == want[1..]
                && dims[0] < 0 => {}
        _ => {
            return Err(create_err(
                path,
                provider,
                format!(
                    "input `{}` is {}, expected {:?} with dims {want:?} (-1 = dynamic batch)",
                    input.0,
                    describe(i),
                    input.1
                ),
            ))
        }
    }
    let outputs = session.outputs();
    let Some(o) = outputs.iter().find(|o| o.name() == output.0) else {
        return Err(create_err(
            path,
            provider,
            format!(
                "no output `{}` (outputs: {:?})",
                output.0,
                outputs.iter().map(describe).collect::<Vec<_>>()
            ),
        ));
    };
    match tensor_dims(o) {
        Some((TensorElementType::Float32, dims))
            if dims.len() == 2 && dims[1] == output.1 as i64 =>
        {
            Ok(())
        }
        _ => Err(create_err(
            path,
            provider,
            format!(
                "output `{}` is {}, expected Float32 [batch, {}]",
                output.0,
                describe(o),
                output.1
            ),
        )),
    }
}

impl Tower {
    fn new(
        session: ort::session::Session,
        path: PathBuf,
        input: &'static str,
        output: &'static str,
        row_shape: Vec<usize>,
        provider: &ExecutionProvider,
        io_binding: bool,
    ) -> Result<Self> {
        let (binding, host_device) = if io_binding {
            let binding = session.create_binding().map_err(|e| {
                create_err(&path, provider, format!("creating an I/O binding: {e}"))
            })?;
            let device = if provider.is_gpu() {
                AllocationDevice::CUDA_PINNED
            } else {
                AllocationDevice::CPU
            };
            (Some(binding), Some(device))
        } else {
            (None, None)
        };
        Ok(Self {
            session,
            path,
            input,
            output,
            row_shape,
            bound: None,
            binding,
            host_device,
        })
    }

    fn run_err(&self, message: impl std::fmt::Display) -> RuntimeError {
        RuntimeError::Run {
            model: self.path.display().to_string(),
            message: message.to_string(),
        }
    }

    fn shape(&self, rows: usize) -> Vec<usize> {
        let mut s = vec![rows];
        s.extend_from_slice(&self.row_shape);
        s
    }

    /// Runs one chunk of `rows` rows and appends `rows * width` values to `out`.
    fn run_chunk(
        &mut self,
        chunk: Chunk<'_>,
        rows: usize,
        width: usize,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        if self.binding.is_some() {
            return self.run_bound(chunk, rows, width, out);
        }
        let shape = self.shape(rows);
        let value: SessionInputValue<'_> = match chunk {
            Chunk::F32(data) => TensorRef::from_array_view((shape, data))
                .map_err(|e| RuntimeError::Input {
                    name: self.input.to_string(),
                    message: e.to_string(),
                })?
                .into(),
            Chunk::I64(data) => TensorRef::from_array_view((shape, data))
                .map_err(|e| RuntimeError::Input {
                    name: self.input.to_string(),
                    message: e.to_string(),
                })?
                .into(),
        };
        let feed: Vec<(Cow<'_, str>, SessionInputValue<'_>)> =
            vec![(Cow::Borrowed(self.input), value)];
        let path = self.path.display().to_string();
        let output_name = self.output;
        let outputs = self.session.run(feed).map_err(|e| RuntimeError::Run {
            model: path,
            message: e.to_string(),
        })?;
        let value = outputs
            .get(output_name)
            .ok_or_else(|| RuntimeError::MissingOutput {
                name: output_name.to_string(),
                available: outputs.keys().map(ToString::to_string).collect(),
            })?;
        let (shape, data) =
            value
                .try_extract_tensor::<f32>()
                .map_err(|e| RuntimeError::Output {
                    name: output_name.to_string(),
                    message: e.to_string(),
                })?;
        let dims: Vec<i64> = shape.iter().copied().collect();
        if dims != [rows as i64, width as i64] {
            return Err(RuntimeError::Output {
                name: output_name.to_string(),
                message: format!("shape {dims:?}, expected [{rows}, {width}]"),
            });
        }
        out.extend_from_slice(data);
        Ok(())
    }

    /// The I/O-bound path: the chunk is copied into a (pinned) host tensor that is bound once per
    /// chunk size, and the output is written by ONNX Runtime into a bound host tensor.
    fn run_bound(
        &mut self,
        chunk: Chunk<'_>,
        rows: usize,
        width: usize,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let device = self.host_device.clone().unwrap_or(AllocationDevice::CPU);
        if self.bound.as_ref().is_none_or(|b| b.rows != rows) {
            let input_info = MemoryInfo::new(
                device.clone(),
                0,
                AllocatorType::Device,
                MemoryType::CPUInput,
            )
            .map_err(|e| self.run_err(format!("input memory info: {e}")))?;
            let output_info = MemoryInfo::new(
                device.clone(),
                0,
                AllocatorType::Device,
                MemoryType::CPUOutput,
            )
            .map_err(|e| self.run_err(format!("output memory info: {e}")))?;
            // Page-locked buffers come from the CUDA provider's pinned allocator; if the session has
            // none (an ONNX Runtime build without it), plain host memory works the same, only the
            // copies are staged by the driver.
            let pinned = |info: MemoryInfo| -> Allocator {
                if device == AllocationDevice::CPU {
                    return Allocator::default();
                }
                Allocator::new(&self.session, info).unwrap_or_default()
            };
            let (in_alloc, out_alloc) = (pinned(input_info), pinned(output_info));
            let shape = self.shape(rows);
            let input = match chunk {
                Chunk::F32(_) => BoundInput::F32(
                    Tensor::<f32>::new(&in_alloc, shape)
                        .map_err(|e| self.run_err(format!("allocating the input: {e}")))?,
                ),
                Chunk::I64(_) => BoundInput::I64(
                    Tensor::<i64>::new(&in_alloc, shape)
                        .map_err(|e| self.run_err(format!("allocating the input: {e}")))?,
                ),
            };
            let output = Tensor::<f32>::new(&out_alloc, [rows, width])
                .map_err(|e| self.run_err(format!("allocating the output: {e}")))?;
            self.bound = Some(Bound {
                rows,
                input,
                output,
            });
        }
        let (Some(bound), Some(binding)) = (self.bound.as_mut(), self.binding.as_mut()) else {
            return Err(RuntimeError::Run {
                model: self.path.display().to_string(),
                message: "I/O binding was not set up".into(),
            });
        };
        let path = self.path.display().to_string();
        let err = |m: String| RuntimeError::Run {
            model: path.clone(),
            message: m,
        };
        match (&mut bound.input, chunk) {
            (BoundInput::F32(t), Chunk::F32(data)) => {
                let (_, dst) = t.extract_tensor_mut();
                dst.copy_from_slice(data);
                binding
                    .bind_input(self.input, &*t)
                    .map_err(|e| err(format!("binding the input: {e}")))?;
            }
            (BoundInput::I64(t), Chunk::I64(data)) => {
                let (_, dst) = t.extract_tensor_mut();
                dst.copy_from_slice(data);
                binding
                    .bind_input(self.input, &*t)
                    .map_err(|e| err(format!("binding the input: {e}")))?;
            }
            _ => return Err(err("input element type changed between calls".into())),
        }
        binding
            .bind_output(self.output, &mut bound.output)
            .map_err(|e| err(format!("binding the output: {e}")))?;
        let outputs = self
            .session
            .run_binding(binding)
            .map_err(|e| err(e.to_string()))?;
        drop(outputs);
        let (shape, data) = bound.output.extract_tensor();
        let dims: Vec<i64> = shape.iter().copied().collect();
        if dims != [rows as i64, width as i64] {
            return Err(RuntimeError::Output {
                name: self.output.to_string(),
                message: format!("shape {dims:?}, expected [{rows}, {width}]"),
            });
        }
        out.extend_from_slice(data);
        Ok(())
    }
}

impl OnnxClipEncoder {
    /// Loads `model_dir/image_encoder.onnx` and `model_dir/text_encoder.onnx` on `provider`,
    /// initialising ONNX Runtime from `ORT_DYLIB_PATH` if needed.
    pub fn load(
        model_dir: &Path,
        provider: &ExecutionProvider,
        options: &OnnxEncoderOptions,
    ) -> Result<Self> {
        let rt = init()?;
        Self::load_with(rt, model_dir, provider, options)
    }

    /// [`Self::load`] with an explicitly initialised runtime.
    pub fn load_with(
        rt: &Runtime,
        model_dir: &Path,
        provider: &ExecutionProvider,
        options: &OnnxEncoderOptions,
    ) -> Result<Self> {
        if options.max_batch == 0 {
            return Err(invalid("max_batch", "must be at least 1"));
        }
        let opt = options.opt_batch.unwrap_or(options.max_batch);
        if opt == 0 || opt > options.max_batch {
            return Err(invalid(
                "opt_batch",
                format!("{opt} must lie in 1..={}", options.max_batch),
            ));
        }
        if options.trt_fp16 && options.trt_bf16 {
            return Err(invalid("trt_fp16/trt_bf16", "choose one of fp16 and bf16"));
        }
        if !model_dir.is_dir() {
            return Err(create_err(model_dir, provider, "no such export directory"));
        }
        let image_path = model_dir.join(IMAGE_MODEL_FILE);
        let text_path = model_dir.join(TEXT_MODEL_FILE);
        // Sizes come from the image model's metadata. TensorRT needs them for its profile before
        // the real session exists, so for TensorRT they are read from a cheap CPU session of the
        // same file (no graph optimisation); other providers read them from the real session.
        let probe_profile = Profile {
            input: IMAGE_INPUT,
            row_shape: Vec::new(),
            opt: 1,
            max: 1,
        };
        let read_sizes = |session: &ort::session::Session| -> Result<(usize, usize, usize, usize)> {
            Ok((
                meta_usize(session, &image_path, provider, keys::EMBED_DIM)?,
                meta_usize(session, &image_path, provider, keys::IMAGE_HEIGHT)?,
                meta_usize(session, &image_path, provider, keys::IMAGE_WIDTH)?,
                meta_usize(session, &image_path, provider, keys::CONTEXT_LENGTH)?,
            ))
        };
        let image_profile = |h: usize, w: usize| Profile {
            input: IMAGE_INPUT,
            row_shape: vec![3, h, w],
            opt,
            max: options.max_batch,
        };
        let (image_session, (embed_dim, h, w, ctx)) =
            if matches!(provider, ExecutionProvider::TensorRt { .. }) {
                let probe = build_session(
                    rt,
                    &image_path,
                    &ExecutionProvider::Cpu,
                    options,
                    &probe_profile,
                    true,
                )?;
                let sizes = read_sizes(&probe)?;
                drop(probe);
                let session = build_session(
                    rt,
                    &image_path,
                    provider,
                    options,
                    &image_profile(sizes.1, sizes.2),
                    false,
                )?;
                (session, sizes)
            } else {
                let session =
                    build_session(rt, &image_path, provider, options, &probe_profile, false)?;
                let sizes = read_sizes(&session)?;
                (session, sizes)
            };
        let image_row = vec![3, h, w];
        let text_row = vec![ctx];
        let text_session = build_session(
            rt,
            &text_path,
            provider,
            options,
            &Profile {
                input: TEXT_INPUT,
                row_shape: text_row.clone(),
                opt,
                max: options.max_batch,
            },
            false,
        )?;
        check_io(
            &image_session,
            &image_path,
            provider,
            (IMAGE_INPUT, TensorElementType::Float32, &image_row),
            (IMAGE_OUTPUT, embed_dim),
        )?;
        check_io(
            &text_session,
            &text_path,
            provider,
            (TEXT_INPUT, TensorElementType::Int64, &text_row),
            (TEXT_OUTPUT, embed_dim),
        )?;
        // Both files must come from the same export.
        for key in [
            keys::SOURCE_SHA256,
            keys::EMBED_DIM,
            keys::CONTEXT_LENGTH,
            keys::PRECISION,
            keys::NORMALIZED,
        ] {
            let a = meta(&image_session, &image_path, key)?;
            let b = meta(&text_session, &text_path, key)?;
            if a != b {
                return Err(create_err(
                    &text_path,
                    provider,
                    format!(
                        "metadata `{key}` is {b:?} here but {a:?} in {}: the two models are from different exports",
                        image_path.display()
                    ),
                ));
            }
        }
        let info = ClipModelInfo {
            model_name: meta(&image_session, &image_path, keys::MODEL_NAME)?,
            embed_dim,
            image_size: (h, w),
            context_length: ctx,
            vocab_size: meta_usize(&text_session, &text_path, provider, keys::VOCAB_SIZE)?,
            normalized: meta(&image_session, &image_path, keys::NORMALIZED)?.as_deref()
                == Some("true"),
            precision: meta(&image_session, &image_path, keys::PRECISION)?
                .unwrap_or_else(|| "fp32".into()),
            source_sha256: meta(&image_session, &image_path, keys::SOURCE_SHA256)?,
            model_config: meta(&image_session, &image_path, keys::MODEL_CONFIG)?,
            logit_scale: meta(&image_session, &image_path, keys::LOGIT_SCALE)?
                .and_then(|s| s.parse().ok()),
        };
        let preprocess = read_preprocess(&image_session, &image_path)?;
        let kind = match preprocess.squash {
            true => TransformKind::EvalSquash,
            false => TransformKind::Eval,
        };
        let transform = ImageTransform::new(kind, h as u32, w as u32)
            .map_err(|e| create_err(&image_path, provider, format!("image size {h}x{w}: {e}")))?
            .with_normalization(preprocess.mean, preprocess.std);
        let io_binding = options.io_binding.unwrap_or(provider.is_gpu());
        let tokenizer = model_tokenizer(info.model_config.as_deref(), model_dir)
            .map_err(|e| create_err(model_dir, provider, e.to_string()))?;
        Ok(Self {
            image: Tower::new(
                image_session,
                image_path,
                IMAGE_INPUT,
                IMAGE_OUTPUT,
                image_row,
                provider,
                io_binding,
            )?,
            text: Tower::new(
                text_session,
                text_path,
                TEXT_INPUT,
                TEXT_OUTPUT,
                text_row,
                provider,
                io_binding,
            )?,
            info,
            transform,
            provider: provider.clone(),
            dir: model_dir.to_path_buf(),
            max_batch: options.max_batch,
            tokenizer,
        })
    }

    /// What the export's metadata says.
    pub fn info(&self) -> &ClipModelInfo {
        &self.info
    }

    /// Whether the models output L2-normalised embeddings.
    pub fn normalized(&self) -> bool {
        self.info.normalized
    }

    /// The provider the sessions run on.
    pub fn provider(&self) -> &ExecutionProvider {
        &self.provider
    }

    /// The export directory.
    pub fn model_dir(&self) -> &Path {
        &self.dir
    }

    /// Embeds `n` preprocessed images (`n * 3 * H * W` floats, CHW each): `n * embed_dim` floats.
    pub fn embed_images(&mut self, pixels: &[f32], n: usize) -> Result<Vec<f32>> {
        let (h, w) = self.info.image_size;
        let row = 3 * h * w;
        if pixels.len() != n * row {
            return Err(RuntimeError::ShapeMismatch {
                name: IMAGE_INPUT.into(),
                expected: format!("{n} images of 3x{h}x{w} = {} floats", n * row),
                actual: vec![pixels.len()],
            });
        }
        let d = self.info.embed_dim;
        let mut out = Vec::with_capacity(n * d);
        for (chunk, start) in pixels
            .chunks(self.max_batch * row)
            .zip((0..n).step_by(self.max_batch))
        {
            let rows = (n - start).min(self.max_batch);
            self.image.run_chunk(Chunk::F32(chunk), rows, d, &mut out)?;
        }
        Ok(out)
    }

    /// Embeds `n` tokenised texts (`n * context_length` ids): `n * embed_dim` floats.
    pub fn embed_texts(&mut self, tokens: &[i64], n: usize) -> Result<Vec<f32>> {
        let ctx = self.info.context_length;
        if tokens.len() != n * ctx {
            return Err(RuntimeError::ShapeMismatch {
                name: TEXT_INPUT.into(),
                expected: format!("{n} texts of {ctx} tokens = {} ids", n * ctx),
                actual: vec![tokens.len()],
            });
        }
        let vocab = self.info.vocab_size as i64;
        if let Some((i, id)) = tokens
            .iter()
            .enumerate()
            .find(|(_, &t)| t < 0 || t >= vocab)
        {
            return Err(RuntimeError::Input {
                name: TEXT_INPUT.into(),
                message: format!(
                    "token id {id} (text {}, position {}) is outside the vocabulary [0, {vocab})",
                    i / ctx,
                    i % ctx
                ),
            });
        }
        let d = self.info.embed_dim;
        let mut out = Vec::with_capacity(n * d);
        for (chunk, start) in tokens
            .chunks(self.max_batch * ctx)
            .zip((0..n).step_by(self.max_batch))
        {
            let rows = (n - start).min(self.max_batch);
            self.text.run_chunk(Chunk::I64(chunk), rows, d, &mut out)?;
        }
        Ok(out)
    }
}

impl Encoder for OnnxClipEncoder {
    fn describe(&self) -> String {
        format!(
            "onnx {} {} ({}, {})",
            self.provider,
            self.info.model_name.as_deref().unwrap_or("clip"),
            self.info.precision,
            self.dir.display()
        )
    }

    fn image_transform(&self) -> ImageTransform {
        self.transform.clone()
    }

    fn context_length(&self) -> usize {
        self.info.context_length
    }

    fn embed_dim(&self) -> usize {
        self.info.embed_dim
    }

    fn text_tokenizer(&self) -> Option<std::sync::Arc<hq_data::text::TextTokenizer>> {
        self.tokenizer.clone()
    }

    fn encode_images(
        &mut self,
        pixels: &[f32],
        n: usize,
    ) -> std::result::Result<Vec<f32>, EncodeError> {
        self.embed_images(pixels, n)
            .map_err(|e| EncodeError::new("onnx", e))
    }

    fn encode_texts(
        &mut self,
        tokens: &[i64],
        n: usize,
    ) -> std::result::Result<Vec<f32>, EncodeError> {
        self.embed_texts(tokens, n)
            .map_err(|e| EncodeError::new("onnx", e))
    }
}

/// The `metadata_props` keys `hq-export` writes (mirrors `hq_export::clip::meta`; the export tests
/// load exported models through this encoder, so the two cannot drift apart unnoticed).
pub mod keys {
    /// Output width.
    pub const EMBED_DIM: &str = "hq_clip.embed_dim";
    /// Image height.
    pub const IMAGE_HEIGHT: &str = "hq_clip.image_height";
    /// Image width.
    pub const IMAGE_WIDTH: &str = "hq_clip.image_width";
    /// Per-channel mean of the normalisation, comma-separated.
    pub const IMAGE_MEAN: &str = "hq_clip.image_mean";
    /// Per-channel standard deviation of the normalisation, comma-separated.
    pub const IMAGE_STD: &str = "hq_clip.image_std";
    /// `shortest` (resize and centre crop) or `squash` (CLIPA).
    pub const RESIZE_MODE: &str = "hq_clip.resize_mode";
    /// Token positions per text.
    pub const CONTEXT_LENGTH: &str = "hq_clip.context_length";
    /// Vocabulary size.
    pub const VOCAB_SIZE: &str = "hq_clip.vocab_size";
    /// `true` when outputs are L2-normalised.
    pub const NORMALIZED: &str = "hq_clip.normalized";
    /// `fp32` / `fp16`.
    pub const PRECISION: &str = "hq_clip.precision";
    /// Model name.
    pub const MODEL_NAME: &str = "hq_clip.model_name";
    /// Source checkpoint SHA-256.
    pub const SOURCE_SHA256: &str = "hq_clip.source_sha256";
    /// open_clip model config JSON.
    pub const MODEL_CONFIG: &str = "hq_clip.model_config";
    /// The checkpoint's logit scale.
    pub const LOGIT_SCALE: &str = "hq_clip.logit_scale";
}

#[cfg(test)]
mod tests {
    use super::model_tokenizer;

    /// The export's model config decides: no `hf_tokenizer_name`, CLIP BPE (`None`); one named,
    /// the export folder must hold its `tokenizer.json`, and the error says so when it does not.
    #[test]
    fn the_exported_config_decides_the_tokenizer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let clip = r#"{"embed_dim": 8, "text_cfg": {"context_length": 16}}"#;
        assert!(model_tokenizer(Some(clip), dir.path())
            .expect("clip")
            .is_none());
        assert!(model_tokenizer(None, dir.path()).expect("none").is_none());
        let clipa = r#"{"text_cfg": {"context_length": 32, "hf_tokenizer_name": "bert-base-uncased",
                        "tokenizer_kwargs": {"strip_sep_token": true}}}"#;
        let e = model_tokenizer(Some(clipa), dir.path()).expect_err("no tokenizer.json");
        assert!(e.to_string().contains("no tokenizer.json"), "{e}");
    }
}
