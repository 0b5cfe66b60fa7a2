//! hq-data's readers: webdataset shards with the side-car join, the recaption answer format, tag
//! vocabularies, the CLIP tokenizer and text cleaning, image decoding (training and eval paths).

use std::sync::OnceLock;

use hq_data::recaption_format;
use hq_data::shards::reader::{ImageCheck, ReadOptions, TarSamples};
use hq_data::shards::{FieldMap, JoinOptions, ShardWriter, Sidecar, SidecarJoin};
use hq_data::text::tags::TagVocab;
use hq_data::text::{clean, tokenizer::ClipTokenizer};
use hq_data::transform::ImageTransform;
use hq_data::{ImageBytes, Sample};
use rand::SeedableRng;

use crate::{alloc, files, props};

/// Small limits so a member or image that would pass them shows up as a memory-cap failure.
const MAX_MEMBER_BYTES: u64 = 1 << 16;
const MAX_PIXELS: u64 = 1 << 16;

fn read_options() -> ReadOptions {
    ReadOptions {
        image_check: ImageCheck::Header,
        max_pixels: MAX_PIXELS,
        max_member_bytes: MAX_MEMBER_BYTES,
        require_image: true,
        require_text: true,
    }
}

/// Webdataset tar reading with the side-car join. Input: the tar bytes, then (after
/// [`files::SEP`]) a side-car, JSONL or one JSON document. Properties: every sample read is a result or an error record
/// and the shard's counts agree; every side-car line (record) is an entry or an error; every joined sample
/// is annotated, unannotated or kept its own texts; the reader holds at most about one member.
pub fn tar_shard(input: &[u8]) {
    let parts = files::split(input, 2);
    let tar = parts[0].unwrap_or_default();
    let jsonl = parts[1].unwrap_or_default();

    // A side-car is JSONL, or one `.json` document (a list of records or an object keyed by id).
    let sidecar = match serde_json::from_slice::<serde_json::Value>(jsonl) {
        Ok(v @ (serde_json::Value::Array(_) | serde_json::Value::Object(_))) => {
            let records = match &v {
                serde_json::Value::Array(a) => a.len(),
                serde_json::Value::Object(o) => o.len(),
                _ => 0,
            } as u64;
            let sc = Sidecar::from_json_value(v, "fuzz.json", "uid", &FieldMap::default())
                .unwrap_or_else(|e| panic!("a list or object is a side-car: {e}"));
            let (len, errs) = (sc.len() as u64, sc.errors().len() as u64);
            props::accounted("side-car records", records, len, errs);
            sc
        }
        _ => {
            let sc = Sidecar::from_jsonl(jsonl, "fuzz.jsonl", "uid", &FieldMap::default())
                .unwrap_or_else(|e| panic!("reading a byte slice cannot fail with I/O: {e}"));
            sidecar_accounted(jsonl, &sc);
            sc
        }
    };
    let annotations = sidecar.len() as u64;
    // Both join modes: replace a sample's own texts, or keep them (input length picks).
    let opts = JoinOptions {
        overwrite: input.len() % 2 == 0,
        ..JoinOptions::default()
    };
    let mut join = SidecarJoin::new(sidecar, opts);

    // A member is held whole, plus its header, its sample's other members and the error text.
    let cap = 4 * MAX_MEMBER_BYTES as usize + (1 << 20) + 8 * input.len();
    let (ok, errors, stats) = alloc::within_cap("tar reader", cap, || {
        let mut samples = TarSamples::new(tar, "fuzz.tar", read_options());
        let (mut ok, mut errors) = (0u64, 0u64);
        for item in join.join_iter(&mut samples) {
            match item {
                Ok(s) => {
                    assert!(s.image.is_some(), "a good sample has its image");
                    ok += 1;
                }
                Err(e) => {
                    assert_eq!(e.shard, "fuzz.tar", "an error record names its shard");
                    props::names_problem(&e.reason, &[]);
                    errors += 1;
                }
            }
        }
        (ok, errors, samples.into_stats())
    });
    props::accounted("shard counts", stats.good + stats.bad, ok, errors);
    assert_eq!(stats.good, ok, "good samples counted as good");
    if let Some(why) = &stats.ended_early {
        assert!(
            ["truncated tar", "corrupt tar", "read error"]
                .iter()
                .any(|p| why.starts_with(p)),
            "an early end says how the shard is damaged: {why:?}"
        );
    }
    let report = join.report();
    assert_eq!(report.samples, ok, "the join saw every good sample");
    props::accounted(
        "side-car join",
        report.samples,
        report.joined,
        report.unannotated + report.kept_own,
    );
    assert!(report.joined + report.unused <= annotations);
}

fn sidecar_accounted(jsonl: &[u8], sidecar: &Sidecar) {
    // `from_jsonl` splits at '\n' only; a line that is not UTF-8 is an error even when blank.
    let lines = jsonl
        .split(|&b| b == b'\n')
        .filter(|l| std::str::from_utf8(l).map_or(true, |s| !s.trim().is_empty()))
        .count() as u64;
    for e in sidecar.errors() {
        props::names_problem(&e.reason, &["line "]);
    }
    props::accounted(
        "side-car lines",
        lines,
        sidecar.len() as u64,
        sidecar.errors().len() as u64,
    );
}

/// One generated sample: key, alt-text, image bytes, and optionally (d+, d-).
pub type GenSample = (String, String, Vec<u8>, Option<(String, String)>);

/// Shards written by [`ShardWriter`] read back identical. Input: samples from bolero's generator.
pub fn shard_round_trip(samples: &[GenSample]) {
    let dir = files::tempdir();
    let path = dir.path().join("rt.tar");
    let mut writer = ShardWriter::single(&path).unwrap_or_else(|e| panic!("{e}"));
    let mut written = Vec::new();
    for (i, (key, text, bytes, refined)) in samples.iter().enumerate() {
        // Keys the writer accepts and distinct from the last one (webdataset would merge them).
        let key = format!(
            "{i:04}{}",
            key.replace(|c: char| !c.is_ascii_alphanumeric(), "")
        );
        let mut s = Sample::new(
            key,
            ImageBytes {
                ext: "jpg".into(),
                bytes: bytes.clone(),
            },
            text.clone(),
        );
        s.refined = refined.as_ref().map(|(p, n)| hq_data::RefinedTexts {
            long_positive: p.clone(),
            long_negative: n.clone(),
            tags_positive: vec![p.clone()],
            tags_negative: Vec::new(),
            source: None,
        });
        writer.write(&s).unwrap_or_else(|e| panic!("{e}"));
        written.push(s);
    }
    let shards = writer.finish().unwrap_or_else(|e| panic!("{e}"));
    if written.is_empty() {
        assert!(shards.is_empty(), "no sample, no shard");
        return;
    }
    let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{e}"));
    let opts = ReadOptions {
        image_check: ImageCheck::None,
        require_image: false,
        ..ReadOptions::default()
    };
    let read: Vec<Sample> = TarSamples::new(file, "rt.tar", opts)
        .map(|r| r.unwrap_or_else(|e| panic!("a written sample reads back: {e}")))
        .collect();
    props::round_trip("shard", &written, &read);
}

/// The recaption answer parser. Properties: an accepted answer renders to the canonical form and
/// parses back identical; a rejected one says which field is wrong.
pub fn recaption_answer(input: &[u8]) {
    let answer = props::text(input);
    match recaption_format::parse(&answer, Some("model:fuzz")) {
        Ok(t) => {
            let again = recaption_format::parse(&recaption_format::render(&t), Some("model:fuzz"))
                .unwrap_or_else(|e| panic!("the canonical form of an accepted answer fails: {e}"));
            props::round_trip("answer", &t, &again);
        }
        Err(e) => {
            props::names_problem(&e, &[]);
        }
    }
}

/// Tag vocabulary files. Properties: an accepted file saves and loads back identical; a rejected
/// one names the file and the line or header.
pub fn tag_vocab(input: &[u8]) {
    let dir = files::tempdir();
    let read = |bytes: &[u8]| TagVocab::load(files::write_one(dir.path(), "tags.tsv", bytes));
    let print = |v: &TagVocab| {
        let path = dir.path().join("printed.tsv");
        v.save(&path)?;
        std::fs::read(&path).map_err(|e| hq_data::DataError::io(&path, e))
    };
    if let Some(v) = props::read_print_read("tag vocabulary", input, read, print, &["tags.tsv"]) {
        for (i, (t, _)) in v.entries().iter().enumerate() {
            assert_eq!(v.get(t), Some(i as u32), "tag {t:?} is at its rank");
        }
    }
}

fn tokenizer() -> &'static ClipTokenizer {
    static TOK: OnceLock<ClipTokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        ClipTokenizer::from_bundled().unwrap_or_else(|e| panic!("bundled vocabulary: {e}"))
    })
}

/// Hugging Face tokenizer folders (CLIPA's WordPiece: `tokenizer.json` + `tokenizer_config.json`,
/// one input split by [`files::SEP`]). Properties: an accepted folder gives every text a row of
/// exactly the context length with ids in its vocabulary (or 0, the stripped sep); a rejected one
/// gets an error that names what is wrong.
pub fn hf_tokenizer_dir(input: &[u8]) {
    use hq_data::text::hf_tokenizer::{HfTokenizer, HfTokenizerOptions, TextClean};
    let parts = files::split(input, 2);
    let dir = files::tempdir();
    for (name, part) in ["tokenizer.json", "tokenizer_config.json"]
        .iter()
        .zip(&parts)
    {
        if let Some(bytes) = part {
            files::write_one(dir.path(), name, bytes);
        }
    }
    let options = HfTokenizerOptions {
        context_length: 16,
        clean: TextClean::Whitespace,
        strip_sep_token: true,
    };
    let tok = match HfTokenizer::from_folder(dir.path(), options) {
        Ok(t) => t,
        Err(e) => {
            assert!(!e.to_string().trim().is_empty(), "an empty error");
            return;
        }
    };
    let vocab = tok.vocab_size() as i64;
    for text in [
        "",
        "a red circle, left of the blue square",
        "[SEP] [CLS] café 東京",
    ] {
        match tok.tokenize(text) {
            Ok(row) => {
                assert_eq!(row.len(), 16, "{text:?}");
                assert!(
                    row.iter().all(|&i| (0..vocab).contains(&i)),
                    "{text:?}: {row:?}"
                );
            }
            Err(e) => assert!(!e.to_string().trim().is_empty(), "an empty error"),
        }
    }
}

/// The CLIP tokenizer. Properties: every id is in the vocabulary; `tokenize` gives exactly the
/// context length, starts with the start token and holds the end token; decoding never fails.
pub fn tokenizer_text(input: &[u8]) {
    let tok = tokenizer();
    let text = props::text(input);
    let vocab = tok.vocab_size() as u32;
    let ids = tok
        .encode(&text)
        .unwrap_or_else(|e| panic!("encode failed: {e}"));
    assert!(ids.iter().all(|&i| i < vocab), "ids outside the vocabulary");
    let row = tok
        .tokenize(&text)
        .unwrap_or_else(|e| panic!("tokenize failed: {e}"));
    assert_eq!(row.len(), tok.context_length());
    assert_eq!(row[0], i64::from(tok.sot_token_id()));
    assert!(row.contains(&i64::from(tok.eot_token_id())));
    tok.decode(&ids)
        .unwrap_or_else(|e| panic!("decode of encoded ids failed: {e}"));
}

/// Text cleaning (ftfy's fix_text, HTML unescaping, open_clip's whitespace and basic clean).
/// Properties: no panic; whitespace cleaning is idempotent and leaves no run of spaces.
pub fn text_clean(input: &[u8]) {
    let text = props::text(input);
    let _ = clean::fix_text(&text);
    let _ = clean::fix_encoding(&text);
    let _ = clean::html_unescape(&text);
    let _ = clean::is_bad(&text);
    let _ = clean::python_lower(&text);
    let _ = clean::basic_clean(&text);
    let w = clean::whitespace_clean(&text);
    assert_eq!(
        clean::whitespace_clean(&w),
        w,
        "whitespace_clean is idempotent"
    );
    assert!(!w.contains("  "), "no run of spaces left: {w:?}");
    let c = clean::clip_clean(&text);
    assert_eq!(
        c,
        clean::whitespace_clean(&c),
        "clip_clean's output is whitespace-clean"
    );
}

/// Image decoding on the training path (random resized crop) and the eval path (crop, resize,
/// centre crop), decompression bombs included. Properties: no panic; an accepted image gives the
/// transform's output size; memory stays under the cap the pixel limit implies; a rejection says
/// why.
pub fn image_decode(input: &[u8]) {
    // The decoder's own limit is pixels x 16 bytes + 64 MiB of slack (hq_data::shards::images).
    let cap = (MAX_PIXELS as usize) * 16 * 4 + (64 << 20) + 8 * input.len();
    let train = ImageTransform::train(32);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    match alloc::within_cap("train decode", cap, || {
        train.decode_apply(input, MAX_PIXELS, &mut rng)
    }) {
        Ok(px) => assert_eq!(px.len(), train.output_len()),
        Err(why) => {
            props::names_problem(&why, &[]);
        }
    }
    let eval = ImageTransform::eval(24);
    let crop = input.get(..4).map(|b| hq_eval::pipeline::CropRect {
        left: f64::from(b[0]) - 8.0,
        top: f64::from(b[1]),
        right: f64::from(b[2]) * 2.0,
        bottom: f64::from(b[3]) + 1.0,
    });
    match alloc::within_cap("eval decode", cap, || {
        hq_eval::pipeline::prepare_image(&eval, input, crop, MAX_PIXELS)
    }) {
        Ok(px) => assert_eq!(px.len(), eval.output_len()),
        Err(why) => {
            props::names_problem(&why, &[]);
        }
    }
}
