#!/usr/bin/env bash
# One set-up path for everything: creates the project's Python venv with the pinned packages of
# tools/requirements.txt (libtorch for tch, ONNX Runtime for ort, NVRTC for the kernels, and the
# reference packages the parity tests compare against). Idempotent: when the venv's stamp matches the
# requirements file it returns at once. Prefer `source tools/env.sh`, which also exports the paths.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${HQ_VENV:-$root/.venv}"
req="$root/tools/requirements.txt"
python="${HQ_BASE_PYTHON:-python3}"

command -v cargo >/dev/null || { echo "setup: cargo not found; install the Rust toolchain (rustup) first" >&2; exit 1; }
command -v "$python" >/dev/null || { echo "setup: $python not found; install Python 3.11+ first" >&2; exit 1; }

want="$(cat "$req" | sha256sum | cut -d' ' -f1) $("$python" -c 'import sys; print(sys.version.split()[0])')"
stamp="$venv/.hq-setup-stamp"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    exit 0
fi

echo "setup: creating the Python venv at $venv (torch, onnxruntime and reference packages; ~3 GB, a few minutes)" >&2
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req"
# Prove the pieces the build and the binaries rely on are really there before writing the stamp.
"$venv/bin/python" - <<'PY'
import glob, os, site, sys
sp = site.getsitepackages()[0]
need = [os.path.join(sp, "torch", "lib", "libtorch_cpu.so"),
        os.path.join(sp, "onnxruntime", "capi", "libonnxruntime.so.1.31.1"),
        os.path.join(sp, "nvidia", "cu13", "lib", "libnvrtc.so.13"),
        os.path.join(sp, "nvidia", "cu13", "lib", "libnvrtc-builtins.so.13.0")]
missing = [p for p in need if not os.path.exists(p)]
if missing:
    sys.exit("setup: the venv lacks " + ", ".join(missing))
import open_clip, clip_benchmark, transformers, onnx  # noqa: F401  (reference packages import)
PY
echo "$want" > "$stamp"
echo "setup: venv ready" >&2
