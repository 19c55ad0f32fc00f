//! `skipgpt bench`: what `llama-bench` measures, for any model this program runs (a GGUF as it
//! is, a model directory, with or without routers): prefill and decode tokens per second
//! (median and range over repeats), the realised skip rates, peak memory; a table, or JSON.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend;
use clap::Args;
use serde_json::{json, Value};
use skipgpt_eval::speed::{decode_speed, paired_speedup, peak_rss_mb, prefill_speed, Throughput};
use skipgpt_model::engine::{sparse_forward, LogitRows, SparseCache};
use skipgpt_model::{LlamaForCausalLM, Routing, Tokenizer};

use crate::args::{ModelArgs, RoutingArgs};
use crate::backend::BackendKind;
use crate::commands::{apply_routing, routes};
use crate::with_backend;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Text to take the prompts from (.txt, or JSONL with a `text` field per line); default:
    /// the built-in synthetic English corpus, so that routers see words, not random ids.
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Tokens of the prefill test (one sequence through the model).
    #[arg(long, default_value_t = 512, value_parser = crate::args::positive)]
    pub prefill: usize,
    /// New tokens per sequence of the decode tests (greedy, after a 16-token prompt).
    #[arg(long, default_value_t = 128, value_parser = crate::args::positive)]
    pub decode: usize,
    /// Sequences decoded together; repeat or comma-separate for several tests.
    #[arg(long, value_delimiter = ',', default_value = "1", value_parser = crate::args::positive)]
    pub batch: Vec<usize>,
    /// Timed runs of each test, after one warm-up.
    #[arg(long, default_value_t = 3, value_parser = crate::args::positive)]
    pub repeats: usize,
    /// For a routed model: time it against its own dense run (every module executing) this
    /// many times, in alternation, and report the speedup.
    #[arg(long, default_value_t = 0)]
    pub pairs: usize,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub routing: RoutingArgs,
}

pub fn run(backend: BackendKind, args: BenchArgs) -> Result<()> {
    with_backend!(backend, |B, device| bench_on::<B>(backend, &args, &device))
}

fn bench_on<B: Backend>(backend: BackendKind, args: &BenchArgs, device: &B::Device) -> Result<()> {
    let t = Instant::now();
    let mut pretrained = args.model.load::<B>(device)?;
    apply_routing(&mut pretrained.model, &args.routing, device);
    let model = &pretrained.model;
    // the first forward pays one-off costs (thread pools, first allocations): part of loading
    let mut cache = SparseCache::new(1, model.config.num_hidden_layers);
    let warm = sparse_forward(
        model,
        &[vec![1u32; 4]],
        &mut cache,
        Routing::Dense,
        LogitRows::Last,
    )?;
    let _ = warm.logits.into_data();
    let load_s = t.elapsed().as_secs_f64();

    let tokenizer = pretrained.tokenizer.as_ref().with_context(|| {
        format!(
            "{}: the model has no tokenizer to make prompts with",
            args.model.dir.display()
        )
    })?;
    let max_batch = args.batch.iter().copied().max().unwrap_or(1);
    let ids = prompt_ids(
        tokenizer,
        args.text.as_deref(),
        args.prefill + 16 * max_batch,
    )?;
    let prefill_ids = &ids[..args.prefill];
    let decode_prompts: Vec<Vec<u32>> = (0..max_batch)
        .map(|b| ids[args.prefill + 16 * b..][..16].to_vec())
        .collect();

    let routing = model.routing;
    let prefill = prefill_speed(model, prefill_ids, routing, args.repeats)?;
    let mut decode = Vec::new();
    for &b in &args.batch {
        let run = decode_speed(
            model,
            &decode_prompts[..b],
            args.decode,
            routing,
            args.repeats,
        )?;
        decode.push((b, run));
    }
    let paired = if routes(model) && args.pairs > 0 {
        let p = paired_speedup(
            model,
            prefill_ids,
            &decode_prompts[..1],
            args.decode,
            routing,
            args.pairs,
        )?;
        Some(json!({"pairs": p.pairs, "prefill": p.prefill, "decode": p.decode}))
    } else {
        None
    };
    let report = json!({
        "model": args.model.dir.display().to_string(),
        "routers": args.model.routers.as_ref().map(|r| r.display().to_string()),
        "routed": routes(model),
        "weights": weights_held(model, &args.model),
        "file_mb": model_file_bytes(&args.model.dir) as f64 / 1e6,
        "params_m": model.config.num_params() as f64 / 1e6,
        "backend": format!("{backend:?}").to_lowercase(),
        "threads": rayon::current_num_threads(),
        "load_s": load_s,
        "tests": std::iter::once(test_json(&format!("pp{}", args.prefill), 1, &prefill))
            .chain(decode.iter().map(|(b, run)| test_json(&format!("tg{}", args.decode), *b, run)))
            .collect::<Vec<_>>(),
        "paired_speedup": paired,
        "peak_rss_mb": peak_rss_mb(),
    });
    if args.json {
        println!("{report}");
    } else {
        print_table(&report);
    }
    Ok(())
}

/// One test's figures.
fn test_json(name: &str, batch: usize, run: &Throughput) -> Value {
    json!({
        "test": name,
        "batch": batch,
        "tok_s": run.tokens_per_s,
        "tok_s_min": run.range.0,
        "tok_s_max": run.range.1,
        "attn_skip": run.stats.attn_skip(),
        "mlp_skip": run.stats.mlp_skip(),
        "flops_saved": 1.0 - run.stats.flops / run.stats.dense_flops.max(1.0),
    })
}

/// What the matrices are held in: the GGUF's block formats where they stay quantized, else
/// `--dtype`.
fn weights_held<B: Backend>(model: &LlamaForCausalLM<B>, args: &ModelArgs) -> String {
    let mut kinds: Vec<&str> = model
        .model
        .layers
        .iter()
        .flat_map(|l| [&l.self_attn.q_proj, &l.mlp.down_proj])
        .filter_map(|p| p.quantized.as_ref().map(|q| q.kind().name()))
        .collect();
    kinds.sort_unstable();
    kinds.dedup();
    if kinds.is_empty() {
        format!("{:?}", args.dtype).to_lowercase()
    } else {
        kinds.join("+")
    }
}

/// The bytes of the model's weight files: the GGUF, or a directory's safetensors.
fn model_file_bytes(path: &Path) -> u64 {
    let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    if path.is_file() {
        return size(path);
    }
    std::fs::read_dir(path)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .map(|p| size(&p))
        .sum()
}

/// At least `need` token ids of `text`, or of the built-in corpus, repeated if short.
fn prompt_ids(tokenizer: &Tokenizer, text: Option<&Path>, need: usize) -> Result<Vec<u32>> {
    let docs = match text {
        Some(path) => skipgpt_data::read_documents(&[path.to_path_buf()])?,
        None => skipgpt_data::synthetic_corpus(64, 0),
    };
    let mut ids = Vec::new();
    for doc in &docs {
        ids.extend(tokenizer.encode_plain(doc)?.0);
    }
    if ids.is_empty() {
        bail!(
            "{}: no text to make prompts from",
            text.map_or("the built-in corpus".into(), |p| p.display().to_string())
        );
    }
    let once = ids.clone();
    while ids.len() < need {
        ids.extend_from_slice(&once);
    }
    Ok(ids)
}

fn print_table(r: &Value) {
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    println!(
        "model {} ({}, {:.1}M parameters, {:.1} MB of weight files){}; backend {}, {} threads; loaded in {:.2} s",
        r["model"].as_str().unwrap_or(""),
        r["weights"].as_str().unwrap_or(""),
        f(&r["params_m"]),
        f(&r["file_mb"]),
        r["routers"].as_str().map_or(String::new(), |p| format!(", routers {p}")),
        r["backend"].as_str().unwrap_or(""),
        r["threads"],
        f(&r["load_s"]),
    );
    println!("| test | batch | tok/s (median) | range | attention skipped | MLP skipped |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for t in r["tests"].as_array().into_iter().flatten() {
        println!(
            "| {} | {} | {:.1} | {:.1}–{:.1} | {:.1}% | {:.1}% |",
            t["test"].as_str().unwrap_or(""),
            t["batch"],
            f(&t["tok_s"]),
            f(&t["tok_s_min"]),
            f(&t["tok_s_max"]),
            100.0 * f(&t["attn_skip"]),
            100.0 * f(&t["mlp_skip"]),
        );
    }
    if let Some(p) = r["paired_speedup"].as_object() {
        println!(
            "against its own dense run ({} pairs in alternation): prefill {:.2}×, decode {:.2}×",
            p["pairs"],
            f(&p["prefill"]),
            f(&p["decode"])
        );
    }
    if let Some(rss) = r["peak_rss_mb"].as_f64() {
        println!(
            "peak RSS {rss:.0} MB ({:.2}× the weight files)",
            rss / f(&r["file_mb"])
        );
    }
}
