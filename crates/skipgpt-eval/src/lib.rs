//! # skipgpt-eval
//!
//! Measuring a (routed) model: perplexity over packed sequences and how much it skipped, and
//! zero-shot multiple-choice accuracy in the manner of lm-evaluation-harness, and ShortGPT-style
//! static pruning to compare against, and the routing analysis with its pictures.

pub mod analysis;
pub mod baselines;
pub mod error;
pub mod multiple_choice;
pub mod perplexity;
pub mod svg;

pub use analysis::{analyze_routing, token_map, write_analysis, RoutingAnalysis, TokenMap};
pub use baselines::{block_influence, static_plan, BlockInfluence, StaticMode, StaticPlan};
pub use error::{EvalError, Result};
pub use multiple_choice::{evaluate_mc, synthetic_mc_tasks, McExample, McReport, McTask};
pub use perplexity::{evaluate_perplexity, PerplexityReport};
