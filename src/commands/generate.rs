//! `skipgpt generate`: continue prompts (a batch, of any lengths), streaming text as it comes.

use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend;
use clap::Args;
use skipgpt_model::engine::generate_sparse_with;
use skipgpt_model::generate::validate_ids;
use skipgpt_model::{generate as gen, GenerateOptions, Sampling, Tokenizer};

use crate::args::{EngineArgs, RoutingArgs};
use crate::backend::BackendKind;
use crate::commands::{apply_routing, print_stats, use_sparse};
use crate::serve::text::AnswerText;
use crate::with_backend;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: crate::args::ModelArgs,
    /// Prompt text (needs tokenizer.json in the model directory). Repeat it to continue several
    /// prompts (of any lengths) in one batch: each continuation is printed on its own line
    /// (with --json, one object per line).
    #[arg(
        long,
        conflicts_with = "prompt_ids",
        required_unless_present = "prompt_ids"
    )]
    pub prompt: Vec<String>,
    /// Prompt as comma-separated token ids, e.g. 1,2,3.
    #[arg(long, value_delimiter = ',')]
    pub prompt_ids: Option<Vec<i64>>,
    /// Maximum number of tokens to generate.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Sample with this temperature instead of decoding greedily.
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Nucleus sampling: keep the smallest set of tokens holding this much probability.
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Seed for sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Keep generating past the end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print `{"tokens": [...], "text": "..."}` instead of the text (one line per prompt).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub routing: RoutingArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
}

pub fn run(backend: BackendKind, args: GenerateArgs) -> Result<()> {
    with_backend!(backend, |B, device| generate_on::<B>(&args, &device))
}

fn generate_on<B: Backend>(args: &GenerateArgs, device: &B::Device) -> Result<()> {
    let mut pretrained = args.model.load::<B>(device)?;
    apply_routing(&mut pretrained.model, &args.routing, device);
    let tokenizer = pretrained.tokenizer.as_ref();
    let prompts: Vec<Vec<u32>> = match (args.prompt.as_slice(), &args.prompt_ids) {
        (texts @ [_, ..], _) => {
            let tok = tokenizer.with_context(|| {
                format!(
                    "--prompt needs {}; pass --prompt-ids instead",
                    args.model.dir.join("tokenizer.json").display()
                )
            })?;
            texts
                .iter()
                .map(|t| tok.encode(t))
                .collect::<std::result::Result<_, _>>()?
        }
        ([], Some(ids)) => {
            validate_ids(ids, pretrained.model.config.vocab_size, "--prompt-ids")?;
            vec![ids.iter().map(|&i| i as u32).collect()]
        }
        ([], None) => bail!("give --prompt TEXT or --prompt-ids 1,2,3"),
    };
    let sampling = match (args.temperature, args.top_p) {
        (None, None) => Sampling::Greedy,
        (t, p) => Sampling::Sample {
            temperature: t.unwrap_or(1.0),
            top_p: p.unwrap_or(1.0),
            seed: args.seed,
        },
    };
    let opts = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        sampling,
        eos_token_ids: pretrained.model.config.eos_token_ids.clone(),
        ignore_eos: args.ignore_eos,
    };
    // one prompt's text is printed as it comes (on a terminal or into a pipe alike)
    let mut stream = match tokenizer {
        Some(tok) if prompts.len() == 1 && !args.json && use_sparse(&args.engine) => {
            Some(TextStream::new(tok))
        }
        _ => None,
    };
    // every prompt in one batch: the engine keeps a cache per sequence, so lengths may differ
    let continuations = if use_sparse(&args.engine) {
        let model = &pretrained.model;
        let (out, stats, cache) =
            generate_sparse_with(model, &prompts, &opts, model.routing, |_, token| {
                if let Some(stream) = stream.as_mut() {
                    stream.push(token);
                }
            })?;
        if args.engine.stats {
            let (kv, hd) = (model.config.num_key_value_heads, model.config.head_dim);
            print_stats(
                &stats,
                Some((cache.bytes(kv, hd), cache.dense_bytes(kv, hd))),
            );
        }
        out
    } else {
        gen(&pretrained.model, &prompts, &opts)?
    };
    if let Some(stream) = stream {
        stream.finish();
        return Ok(());
    }
    for tokens in continuations {
        let text = tokenizer.map(|t| t.decode(&tokens)).transpose()?;
        if args.json {
            println!("{}", serde_json::json!({ "tokens": tokens, "text": text }));
        } else {
            match text {
                Some(text) => println!("{text}"),
                None => println!(
                    "{}",
                    tokens
                        .iter()
                        .map(u32::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                ),
            }
        }
    }
    Ok(())
}

/// Prints a generation's text as its tokens come ([`AnswerText`]: a token may complete a
/// character that the previous one began, so tokens are not decoded one by one).
struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    text: AnswerText,
}

impl<'a> TextStream<'a> {
    fn new(tokenizer: &'a Tokenizer) -> Self {
        TextStream {
            tokenizer,
            text: AnswerText::new(Vec::new()),
        }
    }

    fn push(&mut self, token: u32) {
        use std::io::Write;
        print!(
            "{}",
            self.text.push(self.tokenizer, Some(token), false).text
        );
        let _ = std::io::stdout().flush();
    }

    fn finish(mut self) {
        println!("{}", self.text.push(self.tokenizer, None, true).text);
    }
}
