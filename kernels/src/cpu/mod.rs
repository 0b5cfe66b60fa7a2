//! CPU implementations on plain f32 slices (rayon, a few large jobs per call, see `par.rs`;
//! cache-blocked; f32 products with f64 accumulation; scratch pooled across calls, `pool.rs`). The tch entry points in the crate root call these for CPU tensors; tests and
//! benches can call them directly.
//!
//! Every function validates its input first (shapes, N = 0, non-finite values, offsets, tag
//! indices) and returns [`KernelError`] naming the problem.

pub(crate) mod bce;
pub(crate) mod clip;
pub(crate) mod clip_dense;
pub(crate) mod hni;
pub(crate) mod par;
pub(crate) mod pool;
pub(crate) mod simd;

pub use clip_dense::dense_pays;
pub use simd::Isa;

use crate::error::{KernelError, Result};
use crate::targets::TagTargets;
use crate::validate::{
    check_finite, check_gate, check_nonempty, check_offset, check_same_rows, check_same_width,
    check_scale, Mat,
};
use clip::{ColNorm, GradSpec, Problem};

fn check_isa(isa: Isa) -> Result<()> {
    if isa.is_available() {
        Ok(())
    } else {
        Err(KernelError::Invalid(format!(
            "this CPU cannot run the {isa:?} code path"
        )))
    }
}

/// Result of [`clip_loss`].
#[derive(Debug, Clone)]
pub struct ClipOutput {
    /// `0.5 CE_rows + 0.5 CE_cols` (each a mean over rows), in f64.
    pub loss: f64,
    /// 1.0 where row i's most similar text is its own (ties count as its own), else 0.0.
    pub gate: Vec<f32>,
    /// Gradients, when asked for.
    pub grads: Option<ClipGrads>,
}

/// Gradients of the symmetric contrastive loss.
#[derive(Debug, Clone)]
pub struct ClipGrads {
    /// dL/dX (N x D).
    pub dx: Vec<f32>,
    /// dL/dY (N x D).
    pub dy: Vec<f32>,
    /// dL/ds, s the logit multiplier.
    pub dscale: f64,
}

/// Fused symmetric CLIP loss `0.5 CE(s X Y^T, i) + 0.5 CE(s Y X^T, i)` over N image rows `x` and
/// N text rows `y` (D wide, normally L2-normalised, not required), `scale` = s.
pub fn clip_loss(x: Mat, y: Mat, scale: f32, grads: bool, isa: Isa) -> Result<ClipOutput> {
    check_isa(isa)?;
    check_nonempty("x (image embeddings)", &x)?;
    check_same_width("x", &x, "y", &y)?;
    check_same_rows("x", &x, "y", &y)?;
    check_scale(scale as f64)?;
    let (n, d) = (x.rows, x.cols);
    // Packing reads every value: it also checks they are finite (located only on failure).
    let (ra, ca, finite) = clip::pack(&[(x.data, n)], &[(y.data, n)], d, grads);
    if !finite {
        check_finite("x (image embeddings)", x.data, x.cols)?;
        check_finite("y (text embeddings)", y.data, y.cols)?;
    }
    let p = Problem {
        a: &ra[0],
        b: &ca[0],
        scale,
        diag_off: 0,
    };
    // Small problems keep pass 1's tiles for pass 2 (see `clip::keep_tiles`).
    let mut kept = (grads && clip::keep_tiles(n, n, d)).then(|| pool::dirty(clip::kept_len(n, n)));
    let (rows, lse_c) = clip::stats(isa, &p, true, kept.as_deref_mut());
    let lse_c = lse_c.ok_or_else(|| KernelError::Invalid("column statistics missing".into()))?;
    // Label logits are the f32 tile values the log-sum-exps were built from (S_ii is the same
    // element for the row and the column term).
    let mut total = 0.0f64;
    for i in 0..n {
        let diag = rows.diag[i] as f64;
        total += rows.ce(i) + ((lse_c.m[i] as f64 - diag) + lse_c.t[i]);
    }
    let loss = total / (2.0 * n as f64);
    let gate = rows.gate.clone();
    let grads = if grads {
        let w = 0.5 / n as f64;
        let diag = rows.diag.clone();
        let spec = GradSpec {
            w_row: w,
            cols: Some(ColNorm {
                lse: &lse_c,
                diag: &diag,
                w,
            }),
            w_diag: 1.0 / n as f64,
            strip: false,
            kept: kept.as_deref(),
        };
        let g = clip::grads(isa, &p, &spec, Some(rows));
        Some(ClipGrads {
            dx: g.da,
            dy: g.db,
            dscale: g.ds,
        })
    } else {
        None
    };
    if let Some(k) = kept {
        pool::give(k);
    }
    Ok(ClipOutput { loss, gate, grads })
}

/// Result of [`clip_loss_from_products`].
#[derive(Debug, Clone)]
pub struct DenseClipOutput {
    /// `0.5 CE_rows + 0.5 CE_cols` (each a mean over rows), in f64.
    pub loss: f64,
    /// As [`ClipOutput::gate`].
    pub gate: Vec<f32>,
    /// dL/ds, when gradients were asked for (the products then hold `s G`).
    pub dscale: Option<f64>,
}

/// The loss of [`clip_loss`] for small batches (see [`dense_pays`]), from the unscaled products
/// `products = X Y^T` (n x n, row-major) computed by a BLAS: the fused element-wise part of the
/// loss (`clip_dense.rs`). With `grads`, `products` is overwritten with `s G`, `G` = dL/dlogits,
/// so that `dX = (s G) Y` and `dY = (s G)^T X` are two more BLAS products.
pub fn clip_loss_from_products(
    products: &mut [f32],
    n: usize,
    scale: f32,
    grads: bool,
    isa: Isa,
) -> Result<DenseClipOutput> {
    check_isa(isa)?;
    if n == 0 {
        return Err(KernelError::Empty("the products are 0 x 0 (N = 0)".into()));
    }
    if products.len() != n * n {
        return Err(KernelError::Shape(format!(
            "{} products given for an {n} x {n} logit matrix",
            products.len()
        )));
    }
    check_scale(scale as f64)?;
    check_finite("logits X Y^T", products, n)?;
    let out = clip_dense::symmetric(isa, products, n, scale, grads);
    Ok(DenseClipOutput {
        loss: out.loss,
        gate: out.gate,
        dscale: out.dscale,
    })
}

/// Result of [`clip_loss_local`].
#[derive(Debug, Clone)]
pub struct LocalClipOutput {
    /// `0.5 CE(s x_l y_all^T, off+i) + 0.5 CE(s y_l x_all^T, off+i)`, means over the local rows.
    pub loss: f64,
    /// Gate of each local image row over the gathered texts (label `offset + i`).
    pub gate: Vec<f32>,
    /// Gradients, when asked for.
    pub grads: Option<LocalClipGrads>,
}

/// Gradients of the local contrastive loss.
#[derive(Debug, Clone)]
pub struct LocalClipGrads {
    /// dL/dx_local (n x D).
    pub dx_local: Vec<f32>,
    /// dL/dy_local (n x D).
    pub dy_local: Vec<f32>,
    /// dL/dx_all (m x D).
    pub dx_all: Vec<f32>,
    /// dL/dy_all (m x D).
    pub dy_all: Vec<f32>,
    /// dL/ds.
    pub dscale: f64,
}

/// open_clip's local loss for distributed training: this rank's n rows against the m gathered
/// columns, labels `offset + i`. With `x_all = x_local`, `y_all = y_local`, `offset = 0` it equals
/// [`clip_loss`] (the gradients then split into a local and an "all" part that add up).
#[allow(clippy::too_many_arguments)]
pub fn clip_loss_local(
    x_local: Mat,
    y_local: Mat,
    x_all: Mat,
    y_all: Mat,
    offset: usize,
    scale: f32,
    grads: bool,
    isa: Isa,
) -> Result<LocalClipOutput> {
    check_isa(isa)?;
    check_nonempty("x_local", &x_local)?;
    check_nonempty("x_all", &x_all)?;
    check_same_width("x_local", &x_local, "y_local", &y_local)?;
    check_same_width("x_local", &x_local, "x_all", &x_all)?;
    check_same_width("x_local", &x_local, "y_all", &y_all)?;
    check_same_rows("x_local", &x_local, "y_local", &y_local)?;
    check_same_rows("x_all", &x_all, "y_all", &y_all)?;
    check_offset(offset, x_local.rows, x_all.rows)?;
    check_scale(scale as f64)?;
    let (n, m, d) = (x_local.rows, x_all.rows, x_local.cols);
    let (ra, ca, finite) = clip::pack(
        &[(x_local.data, n), (y_local.data, n)],
        &[(x_all.data, m), (y_all.data, m)],
        d,
        grads,
    );
    if !finite {
        check_finite("x_local", x_local.data, x_local.cols)?;
        check_finite("y_local", y_local.data, y_local.cols)?;
        check_finite("x_all", x_all.data, x_all.cols)?;
        check_finite("y_all", y_all.data, y_all.cols)?;
    }
    let (xl, yl, xa, ya) = (&ra[0], &ra[1], &ca[0], &ca[1]);
    let p1 = Problem {
        a: xl,
        b: ya,
        scale,
        diag_off: offset,
    };
    let p2 = Problem {
        a: yl,
        b: xa,
        scale,
        diag_off: offset,
    };
    let w = 0.5 / n as f64;
    let spec = GradSpec {
        w_row: w,
        cols: None,
        w_diag: w,
        strip: true,
        kept: None,
    };
    let (r1, r2, grads) = if grads {
        let g1 = clip::grads(isa, &p1, &spec, None);
        let g2 = clip::grads(isa, &p2, &spec, None);
        let grads = LocalClipGrads {
            dx_local: g1.da,
            dy_all: g1.db,
            dy_local: g2.da,
            dx_all: g2.db,
            dscale: g1.ds + g2.ds,
        };
        (g1.rows, g2.rows, Some(grads))
    } else {
        (
            clip::stats(isa, &p1, false, None).0,
            clip::stats(isa, &p2, false, None).0,
            None,
        )
    };
    let mut total = 0.0f64;
    for i in 0..n {
        total += r1.ce(i) + r2.ce(i);
    }
    Ok(LocalClipOutput {
        loss: total / (2.0 * n as f64),
        gate: r1.gate,
        grads,
    })
}

/// The HNI gate alone: 1.0 where `x_i . y_{offset+i} >= x_i . y_j` for all j, computed on the same
/// f32 logit tiles as the contrastive pass (use the contrastive loss's own gate when you have it:
/// it is free there; this costs one pass over the N x M products).
pub fn row_gate(x: Mat, y_all: Mat, offset: usize, scale: f32, isa: Isa) -> Result<Vec<f32>> {
    check_isa(isa)?;
    check_nonempty("x", &x)?;
    check_nonempty("y_all", &y_all)?;
    check_same_width("x", &x, "y_all", &y_all)?;
    check_offset(offset, x.rows, y_all.rows)?;
    check_scale(scale as f64)?;
    let (ra, ca, finite) = clip::pack(
        &[(x.data, x.rows)],
        &[(y_all.data, y_all.rows)],
        x.cols,
        false,
    );
    if !finite {
        check_finite("x", x.data, x.cols)?;
        check_finite("y_all", y_all.data, y_all.cols)?;
    }
    let p = Problem {
        a: &ra[0],
        b: &ca[0],
        scale,
        diag_off: offset,
    };
    Ok(clip::stats(isa, &p, false, None).0.gate)
}

/// Result of [`hni_loss`].
#[derive(Debug, Clone)]
pub struct HniOutput {
    /// `-(1/n) sum_i k_i log(e^{s x_i.y_i} / (e^{s x_i.y_i} + sum_j e^{s x_i.y-_ij}))`.
    pub loss: f64,
    /// Gradients, when asked for.
    pub grads: Option<HniGrads>,
}

/// Gradients of the HNI loss.
#[derive(Debug, Clone)]
pub struct HniGrads {
    /// dL/dx (n x D).
    pub dx: Vec<f32>,
    /// dL/dy_all[offset + i] for each local row i (n x D); other rows of y_all get none.
    pub dy_pos: Vec<f32>,
    /// dL/dneg (n x N- x D).
    pub dneg: Vec<f32>,
    /// dL/ds.
    pub dscale: f64,
}

/// Gated hard-negative loss. `x`: n image rows; `y_all`: the batch's texts (gathered in the
/// distributed form), row i's positive is `y_all[offset + i]`; `neg`: n x `negs_per_row` x D hard
/// negatives; `gate`: one 0/1 per row (from [`clip_loss`] / [`clip_loss_local`] / [`row_gate`]).
#[allow(clippy::too_many_arguments)]
pub fn hni_loss(
    x: Mat,
    y_all: Mat,
    neg: &[f32],
    negs_per_row: usize,
    offset: usize,
    scale: f32,
    gate: &[f32],
    grads: bool,
) -> Result<HniOutput> {
    check_nonempty("x", &x)?;
    check_nonempty("y_all", &y_all)?;
    check_same_width("x", &x, "y_all", &y_all)?;
    check_offset(offset, x.rows, y_all.rows)?;
    if negs_per_row == 0 {
        return Err(KernelError::Empty(
            "negatives: N- must be at least 1".into(),
        ));
    }
    let (n, d) = (x.rows, x.cols);
    if neg.len() != n * negs_per_row * d {
        return Err(KernelError::Shape(format!(
            "negatives hold {} values, expected n x N- x D = {n} x {negs_per_row} x {d}",
            neg.len()
        )));
    }
    check_gate(gate, n)?;
    check_scale(scale as f64)?;
    check_finite("x", x.data, d)?;
    check_finite("y_all", y_all.data, d)?;
    check_finite("negatives", neg, d)?;
    let h = hni::hni(
        x.data,
        y_all.data,
        neg,
        n,
        negs_per_row,
        d,
        offset,
        scale as f64,
        gate,
        grads,
    );
    Ok(HniOutput {
        loss: h.loss,
        grads: grads.then_some(HniGrads {
            dx: h.dx,
            dy_pos: h.dy_pos,
            dneg: h.dneg,
            dscale: h.ds,
        }),
    })
}

/// Result of [`short_tag_bce`].
#[derive(Debug, Clone)]
pub struct BceOutput {
    /// `-(1/N) sum_i sum_k [t log sigma(z) + (1-t) log(1 - sigma(z))]`.
    pub loss: f64,
    /// dL/dz (N x K), when asked for.
    pub dz: Option<Vec<f32>>,
}

/// Short-tag classification loss: logits `z` (N x K) against sparse positive targets.
pub fn short_tag_bce(z: Mat, targets: &TagTargets, grads: bool, isa: Isa) -> Result<BceOutput> {
    check_isa(isa)?;
    check_nonempty("logits", &z)?;
    targets.validate(z.rows, z.cols)?;
    check_finite("logits", z.data, z.cols)?;
    let (loss, dz) = bce::bce(
        isa,
        z.data,
        z.rows,
        z.cols,
        targets.indptr(),
        targets.indices(),
        grads,
    );
    Ok(BceOutput {
        loss,
        dz: grads.then_some(dz),
    })
}
