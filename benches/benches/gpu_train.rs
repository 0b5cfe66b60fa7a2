//! One CLIP training step on a GPU in bf16: ours (`hq_train::step::train_step`, the step
//! `hq-train` runs) against open_clip's model and step (`benches/python/gpu_train_step.py`) on the
//! same GPU in the same run, at the largest batch that fits ours. The GPU acceptance run's step 3
//! (`tools/gpu-check.sh`); without a GPU it runs the same code on the CPU in fp32 with a small
//! preset and batch (the dry run that keeps the script from rotting).
//!
//! `cargo bench -p hq-benches --bench gpu_train`
//!
//! - Model: `HQ_GPU_TRAIN_PRESET` (ViT-B-32 on a GPU, hq-tiny on the CPU), random init on both
//!   sides. Objective: the contrastive loss alone (open_clip's `ClipLoss`), so both sides do the
//!   same work; global-norm clipping at 1.0, AdamW (0.9, 0.98, 1e-6, wd 0.2), logit-scale clamp.
//! - Precision: bf16 autocast on CUDA on both sides (open_clip_train's `--precision amp_bf16`),
//!   fp32 on the CPU.
//! - Inputs: the same synthetic batch shape on both sides (`common/train_batch.rs`), handed to the
//!   step on the CPU and copied to the device inside it, as a data loader's batch is (pageable
//!   memory on both sides). Our text tower trims padding to the batch's longest caption (25 of 77
//!   positions here), as `hq-train` does; open_clip runs all 77.
//! - Largest batch: doubling from the first of `HQ_GPU_TRAIN_BATCH` (`start,max`: 256,8192 on a
//!   GPU, 8,32 on the CPU), one step each, until a step fails (out of memory) or `max`; each side
//!   searches for its own, and open_clip is timed at ours when it fits there (else at its own).
//! - Rate: samples/s over `HQ_GPU_TRAIN_STEPS` (10; 3 on the CPU) synchronised steps after 2
//!   warm-up steps, wall clock.
//!
//! JSON to `HQ_GPU_TRAIN_JSON` (and stdout). `HQ_PYTHON` names the Python with torch and open_clip
//! (`HQ_SKIP_PYTHON_BENCH=1` skips that side); `HQ_BENCH_PYTHON_DIR` and `HQ_PRESETS_DIR` locate
//! the script and the preset files where the repository is not beside the binary.

#[path = "common/train_batch.rs"]
mod train_batch;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use hq_train::config::{LossParts, StcReduction};
use hq_train::data::Batch;
use hq_train::model::{excluded_from_weight_decay, Clip, ClipConfig};
use hq_train::optim::{AdamW, AdamWConfig};
use hq_train::step::{train_step, Objective};
use serde_json::{json, Value};
use tch::{nn::VarStore, Device};
use train_batch::make_batch;

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn env_path(name: &str, default: PathBuf) -> PathBuf {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or(default)
}

fn synchronize(dev: Device) {
    if let Device::Cuda(i) = dev {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Our side: a model, its optimizer and the step's settings on one device.
struct Ours {
    model: Clip,
    opt: AdamW,
    obj: Objective,
    dev: Device,
    _vs: VarStore,
}

impl Ours {
    fn new(cfg: &ClipConfig, dev: Device) -> Self {
        tch::manual_seed(0);
        let vs = VarStore::new(dev);
        let model = Clip::new(vs.root(), cfg).expect("model");
        let opt = AdamW::new(AdamWConfig::default(), model.state_dict(), |n, t| {
            !excluded_from_weight_decay(n, t)
        })
        .expect("adamw");
        let obj = Objective {
            parts: LossParts {
                mixed_text: true,
                hni: false,
                stc: false,
            },
            hni_weight: 0.5,
            stc_weight: 10.0,
            stc_reduction: StcReduction::Mean,
            autocast: dev != Device::Cpu,
            grad_clip: Some(1.0),
            max_logit_scale: 100.0,
        };
        Ours {
            model,
            opt,
            obj,
            dev,
            _vs: vs,
        }
    }

    /// One synchronised step; an error (out of memory) is `Err` with its message.
    fn step(&mut self, batch: &[Batch]) -> Result<(), String> {
        let r = train_step(
            &self.model,
            None,
            &mut self.opt,
            batch,
            &self.obj,
            1e-4,
            self.dev,
            0,
        )
        .map_err(|e| e.to_string());
        synchronize(self.dev);
        r.map(|_| ())
    }
}

/// The largest batch (doubling from `start` up to `max`) one step of ours completes.
fn largest_batch(cfg: &ClipConfig, dev: Device, start: usize, max: usize) -> (usize, String) {
    let mut ours = Ours::new(cfg, dev);
    let (mut best, mut n) = (0, start);
    let stopped = loop {
        if n > max {
            break format!("batch cap {max}");
        }
        let batch = vec![make_batch(cfg, n)];
        match ours.step(&batch) {
            Ok(()) => best = n,
            Err(e) => break format!("batch {n} failed: {}", first_line(&e)),
        }
        n *= 2;
    };
    println!("ours: largest batch {best} ({stopped})");
    (best, stopped)
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").chars().take(200).collect()
}

/// Samples/s of ours at batch `n`, in a fresh model (the search's failed steps leave the
/// allocator fragmented).
fn our_rate(cfg: &ClipConfig, dev: Device, n: usize, steps: usize) -> Result<f64, String> {
    let mut ours = Ours::new(cfg, dev);
    let batch = vec![make_batch(cfg, n)];
    for _ in 0..2 {
        ours.step(&batch)?;
    }
    let t = Instant::now();
    for _ in 0..steps {
        ours.step(&batch)?;
    }
    Ok((n * steps) as f64 / t.elapsed().as_secs_f64())
}

/// open_clip's side from the Python script: its JSON line, or why it did not run.
fn open_clip_side(
    preset: &str,
    dev: Device,
    batch: usize,
    search: (usize, usize),
    steps: usize,
) -> Value {
    if std::env::var_os("HQ_SKIP_PYTHON_BENCH").is_some() {
        return json!({"skipped": "HQ_SKIP_PYTHON_BENCH is set"});
    }
    let py = env_path("HQ_PYTHON", workspace_root().join(".venv/bin/python"));
    let script = env_path(
        "HQ_BENCH_PYTHON_DIR",
        workspace_root().join("benches/python"),
    )
    .join("gpu_train_step.py");
    let presets = env_path("HQ_PRESETS_DIR", workspace_root().join("training/presets"));
    let out = Command::new(&py)
        .arg(&script)
        .args(["--model", preset, "--presets"])
        .arg(&presets)
        .args(["--device", if dev == Device::Cpu { "cpu" } else { "cuda" }])
        .args(["--batch", &batch.to_string()])
        .args(["--search-start", &search.0.to_string()])
        .args(["--search-max", &search.1.to_string()])
        .args(["--steps", &steps.to_string()])
        .args(["--threads", &tch::get_num_threads().to_string()])
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) => return json!({"skipped": format!("cannot run {}: {e}", py.display())}),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    match stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str::<Value>(l).ok())
    {
        Some(v) if out.status.success() => v,
        _ => json!({"failed": format!(
            "{} exited {}: {}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).lines().rev().take(5).collect::<Vec<_>>().join(" | ")
        )}),
    }
}

fn main() {
    hq_kernels::cuda::load_libtorch_cuda();
    let cuda = hq_kernels::cuda::driver_present() && tch::Cuda::is_available();
    let dev = if cuda && env_or("HQ_GPU_TRAIN_DEVICE", "auto") != "cpu" {
        Device::Cuda(0)
    } else {
        Device::Cpu
    };
    let on_gpu = dev != Device::Cpu;
    if on_gpu {
        hq_train::precision::use_bf16_autocast_on_cuda().expect("bf16 autocast");
    }
    let preset = env_or(
        "HQ_GPU_TRAIN_PRESET",
        if on_gpu { "ViT-B-32" } else { "hq-tiny" },
    );
    let (start, max) = {
        let spec = env_or(
            "HQ_GPU_TRAIN_BATCH",
            if on_gpu { "256,8192" } else { "8,32" },
        );
        let v: Vec<usize> = spec.split(',').filter_map(|s| s.parse().ok()).collect();
        match v[..] {
            [a, b] if a > 0 && b >= a => (a, b),
            _ => panic!("HQ_GPU_TRAIN_BATCH={spec}: expected start,max"),
        }
    };
    let steps: usize = env_or("HQ_GPU_TRAIN_STEPS", if on_gpu { "10" } else { "3" })
        .parse()
        .expect("HQ_GPU_TRAIN_STEPS");
    let cfg = ClipConfig::preset(&preset).expect("preset");
    println!(
        "training step on {dev:?}: {preset}, {}, batch search {start}..{max}, {steps} timed steps",
        if on_gpu { "bf16 autocast" } else { "fp32" }
    );
    let (batch, stopped) = largest_batch(&cfg, dev, start, max);
    let ours = match batch {
        0 => json!({"largest_batch": 0, "search_stopped": stopped}),
        n => {
            let rate = our_rate(&cfg, dev, n, steps);
            println!("ours: {rate:?} samples/s at batch {n}");
            json!({
                "largest_batch": n,
                "search_stopped": stopped,
                "samples_per_s": rate.as_ref().ok(),
                "error": rate.err(),
            })
        }
    };
    let theirs = open_clip_side(&preset, dev, batch.max(start), (start, max), steps);
    println!("open_clip: {theirs}");
    let ratio = match (
        ours["samples_per_s"].as_f64(),
        theirs["samples_per_s_at_batch"].as_f64(),
    ) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let out = json!({
        "bench": "gpu_train",
        "device": if on_gpu { tch_device_name() } else { "cpu".into() },
        "preset": preset,
        "precision": if on_gpu { "bf16 autocast" } else { "fp32" },
        "timed_steps": steps,
        "ours": ours,
        "open_clip": theirs,
        "ours_over_open_clip_at_our_batch": ratio,
    });
    println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    if let Ok(path) = std::env::var("HQ_GPU_TRAIN_JSON") {
        let tmp = format!("{path}.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&out).unwrap_or_default())
            .and_then(|_| std::fs::rename(&tmp, &path))
            .unwrap_or_else(|e| panic!("write {path}: {e}"));
    }
}

fn tch_device_name() -> String {
    cudarc::driver::CudaContext::new(0)
        .and_then(|c| c.name())
        .unwrap_or_else(|e| format!("cuda:0 ({e})"))
}
