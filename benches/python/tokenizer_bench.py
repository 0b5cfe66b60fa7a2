"""Texts/s of the Python CLIP tokenizers on a corpus written by benches/benches/tokenizer.rs.

Usage: tokenizer_bench.py CORPUS.jsonl [--repeats 3]

CORPUS has one JSON string per line. Prints one JSON object on the last line of stdout:
  {"texts": N, "open_clip": texts/s, "hf_fast": texts/s, "hf_fast_threads": n, "hf_agree": fraction}

- open_clip: `open_clip.get_tokenizer("ViT-B-32")(texts)` (SimpleTokenizer: ftfy + html + BPE,
  pure Python, one thread), the reference our Rust tokenizer reproduces.
- hf_fast: transformers' `CLIPTokenizerFast` (the Rust `tokenizers` backend), built offline from a
  vocab.json / merges.txt derived from the same `bpe_simple_vocab_16e6.txt.gz`, called on the whole
  batch (padding to 77, truncation), with the tokenizers thread pool enabled. It does not run ftfy
  or html.unescape (its normaliser is NFC + whitespace + lower-case), so it does less work and is
  not id-identical on messy text; `hf_agree` reports the fraction of rows equal to open_clip's.

Each measurement runs once to warm caches, then takes the best of --repeats timed runs.
"""

import argparse
import gzip
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def best_rate(fn, n_texts, repeats):
    fn()  # warm-up (BPE caches)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n_texts / best


def build_hf_tokenizer(bpe_path, workdir):
    """vocab.json + merges.txt with open_clip's vocabulary, HF's special-token names."""
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizerFast

    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(workdir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({tok: i for i, tok in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(workdir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    return CLIPTokenizerFast.from_pretrained(workdir)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("corpus")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    with open(args.corpus, "rb") as f:
        texts = [json.loads(line) for line in f.read().split(b"\n") if line.strip()]
    n = len(texts)

    import open_clip
    from open_clip.tokenizer import default_bpe

    oc = open_clip.get_tokenizer("ViT-B-32")
    oc_rate = best_rate(lambda: oc(texts), n, args.repeats)
    print(f"open_clip SimpleTokenizer: {oc_rate:,.0f} texts/s ({n} texts)", flush=True)

    # open_clip's import turns the tokenizers thread pool off; turn it back on for HF's batch call.
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    with tempfile.TemporaryDirectory() as d:
        hf = build_hf_tokenizer(default_bpe(), d)
        call = lambda: hf(texts, padding="max_length", max_length=77, truncation=True)["input_ids"]  # noqa: E731
        hf_rate = best_rate(call, n, args.repeats)
    import tokenizers

    threads = os.cpu_count()
    print(f"HF CLIPTokenizerFast (batch, tokenizers {tokenizers.__version__}): {hf_rate:,.0f} texts/s", flush=True)

    # Compare up to the end token: HF pads with <|endoftext|> (49407), open_clip with 0.
    def unpadded(row):
        return row[: row.index(49407) + 1] if 49407 in row else row

    ref = oc(texts).tolist()
    hf_ids = call()
    agree = sum(1 for a, b in zip(ref, hf_ids) if unpadded(a) == unpadded(b)) / max(n, 1)

    print(json.dumps({"texts": n, "open_clip": oc_rate, "hf_fast": hf_rate, "hf_fast_threads": threads, "hf_agree": agree}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
