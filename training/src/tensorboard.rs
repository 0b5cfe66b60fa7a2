//! TensorBoard event files, written by hand: the run's `metrics.jsonl` mirrored as scalar
//! summaries in `tb/events.out.tfevents.*`, so `tensorboard --logdir RUN/tb` shows the curves live.
//!
//! Why our own writer: the Rust crates for it are unmaintained or pull in a protobuf toolchain,
//! and the subset TensorBoard needs for scalars is small and frozen:
//! - the file is a TFRecord stream: per record `u64` length (little-endian), its masked CRC-32C
//!   (`u32`), the payload, the payload's masked CRC-32C;
//! - each payload is an `Event` protobuf (`tensorflow/core/util/event.proto`): `wall_time` (1,
//!   double), `step` (2, int64), and either `file_version` (3, string, the first record:
//!   `brain.Event:2`) or `summary` (5, `Summary`) holding `Value`s of `tag` (1, string) and
//!   `simple_value` (2, float).
//!
//! The event file is a mirror of the metrics log, never a second source of truth: when the log is
//! opened (a new run, or a resume that cut it back to the checkpoint's step) the event file is
//! rewritten from the kept records, so a resumed run's curves have each step once, exactly like
//! its `metrics.jsonl`. Checked against TensorBoard's own reader in `tests/tests/train_loop.rs`.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::TrainError;

/// Event files are named `events.out.tfevents.<seconds>.<host>`; TensorBoard recognises them by
/// the `tfevents` in the name.
const FILE_MARK: &str = "tfevents";
/// The record every event file starts with.
const FILE_VERSION: &str = "brain.Event:2";

fn io(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), the checksum of TFRecord framing.
pub fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82F6_3B78
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    !data.iter().fold(!0u32, |c, &b| {
        TABLE[((c ^ b as u32) & 0xFF) as usize] ^ (c >> 8)
    })
}

/// TFRecord's masked CRC (a rotated, offset CRC, so a CRC stored inside the data does not match
/// itself).
fn masked_crc(data: &[u8]) -> u32 {
    crc32c(data).rotate_right(15).wrapping_add(0xA282_EAD8)
}

/// One TFRecord: length, its masked CRC, the payload, the payload's masked CRC.
fn frame(payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(payload.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(&masked_crc(payload).to_le_bytes());
    out
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited protobuf field.
fn bytes_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    varint(out, u64::from(field << 3 | 2));
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// `Event { wall_time, step }` plus its body (`file_version` or `summary`), encoded.
fn event(wall_time: f64, step: u64, body: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut e = Vec::new();
    e.push(1 << 3 | 1); // wall_time: fixed64
    e.extend_from_slice(&wall_time.to_le_bytes());
    e.push(2 << 3); // step: varint
    varint(&mut e, step);
    body(&mut e);
    e
}

/// The encoded `Event` of scalar summaries `(tag, value)` at `step`.
fn scalars_event(wall_time: f64, step: u64, scalars: &[(String, f64)]) -> Vec<u8> {
    event(wall_time, step, |e| {
        let mut summary = Vec::new();
        for (tag, v) in scalars {
            let mut value = Vec::new();
            bytes_field(&mut value, 1, tag.as_bytes());
            value.push(2 << 3 | 5); // simple_value: fixed32 float
            value.extend_from_slice(&(*v as f32).to_le_bytes());
            bytes_field(&mut summary, 1, &value);
        }
        bytes_field(e, 5, &summary);
    })
}

/// The scalars of a metrics record: every number in it (nested objects flattened with `/`),
/// tagged `<kind>/<path>`, e.g. `train/loss`, `train/skipped_total/image`,
/// `eval/results/builtin/mean`. `step`, `kind` and `time` are the event's own fields.
pub fn record_scalars(record: &Value) -> Vec<(String, f64)> {
    fn walk(prefix: &str, v: &Value, out: &mut Vec<(String, f64)>) {
        match v {
            Value::Number(n) => out.extend(n.as_f64().map(|x| (prefix.to_string(), x))),
            Value::Object(m) => {
                for (k, v) in m {
                    walk(&format!("{prefix}/{k}"), v, out);
                }
            }
            _ => {}
        }
    }
    let kind = record
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("metrics");
    let mut out = Vec::new();
    if let Some(m) = record.as_object() {
        for (k, v) in m {
            if !matches!(k.as_str(), "step" | "kind" | "time") {
                walk(&format!("{kind}/{k}"), v, &mut out);
            }
        }
    }
    out
}

/// An event file that mirrors a metrics log (module docs).
pub struct EventFile {
    path: PathBuf,
    file: std::fs::File,
}

impl EventFile {
    /// Replaces every event file in `dir` by one holding `records` (metrics records, in order),
    /// written atomically, and opens it for appending.
    pub fn mirror(dir: &Path, records: &[Value], now: f64) -> Result<Self, TrainError> {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let stale: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.contains(FILE_MARK))
            })
            .collect();
        let path = dir.join(format!(
            "events.out.tfevents.{}.hq-train",
            now.max(0.0) as u64
        ));
        let mut bytes = frame(&event(now, 0, |e| {
            bytes_field(e, 3, FILE_VERSION.as_bytes())
        }));
        for r in records {
            bytes.extend(Self::encode(r, now));
        }
        hq_data::atomic::write_atomic(&path, &bytes)?;
        for p in stale.iter().filter(|p| **p != path) {
            std::fs::remove_file(p).map_err(|e| io(p, e))?;
        }
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| io(&path, e))?;
        Ok(EventFile { path, file })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The framed event of `record` (its `time` field as wall time, else `now`), or nothing for a
    /// record without a step or without numbers.
    fn encode(record: &Value, now: f64) -> Vec<u8> {
        let Some(step) = record.get("step").and_then(Value::as_u64) else {
            return Vec::new();
        };
        let scalars = record_scalars(record);
        if scalars.is_empty() {
            return Vec::new();
        }
        let wall = record.get("time").and_then(Value::as_f64).unwrap_or(now);
        frame(&scalars_event(wall, step, &scalars))
    }

    /// Appends `record`'s scalars as one event and flushes.
    pub fn append(&mut self, record: &Value, now: f64) -> Result<(), TrainError> {
        let bytes = Self::encode(record, now);
        if bytes.is_empty() {
            return Ok(());
        }
        self.file
            .write_all(&bytes)
            .and_then(|_| self.file.flush())
            .map_err(|e| io(&self.path, e))
    }
}

/// Test support: the framed payloads of an event file's bytes, both CRCs of every record checked.
#[cfg(test)]
pub(crate) fn read_payloads(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let len_bytes = &bytes[at..at + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes")) as usize;
        let crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().expect("4 bytes"));
        assert_eq!(crc, masked_crc(len_bytes), "length CRC");
        let payload = &bytes[at + 12..at + 12 + len];
        let crc = u32::from_le_bytes(
            bytes[at + 12 + len..at + 16 + len]
                .try_into()
                .expect("4 bytes"),
        );
        assert_eq!(crc, masked_crc(payload), "payload CRC");
        out.push(payload.to_vec());
        at += 16 + len;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn crc32c_matches_the_standard_check_values() {
        // The CRC catalogue's check value for CRC-32C, and RFC 3720's 32 zero bytes.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn records_flatten_numbers_and_tag_them_by_kind() {
        let r = json!({"kind": "train", "step": 3, "time": 1.5, "loss": 2.0, "note": "x",
                       "skipped_total": {"image": 1, "text": 0}});
        let mut s = record_scalars(&r);
        s.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            s,
            vec![
                ("train/loss".to_string(), 2.0),
                ("train/skipped_total/image".to_string(), 1.0),
                ("train/skipped_total/text".to_string(), 0.0),
            ]
        );
    }

    #[test]
    fn mirror_rewrites_and_appends_framed_events() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("events.out.tfevents.1.old"), b"stale").expect("write");
        let first = json!({"kind": "train", "step": 1, "loss": 0.5});
        let mut f = EventFile::mirror(dir.path(), &[first], 100.0).expect("mirror");
        f.append(&json!({"kind": "train", "step": 2, "loss": 0.25}), 101.0)
            .expect("append");
        f.append(&json!({"kind": "train", "step": 3}), 102.0)
            .expect("a record without numbers writes nothing");
        let files: Vec<_> = std::fs::read_dir(dir.path())
            .expect("dir")
            .map(|e| e.expect("entry").path())
            .collect();
        assert_eq!(
            files,
            vec![f.path().to_path_buf()],
            "the stale file is gone"
        );
        let payloads = read_payloads(&std::fs::read(f.path()).expect("read"));
        assert_eq!(payloads.len(), 3, "file version + two scalar events");
        assert!(payloads[0].ends_with(FILE_VERSION.as_bytes()));
        let expect = scalars_event(101.0, 2, &[("train/loss".into(), 0.25)]);
        assert_eq!(payloads[2], expect);
        // Field by field: wall_time 101.0, step 2, summary { value { tag, simple_value 0.25 } }.
        let mut want = vec![0x09];
        want.extend_from_slice(&101.0f64.to_le_bytes());
        want.extend_from_slice(&[0x10, 2, 0x2A, 19, 0x0A, 17, 0x0A, 10]);
        want.extend_from_slice(b"train/loss");
        want.push(0x15);
        want.extend_from_slice(&0.25f32.to_le_bytes());
        assert_eq!(expect, want);
    }
}
