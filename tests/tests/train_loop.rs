//! The training loop (`hq_train::run`) on tiny generated corpora, a small CLIP (hq-tiny's widths,
//! 2 layers, 32 px images, 32-token context) on the CPU:
//! - a short run lowers the loss and writes checkpoints, metrics, plots and a summary; the
//!   metrics' TensorBoard mirror, read by TensorBoard's own loader (tests/python/
//!   tensorboard_read.py, which checks every record's CRCs), holds the same numbers, also after
//!   a resume;
//! - `--resume` is bit-exact: K steps straight equal K/2 + resume + K/2, loss for loss and weight
//!   for weight (with gradient accumulation and every loss part on);
//! - a corrupt checkpoint is refused with an error naming the file; so is a resume with other
//!   settings, or a run into a directory that already holds one;
//! - bad samples (undecodable images, no text, junk shards) are skipped, counted by reason and
//!   logged, and training goes on;
//! - contradictory settings are refused before anything starts;
//! - our AdamW equals `torch.optim.AdamW` (tests/python/train_adamw_reference.py) over several
//!   steps with a changing learning rate and both parameter groups.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use hq_data::shards::{ReadOptions, ShardReader, ShardWriter, ShardWriterOptions};
use hq_data::synth::{self, SynthConfig, WriteOptions};
use hq_data::Sample;
use hq_train::config::TrainConfig;
use hq_train::model::ClipConfig;
use hq_train::optim::{AdamW, AdamWConfig};
use hq_train::{RunRequest, TchEncoder, Variant};
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

/// Runs serialised: model init draws from libtorch's global generator.
static TRAINING: Mutex<()> = Mutex::new(());

fn lock() -> std::sync::MutexGuard<'static, ()> {
    TRAINING.lock().unwrap_or_else(|e| e.into_inner())
}

fn python() -> Option<PathBuf> {
    hq_tests::python_if_present("the comparison with the Python reference")
}

/// The scalars of the TensorBoard event files in `logdir` as TensorBoard's own loader reads them
/// (tests/python/tensorboard_read.py): `{"files": N, "scalars": {tag: [[step, value, wall], ..]}}`.
fn tensorboard_scalars(py: &Path, logdir: &Path) -> Value {
    let out = hq_tests::run_python_script(py, "tensorboard_read.py", [logdir]);
    serde_json::from_str(&out).expect("tensorboard_read.py prints JSON")
}

/// Every number of every metrics record is in the TensorBoard mirror at its step, as an f32, in
/// one event file, and nothing else is.
fn assert_tensorboard_mirrors(py: &Path, run: &Path) {
    let tb = tensorboard_scalars(py, &run.join("tb"));
    assert_eq!(tb["files"], 1, "one event file: {tb}");
    let records = hq_train::metrics::read_records(&run.join("metrics.jsonl")).expect("metrics");
    let mut want: std::collections::BTreeMap<String, Vec<(u64, f32)>> = Default::default();
    for r in &records {
        let step = r["step"].as_u64().expect("step");
        assert!(r["time"].as_f64().is_some(), "record without time: {r}");
        for (tag, v) in hq_train::tensorboard::record_scalars(r) {
            want.entry(tag).or_default().push((step, v as f32));
        }
    }
    let got: std::collections::BTreeMap<String, Vec<(u64, f32)>> = tb["scalars"]
        .as_object()
        .expect("scalars")
        .iter()
        .map(|(tag, events)| {
            let events = events
                .as_array()
                .expect("events")
                .iter()
                .map(|e| {
                    (
                        e[0].as_u64().expect("step"),
                        e[1].as_f64().expect("value") as f32,
                    )
                })
                .collect();
            (tag.clone(), events)
        })
        .collect();
    assert!(want.contains_key("train/loss"), "{:?}", want.keys());
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (tag, w) in &want {
        let g = &got[tag];
        let steps = |v: &[(u64, f32)]| v.iter().map(|e| e.0).collect::<Vec<_>>();
        assert_eq!(steps(g), steps(w), "{tag}: steps");
        // The same f32, up to one ulp: serde_json's default float parsing (reading the log
        // back here) may be one f64 ulp off what was written, which can flip an f32 rounding.
        for ((s, a), (_, b)) in g.iter().zip(w) {
            assert!(
                (a - b).abs() <= f32::EPSILON * b.abs(),
                "{tag} at step {s}: TensorBoard {a} vs metrics.jsonl {b}"
            );
        }
    }
}

/// A corpus of `samples` training samples (32 px) and small held-out sets.
fn corpus(dir: &Path, samples: u64, eval_samples: u64) -> PathBuf {
    let cfg = SynthConfig {
        seed: 5,
        samples,
        shard_size: 64,
        image_size: 32,
        eval_samples,
        eval_shard_size: 64,
        ..SynthConfig::default()
    };
    synth::write_corpus(
        &cfg,
        dir,
        &WriteOptions {
            force: false,
            threads: Some(2),
            progress: false,
        },
    )
    .expect("synth corpus");
    dir.to_path_buf()
}

fn model_json(dir: &Path) -> PathBuf {
    let mut m = ClipConfig::hq_tiny();
    m.vision_cfg.image_size = hq_train::model::Size2::Square(32);
    m.vision_cfg.layers = 2.into();
    m.text_cfg.layers = 2;
    m.text_cfg.context_length = 32;
    let path = dir.join("tiny-test.json");
    m.write_json_file(&path).expect("model json");
    path
}

fn config(corpus: &Path, out: &Path, model: &Path, steps: u64) -> TrainConfig {
    let mut c = TrainConfig::default();
    c.model.config = Some(model.to_path_buf());
    c.data.train = vec![corpus.join("train").display().to_string()];
    c.data.shuffle_buffer = 64;
    c.data.threads = 2;
    c.data.tag_vocab_size = 200;
    c.optim.lr = 1e-3;
    c.optim.warmup_steps = 2;
    c.run.steps = steps;
    c.run.batch_size = 16;
    c.run.device = "cpu".into();
    c.run.out_dir = Some(out.to_path_buf());
    c.run.log_every = 1;
    c.run.checkpoint_every = 0;
    c
}

fn run(
    config: &TrainConfig,
    resume: Option<&Path>,
    stop_after: Option<u64>,
) -> hq_train::RunSummary {
    hq_train::run(&RunRequest {
        config: config.clone(),
        resume: resume.map(Path::to_path_buf),
        stop_after,
        verbose: false,
    })
    .expect("training run")
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

#[test]
fn a_short_run_lowers_the_loss_and_writes_its_outputs() {
    let _g = lock();
    let dir = tempfile::tempdir().expect("tempdir");
    let corpus = corpus(&dir.path().join("corpus"), 256, 32);
    let model = model_json(dir.path());
    let out = dir.path().join("run");
    let mut cfg = config(&corpus, &out, &model, 40);
    cfg.run.checkpoint_every = 20;
    cfg.run.eval_dir = Some(corpus.join("eval"));
    let started = std::time::Instant::now();
    let summary = run(&cfg, None, None);
    eprintln!("40 steps in {:.1} s", started.elapsed().as_secs_f64());
    let losses: Vec<f64> = summary.steps.iter().map(|s| s.loss).collect();
    let clip: Vec<f64> = summary.steps.iter().map(|s| s.loss_clip).collect();
    let (first, last) = (mean(&losses[..5]), mean(&losses[35..]));
    eprintln!(
        "total loss {first:.4} -> {last:.4}; contrastive {:.4} -> {:.4}",
        mean(&clip[..5]),
        mean(&clip[35..])
    );
    assert!(last < first * 0.9, "the loss did not go down: {losses:?}");
    assert!(
        mean(&clip[35..]) < mean(&clip[..5]),
        "the contrastive loss did not go down: {clip:?}"
    );
    assert!(summary
        .steps
        .iter()
        .all(|s| s.loss_hni >= 0.0 && s.loss_stc > 0.0));
    // Outputs: two checkpoints, metrics with every step, curves, an evaluation, the summary.
    for f in [
        "config.toml",
        "metrics.jsonl",
        "summary.json",
        "plots/loss.png",
        "plots/lr.png",
        "eval/step-00000040.json",
        "checkpoints/step-00000020/manifest.json",
        "checkpoints/step-00000040/model.safetensors",
        "checkpoints/step-00000040/stc_head.safetensors",
        "checkpoints/latest",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let records = hq_train::metrics::read_records(&out.join("metrics.jsonl")).expect("metrics");
    let train_steps = records.iter().filter(|r| r["kind"] == "train").count();
    assert_eq!(train_steps, 40);
    // The TensorBoard mirror, read by TensorBoard itself, holds the same numbers.
    if let Some(py) = python() {
        assert_tensorboard_mirrors(&py, &out);
    }
    let eval = summary.eval.expect("final evaluation");
    assert!(eval.iter().any(|(k, _)| k == "builtin/mean"), "{eval:?}");
    // The checkpoint's CLIP weights are open_clip's names only; the encoder loads them.
    let ck = out.join("checkpoints/step-00000040");
    let names: Vec<String> = Tensor::read_safetensors(ck.join("model.safetensors"))
        .expect("weights")
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert!(
        names.iter().all(|n| !n.starts_with("stc_head")),
        "STC head inside the CLIP weights"
    );
    let enc = TchEncoder::from_checkpoint(&ck, None, Device::Cpu).expect("encoder from checkpoint");
    assert_eq!(hq_eval::Encoder::embed_dim(&enc), 128);
}

#[test]
fn resume_continues_bit_for_bit() {
    let _g = lock();
    let dir = tempfile::tempdir().expect("tempdir");
    let corpus = corpus(&dir.path().join("corpus"), 160, 0);
    let model = model_json(dir.path());
    let steps = 6;
    let mut straight_cfg = config(&corpus, &dir.path().join("straight"), &model, steps);
    straight_cfg.run.accum_steps = 2;
    straight_cfg.run.batch_size = 8;
    let straight = run(&straight_cfg, None, None);

    let mut cut_cfg = straight_cfg.clone();
    cut_cfg.run.out_dir = Some(dir.path().join("cut"));
    let first = run(&cut_cfg, None, Some(steps / 2));
    assert_eq!(first.last_step, steps / 2);
    // Output and logging settings may change on resume.
    let mut resume_cfg = cut_cfg.clone();
    resume_cfg.run.log_every = 2;
    let second = run(&resume_cfg, Some(&dir.path().join("cut")), None);
    assert_eq!(second.first_step, steps / 2);

    let resumed: Vec<_> = first.steps.iter().chain(second.steps.iter()).collect();
    assert_eq!(resumed.len(), straight.steps.len());
    for (a, b) in straight.steps.iter().zip(resumed) {
        assert_eq!(a, b, "step {} differs after resuming", a.step);
    }
    // The final weights, STC head and optimizer moments are identical too.
    for file in [
        "model.safetensors",
        "stc_head.safetensors",
        "optimizer.safetensors",
    ] {
        let read = |run: &str| {
            let mut v = Tensor::read_safetensors(
                dir.path()
                    .join(format!("{run}/checkpoints/step-00000006/{file}")),
            )
            .expect("read");
            v.sort_by(|x, y| x.0.cmp(&y.0));
            v
        };
        let (a, b) = (read("straight"), read("cut"));
        assert_eq!(a.len(), b.len());
        for ((na, ta), (nb, tb)) in a.iter().zip(b.iter()) {
            assert_eq!(na, nb);
            assert!(ta.equal(tb), "{file}: {na} differs");
        }
    }
    // The metrics log of the resumed run has each step once.
    let records =
        hq_train::metrics::read_records(&dir.path().join("cut/metrics.jsonl")).expect("m");
    let steps_logged: Vec<u64> = records
        .iter()
        .filter(|r| r["kind"] == "train")
        .map(|r| r["step"].as_u64().expect("step"))
        .collect();
    assert_eq!(steps_logged, vec![1, 2, 3, 4, 6]);
    // So does its TensorBoard mirror: rewritten from the cut log on resume, one file, no step
    // of the interrupted session twice.
    if let Some(py) = python() {
        assert_tensorboard_mirrors(&py, &dir.path().join("cut"));
    }

    // A resume with a setting that changes the run is refused, naming it.
    let mut other = cut_cfg.clone();
    other.optim.lr = 5e-4;
    let e = hq_train::run(&RunRequest {
        config: other,
        resume: Some(dir.path().join("cut/checkpoints/step-00000003")),
        stop_after: None,
        verbose: false,
    })
    .expect_err("changed lr")
    .to_string();
    assert!(e.contains("optim.lr"), "{e}");
    // Starting a new run in a directory that holds one is refused.
    let e = hq_train::run(&RunRequest {
        config: cut_cfg.clone(),
        resume: None,
        stop_after: None,
        verbose: false,
    })
    .expect_err("occupied")
    .to_string();
    assert!(e.contains("already holds a run"), "{e}");
}

#[test]
fn a_corrupt_checkpoint_is_refused() {
    let _g = lock();
    let dir = tempfile::tempdir().expect("tempdir");
    let corpus = corpus(&dir.path().join("corpus"), 64, 0);
    let model = model_json(dir.path());
    let out = dir.path().join("run");
    let mut cfg = config(&corpus, &out, &model, 4);
    cfg.loss.variant = Some(Variant::Mixed);
    run(&cfg, None, Some(2));
    let ck = out.join("checkpoints/step-00000002");
    // Flip one byte in the middle of the weights.
    let weights = ck.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).expect("read");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&weights, &bytes).expect("write");
    let e = hq_train::run(&RunRequest {
        config: cfg.clone(),
        resume: Some(out.clone()),
        stop_after: None,
        verbose: false,
    })
    .expect_err("corrupt")
    .to_string();
    assert!(e.contains("model.safetensors is corrupt"), "{e}");
    let e = TchEncoder::from_checkpoint(&ck, None, Device::Cpu)
        .expect_err("encoder")
        .to_string();
    assert!(e.contains("corrupt"), "{e}");
    // A checkpoint cut short (no manifest) is refused too.
    bytes[mid] ^= 0x01;
    std::fs::write(&weights, &bytes).expect("restore");
    std::fs::remove_file(ck.join("manifest.json")).expect("rm");
    let e = hq_train::run(&RunRequest {
        config: cfg,
        resume: Some(ck.clone()),
        stop_after: None,
        verbose: false,
    })
    .expect_err("no manifest")
    .to_string();
    assert!(e.contains("manifest"), "{e}");
}

/// Rewrites the corpus with two undecodable images, one sample without any text, and a shard that
/// is not a tar.
fn damage(corpus: &Path) -> PathBuf {
    let shards: Vec<PathBuf> = {
        let mut v: Vec<PathBuf> = std::fs::read_dir(corpus.join("train"))
            .expect("ls")
            .map(|e| e.expect("entry").path())
            .collect();
        v.sort();
        v
    };
    let mut samples: Vec<Sample> = ShardReader::new(shards, ReadOptions::default())
        .map(|r| r.expect("good sample"))
        .collect();
    samples[3].image.as_mut().expect("image").bytes = b"not an image".to_vec();
    samples[40]
        .image
        .as_mut()
        .expect("image")
        .bytes
        .truncate(30);
    samples[77].raw_text = String::new();
    samples[77].refined = None;
    let out = corpus.join("damaged");
    std::fs::create_dir_all(&out).expect("mkdir");
    let mut w = ShardWriter::new(
        out.join("shard"),
        ShardWriterOptions {
            max_samples: Some(50),
            ..Default::default()
        },
    )
    .expect("writer");
    for s in &samples {
        w.write(s).expect("write");
    }
    w.finish().expect("finish");
    std::fs::write(out.join("shard-junk.tar"), vec![0x5au8; 3000]).expect("junk");
    out
}

#[test]
fn bad_samples_are_skipped_counted_and_logged() {
    let _g = lock();
    let dir = tempfile::tempdir().expect("tempdir");
    let corpus = corpus(&dir.path().join("corpus"), 100, 0);
    let damaged = damage(&corpus);
    let model = model_json(dir.path());
    let out = dir.path().join("run");
    let mut cfg = config(&corpus, &out, &model, 8);
    cfg.data.train = vec![damaged.display().to_string()];
    // 8 steps x 16 samples cover the 97 good samples once.
    let summary = run(&cfg, None, None);
    assert_eq!(summary.last_step, 8);
    let s = summary.skipped;
    eprintln!("{s}");
    assert!(s.image >= 2, "{s}");
    assert!(s.text >= 1, "{s}");
    assert!(s.record >= 1, "the junk shard: {s}");
    let records = hq_train::metrics::read_records(&out.join("metrics.jsonl")).expect("metrics");
    let logged: u64 = records
        .iter()
        .filter(|r| r["kind"] == "skips")
        .map(|r| {
            let k = &r["skipped"];
            k["record"].as_u64().unwrap_or(0)
                + k["image"].as_u64().unwrap_or(0)
                + k["text"].as_u64().unwrap_or(0)
        })
        .sum();
    assert_eq!(logged, s.total(), "every skip is in the metrics log");
    let text = std::fs::read_to_string(out.join("summary.json")).expect("summary");
    let v: Value = serde_json::from_str(&text).expect("json");
    assert_eq!(v["skipped"]["image"].as_u64(), Some(s.image));
}

#[test]
fn contradictory_or_missing_settings_are_refused_before_training() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = model_json(dir.path());
    let base = config(dir.path(), &dir.path().join("run"), &model, 10);
    let cases: Vec<(TrainConfig, &str)> = vec![
        (
            {
                let mut c = base.clone();
                c.data.train.clear();
                c
            },
            "--train",
        ),
        (
            {
                let mut c = base.clone();
                c.loss.variant = Some(Variant::Baseline);
                c.loss.stc = Some(true);
                c
            },
            "contradicts variant",
        ),
        (
            {
                let mut c = base.clone();
                c.optim.warmup_steps = 10;
                c
            },
            "warm-up",
        ),
        (
            {
                let mut c = base.clone();
                c.run.precision = hq_train::config::Precision::Bf16;
                c
            },
            "bf16",
        ),
        (
            {
                let mut c = base.clone();
                c.run.eval_every = 5;
                c
            },
            "eval_dir",
        ),
        (
            {
                let mut c = base.clone();
                c.run.out_dir = None;
                c
            },
            "--out",
        ),
    ];
    for (cfg, needle) in cases {
        let e = hq_train::run(&RunRequest {
            config: cfg,
            resume: None,
            stop_after: None,
            verbose: false,
        })
        .expect_err(needle)
        .to_string();
        assert!(e.contains(needle), "{needle:?} not in {e:?}");
    }
    assert!(
        !dir.path().join("run").exists(),
        "a refused run wrote nothing"
    );
}

#[test]
fn adamw_matches_torch() {
    let Some(py) = python() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = AdamWConfig::default();
    let shapes: [(&str, Vec<i64>, bool); 4] = [
        ("visual.proj", vec![6, 5], true),
        ("ln_final.weight", vec![7], false),
        ("text_projection", vec![3, 4], true),
        ("logit_scale", vec![], false),
    ];
    let mut rng = 0x2545f4914f6cdd1du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        ((rng >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    let steps = 5;
    let lrs: Vec<f64> = (0..steps).map(|i| 1e-2 * (1.0 - 0.15 * i as f64)).collect();
    let values: Vec<Vec<f32>> = shapes
        .iter()
        .map(|(_, s, _)| {
            (0..s.iter().product::<i64>().max(1))
                .map(|_| next())
                .collect()
        })
        .collect();
    let grads: Vec<Vec<Vec<f32>>> = (0..steps)
        .map(|_| {
            values
                .iter()
                .map(|v| v.iter().map(|_| next() * 0.5).collect())
                .collect()
        })
        .collect();
    let params: Vec<(String, Tensor)> = shapes
        .iter()
        .zip(&values)
        .map(|((n, s, _), v)| {
            (
                n.to_string(),
                Tensor::from_slice(v)
                    .reshape(s.as_slice())
                    .set_requires_grad(true),
            )
        })
        .collect();
    let decay_of = |n: &str| shapes.iter().any(|(m, _, d)| *m == n && *d);
    let shared: Vec<(String, Tensor)> = params
        .iter()
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    let mut opt = AdamW::new(cfg, shared, |n, _| decay_of(n)).expect("adamw");
    for (lr, g) in lrs.iter().zip(&grads) {
        opt.zero_grad();
        // d/dp sum(p * g) = g exactly.
        let mut loss = Tensor::zeros([], (Kind::Float, Device::Cpu));
        for ((_, p), g) in params.iter().zip(g) {
            loss += (p * Tensor::from_slice(g).reshape(p.size().as_slice())).sum(Kind::Float);
        }
        loss.backward();
        opt.step(*lr).expect("step");
    }
    let spec = json!({
        "beta1": cfg.beta1, "beta2": cfg.beta2, "eps": cfg.eps, "weight_decay": cfg.weight_decay,
        "lrs": lrs,
        "params": shapes.iter().zip(&values).map(|((n, s, d), v)| json!({"name": n, "shape": s, "decay": d, "value": v})).collect::<Vec<_>>(),
        "grads": grads,
    });
    let inp = dir.path().join("in.json");
    let outp = dir.path().join("out.json");
    std::fs::write(&inp, spec.to_string()).expect("write");
    hq_tests::run_python_script(&py, "train_adamw_reference.py", [&inp, &outp]);
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(&outp).expect("out")).expect("json");
    let moments: std::collections::HashMap<String, Tensor> =
        opt.state_tensors().into_iter().collect();
    let mut worst = 0f64;
    for (name, p) in &params {
        for (what, ours) in [
            ("params", p.shallow_clone()),
            (
                "exp_avg",
                moments[&format!("exp_avg.{name}")].shallow_clone(),
            ),
            (
                "exp_avg_sq",
                moments[&format!("exp_avg_sq.{name}")].shallow_clone(),
            ),
        ] {
            let ours = Vec::<f32>::try_from(ours.detach().flatten(0, -1)).expect("vec");
            let theirs: Vec<f64> = reference[what][name]
                .as_array()
                .expect("array")
                .iter()
                .map(|v| v.as_f64().expect("f64"))
                .collect();
            assert_eq!(ours.len(), theirs.len(), "{what} {name}");
            for (a, b) in ours.iter().zip(&theirs) {
                let d = (*a as f64 - b).abs() / b.abs().max(1e-3);
                worst = worst.max(d);
                assert!(d < 1e-5, "{what} {name}: ours {a}, torch {b}");
            }
        }
    }
    eprintln!(
        "AdamW vs torch.optim.AdamW after {steps} steps: worst relative difference {worst:.2e}"
    );
}

/// A weighted mixture whose first source takes its refined texts from side-car files (the layout
/// `hq-recap-trt --format sidecar` writes): the run trains, logs each source's share and the join
/// counts, and a resume continues bit for bit (the sampling state is in the checkpoint).
#[test]
fn a_mixture_with_side_car_annotations_resumes_bit_for_bit() {
    let _g = lock();
    let dir = tempfile::tempdir().expect("tempdir");
    let corpus = corpus(&dir.path().join("corpus"), 128, 0);
    let train = corpus.join("train");
    let ann = dir.path().join("ann");
    std::fs::create_dir_all(&ann).expect("ann dir");
    let shards =
        hq_data::shards::expand_shard_spec(&format!("{}/*.tar", train.display())).expect("shards");
    for shard in &shards {
        let lines: Vec<String> = ShardReader::new(vec![shard.clone()], ReadOptions::default())
            .map(|s| s.expect("sample"))
            .map(|s| json!({"uid": s.meta["uid"], "key": s.key, "hq_clip": s.refined}).to_string())
            .collect();
        let stem = hq_data::shards::annotations::shard_stem(shard);
        std::fs::write(ann.join(format!("{stem}.jsonl")), lines.join("\n")).expect("write");
    }
    let model = model_json(dir.path());
    let steps = 4;
    let mut cfg = config(&corpus, &dir.path().join("straight"), &model, steps);
    cfg.data.train.clear();
    let src = |weight: f64, annotations| hq_train::data::SourceConfig {
        shards: vec![train.display().to_string()],
        weight,
        annotations,
    };
    cfg.data.sources = vec![
        src(
            2.0,
            Some(hq_data::shards::AnnotationSpec::new(
                ann.display().to_string(),
            )),
        ),
        src(1.0, None),
    ];
    cfg.run.batch_size = 8;
    let straight = run(&cfg, None, None);
    let mut cut_cfg = cfg.clone();
    cut_cfg.run.out_dir = Some(dir.path().join("cut"));
    let first = run(&cut_cfg, None, Some(steps / 2));
    let second = run(&cut_cfg, Some(&dir.path().join("cut")), None);
    let resumed: Vec<_> = first.steps.iter().chain(second.steps.iter()).collect();
    assert_eq!(resumed.len(), straight.steps.len());
    for (a, b) in straight.steps.iter().zip(resumed) {
        assert_eq!(a, b, "step {} differs after resuming", a.step);
    }
    let records =
        hq_train::metrics::read_records(&dir.path().join("straight/metrics.jsonl")).expect("m");
    let last = records
        .iter()
        .rfind(|r| r["kind"] == "train")
        .expect("a train record");
    let per_source: Vec<u64> = ["0", "1"]
        .iter()
        .map(|i| {
            last["source_samples"][i]
                .as_u64()
                .expect("count per source")
        })
        .collect();
    assert_eq!(per_source.iter().sum::<u64>(), 8 * steps);
    let joined = last["annotations"]["joined"].as_u64().expect("joined");
    let missing = last["annotations"]["missing"].as_u64().expect("missing");
    assert_eq!((joined, missing), (per_source[0], 0), "{last}");
}

/// The metrics log without its wall-clock and rate fields (they differ between any two runs).
fn metrics_without_times(run: &Path) -> Vec<Value> {
    hq_train::metrics::read_records(&run.join("metrics.jsonl"))
        .expect("metrics")
        .into_iter()
        .map(|mut r| {
            if let Some(m) = r.as_object_mut() {
                m.remove("time");
                m.remove("samples_per_s");
            }
            r
        })
        .collect()
}

/// Fault campaign finding (tools/faults, hq-train kill trials): a run killed after its last
/// checkpoint but before its end (final evaluation, plots, summary) could never be completed:
/// `--resume` said "nothing to do", so summary.json, the plots and the final evaluation stayed
/// missing (and tools/ablation.sh, which waits for summary.json, failed on every rerun). An
/// evaluation due at an earlier checkpoint's step was lost the same way. A resume now does what
/// was left, and the run's outputs equal an uninterrupted run's.
#[test]
fn a_run_killed_after_a_checkpoint_is_completed_by_resume() {
    let _g = lock();
    let dir = tempfile::tempdir().expect("tempdir");
    let corpus = corpus(&dir.path().join("corpus"), 64, 8);
    let model = model_json(dir.path());
    let out = dir.path().join("run");
    let mut cfg = config(&corpus, &out, &model, 4);
    cfg.run.eval_dir = Some(corpus.join("eval"));
    cfg.run.eval_every = 2;
    cfg.run.checkpoint_every = 2;
    cfg.run.keep_checkpoints = 0;
    let straight = run(&cfg, None, None);
    let want = metrics_without_times(&out);
    let eval_steps = |recs: &[Value]| -> Vec<u64> {
        recs.iter()
            .filter(|r| r["kind"] == "eval")
            .filter_map(|r| r["step"].as_u64())
            .collect()
    };
    assert_eq!(eval_steps(&want), vec![2, 4]);
    // What a kill leaves right after the checkpoint at `at`: the log up to its train record,
    // `latest` naming it, nothing of what follows.
    let kill_after_checkpoint = |at: u64| {
        let kept: String = hq_train::metrics::read_records(&out.join("metrics.jsonl"))
            .expect("metrics")
            .into_iter()
            .filter(|r| {
                let step = r["step"].as_u64().unwrap_or(0);
                step < at || (step == at && r["kind"] != "eval")
            })
            .map(|r| format!("{r}\n"))
            .collect();
        std::fs::write(out.join("metrics.jsonl"), kept).expect("metrics");
        for s in at..=4 {
            let _ = std::fs::remove_file(out.join(format!("eval/step-{s:08}.json")));
        }
        for s in at + 1..=4 {
            let _ = std::fs::remove_dir_all(out.join(format!("checkpoints/step-{s:08}")));
        }
        std::fs::write(out.join("checkpoints/latest"), format!("step-{at:08}\n")).expect("latest");
        let _ = std::fs::remove_file(out.join("summary.json"));
        let _ = std::fs::remove_dir_all(out.join("plots"));
    };
    for at in [4, 2] {
        kill_after_checkpoint(at);
        let resumed = run(&cfg, Some(&out), None);
        assert_eq!(resumed.last_step, 4, "killed after step {at}");
        assert_eq!(resumed.eval, straight.eval, "killed after step {at}");
        assert_eq!(metrics_without_times(&out), want, "killed after step {at}");
        for p in [
            "summary.json",
            "plots/loss.png",
            "eval/step-00000002.json",
            "eval/step-00000004.json",
        ] {
            assert!(out.join(p).is_file(), "killed after step {at}: {p} missing");
        }
    }
    // A finished run is still refused, as before.
    let e = hq_train::run(&RunRequest {
        config: cfg.clone(),
        resume: Some(out.clone()),
        stop_after: None,
        verbose: false,
    })
    .expect_err("nothing to do");
    assert!(e.to_string().contains("nothing to do"), "{e}");
}
