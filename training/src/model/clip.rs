//! open_clip's `CLIP`: image tower under `visual.*`, text tower at the top level, `logit_scale`
//! and the optional `logit_bias`.

use std::borrow::Borrow;
use std::path::Path;

use tch::nn::{self, Init};
use tch::Tensor;

use crate::model::checkpoint::{load_named, read_safetensors, save_named};
use crate::model::config::ClipConfig;
use crate::model::layers::{l2_normalize, push, NamedTensors, Result};
use crate::model::resnet::{is_buffer, ModifiedResNet};
use crate::model::text::TextTransformer;
use crate::model::vision::VisionTransformer;

/// The image tower `visual.*`: open_clip's `VisionTransformer`, or its `ModifiedResNet` when
/// `vision_cfg.layers` is a list.
#[derive(Debug)]
pub enum ImageTower {
    Vit(VisionTransformer),
    ResNet(ModifiedResNet),
}

impl ImageTower {
    fn new(p: &nn::Path, cfg: &ClipConfig) -> Result<Self> {
        Ok(if cfg.vision_cfg.is_resnet() {
            ImageTower::ResNet(ModifiedResNet::new(p, cfg)?)
        } else {
            ImageTower::Vit(VisionTransformer::new(p, cfg)?)
        })
    }

    pub fn forward(&self, images: &Tensor) -> Result<Tensor> {
        match self {
            ImageTower::Vit(v) => v.forward(images),
            ImageTower::ResNet(r) => r.forward(images),
        }
    }

    pub fn state_dict_into(&self, prefix: &str, out: &mut NamedTensors) {
        match self {
            ImageTower::Vit(v) => v.state_dict_into(prefix, out),
            ImageTower::ResNet(r) => r.state_dict_into(prefix, out),
        }
    }
}

/// What [`Clip::forward`] returns, as open_clip's `CLIP.forward`.
#[derive(Debug)]
pub struct ClipOutput {
    /// L2-normalised image features `[N, embed_dim]`.
    pub image_features: Tensor,
    /// L2-normalised text features `[M, embed_dim]`.
    pub text_features: Tensor,
    /// `exp(logit_scale)`, the inverse temperature.
    pub logit_scale: Tensor,
    /// The learned bias, when the config has `init_logit_bias`.
    pub logit_bias: Option<Tensor>,
}

#[derive(Debug)]
pub struct Clip {
    pub visual: ImageTower,
    pub text: TextTransformer,
    /// log of the inverse temperature; scalar (or `[1]` with `nonscalar_logit_scale`).
    pub logit_scale: Tensor,
    pub logit_bias: Option<Tensor>,
    config: ClipConfig,
}

impl Clip {
    /// Builds the model under `p` (usually `vs.root()`, so that variable names are open_clip's
    /// state-dict keys), randomly initialised as open_clip initialises it; seed with
    /// `tch::manual_seed` first for a reproducible init.
    pub fn new<'a, P: Borrow<nn::Path<'a>>>(p: P, cfg: &ClipConfig) -> Result<Self> {
        cfg.validate()?;
        let p = p.borrow();
        let shape: &[i64] = if cfg.nonscalar_logit_scale { &[1] } else { &[] };
        let logit_scale = p.f_var("logit_scale", shape, Init::Const(cfg.logit_scale_init()))?;
        let logit_bias = match cfg.init_logit_bias {
            Some(b) => Some(p.f_var("logit_bias", shape, Init::Const(b))?),
            None => None,
        };
        Ok(Self {
            visual: ImageTower::new(&p.sub("visual"), cfg)?,
            text: TextTransformer::new(p, cfg)?,
            logit_scale,
            logit_bias,
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &ClipConfig {
        &self.config
    }

    /// Training or evaluation mode, as `nn.Module.train()` / `.eval()`. Only the ResNet's
    /// BatchNorm depends on it (no tower has dropout); a new model is in evaluation mode.
    pub fn set_training(&self, training: bool) {
        if let ImageTower::ResNet(r) = &self.visual {
            r.set_training(training);
        }
    }

    /// open_clip's `--lock-image-freeze-bn-stats`: the image tower's BatchNorm keeps its running
    /// statistics in training mode too (no effect on a ViT).
    pub fn freeze_image_bn_stats(&self, freeze: bool) {
        if let ImageTower::ResNet(r) = &self.visual {
            r.set_freeze_bn_stats(freeze);
        }
    }

    /// `images` `[N, 3, H, W]` (CLIP-normalised pixels at the configured size) -> unnormalised
    /// features `[N, embed_dim]`.
    pub fn encode_image(&self, images: &Tensor) -> Result<Tensor> {
        self.visual.forward(images)
    }

    /// `text` token ids `[N, context_length]` -> unnormalised features `[N, embed_dim]`.
    pub fn encode_text(&self, text: &Tensor) -> Result<Tensor> {
        self.text.forward(text)
    }

    /// [`Clip::encode_image`], L2-normalised when `normalize` is set (open_clip's flag).
    pub fn encode_image_with(&self, images: &Tensor, normalize: bool) -> Result<Tensor> {
        let f = self.encode_image(images)?;
        if normalize {
            l2_normalize(&f)
        } else {
            Ok(f)
        }
    }

    /// [`Clip::encode_text`], L2-normalised when `normalize` is set (open_clip's flag).
    pub fn encode_text_with(&self, text: &Tensor, normalize: bool) -> Result<Tensor> {
        let f = self.encode_text(text)?;
        if normalize {
            l2_normalize(&f)
        } else {
            Ok(f)
        }
    }

    /// Normalised features of both towers plus `exp(logit_scale)` (and `logit_bias`), as
    /// open_clip's `CLIP.forward`.
    pub fn forward(&self, images: &Tensor, text: &Tensor) -> Result<ClipOutput> {
        Ok(ClipOutput {
            image_features: self.encode_image_with(images, true)?,
            text_features: self.encode_text_with(text, true)?,
            logit_scale: self.logit_scale.f_exp()?,
            logit_bias: self.logit_bias.as_ref().map(Tensor::shallow_clone),
        })
    }

    /// `(logits_per_image [N, M], logits_per_text [M, N])`, as open_clip's `get_logits`.
    pub fn logits(&self, images: &Tensor, text: &Tensor) -> Result<(Tensor, Tensor)> {
        let out = self.forward(images, text)?;
        let mut per_image = out
            .image_features
            .f_matmul(&out.text_features.f_transpose(0, 1)?)?
            .f_mul(&out.logit_scale)?;
        if let Some(bias) = &out.logit_bias {
            per_image = per_image.f_add(bias)?;
        }
        let per_text = per_image.f_transpose(0, 1)?;
        Ok((per_image, per_text))
    }

    /// Clamps `logit_scale` in place to `[0, ln(max_scale)]`, as open_clip's training loop does
    /// after each step (with `max_scale = 100`).
    pub fn clamp_logit_scale(&self, max_scale: f64) -> Result<()> {
        tch::no_grad(|| -> Result<()> {
            let mut s = self.logit_scale.shallow_clone();
            let _ = s.f_clamp_(0.0, max_scale.ln())?;
            Ok(())
        })
    }

    /// The model's tensors under open_clip's state-dict names (shallow clones of the variables).
    pub fn state_dict(&self) -> NamedTensors {
        let mut out = Vec::new();
        push(&mut out, "", "logit_scale", &self.logit_scale);
        if let Some(b) = &self.logit_bias {
            push(&mut out, "", "logit_bias", b);
        }
        self.visual.state_dict_into("visual", &mut out);
        self.text.state_dict_into("", &mut out);
        out
    }

    /// The trainable tensors: the state dict without its buffers (BatchNorm statistics).
    pub fn parameters(&self) -> NamedTensors {
        self.state_dict()
            .into_iter()
            .filter(|(name, _)| !is_buffer(name))
            .collect()
    }

    /// The buffers: BatchNorm statistics (a ResNet's; a ViT has none). Saved and loaded with the
    /// weights, never optimised.
    pub fn buffers(&self) -> NamedTensors {
        self.state_dict()
            .into_iter()
            .filter(|(name, _)| is_buffer(name))
            .collect()
    }

    /// Number of scalar parameters (buffers not counted, as `sum(p.numel() for p in
    /// model.parameters())`).
    pub fn num_parameters(&self) -> i64 {
        self.parameters()
            .iter()
            .map(|(_, t)| t.numel() as i64)
            .sum()
    }

    /// Loads an open_clip-layout safetensors checkpoint (strict; see [`crate::model::checkpoint`]).
    pub fn load_safetensors(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let file = read_safetensors(path)?;
        load_named(&self.state_dict(), &file, path)
    }

    /// Saves the weights as safetensors with open_clip's state-dict names; open_clip loads them
    /// with `model.load_state_dict(safetensors.torch.load_file(path), strict=True)`.
    pub fn save_safetensors(&self, path: impl AsRef<Path>) -> Result<()> {
        save_named(&self.state_dict(), path)
    }
}

/// open_clip_train's weight-decay rule: no decay for tensors with fewer than 2 dimensions (biases,
/// LayerNorm, class embedding, logit scale/bias) and names containing `bn`, `ln`, `bias` or
/// `logit_scale`.
pub fn excluded_from_weight_decay(name: &str, tensor: &Tensor) -> bool {
    tensor.dim() < 2
        || name.contains("bn")
        || name.contains("ln")
        || name.contains("bias")
        || name.contains("logit_scale")
}
