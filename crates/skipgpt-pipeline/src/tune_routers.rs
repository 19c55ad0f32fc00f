//! Stage 1: routers trained on a frozen model towards a target skip rate (hard Gumbel gates,
//! straight-through, loss = LM + α·|T − skip|); the joint ablation trains LoRA with them.

use std::path::PathBuf;

use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};
use skipgpt_eval::PerplexityReport;
use skipgpt_model::{
    Granularity, KvPolicy, LoraConfig, MlpRouterInput, RouterInit, RouterVariant, Routing,
    RoutingConfig, SparsityUnit,
};
use skipgpt_train::loss::SparsityLossConfig;
use skipgpt_train::{fit, Objective, ScheduleKind, TrainOptions};

use crate::corpus::{first_sequences, CorpusConfig};
use crate::evaluate::perplexity;
use crate::output::{start_training_from, write_adapted, write_skipgpt_dir, AdaptedOutput};
use crate::{describe_run, first_device, PipelineError, Result};

const STAGE: &str = "tune-routers";

/// Warmup as a fraction of the steps, when a caller sets the steps but not the warmup.
pub const WARMUP_FRACTION: f64 = 0.0;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TuneRoutersConfig {
    /// The model to prune: a Hugging Face directory with tokenizer.json.
    pub model: PathBuf,
    /// Output: a SkipGPT model directory (the model's files, routers.safetensors,
    /// skipgpt.json) plus `train/`, the run's state.
    pub out: PathBuf,
    pub corpus: CorpusConfig,
    /// Target fraction T to skip, counted in `sparsity_unit`.
    pub target_sparsity: f64,
    pub sparsity_unit: SparsityUnit,
    /// Weight α of the sparsity term |T - skip_rate| (the paper: 8).
    pub alpha: f64,
    /// Separate attention and MLP targets (both or neither).
    pub attn_target: Option<f64>,
    pub mlp_target: Option<f64>,
    pub router: RouterVariant,
    pub router_init: RouterInit,
    pub mlp_router_input: MlpRouterInput,
    pub granularity: Granularity,
    pub kv_policy: KvPolicy,
    /// The joint variant (an ablation): these adapters train together with the routers, and
    /// the output holds the merged model and the adapter under `adapter/`.
    pub joint_lora: Option<LoraConfig>,
    /// The optimisation; `train.temperature` is the Gumbel temperature at the first and
    /// last step (annealed linearly).
    pub train: TrainOptions,
    /// Continue the run in `out` from its last checkpoint.
    pub resume: bool,
}

impl Default for TuneRoutersConfig {
    /// The paper's stage 1 (linear routers, α 8, T 0.25, τ 5 → 1, lr 2e-3 constant), counted
    /// in parameters and started execute-biased, which a real model needs.
    fn default() -> Self {
        TuneRoutersConfig {
            model: PathBuf::new(),
            out: PathBuf::from("skipgpt"),
            corpus: CorpusConfig::default(),
            target_sparsity: 0.25,
            sparsity_unit: SparsityUnit::Params,
            alpha: 8.0,
            attn_target: None,
            mlp_target: None,
            router: RouterVariant::Linear,
            router_init: RouterInit::EXECUTE,
            mlp_router_input: MlpRouterInput::PostAttn,
            granularity: Granularity::Module,
            kv_policy: KvPolicy::Keep,
            joint_lora: None,
            train: TrainOptions {
                temperature: (5.0, 1.0),
                ..TrainOptions::stage(2e-3, ScheduleKind::Constant, 200, WARMUP_FRACTION)
            },
            resume: false,
        }
    }
}

impl TuneRoutersConfig {
    /// The routing the new routers get (written to `skipgpt.json`).
    pub fn routing_config(&self) -> RoutingConfig {
        RoutingConfig::new()
            .with_target_unit(self.sparsity_unit)
            .with_router(self.router)
            .with_mlp_router_input(self.mlp_router_input)
            .with_granularity(self.granularity)
            .with_kv_policy(self.kv_policy)
            .with_target_sparsity(self.target_sparsity)
    }
}

/// Validation perplexity of a tuned model: dense and with its deterministic routing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TunedValidation {
    pub dense: PerplexityReport,
    pub routed: PerplexityReport,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TuneRoutersReport {
    pub out: PathBuf,
    /// Routers trained, and their parameters.
    pub routers: usize,
    pub router_params: usize,
    /// None when the held-out split is empty.
    pub validation: Option<TunedValidation>,
}

/// Tunes routers on a frozen model (stage 1) on `devices` and writes a SkipGPT directory.
pub fn tune_routers<B: Backend>(
    config: &TuneRoutersConfig,
    devices: &[B::Device],
) -> Result<TuneRoutersReport> {
    let device = first_device::<B>(devices)?;
    let quiet = config.train.quiet;
    if let RouterInit::Execute { margin } = config.router_init {
        if !(margin.is_finite() && margin >= 0.0) {
            return Err(PipelineError::InvalidSetting {
                name: "init_margin",
                value: margin.to_string(),
                expected: "a finite number >= 0",
            });
        }
    }
    let (run, mut model, tokenizer) =
        start_training_from::<B>(&config.model, &config.out, config.resume, STAGE, device)?;
    if model.routing_config.is_some() && !quiet {
        eprintln!(
            "{STAGE}: {} has routers; training new ones",
            config.model.display()
        );
    }
    let loss = SparsityLossConfig::new()
        .with_alpha(config.alpha)
        .with_target(config.target_sparsity)
        .with_attn_target(config.attn_target)
        .with_mlp_target(config.mlp_target)
        .with_attn_share(config.sparsity_unit.attn_share(&model.config));
    loss.validate()?;
    if let Some(lora) = &config.joint_lora {
        lora.validate()?;
    }
    let opts = &config.train;
    let (train, valid) = config.corpus.load_split(&tokenizer, &model.config)?;
    let valid = first_sequences(valid, opts.valid_sequences);
    Autodiff::<B>::seed(device, opts.seed);
    model = model
        .with_new_routers_from(config.routing_config(), config.router_init)
        .freeze_base();
    if let Some(lora) = &config.joint_lora {
        model = model.with_lora(lora.clone())?;
    }
    let routers = model
        .model
        .layers
        .iter()
        .flat_map(|l| [&l.attn_router, &l.mlp_router])
        .flatten()
        .count();
    let router_params = model.router_params();
    if !quiet && model.lora_config.is_some() {
        eprintln!(
            "{STAGE}: joint variant: {} LoRA parameters train with the routers",
            model.lora_params()
        );
    }
    if !quiet {
        let base = model.config.num_params();
        eprintln!(
            "{STAGE}: {routers} routers ({router_params} parameters, {:.4}% of {base}), target skip {} of {}, {}",
            100.0 * router_params as f64 / base as f64,
            config.target_sparsity,
            match config.sparsity_unit {
                SparsityUnit::Params => "parameters",
                SparsityUnit::Modules => "module decisions",
            },
            describe_run(&train, &valid, opts, devices.len())
        );
    }
    let tuned = fit(
        model,
        Objective::Sparsity(loss),
        train,
        valid.clone(),
        opts,
        &run,
        devices,
    )?;
    if tuned.lora_config.is_some() {
        // the joint variant changed the base's function: write it merged
        write_adapted(
            &tuned,
            &tokenizer,
            &config.model,
            &config.out,
            AdaptedOutput::Both,
        )?;
    } else {
        write_skipgpt_dir(&config.model, &tuned, &config.out)?;
    }
    let validation = if valid.is_empty() {
        None
    } else {
        let batch = opts.batch_size;
        let label = |name| (!quiet).then_some(name);
        Some(TunedValidation {
            dense: perplexity(&tuned, &valid, Routing::Dense, batch, label("dense"))?,
            routed: perplexity(
                &tuned,
                &valid,
                Routing::Deterministic,
                batch,
                label("routed"),
            )?,
        })
    };
    Ok(TuneRoutersReport {
        out: config.out.clone(),
        routers,
        router_params,
        validation,
    })
}
