//! Loading ONNX Runtime once per process.
//!
//! ort's `load-dynamic` feature opens `libonnxruntime` at run time. If any ort API is touched before
//! the library is loaded, ort loads it lazily from `ORT_DYLIB_PATH` and *panics* when that fails. So
//! every entry point of this crate goes through [`init`] / [`init_from`] first: they load the library
//! with ort's fallible `init_from`, turn each failure into a [`RuntimeError`], and create the single
//! ONNX Runtime environment that all sessions share (ort allows one per process, and refuses a second
//! one even after the first was dropped, so it is kept in a static for the life of the process).

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use crate::error::{Result, RuntimeError};
use crate::provider::ExecutionProvider;

/// The loaded ONNX Runtime and its process-wide environment; sessions are created from it.
pub struct Runtime {
    pub(crate) env: ort::environment::Environment,
    dylib: PathBuf,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("dylib", &self.dylib)
            .finish_non_exhaustive()
    }
}

impl Runtime {
    /// The (canonicalised, where possible) path of the loaded `libonnxruntime`.
    pub fn dylib(&self) -> &Path {
        &self.dylib
    }

    /// Whether the loaded ONNX Runtime was *built with* `provider` (for TensorRT: with both the
    /// TensorRT and the CUDA provider, which TensorRT needs for the nodes it does not take).
    ///
    /// `true` does not promise the provider works here (a GPU build on a machine without a GPU says
    /// `true`); session creation reports that case as an error.
    pub fn is_available(&self, provider: &ExecutionProvider) -> Result<bool> {
        for name in provider.ort_names() {
            if !crate::provider::ep_available(name)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The providers among those this crate knows (CPU, CUDA, TensorRT) that the loaded library
    /// offers, by ONNX Runtime's names; used in error messages.
    pub fn available_providers(&self) -> Result<Vec<&'static str>> {
        let mut out = Vec::new();
        for name in crate::provider::KNOWN_ORT_NAMES {
            if crate::provider::ep_available(name)? {
                out.push(*name);
            }
        }
        Ok(out)
    }
}

static RUNTIME: OnceLock<Runtime> = OnceLock::new();
/// Serialises first-time initialisation so two threads cannot race ort's global environment.
static INIT_LOCK: Mutex<()> = Mutex::new(());

/// The runtime, if [`init`] or [`init_from`] has succeeded in this process.
pub fn runtime() -> Option<&'static Runtime> {
    RUNTIME.get()
}

/// Initialises ONNX Runtime from `ORT_DYLIB_PATH`, or returns the runtime already initialised.
///
/// The environment variable is only read on the first successful call: the library cannot be
/// swapped inside a running process.
pub fn init() -> Result<&'static Runtime> {
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt);
    }
    let path = match std::env::var_os("ORT_DYLIB_PATH") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => return Err(RuntimeError::DylibPathUnset),
    };
    load(&path, " (from ORT_DYLIB_PATH)", false)
}

/// Initialises ONNX Runtime from an explicit library path.
///
/// Succeeds without doing anything when the same library is already loaded; a *different* path after
/// a successful initialisation is [`RuntimeError::AlreadyInitialised`]. A failed attempt leaves
/// nothing behind, so a later call with a correct path still works.
pub fn init_from(path: impl AsRef<Path>) -> Result<&'static Runtime> {
    load(path.as_ref(), "", true)
}

fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// ort's dlopen error text drops the loader's reason; say what is most likely wrong.
fn dlopen_hint(path: &Path) -> &'static str {
    use std::io::Read;
    if !path.exists() {
        return " (no such library on the dynamic loader's search path; give a full path)";
    }
    let mut magic = [0u8; 4];
    let is_elf = std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == *b"\x7fELF";
    if is_elf {
        " (a shared library that could not be loaded: wrong architecture or a missing dependency; check it with `ldd`)"
    } else {
        " (the file is not a shared library: no ELF header)"
    }
}

fn load(path: &Path, hint: &str, explicit: bool) -> Result<&'static Runtime> {
    // A poisoned lock only means another thread panicked mid-init; the statics are still consistent
    // (RUNTIME is set only after everything succeeded), so carry on.
    let _guard = INIT_LOCK
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(rt) = RUNTIME.get() {
        if explicit && canonical(path) != rt.dylib {
            return Err(RuntimeError::AlreadyInitialised {
                loaded: rt.dylib.clone(),
                requested: path.to_path_buf(),
            });
        }
        return Ok(rt);
    }

    // A path with a directory part must exist; a bare file name is left to the dynamic loader's
    // search path. Checking first gives a plainer message than dlopen's.
    let has_dir = path.components().count() > 1;
    if has_dir && !path.exists() {
        return Err(RuntimeError::DylibNotFound {
            path: path.to_path_buf(),
            hint: hint.to_string(),
        });
    }
    // ort resolves relative paths against the executable's folder with `current_exe().expect(..)`;
    // make sure that cannot panic.
    if path.is_relative() {
        std::env::current_exe().map_err(|e| RuntimeError::DylibLoad {
            path: path.to_path_buf(),
            message: format!("cannot resolve a relative library path: {e}"),
        })?;
    }

    let builder = ort::init_from(path).map_err(|e| {
        let mut message = e.to_string();
        if message.ends_with("dlopen failed") {
            message.push_str(dlopen_hint(path));
        }
        RuntimeError::DylibLoad {
            path: path.to_path_buf(),
            message,
        }
    })?;
    let env = builder
        .with_name("hq-runtime")
        .with_telemetry(false)
        .build()
        .map_err(|e| RuntimeError::Environment(e.to_string()))?;
    let rt = Runtime {
        env,
        dylib: canonical(path),
    };
    Ok(RUNTIME.get_or_init(|| rt))
}
