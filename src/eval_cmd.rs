//! The evaluation-side commands: `eval-mc` (zero-shot multiple choice, dense and routed side
//! by side), `prune-static`, `calibrate-routers` and `analyze`, each mapped onto its
//! `skipgpt_pipeline` stage, with the report printed.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use skipgpt_pipeline::evaluate::{eval_mc as eval_mc_stage, EvalMcConfig};
use skipgpt_pipeline::{analyse, calibrate, prune_static, McRow};
use skipgpt_pipeline::{
    AnalyseConfig, AnalyseReport, CalibrateConfig, CalibrateOutcome, PruneStaticConfig,
    PruneStaticReport,
};

use crate::args::{CorpusArgs, ReportArgs};
use crate::backend::BackendKind;
use crate::with_backend;

#[derive(Args, Debug, Clone)]
pub struct EvalMcArgs {
    #[command(flatten)]
    pub model: crate::commands::ModelArgs,
    /// Task files, comma-separated: JSONL, one `{"context", "choices", "gold"}` per line.
    #[arg(
        long,
        value_delimiter = ',',
        required_unless_present = "synthetic_tasks"
    )]
    pub tasks: Vec<PathBuf>,
    /// Use the built-in tasks on the synthetic corpus' grammar, N examples each.
    #[arg(long, conflicts_with = "tasks", value_parser = crate::positive)]
    pub synthetic_tasks: Option<usize>,
    /// Also write the tasks used to this directory (JSONL).
    #[arg(long)]
    pub write_tasks: Option<PathBuf>,
    /// (context, choice) pairs per forward pass.
    #[arg(long, default_value_t = 16, value_parser = crate::positive)]
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

pub fn eval_mc(backend: BackendKind, args: EvalMcArgs) -> Result<()> {
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

#[derive(Args, Debug, Clone)]
pub struct PruneStaticArgs {
    /// The model to prune: a Hugging Face directory with tokenizer.json.
    #[arg(long)]
    pub model: PathBuf,
    /// Output: a SkipGPT directory whose constant routers remove the chosen modules for every
    /// token (so it is evaluated and served like any SkipGPT model).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub corpus: CorpusArgs,
    /// Fraction of the decoder's parameters to remove (rounded to whole modules).
    #[arg(long, default_value_t = 0.25)]
    pub target_sparsity: f64,
    #[arg(long, value_enum, default_value = "block")]
    pub mode: skipgpt_eval::StaticMode,
    /// Calibration sequences (from the training split) for Block Influence.
    #[arg(long, default_value_t = 64)]
    pub calibration_sequences: usize,
    #[arg(long, default_value_t = 8, value_parser = crate::positive)]
    pub batch_size: usize,
    #[command(flatten)]
    pub report: ReportArgs,
}

impl PruneStaticArgs {
    pub fn config(&self) -> PruneStaticConfig {
        PruneStaticConfig {
            model: self.model.clone(),
            out: self.out.clone(),
            corpus: self.corpus.config(),
            target_sparsity: self.target_sparsity,
            mode: self.mode,
            calibration_sequences: self.calibration_sequences,
            batch_size: self.batch_size,
        }
    }
}

pub fn prune_static_cmd(backend: BackendKind, args: PruneStaticArgs) -> Result<()> {
    let config = args.config();
    let report = with_backend!(backend, |B, device| prune_static::<B>(&config, &device))?;
    args.report
        .show(&report, |r| print_pruned(r, config.target_sparsity))
}

/// Block Influence per layer, what was removed, and where it went.
pub fn print_pruned(report: &PruneStaticReport, target: f64) {
    let bi = &report.influence;
    println!(
        "block influence ({} calibration tokens), layer / attention: {}",
        bi.tokens,
        bi.layer
            .iter()
            .zip(&bi.attention)
            .enumerate()
            .map(|(i, (l, a))| format!("L{i} {l:.3}/{a:.3}"))
            .collect::<Vec<_>>()
            .join("  ")
    );
    let removed = report.removed();
    println!(
        "removed: {} ({:.1}% of decoder parameters, target {:.0}%)",
        if removed.is_empty() {
            "nothing".to_string()
        } else {
            removed.join(", ")
        },
        100.0 * report.plan.param_skip,
        100.0 * target
    );
    println!("prune-static: saved to {}", report.out.display());
}

#[derive(Args, Debug)]
pub struct CalibrateRoutersArgs {
    /// A SkipGPT model directory (after stage 1).
    #[arg(long)]
    pub model: PathBuf,
    /// Output: the same model with every router's SKIP bias shifted by the amount found, and
    /// `calibration.json` (what was measured).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub corpus: CorpusArgs,
    /// The skip rate deterministic routing should realise; default: the model's own target
    /// (`skipgpt.json`).
    #[arg(long)]
    pub target_sparsity: Option<f64>,
    /// What the target counts; default: the model's own unit (`skipgpt.json`).
    #[arg(long, value_enum)]
    pub sparsity_unit: Option<skipgpt_model::SparsityUnit>,
    /// Calibration sequences (from the training split).
    #[arg(long, default_value_t = 64, value_parser = crate::positive)]
    pub sequences: usize,
    #[arg(long, default_value_t = 8, value_parser = crate::positive)]
    pub batch_size: usize,
    #[command(flatten)]
    pub report: ReportArgs,
}

impl CalibrateRoutersArgs {
    pub fn config(&self) -> CalibrateConfig {
        CalibrateConfig {
            model: self.model.clone(),
            out: self.out.clone(),
            corpus: self.corpus.config(),
            target_sparsity: self.target_sparsity,
            sparsity_unit: self.sparsity_unit,
            sequences: self.sequences,
            batch_size: self.batch_size,
            quiet: false,
        }
    }
}

/// Shifts the routers' SKIP biases so that deterministic routing realises the target on
/// calibration text, printing every bisection pass, and writes the model.
pub fn calibrate_routers_cmd(backend: BackendKind, args: CalibrateRoutersArgs) -> Result<()> {
    let config = args.config();
    // the passes are progress: on stdout with the text summary, on stderr beside JSON
    let json = args.report.json;
    let on_pass = |pass: usize, shift: f64, skip: f64| {
        let line = format!(
            "  pass {pass:>2}: shift {shift:+.4} -> skip {:.2}%",
            100.0 * skip
        );
        if json {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    };
    let done = with_backend!(backend, |B, device| calibrate::<B>(
        &config, &device, on_pass
    ))?;
    args.report.show(&done, print_calibrated)
}

/// The skip rate before and after, the shift, and where the model went.
fn print_calibrated(done: &CalibrateOutcome) {
    let r = &done.report;
    println!(
        "calibrate-routers: skip {:.2}% -> {:.2}% (target {:.2}%) with a SKIP-bias shift of {:+.4}, {} passes",
        100.0 * r.skip_before,
        100.0 * r.skip_after,
        100.0 * r.target,
        r.shift,
        r.passes
    );
    println!("calibrate-routers: saved to {}", done.out.display());
}

#[derive(Args, Debug, Clone)]
pub struct AnalyzeArgs {
    /// A SkipGPT model directory.
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub corpus: CorpusArgs,
    /// Text whose per-token routing is drawn as a heatmap.
    #[arg(
        long,
        default_value = skipgpt_pipeline::analyse::DEFAULT_TEXT
    )]
    pub text: String,
    /// Where `routing.json` and the SVG pictures go.
    #[arg(long)]
    pub out: PathBuf,
    /// Sequences of the held-out split to analyse (0: all).
    #[arg(long, default_value_t = 256)]
    pub sequences: usize,
    #[arg(long, default_value_t = 8, value_parser = crate::positive)]
    pub batch_size: usize,
    #[command(flatten)]
    pub report: ReportArgs,
}

impl AnalyzeArgs {
    pub fn config(&self) -> AnalyseConfig {
        AnalyseConfig {
            model: self.model.clone(),
            corpus: self.corpus.config(),
            text: self.text.clone(),
            out: self.out.clone(),
            sequences: self.sequences,
            batch_size: self.batch_size,
        }
    }
}

pub fn analyze_cmd(backend: BackendKind, args: AnalyzeArgs) -> Result<()> {
    let config = args.config();
    let report = with_backend!(backend, |B, device| analyse::<B>(&config, &device))?;
    args.report.show(&report, print_analysis)
}

/// The analysis' findings in a few lines, and the files written.
pub fn print_analysis(report: &AnalyseReport) {
    let analysis = &report.analysis;
    let o = &analysis.observations;
    println!(
        "{} tokens: attention skip {:.1}%, MLP skip {:.1}%",
        analysis.tokens,
        100.0 * analysis.attn_skip,
        100.0 * analysis.mlp_skip
    );
    println!(
        "attention skipped more than MLP: {}",
        if o.attention_skipped_more_than_mlp {
            "yes"
        } else {
            "no"
        }
    );
    println!(
        "later positions (second half vs first): attention executed {:.1}% vs {:.1}% ({}), MLP executed {:.1}% vs {:.1}% ({})",
        100.0 * o.attn_executed_early_late.1,
        100.0 * o.attn_executed_early_late.0,
        if o.later_positions_use_more_attention { "more" } else { "not more" },
        100.0 * o.mlp_executed_early_late.1,
        100.0 * o.mlp_executed_early_late.0,
        if o.later_positions_use_less_mlp { "less" } else { "not less" },
    );
    println!(
        "compute by frequency class (most frequent first): {}",
        analysis
            .by_frequency
            .iter()
            .map(|c| format!("{:.1}%", 100.0 * c.executed))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let show = |v: &[skipgpt_eval::analysis::TokenCompute]| {
        v.iter()
            .take(5)
            .map(|t| format!("{:?} {:.0}%", t.text, 100.0 * t.executed))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("most compute: {}", show(&analysis.most_compute));
    println!("least compute: {}", show(&analysis.least_compute));
    for f in &report.files {
        println!("wrote {}", f.display());
    }
}
