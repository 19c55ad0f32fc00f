//! Multiple-choice scoring, ShortGPT-style static pruning, and their commands, on the tiny
//! fixture model.

use std::path::Path;

use crate::common::*;
use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};
use skipgpt_eval::{
    evaluate_mc, static_plan, synthetic_mc_tasks, BlockInfluence, McExample, McTask, StaticMode,
};
use skipgpt_model::engine::{sparse_forward, LogitRows, SparseCache};
use skipgpt_model::{load_pretrained, LlamaForCausalLM, Routing, Tokenizer};

fn tiny_model() -> (LlamaForCausalLM<B>, Tokenizer) {
    let p = load_pretrained::<B>(&tiny().join("model"), &device()).unwrap();
    (p.model, p.tokenizer.unwrap())
}

/// log p(choice | context) by one forward pass over the whole text.
fn loglik(model: &LlamaForCausalLM<B>, tok: &Tokenizer, context: &str, choice: &str) -> f64 {
    let ctx = tok.encode(context).unwrap();
    let ids = tok.encode(&format!("{context}{choice}")).unwrap();
    let n = ids.len();
    let input = Tensor::<B, 2, Int>::from_data(
        TensorData::new(ids.iter().map(|&i| i as i64).collect::<Vec<_>>(), [1, n]),
        &device(),
    );
    let logp = to_vec(log_softmax(model.forward(input), 2));
    let v = model.config.vocab_size;
    (ctx.len()..n)
        .map(|j| logp[(j - 1) * v + ids[j] as usize] as f64)
        .sum()
}

#[test]
fn multiple_choice_picks_the_most_likely_continuation() {
    let (model, tok) = tiny_model();
    // examples whose gold is, by a direct computation, the most likely choice for half of
    // them and the least likely for the other half: accuracy must be exactly 1/2
    let contexts = [
        "The cat",
        "Once upon a time",
        "It was",
        "Hello",
        "A bird",
        "The end",
    ];
    let choices = [" sat on the mat.", " is", " went home", " ran."];
    let examples: Vec<McExample> = contexts
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let ll: Vec<f64> = choices.iter().map(|x| loglik(&model, &tok, c, x)).collect();
            let order = |best: bool| {
                (0..ll.len())
                    .max_by(|&a, &b| {
                        if best {
                            ll[a].total_cmp(&ll[b])
                        } else {
                            ll[b].total_cmp(&ll[a])
                        }
                    })
                    .unwrap()
            };
            McExample {
                context: c.to_string(),
                choices: choices.iter().map(|s| s.to_string()).collect(),
                gold: order(i % 2 == 0),
            }
        })
        .collect();
    let task = McTask {
        name: "t".into(),
        examples,
    };
    let mut last = None;
    for batch in [1, 5, 64] {
        let r = evaluate_mc(&model, &tok, &task, Routing::Dense, batch, |_, _| {}).unwrap();
        assert_eq!(r.acc, 0.5, "batch {batch}");
        // batching (and its padding) changes nothing
        if let Some(prev) = &last {
            assert_eq!(&r, prev);
        }
        last = Some(r);
    }
}

#[test]
fn task_files_round_trip_and_bad_lines_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let tasks = synthetic_mc_tasks(5, 3);
    assert_eq!(tasks.len(), 3);
    for t in &tasks {
        assert_eq!(t.examples.len(), 5);
        assert!(t.examples.iter().all(|e| e.gold < e.choices.len()));
        let path = t.write(dir.path()).unwrap();
        assert_eq!(&McTask::read(&path).unwrap(), t);
    }
    let bad = dir.path().join("bad.jsonl");
    let good = r#"{"context": "a", "choices": ["b", "c"], "gold": 1}"#;
    for (line, needle) in [
        (
            r#"{"context": "a", "choices": ["b", "c"], "gold": 2}"#,
            "gold 2",
        ),
        (
            r#"{"context": "a", "choices": ["b"], "gold": 0}"#,
            "need at least 2",
        ),
        (r#"{"context": "a", "choices": ["b", "c"]}"#, "gold"),
        ("not json", "expected"),
    ] {
        std::fs::write(&bad, format!("{good}\n{line}\n")).unwrap();
        let e = McTask::read(&bad).unwrap_err().to_string();
        assert!(e.contains("bad.jsonl, line 2") && e.contains(needle), "{e}");
    }
}

#[test]
fn static_plans_remove_the_least_influential_modules_to_the_budget() {
    let bi = BlockInfluence {
        layer: vec![0.5, 0.02, 0.2, 0.01, 0.3, 0.04, 0.6, 0.03],
        attention: vec![0.3, 0.2, 0.01, 0.1, 0.02, 0.4, 0.5, 0.6],
        tokens: 10,
    };
    // 8 layers of 1 + 3 parameter units: 25% is two whole layers, the two least influential
    let p = static_plan(&bi, StaticMode::Block, 0.25, 1, 3);
    assert_eq!(
        p.attn_exec,
        vec![true, false, true, false, true, true, true, true]
    );
    assert_eq!(p.attn_exec, p.mlp_exec);
    assert_eq!(p.param_skip, 0.25);
    // attention holds 25% of the parameters: all of it would be needed; 10% is 3 modules
    let p = static_plan(&bi, StaticMode::Attention, 0.1, 1, 3);
    assert_eq!(p.mlp_exec, vec![true; 8]);
    let removed: Vec<usize> = (0..8).filter(|&i| !p.attn_exec[i]).collect();
    assert_eq!(removed, vec![2, 3, 4]);
    assert!((p.param_skip - 3.0 / 32.0).abs() < 1e-12);
}

#[test]
fn a_statically_removed_layer_is_the_model_without_it() {
    let (model, _) = tiny_model();
    let pruned = model
        .clone()
        .with_static_routes(&[true, false, true], &[true, false, true])
        .unwrap();
    // the same model with layer 1 cut out
    let mut cut = model;
    cut.model.layers.remove(1);
    cut.config.num_hidden_layers = 2;
    let r = reference(&tiny());
    let ids = ids_tensor(&r, "input_ids");
    let a = to_vec(pruned.forward(ids.clone()));
    let b = to_vec(cut.forward(ids));
    assert!(max_abs_diff(&a, &b) < 1e-5);
    // the sparse engine skips it entirely: no work, no cache
    let rows = ids_rows(&r, "input_ids");
    let mut cache = SparseCache::new(rows.len(), 3);
    let out = sparse_forward(
        &pruned,
        &rows,
        &mut cache,
        Routing::Deterministic,
        LogitRows::All,
    )
    .unwrap();
    assert!(out.attn_gates[1].iter().all(|&g| !g) && out.mlp_gates[1].iter().all(|&g| !g));
    assert!(out.attn_gates[0].iter().all(|&g| g));
    assert_eq!(cache.entries(), 2 * 2 * 24);
    let engine = to_vec(out.logits);
    assert!(max_abs_diff(&engine, &a) < 1e-4);
}

#[test]
fn prune_static_and_eval_mc_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("short");
    let model = tiny().join("model");
    let m = model.to_str().unwrap();
    let corpus = ["--synthetic", "60", "--seq-len", "16"];
    let mut args = vec!["prune-static", "--model", m, "--out", out.to_str().unwrap()];
    args.extend(corpus);
    args.extend(["--target-sparsity", "0.3"]);
    let o = skipgpt(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_mentions(&stdout, &["block influence", "removed: layer"]);
    assert!(out.join("routers.safetensors").exists());

    // eval-mc on task files: dense and routed columns for the pruned model
    let tasks = dir.path().join("tasks");
    let j = skipgpt_json(&[
        "eval-mc",
        "--model",
        out.to_str().unwrap(),
        "--synthetic-tasks",
        "6",
        "--write-tasks",
        tasks.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(j.as_array().unwrap().len(), 3);
    assert_eq!(j[0]["dense"]["examples"], 6);
    // accuracy is a whole number of the examples right
    for row in j.as_array().unwrap() {
        let (dense, routed) = (&row["dense"], &row["routed"]);
        assert_eq!(routed["examples"], dense["examples"], "{row}");
        let acc = routed["acc"].as_f64().unwrap();
        let correct = acc * routed["examples"].as_f64().unwrap();
        assert!(
            (correct - correct.round()).abs() < 1e-9,
            "{acc} is not k/6: {row}"
        );
        assert!((0.0..=1.0).contains(&acc), "{row}");
    }
    let files = format!(
        "{},{}",
        tasks.join("count-next.jsonl").display(),
        tasks.join("word-order.jsonl").display()
    );
    let o = skipgpt(&["eval-mc", "--model", m, "--tasks", &files]);
    assert!(o.status.success(), "{}", stderr(&o));
    let table = String::from_utf8_lossy(&o.stdout);
    assert_mentions(&table, &["count-next", "average"]);

    // bad input
    let missing = dir.path().join("nope.jsonl");
    assert_clean_failure(
        &[
            "eval-mc",
            "--model",
            m,
            "--tasks",
            missing.to_str().unwrap(),
        ],
        &["nope.jsonl"],
    );
    let mut args = vec!["prune-static", "--model", m, "--out", m];
    args.extend(corpus);
    assert_clean_failure(&args, &["input model"]);
}

#[test]
fn routing_analysis_aggregates_the_reference_gates() {
    use skipgpt_eval::{analyze_routing, token_map, write_analysis};
    let p = load_pretrained::<B>(&tiny().join("model-routed"), &device()).unwrap();
    let (model, tok) = (p.model, p.tokenizer.unwrap());
    let r = reference(&tiny());
    // the fixture's two rows: positions 0..23 are what the reference gates cover
    let data = skipgpt_train::data::PackedDataset {
        seq_len: 24,
        sequences: ids_rows(&r, "input_ids")
            .into_iter()
            .map(|mut s| {
                s.push(0);
                s
            })
            .collect(),
    };
    let a = analyze_routing(&model, &data, Some(&tok), 2).unwrap();
    let (attn, _) = r.read_f32("routed.post_attn.attn_gates").unwrap(); // [3, 2, 24]
    let (mlp, _) = r.read_f32("routed.post_attn.mlp_gates").unwrap();
    let same = |got: f64, want: f64, what: String| assert!((got - want).abs() < 1e-9, "{what}");
    for l in 0..3 {
        let skip = |g: &[f32]| 1.0 - g[l * 48..(l + 1) * 48].iter().sum::<f32>() as f64 / 48.0;
        same(
            a.attn_skip_per_layer[l],
            skip(&attn),
            format!("attention, layer {l}"),
        );
        same(
            a.mlp_skip_per_layer[l],
            skip(&mlp),
            format!("MLP, layer {l}"),
        );
    }
    for p in [0, 7, 23] {
        let skip = |g: &[f32]| {
            1.0 - (0..3)
                .flat_map(|l| (0..2).map(move |s| l * 48 + s * 24 + p))
                .map(|i| g[i] as f64)
                .sum::<f64>()
                / 6.0
        };
        same(
            a.attn_skip_by_position[p],
            skip(&attn),
            format!("attention, position {p}"),
        );
        same(
            a.mlp_skip_by_position[p],
            skip(&mlp),
            format!("MLP, position {p}"),
        );
    }
    assert_eq!(a.tokens, 48);
    assert_eq!(
        a.observations.attention_skipped_more_than_mlp,
        a.attn_skip > a.mlp_skip
    );
    // compute by frequency covers every occurrence once
    let occurrences: usize = a.by_frequency.iter().map(|c| c.occurrences).sum();
    assert_eq!(occurrences, 48);

    // the per-token map of the first row's text gives that row's gates
    let text = tok.decode(&ids_rows(&r, "input_ids")[0]).unwrap();
    let map = token_map(&model, &tok, &text).unwrap();
    assert_eq!(map.tokens.len(), 24);
    let first: Vec<bool> = (0..24).map(|p| attn[p] > 0.5).collect();
    assert_eq!(map.attn[0], first);
    let dir = tempfile::tempdir().unwrap();
    let files = write_analysis(&a, Some(&map), dir.path()).unwrap();
    assert_eq!(files.len(), 5);
    let heatmap = std::fs::read_to_string(dir.path().join("token-heatmap.svg")).unwrap();
    // one cell per (token, module row), in the executed or the skipped colour, plus the key's
    // two swatches
    let cells = heatmap.matches(r##"fill="#1F4E79""##).count()
        + heatmap.matches(r##"fill="#E8EEF5""##).count();
    assert_eq!(cells, map.tokens.len() * 6 + 2);
    assert!(heatmap.trim_end().ends_with("</svg>"));
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("routing.json")).unwrap()).unwrap();
    assert_eq!(json["analysis"]["tokens"], 48);

    // a dense model has nothing to analyse
    let (dense, _) = tiny_model();
    let e = analyze_routing(&dense, &data, None, 2)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no routers"), "{e}");
}

#[test]
fn calibration_shifts_the_routers_to_their_target() {
    use skipgpt_eval::{calibrate_routers, realised_skip};
    use skipgpt_model::SparsityUnit;
    let model = load_pretrained::<B>(&tiny().join("model-routed"), &device())
        .unwrap()
        .model;
    // 16 sequences of 32 tokens: 3 layers × 2 modules × 512 decisions
    let data = skipgpt_train::data::PackedDataset {
        seq_len: 32,
        sequences: (0..16u32)
            .map(|s| (0..33u32).map(|i| (s * 31 + i * 7) % 100).collect())
            .collect(),
    };
    let (before, tokens) = realised_skip(&model, &data, SparsityUnit::Params, 4).unwrap();
    assert_eq!(tokens, 512);
    for target in [0.1, 0.6] {
        let mut passes = Vec::new();
        let (calibrated, report) = calibrate_routers(
            model.clone(),
            &data,
            target,
            SparsityUnit::Params,
            4,
            |pass, shift, skip| passes.push((pass, shift, skip)),
        )
        .unwrap();
        assert_eq!(report.skip_before, before);
        assert!(
            (report.skip_after - target).abs() < 0.01,
            "target {target}: {report:?}"
        );
        // more skipping takes a positive shift of the SKIP logit, less a negative one
        assert_eq!(report.shift > 0.0, target > before, "{report:?}");
        assert_eq!(passes.len(), report.passes);
        // the returned model is the one measured
        let (after, _) = realised_skip(&calibrated, &data, SparsityUnit::Params, 4).unwrap();
        assert_eq!(after, report.skip_after);
    }
    let dense = tiny_model().0;
    let e = calibrate_routers(dense, &data, 0.25, SparsityUnit::Params, 4, |_, _, _| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("no routers"), "{e}");
}

#[test]
fn calibrate_routers_from_the_command_line_reports_what_it_realised() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("calibrated");
    let args = |model: &Path, out: &Path| -> Vec<String> {
        [
            "calibrate-routers",
            "--model",
            model.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--synthetic",
            "60",
            "--seq-len",
            "16",
            "--target-sparsity",
            "0.3",
            "--sparsity-unit",
            "modules",
            "--json",
        ]
        .map(String::from)
        .to_vec()
    };
    fn strs(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    let o = skipgpt(&strs(&args(&tiny().join("model-routed"), &out)));
    assert!(o.status.success(), "{}", stderr(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let r = &j["report"];
    assert_eq!(r["target"], 0.3);
    assert_eq!(r["unit"], "modules");
    let after = r["skip_after"].as_f64().unwrap();
    // 60 sequences of 16 tokens and 8 modules: the rate moves in steps of about 1e-4
    assert!((after - 0.3).abs() < 0.01, "{j}");
    assert!(r["passes"].as_u64().unwrap() >= 1, "{j}");
    // the pass lines are progress: on stderr beside JSON
    assert!(stderr(&o).contains("pass  1"), "{}", stderr(&o));
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("calibration.json")).unwrap()).unwrap();
    assert_eq!(&written, r);
    let routing: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("skipgpt.json")).unwrap()).unwrap();
    assert_eq!(routing["target_sparsity"], 0.3);

    // a model without routers has nothing to calibrate
    let dense = args(&tiny().join("model"), &dir.path().join("x"));
    assert_clean_failure(
        &strs(&dense),
        &["not a SkipGPT model", "routers.safetensors"],
    );
}
