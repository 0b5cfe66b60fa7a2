#!/usr/bin/env python3
"""Collect the closed loop's figures (tools/loop.sh) into one JSON record for
benches/results/recaption_loop.json: stage times from the loop's log, the fine-tune's
finetune.json, the recaption job's summary, the quality report, the ablation's built-in reports
and the alignment report.

Usage: loop_results.py LOOP_DIR LOG [--note TEXT] >> record.json
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import time
from pathlib import Path


def stage_times(log: Path) -> dict:
    """Seconds between the loop's stage banners (`== HH:MM:SS name: ...`)."""
    marks = []
    for line in log.read_text(errors="replace").splitlines():
        m = re.match(r"^== (\d\d):(\d\d):(\d\d) ([a-z0-9 .+-]+?):", line)
        if m:
            h, mi, s, name = m.groups()
            marks.append((name.strip(), int(h) * 3600 + int(mi) * 60 + int(s)))
    out = {}
    for (name, t), (_, t_next) in zip(marks, marks[1:]):
        out[name] = (t_next - t) % 86400
    if marks:
        out["loop_total"] = (marks[-1][1] - marks[0][1]) % 86400
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("loop", type=Path)
    ap.add_argument("log", type=Path)
    ap.add_argument("--note", default="")
    a = ap.parse_args()
    loop = a.loop
    ft = json.loads((loop / "recaptioner/finetune.json").read_text())
    summary = json.loads((loop / "recaptioned/recap_summary.json").read_text())
    quality = json.loads((loop / "quality/quality.json").read_text())
    alignment = json.loads((loop / "quality/alignment.json").read_text())
    ablation = {}
    for report in sorted((loop / "ablation").glob("seed-*/*/builtin.json")):
        r = json.loads(report.read_text())
        seed, label = report.parts[-3], report.parts[-2]
        ablation.setdefault(label, {})[seed] = {
            "shape": r["classification"][0]["acc1"],
            "color": r["classification"][1]["acc1"],
            "count": r["classification"][2]["acc1"],
            "retrieval_mean_r1": r["retrieval"]["mean_recall_at_1"],
            "aro_attribute": r["aro_attribute"]["accuracy"],
            "aro_relation": r["aro_relation"]["accuracy"],
        }
    fmt = quality["format"]
    rec = {
        "bench": "recaption_loop",
        "unix_time": int(time.time()),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "cpu_model": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor()),
        "note": a.note,
        "stage_seconds": stage_times(a.log),
        "finetune": {
            "parameters": ft["parameters"], "steps": ft["steps_done"], "seconds": ft["seconds"],
            "heldout_loss_start": ft["heldout_loss"][0][1] if isinstance(ft["heldout_loss"][0], list) else ft["heldout_loss"][0],
            "heldout_loss_end": ft["heldout_loss"][-1][1] if isinstance(ft["heldout_loss"][-1], list) else ft["heldout_loss"][-1],
            "generation_check": {k: v for k, v in ft.get("generation_check", {}).items() if not isinstance(v, list)},
        },
        "recaption": {k: summary[k] for k in ("samples", "ok", "errors", "retried", "images_per_s", "tokens_per_s", "elapsed_s", "mean_tokens_per_sample")},
        "quality": {
            "samples": quality["samples"],
            "format_success": fmt["success"],
            "first_attempt_success": (fmt.get("first_attempt") or {}).get("success"),
            "object_recall": quality["object_recall"],
            "long_negative": quality["texts"]["long_negative"],
            "tags_positive": quality["texts"]["tags_positive"],
            "tags_negative": quality["texts"]["tags_negative"],
            "attributes": {k: {"correct": v["correct_rate"], "wrong": v["wrong_rate"]} for k, v in quality["texts"]["attributes"].items()},
        },
        "alignment": [{k: s[k] for k in ("label", "field", "samples", "missing", "mean_cosine", "std_cosine")} for s in alignment["sources"]],
        "ablation": ablation,
    }
    print(json.dumps(rec, indent=1))


if __name__ == "__main__":
    main()
