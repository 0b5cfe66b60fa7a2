//! Parity of `hq_train::model::Clip` with open_clip 3.3's `CLIP`, both ways.
//!
//! For each config: `tests/python/model_openclip.py reference` random-initialises open_clip's model,
//! saves its state dict as safetensors, writes deterministic images and token ids (end token at
//! varied positions) and open_clip's outputs; we load that checkpoint and must reproduce the
//! outputs. Then we random-initialise our model (seeded), save it, the script loads it into
//! open_clip with `load_state_dict(strict=True)`, and both must agree on the same inputs.
//! Tolerance: 1e-4 absolute on every output.
//!
//! For the small configs open_clip's weights also come as its Hugging Face folder (a `torch.save`
//! `.bin`) and as an open_clip_train `.pt` checkpoint: the tensors read back bit for bit and the
//! folder loads with its own config.
//!
//! Configs: the `hq-tiny` preset file, a variant written by our serialiser that turns on
//! `quick_gelu` and the other optional features we implement, and the `ViT-B-32` preset (batch 2).
//! A last test reads every model config open_clip ships: each either parses or is refused with an
//! error naming the unsupported field.
//!
//! Python: `$HQ_PYTHON` (exported by `tools/env.sh`), else `<workspace>/.venv/bin/python`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use hq_tests::{python, workspace_root};
use hq_train::model::{Clip, ClipConfig};
use tch::nn::VarStore;
use tch::{Device, Tensor};

const TOLERANCE: f64 = 1e-4;

fn presets_dir() -> PathBuf {
    workspace_root().join("training/presets")
}

fn run_python(args: &[&std::ffi::OsStr]) -> String {
    let py = python();
    let script = workspace_root().join("tests/python/model_openclip.py");
    let out = Command::new(&py)
        .arg(&script)
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        Ok(o) => panic!(
            "{} {} {:?} failed ({}):\n{}\n{}",
            py.display(),
            script.display(),
            args,
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!(
            "cannot run {} (set HQ_PYTHON or run `source tools/env.sh`): {e}",
            py.display()
        ),
    }
}

fn read(path: &Path) -> BTreeMap<String, Tensor> {
    match Tensor::read_safetensors(path) {
        Ok(v) => v.into_iter().collect(),
        Err(e) => panic!("read {}: {e}", path.display()),
    }
}

/// Our outputs under the script's names.
fn our_outputs(model: &Clip, inputs: &BTreeMap<String, Tensor>) -> BTreeMap<String, Tensor> {
    let images = inputs.get("images").expect("inputs hold images");
    let text = inputs.get("text").expect("inputs hold text");
    tch::no_grad(|| {
        let mut out = BTreeMap::new();
        out.insert(
            "image_embeds".to_string(),
            model.encode_image(images).expect("encode_image"),
        );
        out.insert(
            "text_embeds".to_string(),
            model.encode_text(text).expect("encode_text"),
        );
        let f = model.forward(images, text).expect("forward");
        out.insert("image_features".to_string(), f.image_features);
        out.insert("text_features".to_string(), f.text_features);
        out.insert("logit_scale".to_string(), f.logit_scale);
        if let Some(b) = f.logit_bias {
            out.insert("logit_bias".to_string(), b);
        }
        let (per_image, _) = model.logits(images, text).expect("logits");
        out.insert("logits_per_image".to_string(), per_image);
        out
    })
}

/// Our text tower runs only the positions up to the batch's last end token (open_clip always runs
/// the full context); a batch holding a full-length row is not trimmed, so each row is also
/// encoded alone, trimmed to its own end token, and compared with open_clip's full-context
/// `text_embeds`. Returns the max abs difference.
fn trimmed_rows_diff(
    model: &Clip,
    inputs: &BTreeMap<String, Tensor>,
    reference: &BTreeMap<String, Tensor>,
) -> f64 {
    let text = inputs.get("text").expect("inputs hold text");
    let theirs = reference
        .get("text_embeds")
        .expect("reference holds text_embeds");
    let (n, ctx) = text.size2().expect("text is [N, L]");
    let mut worst = 0f64;
    let mut trimmed_rows = 0;
    for i in 0..n {
        let row = text.narrow(0, i, 1);
        let used = model.text.used_positions(&row).expect("used positions");
        trimmed_rows += usize::from(used < ctx);
        let ours = tch::no_grad(|| model.encode_text(&row)).expect("encode_text");
        let d = (ours - theirs.narrow(0, i, 1))
            .abs()
            .max()
            .double_value(&[]);
        worst = worst.max(d);
    }
    let t = &model.config().text_cfg;
    if t.no_causal_mask || t.pool_type == hq_train::model::TextPool::Last {
        return worst; // these configs never trim
    }
    assert!(
        trimmed_rows > 0,
        "no row was trimmed: the check tested nothing"
    );
    worst
}

/// Max abs difference per output; panics on a missing output or a shape mismatch.
fn compare(
    what: &str,
    ours: &BTreeMap<String, Tensor>,
    theirs: &BTreeMap<String, Tensor>,
) -> BTreeMap<String, f64> {
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        theirs.keys().collect::<Vec<_>>(),
        "{what}: different outputs"
    );
    let mut diffs = BTreeMap::new();
    for (name, a) in ours {
        let b = &theirs[name];
        assert_eq!(a.size(), b.size(), "{what}: {name} shapes differ");
        let d = (a - b).abs().max().double_value(&[]);
        diffs.insert(name.clone(), d);
    }
    diffs
}

fn max_of(diffs: &BTreeMap<String, f64>) -> f64 {
    diffs.values().cloned().fold(0.0, f64::max)
}

/// Runs both directions for a config file; returns (open_clip -> ours, ours -> open_clip) max
/// abs differences.
fn parity(config_path: &Path, batch: usize, seed: u64) -> (f64, f64) {
    let dir = tempfile::tempdir().expect("tempdir");
    parity_in(config_path, batch, seed, dir.path())
}

/// [`parity`] with open_clip's files (its checkpoint, HF folder `hf/`, inputs) left in `dir`.
fn parity_in(config_path: &Path, batch: usize, seed: u64, dir: &Path) -> (f64, f64) {
    let started = Instant::now();
    let name = config_path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let cfg = match ClipConfig::from_json_file(config_path) {
        Ok(c) => c,
        Err(e) => panic!("{name}: {e}"),
    };
    let batch_s = batch.to_string();
    let seed_s = seed.to_string();
    let msg = run_python(&[
        "reference".as_ref(),
        config_path.as_os_str(),
        dir.as_os_str(),
        "--seed".as_ref(),
        seed_s.as_ref(),
        "--batch".as_ref(),
        batch_s.as_ref(),
    ]);
    eprint!("{msg}");
    let inputs = read(&dir.join("inputs.safetensors"));
    let reference = read(&dir.join("reference.safetensors"));

    // open_clip checkpoint -> our model.
    tch::manual_seed(seed as i64 + 100);
    let vs = VarStore::new(Device::Cpu);
    let model = Clip::new(vs.root(), &cfg).expect("model");
    if let Err(e) = model.load_safetensors(dir.join("openclip.safetensors")) {
        panic!("{name}: loading open_clip's checkpoint: {e}");
    }
    let ours = our_outputs(&model, &inputs);
    let mut d1 = compare(&format!("{name} open_clip -> ours"), &ours, &reference);
    // The same weights from open_clip's HF folder (torch.save .bin, config from the folder) and
    // from an open_clip_train checkpoint (.pt, DDP prefixes): bit-identical tensors, and a model
    // loaded from the folder reproduces open_clip's outputs.
    // (Written for small models only, see the script.)
    if dir.join("epoch_1.pt").is_file() {
        let st = read(&dir.join("openclip.safetensors"));
        for file in ["hf/open_clip_pytorch_model.bin", "epoch_1.pt"] {
            let got = hq_train::checkpoint::read_weights(&dir.join(file))
                .unwrap_or_else(|e| panic!("{name}: {file}: {e}"));
            assert_eq!(got.len(), st.len(), "{name}: {file}");
            for (k, t) in &st {
                assert!(
                    got.get(k).is_some_and(|g| g.equal(t)),
                    "{name}: {file}: {k} differs"
                );
            }
        }
        let (_hf_vs, from_hf) = hq_train::checkpoint::load_clip(&dir.join("hf"), None, Device::Cpu)
            .unwrap_or_else(|e| panic!("{name}: the HF folder: {e}"));
        assert_eq!(from_hf.config(), &cfg, "{name}: the HF folder's config");
        let d_hf = compare(
            &format!("{name} open_clip HF folder -> ours"),
            &our_outputs(&from_hf, &inputs),
            &reference,
        );
        d1.insert("outputs, loaded from the HF folder".into(), max_of(&d_hf));
    }
    eprintln!("{name}: open_clip checkpoint in our model, max abs diff per output: {d1:?}");
    let trimmed = trimmed_rows_diff(&model, &inputs, &reference);
    eprintln!("{name}: each text row alone (trimmed to its end token) vs open_clip: {trimmed:.3e}");
    d1.insert("text_embeds (rows alone, trimmed)".into(), trimmed);
    drop(model);

    // Our random init -> open_clip.
    tch::manual_seed(seed as i64);
    let vs = VarStore::new(Device::Cpu);
    let model = Clip::new(vs.root(), &cfg).expect("model");
    let init_file = match dir.join("openclip_init.safetensors") {
        p if p.is_file() => p, // a ResNet: the reference's BatchNorm was randomised after init
        _ => dir.join("openclip.safetensors"),
    };
    check_init_statistics(&name, &model, &read(&init_file));
    if cfg.vision_cfg.is_resnet() {
        randomise_batch_norm(&model);
    }
    let ckpt = dir.join("ours.safetensors");
    model.save_safetensors(&ckpt).expect("save");
    let ours = our_outputs(&model, &inputs);
    let out = dir.join("check.safetensors");
    let msg = run_python(&[
        "check".as_ref(),
        config_path.as_os_str(),
        ckpt.as_os_str(),
        dir.join("inputs.safetensors").as_os_str(),
        out.as_os_str(),
    ]);
    eprint!("{msg}");
    let theirs = read(&out);
    let mut d2 = compare(&format!("{name} ours -> open_clip"), &ours, &theirs);
    if cfg.vision_cfg.is_resnet() {
        d2.extend(train_mode_diffs(config_path, &model, &ckpt, dir));
    }
    eprintln!("{name}: our checkpoint in open_clip, max abs diff per output: {d2:?}");
    eprintln!(
        "{name}: parity max abs diff {:.3e} (open_clip -> ours), {:.3e} (ours -> open_clip), {:.1} s",
        max_of(&d1),
        max_of(&d2),
        started.elapsed().as_secs_f64()
    );
    for (what, d) in [("open_clip -> ours", &d1), ("ours -> open_clip", &d2)] {
        for (output, diff) in d {
            assert!(
                *diff <= TOLERANCE,
                "{name} {what}: {output} differs by {diff:e} (> {TOLERANCE:e})"
            );
        }
    }
    (max_of(&d1), max_of(&d2))
}

/// BatchNorm weights, biases and statistics away from their init (weight 0 or 1, bias 0,
/// statistics 0 and 1), so that the parity covers every block and the statistics' use.
fn randomise_batch_norm(model: &Clip) {
    tch::no_grad(|| {
        for (name, mut t) in model.state_dict() {
            let n = t.size();
            let fresh = if name.ends_with(".running_var") {
                Tensor::rand(&n, (tch::Kind::Float, Device::Cpu)) + 0.5
            } else if name.ends_with(".running_mean") {
                Tensor::randn(&n, (tch::Kind::Float, Device::Cpu)) * 0.2
            } else if name.ends_with(".num_batches_tracked") {
                Tensor::from(17i64)
            } else if is_bn(&name) && name.ends_with(".weight") {
                Tensor::rand(&n, (tch::Kind::Float, Device::Cpu)) + 0.5
            } else if is_bn(&name) && name.ends_with(".bias") {
                Tensor::randn(&n, (tch::Kind::Float, Device::Cpu)) * 0.1
            } else {
                continue;
            };
            t.copy_(&fresh);
        }
    });
}

fn is_bn(name: &str) -> bool {
    name.contains(".bn") || name.contains(".downsample.1.")
}

/// ResNet only: one image forward in training mode, in open_clip and in our model from the same
/// checkpoint: the embeddings (normalised by batch statistics) and every BatchNorm buffer after
/// the update must agree. Returns the max abs difference per output.
fn train_mode_diffs(
    config_path: &Path,
    model: &Clip,
    ckpt: &Path,
    dir: &Path,
) -> BTreeMap<String, f64> {
    let inputs = dir.join("inputs.safetensors");
    let out = dir.join("train_mode.safetensors");
    let msg = run_python(&[
        "train-mode".as_ref(),
        config_path.as_os_str(),
        ckpt.as_os_str(),
        inputs.as_os_str(),
        out.as_os_str(),
    ]);
    eprint!("{msg}");
    let theirs = read(&out);
    let images = read(&inputs).remove("images").expect("images");
    model.set_training(true);
    let embeds = tch::no_grad(|| model.encode_image(&images)).expect("train-mode forward");
    model.set_training(false);
    let mut diffs = BTreeMap::new();
    let mut changed = 0;
    for (name, ours) in model.state_dict() {
        let Some(t) = theirs.get(&name) else { continue };
        if name.ends_with(".num_batches_tracked") {
            assert_eq!(ours.int64_value(&[]), t.int64_value(&[]), "{name}");
            assert_eq!(
                ours.int64_value(&[]),
                18,
                "{name}: one training forward counts one"
            );
            continue;
        }
        if name.contains(".running_") {
            changed += 1;
            let d = (&ours - t).abs().max().double_value(&[]);
            diffs.insert(format!("train mode: {name}"), d);
        }
    }
    assert!(changed > 0, "no BatchNorm statistics compared");
    let d = (embeds - &theirs["image_embeds"])
        .abs()
        .max()
        .double_value(&[]);
    diffs.insert("train mode: image_embeds".into(), d);
    diffs
}

/// Our random init follows open_clip's: per tensor, the same mean and spread (constants exactly,
/// random tensors of 1024+ values within sampling noise).
fn check_init_statistics(name: &str, model: &Clip, theirs: &BTreeMap<String, Tensor>) {
    for (key, ours) in model.state_dict() {
        let Some(t) = theirs.get(&key) else {
            panic!("{name}: {key} is not in open_clip's state dict");
        };
        let stats = |x: &Tensor| {
            let x = x.to_kind(tch::Kind::Double);
            (
                x.mean(None).double_value(&[]),
                x.std(false).double_value(&[]),
            )
        };
        let ((m1, s1), (m2, s2)) = (stats(&ours), stats(t));
        if t.numel() < 2 || s2 == 0.0 {
            assert!(
                (m1 - m2).abs() < 1e-6 && s1 < 1e-6,
                "{name}: {key} init: ours mean {m1} std {s1}, open_clip mean {m2} std {s2}"
            );
        } else if t.numel() >= 1024 {
            assert!(
                (s1 - s2).abs() <= 0.1 * s2 && (m1 - m2).abs() <= 0.15 * s2,
                "{name}: {key} init: ours mean {m1:.4e} std {s1:.4e}, open_clip mean {m2:.4e} std {s2:.4e}"
            );
        }
    }
}

#[test]
fn hq_tiny_matches_open_clip_both_ways() {
    parity(&presets_dir().join("hq-tiny.json"), 6, 11);
}

/// `quick_gelu` plus every optional feature we implement, in a config written by our serialiser
/// (so open_clip reading our JSON is tested too).
#[test]
fn quick_gelu_variant_matches_open_clip_both_ways() {
    let mut cfg = ClipConfig::hq_tiny();
    cfg.quick_gelu = true;
    cfg.init_logit_bias = Some(-10.0);
    cfg.init_logit_scale = Some(1.5);
    cfg.vision_cfg.layers = 2.into();
    cfg.vision_cfg.image_size = hq_train::model::Size2::HeightWidth([48, 64]);
    cfg.vision_cfg.mlp_ratio = 2.5;
    cfg.vision_cfg.ls_init_value = Some(0.5);
    cfg.vision_cfg.pool_type = hq_train::model::VisionPool::Avg;
    cfg.vision_cfg.final_ln_after_pool = true;
    cfg.text_cfg.layers = 2;
    cfg.text_cfg.context_length = 32;
    cfg.text_cfg.proj_bias = true;
    cfg.text_cfg.pool_type = hq_train::model::TextPool::Eos;
    cfg.text_cfg.eos_id = 49407;
    cfg.text_cfg.norm_kwargs = Some(hq_train::model::NormKwargs { eps: 1e-6 });
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hq-tiny-quickgelu-variant.json");
    cfg.write_json_file(&path).expect("write config");
    parity(&path, 5, 21);

    // The remaining options: no pre-LN, bidirectional text, tanh GELU, last-token pooling,
    // a [1]-shaped logit scale.
    let mut cfg = ClipConfig::hq_tiny();
    cfg.nonscalar_logit_scale = true;
    cfg.vision_cfg.layers = 1.into();
    cfg.vision_cfg.no_ln_pre = true;
    cfg.vision_cfg.act_kwargs = Some(hq_train::model::ActKwargs {
        approximate: "tanh".into(),
    });
    cfg.text_cfg.layers = 1;
    cfg.text_cfg.no_causal_mask = true;
    cfg.text_cfg.pool_type = hq_train::model::TextPool::Last;
    cfg.text_cfg.act_kwargs = Some(hq_train::model::ActKwargs {
        approximate: "tanh".into(),
    });
    let path = dir.path().join("hq-tiny-options-variant.json");
    cfg.write_json_file(&path).expect("write config");
    parity(&path, 3, 31);
}

/// open_clip's ModifiedResNet image tower (the RN50 family) at a CPU size: four stages of
/// `[1, 2, 1, 1]` bottleneck blocks of width 16, 64 px, an 8-head attention pool; the config is
/// written by our serialiser and read by open_clip. Both ways in evaluation mode, plus one
/// training-mode forward (batch statistics, updated buffers).
#[test]
fn modified_resnet_matches_open_clip_both_ways() {
    let cfg = ClipConfig::from_json_str(
        r#"{"embed_dim": 64,
            "vision_cfg": {"image_size": 64, "layers": [1, 2, 1, 1], "width": 16, "head_width": 64,
                           "patch_size": null},
            "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 64, "heads": 2,
                         "layers": 1}}"#,
    )
    .expect("ResNet config");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hq-rn-test.json");
    cfg.write_json_file(&path).expect("write config");
    let (a, b) = parity(&path, 4, 11);
    assert!(a <= TOLERANCE && b <= TOLERANCE);
}

#[test]
fn vit_b_32_matches_open_clip_both_ways() {
    parity(&presets_dir().join("ViT-B-32.json"), 2, 41);
}

/// Every config open_clip ships either parses (all plain ViT CLIPs must) or is refused with an
/// error naming the field that asks for an unsupported feature.
/// `--lock-image` / `--lock-text` with k unlocked groups leave trainable exactly the parameters
/// open_clip's `lock_image_tower(unlocked_groups=k)` / `lock_text_tower(unlocked_layers=k)` do.
#[test]
fn tower_locks_match_open_clip() {
    use hq_train::model::lock::{is_frozen, TowerLocks};
    let config = presets_dir().join("hq-tiny.json");
    let out = run_python(&["locks".as_ref(), config.as_os_str()]);
    let theirs: serde_json::Value =
        serde_json::from_str(out.lines().last().unwrap_or("{}")).expect("json");
    let cfg = ClipConfig::from_json_file(&config).expect("config");
    let vs = VarStore::new(Device::Cpu);
    let model = Clip::new(vs.root(), &cfg).expect("model");
    let names: Vec<String> = model.state_dict().into_iter().map(|(n, _)| n).collect();
    for k in 0..8usize {
        for (tower, locks) in [
            (
                "image",
                TowerLocks {
                    image: Some(k),
                    text: None,
                },
            ),
            (
                "text",
                TowerLocks {
                    image: None,
                    text: Some(k),
                },
            ),
        ] {
            let mut ours: Vec<&str> = names
                .iter()
                .filter(|n| !is_frozen(n, &cfg, &locks))
                .map(String::as_str)
                .collect();
            ours.sort_unstable();
            let want: Vec<&str> = theirs[tower][k.to_string()]
                .as_array()
                .expect("names")
                .iter()
                .filter_map(|v| v.as_str())
                .collect();
            assert_eq!(ours, want, "{tower} tower, {k} unlocked groups");
        }
    }
}

#[test]
fn open_clip_model_configs_parse_or_name_the_unsupported_field() {
    let dir = run_python_inline(
        "import open_clip, os; print(os.path.join(os.path.dirname(open_clip.__file__), 'model_configs'))",
    );
    let dir = PathBuf::from(dir.trim());
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect(),
        Err(e) => panic!("read {}: {e}", dir.display()),
    };
    files.sort();
    assert!(
        files.len() > 100,
        "only {} configs in {}",
        files.len(),
        dir.display()
    );
    let mut parsed = Vec::new();
    let mut refused: BTreeMap<String, usize> = BTreeMap::new();
    for f in &files {
        let name = f
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        match ClipConfig::from_json_file(f) {
            Ok(_) => parsed.push(name),
            Err(e) => {
                let msg = e.to_string();
                let field = msg
                    .split('`')
                    .nth(1)
                    .unwrap_or_else(|| panic!("{name}: error names no field: {msg}"))
                    .to_string();
                assert!(
                    msg.contains("not supported"),
                    "{name}: refused for another reason than an unsupported feature: {msg}"
                );
                *refused.entry(field).or_default() += 1;
            }
        }
    }
    eprintln!(
        "{} of {} open_clip configs parse; refused by field: {refused:?}",
        parsed.len(),
        files.len()
    );
    for must in [
        "ViT-B-32",
        "ViT-B-32-quickgelu",
        "ViT-B-16",
        "ViT-B-16-plus-240",
        "ViT-L-14",
        "ViT-L-14-336",
        "ViT-H-14",
        "ViT-g-14",
        "ViT-bigG-14",
        "ViT-M-16-alt",
        "ViT-H-14-CLIPA",
    ] {
        assert!(parsed.iter().any(|p| p == must), "{must} does not parse");
    }
    // Our presets equal open_clip's configs of the same name.
    for name in [
        "ViT-B-32",
        "ViT-B-16",
        "ViT-L-14",
        "ViT-L-14-quickgelu",
        "ViT-L-14-CLIPA",
    ] {
        let theirs = ClipConfig::from_json_file(dir.join(format!("{name}.json"))).expect("parses");
        assert_eq!(ClipConfig::preset(name).expect("preset"), theirs, "{name}");
    }
}

fn run_python_inline(code: &str) -> String {
    let py = python();
    match Command::new(&py)
        .args(["-c", code])
        .env("HF_HUB_OFFLINE", "1")
        .output()
    {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        Ok(o) => panic!(
            "{} -c failed: {}",
            py.display(),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!(
            "cannot run {} (set HQ_PYTHON or run `source tools/env.sh`): {e}",
            py.display()
        ),
    }
}

/// `cfg` shrunk to test size, keeping what makes its family (patch size, activation, pooling,
/// pre-LN, causal mask, tokenizer settings).
fn scaled_down(mut cfg: ClipConfig, image_size: i64) -> ClipConfig {
    cfg.embed_dim = 32;
    let v = &mut cfg.vision_cfg;
    v.image_size = hq_train::model::Size2::Square(image_size);
    v.width = 64;
    v.layers = 2.into();
    v.head_width = 32;
    let t = &mut cfg.text_cfg;
    t.width = 64;
    t.heads = 2;
    t.layers = 2;
    cfg
}

/// The families of the three HQ-CLIP releases (ViT-B-16; OpenAI's ViT-L-14 with QuickGELU;
/// ViT-L-14-CLIPA with its WordPiece tokenizer), each scaled down: an open_clip model of the
/// family, random-initialised in the venv and saved as safetensors, as its HF folder (torch.save
/// `.bin`) and as an open_clip_train `.pt`, gives the same embeddings in our model (and ours in
/// open_clip) to 1e-4; then a fine-tuning run starts from the HF folder. For CLIPA the folder
/// carries a WordPiece `tokenizer.json` (built by transformers): the run tokenizes with it (CLIP
/// BPE ids would not even fit the 300-id vocabulary) and its checkpoint carries it on.
#[test]
fn release_families_match_open_clip_and_fine_tune_from_their_folders() {
    let work = tempfile::tempdir().expect("tempdir");
    let work = work.path();
    let wordpiece = work.join("wordpiece");
    hq_tests::run_python_script(
        &python(),
        "hf_tokenizer_reference.py",
        ["make".as_ref(), wordpiece.as_os_str()],
    );
    let corpus = hq_train::testing::tiny_corpus(&work.join("corpus"));

    let mut clipa = scaled_down(ClipConfig::vit_l_14_clipa(), 28);
    clipa.text_cfg.vocab_size = 300;
    let families = [
        ("ViT-B-16", scaled_down(ClipConfig::vit_b_16(), 32)),
        (
            "ViT-L-14-quickgelu",
            scaled_down(ClipConfig::vit_l_14_quickgelu(), 28),
        ),
        ("ViT-L-14-CLIPA", clipa),
    ];
    for (i, (family, cfg)) in families.into_iter().enumerate() {
        let dir = work.join(family);
        std::fs::create_dir_all(&dir).expect("mkdir");
        // open_clip registers a config under its file stem: one name per family.
        let config = dir.join(format!("{family}-scaled.json"));
        cfg.write_json_file(&config).expect("config");
        let (d1, d2) = parity_in(&config, 3, 50 + i as u64, &dir);
        eprintln!("{family} (scaled down): parity {d1:.2e} / {d2:.2e}");

        let hf = dir.join("hf");
        let uses_wordpiece = cfg.text_cfg.hf_tokenizer_name.is_some();
        let mut preprocess = hq_data::transform::Preprocess::default();
        if uses_wordpiece {
            for f in hq_data::text::hf_tokenizer::TOKENIZER_FILES {
                if wordpiece.join(f).is_file() {
                    std::fs::copy(wordpiece.join(f), hf.join(f)).expect("copy tokenizer");
                }
            }
            // CLIPA's own preprocessing: mean and std 0.5, squash resize.
            preprocess = hq_data::transform::Preprocess {
                mean: [0.5; 3],
                std: [0.5; 3],
                squash: true,
            };
            let file = hf.join("open_clip_config.json");
            let mut folder_cfg: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&file).expect("read")).expect("json");
            folder_cfg["preprocess_cfg"] = preprocess.to_open_clip();
            std::fs::write(&file, folder_cfg.to_string()).expect("write");
        }
        let run_dir = dir.join("fine-tune");
        let mut c = hq_train::config::TrainConfig::default();
        c.model.pretrained = Some(hf.clone());
        c.data.train = vec![corpus.display().to_string()];
        c.data.shuffle_buffer = 16;
        c.data.threads = 1;
        c.optim.lr = 1e-4;
        c.optim.warmup_steps = 0;
        c.run.steps = 3;
        c.run.batch_size = 8;
        c.run.device = "cpu".into();
        c.run.out_dir = Some(run_dir.clone());
        c.run.log_every = 1;
        let summary = hq_train::run(&hq_train::RunRequest {
            config: c,
            resume: None,
            stop_after: None,
            verbose: false,
        })
        .unwrap_or_else(|e| panic!("{family}: fine-tuning from {}: {e}", hf.display()));
        assert_eq!(summary.steps.len(), 3, "{family}");
        assert!(
            summary.steps.iter().all(|s| s.loss.is_finite()),
            "{family}: {:?}",
            summary.steps
        );
        let ckpt = summary.last_checkpoint.expect("a final checkpoint");
        assert_eq!(
            ckpt.join("tokenizer.json").is_file(),
            uses_wordpiece,
            "{family}: the checkpoint carries the tokenizer exactly when the model reads one"
        );
        // The checkpoint alone evaluates with the right tokenizer and preprocessing, and so does
        // its ONNX export.
        use hq_eval::Encoder;
        let size = cfg.vision_cfg.image_size.height() as u32;
        let want = transformed(&preprocess.eval_transform(size));
        let enc = hq_train::TchEncoder::from_checkpoint(&ckpt, None, Device::Cpu)
            .unwrap_or_else(|e| panic!("{family}: {e}"));
        assert_eq!(enc.text_tokenizer().is_some(), uses_wordpiece, "{family}");
        assert!(
            transformed(&enc.image_transform()) == want,
            "{family}: tch preprocessing"
        );
        let onnx = dir.join("onnx");
        let source = hq_train::checkpoint::weights_source(&ckpt).expect("source");
        hq_export::formats::copy_tokenizer(&cfg, &ckpt, &onnx).expect("tokenizer");
        let opts = hq_export::clip::ExportOptions {
            preprocess: source
                .preprocess
                .expect("the checkpoint states its preprocessing"),
            ..Default::default()
        };
        let weights = hq_export::checkpoint::Checkpoint::read(&source.weights).expect("read");
        hq_export::clip::export_onnx(&cfg, &weights, &opts, &onnx).expect("export");
        let enc = hq_runtime::clip_encoder::OnnxClipEncoder::load(
            &onnx,
            &hq_runtime::ExecutionProvider::Cpu,
            &Default::default(),
        )
        .unwrap_or_else(|e| panic!("{family}: {e}"));
        assert_eq!(enc.text_tokenizer().is_some(), uses_wordpiece, "{family}");
        assert!(
            transformed(&enc.image_transform()) == want,
            "{family}: ONNX preprocessing"
        );
    }
}

/// `t` applied to a fixed non-square image: two transforms that agree here resize, crop and
/// normalise alike.
fn transformed(t: &hq_data::transform::ImageTransform) -> Vec<f32> {
    use rand::SeedableRng;
    let img = image::RgbImage::from_fn(45, 27, |x, y| {
        image::Rgb([(x * 5) as u8, (y * 9) as u8, ((x * y) % 251) as u8])
    });
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    t.apply(&image::DynamicImage::ImageRgb8(img), &mut rng)
}
