#!/usr/bin/env bash
# The project's main job on the built-in default data (README): set-up, release build, then the
# built-in synthetic corpus (training shards + held-out evaluation sets) and its statistics.
# Usage: tools/demo.sh [OUT_DIR]   (default: out/default)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source tools/env.sh
out="${1:-out/default}"
cargo build --release --locked -p hq-data --bin hq-data
target/release/hq-data synth --out "$out"
