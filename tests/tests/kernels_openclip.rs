//! The fused contrastive loss against open_clip's `ClipLoss` (Python, the project's venv), on the
//! same inputs: loss value and the gradients to the image and text features and to the log-scale
//! parameter (the loss receives `logit_scale.exp()`, as open_clip's model hands it over). Both the
//! single-process loss and the distributed local loss (`--local-loss --gather-with-grad`, run
//! through open_clip's own rank/world-size code with `gather_features` replaced by the gathered
//! tensors) are covered.
//!
//! open_clip is evaluated twice: in float64 on the same f32 inputs (open_clip's own formula,
//! evaluated exactly: the 1e-5 comparison), and in float32 as it runs in training. The float32 run
//! is itself off the exact value by f32 rounding of logits of size s (about 1e-7 s absolute, which
//! is 100% of a nearly-zero loss at s = 100), so it is compared at 2e-4 relative plus that
//! absolute floor. dL/dlogit_scale is one sum whose terms cancel; its error is measured against the
//! size of its summands, as in kernels_cpu.rs.
//!
//! Needs `HQ_PYTHON` (set by tools/env.sh): skips with a note when it is unset, fails when it is
//! set but the script or open_clip fails.

use std::path::Path;
use std::process::Command;

use hq_kernels::{clip_loss, clip_loss_local, reference};
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

struct Case {
    name: &'static str,
    n: usize,
    d: usize,
    world: usize,
    rank: usize,
    logit_scale: f32,
    /// How strongly each text is pulled towards its image (0: unrelated; 0.5: nearly-right rows).
    pull: f64,
}

const CASES: &[Case] = &[
    Case {
        name: "single_n1",
        n: 1,
        d: 8,
        world: 1,
        rank: 0,
        logit_scale: 2.659_26,
        pull: 0.2,
    },
    Case {
        name: "clip_init",
        n: 37,
        d: 64,
        world: 1,
        rank: 0,
        logit_scale: 2.659_26,
        pull: 0.2,
    },
    Case {
        name: "clamped_at_100",
        n: 130,
        d: 512,
        world: 1,
        rank: 0,
        logit_scale: 4.605_17,
        pull: 0.1,
    },
    Case {
        name: "nearly_right_rows",
        n: 130,
        d: 512,
        world: 1,
        rank: 0,
        logit_scale: 4.605_17,
        pull: 0.4,
    },
    Case {
        name: "odd_sizes",
        n: 200,
        d: 77,
        world: 1,
        rank: 0,
        logit_scale: 3.9,
        pull: 0.2,
    },
    Case {
        name: "local_rank0",
        n: 16,
        d: 32,
        world: 4,
        rank: 0,
        logit_scale: 3.0,
        pull: 0.2,
    },
    Case {
        name: "local_rank3",
        n: 16,
        d: 32,
        world: 4,
        rank: 3,
        logit_scale: 3.0,
        pull: 0.2,
    },
    Case {
        name: "local_odd",
        n: 33,
        d: 65,
        world: 2,
        rank: 1,
        logit_scale: 4.605_17,
        pull: 0.15,
    },
];

fn unit_rows(n: usize, d: usize, seed: i64, pull_from: Option<(&Tensor, f64)>) -> Tensor {
    tch::manual_seed(seed);
    let mut t = Tensor::randn([n as i64, d as i64], (Kind::Float, Device::Cpu));
    if let Some((x, pull)) = pull_from {
        t = x * pull + &t / (d as f64).sqrt();
    }
    &t / t.norm_scalaropt_dim(2.0, [1i64].as_slice(), true)
}

fn write_f32(dir: &Path, name: &str, t: &Tensor) {
    let v = Vec::<f32>::try_from(&t.flatten(0, -1)).expect("f32 data");
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(dir.join(name), bytes).expect("write input");
}

fn read_f64(dir: &Path, name: &str) -> Vec<f64> {
    let b = std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    b.chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect()
}

fn grad_vec(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(&t.grad().to_kind(Kind::Double).flatten(0, -1)).expect("grad")
}

/// (max |got - want|, max |want|).
fn max_err(got: &[f64], want: &[f64]) -> (f64, f64) {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    (
        got.iter()
            .zip(want)
            .map(|(g, w)| (g - w).abs())
            .fold(0.0, f64::max),
        scale,
    )
}

#[test]
fn contrastive_loss_matches_open_clip() {
    let Ok(python) = std::env::var("HQ_PYTHON") else {
        eprintln!("SKIP: HQ_PYTHON is unset (source tools/env.sh to run the open_clip comparison)");
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut spec = Vec::new();
    // Inputs, and our results (fused entry points inside tch autograd).
    struct Ours {
        loss: f64,
        grads: Vec<(&'static str, Vec<f64>)>,
        dls: f64,
        dls_mag: f64,
    }
    let mut ours = Vec::new();
    for (ci, c) in CASES.iter().enumerate() {
        let m = c.n * c.world;
        let x_all = unit_rows(m, c.d, 100 + ci as i64, None);
        let y_all = unit_rows(m, c.d, 200 + ci as i64, Some((&x_all, c.pull)));
        let ls = Tensor::from(c.logit_scale).set_requires_grad(true);
        let s = ls.exp();
        let sv = s.double_value(&[]);
        let leaf = |t: &Tensor| t.detach().copy().set_requires_grad(true);
        let o = if c.world == 1 {
            write_f32(dir.path(), &format!("{}.x.f32", c.name), &x_all);
            write_f32(dir.path(), &format!("{}.y.f32", c.name), &y_all);
            let (x, y) = (leaf(&x_all), leaf(&y_all));
            let out = clip_loss(&x, &y, &s).expect("fused loss");
            out.loss.backward();
            let xv = Vec::<f32>::try_from(&x_all.flatten(0, -1)).expect("x");
            let yv = Vec::<f32>::try_from(&y_all.flatten(0, -1)).expect("y");
            let r = reference::clip_symmetric(&xv, &yv, c.n, c.d, sv);
            Ours {
                loss: out.loss.double_value(&[]),
                grads: vec![("x", grad_vec(&x)), ("y", grad_vec(&y))],
                dls: ls.grad().double_value(&[]),
                dls_mag: r.dscale_mag * sv,
            }
        } else {
            let off = c.rank * c.n;
            let (xl0, yl0) = (
                x_all.narrow(0, off as i64, c.n as i64),
                y_all.narrow(0, off as i64, c.n as i64),
            );
            for (k, t) in [
                ("x_all", &x_all),
                ("y_all", &y_all),
                ("x_local", &xl0),
                ("y_local", &yl0),
            ] {
                write_f32(dir.path(), &format!("{}.{k}.f32", c.name), t);
            }
            let (xl, yl, xa, ya) = (leaf(&xl0), leaf(&yl0), leaf(&x_all), leaf(&y_all));
            let out =
                clip_loss_local(&xl, &yl, &xa, &ya, &s, off as i64).expect("fused local loss");
            out.loss.backward();
            let v =
                |t: &Tensor| Vec::<f32>::try_from(&t.contiguous().flatten(0, -1)).expect("data");
            let r = reference::clip_local(
                &v(&xl0),
                &v(&yl0),
                &v(&x_all),
                &v(&y_all),
                c.n,
                m,
                c.d,
                off,
                sv,
            );
            Ours {
                loss: out.loss.double_value(&[]),
                grads: vec![
                    ("x_local", grad_vec(&xl)),
                    ("y_local", grad_vec(&yl)),
                    ("x_all", grad_vec(&xa)),
                    ("y_all", grad_vec(&ya)),
                ],
                dls: ls.grad().double_value(&[]),
                dls_mag: r.dscale_mag * sv,
            }
        };
        ours.push((o, sv));
        spec.push(json!({"name": c.name, "n": c.n, "d": c.d, "world": c.world, "rank": c.rank, "logit_scale": c.logit_scale}));
    }
    std::fs::write(
        dir.path().join("cases.json"),
        serde_json::to_vec(&spec).expect("json"),
    )
    .expect("cases.json");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/kernels_openclip.py");
    let out = Command::new(&python)
        .arg(&script)
        .arg(dir.path())
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{} failed:\n{}\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for (c, (o, s)) in CASES.iter().zip(&ours) {
        // float64: 1e-5 relative. float32: 2e-4 relative plus open_clip's own f32 rounding of
        // logits of size s (the loss and dL/dlogit_scale are sums over the batch, the gradient
        // rows carry a 1/n).
        for (dtype, rel, floor) in [("float64", 1e-5, 0.0), ("float32", 2e-4, 1e-7 * s)] {
            let tag = format!("{}.{dtype}", c.name);
            let r: Value = serde_json::from_slice(
                &std::fs::read(dir.path().join(format!("{tag}.out.json"))).expect("out json"),
            )
            .expect("parse");
            let want = r["loss"].as_f64().expect("loss");
            let err = (o.loss - want).abs();
            // Our loss is an f32 scalar: allow its rounding on top.
            assert!(
                err <= (rel + 1e-7) * want.abs() + floor + 1e-15,
                "{tag}: loss {} vs open_clip {want} (error {err:.2e})",
                o.loss
            );
            for (k, g) in &o.grads {
                let w = read_f64(dir.path(), &format!("{tag}.grad_{k}.f64"));
                let (e, scale) = max_err(g, &w);
                assert!(
                    e <= rel * scale + floor / c.n as f64 + 1e-15,
                    "{tag}: d{k} max error {e:.2e} vs scale {scale:.2e} (open_clip {})",
                    r["open_clip"]
                );
            }
            let wls = r["grad_logit_scale"].as_f64().expect("grad");
            let e = (o.dls - wls).abs();
            assert!(
                e <= rel * o.dls_mag.max(wls.abs()) + 1e-7 * wls.abs() + floor + 1e-15,
                "{tag}: d logit_scale {} vs open_clip {wls} (summands {:.3e})",
                o.dls,
                o.dls_mag
            );
            eprintln!("{tag}: loss {:.9e} vs open_clip {want:.9e}: ok", o.loss);
        }
    }
}
