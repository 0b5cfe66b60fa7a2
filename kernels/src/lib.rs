//! HQ-CLIP's loss kernels: the three Stage-2 losses, forward and backward, each in two
//! implementations that compute the same function, plus a plain f64 reference for tests.
//!
//! | loss | CUDA (`cuda/*.cu`, NVRTC + cudarc) | CPU (`cpu/`, rayon) | reference |
//! |---|---|---|---|
//! | contrastive (CLIP), fused, O(N*D) memory | `clip.cu` | `cpu/clip.rs` | [`reference::clip_symmetric`], [`reference::clip_local`] |
//! | gated hard-negative identification (HNI) | `hni.cu` | `cpu/hni.rs` | [`reference::hni`] |
//! | short-tag classification (sparse BCE) | `bce.cu` | `cpu/bce.rs` | [`reference::bce`] |
//!
//! The training loop calls the tch entry points — [`clip_loss`], [`clip_loss_local`],
//! [`hni_loss`], [`short_tag_bce`] (each with a `*_with(.., &Options)` variant) — like any tch op:
//! they return a scalar loss attached to autograd (see [`ops`] for how). CUDA tensors run the
//! CUDA kernels when a driver is present, everything else the CPU code; nothing panics on a
//! machine without a GPU. [`cpu`] exposes the CPU implementations on plain slices.
//!
//! # Definitions and the choices the paper leaves open
//! Notation: n local rows (= N on one process), m gathered columns, D the embedding width.
//! - **Scale.** Every loss takes the multiplier `s = exp(logit_scale)` (already clamped at 100 by
//!   the training loop, as CLIP does), not the log-scale, exactly as open_clip's `ClipLoss`
//!   receives it. The gradient reported for it is dL/ds; autograd continues it through the exp.
//!   `s` must be finite and positive.
//! - **Contrastive:** `L_clip = 0.5 CE_rows(s X Y^T, i) + 0.5 CE_cols(s X Y^T, i)`, each CE a mean
//!   over rows. Distributed (open_clip `--local-loss`): `0.5 CE(s x_l y_all^T, off+i) + 0.5
//!   CE(s y_l x_all^T, off+i)`, means over the n local rows; with one rank it equals the above.
//! - **HNI:** `L_HNI = -(1/n) sum_i k_i log(e^{s x_i.y_i} / (e^{s x_i.y_i} + sum_{j=1..N-}
//!   e^{s x_i.y-_ij}))`, any `N- >= 1`. `k_i` gates the whole term (the paper writes it inside
//!   the log; log 0 is undefined), normalised by n (not by `sum k_i`), not differentiated.
//!   `k_i = 1` iff `argmax_j x_i.y_j == off + i` over the batch's (gathered) texts; **ties go to
//!   the positive** (`k_i = 1` when the label's logit equals the row maximum), a rule that does not
//!   depend on column order. It is evaluated on the same f32 logits the contrastive pass computes,
//!   which is why it is free there.
//! - **STC:** `L_cls = -(1/N) sum_i sum_k [t log sigma(z) + (1-t) log(1-sigma(z))]`: mean over N,
//!   **sum over K**, as the formula says. torch's `BCEWithLogits` default (mean over N*K) is this
//!   divided by K. Targets are sparse (CSR, [`TagTargets`]); an index outside `0..K` or listed
//!   twice in a row is an error.
//! - **Precision:** f32 inputs and products; f64 for every sum over a row, a column or the batch,
//!   for log-sum-exps and for the loss. Other float dtypes are converted to f32 (gradients flow
//!   back through the cast).
//!
//! See `README.md` in the crate for the kernel design, the CUDA stream contract and the tests.

pub mod cpu;
pub mod cuda;
pub mod error;
pub mod ops;
pub mod reference;
pub mod targets;
#[cfg(feature = "testing")]
pub mod testing;
pub mod validate;

pub use cpu::Isa;
pub use error::{KernelError, Result};
pub use ops::{
    clip_loss, clip_loss_local, clip_loss_local_with, clip_loss_with, hni_loss, hni_loss_with,
    row_gate, row_gate_with, short_tag_bce, short_tag_bce_with, Backend, ClipLoss, Options,
};
pub use targets::TagTargets;
pub use validate::Mat;
