# The closed loop's tiny settings, sourced by tests/loop_resume.sh and by the demo campaign of
# tools/faults (one copy of them): tools/loop.sh on a corpus of
#   hq-data synth --samples 160 --shard-size 40 --eval-samples 16 --eval-shard-size 16
# runs in a few minutes on 2 cores.
# Usage: source tests/loop_tiny.sh CORPUS WORK   (WORK: a scratch folder for the tag vocabulary);
# then `loop_tiny_digest` prints the SHA-256 of the loop's final outputs, the ones compared after
# kills.
_loop_tiny_corpus="$1"
export HQ_LOOP_TEACHER_SHARDS="$1/train/shard-0000{2..3}.tar" HQ_LOOP_TEACHER_LIMIT=80
export HQ_LOOP_RECAP_SHARDS="$1/train/shard-0000{0..1}.tar"
export HQ_LOOP_FINETUNE_ARGS="--preset test --steps 30 --heldout 8 --gen-check 0"
# The seconds-long test model is too weak for the export's own negative controls (its greedy tokens
# do not change when the positions are broken); tests/tests/recap_finetune.rs checks its export.
export HQ_LOOP_EXPORT_ARGS="--no-verify"
export HQ_LOOP_RECAP_ARGS="--max-new-tokens 48 --attempts 2 --threads 1 --batch-size 4"
# The test model writes no valid answer in 30 steps, so the recaptioned shards have no tags to
# count: the STC run gets a fixed tag vocabulary.
printf '# hq-clip tag vocabulary v1: rank<TAB>count<TAB>tag\n0\t1\tred circle\n1\t1\ttwo objects\n' >"$2/tags.tsv"
export HQ_LOOP_ABLATION_STEPS=3
export HQ_LOOP_ABLATION_ARGS="--set optim.warmup_steps=1 --set data.tag_vocab=$2/tags.tsv"
export HQ_ABLATION_JOBS=1 HQ_ABLATION_THREADS=1

# The outputs compared, with their SHA-256.
loop_tiny_digest() {
  (cd "$_loop_tiny_corpus/loop" && sha256sum teacher/conversations.json recaptioner/model.safetensors \
    recaptioner-onnx/onnx/*.onnx recaptioned/*.tar quality/quality.json quality/quality.md \
    ablation/table.md quality/alignment.json)
}
