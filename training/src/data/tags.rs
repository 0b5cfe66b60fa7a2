//! Short-tag classification targets: the tag vocabulary built over the training shards in one
//! streaming pass, and the sparse (CSR) multi-hot targets of a batch.

use crate::error::TrainError;
use hq_data::shards::{
    open_shard, read_parallel, Annotations, ImageCheck, ParallelOptions, ReadOptions, ReadStats,
};
use hq_data::text::tags::{TagCounter, TagVocab};

use std::path::PathBuf;

/// The paper's default vocabulary size K.
pub const DEFAULT_TAG_VOCAB_SIZE: usize = 10_000;

/// What the counting pass saw.
#[derive(Debug, Clone)]
pub struct TagCountReport {
    pub counter: TagCounter,
    /// Samples with refined texts (whose positive tags were counted).
    pub samples_with_tags: u64,
    pub read: ReadStats,
}

/// Count the normalised positive tags of every sample with refined texts in `shards` (one pass,
/// `threads` reader threads, 0 = one per core). Images are not decoded; bad samples are skipped
/// (they are in `read`).
pub fn count_tags(shards: &[PathBuf], threads: usize) -> TagCountReport {
    let opts = ReadOptions {
        image_check: ImageCheck::None,
        ..ReadOptions::default()
    };
    let mut reader = read_parallel(
        shards.to_vec(),
        opts,
        ParallelOptions {
            threads,
            capacity: 1024,
        },
    );
    let mut counter = TagCounter::new();
    let mut with_tags = 0;
    for sample in reader.by_ref().flatten() {
        if let Some(r) = &sample.refined {
            counter.add_sample(&r.tags_positive);
            with_tags += 1;
        }
    }
    TagCountReport {
        counter,
        samples_with_tags: with_tags,
        read: reader.stats().clone(),
    }
}

/// [`count_tags`] with side-car annotations joined first (the tags the loader will see): one
/// shard per task on `threads` threads (0: one per core), so only the open shards' annotations are
/// in memory.
pub fn count_tags_with(
    shards: &[PathBuf],
    annotations: Option<&Annotations>,
    threads: usize,
) -> Result<TagCountReport, TrainError> {
    let Some(ann) = annotations else {
        return Ok(count_tags(shards, threads));
    };
    use rayon::prelude::*;
    let opts = ReadOptions {
        image_check: ImageCheck::None,
        ..ReadOptions::default()
    };
    let mut b = rayon::ThreadPoolBuilder::new();
    if threads > 0 {
        b = b.num_threads(threads);
    }
    let pool = b
        .build()
        .map_err(|e| TrainError::DataLoader(format!("cannot start the tag-count pool: {e}")))?;
    let parts: Vec<(TagCounter, u64, u64, u64)> = pool.install(|| {
        shards
            .par_iter()
            .map(|shard| {
                let mut counter = TagCounter::new();
                let (mut with_tags, mut good, mut bad) = (0, 0, 0);
                let mut sa = ann.for_shard(shard);
                match open_shard(shard, &opts) {
                    Ok(stream) => {
                        for item in stream {
                            match item {
                                Ok(mut s) => {
                                    good += 1;
                                    sa.attach(&mut s);
                                    if let Some(r) = &s.refined {
                                        counter.add_sample(&r.tags_positive);
                                        with_tags += 1;
                                    }
                                }
                                Err(_) => bad += 1,
                            }
                        }
                    }
                    Err(_) => bad += 1,
                }
                (counter, with_tags, good, bad)
            })
            .collect()
    });
    let mut counter = TagCounter::new();
    let mut read = ReadStats::default();
    let mut with_tags = 0;
    for ((c, w, good, bad), shard) in parts.into_iter().zip(shards) {
        counter.merge(c);
        with_tags += w;
        read.good += good;
        read.bad += bad;
        read.shards.push(hq_data::shards::ShardStats {
            shard: shard.display().to_string(),
            good,
            bad,
            ..Default::default()
        });
    }
    Ok(TagCountReport {
        counter,
        samples_with_tags: with_tags,
        read,
    })
}

/// [`build_tag_vocab`] over the samples as joined with `annotations`.
pub fn build_tag_vocab_with(
    shards: &[PathBuf],
    annotations: Option<&Annotations>,
    top_k: usize,
    threads: usize,
) -> Result<TagVocab, TrainError> {
    let report = count_tags_with(shards, annotations, threads)?;
    vocab_of(report, shards.len(), top_k)
}

/// The K most frequent positive tags over `shards` (see [`count_tags`]). Fails when no sample
/// carries refined texts.
pub fn build_tag_vocab(
    shards: &[PathBuf],
    top_k: usize,
    threads: usize,
) -> Result<TagVocab, TrainError> {
    vocab_of(count_tags(shards, threads), shards.len(), top_k)
}

fn vocab_of(report: TagCountReport, shards: usize, top_k: usize) -> Result<TagVocab, TrainError> {
    if report.samples_with_tags == 0 {
        return Err(TrainError::DataLoader(format!(
            "cannot build a tag vocabulary: none of the {} samples in {} shard(s) has refined texts",
            report.read.samples(),
            shards
        )));
    }
    Ok(report.counter.top_k(top_k))
}

/// Rows of class indices as CSR: `offsets` (len rows + 1, starting at 0) and `indices`.
pub fn tag_csr<R: AsRef<[u32]>>(rows: &[R]) -> (Vec<i64>, Vec<i64>) {
    let mut offsets = Vec::with_capacity(rows.len() + 1);
    let mut indices = Vec::new();
    offsets.push(0);
    for r in rows {
        indices.extend(r.as_ref().iter().map(|&i| i as i64));
        offsets.push(indices.len() as i64);
    }
    (offsets, indices)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_layout() {
        let (o, i) = tag_csr(&[vec![1u32, 5], vec![], vec![0]]);
        assert_eq!(o, vec![0, 2, 2, 3]);
        assert_eq!(i, vec![1, 5, 0]);
        let (o, i) = tag_csr::<Vec<u32>>(&[]);
        assert_eq!((o, i), (vec![0], vec![]));
    }
}
