"""CLIP_benchmark + PyTorch side of benches/benches/eval_zeroshot.rs.

  eval_zeroshot_bench.py MODEL_NAME SEED CKPT_OUT DATA_DIR BATCH WORKERS THREADS OUT.json

Random-initialises open_clip's MODEL_NAME (torch.manual_seed(SEED)), saves its state dict to
CKPT_OUT (the Rust side loads the same weights), then runs one full zero-shot classification task
on the webdataset folder DATA_DIR exactly as CLIP_benchmark's CLI does for `wds/` datasets
(`build_dataset`, `dataset.batched(BATCH)`, a DataLoader with WORKERS worker processes,
`zeroshot_classification.evaluate`, amp off on the CPU), with torch using THREADS threads.
Times the whole evaluate call (classifier included) and writes images/s and the metrics.
"""

import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import open_clip  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from clip_benchmark.datasets.builder import build_dataset  # noqa: E402
from clip_benchmark.metrics import zeroshot_classification as zsc  # noqa: E402


def main():
    name, seed, ckpt, data, batch, workers, threads, out = sys.argv[1:9]
    batch, workers, threads = int(batch), int(workers), int(threads)
    torch.set_num_threads(threads)
    torch.manual_seed(int(seed))
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    model.eval()
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, ckpt)
    tok = open_clip.get_tokenizer(name)
    ds = build_dataset(dataset_name="wds/bench", root=data, transform=preprocess, split="test")
    loader = torch.utils.data.DataLoader(ds.batched(batch), batch_size=None, shuffle=False,
                                         num_workers=workers)
    start = time.perf_counter()
    metrics = zsc.evaluate(model, loader, tok, ds.classes, ds.templates, device="cpu", amp=False)
    seconds = time.perf_counter() - start
    with open(os.path.join(data, "test", "nshards.txt")) as f:
        nshards = int(f.read())
    n = 0
    import webdataset as wds
    for _ in wds.WebDataset(os.path.join(data, "test", "{0..%d}.tar" % (nshards - 1)), shardshuffle=False):
        n += 1
    with open(out, "w") as f:
        json.dump({"images": n, "seconds": seconds, "images_per_s": n / seconds,
                   "metrics": {k: (None if v != v else float(v)) for k, v in metrics.items()}}, f)


if __name__ == "__main__":
    main()
