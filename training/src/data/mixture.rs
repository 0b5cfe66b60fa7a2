//! Weighted dataset mixtures: several training sources sampled with replacement in one resampled,
//! step-based stream (open_clip's `--train-data-upsampling-factors` with `--dataset-resampled`).
//!
//! - **Choice**: mixture draw `d` picks source `i` with probability `w_i / sum(w)`, from a
//!   generator keyed by (seed, d) ([`RngPurpose::Mixture`]); the seed is already per rank
//!   (`hq-train` derives it from the run seed and the rank), so ranks draw independently, like
//!   open_clip's per-worker resampled streams. With `SourceWeighting::PerShard` the weights are
//!   open_clip's upsampling factors, which weigh every shard of a source (`w_i` becomes
//!   `w_i * shards_i`), so equal factors mix the sources in proportion to their size.
//! - **Sources**: each is its own stream ([`super::stream`]): this rank's share of its shards
//!   (all of them when it has fewer shards than there are ranks) in a fresh shuffled order every
//!   pass, with its own shuffle buffer (so k sources hold k buffers) and its own seed; when a pass
//!   ends the next one starts at once, so a source never runs dry and there are no epochs. (open_clip
//!   draws shards with replacement instead; both give each source its weight's share of the
//!   samples.)
//! - **Keys**: a drawn sample's augmentation and text generators are keyed by the mixture draw
//!   number, so they do not depend on which source it came from.
//! - **Position** ([`MixState`]): the mixture draws made and each source's stream position.
//!   Restoring reopens every source at its position (each re-reads only what its shuffle buffer
//!   held) and redraws the draws of the current chunk already used, so the stream continues bit
//!   for bit.

use super::stream::{Drawn, EpochStream, StreamConfig, StreamState};
use super::{derive_rng, RngPurpose};
use crate::error::TrainError;
use hq_data::SampleError;
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The mixture's position between two draws.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MixState {
    /// Mixture draws made so far.
    pub drawn: u64,
    /// Each source's stream position.
    pub sources: Vec<StreamState>,
}

/// The seed of source `i`'s own stream (shard order, shuffle buffer): distinct per source.
pub fn source_seed(seed: u64, i: usize) -> u64 {
    seed.wrapping_add((i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// Source `i` drawn with probability proportional to `weights[i]` for mixture draw `draw`.
pub fn choose_source(seed: u64, draw: u64, weights: &[f64]) -> usize {
    let total: f64 = weights.iter().sum();
    let mut rng = derive_rng(seed, 0, draw, RngPurpose::Mixture);
    let u = rng.gen::<f64>() * total;
    let mut acc = 0.0;
    for (i, w) in weights.iter().enumerate() {
        acc += w;
        if u < acc {
            return i;
        }
    }
    weights.len().saturating_sub(1)
}

/// One source of a mixture: its stream settings and this rank's shards.
#[derive(Debug, Clone)]
pub(crate) struct SourcePlan {
    pub cfg: StreamConfig,
    pub worker: Vec<PathBuf>,
    pub weight: f64,
}

impl SourcePlan {
    pub fn readers(&self) -> usize {
        self.cfg.readers.min(self.worker.len()).max(1)
    }
}

struct Source {
    plan: SourcePlan,
    stream: EpochStream,
}

/// The mixture stream of one rank (see the module docs).
pub(crate) struct MixStream {
    seed: u64,
    weights: Vec<f64>,
    drawn: u64,
    sources: Vec<Source>,
}

impl MixStream {
    pub fn open(seed: u64, plans: &[SourcePlan], state: &MixState) -> Result<Self, TrainError> {
        if state.sources.len() != plans.len() {
            return Err(TrainError::LoaderState(format!(
                "the state has {} mixture sources, this loader {}",
                state.sources.len(),
                plans.len()
            )));
        }
        let mut sources = Vec::with_capacity(plans.len());
        for (plan, st) in plans.iter().zip(&state.sources) {
            sources.push(Source {
                stream: EpochStream::open(&plan.cfg, &plan.worker, st)?,
                plan: plan.clone(),
            });
        }
        Ok(MixStream {
            seed,
            weights: plans.iter().map(|p| p.weight).collect(),
            drawn: state.drawn,
            sources,
        })
    }

    /// The position now (between draws).
    pub fn snapshot(&self) -> MixState {
        MixState {
            drawn: self.drawn,
            sources: self.sources.iter().map(|s| s.stream.snapshot()).collect(),
        }
    }

    /// The next sample: its source chosen by weight, then that source's next draw (starting the
    /// source's next pass when one ends). `Drawn::draw` is the mixture draw number.
    pub fn draw(&mut self) -> Result<(usize, Drawn), TrainError> {
        let i = choose_source(self.seed, self.drawn, &self.weights);
        let src = &mut self.sources[i];
        let mut carried: Vec<SampleError> = Vec::new();
        let mut fresh = false;
        let mut d = loop {
            if let Some(d) = src.stream.draw()? {
                break d;
            }
            // The pass ended: its last bad records go with the first draw of the next pass.
            carried.extend(src.stream.take_pending_errors());
            if fresh {
                return Err(TrainError::DataLoader(format!(
                    "mixture source {i} has no good sample in its {} shard(s) for this rank",
                    src.plan.worker.len()
                )));
            }
            let next = StreamState::start(src.stream.epoch() + 1, src.plan.readers());
            src.stream = EpochStream::open(&src.plan.cfg, &src.plan.worker, &next)?;
            fresh = true;
        };
        if !carried.is_empty() {
            carried.append(&mut d.errors);
            d.errors = carried;
        }
        d.draw = self.drawn;
        self.drawn += 1;
        Ok((i, d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_follow_the_weights() {
        let w = [1.0, 3.0, 0.5];
        let n = 45_000u64;
        let mut counts = [0u64; 3];
        for d in 0..n {
            counts[choose_source(11, d, &w)] += 1;
        }
        for (c, wi) in counts.iter().zip(w) {
            let p = wi / 4.5;
            let sd = (n as f64 * p * (1.0 - p)).sqrt();
            assert!((*c as f64 - n as f64 * p).abs() < 4.0 * sd, "{counts:?}");
        }
        assert_eq!(choose_source(11, 5, &w), choose_source(11, 5, &w));
    }
}
