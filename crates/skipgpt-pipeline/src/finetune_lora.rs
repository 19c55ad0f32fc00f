//! Stage 2: LoRA adapters trained with the LM loss on a frozen model whose routers decide as
//! they will when served (or dense + LoRA on a model without routers).

use std::path::PathBuf;

use burn::backend::Autodiff;
use burn::module::{AutodiffModule, Module};
use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};
use skipgpt_eval::PerplexityReport;
use skipgpt_model::{load_peft_adapter, LoraConfig, Routing};
use skipgpt_train::{fit, Objective, ScheduleKind, TrainOptions};

use crate::corpus::{first_sequences, CorpusConfig};
use crate::evaluate::perplexity;
use crate::output::{start_training_from, write_adapted, AdaptedOutput};
use crate::{describe_run, first_device, PipelineError, Result};

const STAGE: &str = "finetune-lora";

/// Warmup as a fraction of the steps, when a caller sets the steps but not the warmup.
pub const WARMUP_FRACTION: f64 = 0.03;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FinetuneLoraConfig {
    /// The model to adapt: a SkipGPT directory (its routers stay frozen) or a plain HF
    /// directory (dense + LoRA), with tokenizer.json.
    pub model: PathBuf,
    /// Output directory (see `output`), plus `train/`, the run.
    pub out: PathBuf,
    pub corpus: CorpusConfig,
    /// The adapters: the paper's r 16, α 32, dropout 0.1 on q, v and gate by default.
    pub lora: LoraConfig,
    /// How the frozen routers decide while training: `Deterministic` (as served) or `Sample`
    /// (each decision drawn from the router's softmax, seeded by `train.seed`).
    pub routing: Routing,
    pub output: AdaptedOutput,
    /// Start from this PEFT adapter directory instead of fresh adapters; its config replaces
    /// `lora`.
    pub resume_adapter: Option<PathBuf>,
    pub train: TrainOptions,
    /// Continue the run in `out` from its last checkpoint.
    pub resume: bool,
}

impl Default for FinetuneLoraConfig {
    fn default() -> Self {
        FinetuneLoraConfig {
            model: PathBuf::new(),
            out: PathBuf::from("skipgpt-lora"),
            corpus: CorpusConfig::default(),
            lora: LoraConfig::default(),
            routing: Routing::Deterministic,
            output: AdaptedOutput::Both,
            resume_adapter: None,
            train: TrainOptions::stage(2e-4, ScheduleKind::Cosine, 200, WARMUP_FRACTION),
            resume: false,
        }
    }
}

/// Held-out perplexity before and after the adapters trained, with the model's routing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraValidation {
    pub before: PerplexityReport,
    pub after: PerplexityReport,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinetuneLoraReport {
    pub out: PathBuf,
    /// The adapters that trained (from `lora` or `resume_adapter`).
    pub lora: LoraConfig,
    pub lora_params: usize,
    /// None when the held-out split is empty.
    pub validation: Option<LoraValidation>,
}

/// Trains LoRA adapters on a frozen model (routers included) on `devices`, then writes the
/// merged model and/or the adapter.
pub fn finetune_lora<B: Backend>(
    config: &FinetuneLoraConfig,
    devices: &[B::Device],
) -> Result<FinetuneLoraReport> {
    let device = first_device::<B>(devices)?;
    let quiet = config.train.quiet;
    if !matches!(config.routing, Routing::Deterministic | Routing::Sample) {
        return Err(PipelineError::InvalidSetting {
            name: "routing",
            value: format!("{:?}", config.routing),
            expected: "deterministic or sample: the routers are frozen",
        });
    }
    let adapter = config
        .resume_adapter
        .as_deref()
        .map(load_peft_adapter)
        .transpose()?;
    let lora = match &adapter {
        Some(a) => a.config.clone(),
        None => config.lora.clone(),
    };
    lora.validate()?;
    let (run, mut model, tokenizer) =
        start_training_from::<B>(&config.model, &config.out, config.resume, STAGE, device)?;
    if model.routing_config.is_some() {
        model.routing = config.routing;
    }
    let opts = &config.train;
    let (train, valid) = config.corpus.load_split(&tokenizer, &model.config)?;
    let valid = first_sequences(valid, opts.valid_sequences);

    Autodiff::<B>::seed(device, opts.seed);
    // everything frozen, routers included; then the adapters, which train
    model = model.no_grad();
    model = match &adapter {
        Some(a) => model.load_lora(a)?,
        None => model.with_lora(lora.clone())?,
    };
    let routing = model.routing;
    let lora_params = model.lora_params();
    if !quiet {
        let base = model.config.num_params();
        eprintln!(
            "{STAGE}: LoRA r {} α {} dropout {} on {} ({lora_params} parameters, {:.3}% of {base}); {}; {}",
            lora.rank,
            lora.alpha,
            lora.dropout,
            lora.targets.join(","),
            100.0 * lora_params as f64 / base as f64,
            match routing {
                Routing::Dense => "no routers (dense + LoRA)".to_string(),
                r => format!("frozen routers, {r:?} gates"),
            },
            describe_run(&train, &valid, opts, devices.len())
        );
    }
    let batch = opts.batch_size;
    let label = |name| (!quiet).then_some(name);
    let before = (!valid.is_empty())
        .then(|| perplexity(&model.valid(), &valid, routing, batch, label("before")))
        .transpose()?;
    let tuned = fit(
        model,
        Objective::Lm,
        train,
        valid.clone(),
        opts,
        &run,
        devices,
    )?;
    write_adapted(
        &tuned,
        &tokenizer,
        &config.model,
        &config.out,
        config.output,
    )?;
    let validation = match before {
        Some(before) => Some(LoraValidation {
            before,
            after: perplexity(&tuned, &valid, routing, batch, label("after"))?,
        }),
        None => None,
    };
    Ok(FinetuneLoraReport {
        out: config.out.clone(),
        lora,
        lora_params,
        validation,
    })
}
