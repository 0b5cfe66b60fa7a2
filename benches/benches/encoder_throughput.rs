//! Image-encoder throughput on the CPU: ONNX Runtime (the `hq-export` model through
//! `hq_runtime::OnnxClipEncoder`) against tch (`hq_train::model::Clip`) and PyTorch open_clip
//! (`benches/python/encoder_throughput.py`), same weights, inputs, batch size and thread count.
//!
//! `cargo bench -p hq-benches --bench encoder_throughput`
//!
//! Settings (environment):
//! - `HQ_BENCH_MODEL`: preset (default `ViT-B-32`; `hq-tiny`, `hq-small`, `ViT-B-16`, `ViT-L-14`);
//! - `HQ_BENCH_BATCH`: images per call (default 16);
//! - `HQ_BENCH_THREADS`: intra-op threads for all three (default: all cores);
//! - `HQ_BENCH_REPEATS`: timed calls per backend for the summary (default 10);
//! - `HQ_BENCH_ORT_SPIN`: `0` stops ONNX Runtime's idle intra-op threads from spinning (default:
//!   ONNX Runtime's own, spinning; worth turning off only on a machine whose cores are shared);
//! - `HQ_SKIP_PYTHON_BENCH=1` skips PyTorch.
//!
//! The weights are a seeded random init moved off their init values (throughput does not depend
//! on the values; the perturbation only keeps LayerNorm and biases from being trivial), written as
//! an open_clip safetensors checkpoint, exported to ONNX fp32 with `hq_export::clip::export_onnx`,
//! and loaded by all three. Criterion measures ONNX Runtime and tch; the summary then times every
//! backend the same way (two warm-up calls, then the median wall time of `HQ_BENCH_REPEATS` calls,
//! no gradients, fp32) and prints images/s and the ratios, checks that all three computed the same
//! embeddings (max abs diff), and writes them to `target/bench-results/encoder_throughput.json`.
//! Target (issue 6): ONNX Runtime >= 1.3x PyTorch.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use hq_eval::Encoder;
use hq_export::checkpoint::Checkpoint;
use hq_export::clip::{export_onnx, ExportOptions};
use hq_runtime::{ExecutionProvider, OnnxClipEncoder, OnnxEncoderOptions};
use hq_train::model::{Clip, ClipConfig};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|v| *v > 0)
        .unwrap_or(default)
}

struct Setup {
    _dir: tempfile::TempDir,
    name: String,
    cfg: ClipConfig,
    config_path: PathBuf,
    checkpoint: PathBuf,
    inputs: PathBuf,
    images: Tensor,
    pixels: Vec<f32>,
    batch: usize,
    threads: usize,
    repeats: usize,
    model: Clip,
    _vs: VarStore,
    onnx: OnnxClipEncoder,
}

fn setup() -> Setup {
    let name = std::env::var("HQ_BENCH_MODEL").unwrap_or_else(|_| "ViT-B-32".to_string());
    let cfg = match ClipConfig::preset(&name) {
        Ok(c) => c,
        Err(e) => panic!("HQ_BENCH_MODEL: {e}"),
    };
    let batch = env_usize("HQ_BENCH_BATCH", 16);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = env_usize("HQ_BENCH_THREADS", cores);
    let repeats = env_usize("HQ_BENCH_REPEATS", 10);
    tch::set_num_threads(threads as i32);
    let dir = tempfile::tempdir().expect("tempdir");

    tch::manual_seed(0);
    let vs = VarStore::new(Device::Cpu);
    let model = Clip::new(vs.root(), &cfg).expect("model");
    tch::no_grad(|| {
        for (_, t) in model.state_dict() {
            let noise = t.randn_like() * 0.02;
            let mut t = t.shallow_clone();
            let _ = t.f_add_(&noise).expect("perturb");
        }
    });
    let checkpoint = dir.path().join("model.safetensors");
    model.save_safetensors(&checkpoint).expect("save");
    let config_path = dir.path().join(format!("{name}.json"));
    cfg.write_json_file(&config_path).expect("config");

    let export = dir.path().join("onnx");
    let ckpt = Checkpoint::read(&checkpoint).expect("read checkpoint");
    let t0 = Instant::now();
    export_onnx(&cfg, &ckpt, &ExportOptions::default(), &export).expect("export");
    println!(
        "{name}: exported to ONNX in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    drop(ckpt);
    let opts = OnnxEncoderOptions {
        intra_threads: Some(threads),
        max_batch: batch,
        intra_op_spinning: std::env::var("HQ_BENCH_ORT_SPIN")
            .ok()
            .map(|v| v.trim() != "0"),
        ..OnnxEncoderOptions::default()
    };
    let onnx = match OnnxClipEncoder::load(&export, &ExecutionProvider::Cpu, &opts) {
        Ok(e) => e,
        Err(e) => panic!("loading the ONNX encoder (source tools/env.sh for ORT_DYLIB_PATH): {e}"),
    };

    let (h, w) = (
        cfg.vision_cfg.image_size.height(),
        cfg.vision_cfg.image_size.width(),
    );
    tch::manual_seed(1);
    let images = Tensor::randn([batch as i64, 3, h, w], (Kind::Float, Device::Cpu));
    let pixels = Vec::<f32>::try_from(images.flatten(0, -1)).expect("pixels");
    let inputs = dir.path().join("inputs.safetensors");
    Tensor::write_safetensors(&[("images", &images)], &inputs).expect("inputs");
    Setup {
        _dir: dir,
        name,
        cfg,
        config_path,
        checkpoint,
        inputs,
        images,
        pixels,
        batch,
        threads,
        repeats,
        model,
        _vs: vs,
        onnx,
    }
}

fn tch_forward(s: &Setup) -> Tensor {
    tch::no_grad(|| s.model.encode_image(&s.images).expect("tch encode_image"))
}

fn bench(c: &mut Criterion, s: &mut Setup) {
    let mut g = c.benchmark_group(format!("image_encoder/{}/batch{}", s.name, s.batch));
    g.throughput(Throughput::Elements(s.batch as u64));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(20));
    g.bench_function("onnxruntime_cpu", |b| {
        b.iter(|| {
            s.onnx
                .encode_images(&s.pixels, s.batch)
                .expect("onnx encode")
        })
    });
    let s_ref: &Setup = s;
    g.bench_function("tch_cpu", |b| b.iter(|| tch_forward(s_ref)));
    g.finish();
}

/// Median images/s over `repeats` calls after two warm-up calls.
fn rate(batch: usize, repeats: usize, mut f: impl FnMut()) -> f64 {
    f();
    f();
    let mut secs: Vec<f64> = (0..repeats)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    secs.sort_by(f64::total_cmp);
    batch as f64 / secs[secs.len() / 2]
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).abs())
        .fold(0.0, f64::max)
}

fn python_rate(s: &Setup) -> Option<(f64, serde_json::Value, Vec<f32>)> {
    if std::env::var_os("HQ_SKIP_PYTHON_BENCH").is_some() {
        return None;
    }
    let python = std::env::var_os("HQ_PYTHON")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".venv/bin/python"));
    let script = workspace_root().join("benches/python/encoder_throughput.py");
    let out_path = s.inputs.with_file_name("pytorch_embeds.safetensors");
    let out = Command::new(&python)
        .arg(&script)
        .arg(&s.config_path)
        .arg(&s.checkpoint)
        .arg(&s.inputs)
        .arg(&out_path)
        .arg("--threads")
        .arg(s.threads.to_string())
        .arg("--repeats")
        .arg(s.repeats.to_string())
        .env("HF_HUB_OFFLINE", "1")
        .output();
    let out = match out {
        Ok(o) if o.status.success() => o,
        Ok(o) => {
            eprintln!(
                "{} failed:\n{}",
                script.display(),
                String::from_utf8_lossy(&o.stderr)
            );
            return None;
        }
        Err(e) => {
            eprintln!("cannot run {}: {e}", python.display());
            return None;
        }
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let json: serde_json::Value = text
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())?;
    let r = json["images_per_s"].as_f64()?;
    let embeds = Tensor::read_safetensors(&out_path)
        .ok()?
        .into_iter()
        .find(|(n, _)| n == "image_embeds")
        .and_then(|(_, t)| Vec::<f32>::try_from(t.flatten(0, -1)).ok())?;
    Some((r, json, embeds))
}

fn summary(s: &mut Setup) {
    let (batch, repeats) = (s.batch, s.repeats);
    let onnx_out = s.onnx.encode_images(&s.pixels, batch).expect("onnx");
    let tch_out = Vec::<f32>::try_from(tch_forward(s).flatten(0, -1)).expect("tch out");
    let ort_rate = rate(batch, repeats, || {
        let _ = s.onnx.encode_images(&s.pixels, batch).expect("onnx");
    });
    let s_ref: &Setup = s;
    let tch_rate = rate(batch, repeats, || {
        let _ = tch_forward(s_ref);
    });
    let py = python_rate(s);
    println!(
        "\nimage encoder {} (fp32, CPU, batch {batch}, {} threads, median of {repeats} calls):",
        s.name, s.threads
    );
    println!("  ONNX Runtime  {ort_rate:8.1} images/s");
    println!(
        "  tch           {tch_rate:8.1} images/s   (ONNX Runtime / tch = {:.2}x)",
        ort_rate / tch_rate
    );
    println!(
        "  max |onnx - tch| = {:.2e}",
        max_abs_diff(&onnx_out, &tch_out)
    );
    let mut result = serde_json::json!({
        "model": s.name,
        "embed_dim": s.cfg.embed_dim,
        "batch": batch,
        "threads": s.threads,
        "repeats": repeats,
        "onnxruntime_cpu_images_per_s": ort_rate,
        "tch_cpu_images_per_s": tch_rate,
        "onnx_over_tch": ort_rate / tch_rate,
        "max_abs_diff_onnx_tch": max_abs_diff(&onnx_out, &tch_out),
    });
    if let Some((py_rate, json, embeds)) = py {
        let diff = max_abs_diff(&onnx_out, &embeds);
        println!(
            "  PyTorch       {py_rate:8.1} images/s   (ONNX Runtime / PyTorch = {:.2}x; target >= 1.3x)",
            ort_rate / py_rate
        );
        println!("  max |onnx - open_clip| = {diff:.2e}");
        result["pytorch_open_clip_images_per_s"] = py_rate.into();
        result["onnx_over_pytorch"] = (ort_rate / py_rate).into();
        result["max_abs_diff_onnx_pytorch"] = diff.into();
        result["pytorch"] = json;
    } else {
        println!("  PyTorch       skipped");
    }
    let dir = workspace_root().join("target/bench-results");
    if std::fs::create_dir_all(&dir).is_ok() {
        let path = dir.join("encoder_throughput.json");
        match std::fs::write(
            &path,
            serde_json::to_string_pretty(&result).unwrap_or_default(),
        ) {
            Ok(()) => println!("  written to {}", path.display()),
            Err(e) => eprintln!("cannot write {}: {e}", path.display()),
        }
    }
}

fn main() {
    let mut s = setup();
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c, &mut s);
    c.final_summary();
    summary(&mut s);
}
