//! Helpers the kernel tests share (this crate's GPU tests and the workspace's `kernels_*` tests):
//! random inputs shaped like the model's, the fresh-seed-per-run convention, and the tolerance
//! checks. Behind the `testing` feature; not part of the library proper.
//!
//! Tolerance: "1e-5 relative" is measured per output tensor against its own scale,
//! `max_e |got_e - want_e| <= 1e-5 * max_e |want_e|` (a tiny absolute floor covers all-zero
//! tensors), the usual way to compare a whole gradient. A sum whose terms cancel (dL/ds) is held
//! against the magnitude of its summands instead (see [`close_sum`]).

use rand::Rng;

use crate::KernelError;

/// The relative tolerance of every comparison with a reference.
pub const REL: f64 = 1e-5;

/// The relative tolerance of outputs made of softmax probabilities at logit scale `s`:
/// [`REL`], or 4 half-ulps of an f32 logit of size `s` when that is larger. An f32 logit
/// `s x.y` (|x.y| <= 1) is off by up to half an ulp, `s 2^-24`, even when computed exactly and only
/// stored, and `exp` turns that absolute logit error into the same relative error of every
/// probability, so no f32 implementation (tch's included) can promise better. Only s > ~42 is
/// affected (s = 100: 2.4e-5); seen at s = 100 when one probability of size 1e-10 makes up a
/// whole (tiny) gradient row.
pub fn rel_at_scale(s: f32) -> f64 {
    REL.max(4.0 * f64::from(s.abs()) * 2f64.powi(-24))
}

/// The inputs' seed: `HQ_TEST_SEED` when set (to replay a run), else fresh each run; printed.
pub fn seed() -> u64 {
    let s = std::env::var("HQ_TEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(7)
        });
    eprintln!("HQ_TEST_SEED={s}");
    s
}

/// L2-normalises each `d`-wide row in place.
fn normalise_rows(v: &mut [f32], d: usize) {
    for r in v.chunks_mut(d.max(1)) {
        let norm = r.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        r.iter_mut().for_each(|x| *x /= norm);
    }
}

/// `n` rows of width `d`, each L2-normalised (what the model feeds the loss).
pub fn embeddings(rng: &mut impl Rng, n: usize, d: usize) -> Vec<f32> {
    let mut v: Vec<f32> = (0..n * d).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    normalise_rows(&mut v, d);
    v
}

/// Rows of `y` pulled towards the matching rows of `x` (`pull * x + noise`, normalised), so that
/// some gates open.
pub fn correlated(rng: &mut impl Rng, x: &[f32], n: usize, d: usize, pull: f32) -> Vec<f32> {
    let noise = embeddings(rng, n, d);
    let mut y: Vec<f32> = x.iter().zip(&noise).map(|(a, b)| pull * a + b).collect();
    normalise_rows(&mut y, d);
    y
}

/// Every element within [`REL`] of the largest reference magnitude (NaN always fails).
pub fn close_all<T: Copy + Into<f64>>(what: &str, got: &[T], want: &[f64]) {
    close_all_within(what, got, want, REL)
}

/// [`close_all`] with relative tolerance `rel`.
pub fn close_all_within<T: Copy + Into<f64>>(what: &str, got: &[T], want: &[f64], rel: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let (mut worst, mut at) = (0.0f64, 0);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let e = ((*g).into() - w).abs();
        if e > worst || e.is_nan() {
            worst = e;
            at = i;
        }
    }
    assert!(
        worst <= rel * scale + 1e-15,
        "{what}: max error {worst:.3e} at {at} (got {}, want {}) exceeds {rel} x {scale:.3e}",
        got.get(at).map_or(f64::NAN, |&g| g.into()),
        want.get(at).copied().unwrap_or(f64::NAN)
    );
}

/// A scalar within [`REL`] of the reference.
pub fn close_scalar(what: &str, got: f64, want: f64) {
    close_scalar_within(what, got, want, REL)
}

/// [`close_scalar`] with relative tolerance `rel`.
pub fn close_scalar_within(what: &str, got: f64, want: f64, rel: f64) {
    let err = (got - want).abs();
    assert!(
        err <= rel * want.abs() + 1e-15,
        "{what}: {got} vs {want} (error {err:.3e})"
    );
}

/// A sum whose terms cancel: `|got - want| <= REL * max(magnitude of the summands, |want|)`.
pub fn close_sum(what: &str, got: f64, want: f64, magnitude: f64) {
    let err = (got - want).abs();
    assert!(
        err <= REL * magnitude.max(want.abs()) + 1e-15,
        "{what}: {got} vs {want} (error {err:.3e}, summands {magnitude:.3e})"
    );
}

/// [`close_sum`] for a value that reached us as an f32 (a device output): one f32 rounding
/// allowed on top. With `magnitude = 0` it is [`close_scalar`] plus that rounding.
pub fn close_sum_f32(what: &str, got: f64, want: f64, magnitude: f64) {
    let err = (got - want).abs();
    assert!(
        err <= REL * magnitude.max(want.abs()) + 1e-7 * want.abs() + 1e-15,
        "{what}: {got} vs {want} (error {err:.3e}, summands {magnitude:.3e})"
    );
}

/// The message of an expected error (panics on success).
pub fn err_text<T: std::fmt::Debug>(r: Result<T, KernelError>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.to_string(),
    }
}
