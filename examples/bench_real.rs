//! The project's side of `cargo xtask bench-real`: one system (dense, or routed at a given skip
//! and KV policy) on a real checkpoint, in a process of its own so that its peak RSS is its
//! own. The anchors (llama.cpp, transformers) are timed the same way by
//! `tools/bench_anchors.py`, on the token ids this writes with `--ids-out`.
//!
//! ```text
//! bench_real --model DIR --text FILE [--backend cpu|ndarray] [--threads N] [--dtype f32|f16|bf16] [--skip 0.25 --kv keep|drop]
//!            [--routed] [--prefill 512] [--decode 128] [--batches 1,8] [--repeats 3] [--pairs 3] [--ids-out ids.json] [--json OUT]
//! ```
//!
//! Figures: load (seconds to a model ready to run); prefill tokens/s (one sequence of
//! `--prefill` tokens through the engine); decode tokens/s at each batch (greedy, `--decode`
//! new tokens per sequence from 16-token prompts, their prefill included); peak RSS. Routed
//! systems get random linear routers whose biases are calibrated on the text (a part the timed
//! prompts do not use) so that the given fraction of tokens skips each module. A routed system
//! also reports its speedup over its own dense run (`Routing::Dense`, every module executing),
//! timed in alternation `--pairs` times: the prefill and the batch-1 decode.

#[path = "support/engine_bench.rs"]
mod engine_bench;
#[path = "../src/threads.rs"]
mod threads;

use std::time::Instant;

use burn::tensor::backend::Backend;
use serde_json::json;
use skipgpt_eval::speed::{decode_speed, paired_speedup, peak_rss_mb, prefill_speed};
use skipgpt_model::engine::{sparse_forward, LogitRows, SparseCache};
use skipgpt_model::{load_pretrained_as, KvPolicy, Routing, StoreDtype};

/// One system of `cargo xtask bench-real` on a real checkpoint.
#[derive(clap::Parser, Debug)]
struct Args {
    /// Model directory (HF layout, with tokenizer.json).
    #[arg(long)]
    model: std::path::PathBuf,
    /// Text to take the prompts and the routers' calibration from.
    #[arg(long)]
    text: std::path::PathBuf,
    #[arg(long, value_parser = ["cpu", "ndarray"], default_value = "cpu")]
    backend: String,
    #[arg(long)]
    threads: Option<usize>,
    /// What the weight matrices are held in.
    #[arg(long, value_parser = ["f32", "f16", "bf16"], default_value = "f32")]
    dtype: String,
    /// Route with calibrated random routers skipping this fraction of each module.
    #[arg(long)]
    skip: Option<f64>,
    #[arg(long, value_parser = ["keep", "drop"], default_value = "keep")]
    kv: String,
    /// Route with the model's own trained routers (its `skipgpt.json`), as served.
    #[arg(long, conflicts_with = "skip")]
    routed: bool,
    /// Tokens of the prefill figure.
    #[arg(long, default_value_t = 512)]
    prefill: usize,
    /// New tokens per sequence of the decode figures.
    #[arg(long, default_value_t = 128)]
    decode: usize,
    /// Batch sizes of the decode figures.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    batches: Vec<usize>,
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Routed systems: dense/routed pairs timed back to back (0: none).
    #[arg(long, default_value_t = 3)]
    pairs: usize,
    /// Writes the token ids used, for the anchors.
    #[arg(long)]
    ids_out: Option<std::path::PathBuf>,
    /// Writes the figures as JSON.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

impl Args {
    fn dtype(&self) -> StoreDtype {
        match self.dtype.as_str() {
            "f16" => StoreDtype::F16,
            "bf16" => StoreDtype::BF16,
            _ => StoreDtype::F32,
        }
    }

    fn kv(&self) -> KvPolicy {
        if self.kv == "drop" {
            KvPolicy::Drop
        } else {
            KvPolicy::Keep
        }
    }
}

fn main() {
    let a = <Args as clap::Parser>::parse();
    if let Err(e) = threads::set_threads(a.threads) {
        eprintln!("{e}");
        std::process::exit(2);
    }
    let result = match a.backend.as_str() {
        "cpu" => run::<burn::backend::Flex>(&a, &Default::default()),
        "ndarray" => run::<burn::backend::NdArray<f32>>(&a, &Default::default()),
        other => {
            eprintln!("--backend cpu|ndarray, got {other:?}");
            std::process::exit(2)
        }
    };
    let text = serde_json::to_string_pretty(&result).unwrap();
    println!("{text}");
    if let Some(path) = &a.json {
        std::fs::write(path, text).expect("write --json");
    }
}

fn run<B: Backend>(a: &Args, device: &B::Device) -> serde_json::Value {
    let t = Instant::now();
    let pretrained = load_pretrained_as::<B>(&a.model, device, a.dtype()).expect("load --model");
    let mut model = pretrained.model;
    let tok = pretrained
        .tokenizer
        .expect("the model directory has a tokenizer.json");
    // the first forward pays one-off costs (thread pools, first allocations): part of loading
    let warm = vec![vec![1u32; 4]];
    let mut cache = SparseCache::new(1, model.config.num_hidden_layers);
    let _ = sparse_forward(&model, &warm, &mut cache, Routing::Dense, LogitRows::Last)
        .unwrap()
        .logits
        .into_data();
    let load_s = t.elapsed().as_secs_f64();

    let text = std::fs::read_to_string(&a.text).expect("read --text");
    let (ids, _) = tok.encode_plain(&text).expect("tokenize --text");
    let max_batch = a.batches.iter().copied().max().unwrap_or(1);
    let need = a.prefill + 16 * max_batch + 4 * 128;
    assert!(
        ids.len() >= need,
        "--text has {} tokens; {need} are needed",
        ids.len()
    );
    // timed prompts first, calibration text after them
    let prefill: Vec<u32> = ids[..a.prefill].to_vec();
    let decode_prompts: Vec<Vec<u32>> = (0..max_batch)
        .map(|b| ids[a.prefill + 16 * b..a.prefill + 16 * (b + 1)].to_vec())
        .collect();
    let calib_start = a.prefill + 16 * max_batch;
    let calib: Vec<Vec<u32>> = (0..4)
        .map(|k| ids[calib_start + 128 * k..calib_start + 128 * (k + 1)].to_vec())
        .collect();
    if let Some(path) = &a.ids_out {
        let v = json!({"prefill": prefill, "decode": decode_prompts});
        std::fs::write(path, v.to_string()).expect("write --ids-out");
    }

    let routing = match a.skip {
        Some(skip) => {
            model = engine_bench::calibrated(&model, skip, a.kv(), &calib);
            Routing::Deterministic
        }
        None if a.routed => {
            if model.routing_config.is_none() {
                eprintln!("--routed: {} has no routers", a.model.display());
                std::process::exit(2);
            }
            Routing::Deterministic
        }
        None => Routing::Dense,
    };
    let prefilled = prefill_speed(&model, &prefill, routing, a.repeats).expect("prefill");
    let mut decode = serde_json::Map::new();
    let mut decode_stats = serde_json::Map::new();
    for &b in &a.batches {
        let run = decode_speed(&model, &decode_prompts[..b], a.decode, routing, a.repeats)
            .expect("decode");
        let st = run.stats;
        decode.insert(b.to_string(), json!(run.tokens_per_s));
        decode_stats.insert(
            b.to_string(),
            json!({"attn_skip": st.attn_skip(), "mlp_skip": st.mlp_skip(),
                   "ideal_speedup": st.ideal_speedup(), "weight_ideal_speedup": st.weight_ideal_speedup()}),
        );
    }
    let paired = match routing {
        Routing::Dense => None,
        _ if a.pairs == 0 => None,
        _ => {
            let p = paired_speedup(
                &model,
                &prefill,
                &decode_prompts[..1],
                a.decode,
                routing,
                a.pairs,
            )
            .expect("paired dense/routed runs");
            Some(json!({"pairs": p.pairs, "prefill": p.prefill, "decode_1": p.decode}))
        }
    };
    let ps = prefilled.stats;
    let mut system = match a.skip {
        Some(s) => format!(
            "skipgpt routed {:.0}% {}",
            100.0 * s,
            if a.kv() == KvPolicy::Keep {
                "keep"
            } else {
                "drop"
            }
        ),
        None if a.routed => "skipgpt trained routers".into(),
        None => "skipgpt dense".into(),
    };
    if a.dtype() != StoreDtype::F32 {
        system = format!("{system} {}", a.dtype);
    }
    json!({
        "system": system,
        "backend": a.backend,
        "threads": a.threads,
        "dtype": a.dtype,
        "load_s": load_s,
        "prefill_tok_s": prefilled.tokens_per_s,
        "decode": decode,
        "prefill_stats": {"attn_skip": ps.attn_skip(), "mlp_skip": ps.mlp_skip(), "ideal_speedup": ps.ideal_speedup()},
        "decode_stats": decode_stats,
        "paired_speedup": paired,
        "peak_rss_mb": peak_rss_mb(),
        "weight_mb": (model.config.num_params() * a.dtype().size()) as f64 / 1e6,
    })
}
