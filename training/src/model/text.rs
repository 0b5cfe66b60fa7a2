//! The text tower: open_clip's `TextTransformer`, whose parts open_clip's `CLIP` keeps at the top
//! level of the state dict: `token_embedding`, `positional_embedding`, `transformer`, `ln_final`,
//! `text_projection`.
//!
//! `token_embedding` -> add `positional_embedding` -> `transformer` (causal) -> `ln_final` ->
//! pool (default: the position of the largest id, the end-of-text token) -> `text_projection`.
//!
//! Trimming: with the causal mask, position `i` only ever sees positions `<= i`, so when the
//! pooled position is the end token (or the first position) nothing after the batch's last pooled
//! position can reach the output, in the forward pass or the backward pass. [`TextTransformer::forward`]
//! therefore runs the transformer on the first `max(pooled index) + 1` positions only (token ids,
//! positional embedding and mask alike). Captions are much shorter than the 77-token context, so
//! this skips most of the text tower's work; results equal the full-context forward up to float
//! rounding (the matrix products have other shapes), and gradients are the same (the trimmed
//! positions get exactly zero gradient in the full forward). open_clip always runs the full
//! context; [`TextTransformer::forward_full`] does the same.
//!
//! Length groups: rows are independent (attention never mixes rows), so a batch with short and
//! long captions is split into up to four groups of similar length (sorted by length, cut where a
//! group saves enough positions to pay for the extra, smaller matrix products), each trimmed to its
//! own longest row; the pooled rows are put back in batch order. This matters most for HQ-CLIP's
//! step, which runs positives and hard negatives (often of other lengths) in one call.

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
    /// Run [`TextTransformer::forward`] on the used positions only (module docs); on by default.
    trim: bool,
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
            trim: true,
        })
    }

    /// Turns position trimming in [`TextTransformer::forward`] off (`false`: every position runs,
    /// as in open_clip, e.g. to time the difference) or back on.
    pub fn set_trim(&mut self, trim: bool) {
        self.trim = trim;
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

    /// Whether positions after the pooled one can be cut off (see the module docs): they cannot
    /// influence the pooled token only under the causal mask, and not when the last position is
    /// the one pooled.
    fn can_trim(&self) -> bool {
        self.causal
            && matches!(
                self.pool,
                TextPool::Argmax | TextPool::Eos | TextPool::First
            )
    }

    /// `text`: token ids `[N, L]` (integer), `L <= context_length` (open_clip always feeds the
    /// full context). Returns unnormalised features `[N, embed_dim]` (or `[N, width]` without a
    /// projection). Runs the transformer on the batch's used positions only (module docs).
    pub fn forward(&self, text: &Tensor) -> Result<Tensor> {
        self.forward_with(text, self.trim)
    }

    /// [`TextTransformer::forward`] on every position of `text`, as open_clip computes it (the
    /// same result up to float rounding; slower when sequences are shorter than `L`).
    pub fn forward_full(&self, text: &Tensor) -> Result<Tensor> {
        self.forward_with(text, false)
    }

    /// How many leading positions of `text` (`[N, L]` token ids) [`TextTransformer::forward`]
    /// runs the transformer on: the batch's last pooled position + 1, or `L` where trimming does
    /// not apply (bidirectional attention, last-token pooling). With length groups (module docs)
    /// that is the longest group's; see [`TextTransformer::length_groups`].
    pub fn used_positions(&self, text: &Tensor) -> Result<i64> {
        let (_, l) = text.size2()?;
        Ok(self
            .length_groups(text)?
            .iter()
            .map(|g| g.positions)
            .max()
            .unwrap_or(l))
    }

    /// The row groups [`TextTransformer::forward`] runs separately, each on its own number of
    /// leading positions (one group of every row at `L` positions where trimming does not apply).
    pub fn length_groups(&self, text: &Tensor) -> Result<Vec<LengthGroup>> {
        let (n, l) = text.size2()?;
        self.plan_groups(&self.pool_index(text)?, n, l, self.trim)
    }

    /// The groups for `n` rows of `l` positions whose pooled positions are `pool_index`: one
    /// group of every row at `l` positions unless trimming is on and applies.
    fn plan_groups(
        &self,
        pool_index: &Tensor,
        n: i64,
        l: i64,
        trim: bool,
    ) -> Result<Vec<LengthGroup>> {
        if n == 0 || !trim || !self.can_trim() {
            return Ok(vec![LengthGroup {
                rows: (0..n).collect(),
                positions: l,
            }]);
        }
        Ok(length_groups(&pooled_lengths(pool_index)?))
    }

    /// Transformer and final LayerNorm on embedded tokens `x` (`[N, positions, width]`); returns
    /// the states at `pool_index` (`[N, width]`).
    fn pooled_states(&self, x: &Tensor, pool_index: &Tensor) -> Result<Tensor> {
        let n = x.size()[0];
        let x = self.transformer.forward(x, self.causal)?;
        let x = self.ln_final.forward(&x)?;
        let rows = Tensor::f_arange(n, (Kind::Int64, x.device()))?;
        Ok(x.f_index(&[Some(rows), Some(pool_index.shallow_clone())])?)
    }

    fn forward_with(&self, text: &Tensor, trim: bool) -> Result<Tensor> {
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
        let l = size[1];
        // Pool indices come from the full rows; trimming keeps every one of them.
        let idx = self.pool_index(&ids)?;
        let groups = self.plan_groups(&idx, size[0], l, trim)?;
        let used = groups.iter().map(|g| g.positions).max().unwrap_or(l);
        let ids = if used < l {
            ids.f_narrow(1, 0, used)?
        } else {
            ids
        };
        // One embedding call for the batch: its backward writes a dense [vocab, width] gradient.
        let x = Tensor::f_embedding(&self.token_embedding, &ids, -1, false, false)?;
        let x = x.f_add(&self.positional_embedding.f_narrow(0, 0, used)?)?;
        let pooled = if groups.len() == 1 {
            self.pooled_states(&x, &idx)?
        } else {
            // Each row's features depend on that row alone, so the groups run separately and
            // their rows go back to the batch order.
            let device = x.device();
            let mut parts = Vec::with_capacity(groups.len());
            let mut order = Vec::with_capacity(size[0] as usize);
            for g in &groups {
                let rows = Tensor::from_slice(&g.rows).f_to_device(device)?;
                let xg = x.f_narrow(1, 0, g.positions)?.f_index_select(0, &rows)?;
                parts.push(self.pooled_states(&xg, &idx.f_index_select(0, &rows)?)?);
                order.extend_from_slice(&g.rows);
            }
            let mut inverse = vec![0i64; order.len()];
            for (at, &row) in order.iter().enumerate() {
                inverse[row as usize] = at as i64;
            }
            let inverse = Tensor::from_slice(&inverse).f_to_device(device)?;
            Tensor::f_cat(&parts, 0)?.f_index_select(0, &inverse)?
        };
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

/// Rows of a batch that run through the transformer together (module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LengthGroup {
    /// Row indices into the batch, ascending by length.
    pub rows: Vec<i64>,
    /// Leading positions run: the group's last pooled position + 1.
    pub positions: i64,
}

/// At most this many groups per batch.
const MAX_LENGTH_GROUPS: usize = 4;
/// No group smaller than this many rows (small matrix products run below the machine's speed).
const MIN_GROUP_ROWS: usize = 16;
/// Each further group must save at least this fraction of the single group's positions
/// (`N * longest`): the price of more, smaller matrix products and kernel launches.
const GROUP_SAVING: f64 = 0.08;

/// Per-row pooled position + 1, on the host.
fn pooled_lengths(pool_index: &Tensor) -> Result<Vec<i64>> {
    let idx = pool_index
        .f_to_device(tch::Device::Cpu)?
        .f_to_kind(Kind::Int64)?;
    let v = Vec::<i64>::try_from(&idx)?;
    Ok(v.into_iter().map(|i| i + 1).collect())
}

/// Splits rows into at most [`MAX_LENGTH_GROUPS`] groups of similar length, minimising the
/// positions run (`sum rows * longest`) plus a price per extra group; the rows are sorted by
/// length (stable, so the plan is deterministic) and cut between different lengths only.
fn length_groups(lengths: &[i64]) -> Vec<LengthGroup> {
    let n = lengths.len();
    if n == 0 {
        return Vec::new();
    }
    let mut order: Vec<i64> = (0..n as i64).collect();
    order.sort_by_key(|&i| lengths[i as usize]);
    let sorted: Vec<i64> = order.iter().map(|&i| lengths[i as usize]).collect();
    let longest = sorted.last().copied().unwrap_or(0);
    // Candidate ends of a group: where the length changes (and the end of the batch).
    let mut ends: Vec<usize> = (1..n).filter(|&i| sorted[i - 1] < sorted[i]).collect();
    ends.push(n);
    let cost = |a: usize, b: usize| (b - a) as i64 * sorted[b - 1];
    // best[k][e]: least positions covering rows 0..ends[e] with k + 1 groups; from[k][e]: the
    // previous end's index.
    let m = ends.len();
    let mut best = vec![vec![i64::MAX; m]; MAX_LENGTH_GROUPS];
    let mut from = vec![vec![usize::MAX; m]; MAX_LENGTH_GROUPS];
    for (e, &end) in ends.iter().enumerate() {
        if end >= MIN_GROUP_ROWS || end == n {
            best[0][e] = cost(0, end);
        }
    }
    for k in 1..MAX_LENGTH_GROUPS {
        for e in 0..m {
            for p in 0..e {
                let (start, end) = (ends[p], ends[e]);
                if best[k - 1][p] == i64::MAX || end - start < MIN_GROUP_ROWS {
                    continue;
                }
                let c = best[k - 1][p] + cost(start, end);
                if c < best[k][e] {
                    best[k][e] = c;
                    from[k][e] = p;
                }
            }
        }
    }
    let price = GROUP_SAVING * (n as i64 * longest) as f64;
    let mut groups_k = 0;
    for k in 1..MAX_LENGTH_GROUPS {
        let (c, c0) = (best[k][m - 1], best[groups_k][m - 1]);
        if c != i64::MAX
            && (c as f64) + price * (k as f64) < (c0 as f64) + price * (groups_k as f64)
        {
            groups_k = k;
        }
    }
    // Walk back from the batch's end.
    let mut cuts = vec![n];
    let (mut k, mut e) = (groups_k, m - 1);
    while k > 0 {
        e = from[k][e];
        cuts.push(ends[e]);
        k -= 1;
    }
    cuts.push(0);
    cuts.reverse();
    cuts.windows(2)
        .map(|w| LengthGroup {
            rows: order[w[0]..w[1]].to_vec(),
            positions: sorted[w[1] - 1],
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use crate::model::{Clip, ClipConfig, TextPool};
    use tch::{nn::VarStore, Device, Kind, Tensor};

    /// Token rows as the tokenizer writes them: start token, `len` ids, end token, zero padding.
    fn rows(lens: &[i64], ctx: i64) -> Tensor {
        let t = Tensor::zeros([lens.len() as i64, ctx], (Kind::Int64, Device::Cpu));
        for (i, &len) in lens.iter().enumerate() {
            let row = t.get(i as i64);
            let _ = row.narrow(0, 0, 1).fill_(49406);
            row.narrow(0, 1, len).copy_(&Tensor::randint_low(
                256,
                49000,
                [len],
                (Kind::Int64, Device::Cpu),
            ));
            let _ = row.narrow(0, len + 1, 1).fill_(49407);
        }
        t
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn length_groups_cover_every_row_once_and_split_only_when_it_pays() {
        let check = |lengths: &[i64]| {
            let groups = super::length_groups(lengths);
            let mut seen: Vec<i64> = groups.iter().flat_map(|g| g.rows.clone()).collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..lengths.len() as i64).collect::<Vec<_>>());
            for g in &groups {
                let longest = g.rows.iter().map(|&r| lengths[r as usize]).max();
                assert_eq!(longest, Some(g.positions));
                if groups.len() > 1 {
                    assert!(g.rows.len() >= super::MIN_GROUP_ROWS);
                }
            }
            assert!(groups.len() <= super::MAX_LENGTH_GROUPS);
            groups
        };
        // Equal lengths, or too few rows: one group.
        assert_eq!(check(&[9; 40]).len(), 1);
        assert_eq!(check(&[3, 40, 7, 12, 25]).len(), 1);
        // Two clusters: two groups at their own lengths.
        let two: Vec<i64> = (0..64).map(|i| if i % 2 == 0 { 6 } else { 60 }).collect();
        let g = check(&two);
        assert_eq!(
            g.iter().map(|g| g.positions).collect::<Vec<_>>(),
            vec![6, 60]
        );
        // Lengths spread evenly: several groups; the same plan every time.
        let spread: Vec<i64> = (0..128).map(|i| 8 + (i * 7) % 18).collect();
        let g = check(&spread);
        assert!(g.len() > 1, "{g:?}");
        assert_eq!(g, check(&spread));
        assert!(check(&[]).is_empty());
    }

    /// Trimmed (and length-grouped) and full-context forwards agree to float rounding, and so do
    /// the gradients of every text-tower parameter; configurations that cannot be trimmed are not.
    #[test]
    fn trimmed_forward_and_gradients_equal_the_full_context() {
        let few = [3, 17, 9, 1, 22, 5];
        let many: Vec<i64> = (0..48)
            .map(|i| if i % 3 == 0 { 40 } else { 2 + i % 9 })
            .collect();
        for (lens, grouped) in [(&few[..], false), (&many[..], true)] {
            for (pool, causal, trims) in [
                (TextPool::Argmax, true, true),
                (TextPool::Eos, true, true),
                (TextPool::First, true, true),
                (TextPool::Last, true, false),
                (TextPool::Argmax, false, false),
            ] {
                tch::manual_seed(11);
                let mut cfg = ClipConfig::hq_tiny();
                cfg.text_cfg.layers = 2;
                cfg.text_cfg.pool_type = pool;
                cfg.text_cfg.no_causal_mask = !causal;
                cfg.text_cfg.eos_id = 49407;
                let vs = VarStore::new(Device::Cpu);
                let model = Clip::new(vs.root(), &cfg).expect("model");
                let text = rows(lens, cfg.text_cfg.context_length);
                let used = model.text.used_positions(&text).expect("used");
                let longest = lens.iter().max().copied().unwrap_or(0) + 2;
                let expect = match (trims, pool) {
                    (false, _) => 77,
                    (true, TextPool::First) => 1,
                    (true, _) => longest,
                };
                assert_eq!(used, expect, "{pool:?} causal {causal}");
                let groups = model.text.length_groups(&text).expect("groups").len();
                let split = grouped && trims && pool != TextPool::First;
                assert_eq!(groups > 1, split, "{pool:?}: {groups} groups");

                let params: Vec<(String, Tensor)> = model
                    .state_dict()
                    .into_iter()
                    .filter(|(n, _)| !n.starts_with("visual") && !n.starts_with("logit"))
                    .collect();
                let inputs: Vec<Tensor> = params.iter().map(|(_, t)| t.shallow_clone()).collect();
                let weights = Tensor::randn([lens.len() as i64, 128], (Kind::Float, Device::Cpu));
                let run = |trim: bool| {
                    let f = if trim {
                        model.text.forward(&text)
                    } else {
                        model.text.forward_full(&text)
                    }
                    .expect("forward");
                    let loss = (&f * &weights).sum(Kind::Float);
                    let grads = Tensor::run_backward(&[loss], &inputs, false, false);
                    (f.detach(), grads)
                };
                let (f_trim, g_trim) = run(true);
                let (f_full, g_full) = run(false);
                let scale = f_full.abs().max().double_value(&[]).max(1.0);
                let d = max_abs(&f_trim, &f_full);
                // Other GEMM shapes round otherwise: measured up to 5.0e-7 of the scale on MKL's
                // AVX-512, AVX2, SSE4.2 and non-Intel paths (tools/cpu-paths.sh), which is 4-8
                // ulps; 1e-5 leaves room for other CPUs while a wrong mask or position would
                // move features by O(1).
                assert!(
                    d <= 1e-5 * scale,
                    "{pool:?}: features differ by {d} (scale {scale})"
                );
                for ((name, _), (a, b)) in params.iter().zip(g_trim.iter().zip(g_full.iter())) {
                    let scale = b.abs().max().double_value(&[]).max(1e-3);
                    let d = max_abs(a, b);
                    assert!(
                        d <= 1e-5 * scale,
                        "{pool:?}: gradient of {name} differs by {d} (max {scale})"
                    );
                }
                if trims && pool != TextPool::First {
                    // The positions after the longest sequence get no gradient either way.
                    let pos_grad = &g_full[params
                        .iter()
                        .position(|(n, _)| n == "positional_embedding")
                        .expect("positional_embedding")];
                    let tail = pos_grad.narrow(0, used, 77 - used).abs().max();
                    assert_eq!(tail.double_value(&[]), 0.0);
                }
            }
        }
    }
}
