//! Reading the job's inputs: webdataset tar shards, or JSONL / CSV lists of image paths with texts.
//!
//! The recaption job keeps every member of a tar sample (extra files included) so that its output
//! shard is the input shard plus the four texts in each sample's JSON. So tar shards are read here
//! with the `tar` crate, members grouped by key the way webdataset does it
//! ([`hq_data::shards::reader::split_key`]: consecutive members with the same key form one sample),
//! rather than through `hq_data`'s sample reader, which also rejects samples this job must keep
//! (a non-UTF-8 alt-text is recaptioned with the invalid bytes replaced, not dropped).
//!
//! A damaged tar stream (a cut, a bad header) ends the shard with one [`RawItem::Broken`] item; a
//! member larger than the member limit makes its sample an error. Nothing here panics on input.
//! A stream that ends without tar's end-of-archive marker was cut between two members (the `tar`
//! crate takes that for a normal end): it is damaged too.

use std::cell::Cell;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use serde_json::{Map, Value};

use crate::error::{Result, RuntimeError};

/// Image extensions, in webdataset's order of preference.
pub const IMAGE_EXTS: &[&str] = &["jpg", "jpeg", "png", "webp"];

/// One input sample as read.
#[derive(Debug, Clone, PartialEq)]
pub struct RawSample {
    /// The webdataset key (or the list row's key).
    pub key: String,
    /// Every member `(extension, bytes)` in input order (tar inputs only; empty for lists).
    pub members: Vec<(String, Vec<u8>)>,
    /// The image bytes, or why there are none.
    pub image: std::result::Result<Vec<u8>, String>,
    /// The alt-text (invalid UTF-8 replaced); empty when the sample has none.
    pub alt_text: String,
    /// Whether the alt-text had invalid UTF-8.
    pub alt_text_lossy: bool,
    /// The sample's JSON object (empty when it has none or it is not an object).
    pub meta: Map<String, Value>,
}

impl RawSample {
    /// The id the side-car output is keyed by: the JSON's `id_field` value, else the key.
    pub fn sample_id(&self, id_field: &str) -> String {
        match self.meta.get(id_field) {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => self.key.clone(),
        }
    }
}

/// One item of an input.
#[derive(Debug, Clone, PartialEq)]
pub enum RawItem {
    /// A sample.
    Sample(RawSample),
    /// The stream is damaged from here on: one error for the rest of the input.
    Broken(String),
}

/// The kind of an input file, from its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    /// webdataset tar shard.
    Tar,
    /// JSONL list: `{"image": PATH, "text": ALT, "key"?: K, ...}` per line.
    Jsonl,
    /// CSV list with a header holding `image` and `text` (and optionally `key`) columns.
    Csv,
}

impl InputKind {
    /// The kind of `path`, by extension.
    pub fn of(path: &Path) -> Result<Self> {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("tar") => Ok(Self::Tar),
            Some("jsonl") => Ok(Self::Jsonl),
            Some("csv") => Ok(Self::Csv),
            _ => Err(RuntimeError::Recaption(format!(
                "{}: unknown input type (expected a .tar shard or a .jsonl / .csv list)",
                path.display()
            ))),
        }
    }
}

fn lossy(bytes: &[u8]) -> (String, bool) {
    match std::str::from_utf8(bytes) {
        Ok(s) => (s.to_string(), false),
        Err(_) => (String::from_utf8_lossy(bytes).into_owned(), true),
    }
}

fn assemble(key: String, members: Vec<(String, Vec<u8>)>, oversized: Option<String>) -> RawSample {
    let image = match oversized {
        Some(why) => Err(why),
        None => IMAGE_EXTS
            .iter()
            .find_map(|ext| {
                members
                    .iter()
                    .find(|(e, _)| e == ext)
                    .map(|(_, b)| b.clone())
            })
            .ok_or_else(|| "sample has no jpg, jpeg, png or webp member".to_string()),
    };
    let (alt_text, alt_text_lossy) = members
        .iter()
        .find(|(e, _)| e == "txt")
        .map(|(_, b)| lossy(b))
        .unwrap_or_default();
    let meta = members
        .iter()
        .find(|(e, _)| e == "json")
        .and_then(|(_, b)| serde_json::from_slice::<Value>(b).ok())
        .and_then(|v| match v {
            Value::Object(m) => Some(m),
            _ => None,
        })
        .unwrap_or_default();
    RawSample {
        key,
        members,
        image,
        alt_text,
        alt_text_lossy,
        meta,
    }
}

/// A sample being assembled: key, members so far, why it is bad (an oversized member).
type Grouping = (String, Vec<(String, Vec<u8>)>, Option<String>);

/// Reads every item of a tar shard, calling `f` per item (stop early by returning `false`).
/// A reader that notes when its input ran out. The `tar` crate reads nothing past the
/// end-of-archive marker's first zero block, so running out means the marker is missing.
struct EofSeen<R> {
    inner: R,
    seen: Rc<Cell<bool>>,
}

impl<R: Read> Read for EofSeen<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.seen.set(true);
        }
        Ok(n)
    }
}

pub fn read_tar(
    path: &Path,
    max_member_bytes: u64,
    mut f: impl FnMut(RawItem) -> bool,
) -> Result<()> {
    let file = File::open(path).map_err(|source| RuntimeError::Io {
        action: "opening the input shard",
        path: path.to_path_buf(),
        source,
    })?;
    let eof = Rc::new(Cell::new(false));
    let mut archive = tar::Archive::new(EofSeen {
        inner: BufReader::with_capacity(1 << 20, file),
        seen: eof.clone(),
    });
    let entries = match archive.entries() {
        Ok(e) => e,
        Err(e) => {
            f(RawItem::Broken(format!("cannot read the tar stream: {e}")));
            return Ok(());
        }
    };
    let mut current: Option<Grouping> = None;
    for entry in entries {
        let mut entry = match entry {
            Ok(e) => e,
            Err(e) => {
                if let Some((k, m, o)) = current.take() {
                    if !f(RawItem::Sample(assemble(k, m, o))) {
                        return Ok(());
                    }
                }
                f(RawItem::Broken(format!("damaged tar stream: {e}")));
                return Ok(());
            }
        };
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = match entry.path() {
            Ok(p) => p.to_string_lossy().into_owned(),
            Err(_) => continue,
        };
        let Some((key, ext)) = hq_data::shards::reader::split_key(&name) else {
            continue;
        };
        let (key, ext) = (key.to_string(), ext.to_ascii_lowercase());
        if key.ends_with("__meta__") {
            continue;
        }
        if current.as_ref().is_some_and(|(k, _, _)| *k != key) {
            if let Some((k, m, o)) = current.take() {
                if !f(RawItem::Sample(assemble(k, m, o))) {
                    return Ok(());
                }
            }
        }
        let slot = current.get_or_insert_with(|| (key.clone(), Vec::new(), None));
        let size = entry.header().size().unwrap_or(0);
        if size > max_member_bytes {
            slot.2 = Some(format!(
                "member {name} is {size} bytes, over the {max_member_bytes}-byte limit"
            ));
            if std::io::copy(&mut entry, &mut std::io::sink()).is_err() {
                f(RawItem::Broken(format!("damaged tar stream inside {name}")));
                return Ok(());
            }
            continue;
        }
        let mut bytes = Vec::with_capacity(size as usize);
        if let Err(e) = entry.read_to_end(&mut bytes) {
            if let Some((k, m, _)) = current.take() {
                f(RawItem::Sample(assemble(
                    k,
                    m,
                    Some(format!("cannot read member {name}: {e}")),
                )));
            }
            f(RawItem::Broken(format!(
                "damaged tar stream inside {name}: {e}"
            )));
            return Ok(());
        }
        slot.1.push((ext, bytes));
    }
    if eof.get() {
        // Cut between two members: the last sample may lack members and what followed is lost.
        let last = current.as_ref().map(|(k, _, _)| k.clone());
        if let Some((k, m, _)) = current.take() {
            let why = "the shard was cut after this sample's last member read".to_string();
            if !f(RawItem::Sample(assemble(k, m, Some(why)))) {
                return Ok(());
            }
        }
        f(RawItem::Broken(format!(
            "damaged tar stream: it ends without the end-of-archive marker (cut short{}); the \
             samples after the cut are lost",
            last.map(|k| format!(" after sample {k}"))
                .unwrap_or_default()
        )));
        return Ok(());
    }
    if let Some((k, m, o)) = current.take() {
        f(RawItem::Sample(assemble(k, m, o)));
    }
    Ok(())
}

fn list_row(
    base: &Path,
    line_no: usize,
    image: Option<&str>,
    text: Option<&str>,
    key: Option<String>,
    meta: Map<String, Value>,
) -> RawSample {
    let key = key
        .filter(|k| !k.is_empty())
        .unwrap_or_else(|| format!("{line_no:09}"));
    let image = match image {
        Some(p) if !p.is_empty() => {
            let p = PathBuf::from(p);
            let p = if p.is_relative() { base.join(p) } else { p };
            std::fs::read(&p).map_err(|e| format!("cannot read image {}: {e}", p.display()))
        }
        _ => Err(format!("line {line_no}: no image path")),
    };
    RawSample {
        key,
        members: Vec::new(),
        image,
        alt_text: text.unwrap_or("").to_string(),
        alt_text_lossy: false,
        meta,
    }
}

/// Reads a JSONL list; image paths are relative to the list's folder. A bad line is a sample error
/// keyed by its line number, never the end of the list.
pub fn read_jsonl(path: &Path, mut f: impl FnMut(RawItem) -> bool) -> Result<()> {
    let file = File::open(path).map_err(|source| RuntimeError::Io {
        action: "opening the input list",
        path: path.to_path_buf(),
        source,
    })?;
    let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
    let mut reader = BufReader::new(file);
    let mut buf = Vec::new();
    let mut line_no = 0usize;
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(|source| RuntimeError::Io {
                action: "reading the input list",
                path: path.to_path_buf(),
                source,
            })?;
        if n == 0 {
            return Ok(());
        }
        line_no += 1;
        let (line, _) = lossy(&buf);
        if line.trim().is_empty() {
            continue;
        }
        let sample = match serde_json::from_str::<Value>(&line) {
            Ok(Value::Object(obj)) => {
                let key = obj.get("key").and_then(|v| match v {
                    Value::String(s) => Some(s.clone()),
                    Value::Number(n) => Some(n.to_string()),
                    _ => None,
                });
                let image = obj.get("image").and_then(Value::as_str).map(str::to_string);
                let text = obj
                    .get("text")
                    .or_else(|| obj.get("caption"))
                    .and_then(Value::as_str)
                    .map(str::to_string);
                list_row(&base, line_no, image.as_deref(), text.as_deref(), key, obj)
            }
            Ok(_) => RawSample {
                key: format!("{line_no:09}"),
                members: Vec::new(),
                image: Err(format!("line {line_no}: not a JSON object")),
                alt_text: String::new(),
                alt_text_lossy: false,
                meta: Map::new(),
            },
            Err(e) => RawSample {
                key: format!("{line_no:09}"),
                members: Vec::new(),
                image: Err(format!("line {line_no}: invalid JSON: {e}")),
                alt_text: String::new(),
                alt_text_lossy: false,
                meta: Map::new(),
            },
        };
        if !f(RawItem::Sample(sample)) {
            return Ok(());
        }
    }
}

/// Splits one CSV record (RFC 4180 quoting; records do not span lines).
fn csv_fields(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            ('"', true) => quoted = false,
            ('"', false) if cur.is_empty() => quoted = true,
            (',', false) => out.push(std::mem::take(&mut cur)),
            (c, _) => cur.push(c),
        }
    }
    out.push(cur);
    out
}

/// Reads a CSV list with a header row naming `image`, `text` (or `caption`) and optionally `key`.
pub fn read_csv(path: &Path, mut f: impl FnMut(RawItem) -> bool) -> Result<()> {
    let bytes = std::fs::read(path).map_err(|source| RuntimeError::Io {
        action: "reading the input list",
        path: path.to_path_buf(),
        source,
    })?;
    let (text, _) = lossy(&bytes);
    let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
    let mut lines = text.lines().enumerate();
    let header = loop {
        match lines.next() {
            Some((_, l)) if l.trim().is_empty() => continue,
            Some((_, l)) => break csv_fields(l.trim_start_matches('\u{feff}')),
            None => return Ok(()),
        }
    };
    let col = |names: &[&str]| {
        header
            .iter()
            .position(|h| names.contains(&h.trim().to_ascii_lowercase().as_str()))
    };
    let (Some(img_col), Some(text_col)) = (
        col(&["image", "image_path", "path"]),
        col(&["text", "caption", "alt_text"]),
    ) else {
        return Err(RuntimeError::Recaption(format!(
            "{}: the CSV header must name an `image` and a `text` column (got {header:?})",
            path.display()
        )));
    };
    let key_col = col(&["key", "uid", "id"]);
    for (i, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let fields = csv_fields(line);
        let mut meta = Map::new();
        for (h, v) in header.iter().zip(&fields) {
            meta.insert(h.trim().to_string(), Value::String(v.clone()));
        }
        let sample = list_row(
            &base,
            i + 1,
            fields.get(img_col).map(String::as_str),
            fields.get(text_col).map(String::as_str),
            key_col.and_then(|c| fields.get(c).cloned()),
            meta,
        );
        if !f(RawItem::Sample(sample)) {
            return Ok(());
        }
    }
    Ok(())
}

/// Reads any input, by kind.
pub fn read_input(
    path: &Path,
    max_member_bytes: u64,
    f: impl FnMut(RawItem) -> bool,
) -> Result<()> {
    match InputKind::of(path)? {
        InputKind::Tar => read_tar(path, max_member_bytes, f),
        InputKind::Jsonl => read_jsonl(path, f),
        InputKind::Csv => read_csv(path, f),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shard of `n` samples (key.jpg, key.txt) and the offset where each sample's first header
    /// starts.
    fn shard(n: usize) -> (Vec<u8>, Vec<usize>) {
        let mut b = tar::Builder::new(Vec::new());
        let mut starts = Vec::new();
        for i in 0..n {
            starts.push(b.get_ref().len());
            for (ext, data) in [("jpg", vec![7u8; 700]), ("txt", b"a cat".to_vec())] {
                let mut h = tar::Header::new_gnu();
                h.set_size(data.len() as u64);
                h.set_mode(0o644);
                h.set_cksum();
                b.append_data(&mut h, format!("{i:04}.{ext}"), data.as_slice())
                    .expect("append");
            }
        }
        (b.into_inner().expect("finish"), starts)
    }

    fn items(bytes: &[u8]) -> Vec<RawItem> {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("s.tar");
        std::fs::write(&path, bytes).expect("write");
        let mut got = Vec::new();
        read_tar(&path, 1 << 20, |item| {
            got.push(item);
            true
        })
        .expect("read");
        got
    }

    /// Fault campaign finding (tools/faults, recap input trials): a shard cut exactly between two
    /// members read as a shorter, complete shard, so the samples after the cut vanished from the
    /// output with no error record. Now the missing end-of-archive marker makes it damaged.
    #[test]
    fn a_shard_cut_between_members_is_damaged_not_short() {
        let (bytes, starts) = shard(4);
        let whole = items(&bytes);
        assert_eq!(whole.len(), 4);
        assert!(whole
            .iter()
            .all(|i| matches!(i, RawItem::Sample(s) if s.image.is_ok())));
        // Cut where sample 2 begins, and where sample 1's second member begins.
        for (cut, samples) in [(starts[2], 2), (starts[1] + 512 + 1024, 2)] {
            let got = items(&bytes[..cut]);
            assert_eq!(got.len(), samples + 1, "cut at {cut}: {got:?}");
            assert!(
                matches!(got.last(), Some(RawItem::Broken(m)) if m.contains("end-of-archive")),
                "cut at {cut}: {got:?}"
            );
            // The sample the cut ended on is an error record, not a complete-looking sample.
            assert!(
                matches!(&got[samples - 1], RawItem::Sample(s) if s.image.is_err()),
                "cut at {cut}: {:?}",
                got[samples - 1]
            );
        }
    }

    #[test]
    fn csv_quoting() {
        assert_eq!(
            csv_fields(r#"a,"b, c","d ""e""",,f"#),
            vec!["a", "b, c", "d \"e\"", "", "f"]
        );
    }
}
