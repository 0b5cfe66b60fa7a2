//! The tch entry points: tensors in, a scalar loss out that takes part in tch autograd.
//!
//! How autograd is joined: the fused pass computes the loss value *and* every input gradient at
//! once (forward time). The returned tensor is
//!
//! ```text
//! loss = value + (S - S.detach()),   S = sum(x * gx) + sum(y * gy) + ... + s * gs
//! ```
//!
//! with the gradients `g*` detached constants. Its value is exactly `value` (`S - S.detach()` is
//! an exact zero) and `d loss / d x = gx`, so `loss.backward()` (or `alpha * loss`, summed with
//! other losses) delivers the right chain-rule gradients to every input that requires them,
//! through any casts the inputs went through. Only first derivatives are available (no double
//! backward). When no input requires grad, or grad mode is off, the backward half is skipped.
//!
//! Placement: CUDA tensors use the CUDA kernels when the driver is present (and NVRTC loads);
//! everything else runs the CPU implementation. With `Backend::Auto`, CUDA tensors whose kernels
//! cannot be loaded fall back to the CPU path (copying), with a one-time note on stderr.
//! Outputs live on the inputs' device; the loss is an f32 scalar.

use std::sync::Once;

use tch::{Device as TchDevice, Kind, Tensor};

use crate::cpu::{self, Isa};
use crate::cuda;
use crate::error::{KernelError, Result};
use crate::targets::TagTargets;
use crate::validate::{check_finite, check_gate, check_offset, check_scale, Mat};

/// Where a loss runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// CUDA kernels for CUDA tensors when the driver and NVRTC are there, else the CPU.
    #[default]
    Auto,
    /// Always the CPU implementation (CUDA tensors are copied to the host and back).
    Cpu,
    /// Always the CUDA kernels; an error for CPU tensors or without a usable driver.
    Cuda,
}

/// Options of every entry point.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Where to run.
    pub backend: Backend,
    /// Check the inputs for NaN/inf (and the scale's and the gate's domain). On CUDA this costs
    /// one device-to-host synchronisation per call. Default: true.
    pub check_finite: bool,
    /// CUDA only: synchronise the device before the launches and the stream after them. Needed
    /// only when the caller runs under a non-default torch stream (see `cuda/driver.rs`).
    pub synchronize: bool,
    /// CPU code path; `None` picks the best one the machine has.
    pub isa: Option<Isa>,
    /// CPU, symmetric contrastive loss: hand small batches' products to libtorch's GEMM and run
    /// only the element-wise part fused (`cpu::dense_pays`, `cpu/clip_dense.rs`). When false,
    /// every size runs the tiled kernel. Default: true.
    pub dense_small: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            backend: Backend::Auto,
            check_finite: true,
            synchronize: false,
            isa: None,
            dense_small: true,
        }
    }
}

/// The contrastive loss and, as a free by-product, each image row's HNI gate.
#[derive(Debug)]
pub struct ClipLoss {
    /// Scalar f32 loss, attached to autograd.
    pub loss: Tensor,
    /// One f32 0/1 per (local) image row: 1 when the row's most similar text in the (gathered)
    /// batch is its own. Not differentiable. Pass it to [`hni_loss`].
    pub gate: Tensor,
}

enum Exec {
    Cpu,
    Cuda(cuda::driver::TorchCuda),
}

fn grad_mode() -> bool {
    // SAFETY: plain libtorch calls; the previous mode is restored at once.
    unsafe {
        let prev = torch_sys::at_grad_set_enabled(1);
        torch_sys::at_grad_set_enabled(prev);
        prev != 0
    }
}

fn choose(device: TchDevice, opts: &Options) -> Result<Exec> {
    match (opts.backend, device) {
        (Backend::Cpu, _) => Ok(Exec::Cpu),
        (Backend::Cuda, TchDevice::Cuda(i)) => Ok(Exec::Cuda(cuda::driver::TorchCuda::new(i)?)),
        (Backend::Cuda, d) => Err(KernelError::Invalid(format!(
            "backend Cuda asked for, but the tensors are on {d:?}"
        ))),
        (Backend::Auto, TchDevice::Cuda(i)) => {
            if !cuda::driver_present() {
                return Ok(Exec::Cpu);
            }
            match cuda::driver::TorchCuda::new(i) {
                Ok(c) => Ok(Exec::Cuda(c)),
                Err(e) => {
                    static NOTE: Once = Once::new();
                    NOTE.call_once(|| {
                        eprintln!("hq-kernels: CUDA kernels unavailable ({e}); using the CPU implementation");
                    });
                    Ok(Exec::Cpu)
                }
            }
        }
        (Backend::Auto, _) => Ok(Exec::Cpu),
    }
}

/// An input prepared for both paths: the f32 view that autograd tracks, and a detached,
/// contiguous copy of its data for the kernels.
struct Input {
    tracked: Tensor,
    data: Tensor,
}

fn float_kind(name: &str, t: &Tensor) -> Result<()> {
    match t.kind() {
        Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16 => Ok(()),
        k => Err(KernelError::Invalid(format!(
            "{name} has dtype {k:?}; a floating dtype is required"
        ))),
    }
}

fn input(name: &str, t: &Tensor, dims: usize) -> Result<Input> {
    if t.dim() != dims {
        return Err(KernelError::Shape(format!(
            "{name} must be {dims}-D, got shape {:?}",
            t.size()
        )));
    }
    float_kind(name, t)?;
    let tracked = t.f_to_kind(Kind::Float)?;
    let data = tracked.detach().f_contiguous()?;
    Ok(Input { tracked, data })
}

fn same_device(names_devices: &[(&str, TchDevice)]) -> Result<TchDevice> {
    let (n0, d0) = names_devices[0];
    for &(n, d) in &names_devices[1..] {
        if d != d0 {
            return Err(KernelError::Invalid(format!(
                "{n0} is on {d0:?} but {n} is on {d:?}"
            )));
        }
    }
    Ok(d0)
}

/// The scale: a one-element floating tensor (any device). Returns the tracked 0-dim f32 view.
fn scale_input(scale: &Tensor) -> Result<Tensor> {
    if scale.numel() != 1 {
        return Err(KernelError::Shape(format!(
            "scale must hold one value (s = exp(logit_scale)), got shape {:?}",
            scale.size()
        )));
    }
    float_kind("scale", scale)?;
    Ok(scale.f_to_kind(Kind::Float)?.f_reshape([])?)
}

fn dims2(t: &Tensor) -> (usize, usize) {
    let s = t.size();
    (s[0] as usize, s[1] as usize)
}

/// Borrows a CPU f32 contiguous tensor's data.
fn host_slice(t: &Tensor) -> &[f32] {
    let n = t.numel();
    if n == 0 {
        return &[];
    }
    debug_assert!(t.device() == TchDevice::Cpu && t.kind() == Kind::Float && t.is_contiguous());
    // SAFETY: `t` is a contiguous f32 CPU tensor of `n` elements that outlives the borrow.
    unsafe { std::slice::from_raw_parts(t.data_ptr() as *const f32, n) }
}

/// Borrows a CPU f32 contiguous tensor's data mutably.
fn host_slice_mut(t: &mut Tensor) -> &mut [f32] {
    let n = t.numel();
    if n == 0 {
        return &mut [];
    }
    debug_assert!(t.device() == TchDevice::Cpu && t.kind() == Kind::Float && t.is_contiguous());
    // SAFETY: `t` is a contiguous f32 CPU tensor of `n` elements, borrowed mutably for as long
    // as the slice lives, and not aliased by another tensor (it was just created by the caller).
    unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut f32, n) }
}

fn to_cpu(t: &Tensor) -> Result<Tensor> {
    Ok(t.f_to_device(TchDevice::Cpu)?.f_contiguous()?)
}

fn from_vec(v: &[f32], shape: &[i64], device: TchDevice) -> Result<Tensor> {
    Ok(Tensor::f_from_slice(v)?
        .f_reshape(shape)?
        .f_to_device(device)?)
}

fn scalar(v: f64, device: TchDevice) -> Result<Tensor> {
    Ok(Tensor::f_from_slice(&[v as f32])?
        .f_reshape([])?
        .f_to_device(device)?)
}

fn ptr(t: &Tensor) -> u64 {
    if t.numel() == 0 {
        0
    } else {
        t.data_ptr() as u64
    }
}

/// `value + (S - S.detach())` with `S = sum_t <tracked_t, grad_t>` over the tracked inputs that
/// require grad.
fn attach(value: Tensor, terms: Vec<(&Tensor, Tensor)>) -> Result<Tensor> {
    let mut sur: Option<Tensor> = None;
    for (t, g) in terms {
        if !t.requires_grad() {
            continue;
        }
        // A dot product: no N x D temporary in the forward pass (its backward is one multiply).
        let term = t.f_flatten(0, -1)?.f_dot(&g.detach().f_flatten(0, -1)?)?;
        sur = Some(match sur {
            None => term,
            Some(s) => s + term,
        });
    }
    Ok(match sur {
        Some(s) => value + (&s - s.detach()),
        None => value,
    })
}

fn wants_grad(ts: &[&Tensor]) -> bool {
    grad_mode() && ts.iter().any(|t| t.requires_grad())
}

/// Device-side finite check (one sync): names the tensor and the first bad element.
fn check_finite_device(what: &'static str, t: &Tensor) -> Result<()> {
    let bad = t.isfinite().logical_not();
    if bool::try_from(bad.any())? {
        let idx = bad.flatten(0, -1).nonzero();
        let first = idx.int64_value(&[0, 0]);
        let cols = if t.dim() >= 2 {
            *t.size().last().unwrap_or(&1)
        } else {
            1
        };
        let v = t.flatten(0, -1).double_value(&[first]);
        return Err(KernelError::NonFinite {
            what,
            detail: format!(
                "{v} at row {}, column {}",
                first / cols.max(1),
                first % cols.max(1)
            ),
        });
    }
    Ok(())
}

fn cuda_prelude(c: &cuda::driver::TorchCuda, opts: &Options) {
    if opts.synchronize {
        c.synchronize_device();
    }
}

fn cuda_epilogue(c: &cuda::driver::TorchCuda, opts: &Options) -> Result<()> {
    if opts.synchronize {
        c.synchronize_stream()?;
    }
    Ok(())
}

/// The scale on the device as a one-element f32 tensor; with `opts.check_finite`, the named
/// inputs and the scale are checked there first.
fn cuda_scale(
    s: &Tensor,
    device: TchDevice,
    opts: &Options,
    inputs: &[(&'static str, &Tensor)],
) -> Result<Tensor> {
    let sd = s
        .detach()
        .f_to_device(device)?
        .f_reshape([1])?
        .f_contiguous()?;
    if opts.check_finite {
        for &(what, t) in inputs {
            check_finite_device(what, t)?;
        }
        check_scale(sd.double_value(&[0]))?;
    }
    Ok(sd)
}

/// After a CUDA loss launch: the loss value (`loss_t`, one float) with the gradients that
/// `terms` gives attached, when `grads`.
fn cuda_loss<'a>(
    c: &cuda::driver::TorchCuda,
    opts: &Options,
    loss_t: &Tensor,
    grads: bool,
    terms: impl FnOnce() -> Result<Vec<(&'a Tensor, Tensor)>>,
) -> Result<Tensor> {
    cuda_epilogue(c, opts)?;
    let value = loss_t.f_reshape([])?;
    if grads {
        attach(value, terms()?)
    } else {
        Ok(value)
    }
}

/// dL/ds from a one-float device buffer, on the scale tensor's device.
fn scale_grad(s: &Tensor, ds: &Tensor) -> Result<Tensor> {
    Ok(ds.f_reshape([])?.f_to_device(s.device())?)
}

/// The label offset as an index: not negative, and `offset + n <= m`.
fn label_offset(offset: i64, n: usize, m: usize) -> Result<usize> {
    let off = usize::try_from(offset)
        .map_err(|_| KernelError::Invalid(format!("label offset {offset} is negative")))?;
    check_offset(off, n, m)?;
    Ok(off)
}

fn isa(opts: &Options) -> Isa {
    opts.isa.unwrap_or_else(Isa::detect)
}

/// Fused symmetric CLIP loss (one process): `0.5 CE(s X Y^T, i) + 0.5 CE(s Y X^T, i)`.
///
/// `x`, `y`: N x D image and text embeddings (L2-normalised by the model); `scale`: the
/// multiplier `s = exp(logit_scale)` (already clamped at 100 by the caller), a one-element tensor,
/// as open_clip's `ClipLoss` receives it. The gradient reaching `scale` is dL/ds; autograd carries
/// it on through the `exp` to the log-scale parameter.
pub fn clip_loss(x: &Tensor, y: &Tensor, scale: &Tensor) -> Result<ClipLoss> {
    clip_loss_with(x, y, scale, &Options::default())
}

/// [`clip_loss`] with options.
pub fn clip_loss_with(x: &Tensor, y: &Tensor, scale: &Tensor, opts: &Options) -> Result<ClipLoss> {
    let xi = input("x (image embeddings)", x, 2)?;
    let yi = input("y (text embeddings)", y, 2)?;
    let s = scale_input(scale)?;
    let device = same_device(&[("x", x.device()), ("y", y.device())])?;
    let (n, d) = dims2(&xi.data);
    let (ny, dy) = dims2(&yi.data);
    if d != dy {
        return Err(KernelError::Shape(format!(
            "x is {n} x {d} but y is {ny} x {dy} (embedding widths differ)"
        )));
    }
    if n != ny {
        return Err(KernelError::Shape(format!("x has {n} rows but y has {ny}")));
    }
    if n == 0 || d == 0 {
        return Err(KernelError::Empty(format!(
            "x is {n} x {d} (N = 0 or D = 0)"
        )));
    }
    let grads = wants_grad(&[&xi.tracked, &yi.tracked, &s]);
    match choose(device, opts)? {
        Exec::Cpu if opts.dense_small && cpu::dense_pays(n, d) => {
            clip_loss_dense(&xi, &yi, &s, n, device, grads, opts)
        }
        Exec::Cpu => {
            let (xc, yc) = (to_cpu(&xi.data)?, to_cpu(&yi.data)?);
            let sv = s.detach().f_to_device(TchDevice::Cpu)?.double_value(&[]);
            let out = cpu::clip_loss(
                Mat::new(host_slice(&xc), n, d)?,
                Mat::new(host_slice(&yc), n, d)?,
                sv as f32,
                grads,
                isa(opts),
            )?;
            let gate = from_vec(&out.gate, &[n as i64], device)?;
            let value = scalar(out.loss, device)?;
            let loss = match out.grads {
                Some(g) => attach(
                    value,
                    vec![
                        (&xi.tracked, from_vec(&g.dx, &[n as i64, d as i64], device)?),
                        (&yi.tracked, from_vec(&g.dy, &[n as i64, d as i64], device)?),
                        (&s, scalar(g.dscale, s.device())?),
                    ],
                )?,
                None => value,
            };
            Ok(ClipLoss { loss, gate })
        }
        Exec::Cuda(c) => {
            let sd = cuda_scale(
                &s,
                device,
                opts,
                &[
                    ("x (image embeddings)", &xi.data),
                    ("y (text embeddings)", &yi.data),
                ],
            )?;
            let f = (Kind::Float, device);
            let loss_t = Tensor::f_zeros([1], f)?;
            let gate = Tensor::f_zeros([n as i64], f)?;
            let (dx, dyt, ds) = if grads {
                (
                    Tensor::f_zeros([n as i64, d as i64], f)?,
                    Tensor::f_zeros([n as i64, d as i64], f)?,
                    Tensor::f_zeros([1], f)?,
                )
            } else {
                (
                    Tensor::f_zeros([0], f)?,
                    Tensor::f_zeros([0], f)?,
                    Tensor::f_zeros([0], f)?,
                )
            };
            cuda_prelude(&c, opts);
            cuda::clip_symmetric(
                &c,
                &cuda::ClipPtrs {
                    x: ptr(&xi.data),
                    y: ptr(&yi.data),
                    n,
                    d,
                    scale: ptr(&sd),
                    loss: ptr(&loss_t),
                    gate: ptr(&gate),
                    dx: if grads { ptr(&dx) } else { 0 },
                    dy: ptr(&dyt),
                    dscale: ptr(&ds),
                },
            )?;
            let loss = cuda_loss(&c, opts, &loss_t, grads, || {
                Ok(vec![
                    (&xi.tracked, dx),
                    (&yi.tracked, dyt),
                    (&s, scale_grad(&s, &ds)?),
                ])
            })?;
            Ok(ClipLoss { loss, gate })
        }
    }
}

/// The CPU path for small batches (`cpu::dense_pays`): the three products `X Y^T`, `(s G) Y` and
/// `(s G)^T X` run on libtorch's GEMM, the rest in one fused pass (`cpu/clip_dense.rs`).
#[allow(clippy::too_many_arguments)]
fn clip_loss_dense(
    xi: &Input,
    yi: &Input,
    s: &Tensor,
    n: usize,
    device: TchDevice,
    grads: bool,
    opts: &Options,
) -> Result<ClipLoss> {
    let (xc, yc) = (to_cpu(&xi.data)?, to_cpu(&yi.data)?);
    // Non-finite inputs are named here (the products would only say "logits").
    let d = xc.size()[1] as usize;
    check_finite("x (image embeddings)", host_slice(&xc), d)?;
    check_finite("y (text embeddings)", host_slice(&yc), d)?;
    let sv = s.detach().f_to_device(TchDevice::Cpu)?.double_value(&[]);
    let mut prod = xc.f_matmul(&yc.f_tr()?)?.f_contiguous()?;
    let out =
        cpu::clip_loss_from_products(host_slice_mut(&mut prod), n, sv as f32, grads, isa(opts))?;
    let gate = from_vec(&out.gate, &[n as i64], device)?;
    let value = scalar(out.loss, device)?;
    let loss = match out.dscale {
        Some(ds) => {
            // `prod` now holds s G.
            let dx = prod.f_matmul(&yc)?.f_to_device(device)?;
            let dy = prod.f_tr()?.f_matmul(&xc)?.f_to_device(device)?;
            attach(
                value,
                vec![
                    (&xi.tracked, dx),
                    (&yi.tracked, dy),
                    (s, scalar(ds, s.device())?),
                ],
            )?
        }
        None => value,
    };
    Ok(ClipLoss { loss, gate })
}

/// open_clip's local loss (`--local-loss --gather-with-grad`): this rank's `x_local`, `y_local`
/// (n x D) against the gathered `x_all`, `y_all` (m x D), labels `offset + i` (offset = rank * n):
/// `0.5 CE(s x_l y_all^T) + 0.5 CE(s y_l x_all^T)`, means over the n local rows. Gradients flow to
/// all four inputs; a gather-with-grad upstream carries the `*_all` ones back to their ranks.
pub fn clip_loss_local(
    x_local: &Tensor,
    y_local: &Tensor,
    x_all: &Tensor,
    y_all: &Tensor,
    scale: &Tensor,
    offset: i64,
) -> Result<ClipLoss> {
    clip_loss_local_with(
        x_local,
        y_local,
        x_all,
        y_all,
        scale,
        offset,
        &Options::default(),
    )
}

/// [`clip_loss_local`] with options.
#[allow(clippy::too_many_arguments)]
pub fn clip_loss_local_with(
    x_local: &Tensor,
    y_local: &Tensor,
    x_all: &Tensor,
    y_all: &Tensor,
    scale: &Tensor,
    offset: i64,
    opts: &Options,
) -> Result<ClipLoss> {
    let xl = input("x_local", x_local, 2)?;
    let yl = input("y_local", y_local, 2)?;
    let xa = input("x_all", x_all, 2)?;
    let ya = input("y_all", y_all, 2)?;
    let s = scale_input(scale)?;
    let device = same_device(&[
        ("x_local", x_local.device()),
        ("y_local", y_local.device()),
        ("x_all", x_all.device()),
        ("y_all", y_all.device()),
    ])?;
    let (n, d) = dims2(&xl.data);
    let (m, _) = dims2(&xa.data);
    for (name, t, rows) in [
        ("y_local", &yl.data, n),
        ("x_all", &xa.data, m),
        ("y_all", &ya.data, m),
    ] {
        let (r, c) = dims2(t);
        if c != d {
            return Err(KernelError::Shape(format!(
                "x_local is {n} x {d} but {name} is {r} x {c} (embedding widths differ)"
            )));
        }
        if r != rows {
            return Err(KernelError::Shape(format!(
                "{name} has {r} rows, expected {rows}"
            )));
        }
    }
    if n == 0 || m == 0 || d == 0 {
        return Err(KernelError::Empty(format!(
            "local batch {n}, gathered batch {m}, width {d} (N = 0 or D = 0)"
        )));
    }
    let off = label_offset(offset, n, m)?;
    let grads = wants_grad(&[&xl.tracked, &yl.tracked, &xa.tracked, &ya.tracked, &s]);
    let (ni, mi, di) = (n as i64, m as i64, d as i64);
    match choose(device, opts)? {
        Exec::Cpu => {
            let (xlc, ylc, xac, yac) = (
                to_cpu(&xl.data)?,
                to_cpu(&yl.data)?,
                to_cpu(&xa.data)?,
                to_cpu(&ya.data)?,
            );
            let sv = s.detach().f_to_device(TchDevice::Cpu)?.double_value(&[]);
            let out = cpu::clip_loss_local(
                Mat::new(host_slice(&xlc), n, d)?,
                Mat::new(host_slice(&ylc), n, d)?,
                Mat::new(host_slice(&xac), m, d)?,
                Mat::new(host_slice(&yac), m, d)?,
                off,
                sv as f32,
                grads,
                isa(opts),
            )?;
            let gate = from_vec(&out.gate, &[ni], device)?;
            let value = scalar(out.loss, device)?;
            let loss = match out.grads {
                Some(g) => attach(
                    value,
                    vec![
                        (&xl.tracked, from_vec(&g.dx_local, &[ni, di], device)?),
                        (&yl.tracked, from_vec(&g.dy_local, &[ni, di], device)?),
                        (&xa.tracked, from_vec(&g.dx_all, &[mi, di], device)?),
                        (&ya.tracked, from_vec(&g.dy_all, &[mi, di], device)?),
                        (&s, scalar(g.dscale, s.device())?),
                    ],
                )?,
                None => value,
            };
            Ok(ClipLoss { loss, gate })
        }
        Exec::Cuda(c) => {
            let sd = cuda_scale(
                &s,
                device,
                opts,
                &[
                    ("x_local", &xl.data),
                    ("y_local", &yl.data),
                    ("x_all", &xa.data),
                    ("y_all", &ya.data),
                ],
            )?;
            let f = (Kind::Float, device);
            let loss_t = Tensor::f_zeros([1], f)?;
            let gate = Tensor::f_zeros([ni], f)?;
            let z = |r: i64| -> Result<Tensor> {
                Ok(Tensor::f_zeros(
                    if grads { vec![r, di] } else { vec![0] },
                    f,
                )?)
            };
            let (gxl, gyl, gxa, gya) = (z(ni)?, z(ni)?, z(mi)?, z(mi)?);
            let ds = Tensor::f_zeros([1], f)?;
            cuda_prelude(&c, opts);
            cuda::clip_local(
                &c,
                &cuda::LocalClipPtrs {
                    x_local: ptr(&xl.data),
                    y_local: ptr(&yl.data),
                    x_all: ptr(&xa.data),
                    y_all: ptr(&ya.data),
                    n,
                    m,
                    d,
                    offset: off,
                    scale: ptr(&sd),
                    loss: ptr(&loss_t),
                    gate: ptr(&gate),
                    dx_local: if grads { ptr(&gxl) } else { 0 },
                    dy_local: ptr(&gyl),
                    dx_all: ptr(&gxa),
                    dy_all: ptr(&gya),
                    dscale: ptr(&ds),
                },
            )?;
            let loss = cuda_loss(&c, opts, &loss_t, grads, || {
                Ok(vec![
                    (&xl.tracked, gxl),
                    (&yl.tracked, gyl),
                    (&xa.tracked, gxa),
                    (&ya.tracked, gya),
                    (&s, scale_grad(&s, &ds)?),
                ])
            })?;
            Ok(ClipLoss { loss, gate })
        }
    }
}

/// The HNI gate alone (one pass over the n x m products): 1.0 where row i's most similar text in
/// `y_all` is `y_all[offset + i]` (ties count as a win). Prefer the gate that [`clip_loss`]
/// returns, which is free.
pub fn row_gate(x: &Tensor, y_all: &Tensor, scale: &Tensor, offset: i64) -> Result<Tensor> {
    row_gate_with(x, y_all, scale, offset, &Options::default())
}

/// [`row_gate`] with options.
pub fn row_gate_with(
    x: &Tensor,
    y_all: &Tensor,
    scale: &Tensor,
    offset: i64,
    opts: &Options,
) -> Result<Tensor> {
    let xi = input("x", x, 2)?;
    let yi = input("y_all", y_all, 2)?;
    let s = scale_input(scale)?;
    let device = same_device(&[("x", x.device()), ("y_all", y_all.device())])?;
    let (n, d) = dims2(&xi.data);
    let (m, dy) = dims2(&yi.data);
    if d != dy {
        return Err(KernelError::Shape(format!(
            "x is {n} x {d} but y_all is {m} x {dy} (embedding widths differ)"
        )));
    }
    if n == 0 || m == 0 || d == 0 {
        return Err(KernelError::Empty(format!(
            "x is {n} x {d}, y_all {m} rows (N = 0 or D = 0)"
        )));
    }
    let off = label_offset(offset, n, m)?;
    match choose(device, opts)? {
        Exec::Cpu => {
            let (xc, yc) = (to_cpu(&xi.data)?, to_cpu(&yi.data)?);
            let sv = s.detach().f_to_device(TchDevice::Cpu)?.double_value(&[]);
            let g = cpu::row_gate(
                Mat::new(host_slice(&xc), n, d)?,
                Mat::new(host_slice(&yc), m, d)?,
                off,
                sv as f32,
                isa(opts),
            )?;
            from_vec(&g, &[n as i64], device)
        }
        Exec::Cuda(c) => {
            let sd = cuda_scale(&s, device, opts, &[("x", &xi.data), ("y_all", &yi.data)])?;
            let gate = Tensor::f_zeros([n as i64], (Kind::Float, device))?;
            cuda_prelude(&c, opts);
            cuda::row_gate(
                &c,
                ptr(&xi.data),
                ptr(&yi.data),
                n,
                m,
                d,
                off,
                ptr(&sd),
                ptr(&gate),
            )?;
            cuda_epilogue(&c, opts)?;
            Ok(gate)
        }
    }
}

/// Gated hard-negative identification loss (image to text):
/// `-(1/n) sum_i k_i log(e^{s x_i.y_i} / (e^{s x_i.y_i} + sum_j e^{s x_i.y-_ij}))`.
///
/// `x`: n x D images; `y_all`: the batch's texts (m x D, gathered in the distributed form), row
/// i's positive is `y_all[offset + i]`; `negatives`: n x N- x D (or n x D for N- = 1); `gate`:
/// the [`ClipLoss::gate`] of the same batch (`None` computes it, at the cost of one extra pass).
/// Normalised by n, not by the number of open gates. The gate gets no gradient.
pub fn hni_loss(
    x: &Tensor,
    y_all: &Tensor,
    negatives: &Tensor,
    scale: &Tensor,
    offset: i64,
    gate: Option<&Tensor>,
) -> Result<Tensor> {
    hni_loss_with(
        x,
        y_all,
        negatives,
        scale,
        offset,
        gate,
        &Options::default(),
    )
}

/// [`hni_loss`] with options.
#[allow(clippy::too_many_arguments)]
pub fn hni_loss_with(
    x: &Tensor,
    y_all: &Tensor,
    negatives: &Tensor,
    scale: &Tensor,
    offset: i64,
    gate: Option<&Tensor>,
    opts: &Options,
) -> Result<Tensor> {
    let xi = input("x", x, 2)?;
    let yi = input("y_all", y_all, 2)?;
    let neg3 = match negatives.dim() {
        2 => negatives.f_unsqueeze(1)?,
        3 => negatives.shallow_clone(),
        _ => {
            return Err(KernelError::Shape(format!(
                "negatives must be n x N- x D (or n x D), got shape {:?}",
                negatives.size()
            )))
        }
    };
    let ni_in = input("negatives", &neg3, 3)?;
    let s = scale_input(scale)?;
    let device = same_device(&[
        ("x", x.device()),
        ("y_all", y_all.device()),
        ("negatives", negatives.device()),
    ])?;
    let (n, d) = dims2(&xi.data);
    let (m, dy) = dims2(&yi.data);
    let ns = ni_in.data.size();
    let k = ns[1] as usize;
    if d != dy || ns[2] as usize != d {
        return Err(KernelError::Shape(format!(
            "x is {n} x {d}, y_all {m} x {dy}, negatives {ns:?}: embedding widths differ"
        )));
    }
    if ns[0] as usize != n {
        return Err(KernelError::Shape(format!(
            "negatives have {} rows, x has {n}",
            ns[0]
        )));
    }
    if n == 0 || m == 0 || d == 0 {
        return Err(KernelError::Empty(format!(
            "x is {n} x {d}, y_all {m} rows (N = 0 or D = 0)"
        )));
    }
    if k == 0 {
        return Err(KernelError::Empty(
            "negatives: N- must be at least 1".into(),
        ));
    }
    let off = label_offset(offset, n, m)?;
    let gate = match gate {
        Some(g) => {
            if g.numel() != n {
                return Err(KernelError::Shape(format!(
                    "gate has {} entries for {n} rows",
                    g.numel()
                )));
            }
            if g.device() != device {
                return Err(KernelError::Invalid(format!(
                    "x is on {device:?} but gate is on {:?}",
                    g.device()
                )));
            }
            g.detach()
                .f_to_kind(Kind::Float)?
                .f_reshape([n as i64])?
                .f_contiguous()?
        }
        None => row_gate_with(x, y_all, scale, offset, opts)?,
    };
    let grads = wants_grad(&[&xi.tracked, &yi.tracked, &ni_in.tracked, &s]);
    let y_pos = yi.tracked.f_narrow(0, offset, n as i64)?;
    let (nn, dd, kk) = (n as i64, d as i64, k as i64);
    let (value, gx, gy, gn, gs) = match choose(device, opts)? {
        Exec::Cpu => {
            let (xc, yc, nc, gc) = (
                to_cpu(&xi.data)?,
                to_cpu(&yi.data)?,
                to_cpu(&ni_in.data)?,
                to_cpu(&gate)?,
            );
            let sv = s.detach().f_to_device(TchDevice::Cpu)?.double_value(&[]);
            let out = cpu::hni_loss(
                Mat::new(host_slice(&xc), n, d)?,
                Mat::new(host_slice(&yc), m, d)?,
                host_slice(&nc),
                k,
                off,
                sv as f32,
                host_slice(&gc),
                grads,
            )?;
            let value = scalar(out.loss, device)?;
            match out.grads {
                Some(g) => (
                    value,
                    from_vec(&g.dx, &[nn, dd], device)?,
                    from_vec(&g.dy_pos, &[nn, dd], device)?,
                    from_vec(&g.dneg, &[nn, kk, dd], device)?,
                    scalar(g.dscale, s.device())?,
                ),
                None => return Ok(value),
            }
        }
        Exec::Cuda(c) => {
            let sd = cuda_scale(
                &s,
                device,
                opts,
                &[
                    ("x", &xi.data),
                    ("y_all", &yi.data),
                    ("negatives", &ni_in.data),
                ],
            )?;
            if opts.check_finite {
                let gh = to_cpu(&gate)?;
                check_gate(host_slice(&gh), n)?;
            }
            let f = (Kind::Float, device);
            let loss_t = Tensor::f_zeros([1], f)?;
            let gx = Tensor::f_zeros([nn, dd], f)?;
            let gy = Tensor::f_zeros([nn, dd], f)?;
            let gn = Tensor::f_zeros([nn, kk, dd], f)?;
            let gs = Tensor::f_zeros([1], f)?;
            cuda_prelude(&c, opts);
            cuda::hni(
                &c,
                &cuda::HniPtrs {
                    x: ptr(&xi.data),
                    y_all: ptr(&yi.data),
                    neg: ptr(&ni_in.data),
                    n,
                    k,
                    d,
                    offset: off,
                    scale: ptr(&sd),
                    gate: ptr(&gate),
                    loss: ptr(&loss_t),
                    dx: ptr(&gx),
                    dy_pos: ptr(&gy),
                    dneg: ptr(&gn),
                    dscale: ptr(&gs),
                },
            )?;
            cuda_epilogue(&c, opts)?;
            let value = loss_t.f_reshape([])?;
            if !grads {
                return Ok(value);
            }
            (value, gx, gy, gn, scale_grad(&s, &gs)?)
        }
    };
    attach(
        value,
        vec![
            (&xi.tracked, gx),
            (&y_pos, gy),
            (&ni_in.tracked, gn),
            (&s, gs),
        ],
    )
}

/// Short-tag classification loss: multi-label BCE with logits (N x K) against sparse positive
/// targets, `-(1/N) sum_i sum_k [t log sigma(z) + (1-t) log(1 - sigma(z))]`.
///
/// Mean over N, SUM over K, as the paper's formula says; torch's
/// `binary_cross_entropy_with_logits` default (mean over N*K) is this divided by K.
pub fn short_tag_bce(logits: &Tensor, targets: &TagTargets) -> Result<Tensor> {
    short_tag_bce_with(logits, targets, &Options::default())
}

/// [`short_tag_bce`] with options.
pub fn short_tag_bce_with(logits: &Tensor, targets: &TagTargets, opts: &Options) -> Result<Tensor> {
    let zi = input("logits", logits, 2)?;
    let device = logits.device();
    let (n, k) = dims2(&zi.data);
    if n == 0 || k == 0 {
        return Err(KernelError::Empty(format!(
            "logits are {n} x {k} (N = 0 or K = 0)"
        )));
    }
    targets.validate(n, k)?;
    let grads = wants_grad(&[&zi.tracked]);
    match choose(device, opts)? {
        Exec::Cpu => {
            let zc = to_cpu(&zi.data)?;
            let out =
                cpu::short_tag_bce(Mat::new(host_slice(&zc), n, k)?, targets, grads, isa(opts))?;
            let value = scalar(out.loss, device)?;
            match out.dz {
                Some(dz) => attach(
                    value,
                    vec![(&zi.tracked, from_vec(&dz, &[n as i64, k as i64], device)?)],
                ),
                None => Ok(value),
            }
        }
        Exec::Cuda(c) => {
            if opts.check_finite {
                check_finite_device("logits", &zi.data)?;
            }
            let f = (Kind::Float, device);
            let indptr = Tensor::f_from_slice(targets.indptr())?.f_to_device(device)?;
            let indices = Tensor::f_from_slice(targets.indices())?.f_to_device(device)?;
            let loss_t = Tensor::f_zeros([1], f)?;
            let dz = if grads {
                Tensor::f_zeros([n as i64, k as i64], f)?
            } else {
                Tensor::f_zeros([0], f)?
            };
            cuda_prelude(&c, opts);
            cuda::bce(
                &c,
                &cuda::BcePtrs {
                    z: ptr(&zi.data),
                    n,
                    k,
                    indptr: ptr(&indptr),
                    indices: ptr(&indices),
                    loss: ptr(&loss_t),
                    dz: if grads { ptr(&dz) } else { 0 },
                },
            )?;
            cuda_loss(&c, opts, &loss_t, grads, || Ok(vec![(&zi.tracked, dz)]))
        }
    }
}
