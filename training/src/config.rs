//! The run configuration of `hq-train`: a TOML file in five sections, every key optional with the
//! defaults below, overridable from the command line (`--set section.key=value` or the named
//! flags), and checked as a whole before anything starts ([`TrainConfig::validate`]).
//!
//! ```toml
//! [model]
//! preset = "hq-tiny"          # or config = "my-model.json" (open_clip model-config JSON)
//! image_size = 32             # optional override of the preset's image size
//! [data]
//! train = ["out/default/train"]
//! negative_pairing = "paired" # segment negatives: d-'s clause closest to the positive ("any")
//! # side-car annotations joined while reading (optional):
//! # annotations = { path = "ann/", id_field = "uid", fields = { long_positive = "caption" } }
//! # or, instead of train, a weighted mixture: [[data.sources]] shards = [...], weight = 3
//! [loss]
//! variant = "stc"             # baseline | mixed | hni | stc (the paper's ablation, cumulative)
//! [optim]
//! lr = 5e-4
//! [run]
//! steps = 300
//! batch_size = 64
//! out_dir = "runs/stc"
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::{LoaderConfig, TextPolicy};
use crate::model::ClipConfig;
use crate::optim::AdamWConfig;
use crate::schedule::CosineSchedule;
use crate::TrainError;

fn bad(field: &str, reason: impl Into<String>) -> TrainError {
    TrainError::Config {
        field: field.to_string(),
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSection {
    /// A preset name (`hq-tiny`, `hq-small`, `ViT-B-32`, `ViT-B-16`, `ViT-L-14`); `hq-tiny` when
    /// neither this nor `config` is set.
    pub preset: Option<String>,
    /// An open_clip model-config JSON file (instead of a preset).
    pub config: Option<PathBuf>,
    /// Weights to start from (`checkpoint::weights_source`: an open_clip HF folder, a checkpoint
    /// of ours, a safetensors or torch.save file). Its config is the model's when neither
    /// `preset` nor `config` is set; otherwise the weights must fit the config given.
    pub pretrained: Option<PathBuf>,
    /// A Hugging Face tokenizer folder (`tokenizer.json`) for a model whose config names one
    /// (`text_cfg.hf_tokenizer_name`, CLIPA); default: the one beside the pretrained weights.
    pub tokenizer: Option<PathBuf>,
    /// Square image size overriding the preset's (must be a multiple of the patch size).
    pub image_size: Option<i64>,
    /// Width of the STC head's hidden layer (default: the embedding width).
    pub stc_hidden: Option<i64>,
    /// Freeze the image tower (open_clip's `--lock-image`; LiT), but for its last
    /// `lock_image_unlocked_groups` groups (`model::lock`).
    pub lock_image: bool,
    pub lock_image_unlocked_groups: usize,
    /// With a locked ModifiedResNet image tower, keep its BatchNorm statistics fixed too (open_clip's
    /// `--lock-image-freeze-bn-stats`); without it they keep updating in training mode.
    pub lock_image_freeze_bn_stats: bool,
    /// Freeze the text tower (`--lock-text`), but for its last `lock_text_unlocked_layers` groups.
    pub lock_text: bool,
    pub lock_text_unlocked_layers: usize,
}

impl ModelSection {
    /// The tower locks these settings ask for.
    pub fn locks(&self) -> crate::model::lock::TowerLocks {
        crate::model::lock::TowerLocks {
            image: self.lock_image.then_some(self.lock_image_unlocked_groups),
            text: self.lock_text.then_some(self.lock_text_unlocked_layers),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataSection {
    /// Training shards: directories (their `*.tar`), globs, brace ranges, @lists.
    pub train: Vec<String>,
    /// Per-channel mean and std of the pixel normalisation (default: a pretrained checkpoint's
    /// `preprocess_cfg`, else CLIP's).
    pub image_mean: Option<[f64; 3]>,
    pub image_std: Option<[f64; 3]>,
    /// r: probability of a refined segment instead of the raw alt-text (mixed training).
    pub refined_prob: f64,
    /// N-: hard negatives per sample.
    pub negatives: usize,
    /// Probability that a hard negative is a d- segment rather than the joined t- tags.
    pub negative_segment_prob: f64,
    /// Which changed segment of d- a segment negative is: `any` (uniformly, the paper's reading;
    /// the default for now) or `paired` (when the positive is a d+ segment, the changed segment
    /// with the fewest word edits from it, so the two differ by the edit alone). See
    /// [`crate::data::NegativePairing`].
    pub negative_pairing: crate::data::NegativePairing,
    /// Shuffle-buffer size (samples).
    pub shuffle_buffer: usize,
    /// Shards read at once.
    pub readers: usize,
    /// Decode threads (0: one per core).
    pub threads: usize,
    /// K: tags in the STC vocabulary (the most frequent positive tags of the training data).
    pub tag_vocab_size: usize,
    /// A tag vocabulary file to use instead of counting (hq-data's `tag_vocab.tsv` format).
    pub tag_vocab: Option<PathBuf>,
    /// Bad samples logged one by one before only counting.
    pub max_logged_skips: usize,
    /// Side-car annotations joined onto `train` while reading (`hq_data::shards::annotations`):
    /// `{ path = "ann/", id_field = "uid", fields = { long_positive = "caption" } }`.
    pub annotations: Option<hq_data::shards::AnnotationSpec>,
    /// A weighted mixture instead of `train` (`crate::data::mixture`): `[[data.sources]]` tables
    /// of `shards` (as `train`), `weight` and optional `annotations`. Resampled and step-based:
    /// no epochs.
    pub sources: Vec<crate::data::SourceConfig>,
    /// What the sources' weights mean: `share` (source i gives w_i / sum(w) of the samples) or
    /// `per-shard` (open_clip's upsampling factors: each shard of source i weighs w_i).
    pub source_weighting: crate::data::SourceWeighting,
}

impl Default for DataSection {
    fn default() -> Self {
        let policy = TextPolicy::default();
        DataSection {
            train: Vec::new(),
            image_mean: None,
            image_std: None,
            refined_prob: policy.refined_prob,
            negatives: policy.negatives,
            negative_segment_prob: policy.negative_segment_prob,
            negative_pairing: policy.negative_pairing,
            shuffle_buffer: 5000,
            readers: 2,
            threads: 0,
            tag_vocab_size: crate::data::DEFAULT_TAG_VOCAB_SIZE,
            tag_vocab: None,
            max_logged_skips: 20,
            annotations: None,
            sources: Vec::new(),
            source_weighting: crate::data::SourceWeighting::Share,
        }
    }
}

/// The paper's ablation (Table 6), cumulative: each variant adds one part to the previous.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Variant {
    /// Raw alt-texts only, contrastive loss only.
    Baseline,
    /// Mixed texts (refined segment with probability r), contrastive loss only.
    Mixed,
    /// Mixed + hard-negative identification.
    Hni,
    /// Mixed + HNI + short-tag classification (full HQ-CLIP).
    Stc,
}

impl Variant {
    /// (mixed texts, HNI, STC).
    pub fn parts(self) -> (bool, bool, bool) {
        match self {
            Variant::Baseline => (false, false, false),
            Variant::Mixed => (true, false, false),
            Variant::Hni => (true, true, false),
            Variant::Stc => (true, true, true),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Variant::Baseline => "baseline",
            Variant::Mixed => "mixed",
            Variant::Hni => "hni",
            Variant::Stc => "stc",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LossSection {
    /// Sets `mixed_text`, `hni` and `stc` at once; setting one of those too is refused when it
    /// disagrees.
    pub variant: Option<Variant>,
    /// Train on refined texts with probability `data.refined_prob` (else raw alt-texts only).
    pub mixed_text: Option<bool>,
    /// Hard-negative identification term.
    pub hni: Option<bool>,
    /// Short-tag classification term.
    pub stc: Option<bool>,
    /// alpha, the HNI weight.
    pub hni_weight: f64,
    /// beta, the STC weight.
    pub stc_weight: f64,
    /// How L_cls is reduced over the K tags (see [`StcReduction`]).
    pub stc_reduction: StcReduction,
}

/// The reduction of the STC loss over the K tags (always a mean over the N samples).
///
/// The paper's formula sums over K; its weights (beta = 10 in the text, 100 best in Table 11) only
/// make sense with torch's `BCEWithLogitsLoss` default, a mean over K as well: summed over
/// K = 10k tags, beta = 10 would weight classification ~10^4 times the contrastive loss, and on
/// the built-in corpus (K ~ 350) the summed form with beta = 10 stalls the contrastive loss at
/// ln N. So the default is the mean over K; `sum` is the formula as printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum StcReduction {
    /// Mean over the K tags (torch's `BCEWithLogitsLoss()` default).
    Mean,
    /// Sum over the K tags (the paper's formula as printed).
    Sum,
}

impl Default for LossSection {
    fn default() -> Self {
        LossSection {
            variant: None,
            mixed_text: None,
            hni: None,
            stc: None,
            hni_weight: 0.5,
            stc_weight: 10.0,
            stc_reduction: StcReduction::Mean,
        }
    }
}

/// The loss parts a run trains with, after resolving the variant and switches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LossParts {
    pub mixed_text: bool,
    pub hni: bool,
    pub stc: bool,
}

impl LossSection {
    /// The parts: the variant's, with explicit switches filled in; a switch contradicting the
    /// variant is an error. With neither, full HQ-CLIP.
    pub fn parts(&self) -> Result<LossParts, TrainError> {
        let (vm, vh, vs) = self.variant.unwrap_or(Variant::Stc).parts();
        let mut out = LossParts {
            mixed_text: vm,
            hni: vh,
            stc: vs,
        };
        for (name, explicit, slot) in [
            ("mixed_text", self.mixed_text, &mut out.mixed_text),
            ("hni", self.hni, &mut out.hni),
            ("stc", self.stc, &mut out.stc),
        ] {
            if let Some(v) = explicit {
                if let Some(variant) = self.variant {
                    if v != *slot {
                        return Err(bad(
                            &format!("loss.{name}"),
                            format!(
                                "{name} = {v} contradicts variant = \"{}\" (which sets it to \
                                 {}); drop one of the two",
                                variant.name(),
                                *slot
                            ),
                        ));
                    }
                }
                *slot = v;
            }
        }
        Ok(out)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimSection {
    /// Peak learning rate.
    pub lr: f64,
    /// Floor of the cosine decay.
    pub min_lr: f64,
    /// Linear warm-up steps.
    pub warmup_steps: u64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay on weights (not gains, biases, embeddings or the logit scale).
    pub weight_decay: f64,
    /// Global gradient-norm clip (none when absent).
    pub grad_clip: Option<f64>,
    /// Upper bound of exp(logit_scale), applied after every step (CLIP: 100).
    pub max_logit_scale: f64,
    /// Peak learning rate of the new heads (the STC head) when it should differ from `lr`, the
    /// pretrained weights' (fine-tuning): the same schedule, scaled by `head_lr / lr`.
    pub head_lr: Option<f64>,
}

impl Default for OptimSection {
    fn default() -> Self {
        let a = AdamWConfig::default();
        OptimSection {
            lr: 5e-4,
            min_lr: 0.0,
            warmup_steps: 20,
            beta1: a.beta1,
            beta2: a.beta2,
            eps: a.eps,
            weight_decay: a.weight_decay,
            grad_clip: Some(1.0),
            max_logit_scale: 100.0,
            head_lr: None,
        }
    }
}

/// Numeric precision of the forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// bf16 autocast on a GPU, fp32 on the CPU.
    Auto,
    Fp32,
    /// bf16 autocast (GPU only).
    Bf16,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunSection {
    /// Optimizer steps in all.
    pub steps: u64,
    /// Samples per forward pass (micro-batch).
    pub batch_size: usize,
    /// Micro-batches per optimizer step; the contrastive batch is all of them together
    /// (open_clip's `--accum-freq`: features of the others are cached, each micro-batch's
    /// gradient is taken against the whole batch).
    pub accum_steps: usize,
    /// Seed of the model init and every data choice.
    pub seed: u64,
    /// `auto`, `cpu`, `cuda`, `cuda:N`.
    pub device: String,
    pub precision: Precision,
    /// Where checkpoints, metrics, plots and evaluations go.
    pub out_dir: Option<PathBuf>,
    /// Checkpoint every N steps (0: only at the end).
    pub checkpoint_every: u64,
    /// Checkpoints kept (oldest removed; 0 keeps all).
    pub keep_checkpoints: usize,
    /// A metrics line every N steps.
    pub log_every: u64,
    /// Zero-shot evaluation on the built-in held-out sets every N steps (0: never; the final
    /// model is evaluated whenever `eval_dir` is set).
    pub eval_every: u64,
    /// The held-out sets (`hq-data synth`'s `eval/` folder).
    pub eval_dir: Option<PathBuf>,
    /// Samples per held-out set used by the periodic evaluation (0: all).
    pub eval_samples: usize,
    /// libtorch intra-op threads (0: libtorch's default).
    pub torch_threads: usize,
}

impl Default for RunSection {
    fn default() -> Self {
        RunSection {
            steps: 1000,
            batch_size: 64,
            accum_steps: 1,
            seed: 0,
            device: "auto".into(),
            precision: Precision::Auto,
            out_dir: None,
            checkpoint_every: 0,
            keep_checkpoints: 3,
            log_every: 10,
            eval_every: 0,
            eval_dir: None,
            eval_samples: 0,
            torch_threads: 0,
        }
    }
}

/// A whole run's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub model: ModelSection,
    pub data: DataSection,
    pub loss: LossSection,
    pub optim: OptimSection,
    pub run: RunSection,
}

/// Sets `section.key = value` in a TOML table (`value` parsed as TOML, or taken as a string when
/// it does not parse, so `run.device=cpu` works unquoted).
pub fn set_toml_key(table: &mut toml::Table, assignment: &str) -> Result<(), TrainError> {
    let (key, value) = assignment.split_once('=').ok_or_else(|| {
        bad(
            "--set",
            format!("{assignment:?} is not section.key=value (e.g. optim.lr=1e-3)"),
        )
    })?;
    let key = key.trim();
    let value = value.trim();
    let (section, field) = key.split_once('.').ok_or_else(|| {
        bad(
            "--set",
            format!("{key:?} needs a section: model., data., loss., optim. or run."),
        )
    })?;
    let parsed: toml::Value = match toml::from_str::<toml::Table>(&format!("v = {value}")) {
        Ok(mut t) => t.remove("v").unwrap_or(toml::Value::String(value.into())),
        Err(_) => toml::Value::String(value.to_string()),
    };
    let entry = table
        .entry(section.to_string())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    match entry {
        toml::Value::Table(t) => {
            t.insert(field.to_string(), parsed);
            Ok(())
        }
        _ => Err(bad(key, format!("`{section}` is not a section"))),
    }
}

impl TrainConfig {
    /// Parses TOML (unknown keys are errors naming them).
    pub fn from_toml_table(table: toml::Table) -> Result<Self, TrainError> {
        TrainConfig::deserialize(toml::Value::Table(table))
            .map_err(|e| bad("(config)", e.to_string().trim().to_string()))
    }

    pub fn from_toml_str(text: &str) -> Result<Self, TrainError> {
        let table: toml::Table =
            toml::from_str(text).map_err(|e| bad("(config)", e.to_string().trim().to_string()))?;
        Self::from_toml_table(table)
    }

    pub fn to_toml_string(&self) -> Result<String, TrainError> {
        toml::to_string_pretty(self).map_err(|e| bad("(config)", e.to_string()))
    }

    /// Reads a config file as a TOML table (paths in it are relative to the working directory).
    pub fn load(path: &Path) -> Result<toml::Table, TrainError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| bad("(config)", format!("cannot read {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| {
            bad(
                "(config)",
                format!(
                    "{} is not valid TOML: {}",
                    path.display(),
                    e.to_string().trim()
                ),
            )
        })
    }

    /// The CLIP model config: preset or JSON file, with the image-size override applied.
    pub fn model_config(&self) -> Result<ClipConfig, TrainError> {
        let m = &self.model;
        let preset = m.preset.as_deref().filter(|p| !p.is_empty());
        let mut cfg = match (preset, &m.config) {
            (Some(_), Some(_)) => {
                return Err(bad("model", "both `preset` and `config` are set; keep one"))
            }
            (Some(p), None) => ClipConfig::preset(p)?,
            (None, Some(path)) => ClipConfig::from_json_file(path)?,
            (None, None) => match &m.pretrained {
                Some(path) => crate::checkpoint::weights_source(path)?
                    .config
                    .ok_or_else(|| {
                        bad(
                            "model.pretrained",
                            "the weights carry no model config (no model_config.json or \
                             open_clip_config.json beside them): set model.preset or model.config",
                        )
                    })?,
                None => ClipConfig::hq_tiny(),
            },
        };
        if let Some(s) = m.image_size {
            cfg.vision_cfg.image_size = crate::model::Size2::Square(s);
            cfg.validate()?;
        }
        Ok(cfg)
    }

    pub fn parts(&self) -> Result<LossParts, TrainError> {
        self.loss.parts()
    }

    /// The mixed-text policy of the loss parts (baseline: raw texts only, no negatives).
    pub fn text_policy(&self) -> Result<TextPolicy, TrainError> {
        let parts = self.parts()?;
        Ok(TextPolicy {
            refined_prob: if parts.mixed_text {
                self.data.refined_prob
            } else {
                0.0
            },
            negatives: if parts.hni { self.data.negatives } else { 0 },
            negative_segment_prob: self.data.negative_segment_prob,
            negative_pairing: self.data.negative_pairing,
        })
    }

    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            beta1: self.optim.beta1,
            beta2: self.optim.beta2,
            eps: self.optim.eps,
            weight_decay: self.optim.weight_decay,
        }
    }

    pub fn schedule(&self) -> CosineSchedule {
        CosineSchedule {
            base_lr: self.optim.lr,
            min_lr: self.optim.min_lr,
            warmup_steps: self.optim.warmup_steps,
            total_steps: self.run.steps,
        }
    }

    /// `data.train` as shard specifications: a directory stands for the `.tar` files in it.
    pub fn shard_specs(&self) -> Vec<String> {
        specs_of(&self.data.train)
    }

    /// The training data as (shard specifications, annotations, weight) per source: `data.train`
    /// as one source of weight 1, or the mixture's sources.
    pub fn data_sources(&self) -> Vec<crate::data::SourceConfig> {
        if self.data.sources.is_empty() {
            return vec![crate::data::SourceConfig {
                shards: self.shard_specs(),
                weight: 1.0,
                annotations: self.data.annotations.clone(),
            }];
        }
        self.data
            .sources
            .iter()
            .map(|s| crate::data::SourceConfig {
                shards: specs_of(&s.shards),
                ..s.clone()
            })
            .collect()
    }

    /// The data loader settings for `model`.
    pub fn loader_config(&self, model: &ClipConfig) -> Result<LoaderConfig, TrainError> {
        let mut c = LoaderConfig::for_model(model, self.shard_specs(), self.run.batch_size);
        c.text_policy = self.text_policy()?;
        c.seed = self.run.seed;
        c.shuffle_buffer = self.data.shuffle_buffer;
        c.readers = self.data.readers;
        c.threads = self.data.threads;
        c.max_logged_skips = self.data.max_logged_skips;
        c.annotations = self.data.annotations.clone();
        c.normalize = self.normalization()?;
        if !self.data.sources.is_empty() {
            c.shards = Vec::new();
            c.annotations = None;
            c.sources = self.data_sources();
            c.source_weighting = self.data.source_weighting;
        }
        Ok(c)
    }

    /// The text tokenizer for `model`: a resumed run's checkpoint carries its own; otherwise
    /// `model.tokenizer`, else the folder of the pretrained weights
    /// ([`crate::checkpoint::text_tokenizer`]).
    pub fn text_tokenizer(
        &self,
        model: &ClipConfig,
        checkpoint: Option<&Path>,
    ) -> Result<hq_data::text::TextTokenizer, TrainError> {
        if self.model.tokenizer.is_some() && model.text_cfg.hf_tokenizer_name.is_none() {
            return Err(bad(
                "model.tokenizer",
                "the model config uses open_clip's CLIP tokenizer (no text_cfg.hf_tokenizer_name); \
                 leave model.tokenizer out",
            ));
        }
        let from_checkpoint = checkpoint
            .filter(|d| {
                d.join(hq_data::text::hf_tokenizer::TOKENIZER_FILE)
                    .is_file()
            })
            .map(Path::to_path_buf);
        let folder = match (
            from_checkpoint,
            &self.model.tokenizer,
            &self.model.pretrained,
        ) {
            (Some(dir), _, _) => Some(dir),
            (None, Some(dir), _) => Some(dir.clone()),
            (None, None, Some(p)) => crate::checkpoint::weights_source(p)?.tokenizer,
            (None, None, None) => None,
        };
        if let (Some(name), None) = (&model.text_cfg.hf_tokenizer_name, &folder) {
            return Err(bad(
                "model.tokenizer",
                format!(
                    "the model reads the Hugging Face tokenizer {name:?} and no tokenizer.json \
                     came with the weights: pass its folder (hq-train --tokenizer DIR; nothing is \
                     downloaded)"
                ),
            ));
        }
        crate::checkpoint::text_tokenizer(model, folder.as_deref())
    }

    /// The pixel normalisation: `data.image_mean` / `data.image_std` when set, else a pretrained
    /// checkpoint's `preprocess_cfg`, else CLIP's (`None`).
    pub fn normalization(&self) -> Result<Option<crate::data::loader::Normalization>, TrainError> {
        let p = self.preprocess()?;
        let clip = hq_data::transform::Preprocess::default();
        Ok(((p.mean, p.std) != (clip.mean, clip.std)).then_some((p.mean, p.std)))
    }

    /// The run's image preprocessing as open_clip states it (`preprocess_cfg`): the pretrained
    /// weights' (else CLIP's), with `data.image_mean` / `data.image_std` overriding their
    /// normalisation. Checkpoints carry it, so evaluation and export see what training saw.
    pub fn preprocess(&self) -> Result<hq_data::transform::Preprocess, TrainError> {
        let from_weights = match &self.model.pretrained {
            Some(p) => crate::checkpoint::weights_source(p)?.preprocess,
            None => None,
        };
        let mut p = from_weights.unwrap_or_default();
        p.mean = self.data.image_mean.unwrap_or(p.mean);
        p.std = self.data.image_std.unwrap_or(p.std);
        Ok(p)
    }

    /// Checks the whole config; the error names the setting and says what to change.
    pub fn validate(&self) -> Result<(), TrainError> {
        let model = self.model_config()?;
        let parts = self.parts()?;
        let d = &self.data;
        let o = &self.optim;
        let r = &self.run;
        if d.train.is_empty() && d.sources.is_empty() {
            return Err(bad(
                "data.train",
                "no training data: set data.train in the config or pass --train SHARDS \
                 (e.g. out/default/train)",
            ));
        }
        if !d.sources.is_empty() {
            if !d.train.is_empty() || d.annotations.is_some() {
                return Err(bad(
                    "data.sources",
                    "a mixture replaces data.train and data.annotations: put every source, with \
                     its own annotations, in data.sources (or drop data.sources)",
                ));
            }
            for (i, src) in d.sources.iter().enumerate() {
                let field = format!("data.sources[{i}]");
                if !(src.weight.is_finite() && src.weight > 0.0) {
                    return Err(bad(&field, format!("weight {} must be > 0", src.weight)));
                }
                if src.shards.is_empty() {
                    return Err(bad(&field, "names no shards"));
                }
                if let Some(a) = &src.annotations {
                    a.validate().map_err(|e| bad(&field, e.to_string()))?;
                }
            }
        }
        if let Some(a) = &d.annotations {
            a.validate()
                .map_err(|e| bad("data.annotations", e.to_string()))?;
        }
        if !(0.0..=1.0).contains(&d.refined_prob) {
            return Err(bad(
                "data.refined_prob",
                format!("{} is not in [0, 1]", d.refined_prob),
            ));
        }
        if parts.mixed_text && d.refined_prob == 0.0 {
            return Err(bad(
                "data.refined_prob",
                "mixed texts with refined_prob = 0 is the baseline; use variant = \"baseline\" \
                 or set refined_prob > 0",
            ));
        }
        if parts.hni {
            if d.negatives == 0 {
                return Err(bad(
                    "data.negatives",
                    "the HNI loss needs at least one hard negative per sample; set negatives >= 1 \
                     or turn hni off",
                ));
            }
            if !(o_positive(self.loss.hni_weight)) {
                return Err(bad(
                    "loss.hni_weight",
                    "must be > 0 with hni on (or turn hni off)",
                ));
            }
        }
        if parts.stc {
            if !(o_positive(self.loss.stc_weight)) {
                return Err(bad(
                    "loss.stc_weight",
                    "must be > 0 with stc on (or turn stc off)",
                ));
            }
            if d.tag_vocab_size == 0 && d.tag_vocab.is_none() {
                return Err(bad("data.tag_vocab_size", "must be > 0 with stc on"));
            }
            if matches!(self.optim.head_lr, Some(h) if !(h.is_finite() && h > 0.0)) {
                return Err(bad("optim.head_lr", "must be a positive number"));
            }
            if self.model.lock_image_unlocked_groups > 0 && !self.model.lock_image {
                return Err(bad(
                    "model.lock_image_unlocked_groups",
                    "only applies to a locked image tower: set model.lock_image (--lock-image)",
                ));
            }
            if self.model.lock_image_freeze_bn_stats && !self.model.lock_image {
                return Err(bad(
                    "model.lock_image_freeze_bn_stats",
                    "only applies to a locked image tower: set model.lock_image (--lock-image)",
                ));
            }
            if self.model.lock_text_unlocked_layers > 0 && !self.model.lock_text {
                return Err(bad(
                    "model.lock_text_unlocked_layers",
                    "only applies to a locked text tower: set model.lock_text (--lock-text)",
                ));
            }
            if matches!(self.model.stc_hidden, Some(h) if h <= 0) {
                return Err(bad("model.stc_hidden", "must be > 0"));
            }
        }
        if !(o_positive(o.lr)) || o.min_lr < 0.0 || o.min_lr > o.lr {
            return Err(bad(
                "optim.lr",
                format!(
                    "need 0 <= min_lr <= lr and lr > 0 (lr = {}, min_lr = {})",
                    o.lr, o.min_lr
                ),
            ));
        }
        for (name, v) in [("optim.beta1", o.beta1), ("optim.beta2", o.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err(bad(name, format!("{v} is not in [0, 1)")));
            }
        }
        if !o_positive(o.eps) || o.weight_decay < 0.0 || !o.weight_decay.is_finite() {
            return Err(bad("optim.eps", "eps must be > 0 and weight_decay >= 0"));
        }
        if matches!(o.grad_clip, Some(c) if !o_positive(c)) {
            return Err(bad(
                "optim.grad_clip",
                "must be > 0 (leave it out for no clipping)",
            ));
        }
        if o.max_logit_scale.is_nan() || o.max_logit_scale < 1.0 {
            return Err(bad("optim.max_logit_scale", "must be >= 1 (CLIP uses 100)"));
        }
        if r.steps == 0 {
            return Err(bad("run.steps", "must be at least 1"));
        }
        if o.warmup_steps >= r.steps {
            return Err(bad(
                "optim.warmup_steps",
                format!(
                    "{} warm-up steps leave nothing of the {} steps for the cosine decay; use \
                     fewer warm-up steps or more steps",
                    o.warmup_steps, r.steps
                ),
            ));
        }
        if r.batch_size < 2 {
            return Err(bad(
                "run.batch_size",
                "the contrastive loss needs at least 2 samples per batch",
            ));
        }
        if r.accum_steps == 0 {
            return Err(bad("run.accum_steps", "must be at least 1"));
        }
        let device: crate::device::DeviceRequest = r.device.parse()?;
        if r.precision == Precision::Bf16 && device == crate::device::DeviceRequest::Cpu {
            return Err(bad(
                "run.precision",
                "bf16 autocast is for GPUs; the CPU trains in fp32 (use precision = \"auto\" or \
                 \"fp32\")",
            ));
        }
        if r.out_dir.is_none() {
            return Err(bad("run.out_dir", "set where the run writes (--out DIR)"));
        }
        if r.eval_every > 0 && r.eval_dir.is_none() {
            return Err(bad(
                "run.eval_every",
                "periodic evaluation needs run.eval_dir (the `eval/` folder of hq-data synth); \
                 set it or set eval_every = 0",
            ));
        }
        if r.log_every == 0 {
            return Err(bad("run.log_every", "must be at least 1"));
        }
        let _ = model;
        Ok(())
    }

    /// The settings a resumed run must share with the checkpoint for the continuation to be the
    /// same run (output and logging settings may differ).
    pub fn differences_for_resume(&self, saved: &TrainConfig) -> Vec<String> {
        let mut a = self.clone();
        let mut b = saved.clone();
        for c in [&mut a, &mut b] {
            c.run.out_dir = None;
            c.run.checkpoint_every = 0;
            c.run.keep_checkpoints = 0;
            c.run.log_every = 1;
            c.run.eval_every = 0;
            c.run.eval_dir = None;
            c.run.eval_samples = 0;
            c.run.device = String::new();
            c.run.torch_threads = 0;
            c.data.threads = 0;
            c.data.max_logged_skips = 0;
        }
        let (ta, tb) = match (toml::Value::try_from(&a), toml::Value::try_from(&b)) {
            (Ok(x), Ok(y)) => (x, y),
            _ => return vec!["(config cannot be compared)".into()],
        };
        let mut out = Vec::new();
        diff_values("", &ta, &tb, &mut out);
        out
    }
}

/// Shard specifications with a directory standing for the `.tar` files in it.
fn specs_of(list: &[String]) -> Vec<String> {
    list.iter()
        .map(|s| {
            if Path::new(s).is_dir() {
                format!("{}/*.tar", s.trim_end_matches('/'))
            } else {
                s.clone()
            }
        })
        .collect()
}

fn o_positive(v: f64) -> bool {
    v.is_finite() && v > 0.0
}

fn diff_values(prefix: &str, a: &toml::Value, b: &toml::Value, out: &mut Vec<String>) {
    match (a, b) {
        (toml::Value::Table(x), toml::Value::Table(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match (x.get(k), y.get(k)) {
                    (Some(va), Some(vb)) => diff_values(&p, va, vb, out),
                    (va, vb) => out.push(format!(
                        "{p}: {} now, {} in the checkpoint",
                        va.map(|v| v.to_string()).unwrap_or_else(|| "unset".into()),
                        vb.map(|v| v.to_string()).unwrap_or_else(|| "unset".into())
                    )),
                }
            }
        }
        _ if a != b => out.push(format!("{prefix}: {a} now, {b} in the checkpoint")),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok_config() -> TrainConfig {
        let mut c = TrainConfig::default();
        c.data.train = vec!["shards".into()];
        c.run.out_dir = Some("out".into());
        c.run.device = "cpu".into();
        c
    }

    #[test]
    fn defaults_validate_and_round_trip() {
        let c = ok_config();
        c.validate().expect("valid");
        let text = c.to_toml_string().expect("toml");
        assert_eq!(TrainConfig::from_toml_str(&text).expect("parse"), c);
        assert_eq!(
            c.parts().expect("parts"),
            LossParts {
                mixed_text: true,
                hni: true,
                stc: true
            }
        );
    }

    #[test]
    fn contradictions_and_missing_settings_are_named() {
        type Edit = Box<dyn Fn(&mut TrainConfig)>;
        let cases: Vec<(Edit, &str)> = vec![
            (Box::new(|c| c.data.train.clear()), "data.train"),
            (
                Box::new(|c| {
                    c.loss.variant = Some(Variant::Baseline);
                    c.loss.hni = Some(true);
                }),
                "contradicts variant",
            ),
            (Box::new(|c| c.data.negatives = 0), "data.negatives"),
            (
                Box::new(|c| c.optim.warmup_steps = 5000),
                "optim.warmup_steps",
            ),
            (Box::new(|c| c.run.precision = Precision::Bf16), "bf16"),
            (Box::new(|c| c.run.eval_every = 10), "run.eval_dir"),
            (Box::new(|c| c.run.batch_size = 1), "run.batch_size"),
            (
                Box::new(|c| {
                    c.model.preset = Some("hq-tiny".into());
                    c.model.config = Some("x.json".into());
                }),
                "both `preset` and `config`",
            ),
        ];
        for (edit, needle) in cases {
            let mut c = ok_config();
            edit(&mut c);
            let e = c.validate().expect_err(needle).to_string();
            assert!(e.contains(needle), "{needle:?} not in {e}");
        }
        let e = TrainConfig::from_toml_str("[optim]\nlearning_rate = 1\n")
            .expect_err("unknown")
            .to_string();
        assert!(e.contains("learning_rate"), "{e}");
    }

    #[test]
    fn set_overrides_and_resume_differences() {
        let mut t = toml::Table::new();
        set_toml_key(&mut t, "optim.lr=1e-3").expect("lr");
        set_toml_key(&mut t, "run.device=cpu").expect("device");
        set_toml_key(&mut t, "loss.variant = \"mixed\"").expect("variant");
        set_toml_key(&mut t, "data.train=[\"a\", \"b\"]").expect("train");
        let c = TrainConfig::from_toml_table(t.clone()).expect("config");
        assert_eq!(c.optim.lr, 1e-3);
        assert_eq!(c.run.device, "cpu");
        assert_eq!(c.loss.variant, Some(Variant::Mixed));
        assert_eq!(c.data.train, vec!["a", "b"]);
        assert!(set_toml_key(&mut toml::Table::new(), "lr=1").is_err());
        assert_eq!(c.data.negative_pairing, crate::data::NegativePairing::Any);
        set_toml_key(&mut t, "data.negative_pairing=paired").expect("pairing");
        let paired = TrainConfig::from_toml_table(t.clone()).expect("config");
        assert_eq!(
            paired.text_policy().expect("policy").negative_pairing,
            crate::data::NegativePairing::Paired
        );
        set_toml_key(&mut t, "data.negative_pairing=closest").expect("set");
        let e = TrainConfig::from_toml_table(t)
            .expect_err("closest")
            .to_string();
        assert!(e.contains("closest") && e.contains("paired"), "{e}");
        let mut other = c.clone();
        other.run.eval_every = 50;
        assert!(c.differences_for_resume(&other).is_empty());
        other.optim.lr = 2e-3;
        let d = c.differences_for_resume(&other);
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(d[0].starts_with("optim.lr"), "{d:?}");
    }
}
