//! Scene claims: what a text states about a synthetic scene, read with a small fixed grammar, and
//! the judgement of those statements against the scene's ground truth.
//!
//! This is the one place where the quality report reads phrases. It is deliberately literal: a
//! statement is only recognised in the corpus's vocabulary (the shapes, colours, sizes, textures,
//! number words, relation phrases and background patterns of [`crate::synth::scene`]), so what it
//! does not understand is "not stated", never "wrong". Precision over recall.
//!
//! # Grammar
//! A text is cut into clauses at `, . ; : ! ? | ( )` and line breaks; a clause into lower-case
//! words (punctuation trimmed from both ends of each word). Within a clause:
//! - **mention**: a shape noun (`circle` or `circles`, [`Shape::from_noun`]) with the words right
//!   before it, read backwards while they are colours (object colours, or the background colours
//!   `white grey gray black beige`, which no object has), sizes or textures; then at most one
//!   determiner: `a`/`an` (count 1), a number word `zero`..`six` or digits (that count), or
//!   `the`. `two small dotted red circles` is count 2, small, dotted, red, circle. A mention right
//!   after `no`, `not` or `without` is negated and ignored. Without a number the count is not
//!   stated (a bare plural only says "several").
//! - **predicate**: `is|are` right after a mention followed by attribute words joined with `and`
//!   (`the ring is small and dotted and orange`) adds those attributes to the mention; an `and`
//!   not followed by an attribute ends the list. Not for mentions after `behind` (`the background
//!   behind the circle is striped` speaks of the background).
//! - **relation**: two consecutive mentions with, between them, optionally `is|are` and then
//!   `above`, `below`, `(to the) left of` or `(to the) right of`: `a red cross to the left of a
//!   ring`, `cross left of ring`.
//! - **total count**: a number right before `object(s)`, `shape(s)` or `item(s)`: `three objects`.
//! - **background**: around the word `background`: the run of pattern words (`plain striped
//!   checkered dotted`), colour words and `and` right before it (`a black and white checkered
//!   background`), and the run after `background with`, `background is|are` or `background behind
//!   ... is|are` (`the background behind the circle is striped in grey and white`, `... is beige
//!   with white dots`), where `dots`/`stripes` also name the pattern.
//! - **place**: a mention followed by `(is|are)? (near|in|at) the <zone> (of the image|of the
//!   picture|corner)`, zone one of [`Zone::phrase`] (`center`, `centre` and `middle` are the same).
//! - **bare colour**: a text that is one object-colour word (a tag such as `red`).
//!
//! # Judgement
//! A mention's *candidates* are the scene's groups of its shape; none means the shape is stated
//! wrong and nothing else of that mention is judged. Its colours are judged against the
//! candidates; its *referents* are the candidates of a stated colour (all candidates when none
//! matches). Size, texture and count are right when some referent has them; a relation is right
//! when it holds geometrically ([`Scene::relation_holds`]) for some referent pair; a place is judged
//! only when the referents hold exactly one object. So `a blue cross` for a scene with a red cross
//! and a blue ring is a wrong colour (attributes are judged on the shape they are attached to).

use crate::synth::captions::{relation_between, NUMBERS};
use crate::synth::scene::{BgColor, Color, Pattern, Relation, Scene, Shape, Size, Texture, Zone};
use serde::{Deserialize, Serialize};

fn number(w: &str) -> Option<u32> {
    NUMBERS
        .iter()
        .position(|n| *n == w)
        .map(|i| i as u32)
        .or_else(|| {
            if !w.is_empty() && w.len() <= 3 && w.chars().all(|c| c.is_ascii_digit()) {
                w.parse().ok()
            } else {
                None
            }
        })
}

/// A colour word: an object colour, or a neutral (background) colour, which no object has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ColorWord {
    Object(Color),
    Neutral(BgColor),
}

impl ColorWord {
    pub fn parse(w: &str) -> Option<ColorWord> {
        let w = if w == "gray" { "grey" } else { w };
        Color::from_name(w)
            .map(ColorWord::Object)
            .or_else(|| BgColor::from_name(w).map(ColorWord::Neutral))
    }

    pub fn name(self) -> &'static str {
        match self {
            ColorWord::Object(c) => c.name(),
            ColorWord::Neutral(c) => c.name(),
        }
    }
}

/// One non-negated mention of an object: `two small dotted red circles`, `the ring` (+ predicate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mention {
    pub shape: Shape,
    pub plural: bool,
    /// Stated number (`a`/`an` = 1, a number word or digits); `None` when not stated.
    pub count: Option<u32>,
    pub colors: Vec<ColorWord>,
    pub sizes: Vec<Size>,
    pub textures: Vec<Texture>,
}

/// `mentions[subject] relation mentions[object]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelationClaim {
    pub subject: usize,
    pub relation: Relation,
    pub object: usize,
}

/// A statement about the background.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackgroundClaim {
    Pattern(Pattern),
    Color(ColorWord),
}

/// `mentions[mention]` is near `zone` of the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlaceClaim {
    pub mention: usize,
    pub zone: Zone,
}

/// Everything a text states in the corpus's vocabulary (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Claims {
    pub mentions: Vec<Mention>,
    pub relations: Vec<RelationClaim>,
    /// `<n> objects` statements.
    pub totals: Vec<u32>,
    pub background: Vec<BackgroundClaim>,
    pub places: Vec<PlaceClaim>,
    /// A text that is a single object colour (`red`): some object has that colour.
    pub bare_colors: Vec<Color>,
}

/// A mention while its clause is read: token span and whether it is negated.
struct Span {
    mention: Mention,
    start: usize,
    end: usize,
    negated: bool,
}

fn clauses(text: &str) -> impl Iterator<Item = Vec<String>> + '_ {
    text.split(|c: char| {
        matches!(
            c,
            ',' | '.' | ';' | ':' | '!' | '?' | '|' | '(' | ')' | '\n' | '\r'
        )
    })
    .map(words)
    .filter(|w| !w.is_empty())
}

fn words(clause: &str) -> Vec<String> {
    clause
        .split_whitespace()
        .map(|t| {
            t.trim_matches(|c: char| !c.is_alphanumeric())
                .to_lowercase()
        })
        .filter(|t| !t.is_empty())
        .collect()
}

/// An attribute word of an object.
enum Attribute {
    Color(ColorWord),
    Size(Size),
    Texture(Texture),
}

fn attribute(w: &str) -> Option<Attribute> {
    ColorWord::parse(w)
        .map(Attribute::Color)
        .or_else(|| Size::from_name(w).map(Attribute::Size))
        .or_else(|| Texture::from_name(w).map(Attribute::Texture))
}

fn add_attribute(m: &mut Mention, a: Attribute) {
    match a {
        Attribute::Color(c) => m.colors.push(c),
        Attribute::Size(s) => m.sizes.push(s),
        Attribute::Texture(t) => m.textures.push(t),
    }
}

fn mentions_of(toks: &[String]) -> Vec<Span> {
    let mut out = Vec::new();
    for (j, t) in toks.iter().enumerate() {
        let Some((shape, plural)) = Shape::from_noun(t) else {
            continue;
        };
        let mut m = Mention {
            shape,
            plural,
            count: None,
            colors: Vec::new(),
            sizes: Vec::new(),
            textures: Vec::new(),
        };
        let mut k = j;
        while k > 0 {
            let w = toks[k - 1].as_str();
            if let Some(a) = attribute(w) {
                add_attribute(&mut m, a);
                k -= 1;
                continue;
            }
            if w == "a" || w == "an" {
                m.count = Some(1);
                k -= 1;
            } else if w == "the" {
                k -= 1;
            } else if let Some(n) = number(w) {
                m.count = Some(n);
                k -= 1;
            }
            break;
        }
        // Read backwards; state them in reading order.
        m.colors.reverse();
        m.sizes.reverse();
        m.textures.reverse();
        let negated = k > 0 && matches!(toks[k - 1].as_str(), "no" | "not" | "without");
        out.push(Span {
            mention: m,
            start: k,
            end: j,
            negated,
        });
    }
    out
}

/// `is|are <attr> (and <attr>)*` at the start of `words`.
fn predicate(words: &[String]) -> Vec<Attribute> {
    let mut out = Vec::new();
    if !matches!(words.first().map(String::as_str), Some("is" | "are")) {
        return out;
    }
    let mut k = 1;
    while let Some(w) = words.get(k) {
        if let Some(a) = attribute(w) {
            out.push(a);
            k += 1;
        } else if w == "and" && words.get(k + 1).and_then(|n| attribute(n)).is_some() {
            k += 1;
        } else {
            break;
        }
    }
    out
}

fn pattern_word(w: &str) -> Option<Pattern> {
    match w {
        "dots" => Some(Pattern::Dotted),
        "stripes" => Some(Pattern::Striped),
        _ => Pattern::from_name(w),
    }
}

/// Background statements of one clause.
fn background_claims(toks: &[String], out: &mut Vec<BackgroundClaim>) {
    let mut push = |w: &str| {
        if let Some(p) = pattern_word(w) {
            out.push(BackgroundClaim::Pattern(p));
        } else if let Some(c) = ColorWord::parse(w) {
            out.push(BackgroundClaim::Color(c));
        }
    };
    let is_bg_word = |w: &str| pattern_word(w).is_some() || ColorWord::parse(w).is_some();
    for (i, t) in toks.iter().enumerate() {
        if t != "background" {
            continue;
        }
        // Before: `a black and white checkered background`.
        let mut k = i;
        while k > 0 && (is_bg_word(&toks[k - 1]) || toks[k - 1] == "and") {
            k -= 1;
            push(&toks[k]);
        }
        // After: `background with white dots`, `background is plain grey`, `background behind
        // the circle is striped`; any other word after `background` ends its statement.
        let after = match toks.get(i + 1).map(String::as_str) {
            Some("with" | "is" | "are") => Some(i + 2),
            Some("behind") => toks[i + 1..]
                .iter()
                .position(|w| w == "is" || w == "are")
                .map(|p| i + 1 + p + 1),
            _ => None,
        };
        if let Some(mut k) = after {
            while let Some(w) = toks.get(k) {
                if is_bg_word(w) {
                    push(w);
                } else if !matches!(w.as_str(), "and" | "in" | "with") {
                    break;
                }
                k += 1;
            }
        }
    }
}

/// `(is|are)? (near|in|at) the <zone> (of the image|of the picture|corner)`.
fn place_after(words: &[String]) -> Option<Zone> {
    let w: Vec<&str> = words
        .iter()
        .map(String::as_str)
        .skip_while(|w| *w == "is" || *w == "are")
        .collect();
    let rest = match w.as_slice() {
        ["near" | "in" | "at", "the", rest @ ..] => rest,
        _ => return None,
    };
    for end in 1..=2.min(rest.len()) {
        let (zone, tail) = rest.split_at(end);
        let tail_ok = matches!(
            tail,
            ["of", "the", "image" | "picture", ..] | ["corner", ..]
        );
        if !tail_ok {
            continue;
        }
        let phrase = zone
            .iter()
            .map(|z| match *z {
                "centre" | "middle" => "center",
                other => other,
            })
            .collect::<Vec<_>>()
            .join(" ");
        if let Some(z) = Zone::from_phrase(&phrase) {
            return Some(z);
        }
    }
    None
}

impl Claims {
    /// Read `text` (see the module docs for the grammar).
    pub fn extract(text: &str) -> Claims {
        let mut c = Claims::default();
        let all = words(text);
        if let [w] = all.as_slice() {
            if let Some(col) = Color::from_name(w) {
                c.bare_colors.push(col);
            }
        }
        for toks in clauses(text) {
            let spans = mentions_of(&toks);
            // Mentions after `behind` belong to a background clause: no predicates for them.
            let behind = toks.iter().position(|w| w == "behind");
            let mut index: Vec<Option<usize>> = Vec::with_capacity(spans.len());
            for s in &spans {
                if s.negated {
                    index.push(None);
                    continue;
                }
                let mut m = s.mention.clone();
                if behind.is_none_or(|b| s.start < b) {
                    for a in predicate(&toks[s.end + 1..]) {
                        add_attribute(&mut m, a);
                    }
                }
                index.push(Some(c.mentions.len()));
                if let Some(zone) = place_after(&toks[s.end + 1..]) {
                    c.places.push(PlaceClaim {
                        mention: c.mentions.len(),
                        zone,
                    });
                }
                c.mentions.push(m);
            }
            for (k, pair) in spans.windows(2).enumerate() {
                let (a, b) = (&pair[0], &pair[1]);
                if let (Some(ia), Some(ib)) = (index[k], index[k + 1]) {
                    if let Some(relation) = relation_between(&toks[a.end + 1..b.start]) {
                        c.relations.push(RelationClaim {
                            subject: ia,
                            relation,
                            object: ib,
                        });
                    }
                }
            }
            for (i, t) in toks.iter().enumerate().skip(1) {
                let noun = matches!(
                    t.as_str(),
                    "object" | "objects" | "shape" | "shapes" | "item" | "items"
                );
                if noun {
                    if let Some(n) = number(&toks[i - 1]) {
                        c.totals.push(n);
                    }
                }
            }
            background_claims(&toks, &mut c.background);
        }
        c
    }

    /// True when the text states nothing the grammar understands.
    pub fn is_empty(&self) -> bool {
        self.mentions.is_empty()
            && self.totals.is_empty()
            && self.background.is_empty()
            && self.bare_colors.is_empty()
    }
}

/// What a statement is about; also the rows of the report's attribute table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Attr {
    Color,
    Shape,
    Size,
    Texture,
    Count,
    Relation,
    BackgroundPattern,
    BackgroundColor,
    Place,
}

impl Attr {
    pub const ALL: [Attr; 9] = [
        Attr::Color,
        Attr::Shape,
        Attr::Size,
        Attr::Texture,
        Attr::Count,
        Attr::Relation,
        Attr::BackgroundPattern,
        Attr::BackgroundColor,
        Attr::Place,
    ];

    /// The JSON key and Markdown label.
    pub fn name(self) -> &'static str {
        match self {
            Attr::Color => "color",
            Attr::Shape => "shape",
            Attr::Size => "size",
            Attr::Texture => "texture",
            Attr::Count => "count",
            Attr::Relation => "relation",
            Attr::BackgroundPattern => "background_pattern",
            Attr::BackgroundColor => "background_color",
            Attr::Place => "place",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A text's statement of one attribute, for one sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Correct,
    Wrong,
    NotStated,
}

/// Which per-group attributes some true statement covered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Covered {
    color: bool,
    shape: bool,
    size: bool,
    texture: bool,
    count: bool,
    /// Named by colour and shape together (object recall).
    recalled: bool,
}

/// The statements of one text judged against one scene.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Judgement {
    right: [u32; 9],
    wrong: [u32; 9],
    covered: Vec<Covered>,
    /// Readable reasons, one per false statement.
    pub false_statements: Vec<String>,
}

impl Judgement {
    /// Judge `claims` against `scene` (see the module docs).
    pub fn of(claims: &Claims, scene: &Scene) -> Judgement {
        let mut j = Judgement {
            right: [0; 9],
            wrong: [0; 9],
            covered: vec![Covered::default(); scene.groups.len()],
            false_statements: Vec::new(),
        };
        let referents: Vec<Vec<usize>> = claims
            .mentions
            .iter()
            .map(|m| j.judge_mention(m, scene))
            .collect();
        for r in &claims.relations {
            let (a, b) = (&referents[r.subject], &referents[r.object]);
            if a.is_empty() || b.is_empty() {
                continue; // the shape is already wrong
            }
            let holds = a
                .iter()
                .any(|&i| b.iter().any(|&k| scene.relation_holds(i, r.relation, k)));
            let what = || {
                format!(
                    "{} is not {} {}",
                    claims.mentions[r.subject].shape,
                    r.relation.phrase(),
                    claims.mentions[r.object].shape
                )
            };
            j.count(Attr::Relation, holds, what);
        }
        let total = scene.total_objects();
        for &n in &claims.totals {
            let ok = n == total;
            j.count(Attr::Count, ok, || {
                format!("{n} objects in total, not {total}")
            });
            if ok && scene.groups.len() == 1 {
                j.covered[0].count = true;
            }
        }
        for b in &claims.background {
            match *b {
                BackgroundClaim::Pattern(p) => {
                    let ok = p == scene.background.pattern;
                    j.count(Attr::BackgroundPattern, ok, || {
                        format!("background is not {}", p.name())
                    });
                }
                BackgroundClaim::Color(c) => {
                    let ok =
                        matches!(c, ColorWord::Neutral(n) if scene.background.colors.contains(&n));
                    j.count(Attr::BackgroundColor, ok, || {
                        format!("background has no {}", c.name())
                    });
                }
            }
        }
        for p in &claims.places {
            let objs: Vec<_> = scene
                .objects
                .iter()
                .filter(|o| referents[p.mention].contains(&o.group))
                .collect();
            if let [o] = objs.as_slice() {
                let ok = Zone::of(o.x, o.y) == p.zone;
                j.count(Attr::Place, ok, || {
                    format!("{} is not near the {}", o.shape, p.zone.phrase())
                });
            }
        }
        for &c in &claims.bare_colors {
            let ok = scene.groups.iter().any(|g| g.color == c);
            j.count(Attr::Color, ok, || format!("no {c} object"));
        }
        j
    }

    fn count(&mut self, attr: Attr, ok: bool, why: impl FnOnce() -> String) {
        if ok {
            self.right[attr.index()] += 1;
        } else {
            self.wrong[attr.index()] += 1;
            self.false_statements.push(why());
        }
    }

    /// Judge one mention; returns its referents (empty when its shape is not in the scene).
    fn judge_mention(&mut self, m: &Mention, scene: &Scene) -> Vec<usize> {
        let candidates: Vec<usize> = (0..scene.groups.len())
            .filter(|&i| scene.groups[i].shape == m.shape)
            .collect();
        if candidates.is_empty() {
            self.count(Attr::Shape, false, || format!("no {}", m.shape));
            return candidates;
        }
        self.count(Attr::Shape, true, String::new);
        for &i in &candidates {
            self.covered[i].shape = true;
        }
        for &c in &m.colors {
            let hits: Vec<usize> = candidates
                .iter()
                .copied()
                .filter(|&i| ColorWord::Object(scene.groups[i].color) == c)
                .collect();
            self.count(Attr::Color, !hits.is_empty(), || {
                format!("no {} {}", c.name(), m.shape)
            });
            for i in hits {
                self.covered[i].color = true;
                self.covered[i].recalled = true;
            }
        }
        let colored: Vec<usize> = candidates
            .iter()
            .copied()
            .filter(|&i| m.colors.contains(&ColorWord::Object(scene.groups[i].color)))
            .collect();
        let referents = if colored.is_empty() {
            candidates
        } else {
            colored
        };
        for &s in &m.sizes {
            let hits: Vec<usize> = referents
                .iter()
                .copied()
                .filter(|&i| scene.groups[i].size == s)
                .collect();
            self.count(Attr::Size, !hits.is_empty(), || {
                format!("the {} is not {}", m.shape, s.name())
            });
            for i in hits {
                self.covered[i].size = true;
            }
        }
        for &t in &m.textures {
            let hits: Vec<usize> = referents
                .iter()
                .copied()
                .filter(|&i| scene.groups[i].texture == t)
                .collect();
            self.count(Attr::Texture, !hits.is_empty(), || {
                format!("the {} is not {}", m.shape, t.name())
            });
            for i in hits {
                self.covered[i].texture = true;
            }
        }
        if let Some(n) = m.count {
            let hits: Vec<usize> = referents
                .iter()
                .copied()
                .filter(|&i| scene.groups[i].count == n)
                .collect();
            self.count(Attr::Count, !hits.is_empty(), || {
                format!("not {n} {}", m.shape.noun(n))
            });
            for i in hits {
                self.covered[i].count = true;
            }
        }
        referents
    }

    /// Statements judged, right or wrong.
    pub fn statements(&self) -> u32 {
        self.right.iter().sum::<u32>() + self.wrong.iter().sum::<u32>()
    }

    /// At least one statement is false for the scene.
    pub fn has_false(&self) -> bool {
        self.wrong.iter().any(|&w| w > 0)
    }

    /// True statements of one attribute.
    pub fn right(&self, attr: Attr) -> u32 {
        self.right[attr.index()]
    }

    /// False statements of one attribute.
    pub fn wrong(&self, attr: Attr) -> u32 {
        self.wrong[attr.index()]
    }

    /// Groups named by their colour and shape together.
    pub fn recalled_groups(&self) -> usize {
        self.covered.iter().filter(|c| c.recalled).count()
    }

    /// For a tag: `Some(true)` when it states something and all of it is true, `Some(false)` when
    /// something is false, `None` when it states nothing the grammar understands.
    pub fn tag_truth(&self) -> Option<bool> {
        if self.has_false() {
            Some(false)
        } else if self.statements() > 0 {
            Some(true)
        } else {
            None
        }
    }

    /// The sample-level verdict for `attr`, `None` when the scene does not have it. Object
    /// attributes (colour, shape, size, count): wrong when any statement is false, correct when
    /// every group has a true statement, else not stated (partly stated counts as not stated).
    /// Texture: the same over the striped and dotted groups (a description leaves `solid`
    /// unsaid), applicable only when there is one. Relation (two groups), background pattern,
    /// background colour, place (a lone object): wrong when any statement is false, correct when
    /// one is true.
    pub fn verdict(&self, attr: Attr, scene: &Scene) -> Option<Verdict> {
        let wrong = self.wrong(attr) > 0;
        let all = |f: fn(&Covered) -> bool| self.covered.iter().all(f);
        let complete = match attr {
            Attr::Color => all(|c| c.color),
            Attr::Shape => all(|c| c.shape),
            Attr::Size => all(|c| c.size),
            Attr::Count => all(|c| c.count),
            Attr::Texture => {
                if scene.groups.iter().all(|g| g.texture == Texture::Solid) {
                    return None;
                }
                scene
                    .groups
                    .iter()
                    .zip(&self.covered)
                    .all(|(g, c)| g.texture == Texture::Solid || c.texture)
            }
            Attr::Relation => {
                scene.relation?;
                self.right(attr) > 0
            }
            Attr::Place => {
                if scene.objects.len() != 1 {
                    return None;
                }
                self.right(attr) > 0
            }
            Attr::BackgroundPattern | Attr::BackgroundColor => self.right(attr) > 0,
        };
        if scene.groups.is_empty() {
            return None;
        }
        Some(if wrong {
            Verdict::Wrong
        } else if complete {
            Verdict::Correct
        } else {
            Verdict::NotStated
        })
    }
}

/// A hard negative is *plausible* when it reads as a description in the corpus's vocabulary: it
/// names at least one object by a known shape together with a known object colour.
pub fn plausible(claims: &Claims) -> bool {
    claims
        .mentions
        .iter()
        .any(|m| m.colors.iter().any(|c| matches!(c, ColorWord::Object(_))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::scene::{Background, Group};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn group(shape: Shape, color: Color, size: Size, texture: Texture, count: u32) -> Group {
        Group {
            shape,
            color,
            size,
            texture,
            count,
        }
    }

    /// A small red cross left of a small dotted orange ring on a black and white checkered
    /// background.
    fn cross_and_ring() -> Scene {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        Scene::layout(
            &mut rng,
            Background {
                pattern: Pattern::Checkered,
                colors: vec![BgColor::Black, BgColor::White],
                period: 0.125,
                orientation: 0,
            },
            vec![
                group(Shape::Cross, Color::Red, Size::Small, Texture::Solid, 1),
                group(Shape::Ring, Color::Orange, Size::Small, Texture::Dotted, 1),
            ],
            Some(Relation::LeftOf),
        )
    }

    #[test]
    fn reads_mentions_with_modifiers_and_counts() {
        let c = Claims::extract("This picture shows two small dotted orange rings, and a cross.");
        assert_eq!(c.mentions.len(), 2);
        let m = &c.mentions[0];
        assert_eq!((m.shape, m.plural, m.count), (Shape::Ring, true, Some(2)));
        assert_eq!(m.colors, vec![ColorWord::Object(Color::Orange)]);
        assert_eq!(m.sizes, vec![Size::Small]);
        assert_eq!(m.textures, vec![Texture::Dotted]);
        assert_eq!(c.mentions[1].count, Some(1));
        assert!(c.mentions[1].colors.is_empty());
        // Digits, `an`, bare plural (no count), grey/gray.
        let c = Claims::extract("3 Blue Squares; an orange star; the circles; a gray circle");
        let counts: Vec<_> = c.mentions.iter().map(|m| m.count).collect();
        assert_eq!(counts, vec![Some(3), Some(1), None, Some(1)]);
        assert_eq!(
            c.mentions[3].colors,
            vec![ColorWord::Neutral(BgColor::Grey)]
        );
        // Negated mentions are ignored.
        assert!(Claims::extract("there is no red circle")
            .mentions
            .is_empty());
    }

    #[test]
    fn reads_predicates_relations_totals_background_and_place() {
        let c = Claims::extract(
            "The cross is small and red and the ring is dotted, the red cross is to the left of \
             the orange ring. There are two objects in total: a red cross and an orange ring.",
        );
        assert_eq!(c.mentions[0].sizes, vec![Size::Small]);
        assert_eq!(c.mentions[0].colors, vec![ColorWord::Object(Color::Red)]);
        assert_eq!(c.mentions[1].textures, vec![Texture::Dotted]);
        assert_eq!(
            c.relations,
            vec![RelationClaim {
                subject: 2,
                relation: Relation::LeftOf,
                object: 3
            }]
        );
        assert_eq!(c.totals, vec![2]);
        assert!(Claims::extract("cross left of ring").relations.len() == 1);

        let c =
            Claims::extract("the background behind the blue circle is striped in grey and white");
        assert!(c.mentions[0].textures.is_empty(), "{:?}", c.mentions);
        assert_eq!(
            c.background,
            vec![
                BackgroundClaim::Pattern(Pattern::Striped),
                BackgroundClaim::Color(ColorWord::Neutral(BgColor::Grey)),
                BackgroundClaim::Color(ColorWord::Neutral(BgColor::White)),
            ]
        );
        let c = Claims::extract("set against a black and white checkered background");
        assert_eq!(c.background.len(), 3);
        let c = Claims::extract("a circle on a beige background with white dots");
        assert!(c
            .background
            .contains(&BackgroundClaim::Pattern(Pattern::Dotted)));
        assert!(c
            .background
            .contains(&BackgroundClaim::Color(ColorWord::Neutral(BgColor::Beige))));
        let c = Claims::extract("The red circle is near the top left of the image.");
        assert_eq!(
            c.places,
            vec![PlaceClaim {
                mention: 0,
                zone: Zone { h: 0, v: 0 }
            }]
        );
        assert_eq!(Claims::extract("red").bare_colors, vec![Color::Red]);
        assert!(Claims::extract("geometric shapes").is_empty());
    }

    #[test]
    fn judges_against_the_scene() {
        let scene = cross_and_ring();
        let judge = |t: &str| Judgement::of(&Claims::extract(t), &scene);
        let good = judge(
            "The image shows a small red cross to the left of a small dotted orange ring on a \
             black and white checkered background, there are two objects in total.",
        );
        assert!(!good.has_false(), "{:?}", good.false_statements);
        assert_eq!(good.recalled_groups(), 2);
        for a in [
            Attr::Color,
            Attr::Shape,
            Attr::Size,
            Attr::Texture,
            Attr::Count,
        ] {
            assert_eq!(good.verdict(a, &scene), Some(Verdict::Correct), "{a:?}");
        }
        assert_eq!(good.verdict(Attr::Relation, &scene), Some(Verdict::Correct));
        assert_eq!(good.verdict(Attr::Place, &scene), None);

        // A colour bound to the wrong shape is a wrong colour; the ring is still not recalled.
        let swapped = judge("an orange cross and a red ring");
        assert_eq!(swapped.wrong(Attr::Color), 2);
        assert_eq!(swapped.recalled_groups(), 0);
        assert_eq!(swapped.verdict(Attr::Color, &scene), Some(Verdict::Wrong));
        assert_eq!(swapped.verdict(Attr::Shape, &scene), Some(Verdict::Correct));
        // Flipped relation, wrong count, wrong background, unknown shape.
        assert_eq!(
            judge("the ring is to the left of the cross").wrong(Attr::Relation),
            1
        );
        assert_eq!(judge("two red crosses").wrong(Attr::Count), 1);
        assert_eq!(judge("three objects").wrong(Attr::Count), 1);
        assert_eq!(
            judge("a plain background").wrong(Attr::BackgroundPattern),
            1
        );
        assert_eq!(judge("a grey background").wrong(Attr::BackgroundColor), 1);
        assert_eq!(judge("a blue star").wrong(Attr::Shape), 1);
        // Partly stated: the ring's colour is missing.
        let partial = judge("a red cross and a ring");
        assert_eq!(
            partial.verdict(Attr::Color, &scene),
            Some(Verdict::NotStated)
        );
        assert_eq!(partial.recalled_groups(), 1);
        // Tags.
        assert_eq!(judge("cross left of ring").tag_truth(), Some(true));
        assert_eq!(judge("ring left of cross").tag_truth(), Some(false));
        assert_eq!(judge("dotted ring").tag_truth(), Some(true));
        assert_eq!(judge("large cross").tag_truth(), Some(false));
        assert_eq!(judge("red").tag_truth(), Some(true));
        assert_eq!(judge("blue").tag_truth(), Some(false));
        assert_eq!(judge("two objects").tag_truth(), Some(true));
        assert_eq!(judge("geometric shapes").tag_truth(), None);
        assert!(plausible(&Claims::extract("a green ring")));
        assert!(!plausible(&Claims::extract("buy cheap shoes")));
    }

    /// The oracle's own texts on many random scenes: d+ never states anything false, names every
    /// group; d- always states something false; t+ are never false, t- always false, and the
    /// verdicts agree with the generator's own checker wherever that one has an opinion.
    #[test]
    fn agrees_with_the_oracle() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for _ in 0..3000 {
            let scene = Scene::random(&mut rng);
            let (t, perts) =
                crate::synth::oracle_texts(&scene, crate::synth::NegativeRules::Paper, &mut rng);
            let pos = Judgement::of(&Claims::extract(&t.long_positive), &scene);
            assert!(
                !pos.has_false(),
                "{}: {:?}",
                t.long_positive,
                pos.false_statements
            );
            assert_eq!(
                pos.recalled_groups(),
                scene.groups.len(),
                "{}",
                t.long_positive
            );
            for a in Attr::ALL {
                assert_ne!(pos.verdict(a, &scene), Some(Verdict::Wrong));
            }
            let neg = Judgement::of(&Claims::extract(&t.long_negative), &scene);
            assert!(
                neg.has_false(),
                "{perts:?}\n+ {}\n- {}",
                t.long_positive,
                t.long_negative
            );
            for tag in &t.tags_positive {
                let v = Judgement::of(&Claims::extract(tag), &scene).tag_truth();
                assert_ne!(v, Some(false), "{tag}");
                if let Some(h) = crate::synth::tag_holds(&scene, tag) {
                    assert_eq!(v, Some(h), "{tag}");
                }
            }
            for tag in &t.tags_negative {
                let v = Judgement::of(&Claims::extract(tag), &scene).tag_truth();
                assert_eq!(v, Some(false), "{tag}");
            }
        }
    }
}
