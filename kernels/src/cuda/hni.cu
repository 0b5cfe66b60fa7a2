// Gated hard-negative identification (HNI): loss and all gradients in one kernel.
//
// What is fused: for image row i, the positive similarity x_i . y_{off+i}, its N- negative
// similarities x_i . y-_ij, their log-sum-exp, the gated loss term
// k_i / n * (lse_i - s x_i . y_{off+i}) and the gradients to x_i, y_{off+i}, every y-_ij and s,
// one warp per row, with no intermediate tensors beyond (1 + N-) f64 values per row. The gate k_i
// is not recomputed here: hq_clip_row_lse produces it in the contrastive pass (the row argmax),
// so it costs nothing extra. The work is O(n N- D), small next to the contrastive loss, so the
// kernel favours simplicity and f64 accuracy over speed.
// CPU twin: kernels/src/cpu/hni.rs; reference: kernels/src/reference.rs.

extern "C" __global__ void __launch_bounds__(128)
hq_hni_rows(const float* __restrict__ X, const float* __restrict__ Yall, const float* __restrict__ Neg,
            int n, int K, int D, int off, const float* __restrict__ scale,
            const float* __restrict__ gate, double inv_n, double* __restrict__ scratch,
            float* __restrict__ dX, float* __restrict__ dYpos, float* __restrict__ dNeg,
            double* __restrict__ loss_part, double* __restrict__ ds_part) {
    int i = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (i >= n) return;  // whole warps leave together
    const float* x = X + (long long)i * D;
    const float* yp = Yall + (long long)(i + off) * D;
    const float* ng = Neg + (long long)i * K * D;
    double* sc = scratch + (long long)i * (K + 1);
    double s = (double)(*scale);
    double w = (double)gate[i] * inv_n;
    // Unscaled similarities: sc[0] the positive, sc[1..K] the negatives.
    for (int t = 0; t <= K; ++t) {
        const float* v = (t == 0) ? yp : ng + (long long)(t - 1) * D;
        double acc = 0.0;
        for (int d = lane; d < D; d += 32) acc += (double)x[d] * (double)v[d];
        acc = hq_warp_sum(acc);
        if (lane == 0) sc[t] = acc;
    }
    __syncwarp();
    double mx = -(double)hq_inf();
    int imax = 0;
    for (int t = 0; t <= K; ++t) {
        if (s * sc[t] > mx) {
            mx = s * sc[t];
            imax = t;
        }
    }
    // log-sum-exp as (mx, log1p(rest)): log p_t = (s l_t - mx) - tt stays exact for a
    // nearly-certain positive; p_0 - 1 is expm1(log p_0).
    double rest = 0.0;
    for (int t = 0; t <= K; ++t)
        if (t != imax) rest += exp(s * sc[t] - mx);
    double tt = log1p(rest);
    __syncwarp();  // every lane has read sc before lane 0 overwrites it
    if (lane == 0) {
        loss_part[i] = w * ((mx - s * sc[0]) + tt);
        double ds = 0.0;
        // sc[t] becomes dL/dlogit_t: w (p_0 - 1) for the positive, w p_t for a negative.
        for (int t = 0; t <= K; ++t) {
            double lp = (s * sc[t] - mx) - tt;
            double c = w * ((t == 0) ? expm1(lp) : exp(lp));
            ds += c * sc[t];
            sc[t] = c;
        }
        ds_part[i] = ds;
    }
    __syncwarp();
    for (int d = lane; d < D; d += 32) {
        double xd = (double)x[d];
        double gx = sc[0] * (double)yp[d];
        for (int t = 1; t <= K; ++t) gx += sc[t] * (double)ng[(long long)(t - 1) * D + d];
        dX[(long long)i * D + d] = (float)(s * gx);
        dYpos[(long long)i * D + d] = (float)(s * sc[0] * xd);
        for (int t = 1; t <= K; ++t)
            dNeg[((long long)i * K + (t - 1)) * D + d] = (float)(s * sc[t] * xd);
    }
}
