//! Sparse engine vs dense: prefill and decode throughput at given skip rates, on a random
//! model big enough that matrix work dominates. Run through `cargo xtask bench` (or
//! `cargo run --release --example bench_sparse -- --help`).
//!
//! The routers are random linear maps whose biases are calibrated, layer by layer, so that a
//! chosen fraction of tokens skips each module. Dense and routed runs happen in the same
//! process, on the same inputs, and every speedup is a ratio of times measured here.

use std::time::Instant;

use burn::module::Param;
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use skipgpt_model::sparse::{generate_sparse, sparse_forward, LogitRows, SparseCache};
use skipgpt_model::{
    generate, GenerateOptions, KvPolicy, LlamaConfig, LlamaForCausalLM, MlpRouterInput, Routing,
    RoutingConfig, Sampling, StoreDtype,
};

#[cfg(feature = "cuda")]
type B = burn::backend::Cuda;
#[cfg(all(feature = "wgpu", not(feature = "cuda")))]
type B = burn::backend::Wgpu;
#[cfg(not(any(feature = "cuda", feature = "wgpu")))]
type B = burn::backend::NdArray<f32>;

struct Args {
    layers: usize,
    hidden: usize,
    prefill: usize,
    decode: usize,
    batches: Vec<usize>,
    skips: Vec<f64>,
    repeats: usize,
}

fn parse_args() -> Args {
    let mut a = Args {
        layers: 8,
        hidden: 512,
        prefill: 128,
        decode: 32,
        batches: vec![1, 8],
        skips: vec![0.0, 0.25, 0.4],
        repeats: 3,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let list = |s: &str| {
        s.split(',')
            .map(|x| x.trim().to_string())
            .collect::<Vec<_>>()
    };
    let mut i = 0;
    while i < argv.len() {
        let value = argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--layers" => a.layers = value.parse().expect("--layers N"),
            "--hidden" => a.hidden = value.parse().expect("--hidden N"),
            "--prefill" => a.prefill = value.parse().expect("--prefill TOKENS"),
            "--decode" => a.decode = value.parse().expect("--decode STEPS"),
            "--repeats" => a.repeats = value.parse().expect("--repeats N"),
            "--batches" => a.batches = list(&value).iter().map(|x| x.parse().unwrap()).collect(),
            "--skips" => a.skips = list(&value).iter().map(|x| x.parse().unwrap()).collect(),
            other => {
                eprintln!(
                    "unknown argument {other}\nusage: bench_sparse [--layers 8] [--hidden 512] [--prefill 128] [--decode 32] [--batches 1,8] [--skips 0,0.25,0.4] [--repeats 3]"
                );
                std::process::exit(2);
            }
        }
        i += 2;
    }
    a
}

fn main() {
    let args = parse_args();
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
        "| batch | target skip | realised attn/mlp skip | prefill tok/s dense | routed | speedup | ideal | ratio | decode tok/s reference dense | engine dense | routed | speedup | ideal | ratio | ideal by weight bytes | KV keep | KV drop (its attn skip) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for &batch in &args.batches {
        let prompts: Vec<Vec<u32>> = (0..batch)
            .map(|s| {
                (0..args.prefill)
                    .map(|i| ((i * 31 + s * 17 + 5) % 4000) as u32)
                    .collect()
            })
            .collect();
        for &skip in &args.skips {
            let keep = calibrated(&base, skip, KvPolicy::Keep, &prompts);
            // calibrated on its own: hiding keys changes what the later routers see
            let drop = calibrated(&base, skip, KvPolicy::Drop, &prompts);
            let mut dense = keep.clone();
            dense.routing = Routing::Dense;

            // prefill: the dense model's forward vs the sparse engine
            let ids: Vec<i64> = prompts.iter().flatten().map(|&t| t as i64).collect();
            let input = || {
                Tensor::<B, 2, Int>::from_data(
                    TensorData::new(ids.clone(), [batch, args.prefill]),
                    &device,
                )
            };
            let t_dense = median(args.repeats, || {
                let _ = dense.forward(input(), None).into_data();
            });
            let mut stats = None;
            let t_routed = median(args.repeats, || {
                let mut cache = SparseCache::new(batch, args.layers);
                let out = sparse_forward(
                    &keep,
                    &prompts,
                    &mut cache,
                    Routing::Deterministic,
                    LogitRows::All,
                )
                .unwrap();
                let _ = out.logits.into_data();
                stats = Some(out.stats);
            });
            let s = stats.unwrap();
            let prefill_tokens = (batch * args.prefill) as f64;

            // decode: dense generation vs sparse generation, after a shared-length prompt
            let opts = GenerateOptions {
                max_new_tokens: args.decode,
                sampling: Sampling::Greedy,
                eos_token_ids: vec![],
                ignore_eos: true,
            };
            let short: Vec<Vec<u32>> = prompts
                .iter()
                .map(|p| p[..16.min(p.len())].to_vec())
                .collect();
            // decode baseline: the same engine executing every module. The gated reference
            // path (`generate` on the dense model) is printed too; at batch 8 it is several
            // times slower than the engine, so it would flatter the routed numbers.
            let t_dense_dec = median(args.repeats, || {
                let _ = generate_sparse(&keep, &short, &opts, Routing::Dense).unwrap();
            });
            let t_reference_dec = median(args.repeats, || {
                let _ = generate(&dense, &short, &opts).unwrap();
            });
            let mut dec_stats = None;
            let t_routed_dec = median(args.repeats, || {
                let (_, st, _) =
                    generate_sparse(&keep, &short, &opts, Routing::Deterministic).unwrap();
                dec_stats = Some(st);
            });
            let ds = dec_stats.unwrap();
            let dec_tokens = (batch * args.decode) as f64;

            let kv = |m: &LlamaForCausalLM<B>| {
                let mut cache = SparseCache::new(batch, args.layers);
                let out = sparse_forward(
                    m,
                    &prompts,
                    &mut cache,
                    Routing::Deterministic,
                    LogitRows::Last,
                )
                .unwrap();
                let (kvh, hd) = (config.num_key_value_heads, config.head_dim);
                (
                    cache.bytes(kvh, hd),
                    cache.dense_bytes(kvh, hd),
                    out.stats.attn_skip(),
                )
            };
            let (kv_keep, kv_dense, _) = kv(&keep);
            let (kv_drop, _, drop_skip) = kv(&drop);
            let sp = t_dense / t_routed;
            let dsp = t_dense_dec / t_routed_dec;
            println!(
                "| {batch} | {skip:.2} | {:.2}/{:.2} | {:.0} | {:.0} | {sp:.2}x | {:.2}x | {:.2} | {:.0} | {:.0} | {:.0} | {dsp:.2}x | {:.2}x | {:.2} | {:.2}x | {:.0}% | {:.0}% ({:.2}) |",
                s.attn_skip(),
                s.mlp_skip(),
                prefill_tokens / t_dense,
                prefill_tokens / t_routed,
                s.ideal_speedup(),
                sp / s.ideal_speedup(),
                dec_tokens / t_reference_dec,
                dec_tokens / t_dense_dec,
                dec_tokens / t_routed_dec,
                ds.ideal_speedup(),
                dsp / ds.ideal_speedup(),
                ds.weight_ideal_speedup(),
                100.0 * kv_keep as f64 / kv_dense as f64,
                100.0 * kv_drop as f64 / kv_dense as f64,
                drop_skip,
            );
        }
    }
}

/// Median wall time (seconds) of `n` runs after one warm-up.
fn median(n: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut times: Vec<f64> = (0..n.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// `base` with random linear routers reading the block input, each router's bias set so that
/// a fraction `skip` of the calibration tokens skips its module.
fn calibrated(
    base: &LlamaForCausalLM<B>,
    skip: f64,
    kv: KvPolicy,
    prompts: &[Vec<u32>],
) -> LlamaForCausalLM<B> {
    let device = base.device();
    let routing = RoutingConfig::new()
        .with_mlp_router_input(MlpRouterInput::BlockInput)
        .with_kv_policy(kv)
        .with_target_sparsity(skip);
    B::seed(&device, 11);
    let mut model = base.clone().with_new_routers(routing);
    let (b, t) = (prompts.len(), prompts[0].len());
    let ids: Vec<i64> = prompts.iter().flatten().map(|&x| x as i64).collect();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [b, t]), &device);
    for l in 0..model.config.num_hidden_layers {
        // the block input of layer l, with the layers before it already routed
        let x = model
            .forward_routed(ids.clone(), None, Routing::Deterministic, true)
            .hidden_states[l]
            .clone();
        let layer = &mut model.model.layers[l];
        for router in [layer.attn_router.as_mut(), layer.mlp_router.as_mut()]
            .into_iter()
            .flatten()
        {
            let w = router.fc2.weight.val(); // [hidden, 2]
            let [_, _, hdim] = x.dims();
            let diff: Vec<f32> = x
                .clone()
                .reshape([b * t, hdim])
                .matmul(w.clone().slice([0..hdim, 0..1]) - w.slice([0..hdim, 1..2]))
                .into_data()
                .convert::<f32>()
                .into_vec()
                .unwrap();
            let mut sorted = diff.clone();
            sorted.sort_by(f32::total_cmp);
            // skip iff diff + bias < 0: put the bias at the `skip` quantile
            let bias = if skip <= 0.0 {
                1e6
            } else {
                -sorted[((skip * sorted.len() as f64) as usize).min(sorted.len() - 1)]
            };
            router.fc2.bias = Some(Param::from_tensor(Tensor::from_data(
                TensorData::new(vec![bias, 0.0f32], [2]),
                &device,
            )));
        }
    }
    model.routing = Routing::Deterministic;
    model
}
