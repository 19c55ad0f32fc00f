//! # skipgpt-eval
//!
//! Measuring a (routed) model: perplexity over packed sequences and how much it skipped.

pub mod perplexity;

pub use perplexity::{evaluate_perplexity, PerplexityReport};
