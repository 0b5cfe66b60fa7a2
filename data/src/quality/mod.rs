//! Recaption quality against scene ground truth (`hq-data quality`): model-free, read from shards
//! of the built-in corpus (the oracle's texts) or of `hq-recap-trt --format tar` (a model's texts),
//! whose `KEY.json` still holds the `scene` the image was rendered from.
//!
//! Every statement is read by one small grammar ([`claims`]) and judged against the scene; what
//! the grammar does not understand counts as "not stated", never as wrong. Every metric is a
//! fraction with its counts ([`Fraction`]: `count` of `of`, `rate` null when `of` is 0).
//!
//! # Accounting
//! `samples = with_texts + format_errors + other_errors`, where
//! - **format error** (`format.errors` by kind): the JSON has `hq_clip_error`
//!   (`hq_clip_error:<category>`, the recaptioner's `format`, `generation`, `image`, `input`),
//!   whatever `hq_clip` it still has; `hq_clip` is absent (`missing_hq_clip`), malformed
//!   (`invalid_hq_clip`: the reader rejects the sample) or has an empty field (`empty_field`); or,
//!   in recaption mode, its `source` is `oracle` (`not_recaptioned`: the input's texts passed
//!   through);
//! - **other error**: a sample the shard reader could not read for another reason (bad JSON, a
//!   damaged tar stream: one record per damage, however many samples it hid);
//! - **with texts**: the four texts, none empty.
//!
//! The **mode** is `oracle` when no sample has `hq_clip_error` and every `hq_clip` has source
//! `oracle` (the built-in corpus itself), else `recaption`. `sources` counts the `source` of every
//! `hq_clip` read (`(none)` when absent). A sample without a readable `scene` is counted in
//! `no_ground_truth` (also in `invalid_ground_truth` when `scene` is there but does not parse) and
//! left out of every content metric.
//!
//! # Metrics
//! - `format.success`: samples with texts / samples.
//! - `format.first_attempt`: when the shards are hq-recap-trt output (error records, or model texts
//!   that all carry `hq_clip_attempts`, which its tar output writes), samples whose texts came from
//!   the first attempt / samples: exact, and the same after a killed and resumed job. Otherwise
//!   only with `--recap-summary` (hq-recap-trt's `recap_summary*.json`; several are summed): successes on the first generation attempt / the summary's `samples`. When the
//!   summary has `retried_ok` (successes that needed a retry) it is `ok - retried_ok`. Otherwise
//!   it is `min(ok, samples - retried)`: `retried` counts the samples whose first attempt failed
//!   and that were tried again, so with 2+ attempts allowed every first-attempt failure is
//!   retried and the first-attempt successes are `samples - retried`; with one attempt allowed
//!   nothing is retried and they are `ok`. `method` says which was used. The summary covers one
//!   run: samples resumed from an earlier run are not in it.
//! - `object_recall`: a scene group (its colour and shape) is recalled when the text names that
//!   shape with that colour, in a noun phrase (`small dotted orange ring`) or a predicate (`the
//!   ring is orange`); recall = recalled groups / groups. For d+ (`long_positive`, samples with
//!   texts and ground truth), for the raw alt-text (`alt_text`: every sample with ground truth;
//!   `alt_text_same_samples`: the d+ samples, the "copy the alt-text" baseline), and for texts
//!   whose source is `oracle` (`oracle`, the ceiling; null when there are none).
//! - `texts.attributes.<attr>` for d+: per sample one verdict, `correct`, `wrong` (d+ states it
//!   falsely at least once) or `not_stated` (neither; a partial statement counts here), over the
//!   `applicable` samples whose scene has the attribute; see [`claims::Judgement::verdict`] for
//!   when each attribute is correct. Attributes: `color`, `shape`, `size`, `texture`, `count`
//!   (number word or digits before the noun, or `<n> objects`), `relation` (the relation phrase
//!   between mentions that hold it in the image), `background_pattern`, `background_color`,
//!   `place` (a lone object's zone).
//! - `texts.long_positive_faithful`: d+ that state nothing false / d+ judged.
//! - `texts.long_negative.contradicts`: d- that differ from d+ (trimmed) and state at least one
//!   thing false for the scene / d- judged; `equal_to_positive` counts the d- equal to d+.
//!   `plausible`: d- that name at least one object by a known shape with a known object colour
//!   (they read as a description of a scene of this world) / d- judged.
//! - `texts.tags_positive` / `tags_negative`: every tag is judged like a text; it is `checkable`
//!   when it states something the grammar understands (`red cross`, `small cross`, `dotted ring`,
//!   `cross left of ring`, `checkered background`, `two objects`, `red`), true when all of that
//!   holds, false when some of it does not; `uncheckable` tags (`geometric shapes`) are counted
//!   apart. `correct`: t+ tags that are true, t- tags that are false, over the checkable ones.
//! - `oracle`: the same block for oracle-sourced texts, when there are any.

pub mod claims;
mod render;

use crate::error::{DataError, Result, SampleError};
use crate::sample::{Sample, REFINED_JSON_KEY};
use crate::shards::{ImageCheck, ReadOptions, ShardReader};
use crate::synth::scene::Scene;
use claims::{Attr, Claims, Judgement, Verdict};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use render::{chart_png, markdown};

/// The JSON member hq-recap-trt adds when a sample's answer failed.
pub const ERROR_JSON_KEY: &str = "hq_clip_error";

/// The JSON field hq-recap-trt's tar output writes beside model texts: attempts they took.
pub const ATTEMPTS_JSON_KEY: &str = "hq_clip_attempts";

/// Output file names inside the report folder.
pub const JSON_NAME: &str = "quality.json";
pub const MARKDOWN_NAME: &str = "quality.md";
pub const PNG_NAME: &str = "quality.png";

/// How many examples of each kind the report keeps.
const EXAMPLES: usize = 10;

/// `count` of `of`; `rate` is `count / of`, null when `of` is 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Fraction {
    pub count: u64,
    pub of: u64,
    pub rate: Option<f64>,
}

impl Fraction {
    pub fn new(count: u64, of: u64) -> Fraction {
        Fraction {
            count,
            of,
            rate: (of > 0).then(|| count as f64 / of as f64),
        }
    }

    fn add(&mut self, hit: bool) {
        self.add_n(u64::from(hit), 1);
    }

    fn add_n(&mut self, count: u64, of: u64) {
        *self = Fraction::new(self.count + count, self.of + of);
    }
}

/// Per-sample verdicts of one attribute (see [`claims::Judgement::verdict`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct AttributeCounts {
    /// Samples whose scene has the attribute.
    pub applicable: u64,
    pub correct: u64,
    pub wrong: u64,
    pub not_stated: u64,
    /// correct / applicable.
    pub correct_rate: Option<f64>,
    /// wrong / applicable.
    pub wrong_rate: Option<f64>,
}

impl AttributeCounts {
    fn add(&mut self, v: Verdict) {
        self.applicable += 1;
        match v {
            Verdict::Correct => self.correct += 1,
            Verdict::Wrong => self.wrong += 1,
            Verdict::NotStated => self.not_stated += 1,
        }
        let n = self.applicable as f64;
        self.correct_rate = Some(self.correct as f64 / n);
        self.wrong_rate = Some(self.wrong as f64 / n);
    }
}

/// Tags of one kind (t+ or t-).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct TagCounts {
    pub tags: u64,
    pub checkable: u64,
    pub uncheckable: u64,
    /// Checkable tags true for the scene.
    #[serde(rename = "true")]
    pub true_: u64,
    /// Checkable tags false for the scene.
    #[serde(rename = "false")]
    pub false_: u64,
    /// t+: true / checkable; t-: false / checkable.
    pub correct: Fraction,
}

impl TagCounts {
    fn add(&mut self, truth: Option<bool>, want: bool) {
        self.tags += 1;
        match truth {
            None => self.uncheckable += 1,
            Some(t) => {
                self.checkable += 1;
                if t {
                    self.true_ += 1;
                } else {
                    self.false_ += 1;
                }
                self.correct.add(t == want);
            }
        }
    }
}

/// d- figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct NegativeCounts {
    /// Differs from d+ and states something false.
    pub contradicts: Fraction,
    /// d- equal to d+ (trimmed).
    pub equal_to_positive: u64,
    /// Names a known shape with a known object colour.
    pub plausible: Fraction,
}

/// Content metrics of one set of texts (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ContentReport {
    /// Samples judged (texts and ground truth).
    pub samples: u64,
    /// Groups recalled by d+.
    pub object_recall: Fraction,
    /// Groups recalled by the raw alt-text of the same samples.
    pub alt_text_object_recall: Fraction,
    /// Attribute name -> verdict counts for d+.
    pub attributes: BTreeMap<String, AttributeCounts>,
    /// d+ stating nothing false.
    pub long_positive_faithful: Fraction,
    pub long_negative: NegativeCounts,
    pub tags_positive: TagCounts,
    pub tags_negative: TagCounts,
}

impl ContentReport {
    fn add(&mut self, scene: &Scene, texts: &crate::RefinedTexts, alt: &Judgement) {
        self.samples += 1;
        let groups = scene.groups.len() as u64;
        let pos = Judgement::of(&Claims::extract(&texts.long_positive), scene);
        self.object_recall
            .add_n(pos.recalled_groups() as u64, groups);
        self.alt_text_object_recall
            .add_n(alt.recalled_groups() as u64, groups);
        for a in Attr::ALL {
            if let Some(v) = pos.verdict(a, scene) {
                self.attributes
                    .entry(a.name().to_string())
                    .or_default()
                    .add(v);
            }
        }
        self.long_positive_faithful.add(!pos.has_false());
        let neg_claims = Claims::extract(&texts.long_negative);
        let neg = Judgement::of(&neg_claims, scene);
        let equal = texts.long_negative.trim() == texts.long_positive.trim();
        if equal {
            self.long_negative.equal_to_positive += 1;
        }
        self.long_negative
            .contradicts
            .add(!equal && neg.has_false());
        self.long_negative
            .plausible
            .add(claims::plausible(&neg_claims));
        for t in &texts.tags_positive {
            let truth = Judgement::of(&Claims::extract(t), scene).tag_truth();
            self.tags_positive.add(truth, true);
        }
        for t in &texts.tags_negative {
            let truth = Judgement::of(&Claims::extract(t), scene).tag_truth();
            self.tags_negative.add(truth, false);
        }
    }
}

/// What hq-recap-trt's summary said, summed over the files given.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RecapSummary {
    pub files: Vec<String>,
    pub samples: u64,
    pub ok: u64,
    pub retried: u64,
    /// Present only when every file had it.
    pub retried_ok: Option<u64>,
}

/// Success on the first attempt (see the module docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FirstAttempt {
    pub success: Fraction,
    /// `ok - retried_ok` or `min(ok, samples - retried)`.
    pub method: String,
    pub summary: RecapSummary,
}

/// Format figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FormatReport {
    /// Samples with the four texts / samples.
    pub success: Fraction,
    /// Format-error kind -> samples.
    pub errors: BTreeMap<String, u64>,
    pub first_attempt: Option<FirstAttempt>,
}

/// The headline recall figures, side by side.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RecallSummary {
    pub long_positive: Fraction,
    pub alt_text: Fraction,
    pub alt_text_same_samples: Fraction,
    pub oracle: Option<Fraction>,
}

/// A sample worth a look.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Example {
    pub shard: String,
    pub key: String,
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

/// The first few samples of each kind of failure.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Examples {
    pub format_errors: Vec<Example>,
    pub other_errors: Vec<Example>,
    pub no_ground_truth: Vec<Example>,
    /// d+ stating something false.
    pub long_positive_false: Vec<Example>,
    /// d- not contradicting the scene.
    pub long_negative_not_contradicting: Vec<Example>,
}

/// `quality.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct QualityReport {
    pub name: String,
    pub shards: Vec<String>,
    /// `oracle` or `recaption`.
    pub mode: String,
    pub samples: u64,
    pub with_texts: u64,
    pub format_errors: u64,
    pub other_errors: u64,
    pub no_ground_truth: u64,
    pub invalid_ground_truth: u64,
    /// `hq_clip.source` -> samples.
    pub sources: BTreeMap<String, u64>,
    pub format: FormatReport,
    pub object_recall: RecallSummary,
    /// The texts under evaluation (model texts; the oracle's in oracle mode).
    pub texts: ContentReport,
    /// Oracle-sourced texts, where present (the ceiling).
    pub oracle: Option<ContentReport>,
    pub examples: Examples,
}

fn push_example(v: &mut Vec<Example>, e: Example) {
    if v.len() < EXAMPLES {
        v.push(e);
    }
}

/// Accumulates samples one at a time; [`Tally::finish`] makes the report.
#[derive(Debug, Default)]
pub struct Tally {
    samples: u64,
    other_errors: u64,
    no_ground_truth: u64,
    invalid_ground_truth: u64,
    sources: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
    model_ok: u64,
    /// Of `model_ok`: samples whose `hq_clip_attempts` is present, and those where it is 1.
    model_attempts_known: u64,
    model_first_attempt: u64,
    oracle_ok: u64,
    model: ContentReport,
    oracle: ContentReport,
    alt_text: Fraction,
    examples: Examples,
    /// Examples from model texts and from oracle texts, chosen once the mode is known.
    model_examples: (Vec<Example>, Vec<Example>),
    oracle_examples: (Vec<Example>, Vec<Example>),
}

impl Tally {
    pub fn new() -> Tally {
        Tally::default()
    }

    /// Count one item that the shard reader yielded for `shard`.
    pub fn add(&mut self, shard: &str, item: &std::result::Result<Sample, SampleError>) {
        self.samples += 1;
        let s = match item {
            Ok(s) => s,
            Err(e) => {
                let ex = Example {
                    shard: e.shard.clone(),
                    key: e.key.clone(),
                    reason: e.reason.clone(),
                    text: None,
                };
                if e.reason.contains(&format!("under {REFINED_JSON_KEY:?}")) {
                    *self.errors.entry("invalid_hq_clip".into()).or_default() += 1;
                    push_example(&mut self.examples.format_errors, ex);
                } else {
                    self.other_errors += 1;
                    push_example(&mut self.examples.other_errors, ex);
                }
                return;
            }
        };
        let example = |reason: String, text: Option<String>| Example {
            shard: shard.to_string(),
            key: s.key.clone(),
            reason,
            text,
        };
        let scene = match s.meta.get("scene") {
            None | Some(serde_json::Value::Null) => {
                self.no_ground_truth += 1;
                push_example(
                    &mut self.examples.no_ground_truth,
                    example("no scene in the JSON".into(), None),
                );
                None
            }
            Some(v) => match serde_json::from_value::<Scene>(v.clone()) {
                Ok(sc) if !sc.groups.is_empty() => Some(sc),
                Ok(_) => {
                    self.no_ground_truth += 1;
                    self.invalid_ground_truth += 1;
                    push_example(
                        &mut self.examples.no_ground_truth,
                        example("the scene has no object".into(), None),
                    );
                    None
                }
                Err(e) => {
                    self.no_ground_truth += 1;
                    self.invalid_ground_truth += 1;
                    push_example(
                        &mut self.examples.no_ground_truth,
                        example(format!("invalid scene: {e}"), None),
                    );
                    None
                }
            },
        };
        let alt = scene
            .as_ref()
            .map(|sc| Judgement::of(&Claims::extract(&s.raw_text), sc));
        if let (Some(sc), Some(a)) = (&scene, &alt) {
            self.alt_text
                .add_n(a.recalled_groups() as u64, sc.groups.len() as u64);
        }
        if let Some(r) = &s.refined {
            let src = r.source.clone().unwrap_or_else(|| "(none)".into());
            *self.sources.entry(src).or_default() += 1;
        }
        let format_error = if let Some(e) = s.meta.get(ERROR_JSON_KEY) {
            let reason = e
                .get("reason")
                .and_then(|r| r.as_str())
                .unwrap_or("no reason given");
            let category = reason.split(':').next().unwrap_or(reason).trim();
            let category = if category.is_empty() || category.contains(' ') {
                "other"
            } else {
                category
            };
            Some((format!("{ERROR_JSON_KEY}:{category}"), reason.to_string()))
        } else {
            match &s.refined {
                None => Some(("missing_hq_clip".into(), "no hq_clip".into())),
                Some(r)
                    if r.long_positive.trim().is_empty()
                        || r.long_negative.trim().is_empty()
                        || r.tags_positive.iter().all(|t| t.trim().is_empty())
                        || r.tags_negative.iter().all(|t| t.trim().is_empty()) =>
                {
                    Some(("empty_field".into(), "a field of hq_clip is empty".into()))
                }
                Some(_) => None,
            }
        };
        let is_oracle = s
            .refined
            .as_ref()
            .is_some_and(|r| r.source.as_deref() == Some("oracle"));
        if let Some((kind, reason)) = format_error {
            *self.errors.entry(kind).or_default() += 1;
            push_example(&mut self.examples.format_errors, example(reason, None));
            // Oracle texts left beside a failed answer still give the ceiling.
            if let (true, Some(sc), Some(a), Some(r)) = (is_oracle, &scene, &alt, &s.refined) {
                if !r.long_positive.trim().is_empty() {
                    self.oracle.add(sc, r, a);
                }
            }
            return;
        }
        let Some(r) = &s.refined else {
            return;
        };
        if is_oracle {
            self.oracle_ok += 1;
        } else {
            self.model_ok += 1;
            if let Some(n) = s.meta.get(ATTEMPTS_JSON_KEY).and_then(|v| v.as_u64()) {
                self.model_attempts_known += 1;
                self.model_first_attempt += u64::from(n == 1);
            }
        }
        let (Some(sc), Some(a)) = (&scene, &alt) else {
            return;
        };
        let (content, ex) = if is_oracle {
            (&mut self.oracle, &mut self.oracle_examples)
        } else {
            (&mut self.model, &mut self.model_examples)
        };
        content.add(sc, r, a);
        let pos = Judgement::of(&Claims::extract(&r.long_positive), sc);
        if pos.has_false() {
            push_example(
                &mut ex.0,
                example(
                    pos.false_statements.join("; "),
                    Some(r.long_positive.clone()),
                ),
            );
        }
        let neg = Judgement::of(&Claims::extract(&r.long_negative), sc);
        if r.long_negative.trim() == r.long_positive.trim() || !neg.has_false() {
            let why = if r.long_negative.trim() == r.long_positive.trim() {
                "equal to the positive description"
            } else {
                "states nothing false"
            };
            push_example(
                &mut ex.1,
                example(why.into(), Some(r.long_negative.clone())),
            );
        }
    }

    /// The report; `shards` and `name` are recorded as given, `summary` adds first-attempt success.
    pub fn finish(
        mut self,
        name: &str,
        shards: Vec<String>,
        summary: Option<RecapSummary>,
    ) -> QualityReport {
        let hq_errors: u64 = self
            .errors
            .iter()
            .filter(|(k, _)| k.starts_with(ERROR_JSON_KEY))
            .map(|(_, v)| v)
            .sum();
        let oracle_mode = self.model_ok == 0 && hq_errors == 0 && self.oracle_ok > 0;
        let with_texts;
        let texts;
        let examples_from;
        if oracle_mode {
            with_texts = self.oracle_ok;
            texts = self.oracle.clone();
            examples_from = std::mem::take(&mut self.oracle_examples);
        } else {
            with_texts = self.model_ok;
            texts = self.model.clone();
            examples_from = std::mem::take(&mut self.model_examples);
            if self.oracle_ok > 0 {
                *self.errors.entry("not_recaptioned".into()).or_default() += self.oracle_ok;
            }
        }
        self.examples.long_positive_false = examples_from.0;
        self.examples.long_negative_not_contradicting = examples_from.1;
        let format_errors: u64 = self.errors.values().sum();
        let oracle = (self.oracle.samples > 0).then_some(self.oracle);
        // Per-sample attempt counts in the shards are exact (resumed runs included); a summary
        // only covers one run.
        let first_attempt =
            if (self.model_ok > 0 || hq_errors > 0) && self.model_attempts_known == self.model_ok {
                Some(FirstAttempt {
                    success: Fraction::new(self.model_first_attempt, self.samples),
                    method: format!("{ATTEMPTS_JSON_KEY} == 1 in the shards"),
                    summary: summary.unwrap_or_default(),
                })
            } else {
                summary.map(first_attempt)
            };
        QualityReport {
            name: name.to_string(),
            shards,
            mode: if oracle_mode { "oracle" } else { "recaption" }.to_string(),
            samples: self.samples,
            with_texts,
            format_errors,
            other_errors: self.other_errors,
            no_ground_truth: self.no_ground_truth,
            invalid_ground_truth: self.invalid_ground_truth,
            sources: self.sources,
            format: FormatReport {
                success: Fraction::new(with_texts, self.samples),
                errors: self.errors,
                first_attempt,
            },
            object_recall: RecallSummary {
                long_positive: texts.object_recall,
                alt_text: self.alt_text,
                alt_text_same_samples: texts.alt_text_object_recall,
                oracle: oracle.as_ref().map(|o| o.object_recall),
            },
            texts,
            oracle,
            examples: self.examples,
        }
    }
}

fn first_attempt(s: RecapSummary) -> FirstAttempt {
    let (count, method) = match s.retried_ok {
        Some(r) => (s.ok.saturating_sub(r), "ok - retried_ok"),
        None => (
            s.ok.min(s.samples.saturating_sub(s.retried)),
            "min(ok, samples - retried)",
        ),
    };
    FirstAttempt {
        success: Fraction::new(count, s.samples),
        method: method.to_string(),
        summary: s,
    }
}

/// Read hq-recap-trt summaries (`samples`, `ok`, `retried`, optionally `retried_ok`) and sum them.
pub fn read_recap_summaries(paths: &[PathBuf]) -> Result<Option<RecapSummary>> {
    if paths.is_empty() {
        return Ok(None);
    }
    let mut out = RecapSummary {
        retried_ok: Some(0),
        ..RecapSummary::default()
    };
    for p in paths {
        let text = std::fs::read_to_string(p).map_err(|e| DataError::io(p, e))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| DataError::Json {
            path: p.clone(),
            source: e,
        })?;
        let field = |name: &str| -> Result<u64> {
            v.get(name).and_then(|x| x.as_u64()).ok_or_else(|| {
                DataError::Invalid(format!(
                    "{}: no {name:?} count (is it hq-recap-trt's summary-*.json?)",
                    p.display()
                ))
            })
        };
        out.samples += field("samples")?;
        out.ok += field("ok")?;
        out.retried += field("retried")?;
        out.retried_ok = match (out.retried_ok, v.get("retried_ok").and_then(|x| x.as_u64())) {
            (Some(a), Some(b)) => Some(a + b),
            _ => None,
        };
        out.files.push(p.display().to_string());
    }
    Ok(Some(out))
}

/// Settings of [`evaluate`].
#[derive(Debug, Clone, Default)]
pub struct QualityOptions {
    /// Report name (the chart's title); defaults to the first input's name.
    pub name: Option<String>,
    /// hq-recap-trt summary files.
    pub recap_summaries: Vec<PathBuf>,
    pub progress: bool,
}

/// Read every sample of `inputs` (corpus folders, folders of `.tar`, shard specifications: as
/// `hq-data stats` takes them) and make the report.
pub fn evaluate(inputs: &[String], opts: &QualityOptions) -> Result<QualityReport> {
    let mut shards = Vec::new();
    for a in inputs {
        shards.extend(crate::synth::stats::resolve_stats_input(a)?.0);
    }
    let summary = read_recap_summaries(&opts.recap_summaries)?;
    let name = opts.name.clone().unwrap_or_else(|| default_name(inputs));
    let bar = crate::progress::bar(None, "samples");
    bar.set_message("quality");
    if !opts.progress {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let read = ReadOptions {
        image_check: ImageCheck::None,
        require_image: false,
        require_text: false,
        ..ReadOptions::default()
    };
    let names: Vec<String> = shards.iter().map(|p| p.display().to_string()).collect();
    let mut tally = Tally::new();
    for (path, shard) in shards.iter().zip(&names) {
        // One shard at a time, so each sample knows its shard for the examples.
        for item in ShardReader::new(vec![path.clone()], read.clone()) {
            tally.add(shard, &item);
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    Ok(tally.finish(&name, names, summary))
}

fn default_name(inputs: &[String]) -> String {
    inputs
        .first()
        .map(|a| {
            let p = Path::new(a.trim_end_matches('/'));
            p.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| a.clone())
        })
        .unwrap_or_else(|| "recaptions".into())
}

/// Write `quality.json`, `quality.md` and `quality.png` into `dir` (created), each atomically.
/// The files written come back; a chart that cannot be drawn (no font on the machine) is not
/// fatal, since the JSON and Markdown hold the same numbers: its error comes back instead.
pub fn write_report(report: &QualityReport, dir: &Path) -> Result<Written> {
    std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    let json = serde_json::to_vec_pretty(report).map_err(|e| DataError::Json {
        path: dir.join(JSON_NAME),
        source: e,
    })?;
    let mut written = Written::default();
    crate::atomic::write_atomic(dir.join(JSON_NAME), &json)?;
    written.files.push(dir.join(JSON_NAME));
    crate::atomic::write_atomic(dir.join(MARKDOWN_NAME), markdown(report).as_bytes())?;
    written.files.push(dir.join(MARKDOWN_NAME));
    match chart_png(report) {
        Ok(png) => {
            crate::atomic::write_atomic(dir.join(PNG_NAME), &png)?;
            written.files.push(dir.join(PNG_NAME));
        }
        Err(e) => written.chart_error = Some(e.to_string()),
    }
    Ok(written)
}

/// What [`write_report`] wrote.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Written {
    pub files: Vec<PathBuf>,
    /// Why `quality.png` is missing, if it is.
    pub chart_error: Option<String>,
}
