#!/usr/bin/env bash
# Runs a command with libtorch's MKL (and ATen's kernels) on a chosen CPU code path, so that a
# test's independence from vendor-BLAS rounding can be shown on one machine. CI machines of this
# project come with Intel or AMD CPUs; MKL rounds the same SGEMM differently on each.
#
#   tools/cpu-paths.sh PATH [--] COMMAND...      e.g. tools/cpu-paths.sh non-intel -- bash tools/test.sh
#
# PATH:
#   native     as the machine is (no change)
#   avx2       MKL_ENABLE_INSTRUCTIONS=AVX2 and ATEN_CPU_CAPABILITY=avx2 (an AVX2-only Intel CPU)
#   sse42      MKL_ENABLE_INSTRUCTIONS=SSE4_2 and ATEN_CPU_CAPABILITY=default
#   non-intel  MKL's non-Intel path (tools/mkl_non_intel.c preloaded) and ATEN_CPU_CAPABILITY=avx2:
#              what an AMD EPYC Zen 3 (AVX2, no AVX-512) runs
# Before running COMMAND it checks with MKL_VERBOSE that MKL really took the path asked for, and
# fails if not. ONNX Runtime's MLAS dispatches by CPUID alone and cannot be steered this way.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
usage() { sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[[ $# -ge 2 ]] || usage
path="$1"; shift
[[ "${1:-}" == "--" ]] && shift
[[ $# -ge 1 ]] || usage
case "$path" in
    native) want="" ;;
    avx2) export MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2; want="(Intel(R) AVX2)" ;;
    sse42) export MKL_ENABLE_INSTRUCTIONS=SSE4_2 ATEN_CPU_CAPABILITY=default; want="(Intel(R) SSE4.2)" ;;
    non-intel)
        shim_dir="$root/target/cpu-paths"
        shim="$shim_dir/mkl_non_intel.so"
        mkdir -p "$shim_dir"
        if [[ ! -f "$shim" || "$root/tools/mkl_non_intel.c" -nt "$shim" ]]; then
            gcc -shared -fPIC -O2 -o "$shim.tmp" "$root/tools/mkl_non_intel.c"
            mv "$shim.tmp" "$shim"
        fi
        export LD_PRELOAD="$shim${LD_PRELOAD:+:$LD_PRELOAD}" ATEN_CPU_CAPABILITY=avx2
        # On a non-Intel CPU this is the native path already, reported in MKL's own words.
        if grep -qm1 GenuineIntel /proc/cpuinfo; then want="Intel(R) Architecture processors"; else want="oneMKL"; fi ;;
    *) echo "cpu-paths: unknown path '$path' (native, avx2, sse42, non-intel)" >&2; exit 2 ;;
esac
if [[ -n "$want" ]]; then
    source "$root/tools/env.sh"
    header="$(MKL_VERBOSE=1 "$HQ_PYTHON" -c 'import torch; torch.ones(8, 8) @ torch.ones(8, 8)' 2>&1 \
        | grep -m1 'MKL_VERBOSE oneMKL' || true)"
    if [[ "$header" != *"$want"* ]]; then
        echo "cpu-paths: MKL did not take the '$path' path; it says: ${header:-nothing}" >&2
        exit 1
    fi
    echo "cpu-paths: $path: ${header#MKL_VERBOSE }" >&2
fi
exec "$@"
