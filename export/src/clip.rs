//! CLIP's two towers as ONNX graphs, built from a checkpoint and its open_clip model config.
//!
//! # The models
//! - `image_encoder.onnx`: input `pixel_values` f32 `[batch, 3, H, W]` (CLIP-normalised pixels at the
//!   configured size), output `image_embeds` f32 `[batch, embed_dim]`.
//! - `text_encoder.onnx`: input `input_ids` i64 `[batch, context_length]` (open_clip's tokenizer: start
//!   token, BPE ids, end token, zero padding), output `text_embeds` f32 `[batch, embed_dim]`.
//!
//! `batch` is a symbolic (dynamic) dimension; everything else is fixed by the config, which is what
//! TensorRT wants (one optimisation profile over the batch only). Outputs are L2-normalised when
//! [`ExportOptions::normalize`] is set (open_clip's `normalize=True`), raw otherwise.
//!
//! # How the graph follows open_clip
//! The computation is open_clip's `VisionTransformer` / `TextTransformer` op for op, with a few
//! exact rewrites that make the graph smaller:
//! - the class token is prepended by zero-padding the patch sequence and adding a positional table
//!   whose row 0 already holds `class_embedding + positional_embedding[0]` (torch adds the same two
//!   numbers, so the value is identical);
//! - LayerNorm is per token, so `ln_post` / `ln_final` run after the token is picked where open_clip
//!   normalises every token and then picks one (same numbers, less work); with average pooling the
//!   order of `final_ln_after_pool` is kept;
//! - the transformer blocks work on token rows `[B * T, W]`, so every linear layer is a 2-D MatMul
//!   followed by the Add of its bias, which ONNX Runtime fuses into one Gemm (on a `[B, T, W]`
//!   tensor with a dynamic batch it keeps them apart); the rows are reshaped to `[B, T, H, D]` only
//!   around the attention product;
//! - the packed `in_proj_weight` becomes one `[W, 3W]` MatMul whose output is cut into heads by one
//!   Reshape, Transpose and Split, with the attention scale `1/sqrt(head_dim)` folded into the query
//!   columns;
//! - with class-token pooling only the class token of the last block is read, so that block
//!   computes keys and values for every token but the query, the output projection, the residuals
//!   and the MLP for the class token alone (per-token operations: the same numbers, about a twelfth
//!   less work for a 12-block ViT);
//! - the patch embedding (`conv1`, stride = kernel, no bias) is a Reshape + Transpose that cut the
//!   image into flattened patches followed by one MatMul, which ONNX Runtime runs faster than its
//!   convolution (a Conv is written when the patches do not tile the image);
//! - GELU is written as ONNX Runtime's fusable pattern `x * 0.5 * (1 + erf(x / sqrt 2))` (opset 17
//!   has no Gelu op; ONNX Runtime runs it as one `com.microsoft` Gelu), the tanh form and QuickGELU
//!   (`x * sigmoid(1.702 x)`) likewise;
//! - the causal mask is a constant `[L, L]` table of 0 and -inf added to the attention scores;
//! - argmax pooling (the end-of-text token, the largest id) is `ArgMax` over the ids (cast to int32,
//!   which TensorRT handles) then `GatherElements`; `eos` pooling compares with `eos_id` first.
//!
//! Only standard ONNX operators at opset 17 are used (LayerNormalization is the newest), so the
//! models load in ONNX Runtime 1.17+ and in TensorRT 8.6+ through ONNX Runtime or `trtexec`.
//!
//! # Precision
//! [`Precision::Fp32`] keeps every weight in f32. [`Precision::Fp16`] stores weights and constants
//! in f16 and computes in f16 (LayerNormalization keeps its f32 statistics, `stash_type = 1`); the
//! input is cast to f16 on entry and the embedding back to f32 before the optional normalisation,
//! so both precisions have the same f32 interface.
//!
//! # Metadata
//! Each model's `metadata_props` carries the open_clip model config (JSON), the source checkpoint's
//! file name and SHA-256, the tower, the precision, whether outputs are normalised, and the values a
//! runtime needs without parsing the config (see [`meta`]).

use std::path::{Path, PathBuf};

use hq_data::transform::Preprocess;
use hq_train::model::{ClipConfig, TextPool, TextProjType, VisionPool};

use crate::checkpoint::{text_output_dim, Checkpoint};
use crate::error::{ExportError, Result};
use crate::graph::{Attr, Dim, GraphBuilder, Node};
use crate::model::{write_atomic, ModelBuilder};
use crate::tensor::{tensor_i32, ElemType};

#[path = "clip_resnet.rs"]
mod resnet;

/// Image model file name inside an export directory.
pub const IMAGE_MODEL_FILE: &str = "image_encoder.onnx";
/// Text model file name inside an export directory.
pub const TEXT_MODEL_FILE: &str = "text_encoder.onnx";
/// The open_clip model config, next to the models.
pub const CONFIG_FILE: &str = "open_clip_config.json";
/// What was exported from what (written last: a directory with it is complete).
pub const MANIFEST_FILE: &str = "export.json";

/// Image model input.
pub const IMAGE_INPUT: &str = "pixel_values";
/// Image model output.
pub const IMAGE_OUTPUT: &str = "image_embeds";
/// Text model input.
pub const TEXT_INPUT: &str = "input_ids";
/// Text model output.
pub const TEXT_OUTPUT: &str = "text_embeds";
/// The symbolic batch dimension of inputs and outputs.
pub const BATCH_DIM: &str = "batch";

/// ONNX opset the exporter writes (LayerNormalization needs 17).
pub const OPSET: i64 = 17;

/// `metadata_props` keys written into both models.
pub mod meta {
    /// Version of this metadata layout.
    pub const FORMAT_VERSION: &str = "hq_clip.format_version";
    /// `image` or `text`.
    pub const TOWER: &str = "hq_clip.tower";
    /// The open_clip model config as JSON.
    pub const MODEL_CONFIG: &str = "hq_clip.model_config";
    /// A model name (config file stem or preset), when known.
    pub const MODEL_NAME: &str = "hq_clip.model_name";
    /// The checkpoint's file name.
    pub const SOURCE_CHECKPOINT: &str = "hq_clip.source_checkpoint";
    /// The checkpoint's SHA-256 (hex).
    pub const SOURCE_SHA256: &str = "hq_clip.source_sha256";
    /// `fp32` or `fp16` (weights and compute; the interface is f32 either way).
    pub const PRECISION: &str = "hq_clip.precision";
    /// `true` when outputs are L2-normalised.
    pub const NORMALIZED: &str = "hq_clip.normalized";
    /// Output width.
    pub const EMBED_DIM: &str = "hq_clip.embed_dim";
    /// Image height (pixels).
    pub const IMAGE_HEIGHT: &str = "hq_clip.image_height";
    /// Image width (pixels).
    pub const IMAGE_WIDTH: &str = "hq_clip.image_width";
    /// Comma-separated per-channel mean of the expected normalisation.
    pub const IMAGE_MEAN: &str = "hq_clip.image_mean";
    /// Comma-separated per-channel standard deviation of the expected normalisation.
    pub const IMAGE_STD: &str = "hq_clip.image_std";
    /// The eval resize: `shortest` (resize the short side, centre crop) or `squash` (CLIPA).
    pub const RESIZE_MODE: &str = "hq_clip.resize_mode";
    /// Token positions per text.
    pub const CONTEXT_LENGTH: &str = "hq_clip.context_length";
    /// Vocabulary size (ids must be below it).
    pub const VOCAB_SIZE: &str = "hq_clip.vocab_size";
    /// The checkpoint's `logit_scale` (log of the inverse temperature).
    pub const LOGIT_SCALE: &str = "hq_clip.logit_scale";
    /// The checkpoint's `logit_bias`, when it has one.
    pub const LOGIT_BIAS: &str = "hq_clip.logit_bias";
}

/// Value of [`meta::FORMAT_VERSION`].
pub const FORMAT_VERSION: &str = "1";

/// Weight and compute precision of the exported graphs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// f32 weights and compute.
    #[default]
    Fp32,
    /// f16 weights and compute, f32 inputs and outputs.
    Fp16,
}

impl Precision {
    /// `fp32` / `fp16`.
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Precision {
    type Err = ExportError;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "fp32" | "f32" | "float32" => Ok(Precision::Fp32),
            "fp16" | "f16" | "float16" | "half" => Ok(Precision::Fp16),
            other => Err(ExportError::Config(format!(
                "unknown precision {other:?}: expected fp32 or fp16"
            ))),
        }
    }
}

/// How to export.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExportOptions {
    /// Weight and compute precision.
    pub precision: Precision,
    /// L2-normalise the embeddings inside the graph.
    pub normalize: bool,
    /// A model name for the metadata (e.g. the config's file stem).
    pub model_name: Option<String>,
    /// The image preprocessing the model expects (its checkpoint's `preprocess_cfg`), for the
    /// metadata: the encoder that loads the export normalises and resizes with it.
    pub preprocess: Preprocess,
}

/// What [`export_onnx`] wrote.
#[derive(Debug, Clone)]
pub struct ExportSummary {
    /// The image model.
    pub image_model: PathBuf,
    /// The text model.
    pub text_model: PathBuf,
    /// The model config.
    pub config: PathBuf,
    /// The manifest.
    pub manifest: PathBuf,
    /// Initializer bytes of the two models together.
    pub bytes: u64,
}

// ------------------------------------------------------------------------------------------------
// Graph helpers
// ------------------------------------------------------------------------------------------------

/// Activation of the MLPs, chosen as open_clip chooses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Act {
    Gelu,
    GeluTanh,
    QuickGelu,
}

fn activation(cfg: &ClipConfig, approximate: Option<&str>) -> Act {
    if cfg.quick_gelu {
        Act::QuickGelu
    } else if approximate == Some("tanh") {
        Act::GeluTanh
    } else {
        Act::Gelu
    }
}

/// Per-block settings.
#[derive(Debug, Clone, Copy)]
struct BlockSpec {
    width: usize,
    heads: usize,
    act: Act,
    eps: f32,
    layer_scale: bool,
    /// Tokens per sample (the blocks see `[B * T, W]` rows).
    tokens: usize,
}

fn transpose_2d(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    out
}

/// A packed `in_proj` (`[3W, W]` weight, q | k | v rows, and `[3W]` bias) as the `[W, 3W]` MatMul
/// operand and bias, with the attention scale `1/sqrt(head_dim)` folded into the query part.
fn scaled_in_proj(in_w: &[f32], in_b: &[f32], spec: &BlockSpec) -> (Vec<f32>, Vec<f32>) {
    let (w, heads) = (spec.width, spec.heads);
    let scale = 1.0 / ((w / heads) as f32).sqrt();
    let mut wt = transpose_2d(in_w, 3 * w, w);
    for row in wt.chunks_exact_mut(3 * w) {
        for v in &mut row[..w] {
            *v *= scale;
        }
    }
    let mut bias = in_b.to_vec();
    for v in &mut bias[..w] {
        *v *= scale;
    }
    (wt, bias)
}

/// A graph under construction with access to the checkpoint.
struct Tower<'a> {
    g: GraphBuilder,
    ckpt: &'a Checkpoint,
    half: bool,
}

impl<'a> Tower<'a> {
    fn new(name: &str, ckpt: &'a Checkpoint, precision: Precision) -> Self {
        Self {
            g: GraphBuilder::new(name),
            ckpt,
            half: precision == Precision::Fp16,
        }
    }

    /// A float initializer in the compute precision.
    fn weight(&mut self, name: &str, dims: &[usize], data: &[f32]) -> Result<String> {
        if self.half {
            self.g.initializer_f16(name, dims, data)
        } else {
            self.g.initializer_f32(name, dims, data)
        }
    }

    /// A checkpoint tensor as is, under its own name.
    fn ckpt_weight(&mut self, name: &str) -> Result<String> {
        if self.g.is_defined(name) {
            return Ok(name.to_string());
        }
        let t = self.ckpt.get(name)?;
        let (dims, data) = (t.shape.clone(), t.data.clone());
        self.weight(name, &dims, &data)
    }

    /// A 2-D checkpoint tensor transposed (a torch `nn.Linear` weight `[out, in]` becomes the
    /// `[in, out]` right operand of MatMul), named `<name>_t`.
    fn ckpt_weight_t(&mut self, name: &str) -> Result<String> {
        let t = self.ckpt.get(name)?;
        let (rows, cols) = match t.shape.as_slice() {
            [r, c] => (*r, *c),
            other => {
                return Err(ExportError::Checkpoint {
                    path: self.ckpt.path.clone(),
                    message: format!("tensor `{name}` should be 2-D, has shape {other:?}"),
                })
            }
        };
        let data = transpose_2d(&t.data, rows, cols);
        self.weight(&format!("{name}_t"), &[cols, rows], &data)
    }

    /// A float scalar constant in the compute precision (shared by name).
    fn scalar(&mut self, name: &str, v: f32) -> Result<String> {
        if self.g.is_defined(name) {
            return Ok(name.to_string());
        }
        self.weight(name, &[], &[v])
    }

    /// A 1-D i64 constant (shapes, axes, pads), shared by name.
    fn ints(&mut self, name: &str, data: &[i64]) -> Result<String> {
        if self.g.is_defined(name) {
            return Ok(name.to_string());
        }
        self.g.initializer_i64(name, &[data.len()], data)
    }

    /// A scalar i64 constant (Gather index), shared by name.
    fn index(&mut self, name: &str, v: i64) -> Result<String> {
        if self.g.is_defined(name) {
            return Ok(name.to_string());
        }
        self.g.initializer_i64(name, &[], &[v])
    }

    fn op(
        &mut self,
        op: &str,
        name: &str,
        inputs: &[&str],
        attrs: Vec<(&'static str, Attr)>,
    ) -> Result<String> {
        self.g.op(op, name, inputs, attrs)
    }

    fn layer_norm(&mut self, prefix: &str, x: &str, eps: f32) -> Result<String> {
        let w = self.ckpt_weight(&format!("{prefix}.weight"))?;
        let b = self.ckpt_weight(&format!("{prefix}.bias"))?;
        self.op(
            "LayerNormalization",
            prefix,
            &[x, &w, &b],
            vec![("axis", Attr::Int(-1)), ("epsilon", Attr::Float(eps))],
        )
    }

    /// `x @ W^T + b` for a torch `nn.Linear` stored as `<prefix>.weight` / `<prefix>.bias`.
    fn linear(&mut self, prefix: &str, x: &str) -> Result<String> {
        let w = self.ckpt_weight_t(&format!("{prefix}.weight"))?;
        let b = self.ckpt_weight(&format!("{prefix}.bias"))?;
        let xw = self.op("MatMul", &format!("{prefix}.matmul"), &[x, &w], vec![])?;
        self.op("Add", &format!("{prefix}.add"), &[&xw, &b], vec![])
    }

    fn activation(&mut self, prefix: &str, x: &str, act: Act) -> Result<String> {
        match act {
            Act::Gelu => {
                let sqrt2 = self.scalar("const.sqrt2", std::f32::consts::SQRT_2)?;
                let one = self.scalar("const.one", 1.0)?;
                let half = self.scalar("const.half", 0.5)?;
                let d = self.op("Div", &format!("{prefix}.gelu.div"), &[x, &sqrt2], vec![])?;
                let e = self.op("Erf", &format!("{prefix}.gelu.erf"), &[&d], vec![])?;
                let a = self.op("Add", &format!("{prefix}.gelu.add"), &[&e, &one], vec![])?;
                let m = self.op("Mul", &format!("{prefix}.gelu.mul"), &[x, &a], vec![])?;
                self.op("Mul", &format!("{prefix}.gelu"), &[&m, &half], vec![])
            }
            Act::GeluTanh => {
                // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), torch's approximate="tanh".
                let c = self.scalar("const.gelu_c", 0.044_715)?;
                let k = self.scalar(
                    "const.sqrt_2_over_pi",
                    (2.0f64 / std::f64::consts::PI).sqrt() as f32,
                )?;
                let one = self.scalar("const.one", 1.0)?;
                let half = self.scalar("const.half", 0.5)?;
                let p = format!("{prefix}.gelu_tanh");
                let x2 = self.op("Mul", &format!("{p}.x2"), &[x, x], vec![])?;
                let x3 = self.op("Mul", &format!("{p}.x3"), &[&x2, x], vec![])?;
                let cx3 = self.op("Mul", &format!("{p}.cx3"), &[&x3, &c], vec![])?;
                let inner = self.op("Add", &format!("{p}.inner"), &[x, &cx3], vec![])?;
                let scaled = self.op("Mul", &format!("{p}.scaled"), &[&inner, &k], vec![])?;
                let t = self.op("Tanh", &format!("{p}.tanh"), &[&scaled], vec![])?;
                let a = self.op("Add", &format!("{p}.add"), &[&t, &one], vec![])?;
                let m = self.op("Mul", &format!("{p}.mul"), &[x, &a], vec![])?;
                self.op("Mul", &p, &[&m, &half], vec![])
            }
            Act::QuickGelu => {
                let k = self.scalar("const.quick_gelu", 1.702)?;
                let p = format!("{prefix}.quick_gelu");
                let kx = self.op("Mul", &format!("{p}.scale"), &[x, &k], vec![])?;
                let s = self.op("Sigmoid", &format!("{p}.sigmoid"), &[&kx], vec![])?;
                self.op("Mul", &p, &[x, &s], vec![])
            }
        }
    }

    /// The packed `in_proj` of `nn.MultiheadAttention` as a `[W, 3W]` MatMul operand and its
    /// `[3W]` bias, with the attention scale `1/sqrt(head_dim)` folded into the query part.
    fn in_proj_scaled(&self, prefix: &str, spec: &BlockSpec) -> Result<(Vec<f32>, Vec<f32>)> {
        let in_w = self.ckpt.get(&format!("{prefix}.in_proj_weight"))?;
        let in_b = self.ckpt.get(&format!("{prefix}.in_proj_bias"))?;
        Ok(scaled_in_proj(&in_w.data, &in_b.data, spec))
    }

    /// `rows @ w + b` on the token rows, as ONNX Runtime fuses it into one Gemm (MatMul on a 2-D
    /// left operand, then Add of a 1-D bias).
    fn linear_raw(
        &mut self,
        prefix: &str,
        x: &str,
        w: (&str, &[usize], &[f32]),
        b: (&str, &[f32]),
    ) -> Result<String> {
        let w = self.weight(w.0, w.1, w.2)?;
        let b = self.weight(b.0, &[b.1.len()], b.1)?;
        let xw = self.op("MatMul", &format!("{prefix}.matmul"), &[x, &w], vec![])?;
        self.op("Add", prefix, &[&xw, &b], vec![])
    }

    /// Splits packed projections `[B * T, n * W]` into `n` head-major tensors `[B, H, T, D]` with
    /// one Reshape, one Transpose and one Split (`n` = 3 for q, k, v; 2 for k, v).
    fn split_heads(
        &mut self,
        prefix: &str,
        packed: &str,
        n: usize,
        tokens: usize,
        spec: &BlockSpec,
    ) -> Result<Vec<String>> {
        let (heads, head_dim) = (spec.heads, spec.width / spec.heads);
        let shape = self.ints(
            &format!("const.shape_{n}x{tokens}x{heads}x{head_dim}"),
            &[-1, tokens as i64, n as i64, heads as i64, head_dim as i64],
        )?;
        let r = self.op(
            "Reshape",
            &format!("{prefix}.heads"),
            &[packed, &shape],
            vec![],
        )?; // [B, T, n, H, D]
        let t = self.op(
            "Transpose",
            &format!("{prefix}.heads.transpose"),
            &[&r],
            vec![("perm", Attr::Ints(vec![2, 0, 3, 1, 4]))],
        )?; // [n, B, H, T, D]
        let names: Vec<String> = ["q", "k", "v"][3 - n..]
            .iter()
            .map(|s| format!("{prefix}.{s}.packed"))
            .collect();
        let ones = self.ints(&format!("const.split_ones_{n}"), &vec![1; n])?;
        self.g.add_node(
            Node::new("Split", format!("{prefix}.heads.split"))
                .inputs([t.as_str(), ones.as_str()])
                .outputs(names.iter().map(String::as_str))
                .attr("axis", 0i64),
        )?;
        let axis0 = self.ints("const.axis_0", &[0])?;
        names
            .iter()
            .map(|p| {
                let name = p.trim_end_matches(".packed").to_string();
                self.op("Squeeze", &name, &[p, &axis0], vec![])
            })
            .collect() // n x [B, H, T, D]
    }

    /// `softmax(q k^T + mask) v` on head-major tensors, `k` as `[B, H, T, D]`: the transpose of
    /// the last two axes feeds the MatMul directly, which ONNX Runtime folds into the product
    /// (`FusedMatMul` with `transB`), so no transposed copy of `k` is made.
    fn scaled_dot_product(
        &mut self,
        prefix: &str,
        q: &str,
        k: &str,
        v: &str,
        mask: Option<&str>,
    ) -> Result<String> {
        let kt = self.op(
            "Transpose",
            &format!("{prefix}.k.transpose"),
            &[k],
            vec![("perm", Attr::Ints(vec![0, 1, 3, 2]))],
        )?; // [B, H, D, T]
        let mut scores = self.op("MatMul", &format!("{prefix}.scores"), &[q, &kt], vec![])?;
        if let Some(mask) = mask {
            scores = self.op(
                "Add",
                &format!("{prefix}.scores.causal"),
                &[&scores, mask],
                vec![],
            )?;
        }
        let probs = self.op(
            "Softmax",
            &format!("{prefix}.softmax"),
            &[&scores],
            vec![("axis", Attr::Int(-1))],
        )?;
        self.op("MatMul", &format!("{prefix}.context"), &[&probs, v], vec![])
    }

    /// Multi-head self-attention of open_clip's `nn.MultiheadAttention` (`prefix` = `...attn`) on
    /// token rows `x` `[B * T, W]`.
    fn attention(
        &mut self,
        prefix: &str,
        x: &str,
        spec: &BlockSpec,
        mask: Option<&str>,
    ) -> Result<String> {
        let w = spec.width;
        let (wt, bias) = self.in_proj_scaled(prefix, spec)?;
        let qkv = self.linear_raw(
            &format!("{prefix}.qkv"),
            x,
            (
                &format!("{prefix}.in_proj_weight_t_scaled"),
                &[w, 3 * w],
                &wt,
            ),
            (&format!("{prefix}.in_proj_bias_scaled"), &bias),
        )?; // [B * T, 3W]
        let qkv = self.split_heads(prefix, &qkv, 3, spec.tokens, spec)?;
        let ctx = self.scaled_dot_product(prefix, &qkv[0], &qkv[1], &qkv[2], mask)?; // [B, H, T, D]
        let ctx = self.op(
            "Transpose",
            &format!("{prefix}.context.transpose"),
            &[&ctx],
            vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))],
        )?; // [B, T, H, D]
        let ctx = self.merge_rows(prefix, &ctx, w)?; // [B * T, W]
        self.linear(&format!("{prefix}.out_proj"), &ctx)
    }

    /// The attention context reshaped to rows of width `w` (`[-1, w]`).
    fn merge_rows(&mut self, prefix: &str, ctx: &str, w: usize) -> Result<String> {
        let rows = self.ints(&format!("const.shape_rows_{w}"), &[-1, w as i64])?;
        self.op(
            "Reshape",
            &format!("{prefix}.context.merge"),
            &[ctx, &rows],
            vec![],
        )
    }

    /// The attention of the last block when only the first token's output is used (class-token
    /// pooling): keys and values from every token of `x` `[B * T, W]`, the query of the first
    /// token only; returns `[B, W]`. The same numbers as [`Tower::attention`] for that token.
    fn attention_first_token(
        &mut self,
        prefix: &str,
        x: &str,
        first: &str,
        spec: &BlockSpec,
    ) -> Result<String> {
        let (wt, bias) = self.in_proj_scaled(prefix, spec)?;
        let out_proj = format!("{prefix}.out_proj");
        self.attention_first_token_packed(prefix, x, first, spec, (&wt, &bias), &out_proj)
    }

    /// [`Tower::attention_first_token`] from a packed, scaled projection ([`scaled_in_proj`])
    /// with the output projection `out_proj` (an `nn.Linear` prefix).
    fn attention_first_token_packed(
        &mut self,
        prefix: &str,
        x: &str,
        first: &str,
        spec: &BlockSpec,
        (wt, bias): (&[f32], &[f32]),
        out_proj: &str,
    ) -> Result<String> {
        let (w, heads) = (spec.width, spec.heads);
        let head_dim = w / heads;
        // [W, 3W] rows hold q | k | v columns: split them into [W, W] and [W, 2W].
        let mut wq = Vec::with_capacity(w * w);
        let mut wkv = Vec::with_capacity(2 * w * w);
        for row in wt.chunks_exact(3 * w) {
            wq.extend_from_slice(&row[..w]);
            wkv.extend_from_slice(&row[w..]);
        }
        let q = self.linear_raw(
            &format!("{prefix}.q_first"),
            first,
            (&format!("{prefix}.q_weight_t_scaled"), &[w, w], &wq),
            (&format!("{prefix}.q_bias_scaled"), &bias[..w]),
        )?; // [B, W]
        let kv = self.linear_raw(
            &format!("{prefix}.kv"),
            x,
            (&format!("{prefix}.kv_weight_t"), &[w, 2 * w], &wkv),
            (&format!("{prefix}.kv_bias"), &bias[w..]),
        )?; // [B * T, 2W]
        let kv = self.split_heads(prefix, &kv, 2, spec.tokens, spec)?;
        let q_shape = self.ints(
            &format!("const.shape_query_{heads}x{head_dim}"),
            &[-1, heads as i64, 1, head_dim as i64],
        )?;
        let q = self.op(
            "Reshape",
            &format!("{prefix}.q_first.heads"),
            &[&q, &q_shape],
            vec![],
        )?; // [B, H, 1, D]
        let ctx = self.scaled_dot_product(prefix, &q, &kv[0], &kv[1], None)?; // [B, H, 1, D]
                                                                              // With one query the head-major [B, H, 1, D] is already [B, W] in memory.
        let ctx = self.merge_rows(prefix, &ctx, w)?;
        self.linear(out_proj, &ctx)
    }

    /// open_clip's `conv1` (a bias-free convolution whose stride is its kernel) on `x`
    /// `[B, 3, H, W]`, as patch tokens `[B, P, W]`. When the patches tile the image it is one
    /// MatMul over the flattened patches (a Reshape and a Transpose cut them out), which ONNX
    /// Runtime runs faster than its convolution; otherwise the Conv itself.
    fn patch_embedding(
        &mut self,
        x: &str,
        (h, w): (i64, i64),
        (ph, pw): (i64, i64),
        width: usize,
    ) -> Result<String> {
        if ph <= 0 || pw <= 0 || h % ph != 0 || w % pw != 0 {
            let conv_w = self.ckpt_weight("visual.conv1.weight")?;
            let x = self.op(
                "Conv",
                "visual.conv1",
                &[x, &conv_w],
                vec![
                    ("kernel_shape", Attr::Ints(vec![ph, pw])),
                    ("strides", Attr::Ints(vec![ph, pw])),
                ],
            )?; // [B, W, gh, gw]
            let flat = self.ints("const.shape_patches", &[0, width as i64, -1])?;
            let x = self.op("Reshape", "visual.patches", &[&x, &flat], vec![])?;
            return self.op(
                "Transpose",
                "visual.patches.transpose",
                &[&x],
                vec![("perm", Attr::Ints(vec![0, 2, 1]))],
            );
        }
        let (gh, gw) = (h / ph, w / pw);
        let patch = 3 * ph * pw;
        let conv = self.ckpt.get("visual.conv1.weight")?;
        if conv.shape != [width, 3, ph as usize, pw as usize] {
            return Err(ExportError::Checkpoint {
                path: self.ckpt.path.clone(),
                message: format!(
                    "tensor `visual.conv1.weight` has shape {:?}, expected {:?}",
                    conv.shape,
                    [width as i64, 3, ph, pw]
                ),
            });
        }
        // [W, 3, ph, pw] = [W, 3 * ph * pw] -> [3 * ph * pw, W], rows in (channel, y, x) order.
        let wt = transpose_2d(&conv.data, width, patch as usize);
        let wt = self.weight(
            "visual.conv1.weight_patches_t",
            &[patch as usize, width],
            &wt,
        )?;
        let grid = self.ints("const.shape_image_grid", &[-1, 3, gh, ph, gw, pw])?;
        let x = self.op("Reshape", "visual.conv1.grid", &[x, &grid], vec![])?;
        let x = self.op(
            "Transpose",
            "visual.conv1.patches",
            &[&x],
            vec![("perm", Attr::Ints(vec![0, 2, 4, 1, 3, 5]))],
        )?; // [B, gh, gw, 3, ph, pw]
        let flat = self.ints("const.shape_patch_rows", &[-1, gh * gw, patch])?;
        let x = self.op("Reshape", "visual.conv1.rows", &[&x, &flat], vec![])?;
        self.op("MatMul", "visual.conv1", &[&x, &wt], vec![])
    }

    /// The first token's row of every sample: `[B * T, W]` -> `[B, W]`.
    fn first_token(&mut self, name: &str, x: &str, tokens: usize, width: usize) -> Result<String> {
        let shape = self.ints(
            &format!("const.shape_tokens_{tokens}x{width}"),
            &[-1, tokens as i64, width as i64],
        )?;
        let x3 = self.op("Reshape", &format!("{name}.tokens"), &[x, &shape], vec![])?;
        let zero = self.index("const.index_0", 0)?;
        self.op("Gather", name, &[&x3, &zero], vec![("axis", Attr::Int(1))])
    }

    /// open_clip's `ResidualAttentionBlock` (`prefix` = `...resblocks.{i}`) on token rows `x`
    /// `[B * T, W]`. With `first_only` only the first token's output is computed (`[B, W]`), which
    /// is all that class-token pooling reads from the last block.
    fn block(
        &mut self,
        prefix: &str,
        x: &str,
        spec: &BlockSpec,
        mask: Option<&str>,
        first_only: bool,
    ) -> Result<String> {
        let h = self.layer_norm(&format!("{prefix}.ln_1"), x, spec.eps)?;
        let (x, mut a) = if first_only {
            let hf =
                self.first_token(&format!("{prefix}.ln_1.first"), &h, spec.tokens, spec.width)?;
            let xf = self.first_token(&format!("{prefix}.first"), x, spec.tokens, spec.width)?;
            let a = self.attention_first_token(&format!("{prefix}.attn"), &h, &hf, spec)?;
            (xf, a)
        } else {
            let a = self.attention(&format!("{prefix}.attn"), &h, spec, mask)?;
            (x.to_string(), a)
        };
        if spec.layer_scale {
            let g = self.ckpt_weight(&format!("{prefix}.ls_1.gamma"))?;
            a = self.op("Mul", &format!("{prefix}.ls_1"), &[&a, &g], vec![])?;
        }
        let x = self.op("Add", &format!("{prefix}.residual_1"), &[&x, &a], vec![])?;
        let h = self.layer_norm(&format!("{prefix}.ln_2"), &x, spec.eps)?;
        let f = self.linear(&format!("{prefix}.mlp.c_fc"), &h)?;
        let f = self.activation(&format!("{prefix}.mlp"), &f, spec.act)?;
        let mut m = self.linear(&format!("{prefix}.mlp.c_proj"), &f)?;
        if spec.layer_scale {
            let g = self.ckpt_weight(&format!("{prefix}.ls_2.gamma"))?;
            m = self.op("Mul", &format!("{prefix}.ls_2"), &[&m, &g], vec![])?;
        }
        self.op("Add", &format!("{prefix}.residual_2"), &[&x, &m], vec![])
    }

    /// Casts the embedding back to f32 (f16 graphs), optionally L2-normalises it, and makes the
    /// result the graph output `out`.
    fn finish(&mut self, x: &str, out: &str, width: usize, normalize: bool) -> Result<()> {
        let mut x = x.to_string();
        if self.half {
            let node = if normalize { "embeds.to_f32" } else { out };
            x = self.op(
                "Cast",
                node,
                &[&x],
                vec![("to", Attr::Int(ElemType::F32.code()))],
            )?;
        }
        if normalize {
            // F.normalize: x / max(||x||_2, 1e-12), in f32.
            let n = self.op(
                "ReduceL2",
                "embeds.norm",
                &[&x],
                vec![("axes", Attr::Ints(vec![-1])), ("keepdims", Attr::Int(1))],
            )?;
            let eps = self.g.initializer_f32("const.norm_eps", &[], &[1e-12])?;
            let n = self.op("Max", "embeds.norm.clamp", &[&n, &eps], vec![])?;
            x = self.op("Div", out, &[&x, &n], vec![])?;
        }
        if x != out {
            // Only when the caller's last op already produced the output under another name.
            self.g.add_node(
                Node::new("Identity", format!("{out}.identity"))
                    .input(x)
                    .output(out),
            )?;
        }
        self.g.output(
            out,
            ElemType::F32,
            &[Dim::Symbolic(BATCH_DIM.into()), Dim::Fixed(width as i64)],
        )
    }
}

// ------------------------------------------------------------------------------------------------
// Towers
// ------------------------------------------------------------------------------------------------

/// The projection is the graph's last op when nothing follows it (f32, unnormalised): it then
/// writes the output directly.
fn final_op_name<'n>(t: &Tower<'_>, opts: &ExportOptions, out: &'n str, name: &'n str) -> &'n str {
    if !t.half && !opts.normalize {
        out
    } else {
        name
    }
}

fn check_config(cfg: &ClipConfig) -> Result<()> {
    cfg.validate()
        .map_err(|e| ExportError::Config(e.to_string()))
}

/// The image tower as an ONNX model (metadata included).
pub fn image_encoder(
    cfg: &ClipConfig,
    ckpt: &Checkpoint,
    opts: &ExportOptions,
) -> Result<ModelBuilder> {
    check_config(cfg)?;
    ckpt.validate(cfg)?;
    let v = &cfg.vision_cfg;
    let (h, w) = (v.image_size.height(), v.image_size.width());
    let embed = cfg.embed_dim as usize;
    let mut t = Tower::new("hq_clip_image_encoder", ckpt, opts.precision);
    let mut x = t.g.input(
        IMAGE_INPUT,
        ElemType::F32,
        &[
            Dim::Symbolic(BATCH_DIM.into()),
            Dim::Fixed(3),
            Dim::Fixed(h),
            Dim::Fixed(w),
        ],
    )?;
    if t.half {
        x = t.op(
            "Cast",
            "visual.input.to_f16",
            &[&x],
            vec![("to", Attr::Int(ElemType::F16.code()))],
        )?;
    }
    let (y, doc) = if v.is_resnet() {
        let y = resnet::image_embedding(&mut t, cfg, &x)?;
        (
            y,
            "HQ-CLIP image encoder (open_clip ModifiedResNet), exported by hq-export from Rust",
        )
    } else {
        let y = vit_image_embedding(&mut t, cfg, opts, &x)?;
        (
            y,
            "HQ-CLIP image encoder (open_clip VisionTransformer), exported by hq-export from Rust",
        )
    };
    t.finish(&y, IMAGE_OUTPUT, embed, opts.normalize)?;
    t.g.set_doc(doc);
    Ok(with_metadata(
        ModelBuilder::new(t.g),
        "image",
        cfg,
        ckpt,
        opts,
        embed,
    ))
}

/// The ViT image tower on `x` `[B, 3, H, W]` up to the projected embedding `[B, embed_dim]`.
fn vit_image_embedding(
    t: &mut Tower<'_>,
    cfg: &ClipConfig,
    opts: &ExportOptions,
    x: &str,
) -> Result<String> {
    let ckpt = t.ckpt;
    let v = &cfg.vision_cfg;
    let (h, w) = (v.image_size.height(), v.image_size.width());
    let (ph, pw) = (v.patch_size.height(), v.patch_size.width());
    let width = v.width as usize;
    let spec = BlockSpec {
        width,
        heads: v.heads() as usize,
        act: activation(cfg, v.act_kwargs.as_ref().map(|a| a.approximate.as_str())),
        eps: v.ln_eps() as f32,
        layer_scale: v.ls_init_value.is_some(),
        tokens: ckpt.get("visual.positional_embedding")?.shape[0],
    };

    let x = t.patch_embedding(x, (h, w), (ph, pw), width)?; // [B, P, W]
    let pads = t.ints("const.pad_class_token", &[0, 1, 0, 0, 0, 0])?;
    let x = t.op("Pad", "visual.class_token_slot", &[&x, &pads], vec![])?; // [B, P + 1, W]
    let cls = ckpt.get("visual.class_embedding")?;
    let pos = ckpt.get("visual.positional_embedding")?;
    let mut table = pos.data.clone();
    for (p, c) in table.iter_mut().zip(&cls.data) {
        *p += *c;
    }
    let pos_shape = pos.shape.clone();
    let table = t.weight(
        "visual.positional_embedding_with_class_token",
        &pos_shape,
        &table,
    )?;
    let x = t.op("Add", "visual.embed", &[&x, &table], vec![])?;
    // The blocks work on token rows [B * T, W] (not [B, T, W]): every linear layer is then a 2-D
    // MatMul + Add, which ONNX Runtime runs as one Gemm with the bias fused.
    let rows = t.ints(&format!("const.shape_rows_{width}"), &[-1, width as i64])?;
    let mut x = t.op("Reshape", "visual.embed.rows", &[&x, &rows], vec![])?;
    if !v.no_ln_pre {
        x = t.layer_norm("visual.ln_pre", &x, spec.eps)?;
    }
    // Class-token pooling reads one token of the last block: that block computes keys and values
    // for every token but the query, the output projection and the MLP for the class token only.
    let first_only = v.pool_type == VisionPool::Tok;
    let layers = v.layers.depth();
    for i in 0..layers {
        x = t.block(
            &format!("visual.transformer.resblocks.{i}"),
            &x,
            &spec,
            None,
            first_only && i + 1 == layers,
        )?;
    }
    let pooled = match v.pool_type {
        VisionPool::Tok if layers > 0 => {
            // LayerNorm is per token: normalising the class token alone gives the same numbers.
            t.layer_norm("visual.ln_post", &x, spec.eps)?
        }
        VisionPool::Tok => {
            let c = t.first_token("visual.pool.class_token", &x, spec.tokens, width)?;
            t.layer_norm("visual.ln_post", &c, spec.eps)?
        }
        VisionPool::Avg => {
            let shape = t.ints(
                &format!("const.shape_tokens_{}x{width}", spec.tokens),
                &[-1, spec.tokens as i64, width as i64],
            )?;
            let x = t.op("Reshape", "visual.tokens", &[&x, &shape], vec![])?;
            let starts = t.ints("const.slice_start_1", &[1])?;
            let ends = t.ints("const.slice_end_max", &[i64::MAX])?;
            let axes = t.ints("const.axis_1", &[1])?;
            let mean = |t: &mut Tower<'_>, x: &str| -> Result<String> {
                let s = t.op(
                    "Slice",
                    "visual.pool.patch_tokens",
                    &[x, &starts, &ends, &axes],
                    vec![],
                )?;
                t.op(
                    "ReduceMean",
                    "visual.pool.mean",
                    &[&s],
                    vec![("axes", Attr::Ints(vec![1])), ("keepdims", Attr::Int(0))],
                )
            };
            if v.final_ln_after_pool {
                let m = mean(t, &x)?;
                t.layer_norm("visual.ln_post", &m, spec.eps)?
            } else {
                let n = t.layer_norm("visual.ln_post", &x, spec.eps)?;
                mean(t, &n)?
            }
        }
    };
    let proj = t.ckpt_weight("visual.proj")?;
    let name = final_op_name(t, opts, IMAGE_OUTPUT, "visual.proj.matmul");
    t.op("MatMul", name, &[&pooled, &proj], vec![])
}

/// The text tower as an ONNX model (metadata included).
pub fn text_encoder(
    cfg: &ClipConfig,
    ckpt: &Checkpoint,
    opts: &ExportOptions,
) -> Result<ModelBuilder> {
    check_config(cfg)?;
    ckpt.validate(cfg)?;
    let tc = &cfg.text_cfg;
    let ctx = tc.context_length as usize;
    let width = tc.width as usize;
    let out_dim = text_output_dim(cfg);
    let spec = BlockSpec {
        width,
        heads: tc.heads as usize,
        act: activation(cfg, tc.act_kwargs.as_ref().map(|a| a.approximate.as_str())),
        eps: tc.ln_eps() as f32,
        layer_scale: tc.ls_init_value.is_some(),
        tokens: ctx,
    };

    let mut t = Tower::new("hq_clip_text_encoder", ckpt, opts.precision);
    let ids = t.g.input(
        TEXT_INPUT,
        ElemType::I64,
        &[Dim::Symbolic(BATCH_DIM.into()), Dim::Fixed(ctx as i64)],
    )?;
    let table = t.ckpt_weight("token_embedding.weight")?;
    let x = t.op(
        "Gather",
        "token_embedding",
        &[&table, &ids],
        vec![("axis", Attr::Int(0))],
    )?; // [B, L, W]
    let pos = t.ckpt_weight("positional_embedding")?;
    let x = t.op("Add", "text.embed", &[&x, &pos], vec![])?; // [B, L, W]
    let rows = t.ints(&format!("const.shape_rows_{width}"), &[-1, width as i64])?;
    let mut x = t.op("Reshape", "text.embed.rows", &[&x, &rows], vec![])?; // [B * L, W]
    let mask = if tc.no_causal_mask {
        None
    } else {
        let mut m = vec![0f32; ctx * ctx];
        for i in 0..ctx {
            for j in (i + 1)..ctx {
                m[i * ctx + j] = f32::NEG_INFINITY;
            }
        }
        Some(t.weight("const.causal_mask", &[ctx, ctx], &m)?)
    };
    for i in 0..tc.layers {
        x = t.block(
            &format!("transformer.resblocks.{i}"),
            &x,
            &spec,
            mask.as_deref(),
            false,
        )?;
    }
    let shape = t.ints(
        &format!("const.shape_tokens_{ctx}x{width}"),
        &[-1, ctx as i64, width as i64],
    )?;
    let x = t.op("Reshape", "text.tokens", &[&x, &shape], vec![])?; // [B, L, W]
    let pooled = match tc.pool_type {
        TextPool::Argmax | TextPool::Eos => {
            let ids32 = t.op(
                "Cast",
                "text.pool.ids_i32",
                &[&ids],
                vec![("to", Attr::Int(ElemType::I32.code()))],
            )?;
            let scores = if tc.pool_type == TextPool::Eos {
                let eos_id = i32::try_from(tc.eos_id).map_err(|_| {
                    ExportError::Config(format!(
                        "text_cfg.eos_id {} does not fit in i32",
                        tc.eos_id
                    ))
                })?;
                let eos =
                    t.g.initializer(tensor_i32("const.eos_id", &[], &[eos_id])?)?;
                let eq = t.op("Equal", "text.pool.is_eos", &[&ids32, &eos], vec![])?;
                t.op(
                    "Cast",
                    "text.pool.is_eos_i32",
                    &[&eq],
                    vec![("to", Attr::Int(ElemType::I32.code()))],
                )?
            } else {
                ids32
            };
            // torch.argmax and ONNX ArgMax both pick the first maximum.
            let idx = t.op(
                "ArgMax",
                "text.pool.argmax",
                &[&scores],
                vec![("axis", Attr::Int(1)), ("keepdims", Attr::Int(1))],
            )?; // [B, 1]
            let axes2 = t.ints("const.axis_2", &[2])?;
            let idx = t.op("Unsqueeze", "text.pool.index", &[&idx, &axes2], vec![])?; // [B, 1, 1]
            let shape = t.ints("const.shape_pool_index", &[1, 1, width as i64])?;
            let idx = t.op("Expand", "text.pool.index.expand", &[&idx, &shape], vec![])?;
            let g = t.op(
                "GatherElements",
                "text.pool.gather",
                &[&x, &idx],
                vec![("axis", Attr::Int(1))],
            )?; // [B, 1, W]
            let axes1 = t.ints("const.axis_1", &[1])?;
            t.op("Squeeze", "text.pool", &[&g, &axes1], vec![])?
        }
        TextPool::First | TextPool::Last => {
            let at = if tc.pool_type == TextPool::First {
                0
            } else {
                ctx as i64 - 1
            };
            let i = t.index(&format!("const.index_{at}"), at)?;
            t.op(
                "Gather",
                "text.pool",
                &[&x, &i],
                vec![("axis", Attr::Int(1))],
            )?
        }
    };
    // LayerNorm is per token: normalising the pooled token equals open_clip's ln_final-then-pool.
    let x = t.layer_norm("ln_final", &pooled, spec.eps)?;
    let y = match (tc.proj_type, tc.proj_bias) {
        (TextProjType::NoProjection, _) => x,
        (TextProjType::Linear, false) => {
            let p = t.ckpt_weight("text_projection")?;
            let name = final_op_name(&t, opts, TEXT_OUTPUT, "text_projection.matmul");
            t.op("MatMul", name, &[&x, &p], vec![])?
        }
        (TextProjType::Linear, true) => t.linear("text_projection", &x)?,
    };
    t.finish(&y, TEXT_OUTPUT, out_dim, opts.normalize)?;
    t.g.set_doc(
        "HQ-CLIP text encoder (open_clip TextTransformer), exported by hq-export from Rust",
    );
    Ok(with_metadata(
        ModelBuilder::new(t.g),
        "text",
        cfg,
        ckpt,
        opts,
        out_dim,
    ))
}

fn floats(v: &[f64; 3]) -> String {
    v.iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn scalar_value(ckpt: &Checkpoint, name: &str) -> Option<String> {
    ckpt.tensors
        .get(name)
        .and_then(|t| t.data.first())
        .map(|v| v.to_string())
}

fn with_metadata(
    model: ModelBuilder,
    tower: &str,
    cfg: &ClipConfig,
    ckpt: &Checkpoint,
    opts: &ExportOptions,
    out_dim: usize,
) -> ModelBuilder {
    let config_json = serde_json::to_string(cfg).unwrap_or_default();
    let source = ckpt
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let v = &cfg.vision_cfg;
    let mut m = model
        .opset("", OPSET)
        .doc(&format!(
            "HQ-CLIP {tower} encoder from {source} (sha256 {}), {}, {}",
            ckpt.sha256,
            opts.precision,
            if opts.normalize {
                "L2-normalised outputs"
            } else {
                "unnormalised outputs"
            }
        ))
        .metadata(meta::FORMAT_VERSION, FORMAT_VERSION)
        .metadata(meta::TOWER, tower)
        .metadata(meta::MODEL_CONFIG, &config_json)
        .metadata(meta::SOURCE_CHECKPOINT, &source)
        .metadata(meta::SOURCE_SHA256, &ckpt.sha256)
        .metadata(meta::PRECISION, opts.precision.as_str())
        .metadata(
            meta::NORMALIZED,
            if opts.normalize { "true" } else { "false" },
        )
        .metadata(meta::EMBED_DIM, &out_dim.to_string())
        .metadata(meta::IMAGE_HEIGHT, &v.image_size.height().to_string())
        .metadata(meta::IMAGE_WIDTH, &v.image_size.width().to_string())
        .metadata(meta::IMAGE_MEAN, &floats(&opts.preprocess.mean))
        .metadata(meta::IMAGE_STD, &floats(&opts.preprocess.std))
        .metadata(
            meta::RESIZE_MODE,
            if opts.preprocess.squash {
                "squash"
            } else {
                "shortest"
            },
        )
        .metadata(
            meta::CONTEXT_LENGTH,
            &cfg.text_cfg.context_length.to_string(),
        )
        .metadata(meta::VOCAB_SIZE, &cfg.text_cfg.vocab_size.to_string());
    if let Some(name) = &opts.model_name {
        m = m.metadata(meta::MODEL_NAME, name);
    }
    if let Some(s) = scalar_value(ckpt, "logit_scale") {
        m = m.metadata(meta::LOGIT_SCALE, &s);
    }
    if let Some(b) = scalar_value(ckpt, "logit_bias") {
        m = m.metadata(meta::LOGIT_BIAS, &b);
    }
    m
}

/// Writes both towers, the model config and a manifest into `out_dir` (created if missing). Every
/// file is written atomically; the manifest comes last, so a directory holding it is complete.
pub fn export_onnx(
    cfg: &ClipConfig,
    ckpt: &Checkpoint,
    opts: &ExportOptions,
    out_dir: &Path,
) -> Result<ExportSummary> {
    std::fs::create_dir_all(out_dir).map_err(|e| ExportError::Io {
        action: "creating",
        path: out_dir.to_path_buf(),
        source: e,
    })?;
    let image_model = out_dir.join(IMAGE_MODEL_FILE);
    let text_model = out_dir.join(TEXT_MODEL_FILE);
    let image_bytes = image_encoder(cfg, ckpt, opts)?.to_bytes()?;
    write_atomic(&image_model, &image_bytes)?;
    let text_bytes = text_encoder(cfg, ckpt, opts)?.to_bytes()?;
    write_atomic(&text_model, &text_bytes)?;
    let config = out_dir.join(CONFIG_FILE);
    let config_json = cfg
        .to_json_string()
        .map_err(|e| ExportError::Config(e.to_string()))?;
    write_atomic(&config, format!("{config_json}\n").as_bytes())?;
    let manifest = out_dir.join(MANIFEST_FILE);
    let doc = serde_json::json!({
        "format": "hq-clip-onnx",
        "format_version": FORMAT_VERSION,
        "producer": format!("hq-export {}", env!("CARGO_PKG_VERSION")),
        "model_name": opts.model_name,
        "source_checkpoint": ckpt.path.display().to_string(),
        "source_sha256": ckpt.sha256,
        "precision": opts.precision.as_str(),
        "normalized": opts.normalize,
        "opset": OPSET,
        "files": {
            IMAGE_MODEL_FILE: {
                "bytes": image_bytes.len(),
                "sha256": crate::checkpoint::sha256_hex(&image_bytes),
                "input": IMAGE_INPUT,
                "output": IMAGE_OUTPUT,
            },
            TEXT_MODEL_FILE: {
                "bytes": text_bytes.len(),
                "sha256": crate::checkpoint::sha256_hex(&text_bytes),
                "input": TEXT_INPUT,
                "output": TEXT_OUTPUT,
            },
            CONFIG_FILE: {},
        },
    });
    let text = serde_json::to_string_pretty(&doc).unwrap_or_default();
    write_atomic(&manifest, format!("{text}\n").as_bytes())?;
    Ok(ExportSummary {
        image_model,
        text_model,
        config,
        manifest,
        bytes: (image_bytes.len() + text_bytes.len()) as u64,
    })
}
