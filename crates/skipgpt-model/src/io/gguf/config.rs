//! A LLaMA GGUF's `llama.*` metadata → the [`LlamaConfig`] transformers would build from the
//! same file, RoPE scaling included (LLaMA 3.1-style `rope_freqs` matched against
//! transformers' `llama3` scaling).

use super::reader::GgufFile;
use super::GgufError;
use crate::config::{LlamaConfig, RopeScaling};
use crate::io::safetensors_io::StoreDtype;
use crate::rope::RotaryEmbedding;

/// The model's shape from the `llama.*` metadata.
pub(super) fn llama_config(g: &GgufFile, dtype: StoreDtype) -> Result<LlamaConfig, GgufError> {
    let arch = g.string("general.architecture")?;
    if arch != "llama" {
        return Err(GgufError::Unsupported {
            path: g.path().to_path_buf(),
            key: "general.architecture".into(),
            value: arch.into(),
            supported: "supported: llama".into(),
        });
    }
    let key = |k: &str| format!("llama.{k}");
    let uint = |k: &str| g.uint(&key(k)).map(|v| v as usize);
    let hidden = uint("embedding_length")?;
    let heads = uint("attention.head_count")?;
    let kv_heads = g
        .optional(&key("attention.head_count_kv"), |g, k| g.uint(k))?
        .map_or(heads, |v| v as usize);
    let invalid = |message: String| GgufError::Invalid {
        path: g.path().to_path_buf(),
        message,
    };
    if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
        return Err(invalid(format!(
            "llama.attention.head_count = {heads} is not a multiple of llama.attention.head_count_kv = {kv_heads}"
        )));
    }
    let head_dim = match g.optional(&key("attention.key_length"), |g, k| g.uint(k))? {
        Some(d) => d as usize,
        None if hidden % heads == 0 => hidden / heads,
        None => {
            return Err(invalid(format!(
                "llama.embedding_length = {hidden} is not a multiple of llama.attention.head_count = {heads}"
            )))
        }
    };
    if let Some(rot) = g.optional(&key("rope.dimension_count"), |g, k| g.uint(k))? {
        if rot as usize != head_dim {
            return Err(GgufError::Unsupported {
                path: g.path().to_path_buf(),
                key: key("rope.dimension_count"),
                value: rot.to_string(),
                supported: format!("partial rotary embeddings are not supported: it must equal the head size {head_dim}"),
            });
        }
    }
    let embed = g
        .tensor("token_embd.weight")
        .ok_or_else(|| GgufError::MissingTensor {
            path: g.path().to_path_buf(),
            name: "token_embd.weight".into(),
            needed_for: "the token embedding".into(),
        })?;
    let vocab = match g.optional(&key("vocab_size"), |g, k| g.uint(k))? {
        Some(v) => v as usize,
        None => embed.dims.get(1).copied().unwrap_or(0) as usize,
    };
    let mut c = LlamaConfig::new(
        vocab,
        hidden,
        uint("feed_forward_length")?,
        uint("block_count")?,
        heads,
        kv_heads,
        head_dim,
    );
    c.rms_norm_eps = g.float(&key("attention.layer_norm_rms_epsilon"))?;
    if let Some(theta) = g.optional(&key("rope.freq_base"), |g, k| g.float(k))? {
        c.rope_theta = theta;
    }
    c.max_position_embeddings = uint("context_length")?;
    c.tie_word_embeddings = g.tensor("output.weight").is_none();
    c.qkv_bias = g.tensor("blk.0.attn_q.bias").is_some();
    c.o_bias = g.tensor("blk.0.attn_output.bias").is_some();
    c.mlp_bias = g.tensor("blk.0.ffn_up.bias").is_some();
    c.bos_token_id = g
        .optional("tokenizer.ggml.bos_token_id", |g, k| g.uint(k))?
        .map(|v| v as u32);
    c.eos_token_ids = g
        .optional("tokenizer.ggml.eos_token_id", |g, k| g.uint(k))?
        .map(|v| v as u32)
        .into_iter()
        .collect();
    c.rope_scaling = rope_scaling(g, &c)?;
    c.dtype = dtype.hf_name().into();
    for (name, v) in [
        ("llama.embedding_length", c.hidden_size),
        ("llama.feed_forward_length", c.intermediate_size),
        ("llama.block_count", c.num_hidden_layers),
        ("llama.context_length", c.max_position_embeddings),
        ("the vocabulary size", c.vocab_size),
    ] {
        if v == 0 {
            return Err(invalid(format!("{name} is 0")));
        }
    }
    if !(c.rms_norm_eps > 0.0 && c.rope_theta > 0.0) {
        return Err(invalid(format!(
            "llama.attention.layer_norm_rms_epsilon = {} and llama.rope.freq_base = {} must be positive",
            c.rms_norm_eps, c.rope_theta
        )));
    }
    Ok(c)
}

/// RoPE scaling from `llama.rope.scaling.*`, or LLaMA 3.1's per-frequency factors in the
/// `rope_freqs.weight` tensor, matched against transformers' `llama3` rule.
fn rope_scaling(g: &GgufFile, c: &LlamaConfig) -> Result<RopeScaling, GgufError> {
    let unsupported = |key: &str, value: String, supported: &str| GgufError::Unsupported {
        path: g.path().to_path_buf(),
        key: key.into(),
        value,
        supported: supported.into(),
    };
    let kind = g.optional("llama.rope.scaling.type", |g, k| g.string(k))?;
    let factor = g.optional("llama.rope.scaling.factor", |g, k| g.float(k))?;
    let scaling = match (kind, factor) {
        (None | Some("none"), _) => RopeScaling::Default,
        (Some("linear"), Some(f)) if f > 0.0 => RopeScaling::Linear { factor: f },
        (Some(other), _) => {
            return Err(unsupported(
                "llama.rope.scaling.type",
                other.into(),
                "supported: none, linear (with a positive llama.rope.scaling.factor)",
            ))
        }
    };
    let Some(t) = g.tensor("rope_freqs.weight") else {
        return Ok(scaling);
    };
    let freqs = g.tensor_f32(t);
    let half = c.head_dim / 2;
    if freqs.len() != half {
        return Err(GgufError::TensorShape {
            path: g.path().to_path_buf(),
            name: t.name.clone(),
            expected: vec![half],
            found: t.torch_shape(),
        });
    }
    let factor = freqs.iter().copied().fold(0.0f32, f32::max) as f64;
    let original = g
        .optional("llama.rope.scaling.original_context_length", |g, k| {
            g.uint(k)
        })?
        .map_or(8192, |v| v as usize);
    // LLaMA 3.1 / 3.2 use low 1, high 4; the factor is the largest divisor
    let candidate = RopeScaling::Llama3 {
        factor,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: original,
    };
    let with = |s: RopeScaling| {
        let mut cc = c.clone();
        cc.rope_scaling = s;
        RotaryEmbedding::new(&cc).inv_freq(0)
    };
    let (plain, scaled) = (with(RopeScaling::Default), with(candidate.clone()));
    let matches = plain
        .iter()
        .zip(&scaled)
        .zip(&freqs)
        .all(|((p, s), f)| ((p / s) - f).abs() <= 1e-3 * f.abs().max(1.0));
    if matches {
        Ok(candidate)
    } else {
        Err(unsupported(
            "rope_freqs.weight",
            format!("{:?}", &freqs[..freqs.len().min(8)]),
            "per-frequency RoPE factors are read only when they follow LLaMA 3.1's rule (low_freq_factor 1, high_freq_factor 4)",
        ))
    }
}
