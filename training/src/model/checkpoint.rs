//! Safetensors checkpoints with open_clip's state-dict names.
//!
//! Loading is strict, like `load_state_dict(strict=True)`: every model tensor must be in the file
//! with the same shape and the file must hold nothing else; all missing, unexpected and misshaped
//! tensors are reported by name in one error. Dtypes are converted (an fp16/bf16 checkpoint loads
//! into an fp32 model). A checkpoint whose every key starts with `module.` (saved from a
//! DistributedDataParallel wrapper) loads with the prefix stripped. Pickled `torch.save` files
//! (`.bin`, `.pt`) are read by [`crate::model::torch_pickle`], which never runs pickle code.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use tch::{Device, Tensor};

use crate::error::TrainError;
use crate::model::layers::NamedTensors;

/// How many names of each kind an error lists before summarising.
const LIST_LIMIT: usize = 20;

fn ckpt_err(path: &Path, reason: impl Into<String>) -> TrainError {
    TrainError::Checkpoint {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// Reads all tensors of a safetensors file (on the CPU), stripping a DDP `module.` prefix.
pub fn read_safetensors(path: impl AsRef<Path>) -> Result<BTreeMap<String, Tensor>, TrainError> {
    let path = path.as_ref();
    let tensors =
        Tensor::read_safetensors(path).map_err(|e| ckpt_err(path, format!("cannot read: {e}")))?;
    let strip = !tensors.is_empty() && tensors.iter().all(|(n, _)| n.starts_with("module."));
    Ok(tensors
        .into_iter()
        .map(|(name, t)| {
            let name = if strip {
                name.trim_start_matches("module.").to_string()
            } else {
                name
            };
            (name, t)
        })
        .collect())
}

fn list(names: &[String]) -> String {
    let mut s = names
        .iter()
        .take(LIST_LIMIT)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > LIST_LIMIT {
        s.push_str(&format!(", ... and {} more", names.len() - LIST_LIMIT));
    }
    s
}

/// Copies `file` tensors into the model tensors `model` (shallow clones of the variables), after
/// checking that names and shapes match exactly.
pub fn load_named(
    model: &NamedTensors,
    file: &BTreeMap<String, Tensor>,
    path: &Path,
) -> Result<(), TrainError> {
    let mut missing = Vec::new();
    let mut mismatched = Vec::new();
    let mut expected = HashSet::new();
    for (name, var) in model {
        expected.insert(name.as_str());
        match file.get(name) {
            None => missing.push(name.clone()),
            Some(src) if src.size() != var.size() => mismatched.push(format!(
                "{name} (checkpoint {:?}, model {:?})",
                src.size(),
                var.size()
            )),
            Some(_) => {}
        }
    }
    let unexpected: Vec<String> = file
        .keys()
        .filter(|k| !expected.contains(k.as_str()))
        .cloned()
        .collect();
    if !(missing.is_empty() && unexpected.is_empty() && mismatched.is_empty()) {
        let mut parts = Vec::new();
        if !missing.is_empty() {
            parts.push(format!("{} missing: {}", missing.len(), list(&missing)));
        }
        if !unexpected.is_empty() {
            parts.push(format!(
                "{} unexpected: {}",
                unexpected.len(),
                list(&unexpected)
            ));
        }
        if !mismatched.is_empty() {
            parts.push(format!(
                "{} with the wrong shape: {}",
                mismatched.len(),
                list(&mismatched)
            ));
        }
        return Err(ckpt_err(
            path,
            format!(
                "does not match the model's state dict; {}",
                parts.join("; ")
            ),
        ));
    }
    tch::no_grad(|| -> Result<(), TrainError> {
        for (name, var) in model {
            if let Some(src) = file.get(name) {
                let mut dst = var.shallow_clone();
                dst.f_copy_(src)
                    .map_err(|e| ckpt_err(path, format!("cannot copy {name}: {e}")))?;
            }
        }
        Ok(())
    })
}

/// Writes named tensors as safetensors (moved to the CPU, contiguous, detached).
pub fn save_named(tensors: &NamedTensors, path: impl AsRef<Path>) -> Result<(), TrainError> {
    let path = path.as_ref();
    let cpu = tensors
        .iter()
        .map(|(name, t)| {
            let t = t
                .f_detach()
                .and_then(|t| t.f_to_device(Device::Cpu))
                .and_then(|t| t.f_contiguous())
                .map_err(|e| ckpt_err(path, format!("cannot stage {name}: {e}")))?;
            Ok((name.clone(), t))
        })
        .collect::<Result<Vec<_>, TrainError>>()?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| ckpt_err(path, format!("cannot create {}: {e}", dir.display())))?;
    }
    // Write next to the target and rename, so a crash never leaves a half-written checkpoint.
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".partial");
    let tmp = path.with_file_name(tmp_name);
    Tensor::write_safetensors(&cpu, &tmp)
        .map_err(|e| ckpt_err(path, format!("cannot write {}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, path)
        .map_err(|e| ckpt_err(path, format!("cannot rename {}: {e}", tmp.display())))
}
