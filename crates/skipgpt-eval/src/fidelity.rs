//! How closely a routed model behaves like its dense original, where nobody trained it.
//!
//! Perplexity on the training domain can hide a broken model (a LoRA adapter learns the
//! corpus); these measures compare the model with the dense model itself:
//! - [`compare_on_text`]: on packed text, the mean KL(dense ‖ routed) of the next-token
//!   distributions, top-1 agreement, and both perplexities;
//! - [`compare_generations`]: on prompts, both models' greedy answers; the routed model's top-1
//!   agreement with the dense answer when fed that answer (teacher forcing), and how repetitive
//!   each answer is ([`repetition`], [`loops`]).

use burn::tensor::{activation, backend::Backend, Tensor};
use serde::{Deserialize, Serialize};
use skipgpt_data::PackedDataset;
use skipgpt_model::engine::{generate_sparse, sparse_forward, LogitRows, SparseCache};
use skipgpt_model::{GenerateOptions, LlamaForCausalLM, Routing, Sampling};

use crate::{batch_ids, host_f64, Result};

/// A model and how it routes: the routed candidate or its dense reference.
pub struct Served<'a, B: Backend> {
    pub model: &'a LlamaForCausalLM<B>,
    pub routing: Routing,
}

// by hand: a derive would ask the backend type itself to be `Copy`
impl<B: Backend> Clone for Served<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B: Backend> Copy for Served<'_, B> {}

/// What [`compare_on_text`] measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextFidelity {
    /// Predicted tokens.
    pub tokens: usize,
    /// Mean KL(dense ‖ routed) per token, in nats.
    pub kl: f64,
    /// Fraction of positions where both models' most likely next token is the same.
    pub agreement: f64,
    pub perplexity: f64,
    pub dense_perplexity: f64,
    /// `perplexity / dense_perplexity`.
    pub perplexity_ratio: f64,
    /// Fractions of (token, layer) attention and MLP executions the routed model skipped, and
    /// of the decoder's per-token parameters.
    pub attn_skip: f64,
    pub mlp_skip: f64,
    pub param_skip: f64,
}

/// Runs both models over every sequence (inputs `seq[..n]`, targets `seq[1..]`) through the
/// sparse engine and compares their next-token distributions position by position.
pub fn compare_on_text<B: Backend>(
    routed: Served<'_, B>,
    dense: Served<'_, B>,
    data: &PackedDataset,
    batch_size: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<TextFidelity> {
    let device = routed.model.device();
    let t = data.seq_len;
    let (mut kl, mut agree, mut nll, mut dense_nll, mut tokens) = (0.0, 0.0, 0.0, 0.0, 0usize);
    let (mut attn_skipped, mut mlp_skipped) = (0usize, 0usize);
    for (done, chunk) in data.sequences.chunks(batch_size.max(1)).enumerate() {
        let b = chunk.len();
        let inputs: Vec<Vec<u32>> = chunk.iter().map(|s| s[..t].to_vec()).collect();
        let targets = batch_ids::<B>(chunk, t + 1, &device)
            .slice([0..b, 1..t + 1])
            .reshape([b * t, 1]);
        let (log_q, skipped) = log_probs(routed, &inputs)?;
        let (log_p, _) = log_probs(dense, &inputs)?;
        attn_skipped += skipped.0;
        mlp_skipped += skipped.1;
        kl += sum((log_p.clone().exp() * (log_p.clone() - log_q.clone())).sum());
        let same = log_q.clone().argmax(1).equal(log_p.clone().argmax(1));
        agree += sum(same.float().sum());
        nll -= sum(log_q.gather(1, targets.clone()).sum());
        dense_nll -= sum(log_p.gather(1, targets).sum());
        tokens += b * t;
        progress((done * batch_size + b).min(data.len()), data.len());
    }
    let n = tokens.max(1) as f64;
    let (perplexity, dense_perplexity) = ((nll / n).exp(), (dense_nll / n).exp());
    let decisions = n * routed.model.config.num_hidden_layers as f64;
    let (attn_skip, mlp_skip) = (
        attn_skipped as f64 / decisions,
        mlp_skipped as f64 / decisions,
    );
    let (pa, pm) = (
        routed.model.config.attention_params() as f64,
        routed.model.config.mlp_params() as f64,
    );
    Ok(TextFidelity {
        attn_skip,
        mlp_skip,
        param_skip: (pa * attn_skip + pm * mlp_skip) / (pa + pm),
        tokens,
        kl: kl / n,
        agreement: agree / n,
        perplexity,
        dense_perplexity,
        perplexity_ratio: perplexity / dense_perplexity,
    })
}

/// `[rows, vocab]` log-probabilities of every position of every sequence, and how many
/// (token, layer) attention and MLP executions were skipped.
fn log_probs<B: Backend>(
    served: Served<'_, B>,
    inputs: &[Vec<u32>],
) -> Result<(Tensor<B, 2>, (usize, usize))> {
    let layers = served.model.config.num_hidden_layers;
    let mut cache = SparseCache::new(inputs.len(), layers);
    let out = sparse_forward(
        served.model,
        inputs,
        &mut cache,
        served.routing,
        LogitRows::All,
    )?;
    let skipped = |gates: &[Vec<bool>]| gates.iter().flatten().filter(|&&run| !run).count();
    let counts = (skipped(&out.attn_gates), skipped(&out.mlp_gates));
    Ok((activation::log_softmax(out.logits, 1), counts))
}

fn sum<B: Backend>(t: Tensor<B, 1>) -> f64 {
    host_f64(t)[0]
}

/// One prompt's answers and how they compare.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnswerPair {
    pub dense: Vec<u32>,
    pub routed: Vec<u32>,
    /// The routed model's top-1 agreement with the dense answer, fed that answer.
    pub agreement: f64,
    pub dense_repetition: f64,
    pub routed_repetition: f64,
    pub dense_loops: bool,
    pub routed_loops: bool,
}

/// What [`compare_generations`] measured, over every prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationFidelity {
    pub prompts: usize,
    /// Answer tokens the agreement is counted over (the dense answers' lengths).
    pub tokens: usize,
    /// Top-1 agreement with the dense answers, pooled over their tokens.
    pub agreement: f64,
    /// Mean [`repetition`] of the answers.
    pub dense_repetition: f64,
    pub routed_repetition: f64,
    /// Answers that end in a loop ([`loops`]).
    pub dense_loops: usize,
    pub routed_loops: usize,
    pub answers: Vec<AnswerPair>,
}

/// Greedy answers of both models to every prompt (`max_new_tokens` at most, stopping at
/// `eos`), then the routed model run over each prompt followed by the dense answer: at every
/// answer position, does its most likely token equal the dense model's choice?
pub fn compare_generations<B: Backend>(
    routed: Served<'_, B>,
    dense: Served<'_, B>,
    prompts: &[Vec<u32>],
    max_new_tokens: usize,
    eos: &[u32],
    batch_size: usize,
) -> Result<GenerationFidelity> {
    let opts = GenerateOptions {
        max_new_tokens,
        sampling: Sampling::Greedy,
        eos_token_ids: eos.to_vec(),
        ignore_eos: false,
    };
    let mut answers = Vec::with_capacity(prompts.len());
    for batch in prompts.chunks(batch_size.max(1)) {
        let (dense_answers, _, _) = generate_sparse(dense.model, batch, &opts, dense.routing)?;
        let (routed_answers, _, _) = generate_sparse(routed.model, batch, &opts, routed.routing)?;
        let agreements = forced_agreement(routed, batch, &dense_answers)?;
        for ((d, r), (hits, _)) in dense_answers
            .into_iter()
            .zip(routed_answers)
            .zip(agreements)
        {
            answers.push(AnswerPair {
                agreement: hits as f64 / d.len().max(1) as f64,
                dense_repetition: repetition(&d, 4),
                routed_repetition: repetition(&r, 4),
                dense_loops: loops(&d),
                routed_loops: loops(&r),
                dense: d,
                routed: r,
            });
        }
    }
    let tokens: usize = answers.iter().map(|a| a.dense.len()).sum();
    let hits: f64 = answers
        .iter()
        .map(|a| a.agreement * a.dense.len() as f64)
        .sum();
    let mean = |f: fn(&AnswerPair) -> f64| {
        answers.iter().map(f).sum::<f64>() / answers.len().max(1) as f64
    };
    Ok(GenerationFidelity {
        prompts: answers.len(),
        tokens,
        agreement: hits / tokens.max(1) as f64,
        dense_repetition: mean(|a| a.dense_repetition),
        routed_repetition: mean(|a| a.routed_repetition),
        dense_loops: answers.iter().filter(|a| a.dense_loops).count(),
        routed_loops: answers.iter().filter(|a| a.routed_loops).count(),
        answers,
    })
}

/// Per prompt: (answer positions where `served`'s top-1 equals the answer's token, positions).
fn forced_agreement<B: Backend>(
    served: Served<'_, B>,
    prompts: &[Vec<u32>],
    answers: &[Vec<u32>],
) -> Result<Vec<(usize, usize)>> {
    // each sequence is its prompt and all of its answer but the last token, whose successor
    // nobody predicts; the rows of sequence s follow those of the sequences before it
    let inputs: Vec<Vec<u32>> = prompts
        .iter()
        .zip(answers)
        .map(|(p, a)| {
            let mut s = p.clone();
            s.extend_from_slice(&a[..a.len().saturating_sub(1)]);
            s
        })
        .collect();
    let layers = served.model.config.num_hidden_layers;
    let mut cache = SparseCache::new(inputs.len(), layers);
    let out = sparse_forward(
        served.model,
        &inputs,
        &mut cache,
        served.routing,
        LogitRows::All,
    )?;
    let top: Vec<f64> = host_f64(out.logits.argmax(1).float().reshape([-1]));
    let mut row = 0;
    let mut result = Vec::with_capacity(inputs.len());
    for ((input, prompt), answer) in inputs.iter().zip(prompts).zip(answers) {
        // the row predicting answer[i] is the one at position prompt.len() - 1 + i
        let first = row + prompt.len() - 1;
        let hits = answer
            .iter()
            .enumerate()
            .filter(|&(i, &tok)| top[first + i] as u32 == tok)
            .count();
        result.push((hits, answer.len()));
        row += input.len();
    }
    Ok(result)
}

/// The fraction of a sequence's `n`-grams that repeat an earlier one: 0 when every `n`-gram
/// is new, towards 1 when the text goes round in circles (0 for fewer than `n` tokens).
pub fn repetition(tokens: &[u32], n: usize) -> f64 {
    if n == 0 || tokens.len() < n {
        return 0.0;
    }
    let grams: Vec<&[u32]> = tokens.windows(n).collect();
    let distinct: std::collections::HashSet<&[u32]> = grams.iter().copied().collect();
    1.0 - distinct.len() as f64 / grams.len() as f64
}

/// The longest cycle [`loops`] looks for, in tokens.
pub const LOOP_MAX_PERIOD: usize = 16;
/// How many times a cycle must repeat back to back at the end for [`loops`].
pub const LOOP_REPEATS: usize = 3;

/// Whether a sequence ends stuck in a cycle: its last tokens are some stretch of at most
/// [`LOOP_MAX_PERIOD`] tokens repeated [`LOOP_REPEATS`] times back to back, and at least 12
/// tokens in all (so that "1. 2. 3." style lists of short items are not counted).
pub fn loops(tokens: &[u32]) -> bool {
    (1..=LOOP_MAX_PERIOD).any(|period| {
        let span = (period * LOOP_REPEATS).max(12);
        span <= tokens.len() && {
            let tail = &tokens[tokens.len() - span..];
            (period..span).all(|i| tail[i] == tail[i - period])
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use skipgpt_model::{LlamaConfig, RouterInit, RoutingConfig};

    type B = burn::backend::NdArray<f32>;

    /// A tiny random model whose routers execute everything (`margin` > 0) or skip
    /// everything (`margin` < 0), whatever the token.
    fn routed_tiny(margin: f64) -> LlamaForCausalLM<B> {
        LlamaConfig::tiny(64)
            .init::<B>(&Default::default())
            .with_new_routers_from(RoutingConfig::new(), RouterInit::Execute { margin })
    }

    fn text() -> PackedDataset {
        PackedDataset {
            seq_len: 12,
            sequences: (0..3u32)
                .map(|s| (0..13).map(|i| (s * 17 + i * 5) % 64).collect())
                .collect(),
        }
    }

    #[test]
    fn a_model_that_executes_everything_is_its_own_dense_model() {
        let model = routed_tiny(3.0);
        let routed = Served {
            model: &model,
            routing: Routing::Deterministic,
        };
        let dense = Served {
            model: &model,
            routing: Routing::Dense,
        };
        let text = compare_on_text(routed, dense, &text(), 2, |_, _| {}).unwrap();
        assert_eq!(text.tokens, 36);
        assert!(text.kl.abs() < 1e-6, "{}", text.kl);
        assert_eq!(text.agreement, 1.0);
        assert!((text.perplexity_ratio - 1.0).abs() < 1e-5);
        assert_eq!(
            (text.attn_skip, text.mlp_skip, text.param_skip),
            (0.0, 0.0, 0.0)
        );
        let prompts = vec![vec![1, 2, 3], vec![4, 5, 6, 7, 8]];
        let gens = compare_generations(routed, dense, &prompts, 10, &[], 2).unwrap();
        assert_eq!((gens.prompts, gens.tokens), (2, 20));
        assert_eq!(gens.agreement, 1.0);
        for a in &gens.answers {
            assert_eq!(a.dense, a.routed);
            assert_eq!(a.dense_repetition, a.routed_repetition);
        }
    }

    #[test]
    fn skipping_every_module_diverges_by_the_kl_of_the_two_forward_passes() {
        let model = routed_tiny(-3.0);
        let served = |routing| Served {
            model: &model,
            routing,
        };
        let data = text();
        let got = compare_on_text(
            served(Routing::Deterministic),
            served(Routing::Dense),
            &data,
            3,
            |_, _| {},
        )
        .unwrap();
        // the same numbers from the gated forward pass (no engine), in f64 on the host
        let ids = crate::batch_ids::<B>(&data.sequences, 12, &Default::default());
        let logits = |routing| {
            let l = model.forward_routed(ids.clone(), routing, false).logits;
            host_f64(activation::log_softmax(l, 2).reshape([36, 64]))
        };
        let (q, p) = (logits(Routing::Deterministic), logits(Routing::Dense));
        let (mut kl, mut agree) = (0.0, 0.0);
        let top = |row: &[f64]| (0..64).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap();
        for r in 0..36 {
            let (pr, qr) = (&p[r * 64..(r + 1) * 64], &q[r * 64..(r + 1) * 64]);
            kl += (0..64).map(|v| pr[v].exp() * (pr[v] - qr[v])).sum::<f64>();
            agree += f64::from(u8::from(top(pr) == top(qr)));
        }
        // a random model's layers add little to its residual stream, but not nothing
        assert!(
            kl / 36.0 > 1e-6,
            "skipping everything must change the model: {kl}"
        );
        let expected = kl / 36.0;
        assert!(
            (got.kl - expected).abs() < 1e-3 * expected,
            "{} against {expected}",
            got.kl
        );
        assert!((got.agreement - agree / 36.0).abs() < 1e-9);
        assert_eq!(
            (got.attn_skip, got.mlp_skip, got.param_skip),
            (1.0, 1.0, 1.0)
        );
    }

    #[test]
    fn repetition_counts_repeated_four_grams() {
        assert_eq!(repetition(&[1, 2, 3, 4, 5, 6, 7], 4), 0.0);
        // 1 2 3 4 1 2 3 4: 5 four-grams, 4 distinct (1234 twice)
        assert!((repetition(&[1, 2, 3, 4, 1, 2, 3, 4], 4) - 0.2).abs() < 1e-12);
        // one token over and over: every four-gram but the first repeats
        assert!((repetition(&[9; 10], 4) - 6.0 / 7.0).abs() < 1e-12);
        assert_eq!(repetition(&[1, 2, 3], 4), 0.0);
    }

    #[test]
    fn loops_finds_a_cycle_at_the_end_and_nothing_else() {
        let mut cycle: Vec<u32> = (0..20).collect();
        for _ in 0..3 {
            cycle.extend([100, 101, 102, 103, 104]);
        }
        assert!(loops(&cycle));
        assert!(loops(&[7; 12]));
        // too short to call a loop, or the cycle is broken at the very end
        assert!(!loops(&[7; 11]));
        let mut broken = cycle.clone();
        broken.push(999);
        assert!(!loops(&broken));
        let fresh: Vec<u32> = (0..64).collect();
        assert!(!loops(&fresh));
        // a cycle longer than LOOP_MAX_PERIOD is not looked for
        let long: Vec<u32> = (0..3)
            .flat_map(|_| 0..(LOOP_MAX_PERIOD as u32 + 1))
            .collect();
        assert!(!loops(&long));
    }
}
