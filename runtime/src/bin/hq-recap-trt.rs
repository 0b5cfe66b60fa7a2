//! `hq-recap-trt`: recaption image-text shards with a Qwen2-VL model on ONNX Runtime (HQ-CLIP
//! stage 1), and turn teacher answers into fine-tuning conversations.
//!
//! ```text
//! hq-recap-trt --engine MODEL_DIR --input 'shards/{00000..00099}.tar' --output OUT
//! hq-recap-trt build --model MODEL_DIR --provider tensorrt --out qwen2vl.plan
//! hq-recap-trt --engine qwen2vl.plan --input 'shards/{00000..00099}.tar' --output OUT
//! hq-recap-trt teacher --input teacher.jsonl --output sft.json --format llava
//! hq-recap-trt teacher --from-shards 'corpus/train/shard-0000{0..3}.tar' --limit 3000 \
//!     --prompt recaptioner/prompt_short.json --output teacher/conversations.json
//! ```

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use hq_runtime::qwen2vl::{EngineOptions, Qwen2Vl, Sampling, TrtProfile};
use hq_runtime::recaption::prompt::PromptTemplate;
use hq_runtime::recaption::teacher::{
    teacher_conversations, teacher_set_from_shards, ConversationFormat,
};
use hq_runtime::recaption::{
    run_job, split_from_env, ExemplarSet, JobOptions, OutputFormat, Qwen2VlGenerator,
};
use hq_runtime::{plan, ExecutionProvider, PROVIDER_CHOICES};

#[derive(Parser, Debug)]
#[command(
    name = "hq-recap-trt",
    version,
    about = "Recaption image-text data with Qwen2-VL on ONNX Runtime (CPU, CUDA, TensorRT): four texts per image \
             (long description, hard negative description, tags, negative tags).",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    recap: RecapArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Turn teacher answers (JSONL) into LLaVA / ShareGPT fine-tuning conversations, checking that
    /// the job's parser accepts every answer.
    Teacher(TeacherArgs),
    /// Pack a model folder into one deployable file (qwen2vl.plan): the model, for TensorRT the
    /// engines built here for the profile shapes, and a manifest of this machine (GPU
    /// architecture, ONNX Runtime and TensorRT versions) and of every member's SHA-256.
    /// `--engine PLAN` refuses a plan that does not fit its machine.
    Build(BuildArgs),
}

#[derive(Args, Debug)]
struct BuildArgs {
    /// Model directory from export/qwen2vl/export_qwen2vl.py.
    #[arg(long)]
    model: PathBuf,
    /// Provider the plan is for: `cpu`, `cuda[:N]`, `tensorrt[:N]`.
    #[arg(long, default_value = "cpu")]
    provider: String,
    /// The plan file to write.
    #[arg(long)]
    out: PathBuf,
    /// TensorRT profile: largest batch (and images per vision run).
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[command(flatten)]
    trt: TrtArgs,
    /// ONNX Runtime threads per operator (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
}

/// TensorRT's precision and profile shapes (the recaption job's and `build`'s).
#[derive(Args, Debug, Clone)]
struct TrtArgs {
    /// Let TensorRT use fp16 kernels.
    #[arg(long)]
    fp16: bool,
    /// TensorRT profile: largest prompt (tokens, image tokens included).
    #[arg(long, default_value_t = 2048)]
    trt_max_prompt: usize,
    /// TensorRT profile: largest prompt + answer.
    #[arg(long, default_value_t = 2560)]
    trt_max_total: usize,
    /// TensorRT profile: most vision patches per batch.
    #[arg(long, default_value_t = 8192)]
    trt_max_patches: usize,
}

impl TrtArgs {
    /// The profile for batches of `batch_size` samples (one image each).
    fn profile(&self, batch_size: usize) -> TrtProfile {
        TrtProfile {
            max_batch: batch_size.max(1),
            max_prompt_tokens: self.trt_max_prompt,
            max_total_tokens: self.trt_max_total.max(self.trt_max_prompt + 1),
            max_patches: self.trt_max_patches,
            max_images: batch_size.max(1),
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum FormatArg {
    /// The input shards with the texts added to each sample's JSON under `hq_clip`.
    Tar,
    /// A JSONL side-car per input, keyed by sample id.
    Sidecar,
}

#[derive(Args, Debug)]
struct RecapArgs {
    /// Model directory from export/qwen2vl/export_qwen2vl.py (three ONNX files, tokenizer, configs),
    /// or a plan file from `hq-recap-trt build` (its provider, profile and engines are used; it is
    /// refused on a machine it was not built for). A TensorRT cache folder inside a model directory
    /// (`MODEL_DIR/trt_cache`) is also accepted: the model is then its parent folder, the provider
    /// TensorRT, and the cache that folder.
    #[arg(long, required = true)]
    engine: Option<PathBuf>,
    /// Inputs: webdataset .tar shards (paths, globs, brace ranges `shard-{00000..00099}.tar`,
    /// `@list` files, folders of .tar files) or .jsonl / .csv lists of image paths with texts.
    #[arg(long, required = true, num_args = 1..)]
    input: Vec<String>,
    /// Output folder.
    #[arg(long, required = true)]
    output: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value = "tar")]
    format: FormatArg,
    /// Execution provider: `cpu`, `cuda[:N]`, `tensorrt[:N]` (never a silent fallback).
    #[arg(long, default_value = "cpu", help = format!("Execution provider: {PROVIDER_CHOICES}"))]
    provider: String,
    /// TensorRT engine and timing cache folder (default MODEL_DIR/trt_cache).
    #[arg(long)]
    trt_cache: Option<PathBuf>,
    #[command(flatten)]
    trt: TrtArgs,
    /// ONNX Runtime threads per operator (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// This worker's index (default: from SLURM_ARRAY_TASK_ID or JOB_COMPLETION_INDEX, else 0).
    #[arg(long)]
    shard_index: Option<usize>,
    /// Number of workers splitting the inputs (default: SLURM_ARRAY_TASK_COUNT, else 1).
    #[arg(long)]
    num_shards: Option<usize>,
    /// Samples per generation batch.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 512)]
    max_new_tokens: usize,
    /// Generation attempts per sample before an error record (retries use a new seed and exemplar).
    #[arg(long, default_value_t = 3)]
    attempts: u32,
    /// Job seed (exemplar choice and sampling).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Sampling temperature of retries (and of first attempts with --sample).
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    /// Nucleus mass of retries (and of first attempts with --sample).
    #[arg(long, default_value_t = 0.9)]
    top_p: f32,
    /// Sample first attempts too (default: greedy).
    #[arg(long)]
    sample: bool,
    /// Exemplar JSONL (alt_text + the four texts or an answer per line); default: built-in set.
    #[arg(long)]
    exemplars: Option<PathBuf>,
    /// Prompt template (`hq_prompt.json` schema); default: the model directory's `hq_prompt.json`
    /// when it has one (a fine-tuned model's own prompt), else the paper's prompt.
    #[arg(long)]
    prompt: Option<PathBuf>,
    /// Tar output: drop the input's own `hq_clip` from samples the model failed on, so that the
    /// output holds only this model's texts (failed samples train on their alt-text).
    #[arg(long)]
    drop_input_texts: bool,
    /// Vision pixel budget: images are resized to at most this many pixels (default: the model's
    /// preprocessor_config.json). Vision tokens dominate the cost.
    #[arg(long)]
    max_pixels: Option<u64>,
    /// Host memory (MiB) for reusing the key/value cache of prompt prefixes shared across
    /// samples (the instruction and exemplar); 0 turns reuse off. Outputs are the same either way.
    #[arg(long, default_value_t = hq_runtime::qwen2vl::engine::DEFAULT_PREFIX_CACHE_MIB)]
    prefix_cache_mib: usize,
    /// Decompression-bomb limit: images with more pixels are refused before decoding.
    #[arg(long, default_value_t = hq_data::shards::DEFAULT_MAX_PIXELS)]
    max_image_pixels: u64,
    /// Image decoding threads (default: one per core).
    #[arg(long, default_value_t = 0)]
    decode_threads: usize,
    /// JSON field the side-car output is keyed by.
    #[arg(long, default_value = "uid")]
    id_field: String,
    /// Name recorded as the texts' source (`model:<name>`; default: the model folder's name).
    #[arg(long)]
    model_name: Option<String>,
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ConvFormatArg {
    Llava,
    Sharegpt,
}

#[derive(Args, Debug)]
struct TeacherArgs {
    /// Teacher JSONL: image, alt_text and answer (or the four texts) per line.
    #[arg(
        long,
        required_unless_present = "from_shards",
        conflicts_with = "from_shards"
    )]
    input: Option<PathBuf>,
    /// Make the teacher set from shards whose samples carry the four texts (`hq_clip`, e.g. the
    /// built-in corpus's oracle): writes OUTPUT's folder/teacher.jsonl and images/ beside the
    /// conversations, image paths relative to that folder.
    #[arg(long, num_args = 1..)]
    from_shards: Vec<String>,
    /// With --from-shards: at most this many samples, in input order.
    #[arg(long, default_value_t = usize::MAX)]
    limit: usize,
    /// Prompt template (`hq_prompt.json` schema); default: the paper's prompt. The fine-tuned model
    /// must ship the same file (the fine-tuning script copies it into the checkpoint).
    #[arg(long)]
    prompt: Option<PathBuf>,
    /// Output JSON file (an array of conversations).
    #[arg(long)]
    output: PathBuf,
    /// Conversation format.
    #[arg(long, value_enum, default_value = "llava")]
    format: ConvFormatArg,
    /// Exemplar JSONL (default: built-in set); use the one the job will use.
    #[arg(long)]
    exemplars: Option<PathBuf>,
    /// Seed of the exemplar choice (use the job's).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write the accepted conversations even when some answers are rejected (exit 0).
    #[arg(long)]
    allow_rejects: bool,
}

fn expand_inputs(specs: &[String]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for spec in specs {
        let p = Path::new(spec);
        if p.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("listing {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().and_then(|x| x.to_str()) == Some("tar"))
                .collect();
            found.sort();
            if found.is_empty() {
                bail!("{} holds no .tar shards", p.display());
            }
            out.extend(found);
        } else if p.is_file()
            && matches!(
                p.extension().and_then(|x| x.to_str()),
                Some("jsonl" | "csv")
            )
        {
            out.push(p.to_path_buf());
        } else {
            out.extend(hq_data::shards::expand_shards(&[spec.as_str()])?);
        }
    }
    Ok(out)
}

fn load_exemplars(path: &Option<PathBuf>) -> Result<ExemplarSet> {
    Ok(match path {
        Some(p) => ExemplarSet::load(p)?,
        None => ExemplarSet::builtin(),
    })
}

fn recaption(args: RecapArgs) -> Result<ExitCode> {
    let (Some(engine_arg), Some(output)) = (args.engine.clone(), args.output.clone()) else {
        bail!("--engine and --output are required");
    };
    let mut provider: ExecutionProvider = args.provider.parse()?;
    let mut trt_cache = args.trt_cache.clone();
    let mut trt_profile = args.trt.profile(args.batch_size);
    let mut fp16 = args.trt.fp16;
    // `--engine qwen2vl.plan`: the plan's provider, profile and engines, if it fits this machine.
    let engine_arg = if engine_arg.is_file() {
        let manifest = plan::read_manifest(&engine_arg)?;
        let planned: ExecutionProvider = manifest.provider.parse()?;
        if args.provider != "cpu" && planned != provider {
            bail!(
                "{} was built for {}; run it with that provider (or leave --provider out)",
                engine_arg.display(),
                manifest.provider
            );
        }
        let gpu = match &planned {
            ExecutionProvider::Cuda { device_id }
            | ExecutionProvider::TensorRt { device_id, .. } => Some(*device_id as usize),
            _ => None,
        };
        let opened = plan::open_plan(
            &engine_arg,
            &plan::default_cache_root(&engine_arg),
            &plan::machine_facts(gpu),
        )?;
        provider = planned;
        if let Some(p) = &opened.manifest.trt_profile {
            trt_profile = p.clone();
            fp16 = opened.manifest.fp16;
            trt_cache = Some(opened.model_dir.join("trt_cache"));
        }
        opened.model_dir
    } else {
        engine_arg
    };
    // `--engine MODEL_DIR/trt_cache`: the TensorRT cache artefact of a model directory.
    let model_dir = if engine_arg.is_dir()
        && !engine_arg.join("config.json").is_file()
        && engine_arg
            .parent()
            .is_some_and(|p| p.join("config.json").is_file())
    {
        if !provider.is_gpu() {
            provider = ExecutionProvider::tensorrt(0);
        }
        trt_cache.get_or_insert(engine_arg.clone());
        engine_arg
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default()
    } else {
        engine_arg
    };
    if let Some(dir) = trt_cache {
        provider = provider.with_cache_dir(dir);
    }
    provider = provider.with_fp16(fp16);

    let env_split = split_from_env(|k| std::env::var(k).ok(), args.num_shards)?;
    let (shard_index, num_shards) = match (args.shard_index, args.num_shards, env_split) {
        (Some(i), Some(n), _) => (i, n),
        (Some(i), None, _) => (i, 1),
        (None, _, Some(split)) => split,
        (None, n, None) => (0, n.unwrap_or(1)),
    };
    let inputs = expand_inputs(&args.input)?;
    let exemplars = load_exemplars(&args.exemplars)?;
    let prompt = match &args.prompt {
        Some(p) => PromptTemplate::load(p)?,
        None => PromptTemplate::for_model_dir(&model_dir)?,
    };
    let retry = Sampling::TopP {
        temperature: args.temperature,
        top_p: args.top_p,
    };
    let opts = EngineOptions {
        provider,
        intra_threads: args.threads,
        trt_profile,
        max_pixels: args.max_pixels,
        min_pixels: None,
        device_cache: None,
        prefix_cache_mib: Some(args.prefix_cache_mib),
    };
    eprintln!(
        "hq-recap-trt: model {} on {}, prompt {}, worker {shard_index}/{num_shards}, {} inputs in total",
        model_dir.display(),
        opts.provider,
        prompt.name,
        inputs.len()
    );
    let engine = Qwen2Vl::load(&model_dir, &opts)
        .with_context(|| format!("loading the model from {}", model_dir.display()))?;
    let mut generator = Qwen2VlGenerator::new(engine, args.max_new_tokens, args.model_name.clone());
    let job = JobOptions {
        inputs,
        output_dir: output,
        format: match args.format {
            FormatArg::Tar => OutputFormat::Tar,
            FormatArg::Sidecar => OutputFormat::Sidecar,
        },
        shard_index,
        num_shards,
        batch_size: args.batch_size,
        max_attempts: args.attempts,
        seed: args.seed,
        prompt: prompt.clone(),
        drop_input_texts: args.drop_input_texts,
        sampling: if args.sample { retry } else { Sampling::Greedy },
        retry_sampling: retry,
        max_image_pixels: args.max_image_pixels,
        decode_threads: args.decode_threads,
        id_field: args.id_field.clone(),
        progress: !args.no_progress,
        ..JobOptions::default()
    };
    let summary = run_job(&mut generator, &exemplars, &job)?;
    eprintln!("{summary}");
    // This run's figures, machine-readable, one file per worker (a resumed run counts only what it
    // did itself; `samples_resumed` says how much an earlier run had done). A run that found
    // everything done leaves the file of the run that did the work.
    if summary.samples == 0 && summary.samples_resumed == 0 {
        return Ok(ExitCode::SUCCESS);
    }
    let name = if num_shards == 1 {
        "recap_summary.json".to_string()
    } else {
        format!("recap_summary.{shard_index}-of-{num_shards}.json")
    };
    let mut record = serde_json::to_value(&summary)?;
    if let Some(obj) = record.as_object_mut() {
        obj.insert("prompt".into(), prompt.name.clone().into());
        obj.insert("model".into(), model_dir.display().to_string().into());
        obj.insert("provider".into(), opts.provider.to_string().into());
    }
    hq_data::atomic::write_atomic(
        job.output_dir.join(name),
        &serde_json::to_vec_pretty(&record)?,
    )?;
    Ok(ExitCode::SUCCESS)
}

fn teacher(args: TeacherArgs) -> Result<ExitCode> {
    let exemplars = load_exemplars(&args.exemplars)?;
    let template = match &args.prompt {
        Some(p) => PromptTemplate::load(p)?,
        None => PromptTemplate::paper(),
    };
    let format = match args.format {
        ConvFormatArg::Llava => ConversationFormat::Llava,
        ConvFormatArg::Sharegpt => ConversationFormat::ShareGpt,
    };
    let input = match &args.input {
        Some(input) => input.clone(),
        None => {
            let dir = args
                .output
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            let jsonl = dir.join("teacher.jsonl");
            let shards = expand_inputs(&args.from_shards)?;
            let set = teacher_set_from_shards(&shards, &jsonl, &dir.join("images"), args.limit)?;
            for s in &set.skipped {
                eprintln!("skipped {}: {}", s.id, s.reason);
            }
            eprintln!(
                "teacher set: {} samples read, {} written to {} ({} skipped)",
                set.samples,
                set.written,
                jsonl.display(),
                set.skipped.len()
            );
            if set.written == 0 {
                bail!("no sample of the shards carries the four texts (`hq_clip`)");
            }
            jsonl
        }
    };
    let (conversations, report) =
        teacher_conversations(&input, &exemplars, &template, args.seed, format, 1000)?;
    for r in &report.rejected {
        eprintln!("rejected line {} ({}): {}", r.line, r.id, r.reason);
    }
    eprintln!(
        "teacher: {} records, {} conversations, {} rejected",
        report.records,
        report.accepted,
        report.rejected.len()
    );
    if !report.rejected.is_empty() && !args.allow_rejects {
        eprintln!("nothing written: fix the rejected answers or pass --allow-rejects");
        return Ok(ExitCode::FAILURE);
    }
    let bytes = serde_json::to_vec_pretty(&conversations)?;
    hq_data::atomic::write_atomic(&args.output, &bytes)?;
    Ok(ExitCode::SUCCESS)
}

fn build(args: BuildArgs) -> Result<ExitCode> {
    let provider: ExecutionProvider = args.provider.parse()?;
    let opts = EngineOptions {
        provider: provider.with_fp16(args.trt.fp16),
        intra_threads: args.threads,
        trt_profile: args.trt.profile(args.batch_size),
        ..EngineOptions::default()
    };
    let manifest = plan::build_plan(&args.model, &opts, &args.out)
        .with_context(|| format!("building a plan of {}", args.model.display()))?;
    let bytes: u64 = manifest.members.values().map(|m| m.bytes).sum();
    eprintln!(
        "hq-recap-trt: wrote {} ({} members, {:.1} MiB) for {}{}",
        args.out.display(),
        manifest.members.len(),
        bytes as f64 / 1048576.0,
        manifest.provider,
        manifest
            .built_on
            .gpu
            .as_ref()
            .map(|g| format!(
                " on {} (compute capability {})",
                g.name, g.compute_capability
            ))
            .unwrap_or_default()
    );
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Teacher(t)) => teacher(t),
        Some(Command::Build(b)) => build(b),
        None => recaption(cli.recap),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hq-recap-trt: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
