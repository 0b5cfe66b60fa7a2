//! Reading several shards at once: worker threads each take the next unread shard, read it
//! sequentially, and feed a bounded crossbeam channel; the consumer iterates the channel. Samples of
//! one shard keep their order; shards interleave. Dropping the reader early stops the workers.

use super::reader::{open_shard, ReadOptions, ReadStats, SampleResult, ShardStats};
use crate::error::SampleError;
use crossbeam_channel::{bounded, Receiver};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Parallelism settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParallelOptions {
    /// Worker threads; 0 means one per available core. Never more than there are shards.
    pub threads: usize,
    /// Items the channel holds before workers wait (bounds memory).
    pub capacity: usize,
}

impl Default for ParallelOptions {
    fn default() -> Self {
        ParallelOptions {
            threads: 0,
            capacity: 1024,
        }
    }
}

enum Msg {
    Item(SampleResult),
    ShardDone(ShardStats),
}

/// Iterator over the samples of many shards read by worker threads.
pub struct ParallelReader {
    rx: Option<Receiver<Msg>>,
    workers: Vec<JoinHandle<()>>,
    stats: ReadStats,
}

/// Start reading `shards` on worker threads.
pub fn read_parallel(
    shards: Vec<PathBuf>,
    opts: ReadOptions,
    par: ParallelOptions,
) -> ParallelReader {
    let threads = if par.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        par.threads
    };
    let threads = threads.min(shards.len()).max(1);
    let (tx, rx) = bounded::<Msg>(par.capacity.max(1));
    let shards = Arc::new(shards);
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::with_capacity(threads);
    for i in 0..threads {
        let wtx = tx.clone();
        let shards = Arc::clone(&shards);
        let next = Arc::clone(&next);
        let opts = opts.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("hq-shard-reader-{i}"))
            .spawn(move || loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let Some(path) = shards.get(n) else {
                    return;
                };
                let stats = match open_shard(path, &opts) {
                    Ok(mut samples) => {
                        for item in samples.by_ref() {
                            if wtx.send(Msg::Item(item)).is_err() {
                                return; // consumer gone
                            }
                        }
                        samples.into_stats()
                    }
                    Err(reason) => {
                        let shard = path.display().to_string();
                        let e = SampleError {
                            shard: shard.clone(),
                            key: String::new(),
                            reason: reason.clone(),
                        };
                        if wtx.send(Msg::Item(Err(e))).is_err() {
                            return;
                        }
                        ShardStats {
                            shard,
                            good: 0,
                            bad: 1,
                            bytes: 0,
                            ended_early: Some(reason),
                        }
                    }
                };
                if wtx.send(Msg::ShardDone(stats)).is_err() {
                    return;
                }
            });
        match spawned {
            Ok(h) => workers.push(h),
            Err(e) => {
                // Could not start a thread: the ones already running do all the work; with none,
                // report it as an error item rather than hang.
                if workers.is_empty() {
                    let _ = tx.send(Msg::Item(Err(SampleError {
                        shard: String::new(),
                        key: String::new(),
                        reason: format!("cannot start a reader thread: {e}"),
                    })));
                }
                break;
            }
        }
    }
    drop(tx);
    ParallelReader {
        rx: Some(rx),
        workers,
        stats: ReadStats::default(),
    }
}

impl ParallelReader {
    /// Counts so far; complete once the iterator has returned `None`.
    pub fn stats(&self) -> &ReadStats {
        &self.stats
    }
}

impl Iterator for ParallelReader {
    type Item = SampleResult;

    fn next(&mut self) -> Option<SampleResult> {
        loop {
            let msg = self.rx.as_ref()?.recv();
            match msg {
                Ok(Msg::Item(item)) => {
                    self.stats.count(&item);
                    return Some(item);
                }
                Ok(Msg::ShardDone(s)) => self.stats.finish_shard(s),
                Err(_) => {
                    // Every worker has finished.
                    self.rx = None;
                    for h in self.workers.drain(..) {
                        let _ = h.join();
                    }
                    return None;
                }
            }
        }
    }
}

impl Drop for ParallelReader {
    fn drop(&mut self) {
        // Closing the channel makes every blocked worker's send fail, so they stop.
        self.rx = None;
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}
