//! The ResNet image tower: open_clip's `ModifiedResNet` (OpenAI's RN50 family) under `visual.*`.
//!
//! - stem: three 3x3 convolutions (the first with stride 2; widths `width/2, width/2, width`),
//!   each with BatchNorm and ReLU, then a 2x2 average pool;
//! - four stages `layer1..layer4` of `Bottleneck` blocks (1x1, 3x3, 1x1 convolutions, 4x
//!   expansion). A stride-2 block downsamples by an average pool after its 3x3 convolution, and its
//!   shortcut (`downsample`) by an average pool before a 1x1 convolution ("anti-aliased" strides:
//!   every convolution has stride 1);
//! - `attnpool`: multi-head attention over the 7x7 (image_size / 32) feature map plus its mean as
//!   the query token, with a learned positional embedding; the query token's output, through
//!   `c_proj`, is the embedding.
//!
//! Unlike the ViT the tower has state besides parameters: each BatchNorm keeps `running_mean`,
//! `running_var` and `num_batches_tracked` buffers. They are part of the state dict (open_clip's
//! names, `num_batches_tracked` as int64) but never of the optimizer, and the tower has a mode
//! like a `torch.nn.Module`: in training mode BatchNorm normalises with the batch's statistics and
//! updates the buffers (momentum 0.1, unbiased variance, as PyTorch); in evaluation mode it uses
//! the buffers. A new tower starts in evaluation mode (the encoders never change it); the training
//! loop switches it to training mode and back around its evaluations. With
//! `freeze_bn_stats` (open_clip's `--lock-image-freeze-bn-stats`) BatchNorm always uses the buffers.
//!
//! The attention pool computes only the query token's output: open_clip computes every position
//! and keeps `x[0]`, which depends on the first query alone, so this is the same function with
//! fewer operations (results equal to float rounding; the ONNX export does the same).

use std::cell::Cell;

use tch::nn::{self, Init};
use tch::{Kind, Tensor};

use crate::error::TrainError;
use crate::model::config::ClipConfig;
use crate::model::layers::{float_kind_of, join, normal, push, torch_default_uniform, Result};
use crate::model::NamedTensors;

/// PyTorch's `BatchNorm2d` defaults.
const BN_EPS: f64 = 1e-5;
const BN_MOMENTUM: f64 = 0.1;
/// Channel expansion of a bottleneck block's last convolution.
const EXPANSION: i64 = 4;

/// `nn.BatchNorm2d` (affine, tracking running statistics).
#[derive(Debug)]
pub struct BatchNorm2d {
    pub weight: Tensor,
    pub bias: Tensor,
    pub running_mean: Tensor,
    pub running_var: Tensor,
    pub num_batches_tracked: Tensor,
}

impl BatchNorm2d {
    fn new(p: &nn::Path, channels: i64, zero_weight: bool) -> Result<Self> {
        let weight_init = if zero_weight {
            Init::Const(0.0)
        } else {
            Init::Const(1.0)
        };
        Ok(Self {
            weight: p.f_var("weight", &[channels], weight_init)?,
            bias: p.f_var("bias", &[channels], Init::Const(0.0))?,
            running_mean: p.f_zeros_no_train("running_mean", &[channels])?,
            running_var: p.f_ones_no_train("running_var", &[channels])?,
            num_batches_tracked: Tensor::f_zeros([], (Kind::Int64, p.device()))?,
        })
    }

    /// Normalises `x` `[N, C, H, W]`; with `training`, by the batch's statistics, updating the
    /// running ones in place (libtorch's `batch_norm` does the update, as `nn.BatchNorm2d`).
    fn forward(&self, x: &Tensor, training: bool) -> Result<Tensor> {
        let kind = x.kind();
        let y = x.f_batch_norm(
            Some(&self.weight.f_to_kind(kind)?),
            Some(&self.bias.f_to_kind(kind)?),
            Some(&self.running_mean),
            Some(&self.running_var),
            training,
            BN_MOMENTUM,
            BN_EPS,
            false,
        )?;
        if training {
            tch::no_grad(|| -> Result<()> {
                let mut n = self.num_batches_tracked.shallow_clone();
                let _ = n.f_add_scalar_(1)?;
                Ok(())
            })?;
        }
        Ok(y)
    }

    fn state_dict_into(&self, prefix: &str, out: &mut NamedTensors) {
        push(out, prefix, "weight", &self.weight);
        push(out, prefix, "bias", &self.bias);
        push(out, prefix, "running_mean", &self.running_mean);
        push(out, prefix, "running_var", &self.running_var);
        push(
            out,
            prefix,
            "num_batches_tracked",
            &self.num_batches_tracked,
        );
    }
}

/// A bias-free `nn.Conv2d` weight `[out, in, k, k]` with PyTorch's default init.
fn conv_weight(p: &nn::Path, name: &str, out: i64, inp: i64, k: i64) -> Result<Tensor> {
    Ok(p.sub(name).f_var(
        "weight",
        &[out, inp, k, k],
        torch_default_uniform(inp * k * k),
    )?)
}

fn conv(x: &Tensor, w: &Tensor, stride: i64, padding: i64) -> Result<Tensor> {
    Ok(x.f_conv2d(
        &w.f_to_kind(x.kind())?,
        None::<Tensor>,
        [stride, stride],
        [padding, padding],
        [1i64, 1],
        1,
    )?)
}

/// `nn.AvgPool2d(k)`: kernel and stride `k`, no padding, floor.
fn avg_pool(x: &Tensor, k: i64) -> Result<Tensor> {
    Ok(x.f_avg_pool2d([k, k], [k, k], [0i64, 0], false, true, None::<i64>)?)
}

/// The shortcut of a block that changes shape: `AvgPool2d(stride)` (named `-1`, no parameters),
/// a 1x1 convolution (`0`) and BatchNorm (`1`).
#[derive(Debug)]
struct Downsample {
    conv: Tensor,
    bn: BatchNorm2d,
}

/// open_clip's `Bottleneck`.
#[derive(Debug)]
pub struct Bottleneck {
    conv1: Tensor,
    bn1: BatchNorm2d,
    conv2: Tensor,
    bn2: BatchNorm2d,
    conv3: Tensor,
    bn3: BatchNorm2d,
    downsample: Option<Downsample>,
    stride: i64,
}

impl Bottleneck {
    fn new(p: &nn::Path, inplanes: i64, planes: i64, stride: i64) -> Result<Self> {
        let out = planes * EXPANSION;
        let downsample = if stride > 1 || inplanes != out {
            let d = p.sub("downsample");
            Some(Downsample {
                conv: conv_weight(&d, "0", out, inplanes, 1)?,
                bn: BatchNorm2d::new(&d.sub("1"), out, false)?,
            })
        } else {
            None
        };
        Ok(Self {
            conv1: conv_weight(p, "conv1", planes, inplanes, 1)?,
            bn1: BatchNorm2d::new(&p.sub("bn1"), planes, false)?,
            conv2: conv_weight(p, "conv2", planes, planes, 3)?,
            bn2: BatchNorm2d::new(&p.sub("bn2"), planes, false)?,
            conv3: conv_weight(p, "conv3", out, planes, 1)?,
            // open_clip's init_parameters zeroes each block's last BatchNorm weight, so a new
            // block starts as its shortcut.
            bn3: BatchNorm2d::new(&p.sub("bn3"), out, true)?,
            downsample,
            stride,
        })
    }

    fn forward(&self, x: &Tensor, training: bool) -> Result<Tensor> {
        let out = self
            .bn1
            .forward(&conv(x, &self.conv1, 1, 0)?, training)?
            .f_relu()?;
        let mut out = self
            .bn2
            .forward(&conv(&out, &self.conv2, 1, 1)?, training)?
            .f_relu()?;
        if self.stride > 1 {
            out = avg_pool(&out, self.stride)?;
        }
        let out = self
            .bn3
            .forward(&conv(&out, &self.conv3, 1, 0)?, training)?;
        let identity = match &self.downsample {
            Some(d) => {
                let pooled = if self.stride > 1 {
                    avg_pool(x, self.stride)?
                } else {
                    x.shallow_clone()
                };
                d.bn.forward(&conv(&pooled, &d.conv, 1, 0)?, training)?
            }
            None => x.shallow_clone(),
        };
        Ok(out.f_add(&identity)?.f_relu()?)
    }

    fn state_dict_into(&self, prefix: &str, out: &mut NamedTensors) {
        push(out, &join(prefix, "conv1"), "weight", &self.conv1);
        self.bn1.state_dict_into(&join(prefix, "bn1"), out);
        push(out, &join(prefix, "conv2"), "weight", &self.conv2);
        self.bn2.state_dict_into(&join(prefix, "bn2"), out);
        push(out, &join(prefix, "conv3"), "weight", &self.conv3);
        self.bn3.state_dict_into(&join(prefix, "bn3"), out);
        if let Some(d) = &self.downsample {
            push(out, &join(prefix, "downsample.0"), "weight", &d.conv);
            d.bn.state_dict_into(&join(prefix, "downsample.1"), out);
        }
    }
}

/// A `nn.Linear` with bias: `weight [out, in]`, `bias [out]`.
#[derive(Debug)]
struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    /// Weight N(0, std) as open_clip's `init_parameters`; bias PyTorch's default.
    fn new(p: &nn::Path, inp: i64, out: i64, std: f64) -> Result<Self> {
        Ok(Self {
            weight: p.f_var("weight", &[out, inp], normal(std))?,
            bias: p.f_var("bias", &[out], torch_default_uniform(inp))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let k = x.kind();
        Ok(x.f_linear(&self.weight.f_to_kind(k)?, Some(&self.bias.f_to_kind(k)?))?)
    }

    fn state_dict_into(&self, prefix: &str, out: &mut NamedTensors) {
        push(out, prefix, "weight", &self.weight);
        push(out, prefix, "bias", &self.bias);
    }
}

/// open_clip's `AttentionPool2d`.
#[derive(Debug)]
pub struct AttentionPool2d {
    /// `[(image_size / 32)^2 + 1, width * 32]`.
    positional_embedding: Tensor,
    k_proj: Linear,
    q_proj: Linear,
    v_proj: Linear,
    c_proj: Linear,
    heads: i64,
}

impl AttentionPool2d {
    fn new(p: &nn::Path, spatial: i64, dim: i64, heads: i64, output_dim: i64) -> Result<Self> {
        let std = (dim as f64).powf(-0.5);
        Ok(Self {
            positional_embedding: p.f_var(
                "positional_embedding",
                &[spatial * spatial + 1, dim],
                normal(std),
            )?,
            k_proj: Linear::new(&p.sub("k_proj"), dim, dim, std)?,
            q_proj: Linear::new(&p.sub("q_proj"), dim, dim, std)?,
            v_proj: Linear::new(&p.sub("v_proj"), dim, dim, std)?,
            c_proj: Linear::new(&p.sub("c_proj"), dim, output_dim, std)?,
            heads,
        })
    }

    /// `x` `[N, C, H, W]` -> `[N, output_dim]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = x.size4()?;
        let tokens = x.f_reshape([n, c, h * w])?.f_permute([0, 2, 1])?; // [N, HW, C]
        let mean = tokens.f_mean_dim([1i64].as_slice(), true, None)?;
        let x = Tensor::f_cat(&[mean, tokens], 1)?
            .f_add(&self.positional_embedding.f_to_kind(x.kind())?)?; // [N, L, C]
        let len = h * w + 1;
        let hd = c / self.heads;
        let scale = (hd as f64).powf(-0.5);
        let q = self
            .q_proj
            .forward(&x.f_narrow(1, 0, 1)?)?
            .f_mul_scalar(scale)?
            .f_reshape([n, 1, self.heads, hd])?
            .f_permute([0, 2, 1, 3])?; // [N, heads, 1, hd]
        let split = |t: Tensor| -> Result<Tensor> {
            Ok(t.f_reshape([n, len, self.heads, hd])?
                .f_permute([0, 2, 1, 3])?) // [N, heads, L, hd]
        };
        let k = split(self.k_proj.forward(&x)?)?;
        let v = split(self.v_proj.forward(&x)?)?;
        let attn = q
            .f_matmul(&k.f_transpose(-2, -1)?)?
            .f_softmax(-1, q.kind())?; // [N, heads, 1, L]
        let out = attn.f_matmul(&v)?.f_reshape([n, c])?;
        self.c_proj.forward(&out)
    }

    fn state_dict_into(&self, prefix: &str, out: &mut NamedTensors) {
        push(
            out,
            prefix,
            "positional_embedding",
            &self.positional_embedding,
        );
        self.k_proj.state_dict_into(&join(prefix, "k_proj"), out);
        self.q_proj.state_dict_into(&join(prefix, "q_proj"), out);
        self.v_proj.state_dict_into(&join(prefix, "v_proj"), out);
        self.c_proj.state_dict_into(&join(prefix, "c_proj"), out);
    }
}

/// open_clip's `ModifiedResNet`.
#[derive(Debug)]
pub struct ModifiedResNet {
    stem: [(Tensor, BatchNorm2d); 3],
    stages: [Vec<Bottleneck>; 4],
    attnpool: AttentionPool2d,
    image_size: i64,
    training: Cell<bool>,
    freeze_bn_stats: Cell<bool>,
}

impl ModifiedResNet {
    /// `p` is the `visual` path; `cfg.vision_cfg` must be a ResNet config (validated).
    pub fn new(p: &nn::Path, cfg: &ClipConfig) -> Result<Self> {
        let v = &cfg.vision_cfg;
        let blocks = v
            .layers
            .resnet_blocks()
            .filter(|b| b.len() == 4)
            .ok_or_else(|| TrainError::ModelConfig {
                field: "vision_cfg.layers".into(),
                reason: "a ModifiedResNet needs a list of four stage depths".into(),
            })?;
        let width = v.width;
        let half = width / 2;
        let stem = [
            (
                conv_weight(p, "conv1", half, 3, 3)?,
                BatchNorm2d::new(&p.sub("bn1"), half, false)?,
            ),
            (
                conv_weight(p, "conv2", half, half, 3)?,
                BatchNorm2d::new(&p.sub("bn2"), half, false)?,
            ),
            (
                conv_weight(p, "conv3", width, half, 3)?,
                BatchNorm2d::new(&p.sub("bn3"), width, false)?,
            ),
        ];
        let mut inplanes = width;
        let mut stage = |i: usize| -> Result<Vec<Bottleneck>> {
            let planes = width << i;
            let stride = if i == 0 { 1 } else { 2 };
            let sp = p.sub(format!("layer{}", i + 1));
            let mut out = Vec::new();
            for b in 0..blocks[i].max(0) {
                let s = if b == 0 { stride } else { 1 };
                out.push(Bottleneck::new(
                    &sp.sub(b.to_string()),
                    inplanes,
                    planes,
                    s,
                )?);
                inplanes = planes * EXPANSION;
            }
            Ok(out)
        };
        let stages = [stage(0)?, stage(1)?, stage(2)?, stage(3)?];
        let side = v.image_size.height();
        Ok(Self {
            stem,
            stages,
            attnpool: AttentionPool2d::new(
                &p.sub("attnpool"),
                side / 32,
                width * 32,
                v.heads(),
                cfg.embed_dim,
            )?,
            image_size: side,
            training: Cell::new(false),
            freeze_bn_stats: Cell::new(false),
        })
    }

    /// Training mode (BatchNorm on batch statistics, updating the running ones) or evaluation.
    pub fn set_training(&self, training: bool) {
        self.training.set(training);
    }

    pub fn is_training(&self) -> bool {
        self.training.get()
    }

    /// BatchNorm uses the running statistics even in training mode, and never updates them.
    pub fn set_freeze_bn_stats(&self, freeze: bool) {
        self.freeze_bn_stats.set(freeze);
    }

    /// `images`: `[N, 3, S, S]` CLIP-normalised. Returns unnormalised features `[N, embed_dim]`.
    pub fn forward(&self, images: &Tensor) -> Result<Tensor> {
        let size = images.size();
        let s = self.image_size;
        if size.len() != 4 || size[1] != 3 || size[2] != s || size[3] != s {
            return Err(TrainError::ModelInput {
                what: "images".into(),
                reason: format!("expected [N, 3, {s}, {s}], got {size:?}"),
            });
        }
        let training = self.training.get() && !self.freeze_bn_stats.get();
        let mut x = images.f_to_kind(float_kind_of(&self.stem[0].0))?;
        for (i, (w, bn)) in self.stem.iter().enumerate() {
            let stride = if i == 0 { 2 } else { 1 };
            x = bn.forward(&conv(&x, w, stride, 1)?, training)?.f_relu()?;
        }
        x = avg_pool(&x, 2)?;
        for block in self.stages.iter().flatten() {
            x = block.forward(&x, training)?;
        }
        self.attnpool.forward(&x)
    }

    pub fn state_dict_into(&self, prefix: &str, out: &mut NamedTensors) {
        for (i, (w, bn)) in self.stem.iter().enumerate() {
            push(out, &join(prefix, &format!("conv{}", i + 1)), "weight", w);
            bn.state_dict_into(&join(prefix, &format!("bn{}", i + 1)), out);
        }
        for (s, stage) in self.stages.iter().enumerate() {
            for (b, block) in stage.iter().enumerate() {
                block.state_dict_into(&join(prefix, &format!("layer{}.{b}", s + 1)), out);
            }
        }
        self.attnpool
            .state_dict_into(&join(prefix, "attnpool"), out);
    }
}

/// Whether a state-dict entry is a buffer (BatchNorm statistics), not a parameter: buffers are
/// saved and loaded with the weights but never optimised, all-reduced or weight-decayed.
pub fn is_buffer(name: &str) -> bool {
    name.ends_with(".running_mean")
        || name.ends_with(".running_var")
        || name.ends_with(".num_batches_tracked")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::lock::{self, TowerLocks};
    use crate::model::Clip;
    use tch::{nn::VarStore, Device};

    fn small() -> ClipConfig {
        ClipConfig::from_json_str(
            r#"{"embed_dim": 32,
                "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 32},
                "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2,
                             "layers": 1}}"#,
        )
        .expect("config")
    }

    fn stat(model: &Clip, name: &str) -> Tensor {
        model
            .state_dict()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.copy())
            .expect("tensor")
    }

    #[test]
    fn batch_norm_statistics_follow_the_mode() {
        let cfg = small();
        let vs = VarStore::new(Device::Cpu);
        let model = Clip::new(vs.root(), &cfg).expect("model");
        let images = Tensor::randn([3, 3, 64, 64], (Kind::Float, Device::Cpu));
        let mean = "visual.layer2.0.bn1.running_mean";
        let count = "visual.layer2.0.bn1.num_batches_tracked";
        // A new model evaluates: the statistics stay.
        let before = stat(&model, mean);
        let _ = tch::no_grad(|| model.encode_image(&images)).expect("eval forward");
        assert!(stat(&model, mean).equal(&before));
        // Training mode updates them and counts the batch.
        model.set_training(true);
        let _ = tch::no_grad(|| model.encode_image(&images)).expect("train forward");
        assert!(!stat(&model, mean).equal(&before));
        assert_eq!(stat(&model, count).int64_value(&[]), 1);
        // Frozen statistics: training mode normalises with the running ones, as evaluation does.
        model.freeze_image_bn_stats(true);
        let frozen = stat(&model, mean);
        let a = tch::no_grad(|| model.encode_image(&images)).expect("frozen forward");
        assert!(stat(&model, mean).equal(&frozen));
        model.set_training(false);
        let b = tch::no_grad(|| model.encode_image(&images)).expect("eval forward");
        assert!(a.allclose(&b, 1e-6, 1e-6, false));
    }

    #[test]
    fn buffers_are_state_not_parameters() {
        let cfg = small();
        let vs = VarStore::new(Device::Cpu);
        let model = Clip::new(vs.root(), &cfg).expect("model");
        let all = model.state_dict();
        let params = model.parameters();
        let buffers: Vec<&String> = all
            .iter()
            .map(|(n, _)| n)
            .filter(|n| is_buffer(n))
            .collect();
        assert_eq!(buffers.len(), 3 * (3 + 4 * 3 + 4)); // stem 3, 4 blocks x 3, 4 downsamples
        assert_eq!(all.len(), params.len() + buffers.len());
        assert_eq!(model.buffers().len(), buffers.len());
        assert!(params
            .iter()
            .all(|(n, t)| !is_buffer(n) && t.requires_grad()));
        // A new block starts as its shortcut: open_clip zeroes each block's last BN weight.
        let bn3 = stat(&model, "visual.layer1.0.bn3.weight");
        assert_eq!(bn3.abs().sum(Kind::Float).double_value(&[]), 0.0);
        // The tower locks whole, as open_clip's ModifiedResNet.lock.
        let locks = TowerLocks {
            image: Some(0),
            text: None,
        };
        lock::check(&cfg, &locks).expect("whole-tower lock");
        assert!(lock::is_frozen(
            "visual.attnpool.c_proj.weight",
            &cfg,
            &locks
        ));
        let partial = TowerLocks {
            image: Some(1),
            text: None,
        };
        let err = lock::check(&cfg, &partial).expect_err("partial lock");
        assert!(
            err.to_string().contains("lock_image_unlocked_groups"),
            "{err}"
        );
    }
}
