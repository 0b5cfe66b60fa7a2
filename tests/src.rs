//! Integration tests live in `tests/tests/`; this library holds what several of them share.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root (the parent of this crate's folder).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The Python that runs the reference tools: `$HQ_PYTHON` (set by `tools/env.sh`), else the
/// project's venv.
pub fn python() -> PathBuf {
    match std::env::var_os("HQ_PYTHON") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => workspace_root().join(".venv/bin/python"),
    }
}

/// [`python`] when it exists; otherwise `None`, saying on stderr that `what` is skipped (a
/// checkout without the venv still runs the Rust-only tests).
pub fn python_if_present(what: &str) -> Option<PathBuf> {
    let p = python();
    if p.exists() {
        Some(p)
    } else {
        eprintln!(
            "no Python at {} (source tools/env.sh): skipping {what}",
            p.display()
        );
        None
    }
}

/// Runs `tests/python/<script>` with `args` on `py` and returns its stdout; panics with the
/// script's stderr when it fails (a reference that cannot run is a failed comparison).
pub fn run_python_script<I, A>(py: &Path, script: &str, args: I) -> String
where
    I: IntoIterator<Item = A>,
    A: AsRef<OsStr>,
{
    let out = Command::new(py)
        .arg(workspace_root().join("tests/python").join(script))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {} {script}: {e}", py.display()));
    assert!(
        out.status.success(),
        "{script} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
