//! The crate's one error type. Problems with a single sample never become an [`EvalError`]: they
//! are counted and listed in the task's result ([`crate::pipeline::BadSamples`]) and the task goes
//! on. An `EvalError` means a whole task (or the run) cannot go on.

use std::path::PathBuf;

use crate::encoder::EncodeError;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// The model backend failed.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// Reading, tokenising or writing through `hq-data` failed.
    #[error(transparent)]
    Data(#[from] hq_data::DataError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A dataset that cannot be evaluated (missing metadata, no usable sample, bad layout).
    #[error("{path}: {reason}")]
    Dataset { path: PathBuf, reason: String },
    /// A task that is not in the registry, or not found under the data root.
    #[error("{0}")]
    Task(String),
    /// An invalid option or input to a metric.
    #[error("{0}")]
    Invalid(String),
    /// Drawing a chart failed.
    #[error("chart {path}: {reason}")]
    Chart { path: PathBuf, reason: String },
}

impl EvalError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        EvalError::Io {
            path: path.into(),
            source,
        }
    }

    pub fn dataset(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        EvalError::Dataset {
            path: path.into(),
            reason: reason.into(),
        }
    }
}
