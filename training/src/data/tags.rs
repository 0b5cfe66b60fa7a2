//! Short-tag classification targets: the tag vocabulary built over the training shards in one
//! streaming pass, and the sparse (CSR) multi-hot targets of a batch.

use crate::error::TrainError;
use hq_data::shards::{read_parallel, ImageCheck, ParallelOptions, ReadOptions, ReadStats};
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

/// The K most frequent positive tags over `shards` (see [`count_tags`]). Fails when no sample
/// carries refined texts.
pub fn build_tag_vocab(
    shards: &[PathBuf],
    top_k: usize,
    threads: usize,
) -> Result<TagVocab, TrainError> {
    let report = count_tags(shards, threads);
    if report.samples_with_tags == 0 {
        return Err(TrainError::DataLoader(format!(
            "cannot build a tag vocabulary: none of the {} samples in {} shard(s) has refined texts",
            report.read.samples(),
            shards.len()
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
