//! Which texts a training sample contributes (method.md, Stage 2): the positive caption (refined or
//! raw, mixed with probability r) and the N- generated hard negatives.
//!
//! # Rules
//! Every choice draws from the sample's own generator (seeded by run seed, epoch and position in
//! the epoch, see [`crate::data`]), always in the same order, so a run is reproducible and
//! resumable.
//!
//! **Positive text.** With probability `refined_prob` (r, default 0.75) and when the sample has
//! refined texts, the text is ONE segment of the long positive description d+, drawn uniformly
//! with [`hq_data::text::segment::draw_segment`]; otherwise the raw alt-text. A d+ with no segment
//! falls back to the raw alt-text. An empty raw alt-text falls back to a d+ segment when r > 0 and
//! the sample has one; when nothing is left the sample is skipped ("missing text"). Baseline mode
//! ([`TextPolicy::baseline`], r = 0) uses the raw alt-text only.
//!
//! **Hard negatives** (only for samples with refined texts, `negatives` = N- per sample, default
//! 1). Each negative is, with probability `negative_segment_prob` (default 0.5, a seeded coin):
//! - a *segment of d-*, taken among the segments of d- that are **not** also segments of d+
//!   (compared lower-cased with whitespace collapsed). d- is d+ with a few perturbed clauses, so
//!   most of its segments equal segments of d+; drawing among all of them would often give a
//!   "negative" identical to a true caption. Which changed segment, `negative_pairing` says
//!   ([`NegativePairing`]): `any` draws one uniformly whatever the positive (the paper's
//!   reading), `paired` takes, when the positive is a d+ segment, the changed segment closest to
//!   it in words (the n-th segment negative of a sample the n-th closest), so the negative
//!   differs from its positive by the generator's edit alone rather than by being another
//!   clause; a raw alt-text positive has no counterpart in d-, and gets `any`'s draw;
//! - otherwise the *negative tags* t- joined as one string, `"tag1, tag2, ..."` (in their stored
//!   order, trimmed, empty ones dropped).
//!
//! When the chosen kind is unavailable (no changed segment, or no tags) the other kind is used;
//! when both are unavailable the sample has no negatives and the batch's `has_negative` mask is
//! false for it, so the HNI loss skips it. `any` and `paired` consume the same draws: `paired`
//! draws the uniform index too and does not use it.

use hq_data::text::segment::{changed_segments, draw_segment};
use hq_data::Sample;
use rand::Rng;
use serde::{Deserialize, Serialize};

/// The text settings of mixed training.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TextPolicy {
    /// r: probability of training on a refined segment instead of the raw alt-text.
    pub refined_prob: f64,
    /// N-: hard negatives per sample (0 disables them).
    pub negatives: usize,
    /// Probability that a hard negative is a segment of d- rather than the joined t- tags.
    pub negative_segment_prob: f64,
    /// Which changed segment of d- a segment negative is (`any` when absent: policies written
    /// before the setting existed).
    #[serde(default)]
    pub negative_pairing: NegativePairing,
}

impl Default for TextPolicy {
    /// HQ-CLIP's defaults: r = 0.75, N- = 1, negatives half segments, half tags, any changed
    /// segment.
    fn default() -> Self {
        TextPolicy {
            refined_prob: 0.75,
            negatives: 1,
            negative_segment_prob: 0.5,
            negative_pairing: NegativePairing::default(),
        }
    }
}

/// Which changed segment of d- becomes a segment hard negative (see the module docs).
///
/// The default is `any`, the paper's reading (it pairs nothing). Most of `any`'s negatives are
/// another clause than their positive (a count clause against a background clause), told apart by
/// their surface; `paired` negatives differ from their positive only in what the edit changed,
/// which is what HNI is meant to teach. Measured on the built-in ablation (benches/RESULTS.md,
/// "The paper's three effects"): at the budgets a CPU allows neither setting moves shape or ARO,
/// so the paper's reading stays the default. `TextPolicy` and the training config take their
/// default from here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NegativePairing {
    /// Uniformly among d-'s changed segments, whatever the positive.
    #[default]
    Any,
    /// When the positive is a d+ segment, d-'s changed segment with the fewest word edits from it
    /// (the first on ties); otherwise as `any`.
    Paired,
}

/// Where a sample's positive text came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TextSource {
    Raw,
    Refined,
}

/// Where a hard negative came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NegativeSource {
    Segment,
    Tags,
}

/// The texts chosen for one sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChosenTexts {
    pub text: String,
    pub source: TextSource,
    /// Exactly `policy.negatives` entries, or none when the sample has no negatives.
    pub negatives: Vec<(String, NegativeSource)>,
}

/// The negative tags as one string, `"tag1, tag2, ..."`; `None` without any non-empty tag.
pub fn joined_tags<S: AsRef<str>>(tags: &[S]) -> Option<String> {
    let parts: Vec<&str> = tags
        .iter()
        .map(|t| t.as_ref().trim())
        .filter(|t| !t.is_empty())
        .collect();
    (!parts.is_empty()).then(|| parts.join(", "))
}

impl TextPolicy {
    /// The raw-alt-text-only baseline: r = 0 and no hard negatives.
    pub fn baseline() -> Self {
        TextPolicy {
            refined_prob: 0.0,
            negatives: 0,
            negative_segment_prob: 0.5,
            negative_pairing: NegativePairing::default(),
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.refined_prob) {
            return Err(format!(
                "refined-text probability {} is not in [0, 1]",
                self.refined_prob
            ));
        }
        if !(0.0..=1.0).contains(&self.negative_segment_prob) {
            return Err(format!(
                "negative-segment probability {} is not in [0, 1]",
                self.negative_segment_prob
            ));
        }
        if self.negatives > 64 {
            return Err(format!(
                "{} hard negatives per sample is more than 64",
                self.negatives
            ));
        }
        Ok(())
    }

    /// Choose the sample's texts (see the module docs for the rules). The error is the reason the
    /// sample has no usable text.
    pub fn choose<R: Rng + ?Sized>(
        &self,
        sample: &Sample,
        rng: &mut R,
    ) -> Result<ChosenTexts, String> {
        // Always consume the same draws in the same order, whatever the outcome.
        let coin: f64 = rng.gen();
        let refined = sample.refined.as_ref();
        let segment = refined.and_then(|r| draw_segment(&r.long_positive, rng));
        let raw = sample.raw_text.trim();
        let use_refined = segment.is_some() && coin < self.refined_prob;
        let (text, source) = match (use_refined, segment) {
            (true, Some(seg)) => (seg.to_string(), TextSource::Refined),
            _ if !raw.is_empty() => (raw.to_string(), TextSource::Raw),
            (_, Some(seg)) if self.refined_prob > 0.0 => (seg.to_string(), TextSource::Refined),
            _ => {
                return Err(if refined.is_some() && self.refined_prob > 0.0 {
                    "empty raw alt-text and no segment in the refined description".to_string()
                } else {
                    "empty raw alt-text".to_string()
                })
            }
        };
        let mut negatives = Vec::new();
        if let (Some(r), true) = (refined, self.negatives > 0) {
            let segs = changed_segments(&r.long_positive, &r.long_negative);
            let tags = joined_tags(&r.tags_negative);
            // `paired`: the changed segments from the closest to the positive to the farthest.
            let by_closeness = match (self.negative_pairing, source) {
                (NegativePairing::Paired, TextSource::Refined) => {
                    Some(by_word_distance(&text, &segs))
                }
                _ => None,
            };
            let mut segment_negatives = 0;
            if !segs.is_empty() || tags.is_some() {
                for _ in 0..self.negatives {
                    let want_segment = rng.gen::<f64>() < self.negative_segment_prob;
                    let drawn = rng.gen_range(0..segs.len().max(1));
                    let use_segment = !segs.is_empty() && (want_segment || tags.is_none());
                    match (&tags, use_segment) {
                        (_, true) => {
                            let pick = match &by_closeness {
                                Some(order) => order[segment_negatives % order.len()],
                                None => drawn,
                            };
                            segment_negatives += 1;
                            negatives.push((segs[pick].to_string(), NegativeSource::Segment))
                        }
                        (Some(t), false) => negatives.push((t.clone(), NegativeSource::Tags)),
                        (None, false) => {} // excluded by the check above
                    }
                }
            }
        }
        Ok(ChosenTexts {
            text,
            source,
            negatives,
        })
    }
}

/// Indices of `candidates`, nearest to `text` first by [`word_edit_distance`], ties in their
/// order.
fn by_word_distance(text: &str, candidates: &[&str]) -> Vec<usize> {
    let mut order: Vec<(usize, usize)> = candidates
        .iter()
        .enumerate()
        .map(|(i, c)| (word_edit_distance(text, c), i))
        .collect();
    order.sort();
    order.into_iter().map(|(_, i)| i).collect()
}

/// Levenshtein distance over words (compared lower-cased): the whole-word insertions, deletions
/// and substitutions that turn `a` into `b`. `red circle above blue square` and `blue circle
/// above red square` are 2 apart; a different clause is many.
fn word_edit_distance(a: &str, b: &str) -> usize {
    let words = |s: &str| -> Vec<String> { s.split_whitespace().map(str::to_lowercase).collect() };
    strsim::generic_levenshtein(&words(a), &words(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hq_data::{ImageBytes, RefinedTexts};
    use rand::SeedableRng;

    fn sample(raw: &str, refined: Option<RefinedTexts>) -> Sample {
        let mut s = Sample::new(
            "k",
            ImageBytes {
                ext: "jpg".into(),
                bytes: vec![],
            },
            raw,
        );
        s.refined = refined;
        s
    }

    fn refined() -> RefinedTexts {
        RefinedTexts {
            long_positive: "A red circle, it is above a blue square. The background is plain."
                .into(),
            long_negative: "A green circle, it is above a blue square. The background is plain."
                .into(),
            tags_positive: vec!["red circle".into(), "blue square".into()],
            tags_negative: vec![" green circle ".into(), "".into(), "yellow square".into()],
            source: None,
        }
    }

    #[test]
    fn changed_segments_and_joined_tags() {
        let r = refined();
        assert_eq!(
            changed_segments(&r.long_positive, &r.long_negative),
            vec!["A green circle"]
        );
        assert_eq!(
            joined_tags(&r.tags_negative).as_deref(),
            Some("green circle, yellow square")
        );
        assert_eq!(joined_tags::<&str>(&[]), None);
    }

    #[test]
    fn word_edit_distance_counts_whole_words() {
        assert_eq!(
            word_edit_distance(
                "red circle above blue square",
                "Blue circle above red square"
            ),
            2
        );
        assert_eq!(word_edit_distance("a b c", "a c"), 1);
        assert_eq!(word_edit_distance("", "a b"), 2);
        assert_eq!(word_edit_distance("a b", "a b"), 0);
    }

    /// d+ with swapped colours in three of its four clauses (the background clause unchanged).
    fn swapped() -> RefinedTexts {
        RefinedTexts {
            long_positive: "The image shows a red circle above a blue square, the circle is red \
                            and the square is blue. There are two objects in total: a blue \
                            square and a red circle, the background is plain grey."
                .into(),
            long_negative: "The image shows a blue circle above a red square, the circle is blue \
                            and the square is red. There are two objects in total: a red square \
                            and a blue circle, the background is plain grey."
                .into(),
            tags_positive: vec![],
            tags_negative: vec!["blue circle".into()],
            source: None,
        }
    }

    #[test]
    fn paired_negatives_are_the_edited_clause_of_their_positive() {
        let p = TextPolicy {
            refined_prob: 1.0,
            negative_segment_prob: 1.0,
            negative_pairing: NegativePairing::Paired,
            ..TextPolicy::default()
        };
        let r = swapped();
        let s = sample("raw caption", Some(r.clone()));
        let changed = changed_segments(&r.long_positive, &r.long_negative);
        assert_eq!(changed.len(), 3);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let c = p.choose(&s, &mut rng).expect("text");
            let neg = &c.negatives[0].0;
            // Each changed clause is its positive with the same words but two (the colours).
            let counterpart = changed
                .iter()
                .find(|n| word_edit_distance(&c.text, n) == 2)
                .copied();
            match counterpart {
                Some(n) => assert_eq!(neg, n, "{:?}", c.text),
                None => assert_eq!(c.text, "the background is plain grey"),
            }
            seen.insert(c.text);
        }
        assert_eq!(seen.len(), 4, "every positive segment drawn: {seen:?}");
        // A raw alt-text has no counterpart: the uniform draw, as `any`.
        let raw = TextPolicy {
            refined_prob: 0.0,
            ..p
        };
        let drawn: std::collections::HashSet<String> = (0..100)
            .map(|_| {
                raw.choose(&s, &mut rng).expect("text").negatives[0]
                    .0
                    .clone()
            })
            .collect();
        assert_eq!(drawn.len(), 3, "{drawn:?}");
    }

    #[test]
    fn pairing_consumes_the_same_draws() {
        let any = TextPolicy {
            negatives: 3,
            ..TextPolicy::default()
        };
        let paired = TextPolicy {
            negative_pairing: NegativePairing::Paired,
            ..any
        };
        let s = sample("raw caption", Some(swapped()));
        for seed in 0..50 {
            let mut a = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let mut b = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let (ca, cb) = (
                any.choose(&s, &mut a).expect("any"),
                paired.choose(&s, &mut b).expect("paired"),
            );
            assert_eq!((&ca.text, ca.source), (&cb.text, cb.source));
            let kinds = |c: &ChosenTexts| c.negatives.iter().map(|n| n.1).collect::<Vec<_>>();
            assert_eq!(kinds(&ca), kinds(&cb));
            assert_eq!(a.gen::<u64>(), b.gen::<u64>(), "seed {seed}");
        }
    }

    #[test]
    fn baseline_uses_raw_only_and_no_negatives() {
        let p = TextPolicy::baseline();
        let s = sample("raw caption", Some(refined()));
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for _ in 0..100 {
            let c = p.choose(&s, &mut rng).expect("text");
            assert_eq!(c.text, "raw caption");
            assert_eq!(c.source, TextSource::Raw);
            assert!(c.negatives.is_empty());
        }
        assert!(p.choose(&sample("  ", Some(refined())), &mut rng).is_err());
    }

    #[test]
    fn mixing_ratio_and_negative_kinds() {
        let p = TextPolicy::default();
        let s = sample("raw caption", Some(refined()));
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let (mut refined_n, mut seg_n, n) = (0, 0, 4000);
        for _ in 0..n {
            let c = p.choose(&s, &mut rng).expect("text");
            if c.source == TextSource::Refined {
                refined_n += 1;
                assert!(refined().long_positive.contains(&c.text));
            }
            assert_eq!(c.negatives.len(), 1);
            match c.negatives[0].1 {
                NegativeSource::Segment => {
                    seg_n += 1;
                    assert_eq!(c.negatives[0].0, "A green circle");
                }
                NegativeSource::Tags => assert_eq!(c.negatives[0].0, "green circle, yellow square"),
            }
        }
        let r = refined_n as f64 / n as f64;
        assert!((r - 0.75).abs() < 0.03, "refined fraction {r}");
        let q = seg_n as f64 / n as f64;
        assert!((q - 0.5).abs() < 0.03, "segment fraction {q}");
        // No refined texts: raw text, no negatives.
        let c = p.choose(&sample("only raw", None), &mut rng).expect("text");
        assert_eq!((c.text.as_str(), c.negatives.len()), ("only raw", 0));
        // Empty raw text falls back to a refined segment when r > 0.
        let c = p
            .choose(&sample("", Some(refined())), &mut rng)
            .expect("text");
        assert_eq!(c.source, TextSource::Refined);
    }
}
