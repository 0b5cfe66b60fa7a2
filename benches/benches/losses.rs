//! The fused contrastive loss against tch's unfused version (matmul + log_softmax/cross-entropy
//! both ways + autograd), forward and backward, D = 512.
//!
//! `cargo bench -p hq-benches --bench losses`
//!
//! CPU: N in {256, 1024, 4096, 16384} (`HQ_LOSSES_SIZES=256,1024` to change). Both sides are the
//! same call the training loop makes: tensors in, `loss.backward()`, gradients in `.grad()`. The
//! fused side is `hq_kernels::clip_loss` on CPU tensors; the unfused side is
//! `0.5 CE(s X Y^T) + 0.5 CE(s Y X^T)` in tch. Time: criterion (few samples at large N). Peak memory:
//! measured in a fresh child process per (implementation, N), so that neither allocator caches nor
//! the other implementation's pages count:
//! - `VmHWM` (peak resident set) after `/proc/self/clear_refs` was reset to the current RSS just
//!   before the call, minus that RSS: every page the call touched that was not resident before
//!   (libtorch's allocations and ours alike), maxed with a 1 ms VmRSS sampler as a cross-check;
//! - the peak of a counting global allocator (Rust heap only: all of the fused path's own
//!   buffers, none of libtorch's).
//!
//! glibc's mmap threshold is pinned at 128 KiB and free heap pages are returned (`malloc_trim`)
//! before the call, so every block the call allocates is fresh pages. The inputs are allocated
//! before the measurement starts; the gradients created during the call are counted.
//!
//! GPU (when libtorch sees a CUDA device): the same comparison at N in {4096, 16384, 32768, 65536}
//! with D = 512 and D = 768 (`HQ_LOSSES_GPU_SIZES` to change), each iteration synchronised; then,
//! with `HQ_LOSSES_FIND_MAX=1`, the largest N (doubling from 64k) each implementation completes.
//! Paired timing: before criterion, the two sides are also run alternately (ABAB) on the same
//! inputs and min/median reported, which stays meaningful on a shared machine whose load drifts
//! during criterion's back-to-back sampling.
//! Set `HQ_LOSSES_SKIP_MEMORY=1`, `HQ_LOSSES_SKIP_PAIRED=1` or `HQ_LOSSES_SKIP_CRITERION=1` to skip
//! a part.
//!
//! Device table (`HQ_LOSSES_DEVICE_TABLE=auto|cuda|cpu`, the GPU acceptance run's step 2,
//! `tools/gpu-check.sh`): instead of all the above, on one device, fused against unfused at N in
//! `HQ_LOSSES_GPU_SIZES` and D in `HQ_LOSSES_DIMS` (512,768): median of paired (ABAB) timings, the
//! peak device memory of each call, and the largest N each completes (doubling; the fused search
//! also stops when one call passes `HQ_LOSSES_MAX_SECONDS`, 15 s, since its memory is linear and
//! the time quadratic); written as JSON to `HQ_LOSSES_JSON`. Peak memory is measured in one child
//! process with libtorch's caching allocator off (`PYTORCH_NO_CUDA_MEMORY_CACHING=1`, so freed
//! blocks go back to the driver) by a thread that polls the driver's used memory while the call
//! runs, minus the memory in use before it (inputs included there). On the CPU (the dry run) the
//! same table runs at small N, without the memory column.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::BufRead;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, SamplingMode};
use tch::{Device, Kind, Tensor};

// ---------- counting allocator ----------

struct Counting;
static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only adds counters.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: same contract as System.alloc.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        // SAFETY: same contract as System.alloc_zeroed.
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as System.dealloc.
        unsafe { System.dealloc(p, l) };
        CURRENT.fetch_sub(l.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        // SAFETY: same contract as System.realloc.
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            if new >= l.size() {
                let now = CURRENT.fetch_add(new - l.size(), Ordering::Relaxed) + new - l.size();
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                CURRENT.fetch_sub(l.size() - new, Ordering::Relaxed);
            }
        }
        q
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

// ---------- the two implementations ----------

const D: i64 = 512;

fn inputs(n: i64, d: i64, device: Device) -> (Tensor, Tensor, Tensor) {
    tch::manual_seed(n);
    let unit = |t: Tensor| &t / t.norm_scalaropt_dim(2.0, [1i64].as_slice(), true);
    let x = unit(Tensor::randn([n, d], (Kind::Float, device)));
    let y = unit(&x * 0.3 + unit(Tensor::randn([n, d], (Kind::Float, device))));
    let s = Tensor::from((1.0f32 / 0.07).ln()).to_device(device);
    (
        x.set_requires_grad(true),
        y.set_requires_grad(true),
        s.set_requires_grad(true),
    )
}

fn zero_grads(ts: &[&Tensor]) {
    for t in ts {
        let mut g = t.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
}

/// One training-style step of the fused loss: forward, backward. For N <= 2 D this is the
/// small-batch schedule (libtorch GEMMs + the fused element-wise pass).
fn fused(x: &Tensor, y: &Tensor, ls: &Tensor) -> f64 {
    let out = hq_kernels::clip_loss(x, y, &ls.exp()).expect("fused loss");
    out.loss.backward();
    out.loss.double_value(&[])
}

/// The same with the tiled kernel at every size (`Options::dense_small` off).
fn tiled(x: &Tensor, y: &Tensor, ls: &Tensor) -> f64 {
    let opts = hq_kernels::Options {
        dense_small: false,
        ..hq_kernels::Options::default()
    };
    let out = hq_kernels::clip_loss_with(x, y, &ls.exp(), &opts).expect("tiled loss");
    out.loss.backward();
    out.loss.double_value(&[])
}

/// The same step unfused, as CLIP trainers write it.
fn unfused(x: &Tensor, y: &Tensor, ls: &Tensor) -> f64 {
    let n = x.size()[0];
    let logits = x.matmul(&y.tr()) * ls.exp();
    let labels = Tensor::arange(n, (Kind::Int64, x.device()));
    let loss = (logits.cross_entropy_for_logits(&labels)
        + logits.tr().cross_entropy_for_logits(&labels))
        / 2.0;
    loss.backward();
    loss.double_value(&[])
}

fn sizes(var: &str, default: &[i64]) -> Vec<i64> {
    std::env::var(var)
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .unwrap_or_else(|| default.to_vec())
}

// ---------- memory probe (child process) ----------

fn status_kb(field: &str) -> usize {
    let f = std::fs::File::open("/proc/self/status").expect("/proc/self/status");
    for line in std::io::BufReader::new(f).lines().map_while(Result::ok) {
        if let Some(rest) = line.strip_prefix(field) {
            return rest
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .unwrap_or(0);
        }
    }
    0
}

extern "C" {
    // glibc: fixed mmap threshold (mallopt M_MMAP_THRESHOLD = -3) and returning free heap pages.
    fn mallopt(param: i32, value: i32) -> i32;
    fn malloc_trim(pad: usize) -> i32;
}

/// Runs one step of `which` at size `n` and prints `MEM <which> <n> <rss_peak_bytes> <heap_peak_bytes>`.
fn probe(spec: &str) {
    // Every allocation above 128 KiB gets its own mapping (glibc's threshold would otherwise grow
    // after the first big free and serve later blocks from already-resident heap pages, which an
    // RSS delta cannot see).
    // SAFETY: plain glibc calls, before any other thread exists.
    unsafe { mallopt(-3, 128 * 1024) };
    let mut it = spec.split(':');
    let which = it.next().unwrap_or("fused").to_string();
    let n: i64 = it.next().and_then(|v| v.parse().ok()).unwrap_or(256);
    // Warm both libraries' thread pools and allocators on a tiny problem.
    let (wx, wy, ws) = inputs(64, D, Device::Cpu);
    fused(&wx, &wy, &ws);
    unfused(&wx, &wy, &ws);
    let (x, y, ls) = inputs(n, D, Device::Cpu);
    // Free pages go back to the system, so the call's memory shows up as new resident pages.
    // SAFETY: plain glibc call.
    unsafe { malloc_trim(0) };
    std::fs::write("/proc/self/clear_refs", "5").expect("reset VmHWM (needs Linux >= 4.0)");
    let base_rss = status_kb("VmRSS:") * 1024;
    let heap_base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(heap_base, Ordering::Relaxed);
    let stop = Arc::new(AtomicBool::new(false));
    let sampled = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (stop, sampled) = (stop.clone(), sampled.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                sampled.fetch_max(status_kb("VmRSS:") * 1024, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let v = if which == "fused" {
        fused(&x, &y, &ls)
    } else {
        unfused(&x, &y, &ls)
    };
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    let hwm = status_kb("VmHWM:") * 1024;
    let peak_rss = hwm
        .max(sampled.load(Ordering::Relaxed))
        .saturating_sub(base_rss);
    let heap = PEAK.load(Ordering::Relaxed).saturating_sub(heap_base);
    assert!(v.is_finite());
    println!("MEM {which} {n} {peak_rss} {heap}");
}

fn memory_table(ns: &[i64]) {
    let exe = std::env::current_exe().expect("current exe");
    println!("\n== Peak memory of one forward+backward, D = {D} (fresh process each) ==");
    println!(
        "{:>7} | {:>14} {:>14} | {:>14} | {:>9}",
        "N", "fused RSS", "fused heap", "tch RSS", "tch/fused"
    );
    for &n in ns {
        let mut row = Vec::new();
        for which in ["fused", "tch"] {
            let out = Command::new(&exe)
                .env("HQ_LOSSES_MEM_PROBE", format!("{which}:{n}"))
                .output()
                .expect("spawn probe");
            let text = String::from_utf8_lossy(&out.stdout);
            let line = text
                .lines()
                .find(|l| l.starts_with("MEM "))
                .unwrap_or_else(|| {
                    panic!(
                        "probe {which}:{n} failed: {}",
                        String::from_utf8_lossy(&out.stderr)
                    )
                });
            let f: Vec<usize> = line
                .split_whitespace()
                .skip(3)
                .filter_map(|v| v.parse().ok())
                .collect();
            row.push((f[0], f[1]));
        }
        let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
        println!(
            "{:>7} | {:>10.1} MiB {:>10.1} MiB | {:>10.1} MiB | {:>8.1}x",
            n,
            mib(row[0].0),
            mib(row[0].1),
            mib(row[1].0),
            row[1].0 as f64 / row[0].0.max(1) as f64
        );
    }
    println!();
}

// ---------- paired timing ----------

/// Alternates fused and unfused steps (ABAB...) on the same inputs and reports min and median of
/// each: on a shared machine whose load drifts, interleaving keeps both sides under the same
/// conditions, and the minimum estimates the unloaded speed.
fn paired_table(ns: &[i64]) {
    println!("\n== Paired timing (fused / tch alternated), forward+backward, D = {D} ==");
    println!("(for N <= 2 D the fused entry point runs the small-batch schedule; 'tiled' is the");
    println!(" tiled kernel on the same inputs, '-' where the two are the same path)");
    println!(
        "{:>7} {:>5} | {:>10} {:>10} | {:>10} {:>10} | {:>11} {:>11} | {:>10} {:>11}",
        "N",
        "reps",
        "fused min",
        "fused med",
        "tch min",
        "tch med",
        "speedup min",
        "speedup med",
        "tiled med",
        "tch/tiled"
    );
    for &n in ns {
        let reps = match n {
            ..=512 => 41,
            513..=2048 => 15,
            2049..=8192 => 5,
            _ => 3,
        };
        let (x, y, ls) = inputs(n, D, Device::Cpu);
        let with_tiled = hq_kernels::cpu::dense_pays(n as usize, D as usize);
        let mut tf = Vec::new();
        let mut tt = Vec::new();
        let mut tk = Vec::new();
        // One untimed round of each first.
        fused(&x, &y, &ls);
        unfused(&x, &y, &ls);
        if with_tiled {
            tiled(&x, &y, &ls);
        }
        for _ in 0..reps {
            zero_grads(&[&x, &y, &ls]);
            let t = Instant::now();
            fused(&x, &y, &ls);
            tf.push(t.elapsed().as_secs_f64());
            zero_grads(&[&x, &y, &ls]);
            let t = Instant::now();
            unfused(&x, &y, &ls);
            tt.push(t.elapsed().as_secs_f64());
            if with_tiled {
                zero_grads(&[&x, &y, &ls]);
                let t = Instant::now();
                tiled(&x, &y, &ls);
                tk.push(t.elapsed().as_secs_f64());
            }
        }
        let stats = |v: &mut Vec<f64>| {
            v.sort_by(|a, b| a.total_cmp(b));
            (v[0], v[v.len() / 2])
        };
        let ((fmin, fmed), (tmin, tmed)) = (stats(&mut tf), stats(&mut tt));
        let ms = |v: f64| format!("{:.2} ms", v * 1e3);
        let (kmed, kratio) = if with_tiled {
            let (_, kmed) = stats(&mut tk);
            (ms(kmed), format!("{:.2}x", tmed / kmed))
        } else {
            ("-".into(), "-".into())
        };
        println!(
            "{:>7} {:>5} | {:>10} {:>10} | {:>10} {:>10} | {:>10.2}x {:>10.2}x | {:>10} {:>11}",
            n,
            reps,
            ms(fmin),
            ms(fmed),
            ms(tmin),
            ms(tmed),
            tmin / fmin,
            tmed / fmed,
            kmed,
            kratio
        );
    }
    println!();
}

// ---------- criterion ----------

fn bench_cpu(c: &mut Criterion, ns: &[i64]) {
    let mut g = c.benchmark_group("clip_cpu_d512");
    g.sampling_mode(SamplingMode::Flat);
    for &n in ns {
        let (samples, secs) = match n {
            ..=512 => (30, 5),
            513..=2048 => (15, 8),
            _ => (10, 10),
        };
        g.sample_size(samples);
        g.warm_up_time(Duration::from_millis(500));
        g.measurement_time(Duration::from_secs(secs));
        let (x, y, ls) = inputs(n, D, Device::Cpu);
        g.bench_with_input(BenchmarkId::new("fused", n), &n, |b, _| {
            b.iter(|| {
                zero_grads(&[&x, &y, &ls]);
                fused(&x, &y, &ls)
            })
        });
        g.bench_with_input(BenchmarkId::new("tch_unfused", n), &n, |b, _| {
            b.iter(|| {
                zero_grads(&[&x, &y, &ls]);
                unfused(&x, &y, &ls)
            })
        });
    }
    g.finish();
}

fn bench_gpu(c: &mut Criterion) {
    hq_kernels::cuda::load_libtorch_cuda();
    if !hq_kernels::cuda::driver_present() || !tch::Cuda::is_available() {
        println!("GPU benchmarks skipped: no CUDA device visible to libtorch");
        return;
    }
    let dev = Device::Cuda(0);
    for d in [512i64, 768] {
        let mut g = c.benchmark_group(format!("clip_cuda_d{d}"));
        g.sampling_mode(SamplingMode::Flat);
        g.sample_size(10);
        g.warm_up_time(Duration::from_millis(500));
        g.measurement_time(Duration::from_secs(5));
        for n in sizes("HQ_LOSSES_GPU_SIZES", &[4096, 16384, 32768, 65536]) {
            let (x, y, ls) = inputs(n, d, dev);
            g.bench_with_input(BenchmarkId::new("fused", n), &n, |b, _| {
                b.iter(|| {
                    zero_grads(&[&x, &y, &ls]);
                    let v = fused(&x, &y, &ls);
                    tch::Cuda::synchronize(0);
                    v
                })
            });
            // libtorch needs 4+ N^2 floats: it may not fit where the fused loss does.
            let fits =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unfused(&x, &y, &ls)))
                    .is_ok();
            if fits {
                g.bench_with_input(BenchmarkId::new("libtorch_unfused", n), &n, |b, _| {
                    b.iter(|| {
                        zero_grads(&[&x, &y, &ls]);
                        let v = unfused(&x, &y, &ls);
                        tch::Cuda::synchronize(0);
                        v
                    })
                });
            } else {
                println!("libtorch unfused: N = {n}, D = {d} does not fit on the device");
            }
        }
        g.finish();
    }
    if std::env::var("HQ_LOSSES_FIND_MAX").is_ok() {
        for (name, f) in [
            ("fused", fused as fn(&Tensor, &Tensor, &Tensor) -> f64),
            ("libtorch_unfused", unfused),
        ] {
            let mut n = 65_536i64;
            let mut best = 0;
            loop {
                let ok = std::panic::catch_unwind(|| {
                    let (x, y, ls) = inputs(n, D, dev);
                    let v = f(&x, &y, &ls);
                    tch::Cuda::synchronize(0);
                    v.is_finite()
                })
                .unwrap_or(false);
                if !ok {
                    break;
                }
                best = n;
                n *= 2;
            }
            println!("largest N completed by {name} (D = {D}, doubling from 64k): {best}");
        }
    }
}

fn main() {
    if let Ok(spec) = std::env::var("HQ_LOSSES_MEM_PROBE") {
        probe(&spec);
        return;
    }
    if let Ok(spec) = std::env::var(DEVICE_MEM_PROBE) {
        device_memory_probe(&spec);
        return;
    }
    if let Ok(which) = std::env::var("HQ_LOSSES_DEVICE_TABLE") {
        device_table(&which);
        return;
    }
    let ns = sizes("HQ_LOSSES_SIZES", &[256, 1024, 4096, 16384]);
    println!(
        "threads: rayon {}, libtorch {}",
        rayon_threads(),
        tch::get_num_threads()
    );
    if std::env::var("HQ_LOSSES_SKIP_MEMORY").is_err() {
        memory_table(&ns);
    }
    if std::env::var("HQ_LOSSES_SKIP_PAIRED").is_err() {
        paired_table(&ns);
    }
    let mut c = Criterion::default().configure_from_args();
    if std::env::var("HQ_LOSSES_SKIP_CRITERION").is_err() {
        bench_cpu(&mut c, &ns);
    }
    bench_gpu(&mut c);
    c.final_summary();
}

fn rayon_threads() -> usize {
    rayon::current_num_threads()
}

// ---------- device table (tools/gpu-check.sh) ----------

const DEVICE_MEM_PROBE: &str = "HQ_LOSSES_DEVICE_MEM_PROBE";

type Side = fn(&Tensor, &Tensor, &Tensor) -> f64;
const SIDES: [(&str, Side); 2] = [("fused", fused), ("libtorch_unfused", unfused)];

fn env_f64(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn synchronize(dev: Device) {
    if let Device::Cuda(i) = dev {
        tch::Cuda::synchronize(i as i64);
    }
}

/// `f()`, or `None` when it panics (tch turns an out-of-memory error into a panic), with the panic
/// hook silenced meanwhile: out of memory is an expected answer here.
fn quietly<T>(f: impl FnOnce() -> T) -> Option<T> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(hook);
    r.ok()
}

/// One call of `side`, synchronised, in seconds; `None` when it fails (out of memory, or a kernel
/// error).
fn try_call(side: Side, x: &Tensor, y: &Tensor, ls: &Tensor, dev: Device) -> Option<f64> {
    let (v, secs) = quietly(|| {
        zero_grads(&[x, y, ls]);
        let t = Instant::now();
        let v = side(x, y, ls);
        synchronize(dev);
        (v, t.elapsed().as_secs_f64())
    })?;
    v.is_finite().then_some(secs)
}

fn try_inputs(n: i64, d: i64, dev: Device) -> Option<(Tensor, Tensor, Tensor)> {
    quietly(|| {
        let t = inputs(n, d, dev);
        synchronize(dev);
        t
    })
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn device_table(which: &str) {
    hq_kernels::cuda::load_libtorch_cuda();
    let cuda = hq_kernels::cuda::driver_present() && tch::Cuda::is_available();
    let dev = match which {
        "cuda" if !cuda => {
            eprintln!("HQ_LOSSES_DEVICE_TABLE=cuda: no CUDA device visible to libtorch");
            std::process::exit(2);
        }
        "cpu" => Device::Cpu,
        _ if cuda => Device::Cuda(0),
        _ => Device::Cpu,
    };
    let on_gpu = dev != Device::Cpu;
    let default_sizes: &[i64] = if on_gpu {
        &[4096, 16384, 32768, 65536]
    } else {
        &[256, 1024]
    };
    let ns = sizes("HQ_LOSSES_GPU_SIZES", default_sizes);
    let dims = sizes("HQ_LOSSES_DIMS", &[512, 768]);
    let cap = env_f64("HQ_LOSSES_MAX_SECONDS", 15.0);
    println!("== device table on {dev:?}: fused vs libtorch unfused, forward+backward ==");
    let memory = if on_gpu {
        device_memory(&ns, &dims)
    } else {
        Default::default()
    };
    let mut rows = Vec::new();
    for &d in &dims {
        for &n in &ns {
            rows.push(time_row(n, d, dev, &memory));
        }
    }
    let d_max = dims.iter().copied().max().unwrap_or(D);
    let largest: Vec<serde_json::Value> = SIDES
        .iter()
        .map(|&(name, side)| {
            // The search goes on from the largest N this side completed in the table.
            let done = rows
                .iter()
                .filter(|r| r["d"] == d_max && r[format!("{name}_ms")].is_number())
                .filter_map(|r| r["n"].as_i64())
                .max();
            largest_n(name, side, dev, d_max, done, cap)
        })
        .collect();
    let out = serde_json::json!({
        "bench": "losses_device_table",
        "device": device_name(dev),
        "dims": dims,
        "sizes": ns,
        "rows": rows,
        "largest_n": largest,
        "memory_method": if on_gpu {
            "driver-reported used memory polled during the call (PYTORCH_NO_CUDA_MEMORY_CACHING=1, \
             fresh child process), minus the memory in use before it"
        } else {
            "not measured on the CPU (the CPU memory table is the default mode)"
        },
    });
    println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    if let Ok(path) = std::env::var("HQ_LOSSES_JSON") {
        let tmp = format!("{path}.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&out).unwrap_or_default())
            .and_then(|_| std::fs::rename(&tmp, &path))
            .unwrap_or_else(|e| panic!("write {path}: {e}"));
    }
}

fn device_name(dev: Device) -> String {
    match dev {
        Device::Cuda(i) => cudarc::driver::CudaContext::new(i)
            .and_then(|c| c.name())
            .unwrap_or_else(|e| format!("cuda:{i} ({e})")),
        _ => "cpu".into(),
    }
}

/// Median milliseconds of each side at (n, d), alternated; `null` where a side does not fit.
fn time_row(
    n: i64,
    d: i64,
    dev: Device,
    memory: &std::collections::HashMap<(String, i64, i64), f64>,
) -> serde_json::Value {
    let reps = match n {
        ..=16384 => 5,
        16385..=32768 => 3,
        _ => 2,
    };
    let Some((x, y, ls)) = try_inputs(n, d, dev) else {
        println!("N = {n}, D = {d}: the inputs do not fit");
        return serde_json::json!({"n": n, "d": d, "inputs_fit": false});
    };
    // A warm-up call each (kernel compilation, allocator); a side that fails there is out.
    let mut alive: Vec<bool> = SIDES
        .iter()
        .map(|&(_, f)| try_call(f, &x, &y, &ls, dev).is_some())
        .collect();
    let mut times = vec![Vec::new(); SIDES.len()];
    for _ in 0..reps {
        for (k, &(_, f)) in SIDES.iter().enumerate() {
            if alive[k] {
                match try_call(f, &x, &y, &ls, dev) {
                    Some(t) => times[k].push(t * 1e3),
                    None => alive[k] = false,
                }
            }
        }
    }
    let mut row = serde_json::json!({"n": n, "d": d, "reps": reps});
    for (k, &(name, _)) in SIDES.iter().enumerate() {
        let ms = (alive[k] && !times[k].is_empty()).then(|| median(&mut times[k]));
        row[format!("{name}_ms")] = serde_json::json!(ms);
        row[format!("{name}_peak_mib")] =
            serde_json::json!(memory.get(&(name.to_string(), n, d)).copied());
    }
    if let (Some(f), Some(u)) = (
        row["fused_ms"].as_f64(),
        row["libtorch_unfused_ms"].as_f64(),
    ) {
        row["speedup"] = serde_json::json!(u / f);
    }
    println!("{row}");
    row
}

/// The largest N that `side` completes at D = `d`, doubling from `done` (the largest N it
/// completed in the table, or 256), and why the search stopped.
fn largest_n(
    name: &str,
    side: Side,
    dev: Device,
    d: i64,
    done: Option<i64>,
    cap: f64,
) -> serde_json::Value {
    let limit: i64 = if dev == Device::Cpu { 4096 } else { 1 << 22 };
    let mut best = done.unwrap_or(0);
    let mut n = done.map_or(256, |n| n * 2);
    let stopped = loop {
        if n > limit {
            break format!("size cap {limit}");
        }
        let Some((x, y, ls)) = try_inputs(n, d, dev) else {
            break "the inputs do not fit".to_string();
        };
        match try_call(side, &x, &y, &ls, dev) {
            None => break "out of memory (or failed)".to_string(),
            Some(t) => {
                best = n;
                if t > cap {
                    break format!("time cap: one call took {t:.1} s > {cap} s");
                }
            }
        }
        n *= 2;
    };
    println!("largest N completed by {name} (D = {d}): {best} (stopped: {stopped})");
    serde_json::json!({"side": name, "d": d, "largest_completed": best, "stopped_by": stopped})
}

/// Peak device memory (MiB) of every (side, N, D), from one child process without the caching
/// allocator.
fn device_memory(ns: &[i64], dims: &[i64]) -> std::collections::HashMap<(String, i64, i64), f64> {
    let spec = dims
        .iter()
        .flat_map(|d| ns.iter().map(move |n| format!("{n}x{d}")))
        .collect::<Vec<_>>()
        .join(",");
    let exe = std::env::current_exe().expect("current exe");
    let out = Command::new(exe)
        .env(DEVICE_MEM_PROBE, spec)
        .env("PYTORCH_NO_CUDA_MEMORY_CACHING", "1")
        .output()
        .expect("spawn memory probe");
    let mut m = std::collections::HashMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if let ["DEVMEM", side, n, d, mib] = f[..] {
            if let (Ok(n), Ok(d), Ok(mib)) = (n.parse(), d.parse(), mib.parse()) {
                m.insert((side.to_string(), n, d), mib);
            }
        }
    }
    if !out.status.success() {
        eprintln!(
            "device memory probe stopped early: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    m
}

/// Child side of [`device_memory`]: prints `DEVMEM <side> <n> <d> <peak MiB>` per call that ran.
fn device_memory_probe(spec: &str) {
    hq_kernels::cuda::load_libtorch_cuda();
    let dev = Device::Cuda(0);
    let ctx = cudarc::driver::CudaContext::new(0).expect("CUDA context");
    let used = |c: &cudarc::driver::CudaContext| c.mem_get_info().map(|(f, t)| t - f).unwrap_or(0);
    for item in spec.split(',') {
        let Some((n, d)) = item.split_once('x') else {
            continue;
        };
        let (Ok(n), Ok(d)) = (n.parse::<i64>(), d.parse::<i64>()) else {
            continue;
        };
        for &(name, side) in &SIDES {
            let Some((x, y, ls)) = try_inputs(n, d, dev) else {
                break;
            };
            // The gradients exist after a first call (as in training, where they persist).
            if try_call(side, &x, &y, &ls, dev).is_none() {
                continue;
            }
            let base = used(&ctx);
            let stop = Arc::new(AtomicBool::new(false));
            let peak = Arc::new(AtomicUsize::new(base));
            let poller = {
                let (stop, peak, ctx) = (stop.clone(), peak.clone(), ctx.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        peak.fetch_max(used(&ctx), Ordering::Relaxed);
                    }
                })
            };
            let ok = try_call(side, &x, &y, &ls, dev).is_some();
            stop.store(true, Ordering::Relaxed);
            let _ = poller.join();
            let after = used(&ctx);
            let peak = peak.load(Ordering::Relaxed).max(after).saturating_sub(base);
            if ok {
                println!("DEVMEM {name} {n} {d} {:.1}", peak as f64 / 1048576.0);
            }
        }
    }
}
