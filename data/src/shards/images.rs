//! Image checks for samples read from shards: a cheap header probe (format and size, with a pixel
//! limit against decompression bombs) and a full decode. Both turn every failure into a reason
//! string for a [`crate::SampleError`], never a panic.

use image::{DynamicImage, ImageFormat, ImageReader, Limits};
use std::io::Cursor;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Default pixel limit: Pillow's `Image.MAX_IMAGE_PIXELS` (about 89.5 megapixels), so a file that
/// PIL would flag as a decompression bomb is rejected here too.
pub const DEFAULT_MAX_PIXELS: u64 = 89_478_485;

/// What the header of an encoded image says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageInfo {
    pub format: ImageFormat,
    pub width: u32,
    pub height: u32,
}

impl ImageInfo {
    pub fn pixels(&self) -> u64 {
        u64::from(self.width) * u64::from(self.height)
    }
}

fn format_name(format: ImageFormat) -> &'static str {
    match format {
        ImageFormat::Jpeg => "JPEG",
        ImageFormat::Png => "PNG",
        ImageFormat::WebP => "WebP",
        ImageFormat::Gif => "GIF",
        ImageFormat::Bmp => "BMP",
        ImageFormat::Tiff => "TIFF",
        _ => "unsupported format",
    }
}

/// Read only the image header: recognise the format from the bytes (not the file extension) and
/// check the dimensions against `max_pixels`. Cheap (no pixel data is decoded), so a reader can run
/// it on every sample; it catches garbage bytes, unsupported formats and decompression bombs, but
/// not damage inside the compressed data (use [`decode_image`] for that).
pub fn probe_image(bytes: &[u8], max_pixels: u64) -> Result<ImageInfo, String> {
    if bytes.is_empty() {
        return Err("image is empty (0 bytes)".into());
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| format!("cannot read image: {e}"))?;
    let format = reader.format().ok_or_else(|| {
        format!(
            "not an image: unrecognised format (first bytes {})",
            hex_prefix(bytes)
        )
    })?;
    if !matches!(
        format,
        ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::WebP
    ) {
        return Err(format!(
            "{} images are not supported (JPEG, PNG and WebP are)",
            format_name(format)
        ));
    }
    let dims = catch_unwind(AssertUnwindSafe(|| reader.into_dimensions()))
        .map_err(|_| format!("{} header: the decoder panicked", format_name(format)))?;
    let (width, height) =
        dims.map_err(|e| format!("cannot read {} header: {e}", format_name(format)))?;
    let info = ImageInfo {
        format,
        width,
        height,
    };
    if width == 0 || height == 0 {
        return Err(format!(
            "{} image has an empty size {width}x{height}",
            format_name(format)
        ));
    }
    if info.pixels() > max_pixels {
        return Err(format!(
            "{} image is {width}x{height} = {} pixels, over the limit of {max_pixels} \
             (possible decompression bomb)",
            format_name(format),
            info.pixels()
        ));
    }
    Ok(info)
}

/// Decode an image fully, after [`probe_image`] has checked its format and pixel count; the decoder
/// also runs under allocation limits sized from the header, so a lying header cannot make it
/// allocate more. A panic inside a decoder is caught and reported as a failure.
pub fn decode_image(bytes: &[u8], max_pixels: u64) -> Result<DynamicImage, String> {
    let info = probe_image(bytes, max_pixels)?;
    let mut reader = ImageReader::with_format(Cursor::new(bytes), info.format);
    let mut limits = Limits::default();
    limits.max_image_width = Some(info.width);
    limits.max_image_height = Some(info.height);
    // 16 bytes a pixel covers RGBA with 32-bit float channels; plus slack for decoder buffers.
    limits.max_alloc = Some(info.pixels().saturating_mul(16).saturating_add(64 << 20));
    reader.limits(limits);
    let decoded = catch_unwind(AssertUnwindSafe(|| reader.decode()))
        .map_err(|_| format!("{} decoder panicked", format_name(info.format)))?;
    decoded.map_err(|e| {
        format!(
            "cannot decode {} image ({}x{}): {e}",
            format_name(info.format),
            info.width,
            info.height
        )
    })
}

/// Decode and validate: `Ok` with the header facts when the whole image decodes within
/// `max_pixels`, otherwise the reason it does not.
pub fn validate_image(bytes: &[u8], max_pixels: u64) -> Result<ImageInfo, String> {
    let img = decode_image(bytes, max_pixels)?;
    let format = probe_image(bytes, max_pixels)?.format;
    Ok(ImageInfo {
        format,
        width: img.width(),
        height: img.height(),
    })
}

fn hex_prefix(bytes: &[u8]) -> String {
    bytes
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageEncoder, RgbImage};

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let mut out = Vec::new();
        image::codecs::png::PngEncoder::new(&mut out)
            .write_image(img.as_raw(), w, h, image::ExtendedColorType::Rgb8)
            .expect("encode png");
        out
    }

    fn jpeg(w: u32, h: u32) -> Vec<u8> {
        let img = RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 99]));
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 85)
            .write_image(img.as_raw(), w, h, image::ExtendedColorType::Rgb8)
            .expect("encode jpeg");
        out
    }

    #[test]
    fn good_images_validate() {
        let info = validate_image(&png(13, 7), DEFAULT_MAX_PIXELS).expect("png");
        assert_eq!(
            (info.format, info.width, info.height),
            (ImageFormat::Png, 13, 7)
        );
        let info = validate_image(&jpeg(32, 16), DEFAULT_MAX_PIXELS).expect("jpeg");
        assert_eq!(
            (info.format, info.width, info.height),
            (ImageFormat::Jpeg, 32, 16)
        );
    }

    #[test]
    fn garbage_and_empty_are_reasons() {
        let e = probe_image(b"definitely not an image", DEFAULT_MAX_PIXELS).expect_err("garbage");
        assert!(e.contains("not an image"), "{e}");
        let e = probe_image(b"", DEFAULT_MAX_PIXELS).expect_err("empty");
        assert!(e.contains("empty"), "{e}");
    }

    #[test]
    fn pixel_limit_rejects_bombs() {
        let e = probe_image(&png(100, 100), 5_000).expect_err("too many pixels");
        assert!(e.contains("decompression bomb"), "{e}");
        // A PNG header claiming 100000 x 100000 with no data behind it.
        let mut bomb = png(1, 1);
        bomb[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        bomb[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        let e = decode_image(&bomb, DEFAULT_MAX_PIXELS).expect_err("bomb");
        assert!(e.contains("limit") || e.contains("header"), "{e}");
    }

    #[test]
    fn truncated_data_fails_decode_not_probe() {
        let noisy = RgbImage::from_fn(128, 128, |x, y| {
            let v = (x.wrapping_mul(2_654_435_761) ^ y.wrapping_mul(40_503)).wrapping_mul(97);
            image::Rgb([v as u8, (v >> 8) as u8, (v >> 16) as u8])
        });
        let mut full = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut full, 90)
            .write_image(noisy.as_raw(), 128, 128, image::ExtendedColorType::Rgb8)
            .expect("encode jpeg");
        let cut = &full[..full.len() * 3 / 4];
        let p = probe_image(cut, DEFAULT_MAX_PIXELS);
        assert!(p.is_ok(), "{p:?} len {}", full.len());
        // zune-jpeg may fill a short scan with grey; either way no panic. A cut inside the
        // header must fail.
        let _ = decode_image(cut, DEFAULT_MAX_PIXELS);
        assert!(decode_image(&full[..40], DEFAULT_MAX_PIXELS).is_err());
    }
}
