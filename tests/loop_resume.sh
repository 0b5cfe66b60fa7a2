#!/usr/bin/env bash
# The closed loop (tools/loop.sh) survives kill -9 in every stage: a tiny corpus goes through the
# whole loop once without interruption, then again with the loop killed (the whole process group,
# SIGKILL) shortly after each stage starts and rerun, and every final output must be byte-identical
# to the uninterrupted run's: the teacher conversations, the fine-tuned weights, the exported ONNX
# graphs, the recaptioned shards, the quality report, the ablation table and the alignment report.
# Run by tools/test.sh after the cargo tests (it needs the debug binaries, which it builds first).
# About 2-3 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source tools/env.sh
cargo build --locked -p hq-data --bin hq-data -p hq-runtime --bin hq-recap-trt \
  -p hq-train --bin hq-train --bin hq-ablation -p hq-eval-cli --bin hq-eval
export HQ_BIN=target/debug HQ_NO_PROGRESS=1
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
corpus="$work/corpus"
"$HQ_BIN"/hq-data synth --out "$corpus" --samples 160 --shard-size 40 --eval-samples 16 \
  --eval-shard-size 16 --no-progress >/dev/null
source tests/loop_tiny.sh "$corpus" "$work"

echo "loop_resume: the uninterrupted run"
started=$SECONDS
bash tools/loop.sh "$corpus" >"$work/reference.log" 2>&1 || { tail -n 30 "$work/reference.log"; exit 1; }
loop_tiny_digest >"$work/reference.sha"
echo "loop_resume: $(wc -l <"$work/reference.sha") outputs in $((SECONDS - started)) s"
rm -rf "$corpus/loop"

# Kill once in each stage: wait for the stage's banner, let it work for a moment, kill the group.
stages=("teacher set" "fine-tune" "export" "recaption" "quality report" "ablation" "alignment")
# Short enough that a kill lands inside even the quick stages on an idle machine (teacher set,
# quality report and alignment take well under a second at this size).
delays=(0.05 4 1 0.5 0.02 3 0.3)
for i in "${!stages[@]}"; do
  stage="${stages[$i]}"
  setsid bash tools/loop.sh "$corpus" >"$work/run.log" 2>&1 &
  pid=$!
  waited=0
  until grep -q "^== [0-9:]* $stage" "$work/run.log" 2>/dev/null || ! kill -0 "$pid" 2>/dev/null; do
    sleep 0.1
    waited=$((waited + 1))
    [[ $waited -lt 3000 ]] || { echo "loop_resume: stage $stage never started" >&2; tail -n 20 "$work/run.log" >&2; exit 1; }
  done
  sleep "${delays[$i]}"
  if kill -0 "$pid" 2>/dev/null; then
    kill -9 -- "-$pid" 2>/dev/null || true
    echo "loop_resume: killed in stage \"$stage\" ($(tail -n 1 "$work/run.log" | cut -c1-100))"
  else
    echo "loop_resume: the loop had finished before the kill in stage \"$stage\""
  fi
  wait "$pid" 2>/dev/null || true
done
bash tools/loop.sh "$corpus" >"$work/final.log" 2>&1 || { tail -n 30 "$work/final.log"; exit 1; }
loop_tiny_digest >"$work/final.sha"
if ! diff "$work/reference.sha" "$work/final.sha"; then
  echo "loop_resume: FAILED: outputs after kills differ from the uninterrupted run's (above)" >&2
  exit 1
fi
echo "loop_resume: ok, $(wc -l <"$work/final.sha") outputs identical after ${#stages[@]} kills"
