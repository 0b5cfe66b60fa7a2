//! Inputs that are several files (a model directory, a checkpoint, an eval set): one fuzz input
//! holds them all, separated by [`SEP`], so seeds are real files joined and a mutation can touch
//! any of them.

use std::path::Path;

/// The separator between files of one input (unlikely inside a real config or shard).
pub const SEP: &[u8] = b"\n\x00--8<--\x00\n";

/// The first `n` parts of `input` split at [`SEP`]; missing parts are `None` (the file is absent).
pub fn split(input: &[u8], n: usize) -> Vec<Option<&[u8]>> {
    let mut parts = Vec::with_capacity(n);
    let mut rest = Some(input);
    while parts.len() < n {
        match rest {
            Some(r) => match find(r, SEP) {
                Some(i) => {
                    parts.push(Some(&r[..i]));
                    rest = Some(&r[i + SEP.len()..]);
                }
                None => {
                    parts.push(Some(r));
                    rest = None;
                }
            },
            None => parts.push(None),
        }
    }
    parts
}

/// `parts` joined with [`SEP`]: how seeds are made from real files.
pub fn join(parts: &[&[u8]]) -> Vec<u8> {
    parts.join(SEP)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A fresh directory for one input: on tmpfs when there is one (the targets write files per input).
pub fn tempdir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        tempfile::Builder::new().prefix("hq-fuzz").tempdir_in(shm)
    } else {
        tempfile::Builder::new().prefix("hq-fuzz").tempdir()
    };
    dir.unwrap_or_else(|e| panic!("cannot create a temporary directory: {e}"))
}

/// Writes `parts[i]` to `dir/names[i]` (parent folders made); absent parts leave no file.
pub fn write_parts(dir: &Path, names: &[&str], parts: &[Option<&[u8]>]) {
    for (name, part) in names.iter().zip(parts) {
        if let Some(bytes) = part {
            let path = dir.join(name);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)
                    .unwrap_or_else(|e| panic!("cannot create {}: {e}", parent.display()));
            }
            std::fs::write(&path, bytes)
                .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        }
    }
}

/// Writes one file and returns its path.
pub fn write_one(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    write_parts(dir, &[name], &[Some(bytes)]);
    dir.join(name)
}
