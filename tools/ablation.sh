#!/usr/bin/env bash
# The HQ-CLIP ablation on the built-in corpus (the paper's Table 6 in miniature): baseline (raw
# alt-texts) vs mixed texts vs +HNI vs +STC, trained with the same seed, data order and budget,
# each final checkpoint evaluated on the corpus's held-out sets with `hq-eval builtin`, then one
# table (mean and spread over seeds) and a PNG chart.
#
# Usage: tools/ablation.sh [--corpus DIR] [--out DIR] [--seeds "0 1 2"] [--steps N]
#                          [--variants "baseline mixed hni stc"] [--config FILE]
#                          [--runs "LABEL=VARIANT@TRAIN ..."] [--jobs N] [--threads N]
#                          [--set KEY=VALUE]...
#   --corpus   a corpus written by `hq-data synth` (default out/default)
#   --out      where the runs, reports, table.md and chart.png go (default out/ablation)
#   --seeds    one run per variant and seed (default "0")
#   --steps    optimizer steps per run (default: the config's)
#   --config   hq-train config (default training/configs/ablation.toml)
#   --runs     instead of --variants: labelled runs, each a variant trained on its own shards
#              (a folder or shard spec), e.g. "mixed-ours=mixed@out/loop/recaptioned" (the closed
#              loop, tools/loop.sh); every run is evaluated on --corpus's held-out sets
#   --jobs     runs trained at the same time (default 1); with --threads 1 and --jobs 2 a
#              two-core machine trains two variants side by side
#   --set      an hq-train config override for every run (repeatable), e.g. optim.warmup_steps=2
#              or data.negative_pairing=paired (segment negatives paired with their positive)
#   --threads  threads per run: libtorch's intra-op threads and the data loader's decode threads
#              (default 0: the libraries' defaults, one per core)
#   --paper-effects  the longer setting of issue 16 (training/configs/paper-effects.toml): a
#              ModifiedResNet image tower, a corpus with shape/binding-only hard negatives and
#              1.6x larger objects (written to --corpus, default out/paper-effects-corpus, when
#              missing), paired segment negatives, HNI weight 2, 750 steps; 4 variants x seeds
#              0 1 2, three side by side on one thread each (about 45 minutes on 2 cores) into
#              --out (default out/paper-effects). Other options given after it override these.
# A finished run (its summary.json present) is not trained again, so an interrupted ablation
# continues where it stopped; an interrupted run resumes from its last checkpoint. Each run's
# log is RUN/train.log.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

corpus=out/default
out=out/ablation
seeds="0"
steps=""
variants="baseline mixed hni stc"
config=training/configs/ablation.toml
jobs=1
threads=0
runs=""
sets=()
paper_effects=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --paper-effects)
      paper_effects=1; corpus=out/paper-effects-corpus; out=out/paper-effects; seeds="0 1 2"
      config=training/configs/paper-effects.toml; jobs=3; threads=1; shift ;;
    --corpus) corpus="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --seeds) seeds="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    --variants) variants="$2"; shift 2 ;;
    --runs) runs="$2"; shift 2 ;;
    --set) sets+=(--set "$2"); shift 2 ;;
    --config) config="$2"; shift 2 ;;
    --jobs) jobs="$2"; shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    -h|--help) sed -n '2,33p' "$0"; exit 0 ;;
    *) echo "ablation.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [[ "$paper_effects" == 1 && ! -f "$corpus/corpus.json" ]]; then
  # The corpus this setting is measured on: the default generator's scenes with shape/binding-only
  # hard negatives and larger objects.
  source tools/env.sh
  [[ -n "${HQ_BIN:-}" ]] || cargo build --release --locked -p hq-data --bin hq-data
  "${HQ_BIN:-target/release}"/hq-data synth --out "$corpus" --negative-rules shape-binding \
    --object-scale 1.6
fi
[[ -d "$corpus/train" && -d "$corpus/eval" ]] || {
  echo "ablation.sh: $corpus is not a corpus (no train/ and eval/); run hq-data synth --out $corpus first" >&2
  exit 2
}
[[ "$jobs" =~ ^[1-9][0-9]*$ ]] || { echo "ablation.sh: --jobs $jobs is not a positive integer" >&2; exit 2; }
[[ "$threads" =~ ^[0-9]+$ ]] || { echo "ablation.sh: --threads $threads is not an integer >= 0" >&2; exit 2; }

source tools/env.sh
export HQ_NO_PROGRESS="${HQ_NO_PROGRESS:-}"
# HQ_BIN: take the binaries from this folder and build nothing (tests).
bin="${HQ_BIN:-target/release}"
[[ -n "${HQ_BIN:-}" ]] || cargo build --release --locked -p hq-train --bin hq-train --bin hq-ablation -p hq-eval-cli --bin hq-eval

# Whether a run trained to its last step: summary.json's last_step equals the run's configured
# steps (an interrupted run's summary stops short).
finished() {
  local run="$1" want got
  [[ -f "$run/summary.json" && -f "$run/config.toml" ]] || return 1
  want=$(sed -n 's/^steps = \([0-9]*\)$/\1/p' "$run/config.toml" | head -n 1)
  got=$(sed -n 's/^ *"last_step": \([0-9]*\),\?$/\1/p' "$run/summary.json" | head -n 1)
  [[ -n "$want" && "$want" == "$got" ]]
}

# The runs: LABEL|VARIANT|TRAIN triples (plain --variants train on the corpus's own shards).
specs=()
if [[ -n "$runs" ]]; then
  for r in $runs; do
    [[ "$r" =~ ^([^=@]+)=(baseline|mixed|hni|stc)@(.+)$ ]] || {
      echo "ablation.sh: --runs entry $r is not LABEL=VARIANT@TRAIN (variant baseline, mixed, hni or stc)" >&2; exit 2; }
    specs+=("${BASH_REMATCH[1]}|${BASH_REMATCH[2]}|${BASH_REMATCH[3]}")
  done
else
  for v in $variants; do specs+=("$v|$v|$corpus/train"); done
fi

# Train (or resume) one variant and seed, then evaluate its final checkpoint with hq-eval (the
# only evaluation: hq-train gets no --eval-dir, so it does not evaluate the same model twice).
run_one() {
  local seed="$1" label="$2" v="$3" train="$4"
  local run="$out/seed-$seed/$label"
  mkdir -p "$run"
  if ! finished "$run"; then
    rm -f "$run/builtin.json"
    local args=(--config "$config" --train "$train"
                --variant "$v" --seed "$seed" --out "$run" --quiet
                --threads "$threads" --set "run.torch_threads=$threads")
    [[ -n "$steps" ]] && args+=(--steps "$steps")
    args+=("${sets[@]}")
    local started=$SECONDS
    if [[ -f "$run/checkpoints/latest" ]]; then
      echo "== $label, seed $seed: resuming $run"
      "$bin"/hq-train --resume "$run" "${args[@]}" >>"$run/train.log" 2>&1
    else
      echo "== $label, seed $seed: training -> $run"
      "$bin"/hq-train "${args[@]}" >>"$run/train.log" 2>&1
    fi || { echo "ablation.sh: $label, seed $seed failed; see $run/train.log" >&2; tail -n 5 "$run/train.log" >&2; return 1; }
    echo "$((SECONDS - started))" >"$run/train_seconds"
    echo "== $label, seed $seed: trained in $((SECONDS - started)) s"
  fi
  if [[ ! -f "$run/builtin.json" ]]; then
    local omp=()
    [[ "$threads" != 0 ]] && omp=(env "OMP_NUM_THREADS=$threads")
    "${omp[@]}" "$bin"/hq-eval builtin --model "$run/checkpoints" --corpus "$corpus" \
      --device cpu --quiet --name "$label" --threads "$threads" --out "$run/builtin.json" >/dev/null
  fi
}

reports=()
pids=()
failed=0
for seed in $seeds; do
  for spec in "${specs[@]}"; do
    IFS='|' read -r label v train <<<"$spec"
    reports+=("$label=$seed=$out/seed-$seed/$label/builtin.json")
    if [[ "$jobs" == 1 ]]; then
      run_one "$seed" "$label" "$v" "$train"
      continue
    fi
    while [[ "$(jobs -rp | wc -l)" -ge "$jobs" ]]; do
      wait -n || failed=1
    done
    run_one "$seed" "$label" "$v" "$train" &
    pids+=($!)
  done
done
for p in "${pids[@]}"; do
  wait "$p" || failed=1
done
[[ "$failed" == 0 ]] || { echo "ablation.sh: some runs failed (see above); finished runs are kept, run again to continue" >&2; exit 1; }

"$bin"/hq-ablation --out "$out/table.md" --png "$out/chart.png" --json "$out/table.json" "${reports[@]}"
