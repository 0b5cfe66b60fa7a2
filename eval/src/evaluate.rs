//! Evaluating one dataset folder with an [`Encoder`]: zero-shot classification (single- and
//! multi-label, WILDS and fairness metadata), retrieval, WinoGAViL and ARO. Each returns a
//! [`TaskOutput`]: every metric by the reference's name, plus counts and bad samples.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::encoder::Encoder;
use crate::error::EvalError;
use crate::metrics;
use crate::pipeline::{
    encode_images, encode_texts, tokenizer_for, BadSamples, CropRect, ImageJob, JobSink, RunOptions,
};
use crate::tasks::{FairnessTask, WildsTask};
use crate::wds::{fill_template, DatasetType, WdsDataset, WdsSample};

/// Metrics by name; `None` where the value is undefined (CLIP_benchmark's NaN, DataComp's None).
pub type Metrics = BTreeMap<String, Option<f64>>;

/// What the data looked like (for the results' data version).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DataInfo {
    pub dir: String,
    pub shards: usize,
    pub shard_bytes: u64,
    pub dataset_type: Option<DatasetType>,
    pub classes: usize,
    pub templates: usize,
}

/// The outcome of evaluating one dataset.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskOutput {
    pub metrics: Metrics,
    /// Metrics that could not be computed, with the reason (e.g. missing WILDS metadata).
    pub unavailable: BTreeMap<String, String>,
    /// Extra structured results (per-group scores, ARO groups).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub details: serde_json::Value,
    /// Samples evaluated (images for classification/retrieval/ARO, instances for WinoGAViL).
    pub samples: u64,
    /// Captions evaluated (retrieval).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub texts: Option<u64>,
    pub bad: BadSamples,
    /// Images per second through decode + encode.
    pub images_per_second: f64,
    pub seconds: f64,
    pub data: DataInfo,
}

/// Labels a classification sample can carry.
enum ClassLabel {
    Single(usize),
    Multi(Vec<f32>),
}

/// Extra per-sample metadata for WILDS / fairness (`None` when the sample has no `.npy`).
type Meta = Option<Vec<f64>>;

/// Which extra metrics a classification set gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClassificationExtra {
    None,
    /// The embedding diagnostics of [`crate::probe`] in `details` (`class_prompt_cosine`,
    /// `linear_probe_acc1`); single-label sets only.
    Diagnostics,
    Wilds(WildsTask),
    Fairness(FairnessTask),
}

/// CLIP_benchmark's `zero_shot_classifier`: `classes x dim`, each row the normalised mean of the
/// normalised embeddings of the class's filled templates.
pub fn zero_shot_classifier(
    encoder: &mut dyn Encoder,
    classnames: &[String],
    templates: &[String],
    opts: &RunOptions,
) -> Result<Vec<f32>, EvalError> {
    let tokenizer = tokenizer_for(encoder)?;
    let dim = encoder.embed_dim();
    let mut texts = Vec::with_capacity(classnames.len() * templates.len());
    for c in classnames {
        for t in templates {
            texts.push(fill_template(t, c).map_err(EvalError::Invalid)?);
        }
    }
    let emb = encode_texts(encoder, &tokenizer, &texts, opts, false)?;
    let per_class = templates.len() * dim;
    Ok(emb
        .chunks(per_class.max(1))
        .flat_map(|chunk| metrics::class_embedding(chunk, dim))
        .collect())
}

fn data_info(ds: &WdsDataset) -> DataInfo {
    DataInfo {
        dir: ds.dir.display().to_string(),
        shards: ds.shards.len(),
        shard_bytes: ds.shard_bytes(),
        dataset_type: Some(ds.dataset_type),
        classes: ds.classnames.len(),
        templates: ds.templates.len(),
    }
}

fn image_job<L>(s: WdsSample, label: L) -> Result<ImageJob<L>, hq_data::SampleError> {
    let Some((ext, _)) = s.image() else {
        let found: Vec<String> = s.members.keys().map(|k| format!(".{k}")).collect();
        return Err(s.error(format!(
            "missing image member (.webp, .png, .jpg or .jpeg); members found: {}",
            found.join(", ")
        )));
    };
    let ext = ext.to_string();
    let mut s = s;
    let bytes = s.members.remove(&ext).unwrap_or_default();
    Ok(ImageJob {
        key: s.key,
        shard: s.shard,
        ext,
        bytes,
        crop: None,
        label,
    })
}

/// Zero-shot classification of a webdataset set, CLIP_benchmark's metrics (`acc1`, `acc5` with at
/// least 5 classes, `mean_per_class_recall`; `mean_average_precision` for multi-label sets), plus
/// DataComp's WILDS / fairness metrics for those tasks.
pub fn evaluate_classification(
    encoder: &mut dyn Encoder,
    ds: &WdsDataset,
    extra: ClassificationExtra,
    expected: Option<u64>,
    opts: &RunOptions,
    message: &str,
) -> Result<TaskOutput, EvalError> {
    ds.require_classification_metadata()?;
    let classes = ds.classnames.len();
    let dim = encoder.embed_dim();
    let classifier = zero_shot_classifier(encoder, &ds.classnames, &ds.templates, opts)?;
    let multilabel = ds.dataset_type == DatasetType::MultiLabel;
    let want_meta = !matches!(
        extra,
        ClassificationExtra::None | ClassificationExtra::Diagnostics
    );
    let bar =
        crate::pipeline::progress_bar(opts.limit.or(expected), "images", message, opts.progress);
    let encoded = encode_images(
        encoder,
        |sink: &mut JobSink<'_, (ClassLabel, Meta)>| {
            ds.for_each_sample(&mut |item| {
                let job = item.and_then(|s| {
                    let label = if multilabel {
                        let v = s.npy()?;
                        if v.len() != classes {
                            return Err(s.error(format!(
                                ".npy holds {} targets for {classes} classes",
                                v.len()
                            )));
                        }
                        ClassLabel::Multi(v.iter().map(|&x| x as f32).collect())
                    } else {
                        let c = s.class()?;
                        if c < 0 || c as usize >= classes {
                            return Err(s.error(format!(
                                "class {c} is out of range for {classes} classes"
                            )));
                        }
                        ClassLabel::Single(c as usize)
                    };
                    let meta = if want_meta && s.members.contains_key("npy") {
                        Some(s.npy()?)
                    } else {
                        None
                    };
                    image_job(s, (label, meta))
                });
                sink(job)
            })
        },
        None,
        opts,
        &bar,
    )?;
    bar.finish_and_clear();
    if encoded.is_empty() {
        return Err(EvalError::dataset(
            &ds.dir,
            format!(
                "no usable sample ({} bad; first: {})",
                encoded.bad.count,
                encoded
                    .bad
                    .examples
                    .first()
                    .map(|e| e.to_string())
                    .unwrap_or_else(|| "the shards are empty".into())
            ),
        ));
    }
    let n = encoded.len();
    let logits = metrics::scaled_scores(&encoded.embeddings, &classifier, dim, 100.0);
    let mut out = TaskOutput {
        samples: n as u64,
        images_per_second: n as f64 / encoded.seconds.max(1e-9),
        seconds: encoded.seconds,
        data: data_info(ds),
        ..TaskOutput::default()
    };
    if multilabel {
        let targets: Vec<f32> = encoded
            .labels
            .iter()
            .flat_map(|(l, _)| match l {
                ClassLabel::Multi(v) => v.clone(),
                ClassLabel::Single(_) => Vec::new(),
            })
            .collect();
        let ap = metrics::average_precision_per_class(&logits, &targets, classes)?;
        out.metrics.insert(
            "mean_average_precision".into(),
            Some(ap.iter().sum::<f64>() / ap.len().max(1) as f64),
        );
        out.details = serde_json::json!({
            "average_precision_per_class": ds.classnames.iter().zip(&ap)
                .map(|(c, a)| (c.clone(), *a)).collect::<BTreeMap<_, _>>()
        });
        out.bad = encoded.bad;
        return Ok(out);
    }
    let targets: Vec<usize> = encoded
        .labels
        .iter()
        .map(|(l, _)| match l {
            ClassLabel::Single(c) => *c,
            ClassLabel::Multi(_) => 0,
        })
        .collect();
    let pred = metrics::argmax_rows(&logits, classes);
    if classes >= 5 {
        let acc = metrics::topk_accuracy(&logits, classes, &targets, &[1, 5])?;
        out.metrics.insert("acc1".into(), Some(acc[0]));
        out.metrics.insert("acc5".into(), Some(acc[1]));
    } else {
        let acc = metrics::topk_accuracy(&logits, classes, &targets, &[1])?;
        out.metrics.insert("acc1".into(), Some(acc[0]));
        out.metrics.insert("acc5".into(), None);
    }
    out.metrics.insert(
        "mean_per_class_recall".into(),
        Some(metrics::balanced_accuracy(&targets, &pred)),
    );
    if extra == ClassificationExtra::Diagnostics {
        out.details = serde_json::json!({
            "class_prompt_cosine": crate::probe::class_prompt_cosine(&classifier, classes, dim),
            "linear_probe_acc1":
                crate::probe::ridge_probe_accuracy(&encoded.embeddings, &targets, classes, dim),
        });
    } else if extra != ClassificationExtra::None {
        let metas: Vec<&Meta> = encoded.labels.iter().map(|(_, m)| m).collect();
        wilds_metrics(extra, &logits, classes, &targets, &pred, &metas, &mut out);
    }
    out.bad = encoded.bad;
    Ok(out)
}

/// DataComp's WILDS / fairness evaluators on top of the predictions.
fn wilds_metrics(
    extra: ClassificationExtra,
    logits: &[f32],
    classes: usize,
    targets: &[usize],
    pred: &[usize],
    metas: &[&Meta],
    out: &mut TaskOutput,
) {
    // (metadata fields, group field index, metric name, main metrics)
    let (fields, names): (&[&str], &[&str]) = match extra {
        ClassificationExtra::Wilds(WildsTask::IWildCam) => (
            &[
                "location", "sequence", "year", "month", "day", "hour", "minute", "second", "y",
            ],
            &["acc_avg", "recall-macro_all", "F1-macro_all"],
        ),
        ClassificationExtra::Wilds(WildsTask::Camelyon17) => {
            (&["hospital", "slide", "y"], &["acc_avg", "acc_wg"])
        }
        ClassificationExtra::Wilds(WildsTask::Fmow) => (
            &["region", "year", "y"],
            &["acc_avg", "acc_worst_year", "acc_worst_region"],
        ),
        ClassificationExtra::Fairness(FairnessTask::DollarStreet) => (
            &["income_ds", "income_meta", "region"],
            &["acc_top5_avg", "acc_top5_wg"],
        ),
        ClassificationExtra::Fairness(FairnessTask::Geode) => {
            (&["region", "country"], &["acc_avg", "acc_wg"])
        }
        ClassificationExtra::None | ClassificationExtra::Diagnostics => return,
    };
    let missing = metas.iter().filter(|m| m.is_none()).count();
    if missing > 0 {
        let reason = format!(
            "{missing} of {} samples have no .npy metadata ({} expected); DataComp's webdatasets carry it",
            metas.len(),
            fields.join(", ")
        );
        for n in names {
            out.metrics.insert((*n).into(), None);
            out.unavailable.insert((*n).into(), reason.clone());
        }
        return;
    }
    let column = |name: &str| -> Result<Vec<i64>, String> {
        let i = fields.iter().position(|f| *f == name).unwrap_or(0);
        metas
            .iter()
            .map(|m| {
                m.as_ref()
                    .and_then(|v| v.get(i))
                    .map(|&x| x as i64)
                    .ok_or_else(|| format!("metadata has fewer than {} fields", fields.len()))
            })
            .collect()
    };
    let correct: Vec<bool> = pred.iter().zip(targets).map(|(p, t)| p == t).collect();
    let group_eval = |metric: &str,
                      field: &str,
                      correct: &[bool],
                      out: &mut TaskOutput|
     -> Option<(f64, Option<f64>)> {
        match column(field) {
            Ok(g) => {
                let (avg, groups, worst) = metrics::group_scores(correct, &g);
                for s in &groups {
                    out.metrics
                        .insert(format!("{metric}_{field}:{}", s.group), s.value);
                    out.metrics
                        .insert(format!("count_{field}:{}", s.group), Some(s.count as f64));
                }
                Some((avg, worst))
            }
            Err(e) => {
                out.unavailable.insert(format!("{metric}_{field}"), e);
                None
            }
        }
    };
    match extra {
        ClassificationExtra::Wilds(WildsTask::IWildCam) => {
            let (f1, recall) = metrics::macro_f1_recall(targets, pred);
            let acc = correct.iter().filter(|&&c| c).count() as f64 / correct.len().max(1) as f64;
            out.metrics.insert("acc_avg".into(), Some(acc));
            out.metrics.insert("recall-macro_all".into(), Some(recall));
            out.metrics.insert("F1-macro_all".into(), Some(f1));
        }
        ClassificationExtra::Wilds(WildsTask::Camelyon17) => {
            if let Some((avg, worst)) = group_eval("acc", "slide", &correct, out) {
                out.metrics.insert("acc_avg".into(), Some(avg));
                out.metrics.insert("acc_wg".into(), worst);
            }
        }
        ClassificationExtra::Wilds(WildsTask::Fmow) => {
            if let Some((avg, worst)) = group_eval("acc", "year", &correct, out) {
                out.metrics.insert("acc_avg".into(), Some(avg));
                out.metrics.insert("acc_worst_year".into(), worst);
            }
            // DataComp skips groups whose name contains "Other"; its evaluator has no metadata
            // map, so names are numeric ("region:5") and no region is skipped. Same here.
            if let Some((_, worst)) = group_eval("acc", "region", &correct, out) {
                out.metrics.insert("acc_worst_region".into(), worst);
            }
        }
        ClassificationExtra::Fairness(FairnessTask::DollarStreet) => {
            let k = 5.min(classes);
            let top = metrics::topk_rows(logits, classes, k);
            let top5: Vec<bool> = top
                .iter()
                .zip(targets)
                .map(|(t, y)| t.contains(y))
                .collect();
            if let Some((avg, worst)) = group_eval("acc_top5", "income_ds", &top5, out) {
                out.metrics.insert("acc_top5_avg".into(), Some(avg));
                out.metrics.insert("acc_top5_wg".into(), worst);
            }
        }
        ClassificationExtra::Fairness(FairnessTask::Geode) => {
            if let Some((avg, worst)) = group_eval("acc", "region", &correct, out) {
                out.metrics.insert("acc_avg".into(), Some(avg));
                out.metrics.insert("acc_wg".into(), worst);
            }
        }
        ClassificationExtra::None | ClassificationExtra::Diagnostics => {}
    }
}

/// Image-text retrieval on a webdataset set with `txt` captions: CLIP_benchmark's
/// `image_retrieval_recall@k` / `text_retrieval_recall@k` for k = 1, 5, 10 and DataComp's
/// `mean_recall@1`.
pub fn evaluate_retrieval(
    encoder: &mut dyn Encoder,
    ds: &WdsDataset,
    expected: Option<u64>,
    opts: &RunOptions,
    message: &str,
) -> Result<TaskOutput, EvalError> {
    let dim = encoder.embed_dim();
    let bar =
        crate::pipeline::progress_bar(opts.limit.or(expected), "images", message, opts.progress);
    let encoded = encode_images(
        encoder,
        |sink: &mut JobSink<'_, Vec<String>>| {
            ds.for_each_sample(&mut |item| {
                sink(item.and_then(|s| {
                    let caps = s.captions()?;
                    image_job(s, caps)
                }))
            })
        },
        None,
        opts,
        &bar,
    )?;
    bar.finish_and_clear();
    if encoded.is_empty() {
        return Err(EvalError::dataset(
            &ds.dir,
            format!("no usable sample ({} bad)", encoded.bad.count),
        ));
    }
    let images = encoded.len();
    let mut texts = Vec::new();
    let mut text_image = Vec::new();
    for (i, caps) in encoded.labels.iter().enumerate() {
        for c in caps {
            texts.push(c.clone());
            text_image.push(i);
        }
    }
    if texts.is_empty() {
        return Err(EvalError::dataset(&ds.dir, "no captions in any sample"));
    }
    let tokenizer = tokenizer_for(encoder)?;
    let text_emb = encode_texts(encoder, &tokenizer, &texts, opts, true)?;
    let scores = metrics::scaled_scores(&text_emb, &encoded.embeddings, dim, 1.0);
    let ks = [1, 5, 10];
    let recalls = metrics::retrieval_recall(&scores, texts.len(), images, &text_image, &ks)?;
    let mut out = TaskOutput {
        samples: images as u64,
        texts: Some(texts.len() as u64),
        images_per_second: images as f64 / encoded.seconds.max(1e-9),
        seconds: encoded.seconds,
        data: data_info(ds),
        ..TaskOutput::default()
    };
    for (k, (ir, tr)) in ks.iter().zip(&recalls) {
        out.metrics
            .insert(format!("image_retrieval_recall@{k}"), Some(*ir));
        out.metrics
            .insert(format!("text_retrieval_recall@{k}"), Some(*tr));
    }
    out.metrics.insert(
        "mean_recall@1".into(),
        Some(0.5 * (recalls[0].0 + recalls[0].1)),
    );
    let without = encoded.labels.iter().filter(|c| c.is_empty()).count();
    if without > 0 {
        out.details = serde_json::json!({ "images_without_captions": without });
    }
    out.bad = encoded.bad;
    Ok(out)
}

/// One ARO case as its JSON holds it.
#[derive(Debug, Clone, Deserialize)]
struct AroRecord {
    image_path: String,
    bbox_x: f64,
    bbox_y: f64,
    bbox_w: f64,
    bbox_h: f64,
    true_caption: String,
    false_caption: String,
    #[serde(default)]
    relation_name: Option<String>,
    #[serde(default)]
    attributes: Option<Vec<String>>,
}

/// Which ARO set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AroKind {
    Relation,
    Attribution,
}

impl AroKind {
    pub fn annotation_file(self) -> &'static str {
        match self {
            AroKind::Relation => "visual_genome_relation.json",
            AroKind::Attribution => "visual_genome_attribution.json",
        }
    }
}

/// ARO VG-Relation / VG-Attribution from `dir/<annotation file>` and `dir/images/`: each image
/// cropped to its box (PIL `crop`), scored against its true and false caption; `accuracy` over all
/// cases and `macro_accuracy` as the authors compute it (relations minus their symmetric list;
/// attribute pairs with at least `attribute_min_count` cases).
pub fn evaluate_aro(
    encoder: &mut dyn Encoder,
    dir: &Path,
    kind: AroKind,
    attribute_min_count: u64,
    opts: &RunOptions,
    message: &str,
) -> Result<TaskOutput, EvalError> {
    let ann_path = dir.join(kind.annotation_file());
    let text = std::fs::read(&ann_path).map_err(|e| EvalError::io(&ann_path, e))?;
    let records: Vec<AroRecord> = serde_json::from_slice(&text).map_err(|e| EvalError::Json {
        path: ann_path.clone(),
        source: e,
    })?;
    if records.is_empty() {
        return Err(EvalError::dataset(&ann_path, "holds no case"));
    }
    let image_dir = dir.join("images");
    let dim = encoder.embed_dim();
    let total = records.len() as u64;
    let bar = crate::pipeline::progress_bar(
        Some(opts.limit.map_or(total, |l| l.min(total))),
        "images",
        message,
        opts.progress,
    );
    let shard = ann_path.display().to_string();
    let encoded = encode_images(
        encoder,
        |sink: &mut JobSink<'_, usize>| {
            for (i, r) in records.iter().enumerate() {
                let path: PathBuf = image_dir.join(&r.image_path);
                let crop = CropRect {
                    left: r.bbox_x,
                    top: r.bbox_y,
                    right: r.bbox_x + r.bbox_w,
                    bottom: r.bbox_y + r.bbox_h,
                };
                let job = ImageJob::from_file(&path, &shard, format!("{i}"), Some(crop), i);
                if !sink(job) {
                    return;
                }
            }
        },
        Some(total),
        opts,
        &bar,
    )?;
    bar.finish_and_clear();
    if encoded.is_empty() {
        return Err(EvalError::dataset(
            dir,
            format!("no usable case ({} bad)", encoded.bad.count),
        ));
    }
    let mut texts = Vec::with_capacity(encoded.len() * 2);
    let mut groups = Vec::with_capacity(encoded.len());
    for &i in &encoded.labels {
        let r = &records[i];
        texts.push(r.false_caption.clone());
        texts.push(r.true_caption.clone());
        let g = match kind {
            AroKind::Relation => r.relation_name.clone().ok_or_else(|| {
                EvalError::dataset(&ann_path, format!("case {i} has no relation_name"))
            })?,
            AroKind::Attribution => match r.attributes.as_deref() {
                Some([a, b, ..]) => format!("{a}_{b}"),
                _ => {
                    return Err(EvalError::dataset(
                        &ann_path,
                        format!("case {i} has no two attributes"),
                    ))
                }
            },
        };
        groups.push(g);
    }
    let tokenizer = tokenizer_for(encoder)?;
    let text_emb = encode_texts(encoder, &tokenizer, &texts, opts, true)?;
    let correct: Vec<bool> = encoded
        .embeddings
        .chunks(dim)
        .zip(text_emb.chunks(2 * dim))
        .map(|(img, caps)| {
            let s_false = dot(img, &caps[..dim]);
            let s_true = dot(img, &caps[dim..]);
            // numpy argmax over [false, true] keeps index 0 on a tie.
            s_true > s_false
        })
        .collect();
    let (exclude, min_count): (&[&str], u64) = match kind {
        AroKind::Relation => (metrics::ARO_SYMMETRIC_RELATIONS, 0),
        AroKind::Attribution => (&[], attribute_min_count),
    };
    let (micro, group_list, macro_acc) =
        metrics::aro_accuracy(&correct, &groups, exclude, min_count);
    let mut out = TaskOutput {
        samples: encoded.len() as u64,
        images_per_second: encoded.len() as f64 / encoded.seconds.max(1e-9),
        seconds: encoded.seconds,
        data: DataInfo {
            dir: dir.display().to_string(),
            ..DataInfo::default()
        },
        ..TaskOutput::default()
    };
    out.metrics.insert("accuracy".into(), Some(micro));
    out.metrics.insert("macro_accuracy".into(), macro_acc);
    if macro_acc.is_none() {
        out.unavailable.insert(
            "macro_accuracy".into(),
            format!(
                "no group qualifies (relations outside ARO's symmetric list; attribute pairs with at least {min_count} cases)"
            ),
        );
    }
    out.details = serde_json::json!({
        "groups": group_list,
        "attribute_min_count": min_count,
    });
    out.bad = encoded.bad;
    Ok(out)
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| f64::from(x) * f64::from(y))
        .sum()
}

/// One WinoGAViL instance of the JSONL export.
#[derive(Debug, Clone, Deserialize)]
struct WinoRecord {
    cue: String,
    candidates: Vec<String>,
    associations: Vec<String>,
    candidate_images: Vec<String>,
}

/// DataComp's prompt for a WinoGAViL cue: "An {cue}" before a vowel, else "A {cue}", lower-cased.
pub fn winogavil_prompt(cue: &str) -> String {
    let item = cue.to_lowercase();
    match item.chars().next() {
        Some('a' | 'e' | 'i' | 'o' | 'u') => format!("An {item}"),
        _ => format!("A {item}"),
    }
}

/// WinoGAViL from `dir/test.jsonl` (an export of the HF dataset `nlphuji/winogavil`): per instance,
/// the `|associations|` candidates most similar to the cue prompt, scored with the Jaccard index;
/// DataComp's `avg_jaccard_score` and `jaccard_score_{5,6,10,12,5-6,10-12}`.
pub fn evaluate_winogavil(
    encoder: &mut dyn Encoder,
    dir: &Path,
    opts: &RunOptions,
    message: &str,
) -> Result<TaskOutput, EvalError> {
    let path = dir.join("test.jsonl");
    let text = std::fs::read_to_string(&path).map_err(|e| EvalError::io(&path, e))?;
    let mut records = Vec::new();
    for (line_no, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let r: WinoRecord = serde_json::from_str(line)
            .map_err(|e| EvalError::dataset(&path, format!("line {}: {e}", line_no + 1)))?;
        if r.candidates.len() != r.candidate_images.len() {
            return Err(EvalError::dataset(
                &path,
                format!(
                    "line {}: {} candidates but {} candidate images",
                    line_no + 1,
                    r.candidates.len(),
                    r.candidate_images.len()
                ),
            ));
        }
        records.push(r);
    }
    if let Some(l) = opts.limit {
        records.truncate(l as usize);
    }
    if records.is_empty() {
        return Err(EvalError::dataset(&path, "holds no instance"));
    }
    let dim = encoder.embed_dim();
    let total: u64 = records
        .iter()
        .map(|r| r.candidate_images.len() as u64)
        .sum();
    let bar = crate::pipeline::progress_bar(Some(total), "images", message, opts.progress);
    let shard = path.display().to_string();
    let mut no_limit = opts.clone();
    no_limit.limit = None;
    let encoded = encode_images(
        encoder,
        |sink: &mut JobSink<'_, (usize, usize)>| {
            for (i, r) in records.iter().enumerate() {
                for (j, img) in r.candidate_images.iter().enumerate() {
                    let p = dir.join(img);
                    let job = ImageJob::from_file(&p, &shard, format!("{i}/{j}"), None, (i, j));
                    if !sink(job) {
                        return;
                    }
                }
            }
        },
        Some(total),
        &no_limit,
        &bar,
    )?;
    bar.finish_and_clear();
    // An instance with any unusable image is left out (and counted).
    let mut emb_of: BTreeMap<(usize, usize), &[f32]> = BTreeMap::new();
    for (label, e) in encoded.labels.iter().zip(encoded.embeddings.chunks(dim)) {
        emb_of.insert(*label, e);
    }
    let prompts: Vec<String> = records.iter().map(|r| winogavil_prompt(&r.cue)).collect();
    let tokenizer = tokenizer_for(encoder)?;
    let cue_emb = encode_texts(encoder, &tokenizer, &prompts, opts, true)?;
    let mut scores_by_size: Vec<(usize, f64)> = Vec::new();
    let mut skipped = 0u64;
    for (i, r) in records.iter().enumerate() {
        let n = r.candidates.len();
        let embs: Option<Vec<&[f32]>> = (0..n).map(|j| emb_of.get(&(i, j)).copied()).collect();
        let Some(embs) = embs else {
            skipped += 1;
            continue;
        };
        let cue = &cue_emb[i * dim..(i + 1) * dim];
        let sims: Vec<f32> = embs.iter().map(|e| dot(cue, e) as f32).collect();
        let y_true: Vec<bool> = r
            .candidates
            .iter()
            .map(|c| r.associations.contains(c))
            .collect();
        let n_assoc = y_true.iter().filter(|&&b| b).count();
        let y_pred = metrics::winogavil_prediction(&sims, n_assoc);
        scores_by_size.push((n, metrics::jaccard(&y_true, &y_pred)));
    }
    if scores_by_size.is_empty() {
        return Err(EvalError::dataset(dir, "no instance with all its images"));
    }
    let mean_where = |f: &dyn Fn(usize) -> bool| -> Option<f64> {
        let v: Vec<f64> = scores_by_size
            .iter()
            .filter(|(n, _)| f(*n))
            .map(|(_, s)| *s)
            .collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    let mut out = TaskOutput {
        samples: scores_by_size.len() as u64,
        images_per_second: encoded.len() as f64 / encoded.seconds.max(1e-9),
        seconds: encoded.seconds,
        data: DataInfo {
            dir: dir.display().to_string(),
            ..DataInfo::default()
        },
        ..TaskOutput::default()
    };
    out.metrics
        .insert("avg_jaccard_score".into(), mean_where(&|_| true));
    for k in [5usize, 6, 10, 12] {
        out.metrics
            .insert(format!("jaccard_score_{k}"), mean_where(&|n| n == k));
    }
    out.metrics
        .insert("jaccard_score_5-6".into(), mean_where(&|n| n <= 6));
    out.metrics
        .insert("jaccard_score_10-12".into(), mean_where(&|n| n >= 10));
    if skipped > 0 {
        out.details = serde_json::json!({ "instances_skipped_for_bad_images": skipped });
    }
    out.bad = encoded.bad;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_like_datacomp() {
        assert_eq!(winogavil_prompt("Apple"), "An apple");
        assert_eq!(winogavil_prompt("dog"), "A dog");
    }
}
