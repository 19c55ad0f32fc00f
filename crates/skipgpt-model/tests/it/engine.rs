//! The sparse engine computes only what the routers keep, and must give what the gated dense
//! computation gives: the fixture's references, and the masked forward for `kv_policy = drop`.

use burn::tensor::Tensor;
use skipgpt_model::engine::{
    generate_sparse, sparse_forward, sparse_forward_shifted, LogitRows, SparseCache,
};
use skipgpt_model::{
    generate, load_pretrained, KvPolicy, LlamaForCausalLM, MlpRouterInput, Routing, RoutingConfig,
};
use skipgpt_test_support::*;

fn routed(config: RoutingConfig) -> (tempfile::TempDir, LlamaForCausalLM<B>) {
    let dir = copy_dir(&tiny().join("model-routed"));
    std::fs::write(dir.path().join("skipgpt.json"), config.to_json()).unwrap();
    let model = load_pretrained::<B>(dir.path(), &device()).unwrap().model;
    (dir, model)
}

/// Logits `[b, t, vocab]` of equal-length rows through the sparse engine.
fn sparse_logits(
    model: &LlamaForCausalLM<B>,
    rows: &[Vec<u32>],
    routing: Routing,
) -> (Tensor<B, 3>, skipgpt_model::engine::SparseOutput<B>) {
    let mut cache = SparseCache::new(rows.len(), model.config.num_hidden_layers);
    let out = sparse_forward(model, rows, &mut cache, routing, LogitRows::All).unwrap();
    let [n, v] = out.logits.dims();
    let logits = out.logits.clone().reshape([rows.len(), n / rows.len(), v]);
    (logits, out)
}

#[test]
fn dense_model_matches_the_reference() {
    let model = load_pretrained::<B>(&tiny().join("model"), &device())
        .unwrap()
        .model;
    let r = reference(&tiny());
    let rows = ids_rows(&r, "input_ids");
    let (logits, out) = sparse_logits(&model, &rows, Routing::Dense);
    let d = diff_with(logits, &r, "logits");
    assert!(d < 1e-4, "{d}");
    assert_eq!(out.stats.flops, out.stats.dense_flops);
    assert_eq!(out.stats.ideal_speedup(), 1.0);
}

fn check_routed(mode: &str, input: MlpRouterInput) {
    let (_dir, model) = routed(RoutingConfig::new().with_mlp_router_input(input));
    let r = reference(&tiny());
    let rows = ids_rows(&r, "input_ids");
    let (logits, out) = sparse_logits(&model, &rows, Routing::Deterministic);
    let d = diff_with(logits, &r, &format!("routed.{mode}.logits"));
    assert!(d < 1e-4, "{mode}: {d}");
    // every gate as the reference: [layers, batch, seq] flattened = per layer, rows in order
    for (name, gates) in [
        ("attn_gates", &out.attn_gates),
        ("mlp_gates", &out.mlp_gates),
    ] {
        let (expected, _) = r.read_f32(&format!("routed.{mode}.{name}")).unwrap();
        let got: Vec<f32> = gates.iter().flatten().map(|&g| g as u8 as f32).collect();
        assert_eq!(got, expected, "{mode}: {name}");
    }
    // the work done: fewer FLOPs than dense, as many executions as gates say
    let s = out.stats;
    let executed: usize = out.attn_gates.iter().flatten().filter(|&&g| g).count();
    assert_eq!(s.attn_executed, executed);
    assert!(s.flops < s.dense_flops && s.ideal_speedup() > 1.0, "{s:?}");
    // greedy decoding through the engine's own caches
    let (tokens, _, _) = generate_sparse(
        &model,
        &ids_rows(&r, "greedy_prompt"),
        &greedy(16),
        Routing::Deterministic,
    )
    .unwrap();
    assert_eq!(
        tokens,
        ids_rows(&r, &format!("routed.{mode}.greedy_tokens"))
    );
}

#[test]
fn the_engine_matches_the_reference_with_either_mlp_router_input() {
    for (mode, input) in [
        ("post_attn", MlpRouterInput::PostAttn),
        ("block_input", MlpRouterInput::BlockInput),
    ] {
        check_routed(mode, input);
    }
}

#[test]
fn kv_drop_matches_the_masked_forward_and_stores_only_executed_tokens() {
    let (_dir, model) = routed(RoutingConfig::new().with_kv_policy(KvPolicy::Drop));
    let r = reference(&tiny());
    let ids = ids_tensor(&r, "input_ids");
    let gated = model.forward_routed(ids, Routing::Deterministic, false);
    let rows = ids_rows(&r, "input_ids");
    let (logits, out) = sparse_logits(&model, &rows, Routing::Deterministic);
    let d = max_abs_diff(&to_vec(logits), &to_vec(gated.logits));
    assert!(d < 1e-4, "{d}");
    // the cache holds one entry per (token, layer) that executed attention
    let mut cache = SparseCache::new(rows.len(), 3);
    sparse_forward(
        &model,
        &rows,
        &mut cache,
        Routing::Deterministic,
        LogitRows::Last,
    )
    .unwrap();
    assert_eq!(cache.entries(), out.stats.attn_executed);
    assert!(out.stats.attn_executed < out.stats.attn_total);
    // generation through the dropped caches equals the gated generation
    let prompt = ids_rows(&r, "greedy_prompt");
    let (tokens, _, _) =
        generate_sparse(&model, &prompt, &greedy(12), Routing::Deterministic).unwrap();
    let mut gated_model = model.clone();
    gated_model.routing = Routing::Deterministic;
    assert_eq!(
        tokens,
        generate(&gated_model, &prompt, &greedy(12)).unwrap()
    );
}

#[test]
fn sequences_of_different_lengths_batch_like_single_ones() {
    let (_dir, model) = routed(RoutingConfig::new());
    let r = reference(&tiny());
    let rows = ids_rows(&r, "input_ids");
    let prompts = vec![rows[0][..7].to_vec(), rows[1][..13].to_vec()];
    let (together, stats, cache) =
        generate_sparse(&model, &prompts, &greedy(6), Routing::Deterministic).unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let (alone, _, _) = generate_sparse(
            &model,
            std::slice::from_ref(p),
            &greedy(6),
            Routing::Deterministic,
        )
        .unwrap();
        assert_eq!(together[i], alone[0], "sequence {i}");
    }
    assert_eq!(cache.seq_len(0), 7 + 5);
    assert_eq!(cache.seq_len(1), 13 + 5);
    assert_eq!(stats.tokens, 7 + 13 + 2 * 5);
}

/// Sequences with their own budgets in one call route as each would alone on a model whose
/// router biases carry that budget's shift, and a sequence shifted by `-inf` runs dense.
#[test]
fn sequences_of_different_budgets_in_one_call_route_as_each_would_alone() {
    let (_dir, model) = routed(RoutingConfig::new().with_kv_policy(KvPolicy::Drop));
    let rows = ids_rows(&reference(&tiny()), "input_ids");
    let rows: Vec<Vec<u32>> = (0..3).map(|i| rows[i % rows.len()].clone()).collect();
    let shifts = [-0.5, 1.5, f64::NEG_INFINITY];
    let mut cache = SparseCache::new(3, model.config.num_hidden_layers);
    let routing = (Routing::Deterministic, &shifts[..]);
    let together =
        sparse_forward_shifted(&model, &rows, &mut cache, routing, LogitRows::All).unwrap();
    let together_logits = to_vec(together.logits.clone());
    let (n, v) = (rows[0].len(), model.config.vocab_size);
    let mut skipped = Vec::new();
    for (s, &shift) in shifts.iter().enumerate() {
        let (alone, mode) = match shift {
            f64::NEG_INFINITY => (model.clone(), Routing::Dense),
            _ => (
                model.clone().shift_router_biases(shift),
                Routing::Deterministic,
            ),
        };
        let (logits, out) = sparse_logits(&alone, &rows[s..=s], mode);
        let mine = &together_logits[s * n * v..(s + 1) * n * v];
        let d = max_abs_diff(&to_vec(logits), mine);
        assert!(
            d < 1e-4,
            "sequence {s} (shift {shift}): logits differ by {d}"
        );
        for (layer, (all, alone)) in together.attn_gates.iter().zip(&out.attn_gates).enumerate() {
            assert_eq!(
                &all[s * n..(s + 1) * n],
                &alone[..],
                "sequence {s}, layer {layer}"
            );
        }
        for (all, alone) in together.mlp_gates.iter().zip(&out.mlp_gates) {
            assert_eq!(&all[s * n..(s + 1) * n], &alone[..], "sequence {s}");
        }
        skipped.push(out.attn_gates.iter().flatten().filter(|&&g| !g).count());
    }
    assert!(
        skipped[1] > skipped[0] && skipped[0] > 0 && skipped[2] == 0,
        "the budgets differ: {skipped:?} attention skips"
    );
}

#[test]
fn bad_input_is_an_error() {
    let (_dir, model) = routed(RoutingConfig::new());
    let mut cache = SparseCache::new(1, 3);
    let mut err = |tokens: &[Vec<u32>]| {
        sparse_forward(
            &model,
            tokens,
            &mut cache,
            Routing::Deterministic,
            LogitRows::All,
        )
        .err()
        .unwrap()
        .to_string()
    };
    let e = err(&[vec![9999]]);
    assert!(e.contains("9999"), "{e}");
    let e = err(&[vec![1], vec![2]]);
    assert!(e.contains("2 sequences"), "{e}");
    assert!(generate_sparse(&model, &[vec![]], &greedy(2), Routing::Deterministic).is_err());
}

#[test]
fn long_ragged_generation_crosses_cache_blocks_like_the_gated_path() {
    // prompts of 3 and 70 tokens, decoded past the 64-token cache block: prefill pads queries,
    // decode pads keys, and the buffers grow mid-generation
    let prompts: Vec<Vec<u32>> = vec![
        vec![5, 77, 301],
        (0..70u32).map(|i| (i * 37 + 11) % 500 + 2).collect(),
    ];
    for policy in [KvPolicy::Keep, KvPolicy::Drop] {
        let (_dir, model) = routed(RoutingConfig::new().with_kv_policy(policy));
        let (together, stats, cache) =
            generate_sparse(&model, &prompts, &greedy(66), Routing::Deterministic).unwrap();
        let mut gated = model.clone();
        gated.routing = Routing::Deterministic;
        for (i, p) in prompts.iter().enumerate() {
            let reference = generate(&gated, std::slice::from_ref(p), &greedy(66)).unwrap();
            assert_eq!(together[i], reference[0], "{policy:?}, sequence {i}");
        }
        let (kv, hd) = (2, 16);
        let (stored, allocated) = (cache.bytes(kv, hd), cache.allocated_bytes(kv, hd));
        // each layer pads every sequence to its longest one, plus less than one block
        let per_token = 2 * kv * hd * 4;
        assert!(allocated >= stored, "{policy:?}");
        assert!(
            allocated <= 3 * 2 * (70 + 65 + 64) * per_token,
            "{policy:?}: {allocated}"
        );
        match policy {
            KvPolicy::Keep => assert_eq!(stored, cache.dense_bytes(kv, hd)),
            KvPolicy::Drop => assert_eq!(cache.entries(), stats.attn_executed),
        }
    }
}

/// What a server does between requests: a finished sequence's slot is emptied and takes a new
/// sequence while the other slot keeps decoding. Both must compute what they compute alone.
#[test]
fn a_reset_slot_takes_a_new_sequence_while_the_other_keeps_its_own() {
    let (_dir, model) = routed(RoutingConfig::new());
    let r = reference(&tiny());
    let rows = ids_rows(&r, "input_ids");
    let (a, b, c) = (&rows[0][..9], &rows[1][..12], &rows[1][3..8]);
    let layers = model.config.num_hidden_layers;
    let step = |cache: &mut SparseCache<B>, tokens: &[Vec<u32>]| {
        let out = sparse_forward(
            &model,
            tokens,
            cache,
            Routing::Deterministic,
            LogitRows::All,
        )
        .unwrap();
        to_vec(out.logits)
    };
    // b's first 6 tokens beside a, then b's rest beside c in a's emptied slot
    let mut shared = SparseCache::new(2, layers);
    step(&mut shared, &[a.to_vec(), b[..6].to_vec()]);
    shared.reset_sequence(0).unwrap();
    assert_eq!(shared.seq_len(0), 0);
    let together = step(&mut shared, &[c.to_vec(), b[6..].to_vec()]);

    let alone = |first: &[u32], then: &[u32]| {
        let mut cache = SparseCache::new(1, layers);
        if !first.is_empty() {
            step(&mut cache, &[first.to_vec()]);
        }
        step(&mut cache, &[then.to_vec()])
    };
    let want: Vec<f32> = [alone(&[], c), alone(&b[..6], &b[6..])].concat();
    assert!(max_abs_diff(&together, &want) < 1e-5);
    assert_eq!((shared.seq_len(0), shared.seq_len(1)), (c.len(), b.len()));
    assert!(shared.reset_sequence(2).is_err());
}
