//! The ablation table and chart: built-in evaluation reports of several variants (and seeds) side
//! by side, each metric as the mean over seeds with its spread (sample standard deviation, and
//! min..max), plus the change of the headline mean against the first variant.

use std::collections::BTreeMap;
use std::path::Path;

use hq_eval::BuiltinReport;
use plotters::prelude::*;

use crate::TrainError;

/// The table's columns: (summary key, header). ARO values fall back to the plain accuracy key
/// when the macro accuracy was not computed (see `BuiltinReport::summary`).
pub const COLUMNS: [(&str, &str); 7] = [
    ("synth_shape/acc1", "shape acc"),
    ("synth_color/acc1", "colour acc"),
    ("synth_count/acc1", "count acc"),
    ("synth_retrieval/mean_r1", "retrieval R@1"),
    ("synth_aro_attribute", "ARO attribute"),
    ("synth_aro_relation", "ARO relation"),
    ("builtin/mean", "mean"),
];

/// Diagnostics (issue 16), reported under the table when every report has them: whether the
/// image embeddings hold the shape at all (a linear probe) and whether the text tower tells the
/// shape prompts apart (their mean pairwise cosine; near 1 = one point). Not percentages of
/// the same kind as the table's, so not in the headline mean.
pub const DIAGNOSTICS: [(&str, &str); 4] = [
    ("synth_shape/probe_acc1", "shape linear probe, %"),
    ("synth_shape/prompt_cosine", "shape prompts' mean cosine"),
    ("synth_color/prompt_cosine", "colour prompts' mean cosine"),
    ("synth_count/probe_acc1", "count linear probe, %"),
];

/// One report: which variant, which seed.
#[derive(Debug, Clone)]
pub struct AblationRun {
    pub variant: String,
    pub seed: String,
    pub report: BuiltinReport,
}

fn value(report: &BuiltinReport, key: &str) -> Option<f64> {
    report
        .summary()
        .into_iter()
        .find(|(k, _)| k == key || k.starts_with(&format!("{key}/")))
        .map(|(_, v)| v)
}

/// Mean, sample standard deviation (0 for one value), min, max.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stat {
    pub mean: f64,
    pub std: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

fn stat(v: &[f64]) -> Stat {
    let n = v.len();
    let mean = v.iter().sum::<f64>() / n.max(1) as f64;
    let var = if n > 1 {
        v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64
    } else {
        0.0
    };
    Stat {
        mean,
        std: var.sqrt(),
        min: v.iter().copied().fold(f64::INFINITY, f64::min),
        max: v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        n,
    }
}

/// Per variant (in first-seen order), per column: the statistics over seeds.
pub fn aggregate(runs: &[AblationRun]) -> Result<Vec<(String, Vec<Stat>)>, TrainError> {
    aggregate_keys(runs, &COLUMNS)
}

/// [`aggregate`] over [`DIAGNOSTICS`]; `None` when some report lacks them (written before
/// hq-eval computed them).
pub fn aggregate_diagnostics(runs: &[AblationRun]) -> Option<Vec<(String, Vec<Stat>)>> {
    aggregate_keys(runs, &DIAGNOSTICS).ok()
}

fn aggregate_keys(
    runs: &[AblationRun],
    columns: &[(&str, &str)],
) -> Result<Vec<(String, Vec<Stat>)>, TrainError> {
    let mut order: Vec<String> = Vec::new();
    let mut by_variant: BTreeMap<String, Vec<&AblationRun>> = BTreeMap::new();
    for r in runs {
        if !order.contains(&r.variant) {
            order.push(r.variant.clone());
        }
        by_variant.entry(r.variant.clone()).or_default().push(r);
    }
    order
        .into_iter()
        .map(|variant| {
            let rs = &by_variant[&variant];
            let stats = columns
                .iter()
                .map(|(key, _)| {
                    let vals: Vec<f64> = rs
                        .iter()
                        .map(|r| {
                            value(&r.report, key).ok_or_else(|| {
                                TrainError::Eval(format!(
                                    "the report of {variant} seed {} has no {key}",
                                    r.seed
                                ))
                            })
                        })
                        .collect::<Result<_, _>>()?;
                    Ok(stat(&vals))
                })
                .collect::<Result<Vec<_>, TrainError>>()?;
            Ok((variant, stats))
        })
        .collect()
}

/// The Markdown table (values in %).
pub fn markdown(runs: &[AblationRun]) -> Result<String, TrainError> {
    let agg = aggregate(runs)?;
    let seeds: Vec<String> = {
        let mut s: Vec<String> = runs.iter().map(|r| r.seed.clone()).collect();
        s.sort();
        s.dedup();
        s
    };
    let mut md = format!(
        "Built-in held-out sets, % (mean over {} seed(s): {}{}).\n\n",
        seeds.len(),
        seeds.join(", "),
        if seeds.len() > 1 {
            "; ± sample standard deviation, [min..max]"
        } else {
            ""
        }
    );
    md.push_str("| variant |");
    for (_, h) in COLUMNS {
        md.push_str(&format!(" {h} |"));
    }
    md.push_str(" Δ mean |\n|---|");
    for _ in 0..=COLUMNS.len() {
        md.push_str("---:|");
    }
    md.push('\n');
    let base = agg.first().map(|(_, s)| s[COLUMNS.len() - 1].mean);
    for (variant, stats) in &agg {
        md.push_str(&format!("| {variant} |"));
        for s in stats {
            if s.n > 1 {
                md.push_str(&format!(
                    " {:.1} ± {:.1} [{:.1}..{:.1}] |",
                    100.0 * s.mean,
                    100.0 * s.std,
                    100.0 * s.min,
                    100.0 * s.max
                ));
            } else {
                md.push_str(&format!(" {:.1} |", 100.0 * s.mean));
            }
        }
        let d = base
            .map(|b| stats[COLUMNS.len() - 1].mean - b)
            .unwrap_or(0.0);
        md.push_str(&format!(" {:+.1} |\n", 100.0 * d));
    }
    if let Some(diag) = aggregate_diagnostics(runs) {
        md.push_str("\nDiagnostics (mean over seeds; cosines as is, probes in %):\n\n| variant |");
        for (_, h) in DIAGNOSTICS {
            md.push_str(&format!(" {h} |"));
        }
        md.push_str("\n|---|");
        for _ in DIAGNOSTICS {
            md.push_str("---:|");
        }
        md.push('\n');
        for (variant, stats) in &diag {
            md.push_str(&format!("| {variant} |"));
            for ((key, _), s) in DIAGNOSTICS.iter().zip(stats) {
                if BuiltinReport::summary_value_is_cosine(key) {
                    md.push_str(&format!(" {:.4} |", s.mean));
                } else {
                    md.push_str(&format!(" {:.1} |", 100.0 * s.mean));
                }
            }
            md.push('\n');
        }
    }
    Ok(md)
}

/// The table's figures as JSON (fractions, not %): per variant and column the statistics over
/// seeds and every seed's value, plus the diagnostics when present.
pub fn json(runs: &[AblationRun]) -> Result<serde_json::Value, TrainError> {
    let section = |columns: &[(&str, &str)], agg: &[(String, Vec<Stat>)]| {
        let mut variants = serde_json::Map::new();
        for (variant, stats) in agg {
            let mut cols = serde_json::Map::new();
            for ((key, header), s) in columns.iter().zip(stats) {
                let values: Vec<serde_json::Value> = runs
                    .iter()
                    .filter(|r| &r.variant == variant)
                    .map(|r| serde_json::json!({"seed": r.seed, "value": value(&r.report, key)}))
                    .collect();
                cols.insert(
                    key.to_string(),
                    serde_json::json!({"header": header, "mean": s.mean, "std": s.std,
                                       "min": s.min, "max": s.max, "n": s.n, "values": values}),
                );
            }
            variants.insert(variant.clone(), serde_json::Value::Object(cols));
        }
        serde_json::Value::Object(variants)
    };
    let mut out = serde_json::json!({ "table": section(&COLUMNS, &aggregate(runs)?) });
    if let Some(diag) = aggregate_diagnostics(runs) {
        out["diagnostics"] = section(&DIAGNOSTICS, &diag);
    }
    Ok(out)
}

const COLORS: [RGBColor; 6] = [
    RGBColor(127, 127, 127),
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
];

/// A grouped bar chart: one group per metric, one bar per variant (mean over seeds, whiskers
/// min..max when there are several).
pub fn chart(runs: &[AblationRun], out: &Path) -> Result<(), TrainError> {
    let agg = aggregate(runs)?;
    let nv = agg.len().max(1);
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        let root = BitMapBackend::new(out, (1100, 560)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "HQ-CLIP ablation on the built-in corpus",
                ("sans-serif", 22),
            )
            .margin(14)
            .x_label_area_size(40)
            .y_label_area_size(55)
            .build_cartesian_2d(0f64..COLUMNS.len() as f64, 0f64..100f64)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(COLUMNS.len() * 2 + 1)
            .x_label_formatter(&|x| {
                let i = x.floor() as usize;
                if (x - i as f64 - 0.5).abs() < 1e-6 && i < COLUMNS.len() {
                    COLUMNS[i].1.to_string()
                } else {
                    String::new()
                }
            })
            .y_desc("%")
            .draw()?;
        let width = 0.8 / nv as f64;
        for (vi, (variant, stats)) in agg.iter().enumerate() {
            let color = COLORS[vi % COLORS.len()];
            for (ci, s) in stats.iter().enumerate() {
                let x0 = ci as f64 + 0.1 + vi as f64 * width;
                let rect = Rectangle::new(
                    [(x0, 0.0), (x0 + width * 0.9, 100.0 * s.mean)],
                    color.filled(),
                );
                let series = chart.draw_series(std::iter::once(rect))?;
                if ci == 0 {
                    series.label(variant.clone()).legend(move |(x, y)| {
                        Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled())
                    });
                }
                if s.n > 1 {
                    let xm = x0 + width * 0.45;
                    chart.draw_series(std::iter::once(PathElement::new(
                        vec![(xm, 100.0 * s.min), (xm, 100.0 * s.max)],
                        BLACK.stroke_width(1),
                    )))?;
                }
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| TrainError::Io {
        path: out.display().to_string(),
        reason: format!("cannot draw the chart: {e}"),
    })
}

/// Reads a built-in evaluation report (`hq-eval builtin --out`, or a run's `eval/step-N.json`).
pub fn read_report(path: &Path) -> Result<BuiltinReport, TrainError> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    serde_json::from_str(&text).map_err(|e| TrainError::Io {
        path: path.display().to_string(),
        reason: format!("not a built-in evaluation report: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(shape: f64, probe: Option<f64>) -> BuiltinReport {
        let class = |name: &str, acc: f64| {
            serde_json::json!({"name": name, "acc1": acc, "acc5": null, "mean_per_class_recall": acc,
                               "classes": 8, "samples": 100, "bad_samples": 0,
                               "class_prompt_cosine": probe.map(|_| 0.99),
                               "linear_probe_acc1": probe})
        };
        let aro = |name: &str| {
            serde_json::json!({"name": name, "macro_accuracy": 0.5, "accuracy": 0.5, "groups": 4,
                               "samples": 100, "bad_samples": 0})
        };
        serde_json::from_value(serde_json::json!({
            "model": "m", "eval_dir": "e",
            "classification": [class("synth_shape", shape), class("synth_color", 0.9),
                               class("synth_count", 0.4)],
            "retrieval": {"name": "synth_retrieval", "image_recall_at_1": 0.1,
                          "text_recall_at_1": 0.1, "image_recall_at_5": 0.2, "text_recall_at_5": 0.2,
                          "image_recall_at_10": 0.3, "text_recall_at_10": 0.3,
                          "mean_recall_at_1": 0.1, "images": 100, "texts": 200, "bad_samples": 0},
            "aro_attribute": aro("synth_aro_attribute"), "aro_relation": aro("synth_aro_relation"),
            "attribute_min_count": 1, "seconds": 1.0, "bad": {"count": 0, "examples": []}
        }))
        .expect("report")
    }

    fn run(variant: &str, seed: &str, shape: f64, probe: Option<f64>) -> AblationRun {
        AblationRun {
            variant: variant.into(),
            seed: seed.into(),
            report: report(shape, probe),
        }
    }

    #[test]
    fn table_json_and_diagnostics() {
        let runs = [
            run("mixed", "0", 0.125, Some(0.15)),
            run("mixed", "1", 0.135, Some(0.17)),
            run("hni", "0", 0.30, Some(0.40)),
            run("hni", "1", 0.40, Some(0.50)),
        ];
        let md = markdown(&runs).expect("markdown");
        assert!(md.contains("| hni | 35.0 ± 7.1 [30.0..40.0] |"), "{md}");
        assert!(md.contains("shape linear probe"), "{md}");
        assert!(md.contains("| hni | 45.0 | 0.9900 |"), "{md}");
        let j = json(&runs).expect("json");
        let shape = &j["table"]["hni"]["synth_shape/acc1"];
        assert_eq!(shape["n"], 2);
        assert_eq!(shape["values"][1]["seed"], "1");
        assert!((shape["mean"].as_f64().unwrap_or(0.0) - 0.35).abs() < 1e-12);
        assert!(j["diagnostics"]["mixed"]["synth_shape/probe_acc1"]["mean"].is_number());
        // Reports from before the diagnostics: the table alone.
        let old = [run("mixed", "0", 0.125, None)];
        assert!(!markdown(&old).expect("markdown").contains("Diagnostics"));
        assert!(json(&old).expect("json").get("diagnostics").is_none());
    }
}
