//! The stages as a library: a tiny model pretrained, pruned, adapted, calibrated and analysed
//! through `skipgpt_pipeline` alone, each report checked against what it wrote; configs
//! survive a JSON round trip; bad output directories are refused.

use std::path::Path;

use skipgpt_model::{load_pretrained, Routing, SparsityUnit};
use skipgpt_pipeline::evaluate::{eval_ppl, EvalPplConfig, ModelSource};
use skipgpt_pipeline::{
    analyse, calibrate, eval_fidelity, finetune_lora, pretrain, prune_static, self_data,
    tune_routers, AnalyseConfig, CalibrateConfig, CorpusConfig, EvalFidelityConfig,
    FinetuneLoraConfig, PipelineError, PretrainConfig, PromptFormat, PruneStaticConfig,
    SelfDataConfig, TuneRoutersConfig,
};
use skipgpt_train::loss::{Distillation, TokenObjective};
use skipgpt_train::TrainOptions;

type B = burn::backend::Flex;

fn device() -> burn::backend::flex::FlexDevice {
    burn::backend::flex::FlexDevice
}

fn corpus() -> CorpusConfig {
    CorpusConfig::synthetic(120, 3, 32)
}

fn short(defaults: TrainOptions, steps: usize, lr: f64) -> TrainOptions {
    TrainOptions {
        steps,
        batch_size: 8,
        lr,
        warmup_steps: 0,
        log_every: steps,
        checkpoint_every: steps,
        valid_sequences: 0,
        quiet: true,
        ..defaults
    }
}

/// A dense model of two layers, pretrained for 30 steps into `dir`.
fn pretrained(dir: &Path) -> skipgpt_pipeline::PretrainReport {
    let d = PretrainConfig::default();
    pretrain::<B>(
        &PretrainConfig {
            out: dir.to_path_buf(),
            corpus: corpus(),
            vocab_size: 300,
            hidden_size: 32,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            train: short(d.train.clone(), 30, 1e-2),
            ..d
        },
        &[device()],
    )
    .unwrap()
}

#[test]
fn every_stage_runs_from_the_library_and_reports_what_it_wrote() {
    let tmp = tempfile::tempdir().unwrap();
    let dense = tmp.path().join("dense");
    let report = pretrained(&dense);
    let model = load_pretrained::<B>(&dense, &device()).unwrap().model;
    assert_eq!(report.params, model.config.num_params());
    let ppl = report.validation.as_ref().unwrap().perplexity;
    // 300 tokens: a uniform guess has perplexity 300; 30 steps learn the grammar's words
    assert!(ppl.is_finite() && ppl < 150.0, "{ppl}");

    // stage 1
    let routed = tmp.path().join("routed");
    let d = TuneRoutersConfig::default();
    let tuned = tune_routers::<B>(
        &TuneRoutersConfig {
            model: dense.clone(),
            out: routed.clone(),
            corpus: corpus(),
            target_sparsity: 0.3,
            sparsity_unit: SparsityUnit::Modules,
            train: short(d.train.clone(), 20, 2e-2),
            ..d
        },
        &[device()],
    )
    .unwrap();
    assert_eq!(tuned.routers, 4, "two routers per layer");
    let v = tuned.validation.unwrap();
    assert_eq!(v.dense.param_skip, 0.0);
    assert!((v.dense.perplexity - ppl).abs() < 1e-3 * ppl, "base frozen");
    // the evaluation stage scores the same held-out split the same way
    let eval = eval_ppl::<B>(
        &EvalPplConfig {
            model: ModelSource::new(&routed),
            corpus: corpus(),
            quiet: true,
            ..EvalPplConfig::default()
        },
        &device(),
    )
    .unwrap();
    assert_eq!(eval.dense, v.dense);
    assert_eq!(eval.routed.as_ref(), Some(&v.routed));
    let tuned_model = load_pretrained::<B>(&routed, &device()).unwrap().model;
    assert_eq!(tuned_model.router_params(), tuned.router_params);
    assert!(tuned_model.routing_config.is_some());

    // calibration to a rate the routers do not realise on their own
    let target = 0.2;
    let calibrated = tmp.path().join("calibrated");
    let mut passes = 0;
    let c = calibrate::<B>(
        &CalibrateConfig {
            model: routed.clone(),
            out: calibrated.clone(),
            corpus: corpus(),
            target_sparsity: Some(target),
            sparsity_unit: Some(SparsityUnit::Modules),
            quiet: true,
            ..CalibrateConfig::default()
        },
        &device(),
        |_, _, _| passes += 1,
    )
    .unwrap();
    assert_eq!(c.report.passes, passes);
    assert!(
        (c.report.skip_after - target).abs() <= (c.report.skip_before - target).abs(),
        "{:?}",
        c.report
    );
    assert!(
        (c.report.skip_after - target).abs() < 0.05,
        "{:?}",
        c.report
    );
    assert!(calibrated.join("calibration.json").exists());

    // stage 2 on the routed model: the routers stay as they were
    let adapted = tmp.path().join("adapted");
    let d = FinetuneLoraConfig::default();
    let lora = finetune_lora::<B>(
        &FinetuneLoraConfig {
            model: routed.clone(),
            out: adapted.clone(),
            corpus: corpus(),
            train: short(d.train.clone(), 20, 5e-3),
            ..d
        },
        &[device()],
    )
    .unwrap();
    let lv = lora.validation.unwrap();
    assert!(lv.after.perplexity < lv.before.perplexity, "{lv:?}");
    assert_eq!(lv.before.param_skip, v.routed.param_skip, "same routers");
    assert!(lora.lora_params > 0);
    assert!(adapted.join("adapter/adapter_config.json").exists());

    // the static baseline: whole layers, as near the budget as whole layers go
    let pruned = tmp.path().join("pruned");
    let p = prune_static::<B>(
        &PruneStaticConfig {
            model: dense.clone(),
            out: pruned.clone(),
            corpus: corpus(),
            target_sparsity: 0.5,
            ..PruneStaticConfig::default()
        },
        &device(),
    )
    .unwrap();
    assert_eq!(p.removed().len(), 1, "{:?}", p.removed());
    assert!((p.plan.param_skip - 0.5).abs() < 1e-9, "one of two layers");
    let pruned_model = load_pretrained::<B>(&pruned, &device()).unwrap().model;
    assert_eq!(pruned_model.routing, Routing::Deterministic);

    // analysis writes its JSON and pictures and counts the tokens it read
    let pictures = tmp.path().join("pictures");
    let a = analyse::<B>(
        &AnalyseConfig {
            model: routed.clone(),
            corpus: corpus(),
            out: pictures.clone(),
            sequences: 4,
            ..AnalyseConfig::default()
        },
        &device(),
    )
    .unwrap();
    assert_eq!(a.analysis.tokens, 4 * 32);
    assert!(a
        .files
        .iter()
        .all(|f| f.starts_with(&pictures) && f.exists()));
    assert!(a.files.iter().any(|f| f.ends_with("routing.json")));
}

#[test]
fn configs_round_trip_through_json_with_the_methods_defaults() {
    let tune = TuneRoutersConfig::default();
    assert_eq!((tune.alpha, tune.target_sparsity), (8.0, 0.25));
    assert_eq!(tune.train.temperature, (5.0, 1.0));
    let json = serde_json::to_string(&tune).unwrap();
    assert_eq!(
        serde_json::from_str::<TuneRoutersConfig>(&json).unwrap(),
        tune
    );
    // a partial file takes the defaults for what it leaves out
    let partial: FinetuneLoraConfig =
        serde_json::from_str(r#"{"model": "m", "lora": {"rank": 8, "alpha": 16.0, "dropout": 0.0, "targets": ["q_proj"]}}"#)
            .unwrap();
    assert_eq!(partial.lora.rank, 8);
    assert_eq!(partial.train, FinetuneLoraConfig::default().train);
    assert_eq!(partial.routing, Routing::Deterministic);
}

#[test]
fn a_stage_refuses_to_write_into_its_input_or_without_a_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let dense = tmp.path().join("dense");
    pretrained(&dense);
    let into_input = PruneStaticConfig {
        model: dense.clone(),
        out: dense.clone(),
        corpus: corpus(),
        ..PruneStaticConfig::default()
    };
    let err = prune_static::<B>(&into_input, &device()).unwrap_err();
    assert!(matches!(err, PipelineError::Output { .. }), "{err}");
    assert!(err.to_string().contains("input model"), "{err}");

    std::fs::remove_file(dense.join("tokenizer.json")).unwrap();
    let err = prune_static::<B>(
        &PruneStaticConfig {
            out: tmp.path().join("pruned"),
            ..into_input
        },
        &device(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("tokenizer.json"), "{err}");

    let err = tune_routers::<B>(&TuneRoutersConfig::default(), &[]).unwrap_err();
    assert!(err.to_string().contains("devices"), "{err}");
}

#[test]
fn self_data_is_reproducible_and_distilled_stages_move_towards_the_dense_model() {
    let tmp = tempfile::tempdir().unwrap();
    let dense = tmp.path().join("dense");
    pretrained(&dense);
    let prompts = tmp.path().join("prompts.txt");
    std::fs::write(
        &prompts,
        "# a comment\nthe old dog\n\nthe new file counts\nit\n",
    )
    .unwrap();

    // self-data: the same seed writes the same file, another seed another one
    let sample = |seed: u64, out: &str| {
        let out = tmp.path().join(out);
        let report = self_data::<B>(
            &SelfDataConfig {
                model: ModelSource::new(&dense),
                prompts: prompts.clone(),
                out: out.clone(),
                format: PromptFormat::Raw,
                samples_per_prompt: 4,
                max_new_tokens: 40,
                temperature: 1.0,
                top_p: 1.0,
                seed,
                batch_size: 5,
                quiet: true,
            },
            &device(),
        )
        .unwrap();
        assert_eq!(report.records, 12, "3 prompts x 4 samples");
        (report, std::fs::read_to_string(out).unwrap())
    };
    let (report, first) = sample(7, "a.jsonl");
    assert_eq!(sample(7, "b.jsonl").1, first);
    assert_ne!(sample(8, "c.jsonl").1, first);
    assert!(report.tokens > 12 && report.tokens <= 12 * 40, "{report:?}");
    for line in first.lines() {
        let r: serde_json::Value = serde_json::from_str(line).unwrap();
        let (text, prompt) = (r["text"].as_str().unwrap(), r["prompt"].as_str().unwrap());
        assert!(
            text.starts_with(prompt),
            "{text:?} does not start with {prompt:?}"
        );
    }
    let corpus = CorpusConfig {
        data: vec![tmp.path().join("a.jsonl")],
        seq_len: 16,
        valid_fraction: 0.25,
        ..CorpusConfig::default()
    };

    // a KL objective needs a routed or adapted student: the dense model alone is refused
    let kl = Distillation {
        objective: TokenObjective::Kl,
        temperature: 2.0,
    };
    let d = FinetuneLoraConfig::default();
    let err = pretrain::<B>(
        &PretrainConfig {
            out: tmp.path().join("refused"),
            corpus: corpus.clone(),
            vocab_size: 300,
            hidden_size: 32,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            train: TrainOptions {
                distill: kl,
                ..short(d.train.clone(), 2, 1e-2)
            },
            ..PretrainConfig::default()
        },
        &[device()],
    )
    .unwrap_err();
    assert!(err.to_string().contains("objective"), "{err}");

    // stage 1 distilled on the self-data
    let routed = tmp.path().join("routed");
    let t = TuneRoutersConfig::default();
    tune_routers::<B>(
        &TuneRoutersConfig {
            model: dense.clone(),
            out: routed.clone(),
            corpus: corpus.clone(),
            target_sparsity: 0.3,
            sparsity_unit: SparsityUnit::Modules,
            train: TrainOptions {
                distill: kl,
                ..short(t.train.clone(), 20, 2e-2)
            },
            ..t
        },
        &[device()],
    )
    .unwrap();
    let log = std::fs::read_to_string(routed.join("train/metrics.jsonl")).unwrap();
    assert!(log.contains("KL to dense"), "the KL is logged: {log}");

    let fidelity = |model: &Path, adapter: Option<&Path>| {
        eval_fidelity::<B>(
            &EvalFidelityConfig {
                model: ModelSource {
                    adapter: adapter.map(Path::to_path_buf),
                    ..ModelSource::new(model)
                },
                dense: Some(dense.clone()),
                data: corpus.data.clone(),
                seq_len: 16,
                prompts: Some(prompts.clone()),
                format: PromptFormat::Raw,
                max_new_tokens: 12,
                quiet: true,
                ..EvalFidelityConfig::default()
            },
            &device(),
        )
        .unwrap()
    };
    // the dense model against itself: nothing between them
    let same = fidelity(&dense, None);
    let t_same = same.text.unwrap();
    assert!(
        t_same.kl.abs() < 1e-5 && t_same.agreement == 1.0,
        "{t_same:?}"
    );
    assert_eq!(same.generation.unwrap().agreement, 1.0);
    assert_eq!(same.answers.len(), 3);

    let routed_fidelity = fidelity(&routed, None).text.unwrap();
    assert!(
        routed_fidelity.kl > 0.0 && routed_fidelity.param_skip > 0.0,
        "{routed_fidelity:?}"
    );

    // stage 2 distilled, on a model whose skipping cannot move (ShortGPT's constant routers;
    // trained routers would see the adapted residual stream and skip differently): the
    // adapter brings it closer to dense
    let chat =
        r#"{"chat_template": "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"}"#;
    std::fs::write(dense.join("tokenizer_config.json"), chat).unwrap();
    let pruned = tmp.path().join("pruned");
    prune_static::<B>(
        &PruneStaticConfig {
            model: dense.clone(),
            out: pruned.clone(),
            corpus: corpus.clone(),
            target_sparsity: 0.5,
            ..PruneStaticConfig::default()
        },
        &device(),
    )
    .unwrap();
    let before = fidelity(&pruned, None).text.unwrap();
    let adapted = tmp.path().join("adapted");
    finetune_lora::<B>(
        &FinetuneLoraConfig {
            model: pruned.clone(),
            out: adapted.clone(),
            corpus: corpus.clone(),
            train: TrainOptions {
                distill: kl,
                ..short(d.train.clone(), 30, 1e-2)
            },
            ..d
        },
        &[device()],
    )
    .unwrap();
    let after = fidelity(&pruned, Some(&adapted.join("adapter")))
        .text
        .unwrap();
    assert_eq!(
        after.param_skip, before.param_skip,
        "the same layers removed"
    );
    assert!(
        after.kl < 0.9 * before.kl,
        "KL to dense {} after stage 2, {} before",
        after.kl,
        before.kl
    );
}
