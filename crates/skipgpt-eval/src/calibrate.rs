//! Router calibration: one shift of every router's SKIP bias so that deterministic routing
//! realises the skip target on calibration text.
//!
//! Stage 1 trains the routers with Gumbel noise and meets the target in expectation over
//! noisy gates; served deterministically (execute iff logit₀ > logit₁) the same routers skip
//! one or two points less on SmolLM2. One global shift closes that gap and keeps what the
//! routers learned: their ranking of tokens, and how they share skipping between layers and
//! between attention and the MLP. The shift is found by bisection on the realised skip rate,
//! measured through the sparse engine, so later layers see the routing of earlier ones.

use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};
use skipgpt_data::PackedDataset;
use skipgpt_model::engine::{sparse_forward, EngineStats, LogitRows, SparseCache};
use skipgpt_model::{LlamaForCausalLM, Routing, SparsityUnit};

use crate::error::{EvalError, Result};

/// What [`calibrate_routers`] did.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CalibrationReport {
    /// The skip rate aimed at, in `unit`.
    pub target: f64,
    pub unit: SparsityUnit,
    /// Tokens the skip rate was measured on.
    pub tokens: usize,
    /// Realised skip rate before and after (deterministic routing).
    pub skip_before: f64,
    pub skip_after: f64,
    /// The shift added to every router's SKIP logit bias.
    pub shift: f64,
    /// Passes over the calibration text.
    pub passes: usize,
}

/// Bisection stops when the realised rate is this close to the target.
const TOLERANCE: f64 = 5e-4;
/// At most this many passes over the calibration text.
const MAX_PASSES: usize = 24;

/// The realised skip rate of `model` on `data` (deterministic routing, through the sparse
/// engine), counted in `unit`, and the tokens it was measured on.
pub fn realised_skip<B: Backend>(
    model: &LlamaForCausalLM<B>,
    data: &PackedDataset,
    unit: SparsityUnit,
    batch_size: usize,
) -> Result<(f64, usize)> {
    let mut stats = EngineStats::default();
    let mut tokens = 0;
    for chunk in data.sequences.chunks(batch_size.max(1)) {
        let inputs: Vec<Vec<u32>> = chunk.iter().map(|s| s[..data.seq_len].to_vec()).collect();
        let mut cache = SparseCache::new(inputs.len(), model.config.num_hidden_layers);
        let out = sparse_forward(
            model,
            &inputs,
            &mut cache,
            Routing::Deterministic,
            LogitRows::Last,
        )?;
        stats.add(&out.stats);
        tokens += inputs.len() * data.seq_len;
    }
    let skipped = |executed: usize, total: usize| 1.0 - executed as f64 / total.max(1) as f64;
    let attn = skipped(stats.attn_executed, stats.attn_total);
    let mlp = skipped(stats.mlp_executed, stats.mlp_total);
    let share = unit.attn_share(&model.config).unwrap_or(0.5);
    Ok((share * attn + (1.0 - share) * mlp, tokens))
}

/// Shifts every router's SKIP bias by one amount so that `model` skips `target` (counted in
/// `unit`) of `data` under deterministic routing. `progress(pass, shift, skip)` is called
/// after each pass over the data.
pub fn calibrate_routers<B: Backend>(
    model: LlamaForCausalLM<B>,
    data: &PackedDataset,
    target: f64,
    unit: SparsityUnit,
    batch_size: usize,
    mut progress: impl FnMut(usize, f64, f64),
) -> Result<(LlamaForCausalLM<B>, CalibrationReport)> {
    if model.routing_config.is_none() {
        return Err(EvalError::Input(
            "the model has no routers to calibrate".into(),
        ));
    }
    if !(0.0..1.0).contains(&target) {
        return Err(EvalError::Input(format!(
            "calibration target {target}: expected a fraction in [0, 1)"
        )));
    }
    if data.is_empty() {
        return Err(EvalError::Input("no calibration sequences".into()));
    }
    let passes = std::cell::Cell::new(0);
    let mut measure = |shift: f64| -> Result<f64> {
        let shifted = model.clone().shift_router_biases(shift);
        let (skip, _) = realised_skip(&shifted, data, unit, batch_size)?;
        passes.set(passes.get() + 1);
        progress(passes.get(), shift, skip);
        Ok(skip)
    };
    let skip_before = measure(0.0)?;
    let tokens = data.len() * data.seq_len;
    // Bracket the target (the rate grows with the shift), widening by doubling, then bisect.
    let below = skip_before < target;
    let (mut lo, mut hi) = if below { (0.0, 1.0) } else { (-1.0, 0.0) };
    let mut closest = (0.0, skip_before);
    let nearer = |closest: (f64, f64), shift: f64, skip: f64| {
        if (skip - target).abs() < (closest.1 - target).abs() {
            (shift, skip)
        } else {
            closest
        }
    };
    if (skip_before - target).abs() > TOLERANCE {
        loop {
            let edge = if below { hi } else { lo };
            let skip = measure(edge)?;
            closest = nearer(closest, edge, skip);
            let past = if below {
                skip >= target
            } else {
                skip <= target
            };
            if past || passes.get() >= MAX_PASSES / 2 {
                break;
            }
            (lo, hi) = if below {
                (hi, hi * 2.0)
            } else {
                (lo * 2.0, lo)
            };
        }
        while (closest.1 - target).abs() > TOLERANCE && passes.get() < MAX_PASSES {
            let mid = 0.5 * (lo + hi);
            let skip = measure(mid)?;
            closest = nearer(closest, mid, skip);
            if skip < target {
                lo = mid;
            } else {
                hi = mid;
            }
        }
    }
    let (shift, skip_after) = closest;
    let report = CalibrationReport {
        target,
        unit,
        tokens,
        skip_before,
        skip_after,
        shift,
        passes: passes.get(),
    };
    Ok((model.shift_router_biases(shift), report))
}
