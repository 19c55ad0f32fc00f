//! Errors of the training crate: each names the file, line, key or value at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Jsonl {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("invalid setting `{name}` = {value}: {expected}")]
    InvalidSetting {
        name: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("not enough data: {0}")]
    NotEnoughData(String),
    #[error(
        "{0} already holds a run: pass --resume to continue it, or choose another output directory"
    )]
    RunExists(PathBuf),
    #[error("--resume: {0} holds no run to resume (no run.json)")]
    NothingToResume(PathBuf),
    #[error("--resume: {path} was started with {key} = {before}, now {key} = {now}; resume with the same settings or start a new run elsewhere")]
    ResumeMismatch {
        path: PathBuf,
        key: String,
        before: String,
        now: String,
    },
    #[error("training failed: {0}")]
    Training(String),
    #[error("tokenizer training: {0}")]
    Tokenizer(String),
    #[error(transparent)]
    Model(#[from] skipgpt_model::ModelError),
    #[error(transparent)]
    Data(#[from] skipgpt_data::DataError),
}

pub type Result<T, E = TrainError> = std::result::Result<T, E>;
