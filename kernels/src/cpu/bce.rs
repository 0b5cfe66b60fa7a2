//! Short-tag classification loss (multi-label BCE with logits, sparse positives) on the CPU.
//!
//! What it fuses: the dense target matrix of the unfused version (N x K, mostly zeros) never
//! exists. Per row, one vectorised sweep over the K logits computes `softplus(z)` (the loss of a
//! negative target) and `sigmoid(z) / N` (its gradient); a second, sparse sweep over the row's
//! positive indices (CSR) corrects those entries: loss `softplus(z) - z = softplus(-z)`, gradient
//! `(sigmoid(z) - 1)/N = -sigmoid(-z)/N`, written in their own stable form rather than as a
//! difference. Stable for any |z|: `softplus(z) = max(z,0) + log1p(exp(-|z|))` and the sigmoid
//! from the same `exp(-|z|)`, which never overflows. Row sums in f64.

use super::clip::multiversion;
use super::par;
#[cfg(target_arch = "x86_64")]
use super::simd::Avx512Kernel;
use super::simd::{exp_f32, log1p_unit, Isa, Kernel, Portable};

/// `ln(1 + e^v)` without overflow: `max(v, 0) + log1p(exp(-|v|))`.
#[inline(always)]
fn softplus(v: f32) -> f32 {
    v.max(0.0) + log1p_unit(exp_f32(-v.abs()))
}

/// Elements processed per inner sweep (kept in L1).
const CHUNK: usize = 512;

/// Loss and gradient rows for `rows` (row-major, K wide), starting at global row `row0`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rows_impl<K: Kernel>(
    z: &[f32],
    k: usize,
    row0: usize,
    indptr: &[i64],
    indices: &[i64],
    inv_n: f32,
    dz: &mut [f32],
    grads: bool,
) -> f64 {
    let rows = z.len() / k.max(1);
    let mut sp = [0.0f32; CHUNK];
    let mut total = 0.0f64;
    for r in 0..rows {
        let zr = &z[r * k..(r + 1) * k];
        let mut acc = [0.0f64; 8];
        let mut start = 0;
        while start < k {
            let end = (start + CHUNK).min(k);
            let zc = &zr[start..end];
            for (s, &v) in sp.iter_mut().zip(zc) {
                *s = softplus(v);
            }
            if grads {
                let gc = &mut dz[r * k + start..r * k + end];
                for (g, &v) in gc.iter_mut().zip(zc) {
                    let e = exp_f32(-v.abs());
                    let sig = if v >= 0.0 {
                        1.0 / (1.0 + e)
                    } else {
                        e / (1.0 + e)
                    };
                    *g = sig * inv_n;
                }
            }
            let c = &sp[..end - start];
            let chunks = c.chunks_exact(8);
            let rest = chunks.remainder();
            for ch in chunks {
                for l in 0..8 {
                    acc[l] += ch[l] as f64;
                }
            }
            for &v in rest {
                acc[0] += v as f64;
            }
            start = end;
        }
        let mut row_loss: f64 = acc.iter().sum();
        let g = row0 + r;
        for &t in &indices[indptr[g] as usize..indptr[g + 1] as usize] {
            let t = t as usize;
            let v = zr[t];
            // Replace the negative-target term by the positive one: subtracting the very f32 value
            // added above cancels exactly, and softplus(-z) keeps its precision when tiny.
            row_loss += softplus(-v) as f64 - softplus(v) as f64;
            if grads {
                let e = exp_f32(-v.abs());
                let sig_neg = if v >= 0.0 {
                    e / (1.0 + e)
                } else {
                    1.0 / (1.0 + e)
                };
                dz[r * k + t] = -sig_neg * inv_n;
            }
        }
        total += row_loss;
    }
    total
}

multiversion!(fn rows_worker => rows_impl(z: &[f32], k: usize, row0: usize, indptr: &[i64], indices: &[i64], inv_n: f32, dz: &mut [f32], grads: bool) -> f64);

/// `(loss, dz)`: loss = (1/N) sum over rows and all K classes; dz = (sigmoid(z) - t)/N.
pub(crate) fn bce(
    isa: Isa,
    z: &[f32],
    n: usize,
    k: usize,
    indptr: &[i64],
    indices: &[i64],
    grads: bool,
) -> (f64, Vec<f32>) {
    // About 64k elements a task, at least one row.
    let rows_per = (65_536 / k.max(1)).max(1);
    let inv_n = 1.0 / n as f32;
    let mut dz = vec![0.0f32; if grads { n * k } else { 0 }];
    let parts: Vec<f64> = if grads {
        let jobs: Vec<_> = z
            .chunks(rows_per * k)
            .zip(dz.chunks_mut(rows_per * k))
            .enumerate()
            .collect();
        par::run(jobs, |(c, (zc, dc))| {
            rows_worker(isa, zc, k, c * rows_per, indptr, indices, inv_n, dc, true)
        })
    } else {
        let jobs: Vec<_> = z.chunks(rows_per * k).enumerate().collect();
        par::run(jobs, |(c, zc)| {
            rows_worker(
                isa,
                zc,
                k,
                c * rows_per,
                indptr,
                indices,
                inv_n,
                &mut [],
                false,
            )
        })
    };
    (parts.iter().sum::<f64>() / n as f64, dz)
}
