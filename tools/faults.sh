#!/usr/bin/env bash
# Fault campaigns on the long jobs (tools/faults/README.md): kill -9 at random points, disk full,
# a read-only output folder, an input shard damaged while the job runs; after each, the same
# command is rerun and its output compared with an uninterrupted run's.
# Usage: tools/faults.sh [campaign.py options], e.g.
#   tools/faults.sh --ci                                   # the small mode tools/test.sh runs
#   tools/faults.sh --job train --trials 20 --seed 1       # one job
#   tools/faults.sh --json benches/results/reliability_faults.json   # the full campaign
# HQ_BIN=DIR takes the binaries from DIR and builds nothing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source tools/env.sh
if [[ -z "${HQ_BIN:-}" ]]; then
  cargo build --release --locked -p hq-data --bin hq-data -p hq-train --bin hq-train --bin hq-ablation \
    -p hq-eval-cli --bin hq-eval -p hq-export --bin hq-export -p hq-runtime --bin hq-recap-trt
  export HQ_BIN="${CARGO_TARGET_DIR:-target}/release"
fi
exec "$HQ_PYTHON" tools/faults/campaign.py "$@"
