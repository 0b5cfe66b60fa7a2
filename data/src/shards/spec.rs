//! Shard specifications, expanded the way webdataset does it, plus globs and list files.
//!
//! A specification is one string or a list of strings. Each string is split on `::` into parts
//! (webdataset's separator for concatenated sources); in each part
//! - `${NAME}` is replaced by the environment variable `WDS_NAME` (webdataset's `envsubst`);
//! - braces are expanded like Python's `braceexpand` (webdataset's own expander): ranges
//!   `{00000..00099}` keep the zero-padded width, `{a..e}` letter ranges, `{1..9..2}` steps,
//!   descending ranges, lists `{train,val}`, nesting, `\{` escapes;
//! - each expanded string is then
//!   - a *list file* when it starts with `@` (`@shards.txt`), or when it names an existing file
//!     ending in `.txt`, `.list`, `.lst` or `.shards`: one specification a line (so a line may itself
//!     be a range or a glob), blank lines and `#` comment lines ignored, relative paths taken from
//!     the list file's folder;
//!   - a *glob* (`data/*.tar`, sorted) when it contains `*`, `?` or `[` and is not itself an
//!     existing path;
//!   - otherwise a *path* to one shard.
//!
//! Every part must name at least one shard: a part that matches nothing is an error
//! ([`DataError::ShardSpec`]), as is, by default, a path that does not exist.

use crate::error::{DataError, Result};
use std::path::{Path, PathBuf};

/// Most strings one brace pattern may expand to (a typo like `{0..9999999999}` is an error, not an
/// out-of-memory kill).
pub const MAX_EXPANSION: usize = 10_000_000;

/// How deep list files may include list files (guards against a list that lists itself).
const MAX_LIST_DEPTH: usize = 8;

/// Options for [`expand_shards_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExpandOptions {
    /// Drop shard paths that do not exist instead of failing (img2dataset leaves gaps in its
    /// numbering when a shard's download failed). A part that ends up with no shard at all is
    /// still an error.
    pub allow_missing: bool,
}

/// Expand one specification string (which may hold several `::`-separated parts).
pub fn expand_shard_spec(spec: &str) -> Result<Vec<PathBuf>> {
    expand_shards_with(&[spec], ExpandOptions::default())
}

/// Expand several specifications, in order, into one list of shard paths.
pub fn expand_shards<S: AsRef<str>>(specs: &[S]) -> Result<Vec<PathBuf>> {
    expand_shards_with(specs, ExpandOptions::default())
}

/// [`expand_shards`] with options.
pub fn expand_shards_with<S: AsRef<str>>(specs: &[S], opts: ExpandOptions) -> Result<Vec<PathBuf>> {
    if specs.is_empty() {
        return Err(DataError::ShardSpec {
            spec: String::new(),
            reason: "no shard specification given".into(),
        });
    }
    let mut out = Vec::new();
    for spec in specs {
        expand_one(spec.as_ref(), None, opts, 0, &mut out)?;
    }
    Ok(out)
}

fn spec_err(spec: &str, reason: impl Into<String>) -> DataError {
    DataError::ShardSpec {
        spec: spec.to_string(),
        reason: reason.into(),
    }
}

fn expand_one(
    spec: &str,
    base: Option<&Path>,
    opts: ExpandOptions,
    depth: usize,
    out: &mut Vec<PathBuf>,
) -> Result<()> {
    if spec.trim().is_empty() {
        return Err(spec_err(spec, "empty specification"));
    }
    for raw_part in spec.split("::") {
        let part = raw_part.trim();
        if part.is_empty() {
            return Err(spec_err(spec, "empty part between `::` separators"));
        }
        let part = envsubst(part).map_err(|r| spec_err(part, r))?;
        let expanded = brace_expand(&part).map_err(|r| spec_err(&part, r))?;
        let before = out.len();
        let mut missing = Vec::new();
        for item in expanded {
            if let Some(list) = item.strip_prefix('@') {
                let list_path = resolve(base, list);
                read_list_file(&list_path, opts, depth, out)?;
                continue;
            }
            let path = resolve(base, &item);
            if is_list_file(&path) {
                read_list_file(&path, opts, depth, out)?;
            } else if has_glob_meta(&item) && !path.exists() {
                let pattern = match base {
                    Some(b) if Path::new(&item).is_relative() => {
                        format!("{}/{}", glob::Pattern::escape(&b.to_string_lossy()), item)
                    }
                    _ => item.clone(),
                };
                let paths = glob::glob(&pattern)
                    .map_err(|e| spec_err(&item, format!("invalid glob pattern: {e}")))?;
                let mut found: Vec<PathBuf> = paths
                    .filter_map(|p| p.ok())
                    .filter(|p| p.is_file())
                    .collect();
                if found.is_empty() {
                    return Err(spec_err(&item, "the glob matches no file"));
                }
                found.sort();
                out.extend(found);
            } else if path.is_file() {
                out.push(path);
            } else {
                missing.push(path);
            }
        }
        if !missing.is_empty() && (!opts.allow_missing || out.len() == before) {
            let total = out.len() - before + missing.len();
            let examples: Vec<String> = missing
                .iter()
                .take(3)
                .map(|p| p.display().to_string())
                .collect();
            let reason = if out.len() == before {
                format!(
                    "matches nothing: none of its {total} path(s) exists (e.g. {})",
                    examples.join(", ")
                )
            } else {
                format!(
                    "{} of its {total} path(s) do not exist (e.g. {})",
                    missing.len(),
                    examples.join(", ")
                )
            };
            return Err(spec_err(&part, reason));
        }
        if out.len() == before {
            return Err(spec_err(&part, "matches nothing"));
        }
    }
    Ok(())
}

fn resolve(base: Option<&Path>, item: &str) -> PathBuf {
    let p = Path::new(item);
    match base {
        Some(b) if p.is_relative() => b.join(p),
        _ => p.to_path_buf(),
    }
}

fn has_glob_meta(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// A list file: an existing regular file with a list-like extension.
fn is_list_file(path: &Path) -> bool {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase());
    matches!(ext.as_deref(), Some("txt" | "list" | "lst" | "shards")) && path.is_file()
}

fn read_list_file(
    path: &Path,
    opts: ExpandOptions,
    depth: usize,
    out: &mut Vec<PathBuf>,
) -> Result<()> {
    let shown = path.display().to_string();
    if depth >= MAX_LIST_DEPTH {
        return Err(spec_err(
            &shown,
            format!(
                "list files nested more than {MAX_LIST_DEPTH} deep (does a list include itself?)"
            ),
        ));
    }
    let text = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    let text = String::from_utf8(text)
        .map_err(|e| spec_err(&shown, format!("list file is not UTF-8: {e}")))?;
    let base = path.parent().map(Path::to_path_buf);
    let before = out.len();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        expand_one(line, base.as_deref(), opts, depth + 1, out).map_err(|e| match e {
            DataError::ShardSpec { spec, reason } => {
                spec_err(&format!("{shown}:{}: {spec}", i + 1), reason)
            }
            other => other,
        })?;
    }
    if out.len() == before {
        return Err(spec_err(&shown, "the list file names no shard"));
    }
    Ok(())
}

/// webdataset's `envsubst`: `${NAME}` becomes the value of `WDS_NAME`, repeated (up to 10 rounds)
/// while the string keeps changing. A variable that is not set is an error.
pub fn envsubst(s: &str) -> std::result::Result<String, String> {
    let mut cur = s.to_string();
    for _ in 0..10 {
        let next = envsubst_once(&cur)?;
        if next == cur {
            break;
        }
        cur = next;
    }
    Ok(cur)
}

fn envsubst_once(s: &str) -> std::result::Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        let after = &rest[start + 2..];
        let name_len = after
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        if name_len > 0 && after[name_len..].starts_with('}') {
            let name = &after[..name_len];
            let var = format!("WDS_{name}");
            let value = std::env::var(&var)
                .map_err(|_| format!("environment variable {var} (for ${{{name}}}) is not set"))?;
            out.push_str(&rest[..start]);
            out.push_str(&value);
            rest = &after[name_len + 1..];
        } else {
            out.push_str(&rest[..start + 2]);
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Bash-style brace expansion with the rules of Python's `braceexpand` 0.1.7 (what webdataset
/// uses): integer ranges padded to the wider end when either end has a leading zero, letter
/// ranges over `A..Za..z`, optional steps, descending ranges, comma lists, nesting, and backslash
/// escapes (removed from the output). Braces that hold neither a range nor a comma stay literal.
/// Unbalanced braces are an error.
pub fn brace_expand(pattern: &str) -> std::result::Result<Vec<String>, String> {
    let raw = parse_pattern(pattern)?;
    Ok(raw.into_iter().map(|s| unescape(&s)).collect())
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some(n) => out.push(n),
                None => out.push('\\'),
            }
        } else {
            out.push(c);
        }
    }
    out
}

type Alternatives = Vec<String>;

fn product(items: Vec<Alternatives>) -> std::result::Result<Vec<String>, String> {
    let mut total: usize = 1;
    for it in &items {
        total = total.saturating_mul(it.len());
    }
    if total > MAX_EXPANSION {
        return Err(format!(
            "brace pattern expands to more than {MAX_EXPANSION} strings"
        ));
    }
    let mut acc = vec![String::new()];
    for alts in items {
        let mut next = Vec::with_capacity(acc.len() * alts.len());
        for prefix in &acc {
            for a in &alts {
                let mut s = String::with_capacity(prefix.len() + a.len());
                s.push_str(prefix);
                s.push_str(a);
                next.push(s);
            }
        }
        acc = next;
    }
    Ok(acc)
}

/// Byte offset just past the character after a backslash at `pos`, clamped to the string.
fn skip_escape(s: &str, pos: usize) -> usize {
    let after = pos + 1;
    match s[after.min(s.len())..].chars().next() {
        Some(c) => after + c.len_utf8(),
        None => s.len(),
    }
}

fn parse_pattern(pattern: &str) -> std::result::Result<Vec<String>, String> {
    let bytes = pattern.as_bytes();
    let mut start = 0usize;
    let mut pos = 0usize;
    let mut depth: i64 = 0;
    let mut items: Vec<Alternatives> = Vec::new();
    while pos < bytes.len() {
        match bytes[pos] {
            b'\\' => {
                pos = skip_escape(pattern, pos);
                continue;
            }
            b'{' => {
                if depth == 0 && pos > start {
                    items.push(vec![pattern[start..pos].to_string()]);
                    start = pos;
                }
                depth += 1;
            }
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    let expr = &pattern[start + 1..pos];
                    match parse_expression(expr)? {
                        Some(alts) => items.push(alts),
                        None => {
                            items.push(vec!["{".to_string()]);
                            items.push(parse_pattern(expr)?);
                            items.push(vec!["}".to_string()]);
                        }
                    }
                    start = pos + 1;
                }
            }
            _ => {}
        }
        pos += 1;
    }
    if depth != 0 {
        return Err(format!("unbalanced braces in {pattern:?}"));
    }
    if start < bytes.len() {
        items.push(vec![pattern[start..].to_string()]);
    }
    product(items)
}

fn parse_expression(expr: &str) -> std::result::Result<Option<Alternatives>, String> {
    if let Some(r) = int_range(expr)? {
        return Ok(Some(r));
    }
    if let Some(r) = char_range(expr)? {
        return Ok(Some(r));
    }
    parse_sequence(expr)
}

/// Split `a..b` or `a..b..step` (step may carry a `-`, which is ignored, as in braceexpand).
fn split_range(expr: &str) -> Option<(&str, &str, Option<&str>)> {
    let mut parts = expr.split("..");
    let a = parts.next()?;
    let b = parts.next()?;
    let step = parts.next();
    if parts.next().is_some() {
        return None;
    }
    let step = match step {
        Some(s) => {
            let digits = s.strip_prefix('-').unwrap_or(s);
            if digits.is_empty() || !digits.bytes().all(|c| c.is_ascii_digit()) {
                return None;
            }
            Some(digits)
        }
        None => None,
    };
    Some((a, b, step))
}

fn is_int(s: &str) -> bool {
    let d = s.strip_prefix('-').unwrap_or(s);
    !d.is_empty() && d.bytes().all(|c| c.is_ascii_digit())
}

fn parse_step(step: Option<&str>) -> std::result::Result<usize, String> {
    match step {
        None => Ok(1),
        Some(s) => {
            let v: u128 = s
                .parse()
                .map_err(|_| format!("range step {s:?} is too large"))?;
            Ok(if v == 0 {
                1
            } else {
                usize::try_from(v).unwrap_or(usize::MAX)
            })
        }
    }
}

fn int_range(expr: &str) -> std::result::Result<Option<Alternatives>, String> {
    let Some((a, b, step)) = split_range(expr) else {
        return Ok(None);
    };
    if !is_int(a) || !is_int(b) {
        return Ok(None);
    }
    let padded = [a, b]
        .iter()
        .filter(|s| **s != "0" && **s != "-0")
        .any(|s| s.starts_with('0') || s.starts_with("-0"));
    let width = if padded { a.len().max(b.len()) } else { 0 };
    // Bounds are parsed as i64 and stepped in i128, so no arithmetic below can overflow.
    let start = i128::from(
        a.parse::<i64>()
            .map_err(|_| format!("range bound {a:?} is too large"))?,
    );
    let end = i128::from(
        b.parse::<i64>()
            .map_err(|_| format!("range bound {b:?} is too large"))?,
    );
    let step = parse_step(step)?.min(u64::MAX as usize) as i128;
    let count = (start - end).unsigned_abs() / step.unsigned_abs() + 1;
    if count > MAX_EXPANSION as u128 {
        return Err(format!(
            "range {expr:?} expands to more than {MAX_EXPANSION} strings"
        ));
    }
    let mut out = Vec::with_capacity(count as usize);
    let mut v = start;
    if start < end {
        while v <= end {
            out.push(format!("{v:0width$}"));
            v += step;
        }
    } else {
        while v >= end {
            out.push(format!("{v:0width$}"));
            v -= step;
        }
    }
    Ok(Some(out))
}

const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

fn char_range(expr: &str) -> std::result::Result<Option<Alternatives>, String> {
    let Some((a, b, step)) = split_range(expr) else {
        return Ok(None);
    };
    let letter = |s: &str| -> Option<usize> {
        let c = s.as_bytes();
        if c.len() == 1 && c[0].is_ascii_alphabetic() {
            ALPHABET.iter().position(|x| *x == c[0])
        } else {
            None
        }
    };
    let (Some(start), Some(end)) = (letter(a), letter(b)) else {
        return Ok(None);
    };
    let step = parse_step(step)?;
    let mut out = Vec::new();
    if start < end {
        let mut i = start;
        while i <= end {
            out.push((ALPHABET[i] as char).to_string());
            i = i.saturating_add(step);
        }
    } else {
        let mut i = start as i128;
        while i >= end as i128 {
            out.push((ALPHABET[i as usize] as char).to_string());
            i -= step as i128;
        }
    }
    Ok(Some(out))
}

fn parse_sequence(seq: &str) -> std::result::Result<Option<Alternatives>, String> {
    let bytes = seq.as_bytes();
    let mut start = 0usize;
    let mut pos = 0usize;
    let mut depth: i64 = 0;
    let mut parts: Vec<&str> = Vec::new();
    while pos < bytes.len() {
        match bytes[pos] {
            b'\\' => {
                pos = skip_escape(seq, pos);
                continue;
            }
            b'{' => depth += 1,
            b'}' => depth -= 1,
            b',' if depth == 0 => {
                parts.push(&seq[start..pos]);
                start = pos + 1;
            }
            _ => {}
        }
        pos += 1;
    }
    if depth != 0 || parts.is_empty() {
        return Ok(None);
    }
    parts.push(&seq[start.min(seq.len())..]);
    let mut out = Vec::new();
    for p in parts {
        out.extend(parse_pattern(p)?);
        if out.len() > MAX_EXPANSION {
            return Err(format!(
                "brace list expands to more than {MAX_EXPANSION} strings"
            ));
        }
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(p: &str) -> Vec<String> {
        brace_expand(p).expect("expand")
    }

    #[test]
    fn braceexpand_docstring_examples() {
        assert_eq!(ex("item{1..3}"), ["item1", "item2", "item3"]);
        assert_eq!(ex("{a..c}"), ["a", "b", "c"]);
        assert_eq!(
            ex("index.html{,.backup}"),
            ["index.html", "index.html.backup"]
        );
        assert_eq!(
            ex("python{2.{5..7},3.{2,3}}"),
            [
                "python2.5",
                "python2.6",
                "python2.7",
                "python3.2",
                "python3.3"
            ]
        );
        assert_eq!(ex("{07..10}"), ["07", "08", "09", "10"]);
        assert_eq!(ex("{a..g..2}"), ["a", "c", "e", "g"]);
        assert_eq!(ex("{4..1}"), ["4", "3", "2", "1"]);
        assert_eq!(ex("{2..-1}"), ["2", "1", "0", "-1"]);
        assert!(brace_expand("{1{2,3}").is_err());
        assert_eq!(ex(r"{1\{2,3}"), ["1{2", "3"]);
    }

    #[test]
    fn shard_ranges_keep_width() {
        let v = ex("shard-{00000..00099}.tar");
        assert_eq!(v.len(), 100);
        assert_eq!(v[0], "shard-00000.tar");
        assert_eq!(v[99], "shard-00099.tar");
        assert_eq!(ex("s{0..2}"), ["s0", "s1", "s2"]);
        assert_eq!(ex("s{8..010}"), ["s008", "s009", "s010"]);
        assert_eq!(ex("{1..10..4}"), ["1", "5", "9"]);
        assert_eq!(ex("{c..a}"), ["c", "b", "a"]);
        assert_eq!(ex("{Y..b}"), ["Y", "Z", "a", "b"]);
        assert_eq!(
            ex("{b..A}"),
            [
                "b", "a", "Z", "Y", "X", "W", "V", "U", "T", "S", "R", "Q", "P", "O", "N", "M",
                "L", "K", "J", "I", "H", "G", "F", "E", "D", "C", "B", "A"
            ]
        );
        assert_eq!(ex("{x}"), ["{x}"]);
        assert_eq!(ex("a{b,c}d{1..2}"), ["abd1", "abd2", "acd1", "acd2"]);
        assert_eq!(ex("naïve{é,ü}"), ["naïveé", "naïveü"]);
        assert_eq!(ex("tail\\"), ["tail\\"]);
    }

    #[test]
    fn huge_ranges_are_errors() {
        assert!(brace_expand("{0..99999999999}").is_err());
        assert!(brace_expand("{0..999999999999999999999999999999999999999999}").is_err());
    }

    #[test]
    fn envsubst_uses_wds_prefix() {
        std::env::set_var("WDS_HQ_SPEC_TEST_ROOT", "/data/x");
        assert_eq!(
            envsubst("${HQ_SPEC_TEST_ROOT}/s.tar").expect("subst"),
            "/data/x/s.tar"
        );
        assert!(envsubst("${HQ_SPEC_TEST_SURELY_UNSET}/s.tar").is_err());
        assert_eq!(envsubst("$x ${ a").expect("literal"), "$x ${ a");
    }
}
