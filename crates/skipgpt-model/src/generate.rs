//! Autoregressive decoding, greedy or temperature / nucleus sampling: the one decoding loop,
//! and the gated reference generator the sparse engine is tested against.

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::config::{LlamaConfig, RopeScaling};
use crate::error::{ModelError, Result};
use crate::llama::LlamaForCausalLM;

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq)]
pub enum Sampling {
    /// The most likely token (ties go to the lowest id, like `torch.argmax`).
    Greedy,
    /// A draw from `softmax(logits / temperature)` restricted to the smallest set of tokens whose
    /// probability reaches `top_p`.
    Sample {
        temperature: f32,
        top_p: f32,
        seed: u64,
    },
}

/// Options of [`generate`].
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// A sequence stops after producing any of these (unless `ignore_eos`).
    pub eos_token_ids: Vec<u32>,
    pub ignore_eos: bool,
}

/// Checks that every id is a valid row of the embedding matrix.
pub fn validate_ids(ids: &[i64], vocab_size: usize, what: &str) -> Result<()> {
    if let Some(bad) = ids.iter().find(|&&id| id < 0 || id as usize >= vocab_size) {
        return Err(ModelError::InvalidInput(format!(
            "{what}: token id {bad} is outside the vocabulary [0, {vocab_size})"
        )));
    }
    Ok(())
}

/// Continues each prompt (all of the same length) by up to `max_new_tokens` tokens with the
/// gated forward pass: the reference the sparse engine ([`crate::engine::generate_sparse`],
/// which serves every command) is tested against. It keeps no cache: every step runs the
/// whole sequence so far, which is plainly right and quadratic in its length. Returns only the
/// new tokens; a sequence that stopped at EOS includes the EOS token.
pub fn generate<B: Backend>(
    model: &LlamaForCausalLM<B>,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
) -> Result<Vec<Vec<u32>>> {
    let Some(first) = prompts.first() else {
        return Ok(Vec::new());
    };
    if prompts.iter().any(|p| p.len() != first.len()) {
        return Err(ModelError::InvalidInput(
            "batched prompts must all have the same length".into(),
        ));
    }
    let flat: Vec<i64> = prompts.iter().flatten().map(|&id| id as i64).collect();
    validate_ids(&flat, model.config.vocab_size, "prompt")?;
    let device = model.device();
    // Every sequence so far. The batch keeps its shape: a finished sequence is extended by its
    // last token again (causal attention keeps that from the others) and its logits dropped.
    let mut sequences: Vec<Vec<i64>> = vec![Vec::new(); prompts.len()];
    decode_loop(
        &model.config,
        prompts,
        opts,
        |inputs| {
            for (seq, input) in sequences.iter_mut().zip(inputs) {
                match input.is_empty() {
                    true => seq.push(seq.last().copied().unwrap_or(0)),
                    false => seq.extend(input.iter().map(|&id| id as i64)),
                }
            }
            let (b, t) = (sequences.len(), sequences[0].len());
            let ids = TensorData::new(sequences.concat(), [b, t]);
            let logits = model.forward(Tensor::<B, 2, Int>::from_data(ids, &device));
            let v = logits.dims()[2];
            let rows: Vec<f32> = logits
                .slice([0..b, t - 1..t, 0..v])
                .into_data()
                .convert::<f32>()
                .into_vec()
                .expect("f32 after convert");
            Ok(rows
                .chunks_exact(v)
                .zip(inputs)
                .filter(|(_, input)| !input.is_empty())
                .flat_map(|(row, _)| row.iter().copied())
                .collect())
        },
        |_, _| {},
    )
}

/// The decoding loop every generator shares. It checks the request, then feeds each
/// unfinished sequence its next input (the prompt, then the token just chosen), picks a token
/// from the logits `step` returns, calls `on_token(sequence, token)`, and stops a sequence at
/// EOS and everything after `max_new_tokens`.
///
/// `step(inputs)` runs the model on `inputs[s]` for every sequence `s` (empty once it has
/// finished) and returns the last position's logits of each sequence that had input, in
/// sequence order, `vocab_size` values each.
pub(crate) fn decode_loop(
    config: &LlamaConfig,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    mut step: impl FnMut(&[Vec<u32>]) -> Result<Vec<f32>>,
    mut on_token: impl FnMut(usize, u32),
) -> Result<Vec<Vec<u32>>> {
    validate_sampling(&opts.sampling)?;
    if prompts.iter().any(Vec::is_empty) {
        return Err(ModelError::InvalidInput(
            "a prompt is empty: give at least one token".into(),
        ));
    }
    check_context(config, prompts, opts.max_new_tokens)?;
    let b = prompts.len();
    let mut rng = match opts.sampling {
        Sampling::Sample { seed, .. } => Some(StdRng::seed_from_u64(seed)),
        Sampling::Greedy => None,
    };
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); b];
    let mut done = vec![false; b];
    let mut input: Vec<Vec<u32>> = prompts.to_vec();
    for _ in 0..opts.max_new_tokens {
        let logits = step(&input)?;
        let active: Vec<usize> = (0..b).filter(|&s| !input[s].is_empty()).collect();
        let mut next = vec![Vec::new(); b];
        for (row, &s) in logits.chunks_exact(config.vocab_size).zip(&active) {
            let token = pick(row, &opts.sampling, rng.as_mut());
            out[s].push(token);
            on_token(s, token);
            if !opts.ignore_eos && opts.eos_token_ids.contains(&token) {
                done[s] = true;
            } else {
                next[s] = vec![token];
            }
        }
        if done.iter().all(|&d| d) {
            break;
        }
        input = next;
    }
    Ok(out)
}

/// **Context length.** A model is trained for `max_position_embeddings` positions; generating
/// past them gives text of no quality, silently. So a request whose longest prompt plus
/// `max_new_tokens` exceeds them is refused before any work, naming the numbers, except with
/// dynamic-NTK RoPE scaling, which is made to stretch the context.
pub fn check_context(
    config: &LlamaConfig,
    prompts: &[Vec<u32>],
    max_new_tokens: usize,
) -> Result<()> {
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let context = config.max_position_embeddings;
    let stretches = matches!(config.rope_scaling, RopeScaling::Dynamic { .. });
    if longest + max_new_tokens > context && !stretches {
        return Err(ModelError::InvalidInput(format!(
            "a prompt of {longest} tokens plus {max_new_tokens} new ones goes past the model's \
             context of {context} positions (max_position_embeddings); shorten the prompt or \
             lower the number of new tokens"
        )));
    }
    Ok(())
}

/// Rejects a temperature that is not positive and a top-p outside (0, 1].
pub fn validate_sampling(sampling: &Sampling) -> Result<()> {
    if let Sampling::Sample {
        temperature, top_p, ..
    } = *sampling
    {
        if !(temperature > 0.0 && temperature.is_finite()) {
            return Err(ModelError::InvalidInput(format!(
                "temperature must be > 0, got {temperature}"
            )));
        }
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ModelError::InvalidInput(format!(
                "top-p must be in (0, 1], got {top_p}"
            )));
        }
    }
    Ok(())
}

/// Picks the next token from one row of logits.
pub(crate) fn pick(logits: &[f32], sampling: &Sampling, rng: Option<&mut StdRng>) -> u32 {
    match (sampling, rng) {
        (
            Sampling::Sample {
                temperature, top_p, ..
            },
            Some(rng),
        ) => sample(logits, *temperature, *top_p, rng),
        _ => argmax(logits),
    }
}

/// Index of the largest value; the first one on ties.
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// Draws from `softmax(logits / temperature)` after nucleus (top-p) filtering.
fn sample(logits: &[f32], temperature: f32, top_p: f32, rng: &mut StdRng) -> u32 {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(usize, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, l)| (i, ((l - max) / temperature).exp()))
        .collect();
    let total: f32 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= total);
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    // keep the smallest prefix whose mass reaches top_p (always at least one token)
    let mut mass = 0.0;
    let mut keep = 0;
    for p in &probs {
        keep += 1;
        mass += p.1;
        if mass >= top_p {
            break;
        }
    }
    let kept = &probs[..keep];
    let mut u = rng.random::<f32>() * mass;
    for (i, p) in kept {
        u -= p;
        if u <= 0.0 {
            return *i as u32;
        }
    }
    kept[keep - 1].0 as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_prefers_first_on_ties() {
        assert_eq!(argmax(&[0.0, 2.0, 2.0, 1.0]), 1);
    }

    #[test]
    fn top_p_restricts_to_the_nucleus() {
        let mut rng = StdRng::seed_from_u64(0);
        // token 2 holds ~88% of the mass; with top_p 0.5 only it may be drawn
        let logits = [0.0, 1.0, 3.0, 0.5];
        for _ in 0..200 {
            assert_eq!(sample(&logits, 1.0, 0.5, &mut rng), 2);
        }
        // with top_p 1 every token is drawn eventually
        let mut seen = [false; 4];
        for _ in 0..2000 {
            seen[sample(&logits, 1.0, 1.0, &mut rng) as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
    }
}
