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
