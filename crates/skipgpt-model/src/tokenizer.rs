//! The model's tokenizer, read from `tokenizer.json` with the `tokenizers` crate.

use std::path::{Path, PathBuf};

use crate::error::{ModelError, Result};

/// A Hugging Face tokenizer with the path it came from (for error messages).
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("path", &self.path)
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(ModelError::MissingFile {
                path: path.to_path_buf(),
                what: "not found (a tokenizer.json is needed to turn text into token ids)",
            });
        }
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| {
            // tokenizers reports a file of the wrong structure as a JSON syntax error; say
            // which it is
            let is_json = std::fs::read(path)
                .ok()
                .is_some_and(|b| serde_json::from_slice::<serde_json::Value>(&b).is_ok());
            ModelError::Tokenizer {
                path: path.to_path_buf(),
                message: if is_json {
                    format!(
                        "valid JSON, but not a tokenizer.json of the `tokenizers` library ({e})"
                    )
                } else {
                    e.to_string()
                },
            }
        })?;
        Ok(Tokenizer {
            inner,
            path: path.to_path_buf(),
        })
    }

    pub fn from_inner(inner: tokenizers::Tokenizer, path: PathBuf) -> Self {
        Tokenizer { inner, path }
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, e: impl std::fmt::Display) -> ModelError {
        ModelError::Tokenizer {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    /// Token ids of `text`, with the special tokens the tokenizer's post-processor adds
    /// (transformers' default `add_special_tokens=True`).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, true)
            .map_err(|e| self.err(e))?
            .get_ids()
            .to_vec())
    }

    /// Token ids and token strings of `text` alone, with nothing added around it
    /// (transformers' `add_special_tokens=False`). Special tokens written in the text are
    /// still recognised.
    pub fn encode_plain(&self, text: &str) -> Result<(Vec<u32>, Vec<String>)> {
        let enc = self.inner.encode(text, false).map_err(|e| self.err(e))?;
        Ok((enc.get_ids().to_vec(), enc.get_tokens().to_vec()))
    }

    /// Text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| self.err(e))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Writes `tokenizer.json` into `dir` (atomically).
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = self.inner.to_string(false).map_err(|e| self.err(e))?;
        crate::io::atomic_write::atomic_write(path, text.as_bytes())
    }
}
