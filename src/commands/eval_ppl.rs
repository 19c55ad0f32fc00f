//! `skipgpt eval-ppl`: perplexity of a model on a corpus, dense or routed.

use anyhow::Result;
use clap::Args;
use skipgpt_pipeline::evaluate::{EvalPplConfig, EvalPplReport, Split};

use crate::args::CorpusArgs;
use crate::args::RoutingArgs;
use crate::backend::BackendKind;
use crate::commands::routing_of;
use crate::with_backend;

#[derive(Args, Debug)]
pub struct EvalPplArgs {
    #[command(flatten)]
    pub model: crate::args::ModelArgs,
    #[command(flatten)]
    pub corpus: CorpusArgs,
    #[arg(long, default_value_t = 8, value_parser = crate::args::positive)]
    pub batch_size: usize,
    /// Which sequences to evaluate.
    #[arg(long, value_enum, default_value = "valid")]
    pub split: SplitArg,
    /// Evaluate at most N sequences of the split, evenly spaced over it: a fixed slice (the
    /// same N picks the same sequences) for corpora too large to score whole.
    #[arg(long, value_parser = crate::args::positive)]
    pub max_sequences: Option<usize>,
    #[command(flatten)]
    pub routing: RoutingArgs,
    #[command(flatten)]
    pub report: crate::args::ReportArgs,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum SplitArg {
    Valid,
    Train,
    All,
}

impl EvalPplArgs {
    pub fn config(&self) -> EvalPplConfig {
        EvalPplConfig {
            model: self.model.source(),
            corpus: self.corpus.config(),
            split: match self.split {
                SplitArg::Valid => Split::Valid,
                SplitArg::Train => Split::Train,
                SplitArg::All => Split::All,
            },
            max_sequences: self.max_sequences,
            batch_size: self.batch_size,
            routing: routing_of(&self.routing),
            routing_seed: self.routing.routing_seed,
            quiet: self.report.json,
        }
    }
}

pub fn run(backend: BackendKind, args: EvalPplArgs) -> Result<()> {
    let config = args.config();
    let report = with_backend!(
        backend,
        |B, device| skipgpt_pipeline::evaluate::eval_ppl::<B>(&config, &device)
    )?;
    args.report.show(&report, print_perplexities)
}

/// One line per routing: perplexity, NLL, tokens, skip rates, next-token accuracy.
fn print_perplexities(report: &EvalPplReport) {
    for (name, r) in [
        ("dense", Some(&report.dense)),
        ("routed", report.routed.as_ref()),
    ] {
        let Some(r) = r else { continue };
        println!(
            "{name:<7} perplexity {:>9.3}  (nll {:.4}, {} tokens)  skip: attention {:.1}%  mlp {:.1}%  params {:.1}%  next-token accuracy {:.1}%",
            r.perplexity,
            r.nll,
            r.tokens,
            100.0 * r.attn_skip,
            100.0 * r.mlp_skip,
            100.0 * r.param_skip,
            100.0 * r.accuracy
        );
    }
}
