//! The training data pipeline (`hq_train::data`).
//!
//! Parity with open_clip 3.3 (`tests/python/train_transform_reference.py`, run with `$HQ_PYTHON`
//! or `<workspace>/.venv/bin/python`; the parity tests are skipped with a message when neither
//! exists):
//! - eval transform (`image_transform(S, is_train=False)`) on lossless PNGs of many sizes and
//!   aspect ratios, RGB and grayscale, S = 64 and 224: the same float32 values (PIL's bicubic
//!   resampling is reproduced bit for bit, uint8 intermediate included);
//! - train transform with the crop fixed to one drawn by our `RandomResizedCrop.get_params`:
//!   the same float32 values;
//! - crop-parameter sampling: the statistics of our draws against torchvision's;
//! - JPEG inputs: the only difference left is the decoder (the `image` crate against PIL's
//!   libjpeg-turbo), reported.
//!
//! Loader (no Python): batch layout and text policy on the synthetic corpus, exact resume at many
//! cut points (also with damaged shards and different thread counts), bad samples skipped and
//! counted by reason, worker shard split, tag vocabulary and CSR targets.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hq_data::shards::{ReadOptions, ShardReader, ShardWriter, ShardWriterOptions};
use hq_data::synth::{self, SynthConfig, WriteOptions};
use hq_data::text::segment::segments;
use hq_data::text::tokenizer::ClipTokenizer;
use hq_data::Sample;
use hq_train::data::transform::{random_resized_crop_params, Normalizer, DEFAULT_CROP_RATIO};
use hq_train::data::{
    build_tag_vocab, Batch, DataLoader, ImageTransform, LoaderConfig, LoaderState, TextPolicy,
    TransformKind,
};
use image::{DynamicImage, GrayImage, RgbImage};
use rand::SeedableRng;
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// helpers

fn python() -> Option<PathBuf> {
    hq_tests::python_if_present("the open_clip comparison")
}

fn reference(py: &Path, manifest: &Value, dir: &Path) -> Value {
    let mpath = dir.join("manifest.json");
    std::fs::write(&mpath, manifest.to_string()).expect("write manifest");
    let stdout =
        hq_tests::run_python_script(py, "train_transform_reference.py", [mpath.as_path(), dir]);
    serde_json::from_str(stdout.lines().last().unwrap_or("{}")).expect("reference JSON")
}

fn read_f32(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).expect("read floats");
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Deterministic test content: gradients, hash noise, a hard-edged block and saturated stripes
/// (so the resampler's clamping is exercised).
fn test_image(w: u32, h: u32, seed: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        let n = (x.wrapping_mul(73_856_093)
            ^ y.wrapping_mul(19_349_663)
            ^ seed.wrapping_mul(83_492_791))
        .wrapping_mul(2_654_435_761);
        let noise = (n >> 24) as i32 - 128;
        let gx = (x * 255 / w.max(1)) as i32;
        let gy = (y * 255 / h.max(1)) as i32;
        let block = x > w / 3 && x < w / 2 && y > h / 4 && y < h * 3 / 4;
        let stripe = matches!((x / 3 + seed) % 5, 0);
        let px = |v: i32| v.clamp(0, 255) as u8;
        if stripe {
            image::Rgb([255, 0, px(gy)])
        } else if block {
            image::Rgb([0, 255, 255])
        } else {
            image::Rgb([
                px(gx + noise / 4),
                px(gy + noise / 8),
                px((gx + gy) / 2 + noise / 2),
            ])
        }
    })
}

fn save_png(img: &DynamicImage, path: &Path) {
    img.save_with_format(path, image::ImageFormat::Png)
        .expect("save png");
}

// ---------------------------------------------------------------------------------------------
// transform parity

const SIZES: &[(u32, u32)] = &[
    (64, 64),
    (100, 50),
    (50, 100),
    (37, 91),
    (300, 200),
    (224, 224),
    (225, 224),
    (17, 23),
    (640, 480),
    (255, 256),
    (500, 333),
    (1000, 90),
    (65, 64),
    (67, 64),
    // Tall images: Pillow 13 runs the vertical pass first when the height shrinks much more.
    (90, 1000),
    (300, 900),
    (120, 400),
];

#[test]
fn eval_transform_matches_open_clip_on_png() {
    let Some(py) = python() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut images: Vec<(String, PathBuf, DynamicImage)> = Vec::new();
    for (i, &(w, h)) in SIZES.iter().enumerate() {
        let img = DynamicImage::ImageRgb8(test_image(w, h, i as u32));
        let path = dir.path().join(format!("rgb_{w}x{h}.png"));
        save_png(&img, &path);
        images.push((format!("rgb {w}x{h}"), path, img));
    }
    for &(w, h) in &[(80u32, 45u32), (33, 240)] {
        let rgb = test_image(w, h, 99);
        let gray = GrayImage::from_fn(w, h, |x, y| image::Luma([rgb.get_pixel(x, y).0[2]]));
        let img = DynamicImage::ImageLuma8(gray);
        let path = dir.path().join(format!("gray_{w}x{h}.png"));
        save_png(&img, &path);
        images.push((format!("gray {w}x{h}"), path, img));
    }
    let out_sizes = [64u32, 224];
    let mut jobs = Vec::new();
    for (i, (_, path, _)) in images.iter().enumerate() {
        for s in out_sizes {
            jobs.push(json!({"path": path, "size": s, "out": format!("eval_{i}_{s}.f32")}));
        }
    }
    let info = reference(&py, &json!({"eval": jobs}), dir.path());
    eprintln!("reference versions: {}", info["versions"]);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut worst = 0f32;
    for (i, (name, _, img)) in images.iter().enumerate() {
        for s in out_sizes {
            let ours = ImageTransform::eval(s).apply(img, &mut rng);
            let theirs = read_f32(&dir.path().join(format!("eval_{i}_{s}.f32")));
            let d = max_abs_diff(&ours, &theirs);
            eprintln!("eval {name:>14} -> {s:>3}: max |ours - open_clip| = {d:e}");
            worst = worst.max(d);
        }
    }
    eprintln!("eval transform on PNG: max abs difference after normalisation {worst:e}");
    assert!(
        worst <= 1e-6,
        "eval transform differs from open_clip by {worst}"
    );
}

/// A checkpoint's own `preprocess_cfg` (CLIPA-style: another mean and std, `resize_mode
/// "squash"`) gives open_clip's eval transform for it.
#[test]
fn eval_transform_with_a_checkpoints_preprocess_matches_open_clip() {
    let Some(py) = python() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let cfgs = [
        json!({"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "resize_mode": "squash"}),
        json!({"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "resize_mode": "shortest"}),
    ];
    let mut images = Vec::new();
    let mut jobs = Vec::new();
    for (i, &(w, h)) in [(100u32, 50u32), (37, 91), (300, 200), (64, 64)]
        .iter()
        .enumerate()
    {
        let img = DynamicImage::ImageRgb8(test_image(w, h, 40 + i as u32));
        let path = dir.path().join(format!("pp_{w}x{h}.png"));
        save_png(&img, &path);
        for (c, cfg) in cfgs.iter().enumerate() {
            let mut job = cfg.clone();
            job["path"] = json!(path);
            job["size"] = json!(48);
            job["out"] = json!(format!("pp_{i}_{c}.f32"));
            jobs.push(job);
        }
        images.push(img);
    }
    reference(&py, &json!({"eval": jobs}), dir.path());
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    for (i, img) in images.iter().enumerate() {
        for (c, cfg) in cfgs.iter().enumerate() {
            let pre = hq_data::transform::Preprocess::from_open_clip(cfg).expect("preprocess_cfg");
            let ours = pre.eval_transform(48).apply(img, &mut rng);
            let theirs = read_f32(&dir.path().join(format!("pp_{i}_{c}.f32")));
            let d = max_abs_diff(&ours, &theirs);
            assert!(d <= 1e-6, "image {i}, {cfg}: differs from open_clip by {d}");
        }
    }
    // What we do not reproduce is refused, not approximated.
    for bad in [
        json!({"interpolation": "bilinear"}),
        json!({"resize_mode": "longest"}),
    ] {
        assert!(
            hq_data::transform::Preprocess::from_open_clip(&bad).is_err(),
            "{bad}"
        );
    }
}

#[test]
fn train_transform_matches_open_clip_with_the_same_crop() {
    let Some(py) = python() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let mut cases = Vec::new();
    let mut jobs = Vec::new();
    for (i, &(w, h)) in SIZES.iter().enumerate() {
        let img = test_image(w, h, 7 + i as u32);
        let path = dir.path().join(format!("train_{i}.png"));
        save_png(&DynamicImage::ImageRgb8(img.clone()), &path);
        for (k, s) in [64u32, 224].into_iter().enumerate() {
            let tf = ImageTransform::train(s);
            let mut plan = tf.plan(w, h, &mut rng);
            if k == 0 && i == 0 {
                // The whole image at the output size: the identity resize.
                plan.src = hq_train::data::transform::CropBox::full(w, h);
            }
            let name = format!("train_{i}_{s}.f32");
            jobs.push(json!({
                "path": path, "size": s, "out": name,
                "top": plan.src.top, "left": plan.src.left,
                "height": plan.src.height, "width": plan.src.width,
            }));
            cases.push((
                format!("{w}x{h} crop {:?} -> {s}", plan.src),
                img.clone(),
                plan,
                name,
                s,
            ));
        }
    }
    let info = reference(&py, &json!({"train": jobs}), dir.path());
    assert_eq!(
        info["train_scale"],
        json!([0.9, 1.0]),
        "open_clip's default scale"
    );
    let ratio = info["train_ratio"].as_array().expect("ratio");
    assert!((ratio[0].as_f64().unwrap_or(0.0) - 0.75).abs() < 1e-12);
    assert!((ratio[1].as_f64().unwrap_or(0.0) - 4.0 / 3.0).abs() < 1e-12);
    let norm = Normalizer::clip();
    let mut worst = 0f32;
    for (name, img, plan, file, s) in cases {
        let mut ours = vec![0f32; 3 * (s * s) as usize];
        plan.run_normalized(img.as_raw(), img.width() as usize * 3, &norm, &mut ours);
        let theirs = read_f32(&dir.path().join(file));
        let d = max_abs_diff(&ours, &theirs);
        eprintln!("train {name}: max diff {d:e}");
        if d > 0.0 {
            let plane = (s * s) as usize;
            for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                if a != b {
                    let (c, y, x) = (i / plane, (i % plane) / s as usize, i % s as usize);
                    eprintln!("  c{c} y{y} x{x}: ours {a} theirs {b}");
                }
            }
        }
        worst = worst.max(d);
    }
    eprintln!("train transform (fixed crop) on PNG: max abs difference {worst:e}");
    assert!(
        worst <= 1e-6,
        "train transform differs from open_clip by {worst}"
    );
}

#[derive(Debug)]
struct CropStats {
    mean_area: f64,
    min_area: f64,
    max_area: f64,
    mean_log_aspect: f64,
    std_log_aspect: f64,
    min_aspect: f64,
    max_aspect: f64,
    full: f64,
}

fn our_crop_stats(w: u32, h: u32, n: usize) -> CropStats {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let (mut areas, mut logs, mut full) = (Vec::new(), Vec::new(), 0usize);
    for _ in 0..n {
        let d = random_resized_crop_params(w, h, (0.9, 1.0), DEFAULT_CROP_RATIO, &mut rng);
        let c = d.crop;
        assert!(c.top + c.height <= h && c.left + c.width <= w);
        areas.push(c.width as f64 * c.height as f64 / (w as f64 * h as f64));
        logs.push((c.width as f64 / c.height as f64).ln());
        full += usize::from(c.width == w && c.height == h);
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let ml = mean(&logs);
    CropStats {
        mean_area: mean(&areas),
        min_area: areas.iter().copied().fold(f64::INFINITY, f64::min),
        max_area: areas.iter().copied().fold(0.0, f64::max),
        mean_log_aspect: ml,
        std_log_aspect: (logs.iter().map(|l| (l - ml).powi(2)).sum::<f64>() / n as f64).sqrt(),
        min_aspect: logs.iter().copied().fold(f64::INFINITY, f64::min).exp(),
        max_aspect: logs.iter().copied().fold(f64::NEG_INFINITY, f64::max).exp(),
        full: full as f64 / n as f64,
    }
}

#[test]
fn crop_parameter_sampling_matches_torchvision_statistics() {
    let Some(py) = python() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let sizes = [
        (64u32, 64u32),
        (256, 256),
        (300, 100),
        (100, 300),
        (500, 333),
        (33, 31),
    ];
    let n = 20_000;
    let info = reference(
        &py,
        &json!({"params": {"sizes": sizes.iter().map(|&(w, h)| json!([w, h])).collect::<Vec<_>>(), "n": n, "seed": 0}}),
        dir.path(),
    );
    for (w, h) in sizes {
        let t = &info["params"][format!("{w}x{h}")];
        let f = |k: &str| t[k].as_f64().unwrap_or(f64::NAN);
        let o = our_crop_stats(w, h, n);
        eprintln!(
            "{w}x{h}: area mean {:.4}/{:.4} min {:.4}/{:.4} max {:.4}/{:.4}; log-aspect mean \
             {:+.4}/{:+.4} std {:.4}/{:.4}; aspect {:.3}..{:.3} / {:.3}..{:.3}; whole image {:.3}/{:.3} \
             (ours/torchvision)",
            o.mean_area,
            f("mean_area_fraction"),
            o.min_area,
            f("min_area_fraction"),
            o.max_area,
            f("max_area_fraction"),
            o.mean_log_aspect,
            f("mean_log_aspect"),
            o.std_log_aspect,
            f("std_log_aspect"),
            o.min_aspect,
            o.max_aspect,
            f("min_aspect"),
            f("max_aspect"),
            o.full,
            f("full_image_fraction"),
        );
        // Statistical agreement (20,000 draws each: standard errors are well below these).
        assert!(
            (o.mean_area - f("mean_area_fraction")).abs() < 0.002,
            "{w}x{h} area mean"
        );
        assert!(
            (o.mean_log_aspect - f("mean_log_aspect")).abs() < 0.006,
            "{w}x{h} aspect mean"
        );
        assert!(
            (o.std_log_aspect - f("std_log_aspect")).abs() < 0.006,
            "{w}x{h} aspect std"
        );
        assert!(
            (o.full - f("full_image_fraction")).abs() < 0.015,
            "{w}x{h} whole-image rate"
        );
        // Ranges: the crop area stays within scale up to integer rounding, aspect within ratio
        // up to rounding (or the clamped fallback), as torchvision's.
        let slack = 2.5 / (w.min(h) as f64);
        assert!(o.min_area >= f("min_area_fraction").min(0.9) - 2.0 * slack);
        assert!(o.max_area <= 1.0);
        assert!(o.min_aspect >= f("min_aspect").min(0.75) - slack);
        assert!(o.max_aspect <= f("max_aspect").max(4.0 / 3.0) + slack);
    }
}

#[test]
fn jpeg_inputs_differ_only_by_the_decoder() {
    let Some(py) = python() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut files = Vec::new();
    for (side, n) in [(64u32, 6u64), (256, 4)] {
        let cfg = SynthConfig {
            image_size: side,
            ..SynthConfig::default()
        };
        for i in 0..n {
            let g = synth::train_sample(&cfg, i).expect("synth sample");
            let bytes = g.sample.image.expect("image").bytes;
            let path = dir.path().join(format!("synth_{side}_{i}.jpg"));
            std::fs::write(&path, &bytes).expect("write jpeg");
            files.push((path, bytes));
        }
    }
    let mut jobs = Vec::new();
    let mut dec = Vec::new();
    for (i, (p, _)) in files.iter().enumerate() {
        dec.push(json!({"path": p, "out": format!("dec_{i}.u8")}));
        for s in [64u32, 224] {
            jobs.push(json!({"path": p, "size": s, "out": format!("jeval_{i}_{s}.f32")}));
        }
    }
    reference(&py, &json!({"eval": jobs, "decode": dec}), dir.path());
    let (mut px_max, mut px_sum, mut px_n) = (0i32, 0u64, 0u64);
    let mut worst = 0f32;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    for (i, (_, bytes)) in files.iter().enumerate() {
        let ours = image::load_from_memory(bytes).expect("decode").to_rgb8();
        let theirs = std::fs::read(dir.path().join(format!("dec_{i}.u8"))).expect("read");
        assert_eq!(ours.as_raw().len(), theirs.len());
        for (a, b) in ours.as_raw().iter().zip(&theirs) {
            let d = (*a as i32 - *b as i32).abs();
            px_max = px_max.max(d);
            px_sum += d as u64;
            px_n += 1;
        }
        for s in [64u32, 224] {
            let o = ImageTransform::eval(s)
                .decode_apply(bytes, u64::MAX, &mut rng)
                .expect("transform");
            let t = read_f32(&dir.path().join(format!("jeval_{i}_{s}.f32")));
            worst = worst.max(max_abs_diff(&o, &t));
        }
    }
    let mean = px_sum as f64 / px_n as f64;
    eprintln!(
        "JPEG decode (image crate vs PIL/libjpeg-turbo): max pixel difference {px_max}, mean \
         {mean:.4}; eval transform max abs difference after normalisation {worst:.4} \
         (= pixel difference / 255 / std)"
    );
    // IDCT rounding differences only: a few levels at most.
    assert!(
        px_max <= 8 && mean < 0.5,
        "decoders disagree more than rounding"
    );
    assert!(worst < 8.0 / 255.0 / 0.26 + 1e-4);
}

// ---------------------------------------------------------------------------------------------
// loader

fn corpus(samples: u64, shard_size: u64, side: u32) -> (tempfile::TempDir, Vec<PathBuf>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = SynthConfig {
        seed: 3,
        samples,
        shard_size,
        image_size: side,
        eval_samples: 0,
        ..SynthConfig::default()
    };
    let report = synth::write_corpus(
        &cfg,
        dir.path(),
        &WriteOptions {
            force: false,
            threads: Some(2),
            progress: false,
        },
    )
    .expect("synth corpus");
    (dir, report.train_shards)
}

fn spec(shards: &[PathBuf]) -> Vec<String> {
    shards.iter().map(|p| p.display().to_string()).collect()
}

fn small_config(shards: &[PathBuf], batch: usize) -> LoaderConfig {
    let mut c = LoaderConfig::new(spec(shards), batch, 24);
    c.seed = 42;
    c.shuffle_buffer = 50;
    c.readers = 2;
    c.threads = 2;
    c.epochs = Some(2);
    c.max_logged_skips = 3;
    c
}

/// Everything a batch holds, in comparable form.
#[derive(Debug, Clone, PartialEq)]
struct BatchData {
    epoch: u64,
    index: u64,
    keys: Vec<String>,
    images: Vec<f32>,
    image_shape: Vec<i64>,
    texts: Vec<i64>,
    negatives: Vec<i64>,
    has_negative: Vec<bool>,
    tag_offsets: Vec<i64>,
    tag_indices: Vec<i64>,
    refined: Vec<bool>,
    skipped: hq_train::data::SkipCounts,
}

fn data(b: &Batch) -> BatchData {
    let flat_f = |t: &tch::Tensor| Vec::<f32>::try_from(&t.flatten(0, -1)).expect("f32");
    let flat_i = |t: &tch::Tensor| Vec::<i64>::try_from(&t.flatten(0, -1)).expect("i64");
    BatchData {
        epoch: b.epoch,
        index: b.index,
        keys: b.keys.clone(),
        images: flat_f(&b.images),
        image_shape: b.images.size(),
        texts: flat_i(&b.texts),
        negatives: flat_i(&b.negatives),
        has_negative: Vec::<bool>::try_from(&b.has_negative).expect("bool"),
        tag_offsets: b.tag_offsets.clone(),
        tag_indices: b.tag_indices.clone(),
        refined: b.refined_text.clone(),
        skipped: b.skipped,
    }
}

fn run_all(cfg: &LoaderConfig, resume: Option<LoaderState>) -> (Vec<BatchData>, LoaderState) {
    let mut loader = DataLoader::new(cfg.clone(), None, resume).expect("loader");
    let mut out = Vec::new();
    for b in loader.by_ref() {
        out.push(data(&b.expect("batch")));
    }
    let st = loader.state().clone();
    (out, st)
}

fn samples_by_key(shards: &[PathBuf]) -> HashMap<String, Sample> {
    ShardReader::new(shards.to_vec(), ReadOptions::default())
        .filter_map(Result::ok)
        .map(|s| (s.key.clone(), s))
        .collect()
}

#[test]
fn batches_have_the_documented_layout_and_text_policy() {
    let (_dir, shards) = corpus(240, 40, 32);
    let vocab = Arc::new(build_tag_vocab(&shards, 25, 2).expect("vocab"));
    assert_eq!(vocab.len(), 25);
    let by_key = samples_by_key(&shards);
    let tok = ClipTokenizer::from_bundled().expect("tokenizer");
    let mut cfg = small_config(&shards, 16);
    cfg.epochs = Some(1);
    cfg.drop_last = false;
    cfg.text_policy.negatives = 2;
    let mut loader = DataLoader::new(cfg, Some(Arc::clone(&vocab)), None).expect("loader");
    let mut seen = BTreeSet::new();
    let (mut refined, mut total, mut from_tags) = (0usize, 0usize, 0usize);
    for b in loader.by_ref() {
        let b = b.expect("batch");
        let n = b.len();
        assert_eq!(b.images.size(), vec![n as i64, 3, 24, 24]);
        assert_eq!(b.images.kind(), tch::Kind::Float);
        assert_eq!(b.texts.size(), vec![n as i64, 77]);
        assert_eq!(b.negatives.size(), vec![2 * n as i64, 77]);
        assert_eq!(b.has_negative.size(), vec![n as i64]);
        assert_eq!(b.tag_offsets.len(), n + 1);
        assert_eq!(b.skipped.total(), 0);
        let d = data(&b);
        let mean = d.images.iter().map(|v| *v as f64).sum::<f64>() / d.images.len() as f64;
        assert!(
            mean.abs() < 2.5 && d.images.iter().all(|v| v.abs() < 3.0),
            "normalised"
        );
        for i in 0..n {
            let s = &by_key[&d.keys[i]];
            let r = s.refined.as_ref().expect("synth samples are refined");
            assert!(
                seen.insert(d.keys[i].clone()),
                "a sample twice in one epoch"
            );
            let row = &d.texts[i * 77..(i + 1) * 77];
            if d.refined[i] {
                refined += 1;
                let segs = segments(&r.long_positive);
                let hit = segs
                    .iter()
                    .any(|seg| tok.tokenize(seg).expect("tok") == row);
                assert!(hit, "refined text is a segment of d+");
            } else {
                assert_eq!(
                    row,
                    tok.tokenize(s.raw_text.trim()).expect("tok").as_slice()
                );
            }
            total += 1;
            assert!(d.has_negative[i]);
            for j in 0..2 {
                let neg = &d.negatives[(2 * i + j) * 77..(2 * i + j + 1) * 77];
                let tags = r
                    .tags_negative
                    .iter()
                    .map(|t| t.trim())
                    .filter(|t| !t.is_empty())
                    .collect::<Vec<_>>()
                    .join(", ");
                if neg == tok.tokenize(&tags).expect("tok").as_slice() {
                    from_tags += 1;
                } else {
                    let pos: Vec<String> = segments(&r.long_positive)
                        .iter()
                        .map(|s| s.to_lowercase())
                        .collect();
                    let ok = segments(&r.long_negative).iter().any(|seg| {
                        !pos.contains(&seg.to_lowercase()) && tok.tokenize(seg).expect("tok") == neg
                    });
                    assert!(ok, "negative is a changed segment of d- or the joined tags");
                }
            }
            let (a, e) = (d.tag_offsets[i] as usize, d.tag_offsets[i + 1] as usize);
            let want: Vec<i64> = vocab
                .indices(&r.tags_positive)
                .into_iter()
                .map(i64::from)
                .collect();
            assert_eq!(
                &d.tag_indices[a..e],
                want.as_slice(),
                "CSR row = vocabulary ids"
            );
        }
    }
    assert_eq!(seen.len(), 240, "one epoch yields every sample once");
    let r = refined as f64 / total as f64;
    let q = from_tags as f64 / (2 * total) as f64;
    eprintln!("refined fraction {r:.3} (r = 0.75), negatives from tags {q:.3} (0.5)");
    assert!((r - 0.75).abs() < 0.08);
    assert!((q - 0.5).abs() < 0.08);
    let st = loader.state();
    assert_eq!(st.samples_total, 240);
    assert_eq!(st.batches_total, 15);
}

#[test]
fn baseline_policy_uses_raw_text_and_no_negatives() {
    let (_dir, shards) = corpus(60, 30, 32);
    let by_key = samples_by_key(&shards);
    let tok = ClipTokenizer::from_bundled().expect("tokenizer");
    let mut cfg = small_config(&shards, 10);
    cfg.epochs = Some(1);
    cfg.text_policy = TextPolicy::baseline();
    cfg.transform = TransformKind::Eval;
    let (batches, _) = run_all(&cfg, None);
    assert_eq!(batches.len(), 6);
    for b in &batches {
        assert!(b.refined.iter().all(|r| !r));
        assert!(b.negatives.is_empty() && b.has_negative.iter().all(|h| !h));
        for (i, k) in b.keys.iter().enumerate() {
            let want = tok.tokenize(by_key[k].raw_text.trim()).expect("tok");
            assert_eq!(&b.texts[i * 77..(i + 1) * 77], want.as_slice());
        }
    }
    // Eval transform: no randomness, the same image every epoch.
    let mut cfg2 = cfg.clone();
    cfg2.seed = 7;
    let (again, _) = run_all(&cfg2, None);
    let img = |bs: &[BatchData], key: &str| -> Vec<f32> {
        for b in bs {
            if let Some(i) = b.keys.iter().position(|k| k == key) {
                let n = 3 * 24 * 24;
                return b.images[i * n..(i + 1) * n].to_vec();
            }
        }
        panic!("key {key} not found");
    };
    let key = &batches[0].keys[0];
    assert_eq!(img(&batches, key), img(&again, key));
}

/// Take `cut` batches, save the state as JSON, restore it into a new loader (`threads2`
/// decode threads) and read the rest: must equal the uninterrupted run.
fn check_resume(cfg: &LoaderConfig, full: &[BatchData], cut: usize, threads2: usize) {
    let mut first = Vec::new();
    let json = {
        let mut loader = DataLoader::new(cfg.clone(), None, None).expect("loader");
        for _ in 0..cut {
            match loader.next() {
                Some(b) => first.push(data(&b.expect("batch"))),
                None => break,
            }
        }
        loader.state().to_json()
    };
    let state = LoaderState::from_json(&json).expect("state");
    let mut cfg2 = cfg.clone();
    cfg2.threads = threads2;
    let (rest, _) = run_all(&cfg2, Some(state));
    first.extend(rest);
    assert_eq!(first.len(), full.len(), "cut {cut}: batch count");
    for (i, (a, b)) in first.iter().zip(full).enumerate() {
        assert!(
            a == b,
            "cut {cut}: batch {i} differs after resume (keys {:?} vs {:?})",
            a.keys,
            b.keys
        );
    }
}

#[test]
fn resumed_loader_yields_the_same_batches() {
    let (_dir, shards) = corpus(240, 40, 32);
    let cfg = small_config(&shards, 16);
    let (full, end) = run_all(&cfg, None);
    assert_eq!(full.len(), 30, "2 epochs of 15 batches");
    assert_eq!(end.samples_total, 480);
    // Shuffled: the first epoch is not in shard order, and the second differs from the first.
    let e0: Vec<&String> = full[..15].iter().flat_map(|b| &b.keys).collect();
    let e1: Vec<&String> = full[15..].iter().flat_map(|b| &b.keys).collect();
    assert_ne!(e0, e1);
    let mut sorted = e0.clone();
    sorted.sort();
    assert_ne!(e0, sorted);
    // Same seed, other thread count: same batches.
    let mut c1 = cfg.clone();
    c1.threads = 1;
    c1.prefetch_batches = 5;
    assert!(
        run_all(&c1, None).0 == full,
        "thread count changed the batches"
    );
    for cut in [0, 1, 7, 14, 15, 16, 29, 30] {
        check_resume(&cfg, &full, cut, 1 + cut % 2);
    }
    // A state saved by a differently configured loader is refused.
    let mut other = cfg.clone();
    other.batch_size = 8;
    let err = DataLoader::new(other, None, Some(end))
        .err()
        .expect("mismatch");
    assert!(err.to_string().contains("batch size"), "{err}");
}

/// Rewrite the corpus with damage: garbage and cut image bytes, a sample without text, a shard
/// cut in the middle, and a shard that is not a tar at all. Returns the shards and the keys of
/// the damaged samples.
fn damaged_corpus(dir: &Path, shards: &[PathBuf]) -> (Vec<PathBuf>, Vec<String>) {
    let mut samples: Vec<Sample> = ShardReader::new(shards.to_vec(), ReadOptions::default())
        .map(|r| r.expect("good sample"))
        .collect();
    let mut bad = Vec::new();
    samples[5].image.as_mut().expect("image").bytes = b"definitely not a jpeg".to_vec();
    bad.push(samples[5].key.clone());
    let cut = &mut samples[17].image.as_mut().expect("image").bytes;
    cut.truncate(40);
    bad.push(samples[17].key.clone());
    samples[33].raw_text = String::new();
    samples[33].refined = None;
    bad.push(samples[33].key.clone());
    let out = dir.join("damaged");
    std::fs::create_dir_all(&out).expect("mkdir");
    let mut w = ShardWriter::new(
        out.join("shard"),
        ShardWriterOptions {
            max_samples: Some(30),
            ..Default::default()
        },
    )
    .expect("writer");
    for s in &samples {
        w.write(s).expect("write");
    }
    let mut written = w.finish().expect("finish");
    // Cut the third shard in the middle.
    let third = &written[2];
    let len = std::fs::metadata(third).expect("meta").len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(third)
        .expect("open");
    f.set_len(len / 2 + 77).expect("truncate");
    // A shard that is not a tar.
    let junk = out.join("shard-junk.tar");
    std::fs::write(&junk, vec![0x5au8; 3000]).expect("junk");
    written.insert(1, junk);
    (written, bad)
}

#[test]
fn bad_samples_are_skipped_counted_and_resume_exactly() {
    let (dir, shards) = corpus(150, 30, 32);
    let (damaged, bad_keys) = damaged_corpus(dir.path(), &shards);
    // What a plain reader makes of the damaged shards.
    let items: Vec<_> = ShardReader::new(
        damaged.clone(),
        ReadOptions {
            image_check: hq_data::shards::ImageCheck::None,
            ..ReadOptions::default()
        },
    )
    .collect();
    let records_bad = items.iter().filter(|r| r.is_err()).count() as u64;
    let good_keys: BTreeSet<String> = items
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .map(|s| s.key.clone())
        .filter(|k| !bad_keys.contains(k))
        .collect();
    assert!(
        records_bad >= 2,
        "the cut and the junk shard are bad records"
    );

    let mut cfg = small_config(&damaged, 8);
    cfg.drop_last = false;
    cfg.readers = 3;
    cfg.chunk_size = 5;
    cfg.shuffle_buffer = 200;
    let (full, end) = run_all(&cfg, None);
    let e0: BTreeSet<String> = full
        .iter()
        .filter(|b| b.epoch == 0)
        .flat_map(|b| b.keys.clone())
        .collect();
    assert_eq!(e0, good_keys, "every good sample once, no bad one");
    let skipped = end.skipped_total;
    eprintln!("damaged corpus over 2 epochs: {skipped}");
    assert_eq!(skipped.image, 4, "2 bad images x 2 epochs");
    assert_eq!(skipped.text, 2, "1 sample without text x 2 epochs");
    assert_eq!(skipped.record, 2 * records_bad, "reader records x 2 epochs");
    let per_batch: u64 = full.iter().map(|b| b.skipped.total()).sum();
    assert_eq!(per_batch, skipped.total(), "per-batch counts add up");
    for cut in [0, 3, 9, 18, 19, 20, 33] {
        check_resume(&cfg, &full, cut, 2 - cut % 2);
    }
}

#[test]
fn workers_split_the_shards() {
    let (_dir, shards) = corpus(200, 20, 32);
    let mut per_worker = Vec::new();
    for rank in 0..3 {
        let mut cfg = small_config(&shards, 5);
        cfg.rank = rank;
        cfg.world_size = 3;
        cfg.epochs = Some(1);
        cfg.drop_last = false;
        let loader = DataLoader::new(cfg.clone(), None, None).expect("loader");
        let want: Vec<PathBuf> = shards.iter().skip(rank).step_by(3).cloned().collect();
        assert_eq!(loader.worker_shards(), want.as_slice());
        drop(loader);
        let (b, _) = run_all(&cfg, None);
        per_worker.push(
            b.iter()
                .flat_map(|b| b.keys.clone())
                .collect::<BTreeSet<_>>(),
        );
    }
    let sizes: Vec<usize> = per_worker.iter().map(BTreeSet::len).collect();
    assert_eq!(sizes, vec![80, 60, 60]);
    let union: BTreeSet<_> = per_worker.iter().flatten().cloned().collect();
    assert_eq!(union.len(), 200, "disjoint and complete");
    let mut cfg = small_config(&shards, 5);
    cfg.rank = 0;
    cfg.world_size = 11;
    let err = DataLoader::new(cfg.clone(), None, None).err();
    assert!(err.is_none(), "10 shards, rank 0 of 11 still has one");
    cfg.rank = 10;
    let err = DataLoader::new(cfg, None, None).err().expect("no shard");
    assert!(err.to_string().contains("no shard"), "{err}");
}

#[test]
fn loader_state_round_trips_through_a_file() {
    let (dir, shards) = corpus(60, 20, 32);
    let cfg = small_config(&shards, 8);
    let mut loader = DataLoader::new(cfg, None, None).expect("loader");
    for _ in 0..3 {
        loader.next().expect("batch").expect("ok");
    }
    let path = dir.path().join("loader_state.json");
    loader.state().save(&path).expect("save");
    let back = LoaderState::load(&path).expect("load");
    assert_eq!(&back, loader.state());
    assert_eq!(back.batches_total, 3);
    let mut v: Value = serde_json::from_str(&back.to_json()).expect("json");
    v["version"] = json!(99);
    assert!(LoaderState::from_json(&v.to_string()).is_err());
}
