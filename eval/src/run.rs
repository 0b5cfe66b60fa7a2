//! Running a selection of registry tasks: find each task's folder under the data root, evaluate
//! it, save its result as soon as it finishes (`OUT/tasks/<task>.json`, atomically), and skip
//! tasks already finished for the same model on a rerun. A task without data is reported as
//! missing (with where to get it); a task whose data is unusable is reported as failed with the
//! reason; the others run either way.

use std::path::{Path, PathBuf};

use crate::encoder::Encoder;
use crate::error::EvalError;
use crate::evaluate::{
    evaluate_aro, evaluate_classification, evaluate_retrieval, evaluate_winogavil, AroKind,
    ClassificationExtra, TaskOutput,
};
use crate::pipeline::RunOptions;
use crate::results::{write_json, CodeInfo, ModelInfo, RunResults, TaskResult, TaskStatus};
use crate::tasks::{TaskKind, TaskSpec};
use crate::wds::WdsDataset;

/// Everything a run needs besides the encoder.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub data_root: PathBuf,
    pub out_dir: PathBuf,
    pub tasks: Vec<&'static TaskSpec>,
    pub options: RunOptions,
    pub model: ModelInfo,
    pub code: CodeInfo,
    /// Re-evaluate tasks that already have a result for this model.
    pub force: bool,
}

/// The file a task's result is saved in.
pub fn task_file(out_dir: &Path, spec: &TaskSpec) -> PathBuf {
    out_dir
        .join("tasks")
        .join(format!("{}.json", spec.key.replace('/', "__")))
}

/// Where a task's data is: the first of its folder names present under `root`.
pub fn locate(root: &Path, spec: &TaskSpec) -> Option<PathBuf> {
    spec.dirs
        .iter()
        .map(|d| root.join(d))
        .find(|p| match spec.kind {
            TaskKind::AroRelation => p.join(AroKind::Relation.annotation_file()).is_file(),
            TaskKind::AroAttribution => p.join(AroKind::Attribution.annotation_file()).is_file(),
            TaskKind::WinoGavil => p.join("test.jsonl").is_file(),
            _ => p.is_dir(),
        })
}

/// Evaluate one task from its folder.
pub fn evaluate_task(
    encoder: &mut dyn Encoder,
    spec: &TaskSpec,
    dir: &Path,
    opts: &RunOptions,
) -> Result<TaskOutput, EvalError> {
    let message = spec.name;
    let expected = Some(spec.size);
    match spec.kind {
        TaskKind::Classification => {
            let ds = WdsDataset::open(dir, spec.split)?;
            evaluate_classification(
                encoder,
                &ds,
                ClassificationExtra::None,
                expected,
                opts,
                message,
            )
        }
        TaskKind::Wilds(w) => {
            let ds = WdsDataset::open(dir, spec.split)?;
            evaluate_classification(
                encoder,
                &ds,
                ClassificationExtra::Wilds(w),
                expected,
                opts,
                message,
            )
        }
        TaskKind::Fairness(f) => {
            let ds = WdsDataset::open(dir, spec.split)?;
            evaluate_classification(
                encoder,
                &ds,
                ClassificationExtra::Fairness(f),
                expected,
                opts,
                message,
            )
        }
        TaskKind::Retrieval => {
            let ds = WdsDataset::open(dir, spec.split)?;
            evaluate_retrieval(encoder, &ds, expected, opts, message)
        }
        TaskKind::WinoGavil => evaluate_winogavil(encoder, dir, opts, message),
        TaskKind::AroRelation => evaluate_aro(
            encoder,
            dir,
            AroKind::Relation,
            opts.aro_attribute_min_count,
            opts,
            message,
        ),
        TaskKind::AroAttribution => evaluate_aro(
            encoder,
            dir,
            AroKind::Attribution,
            opts.aro_attribute_min_count,
            opts,
            message,
        ),
    }
}

/// A saved result that a rerun may keep: done, same model, same sample limit.
fn reusable(path: &Path, cfg: &RunConfig) -> Option<TaskResult> {
    let bytes = std::fs::read(path).ok()?;
    let r: TaskResult = serde_json::from_slice(&bytes).ok()?;
    (r.status == TaskStatus::Done
        && r.model_fingerprint == cfg.model.fingerprint
        && r.limit == cfg.options.limit)
        .then_some(r)
}

/// Run every selected task and write `OUT/results.json` (plus the per-task files). `log` gets one
/// line per task as it ends. Returns the assembled results.
pub fn run_tasks(
    encoder: &mut dyn Encoder,
    cfg: &RunConfig,
    log: &mut dyn FnMut(&str),
) -> Result<RunResults, EvalError> {
    std::fs::create_dir_all(cfg.out_dir.join("tasks"))
        .map_err(|e| EvalError::io(cfg.out_dir.join("tasks"), e))?;
    let mut results = Vec::new();
    for (i, spec) in cfg.tasks.iter().enumerate() {
        let n = format!("[{}/{}]", i + 1, cfg.tasks.len());
        let file = task_file(&cfg.out_dir, spec);
        if !cfg.force {
            if let Some(r) = reusable(&file, cfg) {
                log(&format!(
                    "{n} {}: finished earlier ({}), kept",
                    spec.name,
                    format_value(r.main_value)
                ));
                results.push(r);
                continue;
            }
        }
        let Some(dir) = locate(&cfg.data_root, spec) else {
            let looked: Vec<String> = spec
                .dirs
                .iter()
                .map(|d| cfg.data_root.join(d).display().to_string())
                .collect();
            log(&format!(
                "{n} {}: missing (no {})",
                spec.name,
                looked.join(" or ")
            ));
            results.push(TaskResult::missing(
                spec,
                &looked.join(" or "),
                &cfg.model.fingerprint,
            ));
            continue;
        };
        let result = match evaluate_task(encoder, spec, &dir, &cfg.options) {
            Ok(out) => {
                let r = TaskResult::done(spec, out, cfg.options.limit, &cfg.model.fingerprint);
                log(&format!(
                    "{n} {}: {} = {} ({} samples, {} bad, {:.1} images/s)",
                    spec.name,
                    spec.main_metric,
                    format_value(r.main_value),
                    r.output.samples,
                    r.output.bad.count,
                    r.output.images_per_second
                ));
                r
            }
            // A broken model is not a data problem: stop the run.
            Err(EvalError::Encode(e)) => return Err(EvalError::Encode(e)),
            Err(e) => {
                log(&format!("{n} {}: FAILED: {e}", spec.name));
                TaskResult::failed(spec, e.to_string(), &cfg.model.fingerprint)
            }
        };
        write_json(&file, &result)?;
        results.push(result);
    }
    let run = RunResults::new(
        cfg.model.clone(),
        cfg.code.clone(),
        cfg.data_root.display().to_string(),
        cfg.options.clone(),
        results,
    );
    run.save(&cfg.out_dir.join("results.json"))?;
    Ok(run)
}

fn format_value(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".into(), |v| format!("{:.2}%", 100.0 * v))
}
