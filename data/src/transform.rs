//! Image transforms with open_clip's semantics, on the `image` crate's decoded pixels.
//!
//! - **Train** (`open_clip.image_transform(size, is_train=True)` with the default
//!   `AugmentationCfg`): torchvision's `RandomResizedCrop(size, scale=(0.9, 1.0),
//!   ratio=(3/4, 4/3), interpolation=BICUBIC)`, conversion to RGB, `ToTensor`, `Normalize` with
//!   CLIP's mean and std. The crop parameters follow `RandomResizedCrop.get_params` step for step
//!   (10 attempts, then the centre crop with the aspect ratio clamped); only the random generator
//!   differs (ours is seeded per sample, see `hq_train::data`).
//! - **Eval** (`image_transform(size, is_train=False)`, default `resize_mode="shortest"`):
//!   `Resize(size, BICUBIC)` of the shortest side, `CenterCrop(size)`, RGB, `ToTensor`,
//!   `Normalize`.
//!
//! # Resampling
//! torchvision resizes PIL images with PIL itself, so [`ResizePlan`] reimplements Pillow's
//! `ImagingResample` for 8-bit images (`libImaging/Resample.c` of Pillow 13.0, the version in the
//! reference environment): the bicubic kernel with `a = -0.5` and support 2, widened by the
//! downscale factor (that is PIL's antialiasing); coefficients normalised per output pixel and
//! rounded to 22-bit fixed point; two passes with a **uint8** intermediate image, each rounding
//! with `+ 2^21`, shifting by 22 and clamping to 0..=255 exactly as PIL does. The pass order is
//! Pillow 13's ([`horizontal_first`]: vertical first when the height shrinks by more than twice
//! as many pixels as the width, else horizontal first; the first pass only covers the rows or
//! columns the second reads). A pass whose size does not change is skipped, as in PIL, and a
//! resize to the same size is the identity (torchvision returns the image untouched). The result
//! is PIL's uint8 image bit for bit, and `ToTensor` + `Normalize` is a 256-entry table per channel
//! computed with torch's float32 operations (`v / 255`, `- mean`, `/ std`), so on identical decoded
//! pixels the output equals open_clip's exactly (see `tests/tests/train_data.rs`). Differences can
//! only come from JPEG decoding (the `image` crate's decoder against PIL's libjpeg-turbo).
//!
//! Speed: both passes run as the same line kernel over contiguous memory (the horizontal pass on
//! a transposed copy), whose integer multiply-adds vectorise; on x86-64 the whole resize is
//! compiled a second time for AVX2 and chosen at run time. For the eval transform only the
//! centre-crop window of the resized image is computed (each output pixel depends only on its own
//! coefficients, so this is the same arithmetic), and the last pass writes normalised CHW floats
//! directly.
//!
//! Inputs are converted to RGB before resizing. For RGB and grayscale (PIL `L`) images this is
//! what PIL computes (channels are resampled independently); PIL resizes RGBA images premultiplied
//! and palette images with nearest-neighbour before `convert("RGB")`, which we do not reproduce
//! (web-scale training data is overwhelmingly RGB JPEG).

use image::{DynamicImage, RgbImage};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// OpenAI CLIP's per-channel mean (open_clip `OPENAI_DATASET_MEAN`).
pub const CLIP_MEAN: [f64; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// OpenAI CLIP's per-channel standard deviation (open_clip `OPENAI_DATASET_STD`).
pub const CLIP_STD: [f64; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// open_clip's default `AugmentationCfg.scale`.
pub const DEFAULT_CROP_SCALE: (f64, f64) = (0.9, 1.0);
/// torchvision's default `RandomResizedCrop` ratio (open_clip leaves it unset).
pub const DEFAULT_CROP_RATIO: (f64, f64) = (3.0 / 4.0, 4.0 / 3.0);

/// Pillow's fixed-point precision for 8-bit resampling (`32 - 8 - 2`).
const PRECISION_BITS: u32 = 22;

/// Python's `round()` (half to even) for the non-negative values used here.
fn py_round(x: f64) -> f64 {
    x.round_ties_even()
}

/// `ToTensor` + `Normalize` as a lookup table: `(v as f32 / 255 - mean) / std`, in float32 like
/// torch (so the values are bit-identical to torchvision's).
#[derive(Debug, Clone)]
pub struct Normalizer {
    lut: [[f32; 256]; 3],
}

impl Normalizer {
    pub fn new(mean: [f64; 3], std: [f64; 3]) -> Self {
        let mut lut = [[0f32; 256]; 3];
        for (c, table) in lut.iter_mut().enumerate() {
            let (m, s) = (mean[c] as f32, std[c] as f32);
            for (v, out) in table.iter_mut().enumerate() {
                *out = (v as f32 / 255.0 - m) / s;
            }
        }
        Normalizer { lut }
    }

    /// CLIP's mean and std.
    pub fn clip() -> Self {
        Self::new(CLIP_MEAN, CLIP_STD)
    }

    /// The normalised value of 8-bit value `v` in channel `c`.
    #[inline]
    pub fn value(&self, c: usize, v: u8) -> f32 {
        self.lut[c][v as usize]
    }

    /// Normalise an interleaved RGB8 image (`w * h * 3` bytes) into CHW floats (`3 * h * w`).
    pub fn rgb_to_chw(&self, rgb: &[u8], w: usize, h: usize, out: &mut [f32]) {
        let plane = w * h;
        let (r, rest) = out.split_at_mut(plane);
        let (g, b) = rest.split_at_mut(plane);
        for (i, px) in rgb.chunks_exact(3).take(plane).enumerate() {
            r[i] = self.lut[0][px[0] as usize];
            g[i] = self.lut[1][px[1] as usize];
            b[i] = self.lut[2][px[2] as usize];
        }
    }
}

/// Pillow's bicubic kernel (`a = -0.5`), written in the same operation order as `Resample.c`.
fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Fixed-point resampling coefficients along one axis for a window of output positions.
#[derive(Debug, Clone)]
struct AxisCoeffs {
    /// Most taps of any output position.
    ksize: usize,
    /// Per output position in the window: first input index and tap count.
    bounds: Vec<(usize, usize)>,
    /// `bounds.len() * ksize` coefficients (unused tail entries are 0).
    k: Vec<i32>,
}

impl AxisCoeffs {
    /// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for resizing `in_size` samples
    /// (the box `0..in_size`) to `out_size`, for output positions `first..first + count`.
    fn new(in_size: usize, out_size: usize, first: usize, count: usize) -> Self {
        // `(double)(in1 - in0) / outSize` with in0 = 0 and in1 = in_size as floats.
        let scale = (in_size as f32) as f64 / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = 2.0 * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let mut bounds = Vec::with_capacity(count);
        let mut k = vec![0i32; count * ksize];
        let mut w = vec![0f64; ksize];
        let ss = 1.0 / filterscale;
        for (row, xx) in (first..first + count).enumerate() {
            let center = (xx as f64 + 0.5) * scale;
            // C's (int) cast truncates toward zero; negative values are clamped to 0 anyway.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64).max(0) as usize;
            let n = xmax.saturating_sub(xmin);
            let mut ww = 0.0;
            for (x, wx) in w.iter_mut().enumerate().take(n) {
                let v = bicubic_filter(((x + xmin) as f64 - center + 0.5) * ss);
                *wx = v;
                ww += v;
            }
            let one = (1u32 << PRECISION_BITS) as f64;
            for (x, wx) in w.iter().enumerate().take(n) {
                let v = if ww != 0.0 { wx / ww } else { *wx };
                k[row * ksize + x] = if v < 0.0 {
                    (-0.5 + v * one) as i32
                } else {
                    (0.5 + v * one) as i32
                };
            }
            bounds.push((xmin, n));
        }
        AxisCoeffs { ksize, bounds, k }
    }

    #[inline]
    fn taps(&self, i: usize) -> (usize, &[i32]) {
        let (start, n) = self.bounds[i];
        (start, &self.k[i * self.ksize..i * self.ksize + n])
    }
}

/// Pillow's `clip8`: fixed-point accumulator to a byte.
#[inline]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

const ROUND_HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Pillow's pass order (`ImagingResampleInner`, Pillow 13): the vertical pass runs first when
/// the height shrinks by more than twice as many pixels as the width, otherwise the horizontal
/// pass runs first (older Pillow always ran it first). The order changes the uint8 intermediate,
/// so it matters for bit parity.
pub fn horizontal_first(src_w: usize, src_h: usize, out_w: usize, out_h: usize) -> bool {
    let dy = src_h as i64 - out_h as i64;
    let dx = src_w as i64 - out_w as i64;
    !(dy > 0 && dy > dx * 2)
}

/// One output line: `out[i] = clip8(2^21 + sum_t srcs[t][i] * k[t])`. The accumulators of a
/// block of 32 bytes stay in registers across the taps (vectorises).
#[inline(always)]
fn mac_line(srcs: &[&[u8]], k: &[i32], out: &mut [u8]) {
    const L: usize = 32;
    let len = out.len();
    let full = len / L * L;
    for i in (0..full).step_by(L) {
        let mut acc = [ROUND_HALF; L];
        for (s, &kv) in srcs.iter().zip(k) {
            let s = &s[i..i + L];
            for j in 0..L {
                acc[j] += s[j] as i32 * kv;
            }
        }
        for (o, &a) in out[i..i + L].iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    for (i, o) in out.iter_mut().enumerate().skip(full) {
        let mut a = ROUND_HALF;
        for (s, &kv) in srcs.iter().zip(k) {
            a += s[i] as i32 * kv;
        }
        *o = clip8(a);
    }
}

/// One resampling pass along the slow axis: output line `i` (for `i` in `0..c.bounds.len()`) is
/// the weighted sum of input lines `start..start + n` of `lines(j)` (relative to `base`), rounded
/// and clamped like PIL, handed to `emit(i, line)`. Every line has `len` bytes.
#[inline(always)]
fn line_pass<'a>(
    c: &AxisCoeffs,
    base: usize,
    len: usize,
    lines: impl Fn(usize) -> &'a [u8],
    mut emit: impl FnMut(usize, &[u8]),
) {
    let mut out = vec![0u8; len];
    let mut srcs: Vec<&'a [u8]> = Vec::with_capacity(c.ksize);
    for i in 0..c.bounds.len() {
        let (start, k) = c.taps(i);
        srcs.clear();
        srcs.extend((0..k.len()).map(|t| &lines(start + t - base)[..len]));
        mac_line(&srcs, k, &mut out);
        emit(i, &out);
    }
}

/// Transpose `rows x cols` RGB pixels (`src` rows `stride` bytes apart, starting at `offset`)
/// into `dst` as `cols x rows` pixels (in cache-sized blocks).
#[inline(always)]
fn transpose_rgb(
    src: &[u8],
    offset: usize,
    stride: usize,
    rows: usize,
    cols: usize,
    dst: &mut [u8],
) {
    const B: usize = 32;
    for r0 in (0..rows).step_by(B) {
        let r1 = (r0 + B).min(rows);
        for c0 in (0..cols).step_by(B) {
            let c1 = (c0 + B).min(cols);
            for c in c0..c1 {
                let drow = &mut dst[(c * rows + r0) * 3..(c * rows + r1) * 3];
                let mut s = offset + r0 * stride + c * 3;
                for d in drow.chunks_exact_mut(3) {
                    d.copy_from_slice(&src[s..s + 3]);
                    s += stride;
                }
            }
        }
    }
}

/// The horizontal pass over `rows` rows of the source (`src` rows `stride` bytes apart, the
/// source column `c0` at byte `offset`), producing `rows x c.bounds.len()` pixels in `out`. The
/// rows are transposed first so the pass runs along contiguous memory like the vertical one.
#[inline(always)]
fn horizontal_pass(
    c: &AxisCoeffs,
    c0: usize,
    src: &[u8],
    offset: usize,
    stride: usize,
    rows: usize,
    out: &mut [u8],
) {
    let cols = c.bounds.last().map_or(0, |b| b.0 + b.1).saturating_sub(c0);
    let tl = rows * 3;
    let mut t = vec![0u8; cols * tl];
    transpose_rgb(src, offset, stride, rows, cols, &mut t);
    let ow = c.bounds.len();
    let mut ht = vec![0u8; ow * tl];
    line_pass(
        c,
        c0,
        tl,
        |j| &t[j * tl..(j + 1) * tl],
        |i, line| ht[i * tl..(i + 1) * tl].copy_from_slice(line),
    );
    transpose_rgb(&ht, 0, tl, ow, rows, out);
}

/// A rectangle of an image, in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CropBox {
    pub top: u32,
    pub left: u32,
    pub height: u32,
    pub width: u32,
}

impl CropBox {
    pub fn full(width: u32, height: u32) -> Self {
        CropBox {
            top: 0,
            left: 0,
            height,
            width,
        }
    }
}

/// One PIL bicubic resize of a source region, optionally restricted to a window of the output.
///
/// The source region plays the part of the (cropped) PIL image: filter taps are clamped at its
/// edges, exactly as when PIL resizes the result of `Image.crop`.
#[derive(Debug, Clone, Copy)]
pub struct ResizePlan {
    /// Region of the source image that is resized.
    pub src: CropBox,
    /// Full output size `(width, height)` of the resize.
    pub out_width: u32,
    pub out_height: u32,
    /// Window of the output that is produced (`CropBox::full(out_width, out_height)` for all).
    pub window: CropBox,
}

impl ResizePlan {
    /// Run the resize on interleaved RGB8 `pixels` (`stride` bytes a row) and hand each output
    /// row of the window (interleaved RGB8, `window.width * 3` bytes) to `row_fn(y, row)`.
    fn run_rows(&self, pixels: &[u8], stride: usize, row_fn: impl FnMut(usize, &[u8])) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU supports AVX2 (checked just above).
                unsafe { self.run_rows_avx2(pixels, stride, row_fn) };
                return;
            }
        }
        self.run_rows_impl(pixels, stride, row_fn)
    }

    /// [`Self::run_rows_impl`] compiled for AVX2 (the integer loops run 8 lanes wide).
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn run_rows_avx2(&self, pixels: &[u8], stride: usize, row_fn: impl FnMut(usize, &[u8])) {
        self.run_rows_impl(pixels, stride, row_fn)
    }

    #[inline(always)]
    fn run_rows_impl(&self, pixels: &[u8], stride: usize, mut row_fn: impl FnMut(usize, &[u8])) {
        let (sw, sh) = (self.src.width as usize, self.src.height as usize);
        let (ow, oh) = (self.out_width as usize, self.out_height as usize);
        let win = self.window;
        let (wx0, wy0) = (win.left as usize, win.top as usize);
        let (ww, wh) = (win.width as usize, win.height as usize);
        let (sx0, sy0) = (self.src.left as usize, self.src.top as usize);
        let line = ww * 3;
        // Byte offset of source pixel (x, y) of the region.
        let at = |x: usize, y: usize| (sy0 + y) * stride + (sx0 + x) * 3;
        let horiz = (ow != sw).then(|| AxisCoeffs::new(sw, ow, wx0, ww));
        let vert = (oh != sh).then(|| AxisCoeffs::new(sh, oh, wy0, wh));
        match (&horiz, &vert) {
            (None, None) => {
                for y in 0..wh {
                    let o = at(wx0, wy0 + y);
                    row_fn(y, &pixels[o..o + line]);
                }
            }
            (None, Some(v)) => {
                line_pass(v, 0, line, |y| &pixels[at(wx0, y)..], row_fn);
            }
            (Some(h), None) => {
                let c0 = h.bounds.first().map_or(0, |b| b.0);
                let mut tmp = vec![0u8; wh * line];
                horizontal_pass(h, c0, pixels, at(c0, wy0), stride, wh, &mut tmp);
                for y in 0..wh {
                    row_fn(y, &tmp[y * line..(y + 1) * line]);
                }
            }
            (Some(h), Some(v)) if horizontal_first(sw, sh, ow, oh) => {
                // Source rows the vertical pass reads.
                let r0 = v.bounds.first().map_or(0, |b| b.0);
                let r1 = v.bounds.last().map_or(0, |b| b.0 + b.1);
                let c0 = h.bounds.first().map_or(0, |b| b.0);
                let mut tmp = vec![0u8; (r1 - r0) * line];
                horizontal_pass(h, c0, pixels, at(c0, r0), stride, r1 - r0, &mut tmp);
                line_pass(v, r0, line, |j| &tmp[j * line..], row_fn);
            }
            (Some(h), Some(v)) => {
                // Source columns the horizontal pass reads.
                let c0 = h.bounds.first().map_or(0, |b| b.0);
                let c1 = h.bounds.last().map_or(0, |b| b.0 + b.1);
                let mline = (c1 - c0) * 3;
                let mut mid = vec![0u8; wh * mline];
                line_pass(
                    v,
                    0,
                    mline,
                    |y| &pixels[at(c0, y)..],
                    |i, l| mid[i * mline..(i + 1) * mline].copy_from_slice(l),
                );
                let mut tmp = vec![0u8; wh * line];
                horizontal_pass(h, c0, &mid, 0, mline, wh, &mut tmp);
                for y in 0..wh {
                    row_fn(y, &tmp[y * line..(y + 1) * line]);
                }
            }
        }
    }

    /// The window as an interleaved RGB8 image (what PIL would return after resize + crop).
    pub fn run_rgb8(&self, pixels: &[u8], stride: usize) -> Vec<u8> {
        let line = self.window.width as usize * 3;
        let mut out = vec![0u8; line * self.window.height as usize];
        self.run_rows(pixels, stride, |y, row| {
            out[y * line..(y + 1) * line].copy_from_slice(row)
        });
        out
    }

    /// The window normalised into CHW floats (`3 * window.height * window.width` values).
    pub fn run_normalized(&self, pixels: &[u8], stride: usize, norm: &Normalizer, out: &mut [f32]) {
        let (w, h) = (self.window.width as usize, self.window.height as usize);
        let plane = w * h;
        let out = &mut out[..3 * plane];
        self.run_rows(pixels, stride, |y, row| {
            for (c, lut) in norm.lut.iter().enumerate() {
                let dst = &mut out[c * plane + y * w..c * plane + (y + 1) * w];
                for (d, px) in dst.iter_mut().zip(row.chunks_exact(3)) {
                    *d = lut[px[c] as usize];
                }
            }
        });
    }
}

/// PIL's `Image.resize((out_width, out_height), Image.BICUBIC)` of an RGB image.
pub fn pil_resize_bicubic(img: &RgbImage, out_width: u32, out_height: u32) -> RgbImage {
    let plan = ResizePlan {
        src: CropBox::full(img.width(), img.height()),
        out_width,
        out_height,
        window: CropBox::full(out_width, out_height),
    };
    let data = plan.run_rgb8(img.as_raw(), img.width() as usize * 3);
    RgbImage::from_raw(out_width, out_height, data).unwrap_or_default()
}

/// torchvision's `Resize(size)` (int size: shortest side) output size `(width, height)`.
pub fn shortest_side_size(width: u32, height: u32, size: u32) -> (u32, u32) {
    let (short, long) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    // Python: int(size * long / short) (exact integer product, correctly rounded division).
    let new_long = ((size as f64 * long as f64) / short as f64) as u32;
    if width <= height {
        (size, new_long)
    } else {
        (new_long, size)
    }
}

/// torchvision's `CenterCrop` offsets `(top, left)` for an image at least the crop size.
pub fn center_crop_offsets(width: u32, height: u32, crop_w: u32, crop_h: u32) -> (u32, u32) {
    let top = py_round((height.saturating_sub(crop_h)) as f64 / 2.0) as u32;
    let left = py_round((width.saturating_sub(crop_w)) as f64 / 2.0) as u32;
    (top, left)
}

/// What `RandomResizedCrop.get_params` returned, and whether it came from the fallback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CropDraw {
    pub crop: CropBox,
    /// No attempt succeeded: the centre crop with the ratio clamped to `ratio`.
    pub fallback: bool,
    /// Attempts used (1..=10; 10 also on fallback).
    pub attempts: u32,
}

/// torchvision's `RandomResizedCrop.get_params(img, scale, ratio)` for an image of
/// `width x height`: up to 10 attempts of (area fraction ~ U(scale), log aspect ~ U(log ratio)),
/// `w = round(sqrt(area * aspect))`, `h = round(sqrt(area / aspect))` (Python rounding), accepted
/// when `0 < w <= width` and `0 < h <= height`, then `top ~ U{0..height-h}`,
/// `left ~ U{0..width-w}`; else the centre crop of the whole image with its aspect ratio clamped
/// to `ratio`.
pub fn random_resized_crop_params<R: Rng + ?Sized>(
    width: u32,
    height: u32,
    scale: (f64, f64),
    ratio: (f64, f64),
    rng: &mut R,
) -> CropDraw {
    let area = width as f64 * height as f64;
    let (log_lo, log_hi) = (ratio.0.ln(), ratio.1.ln());
    for attempt in 1..=10u32 {
        let target_area = area * uniform(rng, scale.0, scale.1);
        let aspect = uniform(rng, log_lo, log_hi).exp();
        let w = py_round((target_area * aspect).sqrt());
        let h = py_round((target_area / aspect).sqrt());
        if w > 0.0 && w <= width as f64 && h > 0.0 && h <= height as f64 {
            let (w, h) = (w as u32, h as u32);
            let top = rng.gen_range(0..=height - h);
            let left = rng.gen_range(0..=width - w);
            return CropDraw {
                crop: CropBox {
                    top,
                    left,
                    height: h,
                    width: w,
                },
                fallback: false,
                attempts: attempt,
            };
        }
    }
    let in_ratio = width as f64 / height as f64;
    let (lo, hi) = (ratio.0.min(ratio.1), ratio.0.max(ratio.1));
    let (w, h) = if in_ratio < lo {
        (width, (py_round(width as f64 / lo) as u32).clamp(1, height))
    } else if in_ratio > hi {
        (
            (py_round(height as f64 * hi) as u32).clamp(1, width),
            height,
        )
    } else {
        (width, height)
    };
    CropDraw {
        crop: CropBox {
            top: (height - h) / 2,
            left: (width - w) / 2,
            height: h,
            width: w,
        },
        fallback: true,
        attempts: 10,
    }
}

/// A uniform draw in `[lo, hi)` (torch's `uniform_`).
fn uniform<R: Rng + ?Sized>(rng: &mut R, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.gen::<f64>()
}

/// Which of open_clip's two transforms.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransformKind {
    /// `RandomResizedCrop(scale, ratio)` (bicubic) + normalise.
    Train {
        scale: (f64, f64),
        ratio: (f64, f64),
    },
    /// Shortest-side bicubic resize + centre crop + normalise.
    Eval,
    /// Bicubic resize of both sides to the output size, no crop (open_clip's
    /// `resize_mode="squash"`, CLIPA's eval transform) + normalise.
    EvalSquash,
}

/// A checkpoint's own preprocessing (open_clip's `preprocess_cfg` in `open_clip_config.json`):
/// normalisation and the eval resize. The train transform is `RandomResizedCrop` whatever the
/// resize mode, as in open_clip.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Preprocess {
    pub mean: [f64; 3],
    pub std: [f64; 3],
    /// `resize_mode="squash"` (else `"shortest"`).
    pub squash: bool,
}

impl Default for Preprocess {
    fn default() -> Self {
        Preprocess {
            mean: CLIP_MEAN,
            std: CLIP_STD,
            squash: false,
        }
    }
}

impl Preprocess {
    /// Reads open_clip's `preprocess_cfg` object. Keys we do not reproduce are refused rather than
    /// silently evaluated differently: an interpolation other than bicubic, `resize_mode
    /// "longest"`.
    pub fn from_open_clip(cfg: &serde_json::Value) -> Result<Self, String> {
        let mut p = Preprocess::default();
        let three = |key: &str| -> Result<Option<[f64; 3]>, String> {
            match cfg.get(key) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(v) => {
                    let xs: Vec<f64> = v
                        .as_array()
                        .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
                        .unwrap_or_default();
                    match xs[..] {
                        [a, b, c] => Ok(Some([a, b, c])),
                        [a] => Ok(Some([a, a, a])),
                        _ => Err(format!("preprocess_cfg.{key} must be 1 or 3 numbers: {v}")),
                    }
                }
            }
        };
        if let Some(m) = three("mean")? {
            p.mean = m;
        }
        if let Some(s) = three("std")? {
            if s.iter().any(|&x| x <= 0.0) {
                return Err(format!("preprocess_cfg.std must be positive: {s:?}"));
            }
            p.std = s;
        }
        match cfg.get("interpolation").and_then(|v| v.as_str()) {
            None | Some("bicubic") => {}
            Some(other) => {
                return Err(format!(
                    "preprocess_cfg.interpolation {other:?} is not supported (only bicubic, \
                     open_clip's default, is reproduced bit for bit)"
                ))
            }
        }
        match cfg.get("resize_mode").and_then(|v| v.as_str()) {
            None | Some("shortest") => {}
            Some("squash") => p.squash = true,
            Some(other) => {
                return Err(format!(
                    "preprocess_cfg.resize_mode {other:?} is not supported (shortest, squash)"
                ))
            }
        }
        Ok(p)
    }

    /// open_clip's `preprocess_cfg` object for these settings (what
    /// [`from_open_clip`](Self::from_open_clip) reads back).
    pub fn to_open_clip(&self) -> serde_json::Value {
        serde_json::json!({
            "mean": self.mean,
            "std": self.std,
            "interpolation": "bicubic",
            "resize_mode": if self.squash { "squash" } else { "shortest" },
        })
    }

    /// The eval transform at `size x size`.
    pub fn eval_transform(&self, size: u32) -> ImageTransform {
        let mut t = ImageTransform::eval(size);
        if self.squash {
            t.kind = TransformKind::EvalSquash;
        }
        t.with_normalization(self.mean, self.std)
    }
}

/// open_clip's image transform producing normalised CHW float32 pixels.
#[derive(Debug, Clone)]
pub struct ImageTransform {
    kind: TransformKind,
    height: u32,
    width: u32,
    norm: Normalizer,
}

impl ImageTransform {
    /// A transform to `height x width` outputs. The eval transform needs a square size (open_clip
    /// uses `ResizeKeepRatio` otherwise, which is not implemented).
    pub fn new(kind: TransformKind, height: u32, width: u32) -> Result<Self, String> {
        if height == 0 || width == 0 {
            return Err(format!("image size {height}x{width} is empty"));
        }
        if let TransformKind::Train { scale, ratio } = kind {
            if !(scale.0 > 0.0 && scale.0 <= scale.1 && scale.1.is_finite()) {
                return Err(format!("crop scale {scale:?} must satisfy 0 < min <= max"));
            }
            if !(ratio.0 > 0.0 && ratio.0 <= ratio.1 && ratio.1.is_finite()) {
                return Err(format!("crop ratio {ratio:?} must satisfy 0 < min <= max"));
            }
        }
        if matches!(kind, TransformKind::Eval | TransformKind::EvalSquash) && height != width {
            return Err(format!(
                "the eval transform needs a square image size, not {height}x{width}"
            ));
        }
        Ok(ImageTransform {
            kind,
            height,
            width,
            norm: Normalizer::clip(),
        })
    }

    /// open_clip's train transform at `size x size` with the default augmentation settings.
    pub fn train(size: u32) -> Self {
        ImageTransform {
            kind: TransformKind::Train {
                scale: DEFAULT_CROP_SCALE,
                ratio: DEFAULT_CROP_RATIO,
            },
            height: size.max(1),
            width: size.max(1),
            norm: Normalizer::clip(),
        }
    }

    /// open_clip's eval transform at `size x size`.
    pub fn eval(size: u32) -> Self {
        ImageTransform {
            kind: TransformKind::Eval,
            height: size.max(1),
            width: size.max(1),
            norm: Normalizer::clip(),
        }
    }

    /// The same transform normalising with `mean` and `std` instead of CLIP's.
    pub fn with_normalization(mut self, mean: [f64; 3], std: [f64; 3]) -> Self {
        self.norm = Normalizer::new(mean, std);
        self
    }

    pub fn kind(&self) -> TransformKind {
        self.kind
    }

    /// Output `(height, width)`.
    pub fn size(&self) -> (u32, u32) {
        (self.height, self.width)
    }

    /// Floats per output image: `3 * height * width`.
    pub fn output_len(&self) -> usize {
        3 * self.height as usize * self.width as usize
    }

    /// The resize this transform applies to a `width x height` image (drawing the random crop for
    /// the train transform).
    pub fn plan<R: Rng + ?Sized>(&self, width: u32, height: u32, rng: &mut R) -> ResizePlan {
        match self.kind {
            TransformKind::Train { scale, ratio } => {
                let draw = random_resized_crop_params(width, height, scale, ratio, rng);
                ResizePlan {
                    src: draw.crop,
                    out_width: self.width,
                    out_height: self.height,
                    window: CropBox::full(self.width, self.height),
                }
            }
            TransformKind::EvalSquash => ResizePlan {
                src: CropBox::full(width, height),
                out_width: self.width,
                out_height: self.height,
                window: CropBox::full(self.width, self.height),
            },
            TransformKind::Eval => {
                let size = self.width;
                let (rw, rh) = shortest_side_size(width, height, size);
                let (top, left) = center_crop_offsets(rw, rh, size, size);
                ResizePlan {
                    src: CropBox::full(width, height),
                    out_width: rw,
                    out_height: rh,
                    window: CropBox {
                        top,
                        left,
                        height: size,
                        width: size,
                    },
                }
            }
        }
    }

    /// Transform an RGB image into `out` (`output_len()` floats, CHW).
    pub fn apply_rgb_into<R: Rng + ?Sized>(&self, img: &RgbImage, rng: &mut R, out: &mut [f32]) {
        let plan = self.plan(img.width(), img.height(), rng);
        plan.run_normalized(img.as_raw(), img.width() as usize * 3, &self.norm, out);
    }

    /// Transform any decoded image (converted to RGB first).
    pub fn apply<R: Rng + ?Sized>(&self, img: &DynamicImage, rng: &mut R) -> Vec<f32> {
        let mut out = vec![0f32; self.output_len()];
        match img {
            DynamicImage::ImageRgb8(rgb) => self.apply_rgb_into(rgb, rng, &mut out),
            other => self.apply_rgb_into(&other.to_rgb8(), rng, &mut out),
        }
        out
    }

    /// Decode encoded image bytes (JPEG, PNG or WebP, at most `max_pixels`; see
    /// [`crate::shards::decode_image`]) and transform them. The error is a reason string.
    pub fn decode_apply<R: Rng + ?Sized>(
        &self,
        bytes: &[u8],
        max_pixels: u64,
        rng: &mut R,
    ) -> Result<Vec<f32>, String> {
        let img = crate::shards::decode_image(bytes, max_pixels)?;
        let rgb = match img {
            DynamicImage::ImageRgb8(rgb) => rgb,
            other => other.to_rgb8(),
        };
        let mut out = vec![0f32; self.output_len()];
        self.apply_rgb_into(&rgb, rng, &mut out);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn kernel_weights_sum_to_one_in_fixed_point() {
        for (i, o) in [(64, 64), (61, 64), (256, 224), (1000, 77), (3, 200)] {
            let c = AxisCoeffs::new(i, o, 0, o);
            for xx in 0..o {
                let (_, k) = c.taps(xx);
                let s: i64 = k.iter().map(|&v| v as i64).sum();
                assert!(
                    (s - (1 << 22)).abs() <= k.len() as i64,
                    "{i}->{o} at {xx}: {s}"
                );
            }
        }
    }

    #[test]
    fn same_size_resize_is_identity() {
        let img = RgbImage::from_fn(13, 9, |x, y| image::Rgb([x as u8 * 7, y as u8 * 11, 5]));
        assert_eq!(pil_resize_bicubic(&img, 13, 9), img);
    }

    #[test]
    fn dispatched_and_generic_kernels_agree() {
        let img = RgbImage::from_fn(97, 61, |x, y| {
            let v = x.wrapping_mul(2_654_435_761) ^ y.wrapping_mul(40_503).wrapping_mul(97);
            image::Rgb([v as u8, (v >> 8) as u8, (v >> 16) as u8])
        });
        for (src, ow, oh, window) in [
            (CropBox::full(97, 61), 224, 140, CropBox::full(224, 140)),
            (CropBox::full(97, 61), 30, 13, CropBox::full(30, 13)),
            (
                CropBox::full(97, 61),
                64,
                128,
                CropBox {
                    top: 10,
                    left: 3,
                    height: 64,
                    width: 50,
                },
            ),
            (
                CropBox {
                    top: 5,
                    left: 7,
                    height: 50,
                    width: 80,
                },
                64,
                64,
                CropBox::full(64, 64),
            ),
            (
                CropBox {
                    top: 5,
                    left: 7,
                    height: 50,
                    width: 40,
                },
                44,
                20,
                CropBox::full(44, 20),
            ),
        ] {
            let plan = ResizePlan {
                src,
                out_width: ow,
                out_height: oh,
                window,
            };
            let line = window.width as usize * 3;
            let mut generic = vec![0u8; line * window.height as usize];
            plan.run_rows_impl(img.as_raw(), 97 * 3, |y, row| {
                generic[y * line..(y + 1) * line].copy_from_slice(row)
            });
            assert_eq!(plan.run_rgb8(img.as_raw(), 97 * 3), generic, "{plan:?}");
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        let img = RgbImage::from_pixel(37, 23, image::Rgb([200, 3, 128]));
        let out = pil_resize_bicubic(&img, 64, 11);
        assert!(out.pixels().all(|p| p.0 == [200, 3, 128]));
    }

    #[test]
    fn eval_geometry_matches_torchvision() {
        assert_eq!(shortest_side_size(100, 50, 64), (128, 64));
        assert_eq!(shortest_side_size(50, 100, 64), (64, 128));
        assert_eq!(shortest_side_size(37, 91, 224), (224, 550));
        // round((65 - 64) / 2) == 0 and round((67 - 64) / 2) == 2 in Python.
        assert_eq!(center_crop_offsets(65, 64, 64, 64), (0, 0));
        assert_eq!(center_crop_offsets(67, 64, 64, 64), (0, 2));
    }

    #[test]
    fn crop_params_are_in_range() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        for &(w, h) in &[
            (64, 64),
            (256, 256),
            (300, 100),
            (100, 300),
            (1, 1),
            (2, 97),
        ] {
            for _ in 0..500 {
                let d = random_resized_crop_params(w, h, (0.9, 1.0), DEFAULT_CROP_RATIO, &mut rng);
                let c = d.crop;
                assert!(c.width >= 1 && c.height >= 1);
                assert!(
                    c.left + c.width <= w && c.top + c.height <= h,
                    "{c:?} in {w}x{h}"
                );
            }
        }
    }
}
