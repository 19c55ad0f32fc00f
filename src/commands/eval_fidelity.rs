//! `skipgpt eval-fidelity`: how close a routed model stays to its dense model where nobody trained
//! it (KL, top-1 agreement, perplexity ratio, answers and their loops).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use skipgpt_pipeline::{eval_fidelity, EvalFidelityConfig, EvalFidelityReport};

use crate::args::ModelArgs;
use crate::args::PromptFormatArgs;
use crate::args::ReportArgs;
use crate::backend::BackendKind;
use crate::with_backend;

#[derive(Args, Debug)]
pub struct EvalFidelityArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The dense reference model directory [default: --model without its adapter, every
    /// module executing; give it when --model holds merged LoRA weights].
    #[arg(long)]
    pub dense: Option<PathBuf>,
    /// Text no training run used (.txt paragraphs or JSONL with `text`); repeatable.
    #[arg(long)]
    pub data: Vec<PathBuf>,
    #[arg(long, default_value_t = 128, value_parser = crate::args::positive)]
    pub seq_len: usize,
    /// Compare on at most N sequences of the text, evenly spaced over it.
    #[arg(long, value_parser = crate::args::positive)]
    pub max_sequences: Option<usize>,
    #[arg(long, default_value_t = 8, value_parser = crate::args::positive)]
    pub batch_size: usize,
    /// Prompts, one a line: both models answer greedily and the answers are compared.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    #[command(flatten)]
    pub format: PromptFormatArgs,
    /// Longest answer in the generation check.
    #[arg(long, default_value_t = 96, value_parser = crate::args::positive)]
    pub max_new_tokens: usize,
    /// Print each prompt with both answers.
    #[arg(long)]
    pub show_answers: bool,
    #[command(flatten)]
    pub report: ReportArgs,
}

pub fn run(backend: BackendKind, args: EvalFidelityArgs) -> Result<()> {
    let config = EvalFidelityConfig {
        model: args.model.source(),
        dense: args.dense.clone(),
        data: args.data.clone(),
        seq_len: args.seq_len,
        max_sequences: args.max_sequences,
        batch_size: args.batch_size,
        prompts: args.prompts.clone(),
        format: args.format.format(),
        max_new_tokens: args.max_new_tokens,
        quiet: args.report.json,
    };
    let report = with_backend!(backend, |B, device| eval_fidelity::<B>(&config, &device))?;
    args.report
        .show(&report, |r| print_fidelity(r, args.show_answers))
}

fn print_fidelity(r: &EvalFidelityReport, show_answers: bool) {
    if let Some(t) = &r.text {
        println!(
            "text ({} tokens): KL to dense {:.4} nats/token, top-1 agreement {:.1}%, perplexity {:.3} against dense {:.3} ({:.3}x)",
            t.tokens,
            t.kl,
            100.0 * t.agreement,
            t.perplexity,
            t.dense_perplexity,
            t.perplexity_ratio
        );
        println!(
            "  skip: attention {:.1}%  mlp {:.1}%  params {:.1}%",
            100.0 * t.attn_skip,
            100.0 * t.mlp_skip,
            100.0 * t.param_skip
        );
    }
    if let Some(g) = &r.generation {
        println!(
            "answers ({} prompts, {} dense tokens): agreement with dense {:.1}%, 4-gram repetition {:.3} (dense {:.3}), loops {} (dense {})",
            g.prompts,
            g.tokens,
            100.0 * g.agreement,
            g.routed_repetition,
            g.dense_repetition,
            g.routed_loops,
            g.dense_loops
        );
    }
    if show_answers {
        for (prompt, dense, routed) in &r.answers {
            println!("\n> {prompt}\n  dense:  {dense:?}\n  routed: {routed:?}");
        }
    }
}
