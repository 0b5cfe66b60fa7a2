//! The short-tag classification (STC) head: an MLP on the image embedding giving K tag logits
//! (method.md, Stage 2).
//!
//! `stc_head.fc1` (embed_dim -> hidden) -> GELU -> `stc_head.fc2` (hidden -> K). It reads the
//! image tower's output before L2 normalisation (the projection's output, what
//! `encode_image(normalize=False)` returns), so the head sees the embedding's scale as well as its
//! direction.
//!
//! Its tensors live under their own prefix `stc_head.` and are saved in their own file
//! (`stc_head.safetensors` in a checkpoint), never with the CLIP weights, so open_clip still loads
//! those with `strict=True`.
//!
//! `fc2`'s bias starts at `-ln((1 - p) / p)` with prior p = 0.01 (the focal-loss prior init):
//! tags are sparse (a sample has a handful of K), so starting every logit at 0 would make the
//! summed-over-K loss start at K ln 2 and its first steps would only learn "mostly no".

use std::borrow::Borrow;

use tch::nn::{self, Init};
use tch::Tensor;

use crate::model::layers::{torch_default_uniform, Linear, NamedTensors, Result};
use crate::TrainError;

/// The key prefix of the head's tensors.
pub const STC_PREFIX: &str = "stc_head";
/// Prior probability a tag logit starts at.
pub const STC_PRIOR: f64 = 0.01;

#[derive(Debug)]
pub struct StcHead {
    pub fc1: Linear,
    pub fc2: Linear,
    classes: i64,
}

impl StcHead {
    /// Builds the head under `p` (pass `vs.root()`; the head adds its own `stc_head` prefix).
    pub fn new<'a, P: Borrow<nn::Path<'a>>>(
        p: P,
        embed_dim: i64,
        hidden: i64,
        classes: i64,
    ) -> Result<Self> {
        for (field, v) in [
            ("embed_dim", embed_dim),
            ("hidden", hidden),
            ("classes", classes),
        ] {
            if v <= 0 {
                return Err(TrainError::ModelConfig {
                    field: format!("stc_head.{field}"),
                    reason: format!("must be positive, got {v}"),
                });
            }
        }
        let p = p.borrow().sub(STC_PREFIX);
        let fc1 = Linear::new(
            &p.sub("fc1"),
            embed_dim,
            hidden,
            torch_default_uniform(embed_dim),
            Some(torch_default_uniform(embed_dim)),
        )?;
        let prior_bias = -((1.0 - STC_PRIOR) / STC_PRIOR).ln();
        let fc2 = Linear::new(
            &p.sub("fc2"),
            hidden,
            classes,
            torch_default_uniform(hidden),
            Some(Init::Const(prior_bias)),
        )?;
        Ok(StcHead { fc1, fc2, classes })
    }

    /// K, the number of tags.
    pub fn classes(&self) -> i64 {
        self.classes
    }

    /// Unnormalised image embeddings `[N, embed_dim]` -> tag logits `[N, K]`.
    pub fn forward(&self, image_embedding: &Tensor) -> Result<Tensor> {
        let h = self.fc1.forward(image_embedding)?.f_gelu("none")?;
        self.fc2.forward(&h)
    }

    /// The head's tensors, named `stc_head.fc1.weight`, ...
    pub fn state_dict(&self) -> NamedTensors {
        let mut out = Vec::new();
        self.fc1
            .state_dict_into(&format!("{STC_PREFIX}.fc1"), &mut out);
        self.fc2
            .state_dict_into(&format!("{STC_PREFIX}.fc2"), &mut out);
        out
    }

    /// Hidden width, from `fc1`'s shape.
    pub fn hidden(&self) -> i64 {
        self.fc1.weight.size()[0]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn::VarStore, Device, Kind};

    #[test]
    fn shapes_names_and_prior() {
        let vs = VarStore::new(Device::Cpu);
        let head = StcHead::new(vs.root(), 16, 32, 7).expect("head");
        let names: Vec<String> = head.state_dict().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "stc_head.fc1.weight",
                "stc_head.fc1.bias",
                "stc_head.fc2.weight",
                "stc_head.fc2.bias"
            ]
        );
        let mut var_names: Vec<String> = vs.variables().into_keys().collect();
        var_names.sort();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(var_names, sorted);
        let z = head
            .forward(&Tensor::zeros([3, 16], (Kind::Float, Device::Cpu)))
            .expect("fwd");
        assert_eq!(z.size(), vec![3, 7]);
        let bias = head.fc2.bias.as_ref().expect("bias");
        let b = bias.mean(Kind::Float).double_value(&[]);
        assert!((1.0 / (1.0 + (-b).exp()) - STC_PRIOR).abs() < 1e-6, "{b}");
        assert!(StcHead::new(vs.root(), 16, 0, 7).is_err());
    }
}
