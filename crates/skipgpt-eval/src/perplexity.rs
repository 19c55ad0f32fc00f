//! Perplexity and realised skip rates: over a packed dataset, and over one text as llama.cpp's
//! `llama-perplexity` scores it.

use burn::tensor::{activation, backend::Backend, s, Tensor};
use serde::{Deserialize, Serialize};
use skipgpt_data::PackedDataset;
use skipgpt_model::engine::{sparse_forward, LogitRows, SparseCache};
use skipgpt_model::{LlamaForCausalLM, Routing};

use crate::{batch_ids, host_f64, Result};

/// What [`evaluate_perplexity`] measured.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PerplexityReport {
    /// Predicted tokens.
    pub tokens: usize,
    /// Mean negative log-likelihood per token (nats).
    pub nll: f64,
    /// `exp(nll)`.
    pub perplexity: f64,
    /// Next-token accuracy: the fraction of positions whose most likely token is the target.
    pub accuracy: f64,
    /// Fraction of (token, layer) attention executions skipped (0 when dense).
    pub attn_skip: f64,
    /// Fraction of (token, layer) MLP executions skipped.
    pub mlp_skip: f64,
    /// Skipped fraction of the decoder's per-token parameter use: each skipped module counts
    /// with its parameter count (attention q/k/v/o, MLP gate/up/down).
    pub param_skip: f64,
    /// Per layer: attention skip fraction.
    pub attn_skip_per_layer: Vec<f64>,
    /// Per layer: MLP skip fraction.
    pub mlp_skip_per_layer: Vec<f64>,
}

/// Runs the model over every sequence (inputs `seq[..n]`, targets `seq[1..]`) in batches,
/// through the sparse engine: what is skipped is not computed, as at inference.
/// `progress` is called with (sequences done, total) after each batch.
pub fn evaluate_perplexity<B: Backend>(
    model: &LlamaForCausalLM<B>,
    data: &PackedDataset,
    routing: Routing,
    batch_size: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<PerplexityReport> {
    let device = model.device();
    let layers = model.config.num_hidden_layers;
    let t = data.seq_len;
    let (mut nll_sum, mut correct, mut tokens) = (0.0f64, 0.0f64, 0usize);
    let mut attn_skipped = vec![0.0f64; layers];
    let mut mlp_skipped = vec![0.0f64; layers];
    let batch_size = batch_size.max(1);
    for (done, chunk) in data.sequences.chunks(batch_size).enumerate() {
        let b = chunk.len();
        let inputs: Vec<Vec<u32>> = chunk.iter().map(|s| s[..t].to_vec()).collect();
        let targets = batch_ids::<B>(chunk, t + 1, &device)
            .slice([0..b, 1..t + 1])
            .reshape([b * t, 1]);
        let mut cache = SparseCache::new(b, layers);
        let out = sparse_forward(model, &inputs, &mut cache, routing, LogitRows::All)?;
        let hits = out.logits.clone().argmax(1).equal(targets.clone());
        correct += scalar(hits.float().sum());
        // summed next-token negative log-likelihood of the batch's rows
        let picked = activation::log_softmax(out.logits, 1).gather(1, targets);
        nll_sum -= scalar(picked.sum());
        tokens += b * t;
        for (sum, gates) in [
            (&mut attn_skipped, out.attn_gates),
            (&mut mlp_skipped, out.mlp_gates),
        ] {
            for (l, g) in gates.into_iter().enumerate() {
                sum[l] += g.iter().filter(|&&executed| !executed).count() as f64;
            }
        }
        progress((done * batch_size + b).min(data.len()), data.len());
    }
    let per_layer = |v: Vec<f64>| {
        v.into_iter()
            .map(|s| s / tokens.max(1) as f64)
            .collect::<Vec<_>>()
    };
    let attn_skip_per_layer = per_layer(attn_skipped);
    let mlp_skip_per_layer = per_layer(mlp_skipped);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let (attn_skip, mlp_skip) = (mean(&attn_skip_per_layer), mean(&mlp_skip_per_layer));
    let (pa, pm) = (model.config.attention_params(), model.config.mlp_params());
    let nll = nll_sum / tokens.max(1) as f64;
    Ok(PerplexityReport {
        tokens,
        nll,
        perplexity: nll.exp(),
        accuracy: correct / tokens.max(1) as f64,
        attn_skip,
        mlp_skip,
        param_skip: (pa as f64 * attn_skip + pm as f64 * mlp_skip) / (pa + pm) as f64,
        attn_skip_per_layer,
        mlp_skip_per_layer,
    })
}

fn scalar<B: Backend>(t: Tensor<B, 1>) -> f64 {
    host_f64(t)[0]
}

/// What [`chunked_perplexity`] measured: llama.cpp's `llama-perplexity` scoring of one text.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChunkedPerplexity {
    /// Tokens per chunk.
    pub ctx: usize,
    /// Chunks scored.
    pub chunks: usize,
    /// Tokens scored: `ctx − ctx/2 − 1` per chunk.
    pub tokens: usize,
    /// Mean negative log-likelihood per scored token (nats).
    pub nll: f64,
    /// `exp(nll)`.
    pub perplexity: f64,
    /// The standard error of `perplexity` (`perplexity · σ(nll) / √(tokens − 1)`), as
    /// llama-perplexity prints it after `±`.
    pub perplexity_error: f64,
    /// Fraction of (token, layer) attention executions skipped (0 when dense).
    pub attn_skip: f64,
    /// Fraction of (token, layer) MLP executions skipped.
    pub mlp_skip: f64,
}

/// Perplexity as llama.cpp's `llama-perplexity` computes it, so that the two can be compared
/// on the same file and text: `tokens` (the whole text, tokenized once) cut into chunks of
/// `ctx`, each chunk run alone from an empty cache with its first token replaced by `bos`
/// where the tokenizer adds one, and only its second half scored (every token predicted with
/// at least `ctx/2` tokens before it). At most `max_chunks` chunks; `progress` is called with
/// (chunks done, chunks).
pub fn chunked_perplexity<B: Backend>(
    model: &LlamaForCausalLM<B>,
    tokens: &[u32],
    ctx: usize,
    bos: Option<u32>,
    max_chunks: Option<usize>,
    routing: Routing,
    mut progress: impl FnMut(usize, usize),
) -> Result<ChunkedPerplexity> {
    if ctx < 4 || tokens.len() < 2 * ctx {
        return Err(crate::EvalError::Input(format!(
            "perplexity with a context of {ctx} needs a context of at least 4 and a text of at \
             least {} tokens; this one has {}",
            2 * ctx,
            tokens.len()
        )));
    }
    let chunks = (tokens.len() / ctx).min(max_chunks.unwrap_or(usize::MAX));
    let first = ctx / 2;
    let layers = model.config.num_hidden_layers;
    let (mut nll, mut nll2, mut count) = (0.0f64, 0.0f64, 0usize);
    let (mut attn_skipped, mut mlp_skipped) = (0usize, 0usize);
    for c in 0..chunks {
        let mut ids = tokens[c * ctx..(c + 1) * ctx].to_vec();
        if let Some(bos) = bos {
            ids[0] = bos;
        }
        let targets: Vec<i64> = ids[first + 1..].iter().map(|&t| t as i64).collect();
        let mut cache = SparseCache::new(1, layers);
        let out = sparse_forward(model, &[ids], &mut cache, routing, LogitRows::All)?;
        let log_probs = activation::log_softmax(out.logits.slice(s![first..ctx - 1, ..]), 1);
        let targets =
            Tensor::<B, 1, burn::tensor::Int>::from_ints(targets.as_slice(), &model.device());
        let picked = host_f64(
            log_probs
                .gather(1, targets.unsqueeze_dim(1))
                .reshape([ctx - 1 - first]),
        );
        for lp in picked {
            nll -= lp;
            nll2 += lp * lp;
        }
        count += ctx - 1 - first;
        for (sum, gates) in [
            (&mut attn_skipped, &out.attn_gates),
            (&mut mlp_skipped, &out.mlp_gates),
        ] {
            *sum += gates
                .iter()
                .flatten()
                .filter(|&&executed| !executed)
                .count();
        }
        progress(c + 1, chunks);
    }
    let mean = nll / count as f64;
    let variance = (nll2 / count as f64 - mean * mean).max(0.0);
    let perplexity = mean.exp();
    let executions = (chunks * ctx * layers).max(1) as f64;
    Ok(ChunkedPerplexity {
        ctx,
        chunks,
        tokens: count,
        nll: mean,
        perplexity,
        perplexity_error: perplexity * (variance / (count.max(2) - 1) as f64).sqrt(),
        attn_skip: attn_skipped as f64 / executions,
        mlp_skip: mlp_skipped as f64 / executions,
    })
}
