//! Compiles the vendored `proto/onnx.proto` into Rust types with protox (a pure-Rust protobuf
//! compiler, so no `protoc` binary is needed on build machines) and prost-build.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/onnx.proto");
    let fds = protox::compile(["onnx.proto"], ["proto"])?;
    prost_build::Config::new().compile_fds(fds)?;
    Ok(())
}
