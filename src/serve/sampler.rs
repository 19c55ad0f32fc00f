//! Choosing each request's next token from its row of logits, with the OpenAI API's sampling
//! parameters plus the ones llama.cpp's and vLLM's servers add (`top_k`, `min_p`,
//! `repetition_penalty`). Order, as those servers apply it: logit bias, penalties, then greedy
//! at temperature 0, else temperature, top-k, top-p and min-p, and a draw from a generator
//! seeded per request.

use std::collections::HashMap;

use rand::{rngs::StdRng, Rng, SeedableRng};
use skipgpt_model::generate::argmax;

/// One request's sampling parameters, already checked ([`super::api`]).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 picks the most likely token.
    pub temperature: f32,
    pub top_p: f32,
    /// 0: no limit.
    pub top_k: usize,
    pub min_p: f32,
    pub seed: u64,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Over the prompt and the answer: logits of tokens seen are divided (positive) or
    /// multiplied (negative) by it, as transformers does; 1 leaves them.
    pub repetition_penalty: f32,
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: 0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
        }
    }
}

/// A request's sampler: its parameters, its generator and the tokens it has seen.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Tokens of the answer so far, with their counts (presence and frequency penalties).
    generated: HashMap<u32, usize>,
    /// Tokens of the prompt and the answer (repetition penalty).
    seen: std::collections::HashSet<u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        Sampler {
            rng: StdRng::seed_from_u64(params.seed),
            params,
            generated: HashMap::new(),
            seen: prompt.iter().copied().collect(),
        }
    }

    /// The next token from `logits` (modified in place), remembered for the penalties.
    pub fn next(&mut self, logits: &mut [f32]) -> u32 {
        self.adjust(logits);
        let token = if self.params.temperature == 0.0 {
            argmax(logits)
        } else {
            self.draw(logits)
        };
        *self.generated.entry(token).or_default() += 1;
        self.seen.insert(token);
        token
    }

    /// Logit bias and the penalties.
    fn adjust(&self, logits: &mut [f32]) {
        let p = &self.params;
        for &(id, bias) in &p.logit_bias {
            if let Some(l) = logits.get_mut(id as usize) {
                *l += bias;
            }
        }
        if p.repetition_penalty != 1.0 {
            for &id in &self.seen {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&id, &count) in &self.generated {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l -= p.frequency_penalty * count as f32 + p.presence_penalty;
                }
            }
        }
    }

    /// A draw at the temperature among the tokens top-k, top-p and min-p keep.
    fn draw(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        order.sort_unstable_by(|&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        if p.top_k > 0 {
            order.truncate(p.top_k);
        }
        let top = logits[order[0] as usize];
        let mut probs: Vec<f64> = order
            .iter()
            .map(|&i| (((logits[i as usize] - top) / p.temperature) as f64).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= total);
        // top-p: the smallest head whose probability reaches it; min-p: those at least min_p
        // times as likely as the most likely
        let mut kept = 0;
        let mut mass = 0.0;
        while kept < probs.len() {
            if kept > 0 && (mass >= p.top_p as f64 || probs[kept] < p.min_p as f64 * probs[0]) {
                break;
            }
            mass += probs[kept];
            kept += 1;
        }
        let mut u = self.rng.random::<f64>() * mass;
        for (k, &pr) in probs[..kept].iter().enumerate() {
            if u < pr {
                return order[k];
            }
            u -= pr;
        }
        order[kept - 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            ..Default::default()
        }
    }

    #[test]
    fn temperature_zero_is_greedy_and_bias_and_penalties_move_it() {
        let mut s = Sampler::new(params(0.0), &[]);
        assert_eq!(s.next(&mut [0.0, 3.0, 1.0]), 1);
        let mut biased = Sampler::new(
            SamplingParams {
                logit_bias: vec![(2, 5.0)],
                ..params(0.0)
            },
            &[],
        );
        assert_eq!(biased.next(&mut [0.0, 3.0, 1.0]), 2);
        let mut repeated = Sampler::new(
            SamplingParams {
                frequency_penalty: 2.5,
                ..params(0.0)
            },
            &[],
        );
        assert_eq!(repeated.next(&mut [0.0, 3.0, 1.0]), 1);
        assert_eq!(repeated.next(&mut [0.0, 3.0, 1.0]), 2, "3 − 2.5 < 1");
        let mut prompt_seen = Sampler::new(
            SamplingParams {
                repetition_penalty: 4.0,
                ..params(0.0)
            },
            &[1],
        );
        assert_eq!(prompt_seen.next(&mut [0.0, 3.0, 1.0]), 2, "3 / 4 < 1");
    }

    #[test]
    fn draws_are_seeded_and_keep_to_top_k_top_p_and_min_p() {
        let logits = [2.0f32, 1.9, 1.8, -5.0, -6.0];
        let draw = |p: SamplingParams| -> Vec<u32> {
            let mut s = Sampler::new(p, &[]);
            (0..200).map(|_| s.next(&mut logits.clone())).collect()
        };
        let plain = draw(SamplingParams {
            seed: 7,
            ..params(1.0)
        });
        assert_eq!(
            plain,
            draw(SamplingParams {
                seed: 7,
                ..params(1.0)
            })
        );
        assert_ne!(
            plain,
            draw(SamplingParams {
                seed: 8,
                ..params(1.0)
            })
        );
        let top_k = draw(SamplingParams {
            top_k: 2,
            ..params(1.0)
        });
        assert!(top_k.iter().all(|&t| t < 2) && top_k.contains(&1));
        let top_p = draw(SamplingParams {
            top_p: 0.5,
            ..params(1.0)
        });
        assert!(top_p.iter().all(|&t| t < 2), "the first two hold over half");
        let min_p = draw(SamplingParams {
            min_p: 0.5,
            ..params(1.0)
        });
        assert!(min_p.iter().all(|&t| t < 3) && min_p.contains(&2));
    }
}
