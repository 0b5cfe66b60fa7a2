//! Checkpoint layouts other tools read: open_clip's (safetensors under open_clip's state-dict names
//! plus its model-config JSON) and Hugging Face transformers' `CLIPModel` (`model.safetensors` plus
//! `config.json`).
//!
//! open_clip:
//! ```text
//! DIR/open_clip_model.safetensors   every tensor of the state dict (strict set), fp32 or fp16
//! DIR/<name>.json                   the model config; open_clip.add_model_config(DIR) registers it as <name>
//! DIR/export.json                   source checkpoint and its SHA-256
//! ```
//! and then `open_clip.create_model(name, pretrained="DIR/open_clip_model.safetensors")`.
//!
//! Hugging Face: `CLIPModel.from_pretrained(DIR)`. Hugging Face's CLIP has fewer options than
//! open_clip's; a config that uses one it lacks (LayerScale, average pooling, `final_ln_after_pool`,
//! no pre-LN, a text projection with bias or none, first/last-token pooling, a bidirectional text
//! tower, a non-square image or patch, a logit bias) is refused naming the option, never written as
//! a model that computes something else. Argmax pooling is written as `eos_token_id = 2`, the value
//! for which transformers pools at the largest token id exactly like open_clip; `eos` pooling keeps
//! its `eos_id`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use hq_train::model::{ClipConfig, TextPool, TextProjType, VisionPool};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

use crate::checkpoint::{expected_tensors, sha256_hex, Checkpoint};
use crate::clip::{Precision, MANIFEST_FILE};
use hq_data::text::hf_tokenizer;

use crate::error::{ExportError, Result};
use crate::model::write_atomic;
use crate::tensor::f32_to_f16_bits;

/// Weights file of the open_clip layout.
pub const OPEN_CLIP_WEIGHTS_FILE: &str = "open_clip_model.safetensors";
/// Weights file of the Hugging Face layout.
pub const HF_WEIGHTS_FILE: &str = "model.safetensors";
/// Config file of the Hugging Face layout.
pub const HF_CONFIG_FILE: &str = "config.json";

/// What a format writer produced.
#[derive(Debug, Clone)]
pub struct FormatSummary {
    /// The weights file.
    pub weights: PathBuf,
    /// The config file.
    pub config: PathBuf,
    /// Number of tensors written.
    pub tensors: usize,
}

/// Copies the Hugging Face tokenizer files of a model whose config names one (CLIPA:
/// `text_cfg.hf_tokenizer_name`) from `from_dir`, the folder of the weights, into `out_dir`, so
/// that the export alone is enough to tokenize texts for it (each file written atomically).
/// Returns the files written; none for a model that reads open_clip's CLIP BPE.
pub fn copy_tokenizer(cfg: &ClipConfig, from_dir: &Path, out_dir: &Path) -> Result<Vec<PathBuf>> {
    let Some(name) = &cfg.text_cfg.hf_tokenizer_name else {
        return Ok(Vec::new());
    };
    if !from_dir.join(hf_tokenizer::TOKENIZER_FILE).is_file() {
        return Err(ExportError::Config(format!(
            "the model reads the Hugging Face tokenizer {name:?}, and {} has no {} to ship with \
             the export",
            from_dir.display(),
            hf_tokenizer::TOKENIZER_FILE
        )));
    }
    std::fs::create_dir_all(out_dir).map_err(io_err("creating", out_dir))?;
    let mut written = Vec::new();
    for file in hf_tokenizer::TOKENIZER_FILES {
        let from = from_dir.join(file);
        if !from.is_file() {
            continue;
        }
        let bytes = std::fs::read(&from).map_err(io_err("reading", &from))?;
        let to = out_dir.join(file);
        write_atomic(&to, &bytes)?;
        written.push(to);
    }
    Ok(written)
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ExportError {
    let path = path.to_path_buf();
    move |source| ExportError::Io {
        action,
        path,
        source,
    }
}

/// Serialises named f32 tensors as safetensors in `precision` and writes them atomically.
fn write_safetensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    precision: Precision,
    metadata: BTreeMap<String, String>,
) -> Result<()> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, data)| match precision {
            Precision::Fp32 => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Precision::Fp16 => data
                .iter()
                .flat_map(|v| f32_to_f16_bits(*v).to_le_bytes())
                .collect(),
        })
        .collect();
    let dtype = match precision {
        Precision::Fp32 => Dtype::F32,
        Precision::Fp16 => Dtype::F16,
    };
    let mut views = Vec::with_capacity(tensors.len());
    for ((name, shape, _), data) in tensors.iter().zip(&bytes) {
        let view =
            TensorView::new(dtype, shape.clone(), data).map_err(|e| ExportError::Checkpoint {
                path: path.to_path_buf(),
                message: format!("tensor `{name}`: {e:?}"),
            })?;
        views.push((name.clone(), view));
    }
    let metadata: std::collections::HashMap<String, String> = metadata.into_iter().collect();
    let out = safetensors::tensor::serialize(views, &Some(metadata)).map_err(|e| {
        ExportError::Checkpoint {
            path: path.to_path_buf(),
            message: format!("serialising: {e:?}"),
        }
    })?;
    write_atomic(path, &out)
}

fn write_manifest(
    dir: &Path,
    format: &str,
    ckpt: &Checkpoint,
    precision: Precision,
    files: &[&Path],
) -> Result<()> {
    let mut entries = serde_json::Map::new();
    for f in files {
        let bytes = std::fs::read(f).map_err(io_err("reading back", f))?;
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        entries.insert(
            name,
            serde_json::json!({ "bytes": bytes.len(), "sha256": sha256_hex(&bytes) }),
        );
    }
    let doc = serde_json::json!({
        "format": format,
        "producer": format!("hq-export {}", env!("CARGO_PKG_VERSION")),
        "source_checkpoint": ckpt.path.display().to_string(),
        "source_sha256": ckpt.sha256,
        "precision": precision.as_str(),
        "files": entries,
    });
    let text = serde_json::to_string_pretty(&doc).unwrap_or_default();
    write_atomic(dir.join(MANIFEST_FILE), format!("{text}\n").as_bytes())
}

/// A file-name-safe model name (open_clip registers the config under the file's stem).
fn safe_name(name: &str) -> Result<String> {
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.');
    if ok {
        Ok(name.to_string())
    } else {
        Err(ExportError::Config(format!(
            "model name {name:?} must be non-empty ASCII letters, digits, '-', '_' or '.' \
             (it becomes a file name and open_clip's model name)"
        )))
    }
}

/// Writes the open_clip layout (see the module docs) into `out_dir`.
pub fn export_open_clip(
    cfg: &ClipConfig,
    ckpt: &Checkpoint,
    precision: Precision,
    model_name: &str,
    out_dir: &Path,
) -> Result<FormatSummary> {
    cfg.validate()
        .map_err(|e| ExportError::Config(e.to_string()))?;
    ckpt.validate(cfg)?;
    let name = safe_name(model_name)?;
    std::fs::create_dir_all(out_dir).map_err(io_err("creating", out_dir))?;
    let mut tensors = Vec::new();
    for (key, _) in expected_tensors(cfg) {
        let t = ckpt.get(&key)?;
        tensors.push((key, t.shape.clone(), t.data.clone()));
    }
    let config_json = cfg
        .to_json_string()
        .map_err(|e| ExportError::Config(e.to_string()))?;
    let mut metadata = BTreeMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    metadata.insert("model_config".to_string(), config_json.clone());
    metadata.insert("source_sha256".to_string(), ckpt.sha256.clone());
    let weights = out_dir.join(OPEN_CLIP_WEIGHTS_FILE);
    write_safetensors(&weights, &tensors, precision, metadata)?;
    let config = out_dir.join(format!("{name}.json"));
    write_atomic(&config, format!("{config_json}\n").as_bytes())?;
    write_manifest(out_dir, "open_clip", ckpt, precision, &[&weights, &config])?;
    Ok(FormatSummary {
        weights,
        config,
        tensors: tensors.len(),
    })
}

/// Why `cfg` has no exact Hugging Face CLIP equivalent, if it has none.
pub fn hf_unsupported(cfg: &ClipConfig) -> Option<String> {
    let v = &cfg.vision_cfg;
    let t = &cfg.text_cfg;
    let reason = if v.is_resnet() {
        "a ModifiedResNet image tower (transformers' CLIPVisionModel is a ViT)"
    } else if v.ls_init_value.is_some() || t.ls_init_value.is_some() {
        "LayerScale (`ls_init_value`)"
    } else if v.pool_type != VisionPool::Tok {
        "average image pooling (`vision_cfg.pool_type`)"
    } else if v.final_ln_after_pool {
        "`vision_cfg.final_ln_after_pool`"
    } else if v.no_ln_pre {
        "`vision_cfg.no_ln_pre`"
    } else if v.image_size.height() != v.image_size.width() {
        "a non-square `vision_cfg.image_size`"
    } else if v.patch_size.height() != v.patch_size.width() {
        "a non-square `vision_cfg.patch_size`"
    } else if t.proj_type == TextProjType::NoProjection || t.proj_bias {
        "a text projection other than a bare matrix (`text_cfg.proj_type` / `proj_bias`)"
    } else if matches!(t.pool_type, TextPool::First | TextPool::Last) {
        "first/last-token text pooling (`text_cfg.pool_type`)"
    } else if t.pool_type == TextPool::Eos && t.eos_id == 2 {
        "`eos` pooling with `eos_id` 2 (transformers reads eos_token_id 2 as argmax pooling)"
    } else if t.no_causal_mask {
        "a bidirectional text tower (`text_cfg.no_causal_mask`)"
    } else if cfg.init_logit_bias.is_some() {
        "a logit bias (`init_logit_bias`)"
    } else {
        return None;
    };
    Some(format!(
        "Hugging Face's CLIPModel has no equivalent of {reason}"
    ))
}

fn hf_act(cfg: &ClipConfig, approximate: Option<&str>) -> &'static str {
    if cfg.quick_gelu {
        "quick_gelu"
    } else if approximate == Some("tanh") {
        "gelu_pytorch_tanh"
    } else {
        "gelu"
    }
}

/// Writes the Hugging Face `CLIPModel` layout (see the module docs) into `out_dir`.
pub fn export_hf(
    cfg: &ClipConfig,
    ckpt: &Checkpoint,
    precision: Precision,
    out_dir: &Path,
) -> Result<FormatSummary> {
    cfg.validate()
        .map_err(|e| ExportError::Config(e.to_string()))?;
    ckpt.validate(cfg)?;
    if let Some(reason) = hf_unsupported(cfg) {
        return Err(ExportError::Unsupported {
            format: "Hugging Face CLIP",
            reason,
        });
    }
    std::fs::create_dir_all(out_dir).map_err(io_err("creating", out_dir))?;
    let mut out: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let copy =
        |out: &mut Vec<(String, Vec<usize>, Vec<f32>)>, from: &str, to: &str| -> Result<()> {
            let t = ckpt.get(from)?;
            out.push((to.to_string(), t.shape.clone(), t.data.clone()));
            Ok(())
        };
    let transposed = |from: &str| -> Result<(Vec<usize>, Vec<f32>)> {
        let t = ckpt.get(from)?;
        let (r, c) = (t.shape[0], t.shape[1]);
        let mut d = vec![0f32; r * c];
        for i in 0..r {
            for j in 0..c {
                d[j * r + i] = t.data[i * c + j];
            }
        }
        Ok((vec![c, r], d))
    };
    let blocks = |out: &mut Vec<(String, Vec<usize>, Vec<f32>)>,
                  src: &str,
                  dst: &str,
                  layers: i64,
                  width: usize|
     -> Result<()> {
        for i in 0..layers {
            let s = format!("{src}.{i}");
            let d = format!("{dst}.{i}");
            for (a, b) in [
                ("ln_1", "layer_norm1"),
                ("ln_2", "layer_norm2"),
                ("attn.out_proj", "self_attn.out_proj"),
                ("mlp.c_fc", "mlp.fc1"),
                ("mlp.c_proj", "mlp.fc2"),
            ] {
                for p in ["weight", "bias"] {
                    let t = ckpt.get(&format!("{s}.{a}.{p}"))?;
                    out.push((format!("{d}.{b}.{p}"), t.shape.clone(), t.data.clone()));
                }
            }
            let w = ckpt.get(&format!("{s}.attn.in_proj_weight"))?;
            let b = ckpt.get(&format!("{s}.attn.in_proj_bias"))?;
            for (k, name) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                out.push((
                    format!("{d}.self_attn.{name}.weight"),
                    vec![width, width],
                    w.data[k * width * width..(k + 1) * width * width].to_vec(),
                ));
                out.push((
                    format!("{d}.self_attn.{name}.bias"),
                    vec![width],
                    b.data[k * width..(k + 1) * width].to_vec(),
                ));
            }
        }
        Ok(())
    };

    let v = &cfg.vision_cfg;
    let t = &cfg.text_cfg;
    // logit_scale is a scalar in transformers.
    let scale = ckpt.get("logit_scale")?;
    out.push(("logit_scale".into(), vec![], scale.data.clone()));
    copy(
        &mut out,
        "token_embedding.weight",
        "text_model.embeddings.token_embedding.weight",
    )?;
    copy(
        &mut out,
        "positional_embedding",
        "text_model.embeddings.position_embedding.weight",
    )?;
    blocks(
        &mut out,
        "transformer.resblocks",
        "text_model.encoder.layers",
        t.layers,
        t.width as usize,
    )?;
    copy(
        &mut out,
        "ln_final.weight",
        "text_model.final_layer_norm.weight",
    )?;
    copy(
        &mut out,
        "ln_final.bias",
        "text_model.final_layer_norm.bias",
    )?;
    let (s, d) = transposed("text_projection")?;
    out.push(("text_projection.weight".into(), s, d));
    copy(
        &mut out,
        "visual.class_embedding",
        "vision_model.embeddings.class_embedding",
    )?;
    copy(
        &mut out,
        "visual.conv1.weight",
        "vision_model.embeddings.patch_embedding.weight",
    )?;
    copy(
        &mut out,
        "visual.positional_embedding",
        "vision_model.embeddings.position_embedding.weight",
    )?;
    // "pre_layrnorm" is transformers' spelling.
    copy(
        &mut out,
        "visual.ln_pre.weight",
        "vision_model.pre_layrnorm.weight",
    )?;
    copy(
        &mut out,
        "visual.ln_pre.bias",
        "vision_model.pre_layrnorm.bias",
    )?;
    blocks(
        &mut out,
        "visual.transformer.resblocks",
        "vision_model.encoder.layers",
        v.layers.depth(),
        v.width as usize,
    )?;
    copy(
        &mut out,
        "visual.ln_post.weight",
        "vision_model.post_layernorm.weight",
    )?;
    copy(
        &mut out,
        "visual.ln_post.bias",
        "vision_model.post_layernorm.bias",
    )?;
    let (s, d) = transposed("visual.proj")?;
    out.push(("visual_projection.weight".into(), s, d));
    out.sort_by(|a, b| a.0.cmp(&b.0));

    let eos_token_id = if t.pool_type == TextPool::Eos {
        t.eos_id
    } else {
        2
    };
    let dtype = match precision {
        Precision::Fp32 => "float32",
        Precision::Fp16 => "float16",
    };
    let config = serde_json::json!({
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": cfg.embed_dim,
        "logit_scale_init_value": cfg.logit_scale_init(),
        "initializer_factor": 1.0,
        "torch_dtype": dtype,
        "dtype": dtype,
        "text_config": {
            "model_type": "clip_text_model",
            "vocab_size": t.vocab_size,
            "hidden_size": t.width,
            "intermediate_size": t.mlp_width(),
            "projection_dim": cfg.embed_dim,
            "num_hidden_layers": t.layers,
            "num_attention_heads": t.heads,
            "max_position_embeddings": t.context_length,
            "hidden_act": hf_act(cfg, t.act_kwargs.as_ref().map(|a| a.approximate.as_str())),
            "layer_norm_eps": t.ln_eps(),
            "attention_dropout": 0.0,
            "bos_token_id": 49406,
            "eos_token_id": eos_token_id,
            "pad_token_id": 1,
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": v.width,
            "intermediate_size": v.mlp_width(),
            "projection_dim": cfg.embed_dim,
            "num_hidden_layers": v.layers,
            "num_attention_heads": v.heads(),
            "num_channels": 3,
            "image_size": v.image_size.height(),
            "patch_size": v.patch_size.height(),
            "hidden_act": hf_act(cfg, v.act_kwargs.as_ref().map(|a| a.approximate.as_str())),
            "layer_norm_eps": v.ln_eps(),
            "attention_dropout": 0.0,
        },
    });
    let mut metadata = BTreeMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    let weights = out_dir.join(HF_WEIGHTS_FILE);
    write_safetensors(&weights, &out, precision, metadata)?;
    let config_path = out_dir.join(HF_CONFIG_FILE);
    let text = serde_json::to_string_pretty(&config).unwrap_or_default();
    write_atomic(&config_path, format!("{text}\n").as_bytes())?;
    write_manifest(
        out_dir,
        "huggingface_clip",
        ckpt,
        precision,
        &[&weights, &config_path],
    )?;
    Ok(FormatSummary {
        weights,
        config: config_path,
        tensors: out.len(),
    })
}
