// Fused contrastive (CLIP) loss: forward and backward without the N x M logit matrix.
//
// What is fused, and why. The unfused loss materialises L = s A B^T (N x M floats: 16 GiB at
// N = M = 64k), a log-softmax per direction and their gradients. Here a logit exists only as a
// 64 x 64 register tile (hq_tile_dot) that is consumed where it is computed:
// - hq_clip_row_lse: one block per 64 rows sweeps all column tiles and keeps each row's running
//   max and sum of exp (online log-sum-exp, as flash attention). It also records the row's label
//   logit, so the HNI gate (is the label the row's argmax?) and the loss term fall out of the same
//   sweep. The column log-sum-exp of the symmetric loss is the row log-sum-exp of B A^T: the same
//   kernel launched with the operands swapped (every tile value is bitwise the same product).
// - hq_clip_row_grad: one block per 64 rows recomputes every tile, turns it into the gradient tile
//   G = w_row P_row + w_col P_col - w_diag [label] in shared memory and immediately multiplies it
//   by the column operand's rows: dA = s G B, accumulated in f64 in a scratch buffer the block
//   alone owns (no atomics, deterministic). dB is the same kernel with the roles swapped. The rows
//   launch also sums dL/ds.
// Memory: O((N + M) D). Work: the symmetric loss takes 6 N M D-sized products (2 for the two lse
// sweeps, 2 per gradient side) instead of the unfused 3, in exchange for never touching O(N M)
// memory.
//
// Precision for nearly-right rows (tiny per-row losses, the normal case late in training at
// s = 100), as in the CPU twin:
// - a log-sum-exp is the pair (m, t): m the f32 row maximum, t = log1p(rest) in f64 with rest
//   the sum of exp(v - m) over all entries but one occurrence of the maximum. The loss term
//   (m - v_label) + t is then exact when the label is the maximum, and exp(v - lse) is
//   exp(((v - m) - t_hi) - t_lo);
// - sums of exp in f64; the label entry of G, w (P - 1), is w expm1((v - m) - t) in f64;
// - dL/ds = sum w P (v - v_label) / s (no cancellation; the label's own term is exactly 0).
//
// Plain FP32 SIMT tiles (no tensor cores: TF32 would break the 1e-5 agreement with the f32
// reference). CPU twin: kernels/src/cpu/clip.rs; f64 reference: kernels/src/reference.rs.

extern "C" __global__ void __launch_bounds__(HQ_THREADS)
hq_clip_row_lse(const float* __restrict__ A, const float* __restrict__ B, int R, int C, int D,
                const float* __restrict__ scale, int diag_off,
                float* __restrict__ lse_m, double* __restrict__ lse_t, float* __restrict__ diag,
                float* __restrict__ gate, double* __restrict__ part) {
    __shared__ float As[HQ_TK][HQ_TM + 1];
    __shared__ float Bs[HQ_TK][HQ_TN + 1];
    __shared__ float diag_s[HQ_TM];
    int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    int r0 = blockIdx.x * HQ_TM;
    float s = *scale;
    float m[4];
    double rest[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        m[i] = -hq_inf();
        rest[i] = 0.0;
    }
    if (tid < HQ_TM) diag_s[tid] = __int_as_float(0x7fc00000);  // NaN: never seen
    for (int c0 = 0; c0 < C; c0 += HQ_TN) {
        float acc[4][4];
        hq_tile_dot(A, B, R, C, D, r0, c0, As, Bs, acc);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            int rl = ty + 16 * i, r = r0 + rl;
            float tmax = -hq_inf();
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                int c = c0 + tx + 16 * j;
                float v = (c < C) ? s * acc[i][j] : -hq_inf();
                acc[i][j] = v;
                tmax = fmaxf(tmax, v);
                if (c < C && r < R && c == r + diag_off) diag_s[rl] = v;
            }
            tmax = hq_row16_max(tmax);
            // Branch-free so that every lane takes part in the shuffles.
            bool fresh = tmax > m[i];
            float ref = fresh ? tmax : m[i];
            int first = 0x7fffffff;  // first column holding the new maximum (left out: the implicit 1)
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                int c = c0 + tx + 16 * j;
                if (c < C && acc[i][j] == tmax) first = min(first, c);
            }
            first = hq_row16_min_int(first);
            double ps = 0.0;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                int c = c0 + tx + 16 * j;
                bool skip = fresh && c == first;
                ps += skip ? 0.0 : (double)expf(acc[i][j] - ref);
            }
            ps = hq_row16_sum_d(ps);
            double scaled = (m[i] == -hq_inf()) ? 0.0 : (1.0 + rest[i]) * exp((double)m[i] - (double)tmax);
            rest[i] = fresh ? scaled + ps : rest[i] + ps;
            m[i] = ref;
        }
    }
    __syncthreads();
    if (tx == 0) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            int rl = ty + 16 * i, r = r0 + rl;
            if (r < R) {
                double t = log1p(rest[i]);
                float dv = diag_s[rl];
                lse_m[r] = m[i];
                lse_t[r] = t;
                if (diag != 0) diag[r] = dv;
                // Ties go to the positive: the gate opens when the label logit is the row max.
                if (gate != 0) gate[r] = (dv >= m[i]) ? 1.f : 0.f;
                if (part != 0) part[r] = ((double)m[i] - (double)dv) + t;
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(HQ_THREADS)
hq_clip_row_grad(const float* __restrict__ A, const float* __restrict__ B, int R, int C, int D,
                 const float* __restrict__ scale,
                 const float* __restrict__ m_row, const double* __restrict__ t_row,
                 const float* __restrict__ diag_row, double w_row,
                 const float* __restrict__ m_col, const double* __restrict__ t_col,
                 const float* __restrict__ diag_col, double w_col,
                 int diag_off, double w_diag,
                 double* __restrict__ acc64, float* __restrict__ dA, double* __restrict__ ds_part) {
    __shared__ float As[HQ_TK][HQ_TM + 1];
    __shared__ float Bs[HQ_TK][HQ_TN + 1];
    __shared__ float Gs[HQ_TM][HQ_TN + 1];
    __shared__ float Bt[HQ_TN][HQ_TN + 1];
    int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    int r0 = blockIdx.x * HQ_TM;
    float s = *scale;
    float wr = (float)w_row, wc = (float)w_col;
    bool has_row = m_row != 0, has_col = m_col != 0;
    // Row lse as (m, t_hi, t_lo) and the row's label logit.
    float lm[4], lth[4], ltl[4], ld[4];
    double ds_t[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        int r = r0 + ty + 16 * i;
        bool ok = has_row && r < R;
        double t = ok ? t_row[r] : 0.0;
        lm[i] = ok ? m_row[r] : 0.f;
        lth[i] = (float)t;
        ltl[i] = (float)(t - (double)lth[i]);
        ld[i] = (ok && diag_row != 0) ? diag_row[r] : 0.f;
        ds_t[i] = 0.0;
    }
    for (int c0 = 0; c0 < C; c0 += HQ_TN) {
        float acc[4][4];
        hq_tile_dot(A, B, R, C, D, r0, c0, As, Bs, acc);
        float cm[4], cth[4], ctl[4], cd[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            int c = c0 + tx + 16 * j;
            bool ok = has_col && c < C;
            double t = ok ? t_col[c] : 0.0;
            cm[j] = ok ? m_col[c] : 0.f;
            cth[j] = (float)t;
            ctl[j] = (float)(t - (double)cth[j]);
            cd[j] = (ok && diag_col != 0) ? diag_col[c] : 0.f;
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                int r = r0 + ty + 16 * i, c = c0 + tx + 16 * j;
                float g = 0.f;
                if (r < R && c < C) {
                    float v = s * acc[i][j];
                    float pr = has_row ? wr * expf(((v - lm[i]) - lth[i]) - ltl[i]) : 0.f;
                    float pc = has_col ? wc * expf(((v - cm[j]) - cth[j]) - ctl[j]) : 0.f;
                    // dL/ds terms w P (v - v_label), summed over the row.
                    ds_t[i] += (double)pr * (double)(v - ld[i]) + (double)pc * (double)(v - cd[j]);
                    if (c == r + diag_off) {
                        // Label entry: w_row (P - 1) + w_col (P' - 1) + (w_row + w_col - w_diag).
                        double vd = (double)v, gl = 0.0, wsum = 0.0;
                        if (has_row) {
                            gl += w_row * expm1((vd - (double)m_row[r]) - t_row[r]);
                            wsum += w_row;
                        }
                        if (has_col) {
                            gl += w_col * expm1((vd - (double)m_col[c]) - t_col[c]);
                            wsum += w_col;
                        }
                        g = (float)(gl + (wsum - w_diag));
                    } else {
                        g = pr + pc;
                    }
                }
                Gs[ty + 16 * i][tx + 16 * j] = g;
            }
        }
        __syncthreads();
        int kc = min(HQ_TN, C - c0);
        for (int d0 = 0; d0 < D; d0 += HQ_TN) {
            // Rows c0.. of B, columns d0..d0+63: 4096 values, 16 per thread, coalesced along d.
#pragma unroll
            for (int q = 0; q < 16; ++q) {
                int e = tid + q * HQ_THREADS;
                int k = e / HQ_TN, dd = e % HQ_TN;
                int gc = c0 + k, gd = d0 + dd;
                Bt[k][dd] = (gc < C && gd < D) ? B[(long long)gc * D + gd] : 0.f;
            }
            __syncthreads();
            float o[4][4];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) o[i][j] = 0.f;
            for (int k = 0; k < kc; ++k) {
                float a[4], b[4];
#pragma unroll
                for (int i = 0; i < 4; ++i) a[i] = Gs[ty + 16 * i][k];
#pragma unroll
                for (int j = 0; j < 4; ++j) b[j] = Bt[k][tx + 16 * j];
#pragma unroll
                for (int i = 0; i < 4; ++i)
#pragma unroll
                    for (int j = 0; j < 4; ++j) o[i][j] = fmaf(a[i], b[j], o[i][j]);
            }
#pragma unroll
            for (int i = 0; i < 4; ++i) {
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    int r = r0 + ty + 16 * i, d = d0 + tx + 16 * j;
                    if (r < R && d < D) acc64[(long long)r * D + d] += (double)o[i][j];
                }
            }
            __syncthreads();
        }
    }
    // dL/ds of each row: the 16 owners of the row add their terms.
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        double t = hq_row16_sum_d(ds_t[i]);
        int r = r0 + ty + 16 * i;
        if (tx == 0 && r < R && ds_part != 0) ds_part[r] = t / (double)s;
    }
    // Every acc64 row of this block is final (the loop ended on a barrier): dA = s * acc, one
    // warp per row.
    int lane = tid & 31, warp = tid >> 5;
    for (int rl = warp; rl < HQ_TM; rl += HQ_THREADS / 32) {
        int r = r0 + rl;
        if (r >= R) break;
        for (int d = lane; d < D; d += 32)
            dA[(long long)r * D + d] = (float)(acc64[(long long)r * D + d] * (double)s);
    }
}
