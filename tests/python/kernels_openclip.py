"""open_clip's ClipLoss on inputs written by tests/tests/kernels_openclip.rs: value and gradients.

Usage: kernels_openclip.py DIR. DIR holds cases.json (a list of cases) and, per case, raw
little-endian f32 arrays. For each case and each dtype (float64, float32) this writes
`<name>.<dtype>.out.json` with the loss and the raw f64 gradient files
`<name>.<dtype>.grad_<input>.f64`. The float64 run is open_clip's own code evaluated exactly on the
same (f32) inputs, the reference for the 1e-5 comparison; the float32 run is what open_clip
computes in training.

The logit scale is given as the model's log-scale parameter; the loss receives
`logit_scale.exp()`, exactly as open_clip's CLIP.forward hands it over, and the gradient reported
for it is the one reaching the log-scale parameter.

Distributed cases (open_clip's `--local-loss --gather-with-grad`) run ClipLoss with its real
rank/world-size logic; only `gather_features` (which needs torch.distributed) is replaced by a
function returning the gathered tensors the test supplies, with autograd intact.
"""

import json
import os
import sys

import numpy as np
import torch

import open_clip
from open_clip import loss as oc_loss


def load(d, name, shape, dtype):
    a = np.fromfile(os.path.join(d, name), dtype="<f4").reshape(shape)
    return torch.from_numpy(a.copy()).to(dtype)


def save_grad(d, case, key, t):
    t.grad.detach().to(torch.float64).numpy().astype("<f8").tofile(os.path.join(d, f"{case}.grad_{key}.f64"))


def run(d, c, dtype):
    name, n, dim = c["name"], c["n"], c["d"]
    ls = torch.tensor(np.float32(c["logit_scale"]), dtype=dtype, requires_grad=True)
    if c["world"] == 1:
        x = load(d, f"{name}.x.f32", (n, dim), dtype).requires_grad_()
        y = load(d, f"{name}.y.f32", (n, dim), dtype).requires_grad_()
        loss = oc_loss.ClipLoss()(x, y, ls.exp())
        loss.backward()
        grads = {"x": x, "y": y}
    else:
        m = n * c["world"]
        xa = load(d, f"{name}.x_all.f32", (m, dim), dtype).requires_grad_()
        ya = load(d, f"{name}.y_all.f32", (m, dim), dtype).requires_grad_()
        xl = load(d, f"{name}.x_local.f32", (n, dim), dtype).requires_grad_()
        yl = load(d, f"{name}.y_local.f32", (n, dim), dtype).requires_grad_()

        def fake_gather(image_features, text_features, **kwargs):
            assert kwargs.get("local_loss") and kwargs.get("gather_with_grad")
            assert kwargs.get("rank") == c["rank"] and kwargs.get("world_size") == c["world"]
            return xa, ya

        saved = oc_loss.gather_features
        oc_loss.gather_features = fake_gather
        try:
            fn = oc_loss.ClipLoss(local_loss=True, gather_with_grad=True, rank=c["rank"], world_size=c["world"])
            loss = fn(xl, yl, ls.exp())
        finally:
            oc_loss.gather_features = saved
        loss.backward()
        grads = {"x_local": xl, "y_local": yl, "x_all": xa, "y_all": ya}
    tag = f"{name}.{str(dtype).split('.')[-1]}"
    for k, t in grads.items():
        save_grad(d, tag, k, t)
    out = {
        "loss": float(loss.detach().to(torch.float64)),
        "grad_logit_scale": float(ls.grad.to(torch.float64)),
        "open_clip": open_clip.__version__,
        "torch": torch.__version__,
    }
    json.dump(out, open(os.path.join(d, f"{tag}.out.json"), "w"))


def main():
    d = sys.argv[1]
    torch.set_num_threads(1)
    for c in json.load(open(os.path.join(d, "cases.json"))):
        for dtype in (torch.float64, torch.float32):
            run(d, c, dtype)


if __name__ == "__main__":
    main()
