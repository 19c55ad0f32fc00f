//! `skipgpt self-data`: a training corpus of the dense model's own answers to chat prompts.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use skipgpt_pipeline::{self_data, SelfDataConfig, SelfDataReport};

use crate::args::ModelArgs;
use crate::args::PromptFormatArgs;
use crate::args::ReportArgs;
use crate::backend::BackendKind;
use crate::with_backend;

#[derive(Args, Debug)]
pub struct SelfDataArgs {
    /// The model whose own answers make the corpus (run dense).
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompts, one a line (`\n` in a line stands for a newline).
    #[arg(long)]
    pub prompts: PathBuf,
    /// The JSONL corpus to write (`text` is what training reads).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub format: PromptFormatArgs,
    /// Answers per prompt (each its own draw).
    #[arg(long, default_value_t = 1, value_parser = crate::args::positive)]
    pub samples_per_prompt: usize,
    #[arg(long, default_value_t = 256, value_parser = crate::args::positive)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0.9)]
    pub top_p: f32,
    /// With --batch-size, fixes every draw: the same seed writes the same file.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 8, value_parser = crate::args::positive)]
    pub batch_size: usize,
    #[command(flatten)]
    pub report: ReportArgs,
}

pub fn run(backend: BackendKind, args: SelfDataArgs) -> Result<()> {
    let config = SelfDataConfig {
        model: args.model.source(),
        prompts: args.prompts.clone(),
        out: args.out.clone(),
        format: args.format.format(),
        samples_per_prompt: args.samples_per_prompt,
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
        batch_size: args.batch_size,
        quiet: args.report.json,
    };
    let report = with_backend!(backend, |B, device| self_data::<B>(&config, &device))?;
    args.report.show(&report, |r: &SelfDataReport| {
        println!(
            "self-data: {} answers ({} tokens, {} ended by the model) written to {}",
            r.records,
            r.tokens,
            r.finished,
            r.out.display()
        )
    })
}
