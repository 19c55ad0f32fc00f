//! `skipgpt serve`: an OpenAI-compatible HTTP server (axum on tokio) in front of the sparse
//! engine, with continuous batching and a per-request compute budget.
//!
//! - [`routes`]: the endpoints; [`api`]: request bodies checked field by field;
//! - [`engine`]: the scheduler thread that owns the model and runs the batch step by step;
//! - [`budget`]: `skip` budgets → router bias shifts; [`sampler`]: sampling parameters;
//! - [`text`]: answer text with stop strings; [`metrics`]: `GET /metrics`.
//!
//! The model loads on the engine thread while the HTTP side already answers (`/health` says
//! 503 until it is ready); a model that fails to load ends the process with its error.

pub mod api;
pub mod budget;
pub mod engine;
pub mod metrics;
pub mod routes;
pub mod sampler;
pub mod text;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, OnceLock};

use anyhow::{Context, Result};
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use burn::tensor::backend::Backend;
use clap::Args;
use skipgpt_model::{ChatTemplate, KvPolicy, LlamaForCausalLM};

use crate::args::ModelArgs;
use crate::backend::BackendKind;
use crate::with_backend;
use budget::Budgets;
use engine::{Job, Scheduler};
use metrics::Metrics;
use routes::{AppState, Ready};

/// Request bodies larger than this are refused (413).
const BODY_LIMIT: usize = 4 << 20;

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on (127.0.0.1: this machine only; 0.0.0.0 for every interface).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every endpoint but /health.
    #[arg(long, env = "SKIPGPT_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Requests decoded together at most (each holds a slot of the cache).
    #[arg(long, default_value_t = 16, value_parser = crate::args::positive)]
    pub max_seqs: usize,
    /// Requests waiting for a slot at most; past it the server answers 503.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// A Jinja chat template to use instead of the model's own.
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
    /// The model's name in /v1/models and responses (default: the file or directory name).
    #[arg(long)]
    pub served_model_name: Option<String>,
}

pub fn run(backend: BackendKind, args: ServeArgs) -> Result<()> {
    with_backend!(backend, |B, device| serve_on::<B>(args.clone(), device))
}

fn serve_on<B: Backend>(args: ServeArgs, device: B::Device) -> Result<()> {
    let waiting = Arc::new(AtomicUsize::new(0));
    let running = Arc::new(AtomicUsize::new(0));
    let metrics = Arc::new(Metrics::new(waiting.clone()));
    let ready = Arc::new(OnceLock::new());
    let load_error = Arc::new(OnceLock::new());
    let (jobs, rx) = std::sync::mpsc::channel::<Job>();
    {
        let (args, ready, load_error) = (args.clone(), ready.clone(), load_error.clone());
        let (waiting, running, metrics) = (waiting.clone(), running.clone(), metrics.clone());
        std::thread::Builder::new()
            .name("skipgpt-engine".into())
            .spawn(move || match load::<B>(&args, &device) {
                Ok((model, budgets, r)) => {
                    eprintln!("model ready: {}", args.model.dir.display());
                    let _ = ready.set(r);
                    Scheduler::new(model, budgets, args.max_seqs, rx, waiting, running, metrics)
                        .run();
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    let _ = load_error.set(format!("{e:#}"));
                    std::process::exit(1);
                }
            })
            .context("starting the engine thread")?;
    }
    let name = args
        .served_model_name
        .clone()
        .unwrap_or_else(|| model_name(&args.model.dir));
    let state = Arc::new(AppState {
        jobs,
        waiting,
        running,
        max_seqs: args.max_seqs,
        max_queue: args.max_queue,
        ready,
        load_error,
        api_key: args.api_key.clone(),
        metrics,
        model_name: name,
        next_id: AtomicU64::new(1),
    });
    let app = axum::Router::new()
        .route("/health", get(routes::health))
        .route("/metrics", get(routes::metrics))
        .route("/v1/models", get(routes::models))
        .route("/v1/chat/completions", post(routes::chat_completions))
        .route("/v1/completions", post(routes::completions))
        .route("/tokenize", post(routes::tokenize))
        .route("/detokenize", post(routes::detokenize))
        .fallback(|| async {
            api::ApiError::new(axum::http::StatusCode::NOT_FOUND, "no such endpoint")
        })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            routes::require_key,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            routes::count_status,
        ))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the HTTP runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
            .await
            .with_context(|| format!("listening on {}:{}", args.host, args.port))?;
        let addr = listener.local_addr()?;
        // the first line on stdout: scripts and tests read the port from it
        println!("listening on http://{addr}");
        use std::io::Write;
        let _ = std::io::stdout().flush();
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
            .context("serving")
    })
}

/// The model, its budget table and what the handlers need.
fn load<B: Backend>(
    args: &ServeArgs,
    device: &B::Device,
) -> Result<(LlamaForCausalLM<B>, Budgets, Ready)> {
    let pretrained = args.model.load::<B>(device)?;
    let tokenizer = pretrained.tokenizer.with_context(|| {
        format!(
            "{}: the server needs the model's tokenizer",
            args.model.dir.display()
        )
    })?;
    let template = match &args.chat_template {
        Some(path) => Some(ChatTemplate::from_file(path)?),
        None => ChatTemplate::from_model_dir(&args.model.dir).ok(),
    };
    let model = pretrained.model;
    let routed = model.routing_config.is_some();
    let budgets = if routed {
        let t = std::time::Instant::now();
        let budgets = Budgets::calibrate_on_builtin(&model, &tokenizer)?;
        // the calibration's activations and caches are gone; the idle server need not hold them
        crate::memory::release_free_heap();
        if let Some((lo, hi)) = budgets.range() {
            eprintln!(
                "skip budgets: {:.0}% to {:.0}% of routed parameters (measured in {:.1} s)",
                100.0 * lo,
                100.0 * hi,
                t.elapsed().as_secs_f64()
            );
        }
        budgets
    } else {
        Budgets::fixed()
    };
    let keeps_kv = model
        .routing_config
        .as_ref()
        .is_some_and(|c| c.kv_policy == KvPolicy::Keep);
    let ready = Ready {
        tokenizer,
        template,
        config: model.config.clone(),
        routed,
        keeps_kv,
    };
    Ok((model, budgets, ready))
}

/// A model's name from its path: the file without `.gguf`, or the directory's name.
fn model_name(path: &Path) -> String {
    let name = path
        .file_name()
        .map_or("model".into(), |n| n.to_string_lossy().into_owned());
    name.strip_suffix(".gguf")
        .map(str::to_string)
        .unwrap_or(name)
}
