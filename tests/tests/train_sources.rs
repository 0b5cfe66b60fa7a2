//! Training on data as it ships (issue 18): side-car annotations joined while reading, and the
//! pre-joined copy `hq-data join` writes.
//!
//! - join equivalence: k batches from raw shards + side-car files (a foreign field layout, with
//!   missing, orphan, duplicate and malformed entries) equal the batches from the shards
//!   `join_shards` wrote, tag vocabulary included; a resume in the middle continues the same;
//! - bad and partial annotations: counted, reported, training goes on; a setting that cannot be
//!   right (no file for any shard, a mapping that matches no record) stops with a clear error;
//! - the global-index layout (`.json` list and object keyed by id) joins the same way.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use hq_data::shards::annotations::{coverage, join_shards};
use hq_data::shards::{
    AnnotationSpec, Annotations, FieldMap, ReadOptions, ShardReader, ShardWriter,
    ShardWriterOptions,
};
use hq_data::synth::{self, SynthConfig, WriteOptions};
use hq_data::Sample;
use hq_train::data::{build_tag_vocab, build_tag_vocab_with, Batch, DataLoader, LoaderConfig};
use serde_json::json;

/// Everything a batch holds, in comparable form.
#[derive(Debug, Clone, PartialEq)]
struct BatchData {
    keys: Vec<String>,
    images: Vec<f32>,
    texts: Vec<i64>,
    negatives: Vec<i64>,
    has_negative: Vec<bool>,
    tag_offsets: Vec<i64>,
    tag_indices: Vec<i64>,
    refined: Vec<bool>,
}

fn data(b: &Batch) -> BatchData {
    let flat_f = |t: &tch::Tensor| Vec::<f32>::try_from(&t.flatten(0, -1)).expect("f32");
    let flat_i = |t: &tch::Tensor| Vec::<i64>::try_from(&t.flatten(0, -1)).expect("i64");
    BatchData {
        keys: b.keys.clone(),
        images: flat_f(&b.images),
        texts: flat_i(&b.texts),
        negatives: flat_i(&b.negatives),
        has_negative: Vec::<bool>::try_from(&b.has_negative).expect("bool"),
        tag_offsets: b.tag_offsets.clone(),
        tag_indices: b.tag_indices.clone(),
        refined: b.refined_text.clone(),
    }
}

/// The synthetic corpus as it would ship: raw shards (no refined texts) under `dir/raw/`, and
/// the refined texts of every sample, in corpus order.
fn raw_corpus(dir: &Path, samples: u64, shard_size: u64) -> (Vec<PathBuf>, Vec<Sample>) {
    let cfg = SynthConfig {
        seed: 5,
        samples,
        shard_size: samples,
        image_size: 16,
        eval_samples: 0,
        ..SynthConfig::default()
    };
    let opts = WriteOptions {
        force: false,
        threads: Some(2),
        progress: false,
    };
    let report = synth::write_corpus(&cfg, &dir.join("synth"), &opts).expect("synth");
    let full: Vec<Sample> = ShardReader::new(report.train_shards, ReadOptions::default())
        .map(|r| r.expect("good synth sample"))
        .collect();
    let mut w = ShardWriter::new(
        dir.join("raw/part"),
        ShardWriterOptions {
            max_samples: Some(shard_size),
            ..Default::default()
        },
    )
    .expect("writer");
    for s in &full {
        let mut raw = s.clone();
        raw.refined = None;
        w.write(&raw).expect("write raw");
    }
    (w.finish().expect("finish"), full)
}

/// A foreign layout: `{"id": uid, "caption": d+, "negative": d-, "labels": {"pos": [...],
/// "neg": "a, b"}}`, one file per shard, every 7th sample left out, plus one orphan, one
/// duplicate and one malformed line per file.
fn write_foreign_annotations(dir: &Path, shards: &[PathBuf], full: &[Sample]) -> usize {
    std::fs::create_dir_all(dir).expect("ann dir");
    let mut left_out = 0;
    let mut i = 0;
    for shard in shards {
        let samples: Vec<Sample> = ShardReader::new(vec![shard.clone()], ReadOptions::default())
            .map(|r| r.expect("raw sample"))
            .collect();
        let mut lines = Vec::new();
        for s in &samples {
            let r = full[i].refined.as_ref().expect("synth refined");
            i += 1;
            if i % 7 == 0 {
                left_out += 1;
                continue;
            }
            let uid = s.meta["uid"].as_str().expect("uid");
            lines.push(
                json!({"id": uid, "caption": r.long_positive, "negative": r.long_negative,
                       "labels": {"pos": r.tags_positive, "neg": r.tags_negative.join(", ")}})
                .to_string(),
            );
        }
        let first_id =
            serde_json::from_str::<serde_json::Value>(&lines[0]).expect("line")["id"].clone();
        let labels = json!({"pos": [], "neg": ""});
        lines.push(
            json!({"id": first_id, "caption": "a duplicate, ignored", "negative": "",
                   "labels": labels})
            .to_string(),
        );
        lines.push(
            json!({"id": "nobody", "caption": "an orphan", "negative": "", "labels": labels})
                .to_string(),
        );
        lines.push("{\"id\": \"cut".to_string());
        let name = format!("{}.jsonl", hq_data::shards::annotations::shard_stem(shard));
        std::fs::write(dir.join(name), lines.join("\n") + "\n").expect("write ann");
    }
    left_out
}

fn foreign_spec(dir: &Path) -> AnnotationSpec {
    AnnotationSpec {
        path: dir.display().to_string(),
        id_field: "uid".into(),
        record_id_field: Some("id".into()),
        fields: FieldMap::parse(
            "long_positive=caption,long_negative=negative,tags_positive=labels.pos,\
             tags_negative=labels.neg",
        )
        .expect("map"),
    }
}

fn loader_config(shards: &[PathBuf], batch: usize) -> LoaderConfig {
    let specs = shards.iter().map(|p| p.display().to_string()).collect();
    let mut c = LoaderConfig::new(specs, batch, 16);
    c.seed = 7;
    c.shuffle_buffer = 20;
    c.readers = 2;
    c.threads = 2;
    c.epochs = Some(2);
    c.max_logged_skips = 2;
    c
}

fn take(cfg: &LoaderConfig, vocab: &Arc<hq_data::text::tags::TagVocab>, k: usize) -> Vec<Batch> {
    let loader = DataLoader::new(cfg.clone(), Some(Arc::clone(vocab)), None).expect("loader");
    loader.take(k).map(|b| b.expect("batch")).collect()
}

#[test]
fn joined_at_read_time_equals_the_joined_copy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (raw, full) = raw_corpus(dir.path(), 96, 24);
    assert_eq!(raw.len(), 4);
    let ann_dir = dir.path().join("ann");
    let left_out = write_foreign_annotations(&ann_dir, &raw, &full);
    let spec = foreign_spec(&ann_dir);
    let ann = Annotations::open(&spec).expect("open");

    // Coverage before training: every sample accounted for.
    let cov = coverage(&raw, &ann, 2, false).expect("coverage");
    assert_eq!(cov.samples, 96);
    assert_eq!(cov.counts.joined, 96 - left_out as u64);
    assert_eq!(cov.counts.missing, left_out as u64);
    assert_eq!(cov.counts.orphan, 4, "one orphan per file");
    assert_eq!(
        cov.counts.bad_records, 8,
        "a duplicate and a cut line per file"
    );

    // The copy, resumable: a second run finds every shard done.
    let out = dir.path().join("joined");
    let report = join_shards(&raw, &ann, &out, 2, false).expect("join");
    assert_eq!(report.written.len(), 4);
    assert_eq!(report.counts, cov.counts);
    let again = join_shards(&raw, &ann, &out, 2, false).expect("join again");
    assert_eq!(again.shards_already_done, 4);
    let mut joined = report.written.clone();
    joined.sort();

    // Same tag vocabulary from both.
    let v_side = build_tag_vocab_with(&raw, Some(&ann), 30, 2).expect("vocab side-car");
    let v_copy = build_tag_vocab(&joined, 30, 2).expect("vocab copy");
    assert_eq!(v_side, v_copy);
    let vocab = Arc::new(v_copy);

    let mut side_cfg = loader_config(&raw, 8);
    side_cfg.annotations = Some(spec);
    let copy_cfg = loader_config(&joined, 8);
    let k = 18; // into the second epoch
    let a: Vec<BatchData> = take(&side_cfg, &vocab, k).iter().map(data).collect();
    let b: Vec<BatchData> = take(&copy_cfg, &vocab, k).iter().map(data).collect();
    assert_eq!(a.len(), k);
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            x == y,
            "batch {i} differs (keys {:?} vs {:?})",
            x.keys,
            y.keys
        );
    }
    assert!(a.iter().any(|d| d.refined.contains(&true)));

    // Counts, and an exact resume with the join on.
    let mut loader =
        DataLoader::new(side_cfg.clone(), Some(Arc::clone(&vocab)), None).expect("loader");
    let first: Vec<BatchData> = loader
        .by_ref()
        .take(5)
        .map(|b| data(&b.expect("b")))
        .collect();
    let c = loader.annotation_counts().expect("counts");
    assert!(c.joined > 0 && c.joined + c.missing >= 40, "{c:?}");
    let state = loader.state().clone();
    drop(loader);
    let resumed =
        DataLoader::new(side_cfg, Some(Arc::clone(&vocab)), Some(state.clone())).expect("resume");
    let c0 = state.annotations_total;
    let rest: Vec<BatchData> = resumed.take(k - 5).map(|b| data(&b.expect("b"))).collect();
    assert_eq!(first, a[..5]);
    assert_eq!(rest, a[5..]);
    assert_eq!(c0.joined + c0.missing, c.joined + c.missing);
}

#[test]
fn bad_and_partial_annotations_are_counted_or_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (raw, full) = raw_corpus(dir.path(), 48, 12);
    let ann_dir = dir.path().join("ann");
    write_foreign_annotations(&ann_dir, &raw, &full);
    // One shard's file is missing: its samples train on raw alt-text, counted.
    let gone = ann_dir.join(format!(
        "{}.jsonl",
        hq_data::shards::annotations::shard_stem(&raw[1])
    ));
    std::fs::remove_file(&gone).expect("remove");
    let spec = foreign_spec(&ann_dir);
    let ann = Annotations::open(&spec).expect("open");
    let cov = coverage(&raw, &ann, 2, false).expect("coverage");
    assert_eq!(cov.counts.missing_files, 1);
    assert!(cov.counts.missing >= 12);
    assert!(cov
        .errors
        .iter()
        .any(|e| e.reason.contains("no annotation file")));

    let mut cfg = loader_config(&raw, 8);
    cfg.epochs = Some(1);
    cfg.annotations = Some(spec.clone());
    let mut loader = DataLoader::new(cfg.clone(), None, None).expect("loader");
    let n: usize = loader.by_ref().map(|b| b.expect("batch").len()).sum();
    assert_eq!(n, 48);
    let c = loader.annotation_counts().expect("counts");
    assert_eq!(c.joined + c.missing, 48);
    assert_eq!(c.missing_files, 1);
    assert_eq!(c.orphan, 3);
    assert_eq!(c.bad_records, 6);

    // A mapping naming a field no record has: refused before training, naming the field.
    let mut wrong = spec.clone();
    wrong.fields = FieldMap::parse("long_positive=description").expect("map");
    cfg.annotations = Some(wrong);
    let err = DataLoader::new(cfg.clone(), None, None)
        .err()
        .expect("refused");
    assert!(err.to_string().contains("description"), "{err}");
    // A wrong id field: the same.
    let mut wrong = spec.clone();
    wrong.record_id_field = Some("sha256".into());
    cfg.annotations = Some(wrong);
    let err = DataLoader::new(cfg.clone(), None, None)
        .err()
        .expect("refused");
    assert!(err.to_string().contains("sha256"), "{err}");
    // A folder without any file for these shards.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).expect("mkdir");
    cfg.annotations = Some(AnnotationSpec::new(empty.display().to_string()));
    let err = DataLoader::new(cfg.clone(), None, None)
        .err()
        .expect("refused");
    assert!(err.to_string().contains("no annotation file"), "{err}");
    // One shard whose every record is bad (a recaption job that failed on it) is bad data, not a
    // wrong setting: counted, and training goes on.
    let first = ann_dir.join(format!(
        "{}.jsonl",
        hq_data::shards::annotations::shard_stem(&raw[0])
    ));
    std::fs::write(
        &first,
        "{\"id\": \"x\", \"error\": \"no answer\"}\nnot json\n",
    )
    .expect("write");
    cfg.annotations = Some(spec);
    let mut loader = DataLoader::new(cfg, None, None).expect("loader despite one failed file");
    let n: usize = loader.by_ref().map(|b| b.expect("batch").len()).sum();
    assert_eq!(n, 48);
    let c = loader.annotation_counts().expect("counts");
    assert!(c.missing >= 24, "two shards without annotations: {c:?}");
}

#[test]
fn a_global_index_in_json_joins_like_per_shard_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (raw, full) = raw_corpus(dir.path(), 24, 12);
    // Our own field names; half the entries in a JSON list, half in an object keyed by uid.
    let mut list = Vec::new();
    let mut keyed = serde_json::Map::new();
    for (i, s) in full.iter().enumerate() {
        let uid = s.meta["uid"].as_str().expect("uid").to_string();
        let r = serde_json::to_value(s.refined.as_ref().expect("refined")).expect("json");
        if i % 2 == 0 {
            let mut rec = r.as_object().expect("obj").clone();
            rec.insert("uid".into(), uid.into());
            list.push(serde_json::Value::Object(rec));
        } else {
            keyed.insert(uid, r);
        }
    }
    let idx = dir.path().join("index");
    std::fs::create_dir_all(&idx).expect("mkdir");
    std::fs::write(idx.join("a.json"), serde_json::to_string(&list).expect("j")).expect("w");
    std::fs::write(
        idx.join("b.json"),
        serde_json::to_string(&keyed).expect("j"),
    )
    .expect("w");
    let spec = AnnotationSpec::new(format!("{}/*.json", idx.display()));
    let ann = Annotations::open(&spec).expect("open");
    let cov = coverage(&raw, &ann, 1, false).expect("coverage");
    assert_eq!((cov.counts.joined, cov.counts.missing), (24, 0));
    assert_eq!(cov.counts.orphan, 0);
    let out = dir.path().join("joined");
    let report = join_shards(&raw, &ann, &out, 1, false).expect("join");
    let back: Vec<Sample> = ShardReader::new(report.written, ReadOptions::default())
        .map(|r| r.expect("joined sample"))
        .collect();
    assert_eq!(back.len(), 24);
    for (a, b) in back.iter().zip(&full) {
        assert_eq!(a.key, b.key);
        assert_eq!(a.refined, b.refined);
        assert_eq!(a.image, b.image);
    }
}

// ---------------------------------------------------------------------------------------------
// Mixtures

fn mixture_config(sources: Vec<hq_train::data::SourceConfig>, batch: usize) -> LoaderConfig {
    let mut c = loader_config(&[], batch);
    c.sources = sources;
    c.epochs = None;
    c
}

fn source(shards: &[PathBuf], weight: f64) -> hq_train::data::SourceConfig {
    hq_train::data::SourceConfig {
        shards: shards.iter().map(|p| p.display().to_string()).collect(),
        weight,
        annotations: None,
    }
}

#[test]
fn a_mixture_follows_its_weights_and_resumes_bit_for_bit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (raw_a, full_a) = raw_corpus(&dir.path().join("a"), 24, 12);
    let (raw_b, _) = raw_corpus(&dir.path().join("b"), 16, 4);
    // Source 0: raw shards + side-car annotations; source 1: the raw shards of another corpus.
    let ann_dir = dir.path().join("ann");
    write_foreign_annotations(&ann_dir, &raw_a, &full_a);
    let mut s0 = source(&raw_a, 3.0);
    s0.annotations = Some(foreign_spec(&ann_dir));
    let cfg = mixture_config(vec![s0, source(&raw_b, 1.0)], 8);

    // Proportions over many steps: source 0 gives 3/4 of the samples (a 4-sigma band; the
    // seed is fixed, so this is deterministic).
    let n_batches = 100;
    let mut loader = DataLoader::new(cfg.clone(), None, None).expect("loader");
    let full: Vec<BatchData> = loader
        .by_ref()
        .take(n_batches)
        .map(|b| data(&b.expect("batch")))
        .collect();
    let counts = loader.source_samples().to_vec();
    let n = (n_batches * 8) as f64;
    assert_eq!(counts.iter().sum::<u64>() as f64, n);
    let sd = (n * 0.75 * 0.25).sqrt();
    assert!(
        (counts[0] as f64 - 0.75 * n).abs() < 4.0 * sd,
        "source counts {counts:?} for weights 3:1"
    );
    let ann = loader.annotation_counts().expect("source 0 is annotated");
    assert_eq!(
        ann.joined + ann.missing,
        counts[0],
        "only source 0 is joined"
    );
    drop(loader);
    // Sources run through many passes: 600 samples from a 24-sample source.
    assert!(counts[0] > 10 * 24);

    // The same seed gives the same stream; a resume continues it bit for bit.
    let cut = 37;
    let mut first = DataLoader::new(cfg.clone(), None, None).expect("loader");
    let head: Vec<BatchData> = first
        .by_ref()
        .take(cut)
        .map(|b| data(&b.expect("batch")))
        .collect();
    let json = first.state().to_json();
    drop(first);
    assert_eq!(head, full[..cut]);
    let state = hq_train::data::LoaderState::from_json(&json).expect("state");
    let resumed = DataLoader::new(cfg.clone(), None, Some(state)).expect("resume");
    let tail: Vec<BatchData> = resumed
        .take(n_batches - cut)
        .map(|b| data(&b.expect("batch")))
        .collect();
    for (i, (a, b)) in tail.iter().zip(&full[cut..]).enumerate() {
        assert!(a == b, "batch {} differs after resume", cut + i);
    }

    // Another rank draws its own stream; other weights are refused on resume.
    let mut rank1 = cfg.clone();
    rank1.world_size = 2;
    rank1.rank = 1;
    rank1.seed = 8;
    let other: Vec<BatchData> = DataLoader::new(rank1, None, None)
        .expect("rank 1")
        .take(3)
        .map(|b| data(&b.expect("batch")))
        .collect();
    assert_ne!(other[..], full[..3]);
    // A source with fewer shards than ranks (2 shards, 3 ranks) is read whole by the rank left
    // without one, instead of refusing to start.
    let mut rank2 = cfg.clone();
    rank2.world_size = 3;
    rank2.rank = 2;
    let loader = DataLoader::new(rank2, None, None).expect("rank 2 of 3");
    assert_eq!(
        loader.worker_shards().len(),
        3,
        "both shards of source 0, its share of source 1's four"
    );
    drop(loader);

    // open_clip's upsampling factors: every shard of a source weighs its factor, so equal
    // factors mix by shard count (2 vs 4 shards: source 0 gives 1/3).
    let mut per_shard = cfg.clone();
    per_shard.sources[0].weight = 1.0;
    per_shard.source_weighting = hq_train::data::SourceWeighting::PerShard;
    let mut loader = DataLoader::new(per_shard, None, None).expect("per-shard loader");
    let n = loader
        .by_ref()
        .take(60)
        .map(|b| b.expect("b").len())
        .sum::<usize>() as f64;
    let c0 = loader.source_samples()[0] as f64;
    let sd = (n / 3.0 * 2.0 / 3.0).sqrt();
    assert!((c0 - n / 3.0).abs() < 4.0 * sd, "{c0} of {n} from source 0");
    drop(loader);
    let mut reweighted = cfg.clone();
    reweighted.sources[1].weight = 2.0;
    let state = hq_train::data::LoaderState::from_json(&json).expect("state");
    assert!(DataLoader::new(reweighted, None, Some(state)).is_err());
}
