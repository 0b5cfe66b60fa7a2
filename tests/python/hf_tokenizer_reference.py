"""A small BERT-style WordPiece tokenizer folder and open_clip's HFTokenizer ids on it, for the
Rust `HfTokenizer` parity test (tests/tests/tokenizer_parity.rs) and the CLIPA-family model tests.

Usage:
  hf_tokenizer_reference.py make FOLDER [--vocab-size 600]
      Trains an uncased WordPiece tokenizer (BERT's normaliser, pre-tokeniser and [CLS]/[SEP]
      post-processor) on generated captions and saves it with transformers' save_pretrained:
      tokenizer.json, tokenizer_config.json, special_tokens_map.json.
  hf_tokenizer_reference.py reference FOLDER INPUT.jsonl OUTPUT.jsonl
      [--context-length 32] [--strip-sep-token] [--clean whitespace|lower]
      One JSON string per INPUT line -> {"ids": [...]} or {"error": "..."} per OUTPUT line, from
      open_clip.tokenizer.HFTokenizer(FOLDER, ...) exactly as open_clip's get_tokenizer builds it
      for a `local-dir:` model whose text_cfg names an HF tokenizer.
"""

import argparse
import json
import os
import random
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def make(folder: str, vocab_size: int) -> None:
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    rng = random.Random(7)
    words = (
        "a an the red green blue yellow purple orange black white small large tiny huge circle "
        "square triangle star ring cross heart two three four on left right of above below next "
        "to photo picture image drawing scene background with and in near café naïve über 東京 "
        "cat dog bird car tree house mountain river sky cloud sunset beach city street "
        ", . ! ? - ' ( ) : ; 0 1 2 3 4 5 6 7 8 9 10 42 2024 & / \" é ß ñ 猫 😀"
    ).split()
    corpus = [
        " ".join(rng.choice(words) for _ in range(rng.randint(3, 14))) for _ in range(4000)
    ]
    tok = BertWordPieceTokenizer(lowercase=True, strip_accents=None, clean_text=True)
    tok.train_from_iterator(corpus, vocab_size=vocab_size, min_frequency=1)
    fast = BertTokenizerFast(tokenizer_object=tok._tokenizer, do_lower_case=True)
    fast.add_special_tokens(
        {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
         "mask_token": "[MASK]"}
    )
    os.makedirs(folder, exist_ok=True)
    fast.save_pretrained(folder)
    print(f"tokenizer: {len(fast)} ids in {folder}", file=sys.stderr)


def reference(args) -> None:
    from open_clip.tokenizer import HFTokenizer

    tokenizer = HFTokenizer(
        args.folder,
        context_length=args.context_length,
        clean=args.clean,
        strip_sep_token=args.strip_sep_token,
    )
    with open(args.input, "rb") as f:
        texts = [json.loads(line) for line in f.read().split(b"\n") if line.strip()]
    rows = []
    chunk = 512
    for start in range(0, len(texts), chunk):
        batch = texts[start : start + chunk]
        try:
            rows.extend({"ids": r} for r in tokenizer(batch).tolist())
        except Exception:  # one string breaks the batch: redo it one by one
            for text in batch:
                try:
                    rows.append({"ids": tokenizer([text]).tolist()[0]})
                except Exception as e:  # noqa: BLE001
                    rows.append({"error": f"{type(e).__name__}: {e}"})
    with open(args.output, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("folder")
    m.add_argument("--vocab-size", type=int, default=600)
    r = sub.add_parser("reference")
    r.add_argument("folder")
    r.add_argument("input")
    r.add_argument("output")
    r.add_argument("--context-length", type=int, default=32)
    r.add_argument("--strip-sep-token", action="store_true")
    r.add_argument("--clean", default="whitespace", choices=["whitespace", "lower"])
    args = ap.parse_args()
    if args.cmd == "make":
        make(args.folder, args.vocab_size)
    else:
        reference(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
