//! Results of a run: one [`TaskResult`] per task (saved as it finishes), DataComp's aggregates,
//! and the run's provenance (model, data, code version). Files are JSON, written atomically.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::EvalError;
use crate::evaluate::TaskOutput;
use crate::pipeline::RunOptions;
use crate::tasks::{datacomp_tasks, Group, TaskSpec, DATACOMP_TASKS};

/// Version of the results file layout.
pub const RESULTS_FORMAT: u32 = 1;

/// What was evaluated.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// Short label for tables (`--name`, else the checkpoint's file name).
    pub label: String,
    /// [`crate::Encoder::describe`].
    pub encoder: String,
    pub checkpoint: Option<String>,
    /// Identity of the weights (path, size, modification time) deciding whether saved task
    /// results belong to this model.
    pub fingerprint: String,
}

/// Which code produced the numbers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CodeInfo {
    pub hq_eval: String,
    pub git_commit: Option<String>,
}

impl CodeInfo {
    /// This crate's version, and the commit when the caller knows it.
    pub fn current(git_commit: Option<String>) -> Self {
        CodeInfo {
            hq_eval: env!("CARGO_PKG_VERSION").to_string(),
            git_commit,
        }
    }
}

/// How a task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    Done,
    /// The data was there but unusable, or the model failed; `reason` says why.
    Failed,
    /// No data folder under the data root; `source` says where to get it.
    Missing,
}

/// One task's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskResult {
    pub key: String,
    pub name: String,
    pub kind: String,
    pub main_metric: String,
    pub status: TaskStatus,
    /// The main metric's value (done tasks).
    pub main_value: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Only the first N samples were evaluated (`--limit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    /// The model fingerprint the result belongs to.
    pub model_fingerprint: String,
    #[serde(default)]
    pub output: TaskOutput,
}

impl TaskResult {
    pub fn missing(spec: &TaskSpec, looked_in: &str, fingerprint: &str) -> Self {
        TaskResult {
            key: spec.key.into(),
            name: spec.name.into(),
            kind: spec.kind.label().into(),
            main_metric: spec.main_metric.into(),
            status: TaskStatus::Missing,
            main_value: None,
            reason: Some(format!("no data: looked for {looked_in}")),
            source: Some(spec.source.into()),
            limit: None,
            model_fingerprint: fingerprint.into(),
            output: TaskOutput::default(),
        }
    }

    pub fn failed(spec: &TaskSpec, reason: String, fingerprint: &str) -> Self {
        TaskResult {
            status: TaskStatus::Failed,
            reason: Some(reason),
            source: None,
            ..TaskResult::missing(spec, "", fingerprint)
        }
    }

    pub fn done(
        spec: &TaskSpec,
        output: TaskOutput,
        limit: Option<u64>,
        fingerprint: &str,
    ) -> Self {
        let main_value = output.metrics.get(spec.main_metric).copied().flatten();
        let reason = match main_value {
            Some(_) => None,
            None => Some(
                output
                    .unavailable
                    .get(spec.main_metric)
                    .cloned()
                    .unwrap_or_else(|| format!("{} is undefined on this data", spec.main_metric)),
            ),
        };
        TaskResult {
            key: spec.key.into(),
            name: spec.name.into(),
            kind: spec.kind.label().into(),
            main_metric: spec.main_metric.into(),
            status: TaskStatus::Done,
            main_value,
            reason,
            source: None,
            limit,
            model_fingerprint: fingerprint.into(),
            output,
        }
    }
}

/// One aggregate (a group mean, ImageNet, or the mean over the 38 tasks).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Aggregate {
    /// `ImageNet`, `IN-shifts`, `VTAB`, `Retrieval` or `Avg`.
    pub name: String,
    pub value: Option<f64>,
    /// Tasks whose main metric went into the value.
    pub present: usize,
    pub total: usize,
    /// Some member is missing, failed or has no main value: the value is over fewer tasks.
    pub partial: bool,
    pub missing: Vec<String>,
}

/// DataComp's aggregates over main metrics by display name (`aggregate_scores.py`: ImageNet 1k,
/// the mean of each group, and the plain mean of all 38), marking partial ones.
pub fn aggregates(main: &BTreeMap<String, f64>) -> Vec<Aggregate> {
    let mut out = Vec::new();
    let make = |name: &str, members: Vec<&'static TaskSpec>| -> Aggregate {
        let values: Vec<f64> = members
            .iter()
            .filter_map(|t| main.get(t.name).copied())
            .collect();
        let missing: Vec<String> = members
            .iter()
            .filter(|t| !main.contains_key(t.name))
            .map(|t| t.name.to_string())
            .collect();
        Aggregate {
            name: name.to_string(),
            value: (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64),
            present: values.len(),
            total: members.len(),
            partial: !missing.is_empty(),
            missing,
        }
    };
    for g in Group::ALL {
        out.push(make(
            g.short(),
            datacomp_tasks().filter(|t| t.groups.contains(&g)).collect(),
        ));
    }
    let all: Vec<&'static TaskSpec> = datacomp_tasks().collect();
    debug_assert_eq!(all.len(), DATACOMP_TASKS);
    out.push(make("Avg", all));
    out
}

/// A whole run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunResults {
    pub format: u32,
    pub model: ModelInfo,
    pub code: CodeInfo,
    pub data_root: String,
    pub options: RunOptions,
    /// Seconds since the Unix epoch when the results were assembled.
    pub created_unix: u64,
    pub tasks: Vec<TaskResult>,
    pub aggregates: Vec<Aggregate>,
}

impl RunResults {
    /// Assemble results and compute the aggregates from the done tasks' main values.
    pub fn new(
        model: ModelInfo,
        code: CodeInfo,
        data_root: String,
        options: RunOptions,
        tasks: Vec<TaskResult>,
    ) -> Self {
        let aggregates = aggregates(&main_values(&tasks));
        RunResults {
            format: RESULTS_FORMAT,
            model,
            code,
            data_root,
            options,
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            tasks,
            aggregates,
        }
    }

    pub fn aggregate(&self, name: &str) -> Option<&Aggregate> {
        self.aggregates.iter().find(|a| a.name == name)
    }

    pub fn task(&self, key_or_name: &str) -> Option<&TaskResult> {
        self.tasks
            .iter()
            .find(|t| t.key == key_or_name || t.name == key_or_name)
    }

    pub fn save(&self, path: &Path) -> Result<(), EvalError> {
        write_json(path, self)
    }

    pub fn load(path: &Path) -> Result<Self, EvalError> {
        let bytes = std::fs::read(path).map_err(|e| EvalError::io(path, e))?;
        let r: RunResults = serde_json::from_slice(&bytes).map_err(|e| EvalError::Json {
            path: path.to_path_buf(),
            source: e,
        })?;
        if r.format != RESULTS_FORMAT {
            return Err(EvalError::dataset(
                path,
                format!(
                    "results format {} is not supported (this is format {RESULTS_FORMAT})",
                    r.format
                ),
            ));
        }
        Ok(r)
    }
}

/// Main values of done tasks by display name.
pub fn main_values(tasks: &[TaskResult]) -> BTreeMap<String, f64> {
    tasks
        .iter()
        .filter(|t| t.status == TaskStatus::Done)
        .filter_map(|t| t.main_value.map(|v| (t.name.clone(), v)))
        .collect()
}

/// Pretty JSON with NaN / infinite values written as `null` (JSON has no NaN), atomically.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), EvalError> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| EvalError::Invalid(format!("serialising {}: {e}", path.display())))?;
    hq_data::atomic::write_atomic(path, format!("{text}\n").as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_aggregates() {
        let mut main = BTreeMap::new();
        main.insert("ImageNet 1k".to_string(), 0.5);
        main.insert("ImageNet v2".to_string(), 0.4);
        main.insert("ImageNet-A".to_string(), 0.2);
        let a = aggregates(&main);
        assert_eq!(a[0].name, "ImageNet");
        assert_eq!(a[0].value, Some(0.5));
        assert!(!a[0].partial);
        assert!((a[1].value.unwrap_or(0.0) - 0.3).abs() < 1e-12);
        assert!(a[1].partial);
        assert_eq!(a[1].missing.len(), 4);
        assert_eq!(a[2].value, None);
        assert_eq!(a[4].present, 3);
        assert_eq!(a[4].total, 38);
    }
}
