//! Diagnostics of what a model's embeddings hold for a classification set, beyond zero-shot
//! accuracy (issue 16): a model can fail a zero-shot task because its image embeddings do not
//! separate the classes, or because its text tower maps the class prompts to nearly one point.
//!
//! - [`class_prompt_cosine`]: the mean pairwise cosine of the zero-shot classifier's rows (each the
//!   normalised mean of a class's prompt embeddings). Near 1: the text tower does not tell the
//!   classes apart, whatever the images hold.
//! - [`ridge_probe_accuracy`]: a linear probe on the frozen image embeddings: ridge regression to
//!   one-hot targets (closed form) fitted on half of the samples, top-1 accuracy on the other half.
//!   The halves are drawn by a fixed hash of the sample's index, not by parity: evaluation sets are
//!   often written class by class in a cycle, and a parity split would then train and test on
//!   disjoint classes. It answers "is the class linearly readable from the image embedding". CLIP_benchmark's
//!   linear probe trains logistic regression with SGD and a tuned weight decay; this is a
//!   deterministic, seconds-long diagnostic, not that benchmark metric.
//!
//! The solve is a hand-written Cholesky factorisation in f64: the workspace has no linear-algebra
//! crate, and the system is `(dim + 1) x (dim + 1)` (129 for the built-in models, 1,025 for
//! ViT-L), a fraction of a second.

/// Mean cosine over all pairs of distinct rows of `classifier` (`classes x dim`, rows
/// normalised); `None` with fewer than two classes.
pub fn class_prompt_cosine(classifier: &[f32], classes: usize, dim: usize) -> Option<f64> {
    if classes < 2 || dim == 0 || classifier.len() != classes * dim {
        return None;
    }
    let row = |i: usize| &classifier[i * dim..(i + 1) * dim];
    let mut sum = 0f64;
    for i in 0..classes {
        for j in i + 1..classes {
            sum += row(i)
                .iter()
                .zip(row(j))
                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                .sum::<f64>();
        }
    }
    Some(sum / (classes * (classes - 1) / 2) as f64)
}

/// Ridge strength relative to the mean diagonal of the Gram matrix: small enough not to bias a
/// separable problem, large enough to keep the solve well-conditioned when embeddings collapse.
const RIDGE: f64 = 1e-3;

/// Top-1 accuracy of a ridge-regression probe (see the module docs) on `embeddings`
/// (`n x dim`) with labels `targets` (`< classes`); `None` with fewer than two samples per half.
pub fn ridge_probe_accuracy(
    embeddings: &[f32],
    targets: &[usize],
    classes: usize,
    dim: usize,
) -> Option<f64> {
    let n = targets.len();
    if n < 4 || classes == 0 || dim == 0 || embeddings.len() != n * dim {
        return None;
    }
    let d = dim + 1; // + a bias feature
    let features = |i: usize| {
        embeddings[i * dim..(i + 1) * dim]
            .iter()
            .map(|&x| f64::from(x))
            .chain(std::iter::once(1.0))
    };
    let (train, test): (Vec<usize>, Vec<usize>) = (0..n).partition(|&i| in_training_half(i));
    if train.len() < 2 || test.is_empty() {
        return None;
    }
    // Normal equations on the training half: (X^T X + lambda I) W = X^T Y.
    let mut gram = vec![0f64; d * d];
    let mut rhs = vec![0f64; d * classes];
    for &i in &train {
        let x: Vec<f64> = features(i).collect();
        for a in 0..d {
            for b in a..d {
                gram[a * d + b] += x[a] * x[b];
            }
            rhs[a * classes + targets[i].min(classes - 1)] += x[a];
        }
    }
    for a in 0..d {
        for b in 0..a {
            gram[a * d + b] = gram[b * d + a];
        }
    }
    let trace = (0..d).map(|a| gram[a * d + a]).sum::<f64>() / d as f64;
    for a in 0..d {
        gram[a * d + a] += RIDGE * trace.max(1e-12);
    }
    let w = cholesky_solve(&mut gram, &rhs, d, classes)?;
    let (mut right, mut total) = (0usize, 0usize);
    for &i in &test {
        let x: Vec<f64> = features(i).collect();
        let mut best = (f64::NEG_INFINITY, 0);
        for c in 0..classes {
            let s: f64 = (0..d).map(|a| x[a] * w[a * classes + c]).sum();
            if s > best.0 {
                best = (s, c);
            }
        }
        right += usize::from(best.1 == targets[i]);
        total += 1;
    }
    Some(right as f64 / total as f64)
}

/// Whether sample `i` is in the probe's training half: the low bit of a SplitMix64 hash of `i`.
fn in_training_half(i: usize) -> bool {
    let mut z = (i as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) & 1 == 0
}

/// Solves `A X = B` for symmetric positive definite `a` (`d x d`, overwritten by its Cholesky
/// factor) and `b` (`d x m`); `None` if `a` is not positive definite.
fn cholesky_solve(a: &mut [f64], b: &[f64], d: usize, m: usize) -> Option<Vec<f64>> {
    for j in 0..d {
        let mut diag = a[j * d + j];
        for k in 0..j {
            diag -= a[j * d + k] * a[j * d + k];
        }
        if diag <= 0.0 || !diag.is_finite() {
            return None;
        }
        let diag = diag.sqrt();
        a[j * d + j] = diag;
        for i in j + 1..d {
            let mut v = a[i * d + j];
            for k in 0..j {
                v -= a[i * d + k] * a[j * d + k];
            }
            a[i * d + j] = v / diag;
        }
    }
    let mut x = b.to_vec();
    for c in 0..m {
        // L y = b, then L^T x = y.
        for i in 0..d {
            let mut v = x[i * m + c];
            for k in 0..i {
                v -= a[i * d + k] * x[k * m + c];
            }
            x[i * m + c] = v / a[i * d + i];
        }
        for i in (0..d).rev() {
            let mut v = x[i * m + c];
            for k in i + 1..d {
                v -= a[k * d + i] * x[k * m + c];
            }
            x[i * m + c] = v / a[i * d + i];
        }
    }
    Some(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_cosine_spans_identical_to_orthogonal() {
        let same = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0];
        assert_eq!(class_prompt_cosine(&same, 3, 2), Some(1.0));
        let orthogonal = [1.0, 0.0, 0.0, 1.0];
        assert_eq!(class_prompt_cosine(&orthogonal, 2, 2), Some(0.0));
        assert_eq!(class_prompt_cosine(&[1.0, 0.0], 1, 2), None);
    }

    /// A class that sits in one coordinate is read perfectly; labels that the embedding does not
    /// hold are read at chance.
    #[test]
    fn probe_reads_what_the_embedding_holds() {
        let (n, dim, classes) = (400, 8, 4);
        let mut state = 12345u64;
        let mut noise = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) as f64 / (1u64 << 31) as f64 - 0.5) as f32
        };
        // Written class by class in a cycle, as the built-in sets are (a parity split would see
        // half of the classes only).
        let targets: Vec<usize> = (0..n).map(|i| i % classes).collect();
        let mut emb = vec![0f32; n * dim];
        for i in 0..n {
            for k in 0..dim {
                emb[i * dim + k] = 0.1 * noise();
            }
            emb[i * dim + targets[i]] += 1.0;
        }
        let acc = ridge_probe_accuracy(&emb, &targets, classes, dim).expect("probe");
        assert_eq!(acc, 1.0);
        let shuffled: Vec<usize> = (0..n).map(|i| (i * 13 + 5) % classes).collect();
        let mut unrelated = vec![0f32; n * dim];
        for v in unrelated.iter_mut() {
            *v = noise();
        }
        let chance = ridge_probe_accuracy(&unrelated, &shuffled, classes, dim).expect("probe");
        assert!(chance < 0.4, "{chance}");
    }
}
