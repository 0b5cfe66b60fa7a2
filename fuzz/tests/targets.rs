//! The harness: one bolero test per target. Under `cargo test` each replays its corpus
//! (`tests/__fuzz__/<target>/corpus`) and crash regressions (`.../crashes`), then runs a bounded
//! number of random inputs (`HQ_FUZZ_ITERATIONS` overrides the count); under
//! `cargo bolero test <target> --engine libfuzzer --sanitizer NONE` it runs coverage-guided.

use hq_fuzz::alloc::CountingAlloc;
#[cfg(feature = "runtime")]
use hq_fuzz::targets::runtime;
#[cfg(feature = "train")]
use hq_fuzz::targets::train;
use hq_fuzz::targets::{data, eval};

// The memory caps the targets check need every allocation counted.
#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// Random inputs per target under `cargo test`: small, so the whole crate stays well under the
/// CI budget; a local campaign raises it (or runs the coverage-guided engine).
fn iterations(default: usize) -> usize {
    std::env::var("HQ_FUZZ_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A byte-input target: corpus replay, crash regressions, then random inputs.
macro_rules! bytes_target {
    ($(#[$m:meta])* $name:ident, $f:path, $n:expr) => {
        $(#[$m])*
        #[test]
        fn $name() {
            assert!(hq_fuzz::alloc::counting(), "the counting allocator is installed");
            bolero::check!()
                .with_iterations(iterations($n))
                .for_each(|input: &[u8]| $f(input));
        }
    };
}

bytes_target!(tar_shard, data::tar_shard, 2000);
bytes_target!(recaption_answer, data::recaption_answer, 10000);
bytes_target!(tag_vocab, data::tag_vocab, 1000);
bytes_target!(tokenizer_text, data::tokenizer_text, 3000);
bytes_target!(hf_tokenizer_dir, data::hf_tokenizer_dir, 300);
bytes_target!(text_clean, data::text_clean, 3000);
bytes_target!(image_decode, data::image_decode, 2000);
bytes_target!(eval_wds_dir, eval::eval_wds_dir, 1000);
bytes_target!(npy, eval::npy, 10000);
bytes_target!(aro_json, eval::aro_json, 300);
bytes_target!(winogavil_jsonl, eval::winogavil_jsonl, 300);
bytes_target!(eval_results, eval::eval_results, 1000);

#[test]
fn shard_round_trip() {
    bolero::check!()
        .with_type::<Vec<data::GenSample>>()
        .with_iterations(iterations(300))
        .for_each(|samples| data::shard_round_trip(samples));
}

// Flat names (no modules): a test's name is its corpus folder, `tests/__fuzz__/<name>`.
bytes_target!(
    #[cfg(feature = "train")]
    train_config_toml,
    train::train_config_toml,
    5000
);
bytes_target!(
    #[cfg(feature = "train")]
    open_clip_config,
    train::open_clip_config,
    2000
);
bytes_target!(
    #[cfg(feature = "train")]
    weights_file,
    train::weights_file,
    1000
);
bytes_target!(
    #[cfg(feature = "train")]
    checkpoint_dir,
    train::checkpoint_dir,
    1000
);
bytes_target!(
    #[cfg(feature = "train")]
    loader_state,
    train::loader_state,
    5000
);

#[cfg(feature = "train")]
#[test]
fn checkpoint_round_trip() {
    bolero::check!()
        .with_type::<(Vec<Vec<u8>>, usize)>()
        .with_iterations(iterations(100))
        .for_each(|(contents, flip)| train::checkpoint_round_trip(contents, *flip));
}

bytes_target!(
    #[cfg(feature = "runtime")]
    qwen2vl_model_dir,
    runtime::qwen2vl_model_dir,
    1000
);
bytes_target!(
    #[cfg(feature = "runtime")]
    teacher_jsonl,
    runtime::teacher_jsonl,
    1000
);
bytes_target!(
    #[cfg(feature = "runtime")]
    exemplars_prompt,
    runtime::exemplars_prompt,
    1000
);
bytes_target!(
    #[cfg(feature = "runtime")]
    recap_input,
    runtime::recap_input,
    1000
);

/// Not a target: writes the seed corpora (`fuzz/seeds/make.sh` runs it with
/// `HQ_FUZZ_SEEDS=WORK:OUT`). It lives in the harness because under cargo-bolero every test binary
/// must hold a target.
#[cfg(all(feature = "train", feature = "runtime"))]
#[test]
#[ignore = "writes the seed corpora; run by fuzz/seeds/make.sh"]
fn write_seeds() {
    let spec = std::env::var("HQ_FUZZ_SEEDS").unwrap_or_default();
    let Some((work, out)) = spec.split_once(':') else {
        panic!("set HQ_FUZZ_SEEDS=WORK:OUT");
    };
    hq_fuzz::seeds::write_seeds(std::path::Path::new(work), std::path::Path::new(out));
}
