//! `skipgpt demo`: the method end to end on the built-in corpus, on a CPU in a few minutes.
//!
//! 1. pretrain a small dense LLaMA (and its BPE tokenizer) on the synthetic corpus;
//! 2. tune SkipGPT routers on the frozen model towards the target skip rate;
//! 3. fine-tune LoRA adapters with the routers frozen (stage 2) and merge them;
//! 4. compare dense, routed and routed + LoRA perplexity on held-out text (measured by the
//!    training commands), show the realised skip rates, reload the merged SkipGPT directory
//!    and let it continue a prompt through the sparse engine.
//!
//! Each stage is the same code as its command (`pretrain`, `tune-routers`, `finetune-lora`);
//! a second demo run in the same directory resumes the finished runs instead of training
//! again.

use std::path::Path;

use anyhow::Result;
use burn::tensor::backend::Backend;
use skipgpt_model::sparse::generate_sparse;
use skipgpt_model::{load_pretrained, GenerateOptions, Sampling};
use skipgpt_train::fit::run_dir;
use skipgpt_train::resume::RunManifest;

use crate::backend::BackendKind;
use crate::lora_cmd::{finetune_lora, FinetuneLoraArgs, LoraArgs};
use crate::train_cmd::{
    pretrain, tune_routers, CorpusArgs, GranularityArg, KvPolicyArg, MlpInputArg, PretrainArgs,
    RouterArg, TrainArgs, TuneRoutersArgs,
};
use crate::{with_backend, DemoArgs, RoutingArg};

pub fn demo(backend: BackendKind, args: DemoArgs) -> Result<()> {
    with_backend!(backend, |B, device| demo_on::<B>(&args, &device))
}

fn train_args(steps: usize, lr: Option<f64>, seed: u64, out: &Path) -> TrainArgs {
    TrainArgs {
        steps: Some(steps),
        batch_size: 16,
        grad_accum: 1,
        lr,
        warmup_steps: None,
        schedule: None,
        weight_decay: 0.01,
        grad_clip: 1.0,
        seed,
        log_every: (steps / 10).max(1),
        checkpoint_every: (steps / 2).max(1),
        valid_sequences: 64,
        // a finished (or killed) earlier demo run is picked up where it stopped
        resume: run_dir(out).join(RunManifest::FILE).exists(),
        quiet: false,
    }
}

/// The stage-2 adapters of the paper: r 16, α 32, dropout 0.1 on q, v and gate.
fn default_lora() -> LoraArgs {
    let d = skipgpt_model::LoraConfig::default();
    LoraArgs {
        rank: d.rank,
        lora_alpha: d.alpha,
        lora_dropout: d.dropout,
        targets: d.targets,
    }
}

fn demo_on<B: Backend>(args: &DemoArgs, device: &B::Device) -> Result<()> {
    let corpus = CorpusArgs {
        data: Vec::new(),
        synthetic: Some(args.docs),
        data_seed: args.seed,
        seq_len: 64,
        valid_fraction: 0.1,
    };
    let dense_dir = args.out.join("dense");
    let routed_dir = args.out.join("skipgpt");
    let lora_dir = args.out.join("skipgpt-lora");

    eprintln!(
        "[1/4] pretraining a small LLaMA on {} synthetic documents -> {}",
        args.docs,
        dense_dir.display()
    );
    pretrain::<B>(
        &PretrainArgs {
            out: dense_dir.clone(),
            corpus: corpus.clone(),
            tokenizer: None,
            vocab_size: 384,
            config: None,
            hidden_size: 128,
            layers: 4,
            heads: 4,
            kv_heads: 2,
            intermediate_size: None,
            train: train_args(args.pretrain_steps, None, args.seed, &dense_dir),
        },
        device,
    )?;

    eprintln!(
        "\n[2/4] tuning SkipGPT routers on the frozen model, target skip {} -> {}",
        args.target_sparsity,
        routed_dir.display()
    );
    let reports = tune_routers::<B>(
        &TuneRoutersArgs {
            model: dense_dir.clone(),
            out: routed_dir.clone(),
            corpus: corpus.clone(),
            target_sparsity: args.target_sparsity,
            alpha: 8.0,
            attn_target: None,
            mlp_target: None,
            router: RouterArg::Linear,
            mlp_router_input: MlpInputArg::PostAttn,
            granularity: GranularityArg::Module,
            kv_policy: KvPolicyArg::Keep,
            temperature_start: 5.0,
            temperature_end: 1.0,
            joint_lora: false,
            lora: default_lora(),
            // The paper's 2e-3 is for 10k steps. In 200 steps it reaches the target under the
            // Gumbel gates, but the routers stay unsure, and the deterministic gates of
            // inference skip far less (measured: 10% for a 25% target); 10x converges.
            train: train_args(args.tune_steps, Some(2e-2), args.seed, &routed_dir),
        },
        device,
    )?;

    // tune-routers has just measured both on the held-out split: report those numbers
    let reports =
        reports.ok_or_else(|| anyhow::anyhow!("the held-out split is empty: raise --docs"))?;

    eprintln!(
        "\n[3/4] LoRA fine-tuning with the routers frozen (stage 2) -> {}",
        lora_dir.display()
    );
    let lora = finetune_lora::<B>(
        &FinetuneLoraArgs {
            model: routed_dir.clone(),
            out: lora_dir.clone(),
            corpus,
            lora: default_lora(),
            routing: RoutingArg::Deterministic,
            merge: false,
            adapter_only: false,
            resume_adapter: None,
            // 10x the paper's 2e-4, for a run of 200 steps rather than thousands
            train: train_args(args.lora_steps, Some(2e-3), args.seed, &lora_dir),
        },
        device,
    )?
    .ok_or_else(|| anyhow::anyhow!("the held-out split is empty: raise --docs"))?;
    let rows = [
        ("dense", reports.dense),
        ("SkipGPT-RT (routed)", reports.routed),
        ("SkipGPT-RT + LoRA", lora),
    ];

    eprintln!(
        "\n[4/4] reloading {} and generating with the sparse engine",
        lora_dir.display()
    );
    let loaded = load_pretrained::<B>(&lora_dir, device)?;
    let tokenizer = loaded
        .tokenizer
        .ok_or_else(|| anyhow::anyhow!("{} has no tokenizer", lora_dir.display()))?;
    let model = loaded.model;
    println!();
    println!(
        "{:<22} {:>10} {:>10} {:>10} {:>11}",
        "model", "perplexity", "attn skip", "mlp skip", "param skip"
    );
    for (name, r) in &rows {
        println!(
            "{name:<22} {:>10.3} {:>9.1}% {:>9.1}% {:>10.1}%",
            r.perplexity,
            100.0 * r.attn_skip,
            100.0 * r.mlp_skip,
            100.0 * r.param_skip
        );
    }
    let (dense, routed, adapted) = (&rows[0].1, &rows[1].1, &rows[2].1);
    println!(
        "\nrouted / dense perplexity: {:.3}, with LoRA {:.3}, at {:.1}% of (token, module) executions skipped (target {:.0}%), {} held-out tokens",
        routed.perplexity / dense.perplexity,
        adapted.perplexity / dense.perplexity,
        50.0 * (routed.attn_skip + routed.mlp_skip),
        100.0 * args.target_sparsity,
        routed.tokens
    );
    println!(
        "per layer (attention / mlp skip): {}",
        routed
            .attn_skip_per_layer
            .iter()
            .zip(&routed.mlp_skip_per_layer)
            .enumerate()
            .map(|(i, (a, m))| format!("L{i} {:.0}%/{:.0}%", 100.0 * a, 100.0 * m))
            .collect::<Vec<_>>()
            .join("  ")
    );

    let prompt = tokenizer.encode(&args.prompt)?;
    let opts = GenerateOptions {
        max_new_tokens: 24,
        sampling: Sampling::Greedy,
        eos_token_ids: model.config.eos_token_ids.clone(),
        ignore_eos: false,
    };
    let (mut tokens, _, _) = generate_sparse(&model, &[prompt], &opts, model.routing)?;
    let tokens = tokens.remove(0);
    println!(
        "\nrouted + LoRA model continues {:?}: {:?}",
        args.prompt,
        tokenizer.decode(&tokens)?
    );
    println!(
        "\nmodels: {} (dense), {} (SkipGPT), {} (SkipGPT + LoRA, merged; adapter in PEFT layout under adapter/); try `skipgpt eval-ppl --model {} --synthetic {} --data-seed {} --seq-len 64`",
        dense_dir.display(),
        routed_dir.display(),
        lora_dir.display(),
        lora_dir.display(),
        args.docs,
        args.seed
    );
    Ok(())
}
