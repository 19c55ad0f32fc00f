//! `skipgpt finetune-lora` (stage 2: LoRA with frozen routers, or dense + LoRA on a model
//! without routers) and the output shared with `tune-routers --joint-lora`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use burn::backend::Autodiff;
use burn::module::{AutodiffModule, Module};
use burn::tensor::backend::Backend;
use clap::Args;
use skipgpt_eval::PerplexityReport;
use skipgpt_model::lora::LORA_TARGETS;
use skipgpt_model::{
    load_peft_adapter, save_peft_adapter, save_pretrained, LlamaForCausalLM, LoraConfig, Routing,
    StoreDtype, Tokenizer,
};
use skipgpt_train::{fit, Objective, ScheduleKind};

use crate::backend::BackendKind;
use crate::commands::perplexity;
use crate::train_cmd::{print_validation, start_training_from, CorpusArgs, Defaults, TrainArgs};
use crate::{with_backend, RoutingArg};

/// The adapters' shape: where they go, their rank, scale and dropout.
#[derive(Args, Debug, Clone)]
pub struct LoraArgs {
    /// Rank r of each adapter.
    #[arg(long, default_value_t = 16, value_parser = crate::positive)]
    pub rank: usize,
    /// α: updates are scaled by α / r.
    #[arg(long, default_value_t = 32.0)]
    pub lora_alpha: f64,
    /// Dropout on the adapters' input while training.
    #[arg(long, default_value_t = 0.1)]
    pub lora_dropout: f64,
    /// Projections that get an adapter: any of q_proj, k_proj, v_proj, o_proj, gate_proj,
    /// up_proj, down_proj (or q, k, v, o, gate, up, down).
    #[arg(long, value_delimiter = ',', default_value = "q_proj,v_proj,gate_proj")]
    pub targets: Vec<String>,
}

impl LoraArgs {
    pub fn config(&self) -> Result<LoraConfig> {
        let targets = self
            .targets
            .iter()
            .map(|t| {
                let t = t.trim();
                let long = format!("{t}_proj");
                if LORA_TARGETS.contains(&long.as_str()) {
                    long
                } else {
                    t.to_string()
                }
            })
            .collect();
        let cfg = LoraConfig {
            rank: self.rank,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            targets,
        };
        cfg.validate()
            .context("--rank/--lora-alpha/--lora-dropout/--targets")?;
        Ok(cfg)
    }
}

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
}

pub fn finetune_lora_cmd(backend: BackendKind, args: FinetuneLoraArgs) -> Result<()> {
    with_backend!(backend, |B, device| finetune_lora::<B>(&args, &device)
        .map(drop))
}

/// Stage 2: trains LoRA adapters on a frozen model (routers included) with the LM loss only,
/// then writes the merged model and/or the adapter. Returns the validation report after
/// training, with the model's routing (none when the validation split is empty).
pub fn finetune_lora<B: Backend>(
    args: &FinetuneLoraArgs,
    device: &B::Device,
) -> Result<Option<PerplexityReport>> {
    let label = "finetune-lora";
    let devices = crate::backend::training_devices::<Autodiff<B>>(&args.train.devices, device)?;
    let adapter = args
        .resume_adapter
        .as_deref()
        .map(load_peft_adapter)
        .transpose()?;
    let cfg = match &adapter {
        Some(a) => a.config.clone(),
        None => args.lora.config()?,
    };
    let (run, mut model, tokenizer) =
        start_training_from::<B>(&args.model, &args.out, &args.train, label, device)?;
    if model.routing_config.is_some() {
        model.routing = match args.routing {
            RoutingArg::Deterministic => Routing::Deterministic,
            RoutingArg::Sample => Routing::Sample,
        };
    }
    let opts = args.train.options(Defaults {
        steps: 200,
        lr: 2e-4,
        warmup_fraction: 0.03,
        schedule: ScheduleKind::Cosine,
    });
    let (train, valid) = args.corpus.load_split(&tokenizer, &model.config)?;
    let valid = args.train.validation_slice(valid);

    Autodiff::<B>::seed(device, args.train.seed);
    // everything frozen, routers included; then the adapters, which train
    model = model.no_grad();
    model = match &adapter {
        Some(a) => model.load_lora(a)?,
        None => model.with_lora(cfg.clone())?,
    };
    let routing = model.routing;
    if !args.train.quiet {
        let base = model.config.num_params();
        eprintln!(
            "{label}: LoRA r {} α {} dropout {} on {} ({} parameters, {:.3}% of {base}); {}; {} train / {} valid sequences of {} tokens, {} steps of {} sequences",
            cfg.rank,
            cfg.alpha,
            cfg.dropout,
            cfg.targets.join(","),
            model.lora_params(),
            100.0 * model.lora_params() as f64 / base as f64,
            match routing {
                Routing::Dense => "no routers (dense + LoRA)".to_string(),
                r => format!("frozen routers, {r:?} gates"),
            },
            train.len(),
            valid.len(),
            train.seq_len,
            opts.steps,
            opts.batch_size * opts.grad_accum * devices.len()
        );
    }
    let batch = args.train.batch_size;
    let before = (!valid.is_empty())
        .then(|| perplexity(&model.valid(), &valid, routing, batch, Some("before")))
        .transpose()?;
    let tuned = fit(
        model,
        Objective::Lm,
        train,
        valid.clone(),
        &opts,
        &run,
        &devices,
    )?;
    write_adapted(
        &tuned,
        &tokenizer,
        &args.model,
        &args.out,
        Output::from_flags(args.merge, args.adapter_only),
    )?;
    println!("{label}: saved to {}", args.out.display());
    let Some(before) = before else {
        return Ok(None);
    };
    let after = perplexity(&tuned, &valid, routing, batch, Some("after"))?;
    print_validation("before", &before);
    print_validation("after", &after);
    Ok(Some(after))
}

/// What a run with adapters writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// The merged model in `out`, the adapter in `out/adapter`.
    Both,
    Merged,
    AdapterOnly,
}

impl Output {
    pub fn from_flags(merge: bool, adapter_only: bool) -> Self {
        match (merge, adapter_only) {
            (true, _) => Output::Merged,
            (false, true) => Output::AdapterOnly,
            (false, false) => Output::Both,
        }
    }
}

/// Writes a model that carries adapters: merged into a self-contained model directory
/// (routers and `skipgpt.json` included when it has them) and/or the adapter alone in PEFT
/// layout. The adapter never shares a directory with full weights: transformers would load
/// it on top of its base model a second time.
pub fn write_adapted<B: Backend>(
    model: &LlamaForCausalLM<B>,
    tokenizer: &Tokenizer,
    base: &Path,
    out: &Path,
    output: Output,
) -> Result<()> {
    let cfg = model
        .lora_config
        .clone()
        .context("the model carries no adapters")?;
    if output != Output::Merged {
        let dir = match output {
            Output::AdapterOnly => out.to_path_buf(),
            _ => out.join("adapter"),
        };
        let base = base.canonicalize().unwrap_or_else(|_| base.to_path_buf());
        save_peft_adapter(
            &dir,
            &cfg,
            &model.export_lora(),
            &base.display().to_string(),
        )?;
    }
    if output != Output::AdapterOnly {
        let merged = model.clone().merge_lora();
        save_pretrained(&merged, Some(tokenizer), out, StoreDtype::F32)?;
    }
    Ok(())
}
