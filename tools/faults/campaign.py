#!/usr/bin/env python3
"""Fault campaigns on the project's long jobs: kill -9 at random points, disk full, a read-only
output folder, an input shard corrupted or removed while the job runs. After each fault the same
command is rerun without it and its output compared with an uninterrupted reference run.

Usage (after `source tools/env.sh`, with the release binaries built):
  "$HQ_PYTHON" tools/faults/campaign.py [--job synth,recap,train,eval,export,demo]
      [--faults kill,full,ro,input] [--trials N] [--other-trials M] [--seed S]
      [--work DIR] [--json FILE] [--ci]
--trials is the number of kill trials per job (default 20), --other-trials of every other fault
kind (default 3), --demo-trials of kills in the demo's loop (default 6); --ci is a small mode for
tools/test.sh (2 kills and 1 of each other fault per job, no demo).
The mechanics of a trial are in faultlib.py; what each job's "equal" means is in JOBS below.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import faultlib as fl  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def bin_dir() -> Path:
    if os.environ.get("HQ_BIN"):
        return Path(os.environ["HQ_BIN"]).resolve()
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    return target / "release"


BIN = bin_dir()
ENV = dict(os.environ, HQ_NO_PROGRESS="1", RUST_BACKTRACE="0", OMP_NUM_THREADS="1")


# ---------------------------------------------------------------- fixtures (built once per --work)

def fixtures(work: Path) -> Path:
    global FX
    """A tiny corpus, a tiny CLIP run (the input of hq-eval and hq-export) and a tiny random
    Qwen2-VL (the input of hq-recap-trt), made once under WORK/fixtures."""
    fx = work / "fixtures"
    stamp = fx / "done"
    FX = fx
    if stamp.exists():
        return fx
    fl.fresh(fx)
    (fx / "tiny-clip.json").write_text(json.dumps(TINY_MODEL, indent=1) + "\n")
    steps = [
        [str(BIN / "hq-data"), "synth", "--out", str(fx / "corpus"), "--samples", "160",
         "--shard-size", "40", "--eval-samples", "16", "--eval-shard-size", "16", "--no-progress"],
        [str(BIN / "hq-train"), *train_args(), "--train", str(fx / "corpus/train"), "--steps", "4",
         "--out", str(fx / "run")],
        [os.environ.get("HQ_PYTHON", sys.executable),
         str(ROOT / "export/qwen2vl/make_tiny_qwen2vl.py"), "--out", str(fx / "qwen-hf"),
         "--export", str(fx / "qwen"), "--no-verify"],
    ]
    for argv in steps:
        r = fl.run(argv, ENV, 900)
        if r.rc != 0:
            sys.exit(f"fixture step failed: {' '.join(argv)}\n{r.text[-2000:]}")
    stamp.write_text("ok\n")
    return fx


# ---------------------------------------------------------------- the jobs

@dataclass
class Job:
    """One job under test. `argv(out, inp)` is its command writing to the folder `out` and reading
    `inp` (the fixtures, or a private copy of `inputs` for input faults); `rerun` the command a
    user reruns after a failure (default: the same); `growing` the files that legitimately exist
    part-written mid-run (logs appended line by line), checked by parsing instead of equality."""
    name: str
    argv: Callable[[Path, Path], list[str]]
    compare: fl.Compare
    why_excluded: str
    rerun: Callable[[Path, Path], list[str]] | None = None
    inputs: str | None = None          # the fixture folder an input fault damages a copy of
    shards: Callable[[Path], list[Path]] | None = None
    accounted: Callable[[Path], bool] | None = None
    growing: list[str] = field(default_factory=list)
    shards_out: bool = False           # its output is webdataset shards (samples are counted)
    faults: tuple = ("kill", "full", "ro", "input")
    timeout: float = 600
    # Input faults strike uniformly in the first `input_window` of the reference's duration (a job
    # that reads all its input early would otherwise mostly be hit after the read).
    input_window: float = 1.0

    def rerun_argv(self, out, inp):
        return (self.rerun or self.argv)(out, inp)


# hq-tiny cut to 2 layers a tower, 32 px and 32 tokens (tests/tests/train_loop.rs's test model).
TINY_MODEL = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 128, "head_width": 32, "mlp_ratio": 4.0,
                   "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 2,
                 "mlp_ratio": 4.0},
}


def train_args() -> list[str]:
    return ["--model-config", str(FX / "tiny-clip.json"), "--batch-size", "8", "--warmup-steps", "1",
            "--seed", "0", "--quiet", "--threads", "1", "--set", "run.torch_threads=1"]


def train_argv(out: Path, inp: Path) -> list[str]:
    return [str(BIN / "hq-train"), *train_args(), "--train", str(inp / "corpus/train"),
            "--eval-dir", str(inp / "corpus/eval"), "--eval-every", "6", "--eval-samples", "16",
            "--steps", "12", "--checkpoint-every", "4", "--out", str(out)]


def train_rerun(out: Path, inp: Path) -> list[str]:
    # What tools/ablation.sh does: resume a run that has a checkpoint, else start it again.
    argv = train_argv(out, inp)
    if (out / "checkpoints/latest").exists():
        argv[1:1] = ["--resume", str(out)]
    return argv


def recap_argv(out: Path, inp: Path) -> list[str]:
    return [str(BIN / "hq-recap-trt"), "--engine", str(FX / "qwen"),
            "--input", str(inp / "corpus/train/shard-00000.tar"), str(inp / "corpus/train/shard-00001.tar"),
            "--output", str(out), "--max-new-tokens", "24", "--attempts", "1", "--threads", "1",
            "--batch-size", "4", "--no-progress"]


def train_shards(inp: Path) -> list[Path]:
    return sorted((inp / "corpus/train").glob("*.tar"))


def metrics_has_skips(out: Path) -> bool:
    p = out / "metrics.jsonl"
    return p.exists() and any('"skips"' in line for line in p.read_text().splitlines())


def recap_has_errors(out: Path) -> bool:
    # A damaged input stream is listed in <shard>.errors.jsonl (runtime/src/recaption/output.rs).
    return any(out.glob("*.errors.jsonl"))


FX = Path()  # set in main()

JOBS = {
    "synth": Job(
        name="synth",
        argv=lambda out, inp: [str(BIN / "hq-data"), "synth", "--out", str(out), "--samples", "3000",
                               "--shard-size", "250", "--eval-samples", "100", "--eval-shard-size",
                               "50", "--no-progress"],
        compare=fl.Compare(json_drop={r"corpus\.json": []}),
        why_excluded="nothing: the corpus is byte-identical for the same settings",
        faults=("kill", "full", "ro"),
        shards_out=True,
    ),
    "recap": Job(
        name="recap",
        argv=recap_argv,
        compare=fl.Compare(skip=[r".*summary.*\.json"]),
        why_excluded=("recap_summary.json and summary-*.json, reports of the last invocation "
                      "(its samples, resumed samples, skipped inputs, errors by reason, timings); "
                      "every sample's record is in the shards, compared byte for byte"),
        inputs="corpus",
        shards=lambda inp: train_shards(inp)[:2],
        accounted=recap_has_errors,
        shards_out=True,
    ),
    "train": Job(
        name="train",
        argv=train_argv,
        rerun=train_rerun,
        compare=fl.Compare(
            skip=[r"tb/.*"],
            json_drop={
                r"summary\.json": ["first_step", "steps", "samples_per_second", "skipped",
                                   "samples_seen"],
                r"metrics\.jsonl": ["time", "samples_per_s"],
                r"eval/.*\.json": ["seconds"],
                r"checkpoints/.*/train_state\.json": ["train_seconds"],
                r"checkpoints/.*/manifest\.json": ["train_state.json"],
            },
        ),
        why_excluded=("tb/ event files (wall-clock times; their scalars are metrics.jsonl's); the "
                      "timing fields metrics.jsonl time and samples_per_s, eval/*.json seconds, "
                      "train_state.json train_seconds (and so that file's digest in the checkpoint "
                      "manifest); summary.json's per-process fields (first_step, steps, "
                      "samples_per_second, skipped, samples_seen describe the last session)"),
        inputs="corpus",
        shards=train_shards,
        accounted=metrics_has_skips,
        input_window=0.2,
        # `latest` names the newest checkpoint so far: mid-run it is an earlier one.
        growing=[r"metrics\.jsonl", r"checkpoints/latest"],
    ),
    "eval": Job(
        name="eval",
        argv=lambda out, inp: [str(BIN / "hq-eval"), "builtin", "--model", str(FX / "run/checkpoints"),
                               "--corpus", str(inp / "corpus"), "--device", "cpu", "--quiet",
                               "--threads", "1", "--out", str(out / "builtin.json")],
        compare=fl.Compare(json_drop={r"builtin\.json": ["seconds"]}),
        why_excluded="builtin.json's `seconds` (the evaluation's duration)",
        inputs="corpus",
        accounted=lambda out: json.loads((out / "builtin.json").read_text())["bad"]["count"] > 0,
        shards=lambda inp: sorted((inp / "corpus/eval").rglob("*.tar")),
    ),
    "export": Job(
        name="export",
        argv=lambda out, inp: [str(BIN / "hq-export"), "--checkpoint", str(inp / "run"), "--out", str(out)],
        compare=fl.Compare(),
        why_excluded="nothing yet",
        inputs="run",
        shards=lambda inp: sorted((inp / "run/checkpoints").glob("step-*/model.safetensors")),
    ),
}


# ---------------------------------------------------------------- verification of left-over files

def verify_file(rel: str, path: Path) -> str | None:
    """Whether a file the reference does not have (or a growing one) is a finished file."""
    try:
        if path.name == "latest":
            target = path.parent / path.read_text().strip()
            if not (target / "manifest.json").is_file():
                return f"names {target.name}, which is no finished checkpoint"
        elif rel.endswith(".json"):
            json.loads(path.read_text())
        elif rel.endswith(".jsonl"):
            for i, line in enumerate(path.read_text().splitlines()):
                json.loads(line)
        elif rel.endswith(".tar"):
            if fl.tar_members(path) is None:
                return "not a readable tar"
        elif rel.endswith(".safetensors"):
            raw = path.read_bytes()
            n = int.from_bytes(raw[:8], "little")
            header = json.loads(raw[8:8 + n])
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if len(raw) != 8 + n + end:
                return f"safetensors of {len(raw)} bytes, its header says {8 + n + end}"
        elif rel.endswith(".onnx"):
            import onnx
            onnx.load(str(path))
    except Exception as e:  # noqa: BLE001 - any parse failure is the finding
        return f"does not parse: {type(e).__name__}: {str(e)[:120]}"
    return None


def leftovers(job: Job, ref: dict, root: Path) -> list[str]:
    """Files under a final name a fault left that are not finished: a file the reference has must
    equal it (growing ones must parse); any other must parse."""
    bad = []
    for rel in fl.files(root):
        if fl.is_staging(rel) or job.compare._match(job.compare.skip, rel):
            continue
        path = root / rel
        if rel in ref and not job.compare._match(job.growing, rel):
            try:
                same = job.compare.digest(root, rel) == ref[rel]
            except (ValueError, UnicodeDecodeError):
                same = False
            if not same:
                bad.append(f"{rel}: differs from the reference's")
            continue
        problem = verify_file(rel, path)
        if problem:
            bad.append(f"{rel}: {problem}")
    return bad


# ---------------------------------------------------------------- trials

class Campaign:
    """One job's trials. Every run of the job (reference and trials) writes the same folder
    (`out`) and reads the same private copy of its inputs (`inp`), because the jobs record their
    paths in what they write; a trial's leftovers are moved to its own folder when it fails."""

    def __init__(self, job: Job, work: Path, seed: int):
        self.job, self.seed = job, seed
        self.dir = work / job.name
        fl.fresh(self.dir)
        self.out = self.dir / "out"
        self.ref_out = self.dir / "reference"
        self.inp = self.dir / "in"
        self.restore_inputs()
        self.records: list[dict] = []

    def restore_inputs(self):
        if self.inp.exists():
            shutil.rmtree(self.inp)
        self.inp.mkdir()
        if self.job.inputs:
            shutil.copytree(FX / self.job.inputs, self.inp / self.job.inputs, symlinks=True)

    def argv(self):
        return self.job.argv(self.out, self.inp)

    def rerun_argv(self):
        return self.job.rerun_argv(self.out, self.inp)

    def reference(self):
        """The uninterrupted run (twice: files that differ between two clean runs would make every
        comparison fail, so the campaign refuses to start on them)."""
        fl.fresh(self.out)
        r = fl.run(self.argv(), ENV, self.job.timeout, self.dir / "reference.log")
        if r.rc != 0:
            sys.exit(f"{self.job.name}: the reference run failed:\n{r.text[-3000:]}")
        self.out.rename(self.ref_out)
        self.ref_seconds = r.seconds
        self.ref = self.job.compare.snapshot(self.ref_out)
        self.ref_bytes = fl.dir_bytes(self.ref_out)
        fl.fresh(self.out)
        r2 = fl.run(self.argv(), ENV, self.job.timeout)
        d = self.job.compare.diff(self.ref, self.job.compare.snapshot(self.out))
        if r2.rc != 0 or any(d.values()):
            sys.exit(f"{self.job.name}: two clean runs differ: {d}\n{r2.text[-1000:]}")
        print(f"[{self.job.name}] reference: {len(self.ref)} files, {self.ref_bytes} bytes, "
              f"{self.ref_seconds:.2f} s", flush=True)

    def finish(self, rec: dict):
        """Rerun the same command without the fault and compare with the reference."""
        out = self.out
        r = fl.run(self.rerun_argv(), ENV, self.job.timeout)
        rec["rerun_rc"] = r.rc
        got = self.job.compare.snapshot(out)
        if r.rc != 0 and got != self.ref:
            # (A refusal of an output that is already complete and equal is no failure: rerunning a
            # finished synth or training run says so.)
            problem = fl.clear_error(r, ["error"])
            rec["verdict"], rec["rerun_equal"] = "rerun_failed", False
            rec["detail"] = (problem or "") + " | " + r.text.strip()[-400:]
            return
        d = self.job.compare.diff(self.ref, got)
        lost, dup = fl.sample_counts(self.ref_out, out, d["lost"] + d["changed"] + d["extra"])
        rec.update(lost_files=d["lost"], extra_files=d["extra"], changed_files=d["changed"],
                   lost_samples=lost, duplicated_samples=dup)
        rec["rerun_equal"] = not any(d.values())
        if any(d.values()):
            rec["verdict"] = rec.get("verdict") or "differs"
        else:
            rec.setdefault("verdict", "survived")

    def record(self, rec: dict, d: Path, clean=("survived",)):
        """Keeps the trial's record; a trial with a finding keeps its output folder too."""
        if rec["verdict"] not in clean and self.out.exists():
            shutil.move(str(self.out), str(d / "out"))
        elif d.exists():
            shutil.rmtree(d)
        self.records.append(rec)
        v = rec.get("verdict")
        note = rec.get("detail", "")
        print(f"[{self.job.name}] {rec['fault']} #{rec['trial']} {rec.get('param', '')}: {v}"
              + (f" ({note[:300]})" if note and v not in ("survived",) else ""), flush=True)

    def trial_dir(self, fault: str, i: int) -> Path:
        d = self.dir / f"{fault}-{i:03d}"
        fl.fresh(d)
        fl.fresh(self.out)
        return d

    def kill(self, i: int, rng: random.Random):
        d = self.trial_dir("kill", i)
        at = rng.uniform(0, self.ref_seconds)
        rec = {"fault": "kill", "trial": i, "param": f"at={at:.3f}s"}
        r = fl.run_with(self.argv(), ENV, at, fl.kill_group, self.job.timeout)
        rec["killed"] = r.killed
        bad = leftovers(self.job, self.ref, self.out)
        self.finish(rec)
        if bad:
            rec["verdict"], rec["detail"] = "half_written", "; ".join(bad)[:500]
        self.record(rec, d)

    def stop_fault(self, fault: str, i: int, rng: random.Random):
        """Disk full or read-only output: the job must stop with an error naming the problem and
        leave nothing half-written; after the fault is gone a rerun completes equal."""
        d = self.trial_dir(fault, i)
        rec = {"fault": fault, "trial": i}
        if fault == "full":
            frac = rng.uniform(0.0, 0.9)
            size = int(self.ref_bytes * frac)
            left = d / "left"
            left.mkdir()
            rec["param"] = f"{size // 4096 * 4096} bytes free ({frac:.0%} of the output)"
            r = fl.run(fl.tmpfs_wrap(self.argv(), self.out, size, left), ENV, self.job.timeout)
            words = ["no space left", "disk full", "enospc"]
        else:
            # Half the trials on an empty folder, half on one a killed run left half done.
            if i % 2 == 1:
                at = rng.uniform(0, self.ref_seconds)
                fl.run_with(self.argv(), ENV, at, fl.kill_group, self.job.timeout)
                rec["param"] = f"after a kill at {at:.3f}s"
            else:
                rec["param"] = "empty folder"
            left = self.out
            r = fl.run(fl.readonly_wrap(self.rerun_argv(), self.out), ENV, self.job.timeout)
            words = ["read-only"]
        rec["rc"] = r.rc
        if r.rc == 0:
            stop = "not_triggered" if fault == "full" else "wrote_to_readonly"
        elif self.job.compare.snapshot(left) == self.ref:
            # The kill before a read-only trial came after the job had finished: the rerun
            # refused a complete output ("already holds a corpus") before writing anything.
            stop = "not_triggered"
            rec["message"] = r.text.strip()[-300:]
        else:
            problem = fl.clear_error(r, words)
            stop = "clear_error" if problem is None else "unclear_error"
            rec["message"] = r.text.strip()[-300:]
            if problem:
                rec["detail"] = problem
        bad = leftovers(self.job, self.ref, left)
        if fault == "full":
            # The user frees space: what the job left stays in place for the rerun.
            shutil.copytree(left, self.out, dirs_exist_ok=True, symlinks=True)
        self.finish(rec)
        if rec["verdict"] == "survived":
            rec["verdict"] = stop
        if bad:
            rec["verdict"], rec["detail"] = "half_written", "; ".join(bad)[:500]
        self.record(rec, d, clean=("clear_error", "not_triggered"))

    def input_fault(self, i: int, rng: random.Random):
        """An input shard truncated, garbled or removed while the job runs: a clear error naming
        it, or a finished run whose output accounts for the damage (or equals the reference: the
        job had read it already); after the input is restored a rerun completes."""
        d = self.trial_dir("input", i)
        target = rng.choice(self.job.shards(self.inp))
        mode = ["truncate", "garble", "remove"][i % 3]
        at = rng.uniform(0, self.ref_seconds * self.job.input_window)
        rec = {"fault": "input", "trial": i, "param": f"{mode} {target.relative_to(self.inp)} at {at:.3f}s"}
        noise = bytes(rng.randrange(256) for _ in range(4096))

        def damage(_pid):
            if mode == "remove":
                target.unlink()
                return
            size = target.stat().st_size
            with open(target, "r+b") as f:
                if mode == "truncate":
                    f.truncate(size // 2)
                else:
                    f.seek(size // 3)
                    f.write(noise[:max(1, size // 3)])

        r = fl.run_with(self.argv(), ENV, at, damage, self.job.timeout)
        rec["rc"] = r.rc
        if r.rc != 0:
            problem = fl.clear_error(r, [target.name])
            first = "clear_error" if problem is None else "unclear_error"
            rec["message"] = r.text.strip()[-300:]
            if problem:
                rec["detail"] = problem
        else:
            diff = self.job.compare.diff(self.ref, self.job.compare.snapshot(self.out))
            lost, dup = fl.sample_counts(self.ref_out, self.out, diff["lost"] + diff["changed"])
            if not any(diff.values()):
                first = "unaffected"
            elif self.job.accounted and self.job.accounted(self.out):
                first = "accounted"
            elif lost == dup == 0 and self.job.shards_out:
                # Every sample is there; bytes that changed inside a member (an image) are carried
                # through as the job read them: nothing can tell them from the original.
                first = "carried_through"
            else:
                first = "silent"
                rec["detail"] = (f"finished, output differs ({lost} samples lost, {dup} duplicated), "
                                 f"nothing records the damage: {diff}")
        self.restore_inputs()
        self.finish(rec)
        # A clear stop must be followed by a rerun equal to the reference; after a finished run
        # that accounted for the damage the rerun's outcome is recorded (a job that skips
        # finished work keeps the accounted result, and its samples the damage took are
        # accounted for, not lost).
        if rec["verdict"] == "survived" or first not in ("clear_error", "unclear_error"):
            rec["verdict"] = first
        if first in ("accounted", "carried_through", "unaffected"):
            rec["accounted_samples"] = rec.pop("lost_samples", 0)
        self.record(rec, d, clean=("clear_error", "unaffected", "accounted", "carried_through"))


# ---------------------------------------------------------------- the demo (tools/loop.sh)

def demo_campaign(work: Path, trials: int, rng: random.Random) -> dict:
    """The closed loop with tests/loop_resume.sh's tiny settings (tests/loop_tiny.sh): one
    uninterrupted run, then kills at random times uniform over its duration, each followed by a
    rerun and the same byte-for-byte comparison of the loop's outputs as loop_resume.sh's."""
    d = work / "demo"
    fl.fresh(d)
    corpus = d / "corpus"
    shutil.copytree(FX / "corpus", corpus)
    env = dict(ENV, HQ_BIN=str(BIN))
    script = f"source {ROOT}/tests/loop_tiny.sh {corpus} {d}"
    argv = ["bash", "-c", f"{script} && exec bash {ROOT}/tools/loop.sh {corpus}"]
    digest = ["bash", "-c", f"{script} && loop_tiny_digest"]
    r = fl.run(argv, env, 1200, d / "reference.log")
    if r.rc != 0:
        sys.exit(f"demo: the reference run failed:\n{r.text[-3000:]}")
    ref = fl.run(digest, env, 60).text
    ref_seconds = r.seconds
    print(f"[demo] reference: {len(ref.splitlines())} outputs, {ref_seconds:.1f} s", flush=True)
    records = []
    for i in range(trials):
        shutil.rmtree(corpus / "loop")
        at = rng.uniform(0, ref_seconds)
        k = fl.run_with(argv, env, at, fl.kill_group, 1200)
        stage = [line for line in k.text.splitlines() if line.startswith("== ")][-1:] or ["(none)"]
        rr = fl.run(argv, env, 1200, d / f"rerun-{i}.log")
        got = fl.run(digest, env, 60).text if rr.rc == 0 else ""
        rec = {"fault": "kill", "trial": i, "param": f"at={at:.1f}s in {stage[0][:60]}",
               "killed": k.killed, "rerun_rc": rr.rc}
        if rr.rc != 0:
            rec["verdict"], rec["detail"] = "rerun_failed", rr.text[-400:]
        elif got != ref:
            rec["verdict"] = "differs"
            rec["changed_files"] = sorted(set(got.splitlines()) ^ set(ref.splitlines()))
        else:
            rec["verdict"] = "survived"
        rec["rerun_equal"] = rec["verdict"] == "survived"
        records.append(rec)
        print(f"[demo] kill #{i} {rec['param']}: {rec['verdict']}", flush=True)
    return {"reference_seconds": round(ref_seconds, 2), "records": records,
            "equal": "the loop's final outputs byte for byte (tests/loop_tiny.sh loop_tiny_digest)"}


# ---------------------------------------------------------------- summary

# Verdicts that are no finding: the rerun completed equal (survived), a stop with an error naming
# the problem (clear_error), a disk that never filled (not_triggered), and for input faults a run
# the damage did not reach (unaffected), one that recorded it (accounted) or one that carried
# changed member bytes through with every sample present (carried_through).
OK = ("survived", "clear_error", "not_triggered", "unaffected", "accounted", "carried_through")


def summarise(records: list[dict]) -> dict:
    """Per fault kind: trials; survived (the rerun without the fault completed with output equal
    to the reference); clear_error (the faulted run stopped with an error naming the problem);
    lost and duplicated samples after the rerun; findings (verdicts outside OK)."""
    by: dict[str, dict] = {}
    for r in records:
        s = by.setdefault(r["fault"], {"trials": 0, "survived": 0, "clear_error": 0, "lost_samples": 0,
                                       "duplicated_samples": 0, "findings": 0, "verdicts": {}})
        s["trials"] += 1
        v = r["verdict"]
        s["verdicts"][v] = s["verdicts"].get(v, 0) + 1
        s["survived"] += bool(r.get("rerun_equal"))
        s["clear_error"] += v == "clear_error"
        s["findings"] += v not in OK
        s["lost_samples"] += r.get("lost_samples", 0)
        s["duplicated_samples"] += r.get("duplicated_samples", 0)
        if r["fault"] == "kill":  # kills that came while the job ran (the rest came after its end)
            s["landed"] = s.get("landed", 0) + bool(r.get("killed"))
    return by


def table(result: dict) -> str:
    """The results as a Markdown table, one row per job and fault kind."""
    rows = ["| job | fault | trials | kills that landed | survived (rerun equal) | clear-error stops | "
            "lost samples | duplicated samples | findings | verdicts |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for job, v in result["jobs"].items():
        for fault, s in v["summary"].items():
            verdicts = ", ".join(f"{k} {n}" for k, n in sorted(s["verdicts"].items()))
            rows.append(f"| {job} | {fault} | {s['trials']} | {s.get('landed', '')} | {s['survived']} | "
                        f"{s['clear_error']} | "
                        f"{s['lost_samples']} | {s['duplicated_samples']} | {s['findings']} | {verdicts} |")
    return "\n".join(rows)


def save(result: dict, path: Path | None, started: float):
    """Writes the results so far (after every job, so an interrupted campaign keeps its figures)."""
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")


def main():
    global FX
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--job", default="synth,recap,train,eval,export,demo")
    ap.add_argument("--faults", default="kill,full,ro,input")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--other-trials", type=int, default=3)
    ap.add_argument("--demo-trials", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, removed "
                    "at the end when no trial found anything)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--ci", action="store_true")
    ap.add_argument("--table", type=Path, metavar="JSON", help="print a results file as a Markdown "
                    "table and exit")
    a = ap.parse_args()
    if a.table:
        print(table(json.loads(a.table.read_text())))
        return
    if a.ci:
        a.trials, a.other_trials = 2, 1
        a.job = ",".join(j for j in a.job.split(",") if j != "demo")
    for b in ["hq-data", "hq-train", "hq-eval", "hq-export", "hq-recap-trt"]:
        if not (BIN / b).exists():
            sys.exit(f"{BIN / b} is missing: build the release binaries (README) or set HQ_BIN")
    scratch = a.work is None
    if scratch:
        import tempfile
        a.work = Path(tempfile.mkdtemp(prefix="hq-faults-"))
    a.work.mkdir(parents=True, exist_ok=True)
    FX = fixtures(a.work)
    faults = a.faults.split(",")
    started = time.monotonic()
    result = {
        "date": subprocess.run(["date"], capture_output=True, text=True).stdout.strip(),
        "machine": next((line.split(":", 1)[1].strip() for line in
                         subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                         if line.startswith("Model name")), "unknown"),
        "cores": os.cpu_count(),
        "commit": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                 capture_output=True, text=True).stdout.strip(),
        "seed": a.seed,
        "mechanisms": {
            "kill": "SIGKILL to the job's process group, time uniform over the reference's duration",
            "full": "a tmpfs on the output folder (unshare -m) with 0-90% of the reference's output size free (whole pages)",
            "ro": "the output folder bind-mounted read-only onto itself (unshare -m); root ignores chmod",
            "input": "a private copy of the inputs; one shard truncated to half, 4 KiB overwritten "
                     "with random bytes, or removed, at a random time",
        },
        "jobs": {},
    }
    for name in a.job.split(","):
        rng = random.Random(f"{a.seed}-{name}")
        if name == "demo":
            demo = demo_campaign(a.work, 1 if a.ci else a.demo_trials, rng)
            demo["summary"] = summarise(demo["records"])
            result["jobs"]["demo"] = demo
            save(result, a.json, started)
            continue
        job = JOBS[name]
        c = Campaign(job, a.work, a.seed)
        c.reference()
        for fault in faults:
            if fault not in job.faults:
                continue
            n = a.trials if fault == "kill" else a.other_trials
            for i in range(n):
                if fault == "kill":
                    c.kill(i, rng)
                elif fault == "input":
                    c.input_fault(i, rng)
                else:
                    c.stop_fault(fault, i, rng)
        result["jobs"][name] = {
            "reference_seconds": round(c.ref_seconds, 3), "reference_files": len(c.ref),
            "equal": "every output file byte for byte, except: " + job.why_excluded,
            "summary": summarise(c.records), "records": c.records,
        }
        save(result, a.json, started)
    save(result, a.json, started)
    bad = [(j, r) for j, v in result["jobs"].items() for r in v["records"] if r["verdict"] not in OK]
    print(f"faults: {sum(len(v['records']) for v in result['jobs'].values())} trials in "
          f"{result['wall_seconds']} s; {len(bad)} findings")
    for j, r in bad:
        print(f"  {j} {r['fault']} #{r['trial']} {r.get('param', '')}: {r['verdict']} {r.get('detail', '')[:300]}")
    if bad:
        print(f"  the trials' outputs are kept under {a.work}")
    elif scratch:
        shutil.rmtree(a.work)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
