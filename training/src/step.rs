//! One optimizer step of HQ-CLIP training:
//! `L = 0.5 L_i2t + 0.5 L_t2i + alpha L_HNI + beta L_cls` (method.md, Stage 2), each part behind a
//! switch, on the fused loss kernels of `hq-kernels`.
//!
//! With several micro-batches per step (gradient accumulation) the losses are taken over the
//! whole step's batch, as open_clip's `--accum-freq` does: a first pass without gradients caches
//! every micro-batch's features; then each micro-batch is run again with gradients, its features
//! put in place of its cached ones, and the full-batch loss back-propagated. The gradients summed
//! over the micro-batches are the full batch's gradient, with one micro-batch of activations in
//! memory at a time (at the price of one more forward pass). The logit scale takes its gradient
//! from the first pass only (open_clip sums it over the passes: `accum-freq` times too large).
//!
//! Hard negatives are encoded only for the rows whose HNI gate is open (the row's own text ranks
//! first in the batch) and that have a generated negative. The gate is a by-product of the
//! contrastive loss and gets no gradient, and a closed row adds exactly zero to L_HNI and to every
//! gradient, so skipping its negatives changes nothing but the cost: the HNI loss then costs the
//! text tower `open fraction x N-` extra texts per sample instead of `N-` (the fraction is
//! `hni_gate_open` in the metrics: near 0 at initialisation, rising as training learns the easy
//! negatives).
//!
//! Across ranks (data parallelism, [`train_step_on`] with a process group) the step is the same
//! step over the global batch (every rank's rows in rank order): the features are all-gathered
//! (one micro-batch: computed once with gradients, their values gathered; several: a first pass
//! without gradients, as above), each micro-batch pass takes the contrastive loss over the whole
//! gathered batch with only its own rows live, HNI and STC over its own rows divided by the global
//! batch size, and the gradients are summed over the ranks (see `crate::distributed`). The HNI
//! gate is each row's argmax over the global batch. Every rank computes the whole N x N
//! contrastive loss (its cost is small beside the towers'; the local-rows form with the gathered
//! features' gradients sent back to their owners would divide it by the world size).

use hq_dist::ProcessGroup;
use hq_kernels::TagTargets;
use tch::{Device, Kind, Tensor};

use crate::config::{LossParts, StcReduction};
use crate::data::Batch;
use crate::distributed::{self, OverlappedGradients, Ranks};
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

/// One micro-batch's features (`[n, D]` L2-normalised; tag logits `[n, K]`).
struct Features {
    image: Tensor,
    text: Tensor,
    tag_logits: Option<Tensor>,
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
    let raw_image = model.encode_image(&images)?;
    let image = l2_normalize(&raw_image)?;
    let tag_logits = match (parts.stc, stc) {
        (true, Some(head)) => Some(head.forward(&raw_image)?),
        _ => None,
    };
    let texts = batch.texts.f_to_device(device)?;
    let text = l2_normalize(&model.encode_text(&texts)?)?;
    Ok(Features {
        image,
        text,
        tag_logits,
    })
}

/// Positions (ascending) of the step's rows whose HNI term is live: gate open and a generated
/// negative present. Every other row adds exactly zero to L_HNI and to its gradients.
fn open_rows(gate: &Tensor, has_negative: &Tensor) -> Result<Vec<i64>, TrainError> {
    let open = gate
        .f_mul(has_negative)?
        .f_gt(0.5)?
        .f_nonzero()?
        .f_view([-1])?
        .f_to_device(Device::Cpu)?;
    Ok(Vec::<i64>::try_from(&open)?)
}

/// `rows` (ascending positions in the step's batch) split per micro-batch, as positions within it.
fn split_rows(rows: &[i64], batches: &[Batch]) -> Vec<Vec<i64>> {
    let mut start = 0i64;
    batches
        .iter()
        .map(|b| {
            let end = start + b.len() as i64;
            let local = rows
                .iter()
                .filter(|&&r| r >= start && r < end)
                .map(|&r| r - start)
                .collect();
            start = end;
            local
        })
        .collect()
}

/// L2-normalised embeddings `[rows, N-, D]` of the hard negatives of `rows` (positions in
/// `batch`); `None` for no rows.
fn negative_features(
    model: &Clip,
    batch: &Batch,
    rows: &[i64],
    device: Device,
) -> Result<Option<Tensor>, TrainError> {
    if rows.is_empty() {
        return Ok(None);
    }
    let k = batch.negatives_per_sample as i64;
    let index: Vec<i64> = rows
        .iter()
        .flat_map(|&r| (0..k).map(move |j| r * k + j))
        .collect();
    let tokens = batch
        .negatives
        .f_index_select(0, &Tensor::from_slice(&index))?
        .f_to_device(device)?;
    let embeddings = l2_normalize(&model.encode_text(&tokens)?)?;
    let d = embeddings.size()[1];
    Ok(Some(embeddings.f_view([rows.len() as i64, k, d])?))
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

/// The objective over a whole step's features, given the contrastive loss already taken over
/// them: `(total, [clip, hni, stc, open-gate fraction])`. `open` are the live HNI rows and
/// `negatives` their negatives' embeddings `[open, N-, D]` (`None` when no row is open).
fn loss(
    f: &Features,
    clip: Tensor,
    open: &[i64],
    negatives: Option<&Tensor>,
    t: &Targets,
    scale: &Tensor,
    obj: &Objective,
) -> Result<(Tensor, [f64; 4]), TrainError> {
    let n = f.image.size()[0];
    let mut total = clip.shallow_clone();
    let (mut hni_v, mut stc_v) = (0.0, 0.0);
    if let Some(neg) = negatives {
        let hni = hni_over_rows(f, open, neg, scale, n as f64)?;
        hni_v = hni.f_double_value(&[])?;
        total = total.f_add(&hni.f_mul_scalar(obj.hni_weight)?)?;
    }
    if let (Some(logits), Some(tags)) = (&f.tag_logits, &t.tags) {
        let stc = stc_mean(logits, tags, obj.stc_reduction)?;
        stc_v = stc.f_double_value(&[])?;
        total = total.f_add(&stc.f_mul_scalar(obj.stc_weight)?)?;
    }
    let clip_v = clip.f_double_value(&[])?;
    let gate_open = open.len() as f64 / n as f64;
    Ok((total, [clip_v, hni_v, stc_v, gate_open]))
}

/// L_HNI of the live rows `rows` of `f` (their negatives' embeddings `neg`, `[rows, N-, D]`),
/// normalised by `n` rows: the closed rows add zero to its sum.
fn hni_over_rows(
    f: &Features,
    rows: &[i64],
    neg: &Tensor,
    scale: &Tensor,
    n: f64,
) -> Result<Tensor, TrainError> {
    let device = f.image.device();
    let index = Tensor::from_slice(rows).f_to_device(device)?;
    let (x, y) = (
        f.image.f_index_select(0, &index)?,
        f.text.f_index_select(0, &index)?,
    );
    let m = rows.len() as i64;
    let all_open = Tensor::f_ones([m], (Kind::Float, device))?;
    Ok(hq_kernels::hni_loss(&x, &y, neg, scale, 0, Some(&all_open))?.f_mul_scalar(m as f64 / n)?)
}

/// L_cls over the rows of `logits`: their mean, summed (the formula) or averaged over the K tags.
fn stc_mean(
    logits: &Tensor,
    tags: &TagTargets,
    reduction: StcReduction,
) -> Result<Tensor, TrainError> {
    let stc = hq_kernels::short_tag_bce(logits, tags)?;
    Ok(match reduction {
        StcReduction::Mean => stc.f_div_scalar(logits.size()[1] as f64)?,
        StcReduction::Sum => stc,
    })
}

/// Runs `f` under autocast when `on`.
fn maybe_autocast<T>(on: bool, f: impl FnOnce() -> T) -> T {
    if on {
        tch::autocast(true, f)
    } else {
        f()
    }
}

/// Forward and backward of the step's objective over `batches` (one per micro-batch): adds the
/// gradients of the total loss to the parameters' `.grad` and returns `(total, [clip, hni, stc,
/// open-gate fraction])`. [`train_step`] is this plus clipping and the update.
pub fn accumulate_gradients(
    model: &Clip,
    stc: Option<&StcHead>,
    batches: &[Batch],
    obj: &Objective,
    device: Device,
) -> Result<(f64, [f64; 4]), TrainError> {
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
    let tgt = targets(batches, obj.parts, device)?;
    if let [batch] = batches {
        let f = maybe_autocast(obj.autocast, || {
            features(model, stc, batch, obj.parts, device)
        })?;
        let scale = model.logit_scale.f_exp()?;
        let clip = hq_kernels::clip_loss(&f.image, &f.text, &scale)?;
        let open = match &tgt.has_negative {
            Some(mask) => open_rows(&clip.gate, mask)?,
            None => Vec::new(),
        };
        let neg = maybe_autocast(obj.autocast, || {
            negative_features(model, batch, &open, device)
        })?;
        let (total, values) = loss(&f, clip.loss, &open, neg.as_ref(), &tgt, &scale, obj)?;
        total.f_backward()?;
        return Ok((total.f_double_value(&[])?, values));
    }
    // Accumulation: the gate comes from the whole step's features, so the open rows (and the
    // negatives worth encoding) are known before any pass with gradients.
    let (cached, open, local_open, cached_neg) = tch::no_grad(|| {
        let cached = batches
            .iter()
            .map(|b| maybe_autocast(obj.autocast, || features(model, stc, b, obj.parts, device)))
            .collect::<Result<Vec<_>, TrainError>>()?;
        let open = match &tgt.has_negative {
            Some(mask) => {
                let all = concat(&cached.iter().collect::<Vec<_>>())?;
                let scale = model.logit_scale.f_exp()?;
                let gate = hq_kernels::clip_loss(&all.image, &all.text, &scale)?.gate;
                open_rows(&gate, mask)?
            }
            None => Vec::new(),
        };
        let local_open = split_rows(&open, batches);
        let cached_neg = batches
            .iter()
            .zip(&local_open)
            .map(|(b, rows)| {
                maybe_autocast(obj.autocast, || negative_features(model, b, rows, device))
            })
            .collect::<Result<Vec<_>, TrainError>>()?;
        Ok::<_, TrainError>((cached, open, local_open, cached_neg))
    })?;
    let mut last = (0.0, [0.0; 4]);
    for (j, b) in batches.iter().enumerate() {
        let live = maybe_autocast(obj.autocast, || features(model, stc, b, obj.parts, device))?;
        let live_neg = maybe_autocast(obj.autocast, || {
            negative_features(model, b, &local_open[j], device)
        })?;
        // The cached features were computed without gradients: only micro-batch j's are live.
        let mut refs: Vec<&Features> = cached.iter().collect();
        refs[j] = &live;
        let all = concat(&refs)?;
        let negs: Vec<&Tensor> = cached_neg
            .iter()
            .enumerate()
            .filter_map(|(i, t)| {
                if i == j {
                    live_neg.as_ref()
                } else {
                    t.as_ref()
                }
            })
            .collect();
        let neg = if negs.is_empty() {
            None
        } else {
            Some(Tensor::f_cat(&negs, 0)?)
        };
        // A fresh exp(logit_scale) per backward (each builds its own graph), attached only in
        // the first: every pass's loss is the whole step's, so its scale gradient is the whole
        // step's too, and summing it over the passes would count it once per micro-batch (as
        // open_clip's --accum-freq does; the tower gradients are not affected).
        let scale = model.logit_scale.f_exp()?;
        let scale = if j == 0 { scale } else { scale.detach() };
        let clip = hq_kernels::clip_loss(&all.image, &all.text, &scale)?;
        let (total, values) = loss(&all, clip.loss, &open, neg.as_ref(), &tgt, &scale, obj)?;
        total.f_backward()?;
        last = (total.f_double_value(&[])?, values);
    }
    Ok(last)
}

/// The rows of `f` (`[N, D]`) with rows `start..start + live.size()[0]` replaced by `live`.
fn with_live_rows(f: &Tensor, live: &Tensor, start: i64) -> Result<Tensor, TrainError> {
    let (total, n) = (f.size()[0], live.size()[0]);
    let head = f.f_narrow(0, 0, start)?;
    let tail = f.f_narrow(0, start + n, total - start - n)?;
    Ok(Tensor::f_cat(&[&head, live, &tail], 0)?)
}

/// [`accumulate_gradients`] for one rank of a data-parallel step (see the module docs): adds this
/// rank's share of the global objective's gradient to its parameters' `.grad`; the caller sums
/// the gradients over the ranks. Returns the global `(total, [clip, hni, stc, open fraction])`.
pub fn accumulate_gradients_across_ranks(
    model: &Clip,
    stc: Option<&StcHead>,
    batches: &[Batch],
    obj: &Objective,
    device: Device,
    pg: &ProcessGroup,
    overlap: Option<&OverlappedGradients>,
) -> Result<(f64, [f64; 4]), TrainError> {
    if batches.is_empty() {
        return Err(TrainError::DataLoader(
            "a step needs at least one batch".into(),
        ));
    }
    let n_local: usize = batches.iter().map(Batch::len).sum();
    distributed::same_rows_everywhere(pg, n_local)?;
    let n_global = (n_local * pg.world_size()) as f64;
    // With one micro-batch its features are computed once, with gradients, and their values
    // gathered; with several, a first pass without gradients caches them (as in accumulation).
    let mut first_live = match batches {
        [b] => Some(maybe_autocast(obj.autocast, || {
            features(model, stc, b, obj.parts, device)
        })?),
        _ => None,
    };
    // Every rank's features without gradients, in rank order.
    let (x_all, y_all) = tch::no_grad(|| {
        let local = match &first_live {
            Some(f) => (f.image.f_detach()?, f.text.f_detach()?),
            None => {
                let no_tags = LossParts {
                    stc: false,
                    ..obj.parts
                };
                let cached = batches
                    .iter()
                    .map(|b| {
                        maybe_autocast(obj.autocast, || features(model, None, b, no_tags, device))
                    })
                    .collect::<Result<Vec<_>, TrainError>>()?;
                let all = concat(&cached.iter().collect::<Vec<_>>())?;
                (all.image, all.text)
            }
        };
        Ok::<_, TrainError>((
            distributed::gather_rows(pg, &local.0)?,
            distributed::gather_rows(pg, &local.1)?,
        ))
    })?;
    let (mut clip_value, mut hni_sum, mut stc_sum, mut open) = (0.0, 0.0, 0.0, 0usize);
    let mut start = (pg.rank() * n_local) as i64;
    for (j, b) in batches.iter().enumerate() {
        let live = match first_live.take() {
            Some(f) => f,
            None => maybe_autocast(obj.autocast, || features(model, stc, b, obj.parts, device))?,
        };
        let x = with_live_rows(&x_all, &live.image, start)?;
        let y = with_live_rows(&y_all, &live.text, start)?;
        // The contrastive loss is the same global loss on every rank and pass: its direct
        // logit-scale gradient is taken once (rank 0, first pass), the tower gradients of the
        // live rows everywhere. Its gate of this micro-batch's rows is their argmax over the
        // global batch.
        let scale = model.logit_scale.f_exp()?;
        let scale = if pg.rank() == 0 && j == 0 {
            scale
        } else {
            scale.f_detach()?
        };
        let clip = hq_kernels::clip_loss(&x, &y, &scale)?;
        clip_value = clip.loss.f_double_value(&[])?;
        let mut total = clip.loss;
        let t = targets(std::slice::from_ref(b), obj.parts, device)?;
        let rows = match &t.has_negative {
            Some(mask) => open_rows(&clip.gate.f_narrow(0, start, b.len() as i64)?, mask)?,
            None => Vec::new(),
        };
        open += rows.len();
        if let Some(neg) =
            maybe_autocast(obj.autocast, || negative_features(model, b, &rows, device))?
        {
            // Per-row terms: this rank's rows only, with a live scale of their own.
            let hni = hni_over_rows(&live, &rows, &neg, &model.logit_scale.f_exp()?, n_global)?;
            hni_sum += hni.f_double_value(&[])?;
            total = total.f_add(&hni.f_mul_scalar(obj.hni_weight)?)?;
        }
        if let (Some(logits), Some(tags)) = (&live.tag_logits, &t.tags) {
            let part = stc_mean(logits, tags, obj.stc_reduction)?
                .f_mul_scalar(b.len() as f64 / n_global)?;
            stc_sum += part.f_double_value(&[])?;
            total = total.f_add(&part.f_mul_scalar(obj.stc_weight)?)?;
        }
        if let Some(o) = overlap {
            // The reducer averages over the ranks; the global objective wants their sum.
            total = total.f_mul_scalar(pg.world_size() as f64)?;
            if j + 1 == batches.len() {
                o.prepare(&total)?;
            }
        }
        total.f_backward()?;
        start += b.len() as i64;
    }
    let sums = distributed::sum_over_ranks(pg, &[hni_sum, stc_sum, open as f64])?;
    let (hni, stc_v, open_fraction) = (sums[0], sums[1], sums[2] / n_global);
    let total = clip_value + obj.hni_weight * hni + obj.stc_weight * stc_v;
    Ok((total, [clip_value, hni, stc_v, open_fraction]))
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
    train_step_on(None, model, stc, optimizer, batches, obj, lr, device, step)
}

/// [`train_step`] as one rank of a data-parallel job when `ranks` is given (and has more than
/// one rank): `batches` are this rank's, the step is over every rank's, and every rank ends with
/// the same parameters. `samples` in the result counts the global batch.
#[allow(clippy::too_many_arguments)]
pub fn train_step_on(
    ranks: Option<Ranks<'_>>,
    model: &Clip,
    stc: Option<&StcHead>,
    optimizer: &mut AdamW,
    batches: &[Batch],
    obj: &Objective,
    lr: f64,
    device: Device,
    step: u64,
) -> Result<StepStats, TrainError> {
    optimizer.zero_grad();
    let ranks = ranks.filter(|r| r.group.world_size() > 1);
    let mut samples: usize = batches.iter().map(Batch::len).sum();
    let (total, values) = match ranks {
        None => accumulate_gradients(model, stc, batches, obj, device)?,
        Some(Ranks { group: pg, overlap }) => {
            if optimizer.parameters().any(|p| !p.grad().defined()) {
                distributed::define_gradients(optimizer.parameters())?;
            }
            // A peer that dies mid-step surfaces wherever the step waits for it (a collective,
            // or the reducer inside the backward pass): say which rank stopped.
            let named = |e: TrainError| match e {
                TrainError::Dist(d) => TrainError::Dist(d),
                other => TrainError::Dist(pg.diagnosed(other)),
            };
            let out =
                accumulate_gradients_across_ranks(model, stc, batches, obj, device, pg, overlap)
                    .map_err(named)?;
            match overlap {
                Some(o) => o.finish(pg)?,
                None => {
                    let params: Vec<&Tensor> = optimizer.parameters().collect();
                    distributed::all_reduce_gradients(pg, &params, distributed::BUCKET_BYTES)?;
                }
            }
            samples *= pg.world_size();
            out
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ClipConfig;
    use tch::nn::VarStore;

    const K: i64 = 40;

    /// `n` captions of different lengths, tokenized as the loader does.
    fn batch(cfg: &ClipConfig, n: usize) -> Batch {
        crate::testing::synthetic_batch(cfg, n, K)
    }

    fn objective() -> Objective {
        Objective {
            parts: LossParts {
                mixed_text: true,
                hni: true,
                stc: true,
            },
            hni_weight: 0.5,
            stc_weight: 10.0,
            stc_reduction: StcReduction::Mean,
            autocast: false,
            grad_clip: None,
            max_logit_scale: 100.0,
        }
    }

    fn grads(params: &[(String, Tensor)]) -> Vec<Tensor> {
        params
            .iter()
            .map(|(_, t)| {
                let g = t.grad();
                let g = if g.defined() {
                    g.copy()
                } else {
                    t.zeros_like()
                };
                let mut t = t.shallow_clone();
                t.zero_grad();
                g
            })
            .collect()
    }

    /// The objective written out plainly: every sample's negatives encoded, the gate applied as
    /// the mask of method.md. Returns the total loss, the number of live HNI rows and how far
    /// the closest gate decision is from flipping (`min |x_i.y_j - x_i.y_i|`, j != i, in f64).
    fn reference(model: &Clip, stc: &StcHead, b: &Batch, obj: &Objective) -> (f64, usize, f64) {
        let raw = model.encode_image(&b.images).expect("test setup");
        let x = l2_normalize(&raw).expect("test setup");
        let y =
            l2_normalize(&model.encode_text(&b.texts).expect("test setup")).expect("test setup");
        let n = b.len() as i64;
        let neg = l2_normalize(&model.encode_text(&b.negatives).expect("test setup"))
            .expect("test setup")
            .view([n, 2, -1]);
        let scale = model.logit_scale.exp();
        let clip = hq_kernels::clip_loss(&x, &y, &scale).expect("test setup");
        let gate = &clip.gate * b.has_negative.to_kind(Kind::Float);
        let live = gate.sum(Kind::Float).double_value(&[]) as usize;
        let p = x
            .to_kind(Kind::Double)
            .matmul(&y.to_kind(Kind::Double).tr());
        let own = p.diagonal(0, 0, 1).unsqueeze(1);
        let diagonal = Tensor::eye(n, (Kind::Double, Device::Cpu)) * 1e9;
        let margin = ((&p - &own).abs() + diagonal).min().double_value(&[]);
        let hni = hq_kernels::hni_loss(&x, &y, &neg, &scale, 0, Some(&gate)).expect("test setup");
        let tags =
            TagTargets::new(b.tag_offsets.clone(), b.tag_indices.clone()).expect("test setup");
        let stc = hq_kernels::short_tag_bce(&stc.forward(&raw).expect("test setup"), &tags)
            .expect("test setup")
            / K as f64;
        let total = clip.loss + hni * obj.hni_weight + stc * obj.stc_weight;
        total.backward();
        (total.double_value(&[]), live, margin)
    }

    /// Encoding only the open rows' negatives, and splitting the step into micro-batches, give
    /// the same loss and gradients as the plain objective over all rows.
    #[test]
    fn open_row_negatives_and_accumulation_match_the_plain_objective() {
        let mut cfg = ClipConfig::hq_tiny();
        cfg.text_cfg.context_length = 24;
        let n = 12;
        let obj = objective();
        let mut mixed_gates_seen = false;
        for seed in 0..20 {
            tch::manual_seed(seed);
            let vs = VarStore::new(Device::Cpu);
            let model = Clip::new(vs.root(), &cfg).expect("test setup");
            let stc = StcHead::new(vs.root(), cfg.embed_dim, cfg.embed_dim, K).expect("test setup");
            let mut params = model.state_dict();
            params.extend(stc.state_dict());
            let whole = batch(&cfg, n);
            let (want, live, margin) = reference(&model, &stc, &whole, &obj);
            let want_grads = grads(&params);
            // Only informative when some rows are live and some are not; and fair only when no
            // gate is within float32 noise of flipping (micro-batches of 5 and 7 rows run other
            // GEMM shapes than the batch of 12, rounded by whichever MKL path this CPU takes).
            if live == 0 || live >= 8 || margin < 1e-4 {
                continue;
            }
            mixed_gates_seen = true;
            let parts = [vec![whole.rows(0..5), whole.rows(5..n)], vec![whole]];
            for batches in &parts {
                let (got, values) =
                    accumulate_gradients(&model, Some(&stc), batches, &obj, Device::Cpu)
                        .expect("test setup");
                assert!(
                    (got - want).abs() <= 1e-5 * want.abs(),
                    "loss {got} vs {want}"
                );
                assert!((values[3] - live as f64 / n as f64).abs() < 1e-12);
                for ((name, _), (g, w)) in params.iter().zip(grads(&params).iter().zip(&want_grads))
                {
                    let err = (g - w).abs().max().double_value(&[]);
                    let size = w.abs().max().double_value(&[]);
                    assert!(
                        err <= 1e-4 * size + 1e-7,
                        "{name}: max error {err} (max |grad| {size}), {} micro-batch(es)",
                        batches.len()
                    );
                }
            }
            break;
        }
        assert!(mixed_gates_seen, "no seed gave both open and closed gates");
    }
}
