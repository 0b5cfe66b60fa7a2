//! Training throughput (samples/s) of one optimizer step: `hq_train::step::train_step` against
//! open_clip's training step (`benches/python/train_step_bench.py`) on the same model, batch and
//! CPU, in the same run; and the cost of HQ-CLIP's extra losses (HNI + STC) over plain CLIP.
//!
//! `cargo bench -p hq-benches --bench train_step`
//!
//! Model: `hq-tiny` (64 px, 4+4 layers of width 128, 77 tokens) unless `HQ_TRAIN_STEP_PRESET` names
//! another preset; batch `HQ_TRAIN_STEP_BATCH` (default 64); K = 1000 tags, 6 positives per sample,
//! N- = 1 hard negative. One step = forward of both towers (+ the negatives through the text tower
//! and the STC head when on), the losses, backward, global-norm clipping at 1.0, AdamW
//! (0.9, 0.98, 1e-6, wd 0.2 on weights), logit-scale clamp; both sides in fp32 with the same number
//! of intra-op threads (libtorch's default, printed). Inputs are the same tensors on both sides
//! (written to a safetensors file); data loading is not part of the step.
//!
//! Cases:
//! - `clip`: contrastive loss only (open_clip: `ClipLoss`);
//! - `hq-clip`: + alpha HNI + beta STC (open_clip side: the same extras written in PyTorch on top of
//!   open_clip's model and `ClipLoss`). Our step encodes hard negatives only for rows whose HNI
//!   gate is open (exact: a closed row adds zero to the loss and its gradients; `hq_train::step`),
//!   so its cost depends on the open fraction. The paired table repeats one batch, which the
//!   model soon memorises (gates open); after it both ends are timed against `clip` with the
//!   models held fixed (lr 0): a fresh model (gates almost all closed, as early in training) and
//!   one that memorised the batch (>= 95% open, the worst case). The open_clip side encodes every
//!   negative. The cost over a real run is in `benches/RESULTS.md` (the ablation's runs).
//!
//! Criterion measures our two cases; then a paired table times steps of all four (ours and
//! open_clip, plain and with extras) alternately (our plain and extras rounds interleaved), best of
//! `HQ_TRAIN_STEP_REPEATS` (default 5) rounds of `HQ_TRAIN_STEP_STEPS` (default 5) steps each, wall
//! clock, twice over, and prints samples/s and the
//! ratios: ours / open_clip (target >= 1.0) and hq-clip / clip on our side (extras cost, target
//! <= 10%). `HQ_SKIP_PYTHON_BENCH=1` skips the open_clip side; `HQ_TRAIN_STEP_PAIRED_ONLY=1`
//! skips the criterion part; `HQ_TRAIN_STEP_TRIM=0` runs our text tower on all 77 positions, as
//! open_clip does, instead of trimming to the batch's longest caption (`TextTransformer::forward`);
//! `HQ_TRAIN_STEP_COMPARE_TRIM=1` times both in the same rounds.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use criterion::{Criterion, Throughput};
use hq_train::config::{LossParts, StcReduction};
use hq_train::data::Batch;
use hq_train::model::{excluded_from_weight_decay, Clip, ClipConfig, StcHead};
use hq_train::optim::{AdamW, AdamWConfig};
use hq_train::step::{train_step, Objective, StepStats};
use tch::{nn::VarStore, Device, Tensor};

#[path = "common/train_batch.rs"]
mod train_batch;
use train_batch::{make_batch, TAGS};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `HQ_TRAIN_STEP_CPU_TIME=1`: one libtorch thread, our rates per second of the thread's CPU time
/// (Linux `/proc/thread-self/schedstat`) instead of wall clock: a machine shared with other jobs
/// slows the wall clock but hardly the CPU time, so our clip / hq-clip ratio survives the load
/// (the open_clip side stays wall clock).
fn cpu_time() -> bool {
    std::env::var("HQ_TRAIN_STEP_CPU_TIME").is_ok_and(|v| v == "1")
}

/// Seconds this thread has run on a CPU.
fn thread_cpu_seconds() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: f64 = s.split_whitespace().next()?.parse().ok()?;
    Some(ns * 1e-9)
}

/// `HQ_TRAIN_STEP_COMPARE_TRIM=1` also times our step with the text tower on all context positions
/// (as before trimming), in the same paired rounds.
fn compare_trim() -> bool {
    std::env::var("HQ_TRAIN_STEP_COMPARE_TRIM").is_ok_and(|v| v == "1")
}

/// `HQ_TRAIN_STEP_TRIM=0` runs our text tower on all context positions (as open_clip does) instead
/// of trimming to the batch's longest caption.
fn text_trim() -> bool {
    std::env::var("HQ_TRAIN_STEP_TRIM").map_or(true, |v| v != "0")
}

/// `HQ_TRAIN_STEP_PAIRED_ONLY=1` skips the criterion part (slow for big presets) and prints only
/// the paired table.
fn paired_only() -> bool {
    std::env::var("HQ_TRAIN_STEP_PAIRED_ONLY").is_ok_and(|v| v == "1")
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn python() -> Option<PathBuf> {
    if std::env::var_os("HQ_SKIP_PYTHON_BENCH").is_some() {
        return None;
    }
    let p = match std::env::var_os("HQ_PYTHON") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => workspace_root().join(".venv/bin/python"),
    };
    p.exists().then_some(p)
}

struct Trainer {
    model: Clip,
    stc: StcHead,
    opt: AdamW,
    obj: Objective,
    /// The HNI gate-open fraction of the last step.
    gate_open: f64,
    /// Learning rate of the timed steps (0 holds the model, and so the open gates, fixed; the
    /// update still runs and costs the same).
    lr: f64,
    _vs: VarStore,
}

fn trainer(cfg: &ClipConfig, full: bool, trim: bool) -> Trainer {
    tch::manual_seed(0);
    let vs = VarStore::new(Device::Cpu);
    let mut model = Clip::new(vs.root(), cfg).expect("model");
    model.text.set_trim(trim);
    let stc = StcHead::new(vs.root(), cfg.embed_dim, cfg.embed_dim, TAGS).expect("stc head");
    let mut params = model.state_dict();
    if full {
        params.extend(stc.state_dict());
    }
    let opt = AdamW::new(AdamWConfig::default(), params, |n, t| {
        !excluded_from_weight_decay(n, t)
    })
    .expect("adamw");
    let obj = Objective {
        parts: LossParts {
            mixed_text: true,
            hni: full,
            stc: full,
        },
        hni_weight: 0.5,
        stc_weight: 10.0,
        stc_reduction: StcReduction::Mean,
        autocast: false,
        grad_clip: Some(1.0),
        max_logit_scale: 100.0,
    };
    Trainer {
        model,
        stc,
        opt,
        obj,
        gate_open: 0.0,
        lr: 1e-4,
        _vs: vs,
    }
}

impl Trainer {
    fn step(&mut self, batch: &[Batch]) -> StepStats {
        self.step_at(batch, self.lr)
    }

    fn step_at(&mut self, batch: &[Batch], lr: f64) -> StepStats {
        let stc = self.obj.parts.stc.then_some(&self.stc);
        train_step(
            &self.model,
            stc,
            &mut self.opt,
            batch,
            &self.obj,
            lr,
            Device::Cpu,
            0,
        )
        .expect("train step")
    }

    /// Trains on `batch` until at least `fraction` of its HNI gates are open (or `max_steps`
    /// pass): the negatives of open rows are the ones the step encodes, so this is the step's
    /// cost late in training.
    fn open_gates(&mut self, batch: &[Batch], fraction: f64, max_steps: usize) {
        for _ in 0..max_steps {
            self.gate_open = self.step_at(batch, 2e-3).hni_gate_open;
            if self.gate_open >= fraction {
                break;
            }
        }
    }

    /// Samples/s over one round of `steps` steps (per second of this thread's CPU time with
    /// `HQ_TRAIN_STEP_CPU_TIME=1`).
    fn round(&mut self, batch: &[Batch], steps: usize) -> f64 {
        let n = batch.iter().map(Batch::len).sum::<usize>() * steps;
        let t = Instant::now();
        let cpu = thread_cpu_seconds();
        for _ in 0..steps {
            self.gate_open = self.step(batch).hni_gate_open;
        }
        match (cpu_time(), cpu, thread_cpu_seconds()) {
            (true, Some(a), Some(b)) => n as f64 / (b - a),
            _ => n as f64 / t.elapsed().as_secs_f64(),
        }
    }
}

/// Samples/s of each trainer, best of `repeats` rounds of `steps` steps each, the trainers' rounds
/// alternated so that changing load hits all alike.
fn paired_rates(
    trainers: &mut [&mut Trainer],
    batch: &[Batch],
    steps: usize,
    repeats: usize,
) -> Vec<f64> {
    for t in trainers.iter_mut() {
        t.step(batch);
    }
    let mut best = vec![0f64; trainers.len()];
    for _ in 0..repeats {
        for (b, t) in best.iter_mut().zip(trainers.iter_mut()) {
            *b = b.max(t.round(batch, steps));
        }
    }
    best
}

/// open_clip's rates (samples/s) for `clip` and `hq-clip`, from the Python script.
fn reference(
    py: &Path,
    preset: &str,
    batch: &Batch,
    dir: &Path,
    steps: usize,
    repeats: usize,
) -> Option<(f64, f64)> {
    let inputs = dir.join("inputs.safetensors");
    let mut dense = vec![0f32; batch.len() * TAGS as usize];
    for i in 0..batch.len() {
        for &c in
            &batch.tag_indices[batch.tag_offsets[i] as usize..batch.tag_offsets[i + 1] as usize]
        {
            dense[i * TAGS as usize + c as usize] = 1.0;
        }
    }
    let targets = Tensor::from_slice(&dense).view([batch.len() as i64, TAGS]);
    Tensor::write_safetensors(
        &[
            ("images", &batch.images),
            ("texts", &batch.texts),
            ("negatives", &batch.negatives),
            ("tag_targets", &targets),
        ],
        &inputs,
    )
    .expect("write inputs");
    let out = Command::new(py)
        .arg(workspace_root().join("benches/python/train_step_bench.py"))
        .arg("--presets")
        .arg(workspace_root().join("training/presets"))
        .arg("--model")
        .arg(preset)
        .arg("--inputs")
        .arg(&inputs)
        .arg("--threads")
        .arg(tch::get_num_threads().to_string())
        .arg("--steps")
        .arg(steps.to_string())
        .arg("--repeat")
        .arg(repeats.to_string())
        .output()
        .expect("run python");
    if !out.status.success() {
        eprintln!(
            "train_step_bench.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(text.lines().last().unwrap_or("{}")).ok()?;
    Some((v["clip"].as_f64()?, v["hq_clip"].as_f64()?))
}

fn main() {
    let preset = std::env::var("HQ_TRAIN_STEP_PRESET").unwrap_or_else(|_| "hq-tiny".into());
    let n = env_usize("HQ_TRAIN_STEP_BATCH", 64);
    let steps = env_usize("HQ_TRAIN_STEP_STEPS", 5);
    let repeats = env_usize("HQ_TRAIN_STEP_REPEATS", 5);
    let cfg = ClipConfig::preset(&preset).expect("preset");
    let batch = vec![make_batch(&cfg, n)];
    if cpu_time() {
        tch::set_num_threads(1);
    }
    println!(
        "train step: {preset}, batch {n}, K = {TAGS} tags, N- = 1, libtorch threads {}, text \
         positions trimmed: {}",
        tch::get_num_threads(),
        text_trim()
    );
    let mut plain = trainer(&cfg, false, text_trim());
    let mut full = trainer(&cfg, true, text_trim());
    let mut untrimmed =
        compare_trim().then(|| (trainer(&cfg, false, false), trainer(&cfg, true, false)));

    let mut c = Criterion::default().sample_size(10).configure_from_args();
    if !paired_only() {
        let mut g = c.benchmark_group("train_step");
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function("ours/clip", |b| b.iter(|| plain.step(&batch)));
        g.bench_function("ours/hq-clip", |b| b.iter(|| full.step(&batch)));
        g.finish();
    }

    // Paired table: alternate the sides so drifting load hits both alike.
    let mut ours = (0f64, 0f64);
    let mut ours_untrimmed = (0f64, 0f64);
    let mut theirs: Option<(f64, f64)> = None;
    let py = python();
    let dir = tempfile::tempdir().expect("tempdir");
    for _ in 0..2 {
        let mut trainers = vec![&mut plain, &mut full];
        if let Some((p, f)) = &mut untrimmed {
            trainers.push(p);
            trainers.push(f);
        }
        let r = paired_rates(&mut trainers, &batch, steps, repeats);
        ours = (ours.0.max(r[0]), ours.1.max(r[1]));
        if r.len() == 4 {
            ours_untrimmed = (ours_untrimmed.0.max(r[2]), ours_untrimmed.1.max(r[3]));
        }
        if let Some(py) = &py {
            if let Some((a, b)) = reference(py, &preset, &batch[0], dir.path(), steps, repeats) {
                theirs = Some(match theirs {
                    Some((x, y)) => (x.max(a), y.max(b)),
                    None => (a, b),
                });
            }
        }
    }
    println!("\n| step | ours (samples/s) | open_clip (samples/s) | ours / open_clip |");
    println!("|---|---:|---:|---:|");
    for (name, o, t) in [
        ("clip", ours.0, theirs.map(|t| t.0)),
        ("hq-clip (+HNI +STC)", ours.1, theirs.map(|t| t.1)),
    ] {
        match t {
            Some(t) => println!("| {name} | {o:.1} | {t:.1} | {:.2}x |", o / t),
            None => println!("| {name} | {o:.1} | (skipped) | - |"),
        }
    }
    println!(
        "\nHQ-CLIP extras cost on our side: {:.1}% (hq-clip {:.1} vs clip {:.1} samples/s; target <= 10%)",
        100.0 * (ours.0 / ours.1 - 1.0),
        ours.1,
        ours.0
    );
    println!(
        "  (HNI gates open in the last timed hq-clip steps: {:.0}%; one batch repeated is soon \
         memorised)",
        100.0 * full.gate_open
    );
    // The cost at both ends of the open fraction, the models held fixed (lr 0): a fresh model
    // (almost every gate closed, as early in training) and one that memorised the batch.
    let mut fresh = trainer(&cfg, true, text_trim());
    fresh.lr = 0.0;
    full.open_gates(&batch, 0.95, 400);
    full.lr = 0.0;
    plain.lr = 0.0;
    let mut ends = [0f64; 3];
    for _ in 0..2 {
        let r = paired_rates(
            &mut [&mut plain, &mut fresh, &mut full],
            &batch,
            steps,
            repeats,
        );
        for (e, v) in ends.iter_mut().zip(r) {
            *e = e.max(v);
        }
    }
    for (name, t, rate) in [
        ("a fresh model", &fresh, ends[1]),
        ("the batch memorised", &full, ends[2]),
    ] {
        println!(
            "HQ-CLIP extras cost with {name} ({:.0}% of the gates open): {:.1}% (hq-clip {rate:.1} \
             vs clip {:.1} samples/s)",
            100.0 * t.gate_open,
            100.0 * (ends[0] / rate - 1.0),
            ends[0]
        );
    }
    if untrimmed.is_some() {
        let (p, f) = ours_untrimmed;
        println!(
            "Ours with the text tower on all context positions: clip {p:.1}, hq-clip {f:.1} \
             samples/s, extras cost {:.1}%; trimming speeds clip {:.2}x, hq-clip {:.2}x",
            100.0 * (p / f - 1.0),
            ours.0 / p,
            ours.1 / f
        );
    }
    if let Some(t) = theirs {
        println!(
            "HQ-CLIP extras cost on the open_clip side (same extras in PyTorch): {:.1}%",
            100.0 * (t.0 / t.1 - 1.0)
        );
    }
    c.final_summary();
}
