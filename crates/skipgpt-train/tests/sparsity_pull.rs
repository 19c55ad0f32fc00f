//! The SkipGPT loss, the straight-through gates and a frozen base together pull the routers'
//! skip rate to the target, and leave every base weight bit-identical.

use burn::module::AutodiffModule;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::{Int, Tensor, TensorData};
use skipgpt_model::{LlamaConfig, Routing, RoutingConfig, StoreDtype};
use skipgpt_train::loss::{skipgpt_loss, SparsityLossConfig};

type B = burn::backend::Autodiff<burn::backend::NdArray<f32>>;

#[test]
fn router_tuning_reaches_the_target_and_keeps_the_base() {
    let device = Default::default();
    <B as burn::tensor::backend::Backend>::seed(&device, 5);
    let base = LlamaConfig::tiny(512).init::<B>(&device);
    let before = base.export(StoreDtype::F32);
    let mut model = base.with_new_routers(RoutingConfig::new()).freeze_base();
    let cfg = SparsityLossConfig::new().with_target(0.5);
    let mut optim = AdamWConfig::new().with_weight_decay(0.01).init();
    let (b, t, steps) = (4, 32, 80);
    let mut last = (0.0, 0.0);
    for step in 0..steps {
        let ids: Vec<i64> = (0..b * (t + 1))
            .map(|i| ((i * 7 + step * 13) % 500) as i64)
            .collect();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [b, t + 1]), &device);
        let inputs = ids.clone().slice([0..b, 0..t]);
        let targets = ids.slice([0..b, 1..t + 1]);
        let temperature = 5.0 - 4.0 * step as f64 / (steps - 1) as f64;
        let out = model.forward_routed(inputs, None, Routing::Gumbel { temperature }, false);
        let mask = Tensor::ones([b, t], &device);
        let parts = skipgpt_loss(
            &cfg,
            out.logits,
            targets,
            mask,
            &out.attn_gates,
            &out.mlp_gates,
        );
        let scalar = |x: Tensor<B, 1>| x.into_data().convert::<f32>().into_vec::<f32>().unwrap()[0];
        last = (
            scalar(parts.attn_skip.clone()),
            scalar(parts.mlp_skip.clone()),
        );
        let grads = GradientsParams::from_grads(parts.total.backward(), &model);
        // 10x the paper's 2e-3, so that 80 steps suffice
        model = optim.step(2e-2, model, grads);
    }
    let skip = (last.0 + last.1) / 2.0;
    eprintln!(
        "after {steps} steps: skip {skip:.3} (attention {:.3}, mlp {:.3})",
        last.0, last.1
    );
    assert!(
        (skip - 0.5).abs() < 0.1,
        "skip rate {skip} (attn {}, mlp {})",
        last.0,
        last.1
    );
    // the base is bit-identical
    let after = model.valid().export(StoreDtype::F32);
    assert_eq!(before.len(), after.len());
    for (name, tensor) in &before {
        assert!(tensor.bytes() == after[name].bytes(), "{name} changed");
    }
}
