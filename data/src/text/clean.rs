//! open_clip's caption cleaning, reproduced exactly: `ftfy.fix_text` (ftfy 6.3.1, default
//! configuration), Python's `html.unescape`, and the `str` methods open_clip's `SimpleTokenizer`
//! applies (`strip`, `split`, `lower`).
//!
//! [`clip_clean`] is open_clip's default `clean="lower"` function:
//! `whitespace_clean(basic_clean(text)).lower()` where `basic_clean` is
//! `html.unescape(html.unescape(ftfy.fix_text(text))).strip()`.
//!
//! ftfy is a heuristic, so "exactly" means rule for rule: mojibake detection (`badness`), the
//! single-byte codecs it tries (and its "sloppy" variants, byte A0 restoration, lossy sequences,
//! CESU-8 / Java-null UTF-8 variants), embedded-mojibake repair, C1 controls, HTML entities (only
//! when the text has no `<`, the latch carrying over to later lines), terminal escapes, ligatures,
//! character width, curly quotes, line breaks, control characters and NFC, in ftfy's order and with
//! its line-by-line segmentation and fixed-point loop. Character data that Python takes from its
//! Unicode 14 database (lower-casing, whitespace, `re`'s `\w`/`\d`, what NFC may touch) is measured
//! from the reference and stored in the generated `tables` module
//! (`tests/python/tokenizer_gen_tables.py`), so newer Unicode in Rust's standard library does not
//! change the output.
//!
//! Not reproducible in Rust: lone UTF-16 surrogates (a Rust `str` cannot hold them, so
//! `fix_surrogates` has nothing to do). Where Python raises instead of returning (a decimal
//! character reference with more than 4,300 digits), the reference decodes to U+FFFD.

#[rustfmt::skip]
pub(crate) mod tables;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::OnceLock;

use tables::*;
use unicode_normalization::{is_nfc_quick, IsNormalized, UnicodeNormalization};

/// ftfy's `max_decode_length`: the longest segment (in code points) fixed in one piece.
const MAX_DECODE_LENGTH: usize = 1_000_000;

// ------------------------------------------------------------------------------------------
// open_clip's clean function and the Python string methods it uses
// ------------------------------------------------------------------------------------------

/// open_clip's default text clean-up (`clean="lower"`):
/// `whitespace_clean(basic_clean(text)).lower()`.
pub fn clip_clean(text: &str) -> String {
    python_lower(&whitespace_clean(&basic_clean(text)))
}

/// open_clip's `basic_clean`: `html.unescape(html.unescape(ftfy.fix_text(text))).strip()`.
pub fn basic_clean(text: &str) -> String {
    let fixed = fix_text(text);
    let once = html_unescape(&fixed);
    let twice = html_unescape(&once);
    python_strip(&twice).to_string()
}

/// open_clip's `whitespace_clean`: `" ".join(text.split()).strip()` with Python's notion of
/// whitespace (which, unlike Rust's, includes U+001C..U+001F).
pub fn whitespace_clean(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    if text.is_ascii() {
        let words = text
            .split(|c: char| matches!(c, '\t'..='\r' | '\x1c'..='\x1f' | ' '))
            .filter(|w| !w.is_empty());
        for word in words {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(word);
        }
        return out;
    }
    for word in text.split(is_py_space).filter(|w| !w.is_empty()) {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
    }
    out
}

/// Python's `str.isspace` for one character.
pub fn is_py_space(c: char) -> bool {
    if c.is_ascii() {
        matches!(
            c,
            '\t' | '\n' | '\x0b' | '\x0c' | '\r' | '\x1c'..='\x1f' | ' '
        )
    } else {
        PY_SPACE.binary_search(&(c as u32)).is_ok()
    }
}

/// Python's `str.strip()` (no arguments).
pub fn python_strip(text: &str) -> &str {
    text.trim_matches(is_py_space)
}

/// Python's `str.lower()`: full lower-case mappings of Unicode 14 and the Final_Sigma rule for
/// U+03A3, as CPython implements them.
pub fn python_lower(text: &str) -> String {
    if text.is_ascii() {
        return text.to_ascii_lowercase();
    }
    let mut out = String::with_capacity(text.len() + 8);
    for (i, c) in text.char_indices() {
        if c.is_ascii() {
            out.push(c.to_ascii_lowercase());
        } else if c == '\u{3a3}' {
            out.push(if is_final_sigma(text, i) { 'ς' } else { 'σ' });
        } else {
            match PY_LOWER.binary_search_by_key(&(c as u32), |&(k, _)| k) {
                Ok(k) => out.push_str(PY_LOWER[k].1),
                Err(_) => out.push(c),
            }
        }
    }
    out
}

/// CPython's `handle_capital_sigma`: U+03A3 at byte `i` is final when a cased letter precedes it
/// (skipping case-ignorable characters) and none follows it.
fn is_final_sigma(text: &str, i: usize) -> bool {
    let cased = |c: char| in_ranges(PY_CASED, c as u32);
    let ignorable = |c: char| in_ranges(PY_CASE_IGNORABLE, c as u32);
    let before = text[..i].chars().rev().find(|&c| !ignorable(c));
    if !before.is_some_and(cased) {
        return false;
    }
    let after = text[i + '\u{3a3}'.len_utf8()..]
        .chars()
        .find(|&c| !ignorable(c));
    !after.is_some_and(cased)
}

fn in_ranges(table: &[(u32, u32)], cp: u32) -> bool {
    table
        .binary_search_by(|&(lo, hi)| {
            if hi < cp {
                std::cmp::Ordering::Less
            } else if lo > cp {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        })
        .is_ok()
}

// ------------------------------------------------------------------------------------------
// Python's html.unescape
// ------------------------------------------------------------------------------------------

fn html5_lookup(name: &str) -> Option<&'static str> {
    HTML5
        .binary_search_by(|&(k, _)| k.cmp(name))
        .ok()
        .map(|i| HTML5[i].1)
}

/// Python's `html.unescape`: named references from the HTML5 table (including the legacy names
/// without `;`, matched by longest prefix), decimal and hexadecimal references with HTML5's
/// replacements for invalid code points.
pub fn html_unescape(text: &str) -> Cow<'_, str> {
    if !text.contains('&') {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let after = &rest[amp + 1..];
        match html_charref(after) {
            Some((consumed, replacement)) => {
                out.push_str(&replacement);
                rest = &after[consumed..];
            }
            None => {
                out.push('&');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    Cow::Owned(out)
}

/// Matches Python's `_charref` pattern after a `&` and returns (bytes consumed, replacement).
fn html_charref(s: &str) -> Option<(usize, Cow<'static, str>)> {
    let b = s.as_bytes();
    if b.first() == Some(&b'#') {
        // '#[0-9]+;?' then '#[xX][0-9a-fA-F]+;?'
        let digits = b[1..].iter().take_while(|c| c.is_ascii_digit()).count();
        if digits > 0 {
            let mut end = 1 + digits;
            let num = parse_saturating(&s[1..end], 10);
            if b.get(end) == Some(&b';') {
                end += 1;
            }
            return Some((end, numeric_charref(num)));
        }
        if matches!(b.get(1), Some(b'x' | b'X')) {
            let hex = b[2..].iter().take_while(|c| c.is_ascii_hexdigit()).count();
            if hex > 0 {
                let mut end = 2 + hex;
                let num = parse_saturating(&s[2..end], 16);
                if b.get(end) == Some(&b';') {
                    end += 1;
                }
                return Some((end, numeric_charref(num)));
            }
        }
        return None;
    }
    // '[^\t\n\f <&#;]{1,32};?'
    let mut end = 0;
    for (n, (i, c)) in s.char_indices().enumerate() {
        if n == 32 || matches!(c, '\t' | '\n' | '\x0c' | ' ' | '<' | '&' | '#' | ';') {
            break;
        }
        end = i + c.len_utf8();
    }
    if end == 0 {
        return None;
    }
    if b.get(end) == Some(&b';') {
        end += 1;
    }
    let name = &s[..end];
    if let Some(v) = html5_lookup(name) {
        return Some((end, Cow::Borrowed(v)));
    }
    // Longest prefix (at least two characters, shorter than the whole name) in the table.
    let bounds: Vec<usize> = name.char_indices().map(|(i, _)| i).collect();
    for x in (2..bounds.len()).rev() {
        let prefix = &name[..bounds[x]];
        if let Some(v) = html5_lookup(prefix) {
            let mut r = String::from(v);
            r.push_str(&name[bounds[x]..]);
            return Some((end, Cow::Owned(r)));
        }
    }
    Some((end, Cow::Owned(format!("&{name}"))))
}

fn parse_saturating(digits: &str, radix: u32) -> u64 {
    digits.chars().fold(0u64, |acc, c| {
        let d = c.to_digit(radix).unwrap_or(0) as u64;
        acc.saturating_mul(radix as u64)
            .saturating_add(d)
            .min(u64::MAX / 32)
    })
}

fn numeric_charref(num: u64) -> Cow<'static, str> {
    // html._invalid_charrefs
    match num {
        0 => return Cow::Borrowed("\u{fffd}"),
        0x0d => return Cow::Borrowed("\r"),
        0x80..=0x9f => {
            let c = sloppy_1252(num as u32);
            return Cow::Owned(c.to_string());
        }
        _ => {}
    }
    if (0xd800..=0xdfff).contains(&num) || num > 0x10ffff {
        return Cow::Borrowed("\u{fffd}");
    }
    let n = num as u32;
    let invalid = matches!(n, 0x1..=0x8 | 0xb | 0xe..=0x1f | 0x7f..=0x9f | 0xfdd0..=0xfdef)
        || (n & 0xfffe) == 0xfffe;
    if invalid {
        return Cow::Borrowed("");
    }
    match char::from_u32(n) {
        Some(c) => Cow::Owned(c.to_string()),
        None => Cow::Borrowed("\u{fffd}"),
    }
}

/// The character byte `b` (0x80..=0x9F) means in sloppy windows-1252 (what `html.unescape` and
/// ftfy's `fix_c1_controls` use).
fn sloppy_1252(cp: u32) -> char {
    let mapped = WINDOWS_1252_C1[(cp - 0x80) as usize];
    let v = if mapped == 0 { cp } else { mapped };
    char::from_u32(v).unwrap_or('\u{fffd}')
}

// ------------------------------------------------------------------------------------------
// ftfy.fix_text
// ------------------------------------------------------------------------------------------

/// `ftfy.fix_text(text)` with ftfy's default configuration.
///
/// The text is fixed line by line (segments end after each `\n`, and are cut every million code
/// points); HTML entities are decoded only until a segment containing `<` has been seen.
pub fn fix_text(text: &str) -> String {
    let mut unescape = true;
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        let mut rest = line;
        while !rest.is_empty() {
            let cut = if rest.len() <= MAX_DECODE_LENGTH {
                rest.len()
            } else {
                rest.char_indices()
                    .nth(MAX_DECODE_LENGTH)
                    .map_or(rest.len(), |(i, _)| i)
            };
            let segment = &rest[..cut];
            rest = &rest[cut..];
            if unescape && segment.contains('<') {
                unescape = false;
            }
            match fix_segment(segment, unescape) {
                Some(fixed) => out.push_str(&fixed),
                None => out.push_str(segment),
            }
        }
    }
    out
}

// What a text contains that some fixer acts on (one pass over the text).
const HAS_AMP: u32 = 1;
const HAS_NON_ASCII: u32 = 1 << 1;
const HAS_C1: u32 = 1 << 2;
const HAS_LIGATURE: u32 = 1 << 3;
const HAS_WIDE: u32 = 1 << 4;
const HAS_CURLY: u32 = 1 << 5;
const HAS_BREAK: u32 = 1 << 6;
const HAS_ESC: u32 = 1 << 7;
const HAS_CONTROL: u32 = 1 << 8;

fn scan(text: &str) -> u32 {
    const BYTE_MASK: [u16; 256] = {
        let mut t = [0u16; 256];
        let mut b = 0;
        while b < 256 {
            t[b] = match b as u8 {
                b'&' => HAS_AMP as u16,
                b'\r' => HAS_BREAK as u16,
                0x1b => (HAS_ESC | HAS_CONTROL) as u16,
                0x00..=0x08 | 0x0b | 0x0e..=0x1f | 0x7f => HAS_CONTROL as u16,
                0x80.. => HAS_NON_ASCII as u16,
                _ => 0,
            };
            b += 1;
        }
        t
    };
    let mut m = 0u32;
    for &b in text.as_bytes() {
        m |= BYTE_MASK[b as usize] as u32;
    }
    if m & HAS_NON_ASCII != 0 {
        for c in text.chars().filter(|c| !c.is_ascii()) {
            m |= match c {
                '\u{85}' => HAS_C1 | HAS_BREAK,
                '\u{80}'..='\u{9f}' => HAS_C1,
                '\u{2028}' | '\u{2029}' => HAS_BREAK,
                '\u{2bc}' | '\u{2018}'..='\u{201f}' => HAS_CURLY,
                '\u{3000}' | '\u{ff01}'..='\u{ffef}' => HAS_WIDE,
                c if ligature(c).is_some() => HAS_LIGATURE,
                c if is_removed_control(c) => HAS_CONTROL,
                _ => 0,
            };
        }
    }
    m
}

/// One of ftfy's fixers: the fixed text, or None when it leaves the text alone.
type Fixer = fn(&str) -> Option<String>;

/// ftfy's `fix_and_explain` for one segment: apply every fixer in order until nothing changes.
/// None when the segment is already fixed.
fn fix_segment(segment: &str, unescape: bool) -> Option<String> {
    let mut text: Option<String> = None;
    loop {
        // The pass repeats until the text is the same as before it, as ftfy compares them.
        let before = text.clone();
        let mut changed = false;
        let mut m = scan(text.as_deref().unwrap_or(segment));
        let steps: [(u32, Fixer); 9] = [
            (if unescape { HAS_AMP } else { 0 }, unescape_html),
            (HAS_NON_ASCII, fix_encoding_opt),
            (HAS_C1, fix_c1_controls),
            (HAS_LIGATURE, fix_latin_ligatures),
            (HAS_WIDE, fix_character_width),
            (HAS_CURLY, uncurl_quotes),
            (HAS_BREAK, fix_line_breaks),
            // (fix_surrogates: a Rust string cannot contain surrogates)
            (HAS_ESC, remove_terminal_escapes),
            (HAS_CONTROL, remove_control_chars),
        ];
        for (needs, fixer) in steps {
            if m & needs == 0 {
                continue;
            }
            let current = text.as_deref().unwrap_or(segment);
            if let Some(fixed) = fixer(current) {
                if fixed != current {
                    m = scan(&fixed);
                    text = Some(fixed);
                    changed = true;
                }
            }
        }
        if m & HAS_NON_ASCII != 0 {
            let current = text.as_deref().unwrap_or(segment);
            if let Some(fixed) = nfc_unicode14(current) {
                if fixed != current {
                    text = Some(fixed);
                    changed = true;
                }
            }
        }
        if !changed || text.as_deref().unwrap_or(segment) == before.as_deref().unwrap_or(segment) {
            return text;
        }
    }
}

/// ftfy's `unescape_html`: decode `&name;` for HTML5 names that end in `;` (plus all-caps forms of
/// some), and `&#...;` references that `html.unescape` decodes completely.
fn unescape_html(text: &str) -> Option<String> {
    if !text.contains('&') {
        return None;
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let tail = &rest[amp..];
        // '&#?[0-9A-Za-z]{1,24};'
        let b = tail.as_bytes();
        let start = if b.get(1) == Some(&b'#') { 2 } else { 1 };
        let run = b[start..]
            .iter()
            .take_while(|c| c.is_ascii_alphanumeric())
            .count();
        if (1..=24).contains(&run) && b.get(start + run) == Some(&b';') {
            let entity = &tail[..start + run + 1];
            out.push_str(&ftfy_entity(entity));
            rest = &tail[entity.len()..];
        } else {
            out.push('&');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    Some(out)
}

fn ftfy_entity(entity: &str) -> Cow<'_, str> {
    let name = &entity[1..];
    if let Some(v) = html5_lookup(name) {
        return Cow::Borrowed(v);
    }
    if let Ok(i) = FTFY_UPPER_ENTITIES.binary_search_by(|&(k, _)| k.cmp(name)) {
        return Cow::Borrowed(FTFY_UPPER_ENTITIES[i].1);
    }
    if entity.starts_with("&#") {
        let decoded = html_unescape(entity);
        if decoded.contains(';') {
            return Cow::Borrowed(entity);
        }
        return Cow::Owned(decoded.into_owned());
    }
    Cow::Borrowed(entity)
}

/// ftfy's `fix_c1_controls`: U+0080..U+009F become their (sloppy) windows-1252 characters.
fn fix_c1_controls(text: &str) -> Option<String> {
    map_chars(text, |c| is_c1(c).then(|| sloppy_1252(c as u32)))
}

fn is_c1(c: char) -> bool {
    ('\u{80}'..='\u{9f}').contains(&c)
}

/// The Latin ligatures and digraphs ftfy's `fix_latin_ligatures` takes apart.
fn ligature(c: char) -> Option<&'static str> {
    Some(match c {
        'Ĳ' => "IJ",
        'ĳ' => "ij",
        'ŉ' => "ʼn",
        'Ǳ' => "DZ",
        'ǲ' => "Dz",
        'ǳ' => "dz",
        'Ǆ' => "DŽ",
        'ǅ' => "Dž",
        'ǆ' => "dž",
        'Ǉ' => "LJ",
        'ǈ' => "Lj",
        'ǉ' => "lj",
        'Ǌ' => "NJ",
        'ǋ' => "Nj",
        'ǌ' => "nj",
        'ﬀ' => "ff",
        'ﬁ' => "fi",
        'ﬂ' => "fl",
        'ﬃ' => "ffi",
        'ﬄ' => "ffl",
        'ﬅ' => "ſt",
        'ﬆ' => "st",
        _ => return None,
    })
}

/// ftfy's `fix_latin_ligatures`.
fn fix_latin_ligatures(text: &str) -> Option<String> {
    map_str(text, ligature)
}

/// ftfy's `fix_character_width`: fullwidth ASCII, halfwidth katakana/hangul and U+3000 to their
/// standard forms.
fn fix_character_width(text: &str) -> Option<String> {
    map_str(text, |c| {
        let cp = c as u32;
        if cp == 0x3000 {
            return Some(" ");
        }
        if !(0xff01..=0xffef).contains(&cp) {
            return None;
        }
        WIDTH_MAP
            .binary_search_by_key(&cp, |&(k, _)| k)
            .ok()
            .map(|i| WIDTH_MAP[i].1)
    })
}

/// ftfy's `uncurl_quotes`.
fn uncurl_quotes(text: &str) -> Option<String> {
    map_chars(text, |c| match c {
        '\u{2bc}' | '\u{2018}'..='\u{201b}' => Some('\''),
        '\u{201c}'..='\u{201f}' => Some('"'),
        _ => None,
    })
}

/// ftfy's `fix_line_breaks`: CRLF, CR, U+2028, U+2029 and U+0085 become `\n`.
fn fix_line_breaks(text: &str) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {
                if chars.peek() == Some(&'\n') {
                    chars.next();
                }
                out.push('\n');
            }
            '\u{2028}' | '\u{2029}' | '\u{85}' => out.push('\n'),
            _ => out.push(c),
        }
    }
    Some(out)
}

/// ftfy's `remove_terminal_escapes`: `ESC [ (digits|;)* letter`, digits in Python's Unicode sense.
fn remove_terminal_escapes(text: &str) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(esc) = rest.find('\x1b') {
        out.push_str(&rest[..esc]);
        let tail = &rest[esc..];
        let mut len = None;
        if tail[1..].starts_with('[') {
            let mut end = 2;
            for c in tail[2..].chars() {
                if c == ';' || in_ranges(PY_RE_DIGIT, c as u32) {
                    end += c.len_utf8();
                } else {
                    if c.is_ascii_alphabetic() {
                        len = Some(end + 1);
                    }
                    break;
                }
            }
        }
        match len {
            Some(n) => rest = &tail[n..],
            None => {
                out.push('\x1b');
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    Some(out)
}

fn is_removed_control(c: char) -> bool {
    matches!(c,
        '\0'..='\x08' | '\x0b' | '\x0e'..='\x1f' | '\x7f'
        | '\u{206a}'..='\u{206f}' | '\u{feff}' | '\u{fff9}'..='\u{fffc}')
}

/// ftfy's `remove_control_chars`.
fn remove_control_chars(text: &str) -> Option<String> {
    Some(text.chars().filter(|&c| !is_removed_control(c)).collect())
}

/// Replace characters one for one; None when nothing changes.
fn map_chars(text: &str, f: impl Fn(char) -> Option<char>) -> Option<String> {
    let first = text.char_indices().find(|&(_, c)| f(c).is_some())?.0;
    let mut out = String::with_capacity(text.len());
    out.push_str(&text[..first]);
    out.extend(text[first..].chars().map(|c| f(c).unwrap_or(c)));
    Some(out)
}

/// Replace characters by strings; None when nothing changes.
fn map_str(text: &str, f: impl Fn(char) -> Option<&'static str>) -> Option<String> {
    let first = text.char_indices().find(|&(_, c)| f(c).is_some())?.0;
    let mut out = String::with_capacity(text.len() + 8);
    out.push_str(&text[..first]);
    for c in text[first..].chars() {
        match f(c) {
            Some(s) => out.push_str(s),
            None => out.push(c),
        }
    }
    Some(out)
}

/// NFC as Python 3.11 computes it: characters that Unicode 14 had not assigned are inert (no
/// decomposition, combining class 0), so they split the text into independently normalised runs.
/// None when the text is already in that form (by the quick check).
fn nfc_unicode14(text: &str) -> Option<String> {
    if text.is_ascii() || is_nfc_quick(text.chars()) == IsNormalized::Yes {
        return None;
    }
    let mut out = String::with_capacity(text.len());
    let mut run = 0;
    for (i, c) in text.char_indices() {
        if !in_ranges(UCD14_ASSIGNED, c as u32) {
            out.extend(text[run..i].nfc());
            out.push(c);
            run = i + c.len_utf8();
        }
    }
    out.extend(text[run..].nfc());
    Some(out)
}

// ------------------------------------------------------------------------------------------
// ftfy.fix_encoding: mojibake detection and repair
// ------------------------------------------------------------------------------------------

/// `ftfy.fix_encoding(text)`: repeat one step of mojibake repair until the text stops changing.
pub fn fix_encoding(text: &str) -> String {
    fix_encoding_opt(text).unwrap_or_else(|| text.to_string())
}

/// [`fix_encoding`], None when the text is left as it is.
fn fix_encoding_opt(text: &str) -> Option<String> {
    let mut fixed: Option<String> = None;
    loop {
        let current = fixed.as_deref().unwrap_or(text);
        match fix_encoding_step(current) {
            Some(next) if next != current => fixed = Some(next),
            _ => return fixed,
        }
    }
}

/// Code points below this have their mojibake classes in a direct lookup table.
const CLASS_TABLE_LEN: usize = 0x2600;

fn class_flags(c: char) -> u32 {
    static TABLE: OnceLock<Vec<u32>> = OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = vec![0u32; CLASS_TABLE_LEN];
        for &(cp, f) in MOJIBAKE_CLASSES {
            if let Some(slot) = t.get_mut(cp as usize) {
                *slot = f;
            }
        }
        t
    });
    let cp = c as usize;
    match table.get(cp) {
        Some(&f) => f,
        None => MOJIBAKE_CLASSES
            .binary_search_by_key(&(cp as u32), |&(k, _)| k)
            .map_or(0, |i| MOJIBAKE_CLASSES[i].1),
    }
}

/// ftfy's `is_bad`: does any of the `badness` patterns occur in `chars`?
pub fn is_bad(text: &str) -> bool {
    let chars: Vec<char> = text.chars().collect();
    is_bad_chars(&chars)
}

/// The class bits `BADNESS_RE` uses (not the UTF-8 detector's).
const BADNESS_CLASSES: u32 = CLS_UTF8_FIRST_OF_2 - 1;

fn is_bad_chars(chars: &[char]) -> bool {
    let flags: Vec<u32> = chars
        .iter()
        .map(|&c| class_flags(c) & BADNESS_CLASSES)
        .collect();
    if flags.iter().all(|&f| f == 0) {
        return false;
    }
    // Every alternative has a classed character among its first three.
    let near = |i: usize| flags[i..(i + 3).min(flags.len())].iter().any(|&f| f != 0);
    (0..chars.len()).any(|i| near(i) && bad_at(chars, &flags, i))
}

/// Does one of ftfy's `BADNESS_RE` alternatives match at position `i`?
fn bad_at(ch: &[char], fl: &[u32], i: usize) -> bool {
    const B: u32 = CLS_BAD;
    const LA: u32 = CLS_LOWER_ACCENTED;
    const UA: u32 = CLS_UPPER_ACCENTED;
    const BOX: u32 = CLS_BOX;
    const SP: u32 = CLS_START_PUNCTUATION;
    const EP: u32 = CLS_END_PUNCTUATION;
    const CUR: u32 = CLS_CURRENCY;
    const NUM: u32 = CLS_NUMERIC;
    const LAW: u32 = CLS_LAW;
    const LC: u32 = CLS_LOWER_COMMON;
    const UC: u32 = CLS_UPPER_COMMON;
    const C1: u32 = CLS_C1;
    let c = |k: usize| ch.get(i + k).copied();
    let f = |k: usize| fl.get(i + k).copied().unwrap_or(0);
    let is = |k: usize, set: &str| c(k).is_some_and(|x| set.contains(x));
    let lower_ascii = |k: usize| c(k).is_some_and(|x| x.is_ascii_lowercase());
    let alpha_ascii = |k: usize| c(k).is_some_and(|x| x.is_ascii_alphabetic());
    let space = |k: usize| c(k).is_some_and(is_py_space);
    let (f0, f1, f2) = (f(0), f(1), f(2));

    // [c1]
    f0 & C1 != 0
        // [bad lower_accented upper_accented box start end currency numeric law] [bad]
        || (f0 & (B | LA | UA | BOX | SP | EP | CUR | NUM | LAW) != 0 && f1 & B != 0)
        // [a-zA-Z] [lower_common upper_common] [bad]
        || (alpha_ascii(0) && f1 & (LC | UC) != 0 && f2 & B != 0)
        // [bad] [lower_accented upper_accented box start end currency numeric law]
        || (f0 & B != 0 && f1 & (LA | UA | BOX | SP | EP | CUR | NUM | LAW) != 0)
        // [lower_accented lower_common box end currency numeric] [upper_accented]
        || (f0 & (LA | LC | BOX | EP | CUR | NUM) != 0 && f1 & UA != 0)
        // [box end currency numeric] [lower_accented]
        || (f0 & (BOX | EP | CUR | NUM) != 0 && f1 & LA != 0)
        // [lower_accented box end] [currency]
        || (f0 & (LA | BOX | EP) != 0 && f1 & CUR != 0)
        // \s [upper_accented] [currency]
        || (space(0) && f1 & UA != 0 && f2 & CUR != 0)
        // [upper_accented box] [numeric law]
        || (f0 & (UA | BOX) != 0 && f1 & (NUM | LAW) != 0)
        // [lower_accented upper_accented box currency end] [start] [numeric]
        || (f0 & (LA | UA | BOX | CUR | EP) != 0 && f1 & SP != 0 && f2 & NUM != 0)
        // [lower_accented upper_accented currency numeric box law] [end] [start]
        || (f0 & (LA | UA | CUR | NUM | BOX | LAW) != 0 && f1 & EP != 0 && f2 & SP != 0)
        // [currency numeric box] [start]
        || (f0 & (CUR | NUM | BOX) != 0 && f1 & SP != 0)
        // [a-z] [upper_accented] [start currency]
        || (lower_ascii(0) && f1 & UA != 0 && f2 & (SP | CUR) != 0)
        // [box] [kaomoji]
        || (f0 & BOX != 0 && f1 & CLS_KAOMOJI != 0)
        // [lower_accented upper_accented currency numeric start end law] [box]
        || (f0 & (LA | UA | CUR | NUM | SP | EP | LAW) != 0 && f1 & BOX != 0)
        // [box] [end]
        || (f0 & BOX != 0 && f1 & EP != 0)
        // [lower_accented upper_accented] [start end] \w
        || (f0 & (LA | UA) != 0
            && f1 & (SP | EP) != 0
            && c(2).is_some_and(|x| in_ranges(PY_RE_WORD, x as u32)))
        // [Œœ][^A-Za-z]
        || (is(0, "Œœ") && c(1).is_some_and(|x| !x.is_ascii_alphabetic()))
        // [upper_accented]°
        || (f0 & UA != 0 && c(1) == Some('°'))
        // [ÂÃÎÐ][€œŠš¢£Ÿž\xa0\xad®©°·»{start}{end}–—´]
        || (is(0, "ÂÃÎÐ")
            && (is(1, "€œŠš¢£Ÿž\u{a0}\u{ad}®©°·»–—´") || f1 & (SP | EP) != 0))
        // × [²³]
        || (c(0) == Some('×') && is(1, "²³"))
        // [ØÙ] [common currency bad numeric start ŸŠ®°µ»] twice
        || (is(0, "ØÙ") && arabic_1252(c(1), f1) && is(2, "ØÙ") && arabic_1252(c(3), f(3)))
        // à[²µ¹¼½¾]
        || (c(0) == Some('à') && is(1, "²µ¹¼½¾"))
        // √[±∂†≠®™´≤≥¥µø]
        || (c(0) == Some('√') && is(1, "±∂†≠®™´≤≥¥µø"))
        // ≈[°¢]
        || (c(0) == Some('≈') && is(1, "°¢"))
        // ‚Ä[ìîïòôúùû†°¢π]
        || (c(0) == Some('‚') && c(1) == Some('Ä') && is(2, "ìîïòôúùû†°¢π"))
        // ‚[âó][àä°ê]
        || (c(0) == Some('‚') && is(1, "âó") && is(2, "àä°ê"))
        // вЂ
        || (c(0) == Some('в') && c(1) == Some('Ђ'))
        // [ВГРС][c1 bad start end currency °µ][ВГРС]
        || (is(0, "ВГРС")
            && (f1 & (C1 | B | SP | EP | CUR) != 0 || is(1, "°µ"))
            && is(2, "ВГРС"))
        // ГўВЂВ.[A-Za-z ]
        || (c(0) == Some('Г')
            && c(1) == Some('ў')
            && c(2) == Some('В')
            && c(3) == Some('Ђ')
            && c(4) == Some('В')
            && c(5).is_some_and(|x| x != '\n')
            && c(6).is_some_and(|x| x.is_ascii_alphabetic() || x == ' '))
        // Ã[\xa0¡]
        || (c(0) == Some('Ã') && is(1, "\u{a0}¡"))
        // [a-z]\s?[ÃÂ][ ]
        || (lower_ascii(0)
            && ((space(1) && is(2, "ÃÂ") && c(3) == Some(' '))
                || (is(1, "ÃÂ") && c(2) == Some(' '))))
        // ^[ÃÂ][ ]
        || (i == 0 && is(0, "ÃÂ") && c(1) == Some(' '))
        // [a-z.,?!{end}] Â [ {start}{end}]
        || ((lower_ascii(0) || is(0, ".,?!") || f0 & EP != 0)
            && c(1) == Some('Â')
            && (c(2) == Some(' ') || f2 & (SP | EP) != 0))
        // β€[™\xa0Ά\xad®°]
        || (c(0) == Some('β') && c(1) == Some('€') && is(2, "™\u{a0}Ά\u{ad}®°"))
        // [ΒΓΞΟ][c1 bad start end currency °][ΒΓΞΟ]
        || (is(0, "ΒΓΞΟ")
            && (f1 & (C1 | B | SP | EP | CUR) != 0 || c(1) == Some('°'))
            && is(2, "ΒΓΞΟ"))
        // ā€
        || (c(0) == Some('ā') && c(1) == Some('€'))
}

fn arabic_1252(c: Option<char>, f: u32) -> bool {
    c.is_some_and(|x| {
        f & (CLS_COMMON | CLS_CURRENCY | CLS_BAD | CLS_NUMERIC | CLS_START_PUNCTUATION) != 0
            || "ŸŠ®°µ»".contains(x)
    })
}

/// Reverse tables of ftfy's single-byte codecs: character -> byte, for 0x80..=0xFF and 0x1A.
fn charmap_encoders() -> &'static [HashMap<char, u8>] {
    static ENC: OnceLock<Vec<HashMap<char, u8>>> = OnceLock::new();
    ENC.get_or_init(|| {
        CHARMAPS
            .iter()
            .map(|(_, high, sub)| {
                let mut m = HashMap::with_capacity(129);
                for (i, &cp) in high.iter().enumerate() {
                    if let Some(c) = char::from_u32(cp) {
                        m.insert(c, 0x80 + i as u8);
                    }
                }
                if let Some(c) = char::from_u32(*sub) {
                    m.insert(c, 0x1a);
                }
                m
            })
            .collect()
    })
}

/// `text.encode(encoding)` for one of ftfy's single-byte codecs, or None when some character
/// has no byte (`possible_encoding` is false).
fn charmap_encode(text: &str, enc: &HashMap<char, u8>) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        if c.is_ascii() && c != '\x1a' {
            out.push(c as u8);
        } else {
            out.push(*enc.get(&c)?);
        }
    }
    Some(out)
}

/// One step of ftfy's `fix_encoding`; None when nothing applies.
fn fix_encoding_step(text: &str) -> Option<String> {
    if text.is_empty() || text.is_ascii() || !is_bad(text) {
        return None;
    }
    let mut latin1_possible = false;
    for ((name, _, _), enc) in CHARMAPS.iter().zip(charmap_encoders()) {
        let Some(mut bytes) = charmap_encode(text, enc) else {
            continue;
        };
        if *name == "latin-1" {
            latin1_possible = true;
        }
        if *name != "macroman" && altered_utf8_at_any(&bytes) {
            bytes = restore_byte_a0(&bytes);
        }
        if name.starts_with("sloppy") {
            bytes = replace_lossy_sequences(&bytes);
        }
        let decoded = if bytes.contains(&0xed) || bytes.contains(&0xc0) {
            decode_utf8_variants(&bytes)
        } else {
            String::from_utf8(bytes).ok()
        };
        if let Some(fixed) = decoded {
            return Some(fixed);
        }
    }

    let chars: Vec<char> = text.chars().collect();
    if utf8_detector_find(&chars, 0).is_some() {
        let fixed = decode_inconsistent_utf8(&chars);
        if fixed != text {
            return Some(fixed);
        }
    }

    if latin1_possible {
        // text.encode("latin-1").decode("windows-1252"), strict: five C1 bytes are undefined.
        let mut fixed = String::with_capacity(text.len());
        let mut ok = true;
        for c in text.chars() {
            if is_c1(c) {
                let mapped = WINDOWS_1252_C1[(c as u32 - 0x80) as usize];
                match char::from_u32(mapped).filter(|_| mapped != 0) {
                    Some(m) => fixed.push(m),
                    None => {
                        ok = false;
                        break;
                    }
                }
            } else {
                fixed.push(c);
            }
        }
        if ok && fixed != text {
            return Some(fixed);
        }
    }

    if text.chars().any(is_c1) {
        return fix_c1_controls(text);
    }
    None
}

/// ftfy's `ALTERED_UTF8_RE`: UTF-8 sequences whose 0xA0 byte became a space. Returns the length
/// of the match at `i`.
fn altered_utf8_match(b: &[u8], i: usize) -> Option<usize> {
    let at = |k: usize| b.get(i + k).copied();
    let is_in = |k: usize, f: &dyn Fn(u8) -> bool| at(k).is_some_and(f);
    let cont_no_a0_85 = |x: u8| matches!(x, 0x80..=0x84 | 0x86..=0x9f | 0xa1..=0xbf);
    let cont = |x: u8| (0x80..=0xbf).contains(&x);
    let sp = |x: u8| x == b' ';
    let lead = at(0)?;
    if matches!(lead, 0xc2 | 0xc3 | 0xc5 | 0xce | 0xd0 | 0xd9) && is_in(1, &sp) {
        return Some(2);
    }
    if matches!(lead, 0xe2 | 0xe3) && is_in(1, &sp) && is_in(2, &cont_no_a0_85) {
        return Some(3);
    }
    if (0xe0..=0xe3).contains(&lead) && is_in(1, &cont_no_a0_85) && is_in(2, &sp) {
        return Some(3);
    }
    if lead == 0xf0 {
        if is_in(1, &sp) && is_in(2, &cont) && is_in(3, &cont) {
            return Some(4);
        }
        if is_in(1, &cont) && is_in(2, &sp) && is_in(3, &cont) {
            return Some(4);
        }
        if is_in(1, &cont) && is_in(2, &cont) && is_in(3, &sp) {
            return Some(4);
        }
    }
    None
}

fn altered_utf8_at_any(b: &[u8]) -> bool {
    (0..b.len()).any(|i| altered_utf8_match(b, i).is_some())
}

/// ftfy's `restore_byte_a0`.
fn restore_byte_a0(b: &[u8]) -> Vec<u8> {
    // A_GRAVE_WORD_RE: b"\xc3 (?! |quele|quela|quilo|s )" -> b"\xc3\xa0 "
    let mut first = Vec::with_capacity(b.len() + 4);
    let mut i = 0;
    while i < b.len() {
        if b[i] == 0xc3 && b.get(i + 1) == Some(&b' ') {
            let rest = &b[i + 2..];
            let excluded = [&b" "[..], b"quele", b"quela", b"quilo", b"s "]
                .iter()
                .any(|p| rest.starts_with(p));
            if !excluded {
                first.extend_from_slice(b"\xc3\xa0 ");
                i += 2;
                continue;
            }
        }
        first.push(b[i]);
        i += 1;
    }
    let mut out = Vec::with_capacity(first.len());
    let mut i = 0;
    while i < first.len() {
        if let Some(n) = altered_utf8_match(&first, i) {
            out.extend(
                first[i..i + n]
                    .iter()
                    .map(|&x| if x == b' ' { 0xa0 } else { x }),
            );
            i += n;
        } else {
            out.push(first[i]);
            i += 1;
        }
    }
    out
}

/// ftfy's `replace_lossy_sequences`: UTF-8-looking sequences with a lost byte (0x1A, or one `?`)
/// become the UTF-8 for U+FFFD.
fn replace_lossy_sequences(b: &[u8]) -> Vec<u8> {
    if !b.contains(&0x1a) && !b.contains(&b'?') {
        return b.to_vec();
    }
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match lossy_match(b, i) {
            Some(n) => {
                out.extend_from_slice("\u{fffd}".as_bytes());
                i += n;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    out
}

fn lossy_match(b: &[u8], i: usize) -> Option<usize> {
    let at = |k: usize| b.get(i + k).copied();
    let m = |k: usize, f: fn(u8) -> bool| at(k).is_some_and(f);
    fn sub(x: u8) -> bool {
        x == 0x1a
    }
    fn sub_q(x: u8) -> bool {
        x == 0x1a || x == b'?'
    }
    fn sub_cont(x: u8) -> bool {
        x == 0x1a || (0x80..=0xbf).contains(&x)
    }
    fn sub_q_cont(x: u8) -> bool {
        x == 0x1a || x == b'?' || (0x80..=0xbf).contains(&x)
    }
    let lead = at(0)?;
    if (0xc2..=0xdf).contains(&lead) && m(1, sub) {
        return Some(2);
    }
    if (0xc2..=0xc3).contains(&lead) && at(1) == Some(b'?') {
        return Some(2);
    }
    if lead == 0xed {
        let hi = |x: u8| (0xa0..=0xaf).contains(&x);
        let lo = |x: u8| (0xb0..=0xbf).contains(&x);
        if m(1, hi) && m(2, sub_q) && at(3) == Some(0xed) && m(4, lo) && m(5, sub_q_cont) {
            return Some(6);
        }
        if m(1, hi) && m(2, sub_q_cont) && at(3) == Some(0xed) && m(4, lo) && m(5, sub_q) {
            return Some(6);
        }
    }
    if (0xe0..=0xef).contains(&lead) {
        if m(1, sub_q) && m(2, sub_cont) {
            return Some(3);
        }
        if m(1, sub_cont) && m(2, sub_q) {
            return Some(3);
        }
    }
    if (0xf0..=0xf4).contains(&lead) {
        if m(1, sub_q) && m(2, sub_cont) && m(3, sub_cont) {
            return Some(4);
        }
        if m(1, sub_cont) && m(2, sub_q) && m(3, sub_cont) {
            return Some(4);
        }
        if m(1, sub_cont) && m(2, sub_cont) && m(3, sub_q) {
            return Some(4);
        }
    }
    if lead == 0x1a {
        return Some(1);
    }
    None
}

/// ftfy's `utf-8-variants` codec: UTF-8, plus CESU-8 surrogate pairs and Java's two-byte NUL.
/// None where Python raises `UnicodeDecodeError`. Reproduces the codec's use of `$` (which also
/// matches before a final `\n`, so that newline is swallowed by a C0 or CESU-8 sequence).
fn decode_utf8_variants(b: &[u8]) -> Option<String> {
    let n = b.len();
    let mut out = String::with_capacity(n);
    let mut i = 0;
    let final_newline = |k: usize| b.get(k) == Some(&b'\n') && k + 1 == n;
    while i < n {
        let x = b[i];
        if x == 0xc0 {
            // NULL_EXPR \xc0(\x80|$); a lone final C0 goes to the strict decoder and fails.
            if i + 1 < n && (b[i + 1] == 0x80 || final_newline(i + 1)) {
                out.push('\0');
                i += 2;
                continue;
            }
            return None;
        }
        if x == 0xed && (i + 1 == n || (0xa0..=0xbf).contains(&b[i + 1]) || final_newline(i + 1)) {
            let cesu = i + 6 <= n
                && (0xa0..=0xaf).contains(&b[i + 1])
                && (0x80..=0xbf).contains(&b[i + 2])
                && b[i + 3] == 0xed
                && (0xb0..=0xbf).contains(&b[i + 4])
                && ((0x80..=0xbf).contains(&b[i + 5]) || final_newline(i + 5));
            if !cesu {
                return None;
            }
            let cp = (((b[i + 1] & 0x0f) as u32) << 16)
                + (((b[i + 2] & 0x3f) as u32) << 10)
                + (((b[i + 4] & 0x0f) as u32) << 6)
                + ((b[i + 5] & 0x3f) as u32)
                + 0x10000;
            out.push(char::from_u32(cp)?);
            i += 6;
            continue;
        }
        let len = match x {
            0x00..=0x7f => 1,
            0xc2..=0xdf => 2,
            0xe0..=0xef => 3,
            0xf0..=0xf4 => 4,
            _ => return None,
        };
        let s = std::str::from_utf8(b.get(i..i + len)?).ok()?;
        out.push_str(s);
        i += len;
    }
    Some(out)
}

/// ftfy's `UTF8_DETECTOR_RE`: the first match at or after `from`, as a char range.
fn utf8_detector_find(ch: &[char], from: usize) -> Option<(usize, usize)> {
    let fl = |k: usize| ch.get(k).map_or(0, |&c| class_flags(c));
    let cont = |k: usize| fl(k) & CLS_UTF8_CONTINUATION != 0;
    for p in from..ch.len() {
        if p > 0 && fl(p - 1) & CLS_UTF8_CONTINUATION_STRICT != 0 {
            continue;
        }
        let mut q = p;
        loop {
            let f = fl(q);
            if f & CLS_UTF8_FIRST_OF_2 != 0 && cont(q + 1) {
                q += 2;
            } else if f & CLS_UTF8_FIRST_OF_3 != 0 && cont(q + 1) && cont(q + 2) {
                q += 3;
            } else if f & CLS_UTF8_FIRST_OF_4 != 0 && cont(q + 1) && cont(q + 2) && cont(q + 3) {
                q += 4;
            } else {
                break;
            }
        }
        if q > p {
            return Some((p, q));
        }
    }
    None
}

/// ftfy's `decode_inconsistent_utf8`: fix each UTF-8-looking run that is bad on its own.
fn decode_inconsistent_utf8(ch: &[char]) -> String {
    let mut out = String::new();
    let mut pos = 0;
    while let Some((s, e)) = utf8_detector_find(ch, pos) {
        out.extend(&ch[pos..s]);
        let sub = &ch[s..e];
        if sub.len() < ch.len() && is_bad_chars(sub) {
            let substr: String = sub.iter().collect();
            out.push_str(&fix_encoding(&substr));
        } else {
            out.extend(sub);
        }
        pos = e;
    }
    out.extend(&ch[pos..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ftfy_docstring_examples() {
        assert_eq!(fix_text("âœ” No problems"), "✔ No problems");
        assert_eq!(fix_text("&macr;\\_(ã\u{83}\u{84})_/&macr;"), "¯\\_(ツ)_/¯");
        assert_eq!(
            fix_text("Broken text&hellip; it&#x2019;s ﬂubberiﬁc!"),
            "Broken text… it's flubberific!"
        );
        assert_eq!(fix_text("ＬＯＵＤ　ＮＯＩＳＥＳ"), "LOUD NOISES");
        assert_eq!(fix_encoding("sÃ³"), "só");
        assert_eq!(fix_encoding("voilÃ le travail"), "voilà le travail");
        assert_eq!(
            unescape_html("&ntilde; &Ntilde; &NTILDE; &nTILDE;").as_deref(),
            Some("ñ Ñ Ñ &nTILDE;")
        );
        assert_eq!(
            unescape_html("BUNDESSTRA&SZLIG;E").as_deref(),
            Some("BUNDESSTRASSE")
        );
        assert_eq!(
            fix_line_breaks("a\r\r\nb\u{2028}c\u{85}").as_deref(),
            Some("a\n\nb\nc\n")
        );
        assert_eq!(
            remove_terminal_escapes("\x1b[36;44mI'm blue\x1b[0m").as_deref(),
            Some("I'm blue")
        );
    }

    #[test]
    fn html_unescape_matches_python() {
        assert_eq!(html_unescape("&amp;amp; &lt;b&gt;"), "&amp; <b>");
        assert_eq!(
            html_unescape("&ampxyz &notit; &#39;&#x27;&#128;&#0;&#1;"),
            "&xyz ¬it; ''€\u{fffd}"
        );
        assert_eq!(
            html_unescape("&#xD800; &#99999999999; &bogus;"),
            "\u{fffd} \u{fffd} &bogus;"
        );
    }

    #[test]
    fn python_string_methods() {
        assert_eq!(python_lower("ΣΑΣ Σ aΣ."), "σας σ aς.");
        assert_eq!(python_lower("İ"), "i\u{307}");
        assert_eq!(whitespace_clean(" a\u{1c}b\u{3000} c "), "a b c");
        assert_eq!(python_strip("\u{85} x \u{a0}"), "x");
    }
}
