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
    ] {
        assert!(t.contains(opt), "{opt} missing from help:\n{t}");
    }
    assert!(hq_data(&["stats", "--help"]).status.success());
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
