//! Learning-rate and temperature schedules, both functions of the *optimizer* step.
//!
//! burn-train steps the learning-rate scheduler once per micro-batch, so with gradient
//! accumulation the scheduler counts micro-batches and divides by the accumulation itself: a run
//! of N optimizer steps sees the same curve whatever the accumulation.

use burn::optim::lr_scheduler::LrScheduler;
use burn::optim::LearningRate;
use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};

/// The shape of the learning rate after warmup.
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    /// Flat after warmup (the paper's stage 1).
    #[default]
    Constant,
    /// Half a cosine from the peak down to 0 at the last step (HF's `cosine`).
    Cosine,
}

/// Linear warmup from 0, then constant or cosine decay.
#[derive(Debug, Clone)]
pub struct WarmupSchedule {
    peak: f64,
    warmup_steps: usize,
    total_steps: usize,
    kind: ScheduleKind,
    accumulation: usize,
    /// Micro-batches seen so far (the scheduler's whole state).
    micro: usize,
}

impl WarmupSchedule {
    pub fn new(
        peak: f64,
        warmup_steps: usize,
        total_steps: usize,
        kind: ScheduleKind,
        accumulation: usize,
    ) -> Self {
        WarmupSchedule {
            peak,
            warmup_steps,
            total_steps: total_steps.max(1),
            kind,
            accumulation: accumulation.max(1),
            micro: 0,
        }
    }

    /// The learning rate of optimizer step `step` (0-based), as HF's schedulers compute it.
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.peak * (step + 1) as f64 / self.warmup_steps as f64;
        }
        match self.kind {
            ScheduleKind::Constant => self.peak,
            ScheduleKind::Cosine => {
                let decay = (self.total_steps - self.warmup_steps).max(1) as f64;
                let progress = ((step - self.warmup_steps) as f64 / decay).min(1.0);
                self.peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}

impl LrScheduler for WarmupSchedule {
    type Record<B: Backend> = usize;

    fn step(&mut self) -> LearningRate {
        let step = self.micro / self.accumulation;
        self.micro += 1;
        self.lr_at(step)
    }

    fn to_record<B: Backend>(&self) -> usize {
        self.micro
    }

    fn load_record<B: Backend>(mut self, record: usize) -> Self {
        self.micro = record;
        self
    }
}

/// The Gumbel temperature of optimizer step `step` of `total`: linear from `start` at the first
/// step to `end` at the last (the reference code stops one step short, at `end + (start −
/// end)/total`).
pub fn temperature_at(step: usize, total: usize, start: f64, end: f64) -> f64 {
    let last = total.saturating_sub(1).max(1);
    let progress = (step.min(last)) as f64 / last as f64;
    start + (end - start) * progress
}

#[cfg(test)]
mod tests {
    use super::*;

    type B = burn::backend::NdArray<f32>;

    #[test]
    fn warmup_then_cosine_counts_optimizer_steps() {
        // 2 micro-batches per optimizer step: the curve must not change
        let mut s = WarmupSchedule::new(1.0, 2, 10, ScheduleKind::Cosine, 2);
        let lrs: Vec<f64> = (0..20).map(|_| s.step()).collect();
        assert_eq!(lrs[0], 0.5);
        assert_eq!(lrs[1], 0.5);
        assert_eq!(lrs[2], 1.0);
        assert_eq!(lrs[4], 1.0); // first decay step: cos(0)
        let mid = lrs[2 * 6]; // step 6: progress 4/8
        assert!((mid - 0.5).abs() < 1e-12, "{mid}");
        assert!(lrs[19] < 0.05 && lrs[19] > 0.0);
        assert!(lrs.windows(2).skip(4).all(|w| w[1] <= w[0]));
    }

    #[test]
    fn constant_and_resume() {
        let mut s = WarmupSchedule::new(2e-3, 0, 5, ScheduleKind::Constant, 1);
        assert_eq!(s.step(), 2e-3);
        let record = LrScheduler::to_record::<B>(&s);
        let mut a = s.clone();
        let mut b =
            WarmupSchedule::new(2e-3, 0, 5, ScheduleKind::Constant, 1).load_record::<B>(record);
        for _ in 0..4 {
            assert_eq!(a.step(), b.step());
        }
    }

    #[test]
    fn temperature_is_linear_from_start_to_end() {
        assert_eq!(temperature_at(0, 5, 5.0, 1.0), 5.0);
        assert_eq!(temperature_at(2, 5, 5.0, 1.0), 3.0);
        assert_eq!(temperature_at(4, 5, 5.0, 1.0), 1.0);
        assert_eq!(temperature_at(9, 5, 5.0, 1.0), 1.0);
        assert_eq!(temperature_at(0, 1, 5.0, 1.0), 5.0);
    }
}
