//! Execution providers: what the user asks for, and how it is registered on a session.
//!
//! ONNX Runtime (and ort's default) treats a provider that fails to register as a hint and quietly
//! runs on the CPU. For a benchmark or an export check that is the worst outcome: numbers that look
//! fine and are from the wrong device. Here a request for CUDA or TensorRT either gets that provider
//! or an error naming it; there is no fallback path.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ort::ep::{ExecutionProvider as _, ExecutionProviderDispatch, TensorRT, CPU, CUDA};

use crate::error::{Result, RuntimeError};

/// ONNX Runtime's names of the providers this crate knows, in the order they are reported.
pub(crate) const KNOWN_ORT_NAMES: &[&str] = &[CPU_NAME, CUDA_NAME, TENSORRT_NAME];
const CPU_NAME: &str = "CPUExecutionProvider";
const CUDA_NAME: &str = "CUDAExecutionProvider";
const TENSORRT_NAME: &str = "TensorrtExecutionProvider";

/// The spellings [`ExecutionProvider::from_str`] accepts, for error messages and CLI help.
pub const PROVIDER_CHOICES: &str =
    "cpu, cuda, cuda:<device>, tensorrt, tensorrt:<device> (alias trt)";

/// Where a session runs.
///
/// Parsed from `cpu`, `cuda`, `cuda:1`, `tensorrt`, `tensorrt:1` (or `trt`). TensorRT options that
/// have no place in that short form (cache folder, fp16) are set with the `with_*` methods.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ExecutionProvider {
    /// ONNX Runtime's default CPU provider.
    #[default]
    Cpu,
    /// NVIDIA CUDA on the given device.
    Cuda {
        /// CUDA device ordinal.
        device_id: u32,
    },
    /// NVIDIA TensorRT on the given device; CUDA is registered after it for the nodes TensorRT does
    /// not take (ONNX Runtime's recommended set-up).
    ///
    /// Building a TensorRT engine takes minutes for a CLIP tower, so `cache_dir` should normally be
    /// set: engines and the timing cache are written there and reused while the model, shapes and
    /// TensorRT version stay the same.
    #[non_exhaustive]
    TensorRt {
        /// CUDA device ordinal.
        device_id: u32,
        /// Folder for the engine cache and the timing cache; `None` builds engines afresh each time.
        cache_dir: Option<PathBuf>,
        /// Let TensorRT pick fp16 kernels (the weights stay as exported).
        fp16: bool,
    },
}

impl ExecutionProvider {
    /// TensorRT on `device_id` with no cache and fp32 kernels; see [`Self::with_cache_dir`] and
    /// [`Self::with_fp16`].
    pub fn tensorrt(device_id: u32) -> Self {
        Self::TensorRt {
            device_id,
            cache_dir: None,
            fp16: false,
        }
    }

    /// Sets the TensorRT engine and timing cache folder (created on session creation if missing).
    /// No effect on other providers.
    #[must_use]
    pub fn with_cache_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        if let Self::TensorRt { cache_dir, .. } = &mut self {
            *cache_dir = Some(dir.into());
        }
        self
    }

    /// Enables TensorRT fp16 kernels. No effect on other providers.
    #[must_use]
    pub fn with_fp16(mut self, enable: bool) -> Self {
        if let Self::TensorRt { fp16, .. } = &mut self {
            *fp16 = enable;
        }
        self
    }

    /// ONNX Runtime's name of the main provider, e.g. `CUDAExecutionProvider`.
    pub fn ort_name(&self) -> &'static str {
        match self {
            Self::Cpu => CPU_NAME,
            Self::Cuda { .. } => CUDA_NAME,
            Self::TensorRt { .. } => TENSORRT_NAME,
        }
    }

    /// Every ONNX Runtime provider this request registers, in registration order.
    pub(crate) fn ort_names(&self) -> &'static [&'static str] {
        match self {
            Self::Cpu => &[CPU_NAME],
            Self::Cuda { .. } => &[CUDA_NAME],
            Self::TensorRt { .. } => &[TENSORRT_NAME, CUDA_NAME],
        }
    }

    /// Whether this runs on a GPU.
    pub fn is_gpu(&self) -> bool {
        !matches!(self, Self::Cpu)
    }

    /// The dispatches to register, each set to fail loudly, with the ORT name each belongs to.
    /// Creates the TensorRT cache folder.
    pub(crate) fn dispatches(&self) -> Result<Vec<(&'static str, ExecutionProviderDispatch)>> {
        match self {
            Self::Cpu => Ok(Vec::new()),
            Self::Cuda { device_id } => Ok(vec![(CUDA_NAME, cuda(*device_id)?)]),
            Self::TensorRt {
                device_id,
                cache_dir,
                fp16,
            } => {
                let mut trt = TensorRT::default()
                    .with_device_id(device_id_i32(*device_id)?)
                    .with_fp16(*fp16);
                if let Some(dir) = cache_dir {
                    let dir_str = prepare_cache_dir(dir)?;
                    trt = trt
                        .with_engine_cache(true)
                        .with_engine_cache_path(&dir_str)
                        .with_timing_cache(true)
                        .with_timing_cache_path(&dir_str);
                }
                Ok(vec![
                    (TENSORRT_NAME, trt.build().error_on_failure()),
                    (CUDA_NAME, cuda(*device_id)?),
                ])
            }
        }
    }
}

fn device_id_i32(device_id: u32) -> Result<i32> {
    i32::try_from(device_id).map_err(|_| RuntimeError::InvalidOption {
        option: "device_id",
        message: format!("{device_id} is out of range"),
    })
}

fn cuda(device_id: u32) -> Result<ExecutionProviderDispatch> {
    Ok(CUDA::default()
        .with_device_id(device_id_i32(device_id)?)
        .build()
        .error_on_failure())
}

/// Creates the cache folder and returns it as the UTF-8 string ONNX Runtime's option map needs.
fn prepare_cache_dir(dir: &Path) -> Result<String> {
    std::fs::create_dir_all(dir).map_err(|source| RuntimeError::Io {
        action: "creating the TensorRT cache folder",
        path: dir.to_path_buf(),
        source,
    })?;
    dir.to_str()
        .map(str::to_owned)
        .ok_or_else(|| RuntimeError::InvalidOption {
            option: "cache_dir",
            message: format!("`{}` is not valid UTF-8", dir.display()),
        })
}

/// Whether the loaded ONNX Runtime was built with the provider of this ORT name. Callers must have
/// initialised the runtime (ort panics otherwise).
pub(crate) fn ep_available(ort_name: &str) -> Result<bool> {
    let r = match ort_name {
        CPU_NAME => CPU::is_available(),
        CUDA_NAME => CUDA::is_available(),
        TENSORRT_NAME => TensorRT::is_available(),
        _ => Ok(false),
    };
    r.map_err(|e| RuntimeError::Environment(format!("querying available providers: {e}")))
}

impl fmt::Display for ExecutionProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda { device_id } => write!(f, "cuda:{device_id}"),
            Self::TensorRt {
                device_id, fp16, ..
            } => {
                write!(f, "tensorrt:{device_id}")?;
                if *fp16 {
                    f.write_str(" (fp16)")?;
                }
                Ok(())
            }
        }
    }
}

impl FromStr for ExecutionProvider {
    type Err = RuntimeError;

    fn from_str(s: &str) -> Result<Self> {
        let unknown = || RuntimeError::UnknownProvider {
            given: s.to_string(),
            choices: PROVIDER_CHOICES,
        };
        let lower = s.trim().to_ascii_lowercase();
        let (kind, device) = match lower.split_once(':') {
            Some((k, d)) => (k, Some(d)),
            None => (lower.as_str(), None),
        };
        let device_id = match device {
            None => 0,
            Some(d) => d.parse::<u32>().map_err(|_| unknown())?,
        };
        match kind {
            "cpu" if device.is_none() => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda { device_id }),
            "tensorrt" | "trt" => Ok(Self::tensorrt(device_id)),
            _ => Err(unknown()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_spellings() -> Result<()> {
        assert_eq!("cpu".parse::<ExecutionProvider>()?, ExecutionProvider::Cpu);
        assert_eq!(
            " CUDA ".parse::<ExecutionProvider>()?,
            ExecutionProvider::Cuda { device_id: 0 }
        );
        assert_eq!(
            "cuda:1".parse::<ExecutionProvider>()?,
            ExecutionProvider::Cuda { device_id: 1 }
        );
        assert_eq!(
            "tensorrt".parse::<ExecutionProvider>()?,
            ExecutionProvider::tensorrt(0)
        );
        assert_eq!(
            "trt:2".parse::<ExecutionProvider>()?,
            ExecutionProvider::tensorrt(2)
        );
        Ok(())
    }

    #[test]
    fn rejects_unknown_spellings_with_the_choices() {
        for bad in [
            "gpu",
            "cuda:",
            "cuda:x",
            "cuda:-1",
            "cpu:0",
            "",
            "tensorrt:1:2",
        ] {
            match bad.parse::<ExecutionProvider>() {
                Err(e @ RuntimeError::UnknownProvider { .. }) => {
                    let msg = e.to_string();
                    assert!(msg.contains("cpu, cuda, cuda:<device>, tensorrt"), "{msg}");
                }
                other => panic!("{bad:?} parsed as {other:?}"),
            }
        }
    }

    #[test]
    fn display_round_trips() -> Result<()> {
        for p in [
            ExecutionProvider::Cpu,
            ExecutionProvider::Cuda { device_id: 3 },
            ExecutionProvider::tensorrt(1),
        ] {
            assert_eq!(p.to_string().parse::<ExecutionProvider>()?, p);
        }
        Ok(())
    }

    #[test]
    fn tensorrt_options_apply_only_to_tensorrt() {
        let trt = ExecutionProvider::tensorrt(0)
            .with_cache_dir("/tmp/x")
            .with_fp16(true);
        assert_eq!(
            trt,
            ExecutionProvider::TensorRt {
                device_id: 0,
                cache_dir: Some(PathBuf::from("/tmp/x")),
                fp16: true
            }
        );
        assert_eq!(
            ExecutionProvider::Cpu.with_fp16(true),
            ExecutionProvider::Cpu
        );
    }
}
