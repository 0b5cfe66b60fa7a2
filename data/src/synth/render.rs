//! Rasteriser: a [`Scene`] to RGB pixels, and the pixels to JPEG or PNG bytes.
//!
//! Every shape is a signed distance function in the object's own units (its radius is 1); a pixel's
//! coverage is `clamp(0.5 - distance_in_pixels, 0, 1)`, which anti-aliases edges at the cost of one
//! distance evaluation per pixel of the object's bounding box. Rendering is a pure function of the
//! scene and the image side, so images are identical on every machine and thread count.

use super::scene::{Background, Object, Pattern, Scene, Shape, Texture};
use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{ExtendedColorType, ImageEncoder};

/// Encoded image format of the corpus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Jpg,
    Png,
}

impl ImageFormat {
    pub fn ext(self) -> &'static str {
        match self {
            ImageFormat::Jpg => "jpg",
            ImageFormat::Png => "png",
        }
    }
}

impl std::str::FromStr for ImageFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "jpg" | "jpeg" => Ok(ImageFormat::Jpg),
            "png" => Ok(ImageFormat::Png),
            other => Err(format!(
                "unknown image format {other:?} (expected jpg or png)"
            )),
        }
    }
}

/// Packed RGB pixels, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Canvas {
    pub side: u32,
    pub pixels: Vec<u8>,
}

/// Render `scene` on a `side` x `side` canvas.
pub fn render(scene: &Scene, side: u32) -> Canvas {
    let mut canvas = Canvas {
        side,
        pixels: vec![0; (side * side * 3) as usize],
    };
    draw_background(&mut canvas, &scene.background);
    for o in &scene.objects {
        draw_object(&mut canvas, o);
    }
    canvas
}

/// Encode as JPEG (`quality` 1-100, this module's own fast baseline encoder, see [`super::jpeg`])
/// or PNG (the `image` crate, fast compression). Both are deterministic.
pub fn encode(
    canvas: &Canvas,
    format: ImageFormat,
    quality: u8,
) -> Result<Vec<u8>, image::ImageError> {
    let mut out = Vec::with_capacity(canvas.pixels.len() / 2 + 1024);
    match format {
        ImageFormat::Jpg => {
            out = super::jpeg::encode_rgb(&canvas.pixels, canvas.side, canvas.side, quality);
        }
        ImageFormat::Png => {
            PngEncoder::new_with_quality(&mut out, CompressionType::Fast, FilterType::Adaptive)
                .write_image(
                    &canvas.pixels,
                    canvas.side,
                    canvas.side,
                    ExtendedColorType::Rgb8,
                )?;
        }
    }
    Ok(out)
}

fn draw_background(c: &mut Canvas, bg: &Background) {
    let side = c.side as f32;
    let base = bg.colors[0].rgb();
    let second = bg.colors.get(1).map(|c| c.rgb()).unwrap_or(base);
    let period_px = (bg.period * side).max(4.0);
    let n = c.side as usize;
    // Coverage of the second colour along one axis, per pixel centre.
    let axis = |f: &dyn Fn(f32) -> f32| -> Vec<f32> { (0..n).map(|i| f(i as f32 + 0.5)).collect() };
    // Stripes: signed distance (pixels) to the second colour's half-period band, as coverage.
    let stripe = |u: f32| {
        let ph = fract_pos(u / period_px + 0.75) - 0.5;
        let d = ph.abs() * period_px - period_px / 4.0;
        (0.5 - d).clamp(0.0, 1.0)
    };
    let mut put_row = |yi: usize, t_of: &dyn Fn(usize) -> f32| {
        let row = &mut c.pixels[yi * n * 3..(yi + 1) * n * 3];
        for (xi, px) in row.chunks_exact_mut(3).enumerate() {
            let t = t_of(xi);
            let col = if t <= 0.0 {
                base
            } else if t >= 1.0 {
                second
            } else {
                [
                    mix(base[0], second[0], t),
                    mix(base[1], second[1], t),
                    mix(base[2], second[2], t),
                ]
            };
            px.copy_from_slice(&col);
        }
    };
    match (bg.pattern, bg.orientation) {
        (Pattern::Plain, _) => (0..n).for_each(|yi| put_row(yi, &|_| 0.0)),
        (Pattern::Striped, 0) => {
            let rows = axis(&stripe);
            (0..n).for_each(|yi| put_row(yi, &|_| rows[yi]));
        }
        (Pattern::Striped, 1) => {
            let cols = axis(&stripe);
            (0..n).for_each(|yi| put_row(yi, &|xi| cols[xi]));
        }
        (Pattern::Striped, _) => {
            let k = std::f32::consts::FRAC_1_SQRT_2;
            (0..n).for_each(|yi| {
                let y = yi as f32 + 0.5;
                put_row(yi, &|xi| stripe((xi as f32 + 0.5 + y) * k));
            });
        }
        (Pattern::Checkered, _) => {
            let cell: Vec<usize> = (0..n)
                .map(|i| ((i as f32 + 0.5) / period_px) as usize)
                .collect();
            (0..n).for_each(|yi| {
                put_row(yi, &|xi| ((cell[xi] + cell[yi]) % 2) as f32);
            });
        }
        (Pattern::Dotted, _) => {
            let off = axis(&|u| fract_pos(u / period_px) - 0.5);
            (0..n).for_each(|yi| {
                let fy = off[yi];
                put_row(yi, &|xi| {
                    let fx = off[xi];
                    let d = ((fx * fx + fy * fy).sqrt() - 0.22) * period_px;
                    (0.5 - d).clamp(0.0, 1.0)
                });
            });
        }
    }
}

/// Blend `a` towards `b` by `t` in [0, 1], rounded (no libm call: this runs for every pixel).
#[inline]
fn mix(a: u8, b: u8, t: f32) -> u8 {
    if t <= 0.0 {
        a
    } else if t >= 1.0 {
        b
    } else {
        (a as f32 + (b as f32 - a as f32) * t + 0.5) as u8
    }
}

/// Fractional part of a non-negative number (truncation is floor there; no libm call).
#[inline]
fn fract_pos(x: f32) -> f32 {
    x - (x as i32) as f32
}

fn draw_object(c: &mut Canvas, o: &Object) {
    let side = c.side as f32;
    let r_px = o.r * side;
    if r_px <= 0.0 {
        return;
    }
    let (cx, cy) = (o.x * side, o.y * side);
    let x0 = ((cx - r_px - 1.0).floor().max(0.0)) as usize;
    let y0 = ((cy - r_px - 1.0).floor().max(0.0)) as usize;
    let x1 = ((cx + r_px + 1.0).ceil().min(side)) as usize;
    let y1 = ((cy + r_px + 1.0).ceil().min(side)) as usize;
    let base = o.color.rgb();
    let dark = base.map(|v| (v as f32 * 0.5) as u8);
    let n = c.side as usize;
    // Texture period in object units, at least 4 pixels.
    let period = (0.55f32).max(4.0 / r_px);
    for yi in y0..y1 {
        for xi in x0..x1 {
            let px = (xi as f32 + 0.5 - cx) / r_px;
            let py = (yi as f32 + 0.5 - cy) / r_px;
            let d = sdf(o.shape, px, py) * r_px;
            let a = (0.5 - d).clamp(0.0, 1.0);
            if a <= 0.0 {
                continue;
            }
            let colour = match o.texture {
                Texture::Solid => base,
                Texture::Striped => {
                    if fract_pos((px - py) / period + 64.0) < 0.5 {
                        dark
                    } else {
                        base
                    }
                }
                Texture::Dotted => {
                    let fx = fract_pos(px / period + 64.0) - 0.5;
                    let fy = fract_pos(py / period + 64.0) - 0.5;
                    if fx * fx + fy * fy < 0.25 * 0.25 {
                        dark
                    } else {
                        base
                    }
                }
            };
            let i = (yi * n + xi) * 3;
            for (dst, src) in c.pixels[i..i + 3].iter_mut().zip(colour) {
                *dst = mix(*dst, src, a);
            }
        }
    }
}

/// Signed distance (object units, negative inside) of point `(x, y)` (y down) to `shape`.
pub fn sdf(shape: Shape, x: f32, y: f32) -> f32 {
    match shape {
        Shape::Circle => len(x, y) - 0.95,
        Shape::Square => sd_box(x, y, 0.78, 0.78),
        Shape::Diamond => (x.abs() + y.abs() - 1.0) * std::f32::consts::FRAC_1_SQRT_2,
        Shape::Cross => sd_box(x, y, 0.95, 0.32).min(sd_box(x, y, 0.32, 0.95)),
        Shape::Ring => (len(x, y) - 0.7).abs() - 0.27,
        Shape::Triangle => sd_triangle(x, -y),
        Shape::Star => sd_star5(x, -y, 1.0, 0.45),
        Shape::Hexagon => sd_hexagon(x, y, 0.85),
    }
}

#[inline]
fn len(x: f32, y: f32) -> f32 {
    (x * x + y * y).sqrt()
}

fn sd_box(x: f32, y: f32, bx: f32, by: f32) -> f32 {
    let (dx, dy) = (x.abs() - bx, y.abs() - by);
    len(dx.max(0.0), dy.max(0.0)) + dx.max(dy).min(0.0)
}

/// Upright equilateral triangle (y up) centred in its box, circumradius about 1.
fn sd_triangle(x: f32, y: f32) -> f32 {
    const K: f32 = 1.732_050_8;
    let r = 0.95;
    // Shift so the triangle's box (height 1.5 r / (sqrt 3 / 2)) is centred.
    let y = y + 0.25;
    let mut px = x.abs() - r;
    let mut py = y + r / K;
    if px + K * py > 0.0 {
        let (nx, ny) = ((px - K * py) / 2.0, (-K * px - py) / 2.0);
        px = nx;
        py = ny;
    }
    px -= px.clamp(-2.0 * r, 0.0);
    -len(px, py) * py.signum()
}

/// Five-pointed star (y up), outer radius `r`, inner ratio `rf`.
fn sd_star5(x: f32, y: f32, r: f32, rf: f32) -> f32 {
    const K1: (f32, f32) = (0.809_017, -0.587_785_24);
    const K2: (f32, f32) = (-0.809_017, -0.587_785_24);
    let (mut px, mut py) = (x.abs(), y);
    let d1 = 2.0 * (K1.0 * px + K1.1 * py).max(0.0);
    px -= d1 * K1.0;
    py -= d1 * K1.1;
    let d2 = 2.0 * (K2.0 * px + K2.1 * py).max(0.0);
    px -= d2 * K2.0;
    py -= d2 * K2.1;
    px = px.abs();
    py -= r;
    let (bax, bay) = (rf * -K1.1, rf * K1.0 - 1.0);
    let h = ((px * bax + py * bay) / (bax * bax + bay * bay)).clamp(0.0, r);
    len(px - bax * h, py - bay * h) * (py * bax - px * bay).signum()
}

/// Regular hexagon with flat top and bottom, inradius `r`.
fn sd_hexagon(x: f32, y: f32, r: f32) -> f32 {
    const K: (f32, f32, f32) = (-0.866_025_4, 0.5, 0.577_350_26);
    let (mut px, mut py) = (y.abs(), x.abs());
    let d = 2.0 * (K.0 * px + K.1 * py).min(0.0);
    px -= d * K.0;
    py -= d * K.1;
    px -= px.clamp(-K.2 * r, K.2 * r);
    py -= r;
    len(px, py) * py.signum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::scene::{BgColor, Color, Group, Size};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn shapes_contain_centre_and_exclude_corners() {
        for s in Shape::ALL {
            let centre = sdf(*s, 0.0, 0.0);
            if *s == Shape::Ring {
                assert!(centre > 0.0, "ring has a hole");
                assert!(sdf(*s, 0.7, 0.0) < 0.0);
            } else {
                assert!(centre < 0.0, "{s} contains its centre");
            }
            for (x, y) in [(1.05, 1.05), (-1.05, 1.05), (1.05, -1.05), (-1.05, -1.05)] {
                assert!(sdf(*s, x, y) > 0.0, "{s} stays inside its box");
            }
        }
        // Orientation: the triangle and star point up (y down means negative y is up).
        assert!(sdf(Shape::Triangle, 0.0, -0.6) < 0.0);
        assert!(sdf(Shape::Triangle, 0.0, 0.9) > 0.0);
        assert!(sdf(Shape::Star, 0.0, -0.9) < 0.0);
        assert!(sdf(Shape::Star, 0.0, 0.9) > 0.0);
    }

    #[test]
    fn shapes_are_distinguishable_on_the_grid() {
        // Rasterise every shape at 32 px and check no two masks are nearly equal.
        let masks: Vec<Vec<bool>> = Shape::ALL
            .iter()
            .map(|s| {
                (0..32 * 32)
                    .map(|i| {
                        let (x, y) = ((i % 32) as f32, (i / 32) as f32);
                        sdf(*s, (x + 0.5 - 16.0) / 16.0, (y + 0.5 - 16.0) / 16.0) < 0.0
                    })
                    .collect()
            })
            .collect();
        for i in 0..masks.len() {
            for j in i + 1..masks.len() {
                let diff = masks[i]
                    .iter()
                    .zip(&masks[j])
                    .filter(|(a, b)| a != b)
                    .count();
                assert!(
                    diff > 60,
                    "{} vs {}: {diff} pixels differ",
                    Shape::ALL[i],
                    Shape::ALL[j]
                );
            }
        }
    }

    #[test]
    fn render_is_deterministic_and_draws_the_object() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let g = Group {
            shape: Shape::Square,
            color: Color::Red,
            size: Size::Large,
            texture: Texture::Solid,
            count: 1,
        };
        let scene = Scene::layout(&mut rng, Background::plain(BgColor::White), vec![g], None);
        let a = render(&scene, 64);
        assert_eq!(a, render(&scene, 64));
        let o = scene.objects[0];
        let (cx, cy) = ((o.x * 64.0) as usize, (o.y * 64.0) as usize);
        let i = (cy * 64 + cx) * 3;
        assert_eq!(&a.pixels[i..i + 3], &Color::Red.rgb());
        assert_eq!(&a.pixels[0..3], &BgColor::White.rgb());
        for f in [ImageFormat::Jpg, ImageFormat::Png] {
            let bytes = encode(&a, f, 90).expect("encode");
            let img = image::load_from_memory(&bytes).expect("decode").to_rgb8();
            assert_eq!(img.dimensions(), (64, 64));
            if f == ImageFormat::Png {
                assert_eq!(img.into_raw(), a.pixels);
            }
        }
    }
}
