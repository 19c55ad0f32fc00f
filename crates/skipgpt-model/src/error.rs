//! Errors the model crate reports. Every variant names the file, key or value at fault and
//! what was expected, so a user can fix their checkpoint without reading our source.

use std::path::PathBuf;

/// Anything that can go wrong while loading, running or saving a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {what}")]
    MissingFile { path: PathBuf, what: &'static str },

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: invalid JSON or missing/invalid key: {message}")]
    Config { path: PathBuf, message: String },

    #[error("{path}: unsupported architecture: model_type {model_type:?} (supported: llama, mistral, qwen2)")]
    UnsupportedArchitecture { path: PathBuf, model_type: String },

    #[error("{path}: unsupported value for `{key}`: {value} ({expected})")]
    Unsupported {
        path: PathBuf,
        key: String,
        value: String,
        expected: String,
    },

    #[error("{path}: not a valid safetensors file: {message}")]
    Safetensors { path: PathBuf, message: String },

    #[error("tensor `{name}` not found in {searched}")]
    MissingTensor { name: String, searched: String },

    #[error("{path}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    #[error("{path}: tensor `{name}` has dtype {found}, expected {expected}")]
    DtypeMismatch {
        path: PathBuf,
        name: String,
        expected: String,
        found: String,
    },

    #[error("{path}: tokenizer error: {message}")]
    Tokenizer { path: PathBuf, message: String },

    #[error("invalid input: {0}")]
    InvalidInput(String),

    #[error(transparent)]
    Gguf(#[from] crate::io::gguf::GgufError),
}

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            ModelError::MissingFile {
                path,
                what: "file not found",
            }
        } else {
            ModelError::Io { path, source }
        }
    }
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// Reads the text of the JSON file `path` into `T`. A value of the wrong type is named by its
/// key's path (`key `rms_norm_eps`: invalid type: ...`); presence and ranges are the caller's.
pub(crate) fn from_json_text<T: serde::de::DeserializeOwned>(
    text: &str,
    path: &std::path::Path,
) -> Result<T> {
    let mut de = serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let message = match e.path().to_string().as_str() {
            "." => e.inner().to_string(),
            key => format!("key `{key}`: {}", e.inner()),
        };
        ModelError::Config {
            path: path.to_path_buf(),
            message,
        }
    })
}
