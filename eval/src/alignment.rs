//! Image-text alignment of a dataset's texts under a CLIP model: the paper's Fig. 4a measure
//! (mean image-text cosine of raw alt-texts vs recaptions), used by the closed loop to put the raw
//! alt-text, our recaptioner's long description and the oracle's side by side.
//!
//! A text source is a label, a field (`alt_text`, the sample's `txt`; `long_positive` or
//! `long_negative`, from its `hq_clip` texts) and shards. Per source, every sample with an image
//! and that text counts: the image and the text are embedded, both rows L2-normalised, and the
//! cosine is their dot product. Samples without the text (a failed recaption) are counted as
//! `missing`, unreadable ones as `bad`; nothing is skipped silently. At most `max_samples` per
//! source, in shard order, so sources over the same shards cover the same images.

use hq_data::shards::{ReadOptions, ShardReader};
use serde::Serialize;

use crate::encoder::Encoder;
use crate::error::EvalError;
use crate::pipeline::{encode_texts, prepare_image, tokenizer_for, RunOptions};

/// Which text of a sample a source reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TextField {
    /// The raw alt-text (`txt`).
    AltText,
    /// The long positive description (`hq_clip.long_positive`).
    LongPositive,
    /// The long hard-negative description (`hq_clip.long_negative`).
    LongNegative,
}

impl std::str::FromStr for TextField {
    type Err = EvalError;
    fn from_str(s: &str) -> Result<Self, EvalError> {
        match s {
            "alt_text" => Ok(Self::AltText),
            "long_positive" => Ok(Self::LongPositive),
            "long_negative" => Ok(Self::LongNegative),
            other => Err(EvalError::Invalid(format!(
                "text field {other:?}: use alt_text, long_positive or long_negative"
            ))),
        }
    }
}

/// One text source: `LABEL=FIELD@SHARDS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextSource {
    /// The name shown in the report.
    pub label: String,
    /// The field read.
    pub field: TextField,
    /// Shard specifications (paths, folders, brace ranges).
    pub shards: String,
}

impl std::str::FromStr for TextSource {
    type Err = EvalError;
    fn from_str(s: &str) -> Result<Self, EvalError> {
        let bad = || EvalError::Invalid(format!("{s:?} is not LABEL=FIELD@SHARDS"));
        let (label, rest) = s.split_once('=').ok_or_else(bad)?;
        let (field, shards) = rest.split_once('@').ok_or_else(bad)?;
        if label.is_empty() || shards.is_empty() {
            return Err(bad());
        }
        Ok(Self {
            label: label.to_string(),
            field: field.parse()?,
            shards: shards.to_string(),
        })
    }
}

/// One source's result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SourceAlignment {
    pub label: String,
    pub field: TextField,
    pub shards: String,
    /// Samples with an image and the text (the mean is over these).
    pub samples: usize,
    /// Samples without the text.
    pub missing: usize,
    /// Unreadable samples or images.
    pub bad: usize,
    /// Mean image-text cosine.
    pub mean_cosine: f64,
    /// Standard deviation of the cosine over samples.
    pub std_cosine: f64,
}

fn text_of(sample: &hq_data::Sample, field: TextField) -> Option<String> {
    let t = match field {
        TextField::AltText => sample.raw_text.clone(),
        TextField::LongPositive => sample.refined.as_ref()?.long_positive.clone(),
        TextField::LongNegative => sample.refined.as_ref()?.long_negative.clone(),
    };
    (!t.trim().is_empty()).then_some(t)
}

/// The image-text cosine of each (image, text) pair of a batch.
fn cosines_of(
    encoder: &mut dyn Encoder,
    tokenizer: &hq_data::text::TextTokenizer,
    pixels: &[f32],
    texts: &[String],
    opts: &RunOptions,
) -> Result<Vec<f64>, EvalError> {
    let dim = encoder.embed_dim();
    let n = texts.len();
    let mut img = encoder.encode_images(pixels, n)?;
    crate::metrics::normalize_rows(&mut img, dim);
    let txt = encode_texts(encoder, tokenizer, texts, opts, true)?;
    Ok((0..n)
        .map(|i| {
            let a = &img[i * dim..(i + 1) * dim];
            let b = &txt[i * dim..(i + 1) * dim];
            a.iter().zip(b).map(|(x, y)| f64::from(*x * *y)).sum()
        })
        .collect())
}

/// Measures one source (see the module doc).
pub fn source_alignment(
    encoder: &mut dyn Encoder,
    source: &TextSource,
    max_samples: usize,
    opts: &RunOptions,
) -> Result<SourceAlignment, EvalError> {
    let transform = encoder.image_transform();
    let tokenizer = tokenizer_for(encoder)?;
    let reader = ShardReader::from_specs(&[source.shards.as_str()], ReadOptions::default())?;
    let (mut missing, mut bad) = (0usize, 0usize);
    let mut cosines = Vec::new();
    let mut pixels = Vec::new();
    let mut texts = Vec::new();
    let batch = opts.batch_size.max(1);
    for item in reader {
        if cosines.len() + texts.len() >= max_samples {
            break;
        }
        let Ok(sample) = item else {
            bad += 1;
            continue;
        };
        let Some(text) = text_of(&sample, source.field) else {
            missing += 1;
            continue;
        };
        let Some(image) = &sample.image else {
            bad += 1;
            continue;
        };
        match prepare_image(&transform, &image.bytes, None, opts.max_pixels) {
            Ok(p) => pixels.extend_from_slice(&p),
            Err(_) => {
                bad += 1;
                continue;
            }
        }
        texts.push(text);
        if texts.len() == batch {
            cosines.extend(cosines_of(encoder, &tokenizer, &pixels, &texts, opts)?);
            pixels.clear();
            texts.clear();
        }
    }
    if !texts.is_empty() {
        cosines.extend(cosines_of(encoder, &tokenizer, &pixels, &texts, opts)?);
    }
    let n = cosines.len();
    let mean = if n == 0 {
        f64::NAN
    } else {
        cosines.iter().sum::<f64>() / n as f64
    };
    let var = if n < 2 {
        0.0
    } else {
        cosines.iter().map(|c| (c - mean).powi(2)).sum::<f64>() / (n - 1) as f64
    };
    Ok(SourceAlignment {
        label: source.label.clone(),
        field: source.field,
        shards: source.shards.clone(),
        samples: n,
        missing,
        bad,
        mean_cosine: mean,
        std_cosine: var.sqrt(),
    })
}

fn field_name(f: TextField) -> &'static str {
    match f {
        TextField::AltText => "alt_text",
        TextField::LongPositive => "long_positive",
        TextField::LongNegative => "long_negative",
    }
}

/// Every source's alignment under one model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AlignmentReport {
    /// The model, as the encoder describes itself.
    pub model: String,
    pub sources: Vec<SourceAlignment>,
}

impl AlignmentReport {
    /// A Markdown table.
    pub fn markdown(&self) -> String {
        let mut s = format!(
            "Image-text cosine under {} (the paper's Fig. 4a measure)\n\n| texts | field | samples | missing | bad | mean cosine | std |\n|---|---|---:|---:|---:|---:|---:|\n",
            self.model
        );
        for r in &self.sources {
            if r.samples == 0 {
                s += &format!(
                    "| {} | {} | 0 | {} | {} | n/a | n/a |\n",
                    r.label,
                    field_name(r.field),
                    r.missing,
                    r.bad
                );
                continue;
            }
            s += &format!(
                "| {} | {} | {} | {} | {} | {:.4} | {:.4} |\n",
                r.label,
                field_name(r.field),
                r.samples,
                r.missing,
                r.bad,
                r.mean_cosine,
                r.std_cosine
            );
        }
        s
    }
}

/// Measures every source.
pub fn text_alignment(
    encoder: &mut dyn Encoder,
    sources: &[TextSource],
    max_samples: usize,
    opts: &RunOptions,
) -> Result<AlignmentReport, EvalError> {
    let mut out = Vec::new();
    for s in sources {
        out.push(source_alignment(encoder, s, max_samples, opts)?);
    }
    Ok(AlignmentReport {
        model: encoder.describe(),
        sources: out,
    })
}
