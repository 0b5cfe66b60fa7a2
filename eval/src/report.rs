//! Reports: a terminal table and a Markdown table of one run, a side-by-side comparison of several
//! runs (aggregates like the paper's Table 3, then every task), and a PNG bar chart of DataComp's
//! groups. Values are percentages with two decimals; `*` marks a partial aggregate, `-` a task
//! without a value.

use std::path::Path;

use plotters::prelude::*;

use crate::error::EvalError;
use crate::results::{RunResults, TaskStatus};
use crate::tasks::TASKS;

fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{:.2}", 100.0 * v))
}

fn agg_cell(r: &RunResults, name: &str) -> String {
    match r.aggregate(name) {
        Some(a) => {
            let mut s = pct(a.value);
            if a.partial && a.value.is_some() {
                s.push_str(&format!("* ({}/{})", a.present, a.total));
            }
            s
        }
        None => "-".into(),
    }
}

const AGGREGATES: [&str; 5] = ["ImageNet", "IN-shifts", "VTAB", "Retrieval", "Avg"];

/// Plain-text table for the terminal: every task with its main metric, then the aggregates and
/// the list of missing / failed tasks with the reason and where to get the data.
pub fn terminal_table(r: &RunResults) -> String {
    let mut s = format!("model: {} ({})\n", r.model.label, r.model.encoder);
    s.push_str(&format!(
        "{:<28} {:<24} {:>8} {:>9} {:>6}\n",
        "task", "metric", "value", "samples", "bad"
    ));
    s.push_str(&format!("{}\n", "-".repeat(79)));
    for t in &r.tasks {
        let value = match t.status {
            TaskStatus::Done => pct(t.main_value),
            TaskStatus::Failed => "FAILED".into(),
            TaskStatus::Missing => "missing".into(),
        };
        s.push_str(&format!(
            "{:<28} {:<24} {:>8} {:>9} {:>6}\n",
            truncate(&t.name, 28),
            truncate(&t.main_metric, 24),
            value,
            if t.status == TaskStatus::Done {
                t.output.samples.to_string()
            } else {
                String::new()
            },
            if t.status == TaskStatus::Done {
                t.output.bad.count.to_string()
            } else {
                String::new()
            },
        ));
    }
    s.push_str(&format!("{}\n", "-".repeat(79)));
    for name in AGGREGATES {
        s.push_str(&format!("{:<53} {:>8}\n", name, agg_cell(r, name)));
    }
    let partial: Vec<&str> = r
        .aggregates
        .iter()
        .filter(|a| a.partial)
        .map(|a| a.name.as_str())
        .collect();
    if !partial.is_empty() {
        s.push_str(&format!(
            "* partial (tasks missing): {}\n",
            partial.join(", ")
        ));
    }
    let problems: Vec<_> = r
        .tasks
        .iter()
        .filter(|t| t.status != TaskStatus::Done || t.main_value.is_none())
        .collect();
    if !problems.is_empty() {
        s.push_str("\nnot evaluated:\n");
        for t in problems {
            s.push_str(&format!(
                "  {}: {}{}\n",
                t.name,
                t.reason.as_deref().unwrap_or("no value"),
                t.source
                    .as_deref()
                    .map(|src| format!("\n    get it: {src}"))
                    .unwrap_or_default()
            ));
        }
    }
    s
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n.saturating_sub(1)).collect();
        t.push('~');
        t
    }
}

/// Markdown for one run (same content as [`terminal_table`]).
pub fn markdown(r: &RunResults) -> String {
    compare_markdown(std::slice::from_ref(r))
}

/// Markdown comparing runs side by side: an aggregate table (rows = runs; ImageNet, IN-shifts,
/// VTAB, Retrieval, Avg over 38), then every task's main metric (columns = runs, with the change
/// from the first run when there are several).
pub fn compare_markdown(runs: &[RunResults]) -> String {
    let mut s = String::new();
    s.push_str("| model | ImageNet | IN-shifts | VTAB | Retrieval | Avg (38) |\n");
    s.push_str("|---|---:|---:|---:|---:|---:|\n");
    for r in runs {
        s.push_str(&format!("| {} |", r.model.label));
        for name in AGGREGATES {
            s.push_str(&format!(" {} |", agg_cell(r, name)));
        }
        s.push('\n');
    }
    if runs.iter().any(|r| r.aggregates.iter().any(|a| a.partial)) {
        s.push_str("\n`*` partial: the mean is over the tasks present (present/total).\n");
    }
    s.push_str("\n| task | metric |");
    for r in runs {
        s.push_str(&format!(" {} |", r.model.label));
    }
    if runs.len() > 1 {
        for r in &runs[1..] {
            s.push_str(&format!(" Δ {} |", r.model.label));
        }
    }
    s.push_str("\n|---|---|");
    for _ in 0..(runs.len() + runs.len().saturating_sub(1)) {
        s.push_str("---:|");
    }
    s.push('\n');
    for spec in TASKS {
        let values: Vec<Option<f64>> = runs
            .iter()
            .map(|r| {
                r.task(spec.key)
                    .filter(|t| t.status == TaskStatus::Done)
                    .and_then(|t| t.main_value)
            })
            .collect();
        if runs.iter().all(|r| r.task(spec.key).is_none()) {
            continue;
        }
        s.push_str(&format!("| {} | {} |", spec.name, spec.main_metric));
        for v in &values {
            s.push_str(&format!(" {} |", pct(*v)));
        }
        if runs.len() > 1 {
            for v in &values[1..] {
                let d = match (values[0], v) {
                    (Some(a), Some(b)) => format!("{:+.2}", 100.0 * (b - a)),
                    _ => "-".into(),
                };
                s.push_str(&format!(" {d} |"));
            }
        }
        s.push('\n');
    }
    let mut notes = String::new();
    for r in runs {
        for t in r
            .tasks
            .iter()
            .filter(|t| t.status != TaskStatus::Done || t.main_value.is_none())
        {
            notes.push_str(&format!(
                "- {} / {}: {}{}\n",
                r.model.label,
                t.name,
                t.reason.as_deref().unwrap_or("no value"),
                t.source
                    .as_deref()
                    .map(|src| format!(" (get it: {src})"))
                    .unwrap_or_default()
            ));
        }
    }
    if !notes.is_empty() {
        s.push_str("\nNot evaluated:\n\n");
        s.push_str(&notes);
    }
    s
}

/// A PNG bar chart of the group aggregates, one bar per run in each group.
pub fn group_chart(runs: &[RunResults], path: &Path) -> Result<(), EvalError> {
    let fail = |e: &dyn std::fmt::Display| EvalError::Chart {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    if runs.is_empty() {
        return Err(fail(&"no results to draw"));
    }
    let tmp = path.with_file_name(format!(
        ".{}.tmp-{}.png",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    {
        let root = BitMapBackend::new(&tmp, (960, 540)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| fail(&e))?;
        let max = runs
            .iter()
            .flat_map(|r| {
                AGGREGATES
                    .iter()
                    .filter_map(|a| r.aggregate(a).and_then(|x| x.value))
            })
            .fold(0f64, f64::max);
        let top = ((max * 100.0 / 10.0).ceil() * 10.0).clamp(10.0, 100.0);
        let n = runs.len();
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "DataComp groups (main metric, %; * = partial, tasks present/total)",
                ("sans-serif", 20),
            )
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(48)
            .build_cartesian_2d(0f64..AGGREGATES.len() as f64, 0f64..top)
            .map_err(|e| fail(&e))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(AGGREGATES.len() * 2 + 1)
            .x_label_formatter(&|x| {
                let i = x.floor() as usize;
                if (x - x.floor() - 0.5).abs() < 1e-6 && i < AGGREGATES.len() {
                    AGGREGATES[i].to_string()
                } else {
                    String::new()
                }
            })
            .y_desc("%")
            .draw()
            .map_err(|e| fail(&e))?;
        let width = 0.8 / n as f64;
        for (k, r) in runs.iter().enumerate() {
            let color = Palette99::pick(k).to_rgba();
            let bars: Vec<Rectangle<(f64, f64)>> = AGGREGATES
                .iter()
                .enumerate()
                .filter_map(|(i, a)| {
                    let v = r.aggregate(a).and_then(|x| x.value)?;
                    let x0 = i as f64 + 0.1 + k as f64 * width;
                    Some(Rectangle::new(
                        [(x0, 0.0), (x0 + width * 0.95, 100.0 * v)],
                        color.filled(),
                    ))
                })
                .collect();
            chart
                .draw_series(bars)
                .map_err(|e| fail(&e))?
                .label(r.model.label.clone())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled())
                });
            // Value above each bar; `*` marks a mean over fewer tasks than the group has.
            let labels: Vec<Text<'_, (f64, f64), String>> = AGGREGATES
                .iter()
                .enumerate()
                .filter_map(|(i, a)| {
                    let agg = r.aggregate(a)?;
                    let v = agg.value?;
                    let x0 = i as f64 + 0.1 + k as f64 * width;
                    let text = if agg.partial {
                        format!("{:.1}* ({}/{})", 100.0 * v, agg.present, agg.total)
                    } else {
                        format!("{:.1}", 100.0 * v)
                    };
                    Some(Text::new(
                        text,
                        (x0, (100.0 * v + top * 0.035).min(top)),
                        ("sans-serif", 12).into_font(),
                    ))
                })
                .collect();
            chart.draw_series(labels).map_err(|e| fail(&e))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| fail(&e))?;
        root.present().map_err(|e| fail(&e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| EvalError::io(path, e))?;
    Ok(())
}
