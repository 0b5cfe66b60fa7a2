//! The property checks every target shares.

use std::fmt::{Debug, Display};

/// A rejected input gets an error that names the problem: a message of some words, and, when the
/// caller knows where the problem is (a file, a field, a line), one of those names in it.
pub fn names_problem(err: &dyn Display, any_of: &[&str]) -> String {
    let msg = err.to_string();
    assert!(
        msg.trim().len() >= 8,
        "an error must say what is wrong, got {msg:?}"
    );
    if !any_of.is_empty() {
        assert!(
            any_of.iter().any(|n| msg.contains(n)),
            "the error {msg:?} names none of {any_of:?}"
        );
    }
    msg
}

/// Every sample is accounted for: results + error records = input.
pub fn accounted(what: &str, input: u64, results: u64, errors: u64) {
    assert_eq!(
        results + errors,
        input,
        "{what}: {results} results + {errors} error records != {input} inputs"
    );
}

/// A write-then-read round trip gives back what was written.
pub fn round_trip<T: PartialEq + Debug>(what: &str, written: &T, read: &T) {
    assert!(
        written == read,
        "{what}: the round trip changed the value\nwritten: {written:?}\nread:    {read:?}"
    );
}

/// Reads `input`; an accepted value must print (`print`) and read back identical, a rejection
/// must name the problem (one of `any_of`, when given). The accepted value, if any, is returned.
pub fn read_print_read<T, E, P>(
    what: &str,
    input: &[u8],
    read: impl Fn(&[u8]) -> Result<T, E>,
    print: impl Fn(&T) -> Result<Vec<u8>, P>,
    any_of: &[&str],
) -> Option<T>
where
    T: PartialEq + Debug,
    E: Display,
    P: Display,
{
    match read(input) {
        Ok(v) => {
            let printed = print(&v)
                .unwrap_or_else(|e| panic!("{what}: an accepted value does not print: {e}"));
            let back = read(&printed).unwrap_or_else(|e| {
                panic!(
                    "{what}: its print does not read back: {e}\n{}",
                    String::from_utf8_lossy(&printed)
                )
            });
            round_trip(what, &v, &back);
            Some(v)
        }
        Err(e) => {
            names_problem(&e, any_of);
            None
        }
    }
}

/// Text of fuzz bytes as a reader of text files sees it (lossy UTF-8).
pub fn text(input: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(input)
}

/// Lines `str::lines` yields that are not blank after trimming (what JSONL readers skip).
pub fn nonblank_lines(text: &str) -> u64 {
    text.lines().filter(|l| !l.trim().is_empty()).count() as u64
}
