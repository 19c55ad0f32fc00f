//! `skipgpt eval-mc`: lm-eval-style multiple-choice accuracy, dense and routed.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use skipgpt_pipeline::evaluate::{eval_mc as eval_mc_stage, EvalMcConfig};
use skipgpt_pipeline::McRow;

use crate::args::ReportArgs;
use crate::backend::BackendKind;
use crate::with_backend;

#[derive(Args, Debug, Clone)]
pub struct EvalMcArgs {
    #[command(flatten)]
    pub model: crate::args::ModelArgs,
    /// Task files, comma-separated: JSONL, one `{"context", "choices", "gold"}` per line.
    #[arg(
        long,
        value_delimiter = ',',
        required_unless_present = "synthetic_tasks"
    )]
    pub tasks: Vec<PathBuf>,
    /// Use the built-in tasks on the synthetic corpus' grammar, N examples each.
    #[arg(long, conflicts_with = "tasks", value_parser = crate::args::positive)]
    pub synthetic_tasks: Option<usize>,
    /// Also write the tasks used to this directory (JSONL).
    #[arg(long)]
    pub write_tasks: Option<PathBuf>,
    /// (context, choice) pairs per forward pass.
    #[arg(long, default_value_t = 16, value_parser = crate::args::positive)]
    pub batch_size: usize,
    #[command(flatten)]
    pub report: ReportArgs,
}

impl EvalMcArgs {
    pub fn config(&self) -> EvalMcConfig {
        EvalMcConfig {
            model: self.model.source(),
            tasks: self.tasks.clone(),
            synthetic_tasks: self.synthetic_tasks,
            write_tasks: self.write_tasks.clone(),
            batch_size: self.batch_size,
            quiet: self.report.json,
        }
    }
}

pub fn run(backend: BackendKind, args: EvalMcArgs) -> Result<()> {
    let config = args.config();
    let rows = with_backend!(backend, |B, device| eval_mc_stage::<B>(&config, &device))?;
    args.report.show(&rows, |rows| print_table(rows))
}

/// The paper-style table: per task acc / acc_norm, dense and routed, and the retention.
pub fn print_table(rows: &[McRow]) {
    println!(
        "{:<14} {:>6} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "task", "n", "dense acc", "acc_norm", "routed acc", "acc_norm", "retention"
    );
    let pct = |v: f64| format!("{:.1}%", 100.0 * v);
    for r in rows {
        let (ra, rn, ret) = match &r.routed {
            Some(x) => (
                pct(x.acc),
                pct(x.acc_norm),
                format!("{:.3}", r.retention().unwrap_or(0.0)),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        println!(
            "{:<14} {:>6} {:>10} {:>10} {:>10} {:>10} {:>10}",
            r.dense.task,
            r.dense.examples,
            pct(r.dense.acc),
            pct(r.dense.acc_norm),
            ra,
            rn,
            ret
        );
    }
    let n = rows.len() as f64;
    let mean = |f: &dyn Fn(&McRow) -> f64| rows.iter().map(f).sum::<f64>() / n;
    let dense = mean(&|r| r.dense.acc);
    if rows.iter().all(|r| r.routed.is_some()) {
        let routed = mean(&|r| r.routed.as_ref().map_or(0.0, |x| x.acc));
        println!(
            "{:<14} {:>6} {:>10} {:>10} {:>10} {:>10} {:>10.3}",
            "average",
            "",
            pct(dense),
            "",
            pct(routed),
            "",
            routed / dense.max(f64::MIN_POSITIVE)
        );
    } else {
        println!("{:<14} {:>6} {:>10}", "average", "", pct(dense));
    }
}
