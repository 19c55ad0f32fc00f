//! Errors of the data crate: each names the file, line or setting at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
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
    #[error(transparent)]
    Model(#[from] skipgpt_model::ModelError),
}

pub type Result<T, E = DataError> = std::result::Result<T, E>;
