//! Per-request compute budgets: a request's `skip` (the fraction of routed parameters to skip,
//! `0` for dense) becomes one shift of every router's SKIP logit, read off a table measured at
//! start-up: the realised skip at a grid of shifts on a few sequences of text, interpolated.
//! The engine applies each sequence's shift to its own rows
//! ([`skipgpt_model::engine::sparse_forward_shifted`]), so requests of every budget share one
//! engine call.

use anyhow::Result;
use burn::tensor::backend::Backend;
use skipgpt_data::PackedDataset;
use skipgpt_eval::calibrate::realised_skip;
use skipgpt_model::{LlamaForCausalLM, Routing, SparsityUnit, Tokenizer};

/// Shifts at which the realised skip is measured.
const GRID: [f64; 11] = [-8.0, -4.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 4.0, 8.0];

/// The calibration table.
pub struct Budgets {
    /// (shift, realised skip), the skip growing with the shift.
    table: Vec<(f64, f64)>,
}

impl Budgets {
    /// No table: every request runs the model's own routing, or dense with `skip: 0`.
    pub fn fixed() -> Self {
        Budgets { table: Vec::new() }
    }

    /// Measures the table on four 128-token sequences of the built-in corpus, the text the
    /// server and `chat` calibrate on.
    pub fn calibrate_on_builtin<B: Backend>(
        model: &LlamaForCausalLM<B>,
        tokenizer: &Tokenizer,
    ) -> Result<Self> {
        let docs = skipgpt_data::synthetic_corpus(32, 0);
        let mut data = skipgpt_data::pack(&docs, tokenizer, 128, None)?;
        data.sequences.truncate(4);
        Self::calibrate(model, &data)
    }

    /// Measures the table on `data` (parameters skipped, deterministic routing).
    pub fn calibrate<B: Backend>(
        model: &LlamaForCausalLM<B>,
        data: &PackedDataset,
    ) -> Result<Self> {
        let mut table = Vec::new();
        for &shift in &GRID {
            let shifted = model.clone().shift_router_biases(shift);
            let (skip, _) = realised_skip(&shifted, data, SparsityUnit::Params, 4)?;
            table.push((shift, skip));
        }
        Ok(Budgets { table })
    }

    /// The skip fractions the table spans (requests are clamped into them).
    pub fn range(&self) -> Option<(f64, f64)> {
        Some((self.table.first()?.1, self.table.last()?.1))
    }

    /// The shift of the SKIP logits a request's budget asks for: none for the model's own
    /// routing (or without a table), `-inf` (every module runs) for dense.
    pub fn shift(&self, skip: Option<f64>) -> f64 {
        match skip {
            None => 0.0,
            Some(s) if s <= 0.0 => f64::NEG_INFINITY,
            Some(_) if self.table.is_empty() => 0.0,
            Some(s) => self.shift_for(s),
        }
    }

    /// The bias shift whose realised skip is `skip`, interpolated in the table.
    fn shift_for(&self, skip: f64) -> f64 {
        let t = &self.table;
        let Some(i) = t.iter().position(|&(_, s)| s >= skip) else {
            return t.last().map_or(0.0, |p| p.0);
        };
        if i == 0 {
            return t[0].0;
        }
        let ((x0, y0), (x1, y1)) = (t[i - 1], t[i]);
        if y1 <= y0 {
            x1
        } else {
            x0 + (skip - y0) / (y1 - y0) * (x1 - x0)
        }
    }
}

/// How a model's calls route: its own mode when it has routers (each sequence's budget a shift
/// on top), else dense.
pub fn routing_of<B: Backend>(model: &LlamaForCausalLM<B>) -> Routing {
    match model.routing_config {
        Some(_) => model.routing,
        None => Routing::Dense,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_interpolates_between_measured_shifts() {
        let b = Budgets {
            table: vec![(-1.0, 0.1), (0.0, 0.2), (1.0, 0.4)],
        };
        assert!(
            (b.shift(Some(0.3)) - 0.5).abs() < 1e-12,
            "halfway between 0.2 and 0.4"
        );
        assert_eq!(
            b.shift(Some(0.05)),
            -1.0,
            "below the table: its first shift"
        );
        assert_eq!(b.shift(Some(0.9)), 1.0, "above: its last");
        assert_eq!(b.shift(Some(0.0)), f64::NEG_INFINITY);
        assert_eq!(b.shift(None), 0.0);
        assert_eq!(
            Budgets::fixed().shift(Some(0.3)),
            0.0,
            "no table: the model's own"
        );
        assert_eq!(b.range(), Some((0.1, 0.4)));
    }
}
