//! The `hq-data` binary end to end: `synth` writes a corpus, `stats` reads it back, errors are
//! reported (not panics).

use std::path::Path;
use std::process::{Command, Output};

fn hq_data(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hq-data"))
        .args(args)
        .env("HQ_NO_PROGRESS", "1")
        .output()
        .expect("run hq-data")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn synth_then_stats() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("corpus");
    let out_s = out.to_str().expect("utf-8");
    let o = hq_data(&[
        "synth",
        "--out",
        out_s,
        "--samples",
        "300",
        "--shard-size",
        "128",
        "--eval-samples",
        "30",
        "--format",
        "png",
        "--image-size",
        "48",
        "--seed",
        "42",
        "--no-progress",
    ]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("samples/s"), "{t}");
    assert!(t.contains("samples: 300 in 3 shard(s)"), "{t}");
    assert!(t.contains("48x48"), "{t}");
    for p in [
        "corpus.json",
        "train/shard-00000.tar",
        "train/shard-00002.tar",
        "eval/wds_synth_shape_test/test/0.tar",
        "eval/wds_synth_color_test/classnames.txt",
        "eval/wds_synth_count_test/zeroshot_classification_templates.txt",
        "eval/wds_synth_retrieval_test/dataset_type.txt",
        "eval/aro/synth_aro_attribute/visual_genome_attribution.json",
        "eval/aro/synth_aro_relation/visual_genome_relation.json",
        "eval/aro/synth_aro_relation/images/000000.png",
    ] {
        assert!(out.join(p).is_file(), "{p} missing");
    }
    assert!(!out.join("train/shard-00003.tar").exists());

    // Writing again into the same folder is refused without --force.
    let again = hq_data(&["synth", "--out", out_s, "--samples", "10", "--no-progress"]);
    assert!(!again.status.success());
    assert!(text(&again).contains("--force"), "{}", text(&again));

    let s = hq_data(&["stats", out_s, "--no-progress"]);
    let st = text(&s);
    assert!(s.status.success(), "{st}");
    assert!(st.contains("samples: 300 in 3 shard(s)"), "{st}");
    assert!(st.contains("eval sets:"), "{st}");
    assert!(st.contains("raw text kinds:"), "{st}");

    let spec = format!("{}/train/shard-{{00000..00001}}.tar", out_s);
    let s = hq_data(&["stats", &spec, "--json", "--no-progress"]);
    assert!(s.status.success(), "{}", text(&s));
    let v: serde_json::Value = serde_json::from_slice(&s.stdout).expect("json");
    assert_eq!(v["samples"], 256);
    assert_eq!(v["shards"], 2);
    assert!(v["tag_vocabulary"].as_u64().is_some_and(|n| n > 20));
}

#[test]
fn help_explains_every_option() {
    let o = hq_data(&["synth", "--help"]);
    let t = text(&o);
    assert!(o.status.success());
    for opt in [
        "--out",
        "--samples",
        "--seed",
        "--shard-size",
        "--image-size",
        "--format",
        "--jpeg-quality",
        "--eval-samples",
        "--eval-shard-size",
        "--p-faithful",
        "--p-partial",
        "--p-boilerplate",
        "--p-wrong",
        "--p-unrelated",
        "--threads",
        "--force",
        "--negative-rules",
        "--object-scale",
    ] {
        assert!(t.contains(opt), "{opt} missing from help:\n{t}");
    }
    assert!(hq_data(&["stats", "--help"]).status.success());
}

/// A corpus written with other hard-negative rules says so in its manifest (tools/demo.sh reads
/// it to tell such a corpus from a default one).
#[test]
fn negative_rules_are_recorded_in_the_manifest() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("corpus");
    let args = [
        "synth",
        "--out",
        out.to_str().expect("utf-8"),
        "--samples",
        "4",
        "--eval-samples",
        "0",
        "--image-size",
        "16",
        "--negative-rules",
        "shape-binding",
        "--no-progress",
    ];
    let o = hq_data(&args);
    assert!(o.status.success(), "{}", text(&o));
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("corpus.json")).expect("manifest"))
            .expect("json");
    assert_eq!(manifest["config"]["negative_rules"], "shape_binding");
}

/// `--object-scale`: recorded (as written, in the manifest and each sample's JSON) when not 1,
/// left out when 1, refused outside 0.5..=1.7 before anything is written.
#[test]
fn object_scale_is_recorded_and_checked() {
    let dir = tempfile::tempdir().expect("tmp");
    let synth = |out: &Path, scale: &str| {
        hq_data(&[
            "synth",
            "--out",
            out.to_str().expect("utf-8"),
            "--samples",
            "4",
            "--eval-samples",
            "2",
            "--image-size",
            "16",
            "--object-scale",
            scale,
            "--no-progress",
        ])
    };
    let read_json = |p: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(p).expect("read")).expect("json")
    };
    let sample_json = |out: &Path| -> serde_json::Value {
        let members =
            hq_data::synth::evalsets::read_tar_members(&out.join("train/shard-00000.tar"))
                .expect("shard");
        let (_, json) = members
            .iter()
            .find(|(n, _)| n.ends_with(".json"))
            .expect("a sample's JSON");
        serde_json::from_slice(json).expect("json")
    };

    let big = dir.path().join("big");
    let o = synth(&big, "1.6");
    assert!(o.status.success(), "{}", text(&o));
    let text_manifest = std::fs::read_to_string(big.join("corpus.json")).expect("manifest");
    assert!(
        text_manifest.contains("\n    \"object_scale\": 1.6"),
        "tools/demo.sh reads this line:\n{text_manifest}"
    );
    assert_eq!(
        read_json(&big.join("corpus.json"))["config"]["object_scale"],
        1.6
    );
    let sample = sample_json(&big);
    assert_eq!(sample["object_scale"], 1.6);
    // Every radius is at least 1.6 times the unscaled minimum (0.95 * 0.12).
    for o in sample["scene"]["objects"].as_array().expect("objects") {
        assert!(
            o["r"].as_f64().expect("r") > 1.6 * 0.95 * 0.12 - 1e-6,
            "{o}"
        );
    }

    let plain = dir.path().join("plain");
    let o = synth(&plain, "1");
    assert!(o.status.success(), "{}", text(&o));
    assert!(read_json(&plain.join("corpus.json"))["config"]
        .get("object_scale")
        .is_none());
    assert!(sample_json(&plain).get("object_scale").is_none());

    for bad in ["0", "0.4", "1.8", "2", "NaN"] {
        let out = dir.path().join(format!("bad-{bad}"));
        let o = synth(&out, bad);
        assert!(!o.status.success(), "--object-scale {bad} accepted");
        let t = text(&o);
        assert!(
            t.contains("object scale") && t.contains("0.5..=1.7") && !t.contains("panicked"),
            "{t}"
        );
        assert!(!out.join("corpus.json").exists());
    }
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().expect("tmp");
    let missing = dir.path().join("nope/shard-00000.tar");
    let o = hq_data(&["stats", missing.to_str().expect("utf-8"), "--no-progress"]);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(t.contains("Error") && !t.contains("panicked"), "{t}");

    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).expect("mkdir");
    let o = hq_data(&["stats", empty.to_str().expect("utf-8"), "--no-progress"]);
    assert!(
        !o.status.success() && !text(&o).contains("panicked"),
        "{}",
        text(&o)
    );

    let o = hq_data(&[
        "synth",
        "--out",
        dir.path().join("x").to_str().expect("utf-8"),
        "--image-size",
        "3",
        "--no-progress",
    ]);
    assert!(!o.status.success());
    assert!(text(&o).contains("image size"), "{}", text(&o));
    assert!(!Path::new(&dir.path().join("x/corpus.json")).exists());

    let o = hq_data(&["synth", "--format", "gif"]);
    assert!(!o.status.success());
}

#[test]
fn join_and_stats_with_side_car_annotations() {
    let dir = tempfile::tempdir().expect("tmp");
    let corpus = dir.path().join("corpus");
    let o = hq_data(&[
        "synth",
        "--out",
        corpus.to_str().expect("utf-8"),
        "--samples",
        "30",
        "--shard-size",
        "10",
        "--eval-samples",
        "0",
        "--image-size",
        "16",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    // A foreign layout: id under "id", the description under "caption"; every third sample left
    // out, one malformed line per file.
    let train = corpus.join("train");
    let ann = dir.path().join("ann");
    std::fs::create_dir_all(&ann).expect("mkdir");
    let shards =
        hq_data::shards::expand_shard_spec(&format!("{}/*.tar", train.display())).expect("shards");
    for shard in &shards {
        let mut lines = Vec::new();
        let reader = hq_data::shards::ShardReader::new(vec![shard.clone()], Default::default());
        for (i, s) in reader.map(|s| s.expect("sample")).enumerate() {
            if i % 3 != 0 {
                let caption = &s.refined.as_ref().expect("refined").long_positive;
                lines
                    .push(serde_json::json!({"id": s.meta["uid"], "caption": caption}).to_string());
            }
        }
        lines.push("{not json".into());
        let stem = hq_data::shards::annotations::shard_stem(shard);
        std::fs::write(ann.join(format!("{stem}.jsonl")), lines.join("\n")).expect("write");
    }
    let (train_s, ann_s) = (train.to_str().expect("utf-8"), ann.to_str().expect("utf-8"));
    let common = [
        "--annotations",
        ann_s,
        "--annotation-id",
        "uid=id",
        "--annotation-fields",
        "long_positive=caption",
    ];
    let mut args = vec!["stats", train_s, "--json"];
    args.extend(common);
    let o = hq_data(&args);
    assert!(o.status.success(), "{}", text(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(report["counts"]["joined"], 18);
    assert_eq!(report["counts"]["missing"], 12);
    assert_eq!(report["counts"]["bad_records"], 3);

    let out = dir.path().join("joined");
    let mut args = vec!["join", train_s, "--out", out.to_str().expect("utf-8")];
    args.extend(common);
    let o = hq_data(&args);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("18 joined"), "{t}");
    assert!(out.join("shard-00002.tar").is_file());
    // A rerun resumes: nothing left to do.
    let o = hq_data(&args);
    assert!(text(&o).contains("3 already joined"), "{}", text(&o));

    // A mapping that names a field no record has stops with the reason.
    let o = hq_data(&[
        "join",
        train_s,
        "--out",
        dir.path().join("j2").to_str().expect("utf-8"),
        "--annotations",
        ann_s,
        "--annotation-id",
        "uid=id",
        "--annotation-fields",
        "long_positive=description",
    ]);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains("\"description\""), "{t}");
}

/// Fault campaign finding (tools/faults, synth kill trials): a synth killed before its manifest
/// left shards that made the same command refuse to run again ("already holds a corpus"), so the
/// demo could not resume in its corpus stage. The state a kill leaves (shards, no manifest, the
/// marker) is now replaced by a rerun and gives the same bytes; shards without the marker are
/// still refused.
#[test]
fn a_synth_cut_short_is_redone_by_the_same_command() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("corpus");
    let out_s = out.to_str().expect("utf8");
    let args = [
        "synth",
        "--out",
        out_s,
        "--samples",
        "30",
        "--shard-size",
        "10",
        "--eval-samples",
        "4",
        "--no-progress",
    ];
    let first = hq_data(&args);
    assert!(first.status.success(), "{}", text(&first));
    assert!(
        !out.join(".hq-synth-incomplete").exists(),
        "a finished corpus keeps no marker"
    );
    let shard = std::fs::read(out.join("train/shard-00001.tar")).expect("shard");
    let manifest = std::fs::read(out.join("corpus.json")).expect("manifest");

    // What a kill in the eval sets leaves: train shards, part of eval/, the marker, no manifest.
    std::fs::remove_file(out.join("corpus.json")).expect("rm");
    std::fs::remove_dir_all(out.join("eval/aro")).expect("rm");
    std::fs::write(out.join(".hq-synth-incomplete"), "").expect("marker");
    let again = hq_data(&args);
    assert!(again.status.success(), "{}", text(&again));
    assert_eq!(
        std::fs::read(out.join("train/shard-00001.tar")).expect("shard"),
        shard
    );
    assert_eq!(
        std::fs::read(out.join("corpus.json")).expect("manifest"),
        manifest
    );
    assert!(out.join("eval/aro/synth_aro_relation").is_dir());

    // Shards with no marker and no manifest are not known to be ours: refused as before.
    std::fs::remove_file(out.join("corpus.json")).expect("rm");
    let refused = hq_data(&args);
    assert!(!refused.status.success());
    assert!(text(&refused).contains("--force"), "{}", text(&refused));
}
