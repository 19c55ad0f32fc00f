//! The command line on model files: a routed model served by the sparse engine and by the
//! gated reference, a GGUF imported and tokenized, a PEFT adapter applied with `--adapter`, a
//! quantized GGUF run as it is with `--routers`.

use skipgpt_model::io::safetensors_io::TensorFile;

use crate::common::*;

#[test]
fn cli_serves_routed_models_with_the_sparse_engine() {
    let dir = copy_dir(&tiny().join("model-routed"));
    std::fs::write(
        dir.path().join("skipgpt.json"),
        skipgpt_model::RoutingConfig::new().to_json(),
    )
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    let input = tiny().join("reference.safetensors");
    let run = |engine: &str, file: &str| {
        let path = out.path().join(file);
        let mut args = logits_args(dir.path().to_str().unwrap(), &input, &path);
        args.extend(["--engine", engine, "--stats"]);
        let o = skipgpt(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        (
            skipgpt_model::io::safetensors_io::TensorFile::open(&path).unwrap(),
            stderr(&o),
        )
    };
    let (sparse, sparse_err) = run("sparse", "s.safetensors");
    let (gated, gated_err) = run("dense-gated", "g.safetensors");
    let (a, _) = sparse.read_f32("logits").unwrap();
    let (b, _) = gated.read_f32("logits").unwrap();
    assert!(max_abs_diff(&a, &b) < 1e-4);
    assert_eq!(
        sparse.read_f32("attn_gates").unwrap(),
        gated.read_f32("attn_gates").unwrap()
    );
    assert!(sparse_err.contains("ideal speedup"), "{sparse_err}");
    assert!(gated_err.contains("0% saved"), "{gated_err}");
}

#[test]
fn cli_imports_and_tokenizes() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = crate::common::gguf_writer::write_tiny_gguf(dir.path(), "tiny.gguf");
    let out = dir.path().join("model");
    let o = skipgpt(&[
        "import-gguf",
        gguf.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert_mentions(&text, &["3 layers", "30 F32"]);

    let v = skipgpt_json(&[
        "tokenize",
        "--model",
        out.to_str().unwrap(),
        "--text",
        "the end",
        "--json",
    ]);
    let original =
        skipgpt_model::Tokenizer::from_file(&tiny().join("model/tokenizer.json")).unwrap();
    let (ids, tokens) = original.encode_plain("the end").unwrap();
    assert_eq!(v["ids"], serde_json::json!(ids));
    assert_eq!(v["tokens"], serde_json::json!(tokens));
    // the GGUF itself: the tokenizer it carries
    let from_gguf = skipgpt_json(&[
        "tokenize",
        "--model",
        gguf.to_str().unwrap(),
        "--text",
        "the end",
        "--json",
    ]);
    assert_eq!(from_gguf, v);

    assert_clean_failure(
        &[
            "import-gguf",
            "/nonexistent.gguf",
            "--out",
            out.to_str().unwrap(),
        ],
        &["/nonexistent.gguf"],
    );
    assert_clean_failure(
        &[
            "import-gguf",
            gguf.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        &["already exists"],
    );
}

#[test]
fn the_command_line_applies_a_peft_adapter_with_its_logits() {
    // tests/fixtures/peft-lora: made by peft for the tiny model, with the adapted logits
    let dir = fixtures().join("peft-lora");
    let r = reference(&dir);
    let out = tempfile::tempdir().unwrap();
    let path = out.path().join("l.safetensors");
    let model_dir = tiny().join("model");
    let input = dir.join("reference.safetensors");
    let mut args = logits_args(model_dir.to_str().unwrap(), &input, &path);
    args.extend(["--adapter", dir.to_str().unwrap()]);
    let o = skipgpt(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let (got, _) = TensorFile::open(&path).unwrap().read_f32("logits").unwrap();
    let (want, _) = r.read_f32("logits").unwrap();
    assert!(max_abs_diff(&got, &want) < 1e-4);
}

#[test]
fn the_command_line_quantizes_a_gguf_and_runs_it_with_published_routers() {
    let dir = tempfile::tempdir().unwrap();
    let source = crate::common::gguf_writer::write_tiny_gguf(dir.path(), "tiny-f32.gguf");
    let gguf = dir.path().join("tiny-q8_0.gguf");
    let quantize = |target: &str, out: &std::path::Path| {
        skipgpt(&[
            "quantize",
            "--model",
            source.to_str().unwrap(),
            "--type",
            target,
            "--out",
            out.to_str().unwrap(),
        ])
    };
    let o = quantize("q8_0", &gguf);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert_mentions(&text, &["20 F32 → Q8_0", "3 F32 → F16", "7 F32 kept"]);
    // a model directory quantizes as its converted file does
    let from_dir = dir.path().join("dir-q8_0.gguf");
    let o = skipgpt(&[
        "quantize",
        "--model",
        tiny().join("model").to_str().unwrap(),
        "--type",
        "q8_0",
        "--out",
        from_dir.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("20 F32 → Q8_0"), "{text}");
    assert_clean_failure(
        &[
            "quantize",
            "--model",
            tiny().join("model/config.json").to_str().unwrap(),
            "--type",
            "q8_0",
            "--out",
            dir.path().join("x.gguf").to_str().unwrap(),
        ],
        &["config.json", "neither a GGUF file nor a model directory"],
    );
    let o = quantize("q2_k", &dir.path().join("x.gguf"));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("q8_0"), "{}", stderr(&o));
    let routers = tiny().join("model-routed");
    let generate = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            gguf.to_str().unwrap(),
            "--prompt-ids",
            "5,17,42,7",
            "--max-new-tokens",
            "6",
            "--ignore-eos",
            "--json",
        ];
        args.extend(extra);
        let o = skipgpt(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
    };
    let dense = generate(&[]);
    let routed = generate(&["--routers", routers.to_str().unwrap()]);
    for run in [&dense, &routed] {
        assert_eq!(run["tokens"].as_array().unwrap().len(), 6, "{run}");
        assert!(
            run["text"].is_string(),
            "the GGUF's own tokenizer decodes: {run}"
        );
    }
    assert_clean_failure(
        &[
            "generate",
            "--model",
            gguf.to_str().unwrap(),
            "--routers",
            dir.path().to_str().unwrap(),
            "--prompt-ids",
            "5",
        ],
        &["routers.safetensors"],
    );
}

/// Published routers calibrated on a quantized GGUF: calibrate-routers writes the routers
/// alone (no copy of the model), which generate and analyze attach again with --routers.
#[test]
fn routers_calibrated_on_a_gguf_are_written_alone_and_attach_again() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("tiny-q8_0.gguf");
    let mut g = crate::common::gguf_writer::llama_tiny_gguf(&tiny().join("model"));
    g.quantize_matrices(skipgpt_kernels::quant::QuantType::Q8_0);
    g.write(&gguf);
    let routers = tiny().join("model-routed");
    let calibrated = dir.path().join("calibrated");
    let path = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let corpus = ["--synthetic", "60", "--seq-len", "16"];
    let mut args = vec![
        "calibrate-routers".to_string(),
        "--model".into(),
        path(&gguf),
    ];
    args.extend([
        "--routers".into(),
        path(&routers),
        "--out".into(),
        path(&calibrated),
    ]);
    args.extend(corpus.map(String::from));
    args.extend(
        [
            "--target-sparsity",
            "0.3",
            "--sparsity-unit",
            "modules",
            "--json",
        ]
        .map(String::from),
    );
    let o = skipgpt(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", stderr(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let after = j["report"]["skip_after"].as_f64().unwrap();
    assert!((after - 0.3).abs() < 0.01, "{j}");
    let mut files: Vec<String> = std::fs::read_dir(&calibrated)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(
        files,
        ["calibration.json", "routers.safetensors", "skipgpt.json"]
    );

    // analyze attaches them to the GGUF and measures the rate calibration realised
    let analysis = dir.path().join("analysis");
    let mut args = vec!["analyze".to_string(), "--model".into(), path(&gguf)];
    args.extend([
        "--routers".into(),
        path(&calibrated),
        "--out".into(),
        path(&analysis),
    ]);
    args.extend(corpus.map(String::from));
    args.push("--json".into());
    let o = skipgpt(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(analysis.join("routing.json").is_file());
    // and a GGUF without routers is refused by name
    assert_clean_failure(
        &[
            "analyze",
            "--model",
            &path(&gguf),
            "--out",
            &path(&analysis),
            "--synthetic",
            "8",
        ],
        &["tiny-q8_0.gguf", "--routers"],
    );
}

#[test]
fn bench_reports_speed_skip_rates_and_memory_as_json() {
    let routed = tiny().join("model-routed");
    let r = skipgpt_json(&[
        "bench",
        "--model",
        routed.to_str().unwrap(),
        "--prefill",
        "32",
        "--decode",
        "4",
        "--batch",
        "1,2",
        "--repeats",
        "2",
        "--pairs",
        "1",
        "--json",
    ]);
    let tests = r["tests"].as_array().unwrap();
    let names: Vec<(&str, u64)> = tests
        .iter()
        .map(|t| (t["test"].as_str().unwrap(), t["batch"].as_u64().unwrap()))
        .collect();
    assert_eq!(names, [("pp32", 1), ("tg4", 1), ("tg4", 2)]);
    for t in tests {
        let (lo, mid, hi) = (
            t["tok_s_min"].as_f64().unwrap(),
            t["tok_s"].as_f64().unwrap(),
            t["tok_s_max"].as_f64().unwrap(),
        );
        assert!(0.0 < lo && lo <= mid && mid <= hi, "{t}");
        assert!(
            t["attn_skip"].as_f64().unwrap() > 0.0,
            "the routers skip: {t}"
        );
    }
    assert_eq!(r["routed"], true);
    assert!(r["paired_speedup"]["decode"].as_f64().unwrap() > 0.0);
    assert!(r["peak_rss_mb"].as_f64().unwrap() > r["file_mb"].as_f64().unwrap());
    let o = skipgpt(&["bench", "--model", routed.to_str().unwrap(), "--batch", "0"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--batch"), "{}", stderr(&o));
}
