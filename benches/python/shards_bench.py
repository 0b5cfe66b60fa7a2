#!/usr/bin/env python3
"""Reference side of benches/benches/shards.rs: how fast the Python `webdataset` package reads the
same shards.

  shards_bench.py --mode plain|pil [--repeat N] SHARD...

`plain` iterates raw samples (bytes per member, grouped by key); `pil` adds `.decode("pil")`, which
decodes every image with PIL (load + convert to RGB) and the txt/json members too. Prints one JSON
object: mode, samples, bytes (shard bytes on disk), the best and every wall time in seconds, and the
derived samples/s and MB/s of the best run.
"""
import argparse
import json
import os
import sys
import time
import warnings

warnings.filterwarnings("ignore")

import webdataset as wds  # noqa: E402


def run(shards, mode):
    ds = wds.WebDataset(shards, shardshuffle=False, empty_check=False)
    if mode == "pil":
        ds = ds.decode("pil")
    n = 0
    for sample in ds:
        img = sample.get("jpg")
        if img is None:
            raise SystemExit(f"sample {sample.get('__key__')} has no jpg")
        if mode == "pil":
            img.size  # noqa: B018 (the decoded image)
        n += 1
    return n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["plain", "pil"], default="plain")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("shards", nargs="+")
    args = ap.parse_args()
    nbytes = sum(os.path.getsize(p) for p in args.shards)
    times = []
    samples = 0
    run(args.shards[:1], args.mode)  # warm-up: imports, page cache
    for _ in range(max(1, args.repeat)):
        t0 = time.perf_counter()
        samples = run(args.shards, args.mode)
        times.append(time.perf_counter() - t0)
    best = min(times)
    json.dump(
        {
            "mode": args.mode,
            "samples": samples,
            "bytes": nbytes,
            "best_s": best,
            "times_s": times,
            "samples_per_s": samples / best,
            "mb_per_s": nbytes / best / 1e6,
            "webdataset": getattr(wds, "__version__", "?"),
        },
        sys.stdout,
    )
    print()


if __name__ == "__main__":
    main()
