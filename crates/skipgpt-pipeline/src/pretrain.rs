//! Pretraining a dense LLaMA from a small config (or a HF `config.json`) on a corpus: the
//! base model of the demo and of experiments without a downloaded checkpoint.

use std::path::{Path, PathBuf};

use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};
use skipgpt_eval::PerplexityReport;
use skipgpt_model::{save_pretrained, LlamaConfig, Routing, StoreDtype, Tokenizer};
use skipgpt_train::fit::run_dir;
use skipgpt_train::resume::RunManifest;
use skipgpt_train::tokenizer::{train_bpe, BOS, EOS};
use skipgpt_train::{fit, Objective, RunDir, ScheduleKind, TrainOptions};

use crate::corpus::{first_sequences, CorpusConfig};
use crate::evaluate::perplexity;
use crate::{describe_run, first_device, PipelineError, Result};

const STAGE: &str = "pretrain";

/// Warmup as a fraction of the steps, when a caller sets the steps but not the warmup.
pub const WARMUP_FRACTION: f64 = 0.05;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PretrainConfig {
    /// Output: a Hugging Face model directory (plus `train/`, the run's state).
    pub out: PathBuf,
    pub corpus: CorpusConfig,
    /// tokenizer.json to use; without it a byte-level BPE is trained on the corpus.
    pub tokenizer: Option<PathBuf>,
    /// Vocabulary size of the BPE trained when no `tokenizer` is given.
    pub vocab_size: usize,
    /// A HF config.json to take the architecture from (vocab_size follows the tokenizer);
    /// without it, the five sizes below.
    pub architecture: Option<PathBuf>,
    pub hidden_size: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    /// Width of the MLP [about 8/3 of `hidden_size`, as LLaMA].
    pub intermediate_size: Option<usize>,
    pub train: TrainOptions,
    /// Continue the run in `out` from its last checkpoint.
    pub resume: bool,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        PretrainConfig {
            out: PathBuf::from("pretrained"),
            corpus: CorpusConfig::default(),
            tokenizer: None,
            vocab_size: 512,
            architecture: None,
            hidden_size: 128,
            layers: 4,
            heads: 4,
            kv_heads: 2,
            intermediate_size: None,
            train: TrainOptions::stage(3e-3, ScheduleKind::Cosine, 300, WARMUP_FRACTION),
            resume: false,
        }
    }
}

/// What a pretraining run produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PretrainReport {
    pub out: PathBuf,
    pub params: usize,
    /// Held-out perplexity of the saved model (none when the held-out split is empty).
    pub validation: Option<PerplexityReport>,
}

/// Pretrains a dense model on `devices` (data-parallel when several; the first holds the
/// model) and saves it in the HF layout in `config.out`.
pub fn pretrain<B: Backend>(
    config: &PretrainConfig,
    devices: &[B::Device],
) -> Result<PretrainReport> {
    let device = first_device::<B>(devices)?;
    let quiet = config.train.quiet;
    let docs = config.corpus.documents()?;
    let run = RunDir {
        path: run_dir(&config.out),
        resume: config.resume,
        label: STAGE.into(),
    };
    RunManifest::check(&run.path, run.resume)?;
    let tokenizer = tokenizer(config, &docs, &run)?;
    let arch = architecture(config, &tokenizer)?;
    let eos = arch.eos_token_ids.first().copied();
    let (train, valid) = config.corpus.split(&docs, &tokenizer, eos)?;
    let valid = first_sequences(valid, config.train.valid_sequences);
    let opts = &config.train;
    if !quiet {
        eprintln!(
            "{STAGE}: {} parameters ({} layers, hidden {}), vocab {}, {}",
            arch.num_params(),
            arch.num_hidden_layers,
            arch.hidden_size,
            arch.vocab_size,
            describe_run(&train, &valid, opts, devices.len())
        );
    }
    Autodiff::<B>::seed(device, opts.seed);
    let model = arch.init::<Autodiff<B>>(device);
    let model = fit(
        model,
        Objective::Lm,
        train,
        valid.clone(),
        opts,
        &run,
        devices,
    )?;
    save_pretrained(&model, Some(&tokenizer), &config.out, StoreDtype::F32)?;
    let validation = (!valid.is_empty())
        .then(|| {
            let label = (!quiet).then_some(STAGE);
            perplexity(&model, &valid, Routing::Dense, opts.batch_size, label)
        })
        .transpose()?;
    Ok(PretrainReport {
        out: config.out.clone(),
        params: arch.num_params(),
        validation,
    })
}

/// The run's tokenizer: the user's, or a BPE trained on the corpus and kept in the run
/// directory so that a resumed run tokenizes exactly as the first did.
fn tokenizer(config: &PretrainConfig, docs: &[String], run: &RunDir) -> Result<Tokenizer> {
    let target = config.out.join("tokenizer.json");
    // read from `path`, saved with the model under `target`
    let relocated = |path: &Path| -> Result<Tokenizer> {
        let tok = Tokenizer::from_file(path)?;
        Ok(Tokenizer::from_inner(tok.inner().clone(), target.clone()))
    };
    if let Some(path) = &config.tokenizer {
        return relocated(path);
    }
    let kept = run.path.join("tokenizer.json");
    if run.resume && kept.exists() {
        return relocated(&kept);
    }
    if !config.train.quiet {
        eprintln!(
            "{STAGE}: training a byte-level BPE tokenizer ({} tokens) on {} documents",
            config.vocab_size,
            docs.len()
        );
    }
    let tok = train_bpe(docs, config.vocab_size, target)?;
    tok.save(&kept)?;
    Ok(tok)
}

/// The architecture: from `config.architecture` or the sizes, with the tokenizer's
/// vocabulary and special tokens.
fn architecture(config: &PretrainConfig, tokenizer: &Tokenizer) -> Result<LlamaConfig> {
    let vocab = tokenizer.vocab_size();
    let mut arch = match &config.architecture {
        Some(path) => LlamaConfig::from_hf_file(path)?,
        None => {
            let (h, heads, kv) = (config.hidden_size, config.heads, config.kv_heads);
            if heads == 0 || kv == 0 || h % heads != 0 || heads % kv != 0 || (h / heads) % 2 != 0 {
                return Err(PipelineError::InvalidSetting {
                    name: "hidden_size/heads/kv_heads",
                    value: format!("--hidden-size {h}, --heads {heads}, --kv-heads {kv}"),
                    expected: "the hidden size must split into heads of even width, and --heads must be a multiple of --kv-heads",
                });
            }
            // LLaMA's 8/3·hidden, rounded up to a multiple of 16
            let inter = config
                .intermediate_size
                .unwrap_or((8 * h / 3).div_ceil(16) * 16);
            LlamaConfig::new(vocab, h, inter, config.layers, heads, kv, h / heads)
        }
    };
    arch.vocab_size = vocab;
    arch.max_position_embeddings = arch.max_position_embeddings.max(config.corpus.seq_len);
    arch.bos_token_id = tokenizer.token_to_id(BOS).or(arch.bos_token_id);
    if let Some(eos) = tokenizer.token_to_id(EOS) {
        arch.eos_token_ids = vec![eos];
    }
    arch.tie_word_embeddings = false;
    Ok(arch)
}
