//! Writing ONNX models from Rust.
//!
//! HQ-CLIP's encoders are exported from the Rust model, not through PyTorch, so the weights and the
//! graph come from the same code that trains them. ONNX is a protobuf format; this crate compiles the
//! ONNX schema (`proto/onnx.proto`, vendored from the `onnx` wheel) with protox + prost-build at build
//! time, so no `protoc` is needed, and adds a small [`GraphBuilder`] / [`ModelBuilder`] on top that
//! catches structural mistakes (undefined or doubly defined values, wrong data lengths) where they
//! are made.
//!
//! ```
//! # fn main() -> Result<(), hq_export::ExportError> {
//! use hq_export::{ElemType, GraphBuilder, ModelBuilder};
//! let mut g = GraphBuilder::new("affine");
//! let x = g.input("x", ElemType::F32, &["batch".into(), 2.into()])?;
//! let w = g.initializer_f32("w", &[2, 2], &[1.0, 2.0, 3.0, 4.0])?;
//! let b = g.initializer_f32("b", &[2], &[0.5, -0.5])?;
//! let xw = g.op("MatMul", "matmul", &[&x, &w], [])?;
//! let y = g.op("Add", "y", &[&xw, &b], [])?;
//! g.output(&y, ElemType::F32, &["batch".into(), 2.into()])?;
//! let bytes = ModelBuilder::new(g).opset("", 17).metadata("embed_dim", "2").to_bytes()?;
//! assert!(!bytes.is_empty());
//! # Ok(())
//! # }
//! ```
//!
//! On top of the builder:
//! - [`checkpoint`]: reads a CLIP checkpoint (safetensors under open_clip's names, any float dtype)
//!   without libtorch, hashes it, finds its model config, and checks every tensor against the config;
//! - [`clip`]: the image and text towers as ONNX models (opset 17, dynamic batch, fp32 or fp16,
//!   normalised or raw embeddings, metadata with the config and the checkpoint's SHA-256);
//! - [`formats`]: the open_clip and Hugging Face `CLIPModel` checkpoint layouts;
//! - the `hq-export` binary over all three.
//!
//! Not yet supported: external data (models over protobuf's 2 GiB limit are refused with
//! [`ExportError::TooLarge`]), sparse initializers, subgraph attributes.

/// Types generated from `onnx.proto` (package `onnx`). Optional proto2 fields are `Option`s.
#[allow(missing_docs, clippy::all, clippy::pedantic, rustdoc::all)]
pub mod onnx {
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}

pub mod checkpoint;
pub mod clip;
mod error;
pub mod formats;
mod graph;
mod model;
mod tensor;

pub use error::{ExportError, Result};
pub use graph::{Attr, Dim, GraphBuilder, Node};
pub use model::{encode, write_atomic, ModelBuilder, DEFAULT_IR_VERSION, DEFAULT_OPSET};
pub use prost;
pub use tensor::{
    f16_bits_to_f32, f32_to_f16_bits, tensor_f16, tensor_f16_bits, tensor_f32, tensor_i32,
    tensor_i64, ElemType,
};
