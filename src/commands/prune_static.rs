//! `skipgpt prune-static`: the ShortGPT-style static baseline, whole modules removed by importance.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use skipgpt_pipeline::prune_static;
use skipgpt_pipeline::{PruneStaticConfig, PruneStaticReport};

use crate::args::{CorpusArgs, ReportArgs};
use crate::backend::BackendKind;
use crate::with_backend;

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
    #[arg(long, default_value_t = 8, value_parser = crate::args::positive)]
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

pub fn run(backend: BackendKind, args: PruneStaticArgs) -> Result<()> {
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
