//! DataComp / CLIP_benchmark webdataset evaluation sets (`wds_<task>_test/`), read the way
//! CLIP_benchmark's `build_wds_dataset` reads them:
//!
//! - `<split>/nshards.txt` (required) and shards `<split>/0.tar ... <split>/{n-1}.tar`;
//! - `dataset_type.txt` (optional): `retrieval`, `multilabel`, anything else or absent is
//!   classification;
//! - `classnames.txt`, `zeroshot_classification_templates.txt`: one per line, each `strip()`ped;
//! - a sample is the members sharing a key (webdataset's `group_by_keys`, extensions lower-cased);
//!   the image is the first of `webp`, `png`, `jpg`, `jpeg` present; the label is `cls` (an
//!   integer), `npy` (multi-label targets; WILDS / fairness metadata) or `txt` (captions, Python
//!   `str.splitlines`).
//!
//! Tar members are streamed with the `tar` crate; keys are split with `hq-data`'s webdataset rule
//! ([`hq_data::shards::split_key`]). A damaged shard ends with one error record and reading goes on
//! with the next shard.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use hq_data::shards::split_key;
use hq_data::SampleError;
use serde::{Deserialize, Serialize};

use crate::error::EvalError;

/// What `dataset_type.txt` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DatasetType {
    Classification,
    MultiLabel,
    Retrieval,
}

/// Image extensions in the order CLIP_benchmark's `to_tuple` tries them.
pub const WDS_IMAGE_EXTENSIONS: [&str; 4] = ["webp", "png", "jpg", "jpeg"];

/// An opened webdataset evaluation set (metadata read, shards listed).
#[derive(Debug, Clone)]
pub struct WdsDataset {
    pub dir: PathBuf,
    pub split: String,
    pub dataset_type: DatasetType,
    /// Empty for retrieval sets or when `classnames.txt` is absent.
    pub classnames: Vec<String>,
    /// Empty for retrieval sets or when the templates file is absent.
    pub templates: Vec<String>,
    pub shards: Vec<PathBuf>,
}

/// One sample: its key, its shard, and its members by lower-cased extension.
#[derive(Debug, Clone)]
pub struct WdsSample {
    pub key: String,
    pub shard: String,
    pub members: BTreeMap<String, Vec<u8>>,
}

impl WdsSample {
    /// The image member CLIP_benchmark would take: `(extension, bytes)`.
    pub fn image(&self) -> Option<(&str, &[u8])> {
        WDS_IMAGE_EXTENSIONS
            .iter()
            .find_map(|e| self.members.get(*e).map(|b| (*e, b.as_slice())))
    }

    pub fn error(&self, reason: impl Into<String>) -> SampleError {
        SampleError {
            shard: self.shard.clone(),
            key: self.key.clone(),
            reason: reason.into(),
        }
    }

    fn member(&self, ext: &str) -> Result<&[u8], SampleError> {
        self.members.get(ext).map(Vec::as_slice).ok_or_else(|| {
            let found: Vec<String> = self.members.keys().map(|k| format!(".{k}")).collect();
            self.error(format!(
                "missing .{ext} member; members found: {}",
                if found.is_empty() {
                    "none".into()
                } else {
                    found.join(", ")
                }
            ))
        })
    }

    /// The `cls` member as webdataset decodes it (`int(bytes)`: surrounding whitespace allowed).
    pub fn class(&self) -> Result<i64, SampleError> {
        let bytes = self.member("cls")?;
        let text = std::str::from_utf8(bytes)
            .map_err(|_| self.error(".cls is not text"))?
            .trim();
        text.replace('_', "")
            .parse::<i64>()
            .map_err(|_| self.error(format!(".cls is not an integer: {text:?}")))
    }

    /// The `npy` member's values (flattened).
    pub fn npy(&self) -> Result<Vec<f64>, SampleError> {
        let bytes = self.member("npy")?;
        crate::npy::read_npy(bytes)
            .map(|(v, _)| v)
            .map_err(|e| self.error(format!(".npy: {e}")))
    }

    /// The `txt` member split into captions with Python's `str.splitlines`.
    pub fn captions(&self) -> Result<Vec<String>, SampleError> {
        let bytes = self.member("txt")?;
        let text = std::str::from_utf8(bytes).map_err(|e| {
            self.error(format!(
                ".txt is not valid UTF-8 (invalid byte at offset {})",
                e.valid_up_to()
            ))
        })?;
        Ok(python_splitlines(text))
    }
}

/// Python's `str.splitlines()` (no `keepends`): splits at `\n`, `\r`, `\r\n`, `\v`, `\f`,
/// `\x1c`-`\x1e`, `\x85`, U+2028 and U+2029; no empty last piece for a trailing break.
pub fn python_splitlines(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {
                if chars.peek() == Some(&'\n') {
                    chars.next();
                }
                out.push(std::mem::take(&mut current));
            }
            '\n' | '\u{0b}' | '\u{0c}' | '\u{1c}' | '\u{1d}' | '\u{1e}' | '\u{85}' | '\u{2028}'
            | '\u{2029}' => out.push(std::mem::take(&mut current)),
            other => current.push(other),
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// Python's `str.format(c=name)` for a zero-shot template: `{c}` is the class name, `{{` and
/// `}}` are braces; any other field is an error (Python raises `KeyError`).
pub fn fill_template(template: &str, classname: &str) -> Result<String, String> {
    let mut out = String::with_capacity(template.len() + classname.len());
    let mut chars = template.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                out.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                out.push('}');
            }
            '{' => {
                let mut field = String::new();
                let mut closed = false;
                for f in chars.by_ref() {
                    if f == '}' {
                        closed = true;
                        break;
                    }
                    field.push(f);
                }
                if !closed {
                    return Err(format!("template {template:?} has an unclosed '{{'"));
                }
                if field != "c" {
                    return Err(format!(
                        "template {template:?} has the field {{{field}}}; only {{c}} (the class name) is filled"
                    ));
                }
                out.push_str(classname);
            }
            '}' => return Err(format!("template {template:?} has a single '}}'")),
            other => out.push(other),
        }
    }
    Ok(out)
}

fn read_text(path: &Path) -> Result<Option<String>, EvalError> {
    match std::fs::read(path) {
        Ok(bytes) => String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| EvalError::dataset(path, "is not valid UTF-8")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(EvalError::io(path, e)),
    }
}

fn stripped_lines(text: &str) -> Vec<String> {
    python_splitlines(text)
        .iter()
        .map(|l| l.trim().to_string())
        .collect()
}

/// Most shards `nshards.txt` may name (DataComp's eval sets have at most a few hundred).
pub const MAX_SHARDS: usize = 100_000;

impl WdsDataset {
    /// Read the metadata of the set in `dir` for `split` (DataComp uses `test`).
    pub fn open(dir: &Path, split: &str) -> Result<Self, EvalError> {
        if !dir.is_dir() {
            return Err(EvalError::dataset(dir, "no such directory"));
        }
        let nshards_path = dir.join(split).join("nshards.txt");
        let nshards_text = read_text(&nshards_path)?.ok_or_else(|| {
            EvalError::dataset(
                &nshards_path,
                "missing (CLIP_benchmark requires <split>/nshards.txt)",
            )
        })?;
        let nshards: usize = nshards_text.trim().parse().map_err(|_| {
            EvalError::dataset(
                &nshards_path,
                format!("not a shard count: {:?}", nshards_text.trim()),
            )
        })?;
        if nshards == 0 {
            return Err(EvalError::dataset(&nshards_path, "says 0 shards"));
        }
        // The count becomes a list of shard paths: an absurd one must not exhaust memory.
        if nshards > MAX_SHARDS {
            return Err(EvalError::dataset(
                &nshards_path,
                format!("says {nshards} shards, more than the {MAX_SHARDS} an eval set may have"),
            ));
        }
        let dataset_type = match read_text(&dir.join("dataset_type.txt"))? {
            Some(t) => match t.trim().to_lowercase().as_str() {
                "retrieval" => DatasetType::Retrieval,
                "multilabel" => DatasetType::MultiLabel,
                _ => DatasetType::Classification,
            },
            None => DatasetType::Classification,
        };
        let (classnames, templates) = if dataset_type == DatasetType::Retrieval {
            (Vec::new(), Vec::new())
        } else {
            (
                read_text(&dir.join("classnames.txt"))?
                    .map(|t| stripped_lines(&t))
                    .unwrap_or_default(),
                read_text(&dir.join("zeroshot_classification_templates.txt"))?
                    .map(|t| stripped_lines(&t))
                    .unwrap_or_default(),
            )
        };
        let shards = (0..nshards)
            .map(|i| dir.join(split).join(format!("{i}.tar")))
            .collect();
        Ok(WdsDataset {
            dir: dir.to_path_buf(),
            split: split.to_string(),
            dataset_type,
            classnames,
            templates,
            shards,
        })
    }

    /// Classification sets need class names and templates; say which file is missing.
    pub fn require_classification_metadata(&self) -> Result<(), EvalError> {
        if self.classnames.is_empty() {
            return Err(EvalError::dataset(
                self.dir.join("classnames.txt"),
                "missing or empty: a zero-shot classification set needs its class names",
            ));
        }
        if self.templates.is_empty() {
            return Err(EvalError::dataset(
                self.dir.join("zeroshot_classification_templates.txt"),
                "missing or empty: a zero-shot classification set needs its templates",
            ));
        }
        for t in &self.templates {
            fill_template(t, "x").map_err(|e| {
                EvalError::dataset(self.dir.join("zeroshot_classification_templates.txt"), e)
            })?;
        }
        Ok(())
    }

    /// Total size in bytes of the shards present (part of the data fingerprint in results).
    pub fn shard_bytes(&self) -> u64 {
        self.shards
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum()
    }

    /// Stream every sample of every shard, in order, to `sink` (stops early when `sink` returns
    /// `false`). Problems become error records: a shard that cannot be opened, a damaged tar
    /// stream (the rest of that shard is lost), an oversized member.
    pub fn for_each_sample(&self, sink: &mut dyn FnMut(Result<WdsSample, SampleError>) -> bool) {
        for shard in &self.shards {
            if !read_shard(shard, sink) {
                return;
            }
        }
    }
}

/// Members above this size are refused (an evaluation image is far smaller).
const MAX_MEMBER_BYTES: u64 = 256 << 20;

fn is_meta_name(name: &str) -> bool {
    let first = name.split('/').next().unwrap_or(name);
    first.len() >= 4 && first.starts_with("__") && first.ends_with("__")
}

/// Read one shard; `false` when the sink asked to stop.
fn read_shard(path: &Path, sink: &mut dyn FnMut(Result<WdsSample, SampleError>) -> bool) -> bool {
    let shard = path.display().to_string();
    let fail = |reason: String| SampleError {
        shard: shard.clone(),
        key: String::new(),
        reason,
    };
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) => return sink(Err(fail(format!("cannot open shard: {e}")))),
    };
    let mut buffered = BufReader::with_capacity(256 << 10, file);
    let gz = match buffered.fill_buf() {
        Ok(head) => head.len() >= 2 && head[0] == 0x1f && head[1] == 0x8b,
        Err(e) => return sink(Err(fail(format!("cannot read shard: {e}")))),
    };
    let reader: Box<dyn Read> = if gz {
        Box::new(flate2::bufread::MultiGzDecoder::new(buffered))
    } else {
        Box::new(buffered)
    };
    let mut archive = tar::Archive::new(reader);
    let entries = match archive.entries() {
        Ok(e) => e,
        Err(e) => return sink(Err(fail(format!("not a tar archive: {e}")))),
    };
    let mut pending: Option<WdsSample> = None;
    for entry in entries {
        let mut entry = match entry {
            Ok(e) => e,
            Err(e) => {
                let key = pending.take().map(|p| p.key).unwrap_or_default();
                return sink(Err(SampleError {
                    shard: shard.clone(),
                    key,
                    reason: format!("shard is damaged, the rest of it is lost: {e}"),
                }));
            }
        };
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = match entry.path() {
            Ok(p) => p.to_string_lossy().into_owned(),
            Err(e) => {
                if !sink(Err(fail(format!("member with an unreadable name: {e}")))) {
                    return false;
                }
                continue;
            }
        };
        if is_meta_name(&name) {
            continue;
        }
        let Some((key, ext)) = split_key(&name) else {
            continue;
        };
        let (key, ext) = (key.to_string(), ext.to_lowercase());
        if pending.as_ref().is_some_and(|p| p.key != key) {
            if let Some(done) = pending.take() {
                if !sink(Ok(done)) {
                    return false;
                }
            }
        }
        let size = entry.header().size().unwrap_or(0);
        if size > MAX_MEMBER_BYTES {
            if !sink(Err(SampleError {
                shard: shard.clone(),
                key: key.clone(),
                reason: format!(
                    "member {name} is {size} bytes, over the limit of {MAX_MEMBER_BYTES}"
                ),
            })) {
                return false;
            }
            continue;
        }
        let mut data = Vec::with_capacity(size as usize);
        if let Err(e) = entry.read_to_end(&mut data) {
            return sink(Err(SampleError {
                shard: shard.clone(),
                key,
                reason: format!(
                    "shard is damaged inside member {name}, the rest of it is lost: {e}"
                ),
            }));
        }
        let sample = pending.get_or_insert_with(|| WdsSample {
            key: key.clone(),
            shard: shard.clone(),
            members: BTreeMap::new(),
        });
        // webdataset keeps the last of duplicate members silently; so do we.
        sample.members.insert(ext, data);
    }
    match pending {
        Some(done) => sink(Ok(done)),
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitlines_like_python() {
        assert_eq!(
            python_splitlines("a\nb\r\nc\rd\n"),
            vec!["a", "b", "c", "d"]
        );
        assert_eq!(python_splitlines("a\n\nb"), vec!["a", "", "b"]);
        assert_eq!(python_splitlines(""), Vec::<String>::new());
        assert_eq!(python_splitlines("x\u{2028}y"), vec!["x", "y"]);
    }

    #[test]
    fn templates_like_str_format() {
        assert_eq!(
            fill_template("a photo of a {c}.", "dog").as_deref(),
            Ok("a photo of a dog.")
        );
        assert_eq!(fill_template("{{c}} {c}", "x").as_deref(), Ok("{c} x"));
        assert!(fill_template("{d}", "x").is_err());
        assert!(fill_template("{c", "x").is_err());
    }

    /// Regression (hq-fuzz `eval_wds_dir`, campaign oom-228b23f9): `nshards.txt` saying
    /// 2400000000000000000 made `open` build that many shard paths, until the process ran out of
    /// memory.
    #[test]
    fn absurd_shard_count_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("test")).expect("mkdir");
        std::fs::write(dir.path().join("test/nshards.txt"), "\n2400000000000000000").expect("w");
        let e = WdsDataset::open(dir.path(), "test")
            .expect_err("absurd")
            .to_string();
        assert!(e.contains("nshards.txt") && e.contains("more than"), "{e}");
        std::fs::write(dir.path().join("test/nshards.txt"), "3\n").expect("w");
        assert_eq!(
            WdsDataset::open(dir.path(), "test")
                .expect("3")
                .shards
                .len(),
            3
        );
    }
}
