//! `qwen2vl.plan`, as a cluster uses it: `hq-recap-trt build` packs the tiny random Qwen2-VL
//! (built by `export/qwen2vl/make_tiny_qwen2vl.py` in the venv), and `--engine qwen2vl.plan`
//! writes exactly what `--engine MODEL_DIR` writes. A truncated or altered plan, a file that is
//! not a plan, and a provider other than the plan's are refused with what is wrong. (Refusing a
//! TensorRT plan built on another GPU or library set is unit-tested in `runtime/src/plan.rs`; no
//! GPU here.)

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

fn tiny_model(dir: &Path) -> PathBuf {
    let py = std::env::var_os("HQ_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".venv/bin/python"));
    let onnx = dir.join("onnx-model");
    let out = Command::new(&py)
        .arg(workspace_root().join("export/qwen2vl/make_tiny_qwen2vl.py"))
        .arg("--out")
        .arg(dir.join("hf"))
        .arg("--export")
        .arg(&onnx)
        .arg("--no-verify")
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} (source tools/env.sh): {e}", py.display()));
    assert!(
        out.status.success(),
        "make_tiny_qwen2vl.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    onnx
}

fn shard(dir: &Path) -> PathBuf {
    let cfg = hq_data::synth::SynthConfig {
        samples: 6,
        shard_size: 6,
        image_size: 48,
        eval_samples: 4,
        eval_shard_size: 4,
        ..hq_data::synth::SynthConfig::default()
    };
    let opts = hq_data::synth::WriteOptions {
        force: false,
        threads: Some(1),
        progress: false,
    };
    hq_data::synth::write_corpus(&cfg, dir, &opts).expect("synth");
    dir.join("train")
}

fn recap(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hq-recap-trt"))
        .args(args)
        .env("HQ_NO_PROGRESS", "1")
        .output()
        .expect("run hq-recap-trt")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The side-car records of a recaption run with `engine`.
fn run(engine: &Path, input: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "--engine",
        s(engine),
        "--input",
        s(input),
        "--output",
        s(out),
        "--format",
        "sidecar",
        "--max-new-tokens",
        "24",
        "--attempts",
        "1",
        "--model-name",
        "tiny",
        "--no-progress",
    ];
    args.extend_from_slice(extra);
    recap(&args)
}

fn sidecars(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .expect("output")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .map(|p| {
            (
                p.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                std::fs::read(&p).expect("read"),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn a_plan_recaptions_like_its_model_folder_and_damage_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_model(dir.path());
    let input = shard(&dir.path().join("corpus"));
    let plan = dir.path().join("qwen2vl.plan");

    let o = recap(&["build", "--model", s(&model), "--out", s(&plan)]);
    assert!(o.status.success(), "build: {}", text(&o));
    assert!(plan.is_file());

    let (a, b) = (dir.path().join("from-folder"), dir.path().join("from-plan"));
    let o = run(&model, &input, &a, &[]);
    assert!(o.status.success(), "folder: {}", text(&o));
    let o = run(&plan, &input, &b, &[]);
    assert!(o.status.success(), "plan: {}", text(&o));
    let (ra, rb) = (sidecars(&a), sidecars(&b));
    assert!(!ra.is_empty(), "no side-car written");
    assert_eq!(ra, rb, "the plan's answers differ from the folder's");

    // The extracted cache damaged after a good run (a member edited, another deleted): the next
    // run notices, extracts the plan again and answers as before.
    let cache = PathBuf::from(format!("{}.d", plan.display()));
    let mut members: Vec<PathBuf> = walk(&cache)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "json" || e == "onnx"))
        .collect();
    members.sort();
    assert!(members.len() >= 2, "extracted members: {members:?}");
    std::fs::write(&members[0], b"{}").expect("edit a member");
    std::fs::remove_file(&members[1]).expect("delete a member");
    let again = dir.path().join("from-plan-again");
    let o = run(&plan, &input, &again, &[]);
    assert!(o.status.success(), "plan after damage: {}", text(&o));
    assert!(text(&o).contains("extracting it again"), "{}", text(&o));
    assert_eq!(sidecars(&again), ra, "answers after re-extraction");

    // Another provider than the plan's.
    let o = run(
        &plan,
        &input,
        &dir.path().join("c"),
        &["--provider", "cuda"],
    );
    assert!(!o.status.success());
    assert!(text(&o).contains("was built for cpu"), "{}", text(&o));

    // One byte of a member changed (the end of the archive holds the last member's data).
    let bytes = std::fs::read(&plan).expect("plan");
    let altered = dir.path().join("altered.plan");
    let mut v = bytes.clone();
    let at = v.len() / 2;
    v[at] ^= 0x55;
    std::fs::write(&altered, &v).expect("write");
    let o = run(&altered, &input, &dir.path().join("d"), &[]);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(
        t.contains("differs from its manifest") || t.contains("damaged"),
        "{t}"
    );

    // Cut short.
    let truncated = dir.path().join("truncated.plan");
    std::fs::write(&truncated, &bytes[..bytes.len() * 2 / 3]).expect("write");
    let o = run(&truncated, &input, &dir.path().join("e"), &[]);
    assert!(!o.status.success());
    assert!(text(&o).contains("truncated"), "{}", text(&o));

    // Not a plan at all.
    let junk = dir.path().join("junk.plan");
    std::fs::write(&junk, b"this is not a plan").expect("write");
    let o = run(&junk, &input, &dir.path().join("f"), &[]);
    assert!(!o.status.success());
    assert!(text(&o).contains("not a plan"), "{}", text(&o));
    for out in ["c", "d", "e", "f"] {
        assert!(
            sidecars_or_none(&dir.path().join(out)),
            "a refused run wrote results in {out}"
        );
    }
}

/// Every file under `dir`, recursively.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = entry.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// True when `dir` holds no side-car output.
fn sidecars_or_none(dir: &Path) -> bool {
    !dir.exists() || sidecars(dir).is_empty()
}
