//! AdamW over tch tensors, written out so that its state (the two moments per parameter and the
//! step count) is ours to save in a checkpoint and restore exactly.
//!
//! The update is `torch.optim.AdamW`'s single-tensor path (`foreach=False`, `amsgrad=False`,
//! `maximize=False`), operation for operation:
//! ```text
//! p      *= 1 - lr * wd                      (decoupled weight decay; only decayed params)
//! m      += (g - m) * (1 - beta1)            (lerp)
//! v       = v * beta2 + (1 - beta2) * g * g
//! denom   = sqrt(v) / sqrt(1 - beta2^t) + eps
//! p      -= lr / (1 - beta1^t) * m / denom
//! ```
//! A parameter without a gradient this step is left alone (its moments too), as torch does. The
//! step count `t` is shared (torch keeps one per parameter; they are equal unless a parameter
//! skipped steps, which this loop never does).

use tch::{Kind, Tensor};

use crate::model::NamedTensors;
use crate::TrainError;

/// AdamW's hyper-parameters (the learning rate comes per step from the schedule).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// open_clip / DataComp settings: betas (0.9, 0.98), eps 1e-6, weight decay 0.2.
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-6,
            weight_decay: 0.2,
        }
    }
}

struct ParamState {
    name: String,
    param: Tensor,
    decay: bool,
    /// Multiplier of the step's learning rate for this parameter (1 but for new heads trained at
    /// their own rate).
    lr_scale: f64,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// The optimizer: parameters (shallow clones of the model's variables), their decay flag and
/// moments.
pub struct AdamW {
    config: AdamWConfig,
    params: Vec<ParamState>,
    step: u64,
}

impl AdamW {
    /// `params` with `decay[i]` telling whether parameter i gets weight decay.
    pub fn new(
        config: AdamWConfig,
        params: NamedTensors,
        decay: impl Fn(&str, &Tensor) -> bool,
    ) -> Result<Self, TrainError> {
        let params = params
            .into_iter()
            .map(|(name, param)| {
                let decay = decay(&name, &param);
                let exp_avg = param.f_zeros_like()?.f_detach()?;
                let exp_avg_sq = param.f_zeros_like()?.f_detach()?;
                Ok(ParamState {
                    name,
                    param,
                    decay,
                    lr_scale: 1.0,
                    exp_avg,
                    exp_avg_sq,
                })
            })
            .collect::<Result<Vec<_>, TrainError>>()?;
        Ok(AdamW {
            config,
            params,
            step: 0,
        })
    }

    /// Sets each parameter's learning-rate multiplier by name (`head_lr / lr` for new heads).
    pub fn set_lr_scales(&mut self, scale: impl Fn(&str) -> f64) {
        for p in &mut self.params {
            p.lr_scale = scale(&p.name);
        }
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// Updates taken so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Names of the parameters with and without weight decay.
    pub fn groups(&self) -> (Vec<&str>, Vec<&str>) {
        let decayed = self
            .params
            .iter()
            .filter(|p| p.decay)
            .map(|p| p.name.as_str())
            .collect();
        let plain = self
            .params
            .iter()
            .filter(|p| !p.decay)
            .map(|p| p.name.as_str())
            .collect();
        (decayed, plain)
    }

    /// The parameters, in the optimizer's (fixed) order.
    pub fn parameters(&self) -> impl Iterator<Item = &Tensor> {
        self.params.iter().map(|p| &p.param)
    }

    /// Clears every parameter's gradient.
    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            let mut g = p.param.grad();
            if g.defined() {
                let _ = g.detach_();
                let _ = g.zero_();
            }
        }
    }

    /// The global L2 norm of all gradients (f64 accumulation).
    pub fn grad_norm(&self) -> Result<f64, TrainError> {
        let mut total = 0f64;
        for p in &self.params {
            let g = p.param.grad();
            if g.defined() {
                let n = g.f_to_kind(Kind::Double)?.f_square()?.f_sum(Kind::Double)?;
                total += n.f_double_value(&[])?;
            }
        }
        Ok(total.sqrt())
    }

    /// Scales all gradients so their global norm is at most `max_norm`, as
    /// `torch.nn.utils.clip_grad_norm_` (coefficient `max_norm / (norm + 1e-6)`, applied only when
    /// below 1). Returns the norm before clipping.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> Result<f64, TrainError> {
        let norm = self.grad_norm()?;
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            tch::no_grad(|| -> Result<(), TrainError> {
                for p in &self.params {
                    let mut g = p.param.grad();
                    if g.defined() {
                        let _ = g.f_mul_scalar_(coef)?;
                    }
                }
                Ok(())
            })?;
        }
        Ok(norm)
    }

    /// One AdamW update at learning rate `lr`.
    pub fn step(&mut self, lr: f64) -> Result<(), TrainError> {
        self.step += 1;
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.config;
        let t = self.step as i32;
        let bias_correction1 = 1.0 - beta1.powi(t);
        let bias_correction2 = 1.0 - beta2.powi(t);
        let bias_correction2_sqrt = bias_correction2.sqrt();
        tch::no_grad(|| -> Result<(), TrainError> {
            for p in &mut self.params {
                let grad = p.param.grad();
                if !grad.defined() {
                    continue;
                }
                let grad = if grad.kind() == p.param.kind() {
                    grad
                } else {
                    grad.f_to_kind(p.param.kind())?
                };
                // `lr * 1.0` is `lr` exactly: parameters at the base rate update as before.
                let lr = lr * p.lr_scale;
                let step_size = lr / bias_correction1;
                let mut param = p.param.shallow_clone();
                if p.decay && weight_decay != 0.0 {
                    let _ = param.f_mul_scalar_(1.0 - lr * weight_decay)?;
                }
                let _ = p.exp_avg.f_lerp_(&grad, 1.0 - beta1)?;
                let _ = p.exp_avg_sq.f_mul_scalar_(beta2)?;
                let _ = p
                    .exp_avg_sq
                    .f_addcmul_(&grad, &(grad.f_mul_scalar(1.0 - beta2)?))?;
                // One temporary for the denominator, scaled and shifted in place (same values
                // as out-of-place ops; fewer large allocations, whose page faults showed up in
                // profiles of small models).
                let mut denom = p.exp_avg_sq.f_sqrt()?;
                let _ = denom.f_div_scalar_(bias_correction2_sqrt)?;
                let _ = denom.f_add_scalar_(eps)?;
                let _ = param.f_addcdiv_(&p.exp_avg.f_mul_scalar(-step_size)?, &denom)?;
            }
            Ok(())
        })
    }

    /// The moments as named tensors: `exp_avg.<param>` and `exp_avg_sq.<param>`.
    pub fn state_tensors(&self) -> NamedTensors {
        let mut out = Vec::with_capacity(2 * self.params.len());
        for p in &self.params {
            out.push((format!("exp_avg.{}", p.name), p.exp_avg.shallow_clone()));
            out.push((
                format!("exp_avg_sq.{}", p.name),
                p.exp_avg_sq.shallow_clone(),
            ));
        }
        out
    }

    /// Restores the moments saved by [`AdamW::state_tensors`] and the step count. Every
    /// parameter's moments must be there with its shape.
    pub fn load_state(
        &mut self,
        tensors: &std::collections::BTreeMap<String, Tensor>,
        step: u64,
    ) -> Result<(), String> {
        let mut problems = Vec::new();
        for p in &self.params {
            for (key, _) in [("exp_avg", 0), ("exp_avg_sq", 1)] {
                let name = format!("{key}.{}", p.name);
                match tensors.get(&name) {
                    None => problems.push(format!("{name} missing")),
                    Some(t) if t.size() != p.param.size() => problems.push(format!(
                        "{name} has shape {:?}, the parameter {:?}",
                        t.size(),
                        p.param.size()
                    )),
                    Some(_) => {}
                }
            }
        }
        let expected = 2 * self.params.len();
        if tensors.len() != expected {
            problems.push(format!(
                "{} tensors, expected {expected} (two per parameter)",
                tensors.len()
            ));
        }
        if !problems.is_empty() {
            return Err(format!(
                "optimizer state does not fit the model: {}",
                problems.into_iter().take(10).collect::<Vec<_>>().join("; ")
            ));
        }
        tch::no_grad(|| -> Result<(), String> {
            for p in &mut self.params {
                for (key, dst) in [
                    ("exp_avg", &mut p.exp_avg),
                    ("exp_avg_sq", &mut p.exp_avg_sq),
                ] {
                    let src = &tensors[&format!("{key}.{}", p.name)];
                    dst.f_copy_(src).map_err(|e| e.to_string())?;
                }
            }
            Ok(())
        })?;
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A parameter at learning-rate scale s moves s times as far as one at scale 1 (same
    /// gradient, no decay); scale 1 is the plain update.
    #[test]
    fn lr_scales_scale_the_update() {
        let make = || Tensor::from_slice(&[1.0f32, -2.0, 0.5]).set_requires_grad(true);
        let (a, b) = (make(), make());
        let params = vec![
            ("head.w".to_string(), a.shallow_clone()),
            ("w".to_string(), b.shallow_clone()),
        ];
        let cfg = AdamWConfig {
            weight_decay: 0.0,
            ..AdamWConfig::default()
        };
        let mut opt = AdamW::new(cfg, params, |_, _| false).expect("adamw");
        opt.set_lr_scales(|n| if n.starts_with("head.") { 0.25 } else { 1.0 });
        for t in [&a, &b] {
            (t * Tensor::from_slice(&[3.0f32, -1.0, 2.0]))
                .sum(Kind::Float)
                .backward();
        }
        opt.step(1e-2).expect("step");
        let moved = |t: &Tensor| Vec::<f64>::try_from(t.detach() - make().detach()).expect("vec");
        for (da, db) in moved(&a).iter().zip(moved(&b)) {
            // f32 parameters near 2 round to 2.4e-7; x4 amplifies the smaller update's rounding.
            assert!((da * 4.0 - db).abs() < 2e-6, "{da} x 4 vs {db}");
            assert!(db.abs() > 1e-3);
        }
    }
}
