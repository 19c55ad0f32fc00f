//! LoRA adapters: the forward is base + scale·x·A·B, merging keeps the function, and the PEFT
//! adapter format round-trips (and refuses what it cannot represent).

use burn::module::Param;
use burn::tensor::{Distribution, Tensor, TensorData};
use skipgpt_model::io::safetensors_io::TensorFile;
use skipgpt_model::lora::{peft_key, LoraAdapter, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE};
use skipgpt_model::{
    load_peft_adapter, load_pretrained, save_peft_adapter, LlamaForCausalLM, LoraConfig, Routing,
};
use skipgpt_test_support::*;

fn routed_model() -> LlamaForCausalLM<B> {
    load_pretrained::<B>(&tiny().join("model-routed"), &device())
        .unwrap()
        .model
}

/// Adapters on every projection with random, non-zero A and B, so that they matter.
fn with_random_adapters(model: LlamaForCausalLM<B>, rank: usize) -> LlamaForCausalLM<B> {
    let cfg = LoraConfig {
        rank,
        alpha: 2.0 * rank as f64,
        dropout: 0.1,
        targets: skipgpt_model::lora::LORA_TARGETS
            .iter()
            .map(|t| t.to_string())
            .collect(),
    };
    let mut model = model.with_lora(cfg).unwrap();
    for layer in model.model.layers.iter_mut() {
        for (_, _, proj) in layer.projections_mut() {
            let lora = proj.lora.as_mut().unwrap();
            let [r, out] = lora.lora_b.dims();
            lora.lora_b = Param::from_tensor(Tensor::random(
                [r, out],
                Distribution::Normal(0.0, 0.05),
                &device(),
            ));
        }
    }
    model
}

fn logits(model: &LlamaForCausalLM<B>, routing: Routing) -> (Vec<f32>, Vec<f32>) {
    let r = reference(&tiny());
    let out = model.forward_routed(ids_tensor(&r, "input_ids"), routing, false);
    let gates = out
        .attn_gates
        .into_iter()
        .chain(out.mlp_gates)
        .flat_map(to_vec)
        .collect();
    (to_vec(out.logits), gates)
}

#[test]
fn lora_forward_is_base_plus_scaled_low_rank_update() {
    let device = device();
    let cfg = LoraConfig {
        rank: 3,
        alpha: 6.0,
        dropout: 0.0,
        targets: vec!["q_proj".into()],
    };
    let mut adapter = LoraAdapter::<B>::init(4, 5, &cfg, &device);
    // A uniform in ±1/√in, B zero: a fresh adapter is the identity update
    let a = to_vec(adapter.lora_a.val());
    assert!(a.iter().all(|v| v.abs() <= 0.5) && a.iter().any(|&v| v != 0.0));
    assert!(to_vec(adapter.lora_b.val()).iter().all(|&v| v == 0.0));
    let b: Vec<f32> = (0..15).map(|i| (i as f32 - 7.0) / 10.0).collect();
    adapter.lora_b = Param::from_tensor(Tensor::from_data(
        TensorData::new(b.clone(), [3, 5]),
        &device,
    ));
    let x: Vec<f32> = (0..8).map(|i| (i as f32 * 0.37).sin()).collect();
    let got = to_vec(adapter.forward(Tensor::<B, 2>::from_data(
        TensorData::new(x.clone(), [2, 4]),
        &device,
    )));
    // by hand: 2 · x[2,4] · A[4,3] · B[3,5]
    for row in 0..2 {
        for o in 0..5 {
            let mut want = 0.0f32;
            for k in 0..3 {
                let xa: f32 = (0..4).map(|i| x[row * 4 + i] * a[i * 3 + k]).sum();
                want += xa * b[k * 5 + o];
            }
            want *= 2.0;
            let g = got[row * 5 + o];
            assert!((g - want).abs() < 1e-5, "[{row},{o}] {g} vs {want}");
        }
    }
    // a LoraLinear adds exactly that to its base layer
    let mut model = routed_model().with_lora(cfg).unwrap();
    let proj = &mut model.model.layers[0].self_attn.q_proj;
    let [d_in, d_out] = proj.dims();
    let lora = proj.lora.as_mut().unwrap();
    lora.lora_b = Param::from_tensor(Tensor::random([3, d_out], Distribution::Default, &device));
    let x = Tensor::<B, 3>::random([2, 3, d_in], Distribution::Default, &device);
    let whole = proj.forward(x.clone());
    let parts = proj.base_layer.forward(x.clone()) + proj.lora.as_ref().unwrap().forward(x);
    assert!(max_abs_diff(&to_vec(whole), &to_vec(parts)) < 1e-6);
}

#[test]
fn fresh_adapters_leave_the_model_unchanged_and_merging_keeps_the_function() {
    let model = routed_model();
    let (base, base_gates) = logits(&model, Routing::Deterministic);
    let fresh = model.clone().with_lora(LoraConfig::default()).unwrap();
    assert_eq!(
        logits(&fresh, Routing::Deterministic),
        (base.clone(), base_gates)
    );
    // 3 layers × (q 64·16 + 16·64, v 64·16 + 16·32, gate 64·16 + 16·176)
    assert_eq!(fresh.lora_params(), 3 * (2048 + 1536 + 3840));

    let adapted = with_random_adapters(model, 4);
    for routing in [Routing::Dense, Routing::Deterministic] {
        let (a, a_gates) = logits(&adapted, routing);
        assert!(max_abs_diff(&a, &base) > 1e-3, "the adapters must matter");
        let merged = adapted.clone().merge_lora();
        assert!(merged.lora_config.is_none() && merged.lora_params() == 0);
        let (m, m_gates) = logits(&merged, routing);
        let d = max_abs_diff(&a, &m);
        assert!(d < 1e-4, "{routing:?}: merged differs by {d}");
        assert_eq!(a_gates, m_gates, "{routing:?}");
    }
}

#[test]
fn peft_adapter_round_trips() {
    let adapted = with_random_adapters(routed_model(), 2);
    let cfg = adapted.lora_config.clone().unwrap();
    let dir = tempfile::tempdir().unwrap();
    save_peft_adapter(dir.path(), &cfg, &adapted.export_lora(), "tiny").unwrap();

    // PEFT's names and orientation
    let file = TensorFile::open(&dir.path().join(ADAPTER_WEIGHTS_FILE)).unwrap();
    assert_eq!(file.names().len(), 3 * 7 * 2);
    let q = "model.layers.1.self_attn.q_proj";
    assert_eq!(
        peft_key(q, 'A'),
        "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    );
    assert_eq!(file.shape(&peft_key(q, 'A')).unwrap(), vec![2, 64]);
    assert_eq!(file.shape(&peft_key(q, 'B')).unwrap(), vec![64, 2]);
    let down = "model.layers.2.mlp.down_proj";
    assert_eq!(file.shape(&peft_key(down, 'A')).unwrap(), vec![2, 176]);
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join(ADAPTER_CONFIG_FILE)).unwrap(),
    )
    .unwrap();
    assert_eq!(json["peft_type"], "LORA");
    assert_eq!(json["r"], 2);
    assert_eq!(json["lora_alpha"], 4.0);
    assert_eq!(json["target_modules"].as_array().unwrap().len(), 7);

    // read back onto a fresh copy of the base: the same function
    let adapter = load_peft_adapter(dir.path()).unwrap();
    assert_eq!(adapter.config, cfg);
    let loaded = routed_model().load_lora(&adapter).unwrap();
    let (a, _) = logits(&adapted, Routing::Deterministic);
    let (b, _) = logits(&loaded, Routing::Deterministic);
    assert_eq!(a, b);
}

#[test]
fn bad_adapters_are_refused_with_the_key_named() {
    let adapted = with_random_adapters(routed_model(), 2);
    let cfg = adapted.lora_config.clone().unwrap();
    let tensors = adapted.export_lora();
    let save = |cfg: &LoraConfig, tensors| {
        let dir = tempfile::tempdir().unwrap();
        save_peft_adapter(dir.path(), cfg, tensors, "tiny").unwrap();
        dir
    };
    let err = |dir: &tempfile::TempDir| match load_peft_adapter(dir.path()) {
        Err(e) => e.to_string(),
        Ok(a) => match routed_model().load_lora(&a) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("accepted a bad adapter"),
        },
    };
    // a rank the tensors do not have
    let wrong_rank = LoraConfig {
        rank: 3,
        ..cfg.clone()
    };
    let e = err(&save(&wrong_rank, &tensors));
    assert_mentions(&e, &["lora_A.weight", "[3, 64]"]);
    // a missing tensor
    let mut missing = tensors.clone();
    missing.remove(&peft_key("model.layers.2.mlp.up_proj", 'B'));
    let e = err(&save(&cfg, &missing));
    assert!(e.contains("layers.2.mlp.up_proj.lora_B"), "{e}");
    // adapters for layers the model does not have
    let mut extra = tensors.clone();
    let a = extra[&peft_key("model.layers.0.self_attn.q_proj", 'A')].clone();
    extra.insert(peft_key("model.layers.7.self_attn.q_proj", 'A'), a);
    let e = err(&save(&cfg, &extra));
    assert_mentions(&e, &["layers.7", "expected 42"]);
    // settings this implementation does not represent
    let dir = save(&cfg, &tensors);
    let path = dir.path().join(ADAPTER_CONFIG_FILE);
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace("\"use_dora\": false", "\"use_dora\": true"),
    )
    .unwrap();
    let e = err(&dir);
    assert_mentions(&e, &["use_dora", "adapter_config.json"]);
    std::fs::write(&path, text.replace("\"q_proj\"", "\"qkv\"")).unwrap();
    let e = err(&dir);
    assert!(e.contains("qkv"), "{e}");
    // a value of the wrong type is named by its key
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["r"] = "16".into();
    std::fs::write(&path, json.to_string()).unwrap();
    let e = err(&dir);
    assert_mentions(&e, &["`r`", "invalid type"]);
    json["r"] = 4.into();
    json["target_modules"] = "q_proj|v_proj".into();
    std::fs::write(&path, json.to_string()).unwrap();
    let e = err(&dir);
    assert_mentions(&e, &["target_modules", "list"]);
    // and settings that make no sense
    let e = routed_model()
        .with_lora(LoraConfig {
            rank: 0,
            ..LoraConfig::default()
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("rank 0"), "{e}");
}

#[test]
fn an_adapter_made_by_peft_gives_peft_logits() {
    // tests/fixtures/peft-lora: made by peft (tools/make_peft_fixture.py) for the tiny model,
    // rank 2 on all seven projections, scale 3, with the adapted model's logits
    let dir = fixtures().join("peft-lora");
    let adapter = load_peft_adapter(&dir).unwrap();
    assert_eq!(adapter.config.rank, 2);
    assert_eq!(adapter.config.targets.len(), 7);
    let base = load_pretrained::<B>(&tiny().join("model"), &device())
        .unwrap()
        .model;
    let model = base.clone().load_lora(&adapter).unwrap();
    let r = reference(&dir);
    let ids = ids_tensor(&r, "input_ids");
    let adapted = model.forward(ids.clone());
    let d = diff_with(adapted.clone(), &r, "logits");
    assert!(d < 1e-4, "adapted logits differ from peft's by {d}");
    // the adapter matters, and merging keeps it
    let plain = base.forward(ids.clone());
    assert!(max_abs_diff(&to_vec(plain), &to_vec(adapted)) > 0.1);
    let d = diff_with(model.merge_lora().forward(ids), &r, "logits");
    assert!(d < 1e-4, "merged logits differ from peft's by {d}");
}
