"""How learnable is shape from a corpus's images, with direct labels? (issue 16 diagnostic)

Trains open_clip's ModifiedResNet (the ablation's image tower: layers [1,1,1,1], width 32, 64 px)
as a plain 8-way shape classifier on the single-group training samples of a corpus written by
`hq-data synth`, then reports top-1 accuracy on the corpus's held-out shape set
(eval/wds_synth_shape_test). Chance is 12.5%. It separates "the images do not show shape well
enough for this tower at this budget" from "the contrastive task does not ask for shape".

  python tools/probes/shape_learnability.py CORPUS [--steps 300] [--batch 32] [--seed 0]
"""
import argparse, glob, io, json, tarfile, time
import numpy as np
import torch
from PIL import Image
from open_clip.modified_resnet import ModifiedResNet

SHAPES = ["circle", "square", "triangle", "star", "cross", "diamond", "ring", "hexagon"]
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def pixels(jpg: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(jpg)).convert("RGB").resize((64, 64), Image.BICUBIC)
    return ((np.asarray(img, dtype=np.float32) / 255.0 - MEAN) / STD).transpose(2, 0, 1)


def read(pattern: str, label_of):
    xs, ys = [], []
    for path in sorted(glob.glob(pattern)):
        members = {}
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                if m.isfile():
                    key, ext = m.name.rsplit(".", 1)
                    members.setdefault(key, {})[ext] = tar.extractfile(m).read()
        for key, parts in members.items():
            y = label_of(parts)
            if y is not None and "jpg" in parts:
                xs.append(pixels(parts["jpg"]))
                ys.append(y)
    return torch.tensor(np.stack(xs)), torch.tensor(ys)


def train_label(parts):
    scene = json.loads(parts["json"])["scene"]
    groups = scene["groups"]
    return SHAPES.index(groups[0]["shape"]) if len(groups) == 1 else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("corpus")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-shards", type=int, default=4)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    torch.set_num_threads(1)
    shards = sorted(glob.glob(f"{a.corpus}/train/*.tar"))[: a.train_shards]
    xs, ys = [], []
    for s in shards:
        x, y = read(s, train_label)
        xs.append(x); ys.append(y)
    x_train, y_train = torch.cat(xs), torch.cat(ys)
    x_test, y_test = read(f"{a.corpus}/eval/wds_synth_shape_test/test/*.tar",
                          lambda p: int(p["cls"].decode().strip()) if "cls" in p else None)
    model = ModifiedResNet(layers=[1, 1, 1, 1], output_dim=len(SHAPES), heads=16,
                           image_size=64, width=32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    g = torch.Generator().manual_seed(a.seed)
    started = time.time()
    model.train()
    for step in range(a.steps):
        idx = torch.randint(0, len(y_train), (a.batch,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
        opt.zero_grad(); loss.backward(); opt.step()
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x_test[i:i + 256]).argmax(1) for i in range(0, len(y_test), 256)])
    acc = (pred == y_test).float().mean().item()
    print(json.dumps({"corpus": a.corpus, "steps": a.steps, "batch": a.batch, "seed": a.seed,
                      "train_samples": len(y_train), "test_samples": len(y_test),
                      "shape_acc1": acc, "seconds": round(time.time() - started, 1)}))


if __name__ == "__main__":
    main()
