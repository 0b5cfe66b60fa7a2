//! open_clip's `HFTokenizer` (the text side of CLIPA, SigLIP-style and other models whose
//! `text_cfg` names `hf_tokenizer_name`), from a Hugging Face tokenizer folder on disk.
//!
//! open_clip 3.3 tokenizes a batch as
//! `AutoTokenizer(texts, max_length=L, padding="max_length", truncation=True).input_ids` after its
//! clean-up (`clean="whitespace"` unless `tokenizer_kwargs` says otherwise), then, with
//! `strip_sep_token`, replaces every `[SEP]` id by 0. This module does the same with the
//! `tokenizers` crate, which is the library behind transformers' fast tokenizers, so a
//! `tokenizer.json` means the same thing to both:
//! - the model (WordPiece, BPE, ...), normaliser, pre-tokeniser and post-processor (`[CLS] ... [SEP]`)
//!   come from `tokenizer.json`;
//! - what transformers adds on top is read from `tokenizer_config.json` (else
//!   `special_tokens_map.json`): the pad and sep tokens, `padding_side`, `truncation_side`;
//! - truncation is `longest_first` to `L` ids including the special tokens, padding to exactly `L`.
//!
//! No hub: the folder must already hold `tokenizer.json` (open_clip's `local-dir:` schema reads the
//! same files). Parity with open_clip's `HFTokenizer` on a WordPiece tokenizer the test builds is
//! checked by `tests/tests/tokenizer_parity.rs`.

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde_json::Value;
use tokenizers::{
    PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationDirection,
    TruncationParams, TruncationStrategy,
};

use super::clean::{basic_clean, python_lower, whitespace_clean};
use crate::error::{DataError, Result};

/// The tokenizer file of a Hugging Face tokenizer folder.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// transformers' settings beside it (special tokens, padding and truncation sides).
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
/// Older folders keep the special tokens here instead.
pub const SPECIAL_TOKENS_FILE: &str = "special_tokens_map.json";
/// Every file of a folder that this tokenizer reads (the ones to copy along with a model).
pub const TOKENIZER_FILES: [&str; 3] = [TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_FILE];

/// open_clip's `clean` argument: the text clean-up before tokenizing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TextClean {
    /// `whitespace_clean(basic_clean(text))`: HFTokenizer's default (case is the tokenizer's
    /// business).
    #[default]
    Whitespace,
    /// The same, then Python's `lower()`.
    Lower,
}

/// open_clip's `HFTokenizer` arguments that change ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HfTokenizerOptions {
    pub context_length: usize,
    pub clean: TextClean,
    /// Replace the sep token's id by 0 (CLIPA).
    pub strip_sep_token: bool,
}

impl HfTokenizerOptions {
    /// The options of a model config: `text_cfg.context_length`, `tokenizer_mode` and
    /// `tokenizer_kwargs` (open_clip passes the kwargs to `HFTokenizer`). Settings that would
    /// change ids in ways not implemented here are refused by name.
    pub fn from_text_cfg(
        context_length: usize,
        tokenizer_mode: Option<&str>,
        tokenizer_kwargs: Option<&Value>,
    ) -> Result<Self> {
        if let Some(mode) = tokenizer_mode.filter(|m| !m.is_empty()) {
            return Err(DataError::Tokenizer(format!(
                "text_cfg.tokenizer_mode {mode:?} is not supported (only the standard mode)"
            )));
        }
        let mut options = Self {
            context_length,
            clean: TextClean::Whitespace,
            strip_sep_token: false,
        };
        let Some(kwargs) = tokenizer_kwargs else {
            return Ok(options);
        };
        let map = kwargs.as_object().ok_or_else(|| {
            DataError::Tokenizer("text_cfg.tokenizer_kwargs must be a JSON object".into())
        })?;
        for (key, value) in map {
            match key.as_str() {
                "strip_sep_token" => {
                    options.strip_sep_token = value.as_bool().ok_or_else(|| {
                        DataError::Tokenizer(format!(
                            "tokenizer_kwargs.strip_sep_token must be true or false, not {value}"
                        ))
                    })?
                }
                "clean" => {
                    options.clean = match value.as_str() {
                        Some("whitespace") => TextClean::Whitespace,
                        Some("lower") => TextClean::Lower,
                        _ => {
                            return Err(DataError::Tokenizer(format!(
                                "tokenizer_kwargs.clean {value} is not supported \
                                 (\"whitespace\" or \"lower\")"
                            )))
                        }
                    }
                }
                other => {
                    return Err(DataError::Tokenizer(format!(
                        "tokenizer_kwargs.{other} is not supported (only strip_sep_token and \
                         clean)"
                    )))
                }
            }
        }
        Ok(options)
    }
}

/// A Hugging Face tokenizer with open_clip's `HFTokenizer` behaviour (see the module docs).
pub struct HfTokenizer {
    inner: Tokenizer,
    options: HfTokenizerOptions,
    /// The id `strip_sep_token` replaces by 0.
    sep_id: Option<u32>,
    folder: PathBuf,
}

impl HfTokenizer {
    /// Reads `folder/tokenizer.json` and transformers' settings beside it.
    pub fn from_folder(folder: impl AsRef<Path>, options: HfTokenizerOptions) -> Result<Self> {
        let folder = folder.as_ref();
        let file = folder.join(TOKENIZER_FILE);
        if !file.is_file() {
            return Err(DataError::Tokenizer(format!(
                "{}: no {TOKENIZER_FILE} (a Hugging Face tokenizer folder is needed; nothing is \
                 downloaded)",
                folder.display()
            )));
        }
        if options.context_length == 0 {
            return Err(DataError::Tokenizer(
                "context length must be positive".into(),
            ));
        }
        let bytes = std::fs::read(&file).map_err(|e| DataError::io(&file, e))?;
        // tokenizers 0.22 panics (an `expect` in its decoder deserialiser) on a file that ends
        // inside "decoder" (found by the `hf_tokenizer_dir` fuzz target); JSON that does not
        // parse is refused here first, with serde_json's line and column.
        serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).map_err(|source| {
            DataError::Json {
                path: file.clone(),
                source,
            }
        })?;
        let mut inner = Tokenizer::from_bytes(&bytes)
            .map_err(|e| DataError::Tokenizer(format!("{}: {e}", file.display())))?;
        let settings = TransformersSettings::read(folder)?;
        let token_id = |what: &str, token: &str| {
            inner.token_to_id(token).ok_or_else(|| {
                DataError::Tokenizer(format!(
                    "{}: the {what} token {token:?} is not in the vocabulary",
                    folder.display()
                ))
            })
        };
        let pad_token = settings.pad_token.clone().ok_or_else(|| {
            DataError::Tokenizer(format!(
                "{}: no pad token (tokenizer_config.json's pad_token); padding to the context \
                 length needs one",
                folder.display()
            ))
        })?;
        let pad_id = token_id("pad", &pad_token)?;
        let sep_id = match (&settings.sep_token, options.strip_sep_token) {
            (Some(t), _) => Some(token_id("sep", t)?),
            (None, true) => {
                return Err(DataError::Tokenizer(format!(
                    "{}: strip_sep_token is set but the tokenizer has no sep token",
                    folder.display()
                )))
            }
            (None, false) => None,
        };
        inner
            .with_truncation(Some(TruncationParams {
                direction: settings.truncation_side,
                max_length: options.context_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| DataError::Tokenizer(format!("{}: {e}", file.display())))?;
        inner.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(options.context_length),
            direction: settings.padding_side,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token,
        }));
        Ok(Self {
            inner,
            options,
            sep_id,
            folder: folder.to_path_buf(),
        })
    }

    /// The folder the tokenizer was read from.
    pub fn folder(&self) -> &Path {
        &self.folder
    }

    pub fn context_length(&self) -> usize {
        self.options.context_length
    }

    /// Ids including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The clean-up open_clip applies before the tokenizer sees the text.
    pub fn clean(&self, text: &str) -> String {
        let cleaned = whitespace_clean(&basic_clean(text));
        match self.options.clean {
            TextClean::Whitespace => cleaned,
            TextClean::Lower => python_lower(&cleaned),
        }
    }

    /// One row of exactly `context_length` ids.
    pub fn tokenize(&self, text: &str) -> Result<Vec<i64>> {
        let encoding = self
            .inner
            .encode(self.clean(text), true)
            .map_err(|e| DataError::Tokenizer(e.to_string()))?;
        let ids = encoding.get_ids();
        if ids.len() != self.options.context_length {
            // Padding and truncation are both set, so this is a tokenizer.json we misread.
            return Err(DataError::Tokenizer(format!(
                "{}: expected {} ids after padding and truncation, got {}",
                self.folder.display(),
                self.options.context_length,
                ids.len()
            )));
        }
        Ok(ids
            .iter()
            .map(|&id| match self.sep_id {
                Some(sep) if self.options.strip_sep_token && id == sep => 0,
                _ => id as i64,
            })
            .collect())
    }

    /// [`tokenize`](Self::tokenize) over many texts in parallel, as one row-major buffer.
    pub fn tokenize_batch_flat<S: AsRef<str> + Sync>(&self, texts: &[S]) -> Result<Vec<i64>> {
        let rows: Vec<Vec<i64>> = texts
            .par_iter()
            .map(|t| self.tokenize(t.as_ref()))
            .collect::<Result<_>>()?;
        Ok(rows.concat())
    }
}

/// What transformers reads from `tokenizer_config.json` / `special_tokens_map.json`.
struct TransformersSettings {
    pad_token: Option<String>,
    sep_token: Option<String>,
    padding_side: PaddingDirection,
    truncation_side: TruncationDirection,
}

impl TransformersSettings {
    fn read(folder: &Path) -> Result<Self> {
        let read_json = |name: &str| -> Result<Option<Value>> {
            let path = folder.join(name);
            match std::fs::read(&path) {
                Ok(bytes) => serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|source| DataError::Json { path, source }),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(DataError::io(path, e)),
            }
        };
        let config = read_json(TOKENIZER_CONFIG_FILE)?.unwrap_or(Value::Null);
        let special = read_json(SPECIAL_TOKENS_FILE)?.unwrap_or(Value::Null);
        // A special token is a string or an AddedToken dict (`{"content": ...}`); the config file
        // wins over the older map, as in transformers.
        let token = |key: &str| {
            [&config, &special].iter().find_map(|v| match v.get(key)? {
                Value::String(s) => Some(s.clone()),
                Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
                _ => None,
            })
        };
        let side = |key: &str| -> Result<bool> {
            match config.get(key) {
                None | Some(Value::Null) => Ok(false),
                Some(Value::String(s)) if s == "right" => Ok(false),
                Some(Value::String(s)) if s == "left" => Ok(true),
                Some(other) => Err(DataError::Tokenizer(format!(
                    "{}: {key} must be \"left\" or \"right\", not {other}",
                    folder.join(TOKENIZER_CONFIG_FILE).display()
                ))),
            }
        };
        Ok(Self {
            pad_token: token("pad_token"),
            sep_token: token("sep_token"),
            padding_side: match side("padding_side")? {
                true => PaddingDirection::Left,
                false => PaddingDirection::Right,
            },
            truncation_side: match side("truncation_side")? {
                true => TruncationDirection::Left,
                false => TruncationDirection::Right,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_come_from_tokenizer_kwargs_and_refuse_the_unknown() {
        let kw = serde_json::json!({"strip_sep_token": true, "clean": "lower"});
        let o = HfTokenizerOptions::from_text_cfg(32, None, Some(&kw)).expect("options");
        assert_eq!(
            o,
            HfTokenizerOptions {
                context_length: 32,
                clean: TextClean::Lower,
                strip_sep_token: true
            }
        );
        let e = HfTokenizerOptions::from_text_cfg(32, Some("clips"), None).expect_err("mode");
        assert!(e.to_string().contains("clips"), "{e}");
        let kw = serde_json::json!({"language": "en"});
        let e = HfTokenizerOptions::from_text_cfg(32, None, Some(&kw)).expect_err("kwarg");
        assert!(e.to_string().contains("tokenizer_kwargs.language"), "{e}");
    }

    /// Regression (fuzzing): a tokenizer.json cut inside "decoder" made the tokenizers crate
    /// panic; it is an error naming the file now.
    #[test]
    fn a_tokenizer_json_cut_short_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join(TOKENIZER_FILE),
            r#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
                "normalizer": null, "pre_tokenizer": null, "post_processor": null,
                "decoder": {"type": "WordPi"#,
        )
        .expect("write");
        let o = HfTokenizerOptions::from_text_cfg(8, None, None).expect("options");
        let e = HfTokenizer::from_folder(dir.path(), o)
            .err()
            .expect("cut short");
        assert!(e.to_string().contains("tokenizer.json"), "{e}");
    }

    #[test]
    fn a_folder_without_tokenizer_json_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let o = HfTokenizerOptions::from_text_cfg(8, None, None).expect("options");
        let e = HfTokenizer::from_folder(dir.path(), o)
            .err()
            .expect("no file");
        assert!(e.to_string().contains("no tokenizer.json"), "{e}");
    }
}
