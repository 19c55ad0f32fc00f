//! The static baseline (ShortGPT): Block Influence on calibration text, then the least
//! influential layers (or attention modules) removed for every token, to a parameter budget.

use std::path::PathBuf;

use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};
use skipgpt_eval::{block_influence, static_plan, BlockInfluence, StaticMode, StaticPlan};
use skipgpt_model::load_pretrained;

use crate::corpus::CorpusConfig;
use crate::output::{check_out_dir, require_tokenizer, write_skipgpt_dir};
use crate::{PipelineError, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PruneStaticConfig {
    /// The model to prune: a Hugging Face directory with tokenizer.json.
    pub model: PathBuf,
    /// Output: a SkipGPT directory whose constant routers remove the chosen modules for every
    /// token (so it is evaluated and served like any SkipGPT model).
    pub out: PathBuf,
    pub corpus: CorpusConfig,
    /// Fraction of the decoder's parameters to remove (rounded to whole modules).
    pub target_sparsity: f64,
    pub mode: StaticMode,
    /// Calibration sequences (from the training split) for Block Influence.
    pub calibration_sequences: usize,
    pub batch_size: usize,
}

impl Default for PruneStaticConfig {
    fn default() -> Self {
        PruneStaticConfig {
            model: PathBuf::new(),
            out: PathBuf::from("shortgpt"),
            corpus: CorpusConfig::default(),
            target_sparsity: 0.25,
            mode: StaticMode::Block,
            calibration_sequences: 64,
            batch_size: 8,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PruneStaticReport {
    pub out: PathBuf,
    pub influence: BlockInfluence,
    pub plan: StaticPlan,
}

impl PruneStaticReport {
    /// What the plan removes, in words: "layer 3", "attention 5", ...
    pub fn removed(&self) -> Vec<String> {
        let p = &self.plan;
        (0..p.attn_exec.len())
            .filter_map(|i| match (p.attn_exec[i], p.mlp_exec[i]) {
                (false, false) => Some(format!("layer {i}")),
                (false, true) => Some(format!("attention {i}")),
                _ => None,
            })
            .collect()
    }
}

/// Prunes `config.model` statically and writes the result as a SkipGPT directory.
pub fn prune_static<B: Backend>(
    config: &PruneStaticConfig,
    device: &B::Device,
) -> Result<PruneStaticReport> {
    if !(0.0..1.0).contains(&config.target_sparsity) {
        return Err(PipelineError::InvalidSetting {
            name: "target_sparsity",
            value: config.target_sparsity.to_string(),
            expected: "a fraction in [0, 1)",
        });
    }
    check_out_dir(&config.model, &config.out)?;
    let pretrained = load_pretrained::<B>(&config.model, device)?;
    let tokenizer =
        require_tokenizer(pretrained.tokenizer.as_ref(), &config.model, "prune-static")?;
    let model = pretrained.model;
    let (mut calibration, _) = config.corpus.load_split(tokenizer, &model.config)?;
    calibration
        .sequences
        .truncate(config.calibration_sequences.max(1));
    let influence = block_influence(&model, &calibration, config.batch_size)?;
    let plan = static_plan(
        &influence,
        config.mode,
        config.target_sparsity,
        model.config.attention_params(),
        model.config.mlp_params(),
    );
    let pruned = model.with_static_routes(&plan.attn_exec, &plan.mlp_exec)?;
    write_skipgpt_dir(&config.model, &pruned, &config.out)?;
    Ok(PruneStaticReport {
        out: config.out.clone(),
        influence,
        plan,
    })
}
