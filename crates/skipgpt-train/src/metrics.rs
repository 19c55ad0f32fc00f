//! burn-train metrics over [`StepStats`]: loss, LM loss, perplexity, skip rates, temperature.

use std::sync::Arc;

use burn::train::metric::state::{FormatOptions, NumericMetricState};
use burn::train::metric::{
    Adaptor, Metric, MetricAttributes, MetricMetadata, MetricName, Numeric, NumericAttributes,
    NumericEntry, SerializedEntry,
};

use crate::step::StepStats;

/// Which number of a step a [`StatMetric`] follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stat {
    /// The optimised loss (LM loss plus the sparsity term).
    Loss,
    LmLoss,
    /// `exp(lm_loss)`.
    Perplexity,
    AttnSkip,
    MlpSkip,
    /// The global skip rate the sparsity term compares with T: the mean of the attention and
    /// MLP rates, or weighted by parameters when the target counts parameters.
    Skip,
    Temperature,
    /// KL(dense ‖ routed) per token, when the objective distils.
    Kl,
}

impl Stat {
    /// The metric name, also the name of burn-train's log files.
    pub fn name(self) -> &'static str {
        match self {
            Stat::Loss => "Loss",
            Stat::LmLoss => "LM Loss",
            Stat::Perplexity => "Perplexity",
            Stat::AttnSkip => "Attention Skip",
            Stat::MlpSkip => "MLP Skip",
            Stat::Skip => "Skip",
            Stat::Temperature => "Temperature",
            Stat::Kl => "KL to dense",
        }
    }

    fn of(self, s: &StepStats) -> f64 {
        match self {
            Stat::Loss => s.loss,
            Stat::LmLoss => s.lm_loss,
            Stat::Perplexity => s.lm_loss.exp(),
            Stat::AttnSkip => s.attn_skip,
            Stat::MlpSkip => s.mlp_skip,
            Stat::Skip => s.skip,
            Stat::Temperature => s.temperature,
            Stat::Kl => s.kl,
        }
    }

    fn lower_is_better(self) -> bool {
        matches!(
            self,
            Stat::Loss | Stat::LmLoss | Stat::Perplexity | Stat::Kl
        )
    }
}

impl Adaptor<StepStats> for StepStats {
    fn adapt(&self) -> StepStats {
        *self
    }
}

/// One number of [`StepStats`] as a numeric burn-train metric, weighted by tokens.
#[derive(Clone)]
pub struct StatMetric {
    stat: Stat,
    name: MetricName,
    state: NumericMetricState,
}

impl StatMetric {
    pub fn new(stat: Stat) -> Self {
        StatMetric {
            stat,
            name: Arc::new(stat.name().to_string()),
            state: NumericMetricState::new(),
        }
    }
}

impl Metric for StatMetric {
    type Input = StepStats;

    fn name(&self) -> MetricName {
        self.name.clone()
    }

    fn attributes(&self) -> MetricAttributes {
        NumericAttributes {
            unit: None,
            higher_is_better: !self.stat.lower_is_better(),
        }
        .into()
    }

    fn update(&mut self, item: &StepStats, _metadata: &MetricMetadata) -> SerializedEntry {
        self.state.update(
            self.stat.of(item),
            item.tokens,
            FormatOptions::new(self.name()).precision(4),
        )
    }

    fn clear(&mut self) {
        self.state.reset()
    }
}

impl Numeric for StatMetric {
    fn value(&self) -> NumericEntry {
        self.state.current_value()
    }

    fn running_value(&self) -> NumericEntry {
        self.state.running_value()
    }
}

/// The metrics of a run with an objective: stage 1 adds skip rates and temperature.
pub fn stats_for(routed: bool, gumbel: bool, distilled: bool) -> Vec<Stat> {
    let mut stats = vec![Stat::Loss, Stat::LmLoss, Stat::Perplexity];
    if distilled {
        stats.push(Stat::Kl);
    }
    if routed {
        stats.extend([Stat::Skip, Stat::AttnSkip, Stat::MlpSkip]);
    }
    if gumbel {
        stats.push(Stat::Temperature);
    }
    stats
}
