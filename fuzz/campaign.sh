#!/usr/bin/env bash
# A coverage-guided campaign (libFuzzer through bolero, stable toolchain): builds the harness with
# the flags `cargo bolero test --engine libfuzzer --sanitizer NONE` sets, then runs each target for
# SECONDS on one core, starting from a copy of its committed corpus (the committed corpus is not
# grown), and prints one JSON line per target: executions, coverage, corpus, crashes.
# Usage (repository root, after `source tools/env.sh`):
#   bash fuzz/campaign.sh SECONDS OUT_DIR [FEATURES_ARGS] -- TARGET...
#   e.g. bash fuzz/campaign.sh 120 /tmp/camp --no-default-features -- tar_shard npy
# (cargo-bolero itself fails here to link the crate's lib-test binary against the engine, so the
# build is `cargo test --test targets --no-run` with the same RUSTFLAGS; each run is what
# cargo-bolero would exec.)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
secs="$1"; out="$2"; shift 2
features=()
while [[ $# -gt 0 && "$1" != "--" ]]; do features+=("$1"); shift; done
shift
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module --cfg fuzzing_libfuzzer \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-pc-table -Cllvm-args=-sanitizer-coverage-trace-compares \
-Cllvm-args=-sanitizer-coverage-stack-depth"
export BOLERO_FUZZER=libfuzzer CARGO_INCREMENTAL=0
target_dir="${HQ_FUZZ_TARGET_DIR:-target/fuzz-libfuzzer}"
exe="$(cargo test --locked -j "${HQ_FUZZ_JOBS:-1}" --target x86_64-unknown-linux-gnu --profile fuzz \
  "${features[@]}" -p hq-fuzz --target-dir "$target_dir" --test targets --no-run \
  --message-format=json 2>/dev/null | "${HQ_PYTHON:-python3}" -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "targets" and m.get("executable"):
        print(m["executable"])')"
for t in "$@"; do
  d="$out/$t"
  rm -rf "$d"; mkdir -p "$d/corpus" "$d/crashes"
  cp fuzz/tests/__fuzz__/"$t"/corpus/* "$d/corpus/" 2>/dev/null || true
  start=$(date +%s)
  BOLERO_TEST_NAME="$t" BOLERO_LIBTEST_HARNESS=1 \
  BOLERO_LIBFUZZER_ARGS="$d/corpus $d/crashes -artifact_prefix=$d/crashes/ -timeout=10 -rss_limit_mb=4096 -max_total_time=$secs -print_final_stats=1" \
    "$exe" "$t" --exact --nocapture --quiet --test-threads 1 >"$d/log" 2>&1 || true
  end=$(date +%s)
  "${HQ_PYTHON:-python3}" - "$t" "$d" $((end - start)) <<'PY'
import json, os, re, sys
t, d, secs = sys.argv[1], sys.argv[2], int(sys.argv[3])
log = open(os.path.join(d, "log"), errors="replace").read()
last = [l for l in log.splitlines() if re.match(r"#\d+\s", l)]
m = re.search(r"#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)", last[-1]) if last else None
crashes = sorted(f for f in os.listdir(os.path.join(d, "crashes")))
print(json.dumps({
    "target": t, "seconds": secs,
    "executions": int(m.group(1)) if m else None,
    "coverage_edges": int(m.group(2)) if m else None,
    "features": int(m.group(3)) if m else None,
    "corpus": int(m.group(4)) if m else None,
    "crashes": crashes,
}))
PY
done
