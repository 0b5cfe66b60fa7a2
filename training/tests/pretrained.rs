//! `hq-train --pretrained`: a run starts from an open_clip Hugging Face folder (`torch.save`
//! `.bin`), an open_clip training checkpoint (`.pt`, DDP prefixes), or a checkpoint of ours, and
//! all three give the same first step (bit for bit), unlike a random init. The `torch.save` files
//! are written by PyTorch itself (`tests/python/torch_checkpoints.py`, the venv's python); a pickle
//! that would run code is refused and runs nothing, and tensor views, shared storages and every
//! dtype a state dict holds read back exactly.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use hq_train::model::torch_pickle::read_torch_checkpoint;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// Runs `tests/python/torch_checkpoints.py` with the venv's python (`HQ_PYTHON`).
fn torch_script(args: &[&str]) {
    let py = std::env::var_os("HQ_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".venv/bin/python"));
    let script = workspace_root().join("tests/python/torch_checkpoints.py");
    let out = Command::new(&py)
        .arg(&script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} (source tools/env.sh): {e}", py.display()));
    assert!(
        out.status.success(),
        "{} {args:?}: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn hq_train(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hq-train"))
        .args(args)
        .env("HQ_NO_PROGRESS", "1")
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run hq-train")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `steps` steps of the tiny model from `start` (extra flags), returning the first logged loss.
fn first_loss(train: &Path, out: &Path, steps: &str, start: &[&str]) -> f64 {
    let out_s = out.display().to_string();
    let train_s = train.display().to_string();
    let mut args = vec![
        "--train",
        &train_s,
        "--variant",
        "mixed",
        "--steps",
        steps,
        "--warmup-steps",
        "0",
        "--batch-size",
        "8",
        "--image-size",
        "32",
        "--log-every",
        "1",
        "--threads",
        "1",
        "--set",
        "run.torch_threads=1",
        "--quiet",
        "--out",
        &out_s,
    ];
    args.extend_from_slice(start);
    let o = hq_train(&args);
    assert!(o.status.success(), "hq-train {start:?}:\n{}", text(&o));
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).expect("metrics");
    let line = metrics
        .lines()
        .find(|l| l.contains("\"kind\":\"train\""))
        .expect("a train line");
    let v: serde_json::Value = serde_json::from_str(line).expect("json");
    v["loss"].as_f64().expect("loss")
}

#[test]
fn open_clip_folders_torch_files_and_our_checkpoints_start_a_run_alike() {
    let dir = tempfile::tempdir().expect("tempdir");
    let train = hq_train::testing::tiny_corpus(&dir.path().join("corpus"));
    // A trained checkpoint of ours (2 steps), then the same weights in open_clip's two formats.
    let a = dir.path().join("a");
    first_loss(&train, &a, "2", &[]);
    let ckpt = hq_train::checkpoint::resolve(&a).expect("checkpoint");
    let oc = dir.path().join("oc");
    torch_script(&[
        "open-clip-folder",
        ckpt.to_str().expect("utf-8"),
        oc.to_str().expect("utf-8"),
    ]);
    let cfg = ckpt.join("model_config.json");
    let cfg = cfg.to_str().expect("utf-8");
    let hf = oc.join("hf");
    let pt = oc.join("epoch_1.pt");

    let from_ours = first_loss(
        &train,
        &dir.path().join("d"),
        "1",
        &["--pretrained", a.to_str().expect("utf-8")],
    );
    let out_b = dir.path().join("b");
    let from_hf = first_loss(
        &train,
        &out_b,
        "1",
        &["--pretrained", hf.to_str().expect("utf-8")],
    );
    let from_pt = first_loss(
        &train,
        &dir.path().join("e"),
        "1",
        &[
            "--pretrained",
            pt.to_str().expect("utf-8"),
            "--model-config",
            cfg,
        ],
    );
    let random = first_loss(&train, &dir.path().join("c"), "1", &["--model-config", cfg]);
    assert_eq!(
        from_hf.to_bits(),
        from_ours.to_bits(),
        "{from_hf} vs {from_ours}"
    );
    assert_eq!(
        from_pt.to_bits(),
        from_ours.to_bits(),
        "{from_pt} vs {from_ours}"
    );
    assert_ne!(
        random.to_bits(),
        from_ours.to_bits(),
        "the pretrained weights changed nothing"
    );
    // The folder's config was used (no --model given) and the run says where it started.
    let saved = std::fs::read_to_string(out_b.join("config.toml")).expect("config.toml");
    assert!(saved.contains("pretrained"), "{saved}");

    // Fine-tuning with the image tower locked (LiT) and the new STC head at its own rate: the
    // image tower's weights stay exactly the pretrained ones, the text tower's move.
    let out_l = dir.path().join("locked");
    first_loss(
        &train,
        &out_l,
        "2",
        &[
            "--pretrained",
            s(&a),
            "--set",
            "loss.variant=stc",
            "--lock-image",
            "--head-lr",
            "1e-2",
        ],
    );
    let before = hq_train::checkpoint::read_weights(&ckpt.join("model.safetensors")).expect("a");
    let after_dir = hq_train::checkpoint::resolve(&out_l).expect("locked checkpoint");
    let after =
        hq_train::checkpoint::read_weights(&after_dir.join("model.safetensors")).expect("l");
    let (mut same, mut moved) = (0, 0);
    for (name, t) in &before {
        let equal = after.get(name).is_some_and(|u| u.equal(t));
        if name.starts_with("visual.") {
            assert!(equal, "{name} changed under --lock-image");
            same += 1;
        } else if !equal {
            moved += 1;
        }
    }
    assert!(
        same > 0 && moved > 0,
        "{same} image tensors kept, {moved} others moved"
    );

    // Weights that do not fit the config given are refused by name.
    let o = hq_train(&[
        "--train",
        train.to_str().expect("utf-8"),
        "--pretrained",
        hf.to_str().expect("utf-8"),
        "--model",
        "hq-small",
        "--out",
        dir.path().join("f").to_str().expect("utf-8"),
    ]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("does not match the model's state dict"),
        "{}",
        text(&o)
    );
}

#[test]
fn a_pickle_that_would_run_code_is_refused_and_runs_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf-8");
    torch_script(&["evil", d]);
    let evil = dir.path().join("evil.pt");
    let e = read_torch_checkpoint(&evil)
        .expect_err("refused")
        .to_string();
    assert!(e.contains("refused") && e.contains("system"), "{e}");
    let train = hq_train::testing::tiny_corpus(&dir.path().join("corpus"));
    let o = hq_train(&[
        "--train",
        train.to_str().expect("utf-8"),
        "--pretrained",
        evil.to_str().expect("utf-8"),
        "--model",
        "hq-tiny",
        "--out",
        dir.path().join("run").to_str().expect("utf-8"),
    ]);
    assert!(!o.status.success());
    assert!(text(&o).contains("refused"), "{}", text(&o));
    assert!(!dir.path().join("pwned").exists(), "the pickle's code ran");
}

#[test]
fn views_shared_storages_and_dtypes_read_exactly() {
    let dir = tempfile::tempdir().expect("tempdir");
    torch_script(&["views", dir.path().to_str().expect("utf-8")]);
    let ours = read_torch_checkpoint(&dir.path().join("views.pt")).expect("views.pt");
    let want = tch::Tensor::read_safetensors(dir.path().join("views.safetensors")).expect("ref");
    assert_eq!(ours.len(), want.len());
    for (name, w) in &want {
        let o = ours.get(name).unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(o.kind(), w.kind(), "{name}");
        assert_eq!(o.size(), w.size(), "{name}");
        assert!(o.equal(w), "{name}: {o} vs {w}");
    }
}
