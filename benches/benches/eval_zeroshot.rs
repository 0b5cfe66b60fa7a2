//! Zero-shot classification throughput of a full task: `hq-eval` (tch CLIP, images decoded on a
//! rayon pool while the model encodes the previous batch) against CLIP_benchmark 1.6.2 + PyTorch
//! (its `wds/` path: webdataset + DataLoader workers + `zeroshot_classification.evaluate`) on the
//! same random-initialised open_clip model, the same data and the same CPU, in the same run.
//!
//! `cargo bench -p hq-benches --bench eval_zeroshot`
//!
//! Data: the built-in corpus's shape set (`hq-data synth`, JPEG) at `HQ_EVAL_BENCH_SIDE` pixels
//! (default 256) with `HQ_EVAL_BENCH_IMAGES` images (default 1024), or any DataComp-layout folder
//! given in `HQ_EVAL_BENCH_DATA`. Model: open_clip's `HQ_EVAL_BENCH_MODEL` (default `ViT-B-32`),
//! random init (seed 0), saved by the Python side and loaded here. Both sides time the whole task
//! (class embeddings included) with all cores: torch threads = cores and
//! `HQ_EVAL_BENCH_WORKERS` DataLoader workers (default 2) on the Python side; the rayon decode pool
//! and libtorch's threads on ours. Ours runs twice: through tch and through the ONNX export on
//! ONNX Runtime's CPU provider (`hq-eval --backend onnx`, exported before the clock starts), and
//! both ratios are printed. The runs' metrics are printed too (they must agree).
//! Target: ours >= 1.5x CLIP_benchmark.

use std::path::{Path, PathBuf};
use std::process::Command;

use hq_eval::evaluate::{evaluate_classification, ClassificationExtra};
use hq_eval::wds::WdsDataset;
use hq_eval::RunOptions;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn python() -> PathBuf {
    match std::env::var_os("HQ_PYTHON") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => workspace_root().join(".venv/bin/python"),
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let data = match std::env::var_os("HQ_EVAL_BENCH_DATA") {
        Some(d) => PathBuf::from(d),
        None => {
            let images: u64 = env_or("HQ_EVAL_BENCH_IMAGES", 1024);
            let side: u32 = env_or("HQ_EVAL_BENCH_SIDE", 256);
            let cfg = hq_data::synth::SynthConfig {
                image_size: side,
                eval_samples: images,
                eval_shard_size: images.div_ceil(4),
                ..hq_data::synth::SynthConfig::default()
            };
            let eval = tmp.path().join("eval");
            hq_data::synth::evalsets::write_eval_sets(&cfg, &eval, false)
                .unwrap_or_else(|e| panic!("synth: {e}"));
            eval.join("wds_synth_shape_test")
        }
    };
    let model: String = env_or("HQ_EVAL_BENCH_MODEL", "ViT-B-32".to_string());
    let batch: usize = env_or("HQ_EVAL_BENCH_BATCH", 64);
    let workers: usize = env_or("HQ_EVAL_BENCH_WORKERS", 2);
    let ckpt = tmp.path().join("model.safetensors");
    let out = tmp.path().join("python.json");
    let status = Command::new(python())
        .arg(workspace_root().join("benches/python/eval_zeroshot_bench.py"))
        .args([&model, "0"])
        .arg(&ckpt)
        .arg(&data)
        .args([batch.to_string(), workers.to_string(), cores.to_string()])
        .arg(&out)
        .env("HF_HUB_OFFLINE", "1")
        .status()
        .unwrap_or_else(|e| panic!("cannot run python: {e}"));
    assert!(status.success(), "CLIP_benchmark side failed");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap_or_else(|e| panic!("{e}")))
            .unwrap_or_else(|e| panic!("{e}"));

    let config = hq_train::model::ClipConfig::preset(&model).unwrap_or_else(|e| panic!("{e}"));
    let mut encoder = hq_train::TchEncoder::from_checkpoint(&ckpt, Some(&config), tch::Device::Cpu)
        .unwrap_or_else(|e| panic!("{e}"))
        .with_max_batch(batch);
    let ds = WdsDataset::open(&data, "test").unwrap_or_else(|e| panic!("{e}"));
    let opts = RunOptions {
        batch_size: batch,
        progress: false,
        ..RunOptions::default()
    };
    // One whole zero-shot task (class embeddings included), timed.
    let timed_task = |encoder: &mut dyn hq_eval::Encoder| {
        let start = std::time::Instant::now();
        let out = evaluate_classification(
            encoder,
            &ds,
            ClassificationExtra::None,
            None,
            &opts,
            "bench",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        (out, start.elapsed().as_secs_f64())
    };
    let (ours, seconds) = timed_task(&mut encoder);
    let ours_rate = ours.samples as f64 / seconds;
    drop(encoder);

    // The same task through the ONNX export on ONNX Runtime's CPU provider (`hq-eval --backend
    // onnx`); the export is made before the clock starts, as a user exports once.
    let onnx_dir = tmp.path().join("onnx");
    let checkpoint =
        hq_export::checkpoint::Checkpoint::read(&ckpt).unwrap_or_else(|e| panic!("{e}"));
    hq_export::clip::export_onnx(
        &config,
        &checkpoint,
        &hq_export::clip::ExportOptions::default(),
        &onnx_dir,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    drop(checkpoint);
    let mut onnx = hq_runtime::OnnxClipEncoder::load(
        &onnx_dir,
        &hq_runtime::ExecutionProvider::Cpu,
        &hq_runtime::OnnxEncoderOptions {
            intra_threads: Some(cores),
            max_batch: batch,
            ..hq_runtime::OnnxEncoderOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("loading the ONNX export (source tools/env.sh): {e}"));
    let (onnx_run, onnx_seconds) = timed_task(&mut onnx);
    let onnx_rate = onnx_run.samples as f64 / onnx_seconds;
    let ref_rate = reference["images_per_s"].as_f64().unwrap_or(f64::NAN);
    println!(
        "eval_zeroshot: {model}, {} images from {}, batch {batch}, {cores} cores",
        ours.samples,
        data.display()
    );
    println!("| run | images/s | seconds |");
    println!("|---|---:|---:|");
    println!("| hq-eval (tch) | {ours_rate:.1} | {seconds:.2} |");
    println!("| hq-eval --backend onnx (ONNX Runtime CPU) | {onnx_rate:.1} | {onnx_seconds:.2} |");
    println!(
        "| CLIP_benchmark + PyTorch ({workers} workers) | {ref_rate:.1} | {:.2} |",
        reference["seconds"].as_f64().unwrap_or(f64::NAN)
    );
    println!("| **ratio tch** | **{:.2}x** | |", ours_rate / ref_rate);
    println!("| **ratio onnx** | **{:.2}x** | |", onnx_rate / ref_rate);
    println!("metrics, ours (tch): {:?}", ours.metrics);
    println!("metrics, ours (onnx): {:?}", onnx_run.metrics);
    println!("metrics, CLIP_benchmark: {}", reference["metrics"]);
}
