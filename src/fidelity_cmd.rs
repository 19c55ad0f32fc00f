//! `skipgpt eval-fidelity` and `skipgpt self-data`: the commands that keep a SkipGPT model
//! honest against its dense original (arguments onto `skipgpt_pipeline`'s configs, reports
//! printed).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use skipgpt_pipeline::{
    eval_fidelity, self_data, EvalFidelityConfig, EvalFidelityReport, PromptFormat, SelfDataConfig,
    SelfDataReport,
};

use crate::args::ReportArgs;
use crate::backend::BackendKind;
use crate::commands::ModelArgs;
use crate::with_backend;

/// How prompts are put to the model.
#[derive(Args, Debug, Clone)]
pub struct PromptFormatArgs {
    /// A Jinja chat template to use instead of the model's own (tokenizer_config.json).
    #[arg(long, conflicts_with = "raw_prompts")]
    pub chat_template: Option<PathBuf>,
    /// Continue the prompts as plain text instead of putting them in the chat format.
    #[arg(long)]
    pub raw_prompts: bool,
}

impl PromptFormatArgs {
    fn format(&self) -> PromptFormat {
        match (&self.chat_template, self.raw_prompts) {
            (_, true) => PromptFormat::Raw,
            (Some(path), false) => PromptFormat::ChatTemplateFile(path.clone()),
            (None, false) => PromptFormat::Chat,
        }
    }
}

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
    #[arg(long, default_value_t = 128, value_parser = crate::positive)]
    pub seq_len: usize,
    /// Compare on at most N sequences of the text, evenly spaced over it.
    #[arg(long, value_parser = crate::positive)]
    pub max_sequences: Option<usize>,
    #[arg(long, default_value_t = 8, value_parser = crate::positive)]
    pub batch_size: usize,
    /// Prompts, one a line: both models answer greedily and the answers are compared.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    #[command(flatten)]
    pub format: PromptFormatArgs,
    /// Longest answer in the generation check.
    #[arg(long, default_value_t = 96, value_parser = crate::positive)]
    pub max_new_tokens: usize,
    /// Print each prompt with both answers.
    #[arg(long)]
    pub show_answers: bool,
    #[command(flatten)]
    pub report: ReportArgs,
}

pub fn eval_fidelity_cmd(backend: BackendKind, args: EvalFidelityArgs) -> Result<()> {
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
    #[arg(long, default_value_t = 1, value_parser = crate::positive)]
    pub samples_per_prompt: usize,
    #[arg(long, default_value_t = 256, value_parser = crate::positive)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0.9)]
    pub top_p: f32,
    /// With --batch-size, fixes every draw: the same seed writes the same file.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 8, value_parser = crate::positive)]
    pub batch_size: usize,
    #[command(flatten)]
    pub report: ReportArgs,
}

pub fn self_data_cmd(backend: BackendKind, args: SelfDataArgs) -> Result<()> {
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
