//! Measured speed through the sparse engine: prefill of one prompt and greedy decode, as
//! tokens per second (median of repeats after a warm-up), with the engine's own account of
//! what was skipped. The real-model demo and `bench_real` measure with these.

use std::time::Instant;

use burn::tensor::backend::Backend;
use skipgpt_model::sparse::{generate_sparse, sparse_forward, EngineStats, LogitRows, SparseCache};
use skipgpt_model::{GenerateOptions, LlamaForCausalLM, Result, Routing, Sampling};

/// Median wall time (seconds) of `n` runs after one warm-up. `f` must wait for its results
/// (read them back), so that asynchronous GPU backends are timed to completion.
pub fn median_seconds(n: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut times: Vec<f64> = (0..n.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// A measured rate and what the engine did meanwhile (from the last repeat).
#[derive(Debug, Clone)]
pub struct Throughput {
    pub tokens_per_s: f64,
    pub stats: EngineStats,
}

/// Prefill of `prompt` as one sequence, every position through the model, the last row of
/// logits read back.
pub fn prefill_speed<B: Backend>(
    model: &LlamaForCausalLM<B>,
    prompt: &[u32],
    routing: Routing,
    repeats: usize,
) -> Result<Throughput> {
    let layers = model.config.num_hidden_layers;
    let batch = [prompt.to_vec()];
    let mut stats = Ok(EngineStats::default());
    let seconds = median_seconds(repeats, || {
        let mut cache = SparseCache::new(1, layers);
        stats = sparse_forward(model, &batch, &mut cache, routing, LogitRows::Last).map(|out| {
            let _ = out.logits.into_data();
            out.stats
        });
    });
    Ok(Throughput {
        tokens_per_s: prompt.len() as f64 / seconds,
        stats: stats?,
    })
}

/// Greedy decode of `new_tokens` after each of `prompts` (one batch; end-of-sequence tokens
/// ignored, so every sequence decodes the same count).
pub fn decode_speed<B: Backend>(
    model: &LlamaForCausalLM<B>,
    prompts: &[Vec<u32>],
    new_tokens: usize,
    routing: Routing,
    repeats: usize,
) -> Result<Throughput> {
    let opts = GenerateOptions {
        max_new_tokens: new_tokens,
        sampling: Sampling::Greedy,
        eos_token_ids: vec![],
        ignore_eos: true,
    };
    let mut stats = Ok(EngineStats::default());
    let seconds = median_seconds(repeats, || {
        stats = generate_sparse(model, prompts, &opts, routing).map(|(_, s, _)| s);
    });
    Ok(Throughput {
        tokens_per_s: (prompts.len() * new_tokens) as f64 / seconds,
        stats: stats?,
    })
}
