//! Next-token choice: greedy (argmax, first index on ties, like `torch.argmax`) or seeded sampling
//! with temperature and nucleus (top-p) filtering, with HF's semantics: logits divided by the
//! temperature, tokens sorted by probability, the smallest prefix whose cumulative probability
//! reaches `top_p` kept (always at least one token), renormalised, then one draw.

use rand::Rng;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::error::{Result, RuntimeError};

/// How tokens are chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// Always the most likely token.
    Greedy,
    /// Temperature + top-p sampling; each request's own seed drives its draws.
    TopP {
        /// Logit divisor (> 0).
        temperature: f32,
        /// Nucleus mass in (0, 1].
        top_p: f32,
    },
}

impl Sampling {
    /// Checks the parameters.
    pub fn validate(&self) -> Result<()> {
        if let Sampling::TopP { temperature, top_p } = *self {
            if !(temperature.is_finite() && temperature > 0.0) {
                return Err(RuntimeError::Generation(format!(
                    "temperature must be > 0, got {temperature}"
                )));
            }
            if !(top_p > 0.0 && top_p <= 1.0) {
                return Err(RuntimeError::Generation(format!(
                    "top_p must be in (0, 1], got {top_p}"
                )));
            }
        }
        Ok(())
    }
}

/// Index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best = i;
            best_v = v;
        }
    }
    best
}

/// One sequence's token chooser.
#[derive(Debug, Clone)]
pub struct Sampler {
    mode: Sampling,
    rng: ChaCha8Rng,
    scratch: Vec<(f32, usize)>,
}

impl Sampler {
    /// A sampler for `mode` seeded with `seed` (ignored when greedy).
    pub fn new(mode: Sampling, seed: u64) -> Self {
        Self {
            mode,
            rng: ChaCha8Rng::seed_from_u64(seed),
            scratch: Vec::new(),
        }
    }

    /// Chooses the next token from one row of logits.
    pub fn next_token(&mut self, logits: &[f32]) -> usize {
        match self.mode {
            Sampling::Greedy => argmax(logits),
            Sampling::TopP { temperature, top_p } => {
                let scratch = &mut self.scratch;
                scratch.clear();
                scratch.extend(
                    logits
                        .iter()
                        .enumerate()
                        .map(|(i, &l)| (l / temperature, i)),
                );
                scratch.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                let max = scratch.first().map_or(0.0, |x| x.0);
                let mut total = 0f64;
                for x in scratch.iter_mut() {
                    let p = f64::from(x.0 - max).exp();
                    x.0 = p as f32;
                    total += p;
                }
                let mut keep = 0;
                let mut cum = 0f64;
                for x in scratch.iter() {
                    cum += f64::from(x.0) / total;
                    keep += 1;
                    if cum >= f64::from(top_p) {
                        break;
                    }
                }
                let kept = &scratch[..keep.max(1)];
                let mass: f64 = kept.iter().map(|x| f64::from(x.0)).sum();
                let mut r = self.rng.gen::<f64>() * mass;
                for x in kept {
                    r -= f64::from(x.0);
                    if r <= 0.0 {
                        return x.1;
                    }
                }
                kept.last().map_or(0, |x| x.1)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.0, 2.0, 2.0, -1.0]), 1);
    }

    #[test]
    fn top_p_keeps_the_nucleus_and_is_seeded() {
        // Probabilities ~ [0.64, 0.24, 0.09, 0.03]: top_p 0.8 keeps tokens 0 and 1 only.
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let mode = Sampling::TopP {
            temperature: 1.0,
            top_p: 0.8,
        };
        let mut a = Sampler::new(mode, 7);
        let mut b = Sampler::new(mode, 7);
        let draws_a: Vec<usize> = (0..200).map(|_| a.next_token(&logits)).collect();
        let draws_b: Vec<usize> = (0..200).map(|_| b.next_token(&logits)).collect();
        assert_eq!(draws_a, draws_b, "same seed, same draws");
        assert!(draws_a.iter().all(|&t| t < 2));
        assert!(draws_a.contains(&0) && draws_a.contains(&1));
        let tiny = Sampling::TopP {
            temperature: 1.0,
            top_p: 1e-6,
        };
        let mut c = Sampler::new(tiny, 1);
        assert!((0..20).all(|_| c.next_token(&logits) == 0));
        assert!(Sampling::TopP {
            temperature: 0.0,
            top_p: 0.5
        }
        .validate()
        .is_err());
    }
}
