//! `hq-train`: train CLIP with the HQ-CLIP objective (see `hq_train::train` for what a run
//! writes and `hq_train::config` for every setting).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use hq_train::config::{set_toml_key, Precision};
use hq_train::{RunRequest, TrainConfig, Variant};

#[derive(Parser, Debug)]
#[command(
    name = "hq-train",
    version,
    about = "Train CLIP with the HQ-CLIP objective (mixed texts, hard-negative identification, short-tag classification)",
    long_about = "Train CLIP with the HQ-CLIP objective: L = 0.5 L_i2t + 0.5 L_t2i + alpha L_HNI + beta L_cls, \
                  with mixed refined/raw texts, on webdataset shards.\n\n\
                  Settings come from (later wins): the defaults, the --config TOML file (sections \
                  [model] [data] [loss] [optim] [run]; `--print-config` shows every key), the named \
                  flags below, and --set section.key=value. Contradictory or missing settings are \
                  refused with the setting's name and what to change.\n\n\
                  The run directory (--out) receives config.toml, metrics.jsonl, tb/ (the same \
                  metrics as TensorBoard event files: tensorboard --logdir RUN/tb), checkpoints/ \
                  (atomic, checksummed; --resume continues bit for bit on the CPU), eval/, plots/ \
                  (loss.png, lr.png) and summary.json.\n\n\
                  Example: hq-train --train out/default/train --eval-dir out/default/eval \
                  --variant stc --steps 300 --batch-size 64 --out runs/stc\n\n\
                  Data parallel: under torchrun (`torchrun --nproc-per-node 2 --no-python hq-train \
                  ...`) or Slurm's srun, each process joins the job from the launcher's variables \
                  (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK; or SLURM_PROCID, \
                  SLURM_NTASKS, SLURM_LOCALID, SLURM_JOB_NODELIST) through libtorch's c10d (gloo \
                  on the CPU, nccl on CUDA); --nproc-per-node N starts N local ranks itself. \
                  --batch-size is per rank; only rank 0 writes the run directory."
)]
struct Cli {
    /// TOML config file (see --print-config for the keys and defaults).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Continue a run: a checkpoint directory, or a run directory (its latest checkpoint). The
    /// checkpoint's settings are used; settings given here must agree with them except output,
    /// logging, evaluation, device and thread settings.
    #[arg(long, value_name = "DIR")]
    resume: Option<PathBuf>,
    /// Stop after this step as if interrupted (a checkpoint is written there); the learning-rate
    /// schedule still spans --steps.
    #[arg(long, value_name = "STEP")]
    stop_after: Option<u64>,
    /// Print the resolved settings as TOML and exit (a starting point for --config).
    #[arg(long)]
    print_config: bool,
    /// The paper's ablation, cumulative: baseline (raw alt-texts, contrastive only), mixed
    /// (refined segment with probability r), hni (+ hard-negative identification), stc (+ short-tag
    /// classification; full HQ-CLIP, the default). [loss.variant]
    #[arg(long, value_enum)]
    variant: Option<Variant>,
    /// Model preset: hq-tiny, hq-small, ViT-B-32, ViT-B-16, ViT-L-14. [model.preset]
    #[arg(long, value_name = "NAME")]
    model: Option<String>,
    /// open_clip model-config JSON instead of a preset. [model.config]
    #[arg(long, value_name = "FILE", conflicts_with = "model")]
    model_config: Option<PathBuf>,
    /// Start from these weights instead of a random init: an open_clip Hugging Face folder
    /// (open_clip_config.json + open_clip_model.safetensors or open_clip_pytorch_model.bin), a
    /// checkpoint of ours, or a weights file (.safetensors, or a torch.save .bin/.pt, read without
    /// running pickle code). Its config is the model's unless --model/--model-config says
    /// otherwise (then the weights must fit that config). [model.pretrained]
    #[arg(long, value_name = "PATH")]
    pretrained: Option<PathBuf>,
    /// A Hugging Face tokenizer folder (tokenizer.json) for a model whose config names one
    /// (CLIPA); default: the one beside the --pretrained weights. [model.tokenizer]
    #[arg(long, value_name = "DIR")]
    tokenizer: Option<PathBuf>,
    /// Freeze the image tower (LiT), as open_clip's --lock-image. [model.lock_image]
    #[arg(long)]
    lock_image: bool,
    /// Leave the image tower's last N groups trainable (open_clip's groups: the projection, the
    /// last block with ln_post, each earlier block, the stem). [model.lock_image_unlocked_groups]
    #[arg(long, value_name = "N")]
    lock_image_unlocked_groups: Option<usize>,
    /// With --lock-image on a ResNet image tower, also keep its BatchNorm statistics fixed, as
    /// open_clip's --lock-image-freeze-bn-stats. [model.lock_image_freeze_bn_stats]
    #[arg(long)]
    lock_image_freeze_bn_stats: bool,
    /// Freeze the text tower, as open_clip's --lock-text. [model.lock_text]
    #[arg(long)]
    lock_text: bool,
    /// Leave the text tower's last N groups trainable. [model.lock_text_unlocked_layers]
    #[arg(long, value_name = "N")]
    lock_text_unlocked_layers: Option<usize>,
    /// Peak learning rate of the new heads (the STC head), when it should differ from --lr
    /// (fine-tuning a pretrained model). [optim.head_lr]
    #[arg(long, value_name = "LR")]
    head_lr: Option<f64>,
    /// Square image size overriding the model's (a multiple of its patch size). [model.image_size]
    #[arg(long, value_name = "PX")]
    image_size: Option<i64>,
    /// Training shards: directories, globs, brace ranges (shard-{00000..00019}.tar), @list
    /// files. [data.train]
    #[arg(long, value_name = "SHARDS", num_args = 1..)]
    train: Vec<String>,
    /// One source of a weighted mixture (repeat for each; use instead of --train): shards as
    /// --train takes them. Sources are sampled with replacement by weight in an endless,
    /// step-based stream (open_clip's --dataset-resampled with --train-data-upsampling-factors).
    /// Per-source annotations: [[data.sources]] in the config file. [data.sources]
    #[arg(long = "source", value_name = "SHARDS", conflicts_with = "train")]
    sources: Vec<String>,
    /// The sources' weights, in --source order (default: equal), e.g. `3,1`.
    #[arg(
        long,
        value_name = "W,W,...",
        value_delimiter = ',',
        requires = "sources"
    )]
    source_weights: Vec<f64>,
    /// What the weights mean: share (source i gives w_i / sum(w) of the samples) or per-shard
    /// (open_clip's --train-data-upsampling-factors: every shard of source i weighs w_i, so equal
    /// weights mix the sources in proportion to their shard counts). [data.source_weighting]
    #[arg(long, value_enum, requires = "sources")]
    source_weighting: Option<hq_train::data::SourceWeighting>,
    /// Side-car annotations joined onto the --train shards while reading (no copy written): a
    /// folder of per-shard files (`00012.tar` <-> `00012.jsonl` or `00012.json`, as
    /// `hq-recap-trt --format sidecar` writes them) or index files (a file, glob, brace range or
    /// @list of .jsonl/.json). Samples without an annotation keep their raw alt-text.
    /// [data.annotations.path]
    #[arg(long, value_name = "SPEC")]
    annotations: Option<String>,
    /// The id annotations are matched by: the sample's metadata field (uid, url; key for the sample
    /// key) that the records also hold, or SAMPLE=RECORD when the record names it differently
    /// (uid=id). [data.annotations.id_field, record_id_field]
    #[arg(long, value_name = "FIELD", requires = "annotations")]
    annotation_id: Option<String>,
    /// Which annotation fields hold the texts: OURS=THEIRS pairs, e.g.
    /// `long_positive=caption,tags_positive=tags` (dotted paths for nested fields; unmapped texts
    /// stay empty). [data.annotations.fields]
    #[arg(long, value_name = "MAP", requires = "annotations")]
    annotation_fields: Option<String>,
    /// Held-out sets for the zero-shot evaluation (hq-data synth's eval/ folder). [run.eval_dir]
    #[arg(long, value_name = "DIR")]
    eval_dir: Option<PathBuf>,
    /// Evaluate every N steps (0: only the final model). [run.eval_every]
    #[arg(long, value_name = "N")]
    eval_every: Option<u64>,
    /// Samples per held-out set in the evaluation (0: all). [run.eval_samples]
    #[arg(long, value_name = "N")]
    eval_samples: Option<usize>,
    /// Run directory. [run.out_dir]
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Optimizer steps. [run.steps]
    #[arg(long, value_name = "N")]
    steps: Option<u64>,
    /// Samples per forward pass. [run.batch_size]
    #[arg(long, value_name = "N")]
    batch_size: Option<usize>,
    /// Micro-batches per optimizer step (the contrastive batch spans all). [run.accum_steps]
    #[arg(long, value_name = "N")]
    accum_steps: Option<usize>,
    /// Peak learning rate. [optim.lr]
    #[arg(long, value_name = "LR")]
    lr: Option<f64>,
    /// Linear warm-up steps. [optim.warmup_steps]
    #[arg(long, value_name = "N")]
    warmup_steps: Option<u64>,
    /// Seed of the model init and of every data choice. [run.seed]
    #[arg(long, value_name = "S")]
    seed: Option<u64>,
    /// auto, cpu, cuda, cuda:N. [run.device]
    #[arg(long, value_name = "DEV")]
    device: Option<String>,
    /// auto (bf16 autocast on a GPU, fp32 on the CPU), fp32, bf16. [run.precision]
    #[arg(long, value_enum)]
    precision: Option<Precision>,
    /// Checkpoint every N steps (0: only at the end). [run.checkpoint_every]
    #[arg(long, value_name = "N")]
    checkpoint_every: Option<u64>,
    /// A metrics line every N steps. [run.log_every]
    #[arg(long, value_name = "N")]
    log_every: Option<u64>,
    /// Decode threads of the data loader (0: one per core). [data.threads]
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// Any setting as section.key=value (TOML value; strings may be unquoted), e.g.
    /// --set optim.weight_decay=0.1 --set loss.stc_weight=100. Repeatable; applied last.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Only the final summary lines on stderr (the progress bar is hidden with HQ_NO_PROGRESS=1).
    #[arg(long, short)]
    quiet: bool,
    /// Start N ranks of this command on this machine (loopback rendezvous), as torchrun
    /// --nproc-per-node does; the ranks split the shards and train on N x --batch-size samples
    /// per step.
    #[arg(long, value_name = "N")]
    nproc_per_node: Option<usize>,
    /// Collectives backend of a data-parallel run: auto (nccl on CUDA, gloo on the CPU), gloo,
    /// nccl.
    #[arg(long, value_name = "NAME", default_value = "auto")]
    dist_backend: String,
    /// Seconds a rank waits for the others in a collective before failing (torch's default).
    #[arg(long, value_name = "S", default_value_t = 1800)]
    dist_timeout: u64,
    /// All-reduce gradients during the backward pass (libtorch's DDP reducer) or after it: auto
    /// (during with nccl, after with gloo: on CPUs the two compete for the same cores, and after
    /// measured faster, benches/RESULTS.md), on, off.
    #[arg(long, value_name = "WHEN", default_value = "auto")]
    dist_overlap: String,
}

/// `hq-train --nproc-per-node N ...`: the same command, without that flag, as N local ranks.
fn launch_local(nproc: usize, timeout: std::time::Duration) -> Result<()> {
    let exe = std::env::current_exe().context("the hq-train executable")?;
    let mut args: Vec<std::ffi::OsString> = Vec::new();
    let mut it = std::env::args_os().skip(1);
    while let Some(a) = it.next() {
        let text = a.to_string_lossy();
        if text == "--nproc-per-node" {
            it.next();
        } else if !text.starts_with("--nproc-per-node=") {
            args.push(a);
        }
    }
    hq_dist::launch::launch_local(&exe, &args, nproc, timeout).map_err(Into::into)
}

/// The process group of a data-parallel launch, or `None` for a single process. Under a launch,
/// `--device auto` becomes this rank's GPU (`cuda:LOCAL_RANK`) when there are GPUs.
fn join_group(cli: &Cli, config: &mut TrainConfig) -> Result<Option<hq_dist::ProcessGroup>> {
    let Some(rdv) = hq_dist::Rendezvous::from_env()? else {
        return Ok(None);
    };
    let request = config
        .run
        .device
        .parse::<hq_train::device::DeviceRequest>()?
        .for_local_rank(rdv.local_rank);
    config.run.device = request.spec();
    let backend = match cli.dist_backend.as_str() {
        "auto" => hq_dist::Backend::for_device(request.resolve()?),
        name => name.parse()?,
    };
    let timeout = std::time::Duration::from_secs(cli.dist_timeout);
    let group = hq_dist::ProcessGroup::new(&rdv, backend, timeout)
        .with_context(|| format!("joining the data-parallel job as rank {}", rdv.rank))?;
    Ok(Some(group))
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(n) = cli.nproc_per_node {
        if std::env::var_os("RANK").is_some() {
            anyhow::bail!("--nproc-per-node inside a launched job (RANK is set): use one launcher");
        }
        return launch_local(n, std::time::Duration::from_secs(cli.dist_timeout.min(60)));
    }
    let mut table = match (&cli.config, &cli.resume) {
        (Some(path), _) => TrainConfig::load(path)?,
        (None, Some(resume)) => {
            let state = hq_train::train::saved_state(resume)
                .with_context(|| format!("cannot resume from {}", resume.display()))?;
            toml::Table::try_from(&state.config).context("checkpoint config")?
        }
        (None, None) => toml::Table::new(),
    };
    let mut sets: Vec<String> = Vec::new();
    let mut flag = |key: &str, value: Option<String>| {
        if let Some(v) = value {
            sets.push(format!("{key}={v}"));
        }
    };
    flag("loss.variant", cli.variant.map(|v| toml_str(v.name())));
    if let Some(m) = &cli.model {
        flag("model.preset", Some(toml_str(m)));
    }
    if let Some(p) = &cli.model_config {
        // A JSON config replaces a preset from the config file.
        flag("model.preset", Some(toml_str("")));
        flag("model.config", Some(toml_str(&p.display().to_string())));
    }
    if let Some(p) = &cli.pretrained {
        flag("model.pretrained", Some(toml_str(&p.display().to_string())));
    }
    if let Some(p) = &cli.tokenizer {
        flag("model.tokenizer", Some(toml_str(&p.display().to_string())));
    }
    flag("model.image_size", cli.image_size.map(|v| v.to_string()));
    flag(
        "model.lock_image",
        cli.lock_image.then(|| "true".to_string()),
    );
    flag(
        "model.lock_image_unlocked_groups",
        cli.lock_image_unlocked_groups.map(|v| v.to_string()),
    );
    flag(
        "model.lock_image_freeze_bn_stats",
        cli.lock_image_freeze_bn_stats.then(|| "true".to_string()),
    );
    flag("model.lock_text", cli.lock_text.then(|| "true".to_string()));
    flag(
        "model.lock_text_unlocked_layers",
        cli.lock_text_unlocked_layers.map(|v| v.to_string()),
    );
    flag("optim.head_lr", cli.head_lr.map(|v| v.to_string()));
    if !cli.train.is_empty() {
        let list: Vec<String> = cli.train.iter().map(|s| toml_str(s)).collect();
        flag("data.train", Some(format!("[{}]", list.join(", "))));
    }
    if !cli.sources.is_empty() {
        if !cli.source_weights.is_empty() && cli.source_weights.len() != cli.sources.len() {
            anyhow::bail!(
                "--source-weights gives {} weight(s) for {} --source(s)",
                cli.source_weights.len(),
                cli.sources.len()
            );
        }
        let list: Vec<String> = cli
            .sources
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let w = cli.source_weights.get(i).copied().unwrap_or(1.0);
                format!("{{ shards = [{}], weight = {w:?} }}", toml_str(s))
            })
            .collect();
        flag("data.sources", Some(format!("[{}]", list.join(", "))));
        if let Some(w) = cli.source_weighting {
            let name = match w {
                hq_train::data::SourceWeighting::Share => "share",
                hq_train::data::SourceWeighting::PerShard => "per-shard",
            };
            flag("data.source_weighting", Some(toml_str(name)));
        }
        // The mixture replaces a config file's single source.
        flag("data.train", Some("[]".into()));
    }
    if let Some(spec) = &cli.annotations {
        let mut t = toml::Table::new();
        t.insert("path".into(), toml::Value::String(spec.clone()));
        if let Some(id) = &cli.annotation_id {
            let mut a = hq_data::shards::AnnotationSpec::default();
            a.set_id(id);
            t.insert("id_field".into(), toml::Value::String(a.id_field.clone()));
            if let Some(r) = a.record_id_field {
                t.insert("record_id_field".into(), toml::Value::String(r));
            }
        }
        if let Some(m) = &cli.annotation_fields {
            let map = hq_data::shards::FieldMap::parse(m)?;
            t.insert("fields".into(), toml::Value::try_from(&map)?);
        }
        flag("data.annotations", Some(toml::Value::Table(t).to_string()));
    }
    let path = |p: &Option<PathBuf>| p.as_ref().map(|p| toml_str(&p.display().to_string()));
    flag("run.eval_dir", path(&cli.eval_dir));
    flag("run.out_dir", path(&cli.out));
    flag("run.eval_every", cli.eval_every.map(|v| v.to_string()));
    flag("run.eval_samples", cli.eval_samples.map(|v| v.to_string()));
    flag("run.steps", cli.steps.map(|v| v.to_string()));
    flag("run.batch_size", cli.batch_size.map(|v| v.to_string()));
    flag("run.accum_steps", cli.accum_steps.map(|v| v.to_string()));
    flag("optim.lr", cli.lr.map(|v| format!("{v:e}")));
    flag(
        "optim.warmup_steps",
        cli.warmup_steps.map(|v| v.to_string()),
    );
    flag("run.seed", cli.seed.map(|v| v.to_string()));
    flag("run.device", cli.device.as_deref().map(toml_str));
    flag(
        "run.precision",
        cli.precision.map(|p| {
            toml_str(match p {
                Precision::Auto => "auto",
                Precision::Fp32 => "fp32",
                Precision::Bf16 => "bf16",
            })
        }),
    );
    flag(
        "run.checkpoint_every",
        cli.checkpoint_every.map(|v| v.to_string()),
    );
    flag("run.log_every", cli.log_every.map(|v| v.to_string()));
    flag("data.threads", cli.threads.map(|v| v.to_string()));
    sets.extend(cli.set.iter().cloned());
    for s in &sets {
        set_toml_key(&mut table, s)?;
    }
    let mut config = TrainConfig::from_toml_table(table)?;
    if cli.print_config {
        print!("{}", config.to_toml_string()?);
        return Ok(());
    }
    let group = join_group(&cli, &mut config)?;
    let request = RunRequest {
        config,
        resume: cli.resume.clone(),
        stop_after: cli.stop_after,
        verbose: !cli.quiet,
    };
    let overlap = match (cli.dist_overlap.as_str(), &group) {
        (_, None) => false,
        ("auto", Some(g)) => g.backend() == hq_dist::Backend::Nccl,
        ("on", _) => true,
        ("off", _) => false,
        (other, _) => anyhow::bail!("--dist-overlap {other}: expected auto, on or off"),
    };
    let summary = hq_train::train::run_on(&request, group.as_ref(), overlap)?;
    if group.as_ref().is_some_and(|g| g.rank() != 0) {
        return Ok(());
    }
    let last = summary.steps.last();
    println!(
        "done: step {} of the run in {}, last loss {}, {:.1} samples/s, bad samples skipped: {}",
        summary.last_step,
        summary.out_dir.display(),
        last.map(|r| format!("{:.4}", r.loss))
            .unwrap_or_else(|| "-".into()),
        summary.samples_per_second,
        summary.skipped
    );
    if let Some(eval) = &summary.eval {
        for (k, v) in eval {
            println!("  {k:<32} {:>7.2}%", 100.0 * v);
        }
    }
    Ok(())
}
