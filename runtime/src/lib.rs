//! ONNX Runtime for HQ-CLIP, through [`ort`] with its `load-dynamic` feature.
//!
//! Why this crate exists rather than calling ort directly:
//! - **Loading never panics.** ort loads `libonnxruntime` lazily and panics when the path is wrong;
//!   [`init`] / [`init_from`] load it up front and return [`RuntimeError`] instead. Every session
//!   constructor here initialises first, so no ort call can hit the lazy path.
//! - **No silent CPU fallback.** ONNX Runtime treats a provider that fails to register as optional.
//!   An [`ExecutionProvider`] other than CPU is checked against the loaded build and registered with
//!   ort's `error_on_failure`, so asking for CUDA or TensorRT either gets it or an error naming it.
//! - **Checked f32 I/O.** [`Session::run_f32`] takes ndarray views and checks names and shapes
//!   against the model's declarations, with errors that name the input.
//!
//! ```no_run
//! # fn main() -> Result<(), hq_runtime::RuntimeError> {
//! use hq_runtime::{ndarray::Array2, ExecutionProvider};
//! let provider: ExecutionProvider = "cpu".parse()?;
//! let mut session = hq_runtime::load_session("model.onnx", &provider)?;
//! let x = Array2::<f32>::zeros((2, 3)).into_dyn();
//! let outputs = session.run_f32(&[("x", x.view())])?;
//! println!("{:?}", outputs.get("y")?.shape());
//! # Ok(())
//! # }
//! ```
//!
//! On top of the session layer: [`qwen2vl`], a Qwen2-VL engine over the three-file ONNX layout of
//! transformers.js / onnx-community (batched generation with the key/value cache, tested token for
//! token against HF `generate`), and [`recaption`], the resumable recaption job behind the
//! `hq-recap-trt` binary.
//!
//! The ONNX Runtime library comes from the `onnxruntime` (CPU) or `onnxruntime-gpu` wheel; set
//! `ORT_DYLIB_PATH` to its `libonnxruntime.so.<version>` (`tools/env.sh` does), or pass the path to
//! [`init_from`]. The library is loaded once per process.

pub mod clip_encoder;
mod env;
mod error;
pub mod plan;
mod provider;
pub mod qwen2vl;
pub mod recaption;
mod session;

pub use clip_encoder::{ClipModelInfo, OnnxClipEncoder, OnnxEncoderOptions};
pub use env::{init, init_from, runtime, Runtime};
pub use error::{Result, RuntimeError};
pub use provider::{ExecutionProvider, PROVIDER_CHOICES};
pub use session::{load_session, Dim, Outputs, Session, SessionOptions, TensorInfo};

/// The ndarray version ort is built against; use it for inputs to avoid a version mismatch.
pub use ndarray;
