//! Held-out evaluation sets, each from its own random stream (so no image is a training image).
//!
//! DataComp / CLIP_benchmark webdataset layout (`wds_<task>_test/`):
//! - `classnames.txt` (one class a line), `zeroshot_classification_templates.txt` (one template a
//!   line, `{c}` for the class name) for classification sets;
//! - `dataset_type.txt` containing `retrieval` for the retrieval set (CLIP_benchmark reads it to
//!   tell the two apart; classification is its default);
//! - `test/nshards.txt` (the number of shards) and `test/0.tar`, `test/1.tar`, ... with samples
//!   keyed `s0000000`, ...: `key.png|jpg` plus `key.cls` (the class index as ASCII digits, as
//!   webdataset writes an int) or `key.txt` (one caption a line).
//!
//! Sets: `synth_shape` (8 shapes, one object per image, balanced), `synth_color` (8 colours, one
//! object, balanced), `synth_count` (1-3 objects: `one shape`, `two shapes`, `three shapes`),
//! `synth_retrieval` (2-5 true captions per image).
//!
//! ARO layout (mertyg/vision-language-models-are-bows, VG-Relation / VG-Attribution): a folder per
//! set holding the JSON list and an `images/` folder. A record is `{"image_id", "image_path"
//! (relative to images/, as ARO joins it), "bbox": [x, y, w, h] and ARO's own "bbox_x", "bbox_y",
//! "bbox_w", "bbox_h" (the whole image), "true_caption", "false_caption"}` plus `"relation_name"`
//! (`synth_aro_relation`, file `visual_genome_relation.json`) or `"attributes": [a1, a2]`
//! (`synth_aro_attribute`, file `visual_genome_attribution.json`). ARO's macro accuracy averages
//! over relation names, or over attribute pairs `a1_a2`.

use super::captions::short_captions;
use super::scene::{Background, Color, Group, Relation, Scene, Shape};
use super::{image_bytes, sample_rng, Purpose, Stream, SynthConfig};
use crate::atomic::{write_atomic, AtomicFile};
use crate::error::{DataError, Result};
use crate::sample::ImageBytes;
use rand::Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Description of one written held-out set (stored in the corpus manifest).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalSetInfo {
    /// Task name: `synth_shape`, `synth_aro_relation`, ...
    pub name: String,
    /// `classification`, `retrieval`, `aro_attribute` or `aro_relation`.
    pub kind: String,
    /// Folder, relative to the corpus root.
    pub path: String,
    pub count: u64,
    /// Shards (webdataset sets) or 0 (ARO sets).
    pub nshards: u64,
    /// Class names (classification sets).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub classes: Vec<String>,
    /// Annotation file inside `path` (ARO sets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<String>,
}

/// Zero-shot templates of the shape task.
pub const SHAPE_TEMPLATES: [&str; 6] = [
    "a photo of a {c}.",
    "a drawing of a {c}.",
    "an image of a {c}.",
    "a {c} shape.",
    "a picture of a {c}.",
    "a simple graphic of a {c}.",
];

/// Zero-shot templates of the colour task.
pub const COLOR_TEMPLATES: [&str; 6] = [
    "a photo of a {c} shape.",
    "a {c} object.",
    "an image of something {c}.",
    "a drawing of a {c} shape.",
    "the color {c}.",
    "a {c} thing.",
];

/// Zero-shot templates of the count task (class names are `one shape`, `two shapes`, ...).
pub const COUNT_TEMPLATES: [&str; 5] = [
    "a photo of {c}.",
    "an image of {c}.",
    "a picture showing {c}.",
    "a drawing of {c}.",
    "{c}.",
];

/// Class names of the count task.
pub const COUNT_CLASSES: [&str; 3] = ["one shape", "two shapes", "three shapes"];

/// One held-out sample of a webdataset set: a key, an image and either a class or captions.
struct WdsItem {
    image: ImageBytes,
    label: Label,
}

enum Label {
    Class(usize),
    Captions(Vec<String>),
}

fn single_object<R: Rng + ?Sized>(
    rng: &mut R,
    shape: Option<Shape>,
    color: Option<Color>,
    object_scale: f32,
) -> Scene {
    let mut g = Group::random(rng, 1);
    if let Some(s) = shape {
        g.shape = s;
    }
    if let Some(c) = color {
        g.color = c;
    }
    let bg = Background::random(rng);
    Scene::layout_scaled(rng, bg, vec![g], None, object_scale)
}

/// The scene of classification sample `index` of `stream` and its class. Every held-out scene is
/// laid out at the corpus's object scale, as the training scenes are.
pub fn classification_scene(cfg: &SynthConfig, stream: Stream, index: u64) -> (Scene, usize) {
    let mut rng = sample_rng(cfg.seed, stream, index, Purpose::Scene);
    let scale = cfg.object_scale;
    match stream {
        Stream::Shape => {
            let class = (index % Shape::ALL.len() as u64) as usize;
            (
                single_object(&mut rng, Some(Shape::ALL[class]), None, scale),
                class,
            )
        }
        Stream::Color => {
            let class = (index % Color::ALL.len() as u64) as usize;
            (
                single_object(&mut rng, None, Some(Color::ALL[class]), scale),
                class,
            )
        }
        _ => {
            let class = (index % 3) as usize;
            let n = class as u32 + 1;
            let bg = Background::random(&mut rng);
            let scene = if n == 1 || rng.gen_bool(0.5) {
                let g = Group::random(&mut rng, n);
                Scene::layout_scaled(&mut rng, bg, vec![g], None, scale)
            } else {
                let c0 = rng.gen_range(1..n);
                let (a, b) = super::scene::distinct_pair(&mut rng, c0, n - c0);
                let rel = Relation::random(&mut rng);
                Scene::layout_scaled(&mut rng, bg, vec![a, b], Some(rel), scale)
            };
            (scene, class)
        }
    }
}

/// The scene of retrieval sample `index` and its captions.
pub fn retrieval_item(cfg: &SynthConfig, index: u64) -> (Scene, Vec<String>) {
    let scene = Scene::random_scaled(
        &mut sample_rng(cfg.seed, Stream::Retrieval, index, Purpose::Scene),
        cfg.object_scale,
    );
    let mut rng = sample_rng(cfg.seed, Stream::Retrieval, index, Purpose::Captions);
    let (lo, hi) = cfg.retrieval_captions;
    let n = rng.gen_range(lo..=hi.max(lo));
    let caps = short_captions(&scene, &mut rng, n);
    (scene, caps)
}

/// One ARO record before its image is written.
#[derive(Debug, Clone, PartialEq)]
pub struct AroItem {
    pub scene: Scene,
    pub true_caption: String,
    pub false_caption: String,
    /// `relation_name` or the two attributes.
    pub label: AroLabel,
}

#[derive(Debug, Clone, PartialEq)]
pub enum AroLabel {
    Relation(String),
    Attributes(String, String),
}

/// ARO attribute-binding item: two objects of different shapes and colours; the false caption swaps
/// the colours ("the red circle and the blue square" / "the blue circle and the red square").
pub fn aro_attribute_item(cfg: &SynthConfig, index: u64) -> AroItem {
    let mut rng = sample_rng(cfg.seed, Stream::AroAttribute, index, Purpose::Scene);
    let (a, b) = loop {
        let (a, b) = super::scene::distinct_pair(&mut rng, 1, 1);
        if a.shape != b.shape && a.color != b.color {
            break (a, b);
        }
    };
    let rel = Relation::random(&mut rng);
    let bg = Background::random(&mut rng);
    let scene = Scene::layout_scaled(&mut rng, bg, vec![a, b], Some(rel), cfg.object_scale);
    let true_caption = format!(
        "the {} {} and the {} {}",
        a.color.name(),
        a.shape.name(),
        b.color.name(),
        b.shape.name()
    );
    let false_caption = format!(
        "the {} {} and the {} {}",
        b.color.name(),
        a.shape.name(),
        a.color.name(),
        b.shape.name()
    );
    AroItem {
        scene,
        true_caption,
        false_caption,
        label: AroLabel::Attributes(a.color.name().into(), b.color.name().into()),
    }
}

/// ARO relation item: two objects of different shapes; the false caption swaps subject and object
/// ("the circle is above the square" / "the square is above the circle"). Relations are balanced.
pub fn aro_relation_item(cfg: &SynthConfig, index: u64) -> AroItem {
    let mut rng = sample_rng(cfg.seed, Stream::AroRelation, index, Purpose::Scene);
    let (a, b) = loop {
        let a = Group::random(&mut rng, 1);
        let b = Group::random(&mut rng, 1);
        if a.shape != b.shape {
            break (a, b);
        }
    };
    let rel = Relation::ALL[(index % Relation::ALL.len() as u64) as usize];
    let bg = Background::random(&mut rng);
    let scene = Scene::layout_scaled(&mut rng, bg, vec![a, b], Some(rel), cfg.object_scale);
    AroItem {
        scene,
        true_caption: format!(
            "the {} is {} the {}",
            a.shape.name(),
            rel.phrase(),
            b.shape.name()
        ),
        false_caption: format!(
            "the {} is {} the {}",
            b.shape.name(),
            rel.phrase(),
            a.shape.name()
        ),
        label: AroLabel::Relation(rel.phrase().into()),
    }
}

fn tar_append(
    builder: &mut tar::Builder<AtomicFile>,
    name: &str,
    data: &[u8],
) -> std::io::Result<()> {
    let mut header = tar::Header::new_ustar();
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Regular);
    builder.append_data(&mut header, name, data)
}

/// The members of a tar file, in order (for checks and tests; holds the whole file in memory).
pub fn read_tar_members(path: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut archive = tar::Archive::new(std::io::BufReader::new(file));
    let mut out = Vec::new();
    for entry in archive.entries().map_err(|e| DataError::io(path, e))? {
        let mut entry = entry.map_err(|e| DataError::io(path, e))?;
        let name = entry
            .path()
            .map_err(|e| DataError::io(path, e))?
            .to_string_lossy()
            .into_owned();
        let mut data = Vec::new();
        entry
            .read_to_end(&mut data)
            .map_err(|e| DataError::io(path, e))?;
        out.push((name, data));
    }
    Ok(out)
}

fn lines_file(items: &[&str]) -> String {
    let mut s = items.join("\n");
    s.push('\n');
    s
}

/// Write one webdataset set; `make(i)` builds item `i`.
fn write_wds_set(
    cfg: &SynthConfig,
    dir: &Path,
    count: u64,
    progress: &indicatif::ProgressBar,
    make: &(dyn Fn(u64) -> Result<WdsItem> + Sync),
) -> Result<u64> {
    let test = dir.join("test");
    std::fs::create_dir_all(&test).map_err(|e| DataError::io(&test, e))?;
    let per = cfg.eval_shard_size.max(1);
    let nshards = count.div_ceil(per);
    for shard in 0..nshards {
        let (start, end) = (shard * per, ((shard + 1) * per).min(count));
        let items: Vec<WdsItem> = (start..end)
            .into_par_iter()
            .map(make)
            .collect::<Result<_>>()?;
        let path = test.join(format!("{shard}.tar"));
        let mut builder = tar::Builder::new(AtomicFile::create(&path)?);
        for (i, item) in (start..end).zip(&items) {
            let key = format!("s{i:07}");
            let io = |e| DataError::io(&path, e);
            tar_append(
                &mut builder,
                &format!("{key}.{}", item.image.ext),
                &item.image.bytes,
            )
            .map_err(io)?;
            match &item.label {
                Label::Class(c) => tar_append(
                    &mut builder,
                    &format!("{key}.cls"),
                    c.to_string().as_bytes(),
                )
                .map_err(io)?,
                Label::Captions(caps) => {
                    let text = caps
                        .iter()
                        .map(|c| c.replace('\n', " "))
                        .collect::<Vec<_>>()
                        .join("\n");
                    tar_append(&mut builder, &format!("{key}.txt"), text.as_bytes()).map_err(io)?
                }
            }
        }
        let mut file = builder.into_inner().map_err(|e| DataError::io(&path, e))?;
        file.flush().map_err(|e| DataError::io(&path, e))?;
        file.commit()?;
        progress.inc(end - start);
    }
    write_atomic(test.join("nshards.txt"), format!("{nshards}\n").as_bytes())?;
    Ok(nshards)
}

fn write_aro_set(
    cfg: &SynthConfig,
    dir: &Path,
    count: u64,
    annotations: &str,
    progress: &indicatif::ProgressBar,
    make: &(dyn Fn(u64) -> AroItem + Sync),
) -> Result<()> {
    let images = dir.join("images");
    std::fs::create_dir_all(&images).map_err(|e| DataError::io(&images, e))?;
    let side = cfg.image_size;
    let records: Vec<serde_json::Value> = (0..count)
        .into_par_iter()
        .map(|i| -> Result<serde_json::Value> {
            let item = make(i);
            let img = image_bytes(&item.scene, cfg)?;
            let name = format!("{i:06}.{}", img.ext);
            let path = images.join(&name);
            // Atomically: a synth killed mid-write must not leave a cut image under its name
            // (found by tools/faults' synth kill trials).
            write_atomic(&path, &img.bytes)?;
            let mut rec = serde_json::json!({
                "image_id": format!("{i:06}"),
                "image_path": name,
                "bbox": [0, 0, side, side],
                "bbox_x": 0, "bbox_y": 0, "bbox_w": side, "bbox_h": side,
                "true_caption": item.true_caption,
                "false_caption": item.false_caption,
            });
            match item.label {
                AroLabel::Relation(r) => rec["relation_name"] = r.into(),
                AroLabel::Attributes(a, b) => rec["attributes"] = serde_json::json!([a, b]),
            }
            progress.inc(1);
            Ok(rec)
        })
        .collect::<Result<_>>()?;
    let text = serde_json::to_string_pretty(&records)
        .map_err(|e| DataError::Invalid(format!("ARO annotations: {e}")))?;
    write_atomic(dir.join(annotations), format!("{text}\n").as_bytes())
}

/// Write every held-out set under `eval_dir` (`DIR/eval`); `cfg.eval_samples` samples each.
pub fn write_eval_sets(
    cfg: &SynthConfig,
    eval_dir: &Path,
    progress: bool,
) -> Result<Vec<EvalSetInfo>> {
    let n = cfg.eval_samples;
    let bar = crate::progress::bar(Some(n * 6), "samples");
    bar.set_message("eval");
    if !progress {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let rel = |p: &Path| -> String {
        let base = eval_dir.parent().unwrap_or(eval_dir);
        p.strip_prefix(base)
            .unwrap_or(p)
            .to_string_lossy()
            .into_owned()
    };
    let mut infos = Vec::new();

    let classification: [(&str, Stream, Vec<String>, &[&str]); 3] = [
        (
            "synth_shape",
            Stream::Shape,
            Shape::ALL.iter().map(|s| s.name().to_string()).collect(),
            &SHAPE_TEMPLATES,
        ),
        (
            "synth_color",
            Stream::Color,
            Color::ALL.iter().map(|c| c.name().to_string()).collect(),
            &COLOR_TEMPLATES,
        ),
        (
            "synth_count",
            Stream::Count,
            COUNT_CLASSES.iter().map(|c| c.to_string()).collect(),
            &COUNT_TEMPLATES,
        ),
    ];
    for (name, stream, classes, templates) in classification {
        let dir = eval_dir.join(format!("wds_{name}_test"));
        let class_refs: Vec<&str> = classes.iter().map(String::as_str).collect();
        write_atomic(
            dir.join("classnames.txt"),
            lines_file(&class_refs).as_bytes(),
        )?;
        write_atomic(
            dir.join("zeroshot_classification_templates.txt"),
            lines_file(templates).as_bytes(),
        )?;
        let nshards = write_wds_set(cfg, &dir, n, &bar, &|i| {
            let (scene, class) = classification_scene(cfg, stream, i);
            Ok(WdsItem {
                image: image_bytes(&scene, cfg)?,
                label: Label::Class(class),
            })
        })?;
        infos.push(EvalSetInfo {
            name: name.to_string(),
            kind: "classification".into(),
            path: rel(&dir),
            count: n,
            nshards,
            classes,
            annotations: None,
        });
    }

    let dir = eval_dir.join("wds_synth_retrieval_test");
    write_atomic(dir.join("dataset_type.txt"), b"retrieval\n")?;
    let nshards = write_wds_set(cfg, &dir, n, &bar, &|i| {
        let (scene, caps) = retrieval_item(cfg, i);
        Ok(WdsItem {
            image: image_bytes(&scene, cfg)?,
            label: Label::Captions(caps),
        })
    })?;
    infos.push(EvalSetInfo {
        name: "synth_retrieval".into(),
        kind: "retrieval".into(),
        path: rel(&dir),
        count: n,
        nshards,
        classes: Vec::new(),
        annotations: None,
    });

    type AroMaker = fn(&SynthConfig, u64) -> AroItem;
    let aro: [(&str, &str, &str, AroMaker); 2] = [
        (
            "synth_aro_attribute",
            "aro_attribute",
            "visual_genome_attribution.json",
            aro_attribute_item,
        ),
        (
            "synth_aro_relation",
            "aro_relation",
            "visual_genome_relation.json",
            aro_relation_item,
        ),
    ];
    for (name, kind, file, maker) in aro {
        let dir: PathBuf = eval_dir.join("aro").join(name);
        write_aro_set(cfg, &dir, n, file, &bar, &|i| maker(cfg, i))?;
        infos.push(EvalSetInfo {
            name: name.to_string(),
            kind: kind.to_string(),
            path: rel(&dir),
            count: n,
            nshards: 0,
            classes: Vec::new(),
            annotations: Some(file.to_string()),
        });
    }
    bar.finish_and_clear();
    Ok(infos)
}

/// Every scene the held-out sets of `cfg` contain, by set name (for overlap checks).
pub fn eval_scenes(cfg: &SynthConfig) -> Vec<(&'static str, Scene)> {
    let n = cfg.eval_samples;
    let mut out = Vec::new();
    for i in 0..n {
        out.push(("synth_shape", classification_scene(cfg, Stream::Shape, i).0));
        out.push(("synth_color", classification_scene(cfg, Stream::Color, i).0));
        out.push(("synth_count", classification_scene(cfg, Stream::Count, i).0));
        out.push(("synth_retrieval", retrieval_item(cfg, i).0));
        out.push(("synth_aro_attribute", aro_attribute_item(cfg, i).scene));
        out.push(("synth_aro_relation", aro_relation_item(cfg, i).scene));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::captions::check_text;

    #[test]
    fn aro_captions_are_true_and_false() {
        let cfg = SynthConfig::default();
        for i in 0..500 {
            for item in [aro_attribute_item(&cfg, i), aro_relation_item(&cfg, i)] {
                let (bad, n) = check_text(&item.scene, &item.true_caption);
                assert!(bad.is_empty() && n > 0, "{}: {bad:?}", item.true_caption);
                let (bad, _) = check_text(&item.scene, &item.false_caption);
                assert!(!bad.is_empty(), "{} not caught", item.false_caption);
            }
        }
    }

    /// Held-out scenes are laid out at the corpus's object scale, validly, and ARO's captions are
    /// still true and false there.
    #[test]
    fn held_out_sets_use_the_object_scale() {
        let cfg = SynthConfig {
            object_scale: 1.6,
            eval_samples: 100,
            ..SynthConfig::default()
        };
        for (set, scene) in eval_scenes(&cfg) {
            crate::synth::scene::assert_valid_layout(&scene, cfg.object_scale);
            if let [o] = scene.objects.as_slice() {
                assert!(o.r >= 0.95 * 0.12 * 1.6 - 1e-6, "{set}: {o:?}");
            }
        }
        for i in 0..100 {
            let (s, _) = classification_scene(&cfg, Stream::Shape, i);
            let (d, _) = classification_scene(&SynthConfig::default(), Stream::Shape, i);
            assert_eq!(s.groups, d.groups);
            assert!((s.objects[0].r / d.objects[0].r - 1.6).abs() < 1e-4);
            for item in [aro_attribute_item(&cfg, i), aro_relation_item(&cfg, i)] {
                let (bad, n) = check_text(&item.scene, &item.true_caption);
                assert!(bad.is_empty() && n > 0, "{}: {bad:?}", item.true_caption);
                assert!(!check_text(&item.scene, &item.false_caption).0.is_empty());
            }
        }
    }

    #[test]
    fn classification_labels_match_scenes() {
        let cfg = SynthConfig::default();
        for i in 0..300 {
            let (s, c) = classification_scene(&cfg, Stream::Shape, i);
            assert_eq!(s.objects.len(), 1);
            assert_eq!(s.objects[0].shape, Shape::ALL[c]);
            let (s, c) = classification_scene(&cfg, Stream::Color, i);
            assert_eq!(s.objects.len(), 1);
            assert_eq!(s.objects[0].color, Color::ALL[c]);
            let (s, c) = classification_scene(&cfg, Stream::Count, i);
            assert_eq!(s.objects.len(), c + 1);
        }
    }
}
