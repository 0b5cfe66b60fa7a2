"""open_clip's image transforms as the reference for tests/tests/train_data.rs.

Usage: train_transform_reference.py MANIFEST.json OUTDIR

MANIFEST is a JSON object with any of:
  "eval":   [{"path": P, "size": S, "out": NAME}, ...]
            open_clip.image_transform(S, is_train=False) of PIL.Image.open(P); float32 CHW written
            little-endian to OUTDIR/NAME. Optional "mean", "std", "resize_mode" keys pass a
            checkpoint's preprocess_cfg on.
  "train":  [{"path": P, "size": S, "top": i, "left": j, "height": h, "width": w, "out": NAME}]
            open_clip.image_transform(S, is_train=True) with its RandomResizedCrop's get_params
            replaced by the given crop (so only the random draw is ours), written as above.
  "decode": [{"path": P, "out": NAME}]
            PIL's decoded pixels, convert("RGB"), uint8 HWC written to OUTDIR/NAME.
  "params": {"sizes": [[W, H], ...], "n": N, "seed": S}
            N draws of torchvision's RandomResizedCrop.get_params with the scale and ratio that
            open_clip's train transform uses, per size; summary statistics returned.

Prints one JSON object: {"versions": {...}, "train_scale": [..], "train_ratio": [..],
"params": {"WxH": stats}, "written": count}.
"""

import json
import os
import sys

import numpy as np
import torch
from PIL import Image

import open_clip
import torchvision
from torchvision.transforms import RandomResizedCrop


def find_rrc(transform):
    for t in transform.transforms:
        if isinstance(t, RandomResizedCrop):
            return t
    raise SystemExit("open_clip's train transform has no RandomResizedCrop")


def write_tensor(t, path):
    arr = t.detach().cpu().contiguous().numpy().astype("<f4")
    with open(path, "wb") as f:
        f.write(arr.tobytes())


def crop_stats(width, height, scale, ratio, n):
    img = Image.new("RGB", (width, height))
    fracs, aspects, full = [], [], 0
    for _ in range(n):
        i, j, h, w = RandomResizedCrop.get_params(img, scale, ratio)
        assert 0 <= i and 0 <= j and i + h <= height and j + w <= width
        fracs.append(h * w / (width * height))
        aspects.append(w / h)
        full += int(h == height and w == width)
    fracs = np.array(fracs)
    aspects = np.array(aspects)
    return {
        "mean_area_fraction": float(fracs.mean()),
        "min_area_fraction": float(fracs.min()),
        "max_area_fraction": float(fracs.max()),
        "mean_log_aspect": float(np.log(aspects).mean()),
        "std_log_aspect": float(np.log(aspects).std()),
        "min_aspect": float(aspects.min()),
        "max_aspect": float(aspects.max()),
        "full_image_fraction": full / n,
    }


def main():
    manifest_path, outdir = sys.argv[1], sys.argv[2]
    with open(manifest_path) as f:
        manifest = json.load(f)
    torch.set_num_threads(1)
    written = 0
    result = {
        "versions": {
            "open_clip": open_clip.__version__,
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "pillow": Image.__version__,
        }
    }
    eval_tf = {}
    for job in manifest.get("eval", []):
        size = job["size"]
        # Optional: a checkpoint's preprocess_cfg (mean, std, resize_mode).
        extra = {k: job[k] for k in ("mean", "std", "resize_mode") if k in job}
        key = (size, json.dumps(extra, sort_keys=True))
        if key not in eval_tf:
            if "mean" in extra:
                extra["mean"] = tuple(extra["mean"])
            if "std" in extra:
                extra["std"] = tuple(extra["std"])
            eval_tf[key] = open_clip.image_transform(size, is_train=False, **extra)
        with Image.open(job["path"]) as img:
            img.load()
            out = eval_tf[key](img)
        write_tensor(out, os.path.join(outdir, job["out"]))
        written += 1

    train_tf = {}
    for job in manifest.get("train", []):
        size = job["size"]
        if size not in train_tf:
            train_tf[size] = open_clip.image_transform(size, is_train=True)
        tf = train_tf[size]
        rrc = find_rrc(tf)
        params = (job["top"], job["left"], job["height"], job["width"])
        rrc.get_params = lambda img, scale, ratio, p=params: p
        with Image.open(job["path"]) as img:
            img.load()
            out = tf(img)
        write_tensor(out, os.path.join(outdir, job["out"]))
        written += 1

    for job in manifest.get("decode", []):
        with Image.open(job["path"]) as img:
            arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
        with open(os.path.join(outdir, job["out"]), "wb") as f:
            f.write(arr.tobytes())
        written += 1

    rrc = find_rrc(open_clip.image_transform(64, is_train=True))
    result["train_scale"] = list(rrc.scale)
    result["train_ratio"] = list(rrc.ratio)
    result["train_interpolation"] = str(rrc.interpolation)
    if "params" in manifest:
        p = manifest["params"]
        torch.manual_seed(p.get("seed", 0))
        stats = {}
        for w, h in p["sizes"]:
            stats[f"{w}x{h}"] = crop_stats(w, h, rrc.scale, rrc.ratio, p["n"])
        result["params"] = stats
    result["written"] = written
    print(json.dumps(result))


if __name__ == "__main__":
    main()
