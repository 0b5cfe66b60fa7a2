//! `hq-eval`: zero-shot evaluation of a CLIP model on DataComp's 38 tasks, ARO and the built-in
//! held-out sets, with CLIP_benchmark-exact metrics (the library is `hq-eval`, this is a thin
//! command over it).
//!
//! ```text
//! hq-eval run --model CKPT [--config CFG] --data-root DIR [--tasks all] --out DIR
//! hq-eval run --backend onnx --engine EXPORT_DIR --ep cpu|cuda|tensorrt --data-root DIR --out DIR
//! hq-eval builtin --model CKPT --corpus DIR [--out report.json]
//! hq-eval compare A/results.json B/results.json ... [--out table.md] [--png chart.png]
//! hq-eval tasks
//! ```

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use hq_eval::alignment::{text_alignment, TextSource};
use hq_eval::report::{compare_markdown, group_chart, markdown, terminal_table};
use hq_eval::results::{CodeInfo, ModelInfo, RunResults, TaskStatus};
use hq_eval::run::{locate, run_tasks, RunConfig};
use hq_eval::tasks::{select_tasks, TASKS};
use hq_eval::{evaluate_builtin, Encoder, RunOptions};

#[derive(Parser, Debug)]
#[command(
    name = "hq-eval",
    version,
    about = "Zero-shot evaluation of CLIP models: DataComp's 38 tasks, ARO, the built-in sets"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Evaluate a model on registry tasks; results go to OUT/results.json (+ .md, .png), one file
    /// per task under OUT/tasks/ as each finishes; a rerun keeps finished tasks.
    Run(RunArgs),
    /// Evaluate a model on the built-in held-out sets of a synthetic corpus (`hq-data synth`).
    Builtin(BuiltinArgs),
    /// Put two or more results.json files side by side (Markdown, optional PNG).
    Compare(CompareArgs),
    /// Mean image-text cosine of a dataset's texts under a model (the paper's Fig. 4a measure):
    /// raw alt-texts vs recaptions vs another source, one `LABEL=FIELD@SHARDS` each.
    Alignment(AlignmentArgs),
    /// List the registry: every task, its folder name, metric and where to get it.
    Tasks {
        /// Also say which tasks are present under this data root.
        #[arg(long, value_name = "DIR")]
        data_root: Option<PathBuf>,
    },
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    /// The tch (libtorch) CLIP model from an hq-train checkpoint or open_clip safetensors.
    Tch,
    /// An ONNX export (`hq-export`) on ONNX Runtime.
    Onnx,
}

#[derive(Args, Debug, Clone)]
struct ModelArgs {
    /// Model backend.
    #[arg(long, value_enum, default_value_t = Backend::Tch)]
    backend: Backend,
    /// Checkpoint (tch): an hq-train checkpoint folder or an open_clip-layout .safetensors file.
    #[arg(long, value_name = "CKPT")]
    model: Option<PathBuf>,
    /// Model config (tch): a JSON file or a preset name (hq-tiny, ViT-B-32, ...); needed for a bare
    /// .safetensors file without a config next to it.
    #[arg(long, value_name = "CFG")]
    config: Option<String>,
    /// Device for tch: auto, cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// ONNX export folder (image_encoder.onnx + text_encoder.onnx) for --backend onnx.
    #[arg(long, value_name = "DIR")]
    engine: Option<PathBuf>,
    /// ONNX Runtime execution provider: cpu, cuda[:N], tensorrt[:N].
    #[arg(long, default_value = "cpu")]
    ep: String,
    /// TensorRT engine / timing cache folder (tensorrt only).
    #[arg(long, value_name = "DIR")]
    trt_cache: Option<PathBuf>,
    /// TensorRT fp16 kernels.
    #[arg(long)]
    trt_fp16: bool,
    /// Label for tables (default: the checkpoint's or export's folder/file name).
    #[arg(long)]
    name: Option<String>,
}

#[derive(Args, Debug, Clone)]
struct PipelineArgs {
    /// Images per encoder call.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Texts per encoder call.
    #[arg(long, default_value_t = 256)]
    text_batch_size: usize,
    /// Image decode threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Evaluate only the first N samples of each set (quick checks; results say so).
    #[arg(long, value_name = "N")]
    limit: Option<u64>,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

impl PipelineArgs {
    fn options(&self) -> RunOptions {
        RunOptions {
            batch_size: self.batch_size.max(1),
            text_batch_size: self.text_batch_size.max(1),
            threads: self.threads,
            limit: self.limit,
            progress: !self.quiet,
            ..RunOptions::default()
        }
    }
}

#[derive(Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    pipeline: PipelineArgs,
    /// Folder holding the task folders (wds_<task>_test/, aro/, winogavil/).
    #[arg(long, value_name = "DIR")]
    data_root: PathBuf,
    /// Tasks: all (38 + ARO), datacomp (the 38), aro, vtab, in-shifts, retrieval, imagenet, or
    /// task names/keys; comma-separated or repeated.
    #[arg(long, default_value = "all", num_args = 1..)]
    tasks: Vec<String>,
    /// Output folder.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Re-evaluate tasks already finished for this model.
    #[arg(long)]
    force: bool,
    /// ARO VG-Attribution: smallest attribute-pair group in the macro accuracy (ARO uses 25).
    #[arg(long, default_value_t = hq_eval::metrics::ARO_ATTRIBUTE_MIN_COUNT)]
    aro_min_pair_count: u64,
}

#[derive(Args, Debug)]
struct BuiltinArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    pipeline: PipelineArgs,
    /// Corpus folder written by `hq-data synth` (or its eval/ folder).
    #[arg(long, value_name = "DIR")]
    corpus: PathBuf,
    /// Write the report as JSON here.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct AlignmentArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    pipeline: PipelineArgs,
    /// Text sources, LABEL=FIELD@SHARDS (FIELD: alt_text, long_positive, long_negative), e.g.
    /// `raw=alt_text@corpus/train/shard-00000.tar ours=long_positive@recaptioned/shard-00000.tar`.
    #[arg(long = "texts", required = true, num_args = 1..)]
    texts: Vec<String>,
    /// Samples per source at most (in shard order).
    #[arg(long, default_value_t = 1000)]
    max_samples: usize,
    /// Write the report as JSON here (and the Markdown table beside it, as .md).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct CompareArgs {
    /// results.json files (or folders holding one), the first is the baseline.
    #[arg(required = true, num_args = 2..)]
    results: Vec<PathBuf>,
    /// Write the Markdown table here (printed either way).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Write a PNG bar chart of the groups here.
    #[arg(long, value_name = "FILE")]
    png: Option<PathBuf>,
}

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hq-eval: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(a) => cmd_run(a),
        Command::Builtin(a) => cmd_builtin(a),
        Command::Compare(a) => cmd_compare(a),
        Command::Alignment(a) => cmd_alignment(a),
        Command::Tasks { data_root } => {
            for t in TASKS {
                let present = data_root
                    .as_deref()
                    .map(|root| match locate(root, t) {
                        Some(p) => format!("  [present: {}]", p.display()),
                        None => "  [missing]".into(),
                    })
                    .unwrap_or_default();
                println!(
                    "{:<48} {:<24} {:<16} {:<22} {}{}\n    get it: {}",
                    t.key,
                    t.name,
                    t.kind.label(),
                    t.main_metric,
                    t.dirs.join(" | "),
                    present,
                    t.source
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The loaded model with what the results record about it.
struct LoadedModel {
    encoder: Box<dyn Encoder>,
    info: ModelInfo,
}

fn fingerprint(path: &Path) -> String {
    let canonical = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let mut parts = vec![canonical.display().to_string()];
    let files: Vec<PathBuf> = if canonical.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&canonical)
            .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        v.sort();
        v
    } else {
        vec![canonical.clone()]
    };
    for f in files {
        if let Ok(m) = std::fs::metadata(&f) {
            let mtime = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            parts.push(format!(
                "{}:{}:{mtime}",
                f.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                m.len()
            ));
        }
    }
    parts.join(";")
}

fn label_of(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

fn load_model(a: &ModelArgs) -> Result<LoadedModel> {
    match a.backend {
        Backend::Tch => {
            let Some(path) = a.model.as_ref() else {
                bail!("--model CKPT is required with --backend tch");
            };
            let config = match a.config.as_deref() {
                None => None,
                Some(c) if Path::new(c).is_file() => Some(
                    hq_train::model::ClipConfig::from_json_file(c)
                        .with_context(|| format!("reading model config {c}"))?,
                ),
                Some(c) => Some(
                    hq_train::model::ClipConfig::preset(c)
                        .with_context(|| format!("{c} is neither a config file nor a preset"))?,
                ),
            };
            let device = a
                .device
                .parse::<hq_train::device::DeviceRequest>()?
                .resolve()?;
            let enc = hq_train::TchEncoder::from_checkpoint(path, config.as_ref(), device)
                .with_context(|| format!("loading {}", path.display()))?;
            let encoder: Box<dyn Encoder> = Box::new(enc);
            Ok(LoadedModel {
                info: ModelInfo {
                    label: a.name.clone().unwrap_or_else(|| label_of(path)),
                    encoder: encoder.describe(),
                    checkpoint: Some(path.display().to_string()),
                    fingerprint: fingerprint(path),
                },
                encoder,
            })
        }
        Backend::Onnx => {
            let Some(dir) = a.engine.as_ref() else {
                bail!("--engine DIR (the ONNX export folder) is required with --backend onnx");
            };
            let mut provider: hq_runtime::ExecutionProvider = a.ep.parse()?;
            if let Some(cache) = &a.trt_cache {
                provider = provider.with_cache_dir(cache.clone());
            }
            if a.trt_fp16 {
                provider = provider.with_fp16(true);
            }
            let enc = hq_runtime::OnnxClipEncoder::load(
                dir,
                &provider,
                &hq_runtime::OnnxEncoderOptions::default(),
            )
            .with_context(|| format!("loading the ONNX export {}", dir.display()))?;
            let encoder: Box<dyn Encoder> = Box::new(enc);
            Ok(LoadedModel {
                info: ModelInfo {
                    label: a.name.clone().unwrap_or_else(|| label_of(dir)),
                    encoder: encoder.describe(),
                    checkpoint: Some(dir.display().to_string()),
                    fingerprint: fingerprint(dir),
                },
                encoder,
            })
        }
    }
}

fn git_commit() -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn cmd_run(a: RunArgs) -> Result<ExitCode> {
    let tasks = select_tasks(&a.tasks).map_err(anyhow::Error::msg)?;
    if !a.data_root.is_dir() {
        bail!("--data-root {} is not a folder", a.data_root.display());
    }
    let mut model = load_model(&a.model)?;
    let mut options = a.pipeline.options();
    options.aro_attribute_min_count = a.aro_min_pair_count;
    let cfg = RunConfig {
        data_root: a.data_root.clone(),
        out_dir: a.out.clone(),
        tasks,
        options,
        model: model.info.clone(),
        code: CodeInfo::current(git_commit()),
        force: a.force,
    };
    eprintln!(
        "hq-eval: {} on {} task(s) from {} -> {}",
        model.info.encoder,
        cfg.tasks.len(),
        cfg.data_root.display(),
        cfg.out_dir.display()
    );
    let results = run_tasks(model.encoder.as_mut(), &cfg, &mut |line| {
        eprintln!("{line}")
    })?;
    print!("{}", terminal_table(&results));
    let md = a.out.join("results.md");
    hq_data::atomic::write_atomic(&md, markdown(&results).as_bytes())?;
    let png = a.out.join("groups.png");
    if let Err(e) = group_chart(std::slice::from_ref(&results), &png) {
        eprintln!("hq-eval: warning: no chart: {e}");
    }
    eprintln!(
        "hq-eval: wrote {}, {}, {}",
        a.out.join("results.json").display(),
        md.display(),
        png.display()
    );
    let failed = results
        .tasks
        .iter()
        .filter(|t| t.status == TaskStatus::Failed)
        .count();
    Ok(if failed > 0 {
        eprintln!("hq-eval: {failed} task(s) failed");
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

fn cmd_builtin(a: BuiltinArgs) -> Result<ExitCode> {
    let mut model = load_model(&a.model)?;
    let options = a.pipeline.options();
    let report = evaluate_builtin(model.encoder.as_mut(), &a.corpus, &options)?;
    print!("{}", report.to_text());
    if let Some(out) = &a.out {
        let text = serde_json::to_string_pretty(&report)?;
        hq_data::atomic::write_atomic(out, format!("{text}\n").as_bytes())?;
        eprintln!("hq-eval: wrote {}", out.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_alignment(a: AlignmentArgs) -> Result<ExitCode> {
    let sources = a
        .texts
        .iter()
        .map(|t| t.parse::<TextSource>())
        .collect::<Result<Vec<_>, _>>()?;
    let mut model = load_model(&a.model)?;
    let options = a.pipeline.options();
    let report = text_alignment(model.encoder.as_mut(), &sources, a.max_samples, &options)?;
    let md = report.markdown();
    print!("{md}");
    if let Some(out) = &a.out {
        let text = serde_json::to_string_pretty(&report)?;
        hq_data::atomic::write_atomic(out, format!("{text}\n").as_bytes())?;
        hq_data::atomic::write_atomic(out.with_extension("md"), md.as_bytes())?;
        eprintln!("hq-eval: wrote {}", out.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_compare(a: CompareArgs) -> Result<ExitCode> {
    let mut runs = Vec::new();
    for p in &a.results {
        let file = if p.is_dir() {
            p.join("results.json")
        } else {
            p.clone()
        };
        runs.push(RunResults::load(&file).with_context(|| format!("reading {}", file.display()))?);
    }
    let md = compare_markdown(&runs);
    print!("{md}");
    if let Some(out) = &a.out {
        hq_data::atomic::write_atomic(out, md.as_bytes())?;
        eprintln!("hq-eval: wrote {}", out.display());
    }
    if let Some(png) = &a.png {
        group_chart(&runs, png)?;
        eprintln!("hq-eval: wrote {}", png.display());
    }
    Ok(ExitCode::SUCCESS)
}
