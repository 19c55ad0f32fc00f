//! Router tuning and pretraining through burn-train's learner, on a tiny model and the
//! synthetic corpus: the sparsity loss pulls the skip rate to the target with the base frozen,
//! pretraining lowers the loss, and a killed run resumes to the same parameters.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use skipgpt_test_support::{assert_mentions, max_abs_diff, router_values};

use burn::backend::ndarray::NdArrayDevice;
use burn::module::Module;
use burn::tensor::backend::Backend;
use skipgpt_model::{
    LlamaConfig, LlamaForCausalLM, LoraConfig, RoutingConfig, StoreDtype, Tokenizer,
};
use skipgpt_train::data::{pack, synthetic_corpus, PackedDataset};
use skipgpt_train::loss::SparsityLossConfig;
use skipgpt_train::progress::read_log;
use skipgpt_train::resume::checkpoint_dir;
use skipgpt_train::tokenizer::{train_bpe, EOS};
use skipgpt_train::{fit, Objective, RunDir, ScheduleKind, TrainOptions};

type Inner = burn::backend::NdArray<f32>;
type B = burn::backend::Autodiff<Inner>;

struct Corpus {
    tokenizer: Tokenizer,
    train: PackedDataset,
    valid: PackedDataset,
}

fn corpus(seq_len: usize) -> Corpus {
    let docs = synthetic_corpus(120, 1);
    let tokenizer = train_bpe(&docs, 320, "tokenizer.json".into()).unwrap();
    let eos = tokenizer.token_to_id(EOS);
    let (train, valid) = pack(&docs, &tokenizer, seq_len, eos)
        .unwrap()
        .split(0.1, 0)
        .unwrap();
    Corpus {
        tokenizer,
        train,
        valid,
    }
}

/// The backend's generator is global and the tests run in parallel: whatever seeds it or
/// draws from it holds this lock, so that a seeded initialisation draws what its seed says.
static GENERATOR: Mutex<()> = Mutex::new(());

fn generator() -> MutexGuard<'static, ()> {
    GENERATOR.lock().unwrap_or_else(|e| e.into_inner())
}

/// A tiny model with every parameter drawn from `seed` (the caller holds [`generator`]).
/// Parameters initialise lazily, so they are drawn here, not at the first forward pass.
fn draw_tiny(vocab: usize, seed: u64) -> LlamaForCausalLM<B> {
    let device = NdArrayDevice::Cpu;
    B::seed(&device, seed);
    let model = LlamaConfig::tiny(vocab).init::<B>(&device);
    let _ = model.export(StoreDtype::F32);
    model
}

fn tiny_model(vocab: usize, seed: u64) -> LlamaForCausalLM<B> {
    let _generator = generator();
    draw_tiny(vocab, seed)
}

/// A tiny model with fresh routers, every parameter drawn now: clones of an uninitialised
/// parameter draw their own values, so runs that must start equal start from clones of this.
fn routed(vocab: usize, seed: u64, router_seed: u64) -> LlamaForCausalLM<B> {
    let _generator = generator();
    let base = draw_tiny(vocab, seed);
    B::seed(&Default::default(), router_seed);
    let model = base.with_new_routers(RoutingConfig::new()).freeze_base();
    let _ = model.export(StoreDtype::F32);
    model
}

const CPU: [NdArrayDevice; 1] = [NdArrayDevice::Cpu];

/// [`fit`] on the corpus' training and validation splits.
fn train_on(
    c: &Corpus,
    model: LlamaForCausalLM<B>,
    objective: Objective,
    opts: &TrainOptions,
    rd: &RunDir,
    devices: &[NdArrayDevice],
) -> skipgpt_train::Result<LlamaForCausalLM<Inner>> {
    fit(
        model,
        objective,
        c.train.clone(),
        c.valid.clone(),
        opts,
        rd,
        devices,
    )
}

fn run(dir: &Path, label: &str, resume: bool) -> RunDir {
    RunDir {
        path: dir.join(label),
        resume,
        label: label.into(),
    }
}

fn quiet(opts: TrainOptions) -> TrainOptions {
    TrainOptions {
        quiet: true,
        ..opts
    }
}

fn rows(dir: &RunDir, split: &str) -> Vec<(usize, HashMap<String, f64>)> {
    read_log(&dir.metrics_log())
        .into_iter()
        .filter(|r| r.split == split)
        .map(|r| (r.step, r.values))
        .collect()
}

#[test]
fn router_tuning_reaches_the_target_and_keeps_the_base() {
    let c = corpus(32);
    let dir = tempfile::tempdir().unwrap();
    let base = tiny_model(c.tokenizer.vocab_size(), 5);
    let before = base.export(StoreDtype::F32);
    let model = base.with_new_routers(RoutingConfig::new()).freeze_base();
    let opts = quiet(TrainOptions {
        steps: 60,
        batch_size: 4,
        // 10x the paper's 2e-3, so that 60 steps suffice
        lr: 2e-2,
        log_every: 10,
        checkpoint_every: 30,
        valid_sequences: 8,
        ..TrainOptions::default()
    });
    let objective = Objective::Sparsity(SparsityLossConfig::new().with_target(0.5));
    let rd = run(dir.path(), "tune", false);
    let tuned = train_on(&c, model, objective, &opts, &rd, &CPU).unwrap();

    // the skip rate of the last logged window, under the Gumbel gates training used
    let (step, row) = rows(&rd, "train").pop().unwrap();
    eprintln!("last window (step {step}): {row:?}");
    assert_eq!(step, 60);
    let skip = row["Skip"];
    assert!((skip - 0.5).abs() < 0.1, "skip rate {skip}");
    assert!((skip - (row["Attention Skip"] + row["MLP Skip"]) / 2.0).abs() < 1e-6);
    // the temperature was annealed towards 1
    assert!(row["Temperature"] < 1.5, "{row:?}");
    // validation ran at each checkpoint, with the deterministic gates
    let valid = rows(&rd, "valid");
    assert_eq!(valid.iter().map(|r| r.0).collect::<Vec<_>>(), vec![30, 60]);
    assert!(valid[1].1["Skip"] > 0.1, "{:?}", valid[1].1);

    assert!(std::fs::read_to_string(rd.curves())
        .unwrap()
        .contains("target 0.5"));

    // the base is bit-identical
    let after = tuned.export(StoreDtype::F32);
    assert_eq!(before.len(), after.len());
    for (name, tensor) in &before {
        assert!(tensor.bytes() == after[name].bytes(), "{name} changed");
    }
}

#[test]
fn pretraining_lowers_the_loss() {
    let c = corpus(32);
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(c.tokenizer.vocab_size(), 3);
    let opts = quiet(TrainOptions {
        steps: 40,
        batch_size: 4,
        lr: 3e-3,
        warmup_steps: 4,
        schedule: ScheduleKind::Cosine,
        log_every: 5,
        checkpoint_every: 40,
        ..TrainOptions::default()
    });
    let rd = run(dir.path(), "pretrain", false);
    train_on(&c, model, Objective::Lm, &opts, &rd, &CPU).unwrap();
    let train = rows(&rd, "train");
    let first = train.first().unwrap().1["LM Loss"];
    let last = train.last().unwrap().1["LM Loss"];
    eprintln!("lm loss {first:.3} -> {last:.3}");
    // from about ln(320) = 5.8 towards the corpus' entropy
    assert!(first > 5.0 && last < first - 1.5, "{first} -> {last}");
    // no skip metrics without routers
    assert!(!train[0].1.contains_key("Skip"));
}

#[test]
fn a_killed_run_resumes_to_the_same_parameters() {
    let c = corpus(16);
    let dir = tempfile::tempdir().unwrap();
    let vocab = c.tokenizer.vocab_size();
    let opts = quiet(TrainOptions {
        steps: 6,
        batch_size: 2,
        grad_accum: 2,
        lr: 1e-2,
        warmup_steps: 2,
        schedule: ScheduleKind::Cosine,
        log_every: 1,
        checkpoint_every: 2,
        valid_sequences: 2,
        ..TrainOptions::default()
    });
    let objective = Objective::Sparsity(SparsityLossConfig::new().with_target(0.4));
    let go = |model, opts: &TrainOptions, rd: &RunDir| {
        train_on(&c, model, objective.clone(), opts, rd, &CPU)
    };

    let start = routed(vocab, 11, 12);
    let whole = run(dir.path(), "whole", false);
    let a = go(start.clone(), &opts, &whole).unwrap();

    // the same run, "killed" while writing the checkpoint of its last epoch: epoch 3's model
    // landed, its optimizer and scheduler states did not
    let killed = run(dir.path(), "killed", false);
    go(start.clone(), &opts, &killed).unwrap();
    let ck = checkpoint_dir(&killed.path);
    std::fs::remove_file(ck.join("optim-3.mpk")).unwrap();
    std::fs::remove_file(ck.join("scheduler-3.mpk")).unwrap();
    std::fs::write(ck.join(".optim-3.mpk.999.tmp"), b"half a file").unwrap();

    // other initial routers: everything must come from the checkpoint of epoch 2
    let resumed = RunDir {
        resume: true,
        ..killed.clone()
    };
    let b = go(routed(vocab, 11, 99), &opts, &resumed).unwrap();
    let (ra, rb) = (a.export_routers(), b.export_routers());
    assert!(!ra.is_empty());
    for (name, t) in &ra {
        assert!(t.bytes() == rb[name].bytes(), "{name} differs after resume");
    }
    // the frozen base came through the resume whole, though no checkpoint holds it
    let (base_a, base_b) = (a.export(StoreDtype::F32), b.export(StoreDtype::F32));
    let base_bytes: usize = base_a.values().map(|t| t.bytes().len()).sum();
    for (name, t) in &base_a {
        assert!(
            t.bytes() == base_b[name].bytes(),
            "{name} differs after resume"
        );
    }
    // a checkpoint holds the routers (and their ids), not the base: far smaller than it
    let router_bytes: usize = ra.values().map(|t| t.bytes().len()).sum();
    let checkpoint = std::fs::metadata(ck.join("model-2.mpk")).unwrap().len() as usize;
    eprintln!("checkpoint {checkpoint} B, routers {router_bytes} B, base {base_bytes} B");
    assert!(
        checkpoint < router_bytes + 16 * 1024 && checkpoint * 5 < base_bytes,
        "model-2.mpk is {checkpoint} bytes for {router_bytes} bytes of routers"
    );
    // the log holds each step once, in order
    let steps: Vec<usize> = rows(&resumed, "train").iter().map(|r| r.0).collect();
    assert_eq!(steps, vec![1, 2, 3, 4, 5, 6]);

    // resuming with other settings is refused, naming the setting
    let other = TrainOptions {
        lr: 2e-2,
        ..opts.clone()
    };
    let err = go(routed(vocab, 11, 12), &other, &resumed)
        .unwrap_err()
        .to_string();
    assert_mentions(&err, &["lr", "0.01", "0.02"]);
    // so is starting over in a directory that holds a run
    let err = go(routed(vocab, 11, 12), &opts, &killed)
        .unwrap_err()
        .to_string();
    assert!(err.contains("--resume"), "{err}");
}

/// burn-train's multi-device strategy with two workers (on the CPU, both are the CPU): every
/// step averages the gradients of one micro-batch per device, which must equal one device
/// accumulating two micro-batches. The loss is scaled by 1/(accumulation × devices): with the
/// sum burn-train makes instead of a mean, the routers would move differently.
#[test]
fn two_devices_train_like_one_device_accumulating_two_micro_batches() {
    let c = corpus(16);
    let dir = tempfile::tempdir().unwrap();
    let vocab = c.tokenizer.vocab_size();
    let device: NdArrayDevice = Default::default();
    let opts = quiet(TrainOptions {
        steps: 4,
        batch_size: 2,
        lr: 1e-2,
        log_every: 1,
        checkpoint_every: 2,
        valid_sequences: 2,
        ..TrainOptions::default()
    });
    let objective = Objective::Sparsity(SparsityLossConfig::new().with_target(0.4));
    let start = routed(vocab, 21, 22);
    let go = |opts: &TrainOptions, label: &str, devices: &[NdArrayDevice]| {
        let rd = run(dir.path(), label, false);
        let model = train_on(&c, start.clone(), objective.clone(), opts, &rd, devices).unwrap();
        (model, rd)
    };
    let (one, one_rd) = go(
        &TrainOptions {
            grad_accum: 2,
            ..opts.clone()
        },
        "one",
        &[device],
    );
    let (two, two_rd) = go(&opts, "two", &[device, device]);
    let (once, _) = go(&opts, "once", &[device]);

    let (r1, r2, r0) = (
        router_values(&one),
        router_values(&two),
        router_values(&once),
    );
    let max_diff = max_abs_diff(&r1, &r2);
    let from_single_batch = max_abs_diff(&r1, &r0);
    eprintln!(
        "two devices vs accumulation: {max_diff:e}; vs half the batch: {from_single_batch:e}"
    );
    assert!(
        max_diff < 1e-6,
        "two devices differ from accumulation by {max_diff}"
    );
    // the comparison has power: half the batch per step ends elsewhere
    assert!(from_single_batch > 1e-3, "{from_single_batch}");
    // the same steps were logged, with the same losses
    let losses = |rd: &RunDir| -> Vec<(usize, f64)> {
        rows(rd, "train")
            .into_iter()
            .map(|(s, v)| (s, v["Loss"]))
            .collect()
    };
    let (l1, l2) = (losses(&one_rd), losses(&two_rd));
    assert_eq!(l1.iter().map(|r| r.0).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    assert_eq!(l2.iter().map(|r| r.0).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    for (a, b) in l1.iter().zip(&l2) {
        assert!((a.1 - b.1).abs() < 1e-5, "{l1:?} vs {l2:?}");
    }
    // a run on two devices resumes only on two
    let err = fit(
        start.clone(),
        objective.clone(),
        c.train.clone(),
        c.valid.clone(),
        &opts,
        &RunDir {
            resume: true,
            ..two_rd.clone()
        },
        &[device],
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("devices"), "{err}");
}

#[test]
fn bad_settings_are_rejected_before_training() {
    let c = corpus(16);
    let dir = tempfile::tempdir().unwrap();
    let vocab = c.tokenizer.vocab_size();
    let cases: Vec<(TrainOptions, Objective, &str)> = vec![
        (
            TrainOptions {
                steps: 0,
                ..TrainOptions::default()
            },
            Objective::Lm,
            "steps",
        ),
        (
            TrainOptions {
                lr: -1.0,
                ..TrainOptions::default()
            },
            Objective::Lm,
            "lr",
        ),
        (
            TrainOptions::default(),
            Objective::Sparsity(SparsityLossConfig::new().with_target(1.0)),
            "target_sparsity",
        ),
        (
            TrainOptions::default(),
            Objective::Sparsity(SparsityLossConfig::new().with_alpha(-2.0)),
            "alpha",
        ),
    ];
    for (i, (opts, objective, key)) in cases.into_iter().enumerate() {
        let rd = run(dir.path(), &format!("bad{i}"), false);
        let model = routed(vocab, 1, 2);
        let err = train_on(&c, model, objective, &opts, &rd, &CPU)
            .unwrap_err()
            .to_string();
        assert!(err.contains(key), "case {i}: {err}");
        // nothing was started
        assert!(!rd.path.join("run.json").exists());
    }
}

/// Every router and base weight, and every adapter, of a model.
fn weights(
    model: &LlamaForCausalLM<B>,
) -> (
    std::collections::BTreeMap<String, Vec<u8>>,
    std::collections::BTreeMap<String, Vec<u8>>,
) {
    let mut frozen: std::collections::BTreeMap<String, Vec<u8>> = model
        .export(StoreDtype::F32)
        .into_iter()
        .map(|(k, v)| (k, v.bytes().to_vec()))
        .collect();
    frozen.extend(
        model
            .export_routers()
            .into_iter()
            .map(|(k, v)| (k, v.bytes().to_vec())),
    );
    let adapters = model
        .export_lora()
        .into_iter()
        .map(|(k, v)| (k, v.bytes().to_vec()))
        .collect();
    (frozen, adapters)
}

fn inner_weights(
    model: &LlamaForCausalLM<Inner>,
) -> (
    std::collections::BTreeMap<String, Vec<u8>>,
    std::collections::BTreeMap<String, Vec<u8>>,
) {
    let bytes =
        |m: std::collections::BTreeMap<String, skipgpt_model::io::safetensors_io::OwnedTensor>| {
            m.into_iter()
                .map(|(k, v)| (k, v.bytes().to_vec()))
                .collect::<std::collections::BTreeMap<_, _>>()
        };
    let mut frozen = bytes(model.export(StoreDtype::F32));
    frozen.extend(bytes(model.export_routers()));
    (frozen, bytes(model.export_lora()))
}

#[test]
fn lora_stage_two_trains_only_the_adapters_and_lowers_validation_loss() {
    let c = corpus(32);
    let dir = tempfile::tempdir().unwrap();
    let vocab = c.tokenizer.vocab_size();
    let model = routed(vocab, 21, 22);
    // the adapters draw from the generator, and training reseeds it for LoRA dropout
    let _generator = generator();
    // stage 2: everything frozen (routers included), then the adapters
    let model = model
        .no_grad()
        .with_lora(LoraConfig {
            targets: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
            ..LoraConfig::default()
        })
        .unwrap();
    let (frozen_before, adapters_before) = weights(&model);
    assert_eq!(
        adapters_before.len(),
        model.config.num_hidden_layers * 3 * 2
    );
    let opts = quiet(TrainOptions {
        steps: 40,
        batch_size: 4,
        lr: 3e-2,
        warmup_steps: 2,
        schedule: ScheduleKind::Cosine,
        log_every: 5,
        checkpoint_every: 5,
        valid_sequences: 8,
        ..TrainOptions::default()
    });
    let rd = run(dir.path(), "lora", false);
    let tuned = train_on(&c, model, Objective::Lm, &opts, &rd, &CPU).unwrap();

    let valid = rows(&rd, "valid");
    let (first, last) = (valid[0].1["LM Loss"], valid.last().unwrap().1["LM Loss"]);
    eprintln!("validation lm loss {first:.3} -> {last:.3}");
    assert!(last < first - 0.1, "{first} -> {last}");
    // the frozen routers were used (and shown) throughout
    assert!(valid[0].1["Skip"] > 0.0 && !valid[0].1.contains_key("Temperature"));

    let (frozen_after, adapters_after) = inner_weights(&tuned);
    assert_eq!(frozen_before, frozen_after, "a frozen weight changed");
    for (name, before) in &adapters_before {
        assert_ne!(before, &adapters_after[name], "{name} did not train");
    }
}

#[test]
fn joint_variant_trains_routers_and_adapters_together() {
    let c = corpus(16);
    let dir = tempfile::tempdir().unwrap();
    let vocab = c.tokenizer.vocab_size();
    let model = routed(vocab, 31, 32);
    // the adapters draw from the generator, and training reseeds it for LoRA dropout
    let _generator = generator();
    let model = model.with_lora(LoraConfig::default()).unwrap();
    let (before, adapters_before) = weights(&model);
    let opts = quiet(TrainOptions {
        steps: 6,
        batch_size: 2,
        lr: 1e-2,
        checkpoint_every: 6,
        valid_sequences: 2,
        ..TrainOptions::default()
    });
    let objective = Objective::Sparsity(SparsityLossConfig::new());
    let rd = run(dir.path(), "joint", false);
    let tuned = train_on(&c, model, objective, &opts, &rd, &CPU).unwrap();
    let (after, adapters_after) = inner_weights(&tuned);
    for (name, b) in &before {
        let changed = b != &after[name];
        assert_eq!(changed, name.contains("router"), "{name}");
    }
    for (name, b) in &adapters_before {
        assert_ne!(b, &adapters_after[name], "{name} did not train");
    }
}
