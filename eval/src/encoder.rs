//! The one interface evaluation needs from a model: embed a batch of preprocessed images, embed a
//! batch of token ids.
//!
//! Implementations: the tch CLIP model (`hq-train`) and the ONNX Runtime encoder (`hq-runtime`).
//! Evaluation code never sees tensors of either library, only flat `f32` / `i64` buffers, so the
//! metrics are computed identically whatever ran the model.

use hq_data::transform::ImageTransform;

/// Why an encoder call failed (the backend's message, kept as text so this crate stays
/// model-free).
#[derive(Debug, thiserror::Error)]
#[error("{backend} encoder: {message}")]
pub struct EncodeError {
    pub backend: String,
    pub message: String,
}

impl EncodeError {
    pub fn new(backend: impl Into<String>, message: impl std::fmt::Display) -> Self {
        EncodeError {
            backend: backend.into(),
            message: message.to_string(),
        }
    }
}

/// A CLIP-style dual encoder.
///
/// Shapes are row-major: `encode_images` takes `n * 3 * h * w` floats (CHW per image, already
/// transformed by [`Encoder::image_transform`]) and `encode_texts` takes `n * context_length()`
/// token ids (open_clip's tokenizer: start token, BPE ids, end token, zero padding). Both return
/// `n * embed_dim()` floats, **not** normalised: callers normalise, as CLIP_benchmark does.
pub trait Encoder {
    /// Backend and model, for reports (e.g. `"tch cpu ViT-B-32"`, `"onnx tensorrt model.onnx"`).
    fn describe(&self) -> String;

    /// The eval transform this model expects (size and normalisation).
    fn image_transform(&self) -> ImageTransform;

    /// Token positions per text.
    fn context_length(&self) -> usize;

    /// Width of the joint embedding.
    fn embed_dim(&self) -> usize;

    /// Embed `n` preprocessed images.
    fn encode_images(&mut self, pixels: &[f32], n: usize) -> Result<Vec<f32>, EncodeError>;

    /// Embed `n` tokenised texts.
    fn encode_texts(&mut self, tokens: &[i64], n: usize) -> Result<Vec<f32>, EncodeError>;

    /// The tokenizer this model reads, when it is not open_clip's CLIP BPE at
    /// [`context_length`](Self::context_length) (a Hugging Face tokenizer, for CLIPA).
    fn text_tokenizer(&self) -> Option<std::sync::Arc<hq_data::text::TextTokenizer>> {
        None
    }
}
