//! The chat template and the tokenised prompt.
//!
//! [`render_chat`] writes Qwen2-VL-Instruct's chat template (the Jinja template shipped in
//! Qwen/Qwen2-VL-7B-Instruct's `tokenizer_config.json`) for text and image parts: a default system
//! turn when the conversation does not start with one, `<|im_start|>role\n...<|im_end|>\n` per
//! message, `<|vision_start|><|image_pad|><|vision_end|>` per image, and `<|im_start|>assistant\n`
//! as the generation prompt. [`Prompt`] tokenises it and expands each `<|image_pad|>` into the
//! image's `t*h*w / merge^2` tokens, which is what the processor does (special tokens are atomic,
//! so expanding ids equals expanding the text).

use tokenizers::Tokenizer;

use crate::error::{Result, RuntimeError};
use crate::qwen2vl::preprocess::PreparedImage;

/// The template's default system message.
pub const DEFAULT_SYSTEM: &str = "You are a helpful assistant.";

/// One part of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// Text, inserted verbatim.
    Text(String),
    /// An image placeholder (the images are passed separately, in order).
    Image,
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// Its parts in order.
    pub parts: Vec<Part>,
}

impl Message {
    /// A message of `role` with `parts`.
    pub fn new(role: impl Into<String>, parts: Vec<Part>) -> Self {
        Self {
            role: role.into(),
            parts,
        }
    }

    /// A text-only message.
    pub fn text(role: impl Into<String>, text: impl Into<String>) -> Self {
        Self::new(role, vec![Part::Text(text.into())])
    }
}

/// Renders `messages` with Qwen2-VL's chat template.
pub fn render_chat(messages: &[Message], add_generation_prompt: bool) -> String {
    let mut s = String::new();
    for (i, m) in messages.iter().enumerate() {
        if i == 0 && m.role != "system" {
            s.push_str("<|im_start|>system\n");
            s.push_str(DEFAULT_SYSTEM);
            s.push_str("<|im_end|>\n");
        }
        s.push_str("<|im_start|>");
        s.push_str(&m.role);
        s.push('\n');
        for p in &m.parts {
            match p {
                Part::Text(t) => s.push_str(t),
                Part::Image => s.push_str("<|vision_start|><|image_pad|><|vision_end|>"),
            }
        }
        s.push_str("<|im_end|>\n");
    }
    if add_generation_prompt {
        s.push_str("<|im_start|>assistant\n");
    }
    s
}

/// A tokenised prompt with its images, ready for generation.
#[derive(Debug, Clone)]
pub struct Prompt {
    /// Token ids with every image's placeholder expanded.
    pub input_ids: Vec<u32>,
    /// The images, in placeholder order.
    pub images: Vec<PreparedImage>,
}

impl Prompt {
    /// Renders and tokenises `messages` (generation prompt added) for `images`, checking that the
    /// number of image parts equals the number of images.
    pub fn from_messages(
        tokenizer: &Tokenizer,
        image_token_id: u32,
        messages: &[Message],
        images: Vec<PreparedImage>,
    ) -> Result<Self> {
        let text = render_chat(messages, true);
        Self::from_text(tokenizer, image_token_id, &text, images)
    }

    /// Tokenises an already rendered prompt holding one `<|image_pad|>` per image.
    pub fn from_text(
        tokenizer: &Tokenizer,
        image_token_id: u32,
        text: &str,
        images: Vec<PreparedImage>,
    ) -> Result<Self> {
        let enc = tokenizer
            .encode(text, true)
            .map_err(|e| RuntimeError::Tokenizer(format!("encoding the prompt: {e}")))?;
        let ids = enc.get_ids();
        let placeholders = ids.iter().filter(|&&t| t == image_token_id).count();
        if placeholders != images.len() {
            return Err(RuntimeError::Generation(format!(
                "the prompt has {placeholders} image placeholders but {} images were given",
                images.len()
            )));
        }
        let extra: usize = images.iter().map(|im| im.num_tokens).sum();
        let mut input_ids = Vec::with_capacity(ids.len() + extra);
        let mut next = images.iter();
        for &t in ids {
            if t == image_token_id {
                let n = next.next().map_or(0, |im| im.num_tokens);
                input_ids.extend(std::iter::repeat_n(image_token_id, n));
            } else {
                input_ids.push(t);
            }
        }
        Ok(Self { input_ids, images })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_matches_qwen2_vl_instruct() {
        let msgs = [Message::new(
            "user",
            vec![Part::Image, Part::Text("Describe it.".into())],
        )];
        assert_eq!(
            render_chat(&msgs, true),
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n\
             <|vision_start|><|image_pad|><|vision_end|>Describe it.<|im_end|>\n<|im_start|>assistant\n"
        );
        let with_system = [
            Message::text("system", "Be brief."),
            Message::text("user", "Hi"),
        ];
        assert_eq!(
            render_chat(&with_system, false),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
    }
}
