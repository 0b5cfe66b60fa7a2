//! Model configuration: open_clip's model-config JSON (`{"embed_dim", "vision_cfg", "text_cfg",
//! "quick_gelu", ...}`), so any open_clip config file can be read and every config we write can be
//! read by open_clip (`open_clip.add_model_config(dir)` + `open_clip.create_model(name)`).
//!
//! Parsing checks every key against open_clip 3.3.0's `CLIPVisionCfg` / `CLIPTextCfg` / `CLIP`
//! arguments. A key we implement is read; a key that only matters to the tokenizer or is unused by
//! open_clip's plain `CLIP` in this configuration is accepted; a key that selects an architecture we
//! do not implement (timm or ResNet image towers, Hugging Face text towers, attentional pooling,
//! CoCa, custom attention blocks, ...) is an error naming the field, never silently ignored.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::TrainError;

/// open_clip's default `init_logit_scale`: ln(1 / 0.07).
pub fn default_logit_scale() -> f64 {
    (1.0f64 / 0.07).ln()
}

/// Names of the built-in presets, in the order of [`ClipConfig::preset`].
/// `ViT-B-16`, `ViT-L-14-quickgelu` and `ViT-L-14-CLIPA` are the families of the HQ-CLIP
/// releases (trained from scratch; OpenAI's ViT-L/14 fine-tuned; CLIPA's ViT-L/14).
pub const PRESET_NAMES: &[&str] = &[
    "hq-tiny",
    "hq-small",
    "ViT-B-32",
    "ViT-B-16",
    "ViT-L-14",
    "ViT-L-14-quickgelu",
    "ViT-L-14-CLIPA",
    "RN50",
];

/// An image or patch size: one integer (square) or `[height, width]`, as open_clip's `to_2tuple`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Size2 {
    Square(i64),
    HeightWidth([i64; 2]),
}

impl Size2 {
    pub fn height(self) -> i64 {
        match self {
            Size2::Square(s) => s,
            Size2::HeightWidth([h, _]) => h,
        }
    }

    pub fn width(self) -> i64 {
        match self {
            Size2::Square(s) => s,
            Size2::HeightWidth([_, w]) => w,
        }
    }
}

/// How the image tower pools its tokens (`vision_cfg.pool_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VisionPool {
    /// The class token (open_clip's default).
    #[default]
    Tok,
    /// Mean of the patch tokens (class token excluded).
    Avg,
}

/// How the text tower pools its tokens (`text_cfg.pool_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TextPool {
    /// The position of the largest token id, i.e. the end-of-text token (open_clip's default).
    #[default]
    Argmax,
    First,
    Last,
    /// The first position holding `text_cfg.eos_id`.
    Eos,
}

/// `text_cfg.proj_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum TextProjType {
    #[default]
    #[serde(rename = "linear")]
    Linear,
    /// No text projection: text features have the text width.
    #[serde(rename = "none")]
    NoProjection,
}

/// `act_kwargs`: keyword arguments of the activation (only `nn.GELU`'s `approximate`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActKwargs {
    /// `"none"` (exact erf GELU) or `"tanh"`.
    #[serde(default = "gelu_none")]
    pub approximate: String,
}

fn gelu_none() -> String {
    "none".to_string()
}

/// `norm_kwargs`: keyword arguments of the LayerNorms (only `eps`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct NormKwargs {
    #[serde(default = "default_ln_eps")]
    pub eps: f64,
}

/// `nn.LayerNorm`'s default epsilon.
pub fn default_ln_eps() -> f64 {
    1e-5
}

fn default_head_width() -> i64 {
    64
}
fn default_mlp_ratio() -> f64 {
    4.0
}
fn default_image_size() -> Size2 {
    Size2::Square(224)
}
fn default_patch_size() -> Size2 {
    Size2::Square(16)
}
fn default_vision_layers() -> VisionLayers {
    VisionLayers::Transformer(12)
}
fn default_vision_width() -> i64 {
    768
}
fn default_context_length() -> i64 {
    77
}
fn default_vocab_size() -> i64 {
    49408
}
fn default_text_width() -> i64 {
    512
}
fn default_text_heads() -> i64 {
    8
}
fn default_text_layers() -> i64 {
    12
}
fn default_eos_id() -> i64 {
    2
}
fn is_default_eos_id(id: &i64) -> bool {
    *id == default_eos_id()
}
fn is_false(b: &bool) -> bool {
    !*b
}
fn is_default<T: Default + PartialEq>(t: &T) -> bool {
    *t == T::default()
}

/// `vision_cfg.layers`, which also selects the image tower, as open_clip's `_build_vision_tower`
/// decides: an integer is the depth of a `VisionTransformer`; a list of four is the number of
/// bottleneck blocks per stage of a `ModifiedResNet` (the RN50 family: `[3, 4, 6, 3]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum VisionLayers {
    Transformer(i64),
    ResNet(Vec<i64>),
}

impl From<i64> for VisionLayers {
    fn from(depth: i64) -> Self {
        VisionLayers::Transformer(depth)
    }
}

impl VisionLayers {
    /// The ViT's depth; 0 for a ResNet.
    pub fn depth(&self) -> i64 {
        match self {
            VisionLayers::Transformer(d) => *d,
            VisionLayers::ResNet(_) => 0,
        }
    }

    /// The ResNet's blocks per stage; `None` for a ViT.
    pub fn resnet_blocks(&self) -> Option<&[i64]> {
        match self {
            VisionLayers::Transformer(_) => None,
            VisionLayers::ResNet(b) => Some(b),
        }
    }
}

/// `patch_size: null` (open_clip's ResNet configs) reads as the default; the ResNet ignores it.
fn patch_size_or_default<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Size2, D::Error> {
    Ok(Option::<Size2>::deserialize(d)?.unwrap_or_else(default_patch_size))
}

/// `vision_cfg`: open_clip's image tower, a `VisionTransformer` or (with a list of `layers`) a
/// `ModifiedResNet`. Field names and defaults are open_clip's `CLIPVisionCfg`; the ResNet reads
/// `image_size`, `layers`, `width` and `head_width` (heads = width * 32 / head_width) only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VisionConfig {
    #[serde(default = "default_image_size")]
    pub image_size: Size2,
    #[serde(default = "default_vision_layers")]
    pub layers: VisionLayers,
    #[serde(default = "default_vision_width")]
    pub width: i64,
    /// Heads = width / head_width.
    #[serde(default = "default_head_width")]
    pub head_width: i64,
    /// MLP hidden width = int(width * mlp_ratio).
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    #[serde(
        default = "default_patch_size",
        deserialize_with = "patch_size_or_default"
    )]
    pub patch_size: Size2,
    /// LayerScale (`ls_1.gamma`, `ls_2.gamma`) with this initial value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ls_init_value: Option<f64>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub no_ln_pre: bool,
    #[serde(default, skip_serializing_if = "is_default")]
    pub pool_type: VisionPool,
    /// Apply `ln_post` after pooling instead of before.
    #[serde(default, skip_serializing_if = "is_false")]
    pub final_ln_after_pool: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act_kwargs: Option<ActKwargs>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub norm_kwargs: Option<NormKwargs>,
}

impl VisionConfig {
    /// Whether the tower is open_clip's `ModifiedResNet` (a list of `layers`).
    pub fn is_resnet(&self) -> bool {
        self.layers.resnet_blocks().is_some()
    }

    /// Attention heads: of the ViT's blocks, or of the ResNet's attention pool (whose width is
    /// `width * 32`).
    pub fn heads(&self) -> i64 {
        if self.head_width <= 0 {
            0
        } else if self.is_resnet() {
            self.width * 32 / self.head_width
        } else {
            self.width / self.head_width
        }
    }

    pub fn mlp_width(&self) -> i64 {
        mlp_width(self.width, self.mlp_ratio)
    }

    /// Patches per side: (height / patch height, width / patch width).
    pub fn grid(&self) -> (i64, i64) {
        let (ph, pw) = (self.patch_size.height(), self.patch_size.width());
        if ph <= 0 || pw <= 0 {
            return (0, 0);
        }
        (self.image_size.height() / ph, self.image_size.width() / pw)
    }

    /// Tokens in the image sequence: patches plus the class token.
    pub fn num_positions(&self) -> i64 {
        let (gh, gw) = self.grid();
        gh * gw + 1
    }

    pub fn ln_eps(&self) -> f64 {
        self.norm_kwargs.map_or(default_ln_eps(), |n| n.eps)
    }
}

/// `text_cfg`: open_clip's built-in `TextTransformer`. Field names and defaults are open_clip's
/// `CLIPTextCfg`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextConfig {
    #[serde(default = "default_context_length")]
    pub context_length: i64,
    #[serde(default = "default_vocab_size")]
    pub vocab_size: i64,
    #[serde(default = "default_text_width")]
    pub width: i64,
    #[serde(default = "default_text_heads")]
    pub heads: i64,
    #[serde(default = "default_text_layers")]
    pub layers: i64,
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ls_init_value: Option<f64>,
    /// Bidirectional attention instead of the causal mask.
    #[serde(default, skip_serializing_if = "is_false")]
    pub no_causal_mask: bool,
    #[serde(default, skip_serializing_if = "is_default")]
    pub pool_type: TextPool,
    /// End-of-text id for `pool_type = "eos"`.
    #[serde(default = "default_eos_id", skip_serializing_if = "is_default_eos_id")]
    pub eos_id: i64,
    /// `text_projection` as `nn.Linear` with bias (`text_projection.weight`, `.bias`) instead of a
    /// bare `[width, embed_dim]` matrix.
    #[serde(default, skip_serializing_if = "is_false")]
    pub proj_bias: bool,
    #[serde(default, skip_serializing_if = "is_default")]
    pub proj_type: TextProjType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act_kwargs: Option<ActKwargs>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub norm_kwargs: Option<NormKwargs>,
    /// Tokenizer settings: kept so a config round-trips; they do not change the model. Note that a
    /// config naming a Hugging Face tokenizer does not use the CLIP BPE tokenizer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hf_tokenizer_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer_mode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer_kwargs: Option<Value>,
}

impl TextConfig {
    pub fn mlp_width(&self) -> i64 {
        mlp_width(self.width, self.mlp_ratio)
    }

    pub fn ln_eps(&self) -> f64 {
        self.norm_kwargs.map_or(default_ln_eps(), |n| n.eps)
    }
}

/// Python's `int(width * mlp_ratio)` (truncation toward zero).
fn mlp_width(width: i64, ratio: f64) -> i64 {
    (width as f64 * ratio) as i64
}

/// A CLIP model config in open_clip's model-config JSON layout.
///
/// Deserialising (from JSON or anything serde reads) checks every key (see the module docs) and
/// the values ([`ClipConfig::validate`]: positive sizes, heads dividing widths, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "Value")]
pub struct ClipConfig {
    pub embed_dim: i64,
    pub vision_cfg: VisionConfig,
    pub text_cfg: TextConfig,
    /// QuickGELU (x * sigmoid(1.702 x)) instead of GELU in both towers (OpenAI's checkpoints).
    #[serde(default, skip_serializing_if = "is_false")]
    pub quick_gelu: bool,
    /// Initial value of `logit_scale` (the log of the temperature's inverse); ln(1/0.07) if unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_logit_scale: Option<f64>,
    /// Adds a learned `logit_bias` (SigLIP-style) with this initial value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_logit_bias: Option<f64>,
    /// `logit_scale` (and `logit_bias`) of shape `[1]` instead of a scalar.
    #[serde(default, skip_serializing_if = "is_false")]
    pub nonscalar_logit_scale: bool,
}

/// The serde mirror of [`ClipConfig`], read after the keys were checked.
#[derive(Deserialize)]
struct RawClipConfig {
    embed_dim: i64,
    vision_cfg: VisionConfig,
    text_cfg: TextConfig,
    #[serde(default)]
    quick_gelu: bool,
    #[serde(default)]
    init_logit_scale: Option<f64>,
    #[serde(default)]
    init_logit_bias: Option<f64>,
    #[serde(default)]
    nonscalar_logit_scale: bool,
}

impl TryFrom<Value> for ClipConfig {
    type Error = TrainError;

    fn try_from(value: Value) -> Result<Self, Self::Error> {
        check_keys(&value)?;
        let raw: RawClipConfig =
            serde_json::from_value(value).map_err(|e| TrainError::ModelConfig {
                field: "(json)".into(),
                reason: e.to_string(),
            })?;
        let cfg = ClipConfig {
            embed_dim: raw.embed_dim,
            vision_cfg: raw.vision_cfg,
            text_cfg: raw.text_cfg,
            quick_gelu: raw.quick_gelu,
            init_logit_scale: raw.init_logit_scale,
            init_logit_bias: raw.init_logit_bias,
            nonscalar_logit_scale: raw.nonscalar_logit_scale,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

impl ClipConfig {
    /// Parses open_clip model-config JSON, checking keys and values.
    pub fn from_json_str(json: &str) -> Result<Self, TrainError> {
        let value: Value = serde_json::from_str(json).map_err(|e| TrainError::ModelConfig {
            field: "(json)".into(),
            reason: format!("not valid JSON: {e}"),
        })?;
        ClipConfig::try_from(value)
    }

    /// Reads an open_clip model-config JSON file.
    pub fn from_json_file(path: impl AsRef<Path>) -> Result<Self, TrainError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::ModelConfig {
            field: "(file)".into(),
            reason: format!("cannot read {}: {e}", path.display()),
        })?;
        Self::from_json_str(&text).map_err(|e| match e {
            TrainError::ModelConfig { field, reason } => TrainError::ModelConfig {
                field,
                reason: format!("{reason} (in {})", path.display()),
            },
            other => other,
        })
    }

    /// The config as open_clip model-config JSON (pretty-printed).
    pub fn to_json_string(&self) -> Result<String, TrainError> {
        serde_json::to_string_pretty(self).map_err(|e| TrainError::ModelConfig {
            field: "(json)".into(),
            reason: e.to_string(),
        })
    }

    /// Writes the config as `<dir>/<name>.json`, the layout `open_clip.add_model_config(dir)` reads
    /// (open_clip then knows the model as `name`).
    pub fn write_json_file(&self, path: impl AsRef<Path>) -> Result<(), TrainError> {
        let path = path.as_ref();
        let json = self.to_json_string()?;
        std::fs::write(path, json + "\n").map_err(|e| TrainError::ModelConfig {
            field: "(file)".into(),
            reason: format!("cannot write {}: {e}", path.display()),
        })
    }

    /// A built-in preset by name (see [`PRESET_NAMES`]); the same values as `training/presets/<name>.json`.
    pub fn preset(name: &str) -> Result<Self, TrainError> {
        match name {
            "hq-tiny" => Ok(Self::hq_tiny()),
            "hq-small" => Ok(Self::hq_small()),
            "ViT-B-32" => Ok(Self::vit_b_32()),
            "ViT-B-16" => Ok(Self::vit_b_16()),
            "ViT-L-14" => Ok(Self::vit_l_14()),
            "ViT-L-14-quickgelu" => Ok(Self::vit_l_14_quickgelu()),
            "ViT-L-14-CLIPA" => Ok(Self::vit_l_14_clipa()),
            "RN50" => Ok(Self::rn50()),
            other => Err(TrainError::ModelConfig {
                field: "(preset)".into(),
                reason: format!(
                    "unknown preset {other:?}; known: {}",
                    PRESET_NAMES.join(", ")
                ),
            }),
        }
    }

    fn standard(
        embed_dim: i64,
        image: (i64, i64, i64, i64, i64),
        text: (i64, i64, i64, i64),
    ) -> Self {
        let (image_size, patch_size, width, layers, head_width) = image;
        let (t_width, t_heads, t_layers, context_length) = text;
        ClipConfig {
            embed_dim,
            vision_cfg: VisionConfig {
                image_size: Size2::Square(image_size),
                layers: layers.into(),
                width,
                head_width,
                mlp_ratio: 4.0,
                patch_size: Size2::Square(patch_size),
                ls_init_value: None,
                no_ln_pre: false,
                pool_type: VisionPool::Tok,
                final_ln_after_pool: false,
                act_kwargs: None,
                norm_kwargs: None,
            },
            text_cfg: TextConfig {
                context_length,
                vocab_size: 49408,
                width: t_width,
                heads: t_heads,
                layers: t_layers,
                mlp_ratio: 4.0,
                ls_init_value: None,
                no_causal_mask: false,
                pool_type: TextPool::Argmax,
                eos_id: default_eos_id(),
                proj_bias: false,
                proj_type: TextProjType::Linear,
                act_kwargs: None,
                norm_kwargs: None,
                hf_tokenizer_name: None,
                tokenizer_mode: None,
                tokenizer_kwargs: None,
            },
            quick_gelu: false,
            init_logit_scale: None,
            init_logit_bias: None,
            nonscalar_logit_scale: false,
        }
    }

    /// A CPU-sized model for tests and smoke runs: 64 px images in 8 px patches, 4 layers of width
    /// 128 (4 heads) in both towers, 77-token context over the CLIP vocab, 128-d embeddings.
    pub fn hq_tiny() -> Self {
        Self::standard(128, (64, 8, 128, 4, 32), (128, 4, 4, 77))
    }

    /// A little bigger than `hq-tiny`, still CPU-sized: 128 px images in 16 px patches, 6 layers
    /// of width 256 (4 heads) in both towers, 256-d embeddings.
    pub fn hq_small() -> Self {
        Self::standard(256, (128, 16, 256, 6, 64), (256, 4, 6, 77))
    }

    /// open_clip's `ViT-B-32.json`.
    pub fn vit_b_32() -> Self {
        Self::standard(512, (224, 32, 768, 12, 64), (512, 8, 12, 77))
    }

    /// open_clip's `ViT-B-16.json`.
    pub fn vit_b_16() -> Self {
        Self::standard(512, (224, 16, 768, 12, 64), (512, 8, 12, 77))
    }

    /// open_clip's `ViT-L-14.json`.
    pub fn vit_l_14() -> Self {
        Self::standard(768, (224, 14, 1024, 24, 64), (768, 12, 12, 77))
    }

    /// open_clip's `RN50.json`: OpenAI's ResNet-50 image tower (`ModifiedResNet`, blocks
    /// `[3, 4, 6, 3]`, width 64, a 32-head attention pool) with the ViT-B text tower.
    pub fn rn50() -> Self {
        let mut cfg = Self::standard(1024, (224, 16, 64, 0, 64), (512, 8, 12, 77));
        cfg.vision_cfg.layers = VisionLayers::ResNet(vec![3, 4, 6, 3]);
        cfg
    }

    /// open_clip's `ViT-L-14-quickgelu.json`: OpenAI's ViT-L/14 (QuickGELU in both towers).
    pub fn vit_l_14_quickgelu() -> Self {
        Self {
            quick_gelu: true,
            ..Self::vit_l_14()
        }
    }

    /// open_clip's `ViT-L-14-CLIPA.json`: no pre-LN, average-pooled image tokens with the final
    /// LayerNorm after pooling; a bidirectional text tower over BERT's uncased WordPiece vocabulary
    /// (a Hugging Face tokenizer: `tokenizer.json` must come with the weights), context 32, the
    /// last token pooled, `[SEP]` ids replaced by 0.
    pub fn vit_l_14_clipa() -> Self {
        let mut cfg = Self::standard(768, (224, 14, 1024, 24, 64), (768, 12, 12, 32));
        cfg.vision_cfg.no_ln_pre = true;
        cfg.vision_cfg.pool_type = VisionPool::Avg;
        cfg.vision_cfg.final_ln_after_pool = true;
        let t = &mut cfg.text_cfg;
        t.vocab_size = 32000;
        t.hf_tokenizer_name = Some("bert-base-uncased".into());
        t.tokenizer_kwargs = Some(serde_json::json!({"strip_sep_token": true}));
        t.pool_type = TextPool::Last;
        t.no_causal_mask = true;
        cfg
    }

    /// `logit_scale`'s initial value.
    pub fn logit_scale_init(&self) -> f64 {
        self.init_logit_scale.unwrap_or_else(default_logit_scale)
    }

    /// Checks the values: positive sizes, heads dividing widths, patches tiling the image, known
    /// activation settings.
    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |field: &str, reason: String| {
            Err(TrainError::ModelConfig {
                field: field.to_string(),
                reason,
            })
        };
        let v = &self.vision_cfg;
        let t = &self.text_cfg;
        if v.is_resnet() {
            self.validate_resnet()?;
        }
        let positive: [(&str, i64); 11] = [
            ("embed_dim", self.embed_dim),
            (
                "vision_cfg.layers",
                if v.is_resnet() { 1 } else { v.layers.depth() },
            ),
            ("vision_cfg.width", v.width),
            ("vision_cfg.head_width", v.head_width),
            (
                "vision_cfg.image_size",
                v.image_size.height().min(v.image_size.width()),
            ),
            (
                "vision_cfg.patch_size",
                v.patch_size.height().min(v.patch_size.width()),
            ),
            ("text_cfg.context_length", t.context_length),
            ("text_cfg.vocab_size", t.vocab_size),
            ("text_cfg.width", t.width),
            ("text_cfg.heads", t.heads),
            ("text_cfg.layers", t.layers),
        ];
        for (field, value) in positive {
            if value <= 0 {
                return bad(field, format!("must be positive, got {value}"));
            }
        }
        if !v.is_resnet() && v.width % v.head_width != 0 {
            return bad(
                "vision_cfg.head_width",
                format!(
                    "{} does not divide vision_cfg.width {}",
                    v.head_width, v.width
                ),
            );
        }
        if t.width % t.heads != 0 {
            return bad(
                "text_cfg.heads",
                format!("{} does not divide text_cfg.width {}", t.heads, t.width),
            );
        }
        let (gh, gw) = v.grid();
        if !v.is_resnet() && (gh == 0 || gw == 0) {
            return bad(
                "vision_cfg.patch_size",
                format!(
                    "patch {:?} is larger than image {:?}",
                    v.patch_size, v.image_size
                ),
            );
        }
        if v.mlp_width() <= 0 || !v.mlp_ratio.is_finite() {
            return bad(
                "vision_cfg.mlp_ratio",
                format!("{} gives no MLP", v.mlp_ratio),
            );
        }
        if t.mlp_width() <= 0 || !t.mlp_ratio.is_finite() {
            return bad(
                "text_cfg.mlp_ratio",
                format!("{} gives no MLP", t.mlp_ratio),
            );
        }
        for (field, act) in [
            ("vision_cfg.act_kwargs", &v.act_kwargs),
            ("text_cfg.act_kwargs", &t.act_kwargs),
        ] {
            if let Some(act) = act {
                if self.quick_gelu {
                    return bad(
                        field,
                        "act_kwargs with quick_gelu = true (open_clip's QuickGELU takes no arguments)"
                            .into(),
                    );
                }
                if act.approximate != "none" && act.approximate != "tanh" {
                    return bad(
                        field,
                        format!(
                            "GELU approximate must be \"none\" or \"tanh\", got {:?}",
                            act.approximate
                        ),
                    );
                }
            }
        }
        for (field, norm) in [
            ("vision_cfg.norm_kwargs", &v.norm_kwargs),
            ("text_cfg.norm_kwargs", &t.norm_kwargs),
        ] {
            if let Some(n) = norm {
                if !(n.eps > 0.0 && n.eps.is_finite()) {
                    return bad(field, format!("eps must be positive, got {}", n.eps));
                }
            }
        }
        if t.pool_type == TextPool::Eos && !(0..t.vocab_size).contains(&t.eos_id) {
            return bad(
                "text_cfg.eos_id",
                format!("{} is outside the vocab (size {})", t.eos_id, t.vocab_size),
            );
        }
        for (field, value) in [
            ("init_logit_scale", self.init_logit_scale),
            ("init_logit_bias", self.init_logit_bias),
            ("vision_cfg.ls_init_value", v.ls_init_value),
            ("text_cfg.ls_init_value", t.ls_init_value),
        ] {
            if let Some(x) = value {
                if !x.is_finite() {
                    return bad(field, format!("must be finite, got {x}"));
                }
            }
        }
        Ok(())
    }

    /// The ResNet's own checks: four positive stage depths, a square image that the tower's
    /// 32x downsampling tiles exactly (open_clip sizes the attention pool's positional embedding
    /// for `image_size // 32` per side and fails at run time otherwise), heads dividing the pool's
    /// width, and none of the ViT-only settings (open_clip ignores them for a ResNet; we refuse
    /// them, so a config never means something it does not do).
    fn validate_resnet(&self) -> Result<(), TrainError> {
        let v = &self.vision_cfg;
        let bad = |field: &str, reason: String| {
            Err(TrainError::ModelConfig {
                field: field.to_string(),
                reason,
            })
        };
        let blocks = v.layers.resnet_blocks().unwrap_or(&[]);
        if blocks.len() != 4 || blocks.iter().any(|&b| b <= 0) {
            return bad(
                "vision_cfg.layers",
                format!("a ModifiedResNet needs four positive stage depths, got {blocks:?}"),
            );
        }
        let side = v.image_size.height();
        if v.image_size.width() != side || side <= 0 || side % 32 != 0 {
            return bad(
                "vision_cfg.image_size",
                format!(
                    "a ModifiedResNet needs a square image whose side is a multiple of 32, got {:?}",
                    v.image_size
                ),
            );
        }
        if v.width <= 0 || v.width % 2 != 0 {
            return bad(
                "vision_cfg.width",
                format!("must be positive and even (the stem's first convolutions are width / 2), got {}", v.width),
            );
        }
        if v.head_width <= 0 || (v.width * 32) % v.head_width != 0 {
            return bad(
                "vision_cfg.head_width",
                format!(
                    "{} does not divide the attention pool's width {} (vision_cfg.width * 32)",
                    v.head_width,
                    v.width * 32
                ),
            );
        }
        let vit_only = [
            ("vision_cfg.ls_init_value", v.ls_init_value.is_some()),
            ("vision_cfg.no_ln_pre", v.no_ln_pre),
            ("vision_cfg.pool_type", v.pool_type != VisionPool::Tok),
            ("vision_cfg.final_ln_after_pool", v.final_ln_after_pool),
            ("vision_cfg.act_kwargs", v.act_kwargs.is_some()),
            ("vision_cfg.norm_kwargs", v.norm_kwargs.is_some()),
            ("vision_cfg.mlp_ratio", v.mlp_ratio != default_mlp_ratio()),
        ];
        for (field, set) in vit_only {
            if set {
                return bad(
                    field,
                    "only applies to the VisionTransformer; a list of layers selects open_clip's \
                     ModifiedResNet, which has no such setting"
                        .into(),
                );
            }
        }
        Ok(())
    }
}

// ------------------------------------------------------------------------------------------
// Key checks
// ------------------------------------------------------------------------------------------

/// What we do with a config key.
enum Rule {
    /// Read into the config.
    Read,
    /// Accepted and dropped: it does not change open_clip's plain `CLIP` (preprocessing, tokenizer
    /// or settings only used together with a feature that is off).
    Inert,
    /// Only its default value (per the predicate) is supported; otherwise the reason is the error.
    DefaultOnly(fn(&Value) -> bool, &'static str),
}

fn is_null(v: &Value) -> bool {
    v.is_null()
}
fn is_falsy(v: &Value) -> bool {
    matches!(v, Value::Null | Value::Bool(false))
}
fn is_zero(v: &Value) -> bool {
    v.is_null() || v.as_f64() == Some(0.0)
}
fn is_learnable(v: &Value) -> bool {
    v.as_str() == Some("learnable")
}
fn is_default_block(v: &Value) -> bool {
    v.is_null() || v.as_str() == Some("default")
}
fn is_integer_or_integer_list(v: &Value) -> bool {
    v.is_i64() || v.as_array().is_some_and(|a| a.iter().all(Value::is_i64))
}
fn is_tok_or_avg(v: &Value) -> bool {
    matches!(v.as_str(), Some("tok" | "avg"))
}
fn is_text_pool(v: &Value) -> bool {
    matches!(v.as_str(), Some("argmax" | "first" | "last" | "eos"))
}

const CUSTOM_BLOCK: &str =
    "open_clip's custom attention block (qk_norm / scaled cosine attention / head or layer scaling) is not supported";

const TOP_KEYS: &[(&str, Rule)] = &[
    ("embed_dim", Rule::Read),
    ("vision_cfg", Rule::Read),
    ("text_cfg", Rule::Read),
    ("quick_gelu", Rule::Read),
    ("init_logit_scale", Rule::Read),
    ("init_logit_bias", Rule::Read),
    ("nonscalar_logit_scale", Rule::Read),
    ("output_dict", Rule::Inert),
    (
        "custom_text",
        Rule::DefaultOnly(
            is_falsy,
            "CustomTextCLIP (text tower under `text.*`) is not supported, only open_clip's CLIP",
        ),
    ),
    (
        "multimodal_cfg",
        Rule::DefaultOnly(is_null, "CoCa (multimodal decoder) is not supported"),
    ),
];

const VISION_KEYS: &[(&str, Rule)] = &[
    ("image_size", Rule::Read),
    (
        "layers",
        Rule::DefaultOnly(
            is_integer_or_integer_list,
            "must be an integer (a VisionTransformer's depth) or a list of integers (a ModifiedResNet's blocks per stage)",
        ),
    ),
    ("width", Rule::Read),
    ("head_width", Rule::Read),
    ("mlp_ratio", Rule::Read),
    ("patch_size", Rule::Read),
    ("ls_init_value", Rule::Read),
    ("no_ln_pre", Rule::Read),
    (
        "pool_type",
        Rule::DefaultOnly(is_tok_or_avg, "only \"tok\" and \"avg\" image pooling are supported"),
    ),
    ("final_ln_after_pool", Rule::Read),
    ("act_kwargs", Rule::Read),
    ("norm_kwargs", Rule::Read),
    (
        "patch_dropout",
        Rule::DefaultOnly(is_zero, "patch dropout is not implemented"),
    ),
    (
        "attentional_pool",
        Rule::DefaultOnly(is_falsy, "attentional pooling is not supported"),
    ),
    ("attn_pooler_queries", Rule::Inert),
    ("attn_pooler_heads", Rule::Inert),
    (
        "pos_embed_type",
        Rule::DefaultOnly(
            is_learnable,
            "only the learnable positional embedding is supported",
        ),
    ),
    (
        "output_tokens",
        Rule::DefaultOnly(is_falsy, "token outputs are not supported"),
    ),
    ("block_type", Rule::DefaultOnly(is_default_block, CUSTOM_BLOCK)),
    ("qk_norm", Rule::DefaultOnly(is_falsy, CUSTOM_BLOCK)),
    ("scaled_cosine_attn", Rule::DefaultOnly(is_falsy, CUSTOM_BLOCK)),
    ("scale_heads", Rule::DefaultOnly(is_falsy, CUSTOM_BLOCK)),
    ("scale_attn_inner", Rule::DefaultOnly(is_falsy, CUSTOM_BLOCK)),
    ("scale_attn", Rule::DefaultOnly(is_falsy, CUSTOM_BLOCK)),
    ("scale_fc", Rule::DefaultOnly(is_falsy, CUSTOM_BLOCK)),
    (
        "timm_model_name",
        Rule::DefaultOnly(
            is_null,
            "timm image towers are not supported (only open_clip's own VisionTransformer)",
        ),
    ),
    ("timm_model_pretrained", Rule::Inert),
    ("timm_pool", Rule::Inert),
    ("timm_proj", Rule::Inert),
    ("timm_proj_bias", Rule::Inert),
    ("timm_drop", Rule::Inert),
    ("timm_drop_path", Rule::Inert),
];

const TEXT_KEYS: &[(&str, Rule)] = &[
    ("context_length", Rule::Read),
    ("vocab_size", Rule::Read),
    ("width", Rule::Read),
    ("heads", Rule::Read),
    ("layers", Rule::Read),
    ("mlp_ratio", Rule::Read),
    ("ls_init_value", Rule::Read),
    ("no_causal_mask", Rule::Read),
    (
        "pool_type",
        Rule::DefaultOnly(
            is_text_pool,
            "only \"argmax\", \"first\", \"last\" and \"eos\" text pooling are supported",
        ),
    ),
    ("eos_id", Rule::Read),
    ("proj_bias", Rule::Read),
    ("proj_type", Rule::Read),
    ("act_kwargs", Rule::Read),
    ("norm_kwargs", Rule::Read),
    ("hf_tokenizer_name", Rule::Read),
    ("tokenizer_mode", Rule::Read),
    ("tokenizer_kwargs", Rule::Read),
    ("pad_id", Rule::Inert),
    (
        "embed_cls",
        Rule::DefaultOnly(is_falsy, "a text class token (CoCa) is not supported"),
    ),
    (
        "output_tokens",
        Rule::DefaultOnly(is_falsy, "token outputs are not supported"),
    ),
    (
        "block_type",
        Rule::DefaultOnly(is_default_block, CUSTOM_BLOCK),
    ),
    ("qk_norm", Rule::DefaultOnly(is_falsy, CUSTOM_BLOCK)),
    (
        "scaled_cosine_attn",
        Rule::DefaultOnly(is_falsy, CUSTOM_BLOCK),
    ),
    ("scale_heads", Rule::DefaultOnly(is_falsy, CUSTOM_BLOCK)),
    (
        "scale_attn_inner",
        Rule::DefaultOnly(is_falsy, CUSTOM_BLOCK),
    ),
    ("scale_attn", Rule::DefaultOnly(is_falsy, CUSTOM_BLOCK)),
    ("scale_fc", Rule::DefaultOnly(is_falsy, CUSTOM_BLOCK)),
    (
        "hf_model_name",
        Rule::DefaultOnly(
            is_null,
            "Hugging Face text towers are not supported (only open_clip's own TextTransformer)",
        ),
    ),
    ("hf_model_pretrained", Rule::Inert),
    ("hf_proj_type", Rule::Inert),
    ("hf_pooler_type", Rule::Inert),
];

const ACT_KEYS: &[(&str, Rule)] = &[("approximate", Rule::Read)];
const NORM_KEYS: &[(&str, Rule)] = &[("eps", Rule::Read)];

fn check_object(value: &Value, prefix: &str, rules: &[(&str, Rule)]) -> Result<(), TrainError> {
    let section = if prefix.is_empty() {
        "(top level)"
    } else {
        prefix
    };
    let Some(map) = value.as_object() else {
        return Err(TrainError::ModelConfig {
            field: section.to_string(),
            reason: format!("expected a JSON object, got {value}"),
        });
    };
    for (key, v) in map {
        let field = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match rules.iter().find(|(name, _)| name == key) {
            None => {
                return Err(TrainError::ModelConfig {
                    field,
                    reason: "unknown field (not an open_clip 3.3 CLIP config field)".into(),
                })
            }
            Some((_, Rule::DefaultOnly(ok, reason))) if !ok(v) => {
                return Err(TrainError::ModelConfig {
                    field,
                    reason: format!("{v} is not supported: {reason}"),
                })
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Checks every key of a model-config JSON value (see the module docs).
fn check_keys(value: &Value) -> Result<(), TrainError> {
    check_object(value, "", TOP_KEYS)?;
    for section in ["embed_dim", "vision_cfg", "text_cfg"] {
        if value.get(section).is_none() {
            return Err(TrainError::ModelConfig {
                field: section.into(),
                reason: "missing".into(),
            });
        }
    }
    for (section, rules) in [("vision_cfg", VISION_KEYS), ("text_cfg", TEXT_KEYS)] {
        let sub = &value[section];
        check_object(sub, section, rules)?;
        for (key, inner) in [("act_kwargs", ACT_KEYS), ("norm_kwargs", NORM_KEYS)] {
            match sub.get(key) {
                None | Some(Value::Null) => {}
                Some(v) => check_object(v, &format!("{section}.{key}"), inner)?,
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn presets_dir() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("presets")
    }

    #[test]
    fn preset_files_match_the_named_constructors() {
        for name in PRESET_NAMES {
            let path = presets_dir().join(format!("{name}.json"));
            let from_file = ClipConfig::from_json_file(&path).expect("preset file parses");
            let named = ClipConfig::preset(name).expect("named preset");
            assert_eq!(from_file, named, "{}", path.display());
            named.validate().expect("preset validates");
            // Our serialisation reads back to the same config.
            let json = named.to_json_string().expect("serialises");
            assert_eq!(ClipConfig::from_json_str(&json).expect("round trip"), named);
        }
        assert!(ClipConfig::preset("ViT-X-99").is_err());
        let tiny = ClipConfig::hq_tiny();
        assert_eq!(tiny.vision_cfg.heads(), 4);
        assert_eq!(tiny.vision_cfg.num_positions(), 65);
        let b32 = ClipConfig::vit_b_32();
        assert_eq!(
            (b32.vision_cfg.heads(), b32.vision_cfg.mlp_width()),
            (12, 3072)
        );
        assert!((b32.logit_scale_init() - 2.659_260_036_932_778).abs() < 1e-12);
    }

    #[test]
    fn reads_optional_fields() {
        let cfg = ClipConfig::from_json_str(
            r#"{"embed_dim": 64, "quick_gelu": true, "init_logit_bias": -10,
                "nonscalar_logit_scale": true,
                "vision_cfg": {"image_size": [32, 48], "patch_size": 16, "layers": 2, "width": 64,
                               "head_width": 16, "mlp_ratio": 4.9231, "ls_init_value": 1e-4,
                               "pool_type": "avg", "no_ln_pre": true, "final_ln_after_pool": true,
                               "timm_pool": "avg", "norm_kwargs": {"eps": 1e-6}},
                "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2,
                             "layers": 1, "pool_type": "eos", "eos_id": 99, "proj_bias": true,
                             "no_causal_mask": true, "hf_tokenizer_name": "bert-base-uncased",
                             "tokenizer_kwargs": {"strip_sep_token": true}, "pad_id": 0}}"#,
        )
        .expect("parses");
        assert!(cfg.quick_gelu);
        assert_eq!(cfg.init_logit_bias, Some(-10.0));
        assert_eq!(cfg.vision_cfg.grid(), (2, 3));
        assert_eq!(cfg.vision_cfg.heads(), 4);
        assert_eq!(cfg.vision_cfg.mlp_width(), 315); // int(64 * 4.9231)
        assert_eq!(cfg.vision_cfg.pool_type, VisionPool::Avg);
        assert_eq!(cfg.vision_cfg.ln_eps(), 1e-6);
        assert_eq!(cfg.text_cfg.pool_type, TextPool::Eos);
        assert!(cfg.text_cfg.no_causal_mask && cfg.text_cfg.proj_bias);
        let json = cfg.to_json_string().expect("serialises");
        assert_eq!(ClipConfig::from_json_str(&json).expect("round trip"), cfg);
        // Serde's own entry point runs the same key checks.
        let via_serde: Result<ClipConfig, _> = serde_json::from_str(&json);
        assert_eq!(via_serde.expect("serde"), cfg);
    }

    #[test]
    fn resnet_configs_read_and_refuse_vit_settings() {
        let rn = ClipConfig::preset("RN50").expect("RN50");
        assert!(rn.vision_cfg.is_resnet());
        assert_eq!(rn.vision_cfg.heads(), 32); // open_clip: width * 32 // head_width
        let json = |patch: &str| {
            format!(
                r#"{{"embed_dim": 64, "vision_cfg": {{"image_size": 64, "layers": [1, 1, 1, 1],
                     "width": 16, "head_width": 32{patch}}},
                     "text_cfg": {{"width": 64, "heads": 2, "layers": 1}}}}"#
            )
        };
        let small = ClipConfig::from_json_str(&json(r#", "patch_size": null"#)).expect("parses");
        assert_eq!(small.vision_cfg.heads(), 16);
        for (extra, field) in [
            (r#", "ls_init_value": 0.1"#, "vision_cfg.ls_init_value"),
            (r#", "pool_type": "avg""#, "vision_cfg.pool_type"),
            (r#", "mlp_ratio": 2.0"#, "vision_cfg.mlp_ratio"),
            (r#", "head_width": 24"#, "vision_cfg.head_width"),
        ] {
            let text = json(extra).replace(r#""head_width": 32, "head_width""#, r#""head_width""#);
            let err = err_of(&text);
            assert!(err.contains(&format!("`{field}`")), "{field}: {err}");
        }
        let odd = json("").replace(r#""image_size": 64"#, r#""image_size": 80"#);
        assert!(err_of(&odd).contains("multiple of 32"));
        let three = json("").replace("[1, 1, 1, 1]", "[1, 1, 1]");
        assert!(err_of(&three).contains("four positive stage depths"));
    }

    fn err_of(json: &str) -> String {
        match ClipConfig::from_json_str(json) {
            Ok(cfg) => panic!("expected an error, parsed {cfg:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn unsupported_features_name_the_field() {
        let base = ClipConfig::hq_tiny().to_json_string().expect("json");
        let with = |section: Option<&str>, key: &str, value: Value| -> String {
            let mut v: Value = serde_json::from_str(&base).expect("json");
            match section {
                Some(s) => v[s][key] = value,
                None => v[key] = value,
            }
            v.to_string()
        };
        let cases = [
            (
                with(
                    Some("vision_cfg"),
                    "timm_model_name",
                    "convnext_base".into(),
                ),
                "vision_cfg.timm_model_name",
            ),
            (
                with(Some("vision_cfg"), "layers", serde_json::json!([3, 4, 6])),
                "vision_cfg.layers",
            ),
            (
                with(Some("vision_cfg"), "attentional_pool", true.into()),
                "vision_cfg.attentional_pool",
            ),
            (
                with(Some("vision_cfg"), "patch_dropout", 0.5.into()),
                "vision_cfg.patch_dropout",
            ),
            (
                with(Some("vision_cfg"), "pool_type", "none".into()),
                "vision_cfg.pool_type",
            ),
            (
                with(Some("vision_cfg"), "qk_norm", true.into()),
                "vision_cfg.qk_norm",
            ),
            (
                with(Some("vision_cfg"), "pos_embed_type", "sin_cos_2d".into()),
                "vision_cfg.pos_embed_type",
            ),
            (
                with(Some("text_cfg"), "hf_model_name", "roberta-base".into()),
                "text_cfg.hf_model_name",
            ),
            (
                with(Some("text_cfg"), "embed_cls", true.into()),
                "text_cfg.embed_cls",
            ),
            (
                with(Some("text_cfg"), "pool_type", "none".into()),
                "text_cfg.pool_type",
            ),
            (
                with(Some("text_cfg"), "bogus_field", 1.into()),
                "text_cfg.bogus_field",
            ),
            (with(None, "custom_text", true.into()), "custom_text"),
            (
                with(None, "multimodal_cfg", serde_json::json!({"width": 512})),
                "multimodal_cfg",
            ),
            (with(Some("text_cfg"), "heads", 3.into()), "text_cfg.heads"),
            (
                with(Some("vision_cfg"), "head_width", 48.into()),
                "vision_cfg.head_width",
            ),
            (
                with(Some("vision_cfg"), "patch_size", 128.into()),
                "vision_cfg.patch_size",
            ),
            (
                with(
                    Some("text_cfg"),
                    "norm_kwargs",
                    serde_json::json!({"elementwise_affine": false}),
                ),
                "text_cfg.norm_kwargs.elementwise_affine",
            ),
        ];
        for (json, field) in cases {
            let err = err_of(&json);
            assert!(err.contains(&format!("`{field}`")), "{field}: {err}");
        }
        let mut quick: Value = serde_json::from_str(&base).expect("json");
        quick["quick_gelu"] = true.into();
        quick["text_cfg"]["act_kwargs"] = serde_json::json!({"approximate": "tanh"});
        assert!(err_of(&quick.to_string()).contains("`text_cfg.act_kwargs`"));
        assert!(err_of(r#"{"vision_cfg": {}, "text_cfg": {}}"#).contains("`embed_dim`"));
        assert!(err_of("{not json").contains("not valid JSON"));
    }
}
