fn main() {
    hq_build_support::link_libtorch_with_cuda();
    // Where the torch wheel keeps NVRTC, relative to libtorch: `<site-packages>/torch/lib` ->
    // `<site-packages>/nvidia/cu13/lib`. Recorded as a last-resort search folder for libnvrtc when
    // neither HQ_NVRTC_LIB_DIR nor the library path names one (see `src/cuda/nvrtc.rs`).
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        let guess = std::path::Path::new(&lib).join("../../nvidia/cu13/lib");
        println!("cargo:rustc-env=HQ_KERNELS_NVRTC_GUESS={}", guess.display());
        println!("cargo:rustc-env=HQ_KERNELS_TORCH_LIB={lib}");
    }
    for f in ["clip.cu", "hni.cu", "bce.cu", "common.cuh", "emu.hpp"] {
        println!("cargo:rerun-if-changed=src/cuda/{f}");
    }
}
