//! Test support: runs the CUDA kernels on the CPU (see `emu.hpp`) behind the same [`Device`]
//! trait as the real driver, so the tests execute the kernels *and* the host orchestration of
//! `cuda/mod.rs` without a GPU. Needs a C++20 compiler (`c++`, or `$CXX`) at test time.
//!
//! Device pointers are host addresses here: inputs and outputs are plain slices/vectors.

use std::ffi::{c_char, c_int, c_void, CString};
use std::path::{Path, PathBuf};

use super::{nvrtc, Arg, Device, Kernel};
use crate::error::{KernelError, Result};

/// The emulation header.
pub const HEADER: &str = include_str!("emu.hpp");

/// The complete C++ translation unit: header, the shared helpers, every `.cu` file and a
/// name-to-kernel dispatcher `hq_emu_launch`.
pub fn source() -> String {
    let mut s = String::new();
    s.push_str(HEADER);
    s.push('\n');
    s.push_str(nvrtc::COMMON);
    s.push('\n');
    for (_, src) in nvrtc::SOURCES {
        s.push_str(src);
        s.push('\n');
    }
    s.push_str(
        "extern \"C\" int hq_emu_launch(const char* name, unsigned grid, unsigned block, void** args,\n\
         \x20                            const std::size_t* sizes, int nargs) {\n\
         \x20   std::string n(name);\n",
    );
    for k in Kernel::ALL {
        s.push_str(&format!(
            "    if (n == \"{0}\") return hq_emu::dispatch({0}, args, sizes, nargs, grid, block);\n",
            k.name()
        ));
    }
    s.push_str("    return -1;\n}\n");
    s
}

/// Writes [`source`] into `dir` and builds it into a shared library with the C++ compiler
/// (`$CXX` or `c++`). Returns the library's path.
pub fn build(dir: &Path) -> Result<PathBuf> {
    let src = dir.join("hq_emu.cpp");
    let lib = dir.join("libhq_emu.so");
    std::fs::write(&src, source())
        .map_err(|e| KernelError::Emulator(format!("writing {}: {e}", src.display())))?;
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let out = std::process::Command::new(&cxx)
        .args([
            "-std=c++20",
            "-O1",
            "-fPIC",
            "-shared",
            "-pthread",
            "-w",
            "-o",
        ])
        .arg(&lib)
        .arg(&src)
        .output()
        .map_err(|e| KernelError::Emulator(format!("running {cxx}: {e}")))?;
    if !out.status.success() {
        return Err(KernelError::Emulator(format!(
            "{cxx} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(lib)
}

type LaunchFn =
    unsafe extern "C" fn(*const c_char, u32, u32, *const *mut c_void, *const usize, c_int) -> c_int;

/// The loaded emulator library. Launches are serialised (the emulator's block state and the
/// kernels' `__shared__` statics are process-global, like one GPU running one kernel at a time).
pub struct Emulator {
    _lib: libloading::Library,
    launch: LaunchFn,
    lock: std::sync::Mutex<()>,
}

impl Emulator {
    /// Loads a library built by [`build`].
    pub fn load(path: &Path) -> Result<Self> {
        // SAFETY: the library is our own emulator build; loading runs only C++ static init.
        let lib = unsafe { libloading::Library::new(path) }
            .map_err(|e| KernelError::Emulator(format!("loading {}: {e}", path.display())))?;
        // SAFETY: the symbol has exactly this signature (see `source`).
        let launch = unsafe { lib.get::<LaunchFn>(b"hq_emu_launch\0") }
            .map_err(|e| KernelError::Emulator(format!("hq_emu_launch: {e}")))?;
        let launch = *launch;
        Ok(Emulator {
            _lib: lib,
            launch,
            lock: std::sync::Mutex::new(()),
        })
    }
}

impl Device for Emulator {
    type Buffer = Vec<u64>;

    fn zeros_f64(&self, len: usize) -> Result<(Vec<u64>, u64)> {
        let v = vec![0u64; len.max(1)];
        let p = v.as_ptr() as u64;
        Ok((v, p))
    }

    fn zeros_f32(&self, len: usize) -> Result<(Vec<u64>, u64)> {
        self.zeros_f64(len.div_ceil(2))
    }

    fn launch(&self, kernel: Kernel, grid: u32, block: u32, args: &[Arg]) -> Result<()> {
        // Each argument's value in an 8-byte slot; the kernel reads the first `size` bytes
        // (little-endian), as cuLaunchKernel reads its parameter buffer.
        let mut slots: Vec<u64> = args
            .iter()
            .map(|a| match *a {
                Arg::Ptr(v) => v,
                Arg::I32(v) => v as u32 as u64,
                Arg::I64(v) => v as u64,
                Arg::F32(v) => v.to_bits() as u64,
                Arg::F64(v) => v.to_bits(),
            })
            .collect();
        let ptrs: Vec<*mut c_void> = slots
            .iter_mut()
            .map(|s| s as *mut u64 as *mut c_void)
            .collect();
        let sizes: Vec<usize> = args.iter().map(Arg::size).collect();
        let name = CString::new(kernel.name()).map_err(|e| KernelError::Emulator(e.to_string()))?;
        let _one_at_a_time = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: `ptrs` points at live slots, `sizes` has one entry per argument; the emulator
        // checks both against the kernel's signature before reading them.
        let rc = unsafe {
            (self.launch)(
                name.as_ptr(),
                grid,
                block,
                ptrs.as_ptr(),
                sizes.as_ptr(),
                args.len() as c_int,
            )
        };
        match rc {
            0 => Ok(()),
            -1 => Err(KernelError::Emulator(format!(
                "unknown kernel {}",
                kernel.name()
            ))),
            -2 => Err(KernelError::Emulator(format!(
                "{}: wrong number of arguments ({})",
                kernel.name(),
                args.len()
            ))),
            -10 => Err(KernelError::Emulator(format!(
                "{}: bad block size {block}",
                kernel.name()
            ))),
            r if r <= -100 => Err(KernelError::Emulator(format!(
                "{}: argument {} has the wrong size ({:?})",
                kernel.name(),
                -100 - r,
                args[(-100 - r) as usize]
            ))),
            r => Err(KernelError::Emulator(format!(
                "{}: error {r}",
                kernel.name()
            ))),
        }
    }
}
