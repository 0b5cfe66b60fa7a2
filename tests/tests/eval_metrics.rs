//! hq-eval's WILDS / fairness / WinoGAViL metrics against the computations DataComp's eval_utils
//! run (sklearn macro F1 and recall over the labels in y_true, WILDS group accuracy with
//! DataComp's float32 scatter, `torch.topk` top-5 worst group, numpy argsort + sklearn Jaccard),
//! re-run by tests/python/eval_metrics_reference.py on random data. Runtime: about 3 s.

use std::process::Command;

use hq_eval::metrics;
use hq_tests::{python, workspace_root};
use rand::{Rng, SeedableRng};

fn close(a: f64, b: &serde_json::Value, what: &str) {
    let b = b
        .as_f64()
        .unwrap_or_else(|| panic!("{what}: reference is {b}"));
    assert!((a - b).abs() < 1e-6, "{what}: ours {a} vs reference {b}");
}

#[test]
fn wilds_fairness_and_winogavil_metrics_match_reference() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let (n, classes) = (400usize, 12usize);
    let logits: Vec<f32> = (0..n * classes).map(|_| rng.gen::<f32>()).collect();
    let targets: Vec<usize> = (0..n).map(|_| rng.gen_range(0..classes - 2)).collect();
    let pred = metrics::argmax_rows(&logits, classes);
    // Group 3 left empty on purpose (WILDS counts it as a group without samples).
    let groups: Vec<i64> = (0..n)
        .map(|_| [0i64, 1, 2, 4, 5][rng.gen_range(0..5)])
        .collect();
    let wino: Vec<(Vec<f32>, Vec<bool>)> = (0..60)
        .map(|_| {
            let size = [5usize, 6, 10, 12][rng.gen_range(0..4)];
            let scores: Vec<f32> = (0..size).map(|_| rng.gen::<f32>()).collect();
            let k = rng.gen_range(1..size.min(5));
            let mut truth = vec![false; size];
            for t in truth.iter_mut().take(k) {
                *t = true;
            }
            for i in (1..size).rev() {
                truth.swap(i, rng.gen_range(0..=i));
            }
            (scores, truth)
        })
        .collect();
    let input = serde_json::json!({
        "targets": targets,
        "predictions": pred,
        "groups": groups,
        "logits": logits.chunks(classes).map(|r| r.to_vec()).collect::<Vec<_>>(),
        "wino": wino.iter().map(|(s, t)| serde_json::json!({"scores": s, "truth": t})).collect::<Vec<_>>(),
    });
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (inp, out) = (tmp.path().join("in.json"), tmp.path().join("out.json"));
    std::fs::write(&inp, input.to_string()).unwrap_or_else(|e| panic!("{e}"));
    let o = Command::new(python())
        .arg(workspace_root().join("tests/python/eval_metrics_reference.py"))
        .arg(&inp)
        .arg(&out)
        .output()
        .unwrap_or_else(|e| panic!("cannot run python: {e}"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap_or_default())
            .unwrap_or_else(|e| panic!("{e}"));

    let (f1, recall) = metrics::macro_f1_recall(&targets, &pred);
    close(f1, &r["f1_macro"], "F1-macro_all");
    close(recall, &r["recall_macro"], "recall-macro_all");

    let correct: Vec<bool> = pred.iter().zip(&targets).map(|(p, t)| p == t).collect();
    let (avg, per, worst) = metrics::group_scores(&correct, &groups);
    close(avg, &r["groups"]["avg"], "acc_avg");
    close(worst.unwrap_or(f64::NAN), &r["groups"]["worst"], "acc_wg");
    let ref_groups = r["groups"]["groups"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(per.len(), ref_groups.len());
    for (g, rg) in per.iter().zip(&ref_groups) {
        match g.value {
            Some(v) => close(v, rg, &format!("acc group {}", g.group)),
            None => assert!(rg.is_null(), "group {} empty here, {rg} there", g.group),
        }
    }

    let top: Vec<bool> = metrics::topk_rows(&logits, classes, 5)
        .iter()
        .zip(&targets)
        .map(|(t, y)| t.contains(y))
        .collect();
    let (avg5, _, worst5) = metrics::group_scores(&top, &groups);
    close(avg5, &r["top5_groups"]["avg"], "acc_top5_avg");
    close(
        worst5.unwrap_or(f64::NAN),
        &r["top5_groups"]["worst"],
        "acc_top5_wg",
    );

    let scored: Vec<(usize, f64)> = wino
        .iter()
        .map(|(s, t)| {
            let n_assoc = t.iter().filter(|&&b| b).count();
            let p = metrics::winogavil_prediction(s, n_assoc);
            (s.len(), metrics::jaccard(t, &p))
        })
        .collect();
    let mean = |f: &dyn Fn(usize) -> bool| {
        let v: Vec<f64> = scored
            .iter()
            .filter(|(n, _)| f(*n))
            .map(|(_, s)| *s)
            .collect();
        v.iter().sum::<f64>() / v.len() as f64
    };
    close(
        mean(&|_| true),
        &r["wino"]["avg_jaccard_score"],
        "avg_jaccard_score",
    );
    close(
        mean(&|n| n <= 6),
        &r["wino"]["jaccard_score_5-6"],
        "jaccard_score_5-6",
    );
    close(
        mean(&|n| n >= 10),
        &r["wino"]["jaccard_score_10-12"],
        "jaccard_score_10-12",
    );
}
