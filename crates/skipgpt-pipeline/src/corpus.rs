//! Where a stage's text comes from and how it is cut into training and held-out sequences.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use skipgpt_data::{pack, read_documents, synthetic_corpus, PackedDataset};
use skipgpt_model::{LlamaConfig, Tokenizer};

use crate::Result;

/// A corpus: files or the built-in synthetic one, packed into sequences and split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CorpusConfig {
    /// Text (.txt, paragraphs) or JSONL (a `text` field per line) files.
    pub data: Vec<PathBuf>,
    /// N documents of the built-in synthetic corpus instead of files.
    pub synthetic: Option<usize>,
    /// Seed of the synthetic corpus and of the train/validation split: keep it equal across
    /// stages to evaluate on held-out text.
    pub data_seed: u64,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Fraction of sequences held out for validation (without `valid_data`).
    pub valid_fraction: f64,
    /// Held-out files: whole documents the model never trains on. With them every `data`
    /// sequence trains and `valid_fraction` is not used.
    pub valid_data: Vec<PathBuf>,
}

impl Default for CorpusConfig {
    fn default() -> Self {
        CorpusConfig {
            data: Vec::new(),
            synthetic: None,
            data_seed: 0,
            seq_len: 128,
            valid_fraction: 0.1,
            valid_data: Vec::new(),
        }
    }
}

impl CorpusConfig {
    /// `n` documents of the built-in synthetic corpus, split with the defaults.
    pub fn synthetic(n: usize, seed: u64, seq_len: usize) -> Self {
        CorpusConfig {
            synthetic: Some(n),
            data_seed: seed,
            seq_len,
            ..CorpusConfig::default()
        }
    }

    pub fn documents(&self) -> Result<Vec<String>> {
        Ok(match self.synthetic {
            Some(n) => synthetic_corpus(n, self.data_seed),
            None => read_documents(&self.data)?,
        })
    }

    /// The documents, tokenized, packed (documents joined by the model's EOS) and split into
    /// (train, validation).
    pub fn load_split(
        &self,
        tokenizer: &Tokenizer,
        config: &LlamaConfig,
    ) -> Result<(PackedDataset, PackedDataset)> {
        let docs = self.documents()?;
        self.split(&docs, tokenizer, config.eos_token_ids.first().copied())
    }

    /// `docs` tokenized, packed and split into (train, validation).
    pub fn split(
        &self,
        docs: &[String],
        tokenizer: &Tokenizer,
        eos: Option<u32>,
    ) -> Result<(PackedDataset, PackedDataset)> {
        let packed = pack(docs, tokenizer, self.seq_len, eos)?;
        if !self.valid_data.is_empty() {
            let held_out = read_documents(&self.valid_data)?;
            return Ok((packed, pack(&held_out, tokenizer, self.seq_len, eos)?));
        }
        Ok(packed.split(self.valid_fraction, self.data_seed)?)
    }
}

/// The first `n` sequences of `data` (0: all of them): the validation slice a run uses
/// during training and in its final report.
pub fn first_sequences(mut data: PackedDataset, n: usize) -> PackedDataset {
    if n > 0 {
        data.sequences.truncate(n);
    }
    data
}
