//! Web-like raw alt-text: what an image's alt attribute says in the wild. Each text has a kind,
//! drawn with configurable probabilities and recorded in the sample's metadata:
//! - `faithful`: a short, true summary of the whole scene;
//! - `partial`: true but incomplete (one object, or only its shape or colour);
//! - `boilerplate`: no content at all (`IMG_2931.jpg`, `stock photo`, `click to enlarge`);
//! - `wrong`: mentions an object with the wrong colour or shape;
//! - `unrelated`: product or SEO text about something else.
//!
//! Faithful, partial and wrong texts are sometimes *decorated* with boilerplate (`red circle icon
//! vector illustration`, `IMG_0042.jpg - blue star`), and casing varies as it does on the web.

use super::captions::{number_word, tag_holds};
use super::scene::{Color, Scene, Shape};
use rand::seq::SliceRandom;
use rand::Rng;
use serde::{Deserialize, Serialize};

/// What a raw alt-text is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawKind {
    Faithful,
    Partial,
    Boilerplate,
    Wrong,
    Unrelated,
}

impl RawKind {
    pub const ALL: [RawKind; 5] = [
        RawKind::Faithful,
        RawKind::Partial,
        RawKind::Boilerplate,
        RawKind::Wrong,
        RawKind::Unrelated,
    ];

    pub fn name(self) -> &'static str {
        match self {
            RawKind::Faithful => "faithful",
            RawKind::Partial => "partial",
            RawKind::Boilerplate => "boilerplate",
            RawKind::Wrong => "wrong",
            RawKind::Unrelated => "unrelated",
        }
    }

    pub fn from_name(s: &str) -> Option<RawKind> {
        RawKind::ALL.iter().copied().find(|k| k.name() == s)
    }
}

/// Probabilities of the raw-text kinds (normalised when used) and of decorating a text with
/// boilerplate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RawTextMix {
    pub faithful: f64,
    pub partial: f64,
    pub boilerplate: f64,
    pub wrong: f64,
    pub unrelated: f64,
    pub decorate: f64,
}

impl Default for RawTextMix {
    fn default() -> Self {
        RawTextMix {
            faithful: 0.2,
            partial: 0.35,
            boilerplate: 0.15,
            wrong: 0.15,
            unrelated: 0.15,
            decorate: 0.3,
        }
    }
}

impl RawTextMix {
    /// Checks that the weights are finite, non-negative and not all zero.
    pub fn validate(&self) -> Result<(), String> {
        let w = self.weights();
        if w.iter().any(|x| !x.is_finite() || *x < 0.0) {
            return Err(format!(
                "raw-text probabilities must be finite and >= 0: {self:?}"
            ));
        }
        if w.iter().sum::<f64>() <= 0.0 {
            return Err("raw-text probabilities are all zero".into());
        }
        if !(0.0..=1.0).contains(&self.decorate) {
            return Err(format!(
                "decoration probability {} is not in [0, 1]",
                self.decorate
            ));
        }
        Ok(())
    }

    fn weights(&self) -> [f64; 5] {
        [
            self.faithful,
            self.partial,
            self.boilerplate,
            self.wrong,
            self.unrelated,
        ]
    }

    /// The kinds' probabilities after normalisation, in [`RawKind::ALL`] order.
    pub fn normalised(&self) -> [f64; 5] {
        let w = self.weights();
        let s: f64 = w.iter().sum();
        if s > 0.0 {
            w.map(|x| x / s)
        } else {
            [0.2; 5]
        }
    }

    fn draw<R: Rng + ?Sized>(&self, rng: &mut R) -> RawKind {
        let p = self.normalised();
        let mut u: f64 = rng.gen();
        for (k, pk) in RawKind::ALL.iter().zip(p) {
            if u < pk {
                return *k;
            }
            u -= pk;
        }
        // Rounding: the last kind with non-zero weight.
        RawKind::ALL
            .iter()
            .zip(p)
            .rev()
            .find(|(_, pk)| *pk > 0.0)
            .map(|(k, _)| *k)
            .unwrap_or(RawKind::Boilerplate)
    }
}

/// A raw alt-text with its kind and whether boilerplate was added to it.
#[derive(Debug, Clone, PartialEq)]
pub struct RawText {
    pub text: String,
    pub kind: RawKind,
    pub decorated: bool,
}

const DECORATIONS: [&str; 14] = [
    "stock photo",
    "vector illustration",
    "icon",
    "clipart",
    "royalty free",
    "free download",
    "png",
    "hd wallpaper",
    "stock image",
    "high resolution",
    "isolated",
    "flat design",
    "cartoon",
    "graphic",
];

const PRODUCTS: [&str; 24] = [
    "running shoes",
    "leather wallet",
    "coffee maker",
    "yoga mat",
    "phone case",
    "garden hose",
    "wedding dress",
    "office chair",
    "dog bed",
    "hotel rooms in Lisbon",
    "kitchen faucet",
    "car insurance quotes",
    "bluetooth speaker",
    "winter jacket",
    "gaming laptop",
    "protein powder",
    "beach house rental",
    "vinyl records",
    "face cream",
    "mountain bike",
    "dining table",
    "cat tree",
    "wall clock",
    "backpack",
];

const ADJECTIVES: [&str; 14] = [
    "Cheap",
    "Best",
    "Premium",
    "Luxury",
    "New",
    "Vintage",
    "Handmade",
    "Organic",
    "Wireless",
    "Waterproof",
    "Discount",
    "Top rated",
    "Affordable",
    "Used",
];

const SEO_TAILS: [&str; 12] = [
    "for sale",
    "| Free Shipping",
    "- 50% off today",
    "near me",
    "reviews and prices",
    "| Best Price Guaranteed",
    "online store",
    "buy now",
    "deals 2021",
    "| Official Site",
    "compare prices",
    "sale ends soon",
];

fn boilerplate<R: Rng + ?Sized>(rng: &mut R) -> String {
    match rng.gen_range(0..14) {
        0 => format!("IMG_{:04}.jpg", rng.gen_range(0..10000)),
        1 => format!("DSC{:05}.JPG", rng.gen_range(0..100000)),
        2 => format!("image {}", rng.gen_range(1..10000)),
        3 => "stock photo".into(),
        4 => "click to enlarge".into(),
        5 => format!("untitled-{}.png", rng.gen_range(1..40)),
        6 => format!("photo {} of {}", rng.gen_range(1..9), rng.gen_range(9..30)),
        7 => "thumbnail".into(),
        8 => "Image may contain: text".into(),
        9 => format!("download ({}).jpeg", rng.gen_range(1..20)),
        10 => format!(
            "Screenshot_2019-0{}-{:02}",
            rng.gen_range(1..10),
            rng.gen_range(1..29)
        ),
        11 => "no description available".into(),
        12 => format!("{:08x}", rng.gen::<u32>()),
        _ => "placeholder image".into(),
    }
}

fn decorate<R: Rng + ?Sized>(rng: &mut R, text: String) -> String {
    let d = if rng.gen_bool(0.25) {
        boilerplate(rng)
    } else {
        DECORATIONS[rng.gen_range(0..DECORATIONS.len())].to_string()
    };
    match rng.gen_range(0..4) {
        0 => format!("{d} - {text}"),
        1 => format!("{text} | {d}"),
        _ => format!("{text} {d}"),
    }
}

fn title_case(s: &str) -> String {
    s.split(' ')
        .map(|w| {
            let mut c = w.chars();
            match c.next() {
                Some(f) => f.to_uppercase().chain(c).collect(),
                None => String::new(),
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn recase<R: Rng + ?Sized>(rng: &mut R, s: String) -> String {
    match rng.gen_range(0..10) {
        0..=5 => s,
        6..=8 => title_case(&s),
        _ => s.to_uppercase(),
    }
}

fn group_words(count: u32, color: Color, shape: Shape) -> String {
    if count == 1 {
        format!("{} {}", color.name(), shape.name())
    } else {
        format!("{} {} {}", number_word(count), color.name(), shape.plural())
    }
}

fn faithful<R: Rng + ?Sized>(scene: &Scene, rng: &mut R) -> String {
    let parts: Vec<String> = scene
        .groups
        .iter()
        .map(|g| group_words(g.count, g.color, g.shape))
        .collect();
    let bg = scene.background.pattern.name();
    let core = match (scene.relation, parts.as_slice()) {
        (Some(r), _) if rng.gen_bool(0.6) => format!(
            "{} {} {}",
            parts[r.subject],
            r.relation.phrase(),
            parts[r.object]
        ),
        _ => parts.join(" and "),
    };
    match rng.gen_range(0..3) {
        0 => format!("{core} on {bg} background"),
        1 => format!(
            "{core} on a {} background",
            scene.background.colors[0].name()
        ),
        _ => core,
    }
}

fn partial<R: Rng + ?Sized>(scene: &Scene, rng: &mut R) -> String {
    let g = scene.groups[rng.gen_range(0..scene.groups.len())];
    let shape_word = if g.count == 1 {
        g.shape.name()
    } else {
        g.shape.plural()
    };
    match rng.gen_range(0..4) {
        // One group of two: partial because the other group is missing.
        0 if scene.groups.len() > 1 => format!("{} {}", g.color.name(), shape_word),
        0 | 1 => shape_word.to_string(),
        2 => format!("{} shape", g.color.name()),
        _ => format!("{} {}", g.size.name(), shape_word),
    }
}

fn wrong<R: Rng + ?Sized>(scene: &Scene, rng: &mut R) -> String {
    let g = scene.groups[rng.gen_range(0..scene.groups.len())];
    for _ in 0..32 {
        let (c, s) = if rng.gen_bool(0.5) {
            (Color::random(rng), g.shape)
        } else {
            (g.color, Shape::random(rng))
        };
        let text = format!("{} {}", c.name(), s.name());
        if tag_holds(scene, &text) == Some(false) {
            return text;
        }
    }
    // A shape that is in no group is always wrong.
    let absent: Vec<Shape> = Shape::ALL
        .iter()
        .copied()
        .filter(|s| !scene.groups.iter().any(|g| g.shape == *s))
        .collect();
    let s = absent.choose(rng).copied().unwrap_or(Shape::Star);
    format!("{} {}", g.color.name(), s.name())
}

fn unrelated<R: Rng + ?Sized>(rng: &mut R) -> String {
    let adj = ADJECTIVES[rng.gen_range(0..ADJECTIVES.len())];
    let prod = PRODUCTS[rng.gen_range(0..PRODUCTS.len())];
    let tail = SEO_TAILS[rng.gen_range(0..SEO_TAILS.len())];
    match rng.gen_range(0..3) {
        0 => format!("{adj} {prod} {tail}"),
        1 => format!("{adj} {prod}"),
        _ => format!("{prod} {tail}"),
    }
}

/// Draw a raw alt-text for `scene`.
pub fn raw_text<R: Rng + ?Sized>(scene: &Scene, mix: &RawTextMix, rng: &mut R) -> RawText {
    let kind = mix.draw(rng);
    let mut decorated = false;
    let text = match kind {
        RawKind::Boilerplate => {
            if rng.gen_bool(0.2) {
                format!("{} - {}", boilerplate(rng), boilerplate(rng))
            } else {
                boilerplate(rng)
            }
        }
        RawKind::Unrelated => unrelated(rng),
        RawKind::Faithful | RawKind::Partial | RawKind::Wrong => {
            let core = match kind {
                RawKind::Faithful => faithful(scene, rng),
                RawKind::Partial => partial(scene, rng),
                _ => wrong(scene, rng),
            };
            let core = recase(rng, core);
            if rng.gen_bool(mix.decorate.clamp(0.0, 1.0)) {
                decorated = true;
                decorate(rng, core)
            } else {
                core
            }
        }
    };
    RawText {
        text,
        kind,
        decorated,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn kinds_follow_the_mix_and_texts_are_single_lines() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let mix = RawTextMix::default();
        let mut counts = [0usize; 5];
        let n = 20000;
        for _ in 0..n {
            let scene = Scene::random(&mut rng);
            let r = raw_text(&scene, &mix, &mut rng);
            assert!(!r.text.is_empty() && !r.text.contains('\n'), "{:?}", r.text);
            counts[RawKind::ALL.iter().position(|k| *k == r.kind).unwrap_or(0)] += 1;
            if r.kind == RawKind::Wrong {
                // The first two words before any decoration name a false object.
                let lower = r.text.to_lowercase();
                let false_mention = Color::ALL.iter().any(|c| {
                    Shape::ALL.iter().any(|s| {
                        lower.contains(&format!("{} {}", c.name(), s.name()))
                            && tag_holds(&scene, &format!("{} {}", c.name(), s.name()))
                                == Some(false)
                    })
                });
                assert!(false_mention, "{:?}", r.text);
            }
        }
        for (k, p) in mix.normalised().iter().enumerate() {
            let f = counts[k] as f64 / n as f64;
            assert!((f - p).abs() < 0.02, "{:?}: {f} vs {p}", RawKind::ALL[k]);
        }
    }

    #[test]
    fn zero_weights_are_never_drawn() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let mix = RawTextMix {
            faithful: 0.0,
            partial: 0.0,
            boilerplate: 1.0,
            wrong: 0.0,
            unrelated: 0.0,
            decorate: 0.0,
        };
        let scene = Scene::random(&mut rng);
        for _ in 0..1000 {
            assert_eq!(raw_text(&scene, &mix, &mut rng).kind, RawKind::Boilerplate);
        }
        assert!(RawTextMix {
            faithful: -1.0,
            ..RawTextMix::default()
        }
        .validate()
        .is_err());
    }
}
