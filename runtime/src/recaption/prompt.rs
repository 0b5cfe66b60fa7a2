//! The recaptioning prompt (paper, section 3.2), its in-context exemplars, and prompt templates.
//!
//! By default ([`PromptTemplate::paper`]) the user turn is: the paper's instruction (use the alt-text as a reference, describe
//! the image in more detail, prefer the image when they conflict, answer in English), the answer
//! format of `hq_data::recaption_format` spelt out, one exemplar (its alt-text and its answer in
//! that format) drawn with a seed from the exemplar set, then the target alt-text and the image.
//! The same text is what the teacher-data command writes into fine-tuning conversations, so the
//! fine-tuned recaptioner sees at inference exactly the prompt it was trained on. A model directory
//! may ship its own template ([`PROMPT_FILE`]); the job and the teacher command then use that one.

use std::path::Path;

use hq_data::recaption_format;
use hq_data::RefinedTexts;
use serde_json::Value;

use crate::error::{Result, RuntimeError};
use crate::qwen2vl::{Message, Part};

/// The paper's instruction, verbatim up to its grammar.
pub const INSTRUCTION: &str = "Given an image-text pair crawled from the Internet, please assign the text information as a reference, generate more detailed descriptions for the image. If the given text and image have conflicts, please prioritize the image when generating information. The output should be in ENGLISH.";

/// The output format, as told to the model.
pub const FORMAT_SPEC: &str = "Answer with exactly four labelled lines, in this order:\n\
Long description: a detailed description of the image in several clauses.\n\
Negative description: the long description with subtle, plausible but wrong changes (objects, colours, counts, relations or setting).\n\
Tags: a comma-separated list of short tags that are true for the image.\n\
Negative tags: a comma-separated list of tags that are close to, but not true for, the image.";

/// Shown instead of an empty alt-text.
pub const EMPTY_ALT_TEXT: &str = "(no text)";

/// One in-context example: an alt-text and the answer expected for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exemplar {
    /// The example's raw alt-text (c_j).
    pub alt_text: String,
    /// The expected answer (c_j^e), already in the answer format.
    pub answer: String,
}

/// The exemplar pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExemplarSet {
    exemplars: Vec<Exemplar>,
}

fn builtin(alt: &str, lp: &str, ln: &str, tp: &[&str], tn: &[&str]) -> Exemplar {
    Exemplar {
        alt_text: alt.to_string(),
        answer: recaption_format::render(&RefinedTexts {
            long_positive: lp.to_string(),
            long_negative: ln.to_string(),
            tags_positive: tp.iter().map(|s| s.to_string()).collect(),
            tags_negative: tn.iter().map(|s| s.to_string()).collect(),
            source: None,
        })
        .trim_end()
        .to_string(),
    }
}

impl ExemplarSet {
    /// Three hand-written exemplars in the style of the paper's figure 7, used when no exemplar
    /// file is given.
    pub fn builtin() -> Self {
        Self {
            exemplars: vec![
                builtin(
                    "Backyard Ideas 2019 fire pit patio",
                    "The image shows a backyard with a paver patio, a round stone fire pit in the centre, four wooden Adirondack chairs around it, a low hedge behind them and a wooden fence in the background, in daylight.",
                    "The image shows a backyard with a concrete patio, a square metal fire pit in the corner, two plastic chairs beside it, a tall brick wall behind them and a metal fence in the background, at night.",
                    &["backyard", "paver patio", "stone fire pit", "adirondack chairs", "hedge", "wooden fence", "daylight"],
                    &["concrete patio", "metal fire pit", "plastic chairs", "brick wall", "night"],
                ),
                builtin(
                    "IMG_2041.JPG",
                    "The image shows a brown dog lying on a green lawn, holding a red ball in its mouth, with a white house and two trees behind it, under a clear blue sky.",
                    "The image shows a black cat sitting on a green lawn, holding a blue ball in its paws, with a red house and one tree behind it, under a cloudy sky.",
                    &["brown dog", "green lawn", "red ball", "white house", "trees", "blue sky"],
                    &["black cat", "blue ball", "red house", "cloudy sky"],
                ),
                builtin(
                    "Buy cheap sneakers online free shipping",
                    "The image shows a pair of white running shoes with grey soles and blue laces, placed side by side on a light wooden floor, photographed from above.",
                    "The image shows a pair of black leather boots with brown soles and red laces, placed one behind the other on a tiled floor, photographed from the side.",
                    &["white running shoes", "grey soles", "blue laces", "wooden floor", "top view"],
                    &["leather boots", "red laces", "tiled floor", "side view"],
                ),
            ],
        }
    }

    /// Loads a JSONL exemplar file: one `{"alt_text": ..., <the four texts>}` a line, the four texts
    /// in any shape the side-car format accepts (flat fields, or nested under `hq_clip`), or an
    /// `"answer"` string in the answer format (checked with the parser). `text` and `caption` are
    /// accepted for `alt_text`. Blank lines are skipped; any other bad line is an error naming it.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| RuntimeError::Io {
            action: "reading the exemplar file",
            path: path.to_path_buf(),
            source,
        })?;
        let bad = |line: usize, why: String| {
            RuntimeError::Recaption(format!("{}:{line}: {why}", path.display()))
        };
        let mut exemplars = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: Value =
                serde_json::from_str(line).map_err(|e| bad(i + 1, format!("invalid JSON: {e}")))?;
            let obj = v
                .as_object()
                .ok_or_else(|| bad(i + 1, "not a JSON object".into()))?;
            let alt_text = ["alt_text", "text", "caption"]
                .iter()
                .find_map(|k| obj.get(*k).and_then(Value::as_str))
                .ok_or_else(|| bad(i + 1, "no `alt_text` (or `text` / `caption`) string".into()))?
                .to_string();
            let answer = match obj.get("answer").and_then(Value::as_str) {
                Some(a) => {
                    recaption_format::parse(a, None).map_err(|e| {
                        bad(i + 1, format!("`answer` is not in the answer format: {e}"))
                    })?;
                    a.trim_end().to_string()
                }
                None => {
                    let t = hq_data::shards::sidecar::refined_from_record(obj)
                        .map_err(|e| bad(i + 1, e))?;
                    recaption_format::render(&t).trim_end().to_string()
                }
            };
            exemplars.push(Exemplar { alt_text, answer });
        }
        if exemplars.is_empty() {
            return Err(RuntimeError::Recaption(format!(
                "{}: no exemplars",
                path.display()
            )));
        }
        Ok(Self { exemplars })
    }

    /// Number of exemplars.
    pub fn len(&self) -> usize {
        self.exemplars.len()
    }

    /// Whether the set is empty (never, for a loaded or built-in set).
    pub fn is_empty(&self) -> bool {
        self.exemplars.is_empty()
    }

    /// The exemplar for `seed` (a per-sample, per-attempt seed).
    pub fn pick(&self, seed: u64) -> &Exemplar {
        let i = (splitmix64(seed) % self.exemplars.len() as u64) as usize;
        &self.exemplars[i]
    }
}

/// SplitMix64: a fixed, well-mixed hash of a 64-bit seed (stable across platforms and versions).
pub fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A stable seed for (job seed, sample key, attempt): FNV-1a of the key mixed with the rest.
pub fn sample_seed(job_seed: u64, key: &str, attempt: u32) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    splitmix64(h ^ splitmix64(job_seed ^ (u64::from(attempt) << 48)))
}

/// Normalises an alt-text for the prompt: whitespace runs collapsed, trimmed, placeholder when
/// empty, cut at `max_chars` characters (web alt-texts can be kilobytes of keywords).
pub fn clean_alt_text(alt: &str, max_chars: usize) -> String {
    let collapsed = alt.split_whitespace().collect::<Vec<_>>().join(" ");
    if collapsed.is_empty() {
        return EMPTY_ALT_TEXT.to_string();
    }
    match collapsed.char_indices().nth(max_chars) {
        Some((cut, _)) => format!("{}...", &collapsed[..cut]),
        None => collapsed,
    }
}

/// File name of a model directory's prompt template (written by the fine-tuning script beside the
/// checkpoint and copied by the exporter): a recaptioner fine-tuned with a prompt must be run with
/// that prompt, so the prompt travels with the model.
pub const PROMPT_FILE: &str = "hq_prompt.json";

/// The schema tag of a prompt template file.
pub const PROMPT_FORMAT: &str = "hq-prompt-1";

/// Where the image goes in a template's user turn (LLaVA's marker, also what teacher
/// conversations carry).
pub const IMAGE_MARKER: &str = "<image>";

/// The placeholders a template may use.
const PLACEHOLDERS: [&str; 5] = [
    "alt_text",
    "instruction",
    "format_spec",
    "exemplar_alt_text",
    "exemplar_answer",
];

/// The user turn of a recaption request, as a template.
///
/// A prompt template file (`hq_prompt.json`) is `{"format": "hq-prompt-1", "name": ..., "user": ...}`;
/// `user` holds exactly one `<image>` and placeholders `{alt_text}`, `{instruction}`,
/// `{format_spec}`, `{exemplar_alt_text}`, `{exemplar_answer}` (no other braces). The default is
/// the paper's prompt (instruction, format, one seeded exemplar); a fine-tuned toy recaptioner
/// uses a short one (a ~350-token prompt costs most of a CPU fine-tuning budget: issue 14's probe).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptTemplate {
    /// A name recorded with the job (`paper` for the default).
    pub name: String,
    before: String,
    after: String,
    /// Whether the template shows an exemplar (then one is drawn per sample and attempt).
    uses_exemplar: bool,
}

impl Default for PromptTemplate {
    fn default() -> Self {
        Self::paper()
    }
}

impl PromptTemplate {
    /// The paper's prompt: instruction, answer format, one exemplar, the alt-text, the image.
    pub fn paper() -> Self {
        Self::parse(
            "paper",
            "{instruction}\n\n{format_spec}\n\nHere is an example:\nInput: {exemplar_alt_text}\nOutput:\n{exemplar_answer}\n\nCurrent input: text \"{alt_text}\" with image <image>\nPlease output:",
        )
        .expect("the built-in template is valid")
    }

    /// A template from its user-turn text (see the type's doc for the syntax).
    pub fn parse(name: &str, user: &str) -> Result<Self> {
        let bad = |why: String| RuntimeError::Recaption(format!("prompt template {name}: {why}"));
        let mut parts = user.split(IMAGE_MARKER);
        let (Some(before), Some(after), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad(format!("needs exactly one {IMAGE_MARKER}")));
        };
        let mut uses_exemplar = false;
        for piece in [before, after] {
            let mut rest = piece;
            while let Some(open) = rest.find(['{', '}']) {
                if rest[open..].starts_with('}') {
                    return Err(bad("a `}` without its `{`".into()));
                }
                let Some(close) = rest[open..].find('}') else {
                    return Err(bad("a `{` without its `}`".into()));
                };
                let key = &rest[open + 1..open + close];
                if !PLACEHOLDERS.contains(&key) {
                    return Err(bad(format!(
                        "unknown placeholder {{{key}}} (known: {})",
                        PLACEHOLDERS.map(|p| format!("{{{p}}}")).join(", ")
                    )));
                }
                uses_exemplar |= key.starts_with("exemplar_");
                rest = &rest[open + close + 1..];
            }
        }
        Ok(Self {
            name: name.to_string(),
            before: before.to_string(),
            after: after.to_string(),
            uses_exemplar,
        })
    }

    /// Loads a template file (`hq_prompt.json`).
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| RuntimeError::Io {
            action: "reading the prompt template",
            path: path.to_path_buf(),
            source,
        })?;
        let bad = |why: String| RuntimeError::Recaption(format!("{}: {why}", path.display()));
        let v: Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        match v.get("format").and_then(Value::as_str) {
            Some(PROMPT_FORMAT) => {}
            other => {
                return Err(bad(format!(
                    "`format` is {other:?}, this version reads {PROMPT_FORMAT:?}"
                )))
            }
        }
        let user = v
            .get("user")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("no `user` string".into()))?;
        let name = v.get("name").and_then(Value::as_str).unwrap_or("unnamed");
        Self::parse(name, user).map_err(|e| bad(e.to_string()))
    }

    /// The template a model directory ships (`MODEL_DIR/hq_prompt.json`), else the paper's.
    pub fn for_model_dir(dir: &Path) -> Result<Self> {
        let file = dir.join(PROMPT_FILE);
        if file.is_file() {
            Self::load(file)
        } else {
            Ok(Self::paper())
        }
    }

    /// Whether an exemplar is shown (the exemplar set matters only then).
    pub fn uses_exemplar(&self) -> bool {
        self.uses_exemplar
    }

    fn fill(piece: &str, exemplar: &Exemplar, alt_text: &str) -> String {
        piece
            .replace("{instruction}", INSTRUCTION)
            .replace("{format_spec}", FORMAT_SPEC)
            .replace("{exemplar_alt_text}", &exemplar.alt_text)
            .replace("{exemplar_answer}", &exemplar.answer)
            .replace("{alt_text}", alt_text)
    }

    /// The user turn's text before and after the image.
    pub fn user_text(&self, exemplar: &Exemplar, alt_text: &str) -> (String, String) {
        // The alt-text goes in last so that braces inside it are never read as placeholders.
        (
            Self::fill(&self.before, exemplar, alt_text),
            Self::fill(&self.after, exemplar, alt_text),
        )
    }

    /// The chat of one recaption request (the image is the only image part).
    pub fn messages(&self, exemplar: &Exemplar, alt_text: &str) -> Vec<Message> {
        let (before, after) = self.user_text(exemplar, alt_text);
        vec![Message::new(
            "user",
            vec![Part::Text(before), Part::Image, Part::Text(after)],
        )]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_exemplars_parse_and_picks_are_seeded() {
        let set = ExemplarSet::builtin();
        for e in &set.exemplars {
            assert!(
                recaption_format::parse(&e.answer, None).is_ok(),
                "{}",
                e.answer
            );
        }
        assert_eq!(set.pick(5), set.pick(5));
        let picked: std::collections::HashSet<&str> = (0..50)
            .map(|s| {
                set.pick(sample_seed(1, &format!("k{s}"), 0))
                    .alt_text
                    .as_str()
            })
            .collect();
        assert_eq!(picked.len(), 3, "all exemplars get used");
        assert_ne!(sample_seed(0, "a", 0), sample_seed(0, "a", 1));
    }

    #[test]
    fn alt_text_is_cleaned() {
        assert_eq!(clean_alt_text("  \n\t ", 10), EMPTY_ALT_TEXT);
        assert_eq!(clean_alt_text("a  b\nc", 10), "a b c");
        assert_eq!(clean_alt_text("abcdefghijkl", 5), "abcde...");
        assert_eq!(clean_alt_text("ééééé", 3), "ééé...");
    }

    #[test]
    fn the_paper_template_is_the_paper_prompt() {
        let e = &ExemplarSet::builtin().exemplars[0];
        let (before, after) = PromptTemplate::paper().user_text(e, "a {red} cat");
        assert_eq!(
            before,
            format!(
                "{INSTRUCTION}\n\n{FORMAT_SPEC}\n\nHere is an example:\nInput: {}\nOutput:\n{}\n\nCurrent input: text \"a {{red}} cat\" with image ",
                e.alt_text, e.answer
            )
        );
        assert_eq!(after, "\nPlease output:");
        assert!(PromptTemplate::paper().uses_exemplar());
    }

    #[test]
    fn templates_are_checked() {
        let short = PromptTemplate::parse("s", "Alt-text: {alt_text}\n<image>\nDescribe.")
            .expect("a valid template");
        assert!(!short.uses_exemplar());
        let e = &ExemplarSet::builtin().exemplars[0];
        assert_eq!(
            short.user_text(e, "x"),
            ("Alt-text: x\n".to_string(), "\nDescribe.".to_string())
        );
        for (bad, why) in [
            ("no image {alt_text}", "exactly one <image>"),
            ("<image><image>", "exactly one <image>"),
            ("{alt} <image>", "unknown placeholder {alt}"),
            ("{alt_text <image>", "without its `}`"),
            ("} <image>", "without its `{`"),
        ] {
            let err = PromptTemplate::parse("t", bad)
                .expect_err("an invalid template")
                .to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }
}
