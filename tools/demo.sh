#!/usr/bin/env bash
# The project's main job on the built-in default data (README): set-up, release build, the built-in
# synthetic corpus (training shards + held-out evaluation sets) and its statistics, then the whole
# HQ-CLIP loop on it (tools/loop.sh): teacher set -> fine-tuned Qwen2-VL recaptioner -> ONNX export
# -> recaptioned shards -> quality report -> ablation (raw | mixed and +HNI +STC on our
# recaptions | mixed on the oracle's texts) -> alignment. Every stage resumes after a kill.
# Usage: tools/demo.sh [--quick] [OUT_DIR]   (default: out/default; the loop goes to OUT_DIR/loop)
#   --quick  only the oracle-text ablation (baseline vs mixed vs +HNI vs +STC on the corpus's own
#            texts, no recaptioner) into OUT_DIR/ablation
# Environment:
#   HQ_ABLATION_SEEDS="0 1 2"  several seeds (mean and spread in the table; default "0")
#   HQ_ABLATION_JOBS=2         runs trained side by side (default 1)
#   HQ_ABLATION_THREADS=1      threads per run (default 0: one per core); on a two-core machine
#                              JOBS=2 THREADS=1 finishes the four variants sooner
#   HQ_NEGATIVE_RULES=shape_binding  the corpus's hard-negative rules (hq-data synth
#                              --negative-rules; default paper); use its own OUT_DIR
#   HQ_OBJECT_SCALE=1.6        the corpus's object size multiplier (hq-data synth --object-scale,
#                              0.5..=1.7; default 1); use its own OUT_DIR
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source tools/env.sh
quick=0
if [[ "${1:-}" == "--quick" ]]; then quick=1; shift; fi
out="${1:-out/default}"
cargo build --release --locked -p hq-data --bin hq-data
# A corpus written by another generator version (other texts for the same seed), or with other
# hard-negative rules or another object scale than asked for, is regenerated, and the ablation and
# loop made from it are moved aside (they would otherwise count as finished). The manifest names
# its rules and scale only when they are not the defaults (paper, 1), so "generator+rules+scale"
# is the generator alone for a default corpus. Scales are compared as awk's %g writes them.
rules="${HQ_NEGATIVE_RULES:-paper}"
rules="${rules//-/_}"
scale=$(awk -v s="${HQ_OBJECT_SCALE:-1}" 'BEGIN { printf "%g", s }')
want=$(sed -n 's/^pub const GENERATOR_VERSION: &str = "\(.*\)";$/\1/p' data/src/synth/mod.rs)
[[ "$rules" == paper ]] || want="$want+$rules"
[[ "$scale" == 1 ]] || want="$want+scale$scale"
have=""
if [[ -f "$out/corpus.json" ]]; then
  have=$(sed -n 's/^  "generator": "\(.*\)",$/\1/p' "$out/corpus.json" | head -n 1)
  have_rules=$(sed -n 's/^    "negative_rules": "\(.*\)",\{0,1\}$/\1/p' "$out/corpus.json" | head -n 1)
  [[ -z "$have" || -z "$have_rules" ]] || have="$have+$have_rules"
  have_scale=$(sed -n 's/^    "object_scale": \([-+.0-9eE]*\),\{0,1\}$/\1/p' "$out/corpus.json" | head -n 1)
  [[ -z "$have" || -z "$have_scale" ]] || have="$have+scale$(awk -v s="$have_scale" 'BEGIN { printf "%g", s }')"
fi
if [[ -n "$have" && "$have" == "$want" ]]; then
  echo "== corpus: reusing $out (delete it to regenerate)"
  target/release/hq-data stats "$out"
else
  if [[ -f "$out/corpus.json" ]]; then
    echo "== corpus: $out was written by generator ${have:-unknown}, this is $want: regenerating it"
    for made in ablation loop; do
      if [[ -d "$out/$made" ]]; then
        old="$out/$made-${have:-old}-$(date +%s)"
        echo "== the $made made from the old corpus is moved to $old"
        mv "$out/$made" "$old"
      fi
    done
    target/release/hq-data synth --out "$out" --negative-rules "$rules" --object-scale "$scale" --force
  else
    target/release/hq-data synth --out "$out" --negative-rules "$rules" --object-scale "$scale"
  fi
fi
if [[ "$quick" == 1 ]]; then
  echo "== ablation: baseline vs mixed vs +HNI vs +STC on the oracle's texts (CPU, a few minutes per variant)"
  bash tools/ablation.sh --corpus "$out" --out "$out/ablation" --seeds "${HQ_ABLATION_SEEDS:-0}" \
    --jobs "${HQ_ABLATION_JOBS:-1}" --threads "${HQ_ABLATION_THREADS:-0}"
  echo "== table: $out/ablation/table.md, chart: $out/ablation/chart.png"
else
  bash tools/loop.sh "$out"
fi
