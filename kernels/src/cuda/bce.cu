// Short-tag classification loss: multi-label BCE with logits against sparse (CSR) positives.
//
// What is fused: the dense N x K target matrix never exists (K up to 100k). One block per row
// sweeps the K logits once: the loss of a negative target, softplus(z), and its gradient
// sigmoid(z)/N. After a barrier the same block visits only the row's positive indices and
// overwrites those entries with the positive's own stable forms (loss softplus(-z) = softplus(z)
// - z, gradient -sigmoid(-z)/N), so no entry is computed as a difference of two near-equal
// numbers. softplus(z) = max(z,0) + log1p(exp(-|z|)) and the sigmoid from the same exp(-|z|)
// never overflow, whatever |z|. Row losses in f64, summed deterministically by hq_sum2.
// Tag indices are validated on the host (range, duplicates) before launch.
// CPU twin: kernels/src/cpu/bce.rs; reference: kernels/src/reference.rs.

__device__ __forceinline__ float hq_softplus(float v) { return fmaxf(v, 0.f) + log1pf(expf(-fabsf(v))); }

extern "C" __global__ void __launch_bounds__(HQ_THREADS)
hq_bce_rows(const float* __restrict__ Z, long long K, const long long* __restrict__ indptr,
            const long long* __restrict__ indices, float inv_n, int want_grad,
            float* __restrict__ dZ, double* __restrict__ loss_part) {
    __shared__ double scratch[32];
    long long row = blockIdx.x;
    const float* z = Z + row * K;
    float* g = dZ + row * K;
    double acc = 0.0;
    for (long long k = threadIdx.x; k < K; k += blockDim.x) {
        float v = z[k];
        float e = expf(-fabsf(v));
        acc += (double)hq_softplus(v);
        if (want_grad) g[k] = ((v >= 0.f) ? 1.f / (1.f + e) : e / (1.f + e)) * inv_n;
    }
    __syncthreads();  // dense gradient writes land before the positives overwrite theirs
    long long p0 = indptr[row], p1 = indptr[row + 1];
    for (long long p = p0 + threadIdx.x; p < p1; p += blockDim.x) {
        long long k = indices[p];
        float v = z[k];
        // Swap the negative-target term for the positive one: the subtracted f32 value is the one
        // added above (same expression), softplus(-z) keeps its precision when tiny.
        acc += (double)hq_softplus(-v) - (double)hq_softplus(v);
        if (want_grad) {
            float e = expf(-fabsf(v));
            g[k] = -((v >= 0.f) ? e / (1.f + e) : 1.f / (1.f + e)) * inv_n;
        }
    }
    double total = hq_block_sum(acc, scratch);
    if (threadIdx.x == 0) loss_part[row] = total;
}
