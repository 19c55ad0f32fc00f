//! `skipgpt pretrain`, `tune-routers` and `demo` end to end on tiny settings: the files they
//! write, resuming, and clear errors on bad input.

use std::path::Path;

use crate::common::*;

const CORPUS: [&str; 6] = ["--synthetic", "80", "--seq-len", "32", "--batch-size", "8"];

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `pretrain` of a tiny model into `out` (2 layers unless `layers` says otherwise, 30 steps in
/// two checkpoints), on the synthetic corpus, with `extra` flags.
fn pretrain_args<'a>(out: &'a Path, layers: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "pretrain",
        "--out",
        s(out),
        "--vocab-size",
        "300",
        "--hidden-size",
        "32",
        "--layers",
        layers,
        "--heads",
        "2",
        "--kv-heads",
        "1",
        "--steps",
        "30",
        "--checkpoint-every",
        "15",
    ];
    args.extend(CORPUS);
    args.extend(extra);
    args
}

fn pretrain(out: &Path) {
    let o = skipgpt(&pretrain_args(out, "2", &[]));
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("step 30/30"), "{err}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("validation perplexity"));
}

/// tune-routers on the synthetic corpus; the target is 0.5 unless `extra` sets one.
fn tune_args<'a>(model: &'a Path, out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["tune-routers", "--model", s(model), "--out", s(out)];
    if !extra.contains(&"--target-sparsity") {
        args.extend(["--target-sparsity", "0.5"]);
    }
    args.extend(["--steps", "40", "--lr", "3e-2", "--checkpoint-every", "20"]);
    args.extend(CORPUS);
    args.extend(extra);
    args
}

#[test]
#[ignore = "slow: trains end to end through the CLI; run with -- --include-ignored"]
fn pretrain_then_tune_routers_then_evaluate() {
    let dir = tempfile::tempdir().unwrap();
    let (dense, tuned) = (dir.path().join("dense"), dir.path().join("tuned"));
    pretrain(&dense);
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        assert!(dense.join(f).exists(), "{f}");
    }
    assert!(skipgpt(&["inspect", "--model", s(&dense)]).status.success());

    let o = skipgpt(&tune_args(&dense, &tuned, &[]));
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert_mentions(&err, &["skip", "τ"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_mentions(&out, &["dense", "routed"]);

    // a SkipGPT directory: the base untouched, routers and their configuration added
    assert_eq!(
        std::fs::read(dense.join("model.safetensors")).unwrap(),
        std::fs::read(tuned.join("model.safetensors")).unwrap()
    );
    let routing: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tuned.join("skipgpt.json")).unwrap()).unwrap();
    assert_eq!(routing["target_sparsity"], 0.5);
    assert_eq!(routing["target_unit"], "params");
    assert_eq!(routing["router"], "linear");
    // the skip rate the last steps trained at
    let log = std::fs::read_to_string(tuned.join("train/metrics.jsonl")).unwrap();
    let last: serde_json::Value = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .rfind(|r| r["split"] == "train")
        .unwrap();
    let skip = last["values"]["Skip"].as_f64().unwrap();
    assert!((skip - 0.5).abs() < 0.1, "{last}");

    // eval-ppl loads it and routes
    let mut args = vec!["eval-ppl", "--model", s(&tuned), "--json"];
    args.extend(CORPUS);
    let o = skipgpt(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let routed_skip =
        j["routed"]["attn_skip"].as_f64().unwrap() + j["routed"]["mlp_skip"].as_f64().unwrap();
    assert!(routed_skip > 0.2, "{j}");
    // its dense column is the pretrained model's own perplexity (the base is untouched), and
    // routing costs some of it
    let mut args = vec!["eval-ppl", "--model", s(&dense), "--json"];
    args.extend(CORPUS);
    let o = skipgpt(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let base: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let dense_ppl = j["dense"]["perplexity"].as_f64().unwrap();
    assert_eq!(
        dense_ppl,
        base["dense"]["perplexity"].as_f64().unwrap(),
        "{j}\n{base}"
    );
    assert!(
        j["routed"]["perplexity"].as_f64().unwrap() > dense_ppl,
        "{j}"
    );

    // the run cannot be started over by accident, resumes when asked (here: already done),
    // and refuses to resume with other settings
    assert_clean_failure(&tune_args(&dense, &tuned, &[]), &["--resume"]);
    let o = skipgpt(&tune_args(&dense, &tuned, &["--resume"]));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("resuming"), "{}", stderr(&o));
    assert_clean_failure(
        &tune_args(&dense, &tuned, &["--resume", "--weight-decay", "0.1"]),
        &["weight_decay", "0.01", "0.1"],
    );

    // data-parallel on two workers (both the CPU here): a step sees twice the batch, and a run
    // resumes only on as many devices as it started on
    let dp = dir.path().join("dp");
    let o = skipgpt(&tune_args(&dense, &dp, &["--devices", "0,1"]));
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("data-parallel on 2 devices"), "{err}");
    assert!(err.contains("40 steps of 16 sequences"), "{err}");
    assert!(err.contains("step 40/40"), "{err}");
    assert_clean_failure(
        &tune_args(&dense, &tuned, &["--resume", "--devices", "0,1"]),
        &["devices", "1", "2"],
    );
    assert_clean_failure(
        &tune_args(&dense, &dir.path().join("t5"), &["--devices", "0,0"]),
        &["--devices", "device 0 is given twice"],
    );

    // bad input
    assert_clean_failure(
        &tune_args(
            &dense,
            &dir.path().join("t2"),
            &["--target-sparsity", "1.0"],
        ),
        &["target_sparsity", "[0, 1)"],
    );
    assert_clean_failure(&tune_args(&dense, &dense, &[]), &["input model"]);
    let missing = dir.path().join("nope");
    assert_clean_failure(&tune_args(&missing, &dir.path().join("t3"), &[]), &["nope"]);
    let no_tok = copy_dir(&dense);
    std::fs::remove_file(no_tok.path().join("tokenizer.json")).unwrap();
    assert_clean_failure(
        &tune_args(no_tok.path(), &dir.path().join("t4"), &[]),
        &["tokenizer.json"],
    );
}

#[test]
fn bad_pretrain_settings_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m");
    let fails = |extra: &[&str], needles: &[&str]| {
        let mut args = vec!["pretrain", "--out", s(&out)];
        args.extend(extra);
        assert_clean_failure(&args, needles);
    };
    fails(
        &["--synthetic", "20", "--hidden-size", "30", "--heads", "4"],
        &["--hidden-size 30", "--heads 4"],
    );
    fails(&["--data", "/no/such/corpus.txt"], &["/no/such/corpus.txt"]);
    fails(
        &["--synthetic", "20", "--vocab-size", "10"],
        &["vocab_size", "10"],
    );
    assert!(!out.join("config.json").exists());
}

#[test]
#[ignore = "slow: trains end to end through the CLI; run with -- --include-ignored"]
fn demo_runs_end_to_end_and_reruns_from_its_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "demo",
        "--out",
        s(dir.path()),
        "--docs",
        "60",
        "--pretrain-steps",
        "6",
        "--tune-steps",
        "4",
        "--lora-steps",
        "4",
        "--mc-examples",
        "4",
    ];
    let o = skipgpt(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    for row in [
        "dense",
        "SkipGPT-RT + LoRA",
        "MoD-D",
        "ShortGPT",
        "MC acc",
        "speedup",
    ] {
        assert!(out.contains(row), "{row}: {out}");
    }
    let p = dir.path();
    assert!(p.join("skipgpt-t25/routers.safetensors").exists());
    assert!(p
        .join("skipgpt-lora-t25/adapter/adapter_model.safetensors")
        .exists());
    for picture in [
        "skip-per-layer",
        "skip-by-position",
        "compute-by-frequency",
        "token-heatmap",
    ] {
        let svg = std::fs::read_to_string(p.join(format!("analysis-t25/{picture}.svg"))).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("</svg>"),
            "{picture}"
        );
    }
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(p.join("summary-t25.json")).unwrap()).unwrap();
    let rows = summary["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 5);
    // ShortGPT removes one of the tiny model's 4 layers: exactly 25% of the parameters
    assert_eq!(rows[4]["param_skip"], 0.25);
    // each row's accuracy is the mean of its tasks' accuracies, each over 4 examples
    for r in rows {
        let per_task: Vec<f64> = r["mc_acc_per_task"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t[1].as_f64().unwrap())
            .collect();
        assert_eq!(per_task.len(), 3, "{r}");
        for acc in &per_task {
            assert_eq!((acc * 4.0).fract(), 0.0, "{r}: {acc} is not k/4");
        }
        let mean = per_task.iter().sum::<f64>() / 3.0;
        assert!((r["mc_acc"].as_f64().unwrap() - mean).abs() < 1e-12, "{r}");
    }
    // a second run reuses the finished runs rather than failing on them
    let o = skipgpt(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("resuming"));
}

fn lora_args<'a>(model: &'a Path, out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "finetune-lora",
        "--model",
        s(model),
        "--out",
        s(out),
        "--json",
    ];
    args.extend(["--steps", "40", "--lr", "5e-3", "--checkpoint-every", "20"]);
    args.extend(CORPUS);
    args.extend(extra);
    args
}

/// The validation perplexities of finetune-lora's report (`--json`): (before, after).
fn before_after(stdout: &[u8]) -> (f64, f64) {
    let report: serde_json::Value = serde_json::from_slice(stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(stdout)));
    let ppl = |when: &str| report["validation"][when]["perplexity"].as_f64().unwrap();
    (ppl("before"), ppl("after"))
}

#[test]
#[ignore = "slow: trains end to end through the CLI; run with -- --include-ignored"]
fn lora_stage_two_joint_and_dense_lora_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    let (dense, tuned) = (p("dense"), p("tuned"));
    pretrain(&dense);
    let o = skipgpt(&tune_args(&dense, &tuned, &["--target-sparsity", "0.25"]));
    assert!(o.status.success(), "{}", stderr(&o));

    // stage 2: merged SkipGPT directory plus the PEFT adapter
    let lora = p("lora");
    let o = skipgpt(&lora_args(&tuned, &lora, &[]));
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert_mentions(&err, &["frozen routers", "skip"]);
    let (before, after) = before_after(&o.stdout);
    assert!(after < before, "{before} -> {after}");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "skipgpt.json",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
    ] {
        assert!(lora.join(f).exists(), "{f}");
    }
    // the routers are frozen: byte-equal; the base changed by the merged adapters
    let read = |d: &Path, f: &str| std::fs::read(d.join(f)).unwrap();
    assert_eq!(
        read(&tuned, "routers.safetensors"),
        read(&lora, "routers.safetensors")
    );
    assert_ne!(
        read(&tuned, "model.safetensors"),
        read(&lora, "model.safetensors")
    );
    // the merged directory serves like any SkipGPT model, through the sparse engine
    let o = skipgpt(&[
        "generate",
        "--model",
        s(&lora),
        "--prompt",
        "the old dog",
        "--max-new-tokens",
        "5",
        "--stats",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("engine sparse"), "{}", stderr(&o));

    // a run killed at its last checkpoint resumes to the same adapters, dropout included
    let killed = p("killed");
    assert!(skipgpt(&lora_args(&tuned, &killed, &[])).status.success());
    let ck = killed.join("train/checkpoint");
    std::fs::remove_file(ck.join("optim-2.mpk")).unwrap();
    std::fs::remove_file(ck.join("scheduler-2.mpk")).unwrap();
    let o = skipgpt(&lora_args(&tuned, &killed, &["--resume"]));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        read(&lora, "adapter/adapter_model.safetensors"),
        read(&killed, "adapter/adapter_model.safetensors")
    );

    // --adapter-only writes the PEFT files alone; --resume-adapter starts from them
    let only = p("only");
    let o = skipgpt(&lora_args(&tuned, &only, &["--adapter-only"]));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(only.join("adapter_model.safetensors").exists());
    assert!(!only.join("model.safetensors").exists());
    let again = p("again");
    let o = skipgpt(&lora_args(
        &tuned,
        &again,
        &["--resume-adapter", s(&only), "--merge"],
    ));
    assert!(o.status.success(), "{}", stderr(&o));
    let (resumed_before, _) = before_after(&o.stdout);
    assert_eq!(resumed_before, after, "did not start from the adapter");
    assert!(!again.join("adapter").exists());

    // dense + LoRA: a model without routers
    let dense_lora = p("dense-lora");
    let o = skipgpt(&lora_args(&dense, &dense_lora, &["--targets", "q,v,gate"]));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("dense + LoRA"), "{}", stderr(&o));
    assert!(!dense_lora.join("routers.safetensors").exists());
    let (b, a) = before_after(&o.stdout);
    assert!(a < b, "{b} -> {a}");

    // joint: routers and adapters together, written merged with the adapter beside
    let joint = p("joint");
    let o = skipgpt(&tune_args(&dense, &joint, &["--joint-lora", "--rank", "4"]));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("joint variant"), "{}", stderr(&o));
    let cfg: serde_json::Value =
        serde_json::from_slice(&read(&joint, "adapter/adapter_config.json")).unwrap();
    assert_eq!(cfg["r"], 4);
    assert!(joint.join("routers.safetensors").exists());
    assert_ne!(
        read(&dense, "model.safetensors"),
        read(&joint, "model.safetensors")
    );

    // bad input names what is wrong
    assert_clean_failure(
        &lora_args(&tuned, &p("x1"), &["--targets", "q_proj,qkv"]),
        &["qkv", "q_proj"],
    );
    assert_clean_failure(
        &lora_args(&tuned, &p("x2"), &["--resume-adapter", s(&p("nope"))]),
        &["nope", "adapter_config.json"],
    );
    assert_clean_failure(
        &lora_args(&tuned, &p("x3"), &["--lora-dropout", "1.5"]),
        &["dropout", "1.5"],
    );
    assert_clean_failure(&lora_args(&tuned, &tuned, &[]), &["input model"]);
}

/// A run whose loss stops being finite ends with a message naming the step and a non-zero
/// exit; it saves nothing (no NaN model) and keeps what was in `--out` before.
#[test]
fn a_diverging_run_stops_and_saves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("nan");
    let args = pretrain_args(&out, "2", &["--lr", "1e30", "--grad-clip", "0"]);
    let o = skipgpt(&args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_mentions(&err, &["diverged", "step"]);
    assert!(
        !out.join("model.safetensors").exists(),
        "a diverged model was saved"
    );
}

/// `--resume` with another architecture is refused, naming the setting, before any work; the
/// run's files are untouched.
#[test]
fn resume_with_another_architecture_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    pretrain(&out);
    let config = std::fs::read(out.join("config.json")).unwrap();
    let args = pretrain_args(&out, "3", &["--resume"]);
    assert_clean_failure(&args, &["num_hidden_layers", "--resume"]);
    assert_eq!(std::fs::read(out.join("config.json")).unwrap(), config);
}

/// `--out` naming someone's model directory (not the input, not a run of ours) is refused, and
/// its files are left as they were.
#[test]
fn an_output_over_an_unrelated_model_is_refused() {
    let other = copy_dir(&tiny().join("model"));
    let weights = std::fs::read(other.path().join("model.safetensors")).unwrap();
    let model = tiny().join("model");
    let args = tune_args(&model, other.path(), &[]);
    assert_clean_failure(&args, &["already holds a model", "--out"]);
    assert_eq!(
        std::fs::read(other.path().join("model.safetensors")).unwrap(),
        weights
    );
}

/// A run in progress locks its directory: a second run, or a `--resume`, on the same `--out`
/// is refused naming the running process, instead of interleaving with it.
#[test]
fn a_running_run_locks_its_directory() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut args = pretrain_args(&out, "2", &[]);
    let steps = args.iter().position(|a| *a == "--steps").unwrap();
    args[steps + 1] = "100000";
    let mut first = std::process::Command::new(env!("CARGO_BIN_EXE_skipgpt"))
        .args(&args)
        .env_remove("SKIPGPT_BACKEND")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (lock, manifest) = (out.join("train/.lock"), out.join("train/run.json"));
    let t = std::time::Instant::now();
    while !(lock.exists() && manifest.exists()) {
        assert!(
            t.elapsed().as_secs() < 120,
            "the first run never started training"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let resume = pretrain_args(&out, "2", &["--resume"]);
    let pid = first.id().to_string();
    assert_clean_failure(&resume, &["in use by another run", &pid, ".lock"]);
    first.kill().unwrap();
    first.wait().unwrap();
}

/// A `--resume` of a finished run (pretraining, router tuning) rewrites its model and leaves
/// no temporary files.
#[test]
fn resuming_a_finished_run_leaves_no_temporary_files() {
    let dir = tempfile::tempdir().unwrap();
    let (model, routed) = (dir.path().join("model"), dir.path().join("routed"));
    pretrain(&model);
    let o = skipgpt(&pretrain_args(&model, "2", &["--resume"]));
    assert!(o.status.success(), "{}", stderr(&o));
    let o = skipgpt(&tune_args(&model, &routed, &[]));
    assert!(o.status.success(), "{}", stderr(&o));
    let o = skipgpt(&tune_args(&model, &routed, &["--resume"]));
    assert!(o.status.success(), "{}", stderr(&o));
    for d in [
        model.clone(),
        model.join("train"),
        routed.clone(),
        routed.join("train"),
    ] {
        let hidden: Vec<String> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(hidden.is_empty(), "{}: {hidden:?}", d.display());
    }
}
