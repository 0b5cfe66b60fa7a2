//! The built-in held-out sets of the synthetic corpus (`hq-data synth`, under `<corpus>/eval/`) as
//! one evaluation suite: zero-shot shape, colour and count classification, retrieval, and ARO-style
//! attribute binding and relations. Training calls [`evaluate_builtin`] for its periodic
//! evaluation; `hq-eval builtin` runs it from the command line.
//!
//! The metrics are the field's (CLIP_benchmark's classification and retrieval, ARO's macro
//! accuracy). One rule differs, and the report records it: ARO leaves attribute pairs with fewer
//! than 25 cases out of VG-Attribution's macro accuracy; the built-in attribute set is small
//! (1,000 cases over 56 ordered colour pairs by default), so the suite counts every pair
//! ([`BUILTIN_ATTRIBUTE_MIN_COUNT`]).

use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::encoder::Encoder;
use crate::error::EvalError;
use crate::evaluate::{
    evaluate_aro, evaluate_classification, evaluate_retrieval, AroKind, ClassificationExtra,
    TaskOutput,
};
use crate::pipeline::{BadSamples, RunOptions};
use crate::wds::WdsDataset;

/// The classification sets, in report order.
pub const BUILTIN_CLASSIFICATION: [&str; 3] = ["synth_shape", "synth_color", "synth_count"];
/// The retrieval set.
pub const BUILTIN_RETRIEVAL: &str = "synth_retrieval";
/// Smallest attribute-pair group counted in the built-in ARO attribute macro accuracy.
pub const BUILTIN_ATTRIBUTE_MIN_COUNT: u64 = 1;

/// One classification set's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuiltinClassification {
    pub name: String,
    pub acc1: f64,
    /// `None` with fewer than 5 classes (CLIP_benchmark's rule).
    pub acc5: Option<f64>,
    pub mean_per_class_recall: f64,
    pub classes: usize,
    pub samples: u64,
    pub bad_samples: u64,
    /// Mean pairwise cosine of the class prompts' embeddings ([`crate::probe`]); near 1 when the
    /// text tower does not tell the classes apart.
    #[serde(default)]
    pub class_prompt_cosine: Option<f64>,
    /// Top-1 accuracy of a linear (ridge) probe on the frozen image embeddings
    /// ([`crate::probe`]): whether the images' embeddings hold the class at all.
    #[serde(default)]
    pub linear_probe_acc1: Option<f64>,
}

/// The retrieval set's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuiltinRetrieval {
    pub name: String,
    /// Text-to-image recall@1 (per caption query).
    pub image_recall_at_1: f64,
    /// Image-to-text recall@1 (per image query).
    pub text_recall_at_1: f64,
    pub image_recall_at_5: f64,
    pub text_recall_at_5: f64,
    pub image_recall_at_10: f64,
    pub text_recall_at_10: f64,
    /// DataComp's mean of the two recalls@1.
    pub mean_recall_at_1: f64,
    pub images: u64,
    pub texts: u64,
    pub bad_samples: u64,
}

/// One ARO-style set's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuiltinAro {
    pub name: String,
    /// Macro accuracy (over relations, or over attribute pairs with at least
    /// `attribute_min_count` cases); `None` when no group qualifies.
    pub macro_accuracy: Option<f64>,
    /// Accuracy over all cases.
    pub accuracy: f64,
    pub groups: usize,
    pub samples: u64,
    pub bad_samples: u64,
}

/// Everything the built-in suite measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuiltinReport {
    /// [`Encoder::describe`] of the model.
    pub model: String,
    pub eval_dir: String,
    pub classification: Vec<BuiltinClassification>,
    pub retrieval: BuiltinRetrieval,
    pub aro_attribute: BuiltinAro,
    pub aro_relation: BuiltinAro,
    /// The attribute-pair threshold used (see the module docs).
    pub attribute_min_count: u64,
    pub seconds: f64,
    /// The first bad samples over all sets, with the total count.
    pub bad: BadSamples,
}

impl BuiltinReport {
    /// Named scalars for logs and curves: `synth_shape/acc1`, `synth_color/acc1`,
    /// `synth_count/acc1`, `synth_retrieval/image_r1`, `synth_retrieval/text_r1`,
    /// `synth_retrieval/mean_r1`, `synth_aro_attribute/macro_acc`,
    /// `synth_aro_relation/macro_acc` (an ARO macro accuracy without a qualifying group falls
    /// back to the plain accuracy, under the name `.../acc`), and `builtin/mean` (the mean of the
    /// three accuracies, the retrieval mean recall@1 and the two ARO values).
    pub fn summary(&self) -> Vec<(String, f64)> {
        let mut out = Vec::new();
        for c in &self.classification {
            out.push((format!("{}/acc1", c.name), c.acc1));
        }
        // Diagnostics, not part of the headline mean.
        for c in &self.classification {
            if let Some(p) = c.linear_probe_acc1 {
                out.push((format!("{}/probe_acc1", c.name), p));
            }
            if let Some(p) = c.class_prompt_cosine {
                out.push((format!("{}/prompt_cosine", c.name), p));
            }
        }
        let r = &self.retrieval;
        out.push((format!("{}/image_r1", r.name), r.image_recall_at_1));
        out.push((format!("{}/text_r1", r.name), r.text_recall_at_1));
        out.push((format!("{}/mean_r1", r.name), r.mean_recall_at_1));
        let mut headline: Vec<f64> = self.classification.iter().map(|c| c.acc1).collect();
        headline.push(r.mean_recall_at_1);
        for a in [&self.aro_attribute, &self.aro_relation] {
            match a.macro_accuracy {
                Some(m) => {
                    out.push((format!("{}/macro_acc", a.name), m));
                    headline.push(m);
                }
                None => {
                    out.push((format!("{}/acc", a.name), a.accuracy));
                    headline.push(a.accuracy);
                }
            }
        }
        out.push((
            "builtin/mean".into(),
            headline.iter().sum::<f64>() / headline.len().max(1) as f64,
        ));
        out
    }

    /// Whether the [`Self::summary`] value `name` is a cosine (`.../prompt_cosine`, in [-1, 1],
    /// shown as a plain number) rather than an accuracy or a recall (in [0, 1], shown as a
    /// percentage). Every printer of the summary asks this.
    pub fn summary_value_is_cosine(name: &str) -> bool {
        name.ends_with("/prompt_cosine")
    }

    /// A short human-readable table.
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "built-in held-out sets ({}), model {}\n",
            self.eval_dir, self.model
        );
        for (name, v) in self.summary() {
            if Self::summary_value_is_cosine(&name) {
                s.push_str(&format!("  {name:<32} {v:>8.4}\n"));
            } else {
                s.push_str(&format!("  {name:<32} {:>7.2}%\n", 100.0 * v));
            }
        }
        if self.bad.count > 0 {
            s.push_str(&format!("  bad samples: {}\n", self.bad.count));
        }
        s
    }
}

fn metric(out: &TaskOutput, name: &str) -> Result<f64, EvalError> {
    out.metrics
        .get(name)
        .copied()
        .flatten()
        .ok_or_else(|| EvalError::Invalid(format!("metric {name} was not computed")))
}

/// Evaluate `encoder` on the built-in held-out sets under `eval_dir` (a corpus's `eval/` folder,
/// or the corpus root itself when it holds an `eval/` folder).
///
/// Every set must be present: a missing set is an error naming it (the corpus was written by an
/// older generator, or the path is wrong). Bad samples inside a set are counted, not fatal.
pub fn evaluate_builtin(
    encoder: &mut dyn Encoder,
    eval_dir: &Path,
    options: &RunOptions,
) -> Result<BuiltinReport, EvalError> {
    let started = Instant::now();
    let eval_dir = if eval_dir.join("eval").join("wds_synth_shape_test").is_dir() {
        eval_dir.join("eval")
    } else {
        eval_dir.to_path_buf()
    };
    let mut bad = BadSamples::default();
    let mut classification = Vec::new();
    for name in BUILTIN_CLASSIFICATION {
        let dir = eval_dir.join(format!("wds_{name}_test"));
        let ds = WdsDataset::open(&dir, "test").map_err(|e| missing_set(name, &eval_dir, e))?;
        let out = evaluate_classification(
            encoder,
            &ds,
            ClassificationExtra::Diagnostics,
            None,
            options,
            name,
        )?;
        let diagnostic = |key: &str| out.details.get(key).and_then(|v| v.as_f64());
        classification.push(BuiltinClassification {
            name: name.to_string(),
            acc1: metric(&out, "acc1")?,
            acc5: out.metrics.get("acc5").copied().flatten(),
            mean_per_class_recall: metric(&out, "mean_per_class_recall")?,
            classes: ds.classnames.len(),
            samples: out.samples,
            bad_samples: out.bad.count,
            class_prompt_cosine: diagnostic("class_prompt_cosine"),
            linear_probe_acc1: diagnostic("linear_probe_acc1"),
        });
        bad.merge(out.bad);
    }
    let dir = eval_dir.join(format!("wds_{BUILTIN_RETRIEVAL}_test"));
    let ds =
        WdsDataset::open(&dir, "test").map_err(|e| missing_set(BUILTIN_RETRIEVAL, &eval_dir, e))?;
    let out = evaluate_retrieval(encoder, &ds, None, options, BUILTIN_RETRIEVAL)?;
    let retrieval = BuiltinRetrieval {
        name: BUILTIN_RETRIEVAL.into(),
        image_recall_at_1: metric(&out, "image_retrieval_recall@1")?,
        text_recall_at_1: metric(&out, "text_retrieval_recall@1")?,
        image_recall_at_5: metric(&out, "image_retrieval_recall@5")?,
        text_recall_at_5: metric(&out, "text_retrieval_recall@5")?,
        image_recall_at_10: metric(&out, "image_retrieval_recall@10")?,
        text_recall_at_10: metric(&out, "text_retrieval_recall@10")?,
        mean_recall_at_1: metric(&out, "mean_recall@1")?,
        images: out.samples,
        texts: out.texts.unwrap_or(0),
        bad_samples: out.bad.count,
    };
    bad.merge(out.bad);
    let mut aro = Vec::new();
    for (name, kind) in [
        ("synth_aro_attribute", AroKind::Attribution),
        ("synth_aro_relation", AroKind::Relation),
    ] {
        let dir = eval_dir.join("aro").join(name);
        if !dir.join(kind.annotation_file()).is_file() {
            return Err(missing_set(
                name,
                &eval_dir,
                EvalError::dataset(dir.join(kind.annotation_file()), "missing"),
            ));
        }
        let out = evaluate_aro(
            encoder,
            &dir,
            kind,
            BUILTIN_ATTRIBUTE_MIN_COUNT,
            options,
            name,
        )?;
        let groups = out
            .details
            .get("groups")
            .and_then(|g| g.as_array())
            .map_or(0, |g| g.len());
        aro.push(BuiltinAro {
            name: name.to_string(),
            macro_accuracy: out.metrics.get("macro_accuracy").copied().flatten(),
            accuracy: metric(&out, "accuracy")?,
            groups,
            samples: out.samples,
            bad_samples: out.bad.count,
        });
        bad.merge(out.bad);
    }
    let aro_relation = aro
        .pop()
        .ok_or_else(|| EvalError::Invalid("ARO relation missing".into()))?;
    let aro_attribute = aro
        .pop()
        .ok_or_else(|| EvalError::Invalid("ARO attribute missing".into()))?;
    Ok(BuiltinReport {
        model: encoder.describe(),
        eval_dir: eval_dir.display().to_string(),
        classification,
        retrieval,
        aro_attribute,
        aro_relation,
        attribute_min_count: BUILTIN_ATTRIBUTE_MIN_COUNT,
        seconds: started.elapsed().as_secs_f64(),
        bad,
    })
}

fn missing_set(name: &str, eval_dir: &Path, e: EvalError) -> EvalError {
    EvalError::Task(format!(
        "built-in set {name} is not usable under {} ({e}); write the corpus with `hq-data synth --out DIR` and pass DIR or DIR/eval",
        eval_dir.display()
    ))
}
