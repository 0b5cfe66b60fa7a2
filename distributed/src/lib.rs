//! Collectives for data-parallel training on the engine the field already runs: libtorch's own
//! c10d (the C++ under `torch.distributed` and `torchrun`), bound from Rust through a small C++
//! shim compiled against the torch wheel's headers (`csrc/c10d_shim.cpp`).
//!
//! - [`Rendezvous`]: a rank's place in the job, from torchrun's or Slurm's variables.
//! - [`ProcessGroup`]: TCPStore on rank 0, then ProcessGroupGloo (CPU) or ProcessGroupNCCL (CUDA);
//!   all-reduce (sum, average, max, min), all-gather, broadcast, barrier, each bounded by the
//!   group's timeout, so a dead or hung peer is an error, not a hang.
//! - [`launch`]: `--nproc-per-node` on one machine, torchrun's variables on loopback.
//!
//! The crate knows tensors and processes, not CLIP; hq-train builds data parallelism on it.

mod error;
mod ffi;
mod group;
pub mod launch;
pub mod rendezvous;

pub use error::{DistError, Result};
pub use group::{Backend, GradReducer, ProcessGroup, ReduceOp};
pub use rendezvous::{Launcher, Rendezvous};
