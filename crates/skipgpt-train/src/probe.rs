//! One stage-1 step taken apart: the loss and the routers' gradients on a fixed batch with
//! fixed Gumbel noise. Two backends must agree on them; the wgpu parity test and
//! `examples/gpu_check` compare each backend's against the CPU's.

use burn::tensor::backend::AutodiffBackend;
use skipgpt_model::LlamaForCausalLM;

use crate::loader::LmBatch;
use crate::loss::SparsityLossConfig;
use crate::step::{LmTrainer, Objective};

/// Stage 1's loss (α 8, target 25%, Gumbel temperature 3, noise seed 7) on `sequences`, and
/// the gradient of every router's output weight (`fc2`), attention's then the MLP's, layer by
/// layer. The base is frozen here, as stage 1 freezes it.
///
/// # Panics
/// When `model` has no routers.
pub fn router_gradients<B: AutodiffBackend>(
    model: LlamaForCausalLM<B>,
    sequences: &[Vec<u32>],
    device: &B::Device,
) -> (f32, Vec<f32>) {
    let seqs: Vec<&[u32]> = sequences.iter().map(Vec::as_slice).collect();
    let batch = LmBatch {
        temperature: 3.0,
        noise_seed: 7,
        ..LmBatch::<B>::from_sequences(&seqs, device)
    };
    let trainer = LmTrainer::new(
        model.freeze_base(),
        Objective::Sparsity(SparsityLossConfig::new().with_alpha(8.0).with_target(0.25)),
    );
    let (loss, _) = trainer.forward_loss(&batch, true);
    let grads = loss.backward();
    let values = |t: burn::tensor::Tensor<B::InnerBackend, 1>| t.into_data().to_vec::<f32>();
    let loss = values(loss.inner()).expect("an f32 loss")[0];
    let mut g = Vec::new();
    for layer in &trainer.model.model.layers {
        for router in [&layer.attn_router, &layer.mlp_router] {
            let w = &router.as_ref().expect("a routed model").fc2.weight;
            let grad = w.grad(&grads).expect("router weight has a gradient");
            let n = grad.dims().iter().product::<usize>();
            g.extend(values(grad.reshape([n])).expect("f32 gradients"));
        }
    }
    (loss, g)
}
