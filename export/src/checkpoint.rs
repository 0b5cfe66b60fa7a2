//! Reading a CLIP checkpoint for export: safetensors under open_clip's state-dict names plus its
//! open_clip model config, checked tensor by tensor against what the config implies.
//!
//! A safetensors file is read with the `safetensors` crate; a `torch.save` zip (`.bin`, `.pt`, as in
//! open_clip's Hugging Face folders) through hq-train's pickle reader, which runs no pickle code. Every tensor becomes f32 (f16, bf16 and f64 checkpoints are converted exactly or by
//! rounding to nearest); integer or boolean tensors are refused by name, but for BatchNorm's int64
//! `num_batches_tracked` counters (a ResNet's state, read as f32 and unused by the graphs). A checkpoint saved from a
//! DistributedDataParallel wrapper (every key starting with `module.`) is read with the prefix
//! stripped, as `hq-train` and open_clip do.
//!
//! [`Checkpoint::validate`] is strict like `load_state_dict(strict=True)`: every tensor the config
//! implies must be present with its exact shape and nothing else may be in the file; one error
//! lists every missing, unexpected and misshaped tensor by name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use hq_train::model::{ClipConfig, TextProjType};
use sha2::{Digest, Sha256};

use crate::error::{ExportError, Result};
use crate::tensor::f16_bits_to_f32;

/// File names inside an `hq-train` checkpoint directory (`step-*/`).
pub const CHECKPOINT_MODEL_FILE: &str = "model.safetensors";
/// The model config next to the weights in an `hq-train` checkpoint directory.
pub const CHECKPOINT_CONFIG_FILE: &str = "model_config.json";
/// The file in an `hq-train` run directory that names the newest complete checkpoint.
pub const LATEST_FILE: &str = "latest";
/// safetensors `__metadata__` keys that may carry the model config JSON.
pub const CONFIG_METADATA_KEYS: &[&str] = &["model_config", "hq_clip.model_config"];

/// One tensor of the checkpoint, as f32.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Shape (row-major).
    pub shape: Vec<usize>,
    /// Values, converted to f32.
    pub data: Vec<f32>,
    /// The dtype in the file (`F32`, `F16`, `BF16`, `F64`).
    pub stored_dtype: String,
}

/// A checkpoint's tensors (f32) plus where they came from.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The safetensors file.
    pub path: PathBuf,
    /// SHA-256 of the file's bytes, lower-case hex.
    pub sha256: String,
    /// Tensors by open_clip name (DDP prefix removed).
    pub tensors: BTreeMap<String, Tensor>,
    /// The file's `__metadata__` map (empty if none).
    pub metadata: BTreeMap<String, String>,
}

fn ckpt_err(path: &Path, message: impl Into<String>) -> ExportError {
    ExportError::Checkpoint {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut s = String::with_capacity(64);
    for b in digest.iter() {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// BatchNorm's `num_batches_tracked` (int64 in every PyTorch state dict with BatchNorm).
fn is_batch_counter(name: &str) -> bool {
    name.ends_with(".num_batches_tracked")
}

fn convert(name: &str, view: &safetensors::tensor::TensorView<'_>, path: &Path) -> Result<Tensor> {
    use safetensors::Dtype;
    let bytes = view.data();
    let (dtype, data): (&str, Vec<f32>) = match view.dtype() {
        Dtype::F32 => (
            "F32",
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        Dtype::F16 => (
            "F16",
            bytes
                .chunks_exact(2)
                .map(|c| f16_bits_to_f32(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
        ),
        Dtype::BF16 => (
            "BF16",
            bytes
                .chunks_exact(2)
                .map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16))
                .collect(),
        ),
        Dtype::F64 => (
            "F64",
            bytes
                .chunks_exact(8)
                .map(|c| {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(c);
                    f64::from_le_bytes(a) as f32
                })
                .collect(),
        ),
        // A ResNet's BatchNorm counter: state, not a weight; read so the checkpoint validates
        // strictly, never used by the graph.
        Dtype::I64 if is_batch_counter(name) => (
            "I64",
            bytes
                .chunks_exact(8)
                .map(|c| {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(c);
                    i64::from_le_bytes(a) as f32
                })
                .collect(),
        ),
        other => {
            return Err(ckpt_err(
                path,
                format!(
                "tensor `{name}` has dtype {other:?}; only floating-point weights can be exported"
            ),
            ))
        }
    };
    let expected: usize = view.shape().iter().product();
    if data.len() != expected {
        return Err(ckpt_err(
            path,
            format!(
                "tensor `{name}` has shape {:?} but {} values",
                view.shape(),
                data.len()
            ),
        ));
    }
    Ok(Tensor {
        shape: view.shape().to_vec(),
        data,
        stored_dtype: dtype.to_string(),
    })
}

/// The tensors of a `torch.save` zip (`.bin`, `.pt`), read by hq-train's pickle reader that runs
/// no pickle code, as f32 (integer or boolean tensors refused by name).
fn read_torch(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    use tch::Kind;
    let tensors =
        hq_train::checkpoint::read_weights(path).map_err(|e| ckpt_err(path, e.to_string()))?;
    let mut out = BTreeMap::new();
    for (name, t) in tensors {
        let stored = match t.kind() {
            Kind::Float => "F32",
            Kind::Half => "F16",
            Kind::BFloat16 => "BF16",
            Kind::Double => "F64",
            Kind::Int64 if is_batch_counter(&name) => "I64",
            other => {
                return Err(ckpt_err(
                    path,
                    format!("tensor `{name}` is {other:?}, not a floating-point weight"),
                ))
            }
        };
        let shape = t.size().iter().map(|&d| d.max(0) as usize).collect();
        let data = Vec::<f32>::try_from(t.to_kind(Kind::Float).flatten(0, -1))
            .map_err(|e| ckpt_err(path, format!("tensor `{name}`: {e}")))?;
        out.insert(
            name,
            Tensor {
                shape,
                data,
                stored_dtype: stored.to_string(),
            },
        );
    }
    Ok(out)
}

impl Checkpoint {
    /// Reads every tensor of a safetensors file, or of a `torch.save` zip (`.bin`, `.pt`: told
    /// apart by content), as f32, and hashes the file.
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| ExportError::Io {
            action: "reading checkpoint",
            path: path.to_path_buf(),
            source: e,
        })?;
        let sha256 = sha256_hex(&bytes);
        if bytes.starts_with(b"PK\x03\x04") {
            drop(bytes);
            return Ok(Self {
                path: path.to_path_buf(),
                sha256,
                tensors: read_torch(path)?,
                metadata: BTreeMap::new(),
            });
        }
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| ckpt_err(path, format!("not a valid safetensors file: {e:?}")))?;
        let metadata = safetensors::SafeTensors::read_metadata(&bytes)
            .ok()
            .and_then(|(_, m)| m.metadata().clone())
            .map(|m| m.into_iter().collect())
            .unwrap_or_default();
        let names: Vec<String> = st.names().into_iter().cloned().collect();
        if names.is_empty() {
            return Err(ckpt_err(path, "holds no tensors"));
        }
        let strip = names.iter().all(|n| n.starts_with("module."));
        let mut tensors = BTreeMap::new();
        for name in names {
            let view = st
                .tensor(&name)
                .map_err(|e| ckpt_err(path, format!("tensor `{name}`: {e:?}")))?;
            let t = convert(&name, &view, path)?;
            let key = if strip {
                name.trim_start_matches("module.").to_string()
            } else {
                name
            };
            tensors.insert(key, t);
        }
        Ok(Self {
            path: path.to_path_buf(),
            sha256,
            tensors,
            metadata,
        })
    }

    /// The model config stored in the file's metadata, if any (see [`CONFIG_METADATA_KEYS`]).
    pub fn metadata_config(&self) -> Option<&str> {
        CONFIG_METADATA_KEYS
            .iter()
            .find_map(|k| self.metadata.get(*k).map(String::as_str))
    }

    /// The tensor called `name` (validated checkpoints have every expected tensor).
    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.tensors
            .get(name)
            .ok_or_else(|| ckpt_err(&self.path, format!("missing tensor `{name}`")))
    }

    /// Checks names and shapes against `cfg` (strict; see the module docs).
    pub fn validate(&self, cfg: &ClipConfig) -> Result<()> {
        let expected = expected_tensors(cfg);
        let mut missing = Vec::new();
        let mut wrong_shape = Vec::new();
        for (name, shape) in &expected {
            match self.tensors.get(name) {
                None => missing.push(name.clone()),
                Some(t) if &t.shape != shape => wrong_shape.push(format!(
                    "{name} (checkpoint {:?}, config {:?})",
                    t.shape, shape
                )),
                Some(t) => {
                    if let Some(i) = t.data.iter().position(|v| !v.is_finite()) {
                        return Err(ckpt_err(
                            &self.path,
                            format!(
                                "tensor `{name}` holds a non-finite value ({}) at flat index {i}",
                                t.data[i]
                            ),
                        ));
                    }
                }
            }
        }
        let unexpected: Vec<String> = self
            .tensors
            .keys()
            .filter(|k| !expected.iter().any(|(n, _)| n == *k))
            .cloned()
            .collect();
        if missing.is_empty() && unexpected.is_empty() && wrong_shape.is_empty() {
            return Ok(());
        }
        Err(ExportError::TensorMismatch {
            path: self.path.clone(),
            missing,
            unexpected,
            wrong_shape,
        })
    }
}

/// Where the weights and the config of a checkpoint argument are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointLocation {
    /// The safetensors file.
    pub weights: PathBuf,
    /// A `model_config.json` found next to it (an `hq-train` checkpoint directory), if any.
    pub config: Option<PathBuf>,
}

/// Resolves what the user passed as the checkpoint: a safetensors file, an `hq-train` checkpoint
/// directory (`model.safetensors` + `model_config.json`), a directory whose `latest` file names
/// the newest checkpoint directory, or an `hq-train` run directory (its `checkpoints/`).
pub fn locate(path: &Path) -> Result<CheckpointLocation> {
    if path.is_file() {
        let config = path.parent().and_then(|d| {
            [CHECKPOINT_CONFIG_FILE, OPEN_CLIP_HF_CONFIG_FILE]
                .iter()
                .map(|n| d.join(n))
                .find(|p| p.is_file())
        });
        return Ok(CheckpointLocation {
            weights: path.to_path_buf(),
            config,
        });
    }
    if path.is_dir() && path.join(OPEN_CLIP_HF_CONFIG_FILE).is_file() {
        // An open_clip Hugging Face folder: its config and its weights, safetensors first.
        if let Some(weights) = ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
            .iter()
            .map(|n| path.join(n))
            .find(|p| p.is_file())
        {
            return Ok(CheckpointLocation {
                weights,
                config: Some(path.join(OPEN_CLIP_HF_CONFIG_FILE)),
            });
        }
    }
    if path.is_dir() {
        let weights = path.join(CHECKPOINT_MODEL_FILE);
        if weights.is_file() {
            let config = Some(path.join(CHECKPOINT_CONFIG_FILE)).filter(|p| p.is_file());
            return Ok(CheckpointLocation { weights, config });
        }
        // An hq-train run directory keeps its checkpoints (and their `latest` file) under
        // `checkpoints/`.
        let run_checkpoints = path.join("checkpoints");
        if !path.join(LATEST_FILE).is_file() && run_checkpoints.join(LATEST_FILE).is_file() {
            return locate(&run_checkpoints);
        }
        let latest = path.join(LATEST_FILE);
        if latest.is_file() {
            let name = std::fs::read_to_string(&latest).map_err(|e| ExportError::Io {
                action: "reading",
                path: latest.clone(),
                source: e,
            })?;
            let dir = path.join(name.trim());
            if dir.join(CHECKPOINT_MODEL_FILE).is_file() {
                return locate(&dir);
            }
            return Err(ckpt_err(
                path,
                format!(
                    "`{}` names `{}`, which holds no {CHECKPOINT_MODEL_FILE}",
                    latest.display(),
                    dir.display()
                ),
            ));
        }
        return Err(ckpt_err(
            path,
            format!(
                "is a directory without {CHECKPOINT_MODEL_FILE} or a `{LATEST_FILE}` file; \
                 pass a safetensors file, an hq-train checkpoint directory or a run directory"
            ),
        ));
    }
    Err(ckpt_err(path, "no such file or directory"))
}

/// Every tensor open_clip's `CLIP` has for `cfg`, by state-dict name, with its shape (the same set
/// as `hq_train::model::Clip::state_dict`, computed without building the model).
pub fn expected_tensors(cfg: &ClipConfig) -> Vec<(String, Vec<usize>)> {
    let u = |v: i64| v.max(0) as usize;
    let mut out: Vec<(String, Vec<usize>)> = Vec::new();
    let scale_shape = if cfg.nonscalar_logit_scale {
        vec![1]
    } else {
        vec![]
    };
    out.push(("logit_scale".into(), scale_shape.clone()));
    if cfg.init_logit_bias.is_some() {
        out.push(("logit_bias".into(), scale_shape));
    }

    let block = |out: &mut Vec<(String, Vec<usize>)>, p: &str, w: usize, mlp: usize, ls: bool| {
        let mut add = |n: &str, s: Vec<usize>| out.push((format!("{p}.{n}"), s));
        add("ln_1.weight", vec![w]);
        add("ln_1.bias", vec![w]);
        add("attn.in_proj_weight", vec![3 * w, w]);
        add("attn.in_proj_bias", vec![3 * w]);
        add("attn.out_proj.weight", vec![w, w]);
        add("attn.out_proj.bias", vec![w]);
        if ls {
            add("ls_1.gamma", vec![w]);
        }
        add("ln_2.weight", vec![w]);
        add("ln_2.bias", vec![w]);
        add("mlp.c_fc.weight", vec![mlp, w]);
        add("mlp.c_fc.bias", vec![mlp]);
        add("mlp.c_proj.weight", vec![w, mlp]);
        add("mlp.c_proj.bias", vec![w]);
        if ls {
            add("ls_2.gamma", vec![w]);
        }
    };

    let v = &cfg.vision_cfg;
    let vw = u(v.width);
    let e = u(cfg.embed_dim);
    if let Some(blocks) = v.layers.resnet_blocks() {
        resnet_tensors(&mut out, blocks, vw, u(v.image_size.height()), e);
    } else {
        out.push(("visual.class_embedding".into(), vec![vw]));
        out.push((
            "visual.positional_embedding".into(),
            vec![u(v.num_positions()), vw],
        ));
        out.push(("visual.proj".into(), vec![vw, e]));
        out.push((
            "visual.conv1.weight".into(),
            vec![vw, 3, u(v.patch_size.height()), u(v.patch_size.width())],
        ));
        if !v.no_ln_pre {
            out.push(("visual.ln_pre.weight".into(), vec![vw]));
            out.push(("visual.ln_pre.bias".into(), vec![vw]));
        }
        for i in 0..u(v.layers.depth()) {
            block(
                &mut out,
                &format!("visual.transformer.resblocks.{i}"),
                vw,
                u(v.mlp_width()),
                v.ls_init_value.is_some(),
            );
        }
        out.push(("visual.ln_post.weight".into(), vec![vw]));
        out.push(("visual.ln_post.bias".into(), vec![vw]));
    }

    let t = &cfg.text_cfg;
    let tw = u(t.width);
    out.push(("positional_embedding".into(), vec![u(t.context_length), tw]));
    out.push(("token_embedding.weight".into(), vec![u(t.vocab_size), tw]));
    for i in 0..u(t.layers) {
        block(
            &mut out,
            &format!("transformer.resblocks.{i}"),
            tw,
            u(t.mlp_width()),
            t.ls_init_value.is_some(),
        );
    }
    out.push(("ln_final.weight".into(), vec![tw]));
    out.push(("ln_final.bias".into(), vec![tw]));
    match (t.proj_type, t.proj_bias) {
        (TextProjType::NoProjection, _) => {}
        (TextProjType::Linear, false) => out.push(("text_projection".into(), vec![tw, e])),
        (TextProjType::Linear, true) => {
            out.push(("text_projection.weight".into(), vec![e, tw]));
            out.push(("text_projection.bias".into(), vec![e]));
        }
    }
    out
}

/// open_clip's `ModifiedResNet` tensors (`visual.*`) for stage depths `blocks`, stem width `w`,
/// a square `image` side and embedding width `e`, in state-dict order.
fn resnet_tensors(
    out: &mut Vec<(String, Vec<usize>)>,
    blocks: &[i64],
    w: usize,
    image: usize,
    e: usize,
) {
    let bn = |out: &mut Vec<(String, Vec<usize>)>, p: &str, c: usize| {
        for n in ["weight", "bias", "running_mean", "running_var"] {
            out.push((format!("{p}.{n}"), vec![c]));
        }
        out.push((format!("{p}.num_batches_tracked"), vec![]));
    };
    let conv = |out: &mut Vec<(String, Vec<usize>)>, p: &str, o: usize, i: usize, k: usize| {
        out.push((format!("{p}.weight"), vec![o, i, k, k]));
    };
    let half = w / 2;
    for (i, (o, inp)) in [(half, 3), (half, half), (w, half)].into_iter().enumerate() {
        conv(out, &format!("visual.conv{}", i + 1), o, inp, 3);
        bn(out, &format!("visual.bn{}", i + 1), o);
    }
    let mut inplanes = w;
    for (s, &n) in blocks.iter().enumerate() {
        let planes = w << s;
        for b in 0..n.max(0) as usize {
            let p = format!("visual.layer{}.{b}", s + 1);
            conv(out, &format!("{p}.conv1"), planes, inplanes, 1);
            bn(out, &format!("{p}.bn1"), planes);
            conv(out, &format!("{p}.conv2"), planes, planes, 3);
            bn(out, &format!("{p}.bn2"), planes);
            conv(out, &format!("{p}.conv3"), planes * 4, planes, 1);
            bn(out, &format!("{p}.bn3"), planes * 4);
            if b == 0 && (s > 0 || inplanes != planes * 4) {
                conv(out, &format!("{p}.downsample.0"), planes * 4, inplanes, 1);
                bn(out, &format!("{p}.downsample.1"), planes * 4);
            }
            inplanes = planes * 4;
        }
    }
    let d = w * 32;
    let side = image / 32;
    out.push((
        "visual.attnpool.positional_embedding".into(),
        vec![side * side + 1, d],
    ));
    for (name, o) in [("k_proj", d), ("q_proj", d), ("v_proj", d), ("c_proj", e)] {
        out.push((format!("visual.attnpool.{name}.weight"), vec![o, d]));
        out.push((format!("visual.attnpool.{name}.bias"), vec![o]));
    }
}

/// The embedding width of the text tower's output (`embed_dim`, or the text width without a
/// projection).
pub fn text_output_dim(cfg: &ClipConfig) -> usize {
    match cfg.text_cfg.proj_type {
        TextProjType::NoProjection => cfg.text_cfg.width.max(0) as usize,
        TextProjType::Linear => cfg.embed_dim.max(0) as usize,
    }
}

/// Where the model config came from, for messages and metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    /// A JSON file.
    File(PathBuf),
    /// A built-in preset.
    Preset(String),
    /// The safetensors file's `__metadata__`.
    CheckpointMetadata,
}

impl ConfigSource {
    /// A model name derived from the source: the file stem, the preset name, or `None`.
    pub fn model_name(&self) -> Option<String> {
        match self {
            ConfigSource::File(p) => {
                let stem = p.file_stem()?.to_string_lossy().into_owned();
                // hq-train's checkpoint directories call every config `model_config.json`.
                (stem != "model_config").then_some(stem)
            }
            ConfigSource::Preset(n) => Some(n.clone()),
            ConfigSource::CheckpointMetadata => None,
        }
    }
}

/// open_clip's Hugging Face config file (`{"model_cfg": ..., "preprocess_cfg": ...}`).
pub const OPEN_CLIP_HF_CONFIG_FILE: &str = "open_clip_config.json";

/// Finds the model config: `given` (a JSON file or a preset name) if set, else the config next to
/// the checkpoint (`model_config.json`), else the checkpoint's metadata. An unknown preset, a bad
/// file or no config at all is an error saying what was tried.
pub fn resolve_config(
    given: Option<&str>,
    location: &CheckpointLocation,
    ckpt: &Checkpoint,
) -> Result<(ClipConfig, ConfigSource)> {
    let cfg_err = |e: hq_train::TrainError| ExportError::Config(e.to_string());
    if let Some(arg) = given {
        let path = Path::new(arg);
        if path.is_file() {
            let cfg = hq_train::checkpoint::read_file_config(path).map_err(cfg_err)?;
            return Ok((cfg, ConfigSource::File(path.to_path_buf())));
        }
        if hq_train::model::PRESET_NAMES.contains(&arg) {
            let cfg = ClipConfig::preset(arg).map_err(cfg_err)?;
            return Ok((cfg, ConfigSource::Preset(arg.to_string())));
        }
        return Err(ExportError::Config(format!(
            "{arg:?} is neither a model-config JSON file nor a preset (presets: {})",
            hq_train::model::PRESET_NAMES.join(", ")
        )));
    }
    if let Some(path) = &location.config {
        let cfg = hq_train::checkpoint::read_file_config(path).map_err(cfg_err)?;
        return Ok((cfg, ConfigSource::File(path.clone())));
    }
    if let Some(json) = ckpt.metadata_config() {
        let cfg = ClipConfig::from_json_str(json).map_err(cfg_err)?;
        return Ok((cfg, ConfigSource::CheckpointMetadata));
    }
    Err(ExportError::Config(format!(
        "no model config for `{}`: pass --config FILE|PRESET (no {CHECKPOINT_CONFIG_FILE} next to \
         it and no `model_config` in its safetensors metadata)",
        location.weights.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layouts `hq-train` writes: `RUN/checkpoints/latest` naming `RUN/checkpoints/step-N/`.
    #[test]
    fn locate_resolves_checkpoint_run_and_latest_directories() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let run = tmp.path().join("run");
        let step = run.join("checkpoints/step-00000150");
        std::fs::create_dir_all(&step).expect("mkdir");
        std::fs::write(step.join(CHECKPOINT_MODEL_FILE), b"x").expect("weights");
        std::fs::write(step.join(CHECKPOINT_CONFIG_FILE), b"{}").expect("config");
        std::fs::write(run.join("checkpoints").join(LATEST_FILE), "step-00000150\n")
            .expect("latest");
        for given in [run.clone(), run.join("checkpoints"), step.clone()] {
            let found = locate(&given).expect("located");
            assert_eq!(found.weights, step.join(CHECKPOINT_MODEL_FILE), "{given:?}");
            assert_eq!(found.config, Some(step.join(CHECKPOINT_CONFIG_FILE)));
        }
        let empty = tmp.path().join("empty");
        std::fs::create_dir_all(&empty).expect("mkdir");
        let err = locate(&empty).expect_err("no checkpoint").to_string();
        assert!(err.contains("run directory"), "{err}");
    }
}
