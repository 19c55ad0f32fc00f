//! `skipgpt finetune-lora`: stage 2, LoRA on a routed model with its routers frozen (or the joint
//! ablation).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use skipgpt_model::Routing;
use skipgpt_pipeline::{finetune_lora, AdaptedOutput, FinetuneLoraConfig, FinetuneLoraReport};
use skipgpt_train::TrainOptions;

use crate::args::RoutingArg;
use crate::args::{CorpusArgs, DistillArgs, LoraArgs, ReportArgs, TrainArgs};
use crate::backend::BackendKind;
use crate::commands::pretrain::print_saved;

#[derive(Args, Debug, Clone)]
pub struct FinetuneLoraArgs {
    /// The model to adapt: a SkipGPT directory (its routers stay frozen) or a plain HF
    /// directory (dense + LoRA), with tokenizer.json.
    #[arg(long)]
    pub model: PathBuf,
    /// Output directory. By default: the merged model (a self-contained SkipGPT or HF
    /// directory) plus the adapter in PEFT layout under `adapter/`; and `train/`, the run.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub corpus: CorpusArgs,
    #[command(flatten)]
    pub lora: LoraArgs,
    /// How the frozen routers decide while training: `deterministic` (as served) or
    /// `sample` (each decision drawn from the router's softmax, seeded by --seed).
    #[arg(long, value_enum, default_value = "deterministic")]
    pub routing: RoutingArg,
    /// Write only the merged model.
    #[arg(long, conflicts_with = "adapter_only")]
    pub merge: bool,
    /// Write only the adapter, in the PEFT layout (`adapter_config.json`,
    /// `adapter_model.safetensors`), directly in --out.
    #[arg(long)]
    pub adapter_only: bool,
    /// Start from this PEFT adapter directory instead of fresh adapters; its rank, α, dropout
    /// and targets replace --rank, --lora-alpha, --lora-dropout and --targets.
    #[arg(long)]
    pub resume_adapter: Option<PathBuf>,
    #[command(flatten)]
    pub train: TrainArgs,
    #[command(flatten)]
    pub distill: DistillArgs,
    #[command(flatten)]
    pub report: ReportArgs,
}

impl FinetuneLoraArgs {
    pub fn config(&self) -> Result<FinetuneLoraConfig> {
        let defaults = FinetuneLoraConfig::default();
        Ok(FinetuneLoraConfig {
            model: self.model.clone(),
            out: self.out.clone(),
            corpus: self.corpus.config(),
            // an adapter to resume brings its own shape
            lora: match self.resume_adapter {
                Some(_) => defaults.lora,
                None => self.lora.config()?,
            },
            routing: match self.routing {
                RoutingArg::Deterministic => Routing::Deterministic,
                RoutingArg::Sample => Routing::Sample,
            },
            output: match (self.merge, self.adapter_only) {
                (true, _) => AdaptedOutput::Merged,
                (false, true) => AdaptedOutput::AdapterOnly,
                (false, false) => AdaptedOutput::Both,
            },
            resume_adapter: self.resume_adapter.clone(),
            train: TrainOptions {
                distill: self.distill.config(),
                ..self
                    .train
                    .options(defaults.train, finetune_lora::WARMUP_FRACTION)
            },
            resume: self.train.resume,
        })
    }
}

pub fn run(backend: BackendKind, args: FinetuneLoraArgs) -> Result<()> {
    let config = args.config()?;
    crate::train_and_show!(
        backend,
        args,
        skipgpt_pipeline::finetune_lora,
        &config,
        print_adapted
    )
}

/// Where the adapted model went, and the held-out perplexity before and after.
pub(crate) fn print_adapted(report: &FinetuneLoraReport) {
    let v = report.validation.as_ref();
    let pair = v.map(|v| [("before", &v.before), ("after", &v.after)]);
    print_saved("finetune-lora", &report.out, pair);
}
