"""The per-trial mechanics of the fault campaigns, shared by every job (tools/faults/campaign.py).

A trial runs a job's command under one fault, inspects what the fault left behind, reruns the same
command without the fault and compares the output with an uninterrupted reference run. Faults:

- kill:   SIGKILL to the job's whole process group at a seeded time uniform over the reference's
          duration (the job runs in its own session, so helper threads and children die with it).
- full:   the output folder is a small tmpfs (a fraction of the reference's output size) in a
          private mount namespace (`unshare -m`), so the job meets ENOSPC mid-run and nothing else
          on the machine sees the mount. What it left is copied out before the namespace ends.
- ro:     the output folder is bind-mounted read-only onto itself in a private mount namespace.
          chmod does not stop root (CAP_DAC_OVERRIDE); a read-only mount does (EROFS).
- input:  one input shard is truncated, overwritten in the middle or removed at a seeded time
          while the job runs (the job reads a private copy of its inputs).

"Complete-looking" files are those under their final names: a path with a component starting with
"." (the project's staging names: `.NAME.tmp-PID`, `.step-N.partial-PID`) is work in progress.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Run:
    rc: int
    text: str
    seconds: float
    killed: bool = False


def run(argv: list[str], env: dict, timeout: float, log: Path | None = None) -> Run:
    """Runs argv to completion in its own session; stdout and stderr together."""
    return run_with(argv, env, None, None, timeout, log)


def kill_group(pid: int):
    os.killpg(pid, signal.SIGKILL)


def run_with(argv, env, at: float | None, action, timeout: float, log: Path | None = None) -> Run:
    """Runs argv in its own session; `at` seconds in (if it is still running) calls action(pid),
    e.g. kill_group, then waits for the end. Run.killed says whether the action fired."""
    started = time.monotonic()
    sink = open(log, "w+b") if log else None
    p = subprocess.Popen(argv, env=env, stdout=sink or subprocess.PIPE,
                         stderr=subprocess.STDOUT, start_new_session=True)
    fired = False
    deadline = started + timeout
    try:
        if at is not None:
            try:
                p.wait(timeout=at)
            except subprocess.TimeoutExpired:
                action(p.pid)
                fired = True
        left = max(1.0, deadline - time.monotonic())
        if sink:
            p.wait(timeout=left)
            sink.seek(0)
            text = sink.read().decode("utf-8", "replace")
        else:
            text = p.communicate(timeout=left)[0].decode("utf-8", "replace")
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        raise RuntimeError(f"{shlex.join(argv)[:200]} ran past {timeout:.0f} s")
    finally:
        if sink:
            sink.close()
    # A killed leader can leave children of the group behind; they go too.
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return Run(p.returncode, text, time.monotonic() - started, fired)


def in_namespace(argv: list[str], mount: str, copy_out: Path | None = None,
                 before_copy: str = "true") -> list[str]:
    """argv run in a private mount namespace after `mount` (a shell line); with copy_out, what the
    job left in the mounted folder is copied there before the namespace (and the mount) ends."""
    tail = ""
    if copy_out is not None:
        tail = (f"; rc=$?; {before_copy}; cp -a \"$HQ_FAULT_DIR\"/. {shlex.quote(str(copy_out))}/; "
                "exit $rc")
    script = f"set -e; {mount}; set +e; {shlex.join(argv)}{tail}"
    return ["unshare", "-m", "--propagation", "private", "bash", "-c", script]


def tmpfs_wrap(argv, folder: Path, free_bytes: int, copy_out: Path) -> list[str]:
    """A tmpfs with `free_bytes` (rounded down to pages, possibly none) free. tmpfs sizes are whole
    pages and size=0 means unlimited, so it is two pages larger and a hidden filler takes them."""
    q = shlex.quote(str(folder))
    size = (free_bytes // 4096 + 2) * 4096
    filler = shlex.quote(str(folder / ".hq-fault-filler"))
    return in_namespace(
        argv, f"export HQ_FAULT_DIR={q}; mount -t tmpfs -o size={size} hqfull {q}; "
              f"head -c 8192 /dev/zero >{filler}", copy_out,
        before_copy=f"rm -f {filler}")


def readonly_wrap(argv, folder: Path) -> list[str]:
    q = shlex.quote(str(folder))
    return in_namespace(argv, f"mount --bind {q} {q}; mount -o remount,bind,ro {q}")


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def is_staging(rel: str) -> bool:
    """Work in progress by the project's naming: a hidden component (`.NAME.tmp-PID`,
    `.step-N.partial-PID`), hq-export's `NAME.tmp` or hq-recap-trt's `NAME.partial.jsonl` log."""
    name = Path(rel).name
    return (any(part.startswith(".") for part in Path(rel).parts) or name.endswith(".tmp")
            or ".partial." in name)


def files(root: Path) -> list[str]:
    """Every regular file under root, relative, sorted."""
    if not root.exists():
        return []
    if root.is_file():
        return [""]
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def drop_keys(obj, keys):
    """obj without the named keys, at any depth."""
    if isinstance(obj, dict):
        return {k: drop_keys(v, keys) for k, v in obj.items() if k not in keys}
    if isinstance(obj, list):
        return [drop_keys(v, keys) for v in obj]
    return obj


@dataclass
class Compare:
    """How a job's output is compared with the reference: every file byte for byte except those
    matching a `skip` pattern (legitimately different, the reason in the job's spec) and JSON or
    JSON-lines files matching a `json_drop` pattern, compared with the named keys removed at any
    depth (timings, wall-clock times)."""
    skip: list[str] = field(default_factory=list)
    json_drop: dict[str, list[str]] = field(default_factory=dict)

    def _match(self, pats, rel):
        return [p for p in pats if re.fullmatch(p, rel)]

    def digest(self, root: Path, rel: str) -> str:
        path = root / rel if rel else root
        keys = [k for pat, ks in self.json_drop.items() if re.fullmatch(pat, rel) for k in ks]
        if not keys:
            return sha256(path)
        text = path.read_text()
        if rel.endswith(".jsonl"):
            rows = [json.dumps(drop_keys(json.loads(line), keys), sort_keys=True)
                    for line in text.splitlines()]
        else:
            rows = [json.dumps(drop_keys(json.loads(text), keys), sort_keys=True)]
        return "json:" + hashlib.sha256("\n".join(rows).encode()).hexdigest()

    def snapshot(self, root: Path) -> dict[str, str]:
        return {rel: self.digest(root, rel) for rel in files(root)
                if not is_staging(rel) and not self._match(self.skip, rel)}

    def diff(self, ref: dict[str, str], got: dict[str, str]) -> dict[str, list[str]]:
        """lost (in the reference only), extra (here only), changed."""
        return {
            "lost": sorted(set(ref) - set(got)),
            "extra": sorted(set(got) - set(ref)),
            "changed": sorted(k for k in set(ref) & set(got) if ref[k] != got[k]),
        }


def has_panic(text: str) -> bool:
    return "panicked at" in text or "RUST_BACKTRACE" in text


def clear_error(run_: Run, words: list[str]) -> str | None:
    """None when the run stopped with an error naming the problem (one of `words`, case-blind)
    and without a panic; else what is wrong with the stop."""
    if run_.rc == 0:
        return "exited 0"
    if has_panic(run_.text) or run_.rc == 101:
        return "panicked"
    low = run_.text.lower()
    if not any(w.lower() in low for w in words):
        return f"the message names none of {words}: {run_.text.strip()[-300:]!r}"
    return None


def dir_bytes(root: Path) -> int:
    return sum((root / r).stat().st_size for r in files(root) if r)


def fresh(path: Path):
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


def tar_members(path: Path) -> list[str] | None:
    """The member names of a tar in order, or None when it does not read to its end."""
    import tarfile
    try:
        with tarfile.open(path) as t:
            return [m.name for m in t.getmembers()]
    except (tarfile.TarError, OSError, EOFError):
        return None


def sample_counts(ref_root: Path, root: Path, rels: list[str]) -> tuple[int, int]:
    """(lost, duplicated) samples over the tar files `rels` (webdataset: a sample is the members
    sharing a key): keys of the reference missing here, and keys written more than once here or
    not in the reference."""
    lost = dup = 0
    for rel in rels:
        if not rel.endswith(".tar"):
            continue
        want = tar_members(ref_root / rel) or []
        got = tar_members(root / rel) if (root / rel).exists() else []
        got = got or []
        want_keys = {n.split(".", 1)[0] for n in want}
        got_keys = {n.split(".", 1)[0] for n in got}
        lost += len(want_keys - got_keys)
        # A member name twice is a sample written twice; a key the reference lacks, an extra one.
        dup += len(got) - len(set(got)) + len(got_keys - want_keys)
    return lost, dup
