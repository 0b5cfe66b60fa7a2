//! Text handling: caption segmentation (the paper's one-random-segment training text), tag
//! vocabularies (short-tag classification targets) and the two tokenizers open_clip models use.

pub mod clean;
pub mod hf_tokenizer;
pub mod segment;
pub mod tags;
pub mod tokenizer;

use std::path::Path;

use serde_json::Value;

use crate::error::{DataError, Result};
use hf_tokenizer::{HfTokenizer, HfTokenizerOptions};
use tokenizer::ClipTokenizer;

/// What in an open_clip model config (`text_cfg`) decides the tokenizer.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokenizerSpec<'a> {
    pub context_length: usize,
    /// Set: a Hugging Face tokenizer (from a folder on disk); unset: open_clip's CLIP BPE.
    pub hf_tokenizer_name: Option<&'a str>,
    pub tokenizer_mode: Option<&'a str>,
    pub tokenizer_kwargs: Option<&'a Value>,
}

impl<'a> TokenizerSpec<'a> {
    /// From a `text_cfg` JSON object (context length 77 when absent, as in open_clip).
    pub fn from_text_cfg(text_cfg: &'a Value) -> Result<Self> {
        let context_length = match text_cfg.get("context_length") {
            None => tokenizer::DEFAULT_CONTEXT_LENGTH,
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .filter(|&n| n > 0)
                .ok_or_else(|| {
                    DataError::Tokenizer(format!(
                        "text_cfg.context_length must be a positive integer, not {v}"
                    ))
                })?,
        };
        Ok(Self {
            context_length,
            hf_tokenizer_name: text_cfg.get("hf_tokenizer_name").and_then(Value::as_str),
            tokenizer_mode: text_cfg.get("tokenizer_mode").and_then(Value::as_str),
            tokenizer_kwargs: text_cfg.get("tokenizer_kwargs"),
        })
    }
}

/// The tokenizer a CLIP model's text tower reads: open_clip's CLIP BPE (most models) or a Hugging
/// Face tokenizer (a `text_cfg` with `hf_tokenizer_name`, e.g. CLIPA's WordPiece). Both give rows
/// of exactly `context_length` ids.
pub enum TextTokenizer {
    /// Boxed: the BPE tables make it the larger by far.
    Clip(Box<ClipTokenizer>),
    Hf(Box<HfTokenizer>),
}

impl TextTokenizer {
    /// The tokenizer a model with `spec` reads: CLIP BPE at its context length, or the Hugging
    /// Face tokenizer in `folder` (which must then hold `tokenizer.json`; nothing is downloaded).
    pub fn for_model(spec: &TokenizerSpec<'_>, folder: Option<&Path>) -> Result<Self> {
        let Some(name) = spec.hf_tokenizer_name else {
            return Ok(ClipTokenizer::from_bundled()?
                .with_context_length(spec.context_length)?
                .into());
        };
        let folder = folder.ok_or_else(|| {
            DataError::Tokenizer(format!(
                "the model reads the Hugging Face tokenizer {name:?} and no folder with its \
                 {} came with the weights (nothing is downloaded)",
                hf_tokenizer::TOKENIZER_FILE
            ))
        })?;
        let options = HfTokenizerOptions::from_text_cfg(
            spec.context_length,
            spec.tokenizer_mode,
            spec.tokenizer_kwargs,
        )?;
        Ok(HfTokenizer::from_folder(folder, options)?.into())
    }

    pub fn context_length(&self) -> usize {
        match self {
            Self::Clip(t) => t.context_length(),
            Self::Hf(t) => t.context_length(),
        }
    }

    /// One row of `context_length` ids (padded, truncated as open_clip does for this tokenizer).
    pub fn tokenize(&self, text: &str) -> Result<Vec<i64>> {
        match self {
            Self::Clip(t) => t.tokenize(text),
            Self::Hf(t) => t.tokenize(text),
        }
    }

    /// Many rows at once (in parallel), row-major.
    pub fn tokenize_batch_flat<S: AsRef<str> + Sync>(&self, texts: &[S]) -> Result<Vec<i64>> {
        match self {
            Self::Clip(t) => t.tokenize_batch_flat(texts),
            Self::Hf(t) => t.tokenize_batch_flat(texts),
        }
    }

    /// What it is, for logs: `"clip-bpe"` or `"hf:<folder>"`.
    pub fn describe(&self) -> String {
        match self {
            Self::Clip(_) => "clip-bpe".into(),
            Self::Hf(t) => format!("hf:{}", t.folder().display()),
        }
    }
}

impl From<ClipTokenizer> for TextTokenizer {
    fn from(t: ClipTokenizer) -> Self {
        Self::Clip(Box::new(t))
    }
}

impl From<HfTokenizer> for TextTokenizer {
    fn from(t: HfTokenizer) -> Self {
        Self::Hf(Box::new(t))
    }
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("kind", &self.describe())
            .field("context_length", &self.context_length())
            .finish()
    }
}
