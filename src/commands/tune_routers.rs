//! `skipgpt tune-routers`: stage 1, the routers trained on a frozen model towards a target skip
//! rate.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, ValueEnum};
use skipgpt_model::{
    Granularity, KvPolicy, MlpRouterInput, RouterInit, RouterVariant, SparsityUnit,
};
use skipgpt_pipeline::tune_routers;
use skipgpt_pipeline::{TuneRoutersConfig, TuneRoutersReport};

use crate::args::{CorpusArgs, DistillArgs, LoraArgs, ReportArgs, TrainArgs};
use crate::backend::BackendKind;
use crate::commands::pretrain::print_saved;

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouterInitArg {
    /// Kaiming-uniform weights, zero bias (the paper's code): about half the modules skipped
    /// at random at the first step.
    Paper,
    /// Start from the dense model: zero output weights and a bias towards EXECUTE of
    /// --init-margin logits; the sparsity loss raises skipping from there.
    Execute,
}

#[derive(Args, Debug, Clone)]
pub struct TuneRoutersArgs {
    /// The model to train routers for (its weights stay frozen): a Hugging Face directory
    /// with tokenizer.json.
    #[arg(long)]
    pub model: PathBuf,
    /// Output directory: a SkipGPT model directory (the model's files, routers.safetensors,
    /// skipgpt.json) plus `train/`, the run's state.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub corpus: CorpusArgs,
    /// Target fraction T to skip, counted in --sparsity-unit.
    #[arg(long, default_value_t = 0.25)]
    pub target_sparsity: f64,
    /// What the target counts. `params` is the default because it is the number a user budgets
    /// and the paper reports; counting modules equally (the reference code) lands below the
    /// target in parameters, since MLPs are larger and skipped less (SmolLM2-135M at 25%: 21.6%
    /// of parameters).
    #[arg(long, value_enum, default_value = "params")]
    pub sparsity_unit: SparsityUnit,
    /// Weight α of the sparsity term |T - skip_rate| (the paper: 8).
    #[arg(long, default_value_t = 8.0)]
    pub alpha: f64,
    /// Separate attention target (needs --mlp-target).
    #[arg(long, requires = "mlp_target")]
    pub attn_target: Option<f64>,
    /// Separate MLP target (needs --attn-target).
    #[arg(long, requires = "attn_target")]
    pub mlp_target: Option<f64>,
    #[arg(long, value_enum, default_value = "linear")]
    pub router: RouterVariant,
    /// How new routers start. `execute` is the default because on a real model the paper's
    /// random start skips modules at random and perplexity explodes (SmolLM2-135M, 60 steps
    /// at 25%: validation perplexity 3517 from `paper` against 40.2 from `execute`; see
    /// docs/results-smollm2.md).
    #[arg(long, value_enum, default_value = "execute")]
    pub router_init: RouterInitArg,
    /// With `--router-init execute`: logits by which EXECUTE leads at the start (3: every
    /// module runs with probability 0.95).
    #[arg(long, default_value_t = 3.0)]
    pub init_margin: f64,
    #[arg(long, value_enum, default_value = "post-attn")]
    pub mlp_router_input: MlpRouterInput,
    #[arg(long, value_enum, default_value = "module")]
    pub granularity: Granularity,
    #[arg(long, value_enum, default_value = "keep")]
    pub kv_policy: KvPolicy,
    /// Gumbel temperature at the first step (annealed linearly).
    #[arg(long, default_value_t = 5.0)]
    pub temperature_start: f64,
    /// Gumbel temperature at the last step.
    #[arg(long, default_value_t = 1.0)]
    pub temperature_end: f64,
    /// The joint variant (an ablation): train LoRA adapters (shaped by --rank, --lora-alpha,
    /// --lora-dropout, --targets) together with the routers, at --lr. The output holds the
    /// merged model and the adapter under `adapter/`.
    #[arg(long)]
    pub joint_lora: bool,
    #[command(flatten)]
    pub lora: LoraArgs,
    #[command(flatten)]
    pub train: TrainArgs,
    #[command(flatten)]
    pub distill: DistillArgs,
    #[command(flatten)]
    pub report: ReportArgs,
}

impl TuneRoutersArgs {
    pub fn config(&self) -> Result<TuneRoutersConfig> {
        let defaults = TuneRoutersConfig::default();
        let mut train = self
            .train
            .options(defaults.train.clone(), tune_routers::WARMUP_FRACTION);
        train.temperature = (self.temperature_start, self.temperature_end);
        train.distill = self.distill.config();
        Ok(TuneRoutersConfig {
            model: self.model.clone(),
            out: self.out.clone(),
            corpus: self.corpus.config(),
            target_sparsity: self.target_sparsity,
            sparsity_unit: self.sparsity_unit,
            alpha: self.alpha,
            attn_target: self.attn_target,
            mlp_target: self.mlp_target,
            router: self.router,
            router_init: match self.router_init {
                RouterInitArg::Paper => RouterInit::Paper,
                RouterInitArg::Execute => RouterInit::Execute {
                    margin: self.init_margin,
                },
            },
            mlp_router_input: self.mlp_router_input,
            granularity: self.granularity,
            kv_policy: self.kv_policy,
            joint_lora: self.joint_lora.then(|| self.lora.config()).transpose()?,
            train,
            resume: self.train.resume,
        })
    }
}

pub fn run(backend: BackendKind, args: TuneRoutersArgs) -> Result<()> {
    let config = args.config()?;
    crate::train_and_show!(
        backend,
        args,
        skipgpt_pipeline::tune_routers,
        &config,
        print_tuned
    )
}

/// Where the routers went, and the held-out perplexity dense and routed.
pub(crate) fn print_tuned(report: &TuneRoutersReport) {
    let v = report.validation.as_ref();
    print_saved(
        "tune-routers",
        &report.out,
        v.map(|v| [("dense", &v.dense), ("routed", &v.routed)]),
    );
}
