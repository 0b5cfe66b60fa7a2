//! Reading samples from webdataset shards, one member at a time.
//!
//! Members are grouped into samples the way webdataset's `group_by_keys` does it: consecutive
//! members with the same key form one sample, where the key is the path up to the first dot of the
//! file name (folders included) and the extension is the rest, lower-cased. Names without such a
//! dot, and webdataset's `__meta__` files, are skipped.
//!
//! Every problem with a sample becomes a [`SampleError`] item and reading goes on; damage to the
//! tar stream itself (a cut, a bad header checksum) ends that shard with one error record and the
//! reader moves to the next shard. Nothing here panics on input.

use super::images::{decode_image, probe_image, DEFAULT_MAX_PIXELS};
use super::tario::{TarEvent, TarFault, TarStream};
use crate::error::{Result, SampleError};
use crate::sample::{ImageBytes, RefinedTexts, Sample, IMAGE_EXTENSIONS, REFINED_JSON_KEY};
use std::collections::VecDeque;
use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// What one read yields: a good sample or the record of a bad one.
pub type SampleResult = std::result::Result<Sample, SampleError>;

/// How much of each image the reader checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ImageCheck {
    /// Trust the bytes.
    None,
    /// Read the image header: recognised format (JPEG, PNG or WebP) and at most `max_pixels`.
    /// Cheap; catches garbage bytes and decompression bombs.
    #[default]
    Header,
    /// Decode every image fully (what a training loader does anyway); catches damaged data too.
    Decode,
}

/// Reader settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadOptions {
    pub image_check: ImageCheck,
    /// Pixel limit for image checks (see [`super::images::probe_image`]).
    pub max_pixels: u64,
    /// Members bigger than this are skipped (streamed past, never held) and their sample is bad.
    pub max_member_bytes: u64,
    /// A sample without `jpg|jpeg|png|webp` is bad.
    pub require_image: bool,
    /// A sample without `txt` is bad.
    pub require_text: bool,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            image_check: ImageCheck::Header,
            max_pixels: DEFAULT_MAX_PIXELS,
            max_member_bytes: 256 << 20,
            require_image: true,
            require_text: true,
        }
    }
}

/// webdataset's `base_plus_ext`: split a member name into (key, extension) with the regex
/// `^((?:.*/|)[^.]+)[.]([^/]*)$`. `None` for names webdataset skips (no dot in the file name).
pub fn split_key(name: &str) -> Option<(&str, &str)> {
    // Candidate ends of the `(?:.*/|)` group, greedy first: after each '/', last to first, then 0.
    let mut starts: Vec<usize> = name.match_indices('/').map(|(i, _)| i + 1).collect();
    starts.reverse();
    starts.push(0);
    let last_slash_end = name.rfind('/').map_or(0, |i| i + 1);
    for p in starts {
        let rest = &name[p..];
        // `[^.]+` then `[.]`: the first dot of `rest`, with at least one character before it.
        let Some(dot) = rest.find('.') else {
            continue;
        };
        if dot == 0 {
            continue;
        }
        // `([^/]*)$`: no '/' after the dot.
        if p + dot < last_slash_end {
            continue;
        }
        return Some((&name[..p + dot], &rest[dot + 1..]));
    }
    None
}

/// webdataset skips top-level `__name__` files and `__name__/` folders.
fn is_meta_name(name: &str) -> bool {
    let first = name.split('/').next().unwrap_or(name);
    first.len() >= 4 && first.starts_with("__") && first.ends_with("__")
}

/// Counts for one shard.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShardStats {
    pub shard: String,
    pub good: u64,
    pub bad: u64,
    /// Bytes of the shard consumed.
    pub bytes: u64,
    /// Why the shard ended before its end-of-archive marker (truncated, corrupt, unreadable).
    pub ended_early: Option<String>,
}

/// Counts over every shard read so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadStats {
    /// Finished shards, in the order they finished.
    pub shards: Vec<ShardStats>,
    pub good: u64,
    pub bad: u64,
    pub bytes: u64,
}

impl ReadStats {
    pub fn samples(&self) -> u64 {
        self.good + self.bad
    }

    /// Shards that ended before their end-of-archive marker.
    pub fn shards_ended_early(&self) -> usize {
        self.shards
            .iter()
            .filter(|s| s.ended_early.is_some())
            .count()
    }

    pub(crate) fn count(&mut self, item: &SampleResult) {
        match item {
            Ok(_) => self.good += 1,
            Err(_) => self.bad += 1,
        }
    }

    pub(crate) fn finish_shard(&mut self, shard: ShardStats) {
        self.bytes += shard.bytes;
        self.shards.push(shard);
    }
}

impl fmt::Display for ShardStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} good, {} bad, {:.1} MB",
            self.shard,
            self.good,
            self.bad,
            self.bytes as f64 / 1e6
        )?;
        if let Some(why) = &self.ended_early {
            write!(f, ", ended early: {why}")?;
        }
        Ok(())
    }
}

/// `{}`: one summary line. `{:#}`: the summary and one line per shard with bad samples or an early
/// end.
impl fmt::Display for ReadStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pct = if self.samples() > 0 {
            100.0 * self.bad as f64 / self.samples() as f64
        } else {
            0.0
        };
        write!(
            f,
            "{} shard(s), {} samples: {} good, {} bad ({pct:.2}%), {:.1} MB",
            self.shards.len(),
            self.samples(),
            self.good,
            self.bad,
            self.bytes as f64 / 1e6
        )?;
        let early = self.shards_ended_early();
        if early > 0 {
            write!(f, "; {early} shard(s) ended early")?;
        }
        if f.alternate() {
            for s in self
                .shards
                .iter()
                .filter(|s| s.bad > 0 || s.ended_early.is_some())
            {
                write!(f, "\n  {s}")?;
            }
        }
        Ok(())
    }
}

/// Members of one key being collected.
struct Group {
    key: String,
    members: Vec<(String, Vec<u8>)>,
    problems: Vec<String>,
}

impl Group {
    fn new(key: &str) -> Self {
        Group {
            key: key.to_string(),
            members: Vec::new(),
            problems: Vec::new(),
        }
    }

    fn get(&self, ext: &str) -> Option<&[u8]> {
        self.members
            .iter()
            .find(|(e, _)| e == ext)
            .map(|(_, d)| d.as_slice())
    }

    fn take(&mut self, ext: &str) -> Option<Vec<u8>> {
        let i = self.members.iter().position(|(e, _)| e == ext)?;
        Some(self.members.swap_remove(i).1)
    }

    fn has_image(&self) -> bool {
        IMAGE_EXTENSIONS.iter().any(|e| self.get(e).is_some())
    }

    /// Holds every member of img2dataset's layout (image, txt, json).
    fn is_complete(&self) -> bool {
        self.has_image() && self.get("txt").is_some() && self.get("json").is_some()
    }

    fn member_list(&self) -> String {
        if self.members.is_empty() {
            return "none".into();
        }
        self.members
            .iter()
            .map(|(e, _)| format!(".{e}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Turn a complete group into a sample, or say what is wrong with it.
fn finish_group(mut g: Group, opts: &ReadOptions) -> std::result::Result<Sample, String> {
    let mut problems = std::mem::take(&mut g.problems);
    let found = g.member_list();
    let image_ext = IMAGE_EXTENSIONS
        .iter()
        .find(|e| g.get(e).is_some())
        .map(|e| e.to_string());
    let image = match image_ext {
        Some(ext) => {
            let bytes = g.take(&ext).unwrap_or_default();
            let check = match opts.image_check {
                ImageCheck::None => Ok(()),
                ImageCheck::Header => probe_image(&bytes, opts.max_pixels).map(|_| ()),
                ImageCheck::Decode => decode_image(&bytes, opts.max_pixels).map(|_| ()),
            };
            if let Err(why) = check {
                problems.push(format!("bad image .{ext}: {why}"));
            }
            Some(ImageBytes { ext, bytes })
        }
        None => {
            if opts.require_image {
                problems.push(format!(
                    "missing image member (.jpg, .jpeg, .png or .webp); members found: {found}"
                ));
            }
            None
        }
    };
    let raw_text = match g.take("txt") {
        Some(bytes) => match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => {
                problems.push(format!(
                    ".txt is not valid UTF-8 (invalid byte at offset {})",
                    e.utf8_error().valid_up_to()
                ));
                String::new()
            }
        },
        None => {
            if opts.require_text {
                problems.push(format!("missing .txt member; members found: {found}"));
            }
            String::new()
        }
    };
    let mut meta = serde_json::Map::new();
    let mut refined = None;
    if let Some(bytes) = g.take("json") {
        match serde_json::from_slice::<serde_json::Value>(&bytes) {
            Ok(serde_json::Value::Object(mut obj)) => {
                match obj.remove(REFINED_JSON_KEY) {
                    None | Some(serde_json::Value::Null) => {}
                    Some(v) => match serde_json::from_value::<RefinedTexts>(v) {
                        Ok(r) => refined = Some(r),
                        Err(e) => problems.push(format!(
                            "invalid refined texts under {REFINED_JSON_KEY:?} in .json: {e}"
                        )),
                    },
                }
                meta = obj;
            }
            Ok(other) => problems.push(format!(
                ".json is not a JSON object (it is {})",
                json_kind(&other)
            )),
            Err(e) => problems.push(format!("invalid JSON in .json: {e}")),
        }
    }
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    Ok(Sample {
        key: g.key,
        image,
        raw_text,
        refined,
        meta,
    })
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// The samples of one tar stream (any `Read`: a file, a decompressor, a byte slice).
pub struct TarSamples<R> {
    stream: TarStream<R>,
    opts: ReadOptions,
    pending: Option<Group>,
    queue: VecDeque<SampleResult>,
    stats: ShardStats,
    finished: bool,
}

impl<R: Read> TarSamples<R> {
    /// `shard` names the stream in error records and stats (usually its path).
    pub fn new(reader: R, shard: impl Into<String>, opts: ReadOptions) -> Self {
        TarSamples {
            stream: TarStream::new(reader, opts.max_member_bytes),
            opts,
            pending: None,
            queue: VecDeque::new(),
            stats: ShardStats {
                shard: shard.into(),
                ..ShardStats::default()
            },
            finished: false,
        }
    }

    /// Counts so far (final once the iterator has returned `None`).
    pub fn stats(&self) -> &ShardStats {
        &self.stats
    }

    pub fn into_stats(self) -> ShardStats {
        self.stats
    }

    fn error(&self, key: &str, reason: String) -> SampleError {
        SampleError {
            shard: self.stats.shard.clone(),
            key: key.to_string(),
            reason,
        }
    }

    fn flush(&mut self, g: Group) {
        let key = g.key.clone();
        let item = finish_group(g, &self.opts).map_err(|r| self.error(&key, r));
        self.queue.push_back(item);
    }

    fn add_member(&mut self, name: String, data: std::result::Result<Vec<u8>, String>) {
        if is_meta_name(&name) {
            return;
        }
        let Some((key, ext)) = split_key(&name) else {
            return;
        };
        let ext = ext.to_lowercase();
        if self.pending.as_ref().is_some_and(|g| g.key != key) {
            if let Some(g) = self.pending.take() {
                self.flush(g);
            }
        }
        let g = self.pending.get_or_insert_with(|| Group::new(key));
        match data {
            Ok(d) => {
                if g.get(&ext).is_some() {
                    g.problems
                        .push(format!("duplicate member {name} (extension .{ext} twice)"));
                } else {
                    g.members.push((ext, d));
                }
            }
            Err(why) => g.problems.push(why),
        }
    }

    fn fault(&mut self, fault: TarFault) {
        self.stats.ended_early = Some(fault.message.clone());
        let cut_key = fault
            .in_member
            .as_deref()
            .filter(|n| !is_meta_name(n))
            .and_then(split_key)
            .map(|(k, _)| k.to_string());
        match cut_key {
            // The cut fell inside a member's data: that member's sample is lost.
            Some(key) => {
                if let Some(g) = self.pending.take() {
                    if g.key != key {
                        self.flush(g);
                    }
                }
                let e = self.error(&key, format!("{}; the sample is incomplete", fault.message));
                self.queue.push_back(Err(e));
            }
            // The cut fell between members (or in a header): a sample that holds every member
            // of the layout is kept, anything less is reported with the cut.
            None => match self.pending.take() {
                Some(g) if g.is_complete() => {
                    self.flush(g);
                    let e = self.error("", fault.message);
                    self.queue.push_back(Err(e));
                }
                Some(g) => {
                    let e = self.error(
                        &g.key,
                        format!(
                            "{}; the sample is incomplete (members read: {})",
                            fault.message,
                            g.member_list()
                        ),
                    );
                    self.queue.push_back(Err(e));
                }
                None => {
                    let e = self.error("", fault.message);
                    self.queue.push_back(Err(e));
                }
            },
        }
    }
}

impl<R: Read> Iterator for TarSamples<R> {
    type Item = SampleResult;

    fn next(&mut self) -> Option<SampleResult> {
        loop {
            if let Some(item) = self.queue.pop_front() {
                match &item {
                    Ok(_) => self.stats.good += 1,
                    Err(_) => self.stats.bad += 1,
                }
                return Some(item);
            }
            if self.finished {
                return None;
            }
            let event = self.stream.next_event();
            self.stats.bytes = self.stream.offset();
            match event {
                None => {
                    self.finished = true;
                    if let Some(g) = self.pending.take() {
                        self.flush(g);
                    }
                }
                Some(Ok(TarEvent::Member { name, data })) => self.add_member(name, Ok(data)),
                Some(Ok(TarEvent::Oversized { name, size })) => {
                    let why = format!(
                        "member {name} is {size} bytes, over the limit of {} (skipped)",
                        self.opts.max_member_bytes
                    );
                    self.add_member(name, Err(why));
                }
                Some(Err(fault)) => {
                    self.finished = true;
                    self.fault(fault);
                }
            }
        }
    }
}

/// A boxed shard stream, as [`open_shard`] returns it.
pub type ShardStream = TarSamples<Box<dyn Read + Send>>;

/// Open one shard file for reading: plain tar, or gzip-compressed tar (`.tar.gz`, recognised by
/// its magic bytes). The error is a reason string for a [`SampleError`].
pub fn open_shard(path: &Path, opts: &ReadOptions) -> std::result::Result<ShardStream, String> {
    let file = File::open(path).map_err(|e| format!("cannot open shard: {e}"))?;
    let mut buffered = BufReader::with_capacity(256 << 10, file);
    let head = buffered
        .fill_buf()
        .map_err(|e| format!("cannot read shard: {e}"))?;
    let gz = head.len() >= 2 && head[0] == 0x1f && head[1] == 0x8b;
    let reader: Box<dyn Read + Send> = if gz {
        Box::new(BufReader::with_capacity(
            256 << 10,
            flate2::bufread::MultiGzDecoder::new(buffered),
        ))
    } else {
        Box::new(buffered)
    };
    Ok(TarSamples::new(
        reader,
        path.display().to_string(),
        opts.clone(),
    ))
}

/// Sequential reader over a list of shards: yields every sample of the first shard, then the next
/// shard's, and so on. A shard that cannot be opened yields one error record.
pub struct ShardReader {
    shards: Vec<PathBuf>,
    next_shard: usize,
    current: Option<ShardStream>,
    opts: ReadOptions,
    stats: ReadStats,
}

impl ShardReader {
    pub fn new(shards: Vec<PathBuf>, opts: ReadOptions) -> Self {
        ShardReader {
            shards,
            next_shard: 0,
            current: None,
            opts,
            stats: ReadStats::default(),
        }
    }

    /// Expand shard specifications (see [`super::spec`]) and read them in order.
    pub fn from_specs<S: AsRef<str>>(specs: &[S], opts: ReadOptions) -> Result<Self> {
        Ok(Self::new(super::spec::expand_shards(specs)?, opts))
    }

    pub fn shards(&self) -> &[PathBuf] {
        &self.shards
    }

    /// Counts so far: totals over every item yielded, and one entry per finished shard.
    pub fn stats(&self) -> &ReadStats {
        &self.stats
    }

    pub fn into_stats(self) -> ReadStats {
        self.stats
    }
}

impl Iterator for ShardReader {
    type Item = SampleResult;

    fn next(&mut self) -> Option<SampleResult> {
        loop {
            if let Some(cur) = self.current.as_mut() {
                if let Some(item) = cur.next() {
                    self.stats.count(&item);
                    return Some(item);
                }
                if let Some(done) = self.current.take() {
                    self.stats.finish_shard(done.into_stats());
                }
            }
            let path = self.shards.get(self.next_shard)?.clone();
            self.next_shard += 1;
            match open_shard(&path, &self.opts) {
                Ok(s) => self.current = Some(s),
                Err(reason) => {
                    let shard = path.display().to_string();
                    self.stats.finish_shard(ShardStats {
                        shard: shard.clone(),
                        good: 0,
                        bad: 1,
                        bytes: 0,
                        ended_early: Some(reason.clone()),
                    });
                    let item = Err(SampleError {
                        shard,
                        key: String::new(),
                        reason,
                    });
                    self.stats.count(&item);
                    return Some(item);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_key_matches_webdataset() {
        assert_eq!(split_key("000001.jpg"), Some(("000001", "jpg")));
        assert_eq!(
            split_key("a/b/000001.seg.PNG"),
            Some(("a/b/000001", "seg.PNG"))
        );
        assert_eq!(split_key("a.b/c.d"), Some(("a.b/c", "d")));
        assert_eq!(split_key("dir/file"), None);
        assert_eq!(split_key("a.b/c"), None);
        assert_eq!(split_key("noext"), None);
        assert_eq!(split_key(".hidden"), None);
        // Python: re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", "dir/.hidden.txt").groups()
        assert_eq!(split_key("dir/.hidden.txt"), Some(("dir/", "hidden.txt")));
        assert_eq!(split_key("a.d/.h.txt"), None);
        assert_eq!(split_key("k."), Some(("k", "")));
        assert_eq!(split_key("x/y/.z.t"), Some(("x/y/", "z.t")));
        assert_eq!(split_key("/.h.txt"), Some(("/", "h.txt")));
        assert_eq!(split_key("a//.h.txt"), Some(("a//", "h.txt")));
    }

    #[test]
    fn meta_names() {
        assert!(is_meta_name("__key__"));
        assert!(is_meta_name("__index__/x.json"));
        assert!(!is_meta_name("__a.txt"));
        assert!(!is_meta_name("a/__key__"));
    }
}
