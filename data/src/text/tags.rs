//! Tag vocabularies for Short-Tag Classification: normalise the recaptioner's positive tags, count
//! them over a whole dataset in one streaming pass, keep the K most frequent, save and load the
//! vocabulary, and map a sample's tags to sorted, de-duplicated class indices (the sparse
//! multi-hot target the STC loss takes).

use crate::atomic::AtomicFile;
use crate::error::{DataError, Result};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;

/// First line of a saved vocabulary; the version lets a later format be told apart.
const VOCAB_HEADER: &str = "# hq-clip tag vocabulary v1: rank<TAB>count<TAB>tag";

/// Normalise a tag: lower-case, every run of characters other than letters, digits, `'`, `-` and
/// `&` becomes one space, trimmed. "  Red-Circle. " and "red-circle" are the same tag; a tag
/// with nothing left (punctuation only) is `None`.
pub fn normalize_tag(tag: &str) -> Option<String> {
    let mut out = String::with_capacity(tag.len());
    let mut pending_space = false;
    for c in tag.chars().flat_map(char::to_lowercase) {
        if c.is_alphanumeric() || matches!(c, '\'' | '-' | '&') {
            if pending_space && !out.is_empty() {
                out.push(' ');
            }
            pending_space = false;
            out.push(c);
        } else {
            pending_space = true;
        }
    }
    let out = out
        .trim_matches(|c| matches!(c, '\'' | '-' | '&'))
        .to_string();
    (!out.is_empty()).then_some(out)
}

/// Tag counts over a dataset. Counters from parallel workers merge with [`TagCounter::merge`].
#[derive(Debug, Default, Clone)]
pub struct TagCounter {
    counts: HashMap<String, u64>,
    samples: u64,
}

impl TagCounter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Count one sample's tags; a tag repeated within a sample counts once.
    pub fn add_sample<S: AsRef<str>>(&mut self, tags: &[S]) {
        self.samples += 1;
        let mut seen: Vec<String> = tags
            .iter()
            .filter_map(|t| normalize_tag(t.as_ref()))
            .collect();
        seen.sort_unstable();
        seen.dedup();
        for t in seen {
            *self.counts.entry(t).or_insert(0) += 1;
        }
    }

    pub fn merge(&mut self, other: TagCounter) {
        self.samples += other.samples;
        for (t, c) in other.counts {
            *self.counts.entry(t).or_insert(0) += c;
        }
    }

    pub fn samples(&self) -> u64 {
        self.samples
    }

    pub fn distinct(&self) -> usize {
        self.counts.len()
    }

    /// The K most frequent tags; ties broken by the tag text so the result is deterministic.
    pub fn top_k(&self, k: usize) -> TagVocab {
        let mut all: Vec<(&String, &u64)> = self.counts.iter().collect();
        all.sort_unstable_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
        all.truncate(k);
        TagVocab::from_entries(all.into_iter().map(|(t, c)| (t.clone(), *c)).collect())
    }
}

/// A fixed vocabulary of K tags; index = rank by frequency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagVocab {
    entries: Vec<(String, u64)>,
    index: HashMap<String, u32>,
}

impl TagVocab {
    fn from_entries(entries: Vec<(String, u64)>) -> Self {
        let index = entries
            .iter()
            .enumerate()
            .map(|(i, (t, _))| (t.clone(), i as u32))
            .collect();
        TagVocab { entries, index }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// (tag, count) by rank.
    pub fn entries(&self) -> &[(String, u64)] {
        &self.entries
    }

    pub fn get(&self, tag: &str) -> Option<u32> {
        normalize_tag(tag).and_then(|t| self.index.get(&t).copied())
    }

    /// Sorted, de-duplicated class indices of the tags that are in the vocabulary.
    pub fn indices<S: AsRef<str>>(&self, tags: &[S]) -> Vec<u32> {
        let mut idx: Vec<u32> = tags.iter().filter_map(|t| self.get(t.as_ref())).collect();
        idx.sort_unstable();
        idx.dedup();
        idx
    }

    /// Save as a small text file (atomically): a header, then `rank<TAB>count<TAB>tag` lines.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let mut f = AtomicFile::create(path)?;
        let mut body = String::with_capacity(self.entries.len() * 24);
        body.push_str(VOCAB_HEADER);
        body.push('\n');
        for (i, (t, c)) in self.entries.iter().enumerate() {
            body.push_str(&format!("{i}\t{c}\t{t}\n"));
        }
        f.write_all(body.as_bytes())
            .map_err(|e| DataError::io(path, e))?;
        f.commit()
    }

    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bad = |reason: String| DataError::Vocab {
            path: path.to_path_buf(),
            reason,
        };
        let file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
        let mut lines = BufReader::new(file).lines();
        match lines.next() {
            Some(Ok(h)) if h == VOCAB_HEADER => {}
            _ => return Err(bad(format!("missing header line {VOCAB_HEADER:?}"))),
        }
        let mut entries = Vec::new();
        for (n, line) in lines.enumerate() {
            let line = line.map_err(|e| DataError::io(path, e))?;
            let lineno = n + 2;
            let mut parts = line.splitn(3, '\t');
            let (rank, count, tag) = match (parts.next(), parts.next(), parts.next()) {
                (Some(r), Some(c), Some(t)) => (r, c, t),
                _ => return Err(bad(format!("line {lineno}: expected rank, count and tag"))),
            };
            if rank.parse::<usize>().ok() != Some(entries.len()) {
                return Err(bad(format!("line {lineno}: rank {rank:?} out of sequence")));
            }
            let count = count
                .parse::<u64>()
                .map_err(|_| bad(format!("line {lineno}: bad count {count:?}")))?;
            if normalize_tag(tag).as_deref() != Some(tag) {
                return Err(bad(format!("line {lineno}: tag {tag:?} is not normalised")));
            }
            entries.push((tag.to_string(), count));
        }
        let vocab = Self::from_entries(entries);
        if vocab.index.len() != vocab.entries.len() {
            return Err(bad("duplicate tags".into()));
        }
        Ok(vocab)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation_merges_spelling_variants() {
        assert_eq!(
            normalize_tag("  Red-Circle. ").as_deref(),
            Some("red-circle")
        );
        assert_eq!(
            normalize_tag("Paver   PATIO").as_deref(),
            Some("paver patio")
        );
        assert_eq!(normalize_tag("fire_pit!").as_deref(), Some("fire pit"));
        assert_eq!(normalize_tag("Rock & Roll").as_deref(), Some("rock & roll"));
        assert_eq!(normalize_tag(" ... "), None);
        assert_eq!(normalize_tag("Éclair").as_deref(), Some("éclair"));
    }

    #[test]
    fn top_k_is_by_count_then_text_and_maps_indices() {
        let mut a = TagCounter::new();
        a.add_sample(&["sky", "Sea", "sea"]);
        a.add_sample(&["sky", "cliff"]);
        let mut b = TagCounter::new();
        b.add_sample(&["SKY", "sea", "boat"]);
        a.merge(b);
        assert_eq!(a.samples(), 3);
        let v = a.top_k(3);
        let tags: Vec<&str> = v.entries().iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(tags, vec!["sky", "sea", "boat"]);
        assert_eq!(v.entries()[0].1, 3);
        assert_eq!(v.indices(&["Sea", "unknown", "sky", "sky."]), vec![0, 1]);
    }

    #[test]
    fn save_load_round_trip_and_rejects_damage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tags.tsv");
        let mut c = TagCounter::new();
        for i in 0..50 {
            c.add_sample(&[format!("tag {}", i % 7), "common".to_string()]);
        }
        let v = c.top_k(5);
        v.save(&path).expect("save");
        assert_eq!(TagVocab::load(&path).expect("load"), v);

        std::fs::write(&path, "0\t3\tsky\n").expect("write");
        assert!(TagVocab::load(&path).is_err(), "no header");
        std::fs::write(&path, format!("{VOCAB_HEADER}\n0\t3\tsky\n2\t1\tsea\n")).expect("write");
        let err = TagVocab::load(&path).expect_err("gap in ranks").to_string();
        assert!(err.contains("line 3"), "{err}");
    }
}
