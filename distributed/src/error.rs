//! The crate's one error type.

use thiserror::Error;

/// What can go wrong setting up or running collectives.
#[derive(Debug, Error)]
pub enum DistError {
    /// The launch environment is incomplete or inconsistent (which variable, and why).
    #[error("distributed launch environment: {0}")]
    Env(String),
    /// c10d reported an error (its message: a timeout, a peer that closed the connection, ...).
    #[error("{0}")]
    C10d(String),
    /// A tensor argument that the operation cannot take.
    #[error("bad tensor for {op}: {why}")]
    Tensor {
        /// The collective.
        op: &'static str,
        /// What is wrong.
        why: String,
    },
    /// Starting or watching local worker processes failed.
    #[error("launcher: {0}")]
    Launch(String),
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, DistError>;
