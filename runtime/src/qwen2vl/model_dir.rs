//! The model directory: the three ONNX files, the tokenizer and the configs, checked at start-up.
//!
//! Everything the engine needs from the configs is read here once, so a directory with a missing
//! file or an inconsistent config fails before any image is read, with a message naming the file.
//! Both config layouts are accepted: transformers 5 writes the language model's sizes under
//! `text_config`, the original Qwen2-VL checkpoints (and onnx-community's copies) at the top level.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Result, RuntimeError};

/// The ONNX files of the layout, relative to the model directory.
pub const VISION_ENCODER: &str = "onnx/vision_encoder.onnx";
/// Token embedding graph.
pub const EMBED_TOKENS: &str = "onnx/embed_tokens.onnx";
/// Decoder with key/value cache inputs and outputs.
pub const DECODER: &str = "onnx/decoder_model_merged.onnx";
/// Files the engine cannot start without.
pub const REQUIRED_FILES: &[&str] = &[
    VISION_ENCODER,
    EMBED_TOKENS,
    DECODER,
    "tokenizer.json",
    "config.json",
    "preprocessor_config.json",
];

/// The language model's shape and the special token ids (from `config.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Decoder layers (one key and one value cache input each).
    pub num_layers: usize,
    /// Key/value heads of the decoder's attention.
    pub num_key_value_heads: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Hidden width (embedding size).
    pub hidden_size: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// Vocabulary size (logits width).
    pub vocab_size: usize,
    /// `<|image_pad|>`.
    pub image_token_id: u32,
    /// `<|vision_start|>`.
    pub vision_start_token_id: u32,
    /// `<|vision_end|>`.
    pub vision_end_token_id: u32,
    /// Spatial merge of the vision tower (2): 2x2 patches become one language-model token.
    pub spatial_merge_size: usize,
    /// Vision patch side (14).
    pub patch_size: usize,
    /// Frames per temporal patch (2).
    pub temporal_patch_size: usize,
    /// Input channels (3).
    pub in_channels: usize,
}

impl ModelConfig {
    /// Values of one flattened patch: channels * temporal patch * patch * patch (1176).
    pub fn patch_dim(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }
}

/// The image processor's settings (from `preprocessor_config.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessConfig {
    /// Lower pixel budget of `smart_resize` (the processor's `min_pixels` / `shortest_edge`).
    pub min_pixels: u64,
    /// Upper pixel budget (`max_pixels` / `longest_edge`).
    pub max_pixels: u64,
    /// Per-channel mean.
    pub image_mean: [f64; 3],
    /// Per-channel standard deviation.
    pub image_std: [f64; 3],
    /// `rescale_factor` (1/255).
    pub rescale_factor: f64,
    /// Vision patch side.
    pub patch_size: usize,
    /// Merge size (resize factor = patch * merge = 28).
    pub merge_size: usize,
    /// Frames per temporal patch.
    pub temporal_patch_size: usize,
}

/// A checked model directory.
#[derive(Debug, Clone)]
pub struct ModelDir {
    /// The directory.
    pub root: PathBuf,
    /// Parsed `config.json`.
    pub config: ModelConfig,
    /// Parsed `preprocessor_config.json`.
    pub preprocess: PreprocessConfig,
    /// Token ids that end generation: `generation_config.json`'s `eos_token_id` (one id or a list),
    /// else the config's, plus `<|im_end|>` when the tokenizer has it.
    pub eos_token_ids: Vec<u32>,
    /// Id used to left-pad shorter prompts in a batch (`pad_token_id`, else the first eos id).
    pub pad_token_id: u32,
}

fn model_err(path: &Path, message: impl Into<String>) -> RuntimeError {
    RuntimeError::ModelDir {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).map_err(|e| model_err(path, format!("cannot read: {e}")))?;
    serde_json::from_str(&text).map_err(|e| model_err(path, format!("invalid JSON: {e}")))
}

/// Looks `key` up in `text_config` first, then at the top level (the two config layouts).
fn text_field<'a>(cfg: &'a Value, key: &str) -> Option<&'a Value> {
    cfg.get("text_config")
        .and_then(|t| t.get(key))
        .filter(|v| !v.is_null())
        .or_else(|| cfg.get(key).filter(|v| !v.is_null()))
}

fn usize_field(v: Option<&Value>, path: &Path, key: &str) -> Result<usize> {
    v.and_then(Value::as_u64)
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| {
            model_err(
                path,
                format!("`{key}` is missing or not a non-negative integer"),
            )
        })
}

fn ids_of(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .into_iter()
            .collect(),
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_u64)
            .filter_map(|n| u32::try_from(n).ok())
            .collect(),
        _ => Vec::new(),
    }
}

impl ModelDir {
    /// Checks that every required file exists and reads the configs.
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        if !root.exists() {
            return Err(model_err(
                &root,
                "does not exist (expected the folder written by export/qwen2vl/export_qwen2vl.py)",
            ));
        }
        if !root.is_dir() {
            return Err(model_err(
                &root,
                "not a directory (expected the folder written by export/qwen2vl/export_qwen2vl.py)",
            ));
        }
        let missing: Vec<&str> = REQUIRED_FILES
            .iter()
            .copied()
            .filter(|f| !root.join(f).is_file())
            .collect();
        if !missing.is_empty() {
            return Err(model_err(
                &root,
                format!(
                    "missing {} (a Qwen2-VL model directory holds {}; export one with export/qwen2vl/export_qwen2vl.py)",
                    missing.join(", "),
                    REQUIRED_FILES.join(", ")
                ),
            ));
        }
        let cfg_path = root.join("config.json");
        let cfg = read_json(&cfg_path)?;
        if let Some(mt) = cfg.get("model_type").and_then(Value::as_str) {
            if mt != "qwen2_vl" {
                return Err(model_err(
                    &cfg_path,
                    format!("model_type is `{mt}`, expected `qwen2_vl`"),
                ));
            }
        }
        let vision = cfg
            .get("vision_config")
            .ok_or_else(|| model_err(&cfg_path, "`vision_config` is missing"))?;
        let num_attention_heads = usize_field(
            text_field(&cfg, "num_attention_heads"),
            &cfg_path,
            "num_attention_heads",
        )?;
        let hidden_size = usize_field(text_field(&cfg, "hidden_size"), &cfg_path, "hidden_size")?;
        if num_attention_heads == 0 || hidden_size % num_attention_heads != 0 {
            return Err(model_err(&cfg_path, format!("hidden_size {hidden_size} is not a multiple of num_attention_heads {num_attention_heads}")));
        }
        let id = |key: &str| -> Result<u32> {
            cfg.get(key)
                .and_then(Value::as_u64)
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| model_err(&cfg_path, format!("`{key}` is missing")))
        };
        let vusize = |key: &str, default: usize| -> Result<usize> {
            match vision.get(key) {
                None | Some(Value::Null) => Ok(default),
                v => usize_field(v, &cfg_path, key),
            }
        };
        let config = ModelConfig {
            num_layers: usize_field(
                text_field(&cfg, "num_hidden_layers"),
                &cfg_path,
                "num_hidden_layers",
            )?,
            num_key_value_heads: usize_field(
                text_field(&cfg, "num_key_value_heads"),
                &cfg_path,
                "num_key_value_heads",
            )?,
            num_attention_heads,
            hidden_size,
            head_dim: hidden_size / num_attention_heads,
            vocab_size: usize_field(text_field(&cfg, "vocab_size"), &cfg_path, "vocab_size")?,
            image_token_id: id("image_token_id")?,
            vision_start_token_id: id("vision_start_token_id")?,
            vision_end_token_id: id("vision_end_token_id")?,
            spatial_merge_size: vusize("spatial_merge_size", 2)?,
            patch_size: vusize("patch_size", 14)?,
            temporal_patch_size: vusize("temporal_patch_size", 2)?,
            in_channels: vusize("in_channels", 3)?,
        };
        // A zero (or absurd) size would only fail later, deep in the engine or the image
        // processor (where the patch size is a divisor): say here which field is wrong.
        for (key, v, max) in [
            ("num_hidden_layers", config.num_layers, 1 << 12),
            ("num_key_value_heads", config.num_key_value_heads, 1 << 12),
            ("vocab_size", config.vocab_size, 1 << 24),
            ("vision_config.patch_size", config.patch_size, 1 << 10),
            (
                "vision_config.spatial_merge_size",
                config.spatial_merge_size,
                64,
            ),
            (
                "vision_config.temporal_patch_size",
                config.temporal_patch_size,
                64,
            ),
            ("vision_config.in_channels", config.in_channels, 64),
        ] {
            if v == 0 || v > max {
                return Err(model_err(
                    &cfg_path,
                    format!("`{key}` is {v}, expected 1 to {max}"),
                ));
            }
        }

        let pp_path = root.join("preprocessor_config.json");
        let pp = read_json(&pp_path)?;
        let size = pp.get("size");
        let pixels = |keys: &[&str], size_key: &str, default: u64| -> u64 {
            keys.iter()
                .find_map(|k| pp.get(*k).and_then(Value::as_u64))
                .or_else(|| size.and_then(|s| s.get(size_key)).and_then(Value::as_u64))
                .unwrap_or(default)
        };
        let triple = |key: &str, default: [f64; 3]| -> Result<[f64; 3]> {
            match pp.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(Value::Array(a)) if a.len() == 3 => {
                    let mut out = [0.0; 3];
                    for (o, v) in out.iter_mut().zip(a) {
                        *o = v.as_f64().ok_or_else(|| {
                            model_err(&pp_path, format!("`{key}` holds a non-number"))
                        })?;
                    }
                    Ok(out)
                }
                Some(_) => Err(model_err(
                    &pp_path,
                    format!("`{key}` must be a list of 3 numbers"),
                )),
            }
        };
        let preprocess = PreprocessConfig {
            min_pixels: pixels(&["min_pixels"], "shortest_edge", 56 * 56),
            max_pixels: pixels(&["max_pixels"], "longest_edge", 28 * 28 * 1280),
            image_mean: triple("image_mean", [0.481_454_66, 0.457_827_5, 0.408_210_73])?,
            image_std: triple("image_std", [0.268_629_54, 0.261_302_58, 0.275_777_11])?,
            rescale_factor: pp
                .get("rescale_factor")
                .and_then(Value::as_f64)
                .unwrap_or(1.0 / 255.0),
            patch_size: pp
                .get("patch_size")
                .and_then(Value::as_u64)
                .map_or(config.patch_size, |v| v as usize),
            merge_size: pp
                .get("merge_size")
                .and_then(Value::as_u64)
                .map_or(config.spatial_merge_size, |v| v as usize),
            temporal_patch_size: pp
                .get("temporal_patch_size")
                .and_then(Value::as_u64)
                .map_or(config.temporal_patch_size, |v| v as usize),
        };
        if preprocess.patch_size != config.patch_size
            || preprocess.merge_size != config.spatial_merge_size
            || preprocess.temporal_patch_size != config.temporal_patch_size
        {
            return Err(model_err(
                &pp_path,
                format!(
                    "patch {} / merge {} / temporal patch {} disagree with config.json's vision_config ({} / {} / {})",
                    preprocess.patch_size,
                    preprocess.merge_size,
                    preprocess.temporal_patch_size,
                    config.patch_size,
                    config.spatial_merge_size,
                    config.temporal_patch_size
                ),
            ));
        }
        if preprocess.min_pixels > preprocess.max_pixels || preprocess.max_pixels == 0 {
            return Err(model_err(
                &pp_path,
                format!(
                    "min_pixels {} exceeds max_pixels {}",
                    preprocess.min_pixels, preprocess.max_pixels
                ),
            ));
        }

        let gen_path = root.join("generation_config.json");
        let gen = if gen_path.is_file() {
            Some(read_json(&gen_path)?)
        } else {
            None
        };
        let mut eos_token_ids = gen
            .as_ref()
            .map(|g| ids_of(g.get("eos_token_id")))
            .unwrap_or_default();
        if eos_token_ids.is_empty() {
            eos_token_ids = ids_of(text_field(&cfg, "eos_token_id"));
        }
        let pad_token_id = gen
            .as_ref()
            .and_then(|g| ids_of(g.get("pad_token_id")).first().copied())
            .or_else(|| ids_of(text_field(&cfg, "pad_token_id")).first().copied())
            .or_else(|| eos_token_ids.first().copied())
            .unwrap_or(0);
        Ok(Self {
            root,
            config,
            preprocess,
            eos_token_ids,
            pad_token_id,
        })
    }

    /// Path of a file inside the directory.
    pub fn path(&self, relative: &str) -> PathBuf {
        self.root.join(relative)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (hq-fuzz `qwen2vl_model_dir`, campaign crash-a9a14a4b): a config.json with
    /// `num_hidden_layers: 0` (or a zero patch size) was accepted, to fail later in the engine or
    /// divide by zero in the image processor.
    #[test]
    fn zero_sizes_are_rejected_naming_the_field() {
        let dir = tempfile::tempdir().expect("tempdir");
        for f in REQUIRED_FILES {
            let p = dir.path().join(f);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(p, b"").expect("touch");
        }
        std::fs::write(dir.path().join("preprocessor_config.json"), b"{}").expect("pp");
        let config = |layers: u32, patch: u32| {
            format!(
                r#"{{"model_type": "qwen2_vl", "hidden_size": 64, "num_attention_heads": 4,
                "num_hidden_layers": {layers}, "num_key_value_heads": 2, "vocab_size": 100,
                "image_token_id": 1, "vision_start_token_id": 2, "vision_end_token_id": 3,
                "vision_config": {{"patch_size": {patch}}}}}"#
            )
        };
        let cfg = dir.path().join("config.json");
        std::fs::write(&cfg, config(2, 14)).expect("cfg");
        ModelDir::open(dir.path()).expect("a good config opens");
        for (layers, patch, field) in [(0, 14, "num_hidden_layers"), (2, 0, "patch_size")] {
            std::fs::write(&cfg, config(layers, patch)).expect("cfg");
            let e = ModelDir::open(dir.path()).expect_err("zero").to_string();
            assert!(e.contains(field) && e.contains("config.json"), "{e}");
        }
    }
}
