#!/usr/bin/env bash
# The HQ-CLIP ablation on the built-in corpus (the paper's Table 6 in miniature): baseline (raw
# alt-texts) vs mixed texts vs +HNI vs +STC, trained with the same seed, data order and budget,
# each final checkpoint evaluated on the corpus's held-out sets with `hq-eval builtin`, then one
# table (mean and spread over seeds) and a PNG chart.
#
# Usage: tools/ablation.sh [--corpus DIR] [--out DIR] [--seeds "0 1 2"] [--steps N]
#                          [--variants "baseline mixed hni stc"] [--config FILE]
#   --corpus   a corpus written by `hq-data synth` (default out/default)
#   --out      where the runs, reports, table.md and chart.png go (default out/ablation)
#   --seeds    one run per variant and seed (default "0")
#   --steps    optimizer steps per run (default: the config's, 150)
#   --config   hq-train config (default training/configs/ablation.toml)
# A finished run (its summary.json present) is not trained again, so an interrupted ablation
# continues where it stopped; an interrupted run resumes from its last checkpoint.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

corpus=out/default
out=out/ablation
seeds="0"
steps=""
variants="baseline mixed hni stc"
config=training/configs/ablation.toml
while [[ $# -gt 0 ]]; do
  case "$1" in
    --corpus) corpus="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --seeds) seeds="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    --variants) variants="$2"; shift 2 ;;
    --config) config="$2"; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "ablation.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ -d "$corpus/train" && -d "$corpus/eval" ]] || {
  echo "ablation.sh: $corpus is not a corpus (no train/ and eval/); run hq-data synth --out $corpus first" >&2
  exit 2
}

source tools/env.sh
export HQ_NO_PROGRESS="${HQ_NO_PROGRESS:-}"
cargo build --release --locked -p hq-train --bin hq-train --bin hq-ablation -p hq-eval-cli --bin hq-eval

reports=()
for seed in $seeds; do
  for v in $variants; do
    run="$out/seed-$seed/$v"
    if [[ ! -f "$run/summary.json" || -z "$(ls "$run"/eval/step-*.json 2>/dev/null)" ]]; then
      args=(--config "$config" --train "$corpus/train" --eval-dir "$corpus/eval"
            --variant "$v" --seed "$seed" --out "$run" --quiet)
      [[ -n "$steps" ]] && args+=(--steps "$steps")
      if [[ -f "$run/checkpoints/latest" ]]; then
        echo "== $v, seed $seed: resuming $run"
        target/release/hq-train --resume "$run" "${args[@]}"
      else
        echo "== $v, seed $seed: training -> $run"
        target/release/hq-train "${args[@]}"
      fi
    fi
    report="$run/builtin.json"
    if [[ ! -f "$report" ]]; then
      target/release/hq-eval builtin --model "$run/checkpoints" --corpus "$corpus" \
        --device cpu --quiet --name "$v" --out "$report" >/dev/null
    fi
    reports+=("$v=$seed=$report")
  done
done

target/release/hq-ablation --out "$out/table.md" --png "$out/chart.png" "${reports[@]}"
