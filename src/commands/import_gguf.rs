//! `skipgpt import-gguf`: a llama.cpp GGUF file into a Hugging Face model directory.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::Args;
use skipgpt_model::io::gguf::{import_gguf, ImportOptions};
use skipgpt_model::StoreDtype;

use super::Progress;

#[derive(Args, Debug)]
pub struct ImportGgufArgs {
    /// The GGUF file (LLaMA architecture; F32/F16/BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K,
    /// Q5_K or Q6_K tensors).
    pub file: PathBuf,
    /// The model directory to write (config.json, model.safetensors, tokenizer.json,
    /// tokenizer_config.json, generation_config.json).
    #[arg(long)]
    pub out: PathBuf,
    /// dtype of model.safetensors (quantized weights are dequantized exactly to f32; f16 and
    /// bf16 round them).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: StoreDtype,
    /// Replace the model files of an existing directory.
    #[arg(long)]
    pub overwrite: bool,
}

pub fn run(args: ImportGgufArgs) -> Result<()> {
    let opts = ImportOptions {
        dtype: args.dtype,
        overwrite: args.overwrite,
    };
    let t = Instant::now();
    let bar = Progress::bytes();
    let report = import_gguf(&args.file, &args.out, &opts, &mut |done, total, name| {
        bar.update(done, total, name)
    })?;
    bar.finish();
    let c = &report.config;
    let types: Vec<String> = report
        .source_types
        .iter()
        .map(|(k, n)| format!("{n} {k}"))
        .collect();
    println!(
        "imported {} → {} in {:.1} s: {} tensors ({}), {:.1}M parameters, {} layers, hidden {}, {} heads ({} key/value), vocab {}, {} weights ({:.0} MB)",
        args.file.display(),
        args.out.display(),
        t.elapsed().as_secs_f64(),
        report.tensors,
        types.join(", "),
        c.num_params() as f64 / 1e6,
        c.num_hidden_layers,
        c.hidden_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.vocab_size,
        c.dtype,
        report.bytes_written as f64 / 1e6,
    );
    if !report.ignored.is_empty() {
        eprintln!(
            "warning: {} GGUF tensors have no place in the model and were not imported: {}",
            report.ignored.len(),
            report.ignored.join(", ")
        );
    }
    Ok(())
}
