//! CLIP tokenizer throughput: ours (one thread, and rayon batch) against open_clip's Python
//! `SimpleTokenizer` and transformers' `CLIPTokenizerFast`, on the same generated corpus of 20,000
//! caption-like strings.
//!
//! `cargo bench -p hq-benches --bench tokenizer`
//!
//! Criterion measures our two modes; then the corpus is written to a JSONL file and
//! `benches/python/tokenizer_bench.py` (run with `$HQ_PYTHON`, else `<workspace>/.venv/bin/python`)
//! measures the Python tokenizers on it. The summary prints texts/s for each and the ratios. Set
//! `HQ_SKIP_PYTHON_BENCH=1` to skip the Python part.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use criterion::{criterion_group, Criterion, Throughput};
use hq_data::text::tokenizer::ClipTokenizer;

const CORPUS_SIZE: usize = 20_000;

/// A tiny deterministic generator (SplitMix64), so the corpus is the same on every run.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a>(&mut self, list: &[&'a str]) -> &'a str {
        list[self.below(list.len())]
    }
}

/// Caption-like strings, as alt-texts and recaptions look: mostly plain English, some accents,
/// emoji, HTML entities, curly quotes and a little mojibake.
fn corpus() -> Vec<String> {
    const SUBJECTS: &[&str] = &[
        "a dog",
        "two cats",
        "a young woman",
        "an old man",
        "children",
        "a red car",
        "a wooden table",
        "a bowl of soup",
        "the Eiffel Tower",
        "a mountain lake",
        "a city street",
        "a vintage bicycle",
        "a bouquet of flowers",
        "a laptop",
        "a cup of coffee",
        "a sandy beach",
    ];
    const VERBS: &[&str] = &[
        "sitting on",
        "standing next to",
        "running across",
        "lying under",
        "placed on",
        "photographed in front of",
        "walking along",
        "covered with",
        "surrounded by",
    ];
    const OBJECTS: &[&str] = &[
        "a green lawn",
        "the kitchen counter",
        "a snowy field",
        "a busy market",
        "the old bridge",
        "a white background",
        "colorful balloons",
        "tall pine trees",
        "a glass window",
        "the evening sky",
        "a stone wall",
        "a crowded subway platform",
    ];
    const EXTRAS: &[&str] = &[
        "",
        "",
        "",
        "",
        " at sunset",
        " in the rain",
        ", high resolution",
        ", 4K wallpaper",
        " – stock photo",
        " | Free Download",
        " (2019)",
        ", shot on iPhone",
        " #travel #nature",
        " near the café",
        " in São Paulo",
        " à la française",
        " 😀",
        " ❤️",
        " 👍🏽",
        " &amp; friends",
        " &quot;vintage&quot;",
        " it’s “perfect”",
        " Ã©tÃ© collection",
        " — Größe XL",
        " 東京",
        " ﬁne art",
        " ＳＡＬＥ",
    ];
    let mut rng = SplitMix(0x7ab1_e5ee_d000_0001);
    (0..CORPUS_SIZE)
        .map(|_| {
            let clauses = 1 + rng.below(3);
            let mut s = String::new();
            for c in 0..clauses {
                if c > 0 {
                    s.push_str(rng.pick(&[". ", ", and ", "; ", " while "]));
                }
                s.push_str(rng.pick(SUBJECTS));
                s.push(' ');
                s.push_str(rng.pick(VERBS));
                s.push(' ');
                s.push_str(rng.pick(OBJECTS));
                s.push_str(rng.pick(EXTRAS));
            }
            if rng.below(4) == 0 {
                let mut chars = s.chars();
                if let Some(f) = chars.next() {
                    s = f.to_uppercase().collect::<String>() + chars.as_str();
                }
            }
            s
        })
        .collect()
}

fn tokenizer() -> ClipTokenizer {
    match ClipTokenizer::from_bundled() {
        Ok(t) => t,
        Err(e) => panic!("cannot load the bundled tokenizer: {e}"),
    }
}

fn single_thread(tok: &ClipTokenizer, texts: &[String]) -> usize {
    let mut n = 0;
    for t in texts {
        match tok.tokenize(t) {
            Ok(row) => n += row[1] as usize,
            Err(e) => panic!("tokenize: {e}"),
        }
    }
    n
}

fn batch(tok: &ClipTokenizer, texts: &[String]) -> usize {
    match tok.tokenize_batch_flat(texts) {
        Ok(rows) => rows.len(),
        Err(e) => panic!("tokenize_batch: {e}"),
    }
}

fn bench_tokenizer(c: &mut Criterion) {
    let tok = tokenizer();
    let texts = corpus();
    let mut group = c.benchmark_group("clip_tokenizer");
    group.throughput(Throughput::Elements(texts.len() as u64));
    group.sample_size(10);
    group.bench_function("single_thread", |b| b.iter(|| single_thread(&tok, &texts)));
    group.bench_function("batch_rayon", |b| b.iter(|| batch(&tok, &texts)));
    group.finish();
}

criterion_group!(benches, bench_tokenizer);

/// Best-of-`repeats` texts/s of `f` over the corpus (after one warm-up run).
fn rate(texts: &[String], repeats: usize, f: impl Fn() -> usize) -> f64 {
    std::hint::black_box(f());
    let mut best = f64::INFINITY;
    for _ in 0..repeats {
        let t0 = Instant::now();
        std::hint::black_box(f());
        best = best.min(t0.elapsed().as_secs_f64());
    }
    texts.len() as f64 / best
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn python_rates(texts: &[String]) -> Option<serde_json::Value> {
    let dir = tempfile::tempdir().ok()?;
    let path = dir.path().join("tokenizer_corpus.jsonl");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).ok()?);
    for t in texts {
        writeln!(f, "{}", serde_json::to_string(t).ok()?).ok()?;
    }
    f.flush().ok()?;
    drop(f);
    let python = std::env::var_os("HQ_PYTHON")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".venv/bin/python"));
    let script = workspace_root().join("benches/python/tokenizer_bench.py");
    let out = Command::new(&python).arg(&script).arg(&path).output();
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            eprintln!("cannot run {}: {e}", python.display());
            return None;
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        eprintln!(
            "{} failed ({}):\n{stdout}\n{}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    for line in stdout.lines() {
        println!("  [python] {line}");
    }
    stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
}

fn summary() {
    let tok = tokenizer();
    let texts = corpus();
    let threads = rayon::current_num_threads();
    let ours_single = rate(&texts, 5, || single_thread(&tok, &texts));
    let ours_batch = rate(&texts, 5, || batch(&tok, &texts));
    println!(
        "\nCLIP tokenizer throughput on {} caption-like texts",
        texts.len()
    );
    println!("  ours, single thread:        {ours_single:>12.0} texts/s");
    println!("  ours, batch ({threads} rayon threads): {ours_batch:>12.0} texts/s");
    if std::env::var_os("HQ_SKIP_PYTHON_BENCH").is_some() {
        return;
    }
    let Some(py) = python_rates(&texts) else {
        println!("  (python reference not measured)");
        return;
    };
    let get = |k: &str| py.get(k).and_then(|v| v.as_f64()).unwrap_or(f64::NAN);
    let (oc, hf) = (get("open_clip"), get("hf_fast"));
    println!("  open_clip SimpleTokenizer:  {oc:>12.0} texts/s");
    println!("  HF CLIPTokenizerFast batch: {hf:>12.0} texts/s (no ftfy; ids equal to open_clip's on {:.1}% of texts)", 100.0 * get("hf_agree"));
    println!(
        "  ratio ours single / open_clip: {:>8.1}x",
        ours_single / oc
    );
    println!("  ratio ours batch  / open_clip: {:>8.1}x", ours_batch / oc);
    println!(
        "  ratio ours single / HF fast:   {:>8.2}x",
        ours_single / hf
    );
    println!("  ratio ours batch  / HF fast:   {:>8.2}x", ours_batch / hf);
}

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    summary();
}
