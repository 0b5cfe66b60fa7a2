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
//! held in a `HashMap`, so one file should hold one shard's annotations (or a data set small enough
//! for memory); [`super::annotations`] matches files to shards so only open shards' entries are held.
//!
//! Beyond the shapes above, [`Sidecar::load_file`] reads `.json` files (a list of records, or one
//! object keyed by id) and takes a [`FieldMap`]: which of the record's fields hold the four texts, for
//! layouts whose field names are not ours (VLM-150M's, say). Duplicate ids: the first record wins and
//! each later one is an error record.

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
    /// Line (or entry) number of the record, for duplicate reports.
    first: u64,
}

/// A loaded side-car: id -> refined texts, plus the records that could not be read.
pub struct Sidecar {
    source: String,
    entries: HashMap<String, Entry>,
    errors: Vec<SampleError>,
    lines: u64,
}

/// A record's or a sample's id value as a string (non-empty strings and numbers).
pub fn id_string(v: &Value) -> Option<String> {
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

/// Which record fields hold the refined texts. All `None` (the default) means our own names, flat or
/// nested (see the module docs). Otherwise `long_positive` must be set, each name may be a dotted
/// path into nested objects (`annotation.caption`), and an unmapped field is left empty (no
/// negatives or tags). A record lacking a mapped field is an error record naming the field.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FieldMap {
    pub long_positive: Option<String>,
    pub long_negative: Option<String>,
    pub tags_positive: Option<String>,
    pub tags_negative: Option<String>,
    pub source: Option<String>,
}

impl FieldMap {
    /// Our own field names (flat or nested).
    pub fn is_auto(&self) -> bool {
        *self == FieldMap::default()
    }

    /// Parse `long_positive=caption,tags_positive=meta.tags` (the command-line form).
    pub fn parse(spec: &str) -> Result<Self> {
        let mut m = FieldMap::default();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (ours, theirs) = part.split_once('=').ok_or_else(|| {
                DataError::Invalid(format!(
                    "annotation field mapping {part:?} is not OURS=THEIRS (e.g. long_positive=caption)"
                ))
            })?;
            let theirs = Some(theirs.trim().to_string()).filter(|t| !t.is_empty());
            let slot = match ours.trim() {
                "long_positive" => &mut m.long_positive,
                "long_negative" => &mut m.long_negative,
                "tags_positive" => &mut m.tags_positive,
                "tags_negative" => &mut m.tags_negative,
                "source" => &mut m.source,
                other => {
                    return Err(DataError::Invalid(format!(
                        "annotation field mapping names {other:?}; the texts are long_positive, \
                         long_negative, tags_positive, tags_negative and source"
                    )))
                }
            };
            *slot = theirs;
        }
        m.validate()?;
        Ok(m)
    }

    pub fn validate(&self) -> Result<()> {
        if !self.is_auto() && self.long_positive.is_none() {
            return Err(DataError::Invalid(
                "an annotation field mapping must name the field of long_positive".into(),
            ));
        }
        Ok(())
    }

    /// The refined texts of one record under this mapping.
    pub fn refined(&self, obj: &Map<String, Value>) -> std::result::Result<RefinedTexts, String> {
        let Some(lp) = &self.long_positive else {
            return refined_from_record(obj);
        };
        let get = |path: &str| -> std::result::Result<&Value, String> {
            let mut cur: Option<&Value> = None;
            for (i, part) in path.split('.').enumerate() {
                let next = match (i, cur) {
                    (0, _) => obj.get(part),
                    (_, Some(Value::Object(o))) => o.get(part),
                    _ => None,
                };
                cur = Some(next.ok_or_else(|| format!("missing mapped field {path:?}"))?);
            }
            cur.ok_or_else(|| format!("missing mapped field {path:?}"))
        };
        let text_of = |field: &Option<String>| -> std::result::Result<String, String> {
            match field {
                None => Ok(String::new()),
                Some(f) => match get(f)? {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(format!("{f} must be a string, not {other}")),
                },
            }
        };
        let tags_of = |field: &Option<String>| -> std::result::Result<Vec<String>, String> {
            match field {
                None => Ok(Vec::new()),
                Some(f) => {
                    let v = get(f)?;
                    let mut one = Map::new();
                    one.insert(f.clone(), v.clone());
                    tags(&one, f)
                }
            }
        };
        let source = match &self.source {
            None => None,
            Some(f) => match get(f)? {
                Value::Null => None,
                Value::String(s) => Some(s.clone()),
                other => return Err(format!("{f} must be a string, not {other}")),
            },
        };
        Ok(RefinedTexts {
            long_positive: text_of(&Some(lp.clone()))?,
            long_negative: text_of(&self.long_negative)?,
            tags_positive: tags_of(&self.tags_positive)?,
            tags_negative: tags_of(&self.tags_negative)?,
            source,
        })
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
    record_of(&value, None, id_field, &FieldMap::default())
}

/// (id, refined texts) of one record value; `id` given (an object keyed by id) or read from
/// `id_field`.
fn record_of(
    value: &Value,
    id: Option<&str>,
    id_field: &str,
    fields: &FieldMap,
) -> std::result::Result<(String, RefinedTexts), String> {
    let Value::Object(obj) = value else {
        return Err("the record is not a JSON object".into());
    };
    let id = match id {
        Some(id) if !id.is_empty() => id.to_string(),
        _ => obj.get(id_field).and_then(id_string).ok_or_else(|| {
            format!("no usable {id_field:?} field (a non-empty string or a number)")
        })?,
    };
    let refined = fields
        .refined(obj)
        .map_err(|e| format!("record {id}: {e}"))?;
    Ok((id, refined))
}

/// The common case without copies: our own field names (flat, or nested under `hq_clip`), tags
/// as lists of clean strings. Moves the texts out of `value` and returns (id, texts); returns
/// `None`, leaving `value` untouched, for anything else (the lenient path handles it).
fn owned_record(value: &mut Value, id_field: &str) -> Option<(String, RefinedTexts)> {
    let obj = value.as_object_mut()?;
    let id = obj.get(id_field).and_then(id_string)?;
    let inner: &mut Map<String, Value> = if obj.contains_key("long_positive") {
        obj
    } else {
        match obj.get_mut(REFINED_JSON_KEY) {
            Some(Value::Object(o)) if o.contains_key("long_positive") => o,
            _ => return None,
        }
    };
    let is_text = |v: Option<&Value>| matches!(v, Some(Value::String(_)));
    let is_tags = |v: Option<&Value>| {
        matches!(v, Some(Value::Array(a)) if a.iter().all(
            |t| matches!(t, Value::String(s) if !s.is_empty() && s.trim().len() == s.len())
        ))
    };
    let ok = is_text(inner.get("long_positive"))
        && is_text(inner.get("long_negative"))
        && is_tags(inner.get("tags_positive"))
        && is_tags(inner.get("tags_negative"))
        && matches!(
            inner.get("source"),
            None | Some(Value::Null) | Some(Value::String(_))
        );
    if !ok {
        return None;
    }
    let mut text = |k: &str| match inner.remove(k) {
        Some(Value::String(s)) => Some(s),
        _ => None,
    };
    let (long_positive, long_negative, source) = (
        text("long_positive")?,
        text("long_negative")?,
        text("source"),
    );
    let mut tags = |k: &str| match inner.remove(k) {
        Some(Value::Array(a)) => a
            .into_iter()
            .filter_map(|t| match t {
                Value::String(s) => Some(s),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    let (tags_positive, tags_negative) = (tags("tags_positive"), tags("tags_negative"));
    Some((
        id,
        RefinedTexts {
            long_positive,
            long_negative,
            tags_positive,
            tags_negative,
            source,
        },
    ))
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
        reader: R,
        source: &str,
        id_field: &str,
    ) -> std::io::Result<Self> {
        Self::from_jsonl(reader, source, id_field, &FieldMap::default())
    }

    /// Load a `.jsonl` file (one record a line) or a `.json` file (a list of records, or one object
    /// mapping id -> record), with a field mapping. Only I/O failures and a `.json` file that is not
    /// JSON at all are errors; bad records are kept in [`Sidecar::errors`].
    pub fn load_file(path: impl AsRef<Path>, id_field: &str, fields: &FieldMap) -> Result<Self> {
        let path = path.as_ref();
        let source = path.display().to_string();
        let is_json = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json"));
        let file = File::open(path).map_err(|e| DataError::io(path, e))?;
        if !is_json {
            return Self::from_jsonl(BufReader::new(file), &source, id_field, fields)
                .map_err(|e| DataError::io(path, e));
        }
        let value: Value =
            serde_json::from_reader(BufReader::new(file)).map_err(|e| DataError::Json {
                path: path.to_path_buf(),
                source: e,
            })?;
        Self::from_json_value(value, &source, id_field, fields)
            .map_err(|why| DataError::Invalid(format!("{source}: {why}")))
    }

    /// Records from one JSON document: a list of records, or an object keyed by id.
    pub fn from_json_value(
        value: Value,
        source: &str,
        id_field: &str,
        fields: &FieldMap,
    ) -> std::result::Result<Self, String> {
        let mut sc = Sidecar::empty(source);
        match value {
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    sc.lines += 1;
                    let r = record_of(item, None, id_field, fields);
                    let fallback = || item.get(id_field).and_then(id_string).unwrap_or_default();
                    sc.add(r, &format!("entry {i}"), i as u64, fallback);
                }
            }
            Value::Object(map) => {
                for (i, (id, item)) in map.iter().enumerate() {
                    sc.lines += 1;
                    let r = record_of(item, Some(id), id_field, fields);
                    sc.add(r, &format!("entry {id:?}"), i as u64, || id.clone());
                }
            }
            _ => {
                return Err(
                    "a .json annotation file must hold a list of records or an object keyed by \
                     id"
                    .into(),
                )
            }
        }
        Ok(sc)
    }

    /// No records; `source` names it.
    pub fn from_entries_of(source: &str) -> Self {
        Self::empty(source)
    }

    /// This index followed by `other`'s records: ids already here win, and each later duplicate is
    /// an error record.
    pub fn merged(mut self, other: Sidecar) -> Sidecar {
        self.errors.extend(other.errors);
        self.lines += other.lines;
        for (id, e) in other.entries {
            match self.entries.entry(id) {
                std::collections::hash_map::Entry::Occupied(o) => {
                    self.errors.push(SampleError {
                        shard: other.source.clone(),
                        key: o.key().clone(),
                        reason: format!(
                            "duplicate id (first in {}); keeping the first",
                            self.source
                        ),
                    });
                }
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(e);
                }
            }
        }
        self
    }

    fn empty(source: &str) -> Self {
        Sidecar {
            source: source.to_string(),
            entries: HashMap::new(),
            errors: Vec::new(),
            lines: 0,
        }
    }

    /// Keep a parsed record (first id wins) or note why it could not be used.
    fn add(
        &mut self,
        parsed: std::result::Result<(String, RefinedTexts), String>,
        where_: &str,
        ordinal: u64,
        id_for_error: impl FnOnce() -> String,
    ) {
        match parsed {
            Ok((id, refined)) => match self.entries.entry(id) {
                std::collections::hash_map::Entry::Occupied(o) => {
                    let id = o.key().clone();
                    self.error(&id, format!("{where_}: duplicate id; keeping the first"));
                }
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(Entry {
                        refined,
                        used: false,
                        first: ordinal,
                    });
                }
            },
            Err(why) => {
                let id = id_for_error();
                self.error(&id, format!("{where_}: {why}"));
            }
        }
    }

    /// JSONL records with a field mapping.
    pub fn from_jsonl<R: BufRead>(
        mut reader: R,
        source: &str,
        id_field: &str,
        fields: &FieldMap,
    ) -> std::io::Result<Self> {
        let mut sc = Sidecar::empty(source);
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
            let parsed = serde_json::from_str::<Value>(line)
                .map_err(|e| format!("invalid JSON: {e}"))
                .and_then(|mut v| {
                    let fast = if fields.is_auto() {
                        owned_record(&mut v, id_field)
                    } else {
                        None
                    };
                    match fast {
                        Some(r) => Ok(r),
                        None => record_of(&v, None, id_field, fields),
                    }
                });
            match parsed {
                Ok((id, refined)) => {
                    if let Some(first) = sc.entries.get(&id).map(|e| e.first) {
                        let reason = format!(
                            "line {lineno}: duplicate id (first on line {first}); keeping the first"
                        );
                        sc.error(&id, reason);
                    } else {
                        sc.entries.insert(
                            id,
                            Entry {
                                refined,
                                used: false,
                                first: lineno,
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

    /// The annotation of `id`, moved out (no copy): afterwards the index no longer holds it, so a
    /// second sample with the same id gets none, and [`Sidecar::unused_ids`] lists what is left.
    pub fn take_for(&mut self, id: &str) -> Option<RefinedTexts> {
        self.entries.remove(id).map(|e| e.refined)
    }

    /// Ids never asked for through [`Sidecar::take_for`], sorted.
    pub fn unused_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .entries
            .iter()
            .filter(|(_, e)| !e.used)
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort();
        ids
    }

    /// Every id, unsorted.
    pub fn ids(&self) -> impl Iterator<Item = &String> {
        self.entries.keys()
    }

    /// The file (or stream) the records came from.
    pub fn source(&self) -> &str {
        &self.source
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
    /// Samples with an annotation that kept their own refined texts instead (`overwrite` off);
    /// with `joined` and `unannotated` they account for every sample seen.
    pub kept_own: u64,
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
            "side-car join: {} samples, {} annotated ({} replaced own texts), {} kept their own texts, \
             {} without annotation, {} annotations unused, {} bad side-car records",
            self.samples,
            self.joined,
            self.overwritten,
            self.kept_own,
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
                        self.report.kept_own += 1;
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
        self.sidecar.unused_ids()
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
    use crate::sample::ImageBytes;

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

    /// Regression (hq-fuzz `tar_shard`): with `overwrite` off, a sample that had an annotation but
    /// kept its own texts was counted nowhere, so the report's joined + unannotated fell short of
    /// the samples seen.
    #[test]
    fn join_report_accounts_for_samples_that_keep_their_own_texts() {
        let sc = Sidecar::from_reader(LINES.as_bytes(), "side.jsonl", "uid").expect("read");
        let mut join = SidecarJoin::new(
            sc,
            JoinOptions {
                id_field: None,
                overwrite: false,
                ..JoinOptions::default()
            },
        );
        let own = RefinedTexts {
            long_positive: "own".into(),
            long_negative: "not own".into(),
            tags_positive: vec![],
            tags_negative: vec![],
            source: None,
        };
        let sample = |key: &str| {
            let img = ImageBytes {
                ext: "jpg".into(),
                bytes: vec![1],
            };
            Sample::new(key, img, "t")
        };
        let mut with_own = sample("a");
        with_own.refined = Some(own.clone());
        let mut plain = sample("b");
        let mut stranger = sample("zz");
        assert!(!join.attach(&mut with_own));
        assert_eq!(
            with_own.refined,
            Some(own),
            "own texts win without overwrite"
        );
        assert!(join.attach(&mut plain));
        assert!(!join.attach(&mut stranger));
        let r = join.report();
        assert_eq!(
            (r.samples, r.joined, r.kept_own, r.unannotated),
            (3, 1, 1, 1)
        );
        assert_eq!(r.joined + r.kept_own + r.unannotated, r.samples);
        assert!(r.to_string().contains("1 kept their own texts"), "{r}");
    }
}
