//! Caption segmentation for mixed training (paper, Figure 5): the text encoder holds 77 tokens, so
//! each iteration trains on ONE randomly chosen segment of the long description, split on the
//! LVLM's own punctuation.
//!
//! A boundary is a `.`, `,`, `;`, `!`, `?` or line break that is followed by whitespace or the end
//! of the text. Requiring the whitespace keeps decimals ("3.5 m"), thousands ("1,000") and
//! dotted names ("U.S.A") inside one segment. Segments are trimmed and lose their closing
//! punctuation; empty ones are dropped.

use rand::Rng;

fn is_boundary_char(c: char) -> bool {
    matches!(c, '.' | ',' | ';' | '!' | '?' | '\n' | '\r')
}

/// The segments of `negative` that are not segments of `positive` (compared lower-cased with
/// whitespace collapsed), in order: the clauses a hard-negative description changed, since it is
/// the positive one with a few clauses perturbed.
pub fn changed_segments<'n>(positive: &str, negative: &'n str) -> Vec<&'n str> {
    let positive: std::collections::HashSet<String> =
        segments(positive).into_iter().map(normalised).collect();
    segments(negative)
        .into_iter()
        .filter(|s| !positive.contains(&normalised(s)))
        .collect()
}

/// Lower-case with whitespace collapsed, for comparing segments.
fn normalised(s: &str) -> String {
    s.split_whitespace()
        .map(str::to_lowercase)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Split a description into its segments, in order.
pub fn segments(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if !is_boundary_char(c) {
            continue;
        }
        let next_is_space_or_end = match chars.peek() {
            None => true,
            Some((_, n)) => n.is_whitespace(),
        };
        if c == '\n' || c == '\r' || next_is_space_or_end {
            push_segment(&mut out, &text[start..i]);
            start = i + c.len_utf8();
        }
    }
    push_segment(&mut out, &text[start..]);
    out
}

fn push_segment<'a>(out: &mut Vec<&'a str>, s: &'a str) {
    let s = s.trim();
    if !s.is_empty() && s.chars().any(char::is_alphanumeric) {
        out.push(s);
    }
}

/// Draw one segment uniformly at random; `None` when the text has no segment. The caller seeds the
/// generator (per sample and epoch) so a run is reproducible.
pub fn draw_segment<'a, R: Rng + ?Sized>(text: &'a str, rng: &mut R) -> Option<&'a str> {
    let segs = segments(text);
    if segs.is_empty() {
        return None;
    }
    Some(segs[rng.gen_range(0..segs.len())])
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn changed_segments_ignore_case_and_spacing() {
        let pos = "A red circle, it is above a blue square. The background is plain.";
        let neg = "a  RED circle, it is below a blue square. The background is plain.";
        assert_eq!(
            changed_segments(pos, neg),
            vec!["it is below a blue square"]
        );
        assert!(changed_segments(pos, pos).is_empty());
    }

    #[test]
    fn splits_on_the_lvlm_punctuation() {
        let d =
            "The image shows a red circle, it is above a blue square. The background is striped; \
                 there are two objects!";
        assert_eq!(
            segments(d),
            vec![
                "The image shows a red circle",
                "it is above a blue square",
                "The background is striped",
                "there are two objects"
            ]
        );
    }

    #[test]
    fn keeps_numbers_and_abbreviations_together() {
        assert_eq!(
            segments("A 3.5 m boat costs 1,000 dollars in the U.S.A. today"),
            vec!["A 3.5 m boat costs 1,000 dollars in the U.S.A", "today"]
        );
    }

    #[test]
    fn empty_and_punctuation_only_texts_have_no_segment() {
        assert!(segments("").is_empty());
        assert!(segments(" , . ;\n").is_empty());
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        assert_eq!(draw_segment("...", &mut rng), None);
    }

    #[test]
    fn draw_is_seeded_and_covers_every_segment() {
        let d = "one, two, three, four";
        let draw = |seed| {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            (0..64)
                .map(|_| draw_segment(d, &mut rng).unwrap_or_default())
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        let seen: std::collections::BTreeSet<_> = draw(7).into_iter().collect();
        assert_eq!(seen.len(), 4);
    }
}
