//! CLIP export (`hq-export`) and the ONNX Runtime encoder (`hq_runtime::OnnxClipEncoder`) against
//! tch and the reference tools.
//!
//! - Random-initialised `hq-tiny` (our init) and the same model with every weight perturbed (a
//!   stand-in for a trained checkpoint: LayerNorm gains and biases, attention biases and the
//!   projections all move away from their init values, so no term of the graph is exercised only at
//!   0 or 1): ONNX Runtime's embeddings through the `Encoder` trait equal tch's to 1e-4 at batch
//!   sizes 1, 3 and 8 (8 runs as two chunks of `max_batch = 4`), unnormalised and normalised, with
//!   and without I/O binding.
//! - fp16 export (f16 weights and compute): within 2e-3 absolute and cosine >= 0.9999 of tch's fp32
//!   normalised embeddings (f16 has an 11-bit mantissa, relative step 1e-3; measured on perturbed
//!   hq-tiny: 2.2e-4 image, 2.8e-4 text, cosine 0.999999).
//! - open_clip's own random init (tests/python/model_openclip.py `reference`), for the `hq-tiny`
//!   preset and two variants that turn on every optional feature of the graph (QuickGELU, tanh GELU,
//!   LayerScale, average pooling before/after `ln_post`, no pre-LN, eos/last pooling, bidirectional
//!   text, text projection with bias, other LayerNorm eps, non-square images): ONNX Runtime equals
//!   open_clip's `encode_image` / `encode_text` to 1e-4.
//! - Every exported model passes `onnx.checker.check_model(full_check=True)`, uses only the default
//!   ONNX domain at opset 17, names every node, has a symbolic batch dimension, and records the
//!   model config and the checkpoint's SHA-256 (compared with Python's hashlib) in its metadata.
//! - The open_clip and Hugging Face layouts load in open_clip (`create_model(pretrained=...)`,
//!   strict) and transformers (`CLIPModel.from_pretrained`) and give tch's embeddings to 1e-4.
//! - Bad input fails with a message naming the tensor or field: missing, unexpected, misshaped,
//!   integer and non-finite tensors, a checkpoint for another config, an unknown preset, an
//!   unsupported config key; and the encoder names bad token ids, wrong input sizes and missing
//!   model files.
//!
//! Python: `$HQ_PYTHON`, else `<workspace>/.venv/bin/python`. ONNX Runtime: `$ORT_DYLIB_PATH`, else
//! the venv's onnxruntime wheel. Run time: about a minute on 2 cores, most of it Python start-up.

use std::collections::BTreeMap;
use std::error::Error;
use std::path::{Path, PathBuf};
use std::process::Command;

use hq_eval::Encoder;
use hq_export::checkpoint::{expected_tensors, locate, resolve_config, Checkpoint};
use hq_export::clip::{export_onnx, ExportOptions, Precision};
use hq_export::formats::{export_hf, export_open_clip};
use hq_runtime::{ExecutionProvider, OnnxClipEncoder, OnnxEncoderOptions};
use hq_tests::{python, workspace_root};
use hq_train::model::{ClipConfig, Size2, TextPool, VisionPool};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

type BoxResult<T> = Result<T, Box<dyn Error>>;

const TOL: f64 = 1e-4;

/// Runs a script of tests/python and returns its stdout; panics with its stderr on failure.
fn run_py(script: &str, args: &[&std::ffi::OsStr]) -> String {
    let py = python();
    let path = workspace_root().join("tests/python").join(script);
    let out = Command::new(&py)
        .arg(&path)
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_OFFLINE", "1")
        .output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        Ok(o) => panic!(
            "{} {} {args:?} failed ({}):\n{}\n{}",
            py.display(),
            path.display(),
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!(
            "cannot run {} (set HQ_PYTHON or `source tools/env.sh`): {e}",
            py.display()
        ),
    }
}

/// `$ORT_DYLIB_PATH`, else `libonnxruntime.so.*` of the venv's onnxruntime wheel.
fn init_ort() -> BoxResult<()> {
    if hq_runtime::runtime().is_some() {
        return Ok(());
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        hq_runtime::init_from(PathBuf::from(p))?;
        return Ok(());
    }
    let lib = workspace_root().join(".venv/lib");
    for py in std::fs::read_dir(&lib)? {
        let capi = py?.path().join("site-packages/onnxruntime/capi");
        if let Ok(entries) = std::fs::read_dir(&capi) {
            for e in entries {
                let p = e?.path();
                if p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("libonnxruntime.so."))
                {
                    hq_runtime::init_from(&p)?;
                    return Ok(());
                }
            }
        }
    }
    Err(format!(
        "no ORT_DYLIB_PATH and no onnxruntime wheel under {}",
        lib.display()
    )
    .into())
}

fn to_vec_f32(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.to_kind(Kind::Float).flatten(0, -1)).expect("f32 tensor")
}

fn to_vec_i64(t: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(t.flatten(0, -1)).expect("i64 tensor")
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).abs())
        .fold(0.0, f64::max)
}

fn l2_normalize_rows(v: &[f32], dim: usize) -> Vec<f32> {
    v.chunks(dim)
        .flat_map(|row| {
            let n = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            row.iter().map(move |x| x / n).collect::<Vec<_>>()
        })
        .collect()
}

fn min_cosine(a: &[f32], b: &[f32], dim: usize) -> f64 {
    a.chunks(dim)
        .zip(b.chunks(dim))
        .map(|(x, y)| {
            let dot: f64 = x
                .iter()
                .zip(y)
                .map(|(p, q)| f64::from(*p) * f64::from(*q))
                .sum();
            let nx: f64 = x.iter().map(|p| f64::from(*p).powi(2)).sum::<f64>().sqrt();
            let ny: f64 = y.iter().map(|p| f64::from(*p).powi(2)).sum::<f64>().sqrt();
            dot / (nx * ny)
        })
        .fold(1.0, f64::min)
}

/// Deterministic inputs: images ~ N(0, 1), token rows `[sot, ids..., eot, 0...]` with the end token
/// at varied positions (right after the start, the last slot, and in between).
fn make_inputs(cfg: &ClipConfig, n: usize, seed: i64) -> (Tensor, Tensor) {
    tch::manual_seed(seed);
    let (h, w) = (
        cfg.vision_cfg.image_size.height(),
        cfg.vision_cfg.image_size.width(),
    );
    let images = Tensor::randn([n as i64, 3, h, w], (Kind::Float, Device::Cpu));
    let ctx = cfg.text_cfg.context_length;
    let vocab = cfg.text_cfg.vocab_size;
    let (sot, eot) = (vocab - 2, vocab - 1);
    let positions = [1, ctx - 1, ctx / 2, 5, 2, ctx - 2, 10, ctx / 3];
    let mut rows = vec![0i64; n * ctx as usize];
    let ids = to_vec_i64(&Tensor::randint_low(
        1,
        sot,
        [n as i64, ctx],
        (Kind::Int64, Device::Cpu),
    ));
    for i in 0..n {
        let p = positions[i % positions.len()].clamp(1, ctx - 1) as usize;
        let row = &mut rows[i * ctx as usize..(i + 1) * ctx as usize];
        row[0] = sot;
        row[1..p].copy_from_slice(&ids[i * ctx as usize + 1..i * ctx as usize + p]);
        row[p] = eot;
    }
    let text = Tensor::from_slice(&rows).view([n as i64, ctx]);
    (images, text)
}

fn tch_embeds(
    model: &hq_train::model::Clip,
    images: &Tensor,
    text: &Tensor,
) -> (Vec<f32>, Vec<f32>) {
    tch::no_grad(|| {
        (
            to_vec_f32(&model.encode_image(images).expect("encode_image")),
            to_vec_f32(&model.encode_text(text).expect("encode_text")),
        )
    })
}

/// Moves every weight away from its init value (a stand-in for trained weights).
fn perturb(model: &hq_train::model::Clip, seed: i64) {
    tch::manual_seed(seed);
    tch::no_grad(|| {
        for (_, t) in model.state_dict() {
            if t.kind() != Kind::Float {
                continue; // a BatchNorm counter
            }
            let noise = t.randn_like() * 0.05;
            let mut t = t.shallow_clone();
            let _ = t.f_add_(&noise).expect("perturb");
        }
    });
}

/// Writes an hq-train-style checkpoint directory: model.safetensors + model_config.json.
fn save_checkpoint_dir(model: &hq_train::model::Clip, cfg: &ClipConfig, dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).expect("mkdir");
    model
        .save_safetensors(dir.join("model.safetensors"))
        .expect("save");
    cfg.write_json_file(dir.join("model_config.json"))
        .expect("config");
    dir.join("model.safetensors")
}

fn export_dir(
    ckpt_path: &Path,
    cfg: &ClipConfig,
    opts: &ExportOptions,
    out: &Path,
) -> BoxResult<()> {
    let ckpt = Checkpoint::read(ckpt_path)?;
    export_onnx(cfg, &ckpt, opts, out)?;
    Ok(())
}

/// Runs `check-onnx` on both models of an export directory and checks the structural promises.
fn check_export(
    dir: &Path,
    checkpoint: &Path,
    cfg: &ClipConfig,
    precision: Precision,
) -> serde_json::Value {
    let image = dir.join("image_encoder.onnx");
    let text = dir.join("text_encoder.onnx");
    let out = run_py(
        "export_clip.py",
        &[
            "check-onnx".as_ref(),
            image.as_os_str(),
            text.as_os_str(),
            "--sha256-of".as_ref(),
            checkpoint.as_os_str(),
        ],
    );
    let report: serde_json::Value = serde_json::from_str(&out).expect("json");
    let sha = report["sha256"].as_str().expect("sha").to_string();
    let allowed = [
        "Add",
        "ArgMax",
        "AveragePool",
        "Cast",
        "Concat",
        "Conv",
        "Div",
        "Equal",
        "Erf",
        "Expand",
        "Gather",
        "GatherElements",
        "Identity",
        "LayerNormalization",
        "MatMul",
        "Max",
        "Mul",
        "Pad",
        "ReduceL2",
        "Relu",
        "ReduceMean",
        "Reshape",
        "Sigmoid",
        "Slice",
        "Softmax",
        "Split",
        "Squeeze",
        "Tanh",
        "Transpose",
        "Unsqueeze",
    ];
    for (path, (input, output, ty)) in [
        (&image, ("pixel_values", "image_embeds", "FLOAT")),
        (&text, ("input_ids", "text_embeds", "INT64")),
    ] {
        let m = &report["models"][path.display().to_string()];
        assert_eq!(
            m["opsets"],
            serde_json::json!({"": 17}),
            "{}",
            path.display()
        );
        assert_eq!(m["domains"], serde_json::json!([""]));
        assert_eq!(m["all_nodes_named"], true);
        for op in m["op_types"].as_array().expect("ops") {
            let op = op.as_str().unwrap_or_default();
            assert!(
                allowed.contains(&op),
                "{}: unexpected operator {op}",
                path.display()
            );
        }
        assert_eq!(m["inputs"][0]["name"], input);
        assert_eq!(m["inputs"][0]["elem_type"], ty);
        assert_eq!(m["inputs"][0]["shape"][0], "batch");
        assert_eq!(m["outputs"][0]["name"], output);
        assert_eq!(m["outputs"][0]["elem_type"], "FLOAT");
        assert_eq!(m["outputs"][0]["shape"][0], "batch");
        let md = &m["metadata"];
        assert_eq!(md["hq_clip.source_sha256"], sha.as_str());
        assert_eq!(md["hq_clip.precision"], precision.as_str());
        let recorded = ClipConfig::from_json_str(md["hq_clip.model_config"].as_str().unwrap_or(""))
            .expect("recorded config parses");
        assert_eq!(&recorded, cfg);
        let init_types: Vec<&str> = m["initializer_types"]
            .as_array()
            .expect("types")
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        match precision {
            Precision::Fp16 => assert!(init_types.contains(&"FLOAT16"), "{init_types:?}"),
            Precision::Fp32 => assert!(!init_types.contains(&"FLOAT16"), "{init_types:?}"),
        }
        // The graph is written for ONNX Runtime's CPU fusions (issue 6's throughput): every
        // linear layer on token rows becomes one Gemm (MatMul + bias Add), the erf GELU one
        // com.microsoft Gelu. A change that breaks a pattern shows here, not only as a slower
        // benchmark.
        let optimized = &m["ort_optimized_op_counts"];
        let count = |op: &str| optimized[op].as_u64().unwrap_or(0);
        let (layers, act_kwargs) = if path == &image {
            (cfg.vision_cfg.layers.depth(), &cfg.vision_cfg.act_kwargs)
        } else {
            (cfg.text_cfg.layers, &cfg.text_cfg.act_kwargs)
        };
        let layers = layers as u64;
        let erf_gelu =
            !cfg.quick_gelu && act_kwargs.as_ref().is_none_or(|a| a.approximate != "tanh");
        if precision == Precision::Fp32 {
            assert!(
                count("Gemm") >= 4 * layers,
                "{}: {} Gemm after ONNX Runtime's optimisation, expected >= {} (4 per block): {optimized}",
                path.display(),
                count("Gemm"),
                4 * layers
            );
            if erf_gelu {
                assert_eq!(
                    (count("com.microsoft:Gelu"), count("Erf")),
                    (layers, 0),
                    "{}: the erf GELU was not fused: {optimized}",
                    path.display()
                );
            }
        }
    }
    report
}

fn encoder(dir: &Path, max_batch: usize, io_binding: Option<bool>) -> OnnxClipEncoder {
    init_ort().expect("onnx runtime");
    let opts = OnnxEncoderOptions {
        max_batch,
        io_binding,
        intra_threads: Some(2),
        ..OnnxEncoderOptions::default()
    };
    match OnnxClipEncoder::load(dir, &ExecutionProvider::Cpu, &opts) {
        Ok(e) => e,
        Err(e) => panic!("loading {}: {e}", dir.display()),
    }
}

/// ONNX (through the Encoder trait) against tch at several batch sizes; returns the worst diff.
fn compare_at_batches(
    enc: &mut OnnxClipEncoder,
    model: &hq_train::model::Clip,
    cfg: &ClipConfig,
    normalized: bool,
    what: &str,
) -> f64 {
    let mut worst = 0.0f64;
    let dim = enc.embed_dim();
    for (n, seed) in [(1usize, 5i64), (3, 6), (8, 7)] {
        let (images, text) = make_inputs(cfg, n, seed);
        let (mut ti, mut tt) = tch_embeds(model, &images, &text);
        if normalized {
            ti = l2_normalize_rows(&ti, dim);
            tt = l2_normalize_rows(&tt, dim);
        }
        let oi = enc
            .encode_images(&to_vec_f32(&images), n)
            .expect("encode_images");
        let ot = enc
            .encode_texts(&to_vec_i64(&text), n)
            .expect("encode_texts");
        let (di, dt) = (max_abs_diff(&oi, &ti), max_abs_diff(&ot, &tt));
        eprintln!("{what}: batch {n}: max |onnx - tch| image {di:.2e}, text {dt:.2e}");
        assert!(
            di <= TOL && dt <= TOL,
            "{what}: batch {n}: image {di:e}, text {dt:e} > {TOL:e}"
        );
        worst = worst.max(di).max(dt);
    }
    worst
}

#[test]
fn hq_tiny_init_and_perturbed_weights_match_tch() -> BoxResult<()> {
    let tmp = tempfile::tempdir()?;
    let cfg = ClipConfig::hq_tiny();
    for (label, perturbed) in [("init", false), ("perturbed", true)] {
        tch::manual_seed(3);
        let vs = VarStore::new(Device::Cpu);
        let model = hq_train::model::Clip::new(vs.root(), &cfg)?;
        if perturbed {
            perturb(&model, 4);
        }
        let ckpt_dir = tmp.path().join(format!("ckpt-{label}"));
        let ckpt = save_checkpoint_dir(&model, &cfg, &ckpt_dir);

        // The checkpoint directory resolves to its weights and config, as the CLI does it.
        let loc = locate(&ckpt_dir)?;
        let read = Checkpoint::read(&loc.weights)?;
        let (resolved, _) = resolve_config(None, &loc, &read)?;
        assert_eq!(resolved, cfg);

        for normalize in [false, true] {
            let out = tmp.path().join(format!("onnx-{label}-{normalize}"));
            let opts = ExportOptions {
                precision: Precision::Fp32,
                normalize,
                model_name: Some("hq-tiny".into()),
                preprocess: hq_data::transform::Preprocess::default(),
            };
            export_dir(&ckpt, &cfg, &opts, &out)?;
            let mut enc = encoder(&out, 4, None);
            assert_eq!(enc.normalized(), normalize);
            assert_eq!(enc.context_length(), 77);
            assert_eq!(enc.embed_dim(), 128);
            assert_eq!(enc.image_transform().size(), (64, 64));
            assert!(enc.describe().contains("hq-tiny"), "{}", enc.describe());
            let worst = compare_at_batches(
                &mut enc,
                &model,
                &cfg,
                normalize,
                &format!("hq-tiny {label} normalize={normalize}"),
            );
            // The I/O-bound path gives the same numbers.
            let mut bound = encoder(&out, 4, Some(true));
            let (images, text) = make_inputs(&cfg, 5, 9);
            let (pix, ids) = (to_vec_f32(&images), to_vec_i64(&text));
            let a = enc.encode_images(&pix, 5)?;
            let b = bound.encode_images(&pix, 5)?;
            assert!(
                max_abs_diff(&a, &b) <= 1e-6,
                "io binding image: {}",
                max_abs_diff(&a, &b)
            );
            let a = enc.encode_texts(&ids, 5)?;
            let b = bound.encode_texts(&ids, 5)?;
            assert!(
                max_abs_diff(&a, &b) <= 1e-6,
                "io binding text: {}",
                max_abs_diff(&a, &b)
            );
            // An empty batch is an empty answer.
            assert!(enc.encode_images(&[], 0)?.is_empty());
            eprintln!("hq-tiny {label} normalize={normalize}: worst {worst:.2e}");
            if !normalize {
                check_export(&out, &ckpt, &cfg, Precision::Fp32);
            }
        }
    }
    Ok(())
}

#[test]
fn fp16_export_is_close_to_fp32() -> BoxResult<()> {
    let tmp = tempfile::tempdir()?;
    let cfg = ClipConfig::hq_tiny();
    tch::manual_seed(13);
    let vs = VarStore::new(Device::Cpu);
    let model = hq_train::model::Clip::new(vs.root(), &cfg)?;
    perturb(&model, 14);
    let ckpt = save_checkpoint_dir(&model, &cfg, &tmp.path().join("ckpt"));
    let out = tmp.path().join("onnx-fp16");
    let opts = ExportOptions {
        precision: Precision::Fp16,
        normalize: true,
        model_name: None,
        preprocess: hq_data::transform::Preprocess::default(),
    };
    export_dir(&ckpt, &cfg, &opts, &out)?;
    check_export(&out, &ckpt, &cfg, Precision::Fp16);
    let fp32_size = {
        let o = tmp.path().join("onnx-fp32");
        export_dir(
            &ckpt,
            &cfg,
            &ExportOptions {
                precision: Precision::Fp32,
                ..opts.clone()
            },
            &o,
        )?;
        std::fs::metadata(o.join("image_encoder.onnx"))?.len()
    };
    let fp16_size = std::fs::metadata(out.join("image_encoder.onnx"))?.len();
    assert!(
        fp16_size * 10 < fp32_size * 6,
        "fp16 {fp16_size} bytes vs fp32 {fp32_size}"
    );
    let mut enc = encoder(&out, 8, None);
    assert_eq!(enc.info().precision, "fp16");
    let n = 8;
    let (images, text) = make_inputs(&cfg, n, 15);
    let (ti, tt) = tch_embeds(&model, &images, &text);
    let (ti, tt) = (l2_normalize_rows(&ti, 128), l2_normalize_rows(&tt, 128));
    let oi = enc.encode_images(&to_vec_f32(&images), n)?;
    let ot = enc.encode_texts(&to_vec_i64(&text), n)?;
    let (di, dt) = (max_abs_diff(&oi, &ti), max_abs_diff(&ot, &tt));
    let (ci, ct) = (min_cosine(&oi, &ti, 128), min_cosine(&ot, &tt, 128));
    eprintln!("fp16: max |onnx - tch fp32| image {di:.2e} text {dt:.2e}; min cosine image {ci:.6} text {ct:.6}");
    assert!(
        di <= 2e-3 && dt <= 2e-3,
        "fp16 max abs diff image {di:e} text {dt:e}"
    );
    assert!(
        ci >= 0.9999 && ct >= 0.9999,
        "fp16 cosine image {ci} text {ct}"
    );
    Ok(())
}

fn read_st(path: &Path) -> BTreeMap<String, Tensor> {
    match Tensor::read_safetensors(path) {
        Ok(v) => v.into_iter().collect(),
        Err(e) => panic!("read {}: {e}", path.display()),
    }
}

/// open_clip random-initialises `config`, we export its checkpoint, ONNX Runtime must reproduce
/// open_clip's embeddings; tch (our model with the same checkpoint) is compared too.
fn open_clip_parity(config: &Path, batch: usize, seed: u64) -> BoxResult<()> {
    let cfg = ClipConfig::from_json_file(config)?;
    let name = config
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = tempfile::tempdir()?;
    let msg = run_py(
        "model_openclip.py",
        &[
            "reference".as_ref(),
            config.as_os_str(),
            dir.path().as_os_str(),
            "--seed".as_ref(),
            seed.to_string().as_ref(),
            "--batch".as_ref(),
            batch.to_string().as_ref(),
        ],
    );
    eprint!("{msg}");
    let ckpt = dir.path().join("openclip.safetensors");
    let inputs = read_st(&dir.path().join("inputs.safetensors"));
    let reference = read_st(&dir.path().join("reference.safetensors"));
    let out = dir.path().join("onnx");
    // The config comes from the file, as `hq-export --config FILE` reads it.
    let loc = locate(&ckpt)?;
    let read = Checkpoint::read(&loc.weights)?;
    let cfg_arg = config.display().to_string();
    let (resolved, source) = resolve_config(Some(&cfg_arg), &loc, &read)?;
    assert_eq!(resolved, cfg);
    assert_eq!(source.model_name().as_deref(), Some(name.as_str()));
    export_onnx(&cfg, &read, &ExportOptions::default(), &out)?;
    check_export(&out, &ckpt, &cfg, Precision::Fp32);

    let images = &inputs["images"];
    let text = &inputs["text"];
    let ref_i = to_vec_f32(&reference["image_embeds"]);
    let ref_t = to_vec_f32(&reference["text_embeds"]);
    let square = cfg.vision_cfg.image_size.height() == cfg.vision_cfg.image_size.width();
    let (oi, ot) = if square {
        let mut enc = encoder(&out, 4, None);
        (
            enc.encode_images(&to_vec_f32(images), batch)?,
            enc.encode_texts(&to_vec_i64(text), batch)?,
        )
    } else {
        // The encoder serves evaluation, whose transform needs square images: it refuses, and the
        // models are run through onnxruntime's Python API instead.
        init_ort()?;
        let err = OnnxClipEncoder::load(
            &out,
            &ExecutionProvider::Cpu,
            &OnnxEncoderOptions::default(),
        )
        .expect_err("non-square export must be refused by the eval encoder");
        assert!(err.to_string().contains("square"), "{err}");
        let feed_i = dir.path().join("feed_image.safetensors");
        let feed_t = dir.path().join("feed_text.safetensors");
        Tensor::write_safetensors(&[("pixel_values", images)], &feed_i)?;
        Tensor::write_safetensors(&[("input_ids", text)], &feed_t)?;
        let res_i = dir.path().join("res_image.safetensors");
        let res_t = dir.path().join("res_text.safetensors");
        for (m, f, r) in [
            ("image_encoder.onnx", &feed_i, &res_i),
            ("text_encoder.onnx", &feed_t, &res_t),
        ] {
            run_py(
                "export_clip.py",
                &[
                    "ort-run".as_ref(),
                    out.join(m).as_os_str(),
                    f.as_os_str(),
                    r.as_os_str(),
                ],
            );
        }
        (
            to_vec_f32(&read_st(&res_i)["image_embeds"]),
            to_vec_f32(&read_st(&res_t)["text_embeds"]),
        )
    };
    let (di, dt) = (max_abs_diff(&oi, &ref_i), max_abs_diff(&ot, &ref_t));
    eprintln!("{name}: max |onnx - open_clip| image {di:.2e}, text {dt:.2e} (batch {batch})");
    assert!(
        di <= TOL && dt <= TOL,
        "{name}: onnx vs open_clip image {di:e} text {dt:e}"
    );

    let vs = VarStore::new(Device::Cpu);
    let model = hq_train::model::Clip::new(vs.root(), &cfg)?;
    model.load_safetensors(&ckpt)?;
    let (ti, tt) = tch_embeds(&model, images, text);
    let (di, dt) = (max_abs_diff(&oi, &ti), max_abs_diff(&ot, &tt));
    eprintln!("{name}: max |onnx - tch| image {di:.2e}, text {dt:.2e}");
    assert!(
        di <= TOL && dt <= TOL,
        "{name}: onnx vs tch image {di:e} text {dt:e}"
    );
    Ok(())
}

#[test]
fn open_clip_random_init_models_match_open_clip() -> BoxResult<()> {
    open_clip_parity(
        &workspace_root().join("training/presets/hq-tiny.json"),
        6,
        11,
    )?;
    let dir = tempfile::tempdir()?;

    // QuickGELU, LayerScale, average pooling after ln_post's position swap, eos pooling, a
    // biased text projection, another LayerNorm eps, a logit bias, non-square images.
    let mut cfg = ClipConfig::hq_tiny();
    cfg.quick_gelu = true;
    cfg.init_logit_bias = Some(-10.0);
    cfg.vision_cfg.layers = 2.into();
    cfg.vision_cfg.image_size = Size2::HeightWidth([48, 64]);
    cfg.vision_cfg.mlp_ratio = 2.5;
    cfg.vision_cfg.ls_init_value = Some(0.5);
    cfg.vision_cfg.pool_type = VisionPool::Avg;
    cfg.vision_cfg.final_ln_after_pool = true;
    cfg.text_cfg.layers = 2;
    cfg.text_cfg.context_length = 32;
    cfg.text_cfg.proj_bias = true;
    cfg.text_cfg.pool_type = TextPool::Eos;
    cfg.text_cfg.eos_id = 49407;
    cfg.text_cfg.ls_init_value = Some(0.25);
    cfg.text_cfg.norm_kwargs = Some(hq_train::model::NormKwargs { eps: 1e-6 });
    let path = dir.path().join("hq-tiny-export-variant-a.json");
    cfg.write_json_file(&path)?;
    open_clip_parity(&path, 5, 21)?;

    // No pre-LN, tanh GELU, average pooling before ln_post, bidirectional text with last-token
    // pooling, a [1]-shaped logit scale.
    let mut cfg = ClipConfig::hq_tiny();
    cfg.nonscalar_logit_scale = true;
    cfg.vision_cfg.layers = 1.into();
    cfg.vision_cfg.no_ln_pre = true;
    cfg.vision_cfg.pool_type = VisionPool::Avg;
    cfg.vision_cfg.act_kwargs = Some(hq_train::model::ActKwargs {
        approximate: "tanh".into(),
    });
    cfg.text_cfg.layers = 1;
    cfg.text_cfg.no_causal_mask = true;
    cfg.text_cfg.pool_type = TextPool::Last;
    cfg.text_cfg.act_kwargs = Some(hq_train::model::ActKwargs {
        approximate: "tanh".into(),
    });
    let path = dir.path().join("hq-tiny-export-variant-b.json");
    cfg.write_json_file(&path)?;
    open_clip_parity(&path, 3, 31)?;
    Ok(())
}

/// A CPU-sized open_clip ModifiedResNet (the RN50 family): stages of `[1, 2, 1, 1]` blocks, width
/// 16, 64 px, an 8-head attention pool.
fn small_resnet() -> ClipConfig {
    ClipConfig::from_json_str(
        r#"{"embed_dim": 64,
            "vision_cfg": {"image_size": 64, "layers": [1, 2, 1, 1], "width": 16, "head_width": 64},
            "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 64, "heads": 2,
                         "layers": 1}}"#,
    )
    .expect("ResNet config")
}

/// The ModifiedResNet image tower in ONNX (BatchNorm folded into the convolutions): equal to
/// open_clip (BatchNorm weights and statistics randomised by the reference script) and to tch on a
/// perturbed model (every weight and statistic moved), at batch sizes 1, 3 and 8, and in fp16
/// within the fp16 bounds.
#[test]
fn modified_resnet_export_matches_open_clip_and_tch() -> BoxResult<()> {
    let cfg = small_resnet();
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("hq-rn-export.json");
    cfg.write_json_file(&path)?;
    open_clip_parity(&path, 4, 41)?;

    tch::manual_seed(5);
    let vs = VarStore::new(Device::Cpu);
    let model = hq_train::model::Clip::new(vs.root(), &cfg)?;
    perturb(&model, 6);
    tch::no_grad(|| {
        // Variances must stay positive: move them multiplicatively.
        for (name, t) in model.state_dict() {
            if name.ends_with(".running_var") {
                let mut t = t.shallow_clone();
                let _ = t.f_abs_().and_then(|mut t| t.f_add_scalar_(0.5));
            }
        }
    });
    let ckpt = save_checkpoint_dir(&model, &cfg, &dir.path().join("ckpt"));
    for precision in [Precision::Fp32, Precision::Fp16] {
        let out = dir.path().join(format!("onnx-{precision}"));
        let opts = ExportOptions {
            precision,
            normalize: true,
            model_name: Some("hq-rn-export".into()),
            preprocess: hq_data::transform::Preprocess::default(),
        };
        export_dir(&ckpt, &cfg, &opts, &out)?;
        let mut enc = encoder(&out, 4, None);
        if precision == Precision::Fp32 {
            compare_at_batches(&mut enc, &model, &cfg, true, "ModifiedResNet perturbed");
            continue;
        }
        let (images, text) = make_inputs(&cfg, 4, 8);
        let (ti, _) = tch_embeds(&model, &images, &text);
        let ti = l2_normalize_rows(&ti, 64);
        let oi = enc.encode_images(&to_vec_f32(&images), 4)?;
        let (d, cos) = (max_abs_diff(&oi, &ti), min_cosine(&oi, &ti, 64));
        eprintln!("ModifiedResNet fp16: max |onnx - tch| {d:.2e}, min cosine {cos:.6}");
        assert!(d <= 2e-3 && cos >= 0.9999, "fp16: {d:e}, cosine {cos}");
    }
    Ok(())
}

#[test]
fn expected_tensors_are_the_models_state_dict() -> BoxResult<()> {
    let mut variant = ClipConfig::hq_tiny();
    variant.init_logit_bias = Some(-1.0);
    variant.nonscalar_logit_scale = true;
    variant.vision_cfg.ls_init_value = Some(0.1);
    variant.vision_cfg.no_ln_pre = true;
    variant.text_cfg.proj_bias = true;
    let mut no_proj = ClipConfig::hq_tiny();
    no_proj.text_cfg.proj_type = hq_train::model::TextProjType::NoProjection;
    for cfg in [
        ClipConfig::hq_tiny(),
        ClipConfig::hq_small(),
        variant,
        no_proj,
        small_resnet(),
    ] {
        let vs = VarStore::new(Device::Cpu);
        let model = hq_train::model::Clip::new(vs.root(), &cfg)?;
        let mut ours: Vec<(String, Vec<usize>)> = model
            .state_dict()
            .iter()
            .map(|(n, t)| (n.clone(), t.size().iter().map(|&d| d as usize).collect()))
            .collect();
        let mut theirs = expected_tensors(&cfg);
        ours.sort();
        theirs.sort();
        assert_eq!(ours, theirs);
    }
    Ok(())
}

#[test]
fn open_clip_and_hugging_face_layouts_load_in_the_reference_tools() -> BoxResult<()> {
    let tmp = tempfile::tempdir()?;
    let cfg = ClipConfig::hq_tiny();
    tch::manual_seed(23);
    let vs = VarStore::new(Device::Cpu);
    let model = hq_train::model::Clip::new(vs.root(), &cfg)?;
    perturb(&model, 24);
    let ckpt_path = save_checkpoint_dir(&model, &cfg, &tmp.path().join("ckpt"));
    let ckpt = Checkpoint::read(&ckpt_path)?;
    let n = 4;
    let (images, text) = make_inputs(&cfg, n, 25);
    let inputs = tmp.path().join("inputs.safetensors");
    Tensor::write_safetensors(&[("images", &images), ("text", &text)], &inputs)?;
    let (ti, tt) = tch_embeds(&model, &images, &text);

    let oc = tmp.path().join("open_clip");
    let s = export_open_clip(&cfg, &ckpt, Precision::Fp32, "hq-tiny-trained", &oc)?;
    assert!(s.config.ends_with("hq-tiny-trained.json"));
    let res = tmp.path().join("open_clip_out.safetensors");
    run_py(
        "export_clip.py",
        &[
            "open-clip-run".as_ref(),
            oc.as_os_str(),
            "hq-tiny-trained".as_ref(),
            s.weights.as_os_str(),
            inputs.as_os_str(),
            res.as_os_str(),
        ],
    );
    let r = read_st(&res);
    let (di, dt) = (
        max_abs_diff(&to_vec_f32(&r["image_embeds"]), &ti),
        max_abs_diff(&to_vec_f32(&r["text_embeds"]), &tt),
    );
    eprintln!("open_clip layout: max |open_clip - tch| image {di:.2e}, text {dt:.2e}");
    assert!(
        di <= TOL && dt <= TOL,
        "open_clip layout: image {di:e} text {dt:e}"
    );
    // The written file is itself a valid checkpoint for a second export.
    let again = Checkpoint::read(&s.weights)?;
    again.validate(&cfg)?;

    let hf = tmp.path().join("hf");
    export_hf(&cfg, &ckpt, Precision::Fp32, &hf)?;
    let res = tmp.path().join("hf_out.safetensors");
    run_py(
        "export_clip.py",
        &[
            "hf-run".as_ref(),
            hf.as_os_str(),
            inputs.as_os_str(),
            res.as_os_str(),
        ],
    );
    let r = read_st(&res);
    let (di, dt) = (
        max_abs_diff(&to_vec_f32(&r["image_embeds"]), &ti),
        max_abs_diff(&to_vec_f32(&r["text_embeds"]), &tt),
    );
    eprintln!("Hugging Face layout: max |transformers - tch| image {di:.2e}, text {dt:.2e}");
    assert!(
        di <= TOL && dt <= TOL,
        "HF layout: image {di:e} text {dt:e}"
    );

    // A feature transformers' CLIP lacks is refused by name.
    let mut ls = cfg.clone();
    ls.vision_cfg.ls_init_value = Some(0.1);
    let vs = VarStore::new(Device::Cpu);
    let m = hq_train::model::Clip::new(vs.root(), &ls)?;
    let p = save_checkpoint_dir(&m, &ls, &tmp.path().join("ckpt-ls"));
    let err = export_hf(
        &ls,
        &Checkpoint::read(&p)?,
        Precision::Fp32,
        &tmp.path().join("hf-ls"),
    )
    .expect_err("LayerScale");
    assert!(err.to_string().contains("ls_init_value"), "{err}");
    Ok(())
}

#[test]
fn bad_checkpoints_and_inputs_fail_naming_the_problem() -> BoxResult<()> {
    let tmp = tempfile::tempdir()?;
    let cfg = ClipConfig::hq_tiny();
    tch::manual_seed(31);
    let vs = VarStore::new(Device::Cpu);
    let model = hq_train::model::Clip::new(vs.root(), &cfg)?;
    let sd = model.state_dict();
    let write = |name: &str, tensors: Vec<(String, Tensor)>| -> PathBuf {
        let p = tmp.path().join(name);
        Tensor::write_safetensors(&tensors, &p).expect("write");
        p
    };
    let export_err = |path: &Path, cfg: &ClipConfig| -> String {
        let out = tmp.path().join("never");
        match Checkpoint::read(path)
            .and_then(|c| export_onnx(cfg, &c, &ExportOptions::default(), &out))
        {
            Ok(_) => panic!("{} exported", path.display()),
            Err(e) => e.to_string(),
        }
    };

    // Missing, unexpected and misshaped tensors, all named in one message.
    let mut tensors: Vec<(String, Tensor)> = sd
        .iter()
        .filter(|(n, _)| n != "visual.ln_post.bias")
        .map(|(n, t)| {
            if n == "text_projection" {
                (
                    n.clone(),
                    Tensor::zeros([128, 64], (Kind::Float, Device::Cpu)),
                )
            } else {
                (n.clone(), t.shallow_clone())
            }
        })
        .collect();
    tensors.push((
        "visual.attnpool.weight".into(),
        Tensor::zeros([2], (Kind::Float, Device::Cpu)),
    ));
    let msg = export_err(&write("bad.safetensors", tensors), &cfg);
    for needle in [
        "1 missing: visual.ln_post.bias",
        "1 unexpected: visual.attnpool.weight",
        "text_projection (checkpoint [128, 64], config [128, 128])",
    ] {
        assert!(msg.contains(needle), "{needle:?} not in {msg}");
    }

    // A checkpoint for another config.
    let good = write(
        "good.safetensors",
        sd.iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect(),
    );
    let msg = export_err(&good, &ClipConfig::hq_small());
    assert!(
        msg.contains("visual.conv1.weight (checkpoint [128, 3, 8, 8], config [256, 3, 16, 16])"),
        "{msg}"
    );
    assert!(
        msg.contains("missing: visual.transformer.resblocks.4"),
        "{msg}"
    );

    // An integer tensor and a non-finite value are named.
    let ints: Vec<(String, Tensor)> = sd
        .iter()
        .map(|(n, t)| {
            if n == "logit_scale" {
                (n.clone(), Tensor::from(3i64))
            } else {
                (n.clone(), t.shallow_clone())
            }
        })
        .collect();
    let msg = export_err(&write("ints.safetensors", ints), &cfg);
    assert!(
        msg.contains("`logit_scale`") && msg.contains("I64"),
        "{msg}"
    );
    let nan: Vec<(String, Tensor)> = sd
        .iter()
        .map(|(n, t)| {
            if n == "visual.proj" {
                let bad = t.copy();
                let _ = bad.narrow(0, 2, 1).fill_(f64::NAN);
                (n.clone(), bad)
            } else {
                (n.clone(), t.shallow_clone())
            }
        })
        .collect();
    let msg = export_err(&write("nan.safetensors", nan), &cfg);
    assert!(
        msg.contains("`visual.proj`") && msg.contains("non-finite"),
        "{msg}"
    );

    // Not safetensors at all; a missing path.
    let junk = tmp.path().join("junk.safetensors");
    std::fs::write(&junk, b"not a checkpoint")?;
    let msg = Checkpoint::read(&junk).expect_err("junk").to_string();
    assert!(
        msg.contains("junk.safetensors") && msg.contains("safetensors"),
        "{msg}"
    );
    let msg = locate(&tmp.path().join("nope"))
        .expect_err("missing")
        .to_string();
    assert!(msg.contains("nope"), "{msg}");

    // Unknown preset; a config asking for an architecture the exporter does not implement; no config.
    let loc = locate(&good)?;
    let ckpt = Checkpoint::read(&good)?;
    let msg = resolve_config(Some("ViT-X-99"), &loc, &ckpt)
        .expect_err("preset")
        .to_string();
    assert!(msg.contains("ViT-X-99") && msg.contains("hq-tiny"), "{msg}");
    let timm = tmp.path().join("timm.json");
    std::fs::write(
        &timm,
        r#"{"embed_dim": 128, "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "image_size": 224}, "text_cfg": {}}"#,
    )?;
    let msg = resolve_config(Some(&timm.display().to_string()), &loc, &ckpt)
        .expect_err("timm")
        .to_string();
    assert!(msg.contains("vision_cfg.timm_model_name"), "{msg}");
    let msg = resolve_config(None, &loc, &ckpt)
        .expect_err("no config")
        .to_string();
    assert!(msg.contains("--config"), "{msg}");

    // The encoder: a directory without models, a missing text model, bad ids, wrong sizes.
    init_ort()?;
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty)?;
    let msg = OnnxClipEncoder::load(
        &empty,
        &ExecutionProvider::Cpu,
        &OnnxEncoderOptions::default(),
    )
    .expect_err("empty dir")
    .to_string();
    assert!(msg.contains("image_encoder.onnx"), "{msg}");
    let out = tmp.path().join("onnx");
    export_onnx(&cfg, &ckpt, &ExportOptions::default(), &out)?;
    let mut enc = encoder(&out, 4, None);
    let mut ids = vec![0i64; 2 * 77];
    ids[77 + 3] = 49408;
    let msg = enc.encode_texts(&ids, 2).expect_err("vocab").to_string();
    assert!(
        msg.contains("49408") && msg.contains("text 1, position 3"),
        "{msg}"
    );
    let msg = enc
        .encode_images(&[0.0; 10], 1)
        .expect_err("size")
        .to_string();
    assert!(msg.contains("pixel_values"), "{msg}");
    let msg = OnnxClipEncoder::load(
        &out,
        &ExecutionProvider::Cpu,
        &OnnxEncoderOptions {
            max_batch: 0,
            ..Default::default()
        },
    )
    .expect_err("max_batch")
    .to_string();
    assert!(msg.contains("max_batch"), "{msg}");
    std::fs::remove_file(out.join("text_encoder.onnx"))?;
    let msg = OnnxClipEncoder::load(
        &out,
        &ExecutionProvider::Cpu,
        &OnnxEncoderOptions::default(),
    )
    .expect_err("no text model")
    .to_string();
    assert!(
        msg.contains("text_encoder.onnx") && msg.contains("no such model file"),
        "{msg}"
    );
    // Asking for a GPU provider on the CPU-only wheel is an error, not a CPU fallback.
    let msg = OnnxClipEncoder::load(&out, &"cuda".parse()?, &OnnxEncoderOptions::default())
        .expect_err("cuda on the CPU wheel")
        .to_string();
    assert!(msg.contains("CUDAExecutionProvider"), "{msg}");
    Ok(())
}

/// The evaluation backends agree: `evaluate_builtin` over the built-in held-out sets gives the
/// same metrics through tch (`hq_train::TchEncoder` on the checkpoint) and through ONNX Runtime
/// (`OnnxClipEncoder` on its export). Embeddings differ by ~1e-6, so every prediction, and hence
/// every metric, must be identical.
#[test]
fn builtin_metrics_are_equal_through_tch_and_onnx() -> BoxResult<()> {
    let tmp = tempfile::tempdir()?;
    let cfg = ClipConfig::hq_tiny();
    tch::manual_seed(11);
    let vs = VarStore::new(Device::Cpu);
    let model = hq_train::model::Clip::new(vs.root(), &cfg)?;
    perturb(&model, 12);
    let ckpt_dir = tmp.path().join("ckpt");
    let ckpt = save_checkpoint_dir(&model, &cfg, &ckpt_dir);
    let onnx_dir = tmp.path().join("onnx");
    let opts = ExportOptions {
        precision: Precision::Fp32,
        normalize: false,
        model_name: Some("hq-tiny".into()),
        preprocess: hq_data::transform::Preprocess::default(),
    };
    export_dir(&ckpt, &cfg, &opts, &onnx_dir)?;

    let synth = hq_data::synth::SynthConfig {
        eval_samples: 48,
        eval_shard_size: 24,
        ..hq_data::synth::SynthConfig::default()
    };
    let eval_dir = tmp.path().join("eval");
    hq_data::synth::evalsets::write_eval_sets(&synth, &eval_dir, false)?;
    let run = hq_eval::RunOptions {
        progress: false,
        batch_size: 16,
        aro_attribute_min_count: 1,
        ..hq_eval::RunOptions::default()
    };

    let mut tch_encoder = hq_train::TchEncoder::from_checkpoint(&ckpt, Some(&cfg), Device::Cpu)?;
    let via_tch = hq_eval::evaluate_builtin(&mut tch_encoder, &eval_dir, &run)?.summary();
    let mut onnx_encoder = encoder(&onnx_dir, 16, None);
    let via_onnx = hq_eval::evaluate_builtin(&mut onnx_encoder, &eval_dir, &run)?.summary();

    assert_eq!(via_tch.len(), via_onnx.len());
    assert!(via_tch.len() >= 8, "{via_tch:?}");
    for ((name_t, value_t), (name_o, value_o)) in via_tch.iter().zip(&via_onnx) {
        eprintln!("{name_t}: tch {value_t:.6}, onnx {value_o:.6}");
        assert_eq!(name_t, name_o);
        // The embedding diagnostics are continuous (a cosine) or fitted (a ridge probe on about
        // half of the 48 images): equal up to the embeddings' 1e-6 differences, one test image
        // (of 15 or more) at most.
        let tolerance = if name_t.ends_with("/prompt_cosine") {
            1e-5
        } else if name_t.ends_with("/probe_acc1") {
            1.0 / 15.0
        } else {
            0.0
        };
        assert!(
            (value_t - value_o).abs() <= tolerance,
            "{name_t}: tch {value_t} vs onnx {value_o}"
        );
    }
    Ok(())
}
