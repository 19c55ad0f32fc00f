//! Router calibration: one shift of every router's SKIP bias so that deterministic routing
//! realises the skip target on calibration text (stage 1 trains with noisy gates, which skip
//! a little more than the deterministic ones that serve).
//!
//! A model directory with its own routers is written whole (its files linked, the shifted
//! routers beside them); routers given apart (`routers`, on a directory or a GGUF) are
//! written alone, as a routers directory that `--routers` attaches again.

use std::path::PathBuf;

use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};
use skipgpt_eval::CalibrationReport;
use skipgpt_model::io::atomic_write::atomic_write;
use skipgpt_model::{save_routers, SparsityUnit};

use crate::corpus::CorpusConfig;
use crate::evaluate::ModelSource;
use crate::output::{check_out_dir, require_tokenizer, write_skipgpt_dir};
use crate::{PipelineError, Result};

const STAGE: &str = "calibrate-routers";

/// What `calibration.json` is called in the output directory.
pub const CALIBRATION_FILE: &str = "calibration.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CalibrateConfig {
    /// A SkipGPT model directory (after stage 1), or any model (a GGUF too) with `routers`.
    pub model: PathBuf,
    /// A routers directory (`skipgpt.json`, `routers.safetensors`) to calibrate on `model`.
    pub routers: Option<PathBuf>,
    /// Output: the same model with every router's SKIP bias shifted (the routers alone when
    /// they were given apart, or the model is a file), and `calibration.json`.
    pub out: PathBuf,
    pub corpus: CorpusConfig,
    /// The skip rate deterministic routing should realise; default: the model's own target.
    pub target_sparsity: Option<f64>,
    /// What the target counts; default: the model's own unit.
    pub sparsity_unit: Option<SparsityUnit>,
    /// Calibration sequences (from the training split).
    pub sequences: usize,
    pub batch_size: usize,
    /// No start line on stderr.
    pub quiet: bool,
}

impl Default for CalibrateConfig {
    fn default() -> Self {
        CalibrateConfig {
            model: PathBuf::new(),
            routers: None,
            out: PathBuf::from("skipgpt-calibrated"),
            corpus: CorpusConfig::default(),
            target_sparsity: None,
            sparsity_unit: None,
            sequences: 64,
            batch_size: 8,
            quiet: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrateOutcome {
    pub out: PathBuf,
    /// What was measured; its target and unit are the config's, or the model's own.
    pub report: CalibrationReport,
}

/// Calibrates `config.model`'s routers and writes the shifted model and `calibration.json`.
/// `on_pass(pass, shift, skip)` sees every bisection pass.
pub fn calibrate<B: Backend>(
    config: &CalibrateConfig,
    device: &B::Device,
    on_pass: impl FnMut(usize, f64, f64),
) -> Result<CalibrateOutcome> {
    check_out_dir(&config.model, &config.out)?;
    if let Some(routers) = &config.routers {
        check_out_dir(routers, &config.out)?;
    }
    let source = ModelSource {
        routers: config.routers.clone(),
        ..ModelSource::new(&config.model)
    };
    let pretrained = source.load::<B>(device)?;
    let tokenizer = require_tokenizer(pretrained.tokenizer.as_ref(), &config.model, STAGE)?;
    let model = pretrained.model;
    let Some(routing) = model.routing_config.clone() else {
        return Err(PipelineError::NotSkipGpt {
            dir: config.model.clone(),
            stage: STAGE,
        });
    };
    let target = config.target_sparsity.unwrap_or(routing.target_sparsity);
    let unit = config.sparsity_unit.unwrap_or(routing.target_unit);
    let (mut calibration, _) = config.corpus.load_split(tokenizer, &model.config)?;
    calibration.sequences.truncate(config.sequences);
    if !config.quiet {
        eprintln!(
            "{STAGE}: target skip {target} of {} on {} sequences of {} tokens",
            match unit {
                SparsityUnit::Params => "parameters",
                SparsityUnit::Modules => "module decisions",
            },
            calibration.len(),
            calibration.seq_len
        );
    }
    let (mut model, report) = skipgpt_eval::calibrate_routers(
        model,
        &calibration,
        target,
        unit,
        config.batch_size,
        on_pass,
    )?;
    model.routing_config = Some(routing.with_target_sparsity(target).with_target_unit(unit));
    if config.routers.is_some() || !config.model.is_dir() {
        std::fs::create_dir_all(&config.out).map_err(crate::error::io(&config.out))?;
        save_routers(&model, &config.out)?;
    } else {
        write_skipgpt_dir(&config.model, &model, &config.out)?;
    }
    let json = serde_json::to_string_pretty(&report).expect("the report serialises");
    atomic_write(&config.out.join(CALIBRATION_FILE), json.as_bytes())?;
    Ok(CalibrateOutcome {
        out: config.out.clone(),
        report,
    })
}
