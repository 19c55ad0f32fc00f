//! `skipgpt perplexity`: the perplexity of one text file as llama.cpp's `llama-perplexity`
//! computes it (chunks of `--ctx` tokens, the second half of each scored), so that a GGUF run
//! here and there can be compared number for number.

use std::path::PathBuf;

use anyhow::{Context, Result};
use burn::tensor::backend::Backend;
use clap::Args;
use skipgpt_eval::{chunked_perplexity, ChunkedPerplexity};
use skipgpt_model::Tokenizer;

use crate::args::RoutingArgs;
use crate::backend::BackendKind;
use crate::commands::apply_routing;
use crate::with_backend;

#[derive(Args, Debug)]
pub struct PerplexityArgs {
    #[command(flatten)]
    pub model: crate::args::ModelArgs,
    /// The text to score (UTF-8), tokenized whole, as `llama-perplexity -f` reads it.
    #[arg(long, short = 'f')]
    pub file: PathBuf,
    /// Tokens per chunk (`llama-perplexity -c`).
    #[arg(long, short = 'c', default_value_t = 512, value_parser = crate::args::positive)]
    pub ctx: usize,
    /// Score at most N chunks (`llama-perplexity --chunks`).
    #[arg(long, value_parser = crate::args::positive)]
    pub chunks: Option<usize>,
    #[command(flatten)]
    pub routing: RoutingArgs,
    #[command(flatten)]
    pub report: crate::args::ReportArgs,
}

pub fn run(backend: BackendKind, args: PerplexityArgs) -> Result<()> {
    let report = with_backend!(backend, |B, device| perplexity_on::<B>(&args, &device))?;
    args.report.show(&report, |r: &ChunkedPerplexity| {
        println!(
            "perplexity {:.4} ± {:.5} over {} chunks of {} ({} tokens scored; nll {:.5})  \
             skip: attention {:.1}%  mlp {:.1}%",
            r.perplexity,
            r.perplexity_error,
            r.chunks,
            r.ctx,
            r.tokens,
            r.nll,
            100.0 * r.attn_skip,
            100.0 * r.mlp_skip
        )
    })
}

fn perplexity_on<B: Backend>(
    args: &PerplexityArgs,
    device: &B::Device,
) -> Result<ChunkedPerplexity> {
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("{}: cannot read the text", args.file.display()))?;
    let mut pretrained = args.model.load::<B>(device)?;
    apply_routing(&mut pretrained.model, &args.routing, device);
    let tokenizer = pretrained
        .tokenizer
        .as_ref()
        .with_context(|| format!("{}: the model has no tokenizer", args.model.dir.display()))?;
    let tokens = tokenizer.encode(&text)?;
    let bos = added_bos(tokenizer)?;
    let bar = super::Progress::count("chunks");
    let report = chunked_perplexity(
        &pretrained.model,
        &tokens,
        args.ctx,
        bos,
        args.chunks,
        pretrained.model.routing,
        |done, total| bar.update(done as u64, total as u64, ""),
    )
    .with_context(|| format!("{}", args.file.display()))?;
    bar.finish();
    Ok(report)
}

/// The token the tokenizer puts before every text, if it puts one there (llama.cpp's
/// `add_bos_token`): what `llama-perplexity` writes over each chunk's first token.
fn added_bos(tokenizer: &Tokenizer) -> Result<Option<u32>> {
    let with = tokenizer.encode("a")?;
    let (plain, _) = tokenizer.encode_plain("a")?;
    Ok((with.len() > plain.len() && with.first() != plain.first()).then(|| with[0]))
}
