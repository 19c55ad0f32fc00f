//! Measured speed through the sparse engine: prefill of one prompt and greedy decode, as
//! tokens per second (median of repeats after a warm-up), with the engine's own account of
//! what was skipped; and a routed model's speedup over its own dense run, timed in
//! alternation. The real-model demo and `bench_real` measure with these.

use std::time::Instant;

use burn::tensor::backend::Backend;
use skipgpt_model::engine::{generate_sparse, sparse_forward, EngineStats, LogitRows, SparseCache};
use skipgpt_model::{GenerateOptions, LlamaForCausalLM, Result, Routing, Sampling};

/// Median wall time (seconds) of `n` runs after one warm-up ([`median`]). `f` must wait for its results
/// (read them back), so that asynchronous GPU backends are timed to completion.
pub fn median_seconds(n: usize, f: impl FnMut()) -> f64 {
    median(timed_runs(n, f))
}

/// The wall times (seconds) of `n` runs (at least one) after one warm-up.
pub fn timed_runs(n: usize, mut f: impl FnMut()) -> Vec<f64> {
    f();
    (0..n.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect()
}

/// A measured rate and what the engine did meanwhile (from the last repeat).
#[derive(Debug, Clone)]
pub struct Throughput {
    /// The median over the repeats.
    pub tokens_per_s: f64,
    /// The slowest and the fastest repeat.
    pub range: (f64, f64),
    pub stats: EngineStats,
}

impl Throughput {
    /// `tokens` per run over the runs' times.
    fn of(tokens: usize, seconds: Vec<f64>, stats: EngineStats) -> Self {
        let rates: Vec<f64> = seconds.iter().map(|s| tokens as f64 / s).collect();
        let lo = rates.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = rates.iter().copied().fold(0.0, f64::max);
        Throughput {
            tokens_per_s: median(rates),
            range: (lo, hi),
            stats,
        }
    }
}

/// Prefill of `prompt` as one sequence, every position through the model, the last row of
/// logits read back.
pub fn prefill_speed<B: Backend>(
    model: &LlamaForCausalLM<B>,
    prompt: &[u32],
    routing: Routing,
    repeats: usize,
) -> Result<Throughput> {
    let batch = [prompt.to_vec()];
    let mut stats = Ok(EngineStats::default());
    let seconds = timed_runs(repeats, || stats = prefill_once(model, &batch, routing));
    Ok(Throughput::of(prompt.len(), seconds, stats?))
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
    let opts = greedy(new_tokens);
    let mut stats = Ok(EngineStats::default());
    let seconds = timed_runs(repeats, || {
        stats = generate_sparse(model, prompts, &opts, routing).map(|(_, s, _)| s);
    });
    Ok(Throughput::of(prompts.len() * new_tokens, seconds, stats?))
}

/// One prefill of `batch` through the engine into a fresh cache, its last logits read back
/// (so that asynchronous backends are timed to completion).
fn prefill_once<B: Backend>(
    model: &LlamaForCausalLM<B>,
    batch: &[Vec<u32>],
    routing: Routing,
) -> Result<EngineStats> {
    let mut cache = SparseCache::new(batch.len(), model.config.num_hidden_layers);
    let out = sparse_forward(model, batch, &mut cache, routing, LogitRows::Last)?;
    let _ = out.logits.into_data();
    Ok(out.stats)
}

/// Greedy decoding of exactly `new_tokens` per sequence (end-of-sequence tokens ignored).
fn greedy(new_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: new_tokens,
        sampling: Sampling::Greedy,
        eos_token_ids: vec![],
        ignore_eos: true,
    }
}

/// A routed model's speedup over the same model with every module executing
/// (`Routing::Dense`), each figure the median over pairs of runs timed back to back.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairedSpeedup {
    /// Dense time / routed time of one prefill.
    pub prefill: f64,
    /// Dense time / routed time of one greedy decode.
    pub decode: f64,
    pub pairs: usize,
}

/// Times `routing` against `Routing::Dense` on the same model, `pairs` times each, in
/// alternation: the prefill of `prompt` and a greedy decode of `new_tokens` after each of
/// `prompts`. On a shared machine whose speed drifts from minute to minute, separate runs of
/// the two put the drift into their ratio; runs seconds apart share it.
pub fn paired_speedup<B: Backend>(
    model: &LlamaForCausalLM<B>,
    prompt: &[u32],
    prompts: &[Vec<u32>],
    new_tokens: usize,
    routing: Routing,
    pairs: usize,
) -> Result<PairedSpeedup> {
    let batch = [prompt.to_vec()];
    let prefill = |routing: Routing| prefill_once(model, &batch, routing).map(|_| ());
    let opts = greedy(new_tokens);
    let decode = |routing: Routing| -> Result<()> {
        generate_sparse(model, prompts, &opts, routing).map(|_| ())
    };
    Ok(PairedSpeedup {
        prefill: paired_ratio(pairs, || prefill(Routing::Dense), || prefill(routing))?,
        decode: paired_ratio(pairs, || decode(Routing::Dense), || decode(routing))?,
        pairs: pairs.max(1),
    })
}

/// Median over `pairs` of time(`base`) / time(`other`), the two timed back to back after a
/// warm-up of each; every other pair runs `other` first, so that a steady drift of the
/// machine's speed favours neither.
pub fn paired_ratio(
    pairs: usize,
    mut base: impl FnMut() -> Result<()>,
    mut other: impl FnMut() -> Result<()>,
) -> Result<f64> {
    let time = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        let t = Instant::now();
        f()?;
        Ok(t.elapsed().as_secs_f64())
    };
    base()?;
    other()?;
    let mut ratios = Vec::with_capacity(pairs.max(1));
    for k in 0..pairs.max(1) {
        let (b, o) = if k % 2 == 0 {
            let b = time(&mut base)?;
            (b, time(&mut other)?)
        } else {
            let o = time(&mut other)?;
            (time(&mut base)?, o)
        };
        ratios.push(b / o);
    }
    Ok(median(ratios))
}

/// Peak resident memory of this process so far (Linux `VmHWM`), in MB; `None` elsewhere.
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// The median (the mean of the middle two for an even count); NaN for none.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => v[n / 2],
        _ => 0.5 * (v[n / 2 - 1] + v[n / 2]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(vec![]).is_nan());
    }

    fn pause(ms: u64) {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }

    #[test]
    fn pairs_alternate_which_side_runs_first_after_a_warm_up_of_each() {
        let calls = RefCell::new(String::new());
        let ratio = paired_ratio(
            3,
            || {
                calls.borrow_mut().push('b');
                pause(30);
                Ok(())
            },
            || {
                calls.borrow_mut().push('o');
                pause(10);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(
            calls.into_inner(),
            "bo" /* warm-up */
                .to_owned()
                + "bo"
                + "ob"
                + "bo"
        );
        // time(base) / time(other): 30 ms against 10 ms, give or take the sleeps' overshoot
        assert!(ratio > 2.0 && ratio < 3.5, "{ratio}");
    }

    #[test]
    fn a_failing_run_fails_the_measurement() {
        let err = paired_ratio(
            2,
            || Ok(()),
            || Err(skipgpt_model::ModelError::InvalidInput("no routers".into())),
        );
        assert!(err.is_err());
    }
}
