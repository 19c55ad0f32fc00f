//! The report's rows: every model `cargo xtask fidelity` makes or measures, named as its
//! directory under `eval/`, with what it is and its budget.

use super::{attention_budgets, budget_row, wide_row, Settings, BUDGET_FACTOR, CALIBRATED};

/// The rows of the report, in order: (name under `eval/`, what it is, budget).
pub(super) fn rows(settings: &Settings) -> Vec<(String, String, Option<u32>)> {
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
    ];
    let mut rows: Vec<(String, String, Option<u32>)> = fixed
        .iter()
        .map(|(n, w, t)| (n.to_string(), w.to_string(), Some(*t)))
        .collect();
    for percent in CALIBRATED {
        rows.push((
            format!("s1-lm-t25-cal{percent}"),
            format!("self-data, lm: the 25% routers calibrated to {percent}%"),
            Some(percent),
        ));
    }
    rows.push((
        "s2-lm-t25-cal10".into(),
        "self-data, lm: the 25% routers calibrated to 10% + LoRA (kl)".into(),
        Some(10),
    ));
    rows.push((
        budget_row(),
        format!("self-data, lm: routers calibrated to 20% + LoRA (kl), {BUDGET_FACTOR}× the steps"),
        Some(25),
    ));
    rows.push((
        wide_row(),
        "self-data, lm: routers calibrated to 20% + LoRA (kl) on every projection, r 64".into(),
        Some(25),
    ));
    for t in attention_budgets(settings) {
        rows.push((
            format!("attn-drop-t{t}"),
            "attention modules dropped (static, Block Influence)".into(),
            Some(t),
        ));
    }
    let mut targets = settings.targets.clone();
    targets.sort_unstable();
    for t in targets.into_iter().filter(|&t| t != 25) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attention_is_dropped_only_at_budgets_it_can_fill_and_every_row_is_named_once() {
        let settings = Settings {
            targets: vec![40, 10, 25, 5],
            ..Settings::default()
        };
        assert_eq!(attention_budgets(&settings), vec![5, 10]);
        let names: Vec<String> = rows(&settings).into_iter().map(|r| r.0).collect();
        for expected in [
            "attn-drop-t5",
            "attn-drop-t10",
            "s1-lm-t25-cal40",
            "s2-lm-t40",
        ] {
            assert!(
                names.iter().any(|n| n == expected),
                "{expected} in {names:?}"
            );
        }
        assert!(!names
            .iter()
            .any(|n| n == "attn-drop-t25" || n == "attn-drop-t40"));
        let mut unique = names.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), names.len(), "{names:?}");
    }
}
