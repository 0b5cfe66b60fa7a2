#!/usr/bin/env python3
"""open_clip's side of benches/benches/gpu_train.rs: its model and training step on one device.

  gpu_train_step.py --model NAME --presets DIR --device cuda|cpu --batch B
                    --search-start S --search-max M [--steps K] [--threads T]

`open_clip.create_model(NAME)` (after `open_clip.add_model_config(DIR)`, so our presets resolve
too), random init, fp32 weights, trained with open_clip_train's step without data loading: on CUDA
under `torch.autocast("cuda", dtype=torch.bfloat16)` (open_clip_train's `--precision amp_bf16`),
`ClipLoss`, backward, `clip_grad_norm_(1.0)`, AdamW (betas (0.9, 0.98), eps 1e-6, weight decay
0.2 on open_clip_train's decayed parameters), `logit_scale.clamp_(0, ln 100)`. The batch starts on
the CPU (pageable memory) and is copied to the device in the step, as a loader's batch is.

First the largest batch that fits (doubling from S up to M, one step each), then samples/s at B
(ours' largest, when it fits here) and at this side's largest, each over K synchronised steps
after 2 warm-up steps, in a fresh model. Prints one JSON line last.
"""
import argparse
import json
import math
import os
import time
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import open_clip  # noqa: E402
import torch  # noqa: E402
from open_clip.loss import ClipLoss  # noqa: E402
from openclip_step import image_size, param_groups  # noqa: E402



class Side:
    """A model, its optimizer and one training step on `device`."""

    def __init__(self, name, device):
        torch.manual_seed(0)
        self.device = torch.device(device)
        self.model = open_clip.create_model(name, device=self.device, precision="fp32")
        self.model.train()
        named = list(self.model.named_parameters())
        self.params = [p for _, p in named]
        self.opt = torch.optim.AdamW(param_groups(named), lr=1e-4, betas=(0.9, 0.98), eps=1e-6)
        self.loss = ClipLoss()
        self.amp = self.device.type == "cuda"
        self.size = image_size(self.model)
        self.ctx = self.model.context_length

    def batch(self, n):
        g = torch.Generator().manual_seed(42)
        images = torch.randn(n, 3, self.size, self.size, generator=g)
        texts = torch.randint(256, 40256, (n, self.ctx), generator=g)
        return images, texts

    def step(self, images, texts):
        images = images.to(self.device, non_blocking=True)
        texts = texts.to(self.device, non_blocking=True)
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            img, txt, scale = self.model(images, texts)
            loss = self.loss(img, txt, scale)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))
        if self.amp:
            torch.cuda.synchronize(self.device)

    def release(self):
        del self.model, self.opt
        if self.amp:
            torch.cuda.empty_cache()


def fits(side, n):
    try:
        side.step(*side.batch(n))
        return True, ""
    except torch.OutOfMemoryError as e:
        return False, str(e).splitlines()[0][:200]


def rate(name, device, n, steps):
    side = Side(name, device)
    try:
        images, texts = side.batch(n)
        for _ in range(2):
            side.step(images, texts)
        t = time.perf_counter()
        for _ in range(steps):
            side.step(images, texts)
        return n * steps / (time.perf_counter() - t)
    except torch.OutOfMemoryError:
        return None
    finally:
        side.release()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--presets", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--search-start", type=int, required=True)
    ap.add_argument("--search-max", type=int, required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    open_clip.add_model_config(a.presets)

    side = Side(a.model, a.device)
    best, n, stopped = 0, a.search_start, f"batch cap {a.search_max}"
    while n <= a.search_max:
        ok, why = fits(side, n)
        if not ok:
            stopped = f"batch {n} failed: {why}"
            break
        best, n = n, n * 2
    side.release()
    print(f"open_clip: largest batch {best} ({stopped})", flush=True)

    at_batch = rate(a.model, a.device, a.batch, a.steps) if a.batch <= best else None
    at_largest = at_batch if best == a.batch else (rate(a.model, a.device, best, a.steps) if best else None)
    print(json.dumps({
        "largest_batch": best,
        "search_stopped": stopped,
        "batch": a.batch,
        "samples_per_s_at_batch": at_batch,
        "samples_per_s_at_largest": at_largest,
        "precision": "amp_bf16" if a.device == "cuda" else "fp32",
        "text_positions": side.ctx,
        "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__},
    }))


if __name__ == "__main__":
    main()
