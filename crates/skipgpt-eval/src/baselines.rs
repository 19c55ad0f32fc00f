//! Static pruning baselines in the manner of ShortGPT (Men et al., 2024): rank layers by their
//! Block Influence on calibration data and remove the least influential ones, for good.
//!
//! Block Influence of a layer is `1 − mean over tokens of cos(input, output)`: a layer that
//! barely turns the residual stream does little. The attention variant scores each attention
//! module by `1 − cos(x, x + Attn(norm(x)))` and removes attention modules only.
//!
//! The result is a pair of per-layer execute masks, applied with
//! [`LlamaForCausalLM::with_static_routes`] so that a pruned model is evaluated, saved and
//! served (sparse engine included) exactly like a SkipGPT model.

use burn::tensor::{backend::Backend, Tensor};
use serde::{Deserialize, Serialize};
use skipgpt_data::PackedDataset;
use skipgpt_model::{LlamaForCausalLM, Routing};

use crate::error::{EvalError, Result};
use crate::{batch_ids, host_f64};

/// Block Influence per layer, and of each layer's attention module.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BlockInfluence {
    pub layer: Vec<f64>,
    pub attention: Vec<f64>,
    /// Calibration tokens it was measured on.
    pub tokens: usize,
}

/// Measures Block Influence on `data` (dense forward, no routing).
pub fn block_influence<B: Backend>(
    model: &LlamaForCausalLM<B>,
    data: &PackedDataset,
    batch_size: usize,
) -> Result<BlockInfluence> {
    if data.is_empty() {
        return Err(EvalError::Input(
            "no calibration sequences for Block Influence".into(),
        ));
    }
    let device = model.device();
    let layers = model.config.num_hidden_layers;
    let t = data.seq_len;
    let (mut layer_cos, mut attn_cos) = (vec![0.0f64; layers], vec![0.0f64; layers]);
    let mut tokens = 0;
    let ctx = model.attention_context(t);
    // every module runs, whatever routers the model has
    let dense = model.layer_routing(Routing::Dense);
    for chunk in data.sequences.chunks(batch_size.max(1)) {
        let b = chunk.len();
        let mut x = model
            .model
            .embed_tokens
            .forward(batch_ids::<B>(chunk, t, &device));
        for (l, layer) in model.model.layers.iter().enumerate() {
            let out = layer.forward(x.clone(), &ctx, &dense, None);
            attn_cos[l] += cosine_sum(x.clone(), out.post_attention);
            layer_cos[l] += cosine_sum(x, out.hidden.clone());
            x = out.hidden;
        }
        tokens += b * t;
    }
    let bi = |v: Vec<f64>| v.into_iter().map(|c| 1.0 - c / tokens as f64).collect();
    Ok(BlockInfluence {
        layer: bi(layer_cos),
        attention: bi(attn_cos),
        tokens,
    })
}

/// Sum over tokens of cos(a, b), `[batch, seq, hidden]` each.
fn cosine_sum<B: Backend>(a: Tensor<B, 3>, b: Tensor<B, 3>) -> f64 {
    let dot = (a.clone() * b.clone()).sum_dim(2);
    let na = a.powi_scalar(2).sum_dim(2).sqrt();
    let nb = b.powi_scalar(2).sum_dim(2).sqrt();
    host_f64((dot / (na * nb).clamp_min(1e-12)).sum())[0]
}

/// What a static baseline removes.
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StaticMode {
    /// Whole layers (ShortGPT).
    Block,
    /// Attention modules only.
    Attention,
}

/// Which modules a static baseline keeps.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StaticPlan {
    pub mode: StaticMode,
    pub attn_exec: Vec<bool>,
    pub mlp_exec: Vec<bool>,
    /// Fraction of the decoder's parameters removed.
    pub param_skip: f64,
}

/// Removes the least influential layers (or attention modules), as many as brings the removed
/// share of the decoder's parameters nearest to `target` (the parameter budget of a SkipGPT
/// model at that sparsity; a tie goes to the larger removal). Attention alone may hold less
/// than `target`; then every attention module goes.
pub fn static_plan(
    bi: &BlockInfluence,
    mode: StaticMode,
    target: f64,
    attention_params: usize,
    mlp_params: usize,
) -> StaticPlan {
    let layers = bi.layer.len();
    let scores = match mode {
        StaticMode::Block => &bi.layer,
        StaticMode::Attention => &bi.attention,
    };
    let mut order: Vec<usize> = (0..layers).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let (pa, pm) = (attention_params as f64, mlp_params as f64);
    let total = layers as f64 * (pa + pm);
    let per_removal = match mode {
        StaticMode::Block => pa + pm,
        StaticMode::Attention => pa,
    };
    let (mut attn_exec, mut mlp_exec) = (vec![true; layers], vec![true; layers]);
    let mut removed = 0.0;
    for &l in &order {
        // the nearest whole number of removals to the budget
        let after = removed + per_removal;
        if (after / total - target).abs() > (removed / total - target).abs() {
            break;
        }
        attn_exec[l] = false;
        if mode == StaticMode::Block {
            mlp_exec[l] = false;
        }
        removed = after;
    }
    StaticPlan {
        mode,
        attn_exec,
        mlp_exec,
        param_skip: removed / total,
    }
}
