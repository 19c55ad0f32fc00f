//! # skipgpt-train
//!
//! Training for SkipGPT on burn-train:
//!
//! - [`data`]: the corpus pipeline (text/JSONL → packed sequences, a seeded split) and the
//!   built-in synthetic corpus, re-exported from `skipgpt-data` (which evaluation uses too);
//! - [`loss`]: language-model cross-entropy plus `α·|T − skip_rate|`;
//! - [`step`]: the model as burn-train's `TrainStep`/`InferenceStep` for an [`Objective`];
//! - [`loader`], [`schedule`]: batches, learning rate and Gumbel temperature as functions of
//!   the step, so a killed run resumes exactly;
//! - [`fit`]: one run through burn-train's learner (metrics, checkpoints, resume);
//! - [`metrics`], [`progress`], [`curves`]: what a run reports while it trains, and its
//!   curves as a picture;
//! - [`resume`]: atomic checkpoints and the run manifest;
//! - [`probe`]: one stage-1 step's loss and router gradients, for comparing backends;
//! - [`tokenizer`]: BPE tokenizer training for pretraining from scratch.

pub mod curves;
pub mod error;
pub mod fit;
pub mod loader;
pub mod loss;
pub mod metrics;
pub mod probe;
pub mod progress;
pub mod resume;
pub mod schedule;
pub mod step;
pub mod tokenizer;

pub use error::{Result, TrainError};
pub use fit::{fit, RunDir, TrainOptions};
pub use schedule::ScheduleKind;
pub use skipgpt_data as data;
pub use step::Objective;
