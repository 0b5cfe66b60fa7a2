//! The CUDA implementations: CUDA C kernels in `*.cu` (compiled to PTX by NVRTC at first use and
//! cached per device, see [`nvrtc`]), launched through cudarc on memory that libtorch owns.
//!
//! The host-side orchestration (which kernel, which scratch buffer, which weights) is written once
//! against the small [`Device`] trait, with two implementations:
//! - the real one (`driver.rs`): cudarc launches on the tch tensors' device pointers;
//! - [`emu::Emulator`]: a C++ build of the very same `.cu` files with one OS thread per CUDA
//!   thread (barriers and warp shuffles emulated), used by the tests to execute the kernels and
//!   this orchestration on a machine without a GPU. It also checks every launch's argument list
//!   (count and sizes) against the kernel's C signature.
//!
//! All pointers here are raw device addresses (`u64`); buffers are row-major and contiguous.

pub(crate) mod driver;
pub mod emu;
pub mod nvrtc;

use crate::error::{KernelError, Result};

/// One kernel argument, as the kernel's C signature declares it.
#[derive(Debug, Clone, Copy)]
pub enum Arg {
    /// A device pointer (any pointee type); 0 is the null pointer.
    Ptr(u64),
    /// `int`.
    I32(i32),
    /// `long long`.
    I64(i64),
    /// `float`.
    F32(f32),
    /// `double`.
    F64(f64),
}

impl Arg {
    /// Size in bytes of the argument's C type.
    pub fn size(&self) -> usize {
        match self {
            Arg::I32(_) | Arg::F32(_) => 4,
            Arg::Ptr(_) | Arg::I64(_) | Arg::F64(_) => 8,
        }
    }
}

/// The kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// `hq_clip_row_lse`: online row log-sum-exp of `s A B^T`, the gate and the loss terms.
    RowLse,
    /// `hq_clip_row_grad`: `dA = s G B` with G recomputed tile by tile.
    RowGrad,
    /// `hq_sum2`: weighted f64 sum of one or two vectors into an f32 scalar.
    Sum2,
    /// `hq_hni_rows`: gated HNI loss and gradients.
    HniRows,
    /// `hq_bce_rows`: sparse-target BCE rows.
    BceRows,
}

impl Kernel {
    /// Every kernel.
    pub const ALL: [Kernel; 5] = [
        Kernel::RowLse,
        Kernel::RowGrad,
        Kernel::Sum2,
        Kernel::HniRows,
        Kernel::BceRows,
    ];

    /// The entry point's name.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::RowLse => "hq_clip_row_lse",
            Kernel::RowGrad => "hq_clip_row_grad",
            Kernel::Sum2 => "hq_sum2",
            Kernel::HniRows => "hq_hni_rows",
            Kernel::BceRows => "hq_bce_rows",
        }
    }

    /// The `.cu` file whose module it is loaded from.
    pub fn file(self) -> &'static str {
        match self {
            Kernel::RowLse | Kernel::RowGrad | Kernel::Sum2 => "clip.cu",
            Kernel::HniRows => "hni.cu",
            Kernel::BceRows => "bce.cu",
        }
    }
}

/// What the orchestration needs from a device: zeroed scratch memory and kernel launches, in
/// order (one stream).
pub trait Device {
    /// Keeps a scratch allocation alive.
    type Buffer;
    /// `len` zeroed f64 values; returns the owner and the device address.
    fn zeros_f64(&self, len: usize) -> Result<(Self::Buffer, u64)>;
    /// `len` zeroed f32 values; returns the owner and the device address.
    fn zeros_f32(&self, len: usize) -> Result<(Self::Buffer, u64)>;
    /// Launches `kernel` on a 1-D grid.
    fn launch(&self, kernel: Kernel, grid: u32, block: u32, args: &[Arg]) -> Result<()>;
}

fn int(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| {
        KernelError::Invalid(format!(
            "{what} = {v} exceeds the kernels' 32-bit index range"
        ))
    })
}

fn blocks(n: usize, per: usize) -> Result<u32> {
    u32::try_from(n.div_ceil(per))
        .map_err(|_| KernelError::Invalid(format!("grid of {n} rows is too large")))
}

const ROWS_PER_BLOCK: usize = 64;
const THREADS: u32 = 256;

/// Device addresses for the symmetric contrastive loss. `dx == 0` skips the backward kernels
/// (then `dy` and `dscale` are ignored).
#[derive(Debug, Clone, Copy)]
pub struct ClipPtrs {
    /// Image embeddings, n x d f32.
    pub x: u64,
    /// Text embeddings, n x d f32.
    pub y: u64,
    /// Rows.
    pub n: usize,
    /// Width.
    pub d: usize,
    /// The multiplier s, one f32.
    pub scale: u64,
    /// Output: the loss, one f32.
    pub loss: u64,
    /// Output: the gate, n f32 (0 to skip).
    pub gate: u64,
    /// Output: dL/dx, n x d f32 (0: forward only).
    pub dx: u64,
    /// Output: dL/dy, n x d f32.
    pub dy: u64,
    /// Output: dL/ds, one f32.
    pub dscale: u64,
}

/// Row statistics of one `s A B^T` sweep on the device.
struct RowStats<B> {
    m: u64,
    t: u64,
    diag: u64,
    part: u64,
    _keep: [B; 4],
}

/// `hq_clip_row_lse` over rows `a` against columns `b`: lse pair, label logits, loss terms
/// (`lse - label`) and, when `gate != 0`, the gate.
#[allow(clippy::too_many_arguments)]
fn row_stats<G: Device>(
    g: &G,
    a: u64,
    b: u64,
    r: usize,
    c: usize,
    d: usize,
    scale: u64,
    off: i32,
    gate: u64,
) -> Result<RowStats<G::Buffer>> {
    let (bm, m) = g.zeros_f32(r)?;
    let (bt, t) = g.zeros_f64(r)?;
    let (bd, diag) = g.zeros_f32(r)?;
    let (bp, part) = g.zeros_f64(r)?;
    use Arg::*;
    g.launch(
        Kernel::RowLse,
        blocks(r, ROWS_PER_BLOCK)?,
        THREADS,
        &[
            Ptr(a),
            Ptr(b),
            I32(int("rows", r)?),
            I32(int("columns", c)?),
            I32(int("D", d)?),
            Ptr(scale),
            I32(off),
            Ptr(m),
            Ptr(t),
            Ptr(diag),
            Ptr(gate),
            Ptr(part),
        ],
    )?;
    Ok(RowStats {
        m,
        t,
        diag,
        part,
        _keep: [bm, bt, bd, bp],
    })
}

/// One `hq_clip_row_grad` launch: `d_rows = s G cols` for rows `a` against columns `b`, with
/// `G = w_row P_row + w_col P_col - w_diag [label]`; row/column statistics optional.
#[allow(clippy::too_many_arguments)]
fn row_grad<G: Device, B>(
    g: &G,
    a: u64,
    b: u64,
    r: usize,
    c: usize,
    d: usize,
    scale: u64,
    rows: Option<(&RowStats<B>, f64)>,
    cols: Option<(&RowStats<B>, f64)>,
    off: i32,
    w_diag: f64,
    d_rows: u64,
    ds: u64,
) -> Result<()> {
    let (_acc, acc) = g.zeros_f64(r * d)?;
    let (rm, rt, rd, rw) = rows.map_or((0, 0, 0, 0.0), |(s, w)| (s.m, s.t, s.diag, w));
    let (cm, ct, cd, cw) = cols.map_or((0, 0, 0, 0.0), |(s, w)| (s.m, s.t, s.diag, w));
    use Arg::*;
    g.launch(
        Kernel::RowGrad,
        blocks(r, ROWS_PER_BLOCK)?,
        THREADS,
        &[
            Ptr(a),
            Ptr(b),
            I32(int("rows", r)?),
            I32(int("columns", c)?),
            I32(int("D", d)?),
            Ptr(scale),
            Ptr(rm),
            Ptr(rt),
            Ptr(rd),
            F64(rw),
            Ptr(cm),
            Ptr(ct),
            Ptr(cd),
            F64(cw),
            I32(off),
            F64(w_diag),
            Ptr(acc),
            Ptr(d_rows),
            Ptr(ds),
        ],
    )
}

/// Runs the symmetric contrastive loss (see `clip.cu` for the kernel plan).
pub fn clip_symmetric<G: Device>(g: &G, p: &ClipPtrs) -> Result<()> {
    let n = int("N", p.n)?;
    // Rows of s X Y^T, and its columns as the rows of s Y X^T.
    let sr = row_stats(g, p.x, p.y, p.n, p.n, p.d, p.scale, 0, p.gate)?;
    let sc = row_stats(g, p.y, p.x, p.n, p.n, p.d, p.scale, 0, 0)?;
    let half = 0.5 / p.n as f64;
    use Arg::*;
    g.launch(
        Kernel::Sum2,
        1,
        THREADS,
        &[
            Ptr(sr.part),
            I32(n),
            F64(half),
            Ptr(sc.part),
            I32(n),
            F64(half),
            Ptr(p.loss),
        ],
    )?;
    if p.dx == 0 {
        return Ok(());
    }
    let full = 1.0 / p.n as f64;
    let (_ds, ds) = g.zeros_f64(p.n)?;
    row_grad(
        g,
        p.x,
        p.y,
        p.n,
        p.n,
        p.d,
        p.scale,
        Some((&sr, half)),
        Some((&sc, half)),
        0,
        full,
        p.dx,
        ds,
    )?;
    row_grad(
        g,
        p.y,
        p.x,
        p.n,
        p.n,
        p.d,
        p.scale,
        Some((&sc, half)),
        Some((&sr, half)),
        0,
        full,
        p.dy,
        0,
    )?;
    g.launch(
        Kernel::Sum2,
        1,
        THREADS,
        &[
            Ptr(ds),
            I32(n),
            F64(1.0),
            Ptr(0),
            I32(0),
            F64(0.0),
            Ptr(p.dscale),
        ],
    )
}

/// Device addresses for the local (distributed) contrastive loss. `dx_local == 0` skips the
/// backward kernels.
#[derive(Debug, Clone, Copy)]
pub struct LocalClipPtrs {
    /// This rank's images, n x d.
    pub x_local: u64,
    /// This rank's texts, n x d.
    pub y_local: u64,
    /// Gathered images, m x d.
    pub x_all: u64,
    /// Gathered texts, m x d.
    pub y_all: u64,
    /// Local rows.
    pub n: usize,
    /// Gathered rows.
    pub m: usize,
    /// Width.
    pub d: usize,
    /// Label offset (rank * n).
    pub offset: usize,
    /// s, one f32.
    pub scale: u64,
    /// Output: loss, one f32.
    pub loss: u64,
    /// Output: gate, n f32 (0 to skip).
    pub gate: u64,
    /// Output gradients (n x d, n x d, m x d, m x d) and dL/ds.
    pub dx_local: u64,
    /// See `dx_local`.
    pub dy_local: u64,
    /// See `dx_local`.
    pub dx_all: u64,
    /// See `dx_local`.
    pub dy_all: u64,
    /// See `dx_local`.
    pub dscale: u64,
}

/// Runs open_clip's local loss: rows `x_local` vs columns `y_all` and rows `y_local` vs columns
/// `x_all`, labels `offset + i`.
pub fn clip_local<G: Device>(g: &G, p: &LocalClipPtrs) -> Result<()> {
    let n = int("n", p.n)?;
    let off = int("offset", p.offset)?;
    let s1 = row_stats(g, p.x_local, p.y_all, p.n, p.m, p.d, p.scale, off, p.gate)?;
    let s2 = row_stats(g, p.y_local, p.x_all, p.n, p.m, p.d, p.scale, off, 0)?;
    let w = 0.5 / p.n as f64;
    use Arg::*;
    g.launch(
        Kernel::Sum2,
        1,
        THREADS,
        &[
            Ptr(s1.part),
            I32(n),
            F64(w),
            Ptr(s2.part),
            I32(n),
            F64(w),
            Ptr(p.loss),
        ],
    )?;
    if p.dx_local == 0 {
        return Ok(());
    }
    // Each direction: G = w softmax_rows - w [label]; rows get s G B, columns s G^T A (the same
    // kernel with the operands swapped, the rows' statistics passed as column statistics, the
    // label diagonal at -offset).
    let (_ds1, ds1) = g.zeros_f64(p.n)?;
    let (_ds2, ds2) = g.zeros_f64(p.n)?;
    for (rows, cols, st, d_rows, d_cols, ds) in [
        (p.x_local, p.y_all, &s1, p.dx_local, p.dy_all, ds1),
        (p.y_local, p.x_all, &s2, p.dy_local, p.dx_all, ds2),
    ] {
        row_grad(
            g,
            rows,
            cols,
            p.n,
            p.m,
            p.d,
            p.scale,
            Some((st, w)),
            None,
            off,
            w,
            d_rows,
            ds,
        )?;
        row_grad(
            g,
            cols,
            rows,
            p.m,
            p.n,
            p.d,
            p.scale,
            None,
            Some((st, w)),
            -off,
            w,
            d_cols,
            0,
        )?;
    }
    g.launch(
        Kernel::Sum2,
        1,
        THREADS,
        &[
            Ptr(ds1),
            I32(n),
            F64(1.0),
            Ptr(ds2),
            I32(n),
            F64(1.0),
            Ptr(p.dscale),
        ],
    )
}

/// The HNI gate alone (one sweep of `hq_clip_row_lse`): `gate` gets n f32 0/1 values.
#[allow(clippy::too_many_arguments)]
pub fn row_gate<G: Device>(
    g: &G,
    x: u64,
    y_all: u64,
    n: usize,
    m: usize,
    d: usize,
    offset: usize,
    scale: u64,
    gate: u64,
) -> Result<()> {
    row_stats(g, x, y_all, n, m, d, scale, int("offset", offset)?, gate).map(|_| ())
}

/// Device addresses for the HNI loss (gradients are always written).
#[derive(Debug, Clone, Copy)]
pub struct HniPtrs {
    /// Images, n x d.
    pub x: u64,
    /// Texts, m x d; row i's positive is `offset + i`.
    pub y_all: u64,
    /// Negatives, n x k x d.
    pub neg: u64,
    /// Rows.
    pub n: usize,
    /// Negatives per row (N-).
    pub k: usize,
    /// Width.
    pub d: usize,
    /// Label offset.
    pub offset: usize,
    /// s, one f32.
    pub scale: u64,
    /// Gate, n f32.
    pub gate: u64,
    /// Output: loss, one f32.
    pub loss: u64,
    /// Output: dL/dx, n x d.
    pub dx: u64,
    /// Output: dL/dy_all[offset + i], n x d.
    pub dy_pos: u64,
    /// Output: dL/dneg, n x k x d.
    pub dneg: u64,
    /// Output: dL/ds, one f32.
    pub dscale: u64,
}

/// Runs the gated HNI loss.
pub fn hni<G: Device>(g: &G, p: &HniPtrs) -> Result<()> {
    let n = int("n", p.n)?;
    let (_s, scratch) = g.zeros_f64(p.n * (p.k + 1))?;
    let (_l, loss_part) = g.zeros_f64(p.n)?;
    let (_d, ds_part) = g.zeros_f64(p.n)?;
    use Arg::*;
    g.launch(
        Kernel::HniRows,
        blocks(p.n * 32, 128)?,
        128,
        &[
            Ptr(p.x),
            Ptr(p.y_all),
            Ptr(p.neg),
            I32(n),
            I32(int("N-", p.k)?),
            I32(int("D", p.d)?),
            I32(int("offset", p.offset)?),
            Ptr(p.scale),
            Ptr(p.gate),
            F64(1.0 / p.n as f64),
            Ptr(scratch),
            Ptr(p.dx),
            Ptr(p.dy_pos),
            Ptr(p.dneg),
            Ptr(loss_part),
            Ptr(ds_part),
        ],
    )?;
    g.launch(
        Kernel::Sum2,
        1,
        THREADS,
        &[
            Ptr(loss_part),
            I32(n),
            F64(1.0),
            Ptr(0),
            I32(0),
            F64(0.0),
            Ptr(p.loss),
        ],
    )?;
    g.launch(
        Kernel::Sum2,
        1,
        THREADS,
        &[
            Ptr(ds_part),
            I32(n),
            F64(1.0),
            Ptr(0),
            I32(0),
            F64(0.0),
            Ptr(p.dscale),
        ],
    )
}

/// Device addresses for the short-tag BCE. `indptr`/`indices` are validated int64 CSR arrays on
/// the device; `dz == 0` computes the loss only.
#[derive(Debug, Clone, Copy)]
pub struct BcePtrs {
    /// Logits, n x k f32.
    pub z: u64,
    /// Rows.
    pub n: usize,
    /// Classes.
    pub k: usize,
    /// CSR row pointer, n + 1 int64.
    pub indptr: u64,
    /// CSR class indices, int64.
    pub indices: u64,
    /// Output: loss, one f32.
    pub loss: u64,
    /// Output: dL/dz, n x k (0: loss only).
    pub dz: u64,
}

/// Runs the short-tag BCE.
pub fn bce<G: Device>(g: &G, p: &BcePtrs) -> Result<()> {
    let n = int("N", p.n)?;
    let (_l, loss_part) = g.zeros_f64(p.n)?;
    use Arg::*;
    g.launch(
        Kernel::BceRows,
        blocks(p.n, 1)?,
        THREADS,
        &[
            Ptr(p.z),
            I64(p.k as i64),
            Ptr(p.indptr),
            Ptr(p.indices),
            F32((1.0 / p.n as f64) as f32),
            I32(i32::from(p.dz != 0)),
            Ptr(p.dz),
            Ptr(loss_part),
        ],
    )?;
    g.launch(
        Kernel::Sum2,
        1,
        THREADS,
        &[
            Ptr(loss_part),
            I32(n),
            F64(1.0 / p.n as f64),
            Ptr(0),
            I32(0),
            F64(0.0),
            Ptr(p.loss),
        ],
    )
}

/// Whether the CUDA driver library (libcuda) can be loaded on this machine. Checked once; false
/// on machines without an NVIDIA driver (where cudarc would panic on first use).
pub fn driver_present() -> bool {
    driver::driver_present()
}

/// Compiles every kernel file through NVRTC (no GPU needed); `(file, ptx)` pairs.
pub fn compile_all_ptx(arch: Option<&str>) -> Result<Vec<(&'static str, String)>> {
    nvrtc::compile_all(arch)
}

/// Loads (compiling on first use) the kernels for CUDA device `ordinal` and returns the
/// `--gpu-architecture` they were built for.
pub fn prepare_device(ordinal: usize) -> Result<String> {
    Ok(driver::loaded(ordinal)?.arch.clone())
}

/// Loads libtorch's CUDA library (`libtorch_cuda.so`) into the process, for binaries whose own
/// build script does not link it (see `hq_build_support::link_libtorch_with_cuda`): its static
/// initialisers register the CUDA backend, after which `tch::Cuda::is_available()` sees the GPUs.
/// Tries the libtorch this crate was built against first, then the library path: a binary built
/// here and run on a GPU machine (`tools/gpu-check.sh`) finds that machine's own libtorch through
/// `LD_LIBRARY_PATH`, the build machine's folder being absent there. Does nothing (returns false)
/// without a CUDA driver.
pub fn load_libtorch_cuda() -> bool {
    static DONE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DONE.get_or_init(|| {
        if !driver_present() {
            return false;
        }
        #[cfg(unix)]
        {
            use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
            let built = option_env!("HQ_KERNELS_TORCH_LIB")
                .map(|dir| std::path::Path::new(dir).join("libtorch_cuda.so"))
                .filter(|p| p.exists());
            let candidates = built
                .into_iter()
                .chain([std::path::PathBuf::from("libtorch_cuda.so")]);
            for path in candidates {
                // SAFETY: loading libtorch's own CUDA library runs its registration initialisers.
                if let Ok(lib) = unsafe { Library::open(Some(&path), RTLD_NOW | RTLD_GLOBAL) } {
                    std::mem::forget(lib);
                    return true;
                }
            }
            false
        }
        #[cfg(not(unix))]
        {
            false
        }
    })
}
