//! The `skipgpt` binary end to end: outputs against the fixture, and clear errors on bad input.

use std::collections::BTreeMap;
use std::path::Path;

use crate::common::*;
use skipgpt_model::io::safetensors_io::{write_safetensors, OwnedTensor, StoreDtype, TensorFile};

/// Loading the model in `dir` (through `generate`) must fail cleanly, mentioning every needle.
fn assert_load_fails(dir: &Path, needles: &[&str]) {
    let dir = dir.to_str().unwrap();
    assert_clean_failure(&["generate", "--model", dir, "--prompt-ids", "1"], needles);
}

/// Writes a safetensors file holding one tensor.
fn write_one(path: &Path, name: &str, tensor: OwnedTensor) {
    write_safetensors(path, &BTreeMap::from([(name.to_string(), tensor)]), None).unwrap();
}

fn model_dir() -> String {
    tiny().join("model").display().to_string()
}

#[test]
fn logits_command_matches_reference() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("logits.safetensors");
    let input = tiny().join("reference.safetensors");
    let o = skipgpt(&logits_args(&model_dir(), &input, &out));
    assert!(o.status.success(), "{}", stderr(&o));
    let got = TensorFile::open(&out).unwrap();
    let (logits, shape) = got.read_f32("logits").unwrap();
    assert_eq!(shape, vec![2, 24, 512]);
    let (expected, _) = reference(&tiny()).read_f32("logits").unwrap();
    let d = max_abs_diff(&logits, &expected);
    assert!(d < 1e-4, "logits differ by {d}");
}

#[test]
fn generate_json_reproduces_greedy_tokens() {
    let r = reference(&tiny());
    let prompts = ids_rows(&r, "greedy_prompt");
    let expected = ids_rows(&r, "greedy_tokens");
    for (p, e) in prompts.iter().zip(&expected) {
        let ids = p.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        let json = skipgpt_json(&[
            "generate",
            "--model",
            &model_dir(),
            "--prompt-ids",
            &ids,
            "--max-new-tokens",
            "16",
            "--ignore-eos",
            "--json",
        ]);
        let tokens: Vec<u32> = serde_json::from_value(json["tokens"].clone()).unwrap();
        assert_eq!(&tokens, e);
        assert!(json["text"].is_string());
    }
}

#[test]
fn generate_from_text_and_sampling_is_seeded() {
    let run = |seed: &str| {
        let json = skipgpt_json(&[
            "generate",
            "--model",
            &model_dir(),
            "--prompt",
            "The quick brown fox",
            "--max-new-tokens",
            "12",
            "--temperature",
            "1.5",
            "--top-p",
            "0.9",
            "--seed",
            seed,
            "--ignore-eos",
            "--json",
        ]);
        serde_json::from_value::<Vec<u32>>(json["tokens"].clone()).unwrap()
    };
    let a = run("1");
    assert_eq!(a.len(), 12);
    assert_eq!(a, run("1"), "same seed, same tokens");
    let others: Vec<Vec<u32>> = (2..6).map(|s| run(&s.to_string())).collect();
    assert!(
        others.iter().any(|o| *o != a),
        "different seeds should not all agree"
    );
}

#[test]
fn generate_stops_at_eos_unless_ignored() {
    // Make every token's most likely continuation EOS by copying the fixture and declaring the
    // first greedy token EOS: generation must stop right there.
    let r = reference(&tiny());
    let prompt = &ids_rows(&r, "greedy_prompt")[0];
    let first = ids_rows(&r, "greedy_tokens")[0][0];
    let dir = copy_dir(&tiny().join("model"));
    let cfg_path = dir.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["eos_token_id"] = first.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let ids = prompt
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let m = dir.path().to_str().unwrap();
    let tokens = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            m,
            "--prompt-ids",
            &ids,
            "--max-new-tokens",
            "5",
            "--json",
        ];
        args.extend_from_slice(extra);
        let o = skipgpt(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        serde_json::from_value::<Vec<u32>>(json["tokens"].clone()).unwrap()
    };
    assert_eq!(tokens(&[]), vec![first]);
    assert_eq!(tokens(&["--ignore-eos"]).len(), 5);
}

#[test]
fn inspect_reports_architecture() {
    let j = skipgpt_json(&["inspect", "--model", &model_dir(), "--json"]);
    assert_eq!(j["model_type"], "llama");
    assert_eq!(j["parameters"], 204224); // reference.json "params"
    assert_eq!(j["layers"], 3);
    assert_eq!(j["kv_heads"], 2);
    assert_eq!(j["context_length"], 256);
    assert_eq!(j["config_dtype"], "float32");
    let o = skipgpt(&[
        "inspect",
        "--model",
        variant("llama3_tied_bf16_sharded")
            .join("model")
            .to_str()
            .unwrap(),
    ]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success()
            && text.contains("bfloat16")
            && text.contains("BF16")
            && text.contains("Llama3"),
        "{text}"
    );
    assert!(text.contains("model-00003-of-00003.safetensors"), "{text}");
}

#[test]
fn unknown_backend_is_rejected() {
    let o = skipgpt(&["--backend", "tpu", "inspect", "--model", &model_dir()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("tpu"));
}

// ---- bad input: each a clear message naming the file or key, exit code 1, no panic ----

#[test]
fn missing_config_json() {
    let dir = copy_dir(&tiny().join("model"));
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    assert_clean_failure(
        &["inspect", "--model", dir.path().to_str().unwrap()],
        &["config.json", "not found"],
    );
}

#[test]
fn missing_model_directory() {
    assert_clean_failure(
        &[
            "generate",
            "--model",
            "/nonexistent/model",
            "--prompt-ids",
            "1",
        ],
        &["/nonexistent/model"],
    );
}

#[test]
fn config_missing_hidden_size() {
    let dir = edit_config(|c| {
        c.as_object_mut().unwrap().remove("hidden_size");
    });
    assert_load_fails(dir.path(), &["config.json", "hidden_size"]);
}

#[test]
fn unknown_model_type() {
    let dir = edit_config(|c| c["model_type"] = "gpt_neox".into());
    assert_load_fails(
        dir.path(),
        &["config.json", "unsupported architecture", "gpt_neox"],
    );
}

#[test]
fn invalid_json_config() {
    let dir = copy_dir(&tiny().join("model"));
    std::fs::write(dir.path().join("config.json"), "{ not json").unwrap();
    assert_clean_failure(
        &["inspect", "--model", dir.path().to_str().unwrap()],
        &["config.json"],
    );
}

#[test]
fn truncated_safetensors() {
    let dir = copy_dir(&tiny().join("model"));
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert_load_fails(dir.path(), &["model.safetensors", "truncated"]);
}

/// Rewrites the fixture weights with `edit` applied to the tensor map.
fn edit_weights(edit: impl FnOnce(&mut BTreeMap<String, OwnedTensor>)) -> tempfile::TempDir {
    let dir = copy_dir(&tiny().join("model"));
    let path = dir.path().join("model.safetensors");
    let file = TensorFile::open(&path).unwrap();
    let mut map = BTreeMap::new();
    for name in file.names() {
        let (v, shape) = file.read_f32(&name).unwrap();
        map.insert(name, OwnedTensor::from_f32(&v, shape, StoreDtype::F32));
    }
    drop(file);
    edit(&mut map);
    write_safetensors(&path, &map, None).unwrap();
    dir
}

#[test]
fn tensor_with_wrong_shape() {
    let dir = edit_weights(|m| {
        m.insert(
            "model.layers.1.mlp.up_proj.weight".into(),
            OwnedTensor::from_f32(&[0.0; 64 * 100], vec![100, 64], StoreDtype::F32),
        );
    });
    assert_load_fails(
        dir.path(),
        &[
            "model.layers.1.mlp.up_proj.weight",
            "[100, 64]",
            "[176, 64]",
            "model.safetensors",
        ],
    );
}

#[test]
fn missing_tensor() {
    let dir = edit_weights(|m| {
        m.remove("model.layers.2.self_attn.k_proj.weight");
    });
    assert_load_fails(
        dir.path(),
        &[
            "model.layers.2.self_attn.k_proj.weight",
            "not found",
            "model.safetensors",
        ],
    );
}

#[test]
fn bad_logits_input() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    let out = dir.path().join("out.safetensors");
    write_one(
        &input,
        "input_ids",
        OwnedTensor::from_i64(&[1, 2, 9999], vec![1, 3]),
    );
    let model = model_dir();
    let args = logits_args(&model, &input, &out);
    assert_clean_failure(&args, &["in.safetensors", "9999", "vocabulary"]);
    // wrong key
    write_one(&input, "ids", OwnedTensor::from_i64(&[1, 2], vec![1, 2]));
    assert_clean_failure(&args, &["input_ids", "in.safetensors"]);
    // float ids
    write_one(
        &input,
        "input_ids",
        OwnedTensor::from_f32(&[1.0, 2.0], vec![1, 2], StoreDtype::F32),
    );
    assert_clean_failure(&args, &["input_ids", "I64"]);
    assert!(!Path::new(&out).exists(), "no output on failure");
}

#[test]
fn bad_generate_arguments() {
    let model = model_dir();
    for (bad, needles) in [
        (
            ["--prompt-ids", "1,600"].as_slice(),
            ["600", "vocabulary"].as_slice(),
        ),
        (
            &["--prompt-ids", "1", "--temperature", "0"],
            &["temperature"],
        ),
        (&["--prompt-ids", "1", "--top-p", "1.5"], &["top-p"]),
    ] {
        let mut args = vec!["generate", "--model", &model];
        args.extend_from_slice(bad);
        assert_clean_failure(&args, needles);
    }
}

#[test]
fn both_cpu_backends_and_thread_counts_give_the_reference_logits() {
    let dir = tempfile::tempdir().unwrap();
    let input = tiny().join("reference.safetensors");
    let (expected, _) = reference(&tiny()).read_f32("logits").unwrap();
    let model = model_dir();
    for extra in [
        ["--backend", "cpu", "--threads", "1"],
        ["--backend", "cpu", "--threads", "2"],
        ["--backend", "ndarray", "--threads", "2"],
    ] {
        let out = dir
            .path()
            .join(format!("{}-{}.safetensors", extra[1], extra[3]));
        let mut args = logits_args(&model, &input, &out);
        args.extend(extra);
        let o = skipgpt(&args);
        assert!(o.status.success(), "{extra:?}: {}", stderr(&o));
        let (logits, _) = TensorFile::open(&out).unwrap().read_f32("logits").unwrap();
        let d = max_abs_diff(&logits, &expected);
        assert!(d < 1e-4, "{extra:?}: logits differ by {d}");
    }
    let out = dir.path().join("none.safetensors");
    let mut args = logits_args(&model, &input, &out);
    args.extend(["--threads", "0"]);
    assert_clean_failure(&args, &["--threads"]);
}

/// `--dtype f16|bf16` holds the matrices in half precision: the tiny model's logits (values up to
/// a few units) move by the rounding of 11 or 8 significant bits, not more; a backend without
/// half types refuses, naming itself and the dtype.
#[test]
fn half_precision_weights_give_logits_close_to_f32() {
    let dir = tempfile::tempdir().unwrap();
    let input = tiny().join("reference.safetensors");
    let (expected, _) = reference(&tiny()).read_f32("logits").unwrap();
    let scale = expected.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let model = model_dir();
    for (dtype, tolerance) in [("f32", 1e-4), ("f16", 5e-3), ("bf16", 5e-2)] {
        let out = dir.path().join(format!("{dtype}.safetensors"));
        let mut args = logits_args(&model, &input, &out);
        args.extend(["--backend", "cpu", "--dtype", dtype]);
        let o = skipgpt(&args);
        assert!(o.status.success(), "{dtype}: {}", stderr(&o));
        let (logits, _) = TensorFile::open(&out).unwrap().read_f32("logits").unwrap();
        let d = max_abs_diff(&logits, &expected);
        eprintln!("--dtype {dtype}: max |Δ logits| {d:.2e} (logits up to {scale:.2})");
        assert!(d < tolerance * scale, "{dtype}: logits differ by {d}");
        if dtype != "f32" {
            assert!(d > 0.0, "{dtype}: the weights were not rounded");
        }
    }
    let out = dir.path().join("ndarray.safetensors");
    let mut args = logits_args(&model, &input, &out);
    args.extend(["--backend", "ndarray", "--dtype", "f16"]);
    assert_clean_failure(&args, &["ndarray", "float16"]);
}

/// Several `--prompt`s of different lengths decode in one ragged batch, each continuation as it
/// would be alone, one JSON line each, in order.
#[test]
fn generate_batches_prompts_of_different_lengths() {
    let prompts = [
        "The quick brown fox",
        "A",
        "Once upon a time, in a land far away",
    ];
    let model = model_dir();
    let run = |ps: &[&str]| {
        let mut owned: Vec<String> = ["generate", "--model", &model, "--max-new-tokens", "10"]
            .into_iter()
            .chain(["--ignore-eos", "--json"])
            .map(String::from)
            .collect();
        for p in ps {
            owned.push("--prompt".into());
            owned.push(p.to_string());
        }
        let refs: Vec<&str> = owned.iter().map(String::as_str).collect();
        let o = skipgpt(&refs);
        assert!(o.status.success(), "{}", stderr(&o));
        String::from_utf8(o.stdout)
            .unwrap()
            .lines()
            .map(|l| {
                let j: serde_json::Value = serde_json::from_str(l).unwrap();
                serde_json::from_value::<Vec<u32>>(j["tokens"].clone()).unwrap()
            })
            .collect::<Vec<_>>()
    };
    let batched = run(&prompts);
    assert_eq!(batched.len(), 3);
    for (p, got) in prompts.iter().zip(&batched) {
        assert_eq!(got.len(), 10);
        assert_eq!(run(&[p]), vec![got.clone()], "prompt {p:?}");
    }
}

/// Plain `generate` (which streams its text as tokens come) prints in the end exactly the decoded
/// continuation that `--json` reports; that the text arrives early is not checked here. Past
/// the model's context it refuses up front.
#[test]
fn generate_prints_the_text_json_reports_and_refuses_to_run_past_the_context() {
    let model = model_dir();
    let base = [
        "generate",
        "--model",
        &model,
        "--prompt",
        "The quick brown fox",
        "--max-new-tokens",
        "12",
        "--ignore-eos",
    ];
    let plain = skipgpt(&base);
    assert!(plain.status.success(), "{}", stderr(&plain));
    let mut json_args = base.to_vec();
    json_args.push("--json");
    let json = skipgpt(&json_args);
    let j: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(
        String::from_utf8(plain.stdout).unwrap(),
        format!("{}\n", j["text"].as_str().unwrap())
    );
    // the tiny model's context is 256 positions
    assert_clean_failure(
        &[
            "generate",
            "--model",
            &model,
            "--prompt-ids",
            "1,2,3",
            "--max-new-tokens",
            "300",
        ],
        &["context", "256", "max_position_embeddings"],
    );
}

/// `skipgpt inspect ... | head -c 1`: the reader goes away early; the command ends quietly,
/// as Unix tools do, instead of panicking on the broken pipe.
#[cfg(unix)]
#[test]
fn a_closed_pipe_ends_the_command_quietly() {
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_skipgpt"))
        .args(["inspect", "--model", &model_dir()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // close the reading end before anything is printed
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert!(!err.contains("panicked"), "{err}");
    assert_ne!(out.status.code(), Some(101), "{err}");
}

/// `&str`s of owned arguments.
fn refs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

#[test]
fn self_data_and_eval_fidelity_run_from_the_command_line_and_refuse_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.txt");
    std::fs::write(&prompts, "Hello there\n# skipped\nThe cat\n").unwrap();
    let out = dir.path().join("self.jsonl");
    let routed = tiny().join("model-routed").display().to_string();
    let model = model_dir();
    // `self-data` on the fixture with these prompts, into `out`, and `extra`
    let self_data_args = |prompts: &Path, extra: &[&'static str]| -> Vec<String> {
        let mut a = vec!["self-data", "--model", &model, "--prompts"]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>();
        a.extend([prompts.display().to_string(), "--out".into()]);
        a.push(out.display().to_string());
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    };
    let a = self_data_args(
        &prompts,
        &["--raw-prompts", "--max-new-tokens", "8", "--json"],
    );
    let o = skipgpt(&refs(&a));
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["records"], 2);
    assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), 2);

    // the routed fixture against its own weights run dense, on the self-data and the prompts
    let r = skipgpt_json(&[
        "eval-fidelity",
        "--model",
        &routed,
        "--data",
        out.to_str().unwrap(),
        "--seq-len",
        "4",
        "--prompts",
        prompts.to_str().unwrap(),
        "--raw-prompts",
        "--max-new-tokens",
        "6",
        "--json",
    ]);
    let kl = r["text"]["kl"].as_f64().unwrap();
    let agreement = r["text"]["agreement"].as_f64().unwrap();
    assert!(kl >= 0.0 && (0.0..=1.0).contains(&agreement), "{r}");
    assert_eq!(r["generation"]["prompts"], 2);
    assert_eq!(r["answers"].as_array().unwrap().len(), 2);

    // bad input: clear errors naming what is wrong
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "# nothing\n\n").unwrap();
    let a = self_data_args(&empty, &["--raw-prompts"]);
    assert_clean_failure(&refs(&a), &["empty.txt", "at least one prompt"]);
    assert_clean_failure(
        &["eval-fidelity", "--model", &routed],
        &["--data", "--prompts"],
    );
    // the fixture ships no chat template: the chat format cannot be had without one
    let a = self_data_args(&prompts, &[]);
    assert_clean_failure(&refs(&a), &["tokenizer_config.json"]);
}
