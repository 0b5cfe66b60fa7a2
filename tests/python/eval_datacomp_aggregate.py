"""DataComp's aggregate arithmetic (mlfoundations/datacomp `aggregate_scores.py`) for
tests/tests/eval_aggregate.rs.

  eval_datacomp_aggregate.py RESULTS.jsonl OUT.json [--partial]

RESULTS.jsonl is in the layout DataComp's evaluate.py writes: one line per task with "dataset"
(the display name) and "metrics" holding "main_metric". As in aggregate_scores.py, rows whose
main_metric is missing are dropped (FairFace, UTKFace), the rest must be the 38 tasks, and the
scores are ImageNet 1k, the plain mean of each group, and the plain mean of all 38. pandas is not
in the venv, so the jsonl is read with json; the arithmetic is numpy's, as in the original.
With --partial the 38-task assertion is skipped and each mean is over the tasks present (what
hq-eval reports, marked partial).
"""

import json
import sys

import numpy as np

DATASET_GROUPS = {
    'ImageNet dist. shifts': {
        'ImageNet Sketch', 'ImageNet v2', 'ImageNet-A', 'ImageNet-O', 'ImageNet-R', 'ObjectNet'
    },
    'VTAB': {
        'Caltech-101', 'CIFAR-100', 'CLEVR Counts', 'CLEVR Distance', 'Describable Textures', 'EuroSAT',
        'KITTI Vehicle Distance', 'Oxford Flowers-102', 'Oxford-IIIT Pet', 'PatchCamelyon', 'RESISC45',
        'SVHN', 'SUN397'},
    'Retrieval': {'Flickr', 'MSCOCO', 'WinoGAViL'},
}


def get_aggregate_scores(rows, partial):
    rows = [r for r in rows if r["metrics"].get("main_metric") is not None
            and not np.isnan(r["metrics"]["main_metric"])]
    if not partial:
        assert len(rows) == 38, f'Results file has unexpected size, {len(rows)}'
    results = {r["dataset"]: r["metrics"]["main_metric"] for r in rows}
    aggregate_results = {'ImageNet': results.get('ImageNet 1k')}
    for group, datasets in DATASET_GROUPS.items():
        present = [results[d] for d in datasets if d in results]
        aggregate_results[group] = float(np.mean(present)) if present else None
    aggregate_results['Average'] = float(np.mean(list(results.values())))
    return aggregate_results


def main():
    path, out = sys.argv[1], sys.argv[2]
    partial = "--partial" in sys.argv[3:]
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    with open(out, "w") as f:
        json.dump(get_aggregate_scores(rows, partial), f)


if __name__ == "__main__":
    main()
