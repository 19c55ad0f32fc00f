//! Routing analysis: where the routers spend compute (per layer, by position, by token
//! frequency, per token), written as JSON and pictures.

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};
use skipgpt_data::PackedDataset;
use skipgpt_eval::{analyze_routing, token_map, write_analysis, RoutingAnalysis};
use skipgpt_model::{LlamaForCausalLM, Tokenizer};

use crate::corpus::{first_sequences, CorpusConfig};
use crate::evaluate::ModelSource;
use crate::output::require_tokenizer;
use crate::{PipelineError, Result};

/// The heatmap's text when none is given: words, numbers and punctuation of the synthetic
/// grammar.
pub const DEFAULT_TEXT: &str =
    "the old dog keeps the long road. then it counts 10 11 12 13 14 15. and so on, the end.";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AnalyseConfig {
    /// A SkipGPT model directory, or any model (a GGUF too) with `routers`.
    pub model: PathBuf,
    /// A routers directory (`skipgpt.json`, `routers.safetensors`) to attach to `model`.
    pub routers: Option<PathBuf>,
    /// Held-out text (the training split when the held-out one is empty).
    pub corpus: CorpusConfig,
    /// Text whose per-token routing is drawn as a heatmap.
    pub text: String,
    /// Where `routing.json` and the SVG pictures go.
    pub out: PathBuf,
    /// Sequences to analyse (0: all).
    pub sequences: usize,
    pub batch_size: usize,
}

impl Default for AnalyseConfig {
    fn default() -> Self {
        AnalyseConfig {
            model: PathBuf::new(),
            routers: None,
            corpus: CorpusConfig::default(),
            text: DEFAULT_TEXT.to_string(),
            out: PathBuf::from("analysis"),
            sequences: 256,
            batch_size: 8,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnalyseReport {
    pub analysis: RoutingAnalysis,
    /// The files written: `routing.json` and the pictures.
    pub files: Vec<PathBuf>,
}

/// Analyses `config.model` on held-out text.
pub fn analyse<B: Backend>(config: &AnalyseConfig, device: &B::Device) -> Result<AnalyseReport> {
    let source = ModelSource {
        routers: config.routers.clone(),
        ..ModelSource::new(&config.model)
    };
    let pretrained = source.load::<B>(device)?;
    let tokenizer = require_tokenizer(pretrained.tokenizer.as_ref(), &config.model, "analyze")?;
    let model = pretrained.model;
    if model.routing_config.is_none() {
        return Err(PipelineError::NotSkipGpt {
            dir: config.model.clone(),
            stage: "analyze",
        });
    }
    let (train, valid) = config.corpus.load_split(tokenizer, &model.config)?;
    let data = if valid.is_empty() { train } else { valid };
    let data = first_sequences(data, config.sequences);
    analyse_model(
        &model,
        tokenizer,
        &data,
        &config.text,
        &config.out,
        config.batch_size,
    )
}

/// The routing analysis of a loaded model on `data`, with the heatmap of `text`, written
/// (JSON and pictures) into `out`.
pub fn analyse_model<B: Backend>(
    model: &LlamaForCausalLM<B>,
    tokenizer: &Tokenizer,
    data: &PackedDataset,
    text: &str,
    out: &Path,
    batch_size: usize,
) -> Result<AnalyseReport> {
    let analysis = analyze_routing(model, data, Some(tokenizer), batch_size)?;
    let map = token_map(model, tokenizer, text)?;
    let files = write_analysis(&analysis, Some(&map), out)?;
    Ok(AnalyseReport { analysis, files })
}
