"""Folds the two campaign records into benches/results/reliability.json and prints the tables of
RELIABILITY.md: fuzzing (fuzz/campaign.json, written by fuzz/campaign.sh runs) and fault
injection (benches/results/reliability_faults.json, written by tools/faults.sh --json).

Usage: python tools/reliability_summary.py [--out benches/results/reliability.json]
"""

import argparse
import json
from collections import OrderedDict

FUZZ = "fuzz/campaign.json"
FAULTS = "benches/results/reliability_faults.json"
# Which crate owns the parsers of each fuzz target module (fuzz/src/targets/<module>.rs).
OWNERS = {"data": "hq-data", "eval": "hq-eval", "train": "hq-train", "runtime": "hq-runtime"}
FAULT_KINDS = ["kill", "full", "ro", "input"]


def target_owners() -> dict:
    owners = {}
    for module, crate in OWNERS.items():
        with open(f"fuzz/src/targets/{module}.rs", encoding="utf-8") as f:
            for line in f:
                if line.startswith("pub fn "):
                    owners[line[len("pub fn "):].split("(")[0]] = crate
    return owners


def fuzz_by_crate(fuzz: dict) -> "OrderedDict[str, dict]":
    owners = target_owners()
    rows = OrderedDict((c, {"targets": set(), "runs": 0, "inputs": 0, "seconds": 0, "crashes": 0})
                       for c in OWNERS.values())
    for crate in rows:
        rows[crate]["targets"] = {t for t, c in owners.items() if c == crate}
    for run in fuzz["runs"]:
        row = rows[owners[run["target"]]]
        row["runs"] += 1
        row["inputs"] += run["executions"]
        row["seconds"] += run["seconds"]
        row["crashes"] += len(run["crashes"])
    for row in rows.values():
        row["targets"] = sorted(row["targets"])
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benches/results/reliability.json")
    args = ap.parse_args()
    fuzz = json.load(open(FUZZ, encoding="utf-8"))
    faults = json.load(open(FAULTS, encoding="utf-8"))
    crates = fuzz_by_crate(fuzz)
    jobs = OrderedDict((job, rec["summary"]) for job, rec in faults["jobs"].items())
    doc = {
        "sources": {"fuzz": FUZZ, "faults": FAULTS},
        "fuzz": {"date": fuzz["date"], "machine": fuzz["machine"], "engine": fuzz["engine"],
                 "totals": fuzz["totals"], "by_crate": crates, "crashes": fuzz["crashes"]},
        "faults": {"date": faults["date"], "machine": faults["machine"], "seed": faults["seed"],
                   "mechanisms": faults["mechanisms"], "totals": faults["totals"],
                   "by_job": jobs, "bugs": faults["bugs"]},
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")

    print("| crate | targets | campaign runs | inputs tried | seconds | crashes in the runs |")
    print("|---|---:|---:|---:|---:|---:|")
    for crate, r in crates.items():
        print(f"| {crate} | {len(r['targets'])} | {r['runs']} | {r['inputs']:,} | {r['seconds']:,} "
              f"| {r['crashes']} |")
    t = fuzz["totals"]
    print(f"| **all** | **{sum(len(r['targets']) for r in crates.values())}** | "
          f"**{t['campaign_runs']}** | **{t['inputs_tried']:,}** | **{t['campaign_seconds']:,}** "
          f"| **{sum(r['crashes'] for r in crates.values())}** |")
    print()
    print(f"Crashes found in all: {t['crashes_found']} ({t['found_by_campaign']} by the campaign runs, "
          f"{t['found_by_targets_under_cargo_test']} by the targets under `cargo test`), "
          f"{t['crashes_fixed']} fixed.")
    print()
    print("| job | kill -9 (survived/trials) | disk full | read-only output | damaged input |")
    print("|---|" + "---|" * len(FAULT_KINDS))
    for job, s in jobs.items():
        cells = []
        for k in FAULT_KINDS:
            if k not in s:
                cells.append("—")
                continue
            c = s[k]
            if k == "input":
                # Damage is survived by being recorded (an error record, the rerun keeps it), by
                # a clear error, or not reached (the job had read that shard already).
                verdicts = ", ".join(f"{n} {v}" for v, n in sorted(c["verdicts"].items()))
                cells.append(f"{c['trials']}: {verdicts}; lost {c['lost_samples']}")
                continue
            extra = f", {c['clear_error']} clear errors" if c["clear_error"] else ""
            landed = f" ({c['landed']} landed)" if "landed" in c else ""
            cells.append(f"{c['survived']}/{c['trials']}{landed}{extra}; lost {c['lost_samples']}, "
                         f"dup {c['duplicated_samples']}")
        print(f"| {job} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
