//! `eval-fidelity`: how closely a routed (and adapted) model behaves like the dense model on
//! text and prompts nobody trained it on: KL to dense, top-1 agreement, perplexity against
//! dense, and greedy answers compared (agreement, repetition, loops).

use std::path::PathBuf;

use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};
use skipgpt_data::{pack, read_documents};
use skipgpt_eval::{
    compare_generations, compare_on_text, GenerationFidelity, Served, TextFidelity,
};
use skipgpt_model::{LlamaForCausalLM, Routing};

use crate::evaluate::{evenly_spaced, ModelSource};
use crate::output::require_tokenizer;
use crate::progress::{counter, update};
use crate::prompts::{read_prompts, render_prompts, tokenize_prompts, PromptFormat};
use crate::{PipelineError, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EvalFidelityConfig {
    /// The model to judge, routed as it serves (deterministic gates).
    pub model: ModelSource,
    /// The dense reference. `None`: the same directory without the adapter, every module
    /// executing (right unless --model holds merged LoRA weights).
    pub dense: Option<PathBuf>,
    /// Text (.txt paragraphs or JSONL `text`) that no training run used.
    pub data: Vec<PathBuf>,
    pub seq_len: usize,
    /// At most N sequences of the text, evenly spaced over it.
    pub max_sequences: Option<usize>,
    pub batch_size: usize,
    /// Prompts for the generation check (one a line); none: no generation check.
    pub prompts: Option<PathBuf>,
    pub format: PromptFormat,
    pub max_new_tokens: usize,
    pub quiet: bool,
}

impl Default for EvalFidelityConfig {
    fn default() -> Self {
        EvalFidelityConfig {
            model: ModelSource::default(),
            dense: None,
            data: Vec::new(),
            seq_len: 128,
            max_sequences: None,
            batch_size: 8,
            prompts: None,
            format: PromptFormat::Chat,
            max_new_tokens: 96,
            quiet: false,
        }
    }
}

/// What [`eval_fidelity`] measured; the answers' texts come with the generation check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalFidelityReport {
    pub text: Option<TextFidelity>,
    pub generation: Option<GenerationFidelity>,
    /// Per prompt: (prompt, dense answer, routed answer), decoded.
    pub answers: Vec<(String, String, String)>,
}

/// Compares `config.model` with its dense reference as the module documentation says.
pub fn eval_fidelity<B: Backend>(
    config: &EvalFidelityConfig,
    device: &B::Device,
) -> Result<EvalFidelityReport> {
    if config.data.is_empty() && config.prompts.is_none() {
        return Err(PipelineError::InvalidSetting {
            name: "data/prompts",
            value: "none".into(),
            expected: "text to compare on (--data) and/or prompts to answer (--prompts)",
        });
    }
    let pretrained = config.model.load::<B>(device)?;
    let tokenizer = require_tokenizer(pretrained.tokenizer, &config.model.dir, "eval-fidelity")?;
    let model = pretrained.model;
    // the dense reference: --dense, or the same model without routers or adapter
    let reference: LlamaForCausalLM<B> = ModelSource {
        dir: config
            .dense
            .clone()
            .unwrap_or_else(|| config.model.dir.clone()),
        routers: None,
        adapter: None,
        dtype: config.model.dtype,
    }
    .load::<B>(device)?
    .model;
    let routed = Served {
        model: &model,
        routing: if model.routing_config.is_some() {
            Routing::Deterministic
        } else {
            Routing::Dense
        },
    };
    let dense = Served {
        model: &reference,
        routing: Routing::Dense,
    };
    let text = if config.data.is_empty() {
        None
    } else {
        let docs = read_documents(&config.data)?;
        let eos = model.config.eos_token_ids.first().copied();
        let mut data = pack(&docs, &tokenizer, config.seq_len, eos)?;
        if let Some(n) = config.max_sequences {
            data.sequences = evenly_spaced(std::mem::take(&mut data.sequences), n);
        }
        if data.is_empty() {
            return Err(PipelineError::InvalidSetting {
                name: "data",
                value: format!("{:?}", config.data),
                expected: "text of at least one sequence of --seq-len tokens",
            });
        }
        let bar = (!config.quiet).then(|| counter("fidelity on text", "sequences"));
        let report = compare_on_text(routed, dense, &data, config.batch_size, |d, n| {
            if let Some(bar) = &bar {
                update(bar, d, n);
            }
        })?;
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        Some(report)
    };
    let (generation, answers) = match &config.prompts {
        None => (None, Vec::new()),
        Some(path) => {
            let prompts = read_prompts(path)?;
            let rendered = render_prompts(&prompts, &config.format, &config.model.dir)?;
            let ids = tokenize_prompts(&rendered, &config.format, &tokenizer)?;
            let eos = model.config.eos_token_ids.clone();
            let report = compare_generations(
                routed,
                dense,
                &ids,
                config.max_new_tokens,
                &eos,
                config.batch_size,
            )?;
            let answers = prompts
                .into_iter()
                .zip(&report.answers)
                .map(|(p, a)| Ok((p, tokenizer.decode(&a.dense)?, tokenizer.decode(&a.routed)?)))
                .collect::<Result<Vec<_>>>()?;
            (Some(report), answers)
        }
    };
    Ok(EvalFidelityReport {
        text,
        generation,
        answers,
    })
}
