//! The real [`Device`](super::Device): cudarc launches on libtorch's CUDA memory.
//!
//! - Context: the device's primary context (`CudaContext::new` retains it), the same one the CUDA
//!   runtime, and so libtorch, uses: device pointers from `Tensor::data_ptr` are valid in it.
//! - Modules: the `.cu` files are compiled by NVRTC for the device's compute capability the first
//!   time a loss runs on that device, loaded, and cached for the life of the process (one entry
//!   per device ordinal).
//! - Stream and ordering: kernels are launched on the legacy default (NULL) stream. That is
//!   PyTorch's default current stream, and legacy-stream work is ordered with all other work of
//!   blocking streams in the context, so our launches run after the torch ops that produced the
//!   inputs and before the ones that consume the outputs, with no host synchronisation. Scratch
//!   buffers come from torch's caching allocator on that same stream. A caller that made a
//!   non-default torch stream current (torch creates those non-blocking) must ask for
//!   `Options::synchronize`, which synchronises the device before the launches and the stream
//!   after them.
//! - No driver: `driver_present()` probes libcuda once (cudarc would panic without it); the
//!   crate then never touches cudarc's driver API.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg};
use tch::{Kind, Tensor};

use super::{nvrtc, Arg, Device, Kernel};
use crate::error::{KernelError, Result};

pub(crate) fn driver_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: only probes dlopen with cudarc's candidate names for libcuda.
    *PRESENT.get_or_init(|| unsafe { cudarc::driver::sys::is_culib_present() })
}

fn drv(during: impl Into<String>) -> impl FnOnce(cudarc::driver::DriverError) -> KernelError {
    let during = during.into();
    move |e| KernelError::Driver {
        during,
        message: format!("{e:?}"),
    }
}

/// Compiled modules and context of one device.
pub(crate) struct Loaded {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    funcs: HashMap<Kernel, CudaFunction>,
    /// The `--gpu-architecture` the PTX was built for.
    pub arch: String,
}

fn load(ordinal: usize) -> Result<Loaded> {
    if !driver_present() {
        return Err(KernelError::Driver {
            during: "loading libcuda".into(),
            message: "no CUDA driver library on this machine".into(),
        });
    }
    nvrtc::ensure_loaded()?;
    let ctx = CudaContext::new(ordinal)
        .map_err(drv(format!("creating the context of device {ordinal}")))?;
    let (major, minor) = ctx
        .compute_capability()
        .map_err(drv("reading the compute capability"))?;
    let mut arch = format!("compute_{major}{minor}");
    let mut ptx = Vec::new();
    for (file, src) in nvrtc::SOURCES {
        let p = match nvrtc::compile(file, src, Some(&arch)) {
            Ok(p) => p,
            // A device newer than this NVRTC: fall back to NVRTC's default virtual architecture,
            // which the driver JIT-compiles forward.
            Err(KernelError::Compile { log, .. })
                if log.contains("gpu-architecture") || log.contains("arch") =>
            {
                arch = "default".into();
                nvrtc::compile(file, src, None)?
            }
            Err(e) => return Err(e),
        };
        ptx.push((*file, p));
    }
    let mut funcs = HashMap::new();
    for (file, p) in ptx {
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(p))
            .map_err(drv(format!("loading the PTX of {file}")))?;
        for k in Kernel::ALL.iter().filter(|k| k.file() == file) {
            let f = module
                .load_function(k.name())
                .map_err(drv(format!("looking up {}", k.name())))?;
            funcs.insert(*k, f);
        }
    }
    let stream = ctx.default_stream();
    Ok(Loaded {
        ctx,
        stream,
        funcs,
        arch,
    })
}

/// The cached modules of device `ordinal`, compiling them on first use.
pub(crate) fn loaded(ordinal: usize) -> Result<Arc<Loaded>> {
    static CACHE: OnceLock<Mutex<HashMap<usize, Arc<Loaded>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    let mut guard = cache.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(l) = guard.get(&ordinal) {
        return Ok(l.clone());
    }
    let l = Arc::new(load(ordinal)?);
    guard.insert(ordinal, l.clone());
    Ok(l)
}

/// Launches on torch memory of one CUDA device.
pub(crate) struct TorchCuda {
    device: tch::Device,
    k: Arc<Loaded>,
}

impl TorchCuda {
    pub fn new(ordinal: usize) -> Result<Self> {
        Ok(TorchCuda {
            device: tch::Device::Cuda(ordinal),
            k: loaded(ordinal)?,
        })
    }

    /// Waits for everything queued on the device (used with `Options::synchronize`).
    pub fn synchronize_device(&self) {
        if let tch::Device::Cuda(i) = self.device {
            tch::Cuda::synchronize(i as i64);
        }
    }

    /// Waits for our stream.
    pub fn synchronize_stream(&self) -> Result<()> {
        self.k
            .stream
            .synchronize()
            .map_err(drv("synchronising the stream"))
    }
}

impl Device for TorchCuda {
    type Buffer = Tensor;

    fn zeros_f64(&self, len: usize) -> Result<(Tensor, u64)> {
        let t = Tensor::f_zeros([len.max(1) as i64], (Kind::Double, self.device))?;
        let p = t.data_ptr() as u64;
        Ok((t, p))
    }

    fn zeros_f32(&self, len: usize) -> Result<(Tensor, u64)> {
        let t = Tensor::f_zeros([len.max(1) as i64], (Kind::Float, self.device))?;
        let p = t.data_ptr() as u64;
        Ok((t, p))
    }

    fn launch(&self, kernel: Kernel, grid: u32, block: u32, args: &[Arg]) -> Result<()> {
        let f = self
            .k
            .funcs
            .get(&kernel)
            .ok_or_else(|| KernelError::Driver {
                during: format!("launching {}", kernel.name()),
                message: "kernel not loaded".into(),
            })?;
        self.k
            .ctx
            .bind_to_thread()
            .map_err(drv("binding the context"))?;
        let mut b = self.k.stream.launch_builder(f);
        for a in args {
            match a {
                Arg::Ptr(v) => b.arg(v),
                Arg::I32(v) => b.arg(v),
                Arg::I64(v) => b.arg(v),
                Arg::F32(v) => b.arg(v),
                Arg::F64(v) => b.arg(v),
            };
        }
        let cfg = LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (block, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the argument list matches the kernel's C signature (checked for every launch by
        // the emulator tests), every pointer is a live device allocation of the size the kernel
        // indexes (the callers validate shapes and own the tensors until the stream has run).
        unsafe { b.launch(cfg) }.map_err(drv(format!("launching {}", kernel.name())))?;
        Ok(())
    }
}
