//! CLIP with open_clip's architecture, parameter names and shapes, in tch.
//!
//! - [`config`]: [`ClipConfig`], open_clip's model-config JSON, with named presets (`hq-tiny`,
//!   `hq-small`, `ViT-B-32`, `ViT-B-16`, `ViT-L-14`; the same values as `training/presets/*.json`,
//!   which `open_clip.add_model_config` reads).
//! - [`layers`]: LayerNorm, Linear, attention, MLP, residual block, transformer.
//! - [`vision`]: the ViT image tower (`visual.*`).
//! - [`resnet`]: the ModifiedResNet image tower (`visual.*`, the RN50 family), with BatchNorm
//!   buffers and a training / evaluation mode.
//! - [`text`]: the text tower (top-level `token_embedding`, `transformer`, ...).
//! - [`clip`]: [`Clip`], both towers plus `logit_scale` / `logit_bias`.
//! - [`stc`]: [`StcHead`], the short-tag classifier on the image embedding (kept apart from the
//!   open_clip tensors).
//! - [`checkpoint`]: strict safetensors load/save under open_clip's state-dict names, so an
//!   open_clip checkpoint loads here and ours loads into open_clip with `strict=True`.
//!
//! ```no_run
//! use hq_train::model::{Clip, ClipConfig};
//! # fn main() -> Result<(), hq_train::TrainError> {
//! let vs = tch::nn::VarStore::new(tch::Device::Cpu);
//! let model = Clip::new(vs.root(), &ClipConfig::hq_tiny())?;
//! model.load_safetensors("open_clip_model.safetensors")?;
//! let images = tch::Tensor::zeros([2, 3, 64, 64], (tch::Kind::Float, tch::Device::Cpu));
//! let text = tch::Tensor::zeros([2, 77], (tch::Kind::Int64, tch::Device::Cpu));
//! let out = tch::no_grad(|| model.forward(&images, &text))?;
//! # let _ = out; Ok(()) }
//! ```

pub mod checkpoint;
pub mod clip;
pub mod config;
pub mod layers;
pub mod lock;
pub mod resnet;
pub mod stc;
pub mod text;
pub mod torch_pickle;
pub mod vision;

pub use clip::{excluded_from_weight_decay, Clip, ClipOutput, ImageTower};
pub use config::{
    ActKwargs, ClipConfig, NormKwargs, Size2, TextConfig, TextPool, TextProjType, VisionConfig,
    VisionLayers, VisionPool, PRESET_NAMES,
};
pub use layers::{l2_normalize, NamedTensors};
pub use stc::StcHead;
pub use text::LengthGroup;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TrainError;
    use tch::{nn::VarStore, Device, Kind, Tensor};

    fn tiny_variant() -> ClipConfig {
        let mut cfg = ClipConfig::hq_tiny();
        cfg.vision_cfg.layers = 1.into();
        cfg.text_cfg.layers = 1;
        cfg.text_cfg.vocab_size = 1000;
        cfg.text_cfg.context_length = 16;
        cfg
    }

    #[test]
    fn state_dict_names_are_the_var_store_names() {
        for cfg in [ClipConfig::hq_tiny(), {
            let mut c = tiny_variant();
            c.init_logit_bias = Some(-10.0);
            c.vision_cfg.ls_init_value = Some(0.1);
            c.vision_cfg.no_ln_pre = true;
            c.text_cfg.proj_bias = true;
            c
        }] {
            let vs = VarStore::new(Device::Cpu);
            let model = Clip::new(vs.root(), &cfg).expect("model");
            let mut ours: Vec<(String, Vec<i64>)> = model
                .state_dict()
                .iter()
                .map(|(n, t)| (n.clone(), t.size()))
                .collect();
            let mut theirs: Vec<(String, Vec<i64>)> = vs
                .variables()
                .iter()
                .map(|(n, t)| (n.clone(), t.size()))
                .collect();
            ours.sort();
            theirs.sort();
            assert_eq!(ours, theirs);
        }
        let vs = VarStore::new(Device::Cpu);
        let model = Clip::new(vs.root(), &ClipConfig::hq_tiny()).expect("model");
        let names: Vec<String> = model.state_dict().into_iter().map(|(n, _)| n).collect();
        for key in [
            "visual.conv1.weight",
            "visual.class_embedding",
            "visual.positional_embedding",
            "visual.ln_pre.weight",
            "visual.transformer.resblocks.3.attn.in_proj_weight",
            "visual.transformer.resblocks.0.attn.out_proj.bias",
            "visual.transformer.resblocks.0.mlp.c_fc.weight",
            "visual.ln_post.bias",
            "visual.proj",
            "token_embedding.weight",
            "positional_embedding",
            "transformer.resblocks.0.ln_1.weight",
            "transformer.resblocks.3.mlp.c_proj.bias",
            "ln_final.weight",
            "text_projection",
            "logit_scale",
        ] {
            assert!(names.iter().any(|n| n == key), "missing {key}");
        }
        assert!(!names
            .iter()
            .any(|n| n == "logit_bias" || n.contains("conv1.bias")));
        let scale = model.logit_scale.double_value(&[]);
        assert!((scale - (1.0f64 / 0.07).ln()).abs() < 1e-6);
        assert_eq!(model.logit_scale.dim(), 0);
    }

    #[test]
    fn forward_shapes_and_normalisation() {
        tch::manual_seed(7);
        let cfg = tiny_variant();
        let vs = VarStore::new(Device::Cpu);
        let model = Clip::new(vs.root(), &cfg).expect("model");
        let images = Tensor::randn([3, 3, 64, 64], (Kind::Float, Device::Cpu));
        let text = Tensor::randint(999, [2, 16], (Kind::Int64, Device::Cpu));
        let out = tch::no_grad(|| model.forward(&images, &text)).expect("forward");
        assert_eq!(out.image_features.size(), vec![3, 128]);
        assert_eq!(out.text_features.size(), vec![2, 128]);
        let norms = out
            .text_features
            .norm_scalaropt_dim(2, [-1i64].as_slice(), false);
        assert!((norms - 1.0).abs().max().double_value(&[]) < 1e-5);
        let (per_image, per_text) = tch::no_grad(|| model.logits(&images, &text)).expect("logits");
        assert_eq!(
            (per_image.size(), per_text.size()),
            (vec![3, 2], vec![2, 3])
        );
        // Shorter sequences than the context are fine.
        let short = text.narrow(1, 0, 8);
        let a = tch::no_grad(|| model.encode_text(&short)).expect("short");
        assert_eq!(a.size(), vec![2, 128]);
        // The causal mask makes the pooled (end) token independent of what follows it.
        let with_end = text.copy();
        let _ = with_end.narrow(1, 5, 1).fill_(999);
        let changed_tail = with_end.copy();
        let _ = changed_tail.narrow(1, 10, 6).fill_(3);
        let b = tch::no_grad(|| model.encode_text(&with_end)).expect("b");
        let c = tch::no_grad(|| model.encode_text(&changed_tail)).expect("c");
        let diff = (b - c).abs().max().double_value(&[]);
        assert!(diff < 1e-6, "{diff}");
        model.clamp_logit_scale(100.0).expect("clamp");
        assert!(model.num_parameters() > 0);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let cfg = tiny_variant();
        let vs = VarStore::new(Device::Cpu);
        let model = Clip::new(vs.root(), &cfg).expect("model");
        let wrong_size = Tensor::zeros([1, 3, 32, 32], (Kind::Float, Device::Cpu));
        let err = model.encode_image(&wrong_size).expect_err("size");
        assert!(matches!(err, TrainError::ModelInput { .. }), "{err}");
        assert!(err.to_string().contains("[N, 3, 64, 64]"), "{err}");
        let too_long = Tensor::zeros([1, 17], (Kind::Int64, Device::Cpu));
        assert!(model.encode_text(&too_long).is_err());
        let out_of_vocab = Tensor::full([1, 4], 1000, (Kind::Int64, Device::Cpu));
        let err = model.encode_text(&out_of_vocab).expect_err("vocab");
        assert!(err.to_string().contains("[0, 1000)"), "{err}");
        let floats = Tensor::zeros([1, 4], (Kind::Float, Device::Cpu));
        assert!(model.encode_text(&floats).is_err());
        let mut bad = tiny_variant();
        bad.text_cfg.heads = 3;
        let vs = VarStore::new(Device::Cpu);
        let err = Clip::new(vs.root(), &bad).expect_err("heads");
        assert!(err.to_string().contains("`text_cfg.heads`"), "{err}");
    }

    #[test]
    fn checkpoint_round_trip_and_mismatch_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = tiny_variant();
        tch::manual_seed(1);
        let vs_a = VarStore::new(Device::Cpu);
        let a = Clip::new(vs_a.root(), &cfg).expect("a");
        let path = dir.path().join("a.safetensors");
        a.save_safetensors(&path).expect("save");

        tch::manual_seed(2);
        let vs_b = VarStore::new(Device::Cpu);
        let b = Clip::new(vs_b.root(), &cfg).expect("b");
        b.load_safetensors(&path).expect("load");
        for ((na, ta), (nb, tb)) in a.state_dict().iter().zip(b.state_dict().iter()) {
            assert_eq!(na, nb);
            assert!(ta.equal(tb), "{na} differs after loading");
        }

        // A checkpoint with a tensor missing, an extra one and a misshaped one: one error that
        // names all three.
        let mut tensors: Vec<(String, Tensor)> = a
            .state_dict()
            .into_iter()
            .filter(|(n, _)| n != "visual.ln_post.bias")
            .map(|(n, t)| {
                if n == "text_projection" {
                    (n, Tensor::zeros([128, 64], (Kind::Float, Device::Cpu)))
                } else {
                    (n, t)
                }
            })
            .collect();
        tensors.push((
            "visual.attnpool.weight".into(),
            Tensor::zeros([2], (Kind::Float, Device::Cpu)),
        ));
        let bad = dir.path().join("bad.safetensors");
        Tensor::write_safetensors(&tensors, &bad).expect("write");
        let err = b.load_safetensors(&bad).expect_err("mismatch").to_string();
        for needle in [
            "1 missing: visual.ln_post.bias",
            "1 unexpected: visual.attnpool.weight",
            "text_projection (checkpoint [128, 64], model [128, 128])",
        ] {
            assert!(err.contains(needle), "{needle:?} not in {err}");
        }

        // A DDP-prefixed checkpoint loads; a missing file is an error naming it.
        let prefixed: Vec<(String, Tensor)> = a
            .state_dict()
            .into_iter()
            .map(|(n, t)| (format!("module.{n}"), t))
            .collect();
        let ddp = dir.path().join("ddp.safetensors");
        Tensor::write_safetensors(&prefixed, &ddp).expect("write");
        b.load_safetensors(&ddp).expect("ddp load");
        let err = b
            .load_safetensors(dir.path().join("nope.safetensors"))
            .expect_err("missing");
        assert!(err.to_string().contains("nope.safetensors"), "{err}");
    }

    #[test]
    fn every_parameter_gets_a_gradient() {
        tch::manual_seed(3);
        let mut cfg = tiny_variant();
        cfg.init_logit_bias = Some(-1.0);
        let vs = VarStore::new(Device::Cpu);
        let model = Clip::new(vs.root(), &cfg).expect("model");
        let images = Tensor::randn([4, 3, 64, 64], (Kind::Float, Device::Cpu));
        let text = Tensor::randint(900, [4, 16], (Kind::Int64, Device::Cpu));
        let _ = text.narrow(1, 9, 1).fill_(999);
        let (per_image, per_text) = model.logits(&images, &text).expect("logits");
        let labels = Tensor::arange(4, (Kind::Int64, Device::Cpu));
        let loss = (per_image.cross_entropy_for_logits(&labels)
            + per_text.cross_entropy_for_logits(&labels))
            / 2.0;
        loss.backward();
        for (name, t) in model.state_dict() {
            let g = t.grad();
            assert!(g.defined(), "{name} has no gradient");
            // A constant added to every logit does not change a softmax: logit_bias only gets a
            // gradient from a sigmoid loss.
            if name != "token_embedding.weight" && name != "logit_bias" {
                assert!(
                    g.abs().sum(Kind::Double).double_value(&[]) > 0.0,
                    "{name}: zero gradient"
                );
            }
        }
    }

    /// On a machine with a GPU: the same weights give the same features on CUDA as on the CPU
    /// (TF32 convolutions allowed), and a backward pass runs there.
    #[test]
    fn cuda_matches_cpu_when_available() {
        if !tch::Cuda::is_available() {
            eprintln!("no CUDA device: skipped");
            return;
        }
        let cfg = tiny_variant();
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w.safetensors");
        tch::manual_seed(5);
        let vs_cpu = VarStore::new(Device::Cpu);
        let cpu = Clip::new(vs_cpu.root(), &cfg).expect("cpu model");
        cpu.save_safetensors(&path).expect("save");
        let vs_gpu = VarStore::new(Device::Cuda(0));
        let gpu = Clip::new(vs_gpu.root(), &cfg).expect("gpu model");
        gpu.load_safetensors(&path).expect("load on cuda");
        let images = Tensor::randn([2, 3, 64, 64], (Kind::Float, Device::Cpu));
        let text = Tensor::randint(900, [2, 16], (Kind::Int64, Device::Cpu));
        let _ = text.narrow(1, 7, 1).fill_(999);
        let a = tch::no_grad(|| cpu.forward(&images, &text)).expect("cpu forward");
        let gi = images.to_device(Device::Cuda(0));
        let gt = text.to_device(Device::Cuda(0));
        let b = tch::no_grad(|| gpu.forward(&gi, &gt)).expect("gpu forward");
        for (x, y) in [
            (&a.image_features, &b.image_features),
            (&a.text_features, &b.text_features),
        ] {
            let d = (x - y.to_device(Device::Cpu)).abs().max().double_value(&[]);
            assert!(d < 1e-2, "cpu/cuda differ by {d}");
        }
        let (per_image, _) = gpu.logits(&gi, &gt).expect("logits");
        per_image.sum(Kind::Float).backward();
        match &gpu.visual {
            ImageTower::Vit(v) => assert!(v.conv1.grad().defined()),
            ImageTower::ResNet(_) => unreachable!("a ViT config"),
        }
        // A checkpoint saved from the GPU reads back on the CPU.
        gpu.save_safetensors(&path).expect("save from cuda");
        cpu.load_safetensors(&path).expect("load on cpu");
    }

    #[test]
    fn weight_decay_rule() {
        let vs = VarStore::new(Device::Cpu);
        let model = Clip::new(vs.root(), &tiny_variant()).expect("model");
        let sd = model.state_dict();
        let decayed: Vec<&str> = sd
            .iter()
            .filter(|(n, t)| !excluded_from_weight_decay(n, t))
            .map(|(n, _)| n.as_str())
            .collect();
        assert!(decayed.contains(&"visual.conv1.weight"));
        assert!(decayed.contains(&"text_projection"));
        assert!(!decayed.contains(&"logit_scale"));
        assert!(!decayed.contains(&"visual.class_embedding"));
        assert!(!decayed
            .iter()
            .any(|n| n.contains("ln_") || n.ends_with("bias")));
    }
}
