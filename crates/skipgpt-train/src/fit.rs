//! One training run through burn-train's `SupervisedTraining`: the optimizer, schedule,
//! metrics, renderer, checkpointing and resume, shared by pretraining and router tuning.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::optim::grad_clipping::GradientClippingConfig;
use burn::optim::AdamWConfig;
use burn::tensor::backend::AutodiffBackend;
use burn::train::checkpoint::KeepLastNCheckpoints;
use burn::train::metric::LearningRateMetric;
use burn::train::{ExecutionStrategy, Learner, MultiDeviceOptim, SupervisedTraining};
use serde::{Deserialize, Serialize};
use skipgpt_data::DataError;
use skipgpt_model::{LlamaForCausalLM, Routing};

use crate::curves::write_curves;
use crate::data::{mix, PackedDataset};
use crate::error::{Result, TrainError};
use crate::loader::{StepPlan, TrainLoader, ValidLoader};
use crate::loss::Distillation;
use crate::metrics::{stats_for, StatMetric};
use crate::progress::{read_log, truncate_log, ProgressLayout, ProgressPrinter};
use crate::resume::{store_only_trainable, AtomicRecorder, RunManifest, ARCHITECTURE_KEYS};
use crate::schedule::{ScheduleKind, WarmupSchedule};
use crate::step::{LmTrainer, Objective};

/// How a run optimises: everything but the model, the data and the objective.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainOptions {
    /// Optimizer steps.
    pub steps: usize,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches whose gradients are averaged into one optimizer step.
    pub grad_accum: usize,
    /// Peak learning rate (AdamW).
    pub lr: f64,
    pub warmup_steps: usize,
    pub schedule: ScheduleKind,
    pub weight_decay: f64,
    /// Gradient-norm clipping; burn clips each parameter tensor's norm on its own.
    pub grad_clip: Option<f64>,
    /// Seeds the data order and the Gumbel noise.
    pub seed: u64,
    /// Gumbel temperature at the first and the last step (stage 1).
    pub temperature: (f64, f64),
    /// Print the metrics every this many optimizer steps.
    pub log_every: usize,
    /// Checkpoint (and validate) every this many optimizer steps.
    pub checkpoint_every: usize,
    /// Validation sequences per pass (0: the whole validation split).
    pub valid_sequences: usize,
    /// What the model matches token by token: the corpus (the paper's LM loss), the dense
    /// model with routing off (KL distillation), or both.
    #[serde(default)]
    pub distill: Distillation,
    /// Print nothing while training.
    #[serde(skip)]
    pub quiet: bool,
    /// Gradient checkpointing per decoder layer: keep each layer's input instead of its whole
    /// graph and recompute one layer at a time in the backward pass (a second forward pass for
    /// the memory of one layer's activations). The gradients are the same.
    #[serde(skip)]
    pub checkpoint_layers: bool,
}

impl Default for TrainOptions {
    /// The paper's stage-1 settings, scaled to a short run.
    fn default() -> Self {
        TrainOptions {
            steps: 100,
            batch_size: 8,
            grad_accum: 1,
            lr: 2e-3,
            warmup_steps: 0,
            schedule: ScheduleKind::Constant,
            weight_decay: 0.01,
            grad_clip: Some(1.0),
            seed: 0,
            temperature: (5.0, 1.0),
            log_every: 10,
            checkpoint_every: 50,
            valid_sequences: 64,
            distill: Distillation::default(),
            quiet: false,
            checkpoint_layers: false,
        }
    }
}

impl TrainOptions {
    /// A stage's defaults: `steps` steps at learning rate `lr` on `schedule`, the first
    /// `warmup_fraction` of them warming up; everything else as [`TrainOptions::default`].
    pub fn stage(lr: f64, schedule: ScheduleKind, steps: usize, warmup_fraction: f64) -> Self {
        TrainOptions {
            lr,
            schedule,
            ..TrainOptions::default()
        }
        .with_steps(steps, warmup_fraction)
    }

    /// `steps` optimizer steps, the first `warmup_fraction` of them warming up (a stage's
    /// warmup follows its length unless set on its own).
    pub fn with_steps(self, steps: usize, warmup_fraction: f64) -> Self {
        TrainOptions {
            steps,
            warmup_steps: (steps as f64 * warmup_fraction) as usize,
            ..self
        }
    }

    pub fn validate(&self) -> Result<()> {
        let positive = |name: &'static str, v: usize| -> Result<()> {
            if v == 0 {
                Err(DataError::InvalidSetting {
                    name,
                    value: "0".into(),
                    expected: "at least 1",
                }
                .into())
            } else {
                Ok(())
            }
        };
        positive("steps", self.steps)?;
        positive("batch_size", self.batch_size)?;
        positive("grad_accum", self.grad_accum)?;
        positive("log_every", self.log_every)?;
        positive("checkpoint_every", self.checkpoint_every)?;
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(DataError::InvalidSetting {
                name: "lr",
                value: self.lr.to_string(),
                expected: "a positive learning rate",
            }
            .into());
        }
        if self.weight_decay.is_nan() || self.weight_decay < 0.0 {
            return Err(DataError::InvalidSetting {
                name: "weight_decay",
                value: self.weight_decay.to_string(),
                expected: ">= 0",
            }
            .into());
        }
        if let Some(c) = self.grad_clip {
            if c.is_nan() || c <= 0.0 {
                return Err(DataError::InvalidSetting {
                    name: "grad_clip",
                    value: c.to_string(),
                    expected: "a positive norm",
                }
                .into());
            }
        }
        self.distill.validate()?;
        let (t0, t1) = self.temperature;
        if !(t0 > 0.0 && t1 > 0.0) {
            return Err(DataError::InvalidSetting {
                name: "temperature",
                value: format!("{t0} -> {t1}"),
                expected: "positive temperatures",
            }
            .into());
        }
        if self.warmup_steps > self.steps {
            return Err(DataError::InvalidSetting {
                name: "warmup_steps",
                value: self.warmup_steps.to_string(),
                expected: "no more than --steps",
            }
            .into());
        }
        Ok(())
    }
}

/// Where a run keeps its state, and whether it continues an earlier one.
#[derive(Debug, Clone)]
pub struct RunDir {
    /// burn-train's directory: `run.json`, `checkpoint/`, `metrics.jsonl`, per-epoch logs.
    pub path: PathBuf,
    /// Continue the run in `path` from its last complete checkpoint.
    pub resume: bool,
    /// Prefix of the progress lines.
    pub label: String,
}

impl RunDir {
    /// The metrics rows, one JSON object per line.
    pub fn metrics_log(&self) -> PathBuf {
        self.path.join("metrics.jsonl")
    }

    /// The loss and skip-rate curves, drawn at the end of the run.
    pub fn curves(&self) -> PathBuf {
        self.path.join("curves.svg")
    }
}

/// Trains `model` on `train` (validating on `valid`) and returns it without autodiff.
///
/// A run is cut into burn-train epochs of `checkpoint_every` steps; each ends with a
/// validation pass and an atomic checkpoint. With `run.resume`, training continues after the
/// last complete checkpoint and ends with the same parameters as an uninterrupted run.
///
/// # Data parallelism
/// With several `devices`, burn-train's multi-device strategy keeps a copy of the model on
/// each; every optimizer step gives each device `grad_accum` micro-batches of `batch_size`
/// and averages all their gradients on the first device, which runs the optimizer. An
/// optimizer step therefore sees `batch_size × grad_accum × devices` sequences, and micro-batch
/// `k` of a step goes to device `k mod devices`: N devices compute exactly what one device
/// computes with `grad_accum × N` (up to the order of floating-point sums).
pub fn fit<B: AutodiffBackend>(
    model: LlamaForCausalLM<B>,
    objective: Objective,
    train: PackedDataset,
    valid: PackedDataset,
    opts: &TrainOptions,
    run: &RunDir,
    devices: &[B::Device],
) -> Result<LlamaForCausalLM<B::InnerBackend>> {
    let device = check_inputs(&model, &objective, &train, opts, devices)?;
    let replicas = devices.len();
    let valid = validation_set(valid, &train, opts);

    let manifest = manifest(&objective, &model, &train, &valid, opts, replicas);
    // held until training returns: a second run on the same directory is refused, not
    // interleaved with this one
    let _lock = crate::resume::RunLock::acquire(&run.path)?;
    let done_epochs = manifest.begin(&run.path, run.resume)?;
    let plan = StepPlan {
        total_steps: opts.steps,
        batch_size: opts.batch_size,
        // micro-batches per optimizer step, over all devices
        accumulation: opts.grad_accum * replicas,
        steps_per_epoch: opts.checkpoint_every,
        seed: opts.seed,
        temperature: opts.temperature,
    };
    let num_epochs = plan.num_epochs();
    let done_steps = (done_epochs * opts.checkpoint_every).min(opts.steps);
    truncate_log(&run.metrics_log(), done_steps).map_err(|e| DataError::Io {
        path: run.metrics_log(),
        source: e,
    })?;
    if run.resume && !opts.quiet {
        eprintln!(
            "{}: resuming {} after step {done_steps} of {}",
            run.label,
            run.path.display(),
            opts.steps
        );
    }

    let sparsity = matches!(objective, Objective::Sparsity(_));
    // stage 2 trains through the frozen routers: show what they skip
    let routed = sparsity || (model.routing_config.is_some() && model.routing != Routing::Dense);
    let target = match &objective {
        Objective::Sparsity(cfg) if cfg.attn_target.is_none() => Some(cfg.target),
        _ => None,
    };
    let layout = progress_layout(opts, replicas, train.seq_len, &run.label);
    let train_loader = TrainLoader::<B>::new(Arc::new(train), plan, done_epochs + 1, device);
    let valid_loader =
        ValidLoader::<B::InnerBackend>::new(Arc::new(valid), opts.batch_size, device);

    let optimizer = AdamWConfig::new()
        .with_weight_decay(opts.weight_decay as f32)
        .with_grad_clipping(
            opts.grad_clip
                .map(|c| GradientClippingConfig::Norm(c as f32)),
        )
        .init();
    // burn-train steps the schedule once per micro-batch on one device, and once per round of
    // one micro-batch on every device with several: `grad_accum` calls per optimizer step
    let schedule = WarmupSchedule::new(
        opts.lr,
        opts.warmup_steps,
        opts.steps,
        opts.schedule,
        opts.grad_accum,
    );
    // checkpoints hold what training changes, not the frozen base
    let (model, _frozen) = store_only_trainable(model);
    let trainer = LmTrainer::new(model, objective)
        .with_checkpoint_layers(opts.checkpoint_layers)
        .with_distillation(opts.distill);
    let learner = Learner::new(trainer, optimizer, schedule);

    let training =
        SupervisedTraining::new(&run.path, Arc::new(train_loader), Arc::new(valid_loader));
    // the printer sees every loss first: a non-finite one stops the run through this
    let interrupter = training.interrupter();
    let printer =
        ProgressPrinter::new(layout, Some(run.metrics_log())).with_interrupter(interrupter.clone());
    let mut training = training
        .num_epochs(num_epochs)
        .with_file_checkpointer(AtomicRecorder)
        .with_checkpointing_strategy(KeepLastNCheckpoints::new(2))
        .with_application_logger(None)
        .renderer(printer)
        .metric_train_numeric(LearningRateMetric::new());
    for stat in stats_for(routed, sparsity, opts.distill.needs_teacher()) {
        training = training
            .metric_train_numeric(StatMetric::new(stat))
            .metric_valid_numeric(StatMetric::new(stat));
    }
    if opts.grad_accum > 1 {
        training = training.grads_accumulation(opts.grad_accum);
    }
    if replicas > 1 {
        if !opts.quiet {
            eprintln!(
                "{}: data-parallel on {replicas} devices {devices:?}",
                run.label
            );
        }
        training = training.with_training_strategy(
            ExecutionStrategy::multi(devices.to_vec(), MultiDeviceOptim::OptimMainDevice).into(),
        );
    }
    if done_epochs > 0 {
        training = training.checkpoint(done_epochs);
    }
    let result = training.launch(learner);
    if let Some(reason) = interrupter.get_message() {
        return Err(TrainError::Training(reason));
    }
    let curves = run.curves();
    if let Err(e) = write_curves(&read_log(&run.metrics_log()), target, &curves) {
        eprintln!("warning: cannot write {}: {e}", curves.display());
    }
    Ok(result.model.model)
}

/// Refuses what cannot train: bad options, no device, a KL objective with no teacher, no data.
/// Returns the first device (the one that holds the model and runs the optimizer).
fn check_inputs<'d, B: AutodiffBackend>(
    model: &LlamaForCausalLM<B>,
    objective: &Objective,
    train: &PackedDataset,
    opts: &TrainOptions,
    devices: &'d [B::Device],
) -> Result<&'d B::Device> {
    opts.validate()?;
    let Some(device) = devices.first() else {
        return Err(DataError::InvalidSetting {
            name: "devices",
            value: "none".into(),
            expected: "at least one device",
        }
        .into());
    };
    if let Objective::Sparsity(cfg) = objective {
        cfg.validate()?;
    }
    if opts.distill.needs_teacher() && model.routing_config.is_none() && model.lora_config.is_none()
    {
        // the teacher is this model with routing and adapters off: here, the model itself
        return Err(DataError::InvalidSetting {
            name: "objective",
            value: format!("{:?}", opts.distill.objective),
            expected: "lm for a model with neither routers nor adapters (KL distils the dense model into a routed or adapted one)",
        }.into());
    }
    if train.is_empty() {
        return Err(DataError::NotEnoughData("the training split is empty".into()).into());
    }
    Ok(device)
}

/// The held-out sequences each epoch validates on: at most `valid_sequences`, and a few
/// training sequences when nothing is held out (burn-train validates every epoch; better on
/// training text than not at all).
fn validation_set(
    mut valid: PackedDataset,
    train: &PackedDataset,
    opts: &TrainOptions,
) -> PackedDataset {
    if opts.valid_sequences > 0 {
        valid.sequences.truncate(opts.valid_sequences);
    }
    if valid.is_empty() {
        valid.sequences = train
            .sequences
            .iter()
            .take(opts.batch_size)
            .cloned()
            .collect();
    }
    valid
}

/// What the progress lines count: burn-train reports every micro-batch of every device as an
/// iteration.
fn progress_layout(
    opts: &TrainOptions,
    replicas: usize,
    seq_len: usize,
    label: &str,
) -> ProgressLayout {
    ProgressLayout {
        total_steps: opts.steps,
        steps_per_epoch: opts.checkpoint_every,
        accumulation: opts.grad_accum * replicas,
        log_every: opts.log_every,
        tokens_per_step: opts.batch_size * opts.grad_accum * replicas * seq_len,
        label: label.to_string(),
        quiet: opts.quiet,
    }
}

/// The settings a resumed run must share with the run it continues.
fn manifest<B: AutodiffBackend>(
    objective: &Objective,
    model: &LlamaForCausalLM<B>,
    train: &PackedDataset,
    valid: &PackedDataset,
    opts: &TrainOptions,
    devices: usize,
) -> RunManifest {
    let mut map = match serde_json::to_value(opts).expect("options serialise") {
        serde_json::Value::Object(m) => m,
        _ => unreachable!("a struct serialises to an object"),
    };
    let objective = match objective {
        Objective::Lm => serde_json::json!("lm"),
        Objective::Sparsity(cfg) => serde_json::json!({
            "alpha": cfg.alpha,
            "target": cfg.target,
            "attn_target": cfg.attn_target,
            "mlp_target": cfg.mlp_target,
        }),
    };
    map.insert("objective".into(), objective);
    // what is trained and through which routers
    map.insert(
        "lora".into(),
        serde_json::to_value(&model.lora_config).expect("LoRA settings serialise"),
    );
    map.insert(
        "routing".into(),
        serde_json::json!(model.routing_config.as_ref().map(|r| r.to_json())),
    );
    map.insert("routing_mode".into(), format!("{:?}", model.routing).into());
    // the devices set the batch of a step: a resume must use as many
    map.insert("devices".into(), devices.into());
    // the architecture, under its config.json names
    let config = model.config.to_hf_json();
    for key in ARCHITECTURE_KEYS {
        map.insert(key.into(), config[key].clone());
    }
    map.insert("seq_len".into(), train.seq_len.into());
    map.insert("train_sequences".into(), train.len().into());
    map.insert(
        "train_data_hash".into(),
        format!("{:016x}", data_hash(train)).into(),
    );
    map.insert(
        "valid_data_hash".into(),
        format!("{:016x}", data_hash(valid)).into(),
    );
    RunManifest(map)
}

/// A fingerprint of the token ids, so that a resumed run notices other data.
fn data_hash(data: &PackedDataset) -> u64 {
    data.sequences
        .iter()
        .flatten()
        .fold(data.len() as u64, |h, &t| mix(h, t as u64))
}

/// The directory inside an output directory where the run keeps its state.
pub fn run_dir(out: &Path) -> PathBuf {
    out.join("train")
}
