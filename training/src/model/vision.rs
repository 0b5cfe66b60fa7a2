//! The image tower: open_clip's `VisionTransformer` under `visual.*`.
//!
//! `conv1` (patch embedding, no bias) -> prepend `class_embedding` -> add `positional_embedding`
//! -> `ln_pre` -> `transformer` -> `ln_post` -> pool (class token or mean of patches) -> `@ proj`.

use tch::nn;
use tch::Tensor;

use crate::error::TrainError;
use crate::model::config::{ClipConfig, VisionPool};
use crate::model::layers::{
    float_kind_of, join, normal, push, torch_default_uniform, Activation, BlockConfig, BlockInit,
    LayerNorm, NamedTensors, Result, Transformer,
};

#[derive(Debug)]
pub struct VisionTransformer {
    /// `[width, 3, patch_h, patch_w]`.
    pub conv1: Tensor,
    /// `[width]`.
    pub class_embedding: Tensor,
    /// `[grid_h * grid_w + 1, width]`.
    pub positional_embedding: Tensor,
    pub ln_pre: Option<LayerNorm>,
    pub transformer: Transformer,
    pub ln_post: LayerNorm,
    /// `[width, embed_dim]`.
    pub proj: Tensor,
    image_hw: (i64, i64),
    patch_hw: (i64, i64),
    pool: VisionPool,
    final_ln_after_pool: bool,
}

impl VisionTransformer {
    /// `p` is the `visual` path. Initialisation follows open_clip: N(0, width^-0.5) for the class
    /// and positional embeddings and `proj`, PyTorch defaults elsewhere.
    pub fn new(p: &nn::Path, cfg: &ClipConfig) -> Result<Self> {
        let v = &cfg.vision_cfg;
        let width = v.width;
        let (ph, pw) = (v.patch_size.height(), v.patch_size.width());
        let scale = (width as f64).powf(-0.5);
        let eps = v.ln_eps();
        let block = BlockConfig {
            width,
            heads: v.heads(),
            mlp_width: v.mlp_width(),
            act: Activation::from_config(cfg.quick_gelu, v.act_kwargs.as_ref()),
            ln_eps: eps,
            ls_init_value: v.ls_init_value,
            init: BlockInit::torch_defaults(width, v.mlp_width()),
        };
        Ok(Self {
            conv1: p.sub("conv1").f_var(
                "weight",
                &[width, 3, ph, pw],
                torch_default_uniform(3 * ph * pw),
            )?,
            class_embedding: p.f_var("class_embedding", &[width], normal(scale))?,
            positional_embedding: p.f_var(
                "positional_embedding",
                &[v.num_positions(), width],
                normal(scale),
            )?,
            ln_pre: if v.no_ln_pre {
                None
            } else {
                Some(LayerNorm::new(&p.sub("ln_pre"), width, eps)?)
            },
            transformer: Transformer::new(&p.sub("transformer"), v.layers.depth(), &block)?,
            ln_post: LayerNorm::new(&p.sub("ln_post"), width, eps)?,
            proj: p.f_var("proj", &[width, cfg.embed_dim], normal(scale))?,
            image_hw: (v.image_size.height(), v.image_size.width()),
            patch_hw: (ph, pw),
            pool: v.pool_type,
            final_ln_after_pool: v.final_ln_after_pool,
        })
    }

    /// Patch tokens plus class token, embedded and normalised: `[N, grid + 1, width]`.
    fn embeds(&self, images: &Tensor) -> Result<Tensor> {
        let x = images.f_to_kind(float_kind_of(&self.conv1))?;
        let x = x.f_conv2d(
            &self.conv1,
            None::<Tensor>,
            [self.patch_hw.0, self.patch_hw.1],
            [0i64, 0],
            [1i64, 1],
            1,
        )?; // [N, width, gh, gw]
        let (n, width, _, _) = x.size4()?;
        let x = x.f_reshape([n, width, -1])?.f_permute([0, 2, 1])?;
        let cls = self
            .class_embedding
            .f_to_kind(x.kind())?
            .f_view([1, 1, width])?
            .f_expand([n, 1, width], false)?;
        let x = Tensor::f_cat(&[cls, x], 1)?;
        let x = x.f_add(&self.positional_embedding.f_to_kind(x.kind())?)?;
        match &self.ln_pre {
            Some(ln) => ln.forward(&x),
            None => Ok(x),
        }
    }

    fn global_pool(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self.pool {
            VisionPool::Tok => x.f_select(1, 0)?,
            VisionPool::Avg => {
                let len = x.size()[1];
                x.f_narrow(1, 1, len - 1)?
                    .f_mean_dim([1i64].as_slice(), false, None)?
            }
        })
    }

    /// `images`: `[N, 3, H, W]` at the configured size (already normalised with the CLIP mean and
    /// std). Returns unnormalised features `[N, embed_dim]`.
    pub fn forward(&self, images: &Tensor) -> Result<Tensor> {
        let size = images.size();
        let (h, w) = self.image_hw;
        if size.len() != 4 || size[1] != 3 || size[2] != h || size[3] != w {
            return Err(TrainError::ModelInput {
                what: "images".into(),
                reason: format!("expected [N, 3, {h}, {w}], got {size:?}"),
            });
        }
        let x = self.embeds(images)?;
        let x = self.transformer.forward(&x, false)?;
        let pooled = if self.final_ln_after_pool {
            self.ln_post.forward(&self.global_pool(&x)?)?
        } else {
            self.global_pool(&self.ln_post.forward(&x)?)?
        };
        Ok(pooled.f_matmul(&self.proj)?)
    }

    pub fn state_dict_into(&self, prefix: &str, out: &mut NamedTensors) {
        push(out, prefix, "class_embedding", &self.class_embedding);
        push(
            out,
            prefix,
            "positional_embedding",
            &self.positional_embedding,
        );
        push(out, prefix, "proj", &self.proj);
        push(out, &join(prefix, "conv1"), "weight", &self.conv1);
        if let Some(ln) = &self.ln_pre {
            ln.state_dict_into(&join(prefix, "ln_pre"), out);
        }
        self.transformer
            .state_dict_into(&join(prefix, "transformer"), out);
        self.ln_post.state_dict_into(&join(prefix, "ln_post"), out);
    }
}
