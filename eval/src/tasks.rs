//! The task registry: DataComp's 38 evaluation tasks (mlfoundations/datacomp `tasklist.yml`, the
//! 40 entries minus FairFace and UTKFace, which have no main metric and are dropped by
//! `aggregate_scores.py`) plus ARO's VG-Relation and VG-Attribution (reported, not averaged).
//!
//! Directory names follow DataComp's `download_evalsets.py`: `wds_{key with '/' -> '-'}_test`,
//! with the `fairness/` prefix dropped. DataComp reads Flickr, MSCOCO and WinoGAViL from Hugging
//! Face datasets instead; here they come from local folders (the CLIP_benchmark webdataset export
//! of the same test splits for retrieval, a JSONL export for WinoGAViL), named in
//! [`TaskSpec::dirs`] and explained by [`TaskSpec::source`].

use serde::{Deserialize, Serialize};

/// The WILDS tasks, each with DataComp's evaluator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WildsTask {
    /// Macro F1 (and macro recall) over the labels present; metadata `location, sequence, year,
    /// month, day, hour, minute, second, y`.
    IWildCam,
    /// Accuracy per hospital slide; metadata `hospital, slide, y`.
    Camelyon17,
    /// Accuracy per year and per region; metadata `region, year, y`.
    Fmow,
}

/// The fairness tasks DataComp averages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FairnessTask {
    /// Top-5 accuracy per income group; metadata `income_ds, income_meta, region`.
    DollarStreet,
    /// Accuracy per region; metadata `region, country`.
    Geode,
}

/// How a task is evaluated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type", content = "task")]
pub enum TaskKind {
    /// Zero-shot classification (multi-label when `dataset_type.txt` says `multilabel`).
    Classification,
    /// Image-text retrieval.
    Retrieval,
    /// WinoGAViL association (Jaccard score).
    WinoGavil,
    Wilds(WildsTask),
    Fairness(FairnessTask),
    /// ARO VG-Relation.
    AroRelation,
    /// ARO VG-Attribution.
    AroAttribution,
}

impl TaskKind {
    pub fn label(self) -> &'static str {
        match self {
            TaskKind::Classification => "classification",
            TaskKind::Retrieval => "retrieval",
            TaskKind::WinoGavil => "winogavil",
            TaskKind::Wilds(_) => "wilds",
            TaskKind::Fairness(_) => "fairness",
            TaskKind::AroRelation => "aro_relation",
            TaskKind::AroAttribution => "aro_attribution",
        }
    }
}

/// DataComp's aggregate groups (`aggregate_scores.py`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Group {
    /// ImageNet 1k alone.
    ImageNet,
    /// "ImageNet dist. shifts": Sketch, V2, A, O, R, ObjectNet.
    InShifts,
    /// The 13 VTAB tasks.
    Vtab,
    /// Flickr, MSCOCO, WinoGAViL.
    Retrieval,
}

impl Group {
    pub const ALL: [Group; 4] = [
        Group::ImageNet,
        Group::InShifts,
        Group::Vtab,
        Group::Retrieval,
    ];

    /// The name DataComp prints.
    pub fn name(self) -> &'static str {
        match self {
            Group::ImageNet => "ImageNet",
            Group::InShifts => "ImageNet dist. shifts",
            Group::Vtab => "VTAB",
            Group::Retrieval => "Retrieval",
        }
    }

    /// Short column name for tables.
    pub fn short(self) -> &'static str {
        match self {
            Group::ImageNet => "ImageNet",
            Group::InShifts => "IN-shifts",
            Group::Vtab => "VTAB",
            Group::Retrieval => "Retrieval",
        }
    }
}

/// One task of the registry.
#[derive(Debug, Clone, Serialize)]
pub struct TaskSpec {
    /// DataComp's task key (`vtab/caltech101`) or ours for ARO (`aro/vg_relation`).
    pub key: &'static str,
    /// DataComp's display name (the key of its aggregate tables).
    pub name: &'static str,
    /// Folder names tried under the data root, first found wins.
    pub dirs: &'static [&'static str],
    pub split: &'static str,
    pub kind: TaskKind,
    /// The metric DataComp averages (`acc1` unless `tasklist.yml` says otherwise).
    pub main_metric: &'static str,
    pub groups: &'static [Group],
    /// Whether it is one of the 38 averaged tasks.
    pub datacomp: bool,
    pub num_classes: Option<usize>,
    /// Test-set size in `tasklist.yml`.
    pub size: u64,
    /// Where to get the data.
    pub source: &'static str,
}

macro_rules! wds {
    ($key:expr, $name:expr, $dir:expr, $metric:expr, $groups:expr, $classes:expr, $size:expr) => {
        TaskSpec {
            key: $key,
            name: $name,
            dirs: &[$dir],
            split: "test",
            kind: TaskKind::Classification,
            main_metric: $metric,
            groups: $groups,
            datacomp: true,
            num_classes: Some($classes),
            size: $size,
            source: concat!(
                "DataComp webdataset: `python download_evalsets.py DATA_ROOT` in mlfoundations/datacomp, or git clone https://huggingface.co/datasets/djghosh/",
                $dir
            ),
        }
    };
}

const NONE: &[Group] = &[];
const VTAB: &[Group] = &[Group::Vtab];
const SHIFT: &[Group] = &[Group::InShifts];

/// Every task: DataComp's 38 in `tasklist.yml` order, then ARO.
pub static TASKS: &[TaskSpec] = &[
    wds!("vtab/caltech101", "Caltech-101", "wds_vtab-caltech101_test", "mean_per_class_recall", VTAB, 102, 6085),
    wds!("cifar10", "CIFAR-10", "wds_cifar10_test", "acc1", NONE, 10, 10000),
    wds!("vtab/cifar100", "CIFAR-100", "wds_vtab-cifar100_test", "acc1", VTAB, 100, 10000),
    wds!("vtab/clevr_count_all", "CLEVR Counts", "wds_vtab-clevr_count_all_test", "acc1", VTAB, 8, 15000),
    wds!("vtab/clevr_closest_object_distance", "CLEVR Distance", "wds_vtab-clevr_closest_object_distance_test", "acc1", VTAB, 6, 15000),
    wds!("country211", "Country211", "wds_country211_test", "acc1", NONE, 211, 21100),
    wds!("vtab/dtd", "Describable Textures", "wds_vtab-dtd_test", "acc1", VTAB, 47, 1880),
    wds!("vtab/eurosat", "EuroSAT", "wds_vtab-eurosat_test", "acc1", VTAB, 10, 5400),
    wds!("fgvc_aircraft", "FGVC Aircraft", "wds_fgvc_aircraft_test", "mean_per_class_recall", NONE, 100, 3333),
    wds!("food101", "Food-101", "wds_food101_test", "acc1", NONE, 101, 25250),
    wds!("gtsrb", "GTSRB", "wds_gtsrb_test", "acc1", NONE, 43, 12630),
    wds!("imagenet1k", "ImageNet 1k", "wds_imagenet1k_test", "acc1", &[Group::ImageNet], 1000, 50000),
    wds!("imagenet_sketch", "ImageNet Sketch", "wds_imagenet_sketch_test", "acc1", SHIFT, 1000, 50889),
    wds!("imagenetv2", "ImageNet v2", "wds_imagenetv2_test", "acc1", SHIFT, 1000, 10000),
    wds!("imagenet-a", "ImageNet-A", "wds_imagenet-a_test", "acc1", SHIFT, 200, 7500),
    wds!("imagenet-o", "ImageNet-O", "wds_imagenet-o_test", "acc1", SHIFT, 200, 2000),
    wds!("imagenet-r", "ImageNet-R", "wds_imagenet-r_test", "acc1", SHIFT, 200, 30000),
    wds!("vtab/kitti_closest_vehicle_distance", "KITTI Vehicle Distance", "wds_vtab-kitti_closest_vehicle_distance_test", "acc1", VTAB, 4, 711),
    wds!("mnist", "MNIST", "wds_mnist_test", "acc1", NONE, 10, 10000),
    wds!("objectnet", "ObjectNet", "wds_objectnet_test", "acc1", SHIFT, 113, 18574),
    wds!("vtab/flowers", "Oxford Flowers-102", "wds_vtab-flowers_test", "mean_per_class_recall", VTAB, 102, 6149),
    wds!("vtab/pets", "Oxford-IIIT Pet", "wds_vtab-pets_test", "mean_per_class_recall", VTAB, 37, 3669),
    wds!("voc2007", "Pascal VOC 2007", "wds_voc2007_test", "acc1", NONE, 20, 14976),
    wds!("vtab/pcam", "PatchCamelyon", "wds_vtab-pcam_test", "acc1", VTAB, 2, 32768),
    wds!("renderedsst2", "Rendered SST2", "wds_renderedsst2_test", "acc1", NONE, 2, 1821),
    wds!("vtab/resisc45", "RESISC45", "wds_vtab-resisc45_test", "acc1", VTAB, 45, 6300),
    wds!("cars", "Stanford Cars", "wds_cars_test", "acc1", NONE, 196, 8041),
    wds!("stl10", "STL-10", "wds_stl10_test", "acc1", NONE, 10, 8000),
    wds!("sun397", "SUN397", "wds_sun397_test", "acc1", VTAB, 397, 108754),
    wds!("vtab/svhn", "SVHN", "wds_vtab-svhn_test", "acc1", VTAB, 10, 26032),
    TaskSpec {
        key: "retrieval/flickr_1k_test_image_text_retrieval",
        name: "Flickr",
        dirs: &["wds_flickr_1k_test_image_text_retrieval_test", "wds_flickr30k"],
        split: "test",
        kind: TaskKind::Retrieval,
        main_metric: "mean_recall@1",
        groups: &[Group::Retrieval],
        datacomp: true,
        num_classes: None,
        size: 1000,
        source: "Flickr30k 1k test (Karpathy split) in CLIP_benchmark's webdataset layout: git clone https://huggingface.co/datasets/clip-benchmark/wds_flickr30k (DataComp reads the same split from the HF dataset nlphuji/flickr_1k_test_image_text_retrieval)",
    },
    TaskSpec {
        key: "retrieval/mscoco_2014_5k_test_image_text_retrieval",
        name: "MSCOCO",
        dirs: &["wds_mscoco_2014_5k_test_image_text_retrieval_test", "wds_mscoco_captions"],
        split: "test",
        kind: TaskKind::Retrieval,
        main_metric: "mean_recall@1",
        groups: &[Group::Retrieval],
        datacomp: true,
        num_classes: None,
        size: 5000,
        source: "MSCOCO 2014 5k test (Karpathy split) in CLIP_benchmark's webdataset layout: git clone https://huggingface.co/datasets/clip-benchmark/wds_mscoco_captions (DataComp reads the same split from the HF dataset nlphuji/mscoco_2014_5k_test_image_text_retrieval)",
    },
    TaskSpec {
        key: "misc/winogavil",
        name: "WinoGAViL",
        dirs: &["winogavil", "wds_winogavil_test"],
        split: "test",
        kind: TaskKind::WinoGavil,
        main_metric: "jaccard_score_10-12",
        groups: &[Group::Retrieval],
        datacomp: true,
        num_classes: None,
        size: 3563,
        source: "the HF dataset nlphuji/winogavil (test split) exported to DATA_ROOT/winogavil/test.jsonl (one JSON object a line: cue, candidates, associations, candidate_images = image paths relative to the folder); see eval/README.md for the export snippet",
    },
    TaskSpec {
        key: "wilds/iwildcam",
        name: "iWildCam",
        dirs: &["wds_wilds-iwildcam_test"],
        split: "test",
        kind: TaskKind::Wilds(WildsTask::IWildCam),
        main_metric: "F1-macro_all",
        groups: NONE,
        datacomp: true,
        num_classes: Some(182),
        size: 42791,
        source: "DataComp webdataset: git clone https://huggingface.co/datasets/djghosh/wds_wilds-iwildcam_test",
    },
    TaskSpec {
        key: "wilds/camelyon17",
        name: "Camelyon17",
        dirs: &["wds_wilds-camelyon17_test"],
        split: "test",
        kind: TaskKind::Wilds(WildsTask::Camelyon17),
        main_metric: "acc1",
        groups: NONE,
        datacomp: true,
        num_classes: Some(2),
        size: 85054,
        source: "DataComp webdataset: git clone https://huggingface.co/datasets/djghosh/wds_wilds-camelyon17_test",
    },
    TaskSpec {
        key: "wilds/fmow",
        name: "FMoW",
        dirs: &["wds_wilds-fmow_test"],
        split: "test",
        kind: TaskKind::Wilds(WildsTask::Fmow),
        main_metric: "acc_worst_region",
        groups: NONE,
        datacomp: true,
        num_classes: Some(62),
        size: 22108,
        source: "DataComp webdataset: git clone https://huggingface.co/datasets/djghosh/wds_wilds-fmow_test",
    },
    TaskSpec {
        key: "fairness/dollar_street",
        name: "Dollar Street",
        dirs: &["wds_dollar_street_test"],
        split: "test",
        kind: TaskKind::Fairness(FairnessTask::DollarStreet),
        main_metric: "acc_top5_wg",
        groups: NONE,
        datacomp: true,
        num_classes: Some(58),
        size: 3503,
        source: "DataComp webdataset: git clone https://huggingface.co/datasets/djghosh/wds_dollar_street_test",
    },
    TaskSpec {
        key: "fairness/geode",
        name: "GeoDE",
        dirs: &["wds_geode_test"],
        split: "test",
        kind: TaskKind::Fairness(FairnessTask::Geode),
        main_metric: "acc_wg",
        groups: NONE,
        datacomp: true,
        num_classes: Some(40),
        size: 12488,
        source: "DataComp webdataset: git clone https://huggingface.co/datasets/djghosh/wds_geode_test",
    },
    TaskSpec {
        key: "aro/vg_relation",
        name: "VG-Relation",
        dirs: &["aro/vg_relation", "aro"],
        split: "test",
        kind: TaskKind::AroRelation,
        main_metric: "macro_accuracy",
        groups: NONE,
        datacomp: false,
        num_classes: None,
        size: 23937,
        source: "ARO (mertyg/vision-language-models-are-bows): visual_genome_relation.json and the images/ folder of vgr_vga_images.zip, in DATA_ROOT/aro/",
    },
    TaskSpec {
        key: "aro/vg_attribution",
        name: "VG-Attribution",
        dirs: &["aro/vg_attribution", "aro"],
        split: "test",
        kind: TaskKind::AroAttribution,
        main_metric: "macro_accuracy",
        groups: NONE,
        datacomp: false,
        num_classes: None,
        size: 28748,
        source: "ARO (mertyg/vision-language-models-are-bows): visual_genome_attribution.json and the images/ folder of vgr_vga_images.zip, in DATA_ROOT/aro/",
    },
];

/// Number of tasks DataComp averages.
pub const DATACOMP_TASKS: usize = 38;

/// The 38 DataComp tasks.
pub fn datacomp_tasks() -> impl Iterator<Item = &'static TaskSpec> {
    TASKS.iter().filter(|t| t.datacomp)
}

/// Find a task by key (`vtab/caltech101`), display name (`Caltech-101`, case-insensitive) or
/// folder name (`wds_vtab-caltech101_test`).
pub fn find_task(name: &str) -> Option<&'static TaskSpec> {
    let lower = name.to_lowercase();
    TASKS
        .iter()
        .find(|t| t.key == name || t.name.to_lowercase() == lower || t.dirs.contains(&name))
}

/// Expand a task selection: `all` (the 38 + ARO), `datacomp` (the 38), `aro`, a group name
/// (`vtab`, `in-shifts`, `imagenet`, `retrieval`), or task names; comma-separated lists allowed.
pub fn select_tasks(selection: &[String]) -> Result<Vec<&'static TaskSpec>, String> {
    let mut out: Vec<&'static TaskSpec> = Vec::new();
    let mut add = |t: &'static TaskSpec| {
        if !out.iter().any(|o| o.key == t.key) {
            out.push(t);
        }
    };
    let items: Vec<String> = selection
        .iter()
        .flat_map(|s| s.split(',').map(|p| p.trim().to_string()))
        .filter(|s| !s.is_empty())
        .collect();
    if items.is_empty() {
        return Err("no task selected".into());
    }
    for item in items {
        let group = match item.to_lowercase().as_str() {
            "all" => {
                TASKS.iter().for_each(&mut add);
                continue;
            }
            "datacomp" | "datacomp38" => {
                datacomp_tasks().for_each(&mut add);
                continue;
            }
            "aro" => {
                TASKS
                    .iter()
                    .filter(|t| matches!(t.kind, TaskKind::AroRelation | TaskKind::AroAttribution))
                    .for_each(&mut add);
                continue;
            }
            "vtab" => Some(Group::Vtab),
            "in-shifts" | "inshifts" | "imagenet-shifts" => Some(Group::InShifts),
            "retrieval" => Some(Group::Retrieval),
            "imagenet" => Some(Group::ImageNet),
            _ => None,
        };
        match group {
            Some(g) => TASKS
                .iter()
                .filter(|t| t.groups.contains(&g))
                .for_each(&mut add),
            None => match find_task(&item) {
                Some(t) => add(t),
                None => {
                    return Err(format!(
                        "unknown task {item:?}; tasks are: {}",
                        TASKS.iter().map(|t| t.key).collect::<Vec<_>>().join(", ")
                    ))
                }
            },
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thirty_eight_tasks_and_groups() {
        assert_eq!(datacomp_tasks().count(), DATACOMP_TASKS);
        let count = |g| datacomp_tasks().filter(|t| t.groups.contains(&g)).count();
        assert_eq!(count(Group::ImageNet), 1);
        assert_eq!(count(Group::InShifts), 6);
        assert_eq!(count(Group::Vtab), 13);
        assert_eq!(count(Group::Retrieval), 3);
        let mut keys: Vec<_> = TASKS.iter().map(|t| t.key).collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), TASKS.len());
    }

    #[test]
    fn selection() {
        let v = select_tasks(&["vtab,imagenet1k".into()]).unwrap_or_default();
        assert_eq!(v.len(), 14);
        assert!(select_tasks(&["nope".into()]).is_err());
        assert_eq!(
            find_task("Caltech-101").map(|t| t.key),
            Some("vtab/caltech101")
        );
    }
}
