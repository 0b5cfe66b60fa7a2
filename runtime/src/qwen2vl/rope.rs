//! M-RoPE position ids (transformers' `Qwen2VLModel.get_rope_index` for images).
//!
//! The prompt is split into runs of text tokens and runs of `<|image_pad|>` tokens. A text run
//! counts up from the running position on all three axes (temporal, height, width). An image run of
//! grid (t, h, w) with merge m gets, for each of its t * h/m * w/m tokens in row-major order,
//! `(start + ti, start + hi, start + wi)`, and the running position then advances by
//! `max(h, w) / m` (not by the number of tokens). Decoding continues at `max + 1` and counts up by
//! one per token on all axes; `rope_delta = max + 1 - prompt_len` is what HF stores to compute the
//! same thing from the attention mask.

use crate::error::{Result, RuntimeError};

/// Position ids of one unpadded prompt: `[3][len]` plus the position of the first generated
/// token (`max + 1`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RopePositions {
    /// Temporal, height and width positions, each `len` long.
    pub axes: [Vec<i64>; 3],
    /// Position of the first generated token (all three axes).
    pub next: i64,
}

impl RopePositions {
    /// `next - len`: HF's `rope_deltas` entry for this sequence.
    pub fn delta(&self) -> i64 {
        self.next - self.axes[0].len() as i64
    }
}

/// Computes the positions of `input_ids` whose image runs belong to `grids` (in order).
pub fn rope_index(
    input_ids: &[u32],
    image_token_id: u32,
    grids: &[[usize; 3]],
    spatial_merge_size: usize,
) -> Result<RopePositions> {
    let n = input_ids.len();
    let mut axes = [
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    ];
    let mut cur: i64 = 0;
    let mut grids = grids.iter();
    let mut i = 0;
    let m = spatial_merge_size.max(1);
    while i < n {
        let is_image = input_ids[i] == image_token_id;
        let mut j = i;
        while j < n && (input_ids[j] == image_token_id) == is_image {
            j += 1;
        }
        let run = j - i;
        if is_image {
            let [t, h, w] = *grids.next().ok_or_else(|| {
                RuntimeError::Generation("more image placeholder runs than images".to_string())
            })?;
            let (lh, lw) = (h / m, w / m);
            if t * lh * lw != run {
                return Err(RuntimeError::Generation(format!(
                    "an image run of {run} tokens does not match its grid {t}x{h}x{w} ({} tokens)",
                    t * lh * lw
                )));
            }
            for ti in 0..t {
                for hi in 0..lh {
                    for wi in 0..lw {
                        axes[0].push(cur + ti as i64);
                        axes[1].push(cur + hi as i64);
                        axes[2].push(cur + wi as i64);
                    }
                }
            }
            cur += (h.max(w) / m) as i64;
        } else {
            for k in 0..run as i64 {
                for a in &mut axes {
                    a.push(cur + k);
                }
            }
            cur += run as i64;
        }
        i = j;
    }
    if grids.next().is_some() {
        return Err(RuntimeError::Generation(
            "more images than image placeholder runs".to_string(),
        ));
    }
    let next = axes
        .iter()
        .flat_map(|a| a.iter().copied())
        .max()
        .map_or(0, |m| m + 1);
    Ok(RopePositions { axes, next })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_image_text() -> Result<()> {
        // 2 text, an image of grid 1x4x6 (6 tokens: 2 rows x 3 cols), 2 text.
        let ids = [1, 2, 9, 9, 9, 9, 9, 9, 3, 4];
        let p = rope_index(&ids, 9, &[[1, 4, 6]], 2)?;
        assert_eq!(p.axes[0], vec![0, 1, 2, 2, 2, 2, 2, 2, 5, 6]);
        assert_eq!(p.axes[1], vec![0, 1, 2, 2, 2, 3, 3, 3, 5, 6]);
        assert_eq!(p.axes[2], vec![0, 1, 2, 3, 4, 2, 3, 4, 5, 6]);
        assert_eq!(p.next, 7);
        assert_eq!(p.delta(), -3);
        assert!(rope_index(&ids, 9, &[[1, 4, 4]], 2).is_err());
        assert!(rope_index(&ids, 9, &[], 2).is_err());
        Ok(())
    }
}
