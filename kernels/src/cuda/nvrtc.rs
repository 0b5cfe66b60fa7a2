//! Loading NVRTC and compiling the kernels' CUDA C to PTX.
//!
//! cudarc loads `libnvrtc` lazily by name through `dlopen` (`libnvrtc.so`, `libnvrtc.so.13`, ...)
//! and panics if none is found, so this module first makes sure one is loadable:
//! 1. from `HQ_NVRTC_LIB_DIR` (set by `tools/env.sh` to the torch wheel's `nvidia/cu13/lib`),
//! 2. else from the folder next to libtorch that the build recorded (`HQ_KERNELS_NVRTC_GUESS`),
//! 3. else from the ordinary library path (`LD_LIBRARY_PATH`, ld.so.cache).
//!
//! A library found by folder is loaded by absolute path with `RTLD_GLOBAL` and kept loaded for the
//! life of the process; `libnvrtc-builtins.so.*` from the same folder is loaded first. The dynamic
//! linker then resolves cudarc's later `dlopen("libnvrtc.so.13")` and NVRTC's own
//! `dlopen("libnvrtc-builtins.so.13.0")` to these already-loaded objects (matched by SONAME), with
//! no LD_LIBRARY_PATH needed. Only after that is `cudarc::nvrtc` called.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::error::{KernelError, Result};

/// The kernels' CUDA C sources, by file name. `common.cuh` is prepended to each.
pub const SOURCES: &[(&str, &str)] = &[
    ("clip.cu", include_str!("clip.cu")),
    ("hni.cu", include_str!("hni.cu")),
    ("bce.cu", include_str!("bce.cu")),
];

/// Helpers shared by every kernel file (prepended; NVRTC gets no include path).
pub const COMMON: &str = include_str!("common.cuh");

/// The entry points each file defines (the PTX test checks each one is there).
pub const ENTRY_POINTS: &[(&str, &[&str])] = &[
    (
        "clip.cu",
        &["hq_clip_row_lse", "hq_clip_row_grad", "hq_sum2"],
    ),
    ("hni.cu", &["hq_hni_rows", "hq_sum2"]),
    ("bce.cu", &["hq_bce_rows", "hq_sum2"]),
];

/// The full translation unit NVRTC compiles for `file`.
pub fn full_source(src: &str) -> String {
    format!("{COMMON}\n{src}")
}

fn candidate_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("HQ_NVRTC_LIB_DIR") {
        dirs.push(PathBuf::from(d));
    }
    if let Some(g) = option_env!("HQ_KERNELS_NVRTC_GUESS") {
        dirs.push(PathBuf::from(g));
    }
    dirs
}

fn load_global(path: &Path) -> std::result::Result<(), String> {
    #[cfg(unix)]
    {
        use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
        // SAFETY: loading NVRTC runs only its (side-effect free) initialisers.
        let lib = unsafe { Library::open(Some(path), RTLD_NOW | RTLD_GLOBAL) }
            .map_err(|e| format!("{}: {e}", path.display()))?;
        // Kept for the life of the process: cudarc and NVRTC resolve to it later.
        std::mem::forget(lib);
        Ok(())
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        Err("loading NVRTC by path is only implemented for unix".into())
    }
}

fn try_dir(dir: &Path) -> std::result::Result<bool, String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(false);
    };
    let mut builtins = Vec::new();
    let mut nvrtc = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("libnvrtc-builtins.so") && !name.contains(".alt.") {
            builtins.push(e.path());
        } else if name.starts_with("libnvrtc.so") && !name.contains(".alt.") {
            nvrtc.push(e.path());
        }
    }
    if nvrtc.is_empty() {
        return Ok(false);
    }
    builtins.sort();
    nvrtc.sort();
    if let Some(b) = builtins.last() {
        load_global(b)?;
    }
    // Longest name first: libnvrtc.so.13 over a bare libnvrtc.so symlink.
    nvrtc.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    load_global(&nvrtc[0])?;
    Ok(true)
}

/// Makes libnvrtc loadable (see the module docs); `Err` says where it looked.
pub fn ensure_loaded() -> Result<()> {
    static STATE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    STATE
        .get_or_init(|| {
            let mut notes = Vec::new();
            for d in candidate_dirs() {
                match try_dir(&d) {
                    Ok(true) => break,
                    Ok(false) => notes.push(format!("no libnvrtc in {}", d.display())),
                    Err(e) => notes.push(e),
                }
            }
            // SAFETY: only probes dlopen with cudarc's candidate names.
            if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
                Ok(())
            } else {
                notes.push("libnvrtc is not on the library path either".into());
                Err(notes.join("; "))
            }
        })
        .clone()
        .map_err(KernelError::NvrtcUnavailable)
}

/// Whether HQ_NVRTC_LIB_DIR is set (the environment promises NVRTC).
pub fn promised() -> bool {
    std::env::var_os("HQ_NVRTC_LIB_DIR").is_some()
}

/// Compiles one kernel file to PTX. `arch` is an NVRTC `--gpu-architecture` value such as
/// `compute_90`; `None` uses NVRTC's default.
pub fn compile(file: &'static str, src: &str, arch: Option<&str>) -> Result<String> {
    ensure_loaded()?;
    let mut options = vec!["--std=c++17".to_string()];
    if let Some(a) = arch {
        options.push(format!("--gpu-architecture={a}"));
    }
    let opts = cudarc::nvrtc::CompileOptions {
        options: options.clone(),
        name: Some(file.to_string()),
        ..Default::default()
    };
    match cudarc::nvrtc::compile_ptx_with_opts(full_source(src), opts) {
        Ok(ptx) => Ok(ptx.to_src()),
        Err(e) => {
            let log = match &e {
                cudarc::nvrtc::CompileError::CompileError { log, .. } => {
                    log.to_string_lossy().into_owned()
                }
                other => format!("{other:?}"),
            };
            Err(KernelError::Compile {
                file,
                options: options.join(" "),
                log,
            })
        }
    }
}

/// Compiles every kernel file; returns `(file, ptx)` pairs.
pub fn compile_all(arch: Option<&str>) -> Result<Vec<(&'static str, String)>> {
    SOURCES
        .iter()
        .map(|(f, s)| compile(f, s, arch).map(|p| (*f, p)))
        .collect()
}

/// The NVRTC version, `(major, minor)`.
pub fn version() -> Result<(i32, i32)> {
    ensure_loaded()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: libnvrtc is loaded (ensure_loaded) and both out-pointers are valid.
    let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if r != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(KernelError::NvrtcUnavailable(format!(
            "nvrtcVersion failed: {r:?}"
        )));
    }
    Ok((major, minor))
}
