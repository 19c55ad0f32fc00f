//! Errors of the evaluation crate; each names the file, line or value at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}, line {line}: {message}")]
    Task {
        path: PathBuf,
        line: usize,
        message: String,
    },

    #[error("{0}")]
    Input(String),

    #[error("cannot draw the chart \"{chart}\": {message}")]
    Plot { chart: String, message: String },

    #[error(transparent)]
    Model(#[from] skipgpt_model::ModelError),
}

pub type Result<T, E = EvalError> = std::result::Result<T, E>;
