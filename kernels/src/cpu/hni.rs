//! Gated hard-negative identification (HNI) on the CPU.
//!
//! What it fuses: per image row, the positive and its N- negative similarities, their
//! log-sum-exp, the loss term and all four gradients (image, positive text, negatives, scale) in
//! one pass over the row's (1 + N-) embeddings, rows in parallel. The work is O(N * N- * D), tiny next to the
//! contrastive loss; the gate k_i comes from the contrastive pass (its row argmax), so it costs
//! nothing extra. Everything after the f32 inputs is f64 (dots, softmax, gradients).

use super::par;
use super::simd::dot_f64;

/// Loss and gradients of the HNI term (see `crate::cpu::hni_loss`).
pub(crate) struct HniParts {
    pub loss: f64,
    pub ds: f64,
    pub dx: Vec<f32>,
    pub dy_pos: Vec<f32>,
    pub dneg: Vec<f32>,
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn hni(
    x: &[f32],
    y_all: &[f32],
    neg: &[f32],
    n: usize,
    k: usize,
    d: usize,
    offset: usize,
    scale: f64,
    gate: &[f32],
    grads: bool,
) -> HniParts {
    let mut dx = vec![0.0f32; if grads { n * d } else { 0 }];
    let mut dy_pos = vec![0.0f32; if grads { n * d } else { 0 }];
    let mut dneg = vec![0.0f32; if grads { n * k * d } else { 0 }];
    let inv_n = 1.0 / n as f64;
    // One row: returns (loss_i, ds_i) and writes its gradient rows when given.
    let row = |i: usize, out: Option<(&mut [f32], &mut [f32], &mut [f32])>| -> (f64, f64) {
        if gate[i] == 0.0 {
            if let Some((gx, gy, gn)) = out {
                gx.fill(0.0);
                gy.fill(0.0);
                gn.fill(0.0);
            }
            return (0.0, 0.0);
        }
        let xi = &x[i * d..(i + 1) * d];
        let yp = &y_all[(offset + i) * d..(offset + i + 1) * d];
        let negs = &neg[i * k * d..(i + 1) * k * d];
        // Unscaled similarities: 0 is the positive, 1..=k the negatives.
        let mut sims = Vec::with_capacity(k + 1);
        sims.push(dot_f64(xi, yp));
        for j in 0..k {
            sims.push(dot_f64(xi, &negs[j * d..(j + 1) * d]));
        }
        // log-sum-exp as (max, ln_1p(rest)): log p_t = (l_t - max) - t stays exact for a
        // nearly-certain positive (see cpu/clip.rs).
        let logits: Vec<f64> = sims.iter().map(|&v| scale * v).collect();
        let (imax, mx) =
            logits
                .iter()
                .cloned()
                .enumerate()
                .fold(
                    (0, f64::NEG_INFINITY),
                    |b, (t, v)| if v > b.1 { (t, v) } else { b },
                );
        let rest: f64 = logits
            .iter()
            .enumerate()
            .filter(|&(t, _)| t != imax)
            .map(|(_, &v)| (v - mx).exp())
            .sum();
        let tt = rest.ln_1p();
        let w = gate[i] as f64 * inv_n;
        let loss = w * ((mx - logits[0]) + tt);
        // dL/dlogit: w (p_0 - 1) = w expm1(log p_0) for the positive, w p_j for the negatives.
        let coef: Vec<f64> = logits
            .iter()
            .enumerate()
            .map(|(t, &l)| {
                let lp = (l - mx) - tt;
                w * if t == 0 { lp.exp_m1() } else { lp.exp() }
            })
            .collect();
        let ds: f64 = coef.iter().zip(&sims).map(|(c, s)| c * s).sum();
        if let Some((gx, gy, gn)) = out {
            for t in 0..d {
                let mut acc = coef[0] * yp[t] as f64;
                for j in 0..k {
                    acc += coef[j + 1] * negs[j * d + t] as f64;
                }
                gx[t] = (scale * acc) as f32;
                gy[t] = (scale * coef[0] * xi[t] as f64) as f32;
            }
            for j in 0..k {
                let c = scale * coef[j + 1];
                for t in 0..d {
                    gn[j * d + t] = (c * xi[t] as f64) as f32;
                }
            }
        }
        (loss, ds)
    };
    let per = par::chunk_len(n, 16);
    let per_row: Vec<(f64, f64)> = if grads {
        let jobs: Vec<_> = dx
            .chunks_mut(per * d)
            .zip(dy_pos.chunks_mut(per * d))
            .zip(dneg.chunks_mut(per * k * d))
            .enumerate()
            .collect();
        par::run(jobs, |(c, ((gx, gy), gn))| {
            let rows = gx.len() / d;
            (0..rows)
                .map(|r| {
                    let i = c * per + r;
                    row(
                        i,
                        Some((
                            &mut gx[r * d..(r + 1) * d],
                            &mut gy[r * d..(r + 1) * d],
                            &mut gn[r * k * d..(r + 1) * k * d],
                        )),
                    )
                })
                .collect::<Vec<_>>()
        })
        .into_iter()
        .flatten()
        .collect()
    } else {
        let jobs: Vec<usize> = (0..n.div_ceil(per)).collect();
        par::run(jobs, |c| {
            (c * per..((c + 1) * per).min(n))
                .map(|i| row(i, None))
                .collect::<Vec<_>>()
        })
        .into_iter()
        .flatten()
        .collect()
    };
    // Summed in row order: deterministic.
    let loss = per_row.iter().map(|r| r.0).sum();
    let ds = per_row.iter().map(|r| r.1).sum();
    HniParts {
        loss,
        ds,
        dx,
        dy_pos,
        dneg,
    }
}
