//! The CPU building blocks: one GEMM micro-kernel per instruction set, a vectorisable `exp`, and
//! lane-parallel reductions.
//!
//! Only the micro-kernel is written with intrinsics (AVX-512); everything else is plain Rust that
//! LLVM vectorises once it is inlined into a `#[target_feature]` function (see [`Isa`] and the
//! `dispatch!` macro in `clip.rs`). Float reductions are written over explicit lane arrays because
//! LLVM may not reorder a plain `f32` sum.

/// Rows of the micro-kernel's output tile.
pub const MR: usize = 8;
/// Columns of the micro-kernel's output tile (two 16-lane vectors).
pub const NR: usize = 32;
/// Lanes of the reduction helpers.
const LANES: usize = 16;

/// Which CPU code path runs. [`Isa::detect`] picks the best one the machine has; the tests run
/// every one that is available.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Plain Rust, baseline target features (SSE2 on x86-64), no FMA.
    Generic,
    /// AVX2 + FMA, auto-vectorised micro-kernel.
    Avx2,
    /// AVX-512F micro-kernel with intrinsics (16 zmm accumulators).
    Avx512,
}

impl Isa {
    /// The best path this machine supports.
    pub fn detect() -> Isa {
        *Self::available().last().unwrap_or(&Isa::Generic)
    }

    /// Every path this machine can run, worst first.
    pub fn available() -> Vec<Isa> {
        #[allow(unused_mut)]
        let mut v = vec![Isa::Generic];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                v.push(Isa::Avx2);
            }
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
            {
                v.push(Isa::Avx512);
            }
        }
        v
    }

    /// Whether this machine can run `self`.
    pub fn is_available(self) -> bool {
        Self::available().contains(&self)
    }
}

/// Steps of k summed in registers before being added into C: long dot products (k = D = 512)
/// are summed as 64-term chains plus a short chain of partial sums, which keeps the f32 logits
/// about three times more accurate than one 512-term chain (the logits' rounding is what limits
/// the agreement with the f64 reference at s = 100) for ~3% more work.
pub(crate) const KCHUNK: usize = 64;

/// A micro-kernel: `C[MR x NR] = sum_{k < kc} A[k][0..MR] (x) B[k][0..NR]`, with A packed as
/// `kc x MR` (k-major) and B packed as `kc x NR`; C has row stride `ldc` and is overwritten, or
/// added to when `accumulate` (C += the sum, 64-term chunk by chunk as always).
///
/// It also carries the element-wise tile work of the fused loss (row/column log-sum-exp folding,
/// the gradient tile), with portable defaults that an ISA can override: a tile row is only 64
/// values, so auto-vectorised code spends most of its time in horizontal reductions and scalar
/// tails, which masked AVX-512 code avoids.
pub(crate) trait Kernel: Copy + Send + Sync {
    /// # Safety
    /// `ap` must be readable for `kc * MR` floats, `bp` for `kc * NR`, and `c` writable for
    /// `MR` rows of `NR` floats at stride `ldc`; the caller's CPU must support the kernel's ISA.
    unsafe fn ukernel(
        kc: usize,
        ap: *const f32,
        bp: *const f32,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
    );

    /// Folds one scaled tile row (1..=64 values) into a running `(m, rest)` (see [`fold_stats`]).
    #[inline(always)]
    fn row_fold(row: &[f32], m: &mut f32, rest: &mut f64) {
        portable_row_fold(row, m, rest)
    }

    /// Folds `br` scaled tile rows of `bc <= 64` values (row stride `stride`) into running column
    /// statistics `cm`, `cr` (length `bc`).
    #[inline(always)]
    fn col_fold(tile: &[f32], stride: usize, br: usize, bc: usize, cm: &mut [f32], cr: &mut [f64]) {
        portable_col_fold(tile, stride, br, bc, cm, cr)
    }

    /// One row of the gradient tile: `g_j = w exp(v_j - lse) (+ w_c exp(v_j - lse_col_j))` for the
    /// `row.len() <= 64` values, zero-filled to 64; returns the row's dL/ds terms
    /// `sum_j w P (v_j - vd) (+ w_c P_c (v_j - vd_col_j))` in f64.
    #[inline(always)]
    fn g_row(
        row: &[f32],
        lse: (f32, f32, f32),
        w: f32,
        vd: f32,
        cols: Option<&ColRow>,
        g: &mut [f32; 64],
    ) -> f64 {
        portable_g_row(row, lse, w, vd, cols, g)
    }
}

/// The column side of a gradient-tile row: per column lse `(m, t_hi, t_lo)`, label logit, and
/// the weight.
pub(crate) struct ColRow<'a> {
    pub m: &'a [f32],
    pub hi: &'a [f32],
    pub lo: &'a [f32],
    pub diag: &'a [f32],
    pub w: f32,
}

/// Folds values whose maximum is `vmax` and whose `sum exp(v - max(m, vmax))` over all values
/// but, when `vmax` is a new maximum, one occurrence of it, is `others`, into a running
/// `(m, rest)`: the log-sum-exp is `m + ln_1p(rest)`, the maximum itself being the implicit 1.
#[inline(always)]
pub(crate) fn fold_stats(m: &mut f32, rest: &mut f64, vmax: f32, others: f64) {
    if vmax > *m {
        *rest = if *m == f32::NEG_INFINITY {
            others
        } else {
            (1.0 + *rest) * ((*m as f64) - (vmax as f64)).exp() + others
        };
        *m = vmax;
    } else {
        *rest += others;
    }
}

#[inline(always)]
fn portable_row_fold(row: &[f32], m: &mut f32, rest: &mut f64) {
    let mut e = [0.0f32; 64];
    let tmax = max_of(row);
    let fresh = tmax > *m;
    let r = if fresh { tmax } else { *m };
    for (ev, &v) in e.iter_mut().zip(row) {
        *ev = exp_f32(v - r);
    }
    if fresh {
        if let Some(a) = row.iter().position(|&v| v == tmax) {
            e[a] = 0.0;
        }
    }
    fold_stats(m, rest, tmax, sum_of(&e[..row.len()]));
}

#[inline(always)]
fn portable_col_fold(
    tile: &[f32],
    stride: usize,
    br: usize,
    bc: usize,
    cm: &mut [f32],
    cr: &mut [f64],
) {
    let mut cmax = [f32::NEG_INFINITY; 64];
    for i in 0..br {
        for (c, &v) in cmax[..bc]
            .iter_mut()
            .zip(&tile[i * stride..i * stride + bc])
        {
            *c = if v > *c { v } else { *c };
        }
    }
    // pending[j]: column j has a new maximum in this tile whose first occurrence is the implicit
    // 1 and must be left out of the sum.
    let mut pending = [false; 64];
    let mut csum = [0.0f64; 64];
    let mut ref_m = [0.0f32; 64];
    for j in 0..bc {
        pending[j] = cmax[j] > cm[j];
        ref_m[j] = if pending[j] { cmax[j] } else { cm[j] };
    }
    for i in 0..br {
        let row = &tile[i * stride..i * stride + bc];
        for (((acc, &v), &m), p) in csum[..bc]
            .iter_mut()
            .zip(row)
            .zip(ref_m.iter())
            .zip(pending.iter_mut())
        {
            let skip = *p && v == m;
            *p &= !skip;
            *acc += if skip { 0.0 } else { exp_f32(v - m) as f64 };
        }
    }
    for j in 0..bc {
        fold_stats(&mut cm[j], &mut cr[j], cmax[j], csum[j]);
    }
}

#[inline(always)]
fn portable_g_row(
    row: &[f32],
    lse: (f32, f32, f32),
    w: f32,
    vd: f32,
    cols: Option<&ColRow>,
    g: &mut [f32; 64],
) -> f64 {
    let (m, hi, lo) = lse;
    let n = row.len();
    let mut ds = 0.0f64;
    g.fill(0.0);
    for (gv, &v) in g[..n].iter_mut().zip(row) {
        *gv = w * exp_f32(((v - m) - hi) - lo);
    }
    for (gv, &v) in g[..n].iter().zip(row) {
        ds += *gv as f64 * (v - vd) as f64;
    }
    if let Some(c) = cols {
        for j in 0..n {
            let pc = c.w * exp_f32(((row[j] - c.m[j]) - c.hi[j]) - c.lo[j]);
            ds += pc as f64 * (row[j] - c.diag[j]) as f64;
            g[j] += pc;
        }
    }
    ds
}

/// Portable kernel; `FMA` selects fused multiply-add (only where the target has it, or `mul_add`
/// becomes a libm call).
#[derive(Clone, Copy)]
pub(crate) struct Portable<const FMA: bool>;

impl<const FMA: bool> Kernel for Portable<FMA> {
    #[inline(always)]
    unsafe fn ukernel(
        kc: usize,
        ap: *const f32,
        bp: *const f32,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        // Two halves of 16 columns keep the accumulators within 16 ymm registers under AVX2.
        for h in 0..2 {
            let mut k0 = 0;
            while k0 < kc.max(1) {
                let k1 = (k0 + KCHUNK).min(kc);
                let mut acc = [[0.0f32; NR / 2]; MR];
                for k in k0..k1 {
                    // SAFETY: k < kc and the caller guarantees the packed extents.
                    let (a, b) = unsafe {
                        (
                            std::slice::from_raw_parts(ap.add(k * MR), MR),
                            std::slice::from_raw_parts(bp.add(k * NR + h * NR / 2), NR / 2),
                        )
                    };
                    for i in 0..MR {
                        let ai = a[i];
                        for j in 0..NR / 2 {
                            acc[i][j] = if FMA {
                                ai.mul_add(b[j], acc[i][j])
                            } else {
                                ai * b[j] + acc[i][j]
                            };
                        }
                    }
                }
                for (i, row) in acc.iter().enumerate() {
                    // SAFETY: the caller guarantees MR rows of NR floats at stride ldc.
                    let out = unsafe {
                        std::slice::from_raw_parts_mut(c.add(i * ldc + h * NR / 2), NR / 2)
                    };
                    if k0 == 0 && !accumulate {
                        out.copy_from_slice(row);
                    } else {
                        for (o, v) in out.iter_mut().zip(row) {
                            *o += v;
                        }
                    }
                }
                k0 = k1.max(k0 + 1);
            }
        }
    }
}

/// AVX-512 kernel: 8 x 32 tile in 16 zmm accumulators, one broadcast per row and step.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(crate) struct Avx512Kernel;

#[cfg(target_arch = "x86_64")]
impl Kernel for Avx512Kernel {
    #[inline(always)]
    fn row_fold(row: &[f32], m: &mut f32, rest: &mut f64) {
        avx512::row_fold(row, m, rest)
    }

    #[inline(always)]
    fn col_fold(tile: &[f32], stride: usize, br: usize, bc: usize, cm: &mut [f32], cr: &mut [f64]) {
        avx512::col_fold(tile, stride, br, bc, cm, cr)
    }

    #[inline(always)]
    fn g_row(
        row: &[f32],
        lse: (f32, f32, f32),
        w: f32,
        vd: f32,
        cols: Option<&ColRow>,
        g: &mut [f32; 64],
    ) -> f64 {
        avx512::g_row(row, lse, w, vd, cols, g)
    }

    #[inline(always)]
    unsafe fn ukernel(
        kc: usize,
        ap: *const f32,
        bp: *const f32,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        use std::arch::x86_64::*;
        // SAFETY: only called from functions compiled with avx512f (see clip.rs `dispatch!`), on a
        // CPU where `Isa::Avx512` was detected; pointer extents are the caller's contract.
        unsafe {
            let mut a = ap;
            let mut b = bp;
            let mut k0 = 0;
            loop {
                let steps = KCHUNK.min(kc - k0);
                let mut acc = [_mm512_setzero_ps(); 2 * MR];
                for _ in 0..steps {
                    let b0 = _mm512_loadu_ps(b);
                    let b1 = _mm512_loadu_ps(b.add(16));
                    for i in 0..MR {
                        let ai = _mm512_set1_ps(*a.add(i));
                        acc[2 * i] = _mm512_fmadd_ps(ai, b0, acc[2 * i]);
                        acc[2 * i + 1] = _mm512_fmadd_ps(ai, b1, acc[2 * i + 1]);
                    }
                    a = a.add(MR);
                    b = b.add(NR);
                }
                for i in 0..MR {
                    let (p0, p1) = (c.add(i * ldc), c.add(i * ldc + 16));
                    if k0 == 0 && !accumulate {
                        _mm512_storeu_ps(p0, acc[2 * i]);
                        _mm512_storeu_ps(p1, acc[2 * i + 1]);
                    } else {
                        _mm512_storeu_ps(p0, _mm512_add_ps(_mm512_loadu_ps(p0), acc[2 * i]));
                        _mm512_storeu_ps(p1, _mm512_add_ps(_mm512_loadu_ps(p1), acc[2 * i + 1]));
                    }
                }
                k0 += steps;
                if k0 >= kc {
                    break;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! Masked AVX-512 versions of the tile element-wise work. Only ever inlined into functions
    //! compiled with `avx512f` (the `multiversion!` wrappers), on CPUs where it was detected.
    use super::{fold_stats, ColRow};
    use std::arch::x86_64::*;

    /// Lanes `16 c ..` of a row of `n <= 64` values.
    #[inline(always)]
    pub(super) fn lane_mask(n: usize, c: usize) -> __mmask16 {
        let k = n.saturating_sub(16 * c).min(16);
        ((1u32 << k) - 1) as __mmask16
    }

    /// `exp` of 16 lanes, the same algorithm as `exp_f32` (with FMA).
    #[inline(always)]
    pub(super) unsafe fn exp16(x: __m512) -> __m512 {
        // SAFETY: avx512f is enabled in every caller (see the module docs).
        unsafe {
            let xc = _mm512_max_ps(
                _mm512_min_ps(x, _mm512_set1_ps(88.0)),
                _mm512_set1_ps(-87.0),
            );
            let magic = _mm512_set1_ps(12_582_912.0);
            let t = _mm512_fmadd_ps(xc, _mm512_set1_ps(std::f32::consts::LOG2_E), magic);
            let n = _mm512_sub_ps(t, magic);
            let ni = _mm512_sub_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(0x4B40_0000));
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), xc);
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
            let mut p = _mm512_set1_ps(1.987_569_1e-4);
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.398_199_9e-3));
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.333_452e-3));
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.166_579_6e-2));
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.666_666_5e-1));
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5));
            let y = _mm512_add_ps(
                _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r),
                _mm512_set1_ps(1.0),
            );
            let pow2 = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(
                ni,
                _mm512_set1_epi32(127),
            )));
            let under = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_set1_ps(-87.0));
            _mm512_maskz_mul_ps(!under, y, pow2)
        }
    }

    /// Adds the 16 lanes of `v` to two f64 accumulators (low and high 8 lanes).
    #[inline(always)]
    unsafe fn acc_f64(lo: &mut __m512d, hi: &mut __m512d, v: __m512) {
        // SAFETY: as above.
        unsafe {
            *lo = _mm512_add_pd(*lo, _mm512_cvtps_pd(_mm512_castps512_ps256(v)));
            *hi = _mm512_add_pd(*hi, _mm512_cvtps_pd(_mm512_extractf32x8_ps::<1>(v)));
        }
    }

    #[inline(always)]
    pub(super) fn row_fold(row: &[f32], m: &mut f32, rest: &mut f64) {
        let n = row.len();
        debug_assert!(n <= 64);
        // SAFETY: masked loads touch only `row[..n]`; avx512f is enabled in every caller.
        unsafe {
            let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
            let mut v = [ninf; 4];
            for (c, vc) in v.iter_mut().enumerate() {
                *vc =
                    _mm512_mask_loadu_ps(ninf, lane_mask(n, c), row.as_ptr().add((16 * c).min(n)));
            }
            let tmax = _mm512_reduce_max_ps(_mm512_max_ps(
                _mm512_max_ps(v[0], v[1]),
                _mm512_max_ps(v[2], v[3]),
            ));
            let fresh = tmax > *m;
            let r = if fresh { tmax } else { *m };
            let rv = _mm512_set1_ps(r);
            // One occurrence of a new maximum is the implicit 1: left out.
            let mut excl = [0 as __mmask16; 4];
            if fresh {
                for c in 0..4 {
                    let eq = _mm512_mask_cmp_ps_mask::<_CMP_EQ_OQ>(lane_mask(n, c), v[c], rv);
                    if eq != 0 {
                        excl[c] = eq & eq.wrapping_neg();
                        break;
                    }
                }
            }
            let (mut lo, mut hi) = (_mm512_setzero_pd(), _mm512_setzero_pd());
            for c in 0..4 {
                let k = lane_mask(n, c) & !excl[c];
                if k != 0 {
                    let e = _mm512_maskz_mov_ps(k, exp16(_mm512_sub_ps(v[c], rv)));
                    acc_f64(&mut lo, &mut hi, e);
                }
            }
            fold_stats(m, rest, tmax, _mm512_reduce_add_pd(_mm512_add_pd(lo, hi)));
        }
    }

    #[inline(always)]
    pub(super) fn col_fold(
        tile: &[f32],
        stride: usize,
        br: usize,
        bc: usize,
        cm: &mut [f32],
        cr: &mut [f64],
    ) {
        debug_assert!(bc <= 64 && cm.len() >= bc && cr.len() >= bc);
        debug_assert!(tile.len() >= (br - 1) * stride + bc);
        // SAFETY: masked loads/stores touch only the first `bc` values of each row and of
        // cm/cr; avx512f is enabled in every caller.
        unsafe {
            let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
            let k: [__mmask16; 4] = [
                lane_mask(bc, 0),
                lane_mask(bc, 1),
                lane_mask(bc, 2),
                lane_mask(bc, 3),
            ];
            let at = |i: usize, c: usize| tile.as_ptr().add(i * stride + (16 * c).min(bc));
            let mut cmax = [ninf; 4];
            for i in 0..br {
                for c in 0..4 {
                    cmax[c] = _mm512_max_ps(cmax[c], _mm512_mask_loadu_ps(ninf, k[c], at(i, c)));
                }
            }
            let mut pending = [0 as __mmask16; 4];
            let mut refm = [ninf; 4];
            for c in 0..4 {
                let old = _mm512_mask_loadu_ps(ninf, k[c], cm.as_ptr().add((16 * c).min(bc)));
                pending[c] = _mm512_mask_cmp_ps_mask::<_CMP_GT_OQ>(k[c], cmax[c], old);
                refm[c] = _mm512_max_ps(old, cmax[c]);
            }
            let mut acc = [(_mm512_setzero_pd(), _mm512_setzero_pd()); 4];
            for i in 0..br {
                for c in 0..4 {
                    if k[c] == 0 {
                        continue;
                    }
                    let v = _mm512_maskz_loadu_ps(k[c], at(i, c));
                    // First occurrence of a new column maximum: the implicit 1.
                    let eq = _mm512_mask_cmp_ps_mask::<_CMP_EQ_OQ>(pending[c], v, refm[c]);
                    pending[c] &= !eq;
                    let e = _mm512_maskz_mov_ps(k[c] & !eq, exp16(_mm512_sub_ps(v, refm[c])));
                    acc_f64(&mut acc[c].0, &mut acc[c].1, e);
                }
            }
            let mut sums = [0.0f64; 64];
            let mut maxs = [0.0f32; 64];
            for c in 0..4 {
                _mm512_storeu_pd(sums.as_mut_ptr().add(16 * c), acc[c].0);
                _mm512_storeu_pd(sums.as_mut_ptr().add(16 * c + 8), acc[c].1);
                _mm512_storeu_ps(maxs.as_mut_ptr().add(16 * c), cmax[c]);
            }
            for j in 0..bc {
                fold_stats(&mut cm[j], &mut cr[j], maxs[j], sums[j]);
            }
        }
    }

    #[inline(always)]
    pub(super) fn g_row(
        row: &[f32],
        lse: (f32, f32, f32),
        w: f32,
        vd: f32,
        cols: Option<&ColRow>,
        g: &mut [f32; 64],
    ) -> f64 {
        let n = row.len();
        debug_assert!(n <= 64);
        // SAFETY: masked loads touch only the first `n` values of every slice (each at least `n`
        // long); avx512f is enabled in every caller.
        unsafe {
            let (m, hi, lo) = (
                _mm512_set1_ps(lse.0),
                _mm512_set1_ps(lse.1),
                _mm512_set1_ps(lse.2),
            );
            let (wv, vdv) = (_mm512_set1_ps(w), _mm512_set1_ps(vd));
            let (mut dlo, mut dhi) = (_mm512_setzero_pd(), _mm512_setzero_pd());
            for c in 0..4 {
                let k = lane_mask(n, c);
                let off = (16 * c).min(n);
                if k == 0 {
                    _mm512_storeu_ps(g.as_mut_ptr().add(16 * c), _mm512_setzero_ps());
                    continue;
                }
                let v = _mm512_maskz_loadu_ps(k, row.as_ptr().add(off));
                let pr = _mm512_maskz_mul_ps(
                    k,
                    wv,
                    exp16(_mm512_sub_ps(_mm512_sub_ps(_mm512_sub_ps(v, m), hi), lo)),
                );
                let dv = _mm512_sub_ps(v, vdv);
                let mut term_lo = _mm512_mul_pd(
                    _mm512_cvtps_pd(_mm512_castps512_ps256(pr)),
                    _mm512_cvtps_pd(_mm512_castps512_ps256(dv)),
                );
                let mut term_hi = _mm512_mul_pd(
                    _mm512_cvtps_pd(_mm512_extractf32x8_ps::<1>(pr)),
                    _mm512_cvtps_pd(_mm512_extractf32x8_ps::<1>(dv)),
                );
                let mut gv = pr;
                if let Some(cr) = cols {
                    let cm = _mm512_maskz_loadu_ps(k, cr.m.as_ptr().add(off));
                    let ch = _mm512_maskz_loadu_ps(k, cr.hi.as_ptr().add(off));
                    let cl = _mm512_maskz_loadu_ps(k, cr.lo.as_ptr().add(off));
                    let cd = _mm512_maskz_loadu_ps(k, cr.diag.as_ptr().add(off));
                    let pc = _mm512_maskz_mul_ps(
                        k,
                        _mm512_set1_ps(cr.w),
                        exp16(_mm512_sub_ps(_mm512_sub_ps(_mm512_sub_ps(v, cm), ch), cl)),
                    );
                    let dc = _mm512_sub_ps(v, cd);
                    term_lo = _mm512_fmadd_pd(
                        _mm512_cvtps_pd(_mm512_castps512_ps256(pc)),
                        _mm512_cvtps_pd(_mm512_castps512_ps256(dc)),
                        term_lo,
                    );
                    term_hi = _mm512_fmadd_pd(
                        _mm512_cvtps_pd(_mm512_extractf32x8_ps::<1>(pc)),
                        _mm512_cvtps_pd(_mm512_extractf32x8_ps::<1>(dc)),
                        term_hi,
                    );
                    gv = _mm512_add_ps(gv, pc);
                }
                dlo = _mm512_add_pd(dlo, term_lo);
                dhi = _mm512_add_pd(dhi, term_hi);
                _mm512_storeu_ps(g.as_mut_ptr().add(16 * c), gv);
            }
            _mm512_reduce_add_pd(_mm512_add_pd(dlo, dhi))
        }
    }
}

/// `exp(x)` in f32 to about 1 ulp (Cephes' `expf`: `x = n ln2 + r`, a degree-6 polynomial in r,
/// `2^n` built in the exponent bits). Branch-free so that loops over it vectorise. Returns 0 for
/// `x < -87` (true value below 1.7e-38) and saturates at `x = 88`; callers only pass `x <= 0`
/// (logits shifted by their maximum or by their log-sum-exp).
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding it rounds to the nearest integer and leaves that integer in the low
    // mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let xc = x.clamp(-87.0, 88.0);
    let t = xc * LOG2E + MAGIC;
    let n = t - MAGIC;
    let ni = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    let pow2 = f32::from_bits(((ni + 127) as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        y * pow2
    }
}

/// `ln(1 + e)` for `e` in `[0, 1]`, accurate to f32 precision also for tiny `e`:
/// `ln(1+e) = 2 atanh(t)`, `t = e / (2 + e) <= 1/3`, odd series to t^15 (truncation < 2e-9).
#[inline(always)]
pub(crate) fn log1p_unit(e: f32) -> f32 {
    let t = e / (2.0 + e);
    let t2 = t * t;
    let mut p = 1.0f32 / 15.0;
    p = p * t2 + 1.0 / 13.0;
    p = p * t2 + 1.0 / 11.0;
    p = p * t2 + 1.0 / 9.0;
    p = p * t2 + 1.0 / 7.0;
    p = p * t2 + 1.0 / 5.0;
    p = p * t2 + 1.0 / 3.0;
    p = p * t2 + 1.0;
    2.0 * t * p
}

/// Maximum of a slice (`-inf` for an empty one), lane-parallel.
#[inline(always)]
pub(crate) fn max_of(v: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = v.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &a in acc.iter().chain(rest) {
        m = if a > m { a } else { m };
    }
    m
}

/// Sum of a slice, each term widened to f64 (f64 lanes). Used for sums of exp where one term is
/// ~1 and the others tiny: an f32 sum would drop the tiny ones (the loss is their log).
#[inline(always)]
pub(crate) fn sum_of(v: &[f32]) -> f64 {
    const L: usize = 8;
    let mut acc = [0.0f64; L];
    let chunks = v.chunks_exact(L);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..L {
            acc[l] += c[l] as f64;
        }
    }
    acc.iter().sum::<f64>() + rest.iter().map(|&a| a as f64).sum::<f64>()
}

/// Dot product of two f32 slices accumulated in f64 lanes.
#[inline(always)]
pub(crate) fn dot_f64(a: &[f32], b: &[f32]) -> f64 {
    const L: usize = 8;
    let mut acc = [0.0f64; L];
    let ca = a.chunks_exact(L);
    let cb = b.chunks_exact(L);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..L {
            acc[l] += x[l] as f64 * y[l] as f64;
        }
    }
    let mut s: f64 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += *x as f64 * *y as f64;
    }
    s
}

/// Splits an f64 into an f32 pair `hi + lo` so that `(v - hi) - lo` keeps f32 accuracy when `v`
/// is close to the f64 value (used for `exp(logit - lse)` with lse in f64).
#[inline(always)]
pub(crate) fn split_f64(v: f64) -> (f32, f32) {
    let hi = v as f32;
    (hi, (v - hi as f64) as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let got = exp_f32(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp_f32(-100.0), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn log1p_matches_std() {
        for i in 0..=2000 {
            let e = if i == 0 {
                0.0
            } else {
                (i as f32 / 2000.0).powi(7)
            };
            let got = log1p_unit(e) as f64;
            let want = (e as f64).ln_1p();
            let err = if want == 0.0 {
                got.abs()
            } else {
                ((got - want) / want).abs()
            };
            assert!(err < 3e-7, "log1p({e}): {got} vs {want}");
        }
    }

    #[test]
    fn kernels_agree() {
        let kc = 37;
        let a: Vec<f32> = (0..kc * MR)
            .map(|i| ((i * 7919) % 113) as f32 / 50.0 - 1.0)
            .collect();
        let b: Vec<f32> = (0..kc * NR)
            .map(|i| ((i * 104729) % 97) as f32 / 40.0 - 1.2)
            .collect();
        let mut want = vec![0.0f64; MR * NR];
        for k in 0..kc {
            for i in 0..MR {
                for j in 0..NR {
                    want[i * NR + j] += a[k * MR + i] as f64 * b[k * NR + j] as f64;
                }
            }
        }
        let check = |c: &[f32]| {
            for (g, w) in c.iter().zip(&want) {
                assert!((*g as f64 - w).abs() < 1e-4, "{g} vs {w}");
            }
        };
        let mut c = vec![0.0f32; MR * NR];
        // SAFETY: extents are exact; the portable kernel needs no CPU feature.
        unsafe {
            Portable::<false>::ukernel(kc, a.as_ptr(), b.as_ptr(), c.as_mut_ptr(), NR, false)
        };
        check(&c);
        #[cfg(target_arch = "x86_64")]
        if Isa::Avx512.is_available() {
            #[target_feature(enable = "avx512f")]
            unsafe fn run(kc: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
                // SAFETY: extents are exact; avx512f is enabled here and was detected.
                unsafe {
                    Avx512Kernel::ukernel(kc, a.as_ptr(), b.as_ptr(), c.as_mut_ptr(), NR, false)
                }
            }
            let mut c = vec![0.0f32; MR * NR];
            // SAFETY: AVX-512 was detected.
            unsafe { run(kc, &a, &b, &mut c) };
            check(&c);
        }
    }
}
