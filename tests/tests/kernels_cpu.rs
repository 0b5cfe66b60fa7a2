//! hq-kernels CPU implementations against the f64 references and against tch autograd of the
//! unfused formulas, on fresh random inputs of many shapes (awkward ones included), for every
//! CPU code path this machine has (generic, AVX2, AVX-512), plus the bad-input errors.
//!
//! Tolerance: "1e-5 relative" is measured per output tensor against its own scale,
//! `max_e |got_e - want_e| <= 1e-5 * max_e |want_e|` (a tiny absolute floor covers all-zero
//! tensors), the usual way to compare a whole gradient. At logit scale s = 100 the contrastive
//! loss and its gradients get `testing::rel_at_scale` (2.4e-5): half an ulp of an f32 logit of
//! size 100 is already 6e-6 relative in every probability (a run with seed 1795338391725127520
//! missed 1e-5 by 14% on a 2 x 3 batch whose whole gradient was one probability of 1e-10).
//!
//! dL/ds is one sum over all N x M logits whose terms cancel (each softmax row sums to one);
//! an f32 implementation's error there is measured against the size of its summands,
//! `sum_ij |dL/dlogit_ij * logit_ij / s|` ([`reference::RefClip::dscale_mag`]), the conditioning-
//! aware form of "relative". (tch's own f32 autograd misses dL/ds by up to 5e-4 relative at s =
//! 100; the fused pass computes it as `sum w P (l - l_label)`, without the cancellation.)
//!
//! Inputs are drawn from a fresh seed each run (printed; set HQ_TEST_SEED to replay one).

use hq_kernels::cpu::{self, Isa};
use hq_kernels::testing::{
    close_all as close_f32, close_all_within, close_scalar, close_scalar_within, close_sum,
    correlated, embeddings, err_text, rel_at_scale, seed,
};
use hq_kernels::{reference, Mat, TagTargets};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Kind, Tensor};

fn mat(data: &[f32], rows: usize, cols: usize) -> Mat<'_> {
    Mat::new(data, rows, cols).expect("shape")
}

/// Gates may only differ where the f64 margin is within f32 rounding of a tie.
fn gates_agree(got: &[f32], want: &[f64]) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(*g as f64, *w, "gate of row {i}");
    }
}

/// Whether every row's best logit beats the runner-up (or the label) by a clear margin, so that a
/// gate cannot flip between f32 and f64 evaluation.
fn clear_margins(x: &[f32], y: &[f32], n: usize, m: usize, d: usize, off: usize) -> bool {
    (0..n).all(|i| {
        let own: f64 = (0..d)
            .map(|k| x[i * d + k] as f64 * y[(off + i) * d + k] as f64)
            .sum();
        (0..m).filter(|&j| j != off + i).all(|j| {
            let o: f64 = (0..d)
                .map(|k| x[i * d + k] as f64 * y[j * d + k] as f64)
                .sum();
            (o - own).abs() > 1e-4
        })
    })
}

const SHAPES: &[(usize, usize)] = &[
    (1, 1),
    (1, 7),
    (2, 3),
    (3, 32),
    (5, 33),
    (8, 16),
    (31, 17),
    (63, 64),
    (64, 64),
    (65, 65),
    (97, 100),
    (129, 47),
    (150, 512),
];

/// Runs `case(isa, n, d, scale, x, y, tag)` for every CPU code path, shape of [`SHAPES`] and
/// scale (1, 1/0.07, 100), on fresh correlated embeddings.
fn each_symmetric_case(mut case: impl FnMut(Isa, usize, usize, f32, &[f32], &[f32], &str)) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed());
    for isa in Isa::available() {
        for &(n, d) in SHAPES {
            for &scale in &[1.0f32, 14.285_714, 100.0] {
                let x = embeddings(&mut rng, n, d);
                let y = correlated(&mut rng, &x, n, d, 0.3);
                let tag = format!("{isa:?} n={n} d={d} s={scale}");
                case(isa, n, d, scale, &x, &y, &tag);
            }
        }
    }
}

#[test]
fn clip_symmetric_matches_reference() {
    each_symmetric_case(|isa, n, d, scale, x, y, tag| {
        let got = cpu::clip_loss(mat(x, n, d), mat(y, n, d), scale, true, isa).expect("cpu");
        let want = reference::clip_symmetric(x, y, n, d, scale as f64);
        let rel = rel_at_scale(scale);
        close_scalar_within(&format!("{tag} loss"), got.loss, want.loss, rel);
        let g = got.grads.expect("grads");
        close_all_within(&format!("{tag} dx"), &g.dx, &want.dx, rel);
        close_all_within(&format!("{tag} dy"), &g.dy, &want.dy, rel);
        close_sum(
            &format!("{tag} dscale"),
            g.dscale,
            want.dscale,
            want.dscale_mag,
        );
        if clear_margins(x, y, n, n, d, 0) {
            gates_agree(&got.gate, &want.gate);
        }
        // Forward-only gives the same loss and gate.
        let fwd = cpu::clip_loss(mat(x, n, d), mat(y, n, d), scale, false, isa).expect("cpu");
        assert_eq!(fwd.loss, got.loss, "{tag}: forward-only loss");
        assert_eq!(fwd.gate, got.gate, "{tag}: forward-only gate");
        assert!(fwd.grads.is_none());
    });
}

/// The small-batch schedule (`cpu::clip_loss_from_products`, the fused element-wise part fed by
/// a BLAS's products) against the same f64 reference. The products are rounded to f32 from f64
/// here, and the gradient products `(s G) Y`, `(s G)^T X` that the entry point hands to libtorch
/// are summed in f64.
#[test]
fn clip_from_products_matches_reference() {
    each_symmetric_case(|isa, n, d, scale, x, y, tag| {
        let dot = |a: &[f32], b: &[f32]| -> f64 {
            a.iter().zip(b).map(|(&p, &q)| p as f64 * q as f64).sum()
        };
        let products: Vec<f32> = (0..n * n)
            .map(|e| dot(&x[e / n * d..][..d], &y[e % n * d..][..d]) as f32)
            .collect();
        let mut sg = products.clone();
        let got = cpu::clip_loss_from_products(&mut sg, n, scale, true, isa).expect("cpu");
        let want = reference::clip_symmetric(x, y, n, d, scale as f64);
        let rel = rel_at_scale(scale);
        close_scalar_within(&format!("{tag} loss"), got.loss, want.loss, rel);
        let (mut dx, mut dy) = (vec![0.0f64; n * d], vec![0.0f64; n * d]);
        for i in 0..n {
            for j in 0..n {
                let g = sg[i * n + j] as f64;
                for k in 0..d {
                    dx[i * d + k] += g * y[j * d + k] as f64;
                    dy[j * d + k] += g * x[i * d + k] as f64;
                }
            }
        }
        close_all_within(&format!("{tag} dx"), &dx, &want.dx, rel);
        close_all_within(&format!("{tag} dy"), &dy, &want.dy, rel);
        let ds = got.dscale.expect("dscale");
        close_sum(&format!("{tag} dscale"), ds, want.dscale, want.dscale_mag);
        if clear_margins(x, y, n, n, d, 0) {
            gates_agree(&got.gate, &want.gate);
        }
        let mut again = products.clone();
        let fwd = cpu::clip_loss_from_products(&mut again, n, scale, false, isa).expect("cpu");
        assert_eq!(fwd.loss, got.loss, "{tag}: forward-only loss");
        assert_eq!(fwd.gate, got.gate, "{tag}: forward-only gate");
        assert!(fwd.dscale.is_none());
    });
    // Bad products are named errors.
    let mut bad = vec![0.0f32, 1.0, f32::NAN, 0.0];
    let e = err_text(cpu::clip_loss_from_products(
        &mut bad,
        2,
        10.0,
        true,
        Isa::detect(),
    ));
    assert!(e.contains("logits") && e.contains("row 1"), "{e}");
    let e = err_text(cpu::clip_loss_from_products(
        &mut [0.0; 3],
        2,
        10.0,
        true,
        Isa::detect(),
    ));
    assert!(e.contains("3 products"), "{e}");
    let e = err_text(cpu::clip_loss_from_products(
        &mut [],
        0,
        10.0,
        true,
        Isa::detect(),
    ));
    assert!(e.contains("N = 0"), "{e}");
}

#[test]
fn clip_local_matches_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(seed());
    // (n local, world size, d): offsets at every rank.
    let cases = [
        (1, 1, 5),
        (1, 3, 8),
        (3, 2, 33),
        (17, 3, 64),
        (64, 2, 40),
        (70, 3, 65),
    ];
    for isa in Isa::available() {
        for &(n, world, d) in &cases {
            let m = n * world;
            let x_all = embeddings(&mut rng, m, d);
            let y_all = correlated(&mut rng, &x_all, m, d, 0.5);
            for rank in 0..world {
                let off = rank * n;
                let xl = &x_all[off * d..(off + n) * d];
                let yl = &y_all[off * d..(off + n) * d];
                let scale = 20.0f32;
                let got = cpu::clip_loss_local(
                    mat(xl, n, d),
                    mat(yl, n, d),
                    mat(&x_all, m, d),
                    mat(&y_all, m, d),
                    off,
                    scale,
                    true,
                    isa,
                )
                .expect("cpu");
                let want =
                    reference::clip_local(xl, yl, &x_all, &y_all, n, m, d, off, scale as f64);
                let tag = format!("{isa:?} n={n} m={m} d={d} off={off}");
                close_scalar(&format!("{tag} loss"), got.loss, want.loss);
                let g = got.grads.expect("grads");
                close_f32(&format!("{tag} dx_local"), &g.dx_local, &want.dx_local);
                close_f32(&format!("{tag} dy_local"), &g.dy_local, &want.dy_local);
                close_f32(&format!("{tag} dx_all"), &g.dx_all, &want.dx_all);
                close_f32(&format!("{tag} dy_all"), &g.dy_all, &want.dy_all);
                close_sum(
                    &format!("{tag} dscale"),
                    g.dscale,
                    want.dscale,
                    want.dscale_mag,
                );
                if clear_margins(xl, &y_all, n, m, d, off) {
                    gates_agree(&got.gate, &want.gate);
                }
                let fwd = cpu::clip_loss_local(
                    mat(xl, n, d),
                    mat(yl, n, d),
                    mat(&x_all, m, d),
                    mat(&y_all, m, d),
                    off,
                    scale,
                    false,
                    isa,
                )
                .expect("cpu");
                close_scalar(&format!("{tag} forward-only loss"), fwd.loss, want.loss);
                assert_eq!(fwd.gate, got.gate);
            }
        }
    }
}

#[test]
fn local_form_with_everything_local_equals_symmetric() {
    let mut rng = ChaCha8Rng::seed_from_u64(seed());
    let (n, d) = (77, 48);
    let x = embeddings(&mut rng, n, d);
    let y = correlated(&mut rng, &x, n, d, 0.4);
    let isa = Isa::detect();
    let sym = cpu::clip_loss(mat(&x, n, d), mat(&y, n, d), 30.0, true, isa).expect("sym");
    let loc = cpu::clip_loss_local(
        mat(&x, n, d),
        mat(&y, n, d),
        mat(&x, n, d),
        mat(&y, n, d),
        0,
        30.0,
        true,
        isa,
    )
    .expect("local");
    close_scalar("loss", loc.loss, sym.loss);
    let (gs, gl) = (sym.grads.expect("g"), loc.grads.expect("g"));
    let dx: Vec<f64> = gs.dx.iter().map(|&v| v as f64).collect();
    let dy: Vec<f64> = gs.dy.iter().map(|&v| v as f64).collect();
    let sum = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(p, q)| p + q).collect::<Vec<f32>>();
    close_f32("dx", &sum(&gl.dx_local, &gl.dx_all), &dx);
    close_f32("dy", &sum(&gl.dy_local, &gl.dy_all), &dy);
    let mag = reference::clip_symmetric(&x, &y, n, d, 30.0).dscale_mag;
    close_sum("dscale", gl.dscale, gs.dscale, mag);
    assert_eq!(loc.gate, sym.gate);
}

#[test]
fn row_gate_matches_reference_and_clip_gate() {
    let mut rng = ChaCha8Rng::seed_from_u64(seed());
    for &(n, m, d, off) in &[
        (1, 1, 4, 0),
        (10, 30, 16, 10),
        (70, 140, 33, 70),
        (65, 65, 64, 0),
    ] {
        let x = embeddings(&mut rng, n, d);
        let mut y = embeddings(&mut rng, m, d);
        // Make about half the rows win their own label.
        for i in (0..n).step_by(2) {
            for k in 0..d {
                y[(off + i) * d + k] = x[i * d + k];
            }
        }
        if !clear_margins(&x, &y, n, m, d, off) {
            continue;
        }
        let want = reference::row_gate(&x, &y, n, m, d, off);
        for isa in Isa::available() {
            let got = cpu::row_gate(mat(&x, n, d), mat(&y, m, d), off, 10.0, isa).expect("gate");
            gates_agree(&got, &want);
        }
        if n == m && off == 0 {
            let c = cpu::clip_loss(mat(&x, n, d), mat(&y, m, d), 10.0, false, Isa::detect())
                .expect("clip");
            gates_agree(&c.gate, &want);
        }
    }
}

#[test]
fn gate_ties_go_to_the_positive() {
    // Row 0: its own text and text 2 are both e0: a tie, which counts as a win (gate 1).
    // Row 1 prefers text 0 (0.6) over its own (0.48): gate 0.
    // Row 2 is orthogonal to every text: a three-way tie at 0, gate 1.
    let d = 4;
    let x = vec![
        1.0f32, 0.0, 0.0, 0.0, 0.6, 0.8, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0,
    ];
    let y = vec![
        1.0f32, 0.0, 0.0, 0.0, 0.0, 0.6, 0.8, 0.0, 1.0, 0.0, 0.0, 0.0,
    ];
    for isa in Isa::available() {
        let g = cpu::row_gate(mat(&x, 3, d), mat(&y, 3, d), 0, 5.0, isa).expect("gate");
        assert_eq!(g, vec![1.0, 0.0, 1.0], "{isa:?}");
        let c = cpu::clip_loss(mat(&x, 3, d), mat(&y, 3, d), 5.0, false, isa).expect("clip");
        assert_eq!(c.gate, vec![1.0, 0.0, 1.0], "{isa:?}");
        // The small-batch schedule, from the exact products.
        let mut p: Vec<f32> = (0..9)
            .map(|e| (0..d).map(|k| x[e / 3 * d + k] * y[e % 3 * d + k]).sum())
            .collect();
        let c = cpu::clip_loss_from_products(&mut p, 3, 5.0, false, isa).expect("dense");
        assert_eq!(c.gate, vec![1.0, 0.0, 1.0], "{isa:?} dense");
    }
    assert_eq!(reference::row_gate(&x, &y, 3, 3, d, 0), vec![1.0, 0.0, 1.0]);
}

#[test]
fn hni_matches_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(seed());
    for &(n, m, k, d, off) in &[
        (1, 1, 1, 1, 0),
        (4, 8, 1, 7, 4),
        (33, 33, 3, 64, 0),
        (50, 100, 2, 33, 50),
        (9, 9, 16, 512, 0),
    ] {
        let x = embeddings(&mut rng, n, d);
        let y = embeddings(&mut rng, m, d);
        let neg = embeddings(&mut rng, n * k, d);
        let gate: Vec<f32> = (0..n)
            .map(|_| if rng.gen_bool(0.6) { 1.0 } else { 0.0 })
            .collect();
        let gate64: Vec<f64> = gate.iter().map(|&g| g as f64).collect();
        for &scale in &[1.0f32, 50.0] {
            let got = cpu::hni_loss(
                mat(&x, n, d),
                mat(&y, m, d),
                &neg,
                k,
                off,
                scale,
                &gate,
                true,
            )
            .expect("hni");
            let want = reference::hni(&x, &y, &neg, n, k, d, off, scale as f64, &gate64);
            let tag = format!("n={n} m={m} k={k} d={d} s={scale}");
            let rel = rel_at_scale(scale);
            close_scalar_within(&format!("{tag} loss"), got.loss, want.loss, rel);
            let g = got.grads.expect("grads");
            close_all_within(&format!("{tag} dx"), &g.dx, &want.dx, rel);
            close_all_within(&format!("{tag} dy_pos"), &g.dy_pos, &want.dy_pos, rel);
            close_all_within(&format!("{tag} dneg"), &g.dneg, &want.dneg, rel);
            close_scalar(&format!("{tag} dscale"), g.dscale, want.dscale);
        }
    }
}

fn random_targets(rng: &mut ChaCha8Rng, n: usize, k: usize, max_pos: usize) -> TagTargets {
    let rows: Vec<Vec<i64>> = (0..n)
        .map(|_| {
            let mut r: Vec<i64> = (0..rng.gen_range(0..=max_pos.min(k)))
                .map(|_| rng.gen_range(0..k as i64))
                .collect();
            r.sort_unstable();
            r.dedup();
            // Unsorted within the row on purpose.
            r.reverse();
            r
        })
        .collect();
    TagTargets::from_rows(&rows)
}

#[test]
fn bce_matches_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(seed());
    for isa in Isa::available() {
        for &(n, k) in &[(1, 1), (1, 5), (3, 17), (8, 511), (5, 1000), (2, 100_000)] {
            let z: Vec<f32> = (0..n * k).map(|_| rng.gen_range(-12.0f32..12.0)).collect();
            let t = random_targets(&mut rng, n, k, 12);
            let got = cpu::short_tag_bce(mat(&z, n, k), &t, true, isa).expect("bce");
            let want = reference::bce(&z, n, k, t.indptr(), t.indices());
            let tag = format!("{isa:?} n={n} k={k}");
            close_scalar(&format!("{tag} loss"), got.loss, want.loss);
            close_f32(&format!("{tag} dz"), &got.dz.expect("dz"), &want.dz);
        }
    }
}

#[test]
fn bce_is_stable_for_huge_logits() {
    let z = vec![1e4f32, -1e4, 80.0, -80.0, 0.0, 3e38, -3e38];
    let t = TagTargets::from_rows(&[vec![0i64, 3, 6]]);
    let got = cpu::short_tag_bce(mat(&z, 1, 7), &t, true, Isa::detect()).expect("bce");
    let want = reference::bce(&z, 1, 7, t.indptr(), t.indices());
    assert!(got.loss.is_finite());
    close_scalar("loss", got.loss, want.loss);
    let dz = got.dz.expect("dz");
    assert!(dz.iter().all(|v| v.is_finite()));
    close_f32("dz", &dz, &want.dz);
}

// ---------- against tch autograd of the unfused formulas ----------

fn t2(v: &[f32], r: usize, c: usize) -> Tensor {
    Tensor::from_slice(v)
        .reshape([r as i64, c as i64])
        .set_requires_grad(true)
}

fn grad_vec(t: &Tensor) -> Vec<f64> {
    let g = t.grad().to_kind(Kind::Double).flatten(0, -1);
    Vec::<f64>::try_from(&g).expect("grad")
}

fn scalar(t: &Tensor) -> f64 {
    t.double_value(&[])
}

#[test]
fn clip_matches_tch_autograd() {
    let mut rng = ChaCha8Rng::seed_from_u64(seed());
    for &(n, d) in &[(1, 3), (7, 9), (64, 64), (100, 130), (257, 64)] {
        let x = embeddings(&mut rng, n, d);
        let y = correlated(&mut rng, &x, n, d, 0.2);
        let scale = 14.285_714f32;
        // Unfused f32, the way every CLIP trainer writes it.
        let (xt, yt) = (t2(&x, n, d), t2(&y, n, d));
        let st = Tensor::from(scale).set_requires_grad(true);
        let logits = xt.matmul(&yt.tr()) * &st;
        let labels = Tensor::arange(n as i64, (Kind::Int64, tch::Device::Cpu));
        let loss = (logits.cross_entropy_for_logits(&labels)
            + logits.tr().cross_entropy_for_logits(&labels))
            / 2.0;
        loss.backward();
        let got =
            cpu::clip_loss(mat(&x, n, d), mat(&y, n, d), scale, true, Isa::detect()).expect("cpu");
        let tag = format!("n={n} d={d}");
        close_scalar(&format!("{tag} loss"), got.loss, scalar(&loss));
        let g = got.grads.expect("grads");
        close_f32(&format!("{tag} dx"), &g.dx, &grad_vec(&xt));
        close_f32(&format!("{tag} dy"), &g.dy, &grad_vec(&yt));
        let mag = reference::clip_symmetric(&x, &y, n, d, scale as f64).dscale_mag;
        close_sum(&format!("{tag} dscale"), g.dscale, scalar(&st.grad()), mag);
    }
}

#[test]
fn clip_local_matches_tch_autograd() {
    let mut rng = ChaCha8Rng::seed_from_u64(seed());
    let (n, world, d) = (40, 3, 24);
    let m = n * world;
    let xa = embeddings(&mut rng, m, d);
    let ya = correlated(&mut rng, &xa, m, d, 0.3);
    let off = n;
    let (xl, yl) = (&xa[off * d..(off + n) * d], &ya[off * d..(off + n) * d]);
    let scale = 25.0f32;
    let (xlt, ylt, xat, yat) = (t2(xl, n, d), t2(yl, n, d), t2(&xa, m, d), t2(&ya, m, d));
    let st = Tensor::from(scale).set_requires_grad(true);
    let labels = Tensor::arange_start(
        off as i64,
        (off + n) as i64,
        (Kind::Int64, tch::Device::Cpu),
    );
    let li = xlt.matmul(&yat.tr()) * &st;
    let lt = ylt.matmul(&xat.tr()) * &st;
    let loss = (li.cross_entropy_for_logits(&labels) + lt.cross_entropy_for_logits(&labels)) / 2.0;
    loss.backward();
    let got = cpu::clip_loss_local(
        mat(xl, n, d),
        mat(yl, n, d),
        mat(&xa, m, d),
        mat(&ya, m, d),
        off,
        scale,
        true,
        Isa::detect(),
    )
    .expect("cpu");
    close_scalar("loss", got.loss, scalar(&loss));
    let g = got.grads.expect("grads");
    close_f32("dx_local", &g.dx_local, &grad_vec(&xlt));
    close_f32("dy_local", &g.dy_local, &grad_vec(&ylt));
    close_f32("dx_all", &g.dx_all, &grad_vec(&xat));
    close_f32("dy_all", &g.dy_all, &grad_vec(&yat));
    let mag = reference::clip_local(xl, yl, &xa, &ya, n, m, d, off, scale as f64).dscale_mag;
    close_sum("dscale", g.dscale, scalar(&st.grad()), mag);
}

#[test]
fn hni_matches_tch_autograd() {
    let mut rng = ChaCha8Rng::seed_from_u64(seed());
    let (n, k, d) = (37, 3, 40);
    let x = embeddings(&mut rng, n, d);
    let y = correlated(&mut rng, &x, n, d, 1.0);
    let neg = embeddings(&mut rng, n * k, d);
    // Moderate logits: tch's f32 log-softmax has ~1e-8 absolute error, so a near-zero loss could
    // not be compared to 1e-5 relative.
    let scale = 4.0f32;
    let (xt, yt) = (t2(&x, n, d), t2(&y, n, d));
    let nt = Tensor::from_slice(&neg)
        .reshape([n as i64, k as i64, d as i64])
        .set_requires_grad(true);
    let st = Tensor::from(scale).set_requires_grad(true);
    // Gate from the batch logits, not differentiated.
    let sims = xt.matmul(&yt.tr()).detach();
    let own = sims.diagonal(0, 0, 1);
    let best = sims.amax([1i64].as_slice(), false);
    let gate = own.ge_tensor(&best).to_kind(Kind::Float);
    let pos = (&xt * &yt)
        .sum_dim_intlist([1i64].as_slice(), false, Kind::Float)
        .unsqueeze(1);
    let negs = xt.unsqueeze(1).matmul(&nt.transpose(1, 2)).squeeze_dim(1);
    let logits = Tensor::cat(&[pos, negs], 1) * &st;
    let ce = -logits.log_softmax(1, Kind::Float).select(1, 0);
    let loss = (&ce * &gate).sum(Kind::Float) / n as f64;
    loss.backward();
    let gate_v = Vec::<f32>::try_from(&gate).expect("gate");
    let got = cpu::hni_loss(
        mat(&x, n, d),
        mat(&y, n, d),
        &neg,
        k,
        0,
        scale,
        &gate_v,
        true,
    )
    .expect("hni");
    close_scalar("loss", got.loss, scalar(&loss));
    let g = got.grads.expect("grads");
    // dL/dy from autograd collects only the positive term (the gate is detached).
    close_f32("dx", &g.dx, &grad_vec(&xt));
    close_f32("dy_pos", &g.dy_pos, &grad_vec(&yt));
    close_f32("dneg", &g.dneg, &grad_vec(&nt));
    close_scalar("dscale", g.dscale, scalar(&st.grad()));
    // And the crate's own gate agrees with the tch gate.
    let cg = cpu::row_gate(mat(&x, n, d), mat(&y, n, d), 0, scale, Isa::detect()).expect("gate");
    if clear_margins(&x, &y, n, n, d, 0) {
        assert_eq!(cg, gate_v);
    }
}

#[test]
fn bce_matches_tch_autograd() {
    let mut rng = ChaCha8Rng::seed_from_u64(seed());
    let (n, k) = (13, 3001);
    let z: Vec<f32> = (0..n * k).map(|_| rng.gen_range(-9.0f32..9.0)).collect();
    let t = random_targets(&mut rng, n, k, 20);
    let mut dense = vec![0.0f32; n * k];
    for i in 0..n {
        for &c in &t.indices()[t.indptr()[i] as usize..t.indptr()[i + 1] as usize] {
            dense[i * k + c as usize] = 1.0;
        }
    }
    let zt = t2(&z, n, k);
    let tt = Tensor::from_slice(&dense).reshape([n as i64, k as i64]);
    // Sum over K, mean over N: torch's default reduction (mean over N*K) times K.
    let loss = zt.binary_cross_entropy_with_logits::<Tensor>(&tt, None, None, tch::Reduction::Sum)
        / n as f64;
    loss.backward();
    let got = cpu::short_tag_bce(mat(&z, n, k), &t, true, Isa::detect()).expect("bce");
    close_scalar("loss", got.loss, scalar(&loss));
    close_f32("dz", &got.dz.expect("dz"), &grad_vec(&zt));
}

// ---------- bad input ----------

#[test]
fn bad_inputs_are_named_errors() {
    let isa = Isa::detect();
    let x = vec![0.5f32; 12];
    let y = vec![0.5f32; 12];
    // Shapes.
    assert!(Mat::new(&x, 5, 3).is_err());
    let mut nan_x = x.clone();
    nan_x[7] = f32::NAN;
    let mut inf_y = y.clone();
    inf_y[7] = f32::INFINITY;
    // (x, x shape, y, y shape, scale, what the message must name)
    type Case<'a> = (
        &'a [f32],
        (usize, usize),
        &'a [f32],
        (usize, usize),
        f32,
        &'a [&'a str],
    );
    let cases: &[Case] = &[
        (&x, (4, 3), &y, (3, 4), 10.0, &["widths differ"]),
        (&x, (4, 3), &y[..9], (3, 3), 10.0, &["rows"]),
        // N = 0 and D = 0.
        (&[], (0, 3), &[], (0, 3), 10.0, &["N = 0"]),
        (&[], (3, 0), &[], (3, 0), 10.0, &["D = 0"]),
        // Non-finite values, located.
        (
            &nan_x,
            (4, 3),
            &y,
            (4, 3),
            10.0,
            &["x (image embeddings)", "row 2, column 1"],
        ),
        (
            &x,
            (4, 3),
            &inf_y,
            (4, 3),
            10.0,
            &["y (text embeddings)", "inf"],
        ),
        // Scale.
        (&x, (4, 3), &y, (4, 3), f32::NAN, &["scale"]),
        (&x, (4, 3), &y, (4, 3), -1.0, &["positive multiplier"]),
    ];
    for &(xs, (xr, xc), ys, (yr, yc), scale, wants) in cases {
        let e = err_text(cpu::clip_loss(
            mat(xs, xr, xc),
            mat(ys, yr, yc),
            scale,
            true,
            isa,
        ));
        assert!(
            wants.iter().all(|w| e.contains(w)),
            "{e} (wanted {wants:?})"
        );
    }
    // Offsets past the gathered batch.
    let e = err_text(cpu::clip_loss_local(
        mat(&x, 4, 3),
        mat(&y, 4, 3),
        mat(&x, 4, 3),
        mat(&y, 4, 3),
        1,
        10.0,
        true,
        isa,
    ));
    assert!(e.contains("offset"), "{e}");
    // HNI: no negatives, wrong negatives, gate values.
    let e = err_text(cpu::hni_loss(
        mat(&x, 4, 3),
        mat(&y, 4, 3),
        &[],
        0,
        0,
        10.0,
        &[1.0; 4],
        true,
    ));
    assert!(e.contains("N- must be at least 1"), "{e}");
    let e = err_text(cpu::hni_loss(
        mat(&x, 4, 3),
        mat(&y, 4, 3),
        &x[..6],
        1,
        0,
        10.0,
        &[1.0; 4],
        true,
    ));
    assert!(e.contains("negatives"), "{e}");
    let e = err_text(cpu::hni_loss(
        mat(&x, 4, 3),
        mat(&y, 4, 3),
        &x,
        1,
        0,
        10.0,
        &[1.0, 0.5, 0.0, 1.0],
        true,
    ));
    assert!(e.contains("gate[1]"), "{e}");
    // BCE: out-of-range and repeated tags, malformed CSR, row count.
    let z = vec![0.1f32; 6];
    let e = err_text(cpu::short_tag_bce(
        mat(&z, 2, 3),
        &TagTargets::from_rows(&[vec![0i64], vec![3]]),
        true,
        isa,
    ));
    assert!(e.contains("row 1 has tag index 3, outside 0..3"), "{e}");
    let e = err_text(cpu::short_tag_bce(
        mat(&z, 2, 3),
        &TagTargets::from_rows(&[vec![-1i64], vec![]]),
        true,
        isa,
    ));
    assert!(e.contains("tag index -1"), "{e}");
    let e = err_text(cpu::short_tag_bce(
        mat(&z, 2, 3),
        &TagTargets::from_rows(&[vec![1i64, 1], vec![]]),
        true,
        isa,
    ));
    assert!(e.contains("twice"), "{e}");
    let e = err_text(cpu::short_tag_bce(
        mat(&z, 2, 3),
        &TagTargets::from_rows(&[vec![1i64]]),
        true,
        isa,
    ));
    assert!(e.contains("rows"), "{e}");
    assert!(TagTargets::new(vec![0, 2, 1], vec![0, 1]).is_err());
    assert!(TagTargets::new(vec![1, 2], vec![0, 1]).is_err());
    assert!(TagTargets::new(vec![0, 1], vec![0, 1]).is_err());
    let mut zb = z.clone();
    zb[4] = f32::NEG_INFINITY;
    let e = err_text(cpu::short_tag_bce(
        mat(&zb, 2, 3),
        &TagTargets::from_rows(&[vec![0i64], vec![]]),
        true,
        isa,
    ));
    assert!(e.contains("logits") && e.contains("row 1, column 1"), "{e}");
}
