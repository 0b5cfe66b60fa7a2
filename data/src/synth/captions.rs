//! The oracle's texts, written from the ground truth: the long positive description (LVLM style:
//! "The image shows ..., the background is ..., there are two objects in total."), the hard negative
//! description (the same wording describing a slightly changed scene), positive tags and negative
//! tags; plus short captions for the retrieval set and a checker that reads these texts back.
//!
//! A hard negative is built by perturbing the [`SceneDesc`] (recolour, reshape, swap attributes
//! between objects, flip the relation, change a count, size, texture, the background or a lone
//! object's place) and describing the result with the *same* phrasing choices as the positive, so
//! the two texts differ only where the scene does. [`check_text`] parses the generator's own phrasing
//! and lists the statements that contradict a scene: it is empty for every positive text and not
//! empty for every negative one (the tests check both on many samples).
//!
//! Texts never contain a newline, a tag never contains `,` or `;` or ends with `.`, and a
//! description never starts with `*` or `_`: that is what [`crate::recaption_format`] needs to
//! render and parse them back exactly.

use super::scene::{
    BgColor, Color, Group, Pattern, Relation, Scene, SceneDesc, Shape, Size, Texture, Zone,
};
use crate::sample::RefinedTexts;
use rand::seq::SliceRandom;
use rand::Rng;
use serde::Serialize;

const NUMBERS: [&str; 7] = ["zero", "one", "two", "three", "four", "five", "six"];

/// `one`, `two`, ... (digits past six).
pub fn number_word(n: u32) -> String {
    NUMBERS
        .get(n as usize)
        .map(|s| s.to_string())
        .unwrap_or_else(|| n.to_string())
}

fn parse_number(s: &str) -> Option<u32> {
    NUMBERS
        .iter()
        .position(|w| *w == s)
        .map(|i| i as u32)
        .or_else(|| s.parse().ok())
}

const OPENERS: [&str; 5] = [
    "The image shows",
    "This image features",
    "The picture depicts",
    "The image displays",
    "This picture shows",
];

const EXTRAS: [&str; 6] = [
    "the style is simple and flat",
    "the edges look crisp and clean",
    "the composition is minimal",
    "it looks like a simple computer-generated graphic",
    "the colors are bright and flat",
    "the scene is well lit with no shadows",
];

/// The wording choices of one description, drawn once per sample and reused for its negative.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Phrasing {
    opener: usize,
    /// Two groups: 0 relation inline, 1 "A and B" + relation clause, 2 "B and A" + relation clause.
    pair_style: u8,
    /// State the relation clause from the object's side (`B is below A`).
    inverse_clause: bool,
    bg_style: u8,
    count_style: u8,
    bg_before_count: bool,
    extra: Option<usize>,
    /// Separator before clause i+1: true for ". ", false for ", ".
    full_stops: [bool; 6],
}

impl Phrasing {
    pub fn random<R: Rng + ?Sized>(rng: &mut R) -> Phrasing {
        let mut full_stops = [false; 6];
        for s in &mut full_stops {
            *s = rng.gen_bool(0.2);
        }
        Phrasing {
            opener: rng.gen_range(0..OPENERS.len()),
            pair_style: rng.gen_range(0..3),
            inverse_clause: rng.gen_bool(0.3),
            bg_style: rng.gen_range(0..2),
            count_style: rng.gen_range(0..3),
            bg_before_count: rng.gen_bool(0.7),
            extra: if rng.gen_bool(0.4) {
                Some(rng.gen_range(0..EXTRAS.len()))
            } else {
                None
            },
            full_stops,
        }
    }
}

/// `a small striped red circle`, `two large blue squares`.
pub fn noun_phrase(g: &Group) -> String {
    let det = if g.count == 1 {
        "a".to_string()
    } else {
        number_word(g.count)
    };
    let texture = match g.texture {
        Texture::Solid => String::new(),
        t => format!("{} ", t.name()),
    };
    format!(
        "{det} {} {texture}{} {}",
        g.size.name(),
        g.color.name(),
        g.shape.noun(g.count)
    )
}

/// Shortest way to refer back to group `i`: `the circle`, or `the red circles` when the other group
/// has the same shape.
fn referring(desc: &SceneDesc, i: usize) -> String {
    let g = desc.groups[i];
    let ambiguous = desc
        .groups
        .iter()
        .enumerate()
        .any(|(j, o)| j != i && o.shape == g.shape);
    if ambiguous {
        format!("the {} {}", g.color.name(), g.shape.noun(g.count))
    } else {
        format!("the {}", g.shape.noun(g.count))
    }
}

fn copula(g: &Group) -> &'static str {
    if g.count == 1 {
        "is"
    } else {
        "are"
    }
}

fn background_clause(desc: &SceneDesc, style: u8) -> String {
    let c1 = desc.bg_colors.first().map(|c| c.name()).unwrap_or("white");
    let c2 = desc.bg_colors.get(1).map(|c| c.name()).unwrap_or(c1);
    if style == 0 {
        let what = match desc.pattern {
            Pattern::Plain => format!("plain {c1}"),
            Pattern::Striped => format!("striped in {c1} and {c2}"),
            Pattern::Checkered => format!("checkered in {c1} and {c2}"),
            Pattern::Dotted => format!("{c1} with {c2} dots"),
        };
        format!("the background is {what}")
    } else {
        let what = match desc.pattern {
            Pattern::Plain => format!("a plain {c1} background"),
            Pattern::Striped => format!("a {c1} and {c2} striped background"),
            Pattern::Checkered => format!("a {c1} and {c2} checkered background"),
            Pattern::Dotted => format!("a {c1} background with {c2} dots"),
        };
        format!("everything is set against {what}")
    }
}

fn count_clause(total: u32, style: u8) -> String {
    let n = number_word(total);
    let noun = if total == 1 { "object" } else { "objects" };
    match (style, total) {
        (0, 1) => "there is only one object".to_string(),
        (0, _) => format!("there are {n} {noun} in total"),
        (1, 1) => "one object is visible in total".to_string(),
        (1, _) => format!("{n} {noun} are visible in total"),
        _ => format!("the image contains {n} {noun} in total"),
    }
}

/// Write the long description of `desc` with the choices of `ph`.
pub fn describe(desc: &SceneDesc, ph: &Phrasing) -> String {
    let opener = OPENERS[ph.opener % OPENERS.len()];
    let mut clauses: Vec<String> = Vec::new();
    match (desc.groups.as_slice(), desc.relation) {
        ([g], _) => {
            clauses.push(format!("{opener} {}", noun_phrase(g)));
            if let (Some(z), 1) = (desc.zone, g.count) {
                clauses.push(format!(
                    "{} is near the {} of the image",
                    referring(desc, 0),
                    z.phrase()
                ));
            }
        }
        ([_, _], Some((s, rel, o))) => {
            let (gs, go) = (&desc.groups[s], &desc.groups[o]);
            let rel_clause = if ph.inverse_clause {
                format!(
                    "{} {} {} {}",
                    referring(desc, o),
                    copula(go),
                    rel.inverse().phrase(),
                    referring(desc, s)
                )
            } else {
                format!(
                    "{} {} {} {}",
                    referring(desc, s),
                    copula(gs),
                    rel.phrase(),
                    referring(desc, o)
                )
            };
            match ph.pair_style {
                0 => clauses.push(format!(
                    "{opener} {} {} {}",
                    noun_phrase(gs),
                    rel.phrase(),
                    noun_phrase(go)
                )),
                1 => {
                    clauses.push(format!(
                        "{opener} {} and {}",
                        noun_phrase(gs),
                        noun_phrase(go)
                    ));
                    clauses.push(rel_clause);
                }
                _ => {
                    clauses.push(format!(
                        "{opener} {} and {}",
                        noun_phrase(go),
                        noun_phrase(gs)
                    ));
                    clauses.push(rel_clause);
                }
            }
        }
        (groups, _) => {
            let nps: Vec<String> = groups.iter().map(noun_phrase).collect();
            clauses.push(format!("{opener} {}", nps.join(" and ")));
        }
    }
    let bg = background_clause(desc, ph.bg_style);
    let count = count_clause(desc.total(), ph.count_style);
    if ph.bg_before_count {
        clauses.push(bg);
        clauses.push(count);
    } else {
        clauses.push(count);
        clauses.push(bg);
    }
    if let Some(e) = ph.extra {
        clauses.push(EXTRAS[e % EXTRAS.len()].to_string());
    }
    join_clauses(&clauses, &ph.full_stops)
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

fn join_clauses(clauses: &[String], full_stops: &[bool]) -> String {
    let mut out = String::new();
    for (i, c) in clauses.iter().enumerate() {
        if i == 0 {
            out.push_str(&capitalise(c));
            continue;
        }
        if full_stops.get(i - 1).copied().unwrap_or(false) {
            out.push_str(". ");
            out.push_str(&capitalise(c));
        } else {
            out.push_str(", ");
            out.push_str(c);
        }
    }
    out.push('.');
    out
}

/// Kinds of change a hard negative makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Perturbation {
    Recolor,
    Reshape,
    SwapColors,
    SwapShapes,
    SwapSizes,
    FlipRelation,
    ChangeCount,
    Resize,
    Retexture,
    BackgroundPattern,
    BackgroundColor,
    Move,
}

impl Perturbation {
    const WEIGHTED: [(Perturbation, u32); 12] = [
        (Perturbation::Recolor, 3),
        (Perturbation::Reshape, 3),
        (Perturbation::SwapColors, 3),
        (Perturbation::SwapShapes, 2),
        (Perturbation::SwapSizes, 1),
        (Perturbation::FlipRelation, 4),
        (Perturbation::ChangeCount, 2),
        (Perturbation::Resize, 2),
        (Perturbation::Retexture, 1),
        (Perturbation::BackgroundPattern, 1),
        (Perturbation::BackgroundColor, 1),
        (Perturbation::Move, 2),
    ];

    pub fn name(self) -> &'static str {
        match self {
            Perturbation::Recolor => "recolor",
            Perturbation::Reshape => "reshape",
            Perturbation::SwapColors => "swap_colors",
            Perturbation::SwapShapes => "swap_shapes",
            Perturbation::SwapSizes => "swap_sizes",
            Perturbation::FlipRelation => "flip_relation",
            Perturbation::ChangeCount => "change_count",
            Perturbation::Resize => "resize",
            Perturbation::Retexture => "retexture",
            Perturbation::BackgroundPattern => "background_pattern",
            Perturbation::BackgroundColor => "background_color",
            Perturbation::Move => "move",
        }
    }

    fn applicable(self, d: &SceneDesc) -> bool {
        let two = d.groups.len() == 2;
        match self {
            Perturbation::SwapColors => two && d.groups[0].color != d.groups[1].color,
            Perturbation::SwapShapes => two && d.groups[0].shape != d.groups[1].shape,
            Perturbation::SwapSizes => two && d.groups[0].size != d.groups[1].size,
            Perturbation::FlipRelation => d.relation.is_some(),
            Perturbation::Move => d.zone.is_some(),
            Perturbation::Recolor
            | Perturbation::Reshape
            | Perturbation::ChangeCount
            | Perturbation::Resize
            | Perturbation::Retexture
            | Perturbation::BackgroundPattern
            | Perturbation::BackgroundColor => !d.groups.is_empty(),
        }
    }
}

fn pick<T: Copy, R: Rng + ?Sized>(rng: &mut R, items: &[T]) -> Option<T> {
    items.choose(rng).copied()
}

/// Apply one perturbation; `None` when it cannot change this scene.
pub fn perturb<R: Rng + ?Sized>(d: &SceneDesc, p: Perturbation, rng: &mut R) -> Option<SceneDesc> {
    if !p.applicable(d) {
        return None;
    }
    let mut n = d.clone();
    let gi = rng.gen_range(0..d.groups.len());
    let others: Vec<Group> = d
        .groups
        .iter()
        .enumerate()
        .filter(|(j, _)| *j != gi)
        .map(|(_, g)| *g)
        .collect();
    match p {
        Perturbation::Recolor => {
            let g = d.groups[gi];
            let options: Vec<Color> = Color::ALL
                .iter()
                .copied()
                .filter(|c| {
                    *c != g.color && !others.iter().any(|o| (o.shape, o.color) == (g.shape, *c))
                })
                .collect();
            n.groups[gi].color = pick(rng, &options)?;
        }
        Perturbation::Reshape => {
            let g = d.groups[gi];
            let options: Vec<Shape> = Shape::ALL
                .iter()
                .copied()
                .filter(|s| {
                    *s != g.shape && !others.iter().any(|o| (o.shape, o.color) == (*s, g.color))
                })
                .collect();
            n.groups[gi].shape = pick(rng, &options)?;
        }
        Perturbation::SwapColors => {
            n.groups[0].color = d.groups[1].color;
            n.groups[1].color = d.groups[0].color;
        }
        Perturbation::SwapShapes => {
            n.groups[0].shape = d.groups[1].shape;
            n.groups[1].shape = d.groups[0].shape;
        }
        Perturbation::SwapSizes => {
            n.groups[0].size = d.groups[1].size;
            n.groups[1].size = d.groups[0].size;
        }
        Perturbation::FlipRelation => {
            let (s, r, o) = d.relation?;
            n.relation = Some((s, r.inverse(), o));
        }
        Perturbation::ChangeCount => {
            let c = d.groups[gi].count;
            let options: &[u32] = match c {
                1 => &[2, 3],
                2 => &[1, 3],
                _ => &[1, 2],
            };
            let new = pick(rng, options)?;
            n.groups[gi].count = new;
            n.zone = if n.groups.len() == 1 && new == 1 {
                Some(Zone {
                    h: rng.gen_range(0..3),
                    v: rng.gen_range(0..3),
                })
            } else {
                None
            };
        }
        Perturbation::Resize => {
            n.groups[gi].size = match d.groups[gi].size {
                Size::Small => Size::Large,
                Size::Large => Size::Small,
            };
        }
        Perturbation::Retexture => {
            // Never to solid: a description leaves "solid" unsaid, so that change would be silent.
            n.groups[gi].texture = match d.groups[gi].texture {
                Texture::Solid => pick(rng, &[Texture::Striped, Texture::Dotted])?,
                Texture::Striped => Texture::Dotted,
                Texture::Dotted => Texture::Striped,
            };
        }
        Perturbation::BackgroundPattern => {
            let options: Vec<Pattern> = Pattern::ALL
                .iter()
                .copied()
                .filter(|p| *p != d.pattern)
                .collect();
            n.pattern = pick(rng, &options)?;
            if n.pattern == Pattern::Plain {
                n.bg_colors.truncate(1);
            } else if n.bg_colors.len() < 2 {
                let c0 = n.bg_colors.first().copied().unwrap_or(BgColor::White);
                let second: Vec<BgColor> =
                    BgColor::ALL.iter().copied().filter(|c| *c != c0).collect();
                n.bg_colors.push(pick(rng, &second)?);
            }
        }
        Perturbation::BackgroundColor => {
            let k = rng.gen_range(0..d.bg_colors.len().max(1));
            let options: Vec<BgColor> = BgColor::ALL
                .iter()
                .copied()
                .filter(|c| !d.bg_colors.contains(c))
                .collect();
            let c = pick(rng, &options)?;
            match n.bg_colors.get_mut(k) {
                Some(slot) => *slot = c,
                None => n.bg_colors.push(c),
            }
        }
        Perturbation::Move => {
            let z = d.zone?;
            let options: Vec<Zone> = Zone::all().filter(|o| *o != z).collect();
            n.zone = Some(pick(rng, &options)?);
        }
    }
    (n.groups_distinct() && n.canonical() != d.canonical()).then_some(n)
}

/// A hard-negative scene: one perturbation, sometimes two of different kinds. Returns the changed
/// description and the perturbations applied.
pub fn hard_negative<R: Rng + ?Sized>(
    d: &SceneDesc,
    rng: &mut R,
) -> (SceneDesc, Vec<Perturbation>) {
    let choose =
        |rng: &mut R, exclude: Option<Perturbation>, d: &SceneDesc| -> Option<Perturbation> {
            let opts: Vec<(Perturbation, u32)> = Perturbation::WEIGHTED
                .iter()
                .copied()
                .filter(|(p, _)| Some(*p) != exclude && p.applicable(d))
                .collect();
            opts.choose_weighted(rng, |(_, w)| *w).ok().map(|(p, _)| *p)
        };
    for _ in 0..32 {
        let Some(p1) = choose(rng, None, d) else {
            break;
        };
        let Some(n1) = perturb(d, p1, rng) else {
            continue;
        };
        if rng.gen_bool(0.25) {
            if let Some(p2) = choose(rng, Some(p1), &n1) {
                if let Some(n2) = perturb(&n1, p2, rng) {
                    if n2.canonical() != d.canonical() {
                        return (n2, vec![p1, p2]);
                    }
                }
            }
        }
        return (n1, vec![p1]);
    }
    // Unreachable for generated scenes (a background colour can always change); keep a safe answer.
    let mut n = d.clone();
    n.pattern = if d.pattern == Pattern::Plain {
        Pattern::Striped
    } else {
        Pattern::Plain
    };
    if n.pattern == Pattern::Plain {
        n.bg_colors.truncate(1);
    } else {
        let c0 = n.bg_colors.first().copied().unwrap_or(BgColor::White);
        n.bg_colors.push(if c0 == BgColor::White {
            BgColor::Grey
        } else {
            BgColor::White
        });
    }
    (n, vec![Perturbation::BackgroundPattern])
}

fn push_unique(v: &mut Vec<String>, t: String) {
    if !v.contains(&t) {
        v.push(t);
    }
}

/// Positive tags: true short concepts of the scene.
pub fn positive_tags<R: Rng + ?Sized>(scene: &Scene, rng: &mut R) -> Vec<String> {
    let mut tags = Vec::new();
    for g in &scene.groups {
        push_unique(&mut tags, format!("{} {}", g.color.name(), g.shape.name()));
        if rng.gen_bool(0.5) {
            push_unique(&mut tags, format!("{} {}", g.size.name(), g.shape.name()));
        }
        if g.texture != Texture::Solid {
            push_unique(
                &mut tags,
                format!("{} {}", g.texture.name(), g.shape.name()),
            );
        }
        if rng.gen_bool(0.3) {
            push_unique(&mut tags, g.shape.name().to_string());
        }
        if rng.gen_bool(0.2) {
            push_unique(&mut tags, g.color.name().to_string());
        }
    }
    if let Some(r) = scene.relation {
        let (s, o) = (scene.groups[r.subject], scene.groups[r.object]);
        if s.shape != o.shape && rng.gen_bool(0.8) {
            push_unique(
                &mut tags,
                format!(
                    "{} {} {}",
                    s.shape.name(),
                    r.relation.name(),
                    o.shape.name()
                ),
            );
        }
    }
    push_unique(
        &mut tags,
        format!("{} background", scene.background.pattern.name()),
    );
    if rng.gen_bool(0.5) {
        push_unique(
            &mut tags,
            format!("{} background", scene.background.colors[0].name()),
        );
    }
    let total = scene.total_objects();
    push_unique(
        &mut tags,
        format!(
            "{} {}",
            number_word(total),
            if total == 1 { "object" } else { "objects" }
        ),
    );
    if rng.gen_bool(0.5) {
        push_unique(&mut tags, "geometric shapes".to_string());
    }
    if rng.gen_bool(0.25) {
        push_unique(&mut tags, "simple illustration".to_string());
    }
    tags
}

/// Negative tags: close to the positive ones, each false for the scene (checked with
/// [`tag_holds`]); 3 to 5 of them.
pub fn negative_tags<R: Rng + ?Sized>(
    scene: &Scene,
    positives: &[String],
    rng: &mut R,
) -> Vec<String> {
    let mut cands: Vec<String> = Vec::new();
    for g in &scene.groups {
        let c = Color::random(rng);
        cands.push(format!("{} {}", c.name(), g.shape.name()));
        let s = Shape::random(rng);
        cands.push(format!("{} {}", g.color.name(), s.name()));
        let other_size = if g.size == Size::Small {
            Size::Large
        } else {
            Size::Small
        };
        cands.push(format!(
            "{} {} {}",
            other_size.name(),
            g.color.name(),
            g.shape.name()
        ));
        cands.push(Shape::random(rng).name().to_string());
    }
    if let Some(r) = scene.relation {
        let (s, o) = (scene.groups[r.subject], scene.groups[r.object]);
        if s.shape != o.shape {
            cands.push(format!(
                "{} {} {}",
                s.shape.name(),
                r.relation.inverse().name(),
                o.shape.name()
            ));
        }
    }
    cands.push(format!("{} background", Pattern::random(rng).name()));
    cands.push(format!("{} background", BgColor::random(rng).name()));
    let n = rng.gen_range(1..=4u32);
    cands.push(format!(
        "{} {}",
        number_word(n),
        if n == 1 { "object" } else { "objects" }
    ));
    cands.shuffle(rng);
    let want = rng.gen_range(3..=5);
    let mut out: Vec<String> = Vec::new();
    for c in cands {
        if out.len() >= want {
            break;
        }
        if tag_holds(scene, &c) == Some(false) && !positives.contains(&c) && !out.contains(&c) {
            out.push(c);
        }
    }
    // Always at least one: a count that is certainly wrong.
    if out.is_empty() {
        let wrong = if scene.total_objects() == 2 { 3 } else { 2 };
        out.push(format!("{} objects", number_word(wrong)));
    }
    out
}

/// The four oracle texts for a scene, and the perturbations behind the negative description.
pub fn oracle_texts<R: Rng + ?Sized>(
    scene: &Scene,
    rng: &mut R,
) -> (RefinedTexts, Vec<Perturbation>) {
    let desc = scene.desc();
    let ph = Phrasing::random(rng);
    let long_positive = describe(&desc, &ph);
    let (neg, perts) = hard_negative(&desc, rng);
    let mut long_negative = describe(&neg, &ph);
    if long_negative == long_positive {
        // Cannot happen when the canonical forms differ; keep the format's invariant regardless.
        long_negative = describe(&hard_negative(&desc, rng).0, &ph);
    }
    let tags_positive = positive_tags(scene, rng);
    let tags_negative = negative_tags(scene, &tags_positive, rng);
    (
        RefinedTexts {
            long_positive,
            long_negative,
            tags_positive,
            tags_negative,
            source: Some("oracle".to_string()),
        },
        perts,
    )
}

/// Short true captions for the retrieval set, all different: a noun-phrase caption, a description's
/// first clauses, a tag-style caption, a count-first caption.
pub fn short_captions<R: Rng + ?Sized>(scene: &Scene, rng: &mut R, n: usize) -> Vec<String> {
    let desc = scene.desc();
    let bg_adj = match desc.pattern {
        Pattern::Plain => format!("a plain {}", desc.bg_colors[0].name()),
        p => format!(
            "a {} and {} {}",
            desc.bg_colors[0].name(),
            desc.bg_colors.get(1).unwrap_or(&desc.bg_colors[0]).name(),
            p.name()
        ),
    };
    let subject = match (desc.groups.as_slice(), desc.relation) {
        ([_, _], Some((s, r, o))) => format!(
            "{} {} {}",
            noun_phrase(&desc.groups[s]),
            r.phrase(),
            noun_phrase(&desc.groups[o])
        ),
        (groups, _) => groups
            .iter()
            .map(noun_phrase)
            .collect::<Vec<_>>()
            .join(" and "),
    };
    let tag_style = {
        let mut parts: Vec<String> = desc
            .groups
            .iter()
            .map(|g| {
                if g.count == 1 {
                    format!("{} {}", g.color.name(), g.shape.name())
                } else {
                    format!(
                        "{} {} {}",
                        number_word(g.count),
                        g.color.name(),
                        g.shape.plural()
                    )
                }
            })
            .collect();
        parts.push(format!("{} background", desc.pattern.name()));
        parts.join(", ")
    };
    let mut all = vec![
        format!("{subject} on {bg_adj} background"),
        describe(&desc, &Phrasing::random(rng)),
        tag_style,
        capitalise(&format!(
            "{} {} in total, {subject}",
            number_word(desc.total()),
            if desc.total() == 1 {
                "object"
            } else {
                "objects"
            }
        )),
        capitalise(&subject),
    ];
    let keep_first = all.remove(0);
    all.shuffle(rng);
    all.insert(0, keep_first);
    let mut out: Vec<String> = Vec::new();
    for c in all {
        if out.len() >= n {
            break;
        }
        if !out.contains(&c) {
            out.push(c);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Reading the generator's phrasing back.

#[derive(Debug, Clone, PartialEq)]
struct NounPhrase {
    shape: Shape,
    plural: bool,
    count: Option<u32>,
    size: Option<Size>,
    texture: Option<Texture>,
    color: Option<Color>,
    /// Token span [start, end] (end = the noun).
    start: usize,
    end: usize,
}

impl NounPhrase {
    fn matches(&self, g: &Group) -> bool {
        g.shape == self.shape
            && self.color.is_none_or(|c| c == g.color)
            && self.size.is_none_or(|s| s == g.size)
            && self.texture.is_none_or(|t| t == g.texture)
            && match self.count {
                Some(n) => g.count == n,
                None => (g.count > 1) == self.plural,
            }
    }

    fn describe(&self) -> String {
        let mut s = String::new();
        if let Some(n) = self.count {
            s.push_str(&format!("{n} "));
        }
        for w in [
            self.size.map(|x| x.name()),
            self.texture.map(|x| x.name()),
            self.color.map(|x| x.name()),
        ]
        .into_iter()
        .flatten()
        {
            s.push_str(w);
            s.push(' ');
        }
        s.push_str(if self.plural {
            self.shape.plural()
        } else {
            self.shape.name()
        });
        s
    }
}

fn tokens(clause: &str) -> Vec<String> {
    clause
        .split_whitespace()
        .map(|t| {
            t.trim_matches(|c: char| !c.is_alphanumeric() && c != '-')
                .to_lowercase()
        })
        .filter(|t| !t.is_empty())
        .collect()
}

fn noun_phrases(toks: &[String]) -> Vec<NounPhrase> {
    let mut out = Vec::new();
    for (j, t) in toks.iter().enumerate() {
        let Some((shape, plural)) = Shape::from_noun(t) else {
            continue;
        };
        let mut np = NounPhrase {
            shape,
            plural,
            count: None,
            size: None,
            texture: None,
            color: None,
            start: j,
            end: j,
        };
        let mut k = j;
        while k > 0 {
            let w = toks[k - 1].as_str();
            if let Some(c) = Color::from_name(w) {
                np.color = Some(c);
            } else if let Some(s) = Size::from_name(w) {
                np.size = Some(s);
            } else if let Some(t) = Texture::from_name(w) {
                np.texture = Some(t);
            } else if w == "a" || w == "an" {
                np.count = Some(1);
                k -= 1;
                break;
            } else if w == "the" {
                k -= 1;
                break;
            } else if let Some(n) = parse_number(w) {
                np.count = Some(n);
                k -= 1;
                break;
            } else {
                break;
            }
            k -= 1;
        }
        np.start = k;
        if np.count.is_none() && !plural {
            np.count = Some(1);
        }
        out.push(np);
    }
    out
}

fn relation_between(words: &[String]) -> Option<Relation> {
    let w: Vec<&str> = words
        .iter()
        .map(String::as_str)
        .skip_while(|w| *w == "is" || *w == "are")
        .collect();
    match w.as_slice() {
        ["above"] => Some(Relation::Above),
        ["below"] => Some(Relation::Below),
        ["to", "the", "left", "of"] | ["left", "of"] => Some(Relation::LeftOf),
        ["to", "the", "right", "of"] | ["right", "of"] => Some(Relation::RightOf),
        _ => None,
    }
}

/// Statements of `text` that contradict `scene`, as readable reasons, and how many statements were
/// checked. Understands the generator's own phrasing: noun phrases (`two small red circles`,
/// `the circle`), relations between consecutive noun phrases, `near the <zone> of the image`,
/// `<n> objects`, and the background clause.
pub fn check_text(scene: &Scene, text: &str) -> (Vec<String>, usize) {
    let mut bad = Vec::new();
    let mut checked = 0;
    let matching = |np: &NounPhrase| -> Vec<usize> {
        (0..scene.groups.len())
            .filter(|&i| np.matches(&scene.groups[i]))
            .collect()
    };
    for clause in text.split([',', '.', ';']) {
        let toks = tokens(clause);
        if toks.is_empty() {
            continue;
        }
        let nps = noun_phrases(&toks);
        if toks.iter().any(|t| t == "background") {
            checked += 1;
            let in_np = |i: usize| nps.iter().any(|np| (np.start..=np.end).contains(&i));
            for (i, t) in toks.iter().enumerate() {
                if in_np(i) {
                    continue;
                }
                let p = match t.as_str() {
                    "plain" => Some(Pattern::Plain),
                    "striped" => Some(Pattern::Striped),
                    "checkered" => Some(Pattern::Checkered),
                    "dotted" | "dots" => Some(Pattern::Dotted),
                    _ => None,
                };
                if let Some(p) = p {
                    if p != scene.background.pattern {
                        bad.push(format!("background is not {}", p.name()));
                    }
                }
                if let Some(c) = BgColor::from_name(t) {
                    if !scene.background.colors.contains(&c) {
                        bad.push(format!("background has no {}", c.name()));
                    }
                }
            }
        }
        for (i, t) in toks.iter().enumerate() {
            if (t == "object" || t == "objects") && i > 0 {
                if let Some(n) = parse_number(&toks[i - 1]) {
                    checked += 1;
                    if n != scene.total_objects() {
                        bad.push(format!(
                            "{n} objects in total, not {}",
                            scene.total_objects()
                        ));
                    }
                }
            }
        }
        for np in &nps {
            checked += 1;
            if matching(np).is_empty() {
                bad.push(format!("no {}", np.describe()));
            }
        }
        for pair in nps.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            if let Some(rel) = relation_between(&toks[a.end + 1..b.start]) {
                checked += 1;
                let holds = matching(a)
                    .iter()
                    .any(|&i| matching(b).iter().any(|&j| scene.relation_holds(i, rel, j)));
                if !holds {
                    bad.push(format!(
                        "{} is not {} {}",
                        a.describe(),
                        rel.phrase(),
                        b.describe()
                    ));
                }
            }
        }
        if let Some(np) = nps.first() {
            let rest: Vec<&str> = toks[np.end + 1..].iter().map(String::as_str).collect();
            if let ["is", "near", "the", zone @ .., "of", "the", "image"] = rest.as_slice() {
                checked += 1;
                let phrase = zone.join(" ");
                let objs: Vec<_> = scene
                    .objects
                    .iter()
                    .filter(|o| matching(np).contains(&o.group))
                    .collect();
                let ok = match (Zone::from_phrase(&phrase), objs.as_slice()) {
                    (Some(z), [o]) => Zone::of(o.x, o.y) == z,
                    _ => false,
                };
                if !ok {
                    bad.push(format!("{} is not near the {phrase}", np.describe()));
                }
            }
        }
    }
    (bad, checked)
}

/// Whether a tag is true of the scene: `Some(true/false)` for tags in the generator's vocabulary
/// (`red circle`, `large star`, `striped square`, `circle above square`, `striped background`,
/// `grey background`, `two objects`, `red`, `circle`), `None` for generic ones.
pub fn tag_holds(scene: &Scene, tag: &str) -> Option<bool> {
    let toks = tokens(tag);
    let words: Vec<&str> = toks.iter().map(String::as_str).collect();
    match words.as_slice() {
        [w, "background"] => {
            if let Some(p) = Pattern::from_name(w) {
                return Some(p == scene.background.pattern);
            }
            BgColor::from_name(w).map(|c| scene.background.colors.contains(&c))
        }
        [n, "object" | "objects"] => parse_number(n).map(|n| n == scene.total_objects()),
        [a, rel @ .., b]
            if !rel.is_empty()
                && Shape::from_name(a).is_some()
                && Shape::from_name(b).is_some() =>
        {
            let r = match rel {
                ["above"] => Relation::Above,
                ["below"] => Relation::Below,
                ["left", "of"] => Relation::LeftOf,
                ["right", "of"] => Relation::RightOf,
                _ => return None,
            };
            let (sa, sb) = (Shape::from_name(a)?, Shape::from_name(b)?);
            let idx = |s: Shape| -> Vec<usize> {
                (0..scene.groups.len())
                    .filter(|&i| scene.groups[i].shape == s)
                    .collect()
            };
            Some(
                idx(sa)
                    .iter()
                    .any(|&i| idx(sb).iter().any(|&j| scene.relation_holds(i, r, j))),
            )
        }
        [w] if Color::from_name(w).is_some() => {
            let c = Color::from_name(w)?;
            Some(scene.groups.iter().any(|g| g.color == c))
        }
        _ => {
            let nps = noun_phrases(&toks);
            match nps.as_slice() {
                [np] if np.start == 0 && np.end + 1 == toks.len() => {
                    let mut np = np.clone();
                    np.count = None;
                    Some(scene.groups.iter().any(|g| {
                        g.shape == np.shape
                            && np.color.is_none_or(|c| c == g.color)
                            && np.size.is_none_or(|s| s == g.size)
                            && np.texture.is_none_or(|t| t == g.texture)
                    }))
                }
                _ => None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recaption_format;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn oracle_texts_are_true_negatives_false_and_round_trip() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut kinds = std::collections::HashMap::new();
        for _ in 0..4000 {
            let scene = Scene::random(&mut rng);
            let (t, perts) = oracle_texts(&scene, &mut rng);
            let (bad, n) = check_text(&scene, &t.long_positive);
            assert!(bad.is_empty(), "{}: {bad:?}", t.long_positive);
            assert!(
                n >= scene.groups.len() + 2,
                "{} checked {n}",
                t.long_positive
            );
            let (bad, _) = check_text(&scene, &t.long_negative);
            assert!(
                !bad.is_empty(),
                "negative not caught: {perts:?}\n+ {}\n- {}",
                t.long_positive,
                t.long_negative
            );
            for tag in &t.tags_positive {
                assert_ne!(tag_holds(&scene, tag), Some(false), "{tag}");
            }
            assert!(!t.tags_negative.is_empty());
            for tag in &t.tags_negative {
                assert_eq!(tag_holds(&scene, tag), Some(false), "{tag}");
            }
            let rendered = recaption_format::render(&t);
            assert_eq!(
                recaption_format::parse(&rendered, Some("oracle")),
                Ok(t.clone())
            );
            for p in perts {
                *kinds.entry(p).or_insert(0) += 1;
            }
        }
        assert!(kinds.len() >= 10, "perturbation kinds used: {kinds:?}");
    }

    #[test]
    fn description_reads_like_the_example() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let scene = Scene::layout(
            &mut rng,
            crate::synth::scene::Background {
                pattern: Pattern::Striped,
                colors: vec![BgColor::Grey, BgColor::White],
                period: 0.125,
                orientation: 0,
            },
            vec![
                Group {
                    shape: Shape::Triangle,
                    color: Color::Red,
                    size: Size::Small,
                    texture: Texture::Solid,
                    count: 1,
                },
                Group {
                    shape: Shape::Circle,
                    color: Color::Blue,
                    size: Size::Large,
                    texture: Texture::Solid,
                    count: 1,
                },
            ],
            Some(Relation::Above),
        );
        let ph = Phrasing {
            opener: 0,
            pair_style: 0,
            inverse_clause: false,
            bg_style: 0,
            count_style: 0,
            bg_before_count: true,
            extra: None,
            full_stops: [false; 6],
        };
        assert_eq!(
            describe(&scene.desc(), &ph),
            "The image shows a small red triangle above a large blue circle, the background is \
             striped in grey and white, there are two objects in total."
        );
        let (bad, _) = check_text(&scene, "A small blue triangle above a large red circle.");
        assert_eq!(bad.len(), 3, "{bad:?}");
        let (bad, _) = check_text(&scene, "The circle is above the triangle.");
        assert_eq!(bad.len(), 1, "{bad:?}");
        assert_eq!(tag_holds(&scene, "triangle above circle"), Some(true));
        assert_eq!(tag_holds(&scene, "circle above triangle"), Some(false));
        assert_eq!(tag_holds(&scene, "geometric shapes"), None);
    }

    #[test]
    fn short_captions_are_true_and_distinct() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for _ in 0..1000 {
            let scene = Scene::random(&mut rng);
            let caps = short_captions(&scene, &mut rng, 5);
            assert!(caps.len() >= 4);
            for c in &caps {
                assert!(!c.contains('\n'));
                let (bad, n) = check_text(&scene, c);
                assert!(bad.is_empty() && n > 0, "{c}: {bad:?}");
            }
        }
    }
}
