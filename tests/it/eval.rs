//! Perplexity and skip-rate evaluation, checked against the HF reference logits and gates.

use std::process::Command;

use crate::common::*;
use burn::tensor::{Int, Tensor, TensorData};
use skipgpt_eval::evaluate_perplexity;
use skipgpt_model::{load_pretrained, Routing};
use skipgpt_train::data::PackedDataset;
use skipgpt_train::loss::lm_loss;

/// The fixture's two 24-token rows as a dataset of 23 predictions each.
fn fixture_dataset() -> PackedDataset {
    let r = reference(&tiny());
    PackedDataset {
        seq_len: 23,
        sequences: ids_rows(&r, "input_ids"),
    }
}

/// exp(mean CE) of the reference logits at positions 0..23 predicting ids 1..24.
fn reference_perplexity(logits_name: &str) -> f64 {
    let r = reference(&tiny());
    let (logits, _) = r.read_f32(logits_name).unwrap();
    let logits = Tensor::<B, 3>::from_data(TensorData::new(logits, [2, 24, 512]), &device())
        .slice([0..2, 0..23, 0..512]);
    let (ids, _) = r.read_i64("input_ids").unwrap();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [2, 24]), &device());
    let nll = lm_loss(
        logits,
        ids.slice([0..2, 1..24]),
        Tensor::ones([2, 23], &device()),
    );
    (to_vec(nll)[0] as f64).exp()
}

#[test]
fn perplexity_and_skip_rates_match_the_reference() {
    let model = load_pretrained::<B>(&tiny().join("model-routed"), &device())
        .unwrap()
        .model;
    let data = fixture_dataset();
    let mut calls = 0;
    let dense = evaluate_perplexity(&model, &data, Routing::Dense, 1, |_, _| calls += 1).unwrap();
    assert_eq!(calls, 2, "progress after each batch");
    assert_eq!(dense.tokens, 46);
    let expected = reference_perplexity("logits");
    assert!(
        (dense.perplexity - expected).abs() < 1e-3 * expected,
        "{} vs {expected}",
        dense.perplexity
    );
    assert_eq!((dense.attn_skip, dense.mlp_skip), (0.0, 0.0));

    let routed = evaluate_perplexity(&model, &data, Routing::Deterministic, 2, |_, _| {}).unwrap();
    let expected = reference_perplexity("routed.post_attn.logits");
    assert!(
        (routed.perplexity - expected).abs() < 1e-3 * expected,
        "{} vs {expected}",
        routed.perplexity
    );
    // skip rates from the reference gates over the first 23 positions
    let r = reference(&tiny());
    for (name, got) in [
        ("attn_gates", &routed.attn_skip_per_layer),
        ("mlp_gates", &routed.mlp_skip_per_layer),
    ] {
        let (g, _) = r.read_f32(&format!("routed.post_attn.{name}")).unwrap();
        for (layer, got) in got.iter().enumerate() {
            let rows = &g[layer * 48..(layer + 1) * 48];
            let kept: f32 = rows[..23].iter().chain(&rows[24..47]).sum();
            let expected = 1.0 - kept as f64 / 46.0;
            assert!(
                (got - expected).abs() < 1e-9,
                "{name} layer {layer}: {got} vs {expected}"
            );
        }
    }
    assert!(routed.attn_skip > 0.2 && routed.mlp_skip > 0.2);
    // attention and MLP parameters weigh in: between the two rates
    let (lo, hi) = (
        routed.attn_skip.min(routed.mlp_skip),
        routed.attn_skip.max(routed.mlp_skip),
    );
    assert!(routed.param_skip >= lo && routed.param_skip <= hi);
}

/// Runs `skipgpt eval-ppl --json` on the routed fixture with 30 synthetic documents.
fn eval_ppl_json(extra: &[&str]) -> serde_json::Value {
    let model = tiny().join("model-routed");
    let out = Command::new(env!("CARGO_BIN_EXE_skipgpt"))
        .args([
            "eval-ppl",
            "--model",
            model.to_str().unwrap(),
            "--synthetic",
            "30",
            "--seq-len",
            "32",
            "--json",
        ])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn eval_ppl_command_reports_dense_and_routed() {
    let j = eval_ppl_json(&["--split", "all"]);
    let dense = j["dense"]["perplexity"].as_f64().unwrap();
    let routed = j["routed"]["perplexity"].as_f64().unwrap();
    // what the library computes for the same model, corpus and split (the reference backend
    // here, the CPU backend in the command)
    let config = skipgpt_pipeline::evaluate::EvalPplConfig {
        model: skipgpt_pipeline::evaluate::ModelSource {
            dir: tiny().join("model-routed"),
            ..Default::default()
        },
        corpus: skipgpt_pipeline::CorpusConfig::synthetic(30, 0, 32),
        split: skipgpt_pipeline::evaluate::Split::All,
        quiet: true,
        ..Default::default()
    };
    let want = skipgpt_pipeline::evaluate::eval_ppl::<B>(&config, &device()).unwrap();
    let want_routed = want.routed.as_ref().unwrap();
    assert_eq!(
        j["dense"]["tokens"].as_u64(),
        Some(want.dense.tokens as u64)
    );
    for (got, want) in [
        (dense, want.dense.perplexity),
        (routed, want_routed.perplexity),
    ] {
        assert!((got / want - 1.0).abs() < 1e-4, "{got} against {want}");
    }
    assert!(routed != dense);
    assert!(j["routed"]["attn_skip"].as_f64().unwrap() > 0.0);
    assert_eq!(j["dense"]["attn_skip"].as_f64().unwrap(), 0.0);
    // --dense: only the dense run
    let j = eval_ppl_json(&["--dense"]);
    assert!(j.get("routed").is_none() && j["dense"]["tokens"].as_u64().unwrap() > 0);
}

/// Mean next-token NLL of the reference logits `name` over positions `from..23` of both rows.
fn reference_nll(name: &str, from: usize) -> f64 {
    let r = reference(&tiny());
    let (logits, _) = r.read_f32(name).unwrap();
    let ids = ids_rows(&r, "input_ids");
    let mut nll = Vec::new();
    for (row, ids) in ids.iter().enumerate() {
        for pos in from..23 {
            let at = &logits[(row * 24 + pos) * 512..(row * 24 + pos + 1) * 512];
            let max = at.iter().fold(f64::MIN, |m, &v| m.max(v as f64));
            let log_sum = at.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() + max;
            nll.push(log_sum - at[ids[pos + 1] as usize] as f64);
        }
    }
    nll.iter().sum::<f64>() / nll.len() as f64
}

#[test]
fn chunked_perplexity_scores_the_second_half_of_each_chunk_as_llama_perplexity_does() {
    let model = load_pretrained::<B>(&tiny().join("model-routed"), &device())
        .unwrap()
        .model;
    // the fixture's two rows back to back: chunks of 24 are the rows, each run from nothing
    let tokens: Vec<u32> = ids_rows(&reference(&tiny()), "input_ids").concat();
    for (routing, logits) in [
        (Routing::Dense, "logits"),
        (Routing::Deterministic, "routed.post_attn.logits"),
    ] {
        let mut calls = Vec::new();
        let got =
            skipgpt_eval::chunked_perplexity(&model, &tokens, 24, None, None, routing, |d, t| {
                calls.push((d, t))
            })
            .unwrap();
        assert_eq!(calls, [(1, 2), (2, 2)], "progress after each chunk");
        assert_eq!(
            (got.chunks, got.tokens),
            (2, 2 * 11),
            "positions 12..23 of each"
        );
        let want = reference_nll(logits, 12);
        assert!(
            (got.nll - want).abs() < 1e-4,
            "{routing:?}: nll {} against {want}",
            got.nll
        );
        assert!((got.perplexity - want.exp()).abs() < 1e-3 * want.exp());
        assert!(got.perplexity_error > 0.0 && got.perplexity_error < got.perplexity);
        assert_eq!(
            routing == Routing::Dense,
            got.attn_skip + got.mlp_skip == 0.0
        );
    }
    // one chunk at most: the first row only
    let one = skipgpt_eval::chunked_perplexity(
        &model,
        &tokens,
        24,
        None,
        Some(1),
        Routing::Dense,
        |_, _| {},
    )
    .unwrap();
    assert_eq!(one.chunks, 1);
    // a BOS over each chunk's first token changes what the scored positions see
    let with_bos = skipgpt_eval::chunked_perplexity(
        &model,
        &tokens,
        24,
        Some(0),
        None,
        Routing::Dense,
        |_, _| {},
    )
    .unwrap();
    assert_ne!(with_bos.nll, reference_nll("logits", 12));
    let short = skipgpt_eval::chunked_perplexity(
        &model,
        &tokens[..47],
        24,
        None,
        None,
        Routing::Dense,
        |_, _| {},
    )
    .unwrap_err()
    .to_string();
    assert_mentions(&short, &["at least 48 tokens", "47"]);
}

#[test]
fn perplexity_command_reads_a_text_file_and_names_one_too_short() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("text.txt");
    let words: Vec<String> = (0..400)
        .map(|i| format!("word{} and more", i % 37))
        .collect();
    std::fs::write(&text, words.join(" ")).unwrap();
    let model = tiny().join("model-routed");
    let (model, text_arg) = (model.to_str().unwrap(), text.to_str().unwrap());
    let out = skipgpt(&[
        "perplexity",
        "--model",
        model,
        "-f",
        text_arg,
        "-c",
        "64",
        "--chunks",
        "3",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["chunks"], 3);
    assert_eq!(j["tokens"], 3 * (64 - 32 - 1));
    // the same chunks through the library
    let pretrained = load_pretrained::<B>(&tiny().join("model-routed"), &device()).unwrap();
    let tokens = pretrained
        .tokenizer
        .as_ref()
        .unwrap()
        .encode(&std::fs::read_to_string(&text).unwrap())
        .unwrap();
    let want = skipgpt_eval::chunked_perplexity(
        &pretrained.model,
        &tokens,
        64,
        None,
        Some(3),
        Routing::Deterministic,
        |_, _| {},
    )
    .unwrap();
    let got = j["perplexity"].as_f64().unwrap();
    assert!(
        (got / want.perplexity - 1.0).abs() < 1e-4,
        "{got} against {}",
        want.perplexity
    );
    std::fs::write(&text, "too short").unwrap();
    assert_clean_failure(
        &["perplexity", "--model", model, "-f", text_arg, "-c", "64"],
        &["text.txt", "at least 128 tokens"],
    );
}
