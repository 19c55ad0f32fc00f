//! `gpu_check`: one unattended check of the GPU backend, for a machine with no network.
//!
//! `cargo xtask gpu-check` builds it with `--features cuda` and says how to run it; on the GPU
//! machine, from the repository root: `gpu-check/gpu_check --out DIR`. It runs each section in
//! a child process of its own (a crash or a hang in one leaves the others, and each section's
//! GPU memory peak is its own), then prints one table and writes `DIR/gpu-check.json` and
//! `DIR/gpu-check.md`. Sections:
//!
//! - `parity`: the tiny HF fixtures at f32: dense logits and hidden states, routed logits and
//!   gates (both MLP-router inputs, gated and through the sparse engine), greedy tokens, and
//!   one stage-1 router-tuning step's loss and router gradients against the CPU backend;
//! - `engine-f32`, `engine-bf16`: a random model of LLaMA-1B shape (16 layers, hidden 2048,
//!   32 query / 8 key-value heads, MLP 5632, vocab 32000), dense against routed (25% skip)
//!   prefill and decode at batch 1, 8 and 32, with the ideal speedups, the bytes read per
//!   decoded token against memory bandwidth and the prefill FLOPs against peak;
//! - `train`, `train-ckpt`: router-tuning tokens/s on that model at f32, without and with
//!   gradient checkpointing per layer, and the peak GPU memory (`nvidia-smi`, sampled every
//!   100 ms: memory the process holds, the allocator's pool included).
//!
//! `--cpu` runs the same sections on the CPU backend (bf16 skipped; always the case in a build
//! without `--features cuda`), which is how the script is tried before spending GPU time:
//! `cargo run --release --example gpu_check -- --cpu --small`.

#[path = "support/engine_bench.rs"]
mod engine_bench;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::backend::Autodiff;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use burn::train::metric::ItemLazy;
use burn::train::TrainStep;
use serde_json::{json, Value};
use skipgpt_model::engine::{generate_sparse, sparse_forward, LogitRows, SparseCache};
use skipgpt_model::safetensors_io::TensorFile;
use skipgpt_model::{
    generate, load_pretrained, GenerateOptions, LlamaConfig, MlpRouterInput, Routing,
    RoutingConfig, Sampling,
};
use skipgpt_train::loader::LmBatch;
use skipgpt_train::loss::SparsityLossConfig;
use skipgpt_train::step::LmTrainer;
use skipgpt_train::Objective;

#[cfg(feature = "cuda")]
mod gpu {
    pub type F32 = burn::backend::Cuda<f32>;
    pub type Bf16 = burn::backend::Cuda<half::bf16>;
}
type Cpu = burn::backend::NdArray<f32>;

/// Logits within this of HF transformers (the wgpu tests' bound; see `tests/it/wgpu.rs`).
const GPU_TOL: f64 = 1e-3;

const SECTIONS: [&str; 5] = ["parity", "engine-f32", "engine-bf16", "train", "train-ckpt"];
/// Each section's time limit (seconds) unless `--timeout` sets one for all: together seven
/// minutes, so that the whole check fits a borrowed GPU's ten-minute slot with room to spare.
const LIMITS: [u64; 5] = [80, 120, 100, 60, 60];

/// The CUDA check: parity, engine speed and router tuning, each section in a subprocess with
/// a time limit, reported to `--out`.
#[derive(clap::Parser, Debug)]
struct Opts {
    /// Where the report (`gpu-check.md`, `gpu-check.json`) and each section's JSON go.
    #[arg(long, default_value = "gpu-check-out")]
    out: PathBuf,
    #[arg(long, default_value = "tests/fixtures/llama-tiny")]
    fixtures: PathBuf,
    /// Run one section in this process (what the parent runs in each subprocess).
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(SECTIONS))]
    only: Option<String>,
    /// Where `--only` writes its section's JSON.
    #[arg(long)]
    result: Option<PathBuf>,
    /// Small shapes, for trying the check on a CPU.
    #[arg(long)]
    small: bool,
    /// Run on the CPU (always, in a build without the `cuda` feature).
    #[arg(long)]
    cpu: bool,
    /// Seconds per section, instead of each section's own limit.
    #[arg(long = "timeout")]
    timeout_s: Option<u64>,
    /// Memory bandwidth (GB/s) and peak f32 / bf16 matrix rates (TFLOP/s) the figures are
    /// compared with: H200 SXM by default (datasheet; measured copy ~4300 GB/s).
    #[arg(long = "bandwidth-gbs", default_value_t = 4800.0)]
    bandwidth_gbs: f64,
    #[arg(long = "peak-tflops-f32", default_value_t = 67.0)]
    peak_f32: f64,
    #[arg(long = "peak-tflops-bf16", default_value_t = 990.0)]
    peak_bf16: f64,
}

fn parse() -> Opts {
    let mut o = <Opts as clap::Parser>::parse();
    o.cpu |= !cfg!(feature = "cuda");
    o
}

fn main() {
    let o = parse();
    match o.only.clone() {
        Some(section) => {
            let memory = GpuMemory::start();
            let t = Instant::now();
            let mut result = run_section(&section, &o);
            result["seconds"] = json!(t.elapsed().as_secs_f64());
            result["peak_gpu_mib"] = json!(memory.peak_mib());
            result["baseline_gpu_mib"] = json!(memory.baseline_mib());
            let text = serde_json::to_string_pretty(&result).unwrap();
            match &o.result {
                Some(path) => std::fs::write(path, text).expect("write the section's result"),
                None => println!("{text}"),
            }
        }
        None => orchestrate(&o),
    }
}

/// Runs every section in a child process, then writes and prints the report.
fn orchestrate(o: &Opts) {
    std::fs::create_dir_all(&o.out).expect("create --out");
    let exe = std::env::current_exe().expect("own path");
    let mut report = json!({
        "date": date(),
        "backend": backend_name(o),
        "gpu": nvidia_smi(&["--query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem", "--format=csv,noheader"]),
        "limits": {"bandwidth_gbs": o.bandwidth_gbs, "peak_tflops_f32": o.peak_f32, "peak_tflops_bf16": o.peak_bf16},
        "sections": {},
    });
    eprintln!("# gpu_check on {}: {}", backend_name(o), report["gpu"]);
    for (section, limit) in SECTIONS.into_iter().zip(LIMITS) {
        let file = o.out.join(format!("{section}.json"));
        let _ = std::fs::remove_file(&file);
        let mut cmd = Command::new(&exe);
        cmd.args(["--only", section, "--result"])
            .arg(&file)
            .arg("--fixtures")
            .arg(&o.fixtures);
        if o.small {
            cmd.arg("--small");
        }
        if o.cpu {
            cmd.arg("--cpu");
        }
        eprintln!("\n## {section}");
        let t = Instant::now();
        let status = run_with_timeout(cmd, Duration::from_secs(o.timeout_s.unwrap_or(limit)));
        let value = match std::fs::read_to_string(&file) {
            Ok(text) => serde_json::from_str(&text)
                .unwrap_or_else(|e| json!({"error": format!("unreadable result: {e}")})),
            Err(_) => {
                json!({"error": format!("no result ({status}) after {:.0} s; see the log above", t.elapsed().as_secs_f64())})
            }
        };
        report["sections"][section] = value;
        // written after every section, so that a session cut short keeps what finished
        write_report(o, &report);
    }
    println!("{}", markdown(&report));
}

fn write_report(o: &Opts, report: &Value) {
    std::fs::write(
        o.out.join("gpu-check.json"),
        serde_json::to_string_pretty(report).unwrap(),
    )
    .expect("write gpu-check.json");
    std::fs::write(o.out.join("gpu-check.md"), markdown(report)).expect("write gpu-check.md");
}

fn run_with_timeout(mut cmd: Command, limit: Duration) -> String {
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return format!("could not start: {e}"),
    };
    let t = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.to_string(),
            Ok(None) if t.elapsed() > limit => {
                let _ = child.kill();
                let _ = child.wait();
                return format!("killed after the {} s limit", limit.as_secs());
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(200)),
            Err(e) => return format!("wait failed: {e}"),
        }
    }
}

fn backend_name(o: &Opts) -> &'static str {
    if o.cpu {
        "ndarray (CPU)"
    } else {
        "cuda"
    }
}

fn run_section(section: &str, o: &Opts) -> Value {
    if !SECTIONS.contains(&section) {
        eprintln!("unknown section {section}; one of {}", SECTIONS.join(", "));
        std::process::exit(2)
    }
    #[cfg(feature = "cuda")]
    if !o.cpu {
        let device = Default::default();
        return match section {
            "parity" => parity::<gpu::F32>(&o.fixtures, &device),
            "engine-f32" => engine::<gpu::F32>(o, "f32", 4, o.peak_f32, &device),
            "engine-bf16" => engine::<gpu::Bf16>(o, "bf16", 2, o.peak_bf16, &device),
            "train" => train::<Autodiff<gpu::F32>>(o, false, &device),
            _ => train::<Autodiff<gpu::F32>>(o, true, &device),
        };
    }
    let device = Default::default();
    match section {
        "parity" => parity::<Cpu>(&o.fixtures, &device),
        "engine-f32" => engine::<Cpu>(o, "f32", 4, o.peak_f32, &device),
        "engine-bf16" => json!({"skipped": "bf16 runs on the cuda backend only"}),
        "train" => train::<Autodiff<Cpu>>(o, false, &device),
        _ => train::<Autodiff<Cpu>>(o, true, &device),
    }
}

// ---------------------------------------------------------------- parity

/// One comparison: `value` must be at most `tol` (0 for discrete outputs: counts of mismatches).
fn check(name: &str, value: f64, tol: f64) -> Value {
    let pass = value <= tol && value.is_finite();
    eprintln!(
        "{} {name}: {value:e} (tolerance {tol:e})",
        if pass { "PASS" } else { "FAIL" }
    );
    json!({"name": name, "value": value, "tolerance": tol, "pass": pass})
}

fn host<Bk: Backend, const D: usize>(t: Tensor<Bk, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() as f64)
        .fold(0.0, f64::max)
}

fn mismatches<T: PartialEq>(a: &[T], b: &[T]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    a.iter().zip(b).filter(|(x, y)| x != y).count() as f64
}

fn rows(file: &TensorFile, name: &str) -> Vec<Vec<u32>> {
    let (ids, shape) = file.read_i64(name).unwrap();
    ids.chunks(shape[1])
        .map(|r| r.iter().map(|&i| i as u32).collect())
        .collect()
}

fn ids<Bk: Backend>(rows: &[Vec<u32>], device: &Bk::Device) -> Tensor<Bk, 2, Int> {
    let flat: Vec<i64> = rows.iter().flatten().map(|&t| t as i64).collect();
    Tensor::from_data(TensorData::new(flat, [rows.len(), rows[0].len()]), device)
}

fn greedy(n: usize) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: n,
        sampling: Sampling::Greedy,
        eos_token_ids: vec![],
        ignore_eos: true,
    }
}

fn parity<Bk: Backend>(fixtures: &Path, device: &Bk::Device) -> Value {
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
fn router_grads<Bk: AutodiffBackend>(
    fixtures: &Path,
    input: &[Vec<u32>],
    device: &Bk::Device,
) -> (f32, Vec<f32>) {
    let model = load_pretrained::<Bk>(&fixtures.join("model-routed"), device)
        .unwrap()
        .model
        .freeze_base();
    let seqs: Vec<&[u32]> = input.iter().map(Vec::as_slice).collect();
    let batch = LmBatch {
        temperature: 3.0,
        noise_seed: 7,
        ..LmBatch::<Bk>::from_sequences(&seqs, device)
    };
    let trainer = LmTrainer::new(
        model,
        Objective::Sparsity(SparsityLossConfig::new().with_alpha(8.0).with_target(0.25)),
    );
    let (loss, _) = trainer.forward_loss(&batch, true);
    let grads = loss.backward();
    let loss = host(loss.inner())[0];
    let mut g = Vec::new();
    for layer in &trainer.model.model.layers {
        for router in [&layer.attn_router, &layer.mlp_router] {
            let w = &router.as_ref().unwrap().fc2.weight;
            g.extend(host(w.grad(&grads).expect("router weight has a gradient")));
        }
    }
    (loss, g)
}

// ---------------------------------------------------------------- speed

/// LLaMA-1B shape (`--small`: a model the CPU runs in seconds, to try the script).
fn one_b_config(small: bool, seq: usize) -> LlamaConfig {
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
fn weight_bytes(c: &LlamaConfig, elem: usize) -> f64 {
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
fn prefill_flops(c: &LlamaConfig, batch: usize, t: usize) -> f64 {
    let weights = weight_bytes(c, 1);
    let attn = 4.0
        * c.num_hidden_layers as f64
        * (c.num_attention_heads * c.head_dim) as f64
        * (t * t) as f64;
    batch as f64 * (2.0 * weights * t as f64 + attn)
}

fn engine<Bk: Backend>(
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

fn train<Bk: AutodiffBackend>(o: &Opts, checkpoint_layers: bool, device: &Bk::Device) -> Value {
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

/// The GPU's used memory, sampled by `nvidia-smi` every 100 ms; its peak over the section.
struct GpuMemory {
    baseline: Option<u64>,
    peak: Arc<AtomicU64>,
    child: Option<std::process::Child>,
}

impl GpuMemory {
    fn start() -> Self {
        let baseline = nvidia_smi(&["--query-gpu=memory.used", "--format=csv,noheader,nounits"])
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok());
        let peak = Arc::new(AtomicU64::new(0));
        let child = Command::new("nvidia-smi")
            .args([
                "--query-gpu=memory.used",
                "--format=csv,noheader,nounits",
                "-lms",
                "100",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .ok()
            .map(|mut child| {
                let out = child.stdout.take().unwrap();
                let peak = peak.clone();
                std::thread::spawn(move || {
                    for line in BufReader::new(out).lines().map_while(Result::ok) {
                        if let Ok(mib) = line.trim().parse::<u64>() {
                            peak.fetch_max(mib, Ordering::Relaxed);
                        }
                    }
                });
                child
            });
        GpuMemory {
            baseline,
            peak,
            child,
        }
    }

    fn peak_mib(&self) -> Option<u64> {
        self.child.as_ref()?;
        std::thread::sleep(Duration::from_millis(250)); // one more sample
        Some(self.peak.load(Ordering::Relaxed))
    }

    fn baseline_mib(&self) -> Option<u64> {
        self.baseline
    }
}

impl Drop for GpuMemory {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn nvidia_smi(args: &[&str]) -> String {
    Command::new("nvidia-smi")
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "nvidia-smi not available".into())
}

fn date() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn f(v: &Value, digits: usize) -> String {
    v.as_f64()
        .map(|x| format!("{x:.digits$}"))
        .unwrap_or_else(|| "-".into())
}

fn mib(v: &Value) -> String {
    match (v["peak_gpu_mib"].as_u64(), v["baseline_gpu_mib"].as_u64()) {
        (Some(p), Some(b)) => format!(
            "{:.2} GiB ({:.2} GiB above idle)",
            p as f64 / 1024.0,
            p.saturating_sub(b) as f64 / 1024.0
        ),
        _ => "-".into(),
    }
}

/// The report as markdown: parity checks, engine table, training table.
fn markdown(r: &Value) -> String {
    let s = &r["sections"];
    let mut m = format!(
        "# gpu_check, {}\n\nBackend {}; GPU: {}. Compared with {} GB/s memory bandwidth and {} / {} TFLOP/s peak f32 / bf16.\n\n",
        r["date"].as_str().unwrap_or(""),
        r["backend"].as_str().unwrap_or(""),
        r["gpu"].as_str().unwrap_or(""),
        r["limits"]["bandwidth_gbs"],
        r["limits"]["peak_tflops_f32"],
        r["limits"]["peak_tflops_bf16"],
    );
    for (name, v) in s.as_object().into_iter().flatten() {
        if let Some(e) = v["error"].as_str().or(v["skipped"].as_str()) {
            m += &format!("- `{name}`: {e}\n");
        }
    }
    if let Some(checks) = s["parity"]["checks"].as_array() {
        m += "\n## Parity (f32, tiny HF fixtures)\n\n| check | value | tolerance | |\n| --- | --- | --- | --- |\n";
        for c in checks {
            m += &format!(
                "| {} | {:.2e} | {:.0e} | {} |\n",
                c["name"].as_str().unwrap_or(""),
                c["value"].as_f64().unwrap_or(f64::NAN),
                c["tolerance"].as_f64().unwrap_or(f64::NAN),
                if c["pass"] == json!(true) {
                    "pass"
                } else {
                    "**FAIL**"
                }
            );
        }
    }
    let mut engine_header = false;
    for key in ["engine-f32", "engine-bf16"] {
        let e = &s[key];
        let Some(points) = e["points"].as_array() else {
            continue;
        };
        if !engine_header {
            m += &format!(
                "\n## Sparse engine, random LLaMA-1B shape ({} layers, hidden {}, {:.2}B parameters), 25% target skip\n\nPrefill {} tokens per sequence; decode {} steps; medians of {} runs.\n\n| dtype | batch | attn/mlp skip | prefill tok/s dense | routed | speedup (ideal) | dense TFLOP/s (% of peak) | decode tok/s dense | routed | speedup (ideal FLOPs / weight bytes) | dense weight GB/s (% of bandwidth) | peak GPU memory |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
                e["layers"], e["hidden"], e["params"].as_f64().unwrap_or(0.0) / 1e9, e["prefill_tokens"], e["decode_steps"], e["repeats"]
            );
            engine_header = true;
        }
        for p in points {
            let ratio = |a: &str, b: &str| {
                p[a].as_f64().unwrap_or(f64::NAN) / p[b].as_f64().unwrap_or(f64::NAN)
            };
            m += &format!(
                "| {} | {} | {}/{} | {} | {} | {:.2}x ({}x) | {} ({:.1}%) | {} | {} | {:.2}x ({}x / {}x) | {} ({:.1}%) | {} |\n",
                e["dtype"].as_str().unwrap_or(""),
                p["batch"],
                f(&p["attn_skip"], 2),
                f(&p["mlp_skip"], 2),
                f(&p["prefill_dense"], 0),
                f(&p["prefill_routed"], 0),
                ratio("prefill_routed", "prefill_dense"),
                f(&p["prefill_ideal"], 2),
                f(&p["prefill_dense_tflops"], 2),
                100.0 * p["prefill_dense_peak_fraction"].as_f64().unwrap_or(f64::NAN),
                f(&p["decode_dense"], 1),
                f(&p["decode_routed"], 1),
                ratio("decode_routed", "decode_dense"),
                f(&p["decode_ideal"], 2),
                f(&p["decode_weight_ideal"], 2),
                f(&p["decode_dense_weight_gbs"], 0),
                100.0 * p["decode_dense_bandwidth_fraction"].as_f64().unwrap_or(f64::NAN),
                mib(e),
            );
        }
    }
    let mut train_header = false;
    for key in ["train", "train-ckpt"] {
        let t = &s[key];
        if t["tokens_per_s"].is_null() {
            continue;
        }
        if !train_header {
            m += "\n## Router tuning (stage 1, f32, frozen base), same model\n\n| checkpoint layers | batch x seq | tokens/s | s/step | ~TFLOP/s | peak GPU memory |\n| --- | --- | --- | --- | --- | --- |\n";
            train_header = true;
        }
        m += &format!(
            "| {} | {}x{} | {} | {} | {} | {} |\n",
            t["checkpoint_layers"],
            t["batch"],
            t["seq"],
            f(&t["tokens_per_s"], 0),
            f(&t["median_step_s"], 3),
            f(&t["approx_tflops"], 1),
            mib(t)
        );
    }
    m
}
