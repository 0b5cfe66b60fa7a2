//! Build-script helpers shared by every crate whose binaries, tests or benches link libtorch.
//!
//! tch links only `libtorch_cpu` by default (tch-rs issue 980): the CUDA half of libtorch is never
//! loaded, so `tch::Cuda::is_available()` is false even on a GPU machine. The fix has to be in the
//! build script of each package that produces a linked artefact, because `cargo:rustc-link-arg`
//! only reaches that package's own targets. That package must depend on `torch-sys` directly, or
//! cargo hides `DEP_TCH_LIBTORCH_LIB` from its build script.

/// Emit the link arguments that make libtorch's CUDA library load with the binary: an rpath to the
/// libtorch directory (no LD_LIBRARY_PATH needed at run time) and `libtorch.so` linked with
/// `--no-as-needed` so the linker keeps it although no symbol is referenced directly.
pub fn link_libtorch_with_cuda() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    match std::env::var("DEP_TCH_LIBTORCH_LIB") {
        Ok(lib_dir) => {
            println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
            println!("cargo:rustc-link-arg=-L{lib_dir}");
            println!("cargo:rustc-link-arg=-ltorch");
        }
        Err(_) => println!(
            "cargo:warning=DEP_TCH_LIBTORCH_LIB is unset: add torch-sys as a direct dependency; \
             binaries of this crate will see only libtorch_cpu"
        ),
    }
}
