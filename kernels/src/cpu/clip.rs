//! Fused contrastive loss on the CPU.
//!
//! What it fuses, and why: the unfused version builds the N x M logit matrix, a log-softmax per
//! direction and their gradients, O(N*M) memory and several full passes over it. Here the logit
//! matrix only ever exists as BR x BC tiles (or one BR-row strip): a tile is computed by a packed
//! GEMM micro-kernel, consumed at once (row/column log-sum-exp accumulated online as in flash
//! attention, or turned into its gradient tile G), and dropped. Memory is O((N+M)*D) per worker.
//!
//! Two schedules, chosen by what the loss needs:
//! - Symmetric (one process, rows and columns both normalised over the same matrix): pass 1 sweeps
//!   all tiles once and accumulates row AND column (max, sum-exp) online; pass 2 recomputes every
//!   tile, forms `G = w (P_row + P_col) - w_d I` and runs the two gradient GEMMs `dX += G Y`,
//!   `dY += G^T X`. Four GEMM-equivalents of N*M*D (the unfused version needs three plus the
//!   memory-bound softmax passes over N*M). When all tiles together are no larger than the
//!   operands (`N M <= (N + M) D`: N <= 1024 at D = 512, see [`keep_tiles`]), pass 1 keeps its
//!   tiles and pass 2 reads them instead: three GEMM-equivalents, memory still O((N + M) D). That
//!   is what makes small batches, where there is no N^2 memory traffic to save, as cheap as the
//!   unfused version's three GEMMs.
//! - Local rows against gathered columns (open_clip's local loss), where only rows are normalised:
//!   a BR-row strip of the logits is kept (BR x M floats), its row log-sum-exp is exact after one
//!   sweep, and the gradient GEMMs run straight from the strip: three GEMM-equivalents.
//!
//! Precision: products and tiles in f32 (as the unfused f32 version; the dot products are summed
//! in 64-term chains), everything else built to stay accurate for nearly-right rows, the normal
//! case late in training at s = 100, where a row's loss is tiny:
//! - a log-sum-exp is kept as the pair `(m, t)`: `m` the f32 row maximum (a tile value) and
//!   `t = ln_1p(rest)` in f64, `rest` the sum of `exp(v - m)` over all entries but one maximum.
//!   `lse - v_label = (m - v_label) + t` is then exact to f64 when the label is the maximum
//!   (`m - v_label = 0`), where an f64 `lse` would round `t` away against `m`;
//! - `exp(v - lse) = exp(((v - m) - t_hi) - t_lo)`;
//! - the label entry of G, `w (P - 1)`, is `w expm1((v - m) - t)` in f64;
//! - dL/ds is summed as `sum w P (l - l_label)` (same value as `sum G l`, no cancellation);
//! - gradients are accumulated across tiles in f64 (each tile's f32 partial sums at most 64 terms).
//!
//! Parallelism (see `par.rs`): row blocks are split into one contiguous range per worker (fewer
//! workers for small problems, down to one); each worker owns its rows of dA and a private f64
//! accumulator for dB (O(M*D) per worker), summed at the end in a fixed order, so results are
//! deterministic for a given thread count.

use std::ops::Range;

#[cfg(target_arch = "x86_64")]
use super::simd::Avx512Kernel;
use super::simd::{split_f64, ColRow, Isa, Kernel, Portable, KCHUNK, MR, NR};
use super::{par, pool};

/// Rows of a tile (a multiple of MR).
pub(crate) const BR: usize = 64;
/// Columns of a tile (a multiple of NR and of MR).
pub(crate) const BC: usize = 64;
/// K slice of the logit GEMM (a multiple of KCHUNK): 256 x NR floats = 32 KiB, within L1.
const KB: usize = 256;

const _: () = assert!(
    BR.is_multiple_of(MR)
        && BC.is_multiple_of(NR)
        && BC.is_multiple_of(MR)
        && BC == 64
        && KB.is_multiple_of(KCHUNK)
);

/// Generates `$name(isa, args..)` that runs the `#[inline(always)]` generic `$imp::<K>(args..)`
/// compiled for the chosen instruction set.
macro_rules! multiversion {
    ($vis:vis fn $name:ident => $imp:ident ( $($a:ident : $t:ty),* ) -> $ret:ty) => {
        #[allow(clippy::too_many_arguments)]
        $vis fn $name(isa: Isa, $($a: $t),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($a: $t),*) -> $ret {
                    $imp::<Portable<true>>($($a),*)
                }
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn avx512($($a: $t),*) -> $ret {
                    $imp::<Avx512Kernel>($($a),*)
                }
                match isa {
                    // SAFETY: an Isa other than Generic is only ever chosen after
                    // `Isa::is_available` confirmed the CPU has it (see `cpu::check_isa`).
                    Isa::Avx2 => return unsafe { avx2($($a),*) },
                    Isa::Avx512 => return unsafe { avx512($($a),*) },
                    Isa::Generic => {}
                }
            }
            let _ = isa;
            $imp::<Portable<false>>($($a),*)
        }
    };
}
pub(crate) use multiversion;

fn ceil_div(a: usize, b: usize) -> usize {
    a.div_ceil(b)
}

/// A matrix in the role of the logits' rows (`A` in `s A B^T`), packed for the micro-kernel.
pub(crate) struct RowOp {
    pub n: usize,
    pub d: usize,
    /// MR-row panels, each `d x MR` (k-major), zero-padded past `n`: the A operand of `A B^T`.
    ap: Vec<f32>,
    /// BR-row blocks cut into NR-column chunks, each `BR x NR`: the B operand of `G^T A`.
    chunks: Vec<f32>,
}

/// A matrix in the role of the logits' columns (`B` in `s A B^T`), packed for the micro-kernel.
pub(crate) struct ColOp {
    pub n: usize,
    /// NR-row panels, each `d x NR` (k-major): the B operand of `A B^T`.
    bp: Vec<f32>,
    /// BC-row tiles cut into NR-column chunks, each `BC x NR`: the B operand of `G B`.
    chunks: Vec<f32>,
}

impl Drop for RowOp {
    fn drop(&mut self) {
        pool::give(std::mem::take(&mut self.ap));
        pool::give(std::mem::take(&mut self.chunks));
    }
}

impl Drop for ColOp {
    fn drop(&mut self) {
        pool::give(std::mem::take(&mut self.bp));
        pool::give(std::mem::take(&mut self.chunks));
    }
}

fn dchunks(d: usize) -> usize {
    ceil_div(d, NR)
}

/// One packing: `Panels(w)`: `w`-row panels k-major, `out[p][k][i] = data[p*w + i][k]`;
/// `Chunks(r)`: `r`-row blocks cut into NR-column chunks, `out[b][c][i][0..NR] =
/// data[b*r + i][c*NR..]`. Zero-padded.
#[derive(Clone, Copy)]
enum Layout {
    Panels(usize),
    Chunks(usize),
}

impl Layout {
    /// Rows per unit and floats per unit.
    fn unit(self, d: usize) -> (usize, usize) {
        match self {
            Layout::Panels(w) => (w, d * w),
            Layout::Chunks(r) => (r, dchunks(d) * r * NR),
        }
    }
}

/// Packs one unit (`rows` source rows starting at `r0`) into `dst`, zero padding included (`dst`
/// may hold stale values); returns whether every value read was finite.
fn pack_unit(data: &[f32], n: usize, d: usize, layout: Layout, r0: usize, dst: &mut [f32]) -> bool {
    let nonfinite = |v: &f32| u32::from(v.to_bits() & 0x7f80_0000 == 0x7f80_0000);
    let mut bad = 0u32;
    match layout {
        Layout::Panels(w) => {
            let rows = w.min(n.saturating_sub(r0));
            if rows < w {
                dst.fill(0.0);
            }
            let src = &data[r0 * d..(r0 + rows) * d];
            bad |= src.iter().fold(0u32, |b, v| b | nonfinite(v));
            // A transpose, in 64-wide k blocks so that both the w source row pieces and the
            // 64 x w destination block stay in L1 (rows are d floats apart, which for d = 512
            // maps them onto a handful of cache sets).
            match w {
                MR => transpose::<MR>(src, d, dst),
                NR => transpose::<NR>(src, d, dst),
                _ => {
                    for (i, row) in src.chunks_exact(d).enumerate() {
                        for (k, &v) in row.iter().enumerate() {
                            dst[k * w + i] = v;
                        }
                    }
                }
            }
        }
        Layout::Chunks(r) => {
            let rows = r.min(n.saturating_sub(r0));
            if rows < r || !d.is_multiple_of(NR) {
                dst.fill(0.0);
            }
            for i in 0..rows {
                let src = &data[(r0 + i) * d..(r0 + i + 1) * d];
                for c in 0..dchunks(d) {
                    let lo = c * NR;
                    let hi = (lo + NR).min(d);
                    let at = c * r * NR + i * NR;
                    dst[at..at + (hi - lo)].copy_from_slice(&src[lo..hi]);
                }
            }
        }
    }
    bad == 0
}

/// `dst[k * W + i] = src[i * d + k]` for the (at most W) rows of `src`.
fn transpose<const W: usize>(src: &[f32], d: usize, dst: &mut [f32]) {
    for k0 in (0..d).step_by(64) {
        let k1 = (k0 + 64).min(d);
        let block = &mut dst[k0 * W..k1 * W];
        for (i, row) in src.chunks_exact(d).take(W).enumerate() {
            for (out, &v) in block.chunks_exact_mut(W).zip(&row[k0..k1]) {
                out[i] = v;
            }
        }
    }
}

/// Packs several operands in one parallel region. Each request is `(data, n, d, layout)`;
/// returns the packed buffers and whether all values of requests with a `Panels` layout (which
/// read every value) were finite.
fn pack_many(reqs: &[(&[f32], usize, usize, Layout)]) -> (Vec<Vec<f32>>, bool) {
    let mut outs: Vec<Vec<f32>> = reqs
        .iter()
        .map(|&(_, n, d, l)| {
            let (rows, per) = l.unit(d);
            // Every unit is written in full by `pack_unit`: no zeroing here.
            pool::dirty(ceil_div(n, rows) * per)
        })
        .collect();
    let total_units: usize = reqs
        .iter()
        .map(|&(_, n, d, l)| ceil_div(n, l.unit(d).0))
        .sum();
    let total_floats: usize = outs.iter().map(Vec::len).sum();
    // A float moved costs about as much as a few dozen multiply-adds.
    let group = total_units
        .div_ceil(par::workers_for(total_floats.saturating_mul(16)))
        .max(1);
    // Jobs: (request, first unit, units) with the matching output slice.
    let mut jobs: Vec<(usize, usize, &mut [f32])> = Vec::new();
    for (ri, out) in outs.iter_mut().enumerate() {
        let (_, _, d, l) = reqs[ri];
        let per = l.unit(d).1;
        for (gi, chunk) in out.chunks_mut(group * per).enumerate() {
            jobs.push((ri, gi * group, chunk));
        }
    }
    let finite = par::run(jobs, |(ri, u0, chunk)| {
        let (data, n, d, l) = reqs[ri];
        let (rows, per) = l.unit(d);
        let mut ok = true;
        for (ui, dst) in chunk.chunks_mut(per).enumerate() {
            ok &= pack_unit(data, n, d, l, (u0 + ui) * rows, dst);
        }
        ok
    });
    (outs, finite.into_iter().all(|b| b))
}

/// Packs `rows` operands (A roles) and `cols` operands (B roles); returns them and whether every
/// value was finite. Chunk layouts (for the gradient GEMMs) only when `grads`.
pub(crate) fn pack(
    rows: &[(&[f32], usize)],
    cols: &[(&[f32], usize)],
    d: usize,
    grads: bool,
) -> (Vec<RowOp>, Vec<ColOp>, bool) {
    let mut reqs = Vec::new();
    for &(data, n) in rows {
        reqs.push((data, n, d, Layout::Panels(MR)));
        if grads {
            reqs.push((data, n, d, Layout::Chunks(BR)));
        }
    }
    for &(data, n) in cols {
        reqs.push((data, n, d, Layout::Panels(NR)));
        if grads {
            reqs.push((data, n, d, Layout::Chunks(BC)));
        }
    }
    let (bufs, finite) = pack_many(&reqs);
    let mut it = bufs.into_iter();
    let mut next = |want: bool| {
        if want {
            it.next().unwrap_or_default()
        } else {
            Vec::new()
        }
    };
    let ra: Vec<RowOp> = rows
        .iter()
        .map(|&(_, n)| RowOp {
            n,
            d,
            ap: next(true),
            chunks: next(grads),
        })
        .collect();
    let ca: Vec<ColOp> = cols
        .iter()
        .map(|&(_, n)| ColOp {
            n,
            bp: next(true),
            chunks: next(grads),
        })
        .collect();
    (ra, ca, finite)
}

/// One logit matrix `scale * A B^T`; row i's label is column `i + diag_off`.
pub(crate) struct Problem<'a> {
    pub a: &'a RowOp,
    pub b: &'a ColOp,
    pub scale: f32,
    pub diag_off: usize,
}

/// Unscaled tile `A[i0..i0+br] B[j0..j0+bc]^T` into `tile` (row stride BC). Entries past br/bc
/// hold products with the zero padding.
#[inline(always)]
fn s_tile<K: Kernel>(p: &Problem, i0: usize, br: usize, j0: usize, bc: usize, tile: &mut [f32]) {
    let d = p.a.d;
    debug_assert!(tile.len() >= BR * BC);
    // K is cut into KB-long slices so that a B micro-panel slice (KB x NR) and an A one stay in
    // L1 across the MR-row panels; the 64-term summation chunks, and so the result, are the same.
    for k0 in (0..d).step_by(KB) {
        let kc = KB.min(d - k0);
        for q in 0..ceil_div(bc, NR) {
            let bpanel = &p.b.bp[(j0 / NR + q) * d * NR + k0 * NR..(j0 / NR + q + 1) * d * NR];
            for pn in 0..ceil_div(br, MR) {
                let apanel =
                    &p.a.ap[(i0 / MR + pn) * d * MR + k0 * MR..(i0 / MR + pn + 1) * d * MR];
                let c = &mut tile[pn * MR * BC + q * NR..];
                debug_assert!(
                    c.len() >= (MR - 1) * BC + NR
                        && apanel.len() >= kc * MR
                        && bpanel.len() >= kc * NR
                );
                // SAFETY: the panel slices hold kc*MR and kc*NR floats, and `c` has MR rows of NR
                // floats at stride BC (checked above); the ISA was checked by the caller
                // (multiversion!).
                unsafe {
                    K::ukernel(
                        kc,
                        apanel.as_ptr(),
                        bpanel.as_ptr(),
                        c.as_mut_ptr(),
                        BC,
                        k0 > 0,
                    )
                };
            }
        }
    }
}

/// Scales a tile's valid rows in place.
#[inline(always)]
fn scale_tile(tile: &mut [f32], br: usize, bc: usize, s: f32) {
    for i in 0..br {
        for v in &mut tile[i * BC..i * BC + bc] {
            *v *= s;
        }
    }
}

/// A log-sum-exp as `m + t`: `m` an f32 maximum, `t = ln(sum exp(v - m))` in f64 (see the module
/// docs for why it is kept in two parts).
pub(crate) struct Lse {
    pub m: Vec<f32>,
    pub t: Vec<f64>,
}

impl Lse {
    pub(super) fn new(n: usize) -> Self {
        Lse {
            m: vec![f32::NEG_INFINITY; n],
            t: vec![0.0; n],
        }
    }
}

/// Online row statistics of one BR-row block: running max, rest (see `simd::fold_stats`) and the
/// block's label logits (for the gate and the loss).
struct RowStats {
    m: [f32; BR],
    rest: [f64; BR],
    diag: [f32; BR],
}

impl RowStats {
    fn new() -> Self {
        RowStats {
            m: [f32::NEG_INFINITY; BR],
            rest: [0.0; BR],
            diag: [f32::NAN; BR],
        }
    }

    /// Folds a scaled tile into the row statistics.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn update<K: Kernel>(
        &mut self,
        tile: &[f32],
        i0: usize,
        br: usize,
        j0: usize,
        bc: usize,
        diag_off: usize,
    ) {
        for i in 0..br {
            let row = &tile[i * BC..i * BC + bc];
            K::row_fold(row, &mut self.m[i], &mut self.rest[i]);
            let c = i0 + i + diag_off;
            if c >= j0 && c < j0 + bc {
                self.diag[i] = row[c - j0];
            }
        }
    }

    /// Writes the lse pair, the gate (`label logit >= row max`, ties to the positive) and the
    /// label logit itself (the loss uses this very f32 value: `lse - label` is exactly 0 for N = 1).
    fn finish(&self, br: usize, out: &mut RowSlices) {
        for i in 0..br {
            out.m[i] = self.m[i];
            out.t[i] = self.rest[i].ln_1p();
            out.gate[i] = if self.diag[i] >= self.m[i] { 1.0 } else { 0.0 };
            out.diag[i] = self.diag[i];
        }
    }
}

/// Per-row outputs of a worker, for its rows.
pub(crate) struct RowSlices<'a> {
    m: &'a mut [f32],
    t: &'a mut [f64],
    gate: &'a mut [f32],
    diag: &'a mut [f32],
}

impl<'a> RowSlices<'a> {
    /// Writes row `i`'s results from its folded `(m, rest)` and its label logit (as
    /// `RowStats::finish`).
    pub(super) fn set(&mut self, i: usize, m: f32, rest: f64, diag: f32) {
        self.m[i] = m;
        self.t[i] = rest.ln_1p();
        self.gate[i] = if diag >= m { 1.0 } else { 0.0 };
        self.diag[i] = diag;
    }

    /// The part starting at row `off` of the worker's range.
    fn at(&mut self, off: usize) -> RowSlices<'_> {
        RowSlices {
            m: &mut self.m[off..],
            t: &mut self.t[off..],
            gate: &mut self.gate[off..],
            diag: &mut self.diag[off..],
        }
    }
}

/// Online column statistics over the worker's rows (merged across workers at the end).
pub(crate) struct ColStats {
    m: Vec<f32>,
    rest: Vec<f64>,
}

impl ColStats {
    pub(super) fn new(m: usize) -> Self {
        ColStats {
            m: vec![f32::NEG_INFINITY; m],
            rest: vec![0.0; m],
        }
    }

    /// Merges another worker's statistics into these.
    pub(super) fn merge(&mut self, o: &ColStats) {
        for j in 0..self.m.len() {
            if o.m[j] == f32::NEG_INFINITY {
                continue;
            }
            // o's maximum counts as 1 + o.rest relative to itself; as a new maximum it is the
            // implicit 1 and o.rest its others.
            if o.m[j] > self.m[j] {
                let mut m = self.m[j];
                let mut rest = self.rest[j];
                // Fold self into o's frame: self becomes "others".
                let mine = if m == f32::NEG_INFINITY {
                    0.0
                } else {
                    (1.0 + rest) * ((m as f64) - (o.m[j] as f64)).exp()
                };
                m = o.m[j];
                rest = o.rest[j] + mine;
                self.m[j] = m;
                self.rest[j] = rest;
            } else {
                self.rest[j] += (1.0 + o.rest[j]) * ((o.m[j] as f64) - (self.m[j] as f64)).exp();
            }
        }
    }

    pub(super) fn lse(&self) -> Lse {
        Lse {
            m: self.m.clone(),
            t: self.rest.iter().map(|r| r.ln_1p()).collect(),
        }
    }

    #[inline(always)]
    fn update<K: Kernel>(&mut self, tile: &[f32], br: usize, j0: usize, bc: usize) {
        self.update_strided::<K>(tile, BC, br, j0, bc);
    }

    /// Folds `br` rows of columns `j0..j0 + bc` (row stride `stride`, `tile` starting at column
    /// `j0` of its first row) into the statistics.
    #[inline(always)]
    pub(super) fn update_strided<K: Kernel>(
        &mut self,
        tile: &[f32],
        stride: usize,
        br: usize,
        j0: usize,
        bc: usize,
    ) {
        K::col_fold(
            tile,
            stride,
            br,
            bc,
            &mut self.m[j0..j0 + bc],
            &mut self.rest[j0..j0 + bc],
        );
    }
}

/// Pass 1 of a worker: row statistics (lse, gate) of its blocks, and column statistics over its
/// rows when `want_cols`.
#[inline(always)]
fn stats_impl<K: Kernel>(
    p: &Problem,
    blocks: Range<usize>,
    mut rows: RowSlices,
    want_cols: bool,
    mut keep: Option<&mut [f32]>,
) -> Option<ColStats> {
    let (n, m) = (p.a.n, p.b.n);
    let ntiles = ceil_div(m, BC);
    let mut scratch: Vec<f32> = if keep.is_some() {
        Vec::new()
    } else {
        pool::zeroed(BR * BC)
    };
    let mut cols = want_cols.then(|| ColStats::new(m));
    let row0 = blocks.start * BR;
    for blk in blocks.clone() {
        let i0 = blk * BR;
        let br = BR.min(n - i0);
        let mut rs = RowStats::new();
        for jt in 0..ntiles {
            let j0 = jt * BC;
            let bc = BC.min(m - j0);
            let tile: &mut [f32] = match keep.as_deref_mut() {
                Some(k) => {
                    let at = ((blk - blocks.start) * ntiles + jt) * BR * BC;
                    &mut k[at..at + BR * BC]
                }
                None => &mut scratch,
            };
            s_tile::<K>(p, i0, br, j0, bc, tile);
            scale_tile(tile, br, bc, p.scale);
            rs.update::<K>(tile, i0, br, j0, bc, p.diag_off);
            if let Some(c) = cols.as_mut() {
                c.update::<K>(tile, br, j0, bc);
            }
        }
        rs.finish(br, &mut rows.at(i0 - row0));
    }
    pool::give(scratch);
    cols
}

multiversion!(fn stats_worker => stats_impl(p: &Problem, blocks: Range<usize>, rows: RowSlices, want_cols: bool, keep: Option<&mut [f32]>) -> Option<ColStats>);

/// Column normalisation of pass 2 (symmetric loss).
pub(crate) struct ColNorm<'a> {
    /// The columns' log-sum-exp.
    pub lse: &'a Lse,
    /// The columns' label logits.
    pub diag: &'a [f32],
    /// Weight of `exp(logit - lse_col)`.
    pub w: f64,
}

/// How pass 2 gets its logits and its row log-sum-exp.
pub(crate) struct GradSpec<'a> {
    /// Weight of `exp(logit - lse_row)`.
    pub w_row: f64,
    /// Column normalisation, when columns are normalised too.
    pub cols: Option<ColNorm<'a>>,
    /// Subtracted at each row's label column.
    pub w_diag: f64,
    /// Keep a BR x M strip and compute the row lse in the same sweep (rows-only losses); when
    /// false, the row results of pass 1 are given and tiles are recomputed, or read from `kept`.
    pub strip: bool,
    /// Pass 1's scaled tiles (see [`keep_tiles`]), so that pass 2 need not recompute them.
    pub kept: Option<&'a [f32]>,
}

/// Whether pass 1 keeps its logit tiles for pass 2 (saving the recomputation, a quarter of the
/// symmetric loss's arithmetic): only when all tiles together are no larger than the operands
/// (`N M <= (N + M) D`, padded), so memory stays O((N + M) D). At D = 512 that is N <= 1024.
pub(crate) fn keep_tiles(n: usize, m: usize, d: usize) -> bool {
    ceil_div(n, BR) * BR * ceil_div(m, BC) * BC <= (n + m) * d
}

/// Floats of the kept tiles of an n x m logit matrix.
pub(crate) fn kept_len(n: usize, m: usize) -> usize {
    ceil_div(n, BR) * ceil_div(m, BC) * BR * BC
}

/// What one worker returns from pass 2.
pub(crate) struct GradPart {
    /// f64 accumulator of `G^T A` (M x D), unscaled.
    db: Vec<f64>,
    /// dL/ds over this worker's rows.
    ds: f64,
}

/// Pass 2 of a worker over its row blocks: dA rows (scaled, written to `da`), the dB partial and
/// the ds partial. In strip mode it also writes the rows' statistics.
#[inline(always)]
fn grad_impl<K: Kernel>(
    p: &Problem,
    spec: &GradSpec,
    blocks: Range<usize>,
    mut rows: RowSlices,
    da: &mut [f32],
) -> GradPart {
    let (n, m, d) = (p.a.n, p.b.n, p.a.d);
    let dch = dchunks(d);
    let dpad = dch * NR;
    let ntiles = ceil_div(m, BC);
    let mut tile: Vec<f32> = pool::zeroed(if spec.strip {
        BR * BC * ntiles
    } else if spec.kept.is_some() {
        0
    } else {
        BR * BC
    });
    let mut gmat: Vec<f32> = pool::zeroed(BR * BC);
    let mut gp: Vec<f32> = pool::zeroed(BR * BC);
    let mut gtp: Vec<f32> = pool::zeroed(BC * BR);
    let mut tmp_a: Vec<f32> = pool::zeroed(BR * dpad);
    let mut tmp_b: Vec<f32> = pool::zeroed(BC * dpad);
    let mut acc_a: Vec<f64> = pool::zeroed(BR * d);
    let mut acc_b: Vec<f64> = pool::zeroed(m * d);
    // Column lse as f32 (m, t_hi, t_lo) triples.
    let col_split: Option<(Vec<f32>, Vec<f32>, Vec<f32>)> = spec.cols.as_ref().map(|c| {
        let (hi, lo): (Vec<f32>, Vec<f32>) = c.lse.t.iter().map(|&v| split_f64(v)).unzip();
        (c.lse.m.clone(), hi, lo)
    });
    let row0 = blocks.start * BR;
    // sum of w P (v - v_label) over the worker's tiles; dL/ds is this over s.
    let mut ds_v = 0.0f64;
    for blk in blocks {
        let i0 = blk * BR;
        let br = BR.min(n - i0);
        if spec.strip {
            let mut rs = RowStats::new();
            for jt in 0..ntiles {
                let j0 = jt * BC;
                let bc = BC.min(m - j0);
                let t = &mut tile[jt * BR * BC..(jt + 1) * BR * BC];
                s_tile::<K>(p, i0, br, j0, bc, t);
                scale_tile(t, br, bc, p.scale);
                rs.update::<K>(t, i0, br, j0, bc, p.diag_off);
            }
            rs.finish(br, &mut rows.at(i0 - row0));
        }
        let mut lrow = [(0.0f32, 0.0f32, 0.0f32); BR];
        for (i, lr) in lrow.iter_mut().enumerate().take(br) {
            let (hi, lo) = split_f64(rows.t[i0 - row0 + i]);
            *lr = (rows.m[i0 - row0 + i], hi, lo);
        }
        acc_a.fill(0.0);
        for jt in 0..ntiles {
            let j0 = jt * BC;
            let bc = BC.min(m - j0);
            let t: &[f32] = if spec.strip {
                &tile[jt * BR * BC..(jt + 1) * BR * BC]
            } else if let Some(k) = spec.kept {
                let at = (blk * ntiles + jt) * BR * BC;
                &k[at..at + BR * BC]
            } else {
                s_tile::<K>(p, i0, br, j0, bc, &mut tile);
                scale_tile(&mut tile, br, bc, p.scale);
                &tile
            };
            // G tile: w_row P_row + w_col P_col - w_diag [label], zero outside br x bc.
            // dL/ds = sum G_ij l_ij is summed as sum_ij w P_ij (l_ij - l_label): the same number
            // (each softmax sums to 1), without its cancellation.
            let colrow = col_split
                .as_ref()
                .zip(spec.cols.as_ref())
                .map(|((cm, chi, clo), cn)| ColRow {
                    m: &cm[j0..j0 + bc],
                    hi: &chi[j0..j0 + bc],
                    lo: &clo[j0..j0 + bc],
                    diag: &cn.diag[j0..j0 + bc],
                    w: cn.w as f32,
                });
            for i in 0..br {
                let row = &t[i * BC..i * BC + bc];
                let grow: &mut [f32; BC] = (&mut gmat[i * BC..(i + 1) * BC])
                    .try_into()
                    .expect("BC-wide row");
                ds_v += K::g_row(
                    row,
                    lrow[i],
                    spec.w_row as f32,
                    rows.diag[i0 - row0 + i],
                    colrow.as_ref(),
                    grow,
                );
                let g = &mut grow[..bc];
                // The label entry, w_row (P - 1) + w_col (P' - 1) when w_diag = w_row + w_col, is
                // a small difference when the row is nearly right: expm1 in f64.
                let c = i0 + i + p.diag_off;
                if c >= j0 && c < j0 + bc {
                    let v = row[c - j0] as f64;
                    let r = i0 - row0 + i;
                    let mut gl = spec.w_row * ((v - rows.m[r] as f64) - rows.t[r]).exp_m1();
                    let mut wsum = spec.w_row;
                    if let Some(cn) = spec.cols.as_ref() {
                        gl += cn.w * ((v - cn.lse.m[c] as f64) - cn.lse.t[c]).exp_m1();
                        wsum += cn.w;
                    }
                    g[c - j0] = (gl + (wsum - spec.w_diag)) as f32;
                }
            }
            // Rows past br in the last MR panel are packed too: keep them zero.
            gmat[br * BC..ceil_div(br, MR) * MR * BC].fill(0.0);
            // Pack G as MR-row panels over k = column (for G B) and G^T as MR-column panels over
            // k = row (for G^T A).
            for pn in 0..ceil_div(br, MR) {
                let panel = &mut gp[pn * BC * MR..(pn + 1) * BC * MR];
                for ii in 0..MR {
                    let src = &gmat[(pn * MR + ii) * BC..(pn * MR + ii) * BC + bc];
                    for (j, &v) in src.iter().enumerate() {
                        panel[j * MR + ii] = v;
                    }
                }
            }
            for q in 0..ceil_div(bc, MR) {
                let panel = &mut gtp[q * BR * MR..(q + 1) * BR * MR];
                for i in 0..br {
                    panel[i * MR..(i + 1) * MR]
                        .copy_from_slice(&gmat[i * BC + q * MR..i * BC + (q + 1) * MR]);
                }
            }
            // dA[block] += G B[tile]
            let bchunks = &p.b.chunks[jt * dch * BC * NR..(jt + 1) * dch * BC * NR];
            for pn in 0..ceil_div(br, MR) {
                for c in 0..dch {
                    let ap = &gp[pn * BC * MR..];
                    let bp = &bchunks[c * BC * NR..(c + 1) * BC * NR];
                    let out = &mut tmp_a[pn * MR * dpad + c * NR..];
                    debug_assert!(ap.len() >= bc * MR && out.len() >= (MR - 1) * dpad + NR);
                    // SAFETY: bc <= BC rows of the panels are read; MR rows of NR floats at stride
                    // dpad are written inside tmp_a (checked above).
                    unsafe {
                        K::ukernel(bc, ap.as_ptr(), bp.as_ptr(), out.as_mut_ptr(), dpad, false)
                    };
                }
            }
            for i in 0..br {
                for (acc, &v) in acc_a[i * d..(i + 1) * d]
                    .iter_mut()
                    .zip(&tmp_a[i * dpad..i * dpad + d])
                {
                    *acc += v as f64;
                }
            }
            // dB[tile] += G^T A[block]
            let achunks = &p.a.chunks[blk * dch * BR * NR..(blk + 1) * dch * BR * NR];
            for q in 0..ceil_div(bc, MR) {
                for c in 0..dch {
                    let ap = &gtp[q * BR * MR..];
                    let bp = &achunks[c * BR * NR..(c + 1) * BR * NR];
                    let out = &mut tmp_b[q * MR * dpad + c * NR..];
                    debug_assert!(ap.len() >= br * MR && out.len() >= (MR - 1) * dpad + NR);
                    // SAFETY: as above, with br <= BR rows read and tmp_b written.
                    unsafe {
                        K::ukernel(br, ap.as_ptr(), bp.as_ptr(), out.as_mut_ptr(), dpad, false)
                    };
                }
            }
            for j in 0..bc {
                let dst = &mut acc_b[(j0 + j) * d..(j0 + j + 1) * d];
                for (acc, &v) in dst.iter_mut().zip(&tmp_b[j * dpad..j * dpad + d]) {
                    *acc += v as f64;
                }
            }
        }
        for i in 0..br {
            let acc = &acc_a[i * d..(i + 1) * d];
            let out = &mut da[(i0 - row0 + i) * d..(i0 - row0 + i + 1) * d];
            for (o, &v) in out.iter_mut().zip(acc) {
                *o = (p.scale as f64 * v) as f32;
            }
        }
    }
    for b in [tile, gmat, gp, gtp, tmp_a, tmp_b] {
        pool::give(b);
    }
    pool::give(acc_a);
    GradPart {
        db: acc_b,
        ds: ds_v / p.scale as f64,
    }
}

multiversion!(fn grad_worker => grad_impl(p: &Problem, spec: &GradSpec, blocks: Range<usize>, rows: RowSlices, da: &mut [f32]) -> GradPart);

/// Splits `nblk` row blocks into one contiguous range per worker; `work` (multiply-adds of the
/// pass) decides how many workers are worth it.
pub(super) fn ranges(nblk: usize, work: usize) -> Vec<Range<usize>> {
    let workers = par::workers_for(work).clamp(1, nblk.max(1));
    let base = nblk / workers;
    let extra = nblk % workers;
    let mut out = Vec::with_capacity(workers);
    let mut start = 0;
    for w in 0..workers {
        let len = base + usize::from(w < extra);
        out.push(start..start + len);
        start += len;
    }
    out
}

/// Splits `v` (per-row data of `width` items a row) along the row ranges of the blocks.
fn split_rows<'v, T>(
    mut v: &'v mut [T],
    rs: &[Range<usize>],
    n: usize,
    width: usize,
) -> Vec<&'v mut [T]> {
    let mut out = Vec::with_capacity(rs.len());
    for r in rs {
        let rows = (r.end * BR).min(n) - (r.start * BR).min(n);
        let (head, tail) = v.split_at_mut(rows * width);
        out.push(head);
        v = tail;
    }
    out
}

/// Per-row results of a sweep: log-sum-exp pair, gate, and the label logit (f32 tile value).
pub(crate) struct RowOut {
    pub lse: Lse,
    pub gate: Vec<f32>,
    pub diag: Vec<f32>,
}

impl RowOut {
    pub(super) fn new(n: usize) -> Self {
        RowOut {
            lse: Lse::new(n),
            gate: vec![0.0; n],
            diag: vec![0.0; n],
        }
    }

    /// One `RowSlices` per worker range.
    pub(super) fn split<'a>(&'a mut self, rs: &[Range<usize>], n: usize) -> Vec<RowSlices<'a>> {
        split_rows(&mut self.lse.m, rs, n, 1)
            .into_iter()
            .zip(split_rows(&mut self.lse.t, rs, n, 1))
            .zip(split_rows(&mut self.gate, rs, n, 1))
            .zip(split_rows(&mut self.diag, rs, n, 1))
            .map(|(((m, t), gate), diag)| RowSlices { m, t, gate, diag })
            .collect()
    }

    /// `lse_i - v_label_i = (m_i - v_label_i) + t_i`, the row's cross-entropy, in f64.
    pub fn ce(&self, i: usize) -> f64 {
        (self.lse.m[i] as f64 - self.diag[i] as f64) + self.lse.t[i]
    }
}

/// Row statistics (and optionally the column log-sum-exp) of `p`. With `keep` (of
/// [`kept_len`] floats), the scaled logit tiles are left there for pass 2 ([`GradSpec::kept`]).
pub(crate) fn stats(
    isa: Isa,
    p: &Problem,
    want_cols: bool,
    keep: Option<&mut [f32]>,
) -> (RowOut, Option<Lse>) {
    let (n, m) = (p.a.n, p.b.n);
    let rs = ranges(ceil_div(n, BR), n * m * p.a.d);
    let mut out = RowOut::new(n);
    let keeps: Vec<Option<&mut [f32]>> = match keep {
        Some(mut k) => {
            // Each worker's blocks' tiles, block-major.
            let per_block = ceil_div(m, BC) * BR * BC;
            let mut parts = Vec::with_capacity(rs.len());
            for r in &rs {
                let (head, tail) = k.split_at_mut(r.len() * per_block);
                parts.push(Some(head));
                k = tail;
            }
            parts
        }
        None => rs.iter().map(|_| None).collect(),
    };
    let jobs: Vec<_> = rs
        .iter()
        .cloned()
        .zip(out.split(&rs, n))
        .zip(keeps)
        .collect();
    let cols: Vec<Option<ColStats>> = par::run(jobs, |((r, rows), keep)| {
        stats_worker(isa, p, r, rows, want_cols, keep)
    });
    let col_lse = if want_cols {
        let mut it = cols.into_iter().flatten();
        let mut acc = it.next().unwrap_or_else(|| ColStats::new(p.b.n));
        for c in it {
            acc.merge(&c);
        }
        Some(acc.lse())
    } else {
        None
    };
    (out, col_lse)
}

/// Result of pass 2 over one logit matrix.
pub(crate) struct GradOut {
    pub da: Vec<f32>,
    pub db: Vec<f32>,
    pub ds: f64,
    /// Row results: computed here in strip mode, passed through otherwise.
    pub rows: RowOut,
}

/// Pass 2 over `p`. `rows` holds pass 1's row results (required unless `spec.strip`, which
/// computes them).
pub(crate) fn grads(isa: Isa, p: &Problem, spec: &GradSpec, rows: Option<RowOut>) -> GradOut {
    let (n, m, d) = (p.a.n, p.b.n, p.a.d);
    let rs = ranges(ceil_div(n, BR), 3 * n * m * d);
    let mut rows = rows.unwrap_or_else(|| RowOut::new(n));
    let mut da = vec![0.0f32; n * d];
    let jobs: Vec<_> = rs
        .iter()
        .cloned()
        .zip(rows.split(&rs, n))
        .zip(split_rows(&mut da, &rs, n, d))
        .collect();
    let parts: Vec<GradPart> = par::run(jobs, |((r, rws), a)| grad_worker(isa, p, spec, r, rws, a));
    let mut ds = 0.0;
    let mut db = vec![0.0f32; m * d];
    let s = p.scale as f64;
    // The workers' dB partials summed in worker order (deterministic), 256 elements at a time.
    let chunk = (m * d)
        .div_ceil(par::workers_for(m * d * parts.len() * 8))
        .max(1);
    par::for_chunks_mut(&mut db, chunk, |c, out| {
        let off = c * chunk;
        for (b, ob) in out.chunks_mut(256).enumerate() {
            let at = off + b * 256;
            let mut acc = [0.0f64; 256];
            for part in &parts {
                for (a, &v) in acc.iter_mut().zip(&part.db[at..at + ob.len()]) {
                    *a += v;
                }
            }
            for (o, &a) in ob.iter_mut().zip(&acc) {
                *o = (s * a) as f32;
            }
        }
    });
    for part in parts {
        ds += part.ds;
        pool::give(part.db);
    }
    GradOut { da, db, ds, rows }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pass 2 from kept tiles gives bit-for-bit the gradients of pass 2 recomputing them, and
    /// the packed buffers' stale contents (pooled, not zeroed) never leak into a result.
    #[test]
    fn kept_tiles_match_recomputed_ones() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % 2001) as f32 / 1000.0 - 1.0
        };
        let isa = Isa::detect();
        // Awkward sizes first, so later, smaller calls get larger pooled buffers with stale data.
        for &(n, d) in &[(200, 300), (97, 100), (64, 64), (70, 65), (1, 3)] {
            let x: Vec<f32> = (0..n * d).map(|_| rnd() * 0.1).collect();
            let y: Vec<f32> = (0..n * d).map(|_| rnd() * 0.1).collect();
            let run = |keep: bool| {
                let (ra, ca, finite) = pack(&[(&x[..], n)], &[(&y[..], n)], d, true);
                assert!(finite);
                let p = Problem {
                    a: &ra[0],
                    b: &ca[0],
                    scale: 14.0,
                    diag_off: 0,
                };
                let mut kept = keep.then(|| vec![f32::NAN; kept_len(n, n)]);
                let (rows, lse) = stats(isa, &p, true, kept.as_deref_mut());
                let lse = lse.expect("column statistics");
                let diag = rows.diag.clone();
                let w = 0.5 / n as f64;
                let spec = GradSpec {
                    w_row: w,
                    cols: Some(ColNorm {
                        lse: &lse,
                        diag: &diag,
                        w,
                    }),
                    w_diag: 1.0 / n as f64,
                    strip: false,
                    kept: kept.as_deref(),
                };
                let g = grads(isa, &p, &spec, Some(rows));
                (g.da, g.db, g.ds)
            };
            let (a, b) = (run(true), run(false));
            assert!(a.0.iter().chain(&a.1).all(|v| v.is_finite()), "n={n} d={d}");
            assert_eq!(a.0, b.0, "n={n} d={d}: dA");
            assert_eq!(a.1, b.1, "n={n} d={d}: dB");
            assert_eq!(a.2, b.2, "n={n} d={d}: ds");
        }
        assert!(keep_tiles(1024, 1024, 512) && !keep_tiles(1025, 1025, 512));
        assert!(!keep_tiles(4096, 4096, 512));
    }
}
