//! Where a run executes. `auto` takes the first GPU when libtorch sees one and the CPU otherwise;
//! an explicit `cuda`/`cuda:N` that libtorch cannot honour is an error, because a run that was
//! meant for a GPU and silently trains on the CPU wastes hours before anyone notices.

use crate::error::TrainError;
use std::str::FromStr;

/// A device request as written on the command line or in a config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceRequest {
    Auto,
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceRequest {
    type Err = TrainError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| TrainError::Device {
            spec: s.to_string(),
            reason: reason.to_string(),
        };
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(DeviceRequest::Auto),
            "cpu" => Ok(DeviceRequest::Cpu),
            "cuda" | "gpu" => Ok(DeviceRequest::Cuda(0)),
            other => match other.strip_prefix("cuda:") {
                Some(n) => n
                    .parse()
                    .map(DeviceRequest::Cuda)
                    .map_err(|_| bad("expected cuda:<index>, e.g. cuda:0")),
                None => Err(bad("expected one of auto, cpu, cuda, cuda:<index>")),
            },
        }
    }
}

impl DeviceRequest {
    /// The device of the rank with `local_rank` on its machine: `auto` takes GPU `local_rank`
    /// (modulo the GPUs seen), as torchrun jobs assign them; explicit requests are kept.
    pub fn for_local_rank(self, local_rank: usize) -> Self {
        match self {
            DeviceRequest::Auto if tch::Cuda::is_available() => {
                let gpus = tch::Cuda::device_count().max(1) as usize;
                DeviceRequest::Cuda(local_rank % gpus)
            }
            other => other,
        }
    }

    /// The request as written in a config (`auto`, `cpu`, `cuda:N`).
    pub fn spec(self) -> String {
        match self {
            DeviceRequest::Auto => "auto".into(),
            DeviceRequest::Cpu => "cpu".into(),
            DeviceRequest::Cuda(i) => format!("cuda:{i}"),
        }
    }

    /// Resolve against what libtorch can see on this machine.
    pub fn resolve(self) -> Result<tch::Device, TrainError> {
        let gpus = if tch::Cuda::is_available() {
            tch::Cuda::device_count().max(0) as usize
        } else {
            0
        };
        match self {
            DeviceRequest::Cpu => Ok(tch::Device::Cpu),
            DeviceRequest::Auto if gpus > 0 => Ok(tch::Device::Cuda(0)),
            DeviceRequest::Auto => Ok(tch::Device::Cpu),
            DeviceRequest::Cuda(i) if i < gpus => Ok(tch::Device::Cuda(i)),
            DeviceRequest::Cuda(i) => Err(TrainError::Device {
                spec: format!("cuda:{i}"),
                reason: if gpus == 0 {
                    "libtorch sees no CUDA device (no driver or no GPU); use --device cpu".into()
                } else {
                    format!("libtorch sees {gpus} CUDA device(s)")
                },
            }),
        }
    }
}

/// One line describing the runtime, for logs: libtorch's CUDA view and thread count.
pub fn describe() -> String {
    format!(
        "libtorch: cuda available = {}, cuda devices = {}, cudnn = {}, cpu threads = {}",
        tch::Cuda::is_available(),
        tch::Cuda::device_count(),
        tch::Cuda::cudnn_is_available(),
        tch::get_num_threads()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_spelling() {
        assert_eq!(
            "auto".parse::<DeviceRequest>().ok(),
            Some(DeviceRequest::Auto)
        );
        assert_eq!(
            " CPU ".parse::<DeviceRequest>().ok(),
            Some(DeviceRequest::Cpu)
        );
        assert_eq!(
            "cuda".parse::<DeviceRequest>().ok(),
            Some(DeviceRequest::Cuda(0))
        );
        assert_eq!(
            "cuda:3".parse::<DeviceRequest>().ok(),
            Some(DeviceRequest::Cuda(3))
        );
        let err = "tpu".parse::<DeviceRequest>().expect_err("unknown device");
        assert!(err.to_string().contains("auto, cpu, cuda"), "{err}");
        assert!("cuda:x".parse::<DeviceRequest>().is_err());
    }

    #[test]
    fn resolution_matches_what_libtorch_sees() {
        assert_eq!(DeviceRequest::Cpu.resolve().ok(), Some(tch::Device::Cpu));
        let gpus = if tch::Cuda::is_available() {
            tch::Cuda::device_count()
        } else {
            0
        };
        let auto = DeviceRequest::Auto.resolve().expect("auto always resolves");
        assert_eq!(auto.is_cuda(), gpus > 0);
        // A GPU index past the last one is always an error, never a quiet CPU run.
        let err = DeviceRequest::Cuda(gpus as usize + 7)
            .resolve()
            .expect_err("missing GPU");
        assert!(err.to_string().contains("cuda:"), "{err}");
        assert!(describe().contains("cuda available"));
    }
}
