//! hq-eval's readers: the webdataset eval-set folder (nshards, dataset_type, classnames, templates
//! and its shards), `.npy` members, ARO's JSON, WinoGAViL's JSONL and saved results.

use hq_data::transform::ImageTransform;
use hq_eval::evaluate::{evaluate_aro, evaluate_winogavil, AroKind};
use hq_eval::npy::read_npy;
use hq_eval::results::RunResults;
use hq_eval::wds::{fill_template, WdsDataset};
use hq_eval::{EncodeError, Encoder, RunOptions};

use crate::{alloc, files, props};

/// The eval-set folder: `nshards.txt`, `dataset_type.txt`, `classnames.txt`,
/// `zeroshot_classification_templates.txt` and shard `test/0.tar`, in that order in the input.
/// Properties: a rejected folder names the file at fault; an accepted one yields every sample of
/// its shard as a sample or an error record, and its members decode without panics.
pub fn eval_wds_dir(input: &[u8]) {
    const NAMES: [&str; 5] = [
        "test/nshards.txt",
        "dataset_type.txt",
        "classnames.txt",
        "zeroshot_classification_templates.txt",
        "test/0.tar",
    ];
    let dir = files::tempdir();
    files::write_parts(dir.path(), &NAMES, &files::split(input, NAMES.len()));
    let ds = match WdsDataset::open(dir.path(), "test") {
        Ok(ds) => ds,
        Err(e) => {
            props::names_problem(&e, &[".txt"]);
            return;
        }
    };
    match ds.require_classification_metadata() {
        Ok(()) => {
            for t in &ds.templates {
                for c in ds.classnames.iter().take(3) {
                    fill_template(t, c)
                        .unwrap_or_else(|e| panic!("a checked template fails to fill: {e}"));
                }
            }
        }
        Err(e) => {
            props::names_problem(&e, &[".txt"]);
        }
    }
    ds.for_each_sample(&mut |item| {
        match item {
            Ok(s) => {
                let _ = s.image();
                for r in [
                    s.class().map(|_| ()),
                    s.npy().map(|_| ()),
                    s.captions().map(|_| ()),
                ] {
                    if let Err(e) = r {
                        props::names_problem(&e.reason, &[]);
                    }
                }
            }
            Err(e) => {
                props::names_problem(&e.reason, &[]);
            }
        }
        true
    });
}

/// `.npy` arrays (multi-label targets). Properties: the values match the shape's element count; a
/// shape cannot make the reader allocate beyond what the data holds.
pub fn npy(input: &[u8]) {
    // Eight bytes of `f64` a value and at least one byte of data a value, plus the shape.
    let cap = 16 * input.len() + 4096;
    match alloc::within_cap("npy", cap, || read_npy(input)) {
        Ok((values, shape)) => {
            assert_eq!(
                values.len(),
                shape.iter().product::<usize>(),
                "values for shape {shape:?}"
            );
        }
        Err(e) => {
            props::names_problem(&e, &["npy"]);
        }
    }
}

/// An encoder that returns fixed embeddings, so the ARO and WinoGAViL readers run end to end.
struct FixedEncoder;

impl Encoder for FixedEncoder {
    fn describe(&self) -> String {
        "fixed".into()
    }
    fn image_transform(&self) -> ImageTransform {
        ImageTransform::eval(8)
    }
    fn context_length(&self) -> usize {
        16
    }
    fn embed_dim(&self) -> usize {
        2
    }
    fn encode_images(&mut self, _pixels: &[f32], n: usize) -> Result<Vec<f32>, EncodeError> {
        Ok([1.0, 0.5].repeat(n))
    }
    fn encode_texts(&mut self, tokens: &[i64], n: usize) -> Result<Vec<f32>, EncodeError> {
        // Different texts get different scores, so every metric path runs.
        Ok(tokens
            .chunks(16)
            .take(n)
            .flat_map(|t| [t.iter().sum::<i64>() as f32 % 7.0, 1.0])
            .collect())
    }
}

fn run_options() -> RunOptions {
    RunOptions {
        batch_size: 4,
        text_batch_size: 8,
        threads: 1,
        prefetch: 1,
        max_pixels: 1 << 16,
        limit: None,
        progress: false,
        aro_attribute_min_count: 1,
    }
}

/// A real 4x4 PNG for the annotation files to point at (`images/a.png`).
fn write_image(dir: &std::path::Path) {
    let img = image::RgbImage::from_fn(4, 4, |x, y| image::Rgb([x as u8 * 60, y as u8 * 60, 9]));
    let path = dir.join("images/a.png");
    std::fs::create_dir_all(dir.join("images")).unwrap_or_else(|e| panic!("{e}"));
    img.save(&path).unwrap_or_else(|e| panic!("{e}"));
}

/// ARO's annotation JSON (relation, then after the separator attribution). Properties: every case
/// is scored or a bad sample; a rejected file names itself.
pub fn aro_json(input: &[u8]) {
    let parts = files::split(input, 2);
    let dir = files::tempdir();
    write_image(dir.path());
    for (kind, part) in [AroKind::Relation, AroKind::Attribution]
        .into_iter()
        .zip(parts)
    {
        let name = kind.annotation_file();
        files::write_one(dir.path(), name, part.unwrap_or_default());
        let cases = serde_json::from_slice::<Vec<serde_json::Value>>(part.unwrap_or_default())
            .map_or(0, |v| v.len() as u64);
        match evaluate_aro(&mut FixedEncoder, dir.path(), kind, 1, &run_options(), "") {
            Ok(out) => props::accounted("ARO cases", cases, out.samples, out.bad.count),
            Err(e) => {
                props::names_problem(&e, &[name, "images"]);
            }
        }
    }
}

/// WinoGAViL's `test.jsonl`. Properties: a rejected file names itself (and the line); an accepted
/// one scores every instance or counts it as left out.
pub fn winogavil_jsonl(input: &[u8]) {
    let dir = files::tempdir();
    write_image(dir.path());
    files::write_one(dir.path(), "test.jsonl", input);
    match evaluate_winogavil(&mut FixedEncoder, dir.path(), &run_options(), "") {
        Ok(out) => {
            let lines = props::nonblank_lines(&props::text(input));
            assert!(
                out.samples <= lines,
                "{} scored of {lines} lines",
                out.samples
            );
        }
        Err(e) => {
            props::names_problem(&e, &["test.jsonl", "images"]);
        }
    }
}

/// Saved results (`results.json`, read back to resume a run). Properties: an accepted file saves
/// and loads back identical; a rejected one names itself.
pub fn eval_results(input: &[u8]) {
    let dir = files::tempdir();
    let read =
        |bytes: &[u8]| RunResults::load(&files::write_one(dir.path(), "results.json", bytes));
    let print = |r: &RunResults| {
        let path = dir.path().join("printed.json");
        r.save(&path)?;
        std::fs::read(&path).map_err(|e| hq_eval::EvalError::io(&path, e))
    };
    props::read_print_read("results", input, read, print, &["results.json"]);
}
