//! open_clip's `ModifiedResNet` image tower as ONNX (the RN50 family), in evaluation mode.
//!
//! The computation is open_clip's op for op (see `hq_train::model::resnet`), with two exact
//! rewrites:
//! - every BatchNorm is folded into the convolution before it: with
//!   `s = weight / sqrt(running_var + eps)` the convolution's weight is scaled by `s` per output
//!   channel and gets the bias `bias - running_mean * s`. In evaluation mode BatchNorm is that
//!   affine map, so the graph is one Conv (with bias) per convolution, which ONNX Runtime and
//!   TensorRT run without a separate normalisation pass; the values differ from open_clip's only
//!   by float rounding;
//! - the attention pool computes the query of its first token only (the mean token, whose output
//!   is the embedding), as the ViT's last block does for the class token; its separate q, k and v
//!   projections are packed as the ViT's `in_proj` is, with the attention scale folded into q.

use hq_train::model::ClipConfig;

use super::{scaled_in_proj, BlockSpec, Tower};
use crate::error::{ExportError, Result};
use crate::graph::Attr;

/// PyTorch's `BatchNorm2d` epsilon (open_clip uses the default).
const BN_EPS: f32 = 1e-5;

impl Tower<'_> {
    /// `conv` (a bias-free `nn.Conv2d`, `[O, I, k, k]`) followed by BatchNorm `bn`, folded into
    /// one Conv with bias; `stride` and symmetric `pad`; ReLU after it when `relu`.
    fn conv_bn(
        &mut self,
        conv: &str,
        bn: &str,
        x: &str,
        (stride, pad): (i64, i64),
        relu: bool,
    ) -> Result<String> {
        let w = self.ckpt.get(&format!("{conv}.weight"))?;
        let [o, _, k, k2] = w.shape[..] else {
            return Err(ExportError::Checkpoint {
                path: self.ckpt.path.clone(),
                message: format!("tensor `{conv}.weight` should be 4-D, has {:?}", w.shape),
            });
        };
        let get = |n: &str| self.ckpt.get(&format!("{bn}.{n}")).map(|t| &t.data);
        let (gamma, beta, mean, var) = (
            get("weight")?,
            get("bias")?,
            get("running_mean")?,
            get("running_var")?,
        );
        let per_out = w.data.len() / o.max(1);
        let mut folded = w.data.clone();
        let mut bias = vec![0f32; o];
        for c in 0..o {
            let s = gamma[c] / (var[c] + BN_EPS).sqrt();
            for v in &mut folded[c * per_out..(c + 1) * per_out] {
                *v *= s;
            }
            bias[c] = beta[c] - mean[c] * s;
        }
        let shape = w.shape.clone();
        let wname = self.weight(&format!("{conv}.weight_bn_folded"), &shape, &folded)?;
        let bname = self.weight(&format!("{conv}.bias_bn_folded"), &[o], &bias)?;
        let y = self.op(
            "Conv",
            conv,
            &[x, &wname, &bname],
            vec![
                ("kernel_shape", Attr::Ints(vec![k as i64, k2 as i64])),
                ("strides", Attr::Ints(vec![stride, stride])),
                ("pads", Attr::Ints(vec![pad, pad, pad, pad])),
            ],
        )?;
        if relu {
            self.op("Relu", &format!("{conv}.relu"), &[&y], vec![])
        } else {
            Ok(y)
        }
    }

    /// `nn.AvgPool2d(k)`: kernel and stride `k`, no padding.
    fn avg_pool(&mut self, name: &str, x: &str, k: i64) -> Result<String> {
        self.op(
            "AveragePool",
            name,
            &[x],
            vec![
                ("kernel_shape", Attr::Ints(vec![k, k])),
                ("strides", Attr::Ints(vec![k, k])),
            ],
        )
    }

    /// open_clip's `Bottleneck` at `p` (`visual.layer{s}.{b}`).
    fn bottleneck(&mut self, p: &str, x: &str, stride: i64, downsample: bool) -> Result<String> {
        let y = self.conv_bn(&format!("{p}.conv1"), &format!("{p}.bn1"), x, (1, 0), true)?;
        let mut y = self.conv_bn(&format!("{p}.conv2"), &format!("{p}.bn2"), &y, (1, 1), true)?;
        if stride > 1 {
            y = self.avg_pool(&format!("{p}.avgpool"), &y, stride)?;
        }
        let y = self.conv_bn(
            &format!("{p}.conv3"),
            &format!("{p}.bn3"),
            &y,
            (1, 0),
            false,
        )?;
        let identity = if downsample {
            let pooled = if stride > 1 {
                self.avg_pool(&format!("{p}.downsample.pool"), x, stride)?
            } else {
                x.to_string()
            };
            self.conv_bn(
                &format!("{p}.downsample.0"),
                &format!("{p}.downsample.1"),
                &pooled,
                (1, 0),
                false,
            )?
        } else {
            x.to_string()
        };
        let sum = self.op("Add", &format!("{p}.residual"), &[&y, &identity], vec![])?;
        self.op("Relu", &format!("{p}.relu"), &[&sum], vec![])
    }

    /// open_clip's `AttentionPool2d` on the last feature map `x` `[B, C, S, S]` -> `[B, E]`.
    fn attention_pool(
        &mut self,
        x: &str,
        channels: usize,
        side: usize,
        heads: usize,
    ) -> Result<String> {
        let p = "visual.attnpool";
        let tokens = side * side + 1;
        let flat = self.ints(
            &format!("const.shape_feature_map_{channels}"),
            &[0, channels as i64, -1],
        )?;
        let x = self.op("Reshape", &format!("{p}.flatten"), &[x, &flat], vec![])?;
        let x = self.op(
            "Transpose",
            &format!("{p}.tokens"),
            &[&x],
            vec![("perm", Attr::Ints(vec![0, 2, 1]))],
        )?; // [B, S*S, C]
        let mean = self.op(
            "ReduceMean",
            &format!("{p}.mean_token"),
            &[&x],
            vec![("axes", Attr::Ints(vec![1])), ("keepdims", Attr::Int(1))],
        )?; // [B, 1, C]
        let x = self.op(
            "Concat",
            &format!("{p}.with_mean"),
            &[&mean, &x],
            vec![("axis", Attr::Int(1))],
        )?; // [B, L, C]
        let pos = self.ckpt_weight(&format!("{p}.positional_embedding"))?;
        let x = self.op("Add", &format!("{p}.embed"), &[&x, &pos], vec![])?;
        let rows = self.ints(
            &format!("const.shape_rows_{channels}"),
            &[-1, channels as i64],
        )?;
        let rows = self.op("Reshape", &format!("{p}.rows"), &[&x, &rows], vec![])?; // [B * L, C]
        let spec = BlockSpec {
            width: channels,
            heads,
            act: super::Act::Gelu, // unused: the pool has no MLP
            eps: 0.0,
            layer_scale: false,
            tokens,
        };
        let first = self.first_token(&format!("{p}.first"), &rows, tokens, channels)?;
        // Pack q | k | v as `nn.MultiheadAttention`'s in_proj (what open_clip passes to
        // `multi_head_attention_forward` with `use_separate_proj_weight`).
        let mut in_w = Vec::with_capacity(3 * channels * channels);
        let mut in_b = Vec::with_capacity(3 * channels);
        for name in ["q_proj", "k_proj", "v_proj"] {
            in_w.extend_from_slice(&self.ckpt.get(&format!("{p}.{name}.weight"))?.data);
            in_b.extend_from_slice(&self.ckpt.get(&format!("{p}.{name}.bias"))?.data);
        }
        let (wt, bias) = scaled_in_proj(&in_w, &in_b, &spec);
        self.attention_first_token_packed(
            p,
            &rows,
            &first,
            &spec,
            (&wt, &bias),
            &format!("{p}.c_proj"),
        )
    }
}

/// The ResNet image tower on `x` `[B, 3, S, S]` up to the embedding `[B, embed_dim]`.
pub(super) fn image_embedding(t: &mut Tower<'_>, cfg: &ClipConfig, x: &str) -> Result<String> {
    let v = &cfg.vision_cfg;
    let blocks = v
        .layers
        .resnet_blocks()
        .ok_or_else(|| ExportError::Config("not a ModifiedResNet config".into()))?;
    let mut x = x.to_string();
    for i in 1..=3 {
        let stride = if i == 1 { 2 } else { 1 };
        x = t.conv_bn(
            &format!("visual.conv{i}"),
            &format!("visual.bn{i}"),
            &x,
            (stride, 1),
            true,
        )?;
    }
    x = t.avg_pool("visual.avgpool", &x, 2)?;
    let width = v.width;
    let mut inplanes = width;
    for (s, &n) in blocks.iter().enumerate() {
        let planes = width << s;
        for b in 0..n.max(0) {
            let stride = if s > 0 && b == 0 { 2 } else { 1 };
            let downsample = b == 0 && (stride > 1 || inplanes != planes * 4);
            x = t.bottleneck(
                &format!("visual.layer{}.{b}", s + 1),
                &x,
                stride,
                downsample,
            )?;
            inplanes = planes * 4;
        }
    }
    let side = (v.image_size.height() / 32) as usize;
    t.attention_pool(&x, (width * 32) as usize, side, v.heads() as usize)
}
