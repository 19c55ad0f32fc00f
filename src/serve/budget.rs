//! Per-request compute budgets: a request's `skip` (the fraction of routed parameters to skip,
//! `0` for dense) becomes one shift of every router's SKIP bias, read off a table measured at
//! start-up: the realised skip at a grid of shifts on a few sequences of text, interpolated.
//! Each shift in use gets its own copy of the model (the weights are shared; only the routers'
//! biases differ), made when a request first asks for it.

use std::collections::HashMap;

use anyhow::Result;
use burn::tensor::backend::Backend;
use skipgpt_data::PackedDataset;
use skipgpt_eval::calibrate::realised_skip;
use skipgpt_model::{LlamaForCausalLM, Routing, SparsityUnit, Tokenizer};

/// Shifts at which the realised skip is measured.
const GRID: [f64; 11] = [-8.0, -4.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 4.0, 8.0];

/// The key of the model's own routing, and of dense.
const OWN: i64 = i64::MIN;
const DENSE: i64 = i64::MIN + 1;

/// The calibration table and the model copies made from it.
pub struct Budgets<B: Backend> {
    /// (shift, realised skip), the skip growing with the shift.
    table: Vec<(f64, f64)>,
    shifted: HashMap<i64, LlamaForCausalLM<B>>,
}

impl<B: Backend> Budgets<B> {
    /// No table: every request runs the model's own routing, or dense with `skip: 0`.
    pub fn fixed() -> Self {
        Budgets {
            table: Vec::new(),
            shifted: HashMap::new(),
        }
    }

    /// Measures the table on four 128-token sequences of the built-in corpus, the text the
    /// server and `chat` calibrate on.
    pub fn calibrate_on_builtin(
        model: &LlamaForCausalLM<B>,
        tokenizer: &Tokenizer,
    ) -> Result<Self> {
        let docs = skipgpt_data::synthetic_corpus(32, 0);
        let mut data = skipgpt_data::pack(&docs, tokenizer, 128, None)?;
        data.sequences.truncate(4);
        Self::calibrate(model, &data)
    }

    /// Measures the table on `data` (parameters skipped, deterministic routing).
    pub fn calibrate(model: &LlamaForCausalLM<B>, data: &PackedDataset) -> Result<Self> {
        let mut table = Vec::new();
        for &shift in &GRID {
            let shifted = model.clone().shift_router_biases(shift);
            let (skip, _) = realised_skip(&shifted, data, SparsityUnit::Params, 4)?;
            table.push((shift, skip));
        }
        Ok(Budgets {
            table,
            shifted: HashMap::new(),
        })
    }

    /// The skip fractions the table spans (requests are clamped into them).
    pub fn range(&self) -> Option<(f64, f64)> {
        Some((self.table.first()?.1, self.table.last()?.1))
    }

    /// The group a request's budget falls in.
    pub fn key(&self, skip: Option<f64>) -> i64 {
        match skip {
            None => OWN,
            Some(s) if s <= 0.0 => DENSE,
            Some(_) if self.table.is_empty() => OWN,
            Some(s) => (self.shift_for(s) * 1000.0).round() as i64,
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

    /// The model and routing a group runs with.
    pub fn model<'a>(
        &'a mut self,
        key: i64,
        base: &'a LlamaForCausalLM<B>,
    ) -> (&'a LlamaForCausalLM<B>, Routing) {
        match key {
            // a model without routers runs dense whatever its routing field says
            OWN if base.routing_config.is_none() => (base, Routing::Dense),
            OWN => (base, base.routing),
            DENSE => (base, Routing::Dense),
            _ => {
                let model = self
                    .shifted
                    .entry(key)
                    .or_insert_with(|| base.clone().shift_router_biases(key as f64 / 1000.0));
                (model, Routing::Deterministic)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_interpolates_between_measured_shifts() {
        let b: Budgets<burn::backend::NdArray<f32>> = Budgets {
            table: vec![(-1.0, 0.1), (0.0, 0.2), (1.0, 0.4)],
            shifted: HashMap::new(),
        };
        assert_eq!(b.key(Some(0.3)), 500);
        assert_eq!(b.key(Some(0.05)), -1000, "below the table: its first shift");
        assert_eq!(b.key(Some(0.9)), 1000, "above: its last");
        assert_eq!(b.key(Some(0.0)), DENSE);
        assert_eq!(b.key(None), OWN);
        assert_eq!(b.range(), Some((0.1, 0.4)));
    }
}
