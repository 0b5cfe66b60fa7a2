//! The field's metrics on plain buffers, computed the way the reference code computes them.
//!
//! - zero-shot classification: CLIP_benchmark `metrics/zeroshot_classification.py` (classifier =
//!   normalised mean of normalised template embeddings, logits = 100 * image @ W, `accuracy`
//!   top-k, sklearn's `balanced_accuracy_score` as mean per-class recall,
//!   `average_precision_per_class` for multi-label sets);
//! - retrieval: CLIP_benchmark `metrics/zeroshot_retrieval.py` (scores = text @ image^T; a query
//!   hits at k when one of its positives is among its top k) and DataComp's `mean_recall@1`;
//! - WILDS and fairness (DataComp `eval_utils/wilds_eval.py`, `fairness_eval.py`): macro F1 and
//!   macro recall over the labels present in the targets (sklearn with `labels=unique(y_true)`),
//!   per-group accuracy and the worst group over groups with at least one sample;
//! - WinoGAViL (DataComp `eval_utils/wino_eval.py`): Jaccard index of the top-`n` candidates;
//! - ARO (mertyg/vision-language-models-are-bows): a case is correct when the true caption scores
//!   strictly higher (numpy argmax over `[false, true]` keeps the first on ties); macro accuracy
//!   over relations (minus the authors' list of symmetric relations) or attribute pairs (with at
//!   least 25 cases).
//!
//! Ties: CLIP_benchmark's classification and retrieval metrics go through `torch.topk` and
//! `argmax` on the CPU, and so do ours, tie for tie:
//! - `argmax` ([`argmax_rows`]) takes the first maximum, a NaN counting as the maximum (torch's
//!   `greater_or_nan` reduction);
//! - `topk(k, largest=True, sorted=True)` ([`topk_rows`], [`torch_topk`]) is torch's
//!   `topk_impl_loop` (aten/src/ATen/native/TopKImpl.h): `(score, index)` pairs ordered by
//!   "NaN, then greater", `std::partial_sort` of the first `k` when `64 k <= n`, else
//!   `std::nth_element` at `k - 1` and `std::sort` of the `k - 1` before it. Neither algorithm is
//!   stable, so which of several equal scores comes first depends on `n`, `k` and where the equal
//!   scores sit; [`libstdcxx`] reproduces GCC's libstdc++ (which PyTorch's Linux and macOS wheels
//!   are built with) step for step, so the same indices come out. A consequence kept on purpose:
//!   CLIP_benchmark's `acc1` is the first entry of `topk(5)` while its mean per-class recall uses
//!   `argmax`, and with tied logits the two may name different classes.
//! - Multi-label average precision sorts each class's column with `torch.sort(descending)`, which
//!   on x86 CPUs with AVX2/AVX-512 is x86-simd-sort's vectorised quicksort: its order of equal
//!   scores depends on the CPU's vector width and is not reproduced; ours is stable (by index).
//!   Tied scores across samples of one class can then change the average precision.

use std::collections::BTreeMap;

use crate::error::EvalError;

/// `F.normalize(x, dim=-1)`: each row divided by `max(norm, 1e-12)`.
pub fn normalize_rows(values: &mut [f32], dim: usize) {
    if dim == 0 {
        return;
    }
    for row in values.chunks_mut(dim) {
        let norm = row
            .iter()
            .map(|&v| f64::from(v) * f64::from(v))
            .sum::<f64>()
            .sqrt()
            .max(1e-12);
        for v in row.iter_mut() {
            *v = (f64::from(*v) / norm) as f32;
        }
    }
}

/// CLIP_benchmark's class embedding from the raw embeddings of one class's filled templates
/// (`templates x dim`): normalise each, average, divide by the norm of the average.
pub fn class_embedding(template_embeddings: &[f32], dim: usize) -> Vec<f32> {
    let mut rows = template_embeddings.to_vec();
    normalize_rows(&mut rows, dim);
    let n = (rows.len() / dim.max(1)).max(1);
    let mut mean = vec![0f64; dim];
    for row in rows.chunks(dim.max(1)) {
        for (m, &v) in mean.iter_mut().zip(row) {
            *m += f64::from(v);
        }
    }
    let mean: Vec<f32> = mean.iter().map(|m| (m / n as f64) as f32).collect();
    let norm = mean
        .iter()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt();
    mean.iter().map(|&v| (f64::from(v) / norm) as f32).collect()
}

/// `scale * a @ b^T` for row-major `a` (`n x dim`) and `b` (`m x dim`), accumulated in f64.
pub fn scaled_scores(a: &[f32], b: &[f32], dim: usize, scale: f32) -> Vec<f32> {
    let (n, m) = (a.len() / dim.max(1), b.len() / dim.max(1));
    let mut out = vec![0f32; n * m];
    use rayon::prelude::*;
    out.par_chunks_mut(m.max(1))
        .zip(a.par_chunks(dim.max(1)))
        .for_each(|(row, x)| {
            for (o, y) in row.iter_mut().zip(b.chunks(dim.max(1))) {
                let dot: f64 = x
                    .iter()
                    .zip(y)
                    .map(|(&p, &q)| f64::from(p) * f64::from(q))
                    .sum();
                *o = (dot as f32) * scale;
            }
        });
    out
}

/// Indices of `row` by decreasing score, ties by increasing index (a stable sort); NaN scores
/// last. Used where the reference's tie order is not reproduced (average precision).
fn ranked(row: &[f32]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    idx.sort_by(|&i, &j| {
        let (a, b) = (row[i], row[j]);
        match (a.is_nan(), b.is_nan()) {
            (true, true) => i.cmp(&j),
            (true, false) => std::cmp::Ordering::Greater,
            (false, true) => std::cmp::Ordering::Less,
            _ => b
                .partial_cmp(&a)
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(i.cmp(&j)),
        }
    });
    idx
}

/// `argmax` of each row as torch computes it on the CPU: the first maximum, the first NaN if the
/// row has one (numpy's `argmax` agrees).
pub fn argmax_rows(scores: &[f32], cols: usize) -> Vec<usize> {
    scores
        .chunks(cols.max(1))
        .map(|row| {
            let mut best = 0;
            for (i, &v) in row.iter().enumerate().skip(1) {
                let b = row[best];
                if b.is_nan() {
                    break;
                }
                if v.is_nan() || v > b {
                    best = i;
                }
            }
            best
        })
        .collect()
}

/// The `k` best columns of each row, in the order `torch.topk(k, dim=1)` returns them on the CPU
/// (see [`torch_topk`]); `k` is capped at the column count.
pub fn topk_rows(scores: &[f32], cols: usize, k: usize) -> Vec<Vec<usize>> {
    scores
        .chunks(cols.max(1))
        .map(|row| torch_topk(row, k))
        .collect()
}

/// The indices `torch.topk(row, k, largest=True, sorted=True)` returns on the CPU, ties included
/// (the module docs give the rule); `k` is capped at `row.len()`.
pub fn torch_topk(row: &[f32], k: usize) -> Vec<usize> {
    let n = row.len();
    let k = k.min(n);
    if k == 0 {
        return Vec::new();
    }
    let mut queue: Vec<libstdcxx::Elem> = row.iter().copied().zip(0..).collect();
    if k * 64 <= n {
        libstdcxx::partial_sort(&mut queue, 0, k, n);
    } else {
        libstdcxx::nth_element(&mut queue, k - 1);
        libstdcxx::sort(&mut queue, 0, k - 1);
    }
    queue[..k].iter().map(|&(_, i)| i).collect()
}

/// GCC libstdc++'s `std::sort`, `std::nth_element` and `std::partial_sort` (bits/stl_algo.h,
/// bits/stl_heap.h; unchanged from GCC 4.x to 14) on `(score, index)` pairs with torch's `topk`
/// comparator, so that equal scores end up where torch puts them. Positions are indices into
/// the slice, as the C++ iterators are.
pub mod libstdcxx {
    /// A `(score, column)` pair of torch's `topk` queue.
    pub type Elem = (f32, usize);

    /// torch's `largest=True` comparator: NaN first, then greater.
    #[inline]
    fn before(x: &Elem, y: &Elem) -> bool {
        (x.0.is_nan() && !y.0.is_nan()) || x.0 > y.0
    }

    /// `std::__lg`: floor(log2(n)) for n > 0.
    fn lg(n: usize) -> usize {
        (usize::BITS - 1 - n.leading_zeros()) as usize
    }

    const THRESHOLD: usize = 16;

    /// `std::sort(v[first..last])`.
    pub fn sort(v: &mut [Elem], first: usize, last: usize) {
        if last > first {
            introsort_loop(v, first, last, 2 * lg(last - first));
            // `__final_insertion_sort`: a guarded insertion sort of the first 16, an unguarded one
            // of the rest; the partitions guarantee a smaller element in front, so both stop
            // where a guarded insertion sort of the whole range stops.
            insertion_sort(v, first, last);
        }
    }

    /// `std::nth_element(v.begin(), v.begin() + nth, v.end())`.
    pub fn nth_element(v: &mut [Elem], nth: usize) {
        let last = v.len();
        if last == 0 || nth == last {
            return;
        }
        introselect(v, 0, nth, last, 2 * lg(last));
    }

    /// `std::partial_sort(v[first..middle..last])`.
    pub fn partial_sort(v: &mut [Elem], first: usize, middle: usize, last: usize) {
        heap_select(v, first, middle, last);
        sort_heap(v, first, middle);
    }

    fn introsort_loop(v: &mut [Elem], first: usize, mut last: usize, mut depth: usize) {
        while last - first > THRESHOLD {
            if depth == 0 {
                partial_sort(v, first, last, last);
                return;
            }
            depth -= 1;
            let cut = unguarded_partition_pivot(v, first, last);
            introsort_loop(v, cut, last, depth);
            last = cut;
        }
    }

    fn introselect(
        v: &mut [Elem],
        mut first: usize,
        nth: usize,
        mut last: usize,
        mut depth: usize,
    ) {
        while last - first > 3 {
            if depth == 0 {
                heap_select(v, first, nth + 1, last);
                v.swap(first, nth);
                return;
            }
            depth -= 1;
            let cut = unguarded_partition_pivot(v, first, last);
            if cut <= nth {
                first = cut;
            } else {
                last = cut;
            }
        }
        insertion_sort(v, first, last);
    }

    fn unguarded_partition_pivot(v: &mut [Elem], first: usize, last: usize) -> usize {
        let mid = first + (last - first) / 2;
        move_median_to_first(v, first, first + 1, mid, last - 1);
        unguarded_partition(v, first + 1, last, first)
    }

    fn move_median_to_first(v: &mut [Elem], result: usize, a: usize, b: usize, c: usize) {
        let (va, vb, vc) = (v[a], v[b], v[c]);
        let pick = if before(&va, &vb) {
            if before(&vb, &vc) {
                b
            } else if before(&va, &vc) {
                c
            } else {
                a
            }
        } else if before(&va, &vc) {
            a
        } else if before(&vb, &vc) {
            c
        } else {
            b
        };
        v.swap(result, pick);
    }

    fn unguarded_partition(
        v: &mut [Elem],
        mut first: usize,
        mut last: usize,
        pivot: usize,
    ) -> usize {
        loop {
            while before(&v[first], &v[pivot]) {
                first += 1;
            }
            last -= 1;
            while before(&v[pivot], &v[last]) {
                last -= 1;
            }
            if first >= last {
                return first;
            }
            v.swap(first, last);
            first += 1;
        }
    }

    fn insertion_sort(v: &mut [Elem], first: usize, last: usize) {
        if first == last {
            return;
        }
        for i in first + 1..last {
            let val = v[i];
            if before(&val, &v[first]) {
                v.copy_within(first..i, first + 1);
                v[first] = val;
            } else {
                let mut j = i;
                while before(&val, &v[j - 1]) {
                    v[j] = v[j - 1];
                    j -= 1;
                }
                v[j] = val;
            }
        }
    }

    fn heap_select(v: &mut [Elem], first: usize, middle: usize, last: usize) {
        make_heap(v, first, middle);
        for i in middle..last {
            if before(&v[i], &v[first]) {
                pop_heap(v, first, middle, i);
            }
        }
    }

    fn make_heap(v: &mut [Elem], first: usize, last: usize) {
        let len = (last - first) as isize;
        if len < 2 {
            return;
        }
        let mut parent = (len - 2) / 2;
        loop {
            let value = v[first + parent as usize];
            adjust_heap(v, first, parent, len, value);
            if parent == 0 {
                return;
            }
            parent -= 1;
        }
    }

    fn sort_heap(v: &mut [Elem], first: usize, mut last: usize) {
        while last - first > 1 {
            last -= 1;
            pop_heap(v, first, last, last);
        }
    }

    fn pop_heap(v: &mut [Elem], first: usize, last: usize, result: usize) {
        let value = v[result];
        v[result] = v[first];
        adjust_heap(v, first, 0, (last - first) as isize, value);
    }

    fn adjust_heap(v: &mut [Elem], first: usize, mut hole: isize, len: isize, value: Elem) {
        let at = |i: isize| first + i as usize;
        let top = hole;
        let mut second = hole;
        while second < (len - 1) / 2 {
            second = 2 * (second + 1);
            if before(&v[at(second)], &v[at(second - 1)]) {
                second -= 1;
            }
            v[at(hole)] = v[at(second)];
            hole = second;
        }
        if len & 1 == 0 && second == (len - 2) / 2 {
            second = 2 * (second + 1);
            v[at(hole)] = v[at(second - 1)];
            hole = second - 1;
        }
        // `__push_heap`
        let mut parent = (hole - 1) / 2;
        while hole > top && before(&v[at(parent)], &value) {
            v[at(hole)] = v[at(parent)];
            hole = parent;
            parent = (hole - 1) / 2;
        }
        v[at(hole)] = value;
    }
}

/// CLIP_benchmark's `accuracy(output, target, topk)`: the fraction of rows whose target is among
/// the row's `k` best classes, for each `k`. Errors when `k` exceeds the class count (torch's
/// `topk` refuses it too) or a target is out of range.
pub fn topk_accuracy(
    logits: &[f32],
    classes: usize,
    targets: &[usize],
    ks: &[usize],
) -> Result<Vec<f64>, EvalError> {
    check_matrix(logits, targets.len(), classes, "logits")?;
    let kmax = ks.iter().copied().max().unwrap_or(1);
    if kmax > classes {
        return Err(EvalError::Invalid(format!(
            "top-{kmax} accuracy needs at least {kmax} classes, the task has {classes}"
        )));
    }
    if let Some(&bad) = targets.iter().find(|&&t| t >= classes) {
        return Err(EvalError::Invalid(format!(
            "target class {bad} is out of range for {classes} classes"
        )));
    }
    let top = topk_rows(logits, classes, kmax);
    let n = targets.len();
    Ok(ks
        .iter()
        .map(|&k| {
            let hits = top
                .iter()
                .zip(targets)
                .filter(|(t, &y)| t[..k].contains(&y))
                .count();
            hits as f64 / n.max(1) as f64
        })
        .collect())
}

/// sklearn's `balanced_accuracy_score(y_true, y_pred)`: the mean over the classes present in
/// `y_true` of each class's recall (classes absent from `y_true` are left out, as sklearn does
/// after its warning).
pub fn balanced_accuracy(targets: &[usize], predictions: &[usize]) -> f64 {
    let mut per: BTreeMap<usize, (u64, u64)> = BTreeMap::new();
    for (&t, &p) in targets.iter().zip(predictions) {
        let e = per.entry(t).or_default();
        e.0 += 1;
        if t == p {
            e.1 += 1;
        }
    }
    if per.is_empty() {
        return f64::NAN;
    }
    let sum: f64 = per.values().map(|&(n, c)| c as f64 / n as f64).sum();
    sum / per.len() as f64
}

/// CLIP_benchmark's `average_precision_per_class(scores, targets)` (`n x classes` each): per class,
/// rows sorted by decreasing score (stable), precision at each rank, summed over the positive
/// rows and divided by `max(sum of targets, 1)`.
pub fn average_precision_per_class(
    scores: &[f32],
    targets: &[f32],
    classes: usize,
) -> Result<Vec<f64>, EvalError> {
    let n = scores.len() / classes.max(1);
    check_matrix(scores, n, classes, "scores")?;
    check_matrix(targets, n, classes, "targets")?;
    let mut ap = Vec::with_capacity(classes);
    for k in 0..classes {
        let column: Vec<f32> = (0..n).map(|i| scores[i * classes + k]).collect();
        let order = ranked(&column);
        let mut tp = 0f32;
        let mut sum = 0f64;
        let mut total = 0f64;
        for (rank, &i) in order.iter().enumerate() {
            let t = targets[i * classes + k];
            // `tp = truth.float().cumsum(0)` and `precision = tp / rank` in f32 (exact for 0/1
            // targets); the sum over the positive rows in f64, closer to torch's pairwise sum
            // than a running f32 sum.
            tp += t;
            total += f64::from(t);
            if t != 0.0 {
                sum += f64::from(tp / (rank + 1) as f32);
            }
        }
        ap.push(sum / total.max(1.0));
    }
    Ok(ap)
}

/// Mean average precision (CLIP_benchmark's `mean_average_precision`: the plain mean over every
/// class, classes without positives counting 0).
pub fn mean_average_precision(
    scores: &[f32],
    targets: &[f32],
    classes: usize,
) -> Result<f64, EvalError> {
    let ap = average_precision_per_class(scores, targets, classes)?;
    Ok(ap.iter().sum::<f64>() / ap.len().max(1) as f64)
}

/// Image-text retrieval recall at each `k`, CLIP_benchmark's way: `scores` is `texts x images`,
/// `text_image[t]` the image of text `t`. Returns `(image_retrieval_recall, text_retrieval_recall)`
/// per `k`: image retrieval is per text query (its image among the `k` best images), text
/// retrieval per image query (one of its texts among the `k` best texts; an image without texts
/// counts as a miss, as `0/0 > 0` is false in the reference). `k` is capped at the candidate count.
/// Each `k` takes its own `topk(k)`, as the reference does: with tied scores the top 1 need not
/// be the first of the top 5.
pub fn retrieval_recall(
    scores: &[f32],
    texts: usize,
    images: usize,
    text_image: &[usize],
    ks: &[usize],
) -> Result<Vec<(f64, f64)>, EvalError> {
    check_matrix(scores, texts, images, "retrieval scores")?;
    if text_image.len() != texts {
        return Err(EvalError::Invalid(format!(
            "{} text-to-image links for {texts} texts",
            text_image.len()
        )));
    }
    if let Some(&bad) = text_image.iter().find(|&&i| i >= images) {
        return Err(EvalError::Invalid(format!(
            "text linked to image {bad} of {images}"
        )));
    }
    // Text retrieval: per image, its texts among the best in the transposed scores.
    let mut transposed = vec![0f32; texts * images];
    for t in 0..texts {
        for i in 0..images {
            transposed[i * texts + t] = scores[t * images + i];
        }
    }
    let mut texts_of: Vec<Vec<usize>> = vec![Vec::new(); images];
    for (t, &i) in text_image.iter().enumerate() {
        texts_of[i].push(t);
    }
    use rayon::prelude::*;
    Ok(ks
        .iter()
        .map(|&k| {
            let image_hits = scores
                .par_chunks(images.max(1))
                .zip(text_image.par_iter())
                .filter(|(row, img)| torch_topk(row, k).contains(img))
                .count();
            let text_hits = transposed
                .par_chunks(texts.max(1))
                .zip(texts_of.par_iter())
                .filter(|(row, positives)| torch_topk(row, k).iter().any(|c| positives.contains(c)))
                .count();
            (
                image_hits as f64 / texts.max(1) as f64,
                text_hits as f64 / images.max(1) as f64,
            )
        })
        .collect())
}

/// sklearn `f1_score` / `recall_score` with `average="macro", labels=unique(y_true)`, as WILDS'
/// `F1` and `Recall` metrics call them. Returns `(macro_f1, macro_recall)`.
pub fn macro_f1_recall(targets: &[usize], predictions: &[usize]) -> (f64, f64) {
    let mut tp: BTreeMap<usize, u64> = BTreeMap::new();
    let mut fneg: BTreeMap<usize, u64> = BTreeMap::new();
    let mut fpos: BTreeMap<usize, u64> = BTreeMap::new();
    for (&t, &p) in targets.iter().zip(predictions) {
        tp.entry(t).or_default();
        if t == p {
            *tp.entry(t).or_default() += 1;
        } else {
            *fneg.entry(t).or_default() += 1;
            *fpos.entry(p).or_default() += 1;
        }
    }
    if tp.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let (mut f1, mut rec) = (0f64, 0f64);
    for (label, &t) in &tp {
        let fp = fpos.get(label).copied().unwrap_or(0) as f64;
        let fnn = fneg.get(label).copied().unwrap_or(0) as f64;
        let t = t as f64;
        let denom = 2.0 * t + fp + fnn;
        f1 += if denom > 0.0 { 2.0 * t / denom } else { 0.0 };
        rec += if t + fnn > 0.0 { t / (t + fnn) } else { 0.0 };
    }
    (f1 / tp.len() as f64, rec / tp.len() as f64)
}

/// One group's share of a per-sample metric.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GroupScore {
    pub group: i64,
    pub count: u64,
    /// `None` for a group without samples (left out of the worst group, as in WILDS).
    pub value: Option<f64>,
}

/// WILDS `standard_group_eval` for an element-wise 0/1 metric: the mean over all samples, the
/// mean per group (groups `0..=max(group)`, as `CombinatorialGrouper` numbers them) and the worst
/// (smallest) mean over groups with samples. Returns `(average, groups, worst)`.
pub fn group_scores(correct: &[bool], groups: &[i64]) -> (f64, Vec<GroupScore>, Option<f64>) {
    let n = correct.len();
    let average = correct.iter().filter(|&&c| c).count() as f64 / n.max(1) as f64;
    let max = groups.iter().copied().max().unwrap_or(-1);
    let mut counts = vec![(0u64, 0u64); (max + 1).max(0) as usize];
    for (&c, &g) in correct.iter().zip(groups) {
        if g >= 0 {
            let e = &mut counts[g as usize];
            e.0 += 1;
            e.1 += u64::from(c);
        }
    }
    let scores: Vec<GroupScore> = counts
        .iter()
        .enumerate()
        .map(|(g, &(count, hits))| GroupScore {
            group: g as i64,
            count,
            // WILDS sums in float32 (scatter_ add) and divides by the count.
            value: (count > 0).then(|| f64::from(hits as f32 / count as f32)),
        })
        .collect();
    let worst = scores
        .iter()
        .filter_map(|s| s.value)
        .fold(None, |acc: Option<f64>, v| {
            Some(acc.map_or(v, |a| a.min(v)))
        });
    (average, scores, worst)
}

/// sklearn `jaccard_score(y_true, y_pred)` for boolean vectors: |both| / |either| (0 when both are
/// empty, sklearn's zero-division value).
pub fn jaccard(y_true: &[bool], y_pred: &[bool]) -> f64 {
    let both = y_true.iter().zip(y_pred).filter(|(&a, &b)| a && b).count();
    let either = y_true.iter().zip(y_pred).filter(|(&a, &b)| a || b).count();
    if either == 0 {
        0.0
    } else {
        both as f64 / either as f64
    }
}

/// WinoGAViL's prediction: the `n_assoc` candidates with the highest scores
/// (`np.argsort(scores)[-n:]`, numpy's quicksort; ties by index here).
pub fn winogavil_prediction(scores: &[f32], n_assoc: usize) -> Vec<bool> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&i, &j| {
        scores[i]
            .partial_cmp(&scores[j])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(i.cmp(&j))
    });
    // `np.argsort(s)[-0:]` is the whole array: no association selects every candidate.
    if n_assoc == 0 {
        return vec![true; scores.len()];
    }
    let mut pred = vec![false; scores.len()];
    for &i in order.iter().rev().take(n_assoc) {
        pred[i] = true;
    }
    pred
}

/// The relations ARO's authors leave out of VG-Relation's macro accuracy (the notebook
/// "Replicate ARO! VG-Relation, VG-Attribution": relations whose swapped caption may be true).
pub const ARO_SYMMETRIC_RELATIONS: &[&str] = &[
    "adjusting",
    "attached to",
    "between",
    "bigger than",
    "biting",
    "boarding",
    "brushing",
    "chewing",
    "cleaning",
    "climbing",
    "close to",
    "coming from",
    "coming out of",
    "contain",
    "crossing",
    "dragging",
    "draped over",
    "drinking",
    "drinking from",
    "driving",
    "driving down",
    "driving on",
    "eating from",
    "eating in",
    "enclosing",
    "exiting",
    "facing",
    "filled with",
    "floating in",
    "floating on",
    "flying",
    "flying above",
    "flying in",
    "flying over",
    "flying through",
    "full of",
    "going down",
    "going into",
    "going through",
    "grazing in",
    "growing in",
    "growing on",
    "guiding",
    "hanging from",
    "hanging in",
    "hanging off",
    "hanging over",
    "higher than",
    "holding onto",
    "hugging",
    "in between",
    "jumping off",
    "jumping on",
    "jumping over",
    "kept in",
    "larger than",
    "leading",
    "leaning over",
    "leaving",
    "licking",
    "longer than",
    "looking in",
    "looking into",
    "looking out",
    "looking over",
    "looking through",
    "lying next to",
    "lying on top of",
    "making",
    "mixed with",
    "mounted on",
    "moving",
    "on the back of",
    "on the edge of",
    "on the front of",
    "on the other side of",
    "opening",
    "painted on",
    "parked at",
    "parked beside",
    "parked by",
    "parked in",
    "parked in front of",
    "parked near",
    "parked next to",
    "perched on",
    "petting",
    "piled on",
    "playing",
    "playing in",
    "playing on",
    "playing with",
    "pouring",
    "reaching for",
    "reading",
    "reflected on",
    "riding on",
    "running in",
    "running on",
    "running through",
    "seen through",
    "sitting behind",
    "sitting beside",
    "sitting by",
    "sitting in front of",
    "sitting near",
    "sitting next to",
    "sitting under",
    "skiing down",
    "skiing on",
    "sleeping in",
    "sleeping on",
    "smiling at",
    "sniffing",
    "splashing",
    "sprinkled on",
    "stacked on",
    "standing against",
    "standing around",
    "standing behind",
    "standing beside",
    "standing in front of",
    "standing near",
    "standing next to",
    "staring at",
    "stuck in",
    "surrounding",
    "swimming in",
    "swinging",
    "talking to",
    "topped with",
    "touching",
    "traveling down",
    "traveling on",
    "tying",
    "typing on",
    "underneath",
    "wading in",
    "waiting for",
    "walking across",
    "walking by",
    "walking down",
    "walking next to",
    "walking through",
    "working in",
    "working on",
    "worn on",
    "wrapped around",
    "wrapped in",
    "by",
    "of",
    "near",
    "next to",
    "with",
    "beside",
    "on the side of",
    "around",
];

/// ARO's smallest attribute-pair group that counts in VG-Attribution's macro accuracy.
pub const ARO_ATTRIBUTE_MIN_COUNT: u64 = 25;

/// One ARO group (a relation name or an attribute pair `a1_a2`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AroGroup {
    pub name: String,
    pub count: u64,
    pub accuracy: f64,
    /// Whether the group counts in the macro accuracy.
    pub counted: bool,
}

/// ARO's accuracies from per-case correctness and group names: `(micro accuracy, groups, macro
/// accuracy over the counted groups)`. Groups are counted when their name is not in `exclude` and
/// they have at least `min_count` cases; the macro accuracy is `None` when no group counts.
pub fn aro_accuracy(
    correct: &[bool],
    group: &[String],
    exclude: &[&str],
    min_count: u64,
) -> (f64, Vec<AroGroup>, Option<f64>) {
    let micro = correct.iter().filter(|&&c| c).count() as f64 / correct.len().max(1) as f64;
    let mut per: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for (&c, g) in correct.iter().zip(group) {
        let e = per.entry(g.as_str()).or_default();
        e.0 += 1;
        e.1 += u64::from(c);
    }
    let groups: Vec<AroGroup> = per
        .iter()
        .map(|(name, &(n, hits))| AroGroup {
            name: name.to_string(),
            count: n,
            accuracy: hits as f64 / n as f64,
            counted: n >= min_count && !exclude.contains(name),
        })
        .collect();
    let counted: Vec<f64> = groups
        .iter()
        .filter(|g| g.counted)
        .map(|g| g.accuracy)
        .collect();
    let macro_acc =
        (!counted.is_empty()).then(|| counted.iter().sum::<f64>() / counted.len() as f64);
    (micro, groups, macro_acc)
}

fn check_matrix<T>(values: &[T], rows: usize, cols: usize, what: &str) -> Result<(), EvalError> {
    if values.len() != rows * cols {
        return Err(EvalError::Invalid(format!(
            "{what}: expected {rows} x {cols} = {} values, got {}",
            rows * cols,
            values.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accuracy_and_balanced_accuracy() {
        // 3 samples, 5 classes.
        let logits = [
            0.9, 0.1, 0.0, 0.0, 0.0, //
            0.1, 0.2, 0.9, 0.3, 0.0, //
            0.5, 0.4, 0.3, 0.2, 0.1,
        ];
        let targets = [0, 1, 4];
        let acc = topk_accuracy(&logits, 5, &targets, &[1, 2, 5]).unwrap_or_default();
        assert_eq!(acc, vec![1.0 / 3.0, 1.0 / 3.0, 1.0]);
        let pred = argmax_rows(&logits, 5);
        assert_eq!(pred, vec![0, 2, 0]);
        // classes 0 (1/1), 1 (0/1), 4 (0/1)
        assert!((balanced_accuracy(&targets, &pred) - 1.0 / 3.0).abs() < 1e-12);
        assert!(topk_accuracy(&logits, 5, &targets, &[6]).is_err());
    }

    #[test]
    fn ties_follow_torch() {
        assert_eq!(argmax_rows(&[1.0, 2.0, 2.0, 0.0], 4), vec![1]);
        assert_eq!(argmax_rows(&[1.0, f32::NAN, 3.0, f32::NAN], 4), vec![1]);
        assert_eq!(topk_rows(&[1.0, 1.0, 1.0], 3, 2), vec![vec![0, 1]]);
        // Printed by torch 2.11 on the CPU (`torch.zeros(1, n).topk(k, 1)` etc.).
        assert_eq!(torch_topk(&[0.0; 7], 5), vec![3, 6, 5, 4, 0]);
        assert_eq!(torch_topk(&[0.0; 7], 1), vec![5]);
        assert_eq!(torch_topk(&[0.0; 20], 5), vec![12, 14, 13, 15, 11]);
        assert_eq!(torch_topk(&[0.0; 100], 1), vec![0]);
        assert_eq!(
            torch_topk(&[0.0; 10], 10),
            vec![5, 9, 8, 7, 6, 3, 1, 2, 0, 4]
        );
        assert_eq!(
            torch_topk(&[0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0], 5),
            vec![1, 5, 4, 2, 0]
        );
        assert_eq!(torch_topk(&[1.0, f32::NAN, 3.0, f32::NAN], 2), vec![1, 3]);
    }

    #[test]
    fn average_precision_matches_hand_computation() {
        // One class; scores 0.9 (pos), 0.8 (neg), 0.7 (pos): AP = (1/1 + 2/3) / 2.
        let ap =
            average_precision_per_class(&[0.9, 0.8, 0.7], &[1.0, 0.0, 1.0], 1).unwrap_or_default();
        assert!((ap[0] - (1.0 + 2.0 / 3.0) / 2.0).abs() < 1e-6);
        // No positives: 0.
        let ap = average_precision_per_class(&[0.9, 0.8], &[0.0, 0.0], 1).unwrap_or_default();
        assert_eq!(ap, vec![0.0]);
    }

    #[test]
    fn retrieval_with_several_captions() {
        // 3 texts (0,1 -> image 0; 2 -> image 1), 2 images.
        let scores = [
            0.1, 0.9, // text 0 prefers image 1 (miss at 1)
            0.8, 0.2, // text 1 hit
            0.3, 0.7, // text 2 hit
        ];
        let r = retrieval_recall(&scores, 3, 2, &[0, 0, 1], &[1, 5]).unwrap_or_default();
        assert!((r[0].0 - 2.0 / 3.0).abs() < 1e-12);
        // image 0: texts by score 0.8 (t1, positive) -> hit; image 1: 0.9 (t0, negative) -> miss.
        assert!((r[0].1 - 0.5).abs() < 1e-12);
        assert_eq!(r[1], (1.0, 1.0));
    }

    #[test]
    fn macro_f1_and_groups() {
        let t = [0, 0, 1, 1, 2];
        let p = [0, 1, 1, 1, 0];
        let (f1, rec) = macro_f1_recall(&t, &p);
        // class 0: tp1 fp1 fn1 -> 0.5; class 1: tp2 fp1 fn0 -> 0.8; class 2: 0.
        assert!((f1 - (0.5 + 0.8 + 0.0) / 3.0).abs() < 1e-12);
        assert!((rec - (0.5 + 1.0 + 0.0) / 3.0).abs() < 1e-12);
        let (avg, groups, worst) = group_scores(&[true, false, true, true], &[0, 0, 2, 2]);
        assert_eq!(avg, 0.75);
        assert_eq!(groups.len(), 3);
        assert_eq!(groups[1].value, None);
        assert_eq!(worst, Some(0.5));
    }

    #[test]
    fn aro_macro_rules() {
        let correct = [true, false, true, true];
        let names: Vec<String> = ["above", "above", "near", "below"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (micro, groups, macro_acc) = aro_accuracy(&correct, &names, ARO_SYMMETRIC_RELATIONS, 0);
        assert_eq!(micro, 0.75);
        assert_eq!(groups.len(), 3);
        assert_eq!(macro_acc, Some((0.5 + 1.0) / 2.0));
        let (_, _, none) = aro_accuracy(&correct, &names, &[], 25);
        assert_eq!(none, None);
    }

    #[test]
    fn jaccard_and_winogavil() {
        let pred = winogavil_prediction(&[0.1, 0.5, 0.3, 0.9], 2);
        assert_eq!(pred, vec![false, true, false, true]);
        assert!((jaccard(&[true, true, false, false], &pred) - 1.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn class_embedding_is_unit() {
        let e = class_embedding(&[3.0, 4.0, 0.0, 2.0], 2);
        let n: f32 = e.iter().map(|v| v * v).sum();
        assert!((n - 1.0).abs() < 1e-6);
    }
}
