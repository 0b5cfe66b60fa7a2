#!/usr/bin/env python3
"""Reference side of benches/benches/train_step.rs: open_clip's training step on the same inputs.

  train_step_bench.py --presets DIR --model NAME --inputs INPUTS.safetensors --threads T
                      [--steps S] [--repeat R]

Builds `open_clip.create_model(NAME)` (after `open_clip.add_model_config(DIR)`, fp32, CPU) and
runs open_clip_train's step (`train_one_epoch` without data loading, accum_freq 1): forward,
`ClipLoss`, backward, `clip_grad_norm_(1.0)`, AdamW (betas (0.9, 0.98), eps 1e-6, weight decay 0.2
on the parameters open_clip_train decays: 2+ dims and no bn/ln/bias/logit_scale in the name),
`logit_scale.clamp_(0, ln 100)`.

`hq_clip` adds HQ-CLIP's extras written in PyTorch the straightforward way: the negatives through
the text tower with the positives, the gated HNI term (gate: argmax of the image's row is its own
text) with alpha = 0.5, and an MLP STC head (embed -> embed -> K, GELU) with BCE-with-logits
(mean over K) and beta = 10.

Rates are samples/s by wall clock (both sides use T intra-op threads), best of R rounds of S steps
after one warm-up step. Prints {"clip": rate, "hq_clip": rate, "versions": {...}} on the last line.
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
import torch.nn.functional as F  # noqa: E402
from open_clip.loss import ClipLoss  # noqa: E402
from openclip_step import param_groups  # noqa: E402
from safetensors.torch import load_file  # noqa: E402



def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    open_clip.add_model_config(a.presets)
    inputs = load_file(a.inputs)
    images, texts, negatives, targets = (
        inputs["images"], inputs["texts"], inputs["negatives"], inputs["tag_targets"])
    n = images.shape[0]
    rates = {}
    for case in ("clip", "hq_clip"):
        torch.manual_seed(0)
        model = open_clip.create_model(a.model, device="cpu", precision="fp32")
        model.train()
        embed = model.text_projection.shape[1]
        head = torch.nn.Sequential(
            torch.nn.Linear(embed, embed), torch.nn.GELU(), torch.nn.Linear(embed, targets.shape[1]))
        named = list(model.named_parameters())
        if case == "hq_clip":
            named += [("stc_head." + k, v) for k, v in head.named_parameters()]
        opt = torch.optim.AdamW(param_groups(named), lr=1e-4, betas=(0.9, 0.98), eps=1e-6)
        clip_loss = ClipLoss()
        params = [p for _, p in named]
        labels = torch.arange(n)

        def step():
            opt.zero_grad()
            if case == "clip":
                img, txt, scale = model(images, texts)
                loss = clip_loss(img, txt, scale)
            else:
                img_raw = model.encode_image(images)
                both = model.encode_text(torch.cat([texts, negatives]))
                img = F.normalize(img_raw, dim=-1)
                both = F.normalize(both, dim=-1)
                txt, neg = both[:n], both[n:]
                scale = model.logit_scale.exp()
                loss = clip_loss(img, txt, scale)
                logits = scale * img @ txt.T
                gate = (logits.argmax(dim=1) == labels).float().detach()
                pos = logits.diagonal()
                negl = scale * (img * neg).sum(-1)
                hni = -(gate * (pos - torch.logsumexp(torch.stack([pos, negl], 1), 1))).mean()
                stc = F.binary_cross_entropy_with_logits(head(img_raw), targets)
                loss = loss + 0.5 * hni + 10.0 * stc
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))

        step()
        best = 0.0
        for _ in range(a.repeat):
            t = time.perf_counter()
            for _ in range(a.steps):
                step()
            best = max(best, n * a.steps / (time.perf_counter() - t))
        rates[case] = best
    rates["versions"] = {"torch": torch.__version__, "open_clip": open_clip.__version__}
    print(json.dumps(rates))


if __name__ == "__main__":
    main()
