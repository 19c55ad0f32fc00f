//! `skipgpt inspect`: what a model directory holds (architecture, parameters, routers, adapters).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use skipgpt_model::io::safetensors_io::WeightSet;
use skipgpt_model::{load_routing_config, Tokenizer};

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// Model directory (HF layout).
    #[arg(long)]
    pub model: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: InspectArgs) -> Result<()> {
    let config = skipgpt_model::io::checkpoint::check_config_against_weights(&args.model)?;
    let weights = WeightSet::open_dir(&args.model)?;
    let (params, dtypes) = weights.summary();
    let tokenizer = args.model.join("tokenizer.json");
    let tokenizer_vocab = if tokenizer.exists() {
        Some(Tokenizer::from_file(&tokenizer)?.vocab_size())
    } else {
        None
    };
    let routers = match load_routing_config(&args.model)? {
        Some(routing) => {
            let path = args.model.join(skipgpt_model::io::checkpoint::ROUTERS_FILE);
            let (n, _) = WeightSet::open_files(&[path])?.summary();
            Some(serde_json::json!({
                "config": routing,
                "parameters": n,
                "percent_of_model": 100.0 * n as f64 / params as f64,
            }))
        }
        None => None,
    };
    let files: Vec<String> = weights
        .paths()
        .iter()
        .map(|p| {
            p.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let info = serde_json::json!({
        "model_type": config.model_type,
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "attention_heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "parameters": params,
        "config_dtype": config.dtype,
        "stored_dtypes": dtypes,
        "context_length": config.max_position_embeddings,
        "rope_theta": config.rope_theta,
        "rope_scaling": config.rope_scaling,
        "tied_embeddings": config.tie_word_embeddings,
        "sliding_window": config.sliding_window,
        "weight_files": files,
        "tokenizer_vocab": tokenizer_vocab,
        "routers": routers,
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
        return Ok(());
    }
    let gqa = if config.num_key_value_heads < config.num_attention_heads {
        format!(" (grouped-query, {} per kv head)", config.kv_groups())
    } else {
        String::new()
    };
    println!("model          {}", args.model.display());
    println!(
        "architecture   {} decoder, {} layers",
        config.model_type, config.num_hidden_layers
    );
    println!(
        "hidden         {} (MLP {})",
        config.hidden_size, config.intermediate_size
    );
    println!(
        "heads          {} query / {} key-value, head_dim {}{gqa}",
        config.num_attention_heads, config.num_key_value_heads, config.head_dim
    );
    println!("parameters     {} ({:.2}M)", params, params as f64 / 1e6);
    println!(
        "dtype          {} (stored: {})",
        config.dtype,
        dtypes.join(", ")
    );
    println!("context        {} tokens", config.max_position_embeddings);
    println!(
        "rope           theta {} scaling {:?}",
        config.rope_theta, config.rope_scaling
    );
    println!("vocab          {}", config.vocab_size);
    println!("tied head      {}", config.tie_word_embeddings);
    println!("weights        {}", files.join(", "));
    match tokenizer_vocab {
        Some(n) => println!("tokenizer      {n} tokens"),
        None => println!("tokenizer      none (tokenizer.json missing: token ids only)"),
    }
    match &info["routers"] {
        serde_json::Value::Null => println!("routers        none (dense model)"),
        r => println!(
            "routers        {} parameters ({:.4}% of the model), {}",
            r["parameters"],
            r["percent_of_model"].as_f64().unwrap_or(0.0),
            r["config"]
        ),
    }
    Ok(())
}
