//! Project automation: `cargo xtask <task>`.
//!
//! - `ci`: formatting check, clippy (warnings are errors), the test suite, and a compile check
//!   of the GPU backends (`--features wgpu,cuda`; no GPU needed to compile).
//! - `bench`: the sparse engine against dense, prefill and decode (`examples/bench_sparse.rs`).
//! - `experiment`: the demo's comparison with a larger model at 25% and 40% skip, written up
//!   as `docs/results.md` (`report [DIR]` rewrites it from a finished run).
//! - `bench-real`: the project against llama.cpp and transformers on SmolLM2-135M, same
//!   weights and threads (sets up its own Python venv and files under `target/`).
//! - `bench-serve`: `skipgpt serve` (dense and routed) against llama.cpp's `llama-server` on
//!   the SmolLM2 GGUF under 1, 4 and 16 streaming clients (throughput, TTFT, ITL).
//! - `gpu-check`: builds `examples/gpu_check.rs` with CUDA into `gpu-check/` (git-ignored; one
//!   file to carry to a GPU machine that has no toolchain or network) and, with `--run`, runs it
//!   here: parity on the tiny fixtures, the sparse engine on a 1B-shape model at f32 and bf16,
//!   router-tuning throughput and memory (see `docs/backends.md`).
//! - `fidelity`: SmolLM2 routed models judged against the dense model on text and prompts no
//!   training run used, the token objectives compared and the quality-speed frontier against
//!   ShortGPT, written up as `docs/results-fidelity.md`.
//! - `fixtures`: regenerates `tests/fixtures/variants/` with HF transformers and
//!   `tests/fixtures/peft-lora/` with peft (needs a Python with torch, transformers, peft,
//!   safetensors, tokenizers; set `PYTHON`).

mod bench_real;
mod bench_serve;
mod experiment;
mod fidelity;
mod real;

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "cargo xtask", about = "Project automation")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand, Debug)]
enum Task {
    /// Formatting check, clippy (warnings are errors), the tests, and a compile check of the
    /// GPU backends.
    Ci,
    /// Regenerates the transformers and peft fixtures (needs PYTHON with torch, transformers,
    /// peft).
    Fixtures,
    /// The sparse-engine benchmark on a random model (`examples/bench_sparse.rs`).
    Bench {
        /// Cargo features to build with, e.g. `cuda`.
        #[arg(long)]
        features: Option<String>,
        /// Arguments for the benchmark, e.g. `--layers 8 --hidden 512`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The project against llama.cpp and transformers on SmolLM2-135M.
    BenchReal {
        /// Threads for every system (default: every core).
        #[arg(long)]
        threads: Option<usize>,
        /// 32 decoded tokens and one round instead of 128 and three.
        #[arg(long)]
        quick: bool,
        /// Rounds over every system (default 3, 1 with --quick): each round runs each system
        /// once, in a rotated order, and the table gives each figure's median and range.
        #[arg(long)]
        rounds: Option<usize>,
    },
    /// `skipgpt serve` against llama.cpp's llama-server on SmolLM2 under concurrent clients.
    BenchServe {
        /// Threads for every server (default: every core).
        #[arg(long)]
        threads: Option<usize>,
        /// Concurrent clients, one level after another.
        #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
        clients: Vec<usize>,
        /// Requests each client sends at each level, one after another.
        #[arg(long, default_value_t = 2)]
        requests: usize,
        /// New tokens per request.
        #[arg(long, default_value_t = 128)]
        new_tokens: usize,
        /// Rounds: every server runs every level once per round, in turn.
        #[arg(long, default_value_t = 2)]
        rounds: usize,
        /// llama.cpp's llama-server [default: ~/.cache/llama.cpp/bin/llama-server, as
        /// ../shared/tools/build_llama_tools.sh builds it].
        #[arg(long)]
        llama_server: Option<PathBuf>,
    },
    /// Builds the CUDA check into `gpu-check/` and, with --run, runs it here.
    GpuCheck {
        #[arg(long)]
        run: bool,
        /// Arguments for `gpu_check`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The demo's comparison at 25% and 40% skip on a larger model, written up as
    /// `docs/results.md`.
    Experiment {
        /// Cargo features to build with (repeatable), e.g. `cuda`.
        #[arg(long)]
        features: Vec<String>,
        /// Output directory [default: runs/experiment, or runs/real with --real].
        #[arg(long)]
        out: Option<String>,
        /// SmolLM2-135M on the Python documentation instead of the synthetic corpus; writes
        /// `docs/results-smollm2.md`. Settings: `--seq-len 128 --batch-size 4 --init-steps 60
        /// --tune-steps 150 --lora-steps 100 --lora-lr 1e-3 --valid-sequences 64 --eval-sequences 96 --mc-examples 200 --threads 0`.
        #[arg(long)]
        real: bool,
        /// With --real: `init` stops after the initialisation comparison, `t25` trains only
        /// the 25% models, `speed` trains nothing and measures the finished models.
        #[arg(long, value_parser = ["init", "t25", "all", "speed"], default_value = "all")]
        until: String,
        /// Settings passed on to `skipgpt demo` (`--hidden-size 192 --layers 6 ...`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        settings: Vec<String>,
    },
    /// SmolLM2 routed models judged where nobody trained them (KL and agreement with dense,
    /// general-text perplexity, greedy answers): the objectives at 25% and the frontier
    /// against ShortGPT, written up as `docs/results-fidelity.md`. Resumable.
    Fidelity {
        /// Output directory.
        #[arg(long, default_value = "runs/fidelity")]
        out: String,
        /// Parameter-skip budgets of the frontier, in percent.
        #[arg(long, value_delimiter = ',', default_value = "5,10,15,20,25,40")]
        targets: Vec<u32>,
        /// `t25` stops after the 25% models; `report` only rewrites the page; `publish` writes
        /// the finished 25% point to `models/smollm2-135m/skipgpt-t25/`.
        #[arg(long, value_parser = ["t25", "all", "report", "publish"], default_value = "all")]
        until: String,
        /// `frontier` skips the 25% models (their measurements are kept in
        /// `docs/data/fidelity/`) and trains the frontier budgets at once; `budget` goes
        /// straight to the 25% point's longer stage 2.
        #[arg(long, value_parser = ["start", "frontier", "budget"], default_value = "start")]
        from: String,
        /// Threads for every command (default: every core).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Rewrites `docs/results.md` from a finished experiment.
    Report {
        /// The experiment's directory [default: runs/experiment, or runs/real with --real].
        dir: Option<PathBuf>,
        /// Rewrite `docs/results-smollm2.md` from `experiment --real` instead.
        #[arg(long)]
        real: bool,
    },
}

/// Today's date (UTC, `YYYY-MM-DD`) for the generated reports.
pub(crate) fn today() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

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

/// The release binary and the benchmark example the real-model tasks run.
pub(crate) fn build_release_tools() -> Result<()> {
    run(
        "cargo",
        &[
            "build",
            "--release",
            "--bin",
            "skipgpt",
            "--example",
            "bench_real",
            "--features",
            "bench",
        ],
    )
}

fn ci() -> Result<()> {
    run("cargo", &["fmt", "--all", "--", "--check"])?;
    run(
        "cargo",
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--features",
            "bench",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    run("cargo", &["test", "--workspace", "--", "--include-ignored"])?;
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
fn bench(features: Option<&str>, args: &[String]) -> Result<()> {
    let mut cargo = vec![
        "run",
        "--release",
        "--features",
        "bench",
        "--example",
        "bench_sparse",
    ];
    if let Some(f) = features {
        cargo.extend(["--features", f]);
    }
    cargo.push("--");
    cargo.extend(args.iter().map(String::as_str));
    run("cargo", &cargo)
}

/// `cargo xtask gpu-check [--run] [gpu_check args...]`.
fn gpu_check(run_here: bool, args: &[String]) -> Result<()> {
    // The GPU machine runs the binary from the repository root (the fixtures travel with the
    // working tree), so only the binary needs carrying.
    run(
        "cargo",
        &[
            "build",
            "--release",
            "--features",
            "cuda,bench",
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
    if run_here {
        let mut all = vec!["--out", "gpu-check/out"];
        all.extend(args.iter().map(String::as_str));
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
    match Cli::parse().task {
        Task::Ci => ci(),
        Task::Fixtures => fixtures(),
        Task::Bench { features, args } => bench(features.as_deref(), &args),
        Task::GpuCheck { run, args } => gpu_check(run, &args),
        Task::BenchReal {
            threads,
            quick,
            rounds,
        } => bench_real::bench_real(threads, quick, rounds),
        Task::BenchServe {
            threads,
            clients,
            requests,
            new_tokens,
            rounds,
            llama_server,
        } => bench_serve::bench_serve(bench_serve::Options {
            threads: threads
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
            levels: clients,
            requests_per_client: requests,
            new_tokens,
            rounds: rounds.max(1),
            llama_server,
        }),
        Task::Experiment {
            features,
            out,
            real: true,
            until,
            settings,
        } => {
            if !features.is_empty() {
                anyhow::bail!("--real runs on the CPU build");
            }
            real::experiment(out.as_deref().unwrap_or("runs/real"), &settings, &until)
        }
        Task::Experiment {
            features,
            out,
            settings,
            ..
        } => experiment::experiment(
            &features,
            out.as_deref().unwrap_or("runs/experiment"),
            &settings,
        ),
        Task::Fidelity {
            out,
            targets,
            until,
            from,
            threads,
        } => {
            let settings = fidelity::Settings {
                targets,
                threads,
                ..fidelity::Settings::default()
            };
            if until == "report" {
                fidelity::write_report(std::path::Path::new(&out), &settings)
            } else if until == "publish" {
                fidelity::publish(std::path::Path::new(&out))
            } else {
                fidelity::experiment(&out, settings, &from, &until)
            }
        }
        Task::Report { dir, real: true } => {
            real::write_report(&dir.unwrap_or_else(|| "runs/real".into()))
        }
        Task::Report { dir, real: false } => experiment::write_report(
            &dir.unwrap_or_else(|| "runs/experiment".into()),
            &experiment::default_settings(),
            "ndarray",
        ),
    }
}
