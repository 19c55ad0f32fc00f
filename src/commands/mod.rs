//! The subcommands, one file each: its arguments, its run (on the backend the command line
//! picked) and its printing. Nothing here parses (clap did) or computes (the crates do); this
//! module holds what the serving commands share: how routing and the engine are chosen, and
//! the engine's `--stats`.

pub mod analyze;
pub mod bench;
pub mod calibrate_routers;
pub mod chat;
pub mod eval_fidelity;
pub mod eval_mc;
pub mod eval_ppl;
pub mod finetune_lora;
pub mod generate;
pub mod import_gguf;
pub mod inspect;
pub mod logits;
pub mod perplexity;
pub mod pretrain;
pub mod prune_static;
pub mod quantize;
pub mod self_data;
pub mod tokenize;
pub mod tune_routers;

use burn::tensor::{backend::Backend, Tensor};
use skipgpt_model::engine::EngineStats;
use skipgpt_model::{LlamaForCausalLM, Routing};

use crate::args::{EngineArg, EngineArgs, RoutingArg, RoutingArgs};

/// A progress bar on stderr, shown when it is a terminal: over bytes for a file conversion
/// ([`Progress::bytes`]), or over a count of items ([`Progress::count`]).
struct Progress(Option<indicatif::ProgressBar>);

impl Progress {
    fn bytes() -> Self {
        Self::with_template("{spinner} [{elapsed_precise}] {bar:40} {bytes}/{total_bytes} {msg}")
    }

    /// Counting `unit` (e.g. "chunks").
    fn count(unit: &str) -> Self {
        Self::with_template(&format!(
            "{{spinner}} [{{elapsed_precise}}] {{bar:40}} {{pos}}/{{len}} {unit} (eta {{eta}})"
        ))
    }

    fn with_template(template: &str) -> Self {
        use std::io::IsTerminal;
        Progress(std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(template).expect("valid template"),
            );
            bar
        }))
    }

    /// `done` of `total`, at `item`.
    fn update(&self, done: u64, total: u64, item: &str) {
        if let Some(bar) = &self.0 {
            bar.set_length(total);
            bar.set_position(done);
            bar.set_message(item.to_string());
        }
    }

    fn finish(self) {
        if let Some(bar) = self.0 {
            bar.finish_and_clear();
        }
    }
}

/// The routing mode the command line asks for.
fn routing_of(args: &RoutingArgs) -> Routing {
    match (args.dense, args.routing) {
        (true, _) => Routing::Dense,
        (false, RoutingArg::Deterministic) => Routing::Deterministic,
        (false, RoutingArg::Sample) => Routing::Sample,
    }
}

/// The routing mode the command line asks for (seeding the backend for `--routing sample`).
fn routing_mode<B: Backend>(args: &RoutingArgs, device: &B::Device) -> Routing {
    let routing = routing_of(args);
    if routing == Routing::Sample {
        B::seed(device, args.routing_seed);
    }
    routing
}

/// Sets how a loaded model routes, per the command line (dense models stay dense).
fn apply_routing<B: Backend>(
    model: &mut skipgpt_model::LlamaForCausalLM<B>,
    args: &RoutingArgs,
    device: &B::Device,
) {
    if model.routing_config.is_some() {
        model.routing = routing_mode::<B>(args, device);
    }
}

/// The engine serves every model, dense ones with every gate open, unless `--engine
/// dense-gated` asks for the reference computation.
fn use_sparse(engine: &EngineArgs) -> bool {
    engine.engine == EngineArg::Sparse
}

/// The model has routers and uses them.
fn routes<B: Backend>(model: &LlamaForCausalLM<B>) -> bool {
    model.routing_config.is_some() && model.routing != Routing::Dense
}

/// `--stats` of the sparse engine; `kv`: (bytes cached, bytes a dense cache would hold).
fn print_stats(s: &EngineStats, kv: Option<(usize, usize)>) {
    eprintln!(
        "engine sparse: {} tokens; skipped attention {:.1}%, mlp {:.1}%; {:.3} GFLOP of {:.3} dense ({:.1}% saved, ideal speedup {:.2}x); weights read {:.1} MB of {:.1} MB",
        s.tokens,
        100.0 * s.attn_skip(),
        100.0 * s.mlp_skip(),
        s.flops / 1e9,
        s.dense_flops / 1e9,
        100.0 * (1.0 - s.flops / s.dense_flops.max(1.0)),
        s.ideal_speedup(),
        s.weight_bytes / 1e6,
        s.dense_weight_bytes / 1e6
    );
    if let Some((bytes, dense)) = kv {
        eprintln!(
            "kv cache: {:.1} KB ({:.1}% of the {:.1} KB a dense cache holds)",
            bytes as f64 / 1e3,
            100.0 * bytes as f64 / dense.max(1) as f64,
            dense as f64 / 1e3
        );
    }
}

/// `--stats` of the dense-gated engine: it computes everything, so only the decisions count.
fn print_gate_rates<B: Backend>(attn: &[Tensor<B, 2>], mlp: &[Tensor<B, 2>]) {
    let rate = |g: &[Tensor<B, 2>]| -> f64 {
        let v: Vec<f32> = g
            .iter()
            .flat_map(|t| {
                t.to_data()
                    .convert::<f32>()
                    .into_vec::<f32>()
                    .unwrap_or_default()
            })
            .collect();
        1.0 - v.iter().map(|&x| x as f64).sum::<f64>() / v.len().max(1) as f64
    };
    eprintln!(
        "engine dense-gated: skipped decisions attention {:.1}%, mlp {:.1}%; every module computed (0% saved)",
        100.0 * rate(attn),
        100.0 * rate(mlp)
    );
}
