//! The CLIP tokenizer, producing exactly the ids of open_clip's `SimpleTokenizer` /
//! `open_clip.tokenize` (open_clip 3.3.0, default `clean="lower"`, context length 77).
//!
//! Pipeline, step for step as open_clip does it:
//! 1. clean-up ([`super::clean::clip_clean`]): ftfy `fix_text`, `html.unescape` twice, strip,
//!    whitespace collapse, Python `lower()`;
//! 2. pre-tokenisation with open_clip's pattern
//!    `<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+`
//!    (regex module, IGNORECASE; characters no alternative matches are dropped, as `findall` does);
//! 3. byte-level mapping of each piece (GPT-2's `bytes_to_unicode`);
//! 4. BPE with the `tokenizers` crate's [`BPE`] model: vocabulary = 256 byte characters, their
//!    `</w>` forms, the first 48,894 merges of `bpe_simple_vocab_16e6.txt.gz`, then
//!    `<start_of_text>` (49406) and `<end_of_text>` (49407): 49,408 ids; end-of-word suffix `</w>`.
//!    A piece that is literally `<start_of_text>` / `<end_of_text>` maps to the special id.
//! 5. `[49406] + ids + [49407]`; [`ClipTokenizer::tokenize`] cuts to the context length keeping
//!    the end token last, and pads with 0.
//!
//! The vocabulary file ships in `data/assets/` and is embedded in the binary
//! ([`ClipTokenizer::from_bundled`]). It comes from OpenAI's CLIP repository (MIT License,
//! Copyright (c) 2021 OpenAI) by way of open_clip (MIT License).
//!
//! Parity with open_clip is checked by `tests/tests/tokenizer_parity.rs` against the Python
//! package on generated adversarial strings.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use rayon::prelude::*;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::Model;

use super::clean::tables::{PRETOK_FOLDS, PRETOK_LETTER, PRETOK_NUMBER, PRETOK_SKIP};
use crate::error::{DataError, Result};

/// The vocabulary file, as shipped by OpenAI CLIP and open_clip.
static BUNDLED_BPE_GZ: &[u8] = include_bytes!("../../assets/bpe_simple_vocab_16e6.txt.gz");

/// open_clip's `DEFAULT_CONTEXT_LENGTH`.
pub const DEFAULT_CONTEXT_LENGTH: usize = 77;
/// Number of ids: 512 byte tokens + 48,894 merges + 2 special tokens.
pub const VOCAB_SIZE: usize = 49_408;
/// Number of merges open_clip reads from the file (`49152 - 256 - 2`).
const NUM_MERGES: usize = 49_152 - 256 - 2;
/// Words whose BPE result is remembered before the cache starts over.
const WORD_CACHE_CAPACITY: usize = 1 << 18;
const START_OF_TEXT: &str = "<start_of_text>";
const END_OF_TEXT: &str = "<end_of_text>";

/// open_clip's CLIP tokenizer (see the module docs). Cheap to share between threads; all methods
/// take `&self`.
pub struct ClipTokenizer {
    bpe: BPE,
    /// id -> token string (byte-level characters, `</w>` suffixes, special tokens).
    decoder: Vec<String>,
    /// byte -> the character that stands for it in the vocabulary.
    byte_encoder: [char; 256],
    /// character (code point below 512) -> byte; `None` for characters outside the alphabet.
    byte_decoder: Vec<Option<u8>>,
    sot: u32,
    eot: u32,
    context_length: usize,
    /// Identifies this tokenizer's word caches (see [`WORD_CACHES`]).
    cache_id: u64,
}

/// byte-level word -> its BPE ids. The BPE model's own cache is shared behind a lock and hands
/// out owned token strings; this one is per thread, so batch encoding scales without contention.
type WordCache = HashMap<Box<str>, Box<[u32]>, BuildHasherDefault<FxHasher>>;

/// Word caches kept per thread, at most this many tokenizers' (oldest dropped first).
const CACHES_PER_THREAD: usize = 4;

static NEXT_CACHE_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// This thread's word caches, by tokenizer `cache_id`.
    static WORD_CACHES: RefCell<Vec<(u64, WordCache)>> = const { RefCell::new(Vec::new()) };
}

/// A small fast hasher for the word cache (the Firefox / rustc "Fx" hash).
#[derive(Default)]
struct FxHasher(u64);

impl FxHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w) ^ ((rest.len() as u64) << 56));
        }
    }
    fn write_u8(&mut self, i: u8) {
        self.add(i as u64);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab_size", &self.decoder.len())
            .field("context_length", &self.context_length)
            .finish()
    }
}

/// GPT-2's reversible byte -> printable character map, in open_clip's order: the printable
/// Latin-1 bytes map to themselves, the other 68 bytes to U+0100 onwards. Returns the map and the
/// order of its values (the first 256 vocabulary entries).
fn bytes_to_unicode() -> ([char; 256], Vec<char>) {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xa1..=0xac)
        .chain(0xae..=0xff)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut map = ['\0'; 256];
    let mut order = Vec::with_capacity(256);
    for (&b, &c) in bs.iter().zip(&cs) {
        let ch = char::from_u32(c).unwrap_or('\0');
        map[b as usize] = ch;
        order.push(ch);
    }
    (map, order)
}

impl ClipTokenizer {
    /// The tokenizer with the vocabulary embedded in this crate (open_clip's default).
    pub fn from_bundled() -> Result<Self> {
        Self::from_bpe_bytes(BUNDLED_BPE_GZ)
    }

    /// Load a `bpe_simple_vocab_16e6.txt.gz`-style file (gzip, or plain text if not gzipped).
    pub fn from_bpe_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
        Self::from_bpe_bytes(&bytes)
    }

    /// Build from the bytes of a merges file (gzip-compressed or plain UTF-8).
    pub fn from_bpe_bytes(bytes: &[u8]) -> Result<Self> {
        let text = if bytes.starts_with(&[0x1f, 0x8b]) {
            let mut s = String::new();
            flate2::read::GzDecoder::new(bytes)
                .read_to_string(&mut s)
                .map_err(|e| {
                    DataError::Tokenizer(format!("cannot decompress the BPE file: {e}"))
                })?;
            s
        } else {
            String::from_utf8(bytes.to_vec())
                .map_err(|e| DataError::Tokenizer(format!("BPE file is not UTF-8: {e}")))?
        };
        Self::from_merges_text(&text)
    }

    fn from_merges_text(text: &str) -> Result<Self> {
        // open_clip: merges = lines[1 : 49152-256-2+1], each split on whitespace.
        let lines: Vec<&str> = text.split('\n').skip(1).take(NUM_MERGES).collect();
        if lines.len() < NUM_MERGES {
            return Err(DataError::Tokenizer(format!(
                "BPE file has {} merges, open_clip needs {NUM_MERGES}",
                lines.len()
            )));
        }
        let mut merges: Merges = Vec::with_capacity(NUM_MERGES);
        for (i, line) in lines.iter().enumerate() {
            let mut parts = line.split_whitespace();
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) => merges.push((a.to_string(), b.to_string())),
                _ => {
                    return Err(DataError::Tokenizer(format!(
                        "BPE file line {}: expected two symbols, got {line:?}",
                        i + 2
                    )))
                }
            }
        }

        let (byte_encoder, order) = bytes_to_unicode();
        let mut decoder: Vec<String> = Vec::with_capacity(VOCAB_SIZE);
        decoder.extend(order.iter().map(|c| c.to_string()));
        decoder.extend(order.iter().map(|c| format!("{c}</w>")));
        decoder.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        decoder.push(START_OF_TEXT.to_string());
        decoder.push(END_OF_TEXT.to_string());
        // Python's dict(zip(vocab, range(...))): a repeated string keeps its last id.
        let vocab: Vocab = decoder
            .iter()
            .enumerate()
            .map(|(i, s)| (s.clone(), i as u32))
            .collect();
        let sot = (decoder.len() - 2) as u32;
        let eot = (decoder.len() - 1) as u32;

        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .end_of_word_suffix("</w>".to_string())
            .cache_capacity(0)
            .build()
            .map_err(|e| DataError::Tokenizer(format!("cannot build the BPE model: {e}")))?;

        let mut byte_decoder = vec![None; 512];
        for (b, &c) in byte_encoder.iter().enumerate() {
            if let Some(slot) = byte_decoder.get_mut(c as usize) {
                *slot = Some(b as u8);
            }
        }
        Ok(Self {
            bpe,
            decoder,
            byte_encoder,
            byte_decoder,
            sot,
            eot,
            context_length: DEFAULT_CONTEXT_LENGTH,
            cache_id: NEXT_CACHE_ID.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// The same tokenizer with another context length for [`tokenize`](Self::tokenize)
    /// (open_clip's `context_length`; must be at least 1).
    pub fn with_context_length(mut self, context_length: usize) -> Result<Self> {
        if context_length == 0 {
            return Err(DataError::Tokenizer(
                "context length must be at least 1".to_string(),
            ));
        }
        self.context_length = context_length;
        Ok(self)
    }

    /// The context length [`tokenize`](Self::tokenize) pads or truncates to.
    pub fn context_length(&self) -> usize {
        self.context_length
    }

    /// Number of ids (49,408 for the CLIP vocabulary).
    pub fn vocab_size(&self) -> usize {
        self.decoder.len()
    }

    /// Id of `<start_of_text>` (49406).
    pub fn sot_token_id(&self) -> u32 {
        self.sot
    }

    /// Id of `<end_of_text>` (49407).
    pub fn eot_token_id(&self) -> u32 {
        self.eot
    }

    /// open_clip's text clean-up alone (what BPE sees, before pre-tokenisation).
    pub fn clean(text: &str) -> String {
        super::clean::clip_clean(text)
    }

    /// Token ids of `text`: `[<start_of_text>, ..., <end_of_text>]`, neither truncated nor padded.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let cleaned = super::clean::clip_clean(text);
        let mut ids = Vec::with_capacity(cleaned.len() / 3 + 4);
        ids.push(self.sot);
        self.with_word_cache(|cache| -> Result<()> {
            let mut word = String::new();
            for piece in pre_tokenize(&cleaned) {
                if piece == START_OF_TEXT {
                    ids.push(self.sot);
                    continue;
                }
                if piece == END_OF_TEXT {
                    ids.push(self.eot);
                    continue;
                }
                let symbols: &str = if piece.bytes().all(|b| (b'!'..=b'~').contains(&b)) {
                    piece
                } else {
                    word.clear();
                    word.extend(piece.bytes().map(|b| self.byte_encoder[b as usize]));
                    &word
                };
                self.bpe_word(cache, symbols, &mut ids)?;
            }
            Ok(())
        })?;
        ids.push(self.eot);
        Ok(ids)
    }

    /// Run `f` with this thread's word cache for this tokenizer (a throwaway one if the thread's
    /// caches are unavailable).
    fn with_word_cache<R>(&self, mut f: impl FnMut(&mut WordCache) -> R) -> R {
        let from_thread = WORD_CACHES.try_with(|cell| {
            let mut caches = cell.try_borrow_mut().ok()?;
            let idx = match caches.iter().position(|(id, _)| *id == self.cache_id) {
                Some(i) => i,
                None => {
                    if caches.len() >= CACHES_PER_THREAD {
                        caches.remove(0);
                    }
                    caches.push((self.cache_id, WordCache::default()));
                    caches.len() - 1
                }
            };
            Some(f(&mut caches[idx].1))
        });
        match from_thread {
            Ok(Some(r)) => r,
            _ => f(&mut WordCache::default()),
        }
    }

    /// Append the BPE ids of one byte-level word, through the cache.
    fn bpe_word(&self, cache: &mut WordCache, symbols: &str, ids: &mut Vec<u32>) -> Result<()> {
        if let Some(hit) = cache.get(symbols) {
            ids.extend_from_slice(hit);
            return Ok(());
        }
        let tokens = self
            .bpe
            .tokenize(symbols)
            .map_err(|e| DataError::Tokenizer(format!("BPE failed on {symbols:?}: {e}")))?;
        let start = ids.len();
        ids.extend(tokens.iter().map(|t| t.id));
        if cache.len() >= WORD_CACHE_CAPACITY {
            cache.clear();
        }
        cache.insert(symbols.into(), ids[start..].into());
        Ok(())
    }

    /// open_clip's `tokenize` for one text: [`encode`](Self::encode), cut to the context length
    /// with `<end_of_text>` as the last kept id, then padded with 0.
    pub fn tokenize(&self, text: &str) -> Result<Vec<i64>> {
        let ids = self.encode(text)?;
        Ok(self.fit(&ids))
    }

    fn fit(&self, ids: &[u32]) -> Vec<i64> {
        let n = self.context_length;
        let mut out = vec![0i64; n];
        if ids.len() > n {
            for (o, &id) in out.iter_mut().zip(&ids[..n]) {
                *o = id as i64;
            }
            out[n - 1] = self.eot as i64;
        } else {
            for (o, &id) in out.iter_mut().zip(ids) {
                *o = id as i64;
            }
        }
        out
    }

    /// [`tokenize`](Self::tokenize) over many texts in parallel (rayon); one row per text.
    pub fn tokenize_batch<S: AsRef<str> + Sync>(&self, texts: &[S]) -> Result<Vec<Vec<i64>>> {
        texts
            .par_iter()
            .map(|t| self.tokenize(t.as_ref()))
            .collect()
    }

    /// [`tokenize_batch`](Self::tokenize_batch) as one row-major `texts.len() x context_length`
    /// buffer (the layout of open_clip's `[N, 77]` LongTensor).
    pub fn tokenize_batch_flat<S: AsRef<str> + Sync>(&self, texts: &[S]) -> Result<Vec<i64>> {
        let n = self.context_length;
        let mut out = vec![0i64; texts.len() * n];
        out.par_chunks_mut(n.max(1))
            .zip(texts.par_iter())
            .try_for_each(|(row, t)| -> Result<()> {
                let ids = self.encode(t.as_ref())?;
                row.copy_from_slice(&self.fit(&ids));
                Ok(())
            })?;
        Ok(out)
    }

    /// open_clip's `decode`: concatenate the token strings, map the byte characters back to bytes,
    /// decode UTF-8 with replacement characters, and turn each `</w>` into a space. Padding ids (0)
    /// are not skipped, exactly like open_clip (id 0 is `!`).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            let token = self
                .decoder
                .get(id as usize)
                .ok_or_else(|| DataError::Tokenizer(format!("unknown token id {id}")))?;
            for c in token.chars() {
                let byte = self.byte_decoder.get(c as usize).copied().flatten();
                bytes.push(byte.ok_or_else(|| {
                    DataError::Tokenizer(format!(
                        "token {id} ({token:?}) has a character outside the byte alphabet"
                    ))
                })?);
            }
        }
        Ok(String::from_utf8_lossy(&bytes).replace("</w>", " "))
    }
}

/// Class of a character for open_clip's pattern (measured from the regex module).
#[derive(Clone, Copy, PartialEq, Eq)]
enum CharClass {
    /// `[\p{L}]`
    Letter,
    /// `[\p{N}]`
    Number,
    /// `[^\s\p{L}\p{N}]`
    Other,
    /// matches nothing: dropped by `findall`
    Skip,
}

fn char_class(c: char) -> CharClass {
    if c.is_ascii() {
        return match c {
            'a'..='z' | 'A'..='Z' => CharClass::Letter,
            '0'..='9' => CharClass::Number,
            '\t'..='\r' | ' ' => CharClass::Skip,
            _ => CharClass::Other,
        };
    }
    let cp = c as u32;
    let within = |t: &[(u32, u32)]| {
        t.binary_search_by(|&(lo, hi)| {
            if hi < cp {
                std::cmp::Ordering::Less
            } else if lo > cp {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        })
        .is_ok()
    };
    if within(PRETOK_LETTER) {
        CharClass::Letter
    } else if within(PRETOK_NUMBER) {
        CharClass::Number
    } else if within(PRETOK_SKIP) {
        CharClass::Skip
    } else {
        CharClass::Other
    }
}

/// Does `c` match the pattern literal `lit` under IGNORECASE?
fn literal_eq(c: char, lit: char) -> bool {
    c == lit
        || c.to_ascii_lowercase() == lit
        || PRETOK_FOLDS
            .iter()
            .any(|&(l, alts)| l == lit && alts.contains(&(c as u32)))
}

/// Length in bytes of `lit` matched case-insensitively at the start of `s`.
fn match_literal(s: &str, lit: &str) -> Option<usize> {
    let mut chars = s.char_indices();
    for l in lit.chars() {
        let (_, c) = chars.next()?;
        if !literal_eq(c, l) {
            return None;
        }
    }
    Some(chars.next().map_or(s.len(), |(i, _)| i))
}

/// Byte length of the run of `class` characters at the start of `s`.
fn run_length(s: &str, class: CharClass) -> usize {
    // ASCII prefix byte by byte, then character by character.
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() && bytes[i].is_ascii() {
        if char_class(bytes[i] as char) != class {
            return i;
        }
        i += 1;
    }
    s[i..]
        .char_indices()
        .find(|&(_, x)| char_class(x) != class)
        .map_or(s.len(), |(j, _)| i + j)
}

/// open_clip's `re.findall(pat, text)`: leftmost alternatives in pattern order at each position.
fn pre_tokenize(text: &str) -> impl Iterator<Item = &str> {
    const LITERALS: [&str; 9] = [
        START_OF_TEXT,
        END_OF_TEXT,
        "'s",
        "'t",
        "'re",
        "'ve",
        "'m",
        "'ll",
        "'d",
    ];
    let mut pos = 0;
    std::iter::from_fn(move || loop {
        let rest = &text[pos..];
        let c = rest.chars().next()?;
        if c == '<' || c == '\'' {
            if let Some(len) = LITERALS.iter().find_map(|lit| match_literal(rest, lit)) {
                pos += len;
                return Some(&rest[..len]);
            }
        }
        let class = char_class(c);
        let len = match class {
            CharClass::Skip => {
                pos += c.len_utf8();
                continue;
            }
            CharClass::Number => c.len_utf8(),
            CharClass::Letter | CharClass::Other => run_length(rest, class),
        };
        pos += len;
        return Some(&rest[..len]);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok() -> ClipTokenizer {
        match ClipTokenizer::from_bundled() {
            Ok(t) => t,
            Err(e) => panic!("bundled tokenizer: {e}"),
        }
    }

    #[test]
    fn known_ids() -> Result<()> {
        let t = tok();
        assert_eq!(t.vocab_size(), VOCAB_SIZE);
        assert_eq!((t.sot_token_id(), t.eot_token_id()), (49406, 49407));
        assert_eq!(
            t.encode("a photo of a cat")?,
            vec![49406, 320, 1125, 539, 320, 2368, 49407]
        );
        assert_eq!(
            t.encode("  A PHOTO   of a\tcat! ")?,
            vec![49406, 320, 1125, 539, 320, 2368, 256, 49407]
        );
        // Special tokens written in the text are recognised, as open_clip's pattern does.
        assert_eq!(t.encode("<start_of_text>")?, vec![49406, 49406, 49407]);
        Ok(())
    }

    #[test]
    fn empty_string_is_start_end_then_padding() -> Result<()> {
        let t = tok();
        let row = t.tokenize("")?;
        assert_eq!(row.len(), 77);
        assert_eq!(&row[..2], &[49406, 49407]);
        assert!(row[2..].iter().all(|&x| x == 0));
        assert_eq!(t.tokenize(" \n\t ")?, row);
        Ok(())
    }

    #[test]
    fn truncation_keeps_end_token() -> Result<()> {
        let t = tok();
        let long = "cat ".repeat(200);
        let row = t.tokenize(&long)?;
        assert_eq!(row.len(), 77);
        assert_eq!(row[0], 49406);
        assert_eq!(row[76], 49407);
        assert!(row[1..76].iter().all(|&x| x == 2368));
        let short = t.with_context_length(5)?;
        assert_eq!(
            short.tokenize("a photo of a cat")?,
            vec![49406, 320, 1125, 539, 49407]
        );
        Ok(())
    }

    #[test]
    fn batch_matches_single_and_decode_round_trips() -> Result<()> {
        let t = tok();
        let texts = ["a dog", "Ünïcödé caf\u{e9}", "", "日本語のテキスト 🐱"];
        let batch = t.tokenize_batch(&texts)?;
        let flat = t.tokenize_batch_flat(&texts)?;
        for (i, text) in texts.iter().enumerate() {
            assert_eq!(batch[i], t.tokenize(text)?);
            assert_eq!(&flat[i * 77..(i + 1) * 77], &batch[i][..]);
        }
        let ids = t.encode("a photo of a café 🐱")?;
        assert_eq!(t.decode(&ids[1..ids.len() - 1])?, "a photo of a café 🐱 ");
        assert!(t.decode(&[60_000]).is_err());
        Ok(())
    }
}
