//! The subcommands. Each parses nothing itself (clap did) and owns only I/O and printing.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use skipgpt_model::generate::validate_ids;
use skipgpt_model::safetensors_io::{write_safetensors, OwnedTensor, TensorFile, WeightSet};
use skipgpt_model::sparse::{
    generate_sparse_with, sparse_forward, EngineStats, LogitRows, SparseCache,
};
use skipgpt_model::{
    generate as gen, load_routing_config, GenerateOptions, LlamaForCausalLM, Routing, Sampling,
    StoreDtype, Tokenizer,
};

use skipgpt_pipeline::evaluate::{EvalPplConfig, EvalPplReport, ModelSource, Split};

use crate::backend::BackendKind;
use crate::{
    with_backend, EngineArg, EngineArgs, EvalPplArgs, GenerateArgs, InspectArgs, LogitsArgs,
    RoutingArg, RoutingArgs, SplitArg,
};

/// `--model DIR [--adapter PEFT_DIR]`: the model a serving or evaluation command runs.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model directory (HF layout, optionally with SkipGPT routers).
    #[arg(long = "model")]
    pub dir: std::path::PathBuf,
    /// A LoRA adapter in PEFT layout to apply on top of --model (merged into its weights at
    /// load: the adapter's function at the base's speed).
    #[arg(long)]
    pub adapter: Option<std::path::PathBuf>,
    /// What the projection and embedding matrices are held in, whatever the file stores:
    /// f16 or bf16 take half the memory and decode faster where memory bandwidth bounds it.
    /// The residual stream, norms, routers, attention and the cache stay f32.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: skipgpt_model::StoreDtype,
}

impl ModelArgs {
    pub fn source(&self) -> ModelSource {
        ModelSource {
            dir: self.dir.clone(),
            adapter: self.adapter.clone(),
            dtype: self.dtype,
        }
    }

    /// The model directory, with the adapter applied when one is given.
    pub fn load<B: Backend>(&self, device: &B::Device) -> Result<skipgpt_model::Pretrained<B>> {
        Ok(self.source().load::<B>(device)?)
    }
}

/// The routing mode the command line asks for.
fn routing_of(args: &RoutingArgs) -> Routing {
    match (args.dense, args.routing) {
        (true, _) => Routing::Dense,
        (false, RoutingArg::Deterministic) => Routing::Deterministic,
        (false, RoutingArg::Sample) => Routing::Sample,
    }
}

/// The routing mode the command line asks for (seeding the backend for `--routing sample`).
fn routing_mode<B: Backend>(args: &RoutingArgs, device: &B::Device) -> Routing {
    let routing = routing_of(args);
    if routing == Routing::Sample {
        B::seed(device, args.routing_seed);
    }
    routing
}

/// Sets how a loaded model routes, per the command line (dense models stay dense).
fn apply_routing<B: Backend>(
    model: &mut skipgpt_model::LlamaForCausalLM<B>,
    args: &RoutingArgs,
    device: &B::Device,
) {
    if model.routing_config.is_some() {
        model.routing = routing_mode::<B>(args, device);
    }
}

pub fn logits(backend: BackendKind, args: LogitsArgs) -> Result<()> {
    with_backend!(backend, |B, device| logits_on::<B>(&args, &device))
}

fn logits_on<B: Backend>(args: &LogitsArgs, device: &B::Device) -> Result<()> {
    let input = TensorFile::open(&args.input)?;
    let (ids, shape) = input.read_i64("input_ids")?;
    let [b, s] = shape[..] else {
        bail!(
            "{}: `input_ids` must be 2-D [batch, seq], got shape {shape:?}",
            args.input.display()
        );
    };
    if b == 0 || s == 0 {
        bail!(
            "{}: `input_ids` is empty (shape {shape:?})",
            args.input.display()
        );
    }
    let pretrained = args.model.load::<B>(device)?;
    let mut model = pretrained.model;
    apply_routing(&mut model, &args.routing, device);
    validate_ids(
        &ids,
        model.config.vocab_size,
        &format!("{}: input_ids", args.input.display()),
    )?;
    let layers = model.config.num_hidden_layers;
    let v = model.config.vocab_size;
    let mut tensors = BTreeMap::new();
    let f32_tensor = |t: Tensor<B, 3>| OwnedTensor::from_tensor(t, StoreDtype::F32);
    if use_sparse(&args.engine) && !args.hidden_states {
        let rows: Vec<Vec<u32>> = ids
            .chunks(s)
            .map(|r| r.iter().map(|&i| i as u32).collect())
            .collect();
        let mut cache = SparseCache::new(b, layers);
        let out = sparse_forward(&model, &rows, &mut cache, model.routing, LogitRows::All)?;
        if args.engine.stats {
            print_stats(&out.stats, None);
        }
        tensors.insert("logits".into(), f32_tensor(out.logits.reshape([b, s, v])));
        // the 0/1 decisions as [layers, batch, seq], for a model that routes
        let gates = if routes(&model) {
            vec![("attn_gates", out.attn_gates), ("mlp_gates", out.mlp_gates)]
        } else {
            vec![]
        };
        for (name, gates) in gates {
            let flat: Vec<f32> = gates
                .into_iter()
                .flatten()
                .map(|g| f32::from(u8::from(g)))
                .collect();
            tensors.insert(
                name.into(),
                OwnedTensor::from_f32(&flat, vec![layers, b, s], StoreDtype::F32),
            );
        }
    } else {
        let input_ids: Tensor<B, 2, Int> = Tensor::from_data(TensorData::new(ids, [b, s]), device);
        let out = model.forward_full(input_ids, args.hidden_states);
        if args.engine.stats {
            print_gate_rates(&out.attn_gates, &out.mlp_gates);
        }
        tensors.insert("logits".into(), f32_tensor(out.logits));
        for (k, h) in out.hidden_states.into_iter().enumerate() {
            tensors.insert(format!("hidden_states.{k}"), f32_tensor(h));
        }
        // routed: the 0/1 decisions as [layers, batch, seq]
        for (name, gates) in [("attn_gates", out.attn_gates), ("mlp_gates", out.mlp_gates)] {
            if !gates.is_empty() {
                tensors.insert(name.into(), f32_tensor(Tensor::stack::<3>(gates, 0)));
            }
        }
    }
    write_safetensors(&args.output, &tensors, None)?;
    eprintln!("wrote logits [{b}, {s}, {v}] to {}", args.output.display());
    Ok(())
}

pub fn generate(backend: BackendKind, args: GenerateArgs) -> Result<()> {
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

/// Prints a generation's text as its tokens come: each step decodes everything so far and
/// prints what was added (a token may complete a character that the previous one began, so
/// tokens are not decoded one by one).
struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    tokens: Vec<u32>,
    printed: String,
}

impl<'a> TextStream<'a> {
    fn new(tokenizer: &'a Tokenizer) -> Self {
        TextStream {
            tokenizer,
            tokens: Vec::new(),
            printed: String::new(),
        }
    }

    fn push(&mut self, token: u32) {
        use std::io::Write;
        self.tokens.push(token);
        let Ok(text) = self.tokenizer.decode(&self.tokens) else {
            return;
        };
        // an incomplete character decodes to U+FFFD: wait for the token that completes it
        if text.ends_with('\u{FFFD}') {
            return;
        }
        if let Some(new) = text.strip_prefix(self.printed.as_str()) {
            print!("{new}");
            let _ = std::io::stdout().flush();
            self.printed = text;
        }
    }

    fn finish(self) {
        let text = self.tokenizer.decode(&self.tokens).unwrap_or_default();
        if let Some(rest) = text.strip_prefix(self.printed.as_str()) {
            print!("{rest}");
        }
        println!();
    }
}

/// The engine serves every model, dense ones with every gate open, unless `--engine
/// dense-gated` asks for the reference computation.
fn use_sparse(engine: &EngineArgs) -> bool {
    engine.engine == EngineArg::Sparse
}

/// The model has routers and uses them.
fn routes<B: Backend>(model: &LlamaForCausalLM<B>) -> bool {
    model.routing_config.is_some() && model.routing != Routing::Dense
}

/// `--stats` of the sparse engine; `kv`: (bytes cached, bytes a dense cache would hold).
fn print_stats(s: &EngineStats, kv: Option<(usize, usize)>) {
    eprintln!(
        "engine sparse: {} tokens; skipped attention {:.1}%, mlp {:.1}%; {:.3} GFLOP of {:.3} dense ({:.1}% saved, ideal speedup {:.2}x); weights read {:.1} MB of {:.1} MB",
        s.tokens,
        100.0 * s.attn_skip(),
        100.0 * s.mlp_skip(),
        s.flops / 1e9,
        s.dense_flops / 1e9,
        100.0 * (1.0 - s.flops / s.dense_flops.max(1.0)),
        s.ideal_speedup(),
        s.weight_bytes / 1e6,
        s.dense_weight_bytes / 1e6
    );
    if let Some((bytes, dense)) = kv {
        eprintln!(
            "kv cache: {:.1} KB ({:.1}% of the {:.1} KB a dense cache holds)",
            bytes as f64 / 1e3,
            100.0 * bytes as f64 / dense.max(1) as f64,
            dense as f64 / 1e3
        );
    }
}

/// `--stats` of the dense-gated engine: it computes everything, so only the decisions count.
fn print_gate_rates<B: Backend>(attn: &[Tensor<B, 2>], mlp: &[Tensor<B, 2>]) {
    let rate = |g: &[Tensor<B, 2>]| -> f64 {
        let v: Vec<f32> = g
            .iter()
            .flat_map(|t| {
                t.to_data()
                    .convert::<f32>()
                    .into_vec::<f32>()
                    .unwrap_or_default()
            })
            .collect();
        1.0 - v.iter().map(|&x| x as f64).sum::<f64>() / v.len().max(1) as f64
    };
    eprintln!(
        "engine dense-gated: skipped decisions attention {:.1}%, mlp {:.1}%; every module computed (0% saved)",
        100.0 * rate(attn),
        100.0 * rate(mlp)
    );
}

pub fn inspect(args: InspectArgs) -> Result<()> {
    let config = skipgpt_model::checkpoint::check_config_against_weights(&args.model)?;
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
            let path = args.model.join(skipgpt_model::checkpoint::ROUTERS_FILE);
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

pub fn eval_ppl(backend: BackendKind, args: EvalPplArgs) -> Result<()> {
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
