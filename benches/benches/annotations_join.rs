//! Reading with side-car annotations joined at read time against reading shards that already hold
//! them (issue 18's target: within 10%).
//!
//! Generates 4000 samples (JPEG 64-160 px, alt-text, JSON metadata with a `uid`) in 8 shards, the
//! refined texts of 90% of them (about 1.2 KB each: d+, d-, 8 + 8 tags) as per-shard JSONL side-car
//! files, and the pre-joined copy of the shards (`join_shards`). Then, on one thread each:
//! - `read/prejoined`: every shard read sequentially (`open_shard`, no image check), refined texts
//!   parsed from each sample's JSON member;
//! - `read/sidecar`: the raw shards read the same way, each shard's JSONL file loaded and joined
//!   (`Annotations::for_shard` + `attach`).
//!
//! This is the worst case for the join: no image work to hide it. Afterwards it times both directly
//! (best of 5) and the whole training loader (`DataLoader`, 64 px crops, batch 64, 2 decode
//! threads, one epoch) on both inputs (best of 5, interleaved), prints samples/s and the ratios, and writes
//! `benches/results/annotations_join.json`.

#[path = "common/synthetic.rs"]
mod synthetic;

use criterion::{black_box, Criterion, Throughput};
use hq_data::shards::annotations::join_shards;
use hq_data::shards::{
    open_shard, AnnotationSpec, Annotations, ImageCheck, ReadOptions, ShardWriter,
    ShardWriterOptions,
};
use hq_data::{ImageBytes, RefinedTexts, Sample};
use image::RgbImage;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use synthetic::{jpeg, Rng};

const SAMPLES: usize = 4000;
const PER_SHARD: u64 = 500;

const WORDS: [&str; 16] = [
    "red", "cube", "small", "left", "of", "a", "dotted", "ring", "large", "blue", "sphere", "next",
    "to", "the", "green", "triangle",
];

fn words(rng: &mut Rng, n: usize) -> String {
    let v: Vec<&str> = (0..n)
        .map(|_| WORDS[(rng.next() % WORDS.len() as u64) as usize])
        .collect();
    v.join(" ")
}

fn make_jpeg(rng: &mut Rng, w: u32, h: u32) -> Vec<u8> {
    let a = rng.range(0, 255);
    let img = RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            ((x + a) % 256) as u8,
            (y % 256) as u8,
            ((x + y) % 256) as u8,
        ])
    });
    jpeg(&img)
}

/// Raw shards in `dir/raw`, side-car files in `dir/ann`, the joined copy in `dir/joined`.
fn make_data(dir: &Path) -> (Vec<PathBuf>, Vec<PathBuf>, AnnotationSpec) {
    let mut rng = Rng(0x5eed_0018_abcd_ef01);
    let mut w = ShardWriter::new(
        dir.join("raw/part"),
        ShardWriterOptions {
            max_samples: Some(PER_SHARD),
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("shard writer: {e}"));
    let ann = dir.join("ann");
    std::fs::create_dir_all(&ann).unwrap_or_else(|e| panic!("mkdir: {e}"));
    let mut lines: Vec<String> = Vec::new();
    let mut shard = 0;
    let flush = |lines: &mut Vec<String>, shard: usize| {
        let path = ann.join(format!("part-{shard:05}.jsonl"));
        std::fs::write(&path, lines.join("\n") + "\n").unwrap_or_else(|e| panic!("write: {e}"));
        lines.clear();
    };
    for i in 0..SAMPLES {
        let (wd, ht) = (rng.range(64, 160), rng.range(64, 160));
        let bytes = make_jpeg(&mut rng, wd, ht);
        let mut s = Sample::new(
            format!("{i:09}"),
            ImageBytes {
                ext: "jpg".into(),
                bytes,
            },
            words(&mut rng, 12),
        );
        let uid = format!("{:032x}", rng.next());
        s.meta.insert("uid".into(), uid.clone().into());
        s.meta.insert("width".into(), wd.into());
        s.meta.insert("height".into(), ht.into());
        w.write(&s).unwrap_or_else(|e| panic!("write sample: {e}"));
        if i % 10 != 9 {
            let r = RefinedTexts {
                long_positive: (0..5).map(|_| words(&mut rng, 16) + ".").collect(),
                long_negative: (0..5).map(|_| words(&mut rng, 16) + ".").collect(),
                tags_positive: (0..8).map(|_| words(&mut rng, 2)).collect(),
                tags_negative: (0..8).map(|_| words(&mut rng, 2)).collect(),
                source: Some("model:bench".into()),
            };
            let rec = serde_json::json!({"uid": uid, "key": s.key, "hq_clip": r});
            lines.push(rec.to_string());
        }
        if ((i + 1) as u64).is_multiple_of(PER_SHARD) {
            flush(&mut lines, shard);
            shard += 1;
        }
    }
    let raw = w.finish().unwrap_or_else(|e| panic!("finish: {e}"));
    let spec = AnnotationSpec::new(ann.display().to_string());
    let annotations = Annotations::open(&spec).unwrap_or_else(|e| panic!("annotations: {e}"));
    let report = join_shards(&raw, &annotations, &dir.join("joined"), 2, false)
        .unwrap_or_else(|e| panic!("join: {e}"));
    let mut joined = report.written;
    joined.sort();
    (raw, joined, spec)
}

fn opts() -> ReadOptions {
    ReadOptions {
        image_check: ImageCheck::None,
        ..ReadOptions::default()
    }
}

/// Samples read and how many carry refined texts.
fn read_prejoined(shards: &[PathBuf]) -> (u64, u64) {
    let (mut n, mut refined) = (0, 0);
    for s in shards {
        let stream = open_shard(s, &opts()).unwrap_or_else(|e| panic!("open: {e}"));
        for item in stream.flatten() {
            n += 1;
            refined += u64::from(item.refined.is_some());
            black_box(&item);
        }
    }
    (n, refined)
}

fn read_sidecar(shards: &[PathBuf], ann: &Annotations) -> (u64, u64) {
    let (mut n, mut refined) = (0, 0);
    for s in shards {
        let mut sa = ann.for_shard(s);
        let stream = open_shard(s, &opts()).unwrap_or_else(|e| panic!("open: {e}"));
        for mut item in stream.flatten() {
            n += 1;
            refined += u64::from(sa.attach(&mut item));
            black_box(&item);
        }
    }
    (n, refined)
}

fn best_of(runs: usize, mut f: impl FnMut()) -> f64 {
    (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn loader_pass(shards: &[PathBuf], spec: Option<&AnnotationSpec>) -> u64 {
    let specs = shards.iter().map(|p| p.display().to_string()).collect();
    let mut cfg = hq_train::data::LoaderConfig::new(specs, 64, 64);
    cfg.threads = 2;
    cfg.epochs = Some(1);
    cfg.shuffle_buffer = 500;
    cfg.annotations = spec.cloned();
    let loader =
        hq_train::data::DataLoader::new(cfg, None, None).unwrap_or_else(|e| panic!("loader: {e}"));
    loader
        .map(|b| b.unwrap_or_else(|e| panic!("batch: {e}")).len() as u64)
        .sum()
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn command_out(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .current_dir(root())
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn main() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let (raw, joined, spec) = make_data(dir.path());
    let ann = Annotations::open(&spec).unwrap_or_else(|e| panic!("annotations: {e}"));
    let a = read_prejoined(&joined);
    let b = read_sidecar(&raw, &ann);
    assert_eq!(a, b, "both inputs must give the same samples and texts");
    assert_eq!(a.0, SAMPLES as u64);

    let mut c = Criterion::default().configure_from_args();
    {
        let mut g = c.benchmark_group("read");
        g.throughput(Throughput::Elements(SAMPLES as u64));
        g.sample_size(10);
        g.measurement_time(Duration::from_secs(5));
        g.bench_function("prejoined", |bch| bch.iter(|| read_prejoined(&joined)));
        g.bench_function("sidecar", |bch| bch.iter(|| read_sidecar(&raw, &ann)));
        g.finish();
    }
    c.final_summary();

    // Interleaved so that load from elsewhere on the machine hits both alike.
    let (mut t_pre, mut t_side) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..5 {
        t_pre = t_pre.min(best_of(1, || {
            black_box(read_prejoined(&joined));
        }));
        t_side = t_side.min(best_of(1, || {
            black_box(read_sidecar(&raw, &ann));
        }));
    }
    let (mut l_pre, mut l_side) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..5 {
        l_pre = l_pre.min(best_of(1, || {
            black_box(loader_pass(&joined, None));
        }));
        l_side = l_side.min(best_of(1, || {
            black_box(loader_pass(&raw, Some(&spec)));
        }));
    }
    let n = SAMPLES as f64;
    let figures = serde_json::json!({
        "read_prejoined_samples_per_s": n / t_pre,
        "read_sidecar_samples_per_s": n / t_side,
        "read_sidecar_vs_prejoined": t_pre / t_side,
        "loader_prejoined_samples_per_s": n / l_pre,
        "loader_sidecar_samples_per_s": n / l_side,
        "loader_sidecar_vs_prejoined": l_pre / l_side,
    });
    println!(
        "annotations_join: read pre-joined {:.0} samples/s, with the side-car join {:.0} samples/s \
         ({:.3}x); loader (64 px, batch 64, 2 threads) pre-joined {:.0} samples/s, side-car {:.0} \
         samples/s ({:.3}x)",
        n / t_pre,
        n / t_side,
        t_pre / t_side,
        n / l_pre,
        n / l_side,
        l_pre / l_side
    );
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_default();
    let result = serde_json::json!({
        "bench": "annotations_join",
        "samples": SAMPLES,
        "shards": SAMPLES as u64 / PER_SHARD,
        "annotated_fraction": 0.9,
        "cpu_model": cpu_model,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "load_average": command_out("cat", &["/proc/loadavg"]),
        "date": command_out("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        "commit": command_out("git", &["rev-parse", "--short", "HEAD"]),
        "figures": figures,
    });
    let path = root().join("benches/results/annotations_join.json");
    let text = serde_json::to_string_pretty(&result).unwrap_or_default();
    if let Err(e) = hq_data::atomic::write_atomic(&path, text.as_bytes()) {
        eprintln!("cannot write {}: {e}", path.display());
    } else {
        println!("wrote {}", path.display());
    }
}
