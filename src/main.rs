//! `skipgpt`: SkipGPT dynamic layer pruning for LLaMA-family checkpoints.
//!
//! The binary is a thin edge: it parses arguments, picks a backend and calls into the crates.
//! Errors from the libraries are typed; here they become messages and a non-zero exit.

mod backend;
mod commands;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use backend::BackendKind;

#[derive(Parser, Debug)]
#[command(
    name = "skipgpt",
    version,
    about = "SkipGPT dynamic layer pruning for LLaMA-family models on Burn"
)]
struct Cli {
    /// Compute backend (only those compiled in with cargo features are available).
    #[arg(long, global = true, value_enum, env = "SKIPGPT_BACKEND")]
    backend: Option<BackendKind>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Build a tiny model, save it in the Hugging Face layout, reload it and generate (CPU, no downloads).
    Demo(DemoArgs),
    /// Run a forward pass over token ids from a safetensors file and write the logits.
    Logits(LogitsArgs),
    /// Continue a prompt (greedy by default) using the KV cache.
    Generate(GenerateArgs),
    /// Describe a model directory: architecture, parameter count, dtype, context length.
    Inspect(InspectArgs),
    /// Perplexity on a corpus, dense and routed, with the realised skip rates.
    EvalPpl(EvalPplArgs),
}

#[derive(Args, Debug)]
pub struct EvalPplArgs {
    /// Model directory (HF layout, optionally with routers).
    #[arg(long)]
    pub model: PathBuf,
    /// Text (.txt, paragraphs) or JSONL (a `text` field per line) files; repeatable.
    #[arg(long, required_unless_present = "synthetic")]
    pub data: Vec<PathBuf>,
    /// Use N documents of the built-in synthetic corpus instead of files.
    #[arg(long, conflicts_with = "data")]
    pub synthetic: Option<usize>,
    /// Seed of the synthetic corpus and of the train/validation split.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 128)]
    pub seq_len: usize,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Fraction of sequences held out for validation (the split training uses).
    #[arg(long, default_value_t = 0.1)]
    pub valid_fraction: f64,
    /// Which sequences to evaluate.
    #[arg(long, value_enum, default_value = "valid")]
    pub split: SplitArg,
    #[command(flatten)]
    pub routing: RoutingArgs,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum SplitArg {
    Valid,
    Train,
    All,
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Where the demo writes its model.
    #[arg(long, default_value = "runs/demo")]
    pub out: PathBuf,
    /// Prompt to continue.
    #[arg(long, default_value = "The quick brown fox")]
    pub prompt: String,
    /// Tokens to generate.
    #[arg(long, default_value_t = 24)]
    pub max_new_tokens: usize,
    /// Seed of the random initialisation.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

/// How a SkipGPT model's routers are used at inference.
#[derive(Args, Debug, Clone)]
pub struct RoutingArgs {
    /// Ignore the routers: run every module (the dense baseline).
    #[arg(long)]
    pub dense: bool,
    /// `deterministic`: execute iff logit0 > logit1; `sample`: draw each decision from the
    /// router's softmax, as the reference code does.
    #[arg(long, value_enum, default_value = "deterministic")]
    pub routing: RoutingArg,
    /// Seed of the routing draws with `--routing sample`.
    #[arg(long, default_value_t = 0)]
    pub routing_seed: u64,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoutingArg {
    Deterministic,
    Sample,
}

#[derive(Args, Debug)]
pub struct LogitsArgs {
    /// Model directory (HF layout).
    #[arg(long)]
    pub model: PathBuf,
    /// safetensors file holding `input_ids`, i64 [batch, seq].
    #[arg(long)]
    pub input: PathBuf,
    /// safetensors file to write `logits`, f32 [batch, seq, vocab], to.
    #[arg(long)]
    pub output: PathBuf,
    /// Also write `hidden_states.{k}` (embeddings, then every layer's output).
    #[arg(long)]
    pub hidden_states: bool,
    #[command(flatten)]
    pub routing: RoutingArgs,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Model directory (HF layout).
    #[arg(long)]
    pub model: PathBuf,
    /// Prompt text (needs tokenizer.json in the model directory).
    #[arg(
        long,
        conflicts_with = "prompt_ids",
        required_unless_present = "prompt_ids"
    )]
    pub prompt: Option<String>,
    /// Prompt as comma-separated token ids, e.g. 1,2,3.
    #[arg(long, value_delimiter = ',')]
    pub prompt_ids: Option<Vec<i64>>,
    /// Maximum number of tokens to generate.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Sample with this temperature instead of decoding greedily.
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Nucleus sampling: keep the smallest set of tokens holding this much probability.
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Seed for sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Keep generating past the end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print `{"tokens": [...], "text": "..."}` instead of the text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub routing: RoutingArgs,
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// Model directory (HF layout).
    #[arg(long)]
    pub model: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn main() {
    let cli = Cli::parse();
    let backend = cli.backend.unwrap_or_else(BackendKind::best_available);
    let result = match cli.command {
        Command::Demo(args) => commands::demo(backend, args),
        Command::Logits(args) => commands::logits(backend, args),
        Command::Generate(args) => commands::generate(backend, args),
        Command::Inspect(args) => commands::inspect(args),
        Command::EvalPpl(args) => commands::eval_ppl(backend, args),
    };
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
