//! The sections' work: parity with the fixtures and the CPU backend, engine speed on a LLaMA-1B-shaped model, router-tuning speed and memory.

use std::path::Path;
use std::time::Instant;

use burn::backend::Autodiff;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use burn::train::metric::ItemLazy;
use burn::train::TrainStep;
use serde_json::{json, Value};
use skipgpt_model::engine::{generate_sparse, sparse_forward, LogitRows, SparseCache};
use skipgpt_model::io::safetensors_io::TensorFile;
use skipgpt_model::{
    generate, load_pretrained, GenerateOptions, LlamaConfig, MlpRouterInput, Routing,
    RoutingConfig, Sampling,
};
use skipgpt_train::loader::LmBatch;
use skipgpt_train::loss::SparsityLossConfig;
use skipgpt_train::probe::router_gradients;
use skipgpt_train::step::LmTrainer;
use skipgpt_train::Objective;

use super::*;

/// One comparison: `value` must be at most `tol` (0 for discrete outputs: counts of mismatches).
pub(crate) fn check(name: &str, value: f64, tol: f64) -> Value {
    let pass = value <= tol && value.is_finite();
    eprintln!(
        "{} {name}: {value:e} (tolerance {tol:e})",
        if pass { "PASS" } else { "FAIL" }
    );
    json!({"name": name, "value": value, "tolerance": tol, "pass": pass})
}

pub(crate) fn host<Bk: Backend, const D: usize>(t: Tensor<Bk, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec().unwrap()
}

pub(crate) fn max_diff(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() as f64)
        .fold(0.0, f64::max)
}

pub(crate) fn mismatches<T: PartialEq>(a: &[T], b: &[T]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    a.iter().zip(b).filter(|(x, y)| x != y).count() as f64
}

pub(crate) fn rows(file: &TensorFile, name: &str) -> Vec<Vec<u32>> {
    let (ids, shape) = file.read_i64(name).unwrap();
    ids.chunks(shape[1])
        .map(|r| r.iter().map(|&i| i as u32).collect())
        .collect()
}

pub(crate) fn ids<Bk: Backend>(rows: &[Vec<u32>], device: &Bk::Device) -> Tensor<Bk, 2, Int> {
    let flat: Vec<i64> = rows.iter().flatten().map(|&t| t as i64).collect();
    Tensor::from_data(TensorData::new(flat, [rows.len(), rows[0].len()]), device)
}

pub(crate) fn greedy(n: usize) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: n,
        sampling: Sampling::Greedy,
        eos_token_ids: vec![],
        ignore_eos: true,
    }
}

pub(crate) fn parity<Bk: Backend>(fixtures: &Path, device: &Bk::Device) -> Value {
    let r = TensorFile::open(&fixtures.join("reference.safetensors")).expect("reference");
    let reference = |name: &str| r.read_f32(name).unwrap().0;
    let input = rows(&r, "input_ids");
    let prompts = rows(&r, "greedy_prompt");
    let n_greedy = 16;
    let mut checks = Vec::new();

    let dense = load_pretrained::<Bk>(&fixtures.join("model"), device)
        .expect("load llama-tiny/model")
        .model;
    let out = dense.forward_full(ids::<Bk>(&input, device), true);
    let hidden = out
        .hidden_states
        .into_iter()
        .enumerate()
        .map(|(k, h)| max_diff(&host(h), &reference(&format!("hidden_states.{k}"))))
        .fold(0.0, f64::max);
    checks.push(check("dense hidden states", hidden, GPU_TOL));
    checks.push(check(
        "dense logits",
        max_diff(&host(out.logits), &reference("logits")),
        GPU_TOL,
    ));
    let expected: Vec<u32> = rows(&r, "greedy_tokens").concat();
    let got = generate(&dense, &prompts, &greedy(n_greedy))
        .unwrap()
        .concat();
    checks.push(check(
        "dense greedy tokens (KV cache), mismatches",
        mismatches(&got, &expected),
        0.0,
    ));
    let (got, _, _) = generate_sparse(&dense, &prompts, &greedy(n_greedy), Routing::Dense).unwrap();
    checks.push(check(
        "dense greedy tokens (sparse engine), mismatches",
        mismatches(&got.concat(), &expected),
        0.0,
    ));

    for (mode, input_kind) in [
        ("post_attn", MlpRouterInput::PostAttn),
        ("block_input", MlpRouterInput::BlockInput),
    ] {
        let mut model = load_pretrained::<Bk>(&fixtures.join("model-routed"), device)
            .expect("load llama-tiny/model-routed")
            .model;
        model.routing_config.as_mut().unwrap().mlp_router_input = input_kind;
        let out = model.forward_full(ids::<Bk>(&input, device), false);
        checks.push(check(
            &format!("routed {mode} logits (gated)"),
            max_diff(
                &host(out.logits),
                &reference(&format!("routed.{mode}.logits")),
            ),
            GPU_TOL,
        ));
        for (name, gates) in [("attn_gates", out.attn_gates), ("mlp_gates", out.mlp_gates)] {
            let got = host(Tensor::stack::<3>(gates, 0));
            checks.push(check(
                &format!("routed {mode} {name} (gated), mismatches"),
                mismatches(&got, &reference(&format!("routed.{mode}.{name}"))),
                0.0,
            ));
        }
        let mut cache = SparseCache::new(input.len(), model.config.num_hidden_layers);
        let sparse = sparse_forward(
            &model,
            &input,
            &mut cache,
            Routing::Deterministic,
            LogitRows::All,
        )
        .unwrap();
        checks.push(check(
            &format!("routed {mode} logits (sparse engine)"),
            max_diff(
                &host(sparse.logits),
                &reference(&format!("routed.{mode}.logits")),
            ),
            GPU_TOL,
        ));
        for (name, gates) in [
            ("attn_gates", &sparse.attn_gates),
            ("mlp_gates", &sparse.mlp_gates),
        ] {
            let got: Vec<f32> = gates.iter().flatten().map(|&g| g as u8 as f32).collect();
            checks.push(check(
                &format!("routed {mode} {name} (sparse engine), mismatches"),
                mismatches(&got, &reference(&format!("routed.{mode}.{name}"))),
                0.0,
            ));
        }
        let expected: Vec<u32> = rows(&r, &format!("routed.{mode}.greedy_tokens")).concat();
        let got = generate(&model, &prompts, &greedy(n_greedy))
            .unwrap()
            .concat();
        checks.push(check(
            &format!("routed {mode} greedy tokens (gated), mismatches"),
            mismatches(&got, &expected),
            0.0,
        ));
        let (got, _, _) =
            generate_sparse(&model, &prompts, &greedy(n_greedy), Routing::Deterministic).unwrap();
        checks.push(check(
            &format!("routed {mode} greedy tokens (sparse engine), mismatches"),
            mismatches(&got.concat(), &expected),
            0.0,
        ));
    }

    // one stage-1 step: the Gumbel noise is drawn on the host from the batch's seed, so the
    // CPU and the GPU see the same
    let (cpu_loss, cpu_grads) =
        router_grads::<Autodiff<Cpu>>(fixtures, &input, &Default::default());
    let (gpu_loss, gpu_grads) = router_grads::<Autodiff<Bk>>(fixtures, &input, device);
    let scale = cpu_grads.iter().fold(0.0f32, |m, g| m.max(g.abs())) as f64;
    checks.push(check(
        "router-tuning loss vs CPU, relative",
        ((cpu_loss - gpu_loss).abs() / cpu_loss.abs().max(1.0)) as f64,
        1e-4,
    ));
    checks.push(check(
        "router gradients vs CPU, relative to the largest",
        max_diff(&cpu_grads, &gpu_grads) / scale,
        1e-3,
    ));
    let passed = checks.iter().all(|c| c["pass"] == json!(true));
    json!({"checks": checks, "pass": passed})
}

/// Stage-1 loss and router gradients of one batch of the fixture, with fixed Gumbel noise.
pub(crate) fn router_grads<Bk: AutodiffBackend>(
    fixtures: &Path,
    input: &[Vec<u32>],
    device: &Bk::Device,
) -> (f32, Vec<f32>) {
    let model = load_pretrained::<Bk>(&fixtures.join("model-routed"), device)
        .unwrap()
        .model;
    router_gradients(model, input, device)
}

// ---------------------------------------------------------------- speed

/// LLaMA-1B shape (`--small`: a model the CPU runs in seconds, to try the script).
pub(crate) fn one_b_config(small: bool, seq: usize) -> LlamaConfig {
    let mut c = if small {
        LlamaConfig::new(4096, 256, 704, 4, 4, 1, 64)
    } else {
        LlamaConfig::new(32000, 2048, 5632, 16, 32, 8, 64)
    };
    c.max_position_embeddings = seq.max(256);
    c
}

/// Bytes of the weights a decode step reads: everything but the embedding table, of which it
/// reads one row per token.
pub(crate) fn weight_bytes(c: &LlamaConfig, elem: usize) -> f64 {
    let embed = if c.tie_word_embeddings {
        0
    } else {
        c.vocab_size * c.hidden_size
    };
    ((c.num_params() - embed) * elem) as f64
}

/// FLOPs of a dense prefill of `batch` sequences of `t` tokens: 2 per weight per token (the
/// embedding excluded), plus the attention scores and their weighted sum over all t² pairs
/// (the kernels compute the full square, then mask).
pub(crate) fn prefill_flops(c: &LlamaConfig, batch: usize, t: usize) -> f64 {
    let weights = weight_bytes(c, 1);
    let attn = 4.0
        * c.num_hidden_layers as f64
        * (c.num_attention_heads * c.head_dim) as f64
        * (t * t) as f64;
    batch as f64 * (2.0 * weights * t as f64 + attn)
}

pub(crate) fn engine<Bk: Backend>(
    o: &Opts,
    dtype: &str,
    elem: usize,
    peak_tflops: f64,
    device: &Bk::Device,
) -> Value {
    let (prefill, decode, repeats) = if o.small { (32, 8, 2) } else { (128, 32, 3) };
    let config = one_b_config(o.small, prefill + decode + 16);
    Bk::seed(device, 7);
    let base = config.init::<Bk>(device);
    let wbytes = weight_bytes(&config, elem);
    eprintln!(
        "{dtype}: {:.0}M parameters, {:.2} GB of weights read per decode step",
        config.num_params() as f64 / 1e6,
        wbytes / 1e9
    );
    let mut points = Vec::new();
    for batch in [1, 8, 32] {
        let prompts = engine_bench::prompts(batch, prefill, config.vocab_size);
        let r = engine_bench::measure(&base, &prompts, 0.25, decode, repeats);
        let flops = prefill_flops(&config, batch, prefill);
        // a decode step reads every weight once for the whole batch
        let bandwidth = wbytes * r.decode_dense / batch as f64 / 1e9;
        let tflops = flops * r.prefill_dense / (batch * prefill) as f64 / 1e12;
        eprintln!(
            "batch {batch}: prefill dense {:.0} tok/s ({tflops:.1} TFLOP/s), routed {:.0} (ideal {:.2}x); decode dense {:.1} tok/s ({bandwidth:.0} GB/s of weights), routed {:.1} (ideal {:.2}x by FLOPs, {:.2}x by weight bytes)",
            r.prefill_dense, r.prefill_routed, r.prefill_ideal, r.decode_dense, r.decode_routed, r.decode_ideal, r.decode_weight_ideal
        );
        let mut v = serde_json::to_value(&r).unwrap();
        v["prefill_dense_tflops"] = json!(tflops);
        v["prefill_dense_peak_fraction"] = json!(tflops / peak_tflops);
        v["decode_dense_weight_gbs"] = json!(bandwidth);
        v["decode_dense_bandwidth_fraction"] = json!(bandwidth / o.bandwidth_gbs);
        points.push(v);
    }
    json!({
        "dtype": dtype,
        "params": config.num_params(),
        "layers": config.num_hidden_layers,
        "hidden": config.hidden_size,
        "prefill_tokens": prefill,
        "decode_steps": decode,
        "repeats": repeats,
        "target_skip": 0.25,
        "weight_bytes_per_decode_step": wbytes,
        "points": points,
    })
}

pub(crate) fn train<Bk: AutodiffBackend>(
    o: &Opts,
    checkpoint_layers: bool,
    device: &Bk::Device,
) -> Value {
    let (batch, seq, steps) = if o.small { (2, 64, 3) } else { (4, 512, 6) };
    let config = one_b_config(o.small, seq + 1);
    Bk::seed(device, 3);
    let model = config
        .init::<Bk>(device)
        .with_new_routers(RoutingConfig::new())
        .freeze_base();
    let trainer = LmTrainer::new(model, Objective::Sparsity(SparsityLossConfig::new()))
        .with_checkpoint_layers(checkpoint_layers);
    let seqs = engine_bench::prompts(batch, seq + 1, config.vocab_size);
    let views: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
    let mut times = Vec::new();
    let mut loss = f64::NAN;
    for step in 0..steps + 1 {
        let b = LmBatch {
            temperature: 3.0,
            noise_seed: step as u64,
            ..LmBatch::<Bk>::from_sequences(&views, device)
        };
        let t = Instant::now();
        let out = trainer.step(b);
        loss = out.item.sync().loss;
        drop(out.grads);
        Bk::sync(device).expect("device sync");
        if step > 0 {
            // the first step compiles kernels and autotunes the matmuls
            times.push(t.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let tokens = (batch * seq) as f64;
    // frozen base: the backward pass computes input gradients (2 FLOPs per weight per token)
    // and no weight gradients; checkpointing adds one more forward
    let per_token = 2.0 * weight_bytes(&config, 1) * if checkpoint_layers { 3.0 } else { 2.0 };
    let tflops = per_token * tokens / median / 1e12;
    eprintln!(
        "router tuning{}: {:.0} tokens/s ({median:.3} s per step of {batch}x{seq}; ~{tflops:.1} TFLOP/s), loss {loss:.3}",
        if checkpoint_layers { " --checkpoint-layers" } else { "" },
        tokens / median
    );
    json!({
        "checkpoint_layers": checkpoint_layers,
        "batch": batch,
        "seq": seq,
        "params": config.num_params(),
        "steps_timed": times.len(),
        "median_step_s": median,
        "tokens_per_s": tokens / median,
        "approx_tflops": tflops,
        "loss": loss,
    })
}

// ---------------------------------------------------------------- memory and report
