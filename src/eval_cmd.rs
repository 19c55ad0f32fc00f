//! `skipgpt eval-mc`: zero-shot multiple-choice accuracy, dense and routed side by side.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use burn::tensor::backend::Backend;
use clap::Args;
use skipgpt_eval::{evaluate_mc, synthetic_mc_tasks, McReport, McTask};
use skipgpt_model::{LlamaForCausalLM, Routing, Tokenizer};

use crate::backend::BackendKind;
use crate::commands::require_tokenizer;
use crate::train_cmd::check_out_dir;
use crate::with_backend;

#[derive(Args, Debug, Clone)]
pub struct EvalMcArgs {
    #[command(flatten)]
    pub model: crate::commands::ModelArgs,
    /// Task files, comma-separated: JSONL, one `{"context", "choices", "gold"}` per line.
    #[arg(
        long,
        value_delimiter = ',',
        required_unless_present = "synthetic_tasks"
    )]
    pub tasks: Vec<PathBuf>,
    /// Use the built-in tasks on the synthetic corpus' grammar, N examples each.
    #[arg(long, conflicts_with = "tasks", value_parser = crate::positive)]
    pub synthetic_tasks: Option<usize>,
    /// Also write the tasks used to this directory (JSONL).
    #[arg(long)]
    pub write_tasks: Option<PathBuf>,
    /// (context, choice) pairs per forward pass.
    #[arg(long, default_value_t = 16, value_parser = crate::positive)]
    pub batch_size: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn eval_mc(backend: BackendKind, args: EvalMcArgs) -> Result<()> {
    with_backend!(backend, |B, device| eval_mc_on::<B>(&args, &device))
}

/// A task's accuracy dense and, for a routed model, routed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct McRow {
    pub dense: McReport,
    pub routed: Option<McReport>,
}

impl McRow {
    /// routed acc / dense acc.
    pub fn retention(&self) -> Option<f64> {
        self.routed
            .as_ref()
            .map(|r| r.acc / self.dense.acc.max(f64::MIN_POSITIVE))
    }
}

/// Scores every task dense and (if the model routes) with its routing.
pub fn score_tasks<B: Backend>(
    model: &LlamaForCausalLM<B>,
    tokenizer: &Tokenizer,
    tasks: &[McTask],
    batch_size: usize,
    quiet: bool,
) -> Result<Vec<McRow>> {
    let show = !quiet;
    let mut rows = Vec::new();
    for task in tasks {
        let run = |routing: Routing, label: &str| {
            let bar = show
                .then(|| crate::progress::counter(&format!("{} ({label})", task.name), "examples"));
            let r = evaluate_mc(
                model,
                tokenizer,
                task,
                routing,
                batch_size,
                |done, total| {
                    if let Some(bar) = &bar {
                        crate::progress::update(bar, done, total);
                    }
                },
            );
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            r
        };
        let dense = run(Routing::Dense, "dense")?;
        let routed = if model.routing_config.is_some() && model.routing != Routing::Dense {
            Some(run(model.routing, "routed")?)
        } else {
            None
        };
        rows.push(McRow { dense, routed });
    }
    Ok(rows)
}

fn eval_mc_on<B: Backend>(args: &EvalMcArgs, device: &B::Device) -> Result<()> {
    let pretrained = args.model.load::<B>(device)?;
    let tokenizer = require_tokenizer(pretrained.tokenizer.as_ref(), &args.model.dir, "eval-mc")?;
    let tasks = match args.synthetic_tasks {
        Some(n) => synthetic_mc_tasks(n, 0),
        None => args
            .tasks
            .iter()
            .map(|p| McTask::read(p))
            .collect::<std::result::Result<Vec<_>, _>>()?,
    };
    if tasks.is_empty() {
        bail!("no tasks: give --tasks FILE.jsonl[,...] or --synthetic-tasks N");
    }
    if let Some(dir) = &args.write_tasks {
        for t in &tasks {
            t.write(dir)?;
        }
    }
    let rows = score_tasks(
        &pretrained.model,
        tokenizer,
        &tasks,
        args.batch_size,
        args.json,
    )?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    print_table(&rows);
    Ok(())
}

/// The paper-style table: per task acc / acc_norm, dense and routed, and the retention.
pub fn print_table(rows: &[McRow]) {
    println!(
        "{:<14} {:>6} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "task", "n", "dense acc", "acc_norm", "routed acc", "acc_norm", "retention"
    );
    let pct = |v: f64| format!("{:.1}%", 100.0 * v);
    for r in rows {
        let (ra, rn, ret) = match &r.routed {
            Some(x) => (
                pct(x.acc),
                pct(x.acc_norm),
                format!("{:.3}", r.retention().unwrap_or(0.0)),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        println!(
            "{:<14} {:>6} {:>10} {:>10} {:>10} {:>10} {:>10}",
            r.dense.task,
            r.dense.examples,
            pct(r.dense.acc),
            pct(r.dense.acc_norm),
            ra,
            rn,
            ret
        );
    }
    let n = rows.len() as f64;
    let mean = |f: &dyn Fn(&McRow) -> f64| rows.iter().map(f).sum::<f64>() / n;
    let dense = mean(&|r| r.dense.acc);
    if rows.iter().all(|r| r.routed.is_some()) {
        let routed = mean(&|r| r.routed.as_ref().map_or(0.0, |x| x.acc));
        println!(
            "{:<14} {:>6} {:>10} {:>10} {:>10} {:>10} {:>10.3}",
            "average",
            "",
            pct(dense),
            "",
            pct(routed),
            "",
            routed / dense.max(f64::MIN_POSITIVE)
        );
    } else {
        println!("{:<14} {:>6} {:>10}", "average", "", pct(dense));
    }
}

#[derive(Args, Debug, Clone)]
pub struct PruneStaticArgs {
    /// The model to prune: a Hugging Face directory with tokenizer.json.
    #[arg(long)]
    pub model: PathBuf,
    /// Output: a SkipGPT directory whose constant routers remove the chosen modules for every
    /// token (so it is evaluated and served like any SkipGPT model).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub corpus: crate::train_cmd::CorpusArgs,
    /// Fraction of the decoder's parameters to remove (rounded to whole modules).
    #[arg(long, default_value_t = 0.25)]
    pub target_sparsity: f64,
    #[arg(long, value_enum, default_value = "block")]
    pub mode: skipgpt_eval::StaticMode,
    /// Calibration sequences (from the training split) for Block Influence.
    #[arg(long, default_value_t = 64)]
    pub calibration_sequences: usize,
    #[arg(long, default_value_t = 8, value_parser = crate::positive)]
    pub batch_size: usize,
}

pub fn prune_static_cmd(backend: BackendKind, args: PruneStaticArgs) -> Result<()> {
    with_backend!(backend, |B, device| prune_static::<B>(&args, &device)
        .map(drop))
}

/// ShortGPT-style static pruning: Block Influence on calibration text, then the least
/// influential layers (or attention modules) removed to the parameter budget.
pub fn prune_static<B: Backend>(
    args: &PruneStaticArgs,
    device: &B::Device,
) -> Result<skipgpt_eval::StaticPlan> {
    use skipgpt_eval::{block_influence, static_plan};
    if !(0.0..1.0).contains(&args.target_sparsity) {
        bail!(
            "--target-sparsity {}: expected a fraction in [0, 1)",
            args.target_sparsity
        );
    }
    check_out_dir(&args.model, &args.out)?;
    let pretrained = skipgpt_model::load_pretrained::<B>(&args.model, device)?;
    let tokenizer = require_tokenizer(pretrained.tokenizer.as_ref(), &args.model, "prune-static")?;
    let model = pretrained.model;
    let (mut calibration, _) = args.corpus.load_split(tokenizer, &model.config)?;
    calibration
        .sequences
        .truncate(args.calibration_sequences.max(1));
    let bi = block_influence(&model, &calibration, args.batch_size)?;
    let mode = args.mode;
    let plan = static_plan(
        &bi,
        mode,
        args.target_sparsity,
        model.config.attention_params(),
        model.config.mlp_params(),
    );
    println!(
        "block influence ({} calibration tokens), layer / attention: {}",
        bi.tokens,
        bi.layer
            .iter()
            .zip(&bi.attention)
            .enumerate()
            .map(|(i, (l, a))| format!("L{i} {l:.3}/{a:.3}"))
            .collect::<Vec<_>>()
            .join("  ")
    );
    let removed: Vec<String> = (0..plan.attn_exec.len())
        .filter_map(|i| match (plan.attn_exec[i], plan.mlp_exec[i]) {
            (false, false) => Some(format!("layer {i}")),
            (false, true) => Some(format!("attention {i}")),
            _ => None,
        })
        .collect();
    println!(
        "removed: {} ({:.1}% of decoder parameters, target {:.0}%)",
        if removed.is_empty() {
            "nothing".to_string()
        } else {
            removed.join(", ")
        },
        100.0 * plan.param_skip,
        100.0 * args.target_sparsity
    );
    let pruned = model.with_static_routes(&plan.attn_exec, &plan.mlp_exec)?;
    crate::train_cmd::write_skipgpt_dir(&args.model, &pruned, &args.out)?;
    println!("prune-static: saved to {}", args.out.display());
    Ok(plan)
}

#[derive(Args, Debug)]
pub struct CalibrateRoutersArgs {
    /// A SkipGPT model directory (after stage 1).
    #[arg(long)]
    pub model: PathBuf,
    /// Output: the same model with every router's SKIP bias shifted by the amount found, and
    /// `calibration.json` (what was measured).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub corpus: crate::train_cmd::CorpusArgs,
    /// The skip rate deterministic routing should realise; default: the model's own target
    /// (`skipgpt.json`).
    #[arg(long)]
    pub target_sparsity: Option<f64>,
    /// What the target counts; default: the model's own unit (`skipgpt.json`).
    #[arg(long, value_enum)]
    pub sparsity_unit: Option<skipgpt_model::SparsityUnit>,
    /// Calibration sequences (from the training split).
    #[arg(long, default_value_t = 64, value_parser = crate::positive)]
    pub sequences: usize,
    #[arg(long, default_value_t = 8, value_parser = crate::positive)]
    pub batch_size: usize,
}

pub fn calibrate_routers_cmd(backend: BackendKind, args: CalibrateRoutersArgs) -> Result<()> {
    with_backend!(backend, |B, device| calibrate_routers::<B>(&args, &device)
        .map(drop))
}

/// Shifts the routers' SKIP biases so that deterministic routing realises the target on
/// calibration text ([`skipgpt_eval::calibrate_routers`]) and writes the model.
pub fn calibrate_routers<B: Backend>(
    args: &CalibrateRoutersArgs,
    device: &B::Device,
) -> Result<skipgpt_eval::CalibrationReport> {
    check_out_dir(&args.model, &args.out)?;
    let pretrained = skipgpt_model::load_pretrained::<B>(&args.model, device)?;
    let tokenizer = require_tokenizer(
        pretrained.tokenizer.as_ref(),
        &args.model,
        "calibrate-routers",
    )?;
    let model = pretrained.model;
    let Some(routing) = model.routing_config.clone() else {
        bail!(
            "{}: not a SkipGPT model (no routers.safetensors): calibration shifts trained routers",
            args.model.display()
        );
    };
    let target = args.target_sparsity.unwrap_or(routing.target_sparsity);
    let unit = args.sparsity_unit.unwrap_or(routing.target_unit);
    let (mut calibration, _) = args.corpus.load_split(tokenizer, &model.config)?;
    calibration.sequences.truncate(args.sequences);
    let unit_name = match unit {
        skipgpt_model::SparsityUnit::Params => "parameters",
        skipgpt_model::SparsityUnit::Modules => "module decisions",
    };
    println!(
        "calibrate-routers: target skip {target} of {unit_name} on {} sequences of {} tokens",
        calibration.len(),
        calibration.seq_len
    );
    let (mut model, report) = skipgpt_eval::calibrate_routers(
        model,
        &calibration,
        target,
        unit,
        args.batch_size,
        |pass, shift, skip| {
            println!(
                "  pass {pass:>2}: shift {shift:+.4} -> skip {:.2}%",
                100.0 * skip
            )
        },
    )?;
    println!(
        "calibrate-routers: skip {:.2}% -> {:.2}% (target {:.2}%) with a SKIP-bias shift of {:+.4}, {} passes",
        100.0 * report.skip_before,
        100.0 * report.skip_after,
        100.0 * target,
        report.shift,
        report.passes
    );
    model.routing_config = Some(routing.with_target_sparsity(target).with_target_unit(unit));
    crate::train_cmd::write_skipgpt_dir(&args.model, &model, &args.out)?;
    let json = serde_json::to_string_pretty(&report).expect("serialises");
    skipgpt_model::atomic::atomic_write(&args.out.join("calibration.json"), json.as_bytes())?;
    println!("calibrate-routers: saved to {}", args.out.display());
    Ok(report)
}

#[derive(Args, Debug, Clone)]
pub struct AnalyzeArgs {
    /// A SkipGPT model directory.
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub corpus: crate::train_cmd::CorpusArgs,
    /// Text whose per-token routing is drawn as a heatmap.
    #[arg(
        long,
        default_value = "the old dog keeps the long road. then it counts 10 11 12 13 14 15. and so on, the end."
    )]
    pub text: String,
    /// Where `routing.json` and the SVG pictures go.
    #[arg(long)]
    pub out: PathBuf,
    /// Sequences of the held-out split to analyse (0: all).
    #[arg(long, default_value_t = 256)]
    pub sequences: usize,
    #[arg(long, default_value_t = 8, value_parser = crate::positive)]
    pub batch_size: usize,
}

pub fn analyze_cmd(backend: BackendKind, args: AnalyzeArgs) -> Result<()> {
    with_backend!(backend, |B, device| analyze::<B>(&args, &device).map(drop))
}

/// Routing analysis of a SkipGPT model on held-out text: JSON and pictures in `args.out`.
pub fn analyze<B: Backend>(
    args: &AnalyzeArgs,
    device: &B::Device,
) -> Result<skipgpt_eval::RoutingAnalysis> {
    let pretrained = skipgpt_model::load_pretrained::<B>(&args.model, device)?;
    let tokenizer = require_tokenizer(pretrained.tokenizer.as_ref(), &args.model, "analyze")?;
    let model = pretrained.model;
    let (train, mut valid) = args.corpus.load_split(tokenizer, &model.config)?;
    if valid.is_empty() {
        valid = train;
    }
    if args.sequences > 0 {
        valid.sequences.truncate(args.sequences);
    }
    analyze_model(
        &model,
        tokenizer,
        &valid,
        &args.text,
        &args.out,
        args.batch_size,
    )
}

/// The routing analysis of a loaded model on `data`, with the heatmap of `text`: printed,
/// and written (JSON and pictures) into `out`.
pub fn analyze_model<B: Backend>(
    model: &LlamaForCausalLM<B>,
    tokenizer: &Tokenizer,
    data: &skipgpt_train::data::PackedDataset,
    text: &str,
    out: &Path,
    batch_size: usize,
) -> Result<skipgpt_eval::RoutingAnalysis> {
    use skipgpt_eval::{analyze_routing, token_map, write_analysis};
    let analysis = analyze_routing(model, data, Some(tokenizer), batch_size)?;
    let map = token_map(model, tokenizer, text)?;
    let files = write_analysis(&analysis, Some(&map), out)?;
    let o = &analysis.observations;
    println!(
        "{} tokens: attention skip {:.1}%, MLP skip {:.1}%",
        analysis.tokens,
        100.0 * analysis.attn_skip,
        100.0 * analysis.mlp_skip
    );
    println!(
        "attention skipped more than MLP: {}",
        if o.attention_skipped_more_than_mlp {
            "yes"
        } else {
            "no"
        }
    );
    println!(
        "later positions (second half vs first): attention executed {:.1}% vs {:.1}% ({}), MLP executed {:.1}% vs {:.1}% ({})",
        100.0 * o.attn_executed_early_late.1,
        100.0 * o.attn_executed_early_late.0,
        if o.later_positions_use_more_attention { "more" } else { "not more" },
        100.0 * o.mlp_executed_early_late.1,
        100.0 * o.mlp_executed_early_late.0,
        if o.later_positions_use_less_mlp { "less" } else { "not less" },
    );
    println!(
        "compute by frequency class (most frequent first): {}",
        analysis
            .by_frequency
            .iter()
            .map(|c| format!("{:.1}%", 100.0 * c.executed))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let show = |v: &[skipgpt_eval::analysis::TokenCompute]| {
        v.iter()
            .take(5)
            .map(|t| format!("{:?} {:.0}%", t.text, 100.0 * t.executed))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("most compute: {}", show(&analysis.most_compute));
    println!("least compute: {}", show(&analysis.least_compute));
    for f in files {
        println!("wrote {}", f.display());
    }
    Ok(analysis)
}
