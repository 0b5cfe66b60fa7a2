//! hq-kernels' tch entry points on CPU tensors: the fused losses inside a tch autograd graph
//! (through `exp(logit_scale)`, weighted sums of losses, dtype casts, non-contiguous views), held
//! against tch autograd of the unfused formulas; no-grad mode; the error cases; the backend choice.

use hq_kernels::testing::{err_text as err, REL};
use hq_kernels::{
    clip_loss, clip_loss_local, clip_loss_with, hni_loss, row_gate, short_tag_bce, Backend,
    Options, TagTargets,
};
use tch::{Device, Kind, Tensor};

fn randn(shape: &[i64], seed: i64) -> Tensor {
    tch::manual_seed(seed);
    Tensor::randn(shape, (Kind::Float, Device::Cpu))
}

fn unit_rows(t: &Tensor) -> Tensor {
    t / t.norm_scalaropt_dim(2.0, [1i64].as_slice(), true)
}

fn leaf(t: &Tensor) -> Tensor {
    t.detach().copy().set_requires_grad(true)
}

fn max_rel(got: &Tensor, want: &Tensor) -> f64 {
    let scale = want.abs().max().double_value(&[]).max(1e-30);
    (got.to_kind(Kind::Double) - want.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
        / scale
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor) {
    let r = max_rel(got, want);
    assert!(r <= REL, "{what}: max relative error {r:.3e}");
}

fn unfused_clip(x: &Tensor, y: &Tensor, s: &Tensor) -> Tensor {
    let n = x.size()[0];
    let logits = x.matmul(&y.tr()) * s;
    let labels = Tensor::arange(n, (Kind::Int64, Device::Cpu));
    (logits.cross_entropy_for_logits(&labels) + logits.tr().cross_entropy_for_logits(&labels)) / 2.0
}

#[test]
fn clip_loss_joins_autograd_through_the_log_scale() {
    let (n, d) = (96, 48);
    let x0 = unit_rows(&randn(&[n, d], 1));
    let y0 = unit_rows(&(&x0 * 0.3 + unit_rows(&randn(&[n, d], 2))));
    // The model's parameter is the log-scale; the loss gets s = exp(logit_scale).clamp(max 100).
    let ls0 = Tensor::from((1.0f64 / 0.07).ln() as f32);

    let (x, y, ls) = (leaf(&x0), leaf(&y0), leaf(&ls0));
    let out = clip_loss(&x, &y, &ls.exp().clamp_max(100.0)).expect("fused");
    (&out.loss * 0.7).backward();

    let (xr, yr, lsr) = (leaf(&x0), leaf(&y0), leaf(&ls0));
    let want = unfused_clip(&xr, &yr, &lsr.exp().clamp_max(100.0));
    (&want * 0.7).backward();

    let (a, b) = (out.loss.double_value(&[]), want.double_value(&[]));
    assert!(((a - b) / b).abs() < REL, "loss {a} vs {b}");
    assert_eq!(out.loss.kind(), Kind::Float);
    assert_eq!(out.loss.dim(), 0);
    assert_close("dx", &x.grad(), &xr.grad());
    assert_close("dy", &y.grad(), &yr.grad());
    let (g, w) = (ls.grad().double_value(&[]), lsr.grad().double_value(&[]));
    assert!(
        (g - w).abs() <= 1e-4 * w.abs().max(1e-3),
        "d logit_scale {g} vs {w}"
    );
    // The gate: one 0/1 float per row, no grad.
    assert_eq!(out.gate.size(), vec![n]);
    assert!(!out.gate.requires_grad());
}

#[test]
fn all_three_losses_in_one_graph() {
    let (n, d, k, kk) = (40i64, 32i64, 2i64, 5000i64);
    let x0 = unit_rows(&randn(&[n, d], 3));
    let y0 = unit_rows(&(&x0 * 0.8 + unit_rows(&randn(&[n, d], 4))));
    let neg0 = randn(&[n, k, d], 5);
    let neg0 = &neg0 / neg0.norm_scalaropt_dim(2.0, [2i64].as_slice(), true);
    let z0 = randn(&[n, kk], 6) * 4.0;
    let rows: Vec<Vec<i64>> = (0..n)
        .map(|i| (0..(i % 6)).map(|j| (i * 37 + j * 911) % kk).collect())
        .collect();
    let targets = TagTargets::from_rows(&rows);
    let s0 = Tensor::from(20.0f32);
    let (alpha, beta) = (0.5, 10.0);

    let (x, y, neg, z, s) = (leaf(&x0), leaf(&y0), leaf(&neg0), leaf(&z0), leaf(&s0));
    let c = clip_loss(&x, &y, &s).expect("clip");
    let h = hni_loss(&x, &y, &neg, &s, 0, Some(&c.gate)).expect("hni");
    let b = short_tag_bce(&z, &targets).expect("bce");
    let total = &c.loss + &h * alpha + &b * beta;
    total.backward();

    let (xr, yr, negr, zr, sr) = (leaf(&x0), leaf(&y0), leaf(&neg0), leaf(&z0), leaf(&s0));
    let clip = unfused_clip(&xr, &yr, &sr);
    let sims = xr.matmul(&yr.tr()).detach();
    let gate = sims
        .diagonal(0, 0, 1)
        .ge_tensor(&sims.amax([1i64].as_slice(), false))
        .to_kind(Kind::Float);
    let pos = (&xr * &yr)
        .sum_dim_intlist([1i64].as_slice(), false, Kind::Float)
        .unsqueeze(1);
    let negs = xr.unsqueeze(1).matmul(&negr.transpose(1, 2)).squeeze_dim(1);
    let logits = Tensor::cat(&[pos, negs], 1) * &sr;
    let hni =
        (-logits.log_softmax(1, Kind::Float).select(1, 0) * &gate).sum(Kind::Float) / n as f64;
    let mut dense = vec![0.0f32; (n * kk) as usize];
    for (i, r) in rows.iter().enumerate() {
        for &c in r {
            dense[i * kk as usize + c as usize] = 1.0;
        }
    }
    let t = Tensor::from_slice(&dense).reshape([n, kk]);
    let bce = zr.binary_cross_entropy_with_logits::<Tensor>(&t, None, None, tch::Reduction::Sum)
        / n as f64;
    let want = &clip + &hni * alpha + &bce * beta;
    want.backward();

    assert!(gate.equal(&c.gate), "gate differs from tch's argmax gate");
    let (a, w) = (total.double_value(&[]), want.double_value(&[]));
    assert!(((a - w) / w).abs() < REL, "total {a} vs {w}");
    assert_close("dx", &x.grad(), &xr.grad());
    assert_close("dy", &y.grad(), &yr.grad());
    assert_close("dneg", &neg.grad(), &negr.grad());
    assert_close("dz", &z.grad(), &zr.grad());
    let (g, w) = (s.grad().double_value(&[]), sr.grad().double_value(&[]));
    assert!((g - w).abs() <= 1e-4 * w.abs().max(1e-3), "ds {g} vs {w}");
}

#[test]
fn local_form_gradients_reach_all_four_inputs() {
    let (n, world, d) = (24i64, 3i64, 20i64);
    let m = n * world;
    let xa0 = unit_rows(&randn(&[m, d], 7));
    let ya0 = unit_rows(&(&xa0 * 0.5 + unit_rows(&randn(&[m, d], 8))));
    let off = n;
    let (xl0, yl0) = (xa0.narrow(0, off, n), ya0.narrow(0, off, n));
    let s0 = Tensor::from(15.0f32);
    let (xl, yl, xa, ya, s) = (leaf(&xl0), leaf(&yl0), leaf(&xa0), leaf(&ya0), leaf(&s0));
    let out = clip_loss_local(&xl, &yl, &xa, &ya, &s, off).expect("local");
    out.loss.backward();
    let (xlr, ylr, xar, yar, sr) = (leaf(&xl0), leaf(&yl0), leaf(&xa0), leaf(&ya0), leaf(&s0));
    let labels = Tensor::arange_start(off, off + n, (Kind::Int64, Device::Cpu));
    let want = ((xlr.matmul(&yar.tr()) * &sr).cross_entropy_for_logits(&labels)
        + (ylr.matmul(&xar.tr()) * &sr).cross_entropy_for_logits(&labels))
        / 2.0;
    want.backward();
    let (a, w) = (out.loss.double_value(&[]), want.double_value(&[]));
    assert!(((a - w) / w).abs() < REL, "loss {a} vs {w}");
    for (name, g, r) in [
        ("x_local", &xl, &xlr),
        ("y_local", &yl, &ylr),
        ("x_all", &xa, &xar),
        ("y_all", &ya, &yar),
    ] {
        assert_close(name, &g.grad(), &r.grad());
    }
    assert_eq!(out.gate.size(), vec![n]);
}

#[test]
fn dtypes_views_and_no_grad() {
    let (n, d) = (33i64, 17i64);
    let x0 = unit_rows(&randn(&[n, d], 9));
    let y0 = unit_rows(&randn(&[n, d], 10));
    let s = Tensor::from(10.0f32);
    let base = clip_loss(&x0, &y0, &s).expect("f32").loss.double_value(&[]);
    // f64 leaves: gradients come back as f64.
    let (x, y) = (
        leaf(&x0.to_kind(Kind::Double)),
        leaf(&y0.to_kind(Kind::Double)),
    );
    let l = clip_loss(&x, &y, &s).expect("f64");
    l.loss.backward();
    assert_eq!(x.grad().kind(), Kind::Double);
    assert!((l.loss.double_value(&[]) - base).abs() < 1e-6);
    // A transposed (non-contiguous) view.
    let xt = leaf(&x0.tr().contiguous());
    let l = clip_loss(&xt.tr(), &y0, &s).expect("view");
    l.loss.backward();
    assert_eq!(xt.grad().size(), vec![d, n]);
    assert!((l.loss.double_value(&[]) - base).abs() < 1e-6);
    // No inputs that require grad, or no-grad mode: a plain value, no graph.
    let v = clip_loss(&x0, &y0, &s).expect("plain").loss;
    assert!(!v.requires_grad());
    let xg = leaf(&x0);
    let v = tch::no_grad(|| clip_loss(&xg, &y0, &s).expect("no_grad").loss);
    assert!(!v.requires_grad());
    assert!((v.double_value(&[]) - base).abs() < 1e-6);
    // bf16 inputs are accepted (computed in f32).
    let l = clip_loss(&x0.to_kind(Kind::BFloat16), &y0.to_kind(Kind::BFloat16), &s).expect("bf16");
    assert!(l.loss.double_value(&[]).is_finite());
}

#[test]
fn gate_helper_agrees_with_the_clip_gate() {
    let (n, d) = (50i64, 24i64);
    let x = unit_rows(&randn(&[n, d], 11));
    let y = unit_rows(&(&x * 0.6 + unit_rows(&randn(&[n, d], 12))));
    let s = Tensor::from(30.0f32);
    let c = clip_loss(&x, &y, &s).expect("clip");
    let g = row_gate(&x, &y, &s, 0).expect("gate");
    assert!(g.equal(&c.gate));
    // hni without a gate computes the same one.
    let neg = unit_rows(&randn(&[n, d], 13));
    let a = hni_loss(&x, &y, &neg, &s, 0, Some(&c.gate))
        .expect("with gate")
        .double_value(&[]);
    let b = hni_loss(&x, &y, &neg, &s, 0, None)
        .expect("without gate")
        .double_value(&[]);
    assert_eq!(a, b);
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let x = unit_rows(&randn(&[8, 4], 14));
    let s = Tensor::from(10.0f32);
    let e = err(clip_loss(&x, &unit_rows(&randn(&[8, 5], 15)), &s).map(|o| o.loss));
    assert!(e.contains("widths differ"), "{e}");
    let e = err(clip_loss(&x, &unit_rows(&randn(&[7, 4], 15)), &s).map(|o| o.loss));
    assert!(e.contains("rows"), "{e}");
    let e = err(clip_loss(&x.flatten(0, -1), &x, &s).map(|o| o.loss));
    assert!(e.contains("2-D"), "{e}");
    let e = err(clip_loss(&x.to_kind(Kind::Int64), &x, &s).map(|o| o.loss));
    assert!(e.contains("dtype"), "{e}");
    let empty = Tensor::zeros([0, 4], (Kind::Float, Device::Cpu));
    let e = err(clip_loss(&empty, &empty, &s).map(|o| o.loss));
    assert!(e.contains("N = 0"), "{e}");
    let e = err(clip_loss(&x, &x, &Tensor::from_slice(&[1.0f32, 2.0])).map(|o| o.loss));
    assert!(e.contains("scale must hold one value"), "{e}");
    let e = err(clip_loss(&x, &x, &Tensor::from(0.0f32)).map(|o| o.loss));
    assert!(e.contains("positive multiplier"), "{e}");
    let bad = x.copy();
    let _ = bad.get(3).get(2).fill_(f64::NAN);
    let e = err(clip_loss(&bad, &x, &s).map(|o| o.loss));
    assert!(
        e.contains("x (image embeddings)") && e.contains("row 3, column 2"),
        "{e}"
    );
    let e = err(clip_loss_local(&x, &x, &x, &x, &s, 1).map(|o| o.loss));
    assert!(e.contains("offset"), "{e}");
    let e = err(clip_loss_local(&x, &x, &x, &x, &s, -1).map(|o| o.loss));
    assert!(e.contains("negative"), "{e}");
    let e = err(hni_loss(&x, &x, &randn(&[8, 0, 4], 16), &s, 0, None));
    assert!(e.contains("N- must be at least 1"), "{e}");
    let e = err(hni_loss(&x, &x, &randn(&[7, 1, 4], 16), &s, 0, None));
    assert!(e.contains("negatives have 7 rows"), "{e}");
    let e = err(hni_loss(
        &x,
        &x,
        &randn(&[8, 1, 4], 16),
        &s,
        0,
        Some(&Tensor::from_slice(&[0.5f32; 8])),
    ));
    assert!(e.contains("gate[0]"), "{e}");
    let z = randn(&[2, 3], 17);
    let e = err(short_tag_bce(
        &z,
        &TagTargets::from_rows(&[vec![0i64], vec![7]]),
    ));
    assert!(e.contains("row 1 has tag index 7, outside 0..3"), "{e}");
    // Backend::Cuda with CPU tensors: an error, not a panic.
    let opts = Options {
        backend: Backend::Cuda,
        ..Options::default()
    };
    let e = err(clip_loss_with(&x, &x, &s, &opts).map(|o| o.loss));
    assert!(e.contains("backend Cuda"), "{e}");
}

#[test]
fn every_cpu_path_gives_the_same_loss() {
    let (n, d) = (70i64, 40i64);
    let x = unit_rows(&randn(&[n, d], 18));
    let y = unit_rows(&randn(&[n, d], 19));
    let s = Tensor::from(50.0f32);
    let base = clip_loss(&x, &y, &s).expect("auto").loss.double_value(&[]);
    for isa in hq_kernels::Isa::available() {
        let opts = Options {
            backend: Backend::Cpu,
            isa: Some(isa),
            ..Options::default()
        };
        let v = clip_loss_with(&x, &y, &s, &opts)
            .expect("cpu")
            .loss
            .double_value(&[]);
        assert!(((v - base) / base).abs() < 1e-6, "{isa:?}: {v} vs {base}");
    }
}

/// Per row i, the smallest `|x_i . y_j - x_i . y_i|` over texts j != i, in f64: how far the
/// row's HNI gate decision is from flipping.
fn gate_margins(x: &Tensor, y: &Tensor) -> Tensor {
    let p = x
        .to_kind(Kind::Double)
        .matmul(&y.to_kind(Kind::Double).tr());
    let own = p.diagonal(0, 0, 1).unsqueeze(1);
    let n = p.size()[0];
    let off = Tensor::eye(n, (Kind::Double, Device::Cpu)) * 1e9;
    ((&p - &own).abs() + off).amin(1, false)
}

#[test]
fn small_batch_schedule_equals_the_tiled_kernel() {
    // dense_small picks libtorch's GEMM + the fused element-wise pass for N <= 2 D; without it
    // the tiled kernel runs. Both against each other and against the unfused autograd.
    for &(n, d, seed) in &[
        (1i64, 8i64, 30i64),
        (37, 20, 31),
        (130, 96, 32),
        (200, 128, 33),
    ] {
        let x0 = unit_rows(&randn(&[n, d], seed));
        let y0 = unit_rows(&(&x0 * 0.3 + unit_rows(&randn(&[n, d], seed + 100))));
        // The gates of the two schedules are compared exactly on the rows where no decision
        // can flip by rounding, whichever GEMM path MKL takes on this CPU: a float32 dot product
        // of unit vectors of length d errs by at most gamma_d = d u / (1 - d u) (u = 2^-24) in
        // any summation order, a gate compares two of them, so a margin above 2 gamma_d gives
        // every implementation the exact sign. Rows below it may go either way (n = 200 has one
        // at 1.6e-6, where MKL's AVX-512 and non-Intel paths happen to agree with the kernel).
        let u = f64::powi(2.0, -24);
        let bound = 2.0 * d as f64 * u / (1.0 - d as f64 * u);
        let decided = gate_margins(&x0, &y0).gt(bound);
        let undecided = n - decided.sum(Kind::Int64).int64_value(&[]);
        assert!(
            undecided <= n / 50,
            "n={n}: {undecided} gates within rounding"
        );
        let ls0 = Tensor::from(4.0f32);
        let run = |dense: bool| {
            let (x, y, ls) = (leaf(&x0), leaf(&y0), leaf(&ls0));
            let opts = Options {
                dense_small: dense,
                ..Options::default()
            };
            let out = clip_loss_with(&x, &y, &ls.exp(), &opts).expect("loss");
            out.loss.backward();
            (
                out.loss.double_value(&[]),
                out.gate,
                x.grad(),
                y.grad(),
                ls.grad(),
            )
        };
        let (dense, tiled) = (run(true), run(false));
        let (xr, yr, lsr) = (leaf(&x0), leaf(&y0), leaf(&ls0));
        let want = unfused_clip(&xr, &yr, &lsr.exp());
        want.backward();
        let w = want.double_value(&[]);
        for (name, got) in [("dense", &dense), ("tiled", &tiled)] {
            assert!(
                (got.0 - w).abs() <= REL * w.abs().max(1e-6),
                "n={n} {name} loss {} vs {w}",
                got.0
            );
            assert_close(&format!("n={n} {name} dx"), &got.2, &xr.grad());
            assert_close(&format!("n={n} {name} dy"), &got.3, &yr.grad());
            let (g, r) = (got.4.double_value(&[]), lsr.grad().double_value(&[]));
            assert!(
                (g - r).abs() <= 1e-4 * r.abs().max(1e-3),
                "n={n} {name} ds {g} vs {r}"
            );
        }
        assert_eq!(
            dense.1.masked_select(&decided),
            tiled.1.masked_select(&decided),
            "n={n}: gates"
        );
    }
}
