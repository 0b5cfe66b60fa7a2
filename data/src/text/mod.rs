//! Text handling: caption segmentation (the paper's one-random-segment training text), tag
//! vocabularies (short-tag classification targets) and the two tokenizers open_clip models use.

pub mod clean;
pub mod hf_tokenizer;
pub mod segment;
pub mod tags;
pub mod tokenizer;

use crate::error::Result;
use hf_tokenizer::HfTokenizer;
use tokenizer::ClipTokenizer;

/// The tokenizer a CLIP model's text tower reads: open_clip's CLIP BPE (most models) or a Hugging
/// Face tokenizer (a `text_cfg` with `hf_tokenizer_name`, e.g. CLIPA's WordPiece). Both give rows
/// of exactly `context_length` ids.
pub enum TextTokenizer {
    Clip(ClipTokenizer),
    Hf(HfTokenizer),
}

impl TextTokenizer {
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
        Self::Clip(t)
    }
}

impl From<HfTokenizer> for TextTokenizer {
    fn from(t: HfTokenizer) -> Self {
        Self::Hf(t)
    }
}
