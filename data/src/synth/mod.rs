//! The built-in synthetic corpus: a deterministic, seedable image-text corpus rendered on the fly,
//! so recaptioning, CLIP training and evaluation all run (and are measured) with no download.
//!
//! - [`scene`]: the random scene model (1-3 objects: shape, colour, size, texture, count, spatial
//!   relation; patterned background), the ground truth of each image;
//! - [`render`]: the anti-aliased rasteriser and the JPEG / PNG encoding ([`jpeg`]: a fast
//!   baseline JPEG encoder);
//! - [`rawtext`]: noisy web-like alt-text (faithful / partial / boilerplate / wrong / unrelated);
//! - [`captions`]: the oracle's four refined texts (long positive and hard-negative descriptions,
//!   positive and negative tags), short retrieval captions, and a checker reading them back;
//! - [`evalsets`]: held-out sets in DataComp's webdataset layout and ARO's JSON layout;
//! - [`stats`]: corpus statistics (`hq-data stats`).
//!
//! # Determinism
//! Sample `i` of stream `s` is generated from its own ChaCha8 generators keyed by
//! `(seed, s, i, purpose)` ([`sample_rng`]); nothing depends on thread count or chunking, so the same
//! configuration always gives byte-identical shards. Training is stream 0; every held-out set has
//! its own stream ([`Stream`]), so no held-out image is a training image.
//!
//! # On disk (`write_corpus(cfg, DIR)`)
//! ```text
//! DIR/corpus.json                                   manifest: generator version, settings, sets, stats
//! DIR/train/shard-00000.tar ...                     key.jpg|png, key.txt (raw alt-text), key.json
//! DIR/eval/wds_synth_shape_test/                    classnames.txt, zeroshot_classification_templates.txt,
//!     test/nshards.txt, test/0.tar ...              s0000000.png|jpg + s0000000.cls
//! DIR/eval/wds_synth_color_test/, wds_synth_count_test/   (same layout)
//! DIR/eval/wds_synth_retrieval_test/                dataset_type.txt ("retrieval"), test/nshards.txt,
//!     test/0.tar ...                                s0000000.jpg + s0000000.txt (one caption a line)
//! DIR/eval/aro/synth_aro_attribute/                 visual_genome_attribution.json + images/
//! DIR/eval/aro/synth_aro_relation/                  visual_genome_relation.json + images/
//! ```
//! A training sample's `key.json` holds `uid`, `width`, `height`, `split`, `generator`, the `scene`
//! (background, groups, relation, objects with positions), `raw_kind`, `raw_decorated`,
//! `negative_changes` (the perturbations behind the hard negative), `negative_rules` (only when not
//! the default `paper`: which edits the hard negatives may make, [`NegativeRules`]) and, under
//! `hq_clip`, the four oracle texts with `source: "oracle"`, and `object_scale` (only when not 1:
//! [`SynthConfig::object_scale`]). The manifest's `config` holds the settings, `negative_rules` and
//! `object_scale` again only when not the default.

pub mod captions;
pub mod evalsets;
pub mod jpeg;
pub mod rawtext;
pub mod render;
pub mod scene;
pub mod stats;

use crate::error::{DataError, Result};
use crate::sample::{ImageBytes, Sample};
use crate::shards::{ShardWriter, ShardWriterOptions};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

pub use captions::{check_text, oracle_texts, tag_holds, NegativeRules, Perturbation};
pub use rawtext::{RawKind, RawText, RawTextMix};
pub use render::ImageFormat;
pub use scene::Scene;
pub use stats::CorpusStats;

/// Version of the generator; bumped whenever the same seed would give different bytes.
pub const GENERATOR_VERSION: &str = "hq-synth-2";

/// Name of the manifest written at the corpus root.
pub const MANIFEST_NAME: &str = "corpus.json";

/// Present at the corpus root while `write_corpus` works and removed after the manifest: a folder
/// holding it and no manifest is one of our own runs cut short (killed, disk full), which a rerun
/// replaces without `--force`; shards without it may be someone's data and are still refused.
pub const INCOMPLETE_MARKER: &str = ".hq-synth-incomplete";

/// Independent random streams: the training corpus and each held-out set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    Train = 0,
    Shape = 1,
    Color = 2,
    Count = 3,
    Retrieval = 4,
    AroAttribute = 5,
    AroRelation = 6,
}

/// What a generator is used for within one sample, so adding randomness to one part (say the
/// captions) does not change another (the image).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Scene = 0,
    RawText = 1,
    Oracle = 2,
    Captions = 3,
}

/// The generator of sample `index` of `stream` for `purpose`.
pub fn sample_rng(seed: u64, stream: Stream, index: u64, purpose: Purpose) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[0..8].copy_from_slice(&seed.to_le_bytes());
    key[8..12].copy_from_slice(&(stream as u32).to_le_bytes());
    key[12..16].copy_from_slice(&(purpose as u32).to_le_bytes());
    key[16..24].copy_from_slice(&index.to_le_bytes());
    key[24..32].copy_from_slice(b"HQSYNTH1");
    ChaCha8Rng::from_seed(key)
}

/// Settings of a synthetic corpus. Everything that changes the bytes written is here (and in the
/// manifest).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SynthConfig {
    pub seed: u64,
    /// Training samples.
    pub samples: u64,
    /// Training samples per shard.
    pub shard_size: u64,
    /// Image side in pixels (images are square).
    pub image_size: u32,
    pub format: ImageFormat,
    /// JPEG quality (1-100); ignored for PNG.
    pub jpeg_quality: u8,
    /// Samples in each held-out set; 0 writes no held-out sets.
    pub eval_samples: u64,
    /// Samples per held-out shard (`test/0.tar`, `test/1.tar`, ...).
    pub eval_shard_size: u64,
    /// Captions per retrieval image: at least `min`, at most `max` (at most 5).
    pub retrieval_captions: (usize, usize),
    pub raw_text: RawTextMix,
    /// Training shards are `train/{prefix}-00000.tar`.
    pub shard_prefix: String,
    /// Which edits the hard negatives (d-, t-) may make. Left out of the manifest when `paper`,
    /// so a default corpus's `corpus.json` is what it was before the setting existed (and such a
    /// manifest reads back as `paper`).
    #[serde(default, skip_serializing_if = "NegativeRules::is_paper")]
    pub negative_rules: NegativeRules,
    /// Object size multiplier: both size classes' nominal radii (0.12 and 0.2 of the image side)
    /// are multiplied by it, in the training samples and the held-out sets alike, so shapes are
    /// drawn larger (1.6: 0.192 and 0.32). In scenes of two or more objects a radius is capped so
    /// that the objects still fit apart and relations still hold strictly; the cap binds above
    /// [`scene::UNCAPPED_SCALE`] (1.14), on large objects only ([`scene::nominal_radius`]).
    /// In [`OBJECT_SCALE_RANGE`]. Left out of the manifest when 1, like `negative_rules`.
    #[serde(
        default = "default_object_scale",
        skip_serializing_if = "is_default_object_scale",
        serialize_with = "serialize_f32_short"
    )]
    pub object_scale: f32,
}

/// Accepted [`SynthConfig::object_scale`]s. Above 1.7 a small object alone in an image would be as
/// large as a large one in a crowded scene (whose radius is capped), so the size classes would no
/// longer be told apart by size.
pub const OBJECT_SCALE_RANGE: std::ops::RangeInclusive<f32> = 0.5..=1.7;

fn default_object_scale() -> f32 {
    1.0
}

fn is_default_object_scale(x: &f32) -> bool {
    *x == 1.0
}

/// An `f32` as the shortest decimal that reads back as it: `1.6`, not the `1.600000023841858`
/// that widening to `f64` gives.
fn short_f64(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(x as f64)
}

fn serialize_f32_short<S: serde::Serializer>(
    x: &f32,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_f64(short_f64(*x))
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            seed: 0,
            samples: 20_000,
            shard_size: 1_000,
            image_size: 64,
            format: ImageFormat::Jpg,
            jpeg_quality: 90,
            eval_samples: 1_000,
            eval_shard_size: 1_000,
            retrieval_captions: (2, 5),
            raw_text: RawTextMix::default(),
            shard_prefix: "shard".to_string(),
            negative_rules: NegativeRules::Paper,
            object_scale: 1.0,
        }
    }
}

impl SynthConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(DataError::Invalid(m));
        if !(16..=1024).contains(&self.image_size) {
            return bad(format!(
                "image size {} is not in 16..=1024",
                self.image_size
            ));
        }
        if self.shard_size == 0 || self.eval_shard_size == 0 {
            return bad("shard sizes must be at least 1".into());
        }
        if !(1..=100).contains(&self.jpeg_quality) {
            return bad(format!(
                "JPEG quality {} is not in 1..=100",
                self.jpeg_quality
            ));
        }
        let (lo, hi) = self.retrieval_captions;
        if lo == 0 || lo > hi || hi > 5 {
            return bad(format!(
                "retrieval captions {lo}..{hi}: need 1 <= min <= max <= 5"
            ));
        }
        if self.shard_prefix.is_empty() || self.shard_prefix.contains(['/', '\\', '.']) {
            return bad(format!(
                "shard prefix {:?} must be a plain name",
                self.shard_prefix
            ));
        }
        if !OBJECT_SCALE_RANGE.contains(&self.object_scale) {
            return bad(format!(
                "object scale {} is not in {}..={} (it multiplies the objects' radii)",
                self.object_scale,
                OBJECT_SCALE_RANGE.start(),
                OBJECT_SCALE_RANGE.end()
            ));
        }
        self.raw_text.validate().map_err(DataError::Invalid)
    }
}

/// One generated training sample with its ground truth.
#[derive(Debug, Clone)]
pub struct Generated {
    pub sample: Sample,
    pub scene: Scene,
    pub raw: RawText,
    pub perturbations: Vec<Perturbation>,
}

/// Render and encode a scene.
pub fn image_bytes(scene: &Scene, cfg: &SynthConfig) -> Result<ImageBytes> {
    let canvas = render::render(scene, cfg.image_size);
    let bytes = render::encode(&canvas, cfg.format, cfg.jpeg_quality)
        .map_err(|e| DataError::Image(e.to_string()))?;
    Ok(ImageBytes {
        ext: cfg.format.ext().to_string(),
        bytes,
    })
}

/// The key of training sample `index` (img2dataset style, 9 digits and more if needed).
pub fn train_key(index: u64) -> String {
    format!("{index:09}")
}

/// Generate training sample `index`: a pure function of `(cfg, index)`.
pub fn train_sample(cfg: &SynthConfig, index: u64) -> Result<Generated> {
    let scene = Scene::random_scaled(
        &mut sample_rng(cfg.seed, Stream::Train, index, Purpose::Scene),
        cfg.object_scale,
    );
    let image = image_bytes(&scene, cfg)?;
    let raw = rawtext::raw_text(
        &scene,
        &cfg.raw_text,
        &mut sample_rng(cfg.seed, Stream::Train, index, Purpose::RawText),
    );
    let (refined, perturbations) = oracle_texts(
        &scene,
        cfg.negative_rules,
        &mut sample_rng(cfg.seed, Stream::Train, index, Purpose::Oracle),
    );
    let mut sample = Sample::new(train_key(index), image, raw.text.clone());
    sample.refined = Some(refined);
    let m = &mut sample.meta;
    m.insert(
        "uid".into(),
        format!("synth-{}-{}", cfg.seed, train_key(index)).into(),
    );
    m.insert("width".into(), cfg.image_size.into());
    m.insert("height".into(), cfg.image_size.into());
    m.insert("split".into(), "train".into());
    m.insert("generator".into(), GENERATOR_VERSION.into());
    m.insert(
        "scene".into(),
        serde_json::to_value(&scene).map_err(|e| DataError::Invalid(e.to_string()))?,
    );
    m.insert("raw_kind".into(), raw.kind.name().into());
    m.insert("raw_decorated".into(), raw.decorated.into());
    m.insert(
        "negative_changes".into(),
        perturbations
            .iter()
            .map(|p| serde_json::Value::from(p.name()))
            .collect::<Vec<_>>()
            .into(),
    );
    // Only when not the paper's, so a default corpus's shards stay byte-identical to those
    // written before the setting existed.
    if !cfg.negative_rules.is_paper() {
        m.insert("negative_rules".into(), cfg.negative_rules.name().into());
    }
    // Likewise only when not 1.
    if !is_default_object_scale(&cfg.object_scale) {
        m.insert("object_scale".into(), short_f64(cfg.object_scale).into());
    }
    Ok(Generated {
        sample,
        scene,
        raw,
        perturbations,
    })
}

/// How [`write_corpus`] behaves (none of this changes the bytes written).
#[derive(Debug, Clone, Default)]
pub struct WriteOptions {
    /// Replace an existing corpus in the output folder (its `train/`, `eval/` and manifest).
    pub force: bool,
    /// Worker threads; `None` uses rayon's global pool.
    pub threads: Option<usize>,
    /// Show progress bars.
    pub progress: bool,
}

/// What [`write_corpus`] did.
#[derive(Debug, Clone, Serialize)]
pub struct CorpusReport {
    pub out: PathBuf,
    pub train_shards: Vec<PathBuf>,
    pub eval_sets: Vec<evalsets::EvalSetInfo>,
    pub stats: CorpusStats,
    pub train_seconds: f64,
    pub eval_seconds: f64,
}

impl CorpusReport {
    pub fn train_samples_per_second(&self) -> f64 {
        if self.train_seconds > 0.0 {
            self.stats.samples as f64 / self.train_seconds
        } else {
            0.0
        }
    }
}

/// Write the training shards, the held-out sets and the manifest under `out`. Streams: at most a
/// few chunks of samples are in memory at any time.
pub fn write_corpus(cfg: &SynthConfig, out: &Path, opts: &WriteOptions) -> Result<CorpusReport> {
    cfg.validate()?;
    match opts.threads {
        Some(n) => {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(n.max(1))
                .build()
                .map_err(|e| DataError::Invalid(format!("thread pool: {e}")))?;
            pool.install(|| write_corpus_inner(cfg, out, opts))
        }
        None => write_corpus_inner(cfg, out, opts),
    }
}

fn prepare_out(out: &Path, force: bool) -> Result<()> {
    let manifest = out.join(MANIFEST_NAME);
    let marker = out.join(INCOMPLETE_MARKER);
    let train = out.join("train");
    let eval = out.join("eval");
    let has_shards = std::fs::read_dir(&train)
        .map(|mut d| d.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".tar"))))
        .unwrap_or(false);
    let interrupted = marker.exists() && !manifest.exists();
    if (manifest.exists() || has_shards || eval.exists()) && !force && !interrupted {
        return Err(DataError::Invalid(format!(
            "{} already holds a corpus (or shards); pass --force to replace it",
            out.display()
        )));
    }
    for dir in [&train, &eval] {
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(|e| DataError::io(dir.as_path(), e))?;
        }
    }
    if manifest.exists() {
        std::fs::remove_file(&manifest).map_err(|e| DataError::io(&manifest, e))?;
    }
    std::fs::create_dir_all(&train).map_err(|e| DataError::io(&train, e))?;
    crate::atomic::write_atomic(&marker, b"hq-data synth is writing this corpus\n")?;
    Ok(())
}

fn write_corpus_inner(cfg: &SynthConfig, out: &Path, opts: &WriteOptions) -> Result<CorpusReport> {
    prepare_out(out, opts.force)?;
    let started = Instant::now();
    let train_dir = out.join("train");
    let writer = ShardWriter::new(
        train_dir.join(&cfg.shard_prefix),
        ShardWriterOptions {
            max_samples: Some(cfg.shard_size),
            max_bytes: None,
            first_index: 0,
        },
    )?;
    let bar = crate::progress::bar(Some(cfg.samples), "samples");
    bar.set_message("train");
    if !opts.progress {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    // Generate a chunk in parallel while the writer thread stores the previous one.
    let chunk = (rayon::current_num_threads() as u64 * 256).clamp(256, 8192);
    let (tx, rx) = crossbeam_channel::bounded::<Vec<Sample>>(2);
    let (shards, mut stats) = std::thread::scope(|scope| -> Result<(Vec<PathBuf>, CorpusStats)> {
        let bar = &bar;
        let writer_thread = scope.spawn(move || -> Result<(ShardWriter, CorpusStats)> {
            let mut writer = writer;
            let mut stats = CorpusStats::default();
            for samples in rx {
                for s in &samples {
                    writer.write(s)?;
                    stats.add_sample(s);
                }
                bar.inc(samples.len() as u64);
            }
            Ok((writer, stats))
        });
        let mut gen_result: Result<()> = Ok(());
        let mut start = 0;
        while start < cfg.samples {
            let end = (start + chunk).min(cfg.samples);
            let batch: Result<Vec<Sample>> = (start..end)
                .into_par_iter()
                .map(|i| train_sample(cfg, i).map(|g| g.sample))
                .collect();
            match batch {
                Ok(b) => {
                    if tx.send(b).is_err() {
                        break; // the writer failed; its error is reported below
                    }
                }
                Err(e) => {
                    gen_result = Err(e);
                    break;
                }
            }
            start = end;
        }
        drop(tx);
        let joined = writer_thread
            .join()
            .map_err(|_| DataError::Invalid("shard writer thread panicked".into()))?;
        let (writer, stats) = joined?;
        gen_result?;
        Ok((writer.finish()?, stats))
    })?;
    bar.finish_and_clear();
    let train_seconds = started.elapsed().as_secs_f64();
    stats.shards = shards.len() as u64;
    for p in &shards {
        stats.bytes += std::fs::metadata(p).map_err(|e| DataError::io(p, e))?.len();
    }

    let eval_started = Instant::now();
    let eval_sets = if cfg.eval_samples > 0 {
        evalsets::write_eval_sets(cfg, &out.join("eval"), opts.progress)?
    } else {
        Vec::new()
    };
    let eval_seconds = eval_started.elapsed().as_secs_f64();
    stats.eval_sets = eval_sets
        .iter()
        .map(|e| (e.name.clone(), e.count))
        .collect();

    let manifest = serde_json::json!({
        "generator": GENERATOR_VERSION,
        "config": cfg,
        "train": {
            "samples": stats.samples,
            "shards": shards.iter().filter_map(|p| p.strip_prefix(out).ok()).map(|p| p.to_string_lossy().into_owned()).collect::<Vec<_>>(),
            // A brace range for webdataset / open_clip's --train-data (null when empty).
            "pattern": (!shards.is_empty()).then(|| format!("train/{}-{{{:05}..{:05}}}.tar", cfg.shard_prefix, 0, shards.len() - 1)),
        },
        "eval": eval_sets,
        "stats": stats.to_json(20),
    });
    let text = serde_json::to_string_pretty(&manifest)
        .map_err(|e| DataError::Invalid(format!("manifest: {e}")))?;
    crate::atomic::write_atomic(out.join(MANIFEST_NAME), format!("{text}\n").as_bytes())?;
    let marker = out.join(INCOMPLETE_MARKER);
    std::fs::remove_file(&marker).map_err(|e| DataError::io(&marker, e))?;
    Ok(CorpusReport {
        out: out.to_path_buf(),
        train_shards: shards,
        eval_sets,
        stats,
        train_seconds,
        eval_seconds,
    })
}
