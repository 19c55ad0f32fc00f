//! The sparse engine: SkipGPT inference that does not compute what the routers skip.
//!
//! The gated forward ([`LlamaForCausalLM::forward_routed`]) computes every module for every
//! token and multiplies skipped outputs by zero, as the reference code does. Here every layer
//! instead asks its routers which tokens execute, gathers those rows, runs the module on them
//! only and adds the result back into the residual stream:
//!
//! - **attention, `kv_policy = keep`**: every token's keys and values are projected (the others
//!   attend to them), but only executing tokens get a query, an attention row and the output
//!   projection;
//! - **attention, `kv_policy = drop`**: a skipping token is not projected at all and leaves no
//!   entry in that layer's cache, which holds only the tokens that executed there;
//! - **MLP**: only executing tokens go through gate/up/down.
//!
//! Tokens are handled as a flat list of rows (sequence, position), so a batch may mix sequences
//! of different lengths, and each sequence keeps its own per-layer cache. [`EngineStats`] counts
//! the floating-point work done and the weight bytes read, next to what the dense model would
//! have needed.
//!
//! # Layout
//! - [`forward`]: one call, the layer loop: per layer an attention step and an MLP step, each
//!   executed or skipped per row;
//! - [`attention`]: the attention step (projections, rotation, the cache, attending);
//! - [`cache`]: the per-sequence, per-layer key/value cache;
//! - [`stats`]: what the call did next to the dense model, counted apart from the compute;
//! - [`pieces`]: a long call as consecutive pieces of rows;
//! - [`rows`]: routers' decisions, gathering rows and adding them back;
//! - [`generate`]: the decoding loop on the engine.
//!
//! On the CPU backend the products, norms, rotations and attention go to `skipgpt-kernels`
//! through [`crate::dispatch`], the one place that chooses by the backend's type.

mod attention;
mod cache;
mod forward;
mod generate;
mod pieces;
mod rows;
mod stats;

use burn::tensor::{backend::Backend, Tensor};

pub use cache::{cache_dtype, SparseCache};
pub use generate::{generate_sparse, generate_sparse_with};
pub(crate) use rows::index_tensor;
pub use stats::EngineStats;

use crate::error::Result;
use crate::llama::LlamaForCausalLM;
use crate::router::Routing;

/// Which rows get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitRows {
    /// Every new token (scoring, `logits`).
    All,
    /// The last new token of each sequence (generation).
    Last,
}

/// What one engine call returns.
pub struct SparseOutput<B: Backend> {
    /// `[rows, vocab]`, rows as [`LogitRows`] asked: all new tokens in sequence order, or the
    /// last of each sequence that had new tokens.
    pub logits: Tensor<B, 2>,
    /// Per layer, per new token (sequence order): did attention / the MLP execute.
    pub attn_gates: Vec<Vec<bool>>,
    pub mlp_gates: Vec<Vec<bool>>,
    pub stats: EngineStats,
}

/// Runs `tokens[s]` (new tokens of sequence `s`, possibly none) through the model, skipping
/// what the routers skip, and appends them to `cache`.
///
/// `routing` is the model's routing mode: [`Routing::Dense`] executes everything (the dense
/// baseline, through the same code), `Deterministic` and `Sample` route. Gumbel training gates
/// are not an inference mode.
///
/// On the CPU backend a call of more than [`crate::dispatch::MAX_ROWS`] rows (a long prompt,
/// a batch of prompts) runs as consecutive pieces of at most that many rows, in the order of
/// the rows, each one attending to the cache the pieces before it filled (as llama.cpp splits
/// a prompt into micro-batches): the products keep to the kernels that read every weight once
/// ([`crate::dispatch`]), and the call's buffers stay those of one piece.
pub fn sparse_forward<B: Backend>(
    model: &LlamaForCausalLM<B>,
    tokens: &[Vec<u32>],
    cache: &mut SparseCache<B>,
    routing: Routing,
    logit_rows: LogitRows,
) -> Result<SparseOutput<B>> {
    forward(model, tokens, cache, (routing, None), logit_rows)
}

/// [`sparse_forward`] with a compute budget per sequence: every router's SKIP logit is shifted
/// by `skip_shifts[s]` for sequence `s`'s rows, as [`LlamaForCausalLM::shift_router_biases`]
/// shifts it for a whole model; `f64::NEG_INFINITY` runs a sequence dense. Sequences of
/// different budgets thus share one call, and each weight is read once for all of them.
pub fn sparse_forward_shifted<B: Backend>(
    model: &LlamaForCausalLM<B>,
    tokens: &[Vec<u32>],
    cache: &mut SparseCache<B>,
    (routing, skip_shifts): (Routing, &[f64]),
    logit_rows: LogitRows,
) -> Result<SparseOutput<B>> {
    if skip_shifts.len() != tokens.len() {
        return Err(crate::error::ModelError::InvalidInput(format!(
            "{} skip shifts given for {} sequences",
            skip_shifts.len(),
            tokens.len()
        )));
    }
    forward(
        model,
        tokens,
        cache,
        (routing, Some(skip_shifts)),
        logit_rows,
    )
}

fn forward<B: Backend>(
    model: &LlamaForCausalLM<B>,
    tokens: &[Vec<u32>],
    cache: &mut SparseCache<B>,
    routing: (Routing, Option<&[f64]>),
    logit_rows: LogitRows,
) -> Result<SparseOutput<B>> {
    let rows = tokens.iter().map(Vec::len).sum();
    let piece = crate::dispatch::MAX_ROWS;
    if crate::dispatch::engine_kernels::<B>() && rows > piece {
        return pieces::forward_in_pieces(model, tokens, cache, routing, logit_rows, piece);
    }
    crate::dispatch::in_pool::<B, _>(rows, || {
        forward::forward_rows(model, tokens, cache, routing, logit_rows)
    })
}
