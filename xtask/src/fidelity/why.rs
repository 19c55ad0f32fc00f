//! The page's account of the goals it misses: by how much the published 25% point misses each
//! one, and why, from the rows themselves (what any removal costs on this model, the static
//! rivals, the objectives, where the routers were trained, and a longer and a wider stage 2).

use super::report::Measured;
use super::{budget_row, wide_row, BUDGET_FACTOR, POINT};
use skipgpt_eval::fidelity::{GenerationFidelity, TextFidelity};
use std::fmt::Write as _;

/// The row `name`'s text and answer measurements, once both are finished.
fn finished<'a>(
    rows: &'a [Measured],
    name: &str,
) -> Option<(&'a TextFidelity, &'a GenerationFidelity)> {
    let mut all = super::report::finished(rows);
    all.find(|(r, _, _)| r.name == name).map(|(_, t, g)| (t, g))
}

/// "1.669× at 19.6% skip, 65.4% agreement, 4 loops" for a finished row.
fn summary(t: &TextFidelity, g: &GenerationFidelity) -> String {
    format!(
        "{:.3}× at {:.1}% skip, {:.1}% agreement, {} of {} answers looping",
        t.perplexity_ratio,
        100.0 * t.param_skip,
        100.0 * g.agreement,
        g.routed_loops,
        g.prompts
    )
}

/// The longer and the wider stage 2 against the usual one, all else equal.
pub(super) fn training_budget(rows: &[Measured]) -> String {
    let mut md = String::from("\n## The training budget\n\n");
    let usual = format!("s2-{POINT}");
    let variants = [
        (
            budget_row(),
            format!("trained {BUDGET_FACTOR} times as long (the same routers, data, rank and learning rate)"),
        ),
        (
            wide_row(),
            "with adapters on all seven projections at rank 64 (α 128) instead of q, v and gate at rank 16, for the usual steps".into(),
        ),
    ];
    for (name, what) in variants {
        let _ = match (finished(rows, &usual), finished(rows, &name)) {
            (Some((ut, ug)), Some((vt, vg))) => writeln!(
                md,
                "- The 25% point's stage 2 {what} (`{name}`): {} against {} (`{usual}`). KL to dense on the general text {:.3} against {:.3}.",
                summary(vt, vg),
                summary(ut, ug),
                vt.kl,
                ut.kl
            ),
            _ => writeln!(
                md,
                "- The 25% point's stage 2 {what} (`{name}`): not finished yet, `cargo xtask fidelity --from budget`."
            ),
        };
    }
    md
}

/// By how much the 25% point misses, and the rows that say why.
pub(super) fn why_missed(rows: &[Measured]) -> String {
    let mut md = String::from("\n## Why the 25% goals are missed\n\n");
    let point = format!("s2-{POINT}");
    let Some((t, g)) = finished(rows, &point) else {
        return md + "The 25% point is not finished yet.\n";
    };
    let _ = writeln!(
        md,
        "By how much (`{point}`, published as `models/smollm2-135m/skipgpt-t25`): perplexity {:.3}× dense where the goal allows 1.15× (+{:.1}% against +15%); {:.1}% agreement with the dense answers against 85%; repetition {:.3} against at most {:.3}; {} looping answers against none. Why, from the rows above:\n",
        t.perplexity_ratio,
        100.0 * (t.perplexity_ratio - 1.0),
        100.0 * g.agreement,
        g.routed_repetition,
        g.dense_repetition + 0.05,
        g.routed_loops
    );
    if let Some((ct, _)) = finished(rows, "s1-lm-t25-cal5") {
        let per_point = 100.0 * (ct.perplexity_ratio - 1.0) / (100.0 * ct.param_skip);
        let _ = writeln!(
            md,
            "- **Every skip costs more on this model than the goal allows.** The cheapest SkipGPT model, `s1-lm-t25-cal5`, skips {:.1}% of the parameters for {:.1}% perplexity: {per_point:.1}% per point of skip, where 1.15× at 20% allows 0.75% per point. The cost per point does not fall at the larger budgets (the table above).",
            100.0 * ct.param_skip,
            100.0 * (ct.perplexity_ratio - 1.0)
        );
    }
    if let Some((st, _)) = finished(rows, "shortgpt-t25") {
        let _ = writeln!(
            md,
            "- **This model has no layer to spare.** ShortGPT, whose paper removes about a quarter of the layers of 7B and 13B LLaMAs and keeps most of their benchmark scores, costs {:.3}× here at {:.1}% skip: the 30 narrow layers (width 576) of SmolLM2-135M carry less that is redundant.",
            st.perplexity_ratio,
            100.0 * st.param_skip
        );
    }
    let objectives: Vec<String> = ["s2-lm-t25-cal20", "s2-kl-t25-cal20", "s1-lmkl-t25"]
        .iter()
        .filter_map(|n| finished(rows, n).map(|(t, g)| format!("`{n}` {}", summary(t, g))))
        .collect();
    if !objectives.is_empty() {
        let _ = writeln!(
            md,
            "- **No token objective closes it.** {}.",
            objectives.join("; ")
        );
    }
    if let (Some((trained, _)), Some((calibrated, _))) = (
        finished(rows, "s2-lm-t15"),
        finished(rows, "s1-lm-t25-cal15"),
    ) {
        let _ = writeln!(
            md,
            "- **Nor where the routers are trained.** At 15%, routers trained at that budget with a stage 2 reach {:.3}× ({:.1}% skip); the 25% routers merely calibrated down to it, {:.3}× ({:.1}%).",
            trained.perplexity_ratio,
            100.0 * trained.param_skip,
            calibrated.perplexity_ratio,
            100.0 * calibrated.param_skip
        );
    }
    for (name, adjective, what) in [
        (
            budget_row(),
            "longer",
            format!("{BUDGET_FACTOR} times the steps"),
        ),
        (
            wide_row(),
            "wider",
            "Adapters on every projection at rank 64".into(),
        ),
    ] {
        let Some((vt, _)) = finished(rows, &name) else {
            continue;
        };
        let lead = if vt.perplexity_ratio < t.perplexity_ratio - 0.05 {
            format!("A {adjective} stage 2 helps, far from enough.")
        } else {
            format!("Nor a {adjective} stage 2.")
        };
        let _ = writeln!(
            md,
            "- **{lead}** {what}: {:.3}× against {:.3}× (the next section).",
            vt.perplexity_ratio, t.perplexity_ratio
        );
    }
    md
}
