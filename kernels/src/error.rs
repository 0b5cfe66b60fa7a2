//! The crate's error type. Every bad input is reported by name (which argument, which shape, which
//! row); nothing in this crate panics on bad input or on a machine without a GPU.

use thiserror::Error;

/// Everything that can go wrong in a loss call.
#[derive(Debug, Error)]
pub enum KernelError {
    /// A tensor or slice has the wrong number of dimensions or the wrong extent.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A batch (or class count, or embedding width) of zero.
    #[error("empty input: {0}")]
    Empty(String),
    /// A NaN or an infinity in an input.
    #[error("non-finite value in {what}: {detail}")]
    NonFinite {
        /// Which argument.
        what: &'static str,
        /// Where, or how many.
        detail: String,
    },
    /// A tag index outside `0..K`, a repeated tag in one row, or a malformed CSR row pointer.
    #[error("bad tag targets: {0}")]
    Targets(String),
    /// An argument that is well shaped but out of its domain (an offset past the gathered batch,
    /// a gate that is not 0/1, an unsupported dtype, tensors on different devices).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// libnvrtc could not be loaded (the message lists where it was looked for).
    #[error("NVRTC is not available: {0}")]
    NvrtcUnavailable(String),
    /// NVRTC rejected a kernel source; `log` is the compiler's log.
    #[error("NVRTC failed to compile {file} ({options}): {log}")]
    Compile {
        /// The `.cu` file.
        file: &'static str,
        /// The options it was compiled with.
        options: String,
        /// The compiler log.
        log: String,
    },
    /// A CUDA driver call failed (context creation, module load, launch).
    #[error("CUDA driver error during {during}: {message}")]
    Driver {
        /// What was being done.
        during: String,
        /// The driver's message.
        message: String,
    },
    /// libtorch reported an error.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// The CUDA emulator used by the tests reported a failure.
    #[error("CUDA emulator: {0}")]
    Emulator(String),
}

/// The crate's result type.
pub type Result<T, E = KernelError> = std::result::Result<T, E>;
