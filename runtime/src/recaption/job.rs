//! The recaption job: inputs split across workers, images decoded in parallel, batched generation,
//! parse / retry / error record, crash-safe per-shard output, progress and a summary.
//!
//! Threads: one reader thread walks this worker's inputs in order and hands chunks of samples to a
//! rayon pool that decodes and preprocesses the images (decompression bombs are refused by the
//! pixel limit before decoding); prepared samples flow through a bounded crossbeam channel to the
//! generating thread, so decoding runs ahead of the model by at most the channel's depth and the
//! model does not wait for images. The generating thread batches samples (across shard boundaries),
//! generates, parses each answer with `hq_data::recaption_format::parse`, re-queues rejected ones
//! with a new seed and exemplar (sampled decoding) until `max_attempts`, then writes an error
//! record with the last raw answer. Records are appended to the shard's log after every batch;
//! a shard whose samples all have records is written out atomically.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::time::Instant;

use crossbeam_channel::{bounded, Receiver, Sender};
use rayon::prelude::*;
use serde::Serialize;

use crate::error::{Result, RuntimeError};
use crate::qwen2vl::{ImageProcessor, PreparedImage, Sampling};
use crate::recaption::generator::{GenInput, Generator};
use crate::recaption::input::{read_input, InputKind, RawItem, RawSample};
use crate::recaption::output::{finalize, OutputFormat, PartialLog, RecapRecord, ShardPaths};
use crate::recaption::prompt::{clean_alt_text, sample_seed, ExemplarSet, PromptTemplate};

/// Settings of one worker of the job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobOptions {
    /// Every input of the whole job (the same list on every worker).
    pub inputs: Vec<PathBuf>,
    /// Output folder.
    pub output_dir: PathBuf,
    /// Output format.
    pub format: OutputFormat,
    /// This worker's index in `0..num_shards`.
    pub shard_index: usize,
    /// Number of workers; worker `i` takes inputs `i, i + n, i + 2n, ...`.
    pub num_shards: usize,
    /// Samples per generation batch.
    pub batch_size: usize,
    /// Generation attempts per sample (1 = no retry).
    pub max_attempts: u32,
    /// Job seed: exemplar choice and sampling seeds derive from it and the sample key.
    pub seed: u64,
    /// The prompt's user turn (the model directory's `hq_prompt.json`, else the paper's).
    pub prompt: PromptTemplate,
    /// Decoding of the first attempt.
    pub sampling: Sampling,
    /// Decoding of retries (a greedy retry would repeat the same answer).
    pub retry_sampling: Sampling,
    /// Decompression-bomb limit: images with more pixels are refused before decoding.
    pub max_image_pixels: u64,
    /// Tar members larger than this make their sample an error (streamed past, never held).
    pub max_member_bytes: u64,
    /// Alt-texts are cut to this many characters in the prompt.
    pub max_alt_text_chars: usize,
    /// Tar output: remove the input's own `hq_clip` from samples the model failed on (else it stays).
    pub drop_input_texts: bool,
    /// JSON field the side-car output is keyed by.
    pub id_field: String,
    /// Image decoding threads (rayon pool); 0 = one per core.
    pub decode_threads: usize,
    /// Prepared samples buffered between decoding and generation.
    pub queue_depth: usize,
    /// Show a progress bar (hidden anyway when stderr is not a terminal).
    pub progress: bool,
}

impl Default for JobOptions {
    fn default() -> Self {
        Self {
            inputs: Vec::new(),
            output_dir: PathBuf::from("recaptioned"),
            format: OutputFormat::Tar,
            shard_index: 0,
            num_shards: 1,
            batch_size: 8,
            max_attempts: 3,
            seed: 0,
            prompt: PromptTemplate::paper(),
            drop_input_texts: false,
            sampling: Sampling::Greedy,
            retry_sampling: Sampling::TopP {
                temperature: 0.7,
                top_p: 0.9,
            },
            max_image_pixels: hq_data::shards::DEFAULT_MAX_PIXELS,
            max_member_bytes: 256 << 20,
            max_alt_text_chars: 1000,
            id_field: "uid".to_string(),
            decode_threads: 0,
            queue_depth: 64,
            progress: true,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct JobSummary {
    /// Inputs assigned to this worker.
    pub inputs_assigned: usize,
    /// Of those, already finished before this run (skipped).
    pub inputs_skipped: usize,
    /// Finished by this run.
    pub inputs_finished: usize,
    /// Samples already recorded by an interrupted earlier run (resumed, not redone).
    pub samples_resumed: u64,
    /// Samples recorded by this run.
    pub samples: u64,
    /// Of those, with the four texts.
    pub ok: u64,
    /// Error records by category (`image`, `format`, `input`, `generation`).
    pub errors: BTreeMap<String, u64>,
    /// Samples that needed more than one attempt.
    pub retried: u64,
    /// Tokens generated (all attempts).
    pub generated_tokens: u64,
    /// Mean tokens generated per sample.
    pub mean_tokens_per_sample: f64,
    /// Mean words of the long positive description, over ok samples.
    pub mean_long_description_words: f64,
    /// Seconds.
    pub elapsed_s: f64,
    /// Samples per second.
    pub images_per_s: f64,
    /// Generated tokens per second.
    pub tokens_per_s: f64,
}

impl std::fmt::Display for JobSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "inputs: {} assigned, {} already done, {} finished now",
            self.inputs_assigned, self.inputs_skipped, self.inputs_finished
        )?;
        writeln!(
            f,
            "samples: {} recorded ({} ok, {} errors, {} retried), {} resumed from an earlier run",
            self.samples,
            self.ok,
            self.errors.values().sum::<u64>(),
            self.retried,
            self.samples_resumed
        )?;
        if !self.errors.is_empty() {
            let parts: Vec<String> = self
                .errors
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect();
            writeln!(f, "errors by reason: {}", parts.join(", "))?;
        }
        write!(
            f,
            "output: {:.1} tokens per sample, {:.1} words per long description; {:.1} s, {:.2} images/s, {:.1} tokens/s",
            self.mean_tokens_per_sample,
            self.mean_long_description_words,
            self.elapsed_s,
            self.images_per_s,
            self.tokens_per_s
        )
    }
}

/// The inputs worker `index` of `num` takes (round robin over the sorted-as-given list).
pub fn select_inputs(inputs: &[PathBuf], index: usize, num: usize) -> Result<Vec<PathBuf>> {
    if num == 0 || index >= num {
        return Err(RuntimeError::Recaption(format!(
            "shard index {index} is not below the number of shards {num}"
        )));
    }
    Ok(inputs.iter().skip(index).step_by(num).cloned().collect())
}

/// (index, count) from the scheduler's environment: Slurm job arrays (`SLURM_ARRAY_TASK_ID`,
/// `SLURM_ARRAY_TASK_COUNT`, `SLURM_ARRAY_TASK_MIN`) or Kubernetes indexed Jobs
/// (`JOB_COMPLETION_INDEX`, with the count given by the caller). `None` when neither is set.
pub fn split_from_env(
    get: impl Fn(&str) -> Option<String>,
    num_shards: Option<usize>,
) -> Result<Option<(usize, usize)>> {
    let parse = |name: &str| -> Result<Option<usize>> {
        match get(name) {
            None => Ok(None),
            Some(v) if v.trim().is_empty() => Ok(None),
            Some(v) => v.trim().parse::<usize>().map(Some).map_err(|_| {
                RuntimeError::Recaption(format!("{name}={v:?} is not a non-negative integer"))
            }),
        }
    };
    if let Some(id) = parse("SLURM_ARRAY_TASK_ID")? {
        let min = parse("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
        let count = match num_shards {
            Some(n) => n,
            None => parse("SLURM_ARRAY_TASK_COUNT")?.ok_or_else(|| {
                RuntimeError::Recaption("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not; pass --num-shards".into())
            })?,
        };
        let index = id.checked_sub(min).ok_or_else(|| {
            RuntimeError::Recaption(format!(
                "SLURM_ARRAY_TASK_ID {id} is below SLURM_ARRAY_TASK_MIN {min}"
            ))
        })?;
        return Ok(Some((index, count)));
    }
    if let Some(index) = parse("JOB_COMPLETION_INDEX")? {
        let count = num_shards.ok_or_else(|| {
            RuntimeError::Recaption(
                "JOB_COMPLETION_INDEX is set; pass --num-shards (the Job's completions)".into(),
            )
        })?;
        return Ok(Some((index, count)));
    }
    Ok(None)
}

/// Samples in an input, counted cheaply (tar headers only) for the progress bar's total.
fn count_samples(path: &Path) -> u64 {
    match InputKind::of(path) {
        Ok(InputKind::Tar) => {
            let Ok(file) = std::fs::File::open(path) else {
                return 0;
            };
            let mut archive = tar::Archive::new(file);
            let Ok(entries) = archive.entries_with_seek() else {
                return 0;
            };
            let mut n = 0;
            let mut last: Option<String> = None;
            for e in entries {
                let Ok(e) = e else { break };
                let Ok(p) = e.path() else { continue };
                let name = p.to_string_lossy().into_owned();
                if let Some((key, _)) = hq_data::shards::reader::split_key(&name) {
                    if last.as_deref() != Some(key) {
                        n += 1;
                        last = Some(key.to_string());
                    }
                }
            }
            n
        }
        Ok(InputKind::Jsonl) => std::fs::read(path)
            .map(|b| {
                b.split(|&c| c == b'\n')
                    .filter(|l| l.iter().any(|c| !c.is_ascii_whitespace()))
                    .count() as u64
            })
            .unwrap_or(0),
        Ok(InputKind::Csv) => std::fs::read(path)
            .map(|b| {
                (b.split(|&c| c == b'\n')
                    .filter(|l| l.iter().any(|c| !c.is_ascii_whitespace()))
                    .count() as u64)
                    .saturating_sub(1)
            })
            .unwrap_or(0),
        Err(_) => 0,
    }
}

/// A sample ready for the model, or already finished (failed before generation).
enum Work {
    Ready(Box<Pending>),
    Failed { shard: usize, record: RecapRecord },
    ShardEnd { shard: usize, sent: u64 },
    Fatal(RuntimeError),
}

struct Pending {
    shard: usize,
    key: String,
    id: String,
    alt_text: String,
    alt_text_lossy: bool,
    image: PreparedImage,
    attempt: u32,
    tokens: u64,
    last_answer: Option<String>,
    last_error: Option<String>,
}

fn error_record(sample: &RawSample, id_field: &str, error: String) -> RecapRecord {
    RecapRecord {
        key: sample.key.clone(),
        id: sample.sample_id(id_field),
        hq_clip: None,
        error: Some(error),
        raw_answer: None,
        attempts: 0,
        generated_tokens: 0,
        alt_text_lossy: sample.alt_text_lossy,
    }
}

fn prepare(sample: RawSample, shard: usize, processor: &ImageProcessor, opts: &JobOptions) -> Work {
    let bytes = match &sample.image {
        Ok(b) => b,
        Err(why) => {
            let record = error_record(&sample, &opts.id_field, format!("input: {why}"));
            return Work::Failed { shard, record };
        }
    };
    let prepared = hq_data::shards::decode_image(bytes, opts.max_image_pixels)
        .map_err(|e| format!("image: {e}"))
        .and_then(|img| processor.process(&img).map_err(|e| e.to_string()));
    match prepared {
        Ok(image) => Work::Ready(Box::new(Pending {
            shard,
            id: sample.sample_id(&opts.id_field),
            alt_text: clean_alt_text(&sample.alt_text, opts.max_alt_text_chars),
            alt_text_lossy: sample.alt_text_lossy,
            key: sample.key,
            image,
            attempt: 0,
            tokens: 0,
            last_answer: None,
            last_error: None,
        })),
        Err(e) => {
            let record = error_record(&sample, &opts.id_field, e);
            Work::Failed { shard, record }
        }
    }
}

/// The reader thread: reads each input, skips recorded samples, decodes chunks on the pool.
fn reader_thread(
    shards: Vec<(usize, PathBuf, HashSet<String>)>,
    processor: ImageProcessor,
    opts: JobOptions,
    pool: rayon::ThreadPool,
    tx: Sender<Work>,
) {
    const CHUNK: usize = 32;
    for (shard, path, done) in shards {
        let mut sent = 0u64;
        let mut chunk: Vec<RawSample> = Vec::with_capacity(CHUNK);
        let mut stop = false;
        let flush = |chunk: &mut Vec<RawSample>, sent: &mut u64| -> bool {
            let items: Vec<RawSample> = std::mem::take(chunk);
            let prepared: Vec<Work> = pool.install(|| {
                items
                    .into_par_iter()
                    .map(|s| prepare(s, shard, &processor, &opts))
                    .collect()
            });
            for w in prepared {
                *sent += 1;
                if tx.send(w).is_err() {
                    return false;
                }
            }
            true
        };
        let result = read_input(&path, opts.max_member_bytes, |item| {
            match item {
                RawItem::Sample(s) => {
                    if done.contains(&s.key) {
                        return true;
                    }
                    chunk.push(s);
                    if chunk.len() >= CHUNK && !flush(&mut chunk, &mut sent) {
                        stop = true;
                        return false;
                    }
                }
                RawItem::Broken(why) => {
                    // A damaged stream: one record for the rest of the input (recorded once).
                    if !done.contains("") {
                        let record = RecapRecord {
                            key: String::new(),
                            id: String::new(),
                            hq_clip: None,
                            error: Some(format!("input: {why}")),
                            raw_answer: None,
                            attempts: 0,
                            generated_tokens: 0,
                            alt_text_lossy: false,
                        };
                        if !flush(&mut chunk, &mut sent) {
                            stop = true;
                            return false;
                        }
                        sent += 1;
                        if tx.send(Work::Failed { shard, record }).is_err() {
                            stop = true;
                            return false;
                        }
                    }
                }
            }
            true
        });
        if let Err(e) = result {
            let _ = tx.send(Work::Fatal(e));
            return;
        }
        if stop || !flush(&mut chunk, &mut sent) {
            return;
        }
        if tx.send(Work::ShardEnd { shard, sent }).is_err() {
            return;
        }
    }
}

struct ShardState {
    paths: ShardPaths,
    log: PartialLog,
    records: Vec<RecapRecord>,
    /// Records found in the log at start (an interrupted earlier run).
    resumed: u64,
    /// Items the reader sent for this shard in this run (known once it has read all of it).
    expected: Option<u64>,
    /// Items received from the reader so far.
    received: u64,
}

/// Runs this worker's part of the job.
pub fn run_job(
    generator: &mut dyn Generator,
    exemplars: &ExemplarSet,
    opts: &JobOptions,
) -> Result<JobSummary> {
    if opts.batch_size == 0 || opts.max_attempts == 0 || opts.queue_depth == 0 {
        return Err(RuntimeError::Recaption(
            "batch size, attempts and queue depth must be at least 1".into(),
        ));
    }
    opts.sampling.validate()?;
    opts.retry_sampling.validate()?;
    if exemplars.is_empty() {
        return Err(RuntimeError::Recaption("the exemplar set is empty".into()));
    }
    let started = Instant::now();
    std::fs::create_dir_all(&opts.output_dir).map_err(|source| RuntimeError::Io {
        action: "creating the output folder",
        path: opts.output_dir.clone(),
        source,
    })?;
    // Output names come from input file names: refuse collisions up front.
    let mut seen = HashSet::new();
    for p in &opts.inputs {
        let stem = p
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !seen.insert(stem.clone()) {
            return Err(RuntimeError::Recaption(format!(
                "two inputs are named {stem}: their outputs would collide in {}",
                opts.output_dir.display()
            )));
        }
    }
    let mine = select_inputs(&opts.inputs, opts.shard_index, opts.num_shards)?;
    let mut summary = JobSummary {
        inputs_assigned: mine.len(),
        ..JobSummary::default()
    };

    let mut states: Vec<ShardState> = Vec::new();
    let mut reader_plan = Vec::new();
    let mut total = 0u64;
    for input in &mine {
        let paths = ShardPaths::new(input, &opts.output_dir, opts.format)?;
        if paths.output.is_file() {
            summary.inputs_skipped += 1;
            if paths.partial.exists() {
                // Killed between the atomic rename and the log's removal.
                let _ = std::fs::remove_file(&paths.partial);
            }
            continue;
        }
        if !input.is_file() {
            return Err(RuntimeError::Recaption(format!(
                "input {} does not exist",
                input.display()
            )));
        }
        let (log, records) = PartialLog::open(&paths.partial)?;
        let done: HashSet<String> = records.iter().map(|r| r.key.clone()).collect();
        summary.samples_resumed += records.len() as u64;
        total += count_samples(input).saturating_sub(records.len() as u64);
        reader_plan.push((states.len(), input.clone(), done));
        states.push(ShardState {
            paths,
            log,
            resumed: records.len() as u64,
            records,
            expected: None,
            received: 0,
        });
    }

    let bar = if opts.progress {
        hq_data::progress::bar(Some(total), "images")
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_message("recaptioning");
    let model_name = generator.name();
    let processor = generator.processor();
    let threads = if opts.decode_threads == 0 {
        std::thread::available_parallelism().map_or(2, usize::from)
    } else {
        opts.decode_threads
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("recap-decode-{i}"))
        .build()
        .map_err(|e| RuntimeError::Recaption(format!("creating the decoding pool: {e}")))?;
    let (tx, rx): (Sender<Work>, Receiver<Work>) = bounded(opts.queue_depth);
    let reader_opts = opts.clone();
    let reader = std::thread::Builder::new()
        .name("recap-reader".into())
        .spawn(move || reader_thread(reader_plan, processor, reader_opts, pool, tx))
        .map_err(|e| RuntimeError::Recaption(format!("starting the reader thread: {e}")))?;

    let mut queue: VecDeque<Box<Pending>> = VecDeque::new();
    let mut long_words = 0u64;
    let mut reader_done = false;
    let mut result: Result<()> = Ok(());
    'main: loop {
        // Fill the queue: block only when there is nothing to do.
        while queue.len() < opts.batch_size && !reader_done {
            let work = if queue.is_empty() {
                match rx.recv() {
                    Ok(w) => w,
                    Err(_) => {
                        reader_done = true;
                        break;
                    }
                }
            } else {
                match rx.try_recv() {
                    Ok(w) => w,
                    Err(crossbeam_channel::TryRecvError::Empty) => break,
                    Err(crossbeam_channel::TryRecvError::Disconnected) => {
                        reader_done = true;
                        break;
                    }
                }
            };
            match work {
                Work::Ready(p) => {
                    states[p.shard].received += 1;
                    queue.push_back(p);
                }
                Work::Failed { shard, record } => {
                    states[shard].received += 1;
                    if let Err(e) = record_done(
                        &mut states,
                        shard,
                        record,
                        &mut summary,
                        &mut long_words,
                        &bar,
                        opts,
                        &model_name,
                    ) {
                        result = Err(e);
                        break 'main;
                    }
                }
                Work::ShardEnd { shard, sent } => {
                    states[shard].expected = Some(sent);
                    if let Err(e) =
                        maybe_finalize(&mut states, shard, &mut summary, opts, &model_name)
                    {
                        result = Err(e);
                        break 'main;
                    }
                }
                Work::Fatal(e) => {
                    result = Err(e);
                    break 'main;
                }
            }
        }
        if queue.is_empty() {
            if reader_done {
                break;
            }
            continue;
        }
        let n = queue.len().min(opts.batch_size);
        let mut batch: Vec<Box<Pending>> = queue.drain(..n).collect();
        let answers = run_batch(generator, exemplars, opts, &batch);
        let mut finished: Vec<(usize, RecapRecord)> = Vec::new();
        for (p, answer) in batch.iter_mut().zip(answers) {
            p.attempt += 1;
            match answer {
                Ok(out) => {
                    p.tokens += out.tokens as u64;
                    summary.generated_tokens += out.tokens as u64;
                    match hq_data::recaption_format::parse(
                        &out.text,
                        Some(&format!("model:{model_name}")),
                    ) {
                        Ok(texts) => {
                            finished.push((p.shard, record_of(p, Some(texts), None, None)));
                            continue;
                        }
                        Err(e) => {
                            let cut = if out.truncated {
                                " (answer cut at the token limit)"
                            } else {
                                ""
                            };
                            p.last_error = Some(format!("format: {e}{cut}"));
                            p.last_answer = Some(out.text);
                        }
                    }
                }
                Err(e) => {
                    p.last_error = Some(format!("generation: {e}"));
                }
            }
            if p.attempt >= opts.max_attempts {
                let error = p.last_error.clone();
                let raw = p.last_answer.clone();
                finished.push((p.shard, record_of(p, None, error, raw)));
            }
        }
        // Retries go first so a sample's attempts stay close together.
        for p in batch.into_iter().rev() {
            let done = finished
                .iter()
                .any(|(s, r)| *s == p.shard && r.key == p.key);
            if !done {
                summary.retried += u64::from(p.attempt == 1);
                queue.push_front(p);
            }
        }
        let elapsed = started.elapsed().as_secs_f64().max(1e-9);
        bar.set_message(format!(
            "{:.1} tokens/s",
            summary.generated_tokens as f64 / elapsed
        ));
        // Append per shard, then finalise completed shards.
        let mut touched: Vec<usize> = finished.iter().map(|(s, _)| *s).collect();
        touched.sort_unstable();
        touched.dedup();
        for shard in touched {
            let recs: Vec<RecapRecord> = finished
                .iter()
                .filter(|(s, _)| *s == shard)
                .map(|(_, r)| r.clone())
                .collect();
            for r in recs {
                if let Err(e) = record_done(
                    &mut states,
                    shard,
                    r,
                    &mut summary,
                    &mut long_words,
                    &bar,
                    opts,
                    &model_name,
                ) {
                    result = Err(e);
                    break 'main;
                }
            }
        }
    }
    drop(rx);
    let _ = reader.join();
    bar.finish_and_clear();
    result?;
    for shard in 0..states.len() {
        maybe_finalize(&mut states, shard, &mut summary, opts, &model_name)?;
    }
    let unfinished: Vec<String> = states
        .iter()
        .filter(|s| !s.paths.output.is_file())
        .map(|s| s.paths.input.display().to_string())
        .collect();
    if !unfinished.is_empty() {
        return Err(RuntimeError::Recaption(format!(
            "inputs left unfinished: {}",
            unfinished.join(", ")
        )));
    }
    let elapsed = started.elapsed().as_secs_f64();
    summary.elapsed_s = elapsed;
    if summary.samples > 0 {
        summary.mean_tokens_per_sample = summary.generated_tokens as f64 / summary.samples as f64;
    }
    if summary.ok > 0 {
        summary.mean_long_description_words = long_words as f64 / summary.ok as f64;
    }
    if elapsed > 0.0 {
        summary.images_per_s = summary.samples as f64 / elapsed;
        summary.tokens_per_s = summary.generated_tokens as f64 / elapsed;
    }
    let summary_path = opts.output_dir.join(format!(
        "summary-{:05}-of-{:05}.json",
        opts.shard_index, opts.num_shards
    ));
    let json =
        serde_json::to_vec_pretty(&summary).map_err(|e| RuntimeError::Recaption(e.to_string()))?;
    hq_data::atomic::write_atomic(&summary_path, &json)?;
    Ok(summary)
}

fn record_of(
    p: &Pending,
    texts: Option<hq_data::RefinedTexts>,
    error: Option<String>,
    raw: Option<String>,
) -> RecapRecord {
    RecapRecord {
        key: p.key.clone(),
        id: p.id.clone(),
        hq_clip: texts,
        error,
        raw_answer: raw,
        attempts: p.attempt,
        generated_tokens: p.tokens,
        alt_text_lossy: p.alt_text_lossy,
    }
}

/// One batch through the generator; a failing batch is retried one sample at a time so that one
/// bad sample becomes one error record instead of stopping the job.
fn run_batch(
    generator: &mut dyn Generator,
    exemplars: &ExemplarSet,
    opts: &JobOptions,
    batch: &[Box<Pending>],
) -> Vec<Result<crate::recaption::generator::GenOutput>> {
    let inputs: Vec<GenInput<'_>> = batch
        .iter()
        .map(|p| {
            let seed = sample_seed(opts.seed, &p.key, p.attempt);
            GenInput {
                key: &p.key,
                image: &p.image,
                messages: opts.prompt.messages(exemplars.pick(seed), &p.alt_text),
                seed,
                sampling: if p.attempt == 0 {
                    opts.sampling
                } else {
                    opts.retry_sampling
                },
                attempt: p.attempt,
            }
        })
        .collect();
    match generator.generate(&inputs) {
        Ok(outs) if outs.len() == inputs.len() => outs.into_iter().map(Ok).collect(),
        Ok(outs) => {
            let msg = format!(
                "the generator returned {} answers for {} requests",
                outs.len(),
                inputs.len()
            );
            inputs
                .iter()
                .map(|_| Err(RuntimeError::Generation(msg.clone())))
                .collect()
        }
        Err(e) if inputs.len() == 1 => vec![Err(e)],
        Err(_) => inputs
            .iter()
            .map(|one| {
                generator
                    .generate(std::slice::from_ref(one))
                    .and_then(|mut v| {
                        v.pop()
                            .ok_or_else(|| RuntimeError::Generation("no answer".into()))
                    })
            })
            .collect(),
    }
}

#[allow(clippy::too_many_arguments)]
fn record_done(
    states: &mut [ShardState],
    shard: usize,
    record: RecapRecord,
    summary: &mut JobSummary,
    long_words: &mut u64,
    bar: &indicatif::ProgressBar,
    opts: &JobOptions,
    model_name: &str,
) -> Result<()> {
    summary.samples += 1;
    match (&record.hq_clip, record.error_category()) {
        (Some(t), _) => {
            summary.ok += 1;
            *long_words += t.long_positive.split_whitespace().count() as u64;
        }
        (None, cat) => {
            *summary
                .errors
                .entry(cat.unwrap_or("unknown").to_string())
                .or_default() += 1
        }
    }
    let state = &mut states[shard];
    state.log.append(std::slice::from_ref(&record))?;
    state.records.push(record);
    bar.inc(1);
    maybe_finalize(states, shard, summary, opts, model_name)
}

fn maybe_finalize(
    states: &mut [ShardState],
    shard: usize,
    summary: &mut JobSummary,
    opts: &JobOptions,
    model_name: &str,
) -> Result<()> {
    let state = &mut states[shard];
    let Some(expected) = state.expected else {
        return Ok(());
    };
    let recorded_now = (state.records.len() as u64).saturating_sub(state.resumed);
    if state.received < expected || recorded_now < expected || state.paths.output.is_file() {
        return Ok(());
    }
    let records = std::mem::take(&mut state.records);
    finalize(
        &state.paths,
        records,
        opts.format,
        opts.max_member_bytes,
        model_name,
        opts.drop_input_texts,
    )?;
    summary.inputs_finished += 1;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_split_round_robin() -> Result<()> {
        let all: Vec<PathBuf> = (0..7).map(|i| PathBuf::from(format!("s{i}.tar"))).collect();
        let parts: Vec<Vec<PathBuf>> = (0..3)
            .map(|i| select_inputs(&all, i, 3))
            .collect::<Result<_>>()?;
        assert_eq!(
            parts[0],
            vec![PathBuf::from("s0.tar"), "s3.tar".into(), "s6.tar".into()]
        );
        assert_eq!(parts.iter().map(Vec::len).sum::<usize>(), 7);
        assert!(select_inputs(&all, 3, 3).is_err());
        Ok(())
    }

    #[test]
    fn scheduler_environment() -> Result<()> {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(split_from_env(env(&[]), None)?, None);
        assert_eq!(
            split_from_env(
                env(&[
                    ("SLURM_ARRAY_TASK_ID", "5"),
                    ("SLURM_ARRAY_TASK_MIN", "1"),
                    ("SLURM_ARRAY_TASK_COUNT", "8")
                ]),
                None
            )?,
            Some((4, 8))
        );
        assert_eq!(
            split_from_env(env(&[("JOB_COMPLETION_INDEX", "2")]), Some(4))?,
            Some((2, 4))
        );
        assert!(split_from_env(env(&[("JOB_COMPLETION_INDEX", "2")]), None).is_err());
        assert!(split_from_env(env(&[("SLURM_ARRAY_TASK_ID", "x")]), Some(2)).is_err());
        Ok(())
    }
}
