//! Perplexity and realised skip rates over a packed dataset.

use burn::tensor::{activation, backend::Backend, Tensor};
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
