//! Writing samples as webdataset shards `prefix-00000.tar`, `prefix-00001.tar`, ...
//!
//! Each sample becomes `key.<jpg|jpeg|png|webp>`, `key.txt` and `key.json` (in that order), the
//! JSON being [`Sample::json`] (metadata plus the refined texts). Headers are deterministic (ustar,
//! mode 0644, uid/gid 0, mtime 0, no user names), so the same samples always give byte-identical
//! shards. Every shard is written through [`AtomicFile`]: it appears under its final name only
//! once complete, and a job killed (or a writer dropped) mid-shard leaves no file with that name.

use super::reader::split_key;
use crate::atomic::AtomicFile;
use crate::error::{DataError, Result};
use crate::sample::{Sample, IMAGE_EXTENSIONS};
use std::ffi::OsString;
use std::io::{self, Write};
use std::path::PathBuf;

/// When to start a new shard. A shard always holds at least one sample, so one sample bigger than
/// `max_bytes` gets a shard of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardWriterOptions {
    /// Most samples in one shard (img2dataset's default is 10 000).
    pub max_samples: Option<u64>,
    /// Most bytes in one shard, tar overhead included.
    pub max_bytes: Option<u64>,
    /// Number of the first shard (to continue a numbering).
    pub first_index: u64,
}

impl Default for ShardWriterOptions {
    fn default() -> Self {
        ShardWriterOptions {
            max_samples: Some(10_000),
            max_bytes: None,
            first_index: 0,
        }
    }
}

/// Counts bytes on their way to the file.
struct Counting<W> {
    inner: W,
    bytes: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

struct OpenShard {
    builder: tar::Builder<Counting<AtomicFile>>,
    path: PathBuf,
    samples: u64,
    last_key: Option<String>,
}

/// Writes samples into numbered shards; see the module docs.
pub struct ShardWriter {
    prefix: PathBuf,
    opts: ShardWriterOptions,
    index: u64,
    current: Option<OpenShard>,
    finished: Vec<PathBuf>,
    samples: u64,
    failed: bool,
    /// One shard at exactly this path (see [`ShardWriter::single`]).
    fixed: Option<PathBuf>,
}

fn padded(len: u64) -> u64 {
    len.div_ceil(512) * 512
}

/// Upper bound of the bytes one member takes in the archive.
fn member_bytes(name: &str, len: usize) -> u64 {
    let long_name = if name.len() > 100 {
        512 + padded(name.len() as u64 + 1)
    } else {
        0
    };
    long_name + 512 + padded(len as u64)
}

/// A key the reader will group back into the same key: a relative path whose file name has no
/// dot, with no empty, `.` or `..` component.
pub fn check_key(key: &str) -> std::result::Result<(), String> {
    if key.is_empty() {
        return Err("empty key".into());
    }
    if key.contains('\0') {
        return Err(format!("key {key:?} contains a NUL byte"));
    }
    if key.starts_with('/') {
        return Err(format!("key {key:?} is an absolute path"));
    }
    if key
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(format!(
            "key {key:?} has an empty, '.' or '..' path component"
        ));
    }
    let probe = format!("{key}.txt");
    if split_key(&probe) != Some((key, "txt")) {
        return Err(format!(
            "key {key:?} has a dot in its file name, so webdataset would split it differently"
        ));
    }
    let first = key.split('/').next().unwrap_or(key);
    if first.len() >= 4 && first.starts_with("__") && first.ends_with("__") {
        return Err(format!(
            "key {key:?} looks like webdataset metadata (__name__) and would be skipped"
        ));
    }
    Ok(())
}

impl ShardWriter {
    /// Shards are named `{prefix}-{index:05}.tar`; `prefix` may include folders (created as
    /// needed): `out/train` gives `out/train-00000.tar`.
    pub fn new(prefix: impl Into<PathBuf>, opts: ShardWriterOptions) -> Result<Self> {
        let prefix = prefix.into();
        if prefix.file_name().is_none() {
            return Err(DataError::Invalid(format!(
                "shard prefix {} has no file name part",
                prefix.display()
            )));
        }
        if opts.max_samples == Some(0) {
            return Err(DataError::Invalid("max_samples must be at least 1".into()));
        }
        if opts.max_bytes.is_some_and(|b| b < 4096) {
            return Err(DataError::Invalid("max_bytes must be at least 4096".into()));
        }
        Ok(ShardWriter {
            prefix,
            index: opts.first_index,
            opts,
            current: None,
            finished: Vec::new(),
            samples: 0,
            failed: false,
            fixed: None,
        })
    }

    /// A writer of exactly one shard at `path` (no size limit): rewriting a shard under its own
    /// name, as `hq-data join` does. Atomic like the others.
    pub fn single(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        let mut w = ShardWriter::new(
            &path,
            ShardWriterOptions {
                max_samples: None,
                max_bytes: None,
                first_index: 0,
            },
        )?;
        w.fixed = Some(path);
        Ok(w)
    }

    /// The path of shard number `index`.
    pub fn shard_path(&self, index: u64) -> PathBuf {
        if let Some(p) = &self.fixed {
            return p.clone();
        }
        let mut name: OsString = self.prefix.clone().into_os_string();
        name.push(format!("-{index:05}.tar"));
        PathBuf::from(name)
    }

    /// Shards completed so far (renamed into place).
    pub fn finished_shards(&self) -> &[PathBuf] {
        &self.finished
    }

    pub fn samples_written(&self) -> u64 {
        self.samples
    }

    /// Append one sample, starting a new shard first when the current one is full.
    pub fn write(&mut self, sample: &Sample) -> Result<()> {
        if self.failed {
            return Err(DataError::Invalid(
                "shard writer is unusable after an earlier write error".into(),
            ));
        }
        let key = sample.key.as_str();
        check_key(key).map_err(DataError::Invalid)?;
        let mut members: Vec<(String, &[u8])> = Vec::with_capacity(3);
        if let Some(img) = &sample.image {
            if !IMAGE_EXTENSIONS.contains(&img.ext.as_str()) {
                return Err(DataError::Invalid(format!(
                    "sample {key}: image extension {:?} is not one of {IMAGE_EXTENSIONS:?}",
                    img.ext
                )));
            }
            members.push((format!("{key}.{}", img.ext), &img.bytes));
        }
        let json = serde_json::to_vec(&sample.json()).map_err(|e| {
            DataError::Invalid(format!("sample {key}: cannot serialise its JSON: {e}"))
        })?;
        members.push((format!("{key}.txt"), sample.raw_text.as_bytes()));
        members.push((format!("{key}.json"), &json));
        let size: u64 = members.iter().map(|(n, d)| member_bytes(n, d.len())).sum();

        if let Some(cur) = &self.current {
            let full_by_count = self.opts.max_samples.is_some_and(|m| cur.samples >= m);
            let full_by_bytes = self
                .opts
                .max_bytes
                .is_some_and(|m| cur.builder.get_ref().bytes + size + 1024 > m);
            if cur.samples > 0 && (full_by_count || full_by_bytes) {
                self.close_current()?;
            }
        }
        if self.current.is_none() {
            let path = self.shard_path(self.index);
            let file = AtomicFile::create(&path)?;
            let builder = tar::Builder::new(Counting {
                inner: file,
                bytes: 0,
            });
            self.current = Some(OpenShard {
                builder,
                path,
                samples: 0,
                last_key: None,
            });
        }
        let Some(cur) = self.current.as_mut() else {
            return Err(DataError::Invalid("no open shard".into()));
        };
        if cur.last_key.as_deref() == Some(key) {
            return Err(DataError::Invalid(format!(
                "sample {key} follows a sample with the same key; webdataset would merge them"
            )));
        }
        let path = cur.path.clone();
        for (name, data) in &members {
            let mut header = tar::Header::new_ustar();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(0);
            header.set_entry_type(tar::EntryType::Regular);
            if let Err(e) = cur.builder.append_data(&mut header, name, *data) {
                // The shard now holds part of a sample: abandon it (its temporary file is removed).
                self.failed = true;
                self.current = None;
                return Err(DataError::io(path, e));
            }
        }
        cur.samples += 1;
        cur.last_key = Some(key.to_string());
        self.samples += 1;
        Ok(())
    }

    fn close_current(&mut self) -> Result<()> {
        let Some(cur) = self.current.take() else {
            return Ok(());
        };
        let counting = cur.builder.into_inner().map_err(|e| {
            self.failed = true;
            DataError::io(&cur.path, e)
        })?;
        counting
            .inner
            .commit()
            .inspect_err(|_| self.failed = true)?;
        self.finished.push(cur.path);
        self.index += 1;
        Ok(())
    }

    /// Finish the last shard and return every shard written, in order.
    pub fn finish(mut self) -> Result<Vec<PathBuf>> {
        if self.failed {
            return Err(DataError::Invalid(
                "shard writer failed earlier; the shards listed so far are complete".into(),
            ));
        }
        self.close_current()?;
        Ok(std::mem::take(&mut self.finished))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked() {
        assert!(check_key("000123").is_ok());
        assert!(check_key("part.1/000123").is_ok());
        assert!(check_key("a/b/c").is_ok());
        for bad in [
            "", "a.b", "/abs", "a//b", "a/./b", "../x", "dir/", "__key__", "x\0y",
        ] {
            assert!(check_key(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn shard_names_are_numbered() {
        let w = ShardWriter::new(
            "out/train",
            ShardWriterOptions {
                first_index: 7,
                ..Default::default()
            },
        )
        .expect("writer");
        assert_eq!(w.shard_path(7), PathBuf::from("out/train-00007.tar"));
        assert_eq!(w.shard_path(123456), PathBuf::from("out/train-123456.tar"));
        assert!(ShardWriter::new(
            "x",
            ShardWriterOptions {
                max_samples: Some(0),
                ..Default::default()
            }
        )
        .is_err());
    }
}
