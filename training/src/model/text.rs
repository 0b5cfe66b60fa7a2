//! The text tower: open_clip's `TextTransformer`, whose parts open_clip's `CLIP` keeps at the top
//! level of the state dict: `token_embedding`, `positional_embedding`, `transformer`, `ln_final`,
//! `text_projection`.
//!
//! `token_embedding` -> add `positional_embedding` -> `transformer` (causal) -> `ln_final` ->
//! pool (default: the position of the largest id, the end-of-text token) -> `text_projection`.

use tch::nn::{self, Init};
use tch::{Kind, Tensor};

use crate::error::TrainError;
use crate::model::config::{ClipConfig, TextPool, TextProjType};
use crate::model::layers::{
    join, normal, push, Activation, BlockConfig, BlockInit, LayerNorm, Linear, NamedTensors,
    Result, Transformer,
};

/// `text_projection`: a bare `[width, embed_dim]` matrix (`x @ P`), or `nn.Linear` with bias
/// when `text_cfg.proj_bias` is set.
#[derive(Debug)]
pub enum TextProjection {
    Matrix(Tensor),
    Linear(Linear),
}

#[derive(Debug)]
pub struct TextTransformer {
    /// `[vocab_size, width]`.
    pub token_embedding: Tensor,
    /// `[context_length, width]`.
    pub positional_embedding: Tensor,
    pub transformer: Transformer,
    pub ln_final: LayerNorm,
    pub text_projection: Option<TextProjection>,
    context_length: i64,
    vocab_size: i64,
    causal: bool,
    pool: TextPool,
    eos_id: i64,
}

impl TextTransformer {
    /// `p` is the CLIP root path (open_clip's `CLIP` flattens the text tower). Initialisation is
    /// open_clip's `TextTransformer.init_parameters`.
    pub fn new(p: &nn::Path, cfg: &ClipConfig) -> Result<Self> {
        let t = &cfg.text_cfg;
        let width = t.width;
        let block = BlockConfig {
            width,
            heads: t.heads,
            mlp_width: t.mlp_width(),
            act: Activation::from_config(cfg.quick_gelu, t.act_kwargs.as_ref()),
            ln_eps: t.ln_eps(),
            ls_init_value: t.ls_init_value,
            init: BlockInit::open_clip_text(width, t.layers),
        };
        let proj_std = (width as f64).powf(-0.5);
        let text_projection = match (t.proj_type, t.proj_bias) {
            (TextProjType::NoProjection, _) => None,
            (TextProjType::Linear, false) => Some(TextProjection::Matrix(p.f_var(
                "text_projection",
                &[width, cfg.embed_dim],
                normal(proj_std),
            )?)),
            (TextProjType::Linear, true) => Some(TextProjection::Linear(Linear::new(
                &p.sub("text_projection"),
                width,
                cfg.embed_dim,
                normal(proj_std),
                Some(Init::Const(0.0)),
            )?)),
        };
        Ok(Self {
            token_embedding: p.sub("token_embedding").f_var(
                "weight",
                &[t.vocab_size, width],
                normal(0.02),
            )?,
            positional_embedding: p.f_var(
                "positional_embedding",
                &[t.context_length, width],
                normal(0.01),
            )?,
            transformer: Transformer::new(&p.sub("transformer"), t.layers, &block)?,
            ln_final: LayerNorm::new(&p.sub("ln_final"), width, t.ln_eps())?,
            text_projection,
            context_length: t.context_length,
            vocab_size: t.vocab_size,
            causal: !t.no_causal_mask,
            pool: t.pool_type,
            eos_id: t.eos_id,
        })
    }

    /// Index of the pooled token in each row of `text` (`[N, L]`).
    fn pool_index(&self, text: &Tensor) -> Result<Tensor> {
        let (n, l) = text.size2()?;
        Ok(match self.pool {
            TextPool::Argmax => text.f_argmax(-1, false)?,
            TextPool::First => Tensor::f_zeros([n], (Kind::Int64, text.device()))?,
            TextPool::Last => Tensor::f_full([n], l - 1, (Kind::Int64, text.device()))?,
            TextPool::Eos => text
                .f_eq(self.eos_id)?
                .f_to_kind(Kind::Int)?
                .f_argmax(-1, false)?,
        })
    }

    /// `text`: token ids `[N, L]` (integer), `L <= context_length` (open_clip always feeds the
    /// full context). Returns unnormalised features `[N, embed_dim]` (or `[N, width]` without a
    /// projection).
    pub fn forward(&self, text: &Tensor) -> Result<Tensor> {
        let size = text.size();
        let bad = |reason: String| {
            Err(TrainError::ModelInput {
                what: "text".into(),
                reason,
            })
        };
        if size.len() != 2 || size[1] == 0 || size[1] > self.context_length {
            return bad(format!(
                "expected token ids [N, L] with 1 <= L <= {}, got {size:?}",
                self.context_length
            ));
        }
        let ids = match text.kind() {
            Kind::Int64 => text.shallow_clone(),
            Kind::Int | Kind::Int16 | Kind::Int8 | Kind::Uint8 => text.f_to_kind(Kind::Int64)?,
            k => return bad(format!("expected integer token ids, got {k:?}")),
        };
        if size[0] > 0 {
            let lo = ids.f_min()?.f_int64_value(&[])?;
            let hi = ids.f_max()?.f_int64_value(&[])?;
            if lo < 0 || hi >= self.vocab_size {
                return bad(format!(
                    "token ids must lie in [0, {}), got [{lo}, {hi}]",
                    self.vocab_size
                ));
            }
        }
        let (n, l) = (size[0], size[1]);
        let x = Tensor::f_embedding(&self.token_embedding, &ids, -1, false, false)?;
        let pos = self.positional_embedding.f_narrow(0, 0, l)?;
        let x = x.f_add(&pos)?;
        let x = self.transformer.forward(&x, self.causal)?;
        let x = self.ln_final.forward(&x)?;
        let rows = Tensor::f_arange(n, (Kind::Int64, x.device()))?;
        let idx = self.pool_index(&ids)?;
        let pooled = x.f_index(&[Some(rows), Some(idx)])?;
        Ok(match &self.text_projection {
            None => pooled,
            Some(TextProjection::Matrix(p)) => pooled.f_matmul(p)?,
            Some(TextProjection::Linear(lin)) => lin.forward(&pooled)?,
        })
    }

    pub fn state_dict_into(&self, prefix: &str, out: &mut NamedTensors) {
        push(
            out,
            prefix,
            "positional_embedding",
            &self.positional_embedding,
        );
        push(
            out,
            &join(prefix, "token_embedding"),
            "weight",
            &self.token_embedding,
        );
        self.transformer
            .state_dict_into(&join(prefix, "transformer"), out);
        self.ln_final
            .state_dict_into(&join(prefix, "ln_final"), out);
        match &self.text_projection {
            None => {}
            Some(TextProjection::Matrix(p)) => push(out, prefix, "text_projection", p),
            Some(TextProjection::Linear(lin)) => {
                lin.state_dict_into(&join(prefix, "text_projection"), out)
            }
        }
    }
}
