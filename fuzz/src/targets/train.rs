//! hq-train's readers: TOML training configs, open_clip model configs (plain and HF-hub), weights
//! files (safetensors and torch.save zips), checkpoint directories with their checksums, and the
//! data loader's state file.

use hq_train::checkpoint::{self, CheckpointWriter};
use hq_train::data::loader::LoaderState;
use hq_train::model::ClipConfig;
use hq_train::TrainConfig;

use crate::{alloc, files, props};

/// TOML training configs. Properties: an accepted config prints and parses back identical; a
/// rejected one names the key or says it is not TOML.
pub fn train_config_toml(input: &[u8]) {
    let read = |bytes: &[u8]| TrainConfig::from_toml_str(&props::text(bytes));
    let print = |c: &TrainConfig| c.to_toml_string().map(String::into_bytes);
    props::read_print_read("train config", input, read, print, &[]);
}

/// open_clip model configs, plain (`model_config.json`) or HF-hub (`open_clip_config.json` with
/// `model_cfg` and `preprocess_cfg`). Properties: an accepted config prints and parses back
/// identical; a rejected one names the field or the file.
pub fn open_clip_config(input: &[u8]) {
    let read = |bytes: &[u8]| ClipConfig::from_json_str(&props::text(bytes));
    let print = |c: &ClipConfig| c.to_json_string().map(String::into_bytes);
    props::read_print_read("model config", input, read, print, &[]);
    let dir = files::tempdir();
    let path = files::write_one(dir.path(), "open_clip_config.json", input);
    if let Err(e) = checkpoint::read_file_config(&path) {
        props::names_problem(&e, &[]);
    }
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(input) {
        if let Some(p) = v.get("preprocess_cfg") {
            if let Err(e) = hq_data::transform::Preprocess::from_open_clip(p) {
                props::names_problem(&e, &["preprocess_cfg"]);
            }
        }
    }
}

/// Weights files: safetensors or a torch.save zip, told apart by content. Properties: no panic;
/// the header's length fields cannot make the Rust side allocate beyond a multiple of the file;
/// a rejection names the file.
pub fn weights_file(input: &[u8]) {
    let dir = files::tempdir();
    let path = files::write_one(dir.path(), "weights.bin", input);
    // Tensors live in libtorch's allocator (not counted); what is counted is the file, the header
    // and the names.
    let cap = 16 * input.len() + (1 << 20);
    match alloc::within_cap("weights", cap, || checkpoint::read_weights(&path)) {
        Ok(tensors) => {
            for (name, t) in &tensors {
                let bytes = t.numel() * t.kind().elt_size_in_bytes();
                assert!(
                    bytes <= input.len(),
                    "{name}: {bytes} bytes from a {}-byte file",
                    input.len()
                );
            }
        }
        Err(e) => {
            props::names_problem(&e, &["weights.bin"]);
        }
    }
}

/// A checkpoint directory: `manifest.json`, `model.safetensors`, `model_config.json`,
/// `train_state.json` and the run's `latest`, in that order in the input. Properties: `verify`
/// accepts only files whose size and SHA-256 match the manifest (checked again here) and names
/// the file at fault otherwise; `resolve` never leaves the run directory; resuming reads the
/// train state or says why not.
pub fn checkpoint_dir(input: &[u8]) {
    const NAMES: [&str; 5] = [
        "step-1/manifest.json",
        "step-1/model.safetensors",
        "step-1/model_config.json",
        "step-1/train_state.json",
        "latest",
    ];
    let dir = files::tempdir();
    let parts = files::split(input, NAMES.len());
    files::write_parts(dir.path(), &NAMES, &parts);
    let ckpt = dir.path().join("step-1");
    match checkpoint::verify(&ckpt) {
        Ok(m) => {
            for (name, d) in &m.files {
                let bytes = std::fs::read(ckpt.join(name))
                    .unwrap_or_else(|e| panic!("verified {name} cannot be read: {e}"));
                assert_eq!(d.bytes, bytes.len() as u64, "{name}: size");
                assert_eq!(d.sha256, sha256_hex(&bytes), "{name}: SHA-256");
            }
            let _ = checkpoint::read_model_config(&ckpt);
        }
        Err(e) => {
            props::names_problem(&e, &["step-1"]);
        }
    }
    match checkpoint::resolve(dir.path()) {
        Ok(p) => assert!(
            p.starts_with(dir.path()),
            "resolve left the run: {}",
            p.display()
        ),
        Err(e) => {
            props::names_problem(&e, &[]);
        }
    }
    // What `--resume` reads: resolve, verify, then the train state.
    if let Err(e) = hq_train::train::saved_state(dir.path()) {
        props::names_problem(&e, &[]);
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Checkpoints written by [`CheckpointWriter`] verify; changing any byte of a file makes
/// `verify` fail naming that file. Input: file contents from bolero's generator, and which byte
/// to flip.
pub fn checkpoint_round_trip(contents: &[Vec<u8>], flip: usize) {
    let dir = files::tempdir();
    let target = dir.path().join("step-7");
    let mut w = CheckpointWriter::create(&target, 7).unwrap_or_else(|e| panic!("{e}"));
    for (i, c) in contents.iter().enumerate() {
        w.write_bytes(&format!("f{i}.bin"), c)
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let path = w.commit().unwrap_or_else(|e| panic!("{e}"));
    let m = checkpoint::verify(&path).unwrap_or_else(|e| panic!("a fresh checkpoint fails: {e}"));
    assert_eq!(m.step, 7);
    assert_eq!(m.files.len(), contents.len());
    let Some((i, c)) = contents
        .iter()
        .enumerate()
        .filter(|(_, c)| !c.is_empty())
        .nth(flip % contents.len().max(1))
    else {
        return;
    };
    let mut bad = c.clone();
    let at = flip % bad.len();
    bad[at] ^= 1;
    let name = format!("f{i}.bin");
    std::fs::write(path.join(&name), &bad).unwrap_or_else(|e| panic!("{e}"));
    match checkpoint::verify(&path) {
        Ok(_) => panic!("a flipped byte in {name} went unnoticed"),
        Err(e) => {
            props::names_problem(&e, &[&name]);
        }
    }
}

/// The data loader's state file (`train_state.json`'s loader part). Properties: an accepted state
/// prints and parses back identical; a rejection says what is wrong.
pub fn loader_state(input: &[u8]) {
    let read = |bytes: &[u8]| LoaderState::from_json(&props::text(bytes));
    let print = |s: &LoaderState| Ok::<_, hq_train::TrainError>(s.to_json().into_bytes());
    props::read_print_read("loader state", input, read, print, &[]);
}
