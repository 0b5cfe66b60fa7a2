//! What the job needs from a model, as a trait: the Qwen2-VL engine implements it, and tests drive
//! the job's parse / retry / error-record paths with a scripted fake.

use crate::error::Result;
use crate::qwen2vl::{
    FinishReason, GenerationParams, ImageProcessor, Message, PreparedImage, Qwen2Vl, Request,
    Sampling,
};

/// One generation request of the job.
#[derive(Debug, Clone)]
pub struct GenInput<'a> {
    /// Sample key (for fakes and logs).
    pub key: &'a str,
    /// The processed image.
    pub image: &'a PreparedImage,
    /// The chat (one image part).
    pub messages: Vec<Message>,
    /// Seed of this attempt.
    pub seed: u64,
    /// Decoding of this attempt.
    pub sampling: Sampling,
    /// 0 for the first attempt.
    pub attempt: u32,
}

/// One answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GenOutput {
    /// The decoded answer.
    pub text: String,
    /// Tokens generated.
    pub tokens: usize,
    /// Whether it stopped at the token limit (an answer cut short).
    pub truncated: bool,
}

/// A captioning model.
pub trait Generator {
    /// Name recorded as `source` (`model:<name>`).
    fn name(&self) -> String;
    /// The image processor to run in the decoding threads.
    fn processor(&self) -> ImageProcessor;
    /// Answers for a batch, in order.
    fn generate(&mut self, items: &[GenInput<'_>]) -> Result<Vec<GenOutput>>;
}

/// [`Qwen2Vl`] as a [`Generator`].
#[derive(Debug)]
pub struct Qwen2VlGenerator {
    engine: Qwen2Vl,
    max_new_tokens: usize,
    name: String,
}

impl Qwen2VlGenerator {
    /// Wraps an engine; `name` defaults to the model directory's name.
    pub fn new(engine: Qwen2Vl, max_new_tokens: usize, name: Option<String>) -> Self {
        let name = name.unwrap_or_else(|| {
            engine
                .root()
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "qwen2-vl".to_string())
        });
        Self {
            engine,
            max_new_tokens,
            name,
        }
    }

    /// The engine.
    pub fn engine(&self) -> &Qwen2Vl {
        &self.engine
    }
}

impl Generator for Qwen2VlGenerator {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn processor(&self) -> ImageProcessor {
        self.engine.processor().clone()
    }

    fn generate(&mut self, items: &[GenInput<'_>]) -> Result<Vec<GenOutput>> {
        let mut out: Vec<Option<GenOutput>> = vec![None; items.len()];
        // One engine call per decoding mode (first attempts greedy, retries sampled).
        let mut modes: Vec<Sampling> = Vec::new();
        for it in items {
            if !modes.contains(&it.sampling) {
                modes.push(it.sampling);
            }
        }
        for mode in modes {
            let idx: Vec<usize> = (0..items.len())
                .filter(|&i| items[i].sampling == mode)
                .collect();
            let mut requests = Vec::with_capacity(idx.len());
            for &i in &idx {
                let prompt = self
                    .engine
                    .prompt(&items[i].messages, vec![items[i].image.clone()])?;
                requests.push(Request {
                    prompt,
                    seed: items[i].seed,
                });
            }
            let params = GenerationParams {
                max_new_tokens: self.max_new_tokens,
                sampling: mode,
            };
            let gens = self.engine.generate(&requests, &params)?;
            for (&i, g) in idx.iter().zip(gens) {
                out[i] = Some(GenOutput {
                    text: g.text,
                    tokens: g.tokens.len(),
                    truncated: g.finish == FinishReason::Length,
                });
            }
        }
        Ok(out.into_iter().map(Option::unwrap_or_default).collect())
    }
}
