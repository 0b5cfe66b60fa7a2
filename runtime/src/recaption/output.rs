//! The job's output: one record per input sample, a crash-safe per-shard log, and the finished
//! shard written atomically.
//!
//! While a shard is in progress its records are appended to `<out>/<name>.partial.jsonl` and
//! flushed to disk after every batch, so `kill -9` loses at most the batch in flight. A rerun
//! reads the log (dropping a torn last line), skips the samples it holds, and appends the rest.
//! When every sample of the shard has a record, the output is written under a temporary name and
//! renamed into place ([`hq_data::atomic`]); only then is the log removed. A finished output file is
//! what marks a shard as done.
//!
//! Output formats:
//! - `tar`: `<out>/<name>.tar`, the input samples with every member kept and `hq_clip` (the four
//!   texts, `source` = `model:<name>`, replacing any the input had, and `hq_clip_attempts`) or
//!   `hq_clip_error` (`reason`, `raw_answer`, `attempts`; the input's own `hq_clip`, if any, is
//!   left as it was unless the job drops input texts) added to
//!   their JSON; input items that are not samples at all (a damaged tar stream) are listed
//!   in `<out>/<name>.errors.jsonl`.
//! - `sidecar`: `<out>/<name>.jsonl`, one record a line keyed by sample id (`uid` by default), in
//!   the nested shape `hq_data::shards::Sidecar` loads: `{"uid": ..., "key": ..., "hq_clip": {...}}`,
//!   or `{"uid": ..., "key": ..., "error": ..., "raw_answer": ...}` for an error record.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use hq_data::atomic::AtomicFile;
use hq_data::RefinedTexts;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Result, RuntimeError};
use crate::recaption::input::{read_input, InputKind, RawItem};

/// The JSON field of an error record inside a sample's JSON (tar output).
pub const ERROR_JSON_KEY: &str = "hq_clip_error";

/// The JSON field (tar output) with the attempts a sample's texts took (1 = first answer parsed).
pub const ATTEMPTS_JSON_KEY: &str = "hq_clip_attempts";

/// One input sample's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecapRecord {
    /// The sample's key in its input (empty for a damaged-stream record).
    pub key: String,
    /// The side-car id (the JSON's id field, else the key).
    pub id: String,
    /// The four texts, when the answer parsed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hq_clip: Option<RefinedTexts>,
    /// Why there are no texts: a short category (`image`, `format`, `input`, `generation`) and the
    /// message, as `category: message`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The last raw answer, for error records that got one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_answer: Option<String>,
    /// Generation attempts made.
    pub attempts: u32,
    /// Tokens generated over all attempts.
    pub generated_tokens: u64,
    /// Whether the alt-text had invalid UTF-8 (replaced before prompting).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub alt_text_lossy: bool,
}

impl RecapRecord {
    /// The error category (`image`, `format`, ...), if this is an error record.
    pub fn error_category(&self) -> Option<&str> {
        self.error
            .as_deref()
            .map(|e| e.split(':').next().unwrap_or(e).trim())
    }
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputFormat {
    /// The input shards with the texts added to each sample's JSON.
    #[default]
    Tar,
    /// A JSONL side-car per input, keyed by sample id.
    Sidecar,
}

/// Paths of one input's outputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardPaths {
    /// The input.
    pub input: PathBuf,
    /// The finished output (its existence marks the input as done).
    pub output: PathBuf,
    /// The in-progress log.
    pub partial: PathBuf,
    /// Records of input items that are not samples (tar output only).
    pub errors: PathBuf,
}

impl ShardPaths {
    /// Output paths for `input` in `out_dir`. Inputs with the same file name in different folders
    /// would collide; the job refuses such input sets up front.
    pub fn new(input: &Path, out_dir: &Path, format: OutputFormat) -> Result<Self> {
        let stem = input.file_stem().and_then(|s| s.to_str()).ok_or_else(|| {
            RuntimeError::Recaption(format!(
                "{}: input name is not valid UTF-8",
                input.display()
            ))
        })?;
        let kind = InputKind::of(input)?;
        let output = match (format, kind) {
            (OutputFormat::Sidecar, _) => out_dir.join(format!("{stem}.jsonl")),
            (OutputFormat::Tar, InputKind::Tar) => out_dir.join(format!("{stem}.tar")),
            (OutputFormat::Tar, _) => {
                return Err(RuntimeError::Recaption(format!(
                    "{}: list inputs have no shard to add texts to; use the sidecar output format",
                    input.display()
                )))
            }
        };
        Ok(Self {
            input: input.to_path_buf(),
            output,
            partial: out_dir.join(format!("{stem}.partial.jsonl")),
            errors: out_dir.join(format!("{stem}.errors.jsonl")),
        })
    }
}

/// The append-only log of one shard in progress.
#[derive(Debug)]
pub struct PartialLog {
    file: File,
    path: PathBuf,
}

impl PartialLog {
    /// Opens (or creates) the log and returns it with the records it already holds. A torn last
    /// line (the job was killed mid-write) is cut off; any other unreadable line is an error, since
    /// it means the file is not ours.
    pub fn open(path: &Path) -> Result<(Self, Vec<RecapRecord>)> {
        let io = |action: &'static str| {
            move |source| RuntimeError::Io {
                action,
                path: path.to_path_buf(),
                source,
            }
        };
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(io("opening the recaption log"))?;
        let mut records = Vec::new();
        let mut good_len = 0u64;
        {
            let mut reader = BufReader::new(&mut file);
            let mut line = Vec::new();
            loop {
                line.clear();
                let n = reader
                    .read_until(b'\n', &mut line)
                    .map_err(io("reading the recaption log"))?;
                if n == 0 {
                    break;
                }
                if line.last() != Some(&b'\n') {
                    break; // torn write
                }
                match serde_json::from_slice::<RecapRecord>(&line) {
                    Ok(r) => {
                        records.push(r);
                        good_len += n as u64;
                    }
                    Err(e) => {
                        return Err(RuntimeError::Recaption(format!(
                            "{}: line {} is not a recaption record ({e}); remove the file to redo the shard",
                            path.display(),
                            records.len() + 1
                        )))
                    }
                }
            }
        }
        file.set_len(good_len)
            .map_err(io("truncating the recaption log"))?;
        file.seek(SeekFrom::End(0))
            .map_err(io("seeking the recaption log"))?;
        Ok((
            Self {
                file,
                path: path.to_path_buf(),
            },
            records,
        ))
    }

    /// Appends records and flushes them to disk.
    pub fn append(&mut self, records: &[RecapRecord]) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::new();
        for r in records {
            serde_json::to_writer(&mut buf, r)
                .map_err(|e| RuntimeError::Recaption(format!("serialising a record: {e}")))?;
            buf.push(b'\n');
        }
        let io = |source| RuntimeError::Io {
            action: "writing the recaption log",
            path: self.path.clone(),
            source,
        };
        self.file.write_all(&buf).map_err(io)?;
        self.file.sync_data().map_err(io)
    }
}

fn tar_append(
    builder: &mut tar::Builder<&mut AtomicFile>,
    name: &str,
    bytes: &[u8],
) -> std::io::Result<()> {
    let mut header = tar::Header::new_ustar();
    header.set_size(bytes.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    header.set_entry_type(tar::EntryType::Regular);
    builder.append_data(&mut header, name, bytes)
}

fn io_err<'a>(
    path: &'a Path,
    action: &'static str,
) -> impl Fn(std::io::Error) -> RuntimeError + 'a {
    move |source| RuntimeError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Writes the finished output of a shard from its records, atomically, then removes the log.
/// Returns the number of records written.
pub fn finalize(
    paths: &ShardPaths,
    records: Vec<RecapRecord>,
    format: OutputFormat,
    max_member_bytes: u64,
    model_name: &str,
    drop_input_texts: bool,
) -> Result<usize> {
    let n = records.len();
    match format {
        OutputFormat::Sidecar => {
            let mut file = AtomicFile::create(&paths.output)?;
            for r in &records {
                let mut obj = Map::new();
                obj.insert("uid".into(), Value::String(r.id.clone()));
                obj.insert("key".into(), Value::String(r.key.clone()));
                if let Some(t) = &r.hq_clip {
                    obj.insert(
                        hq_data::sample::REFINED_JSON_KEY.into(),
                        serde_json::to_value(t).unwrap_or(Value::Null),
                    );
                } else {
                    obj.insert(
                        "error".into(),
                        Value::String(r.error.clone().unwrap_or_default()),
                    );
                    if let Some(raw) = &r.raw_answer {
                        obj.insert("raw_answer".into(), Value::String(raw.clone()));
                    }
                    obj.insert("attempts".into(), Value::from(r.attempts));
                }
                serde_json::to_writer(&mut file, &Value::Object(obj))
                    .map_err(|e| RuntimeError::Recaption(e.to_string()))?;
                file.write_all(b"\n")
                    .map_err(io_err(&paths.output, "writing the side-car"))?;
            }
            file.commit()?;
        }
        OutputFormat::Tar => {
            let mut by_key: HashMap<String, RecapRecord> = HashMap::with_capacity(records.len());
            let mut stream_errors = Vec::new();
            for r in records {
                if r.key.is_empty() {
                    stream_errors.push(r);
                } else {
                    by_key.insert(r.key.clone(), r);
                }
            }
            let mut file = AtomicFile::create(&paths.output)?;
            let mut failure: Option<RuntimeError> = None;
            {
                let mut builder = tar::Builder::new(&mut file);
                builder.mode(tar::HeaderMode::Deterministic);
                read_input(&paths.input, max_member_bytes, |item| {
                    let RawItem::Sample(sample) = item else {
                        return true;
                    };
                    let Some(rec) = by_key.remove(&sample.key) else {
                        failure = Some(RuntimeError::Recaption(format!(
                            "{}: sample {} has no record (the input changed while the job ran?)",
                            paths.input.display(),
                            sample.key
                        )));
                        return false;
                    };
                    let mut meta = sample.meta.clone();
                    meta.remove(ERROR_JSON_KEY);
                    meta.remove(ATTEMPTS_JSON_KEY);
                    if let Some(mut t) = rec.hq_clip.clone() {
                        t.source = Some(format!("model:{model_name}"));
                        meta.insert(
                            hq_data::sample::REFINED_JSON_KEY.into(),
                            serde_json::to_value(&t).unwrap_or(Value::Null),
                        );
                        meta.insert(ATTEMPTS_JSON_KEY.into(), Value::from(rec.attempts));
                    } else {
                        // Texts the input already had (an oracle's, an earlier model's) stay, their
                        // `source` telling them apart from this model's, unless the caller drops
                        // them: a dataset meant to hold only this model's texts must not keep an
                        // oracle's where the model failed (the sample falls back to its alt-text).
                        if drop_input_texts {
                            meta.remove(hq_data::sample::REFINED_JSON_KEY);
                        }
                        let mut e = Map::new();
                        e.insert(
                            "reason".into(),
                            Value::String(rec.error.clone().unwrap_or_default()),
                        );
                        if let Some(raw) = &rec.raw_answer {
                            e.insert("raw_answer".into(), Value::String(raw.clone()));
                        }
                        e.insert("attempts".into(), Value::from(rec.attempts));
                        meta.insert(ERROR_JSON_KEY.into(), Value::Object(e));
                    }
                    let json = serde_json::to_vec(&Value::Object(meta)).unwrap_or_default();
                    let mut wrote_json = false;
                    for (ext, bytes) in &sample.members {
                        let name = format!("{}.{ext}", sample.key);
                        let r = if ext == "json" {
                            if wrote_json {
                                continue;
                            }
                            wrote_json = true;
                            tar_append(&mut builder, &name, &json)
                        } else {
                            tar_append(&mut builder, &name, bytes)
                        };
                        if let Err(e) = r {
                            failure = Some(RuntimeError::Io {
                                action: "writing the output shard",
                                path: paths.output.clone(),
                                source: e,
                            });
                            return false;
                        }
                    }
                    if !wrote_json {
                        if let Err(e) =
                            tar_append(&mut builder, &format!("{}.json", sample.key), &json)
                        {
                            failure = Some(RuntimeError::Io {
                                action: "writing the output shard",
                                path: paths.output.clone(),
                                source: e,
                            });
                            return false;
                        }
                    }
                    true
                })?;
                if failure.is_none() {
                    builder
                        .finish()
                        .map_err(io_err(&paths.output, "finishing the output shard"))?;
                }
            }
            if let Some(e) = failure {
                return Err(e);
            }
            // Records whose sample is no longer found (a member that cannot be read twice the same
            // way) stay accounted for in the errors file.
            stream_errors.extend(by_key.into_values());
            if !stream_errors.is_empty() {
                let mut buf = Vec::new();
                for r in &stream_errors {
                    serde_json::to_writer(&mut buf, r)
                        .map_err(|e| RuntimeError::Recaption(e.to_string()))?;
                    buf.push(b'\n');
                }
                hq_data::atomic::write_atomic(&paths.errors, &buf)?;
            }
            file.commit()?;
        }
    }
    if paths.partial.exists() {
        std::fs::remove_file(&paths.partial)
            .map_err(io_err(&paths.partial, "removing the recaption log"))?;
    }
    Ok(n)
}
