//! `hq-export`: a CLIP checkpoint (ours or any open_clip state dict in safetensors, with its model
//! config) to ONNX encoders, the open_clip layout, or the Hugging Face CLIP layout.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use hq_export::checkpoint::{locate, resolve_config, Checkpoint};
use hq_export::clip::{export_onnx, ExportOptions, Precision};
use hq_export::formats::{copy_tokenizer, export_hf, export_open_clip};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    /// image_encoder.onnx + text_encoder.onnx (+ open_clip_config.json, export.json).
    Onnx,
    /// open_clip_model.safetensors + <name>.json, for open_clip.create_model.
    #[value(name = "open_clip", alias = "open-clip")]
    OpenClip,
    /// model.safetensors + config.json, for transformers' CLIPModel.from_pretrained.
    #[value(name = "hf", alias = "huggingface")]
    Hf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PrecisionArg {
    Fp32,
    Fp16,
}

/// Export a trained CLIP (open_clip state dict in safetensors + model config).
#[derive(Debug, Parser)]
#[command(name = "hq-export", version, about, long_about = None)]
struct Args {
    /// A safetensors file, an hq-train checkpoint directory (model.safetensors +
    /// model_config.json) or an hq-train run directory (its `latest` checkpoint).
    #[arg(long, short = 'c')]
    checkpoint: PathBuf,
    /// The open_clip model config: a JSON file or a preset (hq-tiny, hq-small, ViT-B-32, ViT-B-16,
    /// ViT-L-14). Default: model_config.json next to the checkpoint, else the safetensors metadata.
    #[arg(long)]
    config: Option<String>,
    /// Output directory (created if missing; existing files of the same names are replaced).
    #[arg(long, short = 'o')]
    out: PathBuf,
    /// What to write.
    #[arg(long, value_enum, default_value = "onnx")]
    format: Format,
    /// Weight precision (ONNX: weights and compute; the model interface stays f32).
    #[arg(long, value_enum, default_value = "fp32")]
    precision: PrecisionArg,
    /// ONNX only: L2-normalise the embeddings inside the graph (open_clip's normalize=True).
    #[arg(long)]
    normalize: bool,
    /// Model name (ONNX metadata; the open_clip config's file name). Default: the config's file
    /// stem or preset name, else "hq-clip".
    #[arg(long)]
    name: Option<String>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let location = locate(&args.checkpoint)?;
    let ckpt = Checkpoint::read(&location.weights)?;
    let (cfg, source) = resolve_config(args.config.as_deref(), &location, &ckpt)?;
    let name = args
        .name
        .clone()
        .or_else(|| source.model_name())
        .unwrap_or_else(|| "hq-clip".to_string());
    let precision = match args.precision {
        PrecisionArg::Fp32 => Precision::Fp32,
        PrecisionArg::Fp16 => Precision::Fp16,
    };
    eprintln!(
        "checkpoint {} ({} tensors, sha256 {}), config {source:?}",
        location.weights.display(),
        ckpt.tensors.len(),
        ckpt.sha256
    );
    // Before the export proper, whose manifest comes last and marks the folder complete.
    let weights_dir = location
        .weights
        .parent()
        .unwrap_or(std::path::Path::new("."));
    for f in copy_tokenizer(&cfg, weights_dir, &args.out)? {
        eprintln!("tokenizer file {}", f.display());
    }
    match args.format {
        Format::Onnx => {
            let opts = ExportOptions {
                precision,
                normalize: args.normalize,
                model_name: Some(name),
                // The weights' own preprocess_cfg (open_clip folder, our checkpoint), else CLIP's.
                preprocess: hq_train::checkpoint::preprocess_in(weights_dir)?.unwrap_or_default(),
            };
            let s = export_onnx(&cfg, &ckpt, &opts, &args.out)
                .with_context(|| format!("exporting ONNX to {}", args.out.display()))?;
            println!(
                "wrote {} and {} ({:.1} MB, {precision}, {})",
                s.image_model.display(),
                s.text_model.display(),
                s.bytes as f64 / 1e6,
                if args.normalize {
                    "normalised embeddings"
                } else {
                    "unnormalised embeddings"
                }
            );
        }
        Format::OpenClip => {
            if args.normalize {
                anyhow::bail!("--normalize applies to --format onnx only");
            }
            let s = export_open_clip(&cfg, &ckpt, precision, &name, &args.out)?;
            println!(
                "wrote {} ({} tensors) and {}; load with open_clip.add_model_config({:?}) and \
                 open_clip.create_model({name:?}, pretrained={:?})",
                s.weights.display(),
                s.tensors,
                s.config.display(),
                args.out.display().to_string(),
                s.weights.display().to_string()
            );
        }
        Format::Hf => {
            if args.normalize {
                anyhow::bail!("--normalize applies to --format onnx only");
            }
            let s = export_hf(&cfg, &ckpt, precision, &args.out)?;
            println!(
                "wrote {} ({} tensors) and {}; load with transformers.CLIPModel.from_pretrained({:?})",
                s.weights.display(),
                s.tensors,
                s.config.display(),
                args.out.display().to_string()
            );
        }
    }
    Ok(())
}
