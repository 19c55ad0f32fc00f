//! A byte-level BPE tokenizer trained on the corpus, for pretraining when the user brings none:
//! the LLaMA-3 layout (byte-level pre-tokenizer and decoder, `<|begin_of_text|>` added in
//! front of every text, `<|end_of_text|>` between documents).

use std::path::PathBuf;

use skipgpt_data::DataError;
use skipgpt_model::Tokenizer;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::AddedToken;

use crate::error::{Result, TrainError};

pub const BOS: &str = "<|begin_of_text|>";
pub const EOS: &str = "<|end_of_text|>";

/// Trains a byte-level BPE with at most `vocab_size` entries (256 bytes and two special tokens
/// included) on `docs`. `path` is where it will be saved (for error messages).
pub fn train_bpe(docs: &[String], vocab_size: usize, path: PathBuf) -> Result<Tokenizer> {
    let alphabet = ByteLevel::alphabet();
    let min = alphabet.len() + 2;
    if vocab_size < min {
        return Err(DataError::InvalidSetting {
            name: "vocab_size",
            value: vocab_size.to_string(),
            expected: "at least 258 (256 bytes and 2 special tokens)",
        }
        .into());
    }
    let specials = vec![AddedToken::from(BOS, true), AddedToken::from(EOS, true)];
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab_size)
        .min_frequency(2)
        .special_tokens(specials)
        .initial_alphabet(alphabet.into_iter().collect())
        .build()
        .into();
    let mut tok = tokenizers::Tokenizer::new(BPE::default());
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, false)))
        .with_decoder(Some(ByteLevel::default()));
    tok.train(&mut trainer, docs.iter())
        .map_err(|e| TrainError::Tokenizer(e.to_string()))?;
    let bos_id = tok
        .token_to_id(BOS)
        .ok_or_else(|| TrainError::Tokenizer(format!("{BOS} missing after training")))?;
    let post = TemplateProcessing::builder()
        .try_single(format!("{BOS} $A"))
        .and_then(|b| b.try_pair(format!("{BOS} $A {BOS} $B")))
        .map_err(|e| TrainError::Tokenizer(e.to_string()))?
        .special_tokens(vec![(BOS, bos_id)])
        .build()
        .map_err(|e| TrainError::Tokenizer(e.to_string()))?;
    tok.with_post_processor(Some(post));
    Ok(Tokenizer::from_inner(tok, path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::synthetic_corpus;

    #[test]
    fn trained_bpe_round_trips_and_compresses() {
        let docs = synthetic_corpus(200, 3);
        let tok = train_bpe(&docs, 400, "tokenizer.json".into()).unwrap();
        assert!(
            tok.vocab_size() <= 400 && tok.vocab_size() > 300,
            "{}",
            tok.vocab_size()
        );
        let text = &docs[0];
        let ids = tok.encode(text).unwrap();
        assert_eq!(ids[0], tok.token_to_id(BOS).unwrap());
        assert_eq!(&tok.decode(&ids).unwrap(), text);
        // merges learned from the corpus: far fewer tokens than bytes
        assert!(
            ids.len() * 3 < text.len(),
            "{} ids for {} bytes",
            ids.len(),
            text.len()
        );
        let err = train_bpe(&docs, 100, "t.json".into())
            .unwrap_err()
            .to_string();
        assert!(err.contains("vocab_size") && err.contains("100"), "{err}");
    }
}
