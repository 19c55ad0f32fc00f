//! `GET /metrics` in Prometheus' text format: requests, tokens in and out, the queue and the
//! running batch, latency histograms (time to first token, between tokens, per engine step)
//! and what the routers skipped.

use std::fmt::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Histogram bucket bounds, seconds.
const LATENCY_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Bucket bounds of the running batch size.
const BATCH_BUCKETS: [f64; 8] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

#[derive(Debug, Clone)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, x: f64) {
        for (c, &b) in self.counts.iter_mut().zip(self.bounds) {
            if x <= b {
                *c += 1;
            }
        }
        self.sum += x;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (c, b) in self.counts.iter().zip(self.bounds) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", self.sum, self.count);
    }
}

#[derive(Debug, Clone)]
struct Inner {
    requests: std::collections::BTreeMap<u16, u64>,
    prompt_tokens: u64,
    generated_tokens: u64,
    cancelled: u64,
    attn_skipped: u64,
    mlp_skipped: u64,
    decisions: u64,
    running: usize,
    ttft: Histogram,
    itl: Histogram,
    queue_wait: Histogram,
    step: Histogram,
    batch: Histogram,
}

/// The server's counters, shared by the HTTP side and the engine thread.
pub struct Metrics {
    inner: Mutex<Inner>,
    /// Requests accepted and not yet taken into a slot.
    pub waiting: Arc<AtomicUsize>,
}

impl Metrics {
    pub fn new(waiting: Arc<AtomicUsize>) -> Self {
        Metrics {
            inner: Mutex::new(Inner {
                requests: Default::default(),
                prompt_tokens: 0,
                generated_tokens: 0,
                cancelled: 0,
                attn_skipped: 0,
                mlp_skipped: 0,
                decisions: 0,
                running: 0,
                ttft: Histogram::new(&LATENCY_BUCKETS),
                itl: Histogram::new(&LATENCY_BUCKETS),
                queue_wait: Histogram::new(&LATENCY_BUCKETS),
                step: Histogram::new(&LATENCY_BUCKETS),
                batch: Histogram::new(&BATCH_BUCKETS),
            }),
            waiting,
        }
    }

    fn with(&self, f: impl FnOnce(&mut Inner)) {
        // a panic elsewhere while holding the lock leaves counters that are still counters
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut inner);
    }

    /// A response sent with `status`.
    pub fn request(&self, status: u16) {
        self.with(|m| *m.requests.entry(status).or_default() += 1);
    }

    pub fn queue_wait(&self, d: Duration) {
        self.with(|m| m.queue_wait.observe(d.as_secs_f64()));
    }

    pub fn step(&self, running: usize, d: Duration) {
        self.with(|m| {
            m.running = running;
            m.batch.observe(running as f64);
            m.step.observe(d.as_secs_f64());
        });
    }

    pub fn tokens_in(&self, n: usize) {
        self.with(|m| m.prompt_tokens += n as u64);
    }

    /// A token sent: the time to it from the request's arrival (the first), or from the one
    /// before.
    pub fn token_out(&self, ttft: Option<Duration>, itl: Option<Duration>) {
        self.with(|m| {
            m.generated_tokens += 1;
            if let Some(d) = ttft {
                m.ttft.observe(d.as_secs_f64());
            }
            if let Some(d) = itl {
                m.itl.observe(d.as_secs_f64());
            }
        });
    }

    pub fn cancelled(&self) {
        self.with(|m| m.cancelled += 1);
    }

    pub fn finished(&self, attn_skipped: usize, mlp_skipped: usize, decisions: usize) {
        self.with(|m| {
            m.attn_skipped += attn_skipped as u64;
            m.mlp_skipped += mlp_skipped as u64;
            m.decisions += decisions as u64;
        });
    }

    /// The Prometheus text.
    pub fn render(&self) -> String {
        let m = self.inner.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut out = String::new();
        let scalars = [
            (
                "skipgpt_prompt_tokens_total",
                "Prompt tokens run through the model.",
                "counter",
                m.prompt_tokens as f64,
            ),
            (
                "skipgpt_generation_tokens_total",
                "Tokens generated.",
                "counter",
                m.generated_tokens as f64,
            ),
            (
                "skipgpt_requests_cancelled_total",
                "Requests whose client left before the answer ended.",
                "counter",
                m.cancelled as f64,
            ),
            (
                "skipgpt_queue_length",
                "Requests waiting for a slot.",
                "gauge",
                self.waiting.load(Ordering::SeqCst) as f64,
            ),
            (
                "skipgpt_running_sequences",
                "Requests in the running batch at the last step.",
                "gauge",
                m.running as f64,
            ),
            (
                "skipgpt_attention_skipped_total",
                "(token, layer) attention modules the routers skipped, over finished requests.",
                "counter",
                m.attn_skipped as f64,
            ),
            (
                "skipgpt_mlp_skipped_total",
                "(token, layer) MLP modules the routers skipped, over finished requests.",
                "counter",
                m.mlp_skipped as f64,
            ),
            (
                "skipgpt_routing_decisions_total",
                "(token, layer) positions routed, per module kind, over finished requests.",
                "counter",
                m.decisions as f64,
            ),
        ];
        for (name, help, kind, value) in scalars {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        let _ = writeln!(out, "# HELP skipgpt_requests_total HTTP responses by status.\n# TYPE skipgpt_requests_total counter");
        for (status, n) in &m.requests {
            let _ = writeln!(out, "skipgpt_requests_total{{status=\"{status}\"}} {n}");
        }
        m.ttft.render(
            &mut out,
            "skipgpt_time_to_first_token_seconds",
            "From a request's arrival to its first token.",
        );
        m.itl.render(
            &mut out,
            "skipgpt_inter_token_latency_seconds",
            "Between consecutive tokens of a request.",
        );
        m.queue_wait.render(
            &mut out,
            "skipgpt_queue_wait_seconds",
            "From arrival to a slot.",
        );
        m.step.render(
            &mut out,
            "skipgpt_step_seconds",
            "One engine step (every running request advanced once).",
        );
        m.batch.render(
            &mut out,
            "skipgpt_batch_size",
            "Requests in the running batch per step.",
        );
        out
    }
}
