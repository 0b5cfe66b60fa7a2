#!/usr/bin/env bash
# The project's main job on the built-in default data (README): set-up, release build, the built-in
# synthetic corpus (training shards + held-out evaluation sets) and its statistics, then the
# HQ-CLIP ablation on it: baseline vs mixed vs +HNI vs +STC trained on the CPU with the same seed
# and budget, each evaluated with `hq-eval builtin`, a table printed and a PNG chart written.
# Usage: tools/demo.sh [OUT_DIR]   (default: out/default; the ablation goes to OUT_DIR/ablation)
# Environment: HQ_ABLATION_SEEDS="0 1 2" for several seeds (mean and spread in the table).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source tools/env.sh
out="${1:-out/default}"
cargo build --release --locked -p hq-data --bin hq-data
if [[ -f "$out/corpus.json" ]]; then
  echo "== corpus: reusing $out (delete it to regenerate)"
  target/release/hq-data stats "$out"
else
  target/release/hq-data synth --out "$out"
fi
echo "== ablation: baseline vs mixed vs +HNI vs +STC (CPU, a few minutes)"
bash tools/ablation.sh --corpus "$out" --out "$out/ablation" --seeds "${HQ_ABLATION_SEEDS:-0}"
echo "== table: $out/ablation/table.md, chart: $out/ablation/chart.png"
