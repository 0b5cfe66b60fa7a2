#!/usr/bin/env python3
"""Build a tiny, random Qwen2-VL checkpoint offline (the test model of the recaptioner).

The result is an ordinary Hugging Face checkpoint directory (config.json, model.safetensors,
generation_config.json, preprocessor_config.json, tokenizer.json, tokenizer_config.json,
chat_template.jinja) that `Qwen2VLForConditionalGeneration.from_pretrained` and
`AutoProcessor`-style loading accept, so it goes through `export_qwen2vl.py` exactly like a real
checkpoint.

Why each choice:
- The tokenizer is a byte-level BPE trained here with the `tokenizers` package on a small built-in
  corpus (English prompt-like text), with Qwen2's pre-tokenizer split and Qwen2-VL's special tokens
  (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, `<|vision_start|>`, `<|vision_end|>`,
  `<|image_pad|>`, `<|video_pad|>`) appended after the learnt vocabulary, as in the real model
  (where they sit above the BPE ids). Nothing is downloaded.
- Weights are drawn with a large init (std 0.2, `initializer_range`): with the default 0.02 the tiny
  model's logits are so flat that wrong position ids or missing image features can still give the
  same greedy tokens, and a parity test would pass by accident.
- Head dim 16, so M-RoPE's `mrope_section` is [2, 3, 3] (sums to head_dim / 2) instead of the real
  [16, 24, 24]; the vision tower keeps the real patch 14, temporal patch 2 and merge 2, so the
  1176-value patches and the <|image_pad|> count are the real ones.

Usage: make_tiny_qwen2vl.py --out DIR [--seed 0] [--export ONNX_DIR [--no-verify]]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2-VL-Instruct's chat template (tokenizer_config.json of Qwen/Qwen2-VL-7B-Instruct).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2's pre-tokenizer split (tokenizer.json of Qwen2 / Qwen2-VL).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CORPUS = [
    "You are a helpful assistant.",
    "Describe the image in detail. Use the alt-text as a reference, but when the text and the image "
    "conflict, trust the image. Answer in English.",
    "Long description: The image shows a red circle above a blue square on a striped background.",
    "Negative description: The image shows a green circle below a yellow square.",
    "Tags: red circle, blue square, striped background, two objects",
    "Negative tags: green circle, yellow square, dotted background, three objects",
    "A photo of a dog playing in the park with a ball. The sky is clear and the grass is green.",
    "Here is an example. Alt-text: cheap shoes for sale. Answer:",
    "the quick brown fox jumps over the lazy dog 0123456789 , . ; : ! ? ( ) - '",
]


def build_tokenizer(vocab_size: int, corpus=None):
    """Byte-level BPE with Qwen2's split, trained on `corpus` (default: the built-in sentences,
    repeated), with Qwen2-VL's special tokens appended above the learnt ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizers import normalizers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(CORPUS * 4 if corpus is None else corpus, trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def tokenizer_config_for(ids: dict) -> dict:
    """tokenizer_config.json of a Qwen2-VL tokenizer whose special tokens have the ids `ids`."""
    return {
        "tokenizer_class": "Qwen2TokenizerFast",
        "model_max_length": 32768,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "errors": "replace",
        "image_token": "<|image_pad|>",
        "video_token": "<|video_pad|>",
        "vision_start_token": "<|vision_start|>",
        "vision_end_token": "<|vision_end|>",
        "added_tokens_decoder": {
            str(i): {
                "content": t,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "single_word": False,
                "special": True,
            }
            for t, i in ids.items()
        },
    }


def preprocessor_config(min_pixels: int = 3136, max_pixels: int = 200704) -> dict:
    """preprocessor_config.json of Qwen2-VL's image processor (PIL backend) with this pixel budget."""
    return {
        "image_processor_type": "Qwen2VLImageProcessorPil",
        "processor_class": "Qwen2VLProcessor",
        "do_resize": True,
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_convert_rgb": True,
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
    }


def build(out: Path, seed: int) -> dict:
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(vocab_size=400)
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    vocab = tok.get_vocab_size()
    tok.save(str(out / "tokenizer.json"))

    text_config = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        tie_word_embeddings=False,
        initializer_range=0.2,
        bos_token_id=None,
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    vision_config = dict(
        depth=2,
        embed_dim=32,
        hidden_size=64,
        num_heads=4,
        mlp_ratio=2,
        in_channels=3,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        initializer_range=0.2,
    )
    config = Qwen2VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.bos_token_id = None
    model.generation_config.do_sample = False
    model.save_pretrained(out)

    tokenizer_config = tokenizer_config_for(ids)
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    preprocessor = preprocessor_config()
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    return {"dir": str(out), "vocab_size": vocab, "special_ids": ids}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="checkpoint directory to write")
    ap.add_argument("--seed", type=int, default=0, help="torch seed of the random weights")
    ap.add_argument("--export", type=Path, help="also export the ONNX model directory here")
    ap.add_argument("--no-verify", action="store_true", help="skip the export's onnxruntime-vs-torch check")
    args = ap.parse_args()
    info = build(args.out, args.seed)
    if args.export is not None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from export_qwen2vl import export

        info["export"] = export(args.out, args.export, verify=not args.no_verify)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
