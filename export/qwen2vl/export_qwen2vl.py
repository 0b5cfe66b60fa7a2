#!/usr/bin/env python3
"""Export a Hugging Face Qwen2-VL checkpoint to the three-file ONNX layout of transformers.js /
onnx-community, the model directory `hq-recap-trt --engine` reads.

Output directory (`OUT`):

    OUT/onnx/vision_encoder.onnx        pixel_values f32 [num_patches, 1176], grid_thw i64 [num_images, 3]
                                        -> image_features f32 [num_patches / 4, hidden]
    OUT/onnx/embed_tokens.onnx          input_ids i64 [batch, seq] -> inputs_embeds f32 [batch, seq, hidden]
    OUT/onnx/decoder_model_merged.onnx  inputs_embeds f32 [batch, seq, hidden],
                                        attention_mask i64 [batch, past + seq],
                                        position_ids i64 [3, batch, seq],
                                        past_key_values.{i}.key / .value f32 [batch, kv_heads, past, head_dim]
                                        -> logits f32 [batch, 1, vocab] (last position only),
                                           present.{i}.key / .value f32 [batch, kv_heads, past + seq, head_dim]
    OUT/config.json, generation_config.json, preprocessor_config.json, tokenizer.json,
    tokenizer_config.json, chat_template.jinja, hq_prompt.json (copied when present)
    OUT/hq_export.json                  what was exported, with which versions, and the check results

Names and shapes follow onnx-community's Qwen2-VL models (`pixel_values`/`grid_thw` ->
`image_features`; `input_ids` -> `inputs_embeds`; `inputs_embeds`, `attention_mask`,
`position_ids` [3, batch, seq], `past_key_values.{i}.key|value` -> `logits`, `present.{i}.key|value`).
One deliberate difference: `logits` holds the last position only ([batch, 1, vocab]); a generation
loop needs nothing else, and for a 7B model the full [batch, prompt, 152064] tensor of the prompt
step is gigabytes. Loops written for the onnx-community files (which read `logits[:, -1]`) work
unchanged.

Why wrappers instead of exporting HF's modules as they are:
- HF's vision tower builds its rotary (h, w) ids and its per-image attention split with Python loops
  over `grid_thw`; a traced graph freezes them to the dummy's grid (wrong output, or a broadcast
  error on another image size). The wrapper computes the ids from `grid_thw` with tensor ops and
  replaces the split by one attention under a block-diagonal mask (one block per image frame).
- The decoder wrapper runs HF's own layers' weights with an explicit key/value cache (concatenated
  past + new) and an explicit causal + padding mask built from the 2-D `attention_mask`, so the
  graph does not depend on transformers' cache classes and mask helpers.
With `--verify` (the default) the three graphs are checked with onnxruntime against the torch model:
image features and a greedy generation of a few tokens, token for token, with logit differences, plus
two negative controls (zeroed image features, plain 1-D positions) that must change the tokens.

Usage: export_qwen2vl.py --model HF_DIR --out OUT [--opset 17] [--no-verify]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

COPIED_FILES = [
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "special_tokens_map.json",
    # The recaptioner's prompt template (recaptioner/finetune_qwen2vl.py writes it beside the
    # checkpoint): the runtime builds the user turn from it, as in fine-tuning.
    "hq_prompt.json",
]
REQUIRED_FILES = ["config.json", "tokenizer.json", "preprocessor_config.json"]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class VisionEncoder(nn.Module):
    """pixel_values [N, C*T*P*P], grid_thw [I, 3] -> merged image features [N / m^2, hidden]."""

    def __init__(self, visual: nn.Module, vision_config) -> None:
        super().__init__()
        self.visual = visual
        self.merge = int(vision_config.spatial_merge_size)
        self.num_heads = int(vision_config.num_heads)

    def rotary_ids_and_mask(self, n: int, grid_thw: torch.Tensor, device):
        grid = grid_thw.to(torch.int64)
        frame_len = grid[:, 1] * grid[:, 2]
        counts = grid[:, 0] * frame_len
        ends = torch.cumsum(counts, 0)
        starts = ends - counts
        idx = torch.arange(n, device=device, dtype=torch.int64)
        # Image of each patch: how many image ends lie at or before it.
        image = (idx.unsqueeze(1) >= ends.unsqueeze(0)).to(torch.int64).sum(1)
        local = idx - starts[image]
        flen = frame_len[image]
        w = grid[:, 2][image]
        frame = local // flen
        r = local % flen
        m = self.merge
        block, within = r // (m * m), r % (m * m)
        blocks_w = w // m
        hpos = (block // blocks_w) * m + within // m
        wpos = (block % blocks_w) * m + within % m
        pos = torch.stack([hpos, wpos], dim=1)
        segment = image * 1_000_000 + frame
        same = segment.unsqueeze(0) == segment.unsqueeze(1)
        return pos, same

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        v = self.visual
        hs = v.patch_embed(pixel_values)
        n = hs.shape[0]
        pos, same = self.rotary_ids_and_mask(n, grid_thw, hs.device)
        cos, sin = v.rotary_pos_emb(hs, pos)
        cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
        bias = torch.where(same, 0.0, torch.finfo(torch.float32).min).to(hs.dtype)
        for blk in v.blocks:
            x = blk.norm1(hs)
            attn = blk.attn
            qkv = attn.qkv(x).reshape(n, 3, self.num_heads, -1).permute(1, 0, 2, 3)
            q, k, val = qkv[0], qkv[1], qkv[2]
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            q, k, val = q.transpose(0, 1), k.transpose(0, 1), val.transpose(0, 1)  # [H, N, D]
            scores = torch.matmul(q, k.transpose(1, 2)) * attn.scaling + bias
            probs = torch.softmax(scores, dim=-1)
            out = torch.matmul(probs, val).transpose(0, 1).reshape(n, -1)
            hs = hs + attn.proj(out)
            hs = hs + blk.mlp(blk.norm2(hs))
        return v.merger(hs)


class EmbedTokens(nn.Module):
    def __init__(self, embed: nn.Embedding) -> None:
        super().__init__()
        self.embed = embed

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)


class Decoder(nn.Module):
    """inputs_embeds, attention_mask [B, past+S], position_ids [3, B, S], past k/v per layer ->
    last-position logits and the grown k/v per layer."""

    def __init__(self, language_model: nn.Module, lm_head: nn.Module, text_config) -> None:
        super().__init__()
        self.lm = language_model
        self.lm_head = lm_head
        self.num_layers = int(text_config.num_hidden_layers)
        self.num_heads = int(text_config.num_attention_heads)
        self.num_kv_heads = int(text_config.num_key_value_heads)
        self.head_dim = int(text_config.hidden_size) // self.num_heads

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        bsz, seq = inputs_embeds.shape[0], inputs_embeds.shape[1]
        total = attention_mask.shape[1]
        past_len = total - seq
        q_pos = torch.arange(seq, device=inputs_embeds.device) + past_len
        k_pos = torch.arange(total, device=inputs_embeds.device)
        causal = k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)  # [S, T]
        keep = causal.unsqueeze(0) & (attention_mask.unsqueeze(1) != 0)  # [B, S, T]
        bias = torch.where(keep, 0.0, torch.finfo(torch.float32).min).to(inputs_embeds.dtype)
        bias = bias.unsqueeze(1)  # [B, 1, S, T]

        cos, sin = self.lm.rotary_emb(inputs_embeds, position_ids)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        groups = self.num_heads // self.num_kv_heads
        hs = inputs_embeds
        presents = []
        for i, layer in enumerate(self.lm.layers):
            residual = hs
            x = layer.input_layernorm(hs)
            a = layer.self_attn
            q = a.q_proj(x).view(bsz, seq, self.num_heads, self.head_dim).transpose(1, 2)
            k = a.k_proj(x).view(bsz, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
            v = a.v_proj(x).view(bsz, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            k = torch.cat([past[2 * i], k], dim=2)
            v = torch.cat([past[2 * i + 1], v], dim=2)
            presents += [k, v]
            # Grouped-query attention without repeating the cache: query head h uses key/value
            # head h // groups (HF's repeat_interleave), so the queries are regrouped as
            # [B, kv_heads, groups * S, D] and multiplied with the cache as it is. Repeating k and v
            # would copy the whole cache twice per layer and step.
            total_len = k.shape[2]
            qg = q.reshape(bsz, self.num_kv_heads, groups * seq, self.head_dim)
            scores = torch.matmul(qg, k.transpose(2, 3)) * a.scaling
            scores = scores.reshape(bsz, self.num_heads, seq, total_len) + bias
            probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
            probs = probs.reshape(bsz, self.num_kv_heads, groups * seq, total_len)
            out = torch.matmul(probs, v).reshape(bsz, self.num_heads, seq, self.head_dim)
            out = out.transpose(1, 2).reshape(bsz, seq, -1)
            hs = residual + a.o_proj(out)
            hs = hs + layer.mlp(layer.post_attention_layernorm(hs))
        hs = self.lm.norm(hs[:, -1:, :])
        logits = self.lm_head(hs)
        return (logits, *presents)


def load_model(model_dir: Path):
    from transformers import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    return model


def export_graphs(model, out: Path, opset: int) -> dict:
    cfg = model.config
    tc, vc = cfg.text_config, cfg.vision_config
    onnx_dir = out / "onnx"
    onnx_dir.mkdir(parents=True, exist_ok=True)
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2

    vision = VisionEncoder(model.model.visual, vc).eval()
    # Two images of different grids so nothing can specialise on one shape.
    grid = torch.tensor([[1, 4, 6], [1, 2, 2]], dtype=torch.int64)
    n = int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum())
    pixels = torch.randn(n, patch_dim)
    with torch.no_grad():
        torch.onnx.export(
            vision,
            (pixels, grid),
            str(onnx_dir / "vision_encoder.onnx"),
            input_names=["pixel_values", "grid_thw"],
            output_names=["image_features"],
            dynamic_axes={
                "pixel_values": {0: "num_patches"},
                "grid_thw": {0: "num_images"},
                "image_features": {0: "num_image_tokens"},
            },
            opset_version=opset,
            dynamo=False,
        )

    embed = EmbedTokens(model.model.language_model.embed_tokens).eval()
    with torch.no_grad():
        torch.onnx.export(
            embed,
            (torch.tensor([[1, 2, 3], [4, 5, 6]], dtype=torch.int64),),
            str(onnx_dir / "embed_tokens.onnx"),
            input_names=["input_ids"],
            output_names=["inputs_embeds"],
            dynamic_axes={"input_ids": {0: "batch_size", 1: "sequence_length"},
                          "inputs_embeds": {0: "batch_size", 1: "sequence_length"}},
            opset_version=opset,
            dynamo=False,
        )

    dec = Decoder(model.model.language_model, model.lm_head, tc).eval()
    bsz, seq, past_len = 2, 3, 5
    head_dim = tc.hidden_size // tc.num_attention_heads
    past = []
    in_names = ["inputs_embeds", "attention_mask", "position_ids"]
    out_names = ["logits"]
    dyn = {
        "inputs_embeds": {0: "batch_size", 1: "sequence_length"},
        "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
        "position_ids": {1: "batch_size", 2: "sequence_length"},
        "logits": {0: "batch_size"},
    }
    for i in range(tc.num_hidden_layers):
        for kind in ("key", "value"):
            past.append(torch.randn(bsz, tc.num_key_value_heads, past_len, head_dim))
            name = f"past_key_values.{i}.{kind}"
            in_names.append(name)
            dyn[name] = {0: "batch_size", 2: "past_sequence_length"}
            oname = f"present.{i}.{kind}"
            out_names.append(oname)
            dyn[oname] = {0: "batch_size", 2: "total_sequence_length"}
    mask = torch.ones(bsz, past_len + seq, dtype=torch.int64)
    mask[1, :2] = 0
    pos = torch.arange(seq).view(1, 1, -1).expand(3, bsz, -1).contiguous() + past_len
    with torch.no_grad():
        torch.onnx.export(
            dec,
            (torch.randn(bsz, seq, tc.hidden_size), mask, pos, *past),
            str(onnx_dir / "decoder_model_merged.onnx"),
            input_names=in_names,
            output_names=out_names,
            dynamic_axes=dyn,
            opset_version=opset,
            dynamo=False,
        )
    return {
        "patch_dim": patch_dim,
        "hidden_size": tc.hidden_size,
        "num_layers": tc.num_hidden_layers,
        "num_key_value_heads": tc.num_key_value_heads,
        "head_dim": head_dim,
        "vocab_size": tc.vocab_size,
    }


class OrtQwen2VL:
    """A minimal greedy loop over the three ONNX files (the check, not the product)."""

    def __init__(self, out: Path) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        onnx_dir = out / "onnx"
        self.vision = ort.InferenceSession(str(onnx_dir / "vision_encoder.onnx"), so, providers=["CPUExecutionProvider"])
        self.embed = ort.InferenceSession(str(onnx_dir / "embed_tokens.onnx"), so, providers=["CPUExecutionProvider"])
        self.decoder = ort.InferenceSession(
            str(onnx_dir / "decoder_model_merged.onnx"), so, providers=["CPUExecutionProvider"]
        )
        self.past_names = [i.name for i in self.decoder.get_inputs() if i.name.startswith("past_key_values.")]

    def image_features(self, pixel_values, grid_thw):
        return self.vision.run(None, {"pixel_values": pixel_values, "grid_thw": grid_thw})[0]

    def greedy(self, input_ids, pixel_values, grid_thw, image_token_id, positions, delta, max_new, eos,
               zero_features=False):
        """Batch 1. Returns (tokens, per-step logits)."""
        import numpy as np

        feats = self.image_features(pixel_values, grid_thw)
        if zero_features:
            feats = np.zeros_like(feats)
        emb = self.embed.run(None, {"input_ids": input_ids})[0]
        emb[input_ids == image_token_id] = feats
        hd = self.decoder.get_inputs()[3].shape
        kv_heads, head_dim = hd[1], hd[3]
        past = {n: np.zeros((1, kv_heads, 0, head_dim), np.float32) for n in self.past_names}
        mask = np.ones((1, input_ids.shape[1]), np.int64)
        pos = positions
        tokens, all_logits = [], []
        for _ in range(max_new):
            outs = self.decoder.run(None, {"inputs_embeds": emb, "attention_mask": mask, "position_ids": pos, **past})
            logits = outs[0][:, -1, :]
            all_logits.append(logits[0])
            tok = int(logits[0].argmax())
            tokens.append(tok)
            if tok in eos:
                break
            for name, value in zip(self.past_names, outs[1:]):
                past[name] = value
            step = mask.shape[1]
            mask = np.ones((1, step + 1), np.int64)
            pos = np.full((3, 1, 1), step + delta, np.int64)
            emb = self.embed.run(None, {"input_ids": np.array([[tok]], np.int64)})[0]
        return tokens, all_logits


def load_processor(model_dir: Path):
    """Qwen2-VL's processor with the PIL image backend (PIL bicubic resampling, the processor's
    historical behaviour and what hq-runtime reproduces bit for bit). transformers 5 picks the
    torchvision backend by default, and `AutoProcessor(backend="pil")` also asks for a PIL video
    processor, which does not exist, so the parts are assembled here."""
    from transformers import AutoImageProcessor, AutoTokenizer, AutoVideoProcessor, Qwen2VLProcessor

    model_dir = Path(model_dir)
    template = model_dir / "chat_template.jinja"
    return Qwen2VLProcessor(
        image_processor=AutoImageProcessor.from_pretrained(model_dir, backend="pil"),
        tokenizer=AutoTokenizer.from_pretrained(model_dir),
        video_processor=AutoVideoProcessor.from_pretrained(model_dir),
        chat_template=template.read_text() if template.is_file() else None,
    )


def verify(model, model_dir: Path, out: Path) -> dict:
    """Image features and a greedy generation checked against torch."""
    import numpy as np
    from PIL import Image

    processor = load_processor(model_dir)
    rng = np.random.default_rng(0)
    ort_model = OrtQwen2VL(out)
    report = {"images": []}
    image_token = model.config.image_token_id
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    for (h, w) in [(56, 84), (90, 61)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
        text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[text], images=[img], return_tensors="pt")
        with torch.no_grad():
            ref_feats = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
            ref_feats = torch.cat(ref_feats, 0).numpy()
            ours = ort_model.image_features(inputs["pixel_values"].numpy(), inputs["image_grid_thw"].numpy())
            feat_diff = float(np.abs(ours - ref_feats).max())
            gen = model.generate(**inputs, max_new_tokens=12, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
            ref_tokens = gen.sequences[0, inputs["input_ids"].shape[1]:].tolist()
            positions, delta = model.model.get_rope_index(
                inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"],
                attention_mask=inputs["attention_mask"])
        tokens, logits = ort_model.greedy(
            inputs["input_ids"].numpy(), inputs["pixel_values"].numpy(), inputs["image_grid_thw"].numpy(),
            image_token, positions.numpy(), int(delta[0, 0]), 12, eos)
        # Negative controls: without the image features, or with plain 1-D positions, the tokens
        # must change, or this model cannot tell a correct export from a broken one.
        no_image, _ = ort_model.greedy(
            inputs["input_ids"].numpy(), inputs["pixel_values"].numpy(), inputs["image_grid_thw"].numpy(),
            image_token, positions.numpy(), int(delta[0, 0]), 12, eos, zero_features=True)
        length = inputs["input_ids"].shape[1]
        flat = np.broadcast_to(np.arange(length, dtype=np.int64), (3, 1, length)).copy()
        one_d, _ = ort_model.greedy(
            inputs["input_ids"].numpy(), inputs["pixel_values"].numpy(), inputs["image_grid_thw"].numpy(),
            image_token, flat, 0, 12, eos)
        n = min(len(logits), len(gen.logits))
        logit_diff = max(float(np.abs(logits[i] - gen.logits[i][0].numpy()).max()) for i in range(n))
        entry = {
            "size": [h, w],
            "grid_thw": inputs["image_grid_thw"][0].tolist(),
            "image_feature_max_abs_diff": feat_diff,
            "logit_max_abs_diff": logit_diff,
            "torch_tokens": ref_tokens,
            "onnx_tokens": tokens,
            "tokens_equal": tokens == ref_tokens,
            "no_image_features_differs": no_image != ref_tokens,
            "one_d_positions_differs": one_d != ref_tokens,
        }
        report["images"].append(entry)
        if not entry["tokens_equal"] or feat_diff > 1e-3 or logit_diff > 1e-2:
            raise SystemExit(f"export check failed: {json.dumps(entry)}")
    for control in ("no_image_features_differs", "one_d_positions_differs"):
        if not any(e[control] for e in report["images"]):
            raise SystemExit(f"export check is blind: {control} is false for every image, so this model's "
                             "greedy tokens cannot tell a correct export from a broken one")
    return report


def export(model_dir: Path, out: Path, opset: int = 17, verify: bool = True) -> dict:
    model_dir, out = Path(model_dir), Path(out)
    missing = [f for f in REQUIRED_FILES if not (model_dir / f).is_file()]
    if missing:
        raise SystemExit(f"{model_dir} is not a Qwen2-VL checkpoint directory: missing {', '.join(missing)}")
    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("model_type") != "qwen2_vl":
        raise SystemExit(f"{model_dir}/config.json has model_type {cfg.get('model_type')!r}, expected 'qwen2_vl'")
    t0 = time.time()
    model = load_model(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    shapes = export_graphs(model, out, opset)
    for name in COPIED_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, out / name)
    import onnx
    import transformers

    info = {
        "format": "onnx-community-qwen2vl",
        "logits": "last position only",
        "source": str(model_dir),
        "opset": opset,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "shapes": shapes,
        "export_seconds": round(time.time() - t0, 2),
    }
    for f in ("vision_encoder", "embed_tokens", "decoder_model_merged"):
        onnx.checker.check_model(str(out / "onnx" / f"{f}.onnx"))
    if verify:
        info["verify"] = globals()["verify"](model, model_dir, out)
    (out / "hq_export.json").write_text(json.dumps(info, indent=2))
    return info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path, help="Hugging Face Qwen2-VL checkpoint directory")
    ap.add_argument("--out", required=True, type=Path, help="model directory to write")
    ap.add_argument("--opset", type=int, default=17)
    ap.add_argument("--no-verify", action="store_true", help="skip the onnxruntime-vs-torch check")
    args = ap.parse_args()
    info = export(args.model, args.out, args.opset, verify=not args.no_verify)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
