//! The report for people: a Markdown table and a bar chart of the headline rates. hq-data is the
//! bottom crate, so it cannot borrow eval's or training's chart code; this is the small one it
//! needs (horizontal bars, one per rate, the value written at the bar's end).

use super::claims::Attr;
use super::{AttributeCounts, Fraction, QualityReport, TagCounts};
use crate::error::{DataError, Result};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::fmt::Write as _;

fn pct(r: Option<f64>) -> String {
    r.map_or_else(|| "n/a".to_string(), |r| format!("{:.1}%", 100.0 * r))
}

fn frac(f: &Fraction) -> String {
    format!("{} / {}", f.count, f.of)
}

/// The rates the chart shows, in order, with their labels; rates without a denominator are left
/// out.
fn headline(r: &QualityReport) -> Vec<(String, f64)> {
    let mut rows: Vec<(String, Option<f64>)> =
        vec![("format success".into(), r.format.success.rate)];
    if let Some(fa) = &r.format.first_attempt {
        rows.push(("first-attempt success".into(), fa.success.rate));
    }
    rows.push((
        "object recall: d+".into(),
        r.object_recall.long_positive.rate,
    ));
    rows.push((
        "object recall: alt-text (same samples)".into(),
        r.object_recall.alt_text_same_samples.rate,
    ));
    if let Some(o) = &r.object_recall.oracle {
        rows.push(("object recall: oracle".into(), o.rate));
    }
    for (name, a) in attributes(r) {
        rows.push((format!("d+ {name} correct"), a.correct_rate));
    }
    rows.push((
        "d+ states nothing false".into(),
        r.texts.long_positive_faithful.rate,
    ));
    rows.push((
        "d- contradicts the scene".into(),
        r.texts.long_negative.contradicts.rate,
    ));
    rows.push(("d- plausible".into(), r.texts.long_negative.plausible.rate));
    rows.push(("t+ tags true".into(), r.texts.tags_positive.correct.rate));
    rows.push(("t- tags false".into(), r.texts.tags_negative.correct.rate));
    rows.into_iter()
        .filter_map(|(l, v)| v.map(|v| (l, 100.0 * v)))
        .collect()
}

/// The attribute rows in [`Attr::ALL`]'s order (object attributes first), then any other key.
fn attributes(r: &QualityReport) -> Vec<(&str, &AttributeCounts)> {
    let known: Vec<&str> = Attr::ALL.iter().map(|a| a.name()).collect();
    let mut rows: Vec<(&str, &AttributeCounts)> = known
        .iter()
        .filter_map(|k| r.texts.attributes.get_key_value(*k))
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    rows.extend(
        r.texts
            .attributes
            .iter()
            .filter(|(k, _)| !known.contains(&k.as_str()))
            .map(|(k, v)| (k.as_str(), v)),
    );
    rows
}

fn attribute_row(s: &mut String, name: &str, a: &AttributeCounts) {
    let _ = writeln!(
        s,
        "| {name} | {} | {} ({}) | {} ({}) | {} |",
        a.applicable,
        a.correct,
        pct(a.correct_rate),
        a.wrong,
        pct(a.wrong_rate),
        a.not_stated
    );
}

fn tag_row(s: &mut String, name: &str, t: &TagCounts, what: &str) {
    let _ = writeln!(
        s,
        "| {name} {what} | {} | {} (of {} tags: {} true, {} false, {} uncheckable) |",
        pct(t.correct.rate),
        frac(&t.correct),
        t.tags,
        t.true_,
        t.false_,
        t.uncheckable
    );
}

/// `quality.md`: the headline table, the attribute table, the accounting.
pub fn markdown(r: &QualityReport) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Recaption quality: {}\n", r.name);
    let _ = writeln!(
        s,
        "{} samples from {} shard(s), mode `{}`: {} with texts, {} format errors, {} other errors; \
         {} without ground truth (left out of the content metrics).\n",
        r.samples,
        r.shards.len(),
        r.mode,
        r.with_texts,
        r.format_errors,
        r.other_errors,
        r.no_ground_truth
    );
    let _ = writeln!(s, "| metric | value | count |");
    let _ = writeln!(s, "|---|---:|---:|");
    let mut row = |name: &str, f: &Fraction| {
        let _ = writeln!(s, "| {name} | {} | {} |", pct(f.rate), frac(f));
    };
    row("format success (samples)", &r.format.success);
    if let Some(fa) = &r.format.first_attempt {
        row(
            &format!("first-attempt success ({})", fa.method),
            &fa.success,
        );
    }
    row("object recall, d+ (groups)", &r.object_recall.long_positive);
    row(
        "object recall, alt-text on the same samples",
        &r.object_recall.alt_text_same_samples,
    );
    row(
        "object recall, alt-text on every sample",
        &r.object_recall.alt_text,
    );
    if let Some(o) = &r.object_recall.oracle {
        row("object recall, oracle texts (ceiling)", o);
    }
    row("d+ states nothing false", &r.texts.long_positive_faithful);
    row(
        "d- contradicts the scene",
        &r.texts.long_negative.contradicts,
    );
    row("d- plausible", &r.texts.long_negative.plausible);
    let _ = writeln!(
        s,
        "| d- equal to d+ | | {} |",
        r.texts.long_negative.equal_to_positive
    );
    tag_row(&mut s, "t+", &r.texts.tags_positive, "tags true");
    tag_row(&mut s, "t-", &r.texts.tags_negative, "tags false");

    let _ = writeln!(s, "\n## d+ per attribute (samples)\n");
    let _ = writeln!(
        s,
        "| attribute | applicable | correct | wrong | not stated |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|");
    for (name, a) in attributes(r) {
        attribute_row(&mut s, name, a);
    }

    let _ = writeln!(s, "\n## Accounting\n");
    let list = |m: &std::collections::BTreeMap<String, u64>| {
        if m.is_empty() {
            "none".to_string()
        } else {
            m.iter()
                .map(|(k, v)| format!("`{k}` {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    let _ = writeln!(s, "- sources of `hq_clip`: {}", list(&r.sources));
    let _ = writeln!(s, "- format errors by kind: {}", list(&r.format.errors));
    if let Some(fa) = r
        .format
        .first_attempt
        .as_ref()
        .filter(|fa| !fa.summary.files.is_empty())
    {
        let _ = writeln!(
            s,
            "- recaptioner summary ({}): {} samples, {} ok, {} retried{}",
            fa.summary.files.join(", "),
            fa.summary.samples,
            fa.summary.ok,
            fa.summary.retried,
            fa.summary
                .retried_ok
                .map_or_else(String::new, |v| format!(", {v} ok after a retry"))
        );
    }
    if r.invalid_ground_truth > 0 {
        let _ = writeln!(
            s,
            "- scenes present but unreadable: {}",
            r.invalid_ground_truth
        );
    }
    let _ = writeln!(
        s,
        "\nDefinitions: `hq_data::quality` module documentation (`cargo doc -p hq-data`)."
    );
    s
}

/// `quality.png`: one horizontal bar per headline rate, in percent.
pub fn chart_png(r: &QualityReport) -> Result<Vec<u8>> {
    let rows = headline(r);
    let n = rows.len().max(1);
    let (w, h) = (1000u32, 90 + 28 * n as u32);
    let mut buf = vec![0u8; (w * h * 3) as usize];
    let draw = |buf: &mut [u8]| -> std::result::Result<(), Box<dyn std::error::Error>> {
        let root = BitMapBackend::with_buffer(buf, (w, h)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(format!("Recaption quality: {}", r.name), ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(300)
            .build_cartesian_2d(0f64..110f64, (0..n - 1).into_segmented())?;
        let labels: Vec<String> = rows.iter().map(|(l, _)| l.clone()).collect();
        let label_of = move |v: &SegmentValue<usize>| match v {
            // Row 0 is drawn at the top.
            SegmentValue::CenterOf(i) if *i < n => {
                labels.get(n - 1 - i).cloned().unwrap_or_default()
            }
            _ => String::new(),
        };
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(n)
            .y_label_formatter(&label_of)
            .x_desc("%")
            .draw()?;
        let color = RGBColor(31, 119, 180);
        chart.draw_series(rows.iter().enumerate().map(|(k, (_, v))| {
            let i = n - 1 - k;
            let mut bar = Rectangle::new(
                [
                    (0.0, SegmentValue::Exact(i)),
                    (*v, SegmentValue::Exact(i + 1)),
                ],
                color.filled(),
            );
            bar.set_margin(4, 4, 0, 0);
            bar
        }))?;
        let value_style =
            TextStyle::from(("sans-serif", 13).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
        chart.draw_series(rows.iter().enumerate().map(|(k, (_, v))| {
            let i = n - 1 - k;
            Text::new(
                format!("{v:.1}"),
                (v + 1.0, SegmentValue::CenterOf(i)),
                value_style.clone(),
            )
        }))?;
        root.present()?;
        Ok(())
    };
    draw(&mut buf).map_err(|e| DataError::Image(format!("cannot draw the chart: {e}")))?;
    let img = image::RgbImage::from_raw(w, h, buf)
        .ok_or_else(|| DataError::Image("chart buffer has the wrong size".into()))?;
    let mut png = std::io::Cursor::new(Vec::new());
    img.write_to(&mut png, image::ImageFormat::Png)
        .map_err(|e| DataError::Image(format!("cannot encode the chart: {e}")))?;
    Ok(png.into_inner())
}
