//! `skipgpt analyze`: where and for which tokens the routers skip, with pictures.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use skipgpt_pipeline::analyse;
use skipgpt_pipeline::{AnalyseConfig, AnalyseReport};

use crate::args::{CorpusArgs, ReportArgs};
use crate::backend::BackendKind;
use crate::with_backend;

#[derive(Args, Debug, Clone)]
pub struct AnalyzeArgs {
    /// A SkipGPT model directory, or any model (a GGUF file too) with --routers.
    #[arg(long)]
    pub model: PathBuf,
    /// SkipGPT routers to attach to --model: a directory with skipgpt.json and
    /// routers.safetensors (as published under models/).
    #[arg(long)]
    pub routers: Option<PathBuf>,
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
    #[arg(long, default_value_t = 8, value_parser = crate::args::positive)]
    pub batch_size: usize,
    #[command(flatten)]
    pub report: ReportArgs,
}

impl AnalyzeArgs {
    pub fn config(&self) -> AnalyseConfig {
        AnalyseConfig {
            model: self.model.clone(),
            routers: self.routers.clone(),
            corpus: self.corpus.config(),
            text: self.text.clone(),
            out: self.out.clone(),
            sequences: self.sequences,
            batch_size: self.batch_size,
        }
    }
}

pub fn run(backend: BackendKind, args: AnalyzeArgs) -> Result<()> {
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
