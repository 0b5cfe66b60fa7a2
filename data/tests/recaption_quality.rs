//! The recaption quality report (`hq_data::quality`, `hq-data quality`) on shards with known
//! content: the oracle corpus itself (the ceiling: everything right), and recaptions with planted
//! faults, each of which must land in exactly the count it belongs to.

use hq_data::quality::{self, QualityOptions, QualityReport};
use hq_data::synth::{self, Scene, SynthConfig};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

fn config() -> SynthConfig {
    SynthConfig {
        image_size: 32,
        ..SynthConfig::default()
    }
}

/// Sample `i` of the built-in corpus: (key, image bytes, alt-text, JSON, scene).
fn corpus_sample(i: u64) -> (String, Vec<u8>, String, Value, Scene) {
    let g = synth::train_sample(&config(), i).expect("synth sample");
    let image = g.sample.image.as_ref().expect("image").bytes.clone();
    (
        g.sample.key.clone(),
        image,
        g.sample.raw_text.clone(),
        g.sample.json(),
        g.scene,
    )
}

fn append(b: &mut tar::Builder<std::fs::File>, name: &str, bytes: &[u8]) {
    let mut h = tar::Header::new_gnu();
    h.set_size(bytes.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, name, bytes).expect("tar append");
}

/// Write samples as (key, image, alt-text, raw JSON bytes) into one shard, by hand, so that
/// malformed JSON can be planted too.
fn write_shard(path: &Path, samples: &[(String, Vec<u8>, String, Vec<u8>)]) {
    let f = std::fs::File::create(path).expect("create shard");
    let mut b = tar::Builder::new(f);
    for (key, img, txt, js) in samples {
        append(&mut b, &format!("{key}.jpg"), img);
        append(&mut b, &format!("{key}.txt"), txt.as_bytes());
        append(&mut b, &format!("{key}.json"), js);
    }
    b.finish().expect("finish shard");
}

fn evaluate(paths: &[PathBuf], summaries: Vec<PathBuf>) -> QualityReport {
    let inputs: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    quality::evaluate(
        &inputs,
        &QualityOptions {
            name: Some("test".into()),
            recap_summaries: summaries,
            progress: false,
        },
    )
    .expect("evaluate")
}

/// The oracle corpus itself: every figure at its ceiling, the alt-text baseline far below.
#[test]
fn oracle_corpus_is_the_ceiling() {
    let dir = tempfile::tempdir().expect("tmp");
    let n = 300;
    let mut samples = Vec::new();
    let mut groups = 0u64;
    for i in 0..n {
        let (key, img, txt, js, scene) = corpus_sample(i);
        groups += scene.groups.len() as u64;
        samples.push((key, img, txt, serde_json::to_vec(&js).expect("json")));
    }
    let shard = dir.path().join("shard-00000.tar");
    write_shard(&shard, &samples);
    let r = evaluate(&[shard], vec![]);
    assert_eq!(r.mode, "oracle");
    assert_eq!(
        (r.samples, r.with_texts, r.format_errors, r.other_errors),
        (n, n, 0, 0)
    );
    assert_eq!(r.no_ground_truth, 0);
    assert_eq!(r.sources.get("oracle"), Some(&n));
    assert_eq!(r.format.success.count, n);
    assert_eq!(r.texts.samples, n);
    // Recall 1.0 exactly: every group named by colour and shape.
    assert_eq!(r.object_recall.long_positive.count, groups);
    assert_eq!(r.object_recall.long_positive.of, groups);
    assert_eq!(r.object_recall.oracle, Some(r.object_recall.long_positive));
    // d+ states nothing false; every attribute it has is correct.
    assert_eq!(r.texts.long_positive_faithful.count, n);
    for (name, a) in &r.texts.attributes {
        assert_eq!(a.wrong, 0, "{name}: {a:?}");
        assert_eq!(a.correct, a.applicable, "{name}: {a:?}");
    }
    for key in ["color", "shape", "size", "count", "background_pattern"] {
        assert_eq!(r.texts.attributes[key].applicable, n, "{key}");
    }
    assert!(r.texts.attributes["relation"].applicable > 0);
    // d- contradicts the scene every time, and is plausible.
    assert_eq!(r.texts.long_negative.contradicts.count, n);
    assert_eq!(r.texts.long_negative.contradicts.of, n);
    assert_eq!(r.texts.long_negative.plausible.count, n);
    assert_eq!(r.texts.long_negative.equal_to_positive, 0);
    // Tags: every checkable t+ true, every t- checkable and false.
    let tp = &r.texts.tags_positive;
    assert!(tp.checkable > 2 * n, "{tp:?}");
    assert_eq!((tp.true_, tp.false_), (tp.checkable, 0));
    assert!(
        tp.uncheckable > 0,
        "generic tags such as `geometric shapes`"
    );
    let tn = &r.texts.tags_negative;
    assert_eq!((tn.checkable, tn.uncheckable), (tn.tags, 0));
    assert_eq!((tn.false_, tn.true_), (tn.tags, 0));
    assert_eq!(tn.correct.rate, Some(1.0));
    // Copying the alt-text recalls far fewer groups, on the same samples.
    let alt = r.object_recall.alt_text_same_samples;
    assert_eq!(alt, r.object_recall.alt_text);
    assert_eq!(alt.of, groups);
    let alt_rate = alt.rate.expect("rate");
    assert!(alt_rate > 0.05 && alt_rate < 0.5, "{alt:?}");
}

/// A twelve-sample recaption shard, one planted fault per sample (see the table in the test).
#[test]
fn known_faults_are_counted_exactly() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut samples = Vec::new();
    let mut groups_of = Vec::new();
    let model = |js: &mut Value| {
        js["hq_clip"]["source"] = json!("model:test");
    };
    let mut wrong_color_groups = 0;
    let mut tag_fault_done = false;
    for i in 0..12u64 {
        let (key, img, txt, mut js, scene) = corpus_sample(i);
        groups_of.push(scene.groups.len() as u64);
        let g0 = scene.groups[0];
        match i {
            // 0: clean model texts (the oracle's, relabelled).
            0 => model(&mut js),
            // 1: d+ gives the first group a colour no group of its shape has.
            1 => {
                model(&mut js);
                let wrong = synth::scene::Color::ALL
                    .iter()
                    .find(|c| {
                        !scene
                            .groups
                            .iter()
                            .any(|g| (g.shape, g.color) == (g0.shape, **c))
                    })
                    .expect("a free colour");
                js["hq_clip"]["long_positive"] = json!(format!(
                    "The image shows a {} {}.",
                    wrong.name(),
                    g0.shape.name()
                ));
                wrong_color_groups = scene.groups.len() as u64;
            }
            // 2: d- equal to d+.
            2 => {
                model(&mut js);
                js["hq_clip"]["long_negative"] = js["hq_clip"]["long_positive"].clone();
            }
            // 3: no hq_clip at all.
            3 => {
                js.as_object_mut().expect("object").remove("hq_clip");
            }
            // 4: the answer failed: hq_clip_error beside the input's oracle texts.
            4 => {
                js["hq_clip_error"] = json!({
                    "reason": "format: missing field \"Tags\"",
                    "raw_answer": "Long description: a thing",
                    "attempts": 2
                });
            }
            // 5: a false t+ tag (a shape the scene lacks) and a true t- tag.
            5 => {
                model(&mut js);
                let absent = synth::scene::Shape::ALL
                    .iter()
                    .find(|s| !scene.groups.iter().any(|g| g.shape == **s))
                    .expect("an absent shape");
                let tags_p = js["hq_clip"]["tags_positive"].as_array_mut().expect("tags");
                tags_p.push(json!(absent.name()));
                let tags_n = js["hq_clip"]["tags_negative"].as_array_mut().expect("tags");
                tags_n.push(json!(format!("{} {}", g0.color.name(), g0.shape.name())));
                tag_fault_done = true;
            }
            // 6: malformed hq_clip (no long_negative): the reader rejects the sample.
            6 => {
                js["hq_clip"]
                    .as_object_mut()
                    .expect("object")
                    .remove("long_negative");
            }
            // 7: the input's oracle texts passed through, not recaptioned.
            7 => {}
            // 8: model texts but no ground truth.
            8 => {
                model(&mut js);
                js.as_object_mut().expect("object").remove("scene");
            }
            // 9: damaged JSON (handled below).
            9 => {}
            // 10: an empty field.
            10 => {
                model(&mut js);
                js["hq_clip"]["long_positive"] = json!("");
            }
            // 11: d- differs but states nothing false (and names no coloured object).
            _ => {
                model(&mut js);
                js["hq_clip"]["long_negative"] = json!("The image shows some shapes.");
            }
        }
        let bytes = if i == 9 {
            b"{\"scene\": not json".to_vec()
        } else {
            serde_json::to_vec(&js).expect("json")
        };
        samples.push((key, img, txt, bytes));
    }
    assert!(tag_fault_done);
    let shard = dir.path().join("recap-00000.tar");
    write_shard(&shard, &samples);
    let summary = dir.path().join("summary-00000-of-00001.json");
    std::fs::write(
        &summary,
        r#"{"samples": 12, "ok": 7, "retried": 6, "errors": {"format": 1}}"#,
    )
    .expect("summary");
    let r = evaluate(&[shard], vec![summary]);

    assert_eq!(r.mode, "recaption");
    assert_eq!(r.samples, 12);
    assert_eq!(r.other_errors, 1, "{:?}", r.examples.other_errors);
    assert_eq!(r.format_errors, 5, "{:?}", r.format.errors);
    assert_eq!(r.with_texts, 6);
    assert_eq!(r.samples, r.with_texts + r.format_errors + r.other_errors);
    let kinds: Vec<(&str, u64)> = r
        .format
        .errors
        .iter()
        .map(|(k, v)| (k.as_str(), *v))
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("empty_field", 1),
            ("hq_clip_error:format", 1),
            ("invalid_hq_clip", 1),
            ("missing_hq_clip", 1),
            ("not_recaptioned", 1),
        ]
    );
    assert_eq!(r.format.success.count, 6);
    assert_eq!(r.format.success.of, 12);
    assert_eq!(r.sources.get("model:test"), Some(&7));
    assert_eq!(r.sources.get("oracle"), Some(&2));
    assert_eq!(r.no_ground_truth, 1);
    // First attempt: min(ok 7, samples 12 - retried 6) = 6.
    let fa = r.format.first_attempt.as_ref().expect("first attempt");
    assert_eq!((fa.success.count, fa.success.of), (6, 12));
    assert_eq!(fa.method, "min(ok, samples - retried)");

    // Content: samples 0, 1, 2, 5, 11.
    let judged = [0usize, 1, 2, 5, 11];
    assert_eq!(r.texts.samples, 5);
    let all: u64 = judged.iter().map(|&i| groups_of[i]).sum();
    assert_eq!(r.object_recall.long_positive.of, all);
    assert_eq!(
        r.object_recall.long_positive.count,
        all - wrong_color_groups
    );
    let color = &r.texts.attributes["color"];
    assert_eq!((color.applicable, color.wrong, color.correct), (5, 1, 4));
    assert_eq!(r.texts.attributes["shape"].wrong, 0);
    assert_eq!(r.texts.long_positive_faithful.count, 4);
    let neg = &r.texts.long_negative;
    assert_eq!((neg.contradicts.count, neg.contradicts.of), (3, 5));
    assert_eq!(neg.equal_to_positive, 1);
    assert_eq!((neg.plausible.count, neg.plausible.of), (4, 5));
    assert_eq!(r.texts.tags_positive.false_, 1);
    assert_eq!(r.texts.tags_negative.true_, 1);
    assert_eq!(
        r.texts.tags_positive.correct.count + 1,
        r.texts.tags_positive.checkable
    );
    assert_eq!(
        r.texts.tags_negative.correct.count + 1,
        r.texts.tags_negative.checkable
    );
    // The oracle texts left on samples 4 and 7 are the ceiling.
    let oracle = r.oracle.as_ref().expect("oracle block");
    assert_eq!(oracle.samples, 2);
    assert_eq!(oracle.object_recall.count, oracle.object_recall.of);
    assert_eq!(oracle.long_negative.contradicts.count, 2);
    // Examples name the faulty samples.
    let neg_keys: Vec<&str> = r
        .examples
        .long_negative_not_contradicting
        .iter()
        .map(|e| e.key.as_str())
        .collect();
    assert_eq!(neg_keys, vec!["000000002", "000000011"]);
    assert_eq!(r.examples.long_positive_false.len(), 1);
    assert_eq!(r.examples.long_positive_false[0].key, "000000001");
}

/// `retried_ok`, when the summary has it, gives first-attempt success exactly; summaries add up.
#[test]
fn recap_summaries_sum_and_prefer_retried_ok() {
    let dir = tempfile::tempdir().expect("tmp");
    let a = dir.path().join("a.json");
    let b = dir.path().join("b.json");
    std::fs::write(
        &a,
        r#"{"samples": 10, "ok": 9, "retried": 3, "retried_ok": 2}"#,
    )
    .expect("a");
    std::fs::write(
        &b,
        r#"{"samples": 10, "ok": 10, "retried": 1, "retried_ok": 1}"#,
    )
    .expect("b");
    let s = quality::read_recap_summaries(&[a.clone(), b])
        .expect("read")
        .expect("some");
    assert_eq!(
        (s.samples, s.ok, s.retried, s.retried_ok),
        (20, 19, 4, Some(3))
    );
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"images": 3}"#).expect("bad");
    let e = quality::read_recap_summaries(&[a, bad]).expect_err("no counts");
    assert!(e.to_string().contains("\"samples\""), "{e}");
}

fn hq_data(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_hq-data"))
        .args(args)
        .env("HQ_NO_PROGRESS", "1")
        .output()
        .expect("run hq-data")
}

/// `hq-data synth` then `hq-data quality`: the three files, the JSON's fields.
#[test]
fn cli_writes_json_markdown_and_chart() {
    let dir = tempfile::tempdir().expect("tmp");
    let corpus = dir.path().join("corpus");
    let c = corpus.to_str().expect("utf-8");
    let o = hq_data(&[
        "synth",
        "--out",
        c,
        "--samples",
        "80",
        "--eval-samples",
        "0",
        "--image-size",
        "32",
        "--no-progress",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary = dir.path().join("summary.json");
    std::fs::write(&summary, r#"{"samples": 80, "ok": 80, "retried": 0}"#).expect("summary");
    let out = dir.path().join("report");
    let o = hq_data(&[
        "quality",
        c,
        "--out",
        out.to_str().expect("utf-8"),
        "--name",
        "oracle-80",
        "--recap-summary",
        summary.to_str().expect("utf-8"),
        "--no-progress",
    ]);
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        text.contains("| format success (samples) | 100.0% | 80 / 80 |"),
        "{text}"
    );
    for f in ["quality.json", "quality.md", "quality.png"] {
        let p = out.join(f);
        assert!(
            p.metadata().map(|m| m.len() > 0).unwrap_or(false),
            "{} missing",
            p.display()
        );
    }
    let png = std::fs::read(out.join("quality.png")).expect("png");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let v: Value = serde_json::from_slice(&std::fs::read(out.join("quality.json")).expect("json"))
        .expect("parse");
    assert_eq!(v["name"], "oracle-80");
    assert_eq!(v["mode"], "oracle");
    assert_eq!(v["samples"], 80);
    for ptr in [
        "/with_texts",
        "/format_errors",
        "/other_errors",
        "/no_ground_truth",
        "/sources/oracle",
        "/format/success/rate",
        "/format/first_attempt/success/rate",
        "/object_recall/long_positive/rate",
        "/object_recall/alt_text/rate",
        "/object_recall/alt_text_same_samples/count",
        "/object_recall/oracle/rate",
        "/texts/attributes/color/correct",
        "/texts/attributes/relation/not_stated",
        "/texts/long_positive_faithful/rate",
        "/texts/long_negative/contradicts/rate",
        "/texts/long_negative/plausible/rate",
        "/texts/tags_positive/correct/rate",
        "/texts/tags_negative/uncheckable",
        "/examples/format_errors",
    ] {
        assert!(
            v.pointer(ptr).is_some_and(|x| !x.is_null()),
            "{ptr} in {v:#}"
        );
    }
    assert_eq!(v["object_recall"]["long_positive"]["rate"], 1.0);
    assert_eq!(v["texts"]["long_negative"]["contradicts"]["rate"], 1.0);
    let md = std::fs::read_to_string(out.join("quality.md")).expect("md");
    assert!(
        md.contains("| attribute | applicable | correct | wrong | not stated |"),
        "{md}"
    );

    // A missing input is an error message, not a panic.
    let o = hq_data(&[
        "quality",
        dir.path().join("nope").to_str().expect("utf-8"),
        "--out",
        out.to_str().expect("utf-8"),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.starts_with("Error: ") && !err.contains("panicked"),
        "{err}"
    );
}

/// First-attempt success read from the shards' per-sample `hq_clip_attempts` (exact across
/// resumed runs), in preference to a summary.
#[test]
fn first_attempts_come_from_the_shards_when_every_sample_has_them() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut samples = Vec::new();
    for i in 0..10u64 {
        let (key, img, txt, mut js, _) = corpus_sample(i);
        js["hq_clip"]["source"] = json!("model:test");
        js["hq_clip_attempts"] = json!(if i < 7 { 1 } else { 2 });
        samples.push((key, img, txt, serde_json::to_vec(&js).expect("json")));
    }
    let shard = dir.path().join("shard-00000.tar");
    write_shard(&shard, &samples);
    let r = evaluate(&[shard], vec![]);
    let fa = r.format.first_attempt.as_ref().expect("first attempt");
    assert_eq!((fa.success.count, fa.success.of), (7, 10));
    assert!(fa.method.contains("hq_clip_attempts"), "{}", fa.method);
}
