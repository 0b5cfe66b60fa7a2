//! Data-parallel scaling on one machine: samples/s of `hq_train::step::train_step_on` with
//! 2 processes x 1 thread against 1 process x 1 thread (libtorch's Gloo on loopback; gradients
//! all-reduced during the backward by libtorch's DDP reducer, as `hq-train` does, and, for
//! comparison, after it), and the same
//! for open_clip under torchrun (`benches/python/dp_scaling_openclip.py`: DDP + `ClipLoss`), same
//! model, per-rank batch and machine, in the same run. Efficiency = throughput(2) / (2 x
//! throughput(1)); target: at least open_clip's and at least 0.9.
//!
//! Also the communication: the time of one all-reduce of every gradient (hq_train's 25 MiB
//! buckets) against the gradient bytes, and the fraction of the loopback TCP bandwidth (measured
//! here, two threads, one socket) it reaches.
//!
//! `cargo bench -p hq-benches --bench dp_scaling` (env: `HQ_DP_BATCH` per-rank batch, default 32;
//! `HQ_DP_STEPS` timed steps, default 8; `HQ_SKIP_PYTHON_BENCH=1` skips open_clip). Plain CLIP
//! loss (open_clip has no HNI / STC). Writes `benches/results/dp_scaling.json`.
//!
//! This binary re-runs itself as the ranks (`HQ_DP_BENCH_RANK` set by the launch).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use hq_dist::{launch, Backend, ProcessGroup, Rendezvous};
use hq_train::config::{LossParts, StcReduction};
use hq_train::distributed::{OverlappedGradients, Ranks};
use hq_train::model::{excluded_from_weight_decay, Clip, ClipConfig};
use hq_train::optim::{AdamW, AdamWConfig};
use hq_train::step::{train_step_on, Objective};
use tch::{nn::VarStore, Device, Tensor};

const WARMUP: usize = 2;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// One rank (or the single process when `group` is `None`): timed steps, then (with a group) the
/// gradient all-reduce alone. Prints `RESULT {json}` on rank 0.
fn rank_main(group: Option<&ProcessGroup>, batch: usize, steps: usize) {
    tch::set_num_threads(1);
    let cfg = ClipConfig::hq_tiny();
    tch::manual_seed(0);
    let vs = VarStore::new(Device::Cpu);
    let model = Clip::new(vs.root(), &cfg).expect("model");
    let params = model.state_dict();
    if let Some(pg) = group {
        hq_train::distributed::broadcast_from_rank0(pg, params.iter().map(|(_, t)| t))
            .expect("broadcast");
    }
    let shallow = || -> Vec<(String, Tensor)> {
        params
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect()
    };
    // `HQ_DP_OVERLAP=0`: all-reduce after the backward instead of during it.
    let overlap = match group {
        Some(pg) if env_usize("HQ_DP_OVERLAP", 1) == 1 => {
            Some(OverlappedGradients::new(pg, &shallow()).expect("reducer"))
        }
        _ => None,
    };
    let mut opt = AdamW::new(AdamWConfig::default(), shallow(), |n, t| {
        !excluded_from_weight_decay(n, t)
    })
    .expect("optimizer");
    let obj = Objective {
        parts: LossParts {
            mixed_text: true,
            hni: false,
            stc: false,
        },
        hni_weight: 0.0,
        stc_weight: 0.0,
        stc_reduction: StcReduction::Mean,
        autocast: false,
        grad_clip: Some(1.0),
        max_logit_scale: 100.0,
    };
    let rank = group.map_or(0, ProcessGroup::rank);
    tch::manual_seed(100 + rank as i64);
    let batch = hq_train::testing::synthetic_batch(&cfg, batch, 8);
    let mut run = |n: usize| {
        for s in 0..n {
            train_step_on(
                group.map(|group| Ranks {
                    group,
                    overlap: overlap.as_ref(),
                }),
                &model,
                None,
                &mut opt,
                std::slice::from_ref(&batch),
                &obj,
                1e-4,
                Device::Cpu,
                s as u64 + 1,
            )
            .expect("step");
        }
    };
    run(WARMUP);
    if let Some(pg) = group {
        pg.barrier().expect("barrier");
    }
    let t0 = Instant::now();
    run(steps);
    if let Some(pg) = group {
        pg.barrier().expect("barrier");
    }
    let seconds = t0.elapsed().as_secs_f64();
    let world = group.map_or(1, ProcessGroup::world_size);
    let mut result = serde_json::json!({
        "world": world,
        "samples_per_s": (world * batch.len() * steps) as f64 / seconds,
    });
    if let Some(pg) = group {
        let grads: Vec<&Tensor> = opt.parameters().collect();
        let bytes: usize = grads.iter().map(|p| p.numel() * 4).sum();
        let reps = 5;
        pg.barrier().expect("barrier");
        let t0 = Instant::now();
        for _ in 0..reps {
            hq_train::distributed::all_reduce_gradients(
                pg,
                &grads,
                hq_train::distributed::BUCKET_BYTES,
            )
            .expect("all-reduce");
        }
        let per = t0.elapsed().as_secs_f64() / reps as f64;
        result["allreduce_seconds"] = per.into();
        result["gradient_bytes"] = bytes.into();
    }
    if rank == 0 {
        println!("RESULT {result}");
    }
}

fn parse_result(out: &[u8]) -> Option<serde_json::Value> {
    String::from_utf8_lossy(out)
        .lines()
        .filter_map(|l| l.strip_prefix("RESULT "))
        .next_back()
        .and_then(|j| serde_json::from_str(j).ok())
}

/// Ours with `world` ranks (1: the plain single-process step); `overlap`: gradients all-reduced
/// during the backward (DDP's reducer) or after it.
fn ours(world: usize, batch: usize, steps: usize, overlap: bool) -> serde_json::Value {
    let exe = std::env::current_exe().expect("bench binary");
    let port = launch::free_port().expect("port");
    let children: Vec<_> = (0..world)
        .map(|r| {
            Command::new(&exe)
                .env("HQ_DP_BENCH_RANK", r.to_string())
                .env("HQ_DP_BENCH_WORLD", world.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env("RANK", r.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("LOCAL_RANK", r.to_string())
                .env("HQ_DP_BATCH", batch.to_string())
                .env("HQ_DP_STEPS", steps.to_string())
                .env("HQ_DP_OVERLAP", if overlap { "1" } else { "0" })
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn rank")
        })
        .collect();
    let outs: Vec<_> = children
        .into_iter()
        .map(|c| c.wait_with_output().expect("rank"))
        .collect();
    for (r, o) in outs.iter().enumerate() {
        assert!(
            o.status.success(),
            "rank {r}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    parse_result(&outs[0].stdout).expect("rank 0 result")
}

/// open_clip under torchrun with `world` processes.
fn open_clip(world: usize, batch: usize, steps: usize) -> Option<serde_json::Value> {
    if std::env::var("HQ_SKIP_PYTHON_BENCH").is_ok_and(|v| v == "1") {
        return None;
    }
    let python = match std::env::var_os("HQ_PYTHON") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => root().join(".venv/bin/python"),
    };
    let torchrun = python.parent()?.join("torchrun");
    if !torchrun.exists() {
        eprintln!("no torchrun at {}: skipping open_clip", torchrun.display());
        return None;
    }
    let port = launch::free_port().ok()?;
    let out = Command::new(torchrun)
        .args(["--nproc-per-node", &world.to_string()])
        .args(["--master-port", &port.to_string()])
        .arg(root().join("benches/python/dp_scaling_openclip.py"))
        .args([
            "--presets",
            &root().join("training/presets").display().to_string(),
        ])
        .args(["--model", "hq-tiny", "--threads", "1"])
        .args(["--batch", &batch.to_string(), "--steps", &steps.to_string()])
        .args(["--warmup", &WARMUP.to_string()])
        .env("OMP_NUM_THREADS", "1")
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!("open_clip failed: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .next_back()
}

/// Loopback TCP bandwidth (bytes/s): one socket, a writer and a reader thread, 512 MiB.
fn loopback_bandwidth() -> f64 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let total: usize = 512 << 20;
    let reader = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0;
        while got < total {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        got
    });
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    let chunk = vec![1u8; 1 << 20];
    let t0 = Instant::now();
    for _ in 0..(total >> 20) {
        s.write_all(&chunk).expect("write");
    }
    drop(s);
    let got = reader.join().expect("reader");
    got as f64 / t0.elapsed().as_secs_f64()
}

fn main() {
    let batch = env_usize("HQ_DP_BATCH", 32);
    let steps = env_usize("HQ_DP_STEPS", 8);
    if std::env::var_os("HQ_DP_BENCH_RANK").is_some() {
        let world = env_usize("HQ_DP_BENCH_WORLD", 1);
        if world == 1 {
            rank_main(None, batch, steps);
        } else {
            let rdv = Rendezvous::from_env().expect("env").expect("launched");
            let pg =
                ProcessGroup::new(&rdv, Backend::Gloo, Duration::from_secs(300)).expect("join");
            rank_main(Some(&pg), batch, steps);
        }
        return;
    }
    // Criterion's CLI passes --bench; nothing else to parse.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("dp_scaling: hq-tiny, batch {batch} per rank, {steps} timed steps, {cpus} CPUs");
    let one = ours(1, batch, steps, true);
    let two = ours(2, batch, steps, true);
    let two_after = ours(2, batch, steps, false);
    let oc1 = open_clip(1, batch, steps);
    let oc2 = open_clip(2, batch, steps);
    let rate = |v: &serde_json::Value| v["samples_per_s"].as_f64().unwrap_or(f64::NAN);
    let eff = |a: &serde_json::Value, b: &serde_json::Value| rate(b) / (2.0 * rate(a));
    let bw = loopback_bandwidth();
    let bytes = two_after["gradient_bytes"].as_f64().unwrap_or(f64::NAN);
    let secs = two_after["allreduce_seconds"].as_f64().unwrap_or(f64::NAN);
    println!("| run | 1 process | 2 processes | efficiency |\n|---|---:|---:|---:|");
    println!(
        "| ours (hq_train, gloo, reducer) | {:.1} | {:.1} | {:.2} |",
        rate(&one),
        rate(&two),
        eff(&one, &two)
    );
    println!(
        "| ours, all-reduce after backward | {:.1} | {:.1} | {:.2} |",
        rate(&one),
        rate(&two_after),
        eff(&one, &two_after)
    );
    if let (Some(a), Some(b)) = (&oc1, &oc2) {
        println!(
            "| open_clip (DDP, torchrun, gloo) | {:.1} | {:.1} | {:.2} |",
            rate(a),
            rate(b),
            eff(a, b)
        );
    }
    println!(
        "all-reduce of {:.1} MB of gradients: {:.1} ms ({:.0} MB/s algorithmic); loopback TCP \
         {:.0} MB/s: {:.0}%",
        bytes / 1e6,
        secs * 1e3,
        bytes / secs / 1e6,
        bw / 1e6,
        100.0 * bytes / secs / bw
    );
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_default();
    let unix_time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let json = serde_json::json!({
        "bench": "dp_scaling",
        "unix_time": unix_time,
        "cpu_model": cpu_model,
        "model": "hq-tiny",
        "batch_per_rank": batch,
        "steps": steps,
        "cpus": cpus,
        "ours": {"world1": one, "world2": two, "efficiency": eff(&one, &two),
                 "world2_allreduce_after_backward": two_after,
                 "efficiency_allreduce_after_backward": eff(&one, &two_after)},
        "open_clip": match (&oc1, &oc2) {
            (Some(a), Some(b)) => serde_json::json!({"world1": a, "world2": b, "efficiency": eff(a, b)}),
            _ => serde_json::Value::Null,
        },
        "allreduce": {"gradient_bytes": bytes, "seconds": secs, "loopback_bytes_per_s": bw},
    });
    // The file keeps the latest runs (newest last), so repeated runs give the spread.
    let path = root().join("benches/results/dp_scaling.json");
    let mut runs: Vec<serde_json::Value> = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["runs"].as_array().cloned())
        .unwrap_or_default();
    runs.push(json);
    let keep = runs.len().saturating_sub(10);
    let all = serde_json::json!({"bench": "dp_scaling", "runs": runs[keep..]});
    if let Err(e) = std::fs::write(
        &path,
        serde_json::to_string_pretty(&all).unwrap_or_default(),
    ) {
        eprintln!("cannot write {}: {e}", path.display());
    }
}
