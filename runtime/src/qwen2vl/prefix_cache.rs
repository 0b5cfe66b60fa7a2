//! Key/value cache of prompt prefixes, shared across rows and calls (what vLLM calls automatic
//! prefix caching).
//!
//! Recaption prompts start with the same long text (instruction, format, one of a few exemplars)
//! and differ only from the alt-text and the image on. The decoder's keys and values at a position
//! depend only on the tokens up to it (causal attention) and their positions, and a text-only
//! prefix has the same M-RoPE positions (0, 1, ...) in every prompt, so the prefill of a prefix
//! seen before can start from its stored cache instead of position 0.
//!
//! Reuse is in whole prefill chunks (multiples of the engine's chunk length, counted from 0): the
//! chunks run after the reused part are then the very runs, on the very inputs, of a prefill
//! without the cache, so the generated tokens are bit-for-bit those of an uncached run. Only
//! prefixes made of plain token ids are stored: an image placeholder's embedding is the image's,
//! not its id's, so a prefix ends before the first image token.

/// One stored prefix: its token ids and, per `present.*` value, its cache `[heads, len, dim]`.
struct Entry {
    ids: Vec<i64>,
    values: Vec<Vec<f32>>,
    last_used: u64,
}

impl Entry {
    fn bytes(&self) -> usize {
        self.values.iter().map(|v| v.len() * 4).sum::<usize>() + self.ids.len() * 8
    }
}

/// The first `len` positions of a cache value `[heads, stored, dim]`, as `[heads, len, dim]`.
fn first_positions(value: &[f32], stored: usize, len: usize, dim: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(value.len() / stored * len);
    for head in value.chunks_exact(stored * dim) {
        out.extend_from_slice(&head[..len * dim]);
    }
    out
}

/// The cache: prefixes by longest match, evicted least-recently-used beyond a byte budget.
pub(crate) struct PrefixCache {
    entries: Vec<Entry>,
    budget: usize,
    used: usize,
    clock: u64,
    /// Head width of one value (its layout `[heads, len, dim]`).
    dim: usize,
}

impl PrefixCache {
    /// An empty cache holding at most `budget` bytes (0 disables it).
    pub(crate) fn new(budget: usize, dim: usize) -> Self {
        Self {
            entries: Vec::new(),
            budget,
            used: 0,
            clock: 0,
            dim,
        }
    }

    pub(crate) fn enabled(&self) -> bool {
        self.budget > 0
    }

    /// Forgets every entry (needed when the chunk length changes: reuse must stay chunk-aligned).
    pub(crate) fn clear(&mut self) {
        self.entries.clear();
        self.used = 0;
    }

    /// Bytes held.
    pub(crate) fn bytes(&self) -> usize {
        self.used
    }

    /// The longest stored prefix of `ids` usable for a row: at most `limit` tokens, a multiple of
    /// `chunk`. Returns its length and, per value, its cache `[heads, len, dim]` (0 and nothing
    /// when none).
    pub(crate) fn lookup(
        &mut self,
        ids: &[i64],
        limit: usize,
        chunk: usize,
    ) -> (usize, Vec<Vec<f32>>) {
        let mut best: Option<(usize, usize)> = None;
        for (e, entry) in self.entries.iter().enumerate() {
            let common = entry
                .ids
                .iter()
                .zip(ids)
                .take_while(|(a, b)| a == b)
                .count();
            let usable = common.min(limit) / chunk * chunk;
            if usable > 0 && best.is_none_or(|(_, len)| usable > len) {
                best = Some((e, usable));
            }
        }
        let Some((e, len)) = best else {
            return (0, Vec::new());
        };
        self.clock += 1;
        let entry = &mut self.entries[e];
        entry.last_used = self.clock;
        let (stored, dim) = (entry.ids.len(), self.dim);
        let values = entry
            .values
            .iter()
            .map(|v| first_positions(v, stored, len, dim))
            .collect();
        (len, values)
    }

    /// Stores the first `len` positions of a row's cache (`values`: per value `[heads, row_len,
    /// dim]`) under `ids[..len]`, unless an entry already covers that prefix. Evicts the least
    /// recently used entries to stay within the budget; a prefix larger than the budget is not
    /// stored.
    pub(crate) fn insert(&mut self, ids: &[i64], len: usize, row_len: usize, values: &[&[f32]]) {
        if len == 0 || !self.enabled() {
            return;
        }
        let ids = &ids[..len];
        if self
            .entries
            .iter()
            .any(|e| e.ids.len() >= len && e.ids[..len] == *ids)
        {
            return;
        }
        let values: Vec<Vec<f32>> = values
            .iter()
            .map(|v| first_positions(v, row_len, len, self.dim))
            .collect();
        self.clock += 1;
        let entry = Entry {
            ids: ids.to_vec(),
            values,
            last_used: self.clock,
        };
        let size = entry.bytes();
        if size > self.budget {
            return;
        }
        // A stored entry that is a prefix of the new one is now redundant.
        self.entries.retain(|e| {
            let covered = e.ids.len() <= len && ids[..e.ids.len()] == e.ids[..];
            if covered {
                self.used -= e.bytes();
            }
            !covered
        });
        while self.used + size > self.budget {
            let Some((oldest, _)) = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.last_used)
            else {
                break;
            };
            self.used -= self.entries.swap_remove(oldest).bytes();
        }
        self.used += size;
        self.entries.push(entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake row cache `[heads, len, dim]` whose entries encode (value, head, position, lane).
    fn row(value: usize, heads: usize, len: usize, dim: usize) -> Vec<f32> {
        let mut v = Vec::new();
        for h in 0..heads {
            for p in 0..len {
                for d in 0..dim {
                    v.push((value * 1_000_000 + h * 10_000 + p * 10 + d) as f32);
                }
            }
        }
        v
    }

    #[test]
    fn longest_chunk_aligned_prefix_is_returned_sliced_per_head() {
        let (heads, dim) = (2, 3);
        let mut c = PrefixCache::new(1 << 20, dim);
        let ids: Vec<i64> = (0..20).collect();
        let (a, b) = (row(0, heads, 20, dim), row(1, heads, 20, dim));
        c.insert(&ids, 16, 20, &[&a, &b]);
        // Shares 13 tokens: 12 usable with chunk 4, 8 with chunk 8, none with chunk 16.
        let mut other = ids[..13].to_vec();
        other.extend([99, 98, 97]);
        let (len, values) = c.lookup(&other, 100, 4);
        assert_eq!(len, 12);
        assert_eq!(values.len(), 2);
        let want: Vec<f32> = (0..heads)
            .flat_map(|h| {
                (0..12 * dim).map(move |k| (1_000_000 + h * 10_000 + k / dim * 10 + k % dim) as f32)
            })
            .collect();
        assert_eq!(values[1], want);
        assert_eq!(c.lookup(&other, 100, 8).0, 8);
        assert_eq!(c.lookup(&other, 100, 16).0, 0);
        // The row's own limit (its first image token) bounds the reuse.
        assert_eq!(c.lookup(&ids, 9, 4).0, 8);
        assert_eq!(c.lookup(&[5, 6, 7, 8], 100, 1).0, 0);
    }

    #[test]
    fn covered_prefixes_are_not_stored_twice_and_the_budget_evicts_lru() {
        let (heads, dim) = (1, 2);
        let size = |len: usize| len * heads * dim * 4 + len * 8;
        let mut c = PrefixCache::new(2 * size(8), dim);
        let v = row(0, heads, 8, dim);
        let a: Vec<i64> = (0..8).collect();
        c.insert(&a, 4, 8, &[&v]);
        c.insert(&a, 8, 8, &[&v]); // replaces the 4-token entry it extends
        assert_eq!(c.bytes(), size(8));
        c.insert(&a, 4, 8, &[&v]); // covered: nothing stored
        assert_eq!(c.bytes(), size(8));
        let b: Vec<i64> = (100..108).collect();
        c.insert(&b, 8, 8, &[&v]);
        assert_eq!(c.bytes(), 2 * size(8));
        assert_eq!(c.lookup(&a, 8, 1).0, 8); // a is now the most recent
        let d: Vec<i64> = (200..208).collect();
        c.insert(&d, 8, 8, &[&v]); // evicts b
        assert_eq!(c.lookup(&b, 8, 1).0, 0);
        assert_eq!(c.lookup(&a, 8, 1).0, 8);
        assert_eq!(c.lookup(&d, 8, 1).0, 8);
        let mut off = PrefixCache::new(0, dim);
        off.insert(&a, 8, 8, &[&v]);
        assert_eq!(off.lookup(&a, 8, 1).0, 0);
        c.clear();
        assert_eq!((c.bytes(), c.lookup(&a, 8, 1).0), (0, 0));
    }
}
