//! `skipgpt`: SkipGPT dynamic layer pruning for LLaMA-family checkpoints.
//!
//! The binary is a thin edge: it parses arguments, picks a backend and calls into the crates.
//! Errors from the libraries are typed; here they become messages and a non-zero exit. Each
//! subcommand lives in its own file under `commands/` (its arguments, its run, its printing);
//! argument groups several commands share are in `args`; the demo is `demo/`.

mod args;
mod backend;
mod commands;
mod demo;
mod memory;
mod serve;
mod threads;

use clap::{Parser, Subcommand};
use commands::{
    analyze, bench, calibrate_routers, chat, eval_fidelity, eval_mc, eval_ppl, finetune_lora,
    generate, import_gguf, inspect, logits, perplexity, pretrain, prune_static, quantize,
    self_data, tokenize, tune_routers,
};

use crate::backend::BackendKind;

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
    Demo(demo::DemoArgs),
    /// Train a dense LLaMA from a small config on a corpus and save it in the HF layout.
    Pretrain(pretrain::PretrainArgs),
    /// Stage 1: train SkipGPT routers on a frozen model towards a target skip rate.
    TuneRouters(tune_routers::TuneRoutersArgs),
    /// Stage 2: LoRA fine-tuning with frozen routers (or dense + LoRA on a model without
    /// routers); writes the merged model and/or the adapter in PEFT layout.
    FinetuneLora(finetune_lora::FinetuneLoraArgs),
    /// Run a forward pass over token ids from a safetensors file and write the logits.
    Logits(logits::LogitsArgs),
    /// Continue a prompt (greedy by default) using the KV cache.
    Generate(generate::GenerateArgs),
    /// Convert a llama.cpp GGUF file (LLaMA architecture, quantized or not) into a HF model
    /// directory that every command loads.
    ImportGguf(import_gguf::ImportGgufArgs),
    /// An OpenAI-compatible server (chat and text completions, streaming, continuous
    /// batching, per-request compute budgets with the `skip` field).
    Serve(serve::ServeArgs),
    /// Chat with a model in the terminal under its chat template (/reset, /skip 0.3, /quit;
    /// Ctrl-C stops an answer).
    Chat(chat::ChatArgs),
    /// Prefill and decode speed, skip rates and peak memory of a model, as `llama-bench`
    /// measures them (a table, or --json).
    Bench(bench::BenchArgs),
    /// Write a GGUF with its matrices quantized (Q8_0, Q6_K, Q5_K_M, Q5_0, Q5_1, Q4_K_M, Q4_0,
    /// Q4_1) or in F16/F32, byte for byte as llama-quantize writes them, tokenizer and chat
    /// template carried over.
    Quantize(quantize::QuantizeArgs),
    /// Print the token ids of a text (no special tokens added).
    Tokenize(tokenize::TokenizeArgs),
    /// Describe a model directory: architecture, parameter count, dtype, context length.
    Inspect(inspect::InspectArgs),
    /// Perplexity on a corpus, dense and routed, with the realised skip rates.
    EvalPpl(eval_ppl::EvalPplArgs),
    /// Perplexity of one text file as llama.cpp's `llama-perplexity` scores it (chunks of
    /// --ctx, the second half of each), to compare a GGUF here and there.
    Perplexity(perplexity::PerplexityArgs),
    /// ShortGPT-style static pruning (Block Influence), written as a SkipGPT directory with
    /// constant routers: the static baseline.
    PruneStatic(prune_static::PruneStaticArgs),
    /// Shift trained routers' SKIP biases so that deterministic routing realises the skip
    /// target on calibration text (stage 1 trains with noisy gates, which skip a little more).
    CalibrateRouters(calibrate_routers::CalibrateRoutersArgs),
    /// Where the routers spend compute: per layer, by position, by token frequency, and a
    /// per-token heatmap; JSON plus SVG pictures.
    Analyze(analyze::AnalyzeArgs),
    /// Zero-shot multiple-choice accuracy (lm-evaluation-harness style), dense and routed.
    EvalMc(eval_mc::EvalMcArgs),
    /// How closely a routed model behaves like its dense original on text and prompts nobody
    /// trained it on: KL to dense, top-1 agreement, perplexity ratio, greedy answers compared.
    EvalFidelity(eval_fidelity::EvalFidelityArgs),
    /// Sample the dense model's own answers to prompts (in its chat format) into a JSONL
    /// corpus: training data that keeps a routed model close to itself.
    SelfData(self_data::SelfDataArgs),
}

fn main() {
    // Rust ignores SIGPIPE, so printing into a closed pipe (`skipgpt inspect ... | head`)
    // would panic; with the default action the process ends quietly, as Unix tools do.
    #[cfg(unix)]
    // SAFETY: called before any other thread exists; restores the default disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    memory::use_one_heap();
    let cli = Cli::parse();
    let backend = cli.backend.unwrap_or_else(BackendKind::best_available);
    if let Err(err) = threads::set_threads(cli.threads) {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
    let result = match cli.command {
        Command::Demo(args) => demo::run(backend, args),
        Command::Pretrain(args) => pretrain::run(backend, args),
        Command::TuneRouters(args) => tune_routers::run(backend, args),
        Command::FinetuneLora(args) => finetune_lora::run(backend, args),
        Command::Logits(args) => logits::run(backend, args),
        Command::Generate(args) => generate::run(backend, args),
        Command::Inspect(args) => inspect::run(args),
        Command::ImportGguf(args) => import_gguf::run(args),
        Command::Quantize(args) => quantize::run(args),
        Command::Bench(args) => bench::run(backend, args),
        Command::Serve(args) => serve::run(backend, args),
        Command::Chat(args) => chat::run(backend, args),
        Command::Tokenize(args) => tokenize::run(args),
        Command::EvalPpl(args) => eval_ppl::run(backend, args),
        Command::Perplexity(args) => perplexity::run(backend, args),
        Command::EvalMc(args) => eval_mc::run(backend, args),
        Command::Analyze(args) => analyze::run(backend, args),
        Command::PruneStatic(args) => prune_static::run(backend, args),
        Command::CalibrateRouters(args) => calibrate_routers::run(backend, args),
        Command::EvalFidelity(args) => eval_fidelity::run(backend, args),
        Command::SelfData(args) => self_data::run(backend, args),
    };
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
