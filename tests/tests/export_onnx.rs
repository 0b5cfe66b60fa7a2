//! Models written by `hq-export` are valid ONNX and compute what they should.
//!
//! Each model is built from Rust, written with `ModelBuilder::write`, then
//! - checked and run by `tests/python/onnx_check.py check` (`onnx.checker.check_model(full_check=True)`
//!   and onnxruntime's Python API on the CPU provider), which also reports metadata, opsets and the
//!   declared (symbolic) shapes;
//! - run again through `hq-runtime` (CPU) from Rust, at two batch sizes (the batch is dynamic);
//! - compared with a plain Rust f64 reference to 1e-5.
//!
//! The models cover the operators issue 6 needs for CLIP: MatMul, Add, Cast (f16 weights),
//! LayerNormalization, ReduceL2 + Div, Conv (patch embedding), Reshape, Transpose, Shape, Slice,
//! Concat, Expand (class token), the erf form of Gelu, Softmax and Gather.
//!
//! Python: `$HQ_PYTHON` (exported by `tools/env.sh`), else `<workspace>/.venv/bin/python`.
//! Library: `$ORT_DYLIB_PATH`, else the venv's onnxruntime wheel.

use std::collections::BTreeMap;
use std::error::Error;
use std::path::{Path, PathBuf};
use std::process::Command;

use hq_export::{
    f16_bits_to_f32, f32_to_f16_bits, Attr, ElemType, GraphBuilder, ModelBuilder, Node,
};
use hq_runtime::ndarray::{ArrayD, IxDyn};
use hq_runtime::{ExecutionProvider, SessionOptions};
use hq_tests::{python, workspace_root};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

type TestResult = Result<(), Box<dyn Error>>;
type BoxResult<T> = Result<T, Box<dyn Error>>;

const TOL: f64 = 1e-5;

/// `$ORT_DYLIB_PATH`, else `libonnxruntime.so.*` of the venv's onnxruntime wheel.
fn ort_dylib() -> BoxResult<PathBuf> {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let lib = workspace_root().join(".venv/lib");
    for py in std::fs::read_dir(&lib)? {
        let capi = py?.path().join("site-packages/onnxruntime/capi");
        if let Ok(entries) = std::fs::read_dir(&capi) {
            for e in entries {
                let p = e?.path();
                if p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("libonnxruntime.so."))
                {
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

fn random(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| rng.gen_range(-1.0f32..1.0) * scale)
        .collect()
}

/// What `onnx_check.py check` reports.
struct PyReport {
    json: serde_json::Value,
}

impl PyReport {
    fn result(&self, name: &str) -> BoxResult<ArrayD<f32>> {
        let r = &self.json["results"][name];
        let shape: Vec<usize> = r["shape"]
            .as_array()
            .ok_or_else(|| format!("no result `{name}` in {}", self.json))?
            .iter()
            .map(|v| v.as_u64().map(|u| u as usize).ok_or("bad shape"))
            .collect::<Result<_, _>>()?;
        let data: Vec<f32> = r["data"]
            .as_array()
            .ok_or("no data")?
            .iter()
            .map(|v| v.as_f64().map(|f| f as f32).ok_or("bad value"))
            .collect::<Result<_, _>>()?;
        Ok(ArrayD::from_shape_vec(IxDyn(&shape), data)?)
    }
}

/// Runs `onnx_check.py check` on `model` with `inputs` written to a JSON file next to it.
fn python_check(model: &Path, inputs: &[(&str, &ArrayD<f32>)]) -> BoxResult<PyReport> {
    let mut spec = serde_json::Map::new();
    for (name, a) in inputs {
        spec.insert(
            name.to_string(),
            serde_json::json!({ "shape": a.shape(), "data": a.iter().copied().collect::<Vec<f32>>() }),
        );
    }
    let inputs_path = model.with_extension("inputs.json");
    std::fs::write(&inputs_path, serde_json::Value::Object(spec).to_string())?;
    let out = Command::new(python())
        .arg(workspace_root().join("tests/python/onnx_check.py"))
        .arg("check")
        .arg(model)
        .arg("--inputs")
        .arg(&inputs_path)
        .output()?;
    if !out.status.success() {
        return Err(format!(
            "onnx_check.py check failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(PyReport {
        json: serde_json::from_slice(&out.stdout)?,
    })
}

fn assert_close(what: &str, got: &ArrayD<f32>, want: &ArrayD<f64>) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    let worst = got
        .iter()
        .zip(want.iter())
        .map(|(g, w)| (f64::from(*g) - w).abs())
        .fold(0.0, f64::max);
    assert!(worst <= TOL, "{what}: max |diff| {worst:e} > {TOL:e}");
}

// ------------------------------------------------------------------------------------------------
// Model A: y = l2norm(LayerNorm(x @ W + b)), b stored as f16
// ------------------------------------------------------------------------------------------------

const D_IN: usize = 4;
const D_OUT: usize = 6;
const EPS: f32 = 1e-5;

struct ProjWeights {
    w: Vec<f32>,
    b: Vec<f32>,
    gamma: Vec<f32>,
    beta: Vec<f32>,
}

fn proj_model(p: &ProjWeights) -> BoxResult<ModelBuilder> {
    let mut g = GraphBuilder::new("proj_ln_l2");
    g.set_doc("x @ W + b, LayerNorm, L2 normalisation (hq-export test)");
    let x = g.input("x", ElemType::F32, &["batch".into(), D_IN.into()])?;
    let w = g.initializer_f32("proj.weight", &[D_IN, D_OUT], &p.w)?;
    let b16 = g.initializer_f16("proj.bias_f16", &[D_OUT], &p.b)?;
    let gamma = g.initializer_f32("ln.weight", &[D_OUT], &p.gamma)?;
    let beta = g.initializer_f32("ln.bias", &[D_OUT], &p.beta)?;
    let b = g.op(
        "Cast",
        "proj.bias",
        &[&b16],
        [("to", Attr::Int(ElemType::F32.code()))],
    )?;
    let xw = g.op("MatMul", "proj.matmul", &[&x, &w], [])?;
    let h = g.op("Add", "proj.add", &[&xw, &b], [])?;
    let ln = g.op(
        "LayerNormalization",
        "ln",
        &[&h, &gamma, &beta],
        [("axis", Attr::Int(-1)), ("epsilon", Attr::Float(EPS))],
    )?;
    let norm = g.op(
        "ReduceL2",
        "l2.norm",
        &[&ln],
        [("axes", Attr::Ints(vec![-1])), ("keepdims", Attr::Int(1))],
    )?;
    g.add_node(
        Node::new("Div", "l2.div")
            .inputs([ln, norm])
            .output("embedding"),
    )?;
    g.output("embedding", ElemType::F32, &["batch".into(), D_OUT.into()])?;
    Ok(ModelBuilder::new(g)
        .opset("", 17)
        .metadata("hq.model", "test-proj-ln-l2")
        .metadata("hq.embed_dim", &D_OUT.to_string())
        .metadata("hq.note", "unicode ✓, spaces and = signs"))
}

fn proj_reference(p: &ProjWeights, x: &ArrayD<f32>) -> ArrayD<f64> {
    let rows = x.shape()[0];
    let b: Vec<f64> =
        p.b.iter()
            .map(|&v| f64::from(f16_bits_to_f32(f32_to_f16_bits(v))))
            .collect();
    let mut out = ArrayD::<f64>::zeros(IxDyn(&[rows, D_OUT]));
    for r in 0..rows {
        let h: Vec<f64> = (0..D_OUT)
            .map(|c| {
                b[c] + (0..D_IN)
                    .map(|k| f64::from(x[[r, k]]) * f64::from(p.w[k * D_OUT + c]))
                    .sum::<f64>()
            })
            .collect();
        let mean = h.iter().sum::<f64>() / D_OUT as f64;
        let var = h.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / D_OUT as f64;
        let inv = 1.0 / (var + f64::from(EPS)).sqrt();
        let ln: Vec<f64> = (0..D_OUT)
            .map(|c| (h[c] - mean) * inv * f64::from(p.gamma[c]) + f64::from(p.beta[c]))
            .collect();
        let norm = ln.iter().map(|v| v * v).sum::<f64>().sqrt();
        for c in 0..D_OUT {
            out[[r, c]] = ln[c] / norm;
        }
    }
    out
}

#[test]
fn projection_ln_l2_matches_python_rust_and_reference() -> TestResult {
    let mut rng = ChaCha8Rng::seed_from_u64(0x0EC5_0127);
    let p = ProjWeights {
        w: random(&mut rng, D_IN * D_OUT, 0.8),
        b: random(&mut rng, D_OUT, 0.5),
        gamma: (0..D_OUT).map(|_| rng.gen_range(0.5f32..1.5)).collect(),
        beta: random(&mut rng, D_OUT, 0.2),
    };
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("proj.onnx");
    proj_model(&p)?.write(&path)?;
    assert!(path.is_file());
    assert!(
        !dir.path().join("proj.onnx.tmp").exists(),
        "atomic write left its temporary file"
    );

    let x = ArrayD::from_shape_vec(IxDyn(&[3, D_IN]), random(&mut rng, 3 * D_IN, 2.0))?;
    let want = proj_reference(&p, &x);

    // Python: checker (full), metadata, declared shapes, onnxruntime result.
    let report = python_check(&path, &[("x", &x)])?;
    let j = &report.json;
    assert_eq!(j["ir_version"], hq_export::DEFAULT_IR_VERSION);
    assert_eq!(j["opsets"], serde_json::json!({ "": 17 }));
    let metadata: BTreeMap<String, String> = serde_json::from_value(j["metadata"].clone())?;
    let expected_md: BTreeMap<String, String> = [
        ("hq.model", "test-proj-ln-l2"),
        ("hq.embed_dim", "6"),
        ("hq.note", "unicode ✓, spaces and = signs"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(metadata, expected_md);
    assert_eq!(
        j["inputs"],
        serde_json::json!([{ "name": "x", "elem_type": "FLOAT", "shape": ["batch", 4] }])
    );
    assert_eq!(
        j["outputs"],
        serde_json::json!([{ "name": "embedding", "elem_type": "FLOAT", "shape": ["batch", 6] }])
    );
    let py = report.result("embedding")?;
    assert_close("python onnxruntime", &py, &want);

    // Rust: hq-runtime on the CPU provider, at the python batch and at batch 1.
    let rt = hq_runtime::init_from(ort_dylib()?)?;
    let mut s = rt.session_from_file(&path, &SessionOptions::new(ExecutionProvider::Cpu))?;
    assert_eq!(s.metadata("hq.embed_dim")?.as_deref(), Some("6"));
    assert_eq!(
        s.metadata("hq.note")?.as_deref(),
        Some("unicode ✓, spaces and = signs")
    );
    assert_eq!(s.inputs()[0].shape_string(), "[batch, 4]");
    let rust = s.run_f32(&[("x", x.view())])?.take("embedding")?;
    assert_close("rust hq-runtime", &rust, &want);
    let diff = rust
        .iter()
        .zip(py.iter())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(diff <= 1e-6, "python vs rust onnxruntime: {diff:e}");
    let x1 = x
        .slice(hq_runtime::ndarray::s![1..2, ..])
        .to_owned()
        .into_dyn();
    let one = s.run_f32(&[("x", x1.view())])?.take("embedding")?;
    assert_close("rust hq-runtime, batch 1", &one, &proj_reference(&p, &x1));
    for row in rust.outer_iter() {
        let n: f32 = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((n - 1.0).abs() < 1e-5, "row norm {n}");
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Model B: patch embedding + class token + Gelu(erf) + Softmax + Gather/Slice
// ------------------------------------------------------------------------------------------------

const C_IN: usize = 3;
const C: usize = 2; // embedding channels
const IMG: usize = 4;
const PATCH: usize = 2;
const GRID: usize = IMG / PATCH;
const TOKENS: usize = GRID * GRID + 1;

struct PatchWeights {
    conv_w: Vec<f32>, // [C, C_IN, PATCH, PATCH]
    conv_b: Vec<f32>, // [C]
    cls: Vec<f32>,    // [C]
}

fn patch_model(p: &PatchWeights) -> BoxResult<ModelBuilder> {
    let mut g = GraphBuilder::new("patch_tokens");
    let img = g.input(
        "image",
        ElemType::F32,
        &["batch".into(), C_IN.into(), IMG.into(), IMG.into()],
    )?;
    let w = g.initializer_f32("conv.weight", &[C, C_IN, PATCH, PATCH], &p.conv_w)?;
    let b = g.initializer_f32("conv.bias", &[C], &p.conv_b)?;
    let cls = g.initializer_f32("class_embedding", &[1, 1, C], &p.cls)?;
    let flat_shape = g.initializer_i64("const.flat_shape", &[3], &[0, C as i64, -1])?;
    let cls_tail = g.initializer_i64("const.cls_tail", &[2], &[1, C as i64])?;
    let zero = g.initializer_i64("const.zero", &[1], &[0])?;
    let one = g.initializer_i64("const.one", &[1], &[1])?;
    let tokens_end = g.initializer_i64("const.tokens_end", &[1], &[TOKENS as i64])?;
    let idx0 = g.initializer_i64("const.idx0", &[], &[0])?;
    let sqrt2 = g.initializer_f32("const.sqrt2", &[], &[std::f32::consts::SQRT_2])?;
    let f_one = g.initializer_f32("const.f_one", &[], &[1.0])?;
    let f_half = g.initializer_f32("const.f_half", &[], &[0.5])?;

    let conv = g.op(
        "Conv",
        "patch.conv",
        &[&img, &w, &b],
        [
            ("kernel_shape", Attr::from([PATCH as i64, PATCH as i64])),
            ("strides", Attr::from([PATCH as i64, PATCH as i64])),
            ("pads", Attr::from([0i64, 0, 0, 0])),
            ("auto_pad", Attr::from("NOTSET")),
        ],
    )?;
    let flat = g.op("Reshape", "patch.flatten", &[&conv, &flat_shape], [])?;
    let patches = g.op(
        "Transpose",
        "patch.transpose",
        &[&flat],
        [("perm", Attr::from([0i64, 2, 1]))],
    )?;
    // Class token broadcast to the batch: shape(image)[0:1] ++ [1, C].
    let shape = g.op("Shape", "cls.image_shape", &[&img], [])?;
    let batch = g.op("Slice", "cls.batch", &[&shape, &zero, &one], [])?;
    let cls_shape = g.op(
        "Concat",
        "cls.shape",
        &[&batch, &cls_tail],
        [("axis", Attr::Int(0))],
    )?;
    let cls_b = g.op("Expand", "cls.expand", &[&cls, &cls_shape], [])?;
    let tokens = g.op(
        "Concat",
        "tokens",
        &[&cls_b, &patches],
        [("axis", Attr::Int(1))],
    )?;
    // Gelu, erf form: 0.5 * t * (1 + erf(t / sqrt 2)).
    let scaled = g.op("Div", "gelu.div", &[&tokens, &sqrt2], [])?;
    let erf = g.op("Erf", "gelu.erf", &[&scaled], [])?;
    let erf1 = g.op("Add", "gelu.add", &[&erf, &f_one], [])?;
    let prod = g.op("Mul", "gelu.mul", &[&tokens, &erf1], [])?;
    let gelu = g.op("Mul", "gelu", &[&prod, &f_half], [])?;
    let sm = g.op("Softmax", "softmax", &[&gelu], [("axis", Attr::Int(-1))])?;
    g.add_node(
        Node::new("Gather", "pool.cls")
            .inputs([&sm, &idx0])
            .output("cls_out")
            .attr("axis", 1),
    )?;
    g.add_node(
        Node::new("Slice", "pool.rest")
            .inputs([&sm, &one, &tokens_end, &one])
            .output("rest"),
    )?;
    g.output("cls_out", ElemType::F32, &["batch".into(), C.into()])?;
    g.output(
        "rest",
        ElemType::F32,
        &["batch".into(), (TOKENS - 1).into(), C.into()],
    )?;
    Ok(ModelBuilder::new(g).metadata("hq.model", "test-patch-tokens"))
}

/// erf with |error| < 1.2e-7 (Numerical Recipes' erfc Chebyshev fit), enough for a 1e-5 check.
fn erf(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let erfc = t * poly.exp();
    if x >= 0.0 {
        1.0 - erfc
    } else {
        erfc - 1.0
    }
}

/// Returns (cls_out [B, C], rest [B, TOKENS-1, C]).
// Written with explicit indices to mirror the ONNX operators' definitions.
#[allow(clippy::needless_range_loop)]
fn patch_reference(p: &PatchWeights, img: &ArrayD<f32>) -> (ArrayD<f64>, ArrayD<f64>) {
    let batch = img.shape()[0];
    let mut cls_out = ArrayD::<f64>::zeros(IxDyn(&[batch, C]));
    let mut rest = ArrayD::<f64>::zeros(IxDyn(&[batch, TOKENS - 1, C]));
    for n in 0..batch {
        // tokens[0] = class embedding; tokens[1 + gy*GRID + gx] = conv output at (gy, gx).
        let mut tokens = [[0f64; C]; TOKENS];
        for c in 0..C {
            tokens[0][c] = f64::from(p.cls[c]);
        }
        for gy in 0..GRID {
            for gx in 0..GRID {
                for c in 0..C {
                    let mut acc = f64::from(p.conv_b[c]);
                    for ci in 0..C_IN {
                        for ky in 0..PATCH {
                            for kx in 0..PATCH {
                                let wi = ((c * C_IN + ci) * PATCH + ky) * PATCH + kx;
                                acc += f64::from(p.conv_w[wi])
                                    * f64::from(img[[n, ci, gy * PATCH + ky, gx * PATCH + kx]]);
                            }
                        }
                    }
                    tokens[1 + gy * GRID + gx][c] = acc;
                }
            }
        }
        for (t, tok) in tokens.iter().enumerate() {
            let gelu: Vec<f64> = tok
                .iter()
                .map(|&v| 0.5 * v * (1.0 + erf(v / std::f64::consts::SQRT_2)))
                .collect();
            let max = gelu.iter().copied().fold(f64::MIN, f64::max);
            let exps: Vec<f64> = gelu.iter().map(|v| (v - max).exp()).collect();
            let sum: f64 = exps.iter().sum();
            for c in 0..C {
                let v = exps[c] / sum;
                if t == 0 {
                    cls_out[[n, c]] = v;
                } else {
                    rest[[n, t - 1, c]] = v;
                }
            }
        }
    }
    (cls_out, rest)
}

#[test]
fn clip_style_ops_match_python_rust_and_reference() -> TestResult {
    let mut rng = ChaCha8Rng::seed_from_u64(0x9A7C4);
    let p = PatchWeights {
        conv_w: random(&mut rng, C * C_IN * PATCH * PATCH, 0.6),
        conv_b: random(&mut rng, C, 0.3),
        cls: random(&mut rng, C, 1.0),
    };
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("patch.onnx");
    patch_model(&p)?.write(&path)?;

    let img = ArrayD::from_shape_vec(
        IxDyn(&[2, C_IN, IMG, IMG]),
        random(&mut rng, 2 * C_IN * IMG * IMG, 1.5),
    )?;
    let (want_cls, want_rest) = patch_reference(&p, &img);

    let report = python_check(&path, &[("image", &img)])?;
    assert_eq!(report.json["metadata"]["hq.model"], "test-patch-tokens");
    assert_eq!(
        report.json["outputs"][1]["shape"],
        serde_json::json!(["batch", 4, 2])
    );
    assert_close("python cls_out", &report.result("cls_out")?, &want_cls);
    assert_close("python rest", &report.result("rest")?, &want_rest);

    let rt = hq_runtime::init_from(ort_dylib()?)?;
    let mut s = rt.session_from_file(&path, &SessionOptions::default())?;
    let mut outs = s.run_f32(&[("image", img.view())])?;
    assert_eq!(outs.names(), ["cls_out".to_string(), "rest".to_string()]);
    assert_close("rust cls_out", &outs.take("cls_out")?, &want_cls);
    assert_close("rust rest", &outs.take("rest")?, &want_rest);
    // Batch 1 through the dynamic dimension.
    let img1 = img
        .slice(hq_runtime::ndarray::s![0..1, .., .., ..])
        .to_owned()
        .into_dyn();
    let (want1, _) = patch_reference(&p, &img1);
    let got1 = s.run_f32_select(&[("image", img1.view())], &["cls_out"])?;
    assert_close("rust cls_out, batch 1", &got1[0], &want1);
    Ok(())
}

#[test]
fn checker_rejects_what_the_builder_cannot_see() -> TestResult {
    // The builder checks structure; operator semantics are the checker's job. A wrong attribute
    // type must make `onnx_check.py` fail loudly rather than pass.
    let mut g = GraphBuilder::new("bad");
    let x = g.input("x", ElemType::F32, &["n".into(), 2.into()])?;
    g.op("Softmax", "y", &[&x], [("axis", Attr::from("last"))])?;
    g.output("y", ElemType::F32, &["n".into(), 2.into()])?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bad.onnx");
    ModelBuilder::new(g).write(&path)?;
    let x = ArrayD::<f32>::zeros(IxDyn(&[1, 2]));
    match python_check(&path, &[("x", &x)]) {
        Ok(r) => Err(format!("checker accepted a string `axis`: {}", r.json).into()),
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains("onnx_check.py check failed"), "{msg}");
            Ok(())
        }
    }
}
