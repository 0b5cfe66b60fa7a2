//! The deterministic, resumable sample stream of one worker for one epoch: shard split, shard
//! order, reader threads interleaved round-robin, and the shuffle buffer.
//!
//! - **Worker split**: worker `rank` of `world_size` takes shards `rank, rank + world_size, ...` of
//!   the expanded shard list ([`worker_shards`]).
//! - **Shard order**: each epoch permutes the worker's shards with a generator keyed by (seed,
//!   epoch) ([`epoch_shard_order`]); reader `r` of `k` reads positions `r, r + k, ...` of that
//!   order, sequentially, on its own thread feeding a bounded channel.
//! - **Interleave**: the stream takes one item from reader 0, 1, ..., k-1, 0, ... (finished
//!   readers are passed over). This is deterministic, unlike first-come interleaving.
//! - **Shuffle buffer** of `buffer_size` good samples (webdataset-style): before each draw the
//!   buffer is topped up from the interleaved readers, then the draw takes slot
//!   `uniform(0..len)` (a generator keyed by (seed, epoch, draw number)) and swap-removes it. At
//!   the end of the epoch the buffer drains. Size 0 or 1 keeps the read order.
//! - **Annotations**: with side-car annotations configured, each reader joins its open shard's
//!   annotations onto the samples as it reads them (`hq_data::shards::annotations`); a sample
//!   carries whether it got one to the batcher, which counts joined / missing exactly (and
//!   resumably). Orphans, bad annotation records and missing files are counted per process in an
//!   [`AnnotationLog`] when a shard is opened or finished.
//! - **Bad records** from the readers (damaged shards, missing members, unreadable shards) never
//!   enter the buffer; they ride along with the next draw so they are counted in order.
//!
//! # Position
//! [`StreamState`] is the position between two draws: the epoch, draws made, the round-robin
//! pointer, each reader's (shard slot, items consumed in that shard), and the positions of the
//! buffered samples (reader, slot, item). Restoring re-reads, for each reader, from its oldest
//! buffered item to its saved position (no image decoding; at most a few shards when the buffer
//! is much smaller than a shard), rebuilds the buffer in its saved order, and continues; every
//! later draw is then the same as in the uninterrupted run.

use super::{derive_rng, RngPurpose};
use crate::error::TrainError;
use crossbeam_channel::{bounded, Receiver};
use hq_data::shards::reader::ShardStream;
use hq_data::shards::{
    open_shard, AnnotationCounts, Annotations, ReadOptions, SampleResult, ShardAnnotations,
};
use hq_data::{Sample, SampleError};
use rand::seq::SliceRandom;
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Whether a sample got a side-car annotation (`None`: no annotations configured).
pub(crate) type Annotated = Option<bool>;

/// Per-process counts of the annotation problems found when shards are opened (bad records,
/// missing files) and finished (orphans), and the first few of them logged to stderr. Each shard
/// counts once per process (the next epoch re-reads it without counting again); after a resume the
/// shards read again are counted again.
#[derive(Debug, Default)]
pub struct AnnotationLog {
    opened: std::sync::Mutex<std::collections::HashSet<PathBuf>>,
    finished: std::sync::Mutex<std::collections::HashSet<PathBuf>>,
    orphan: AtomicU64,
    bad_records: AtomicU64,
    missing_files: AtomicU64,
    logged: AtomicU64,
    max_logged: u64,
}

impl AnnotationLog {
    pub fn new(max_logged: usize) -> Self {
        AnnotationLog {
            max_logged: max_logged as u64,
            ..Default::default()
        }
    }

    /// Orphan, bad-record and missing-file counts so far (joined and missing are the loader's).
    pub fn counts(&self) -> AnnotationCounts {
        AnnotationCounts {
            orphan: self.orphan.load(Ordering::Relaxed),
            bad_records: self.bad_records.load(Ordering::Relaxed),
            missing_files: self.missing_files.load(Ordering::Relaxed),
            ..Default::default()
        }
    }

    fn log(&self, what: &str) {
        let n = self.logged.fetch_add(1, Ordering::Relaxed);
        if n < self.max_logged {
            eprintln!("hq-train data: annotations: {what}");
            if n + 1 == self.max_logged {
                eprintln!(
                    "hq-train data: annotations: {n} problems logged; further ones are only \
                     counted (metrics: annotations)",
                    n = n + 1
                );
            }
        }
    }

    /// True the first time `shard` is passed for `set`.
    fn first(set: &std::sync::Mutex<std::collections::HashSet<PathBuf>>, shard: &Path) -> bool {
        // A poisoned lock only means another reader panicked; that panic is reported anyway.
        match set.lock() {
            Ok(mut s) => s.insert(shard.to_path_buf()),
            Err(p) => p.into_inner().insert(shard.to_path_buf()),
        }
    }

    fn opened(&self, shard: &Path, sa: &ShardAnnotations) {
        if !Self::first(&self.opened, shard) {
            return;
        }
        if sa.missing_file {
            self.missing_files.fetch_add(1, Ordering::Relaxed);
        }
        self.bad_records
            .fetch_add(sa.bad_records(), Ordering::Relaxed);
        for e in &sa.errors {
            self.log(&e.to_string());
        }
    }

    fn finished(&self, shard: &Path, sa: &ShardAnnotations) {
        if !Self::first(&self.finished, shard) {
            return;
        }
        let orphans = sa.orphans();
        if !orphans.is_empty() {
            self.orphan
                .fetch_add(orphans.len() as u64, Ordering::Relaxed);
            let ex: Vec<&str> = orphans.iter().take(5).map(String::as_str).collect();
            self.log(&format!(
                "{}: {} annotation(s) match no sample of the shard, e.g. {}",
                shard.display(),
                orphans.len(),
                ex.join(", ")
            ));
        }
    }
}

/// The side-car join of one stream.
#[derive(Debug, Clone)]
pub(crate) struct JoinCtx {
    pub annotations: Arc<Annotations>,
    pub log: Arc<AnnotationLog>,
}

/// Where an item sits in an epoch's stream: (reader, shard slot of that reader, item index within
/// the shard, bad records included).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ItemPos(pub u32, pub u32, pub u64);

/// A reader's progress: the slot of the shard it last took an item from and how many items of
/// that shard have been taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ReaderPos {
    pub slot: u32,
    pub consumed: u64,
}

/// The stream's position between two draws (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamState {
    pub epoch: u64,
    /// Draws made so far in this epoch.
    pub drawn: u64,
    /// Reader the round-robin asks next.
    pub next_reader: u32,
    pub readers: Vec<ReaderPos>,
    /// Buffered samples, in buffer order.
    pub buffer: Vec<ItemPos>,
}

impl StreamState {
    /// The start of `epoch` with `readers` readers.
    pub fn start(epoch: u64, readers: usize) -> Self {
        StreamState {
            epoch,
            drawn: 0,
            next_reader: 0,
            readers: vec![ReaderPos::default(); readers],
            buffer: Vec::new(),
        }
    }
}

/// Worker `rank` of `world_size`: shards `rank, rank + world_size, ...`.
pub fn worker_shards(all: &[PathBuf], rank: usize, world_size: usize) -> Vec<PathBuf> {
    all.iter()
        .skip(rank)
        .step_by(world_size.max(1))
        .cloned()
        .collect()
}

/// The worker's shards in the order epoch `epoch` reads them.
pub fn epoch_shard_order(shards: &[PathBuf], seed: u64, epoch: u64, shuffle: bool) -> Vec<PathBuf> {
    let mut order = shards.to_vec();
    if shuffle {
        let mut rng = derive_rng(seed, epoch, 0, RngPurpose::ShardOrder);
        order.shuffle(&mut rng);
    }
    order
}

/// Reader `r` of `k`: positions `r, r + k, ...` of the epoch's shard order.
fn reader_lists(order: &[PathBuf], k: usize) -> Vec<Arc<Vec<PathBuf>>> {
    (0..k)
        .map(|r| Arc::new(order.iter().skip(r).step_by(k).cloned().collect()))
        .collect()
}

enum SlotState {
    NotOpened,
    Open(Box<ShardStream>),
    Finished,
}

/// Sequential items of one reader's shards, with their positions.
pub(crate) struct ShardCursor {
    reader: u32,
    shards: Arc<Vec<PathBuf>>,
    slot: usize,
    index: u64,
    state: SlotState,
    opts: ReadOptions,
    join: Option<JoinCtx>,
    /// The open shard's annotations.
    current: Option<ShardAnnotations>,
}

impl ShardCursor {
    fn new(
        reader: u32,
        shards: Arc<Vec<PathBuf>>,
        opts: ReadOptions,
        join: Option<JoinCtx>,
    ) -> Self {
        ShardCursor {
            reader,
            shards,
            slot: 0,
            index: 0,
            state: SlotState::NotOpened,
            opts,
            join,
            current: None,
        }
    }

    /// (slot, items taken from it).
    fn position(&self) -> (usize, u64) {
        (self.slot, self.index)
    }

    /// Go to item `skip` of slot `slot` by reading past the items before it.
    fn seek(&mut self, slot: usize, skip: u64) -> Result<(), String> {
        self.slot = slot;
        self.index = 0;
        self.state = SlotState::NotOpened;
        self.current = None;
        for _ in 0..skip {
            match self.next_item() {
                Some((pos, _, _)) if pos.1 as usize == slot => {}
                _ => {
                    let name = self
                        .shards
                        .get(slot)
                        .map_or("?".to_string(), |p| p.display().to_string());
                    return Err(format!(
                        "shard {name} has fewer than {skip} records now; the shards changed \
                         since the state was saved"
                    ));
                }
            }
        }
        Ok(())
    }

    fn next_item(&mut self) -> Option<ReaderItem> {
        loop {
            let path = self.shards.get(self.slot)?;
            match &mut self.state {
                SlotState::NotOpened => match open_shard(path, &self.opts) {
                    Ok(s) => {
                        self.state = SlotState::Open(Box::new(s));
                        if let Some(j) = &self.join {
                            let sa = j.annotations.for_shard(path);
                            j.log.opened(path, &sa);
                            self.current = Some(sa);
                        }
                    }
                    Err(reason) => {
                        self.state = SlotState::Finished;
                        let pos = ItemPos(self.reader, self.slot as u32, self.index);
                        self.index += 1;
                        let e = SampleError {
                            shard: path.display().to_string(),
                            key: String::new(),
                            reason,
                        };
                        return Some((pos, Err(e), None));
                    }
                },
                SlotState::Open(s) => match s.next() {
                    Some(item) => {
                        let pos = ItemPos(self.reader, self.slot as u32, self.index);
                        self.index += 1;
                        let (item, annotated) = match (item, self.current.as_mut()) {
                            (Ok(mut sample), Some(sa)) => {
                                let got = sa.attach(&mut sample);
                                (Ok(sample), Some(got))
                            }
                            (item, _) => (item, None),
                        };
                        return Some((pos, item, annotated));
                    }
                    None => {
                        self.state = SlotState::Finished;
                        if let (Some(j), Some(sa)) = (&self.join, self.current.take()) {
                            j.log.finished(path, &sa);
                        }
                    }
                },
                SlotState::Finished => {
                    self.slot += 1;
                    self.index = 0;
                    self.state = SlotState::NotOpened;
                }
            }
        }
    }
}

type ReaderItem = (ItemPos, SampleResult, Annotated);

struct ReaderHandle {
    rx: Option<Receiver<ReaderItem>>,
    thread: Option<JoinHandle<()>>,
    done: bool,
}

/// One draw from the shuffle buffer.
pub(crate) struct Drawn {
    /// Draw number within the epoch (keys the sample's augmentation and text generators).
    pub draw: u64,
    pub sample: Sample,
    /// The shard the sample came from.
    pub shard: PathBuf,
    /// Bad records the readers produced since the previous draw.
    pub errors: Vec<SampleError>,
    pub annotated: Annotated,
}

/// Settings of a stream.
#[derive(Debug, Clone)]
pub(crate) struct StreamConfig {
    pub seed: u64,
    pub shuffle_shards: bool,
    pub buffer_size: usize,
    pub readers: usize,
    pub reader_capacity: usize,
    pub read_opts: ReadOptions,
    pub join: Option<JoinCtx>,
}

/// One epoch of one worker's stream (see the module docs).
pub(crate) struct EpochStream {
    seed: u64,
    epoch: u64,
    buffer_size: usize,
    lists: Vec<Arc<Vec<PathBuf>>>,
    readers: Vec<ReaderHandle>,
    positions: Vec<ReaderPos>,
    next_reader: usize,
    buffer: Vec<(ItemPos, Sample, Annotated)>,
    drawn: u64,
    pending_errors: Vec<SampleError>,
}

impl EpochStream {
    /// Open the stream at `state` (use [`StreamState::start`] for a fresh epoch).
    pub fn open(
        cfg: &StreamConfig,
        worker: &[PathBuf],
        state: &StreamState,
    ) -> Result<Self, TrainError> {
        let k = cfg.readers.min(worker.len()).max(1);
        if state.readers.len() != k {
            return Err(TrainError::LoaderState(format!(
                "the state has {} readers, this loader {k}",
                state.readers.len()
            )));
        }
        if state.next_reader as usize >= k {
            return Err(TrainError::LoaderState(format!(
                "round-robin pointer {} is out of range for {k} readers",
                state.next_reader
            )));
        }
        let order = epoch_shard_order(worker, cfg.seed, state.epoch, cfg.shuffle_shards);
        let lists = reader_lists(&order, k);
        // Buffered items per reader.
        let mut wanted: Vec<Vec<ItemPos>> = vec![Vec::new(); k];
        for p in &state.buffer {
            let r = p.0 as usize;
            if r >= k {
                return Err(TrainError::LoaderState(format!(
                    "buffered item {p:?} names reader {r} of {k}"
                )));
            }
            wanted[r].push(*p);
        }
        let mut found: HashMap<ItemPos, (Sample, Annotated)> =
            HashMap::with_capacity(state.buffer.len());
        let mut readers = Vec::with_capacity(k);
        for (r, list) in lists.iter().enumerate() {
            let mut cursor = ShardCursor::new(
                r as u32,
                Arc::clone(list),
                cfg.read_opts.clone(),
                cfg.join.clone(),
            );
            let pos = state.readers[r];
            let target = (pos.slot as usize, pos.consumed);
            let want = &mut wanted[r];
            want.sort_unstable();
            if let Some(first) = want.first() {
                if (first.1 as usize, first.2) >= target {
                    return Err(TrainError::LoaderState(format!(
                        "buffered item {first:?} lies after reader {r}'s position {pos:?}"
                    )));
                }
                cursor
                    .seek(first.1 as usize, first.2)
                    .map_err(TrainError::LoaderState)?;
                let mut need = want.iter().copied().peekable();
                while cursor.position() != target {
                    let Some((p, item, annotated)) = cursor.next_item() else {
                        return Err(TrainError::LoaderState(format!(
                            "reader {r} ended before its saved position {pos:?}; the shards \
                             changed since the state was saved"
                        )));
                    };
                    if (p.1 as usize, p.2) >= target {
                        return Err(TrainError::LoaderState(format!(
                            "reader {r} passed its saved position {pos:?}; the shards changed"
                        )));
                    }
                    if need.peek() == Some(&p) {
                        need.next();
                        match item {
                            Ok(s) => {
                                found.insert(p, (s, annotated));
                            }
                            Err(e) => {
                                return Err(TrainError::LoaderState(format!(
                                    "buffered item {p:?} is now a bad record ({e}); the shards \
                                     changed"
                                )))
                            }
                        }
                    }
                }
            } else {
                cursor
                    .seek(target.0, target.1)
                    .map_err(TrainError::LoaderState)?;
            }
            readers.push(spawn_reader(r, cursor, cfg.reader_capacity)?);
        }
        let mut buffer = Vec::with_capacity(cfg.buffer_size.max(state.buffer.len()));
        for p in &state.buffer {
            let (s, a) = found.remove(p).ok_or_else(|| {
                TrainError::LoaderState(format!("buffered item {p:?} was not found again"))
            })?;
            buffer.push((*p, s, a));
        }
        Ok(EpochStream {
            seed: cfg.seed,
            epoch: state.epoch,
            buffer_size: cfg.buffer_size.max(1),
            lists,
            readers,
            positions: state.readers.clone(),
            next_reader: state.next_reader as usize,
            buffer,
            drawn: state.drawn,
            pending_errors: Vec::new(),
        })
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The position now (between draws). Only valid when no bad records are pending, which
    /// holds right after a draw.
    pub fn snapshot(&self) -> StreamState {
        StreamState {
            epoch: self.epoch,
            drawn: self.drawn,
            next_reader: self.next_reader as u32,
            readers: self.positions.clone(),
            buffer: self.buffer.iter().map(|(p, _, _)| *p).collect(),
        }
    }

    /// The next item of the round-robin interleave; `None` when every reader is done.
    fn pull(&mut self) -> Result<Option<ReaderItem>, TrainError> {
        let k = self.readers.len();
        for _ in 0..=k {
            let r = self.next_reader;
            let h = &mut self.readers[r];
            if !h.done {
                let got = h.rx.as_ref().and_then(|rx| rx.recv().ok());
                match got {
                    Some(item) => {
                        self.next_reader = (r + 1) % k;
                        self.positions[r] = ReaderPos {
                            slot: item.0 .1,
                            consumed: item.0 .2 + 1,
                        };
                        return Ok(Some(item));
                    }
                    None => {
                        h.done = true;
                        h.rx = None;
                        if let Some(t) = h.thread.take() {
                            if t.join().is_err() {
                                return Err(TrainError::DataLoader(format!(
                                    "shard reader thread {r} panicked"
                                )));
                            }
                        }
                    }
                }
            }
            self.next_reader = (r + 1) % k;
        }
        Ok(None)
    }

    /// Top up the buffer, then draw one sample; `None` at the end of the epoch.
    pub fn draw(&mut self) -> Result<Option<Drawn>, TrainError> {
        while self.buffer.len() < self.buffer_size {
            match self.pull()? {
                Some((p, Ok(s), a)) => self.buffer.push((p, s, a)),
                Some((_, Err(e), _)) => self.pending_errors.push(e),
                None => break,
            }
        }
        if self.buffer.is_empty() {
            return Ok(None);
        }
        let mut rng = derive_rng(self.seed, self.epoch, self.drawn, RngPurpose::Shuffle);
        let slot = rng.gen_range(0..self.buffer.len());
        let (pos, sample, annotated) = self.buffer.swap_remove(slot);
        let shard = self.lists[pos.0 as usize]
            .get(pos.1 as usize)
            .cloned()
            .unwrap_or_default();
        let d = Drawn {
            draw: self.drawn,
            sample,
            shard,
            errors: std::mem::take(&mut self.pending_errors),
            annotated,
        };
        self.drawn += 1;
        Ok(Some(d))
    }

    /// Bad records read after the last draw (at the end of the epoch).
    pub fn take_pending_errors(&mut self) -> Vec<SampleError> {
        std::mem::take(&mut self.pending_errors)
    }
}

impl Drop for EpochStream {
    fn drop(&mut self) {
        // Closing the channels makes blocked readers stop; then wait for them.
        for h in &mut self.readers {
            h.rx = None;
        }
        for h in &mut self.readers {
            if let Some(t) = h.thread.take() {
                let _ = t.join();
            }
        }
    }
}

fn spawn_reader(
    r: usize,
    mut cursor: ShardCursor,
    capacity: usize,
) -> Result<ReaderHandle, TrainError> {
    let (tx, rx) = bounded::<ReaderItem>(capacity.max(1));
    let thread = std::thread::Builder::new()
        .name(format!("hq-data-reader-{r}"))
        .spawn(move || {
            while let Some(item) = cursor.next_item() {
                if tx.send(item).is_err() {
                    return;
                }
            }
        })
        .map_err(|e| TrainError::DataLoader(format!("cannot start a shard reader thread: {e}")))?;
    Ok(ReaderHandle {
        rx: Some(rx),
        thread: Some(thread),
        done: false,
    })
}
