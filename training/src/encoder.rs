//! The tch CLIP model behind [`hq_eval::Encoder`], so evaluation (the `hq-eval` command and the
//! periodic zero-shot evaluation during training) runs on it without seeing a tch tensor.
//!
//! Encoding runs without gradients; the model has no dropout or other train-only layers, so
//! "eval mode" is the plain forward pass in fp32. Large batches are cut into chunks of
//! [`TchEncoder::with_max_batch`] rows to bound memory.

use std::path::Path;
use std::sync::Arc;

use hq_data::text::TextTokenizer;
use hq_data::transform::{ImageTransform, Preprocess};
use hq_eval::{EncodeError, Encoder};
use tch::{nn::VarStore, Device, Kind, Tensor};

use crate::checkpoint::load_clip;
use crate::model::{Clip, ClipConfig};
use crate::TrainError;

/// Rows per forward pass unless changed with [`TchEncoder::with_max_batch`].
pub const DEFAULT_MAX_BATCH: usize = 256;

/// The model, owned (loaded from a checkpoint) or borrowed (the model being trained).
enum ModelRef<'m> {
    Owned {
        model: Box<Clip>,
        // Keeps the variables' store alive with the model that was built in it.
        _vs: VarStore,
    },
    Borrowed(&'m Clip),
}

/// A loaded CLIP model on a device, usable as an [`Encoder`].
pub struct TchEncoder<'m> {
    model: ModelRef<'m>,
    device: Device,
    name: String,
    max_batch: usize,
    /// The checkpoint's own normalisation and eval resize (open_clip's `preprocess_cfg`).
    preprocess: Preprocess,
    /// The model's own tokenizer (a Hugging Face one, CLIPA); `None`: open_clip's CLIP BPE.
    tokenizer: Option<Arc<TextTokenizer>>,
}

impl std::fmt::Debug for TchEncoder<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TchEncoder")
            .field("device", &self.device)
            .field("name", &self.name)
            .field("max_batch", &self.max_batch)
            .finish()
    }
}

fn square_size(cfg: &ClipConfig) -> Result<u32, TrainError> {
    let (h, w) = (
        cfg.vision_cfg.image_size.height(),
        cfg.vision_cfg.image_size.width(),
    );
    if h != w {
        return Err(TrainError::ModelConfig {
            field: "vision_cfg.image_size".into(),
            reason: format!(
                "evaluation needs a square image size (the eval transform is resize + centre \
                 crop), not {h}x{w}"
            ),
        });
    }
    u32::try_from(h).map_err(|_| TrainError::ModelConfig {
        field: "vision_cfg.image_size".into(),
        reason: format!("{h} is out of range"),
    })
}

impl TchEncoder<'static> {
    /// Loads a model for evaluation from `path` onto `device`.
    ///
    /// `path` is anything [`crate::checkpoint::weights_source`] accepts: a training checkpoint
    /// (or run) directory written by `hq-train` (its checksums are verified; the model config is
    /// read from it unless `config` is given, in which case the two must agree), an open_clip
    /// Hugging Face folder, or a single weights file (`.safetensors`, or a `torch.save` `.bin` /
    /// `.pt` read without running pickle code), which needs `config` (or a `model_config.json` /
    /// `open_clip_config.json` next to it).
    pub fn from_checkpoint(
        path: impl AsRef<Path>,
        config: Option<&ClipConfig>,
        device: Device,
    ) -> Result<Self, TrainError> {
        let path = path.as_ref();
        let (vs, model) = load_clip(path, config, device)?;
        let source = crate::checkpoint::weights_source(path)?;
        let preprocess = source.preprocess.unwrap_or_default();
        square_size(model.config())?;
        let tokenizer = match model.config().text_cfg.hf_tokenizer_name {
            Some(_) => Some(Arc::new(crate::checkpoint::text_tokenizer(
                model.config(),
                source.tokenizer.as_deref(),
            )?)),
            None => None,
        };
        let name = format!(
            "tch {} {}",
            device_name(device),
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| path.display().to_string())
        );
        Ok(TchEncoder {
            model: ModelRef::Owned {
                model: Box::new(model),
                _vs: vs,
            },
            device,
            name,
            max_batch: DEFAULT_MAX_BATCH,
            preprocess,
            tokenizer,
        })
    }
}

impl<'m> TchEncoder<'m> {
    /// Wraps a model in memory (the model being trained, for periodic evaluation). `device` is
    /// where its variables live.
    pub fn from_model(model: &'m Clip, device: Device) -> Result<Self, TrainError> {
        square_size(model.config())?;
        Ok(TchEncoder {
            model: ModelRef::Borrowed(model),
            device,
            name: format!("tch {} (in training)", device_name(device)),
            max_batch: DEFAULT_MAX_BATCH,
            preprocess: Preprocess::default(),
            tokenizer: None,
        })
    }

    /// Evaluates with `preprocess` (a pretrained checkpoint's normalisation and resize).
    pub fn with_preprocess(mut self, preprocess: Preprocess) -> Self {
        self.preprocess = preprocess;
        self
    }

    /// Tokenizes texts with `tokenizer` (the model's Hugging Face tokenizer) instead of CLIP's.
    pub fn with_tokenizer(mut self, tokenizer: Arc<TextTokenizer>) -> Self {
        self.tokenizer = match &*tokenizer {
            TextTokenizer::Clip(_) => None,
            TextTokenizer::Hf(_) => Some(tokenizer),
        };
        self
    }

    /// Rows per forward pass (at least 1).
    pub fn with_max_batch(mut self, rows: usize) -> Self {
        self.max_batch = rows.max(1);
        self
    }

    pub fn model(&self) -> &Clip {
        match &self.model {
            ModelRef::Owned { model, .. } => model,
            ModelRef::Borrowed(m) => m,
        }
    }

    pub fn device(&self) -> Device {
        self.device
    }

    fn image_hw(&self) -> (i64, i64) {
        let s = &self.model().config().vision_cfg.image_size;
        (s.height(), s.width())
    }

    /// Runs `f` over row chunks of a `[n, row...]` host buffer and gathers the `[rows, embed_dim]`
    /// outputs back into one host vector.
    fn run_chunks<T: tch::kind::Element + Copy>(
        &self,
        data: &[T],
        n: usize,
        row_shape: &[i64],
        f: impl Fn(&Clip, &Tensor) -> Result<Tensor, TrainError>,
    ) -> Result<Vec<f32>, EncodeError> {
        let err = |e: &dyn std::fmt::Display| EncodeError::new(self.name.clone(), e);
        let row_len: usize = row_shape.iter().map(|&d| d as usize).product();
        if data.len() != n * row_len {
            return Err(err(&format!(
                "expected {n} x {row_len} = {} values (shape [{n}, {}]), got {}",
                n * row_len,
                row_shape
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                data.len()
            )));
        }
        let dim = self.embed_dim();
        let mut out = Vec::with_capacity(n * dim);
        let model = self.model();
        for start in (0..n).step_by(self.max_batch.max(1)) {
            let rows = self.max_batch.min(n - start);
            let chunk = &data[start * row_len..(start + rows) * row_len];
            let mut shape = vec![rows as i64];
            shape.extend_from_slice(row_shape);
            let features = tch::no_grad(|| -> Result<Tensor, TrainError> {
                let input = Tensor::f_from_slice(chunk)?
                    .f_view(shape.as_slice())?
                    .f_to_device(self.device)?;
                let f = f(model, &input)?;
                Ok(f.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?)
            })
            .map_err(|e| err(&e))?;
            let values = Vec::<f32>::try_from(features.flatten(0, -1)).map_err(|e| err(&e))?;
            if values.len() != rows * dim {
                return Err(err(&format!(
                    "model returned {} values for {rows} rows of width {dim}",
                    values.len()
                )));
            }
            out.extend_from_slice(&values);
        }
        Ok(out)
    }
}

fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

impl Encoder for TchEncoder<'_> {
    fn describe(&self) -> String {
        self.name.clone()
    }

    fn image_transform(&self) -> ImageTransform {
        // The constructors checked that the size is square and fits a u32.
        let (h, _) = self.image_hw();
        self.preprocess.eval_transform(h as u32)
    }

    fn context_length(&self) -> usize {
        self.model().config().text_cfg.context_length as usize
    }

    fn embed_dim(&self) -> usize {
        self.model().config().embed_dim as usize
    }

    fn text_tokenizer(&self) -> Option<Arc<TextTokenizer>> {
        self.tokenizer.clone()
    }

    fn encode_images(&mut self, pixels: &[f32], n: usize) -> Result<Vec<f32>, EncodeError> {
        let (h, w) = self.image_hw();
        self.run_chunks(pixels, n, &[3, h, w], |m, x| m.encode_image(x))
    }

    fn encode_texts(&mut self, tokens: &[i64], n: usize) -> Result<Vec<f32>, EncodeError> {
        let ctx = self.context_length() as i64;
        self.run_chunks(tokens, n, &[ctx], |m, x| m.encode_text(x))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{CheckpointWriter, MODEL_CONFIG_FILE, MODEL_FILE};

    fn small() -> ClipConfig {
        let mut cfg = ClipConfig::hq_tiny();
        cfg.vision_cfg.image_size = crate::model::Size2::Square(32);
        cfg.vision_cfg.layers = 1.into();
        cfg.text_cfg.layers = 1;
        cfg
    }

    #[test]
    fn encodes_like_the_model_from_every_source() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = small();
        tch::manual_seed(11);
        let vs = VarStore::new(Device::Cpu);
        let model = Clip::new(vs.root(), &cfg).expect("model");
        let n = 5;
        let pixels: Vec<f32> = (0..n * 3 * 32 * 32)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let mut tokens = vec![0i64; n * 77];
        for (i, row) in tokens.chunks_mut(77).enumerate() {
            row[0] = 49406;
            row[1] = 320 + i as i64;
            row[2] = 49407;
        }
        let want_img = tch::no_grad(|| {
            model.encode_image(&Tensor::from_slice(&pixels).view([n as i64, 3, 32, 32]))
        })
        .expect("img");
        let want_txt =
            tch::no_grad(|| model.encode_text(&Tensor::from_slice(&tokens).view([n as i64, 77])))
                .expect("txt");
        let want_img = Vec::<f32>::try_from(want_img.flatten(0, -1)).expect("v");
        let want_txt = Vec::<f32>::try_from(want_txt.flatten(0, -1)).expect("v");

        // A bare weights file with a config; a checkpoint directory; the in-memory model (in
        // chunks of 2 rows, which must not change anything).
        let file = dir.path().join("w.safetensors");
        model.save_safetensors(&file).expect("save");
        let mut w = CheckpointWriter::create(dir.path().join("ck"), 3).expect("w");
        w.write_tensors(MODEL_FILE, &model.state_dict()).expect("m");
        w.write_bytes(
            MODEL_CONFIG_FILE,
            cfg.to_json_string().expect("j").as_bytes(),
        )
        .expect("c");
        let ck = w.commit().expect("commit");
        let mut encoders = [
            TchEncoder::from_checkpoint(&file, Some(&cfg), Device::Cpu).expect("file"),
            TchEncoder::from_checkpoint(&ck, None, Device::Cpu).expect("dir"),
            TchEncoder::from_model(&model, Device::Cpu)
                .expect("mem")
                .with_max_batch(2),
        ];
        for enc in encoders.iter_mut() {
            assert_eq!(enc.embed_dim(), 128);
            assert_eq!(enc.context_length(), 77);
            assert_eq!(enc.image_transform().size(), (32, 32));
            let img = enc.encode_images(&pixels, n).expect("images");
            let txt = enc.encode_texts(&tokens, n).expect("texts");
            assert_eq!(img.len(), n * 128);
            for (a, b) in img.iter().zip(&want_img).chain(txt.iter().zip(&want_txt)) {
                assert!((a - b).abs() < 1e-5, "{a} vs {b} ({})", enc.describe());
            }
            let e = enc.encode_images(&pixels[1..], n).expect_err("short");
            assert!(e.to_string().contains("values"), "{e}");
        }
        // A bare file without a config is refused with what to do.
        let e = TchEncoder::from_checkpoint(&file, None, Device::Cpu).expect_err("no cfg");
        assert!(e.to_string().contains("needs a model config"), "{e}");
        let mut other = cfg.clone();
        other.embed_dim = 64;
        let e = TchEncoder::from_checkpoint(&ck, Some(&other), Device::Cpu).expect_err("differs");
        assert!(e.to_string().contains("differs"), "{e}");
    }
}
