//! # skipgpt-train
//!
//! What SkipGPT training needs besides the model: the corpus pipeline ([`data`]) and the loss
//! ([`loss`]): language-model cross-entropy plus `α·|T − skip_rate|`.

pub mod data;
pub mod error;
pub mod loss;

pub use error::{Result, TrainError};
