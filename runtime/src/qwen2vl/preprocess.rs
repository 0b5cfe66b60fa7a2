//! Qwen2-VL's image processor: `smart_resize`, PIL bicubic resampling, CLIP normalisation, the
//! temporal repeat and the 1176-value patches in the processor's order.
//!
//! The reference is transformers' `Qwen2VLImageProcessorPil` (the processor's PIL backend):
//! 1. `smart_resize`: both sides rounded (Python's `round`, ties to even) to multiples of
//!    `patch * merge` (28), then scaled by `sqrt(h*w / max_pixels)` (floor) or
//!    `sqrt(min_pixels / (h*w))` (ceil) when outside the pixel budget; aspect ratios above 200 are
//!    refused. All in f64, as Python computes it.
//! 2. PIL `resize(..., BICUBIC)` on the 8-bit RGB image: [`hq_data::transform::pil_resize_bicubic`]
//!    reproduces Pillow's fixed-point resampler bit for bit.
//! 3. `v * rescale_factor`, `(v - mean) / std` in f64 (numpy promotes the uint8 image to float64),
//!    then f32.
//! 4. Patches: the image is cut into `patch x patch` squares, ordered by 2x2 merge block (row-major
//!    over blocks, row-major inside a block), each flattened as (channel, time, y, x) with the
//!    single frame repeated over the temporal patch (2): 3*2*14*14 = 1176 values.
//!
//! transformers 5 defaults to its torchvision backend (`Qwen2VLImageProcessor`); measured against it
//! (transformers 5.23, torchvision of torch 2.11, random uint8 RGB images): grids are identical,
//! images whose sides are already multiples of 28 (no resize) agree to 2.4e-7 (float rounding of the
//! normalisation), and resized images (90x61, 200x150, 500x700) differ on about 0.45-0.5% of the
//! values, each by exactly one 8-bit level (`1 / (255 * std)`, at most 0.0150): the two backends'
//! bicubic resamplers round differently. Ours equals the PIL backend, which the model was trained
//! with.

use image::{DynamicImage, RgbImage};

use crate::error::{Result, RuntimeError};
use crate::qwen2vl::model_dir::PreprocessConfig;

/// One image ready for the vision encoder.
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedImage {
    /// `[num_patches, patch_dim]` row-major.
    pub pixel_values: Vec<f32>,
    /// Values per patch (1176 for Qwen2-VL).
    pub patch_dim: usize,
    /// `[t, h, w]` in patches.
    pub grid_thw: [usize; 3],
    /// Number of `<|image_pad|>` tokens (and vision features) of this image: t*h*w / merge^2.
    pub num_tokens: usize,
}

impl PreparedImage {
    /// Number of patches (rows of `pixel_values`).
    pub fn num_patches(&self) -> usize {
        self.grid_thw[0] * self.grid_thw[1] * self.grid_thw[2]
    }
}

/// `smart_resize(height, width, factor, min_pixels, max_pixels)` -> (height, width).
pub fn smart_resize(
    height: u32,
    width: u32,
    factor: u32,
    min_pixels: u64,
    max_pixels: u64,
) -> Result<(u32, u32)> {
    if height == 0 || width == 0 {
        return Err(RuntimeError::Image(format!(
            "empty image ({width}x{height})"
        )));
    }
    let (h, w, f) = (f64::from(height), f64::from(width), f64::from(factor));
    let ratio = h.max(w) / h.min(w);
    if ratio > 200.0 {
        return Err(RuntimeError::Image(format!(
            "absolute aspect ratio must be smaller than 200, got {ratio} ({width}x{height})"
        )));
    }
    let mut h_bar = (h / f).round_ties_even() * f;
    let mut w_bar = (w / f).round_ties_even() * f;
    if h_bar * w_bar > max_pixels as f64 {
        let beta = ((h * w) / max_pixels as f64).sqrt();
        h_bar = f.max((h / beta / f).floor() * f);
        w_bar = f.max((w / beta / f).floor() * f);
    } else if h_bar * w_bar < min_pixels as f64 {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        h_bar = (h * beta / f).ceil() * f;
        w_bar = (w * beta / f).ceil() * f;
    }
    if !(1.0..=f64::from(u32::MAX)).contains(&h_bar)
        || !(1.0..=f64::from(u32::MAX)).contains(&w_bar)
    {
        return Err(RuntimeError::Image(format!(
            "cannot resize {width}x{height} within the pixel budget"
        )));
    }
    Ok((h_bar as u32, w_bar as u32))
}

/// The image processor with one model's settings.
#[derive(Debug, Clone)]
pub struct ImageProcessor {
    cfg: PreprocessConfig,
    in_channels: usize,
    /// Per channel, the normalised value of each 8-bit level.
    lut: [[f32; 256]; 3],
}

impl ImageProcessor {
    /// A processor for `cfg` (from the model directory); `max_pixels` may be lowered for throughput
    /// (vision tokens dominate the cost) with [`Self::with_pixel_budget`].
    pub fn new(cfg: PreprocessConfig, in_channels: usize) -> Self {
        let mut lut = [[0f32; 256]; 3];
        for (c, table) in lut.iter_mut().enumerate() {
            for (v, out) in table.iter_mut().enumerate() {
                let scaled = v as f64 * cfg.rescale_factor;
                *out = ((scaled - cfg.image_mean[c]) / cfg.image_std[c]) as f32;
            }
        }
        Self {
            cfg,
            in_channels,
            lut,
        }
    }

    /// Overrides the pixel budget of `smart_resize`.
    pub fn with_pixel_budget(
        mut self,
        min_pixels: Option<u64>,
        max_pixels: Option<u64>,
    ) -> Result<Self> {
        if let Some(m) = min_pixels {
            self.cfg.min_pixels = m;
        }
        if let Some(m) = max_pixels {
            self.cfg.max_pixels = m;
        }
        if self.cfg.min_pixels > self.cfg.max_pixels {
            return Err(RuntimeError::Image(format!(
                "min_pixels {} exceeds max_pixels {}",
                self.cfg.min_pixels, self.cfg.max_pixels
            )));
        }
        Ok(self)
    }

    /// The settings in use.
    pub fn config(&self) -> &PreprocessConfig {
        &self.cfg
    }

    /// Resized (height, width) of an image of this size.
    pub fn target_size(&self, height: u32, width: u32) -> Result<(u32, u32)> {
        let factor = (self.cfg.patch_size * self.cfg.merge_size) as u32;
        smart_resize(
            height,
            width,
            factor,
            self.cfg.min_pixels,
            self.cfg.max_pixels,
        )
    }

    /// Processes a decoded image (converted to RGB first, as the processor's `do_convert_rgb`).
    pub fn process(&self, image: &DynamicImage) -> Result<PreparedImage> {
        let rgb = image.to_rgb8();
        self.process_rgb(&rgb)
    }

    /// Processes an 8-bit RGB image.
    pub fn process_rgb(&self, rgb: &RgbImage) -> Result<PreparedImage> {
        if self.in_channels != 3 {
            return Err(RuntimeError::Image(format!(
                "the model expects {} input channels; only RGB is supported",
                self.in_channels
            )));
        }
        let (th, tw) = self.target_size(rgb.height(), rgb.width())?;
        let resized = if (th, tw) == (rgb.height(), rgb.width()) {
            rgb.clone()
        } else {
            hq_data::transform::pil_resize_bicubic(rgb, tw, th)
        };
        let p = self.cfg.patch_size;
        let m = self.cfg.merge_size;
        let tp = self.cfg.temporal_patch_size;
        let (gh, gw) = (th as usize / p, tw as usize / p);
        let patch_dim = 3 * tp * p * p;
        let mut out = vec![0f32; gh * gw * patch_dim];
        let width = tw as usize;
        let raw = resized.as_raw();
        let mut row = 0usize;
        for bh in 0..gh / m {
            for bw in 0..gw / m {
                for mh in 0..m {
                    for mw in 0..m {
                        let y0 = (bh * m + mh) * p;
                        let x0 = (bw * m + mw) * p;
                        let dst = &mut out[row * patch_dim..(row + 1) * patch_dim];
                        for c in 0..3 {
                            let lut = &self.lut[c];
                            for t in 0..tp {
                                let base = (c * tp + t) * p * p;
                                for py in 0..p {
                                    let src_row = ((y0 + py) * width + x0) * 3;
                                    for px in 0..p {
                                        dst[base + py * p + px] =
                                            lut[raw[src_row + px * 3 + c] as usize];
                                    }
                                }
                            }
                        }
                        row += 1;
                    }
                }
            }
        }
        Ok(PreparedImage {
            pixel_values: out,
            patch_dim,
            grid_thw: [1, gh, gw],
            num_tokens: gh * gw / (m * m),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_resize_matches_the_reference_values() -> Result<()> {
        // Values computed with transformers' smart_resize (factor 28, min 3136, max 12845056).
        assert_eq!(smart_resize(56, 84, 28, 3136, 12_845_056)?, (56, 84));
        // Ties round to even: 42/28 = 1.5 -> 2, 70/28 = 2.5 -> 2.
        assert_eq!(smart_resize(42, 70, 28, 3136, 12_845_056)?, (56, 56));
        // Too small: scaled up with ceil.
        assert_eq!(smart_resize(10, 10, 28, 3136, 12_845_056)?, (56, 56));
        // Too large: scaled down with floor.
        assert_eq!(smart_resize(1000, 2000, 28, 3136, 200_704)?, (308, 616));
        assert!(smart_resize(1, 300, 28, 3136, 200_704).is_err());
        assert!(smart_resize(0, 3, 28, 3136, 200_704).is_err());
        Ok(())
    }
}
