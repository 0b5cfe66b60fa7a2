//! The recaptioner's answer format (version 1): four labelled fields, in this order, one label per
//! line. This is what the prompt asks the model for, what the synthetic corpus's oracle writes,
//! and what teacher data is checked against.
//!
//! ```text
//! Long description: The image shows a red circle, it is above a blue square, ...
//! Negative description: The image shows a green circle, it is below a blue square, ...
//! Tags: red circle, blue square, striped background
//! Negative tags: green circle, yellow square, dotted background
//! ```
//!
//! The parser accepts the variations real models produce and rejects everything else:
//! - labels are case-insensitive, may carry numbering (`1.`, `2)`), bullets (`-`, `*`) or markdown
//!   emphasis (`**Tags:**`), and a few synonyms (`Detailed description`, `Positive tags`,
//!   `Hard negative description`, ...); the colon may be followed by the value or a line break;
//! - a description may run over several lines (joined with a space) until the next label;
//! - a tag list is the rest of its line, split on commas or semicolons, items trimmed, a trailing
//!   period dropped; a preamble before the first label and trailing text after the last tag line
//!   are ignored.
//!
//! It rejects: a missing, repeated, empty or out-of-order field, a tag list with no tag, and a
//! negative description equal to the positive one (that is no hard negative).

use crate::sample::RefinedTexts;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    LongPositive,
    LongNegative,
    TagsPositive,
    TagsNegative,
}

const FIELD_ORDER: [Field; 4] = [
    Field::LongPositive,
    Field::LongNegative,
    Field::TagsPositive,
    Field::TagsNegative,
];

impl Field {
    fn canonical_label(self) -> &'static str {
        match self {
            Field::LongPositive => "Long description",
            Field::LongNegative => "Negative description",
            Field::TagsPositive => "Tags",
            Field::TagsNegative => "Negative tags",
        }
    }

    fn from_label(label: &str) -> Option<Field> {
        let l = label.to_ascii_lowercase();
        let l = l.split_whitespace().collect::<Vec<_>>().join(" ");
        match l.as_str() {
            "long description"
            | "long positive description"
            | "positive description"
            | "detailed description"
            | "description" => Some(Field::LongPositive),
            "negative description" | "long negative description" | "hard negative description" => {
                Some(Field::LongNegative)
            }
            "tags" | "positive tags" | "semantic tags" | "semantic class tags" => {
                Some(Field::TagsPositive)
            }
            "negative tags" | "hard negative tags" => Some(Field::TagsNegative),
            _ => None,
        }
    }
}

/// Why an answer was rejected. The message is written into the error record beside the raw answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("missing field {0:?}")]
    Missing(&'static str),
    #[error("field {0:?} appears twice")]
    Repeated(&'static str),
    #[error("field {0:?} is out of order (expected: long description, negative description, tags, negative tags)")]
    OutOfOrder(&'static str),
    #[error("field {0:?} is empty")]
    Empty(&'static str),
    #[error("the negative description is identical to the positive one")]
    NegativeEqualsPositive,
}

/// Render four texts in the canonical form of the format.
pub fn render(t: &RefinedTexts) -> String {
    format!(
        "{}: {}\n{}: {}\n{}: {}\n{}: {}\n",
        Field::LongPositive.canonical_label(),
        t.long_positive.trim(),
        Field::LongNegative.canonical_label(),
        t.long_negative.trim(),
        Field::TagsPositive.canonical_label(),
        t.tags_positive.join(", "),
        Field::TagsNegative.canonical_label(),
        t.tags_negative.join(", "),
    )
}

/// Split a line into (field, rest of line) when it starts with a label.
fn split_label(line: &str) -> Option<(Field, &str)> {
    let s = line.trim_start();
    // Numbering and bullets: "1.", "2)", "-", "*", "•".
    let s = s.trim_start_matches(|c: char| c.is_ascii_digit());
    let s = s
        .strip_prefix('.')
        .or_else(|| s.strip_prefix(')'))
        .unwrap_or(s);
    let s = s.trim_start_matches(['-', '*', '•', '#', ' ', '\t']);
    let colon = s.find(':')?;
    let label = s[..colon].trim_matches(|c: char| c == '*' || c == '_' || c.is_whitespace());
    let field = Field::from_label(label)?;
    let rest = s[colon + 1..].trim_start_matches(['*', '_']).trim();
    Some((field, rest))
}

fn parse_tags(value: &str) -> Vec<String> {
    value
        .split([',', ';'])
        // Trailing dots and whitespace in any mix (".\t." is no tag), so that parsing the
        // rendered tags gives the same tags again.
        .map(|t| {
            t.trim_end_matches(|c: char| c == '.' || c.is_whitespace())
                .trim()
        })
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

/// Parse a model's answer. `source` is recorded in the result (`model:<name>`, `teacher:<name>`).
pub fn parse(answer: &str, source: Option<&str>) -> Result<RefinedTexts, FormatError> {
    let mut values: [Option<String>; 4] = Default::default();
    let mut current: Option<usize> = None;
    let mut done = false;
    for line in answer.lines() {
        if done {
            break;
        }
        if let Some((field, rest)) = split_label(line) {
            let idx = FIELD_ORDER.iter().position(|f| *f == field).unwrap_or(0);
            if values[idx].is_some() {
                return Err(FormatError::Repeated(field.canonical_label()));
            }
            if values[..idx].iter().any(Option::is_none) {
                return Err(FormatError::OutOfOrder(field.canonical_label()));
            }
            values[idx] = Some(rest.to_string());
            current = Some(idx);
            // A tag field that already has its value ends at its line; the last one ends parsing.
            if matches!(field, Field::TagsPositive | Field::TagsNegative) && !rest.is_empty() {
                current = None;
                done = field == Field::TagsNegative;
            }
            continue;
        }
        let Some(idx) = current else { continue };
        let text = line.trim();
        if text.is_empty() {
            continue;
        }
        let slot = values[idx].get_or_insert_with(String::new);
        if !slot.is_empty() {
            slot.push(' ');
        }
        slot.push_str(text);
        if matches!(FIELD_ORDER[idx], Field::TagsPositive | Field::TagsNegative) {
            current = None;
            done = FIELD_ORDER[idx] == Field::TagsNegative;
        }
    }
    let mut take = |f: Field| -> Result<String, FormatError> {
        let idx = FIELD_ORDER.iter().position(|x| *x == f).unwrap_or(0);
        let v = values[idx]
            .take()
            .ok_or(FormatError::Missing(f.canonical_label()))?;
        let v = v.trim().to_string();
        if v.is_empty() {
            return Err(FormatError::Empty(f.canonical_label()));
        }
        Ok(v)
    };
    let long_positive = take(Field::LongPositive)?;
    let long_negative = take(Field::LongNegative)?;
    let tags_positive = parse_tags(&take(Field::TagsPositive)?);
    let tags_negative = parse_tags(&take(Field::TagsNegative)?);
    if tags_positive.is_empty() {
        return Err(FormatError::Empty(Field::TagsPositive.canonical_label()));
    }
    if tags_negative.is_empty() {
        return Err(FormatError::Empty(Field::TagsNegative.canonical_label()));
    }
    if long_positive == long_negative {
        return Err(FormatError::NegativeEqualsPositive);
    }
    Ok(RefinedTexts {
        long_positive,
        long_negative,
        tags_positive,
        tags_negative,
        source: source.map(str::to_string),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> RefinedTexts {
        RefinedTexts {
            long_positive: "The image shows a red circle, it is above a blue square.".into(),
            long_negative: "The image shows a green circle, it is below a blue square.".into(),
            tags_positive: vec!["red circle".into(), "blue square".into()],
            tags_negative: vec!["green circle".into(), "yellow square".into()],
            source: Some("oracle".into()),
        }
    }

    #[test]
    fn render_then_parse_round_trips() {
        let t = example();
        assert_eq!(parse(&render(&t), Some("oracle")), Ok(t));
    }

    #[test]
    fn accepts_real_model_variations() {
        let answer = "Sure! Here is the analysis.\n\n\
            1. **Detailed description:**\n  The image shows a red circle,\n  it is above a blue square.\n\
            2. **Hard negative description:** The image shows a green circle, it is below a blue square.\n\
            3) positive TAGS: red circle; blue square.\n\
            - Negative tags :  green circle , yellow square,\n\
            I hope this helps!";
        let t = parse(answer, None).expect("variation accepted");
        assert_eq!(
            t.long_positive,
            "The image shows a red circle, it is above a blue square."
        );
        assert_eq!(t.tags_positive, vec!["red circle", "blue square"]);
        assert_eq!(t.tags_negative, vec!["green circle", "yellow square"]);
    }

    #[test]
    fn rejects_broken_answers() {
        let good = render(&example());
        let lines: Vec<&str> = good.lines().collect();
        let missing = lines[..3].join("\n");
        assert_eq!(
            parse(&missing, None),
            Err(FormatError::Missing("Negative tags"))
        );
        let swapped = format!("{}\n{}\n{}\n{}", lines[1], lines[0], lines[2], lines[3]);
        assert!(matches!(
            parse(&swapped, None),
            Err(FormatError::OutOfOrder(_))
        ));
        let repeated = format!("{good}{}", lines[0]);
        assert!(
            parse(&repeated, None).is_ok(),
            "text after the last field is ignored"
        );
        let twice = format!("{}\n{}", lines[0], good);
        assert_eq!(
            parse(&twice, None),
            Err(FormatError::Repeated("Long description"))
        );
        let empty_tags = good.replace("Tags: red circle, blue square", "Tags: , ;");
        assert_eq!(parse(&empty_tags, None), Err(FormatError::Empty("Tags")));
        let same = good.replace("green circle, it is below", "red circle, it is above");
        assert_eq!(parse(&same, None), Err(FormatError::NegativeEqualsPositive));
        assert_eq!(
            parse("no fields at all", None),
            Err(FormatError::Missing("Long description"))
        );
    }

    /// Regression (hq-fuzz `recaption_answer`, campaign crash-8c06da95): a tag of dots and
    /// whitespace (".\t.") cleaned to "." and was accepted; rendered and parsed again it cleaned
    /// to nothing, so the answer's canonical form was rejected ("Negative tags" is empty).
    #[test]
    fn tags_of_dots_and_whitespace_are_no_tags() {
        let answer = "\0\nDESCRIPTION:\0\nNEGATIVE\tDESCRIPTION:\x01\nTAGS:\0\nNEGATIVE\tTAGS:.\t.";
        assert_eq!(
            parse(answer, None),
            Err(FormatError::Empty("Negative tags"))
        );
        let t = parse(
            "Long description: a.\nNegative description: b.\nTags: x .\t. , y. .\nNegative tags: z",
            None,
        )
        .expect("parse");
        assert_eq!(t.tags_positive, vec!["x", "y"]);
        assert_eq!(parse(&render(&t), None).expect("reparse"), t);
    }
}
