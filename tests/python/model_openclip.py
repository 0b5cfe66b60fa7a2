"""open_clip side of the CLIP parity test (tests/tests/model_openclip.rs).

Builds open_clip's CLIP from a model-config JSON file (registered with
`open_clip.add_model_config`, so the model name is the file's stem) and runs it on the CPU in fp32.

  reference CONFIG OUT_DIR --seed S --batch N
      random-init the model (torch.manual_seed(S)), save its state dict (persistent tensors only)
      to OUT_DIR/openclip.safetensors (and as OUT_DIR/hf/, an open_clip HF folder with a torch.save
      .bin, and OUT_DIR/epoch_1.pt, an open_clip_train checkpoint), write deterministic inputs to OUT_DIR/inputs.safetensors
      (`images` float [N, 3, H, W], `text` int64 [N, context] with the end token at varied
      positions) and the model's outputs on them to OUT_DIR/reference.safetensors.
  locks CONFIG
      for k in 0..=layers+3, the parameters open_clip leaves trainable after
      lock_image_tower(unlocked_groups=k) and, on a fresh model, lock_text_tower(unlocked_layers=k),
      as JSON {"image": {k: [names]}, "text": {k: [names]}} (the model-lock parity test).
  check CONFIG CHECKPOINT INPUTS OUT
      load CHECKPOINT (safetensors) into the model with load_state_dict(strict=True) and write
      its outputs on INPUTS to OUT.
  train-mode CONFIG CHECKPOINT INPUTS OUT
      load CHECKPOINT, switch the model to training mode and encode INPUTS' images once (no
      gradient): OUT holds `image_embeds` and the image tower's state dict after that forward
      (`visual.*`, BatchNorm statistics updated), for the ModifiedResNet's BatchNorm parity.

For a ModifiedResNet (`vision_cfg.layers` a list) `reference` also writes the pristine init as
OUT_DIR/openclip_init.safetensors and saves in openclip.safetensors a model whose BatchNorm
weights, biases and statistics are randomised: at init every block's last BatchNorm weight is 0
and the statistics are 0 and 1, which would leave the blocks' convolutions and the statistics'
use untested.

Outputs: `image_embeds`, `text_embeds` (unnormalised encode_image/encode_text), `image_features`,
`text_features` (normalised, from forward), `logit_scale` (exp'd), `logits_per_image`, and
`logit_bias` when the model has one.
"""

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import open_clip  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


def build(config: Path) -> torch.nn.Module:
    open_clip.add_model_config(config)
    model = open_clip.create_model(config.stem, device="cpu", precision="fp32")
    if type(model).__name__ != "CLIP":
        sys.exit(f"{config}: open_clip built {type(model).__name__}, expected CLIP")
    return model.eval()


def make_inputs(model, batch: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    size = model.visual.image_size
    h, w = (size, size) if isinstance(size, int) else size
    images = torch.randn(batch, 3, h, w, generator=g)
    ctx, vocab = model.context_length, model.vocab_size
    sot, eot = vocab - 2, vocab - 1  # 49406 and 49407 for the CLIP vocab
    # End-token positions: right after the start, the very last slot, and points in between.
    positions = [1, ctx - 1, ctx // 2, 5, 2, ctx - 2, 10, ctx // 3]
    text = torch.zeros(batch, ctx, dtype=torch.int64)
    for i in range(batch):
        p = min(max(1, positions[i % len(positions)]), ctx - 1)
        text[i, 0] = sot
        if p > 1:
            text[i, 1:p] = torch.randint(1, sot, (p - 1,), generator=g)
        text[i, p] = eot
    return {"images": images.contiguous(), "text": text.contiguous()}


@torch.no_grad()
def run(model, inputs: dict) -> dict:
    images, text = inputs["images"], inputs["text"]
    out = {
        "image_embeds": model.encode_image(images),
        "text_embeds": model.encode_text(text),
    }
    res = model(images, text)
    out["image_features"], out["text_features"], out["logit_scale"] = res[0], res[1], res[2]
    if len(res) > 3:
        out["logit_bias"] = res[3]
    logits_per_image, _ = model.get_logits(images, text)
    out["logits_per_image"] = logits_per_image
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def is_resnet(model) -> bool:
    return type(model.visual).__name__ == "ModifiedResNet"


@torch.no_grad()
def randomise_batch_norm(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.weight.copy_(0.5 + torch.rand(n, generator=g))
            m.bias.copy_(0.1 * torch.randn(n, generator=g))
            m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            m.num_batches_tracked.fill_(int(torch.randint(1, 1000, (1,), generator=g)))


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("reference")
    r.add_argument("config", type=Path)
    r.add_argument("out_dir", type=Path)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--batch", type=int, default=4)
    lk = sub.add_parser("locks")
    lk.add_argument("config", type=Path)
    c = sub.add_parser("check")
    c.add_argument("config", type=Path)
    c.add_argument("checkpoint", type=Path)
    c.add_argument("inputs", type=Path)
    c.add_argument("out", type=Path)
    t = sub.add_parser("train-mode")
    t.add_argument("config", type=Path)
    t.add_argument("checkpoint", type=Path)
    t.add_argument("inputs", type=Path)
    t.add_argument("out", type=Path)
    args = ap.parse_args()

    if args.cmd == "locks":
        import json
        out = {"image": {}, "text": {}}
        for k in range(0, 8):
            model = build(args.config)
            model.lock_image_tower(unlocked_groups=k)
            out["image"][k] = sorted(n for n, p in model.named_parameters() if p.requires_grad)
            model = build(args.config)
            model.lock_text_tower(unlocked_layers=k)
            out["text"][k] = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        print(json.dumps(out))
    elif args.cmd == "reference":
        torch.manual_seed(args.seed)
        model = build(args.config)
        args.out_dir.mkdir(parents=True, exist_ok=True)
        if is_resnet(model):
            init = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
            save_file(init, str(args.out_dir / "openclip_init.safetensors"))
            randomise_batch_norm(model, args.seed + 7)
        # state_dict() holds persistent tensors only (attn_mask is a non-persistent buffer).
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(args.out_dir / "openclip.safetensors"))
        # The same weights as users get them: an open_clip Hugging Face folder (torch.save .bin)
        # and an open_clip_train checkpoint (DDP "module." prefixes); small models only (the
        # reader is the same at any size, and CI's disk and time are not).
        if sum(v.numel() for v in state.values()) <= 20_000_000:
            import json
            from torch_checkpoints import write_open_clip_formats
            write_open_clip_formats(state, json.loads(args.config.read_text()), str(args.out_dir),
                                    args.config.stem)
        inputs = make_inputs(model, args.batch, args.seed + 1)
        save_file(inputs, str(args.out_dir / "inputs.safetensors"))
        save_file(run(model, inputs), str(args.out_dir / "reference.safetensors"))
        print(f"open_clip {open_clip.__version__}: {args.config.stem} with {len(state)} tensors, "
              f"{sum(v.numel() for v in state.values())} parameters")
    elif args.cmd == "train-mode":
        model = build(args.config)
        model.load_state_dict(load_file(str(args.checkpoint)), strict=True)
        model.train()
        inputs = load_file(str(args.inputs))
        with torch.no_grad():
            out = {"image_embeds": model.encode_image(inputs["images"])}
        for k, v in model.state_dict().items():
            if k.startswith("visual."):
                out[k] = v
        save_file({k: v.detach().contiguous() for k, v in out.items()}, str(args.out))
        print(f"open_clip encoded {len(inputs['images'])} images in training mode")
    else:
        model = build(args.config)
        state = load_file(str(args.checkpoint))
        model.load_state_dict(state, strict=True)
        inputs = load_file(str(args.inputs))
        save_file(run(model, inputs), str(args.out))
        print(f"open_clip loaded {args.checkpoint} strictly ({len(state)} tensors)")


if __name__ == "__main__":
    main()
