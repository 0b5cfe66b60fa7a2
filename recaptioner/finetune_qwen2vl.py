#!/usr/bin/env python3
"""Fine-tune a small, fresh Qwen2-VL recaptioner on teacher conversations, on the CPU.

Input: a LLaVA conversation file (a JSON array, as `hq-recap-trt teacher` writes it; LLaMA-Factory
and ms-swift load the same layout): `{"id", "image", "conversations": [{"from": "human", "value":
USER}, {"from": "gpt", "value": ANSWER}]}`, `image` relative to the JSON file's folder (or absolute),
USER with exactly one `<image>` marker, ANSWER the four labelled lines (Long description, Negative
description, Tags, Negative tags).

What it does:
- trains a byte-level BPE tokenizer (Qwen2's split, Qwen2-VL's special tokens above the learnt ids,
  as `export/qwen2vl/make_tiny_qwen2vl.py`) on the training items' answers and alt-texts and the
  prompt text;
- builds a fresh Qwen2-VL (`--preset small|test`) with the real vision geometry (patch 14, temporal
  patch 2, spatial merge 2) and resizes every image to `--image-size` px through HF's Qwen2-VL image
  processor (min_pixels = max_pixels = size^2, written to preprocessor_config.json, which the Rust
  runtime reads too);
- renders each conversation with Qwen2-VL-Instruct's chat template (default system prompt), the
  image at the `<image>` marker expanded to its `<|image_pad|>` count, and trains on the answer tokens
  and the closing `<|im_end|>` only (AdamW, cosine schedule with warm-up, clipping 1.0, seeded; the
  vision tower at `--vision-lr-mult` times the learning rate);
- keeps the last `--heldout` items out of training and reports their teacher loss at the start,
  every `--eval-every` steps and at the end; at the end greedily generates for a few of them
  (`--gen-check`) and checks the four-field format;
- writes CKPT_DIR: the HF checkpoint (config.json, model.safetensors, generation_config.json),
  tokenizer.json, tokenizer_config.json, chat_template.jinja, preprocessor_config.json,
  hq_prompt.json (the prompt file), finetune.json (settings, losses, timings, checks) and loss.png.
  finetune.json is written last; a directory whose finetune.json is complete with the same settings
  is left as it is ("already done").

Export: `$HQ_PYTHON export/qwen2vl/export_qwen2vl.py --model CKPT_DIR --out ONNX_DIR`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "export" / "qwen2vl"))
from make_tiny_qwen2vl import (  # noqa: E402
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    build_tokenizer,
    preprocessor_config,
    tokenizer_config_for,
)

FORMAT_VERSION = 1
LABELS = ["Long description", "Negative description", "Tags", "Negative tags"]
SYSTEM_PROMPT = "You are a helpful assistant."

# Model presets. head_dim = hidden / heads; mrope_section sums to head_dim / 2.
PRESETS = {
    # What a probe on the 2-core CPU measured to work: ~4.2M parameters.
    "small": dict(
        vocab=1024, hidden=256, layers=4, heads=4, kv_heads=2, intermediate=688,
        mrope_section=[8, 12, 12], vision_embed=128, vision_depth=2, vision_heads=4, vision_mlp_ratio=4,
        steps=1500, eval_every=100, gen_check=64, gen_max_new=512,
        # 224 px = 16 x 16 patches = 64 image tokens. Object recall on 1,000 unseen images
        # (2026-12-07, seed 0 unless noted): 84 px (9 tokens) 0.20, 168 px (36) 0.27 and 0.35
        # (seed 1), 224 px 0.36; a wider, deeper vision tower at 84 px (256 x 4) 0.17. The
        # 64 px images gain no pixels: finer patches are what the small vision tower needs to see
        # shapes and colours of small objects. See README.md "Measured".
        image_size=224,
        # The vision tower learns at 0.3 x --lr: object recall 0.26 at x4, 0.36 at x1, 0.40 at
        # x0.3, 0.38 at x0.1 (224 px, seed 0, same 1,000 images). A tower trained from scratch
        # only through the language model's loss overshoots at the text model's rate.
        vision_lr_mult=0.3,
    ),
    # Fine-tunes in seconds (CI): the tiny test model's shape.
    "test": dict(
        vocab=400, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128,
        mrope_section=[2, 3, 3], vision_embed=32, vision_depth=1, vision_heads=4, vision_mlp_ratio=2,
        steps=20, eval_every=10, gen_check=2, gen_max_new=48, image_size=84, vision_lr_mult=1.0,
    ),
}


# ---------------------------------------------------------------------------------------------
# small helpers


def atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def parse_answer(text: str) -> dict:
    """The four labelled fields of an answer (a label's first occurrence wins; None when missing)."""
    fields = {k: None for k in LABELS}
    counts = {k: 0 for k in LABELS}
    for line in text.splitlines():
        head, sep, rest = line.partition(":")
        label = head.strip().strip("*#-").strip()
        for k in LABELS:
            if sep and label.lower() == k.lower():
                counts[k] += 1
                if fields[k] is None:
                    fields[k] = rest.strip()
    fields["_counts"] = counts
    return fields


def split_tags(s: str | None) -> list[str]:
    return [t.strip().lower() for t in (s or "").split(",") if t.strip()]


# ---------------------------------------------------------------------------------------------
# data


def load_conversations(path: Path) -> list[dict]:
    items = json.loads(path.read_text())
    if not isinstance(items, list) or not items:
        raise SystemExit(f"{path}: expected a non-empty JSON array of LLaVA conversations")
    out = []
    for i, it in enumerate(items):
        conv = it.get("conversations") or []
        human = [c["value"] for c in conv if c.get("from") == "human"]
        gpt = [c["value"] for c in conv if c.get("from") == "gpt"]
        if len(human) != 1 or len(gpt) != 1 or "image" not in it:
            raise SystemExit(f"{path}: item {i} is not a one-turn image conversation (human, gpt, image)")
        user = human[0]
        if user.count("<image>") != 1:
            raise SystemExit(f"{path}: item {i}: the user turn must hold exactly one <image> marker")
        image = Path(it["image"])
        if not image.is_absolute():
            image = path.parent / image
        out.append({"id": str(it.get("id", i)), "image": image, "user": user, "answer": gpt[0].strip()})
    return out


def render_prompt(before: str, after: str) -> str:
    """Qwen2-VL-Instruct's chat template over [text before, image, text after] + generation prompt."""
    import jinja2

    content = []
    if before:
        content.append({"type": "text", "text": before})
    content.append({"type": "image"})
    if after:
        content.append({"type": "text", "text": after})
    tmpl = jinja2.Environment().from_string(CHAT_TEMPLATE)
    return tmpl.render(messages=[{"role": "user", "content": content}], add_generation_prompt=True,
                       add_vision_id=False)


def prompt_alt_text(user: str, prompt_template: str) -> str:
    """The alt-text inside a rendered user turn (for the tokenizer corpus), when the template shows."""
    if "{alt_text}" not in prompt_template:
        return ""
    pre, post = prompt_template.split("{alt_text}", 1)
    if user.startswith(pre) and user.endswith(post) and len(user) >= len(pre) + len(post):
        return user[len(pre):len(user) - len(post)]
    return ""


class Encoded:
    """Token ids, labels and pixel values of every item, computed once."""

    def __init__(self, items, tok, image_processor, merge: int, image_token_id: int, im_end_id: int):
        from PIL import Image

        self.rows = []
        pixels = []  # (pixel_values, grid) per item; the processor runs over chunks of images
        chunk = 256
        for s in range(0, len(items), chunk):
            imgs = []
            for it in items[s:s + chunk]:
                with Image.open(it["image"]) as im:
                    imgs.append(im.convert("RGB"))
            px = image_processor(images=imgs, return_tensors="pt")
            off = 0
            for grid in px["image_grid_thw"]:
                n = int(grid.prod())
                pixels.append((px["pixel_values"][off:off + n].clone(), grid.clone()))
                off += n
        for it, (pixel_values, grid) in zip(items, pixels):
            n_img = int(grid.prod()) // (merge * merge)
            before, after = it["user"].split("<image>")
            prompt = render_prompt(before, after).replace("<|image_pad|>", "<|image_pad|>" * n_img)
            p_ids = tok.encode(prompt).ids
            a_ids = tok.encode(it["answer"]).ids + [im_end_id]
            assert p_ids.count(image_token_id) == n_img, "image pad count mismatch"
            self.rows.append({"prompt": p_ids, "answer": a_ids, "pixel_values": pixel_values,
                              "grid": grid, "item": it})

    def batch(self, idx: list[int], pad_id: int, image_token_id: int):
        import torch

        rows = [self.rows[i] for i in idx]
        T = max(len(r["prompt"]) + len(r["answer"]) for r in rows)
        ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), T), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for b, r in enumerate(rows):
            seq = r["prompt"] + r["answer"]
            ids[b, :len(seq)] = torch.tensor(seq)
            labels[b, len(r["prompt"]):len(seq)] = torch.tensor(r["answer"])
            mask[b, :len(seq)] = 1
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "mm_token_type_ids": (ids == image_token_id).long(),
            "pixel_values": torch.cat([r["pixel_values"] for r in rows], 0),
            "image_grid_thw": torch.stack([r["grid"] for r in rows], 0),
        }, labels


# ---------------------------------------------------------------------------------------------
# model


def build_model(preset: dict, ids: dict, vocab: int, seed: int):
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    p = preset
    text_config = dict(
        vocab_size=vocab, hidden_size=p["hidden"], intermediate_size=p["intermediate"],
        num_hidden_layers=p["layers"], num_attention_heads=p["heads"], num_key_value_heads=p["kv_heads"],
        max_position_embeddings=4096, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": p["mrope_section"]},
        tie_word_embeddings=False, initializer_range=0.02, bos_token_id=None,
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    head_dim = p["hidden"] // p["heads"]
    assert sum(p["mrope_section"]) * 2 == head_dim, "mrope_section must sum to head_dim / 2"
    vision_config = dict(
        depth=p["vision_depth"], embed_dim=p["vision_embed"], hidden_size=p["hidden"],
        num_heads=p["vision_heads"], mlp_ratio=p["vision_mlp_ratio"], in_channels=3, patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2, initializer_range=0.02,
    )
    config = Qwen2VLConfig(
        text_config=text_config, vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False, initializer_range=0.02,
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    gc = model.generation_config
    gc.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    gc.pad_token_id = ids["<|endoftext|>"]
    gc.bos_token_id = None
    gc.do_sample = False
    return model


def answer_loss(model, batch, labels):
    """Mean cross-entropy over the answer tokens (sum, count)."""
    import torch.nn.functional as F

    logits = model(**batch).logits[:, :-1]
    tgt = labels[:, 1:]
    loss_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1),
                               ignore_index=-100, reduction="sum")
    return loss_sum, int((tgt != -100).sum())


def evaluate(model, enc, idx, bs, pad_id, image_token_id) -> float:
    import torch

    model.eval()
    tot, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(idx), bs):
            batch, labels = enc.batch(idx[s:s + bs], pad_id, image_token_id)
            ls, c = answer_loss(model, batch, labels)
            tot += float(ls)
            n += c
    model.train()
    return tot / max(n, 1)


def generate_check(model, tok, enc, idx, pad_id, image_token_id, max_new: int) -> dict:
    """Greedy generations for held-out items (batched, left padding) and the four-field checks."""
    import torch

    model.eval()
    rows = [enc.rows[i] for i in idx]
    T = max(len(r["prompt"]) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r["prompt"]):] = torch.tensor(r["prompt"])
        mask[b, T - len(r["prompt"]):] = 1
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, mm_token_type_ids=(ids == image_token_id).long(),
            pixel_values=torch.cat([r["pixel_values"] for r in rows], 0),
            image_grid_thw=torch.stack([r["grid"] for r in rows], 0),
            max_new_tokens=max_new, do_sample=False)
    model.train()
    samples = []
    stats = {"n": len(rows), "four_fields": 0, "negative_differs": 0, "negative_equals_positive": 0,
             "long_exact": 0, "tag_precision": 0.0, "tag_recall": 0.0, "ended": 0}
    eos = set(model.generation_config.eos_token_id)
    for b, r in enumerate(rows):
        gen = out[b, T:].tolist()
        ended = any(t in eos for t in gen)
        cut = next((i for i, t in enumerate(gen) if t in eos), len(gen))
        text = tok.decode(gen[:cut], skip_special_tokens=False)
        f = parse_answer(text)
        ref = parse_answer(r["item"]["answer"])
        four = all(f[k] for k in LABELS) and all(c == 1 for c in f["_counts"].values())
        stats["ended"] += int(ended)
        stats["four_fields"] += int(four)
        if f[LABELS[0]] and f[LABELS[1]]:
            same = f[LABELS[0]] == f[LABELS[1]]
            stats["negative_equals_positive"] += int(same)
            stats["negative_differs"] += int(not same)
        stats["long_exact"] += int(f[LABELS[0]] == ref[LABELS[0]])
        gt, pt = set(split_tags(ref["Tags"])), set(split_tags(f["Tags"]))
        stats["tag_precision"] += len(gt & pt) / max(len(pt), 1)
        stats["tag_recall"] += len(gt & pt) / max(len(gt), 1)
        samples.append({"id": r["item"]["id"], "four_fields": four, "generated": text,
                        "teacher": r["item"]["answer"]})
    for k in ("tag_precision", "tag_recall"):
        stats[k] = round(stats[k] / max(len(rows), 1), 4)
    return {"stats": stats, "samples": samples}


# ---------------------------------------------------------------------------------------------
# outputs


def plot_losses(path: Path, train_hist, eval_hist, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train_hist:
        steps = [s for s, _ in train_hist]
        vals = [v for _, v in train_hist]
        ax.plot(steps, vals, lw=0.6, alpha=0.35, color="C0", label="train (per step)")
        ema, sm = None, []
        for v in vals:
            ema = v if ema is None else 0.9 * ema + 0.1 * v
            sm.append(ema)
        ax.plot(steps, sm, lw=1.5, color="C0", label="train (EMA 0.9)")
    if eval_hist:
        ax.plot([s for s, _ in eval_hist], [v for _, v in eval_hist], "o-", color="C3", label="held-out teacher loss")
    ax.set_xlabel("step")
    ax.set_ylabel("answer-token cross-entropy")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=".loss.", suffix=".png", dir=path.parent)
    os.close(fd)
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def save_checkpoint(model, out: Path) -> None:
    """save_pretrained into a staging folder, then each file renamed into place."""
    stage = Path(tempfile.mkdtemp(prefix=".stage-", dir=out))
    try:
        model.save_pretrained(stage)
        for f in stage.iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


# ---------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, type=Path, help="LLaVA conversation JSON (hq-recap-trt teacher)")
    ap.add_argument("--prompt", required=True, type=Path, help="prompt template file (hq-prompt-1), copied as hq_prompt.json")
    ap.add_argument("--out", required=True, type=Path, help="checkpoint directory to write")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, help="optimizer steps (default: the preset's)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--warmup", type=int, help="warm-up steps (default: 5%% of the steps, at least 1)")
    ap.add_argument("--heldout", type=int, default=64, help="the last N items: held-out teacher loss, never trained on")
    ap.add_argument("--max-train", type=int, help="use only the first N training items")
    ap.add_argument("--eval-every", type=int, help="held-out loss every K steps (default: the preset's)")
    ap.add_argument("--gen-check", type=int, help="greedy generations of held-out items checked at the end (default: the preset's; 0 = none)")
    ap.add_argument("--image-size", type=int, help="images resized to SIZE x SIZE px (multiple of 28; default: the preset's)")
    ap.add_argument("--time-budget-min", type=float, help="stop training cleanly (and save) after M minutes")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--vision-embed", type=int, help="vision tower width (default: the preset's)")
    ap.add_argument("--vision-depth", type=int, help="vision tower blocks (default: the preset's)")
    ap.add_argument("--vision-lr-mult", type=float, help="the vision tower's learning rate as a multiple of --lr (default: the preset's)")
    args = ap.parse_args()

    t_start = time.time()
    import torch

    preset = dict(PRESETS[args.preset])
    if args.vision_embed is not None:
        preset["vision_embed"] = args.vision_embed
    if args.vision_depth is not None:
        preset["vision_depth"] = args.vision_depth
    if args.vision_lr_mult is not None:
        preset["vision_lr_mult"] = args.vision_lr_mult
    steps = args.steps if args.steps is not None else preset["steps"]
    eval_every = args.eval_every or preset["eval_every"]
    gen_check = preset["gen_check"] if args.gen_check is None else args.gen_check
    if args.image_size is None:
        args.image_size = preset["image_size"]
    warmup = args.warmup if args.warmup is not None else max(1, round(0.05 * steps))
    if args.image_size % 28:
        raise SystemExit("--image-size must be a multiple of 28 (patch 14 x merge 2)")
    prompt_obj = json.loads(args.prompt.read_text())
    if prompt_obj.get("format") != "hq-prompt-1" or prompt_obj.get("user", "").count("<image>") != 1:
        raise SystemExit(f"{args.prompt}: expected {{\"format\": \"hq-prompt-1\", \"user\": ...}} with one <image>")

    settings = {
        "format_version": FORMAT_VERSION,
        "data": str(args.data.resolve()),
        "data_sha256": sha256_file(args.data),
        "prompt": prompt_obj,
        "preset": args.preset,
        "preset_values": {k: v for k, v in preset.items() if k not in ("steps", "eval_every", "gen_check", "gen_max_new", "image_size")},
        "seed": args.seed, "steps": steps, "batch_size": args.batch_size, "lr": args.lr,
        "weight_decay": args.weight_decay, "warmup": warmup, "schedule": "linear warm-up x cosine to 0 over max(step / steps, training time / training budget)",
        "heldout": args.heldout, "max_train": args.max_train, "eval_every": eval_every,
        "gen_check": gen_check, "image_size": args.image_size, "time_budget_min": args.time_budget_min,
        "threads": args.threads, "grad_clip": 1.0, "initializer_range": 0.02,
        "loss": "answer tokens + closing <|im_end|>",
    }
    out = args.out
    done_file = out / "finetune.json"
    if done_file.is_file():
        try:
            prev = json.loads(done_file.read_text())
        except json.JSONDecodeError:
            prev = {}
        if prev.get("complete") and prev.get("settings") == settings:
            print(f"already done: {out} holds a complete fine-tune with these settings")
            return 0
    out.mkdir(parents=True, exist_ok=True)
    if done_file.exists():
        done_file.unlink()  # a different or incomplete run: redo it

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    # --- data and tokenizer
    items = load_conversations(args.data)
    if args.heldout >= len(items):
        raise SystemExit(f"--heldout {args.heldout} leaves no training items of {len(items)}")
    train_items = items[:len(items) - args.heldout]
    held_items = items[len(items) - args.heldout:]
    if args.max_train:
        train_items = train_items[:args.max_train]
    t0 = time.time()
    corpus = [it["answer"] for it in train_items]
    corpus += [prompt_alt_text(it["user"], prompt_obj["user"]) for it in train_items]
    corpus += [prompt_obj["user"].replace("{alt_text}", "").replace("<image>", "")] * 50
    corpus += [SYSTEM_PROMPT] * 50
    tok = build_tokenizer(vocab_size=preset["vocab"], corpus=[c for c in corpus if c])
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    vocab = tok.get_vocab_size()
    tok.save(str(out / ".tokenizer.json.tmp"))
    os.replace(out / ".tokenizer.json.tmp", out / "tokenizer.json")
    atomic_write_json(out / "tokenizer_config.json", tokenizer_config_for(ids))
    atomic_write_text(out / "chat_template.jinja", CHAT_TEMPLATE)
    px = args.image_size * args.image_size
    atomic_write_json(out / "preprocessor_config.json", preprocessor_config(min_pixels=px, max_pixels=px))
    atomic_write_json(out / "hq_prompt.json", prompt_obj)
    t_tok = time.time() - t0

    from transformers import AutoImageProcessor

    image_processor = AutoImageProcessor.from_pretrained(out, backend="pil")
    t0 = time.time()
    enc = Encoded(train_items + held_items, tok, image_processor, 2, ids["<|image_pad|>"], ids["<|im_end|>"])
    t_enc = time.time() - t0
    n_train = len(train_items)
    train_idx = list(range(n_train))
    held_idx = list(range(n_train, n_train + len(held_items)))
    pad_id, img_id = ids["<|endoftext|>"], ids["<|image_pad|>"]
    seq_lens = [len(r["prompt"]) + len(r["answer"]) for r in enc.rows]
    prompt_lens = [len(r["prompt"]) for r in enc.rows]
    answer_lens = [len(r["answer"]) for r in enc.rows]
    grid0 = enc.rows[0]["grid"].tolist()

    # --- model and optimizer
    model = build_model(preset, ids, vocab, args.seed)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    groups = []
    for vision in (False, True):
        named = [(n, p) for n, p in model.named_parameters() if (".visual." in f".{n}") == vision]
        lr = args.lr * (preset["vision_lr_mult"] if vision else 1.0)
        for decayed in (True, False):
            params = [p for n, p in named if (p.ndim >= 2 and "embed" not in n) == decayed]
            groups.append({"params": params, "lr": lr, "weight_decay": args.weight_decay if decayed else 0.0})
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))

    base_lrs = [g["lr"] for g in opt.param_groups]

    def set_lr(step: int, progress: float) -> float:
        """Linear warm-up over the first `warmup` steps times a cosine from 1 to 0 over `progress`."""
        f = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * f
        return args.lr * f

    order_rng = random.Random(args.seed)
    order: list[int] = []

    print(f"finetune: {n_train} train / {len(held_items)} held-out items, tokenizer {vocab}, "
          f"{n_params / 1e6:.2f}M params, prompt {min(prompt_lens)}-{max(prompt_lens)} tokens, "
          f"answer {min(answer_lens)}-{max(answer_lens)} (mean {sum(answer_lens) / len(answer_lens):.0f}), "
          f"image grid {grid0}, {steps} steps x batch {args.batch_size}, threads {args.threads}, "
          f"load {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)

    train_hist, eval_hist, lr_hist = [], [], []
    eval_hist.append((0, evaluate(model, enc, held_idx, args.batch_size, pad_id, img_id)))
    print(f"finetune: held-out loss at start {eval_hist[-1][1]:.4f}", file=sys.stderr, flush=True)

    from tqdm import tqdm

    # The time budget: the cosine schedule runs over progress = max(steps done / --steps, training
    # time / training budget), so it always ends at a zero learning rate, within the budget, however
    # fast the machine is at the moment (other processes share these 2 cores). The training budget
    # is 90% of --time-budget-min less what was spent before training; the rest is for the final
    # evaluation, saving and the generation check. Without a budget the run is step-based and
    # deterministic.
    budget_s = args.time_budget_min * 60 if args.time_budget_min else None
    stopped = None
    t_train0 = time.time()
    train_budget = None if budget_s is None else max(1.0, 0.9 * budget_s - (t_train0 - t_start))
    step = 0
    progress = 0.0
    bar = tqdm(total=steps, desc="fine-tune", unit="step", dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 10.0)
    ema = None
    while progress < 1.0:
        batch_idx = []
        while len(batch_idx) < args.batch_size:
            if not order:
                order = train_idx[:]
                order_rng.shuffle(order)
            batch_idx.append(order.pop())
        batch, labels = enc.batch(batch_idx, pad_id, img_id)
        loss_sum, count = answer_loss(model, batch, labels)
        loss = loss_sum / max(count, 1)
        lr_now = set_lr(step, progress)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        progress = step / steps
        if train_budget is not None:
            t_progress = (time.time() - t_train0) / train_budget
            if t_progress > progress:
                progress = t_progress
                if progress >= 1.0:
                    stopped = f"time budget of {args.time_budget_min} min: training ended after {step} of {steps} steps"
        lv = float(loss.detach())
        train_hist.append((step, lv))
        lr_hist.append((step, lr_now))
        ema = lv if ema is None else 0.95 * ema + 0.05 * lv
        post = {"loss": f"{ema:.3f}", "lr": f"{lr_now:.2e}"}
        if step % eval_every == 0 and progress < 1.0:
            eval_hist.append((step, evaluate(model, enc, held_idx, args.batch_size, pad_id, img_id)))
        if eval_hist:
            post["heldout"] = f"{eval_hist[-1][1]:.3f}"
        bar.set_postfix(post, refresh=False)
        bar.update(1)
    bar.close()
    train_s = time.time() - t_train0
    if eval_hist[-1][0] != step:
        eval_hist.append((step, evaluate(model, enc, held_idx, args.batch_size, pad_id, img_id)))
    print(f"finetune: {step} steps in {train_s:.0f} s ({train_s / max(step, 1):.2f} s/step); held-out loss "
          f"{eval_hist[0][1]:.4f} -> {eval_hist[-1][1]:.4f}" + (f"; stopped: {stopped}" if stopped else ""),
          file=sys.stderr, flush=True)

    model.eval()
    save_checkpoint(model, out)

    gen = None
    t_gen = 0.0
    if gen_check > 0:
        t0 = time.time()
        max_new = min(preset["gen_max_new"], max(len(r["answer"]) for r in enc.rows) + 32)
        gen = generate_check(model, tok, enc, held_idx[:gen_check], pad_id, img_id, max_new)
        t_gen = time.time() - t0
        print(f"finetune: generation check on {gen_check} held-out items: {json.dumps(gen['stats'])}",
              file=sys.stderr, flush=True)

    import tokenizers
    import transformers

    plot_losses(out / "loss.png", train_hist, eval_hist,
                f"Qwen2-VL {args.preset} ({n_params / 1e6:.1f}M), {step} steps x {args.batch_size}")
    record = {
        "complete": True,
        "settings": settings,
        "steps_done": step,
        "steps_planned": steps,
        "training_budget_seconds": None if train_budget is None else round(train_budget, 1),
        "stopped_early": stopped,
        "train_items": n_train,
        "heldout_items": len(held_items),
        "parameters": n_params,
        "vocab_size": vocab,
        "special_token_ids": ids,
        "image_grid_thw": grid0,
        "image_tokens": int(torch.tensor(grid0).prod()) // 4,
        "prompt_tokens": {"min": min(prompt_lens), "max": max(prompt_lens)},
        "answer_tokens": {"min": min(answer_lens), "max": max(answer_lens),
                          "mean": round(sum(answer_lens) / len(answer_lens), 1)},
        "sequence_tokens_max": max(seq_lens),
        "train_loss": [[s, round(v, 5)] for s, v in train_hist],
        "heldout_loss": [[s, round(v, 5)] for s, v in eval_hist],
        "lr": [[s, float(f"{v:.4g}")] for s, v in lr_hist],
        "seconds": {"tokenizer": round(t_tok, 2), "encode": round(t_enc, 2), "train": round(train_s, 2),
                    "per_step": round(train_s / max(step, 1), 4), "generation_check": round(t_gen, 2),
                    "total": round(time.time() - t_start, 2)},
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "generation_check": gen,
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                     "transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
    }
    atomic_write_json(done_file, record)
    print(json.dumps({"out": str(out), "steps_done": step, "heldout_loss": [eval_hist[0][1], eval_hist[-1][1]],
                      "seconds": record["seconds"]["total"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
