//! Input checks shared by the CPU, CUDA and tch entry points: every error names the argument.

use crate::error::{KernelError, Result};

/// A row-major f32 matrix view.
#[derive(Debug, Clone, Copy)]
pub struct Mat<'a> {
    /// `rows * cols` values, row-major.
    pub data: &'a [f32],
    /// Number of rows.
    pub rows: usize,
    /// Number of columns.
    pub cols: usize,
}

impl<'a> Mat<'a> {
    /// A view of `data` as `rows x cols`; fails when the length does not match.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Result<Self> {
        if rows.checked_mul(cols) != Some(data.len()) {
            return Err(KernelError::Shape(format!(
                "a {rows} x {cols} matrix needs {} values, got {}",
                rows.saturating_mul(cols),
                data.len()
            )));
        }
        Ok(Mat { data, rows, cols })
    }
}

/// Fails on a NaN or infinity, naming the argument and the first bad (row, column).
pub fn check_finite(what: &'static str, data: &[f32], cols: usize) -> Result<()> {
    const CH: usize = 1 << 15;
    let bad = |c: &[f32]| {
        // Branch-free per chunk (vectorises).
        c.iter()
            .map(|v| u32::from(v.to_bits() & 0x7f80_0000 == 0x7f80_0000))
            .sum::<u32>()
            > 0
    };
    // One contiguous range per worker (whole chunks), each reporting its first bad chunk.
    let per = data
        .len()
        .div_ceil(CH)
        .div_ceil(crate::cpu::par::workers_for(data.len()))
        .max(1)
        * CH;
    let firsts = crate::cpu::par::run(data.chunks(per).collect(), |r: &[f32]| {
        r.chunks(CH).position(bad)
    });
    let bad_chunk = firsts
        .iter()
        .enumerate()
        .find_map(|(g, f)| f.map(|ci| g * (per / CH) + ci));
    if let Some(ci) = bad_chunk {
        let start = ci * CH;
        let off = data[start..]
            .iter()
            .position(|v| !v.is_finite())
            .unwrap_or(0);
        let idx = start + off;
        let cols = cols.max(1);
        return Err(KernelError::NonFinite {
            what,
            detail: format!("{} at row {}, column {}", data[idx], idx / cols, idx % cols),
        });
    }
    Ok(())
}

/// The logit scale must be the multiplier `s = exp(logit_scale)`: finite and positive.
pub fn check_scale(scale: f64) -> Result<()> {
    if !scale.is_finite() {
        return Err(KernelError::NonFinite {
            what: "scale",
            detail: format!("{scale}"),
        });
    }
    if scale <= 0.0 {
        return Err(KernelError::Invalid(format!(
            "scale is {scale}; it must be the positive multiplier s = exp(logit_scale), not the \
             log-scale"
        )));
    }
    Ok(())
}

/// Checks an embedding matrix: at least one row and one column.
pub fn check_nonempty(what: &str, m: &Mat) -> Result<()> {
    if m.rows == 0 {
        return Err(KernelError::Empty(format!("{what} has no rows (N = 0)")));
    }
    if m.cols == 0 {
        return Err(KernelError::Empty(format!(
            "{what} has zero-width rows (D = 0)"
        )));
    }
    Ok(())
}

/// Two matrices must have the same width.
pub fn check_same_width(a_name: &str, a: &Mat, b_name: &str, b: &Mat) -> Result<()> {
    if a.cols != b.cols {
        return Err(KernelError::Shape(format!(
            "{a_name} is {} x {} but {b_name} is {} x {} (embedding widths differ)",
            a.rows, a.cols, b.rows, b.cols
        )));
    }
    Ok(())
}

/// Two matrices must have the same number of rows.
pub fn check_same_rows(a_name: &str, a: &Mat, b_name: &str, b: &Mat) -> Result<()> {
    if a.rows != b.rows {
        return Err(KernelError::Shape(format!(
            "{a_name} has {} rows but {b_name} has {}",
            a.rows, b.rows
        )));
    }
    Ok(())
}

/// The local rows' labels `offset..offset + n` must lie inside the gathered batch of `m`.
pub fn check_offset(offset: usize, n: usize, m: usize) -> Result<()> {
    if offset.checked_add(n).is_none_or(|e| e > m) {
        return Err(KernelError::Invalid(format!(
            "label offset {offset} + {n} local rows exceeds the {m} gathered columns"
        )));
    }
    Ok(())
}

/// A gate holds one 0/1 value per row.
pub fn check_gate(gate: &[f32], n: usize) -> Result<()> {
    if gate.len() != n {
        return Err(KernelError::Shape(format!(
            "gate has {} entries for {n} rows",
            gate.len()
        )));
    }
    if let Some(i) = gate.iter().position(|&g| g != 0.0 && g != 1.0) {
        return Err(KernelError::Invalid(format!(
            "gate[{i}] is {}, must be 0 or 1",
            gate[i]
        )));
    }
    Ok(())
}
