//! A burn-train renderer for terminals and logs: one line every `log_every` optimizer steps
//! (the metrics averaged over those steps), one line per validation, and the same rows as JSON
//! lines in the run directory for plotting.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::train::metric::{MetricDefinition, MetricId};
use burn::train::renderer::{
    EvaluationName, EvaluationProgress, MetricState, MetricsRenderer, MetricsRendererEvaluation,
    MetricsRendererTraining, ProgressType, TrainingProgress,
};
use burn::train::Interrupter;
use serde::{Deserialize, Serialize};

use crate::metrics::Stat;

/// One printed line: a training window or a validation pass.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogRow {
    /// `train` or `valid`.
    pub split: String,
    /// Optimizer steps completed.
    pub step: usize,
    /// Metric name → value (averaged over the window, weighted by tokens).
    pub values: HashMap<String, f64>,
}

/// Reads the rows a run logged (`metrics.jsonl`).
pub fn read_log(path: &Path) -> Vec<LogRow> {
    std::fs::read_to_string(path)
        .map(|text| {
            text.lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Keeps only the rows up to `step`: what a resumed run has not redone.
pub fn truncate_log(path: &Path, step: usize) -> std::io::Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let kept: Vec<String> = read_log(path)
        .into_iter()
        .filter(|r| r.step <= step)
        .map(|r| serde_json::to_string(&r).expect("json"))
        .collect();
    let mut text = kept.join("\n");
    if !text.is_empty() {
        text.push('\n');
    }
    skipgpt_model::io::atomic_write::atomic_write(path, text.as_bytes())
        .map_err(|e| std::io::Error::other(e.to_string()))
}

/// Where the printer is in the run.
#[derive(Debug, Clone)]
pub struct ProgressLayout {
    pub total_steps: usize,
    pub steps_per_epoch: usize,
    pub accumulation: usize,
    pub log_every: usize,
    /// Tokens per optimizer step, for the throughput column.
    pub tokens_per_step: usize,
    /// Prefix of every line (`pretrain`, `tune-routers`).
    pub label: String,
    /// Print nothing (the rows are still logged).
    pub quiet: bool,
}

#[derive(Default)]
struct Window {
    sums: HashMap<String, (f64, f64)>,
}

impl Window {
    fn add(&mut self, name: &str, value: f64, weight: f64) {
        // the temperature is NaN by design outside Gumbel routing (validation); any other NaN
        // is a fact to show, not to hide
        if value.is_nan() && name == Stat::Temperature.name() {
            return;
        }
        let e = self.sums.entry(name.to_string()).or_default();
        e.0 += value * weight;
        e.1 += weight;
    }

    fn take(&mut self) -> HashMap<String, f64> {
        std::mem::take(&mut self.sums)
            .into_iter()
            .map(|(k, (s, w))| (k, if w > 0.0 { s / w } else { f64::NAN }))
            .collect()
    }
}

/// The renderer.
pub struct ProgressPrinter {
    layout: ProgressLayout,
    names: HashMap<MetricId, String>,
    train: Window,
    valid: Window,
    log: Option<PathBuf>,
    last_print: Instant,
    steps_since_print: usize,
    /// Optimizer steps completed so far.
    step: usize,
    /// Stops the run when the training loss stops being finite.
    interrupter: Option<Interrupter>,
}

impl ProgressPrinter {
    /// `log`: the JSON-lines file rows are appended to.
    pub fn new(layout: ProgressLayout, log: Option<PathBuf>) -> Self {
        ProgressPrinter {
            layout,
            names: HashMap::new(),
            train: Window::default(),
            valid: Window::default(),
            log,
            last_print: Instant::now(),
            steps_since_print: 0,
            step: 0,
            interrupter: None,
        }
    }

    /// Stops training through `interrupter` as soon as a training loss is NaN or infinite:
    /// the run then ends with that message, before its next checkpoint, and nothing of it is
    /// saved as an output.
    pub fn with_interrupter(mut self, interrupter: Interrupter) -> Self {
        self.interrupter = Some(interrupter);
        self
    }

    fn record(&mut self, window: Split, state: MetricState) {
        if let MetricState::Numeric(entry, numeric) = state {
            let Some(name) = self.names.get(&entry.metric_id).cloned() else {
                return;
            };
            // burn's numeric entries carry the batch's weight (tokens) with the value
            let (value, weight) = match numeric {
                burn::train::metric::NumericEntry::Value(v) => (v, 1.0),
                burn::train::metric::NumericEntry::Aggregated {
                    aggregated_value,
                    count,
                } => (aggregated_value, count.max(1) as f64),
            };
            let is_loss = name == Stat::Loss.name() || name == Stat::LmLoss.name();
            if matches!(window, Split::Train) && is_loss && !value.is_finite() {
                if let Some(interrupter) = self.interrupter.take() {
                    interrupter.stop(Some(&format!(
                        "{}: the training loss ({name}) became {value} at step {}: the run \
                         diverged. Lower --lr or set --grad-clip; nothing was saved from the \
                         diverged steps (the last checkpoint, if any, is intact)",
                        self.layout.label,
                        self.step + 1
                    )));
                }
            }
            match window {
                Split::Train => self.train.add(&name, value, weight),
                Split::Valid => self.valid.add(&name, value, weight),
            }
        }
    }

    fn emit(&mut self, split: &str, step: usize, values: HashMap<String, f64>) {
        let row = LogRow {
            split: split.to_string(),
            step,
            values,
        };
        if let Some(path) = &self.log {
            let line = serde_json::to_string(&row).expect("json");
            let appended = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .and_then(|mut f| writeln!(f, "{line}"));
            if let Err(e) = appended {
                eprintln!("warning: cannot append to {}: {e}", path.display());
            }
        }
        if !self.layout.quiet {
            eprintln!("{}", self.format(&row));
        }
    }

    fn format(&mut self, row: &LogRow) -> String {
        let v = |s: Stat| row.values.get(s.name()).copied();
        let width = self.layout.total_steps.to_string().len();
        let mut line = format!(
            "{} {:<5} step {:>width$}/{}",
            self.layout.label, row.split, row.step, self.layout.total_steps
        );
        if let Some(x) = v(Stat::Loss) {
            line += &format!(" | loss {x:.4}");
        }
        if let Some(x) = v(Stat::LmLoss) {
            line += &format!(" | lm {x:.4}");
        }
        if let Some(x) = v(Stat::Perplexity) {
            line += &format!(" | ppl {x:.2}");
        }
        if let Some(x) = v(Stat::Kl) {
            line += &format!(" | kl {x:.4}");
        }
        if let (Some(s), Some(a), Some(m)) = (v(Stat::Skip), v(Stat::AttnSkip), v(Stat::MlpSkip)) {
            line += &format!(" | skip {s:.3} (attn {a:.3}, mlp {m:.3})");
        }
        if let Some(t) = v(Stat::Temperature) {
            line += &format!(" | τ {t:.2}");
        }
        if let Some(lr) = row.values.get("Learning Rate") {
            line += &format!(" | lr {lr:.2e}");
        }
        if row.split == "train" && self.steps_since_print > 0 {
            let secs = self.last_print.elapsed().as_secs_f64().max(1e-9);
            let tps = (self.steps_since_print * self.layout.tokens_per_step) as f64 / secs;
            line += &format!(" | {tps:.0} tok/s");
            self.last_print = Instant::now();
            self.steps_since_print = 0;
        }
        line
    }

    /// Optimizer steps completed after micro-batch `iteration` (1-based) of `epoch`.
    fn steps_done(&self, epoch: usize, iteration: usize) -> (usize, bool) {
        let a = self.layout.accumulation.max(1);
        let micro = (epoch.saturating_sub(1)) * self.layout.steps_per_epoch * a + iteration;
        (micro / a, micro.is_multiple_of(a))
    }
}

#[derive(Clone, Copy)]
enum Split {
    Train,
    Valid,
}

impl MetricsRendererTraining for ProgressPrinter {
    fn update_train(&mut self, state: MetricState) {
        self.record(Split::Train, state);
    }

    fn update_valid(&mut self, state: MetricState) {
        self.record(Split::Valid, state);
    }

    fn render_train(&mut self, item: TrainingProgress, _: Vec<ProgressType>) {
        let Some(iteration) = item.iteration else {
            return;
        };
        let (step, boundary) = self.steps_done(item.global_progress.items_processed, iteration);
        if !boundary {
            return;
        }
        self.step = step;
        self.steps_since_print += 1;
        if step % self.layout.log_every.max(1) == 0 || step == self.layout.total_steps {
            let values = self.train.take();
            self.emit("train", step, values);
        }
    }

    fn render_valid(&mut self, item: TrainingProgress, _: Vec<ProgressType>) {
        let Some(progress) = &item.progress else {
            return;
        };
        if progress.items_processed < progress.items_total {
            return;
        }
        let epoch = item.global_progress.items_processed;
        let step = (epoch * self.layout.steps_per_epoch).min(self.layout.total_steps);
        let values = self.valid.take();
        self.emit("valid", step, values);
    }

    fn on_train_end(
        &mut self,
        _summary: Option<burn::train::LearnerSummary>,
    ) -> Result<(), Box<dyn core::error::Error>> {
        Ok(())
    }
}

impl MetricsRendererEvaluation for ProgressPrinter {
    fn update_test(&mut self, _name: EvaluationName, _state: MetricState) {}

    fn render_test(&mut self, _item: EvaluationProgress, _: Vec<ProgressType>) {}
}

impl MetricsRenderer for ProgressPrinter {
    fn manual_close(&mut self) {}

    fn register_metric(&mut self, definition: MetricDefinition) {
        self.names.insert(definition.metric_id, definition.name);
    }
}
