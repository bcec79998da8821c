//! Learning-rate schedules with linear warmup, as transformers'
//! `get_constant_schedule_with_warmup`, `get_linear_schedule_with_warmup`
//! and `get_cosine_schedule_with_warmup` (half a cosine to zero).

use serde::{Deserialize, Serialize};

/// Shape after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// Stay at the peak.
    Constant,
    /// Straight down to zero at the last step.
    Linear,
    /// Half a cosine down to zero at the last step.
    Cosine,
}

/// A schedule over `total` optimizer steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Shape.
    pub kind: ScheduleKind,
    /// Peak learning rate.
    pub peak: f64,
    /// Warmup steps (linear from 0).
    pub warmup: u64,
    /// Total optimizer steps.
    pub total: u64,
}

impl Schedule {
    /// Learning rate for optimizer step `step` (0-based, as transformers'
    /// LambdaLR sees it before its first `scheduler.step()`).
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.peak * step as f64 / self.warmup.max(1) as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1) as f64;
        let progress = (step - self.warmup) as f64 / span;
        let factor = match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => (1.0 - progress).max(0.0),
            ScheduleKind::Cosine => {
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        };
        self.peak * factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_shapes() {
        let s = |kind| Schedule {
            kind,
            peak: 1.0,
            warmup: 2,
            total: 10,
        };
        assert_eq!(s(ScheduleKind::Constant).lr(0), 0.0);
        assert_eq!(s(ScheduleKind::Constant).lr(1), 0.5);
        assert_eq!(s(ScheduleKind::Constant).lr(7), 1.0);
        assert_eq!(s(ScheduleKind::Linear).lr(2), 1.0);
        assert_eq!(s(ScheduleKind::Linear).lr(6), 0.5);
        assert!((s(ScheduleKind::Cosine).lr(6) - 0.5).abs() < 1e-12);
        assert_eq!(s(ScheduleKind::Cosine).lr(10), 0.0);
    }
}
