//! Project automation: `cargo xtask <task>`.
//!
//! - `ci`: formatting check, clippy (warnings are errors), the test suite, and a compile check
//!   of the GPU backends (`--features wgpu,cuda`; no GPU needed to compile).
//! - `bench`: the sparse engine against dense, prefill and decode (`examples/bench_sparse.rs`).
//! - `experiment`: the demo's comparison with a larger model at 25% and 40% skip, written up
//!   as `docs/results.md` (`report [DIR]` rewrites it from a finished run).
//! - `bench-real`: the project against llama.cpp and transformers on SmolLM2-135M, same
//!   weights and threads (sets up its own Python venv and files under `target/`).
//! - `gpu-check`: builds `examples/gpu_check.rs` with CUDA into `gpu-check/` (git-ignored; one
//!   file to carry to a GPU machine that has no toolchain or network) and, with `--run`, runs it
//!   here: parity on the tiny fixtures, the sparse engine on a 1B-shape model at f32 and bf16,
//!   router-tuning throughput and memory (see `docs/backends.md`).
//! - `fixtures`: regenerates `tests/fixtures/variants/` with HF transformers and
//!   `tests/fixtures/peft-lora/` with peft (needs a Python with torch, transformers, peft,
//!   safetensors, tokenizers; set `PYTHON`).

mod bench_real;
mod experiment;

use std::process::Command;

use anyhow::{bail, Context, Result};

pub(crate) fn run(program: &str, args: &[&str]) -> Result<()> {
    eprintln!("$ {program} {}", args.join(" "));
    let status = Command::new(program)
        .args(args)
        .status()
        .with_context(|| format!("could not start {program}"))?;
    if !status.success() {
        bail!("`{program} {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

fn ci() -> Result<()> {
    run("cargo", &["fmt", "--all", "--", "--check"])?;
    run(
        "cargo",
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    run("cargo", &["test", "--workspace"])?;
    run(
        "cargo",
        &["check", "--workspace", "--features", "wgpu,cuda"],
    )
}

const VARIANTS: [&str; 3] = [
    "llama3_tied_bf16_sharded",
    "dynamic_rope",
    "qwen2_linear_f16",
];

fn fixtures() -> Result<()> {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let corpus = std::env::var("CORPUS").unwrap_or_else(|_| "/usr/share/common-licenses/*".into());
    for v in VARIANTS {
        let tmp = std::env::temp_dir().join(format!("skipgpt-fixture-{v}"));
        let tmp_s = tmp.to_string_lossy().into_owned();
        run(
            &python,
            &[
                "tools/make_fixtures.py",
                &tmp_s,
                "--corpus",
                &corpus,
                "--variant",
                v,
            ],
        )?;
        let dest = format!("tests/fixtures/variants/{v}");
        let _ = std::fs::remove_dir_all(&dest);
        std::fs::create_dir_all(&dest)?;
        for item in ["model", "reference.safetensors", "reference.json"] {
            run("cp", &["-r", &format!("{tmp_s}/{item}"), &dest])?;
        }
    }
    // a LoRA adapter made by peft itself, with the adapted model's logits
    run(
        &python,
        &["tools/make_peft_fixture.py", "tests/fixtures/peft-lora"],
    )
}

/// `cargo xtask bench [--features cuda] [bench args...]`: the sparse-engine benchmark
/// (`examples/bench_sparse.rs`), built with optimisation, its table on stdout.
fn bench(args: &[String]) -> Result<()> {
    let (mut cargo, mut rest) = (
        vec!["run", "--release", "--example", "bench_sparse"],
        vec![],
    );
    let mut i = 0;
    while i < args.len() {
        if args[i] == "--features" {
            cargo.push("--features");
            cargo.push(args.get(i + 1).map(String::as_str).unwrap_or(""));
            i += 2;
        } else {
            rest.push(args[i].as_str());
            i += 1;
        }
    }
    cargo.push("--");
    cargo.extend(rest);
    run("cargo", &cargo)
}

/// `cargo xtask gpu-check [--run] [gpu_check args...]`.
fn gpu_check(args: &[String]) -> Result<()> {
    // The GPU machine runs the binary from the repository root (the fixtures travel with the
    // working tree), so only the binary needs carrying.
    run(
        "cargo",
        &[
            "build",
            "--release",
            "--features",
            "cuda",
            "--example",
            "gpu_check",
        ],
    )?;
    std::fs::create_dir_all("gpu-check")?;
    std::fs::copy("target/release/examples/gpu_check", "gpu-check/gpu_check")
        .context("copy the gpu_check binary into gpu-check/")?;
    // debug info would double the size of what has to travel
    if run("strip", &["gpu-check/gpu_check"]).is_err() {
        eprintln!("(strip failed; the binary keeps its symbols)");
    }
    let rest: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| *a != "--run")
        .collect();
    if args.iter().any(|a| a == "--run") {
        let mut all = vec!["--out", "gpu-check/out"];
        all.extend(rest);
        run("gpu-check/gpu_check", &all)
    } else {
        eprintln!(
            "built gpu-check/gpu_check; on the GPU machine, from the repository root: \
             tools/gpu-check.sh DIR (report in DIR/gpu-check.md)"
        );
        Ok(())
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str).unwrap_or_default() {
        "ci" => ci(),
        "fixtures" => fixtures(),
        "bench" => bench(&args[1..]),
        "gpu-check" => gpu_check(&args[1..]),
        "bench-real" => bench_real::bench_real(&args[1..]),
        "experiment" => experiment::experiment(&args[1..]),
        "report" => experiment::write_report(
            std::path::Path::new(args.get(1).map_or("runs/experiment", String::as_str)),
            &experiment::default_settings(),
            "ndarray",
        ),
        _ => bail!("usage: cargo xtask <ci|fixtures|bench-real [--threads N]|gpu-check [--run]|bench [--features cuda] [--layers 8 --hidden 512 ...]|experiment [--features cuda] [--hidden-size 192 ...]|report [DIR]>"),
    }
}
