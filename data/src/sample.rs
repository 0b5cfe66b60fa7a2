//! One image-text sample as every stage sees it: the key, the image's encoded bytes, the raw
//! alt-text, optionally the four refined texts of HQ-CLIP's recaptioner, and free metadata.
//!
//! On disk (img2dataset's webdataset layout) a sample is `key.jpg|png|webp` (image bytes),
//! `key.txt` (raw alt-text, UTF-8) and `key.json` (metadata). The refined texts live in the JSON
//! under [`REFINED_JSON_KEY`], so a shard stays readable by every webdataset tool.

use serde::{Deserialize, Serialize};

/// JSON key under which a sample's refined texts are stored.
pub const REFINED_JSON_KEY: &str = "hq_clip";

/// Image file extensions a sample may carry, in the order a reader prefers them.
pub const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];

/// Encoded image bytes and the extension they were stored under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageBytes {
    pub ext: String,
    pub bytes: Vec<u8>,
}

/// The four texts the recaptioner writes for one (image, alt-text) pair (paper, section 3.2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefinedTexts {
    /// d+: long positive description, several clauses separated by the model's own punctuation.
    pub long_positive: String,
    /// d-: d+ with subtle, plausible but wrong changes (the hard negative).
    pub long_negative: String,
    /// t+: short concept tags that are true for the image.
    pub tags_positive: Vec<String>,
    /// t-: tags close to, but not true for, the image.
    pub tags_negative: Vec<String>,
    /// Who wrote them: `oracle` for the synthetic corpus's ground truth, `model:<name>` for a
    /// recaptioner, `teacher:<name>` for teacher data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// One sample. `meta` is the sample's JSON object without the refined texts (uid, url, width, ...).
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub key: String,
    pub image: Option<ImageBytes>,
    pub raw_text: String,
    pub refined: Option<RefinedTexts>,
    pub meta: serde_json::Map<String, serde_json::Value>,
}

impl Sample {
    pub fn new(key: impl Into<String>, image: ImageBytes, raw_text: impl Into<String>) -> Self {
        Sample {
            key: key.into(),
            image: Some(image),
            raw_text: raw_text.into(),
            refined: None,
            meta: serde_json::Map::new(),
        }
    }

    /// The JSON member as written to `key.json`: the metadata plus the refined texts, if any.
    pub fn json(&self) -> serde_json::Value {
        let mut obj = self.meta.clone();
        obj.remove(REFINED_JSON_KEY);
        if let Some(r) = &self.refined {
            if let Ok(v) = serde_json::to_value(r) {
                obj.insert(REFINED_JSON_KEY.to_string(), v);
            }
        }
        serde_json::Value::Object(obj)
    }
}
