//! The learning-rate schedule: linear warm-up, then cosine decay, as open_clip_train's
//! `cosine_lr` (`scheduler.py`), with an optional floor.

use serde::{Deserialize, Serialize};

/// Cosine decay from `base_lr` to `min_lr` over `total_steps`, after `warmup_steps` of linear
/// warm-up (`base_lr * (step + 1) / warmup_steps`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CosineSchedule {
    pub base_lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl CosineSchedule {
    /// The learning rate of optimizer step `step` (0-based), as open_clip sets it before the step.
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.base_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let e = (step - self.warmup_steps) as f64;
        let es = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = (e / es).min(1.0);
        self.min_lr
            + 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()) * (self.base_lr - self.min_lr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        let s = CosineSchedule {
            base_lr: 1e-3,
            min_lr: 0.0,
            warmup_steps: 10,
            total_steps: 110,
        };
        assert!((s.lr(0) - 1e-4).abs() < 1e-12);
        assert!((s.lr(9) - 1e-3).abs() < 1e-12);
        assert!((s.lr(10) - 1e-3).abs() < 1e-12);
        assert!((s.lr(60) - 5e-4).abs() < 1e-12);
        assert!(s.lr(109) > 0.0 && s.lr(109) < 1e-6);
        assert_eq!(s.lr(500), 0.0);
        for w in (0..110).collect::<Vec<_>>().windows(2).skip(10) {
            assert!(s.lr(w[1]) <= s.lr(w[0]));
        }
        let floor = CosineSchedule { min_lr: 1e-5, ..s };
        assert!((floor.lr(200) - 1e-5).abs() < 1e-15);
    }
}
