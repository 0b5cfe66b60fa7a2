//! One optimizer step of HQ-CLIP training:
//! `L = 0.5 L_i2t + 0.5 L_t2i + alpha L_HNI + beta L_cls` (method.md, Stage 2), each part behind a
//! switch, on the fused loss kernels of `hq-kernels`.
//!
//! With several micro-batches per step (gradient accumulation) the losses are taken over the
//! whole step's batch, as open_clip's `--accum-freq` does: a first pass without gradients caches
//! every micro-batch's features; then each micro-batch is run again with gradients, its features
//! put in place of its cached ones, and the full-batch loss back-propagated. The gradients summed
//! over the micro-batches are the full batch's gradient, with one micro-batch of activations in
//! memory at a time (at the price of one more forward pass).

use hq_kernels::TagTargets;
use tch::{Device, Kind, Tensor};

use crate::config::{LossParts, StcReduction};
use crate::data::Batch;
use crate::model::{l2_normalize, Clip, StcHead};
use crate::optim::AdamW;
use crate::TrainError;

/// What a step optimises and how.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Objective {
    pub parts: LossParts,
    /// alpha.
    pub hni_weight: f64,
    /// beta.
    pub stc_weight: f64,
    /// L_cls summed (the formula) or averaged over the K tags.
    pub stc_reduction: StcReduction,
    /// Run the forward passes under bf16 autocast (CUDA).
    pub autocast: bool,
    /// Global gradient-norm clip.
    pub grad_clip: Option<f64>,
    /// `logit_scale` is clamped to `[0, ln(max_logit_scale)]` after the update.
    pub max_logit_scale: f64,
}

/// The numbers of one step (losses are unweighted unless named so).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StepStats {
    pub loss: f64,
    pub loss_clip: f64,
    pub loss_hni: f64,
    pub loss_stc: f64,
    /// Fraction of samples whose HNI gate was open (their own text ranked first).
    pub hni_gate_open: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// exp(logit_scale) after the step.
    pub logit_scale: f64,
    pub samples: usize,
}

/// One micro-batch's features (all `[n, D]` L2-normalised, negatives `[n, N-, D]`).
struct Features {
    image: Tensor,
    text: Tensor,
    negatives: Option<Tensor>,
    tag_logits: Option<Tensor>,
}

impl Features {
    fn detach(&self) -> Features {
        Features {
            image: self.image.detach(),
            text: self.text.detach(),
            negatives: self.negatives.as_ref().map(Tensor::detach),
            tag_logits: self.tag_logits.as_ref().map(Tensor::detach),
        }
    }
}

/// The parts of a step's batch the losses need besides features.
struct Targets {
    has_negative: Option<Tensor>,
    tags: Option<TagTargets>,
}

fn features(
    model: &Clip,
    stc: Option<&StcHead>,
    batch: &Batch,
    parts: LossParts,
    device: Device,
) -> Result<Features, TrainError> {
    let images = batch.images.f_to_device(device)?;
    let n = batch.len() as i64;
    let raw_image = model.encode_image(&images)?;
    let image = l2_normalize(&raw_image)?;
    let tag_logits = match (parts.stc, stc) {
        (true, Some(head)) => Some(head.forward(&raw_image)?),
        _ => None,
    };
    // Positives and negatives go through the text tower in one call.
    let n_neg = batch.negatives_per_sample as i64;
    let (text, negatives) = if parts.hni && n_neg > 0 {
        let both = Tensor::f_cat(&[&batch.texts, &batch.negatives], 0)?.f_to_device(device)?;
        let all = l2_normalize(&model.encode_text(&both)?)?;
        let text = all.f_narrow(0, 0, n)?;
        let neg = all.f_narrow(0, n, n * n_neg)?;
        let d = neg.size()[1];
        (text, Some(neg.f_view([n, n_neg, d])?))
    } else {
        let texts = batch.texts.f_to_device(device)?;
        (l2_normalize(&model.encode_text(&texts)?)?, None)
    };
    Ok(Features {
        image,
        text,
        negatives,
        tag_logits,
    })
}

fn cat_field(
    parts: &[&Features],
    f: impl Fn(&Features) -> Option<&Tensor>,
) -> Result<Option<Tensor>, TrainError> {
    let ts: Option<Vec<&Tensor>> = parts.iter().map(|p| f(p)).collect();
    match ts {
        Some(ts) if ts.len() == 1 => Ok(Some(ts[0].shallow_clone())),
        Some(ts) => Ok(Some(Tensor::f_cat(&ts, 0)?)),
        None => Ok(None),
    }
}

fn concat(parts: &[&Features]) -> Result<Features, TrainError> {
    Ok(Features {
        image: cat_field(parts, |p| Some(&p.image))?
            .ok_or_else(|| TrainError::DataLoader("empty step".into()))?,
        text: cat_field(parts, |p| Some(&p.text))?
            .ok_or_else(|| TrainError::DataLoader("empty step".into()))?,
        negatives: cat_field(parts, |p| p.negatives.as_ref())?,
        tag_logits: cat_field(parts, |p| p.tag_logits.as_ref())?,
    })
}

fn targets(batches: &[Batch], parts: LossParts, device: Device) -> Result<Targets, TrainError> {
    let has_negative = if parts.hni {
        let masks: Vec<&Tensor> = batches.iter().map(|b| &b.has_negative).collect();
        Some(
            Tensor::f_cat(&masks, 0)?
                .f_to_kind(Kind::Float)?
                .f_to_device(device)?,
        )
    } else {
        None
    };
    let tags = if parts.stc {
        let mut indptr = vec![0i64];
        let mut indices = Vec::new();
        for b in batches {
            let base = indices.len() as i64;
            indices.extend_from_slice(&b.tag_indices);
            indptr.extend(b.tag_offsets.iter().skip(1).map(|o| o + base));
        }
        Some(TagTargets::new(indptr, indices)?)
    } else {
        None
    };
    Ok(Targets { has_negative, tags })
}

/// The objective over a whole step's features: `(total, clip, hni, stc, open gates)`.
fn loss(
    f: &Features,
    t: &Targets,
    scale: &Tensor,
    obj: &Objective,
) -> Result<(Tensor, [f64; 4]), TrainError> {
    let clip = hq_kernels::clip_loss(&f.image, &f.text, scale)?;
    let mut total = clip.loss.shallow_clone();
    let (mut hni_v, mut stc_v, mut gate_open) = (0.0, 0.0, 0.0);
    if let (Some(neg), Some(mask)) = (&f.negatives, &t.has_negative) {
        // Samples without a generated negative take no part (their row is padding).
        let gate = clip.gate.f_mul(mask)?;
        gate_open = gate.f_mean(Kind::Float)?.f_double_value(&[])?;
        let hni = hq_kernels::hni_loss(&f.image, &f.text, neg, scale, 0, Some(&gate))?;
        hni_v = hni.f_double_value(&[])?;
        total = total.f_add(&hni.f_mul_scalar(obj.hni_weight)?)?;
    }
    if let (Some(logits), Some(tags)) = (&f.tag_logits, &t.tags) {
        let mut stc = hq_kernels::short_tag_bce(logits, tags)?;
        if obj.stc_reduction == StcReduction::Mean {
            stc = stc.f_div_scalar(logits.size()[1] as f64)?;
        }
        stc_v = stc.f_double_value(&[])?;
        total = total.f_add(&stc.f_mul_scalar(obj.stc_weight)?)?;
    }
    let clip_v = clip.loss.f_double_value(&[])?;
    Ok((total, [clip_v, hni_v, stc_v, gate_open]))
}

/// Runs `f` under autocast when `on`.
fn maybe_autocast<T>(on: bool, f: impl FnOnce() -> T) -> T {
    if on {
        tch::autocast(true, f)
    } else {
        f()
    }
}

/// Forward, backward and update for one optimizer step over `batches` (one per micro-batch) at
/// learning rate `lr`. Gradients are cleared first. `step` is only used in error messages.
#[allow(clippy::too_many_arguments)]
pub fn train_step(
    model: &Clip,
    stc: Option<&StcHead>,
    optimizer: &mut AdamW,
    batches: &[Batch],
    obj: &Objective,
    lr: f64,
    device: Device,
    step: u64,
) -> Result<StepStats, TrainError> {
    if batches.is_empty() {
        return Err(TrainError::DataLoader(
            "a step needs at least one batch".into(),
        ));
    }
    if obj.parts.stc && stc.is_none() {
        return Err(TrainError::Config {
            field: "loss.stc".into(),
            reason: "the STC loss is on but the model has no STC head".into(),
        });
    }
    optimizer.zero_grad();
    let tgt = targets(batches, obj.parts, device)?;
    let samples: usize = batches.iter().map(Batch::len).sum();
    let scale = model.logit_scale.f_exp()?;
    let (total, values) = if batches.len() == 1 {
        let f = maybe_autocast(obj.autocast, || {
            features(model, stc, &batches[0], obj.parts, device)
        })?;
        let (total, values) = loss(&f, &tgt, &scale, obj)?;
        total.f_backward()?;
        (total.f_double_value(&[])?, values)
    } else {
        let cached = tch::no_grad(|| {
            batches
                .iter()
                .map(|b| {
                    maybe_autocast(obj.autocast, || features(model, stc, b, obj.parts, device))
                })
                .collect::<Result<Vec<_>, TrainError>>()
        })?;
        let mut last = (0.0, [0.0; 4]);
        for (j, b) in batches.iter().enumerate() {
            let live = maybe_autocast(obj.autocast, || features(model, stc, b, obj.parts, device))?;
            let detached: Vec<Features> = cached.iter().map(Features::detach).collect();
            let mut refs: Vec<&Features> = detached.iter().collect();
            refs[j] = &live;
            let all = concat(&refs)?;
            // A fresh exp(logit_scale) per backward: each builds its own graph.
            let scale = model.logit_scale.f_exp()?;
            let (total, values) = loss(&all, &tgt, &scale, obj)?;
            total.f_backward()?;
            last = (total.f_double_value(&[])?, values);
        }
        last
    };
    if !total.is_finite() {
        return Err(TrainError::Diverged {
            step,
            what: format!(
                "loss {total} (contrastive {}, HNI {}, STC {}); lower the learning rate or check \
                 the data",
                values[0], values[1], values[2]
            ),
        });
    }
    let grad_norm = match obj.grad_clip {
        Some(max) => optimizer.clip_grad_norm(max)?,
        None => optimizer.grad_norm()?,
    };
    if !grad_norm.is_finite() {
        return Err(TrainError::Diverged {
            step,
            what: format!("gradient norm {grad_norm}"),
        });
    }
    optimizer.step(lr)?;
    model.clamp_logit_scale(obj.max_logit_scale)?;
    Ok(StepStats {
        loss: total,
        loss_clip: values[0],
        loss_hni: values[1],
        loss_stc: values[2],
        hni_gate_open: values[3],
        grad_norm,
        logit_scale: model
            .logit_scale
            .f_exp()?
            .f_view([-1])?
            .f_double_value(&[0])?,
        samples,
    })
}
