"""torch.optim.AdamW side of the optimizer parity test (tests/tests/train_loop.rs).

  train_adamw_reference.py IN.json OUT.json

IN.json: {"beta1", "beta2", "eps", "weight_decay", "lrs": [lr per step],
          "params": [{"name", "shape", "decay": bool, "value": [...]}],
          "grads": [[flat grad per param] per step]}
Runs torch.optim.AdamW (single-tensor path, foreach=False, on the CPU in float32) with two
parameter groups (weight decay on the `decay` params, 0 on the others), setting each group's lr
before each step, and writes {"params": {name: [flat values after the last step]},
"exp_avg": {...}, "exp_avg_sq": {...}}.
"""

import json
import sys

import torch


def main() -> None:
    spec = json.load(open(sys.argv[1]))
    params = []
    for p in spec["params"]:
        t = torch.tensor(p["value"], dtype=torch.float32).reshape(p["shape"])
        params.append((p["name"], torch.nn.Parameter(t), p["decay"]))
    groups = [
        {"params": [t for _, t, d in params if d], "weight_decay": spec["weight_decay"]},
        {"params": [t for _, t, d in params if not d], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(
        groups,
        lr=spec["lrs"][0],
        betas=(spec["beta1"], spec["beta2"]),
        eps=spec["eps"],
        foreach=False,
    )
    for lr, grads in zip(spec["lrs"], spec["grads"]):
        for g in opt.param_groups:
            g["lr"] = lr
        for (_, t, _), g in zip(params, grads):
            t.grad = torch.tensor(g, dtype=torch.float32).reshape(t.shape)
        opt.step()
        opt.zero_grad(set_to_none=True)
    out = {"params": {}, "exp_avg": {}, "exp_avg_sq": {}}
    for name, t, _ in params:
        st = opt.state[t]
        out["params"][name] = t.detach().flatten().tolist()
        out["exp_avg"][name] = st["exp_avg"].flatten().tolist()
        out["exp_avg_sq"][name] = st["exp_avg_sq"].flatten().tolist()
    json.dump(out, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
