//! Shard-reading throughput: `hq_data::shards` against Python's `webdataset` on the same files.
//!
//! Generates 2000 samples (JPEG images from 64x64 to 256x256, alt-texts, JSON metadata with
//! refined texts on half of them) in 4 shards, then measures with criterion:
//! - `plain`: tar parsing, grouping, UTF-8 and JSON checks, no image work (`ImageCheck::None`);
//! - `header`: the default reader (plus an image-header probe per sample);
//! - `decode`: plain reading plus a full decode of every image to RGB (like `.decode("pil")`);
//! - `parallel_*`: the same through `read_parallel` (one worker per core, bounded channel).
//!
//! Afterwards it times each variant directly (best of several runs), runs
//! `benches/python/shards_bench.py` (webdataset plain and with PIL decoding) on the same shards, and
//! prints samples/s, MB/s and the Rust/Python ratios. Set `HQ_PYTHON` (`source tools/env.sh`) for the
//! Python side; without it only the Rust numbers are printed.

#[path = "common/synthetic.rs"]
mod synthetic;

use criterion::{black_box, Criterion, Throughput};
use hq_data::shards::{
    decode_image, read_parallel, ImageCheck, ParallelOptions, ReadOptions, ShardReader,
    ShardWriter, ShardWriterOptions,
};
use hq_data::{ImageBytes, RefinedTexts, Sample};
use image::RgbImage;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use synthetic::{jpeg, Rng};

const SAMPLES: usize = 2000;
const PER_SHARD: u64 = 500;

fn make_jpeg(rng: &mut Rng, w: u32, h: u32) -> Vec<u8> {
    let (a, b, c) = (rng.range(0, 255), rng.range(1, 6), rng.range(1, 6));
    let mut noise = Rng(rng.next() | 1);
    let img = RgbImage::from_fn(w, h, |x, y| {
        let n = (noise.next() % 16) as u32;
        image::Rgb([
            ((x * b + a + n) % 256) as u8,
            ((y * c + n) % 256) as u8,
            (((x + y) / 2 + a / 2 + n) % 256) as u8,
        ])
    });
    jpeg(&img)
}

fn make_shards(dir: &Path) -> Vec<PathBuf> {
    let mut rng = Rng(0x5eed_1234_abcd_ef01);
    let opts = ShardWriterOptions {
        max_samples: Some(PER_SHARD),
        ..Default::default()
    };
    let mut w = match ShardWriter::new(dir.join("bench"), opts) {
        Ok(w) => w,
        Err(e) => panic!("shard writer: {e}"),
    };
    for i in 0..SAMPLES {
        let (wd, ht) = (rng.range(64, 256), rng.range(64, 256));
        let mut s = Sample::new(
            format!("{i:09}"),
            ImageBytes {
                ext: "jpg".into(),
                bytes: make_jpeg(&mut rng, wd, ht),
            },
            format!(
                "a photo of item {i} on a table, stock image {}",
                rng.next() % 1000
            ),
        );
        s.meta
            .insert("uid".into(), format!("{:032x}", rng.next()).into());
        s.meta.insert(
            "url".into(),
            format!("https://example.com/img/{i}.jpg").into(),
        );
        s.meta.insert("width".into(), wd.into());
        s.meta.insert("height".into(), ht.into());
        if i % 2 == 0 {
            s.refined = Some(RefinedTexts {
                long_positive: format!(
                    "The image shows item {i} on a wooden table, lit from the left, with a white wall behind it."
                ),
                long_negative: format!(
                    "The image shows item {i} on a glass table, lit from the right, with a red wall behind it."
                ),
                tags_positive: vec!["table".into(), "wood".into(), "indoor".into()],
                tags_negative: vec!["glass".into(), "red wall".into()],
                source: Some("oracle".into()),
            });
        }
        if let Err(e) = w.write(&s) {
            panic!("write: {e}");
        }
    }
    match w.finish() {
        Ok(p) => p,
        Err(e) => panic!("finish: {e}"),
    }
}

fn opts(check: ImageCheck) -> ReadOptions {
    ReadOptions {
        image_check: check,
        ..Default::default()
    }
}

fn read_seq(shards: &[PathBuf], check: ImageCheck, decode: bool) -> usize {
    let mut n = 0;
    for item in ShardReader::new(shards.to_vec(), opts(check)) {
        let Ok(s) = item else {
            panic!("bad sample in benchmark shards");
        };
        if decode {
            let img = s.image.as_ref().map(|i| decode_image(&i.bytes, u64::MAX));
            match img {
                Some(Ok(img)) => {
                    black_box(img.into_rgb8());
                }
                _ => panic!("undecodable image in benchmark shards"),
            }
        }
        black_box(&s);
        n += 1;
    }
    n
}

fn read_par(shards: &[PathBuf], check: ImageCheck) -> usize {
    let mut n = 0;
    for item in read_parallel(shards.to_vec(), opts(check), ParallelOptions::default()) {
        if item.is_err() {
            panic!("bad sample in benchmark shards");
        }
        black_box(&item);
        n += 1;
    }
    n
}

type Variant<'a> = (&'a str, Box<dyn Fn() -> usize + 'a>);

fn variants(shards: &[PathBuf]) -> Vec<Variant<'_>> {
    vec![
        (
            "plain",
            Box::new(move || read_seq(shards, ImageCheck::None, false)),
        ),
        (
            "header",
            Box::new(move || read_seq(shards, ImageCheck::Header, false)),
        ),
        (
            "decode",
            Box::new(move || read_seq(shards, ImageCheck::None, true)),
        ),
        (
            "parallel_plain",
            Box::new(move || read_par(shards, ImageCheck::None)),
        ),
        (
            "parallel_decode",
            Box::new(move || read_par(shards, ImageCheck::Decode)),
        ),
    ]
}

fn best_of(runs: usize, f: &dyn Fn() -> usize) -> Duration {
    let _ = f();
    (0..runs)
        .map(|_| {
            let t = Instant::now();
            let n = f();
            assert_eq!(n, SAMPLES);
            t.elapsed()
        })
        .min()
        .unwrap_or_default()
}

struct PyResult {
    samples: f64,
    best_s: f64,
}

fn python(mode: &str, shards: &[PathBuf]) -> Result<PyResult, String> {
    let py = std::env::var("HQ_PYTHON").map_err(|_| "HQ_PYTHON not set".to_string())?;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/shards_bench.py");
    let out = Command::new(py)
        .arg(script)
        .args(["--mode", mode, "--repeat", "5"])
        .args(shards)
        .output()
        .map_err(|e| format!("cannot run python: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("bad JSON from python: {e}"))?;
    let get = |k: &str| v.get(k).and_then(|x| x.as_f64()).ok_or(format!("no {k}"));
    Ok(PyResult {
        samples: get("samples")?,
        best_s: get("best_s")?,
    })
}

fn summary(shards: &[PathBuf]) {
    let bytes: u64 = shards
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    let mb = bytes as f64 / 1e6;
    println!();
    println!(
        "== shard reading: {SAMPLES} samples, {} shards, {mb:.1} MB (JPEG 64..256 px), {} cores ==",
        shards.len(),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "{:<34} {:>12} {:>10} {:>10}",
        "variant", "samples/s", "MB/s", "best ms"
    );
    let mut rust = std::collections::HashMap::new();
    for (name, f) in variants(shards) {
        let t = best_of(5, &*f).as_secs_f64();
        let rate = SAMPLES as f64 / t;
        rust.insert(name, rate);
        println!(
            "{:<34} {:>12.0} {:>10.1} {:>10.1}",
            format!("rust {name}"),
            rate,
            mb / t,
            t * 1e3
        );
    }
    let pythons: [(&str, &str, &[&str]); 2] = [
        (
            "plain",
            "python webdataset plain",
            &["plain", "header", "parallel_plain"],
        ),
        (
            "pil",
            "python webdataset decode(\"pil\")",
            &["decode", "parallel_decode"],
        ),
    ];
    for (mode, label, compare) in pythons {
        match python(mode, shards) {
            Ok(r) => {
                let rate = r.samples / r.best_s;
                println!(
                    "{:<34} {:>12.0} {:>10.1} {:>10.1}",
                    label,
                    rate,
                    mb / r.best_s,
                    r.best_s * 1e3
                );
                for c in compare {
                    if let Some(rr) = rust.get(c) {
                        println!("    ratio rust {c} / {label}: {:.1}x", rr / rate);
                    }
                }
            }
            Err(e) => println!("{label}: skipped ({})", e.trim()),
        }
    }
}

fn main() {
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => panic!("tempdir: {e}"),
    };
    let shards = make_shards(dir.path());
    let bytes: u64 = shards
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();

    let mut c = Criterion::default()
        .sample_size(10)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1))
        .configure_from_args();
    {
        let mut g = c.benchmark_group("shards_read_samples");
        g.throughput(Throughput::Elements(SAMPLES as u64));
        for (name, f) in variants(&shards) {
            g.bench_function(name, |b| b.iter(&f));
        }
        g.finish();
    }
    {
        let mut g = c.benchmark_group("shards_read_bytes");
        g.throughput(Throughput::Bytes(bytes));
        let f = || read_seq(&shards, ImageCheck::None, false);
        g.bench_function("plain", |b| b.iter(f));
        g.finish();
    }
    c.final_summary();
    // `cargo bench -- --test` (or a filter) runs each benchmark once; the summary is for full runs.
    let quick = std::env::args().any(|a| a == "--test" || a == "--list");
    if !quick {
        summary(&shards);
    }
}
