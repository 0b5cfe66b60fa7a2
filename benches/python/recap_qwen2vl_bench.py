#!/usr/bin/env python3
"""HF transformers side of benches/benches/recap_qwen2vl.rs: batched greedy `generate` of
Qwen2VLForConditionalGeneration on the same checkpoint, images, prompts, batch size and thread
count as the Rust engine, preprocessing (the PIL-backend processor) included in the timing.

Reads a JSON spec {"model", "batch", "max_new_tokens", "threads", "repeats",
"cases": [{"parts": [["text", ...], ["image", PATH], ...]}]} and prints one JSON line:
{"seconds": median wall time of one pass over all cases, "images", "generated_tokens",
"tokens": [[...] per case]}.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "export" / "qwen2vl"))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from export_qwen2vl import load_processor  # noqa: E402


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(int(spec["threads"]))
    from transformers import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(spec["model"], dtype=torch.float32).eval()
    processor = load_processor(spec["model"])
    processor.tokenizer.padding_side = "left"
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    cases = spec["cases"]
    batch = int(spec["batch"])

    def one_pass():
        tokens = []
        for start in range(0, len(cases), batch):
            chunk = cases[start:start + batch]
            texts, images = [], []
            for case in chunk:
                content = []
                for kind, value in case["parts"]:
                    if kind == "image":
                        content.append({"type": "image"})
                        images.append(Image.open(value).convert("RGB"))
                    else:
                        content.append({"type": "text", "text": value})
                texts.append(processor.apply_chat_template([{"role": "user", "content": content}],
                                                           add_generation_prompt=True, tokenize=False))
            inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
            with torch.no_grad():
                seq = model.generate(**inputs, max_new_tokens=int(spec["max_new_tokens"]), do_sample=False)
            width = inputs["input_ids"].shape[1]
            for row in seq[:, width:].tolist():
                out = []
                for t in row:
                    out.append(t)
                    if t in eos:
                        break
                tokens.append(out)
        return tokens

    one_pass()  # warm-up
    times = []
    tokens = None
    for _ in range(int(spec["repeats"])):
        t0 = time.perf_counter()
        tokens = one_pass()
        times.append(time.perf_counter() - t0)
    print(json.dumps({
        "seconds": statistics.median(times),
        "images": len(cases),
        "generated_tokens": sum(len(t) for t in tokens),
        "tokens": tokens,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
