//! GGUF, the file format of llama.cpp and Ollama: read, run as it is, imported into a Hugging
//! Face model directory, and written quantized.
//!
//! - [`reader`]: the container (v2 and v3): metadata, tensor infos, aligned data;
//! - [`quant`]: dequantization of F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K;
//! - [`tokenizer`]: a `tokenizer.json` rebuilt from `tokenizer.ggml.*` (byte-level BPE);
//! - `config`: the `llama.*` metadata → a [`crate::LlamaConfig`];
//! - [`weights`]: a LLaMA GGUF run as it is ([`load_gguf`]), quantized matrices kept in
//!   their blocks;
//! - [`writer`]: GGUF v3 written tensor by tensor; [`quantize_file`]: a GGUF with its matrices
//!   in another type (`skipgpt quantize`), each the type llama.cpp gives it (`tensor_types`);
//! - [`export`]: a model directory seen as the GGUF llama.cpp's converter would write from it;
//! - [`import`]: a LLaMA GGUF → `config.json`, `model.safetensors` (streamed tensor by tensor,
//!   llama.cpp's q/k row permutation undone), `tokenizer.json`, `tokenizer_config.json`.
//!
//! References: llama.cpp's `ggml-quants.c`, `llama-vocab.cpp` and `convert_hf_to_gguf.py`, and
//! gguf-py. Errors name the file and the key, tensor or type at fault.

mod config;
pub mod export;
pub mod import;
pub mod quant;
pub mod quantize_file;
pub mod reader;
mod tensor_types;
pub mod tokenizer;
pub mod weights;
pub mod writer;

use std::path::PathBuf;

pub use import::{import_gguf, ImportOptions, ImportReport};
pub use quant::GgmlType;
pub use quantize_file::{quantize_gguf, QuantizeReport, QuantizeTarget};
pub use reader::{GgufFile, GgufValue, TensorInfo};
pub use weights::{gguf_file_tokenizer, gguf_tokenizer_config, is_gguf, load_gguf, GgufWeights};

/// What can be wrong with a GGUF file, or with what it asks of us.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: not a GGUF file: it starts with {found:?}, expected \"GGUF\"", found = String::from_utf8_lossy(found))]
    BadMagic { path: PathBuf, found: [u8; 4] },

    #[error("{path}: GGUF version {version} is not supported (versions 2 and 3 are){hint}")]
    UnsupportedVersion {
        path: PathBuf,
        version: u32,
        hint: &'static str,
    },

    #[error("{path}: truncated: {what} needs {needed} bytes at offset {offset}, but the file has {size} bytes")]
    Truncated {
        path: PathBuf,
        offset: u64,
        needed: u64,
        size: u64,
        what: String,
    },

    #[error("{path}: malformed GGUF: {message}")]
    Malformed { path: PathBuf, message: String },

    #[error("{path}: tensor `{tensor}` has type {kind}, which this importer cannot dequantize (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K)")]
    UnsupportedTensorType {
        path: PathBuf,
        tensor: String,
        kind: String,
    },

    #[error("{path}: tensor `{name}`: {message}")]
    BadTensor {
        path: PathBuf,
        name: String,
        message: String,
    },

    #[error("{path}: tensor `{name}` not found (needed for {needed_for})")]
    MissingTensor {
        path: PathBuf,
        name: String,
        needed_for: String,
    },

    #[error("{path}: tensor `{name}` has shape {found:?} (PyTorch order), expected {expected:?}")]
    TensorShape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    #[error("{path}: metadata `{key}` is missing")]
    MissingKey { path: PathBuf, key: String },

    #[error("{path}: metadata `{key}` is a {found}, expected {expected}")]
    KeyType {
        path: PathBuf,
        key: String,
        expected: &'static str,
        found: &'static str,
    },

    #[error("{path}: unsupported {key} = {value:?} ({supported})")]
    Unsupported {
        path: PathBuf,
        key: String,
        value: String,
        supported: String,
    },

    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}
