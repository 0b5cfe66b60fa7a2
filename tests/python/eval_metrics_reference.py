"""Reference values for the metrics CLIP_benchmark does not cover (tests/tests/eval_metrics.rs):
DataComp's WILDS / fairness metrics and WinoGAViL score, computed the way DataComp's
eval_utils compute them.

  eval_metrics_reference.py IN.json OUT.json

- macro F1 / macro recall: sklearn `f1_score` / `recall_score` with `average="macro",
  labels=torch.unique(y_true)` (what WILDS' `F1` / `Recall` metrics call);
- per-group accuracy and worst group: WILDS `standard_group_eval` with DataComp's replacement of
  `avg_over_groups` (float32 `scatter_` add / count), `CombinatorialGrouper` groups
  0..max(metadata), worst = min over groups with samples (the `wilds` package itself is not in the
  venv, so its few lines are re-run here with torch);
- top-5 worst group (Dollar Street): DataComp's `TopKAccuracy` on `torch.topk(logits, 5)`;
- WinoGAViL: `np.argsort(scores)[-n_assoc:]` and sklearn `jaccard_score`, per instance, then the
  means DataComp reports.
"""

import json
import sys

import numpy as np
import torch
from sklearn.metrics import f1_score, jaccard_score, recall_score


def group_eval(correct, groups):
    v = torch.tensor(correct, dtype=torch.float)
    g = torch.tensor(groups, dtype=torch.long)
    n_groups = int(g.max().item()) + 1
    counts = torch.bincount(g, minlength=n_groups).float()
    sums = torch.zeros(n_groups, dtype=torch.float).scatter_(0, index=g, src=v, reduce="add")
    avgs = sums / counts
    present = counts > 0
    return {
        "avg": float(v.mean().item()),
        "groups": [None if c == 0 else float(a) for a, c in zip(avgs.tolist(), counts.tolist())],
        "worst": float(avgs[present].min().item()),
    }


def main():
    with open(sys.argv[1]) as f:
        d = json.load(f)
    y_true = torch.tensor(d["targets"])
    y_pred = torch.tensor(d["predictions"])
    labels = torch.unique(y_true)
    out = {
        "f1_macro": float(f1_score(y_true, y_pred, average="macro", labels=labels)),
        "recall_macro": float(recall_score(y_true, y_pred, average="macro", labels=labels)),
    }
    correct = (y_true == y_pred).tolist()
    out["groups"] = group_eval(correct, d["groups"])
    logits = torch.tensor(d["logits"], dtype=torch.float)
    top5 = torch.topk(logits, 5, dim=1)[1]
    top5_correct = (top5 == y_true.unsqueeze(-1)).any(-1).float().tolist()
    out["top5_groups"] = group_eval(top5_correct, d["groups"])
    scores, sizes = [], []
    for inst in d["wino"]:
        sims = np.array(inst["scores"], dtype=np.float32)
        y = np.array(inst["truth"], dtype=bool)
        n_assoc = int(y.sum())
        top = np.argsort(sims)[-n_assoc:]
        pred = np.isin(np.arange(len(sims)), top)
        scores.append(jaccard_score(y, pred))
        sizes.append(len(sims))
    scores, sizes = np.array(scores), np.array(sizes)
    out["wino"] = {
        "avg_jaccard_score": float(scores.mean()),
        "jaccard_score_5-6": float(scores[sizes <= 6].mean()),
        "jaccard_score_10-12": float(scores[sizes >= 10].mean()),
    }
    with open(sys.argv[2], "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
