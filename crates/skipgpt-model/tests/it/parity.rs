//! The model computes the same function as HF transformers on the reference fixtures.
//!
//! `llama-tiny` is shared/fixtures/llama-tiny (transformers 4.x config layout, f32). The
//! `variants/` were made with tools/make_fixtures.py (transformers 5.x layout): llama3 RoPE +
//! tied head + bf16 shards, dynamic NTK RoPE, and Qwen2 (qkv bias) with linear RoPE in f16.

use skipgpt_model::{generate, load_pretrained, LlamaForCausalLM, Routing};
use skipgpt_test_support::*;

const TOL: f32 = 1e-4;

fn load(dir: &std::path::Path) -> LlamaForCausalLM<B> {
    load_pretrained::<B>(&dir.join("model"), &device())
        .unwrap()
        .model
}

/// Logits and every hidden state within `TOL` of the reference; returns the max |Δ| of logits.
fn check_forward(dir: &std::path::Path) -> f32 {
    let model = load(dir);
    let r = reference(dir);
    let out = model.forward_full(ids_tensor(&r, "input_ids"), true);
    assert_eq!(out.hidden_states.len(), model.config.num_hidden_layers + 1);
    for (k, h) in out.hidden_states.into_iter().enumerate() {
        let d = diff_with(h, &r, &format!("hidden_states.{k}"));
        assert!(
            d < TOL,
            "{}: hidden_states.{k} differs by {d}",
            dir.display()
        );
    }
    let d = diff_with(out.logits, &r, "logits");
    assert!(d < TOL, "{}: logits differ by {d}", dir.display());
    d
}

/// Greedy decoding by recomputing the whole sequence at every step (no cache).
fn greedy_recompute(model: &LlamaForCausalLM<B>, prompt: &[u32], steps: usize) -> Vec<u32> {
    let mut ids: Vec<u32> = prompt.to_vec();
    for _ in 0..steps {
        let input = burn::tensor::Tensor::from_data(
            burn::tensor::TensorData::new(
                ids.iter().map(|&i| i as i64).collect::<Vec<_>>(),
                [1, ids.len()],
            ),
            &device(),
        );
        let logits = to_vec(model.forward(input));
        let v = model.config.vocab_size;
        ids.push(skipgpt_model::generate::argmax(&logits[logits.len() - v..]));
    }
    ids[prompt.len()..].to_vec()
}

#[test]
fn llama_tiny_logits_and_hidden_states_match() {
    let d = check_forward(&tiny());
    eprintln!("llama-tiny: max |Δ logits| = {d:e}");
}

#[test]
fn llama_tiny_greedy_with_kv_cache_matches_reference() {
    let model = load(&tiny());
    let r = reference(&tiny());
    let prompts = ids_rows(&r, "greedy_prompt");
    let expected = ids_rows(&r, "greedy_tokens");
    // batched, through the KV cache
    assert_eq!(generate(&model, &prompts, &greedy(16)).unwrap(), expected);
    // one sequence at a time, and by full recomputation
    for (p, e) in prompts.iter().zip(&expected) {
        assert_eq!(
            &generate(&model, std::slice::from_ref(p), &greedy(16)).unwrap()[0],
            e
        );
        assert_eq!(&greedy_recompute(&model, p, 16), e);
    }
}

#[test]
fn incremental_decoding_equals_full_recompute() {
    // the sparse engine's cache (every command decodes through it), dense: a prefill of 5
    // tokens, then one token at a time, then a chunk of 3, against the gated full forward
    let model = load(&tiny());
    let r = reference(&tiny());
    let full = to_vec(model.forward(ids_tensor(&r, "input_ids")));
    let rows = ids_rows(&r, "input_ids");
    let s = rows[0].len();
    let chunks: Vec<usize> = std::iter::once(5)
        .chain(std::iter::repeat_n(1, s - 8))
        .chain(std::iter::once(3))
        .collect();
    let cached = engine_logits_in_chunks(&model, &rows, &chunks, Routing::Dense);
    let d = max_abs_diff(&full, &cached);
    assert!(d < 1e-5, "cached vs recompute differ by {d}");
}

#[test]
fn tokenizer_round_trips_fixture_texts() {
    let tok = skipgpt_model::Tokenizer::from_file(&tiny().join("model/tokenizer.json")).unwrap();
    let r = reference(&tiny());
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny().join("reference.json")).unwrap())
            .unwrap();
    let rows = ids_rows(&r, "input_ids");
    for (text, ids) in meta["texts"].as_array().unwrap().iter().zip(&rows) {
        let text = text.as_str().unwrap();
        let enc = tok.encode(text).unwrap();
        assert_eq!(&enc[..ids.len()], &ids[..], "{text}");
        assert_eq!(tok.decode(&enc).unwrap(), text);
    }
}

#[test]
fn llama3_rope_tied_bf16_sharded_v5_config_matches() {
    let dir = variant("llama3_tied_bf16_sharded");
    let model = load(&dir);
    assert!(model.lm_head.is_none() && model.config.tie_word_embeddings);
    assert_eq!(model.config.dtype, "bfloat16");
    assert!(matches!(
        model.config.rope_scaling,
        skipgpt_model::RopeScaling::Llama3 { .. }
    ));
    check_forward(&dir);
    let r = reference(&dir);
    let got = generate(&model, &ids_rows(&r, "greedy_prompt"), &greedy(16)).unwrap();
    assert_eq!(got, ids_rows(&r, "greedy_tokens"));
}

#[test]
fn dynamic_ntk_rope_matches_beyond_the_context() {
    // max_position_embeddings is 16 and the sequences are 24 long: the base is rescaled.
    let dir = variant("dynamic_rope");
    let model = load(&dir);
    assert!(model.config.max_position_embeddings < 24);
    check_forward(&dir);
    // the reference greedy tokens were made by full recomputation (HF's cache keeps keys
    // rotated with the frequencies of the step that made them, so the two may differ)
    let r = reference(&dir);
    for (p, e) in ids_rows(&r, "greedy_prompt")
        .iter()
        .zip(ids_rows(&r, "greedy_tokens"))
    {
        assert_eq!(greedy_recompute(&model, p, 16), e);
    }
}

#[test]
fn qwen2_bias_linear_rope_f16_matches() {
    let dir = variant("qwen2_linear_f16");
    let model = load(&dir);
    assert_eq!(model.config.model_type, "qwen2");
    assert!(model.model.layers[0]
        .self_attn
        .q_proj
        .base_layer
        .bias
        .is_some());
    assert!(model.model.layers[0]
        .self_attn
        .o_proj
        .base_layer
        .bias
        .is_none());
    check_forward(&dir);
    let r = reference(&dir);
    let got = generate(&model, &ids_rows(&r, "greedy_prompt"), &greedy(16)).unwrap();
    assert_eq!(got, ids_rows(&r, "greedy_tokens"));
}
