//! The synthetic batch both training-step benches (`train_step`, `gpu_train`) feed to every side:
//! random images, deterministic token rows of 6-23 tokens, one hard negative per sample and
//! `TAGS_PER_SAMPLE` positive tags out of `TAGS`. Throughput does not depend on the values; the
//! same batch on every side keeps the comparison to the step itself.

use hq_train::data::Batch;
use hq_train::model::ClipConfig;
use tch::{Device, Kind, Tensor};

/// Tag vocabulary of the STC head.
pub const TAGS: i64 = 1000;
/// Positive tags per sample.
pub const TAGS_PER_SAMPLE: usize = 6;

/// Deterministic token rows: start token, `len` ids, end token, zero padding.
pub fn tokens(n: usize, ctx: usize, seed: u64) -> Tensor {
    let mut v = vec![0i64; n * ctx];
    let mut s = seed.wrapping_mul(0x9e3779b97f4a7c15) | 1;
    for (i, row) in v.chunks_mut(ctx).enumerate() {
        let len = 6 + (i * 7) % 18;
        row[0] = 49406;
        for t in row.iter_mut().take(len + 1).skip(1) {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            *t = 256 + (s % 40000) as i64;
        }
        row[len + 1] = 49407;
    }
    Tensor::from_slice(&v).view([n as i64, ctx as i64])
}

/// `n` samples shaped for `cfg`, on the CPU as the data loader yields them.
pub fn make_batch(cfg: &ClipConfig, n: usize) -> Batch {
    tch::manual_seed(42);
    let side = cfg.vision_cfg.image_size.height();
    let ctx = cfg.text_cfg.context_length as usize;
    let mut offsets = vec![0i64];
    let mut indices = Vec::new();
    for i in 0..n {
        let mut row: Vec<i64> = (0..TAGS_PER_SAMPLE)
            .map(|j| ((i * 37 + j * 101) % TAGS as usize) as i64)
            .collect();
        row.sort_unstable();
        row.dedup();
        indices.extend(row);
        offsets.push(indices.len() as i64);
    }
    Batch {
        images: Tensor::randn([n as i64, 3, side, side], (Kind::Float, Device::Cpu)),
        texts: tokens(n, ctx, 1),
        negatives: tokens(n, ctx, 2),
        has_negative: Tensor::ones([n as i64], (Kind::Bool, Device::Cpu)),
        negatives_per_sample: 1,
        tag_offsets: offsets,
        tag_indices: indices,
        keys: (0..n).map(|i| format!("{i:09}")).collect(),
        refined_text: vec![true; n],
        skipped: Default::default(),
        epoch: 0,
        index: 0,
    }
}
