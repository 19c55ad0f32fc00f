//! `skipgpt calibrate-routers`: shift a model's router biases until its skip rate on a corpus meets
//! a target.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use skipgpt_pipeline::calibrate;
use skipgpt_pipeline::{CalibrateConfig, CalibrateOutcome};

use crate::args::{CorpusArgs, ReportArgs};
use crate::backend::BackendKind;
use crate::with_backend;

#[derive(Args, Debug)]
pub struct CalibrateRoutersArgs {
    /// A SkipGPT model directory (after stage 1), or any model (a GGUF file too) with
    /// --routers.
    #[arg(long)]
    pub model: PathBuf,
    /// SkipGPT routers to calibrate on --model: a directory with skipgpt.json and
    /// routers.safetensors (as published under models/).
    #[arg(long)]
    pub routers: Option<PathBuf>,
    /// Output: the same model with every router's SKIP bias shifted by the amount found, and
    /// `calibration.json` (what was measured); with --routers, or a GGUF, the routers alone
    /// (attach them with --routers).
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
    #[arg(long, default_value_t = 64, value_parser = crate::args::positive)]
    pub sequences: usize,
    #[arg(long, default_value_t = 8, value_parser = crate::args::positive)]
    pub batch_size: usize,
    #[command(flatten)]
    pub report: ReportArgs,
}

impl CalibrateRoutersArgs {
    pub fn config(&self) -> CalibrateConfig {
        CalibrateConfig {
            model: self.model.clone(),
            routers: self.routers.clone(),
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
pub fn run(backend: BackendKind, args: CalibrateRoutersArgs) -> Result<()> {
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
