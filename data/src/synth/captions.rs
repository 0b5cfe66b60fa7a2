//! The oracle's texts, written from the ground truth: the long positive description (LVLM style:
//! "The image shows a small red triangle above a large blue circle, the circle is blue and the
//! triangle is red. The blue circle and the red triangle sit on a plain grey background, there are
//! two objects in total: a blue circle and a red triangle."), the hard negative description (the
//! same wording describing a slightly changed scene), positive tags and negative tags; plus short
//! captions for the retrieval set and a checker that reads these texts back.
//!
//! Like the paper's recaptioner, every clause of a description is about the image: each one names
//! the objects it speaks of (by shape, and by colour in most), so the ONE segment that mixed
//! training draws from d+ always identifies its image among others (there is no filler clause
//! such as "the style is simple and flat"). The clauses after the opener (place, attribute
//! binding, background, count) come in a random order.
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
use serde::{Deserialize, Serialize};

/// Number words the generator writes (and the quality report reads back).
pub(crate) const NUMBERS: [&str; 7] = ["zero", "one", "two", "three", "four", "five", "six"];

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

/// The clauses after the opener. Every one of them names the objects it talks about, the way the
/// paper's recaptioner writes (every sentence of d+ is about the image): training draws ONE
/// segment of d+, so a clause that names no object ("the style is simple and flat") would be a
/// caption that matches every image of the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClauseKind {
    /// Where things are: the relation between two groups, or a lone object's zone (none for one
    /// group of several objects).
    Place,
    /// Which colour (and size, texture) each shape has: `the triangle is red and the circle is
    /// blue`, the binding of attributes to objects.
    Attributes,
    /// The background, with the objects standing on it.
    Background,
    /// How many objects, listed.
    Count,
}

const CLAUSE_KINDS: [ClauseKind; 4] = [
    ClauseKind::Place,
    ClauseKind::Attributes,
    ClauseKind::Background,
    ClauseKind::Count,
];

/// The wording choices of one description, drawn once per sample and reused for its negative.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Phrasing {
    opener: usize,
    /// Two groups: 0 relation inline, 1 "A and B" (listings in sorted order) + relation clause,
    /// 2 "B and A" (listings in reverse sorted order) + relation clause.
    pair_style: u8,
    /// State the relation clause from the object's side (`B is below A`).
    inverse_clause: bool,
    /// Refer back to objects by colour and shape (`the red circle`) rather than by shape alone
    /// (`the circle`) in the place and background clauses; the colour is always said when both
    /// groups have the same shape.
    color_refs: bool,
    /// The attribute clause states the size too (`the circle is small and red`).
    attr_size: bool,
    bg_style: u8,
    count_style: u8,
    /// The count clause says `shapes` rather than `objects`.
    count_shapes: bool,
    /// Order of the clauses after the opener: a permutation of indices into [`CLAUSE_KINDS`].
    order: [u8; 4],
    /// Separator before clause i+1: true for ". ", false for ", ".
    full_stops: [bool; 6],
}

impl Phrasing {
    pub fn random<R: Rng + ?Sized>(rng: &mut R) -> Phrasing {
        let mut full_stops = [false; 6];
        for s in &mut full_stops {
            *s = rng.gen_bool(0.3);
        }
        let mut order = [0u8, 1, 2, 3];
        order.shuffle(rng);
        Phrasing {
            opener: rng.gen_range(0..OPENERS.len()),
            pair_style: rng.gen_range(0..3),
            inverse_clause: rng.gen_bool(0.3),
            color_refs: rng.gen_bool(0.7),
            attr_size: rng.gen_bool(0.5),
            bg_style: rng.gen_range(0..3),
            count_style: rng.gen_range(0..3),
            count_shapes: rng.gen_bool(0.4),
            order,
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

/// `a red circle`, `an orange star`, `three blue squares`: the short form used in listings.
fn short_noun_phrase(g: &Group) -> String {
    let det = match g.count {
        1 if g.color.name().starts_with(['a', 'e', 'i', 'o', 'u']) => "an".to_string(),
        1 => "a".to_string(),
        n => number_word(n),
    };
    format!("{det} {} {}", g.color.name(), g.shape.noun(g.count))
}

/// Whether another group has group `i`'s shape (then the shape alone does not say which is meant).
fn shape_shared(desc: &SceneDesc, i: usize) -> bool {
    let g = desc.groups[i];
    desc.groups
        .iter()
        .enumerate()
        .any(|(j, o)| j != i && o.shape == g.shape)
}

/// Refer back to group `i`: `the red circle` (with `color`, or when the other group has the same
/// shape) or `the circle`.
fn referring(desc: &SceneDesc, i: usize, color: bool) -> String {
    let g = desc.groups[i];
    if color || shape_shared(desc, i) {
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

/// The groups in the order a description names them: subject first when there is a relation.
fn group_order(desc: &SceneDesc) -> Vec<usize> {
    match desc.relation {
        Some((s, _, o)) if desc.groups.len() == 2 => vec![s, o],
        _ => (0..desc.groups.len()).collect(),
    }
}

/// `the triangle is small and red`, `the red circles are large`: what group `i` looks like, the
/// object named by its shape (by colour too when the shape is shared, then the colour is not
/// repeated). Always says at least one attribute.
fn attribute_clause(desc: &SceneDesc, i: usize, with_size: bool) -> String {
    let g = desc.groups[i];
    let color_in_ref = shape_shared(desc, i);
    let mut words: Vec<&str> = Vec::new();
    if with_size || color_in_ref {
        words.push(g.size.name());
    }
    if g.texture != Texture::Solid {
        words.push(g.texture.name());
    }
    if !color_in_ref {
        words.push(g.color.name());
    }
    format!(
        "{} {} {}",
        referring(desc, i, false),
        copula(&g),
        words.join(" and ")
    )
}

/// The background as a noun phrase: `a plain grey background`, `a grey and white striped
/// background`, `a black background with white dots`.
fn background_np(desc: &SceneDesc) -> String {
    let c1 = desc.bg_colors.first().map(|c| c.name()).unwrap_or("white");
    let c2 = desc.bg_colors.get(1).map(|c| c.name()).unwrap_or(c1);
    match desc.pattern {
        Pattern::Plain => format!("a plain {c1} background"),
        Pattern::Striped => format!("a {c1} and {c2} striped background"),
        Pattern::Checkered => format!("a {c1} and {c2} checkered background"),
        Pattern::Dotted => format!("a {c1} background with {c2} dots"),
    }
}

/// Parts joined with `and` in sorted order. Listings that say nothing about which group is which
/// (`the red star and the blue ring sit on ...`) are written in one order whatever the groups'
/// order, so a negative that only swaps the groups' order does not look like a changed clause
/// while saying the same thing.
fn sorted_and(mut parts: Vec<String>, reverse: bool) -> String {
    parts.sort();
    if reverse {
        parts.reverse();
    }
    parts.join(" and ")
}

fn background_clause(desc: &SceneDesc, ph: &Phrasing) -> String {
    let order = group_order(desc);
    let objs = sorted_and(
        order
            .iter()
            .map(|&i| referring(desc, i, ph.color_refs))
            .collect(),
        ph.pair_style == 2,
    );
    let singular = matches!(order.as_slice(), [i] if desc.groups[*i].count == 1);
    let c1 = desc.bg_colors.first().map(|c| c.name()).unwrap_or("white");
    let c2 = desc.bg_colors.get(1).map(|c| c.name()).unwrap_or(c1);
    match ph.bg_style % 3 {
        0 => format!(
            "{objs} {} set against {}",
            if singular { "is" } else { "are" },
            background_np(desc)
        ),
        1 => {
            let what = match desc.pattern {
                Pattern::Plain => format!("plain {c1}"),
                Pattern::Striped => format!("striped in {c1} and {c2}"),
                Pattern::Checkered => format!("checkered in {c1} and {c2}"),
                Pattern::Dotted => format!("{c1} with {c2} dots"),
            };
            format!("the background behind {objs} is {what}")
        }
        _ => format!(
            "{objs} {} on {}",
            if singular { "sits" } else { "sit" },
            background_np(desc)
        ),
    }
}

fn count_clause(desc: &SceneDesc, ph: &Phrasing) -> String {
    let total = desc.total();
    let n = number_word(total);
    let noun = match (ph.count_shapes, total) {
        (false, 1) => "object",
        (false, _) => "objects",
        (true, 1) => "shape",
        (true, _) => "shapes",
    };
    let be = if total == 1 { "is" } else { "are" };
    let list = sorted_and(
        group_order(desc)
            .iter()
            .map(|&i| short_noun_phrase(&desc.groups[i]))
            .collect(),
        ph.pair_style == 2,
    );
    match ph.count_style % 3 {
        0 => format!("there {be} {n} {noun} in total: {list}"),
        1 => format!("the image contains {n} {noun}: {list}"),
        _ => format!("{n} {noun} {be} visible: {list}"),
    }
}

/// The clauses of the long description of `desc` with the choices of `ph`, opener first.
pub fn describe_clauses(desc: &SceneDesc, ph: &Phrasing) -> Vec<String> {
    let opener = OPENERS[ph.opener % OPENERS.len()];
    let mut clauses: Vec<String> = Vec::new();
    let mut place: Option<String> = None;
    match (desc.groups.as_slice(), desc.relation) {
        ([g], _) => {
            clauses.push(format!("{opener} {}", noun_phrase(g)));
            if let (Some(z), 1) = (desc.zone, g.count) {
                place = Some(format!(
                    "{} is near the {} of the image",
                    referring(desc, 0, ph.color_refs),
                    z.phrase()
                ));
            }
        }
        ([_, _], Some((s, rel, o))) => {
            let (gs, go) = (&desc.groups[s], &desc.groups[o]);
            place = Some(if ph.inverse_clause {
                format!(
                    "{} {} {} {}",
                    referring(desc, o, ph.color_refs),
                    copula(go),
                    rel.inverse().phrase(),
                    referring(desc, s, ph.color_refs)
                )
            } else {
                format!(
                    "{} {} {} {}",
                    referring(desc, s, ph.color_refs),
                    copula(gs),
                    rel.phrase(),
                    referring(desc, o, ph.color_refs)
                )
            });
            clauses.push(match ph.pair_style {
                0 => format!(
                    "{opener} {} {} {}",
                    noun_phrase(gs),
                    rel.phrase(),
                    noun_phrase(go)
                ),
                _ => format!(
                    "{opener} {}",
                    sorted_and(vec![noun_phrase(gs), noun_phrase(go)], ph.pair_style == 2)
                ),
            });
        }
        (groups, _) => {
            let nps: Vec<String> = groups.iter().map(noun_phrase).collect();
            clauses.push(format!("{opener} {}", nps.join(" and ")));
        }
    }
    for &k in &ph.order {
        match CLAUSE_KINDS[k as usize % CLAUSE_KINDS.len()] {
            ClauseKind::Place => clauses.extend(place.take()),
            ClauseKind::Attributes => clauses.push(sorted_and(
                group_order(desc)
                    .iter()
                    .map(|&i| attribute_clause(desc, i, ph.attr_size))
                    .collect(),
                ph.pair_style == 2,
            )),
            ClauseKind::Background => clauses.push(background_clause(desc, ph)),
            ClauseKind::Count => clauses.push(count_clause(desc, ph)),
        }
    }
    clauses
}

/// Write the long description of `desc` with the choices of `ph`.
pub fn describe(desc: &SceneDesc, ph: &Phrasing) -> String {
    join_clauses(&describe_clauses(desc, ph), &ph.full_stops)
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

/// Which edits the hard negatives of a corpus (d-, and the t- tags) may make: a generator setting
/// ([`super::SynthConfig::negative_rules`], `hq-data synth --negative-rules`).
///
/// Why a choice: on the built-in corpus a tiny CLIP learns colour only (colour and background
/// already tell the images of a batch apart), and with the paper's mix of edits the built-in
/// ablation's +HNI changed nothing. Negatives that keep every colour of the scene cannot be
/// rejected by that shortcut, only by looking at shapes and at which colour goes with which
/// shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NegativeRules {
    /// The paper's reading: any one minimal edit, drawn from [`Perturbation::WEIGHTED`]
    /// (recolour, reshape, swaps, relation, count, size, texture, background, place); t- mixes
    /// the same kinds of change. The default: corpora written before the setting existed are
    /// this, byte for byte.
    #[default]
    Paper,
    /// Only edits that keep the multiset of object colours, with the positive's wording but for
    /// the edited words: `reshape` (one object's shape becomes one no other object has; never
    /// of a shape two objects share), `swap_colors` between two objects of different colours
    /// (which colour goes with which shape, or with which size, texture or place when the two
    /// share a shape) and `swap_shapes` between two objects of different colours and shapes.
    /// Every scene allows one of them. t- are then colour-shape tags in the scene's own colours
    /// (`red star`, the swapped bindings) and the relation with its shapes swapped.
    ShapeBinding,
}

impl NegativeRules {
    /// The name in the command line, the manifest and each sample's JSON.
    pub fn name(self) -> &'static str {
        match self {
            NegativeRules::Paper => "paper",
            NegativeRules::ShapeBinding => "shape_binding",
        }
    }

    pub fn is_paper(&self) -> bool {
        *self == NegativeRules::Paper
    }

    /// The edits d- may make, with their weights. shape_binding keeps the paper's relative
    /// weights of the three edits it allows.
    fn weighted(self) -> &'static [(Perturbation, u32)] {
        match self {
            NegativeRules::Paper => &Perturbation::WEIGHTED,
            NegativeRules::ShapeBinding => &[
                (Perturbation::Reshape, 3),
                (Perturbation::SwapColors, 5),
                (Perturbation::SwapShapes, 2),
            ],
        }
    }
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
        (Perturbation::Recolor, 4),
        (Perturbation::Reshape, 3),
        (Perturbation::SwapColors, 5),
        (Perturbation::SwapShapes, 2),
        (Perturbation::SwapSizes, 1),
        (Perturbation::FlipRelation, 5),
        (Perturbation::ChangeCount, 2),
        (Perturbation::Resize, 1),
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

    fn applicable(self, d: &SceneDesc, rules: NegativeRules) -> bool {
        let two = d.groups.len() == 2;
        let colors_differ = two && d.groups[0].color != d.groups[1].color;
        match self {
            Perturbation::SwapColors => colors_differ,
            // Between two objects of one colour a shape swap keeps every colour-shape pair (only
            // sizes, textures or places change hands): not a colour-binding edit.
            Perturbation::SwapShapes => {
                two && d.groups[0].shape != d.groups[1].shape && (rules.is_paper() || colors_differ)
            }
            // shape_binding reshapes only an object whose shape no other has (see `perturb`).
            Perturbation::Reshape if !rules.is_paper() => {
                (0..d.groups.len()).any(|i| !shape_shared(d, i))
            }
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

/// Apply one perturbation under `rules`; `None` when it cannot change this scene.
pub fn perturb<R: Rng + ?Sized>(
    d: &SceneDesc,
    p: Perturbation,
    rules: NegativeRules,
    rng: &mut R,
) -> Option<SceneDesc> {
    if !p.applicable(d, rules) {
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
            // A description names the colour along with a shape two objects share, so under
            // shape_binding a shape never becomes, nor stops being, shared: the negative then
            // differs from the positive in that object's shape words only.
            let keep_wording = !rules.is_paper();
            if keep_wording && shape_shared(d, gi) {
                return None;
            }
            let options: Vec<Shape> = Shape::ALL
                .iter()
                .copied()
                .filter(|s| {
                    *s != g.shape
                        && !others.iter().any(|o| (o.shape, o.color) == (*s, g.color))
                        && !(keep_wording && others.iter().any(|o| o.shape == *s))
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

/// A hard-negative scene: ONE perturbation allowed by `rules` (a minimal edit: a colour, shape,
/// size, count or place changed, two attributes or the relation swapped, the background changed),
/// under the paper's rules weighted towards the binding errors ARO measures (swapped colours,
/// flipped relations) and recolourings. Returns the changed description and the perturbation
/// applied (a list, for the metadata's format).
pub fn hard_negative<R: Rng + ?Sized>(
    d: &SceneDesc,
    rules: NegativeRules,
    rng: &mut R,
) -> (SceneDesc, Vec<Perturbation>) {
    let choose = |rng: &mut R, d: &SceneDesc| -> Option<Perturbation> {
        let opts: Vec<(Perturbation, u32)> = rules
            .weighted()
            .iter()
            .copied()
            .filter(|(p, _)| p.applicable(d, rules))
            .collect();
        opts.choose_weighted(rng, |(_, w)| *w).ok().map(|(p, _)| *p)
    };
    for _ in 0..32 {
        let Some(p1) = choose(rng, d) else {
            break;
        };
        let Some(n1) = perturb(d, p1, rules, rng) else {
            continue;
        };
        return (n1, vec![p1]);
    }
    // Unreachable for generated scenes (a background colour can always change; under
    // shape_binding a lone group can always be reshaped, and two groups of one shape differ in
    // colour, so their colours can swap); keep a safe answer.
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
/// [`tag_holds`]) and of the kinds `rules` allows; 3 to 5 of them.
pub fn negative_tags<R: Rng + ?Sized>(
    scene: &Scene,
    positives: &[String],
    rules: NegativeRules,
    rng: &mut R,
) -> Vec<String> {
    let mut cands = match rules {
        NegativeRules::Paper => paper_tag_candidates(scene, rng),
        NegativeRules::ShapeBinding => shape_binding_tag_candidates(scene),
    };
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
    // Always at least one, certainly false: a wrong count, or under shape_binding the first
    // group's colour on a shape the scene does not have.
    if out.is_empty() {
        out.push(match rules {
            NegativeRules::Paper => {
                let wrong = if scene.total_objects() == 2 { 3 } else { 2 };
                format!("{} objects", number_word(wrong))
            }
            NegativeRules::ShapeBinding => {
                let color = scene.groups.first().map_or(Color::Red, |g| g.color);
                let absent = Shape::ALL
                    .iter()
                    .find(|s| !scene.groups.iter().any(|g| g.shape == **s))
                    .copied()
                    .unwrap_or(Shape::Star);
                format!("{} {}", color.name(), absent.name())
            }
        });
    }
    out
}

/// The paper's candidate negative tags: swapped bindings, other colours, shapes and sizes, the
/// swapped relation, a background and a count.
fn paper_tag_candidates<R: Rng + ?Sized>(scene: &Scene, rng: &mut R) -> Vec<String> {
    let mut cands = swapped_binding_tags(scene);
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
    cands.extend(swapped_relation_tag(scene));
    cands.push(format!("{} background", Pattern::random(rng).name()));
    cands.push(format!("{} background", BgColor::random(rng).name()));
    let n = rng.gen_range(1..=4u32);
    cands.push(format!(
        "{} {}",
        number_word(n),
        if n == 1 { "object" } else { "objects" }
    ));
    cands
}

/// shape_binding's candidate negative tags, none naming a colour the scene lacks: the swapped
/// colour-shape bindings, each object's colour on every shape the scene does not have (its
/// reshapes), and the relation with its shapes swapped.
fn shape_binding_tag_candidates(scene: &Scene) -> Vec<String> {
    let mut cands = swapped_binding_tags(scene);
    for g in &scene.groups {
        for s in Shape::ALL {
            if !scene.groups.iter().any(|o| o.shape == *s) {
                cands.push(format!("{} {}", g.color.name(), s.name()));
            }
        }
    }
    cands.extend(swapped_relation_tag(scene));
    cands
}

/// Swapped bindings (`blue circle, red square` for a red circle and a blue square): the hardest
/// negative tags, the ones ARO's attribute test asks about.
fn swapped_binding_tags(scene: &Scene) -> Vec<String> {
    match scene.groups.as_slice() {
        [a, b] if a.color != b.color => vec![
            format!("{} {}", b.color.name(), a.shape.name()),
            format!("{} {}", a.color.name(), b.shape.name()),
        ],
        _ => Vec::new(),
    }
}

/// The relation with subject and object swapped (`square above circle`, ARO's relation test).
fn swapped_relation_tag(scene: &Scene) -> Option<String> {
    let r = scene.relation?;
    let (s, o) = (scene.groups[r.subject], scene.groups[r.object]);
    (s.shape != o.shape).then(|| {
        format!(
            "{} {} {}",
            o.shape.name(),
            r.relation.name(),
            s.shape.name()
        )
    })
}

/// The four oracle texts for a scene, with hard negatives under `rules`, and the perturbations
/// behind the negative description.
pub fn oracle_texts<R: Rng + ?Sized>(
    scene: &Scene,
    rules: NegativeRules,
    rng: &mut R,
) -> (RefinedTexts, Vec<Perturbation>) {
    let desc = scene.desc();
    let ph = Phrasing::random(rng);
    let long_positive = describe(&desc, &ph);
    let (neg, perts) = hard_negative(&desc, rules, rng);
    let mut long_negative = describe(&neg, &ph);
    if long_negative == long_positive {
        // Cannot happen when the canonical forms differ; keep the format's invariant regardless.
        long_negative = describe(&hard_negative(&desc, rules, rng).0, &ph);
    }
    let tags_positive = positive_tags(scene, rng);
    let tags_negative = negative_tags(scene, &tags_positive, rules, rng);
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
    let ph = Phrasing::random(rng);
    let clauses = describe_clauses(&desc, &ph);
    let mut all = vec![
        format!("{subject} on {bg_adj} background"),
        // Two clauses: a whole description would not fit a 32-token context.
        join_clauses(&clauses[..clauses.len().min(2)], &ph.full_stops),
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

/// The relation phrase between two noun phrases (`is above`, `to the left of`, ...); also the
/// quality report's reader of model texts.
pub(crate) fn relation_between(words: &[String]) -> Option<Relation> {
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

/// An attribute word of an object.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Attribute {
    Color(Color),
    Size(Size),
    Texture(Texture),
}

impl Attribute {
    fn parse(w: &str) -> Option<Attribute> {
        Color::from_name(w)
            .map(Attribute::Color)
            .or_else(|| Size::from_name(w).map(Attribute::Size))
            .or_else(|| Texture::from_name(w).map(Attribute::Texture))
    }

    fn name(&self) -> &'static str {
        match self {
            Attribute::Color(c) => c.name(),
            Attribute::Size(s) => s.name(),
            Attribute::Texture(t) => t.name(),
        }
    }
}

/// The attributes of `is|are small and red [and ...]` at the start of `words` (the words after a
/// noun phrase); empty when they do not start that way. An `and` not followed by an attribute
/// ends the list (`... is red and the circle is blue`).
fn predicated_attributes(words: &[String]) -> Vec<Attribute> {
    let mut out = Vec::new();
    if !matches!(words.first().map(String::as_str), Some("is" | "are")) {
        return out;
    }
    let mut k = 1;
    while let Some(w) = words.get(k) {
        if let Some(a) = Attribute::parse(w) {
            out.push(a);
            k += 1;
        } else if w == "and" && words.get(k + 1).and_then(|n| Attribute::parse(n)).is_some() {
            k += 1;
        } else {
            break;
        }
    }
    out
}

/// Statements of `text` that contradict `scene`, as readable reasons, and how many statements were
/// checked. Understands the generator's own phrasing: noun phrases (`two small red circles`,
/// `the circle`), relations between consecutive noun phrases, attributes predicated of a noun
/// phrase (`the circle is small and red`), `near the <zone> of the image`, `<n> objects` (or
/// `shapes`), and the background clause.
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
            if matches!(t.as_str(), "object" | "objects" | "shape" | "shapes") && i > 0 {
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
        // `the triangle is small and red`: attributes predicated of a noun phrase (not in a
        // background clause, where `the background behind the circle is striped` speaks of the
        // background).
        let about_background = toks.iter().any(|t| t == "background");
        for np in nps.iter().filter(|_| !about_background) {
            let attrs = predicated_attributes(&toks[np.end + 1..]);
            if attrs.is_empty() {
                continue;
            }
            checked += 1;
            let holds = matching(np).iter().any(|&i| {
                let g = &scene.groups[i];
                attrs.iter().all(|a| match a {
                    Attribute::Color(c) => g.color == *c,
                    Attribute::Size(s) => g.size == *s,
                    Attribute::Texture(t) => g.texture == *t,
                })
            });
            if !holds {
                bad.push(format!(
                    "{} is not {}",
                    np.describe(),
                    attrs
                        .iter()
                        .map(Attribute::name)
                        .collect::<Vec<_>>()
                        .join(" and ")
                ));
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

    /// At the default object scale and at a larger one (sizes are classes: truth does not depend
    /// on the radii, but a lone object's zone does on its position).
    #[test]
    fn oracle_texts_are_true_negatives_false_and_round_trip() {
        for (scale, scenes) in [(1.0, 4000), (1.6, 600)] {
            oracle_texts_hold(scale, scenes);
        }
    }

    fn oracle_texts_hold(scale: f32, scenes: usize) {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut kinds = std::collections::HashMap::new();
        for _ in 0..scenes {
            let scene = Scene::random_scaled(&mut rng, scale);
            let (t, perts) = oracle_texts(&scene, NegativeRules::Paper, &mut rng);
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
            // Every training segment of d+ names an object and is true on its own; d- differs
            // from d+ in at least one segment, and each changed segment is false on its own.
            let pos_segs = crate::text::segment::segments(&t.long_positive);
            assert!(pos_segs.len() >= 3, "{}", t.long_positive);
            for seg in &pos_segs {
                assert!(
                    tokens(seg).iter().any(|w| Shape::from_noun(w).is_some()),
                    "segment names no object: {seg:?}"
                );
                let (bad, n) = check_text(&scene, seg);
                assert!(bad.is_empty() && n >= 1, "{seg:?}: {bad:?}");
            }
            let changed =
                crate::text::segment::changed_segments(&t.long_positive, &t.long_negative);
            assert!(!changed.is_empty(), "{}", t.long_negative);
            for seg in changed {
                assert!(
                    !check_text(&scene, seg).0.is_empty(),
                    "{seg:?} holds ({perts:?})"
                );
            }
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
        assert!(
            kinds.len() >= 10,
            "scale {scale}: perturbation kinds used: {kinds:?}"
        );
    }

    /// The words of a description by kind, each as a sorted multiset.
    #[derive(Debug, PartialEq)]
    struct WordKinds {
        colors: Vec<Color>,
        shapes: Vec<Shape>,
        other: Vec<String>,
    }

    impl WordKinds {
        fn of(text: &str) -> WordKinds {
            let mut w = WordKinds {
                colors: Vec::new(),
                shapes: Vec::new(),
                other: Vec::new(),
            };
            for t in tokens(text) {
                if let Some(c) = Color::from_name(&t) {
                    w.colors.push(c);
                } else if let Some((s, _)) = Shape::from_noun(&t) {
                    w.shapes.push(s);
                } else if t == "an" {
                    // `a red cross`, `an orange cross`: the article follows the colour.
                    w.other.push("a".to_string());
                } else {
                    w.other.push(t);
                }
            }
            w.colors.sort();
            w.shapes.sort();
            w.other.sort();
            w
        }
    }

    /// The (colour, shape) pairs the noun phrases of `text` state.
    fn color_shape_pairs(text: &str) -> std::collections::BTreeSet<(Color, Shape)> {
        text.split([',', '.', ';', ':'])
            .flat_map(|clause| noun_phrases(&tokens(clause)))
            .filter_map(|np| np.color.map(|c| (c, np.shape)))
            .collect()
    }

    /// Under shape_binding, on a generated corpus: d- is false for the scene (and so is each
    /// changed segment, and each t- tag), keeps every colour word, and differs from d+ only as
    /// its edit says: a reshape replaces one shape's words by another's, a swap rearranges the
    /// same words (and for two shapes, changes a colour-shape pair). t- names only the scene's
    /// colours, shapes and relations.
    #[test]
    fn shape_binding_negatives_keep_the_colours_and_change_shape_or_binding() {
        let cfg = crate::synth::SynthConfig {
            image_size: 16,
            negative_rules: NegativeRules::ShapeBinding,
            ..Default::default()
        };
        let mut kinds = std::collections::HashMap::new();
        for i in 0..400 {
            let g = crate::synth::train_sample(&cfg, i).expect("sample");
            assert_eq!(g.sample.meta["negative_rules"], "shape_binding");
            let (scene, t) = (&g.scene, g.sample.refined.as_ref().expect("texts"));
            let why = format!(
                "{:?}\n+ {}\n- {}",
                g.perturbations, t.long_positive, t.long_negative
            );
            assert!(!check_text(scene, &t.long_negative).0.is_empty(), "{why}");
            for seg in crate::text::segment::changed_segments(&t.long_positive, &t.long_negative) {
                assert!(!check_text(scene, seg).0.is_empty(), "{seg:?} holds: {why}");
            }
            let (pos, neg) = (
                WordKinds::of(&t.long_positive),
                WordKinds::of(&t.long_negative),
            );
            assert_eq!(pos.colors, neg.colors, "{why}");
            assert_eq!(pos.other, neg.other, "{why}");
            match g.perturbations.as_slice() {
                [Perturbation::Reshape] => {
                    let gone: Vec<Shape> = pos
                        .shapes
                        .iter()
                        .filter(|s| !neg.shapes.contains(s))
                        .copied()
                        .collect();
                    let new: Vec<Shape> = neg
                        .shapes
                        .iter()
                        .filter(|s| !pos.shapes.contains(s))
                        .copied()
                        .collect();
                    assert!(!gone.is_empty() && gone.len() == new.len(), "{why}");
                    assert!(gone.iter().all(|s| *s == gone[0]), "{why}");
                    assert!(new.iter().all(|s| *s == new[0]), "{why}");
                }
                [p @ (Perturbation::SwapColors | Perturbation::SwapShapes)] => {
                    assert_eq!(pos.shapes, neg.shapes, "{why}");
                    assert_ne!(t.long_positive, t.long_negative);
                    let two_shapes =
                        scene.groups.len() == 2 && scene.groups[0].shape != scene.groups[1].shape;
                    if two_shapes || *p == Perturbation::SwapShapes {
                        assert_ne!(
                            color_shape_pairs(&t.long_positive),
                            color_shape_pairs(&t.long_negative),
                            "{why}"
                        );
                    }
                }
                other => panic!("{other:?} is not a shape_binding edit"),
            }
            for p in &g.perturbations {
                *kinds.entry(*p).or_insert(0) += 1;
            }
            assert!(!t.tags_negative.is_empty());
            for tag in &t.tags_negative {
                assert_eq!(tag_holds(scene, tag), Some(false), "{tag}");
                for w in tokens(tag) {
                    let known = match Color::from_name(&w) {
                        Some(c) => scene.groups.iter().any(|g| g.color == c),
                        None => {
                            Shape::from_noun(&w).is_some()
                                || matches!(w.as_str(), "above" | "below" | "left" | "right" | "of")
                        }
                    };
                    assert!(known, "{tag:?} in {:?}", scene.groups);
                }
            }
        }
        assert_eq!(kinds.len(), 3, "{kinds:?}");
    }

    /// The default rules leave no trace in a sample or the settings' JSON, so a default corpus
    /// stays byte-identical to one written before the setting existed.
    #[test]
    fn paper_rules_are_not_recorded() {
        let cfg = crate::synth::SynthConfig {
            image_size: 16,
            ..Default::default()
        };
        let g = crate::synth::train_sample(&cfg, 0).expect("sample");
        assert!(!g.sample.meta.contains_key("negative_rules"));
        let json = serde_json::to_value(&cfg).expect("json");
        assert!(json.get("negative_rules").is_none(), "{json}");
        let back: crate::synth::SynthConfig = serde_json::from_value(json).expect("read back");
        assert_eq!(back.negative_rules, NegativeRules::Paper);
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
            color_refs: true,
            attr_size: false,
            bg_style: 1,
            count_style: 0,
            count_shapes: false,
            order: [1, 0, 2, 3],
            full_stops: [false, true, false, false, false, false],
        };
        assert_eq!(
            describe(&scene.desc(), &ph),
            "The image shows a small red triangle above a large blue circle, the circle is blue \
             and the triangle is red. The red triangle is above the blue circle, the background \
             behind the blue circle and the red triangle is striped in grey and white, there are \
             two objects in total: a blue circle and a red triangle."
        );
        // Every clause names an object, and the checker reads each one.
        for clause in describe_clauses(&scene.desc(), &ph) {
            let (bad, n) = check_text(&scene, &clause);
            assert!(bad.is_empty() && n >= 2, "{clause}: {bad:?}, {n} checked");
        }
        let (bad, _) = check_text(&scene, "The triangle is blue and the circle is red.");
        assert_eq!(bad.len(), 2, "{bad:?}");
        let (bad, _) = check_text(
            &scene,
            "The triangle is small and red and the circle is large.",
        );
        assert!(bad.is_empty(), "{bad:?}");
        let (bad, _) = check_text(&scene, "There are three shapes in total.");
        assert_eq!(bad.len(), 1, "{bad:?}");
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
