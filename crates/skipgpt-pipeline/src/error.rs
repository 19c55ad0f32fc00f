//! Errors of the stages: each names the setting, file or directory at fault; the crates'
//! own errors pass through unchanged.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not the JSON expected: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("invalid setting `{name}` = {value}: {expected}")]
    InvalidSetting {
        name: &'static str,
        value: String,
        expected: &'static str,
    },
    /// The output directory would overwrite something the user did not ask to replace.
    #[error("--out {out} {why}")]
    Output { out: PathBuf, why: &'static str },
    #[error("{stage} needs {path} to turn text into tokens")]
    NoTokenizer { stage: &'static str, path: PathBuf },
    #[error(
        "{dir}: not a SkipGPT model (no routers.safetensors; --routers DIR attaches published ones): {stage} works on trained routers"
    )]
    NotSkipGpt { dir: PathBuf, stage: &'static str },
    #[error(transparent)]
    Model(#[from] skipgpt_model::ModelError),
    #[error(transparent)]
    Data(#[from] skipgpt_data::DataError),
    #[error(transparent)]
    Train(#[from] skipgpt_train::TrainError),
    #[error(transparent)]
    Eval(#[from] skipgpt_eval::EvalError),
}

pub type Result<T, E = PipelineError> = std::result::Result<T, E>;

pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> PipelineError + '_ {
    move |source| PipelineError::Io {
        path: path.to_path_buf(),
        source,
    }
}
