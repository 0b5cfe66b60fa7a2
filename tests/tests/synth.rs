//! The built-in synthetic corpus (`hq_data::synth`): determinism, oracle texts, held-out layouts.

use hq_data::recaption_format;
use hq_data::shards::{decode_image, probe_image, ReadOptions, ShardReader, DEFAULT_MAX_PIXELS};
use hq_data::synth::evalsets::read_tar_members;
use hq_data::synth::{
    self, check_text, stats, tag_holds, ImageFormat, RawKind, Scene, SynthConfig, WriteOptions,
};
use hq_data::Sample;
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

fn small_config(seed: u64) -> SynthConfig {
    SynthConfig {
        seed,
        samples: 600,
        shard_size: 250,
        eval_samples: 40,
        eval_shard_size: 16,
        ..SynthConfig::default()
    }
}

fn write(cfg: &SynthConfig, dir: &Path, threads: usize) -> synth::CorpusReport {
    synth::write_corpus(
        cfg,
        dir,
        &WriteOptions {
            force: false,
            threads: Some(threads),
            progress: false,
        },
    )
    .expect("write corpus")
}

/// Every file under `root`, relative path -> bytes.
fn tree(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(dir).expect("read dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).expect("prefix").to_path_buf();
                out.insert(rel, std::fs::read(&p).expect("read"));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn read_samples(dir: &Path) -> Vec<Sample> {
    let (shards, _) =
        stats::resolve_stats_input(dir.to_str().expect("utf-8 path")).expect("shards");
    let reader = ShardReader::new(shards, ReadOptions::default());
    reader.map(|r| r.expect("good sample")).collect()
}

fn scene_of(s: &Sample) -> Scene {
    serde_json::from_value(s.meta.get("scene").expect("scene in meta").clone()).expect("scene")
}

#[test]
fn same_seed_gives_identical_output_whatever_the_thread_count() {
    let a = tempfile::tempdir().expect("tmp");
    let b = tempfile::tempdir().expect("tmp");
    let cfg = small_config(7);
    let ra = write(&cfg, a.path(), 1);
    let rb = write(&cfg, b.path(), 4);
    assert_eq!(ra.train_shards.len(), 3);
    assert_eq!(ra.stats, rb.stats);
    let (ta, tb) = (tree(a.path()), tree(b.path()));
    assert_eq!(
        ta.keys().collect::<Vec<_>>(),
        tb.keys().collect::<Vec<_>>(),
        "same files"
    );
    for (k, v) in &ta {
        assert!(
            v == &tb[k],
            "{} differs between 1 and 4 threads",
            k.display()
        );
    }
    // Generating one sample directly gives the bytes in the shard.
    let samples = read_samples(a.path());
    let direct = synth::train_sample(&cfg, 123).expect("sample");
    assert_eq!(samples[123].key, direct.sample.key);
    assert_eq!(samples[123].image, direct.sample.image);
    assert_eq!(samples[123].raw_text, direct.sample.raw_text);
    assert_eq!(samples[123].refined, direct.sample.refined);
}

#[test]
fn different_seeds_differ() {
    let cfg1 = small_config(1);
    let cfg2 = small_config(2);
    let mut same_images = 0;
    let mut same_texts = 0;
    for i in 0..200 {
        let a = synth::train_sample(&cfg1, i).expect("a");
        let b = synth::train_sample(&cfg2, i).expect("b");
        same_images += usize::from(a.sample.image == b.sample.image);
        same_texts += usize::from(a.sample.refined == b.sample.refined);
    }
    assert_eq!(same_images, 0);
    assert!(same_texts < 5, "{same_texts} identical refined texts");
    // And consecutive samples of one seed differ too.
    let x = synth::train_sample(&cfg1, 0).expect("x");
    let y = synth::train_sample(&cfg1, 1).expect("y");
    assert_ne!(x.sample.image, y.sample.image);
}

#[test]
fn oracle_texts_round_trip_and_negatives_contradict_the_scene() {
    let cfg = SynthConfig {
        samples: 3000,
        ..small_config(11)
    };
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..cfg.samples {
        let g = synth::train_sample(&cfg, i).expect("sample");
        let r = g.sample.refined.as_ref().expect("refined texts");
        assert_eq!(r.source.as_deref(), Some("oracle"));
        // The recaptioner's answer format renders and parses them back exactly.
        let answer = recaption_format::render(r);
        assert_eq!(
            recaption_format::parse(&answer, Some("oracle")).as_ref(),
            Ok(r),
            "{answer}"
        );
        assert_ne!(r.long_positive, r.long_negative);
        let (bad, checked) = check_text(&g.scene, &r.long_positive);
        assert!(
            bad.is_empty(),
            "positive contradicts the scene: {bad:?}\n{}",
            r.long_positive
        );
        assert!(
            checked >= 3,
            "checker read too little of {}",
            r.long_positive
        );
        let (bad, _) = check_text(&g.scene, &r.long_negative);
        assert!(
            !bad.is_empty(),
            "negative ({:?}) does not contradict the scene:\n+ {}\n- {}",
            g.perturbations,
            r.long_positive,
            r.long_negative
        );
        assert!(r
            .tags_positive
            .iter()
            .all(|t| tag_holds(&g.scene, t) != Some(false)));
        assert!(!r.tags_negative.is_empty());
        assert!(r
            .tags_negative
            .iter()
            .all(|t| tag_holds(&g.scene, t) == Some(false)));
        assert!(r.tags_negative.iter().all(|t| !r.tags_positive.contains(t)));
        for p in &g.perturbations {
            *kinds.entry(p.name().to_string()).or_default() += 1;
        }
        // The JSON member records the scene and the raw-text kind.
        assert_eq!(scene_of(&g.sample), g.scene);
        let kind = g.sample.meta["raw_kind"].as_str().expect("raw_kind");
        assert_eq!(RawKind::from_name(kind), Some(g.raw.kind));
    }
    // Every kind of change appears: attribute swaps, relation flips, counts, colours, shapes...
    for k in [
        "recolor",
        "reshape",
        "swap_colors",
        "swap_shapes",
        "flip_relation",
        "change_count",
        "resize",
        "move",
    ] {
        assert!(kinds.get(k).copied().unwrap_or(0) > 10, "{k}: {kinds:?}");
    }
}

#[test]
fn shards_carry_samples_with_meta_and_stats_read_them_back() {
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = SynthConfig {
        format: ImageFormat::Png,
        ..small_config(3)
    };
    let report = write(&cfg, dir.path(), 2);
    let samples = read_samples(dir.path());
    assert_eq!(samples.len(), 600);
    let mut uids = HashSet::new();
    for (i, s) in samples.iter().enumerate() {
        assert_eq!(s.key, format!("{i:09}"));
        let img = s.image.as_ref().expect("image");
        assert_eq!(img.ext, "png");
        let decoded = decode_image(&img.bytes, DEFAULT_MAX_PIXELS).expect("png decodes");
        assert_eq!((decoded.width(), decoded.height()), (64, 64));
        assert!(uids.insert(s.meta["uid"].as_str().expect("uid").to_string()));
        let scene = scene_of(s);
        assert!((1..=3).contains(&scene.objects.len()));
        assert!(s.refined.is_some());
        assert!(!s.raw_text.is_empty());
    }
    let from_disk = stats::stats_of(&[dir.path().display().to_string()], 2, false).expect("stats");
    assert_eq!(from_disk.samples, 600);
    assert_eq!(from_disk.shards, 3);
    assert_eq!(from_disk.raw_kinds, report.stats.raw_kinds);
    assert_eq!(from_disk.tags, report.stats.tags);
    assert_eq!(from_disk.bytes, report.stats.bytes);
    assert_eq!(from_disk.eval_sets.len(), 6);
    assert!(from_disk.eval_sets.values().all(|n| *n == 40));
    let kinds: u64 = from_disk.raw_kinds.values().sum();
    assert_eq!(kinds, 600);
    for k in RawKind::ALL {
        assert!(
            from_disk.raw_kinds.get(k.name()).copied().unwrap_or(0) > 30,
            "{k:?}"
        );
    }
    let text = from_disk.report(10);
    for needle in [
        "samples: 600 in 3 shard(s)",
        "64x64",
        "raw text tokens",
        "tag vocabulary",
        "synth_shape 40",
    ] {
        assert!(text.contains(needle), "{needle} missing from\n{text}");
    }
    // The manifest names the corpus and its sets.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("corpus.json")).expect("manifest"))
            .expect("json");
    assert_eq!(manifest["generator"], synth::GENERATOR_VERSION);
    assert_eq!(manifest["config"]["seed"], 3);
    assert_eq!(manifest["train"]["samples"], 600);
    assert_eq!(manifest["eval"].as_array().map(Vec::len), Some(6));
}

fn lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .lines()
        .map(str::to_string)
        .collect()
}

/// Members of every `test/N.tar` of a webdataset set, checking nshards.txt against the files.
fn wds_members(set: &Path) -> Vec<(String, Vec<u8>)> {
    let nshards: usize = lines(&set.join("test/nshards.txt"))[0]
        .trim()
        .parse()
        .expect("int");
    let tars = std::fs::read_dir(set.join("test"))
        .expect("test dir")
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".tar"))
        })
        .count();
    assert_eq!(tars, nshards, "{}", set.display());
    let mut all = Vec::new();
    for i in 0..nshards {
        all.extend(read_tar_members(&set.join(format!("test/{i}.tar"))).expect("tar"));
    }
    all
}

#[test]
fn eval_sets_follow_the_datacomp_and_aro_layouts_and_are_held_out() {
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = small_config(5);
    write(&cfg, dir.path(), 2);
    let eval = dir.path().join("eval");
    let n = cfg.eval_samples as usize;

    for (task, classes) in [
        ("synth_shape", 8usize),
        ("synth_color", 8),
        ("synth_count", 3),
    ] {
        let set = eval.join(format!("wds_{task}_test"));
        let names = lines(&set.join("classnames.txt"));
        assert_eq!(names.len(), classes, "{task}");
        assert!(names.iter().all(|c| !c.trim().is_empty()));
        let templates = lines(&set.join("zeroshot_classification_templates.txt"));
        assert!(templates.len() >= 5 && templates.iter().all(|t| t.contains("{c}")));
        assert!(
            !set.join("dataset_type.txt").exists(),
            "classification is the default type"
        );
        let members = wds_members(&set);
        assert_eq!(
            members.len(),
            2 * n,
            "{task}: one image and one cls per sample"
        );
        let mut seen = vec![0usize; classes];
        for (i, pair) in members.chunks(2).enumerate() {
            let key = format!("s{i:07}");
            assert_eq!(pair[0].0, format!("{key}.jpg"));
            assert_eq!(pair[1].0, format!("{key}.cls"));
            let text = std::str::from_utf8(&pair[1].1).expect("ascii");
            let class: usize = text.parse().expect("integer class, no whitespace");
            assert!(class < classes);
            seen[class] += 1;
            decode_image(&pair[0].1, DEFAULT_MAX_PIXELS).expect("image decodes");
        }
        assert!(
            seen.iter().all(|c| *c > 0),
            "{task}: every class present {seen:?}"
        );
    }

    let set = eval.join("wds_synth_retrieval_test");
    assert_eq!(lines(&set.join("dataset_type.txt")), vec!["retrieval"]);
    let members = wds_members(&set);
    assert_eq!(members.len(), 2 * n);
    for (i, pair) in members.chunks(2).enumerate() {
        assert_eq!(pair[0].0, format!("s{i:07}.jpg"));
        assert_eq!(pair[1].0, format!("s{i:07}.txt"));
        let caps: Vec<&str> = std::str::from_utf8(&pair[1].1)
            .expect("utf-8")
            .lines()
            .collect();
        assert!((2..=5).contains(&caps.len()), "{caps:?}");
        let unique: HashSet<&&str> = caps.iter().collect();
        assert_eq!(unique.len(), caps.len());
    }

    for (task, file, key) in [
        (
            "synth_aro_attribute",
            "visual_genome_attribution.json",
            "attributes",
        ),
        (
            "synth_aro_relation",
            "visual_genome_relation.json",
            "relation_name",
        ),
    ] {
        let set = eval.join("aro").join(task);
        let records: Vec<serde_json::Value> =
            serde_json::from_slice(&std::fs::read(set.join(file)).expect("annotations"))
                .expect("json");
        assert_eq!(records.len(), n);
        let mut groups = HashSet::new();
        for r in &records {
            let img = set
                .join("images")
                .join(r["image_path"].as_str().expect("path"));
            let im = probe_image(
                &std::fs::read(&img).expect("read image"),
                DEFAULT_MAX_PIXELS,
            )
            .expect("image");
            assert_eq!(r["bbox"], serde_json::json!([0, 0, im.width, im.height]));
            assert_eq!(r["bbox_w"], im.width);
            assert_eq!(r["bbox_h"], im.height);
            let (t, f) = (r["true_caption"].as_str(), r["false_caption"].as_str());
            assert!(t.is_some() && f.is_some() && t != f);
            match key {
                "attributes" => {
                    let a = r[key].as_array().expect("attributes");
                    assert_eq!(a.len(), 2);
                    groups.insert(format!("{}_{}", a[0], a[1]));
                }
                _ => {
                    groups.insert(r[key].as_str().expect("relation").to_string());
                }
            }
        }
        assert!(
            groups.len() > 1,
            "{task}: macro accuracy needs several groups"
        );
    }

    // Held out: no evaluation image is a training image.
    let train: HashSet<Vec<u8>> = read_samples(dir.path())
        .into_iter()
        .filter_map(|s| s.image.map(|i| i.bytes))
        .collect();
    let mut eval_images = 0;
    for set in [
        "synth_shape",
        "synth_color",
        "synth_count",
        "synth_retrieval",
    ] {
        for (name, bytes) in wds_members(&eval.join(format!("wds_{set}_test"))) {
            if name.ends_with(".jpg") {
                eval_images += 1;
                assert!(!train.contains(&bytes), "{set}/{name} is a training image");
            }
        }
    }
    for task in ["synth_aro_attribute", "synth_aro_relation"] {
        for e in std::fs::read_dir(eval.join("aro").join(task).join("images")).expect("images") {
            let bytes = std::fs::read(e.expect("entry").path()).expect("read");
            eval_images += 1;
            assert!(!train.contains(&bytes), "{task} image is a training image");
        }
    }
    assert_eq!(eval_images, 6 * n);
    // Scenes too: none of the held-out scenes equals a training scene.
    let train_scenes: Vec<Scene> = (0..cfg.samples)
        .map(|i| synth::train_sample(&cfg, i).expect("sample").scene)
        .collect();
    for (set, scene) in synth::evalsets::eval_scenes(&cfg) {
        assert!(!train_scenes.contains(&scene), "{set} scene is in training");
    }
}

#[test]
fn an_existing_corpus_is_kept_unless_forced() {
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = SynthConfig {
        samples: 50,
        eval_samples: 0,
        ..small_config(9)
    };
    write(&cfg, dir.path(), 1);
    let again = synth::write_corpus(&cfg, dir.path(), &WriteOptions::default());
    assert!(again.is_err(), "second write without force must fail");
    let smaller = SynthConfig {
        samples: 10,
        shard_size: 5,
        ..cfg.clone()
    };
    let r = synth::write_corpus(
        &smaller,
        dir.path(),
        &WriteOptions {
            force: true,
            ..WriteOptions::default()
        },
    )
    .expect("forced");
    assert_eq!(r.train_shards.len(), 2);
    let tars = std::fs::read_dir(dir.path().join("train"))
        .expect("train")
        .count();
    assert_eq!(tars, 2, "old shards are gone");
    assert!(!dir.path().join("eval").exists());
    let bad = SynthConfig {
        image_size: 4,
        ..cfg
    };
    assert!(synth::write_corpus(&bad, &dir.path().join("x"), &WriteOptions::default()).is_err());
}

/// Mixed training draws ONE segment of d+ per sample (method.md), so every segment must be about
/// the image, the way the paper's recaptioner writes: each names an object (most also its colour)
/// and is true of the scene on its own; d- differs from d+ in at least one segment (the hard
/// negative HNI draws) and every changed segment is false on its own.
#[test]
fn every_description_segment_identifies_its_image() {
    use hq_data::synth::scene::{Color, Shape};
    use hq_data::text::segment::{changed_segments, segments};
    let cfg = small_config(5);
    let (mut segs_total, mut with_colour) = (0usize, 0usize);
    let mut distinct = HashSet::new();
    for i in 0..2000 {
        let g = synth::train_sample(&cfg, i).expect("sample");
        let r = g.sample.refined.as_ref().expect("refined texts");
        let pos = segments(&r.long_positive);
        assert!(pos.len() >= 3, "{}", r.long_positive);
        for seg in &pos {
            let words: Vec<String> = seg
                .split_whitespace()
                .map(|w| {
                    w.trim_matches(|c: char| !c.is_alphanumeric())
                        .to_lowercase()
                })
                .collect();
            assert!(
                words.iter().any(|w| Shape::from_noun(w).is_some()),
                "segment names no object: {seg:?} in {}",
                r.long_positive
            );
            with_colour += usize::from(words.iter().any(|w| Color::from_name(w).is_some()));
            segs_total += 1;
            let (bad, checked) = check_text(&g.scene, seg);
            assert!(bad.is_empty() && checked > 0, "{seg:?}: {bad:?}");
            distinct.insert(seg.to_lowercase());
        }
        let changed = changed_segments(&r.long_positive, &r.long_negative);
        assert!(!changed.is_empty(), "d- = d+: {}", r.long_negative);
        for seg in changed {
            assert!(
                !check_text(&g.scene, seg).0.is_empty(),
                "changed segment {seg:?} is true ({:?})",
                g.perturbations
            );
        }
    }
    let f = with_colour as f64 / segs_total as f64;
    assert!(f > 0.7, "only {f:.2} of the segments name a colour");
    // Segments are specific: far more distinct texts than there are clause kinds.
    assert!(
        distinct.len() * 3 > segs_total,
        "{} distinct of {segs_total}",
        distinct.len()
    );
}
