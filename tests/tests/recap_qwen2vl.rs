//! The Qwen2-VL engine against HF transformers, on a tiny random Qwen2-VL built offline and exported
//! with export/qwen2vl (the recaptioner's parity test).
//!
//! For images of several sizes (exact multiples of 28, ones that need resampling, one below the
//! minimum pixel budget, one above the maximum) and prompts with text before and after the image:
//! - preprocessing: grid sizes equal, pixel values equal to Qwen2-VL's (PIL-backend) processor;
//! - prompt: token ids equal to the processor's (chat template + placeholder expansion);
//! - greedy generation, one request at a time and in left-padded batches of mixed image sizes and
//!   prompt lengths (rows finish at different steps and leave the batch): tokens equal to HF
//!   `generate` token for token;
//! - the prompt step in small chunks gives the same tokens;
//! - negative control: the same prompts with the images swapped give other tokens (the image
//!   features reach the decoder), and seeded sampling is reproducible.
//!
//! Run time: about 40 s on 2 cores (most of it the Python export and reference).

mod recap_support;

use std::path::PathBuf;

use hq_runtime::qwen2vl::{
    EngineOptions, GenerationParams, Message, Part, PreparedImage, Qwen2Vl, Request, Sampling,
};
use recap_support::{
    ids, init_ort, run_python, test_image, tiny_model, workspace_root, TestResult,
};

const MAX_NEW: usize = 24;
/// How many times the float32 rounding noise of the reference's logits (measured against a
/// float64 copy of the model, `logit_noise`) HF's greedy token must lead the runner-up by, at
/// every step, for token-for-token equality to be a fair demand. The two sides are different
/// float32 implementations (ONNX Runtime's MLAS here, libtorch's MKL there, each choosing kernels
/// by CPU: AVX-512 or AVX2, Intel or AMD), each off the exact logits by about that noise; a lead
/// of 20 times it cannot flip. Below it the reference itself is ambiguous and the test says so,
/// instead of failing on one vendor only.
const GREEDY_MARGIN_IN_NOISE: f64 = 20.0;

struct Case {
    parts: Vec<(&'static str, String)>,
}

fn build_cases(dir: &std::path::Path) -> Result<Vec<Case>, Box<dyn std::error::Error>> {
    let sizes: [(u32, u32); 5] = [(84, 56), (61, 90), (40, 30), (700, 500), (150, 200)];
    let mut paths = Vec::new();
    for (i, (w, h)) in sizes.iter().enumerate() {
        let p = dir.join(format!("img{i}.png"));
        test_image(*w, *h, i as u64 + 1).save(&p)?;
        paths.push(p.display().to_string());
    }
    let texts = [
        "Describe the image.",
        "Alt-text: a photo of a dog. Describe the image in detail, trust the image.",
        "Tags:",
        "What is in this picture? Answer in English.",
        "Long description:",
    ];
    Ok(paths
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut parts = vec![("image", p.clone()), ("text", texts[i].to_string())];
            if i % 2 == 1 {
                parts.insert(0, ("text", "Here is an image. ".to_string()));
            }
            Case { parts }
        })
        .collect())
}

fn messages(case: &Case) -> Vec<Message> {
    let parts = case
        .parts
        .iter()
        .map(|(k, v)| {
            if *k == "image" {
                Part::Image
            } else {
                Part::Text(v.clone())
            }
        })
        .collect();
    vec![Message::new("user", parts)]
}

fn prepare(
    engine: &Qwen2Vl,
    case: &Case,
) -> Result<Vec<PreparedImage>, Box<dyn std::error::Error>> {
    let mut out = Vec::new();
    for (k, v) in &case.parts {
        if *k == "image" {
            let img = image::open(v)?;
            out.push(engine.processor().process(&img)?);
        }
    }
    Ok(out)
}

#[test]
fn greedy_generation_matches_hf_generate_token_for_token() -> TestResult {
    init_ort()?;
    let tiny = tiny_model()?;
    let work = tempfile::tempdir()?;
    let cases = build_cases(work.path())?;
    let batches: Vec<Vec<usize>> = vec![vec![0, 1, 2, 3, 4], vec![3, 1]];

    let spec = serde_json::json!({
        "model": tiny.hf,
        "max_new_tokens": MAX_NEW,
        "cases": cases.iter().map(|c| serde_json::json!({"parts": c.parts.iter().map(|(k, v)| [k.to_string(), v.clone()]).collect::<Vec<_>>()})).collect::<Vec<_>>(),
        "batches": batches,
    });
    let spec_path = work.path().join("spec.json");
    let out_path = work.path().join("reference.json");
    std::fs::write(&spec_path, serde_json::to_vec(&spec)?)?;
    let script = workspace_root().join("tests/python/qwen2vl_reference.py");
    run_python(&[
        script.as_os_str(),
        spec_path.as_os_str(),
        out_path.as_os_str(),
    ])?;
    let reference: serde_json::Value = serde_json::from_slice(&std::fs::read(&out_path)?)?;
    let margins: Vec<f64> = reference["cases"]
        .as_array()
        .ok_or("no cases")?
        .iter()
        .map(|c| &c["min_margin"])
        .chain(
            reference["batch_min_margins"]
                .as_array()
                .ok_or("no batch margins")?,
        )
        .map(|m| m.as_f64().ok_or("no margin"))
        .collect::<Result<_, _>>()?;
    let least = margins.iter().copied().fold(f64::INFINITY, f64::min);
    let noise = reference["logit_noise"].as_f64().ok_or("no logit_noise")?;
    eprintln!("least greedy lead in the reference: {least:.3e} logits (float32 noise {noise:.1e})");
    assert!(noise > 0.0 && noise < 1e-3, "logit noise {noise}");
    assert!(
        least > GREEDY_MARGIN_IN_NOISE * noise,
        "a greedy choice of HF's leads the runner-up by only {least:e}: within the float32 noise \
         of two implementations, the tiny model needs another seed (leads {margins:?})"
    );

    let opts = EngineOptions {
        intra_threads: Some(2),
        ..EngineOptions::default()
    };
    let mut engine = Qwen2Vl::load(&tiny.onnx, &opts)?;
    let params = GenerationParams {
        max_new_tokens: MAX_NEW,
        sampling: Sampling::Greedy,
    };

    let mut requests = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let r = &reference["cases"][i];
        let images = prepare(&engine, case)?;
        // Preprocessing: grids and pixel values.
        let grids: Vec<Vec<usize>> = images.iter().map(|im| im.grid_thw.to_vec()).collect();
        let ref_grids: Vec<Vec<usize>> = serde_json::from_value(r["grid_thw"].clone())?;
        assert_eq!(grids, ref_grids, "case {i}: grid_thw");
        let pv_path = PathBuf::from(r["pixel_values"].as_str().ok_or("no pixel_values")?);
        let bytes = std::fs::read(pv_path)?;
        let ref_pv: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let ours: Vec<f32> = images
            .iter()
            .flat_map(|im| im.pixel_values.iter().copied())
            .collect();
        assert_eq!(ours.len(), ref_pv.len(), "case {i}: pixel value count");
        let max_diff = ours
            .iter()
            .zip(&ref_pv)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            max_diff <= 1e-6,
            "case {i}: pixel values differ by up to {max_diff}"
        );
        // Prompt ids.
        let prompt = engine.prompt(&messages(case), images)?;
        assert_eq!(
            prompt.input_ids,
            ids(&r["input_ids"]),
            "case {i}: input_ids"
        );
        requests.push(Request {
            prompt,
            seed: i as u64,
        });
    }

    // One at a time.
    let mut singles = Vec::new();
    for (i, req) in requests.iter().enumerate() {
        let g = engine.generate(std::slice::from_ref(req), &params)?;
        let want = ids(&reference["cases"][i]["tokens"]);
        assert_eq!(g[0].tokens, want, "case {i}: greedy tokens (alone)");
        singles.push(g[0].tokens.clone());
    }
    assert!(
        singles.iter().any(|t| t.len() < MAX_NEW) || singles.iter().all(|t| t.len() == MAX_NEW),
        "lengths are consistent"
    );

    // Batched, mixed sizes and prompt lengths.
    for (bi, batch) in batches.iter().enumerate() {
        let reqs: Vec<Request> = batch.iter().map(|&i| requests[i].clone()).collect();
        let got = engine.generate(&reqs, &params)?;
        for (k, &i) in batch.iter().enumerate() {
            let want = ids(&reference["batches"][bi][k]);
            assert_eq!(
                got[k].tokens, want,
                "batch {bi}, case {i}: greedy tokens (batched)"
            );
            assert_eq!(
                got[k].tokens, singles[i],
                "batch {bi}, case {i}: batched equals alone"
            );
        }
    }

    // The prompt step in chunks: with 5-token chunks every prompt takes several decoder runs (the
    // last one ragged, image tokens split across chunks), and a batch still gives the HF tokens.
    engine.set_prefill_chunk(5)?;
    let reqs: Vec<Request> = batches[0].iter().map(|&i| requests[i].clone()).collect();
    let got = engine.generate(&reqs, &params)?;
    let chunk_runs: usize = reqs
        .iter()
        .map(|r| r.prompt.input_ids.len().div_ceil(5))
        .sum();
    // Every prompt starts with the chat template's system turn: the first row stores its whole
    // 5-token chunks before the image, the later rows start from them (prompt-prefix reuse).
    let reused = engine.last_stats().prefix_reused_tokens;
    assert!(
        reused >= 5 * (reqs.len() - 1),
        "prefix reuse: {reused} tokens"
    );
    assert_eq!(reused % 5, 0, "reuse is in whole chunks");
    assert_eq!(
        engine.last_stats().prefill_runs,
        chunk_runs - reused / 5,
        "one prefill run per 5-token chunk not reused"
    );
    for (k, &i) in batches[0].iter().enumerate() {
        assert_eq!(
            got[k].tokens, singles[i],
            "case {i}: prefill in 5-token chunks, shared prefix reused"
        );
    }
    // The same without reuse: the same tokens, nothing reused.
    let mut plain = Qwen2Vl::load(
        &tiny.onnx,
        &EngineOptions {
            prefix_cache_mib: Some(0),
            ..opts.clone()
        },
    )?;
    plain.set_prefill_chunk(5)?;
    let got_plain = plain.generate(&reqs, &params)?;
    assert_eq!(plain.last_stats().prefix_reused_tokens, 0);
    assert_eq!(plain.prefix_cache_bytes(), 0);
    assert_eq!(plain.last_stats().prefill_runs, chunk_runs);
    for (a, b) in got.iter().zip(&got_plain) {
        assert_eq!(a.tokens, b.tokens, "prefix reuse changes no token");
    }
    engine.set_prefill_chunk(hq_runtime::qwen2vl::engine::DEFAULT_PREFILL_CHUNK)?;
    assert!(engine.set_prefill_chunk(0).is_err());

    // Rows leaving the batch: with a custom end token that some rows produce early, a batch must
    // give each row its single output cut after that token (greedy decoding is prefix-stable), so
    // the cache and mask rows of finished sequences are dropped correctly.
    let longest = singles.iter().max_by_key(|t| t.len()).ok_or("no outputs")?;
    let stop = longest[3.min(longest.len() - 1)];
    let cut = |t: &Vec<u32>| -> Vec<u32> {
        match t.iter().position(|&x| x == stop) {
            Some(p) => t[..=p].to_vec(),
            None => t.clone(),
        }
    };
    let default_eos = engine.eos_token_ids().to_vec();
    let mut with_stop = default_eos.clone();
    with_stop.push(stop);
    engine.set_eos_token_ids(with_stop.clone())?;
    let reqs: Vec<Request> = batches[0].iter().map(|&i| requests[i].clone()).collect();
    let got = engine.generate(&reqs, &params)?;
    let lengths: Vec<usize> = got.iter().map(|g| g.tokens.len()).collect();
    for (k, &i) in batches[0].iter().enumerate() {
        assert_eq!(
            got[k].tokens,
            cut(&singles[i]),
            "case {i}: early stop in a batch"
        );
    }
    assert!(
        lengths.iter().min() < lengths.iter().max(),
        "rows should finish at different steps: {lengths:?}"
    );
    engine.set_eos_token_ids(default_eos)?;

    // The IoBinding path (the key/value cache bound to the provider's memory, used on GPUs) gives
    // the same tokens; on the CPU it runs the same binding calls.
    let mut bound = Qwen2Vl::load(
        &tiny.onnx,
        &EngineOptions {
            intra_threads: Some(2),
            device_cache: Some(true),
            ..EngineOptions::default()
        },
    )?;
    let reqs: Vec<Request> = batches[0].iter().map(|&i| requests[i].clone()).collect();
    let got = bound.generate(&reqs, &params)?;
    for (k, &i) in batches[0].iter().enumerate() {
        assert_eq!(got[k].tokens, singles[i], "case {i}: IoBinding path");
    }
    bound.set_eos_token_ids(with_stop)?;
    let got = bound.generate(&reqs, &params)?;
    for (k, &i) in batches[0].iter().enumerate() {
        assert_eq!(
            got[k].tokens,
            cut(&singles[i]),
            "case {i}: IoBinding path, early stop"
        );
    }
    drop(bound);

    // Negative control: the images matter. Swap the images of cases 0 and 1 (same grid, 3x2 vs 2x3
    // tokens would not fit, so use cases whose token counts agree, else skip the pair).
    let mut swapped = 0;
    for (a, b) in [(0usize, 1usize), (0, 2), (1, 2), (3, 4), (0, 4)] {
        let (ia, ib) = (&requests[a].prompt.images[0], &requests[b].prompt.images[0]);
        if ia.grid_thw != ib.grid_thw {
            continue;
        }
        let mut r = requests[a].clone();
        r.prompt.images = vec![ib.clone()];
        let g = engine.generate(&[r], &params)?;
        assert_ne!(
            g[0].tokens, singles[a],
            "cases {a}/{b}: swapping the image changed nothing"
        );
        swapped += 1;
    }
    // Always have one control: replace case 0's pixels with a constant image of the same size.
    let mut r = requests[0].clone();
    for v in &mut r.prompt.images[0].pixel_values {
        *v = 0.5;
    }
    let g = engine.generate(&[r], &params)?;
    assert_ne!(g[0].tokens, singles[0], "a flat image gave the same tokens");
    eprintln!("negative controls: {} swaps + flat image", swapped);

    // Seeded sampling: reproducible per seed, different across seeds.
    let sampled = GenerationParams {
        max_new_tokens: MAX_NEW,
        sampling: Sampling::TopP {
            temperature: 1.0,
            top_p: 0.9,
        },
    };
    let mut with_seed = |seed: u64| -> Result<Vec<u32>, Box<dyn std::error::Error>> {
        let mut r = requests[1].clone();
        r.seed = seed;
        Ok(engine.generate(&[r], &sampled)?.remove(0).tokens)
    };
    let a1 = with_seed(11)?;
    let a2 = with_seed(11)?;
    let b = with_seed(12)?;
    assert_eq!(a1, a2, "same seed, same sample");
    assert_ne!(
        a1, b,
        "different seeds gave the same {MAX_NEW}-token sample"
    );
    Ok(())
}

#[test]
fn model_dir_with_missing_files_is_a_clear_error() -> TestResult {
    init_ort()?;
    let tiny = tiny_model()?;
    let work = tempfile::tempdir()?;
    let copy = work.path().join("model");
    std::fs::create_dir_all(copy.join("onnx"))?;
    for f in [
        "config.json",
        "preprocessor_config.json",
        "generation_config.json",
        "tokenizer.json",
    ] {
        std::fs::copy(tiny.onnx.join(f), copy.join(f))?;
    }
    for f in ["onnx/vision_encoder.onnx", "onnx/embed_tokens.onnx"] {
        std::fs::copy(tiny.onnx.join(f), copy.join(f))?;
    }
    let err = Qwen2Vl::load(&copy, &EngineOptions::default()).expect_err("decoder missing");
    let msg = err.to_string();
    assert!(
        msg.contains("missing onnx/decoder_model_merged.onnx"),
        "{msg}"
    );

    // A config whose layer count disagrees with the decoder's inputs.
    std::fs::copy(
        tiny.onnx.join("onnx/decoder_model_merged.onnx"),
        copy.join("onnx/decoder_model_merged.onnx"),
    )?;
    let cfg_path = copy.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg_path)?)?;
    cfg["text_config"]["num_hidden_layers"] = serde_json::json!(3);
    std::fs::write(&cfg_path, serde_json::to_vec(&cfg)?)?;
    let msg = Qwen2Vl::load(&copy, &EngineOptions::default())
        .expect_err("layer mismatch")
        .to_string();
    assert!(msg.contains("past_key_values.2.key"), "{msg}");

    // Not a directory at all.
    let msg = Qwen2Vl::load(work.path().join("nope"), &EngineOptions::default())
        .expect_err("no dir")
        .to_string();
    assert!(msg.contains("does not exist"), "{msg}");
    Ok(())
}
