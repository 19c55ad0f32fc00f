//! Sparse engine vs dense: prefill and decode throughput at given skip rates, on a random
//! model big enough that matrix work dominates. Run through `cargo xtask bench` (or
//! `cargo run --release --features bench --example bench_sparse -- --help`).
//!
//! The measurement itself (calibrated random routers, dense and routed runs in one process)
//! is `support/engine_bench.rs`, shared with `gpu_check`.

#[path = "support/engine_bench.rs"]
mod engine_bench;

use burn::tensor::backend::Backend;
use skipgpt_model::{LlamaConfig, StoreDtype};

#[cfg(feature = "cuda")]
type B = burn::backend::Cuda;
#[cfg(all(feature = "wgpu", not(feature = "cuda")))]
type B = burn::backend::Wgpu;
#[cfg(not(any(feature = "cuda", feature = "wgpu")))]
type B = burn::backend::NdArray<f32>;

/// Sparse engine against dense on a random model.
#[derive(clap::Parser, Debug)]
struct Args {
    #[arg(long, default_value_t = 8)]
    layers: usize,
    #[arg(long, default_value_t = 512)]
    hidden: usize,
    /// Prompt tokens per sequence of the prefill figures.
    #[arg(long, default_value_t = 128)]
    prefill: usize,
    /// Decode steps after a 16-token prompt.
    #[arg(long, default_value_t = 32)]
    decode: usize,
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    batches: Vec<usize>,
    /// Target skip fractions of each module.
    #[arg(long, value_delimiter = ',', default_value = "0,0.25,0.4")]
    skips: Vec<f64>,
    #[arg(long, default_value_t = 3)]
    repeats: usize,
}

fn main() {
    let args = <Args as clap::Parser>::parse();
    let device = Default::default();
    let h = args.hidden;
    let heads = (h / 64).max(1);
    let mut config = LlamaConfig::new(
        4096,
        h,
        (8 * h / 3).div_ceil(64) * 64,
        args.layers,
        heads,
        (heads / 2).max(1),
        h / heads,
    );
    config.max_position_embeddings = args.prefill + args.decode + 8;
    B::seed(&device, 7);
    let base = config.init::<B>(&device);
    let _ = base.export(StoreDtype::F32); // draw the lazily initialised weights now
    println!(
        "# sparse engine benchmark: {} layers, hidden {h}, {} heads, mlp {}, {:.1}M parameters, backend {}",
        args.layers,
        heads,
        config.intermediate_size,
        config.num_params() as f64 / 1e6,
        std::any::type_name::<B>()
    );
    println!(
        "# prefill {} tokens per sequence, decode {} steps; times are medians of {} runs",
        args.prefill, args.decode, args.repeats
    );
    println!();
    println!(
        "| batch | target skip | realised attn/mlp skip | prefill tok/s dense | routed | speedup | ideal | ratio | decode tok/s engine dense | routed | speedup | ideal | ratio | ideal by weight bytes | KV keep | KV drop (its attn skip) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for &batch in &args.batches {
        let prompts = engine_bench::prompts(batch, args.prefill, config.vocab_size);
        for &skip in &args.skips {
            let r = engine_bench::measure(&base, &prompts, skip, args.decode, args.repeats);
            let sp = r.prefill_routed / r.prefill_dense;
            let dsp = r.decode_routed / r.decode_dense;
            println!(
                "| {batch} | {skip:.2} | {:.2}/{:.2} | {:.0} | {:.0} | {sp:.2}x | {:.2}x | {:.2} | {:.0} | {:.0} | {dsp:.2}x | {:.2}x | {:.2} | {:.2}x | {:.0}% | {:.0}% ({:.2}) |",
                r.attn_skip,
                r.mlp_skip,
                r.prefill_dense,
                r.prefill_routed,
                r.prefill_ideal,
                sp / r.prefill_ideal,
                r.decode_dense,
                r.decode_routed,
                r.decode_ideal,
                dsp / r.decode_ideal,
                r.decode_weight_ideal,
                100.0 * r.kv_keep,
                100.0 * r.kv_drop,
                r.kv_drop_attn_skip,
            );
        }
    }
}
