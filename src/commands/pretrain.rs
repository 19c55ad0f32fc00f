//! `skipgpt pretrain`: a small LLaMA from scratch on a corpus (the demo's base model).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use skipgpt_eval::PerplexityReport;
use skipgpt_pipeline::pretrain;
use skipgpt_pipeline::{PretrainConfig, PretrainReport};

use crate::args::{CorpusArgs, ReportArgs, TrainArgs};
use crate::backend::BackendKind;

#[derive(Args, Debug, Clone)]
pub struct PretrainArgs {
    /// Output directory: a Hugging Face model directory (plus `train/`, the run's state).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub corpus: CorpusArgs,
    /// tokenizer.json to use; without it a byte-level BPE is trained on the corpus.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Vocabulary size of the BPE trained when no --tokenizer is given.
    #[arg(long, default_value_t = 512, value_parser = crate::args::positive)]
    pub vocab_size: usize,
    /// A HF config.json to take the architecture from (vocab_size follows the tokenizer).
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long, default_value_t = 128, value_parser = crate::args::positive)]
    pub hidden_size: usize,
    #[arg(long, default_value_t = 4, value_parser = crate::args::positive)]
    pub layers: usize,
    #[arg(long, default_value_t = 4, value_parser = crate::args::positive)]
    pub heads: usize,
    #[arg(long, default_value_t = 2, value_parser = crate::args::positive)]
    pub kv_heads: usize,
    /// Width of the MLP [about 8/3 of --hidden-size, as LLaMA].
    #[arg(long, value_parser = crate::args::positive)]
    pub intermediate_size: Option<usize>,
    #[command(flatten)]
    pub train: TrainArgs,
    #[command(flatten)]
    pub report: ReportArgs,
}

impl PretrainArgs {
    pub fn config(&self) -> PretrainConfig {
        let defaults = PretrainConfig::default();
        PretrainConfig {
            out: self.out.clone(),
            corpus: self.corpus.config(),
            tokenizer: self.tokenizer.clone(),
            vocab_size: self.vocab_size,
            architecture: self.config.clone(),
            hidden_size: self.hidden_size,
            layers: self.layers,
            heads: self.heads,
            kv_heads: self.kv_heads,
            intermediate_size: self.intermediate_size,
            train: self
                .train
                .options(defaults.train, pretrain::WARMUP_FRACTION),
            resume: self.train.resume,
        }
    }
}

pub fn run(backend: BackendKind, args: PretrainArgs) -> Result<()> {
    let config = args.config();
    crate::train_and_show!(
        backend,
        args,
        skipgpt_pipeline::pretrain,
        &config,
        print_pretrained
    )
}

/// Where the model went, and its held-out perplexity.
pub(crate) fn print_pretrained(report: &PretrainReport) {
    println!("pretrain: saved to {}", report.out.display());
    if let Some(r) = &report.validation {
        println!(
            "  validation perplexity {:.3} ({} tokens)",
            r.perplexity, r.tokens
        );
    }
}

/// `{stage}: saved to {out}`, then the held-out perplexity of each of the two models compared.
pub(crate) fn print_saved(
    stage: &str,
    out: &std::path::Path,
    validation: Option<[(&str, &PerplexityReport); 2]>,
) {
    println!("{stage}: saved to {}", out.display());
    for (name, r) in validation.into_iter().flatten() {
        print_validation(name, r);
    }
}

/// `  {name} validation perplexity ...  skip: ...` after a training command.
fn print_validation(name: &str, r: &PerplexityReport) {
    println!(
        "  {name:<7} validation perplexity {:>8.3}  skip: attention {:>5.1}%  mlp {:>5.1}%  params {:>5.1}%",
        r.perplexity,
        100.0 * r.attn_skip,
        100.0 * r.mlp_skip,
        100.0 * r.param_skip
    );
}
