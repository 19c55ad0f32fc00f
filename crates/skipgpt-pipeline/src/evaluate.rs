//! Evaluation: perplexity and multiple-choice accuracy of a loaded model (with progress bars
//! on a terminal), and the two evaluation stages on a model directory, [`eval_ppl`] and
//! [`eval_mc`].

use std::path::PathBuf;

use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};
use skipgpt_data::{pack, PackedDataset};
use skipgpt_eval::{
    evaluate_mc, evaluate_perplexity, synthetic_mc_tasks, McReport, McTask, PerplexityReport,
};
use skipgpt_model::{
    attach_routers, load_peft_adapter, load_pretrained_as, LlamaForCausalLM, Pretrained, Routing,
    StoreDtype, Tokenizer,
};

use crate::corpus::CorpusConfig;
use crate::output::require_tokenizer;
use crate::progress::{counter, update};
use crate::{PipelineError, Result};

/// Perplexity of `data` under `routing`, with a progress bar labelled `label` (`None`: no
/// bar, only the result).
pub fn perplexity<B: Backend>(
    model: &LlamaForCausalLM<B>,
    data: &PackedDataset,
    routing: Routing,
    batch: usize,
    label: Option<&str>,
) -> Result<PerplexityReport> {
    let bar = label.map(|label| counter(label, "sequences"));
    let report = evaluate_perplexity(model, data, routing, batch, |done, total| {
        if let Some(bar) = &bar {
            update(bar, done, total);
        }
    });
    if let Some(bar) = bar {
        bar.finish();
    }
    Ok(report?)
}

/// A task's accuracy dense and, for a routed model, routed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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

    /// The accuracy with the model's own routing (dense for a dense model).
    pub fn served(&self) -> &McReport {
        self.routed.as_ref().unwrap_or(&self.dense)
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
    let mut rows = Vec::new();
    for task in tasks {
        let run = |routing: Routing, label: &str| {
            let bar = (!quiet).then(|| counter(&format!("{} ({label})", task.name), "examples"));
            let r = evaluate_mc(
                model,
                tokenizer,
                task,
                routing,
                batch_size,
                |done, total| {
                    if let Some(bar) = &bar {
                        update(bar, done, total);
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

/// A model to evaluate: a directory, optionally a PEFT adapter merged into its weights, and
/// what its matrices are held in.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelSource {
    /// Model directory (HF layout, optionally with SkipGPT routers), or a GGUF file.
    pub dir: PathBuf,
    /// A routers directory (`skipgpt.json` and `routers.safetensors`) to attach.
    pub routers: Option<PathBuf>,
    pub adapter: Option<PathBuf>,
    /// f16 or bf16 take half the memory; the residual stream, norms, routers, attention and
    /// the cache stay f32.
    pub dtype: StoreDtype,
}

impl ModelSource {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        ModelSource {
            dir: dir.into(),
            ..ModelSource::default()
        }
    }

    /// The model, with the adapter applied when one is given; tensors of the checkpoint the
    /// model does not use are named in a warning on stderr.
    pub fn load<B: Backend>(&self, device: &B::Device) -> Result<Pretrained<B>> {
        let mut pretrained = load_pretrained_as::<B>(&self.dir, device, self.dtype)?;
        warn_unused(&pretrained);
        if let Some(routers) = &self.routers {
            pretrained.model = attach_routers(pretrained.model, routers)?;
        }
        if let Some(adapter) = &self.adapter {
            let adapter = load_peft_adapter(adapter)?;
            // merged: the same function as the unmerged adapter, at the speed of the base (a
            // quantized base keeps it unmerged)
            pretrained.model = pretrained.model.load_lora(&adapter)?.merge_lora();
        }
        Ok(pretrained)
    }
}

/// Warns of tensors in the checkpoint that the model does not use (named, up to ten).
pub fn warn_unused<B: Backend>(pretrained: &Pretrained<B>) {
    let unused = &pretrained.unused_tensors;
    if unused.is_empty() {
        return;
    }
    let shown: Vec<&str> = unused.iter().take(10).map(String::as_str).collect();
    eprintln!(
        "warning: {}: {} tensor(s) the model does not use: {}{}",
        pretrained.dir.display(),
        unused.len(),
        shown.join(", "),
        if unused.len() > shown.len() {
            ", ..."
        } else {
            ""
        }
    );
}

/// Which sequences of a corpus to evaluate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    /// The held-out split.
    #[default]
    Valid,
    Train,
    /// Every sequence, unsplit.
    All,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EvalPplConfig {
    pub model: ModelSource,
    pub corpus: CorpusConfig,
    pub split: Split,
    /// At most N sequences of the split, evenly spaced over it: a fixed slice (the same N
    /// picks the same sequences) for corpora too large to score whole.
    pub max_sequences: Option<usize>,
    pub batch_size: usize,
    /// How a model with routers is scored besides dense: `Deterministic`, `Sample` (seeded by
    /// `routing_seed`) or `Dense` (dense only).
    pub routing: Routing,
    pub routing_seed: u64,
    /// No progress bars.
    pub quiet: bool,
}

impl Default for EvalPplConfig {
    fn default() -> Self {
        EvalPplConfig {
            model: ModelSource::default(),
            corpus: CorpusConfig::default(),
            split: Split::Valid,
            max_sequences: None,
            batch_size: 8,
            routing: Routing::Deterministic,
            routing_seed: 0,
            quiet: false,
        }
    }
}

/// Perplexity dense and, for a model with routers, routed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalPplReport {
    pub dense: PerplexityReport,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub routed: Option<PerplexityReport>,
}

/// Held-out (or training, or all) perplexity of `config.model`, dense and routed.
pub fn eval_ppl<B: Backend>(config: &EvalPplConfig, device: &B::Device) -> Result<EvalPplReport> {
    let pretrained = config.model.load::<B>(device)?;
    let tokenizer =
        require_tokenizer(pretrained.tokenizer.as_ref(), &config.model.dir, "eval-ppl")?;
    let model = pretrained.model;
    let corpus = &config.corpus;
    let docs = corpus.documents()?;
    let eos = model.config.eos_token_ids.first().copied();
    let mut data = match config.split {
        Split::All => pack(&docs, tokenizer, corpus.seq_len, eos)?,
        split => {
            let (train, valid) = corpus.split(&docs, tokenizer, eos)?;
            if split == Split::Valid {
                valid
            } else {
                train
            }
        }
    };
    if let Some(n) = config.max_sequences {
        data.sequences = evenly_spaced(std::mem::take(&mut data.sequences), n);
    }
    if data.is_empty() {
        return Err(PipelineError::InvalidSetting {
            name: "split",
            value: format!("{:?}", config.split),
            expected: "a split with sequences: use more data or a larger --valid-fraction",
        });
    }
    let label = |name| (!config.quiet).then_some(name);
    let dense = perplexity(
        &model,
        &data,
        Routing::Dense,
        config.batch_size,
        label("dense"),
    )?;
    let routing = config.routing;
    if routing == Routing::Sample {
        B::seed(device, config.routing_seed);
    }
    let routed = (model.routing_config.is_some() && routing != Routing::Dense)
        .then(|| perplexity(&model, &data, routing, config.batch_size, label("routed")))
        .transpose()?;
    Ok(EvalPplReport { dense, routed })
}

/// At most `n` of `items`, evenly spaced over them (the first included).
pub(crate) fn evenly_spaced<T>(items: Vec<T>, n: usize) -> Vec<T> {
    let len = items.len();
    if len <= n {
        return items;
    }
    items
        .into_iter()
        .enumerate()
        .filter(|(i, _)| (i * n) % len < n)
        .map(|(_, x)| x)
        .collect()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EvalMcConfig {
    pub model: ModelSource,
    /// Task files: JSONL, one `{"context", "choices", "gold"}` per line.
    pub tasks: Vec<PathBuf>,
    /// Instead of files: the built-in tasks on the synthetic corpus' grammar, N examples each.
    pub synthetic_tasks: Option<usize>,
    /// Also write the tasks used to this directory (JSONL).
    pub write_tasks: Option<PathBuf>,
    /// (context, choice) pairs per forward pass.
    pub batch_size: usize,
    /// No progress bars.
    pub quiet: bool,
}

impl Default for EvalMcConfig {
    fn default() -> Self {
        EvalMcConfig {
            model: ModelSource::default(),
            tasks: Vec::new(),
            synthetic_tasks: None,
            write_tasks: None,
            batch_size: 16,
            quiet: false,
        }
    }
}

/// Zero-shot multiple-choice accuracy of `config.model` on every task, dense and routed.
pub fn eval_mc<B: Backend>(config: &EvalMcConfig, device: &B::Device) -> Result<Vec<McRow>> {
    let pretrained = config.model.load::<B>(device)?;
    let tokenizer = require_tokenizer(pretrained.tokenizer.as_ref(), &config.model.dir, "eval-mc")?;
    let tasks = match config.synthetic_tasks {
        Some(n) => synthetic_mc_tasks(n, 0),
        None => config
            .tasks
            .iter()
            .map(|p| McTask::read(p))
            .collect::<std::result::Result<Vec<_>, _>>()?,
    };
    if tasks.is_empty() {
        return Err(PipelineError::InvalidSetting {
            name: "tasks",
            value: "none".into(),
            expected:
                "task files (--tasks FILE.jsonl[,...]) or built-in tasks (--synthetic-tasks N)",
        });
    }
    if let Some(dir) = &config.write_tasks {
        for t in &tasks {
            t.write(dir)?;
        }
    }
    score_tasks(
        &pretrained.model,
        tokenizer,
        &tasks,
        config.batch_size,
        config.quiet,
    )
}
