//! Side-car annotations joined onto shards while reading: the data as it ships (img2dataset shards
//! plus annotation files keyed by sample id, VLM-150M style), without writing a second copy of every
//! shard.
//!
//! # Layouts ([`AnnotationSpec`])
//! - **Per shard** (`path` is a folder): shard `…/00012.tar` takes its annotations from
//!   `<folder>/00012.jsonl` or `<folder>/00012.json` (matched by file stem). This is what
//!   `hq-recap-trt --format sidecar` writes, and the layout for large data: only the open shards'
//!   entries are in memory, never the whole data set's.
//! - **Global index** (`path` is a file, glob, brace range or @list of `.jsonl`/`.json` files): all
//!   entries are loaded once into one map shared by every reader. Convenient for data sets that fit
//!   in memory (about 1 KB an entry); for 100M+ entries split the index per shard.
//!
//! A file is JSONL (one record a line) or, with the `.json` extension, a list of records or one
//! object keyed by id. The id is the sample's metadata field `id_field` (`uid` by default; `url` or
//! any other; `key` is the sample's own key; a sample without the field is looked up by its key),
//! matched against the record field of the same name, or `record_id_field` when the record names it
//! differently (command line: `--annotation-id uid=id`). [`FieldMap`] says which record fields
//! hold the four texts, so a new layout is a mapping, not code.
//!
//! # Bad and partial input
//! - a sample without an annotation keeps its own texts (its raw alt-text, or refined texts already
//!   in the shard): counted as `missing`;
//! - an annotation no sample of its shard asked for: `orphan` (per-shard layout, counted when the
//!   shard has been read to its end);
//! - a record that cannot be used (malformed line, no id, a mapped field missing, a duplicate id,
//!   where the first record wins): `bad_records`, with the file, id and line in the error record;
//! - a shard without an annotation file: `missing_files` (its samples are `missing`);
//! - a wrong setting stops before any work ([`Annotations::check`]): no annotation file for any
//!   shard, or no usable record in the first files (a wrong `id_field` or mapping); for a global
//!   index, no usable record in all of it.

use super::sidecar::{id_string, FieldMap, Sidecar, DEFAULT_ID_FIELD};
use super::spec::expand_shard_spec;
use crate::error::{DataError, Result, SampleError};
use crate::sample::Sample;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where the annotations are and how to read them (`[data.annotations]` in hq-train's TOML).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AnnotationSpec {
    /// A folder (per-shard files) or a specification of index files (see the module docs).
    pub path: String,
    /// The sample's id: its metadata field of this name (`uid`, `url`, ...), or `key` for the
    /// sample key.
    pub id_field: String,
    /// The record field holding that id, when its name differs (default: `id_field`).
    pub record_id_field: Option<String>,
    /// Which record fields hold the texts (default: our own names).
    pub fields: FieldMap,
}

impl Default for AnnotationSpec {
    fn default() -> Self {
        AnnotationSpec {
            path: String::new(),
            id_field: DEFAULT_ID_FIELD.to_string(),
            record_id_field: None,
            fields: FieldMap::default(),
        }
    }
}

impl AnnotationSpec {
    pub fn new(path: impl Into<String>) -> Self {
        AnnotationSpec {
            path: path.into(),
            ..Default::default()
        }
    }

    /// The record field holding the id.
    pub fn record_id(&self) -> &str {
        self.record_id_field.as_deref().unwrap_or(&self.id_field)
    }

    /// Set the id fields from the command-line form `SAMPLE` or `SAMPLE=RECORD` (`uid=id`).
    pub fn set_id(&mut self, arg: &str) {
        match arg.split_once('=') {
            Some((sample, record)) => {
                self.id_field = sample.trim().to_string();
                self.record_id_field = Some(record.trim().to_string());
            }
            None => {
                self.id_field = arg.trim().to_string();
                self.record_id_field = None;
            }
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.path.trim().is_empty() {
            return Err(DataError::Invalid("the annotation path is empty".into()));
        }
        if self.id_field.trim().is_empty() || self.record_id().trim().is_empty() {
            return Err(DataError::Invalid(
                "the annotation id field is empty".into(),
            ));
        }
        self.fields.validate()
    }
}

/// Join counts (see the module docs for each).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnnotationCounts {
    pub joined: u64,
    pub missing: u64,
    pub orphan: u64,
    pub bad_records: u64,
    pub missing_files: u64,
}

impl AnnotationCounts {
    pub fn merge(&mut self, o: &AnnotationCounts) {
        self.joined += o.joined;
        self.missing += o.missing;
        self.orphan += o.orphan;
        self.bad_records += o.bad_records;
        self.missing_files += o.missing_files;
    }
}

impl std::fmt::Display for AnnotationCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let seen = self.joined + self.missing;
        let pct = if seen > 0 {
            100.0 * self.joined as f64 / seen as f64
        } else {
            0.0
        };
        write!(
            f,
            "annotations: {} joined ({pct:.1}% of samples), {} samples without one, {} orphan \
             annotations, {} bad records, {} shards without an annotation file",
            self.joined, self.missing, self.orphan, self.bad_records, self.missing_files
        )
    }
}

/// Opened annotations: a per-shard folder or a loaded global index.
#[derive(Debug, Clone)]
pub enum Annotations {
    PerShard {
        dir: PathBuf,
        spec: AnnotationSpec,
    },
    Global {
        index: Arc<SidecarHandle>,
        spec: AnnotationSpec,
    },
}

/// A loaded global index (a wrapper so [`Annotations`] can be `Debug`).
pub struct SidecarHandle(pub Sidecar);

impl std::fmt::Debug for SidecarHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sidecar({}, {} entries)", self.0.source(), self.0.len())
    }
}

impl Annotations {
    /// Open the annotations of `spec`: checks a folder exists, or loads every index file.
    pub fn open(spec: &AnnotationSpec) -> Result<Self> {
        spec.validate()?;
        let p = Path::new(&spec.path);
        if p.is_dir() {
            return Ok(Annotations::PerShard {
                dir: p.to_path_buf(),
                spec: spec.clone(),
            });
        }
        let files = expand_shard_spec(&spec.path)?;
        let mut all: Option<Sidecar> = None;
        for f in &files {
            let sc = Sidecar::load_file(f, spec.record_id(), &spec.fields)?;
            all = Some(match all {
                None => sc,
                Some(acc) => acc.merged(sc),
            });
        }
        let index = all.ok_or_else(|| DataError::ShardSpec {
            spec: spec.path.clone(),
            reason: "names no annotation file".into(),
        })?;
        // One unusable file among many is bad data (counted); an index with no usable record at
        // all is a wrong setting.
        check_usable(&index, spec)?;
        Ok(Annotations::Global {
            index: Arc::new(SidecarHandle(index)),
            spec: spec.clone(),
        })
    }

    pub fn spec(&self) -> &AnnotationSpec {
        match self {
            Annotations::PerShard { spec, .. } | Annotations::Global { spec, .. } => spec,
        }
    }

    /// The per-shard file of `shard` (`<dir>/<stem>.jsonl`, else `.json`), if it exists.
    pub fn file_for(&self, shard: &Path) -> Option<PathBuf> {
        let Annotations::PerShard { dir, .. } = self else {
            return None;
        };
        let stem = shard_stem(shard);
        ["jsonl", "json"]
            .iter()
            .map(|ext| dir.join(format!("{stem}.{ext}")))
            .find(|p| p.is_file())
    }

    /// The annotations of one shard. Never fails: an unreadable or missing file is recorded in
    /// the result (its samples keep their own texts).
    pub fn for_shard(&self, shard: &Path) -> ShardAnnotations {
        match self {
            Annotations::Global { index, spec } => ShardAnnotations {
                table: Table::Shared(Arc::clone(index)),
                id_field: spec.id_field.clone(),
                file: None,
                errors: Vec::new(),
                missing_file: false,
            },
            Annotations::PerShard { dir, spec } => {
                let empty = |errors: Vec<SampleError>| ShardAnnotations {
                    table: Table::Owned(Box::new(Sidecar::from_entries_of(""))),
                    id_field: spec.id_field.clone(),
                    file: None,
                    errors,
                    missing_file: true,
                };
                let Some(file) = self.file_for(shard) else {
                    let stem = shard_stem(shard);
                    return empty(vec![SampleError {
                        shard: shard.display().to_string(),
                        key: String::new(),
                        reason: format!(
                            "no annotation file {}/{stem}.jsonl or .json; its samples keep their \
                             own texts",
                            dir.display()
                        ),
                    }]);
                };
                match Sidecar::load_file(&file, spec.record_id(), &spec.fields) {
                    Ok(sc) => ShardAnnotations {
                        errors: sc.errors().to_vec(),
                        table: Table::Owned(Box::new(sc)),
                        id_field: spec.id_field.clone(),
                        file: Some(file),
                        missing_file: false,
                    },
                    Err(e) => empty(vec![SampleError {
                        shard: file.display().to_string(),
                        key: String::new(),
                        reason: format!("unreadable annotation file: {e}"),
                    }]),
                }
            }
        }
    }

    /// Stop early on a wrong setting: no shard of `shards` has an annotation file, or none of the
    /// first 8 files found has a usable record while one has unusable ones (wrong id field or
    /// field mapping).
    pub fn check(&self, shards: &[PathBuf]) -> Result<()> {
        let Annotations::PerShard { dir, spec } = self else {
            return Ok(());
        };
        // The first few files decide: one of them usable means the setting is right (a shard
        // whose every record failed is bad data, counted while reading).
        let mut first_unusable = None;
        for file in shards
            .iter()
            .filter_map(|s| self.file_for(s))
            .take(CHECK_FILES)
        {
            let sc = Sidecar::load_file(&file, spec.record_id(), &spec.fields)?;
            match check_usable(&sc, spec) {
                Ok(()) if !sc.is_empty() => return Ok(()),
                Ok(()) => {}
                Err(e) => {
                    first_unusable.get_or_insert(e);
                }
            }
        }
        match first_unusable {
            Some(e) => Err(e),
            None if shards.iter().any(|s| self.file_for(s).is_some()) => Ok(()),
            None => {
                let example = shards.first().map(|s| shard_stem(s)).unwrap_or_default();
                Err(DataError::Invalid(format!(
                    "{}: no annotation file for any of the {} shard(s) (expected e.g. \
                     {example}.jsonl or {example}.json there)",
                    dir.display(),
                    shards.len()
                )))
            }
        }
    }
}

/// Files [`Annotations::check`] reads at most.
const CHECK_FILES: usize = 8;

/// A file with records but no usable one means a wrong setting, not bad data.
fn check_usable(sc: &Sidecar, spec: &AnnotationSpec) -> Result<()> {
    if sc.is_empty() && !sc.errors().is_empty() {
        return Err(DataError::Invalid(format!(
            "{}: none of its {} record(s) is usable with id field {:?} and field mapping {} \
             (check --annotation-id and --annotation-fields, or the file: a recaption job whose \
             every answer failed writes only error records); first problem: {}",
            sc.source(),
            sc.errors().len(),
            spec.record_id(),
            describe(&spec.fields),
            sc.errors()[0].reason
        )));
    }
    Ok(())
}

fn describe(m: &FieldMap) -> String {
    if m.is_auto() {
        return "(our own field names)".into();
    }
    let parts: Vec<String> = [
        ("long_positive", &m.long_positive),
        ("long_negative", &m.long_negative),
        ("tags_positive", &m.tags_positive),
        ("tags_negative", &m.tags_negative),
        ("source", &m.source),
    ]
    .iter()
    .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={v}")))
    .collect();
    parts.join(",")
}

enum Table {
    Owned(Box<Sidecar>),
    Shared(Arc<SidecarHandle>),
}

/// One shard's annotations while the shard is read.
pub struct ShardAnnotations {
    table: Table,
    id_field: String,
    /// The per-shard file used, if any.
    pub file: Option<PathBuf>,
    /// Records that could not be used, and a missing or unreadable file.
    pub errors: Vec<SampleError>,
    pub missing_file: bool,
}

/// The id a sample is matched by: `key` is its key; another field its metadata value, else its key.
pub fn sample_id(sample: &Sample, id_field: &str) -> String {
    if id_field == "key" {
        return sample.key.clone();
    }
    sample
        .meta
        .get(id_field)
        .and_then(id_string)
        .unwrap_or_else(|| sample.key.clone())
}

impl ShardAnnotations {
    /// Give the sample its annotation (replacing refined texts it carries); true when it had one.
    pub fn attach(&mut self, sample: &mut Sample) -> bool {
        let id = sample_id(sample, &self.id_field);
        let found = match &mut self.table {
            Table::Owned(sc) => sc.take_for(&id),
            Table::Shared(h) => h.0.get(&id).cloned(),
        };
        match found {
            Some(r) => {
                sample.refined = Some(r);
                true
            }
            None => false,
        }
    }

    /// Annotations of this shard's file no sample asked for (per-shard layout; empty for the
    /// global index, whose orphans are only known after every shard).
    pub fn orphans(&self) -> Vec<String> {
        match &self.table {
            Table::Owned(sc) => sc.unused_ids(),
            Table::Shared(_) => Vec::new(),
        }
    }

    /// Bad records of the file (a missing file is counted apart).
    pub fn bad_records(&self) -> u64 {
        if self.missing_file {
            0
        } else {
            self.errors.len() as u64
        }
    }
}

/// A shard's name without `.tar`, `.tar.gz` or `.tgz`: `00012` for `…/00012.tar`.
pub fn shard_stem(shard: &Path) -> String {
    let name = shard
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    for suffix in [".tar.gz", ".tgz", ".tar"] {
        if let Some(stem) = name.strip_suffix(suffix) {
            return stem.to_string();
        }
    }
    name
}

/// Most example ids and errors a [`JoinRunReport`] lists.
pub const MAX_EXAMPLES: usize = 20;

/// What a pass over shards with annotations found ([`coverage`], [`join_shards`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRunReport {
    pub shards: usize,
    /// Shards already joined by an earlier run (`join` only; not read again).
    pub shards_already_done: usize,
    /// Good samples read.
    pub samples: u64,
    /// Bad samples in the shards (damaged tar members, missing image or text), not written.
    pub bad_samples: u64,
    pub counts: AnnotationCounts,
    pub missing_examples: Vec<String>,
    pub orphan_examples: Vec<String>,
    /// The first bad samples and bad annotation records.
    pub errors: Vec<SampleError>,
    /// Output shards (`join` only).
    pub written: Vec<PathBuf>,
}

impl std::fmt::Display for JoinRunReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} shard(s) ({} already joined), {} samples, {} bad samples",
            self.shards, self.shards_already_done, self.samples, self.bad_samples
        )?;
        writeln!(f, "{}", self.counts)?;
        if !self.missing_examples.is_empty() {
            writeln!(
                f,
                "  without annotation, e.g.: {}",
                self.missing_examples.join(", ")
            )?;
        }
        if !self.orphan_examples.is_empty() {
            writeln!(
                f,
                "  orphan annotations, e.g.: {}",
                self.orphan_examples.join(", ")
            )?;
        }
        for e in &self.errors {
            writeln!(f, "  {e}")?;
        }
        Ok(())
    }
}

struct OneShard {
    report: JoinRunReport,
    /// Ids used from a global index (its orphans are found after every shard).
    used: Vec<String>,
}

fn push_capped<T>(v: &mut Vec<T>, items: impl IntoIterator<Item = T>) {
    for it in items {
        if v.len() >= MAX_EXAMPLES {
            return;
        }
        v.push(it);
    }
}

fn one_shard(shard: &Path, ann: &Annotations, out: Option<&Path>) -> Result<OneShard> {
    use super::reader::{open_shard, ImageCheck, ReadOptions};
    let mut r = JoinRunReport {
        shards: 1,
        ..Default::default()
    };
    let mut used = Vec::new();
    if let Some(o) = out {
        if o.exists() {
            r.shards_already_done = 1;
            r.written.push(o.to_path_buf());
            return Ok(OneShard { report: r, used });
        }
    }
    // The loader does not check images either: the join keeps every sample training would see.
    let opts = ReadOptions {
        image_check: ImageCheck::None,
        ..ReadOptions::default()
    };
    let mut sa = ann.for_shard(shard);
    r.counts.missing_files = u64::from(sa.missing_file);
    r.counts.bad_records = sa.bad_records();
    push_capped(&mut r.errors, sa.errors.iter().cloned());
    let mut writer = match out {
        Some(o) => Some(super::writer::ShardWriter::single(o)?),
        None => None,
    };
    let global = matches!(ann, Annotations::Global { .. });
    match open_shard(shard, &opts) {
        Err(reason) => {
            r.bad_samples += 1;
            push_capped(
                &mut r.errors,
                [SampleError {
                    shard: shard.display().to_string(),
                    key: String::new(),
                    reason,
                }],
            );
        }
        Ok(stream) => {
            for item in stream {
                match item {
                    Err(e) => {
                        r.bad_samples += 1;
                        push_capped(&mut r.errors, [e]);
                    }
                    Ok(mut s) => {
                        r.samples += 1;
                        if sa.attach(&mut s) {
                            r.counts.joined += 1;
                            if global {
                                used.push(sample_id(&s, &ann.spec().id_field));
                            }
                        } else {
                            r.counts.missing += 1;
                            push_capped(&mut r.missing_examples, [s.key.clone()]);
                        }
                        if let Some(w) = writer.as_mut() {
                            w.write(&s)?;
                        }
                    }
                }
            }
        }
    }
    let orphans = sa.orphans();
    r.counts.orphan = orphans.len() as u64;
    push_capped(&mut r.orphan_examples, orphans);
    if let Some(w) = writer {
        r.written.extend(w.finish()?);
    }
    Ok(OneShard { report: r, used })
}

fn merge_reports(parts: Vec<OneShard>, ann: &Annotations) -> JoinRunReport {
    let mut total = JoinRunReport::default();
    let mut used: Vec<String> = Vec::new();
    for p in parts {
        let r = p.report;
        total.shards += r.shards;
        total.shards_already_done += r.shards_already_done;
        total.samples += r.samples;
        total.bad_samples += r.bad_samples;
        total.counts.merge(&r.counts);
        push_capped(&mut total.missing_examples, r.missing_examples);
        push_capped(&mut total.orphan_examples, r.orphan_examples);
        push_capped(&mut total.errors, r.errors);
        total.written.extend(r.written);
        used.extend(p.used);
    }
    if let Annotations::Global { index, .. } = ann {
        let used: std::collections::HashSet<String> = used.into_iter().collect();
        let mut orphans: Vec<&String> = index.0.ids().filter(|id| !used.contains(*id)).collect();
        total.counts.orphan = orphans.len() as u64;
        total.counts.bad_records = index.0.errors().len() as u64;
        orphans.sort();
        push_capped(&mut total.orphan_examples, orphans.into_iter().cloned());
        push_capped(&mut total.errors, index.0.errors().iter().cloned());
    }
    total
}

fn run_shards(
    shards: &[PathBuf],
    threads: usize,
    progress: bool,
    what: &str,
    f: impl Fn(&Path) -> Result<OneShard> + Sync,
) -> Result<Vec<OneShard>> {
    use rayon::prelude::*;
    let pb = crate::progress::bar(Some(shards.len() as u64), "shards");
    if !progress {
        pb.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    pb.set_message(what.to_string());
    let mut b = rayon::ThreadPoolBuilder::new();
    if threads > 0 {
        b = b.num_threads(threads);
    }
    let pool = b
        .build()
        .map_err(|e| DataError::Invalid(format!("cannot start the worker pool: {e}")))?;
    let out = pool.install(|| {
        shards
            .par_iter()
            .map(|s| {
                let r = f(s);
                pb.inc(1);
                r
            })
            .collect::<Result<Vec<OneShard>>>()
    });
    pb.finish_and_clear();
    out
}

/// How well the annotations cover `shards` (nothing written): one pass, images not decoded,
/// `threads` shards at once (0: one per core).
pub fn coverage(
    shards: &[PathBuf],
    ann: &Annotations,
    threads: usize,
    progress: bool,
) -> Result<JoinRunReport> {
    let parts = run_shards(shards, threads, progress, "coverage", |s| {
        one_shard(s, ann, None)
    })?;
    Ok(merge_reports(parts, ann))
}

/// Write every shard with its annotations joined, as `out_dir/<shard file name>` (a `.gz` suffix
/// dropped: the output is plain tar). Each output is atomic, so a killed run leaves complete shards
/// only, and a second run skips the shards already there (resume). Input shards must have distinct
/// file names.
pub fn join_shards(
    shards: &[PathBuf],
    ann: &Annotations,
    out_dir: &Path,
    threads: usize,
    progress: bool,
) -> Result<JoinRunReport> {
    let mut names = std::collections::HashMap::new();
    for s in shards {
        let name = format!("{}.tar", shard_stem(s));
        if let Some(prev) = names.insert(name.clone(), s) {
            return Err(DataError::Invalid(format!(
                "{} and {} would both be written as {name}; join them into different folders",
                prev.display(),
                s.display()
            )));
        }
    }
    std::fs::create_dir_all(out_dir).map_err(|e| DataError::io(out_dir, e))?;
    let parts = run_shards(shards, threads, progress, "join", |s| {
        let out = out_dir.join(format!("{}.tar", shard_stem(s)));
        one_shard(s, ann, Some(&out))
    })?;
    Ok(merge_reports(parts, ann))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_maps_parse_and_apply() {
        let m = FieldMap::parse("long_positive=caption, tags_positive=meta.tags").expect("map");
        assert_eq!(m.long_positive.as_deref(), Some("caption"));
        let rec = serde_json::json!({"caption": "A red cube.", "meta": {"tags": "cube, red"}});
        let r = m.refined(rec.as_object().expect("obj")).expect("texts");
        assert_eq!(r.long_positive, "A red cube.");
        assert_eq!(r.tags_positive, ["cube", "red"]);
        assert!(r.long_negative.is_empty() && r.tags_negative.is_empty());
        let missing = serde_json::json!({"text": "x"});
        let err = m
            .refined(missing.as_object().expect("obj"))
            .expect_err("no caption");
        assert!(err.contains("\"caption\""), "{err}");
        assert!(FieldMap::parse("tags_positive=t").is_err());
        assert!(FieldMap::parse("caption").is_err());
        assert!(FieldMap::parse("long_pos=caption").is_err());
    }
}
