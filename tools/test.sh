#!/usr/bin/env bash
# The project's one test command (README, .ci/run): set-up, formatting, lints, every test.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source tools/env.sh
export HQ_NO_PROGRESS=1
# CI builds once from clean: incremental state would only take disk (it reached 14 GB here).
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --locked
