//! Data parallelism equals the single process: k optimizer steps with 2 ranks x batch B (libtorch's
//! Gloo on loopback, real processes: this binary re-runs itself as the ranks) give the per-step
//! losses and the final parameters of 1 process with batch 2B on the same samples in the same
//! order, for plain CLIP, for +HNI +STC with some gates open, and with gradient accumulation;
//! with the gradients all-reduced during the backward pass (libtorch's DDP reducer, the default)
//! and after it.
//! The ranks start from different seeds: rank 0's weights reach the other by broadcast.
//!
//! Tolerance (measured, see `TOLERANCE`): the two runs round differently (each rank encodes 8
//! rows instead of 16, the contrastive loss sums in another order), so equality is to float32
//! rounding carried through a few AdamW steps.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use hq_dist::{launch, Backend, ProcessGroup, Rendezvous};
use hq_train::config::{LossParts, StcReduction};
use hq_train::data::Batch;
use hq_train::distributed::{OverlappedGradients, Ranks};
use hq_train::model::{excluded_from_weight_decay, Clip, ClipConfig, StcHead};
use hq_train::optim::{AdamW, AdamWConfig};
use hq_train::step::{train_step_on, Objective};
use tch::nn::VarStore;
use tch::{Device, Tensor};

const WORKER: &str = "HQ_TRAIN_DP_WORKER";
const STEPS: usize = 3;
const PER_RANK: usize = 8;
const TAGS: i64 = 24;
/// Largest accepted differences: (per-step loss, relative; first-step gradient, relative to the
/// tensor's largest entry; final parameter, against lr x steps, the most AdamW moves one).
/// Measured on these variants: losses <= 1.8e-6, gradients ~1e-6, parameters <= 1.8e-2 of
/// lr x steps. Parameters take the loosest bound for a reason: AdamW's update m / (sqrt(v) + eps)
/// turns an absolute gradient rounding d of a near-zero gradient into up to lr d / eps (eps =
/// 1e-6, a millionfold) per step. What a real bug would do (a missing or averaged all-reduce, a
/// wrong row offset, a gate over the local batch) moves gradients by O(1) of their size, which the
/// gradient check sees even where AdamW's normalisation hides it in the parameters.
const TOLERANCE: (f64, f64, f64) = (1e-5, 1e-4, 0.1);
const LR: f64 = 1e-3;
static REFERENCE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn objective(parts: LossParts) -> Objective {
    Objective {
        parts,
        hni_weight: 0.5,
        stc_weight: 2.0,
        stc_reduction: StcReduction::Mean,
        autocast: false,
        grad_clip: Some(1.0),
        max_logit_scale: 100.0,
    }
}

/// (loss parts, micro-batches per step, gradients all-reduced during the backward (DDP's reducer)
/// rather than after it).
fn variant(name: &str) -> (LossParts, usize, bool) {
    let all = LossParts {
        mixed_text: true,
        hni: true,
        stc: true,
    };
    match name {
        "clip" => (
            LossParts {
                hni: false,
                stc: false,
                ..all
            },
            1,
            true,
        ),
        "hni_stc" => (all, 1, true),
        "hni_stc_accum" => (all, 2, true),
        "hni_stc_accum_after_backward" => (all, 2, false),
        other => panic!("unknown variant {other}"),
    }
}

fn config() -> ClipConfig {
    let mut cfg = ClipConfig::hq_tiny();
    cfg.text_cfg.context_length = 24;
    cfg
}

/// The global batch of every step (the same in every process: its own seed).
fn global_batches(cfg: &ClipConfig, world: usize) -> Vec<Batch> {
    tch::manual_seed(1234);
    (0..STEPS)
        .map(|_| hq_train::testing::synthetic_batch(cfg, PER_RANK * world, TAGS))
        .collect()
}

/// Runs the steps on `batches` (this rank's rows of each global batch, cut into `micro`
/// micro-batches); returns the per-step losses and the final parameters.
fn run(
    group: Option<&ProcessGroup>,
    seed: i64,
    (parts, micro, overlapped): (LossParts, usize, bool),
    batches: &[Batch],
) -> (Vec<[f64; 4]>, Vec<(String, Tensor)>) {
    let cfg = config();
    tch::manual_seed(seed);
    let vs = VarStore::new(Device::Cpu);
    let model = Clip::new(vs.root(), &cfg).expect("model");
    let stc = StcHead::new(vs.root(), cfg.embed_dim, cfg.embed_dim, TAGS).expect("head");
    let mut params = model.state_dict();
    params.extend(stc.state_dict());
    if let Some(pg) = group {
        hq_train::distributed::broadcast_from_rank0(pg, params.iter().map(|(_, t)| t))
            .expect("broadcast");
    }
    let shallow = |p: &[(String, Tensor)]| -> Vec<(String, Tensor)> {
        p.iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect()
    };
    let overlap = match (group, overlapped) {
        (Some(pg), true) => Some(OverlappedGradients::new(pg, &shallow(&params)).expect("reducer")),
        _ => None,
    };
    let mut opt = AdamW::new(AdamWConfig::default(), shallow(&params), |n, t| {
        !excluded_from_weight_decay(n, t)
    })
    .expect("optimizer");
    let obj = objective(parts);
    let mut losses = Vec::new();
    let mut first_grads = Vec::new();
    for (step, b) in batches.iter().enumerate() {
        let per = b.len() / micro;
        let parts: Vec<Batch> = (0..micro).map(|j| b.rows(j * per..(j + 1) * per)).collect();
        let s = train_step_on(
            group.map(|group| Ranks {
                group,
                overlap: overlap.as_ref(),
            }),
            &model,
            Some(&stc),
            &mut opt,
            &parts,
            &obj,
            LR,
            Device::Cpu,
            step as u64 + 1,
        )
        .expect("step");
        losses.push([s.loss, s.loss_clip, s.loss_hni, s.loss_stc]);
        if step == 0 {
            first_grads = params
                .iter()
                .map(|(n, p)| {
                    // Unused parameters (the STC head without STC) have no gradient alone.
                    let g = p.grad();
                    let g = if g.defined() {
                        g.copy()
                    } else {
                        p.zeros_like()
                    };
                    (format!("__grad1/{n}"), g)
                })
                .collect();
        }
    }
    params.extend(first_grads);
    (losses, params)
}

fn save(path: &Path, losses: &[[f64; 4]], params: &[(String, Tensor)]) {
    let flat: Vec<f64> = losses.iter().flatten().copied().collect();
    let mut named: Vec<(String, Tensor)> = params
        .iter()
        .map(|(n, t)| (n.clone(), t.detach().copy()))
        .collect();
    named.push(("__losses".into(), Tensor::from_slice(&flat)));
    Tensor::write_safetensors(&named, path).expect("write");
}

/// The rank's side; a no-op unless this process was started as a rank.
#[test]
fn worker() {
    let Ok(name) = std::env::var(WORKER) else {
        return;
    };
    let rdv = Rendezvous::from_env().expect("env").expect("launched");
    let pg = ProcessGroup::new(&rdv, Backend::Gloo, Duration::from_secs(60)).expect("join");
    let cfg = config();
    let mine: Vec<Batch> = global_batches(&cfg, 2)
        .iter()
        .map(|b| b.rows(rdv.rank * PER_RANK..(rdv.rank + 1) * PER_RANK))
        .collect();
    // Different seeds: rank 1's own initial weights must be replaced by rank 0's.
    let (losses, params) = run(Some(&pg), 7 + rdv.rank as i64, variant(&name), &mine);
    let out = PathBuf::from(std::env::var("HQ_TRAIN_DP_OUT").expect("out"));
    save(
        &out.join(format!("rank{}.safetensors", rdv.rank)),
        &losses,
        &params,
    );
}

fn read(path: &Path) -> Vec<(String, Tensor)> {
    Tensor::read_safetensors(path).expect("read")
}

fn check_variant(name: &str) {
    let tmp = tempfile::tempdir().expect("tmp");
    let port = launch::free_port().expect("port");
    let exe = std::env::current_exe().expect("exe");
    let children: Vec<_> = (0..2)
        .map(|rank| {
            Command::new(&exe)
                .args(["--exact", "worker", "--nocapture", "--test-threads", "1"])
                .env(WORKER, name)
                .env("HQ_TRAIN_DP_OUT", tmp.path())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", "2")
                .env("LOCAL_RANK", rank.to_string())
                .env("HQ_NO_PROGRESS", "1")
                .spawn()
                .expect("spawn")
        })
        .collect();
    // The single process over the global batches meanwhile (one at a time: the batches and the
    // initial weights come from libtorch's global generator, which the other tests' threads of
    // this binary would otherwise draw from in between).
    let (parts, micro, overlapped) = variant(name);
    let (want_losses, want_params) = {
        let _one = REFERENCE.lock().unwrap_or_else(|e| e.into_inner());
        let batches = global_batches(&config(), 2);
        run(None, 7, (parts, micro, overlapped), &batches)
    };
    for (rank, mut c) in children.into_iter().enumerate() {
        let status = c.wait().expect("wait");
        assert!(status.success(), "{name}: rank {rank} failed: {status}");
    }
    let ranks: Vec<Vec<(String, Tensor)>> = (0..2)
        .map(|r| read(&tmp.path().join(format!("rank{r}.safetensors"))))
        .collect();
    let find = |set: &[(String, Tensor)], key: &str| -> Tensor {
        set.iter()
            .find(|(n, _)| n == key)
            .map(|(_, t)| t.shallow_clone())
            .unwrap_or_else(|| panic!("{key} missing"))
    };
    let got_losses = Vec::<f64>::try_from(&find(&ranks[0], "__losses")).expect("losses");
    let want_flat: Vec<f64> = want_losses.iter().flatten().copied().collect();
    let mut worst_loss = 0f64;
    for (g, w) in got_losses.iter().zip(&want_flat) {
        worst_loss = worst_loss.max((g - w).abs() / w.abs().max(1e-3));
    }
    let (mut worst_param, mut worst_grad) = (0f64, 0f64);
    for (n, w) in &want_params {
        let g0 = find(&ranks[0], n);
        let g1 = find(&ranks[1], n);
        assert!(g0.equal(&g1), "{name}: ranks 0 and 1 differ in {n}");
        let diff = (&g0 - w).abs().max().double_value(&[]);
        if n.starts_with("__grad1/") {
            let size = w.abs().max().double_value(&[]);
            worst_grad = worst_grad.max(diff / size.max(1e-12));
        } else {
            worst_param = worst_param.max(diff);
        }
    }
    let move_bound = LR * STEPS as f64;
    eprintln!(
        "{name}: losses {got_losses:?} vs {want_flat:?}: worst relative difference {worst_loss:.1e}; \
         first-step gradients: worst {worst_grad:.1e} of the tensor's size; parameters: worst \
         {worst_param:.1e} ({:.1e} of lr x steps)",
        worst_param / move_bound
    );
    assert!(
        worst_loss <= TOLERANCE.0,
        "{name}: losses differ by {worst_loss:e}"
    );
    assert!(
        worst_grad <= TOLERANCE.1,
        "{name}: gradients differ by {worst_grad:e}"
    );
    assert!(
        worst_param <= TOLERANCE.2 * move_bound,
        "{name}: parameters differ by {worst_param:e}"
    );
    // Something happened: the losses are not all equal and the HNI variants had open gates.
    if parts.hni {
        assert!(
            want_losses.iter().any(|l| l[2] > 0.0),
            "{name}: no open HNI gate"
        );
    }
}

#[test]
fn two_ranks_equal_one_process_plain_clip() {
    check_variant("clip");
}

#[test]
fn two_ranks_equal_one_process_with_hni_and_stc() {
    check_variant("hni_stc");
}

#[test]
fn two_ranks_equal_one_process_with_accumulation() {
    check_variant("hni_stc_accum");
}

#[test]
fn two_ranks_equal_one_process_reducing_after_the_backward() {
    check_variant("hni_stc_accum_after_backward");
}
