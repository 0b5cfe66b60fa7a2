#!/usr/bin/env python3
"""HF transformers reference for the Qwen2-VL engine parity test (tests/tests/recap_qwen2vl.rs).

Reads a JSON spec:
    {"model": HF_CHECKPOINT_DIR, "max_new_tokens": N,
     "cases": [{"parts": [["image", "a.png"], ["text", "..."]]}, ...],
     "batches": [[0, 1, 2], ...]}
and writes a JSON result with, per case: the processor's input_ids, image_grid_thw, the pixel
values (written to `<out>.case<i>.f32`, raw little-endian float32) and the greedy `generate`
tokens for the case alone; per batch: the tokens of a left-padded batched `generate` run. Each
entry also has `min_margin`: the smallest lead of the chosen token's logit over the runner-up at
any step up to EOS; and `logit_noise`: the largest difference between the float32 model's logits
and a float64 copy's over the generated positions of every case (its own rounding noise). Greedy
decoding by two float32 implementations (ONNX Runtime's MLAS, libtorch's MKL, each with
CPU-dependent code paths) can only be required to agree token for token where that lead is well
above their rounding noise; the test checks it is.

Preprocessing is Qwen2-VL's processor with the PIL image backend (see export_qwen2vl.load_processor).
`mm_token_type_ids` from the processor is passed to `generate`, without which transformers 5.23
silently uses 1-D positions.

Usage: qwen2vl_reference.py SPEC.json OUT.json
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "export" / "qwen2vl"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from export_qwen2vl import load_processor  # noqa: E402


def messages_of(case):
    content = []
    images = []
    for kind, value in case["parts"]:
        if kind == "image":
            content.append({"type": "image"})
            images.append(Image.open(value).convert("RGB"))
        else:
            content.append({"type": "text", "text": value})
    return [{"role": "user", "content": content}], images


def generated(seq, eos):
    out = []
    for t in seq:
        out.append(int(t))
        if int(t) in eos:
            break
    return out


def greedy(model, inputs, n, eos):
    """Greedy `generate` of every row: (tokens up to EOS, smallest top-1 over top-2 logit lead at
    the steps those tokens came from)."""
    out = model.generate(**inputs, max_new_tokens=n, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    width = inputs["input_ids"].shape[1]
    rows, margin = [], float("inf")
    for r, row in enumerate(out.sequences):
        tokens = generated(row[width:].tolist(), eos)
        for step in range(len(tokens)):
            top = out.logits[step][r].float().topk(2).values
            margin = min(margin, float(top[0] - top[1]))
        rows.append(tokens)
    return rows, margin


def logit_noise(model, model64, inputs, tokens):
    """Largest |float32 - float64| logit of `model` at the positions that chose `tokens`, in one
    teacher-forced forward over prompt + tokens (text tokens add zeros to mm_token_type_ids)."""
    prompt = inputs["input_ids"].shape[1]
    ids = torch.cat([inputs["input_ids"], torch.tensor([tokens])], dim=1)
    full = dict(inputs, input_ids=ids, attention_mask=torch.ones_like(ids))
    if "mm_token_type_ids" in inputs:
        extra = torch.zeros(1, len(tokens), dtype=inputs["mm_token_type_ids"].dtype)
        full["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], extra], dim=1)
    rows = slice(prompt - 1, ids.shape[1] - 1)
    l32 = model(**full).logits[0, rows].double()
    full64 = {k: v.double() if v.is_floating_point() else v for k, v in full.items()}
    l64 = model64(**full64).logits[0, rows]
    return float((l32 - l64).abs().max())


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out_path = Path(sys.argv[2])
    from transformers import Qwen2VLForConditionalGeneration

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    model = Qwen2VLForConditionalGeneration.from_pretrained(spec["model"], dtype=torch.float32).eval()
    model64 = copy.deepcopy(model).double()
    processor = load_processor(spec["model"])
    processor.tokenizer.padding_side = "left"
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    n = spec["max_new_tokens"]
    result = {"cases": [], "batches": [], "logit_noise": 0.0}
    prepared = []
    for i, case in enumerate(spec["cases"]):
        msgs, images = messages_of(case)
        text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        prepared.append((text, images))
        inputs = processor(text=[text], images=images or None, return_tensors="pt")
        entry = {"text": text, "input_ids": inputs["input_ids"][0].tolist()}
        if images:
            entry["grid_thw"] = inputs["image_grid_thw"].tolist()
            pv = inputs["pixel_values"].numpy().astype("<f4")
            pv_path = f"{out_path}.case{i}.f32"
            pv.tofile(pv_path)
            entry["pixel_values"] = pv_path
            entry["pixel_values_shape"] = list(pv.shape)
        with torch.no_grad():
            rows, entry["min_margin"] = greedy(model, inputs, n, eos)
            noise = logit_noise(model, model64, inputs, rows[0])
        result["logit_noise"] = max(result["logit_noise"], noise)
        entry["tokens"] = rows[0]
        result["cases"].append(entry)
    for batch in spec.get("batches", []):
        texts = [prepared[i][0] for i in batch]
        images = [im for i in batch for im in prepared[i][1]]
        inputs = processor(text=texts, images=images or None, return_tensors="pt", padding=True)
        with torch.no_grad():
            rows, margin = greedy(model, inputs, n, eos)
        result["batches"].append(rows)
        result.setdefault("batch_min_margins", []).append(margin)
    out_path.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
