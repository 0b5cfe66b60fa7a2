#!/usr/bin/env bash
# Regenerates the seed corpora (tests/__fuzz__/<target>/corpus) from files the project writes:
# a tiny synthetic corpus (hq-data synth), a 2-step training run (hq-train: checkpoint, train
# state, tag vocabulary, config), an evaluation (hq-eval run: results.json), the recaptioner's
# configs (transformers, as its fine-tuning saves them); then `write_seeds` assembles them per
# target.
# Usage (from the repository root, after `source tools/env.sh`): bash fuzz/seeds/make.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cargo build --locked -j 2 -p hq-data -p hq-train -p hq-eval-cli --bins
bin="${CARGO_TARGET_DIR:-target}/debug"
"$bin/hq-data" synth --out "$work/synth" --samples 6 --shard-size 3 --image-size 32 \
  --eval-samples 4 --eval-shard-size 4 --threads 1 --no-progress >/dev/null
cat > "$work/model.json" <<'JSON'
{"embed_dim": 8, "vision_cfg": {"image_size": 32, "layers": 1, "width": 8, "head_width": 8, "patch_size": 16}, "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 8, "heads": 1, "layers": 1}}
JSON
cat > "$work/cfg.toml" <<TOML
[model]
config = "$work/model.json"
[data]
shuffle_buffer = 4
tag_vocab_size = 50
[loss]
hni_weight = 0.5
stc_weight = 1.0
[optim]
warmup_steps = 1
[run]
steps = 2
batch_size = 2
device = "cpu"
precision = "fp32"
checkpoint_every = 2
keep_checkpoints = 1
TOML
"$bin/hq-train" --config "$work/cfg.toml" --variant stc --train "$work/synth/train/shard-{00000..00001}.tar" \
  --out "$work/run" --threads 1 >/dev/null 2>&1
mkdir -p "$work/root"
ln -s "$work/synth/eval/wds_synth_color_test" "$work/root/wds_cifar10_test"
"$bin/hq-eval" run --model "$work/run/checkpoints/step-00000002" --data-root "$work/root" \
  --tasks cifar10 vtab/dtd --out "$work/eval" --threads 1 --quiet >/dev/null 2>&1
"${HQ_PYTHON:-python3}" fuzz/seeds/qwen2vl_configs.py "$work/qwen2vl"
"${HQ_PYTHON:-python3}" tests/python/hf_tokenizer_reference.py make "$work/wordpiece" 2>/dev/null
# .npy members as numpy writes them (multi-label targets, metadata): versions 1.0 and 2.0.
mkdir -p "$work/npy"
"${HQ_PYTHON:-python3}" - "$work/npy" <<'PY'
import sys
import numpy as np
from numpy.lib import format as npf
d = sys.argv[1]
np.save(f"{d}/bool-multilabel.npy", np.array([True, False, False, True, True]))
np.save(f"{d}/f8-fortran.npy", np.asfortranarray(np.arange(6, dtype="<f8").reshape(2, 3)))
np.save(f"{d}/i8-big.npy", np.array([7, -1], dtype=">i8"))
with open(f"{d}/u2-v2.npy", "wb") as f:
    npf.write_array(f, np.arange(4, dtype="<u2"), version=(2, 0))
PY
HQ_FUZZ_SEEDS="$work:$PWD/fuzz/tests/__fuzz__" cargo test --locked -j 2 -p hq-fuzz --test targets write_seeds \
  -- --ignored --exact
