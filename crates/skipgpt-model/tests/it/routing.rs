//! SkipGPT routing: parity with the reference routed forward, gates, the straight-through
//! estimator, kv_policy = drop, and router checkpoints.

use std::path::Path;

use burn::module::Module;
use burn::tensor::{Tensor, TensorData};
use skipgpt_model::router::{straight_through_gate, Router};
use skipgpt_model::{
    generate, load_pretrained, save_pretrained, Granularity, KvPolicy, LlamaConfig,
    LlamaForCausalLM, MlpRouterInput, RouterInit, RouterVariant, Routing, RoutingConfig,
    StoreDtype,
};
use skipgpt_test_support::*;

/// `model-routed` with `skipgpt.json` choosing the MLP router input.
fn routed(mlp_router_input: MlpRouterInput) -> (tempfile::TempDir, LlamaForCausalLM<B>) {
    let dir = copy_dir(&tiny().join("model-routed"));
    let cfg = RoutingConfig::new().with_mlp_router_input(mlp_router_input);
    std::fs::write(dir.path().join("skipgpt.json"), cfg.to_json()).unwrap();
    let model = load_pretrained::<B>(dir.path(), &device()).unwrap().model;
    (dir, model)
}

fn check_routed(mode: &str, input: MlpRouterInput) {
    let (_dir, model) = routed(input);
    assert_eq!(model.routing, Routing::Deterministic);
    let r = reference(&tiny());
    let out = model.forward_full(ids_tensor(&r, "input_ids"), false);
    let d = diff_with(out.logits, &r, &format!("routed.{mode}.logits"));
    assert!(d < 1e-4, "{mode}: routed logits differ by {d}");
    for (name, gates) in [("attn_gates", out.attn_gates), ("mlp_gates", out.mlp_gates)] {
        assert_eq!(gates.len(), 3);
        let got = to_vec(Tensor::stack::<3>(gates, 0));
        let (expected, shape) = r.read_f32(&format!("routed.{mode}.{name}")).unwrap();
        assert_eq!(shape, vec![3, 2, 24]);
        assert_eq!(got, expected, "{mode}: {name}");
    }
    let got = generate(&model, &ids_rows(&r, "greedy_prompt"), &greedy(16)).unwrap();
    assert_eq!(
        got,
        ids_rows(&r, &format!("routed.{mode}.greedy_tokens")),
        "{mode}: greedy"
    );
}

#[test]
fn routed_post_attn_matches_reference() {
    check_routed("post_attn", MlpRouterInput::PostAttn);
}

#[test]
fn routed_block_input_matches_reference() {
    check_routed("block_input", MlpRouterInput::BlockInput);
}

#[test]
fn routers_load_with_defaults_without_skipgpt_json() {
    let model = load_pretrained::<B>(&tiny().join("model-routed"), &device())
        .unwrap()
        .model;
    assert_eq!(model.routing_config, Some(RoutingConfig::new()));
    assert_eq!(model.router_params(), 3 * 2 * (64 * 2 + 2));
}

#[test]
fn dense_mode_ignores_routers() {
    let (_dir, model) = routed(MlpRouterInput::PostAttn);
    let r = reference(&tiny());
    let out = model.forward_routed(ids_tensor(&r, "input_ids"), Routing::Dense, false);
    assert!(out.attn_gates.is_empty());
    assert!(diff_with(out.logits, &r, "logits") < 1e-4);
}

#[test]
fn straight_through_forward_is_hard_and_gradient_is_soft() {
    type AD = burn::backend::Autodiff<B>;
    let dev = device();
    let tau = 2.5;
    let z: Vec<f32> = vec![0.3, -0.2, 1.5, 1.4, -2.0, 0.7, 0.0, 0.05];
    let g: Vec<f32> = vec![0.1, 0.4, -0.3, 0.9, 0.2, -0.1, 0.5, 0.0];
    let logits =
        Tensor::<AD, 3>::from_data(TensorData::new(z.clone(), [1, 4, 2]), &dev).require_grad();
    let noise = Tensor::<AD, 3>::from_data(TensorData::new(g.clone(), [1, 4, 2]), &dev);
    let gate = straight_through_gate(logits.clone(), noise, tau);
    let weights =
        Tensor::<AD, 2>::from_data(TensorData::new(vec![1.0f32, 2.0, 3.0, 4.0], [1, 4]), &dev);
    let forward: Vec<f32> = gate
        .clone()
        .into_data()
        .convert::<f32>()
        .into_vec()
        .unwrap();
    let grads = (gate * weights).sum().backward();
    let grad: Vec<f32> = logits
        .grad(&grads)
        .unwrap()
        .into_data()
        .convert::<f32>()
        .into_vec()
        .unwrap();
    for i in 0..4 {
        let (a, b) = (z[2 * i] + g[2 * i], z[2 * i + 1] + g[2 * i + 1]);
        // forward: exactly 0 or 1, the argmax of the noisy logits
        assert_eq!(forward[i], if a > b { 1.0 } else { 0.0 }, "token {i}");
        // backward: d/dz of p0 = sigmoid((a - b) / τ), times the upstream weight (i + 1)
        let p0 = 1.0 / (1.0 + (-(a - b) / tau as f32).exp());
        let d = p0 * (1.0 - p0) / tau as f32 * (i + 1) as f32;
        assert!(
            (grad[2 * i] - d).abs() < 1e-6,
            "token {i}: {} vs {d}",
            grad[2 * i]
        );
        assert!(
            (grad[2 * i + 1] + d).abs() < 1e-6,
            "token {i}: {} vs {}",
            grad[2 * i + 1],
            -d
        );
    }
}

/// Token ids 0..512 as a batch of 8 sequences of 64.
fn ids_8x64() -> Tensor<B, 2, burn::tensor::Int> {
    Tensor::from_data(
        TensorData::new((0..512i64).collect::<Vec<_>>(), [8, 64]),
        &device(),
    )
}

/// The fraction of (token, layer, module) decisions that execute on [`ids_8x64`].
fn execute_rate(model: &LlamaForCausalLM<B>, routing: Routing) -> f32 {
    let out = model.forward_routed(ids_8x64(), routing, false);
    let gates: Vec<f32> = out
        .attn_gates
        .into_iter()
        .chain(out.mlp_gates)
        .flat_map(to_vec)
        .collect();
    gates.iter().sum::<f32>() / gates.len() as f32
}

#[test]
fn sampled_routing_follows_router_probabilities() {
    // A router whose logits favour EXECUTE by ln(3) executes ~75% of the time when sampling.
    let mut model = LlamaConfig::tiny(512)
        .init::<B>(&device())
        .with_new_routers(RoutingConfig::new());
    for layer in model.model.layers.iter_mut() {
        for r in [
            layer.attn_router.as_mut().unwrap(),
            layer.mlp_router.as_mut().unwrap(),
        ] {
            r.fc2.weight = burn::module::Param::from_tensor(r.fc2.weight.val().zeros_like());
            let bias = Tensor::from_data(TensorData::new(vec![3f32.ln(), 0.0], [2]), &device());
            r.fc2.bias = Some(burn::module::Param::from_tensor(bias));
        }
    }
    <B as burn::tensor::backend::Backend>::seed(&device(), 3);
    let rate = execute_rate(&model, Routing::Sample);
    assert!((rate - 0.75).abs() < 0.03, "execute rate {rate}");
    let det = model.forward_routed(ids_8x64(), Routing::Deterministic, false);
    assert!(det
        .attn_gates
        .into_iter()
        .flat_map(to_vec)
        .all(|g| g == 1.0));
}

/// Where new routers start: the paper's Kaiming start skips a large share of modules at random,
/// the execute-biased one runs every module deterministically and skips σ(-margin) of them
/// under the training noise, for both router variants.
#[test]
fn execute_biased_routers_start_from_the_dense_model() {
    for variant in [RouterVariant::Linear, RouterVariant::Mlp] {
        let routing = RoutingConfig::new().with_router(variant);
        <B as burn::tensor::backend::Backend>::seed(&device(), 5);
        let base = LlamaConfig::tiny(512).init::<B>(&device());
        let paper = base.clone().with_new_routers(routing.clone());
        let execute = base.with_new_routers_from(routing, RouterInit::Execute { margin: 3.0 });
        assert_eq!(execute_rate(&execute, Routing::Deterministic), 1.0);
        // training's hard Gumbel draw executes with probability σ(3) = 0.953
        let sampled = execute_rate(&execute, Routing::Sample);
        assert!((sampled - 0.953).abs() < 0.02, "{variant:?}: {sampled}");
        let random = execute_rate(&paper, Routing::Deterministic);
        assert!(
            random < 0.9,
            "{variant:?}: the paper's start executes {random}"
        );
    }
}

#[test]
fn layer_granularity_gates_both_modules_together() {
    let cfg = RoutingConfig::new().with_granularity(Granularity::Layer);
    let model = LlamaConfig::tiny(512)
        .init::<B>(&device())
        .with_new_routers(cfg.clone());
    assert!(model.model.layers.iter().all(|l| l.mlp_router.is_none()));
    let r = reference(&tiny());
    let out = model.forward_full(ids_tensor(&r, "input_ids"), false);
    for (a, m) in out.attn_gates.into_iter().zip(out.mlp_gates) {
        assert_eq!(to_vec(a), to_vec(m));
    }
    // one Linear(64, 2) per layer, three layers
    assert_eq!(model.router_params(), 3 * (64 * 2 + 2));
}

#[test]
fn kv_drop_cached_decoding_equals_full_forward() {
    // Trained the same way it is served: the full (training) forward and token-by-token
    // decoding through the engine's cache must agree when skipped tokens are hidden from
    // attention.
    let cfg = RoutingConfig::new().with_kv_policy(KvPolicy::Drop);
    let mut model = load_pretrained::<B>(&tiny().join("model-routed"), &device())
        .unwrap()
        .model;
    let w = skipgpt_model::io::safetensors_io::WeightSet::open_files(&[
        tiny().join("model-routed/routers.safetensors")
    ])
    .unwrap();
    model = model.load_routers(cfg, &w).unwrap();
    let r = reference(&tiny());
    let ids = ids_tensor(&r, "input_ids");
    let s = ids.dims()[1];
    let full = model.forward_full(ids.clone(), false);
    // some attention is skipped, so dropping changes the result vs keep
    let keep = load_pretrained::<B>(&tiny().join("model-routed"), &device())
        .unwrap()
        .model;
    let keep_logits = to_vec(keep.forward(ids.clone()));
    let full_logits = to_vec(full.logits);
    assert!(
        max_abs_diff(&keep_logits, &full_logits) > 1e-3,
        "drop must differ from keep"
    );
    let chunks: Vec<usize> = std::iter::once(6)
        .chain(std::iter::repeat_n(1, s - 6))
        .collect();
    let rows = ids_rows(&r, "input_ids");
    let cached = engine_logits_in_chunks(&model, &rows, &chunks, Routing::Deterministic);
    let d = max_abs_diff(&full_logits, &cached);
    assert!(d < 1e-4, "cached vs full differ by {d}");
}

#[test]
fn routed_checkpoint_round_trips() {
    for variant in [RouterVariant::Linear, RouterVariant::Mlp] {
        let cfg = RoutingConfig::new()
            .with_router(variant)
            .with_mlp_router_input(MlpRouterInput::BlockInput)
            .with_target_sparsity(0.4);
        let model = LlamaConfig::tiny(512)
            .init::<B>(&device())
            .with_new_routers(cfg.clone());
        let dir = tempfile::tempdir().unwrap();
        save_pretrained(&model, None, dir.path(), StoreDtype::F32).unwrap();
        assert!(Path::new(&dir.path().join("routers.safetensors")).exists());
        let again = load_pretrained::<B>(dir.path(), &device()).unwrap().model;
        assert_eq!(again.routing_config, Some(cfg));
        let ids = ids_tensor(&reference(&tiny()), "input_ids");
        let a = model.forward_full(ids.clone(), false);
        let b = again.forward_full(ids, false);
        assert_eq!(to_vec(a.logits), to_vec(b.logits));
        assert_eq!(
            a.attn_gates
                .into_iter()
                .flat_map(to_vec)
                .collect::<Vec<_>>(),
            b.attn_gates
                .into_iter()
                .flat_map(to_vec)
                .collect::<Vec<_>>()
        );
    }
}

#[test]
fn linear_routers_are_under_a_hundredth_of_a_percent_of_llama_7b() {
    // LLaMA-2-7B: 32 layers, hidden 4096, MLP 11008, vocab 32000.
    let c = LlamaConfig::new(32000, 4096, 11008, 32, 32, 32, 128);
    let total = c.num_params();
    assert_eq!(
        total, 6_738_415_616,
        "LLaMA-2-7B's published parameter count"
    );
    // two linear routers per layer, as `with_new_routers` builds them
    let router = Router::<B>::init(RouterVariant::Linear, 4096, RouterInit::Paper, &device());
    let routers = 2 * 32 * router.num_params();
    assert_eq!(routers, 2 * 32 * (4096 * 2 + 2));
    let pct = 100.0 * routers as f64 / total as f64;
    eprintln!("linear routers: {routers} parameters = {pct:.5}% of {total}");
    assert!(pct < 0.01, "{pct}");
}

#[test]
fn bad_skipgpt_json_is_rejected_clearly() {
    let dir = copy_dir(&tiny().join("model-routed"));
    std::fs::write(
        dir.path().join("skipgpt.json"),
        r#"{"router": "transformer"}"#,
    )
    .unwrap();
    let err = load_pretrained::<B>(dir.path(), &device())
        .err()
        .unwrap()
        .to_string();
    assert_mentions(&err, &["skipgpt.json", "transformer"]);
    std::fs::remove_file(dir.path().join("routers.safetensors")).unwrap();
    std::fs::write(dir.path().join("skipgpt.json"), "{}").unwrap();
    let err = load_pretrained::<B>(dir.path(), &device())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("routers.safetensors"), "{err}");
}
