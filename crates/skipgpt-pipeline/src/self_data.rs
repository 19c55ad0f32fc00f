//! Self-data: the dense model's own answers to prompts, in its own chat format, as a training
//! corpus. Routers and adapters trained on it learn to reproduce the model's behaviour rather
//! than to imitate some other text (which a LoRA adapter readily does, at the cost of the
//! model's own behaviour elsewhere).

use std::path::PathBuf;

use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};
use skipgpt_data::mix;
use skipgpt_model::engine::generate_sparse;
use skipgpt_model::io::atomic_write::atomic_write;
use skipgpt_model::{GenerateOptions, Routing, Sampling};

use crate::evaluate::ModelSource;
use crate::output::require_tokenizer;
use crate::progress::{counter, update};
use crate::prompts::{read_prompts, render_prompts, tokenize_prompts, PromptFormat};
use crate::{PipelineError, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SelfDataConfig {
    /// The model whose answers are collected; it runs dense (every module executes).
    pub model: ModelSource,
    /// One prompt a line.
    pub prompts: PathBuf,
    /// A JSONL file: `text` (the prompt in its format followed by the answer, what training
    /// reads), `prompt`, `answer`, `finished` (the answer ended with the model's EOS).
    pub out: PathBuf,
    pub format: PromptFormat,
    /// Answers per prompt, each drawn with its own seed.
    pub samples_per_prompt: usize,
    pub max_new_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    /// With the batch size, fixes every draw: the same seed gives the same file.
    pub seed: u64,
    pub batch_size: usize,
    pub quiet: bool,
}

impl Default for SelfDataConfig {
    fn default() -> Self {
        SelfDataConfig {
            model: ModelSource::default(),
            prompts: PathBuf::new(),
            out: PathBuf::from("self-data.jsonl"),
            format: PromptFormat::Chat,
            samples_per_prompt: 1,
            max_new_tokens: 256,
            temperature: 0.7,
            top_p: 0.9,
            seed: 0,
            batch_size: 8,
            quiet: false,
        }
    }
}

/// One line of the output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SelfDataRecord {
    pub text: String,
    pub prompt: String,
    pub answer: String,
    pub finished: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SelfDataReport {
    pub out: PathBuf,
    pub records: usize,
    /// Answer tokens generated.
    pub tokens: usize,
    /// Answers that ended with EOS before `max_new_tokens`.
    pub finished: usize,
}

/// Samples the dense model's answers to every prompt, batch by batch through the sparse
/// engine, and writes them as a JSONL corpus (atomically, when all are done).
pub fn self_data<B: Backend>(
    config: &SelfDataConfig,
    device: &B::Device,
) -> Result<SelfDataReport> {
    if !(config.temperature > 0.0 && config.temperature.is_finite()) {
        return Err(PipelineError::InvalidSetting {
            name: "temperature",
            value: config.temperature.to_string(),
            expected: "a sampling temperature > 0",
        });
    }
    let pretrained = config.model.load::<B>(device)?;
    let tokenizer = require_tokenizer(
        pretrained.tokenizer.as_ref(),
        &config.model.dir,
        "self-data",
    )?;
    let model = pretrained.model;
    let prompts = read_prompts(&config.prompts)?;
    let rendered = render_prompts(&prompts, &config.format, &config.model.dir)?;
    let ids = tokenize_prompts(&rendered, &config.format, tokenizer)?;
    // every (prompt, sample) pair, sample-major so that a batch mixes prompts
    let jobs: Vec<usize> = (0..config.samples_per_prompt.max(1))
        .flat_map(|_| 0..prompts.len())
        .collect();
    let bar = (!config.quiet).then(|| counter("self-data", "answers"));
    let eos = model.config.eos_token_ids.clone();
    let (mut lines, mut tokens, mut finished) = (Vec::new(), 0, 0);
    for (b, batch) in jobs.chunks(config.batch_size.max(1)).enumerate() {
        let opts = GenerateOptions {
            max_new_tokens: config.max_new_tokens,
            sampling: Sampling::Sample {
                temperature: config.temperature,
                top_p: config.top_p,
                seed: mix(config.seed, b as u64),
            },
            eos_token_ids: eos.clone(),
            ignore_eos: false,
        };
        let batch_ids: Vec<Vec<u32>> = batch.iter().map(|&p| ids[p].clone()).collect();
        let (answers, _, _) = generate_sparse(&model, &batch_ids, &opts, Routing::Dense)?;
        for (&p, answer) in batch.iter().zip(answers) {
            let ended = answer.last().is_some_and(|t| eos.contains(t));
            let body = &answer[..answer.len() - usize::from(ended)];
            let mut text = tokenizer.decode(body)?;
            tokens += answer.len();
            finished += usize::from(ended);
            let answer_text = text.clone();
            if ended {
                // the end-of-turn token, so that training sees the answer close as it does
                let eos_text = tokenizer.inner().id_to_token(answer[body.len()]);
                text.push_str(&eos_text.unwrap_or_default());
            }
            let record = SelfDataRecord {
                text: format!("{}{text}", rendered[p]),
                prompt: prompts[p].clone(),
                answer: answer_text,
                finished: ended,
            };
            lines.push(serde_json::to_string(&record).expect("a record serialises"));
        }
        if let Some(bar) = &bar {
            update(
                bar,
                (b * config.batch_size + batch.len()).min(jobs.len()),
                jobs.len(),
            );
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let mut body = lines.join("\n");
    body.push('\n');
    atomic_write(&config.out, body.as_bytes())?;
    Ok(SelfDataReport {
        out: config.out.clone(),
        records: lines.len(),
        tokens,
        finished,
    })
}
