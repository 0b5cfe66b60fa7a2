//! Every CUDA kernel compiles to PTX through NVRTC (the torch wheel ships libnvrtc; no GPU or
//! driver is needed), for the architectures the project targets, and each PTX module exports the
//! entry points the host code launches.
//!
//! Skips with a note only when libnvrtc cannot be loaded at all AND the environment does not
//! promise it; with `HQ_NVRTC_LIB_DIR` set (tools/env.sh sets it), failing to load or to compile
//! is a test failure.

use hq_kernels::cuda::{self, nvrtc};

fn nvrtc_or_skip() -> bool {
    match nvrtc::ensure_loaded() {
        Ok(()) => true,
        Err(e) if !nvrtc::promised() => {
            eprintln!("SKIP: libnvrtc cannot be loaded and HQ_NVRTC_LIB_DIR is unset ({e})");
            false
        }
        Err(e) => panic!("HQ_NVRTC_LIB_DIR is set but NVRTC does not load: {e}"),
    }
}

#[test]
fn every_kernel_compiles_to_ptx() {
    if !nvrtc_or_skip() {
        return;
    }
    let (major, minor) = nvrtc::version().expect("nvrtcVersion");
    eprintln!("NVRTC {major}.{minor}");
    // NVRTC's default, Ampere (A100), Hopper (H100/H200).
    for arch in [None, Some("compute_80"), Some("compute_90")] {
        let ptx = cuda::compile_all_ptx(arch).unwrap_or_else(|e| panic!("{arch:?}: {e}"));
        assert_eq!(ptx.len(), nvrtc::SOURCES.len());
        for (file, text) in &ptx {
            assert!(text.contains(".version"), "{file}: not PTX");
            if let Some(a) = arch {
                let target = format!(".target sm_{}", &a["compute_".len()..]);
                assert!(
                    text.contains(&target),
                    "{file} for {a}: no `{target}` in the PTX"
                );
            }
            let (_, entries) = nvrtc::ENTRY_POINTS
                .iter()
                .find(|(f, _)| f == file)
                .unwrap_or_else(|| panic!("{file}: no entry list"));
            for e in *entries {
                assert!(
                    text.contains(&format!(".entry {e}(")),
                    "{file} ({arch:?}): entry point {e} missing"
                );
            }
            eprintln!(
                "{file} ({}): {} bytes of PTX",
                arch.unwrap_or("default"),
                text.len()
            );
        }
    }
}

#[test]
fn every_launched_kernel_has_an_entry_point() {
    for k in cuda::Kernel::ALL {
        let (_, entries) = nvrtc::ENTRY_POINTS
            .iter()
            .find(|(f, _)| *f == k.file())
            .unwrap_or_else(|| panic!("{}: unknown file {}", k.name(), k.file()));
        assert!(
            entries.contains(&k.name()),
            "{} is launched but not listed in {}",
            k.name(),
            k.file()
        );
    }
}

#[test]
fn compile_errors_are_reported_with_the_log() {
    if !nvrtc_or_skip() {
        return;
    }
    let e = nvrtc::compile(
        "clip.cu",
        "extern \"C\" __global__ void broken() { undeclared_thing(); }",
        None,
    )
    .expect_err("must not compile");
    let msg = e.to_string();
    assert!(
        msg.contains("clip.cu") && msg.contains("undeclared_thing"),
        "{msg}"
    );
}
