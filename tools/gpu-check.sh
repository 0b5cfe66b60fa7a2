#!/usr/bin/env bash
# The GPU acceptance run: every CUDA path of the project checked in one short run on a GPU
# machine that has PyTorch 2.11 (its libtorch, NVRTC and NCCL) but no Rust, no registries, and
# room for one folder of at most 64 MiB. Two halves:
#
#   tools/gpu-check.sh pack [--dir DIR] [--profile release|test]
#       Build side (no GPU needed): builds the binaries the run needs and packs them, stripped,
#       with the scripts, presets, a tiny Qwen2-VL ONNX model and open_clip's pure-Python package
#       into DIR (default .gpucheck, git-ignored), and checks that it fits in 64 MiB (a release
#       pack: ~44 MiB; the test profile's binaries, packed by CI's dry run, are larger and only
#       warned about).
#
#   bash DIR/gpu-check.sh run --out OUT [--dry-run] [--python PY]
#       GPU side: sets the library paths from PY's torch (default: python3), then runs each step
#       under its own time cap, 480 s in all, and writes logs, JSON results and SUMMARY.md into OUT:
#         1 kernels     the CUDA kernel tests against the CPU twins and f64 references
#         2 losses      fused vs libtorch's unfused loss, N 4k..64k, D 512/768; largest N; memory
#         3 train       a bf16 hq-train run (300 steps, loss must fall), and ViT-B-32 samples/s at
#                       the largest batch that fits, ours against open_clip on the same GPU
#         4 nccl        NCCL collectives on 2 GPUs (skipped with a message on one GPU; a one-rank
#                       NCCL group runs on any GPU)
#         5 ort         ONNX Runtime's CUDA and TensorRT providers on the tiny recaptioner, when
#                       the machine has an onnxruntime >= 1.31 build with them (else skipped,
#                       saying what was missing)
#       --dry-run runs the same steps on the CPU (small sizes, fp32) or skips them with the reason:
#       CI runs it (tools/test.sh) so neither half rots.
#
# The exit status is 0 when no step failed (skipped steps are not failures); SUMMARY.md and
# summary.json say which step did what. README.md ("GPU acceptance run") has the commands.
set -euo pipefail

die() { echo "gpu-check: $*" >&2; exit 2; }
trap 'echo "gpu-check: stopped by a failing command at line $LINENO" >&2' ERR
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# 64 MiB is what the GPU machines take in one copy (the repository's own files travel too).
PACK_LIMIT_BYTES=$((64 * 1024 * 1024))

# ---------------------------------------------------------------------------------------------
# Build side
# ---------------------------------------------------------------------------------------------

# Executable path of cargo target NAME of KIND (bin, test, bench), from cargo's JSON messages
# (for a bin, the program itself, not its unit-test harness).
cargo_exe() {
  "$HQ_PYTHON" -c '
import json, sys
name, kind = sys.argv[1], sys.argv[2]
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    t = m["target"]
    if t["name"] == name and kind in t["kind"] and (kind != "bin" or not m["profile"]["test"]):
        print(m["executable"])
' "$1" "$2" | tail -n 1
}

pack() {
  local dir=.gpucheck profile=release
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --dir) dir="$2"; shift 2 ;;
      --profile) profile="$2"; shift 2 ;;
      *) die "pack: unknown argument $1" ;;
    esac
  done
  local root; root="$(cd "$here/.." && pwd)"
  cd "$root"
  # shellcheck disable=SC1091
  source tools/env.sh
  local t0=$SECONDS
  local flags=(--locked --message-format=json-render-diagnostics)
  local log; log="$(mktemp)"
  echo "== building ($profile profile)"
  if [[ "$profile" == release ]]; then
    cargo test --release "${flags[@]}" --no-run -p hq-kernels --test gpu -p hq-dist \
      --test collectives -p hq-benches --bench losses --bench gpu_train >"$log"
    cargo build --release "${flags[@]}" -p hq-train --bin hq-train -p hq-data --bin hq-data \
      -p hq-runtime --bin hq-recap-trt >>"$log"
  else
    # The test profile is what `cargo test --workspace` already built (CI's dry run): the same
    # selection reuses it (naming packages would resolve features anew and rebuild the crates),
    # and only the two benches are compiled on top.
    cargo test "${flags[@]}" --no-run --workspace >"$log"
    cargo test "${flags[@]}" --no-run --workspace --bench losses --bench gpu_train >>"$log"
  fi
  local -A bins=(
    [kernels-gpu-tests]="$(cargo_exe gpu test <"$log")"
    [dist-collectives-tests]="$(cargo_exe collectives test <"$log")"
    [bench-losses]="$(cargo_exe losses bench <"$log")"
    [bench-gpu-train]="$(cargo_exe gpu_train bench <"$log")"
    [hq-train]="$(cargo_exe hq-train bin <"$log")"
    [hq-data]="$(cargo_exe hq-data bin <"$log")"
    [hq-recap-trt]="$(cargo_exe hq-recap-trt bin <"$log")"
  )
  rm -f "$log"
  local name
  for name in "${!bins[@]}"; do
    [[ -x "${bins[$name]}" ]] || die "pack: the build produced no executable for $name"
  done

  echo "== packing into $dir"
  local tmp="$dir.tmp"
  rm -rf "$tmp"; mkdir -p "$tmp"/{bin,python,presets,configs,models,pylib}
  for name in "${!bins[@]}"; do
    # Line tables are most of a binary's size; the GPU machine needs none of them.
    strip --strip-debug -o "$tmp/bin/$name" "${bins[$name]}"
  done
  cp tools/gpu-check.sh tools/gpu_check_report.py "$tmp/"
  cp benches/python/gpu_train_step.py benches/python/openclip_step.py "$tmp/python/"
  cp training/presets/*.json "$tmp/presets/"
  cp training/configs/ablation.toml training/configs/ablation-model.json "$tmp/configs/"
  # The tiny recaptioner (random weights, ~1 MB) for the ONNX Runtime step.
  "$HQ_PYTHON" export/qwen2vl/make_tiny_qwen2vl.py --out "$tmp/models/tiny-hf" \
    --export "$tmp/models/tiny-qwen2vl" --no-verify >/dev/null
  rm -rf "$tmp/models/tiny-hf"
  # open_clip is not installed on the GPU machines: its pure-Python package and what it imports
  # that they lack (ftfy, wcwidth), copied from the venv (no registry needed).
  local site; site="$("$HQ_PYTHON" -c 'import site; print(site.getsitepackages()[0])')"
  for pkg in open_clip ftfy wcwidth; do
    [[ -d "$site/$pkg" ]] || die "pack: $pkg is not installed in $HQ_VENV (run tools/setup.sh)"
    cp -r "$site/$pkg" "$tmp/pylib/"
  done
  find "$tmp/pylib" -name __pycache__ -type d -prune -exec rm -rf {} +
  "$HQ_PYTHON" tools/gpu_check_report.py manifest "$tmp" --profile "$profile" \
    --commit "$(git rev-parse HEAD 2>/dev/null || echo unknown)" --limit "$PACK_LIMIT_BYTES" \
    $([[ "$profile" == release ]] && echo --enforce-limit)
  rm -rf "$dir"; mv "$tmp" "$dir"
  echo "== packed $(du -sb "$dir" | cut -f1) bytes into $dir in $((SECONDS - t0)) s (limit $PACK_LIMIT_BYTES)"
}

# ---------------------------------------------------------------------------------------------
# GPU side
# ---------------------------------------------------------------------------------------------

# Time caps per step (seconds): 480 in all. HQ_GPU_CHECK_CAP_<STEP> overrides one.
CAP_ENV=${HQ_GPU_CHECK_CAP_ENV:-15} CAP_KERNELS=${HQ_GPU_CHECK_CAP_KERNELS:-60}
CAP_LOSSES=${HQ_GPU_CHECK_CAP_LOSSES:-120} CAP_TRAIN=${HQ_GPU_CHECK_CAP_TRAIN:-180}
CAP_NCCL=${HQ_GPU_CHECK_CAP_NCCL:-45} CAP_ORT=${HQ_GPU_CHECK_CAP_ORT:-60}

# The steps run under `timeout` in their own bash (so a cap kills everything a step started);
# they read the run's settings from these exported variables: OUT, DRY, BIN, PY, REPORT, WORK,
# PACK, GPUS. A step may print "STEP-STATUS: skipped <why>" (it could not run here) and "NOTE:
# <text>" lines (a part that was skipped); otherwise exit status 0 means passed.

step_env() {
  "$PY" "$REPORT" env --out "$OUT/env.json" --pack "$PACK" --gpus "$GPUS" --dry-run "$DRY"
}

# 1. The kernel tests (without a GPU each prints SKIP and passes: the dry run checks they load).
step_kernels() {
  "$BIN/kernels-gpu-tests" --test-threads 1 --nocapture 2>&1 | tee "$WORK/kernels.log"
  [[ ${PIPESTATUS[0]} == 0 ]] || return 1
  if grep -q "SKIP:" "$WORK/kernels.log"; then
    echo "STEP-STATUS: skipped $(grep -m1 'SKIP:' "$WORK/kernels.log" | sed 's/.*SKIP: //')"
  fi
}

# 2. Fused vs unfused loss: times, peak memory, largest N (small sizes on the CPU).
step_losses() {
  if [[ $DRY == 1 ]]; then
    HQ_LOSSES_DEVICE_TABLE=cpu HQ_LOSSES_GPU_SIZES=256,512 HQ_LOSSES_DIMS=64,128 \
      HQ_LOSSES_JSON="$OUT/losses.json" "$BIN/bench-losses"
  else
    HQ_LOSSES_DEVICE_TABLE=cuda HQ_LOSSES_MAX_SECONDS=8 HQ_LOSSES_JSON="$OUT/losses.json" \
      "$BIN/bench-losses"
  fi
}

# 3a. hq-train in bf16 on a synthetic corpus (the loss must fall); 3b. the training step of
# ViT-B-32 at the largest batch that fits, ours against open_clip.
step_train() {
  local corpus="$WORK/corpus" run="$WORK/train-smoke"
  local dev=(--device cuda --precision bf16 --steps 300 --batch-size 64)
  [[ $DRY == 1 ]] && dev=(--device cpu --precision fp32 --steps 80 --batch-size 32)
  "$BIN/hq-data" synth --out "$corpus" --samples 4000 --eval-samples 200 --no-progress || return 1
  (cd "$PACK" && "$BIN/hq-train" --config configs/ablation.toml \
    --set "model.config=$PACK/configs/ablation-model.json" --train "$corpus/train" \
    --eval-dir "$corpus/eval" --out "$run" --log-every 5 --checkpoint-every 0 "${dev[@]}") \
    || return 1
  "$PY" "$REPORT" smoke "$run" --out "$OUT/train_smoke.json" || return 1
  local device=auto; [[ $DRY == 1 ]] && device=cpu
  HQ_GPU_TRAIN_DEVICE=$device HQ_PYTHON="$PY" HQ_BENCH_PYTHON_DIR="$PACK/python" \
    HQ_PRESETS_DIR="$PACK/presets" HQ_GPU_TRAIN_JSON="$OUT/gpu_train.json" "$BIN/bench-gpu-train"
}

# 4. NCCL: each test skips itself where it cannot run (no NCCL build, too few GPUs).
step_nccl() {
  "$BIN/dist-collectives-tests" --nocapture --test-threads 1 nccl 2>&1 | tee "$WORK/nccl.log"
  [[ ${PIPESTATUS[0]} == 0 ]] || return 1
  if grep -q "SKIP: NCCL collectives need 2 GPUs" "$WORK/nccl.log"; then
    echo "NOTE: 2-GPU NCCL collectives skipped: this machine has $GPUS GPU(s)"
  fi
  if ! grep -q "NCCL single-rank group OK" "$WORK/nccl.log"; then
    echo "STEP-STATUS: skipped $(grep -m1 'SKIP:' "$WORK/nccl.log" | sed 's/.*SKIP: //')"
  fi
}

# 5. ONNX Runtime's CUDA and TensorRT providers on the tiny recaptioner (CPU in the dry run).
step_ort() {
  local probe; probe="$("$PY" "$REPORT" ort-probe)"
  echo "$probe"
  field() { sed -n "s/^$1=//p" <<<"$probe"; }
  local dylib="${HQ_GPU_ORT_DYLIB:-$(field dylib)}" providers; providers="$(field providers)"
  local want=()
  if [[ $DRY == 1 ]]; then
    want=(cpu)
    echo "NOTE: CUDA and TensorRT providers not run (dry run on the CPU)"
  else
    [[ ",$providers," == *",CUDAExecutionProvider,"* ]] && want+=(cuda)
    [[ ",$providers," == *",TensorrtExecutionProvider,"* ]] && want+=(tensorrt)
  fi
  if [[ -z "${HQ_GPU_ORT_DYLIB:-}" && "$(field usable)" != 1 ]] || [[ ${#want[@]} == 0 ]]; then
    echo "STEP-STATUS: skipped $(field why)"
    return 0
  fi
  local corpus="$WORK/recap-corpus" p
  "$BIN/hq-data" synth --out "$corpus" --samples 32 --shard-size 32 --eval-samples 8 \
    --no-progress || return 1
  for p in "${want[@]}"; do
    ORT_DYLIB_PATH="$dylib" "$BIN/hq-recap-trt" --engine "$PACK/models/tiny-qwen2vl" \
      --provider "$p" --input "$corpus/train" --output "$WORK/recap-$p" --attempts 1 \
      --max-new-tokens 48 --model-name tiny-random --no-progress || return 1
    "$PY" "$REPORT" recap "$WORK/recap-$p" --provider "$p" --out "$OUT/ort_$p.json" || return 1
  done
}

# Runs step NAME under CAP seconds, its output in OUT/NAME.log, its record (status, seconds,
# why, notes) appended to OUT/steps.jsonl.
record() {
  local name="$1" cap="$2" rc=0 t0=$SECONDS
  echo "== step $name (cap ${cap}s)"
  timeout --kill-after=5 "$cap" bash -c "step_$name" >"$OUT/$name.log" 2>&1 || rc=$?
  "$PY" "$REPORT" step "$name" --log "$OUT/$name.log" --rc "$rc" --seconds $((SECONDS - t0)) \
    --cap "$cap" >>"$OUT/steps.jsonl"
  tail -n 1 "$OUT/steps.jsonl" | cut -c1-300 | sed 's/^/   /'
}

run() {
  local out="" dry=0 py="${HQ_GPU_PYTHON:-python3}" pack_dir="$here"
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --out) out="$2"; shift 2 ;;
      --dry-run) dry=1; shift ;;
      --python) py="$2"; shift 2 ;;
      --pack) pack_dir="$(cd "$2" && pwd)"; shift 2 ;;
      *) die "run: unknown argument $1" ;;
    esac
  done
  [[ -n "$out" ]] || die "run: --out DIR is required"
  [[ -f "$pack_dir/manifest.json" ]] \
    || die "run: $pack_dir is not a pack (no manifest.json): run tools/gpu-check.sh pack first"
  command -v "$py" >/dev/null || die "run: no python at '$py' (--python PY: the one with torch)"
  mkdir -p "$out"; out="$(cd "$out" && pwd)"; : >"$out/steps.jsonl"
  local report="$pack_dir/gpu_check_report.py"
  "$py" "$report" verify "$pack_dir" \
    || die "run: the pack is damaged (a member's size or SHA-256 differs from its manifest)"

  # Library paths from this machine's torch: libtorch (and through it CUDA and NCCL), NVRTC.
  local torch_lib nvrtc
  torch_lib="$("$py" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')" \
    || die "run: $py has no torch"
  # NVRTC: the wheel's nvidia/cu13/lib (torch 2.11's layout), another nvidia/*/lib, or the toolkit.
  local site; site="$(cd "$torch_lib/../.." && pwd)"
  nvrtc="$(find "$site/nvidia" /usr/local/cuda/lib64 -maxdepth 3 -name 'libnvrtc.so*' 2>/dev/null \
    | sort | head -n 1 || true)"
  [[ -n "$nvrtc" ]] && nvrtc="$(dirname "$nvrtc")"
  export LD_LIBRARY_PATH="${nvrtc:+$nvrtc:}$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export HQ_NVRTC_LIB_DIR="$nvrtc" HQ_NO_PROGRESS=1 HF_HUB_OFFLINE=1
  export PYTHONPATH="$pack_dir/pylib${PYTHONPATH:+:$PYTHONPATH}"
  local gpus; gpus="$("$py" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
  if [[ $dry == 0 && "$gpus" == 0 ]]; then
    die "run: torch sees no GPU on this machine; --dry-run runs the steps on the CPU"
  fi
  local work; work="$(mktemp -d)"
  # shellcheck disable=SC2064
  trap "rm -rf '$work'" EXIT
  export OUT="$out" DRY="$dry" BIN="$pack_dir/bin" PY="$py" REPORT="$report" WORK="$work" \
    PACK="$pack_dir" GPUS="$gpus"
  export -f step_env step_kernels step_losses step_train step_nccl step_ort
  record env "$CAP_ENV"
  record kernels "$CAP_KERNELS"
  record losses "$CAP_LOSSES"
  record train "$CAP_TRAIN"
  record nccl "$CAP_NCCL"
  record ort "$CAP_ORT"
  "$py" "$report" summary "$out"
  echo "== results in $out (SUMMARY.md, summary.json)"
  ! grep -q '"status": "\(failed\|timed out\)"' "$out/summary.json"
}

case "${1:-}" in
  pack) shift; pack "$@" ;;
  run) shift; run "$@" ;;
  *) die "usage: tools/gpu-check.sh pack [--dir DIR] [--profile release|test] | DIR/gpu-check.sh run --out OUT [--dry-run] [--python PY]" ;;
esac
