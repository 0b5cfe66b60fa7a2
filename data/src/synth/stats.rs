//! Corpus statistics: counts, sizes, raw-text lengths and kinds, tag vocabulary, description
//! lengths. Filled sample by sample (so a corpus of any size streams through it), printed by
//! `hq-data stats` and at the end of `hq-data synth`, and stored in the corpus manifest.
//!
//! Works on any webdataset shards, not only synthetic ones: the raw-text kinds come from the
//! `raw_kind` metadata member when present, refined-text figures from `hq_clip` when present.

use crate::sample::Sample;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

/// Count, sum, minimum and maximum of a length (whitespace tokens).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LengthStats {
    pub count: u64,
    pub sum: u64,
    pub min: Option<u64>,
    pub max: Option<u64>,
}

impl LengthStats {
    pub fn add(&mut self, n: u64) {
        self.count += 1;
        self.sum += n;
        self.min = Some(self.min.map_or(n, |m| m.min(n)));
        self.max = Some(self.max.map_or(n, |m| m.max(n)));
    }

    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum as f64 / self.count as f64
        }
    }

    pub fn merge(&mut self, o: &LengthStats) {
        self.count += o.count;
        self.sum += o.sum;
        self.min = match (self.min, o.min) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.max = match (self.max, o.max) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }

    fn line(&self) -> String {
        format!(
            "mean {:.2}, min {}, max {}",
            self.mean(),
            self.min.unwrap_or(0),
            self.max.unwrap_or(0)
        )
    }
}

/// Statistics over a set of samples.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CorpusStats {
    pub samples: u64,
    pub shards: u64,
    /// Bytes of the shard files.
    pub bytes: u64,
    /// Samples the reader rejected.
    pub bad_samples: u64,
    /// `WxH` -> samples.
    pub image_sizes: BTreeMap<String, u64>,
    /// Image extension -> samples.
    pub image_formats: BTreeMap<String, u64>,
    pub image_bytes: u64,
    pub raw_tokens: LengthStats,
    /// `raw_kind` metadata -> samples (`unknown` when absent).
    pub raw_kinds: BTreeMap<String, u64>,
    pub raw_decorated: u64,
    /// Samples with refined texts.
    pub refined: u64,
    pub positive_tokens: LengthStats,
    pub negative_tokens: LengthStats,
    pub tags_per_sample: LengthStats,
    pub negative_tags_per_sample: LengthStats,
    /// Normalised positive tag -> samples.
    pub tags: HashMap<String, u64>,
    /// Held-out set name -> samples (from the corpus manifest).
    pub eval_sets: BTreeMap<String, u64>,
}

fn words(s: &str) -> u64 {
    s.split_whitespace().count() as u64
}

/// The tag form used for the vocabulary: lower-case, single spaces.
pub fn normalise_tag(t: &str) -> String {
    t.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

impl CorpusStats {
    pub fn add_sample(&mut self, s: &Sample) {
        self.samples += 1;
        if let Some(img) = &s.image {
            *self.image_formats.entry(img.ext.clone()).or_default() += 1;
            self.image_bytes += img.bytes.len() as u64;
            let dims = match (
                s.meta.get("width").and_then(|v| v.as_u64()),
                s.meta.get("height").and_then(|v| v.as_u64()),
            ) {
                (Some(w), Some(h)) => Some((w, h)),
                _ => crate::shards::probe_image(&img.bytes, crate::shards::DEFAULT_MAX_PIXELS)
                    .ok()
                    .map(|i| (i.width as u64, i.height as u64)),
            };
            let key = dims.map_or_else(|| "unknown".to_string(), |(w, h)| format!("{w}x{h}"));
            *self.image_sizes.entry(key).or_default() += 1;
        }
        self.raw_tokens.add(words(&s.raw_text));
        let kind = s
            .meta
            .get("raw_kind")
            .and_then(|v| v.as_str())
            .unwrap_or("unknown");
        *self.raw_kinds.entry(kind.to_string()).or_default() += 1;
        if s.meta.get("raw_decorated").and_then(|v| v.as_bool()) == Some(true) {
            self.raw_decorated += 1;
        }
        if let Some(r) = &s.refined {
            self.refined += 1;
            self.positive_tokens.add(words(&r.long_positive));
            self.negative_tokens.add(words(&r.long_negative));
            self.tags_per_sample.add(r.tags_positive.len() as u64);
            self.negative_tags_per_sample
                .add(r.tags_negative.len() as u64);
            for t in &r.tags_positive {
                *self.tags.entry(normalise_tag(t)).or_default() += 1;
            }
        }
    }

    pub fn merge(&mut self, o: &CorpusStats) {
        self.samples += o.samples;
        self.shards += o.shards;
        self.bytes += o.bytes;
        self.bad_samples += o.bad_samples;
        for (k, v) in &o.image_sizes {
            *self.image_sizes.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &o.image_formats {
            *self.image_formats.entry(k.clone()).or_default() += v;
        }
        self.image_bytes += o.image_bytes;
        self.raw_tokens.merge(&o.raw_tokens);
        for (k, v) in &o.raw_kinds {
            *self.raw_kinds.entry(k.clone()).or_default() += v;
        }
        self.raw_decorated += o.raw_decorated;
        self.refined += o.refined;
        self.positive_tokens.merge(&o.positive_tokens);
        self.negative_tokens.merge(&o.negative_tokens);
        self.tags_per_sample.merge(&o.tags_per_sample);
        self.negative_tags_per_sample
            .merge(&o.negative_tags_per_sample);
        for (k, v) in &o.tags {
            *self.tags.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &o.eval_sets {
            *self.eval_sets.entry(k.clone()).or_default() += v;
        }
    }

    /// The `n` most frequent tags, ties broken alphabetically.
    pub fn top_tags(&self, n: usize) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = self.tags.iter().map(|(k, c)| (k.clone(), *c)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v.truncate(n);
        v
    }

    /// Fraction of samples per raw-text kind.
    pub fn raw_kind_fractions(&self) -> BTreeMap<String, f64> {
        self.raw_kinds
            .iter()
            .map(|(k, v)| (k.clone(), *v as f64 / self.samples.max(1) as f64))
            .collect()
    }

    pub fn to_json(&self, top: usize) -> serde_json::Value {
        serde_json::json!({
            "samples": self.samples,
            "shards": self.shards,
            "bytes": self.bytes,
            "bad_samples": self.bad_samples,
            "image_sizes": self.image_sizes,
            "image_formats": self.image_formats,
            "image_bytes_mean": if self.samples > 0 { self.image_bytes as f64 / self.samples as f64 } else { 0.0 },
            "raw_text_tokens": {
                "mean": self.raw_tokens.mean(), "min": self.raw_tokens.min, "max": self.raw_tokens.max,
            },
            "raw_kinds": self.raw_kinds,
            "raw_kind_fractions": self.raw_kind_fractions(),
            "raw_decorated": self.raw_decorated,
            "refined": self.refined,
            "long_positive_tokens": {
                "mean": self.positive_tokens.mean(), "min": self.positive_tokens.min, "max": self.positive_tokens.max,
            },
            "long_negative_tokens": {
                "mean": self.negative_tokens.mean(), "min": self.negative_tokens.min, "max": self.negative_tokens.max,
            },
            "tags_per_sample_mean": self.tags_per_sample.mean(),
            "negative_tags_per_sample_mean": self.negative_tags_per_sample.mean(),
            "tag_vocabulary": self.tags.len(),
            "top_tags": self.top_tags(top).into_iter().map(|(t, c)| serde_json::json!([t, c])).collect::<Vec<_>>(),
            "eval_sets": self.eval_sets,
        })
    }

    /// A human-readable report.
    pub fn report(&self, top: usize) -> String {
        let mut s = String::new();
        let n = self.samples.max(1) as f64;
        let _ = writeln!(
            s,
            "samples: {} in {} shard(s), {:.2} MB{}",
            self.samples,
            self.shards,
            self.bytes as f64 / 1e6,
            if self.bad_samples > 0 {
                format!(" ({} bad samples skipped)", self.bad_samples)
            } else {
                String::new()
            }
        );
        let sizes: Vec<String> = self
            .image_sizes
            .iter()
            .map(|(k, v)| format!("{k} ({v})"))
            .collect();
        let formats: Vec<String> = self
            .image_formats
            .iter()
            .map(|(k, v)| format!("{k} ({v})"))
            .collect();
        let _ = writeln!(
            s,
            "images: {}; formats {}; mean {:.0} bytes",
            sizes.join(", "),
            formats.join(", "),
            self.image_bytes as f64 / n
        );
        let _ = writeln!(s, "raw text tokens: {}", self.raw_tokens.line());
        let kinds: Vec<String> = self
            .raw_kinds
            .iter()
            .map(|(k, v)| format!("{k} {:.1}%", 100.0 * *v as f64 / n))
            .collect();
        let _ = writeln!(
            s,
            "raw text kinds: {}; decorated with boilerplate {:.1}%",
            kinds.join(", "),
            100.0 * self.raw_decorated as f64 / n
        );
        let _ = writeln!(
            s,
            "refined texts: {} ({:.1}%)",
            self.refined,
            100.0 * self.refined as f64 / n
        );
        if self.refined > 0 {
            let _ = writeln!(
                s,
                "long description tokens: {}",
                self.positive_tokens.line()
            );
            let _ = writeln!(
                s,
                "negative description tokens: {}",
                self.negative_tokens.line()
            );
            let _ = writeln!(
                s,
                "tags per sample: {:.2} positive, {:.2} negative",
                self.tags_per_sample.mean(),
                self.negative_tags_per_sample.mean()
            );
            let tops: Vec<String> = self
                .top_tags(top)
                .into_iter()
                .map(|(t, c)| format!("{t} ({c})"))
                .collect();
            let _ = writeln!(
                s,
                "tag vocabulary: {} distinct; top {}: {}",
                self.tags.len(),
                tops.len(),
                tops.join(", ")
            );
        }
        if !self.eval_sets.is_empty() {
            let sets: Vec<String> = self
                .eval_sets
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            let _ = writeln!(s, "eval sets: {}", sets.join(", "));
        }
        s
    }
}

impl Serialize for CorpusStats {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_json(20).serialize(serializer)
    }
}

/// Shards to read for one `hq-data stats` argument, and the eval-set counts of a corpus manifest.
/// An argument is a corpus folder (with `corpus.json`: its training shards and eval sets), any
/// folder (its `*.tar` files, sorted), or a shard specification ([`crate::shards::expand_shards`]).
pub fn resolve_stats_input(
    arg: &str,
) -> crate::Result<(Vec<std::path::PathBuf>, BTreeMap<String, u64>)> {
    use crate::error::DataError;
    let path = std::path::Path::new(arg);
    if !path.is_dir() {
        return Ok((crate::shards::expand_shards(&[arg])?, BTreeMap::new()));
    }
    let manifest = path.join(super::MANIFEST_NAME);
    let mut evals = BTreeMap::new();
    let dir = if manifest.is_file() {
        let text = std::fs::read_to_string(&manifest).map_err(|e| DataError::io(&manifest, e))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| DataError::Json {
            path: manifest.clone(),
            source: e,
        })?;
        if let Some(sets) = v.get("eval").and_then(|e| e.as_array()) {
            for s in sets {
                if let (Some(name), Some(count)) = (
                    s.get("name").and_then(|x| x.as_str()),
                    s.get("count").and_then(|x| x.as_u64()),
                ) {
                    evals.insert(name.to_string(), count);
                }
            }
        }
        path.join("train")
    } else {
        path.to_path_buf()
    };
    let mut shards: Vec<std::path::PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| DataError::io(&dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.ends_with(".tar") && !n.starts_with('.'))
        })
        .collect();
    shards.sort();
    if shards.is_empty() {
        return Err(DataError::ShardSpec {
            spec: arg.to_string(),
            reason: format!("no .tar shards in {}", dir.display()),
        });
    }
    Ok((shards, evals))
}

/// Statistics of the shards named by `args` (see [`resolve_stats_input`]), read on `threads`
/// worker threads (0: one per core). Bad samples are counted, not fatal.
pub fn stats_of(args: &[String], threads: usize, progress: bool) -> crate::Result<CorpusStats> {
    use crate::error::DataError;
    let mut shards = Vec::new();
    let mut evals = BTreeMap::new();
    for a in args {
        let (s, e) = resolve_stats_input(a)?;
        shards.extend(s);
        evals.extend(e);
    }
    let mut stats = CorpusStats {
        shards: shards.len() as u64,
        eval_sets: evals,
        ..CorpusStats::default()
    };
    for p in &shards {
        stats.bytes += std::fs::metadata(p).map_err(|e| DataError::io(p, e))?.len();
    }
    let bar = crate::progress::bar(None, "samples");
    bar.set_message("stats");
    if !progress {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let opts = crate::shards::ReadOptions {
        require_text: false,
        ..Default::default()
    };
    let reader = crate::shards::read_parallel(
        shards,
        opts,
        crate::shards::ParallelOptions {
            threads,
            ..Default::default()
        },
    );
    for item in reader {
        match item {
            Ok(s) => stats.add_sample(&s),
            Err(_) => stats.bad_samples += 1,
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(stats)
}
