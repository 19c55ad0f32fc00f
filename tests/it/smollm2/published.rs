//! The published SmolLM2 models: their routers and adapters attached to the imported GGUF, and
//! `skipgpt demo --real` through the command line.

use super::*;

/// The published routers and adapters (`models/smollm2-135m/skipgpt-t*`, made by
/// `cargo xtask experiment --real`) attach to the imported GGUF, as their README says, and give
/// the perplexities their `results.json` records on the fixed held-out slice
/// (`tests/fixtures/smollm2/heldout.jsonl`: text of files no training run saw). The 25% model
/// is the demo's: `the_real_demo_gives_the_published_numbers` checks it through the command
/// line, so this test checks the others and leaves it out.
#[test]
#[ignore = "slow: imports and runs SmolLM2-135M; run with -- --include-ignored"]
fn published_routers_give_their_perplexity() {
    use skipgpt_eval::evaluate_perplexity;
    use skipgpt_model::{attach_routers, load_peft_adapter};
    use skipgpt_train::data::{pack, read_documents};
    let Some(base) = imported("published_routers_give_their_perplexity") else {
        return;
    };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut published: Vec<PathBuf> = std::fs::read_dir(root.join("models/smollm2-135m"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("results.json").exists())
        .collect();
    published.sort();
    assert!(published.len() > 1, "nothing published but the demo's");
    let pretrained = load_pretrained::<Cpu>(&base, &Default::default()).unwrap();
    let tokenizer = pretrained.tokenizer.unwrap();
    let eos = pretrained.model.config.eos_token_ids.first().copied();
    for dir in published.iter().filter(|d| !d.ends_with("skipgpt-t25")) {
        let results: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("results.json")).unwrap())
                .unwrap();
        let model = attach_routers(pretrained.model.clone(), dir).unwrap();
        let docs = read_documents(&[root.join(results["slice"].as_str().unwrap())]).unwrap();
        let seq_len = results["seq_len"].as_u64().unwrap() as usize;
        let data = pack(&docs, &tokenizer, seq_len, eos).unwrap();
        let ppl = |m: &LlamaForCausalLM<Cpu>, routing| {
            evaluate_perplexity(m, &data, routing, 8, |_, _| {}).unwrap()
        };
        let dense = ppl(&model, Routing::Dense);
        let routed = ppl(&model, Routing::Deterministic);
        let adapter = load_peft_adapter(&dir.join("adapter")).unwrap();
        // served merged, as `--adapter` serves it
        let adapted = model.clone().load_lora(&adapter).unwrap().merge_lora();
        let both = ppl(&adapted, Routing::Deterministic);
        let name = dir.display();
        eprintln!(
            "{name}: {} tokens; dense {:.3}, routers {:.3} ({:.1}% params skipped), routers + LoRA {:.3}",
            dense.tokens,
            dense.perplexity,
            routed.perplexity,
            100.0 * routed.param_skip,
            both.perplexity
        );
        for (what, got, key) in [
            ("dense", dense.perplexity, "dense_perplexity"),
            ("routers", routed.perplexity, "routers_perplexity"),
            ("routers + LoRA", both.perplexity, "routers_lora_perplexity"),
        ] {
            let want = results[key].as_f64().unwrap();
            assert!(
                (got / want - 1.0).abs() < 2e-3,
                "{name}: {what} perplexity {got}, results.json says {want}"
            );
        }
        // the routers do skip, and the adapter recovers some of what skipping costs
        assert!(routed.param_skip > 0.15, "{name}: {routed:?}");
        assert!(both.perplexity < routed.perplexity, "{name}");
        // a model published with its fidelity to dense on general text gives it again
        if let Some(want) = results["general_routers_lora_kl"].as_f64() {
            let docs =
                read_documents(&[root.join(results["general_slice"].as_str().unwrap())]).unwrap();
            let general = pack(&docs, &tokenizer, seq_len, eos).unwrap();
            let got = skipgpt_eval::compare_on_text(
                skipgpt_eval::Served {
                    model: &adapted,
                    routing: Routing::Deterministic,
                },
                skipgpt_eval::Served {
                    model: &model,
                    routing: Routing::Dense,
                },
                &general,
                8,
                |_, _| {},
            )
            .unwrap();
            eprintln!("{name}: general text, routers + LoRA: {got:?}");
            assert!(
                (got.kl / want - 1.0).abs() < 1e-2,
                "{name}: general-text KL {}, results.json says {want}",
                got.kl
            );
            let agreement = results["general_routers_lora_agreement"].as_f64().unwrap();
            assert!((got.agreement - agreement).abs() < 5e-3, "{name}: {got:?}");
        }
    }
}

/// `skipgpt demo --real` on the GGUF: it assembles the published model from the files built
/// into the binary, gives the perplexities `results.json` records, and serves both models
/// through the engine (measured speeds and answers present; their values are not asserted).
#[test]
#[ignore = "slow: imports and runs SmolLM2-135M; run with -- --include-ignored"]
fn the_real_demo_gives_the_published_numbers() {
    let Some(gguf) = required_gguf("the_real_demo_gives_the_published_numbers") else {
        return;
    };
    let out = tempfile::tempdir().unwrap();
    let o = skipgpt(&[
        "demo",
        "--real",
        "--gguf",
        gguf.to_str().unwrap(),
        "--out",
        out.path().to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}\n{text}", stderr(&o));
    let work = out.path().join("smollm2");
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(work.join("summary.json")).unwrap()).unwrap();
    let col = |i: usize| &summary["columns"][i];
    for (i, key) in [
        "dense_perplexity",
        "routers_perplexity",
        "routers_lora_perplexity",
    ]
    .into_iter()
    .enumerate()
    {
        let got = col(i)["perplexity"]["perplexity"].as_f64().unwrap();
        let want = summary["recorded"][key].as_f64().unwrap();
        assert!(
            (got / want - 1.0).abs() < 2e-3,
            "{key}: {got} against {want}"
        );
    }
    assert_eq!(col(0)["perplexity"]["param_skip"], 0.0);
    assert!(col(2)["perplexity"]["param_skip"].as_f64().unwrap() > 0.15);
    for i in 0..3 {
        assert!(!col(i)["answer"].as_str().unwrap().is_empty(), "{summary}");
    }
    // fidelity to dense on the general text: none for dense itself, and what was recorded
    assert!(
        col(0)["general"]["kl"].as_f64().unwrap().abs() < 1e-6,
        "{summary}"
    );
    assert!(
        col(0)["general"]["agreement"].as_f64().unwrap() > 0.999,
        "{summary}"
    );
    if let Some(want) = summary["recorded"]["general_routers_lora_kl"].as_f64() {
        let got = col(2)["general"]["kl"].as_f64().unwrap();
        assert!(
            (got / want - 1.0).abs() < 1e-2,
            "general KL {got} against {want}"
        );
    }
    // a SkipGPT directory a user can serve
    for f in [
        "routers.safetensors",
        "skipgpt.json",
        "adapter/adapter_model.safetensors",
        "model.safetensors",
    ] {
        assert!(work.join("skipgpt-t25").join(f).exists(), "{f}");
    }
    assert!(text.contains("SkipGPT (routers + LoRA)"), "{text}");
}
