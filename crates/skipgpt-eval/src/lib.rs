//! # skipgpt-eval
//!
//! Measuring a (routed) model: perplexity over packed sequences and how much it skipped, and
//! zero-shot multiple-choice accuracy in the manner of lm-evaluation-harness, and ShortGPT-style
//! static pruning to compare against, the routing analysis with its pictures, and calibrating
//! trained routers to their skip target.

pub mod analysis;
pub mod baselines;
pub mod calibrate;
pub mod charts;
pub mod error;
pub mod fidelity;
pub mod multiple_choice;
pub mod perplexity;
pub mod speed;

pub use analysis::{
    analyze_routing, token_map, write_analysis, RoutingAnalysis, RoutingFile, TokenMap,
};
pub use baselines::{block_influence, static_plan, BlockInfluence, StaticMode, StaticPlan};
pub use calibrate::{calibrate_routers, realised_skip, CalibrationReport};
pub use error::{EvalError, Result};
pub use fidelity::{
    compare_generations, compare_on_text, loops, repetition, GenerationFidelity, Served,
    TextFidelity,
};
pub use multiple_choice::{evaluate_mc, synthetic_mc_tasks, McExample, McReport, McTask};
pub use perplexity::{
    chunked_perplexity, evaluate_perplexity, ChunkedPerplexity, PerplexityReport,
};

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};

/// The first `len` tokens of each sequence as a `[sequences, len]` id tensor.
pub(crate) fn batch_ids<B: Backend>(
    sequences: &[Vec<u32>],
    len: usize,
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    let flat: Vec<i64> = sequences
        .iter()
        .flat_map(|s| s[..len].iter().map(|&i| i as i64))
        .collect();
    Tensor::from_data(TensorData::new(flat, [sequences.len(), len]), device)
}

/// A tensor's values on the host, as f64.
pub(crate) fn host_f64<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f64> {
    t.into_data()
        .convert::<f64>()
        .into_vec::<f64>()
        .expect("f64 after convert")
}
