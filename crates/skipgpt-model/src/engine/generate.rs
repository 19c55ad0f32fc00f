//! Generation through the engine: the shared decoding loop ([`crate::generate`]) with the
//! engine's forward as its step.

use burn::tensor::backend::Backend;

use super::{sparse_forward, EngineStats, LogitRows, SparseCache};
use crate::error::Result;
use crate::generate::GenerateOptions;
use crate::llama::LlamaForCausalLM;
use crate::router::Routing;

/// Continues each prompt (lengths may differ) by up to `opts.max_new_tokens` tokens with the
/// sparse engine and its per-sequence caches. Returns the new tokens (a sequence that stopped
/// at EOS includes it), the work done, and the cache (for its size).
pub fn generate_sparse<B: Backend>(
    model: &LlamaForCausalLM<B>,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    routing: Routing,
) -> Result<(Vec<Vec<u32>>, EngineStats, SparseCache<B>)> {
    generate_sparse_with(model, prompts, opts, routing, |_, _| {})
}

/// [`generate_sparse`], calling `on_token(sequence, token)` as each token is chosen (to stream
/// text as it comes). A request past the model's context is refused
/// ([`crate::generate::check_context`]).
pub fn generate_sparse_with<B: Backend>(
    model: &LlamaForCausalLM<B>,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    routing: Routing,
    mut on_token: impl FnMut(usize, u32),
) -> Result<(Vec<Vec<u32>>, EngineStats, SparseCache<B>)> {
    let mut cache = SparseCache::new(prompts.len(), model.config.num_hidden_layers);
    let mut stats = EngineStats::default();
    let out = crate::generate::decode_loop(
        &model.config,
        prompts,
        opts,
        |inputs| {
            let step = sparse_forward(model, inputs, &mut cache, routing, LogitRows::Last)?;
            stats.add(&step.stats);
            // rows come in sequence order, one per sequence that had input
            Ok(step
                .logits
                .into_data()
                .convert::<f32>()
                .into_vec()
                .expect("f32 after convert"))
        },
        &mut on_token,
    )?;
    Ok((out, stats, cache))
}
