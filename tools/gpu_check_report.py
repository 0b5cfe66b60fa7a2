#!/usr/bin/env python3
"""Bookkeeping of the GPU acceptance run (tools/gpu-check.sh): the pack's manifest, the machine's
description, each step's record, and the summary. Standard library only: it runs on the GPU
machine's python as well as on the build machine's.

  gpu_check_report.py manifest PACK --profile P --commit C --limit BYTES [--enforce-limit]
  gpu_check_report.py verify PACK
  gpu_check_report.py env --out F --pack PACK --gpus N --dry-run 0|1
  gpu_check_report.py smoke RUN_DIR --out F
  gpu_check_report.py recap OUT_DIR --provider P --out F
  gpu_check_report.py ort-probe
  gpu_check_report.py step NAME --log F --rc N --seconds S --cap S
  gpu_check_report.py summary OUT
  gpu_check_report.py expect OUT --passed a,b --skipped c,d [--files f,g]
"""
import argparse
import datetime
import glob
import hashlib
import json
import os
import platform
import subprocess
import sys

# The runtime is built against ONNX Runtime's C API 31 (runtime/Cargo.toml: ort "api-31").
ORT_MIN = (1, 31)


def write_json(path, value):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def members(pack):
    for dirpath, dirnames, filenames in os.walk(pack):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, pack)
            if rel != "manifest.json":
                yield rel, path


def cmd_manifest(a):
    files = {rel: {"bytes": os.path.getsize(p), "sha256": sha256(p)} for rel, p in members(a.pack)}
    total = sum(f["bytes"] for f in files.values())
    manifest = {
        "format": "hq-gpu-check-pack-1",
        "commit": a.commit,
        "profile": a.profile,
        "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "build_machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
        "total_bytes": total,
        "limit_bytes": a.limit,
        "files": files,
    }
    write_json(os.path.join(a.pack, "manifest.json"), manifest)
    biggest = sorted(files.items(), key=lambda kv: -kv[1]["bytes"])[:8]
    for rel, f in biggest:
        print(f"  {f['bytes'] / 2**20:7.2f} MiB  {rel}")
    print(f"  {total / 2**20:7.2f} MiB  in all ({len(files)} files; limit {a.limit / 2**20:.0f} MiB)")
    if total > a.limit:
        msg = f"gpu-check pack: {total} bytes is over the {a.limit}-byte limit"
        if a.enforce_limit:
            sys.exit(msg)
        print(f"{msg} (not enforced for the {a.profile} profile; a release pack must fit)")


def cmd_verify(a):
    with open(os.path.join(a.pack, "manifest.json")) as f:
        manifest = json.load(f)
    bad = []
    for rel, want in manifest["files"].items():
        path = os.path.join(a.pack, rel)
        if not os.path.isfile(path):
            bad.append(f"{rel}: missing")
        elif os.path.getsize(path) != want["bytes"] or sha256(path) != want["sha256"]:
            bad.append(f"{rel}: differs from the manifest")
    for line in bad:
        print(f"gpu-check: {line}", file=sys.stderr)
    sys.exit(1 if bad else 0)


def run_text(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def cmd_env(a):
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dry_run": a.dry_run == 1,
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "gpus_seen_by_torch": a.gpus,
    }
    with open(os.path.join(a.pack, "manifest.json")) as f:
        m = json.load(f)
    env["pack"] = {"commit": m["commit"], "profile": m["profile"], "built": m["built"], "bytes": m["total_bytes"]}
    smi = run_text(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap", "--format=csv,noheader"])
    env["nvidia_smi"] = smi.splitlines() if smi else "not available"
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version() if torch.cuda.is_available() else None
        env["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None
        env["gpus"] = [
            {
                "name": torch.cuda.get_device_name(i),
                "capability": ".".join(map(str, torch.cuda.get_device_capability(i))),
                "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1),
            }
            for i in range(torch.cuda.device_count())
        ]
    except Exception as e:  # the step reports it; the run goes on
        env["torch_error"] = repr(e)
    write_json(a.out, env)
    print(json.dumps(env, indent=1))


def cmd_smoke(a):
    """The hq-train run's loss must fall: mean contrastive loss of the last 3 logged steps below
    90% of the first 3 (ln(batch) at the start)."""
    rows = []
    with open(os.path.join(a.run, "metrics.jsonl")) as f:
        for line in f:
            m = json.loads(line)
            if m.get("kind") == "train":
                rows.append(m)
    if len(rows) < 6:
        sys.exit(f"smoke: only {len(rows)} training log lines in {a.run}/metrics.jsonl")
    first = sum(r["loss_clip"] for r in rows[:3]) / 3
    last = sum(r["loss_clip"] for r in rows[-3:]) / 3
    rates = [r["samples_per_s"] for r in rows[1:]]
    evals = []
    summary = os.path.join(a.run, "summary.json")
    if os.path.exists(summary):
        with open(summary) as f:
            s = json.load(f)
        evals = s.get("eval") or s.get("final_eval") or []
    result = {
        "steps": rows[-1]["step"],
        "loss_clip_first3": first,
        "loss_clip_last3": last,
        "loss": [[r["step"], r["loss"]] for r in rows],
        "hni_gate_open_last": rows[-1].get("hni_gate_open"),
        "samples_per_s_median": sorted(rates)[len(rates) // 2] if rates else None,
        "loss_fell": last < 0.9 * first,
        "eval": evals,
    }
    write_json(a.out, result)
    print(json.dumps({k: v for k, v in result.items() if k != "loss"}))
    if not result["loss_fell"]:
        sys.exit(f"smoke: the contrastive loss did not fall ({first:.3f} -> {last:.3f})")


def cmd_recap(a):
    with open(os.path.join(a.dir, "recap_summary.json")) as f:
        s = json.load(f)
    keep = ["provider", "samples", "ok", "errors", "images_per_s", "tokens_per_s", "elapsed_s"]
    result = {k: s.get(k) for k in keep}
    write_json(a.out, result)
    print(json.dumps(result))
    if not s.get("samples"):
        sys.exit(f"recap: no sample was processed with provider {a.provider}")


def cmd_ort_probe(_a):
    """Lines key=value: version, providers, dylib, usable (0/1), why (when not usable)."""
    try:
        import onnxruntime as ort
    except ImportError:
        print("usable=0")
        print("why=no onnxruntime module in this python (the GPU build, onnxruntime-gpu >= 1.31, "
              "is needed; or point HQ_GPU_ORT_DYLIB at its libonnxruntime.so)")
        return
    version = ort.__version__
    providers = ort.get_available_providers()
    libs = sorted(glob.glob(os.path.join(os.path.dirname(ort.__file__), "capi", "libonnxruntime.so*")))
    print(f"version={version}")
    print(f"providers={','.join(providers)}")
    print(f"dylib={libs[-1] if libs else ''}")
    try:
        parts = tuple(int(x) for x in version.split(".")[:2])
    except ValueError:
        parts = (0, 0)
    gpu = [p for p in providers if p in ("CUDAExecutionProvider", "TensorrtExecutionProvider")]
    if parts < ORT_MIN:
        why = (f"onnxruntime {version} is older than {ORT_MIN[0]}.{ORT_MIN[1]} (the runtime uses its C API "
               f"{ORT_MIN[1]}); it offers {', '.join(providers)}")
    elif not libs:
        why = f"onnxruntime {version} has no libonnxruntime.so beside it"
    elif not gpu:
        why = (f"onnxruntime {version} offers only {', '.join(providers)}: the GPU build (onnxruntime-gpu "
               f">= 1.31) is not installed")
    else:
        why = ""
    print(f"usable={1 if parts >= ORT_MIN and libs else 0}")
    print(f"why={why or 'GPU providers available'}")


def cmd_step(a):
    with open(a.log, errors="replace") as f:
        lines = f.read().splitlines()
    status, why = "passed", ""
    if a.rc in (124, 137):
        status, why = "timed out", f"stopped at its {a.cap} s cap"
    elif a.rc != 0:
        status = "failed"
        why = next((l for l in reversed(lines) if l.strip()), f"exit status {a.rc}")[:300]
    else:
        for l in lines:
            if l.startswith("STEP-STATUS: skipped"):
                status, why = "skipped", l[len("STEP-STATUS: skipped"):].strip()
    notes = [l[len("NOTE:"):].strip() for l in lines if l.startswith("NOTE:")]
    print(json.dumps({"step": a.name, "status": status, "why": why, "notes": notes,
                      "seconds": a.seconds, "cap_seconds": a.cap, "exit": a.rc}))


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def cmd_summary(a):
    out = a.out
    with open(os.path.join(out, "steps.jsonl")) as f:
        steps = [json.loads(l) for l in f if l.strip()]
    summary = {
        "env": load(os.path.join(out, "env.json")),
        "steps": steps,
        "losses": load(os.path.join(out, "losses.json")),
        "train_smoke": load(os.path.join(out, "train_smoke.json")),
        "gpu_train": load(os.path.join(out, "gpu_train.json")),
        "ort": {p: load(os.path.join(out, f"ort_{p}.json")) for p in ("cpu", "cuda", "tensorrt")},
        "total_seconds": sum(s["seconds"] for s in steps),
    }
    write_json(os.path.join(out, "summary.json"), summary)
    md = ["# GPU acceptance run", ""]
    env = summary["env"] or {}
    md.append(f"- date: {env.get('date')}; dry run: {env.get('dry_run')}; pack commit {((env.get('pack') or {}).get('commit') or '')[:10]}")
    md.append(f"- GPUs: {env.get('gpus') or env.get('nvidia_smi')}; torch {env.get('torch')} (CUDA {env.get('torch_cuda')}, NCCL {env.get('nccl')})")
    md += ["", "| step | status | seconds (cap) | why / notes |", "|---|---|---:|---|"]
    for s in steps:
        text = "; ".join([x for x in [s["why"]] + s["notes"] if x])
        md.append(f"| {s['step']} | {s['status']} | {s['seconds']} ({s['cap_seconds']}) | {text} |")
    losses = summary["losses"]
    if losses:
        md += ["", f"## Fused vs unfused contrastive loss on {losses['device']} (forward+backward, median ms)", "",
               "| D | N | fused | unfused | speedup | fused peak MiB | unfused peak MiB |", "|---:|---:|---:|---:|---:|---:|---:|"]
        for r in losses["rows"]:
            f = lambda k, p=1: "-" if r.get(k) is None else f"{r[k]:.{p}f}"  # noqa: E731
            md.append(f"| {r['d']} | {r['n']} | {f('fused_ms', 2)} | {f('libtorch_unfused_ms', 2)} | "
                      f"{f('speedup', 2)} | {f('fused_peak_mib')} | {f('libtorch_unfused_peak_mib')} |")
        for l in losses["largest_n"]:
            md.append(f"- largest N completed by {l['side']} at D = {l['d']}: {l['largest_completed']} ({l['stopped_by']})")
    smoke = summary["train_smoke"]
    if smoke:
        md += ["", f"## hq-train: {smoke['steps']} steps, contrastive loss {smoke['loss_clip_first3']:.3f} -> "
               f"{smoke['loss_clip_last3']:.3f}, median {smoke['samples_per_s_median']:.0f} samples/s"]
    g = summary["gpu_train"]
    if g:
        o, t = g["ours"], g["open_clip"]
        md += ["", f"## Training step, {g['preset']} on {g['device']} ({g['precision']})", "",
               f"- ours: largest batch {o.get('largest_batch')}, {o.get('samples_per_s')} samples/s",
               f"- open_clip: largest batch {t.get('largest_batch')}, {t.get('samples_per_s_at_batch')} samples/s "
               f"at our batch, {t.get('samples_per_s_at_largest')} at its own ({t.get('skipped') or t.get('failed') or 'ran'})",
               f"- ours / open_clip at our batch: {g.get('ours_over_open_clip_at_our_batch')}"]
    for p, r in summary["ort"].items():
        if r:
            md.append(f"- ONNX Runtime {p}: {r.get('images_per_s')} images/s over {r.get('samples')} samples")
    with open(os.path.join(out, "SUMMARY.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


def cmd_expect(a):
    """The dry run's check (tools/test.sh): each step ended as expected and wrote its results."""
    with open(os.path.join(a.out, "summary.json")) as f:
        summary = json.load(f)
    got = {s["step"]: s for s in summary["steps"]}
    want = {n: "passed" for n in a.passed.split(",") if n}
    want.update({n: "skipped" for n in a.skipped.split(",") if n})
    bad = [f"step {n}: {got[n]['status'] if n in got else 'missing'} (expected {w}; "
           f"{got.get(n, {}).get('why', '')})" for n, w in want.items() if got.get(n, {}).get("status") != w]
    bad += [f"no {f}" for f in a.files.split(",") if f and not os.path.isfile(os.path.join(a.out, f))]
    for s in summary["steps"]:
        if s["status"] == "skipped" and not s["why"]:
            bad.append(f"step {s['step']} was skipped without a reason")
    for line in bad:
        print(f"gpu-check dry run: {line}", file=sys.stderr)
    sys.exit(1 if bad else 0)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("manifest")
    p.add_argument("pack")
    p.add_argument("--profile", required=True)
    p.add_argument("--commit", required=True)
    p.add_argument("--limit", type=int, required=True)
    p.add_argument("--enforce-limit", action="store_true")
    p = sub.add_parser("verify")
    p.add_argument("pack")
    p = sub.add_parser("env")
    p.add_argument("--out", required=True)
    p.add_argument("--pack", required=True)
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--dry-run", type=int, required=True)
    p = sub.add_parser("smoke")
    p.add_argument("run")
    p.add_argument("--out", required=True)
    p = sub.add_parser("recap")
    p.add_argument("dir")
    p.add_argument("--provider", required=True)
    p.add_argument("--out", required=True)
    sub.add_parser("ort-probe")
    p = sub.add_parser("step")
    p.add_argument("name")
    p.add_argument("--log", required=True)
    p.add_argument("--rc", type=int, required=True)
    p.add_argument("--seconds", type=int, required=True)
    p.add_argument("--cap", type=int, required=True)
    p = sub.add_parser("summary")
    p.add_argument("out")
    p = sub.add_parser("expect")
    p.add_argument("out")
    p.add_argument("--passed", default="")
    p.add_argument("--skipped", default="")
    p.add_argument("--files", default="")
    a = ap.parse_args()
    {
        "manifest": cmd_manifest, "verify": cmd_verify, "env": cmd_env, "smoke": cmd_smoke,
        "recap": cmd_recap, "ort-probe": cmd_ort_probe, "step": cmd_step, "summary": cmd_summary,
        "expect": cmd_expect,
    }[a.cmd](a)


if __name__ == "__main__":
    main()
