//! hq-runtime's readers: the recaptioner's model directory and configs (with its prompt file),
//! teacher JSONL, exemplar files and the recaption job's input lists.

use hq_runtime::qwen2vl::{ImageProcessor, ModelDir};
use hq_runtime::recaption::input::{read_input, RawItem};
use hq_runtime::recaption::prompt::{ExemplarSet, PromptTemplate};
use hq_runtime::recaption::teacher::{teacher_conversations, ConversationFormat};

use crate::{alloc, files, props};

/// The recaptioner's model directory: `config.json`, `preprocessor_config.json`,
/// `generation_config.json` and `hq_prompt.json`, in that order in the input (the ONNX files and
/// tokenizer are present but empty: only their presence is checked when opening). Properties: a
/// rejected directory names the file at fault; an accepted one has a usable shape: its image
/// processor prepares a small image without panicking and within a memory cap.
pub fn qwen2vl_model_dir(input: &[u8]) {
    const NAMES: [&str; 4] = [
        "config.json",
        "preprocessor_config.json",
        "generation_config.json",
        "hq_prompt.json",
    ];
    let dir = files::tempdir();
    let empty: &[u8] = b"";
    files::write_parts(
        dir.path(),
        hq_runtime::qwen2vl::model_dir::REQUIRED_FILES,
        &[Some(empty); 6],
    );
    files::write_parts(dir.path(), &NAMES, &files::split(input, NAMES.len()));
    match ModelDir::open(dir.path()) {
        Ok(m) => {
            assert!(m.config.num_layers > 0 && m.config.hidden_size > 0);
            let _ = m.config.patch_dim();
            // A config may ask for any pixel budget (upscaling a small image to `min_pixels`); the
            // check is that the patch geometry itself cannot blow up, so only modest budgets run.
            if m.preprocess.min_pixels <= 1 << 20 {
                let processor = ImageProcessor::new(m.preprocess.clone(), m.config.in_channels);
                let img = image::RgbImage::from_pixel(30, 20, image::Rgb([10, 200, 30]));
                let cap = 256 << 20;
                let r =
                    alloc::within_cap("qwen2vl preprocess", cap, || processor.process_rgb(&img));
                if let Err(e) = r {
                    props::names_problem(&e, &[]);
                }
            }
        }
        Err(e) => {
            props::names_problem(&e, &[".json"]);
        }
    }
    if let Err(e) = PromptTemplate::for_model_dir(dir.path()) {
        props::names_problem(&e, &["hq_prompt.json"]);
    }
}

/// Teacher JSONL (the fine-tuning set's source). Properties: every non-blank line is a record,
/// and every record is a conversation or a rejection that says why; the conversations array holds
/// exactly the accepted ones.
pub fn teacher_jsonl(input: &[u8]) {
    let dir = files::tempdir();
    let path = files::write_one(dir.path(), "teacher.jsonl", input);
    let (convs, report) = teacher_conversations(
        &path,
        &ExemplarSet::builtin(),
        &PromptTemplate::paper(),
        7,
        ConversationFormat::Llava,
        200,
    )
    .unwrap_or_else(|e| panic!("a readable teacher file is not an error: {e}"));
    let lines = props::nonblank_lines(&props::text(input));
    assert_eq!(
        report.records as u64, lines,
        "every non-blank line is a record"
    );
    props::accounted(
        "teacher records",
        report.records as u64,
        report.accepted as u64,
        report.rejected.len() as u64,
    );
    assert_eq!(convs.as_array().map_or(0, Vec::len), report.accepted);
    for r in &report.rejected {
        props::names_problem(&r.reason, &[]);
    }
}

/// Exemplar files and prompt templates (`--exemplars`, `--prompt`). Properties: a rejected file
/// names itself; an accepted exemplar set is never empty.
pub fn exemplars_prompt(input: &[u8]) {
    let dir = files::tempdir();
    let parts = files::split(input, 2);
    let ex = files::write_one(dir.path(), "ex.jsonl", parts[0].unwrap_or_default());
    match ExemplarSet::load(&ex) {
        Ok(set) => assert!(!set.is_empty(), "an accepted exemplar set has exemplars"),
        Err(e) => {
            props::names_problem(&e, &["ex.jsonl"]);
        }
    }
    let prompt = files::write_one(dir.path(), "prompt.json", parts[1].unwrap_or_default());
    if let Err(e) = PromptTemplate::load(&prompt) {
        props::names_problem(&e, &["prompt.json"]);
    }
}

/// The recaption job's input lists: JSONL, then CSV, then a tar shard, split by the separator.
/// Properties: every non-blank JSONL line is one item (a sample or an error record); nothing
/// panics on any of the three.
pub fn recap_input(input: &[u8]) {
    let dir = files::tempdir();
    let parts = files::split(input, 3);
    for (name, part) in ["list.jsonl", "list.csv", "shard.tar"].iter().zip(&parts) {
        let bytes = part.unwrap_or_default();
        let path = files::write_one(dir.path(), name, bytes);
        let mut items = 0u64;
        let r = read_input(&path, 1 << 16, |item| {
            if let RawItem::Broken(why) = &item {
                props::names_problem(why, &[]);
            }
            items += 1;
            true
        });
        if let Err(e) = r {
            props::names_problem(&e, &[name]);
        }
        if *name == "list.jsonl" {
            assert_eq!(
                items,
                props::nonblank_lines(&props::text(bytes)),
                "one item a line"
            );
        }
    }
}
