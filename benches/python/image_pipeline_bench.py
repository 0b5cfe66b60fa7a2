#!/usr/bin/env python3
"""Reference side of benches/benches/image_pipeline.rs: open_clip's image pipeline on the same JPEGs.

  image_pipeline_bench.py [--repeat N] CASES.json

CASES.json is a list of {"name", "tar", "dir", "out_size"}: `dir` holds the JPEGs (`*.jpg`), `tar`
a webdataset shard of the same images (`key.jpg`). For each case, on one core
(`torch.set_num_threads(1)`), with `open_clip.image_transform(out_size, is_train=True)`:

- `pil`: for each JPEG's bytes in memory, `PIL.Image.open(BytesIO(b))`, `.convert("RGB")`, then
  the transform (RandomResizedCrop bicubic + ToTensor + Normalize): decode + augment + normalise.
- `wds`: open_clip's training input path on the shard: `wds.WebDataset(tar)`, `.decode("pilrgb")`,
  `.to_tuple("jpg")`, `.map_tuple(transform)`; iterated in this process (tar reading included).

Each measurement is run once to warm up, then the best of --repeat runs is kept, timed by the
thread's CPU time (`time.thread_time()`; torch runs single-threaded), so load from other processes
does not count. Prints one JSON
object on the last line: {case name: {"images", "pil_per_s", "wds_per_s"}, "versions": {...}}.
"""
import argparse
import glob
import io
import json
import os
import time
import warnings

warnings.filterwarnings("ignore")

import open_clip  # noqa: E402
import PIL  # noqa: E402
import torch  # noqa: E402
import webdataset as wds  # noqa: E402
from PIL import Image  # noqa: E402


def best_rate(fn, n, repeats):
    """Images/s by this thread's CPU time (time.thread_time), best of `repeats` after a warm-up:
    images/s per core, not inflated by other load on the machine."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t0)
    return n / best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("cases")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    with open(args.cases) as f:
        cases = json.load(f)
    out = {
        "versions": {
            "open_clip": open_clip.__version__,
            "torch": torch.__version__,
            "pillow": PIL.__version__,
            "webdataset": getattr(wds, "__version__", "?"),
        }
    }
    for case in cases:
        tf = open_clip.image_transform(case["out_size"], is_train=True)
        files = sorted(glob.glob(os.path.join(case["dir"], "*.jpg")))
        blobs = [open(p, "rb").read() for p in files]

        def pil_run():
            for b in blobs:
                img = Image.open(io.BytesIO(b)).convert("RGB")
                t = tf(img)
            return t

        def wds_run():
            ds = (
                wds.WebDataset(case["tar"], shardshuffle=False, empty_check=False)
                .decode("pilrgb")
                .to_tuple("jpg")
                .map_tuple(tf)
            )
            n = 0
            for (t,) in ds:
                n += 1
            assert n == len(blobs), (n, len(blobs))

        pil = best_rate(pil_run, len(blobs), args.repeat)
        web = best_rate(wds_run, len(blobs), args.repeat)
        out[case["name"]] = {"images": len(blobs), "pil_per_s": pil, "wds_per_s": web}
        print(f"{case['name']}: PIL + transform {pil:.0f} img/s, webdataset pipeline {web:.0f} img/s")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
