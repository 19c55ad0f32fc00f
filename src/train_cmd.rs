//! `skipgpt pretrain` and `skipgpt tune-routers`: argument handling, model and data set-up,
//! and writing the result; the training itself is `skipgpt_train::fit` (burn-train).

use std::path::{Path, PathBuf};

use crate::backend::BackendKind;
use crate::commands::{perplexity, require_tokenizer};
use crate::lora_cmd::{write_adapted, LoraArgs, Output};
use crate::with_backend;
use anyhow::{bail, Context, Result};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use clap::{Args, ValueEnum};
use skipgpt_eval::PerplexityReport;
use skipgpt_model::checkpoint::{ROUTERS_FILE, ROUTING_FILE};
use skipgpt_model::{
    load_pretrained, save_pretrained, save_routers, Granularity, KvPolicy, LlamaConfig,
    LlamaForCausalLM, MlpRouterInput, RouterInit, RouterVariant, Routing, RoutingConfig,
    SparsityUnit, StoreDtype, Tokenizer,
};
use skipgpt_train::data::{pack, read_documents, synthetic_corpus, PackedDataset};
use skipgpt_train::fit::run_dir;
use skipgpt_train::loss::SparsityLossConfig;
use skipgpt_train::resume::RunManifest;
use skipgpt_train::tokenizer::{train_bpe, BOS, EOS};
use skipgpt_train::{fit, Objective, RunDir, ScheduleKind, TrainOptions};

/// Where the text comes from and how it is cut into sequences.
#[derive(Args, Debug, Clone)]
pub struct CorpusArgs {
    /// Text (.txt, paragraphs) or JSONL (a `text` field per line) files; repeatable.
    #[arg(long, required_unless_present = "synthetic")]
    pub data: Vec<PathBuf>,
    /// Use N documents of the built-in synthetic corpus instead of files.
    #[arg(long, conflicts_with = "data", value_parser = crate::positive)]
    pub synthetic: Option<usize>,
    /// Seed of the synthetic corpus and of the train/validation split (keep it equal across
    /// pretrain, tune-routers and eval-ppl to evaluate on held-out text).
    #[arg(long, default_value_t = 0)]
    pub data_seed: u64,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 128, value_parser = crate::positive)]
    pub seq_len: usize,
    /// Fraction of sequences held out for validation.
    #[arg(long, default_value_t = 0.1)]
    pub valid_fraction: f64,
    /// Held-out files for validation (repeatable): whole documents the model never trains on.
    /// With them, every --data sequence trains and --valid-fraction is not used.
    #[arg(long, conflicts_with = "synthetic")]
    pub valid_data: Vec<PathBuf>,
}

impl CorpusArgs {
    pub fn documents(&self) -> Result<Vec<String>> {
        Ok(match self.synthetic {
            Some(n) => synthetic_corpus(n, self.data_seed),
            None => read_documents(&self.data)?,
        })
    }

    /// The documents, tokenized, packed (documents joined by the model's EOS) and split into
    /// (train, validation).
    pub fn load_split(
        &self,
        tokenizer: &Tokenizer,
        config: &LlamaConfig,
    ) -> Result<(PackedDataset, PackedDataset)> {
        let docs = self.documents()?;
        self.split(&docs, tokenizer, config.eos_token_ids.first().copied())
    }

    /// Tokenized, packed and split into (train, validation).
    pub fn split(
        &self,
        docs: &[String],
        tokenizer: &Tokenizer,
        eos: Option<u32>,
    ) -> Result<(PackedDataset, PackedDataset)> {
        let packed = pack(docs, tokenizer, self.seq_len, eos)?;
        if !self.valid_data.is_empty() {
            let held_out = read_documents(&self.valid_data)?;
            return Ok((packed, pack(&held_out, tokenizer, self.seq_len, eos)?));
        }
        Ok(packed.split(self.valid_fraction, self.data_seed)?)
    }
}

/// Optimisation settings shared by the training commands.
#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// Optimizer steps [pretrain: 300; tune-routers: 200].
    #[arg(long, value_parser = crate::positive)]
    pub steps: Option<usize>,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 8, value_parser = crate::positive)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step (gradients averaged).
    #[arg(long, default_value_t = 1, value_parser = crate::positive)]
    pub grad_accum: usize,
    /// Peak learning rate, AdamW [pretrain: 3e-3; tune-routers: 2e-3, the paper's].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Linear warmup steps [pretrain: 5% of the steps; tune-routers: 0].
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    /// Learning rate after warmup [pretrain: cosine; tune-routers: constant, the paper's].
    #[arg(long, value_enum)]
    pub schedule: Option<ScheduleKind>,
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    /// Clip each parameter's gradient to this norm (0 turns clipping off).
    #[arg(long, default_value_t = 1.0)]
    pub grad_clip: f64,
    /// Seeds initialisation, data order and Gumbel noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print the metrics every N optimizer steps.
    #[arg(long, default_value_t = 10)]
    pub log_every: usize,
    /// Validate and checkpoint every N optimizer steps.
    #[arg(long, default_value_t = 50)]
    pub checkpoint_every: usize,
    /// Validation sequences per validation pass (0: all).
    #[arg(long, default_value_t = 64)]
    pub valid_sequences: usize,
    /// Continue the run in --out from its last checkpoint (after a crash or a kill).
    #[arg(long)]
    pub resume: bool,
    /// Print only the final summary.
    #[arg(long)]
    pub quiet: bool,
    /// Data-parallel training on these devices, e.g. `0,1,2,3` (burn-train's multi-device
    /// strategy): every device runs --grad-accum micro-batches of --batch-size per step and
    /// the gradients of all are averaged, so a step sees batch × grad-accum × devices
    /// sequences. One device gives what one gives today. Default: the backend's default device.
    #[arg(long, value_delimiter = ',')]
    pub devices: Vec<usize>,
    /// Gradient checkpointing per decoder layer: the backward pass recomputes one layer at a
    /// time from its saved input, so activation memory is one layer's instead of all layers'
    /// (about a third more compute; same gradients). For long sequences and large models.
    #[arg(long)]
    pub checkpoint_layers: bool,
}

/// Per-command defaults for the settings [`TrainArgs`] leaves open.
pub(crate) struct Defaults {
    pub steps: usize,
    pub lr: f64,
    pub warmup_fraction: f64,
    pub schedule: ScheduleKind,
}

impl TrainArgs {
    /// The validation sequences a run uses, during training and in its final report: the
    /// first `--valid-sequences` of the split (0: all of them).
    pub fn validation_slice(&self, mut valid: PackedDataset) -> PackedDataset {
        if self.valid_sequences > 0 {
            valid.sequences.truncate(self.valid_sequences);
        }
        valid
    }

    pub(crate) fn options(&self, d: Defaults) -> TrainOptions {
        let steps = self.steps.unwrap_or(d.steps);
        TrainOptions {
            steps,
            batch_size: self.batch_size,
            grad_accum: self.grad_accum,
            lr: self.lr.unwrap_or(d.lr),
            warmup_steps: self
                .warmup_steps
                .unwrap_or((steps as f64 * d.warmup_fraction) as usize),
            schedule: self.schedule.unwrap_or(d.schedule),
            weight_decay: self.weight_decay,
            grad_clip: (self.grad_clip > 0.0).then_some(self.grad_clip),
            seed: self.seed,
            log_every: self.log_every,
            checkpoint_every: self.checkpoint_every,
            valid_sequences: self.valid_sequences,
            quiet: self.quiet,
            checkpoint_layers: self.checkpoint_layers,
            ..TrainOptions::default()
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct PretrainArgs {
    /// Output directory: a Hugging Face model directory (plus `train/`, the run's state).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub corpus: CorpusArgs,
    /// tokenizer.json to use; without it a byte-level BPE is trained on the corpus.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Vocabulary size of the BPE trained when no --tokenizer is given.
    #[arg(long, default_value_t = 512, value_parser = crate::positive)]
    pub vocab_size: usize,
    /// A HF config.json to take the architecture from (vocab_size follows the tokenizer).
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long, default_value_t = 128, value_parser = crate::positive)]
    pub hidden_size: usize,
    #[arg(long, default_value_t = 4, value_parser = crate::positive)]
    pub layers: usize,
    #[arg(long, default_value_t = 4, value_parser = crate::positive)]
    pub heads: usize,
    #[arg(long, default_value_t = 2, value_parser = crate::positive)]
    pub kv_heads: usize,
    /// Width of the MLP [about 8/3 of --hidden-size, as LLaMA].
    #[arg(long, value_parser = crate::positive)]
    pub intermediate_size: Option<usize>,
    #[command(flatten)]
    pub train: TrainArgs,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouterInitArg {
    /// Kaiming-uniform weights, zero bias (the paper's code): about half the modules skipped
    /// at random at the first step.
    Paper,
    /// Start from the dense model: zero output weights and a bias towards EXECUTE of
    /// --init-margin logits; the sparsity loss raises skipping from there.
    Execute,
}

#[derive(Args, Debug, Clone)]
pub struct TuneRoutersArgs {
    /// The model to prune: a Hugging Face directory with tokenizer.json.
    #[arg(long)]
    pub model: PathBuf,
    /// Output directory: a SkipGPT model directory (the model's files, routers.safetensors,
    /// skipgpt.json) plus `train/`, the run's state.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub corpus: CorpusArgs,
    /// Target fraction T to skip, counted in --sparsity-unit.
    #[arg(long, default_value_t = 0.25)]
    pub target_sparsity: f64,
    /// What the target counts. `params` is the default because it is the number a user budgets
    /// and the paper reports; counting modules equally (the reference code) lands below the
    /// target in parameters, since MLPs are larger and skipped less (SmolLM2-135M at 25%: 21.6%
    /// of parameters).
    #[arg(long, value_enum, default_value = "params")]
    pub sparsity_unit: SparsityUnit,
    /// Weight α of the sparsity term |T - skip_rate| (the paper: 8).
    #[arg(long, default_value_t = 8.0)]
    pub alpha: f64,
    /// Separate attention target (needs --mlp-target).
    #[arg(long, requires = "mlp_target")]
    pub attn_target: Option<f64>,
    /// Separate MLP target (needs --attn-target).
    #[arg(long, requires = "attn_target")]
    pub mlp_target: Option<f64>,
    #[arg(long, value_enum, default_value = "linear")]
    pub router: RouterVariant,
    /// How new routers start. `execute` is the default because on a real model the paper's
    /// random start skips modules at random and perplexity explodes (SmolLM2-135M, 60 steps
    /// at 25%: validation perplexity 3517 from `paper` against 40.2 from `execute`; see
    /// docs/results-smollm2.md).
    #[arg(long, value_enum, default_value = "execute")]
    pub router_init: RouterInitArg,
    /// With `--router-init execute`: logits by which EXECUTE leads at the start (3: every
    /// module runs with probability 0.95).
    #[arg(long, default_value_t = 3.0)]
    pub init_margin: f64,
    #[arg(long, value_enum, default_value = "post-attn")]
    pub mlp_router_input: MlpRouterInput,
    #[arg(long, value_enum, default_value = "module")]
    pub granularity: Granularity,
    #[arg(long, value_enum, default_value = "keep")]
    pub kv_policy: KvPolicy,
    /// Gumbel temperature at the first step (annealed linearly).
    #[arg(long, default_value_t = 5.0)]
    pub temperature_start: f64,
    /// Gumbel temperature at the last step.
    #[arg(long, default_value_t = 1.0)]
    pub temperature_end: f64,
    /// The joint variant (an ablation): train LoRA adapters (shaped by --rank, --lora-alpha,
    /// --lora-dropout, --targets) together with the routers, at --lr. The output holds the
    /// merged model and the adapter under `adapter/`.
    #[arg(long)]
    pub joint_lora: bool,
    #[command(flatten)]
    pub lora: LoraArgs,
    #[command(flatten)]
    pub train: TrainArgs,
}

impl TuneRoutersArgs {
    pub fn router_init(&self) -> Result<RouterInit> {
        Ok(match self.router_init {
            RouterInitArg::Paper => RouterInit::Paper,
            RouterInitArg::Execute => {
                let margin = self.init_margin;
                if !(margin.is_finite() && margin >= 0.0) {
                    bail!("--init-margin must be a finite number >= 0, got {margin}");
                }
                RouterInit::Execute { margin }
            }
        })
    }

    fn routing_config(&self) -> RoutingConfig {
        RoutingConfig::new()
            .with_target_unit(self.sparsity_unit)
            .with_router(self.router)
            .with_mlp_router_input(self.mlp_router_input)
            .with_granularity(self.granularity)
            .with_kv_policy(self.kv_policy)
            .with_target_sparsity(self.target_sparsity)
    }
}

pub fn pretrain_cmd(backend: BackendKind, args: PretrainArgs) -> Result<()> {
    with_backend!(backend, |B, device| pretrain::<B>(&args, &device))
}

pub fn tune_routers_cmd(backend: BackendKind, args: TuneRoutersArgs) -> Result<()> {
    with_backend!(backend, |B, device| tune_routers::<B>(&args, &device)
        .map(drop))
}

/// Pretrains a dense model and saves it in the HF layout (`args.out`).
pub fn pretrain<B: Backend>(args: &PretrainArgs, device: &B::Device) -> Result<()> {
    let label = "pretrain";
    let devices = crate::backend::training_devices::<Autodiff<B>>(&args.train.devices, device)?;
    let docs = args.corpus.documents()?;
    let run = RunDir {
        path: run_dir(&args.out),
        resume: args.train.resume,
        label: label.into(),
    };
    RunManifest::check(&run.path, run.resume)?;
    let tokenizer = pretrain_tokenizer(args, &docs, &run)?;
    let config = pretrain_config(args, &tokenizer)?;
    let eos = config.eos_token_ids.first().copied();
    let (train, valid) = args.corpus.split(&docs, &tokenizer, eos)?;
    let valid = args.train.validation_slice(valid);
    let opts = args.train.options(Defaults {
        steps: 300,
        lr: 3e-3,
        warmup_fraction: 0.05,
        schedule: ScheduleKind::Cosine,
    });
    if !args.train.quiet {
        eprintln!(
            "{label}: {} parameters ({} layers, hidden {}), vocab {}, {} train / {} valid sequences of {} tokens, {} steps of {} sequences",
            config.num_params(),
            config.num_hidden_layers,
            config.hidden_size,
            config.vocab_size,
            train.len(),
            valid.len(),
            train.seq_len,
            opts.steps,
            opts.batch_size * opts.grad_accum * devices.len()
        );
    }
    Autodiff::<B>::seed(device, args.train.seed);
    let model = config.init::<Autodiff<B>>(device);
    let model = fit(
        model,
        Objective::Lm,
        train,
        valid.clone(),
        &opts,
        &run,
        &devices,
    )?;
    save_pretrained(&model, Some(&tokenizer), &args.out, StoreDtype::F32)?;
    println!("{label}: saved to {}", args.out.display());
    if !valid.is_empty() {
        let r = perplexity(
            &model,
            &valid,
            Routing::Dense,
            args.train.batch_size,
            Some(label),
        )?;
        println!(
            "  validation perplexity {:.3} ({} tokens)",
            r.perplexity, r.tokens
        );
    }
    Ok(())
}

/// The tokenizer of a pretraining run: the user's, or a BPE trained on the corpus and kept in
/// the run directory so that a resumed run tokenizes exactly as the first did.
fn pretrain_tokenizer(args: &PretrainArgs, docs: &[String], run: &RunDir) -> Result<Tokenizer> {
    let target = args.out.join("tokenizer.json");
    // read from `path`, saved with the model under `target`
    let relocated = |path: &Path| -> Result<Tokenizer> {
        let tok = Tokenizer::from_file(path)?;
        Ok(Tokenizer::from_inner(tok.inner().clone(), target.clone()))
    };
    if let Some(path) = &args.tokenizer {
        return relocated(path);
    }
    let kept = run.path.join("tokenizer.json");
    if run.resume && kept.exists() {
        return relocated(&kept);
    }
    if !args.train.quiet {
        eprintln!(
            "pretrain: training a byte-level BPE tokenizer ({} tokens) on {} documents",
            args.vocab_size,
            docs.len()
        );
    }
    let tok = train_bpe(docs, args.vocab_size, target)?;
    tok.save(&kept)?;
    Ok(tok)
}

fn pretrain_config(args: &PretrainArgs, tokenizer: &Tokenizer) -> Result<LlamaConfig> {
    let vocab = tokenizer.vocab_size();
    let mut config = match &args.config {
        Some(path) => LlamaConfig::from_hf_file(path)?,
        None => {
            let (h, heads, kv) = (args.hidden_size, args.heads, args.kv_heads);
            if heads == 0 || kv == 0 || h % heads != 0 || heads % kv != 0 || (h / heads) % 2 != 0 {
                bail!(
                    "--hidden-size {h}, --heads {heads}, --kv-heads {kv}: the hidden size must split into heads of even width, and --heads must be a multiple of --kv-heads"
                );
            }
            // LLaMA's 8/3·hidden, rounded up to a multiple of 16
            let inter = args
                .intermediate_size
                .unwrap_or((8 * h / 3).div_ceil(16) * 16);
            LlamaConfig::new(vocab, h, inter, args.layers, heads, kv, h / heads)
        }
    };
    config.vocab_size = vocab;
    config.max_position_embeddings = config.max_position_embeddings.max(args.corpus.seq_len);
    config.bos_token_id = tokenizer.token_to_id(BOS).or(config.bos_token_id);
    if let Some(eos) = tokenizer.token_to_id(EOS) {
        config.eos_token_ids = vec![eos];
    }
    config.tie_word_embeddings = false;
    Ok(config)
}

/// Validation perplexity of a tuned model: dense and with its deterministic routing.
pub struct TunedReports {
    pub dense: PerplexityReport,
    pub routed: PerplexityReport,
}

/// Tunes routers on a frozen model (stage 1) and writes a SkipGPT directory. Returns the
/// validation reports (none when the validation split is empty).
pub fn tune_routers<B: Backend>(
    args: &TuneRoutersArgs,
    device: &B::Device,
) -> Result<Option<TunedReports>> {
    let label = "tune-routers";
    let devices = crate::backend::training_devices::<Autodiff<B>>(&args.train.devices, device)?;
    let (run, mut model, tokenizer) =
        start_training_from::<B>(&args.model, &args.out, &args.train, label, device)?;
    if model.routing_config.is_some() && !args.train.quiet {
        eprintln!(
            "{label}: {} has routers; training new ones",
            args.model.display()
        );
    }
    let routing = args.routing_config();
    let loss = SparsityLossConfig::new()
        .with_alpha(args.alpha)
        .with_target(args.target_sparsity)
        .with_attn_target(args.attn_target)
        .with_mlp_target(args.mlp_target)
        .with_attn_share(args.sparsity_unit.attn_share(&model.config));
    loss.validate()?;
    let mut opts = args.train.options(Defaults {
        steps: 200,
        lr: 2e-3,
        warmup_fraction: 0.0,
        schedule: ScheduleKind::Constant,
    });
    opts.temperature = (args.temperature_start, args.temperature_end);

    let lora = args.joint_lora.then(|| args.lora.config()).transpose()?;

    let (train, valid) = args.corpus.load_split(&tokenizer, &model.config)?;
    let valid = args.train.validation_slice(valid);
    Autodiff::<B>::seed(device, args.train.seed);
    model = model
        .with_new_routers_from(routing.clone(), args.router_init()?)
        .freeze_base();
    if let Some(lora) = lora {
        model = model.with_lora(lora)?;
    }
    if !args.train.quiet && model.lora_config.is_some() {
        eprintln!(
            "{label}: joint variant: {} LoRA parameters train with the routers",
            model.lora_params()
        );
    }
    if !args.train.quiet {
        let base = model.config.num_params();
        eprintln!(
            "{label}: {} routers ({} parameters, {:.4}% of {}), target skip {} of {}, {} train / {} valid sequences of {} tokens, {} steps of {} sequences",
            model
                .model
                .layers
                .iter()
                .flat_map(|l| [&l.attn_router, &l.mlp_router])
                .flatten()
                .count(),
            model.router_params(),
            100.0 * model.router_params() as f64 / base as f64,
            base,
            args.target_sparsity,
            match args.sparsity_unit {
                SparsityUnit::Params => "parameters",
                SparsityUnit::Modules => "module decisions",
            },
            train.len(),
            valid.len(),
            train.seq_len,
            opts.steps,
            opts.batch_size * opts.grad_accum * devices.len()
        );
    }
    let tuned = fit(
        model,
        Objective::Sparsity(loss),
        train,
        valid.clone(),
        &opts,
        &run,
        &devices,
    )?;
    if tuned.lora_config.is_some() {
        // the joint variant changed the base's function: write it merged
        write_adapted(&tuned, &tokenizer, &args.model, &args.out, Output::Both)?;
    } else {
        write_skipgpt_dir(&args.model, &tuned, &args.out)?;
    }

    println!("{label}: saved to {}", args.out.display());
    if valid.is_empty() {
        return Ok(None);
    }
    let batch = args.train.batch_size;
    let reports = TunedReports {
        dense: perplexity(&tuned, &valid, Routing::Dense, batch, Some("dense"))?,
        routed: perplexity(
            &tuned,
            &valid,
            Routing::Deterministic,
            batch,
            Some("routed"),
        )?,
    };
    print_validation("dense", &reports.dense);
    print_validation("routed", &reports.routed);
    Ok(Some(reports))
}

/// The input model's files (hard-linked where possible: they are never written in place)
/// plus the routers and `skipgpt.json`; `config.json` last, so a directory with a config is
/// complete.
pub(crate) fn write_skipgpt_dir<B: Backend>(
    src: &Path,
    model: &LlamaForCausalLM<B>,
    out: &Path,
) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| out.display().to_string())?;
    let files: Vec<PathBuf> = std::fs::read_dir(src)
        .with_context(|| src.display().to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name != ROUTERS_FILE && name != ROUTING_FILE && !name.starts_with('.')
        })
        .collect();
    let (config, weights): (Vec<_>, Vec<_>) = files
        .into_iter()
        .partition(|p| p.file_name() == Some("config.json".as_ref()));
    for file in &weights {
        place_copy(file, &out.join(file.file_name().expect("a file")))?;
    }
    save_routers(model, out)?;
    for file in &config {
        place_copy(file, &out.join("config.json"))?;
    }
    Ok(())
}

/// Puts a copy of `src` at `dst` atomically: a hard link, or a copy, to a temporary name,
/// then a rename.
fn place_copy(src: &Path, dst: &Path) -> Result<()> {
    let name = dst.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dst.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    if std::fs::hard_link(src, &tmp).is_err() {
        std::fs::copy(src, &tmp)
            .with_context(|| format!("copying {} to {}", src.display(), tmp.display()))?;
    }
    std::fs::rename(&tmp, dst).with_context(|| format!("writing {}", dst.display()))?;
    Ok(())
}

/// Refuses an output directory that is the input model's: a command never writes into the
/// model it reads.
pub(crate) fn check_out_dir(model: &Path, out: &Path) -> Result<()> {
    if same_dir(model, out) {
        bail!(
            "--out {} is the input model's directory: choose another, the input is left untouched",
            out.display()
        );
    }
    Ok(())
}

/// The start of a command that trains on top of `model` into `out`: the output is not the
/// input, the run directory may be (re)started, and the model (with autodiff) and its
/// tokenizer are loaded.
pub(crate) fn start_training_from<B: Backend>(
    model: &Path,
    out: &Path,
    train: &TrainArgs,
    label: &str,
    device: &B::Device,
) -> Result<(RunDir, LlamaForCausalLM<Autodiff<B>>, Tokenizer)> {
    check_out_dir(model, out)?;
    // a model directory that no run of this program wrote (no `train/run.json`): writing the
    // output there would replace someone's model.safetensors, config.json and tokenizer.json
    let holds_model = [
        "config.json",
        "model.safetensors",
        "model.safetensors.index.json",
    ]
    .iter()
    .any(|f| out.join(f).exists());
    if holds_model && !run_dir(out).join(RunManifest::FILE).exists() {
        bail!(
            "--out {} already holds a model that this command did not write: choose a new or empty directory, it is left untouched",
            out.display()
        );
    }
    let run = RunDir {
        path: run_dir(out),
        resume: train.resume,
        label: label.into(),
    };
    RunManifest::check(&run.path, run.resume)?;
    let pretrained = load_pretrained::<Autodiff<B>>(model, device)?;
    let tokenizer = require_tokenizer(pretrained.tokenizer, model, label)?;
    Ok((run, pretrained.model, tokenizer))
}

/// `  {name} validation perplexity ...  skip: ...` after a training command.
pub(crate) fn print_validation(name: &str, r: &PerplexityReport) {
    println!(
        "  {name:<7} validation perplexity {:>8.3}  skip: attention {:>5.1}%  mlp {:>5.1}%  params {:>5.1}%",
        r.perplexity,
        100.0 * r.attn_skip,
        100.0 * r.mlp_skip,
        100.0 * r.param_skip
    );
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}
