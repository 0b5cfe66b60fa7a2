#!/usr/bin/env python3
"""Reference side of benches/benches/dp_scaling.rs: open_clip's data-parallel training step under
torchrun (gloo, CPU), the way open_clip_train runs it: DistributedDataParallel over the model,
`ClipLoss(rank, world_size)` with open_clip's defaults (features all-gathered, local_loss=False,
gather_with_grad=False), clip_grad_norm_(1.0), AdamW (0.9, 0.98, eps 1e-6, wd 0.2 on decayed
parameters), logit_scale clamp.

  torchrun --nproc-per-node W dp_scaling_openclip.py --presets DIR --model NAME --batch B
           --steps S --warmup K --threads T

Every rank: synthetic images and tokens of its own (batch B), T intra-op threads. Rank 0 prints
{"world": W, "samples_per_s": W * B * S / seconds} on the last line (wall clock of the S steps after
K warm-up steps, the ranks synchronised by a barrier before and after).
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
import torch.distributed as dist  # noqa: E402
from open_clip.loss import ClipLoss  # noqa: E402
from openclip_step import image_size, param_groups  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    open_clip.add_model_config(a.presets)
    torch.manual_seed(0)
    model = open_clip.create_model(a.model, precision="fp32")
    size = image_size(model)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(param_groups(list(model.named_parameters())), lr=1e-4, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = ClipLoss(rank=rank, world_size=world)
    g = torch.Generator().manual_seed(100 + rank)
    images = torch.randn(a.batch, 3, size, size, generator=g)
    texts = torch.randint(1, 49405, (a.batch, 77), generator=g)
    texts[:, 0], texts[:, 20] = 49406, 49407
    texts[:, 21:] = 0

    def step():
        opt.zero_grad(set_to_none=True)
        img, txt, scale = ddp(images, texts)
        loss = loss_fn(img, txt, scale)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    for _ in range(a.warmup):
        step()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    dist.barrier()
    seconds = time.perf_counter() - t0
    if rank == 0:
        print(json.dumps({"world": world, "samples_per_s": world * a.batch * a.steps / seconds}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
