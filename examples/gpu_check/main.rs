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
//! `cargo run --release --features bench --example gpu_check -- --cpu --small`.

#[path = "../support/engine_bench.rs"]
mod engine_bench;
mod memory;
mod report;
mod sections;

use memory::{nvidia_smi, GpuMemory};
use report::*;
use sections::*;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use burn::backend::Autodiff;
use serde_json::{json, Value};

#[cfg(feature = "cuda")]
mod gpu {
    pub type F32 = burn::backend::Cuda<f32>;
    pub type Bf16 = burn::backend::Cuda<half::bf16>;
}
type Cpu = burn::backend::NdArray<f32>;

/// Logits within this of HF transformers (the wgpu tests' bound; see
/// `crates/skipgpt-train/tests/it/wgpu.rs`).
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
