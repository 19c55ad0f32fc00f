//! Errors of the training crate: each names the file, line, key or value at fault. A file,
//! line or setting at fault is a [`skipgpt_data::DataError`] (the same messages), carried as
//! [`TrainError::Data`].

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(
        "{0} already holds a run: pass --resume to continue it, or choose another output directory"
    )]
    RunExists(PathBuf),
    #[error("--resume: {0} holds no run to resume (no run.json)")]
    NothingToResume(PathBuf),
    #[error("--resume: {path} was started with other settings: {}; resume with the same settings or start a new run elsewhere", differences.iter().map(|(key, before, now)| format!("{key} = {before}, now {now}")).collect::<Vec<_>>().join("; "))]
    ResumeMismatch {
        path: PathBuf,
        /// Every key that differs: (key, the run's value, this command's value).
        differences: Vec<(String, String, String)>,
    },
    #[error("{dir} is in use by another run (process {pid}, lock file {lock}); wait for it to end, or write to another directory")]
    RunLocked {
        dir: PathBuf,
        lock: PathBuf,
        pid: u32,
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
