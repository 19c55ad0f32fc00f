//! # skipgpt-pipeline
//!
//! The SkipGPT method's stages as library functions. Each takes a typed config (serde,
//! `Default` holding the method's defaults), runs on the given device(s), writes its output
//! directory atomically and returns a typed report (serde). The `skipgpt` CLI maps its
//! arguments onto these configs and prints the reports; the demo calls them directly.
//!
//! | stage | function | config -> report |
//! | --- | --- | --- |
//! | pretrain a dense base | [`pretrain()`] | [`PretrainConfig`] -> [`PretrainReport`] |
//! | stage 1: routers | [`tune_routers()`] | [`TuneRoutersConfig`] -> [`TuneRoutersReport`] |
//! | stage 2: LoRA | [`finetune_lora()`] | [`FinetuneLoraConfig`] -> [`FinetuneLoraReport`] |
//! | static baseline | [`prune_static()`] | [`PruneStaticConfig`] -> [`PruneStaticReport`] |
//! | router calibration | [`calibrate()`] | [`CalibrateConfig`] -> [`CalibrateOutcome`] |
//! | routing analysis | [`analyse()`] | [`AnalyseConfig`] -> [`AnalyseReport`] |
//! | perplexity | [`evaluate::eval_ppl`] | [`evaluate::EvalPplConfig`] -> [`evaluate::EvalPplReport`] |
//! | multiple choice | [`evaluate::eval_mc`] | [`evaluate::EvalMcConfig`] -> [`McRow`]s |
//! | fidelity to dense | [`eval_fidelity()`] | [`EvalFidelityConfig`] -> [`EvalFidelityReport`] |
//! | self-data | [`self_data()`] | [`SelfDataConfig`] -> [`SelfDataReport`] |
//!
//! [`evaluate::perplexity`] and [`evaluate::score_tasks`] score a model already loaded (the
//! demo scores each model it trained that way). [`Comparison`] is the demo's table as data:
//! what it writes and `cargo xtask experiment` reads.
//!
//! A new stage is one module here and one argument mapping in the CLI.

pub mod analyse;
pub mod calibrate;
pub mod comparison;
pub mod corpus;
pub mod error;
pub mod evaluate;
pub mod fidelity;
pub mod finetune_lora;
pub mod output;
pub mod pretrain;
pub mod progress;
pub mod prompts;
pub mod prune_static;
pub mod self_data;
pub mod tune_routers;

pub use analyse::{analyse, analyse_model, AnalyseConfig, AnalyseReport};
pub use calibrate::{calibrate, CalibrateConfig, CalibrateOutcome};
pub use comparison::{Comparison, ComparisonRow};
pub use corpus::CorpusConfig;
pub use error::{PipelineError, Result};
pub use evaluate::McRow;
pub use fidelity::{eval_fidelity, EvalFidelityConfig, EvalFidelityReport};
pub use finetune_lora::{finetune_lora, FinetuneLoraConfig, FinetuneLoraReport, LoraValidation};
pub use output::AdaptedOutput;
pub use pretrain::{pretrain, PretrainConfig, PretrainReport};
pub use prompts::PromptFormat;
pub use prune_static::{prune_static, PruneStaticConfig, PruneStaticReport};
pub use self_data::{self_data, SelfDataConfig, SelfDataReport};
pub use tune_routers::{tune_routers, TuneRoutersConfig, TuneRoutersReport, TunedValidation};

/// The device that holds the model in a (possibly data-parallel) training stage.
fn first_device<B: burn::tensor::backend::Backend>(devices: &[B::Device]) -> Result<&B::Device> {
    devices.first().ok_or(PipelineError::InvalidSetting {
        name: "devices",
        value: "[]".into(),
        expected: "at least one device",
    })
}

/// What a training stage's start line says of its data and length: "N train / M valid
/// sequences of T tokens, S steps of K sequences" (K counting every device's batches).
fn describe_run(
    train: &skipgpt_data::PackedDataset,
    valid: &skipgpt_data::PackedDataset,
    opts: &skipgpt_train::TrainOptions,
    devices: usize,
) -> String {
    format!(
        "{} train / {} valid sequences of {} tokens, {} steps of {} sequences",
        train.len(),
        valid.len(),
        train.seq_len,
        opts.steps,
        opts.batch_size * opts.grad_accum * devices
    )
}
