#!/usr/bin/env python3
"""Reference side of benches/benches/encoder_throughput.rs: PyTorch open_clip's image encoder on
the same checkpoint, inputs, batch size and thread count.

  encoder_throughput.py CONFIG CHECKPOINT INPUTS OUT --threads T --repeats R

CONFIG is the open_clip model-config JSON (registered with open_clip.add_model_config, so the model
name is the file's stem), CHECKPOINT the safetensors state dict (loaded with strict=True), INPUTS a
safetensors file with `images` float [B, 3, H, W]. The model runs in fp32 on the CPU in eval mode
under torch.inference_mode(), torch.set_num_threads(T): two warm-up calls of encode_image(images),
then R timed calls (wall clock, time.perf_counter). Writes the embeddings of the last call to OUT
(`image_embeds`, so the Rust side can check it timed the same model) and prints one JSON object on
the last line: {"images_per_s" (median), "best_images_per_s", "seconds": [...], "batch",
"threads", "versions"}.
"""
import argparse
import json
import os
import statistics
import time
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import open_clip  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("checkpoint")
    p.add_argument("inputs")
    p.add_argument("out")
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--repeats", type=int, default=10)
    a = p.parse_args()

    torch.set_num_threads(a.threads)
    open_clip.add_model_config(a.config)
    name = os.path.splitext(os.path.basename(a.config))[0]
    model = open_clip.create_model(name, device="cpu", precision="fp32")
    model.load_state_dict(load_file(a.checkpoint), strict=True)
    model.eval()
    images = load_file(a.inputs)["images"].contiguous()
    batch = images.shape[0]
    with torch.inference_mode():
        for _ in range(2):
            out = model.encode_image(images)
        seconds = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            out = model.encode_image(images)
            seconds.append(time.perf_counter() - t0)
    save_file({"image_embeds": out.float().contiguous()}, a.out)
    med = statistics.median(seconds)
    print(json.dumps({
        "images_per_s": batch / med,
        "best_images_per_s": batch / min(seconds),
        "seconds": seconds,
        "batch": batch,
        "threads": a.threads,
        "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__},
    }))


if __name__ == "__main__":
    main()
