//! The symmetric contrastive loss for small batches, from a logit matrix that a BLAS computed.
//!
//! Why a second CPU schedule: the tiled kernel in `clip.rs` exists to avoid the N x N logits, and
//! that saving only matters once N x N is large. Below that (when the whole matrix is no larger
//! than the two inputs, `N^2 <= 2 N D`, N <= 1024 at D = 512) there is nothing to save, and the
//! loss is three GEMMs (`S = X Y^T`, `dX = s G Y`, `dY = s G^T X`) plus a little element-wise
//! work. libtorch's GEMM (MKL/oneDNN, on its OpenMP team that is already awake from the ops
//! before the loss) beats our packed micro-kernel at 256 x 256 x 512, so the entry point
//! (`ops::clip_loss`) hands the three products to it and calls this module for the rest, which is
//! what is fused: one sweep over S for the row and column log-sum-exps, the gate and the loss,
//! and one sweep that turns S into `s G` in place (`G = w (P_row + P_col) - w_d I`) and sums dL/ds.
//! The unfused version instead runs log-softmax twice, builds one-hot targets and runs autograd's
//! softmax backward passes over N x N.
//!
//! Precision is the tiled kernel's (module docs of `clip.rs`): the log-sum-exps are `(m, t)`
//! pairs folded with the same ISA-specific `row_fold` / `col_fold` / `g_row` code, the label entry
//! of G is an `expm1` in f64, dL/ds is summed without cancellation. Memory: the N x N matrix of
//! the caller plus O(N) here.

use std::ops::Range;

use super::clip::{multiversion, ranges, ColStats, Lse, RowOut, RowSlices, BC, BR};
use super::par;
#[cfg(target_arch = "x86_64")]
use super::simd::Avx512Kernel;
use super::simd::{split_f64, ColRow, Isa, Kernel, Portable};

/// Whether the dense schedule applies: the N x N logits take no more memory than the inputs
/// (`N N <= 2 N D`), so O(N D) memory holds.
pub fn dense_pays(n: usize, d: usize) -> bool {
    n <= 2 * d
}

/// Results of [`symmetric`].
pub(crate) struct DenseOut {
    pub loss: f64,
    pub gate: Vec<f32>,
    /// dL/ds, when gradients were asked for.
    pub dscale: Option<f64>,
}

/// Splits the rows `rows` of an n-wide matrix into per-range mutable slices.
fn split_matrix<'a>(mut s: &'a mut [f32], rs: &[Range<usize>], n: usize) -> Vec<&'a mut [f32]> {
    let mut out = Vec::with_capacity(rs.len());
    for r in rs {
        let (head, tail) = s.split_at_mut(r.len() * n);
        out.push(head);
        s = tail;
    }
    out
}

/// Pass 1 of a worker over its rows `r` of S (n wide, unscaled, `s` holds just those rows):
/// scales them in place, writes the rows' statistics, returns the columns' statistics over them.
#[inline(always)]
fn stats_impl<K: Kernel>(
    s: &mut [f32],
    r: Range<usize>,
    n: usize,
    scale: f32,
    mut rows: RowSlices,
) -> ColStats {
    let mut cols = ColStats::new(n);
    for (i, row) in s.chunks_exact_mut(n).enumerate() {
        row.iter_mut().for_each(|v| *v *= scale);
        let (mut m, mut rest) = (f32::NEG_INFINITY, 0.0f64);
        for chunk in row.chunks(BC) {
            K::row_fold(chunk, &mut m, &mut rest);
        }
        rows.set(i, m, rest, row[r.start + i]);
    }
    for block in s.chunks(BR * n) {
        let br = block.len() / n;
        for j0 in (0..n).step_by(BC) {
            cols.update_strided::<K>(&block[j0..], n, br, j0, BC.min(n - j0));
        }
    }
    cols
}

multiversion!(fn stats_worker => stats_impl(s: &mut [f32], r: Range<usize>, n: usize, scale: f32, rows: RowSlices) -> ColStats);

/// What pass 2 needs about the whole matrix.
struct Norms<'a> {
    rows: &'a RowOut,
    cols: &'a Lse,
    col_hi: &'a [f32],
    col_lo: &'a [f32],
    /// Weight of each softmax term: 0.5 / n.
    w: f64,
    scale: f32,
}

/// Pass 2 of a worker over its rows `r` of the scaled S: overwrites them with `s G` and returns
/// the rows' share of `sum_ij w P_ij (l_ij - l_label)` (dL/ds times s).
#[inline(always)]
fn grad_impl<K: Kernel>(s: &mut [f32], r: Range<usize>, n: usize, nm: &Norms) -> f64 {
    let mut ds_v = 0.0f64;
    let mut g = [0.0f32; BC];
    let w = nm.w as f32;
    for (i, row) in s.chunks_exact_mut(n).enumerate() {
        let gi = r.start + i;
        let (hi, lo) = split_f64(nm.rows.lse.t[gi]);
        let lrow = (nm.rows.lse.m[gi], hi, lo);
        let vd = nm.rows.diag[gi];
        // The label entry, from the f32 logit before the row is overwritten.
        let v = row[gi] as f64;
        let gl = nm.w * ((v - nm.rows.lse.m[gi] as f64) - nm.rows.lse.t[gi]).exp_m1()
            + nm.w * ((v - nm.cols.m[gi] as f64) - nm.cols.t[gi]).exp_m1();
        for j0 in (0..n).step_by(BC) {
            let bc = BC.min(n - j0);
            let colrow = ColRow {
                m: &nm.cols.m[j0..j0 + bc],
                hi: &nm.col_hi[j0..j0 + bc],
                lo: &nm.col_lo[j0..j0 + bc],
                diag: &nm.rows.diag[j0..j0 + bc],
                w,
            };
            let chunk = &mut row[j0..j0 + bc];
            ds_v += K::g_row(chunk, lrow, w, vd, Some(&colrow), &mut g);
            for (o, &gv) in chunk.iter_mut().zip(&g[..bc]) {
                *o = gv * nm.scale;
            }
        }
        // w_row (P - 1) + w_col (P' - 1) with w_diag = w_row + w_col: a small difference when the
        // row is nearly right, so it comes from expm1 in f64.
        row[gi] = (gl * nm.scale as f64) as f32;
    }
    ds_v
}

multiversion!(fn grad_worker => grad_impl(s: &mut [f32], r: Range<usize>, n: usize, nm: &Norms) -> f64);

/// The symmetric loss `0.5 CE(s X Y^T, i) + 0.5 CE(s Y X^T, i)` from the unscaled products
/// `s_mat = X Y^T` (n x n, row-major, finite). With `grads`, `s_mat` is left holding `s G`
/// (`G = dL/dlogits`), so `dX = (s G) Y` and `dY = (s G)^T X`.
pub(crate) fn symmetric(
    isa: Isa,
    s_mat: &mut [f32],
    n: usize,
    scale: f32,
    grads: bool,
) -> DenseOut {
    debug_assert_eq!(s_mat.len(), n * n);
    // Row blocks per worker as the tiled kernel splits them (about 20 flops per element per
    // pass: exp and the folds), and the rows they cover.
    let blocks = ranges(n.div_ceil(BR), 20 * n * n);
    let rs: Vec<Range<usize>> = blocks
        .iter()
        .map(|b| b.start * BR..(b.end * BR).min(n))
        .collect();
    let mut rows = RowOut::new(n);
    let jobs: Vec<_> = split_matrix(s_mat, &rs, n)
        .into_iter()
        .zip(rs.iter().cloned())
        .zip(rows.split(&blocks, n))
        .collect();
    let parts: Vec<ColStats> =
        par::run(jobs, |((s, r), rws)| stats_worker(isa, s, r, n, scale, rws));
    let mut it = parts.into_iter();
    let mut acc = it.next().unwrap_or_else(|| ColStats::new(n));
    for c in it {
        acc.merge(&c);
    }
    let cols = acc.lse();
    let mut total = 0.0f64;
    for i in 0..n {
        let diag = rows.diag[i] as f64;
        total += rows.ce(i) + ((cols.m[i] as f64 - diag) + cols.t[i]);
    }
    let loss = total / (2.0 * n as f64);
    let dscale = grads.then(|| {
        let (col_hi, col_lo): (Vec<f32>, Vec<f32>) = cols.t.iter().map(|&t| split_f64(t)).unzip();
        let nm = Norms {
            rows: &rows,
            cols: &cols,
            col_hi: &col_hi,
            col_lo: &col_lo,
            w: 0.5 / n as f64,
            scale,
        };
        let jobs: Vec<_> = split_matrix(s_mat, &rs, n)
            .into_iter()
            .zip(rs.iter().cloned())
            .collect();
        let ds: Vec<f64> = par::run(jobs, |(s, r)| grad_worker(isa, s, r, n, &nm));
        ds.iter().sum::<f64>() / scale as f64
    });
    DenseOut {
        loss,
        gate: rows.gate,
        dscale,
    }
}
