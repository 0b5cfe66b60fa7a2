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
            let stats = COLUMNS
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
    Ok(md)
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
