//! The recaption job (`hq_runtime::recaption`): parse / retry / error records with a scripted
//! generator, bad inputs, the output formats, kill -9 and resume with the tiny Qwen2-VL, and the
//! teacher-data conversion.
//!
//! - `scripted_answers_*`: a fake generator behind the `Generator` trait answers per sample key:
//!   valid at once, valid only on a retry, never valid, valid with real-model formatting quirks, or
//!   failing inside the generator. Every sample must end as exactly one record with the expected
//!   texts or error, retries must use new seeds, sampled decoding and (eventually) other exemplars.
//! - `bad_inputs_*`: corrupt image bytes, a decompression bomb, a missing image, an empty and a
//!   non-UTF-8 alt-text, a cut tar stream, a JSONL list with bad lines: one record each, no panic.
//! - `kill_and_resume_*`: the job runs in a child process (this test binary re-run with a filter)
//!   with the tiny random Qwen2-VL, is killed with SIGKILL mid-run, and is run again: every
//!   sample ends with exactly one record, the records written before the kill are kept as they
//!   were (not redone), finished shards are skipped, every output tar reads back.
//! - `teacher_*`: teacher answers with formatting variations become LLaVA / ShareGPT
//!   conversations; a broken answer is reported.
//!
//! Run time: about 15-30 s on 2 cores (most of it the tiny model's export and the killed + resumed
//! job).

mod recap_support;

use std::collections::{BTreeMap, HashMap};
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hq_data::recaption_format;
use hq_data::RefinedTexts;
use hq_runtime::qwen2vl::{
    EngineOptions, ImageProcessor, Part, PreprocessConfig, Qwen2Vl, Sampling,
};
use hq_runtime::recaption::prompt::PromptTemplate;
use hq_runtime::recaption::teacher::{
    teacher_conversations, teacher_set_from_shards, ConversationFormat,
};
use hq_runtime::recaption::{
    run_job, ExemplarSet, GenInput, GenOutput, Generator, JobOptions, OutputFormat,
    Qwen2VlGenerator, RecapRecord,
};
use hq_runtime::RuntimeError;
use recap_support::{init_ort, test_image, tiny_model, TestResult};
use serde_json::{json, Value};

fn png_bytes(w: u32, h: u32, seed: u64) -> Vec<u8> {
    let mut out = Vec::new();
    let img = image::DynamicImage::ImageRgb8(test_image(w, h, seed));
    let _ = img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png);
    out
}

fn jpg_bytes(w: u32, h: u32, seed: u64) -> Vec<u8> {
    let mut out = Vec::new();
    let img = image::DynamicImage::ImageRgb8(test_image(w, h, seed));
    let _ = img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Jpeg);
    out
}

/// A PNG header claiming 60000 x 60000 pixels (3.6 gigapixels) over a few bytes of data.
fn bomb_png() -> Vec<u8> {
    let mut png = png_bytes(8, 8, 9);
    // IHDR: length at 8..12, type + data at 12..29, CRC at 29..33.
    png[16..20].copy_from_slice(&60_000u32.to_be_bytes());
    png[20..24].copy_from_slice(&60_000u32.to_be_bytes());
    let mut crc = flate2::Crc::new();
    crc.update(&png[12..29]);
    png[29..33].copy_from_slice(&crc.sum().to_be_bytes());
    png
}

type Member = (String, Vec<u8>);

fn write_tar(path: &Path, samples: &[(String, Vec<Member>)]) -> std::io::Result<()> {
    let file = std::fs::File::create(path)?;
    let mut b = tar::Builder::new(file);
    for (key, members) in samples {
        for (ext, bytes) in members {
            let mut h = tar::Header::new_ustar();
            h.set_size(bytes.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, format!("{key}.{ext}"), bytes.as_slice())?;
        }
    }
    b.finish()
}

fn sample(key: &str, image: (&str, Vec<u8>), text: &[u8], uid: &str) -> (String, Vec<Member>) {
    (
        key.to_string(),
        vec![
            (image.0.to_string(), image.1),
            ("txt".into(), text.to_vec()),
            (
                "json".into(),
                serde_json::to_vec(&json!({"uid": uid, "url": format!("http://x/{key}")}))
                    .unwrap_or_default(),
            ),
            ("extra".into(), b"kept as is".to_vec()),
        ],
    )
}

fn processor() -> ImageProcessor {
    ImageProcessor::new(
        PreprocessConfig {
            min_pixels: 3136,
            max_pixels: 200_704,
            image_mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
            image_std: [0.268_629_54, 0.261_302_58, 0.275_777_11],
            rescale_factor: 1.0 / 255.0,
            patch_size: 14,
            merge_size: 2,
            temporal_patch_size: 2,
        },
        3,
    )
}

fn texts(tag: &str) -> RefinedTexts {
    RefinedTexts {
        long_positive: format!("The image shows a {tag} circle above a blue square."),
        long_negative: format!("The image shows a {tag} square below a green circle."),
        tags_positive: vec![format!("{tag} circle"), "blue square".into()],
        tags_negative: vec![format!("{tag} square"), "green circle".into()],
        source: None,
    }
}

#[derive(Debug, Clone)]
struct Call {
    key: String,
    seed: u64,
    attempt: u32,
    sampling: Sampling,
    prompt: String,
}

/// Answers by the last character of the key:
/// 0 valid; 1 invalid first, valid on a retry; 2 never valid; 3 valid with quirks; 4 the generator
/// fails whenever this sample is in the batch.
struct Scripted {
    calls: Arc<Mutex<Vec<Call>>>,
}

impl Generator for Scripted {
    fn name(&self) -> String {
        "scripted".into()
    }
    fn processor(&self) -> ImageProcessor {
        processor()
    }
    fn generate(&mut self, items: &[GenInput<'_>]) -> Result<Vec<GenOutput>, RuntimeError> {
        if items.iter().any(|i| i.key.ends_with('4')) {
            return Err(RuntimeError::Generation("scripted failure".into()));
        }
        let mut out = Vec::new();
        for it in items {
            let prompt: String = it.messages[0]
                .parts
                .iter()
                .map(|p| match p {
                    Part::Text(t) => t.clone(),
                    Part::Image => "<image>".into(),
                })
                .collect();
            if let Ok(mut calls) = self.calls.lock() {
                calls.push(Call {
                    key: it.key.to_string(),
                    seed: it.seed,
                    attempt: it.attempt,
                    sampling: it.sampling,
                    prompt,
                });
            }
            let tag = it.key.to_string();
            let text = match it.key.chars().last() {
                Some('0') => recaption_format::render(&texts(&tag)),
                Some('1') if it.attempt > 0 => recaption_format::render(&texts(&tag)),
                Some('3') => format!(
                    "Sure!\n1. **Long description:** {}\n2. **Negative description:** {}\n3) Tags: {};\n- Negative tags: {}.\nHope it helps.",
                    texts(&tag).long_positive,
                    texts(&tag).long_negative,
                    texts(&tag).tags_positive.join("; "),
                    texts(&tag).tags_negative.join(", ")
                ),
                _ => format!("garbage answer {}", it.attempt),
            };
            out.push(GenOutput {
                tokens: text.len() / 4,
                text,
                truncated: false,
            });
        }
        Ok(out)
    }
}

fn read_tar_json(path: &Path) -> Result<BTreeMap<String, Value>, Box<dyn std::error::Error>> {
    let mut out = BTreeMap::new();
    let mut a = tar::Archive::new(std::fs::File::open(path)?);
    for e in a.entries()? {
        let mut e = e?;
        let name = e.path()?.to_string_lossy().into_owned();
        if let Some(key) = name.strip_suffix(".json") {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut e, &mut s)?;
            out.insert(key.to_string(), serde_json::from_str(&s)?);
        }
    }
    Ok(out)
}

fn tar_members(path: &Path) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    let mut a = tar::Archive::new(std::fs::File::open(path)?);
    let mut names = Vec::new();
    for e in a.entries()? {
        names.push(e?.path()?.to_string_lossy().into_owned());
    }
    Ok(names)
}

#[test]
fn scripted_answers_give_one_record_per_sample_with_retries() -> TestResult {
    let dir = tempfile::tempdir()?;
    let input = dir.path().join("in");
    std::fs::create_dir_all(&input)?;
    let mut shards = Vec::new();
    for s in 0..2 {
        let samples: Vec<_> = (0..10)
            .map(|i| {
                let key = format!("s{s}k{i:02}");
                sample(
                    &key,
                    ("jpg", jpg_bytes(40 + i * 7, 50, i as u64)),
                    format!("alt text {key}").as_bytes(),
                    &format!("uid-{key}"),
                )
            })
            .collect();
        let p = input.join(format!("shard-{s:05}.tar"));
        write_tar(&p, &samples)?;
        shards.push(p);
    }
    let calls = Arc::new(Mutex::new(Vec::new()));
    let mut gen = Scripted {
        calls: calls.clone(),
    };
    let out = dir.path().join("out");
    let opts = JobOptions {
        inputs: shards.clone(),
        output_dir: out.clone(),
        batch_size: 4,
        max_attempts: 3,
        seed: 7,
        progress: false,
        decode_threads: 2,
        ..JobOptions::default()
    };
    let summary = run_job(&mut gen, &ExemplarSet::builtin(), &opts)?;
    assert_eq!(summary.samples, 20);
    assert_eq!(summary.inputs_finished, 2);
    // Keys k00..k09 per shard: endings 0, 1, 3 give texts, 4 a generator failure, the rest never
    // parse.
    let expect_ok = |k: &str| matches!(k.chars().last(), Some('0' | '1' | '3'));
    let mut seen = 0;
    for (s, shard) in shards.iter().enumerate() {
        let outp = out.join(shard.file_name().ok_or("name")?);
        let jsons = read_tar_json(&outp)?;
        assert_eq!(jsons.len(), 10, "one sample per input sample");
        let names = tar_members(&outp)?;
        assert_eq!(
            names.iter().filter(|n| n.ends_with(".extra")).count(),
            10,
            "extra members kept"
        );
        for (key, v) in &jsons {
            seen += 1;
            assert_eq!(v["uid"], json!(format!("uid-{key}")), "metadata kept");
            if expect_ok(key) {
                let t: RefinedTexts = serde_json::from_value(v["hq_clip"].clone())?;
                let want = texts(key);
                assert_eq!(t.long_positive, want.long_positive, "{key}");
                assert_eq!(t.tags_positive, want.tags_positive, "{key}");
                assert_eq!(t.tags_negative, want.tags_negative, "{key}");
                assert_eq!(t.source.as_deref(), Some("model:scripted"));
                assert!(v.get("hq_clip_error").is_none());
            } else {
                let e = &v["hq_clip_error"];
                let reason = e["reason"].as_str().ok_or("reason")?;
                if key.ends_with('4') {
                    assert!(reason.starts_with("generation:"), "{key}: {reason}");
                } else {
                    assert!(reason.starts_with("format:"), "{key}: {reason}");
                    assert_eq!(
                        e["raw_answer"],
                        json!("garbage answer 2"),
                        "{key}: last raw answer kept"
                    );
                    assert_eq!(e["attempts"], json!(3));
                }
            }
        }
        assert!(
            !out.join(format!("shard-{s:05}.partial.jsonl")).exists(),
            "log removed"
        );
    }
    assert_eq!(seen, 20);
    assert_eq!(summary.ok, 2 * 3, "{summary}");
    assert_eq!(summary.errors.get("format"), Some(&(2 * 6)), "{summary}");
    assert_eq!(summary.errors.get("generation"), Some(&2), "{summary}");
    assert_eq!(summary.retried, 2 * 8, "{summary}");

    // Retries: new seed, sampled decoding, the alt-text and instruction in every prompt.
    let calls = calls.lock().map_err(|_| "poisoned")?.clone();
    let mut by_key: HashMap<String, Vec<Call>> = HashMap::new();
    for c in calls {
        assert!(
            c.prompt.contains(&format!("alt text {}", c.key)),
            "{}",
            c.prompt
        );
        assert!(c.prompt.contains("prioritize the image") && c.prompt.contains("ENGLISH"));
        assert!(c.prompt.contains("Here is an example:\nInput: "));
        by_key.entry(c.key.clone()).or_default().push(c);
    }
    let k2 = &by_key["s0k02"];
    assert_eq!(k2.len(), 3);
    assert_eq!(
        k2.iter().map(|c| c.attempt).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    assert_eq!(k2[0].sampling, Sampling::Greedy);
    assert!(matches!(k2[1].sampling, Sampling::TopP { .. }));
    assert!(k2[0].seed != k2[1].seed && k2[1].seed != k2[2].seed);
    assert_eq!(by_key["s0k01"].len(), 2, "valid on the first retry");
    assert_eq!(by_key["s0k00"].len(), 1);
    // Exemplars vary across samples.
    let examples: std::collections::HashSet<String> = by_key
        .values()
        .flatten()
        .filter_map(|c| {
            c.prompt
                .split("Input: ")
                .nth(1)
                .map(|s| s.lines().next().unwrap_or("").to_string())
        })
        .collect();
    assert!(examples.len() >= 2, "{examples:?}");

    // A rerun skips everything.
    let again = run_job(&mut gen, &ExemplarSet::builtin(), &opts)?;
    assert_eq!((again.inputs_skipped, again.samples), (2, 0));

    // Side-car output of the same inputs: one line per sample keyed by uid, loadable by hq-data.
    let sc_out = dir.path().join("sidecar");
    let sc = run_job(
        &mut gen,
        &ExemplarSet::builtin(),
        &JobOptions {
            output_dir: sc_out.clone(),
            format: OutputFormat::Sidecar,
            ..opts.clone()
        },
    )?;
    assert_eq!(sc.samples, 20);
    let side = hq_data::shards::Sidecar::load(sc_out.join("shard-00000.jsonl"))?;
    assert_eq!(side.len(), 3, "ok records load as annotations");
    assert_eq!(
        side.errors().len(),
        7,
        "error records are reported, not lost"
    );
    assert!(side.get("uid-s0k03").is_some());
    // ...and it trains without re-sharding: joined onto the input shards as hq-train's
    // --annotations does, the ok records annotate their samples, the failed ones are counted as
    // bad records (those samples keep their alt-text).
    let mut ok = 0;
    let mut failed = 0;
    for f in std::fs::read_dir(&sc_out)? {
        let path = f?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("jsonl") {
            continue;
        }
        let sc = hq_data::shards::Sidecar::load(path)?;
        ok += sc.len() as u64;
        failed += sc.errors().len() as u64;
    }
    let ann = hq_data::shards::Annotations::open(&hq_data::shards::AnnotationSpec::new(
        sc_out.display().to_string(),
    ))?;
    let cov = hq_data::shards::annotations::coverage(&shards, &ann, 1, false)?;
    assert_eq!(cov.counts.joined, ok);
    assert_eq!(cov.counts.missing, 20 - ok);
    assert_eq!(cov.counts.bad_records, failed);
    assert_eq!((cov.counts.orphan, cov.counts.missing_files), (0, 0));
    Ok(())
}

#[test]
fn bad_inputs_become_error_records_not_panics() -> TestResult {
    let dir = tempfile::tempdir()?;
    let shard = dir.path().join("bad.tar");
    let mut samples = vec![
        sample("a0", ("png", png_bytes(30, 30, 1)), b"", "u-a0"),
        sample(
            "b0",
            ("jpg", b"not a jpeg at all".to_vec()),
            b"corrupt image",
            "u-b0",
        ),
        sample("c0", ("png", bomb_png()), b"bomb", "u-c0"),
        sample(
            "d0",
            ("jpg", jpg_bytes(64, 48, 2)),
            b"caf\xe9 cr\xe8me \xff",
            "u-d0",
        ),
        ("e0".into(), vec![("txt".into(), b"no image".to_vec())]),
        sample(
            "f0",
            ("jpg", jpg_bytes(300, 1, 3)),
            b"too elongated",
            "u-f0",
        ),
        sample(
            "g0",
            ("jpg", jpg_bytes(56, 56, 4)),
            b"last good sample",
            "u-g0",
        ),
    ];
    write_tar(&shard, &samples)?;
    // Cut the stream inside the last sample's image.
    let bytes = std::fs::read(&shard)?;
    let cut = dir.path().join("cut.tar");
    std::fs::write(&cut, &bytes[..bytes.len() - 3000])?;
    samples.truncate(6);
    let list = dir.path().join("list.jsonl");
    let img = dir.path().join("ok.png");
    std::fs::write(&img, png_bytes(20, 20, 5))?;
    std::fs::write(
        &list,
        "{\"image\": \"ok.png\", \"text\": \"fine\", \"key\": \"l1\"}\nnot json\n{\"image\": \"missing.png\", \"text\": \"x\"}\n\n{\"text\": \"no image\"}\n",
    )?;

    let calls = Arc::new(Mutex::new(Vec::new()));
    let mut gen = Scripted { calls };
    let out = dir.path().join("out");
    let opts = JobOptions {
        inputs: vec![shard.clone(), cut.clone()],
        output_dir: out.clone(),
        max_image_pixels: 100_000_000,
        max_attempts: 1,
        progress: false,
        ..JobOptions::default()
    };
    let s = run_job(&mut gen, &ExemplarSet::builtin(), &opts)?;

    let jsons = read_tar_json(&out.join("bad.tar"))?;
    let reason = |k: &str| {
        jsons[k]["hq_clip_error"]["reason"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    assert!(
        jsons["a0"]["hq_clip"].is_object(),
        "empty alt-text is recaptioned: {:?}",
        jsons["a0"]
    );
    assert!(reason("b0").starts_with("image:"), "{}", reason("b0"));
    assert!(
        reason("c0").contains("pixel") || reason("c0").contains("limit"),
        "{}",
        reason("c0")
    );
    assert!(
        jsons["d0"]["hq_clip"].is_object(),
        "non-UTF-8 alt-text is recaptioned (lossy)"
    );
    assert!(reason("e0").starts_with("input:"), "{}", reason("e0"));
    assert!(reason("f0").contains("aspect ratio"), "{}", reason("f0"));
    assert_eq!(jsons.len(), 7);
    // cut.tar: the 6 whole samples, the cut one (an error record, with what could be read of it),
    // and one record for the damaged stream.
    let cut_jsons = read_tar_json(&out.join("cut.tar"))?;
    for k in ["a0", "b0", "c0", "d0", "e0", "f0"] {
        assert!(
            cut_jsons.contains_key(k),
            "{k} missing from cut.tar's output"
        );
    }
    let errors = std::fs::read_to_string(out.join("cut.errors.jsonl"))?;
    let recs: Vec<RecapRecord> = errors
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(recs.len(), 1, "{errors}");
    assert!(recs[0].error.as_deref().unwrap_or("").starts_with("input:"));
    assert_eq!(s.samples as usize, 7 + cut_jsons.len() + recs.len(), "{s}");

    // Lists need the side-car format; then every line is accounted for.
    let err = run_job(
        &mut gen,
        &ExemplarSet::builtin(),
        &JobOptions {
            inputs: vec![list.clone()],
            ..opts.clone()
        },
    )
    .expect_err("tar output of a list");
    assert!(err.to_string().contains("side"), "{err}");
    let s = run_job(
        &mut gen,
        &ExemplarSet::builtin(),
        &JobOptions {
            inputs: vec![list],
            format: OutputFormat::Sidecar,
            ..opts.clone()
        },
    )?;
    assert_eq!(s.samples, 4, "{s}");
    let lines = std::fs::read_to_string(out.join("list.jsonl"))?;
    assert_eq!(lines.lines().count(), 4);
    Ok(())
}

#[test]
fn bad_inputs_with_the_tiny_model() -> TestResult {
    init_ort()?;
    let tiny = tiny_model()?;
    let dir = tempfile::tempdir()?;
    let shard = dir.path().join("mixed.tar");
    write_tar(
        &shard,
        &[
            sample("a", ("jpg", jpg_bytes(64, 48, 1)), b"", "ua"),
            sample(
                "b",
                ("jpg", b"\xff\xd8\xff garbage".to_vec()),
                b"corrupt",
                "ub",
            ),
            sample("c", ("png", bomb_png()), b"bomb", "uc"),
            sample(
                "d",
                ("png", png_bytes(40, 70, 2)),
                b"\xfe\xfe bad utf8",
                "ud",
            ),
        ],
    )?;
    let engine = Qwen2Vl::load(
        &tiny.onnx,
        &EngineOptions {
            intra_threads: Some(2),
            ..EngineOptions::default()
        },
    )?;
    let mut gen = Qwen2VlGenerator::new(engine, 12, Some("tiny".into()));
    let out = dir.path().join("out");
    let s = run_job(
        &mut gen,
        &ExemplarSet::builtin(),
        &JobOptions {
            inputs: vec![shard],
            output_dir: out.clone(),
            max_attempts: 2,
            batch_size: 2,
            progress: false,
            ..JobOptions::default()
        },
    )?;
    assert_eq!(s.samples, 4, "{s}");
    let jsons = read_tar_json(&out.join("mixed.tar"))?;
    assert_eq!(jsons.len(), 4);
    for k in ["a", "d"] {
        // A random model does not write the format: the retry path ends in an error record with
        // the raw answer (or, by chance, texts).
        let v = &jsons[k];
        assert!(
            v["hq_clip"].is_object() || v["hq_clip_error"]["raw_answer"].is_string(),
            "{k}: {v}"
        );
        if v["hq_clip_error"].is_object() {
            assert_eq!(v["hq_clip_error"]["attempts"], json!(2));
        }
    }
    assert!(jsons["b"]["hq_clip_error"]["reason"]
        .as_str()
        .unwrap_or("")
        .starts_with("image:"));
    assert!(jsons["c"]["hq_clip_error"]["reason"]
        .as_str()
        .unwrap_or("")
        .starts_with("image:"));
    assert!(s.generated_tokens > 0);
    Ok(())
}

const CHILD_ENV: &str = "HQ_RECAP_JOB_CHILD";

/// In normal runs a no-op; as the child of `kill_and_resume_*` it runs the job.
#[test]
fn child_process_entry() -> TestResult {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return Ok(());
    };
    let v: Value = serde_json::from_str(&spec)?;
    init_ort()?;
    let model = PathBuf::from(v["model"].as_str().ok_or("model")?);
    let engine = Qwen2Vl::load(
        &model,
        &EngineOptions {
            intra_threads: Some(1),
            ..EngineOptions::default()
        },
    )?;
    let mut gen = Qwen2VlGenerator::new(engine, 8, Some("tiny".into()));
    let inputs: Vec<PathBuf> = serde_json::from_value(v["inputs"].clone())?;
    run_job(
        &mut gen,
        &ExemplarSet::builtin(),
        &JobOptions {
            inputs,
            output_dir: PathBuf::from(v["out"].as_str().ok_or("out")?),
            max_attempts: 1,
            batch_size: 2,
            decode_threads: 1,
            progress: false,
            ..JobOptions::default()
        },
    )?;
    Ok(())
}

fn logged_records(out: &Path) -> Result<Vec<RecapRecord>, Box<dyn std::error::Error>> {
    let mut recs = Vec::new();
    for e in std::fs::read_dir(out)? {
        let p = e?.path();
        if p.to_string_lossy().ends_with(".partial.jsonl") {
            for line in std::fs::read_to_string(&p)?.lines() {
                if let Ok(r) = serde_json::from_str::<RecapRecord>(line) {
                    recs.push(r);
                }
            }
        }
    }
    Ok(recs)
}

#[test]
fn kill_and_resume_loses_no_finished_sample() -> TestResult {
    let tiny = tiny_model()?;
    let dir = tempfile::tempdir()?;
    let mut inputs = Vec::new();
    let mut all_keys = Vec::new();
    for s in 0..3 {
        let samples: Vec<_> = (0..12)
            .map(|i| {
                let key = format!("s{s}i{i}");
                all_keys.push(key.clone());
                sample(
                    &key,
                    ("jpg", jpg_bytes(56 + 28 * (i % 3), 56, (s * 12 + i) as u64)),
                    format!("photo {key}").as_bytes(),
                    &key,
                )
            })
            .collect();
        let p = dir.path().join(format!("shard-{s:05}.tar"));
        write_tar(&p, &samples)?;
        inputs.push(p);
    }
    let out = dir.path().join("out");
    let spec = json!({"model": tiny.onnx, "inputs": inputs, "out": out}).to_string();
    let spawn = || {
        std::process::Command::new(std::env::current_exe()?)
            .args([
                "--exact",
                "child_process_entry",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(CHILD_ENV, &spec)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
    };
    // First run: killed with SIGKILL once a few samples are recorded.
    let mut child = spawn()?;
    let start = Instant::now();
    let before;
    loop {
        let recs = logged_records(&out).unwrap_or_default();
        let finished = std::fs::read_dir(&out)
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.path().extension().is_some_and(|x| x == "tar"))
                    .count()
            })
            .unwrap_or(0);
        if recs.len() + 12 * finished >= 5 {
            child.kill()?; // SIGKILL
            let _ = child.wait();
            before = logged_records(&out)?;
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                std::io::Read::read_to_string(&mut e, &mut err)?;
            }
            return Err(
                format!("the job ended before it could be killed ({status}): {err}").into(),
            );
        }
        if start.elapsed() > Duration::from_secs(120) {
            child.kill()?;
            return Err("no progress within 120 s".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let finished_before: Vec<PathBuf> = std::fs::read_dir(&out)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "tar"))
        .collect();
    assert!(
        finished_before.len() < 3,
        "the kill came after the job finished; the test did not exercise resume"
    );

    // Second run completes.
    let second = spawn()?.wait_with_output()?;
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    let mut got: BTreeMap<String, Value> = BTreeMap::new();
    for p in &inputs {
        let outp = out.join(p.file_name().ok_or("name")?);
        for (k, v) in read_tar_json(&outp)? {
            assert!(got.insert(k.clone(), v).is_none(), "{k} twice");
        }
    }
    let mut want = all_keys.clone();
    want.sort();
    assert_eq!(
        got.keys().cloned().collect::<Vec<_>>(),
        want,
        "exactly one record per sample"
    );
    // Records written before the kill are kept as they were.
    for r in &before {
        let v = &got[&r.key];
        match (&r.hq_clip, &r.raw_answer) {
            (Some(t), _) => assert_eq!(v["hq_clip"]["long_positive"], json!(t.long_positive)),
            (None, raw) => assert_eq!(
                v["hq_clip_error"]["raw_answer"].as_str(),
                raw.as_deref(),
                "{}",
                r.key
            ),
        }
    }
    let leftovers: Vec<String> = std::fs::read_dir(&out)?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".partial.jsonl"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    eprintln!(
        "killed after {} logged records and {} finished shards; resumed to {} samples",
        before.len(),
        finished_before.len(),
        got.len()
    );
    Ok(())
}

#[test]
fn teacher_answers_become_conversations() -> TestResult {
    let dir = tempfile::tempdir()?;
    let input = dir.path().join("teacher.jsonl");
    let t = texts("red");
    let quirky = format!(
        "Here you go:\n**Long description:** {}\n**Negative description:** {}\n**Tags:** {}\n**Negative tags:** {}\n",
        t.long_positive,
        t.long_negative,
        t.tags_positive.join(", "),
        t.tags_negative.join(", ")
    );
    let lines = [
        json!({"id": "a", "image": "imgs/a.jpg", "alt_text": "red thing", "answer": recaption_format::render(&t)}),
        json!({"id": "b", "image": "imgs/b.jpg", "text": "quirky", "answer": quirky}),
        json!({"id": "c", "image": "imgs/c.jpg", "alt_text": "fields", "long_positive": t.long_positive, "long_negative": t.long_negative, "tags_positive": t.tags_positive, "tags_negative": "x, y"}),
        json!({"id": "d", "image": "imgs/d.jpg", "alt_text": "broken", "answer": "I cannot help with that."}),
    ];
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&input, text)?;
    let (conv, report) = teacher_conversations(
        &input,
        &ExemplarSet::builtin(),
        &PromptTemplate::paper(),
        0,
        ConversationFormat::Llava,
        1000,
    )?;
    assert_eq!((report.records, report.accepted), (4, 3));
    assert_eq!(report.rejected.len(), 1);
    assert_eq!(report.rejected[0].id, "d");
    let arr = conv.as_array().ok_or("array")?;
    assert_eq!(arr[0]["image"], json!("imgs/a.jpg"));
    let human = arr[1]["conversations"][0]["value"]
        .as_str()
        .ok_or("human")?;
    assert!(
        human.contains("text \"quirky\" with image <image>\nPlease output:"),
        "{human}"
    );
    let gpt = arr[1]["conversations"][1]["value"].as_str().ok_or("gpt")?;
    assert_eq!(
        gpt,
        recaption_format::render(&t).trim_end(),
        "canonical form taught"
    );
    // Every assistant turn parses with the job's parser.
    for c in arr {
        let a = c["conversations"][1]["value"].as_str().ok_or("value")?;
        assert!(recaption_format::parse(a, None).is_ok(), "{a}");
    }
    let (sg, _) = teacher_conversations(
        &input,
        &ExemplarSet::builtin(),
        &PromptTemplate::paper(),
        0,
        ConversationFormat::ShareGpt,
        1000,
    )?;
    assert_eq!(sg[0]["messages"][1]["role"], json!("assistant"));
    assert_eq!(sg[0]["images"], json!(["imgs/a.jpg"]));
    Ok(())
}

/// The fine-tuned recaptioner's path: a teacher set made from shards that carry texts, its
/// conversations in a short prompt template, the job run with the same template, and the oracle's
/// texts dropped where the model failed (the output then holds only the model's texts).
#[test]
fn teacher_set_from_shards_and_a_shipped_prompt_reach_the_job() -> TestResult {
    let dir = tempfile::tempdir()?;
    let shard = dir.path().join("shard-00000.tar");
    let samples: Vec<_> = (0..6)
        .map(|i| {
            let key = format!("k{i:02}");
            let mut meta = json!({"uid": format!("uid-{key}")});
            if i != 5 {
                meta["hq_clip"] = serde_json::to_value(texts("oracle"))?;
            }
            let members = vec![
                ("jpg".to_string(), jpg_bytes(32, 32, i)),
                ("txt".into(), format!("alt {key}").into_bytes()),
                ("json".into(), serde_json::to_vec(&meta)?),
            ];
            Ok((key, members))
        })
        .collect::<Result<_, Box<dyn std::error::Error>>>()?;
    write_tar(&shard, &samples)?;

    // Teacher set: samples with texts only, at most `limit`, images beside the JSONL.
    let teach = dir.path().join("teacher");
    let jsonl = teach.join("teacher.jsonl");
    let set = teacher_set_from_shards(
        std::slice::from_ref(&shard),
        &jsonl,
        &teach.join("images"),
        4,
    )?;
    assert_eq!((set.samples, set.written), (4, 4));
    let set_all = teacher_set_from_shards(
        std::slice::from_ref(&shard),
        &jsonl,
        &teach.join("images"),
        99,
    )?;
    assert_eq!(
        (set_all.samples, set_all.written, set_all.skipped.len()),
        (6, 5, 1)
    );
    assert!(
        set_all.skipped[0].reason.contains("hq_clip"),
        "{:?}",
        set_all.skipped
    );
    assert!(teach.join("images/k04.jpg").is_file());

    let short = PromptTemplate::parse("short", "Alt-text: \"{alt_text}\"\n<image>\nDescribe it.")?;
    let (conv, report) = teacher_conversations(
        &jsonl,
        &ExemplarSet::builtin(),
        &short,
        0,
        ConversationFormat::Llava,
        1000,
    )?;
    assert_eq!(report.accepted, 5);
    assert_eq!(conv[1]["image"], json!("images/k01.jpg"));
    assert_eq!(
        conv[1]["conversations"][0]["value"],
        json!("Alt-text: \"alt k01\"\n<image>\nDescribe it.")
    );

    // The job with the same template; key endings 0, 1, 3 parse (see `Scripted`), others fail.
    let calls = Arc::new(Mutex::new(Vec::new()));
    let mut gen = Scripted {
        calls: calls.clone(),
    };
    let out = dir.path().join("out");
    let opts = JobOptions {
        inputs: vec![shard.clone()],
        output_dir: out.clone(),
        batch_size: 3,
        max_attempts: 2,
        prompt: short,
        drop_input_texts: true,
        progress: false,
        ..JobOptions::default()
    };
    run_job(&mut gen, &ExemplarSet::builtin(), &opts)?;
    let seen = calls.lock().map_err(|_| "lock")?.clone();
    assert!(seen
        .iter()
        .all(|c| c.prompt == format!("Alt-text: \"alt {}\"\n<image>\nDescribe it.", c.key)));
    let jsons = read_tar_json(&out.join("shard-00000.tar"))?;
    for (key, v) in &jsons {
        if matches!(key.as_str(), "k00" | "k01" | "k03") {
            assert_eq!(v["hq_clip"]["source"], json!("model:scripted"), "{key}");
            let attempts = if key == "k01" { 2 } else { 1 };
            assert_eq!(v["hq_clip_attempts"], json!(attempts), "{key}");
        } else {
            assert!(
                v.get("hq_clip").is_none(),
                "{key}: the oracle's texts are dropped"
            );
            assert!(v.get("hq_clip_error").is_some(), "{key}");
        }
    }
    Ok(())
}
