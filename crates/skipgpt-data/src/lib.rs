//! # skipgpt-data
//!
//! Corpora: plain text and JSONL files or a seeded synthetic corpus, tokenized and packed into
//! fixed-length sequences with a deterministic train/validation split. Training and evaluation
//! both read data through this crate; neither pulls the other in.

use std::path::{Path, PathBuf};

use rand::{rngs::StdRng, Rng, SeedableRng};
use skipgpt_model::Tokenizer;

pub mod error;

pub use error::{DataError, Result};

/// Reads documents from files: `.jsonl` gives one document per line (its `text` field), any other
/// file one document per blank-line-separated paragraph.
pub fn read_documents(paths: &[PathBuf]) -> Result<Vec<String>> {
    let mut docs = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
            path: path.clone(),
            source,
        })?;
        if path.extension().is_some_and(|e| e == "jsonl") {
            docs.extend(jsonl_texts(path, &text)?);
        } else {
            docs.extend(
                text.split("\n\n")
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                    .map(str::to_string),
            );
        }
    }
    if docs.is_empty() {
        return Err(DataError::NotEnoughData(format!(
            "no text found in {}",
            paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok(docs)
}

fn jsonl_texts(path: &Path, text: &str) -> Result<Vec<String>> {
    let mut docs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let err = |message: String| DataError::Jsonl {
            path: path.to_path_buf(),
            line: i + 1,
            message,
        };
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| err(e.to_string()))?;
        match value.get("text") {
            Some(serde_json::Value::String(s)) => docs.push(s.clone()),
            Some(other) => return Err(err(format!("`text` must be a string, got {other}"))),
            None => return Err(err("missing key `text`".into())),
        }
    }
    Ok(docs)
}

/// Word lists of the synthetic corpus.
pub const SUBJECTS: [&str; 12] = [
    "the cat",
    "a dog",
    "the editor",
    "my friend",
    "the robot",
    "a farmer",
    "the child",
    "our team",
    "the model",
    "a bird",
    "the teacher",
    "the sailor",
];
pub const VERBS: [&str; 10] = [
    "sees", "likes", "moves", "writes", "finds", "keeps", "opens", "paints", "reads", "fixes",
];
pub const OBJECTS: [&str; 12] = [
    "the red box",
    "a small boat",
    "the old map",
    "a green apple",
    "the long road",
    "a quiet room",
    "the blue door",
    "a warm coat",
    "the new file",
    "a bright lamp",
    "the wooden chair",
    "a paper kite",
];

/// A seeded synthetic corpus whose tokens differ in how hard they are to predict: every line
/// mixes free choices (subject, verb, object, a start number: hard), fixed phrases and
/// punctuation (easy once seen), and a counting run that follows from its first number
/// (trivial). Token-aware routing has something to find: the easy tokens need less compute.
pub fn synthetic_corpus(num_docs: usize, seed: u64) -> Vec<String> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..num_docs)
        .map(|_| {
            let lines: Vec<String> = (0..4)
                .map(|_| {
                    let s = SUBJECTS[rng.random_range(0..SUBJECTS.len())];
                    let v = VERBS[rng.random_range(0..VERBS.len())];
                    let o = OBJECTS[rng.random_range(0..OBJECTS.len())];
                    let start: u32 = rng.random_range(1..60);
                    let run: Vec<String> = (start..start + 6).map(|n| n.to_string()).collect();
                    format!(
                        "{s} {v} {o}. then it counts {}. and so on, the end.",
                        run.join(" ")
                    )
                })
                .collect();
            lines.join("\n")
        })
        .collect()
}

/// Token sequences of `seq_len + 1` tokens (inputs and their shifted targets).
#[derive(Debug, Clone, PartialEq)]
pub struct PackedDataset {
    pub seq_len: usize,
    pub sequences: Vec<Vec<u32>>,
}

/// Tokenizes `docs`, joins them with `separator` (EOS) and cuts the stream into windows of
/// `seq_len + 1` tokens (stride `seq_len`, so every token is predicted exactly once).
pub fn pack(
    docs: &[String],
    tokenizer: &Tokenizer,
    seq_len: usize,
    separator: Option<u32>,
) -> Result<PackedDataset> {
    if seq_len < 2 {
        return Err(DataError::InvalidSetting {
            name: "seq_len",
            value: seq_len.to_string(),
            expected: "at least 2",
        });
    }
    let mut stream = Vec::new();
    for doc in docs {
        stream.extend(tokenizer.encode(doc)?);
        stream.extend(separator);
    }
    let sequences: Vec<Vec<u32>> = (0..)
        .map(|i| i * seq_len)
        .take_while(|start| start + seq_len < stream.len())
        .map(|start| stream[start..start + seq_len + 1].to_vec())
        .collect();
    if sequences.is_empty() {
        return Err(DataError::NotEnoughData(format!(
            "the corpus has {} tokens, fewer than one sequence of {} + 1",
            stream.len(),
            seq_len
        )));
    }
    Ok(PackedDataset { seq_len, sequences })
}

impl PackedDataset {
    /// Splits deterministically: sequence `i` goes to validation when a seeded hash of `i`
    /// falls under `valid_fraction`, so the same corpus, sequence length and seed give the same
    /// split on every run (training and `eval-ppl` agree on what was held out).
    pub fn split(self, valid_fraction: f64, seed: u64) -> Result<(PackedDataset, PackedDataset)> {
        if !(0.0..1.0).contains(&valid_fraction) {
            return Err(DataError::InvalidSetting {
                name: "valid_fraction",
                value: valid_fraction.to_string(),
                expected: "a fraction in [0, 1)",
            });
        }
        let (mut train, mut valid) = (Vec::new(), Vec::new());
        for (i, seq) in self.sequences.into_iter().enumerate() {
            let h = splitmix64(seed ^ (i as u64).wrapping_mul(GOLDEN));
            if (h as f64 / u64::MAX as f64) < valid_fraction {
                valid.push(seq);
            } else {
                train.push(seq);
            }
        }
        // a validation set is only useful if it exists: take the last train sequence if needed
        if valid_fraction > 0.0 && valid.is_empty() && train.len() > 1 {
            valid.push(train.pop().expect("len > 1"));
        }
        if train.is_empty() {
            return Err(DataError::NotEnoughData(
                "no training sequences left after the split".into(),
            ));
        }
        let seq_len = self.seq_len;
        Ok((
            PackedDataset {
                seq_len,
                sequences: train,
            },
            PackedDataset {
                seq_len,
                sequences: valid,
            },
        ))
    }

    pub fn len(&self) -> usize {
        self.sequences.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sequences.is_empty()
    }
}

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// The splitmix64 output function: a bijective 64-bit scramble.
fn finalize(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// One splitmix64 step from state `x`.
fn splitmix64(x: u64) -> u64 {
    finalize(x.wrapping_add(GOLDEN))
}

/// A 64-bit mix of two values, for derived seeds and fingerprints.
pub fn mix(a: u64, b: u64) -> u64 {
    finalize(a ^ b.wrapping_mul(GOLDEN))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> Tokenizer {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/llama-tiny/model/tokenizer.json");
        Tokenizer::from_file(&path).unwrap()
    }

    #[test]
    fn synthetic_corpus_is_seeded() {
        assert_eq!(synthetic_corpus(5, 1), synthetic_corpus(5, 1));
        assert_ne!(synthetic_corpus(5, 1), synthetic_corpus(5, 2));
        let doc = &synthetic_corpus(1, 3)[0];
        assert_eq!(doc.lines().count(), 4);
        assert!(doc.contains("then it counts"));
    }

    #[test]
    fn packing_covers_the_stream_once() {
        let tok = tokenizer();
        let docs = synthetic_corpus(20, 0);
        let ds = pack(&docs, &tok, 16, Some(1)).unwrap();
        let total: usize = docs.iter().map(|d| tok.encode(d).unwrap().len() + 1).sum();
        assert_eq!(ds.len(), (total - 1) / 16);
        assert!(ds.sequences.iter().all(|s| s.len() == 17));
        // consecutive windows overlap by exactly one token (last target = next first input)
        assert_eq!(ds.sequences[0][16], ds.sequences[1][0]);
        let err = pack(&docs[..1], &tok, 10_000, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("10000"), "{err}");
    }

    #[test]
    fn split_is_deterministic_and_disjoint() {
        let tok = tokenizer();
        let ds = pack(&synthetic_corpus(60, 0), &tok, 16, Some(1)).unwrap();
        let n = ds.len();
        let (t1, v1) = ds.clone().split(0.1, 7).unwrap();
        let (t2, v2) = ds.clone().split(0.1, 7).unwrap();
        assert_eq!((&t1, &v1), (&t2, &v2));
        assert_eq!(t1.len() + v1.len(), n);
        assert!(!v1.is_empty() && v1.len() < n / 4, "{} of {n}", v1.len());
        let (_, v3) = ds.clone().split(0.1, 8).unwrap();
        assert_ne!(v1, v3, "a different seed gives a different split");
        assert!(ds.split(1.0, 0).is_err());
    }

    #[test]
    fn reads_text_and_jsonl_with_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let txt = dir.path().join("a.txt");
        std::fs::write(&txt, "first paragraph\nstill first\n\nsecond\n").unwrap();
        let jsonl = dir.path().join("b.jsonl");
        std::fs::write(
            &jsonl,
            "{\"text\": \"one\"}\n\n{\"text\": \"two\", \"id\": 3}\n",
        )
        .unwrap();
        let docs = read_documents(&[txt.clone(), jsonl.clone()]).unwrap();
        assert_eq!(
            docs,
            vec!["first paragraph\nstill first", "second", "one", "two"]
        );

        std::fs::write(&jsonl, "{\"text\": \"one\"}\n{\"body\": \"two\"}\n").unwrap();
        let err = read_documents(std::slice::from_ref(&jsonl))
            .unwrap_err()
            .to_string();
        assert!(err.contains("b.jsonl:2") && err.contains("text"), "{err}");
        std::fs::write(&jsonl, "{\"text\": \"one\"}\nnot json\n").unwrap();
        let err = read_documents(&[jsonl]).unwrap_err().to_string();
        assert!(err.contains("b.jsonl:2"), "{err}");
        let err = read_documents(&[dir.path().join("missing.txt")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.txt"), "{err}");
    }
}
