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

/// An open_clip folder's `preprocess_cfg` (here CLIPA-like: mean and std 0.5/0.25, squash resize)
/// is what evaluation and training normalise with; `data.image_*` overrides it; what we cannot
/// reproduce (bilinear) is refused.
#[test]
fn a_folders_preprocess_cfg_is_honoured() {
    use hq_data::transform::{ImageTransform, Preprocess};
    use hq_eval::Encoder;
    use hq_train::model::{Clip, ClipConfig};
    use rand::SeedableRng;

    let dir = tempfile::tempdir().expect("tempdir");
    let hf = dir.path().join("hf");
    std::fs::create_dir_all(&hf).expect("mkdir");
    let cfg = ClipConfig::hq_tiny();
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let model = Clip::new(vs.root(), &cfg).expect("model");
    model
        .save_safetensors(hf.join("open_clip_model.safetensors"))
        .expect("save");
    let write_cfg = |pre: serde_json::Value| {
        let model_cfg: serde_json::Value =
            serde_json::from_str(&cfg.to_json_string().expect("json")).expect("json");
        let v = serde_json::json!({"model_cfg": model_cfg, "preprocess_cfg": pre});
        std::fs::write(hf.join("open_clip_config.json"), v.to_string()).expect("write");
    };
    write_cfg(
        serde_json::json!({"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
                                 "resize_mode": "squash", "interpolation": "bicubic"}),
    );

    let img = image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(100, 50, |x, y| {
        image::Rgb([(x * 2) as u8, (y * 5) as u8, ((x + y) % 256) as u8])
    }));
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let enc = hq_train::TchEncoder::from_checkpoint(&hf, None, tch::Device::Cpu).expect("encoder");
    let want = Preprocess {
        mean: [0.5; 3],
        std: [0.25; 3],
        squash: true,
    }
    .eval_transform(64)
    .apply(&img, &mut rng);
    assert_eq!(enc.image_transform().apply(&img, &mut rng), want);
    assert_ne!(ImageTransform::eval(64).apply(&img, &mut rng), want);

    let mut tc = hq_train::config::TrainConfig::default();
    tc.model.pretrained = Some(hf.clone());
    assert_eq!(
        tc.normalization().expect("norm"),
        Some(([0.5; 3], [0.25; 3]))
    );
    tc.data.image_std = Some([0.3; 3]);
    assert_eq!(
        tc.normalization().expect("norm"),
        Some(([0.5; 3], [0.3; 3]))
    );

    write_cfg(serde_json::json!({"interpolation": "bilinear"}));
    let e = hq_train::TchEncoder::from_checkpoint(&hf, None, tch::Device::Cpu)
        .expect_err("refused")
        .to_string();
    assert!(e.contains("bilinear"), "{e}");
}
