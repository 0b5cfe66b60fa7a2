//! Side-car annotations: refined texts shipped apart from the shards, as a JSONL file keyed by a
//! sample id (VLM-150M ships its annotations keyed by the DFN `uid`), and the join that attaches
//! them to samples.
//!
//! One record a line. Accepted shapes (the id field is configurable, `uid` by default):
//! - flat: `{"uid": "…", "long_positive": "…", "long_negative": "…", "tags_positive": […],
//!   "tags_negative": […], "source": "…"}`;
//! - nested: `{"uid": "…", "hq_clip": {<the fields of RefinedTexts>}}`, or the same under any other
//!   single object field that holds `long_positive`.
//!
//! Tags may be a list of strings or one comma-separated string. A line that is not valid JSON, or
//! lacks a field, becomes an error record ([`SampleError`] with the side-car's path as `shard`, the
//! id as `key` when known, and the line number in `reason`); loading goes on. The side-car is
//! per-dataset metadata and is held in a `HashMap`.

use crate::error::{DataError, Result, SampleError};
use crate::sample::{RefinedTexts, Sample, REFINED_JSON_KEY};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

/// The default id field, in side-car records and in sample metadata.
pub const DEFAULT_ID_FIELD: &str = "uid";

struct Entry {
    refined: RefinedTexts,
    used: bool,
}

/// A loaded side-car: id -> refined texts, plus the records that could not be read.
pub struct Sidecar {
    source: String,
    entries: HashMap<String, Entry>,
    errors: Vec<SampleError>,
    lines: u64,
}

fn id_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn tags(obj: &Map<String, Value>, field: &str) -> std::result::Result<Vec<String>, String> {
    match obj.get(field) {
        Some(Value::Array(items)) => items
            .iter()
            .map(|t| match t {
                Value::String(s) => Ok(s.trim().to_string()),
                other => Err(format!("{field} holds a non-string item {other}")),
            })
            .filter(|t| t.as_ref().map_or(true, |s| !s.is_empty()))
            .collect(),
        Some(Value::String(s)) => Ok(s
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_string)
            .collect()),
        Some(other) => Err(format!(
            "{field} must be a list of strings or a comma-separated string, not {other}"
        )),
        None => Err(format!("missing field {field:?}")),
    }
}

fn text(obj: &Map<String, Value>, field: &str) -> std::result::Result<String, String> {
    match obj.get(field) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!("{field} must be a string, not {other}")),
        None => Err(format!("missing field {field:?}")),
    }
}

/// The refined texts of one side-car record (flat or nested; see the module docs).
pub fn refined_from_record(obj: &Map<String, Value>) -> std::result::Result<RefinedTexts, String> {
    let fields: &Map<String, Value> = if obj.contains_key("long_positive") {
        obj
    } else if let Some(Value::Object(inner)) = obj.get(REFINED_JSON_KEY) {
        inner
    } else {
        let nested: Vec<&Map<String, Value>> = obj
            .values()
            .filter_map(|v| match v {
                Value::Object(o) if o.contains_key("long_positive") => Some(o),
                _ => None,
            })
            .collect();
        match nested.as_slice() {
            [one] => one,
            [] => return Err("no refined texts (no long_positive field, flat or nested)".into()),
            _ => {
                return Err("several nested objects hold long_positive; which one is meant?".into())
            }
        }
    };
    let source = match fields.get("source") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => return Err(format!("source must be a string, not {other}")),
    };
    Ok(RefinedTexts {
        long_positive: text(fields, "long_positive")?,
        long_negative: text(fields, "long_negative")?,
        tags_positive: tags(fields, "tags_positive")?,
        tags_negative: tags(fields, "tags_negative")?,
        source,
    })
}

/// Parse one side-car line into (id, refined texts).
pub fn parse_record(
    line: &str,
    id_field: &str,
) -> std::result::Result<(String, RefinedTexts), String> {
    let value: Value = serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
    let Value::Object(obj) = value else {
        return Err("the record is not a JSON object".into());
    };
    let id = obj
        .get(id_field)
        .and_then(id_string)
        .ok_or_else(|| format!("no usable {id_field:?} field (a non-empty string or a number)"))?;
    let refined = refined_from_record(&obj).map_err(|e| format!("record {id}: {e}"))?;
    Ok((id, refined))
}

impl Sidecar {
    /// Load a JSONL side-car keyed by `uid`.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        Self::load_with(path, DEFAULT_ID_FIELD)
    }

    /// Load a JSONL side-car keyed by `id_field`. Only I/O failures are errors; bad records are
    /// kept in [`Sidecar::errors`].
    pub fn load_with(path: impl AsRef<Path>, id_field: &str) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| DataError::io(path, e))?;
        Self::from_reader(BufReader::new(file), &path.display().to_string(), id_field)
            .map_err(|e| DataError::io(path, e))
    }

    /// Read side-car records from any buffered reader; `source` names it in error records.
    pub fn from_reader<R: BufRead>(
        mut reader: R,
        source: &str,
        id_field: &str,
    ) -> std::io::Result<Self> {
        let mut sc = Sidecar {
            source: source.to_string(),
            entries: HashMap::new(),
            errors: Vec::new(),
            lines: 0,
        };
        let mut first_line: HashMap<String, u64> = HashMap::new();
        let mut buf = Vec::new();
        loop {
            buf.clear();
            if reader.read_until(b'\n', &mut buf)? == 0 {
                break;
            }
            sc.lines += 1;
            let lineno = sc.lines;
            let line = match std::str::from_utf8(&buf) {
                Ok(l) => l.trim(),
                Err(e) => {
                    sc.error("", format!("line {lineno}: not valid UTF-8: {e}"));
                    continue;
                }
            };
            if line.is_empty() {
                continue;
            }
            match parse_record(line, id_field) {
                Ok((id, refined)) => {
                    if let Some(first) = first_line.get(&id) {
                        let reason = format!(
                            "line {lineno}: duplicate id (first on line {first}); keeping the first"
                        );
                        sc.error(&id, reason);
                    } else {
                        first_line.insert(id.clone(), lineno);
                        sc.entries.insert(
                            id,
                            Entry {
                                refined,
                                used: false,
                            },
                        );
                    }
                }
                Err(why) => {
                    let id = serde_json::from_str::<Value>(line)
                        .ok()
                        .and_then(|v| v.get(id_field).and_then(id_string))
                        .unwrap_or_default();
                    sc.error(&id, format!("line {lineno}: {why}"));
                }
            }
        }
        Ok(sc)
    }

    fn error(&mut self, key: &str, reason: String) {
        self.errors.push(SampleError {
            shard: self.source.clone(),
            key: key.to_string(),
            reason,
        });
    }

    /// Number of annotations loaded.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Lines read (including bad and blank ones).
    pub fn lines(&self) -> u64 {
        self.lines
    }

    pub fn get(&self, id: &str) -> Option<&RefinedTexts> {
        self.entries.get(id).map(|e| &e.refined)
    }

    /// The records that could not be used.
    pub fn errors(&self) -> &[SampleError] {
        &self.errors
    }
}

/// Join settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinOptions {
    /// Metadata field holding a sample's id (`uid`); `None`, or a sample without it, uses the key.
    pub id_field: Option<String>,
    /// Replace refined texts a sample already carries (otherwise they win over the side-car).
    pub overwrite: bool,
    /// How many example ids the report lists for each problem.
    pub max_examples: usize,
}

impl Default for JoinOptions {
    fn default() -> Self {
        JoinOptions {
            id_field: Some(DEFAULT_ID_FIELD.to_string()),
            overwrite: true,
            max_examples: 20,
        }
    }
}

/// What a join did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JoinReport {
    /// Samples seen.
    pub samples: u64,
    /// Samples that received an annotation.
    pub joined: u64,
    /// Joined samples whose own refined texts were replaced.
    pub overwritten: u64,
    /// Samples with no annotation in the side-car, and the first few of their ids.
    pub unannotated: u64,
    pub unannotated_examples: Vec<String>,
    /// Annotations no sample asked for, and the first few of their ids (sorted).
    pub unused: u64,
    pub unused_examples: Vec<String>,
    /// Side-car records that could not be read.
    pub sidecar_errors: usize,
}

impl fmt::Display for JoinReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "side-car join: {} samples, {} annotated ({} replaced own texts), {} without annotation, \
             {} annotations unused, {} bad side-car records",
            self.samples,
            self.joined,
            self.overwritten,
            self.unannotated,
            self.unused,
            self.sidecar_errors
        )?;
        if f.alternate() {
            if !self.unannotated_examples.is_empty() {
                write!(
                    f,
                    "\n  without annotation, e.g.: {}",
                    self.unannotated_examples.join(", ")
                )?;
            }
            if !self.unused_examples.is_empty() {
                write!(
                    f,
                    "\n  unused annotations, e.g.: {}",
                    self.unused_examples.join(", ")
                )?;
            }
        }
        Ok(())
    }
}

/// Attaches side-car annotations to samples and keeps the books.
pub struct SidecarJoin {
    sidecar: Sidecar,
    opts: JoinOptions,
    report: JoinReport,
}

impl SidecarJoin {
    pub fn new(sidecar: Sidecar, opts: JoinOptions) -> Self {
        let report = JoinReport {
            sidecar_errors: sidecar.errors.len(),
            ..JoinReport::default()
        };
        SidecarJoin {
            sidecar,
            opts,
            report,
        }
    }

    pub fn sidecar(&self) -> &Sidecar {
        &self.sidecar
    }

    /// The id a sample is looked up by: its `id_field` metadata value, else its key.
    pub fn sample_id(&self, sample: &Sample) -> String {
        self.opts
            .id_field
            .as_deref()
            .and_then(|f| sample.meta.get(f))
            .and_then(id_string)
            .unwrap_or_else(|| sample.key.clone())
    }

    /// Attach the sample's annotation, if the side-car has one; true when it did.
    pub fn attach(&mut self, sample: &mut Sample) -> bool {
        self.report.samples += 1;
        let id = self.sample_id(sample);
        match self.sidecar.entries.get_mut(&id) {
            Some(entry) => {
                entry.used = true;
                if sample.refined.is_some() {
                    if !self.opts.overwrite {
                        return false;
                    }
                    self.report.overwritten += 1;
                }
                sample.refined = Some(entry.refined.clone());
                self.report.joined += 1;
                true
            }
            None => {
                self.report.unannotated += 1;
                if self.report.unannotated_examples.len() < self.opts.max_examples {
                    self.report.unannotated_examples.push(id);
                }
                false
            }
        }
    }

    /// Attach annotations to every good sample of a reader's items, passing errors through.
    pub fn join_iter<'a, I>(&'a mut self, items: I) -> impl Iterator<Item = I::Item> + 'a
    where
        I: IntoIterator<Item = std::result::Result<Sample, SampleError>>,
        I::IntoIter: 'a,
    {
        items.into_iter().map(move |item| {
            item.map(|mut s| {
                self.attach(&mut s);
                s
            })
        })
    }

    /// Every annotation never used so far, sorted.
    pub fn unused_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .sidecar
            .entries
            .iter()
            .filter(|(_, e)| !e.used)
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort();
        ids
    }

    /// The report so far (unused annotations counted now).
    pub fn report(&self) -> JoinReport {
        let mut r = self.report.clone();
        let unused = self.unused_ids();
        r.unused = unused.len() as u64;
        r.unused_examples = unused.into_iter().take(self.opts.max_examples).collect();
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINES: &str = r#"{"uid": "a", "long_positive": "A dog.", "long_negative": "A cat.", "tags_positive": ["dog"], "tags_negative": ["cat"]}
{"uid": "b", "hq_clip": {"long_positive": "B", "long_negative": "b", "tags_positive": "x, y", "tags_negative": [], "source": "oracle"}}
not json at all
{"uid": 17, "annotation": {"long_positive": "C", "long_negative": "c", "tags_positive": [], "tags_negative": []}}

{"uid": "a", "long_positive": "dup", "long_negative": "dup", "tags_positive": [], "tags_negative": []}
{"uid": "d", "long_positive": "D"}
[1, 2]
"#;

    #[test]
    fn records_and_errors() {
        let sc = Sidecar::from_reader(LINES.as_bytes(), "side.jsonl", "uid").expect("read");
        assert_eq!(sc.len(), 3);
        assert_eq!(sc.lines(), 8);
        assert_eq!(sc.get("a").expect("a").long_positive, "A dog.");
        let b = sc.get("b").expect("b");
        assert_eq!(b.tags_positive, vec!["x", "y"]);
        assert_eq!(b.source.as_deref(), Some("oracle"));
        assert_eq!(sc.get("17").expect("17").long_negative, "c");
        let reasons: Vec<String> = sc.errors().iter().map(|e| e.to_string()).collect();
        assert_eq!(reasons.len(), 4, "{reasons:#?}");
        assert!(
            reasons[0].contains("line 3: invalid JSON"),
            "{}",
            reasons[0]
        );
        assert!(reasons[1].contains("duplicate"), "{}", reasons[1]);
        assert!(reasons[2].contains("long_negative"), "{}", reasons[2]);
        assert_eq!(sc.errors()[2].key, "d");
        assert!(reasons[3].contains("not a JSON object"), "{}", reasons[3]);
    }
}
