//! Building blocks shared by both towers, named as open_clip's `transformer.py` names them:
//! `LayerNorm`, `nn.Linear`, `nn.MultiheadAttention` (`in_proj_weight`, `in_proj_bias`,
//! `out_proj`), the MLP (`c_fc`, activation, `c_proj`), `LayerScale` (`gamma`), the
//! `ResidualAttentionBlock` (`ln_1`, `attn`, `ls_1`, `ln_2`, `mlp`, `ls_2`) and the `Transformer`
//! (`resblocks.{i}`).
//!
//! Tensors are `[batch, sequence, width]` (open_clip's `batch_first`). Every forward is fallible:
//! libtorch errors (shape, device, out of memory) come back as [`TrainError::Torch`].

use tch::nn::{self, Init};
use tch::{Kind, Tensor};

use crate::error::TrainError;
use crate::model::config::ActKwargs;

pub type Result<T> = std::result::Result<T, TrainError>;

/// A named tensor list in state-dict order, open_clip's names.
pub type NamedTensors = Vec<(String, Tensor)>;

/// Appends `prefix.name` (or `name` at the root).
pub(crate) fn push(out: &mut NamedTensors, prefix: &str, name: &str, t: &Tensor) {
    let key = join(prefix, name);
    out.push((key, t.shallow_clone()));
}

pub(crate) fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// PyTorch's default init for `nn.Linear`/`nn.Conv2d` weights and biases
/// (`kaiming_uniform_(a=sqrt(5))`): uniform in ±1/sqrt(fan_in).
pub fn torch_default_uniform(fan_in: i64) -> Init {
    let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
    Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

/// Normal init with mean 0.
pub fn normal(stdev: f64) -> Init {
    Init::Randn { mean: 0.0, stdev }
}

/// The MLP activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `nn.GELU()` (exact, erf).
    Gelu,
    /// `nn.GELU(approximate="tanh")`.
    GeluTanh,
    /// open_clip's `QuickGELU`: x * sigmoid(1.702 x).
    QuickGelu,
}

impl Activation {
    pub fn from_config(quick_gelu: bool, act_kwargs: Option<&ActKwargs>) -> Self {
        if quick_gelu {
            Activation::QuickGelu
        } else if act_kwargs.is_some_and(|a| a.approximate == "tanh") {
            Activation::GeluTanh
        } else {
            Activation::Gelu
        }
    }

    pub fn forward(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::Gelu => x.f_gelu("none")?,
            Activation::GeluTanh => x.f_gelu("tanh")?,
            Activation::QuickGelu => x.f_mul(&x.f_mul_scalar(1.702)?.f_sigmoid()?)?,
        })
    }
}

/// `nn.LayerNorm(dim, eps)`: `weight` (ones), `bias` (zeros).
#[derive(Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    dim: i64,
    eps: f64,
}

impl LayerNorm {
    pub fn new(p: &nn::Path, dim: i64, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: p.f_var("weight", &[dim], Init::Const(1.0))?,
            bias: p.f_var("bias", &[dim], Init::Const(0.0))?,
            dim,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.f_layer_norm(
            [self.dim],
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            true,
        )?)
    }

    pub fn state_dict_into(&self, prefix: &str, out: &mut NamedTensors) {
        push(out, prefix, "weight", &self.weight);
        push(out, prefix, "bias", &self.bias);
    }
}

/// `nn.Linear(in, out)`: `weight` `[out, in]`, `bias` `[out]`.
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    /// With explicit inits; `bias_init = None` means no bias.
    pub fn new(
        p: &nn::Path,
        in_dim: i64,
        out_dim: i64,
        weight_init: Init,
        bias_init: Option<Init>,
    ) -> Result<Self> {
        let weight = p.f_var("weight", &[out_dim, in_dim], weight_init)?;
        let bias = match bias_init {
            Some(init) => Some(p.f_var("bias", &[out_dim], init)?),
            None => None,
        };
        Ok(Self { weight, bias })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.f_linear(&self.weight, self.bias.as_ref())?)
    }

    pub fn state_dict_into(&self, prefix: &str, out: &mut NamedTensors) {
        push(out, prefix, "weight", &self.weight);
        if let Some(b) = &self.bias {
            push(out, prefix, "bias", b);
        }
    }
}

/// How a block's weights start (the towers differ: open_clip re-initialises the text tower's
/// blocks, the image tower keeps PyTorch's defaults).
#[derive(Debug, Clone, Copy)]
pub struct BlockInit {
    pub in_proj_weight: Init,
    pub out_proj_weight: Init,
    pub c_fc_weight: Init,
    pub c_proj_weight: Init,
}

impl BlockInit {
    /// PyTorch's defaults: `nn.MultiheadAttention` (xavier-uniform `in_proj_weight`, default
    /// `out_proj.weight`) and `nn.Linear` — what open_clip's image tower keeps.
    pub fn torch_defaults(width: i64, mlp_width: i64) -> Self {
        let xavier = (6.0 / (width + 3 * width) as f64).sqrt();
        Self {
            in_proj_weight: Init::Uniform {
                lo: -xavier,
                up: xavier,
            },
            out_proj_weight: torch_default_uniform(width),
            c_fc_weight: torch_default_uniform(width),
            c_proj_weight: torch_default_uniform(mlp_width),
        }
    }

    /// open_clip's `TextTransformer.init_parameters`.
    pub fn open_clip_text(width: i64, layers: i64) -> Self {
        let w = width as f64;
        let attn_std = w.powf(-0.5);
        let proj_std = w.powf(-0.5) * ((2 * layers.max(1)) as f64).powf(-0.5);
        let fc_std = (2.0 * w).powf(-0.5);
        Self {
            in_proj_weight: normal(attn_std),
            out_proj_weight: normal(proj_std),
            c_fc_weight: normal(fc_std),
            c_proj_weight: normal(proj_std),
        }
    }
}

/// Everything a residual block needs to know.
#[derive(Debug, Clone, Copy)]
pub struct BlockConfig {
    pub width: i64,
    pub heads: i64,
    pub mlp_width: i64,
    pub act: Activation,
    pub ln_eps: f64,
    pub ls_init_value: Option<f64>,
    pub init: BlockInit,
}

/// `nn.MultiheadAttention(width, heads, batch_first=True)` as open_clip uses it: self-attention,
/// packed `in_proj_weight` `[3 width, width]` / `in_proj_bias` `[3 width]`, `out_proj` with bias.
#[derive(Debug)]
pub struct Attention {
    pub in_proj_weight: Tensor,
    pub in_proj_bias: Tensor,
    pub out_proj: Linear,
    heads: i64,
}

impl Attention {
    pub fn new(p: &nn::Path, cfg: &BlockConfig) -> Result<Self> {
        let w = cfg.width;
        Ok(Self {
            in_proj_weight: p.f_var("in_proj_weight", &[3 * w, w], cfg.init.in_proj_weight)?,
            in_proj_bias: p.f_var("in_proj_bias", &[3 * w], Init::Const(0.0))?,
            out_proj: Linear::new(
                &p.sub("out_proj"),
                w,
                w,
                cfg.init.out_proj_weight,
                Some(Init::Const(0.0)),
            )?,
            heads: cfg.heads,
        })
    }

    /// `x`: `[batch, seq, width]`; `causal`: each position attends to itself and earlier ones
    /// only (open_clip's additive `-inf` upper-triangular mask).
    pub fn forward(&self, x: &Tensor, causal: bool) -> Result<Tensor> {
        let (b, l, w) = x.size3()?;
        let head_dim = w / self.heads;
        let qkv = x.f_linear(&self.in_proj_weight, Some(&self.in_proj_bias))?;
        let split = |t: &Tensor| -> Result<Tensor> {
            Ok(t.f_view([b, l, self.heads, head_dim])?.f_transpose(1, 2)?)
        };
        let parts = qkv.f_chunk(3, -1)?;
        let (q, k, v) = (split(&parts[0])?, split(&parts[1])?, split(&parts[2])?);
        let y = Tensor::f_scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<Tensor>,
            0.0,
            causal,
            None,
            false,
        )?;
        let y = y.f_transpose(1, 2)?.f_reshape([b, l, w])?;
        self.out_proj.forward(&y)
    }

    pub fn state_dict_into(&self, prefix: &str, out: &mut NamedTensors) {
        push(out, prefix, "in_proj_weight", &self.in_proj_weight);
        push(out, prefix, "in_proj_bias", &self.in_proj_bias);
        self.out_proj
            .state_dict_into(&join(prefix, "out_proj"), out);
    }
}

/// open_clip's MLP: `c_fc` -> activation -> `c_proj` (both `nn.Linear` with bias).
#[derive(Debug)]
pub struct Mlp {
    pub c_fc: Linear,
    pub c_proj: Linear,
    act: Activation,
}

impl Mlp {
    pub fn new(p: &nn::Path, cfg: &BlockConfig) -> Result<Self> {
        let (w, h) = (cfg.width, cfg.mlp_width);
        Ok(Self {
            c_fc: Linear::new(
                &p.sub("c_fc"),
                w,
                h,
                cfg.init.c_fc_weight,
                Some(torch_default_uniform(w)),
            )?,
            c_proj: Linear::new(
                &p.sub("c_proj"),
                h,
                w,
                cfg.init.c_proj_weight,
                Some(torch_default_uniform(h)),
            )?,
            act: cfg.act,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.act.forward(&self.c_fc.forward(x)?)?;
        self.c_proj.forward(&h)
    }

    pub fn state_dict_into(&self, prefix: &str, out: &mut NamedTensors) {
        self.c_fc.state_dict_into(&join(prefix, "c_fc"), out);
        self.c_proj.state_dict_into(&join(prefix, "c_proj"), out);
    }
}

/// `LayerScale`: a learned per-channel scale `gamma`.
#[derive(Debug)]
pub struct LayerScale {
    pub gamma: Tensor,
}

impl LayerScale {
    pub fn new(p: &nn::Path, dim: i64, init_value: f64) -> Result<Self> {
        Ok(Self {
            gamma: p.f_var("gamma", &[dim], Init::Const(init_value))?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.f_mul(&self.gamma)?)
    }
}

/// open_clip's `ResidualAttentionBlock`:
/// `x = x + ls_1(attn(ln_1(x)))`, `x = x + ls_2(mlp(ln_2(x)))`.
#[derive(Debug)]
pub struct ResidualAttentionBlock {
    pub ln_1: LayerNorm,
    pub attn: Attention,
    pub ls_1: Option<LayerScale>,
    pub ln_2: LayerNorm,
    pub mlp: Mlp,
    pub ls_2: Option<LayerScale>,
}

impl ResidualAttentionBlock {
    pub fn new(p: &nn::Path, cfg: &BlockConfig) -> Result<Self> {
        let ls = |name: &str| -> Result<Option<LayerScale>> {
            cfg.ls_init_value
                .map(|v| LayerScale::new(&p.sub(name), cfg.width, v))
                .transpose()
        };
        Ok(Self {
            ln_1: LayerNorm::new(&p.sub("ln_1"), cfg.width, cfg.ln_eps)?,
            attn: Attention::new(&p.sub("attn"), cfg)?,
            ls_1: ls("ls_1")?,
            ln_2: LayerNorm::new(&p.sub("ln_2"), cfg.width, cfg.ln_eps)?,
            mlp: Mlp::new(&p.sub("mlp"), cfg)?,
            ls_2: ls("ls_2")?,
        })
    }

    pub fn forward(&self, x: &Tensor, causal: bool) -> Result<Tensor> {
        let scale = |ls: &Option<LayerScale>, t: Tensor| -> Result<Tensor> {
            match ls {
                Some(ls) => ls.forward(&t),
                None => Ok(t),
            }
        };
        let a = self.attn.forward(&self.ln_1.forward(x)?, causal)?;
        let x = x.f_add(&scale(&self.ls_1, a)?)?;
        let m = self.mlp.forward(&self.ln_2.forward(&x)?)?;
        Ok(x.f_add(&scale(&self.ls_2, m)?)?)
    }

    pub fn state_dict_into(&self, prefix: &str, out: &mut NamedTensors) {
        self.ln_1.state_dict_into(&join(prefix, "ln_1"), out);
        self.attn.state_dict_into(&join(prefix, "attn"), out);
        if let Some(ls) = &self.ls_1 {
            push(out, &join(prefix, "ls_1"), "gamma", &ls.gamma);
        }
        self.ln_2.state_dict_into(&join(prefix, "ln_2"), out);
        self.mlp.state_dict_into(&join(prefix, "mlp"), out);
        if let Some(ls) = &self.ls_2 {
            push(out, &join(prefix, "ls_2"), "gamma", &ls.gamma);
        }
    }
}

/// open_clip's `Transformer`: `resblocks.{i}`.
#[derive(Debug)]
pub struct Transformer {
    pub resblocks: Vec<ResidualAttentionBlock>,
}

impl Transformer {
    pub fn new(p: &nn::Path, layers: i64, cfg: &BlockConfig) -> Result<Self> {
        let blocks = p.sub("resblocks");
        let resblocks = (0..layers)
            .map(|i| ResidualAttentionBlock::new(&blocks.sub(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { resblocks })
    }

    pub fn forward(&self, x: &Tensor, causal: bool) -> Result<Tensor> {
        let mut x = x.shallow_clone();
        for block in &self.resblocks {
            x = block.forward(&x, causal)?;
        }
        Ok(x)
    }

    pub fn state_dict_into(&self, prefix: &str, out: &mut NamedTensors) {
        for (i, block) in self.resblocks.iter().enumerate() {
            block.state_dict_into(&format!("{}.{i}", join(prefix, "resblocks")), out);
        }
    }
}

/// `F.normalize(x, dim=-1)`: x / max(||x||_2, 1e-12) along the last dimension.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x
        .f_norm_scalaropt_dim(2, [-1i64].as_slice(), true)?
        .f_clamp_min(1e-12)?;
    Ok(x.f_div(&norm)?)
}

/// The floating kind new activations should have to match a weight (inputs are cast to it).
pub(crate) fn float_kind_of(weight: &Tensor) -> Kind {
    match weight.kind() {
        k @ (Kind::Half | Kind::BFloat16 | Kind::Float | Kind::Double) => k,
        _ => Kind::Float,
    }
}
