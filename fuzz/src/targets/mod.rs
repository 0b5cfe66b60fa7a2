//! One target per parser of outside input; each panics when one of its properties fails.

pub mod data;
pub mod eval;
#[cfg(feature = "runtime")]
pub mod runtime;
#[cfg(feature = "train")]
pub mod train;
