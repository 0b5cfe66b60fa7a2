//! `hq-recap-trt` as a user runs it: bad invocations stop before any work with an error that names
//! the problem. (The job itself is tested through the library in `tests/tests/recap_job.rs`; this
//! file also makes `cargo test` build the program, which the GPU acceptance run's dry run packs.)

use std::process::Command;

fn recap(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_hq-recap-trt"))
        .args(args)
        .env("HQ_NO_PROGRESS", "1")
        .output()
        .expect("run hq-recap-trt");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn help_names_the_engine_and_the_providers() {
    let (ok, text) = recap(&["--help"]);
    assert!(ok, "{text}");
    for want in ["--engine", "--provider", "tensorrt", "--drop-input-texts"] {
        assert!(text.contains(want), "--help lacks {want}:\n{text}");
    }
}

#[test]
fn missing_input_and_unknown_provider_are_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("no-such-shard.tar");
    let out = dir.path().join("out");
    let (ok, text) = recap(&[
        "--engine",
        dir.path().to_str().unwrap_or("."),
        "--input",
        missing.to_str().unwrap_or("x"),
        "--output",
        out.to_str().unwrap_or("out"),
    ]);
    assert!(!ok);
    assert!(
        text.contains("matches nothing") && text.contains("no-such-shard.tar"),
        "{text}"
    );
    let (ok, text) = recap(&[
        "--provider",
        "warp9",
        "--engine",
        ".",
        "--input",
        "x",
        "--output",
        out.to_str().unwrap_or("out"),
    ]);
    assert!(!ok);
    assert!(
        text.contains("unknown execution provider `warp9`"),
        "{text}"
    );
    assert!(!out.exists(), "a refused run wrote its output folder");
}
