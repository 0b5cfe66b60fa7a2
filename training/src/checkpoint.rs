//! Training checkpoints: one directory per checkpoint, written atomically, with a SHA-256 of every
//! file in its manifest, verified before anything is read back.
//!
//! ```text
//! step-00000100/
//!   model.safetensors       CLIP weights under open_clip's state-dict names (open_clip loads it
//!                           with strict=True; the STC head is NOT in it)
//!   model_config.json       open_clip model config of those weights
//!   stc_head.safetensors    the short-tag classifier, keys `stc_head.*` (runs with STC only)
//!   tag_vocab.tsv           its tag vocabulary (runs with STC only)
//!   optimizer.safetensors   AdamW moments `exp_avg.<param>` / `exp_avg_sq.<param>`
//!   train_state.json        step, run config, data-loader position, metrics so far
//!   manifest.json           format, version, step, and size + SHA-256 of every file above
//! ```
//!
//! The directory is built under a hidden temporary name and renamed into place once complete
//! (every file fsynced), so a crash leaves either no checkpoint or a whole one; `latest` next to
//! the checkpoints names the newest complete one and is replaced atomically.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::nn::VarStore;
use tch::Device;

use hq_data::text::hf_tokenizer;
use hq_data::text::{TextTokenizer, TokenizerSpec};

use crate::model::checkpoint::save_named;
use crate::model::{Clip, ClipConfig, NamedTensors};
use crate::TrainError;

pub const MANIFEST_FILE: &str = "manifest.json";
pub const MODEL_FILE: &str = "model.safetensors";
pub const MODEL_CONFIG_FILE: &str = "model_config.json";
pub const STC_HEAD_FILE: &str = "stc_head.safetensors";
pub const TAG_VOCAB_FILE: &str = "tag_vocab.tsv";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const TRAIN_STATE_FILE: &str = "train_state.json";
/// The file next to the checkpoint directories naming the newest one.
pub const LATEST_FILE: &str = "latest";

const FORMAT: &str = "hq-train-checkpoint";
const VERSION: u32 = 1;

fn err(path: &Path, reason: impl Into<String>) -> TrainError {
    TrainError::Checkpoint {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// Size and SHA-256 of one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub bytes: u64,
    pub sha256: String,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub step: u64,
    pub files: BTreeMap<String, FileDigest>,
}

fn digest_file(path: &Path) -> Result<FileDigest, TrainError> {
    let mut f = fs::File::open(path).map_err(|e| err(path, format!("cannot open: {e}")))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| err(path, format!("cannot read: {e}")))?;
        if n == 0 {
            break;
        }
        bytes += n as u64;
        hasher.update(&buf[..n]);
    }
    let sha256 = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(FileDigest { bytes, sha256 })
}

fn fsync(path: &Path) -> Result<(), TrainError> {
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| err(path, format!("cannot sync: {e}")))
}

/// A checkpoint directory being written. Nothing appears at the final path until
/// [`CheckpointWriter::commit`]; dropping it uncommitted removes the staging directory.
pub struct CheckpointWriter {
    target: PathBuf,
    staging: PathBuf,
    step: u64,
    files: Vec<String>,
    committed: bool,
}

impl CheckpointWriter {
    /// Starts the checkpoint of `step` at `target` (a directory path).
    pub fn create(target: impl AsRef<Path>, step: u64) -> Result<Self, TrainError> {
        let target = target.as_ref().to_path_buf();
        let parent = target
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| err(&target, "has no directory name"))?;
        fs::create_dir_all(parent)
            .map_err(|e| err(&target, format!("cannot create {}: {e}", parent.display())))?;
        let staging = parent.join(format!(".{name}.partial-{}", std::process::id()));
        if staging.exists() {
            fs::remove_dir_all(&staging)
                .map_err(|e| err(&staging, format!("cannot clear a stale staging dir: {e}")))?;
        }
        fs::create_dir(&staging).map_err(|e| err(&staging, format!("cannot create: {e}")))?;
        Ok(CheckpointWriter {
            target,
            staging,
            step,
            files: Vec::new(),
            committed: false,
        })
    }

    fn check_name(&mut self, name: &str) -> Result<PathBuf, TrainError> {
        if name == MANIFEST_FILE || name.contains('/') || self.files.iter().any(|f| f == name) {
            return Err(err(
                &self.target,
                format!("file name {name:?} is reserved or repeated"),
            ));
        }
        self.files.push(name.to_string());
        Ok(self.staging.join(name))
    }

    pub fn write_bytes(&mut self, name: &str, bytes: &[u8]) -> Result<(), TrainError> {
        let path = self.check_name(name)?;
        fs::write(&path, bytes).map_err(|e| err(&path, format!("cannot write: {e}")))
    }

    pub fn write_json<T: Serialize>(&mut self, name: &str, value: &T) -> Result<(), TrainError> {
        let json = serde_json::to_string_pretty(value)
            .map_err(|e| err(&self.target, format!("cannot serialise {name}: {e}")))?;
        self.write_bytes(name, json.as_bytes())
    }

    pub fn write_tensors(&mut self, name: &str, tensors: &NamedTensors) -> Result<(), TrainError> {
        let path = self.check_name(name)?;
        save_named(tensors, &path)
    }

    /// A file written by the caller's own code (e.g. the tag vocabulary's `save`) at the returned
    /// path; it is checksummed at commit like the others.
    pub fn external_file(&mut self, name: &str) -> Result<PathBuf, TrainError> {
        self.check_name(name)
    }

    /// Checksums every file, writes the manifest, syncs, and renames the directory into place
    /// (replacing an older checkpoint of the same name).
    pub fn commit(mut self) -> Result<PathBuf, TrainError> {
        let mut files = BTreeMap::new();
        for name in &self.files {
            let path = self.staging.join(name);
            if !path.is_file() {
                return Err(err(&path, "was announced but not written"));
            }
            fsync(&path)?;
            files.insert(name.clone(), digest_file(&path)?);
        }
        let manifest = Manifest {
            format: FORMAT.into(),
            version: VERSION,
            step: self.step,
            files,
        };
        let json = serde_json::to_string_pretty(&manifest)
            .map_err(|e| err(&self.target, format!("cannot serialise the manifest: {e}")))?;
        let mpath = self.staging.join(MANIFEST_FILE);
        fs::write(&mpath, json).map_err(|e| err(&mpath, format!("cannot write: {e}")))?;
        fsync(&mpath)?;
        fsync(&self.staging)?;
        if self.target.exists() {
            // Same step saved again (e.g. a final save right after a periodic one): move the old
            // one aside first; a rename cannot replace a non-empty directory.
            let old = self.staging.with_extension("old");
            fs::rename(&self.target, &old)
                .map_err(|e| err(&self.target, format!("cannot move the old checkpoint: {e}")))?;
            fs::rename(&self.staging, &self.target)
                .map_err(|e| err(&self.target, format!("cannot rename into place: {e}")))?;
            let _ = fs::remove_dir_all(&old);
        } else {
            fs::rename(&self.staging, &self.target)
                .map_err(|e| err(&self.target, format!("cannot rename into place: {e}")))?;
        }
        if let Some(parent) = self.target.parent().filter(|d| !d.as_os_str().is_empty()) {
            let _ = fsync(parent);
        }
        self.committed = true;
        Ok(self.target.clone())
    }
}

impl Drop for CheckpointWriter {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.staging);
        }
    }
}

/// Checks a checkpoint directory against its manifest (every listed file present with the
/// recorded size and SHA-256) and returns the manifest.
pub fn verify(dir: impl AsRef<Path>) -> Result<Manifest, TrainError> {
    let dir = dir.as_ref();
    if !dir.is_dir() {
        return Err(err(
            dir,
            "is not a checkpoint directory (it does not exist or is a file)",
        ));
    }
    let mpath = dir.join(MANIFEST_FILE);
    let text = fs::read_to_string(&mpath).map_err(|e| {
        err(
            dir,
            format!(
                "cannot read {MANIFEST_FILE} ({e}); the checkpoint is incomplete or not one \
                 written by hq-train"
            ),
        )
    })?;
    let manifest: Manifest =
        serde_json::from_str(&text).map_err(|e| err(&mpath, format!("corrupt manifest: {e}")))?;
    if manifest.format != FORMAT || manifest.version != VERSION {
        return Err(err(
            &mpath,
            format!(
                "format {:?} version {} is not {FORMAT:?} version {VERSION}",
                manifest.format, manifest.version
            ),
        ));
    }
    for (name, want) in &manifest.files {
        // The writer only records plain names inside the checkpoint; a name that could reach
        // outside it (`..`, an absolute path, a drive prefix) is a crafted manifest, refused
        // before anything is read through it.
        let inside = Path::new(name)
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
        if !inside || name.is_empty() {
            return Err(err(
                &mpath,
                format!("lists {name:?}, which is not a file inside the checkpoint"),
            ));
        }
        let path = dir.join(name);
        if !path.is_file() {
            return Err(err(dir, format!("{name} is missing")));
        }
        let got = digest_file(&path)?;
        if got != *want {
            return Err(err(
                dir,
                format!(
                    "{name} is corrupt: {} bytes with SHA-256 {}, the manifest records {} bytes \
                     with SHA-256 {}; resume from an earlier checkpoint",
                    got.bytes, got.sha256, want.bytes, want.sha256
                ),
            ));
        }
    }
    Ok(manifest)
}

/// Points `<run>/latest` at `checkpoint` (its directory name), atomically.
pub fn write_latest(checkpoint: &Path) -> Result<(), TrainError> {
    let parent = checkpoint
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = checkpoint
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| err(checkpoint, "has no directory name"))?;
    hq_data::atomic::write_atomic(parent.join(LATEST_FILE), format!("{name}\n").as_bytes())?;
    Ok(())
}

/// Resolves a `--resume` argument: a checkpoint directory itself (it has a manifest), or a
/// directory holding checkpoints and a `latest` file (a run's `checkpoints/` or the run directory).
pub fn resolve(path: impl AsRef<Path>) -> Result<PathBuf, TrainError> {
    let path = path.as_ref();
    if path.join(MANIFEST_FILE).is_file() {
        return Ok(path.to_path_buf());
    }
    for dir in [path.to_path_buf(), path.join("checkpoints")] {
        let latest = dir.join(LATEST_FILE);
        if latest.is_file() {
            let name = fs::read_to_string(&latest)
                .map_err(|e| err(&latest, format!("cannot read: {e}")))?;
            let name = name.trim();
            if name.is_empty() || name.contains('/') {
                return Err(err(&latest, format!("names no checkpoint ({name:?})")));
            }
            return Ok(dir.join(name));
        }
    }
    Err(err(
        path,
        format!(
            "is neither a checkpoint directory (no {MANIFEST_FILE}) nor a run directory with a \
             `{LATEST_FILE}` file"
        ),
    ))
}

/// Reads `model_config.json` of a verified checkpoint directory.
pub fn read_model_config(dir: &Path) -> Result<ClipConfig, TrainError> {
    ClipConfig::from_json_file(dir.join(MODEL_CONFIG_FILE))
}

/// A checkpoint's image preprocessing (open_clip's `preprocess_cfg` object).
pub const PREPROCESS_FILE: &str = "preprocess_cfg.json";

/// open_clip's Hugging Face folder: its config file and its weights, safetensors first.
pub const OPEN_CLIP_CONFIG_FILE: &str = "open_clip_config.json";
const OPEN_CLIP_WEIGHTS: [&str; 2] = ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"];

/// Where a model's weights and (when known) its config come from: one of our checkpoints, an
/// open_clip Hugging Face folder, or a single weights file.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightsSource {
    /// The weights: safetensors, or a `torch.save` zip (`.bin`, `.pt`; told apart by content).
    pub weights: PathBuf,
    /// The config the source carries (`model_config.json`, `open_clip_config.json`'s
    /// `model_cfg`, or such a file next to a bare weights file), if any.
    pub config: Option<ClipConfig>,
    /// `open_clip_config.json`'s `preprocess_cfg` (normalisation, eval resize), if any.
    pub preprocess: Option<hq_data::transform::Preprocess>,
    /// The folder holding the Hugging Face tokenizer (`tokenizer.json`) that travels with the
    /// weights, if any: the open_clip folder, our checkpoint, or the weights file's folder.
    pub tokenizer: Option<PathBuf>,
}

/// Resolves `path`: a checkpoint or run directory of ours (verified), an open_clip HF folder
/// (`open_clip_config.json` + `open_clip_model.safetensors` or `open_clip_pytorch_model.bin`), or a
/// weights file (with `model_config.json` or `open_clip_config.json` next to it, if any).
pub fn weights_source(path: &Path) -> Result<WeightsSource, TrainError> {
    if path.is_dir() {
        if path.join(OPEN_CLIP_CONFIG_FILE).is_file() && !path.join(MANIFEST_FILE).exists() {
            let weights = OPEN_CLIP_WEIGHTS
                .iter()
                .map(|n| path.join(n))
                .find(|p| p.is_file())
                .ok_or_else(|| {
                    err(
                        path,
                        format!(
                            "an open_clip folder without weights ({})",
                            OPEN_CLIP_WEIGHTS.join(" or ")
                        ),
                    )
                })?;
            let file = path.join(OPEN_CLIP_CONFIG_FILE);
            let config = Some(read_file_config(&file)?);
            return Ok(WeightsSource {
                weights,
                config,
                preprocess: preprocess_in(path)?,
                tokenizer: tokenizer_folder(path),
            });
        }
        let dir = resolve(path)?;
        verify(&dir)?;
        return Ok(WeightsSource {
            weights: dir.join(MODEL_FILE),
            config: Some(read_model_config(&dir)?),
            preprocess: preprocess_in(&dir)?,
            tokenizer: tokenizer_folder(&dir),
        });
    }
    if !path.is_file() {
        return Err(err(path, "does not exist"));
    }
    let parent = path.parent().unwrap_or(Path::new("."));
    let config_file = [MODEL_CONFIG_FILE, OPEN_CLIP_CONFIG_FILE]
        .iter()
        .map(|n| parent.join(n))
        .find(|p| p.is_file());
    let config = config_file.as_deref().map(read_file_config).transpose()?;
    Ok(WeightsSource {
        weights: path.to_path_buf(),
        config,
        preprocess: preprocess_in(parent)?,
        tokenizer: tokenizer_folder(parent),
    })
}

/// The image preprocessing stated in `dir`, the folder of some weights: our checkpoints'
/// `preprocess_cfg.json`, else an open_clip folder's `open_clip_config.json` `preprocess_cfg`.
pub fn preprocess_in(dir: &Path) -> Result<Option<hq_data::transform::Preprocess>, TrainError> {
    let ours = dir.join(PREPROCESS_FILE);
    if ours.is_file() {
        let value = read_json(&ours)?;
        return hq_data::transform::Preprocess::from_open_clip(&value)
            .map(Some)
            .map_err(|e| err(&ours, e));
    }
    let theirs = dir.join(OPEN_CLIP_CONFIG_FILE);
    if !theirs.is_file() {
        return Ok(None);
    }
    read_json(&theirs)?
        .get("preprocess_cfg")
        .map(|p| hq_data::transform::Preprocess::from_open_clip(p).map_err(|e| err(&theirs, e)))
        .transpose()
}

fn read_json(path: &Path) -> Result<serde_json::Value, TrainError> {
    let text = fs::read_to_string(path).map_err(|e| err(path, format!("cannot read: {e}")))?;
    serde_json::from_str(&text).map_err(|e| err(path, format!("invalid JSON: {e}")))
}

/// `dir` when it holds a Hugging Face `tokenizer.json`.
fn tokenizer_folder(dir: &Path) -> Option<PathBuf> {
    dir.join(hf_tokenizer::TOKENIZER_FILE)
        .is_file()
        .then(|| dir.to_path_buf())
}

/// The tokenizer a model reads ([`TextTokenizer::for_model`]): open_clip's CLIP BPE, or the
/// Hugging Face tokenizer in `folder` when `text_cfg.hf_tokenizer_name` names one (CLIPA).
pub fn text_tokenizer(
    cfg: &ClipConfig,
    folder: Option<&Path>,
) -> Result<TextTokenizer, TrainError> {
    let t = &cfg.text_cfg;
    let spec = TokenizerSpec {
        context_length: usize::try_from(t.context_length).map_err(|_| TrainError::ModelConfig {
            field: "text_cfg.context_length".into(),
            reason: format!("{} is out of range", t.context_length),
        })?,
        hf_tokenizer_name: t.hf_tokenizer_name.as_deref(),
        tokenizer_mode: t.tokenizer_mode.as_deref(),
        tokenizer_kwargs: t.tokenizer_kwargs.as_ref(),
    };
    Ok(TextTokenizer::for_model(&spec, folder)?)
}

/// Copies the tokenizer files of `folder` (those present) into a checkpoint being written, so
/// that the checkpoint alone can be resumed, evaluated and exported.
pub fn write_tokenizer_files(w: &mut CheckpointWriter, folder: &Path) -> Result<(), TrainError> {
    for name in hf_tokenizer::TOKENIZER_FILES {
        let path = folder.join(name);
        match fs::read(&path) {
            Ok(bytes) => w.write_bytes(name, &bytes)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(&path, format!("cannot read: {e}"))),
        }
    }
    Ok(())
}

/// All tensors of a weights file (CPU), by content: a zip archive is a `torch.save` checkpoint
/// (read without running pickle code, `model::torch_pickle`), anything else safetensors.
pub fn read_weights(path: &Path) -> Result<BTreeMap<String, tch::Tensor>, TrainError> {
    let mut magic = [0u8; 4];
    let is_zip = fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .map(|_| magic == *b"PK\x03\x04")
        .unwrap_or(false);
    if is_zip {
        crate::model::torch_pickle::read_torch_checkpoint(path)
    } else {
        crate::model::checkpoint::read_safetensors(path)
    }
}

/// Copies the weights of `source` into `model` (strict: names and shapes must match).
pub fn load_weights(model: &Clip, source: &WeightsSource) -> Result<(), TrainError> {
    let tensors = read_weights(&source.weights)?;
    crate::model::checkpoint::load_named(&model.state_dict(), &tensors, &source.weights)
}

/// Loads CLIP weights for inference from anything [`weights_source`] accepts. The config is the
/// source's; `config`, when given, must equal it (or is the only one, for a bare weights file).
pub fn load_clip(
    path: &Path,
    config: Option<&ClipConfig>,
    device: Device,
) -> Result<(VarStore, Clip), TrainError> {
    let source = weights_source(path)?;
    let cfg =
        match (&source.config, config) {
            (Some(stored), Some(given)) if path.is_dir() && stored != given => return Err(err(
                path,
                "the model config given differs from the checkpoint's; leave the config out to \
                 use the checkpoint's",
            )),
            (_, Some(given)) => given.clone(),
            (Some(stored), None) => stored.clone(),
            (None, None) => return Err(err(
                path,
                "a bare weights file needs a model config: pass one (a preset name or open_clip \
                 model-config JSON) or put model_config.json next to it",
            )),
        };
    let vs = VarStore::new(device);
    let model = Clip::new(vs.root(), &cfg)?;
    load_weights(&model, &source)?;
    Ok((vs, model))
}

/// A model config from a JSON file: open_clip's model config, or an HF-hub
/// `open_clip_config.json` (`{"model_cfg": {...}, ...}`).
pub fn read_file_config(path: &Path) -> Result<ClipConfig, TrainError> {
    let value = read_json(path)?;
    match value.get("model_cfg") {
        Some(inner) => ClipConfig::from_json_str(&inner.to_string()),
        None => ClipConfig::from_json_str(&value.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_verify_and_corruption() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("step-00000001");
        let mut w = CheckpointWriter::create(&target, 1).expect("create");
        w.write_bytes("a.txt", b"hello").expect("a");
        w.write_json("b.json", &vec![1, 2, 3]).expect("b");
        let path = w.commit().expect("commit");
        write_latest(&path).expect("latest");
        let m = verify(&path).expect("verify");
        assert_eq!(m.step, 1);
        assert_eq!(m.files.len(), 2);
        assert_eq!(resolve(dir.path()).expect("resolve"), path);
        assert_eq!(resolve(&path).expect("resolve"), path);
        // Only the checkpoint and `latest` remain: no staging leftovers.
        assert_eq!(fs::read_dir(dir.path()).expect("ls").count(), 2);

        fs::write(path.join("a.txt"), b"hellO").expect("corrupt");
        let e = verify(&path).expect_err("corrupt").to_string();
        assert!(e.contains("a.txt is corrupt"), "{e}");
        fs::remove_file(path.join("a.txt")).expect("rm");
        let e = verify(&path).expect_err("missing").to_string();
        assert!(e.contains("a.txt is missing"), "{e}");
        fs::remove_file(path.join(MANIFEST_FILE)).expect("rm");
        assert!(verify(&path).is_err());

        // A manifest naming files outside the checkpoint is refused, whatever they hold.
        let step3 = dir.path().join("step-3");
        let mut w = CheckpointWriter::create(&step3, 3).expect("create");
        w.write_bytes("a.txt", b"x").expect("a");
        let path3 = w.commit().expect("commit");
        let manifest_text = fs::read_to_string(path3.join(MANIFEST_FILE)).expect("manifest");
        for outside in ["../latest", "/etc/hostname", "sub/../../latest"] {
            let crafted = manifest_text.replace("\"a.txt\"", &format!("{outside:?}"));
            assert_ne!(crafted, manifest_text);
            fs::write(path3.join(MANIFEST_FILE), &crafted).expect("write");
            let e = verify(&path3).expect_err(outside).to_string();
            assert!(
                e.contains("not a file inside the checkpoint"),
                "{outside}: {e}"
            );
        }
        fs::remove_dir_all(&path3).expect("rm");

        // An uncommitted writer leaves nothing behind.
        {
            let mut w = CheckpointWriter::create(dir.path().join("step-2"), 2).expect("create");
            w.write_bytes("x", b"1").expect("x");
        }
        assert!(!dir.path().join("step-2").exists());
        assert_eq!(fs::read_dir(dir.path()).expect("ls").count(), 2);
    }
}
