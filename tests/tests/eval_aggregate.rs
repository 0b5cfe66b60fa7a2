//! hq-eval's aggregates against DataComp's arithmetic (`aggregate_scores.py`, re-run by
//! tests/python/eval_datacomp_aggregate.py) on made-up per-task numbers: all 38 tasks (plus
//! FairFace and UTKFace rows without a main metric, which DataComp drops), then a partial table
//! (every aggregate over the tasks present, and marked partial). Also the registry against
//! DataComp's task list: 38 tasks, their display names and main metrics. Runtime: about 1 s.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::Command;

use hq_eval::results::aggregates;
use hq_eval::tasks::{datacomp_tasks, TaskKind};
use hq_tests::{python, workspace_root};
use rand::{Rng, SeedableRng};

fn datacomp(main: &BTreeMap<String, f64>, partial: bool) -> serde_json::Value {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let jsonl = tmp.path().join("eval_results.jsonl");
    let mut f = std::fs::File::create(&jsonl).unwrap_or_else(|e| panic!("{e}"));
    for (name, v) in main {
        let line = serde_json::json!({"key": name, "dataset": name, "metrics": {"main_metric": v}});
        writeln!(f, "{line}").unwrap_or_else(|e| panic!("{e}"));
    }
    for name in ["FairFace", "UTKFace"] {
        let line =
            serde_json::json!({"key": name, "dataset": name, "metrics": {"acc_race_avg": 0.5}});
        writeln!(f, "{line}").unwrap_or_else(|e| panic!("{e}"));
    }
    drop(f);
    let out = tmp.path().join("agg.json");
    let script = workspace_root().join("tests/python/eval_datacomp_aggregate.py");
    let mut cmd = Command::new(python());
    cmd.arg(&script).arg(&jsonl).arg(&out);
    if partial {
        cmd.arg("--partial");
    }
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run python: {e}"));
    assert!(
        o.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let text = std::fs::read_to_string(&out).unwrap_or_else(|e| panic!("{e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}"))
}

fn check(main: &BTreeMap<String, f64>, partial: bool) {
    let theirs = datacomp(main, partial);
    let ours = aggregates(main);
    let pairs = [
        ("ImageNet", "ImageNet"),
        ("IN-shifts", "ImageNet dist. shifts"),
        ("VTAB", "VTAB"),
        ("Retrieval", "Retrieval"),
        ("Avg", "Average"),
    ];
    for (o, t) in pairs {
        let a = ours
            .iter()
            .find(|x| x.name == o)
            .unwrap_or_else(|| panic!("no aggregate {o}"));
        match (a.value, theirs[t].as_f64()) {
            (Some(x), Some(y)) => assert!((x - y).abs() < 1e-12, "{o}: ours {x} vs DataComp {y}"),
            (None, None) => {}
            (x, y) => panic!("{o}: ours {x:?} vs DataComp {y:?}"),
        }
        assert_eq!(a.partial, a.present < a.total, "{o}");
        assert_eq!(a.missing.len(), a.total - a.present, "{o}");
        if !partial {
            assert!(!a.partial, "{o} is marked partial with every task present");
        }
    }
}

#[test]
fn aggregates_match_datacomp() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let main: BTreeMap<String, f64> = datacomp_tasks()
        .map(|t| (t.name.to_string(), rng.gen::<f64>()))
        .collect();
    assert_eq!(main.len(), 38);
    check(&main, false);
    // Drop some tasks: every aggregate is over those present and marked partial.
    let partial: BTreeMap<String, f64> = main
        .iter()
        .filter(|(k, _)| {
            !["ImageNet-O", "SUN397", "WinoGAViL", "GeoDE", "MNIST"].contains(&k.as_str())
        })
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    check(&partial, true);
    let ours = aggregates(&partial);
    let vtab = ours.iter().find(|a| a.name == "VTAB").map(|a| a.present);
    assert_eq!(vtab, Some(12));
    assert!(ours.iter().filter(|a| a.partial).count() == 4);
}

#[test]
fn registry_matches_datacomp_tasklist() {
    // Main metrics other than acc1 in DataComp's tasklist.yml.
    let special: BTreeMap<&str, &str> = [
        ("Caltech-101", "mean_per_class_recall"),
        ("FGVC Aircraft", "mean_per_class_recall"),
        ("Oxford Flowers-102", "mean_per_class_recall"),
        ("Oxford-IIIT Pet", "mean_per_class_recall"),
        ("Flickr", "mean_recall@1"),
        ("MSCOCO", "mean_recall@1"),
        ("WinoGAViL", "jaccard_score_10-12"),
        ("iWildCam", "F1-macro_all"),
        ("FMoW", "acc_worst_region"),
        ("Dollar Street", "acc_top5_wg"),
        ("GeoDE", "acc_wg"),
    ]
    .into_iter()
    .collect();
    let tasks: Vec<_> = datacomp_tasks().collect();
    assert_eq!(tasks.len(), 38);
    for t in &tasks {
        let expected = special.get(t.name).copied().unwrap_or("acc1");
        assert_eq!(t.main_metric, expected, "{}", t.name);
        if t.kind == TaskKind::Classification {
            // download_evalsets.py: wds_{key with '/' -> '-'}_test
            assert_eq!(
                t.dirs[0],
                format!("wds_{}_test", t.key.replace('/', "-")),
                "{}",
                t.name
            );
        }
    }
}
