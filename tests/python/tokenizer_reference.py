"""Reference ids for the Rust CLIP tokenizer parity test (tests/tests/tokenizer_parity.rs).

Usage: tokenizer_reference.py INPUT.jsonl OUTPUT.jsonl [--context-length 77]

INPUT has one JSON string per line. OUTPUT gets one JSON object per input line, in order:
  {"ids": [...context_length ints...], "clean": "<what BPE sees>"}
or, if open_clip raised on that string, {"error": "<exception>"}.

The ids come from `open_clip.get_tokenizer("ViT-B-32")` (a SimpleTokenizer with the default
`clean="lower"`), and are cross-checked against the module-level `open_clip.tokenize`.
"""

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import open_clip  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--context-length", type=int, default=77)
    args = ap.parse_args()

    with open(args.input, "rb") as f:
        texts = [json.loads(line) for line in f.read().split(b"\n") if line.strip()]

    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=args.context_length)
    assert isinstance(tokenizer, open_clip.tokenizer.SimpleTokenizer), type(tokenizer)

    rows = []
    chunk = 512
    for start in range(0, len(texts), chunk):
        batch = texts[start : start + chunk]
        try:
            ids = tokenizer(batch).tolist()
            module_ids = open_clip.tokenize(batch, context_length=args.context_length).tolist()
            assert ids == module_ids, "get_tokenizer and open_clip.tokenize disagree"
            rows.extend({"ids": r} for r in ids)
        except Exception:  # one string breaks the batch: redo it one by one
            for text in batch:
                try:
                    rows.append({"ids": tokenizer([text]).tolist()[0]})
                except Exception as e:  # noqa: BLE001
                    rows.append({"error": f"{type(e).__name__}: {e}"})

    for row, text in zip(rows, texts):
        if "ids" in row:
            row["clean"] = tokenizer.clean_fn(text)

    with open(args.output, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
