//! Compiles the vendored `proto/onnx.proto` into Rust types with protox (a pure-Rust protobuf
//! compiler, so no `protoc` binary is needed on build machines) and prost-build.
//!
//! The `hq-export` binary reads model configs through `hq-train`, which links libtorch (no libtorch
//! code runs during an export, but the dynamic loader still resolves the library): an rpath to
//! libtorch's folder lets the binary start without LD_LIBRARY_PATH. That needs `torch-sys` as a
//! direct dependency, or cargo hides `DEP_TCH_LIBTORCH_LIB` from this script.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/onnx.proto");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib_dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
    }
    let fds = protox::compile(["onnx.proto"], ["proto"])?;
    prost_build::Config::new().compile_fds(fds)?;
    Ok(())
}
