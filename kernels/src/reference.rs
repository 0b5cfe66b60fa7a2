//! Plain, obviously correct references in f64: the whole logit matrix is built, every softmax is
//! taken row by row, every gradient is written straight from its formula. They are slow
//! (O(N^2) memory) and exist only so the tests can hold the fused CPU and CUDA versions against
//! them. Inputs are f32 (what the kernels see), everything after that is f64.
//!
//! Conventions are those of the crate (see the crate docs): `scale` is the multiplier s (already
//! `exp(logit_scale)`, clamped by the caller), `dscale` is dL/ds; the gate of row i is 1 when
//! `x_i . y_label >= x_i . y_j` for every j (ties go to the positive).

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&p, &q)| p as f64 * q as f64).sum()
}

fn row(m: &[f32], i: usize, d: usize) -> &[f32] {
    &m[i * d..(i + 1) * d]
}

/// `log sum_j e^{v_j}` as the pair `(m, t)`, `m` the maximum and
/// `t = ln_1p(sum over the others of e^{v_j - m})`, so that `log softmax_j = (v_j - m) - t` keeps
/// its precision when it is tiny (a nearly-right row), where `v_j - (m + t)` would round `t` away.
fn logsumexp(v: &[f64]) -> (f64, f64) {
    let (imax, m) = v
        .iter()
        .cloned()
        .enumerate()
        .fold(
            (0, f64::NEG_INFINITY),
            |b, (i, t)| if t > b.1 { (i, t) } else { b },
        );
    let rest: f64 = v
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != imax)
        .map(|(_, &t)| (t - m).exp())
        .sum();
    (m, rest.ln_1p())
}

/// `-log softmax` of entry `v` under `lse = (m, t)`.
fn neg_log_softmax(v: f64, lse: (f64, f64)) -> f64 {
    (lse.0 - v) + lse.1
}

/// `softmax - [label]` of entry `v` under `lse = (m, t)`: at the label, `e^{x} - 1` is written
/// `expm1(x)`, the same number without the cancellation.
fn softmax_minus_onehot(v: f64, lse: (f64, f64), is_label: bool) -> f64 {
    let x = (v - lse.0) - lse.1;
    if is_label {
        x.exp_m1()
    } else {
        x.exp()
    }
}

/// Output of [`clip_symmetric`].
#[derive(Debug, Clone)]
pub struct RefClip {
    /// `0.5 CE_rows + 0.5 CE_cols`, each a mean over the N rows.
    pub loss: f64,
    /// 1.0 where row i's largest logit is its own label, else 0.0.
    pub gate: Vec<f64>,
    /// dL/dX, N x D.
    pub dx: Vec<f64>,
    /// dL/dY, N x D.
    pub dy: Vec<f64>,
    /// dL/ds.
    pub dscale: f64,
    /// `sum_ij |dL/dlogit_ij * logit_ij / s|`: the size of the summands of dL/ds, the scale against
    /// which an f32 implementation's error in this one cancelling sum is measured.
    pub dscale_mag: f64,
}

/// The single-process CLIP loss: `L = 0.5 CE(s X Y^T, diag) + 0.5 CE(s Y X^T, diag)`.
pub fn clip_symmetric(x: &[f32], y: &[f32], n: usize, d: usize, scale: f64) -> RefClip {
    let dots: Vec<Vec<f64>> = (0..n)
        .map(|i| (0..n).map(|j| dot(row(x, i, d), row(y, j, d))).collect())
        .collect();
    let logits: Vec<Vec<f64>> = dots
        .iter()
        .map(|r| r.iter().map(|&v| scale * v).collect())
        .collect();
    let lse_r: Vec<(f64, f64)> = logits.iter().map(|r| logsumexp(r)).collect();
    let lse_c: Vec<(f64, f64)> = (0..n)
        .map(|j| logsumexp(&(0..n).map(|i| logits[i][j]).collect::<Vec<_>>()))
        .collect();
    let ce_rows: f64 = (0..n)
        .map(|i| neg_log_softmax(logits[i][i], lse_r[i]))
        .sum::<f64>()
        / n as f64;
    let ce_cols: f64 = (0..n)
        .map(|j| neg_log_softmax(logits[j][j], lse_c[j]))
        .sum::<f64>()
        / n as f64;
    let loss = 0.5 * ce_rows + 0.5 * ce_cols;
    // dL/dlogits_ij = 0.5/n (softmax_row_ij - [i==j]) + 0.5/n (softmax_col_ij - [i==j]).
    let mut g = vec![vec![0.0f64; n]; n];
    for i in 0..n {
        for j in 0..n {
            let pr = softmax_minus_onehot(logits[i][j], lse_r[i], i == j);
            let pc = softmax_minus_onehot(logits[i][j], lse_c[j], i == j);
            g[i][j] = 0.5 / n as f64 * pr + 0.5 / n as f64 * pc;
        }
    }
    let mut dx = vec![0.0f64; n * d];
    let mut dy = vec![0.0f64; n * d];
    let mut dscale = 0.0;
    let mut dscale_mag = 0.0;
    for i in 0..n {
        for j in 0..n {
            for k in 0..d {
                dx[i * d + k] += scale * g[i][j] * y[j * d + k] as f64;
                dy[j * d + k] += scale * g[i][j] * x[i * d + k] as f64;
            }
            dscale += g[i][j] * dots[i][j];
            dscale_mag += (g[i][j] * dots[i][j]).abs();
        }
    }
    let gate = (0..n)
        .map(|i| {
            let best = dots[i].iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            if dots[i][i] >= best {
                1.0
            } else {
                0.0
            }
        })
        .collect();
    RefClip {
        loss,
        gate,
        dx,
        dy,
        dscale,
        dscale_mag,
    }
}

/// Output of [`clip_local`].
#[derive(Debug, Clone)]
pub struct RefLocalClip {
    /// `0.5 CE(s x_l y_all^T, off + i) + 0.5 CE(s y_l x_all^T, off + i)`, means over the n local rows.
    pub loss: f64,
    /// Gate of each local row over the gathered texts.
    pub gate: Vec<f64>,
    /// dL/dx_local (n x D).
    pub dx_local: Vec<f64>,
    /// dL/dy_local (n x D).
    pub dy_local: Vec<f64>,
    /// dL/dx_all (m x D).
    pub dx_all: Vec<f64>,
    /// dL/dy_all (m x D).
    pub dy_all: Vec<f64>,
    /// dL/ds.
    pub dscale: f64,
    /// Size of the summands of dL/ds (see [`RefClip::dscale_mag`]).
    pub dscale_mag: f64,
}

/// open_clip's local loss (`--local-loss`): local rows against gathered columns, labels
/// `offset + i`.
#[allow(clippy::too_many_arguments)]
pub fn clip_local(
    x_local: &[f32],
    y_local: &[f32],
    x_all: &[f32],
    y_all: &[f32],
    n: usize,
    m: usize,
    d: usize,
    offset: usize,
    scale: f64,
) -> RefLocalClip {
    // One direction: rows a (n) against columns b (m). Returns (sum of CE, G (n x m), dots).
    let half = |a: &[f32], b: &[f32]| {
        let dots: Vec<Vec<f64>> = (0..n)
            .map(|i| (0..m).map(|j| dot(row(a, i, d), row(b, j, d))).collect())
            .collect();
        let mut ce = 0.0;
        let mut g = vec![vec![0.0f64; m]; n];
        for i in 0..n {
            let logits: Vec<f64> = dots[i].iter().map(|&v| scale * v).collect();
            let lse = logsumexp(&logits);
            ce += neg_log_softmax(logits[offset + i], lse);
            for j in 0..m {
                g[i][j] = 0.5 / n as f64 * softmax_minus_onehot(logits[j], lse, j == offset + i);
            }
        }
        (ce, g, dots)
    };
    let (ce1, g1, dots1) = half(x_local, y_all);
    let (ce2, g2, dots2) = half(y_local, x_all);
    let loss = 0.5 * ce1 / n as f64 + 0.5 * ce2 / n as f64;
    let mut dx_local = vec![0.0; n * d];
    let mut dy_local = vec![0.0; n * d];
    let mut dx_all = vec![0.0; m * d];
    let mut dy_all = vec![0.0; m * d];
    let mut dscale = 0.0;
    let mut dscale_mag = 0.0;
    for i in 0..n {
        for j in 0..m {
            dscale_mag += (g1[i][j] * dots1[i][j]).abs() + (g2[i][j] * dots2[i][j]).abs();
            for k in 0..d {
                dx_local[i * d + k] += scale * g1[i][j] * y_all[j * d + k] as f64;
                dy_all[j * d + k] += scale * g1[i][j] * x_local[i * d + k] as f64;
                dy_local[i * d + k] += scale * g2[i][j] * x_all[j * d + k] as f64;
                dx_all[j * d + k] += scale * g2[i][j] * y_local[i * d + k] as f64;
            }
            dscale += g1[i][j] * dots1[i][j] + g2[i][j] * dots2[i][j];
        }
    }
    let gate = row_gate(x_local, y_all, n, m, d, offset);
    RefLocalClip {
        loss,
        gate,
        dx_local,
        dy_local,
        dx_all,
        dy_all,
        dscale,
        dscale_mag,
    }
}

/// `gate_i = 1` iff `x_i . y_{offset+i} >= x_i . y_j` for all j (ties go to the positive).
pub fn row_gate(x: &[f32], y_all: &[f32], n: usize, m: usize, d: usize, offset: usize) -> Vec<f64> {
    (0..n)
        .map(|i| {
            let own = dot(row(x, i, d), row(y_all, offset + i, d));
            let beaten = (0..m).any(|j| dot(row(x, i, d), row(y_all, j, d)) > own);
            if beaten {
                0.0
            } else {
                1.0
            }
        })
        .collect()
}

/// Output of [`hni`].
#[derive(Debug, Clone)]
pub struct RefHni {
    /// `-(1/n) sum_i k_i log(e^{a_i} / (e^{a_i} + sum_j e^{b_ij}))`.
    pub loss: f64,
    /// dL/dx (n x D).
    pub dx: Vec<f64>,
    /// dL/dy_{offset+i} for each local row i (n x D).
    pub dy_pos: Vec<f64>,
    /// dL/dneg (n x k x D).
    pub dneg: Vec<f64>,
    /// dL/ds.
    pub dscale: f64,
}

/// Gated hard-negative identification loss. `neg` is n x k x D (k hard negatives per image),
/// `gate` one 0/1 value per local row.
#[allow(clippy::too_many_arguments)]
pub fn hni(
    x: &[f32],
    y_all: &[f32],
    neg: &[f32],
    n: usize,
    k: usize,
    d: usize,
    offset: usize,
    scale: f64,
    gate: &[f64],
) -> RefHni {
    let mut loss = 0.0;
    let mut dx = vec![0.0; n * d];
    let mut dy_pos = vec![0.0; n * d];
    let mut dneg = vec![0.0; n * k * d];
    let mut dscale = 0.0;
    for i in 0..n {
        let xi = row(x, i, d);
        let yp = row(y_all, offset + i, d);
        // Unscaled similarities: index 0 is the positive, 1..=k the negatives.
        let mut sims = vec![dot(xi, yp)];
        for j in 0..k {
            sims.push(dot(xi, &neg[(i * k + j) * d..(i * k + j + 1) * d]));
        }
        let logits: Vec<f64> = sims.iter().map(|&v| scale * v).collect();
        let lse = logsumexp(&logits);
        let w = gate[i] / n as f64;
        loss += w * neg_log_softmax(logits[0], lse);
        // dL/dlogit_0 = w (p_0 - 1), dL/dlogit_j = w p_j.
        let p: Vec<f64> = logits
            .iter()
            .map(|&l| softmax_minus_onehot(l, lse, false))
            .collect();
        let g0 = w * softmax_minus_onehot(logits[0], lse, true);
        dscale += g0 * sims[0];
        for t in 0..d {
            dx[i * d + t] += scale * g0 * yp[t] as f64;
            dy_pos[i * d + t] += scale * g0 * xi[t] as f64;
        }
        for j in 0..k {
            let gj = w * p[j + 1];
            dscale += gj * sims[j + 1];
            for t in 0..d {
                dx[i * d + t] += scale * gj * neg[(i * k + j) * d + t] as f64;
                dneg[(i * k + j) * d + t] += scale * gj * xi[t] as f64;
            }
        }
    }
    RefHni {
        loss,
        dx,
        dy_pos,
        dneg,
        dscale,
    }
}

/// Output of [`bce`].
#[derive(Debug, Clone)]
pub struct RefBce {
    /// `-(1/N) sum_i sum_k [t log sigma(z) + (1-t) log(1 - sigma(z))]`.
    pub loss: f64,
    /// dL/dz (N x K).
    pub dz: Vec<f64>,
}

/// Multi-label BCE with logits, dense targets built from the CSR lists. Mean over N, sum over K.
pub fn bce(z: &[f32], n: usize, k: usize, indptr: &[i64], indices: &[i64]) -> RefBce {
    let mut t = vec![0.0f64; n * k];
    for i in 0..n {
        for p in indptr[i] as usize..indptr[i + 1] as usize {
            t[i * k + indices[p] as usize] = 1.0;
        }
    }
    // log sigma(z) = -softplus(-z), log(1 - sigma(z)) = -softplus(z); softplus(v) = log(1 + e^v)
    // written in its overflow-free form.
    let softplus = |v: f64| v.max(0.0) + (-v.abs()).exp().ln_1p();
    let sigmoid = |v: f64| 1.0 / (1.0 + (-v).exp());
    let mut loss = 0.0;
    let mut dz = vec![0.0; n * k];
    for e in 0..n * k {
        let v = z[e] as f64;
        let log_sig = -softplus(-v);
        let log_one_minus = -softplus(v);
        loss -= t[e] * log_sig + (1.0 - t[e]) * log_one_minus;
        dz[e] = (sigmoid(v) - t[e]) / n as f64;
    }
    RefBce {
        loss: loss / n as f64,
        dz,
    }
}
