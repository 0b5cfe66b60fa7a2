//! The crate's one error type, and the per-sample error record that bad input turns into.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Errors that stop an operation (a file that cannot be opened, an invalid setting). Problems with
/// one sample never become a `DataError`: they become a [`SampleError`] record and the work goes on.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid shard specification {spec:?}: {reason}")]
    ShardSpec { spec: String, reason: String },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("tag vocabulary {path}: {reason}")]
    Vocab { path: PathBuf, reason: String },
    #[error("invalid setting: {0}")]
    Invalid(String),
    #[error("image: {0}")]
    Image(String),
}

impl DataError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = DataError> = std::result::Result<T, E>;

/// A sample that could not be read, with enough context to find it again: the shard it came from,
/// its key (empty when the damage hides the key), and a human-readable reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SampleError {
    pub shard: String,
    pub key: String,
    pub reason: String,
}

impl std::fmt::Display for SampleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let key = if self.key.is_empty() {
            "<unknown key>"
        } else {
            &self.key
        };
        write!(f, "{}: {}: {}", self.shard, key, self.reason)
    }
}
