#!/usr/bin/env bash
# The project's one test command (README, .ci/run): set-up, formatting, lints, every test.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source tools/env.sh
export HQ_NO_PROGRESS=1
# CI builds once from clean: incremental state would only take disk (it reached 14 GB here).
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --locked
# CI machines may be Intel or AMD (tests/README.md): the tie-set parity test once more with MKL on
# its non-Intel path, which rounds identical GEMM columns apart, so a test that leans on MKL's
# rounding fails on every machine, not only on the next AMD one.
echo "== eval parity tie sets on MKL's non-Intel path"
tools/cpu-paths.sh non-intel -- cargo test --workspace --locked --test eval_parity -- linear_model_matches_clip_benchmark
# The GPU acceptance run (tools/gpu-check.sh) packed and run on the CPU, so that neither half rots
# while no GPU is around: every step runs at small sizes or skips with its reason.
echo "== GPU acceptance run: pack and dry run on the CPU"
rm -rf target/gpucheck-dry target/gpucheck-dry-out
bash tools/gpu-check.sh pack --profile test --dir target/gpucheck-dry
bash target/gpucheck-dry/gpu-check.sh run --dry-run --python "$HQ_PYTHON" --out target/gpucheck-dry-out
"$HQ_PYTHON" tools/gpu_check_report.py expect target/gpucheck-dry-out \
  --passed env,losses,train,ort --skipped kernels,nccl \
  --files losses.json,train_smoke.json,gpu_train.json,ort_cpu.json,SUMMARY.md
# The closed loop (tools/loop.sh) at toy scale, killed in each stage and rerun: outputs identical.
echo "== the loop survives kill -9 in every stage"
bash tests/loop_resume.sh
# Fault injection on every long job (tools/faults/README.md), small mode: kill -9, disk full,
# read-only output and damaged input, each rerun and compared with an uninterrupted run. The
# binaries are the debug ones `cargo test` built above.
echo "== fault campaigns, small mode"
HQ_BIN=target/debug bash tools/faults.sh --ci
# The committed fuzz corpora (fuzz/README.md) stay small: cargo test replays them on every run.
echo "== fuzz corpora stay small"
test "$(du -sk fuzz/tests/__fuzz__ | cut -f1)" -lt 2048
