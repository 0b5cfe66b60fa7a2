//! Shared by the recaptioner tests: the venv's Python and ONNX Runtime, and the tiny random
//! Qwen2-VL built and exported once per test process (export/qwen2vl/make_tiny_qwen2vl.py).

#![allow(dead_code)]

pub use hq_tests::{python, workspace_root};
use std::error::Error;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

pub type TestResult = Result<(), Box<dyn Error>>;

/// `$ORT_DYLIB_PATH`, else `libonnxruntime.so.*` of the venv's onnxruntime wheel.
pub fn ort_dylib() -> Result<PathBuf, Box<dyn Error>> {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let lib = workspace_root().join(".venv/lib");
    for py in std::fs::read_dir(&lib)? {
        let capi = py?.path().join("site-packages/onnxruntime/capi");
        if let Ok(entries) = std::fs::read_dir(&capi) {
            for e in entries {
                let p = e?.path();
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                if name.starts_with("libonnxruntime.so.") {
                    return Ok(p);
                }
            }
        }
    }
    Err(format!(
        "no ORT_DYLIB_PATH and no onnxruntime wheel under {}",
        lib.display()
    )
    .into())
}

pub fn init_ort() -> Result<(), Box<dyn Error>> {
    hq_runtime::init_from(ort_dylib()?)?;
    Ok(())
}

/// Runs the venv's Python with `args`, failing with its stderr.
pub fn run_python(args: &[&std::ffi::OsStr]) -> Result<String, Box<dyn Error>> {
    let out = Command::new(python())
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_OFFLINE", "1")
        .output()
        .map_err(|e| {
            format!(
                "cannot run {} (set HQ_PYTHON or run `source tools/env.sh`): {e}",
                python().display()
            )
        })?;
    if !out.status.success() {
        return Err(format!(
            "{:?} failed: {}\n{}",
            args,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// (HF checkpoint dir, exported ONNX model dir) of the tiny model, built once per process.
pub struct TinyModel {
    _dir: tempfile::TempDir,
    pub hf: PathBuf,
    pub onnx: PathBuf,
}

static TINY: OnceLock<Result<TinyModel, String>> = OnceLock::new();

pub fn tiny_model() -> Result<&'static TinyModel, Box<dyn Error>> {
    let built = TINY.get_or_init(|| {
        let build = || -> Result<TinyModel, Box<dyn Error>> {
            let dir = tempfile::tempdir()?;
            let hf = dir.path().join("hf");
            let onnx = dir.path().join("onnx-model");
            let script = workspace_root().join("export/qwen2vl/make_tiny_qwen2vl.py");
            run_python(&[
                script.as_os_str(),
                "--out".as_ref(),
                hf.as_os_str(),
                "--export".as_ref(),
                onnx.as_os_str(),
                "--no-verify".as_ref(),
            ])?;
            Ok(TinyModel {
                _dir: dir,
                hf,
                onnx,
            })
        };
        build().map_err(|e| e.to_string())
    });
    built.as_ref().map_err(|e| e.clone().into())
}

/// A deterministic RGB test image: smooth gradients plus seeded noise (so resampling matters).
pub fn test_image(width: u32, height: u32, seed: u64) -> image::RgbImage {
    let mut state = seed
        .wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(1_442_695_040_888_963_407);
    image::RgbImage::from_fn(width, height, |x, y| {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let noise = (state >> 58) as u32; // 0..63
        let r = (x * 255 / width.max(1) + noise) % 256;
        let g = (y * 255 / height.max(1) + 2 * noise) % 256;
        let b = ((x + y) * 128 / (width + height).max(1) + (seed as u32 * 37) + noise) % 256;
        image::Rgb([r as u8, g as u8, b as u8])
    })
}

/// Token ids of a JSON array (the reference scripts' output).
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_u64())
                .map(|x| x as u32)
                .collect()
        })
        .unwrap_or_default()
}
