//! Learning-rate schedules with linear warmup, as transformers defines them
//! (`get_constant_schedule_with_warmup`, `get_linear_schedule_with_warmup`, `get_cosine_schedule_with_warmup`).
//!
//! `step` is the 0-based index of the optimizer step about to be taken; during warmup the factor is
//! step / warmup (so the first step of a warmed-up run uses lr 0, exactly as in transformers).

use crate::recipe::LrScheduler;

/// The learning rate for optimizer step `step` (0-based) of a run of `total` steps.
pub fn lr_at(kind: LrScheduler, base: f64, warmup: usize, total: usize, step: usize) -> f64 {
    if step < warmup {
        return base * step as f64 / warmup.max(1) as f64;
    }
    let decay_steps = total.saturating_sub(warmup).max(1) as f64;
    let factor = match kind {
        LrScheduler::Constant => 1.0,
        LrScheduler::Linear => ((total as f64 - step as f64) / decay_steps).max(0.0),
        LrScheduler::Cosine => {
            let progress = (step - warmup) as f64 / decay_steps;
            (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
        }
    };
    base * factor
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_transformers_closed_forms() {
        // warmup 2, total 10, base 1: steps 0,1 warm up; then decay over 8 steps.
        assert_eq!(lr_at(LrScheduler::Cosine, 1.0, 2, 10, 0), 0.0);
        assert_eq!(lr_at(LrScheduler::Cosine, 1.0, 2, 10, 1), 0.5);
        assert_eq!(lr_at(LrScheduler::Cosine, 1.0, 2, 10, 2), 1.0);
        assert!((lr_at(LrScheduler::Cosine, 1.0, 2, 10, 6) - 0.5).abs() < 1e-12);
        assert!((lr_at(LrScheduler::Linear, 1.0, 2, 10, 6) - 0.5).abs() < 1e-12);
        assert!((lr_at(LrScheduler::Linear, 2.0, 0, 4, 1) - 1.5).abs() < 1e-12);
        assert_eq!(lr_at(LrScheduler::Constant, 3.0, 0, 4, 3), 3.0);
        assert!(lr_at(LrScheduler::Cosine, 1.0, 0, 4, 4).abs() < 1e-12);
    }
}
