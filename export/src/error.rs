//! The crate's single error type.
//!
//! The builder checks what ONNX's checker would otherwise reject much later (and with less
//! context): data that does not fill the declared dims, a node reading a value nobody produced,
//! a name defined twice. Each variant names the tensor or node involved.

use std::path::PathBuf;

/// Shorthand for results of this crate.
pub type Result<T, E = ExportError> = std::result::Result<T, E>;

/// Everything that can go wrong while building or writing a model.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// A tensor's data length does not match the product of its dims.
    #[error(
        "tensor `{name}` has dims {dims:?} ({expected} elements) but {actual} values were given"
    )]
    DataLength {
        /// Tensor name.
        name: String,
        /// Declared dims.
        dims: Vec<usize>,
        /// Product of the dims (`usize::MAX` if it overflows).
        expected: usize,
        /// Number of values given.
        actual: usize,
    },

    /// A name that must not be empty was empty.
    #[error("empty {what} name")]
    EmptyName {
        /// What was being named (`node`, `input`, ...).
        what: &'static str,
    },

    /// A value (input, initializer or node output) was defined twice; ONNX graphs are in SSA form.
    #[error("value `{name}` is defined twice")]
    DuplicateValue {
        /// The value name.
        name: String,
    },

    /// Two nodes with the same name (names are what tools and error messages show).
    #[error("node name `{name}` is used twice")]
    DuplicateNode {
        /// The node name.
        name: String,
    },

    /// A node reads a value that no input, initializer or earlier node defines. Nodes must be added
    /// in topological order, as ONNX requires.
    #[error("node `{node}` reads `{input}`, which is not defined before it")]
    UnknownValue {
        /// The node name.
        node: String,
        /// The undefined input.
        input: String,
    },

    /// A declared graph output is never produced.
    #[error("graph output `{name}` is not produced by any node, input or initializer")]
    UndefinedOutput {
        /// The output name.
        name: String,
    },

    /// The serialised model would exceed protobuf's 2 GiB message limit; such weights need ONNX
    /// external data, which this builder does not write yet.
    #[error("serialised model is {bytes} bytes, over protobuf's 2 GiB limit (external data is not supported yet)")]
    TooLarge {
        /// Encoded size.
        bytes: usize,
    },

    /// A checkpoint that cannot be read or holds a tensor that cannot be exported.
    #[error("checkpoint `{path}`: {message}")]
    Checkpoint {
        /// The checkpoint file (or the path the user gave).
        path: PathBuf,
        /// What is wrong, naming the tensor where there is one.
        message: String,
    },

    /// The checkpoint's tensors do not match its model config (strict, like
    /// `load_state_dict(strict=True)`): every problem is listed by tensor name.
    #[error("checkpoint `{path}` does not match its model config: {}", mismatch_summary(.missing, .unexpected, .wrong_shape))]
    TensorMismatch {
        /// The checkpoint file.
        path: PathBuf,
        /// Tensors the config needs that the file lacks.
        missing: Vec<String>,
        /// Tensors in the file the config has no place for.
        unexpected: Vec<String>,
        /// `name (checkpoint [..], config [..])` for each tensor of the wrong shape.
        wrong_shape: Vec<String>,
    },

    /// The model config is missing, unreadable, unknown or asks for something the exporter does
    /// not implement.
    #[error("model config: {0}")]
    Config(String),

    /// The requested output format cannot represent this model (e.g. a Hugging Face CLIP layout
    /// for an open_clip feature Hugging Face's CLIP lacks).
    #[error("{format} export: {reason}")]
    Unsupported {
        /// The output format.
        format: &'static str,
        /// Which feature is in the way.
        reason: String,
    },

    /// Writing the file failed.
    #[error("{action} `{path}`: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// How many names of each kind [`ExportError::TensorMismatch`] prints before summarising.
const LIST_LIMIT: usize = 20;

fn list(names: &[String]) -> String {
    let mut s = names
        .iter()
        .take(LIST_LIMIT)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > LIST_LIMIT {
        s.push_str(&format!(", ... and {} more", names.len() - LIST_LIMIT));
    }
    s
}

fn mismatch_summary(missing: &[String], unexpected: &[String], wrong_shape: &[String]) -> String {
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!("{} missing: {}", missing.len(), list(missing)));
    }
    if !unexpected.is_empty() {
        parts.push(format!(
            "{} unexpected: {}",
            unexpected.len(),
            list(unexpected)
        ));
    }
    if !wrong_shape.is_empty() {
        parts.push(format!(
            "{} with the wrong shape: {}",
            wrong_shape.len(),
            list(wrong_shape)
        ));
    }
    parts.join("; ")
}
