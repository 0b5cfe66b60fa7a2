//! The built-in held-out sets as an evaluation suite, and the task runner, on a tiny generated
//! corpus with a small deterministic linear encoder (no libtorch model, so it runs in seconds):
//!
//! - `evaluate_builtin` reports every set with its counts and the documented summary names; a
//!   missing set is an error naming it;
//! - `run_tasks` over a data root holding some registry folders: present tasks are done (a cut
//!   shard's samples are counted as bad and the task still finishes), an unusable folder is a
//!   failed task with the reason while the others run, absent tasks are missing with where to get
//!   them, aggregates are partial; a rerun keeps finished tasks without encoding again; the
//!   Markdown, terminal, comparison and PNG reports are written.
//!
//! Runtime: a few seconds.

use std::path::{Path, PathBuf};

use hq_data::transform::ImageTransform;
use hq_eval::report::{compare_markdown, group_chart, markdown, terminal_table};
use hq_eval::results::{CodeInfo, ModelInfo, RunResults, TaskStatus};
use hq_eval::run::{run_tasks, RunConfig};
use hq_eval::tasks::select_tasks;
use hq_eval::{evaluate_builtin, BuiltinReport, EncodeError, Encoder, RunOptions};
use rand::{Rng, SeedableRng};

const DIM: usize = 24;
const SIZE: u32 = 16;

/// Linear image and bag-of-tokens text embeddings; counts its image calls.
struct Linear {
    w: Vec<f32>,
    e: Vec<f32>,
    image_calls: usize,
}

impl Linear {
    fn new(seed: u64) -> Self {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let len = 3 * (SIZE * SIZE) as usize;
        Linear {
            w: (0..DIM * len).map(|_| rng.gen::<f32>() - 0.5).collect(),
            e: (0..49_408 * DIM).map(|_| rng.gen::<f32>() - 0.5).collect(),
            image_calls: 0,
        }
    }
}

impl Encoder for Linear {
    fn describe(&self) -> String {
        "linear".into()
    }
    fn image_transform(&self) -> ImageTransform {
        ImageTransform::eval(SIZE)
    }
    fn context_length(&self) -> usize {
        77
    }
    fn embed_dim(&self) -> usize {
        DIM
    }
    fn encode_images(&mut self, pixels: &[f32], n: usize) -> Result<Vec<f32>, EncodeError> {
        self.image_calls += 1;
        let len = pixels.len() / n.max(1);
        let w = &self.w;
        Ok(pixels
            .chunks(len)
            .flat_map(|img| {
                (0..DIM).map(move |d| {
                    w[d * len..(d + 1) * len]
                        .iter()
                        .zip(img)
                        .map(|(a, b)| a * b)
                        .sum::<f32>()
                })
            })
            .collect())
    }
    fn encode_texts(&mut self, tokens: &[i64], _n: usize) -> Result<Vec<f32>, EncodeError> {
        Ok(tokens
            .chunks(77)
            .flat_map(|row| {
                let mut v = vec![0f32; DIM];
                for &t in row {
                    for (a, b) in v
                        .iter_mut()
                        .zip(&self.e[t as usize * DIM..(t as usize + 1) * DIM])
                    {
                        *a += b;
                    }
                }
                v
            })
            .collect())
    }
}

fn corpus(dir: &Path, n: u64) -> PathBuf {
    let cfg = hq_data::synth::SynthConfig {
        eval_samples: n,
        eval_shard_size: n / 2,
        ..hq_data::synth::SynthConfig::default()
    };
    let eval = dir.join("eval");
    hq_data::synth::evalsets::write_eval_sets(&cfg, &eval, false)
        .unwrap_or_else(|e| panic!("synth: {e}"));
    eval
}

fn quiet() -> RunOptions {
    RunOptions {
        progress: false,
        batch_size: 8,
        ..RunOptions::default()
    }
}

#[test]
fn builtin_suite_reports_every_set() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    corpus(tmp.path(), 40);
    let mut enc = Linear::new(1);
    // The corpus root works as well as its eval/ folder.
    let report = evaluate_builtin(&mut enc, tmp.path(), &quiet()).unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<String> = report.summary().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            "synth_shape/acc1",
            "synth_color/acc1",
            "synth_count/acc1",
            "synth_shape/probe_acc1",
            "synth_shape/prompt_cosine",
            "synth_color/probe_acc1",
            "synth_color/prompt_cosine",
            "synth_count/probe_acc1",
            "synth_count/prompt_cosine",
            "synth_retrieval/image_r1",
            "synth_retrieval/text_r1",
            "synth_retrieval/mean_r1",
            "synth_aro_attribute/macro_acc",
            "synth_aro_relation/macro_acc",
            "builtin/mean"
        ]
    );
    for (n, v) in report.summary() {
        let range = if n.ends_with("/prompt_cosine") {
            -1.0..=1.0
        } else {
            0.0..=1.0
        };
        assert!(range.contains(&v), "{n} = {v}");
    }
    for c in &report.classification {
        assert_eq!((c.samples, c.bad_samples), (40, 0), "{}", c.name);
    }
    assert_eq!(report.classification[0].classes, 8);
    assert_eq!(report.classification[2].acc5, None, "3 classes: no acc5");
    assert_eq!(report.retrieval.images, 40);
    assert!((80..=200).contains(&report.retrieval.texts));
    assert_eq!(report.aro_relation.samples, 40);
    assert_eq!(report.aro_relation.groups, 4);
    assert_eq!(report.attribute_min_count, 1);
    let json = serde_json::to_string(&report).unwrap_or_default();
    let back: BuiltinReport = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}"));
    // serde_json's default float parsing may differ in the last bit.
    for ((a, x), (b, y)) in back.summary().iter().zip(report.summary().iter()) {
        assert!(a == b && (x - y).abs() < 1e-12, "{a} {x} vs {b} {y}");
    }
    assert!(report.to_text().contains("synth_shape/acc1"));

    // Deterministic: the same model gives the same numbers.
    let again = evaluate_builtin(&mut Linear::new(1), &tmp.path().join("eval"), &quiet())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(again.summary(), report.summary());

    std::fs::remove_dir_all(tmp.path().join("eval/wds_synth_count_test")).unwrap_or_default();
    let err = evaluate_builtin(&mut enc, tmp.path(), &quiet())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("synth_count"), "{err}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap_or_else(|e| panic!("{e}"));
    for entry in std::fs::read_dir(from)
        .unwrap_or_else(|e| panic!("{e}"))
        .flatten()
    {
        let p = entry.path();
        let t = to.join(entry.file_name());
        if p.is_dir() {
            copy_dir(&p, &t);
        } else {
            std::fs::copy(&p, &t).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

#[test]
fn runner_reports_done_failed_missing_and_resumes() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let eval = corpus(&tmp.path().join("corpus"), 40);
    let root = tmp.path().join("data");
    copy_dir(
        &eval.join("wds_synth_shape_test"),
        &root.join("wds_cifar10_test"),
    );
    copy_dir(
        &eval.join("wds_synth_retrieval_test"),
        &root.join("wds_flickr30k"),
    );
    copy_dir(
        &eval.join("aro/synth_aro_relation"),
        &root.join("aro/vg_relation"),
    );
    // Unusable: no test/nshards.txt.
    copy_dir(
        &eval.join("wds_synth_color_test"),
        &root.join("wds_vtab-dtd_test"),
    );
    std::fs::remove_file(root.join("wds_vtab-dtd_test/test/nshards.txt")).unwrap_or_default();
    // Cut the second CIFAR-10 shard in the middle.
    let shard = root.join("wds_cifar10_test/test/1.tar");
    let bytes = std::fs::read(&shard).unwrap_or_default();
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap_or_else(|e| panic!("{e}"));

    let out = tmp.path().join("out");
    let cfg = RunConfig {
        data_root: root.clone(),
        out_dir: out.clone(),
        tasks: select_tasks(&["all".into()]).unwrap_or_default(),
        options: quiet(),
        model: ModelInfo {
            label: "linear-a".into(),
            encoder: "linear".into(),
            checkpoint: None,
            fingerprint: "a".into(),
        },
        code: CodeInfo::current(None),
        force: false,
    };
    let mut enc = Linear::new(2);
    let mut log = Vec::new();
    let results = run_tasks(&mut enc, &cfg, &mut |l| log.push(l.to_string()))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(results.tasks.len(), 40);
    let task = |name: &str| results.task(name).unwrap_or_else(|| panic!("no {name}"));
    let cifar = task("CIFAR-10");
    assert_eq!(cifar.status, TaskStatus::Done);
    assert!(cifar.output.bad.count > 0, "cut shard not reported");
    assert!(cifar.output.samples >= 20 && cifar.output.samples < 40);
    assert!(cifar.main_value.is_some());
    assert_eq!(task("Flickr").status, TaskStatus::Done);
    assert_eq!(task("VG-Relation").status, TaskStatus::Done);
    let dtd = task("Describable Textures");
    assert_eq!(dtd.status, TaskStatus::Failed);
    assert!(
        dtd.reason.as_deref().unwrap_or("").contains("nshards.txt"),
        "{:?}",
        dtd.reason
    );
    let inet = task("ImageNet 1k");
    assert_eq!(inet.status, TaskStatus::Missing);
    assert!(inet
        .source
        .as_deref()
        .unwrap_or("")
        .contains("wds_imagenet1k_test"));
    let avg = results
        .aggregate("Avg")
        .cloned()
        .unwrap_or_else(|| panic!("no Avg"));
    assert!(avg.partial);
    assert_eq!((avg.present, avg.total), (2, 38));
    assert!(out.join("results.json").is_file());
    assert!(out.join("tasks/cifar10.json").is_file());
    let loaded = RunResults::load(&out.join("results.json")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(loaded.tasks.len(), results.tasks.len());

    // Rerun: finished tasks are kept without encoding an image again; the failed one is retried.
    let calls = enc.image_calls;
    let mut log2 = Vec::new();
    let again = run_tasks(&mut enc, &cfg, &mut |l| log2.push(l.to_string()))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(enc.image_calls, calls, "finished tasks were encoded again");
    assert_eq!(
        log2.iter().filter(|l| l.contains("kept")).count(),
        3,
        "{log2:?}"
    );
    assert_eq!(again.aggregates, results.aggregates);

    // Reports.
    let table = terminal_table(&results);
    assert!(table.contains("missing") && table.contains("FAILED") && table.contains("get it:"));
    let md = markdown(&results);
    assert!(md.contains("| linear-a |") && md.contains("CIFAR-10"));
    let mut other = results.clone();
    other.model.label = "linear-b".into();
    let cmp = compare_markdown(&[results.clone(), other.clone()]);
    assert!(cmp.contains("Δ linear-b") && cmp.contains("+0.00"));
    let png = out.join("groups.png");
    group_chart(&[results, other], &png).unwrap_or_else(|e| panic!("{e}"));
    let head = std::fs::read(&png).unwrap_or_default();
    assert!(head.starts_with(b"\x89PNG"), "not a PNG");
}

/// `hq-eval alignment`'s measure: every sample accounted for (with the text, missing it, or
/// bad), the cap honoured, and the result independent of the batch size (a batching slip that
/// pairs an image with another sample's text would change it).
#[test]
fn text_alignment_accounts_for_every_sample_and_ignores_batching() {
    use hq_eval::alignment::{text_alignment, TextField, TextSource};
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let cfg = hq_data::synth::SynthConfig {
        image_size: SIZE,
        ..hq_data::synth::SynthConfig::default()
    };
    let mut w = hq_data::shards::ShardWriter::new(
        dir.path().join("train"),
        hq_data::shards::ShardWriterOptions::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    for i in 0..23u64 {
        let mut s = hq_data::synth::train_sample(&cfg, i)
            .unwrap_or_else(|e| panic!("{e}"))
            .sample;
        if i % 5 == 0 {
            s.refined = None; // a failed recaption: the sample has its alt-text only
        }
        w.write(&s).unwrap_or_else(|e| panic!("{e}"));
    }
    w.finish().unwrap_or_else(|e| panic!("{e}"));
    let shard = dir.path().join("train-00000.tar").display().to_string();
    let src = |label: &str, field: &str| -> TextSource {
        format!("{label}={field}@{shard}")
            .parse()
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let sources = [src("raw", "alt_text"), src("ours", "long_positive")];
    let mut enc = Linear::new(3);
    let big = text_alignment(&mut enc, &sources, 1000, &quiet()).unwrap_or_else(|e| panic!("{e}"));
    let one = RunOptions {
        batch_size: 1,
        ..quiet()
    };
    let small = text_alignment(&mut enc, &sources, 1000, &one).unwrap_or_else(|e| panic!("{e}"));
    let raw = &big.sources[0];
    assert_eq!((raw.samples, raw.missing, raw.bad), (23, 0, 0));
    let ours = &big.sources[1];
    assert_eq!(ours.field, TextField::LongPositive);
    assert_eq!((ours.samples, ours.missing, ours.bad), (18, 5, 0));
    for (a, b) in big.sources.iter().zip(&small.sources) {
        assert!((-1.0..=1.0).contains(&a.mean_cosine), "{a:?}");
        assert!(
            (a.mean_cosine - b.mean_cosine).abs() < 1e-6,
            "{a:?} vs {b:?}"
        );
    }
    let capped = text_alignment(&mut enc, &sources[..1], 7, &one).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(capped.sources[0].samples, 7);
    assert!(big
        .markdown()
        .contains("| ours | long_positive | 18 | 5 | 0 |"));
    assert!("x=caption@y".parse::<TextSource>().is_err());
    assert!("x=alt_text".parse::<TextSource>().is_err());
}
