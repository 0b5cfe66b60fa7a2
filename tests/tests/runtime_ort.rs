//! `hq-runtime` against the venv's ONNX Runtime (the CPU-only `onnxruntime` wheel).
//!
//! - Initialisation from `ORT_DYLIB_PATH` works, and bad library paths give clear errors instead of
//!   ort's panic. ONNX Runtime is loaded once per process, so the failure cases run in a child
//!   process: this test binary re-runs itself with `HQ_RUNTIME_TEST_CHILD=<mode>` and a filter that
//!   selects only `child_process_entry` (a no-op in normal runs).
//! - CUDA and TensorRT on this build are errors that name the provider, never a CPU fallback.
//! - A model written by `onnx.helper` (tests/python/onnx_check.py make-model) and ones written by
//!   hq-export give the expected numbers; wrong input names, shapes and types are named errors.
//!
//! Library: `$ORT_DYLIB_PATH` (exported by `tools/env.sh`), else the venv's onnxruntime wheel.
//! Python: `$HQ_PYTHON`, else `<workspace>/.venv/bin/python`.

use std::error::Error;
use std::path::{Path, PathBuf};
use std::process::Command;

use hq_export::{ElemType, GraphBuilder, ModelBuilder, Node};
use hq_runtime::ndarray::{Array2, ArrayD, IxDyn};
use hq_runtime::{Dim, ExecutionProvider, RuntimeError, SessionOptions};
use hq_tests::{python, workspace_root};

type TestResult = Result<(), Box<dyn Error>>;

const CHILD_ENV: &str = "HQ_RUNTIME_TEST_CHILD";

/// `$ORT_DYLIB_PATH`, else `libonnxruntime.so.*` of the venv's onnxruntime wheel.
fn ort_dylib() -> Result<PathBuf, Box<dyn Error>> {
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

fn runtime() -> Result<&'static hq_runtime::Runtime, Box<dyn Error>> {
    Ok(hq_runtime::init_from(ort_dylib()?)?)
}

/// y = x @ w + b with x [batch, 3], built with hq-export.
fn affine_model(w: &[f32; 6], b: &[f32; 2]) -> Result<Vec<u8>, Box<dyn Error>> {
    let mut g = GraphBuilder::new("affine");
    let x = g.input("x", ElemType::F32, &["batch".into(), 3.into()])?;
    let w = g.initializer_f32("w", &[3, 2], w)?;
    let b = g.initializer_f32("b", &[2], b)?;
    let xw = g.op("MatMul", "matmul", &[&x, &w], [])?;
    let y = g.op("Add", "y", &[&xw, &b], [])?;
    g.output(&y, ElemType::F32, &["batch".into(), 2.into()])?;
    Ok(ModelBuilder::new(g).metadata("kind", "affine").to_bytes()?)
}

fn affine_reference(x: &Array2<f32>, w: &[f32], b: &[f32]) -> Array2<f32> {
    let mut y = Array2::<f32>::zeros((x.nrows(), 2));
    for r in 0..x.nrows() {
        for c in 0..2 {
            let mut acc = f64::from(b[c]);
            for k in 0..3 {
                acc += f64::from(x[[r, k]]) * f64::from(w[k * 2 + c]);
            }
            y[[r, c]] = acc as f32;
        }
    }
    y
}

fn max_abs_diff(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape());
    a.iter()
        .zip(b.iter())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn sample_x(rows: usize) -> Array2<f32> {
    Array2::from_shape_fn((rows, 3), |(r, c)| {
        (r as f32 - 1.5) * 0.7 + c as f32 * 0.3 - 0.2
    })
}

#[test]
fn init_with_venv_ort_works() -> TestResult {
    let rt = runtime()?;
    assert_eq!(rt.dylib(), std::fs::canonicalize(ort_dylib()?)?);
    // Initialising again (from the env var or the same path) returns the same runtime.
    assert!(std::ptr::eq(rt, runtime()?));
    assert!(hq_runtime::runtime().is_some());
    assert!(rt.is_available(&ExecutionProvider::Cpu)?);
    assert!(rt.available_providers()?.contains(&"CPUExecutionProvider"));
    Ok(())
}

#[test]
fn gpu_providers_are_errors_not_fallbacks() -> TestResult {
    let rt = runtime()?;
    let model = affine_model(&[0.0; 6], &[0.0; 2])?;
    let cache = tempfile::tempdir()?;
    let cases = [
        (
            "cuda".parse::<ExecutionProvider>()?,
            "CUDAExecutionProvider",
        ),
        ("cuda:1".parse()?, "CUDAExecutionProvider"),
        ("tensorrt".parse()?, "TensorrtExecutionProvider"),
        (
            ExecutionProvider::tensorrt(0)
                .with_cache_dir(cache.path().join("trt"))
                .with_fp16(true),
            "TensorrtExecutionProvider",
        ),
    ];
    for (provider, ort_name) in cases {
        if rt.is_available(&provider)? {
            eprintln!("{provider} is available in this ONNX Runtime build; the CPU-only check does not apply");
            continue;
        }
        let err = match rt.session_from_memory(&model, &SessionOptions::new(provider.clone())) {
            Ok(s) => {
                return Err(format!("{provider}: got a session ({s:?}) instead of an error").into())
            }
            Err(e) => e,
        };
        assert!(
            matches!(
                err,
                RuntimeError::ProviderUnavailable { .. }
                    | RuntimeError::ProviderRegistration { .. }
            ),
            "{provider}: {err:?}"
        );
        let msg = err.to_string();
        eprintln!("{provider}: {msg}");
        assert!(msg.contains(ort_name), "{provider}: {msg}");
        assert!(msg.contains(&provider.to_string()), "{provider}: {msg}");
        assert!(
            msg.contains("CPUExecutionProvider"),
            "lists what is available: {msg}"
        );
        // The same through the file path and the env-var entry point.
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("m.onnx");
        std::fs::write(&path, &model)?;
        assert!(hq_runtime::load_session(&path, &provider).is_err());
    }
    Ok(())
}

#[test]
fn python_written_model_gives_the_right_numbers() -> TestResult {
    runtime()?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("py_affine.onnx");
    let out = Command::new(python())
        .arg(workspace_root().join("tests/python/onnx_check.py"))
        .arg("make-model")
        .arg(&path)
        .output()?;
    if !out.status.success() {
        return Err(format!(
            "make-model failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    let spec: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let floats = |v: &serde_json::Value| -> Vec<f32> {
        let mut out = Vec::new();
        let mut stack = vec![v];
        while let Some(v) = stack.pop() {
            match v {
                serde_json::Value::Array(a) => stack.extend(a.iter().rev()),
                serde_json::Value::Number(n) => out.push(n.as_f64().unwrap_or(f64::NAN) as f32),
                _ => {}
            }
        }
        out
    };
    let (w, b) = (floats(&spec["W"]), floats(&spec["b"]));
    assert_eq!((w.len(), b.len()), (6, 2));

    let mut session = hq_runtime::load_session(&path, &ExecutionProvider::Cpu)?;
    assert_eq!(
        session.inputs()[0].dims,
        vec![Dim::Dynamic(Some("batch".into())), Dim::Fixed(3)]
    );
    assert_eq!(
        session.metadata("source")?.as_deref(),
        Some("onnx_check.py")
    );
    assert_eq!(session.metadata("absent")?, None);
    for rows in [1, 4] {
        let x = sample_x(rows);
        let y = session.run_f32(&[("x", x.view().into_dyn())])?.take("y")?;
        let expected = affine_reference(&x, &w, &b).into_dyn();
        let d = max_abs_diff(&y, &expected);
        assert!(d < 1e-6, "batch {rows}: max |diff| {d}");
    }
    Ok(())
}

#[test]
fn hq_export_model_runs_from_memory_with_checked_io() -> TestResult {
    let rt = runtime()?;
    let w = [1.0, -2.0, 0.5, 0.25, -1.5, 3.0];
    let b = [0.125, -0.5];
    let mut session = rt.session_from_memory(&affine_model(&w, &b)?, &SessionOptions::default())?;
    assert_eq!(session.metadata("kind")?.as_deref(), Some("affine"));
    assert_eq!(session.inputs()[0].shape_string(), "[batch, 3]");

    let x = sample_x(5);
    let expected = affine_reference(&x, &w, &b).into_dyn();
    let outs = session.run_f32(&[("x", x.view().into_dyn())])?;
    assert_eq!(outs.names(), ["y".to_string()]);
    assert!(max_abs_diff(outs.get("y")?, &expected) < 1e-6);
    // A non-contiguous view (a transpose of a transpose) is copied and gives the same answer.
    let xt = x.t().to_owned();
    let y = session.run_f32_select(&[("x", xt.t().into_dyn())], &["y"])?;
    assert!(max_abs_diff(&y[0], &expected) < 1e-6);

    // Named errors.
    match outs.get("z") {
        Err(RuntimeError::MissingOutput { name, available }) => {
            assert_eq!((name.as_str(), available), ("z", vec!["y".to_string()]));
        }
        other => return Err(format!("expected MissingOutput, got {other:?}").into()),
    }
    let view = x.view().into_dyn();
    match session.run_f32_select(&[("x", view.clone())], &["nope"]) {
        Err(RuntimeError::MissingOutput { name, .. }) => assert_eq!(name, "nope"),
        other => return Err(format!("expected MissingOutput, got {other:?}").into()),
    }
    match session.run_f32(&[("input", view.clone())]) {
        Err(e @ RuntimeError::UnknownInput { .. }) => {
            assert!(e.to_string().contains("`input`"), "{e}")
        }
        other => return Err(format!("expected UnknownInput, got {other:?}").into()),
    }
    match session.run_f32(&[]) {
        Err(RuntimeError::MissingInput { name, .. }) => assert_eq!(name, "x"),
        other => return Err(format!("expected MissingInput, got {other:?}").into()),
    }
    match session.run_f32(&[("x", view.clone()), ("x", view.clone())]) {
        Err(RuntimeError::DuplicateInput { name }) => assert_eq!(name, "x"),
        other => return Err(format!("expected DuplicateInput, got {other:?}").into()),
    }
    let wrong = ArrayD::<f32>::zeros(IxDyn(&[2, 4]));
    match session.run_f32(&[("x", wrong.view())]) {
        Err(e @ RuntimeError::ShapeMismatch { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("[2, 4]") && msg.contains("[batch, 3]"),
                "{msg}"
            );
        }
        other => return Err(format!("expected ShapeMismatch, got {other:?}").into()),
    }
    let rank1 = ArrayD::<f32>::zeros(IxDyn(&[3]));
    assert!(matches!(
        session.run_f32(&[("x", rank1.view())]),
        Err(RuntimeError::ShapeMismatch { .. })
    ));
    Ok(())
}

#[test]
fn non_f32_inputs_and_bad_models_are_named_errors() -> TestResult {
    let rt = runtime()?;
    // Token-embedding lookup: ids (i64) -> Gather from an f32 table.
    let mut g = GraphBuilder::new("embed");
    let ids = g.input("ids", ElemType::I64, &["batch".into(), "seq".into()])?;
    let table = g.initializer_f32("table", &[4, 2], &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])?;
    g.add_node(
        Node::new("Gather", "embed")
            .inputs([&table, &ids])
            .output("emb")
            .attr("axis", 0),
    )?;
    g.output(
        "emb",
        ElemType::F32,
        &["batch".into(), "seq".into(), 2.into()],
    )?;
    let mut s = rt.session_from_memory(
        &ModelBuilder::new(g).to_bytes()?,
        &SessionOptions::default(),
    )?;
    let x = ArrayD::<f32>::zeros(IxDyn(&[1, 3]));
    match s.run_f32(&[("ids", x.view())]) {
        Err(e @ RuntimeError::ElementType { .. }) => {
            assert!(e.to_string().contains("Int64"), "{e}")
        }
        other => return Err(format!("expected ElementType, got {other:?}").into()),
    }

    let dir = tempfile::tempdir()?;
    let missing = dir.path().join("missing.onnx");
    match rt.session_from_file(&missing, &SessionOptions::default()) {
        Err(e @ RuntimeError::SessionCreate { .. }) => {
            assert!(e.to_string().contains("missing.onnx"), "{e}")
        }
        other => return Err(format!("expected SessionCreate, got {other:?}").into()),
    }
    let garbage = dir.path().join("garbage.onnx");
    std::fs::write(&garbage, b"not a model")?;
    assert!(matches!(
        rt.session_from_file(&garbage, &SessionOptions::default()),
        Err(RuntimeError::SessionCreate { .. })
    ));
    Ok(())
}

/// Runs this test binary again with only `child_process_entry` selected and `mode` set.
fn run_child(mode: &str, dylib_env: Option<&Path>) -> Result<String, Box<dyn Error>> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args([
        "child_process_entry",
        "--exact",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(CHILD_ENV, mode);
    match dylib_env {
        Some(p) => cmd.env("ORT_DYLIB_PATH", p),
        None => cmd.env_remove("ORT_DYLIB_PATH"),
    };
    let out = cmd.output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!(
            "child `{mode}` failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    if !stdout.contains(&format!("CHILD {mode} OK")) {
        return Err(format!("child `{mode}` did not run its checks:\n{stdout}").into());
    }
    Ok(stdout)
}

#[test]
fn invalid_explicit_paths_are_clear_errors() -> TestResult {
    let good = ort_dylib()?;
    let out = run_child("explicit", Some(&good))?;
    assert!(out.contains("does not exist"), "{out}");
    Ok(())
}

#[test]
fn missing_or_wrong_env_var_is_a_clear_error() -> TestResult {
    run_child("env-unset", None)?;
    run_child(
        "env-bad",
        Some(Path::new("/nonexistent/libonnxruntime.so.1.31.1")),
    )?;
    Ok(())
}

/// The body of the child processes above; does nothing unless `HQ_RUNTIME_TEST_CHILD` is set.
#[test]
fn child_process_entry() -> TestResult {
    let Ok(mode) = std::env::var(CHILD_ENV) else {
        return Ok(());
    };
    match mode.as_str() {
        "explicit" => {
            let good = PathBuf::from(std::env::var("ORT_DYLIB_PATH")?);
            // A path that does not exist.
            let err = hq_runtime::init_from("/nonexistent/dir/libonnxruntime.so.1.31.1")
                .err()
                .ok_or("missing file accepted")?;
            println!("missing: {err}");
            assert!(matches!(err, RuntimeError::DylibNotFound { .. }), "{err:?}");
            assert!(err
                .to_string()
                .contains("/nonexistent/dir/libonnxruntime.so.1.31.1"));
            // A file that is not a shared library.
            let dir = tempfile::tempdir()?;
            let text = dir.path().join("libonnxruntime.so");
            std::fs::write(&text, "not a library")?;
            let err = hq_runtime::init_from(&text)
                .err()
                .ok_or("text file accepted")?;
            println!("text file: {err}");
            assert!(matches!(err, RuntimeError::DylibLoad { .. }), "{err:?}");
            assert!(err.to_string().contains(&*text.to_string_lossy()));
            assert!(err.to_string().contains("not a shared library"), "{err}");
            // A real shared library that is not ONNX Runtime (found on the loader's search path).
            let err = hq_runtime::init_from("libm.so.6")
                .err()
                .ok_or("libm accepted")?;
            println!("libm: {err}");
            assert!(err.to_string().contains("OrtGetApiBase"), "{err}");
            // A bare name the loader cannot find.
            let err = hq_runtime::init_from("libhq_no_such_onnxruntime.so")
                .err()
                .ok_or("unknown name accepted")?;
            println!("unknown: {err}");
            assert!(matches!(err, RuntimeError::DylibLoad { .. }), "{err:?}");
            assert!(err.to_string().contains("search path"), "{err}");
            // Failed attempts leave nothing behind: the right library still loads ...
            let rt = hq_runtime::init_from(&good)?;
            assert!(rt.is_available(&ExecutionProvider::Cpu)?);
            // ... and a different one afterwards is refused, not ignored.
            let err = hq_runtime::init_from(&text)
                .err()
                .ok_or("re-init accepted")?;
            assert!(
                matches!(err, RuntimeError::AlreadyInitialised { .. }),
                "{err:?}"
            );
        }
        "env-unset" => {
            let err = hq_runtime::init()
                .err()
                .ok_or("init without ORT_DYLIB_PATH succeeded")?;
            println!("unset: {err}");
            assert!(matches!(err, RuntimeError::DylibPathUnset), "{err:?}");
            assert!(err.to_string().contains("ORT_DYLIB_PATH"));
            // Session creation goes through init too: an error, not ort's panic.
            let err = hq_runtime::load_session("model.onnx", &ExecutionProvider::Cpu)
                .err()
                .ok_or("session without a runtime")?;
            assert!(matches!(err, RuntimeError::DylibPathUnset), "{err:?}");
        }
        "env-bad" => {
            let err = hq_runtime::init()
                .err()
                .ok_or("init from a bad ORT_DYLIB_PATH succeeded")?;
            println!("bad env: {err}");
            assert!(matches!(err, RuntimeError::DylibNotFound { .. }), "{err:?}");
            let msg = err.to_string();
            assert!(
                msg.contains("/nonexistent/libonnxruntime.so.1.31.1")
                    && msg.contains("ORT_DYLIB_PATH"),
                "{msg}"
            );
            let err = hq_runtime::load_session("model.onnx", &"cuda".parse()?)
                .err()
                .ok_or("session without a runtime")?;
            assert!(matches!(err, RuntimeError::DylibNotFound { .. }), "{err:?}");
        }
        other => return Err(format!("unknown child mode {other}").into()),
    }
    println!("CHILD {mode} OK");
    Ok(())
}
