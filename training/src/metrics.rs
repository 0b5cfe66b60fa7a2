//! The run's metrics: one JSON object per line in `metrics.jsonl` (`"kind": "train"` every
//! `log_every` steps, `"kind": "eval"` after each evaluation, `"kind": "skips"` when the loader
//! skipped samples), and the loss and learning-rate curves drawn from it as PNGs at the end.
//! With side-car annotations a train record carries `annotations` (joined, missing, orphan,
//! bad_records, missing_files, summed over ranks); with a mixture, `source_samples` (samples each
//! source gave so far, keyed by source index).
//!
//! On resume the file is cut back to the checkpoint's step (atomically), so the log of a resumed
//! run equals the uninterrupted run's. Every record gets a `time` (Unix seconds) and is mirrored to
//! a TensorBoard event file in `tb/` beside the log ([`crate::tensorboard`]).

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde_json::Value;

use crate::tensorboard::EventFile;
use crate::TrainError;

fn io(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// Appends JSON lines to `metrics.jsonl` and their scalars to the TensorBoard mirror.
pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
    events: EventFile,
}

/// Seconds since the Unix epoch.
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Where the TensorBoard mirror of the metrics log at `path` lives: `tb/` beside it.
pub fn tensorboard_dir(path: &Path) -> PathBuf {
    path.parent().unwrap_or(Path::new(".")).join("tb")
}

impl MetricsLog {
    /// Opens `path` for appending; with `keep_up_to = Some(step)` (a resume) first drops every
    /// record of a later step.
    pub fn open(path: impl AsRef<Path>, keep_up_to: Option<u64>) -> Result<Self, TrainError> {
        let path = path.as_ref().to_path_buf();
        let kept: Vec<Value> = match keep_up_to {
            Some(step) if path.exists() => read_records(&path)?
                .into_iter()
                .filter(|r| r.get("step").and_then(Value::as_u64).unwrap_or(0) <= step)
                .collect(),
            _ => Vec::new(),
        };
        let text: String = kept.iter().map(|r| format!("{r}\n")).collect();
        hq_data::atomic::write_atomic(&path, text.as_bytes())?;
        let events = EventFile::mirror(&tensorboard_dir(&path), &kept, unix_now())?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| io(&path, e))?;
        Ok(MetricsLog { path, file, events })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `record` (an object gets a `time` field) and mirrors it to TensorBoard.
    pub fn write(&mut self, record: &Value) -> Result<(), TrainError> {
        let now = unix_now();
        let mut record = record.clone();
        if let Some(m) = record.as_object_mut() {
            m.entry("time").or_insert(Value::from(now));
        }
        writeln!(self.file, "{record}")
            .and_then(|_| self.file.flush())
            .map_err(|e| io(&self.path, e))?;
        self.events.append(&record, now)
    }
}

/// Every record of a metrics file (a line that is not JSON is an error naming its number).
pub fn read_records(path: &Path) -> Result<Vec<Value>, TrainError> {
    let text = std::fs::read_to_string(path).map_err(|e| io(path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| io(path, format!("line {}: {e}", i + 1))))
        .collect()
}

/// `(step, value)` of the `key` field of the train records.
fn series(records: &[Value], key: &str) -> Vec<(f64, f64)> {
    records
        .iter()
        .filter(|r| r.get("kind").and_then(Value::as_str) == Some("train"))
        .filter_map(|r| {
            let step = r.get("step")?.as_f64()?;
            let v = r.get(key)?.as_f64()?;
            v.is_finite().then_some((step, v))
        })
        .collect()
}

const PALETTE: [RGBColor; 5] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
];

fn line_chart(
    out: &Path,
    title: &str,
    y_label: &str,
    lines: &[(&str, Vec<(f64, f64)>)],
) -> Result<(), TrainError> {
    let lines: Vec<&(&str, Vec<(f64, f64)>)> =
        lines.iter().filter(|(_, s)| !s.is_empty()).collect();
    if lines.is_empty() {
        return Ok(());
    }
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (_, s) in &lines {
        for &(x, y) in s {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-12);
    let (y0, y1) = (y0 - pad, y1 + pad);
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        let root = BitMapBackend::new(out, (900, 540)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(x0..x1, y0..y1)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc(y_label)
            .draw()?;
        for (i, (name, s)) in lines.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            chart
                .draw_series(LineSeries::new(s.iter().copied(), color.stroke_width(2)))?
                .label(*name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| io(out, format!("cannot draw the chart: {e}")))
}

/// Draws `loss.png` (total and each part) and `lr.png` into `dir` from a metrics file.
pub fn plot_curves(metrics: &Path, dir: &Path) -> Result<Vec<PathBuf>, TrainError> {
    let records = read_records(metrics)?;
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let loss_png = dir.join("loss.png");
    line_chart(
        &loss_png,
        "training loss",
        "loss",
        &[
            ("total", series(&records, "loss")),
            ("contrastive", series(&records, "loss_clip")),
            ("HNI (weighted)", series(&records, "loss_hni_weighted")),
            ("STC (weighted)", series(&records, "loss_stc_weighted")),
        ],
    )?;
    let lr_png = dir.join("lr.png");
    line_chart(
        &lr_png,
        "learning rate",
        "lr",
        &[("lr", series(&records, "lr"))],
    )?;
    Ok(vec![loss_png, lr_png])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Fault campaign finding (tools/faults, hq-train kill trials): the resume rewrites the log
    /// from its parsed records, and serde_json's default float parser read some values one ulp
    /// off (14.238378524780273, a logit scale, came back as ...272), so a resumed run's log was
    /// not the uninterrupted run's. Every value must survive the rewrite digit for digit.
    #[test]
    fn a_resume_rewrites_the_log_digit_for_digit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("metrics.jsonl");
        let mut log = MetricsLog::open(&path, None).expect("open");
        let mut x = 0x2545_f491_u32;
        for step in 1..=400u64 {
            // f32 values seen as f64, as the training loop logs them (a xorshift stream).
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let v = f64::from(f32::from_bits(0x3c00_0000 | (x >> 6)));
            log.write(
                &json!({"kind": "train", "step": step, "logit_scale": 14.238378524780273,
                "loss": v, "time": 1.0}),
            )
            .expect("write");
        }
        drop(log);
        let before = std::fs::read_to_string(&path).expect("read");
        drop(MetricsLog::open(&path, Some(400)).expect("reopen"));
        let after = std::fs::read_to_string(&path).expect("read");
        assert!(before == after, "the rewritten log differs");
    }

    #[test]
    fn resume_cuts_the_log_and_plots_draw() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("metrics.jsonl");
        let mut log = MetricsLog::open(&path, None).expect("open");
        for step in 1..=6u64 {
            log.write(
                &json!({"kind": "train", "step": step, "loss": 1.0 / step as f64,
                "loss_clip": 0.5, "lr": 1e-3 * step as f64}),
            )
            .expect("write");
        }
        drop(log);
        let mut log = MetricsLog::open(&path, Some(4)).expect("reopen");
        log.write(&json!({"kind": "train", "step": 5, "loss": 0.1, "lr": 1e-3}))
            .expect("write");
        let steps: Vec<u64> = read_records(&path)
            .expect("read")
            .iter()
            .map(|r| r["step"].as_u64().expect("step"))
            .collect();
        assert_eq!(steps, vec![1, 2, 3, 4, 5]);
        // The TensorBoard mirror was rewritten from the cut log: one file, the file-version
        // record and one event per kept or new record (steps 5 and 6 of the first session gone).
        let files: Vec<PathBuf> = std::fs::read_dir(tensorboard_dir(&path))
            .expect("tb dir")
            .map(|e| e.expect("entry").path())
            .collect();
        assert_eq!(files.len(), 1, "{files:?}");
        let events =
            crate::tensorboard::read_payloads(&std::fs::read(&files[0]).expect("read events"));
        assert_eq!(events.len(), 1 + 5);
        let pngs = plot_curves(&path, &dir.path().join("plots")).expect("plot");
        for p in pngs {
            let bytes = std::fs::read(&p).expect("png");
            assert_eq!(&bytes[1..4], b"PNG", "{}", p.display());
        }
    }
}
