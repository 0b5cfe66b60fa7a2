// Shared device helpers for HQ-CLIP's loss kernels (prepended to every .cu file at compile time;
// NVRTC gets no include path). Plain CUDA C, no headers: NVRTC provides the math built-ins.
//
// Conventions of every kernel:
// - f32 inputs, row-major, contiguous; f64 for every sum that spans a whole row, column or batch.
// - The logit multiplier s is read from device memory (`const float* scale`), so the host never
//   synchronises to read it.
// - Blocks of 256 threads laid out as 16 x 16 (tx = tid % 16, ty = tid / 16) for the tiled
//   kernels; a thread owns rows ty + 16*i and columns tx + 16*j (i, j < 4) of a 64 x 64 tile,
//   so a row's 16 owners are 16 consecutive lanes of one warp and reduce with xor-shuffles.

#ifndef HQ_COMMON_CUH
#define HQ_COMMON_CUH

#define HQ_TM 64
#define HQ_TN 64
#define HQ_TK 16
#define HQ_THREADS 256
#define HQ_FULL_MASK 0xffffffffu

__device__ __forceinline__ float hq_inf() { return __int_as_float(0x7f800000); }

// Max / sum over the 16 lanes that share a tile row (xor offsets stay inside the half warp).
__device__ __forceinline__ float hq_row16_max(float v) {
    for (int o = 8; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(HQ_FULL_MASK, v, o));
    return v;
}
__device__ __forceinline__ float hq_row16_sum(float v) {
    for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(HQ_FULL_MASK, v, o);
    return v;
}
__device__ __forceinline__ double hq_row16_sum_d(double v) {
    for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(HQ_FULL_MASK, v, o);
    return v;
}
__device__ __forceinline__ int hq_row16_min_int(int v) {
    for (int o = 8; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(HQ_FULL_MASK, v, o));
    return v;
}
__device__ __forceinline__ double hq_warp_sum(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(HQ_FULL_MASK, v, o);
    return v;
}

// Block-wide sum of one double per thread (blockDim.x a multiple of 32, at most 1024). Every
// thread gets the total. `scratch` holds 32 doubles of shared memory.
__device__ __forceinline__ double hq_block_sum(double v, double* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = hq_warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    double t = 0.0;
    for (int w = 0; w < nwarps; ++w) t += scratch[w];
    return t;
}

// Unscaled 64 x 64 logit tile acc[i][j] = A[r0 + ty + 16i] . B[c0 + tx + 16j] (zero outside
// R x C), through shared-memory K-slices of 16. All 256 threads must call it.
__device__ __forceinline__ void hq_tile_dot(const float* __restrict__ A, const float* __restrict__ B,
                                            int R, int C, int D, int r0, int c0,
                                            float (*As)[HQ_TM + 1], float (*Bs)[HQ_TN + 1],
                                            float acc[4][4]) {
    int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
    for (int k0 = 0; k0 < D; k0 += HQ_TK) {
        // 64 rows x 16 k of A and of B: 1024 values each, 4 per thread; consecutive threads read
        // consecutive k of one row (coalesced), stores are transposed into [k][row].
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            int e = tid + q * HQ_THREADS;
            int r = e / HQ_TK, k = e % HQ_TK;
            int gk = k0 + k;
            int ga = r0 + r, gb = c0 + r;
            As[k][r] = (ga < R && gk < D) ? A[(long long)ga * D + gk] : 0.f;
            Bs[k][r] = (gb < C && gk < D) ? B[(long long)gb * D + gk] : 0.f;
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < HQ_TK; ++k) {
            float a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) a[i] = As[k][ty + 16 * i];
#pragma unroll
            for (int j = 0; j < 4; ++j) b[j] = Bs[k][tx + 16 * j];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }
}

// out = w1 * sum(p1[0..n1]) + w2 * sum(p2[0..n2]) in f64, written as f32. One block; p2 may be
// null. Deterministic (fixed reduction order).
extern "C" __global__ void __launch_bounds__(HQ_THREADS)
hq_sum2(const double* __restrict__ p1, int n1, double w1,
        const double* __restrict__ p2, int n2, double w2, float* __restrict__ out) {
    __shared__ double scratch[32];
    double acc = 0.0;
    for (int i = threadIdx.x; i < n1; i += blockDim.x) acc += w1 * p1[i];
    if (p2 != 0)
        for (int i = threadIdx.x; i < n2; i += blockDim.x) acc += w2 * p2[i];
    double total = hq_block_sum(acc, scratch);
    if (threadIdx.x == 0) *out = (float)total;
}

#endif  // HQ_COMMON_CUH
