//! The `hq-export` command: every format from an hq-train-style checkpoint directory, and failures
//! that name the tensor or option. The numbers of the exported models are tested against tch, open_clip
//! and transformers in `tests/tests/export_clip.rs`; this file tests the command line around them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use hq_export::checkpoint::expected_tensors;
use hq_export::onnx::ModelProto;
use hq_export::prost::Message;
use hq_train::model::ClipConfig;
use safetensors::tensor::TensorView;
use safetensors::Dtype;

fn small_config() -> ClipConfig {
    let mut cfg = ClipConfig::hq_tiny();
    cfg.vision_cfg.layers = 1.into();
    cfg.text_cfg.layers = 1;
    cfg.text_cfg.vocab_size = 1000;
    cfg.text_cfg.context_length = 16;
    cfg
}

/// Writes a checkpoint with every tensor of `cfg` (deterministic pseudo-random values), minus
/// `skip`, into `dir/model.safetensors` plus `dir/model_config.json`.
fn write_checkpoint(dir: &Path, cfg: &ClipConfig, skip: Option<&str>) -> PathBuf {
    std::fs::create_dir_all(dir).expect("mkdir");
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut bytes: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, shape) in expected_tensors(cfg) {
        if Some(name.as_str()) == skip {
            continue;
        }
        let n: usize = shape.iter().product();
        let data: Vec<u8> = (0..n)
            .flat_map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let v = ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1;
                v.to_le_bytes()
            })
            .collect();
        bytes.push((name, shape, data));
    }
    let views: Vec<(String, TensorView<'_>)> = bytes
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), d).expect("view"),
            )
        })
        .collect();
    let path = dir.join("model.safetensors");
    safetensors::tensor::serialize_to_file(views, &None, &path).expect("write");
    cfg.write_json_file(dir.join("model_config.json"))
        .expect("config");
    path
}

fn hq_export(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hq-export"))
        .args(args)
        .output()
        .expect("run hq-export")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn exports_every_format_from_a_checkpoint_directory() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cfg = small_config();
    let ckpt_dir = tmp.path().join("run/step-00000010");
    let weights = write_checkpoint(&ckpt_dir, &cfg, None);
    // A run directory whose `latest` names the checkpoint resolves to it.
    std::fs::write(tmp.path().join("run/latest"), "step-00000010\n").expect("latest");

    let out = tmp.path().join("onnx");
    let o = hq_export(&[
        "--checkpoint".as_ref(),
        tmp.path().join("run").as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
        "--normalize".as_ref(),
        "--name".as_ref(),
        "tiny-test".as_ref(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    for f in [
        "image_encoder.onnx",
        "text_encoder.onnx",
        "open_clip_config.json",
        "export.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("export.json")).expect("manifest"))
            .expect("json");
    let sha = hq_export::checkpoint::sha256_hex(&std::fs::read(&weights).expect("weights"));
    assert_eq!(manifest["source_sha256"], sha.as_str());
    assert_eq!(manifest["normalized"], true);
    let model = ModelProto::decode(
        std::fs::read(out.join("text_encoder.onnx"))
            .expect("model")
            .as_slice(),
    )
    .expect("decode");
    let md: std::collections::BTreeMap<String, String> = model
        .metadata_props
        .iter()
        .map(|p| {
            (
                p.key.clone().unwrap_or_default(),
                p.value.clone().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(md["hq_clip.model_name"], "tiny-test");
    assert_eq!(md["hq_clip.context_length"], "16");
    assert_eq!(md["hq_clip.vocab_size"], "1000");
    assert_eq!(md["hq_clip.source_sha256"], sha);
    assert_eq!(md["hq_clip.normalized"], "true");

    let o = hq_export(&[
        "--checkpoint".as_ref(),
        ckpt_dir.as_os_str(),
        "--out".as_ref(),
        tmp.path().join("onnx16").as_os_str(),
        "--precision".as_ref(),
        "fp16".as_ref(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let fp32 = std::fs::metadata(out.join("image_encoder.onnx"))
        .expect("fp32")
        .len();
    let fp16 = std::fs::metadata(tmp.path().join("onnx16/image_encoder.onnx"))
        .expect("fp16")
        .len();
    assert!(fp16 * 10 < fp32 * 6, "fp16 {fp16} vs fp32 {fp32}");

    let oc = tmp.path().join("oc");
    let o = hq_export(&[
        "--checkpoint".as_ref(),
        weights.as_os_str(),
        "--out".as_ref(),
        oc.as_os_str(),
        "--format".as_ref(),
        "open_clip".as_ref(),
        "--name".as_ref(),
        "tiny-test".as_ref(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(oc.join("open_clip_model.safetensors").is_file());
    let written = ClipConfig::from_json_file(oc.join("tiny-test.json")).expect("config");
    assert_eq!(written, cfg);

    let hf = tmp.path().join("hf");
    let o = hq_export(&[
        "--checkpoint".as_ref(),
        weights.as_os_str(),
        "--out".as_ref(),
        hf.as_os_str(),
        "--format".as_ref(),
        "hf".as_ref(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(hf.join("config.json")).expect("config"))
            .expect("json");
    assert_eq!(config["text_config"]["max_position_embeddings"], 16);
    assert_eq!(config["vision_config"]["image_size"], 64);
    assert!(hf.join("model.safetensors").is_file());
}

#[test]
fn failures_name_the_tensor_or_option() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cfg = small_config();
    let dir = tmp.path().join("ckpt");
    let weights = write_checkpoint(&dir, &cfg, Some("ln_final.bias"));
    let o = hq_export(&[
        "--checkpoint".as_ref(),
        dir.as_os_str(),
        "--out".as_ref(),
        tmp.path().join("out").as_os_str(),
    ]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("1 missing: ln_final.bias"), "{e}");
    assert!(
        !tmp.path().join("out/export.json").exists(),
        "a failed export left a manifest"
    );

    // The config next to the weights wins unless --config is given; a wrong one is named.
    let good = write_checkpoint(&tmp.path().join("good"), &cfg, None);
    let o = hq_export(&[
        "--checkpoint".as_ref(),
        good.as_os_str(),
        "--config".as_ref(),
        "hq-small".as_ref(),
        "--out".as_ref(),
        tmp.path().join("out2").as_os_str(),
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o)
            .contains("visual.conv1.weight (checkpoint [128, 3, 8, 8], config [256, 3, 16, 16])"),
        "{}",
        stderr(&o)
    );
    let o = hq_export(&[
        "--checkpoint".as_ref(),
        good.as_os_str(),
        "--config".as_ref(),
        "no-such-preset".as_ref(),
        "--out".as_ref(),
        tmp.path().join("out3").as_os_str(),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no-such-preset"), "{}", stderr(&o));
    let o = hq_export(&[
        "--checkpoint".as_ref(),
        weights.as_os_str(),
        "--out".as_ref(),
        tmp.path().join("out4").as_os_str(),
        "--format".as_ref(),
        "open_clip".as_ref(),
        "--normalize".as_ref(),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--normalize"), "{}", stderr(&o));
    let o = hq_export(&[
        "--checkpoint".as_ref(),
        tmp.path().join("missing").as_os_str(),
        "--out".as_ref(),
        tmp.path().join("out5").as_os_str(),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("missing"), "{}", stderr(&o));
}

/// The same weights as an open_clip Hugging Face folder (`open_clip_config.json` +
/// `open_clip_pytorch_model.bin`, written by PyTorch's `torch.save` in the venv) export to the same
/// ONNX weights as the safetensors checkpoint they came from.
#[test]
fn an_open_clip_folder_with_a_torch_bin_exports_the_same_weights() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cfg = small_config();
    let ckpt_dir = tmp.path().join("ckpt");
    write_checkpoint(&ckpt_dir, &cfg, None);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let py = std::env::var_os("HQ_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".venv/bin/python"));
    let oc = tmp.path().join("oc");
    let o = Command::new(&py)
        .arg(root.join("tests/python/torch_checkpoints.py"))
        .arg("open-clip-folder")
        .arg(&ckpt_dir)
        .arg(&oc)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} (source tools/env.sh): {e}", py.display()));
    assert!(o.status.success(), "{}", stderr(&o));

    let weights = |out: &Path| -> Vec<(String, Vec<u8>)> {
        let model = ModelProto::decode(
            std::fs::read(out.join("image_encoder.onnx"))
                .expect("model")
                .as_slice(),
        )
        .expect("decode");
        let graph = model.graph.expect("graph");
        graph
            .initializer
            .iter()
            .map(|t| {
                (
                    t.name.clone().unwrap_or_default(),
                    t.raw_data.clone().unwrap_or_default(),
                )
            })
            .collect()
    };
    let (a, b) = (tmp.path().join("from-st"), tmp.path().join("from-bin"));
    for (src, out) in [(&ckpt_dir, &a), (&oc.join("hf"), &b)] {
        let o = hq_export(&[
            "--checkpoint".as_ref(),
            src.as_os_str(),
            "--out".as_ref(),
            out.as_os_str(),
        ]);
        assert!(o.status.success(), "{}: {}", src.display(), stderr(&o));
    }
    let (wa, wb) = (weights(&a), weights(&b));
    assert!(!wa.is_empty());
    assert_eq!(
        wa, wb,
        "the .bin exported other weights than the safetensors"
    );
}

/// A model that reads a Hugging Face tokenizer (CLIPA's `hf_tokenizer_name`) ships it: the
/// tokenizer files beside the weights are copied into every export, byte for byte, and an export
/// without them is refused with a message naming the missing file.
#[test]
fn a_model_with_a_hugging_face_tokenizer_ships_it_with_the_export() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut cfg = small_config();
    cfg.text_cfg.hf_tokenizer_name = Some("bert-base-uncased".into());
    cfg.text_cfg.tokenizer_kwargs = Some(serde_json::json!({"strip_sep_token": true}));
    let ckpt_dir = tmp.path().join("ckpt");
    write_checkpoint(&ckpt_dir, &cfg, None);
    let out = tmp.path().join("refused");
    let o = hq_export(&[
        "--checkpoint".as_ref(),
        ckpt_dir.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no tokenizer.json"), "{}", stderr(&o));

    let files = [
        ("tokenizer.json", "{\"version\": \"1.0\"}\n"),
        ("tokenizer_config.json", "{\"pad_token\": \"[PAD]\"}\n"),
    ];
    for (name, text) in files {
        std::fs::write(ckpt_dir.join(name), text).expect("write");
    }
    for format in ["onnx", "open-clip"] {
        let out = tmp.path().join(format);
        let o = hq_export(&[
            "--checkpoint".as_ref(),
            ckpt_dir.as_os_str(),
            "--format".as_ref(),
            format.as_ref(),
            "--out".as_ref(),
            out.as_os_str(),
        ]);
        assert!(o.status.success(), "{format}: {}", stderr(&o));
        for (name, text) in files {
            assert_eq!(
                std::fs::read_to_string(out.join(name)).expect("copied"),
                text,
                "{format}: {name}"
            );
        }
    }
}
