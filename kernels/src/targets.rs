//! Sparse multi-hot targets of the short-tag classification loss, in CSR form.

use crate::error::{KernelError, Result};

/// Each row's positive class indices, CSR: row i's positives are
/// `indices[indptr[i]..indptr[i + 1]]`. A row may have none. Order within a row is free; a class
/// may appear at most once per row (targets are 0/1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagTargets {
    indptr: Vec<i64>,
    indices: Vec<i64>,
}

impl TagTargets {
    /// Builds from CSR arrays, checking their structure (`indptr[0] == 0`, non-decreasing,
    /// `indptr[last] == indices.len()`). Class ranges and duplicates are checked against K when the
    /// loss runs ([`TagTargets::validate`]).
    pub fn new(indptr: Vec<i64>, indices: Vec<i64>) -> Result<Self> {
        if indptr.is_empty() {
            return Err(KernelError::Targets(
                "indptr is empty (it needs N + 1 entries)".into(),
            ));
        }
        if indptr[0] != 0 {
            return Err(KernelError::Targets(format!(
                "indptr[0] is {}, must be 0",
                indptr[0]
            )));
        }
        if let Some(i) = indptr.windows(2).position(|w| w[1] < w[0]) {
            return Err(KernelError::Targets(format!(
                "indptr decreases at row {i} ({} -> {})",
                indptr[i],
                indptr[i + 1]
            )));
        }
        let last = *indptr.last().unwrap_or(&0);
        if last != indices.len() as i64 {
            return Err(KernelError::Targets(format!(
                "indptr ends at {last} but there are {} indices",
                indices.len()
            )));
        }
        Ok(TagTargets { indptr, indices })
    }

    /// Builds from one list of positive classes per row.
    pub fn from_rows<R: AsRef<[i64]>>(rows: &[R]) -> Self {
        let mut indptr = Vec::with_capacity(rows.len() + 1);
        let mut indices = Vec::new();
        indptr.push(0);
        for r in rows {
            indices.extend_from_slice(r.as_ref());
            indptr.push(indices.len() as i64);
        }
        TagTargets { indptr, indices }
    }

    /// Number of rows N.
    pub fn rows(&self) -> usize {
        self.indptr.len() - 1
    }

    /// Number of positives over all rows.
    pub fn nnz(&self) -> usize {
        self.indices.len()
    }

    /// The row pointer (N + 1 entries).
    pub fn indptr(&self) -> &[i64] {
        &self.indptr
    }

    /// The class indices.
    pub fn indices(&self) -> &[i64] {
        &self.indices
    }

    /// Checks the targets against an `n x k` logit matrix: row count, every index in `0..k`, no
    /// class twice in a row.
    pub fn validate(&self, n: usize, k: usize) -> Result<()> {
        if self.rows() != n {
            return Err(KernelError::Shape(format!(
                "targets have {} rows, logits have {n}",
                self.rows()
            )));
        }
        let mut seen: Vec<i64> = Vec::new();
        for i in 0..n {
            let row = &self.indices[self.indptr[i] as usize..self.indptr[i + 1] as usize];
            if let Some(&bad) = row.iter().find(|&&t| t < 0 || t >= k as i64) {
                return Err(KernelError::Targets(format!(
                    "row {i} has tag index {bad}, outside 0..{k}"
                )));
            }
            seen.clear();
            seen.extend_from_slice(row);
            seen.sort_unstable();
            if let Some(w) = seen.windows(2).find(|w| w[0] == w[1]) {
                return Err(KernelError::Targets(format!(
                    "row {i} lists tag index {} twice",
                    w[0]
                )));
            }
        }
        Ok(())
    }
}
