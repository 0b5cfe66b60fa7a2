# Source this file (`source tools/env.sh`): it runs the idempotent set-up, then exports what the
# build and the binaries need: libtorch for tch (taken from the venv's torch), ORT_DYLIB_PATH for
# ort's load-dynamic, NVRTC for the kernels, and offline switches so nothing tries a model hub.
_hq_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$_hq_root/tools/setup.sh" || return 1 2>/dev/null || exit 1
export HQ_ROOT="$_hq_root"
export HQ_VENV="${HQ_VENV:-$_hq_root/.venv}"
export HQ_PYTHON="$HQ_VENV/bin/python"
_hq_site="$("$HQ_PYTHON" -c 'import site; print(site.getsitepackages()[0])')"
export PATH="$HQ_VENV/bin:$PATH"
# torch-sys asks the venv's python for libtorch's location and C++ ABI.
export LIBTORCH_USE_PYTORCH=1
export ORT_DYLIB_PATH="$_hq_site/onnxruntime/capi/libonnxruntime.so.1.31.1"
export HQ_NVRTC_LIB_DIR="$_hq_site/nvidia/cu13/lib"
export LD_LIBRARY_PATH="$HQ_NVRTC_LIB_DIR:$_hq_site/torch/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
unset _hq_root _hq_site
