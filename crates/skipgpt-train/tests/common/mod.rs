//! Helpers shared by the training tests.
#![allow(dead_code)]

use burn::tensor::backend::Backend;
use skipgpt_model::LlamaForCausalLM;

/// Every router tensor of a model (as its checkpoint stores them, f32), flattened in name order.
pub fn router_values<B: Backend>(model: &LlamaForCausalLM<B>) -> Vec<f32> {
    model
        .export_routers()
        .values()
        .flat_map(|t| {
            t.bytes()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// max |a - b| over two equally long slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
}
