//! `skipgpt tokenize`: a model's token ids and pieces for a text.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use skipgpt_model::io::gguf::{gguf_file_tokenizer, is_gguf};
use skipgpt_model::Tokenizer;

#[derive(Args, Debug)]
pub struct TokenizeArgs {
    /// Model directory with a tokenizer.json, or a GGUF file (its own tokenizer).
    #[arg(long)]
    pub model: PathBuf,
    /// The text (no special tokens are added; special-token text such as `<|im_start|>` is
    /// still one token).
    #[arg(long)]
    pub text: String,
    /// Print `{"ids": [...], "tokens": [...]}`.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: TokenizeArgs) -> Result<()> {
    let tokenizer = if is_gguf(&args.model) {
        gguf_file_tokenizer(&args.model)?
    } else {
        Tokenizer::from_file(&args.model.join("tokenizer.json"))?
    };
    let (ids, tokens) = tokenizer.encode_plain(&args.text)?;
    if args.json {
        println!("{}", serde_json::json!({"ids": ids, "tokens": tokens}));
    } else {
        let ids: Vec<String> = ids.iter().map(u32::to_string).collect();
        println!("{}", ids.join(" "));
    }
    Ok(())
}
