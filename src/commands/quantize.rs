//! `skipgpt quantize`: a GGUF rewritten with its matrices in one of llama.cpp's types or mixes
//! (Q4_K_M: Q4_K with Q6_K for some value and down projections), metadata (tokenizer, chat
//! template) carried over, as `llama-quantize` writes it.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;
use skipgpt_model::io::gguf::{is_gguf, quantize_gguf, QuantizeTarget};

use super::Progress;

#[derive(Args, Debug)]
pub struct QuantizeArgs {
    /// The GGUF file to read (any type this program reads: F32, F16, BF16, Q4_0, Q4_1, Q5_0,
    /// Q5_1, Q8_0, Q4_K, Q5_K, Q6_K), or a LLaMA model directory, read as llama.cpp's
    /// convert_hf_to_gguf.py would write it (no intermediate file).
    #[arg(long)]
    pub model: PathBuf,
    /// The type of the matrices written, as llama-quantize's types of the same names: the
    /// output matrix gets Q6_K, the K mixes Q6_K for some value and down projections, and
    /// rows of no whole K block the nearest 32-value type (norms and vectors stay as they are).
    #[arg(long = "type", value_enum)]
    pub target: QuantizeTarget,
    /// The GGUF file to write (replaced in one rename once it is whole).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: QuantizeArgs) -> Result<()> {
    if !args.model.is_dir() && !is_gguf(&args.model) {
        bail!(
            "{}: neither a GGUF file nor a model directory (config.json, model.safetensors, \
             tokenizer.json)",
            args.model.display()
        );
    }
    if args.model.join("routers.safetensors").is_file() {
        eprintln!(
            "note: {}'s routers are not part of a GGUF; run the quantized file with --routers {}",
            args.model.display(),
            args.model.display()
        );
    }
    let t = Instant::now();
    let bar = Progress::bytes();
    let report = quantize_gguf(
        &args.model,
        &args.out,
        args.target,
        &mut |done, total, name| bar.update(done, total, name),
    )?;
    bar.finish();
    let conversions: Vec<String> = report
        .conversions
        .iter()
        .map(|(what, n)| format!("{n} {what}"))
        .collect();
    println!(
        "quantized {} ({:.1} MB) → {} ({:.1} MB) in {:.1} s: {}",
        args.model.display(),
        report.bytes_read as f64 / 1e6,
        args.out.display(),
        report.bytes_written as f64 / 1e6,
        t.elapsed().as_secs_f64(),
        conversions.join(", ")
    );
    if report.requantized > 0 {
        eprintln!(
            "note: {} tensors were already quantized in another format; quantizing them again \
             rounds their rounded values, so the file is no more accurate than its source",
            report.requantized
        );
    }
    Ok(())
}
