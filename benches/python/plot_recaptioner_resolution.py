#!/usr/bin/env python3
"""Bar chart of benches/results/recaptioner_resolution.json (the latest run): the recaptioner's
object recall per setting (image size, vision tower width and depth, its learning rate) against
copying the alt-text, and d+ colour / shape accuracy.

Usage: plot_recaptioner_resolution.py [JSON] [PNG]
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

root = Path(__file__).resolve().parents[1] / "results"
src = Path(sys.argv[1]) if len(sys.argv) > 1 else root / "recaptioner_resolution.json"
dst = Path(sys.argv[2]) if len(sys.argv) > 2 else src.with_suffix(".png")
results = json.loads(src.read_text())["runs"][-1]["results"]

names = [r["run"] for r in results]
series = {
    "object recall (d+)": [r["object_recall"]["rate"] for r in results],
    "d+ colour right": [r["attributes"]["color"]["correct_rate"] for r in results],
    "d+ shape right": [r["attributes"]["shape"]["correct_rate"] for r in results],
}
alt = results[0]["alt_text_object_recall"]["rate"]

fig, ax = plt.subplots(figsize=(11, 4.4))
width = 0.8 / len(series)
for k, (label, values) in enumerate(series.items()):
    xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(names))]
    ax.bar(xs, values, width, label=label)
ax.axhline(alt, color="black", linestyle="--", linewidth=1, label=f"object recall of the alt-text ({alt:.2f})")
ax.axhline(0.4, color="grey", linestyle=":", linewidth=1, label="issue target 0.4")
ax.set_xticks(range(len(names)), [n.replace(", ", ",\n", 1) for n in names], fontsize=7)
ax.set_ylabel("rate over 1,000 unseen images")
ax.set_ylim(0, 0.6)
ax.set_title("Toy recaptioner: image size and vision tower vs content (2-core CPU)")
ax.legend(fontsize=7, loc="upper left")
fig.tight_layout()
tmp = dst.with_suffix(".png.tmp")
fig.savefig(tmp, dpi=110, format="png")
tmp.replace(dst)
print(f"wrote {dst}")
