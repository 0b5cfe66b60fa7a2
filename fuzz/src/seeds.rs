//! Assembles the seed corpora from the files `fuzz/seeds/make.sh` had the project write: each
//! target's seeds go to `OUT/<target>/corpus/<name>` (OUT is `fuzz/tests/__fuzz__`); multi-file
//! targets get their files joined with [`crate::files::SEP`], in the order the target documents.

use std::fs;
use std::path::{Path, PathBuf};

use crate::files;
use hq_data::recaption_format;
use hq_data::shards::reader::{ReadOptions, TarSamples};
use hq_data::synth::{train_sample, SynthConfig};

fn read(p: impl AsRef<Path>) -> Vec<u8> {
    let p = p.as_ref();
    fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A file of the repository (tests run in the crate's folder).
fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(p)
}

struct Out(PathBuf);

impl Out {
    fn seed(&self, target: &str, name: &str, bytes: &[u8]) {
        let dir = self.0.join(target).join("corpus");
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        fs::write(dir.join(name), bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

/// Writes every target's seeds from the files under `work` into `out`.
pub fn write_seeds(work: &Path, out: &Path) {
    let out = Out(out.to_path_buf());
    let synth = work.join("synth");
    let run = work.join("run");
    let ckpt = run.join("checkpoints/step-00000002");

    // ---- shards and the side-car join
    let shard = read(synth.join("train/shard-00000.tar"));
    let samples: Vec<_> = TarSamples::new(&shard[..], "s", ReadOptions::default())
        .filter_map(Result::ok)
        .collect();
    // A side-car as the recaption job writes it: one `{"uid", "hq_clip": {...}}` a line.
    let sidecar: String = samples
        .iter()
        .filter_map(|s| {
            let r = s.refined.as_ref()?;
            // Keyed as the join looks samples up: their `uid`, else their key.
            let uid = s
                .meta
                .get("uid")
                .cloned()
                .unwrap_or_else(|| s.key.clone().into());
            Some(serde_json::json!({"uid": uid, "hq_clip": r}).to_string() + "\n")
        })
        .collect();
    out.seed("tar_shard", "synth-shard", &shard);
    out.seed(
        "tar_shard",
        "synth-shard-sidecar",
        &files::join(&[&shard, sidecar.as_bytes()]),
    );
    out.seed(
        "tar_shard",
        "synth-shard-cut",
        &shard[..shard.len() * 2 / 3],
    );
    out.seed(
        "tar_shard",
        "eval-shard",
        &read(synth.join("eval/wds_synth_color_test/test/0.tar")),
    );

    // ---- answers, texts, tags
    let cfg = SynthConfig {
        samples: 6,
        image_size: 32,
        ..SynthConfig::default()
    };
    let mut counter = hq_data::text::tags::TagCounter::new();
    for i in 0..6 {
        let g = train_sample(&cfg, i).unwrap_or_else(|e| panic!("{e}"));
        if let Some(r) = &g.sample.refined {
            out.seed(
                "recaption_answer",
                &format!("oracle-{i}"),
                recaption_format::render(r).as_bytes(),
            );
            counter.add_sample(&r.tags_positive);
        }
        out.seed(
            "tokenizer_text",
            &format!("alt-{i}"),
            g.sample.raw_text.as_bytes(),
        );
        out.seed(
            "text_clean",
            &format!("alt-{i}"),
            g.sample.raw_text.as_bytes(),
        );
    }
    for (name, text) in [
        (
            "html",
            "Caf&eacute; &amp; bar &#x27;open&#39; &lt;b&gt;now&lt;/b&gt;",
        ),
        ("mojibake", "cafÃ© rÃ©sumÃ© â€œquotedâ€\u{9d} naÃ¯ve"),
        (
            "spaces",
            "  two\u{a0}\u{a0}spaces\t\tand\r\nlines\u{2028}  ",
        ),
    ] {
        out.seed("tokenizer_text", name, text.as_bytes());
        out.seed("text_clean", name, text.as_bytes());
    }
    out.seed(
        "recaption_answer",
        "numbered-bold",
        b"1. **Long description:** A red cube.\n2. **Negative description:** A blue cube.\n3. **Tags:** cube, red\n4. **Negative tags:** sphere.\n",
    );
    out.seed(
        "tag_vocab",
        "run-tag-vocab",
        &read(ckpt.join("tag_vocab.tsv")),
    );
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    counter
        .top_k(20)
        .save(dir.path().join("v.tsv"))
        .unwrap_or_else(|e| panic!("{e}"));
    out.seed(
        "tag_vocab",
        "synth-tag-vocab",
        &read(dir.path().join("v.tsv")),
    );

    // ---- images: the corpus's JPEGs, a PNG, and a decompression bomb's header
    out.seed(
        "image_decode",
        "synth-jpg",
        &read(synth.join("eval/aro/synth_aro_relation/images/000000.jpg")),
    );
    let png = dir.path().join("a.png");
    image::RgbImage::from_fn(5, 3, |x, y| image::Rgb([x as u8 * 50, y as u8 * 80, 7]))
        .save(&png)
        .unwrap_or_else(|e| panic!("{e}"));
    let png = read(png);
    out.seed("image_decode", "small-png", &png);
    let mut bomb = png.clone();
    // IHDR width and height (bytes 16..24) set to 100000 x 100000; the CRC no longer matches.
    bomb[16..20].copy_from_slice(&100_000u32.to_be_bytes());
    bomb[20..24].copy_from_slice(&100_000u32.to_be_bytes());
    out.seed("image_decode", "bomb-png-header", &bomb);

    // ---- eval readers
    for set in ["wds_synth_color_test", "wds_synth_retrieval_test"] {
        let d = synth.join("eval").join(set);
        let opt = |n: &str| fs::read(d.join(n)).unwrap_or_default();
        out.seed(
            "eval_wds_dir",
            set,
            &files::join(&[
                &opt("test/nshards.txt"),
                &opt("dataset_type.txt"),
                &opt("classnames.txt"),
                &opt("zeroshot_classification_templates.txt"),
                &opt("test/0.tar"),
            ]),
        );
    }
    // As numpy writes them (make.sh saves them with np.save and numpy.lib.format).
    for entry in fs::read_dir(work.join("npy")).unwrap_or_else(|e| panic!("{e}")) {
        let p = entry.unwrap_or_else(|e| panic!("{e}")).path();
        let name = p
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        out.seed("npy", &name, &read(&p));
    }
    // The reader's image is `images/a.png`: point the real annotations at it.
    let aro = |kind: &str, file: &str| -> Vec<u8> {
        let text = String::from_utf8(read(synth.join("eval/aro").join(kind).join(file)))
            .unwrap_or_else(|e| panic!("{e}"));
        text.replace("000000.jpg", "a.png").into_bytes()
    };
    out.seed(
        "aro_json",
        "synth-aro",
        &files::join(&[
            &aro("synth_aro_relation", "visual_genome_relation.json"),
            &aro("synth_aro_attribute", "visual_genome_attribution.json"),
        ]),
    );
    out.seed(
        "winogavil_jsonl",
        "hf-export",
        br#"{"cue": "ocean", "candidates": ["wave", "sand", "desk"], "associations": ["wave", "sand"], "candidate_images": ["images/a.png", "images/a.png", "images/missing.png"]}
{"cue": "Apple", "candidates": ["tree", "pie"], "associations": ["pie"], "candidate_images": ["images/a.png", "images/a.png"]}
"#,
    );
    out.seed(
        "eval_results",
        "hq-eval-run",
        &read(work.join("eval/results.json")),
    );

    // ---- training configs, weights, checkpoints, loader state
    out.seed(
        "train_config_toml",
        "run-config",
        &read(run.join("config.toml")),
    );
    out.seed(
        "train_config_toml",
        "ablation",
        &read(repo("training/configs/ablation.toml")),
    );
    for p in [
        "training/presets/hq-tiny.json",
        "training/presets/ViT-B-32.json",
        "training/configs/ablation-model.json",
    ] {
        let name = Path::new(p)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        out.seed("open_clip_config", &name, &read(repo(p)));
    }
    let model_config = read(ckpt.join("model_config.json"));
    out.seed("open_clip_config", "checkpoint-model-config", &model_config);
    let mc: serde_json::Value =
        serde_json::from_slice(&model_config).unwrap_or_else(|e| panic!("{e}"));
    let hf = serde_json::json!({
        "model_cfg": mc,
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic", "resize_mode": "shortest"}
    });
    out.seed(
        "open_clip_config",
        "hf-open-clip-config",
        hf.to_string().as_bytes(),
    );
    let stc = read(ckpt.join("stc_head.safetensors"));
    out.seed("weights_file", "stc-head-safetensors", &stc);
    let state = read(ckpt.join("train_state.json"));
    let ts: serde_json::Value = serde_json::from_slice(&state).unwrap_or_else(|e| panic!("{e}"));
    out.seed(
        "loader_state",
        "checkpoint-loader",
        ts["loader"].to_string().as_bytes(),
    );
    // A checkpoint with the run's config and state and a small weights file, written by the
    // checkpoint writer so its manifest is the real thing.
    let mut w = hq_train::checkpoint::CheckpointWriter::create(dir.path().join("step-1"), 2)
        .unwrap_or_else(|e| panic!("{e}"));
    for (name, bytes) in [
        ("model.safetensors", &stc),
        ("model_config.json", &model_config),
        ("train_state.json", &state),
    ] {
        w.write_bytes(name, bytes).unwrap_or_else(|e| panic!("{e}"));
    }
    let c = w.commit().unwrap_or_else(|e| panic!("{e}"));
    out.seed(
        "checkpoint_dir",
        "writer-checkpoint",
        &files::join(&[
            &read(c.join("manifest.json")),
            &stc,
            &model_config,
            &state,
            b"step-1\n",
        ]),
    );
    out.seed(
        "checkpoint_dir",
        "run-manifest-only",
        &read(ckpt.join("manifest.json")),
    );

    // ---- a Hugging Face tokenizer folder as transformers saves it (CLIPA's WordPiece)
    let wordpiece = work.join("wordpiece");
    out.seed(
        "hf_tokenizer_dir",
        "wordpiece-transformers",
        &files::join(&[
            &read(wordpiece.join("tokenizer.json")),
            &read(wordpiece.join("tokenizer_config.json")),
        ]),
    );

    // ---- the recaptioner: model directory, teacher set, exemplars and prompts, input lists
    let q = work.join("qwen2vl");
    let prompt = read(repo("recaptioner/prompt_short.json"));
    out.seed(
        "qwen2vl_model_dir",
        "finetune-configs",
        &files::join(&[
            &read(q.join("config.json")),
            &read(q.join("preprocessor_config.json")),
            &read(q.join("generation_config.json")),
            &prompt,
        ]),
    );
    let teacher_dir = dir.path().join("teacher");
    let jsonl = teacher_dir.join("teacher.jsonl");
    hq_runtime::recaption::teacher::teacher_set_from_shards(
        &[synth.join("train/shard-00000.tar")],
        &jsonl,
        &teacher_dir.join("images"),
        3,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let teacher = read(&jsonl);
    out.seed("teacher_jsonl", "from-shards", &teacher);
    out.seed(
        "exemplars_prompt",
        "teacher-as-exemplars",
        &files::join(&[&teacher, &prompt]),
    );
    let list = br#"{"image": "images/000000.jpg", "text": "a red cube", "key": "k0"}
{"image": "images/000001.jpg", "caption": "two spheres"}
"#;
    let csv = b"key,image,text\nk0,images/000000.jpg,\"a red, cube\"\nk1,images/000001.jpg,plain\n";
    out.seed(
        "recap_input",
        "list-csv-shard",
        &files::join(&[list, csv, &shard]),
    );
}
