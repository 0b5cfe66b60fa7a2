//! Synthetic batches for tests of the training step (this crate's and the workspace's data-parallel
//! tests): real captions through the bundled tokenizer, random pixels, sparse tags. Behind the
//! `testing` feature.

use hq_data::text::tokenizer::ClipTokenizer;
use tch::{Device, Kind, Tensor};

use crate::data::Batch;
use crate::model::ClipConfig;

/// `n` captions tokenised to `ctx` (`[n, ctx]` int64) of three lengths; `negative` shifts the
/// shape word, as a minimal-edit hard negative does.
pub fn caption_tokens(n: usize, ctx: usize, negative: bool) -> Tensor {
    const COLOURS: [&str; 4] = ["red", "green", "blue", "yellow"];
    const SHAPES: [&str; 3] = ["circle", "square", "triangle"];
    let tokenizer = ClipTokenizer::from_bundled()
        .and_then(|t| t.with_context_length(ctx))
        .expect("bundled tokenizer");
    let texts: Vec<String> = (0..n)
        .map(|i| {
            let (c, s) = (COLOURS[i % 4], SHAPES[(i / 4 + usize::from(negative)) % 3]);
            let tail = " on a striped background, next to a small dotted ring".repeat(i % 3);
            format!("a {c} {s}{tail}")
        })
        .collect();
    let flat = tokenizer.tokenize_batch_flat(&texts).expect("tokenize");
    Tensor::from_slice(&flat).view([n as i64, ctx as i64])
}

/// A batch of `n` samples for a model of `cfg` (pixels from libtorch's global generator), N- = 2
/// with every third sample without negatives, two of `tags` tag classes per sample.
pub fn synthetic_batch(cfg: &ClipConfig, n: usize, tags: i64) -> Batch {
    let ctx = cfg.text_cfg.context_length as usize;
    let side = cfg.vision_cfg.image_size.height();
    let images = Tensor::randn([n as i64, 3, side, side], (Kind::Float, Device::Cpu));
    let mut offsets = vec![0i64];
    let mut indices = Vec::new();
    for i in 0..n as i64 {
        indices.extend([(i * 7) % tags, (i * 7 + 3) % tags]);
        offsets.push(indices.len() as i64);
    }
    Batch {
        images,
        texts: caption_tokens(n, ctx, false),
        negatives: caption_tokens(2 * n, ctx, true),
        has_negative: Tensor::from_slice(&(0..n).map(|i| i % 3 != 1).collect::<Vec<_>>()),
        negatives_per_sample: 2,
        tag_offsets: offsets,
        tag_indices: indices,
        keys: (0..n).map(|i| i.to_string()).collect(),
        refined_text: vec![true; n],
        skipped: Default::default(),
        epoch: 0,
        index: 0,
    }
}

/// A small synthetic corpus (256 samples of 32 px in shards of 32, tiny eval sets) written to
/// `dir`; returns its training folder. For tests that run `hq-train` end to end.
pub fn tiny_corpus(dir: &std::path::Path) -> std::path::PathBuf {
    use hq_data::synth::{self, SynthConfig, WriteOptions};
    let cfg = SynthConfig {
        seed: 3,
        samples: 256,
        shard_size: 32,
        image_size: 32,
        eval_samples: 16,
        eval_shard_size: 16,
        ..SynthConfig::default()
    };
    let opts = WriteOptions {
        force: false,
        threads: Some(2),
        progress: false,
    };
    synth::write_corpus(&cfg, dir, &opts).expect("synth corpus");
    dir.join("train")
}
