//! `hq-data`: the data layer's command line.
//!
//! - `hq-data synth`: write the built-in synthetic corpus (training shards, held-out sets in
//!   DataComp and ARO layouts, a manifest) and print its statistics and throughput;
//! - `hq-data stats`: statistics of webdataset shards or of a corpus folder;
//! - `hq-data quality`: recaption quality against the synthetic corpus's scene ground truth;
//! - `hq-data join`: shards with side-car annotations joined, written as new shards.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use hq_data::synth::{self, ImageFormat, NegativeRules, RawTextMix, SynthConfig, WriteOptions};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "hq-data",
    version,
    about = "HQ-CLIP data tools: the built-in synthetic corpus, shard statistics, recaption quality, side-car joins",
    long_about = "HQ-CLIP data tools.\n\n`synth` renders a deterministic synthetic image-text corpus \
                  (no download needed): webdataset training shards with noisy alt-text and the \
                  oracle's four refined texts, plus held-out sets in DataComp's and ARO's layouts. \
                  `stats` summarises shards (with --annotations: how side-car annotations cover \
                  them). `quality` judges recaptions against the corpus's scene ground truth. \
                  `join` writes shards with side-car annotations joined."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Write the synthetic corpus: DIR/train/shard-*.tar, DIR/eval/..., DIR/corpus.json.
    ///
    /// Layout: DIR/train/{prefix}-00000.tar ... (key.jpg|png, key.txt raw alt-text, key.json with
    /// the scene ground truth and the oracle texts under "hq_clip"); DIR/eval/wds_synth_shape_test,
    /// wds_synth_color_test, wds_synth_count_test (zero-shot classification: classnames.txt,
    /// zeroshot_classification_templates.txt, test/nshards.txt, test/N.tar with key.cls);
    /// DIR/eval/wds_synth_retrieval_test (dataset_type.txt, test/N.tar with key.txt, one caption a
    /// line); DIR/eval/aro/synth_aro_attribute and synth_aro_relation (ARO JSON + images/). The
    /// same settings always give byte-identical output, whatever the thread count.
    Synth(SynthArgs),
    /// Print statistics of shards: counts, bytes, image sizes, raw-text lengths and kinds, tag
    /// vocabulary, description lengths, eval-set sizes.
    Stats(StatsArgs),
    /// Judge recaptioned shards (or the oracle corpus itself) against the scene ground truth in
    /// each sample's JSON: format success, object recall (vs the raw alt-text and the oracle),
    /// per-attribute correctness of d+, whether d- contradicts the scene, tag truth.
    ///
    /// Writes DIR/quality.json (every figure with its counts), DIR/quality.md (tables) and
    /// DIR/quality.png (bar chart). The metrics are defined in the hq_data::quality module docs.
    Quality(QualityArgs),
    /// Write SHARDS with side-car annotations joined (the same join hq-train --annotations does
    /// while reading) as OUT/<shard name>.tar. Atomic per shard; a rerun skips the shards already
    /// written, so a killed join resumes.
    Join(JoinArgs),
}

/// Where side-car annotations are (`hq_data::shards::annotations`).
#[derive(Args, Debug, Clone)]
struct AnnotationArgs {
    /// Side-car annotations: a folder of per-shard files (`00012.tar` <-> `00012.jsonl` or
    /// `00012.json`), or index files (a file, glob, brace range or @list of .jsonl/.json files).
    #[arg(long, value_name = "SPEC")]
    annotations: Option<String>,
    /// The id annotations are matched by: the sample's metadata field (`uid`, `url`; `key` for
    /// the sample key) that the records also hold, or SAMPLE=RECORD when the record names it
    /// differently (`uid=id`).
    #[arg(long, default_value = "uid", value_name = "FIELD")]
    annotation_id: String,
    /// Which record fields hold the texts, as OURS=THEIRS pairs, e.g.
    /// `long_positive=caption,tags_positive=tags` (dotted paths reach nested fields; unmapped texts
    /// stay empty). Default: our own names, flat or nested.
    #[arg(long, value_name = "MAP")]
    annotation_fields: Option<String>,
}

impl AnnotationArgs {
    fn open(&self) -> Result<Option<hq_data::shards::Annotations>> {
        let Some(path) = &self.annotations else {
            return Ok(None);
        };
        let fields = match &self.annotation_fields {
            Some(m) => hq_data::shards::FieldMap::parse(m)?,
            None => Default::default(),
        };
        let mut spec = hq_data::shards::AnnotationSpec {
            path: path.clone(),
            fields,
            ..Default::default()
        };
        spec.set_id(&self.annotation_id);
        let ann = hq_data::shards::Annotations::open(&spec)
            .with_context(|| format!("opening the annotations {path}"))?;
        Ok(Some(ann))
    }
}

#[derive(Args, Debug)]
struct JoinArgs {
    /// Shards (a folder of .tar files, a shard file, a brace range, a glob, or an @list file).
    #[arg(required = true, value_name = "SHARDS")]
    shards: Vec<String>,
    #[command(flatten)]
    annotations: AnnotationArgs,
    /// Output folder (created).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Shards joined at once (0: one per core).
    #[arg(long, default_value_t = 0, value_name = "T")]
    threads: usize,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Hide the progress bar (also: environment variable HQ_NO_PROGRESS).
    #[arg(long)]
    no_progress: bool,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum FormatArg {
    Jpg,
    Png,
}

/// `hq_data::synth::NegativeRules` on the command line.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum NegativeRulesArg {
    /// The paper's mix: any one minimal edit (recolour, reshape, swapped attributes, flipped
    /// relation, count, size, texture, background, place).
    Paper,
    /// Only edits that keep every colour of the scene: reshape one object, swap colours or
    /// shapes between two objects (colour-shape binding); t- likewise.
    #[value(alias = "shape_binding")]
    ShapeBinding,
}

#[derive(Args, Debug)]
struct SynthArgs {
    /// Output folder (created; must not already hold a corpus unless --force).
    #[arg(long, default_value = "out/synth", value_name = "DIR")]
    out: PathBuf,
    /// Number of training samples.
    #[arg(long, default_value_t = 20_000, value_name = "N")]
    samples: u64,
    /// Corpus seed; the same seed and settings give byte-identical shards.
    #[arg(long, default_value_t = 0, value_name = "S")]
    seed: u64,
    /// Training samples per shard.
    #[arg(long, default_value_t = 1_000, value_name = "M")]
    shard_size: u64,
    /// Image side in pixels (square images, 16..=1024).
    #[arg(long, default_value_t = 64, value_name = "P")]
    image_size: u32,
    /// Image encoding.
    #[arg(long, value_enum, default_value_t = FormatArg::Jpg)]
    format: FormatArg,
    /// JPEG quality, 1..=100 (ignored for PNG).
    #[arg(long, default_value_t = 90, value_name = "Q")]
    jpeg_quality: u8,
    /// Samples in each held-out set (shape, colour, count, retrieval, ARO attribute, ARO
    /// relation); 0 writes none.
    #[arg(long, default_value_t = 1_000, value_name = "K")]
    eval_samples: u64,
    /// Samples per held-out shard (test/0.tar, test/1.tar, ...).
    #[arg(long, default_value_t = 1_000, value_name = "M")]
    eval_shard_size: u64,
    /// Fewest captions per retrieval image.
    #[arg(long, default_value_t = 2, value_name = "N")]
    min_captions: usize,
    /// Most captions per retrieval image (at most 5).
    #[arg(long, default_value_t = 5, value_name = "N")]
    max_captions: usize,
    /// Weight of faithful raw alt-texts (a short true summary). Weights are normalised.
    #[arg(long, default_value_t = RawTextMix::default().faithful, value_name = "W")]
    p_faithful: f64,
    /// Weight of partial raw alt-texts (true but incomplete: one object, or its shape only).
    #[arg(long, default_value_t = RawTextMix::default().partial, value_name = "W")]
    p_partial: f64,
    /// Weight of boilerplate raw alt-texts ("IMG_2931.jpg", "stock photo", "click to enlarge").
    #[arg(long, default_value_t = RawTextMix::default().boilerplate, value_name = "W")]
    p_boilerplate: f64,
    /// Weight of wrong raw alt-texts (an object with the wrong colour or shape).
    #[arg(long, default_value_t = RawTextMix::default().wrong, value_name = "W")]
    p_wrong: f64,
    /// Weight of unrelated raw alt-texts (product / SEO text).
    #[arg(long, default_value_t = RawTextMix::default().unrelated, value_name = "W")]
    p_unrelated: f64,
    /// Probability that a faithful, partial or wrong alt-text also gets boilerplate attached.
    #[arg(long, default_value_t = RawTextMix::default().decorate, value_name = "P")]
    p_decorate: f64,
    /// Training shard name prefix: train/{prefix}-00000.tar.
    #[arg(long, default_value = "shard", value_name = "NAME")]
    prefix: String,
    /// Which edits the hard negatives (the negative description d- and the negative tags t-)
    /// may make. shape-binding keeps the scene's colours, so colour alone cannot tell a
    /// negative from its positive. Recorded in corpus.json and each sample's JSON when not
    /// paper.
    #[arg(long, value_enum, default_value_t = NegativeRulesArg::Paper, value_name = "RULES")]
    negative_rules: NegativeRulesArg,
    /// Object size multiplier, 0.5..=1.7: both size classes' radii (0.12 and 0.2 of the image
    /// side) are multiplied by it, in the training images and the held-out sets alike, so shapes
    /// are drawn larger (1.6: 0.19 and 0.32). In images of two or more objects a large object's
    /// radius is capped at about 0.23 (above 1.14) so that objects still fit apart and relations
    /// still hold. Recorded in corpus.json and each sample's JSON when not 1.
    #[arg(long, default_value_t = 1.0, value_name = "F")]
    object_scale: f32,
    /// Worker threads (default: all cores). Output does not depend on it.
    #[arg(long, value_name = "T")]
    threads: Option<usize>,
    /// Replace an existing corpus in --out (its train/, eval/ and corpus.json).
    #[arg(long)]
    force: bool,
    /// Hide progress bars (also: environment variable HQ_NO_PROGRESS).
    #[arg(long)]
    no_progress: bool,
    /// Print the final statistics as JSON instead of text.
    #[arg(long)]
    json: bool,
    /// How many of the most frequent tags to list.
    #[arg(long, default_value_t = 20, value_name = "N")]
    top: usize,
}

#[derive(Args, Debug)]
struct StatsArgs {
    /// Shards: a corpus folder (with corpus.json), a folder of .tar files, a shard file, a brace
    /// range (`train/shard-{00000..00019}.tar`), a glob, or an @list file.
    #[arg(required = true, value_name = "SHARDS")]
    shards: Vec<String>,
    /// How many of the most frequent tags to list.
    #[arg(long, default_value_t = 20, value_name = "N")]
    top: usize,
    /// Reader threads (0: one per core).
    #[arg(long, default_value_t = 0, value_name = "T")]
    threads: usize,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Hide the progress spinner.
    #[arg(long)]
    no_progress: bool,
    /// With --annotations: report how the side-car annotations cover the shards (joined,
    /// missing, orphan, bad records) instead of the shard statistics.
    #[command(flatten)]
    annotations: AnnotationArgs,
}

#[derive(Args, Debug)]
struct QualityArgs {
    /// Shards: hq-recap-trt's `--format tar` output or a corpus (as `stats` takes them: a corpus
    /// folder, a folder of .tar files, a shard file, a brace range, a glob, an @list file).
    #[arg(required = true, value_name = "SHARDS")]
    shards: Vec<String>,
    /// Report folder (created): quality.json, quality.md, quality.png.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Name shown in the report (default: the first input's file or folder name).
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// hq-recap-trt's summary JSON (`samples`, `ok`, `retried`), for the first-attempt success
    /// rate; repeat for several workers' summaries (they are summed).
    #[arg(long, value_name = "FILE")]
    recap_summary: Vec<PathBuf>,
    /// Hide the progress spinner.
    #[arg(long)]
    no_progress: bool,
}

fn run_quality(a: QualityArgs) -> Result<()> {
    let opts = hq_data::quality::QualityOptions {
        name: a.name,
        recap_summaries: a.recap_summary,
        progress: !a.no_progress,
    };
    let report = hq_data::quality::evaluate(&a.shards, &opts)
        .with_context(|| format!("reading {}", a.shards.join(" ")))?;
    let written = hq_data::quality::write_report(&report, &a.out)
        .with_context(|| format!("writing the report to {}", a.out.display()))?;
    print!("{}", hq_data::quality::markdown(&report));
    if let Some(e) = &written.chart_error {
        eprintln!("hq-data quality: warning: no chart: {e}");
    }
    for f in &written.files {
        println!("wrote {}", f.display());
    }
    Ok(())
}

fn run_synth(a: SynthArgs) -> Result<()> {
    let cfg = SynthConfig {
        seed: a.seed,
        samples: a.samples,
        shard_size: a.shard_size,
        image_size: a.image_size,
        format: match a.format {
            FormatArg::Jpg => ImageFormat::Jpg,
            FormatArg::Png => ImageFormat::Png,
        },
        jpeg_quality: a.jpeg_quality,
        eval_samples: a.eval_samples,
        eval_shard_size: a.eval_shard_size,
        retrieval_captions: (a.min_captions, a.max_captions),
        raw_text: RawTextMix {
            faithful: a.p_faithful,
            partial: a.p_partial,
            boilerplate: a.p_boilerplate,
            wrong: a.p_wrong,
            unrelated: a.p_unrelated,
            decorate: a.p_decorate,
        },
        shard_prefix: a.prefix,
        negative_rules: match a.negative_rules {
            NegativeRulesArg::Paper => NegativeRules::Paper,
            NegativeRulesArg::ShapeBinding => NegativeRules::ShapeBinding,
        },
        object_scale: a.object_scale,
    };
    cfg.validate().context("invalid synth settings")?;
    if a.threads == Some(0) {
        bail!("--threads must be at least 1");
    }
    let opts = WriteOptions {
        force: a.force,
        threads: a.threads,
        progress: !a.no_progress,
    };
    let report = synth::write_corpus(&cfg, &a.out, &opts)
        .with_context(|| format!("writing the synthetic corpus to {}", a.out.display()))?;
    if a.json {
        let v = serde_json::json!({
            "out": report.out,
            "stats": report.stats.to_json(a.top),
            "eval_sets": report.eval_sets,
            "train_seconds": report.train_seconds,
            "eval_seconds": report.eval_seconds,
            "train_samples_per_second": report.train_samples_per_second(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", report.stats.report(a.top));
        println!(
            "wrote {} training samples in {} shard(s) to {} in {:.2} s ({:.0} samples/s); held-out sets in {:.2} s",
            report.stats.samples,
            report.train_shards.len(),
            report.out.join("train").display(),
            report.train_seconds,
            report.train_samples_per_second(),
            report.eval_seconds,
        );
        for e in &report.eval_sets {
            println!(
                "  {} ({}): {} samples at {}",
                e.name,
                e.kind,
                e.count,
                report.out.join(&e.path).display()
            );
        }
        println!(
            "manifest: {}",
            report.out.join(synth::MANIFEST_NAME).display()
        );
    }
    Ok(())
}

/// A folder stands for its `*.tar` files, as in hq-train's --train.
fn shard_list(specs: &[String]) -> Result<Vec<PathBuf>> {
    let specs: Vec<String> = specs
        .iter()
        .map(|s| {
            if std::path::Path::new(s).is_dir() {
                format!("{}/*.tar", s.trim_end_matches('/'))
            } else {
                s.clone()
            }
        })
        .collect();
    Ok(hq_data::shards::expand_shards(&specs)?)
}

fn print_join_report(r: &hq_data::shards::annotations::JoinRunReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
    } else {
        print!("{r}");
    }
    Ok(())
}

fn run_join(a: JoinArgs) -> Result<()> {
    let Some(ann) = a.annotations.open()? else {
        bail!("join needs --annotations SPEC");
    };
    let shards = shard_list(&a.shards)?;
    ann.check(&shards)?;
    let report =
        hq_data::shards::annotations::join_shards(&shards, &ann, &a.out, a.threads, !a.no_progress)
            .with_context(|| format!("joining into {}", a.out.display()))?;
    print_join_report(&report, a.json)?;
    if !a.json {
        println!(
            "wrote {} shard(s) to {}",
            report.shards - report.shards_already_done,
            a.out.display()
        );
    }
    Ok(())
}

fn run_stats(a: StatsArgs) -> Result<()> {
    if let Some(ann) = a.annotations.open()? {
        let shards = shard_list(&a.shards)?;
        let report =
            hq_data::shards::annotations::coverage(&shards, &ann, a.threads, !a.no_progress)?;
        return print_join_report(&report, a.json);
    }
    let stats = synth::stats::stats_of(&a.shards, a.threads, !a.no_progress)
        .with_context(|| format!("reading {}", a.shards.join(" ")))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&stats.to_json(a.top))?);
    } else {
        print!("{}", stats.report(a.top));
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Synth(a) => run_synth(a),
        Command::Stats(a) => run_stats(a),
        Command::Quality(a) => run_quality(a),
        Command::Join(a) => run_join(a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The whole context chain on one line, never a backtrace dump.
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
