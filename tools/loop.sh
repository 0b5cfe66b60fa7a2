#!/usr/bin/env bash
# The whole HQ-CLIP loop at toy scale on a corpus written by `hq-data synth` (run by tools/demo.sh):
#   1. teacher set: the oracle's answers for training images the recaptioner learns from (the
#      paper's GPT-4o answers), as LLaVA conversations in the recaptioner's short prompt;
#   2. fine-tune a small Qwen2-VL on them (recaptioner/finetune_qwen2vl.py, CPU);
#   3. export it to the runtime's ONNX model directory (export/qwen2vl/export_qwen2vl.py);
#   4. recaption training shards the recaptioner never saw (hq-recap-trt; failed samples keep
#      only their alt-text, never the oracle's texts);
#   5. quality report of the recaptions against the scene ground truth (hq-data quality);
#   6. the extended ablation: raw baseline | mixed with our recaptions | +HNI +STC with our
#      recaptions | mixed with the oracle's texts (the ceiling), same seeds, data and budget;
#   7. the paper's Fig. 4a measure: mean image-text cosine of the raw alt-texts, our recaptions
#      and the oracle's texts, judged by the ablation's mixed-oracle model of the first seed.
# Every stage is skipped when its output is complete and redone (or resumed) when not, so the
# script can be killed and run again at any point.
#
# Usage: tools/loop.sh [CORPUS_DIR]   (default out/default; everything goes to CORPUS_DIR/loop)
# Environment:
#   HQ_LOOP_TEACHER_SHARDS  teacher shards (default: train/shard-000{10..19}.tar)
#   HQ_LOOP_TEACHER_LIMIT   teacher samples (default 8000)
#   HQ_LOOP_RECAP_SHARDS    shards recaptioned and trained on (default: train/shard-0000{0..7}.tar)
#   HQ_LOOP_FINETUNE_ARGS   extra arguments of the fine-tune (e.g. "--time-budget-min 12": a time
#                           budget bounds the time on a busy machine but makes the result depend
#                           on the machine's speed; by default the fine-tune is step-based and
#                           seeded, so a killed and rerun loop gives the same outputs)
#   HQ_LOOP_EXPORT_ARGS     extra arguments of the export (e.g. --no-verify)
#   HQ_LOOP_RECAP_ARGS      extra arguments of hq-recap-trt
#   HQ_LOOP_ABLATION_STEPS  optimizer steps per ablation run (default: the config's)
#   HQ_LOOP_ABLATION_ARGS   extra arguments of tools/ablation.sh (e.g. "--set optim.warmup_steps=1")
#   HQ_BIN                  take the binaries from this folder and build nothing (tests)
#   HQ_ABLATION_SEEDS, HQ_ABLATION_JOBS, HQ_ABLATION_THREADS  as in tools/demo.sh (here JOBS=2,
#                           THREADS=1 by default: two runs side by side, one core each)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source tools/env.sh
corpus="${1:-out/default}"
loop="$corpus/loop"
# (Brace ranges cannot sit inside ${VAR:-default}: bash would close the expansion at their `}`.)
default_teacher="$corpus/train/shard-000{10..19}.tar"
default_recap="$corpus/train/shard-0000{0..7}.tar"
teacher_shards="${HQ_LOOP_TEACHER_SHARDS:-$default_teacher}"
teacher_limit="${HQ_LOOP_TEACHER_LIMIT:-8000}"
recap_shards="${HQ_LOOP_RECAP_SHARDS:-$default_recap}"
prompt=recaptioner/prompt_short.json
[[ -d "$corpus/train" && -d "$corpus/eval" ]] || {
  echo "loop.sh: $corpus is not a corpus (no train/ and eval/); run hq-data synth --out $corpus first" >&2
  exit 2
}
mkdir -p "$loop"
bin="${HQ_BIN:-target/release}"
[[ -n "${HQ_BIN:-}" ]] || cargo build --release --locked -p hq-data --bin hq-data -p hq-runtime --bin hq-recap-trt -p hq-eval-cli --bin hq-eval
stage() { echo "== $(date +%H:%M:%S) $*"; }

# 1. Teacher set (teacher.jsonl, images/ and conversations.json; the JSON is written last and
#    atomically, so its presence means the stage finished).
if [[ -f "$loop/teacher/conversations.json" ]]; then
  stage "teacher set: reusing $loop/teacher"
else
  stage "teacher set: $teacher_limit oracle answers from $teacher_shards"
  "$bin"/hq-recap-trt teacher --from-shards "$teacher_shards" --limit "$teacher_limit" \
    --prompt "$prompt" --output "$loop/teacher/conversations.json"
fi

# 2. Fine-tune (the script skips a complete checkpoint with the same settings itself).
stage "fine-tune: a small Qwen2-VL on the teacher set (CPU)"
# shellcheck disable=SC2086
"$HQ_PYTHON" recaptioner/finetune_qwen2vl.py --data "$loop/teacher/conversations.json" \
  --prompt "$prompt" --out "$loop/recaptioner" ${HQ_LOOP_FINETUNE_ARGS:-}

# 3. Export into a temporary folder renamed into place: a folder named recaptioner-onnx is complete.
if [[ -f "$loop/recaptioner-onnx/hq_export.json" && "$loop/recaptioner-onnx" -nt "$loop/recaptioner/model.safetensors" ]]; then
  stage "export: reusing $loop/recaptioner-onnx"
else
  stage "export: ONNX model directory (checked against torch)"
  rm -rf "$loop/recaptioner-onnx.tmp" "$loop/recaptioner-onnx"
  # shellcheck disable=SC2086
  "$HQ_PYTHON" export/qwen2vl/export_qwen2vl.py --model "$loop/recaptioner" --out "$loop/recaptioner-onnx.tmp" \
    ${HQ_LOOP_EXPORT_ARGS:-} >/dev/null
  mv "$loop/recaptioner-onnx.tmp" "$loop/recaptioner-onnx"
fi

# 4. Recaption (the job resumes from its per-shard logs and skips finished shards itself).
stage "recaption: $recap_shards with the fine-tuned model"
# shellcheck disable=SC2086
"$bin"/hq-recap-trt --engine "$loop/recaptioner-onnx" --input "$recap_shards" \
  --output "$loop/recaptioned" --drop-input-texts --model-name hq-recap-toy ${HQ_LOOP_RECAP_ARGS:-}

# 5. Quality report (seconds; always redone).
stage "quality report: recaptions against the scene ground truth"
"$bin"/hq-data quality "$loop/recaptioned" --out "$loop/quality" --name "fine-tuned recaptioner"


# 6. The extended ablation on the recaptioned shards and the same shards as the corpus has them.
stage "ablation: raw | mixed (ours) | +HNI +STC (ours) | mixed (oracle)"
bash tools/ablation.sh --corpus "$corpus" --out "$loop/ablation" \
  --runs "baseline=baseline@$recap_shards mixed-ours=mixed@$loop/recaptioned stc-ours=stc@$loop/recaptioned mixed-oracle=mixed@$recap_shards" \
  --seeds "${HQ_ABLATION_SEEDS:-0}" --jobs "${HQ_ABLATION_JOBS:-2}" --threads "${HQ_ABLATION_THREADS:-1}" \
  ${HQ_LOOP_ABLATION_STEPS:+--steps "$HQ_LOOP_ABLATION_STEPS"} ${HQ_LOOP_ABLATION_ARGS:-}

# 7. Alignment (seconds).
first_seed=$(echo "${HQ_ABLATION_SEEDS:-0}" | awk '{print $1}')
stage "alignment: image-text cosine of raw, our and the oracle's texts"
"$bin"/hq-eval alignment --model "$loop/ablation/seed-$first_seed/mixed-oracle/checkpoints" \
  --device cpu --quiet --max-samples 2000 --out "$loop/quality/alignment.json" \
  --texts "raw=alt_text@$recap_shards" "ours=long_positive@$loop/recaptioned/*.tar" "oracle=long_positive@$recap_shards"
stage "done: $loop/quality/quality.md, $loop/quality/alignment.md, $loop/ablation/table.md, $loop/ablation/chart.png"
