//! The argument groups several commands share: the corpus, the optimisation and the
//! adapters' shape, each mapped onto its `skipgpt_pipeline` / `skipgpt_train` config.

use std::path::PathBuf;

use anyhow::{Context, Result};
use burn::tensor::backend::Backend;
use clap::Args;
use skipgpt_model::lora::LORA_TARGETS;
use skipgpt_model::LoraConfig;
use skipgpt_pipeline::evaluate::ModelSource;
use skipgpt_pipeline::{CorpusConfig, PromptFormat};
use skipgpt_train::loss::{Distillation, TokenObjective};
use skipgpt_train::{ScheduleKind, TrainOptions};

/// Where the text comes from and how it is cut into sequences.
#[derive(Args, Debug, Clone)]
pub struct CorpusArgs {
    /// Text (.txt, paragraphs) or JSONL (a `text` field per line) files; repeatable.
    #[arg(long, required_unless_present = "synthetic")]
    pub data: Vec<PathBuf>,
    /// Use N documents of the built-in synthetic corpus instead of files.
    #[arg(long, conflicts_with = "data", value_parser = crate::args::positive)]
    pub synthetic: Option<usize>,
    /// Seed of the synthetic corpus and of the train/validation split (keep it equal across
    /// pretrain, tune-routers and eval-ppl to evaluate on held-out text).
    #[arg(long, default_value_t = 0)]
    pub data_seed: u64,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 128, value_parser = crate::args::positive)]
    pub seq_len: usize,
    /// Fraction of sequences held out for validation.
    #[arg(long, default_value_t = 0.1)]
    pub valid_fraction: f64,
    /// Held-out files for validation (repeatable): whole documents the model never trains on.
    /// With them, every --data sequence trains and --valid-fraction is not used.
    #[arg(long, conflicts_with = "synthetic")]
    pub valid_data: Vec<PathBuf>,
}

impl CorpusArgs {
    pub fn config(&self) -> CorpusConfig {
        CorpusConfig {
            data: self.data.clone(),
            synthetic: self.synthetic,
            data_seed: self.data_seed,
            seq_len: self.seq_len,
            valid_fraction: self.valid_fraction,
            valid_data: self.valid_data.clone(),
        }
    }
}

/// Optimisation settings shared by the training commands.
#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// Optimizer steps [pretrain: 300; tune-routers: 200].
    #[arg(long, value_parser = crate::args::positive)]
    pub steps: Option<usize>,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 8, value_parser = crate::args::positive)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step (gradients averaged).
    #[arg(long, default_value_t = 1, value_parser = crate::args::positive)]
    pub grad_accum: usize,
    /// Peak learning rate, AdamW [pretrain: 3e-3; tune-routers: 2e-3, the paper's].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Linear warmup steps [pretrain: 5% of the steps; tune-routers: 0].
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    /// Learning rate after warmup [pretrain: cosine; tune-routers: constant, the paper's].
    #[arg(long, value_enum)]
    pub schedule: Option<ScheduleKind>,
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    /// Clip each parameter's gradient to this norm (0 turns clipping off).
    #[arg(long, default_value_t = 1.0)]
    pub grad_clip: f64,
    /// Seeds initialisation, data order and Gumbel noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print the metrics every N optimizer steps.
    #[arg(long, default_value_t = 10)]
    pub log_every: usize,
    /// Validate and checkpoint every N optimizer steps.
    #[arg(long, default_value_t = 50)]
    pub checkpoint_every: usize,
    /// Validation sequences per validation pass (0: all).
    #[arg(long, default_value_t = 64)]
    pub valid_sequences: usize,
    /// Continue the run in --out from its last checkpoint (after a crash or a kill).
    #[arg(long)]
    pub resume: bool,
    /// Print only the final summary.
    #[arg(long)]
    pub quiet: bool,
    /// Data-parallel training on these devices, e.g. `0,1,2,3` (burn-train's multi-device
    /// strategy): every device runs --grad-accum micro-batches of --batch-size per step and
    /// the gradients of all are averaged, so a step sees batch × grad-accum × devices
    /// sequences. One device gives what one gives today. Default: the backend's default device.
    #[arg(long, value_delimiter = ',')]
    pub devices: Vec<usize>,
    /// Gradient checkpointing per decoder layer: the backward pass recomputes one layer at a
    /// time from its saved input, so activation memory is one layer's instead of all layers'
    /// (about a third more compute; same gradients). For long sequences and large models.
    #[arg(long)]
    pub checkpoint_layers: bool,
}

impl TrainArgs {
    /// The stage's `defaults` with what was given on the command line; a stage's warmup
    /// follows its steps (`warmup_fraction` of them) unless --warmup-steps is given.
    pub fn options(&self, defaults: TrainOptions, warmup_fraction: f64) -> TrainOptions {
        let steps = self.steps.unwrap_or(defaults.steps);
        let defaults = defaults.with_steps(steps, warmup_fraction);
        TrainOptions {
            batch_size: self.batch_size,
            grad_accum: self.grad_accum,
            lr: self.lr.unwrap_or(defaults.lr),
            warmup_steps: self.warmup_steps.unwrap_or(defaults.warmup_steps),
            schedule: self.schedule.unwrap_or(defaults.schedule),
            weight_decay: self.weight_decay,
            grad_clip: (self.grad_clip > 0.0).then_some(self.grad_clip),
            seed: self.seed,
            log_every: self.log_every,
            checkpoint_every: self.checkpoint_every,
            valid_sequences: self.valid_sequences,
            quiet: self.quiet,
            checkpoint_layers: self.checkpoint_layers,
            ..defaults
        }
    }
}

/// What a routed or adapted model is trained to match: the corpus or the dense model.
#[derive(Args, Debug, Clone)]
pub struct DistillArgs {
    /// The token objective: `lm` (cross-entropy with the corpus, the paper's), `kl`
    /// (KL(dense ‖ routed): the same frozen base with routing and adapters off is the teacher,
    /// so the model learns to behave like itself dense rather than like the corpus) or `lm+kl`.
    #[arg(long, value_enum, default_value = "lm")]
    pub objective: TokenObjective,
    /// Softmax temperature of the KL term (its value is scaled by the temperature squared).
    #[arg(long, default_value_t = 1.0)]
    pub kl_temperature: f64,
}

impl DistillArgs {
    pub fn config(&self) -> Distillation {
        Distillation {
            objective: self.objective,
            temperature: self.kl_temperature,
        }
    }
}

/// The adapters' shape: where they go, their rank, scale and dropout.
#[derive(Args, Debug, Clone)]
pub struct LoraArgs {
    /// Rank r of each adapter.
    #[arg(long, default_value_t = 16, value_parser = crate::args::positive)]
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
    /// The adapters' config; short target names (q, v, gate) get their `_proj`.
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

/// `--json`: the command's report as JSON on stdout instead of its text summary.
#[derive(Args, Debug, Clone, Default)]
pub struct ReportArgs {
    /// Print the report as JSON (the library's typed report) instead of the text summary.
    #[arg(long)]
    pub json: bool,
}

impl ReportArgs {
    /// Prints `report` as JSON, or as `text` prints it.
    pub fn show<T: serde::Serialize>(&self, report: &T, text: impl FnOnce(&T)) -> Result<()> {
        if self.json {
            println!("{}", serde_json::to_string_pretty(report)?);
        } else {
            text(report);
        }
        Ok(())
    }
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

/// A count that must be at least 1 (sizes, steps, batches): 0 is refused by the argument
/// parser, naming the flag, instead of failing deep inside a backend.
pub(crate) fn positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{s:?} is not a count: {e}")),
    }
}

/// `--model DIR [--adapter PEFT_DIR]`: the model a serving or evaluation command runs.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model directory (HF layout, optionally with SkipGPT routers), or a LLaMA GGUF file run
    /// as it is: on the CPU its quantized matrices (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K,
    /// Q6_K) stay in their blocks; other backends dequantize them at load.
    #[arg(long = "model")]
    pub dir: std::path::PathBuf,
    /// SkipGPT routers to attach to --model: a directory with skipgpt.json and
    /// routers.safetensors (as published under models/).
    #[arg(long)]
    pub routers: Option<std::path::PathBuf>,
    /// A LoRA adapter in PEFT layout to apply on top of --model (merged into its weights at
    /// load: the adapter's function at the base's speed; on a quantized GGUF it stays unmerged,
    /// as in QLoRA).
    #[arg(long)]
    pub adapter: Option<std::path::PathBuf>,
    /// What the projection and embedding matrices are held in, whatever the file stores:
    /// f16 or bf16 take half the memory and decode faster where memory bandwidth bounds it.
    /// The residual stream, norms, routers, attention and the cache stay f32.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: skipgpt_model::StoreDtype,
}

impl ModelArgs {
    pub fn source(&self) -> ModelSource {
        ModelSource {
            dir: self.dir.clone(),
            routers: self.routers.clone(),
            adapter: self.adapter.clone(),
            dtype: self.dtype,
        }
    }

    /// The model directory, with the adapter applied when one is given.
    pub fn load<B: Backend>(&self, device: &B::Device) -> Result<skipgpt_model::Pretrained<B>> {
        let pretrained = self.source().load::<B>(device)?;
        // the weights are read later: hand back what loading freed before they are
        crate::memory::release_free_heap();
        Ok(pretrained)
    }
}

/// How prompts are put to the model.
#[derive(Args, Debug, Clone)]
pub struct PromptFormatArgs {
    /// A Jinja chat template to use instead of the model's own (tokenizer_config.json).
    #[arg(long, conflicts_with = "raw_prompts")]
    pub chat_template: Option<PathBuf>,
    /// Continue the prompts as plain text instead of putting them in the chat format.
    #[arg(long)]
    pub raw_prompts: bool,
}

impl PromptFormatArgs {
    pub fn format(&self) -> PromptFormat {
        match (&self.chat_template, self.raw_prompts) {
            (_, true) => PromptFormat::Raw,
            (Some(path), false) => PromptFormat::ChatTemplateFile(path.clone()),
            (None, false) => PromptFormat::Chat,
        }
    }
}
