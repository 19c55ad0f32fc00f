//! The stages as a library: a tiny model pretrained, pruned, adapted, calibrated and analysed
//! through `skipgpt_pipeline` alone, each report checked against what it wrote; configs
//! survive a JSON round trip; bad output directories are refused.

use std::path::Path;

use skipgpt_model::{load_pretrained, Routing, SparsityUnit};
use skipgpt_pipeline::evaluate::{eval_ppl, EvalPplConfig, ModelSource};
use skipgpt_pipeline::{
    analyse, calibrate, finetune_lora, pretrain, prune_static, tune_routers, AnalyseConfig,
    CalibrateConfig, CorpusConfig, FinetuneLoraConfig, PipelineError, PretrainConfig,
    PruneStaticConfig, TuneRoutersConfig,
};
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
