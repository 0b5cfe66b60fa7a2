//! Teacher data for fine-tuning the recaptioner (the paper's SFT step: ~10k GPT-4o answers).
//!
//! Input: JSONL, one teacher output a line: `{"image": PATH, "alt_text": TEXT, "answer": TEXT}`,
//! or the four texts as fields (flat, or nested under `hq_clip`, as in side-car files) instead of
//! `answer`; `id`/`key`/`uid` names the sample (else the line number), `text`/`caption` are accepted
//! for `alt_text`. Every answer is checked with the job's parser
//! (`hq_data::recaption_format::parse`): the fine-tuned model learns to write what the job accepts.
//!
//! Output: a JSON array in the conversation format of LVLM fine-tuning tools, with the exact
//! prompt the job uses at inference (same instruction, format and seeded exemplar), `<image>`
//! where the image goes:
//! - `llava`: `{"id", "image", "conversations": [{"from": "human", "value"}, {"from": "gpt", "value"}]}`
//!   (LLaVA, and LLaMA-Factory's `sharegpt` formatting with `images` in the dataset info);
//! - `sharegpt`: `{"id", "messages": [{"role": "user", "content"}, {"role": "assistant", "content"}],
//!   "images": [PATH]}` (LLaMA-Factory / ms-swift style).
//!
//! [`teacher_set_from_shards`] makes the teacher JSONL from shards whose samples already carry the
//! four texts (the built-in corpus's oracle plays GPT-4o's part at toy scale), writing each image
//! as a file beside it, as conversation files expect.
//!
//! The assistant turn is the teacher's answer in canonical form (`recaption_format::render` of the
//! parsed texts), so spacing and numbering quirks of the teacher are not taught to the student.

use std::path::Path;

use hq_data::recaption_format;
use serde::Serialize;
use serde_json::{json, Value};

use crate::error::{Result, RuntimeError};
use crate::recaption::input::{read_input, RawItem};
use crate::recaption::prompt::{
    clean_alt_text, sample_seed, ExemplarSet, PromptTemplate, IMAGE_MARKER,
};

/// Conversation format of the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConversationFormat {
    /// LLaVA's `conversations` with `from: human/gpt`.
    Llava,
    /// `messages` with `role: user/assistant` and an `images` list.
    ShareGpt,
}

/// One rejected teacher answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rejected {
    /// Line number in the input.
    pub line: usize,
    /// The sample's id.
    pub id: String,
    /// Why.
    pub reason: String,
}

/// Result of the conversion.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TeacherReport {
    /// Input lines with a record.
    pub records: usize,
    /// Conversations written.
    pub accepted: usize,
    /// Answers (or lines) rejected, with reasons.
    pub rejected: Vec<Rejected>,
}

/// Converts a teacher JSONL file into fine-tuning conversations (returned as a JSON array) and
/// the parser check's report.
pub fn teacher_conversations(
    input: &Path,
    exemplars: &ExemplarSet,
    template: &PromptTemplate,
    seed: u64,
    format: ConversationFormat,
    max_alt_text_chars: usize,
) -> Result<(Value, TeacherReport)> {
    let text = std::fs::read(input).map_err(|source| RuntimeError::Io {
        action: "reading the teacher file",
        path: input.to_path_buf(),
        source,
    })?;
    let text = String::from_utf8_lossy(&text);
    let mut out = Vec::new();
    let mut report = TeacherReport {
        records: 0,
        accepted: 0,
        rejected: Vec::new(),
    };
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        report.records += 1;
        let reject = |id: String, reason: String| Rejected {
            line: line_no,
            id,
            reason,
        };
        let obj = match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(o)) => o,
            Ok(_) => {
                report
                    .rejected
                    .push(reject(String::new(), "not a JSON object".into()));
                continue;
            }
            Err(e) => {
                report
                    .rejected
                    .push(reject(String::new(), format!("invalid JSON: {e}")));
                continue;
            }
        };
        let id = ["id", "key", "uid"]
            .iter()
            .find_map(|k| match obj.get(*k) {
                Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
                Some(Value::Number(n)) => Some(n.to_string()),
                _ => None,
            })
            .unwrap_or_else(|| format!("{line_no:09}"));
        let Some(image) = obj.get("image").and_then(Value::as_str) else {
            report.rejected.push(reject(id, "no `image` path".into()));
            continue;
        };
        let alt = ["alt_text", "text", "caption"]
            .iter()
            .find_map(|k| obj.get(*k).and_then(Value::as_str))
            .unwrap_or("");
        let parsed = match obj.get("answer").and_then(Value::as_str) {
            Some(a) => recaption_format::parse(a, None).map_err(|e| e.to_string()),
            None => hq_data::shards::sidecar::refined_from_record(&obj).and_then(|t| {
                recaption_format::parse(&recaption_format::render(&t), None)
                    .map_err(|e| e.to_string())
            }),
        };
        let texts = match parsed {
            Ok(t) => t,
            Err(e) => {
                report.rejected.push(reject(id, e));
                continue;
            }
        };
        let exemplar = exemplars.pick(sample_seed(seed, &id, 0));
        let (before, after) =
            template.user_text(exemplar, &clean_alt_text(alt, max_alt_text_chars));
        let user = format!("{before}{IMAGE_MARKER}{after}");
        let answer = recaption_format::render(&texts).trim_end().to_string();
        out.push(match format {
            ConversationFormat::Llava => json!({
                "id": id,
                "image": image,
                "conversations": [
                    {"from": "human", "value": user},
                    {"from": "gpt", "value": answer},
                ],
            }),
            ConversationFormat::ShareGpt => json!({
                "id": id,
                "messages": [
                    {"role": "user", "content": user},
                    {"role": "assistant", "content": answer},
                ],
                "images": [image],
            }),
        });
        report.accepted += 1;
    }
    Ok((Value::Array(out), report))
}

/// What [`teacher_set_from_shards`] wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TeacherSetReport {
    /// Samples read.
    pub samples: usize,
    /// Teacher records written (image file + line).
    pub written: usize,
    /// Samples skipped, with the reason (no image, no texts, a damaged stream).
    pub skipped: Vec<Rejected>,
}

/// Image members a sample's image is taken from, in order of preference.
const IMAGE_EXTENSIONS: [&str; 5] = ["jpg", "jpeg", "png", "webp", "bmp"];

/// Writes a teacher JSONL (`{"id", "image", "alt_text", "hq_clip"}` a line) from the samples of
/// `shards` that carry the four texts under `hq_clip`, at most `limit` of them, in input order.
/// Each image goes to `image_dir/<key>.<ext>`; the JSONL's `image` paths are relative to the
/// JSONL's folder, which must contain `image_dir`. Files are written atomically, the JSONL last,
/// so a killed run leaves no JSONL that names a missing image.
pub fn teacher_set_from_shards(
    shards: &[std::path::PathBuf],
    jsonl: &Path,
    image_dir: &Path,
    limit: usize,
) -> Result<TeacherSetReport> {
    let base = jsonl.parent().unwrap_or(Path::new(""));
    let rel_dir = image_dir.strip_prefix(base).map_err(|_| {
        RuntimeError::Recaption(format!(
            "the image folder {} is not inside the teacher file's folder {}",
            image_dir.display(),
            base.display()
        ))
    })?;
    std::fs::create_dir_all(image_dir).map_err(|source| RuntimeError::Io {
        action: "creating the image folder",
        path: image_dir.to_path_buf(),
        source,
    })?;
    let mut report = TeacherSetReport {
        samples: 0,
        written: 0,
        skipped: Vec::new(),
    };
    let mut lines = String::new();
    let mut failure = None;
    for shard in shards {
        if report.written >= limit {
            break;
        }
        read_input(shard, 256 << 20, |item| {
            let sample = match item {
                RawItem::Sample(s) => s,
                RawItem::Broken(why) => {
                    report.skipped.push(Rejected {
                        line: 0,
                        id: shard.display().to_string(),
                        reason: format!("damaged stream: {why}"),
                    });
                    return true;
                }
            };
            report.samples += 1;
            let skip = |reason: &str| Rejected {
                line: 0,
                id: sample.key.clone(),
                reason: reason.to_string(),
            };
            let Some(texts) = sample.meta.get(hq_data::sample::REFINED_JSON_KEY) else {
                report.skipped.push(skip("no `hq_clip` texts"));
                return true;
            };
            let Some((ext, bytes)) = IMAGE_EXTENSIONS.iter().find_map(|e| {
                sample
                    .members
                    .iter()
                    .find(|(x, _)| x.eq_ignore_ascii_case(e))
            }) else {
                report.skipped.push(skip("no image member"));
                return true;
            };
            let name = format!("{}.{}", sample.key, ext.to_ascii_lowercase());
            if let Err(e) = hq_data::atomic::write_atomic(image_dir.join(&name), bytes) {
                failure = Some(RuntimeError::from(e));
                return false;
            }
            let record = json!({
                "id": sample.key,
                "image": rel_dir.join(&name).to_string_lossy(),
                "alt_text": sample.alt_text,
                "hq_clip": texts,
            });
            lines.push_str(&record.to_string());
            lines.push('\n');
            report.written += 1;
            report.written < limit
        })?;
        if let Some(e) = failure.take() {
            return Err(e);
        }
    }
    hq_data::atomic::write_atomic(jsonl, lines.as_bytes())?;
    Ok(report)
}
