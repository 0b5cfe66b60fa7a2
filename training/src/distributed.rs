//! Data parallelism over [`hq_dist`] (libtorch's c10d): what a training step needs from the other
//! ranks, and nothing CLIP-specific.
//!
//! How a step stays the single-process step over the global batch (see `step.rs`): every rank
//! encodes its own rows, the features are all-gathered, and each rank takes the loss over the
//! whole gathered batch with only its own rows live (the others are constants), so the gradient
//! it gets is exactly the part that flows through its rows. Per-row terms (HNI, STC) are taken on
//! the owning rank only, divided by the global batch size. The sum over ranks of these gradients
//! is the gradient of the global loss, so gradients are all-reduced with SUM (not averaged: the
//! loss is already the global mean). The logit scale's direct gradient is the same on every rank
//! and is taken on rank 0 only.

use hq_dist::{GradReducer, ProcessGroup, ReduceOp};
use tch::{Kind, Tensor};

use crate::TrainError;

/// One rank's part in a data-parallel step: the group, and optionally DDP's overlapped gradient
/// reduction (else the gradients are all-reduced after the backward pass, [`all_reduce_gradients`]).
#[derive(Clone, Copy)]
pub struct Ranks<'a> {
    pub group: &'a ProcessGroup,
    pub overlap: Option<&'a OverlappedGradients>,
}

/// libtorch's DDP reducer over every parameter that gets a gradient on every rank (all but the
/// logit scale, whose contrastive gradient is taken on rank 0 only, see the module docs), which
/// all-reduces their buckets during the backward pass; the rest are all-reduced after it.
/// The reducer averages: the step scales its objective by the world size so that the average is
/// the sum the global objective needs.
pub struct OverlappedGradients {
    reducer: GradReducer,
    rest: Vec<Tensor>,
}

impl OverlappedGradients {
    /// Over the optimizer's named parameters.
    pub fn new(pg: &ProcessGroup, params: &[(String, Tensor)]) -> Result<Self, TrainError> {
        let (rest, synced): (Vec<_>, Vec<_>) =
            params.iter().partition(|(name, _)| name == "logit_scale");
        let synced: Vec<&Tensor> = synced.into_iter().map(|(_, t)| t).collect();
        Ok(OverlappedGradients {
            reducer: pg.reducer(&synced, BUCKET_BYTES)?,
            rest: rest.into_iter().map(|(_, t)| t.shallow_clone()).collect(),
        })
    }

    /// Arms the reducer for the backward pass of `loss` (the step's last).
    pub fn prepare(&self, loss: &Tensor) -> Result<(), TrainError> {
        Ok(self.reducer.prepare(loss)?)
    }

    /// After the armed backward: the parameters outside the reducer, summed over the ranks and
    /// divided by the world size (their objective was scaled by it too).
    pub fn finish(&self, pg: &ProcessGroup) -> Result<(), TrainError> {
        let rest: Vec<&Tensor> = self.rest.iter().collect();
        all_reduce_gradients(pg, &rest, BUCKET_BYTES)?;
        tch::no_grad(|| {
            for t in &self.rest {
                let _ = t.grad().f_div_scalar_(pg.world_size() as f64)?;
            }
            Ok(())
        })
    }
}

/// Gradients are all-reduced in flat buckets of about this many bytes (DDP's default, 25 MiB):
/// few enough messages to amortise latency, small enough not to double peak memory.
pub const BUCKET_BYTES: usize = 25 << 20;

/// Copies rank 0's values of `tensors` into every rank's (initial weights, so every rank starts
/// from the same model whatever its seed).
pub fn broadcast_from_rank0<'a>(
    pg: &ProcessGroup,
    tensors: impl IntoIterator<Item = &'a Tensor>,
) -> Result<(), TrainError> {
    tch::no_grad(|| {
        for t in tensors {
            let mut flat = t.f_detach()?.f_contiguous()?;
            pg.broadcast(&mut flat, 0)?;
            t.f_detach()?.f_copy_(&flat)?;
        }
        Ok(())
    })
}

/// Gives every parameter a (zero) gradient, so that every rank's gradient buckets have the same
/// layout from the first step on (a parameter unused on one rank, like the logit scale off rank 0,
/// would otherwise have no gradient there).
pub fn define_gradients<'a>(
    params: impl IntoIterator<Item = &'a Tensor>,
) -> Result<(), TrainError> {
    let zero: Vec<Tensor> = params
        .into_iter()
        .filter(|p| p.requires_grad())
        .map(|p| p.f_sum(Kind::Float)?.f_mul_scalar(0.0))
        .collect::<Result<_, tch::TchError>>()?;
    if zero.is_empty() {
        return Ok(());
    }
    Tensor::f_stack(&zero, 0)?
        .f_sum(Kind::Float)?
        .f_backward()?;
    Ok(())
}

/// Sums every parameter's gradient over the ranks, in place, in flat buckets of about
/// `bucket_bytes`. Every rank must pass the same parameters in the same order.
pub fn all_reduce_gradients(
    pg: &ProcessGroup,
    params: &[&Tensor],
    bucket_bytes: usize,
) -> Result<(), TrainError> {
    let grads: Vec<Tensor> = params.iter().map(|p| p.grad()).collect();
    if let Some(i) = grads.iter().position(|g| !g.defined()) {
        return Err(TrainError::Config {
            field: "(data parallel)".into(),
            reason: format!("parameter {i} has no gradient; call define_gradients first"),
        });
    }
    tch::no_grad(|| {
        let mut start = 0;
        while start < grads.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < grads.len() && (end == start || bytes < bucket_bytes) {
                bytes += grads[end].numel() * grads[end].kind().elt_size_in_bytes();
                end += 1;
            }
            let views: Vec<Tensor> = grads[start..end]
                .iter()
                .map(|g| g.f_view([-1]))
                .collect::<Result<_, _>>()?;
            let mut flat = Tensor::f_cat(&views, 0)?;
            pg.all_reduce(&mut flat, ReduceOp::Sum)?;
            let mut offset = 0;
            for g in &grads[start..end] {
                let n = g.numel() as i64;
                let part = flat.f_narrow(0, offset, n)?.f_view_as(g)?;
                g.shallow_clone().f_copy_(&part)?;
                offset += n;
            }
            start = end;
        }
        Ok(())
    })
}

/// Every rank's rows of `t` (`[n, ...]`, the same n on every rank) stacked in rank order, without
/// gradient.
pub fn gather_rows(pg: &ProcessGroup, t: &Tensor) -> Result<Tensor, TrainError> {
    let local = t.f_detach()?.f_contiguous()?;
    let parts = pg.all_gather(&local)?;
    Ok(Tensor::f_cat(&parts, 0)?)
}

/// Checks that every rank has `n` rows this step (the gathered batch is laid out by rank).
pub fn same_rows_everywhere(pg: &ProcessGroup, n: usize) -> Result<(), TrainError> {
    let counts = pg.all_gather(&Tensor::from_slice(&[n as i64]))?;
    let counts: Vec<i64> = counts.iter().map(|c| c.int64_value(&[0])).collect();
    if counts.iter().any(|&c| c != n as i64) {
        return Err(TrainError::DataLoader(format!(
            "the ranks' batches differ in size ({counts:?} rows by rank): every rank must give \
             the same number of samples per step"
        )));
    }
    Ok(())
}

/// `values` summed over the ranks.
pub fn sum_over_ranks(pg: &ProcessGroup, values: &[f64]) -> Result<Vec<f64>, TrainError> {
    let mut t = Tensor::from_slice(values);
    pg.all_reduce(&mut t, ReduceOp::Sum)?;
    Ok(Vec::<f64>::try_from(&t)?)
}
