//! Compiles `csrc/c10d_shim.cpp` against the headers of the torch wheel that torch-sys links
//! (`<site-packages>/torch/include`), with Gloo's headers from `vendor/gloo`, and NCCL support when
//! the wheel's CUDA and NCCL headers are installed beside it (`nvidia/cu13/include`,
//! `nvidia/nccl/include`, as pip installs them with torch's CUDA wheel).

use std::path::{Path, PathBuf};

fn main() {
    hq_build_support::link_libtorch_with_cuda();
    println!("cargo:rerun-if-changed=csrc/c10d_shim.cpp");
    println!("cargo:rerun-if-changed=vendor/gloo");
    println!("cargo:rerun-if-env-changed=HQ_DIST_NO_NCCL");
    let lib = match std::env::var("DEP_TCH_LIBTORCH_LIB") {
        Ok(dir) => PathBuf::from(dir),
        Err(_) => {
            panic!("DEP_TCH_LIBTORCH_LIB is unset: hq-dist must depend on torch-sys directly")
        }
    };
    let torch = lib.parent().unwrap_or(Path::new("/")).to_path_buf();
    let include = torch.join("include");
    let header = include.join("torch/csrc/distributed/c10d/ProcessGroupGloo.hpp");
    assert!(
        header.exists(),
        "{} is missing: libtorch without c10d",
        header.display()
    );
    let site = torch.parent().unwrap_or(Path::new("/")).to_path_buf();
    let cuda_include = site.join("nvidia/cu13/include");
    let nccl_include = site.join("nvidia/nccl/include");
    let nccl = std::env::var_os("HQ_DIST_NO_NCCL").is_none()
        && cuda_include.join("cuda_runtime_api.h").exists()
        && nccl_include.join("nccl.h").exists()
        && lib.join("libtorch_cuda.so").exists();

    let mut build = cc::Build::new();
    build
        .cpp(true)
        .pic(true)
        .std("c++17")
        // torch >= 2.7 wheels are built with the C++11 ABI only.
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("USE_C10D_GLOO", None)
        .include("vendor")
        .flag("-isystem")
        .flag(include.to_string_lossy().as_ref())
        .flag("-isystem")
        .flag(
            include
                .join("torch/csrc/api/include")
                .to_string_lossy()
                .as_ref(),
        )
        .file("csrc/c10d_shim.cpp");
    if nccl {
        build
            .define("USE_C10D_NCCL", None)
            .define("HQ_DIST_NCCL", None)
            .define("USE_CUDA", None)
            .flag("-isystem")
            .flag(cuda_include.to_string_lossy().as_ref())
            .flag("-isystem")
            .flag(nccl_include.to_string_lossy().as_ref());
        println!("cargo:rustc-cfg=hq_dist_nccl");
    } else {
        println!("cargo:warning=hq-dist: no CUDA/NCCL headers beside the torch wheel: NCCL backend left out");
    }
    println!("cargo::rustc-check-cfg=cfg(hq_dist_nccl)");
    build.compile("hq_dist_c10d");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    if nccl {
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
    }
}
