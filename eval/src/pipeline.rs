//! The encoding pipeline: a reader thread streams samples, a rayon pool decodes and transforms a
//! batch of images while the encoder (on the calling thread) embeds the previous batch; batches
//! travel through a bounded channel so memory stays flat. Bad samples are counted and kept (the
//! first [`BAD_EXAMPLES_KEPT`] in full) and never stop the task.

use std::time::Instant;

use hq_data::transform::ImageTransform;
use hq_data::SampleError;
use image::RgbImage;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::encoder::Encoder;
use crate::error::EvalError;
use crate::metrics::normalize_rows;

/// How the runner works (batching, threads, limits).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunOptions {
    /// Images per encoder call (CLIP_benchmark's default is 64).
    pub batch_size: usize,
    /// Texts per encoder call.
    pub text_batch_size: usize,
    /// Decode threads (0: one per core).
    pub threads: usize,
    /// Decoded batches waiting for the encoder at most.
    pub prefetch: usize,
    /// Pixel limit for one image (decompression bombs are bad samples).
    pub max_pixels: u64,
    /// Evaluate only the first N samples of each set (quick checks; results are marked).
    pub limit: Option<u64>,
    /// Show progress bars (also hidden when `HQ_NO_PROGRESS` is set or stderr is no terminal).
    pub progress: bool,
    /// Attribute pairs with fewer cases are left out of ARO attribution's macro accuracy (ARO's
    /// own rule is 25; the built-in sets are smaller).
    pub aro_attribute_min_count: u64,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            batch_size: 64,
            text_batch_size: 256,
            threads: 0,
            prefetch: 2,
            max_pixels: hq_data::shards::DEFAULT_MAX_PIXELS,
            limit: None,
            progress: true,
            aro_attribute_min_count: crate::metrics::ARO_ATTRIBUTE_MIN_COUNT,
        }
    }
}

/// Bad samples kept in full per task (the count covers all of them).
pub const BAD_EXAMPLES_KEPT: usize = 100;

/// Bad samples of one task: how many, and the first ones with their reasons.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BadSamples {
    pub count: u64,
    pub examples: Vec<SampleError>,
}

impl BadSamples {
    pub fn push(&mut self, e: SampleError) {
        self.count += 1;
        if self.examples.len() < BAD_EXAMPLES_KEPT {
            self.examples.push(e);
        }
    }

    pub fn merge(&mut self, other: BadSamples) {
        self.count += other.count;
        for e in other.examples {
            if self.examples.len() < BAD_EXAMPLES_KEPT {
                self.examples.push(e);
            }
        }
    }
}

/// A pixel rectangle to crop before the transform, PIL `Image.crop((left, top, right, bottom))`
/// semantics: coordinates rounded half-to-even, the part outside the image filled with black.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CropRect {
    pub left: f64,
    pub top: f64,
    pub right: f64,
    pub bottom: f64,
}

/// One image to encode with the label it carries.
pub struct ImageJob<L> {
    pub key: String,
    pub shard: String,
    pub ext: String,
    pub bytes: Vec<u8>,
    pub crop: Option<CropRect>,
    pub label: L,
}

impl<L> ImageJob<L> {
    /// A job for an image file on disk (ARO, WinoGAViL), or the error record saying why it cannot
    /// be read. The extension names the decoder, as a webdataset member's does.
    pub fn from_file(
        path: &std::path::Path,
        shard: &str,
        key: String,
        crop: Option<CropRect>,
        label: L,
    ) -> Result<Self, SampleError> {
        match std::fs::read(path) {
            Ok(bytes) => Ok(ImageJob {
                key,
                shard: shard.to_string(),
                ext: path
                    .extension()
                    .map(|e| e.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                bytes,
                crop,
                label,
            }),
            Err(e) => Err(SampleError {
                shard: shard.to_string(),
                key,
                reason: format!("cannot read image {}: {e}", path.display()),
            }),
        }
    }
}

/// Where a sample source pushes its jobs (or error records); `false` back means stop.
pub type JobSink<'a, L> = dyn FnMut(Result<ImageJob<L>, SampleError>) -> bool + 'a;

/// Embeddings (L2-normalised rows) and the labels of the images that made it.
pub struct Encoded<L> {
    pub embeddings: Vec<f32>,
    pub labels: Vec<L>,
    pub bad: BadSamples,
    pub seconds: f64,
}

impl<L> Encoded<L> {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// PIL's crop on an RGB image.
pub fn pil_crop(img: &RgbImage, rect: CropRect) -> Result<RgbImage, String> {
    let r = |v: f64| v.round_ties_even() as i64;
    let (x0, y0, x1, y1) = (r(rect.left), r(rect.top), r(rect.right), r(rect.bottom));
    // PIL clamps a box with right < left to an empty width.
    let (w, h) = ((x1 - x0).max(0), (y1 - y0).max(0));
    if w == 0 || h == 0 {
        return Err(format!("crop box ({x0}, {y0}, {x1}, {y1}) is empty"));
    }
    if w > 1 << 16 || h > 1 << 16 {
        return Err(format!("crop box ({x0}, {y0}, {x1}, {y1}) is too large"));
    }
    let mut out = RgbImage::new(w as u32, h as u32);
    let (iw, ih) = (i64::from(img.width()), i64::from(img.height()));
    for y in y0.max(0)..y1.min(ih) {
        for x in x0.max(0)..x1.min(iw) {
            out.put_pixel(
                (x - x0) as u32,
                (y - y0) as u32,
                *img.get_pixel(x as u32, y as u32),
            );
        }
    }
    Ok(out)
}

/// Decode, crop and transform one image.
pub fn prepare_image(
    transform: &ImageTransform,
    bytes: &[u8],
    crop: Option<CropRect>,
    max_pixels: u64,
) -> Result<Vec<f32>, String> {
    let img = hq_data::shards::decode_image(bytes, max_pixels)?;
    let rgb = match img {
        image::DynamicImage::ImageRgb8(rgb) => rgb,
        other => other.to_rgb8(),
    };
    let rgb = match crop {
        Some(rect) => pil_crop(&rgb, rect)?,
        None => rgb,
    };
    let mut out = vec![0f32; transform.output_len()];
    // The eval transform draws nothing from the generator.
    let mut rng = rand::rngs::mock::StepRng::new(0, 0);
    transform.apply_rgb_into(&rgb, &mut rng, &mut out);
    Ok(out)
}

struct DecodedBatch<L> {
    pixels: Vec<f32>,
    labels: Vec<L>,
    bad: BadSamples,
    /// Samples consumed from the source (good and bad), for the progress bar.
    consumed: u64,
}

/// A progress bar for `total` items named `what`, shown when `show`.
pub fn progress_bar(
    total: Option<u64>,
    what: &str,
    message: &str,
    show: bool,
) -> indicatif::ProgressBar {
    let bar = hq_data::progress::bar(total, what);
    bar.set_message(message.to_string());
    if !show {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar
}

/// Encode every image `source` yields. `source` runs on a reader thread and pushes jobs (or
/// error records) into the sink it is given, which returns `false` once the consumer has stopped.
pub fn encode_images<L, S>(
    encoder: &mut dyn Encoder,
    source: S,
    total: Option<u64>,
    opts: &RunOptions,
    bar: &indicatif::ProgressBar,
) -> Result<Encoded<L>, EvalError>
where
    L: Send,
    S: FnOnce(&mut JobSink<'_, L>) + Send,
{
    let started = Instant::now();
    let transform = encoder.image_transform();
    let dim = encoder.embed_dim();
    let per_image = transform.output_len();
    let batch_size = opts.batch_size.max(1);
    let limit = opts.limit.or(total);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads)
        .build()
        .map_err(|e| EvalError::Invalid(format!("decode thread pool: {e}")))?;
    let (tx, rx) = crossbeam_channel::bounded::<DecodedBatch<L>>(opts.prefetch.max(1));
    let max_pixels = opts.max_pixels;
    let row_limit = opts.limit;

    let mut out = Encoded {
        embeddings: Vec::new(),
        labels: Vec::new(),
        bad: BadSamples::default(),
        seconds: 0.0,
    };
    std::thread::scope(|scope| -> Result<(), EvalError> {
        let transform = &transform;
        let pool = &pool;
        scope.spawn(move || {
            let mut pending: Vec<ImageJob<L>> = Vec::with_capacity(batch_size);
            let mut bad = BadSamples::default();
            let mut consumed = 0u64;
            let mut seen = 0u64;
            let flush = |jobs: Vec<ImageJob<L>>, bad: BadSamples, consumed: u64| -> bool {
                let inputs: Vec<(&[u8], Option<CropRect>)> =
                    jobs.iter().map(|j| (j.bytes.as_slice(), j.crop)).collect();
                let decoded: Vec<Result<Vec<f32>, String>> = pool.install(|| {
                    inputs
                        .par_iter()
                        .map(|(bytes, crop)| prepare_image(transform, bytes, *crop, max_pixels))
                        .collect()
                });
                drop(inputs);
                let mut batch = DecodedBatch {
                    pixels: Vec::with_capacity(jobs.len() * per_image),
                    labels: Vec::with_capacity(jobs.len()),
                    bad,
                    consumed,
                };
                for (job, result) in jobs.into_iter().zip(decoded) {
                    match result {
                        Ok(p) => {
                            batch.pixels.extend_from_slice(&p);
                            batch.labels.push(job.label);
                        }
                        Err(why) => batch.bad.push(SampleError {
                            shard: job.shard,
                            key: job.key,
                            reason: format!("bad image .{}: {why}", job.ext),
                        }),
                    }
                }
                tx.send(batch).is_ok()
            };
            let mut stopped = false;
            source(&mut |item| {
                if stopped || row_limit.is_some_and(|l| seen >= l) {
                    return false;
                }
                seen += 1;
                consumed += 1;
                match item {
                    Ok(job) => pending.push(job),
                    Err(e) => bad.push(e),
                }
                if pending.len() >= batch_size {
                    let jobs = std::mem::replace(&mut pending, Vec::with_capacity(batch_size));
                    if !flush(
                        jobs,
                        std::mem::take(&mut bad),
                        std::mem::take(&mut consumed),
                    ) {
                        stopped = true;
                        return false;
                    }
                }
                true
            });
            if !stopped && (!pending.is_empty() || bad.count > 0 || consumed > 0) {
                flush(pending, bad, consumed);
            }
        });
        let result = (|| -> Result<(), EvalError> {
            for batch in rx.iter() {
                let n = batch.labels.len();
                if n > 0 {
                    let mut emb = encoder.encode_images(&batch.pixels, n)?;
                    if emb.len() != n * dim {
                        return Err(EvalError::Invalid(format!(
                            "{}: encode_images returned {} values for {n} images of width {dim}",
                            encoder.describe(),
                            emb.len()
                        )));
                    }
                    normalize_rows(&mut emb, dim);
                    out.embeddings.extend_from_slice(&emb);
                    out.labels.extend(batch.labels);
                }
                for e in &batch.bad.examples {
                    if out.bad.examples.len() < 20 {
                        bar.println(format!("bad sample: {e}"));
                    }
                }
                out.bad.merge(batch.bad);
                bar.inc(batch.consumed);
            }
            Ok(())
        })();
        // Dropping the receiver makes a still-running reader stop at its next send.
        drop(rx);
        result
    })?;
    if let Some(l) = limit {
        bar.set_length(l.max(bar.position()));
    }
    out.seconds = started.elapsed().as_secs_f64();
    Ok(out)
}

/// Tokenise and embed texts in batches; rows are L2-normalised when `normalize`.
pub fn encode_texts(
    encoder: &mut dyn Encoder,
    tokenizer: &hq_data::text::TextTokenizer,
    texts: &[String],
    opts: &RunOptions,
    normalize: bool,
) -> Result<Vec<f32>, EvalError> {
    let dim = encoder.embed_dim();
    let ctx = encoder.context_length();
    if tokenizer.context_length() != ctx {
        return Err(EvalError::Invalid(format!(
            "tokenizer context {} differs from the model's {ctx}",
            tokenizer.context_length()
        )));
    }
    let mut out = Vec::with_capacity(texts.len() * dim);
    for chunk in texts.chunks(opts.text_batch_size.max(1)) {
        let tokens = tokenizer.tokenize_batch_flat(chunk)?;
        let mut emb = encoder.encode_texts(&tokens, chunk.len())?;
        if emb.len() != chunk.len() * dim {
            return Err(EvalError::Invalid(format!(
                "{}: encode_texts returned {} values for {} texts of width {dim}",
                encoder.describe(),
                emb.len(),
                chunk.len()
            )));
        }
        if normalize {
            normalize_rows(&mut emb, dim);
        }
        out.extend_from_slice(&emb);
    }
    Ok(out)
}

/// The tokenizer for `encoder`: its own ([`Encoder::text_tokenizer`]), else open_clip's CLIP BPE at
/// the model's context length.
pub fn tokenizer_for(
    encoder: &dyn Encoder,
) -> Result<std::sync::Arc<hq_data::text::TextTokenizer>, EvalError> {
    let tokenizer = match encoder.text_tokenizer() {
        Some(t) => t,
        None => std::sync::Arc::new(
            hq_data::text::tokenizer::ClipTokenizer::from_bundled()?
                .with_context_length(encoder.context_length())?
                .into(),
        ),
    };
    if tokenizer.context_length() != encoder.context_length() {
        return Err(EvalError::Invalid(format!(
            "the model's tokenizer ({}) gives {} ids per text, the model reads {}",
            tokenizer.describe(),
            tokenizer.context_length(),
            encoder.context_length()
        )));
    }
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crop_like_pil() {
        let mut img = RgbImage::new(4, 3);
        img.put_pixel(1, 1, image::Rgb([9, 9, 9]));
        let c = pil_crop(
            &img,
            CropRect {
                left: 0.5, // rounds to 0 (half to even)
                top: 1.0,
                right: 6.0,
                bottom: 2.0,
            },
        )
        .unwrap_or_default();
        assert_eq!((c.width(), c.height()), (6, 1));
        assert_eq!(c.get_pixel(1, 0).0, [9, 9, 9]);
        assert_eq!(c.get_pixel(5, 0).0, [0, 0, 0]);
        assert!(pil_crop(
            &img,
            CropRect {
                left: 2.0,
                top: 0.0,
                right: 1.0,
                bottom: 1.0
            }
        )
        .is_err());
    }
}
