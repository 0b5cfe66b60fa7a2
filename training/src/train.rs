//! A training run, start to end: set-up (model, STC head, optimizer, data, or all of it from a
//! checkpoint), the step loop with logging, checkpoints and periodic evaluation, and the final
//! checkpoint, evaluation and plots.
//!
//! Run directory (`run.out_dir`):
//! ```text
//! config.toml            the resolved settings of the run
//! metrics.jsonl          train / eval / skips records (see crate::metrics)
//! tb/events.out.tfevents.*   the same records as TensorBoard scalars (see crate::tensorboard)
//! checkpoints/step-NNNNNNNN/, checkpoints/latest   (see crate::checkpoint)
//! eval/step-NNNNNNNN.json                           built-in held-out evaluation reports
//! plots/loss.png, plots/lr.png
//! summary.json           final step, losses, skipped samples, last evaluation
//! ```
//!
//! As one rank of a data-parallel job ([`run_on`] with a process group): every rank reads its own
//! shards (`rank, rank + world, ...`) with its own seed stream and trains on the global batch
//! (world x `run.batch_size`, see `crate::step`); only rank 0 writes the run directory. A
//! checkpoint holds every rank's loader position, so `--resume` continues bit for bit with the
//! same world size and refuses another one.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use hq_data::text::tags::TagVocab;
use hq_data::text::TextTokenizer;
use hq_data::transform::Preprocess;
use hq_dist::ProcessGroup;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tch::{nn::VarStore, Device};

use crate::checkpoint::{self as ckpt, CheckpointWriter};
use crate::config::{Precision, TrainConfig};
use crate::data::{count_tags_with, Batch, DataLoader, LoaderState, SkipCounts};
use crate::encoder::TchEncoder;
use crate::metrics::{plot_curves, MetricsLog};
use crate::model::checkpoint::{load_named, read_safetensors};
use crate::model::stc::STC_PREFIX;
use crate::model::{excluded_from_weight_decay, lock, Clip, StcHead};
use crate::optim::AdamW;
use crate::step::{train_step_on, Objective, StepStats};
use crate::TrainError;

/// What `train_state.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: u64,
    pub config: TrainConfig,
    /// The data loader's position after the last batch of `step`.
    pub loader: LoaderState,
    /// Samples trained on so far.
    pub samples_seen: u64,
    /// Training seconds so far (all sessions).
    pub train_seconds: f64,
    /// Ranks of the run that wrote this state (0 in single-process checkpoints of old).
    #[serde(default)]
    pub world_size: usize,
    /// The loader positions of ranks 1.. (rank 0's is `loader`).
    #[serde(default)]
    pub rank_loaders: Vec<LoaderState>,
}

/// Each rank's data seed: the run's seed for rank 0 (so one process reads as before), distinct
/// streams for the others.
pub fn rank_seed(seed: u64, rank: usize) -> u64 {
    seed.wrapping_add((rank as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// How to run (besides the config).
#[derive(Debug, Clone, Default)]
pub struct RunRequest {
    pub config: TrainConfig,
    /// Continue from this checkpoint (a checkpoint directory or a run directory).
    pub resume: Option<PathBuf>,
    /// Stop after this step as if interrupted (checkpoint written there); the schedule still spans
    /// `run.steps`.
    pub stop_after: Option<u64>,
    /// Print the summary lines (the bar is drawn regardless, unless HQ_NO_PROGRESS is set).
    pub verbose: bool,
}

/// One logged step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: u64,
    pub lr: f64,
    pub loss: f64,
    pub loss_clip: f64,
    pub loss_hni: f64,
    pub loss_stc: f64,
}

/// What a run returns.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunSummary {
    pub out_dir: PathBuf,
    pub first_step: u64,
    pub last_step: u64,
    /// Every step of this session.
    pub steps: Vec<StepRecord>,
    pub skipped: SkipCounts,
    pub samples_seen: u64,
    pub last_checkpoint: Option<PathBuf>,
    /// The last evaluation's summary (name, value).
    pub eval: Option<Vec<(String, f64)>>,
    pub samples_per_second: f64,
}

fn io(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

fn say(verbose: bool, bar: &indicatif::ProgressBar, msg: &str) {
    if verbose {
        bar.suspend(|| eprintln!("{msg}"));
    }
}

/// The state saved in a checkpoint (`resume` as `--resume` takes it), after verifying its
/// checksums.
pub fn saved_state(resume: &Path) -> Result<TrainState, TrainError> {
    let dir = ckpt::resolve(resume)?;
    ckpt::verify(&dir)?;
    let text =
        std::fs::read_to_string(dir.join(ckpt::TRAIN_STATE_FILE)).map_err(|e| io(&dir, e))?;
    serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint {
        path: dir.display().to_string(),
        reason: format!("train_state.json: {e}"),
    })
}

/// Runs training as configured (see the module docs).
pub fn run(req: &RunRequest) -> Result<RunSummary, TrainError> {
    run_on(req, None, false)
}

/// Writes `record` to the metrics log when this rank keeps one (rank 0).
fn log(metrics: &mut Option<MetricsLog>, record: &serde_json::Value) -> Result<(), TrainError> {
    match metrics {
        Some(m) => m.write(record),
        None => Ok(()),
    }
}

/// [`run`] as one rank of `group` (a single process when `None` or a group of one); `overlap`:
/// gradients all-reduced during the backward pass (libtorch's DDP reducer) instead of after it.
pub fn run_on(
    req: &RunRequest,
    group: Option<&ProcessGroup>,
    overlap: bool,
) -> Result<RunSummary, TrainError> {
    let group = group.filter(|g| g.world_size() > 1);
    let (rank, world) = group.map_or((0, 1), |g| (g.rank(), g.world_size()));
    let lead = rank == 0;
    // ---- settings: the resumed checkpoint's, checked against the request
    let resume_dir = req.resume.as_deref().map(ckpt::resolve).transpose()?;
    let saved: Option<TrainState> = resume_dir.as_deref().map(saved_state).transpose()?;
    if let Some(s) = &saved {
        let written_by = s.world_size.max(1);
        if written_by != world {
            return Err(TrainError::Config {
                field: "(resume)".into(),
                reason: format!(
                    "the checkpoint was written by {written_by} rank(s) and this run has {world}: \
                     each rank's data position is saved, and another world size would read other \
                     samples; resume with {written_by} rank(s)"
                ),
            });
        }
    }
    let cfg = req.config.clone();
    cfg.validate()?;
    if let Some(s) = &saved {
        let diffs = cfg.differences_for_resume(&s.config);
        if !diffs.is_empty() {
            return Err(TrainError::Config {
                field: "(resume)".into(),
                reason: format!(
                    "the settings differ from the checkpoint's, so the continuation would not be \
                     the same run: {}; use the checkpoint's settings (run with --resume and no \
                     other settings) or start a new run",
                    diffs.join("; ")
                ),
            });
        }
    }
    let parts = cfg.parts()?;
    let device = cfg
        .run
        .device
        .parse::<crate::device::DeviceRequest>()?
        .resolve()?;
    let autocast = match (cfg.run.precision, device) {
        (Precision::Fp32, _) | (Precision::Auto, Device::Cpu) => false,
        (Precision::Bf16, Device::Cpu) => {
            return Err(TrainError::Config {
                field: "run.precision".into(),
                reason: "bf16 autocast is for GPUs; this run resolved to the CPU".into(),
            })
        }
        _ => true,
    };
    if autocast {
        crate::precision::use_bf16_autocast_on_cuda()?;
    }
    if cfg.run.torch_threads > 0 {
        tch::set_num_threads(cfg.run.torch_threads as i32);
    }
    let out = cfg.run.out_dir.clone().ok_or_else(|| TrainError::Config {
        field: "run.out_dir".into(),
        reason: "not set".into(),
    })?;
    let ckpt_dir = out.join("checkpoints");
    if lead && saved.is_none() && ckpt_dir.join(ckpt::LATEST_FILE).exists() {
        return Err(TrainError::Config {
            field: "run.out_dir".into(),
            reason: format!(
                "{} already holds a run; continue it with --resume {} or choose another --out",
                out.display(),
                out.display()
            ),
        });
    }
    if lead {
        std::fs::create_dir_all(&out).map_err(|e| io(&out, e))?;
        hq_data::atomic::write_atomic(out.join("config.toml"), cfg.to_toml_string()?.as_bytes())?;
    }

    // ---- model, STC head, optimizer
    tch::manual_seed(cfg.run.seed as i64);
    let model_cfg = cfg.model_config()?;
    let tokenizer = Arc::new(cfg.text_tokenizer(&model_cfg, resume_dir.as_deref())?);
    let preprocess = cfg.preprocess()?;
    let vs = VarStore::new(device);
    let model = Clip::new(vs.root(), &model_cfg)?;
    if let (None, Some(path)) = (&saved, &cfg.model.pretrained) {
        // A resumed run's weights come from its checkpoint; a new one starts from these.
        let source = ckpt::weights_source(path)?;
        ckpt::load_weights(&model, &source)?;
        if lead {
            eprintln!("hq-train: starting from {}", source.weights.display());
        }
    }
    let vocab: Option<Arc<TagVocab>> = if parts.stc {
        Some(Arc::new(match (&resume_dir, &cfg.data.tag_vocab) {
            (Some(dir), _) => TagVocab::load(dir.join(ckpt::TAG_VOCAB_FILE))?,
            (None, Some(path)) => TagVocab::load(path)?,
            (None, None) => {
                let mut counter = hq_data::text::tags::TagCounter::new();
                let mut samples = 0;
                for src in cfg.data_sources() {
                    let shards = hq_data::shards::expand_shards(&src.shards)?;
                    let annotations = match &src.annotations {
                        Some(spec) => Some(hq_data::shards::Annotations::open(spec)?),
                        None => None,
                    };
                    let report = count_tags_with(&shards, annotations.as_ref(), cfg.data.threads)?;
                    samples += report.samples_with_tags;
                    counter.merge(report.counter);
                }
                if samples == 0 {
                    return Err(TrainError::DataLoader(
                        "cannot build a tag vocabulary: no training sample has refined texts \
                         (turn stc off, or add annotations)"
                            .into(),
                    ));
                }
                counter.top_k(cfg.data.tag_vocab_size)
            }
        }))
    } else {
        None
    };
    let stc = match &vocab {
        Some(v) if v.is_empty() => {
            return Err(TrainError::DataLoader(
                "the tag vocabulary is empty; the STC loss has nothing to learn (turn stc off)"
                    .into(),
            ))
        }
        Some(v) => Some(StcHead::new(
            vs.root(),
            model_cfg.embed_dim,
            cfg.model.stc_hidden.unwrap_or(model_cfg.embed_dim),
            v.len() as i64,
        )?),
        None => None,
    };
    // Parameters only: a ResNet's BatchNorm statistics are state, not something to optimise.
    let mut params = model.parameters();
    if let Some(h) = &stc {
        params.extend(h.state_dict());
    }
    if let (Some(pg), None) = (group, &saved) {
        // Every rank starts from rank 0's weights and buffers (a resumed run loads them from the
        // checkpoint). Later each rank's BatchNorm statistics follow its own batches and rank 0's
        // are saved: the same model as DDP's default, which copies rank 0's buffers to the other
        // ranks before each forward (so rank 0's evolve from rank 0's batches alone).
        let buffers = model.buffers();
        let all = params.iter().chain(&buffers).map(|(_, t)| t);
        crate::distributed::broadcast_from_rank0(pg, all)?;
    }
    // Locked towers (fine-tuning): frozen parameters leave the optimizer (and the reducer).
    lock::check(&model_cfg, &cfg.model.locks())?;
    model.freeze_image_bn_stats(cfg.model.lock_image && cfg.model.lock_image_freeze_bn_stats);
    let (params, frozen) = lock::apply(params, &model_cfg, &cfg.model.locks());
    if lead && frozen > 0 {
        eprintln!("hq-train: {frozen} parameter tensors frozen by the tower locks");
    }
    // Gradients all-reduced during the backward pass, as DDP does, when asked.
    let overlap = match (group, overlap) {
        (Some(pg), true) => Some(crate::distributed::OverlappedGradients::new(pg, &params)?),
        _ => None,
    };
    let mut optimizer = AdamW::new(cfg.adamw(), params, |n, t| {
        !excluded_from_weight_decay(n, t)
    })?;
    if let Some(head_lr) = cfg.optim.head_lr {
        let scale = head_lr / cfg.optim.lr;
        optimizer.set_lr_scales(|n| {
            if n.starts_with(STC_PREFIX) {
                scale
            } else {
                1.0
            }
        });
    }

    // ---- resume
    let (mut step, loader_state, mut samples_seen, mut train_seconds) =
        match (&saved, &resume_dir) {
            (Some(s), Some(dir)) => {
                let weights = dir.join(ckpt::MODEL_FILE);
                load_named(&model.state_dict(), &read_safetensors(&weights)?, &weights)?;
                if let Some(h) = &stc {
                    let p = dir.join(ckpt::STC_HEAD_FILE);
                    load_named(&h.state_dict(), &read_safetensors(&p)?, &p)?;
                }
                let p = dir.join(ckpt::OPTIMIZER_FILE);
                let moments = read_safetensors(&p)?;
                let moments = moments
                    .into_iter()
                    .map(|(n, t)| Ok((n, t.f_to_device(device)?)))
                    .collect::<Result<_, TrainError>>()?;
                optimizer.load_state(&moments, s.step).map_err(|reason| {
                    TrainError::Checkpoint {
                        path: p.display().to_string(),
                        reason,
                    }
                })?;
                let loader = match rank {
                    0 => s.loader.clone(),
                    r => s.rank_loaders.get(r - 1).cloned().ok_or_else(|| {
                        TrainError::Checkpoint {
                            path: dir.display().to_string(),
                            reason: format!("no saved data position for rank {r}"),
                        }
                    })?,
                };
                (s.step, Some(loader), s.samples_seen, s.train_seconds)
            }
            _ => (0, None, 0, 0.0),
        };
    let first_step = step;
    let total = cfg.run.steps;
    let stop = req.stop_after.unwrap_or(total).min(total);
    if step > total || (step == total && finished_run(&out, total)) {
        return Err(TrainError::Config {
            field: "run.steps".into(),
            reason: format!(
                "the checkpoint is at step {step}, the run has {total} steps: nothing to do"
            ),
        });
    }

    let mut loader_cfg = cfg.loader_config(&model_cfg)?;
    loader_cfg.rank = rank;
    loader_cfg.world_size = world;
    loader_cfg.seed = rank_seed(loader_cfg.seed, rank);
    let mut loader =
        DataLoader::with_tokenizer(loader_cfg, tokenizer.clone(), vocab.clone(), loader_state)?;
    let mut metrics = match lead {
        true => Some(MetricsLog::open(
            out.join("metrics.jsonl"),
            saved.as_ref().map(|s| s.step),
        )?),
        false => None,
    };
    let schedule = cfg.schedule();
    let obj = Objective {
        parts,
        hni_weight: cfg.loss.hni_weight,
        stc_weight: cfg.loss.stc_weight,
        stc_reduction: cfg.loss.stc_reduction,
        autocast,
        grad_clip: cfg.optim.grad_clip,
        max_logit_scale: cfg.optim.max_logit_scale,
    };
    let bar = match lead {
        true => hq_data::progress::bar(Some(total), "steps"),
        false => indicatif::ProgressBar::hidden(),
    };
    bar.set_position(step);
    let verbose = req.verbose && lead;
    say(
        verbose,
        &bar,
        &format!(
            "hq-train: {} on {device:?}, {} parameters{}, parts: mixed text {} / HNI {} / STC {}, \
             {} x {} samples per step{}, steps {step}..{stop} of {total}",
            cfg.model
                .preset
                .as_deref()
                .filter(|p| !p.is_empty())
                .or(cfg.model.config.as_ref().map(|_| "custom model"))
                .unwrap_or("hq-tiny"),
            model.num_parameters(),
            stc.as_ref()
                .map(|h| format!(" + STC head over {} tags", h.classes()))
                .unwrap_or_default(),
            parts.mixed_text,
            parts.hni,
            parts.stc,
            cfg.run.accum_steps,
            cfg.run.batch_size,
            match group {
                Some(pg) => format!(
                    " on each of {world} ranks ({} backend)",
                    pg.backend().name()
                ),
                None => String::new(),
            },
        ),
    );

    // ---- the loop
    let mut records = Vec::new();
    let mut skipped_session = SkipCounts::default();
    let mut last_checkpoint = resume_dir.clone();
    let mut last_eval = None;
    model.set_training(true);
    let eval_at = |step: u64, metrics: &mut Option<MetricsLog>| {
        let encoder = TchEncoder::from_model(&model, device)?
            .with_tokenizer(tokenizer.clone())
            .with_preprocess(preprocess);
        model.set_training(false);
        let summary = evaluate_and_log(encoder, &cfg, step, &out, &bar, verbose, metrics);
        model.set_training(true);
        summary
    };
    if let (Some(m), true) = (&metrics, saved.is_some()) {
        // A run killed after its checkpoint at `step` but before what follows it: the evaluation
        // due there is done now (else it would be lost), and at the last step the plots and
        // summary below are written (else the finished run could never be completed). The
        // summary's evaluation is the log's last one.
        let records = crate::metrics::read_records(m.path())?;
        let evals: Vec<&serde_json::Value> = records
            .iter()
            .filter(|r| r.get("kind").and_then(|k| k.as_str()) == Some("eval"))
            .collect();
        last_eval = evals.last().and_then(|r| eval_results(r));
        let done = evals
            .iter()
            .any(|r| r.get("step").and_then(|s| s.as_u64()) == Some(step));
        if !done && eval_due(&cfg, step, total, step == stop) {
            last_eval = eval_at(step, &mut metrics)?.or(last_eval);
        }
    }
    let mut window = (Instant::now(), 0usize);
    let session_start = Instant::now();
    let mut session_samples = 0u64;
    while step < stop {
        let t0 = Instant::now();
        let lr = schedule.lr(step);
        let mut batches: Vec<Batch> = Vec::with_capacity(cfg.run.accum_steps);
        for _ in 0..cfg.run.accum_steps {
            let b = loader.next().ok_or_else(|| {
                TrainError::DataLoader("the data loader ended before the last step".into())
            })??;
            batches.push(b);
        }
        let mut skipped = SkipCounts::default();
        for b in &batches {
            skipped.merge(&b.skipped);
        }
        let skipped = global_skips(group, &skipped)?;
        let stats: StepStats = train_step_on(
            group.map(|group| crate::distributed::Ranks {
                group,
                overlap: overlap.as_ref(),
            }),
            &model,
            stc.as_ref(),
            &mut optimizer,
            &batches,
            &obj,
            lr,
            device,
            step + 1,
        )?;
        step += 1;
        samples_seen += stats.samples as u64;
        session_samples += stats.samples as u64;
        train_seconds += t0.elapsed().as_secs_f64();
        window.1 += stats.samples;
        records.push(StepRecord {
            step,
            lr,
            loss: stats.loss,
            loss_clip: stats.loss_clip,
            loss_hni: stats.loss_hni,
            loss_stc: stats.loss_stc,
        });
        if skipped.total() > 0 {
            skipped_session.merge(&skipped);
            let skipped_total = global_skips(group, &loader.state().skipped_total)?;
            log(
                &mut metrics,
                &json!({"kind": "skips", "step": step, "skipped": skipped,
                "skipped_total": skipped_total}),
            )?;
        }
        if step % cfg.run.log_every == 0 || step == stop {
            let rate = window.1 as f64 / window.0.elapsed().as_secs_f64().max(1e-9);
            window = (Instant::now(), 0);
            let skipped_total = global_skips(group, &loader.state().skipped_total)?;
            let annotations = match loader.annotation_counts() {
                Some(c) => Some(global_annotations(group, &c)?),
                None => None,
            };
            let source_samples = global_counts(group, loader.source_samples())?;
            let mut record = json!({
                    "kind": "train", "step": step, "lr": lr, "loss": stats.loss,
                    "loss_clip": stats.loss_clip, "loss_hni": stats.loss_hni, "loss_stc": stats.loss_stc,
                    "loss_hni_weighted": stats.loss_hni * obj.hni_weight,
                    "loss_stc_weighted": stats.loss_stc * obj.stc_weight,
                    "hni_gate_open": stats.hni_gate_open, "grad_norm": stats.grad_norm,
                    "logit_scale": stats.logit_scale, "samples_per_s": rate,
                    "samples_seen": samples_seen, "epoch": loader.state().epoch(),
                    "skipped_total": skipped_total, "world_size": world,
            });
            // Only with annotations / a mixture; per source as an object ("0", "1", ...) so the
            // TensorBoard mirror, which walks objects, shows one curve per source.
            if let Some(m) = record.as_object_mut() {
                if let Some(a) = annotations {
                    m.insert("annotations".into(), json!(a));
                }
                if !source_samples.is_empty() {
                    let per: serde_json::Map<String, serde_json::Value> = source_samples
                        .iter()
                        .enumerate()
                        .map(|(i, c)| (i.to_string(), json!(c)))
                        .collect();
                    m.insert("source_samples".into(), serde_json::Value::Object(per));
                }
            }
            log(&mut metrics, &record)?;
            bar.set_message(format!(
                "loss {:.4} (clip {:.4} hni {:.4} stc {:.4}) lr {lr:.2e} {rate:.1} samples/s, {} skipped",
                stats.loss,
                stats.loss_clip,
                stats.loss_hni,
                stats.loss_stc,
                skipped_total.total()
            ));
        }
        bar.set_position(step);
        let at_end = step == stop;
        if at_end || (cfg.run.checkpoint_every > 0 && step % cfg.run.checkpoint_every == 0) {
            let rank_loaders = match group {
                Some(pg) => exchange_loader_states(pg, step, loader.state())?,
                None => Vec::new(),
            };
            // Every rank takes part in the exchange; rank 0 writes.
            if lead {
                let state = TrainState {
                    step,
                    config: cfg.clone(),
                    loader: loader.state().clone(),
                    samples_seen,
                    train_seconds,
                    world_size: world,
                    rank_loaders,
                };
                let inputs = ModelInputs {
                    vocab: vocab.as_deref(),
                    tokenizer: &tokenizer,
                    preprocess: &preprocess,
                };
                let path =
                    save_checkpoint(&ckpt_dir, &model, stc.as_ref(), &inputs, &optimizer, &state)?;
                prune_checkpoints(&ckpt_dir, cfg.run.keep_checkpoints)?;
                say(verbose, &bar, &format!("checkpoint {}", path.display()));
                last_checkpoint = Some(path);
            }
        }
        if lead && eval_due(&cfg, step, total, at_end) {
            last_eval = eval_at(step, &mut metrics)?.or(last_eval);
        }
    }
    bar.finish_and_clear();
    if let (true, Some(c)) = (lead && req.verbose, loader.annotation_counts()) {
        eprintln!("hq-train: this rank's {c}");
    }
    drop(loader);

    // ---- the end: plots and summary (rank 0)
    if let (true, Some(m)) = (step == total, &metrics) {
        if let Err(e) = plot_curves(m.path(), &out.join("plots")) {
            // A missing font must not cost a finished run; the metrics hold the same numbers.
            eprintln!("hq-train: warning: cannot draw the curves: {e}");
        }
    }
    let summary = RunSummary {
        out_dir: out.clone(),
        first_step,
        last_step: step,
        steps: records,
        skipped: skipped_session,
        samples_seen,
        last_checkpoint,
        eval: last_eval,
        samples_per_second: session_samples as f64
            / session_start.elapsed().as_secs_f64().max(1e-9),
    };
    if !lead {
        return Ok(summary);
    }
    let text = serde_json::to_string_pretty(&summary).map_err(|e| io(&out, e))?;
    hq_data::atomic::write_atomic(out.join("summary.json"), text.as_bytes())?;
    if req.verbose {
        eprintln!(
            "hq-train: steps {first_step}..{step} done, {} samples seen, {:.1} samples/s; bad samples \
             this session: {}",
            samples_seen, summary.samples_per_second, summary.skipped
        );
    }
    Ok(summary)
}

/// `counts` summed over the ranks of `group` (themselves in a single process).
fn global_skips(
    group: Option<&ProcessGroup>,
    counts: &SkipCounts,
) -> Result<SkipCounts, TrainError> {
    let Some(pg) = group else {
        return Ok(*counts);
    };
    let v = crate::distributed::sum_over_ranks(
        pg,
        &[
            counts.record as f64,
            counts.image as f64,
            counts.text as f64,
        ],
    )?;
    Ok(SkipCounts {
        record: v[0] as u64,
        image: v[1] as u64,
        text: v[2] as u64,
    })
}

/// Per-source sample counts summed over the ranks of `group` (every rank has the same sources).
fn global_counts(group: Option<&ProcessGroup>, counts: &[u64]) -> Result<Vec<u64>, TrainError> {
    let Some(pg) = group else {
        return Ok(counts.to_vec());
    };
    if counts.is_empty() {
        return Ok(Vec::new());
    }
    let v: Vec<f64> = counts.iter().map(|&c| c as f64).collect();
    let sum = crate::distributed::sum_over_ranks(pg, &v)?;
    Ok(sum.into_iter().map(|c| c as u64).collect())
}

/// Annotation counts summed over the ranks of `group`.
fn global_annotations(
    group: Option<&ProcessGroup>,
    c: &hq_data::shards::AnnotationCounts,
) -> Result<hq_data::shards::AnnotationCounts, TrainError> {
    let Some(pg) = group else {
        return Ok(*c);
    };
    let v = crate::distributed::sum_over_ranks(
        pg,
        &[
            c.joined as f64,
            c.missing as f64,
            c.orphan as f64,
            c.bad_records as f64,
            c.missing_files as f64,
        ],
    )?;
    Ok(hq_data::shards::AnnotationCounts {
        joined: v[0] as u64,
        missing: v[1] as u64,
        orphan: v[2] as u64,
        bad_records: v[3] as u64,
        missing_files: v[4] as u64,
    })
}

/// Every rank publishes its loader position for checkpoint `step` in the store; rank 0 returns
/// those of ranks 1.. (the others an empty list).
fn exchange_loader_states(
    pg: &ProcessGroup,
    step: u64,
    mine: &LoaderState,
) -> Result<Vec<LoaderState>, TrainError> {
    let key = |r: usize| format!("loader/{step}/{r}");
    if pg.rank() != 0 {
        pg.store_set(&key(pg.rank()), mine.to_json().as_bytes())?;
        return Ok(Vec::new());
    }
    (1..pg.world_size())
        .map(|r| {
            let bytes = pg.store_get(&key(r))?;
            LoaderState::from_json(&String::from_utf8_lossy(&bytes))
        })
        .collect()
}

/// What turns raw data into the model's inputs and targets: saved with the weights, so that the
/// checkpoint alone is enough to resume, evaluate and export the model.
struct ModelInputs<'a> {
    /// The STC tag vocabulary, when the run has the STC head.
    vocab: Option<&'a TagVocab>,
    tokenizer: &'a TextTokenizer,
    preprocess: &'a Preprocess,
}

fn save_checkpoint(
    dir: &Path,
    model: &Clip,
    stc: Option<&StcHead>,
    inputs: &ModelInputs<'_>,
    optimizer: &AdamW,
    state: &TrainState,
) -> Result<PathBuf, TrainError> {
    let mut w = CheckpointWriter::create(dir.join(format!("step-{:08}", state.step)), state.step)?;
    w.write_tensors(ckpt::MODEL_FILE, &model.state_dict())?;
    w.write_bytes(
        ckpt::MODEL_CONFIG_FILE,
        model.config().to_json_string()?.as_bytes(),
    )?;
    if let Some(h) = stc {
        w.write_tensors(ckpt::STC_HEAD_FILE, &h.state_dict())?;
    }
    if let Some(v) = inputs.vocab {
        let p = w.external_file(ckpt::TAG_VOCAB_FILE)?;
        v.save(&p)?;
    }
    w.write_json(ckpt::PREPROCESS_FILE, &inputs.preprocess.to_open_clip())?;
    if let TextTokenizer::Hf(t) = inputs.tokenizer {
        ckpt::write_tokenizer_files(&mut w, t.folder())?;
    }
    w.write_tensors(ckpt::OPTIMIZER_FILE, &optimizer.state_tensors())?;
    w.write_json(ckpt::TRAIN_STATE_FILE, state)?;
    let path = w.commit()?;
    ckpt::write_latest(&path)?;
    Ok(path)
}

/// Keeps the newest `keep` checkpoints (0: all).
fn prune_checkpoints(dir: &Path, keep: usize) -> Result<(), TrainError> {
    if keep == 0 {
        return Ok(());
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("step-"))
        })
        .collect();
    found.sort();
    let remove = found.len().saturating_sub(keep);
    for p in &found[..remove] {
        std::fs::remove_dir_all(p).map_err(|e| io(p, e))?;
    }
    Ok(())
}

/// Whether the evaluation is due after `step`: every `eval_every` steps and at the run's end.
fn eval_due(cfg: &TrainConfig, step: u64, total: u64, at_end: bool) -> bool {
    cfg.run.eval_dir.is_some()
        && ((cfg.run.eval_every > 0 && step.is_multiple_of(cfg.run.eval_every))
            || (at_end && step == total))
}

/// Whether the run in `out` is finished: its summary says it reached the last step (a killed run
/// may hold the last checkpoint without its end, which a resume then completes).
fn finished_run(out: &Path, total: u64) -> bool {
    std::fs::read(out.join("summary.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<RunSummary>(&b).ok())
        .is_some_and(|s| s.last_step >= total)
}

/// The (name, value) pairs of an `eval` record of the metrics log.
fn eval_results(record: &serde_json::Value) -> Option<Vec<(String, f64)>> {
    let results = record.get("results")?.as_object()?;
    Some(
        results
            .iter()
            .map(|(k, v)| (k.clone(), v.as_f64().unwrap_or(f64::NAN)))
            .collect(),
    )
}

/// Evaluates at `step` (rank 0), logs the `eval` record and returns the summary.
fn evaluate_and_log(
    encoder: TchEncoder<'_>,
    cfg: &TrainConfig,
    step: u64,
    out: &Path,
    bar: &indicatif::ProgressBar,
    verbose: bool,
    metrics: &mut Option<MetricsLog>,
) -> Result<Option<Vec<(String, f64)>>, TrainError> {
    let Some(dir) = &cfg.run.eval_dir else {
        return Ok(None);
    };
    let summary = evaluate(encoder, dir, cfg, step, out, bar)?;
    let record = json!({"kind": "eval", "step": step,
        "results": summary.into_iter().collect::<serde_json::Map<String, serde_json::Value>>()});
    let results = eval_results(&record);
    say(
        verbose,
        bar,
        &format!(
            "eval at step {step}: {}",
            results
                .iter()
                .flatten()
                .map(|(k, v)| format_eval_value(k, *v))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    log(metrics, &record)?;
    Ok(results)
}

/// One summary value for the log line: accuracies and recalls as percentages, cosines as plain
/// numbers (as `BuiltinReport::to_text` prints them).
fn format_eval_value(key: &str, value: f64) -> String {
    if hq_eval::BuiltinReport::summary_value_is_cosine(key) {
        format!("{key} {value:.3}")
    } else {
        format!("{key} {:.1}%", 100.0 * value)
    }
}

/// Evaluates on the built-in held-out sets; writes `eval/step-N.json`; returns the summary.
fn evaluate(
    mut encoder: TchEncoder<'_>,
    eval_dir: &Path,
    cfg: &TrainConfig,
    step: u64,
    out: &Path,
    bar: &indicatif::ProgressBar,
) -> Result<Vec<(String, serde_json::Value)>, TrainError> {
    let options = hq_eval::RunOptions {
        limit: (cfg.run.eval_samples > 0).then_some(cfg.run.eval_samples as u64),
        progress: false,
        threads: cfg.data.threads,
        ..hq_eval::RunOptions::default()
    };
    let report = bar
        .suspend(|| hq_eval::evaluate_builtin(&mut encoder, eval_dir, &options))
        .map_err(|e| TrainError::Eval(e.to_string()))?;
    let path = out.join("eval").join(format!("step-{step:08}.json"));
    let text = serde_json::to_string_pretty(&report).map_err(|e| io(&path, e))?;
    hq_data::atomic::write_atomic(&path, text.as_bytes())?;
    Ok(report
        .summary()
        .into_iter()
        .map(|(k, v)| (k, json!(v)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::format_eval_value;

    #[test]
    fn eval_log_line_prints_cosines_as_numbers_and_accuracies_as_percentages() {
        assert_eq!(
            format_eval_value("synth_shape/prompt_cosine", 0.9984),
            "synth_shape/prompt_cosine 0.998"
        );
        assert_eq!(
            format_eval_value("synth_shape/acc1", 0.125),
            "synth_shape/acc1 12.5%"
        );
    }
}
