//! Helpers shared by the workspace's integration tests: fixture paths, the reference CPU
//! backend, tensor comparison that fails on a non-finite value, and a GGUF writer
//! ([`gguf_writer`]).

pub mod gguf_writer;

use std::path::{Path, PathBuf};

use burn::tensor::{Int, Tensor, TensorData};
use skipgpt_model::io::safetensors_io::TensorFile;
use skipgpt_model::{GenerateOptions, Sampling};

pub type B = burn::backend::NdArray<f32>;

pub fn device() -> burn::backend::ndarray::NdArrayDevice {
    Default::default()
}

/// The workspace's `tests/fixtures`, from the root package or a member crate.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .map(|dir| dir.join("tests/fixtures"))
        .find(|dir| dir.is_dir())
        .expect("tests/fixtures in the workspace")
}

/// `tests/fixtures/llama-tiny` (a copy of shared/fixtures/llama-tiny).
pub fn tiny() -> PathBuf {
    fixtures().join("llama-tiny")
}

pub fn variant(name: &str) -> PathBuf {
    fixtures().join("variants").join(name)
}

pub fn reference(dir: &Path) -> TensorFile {
    TensorFile::open(&dir.join("reference.safetensors")).expect("reference.safetensors")
}

pub fn ids_tensor(file: &TensorFile, name: &str) -> Tensor<B, 2, Int> {
    let (ids, shape) = file.read_i64(name).unwrap();
    Tensor::from_data(TensorData::new(ids, [shape[0], shape[1]]), &device())
}

pub fn ids_rows(file: &TensorFile, name: &str) -> Vec<Vec<u32>> {
    let (ids, shape) = file.read_i64(name).unwrap();
    ids.chunks(shape[1])
        .map(|r| r.iter().map(|&i| i as u32).collect())
        .collect()
}

/// A tensor's values on the host (any backend).
pub fn to_vec<Bk: burn::tensor::backend::Backend, const D: usize>(t: Tensor<Bk, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec().unwrap()
}

/// max |a - b|, after checking the lengths agree; NaN where either side holds a NaN or an
/// infinity, so that every `diff < tol` (and `diff > tol`) fails on broken output instead of
/// passing (`f32::max` would drop the NaN).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).fold(0.0, |worst, (x, y)| {
        if !x.is_finite() || !y.is_finite() {
            f32::NAN
        } else {
            // NaN, once there, stays: `f32::max` would return the other operand
            let d = (x - y).abs();
            if worst.is_nan() || d <= worst {
                worst
            } else {
                d
            }
        }
    })
}

/// Compares a tensor with a reference tensor, returning the max |Δ|.
pub fn diff_with<Bk: burn::tensor::backend::Backend, const D: usize>(
    t: Tensor<Bk, D>,
    reference: &TensorFile,
    name: &str,
) -> f32 {
    let (expected, shape) = reference.read_f32(name).unwrap();
    assert_eq!(t.dims().to_vec(), shape, "shape of {name}");
    max_abs_diff(&to_vec(t), &expected)
}

/// A copy of the tiny model with `config.json` edited by `edit`.
pub fn edit_config(edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let dir = copy_dir(&tiny().join("model"));
    let path = dir.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&path, cfg.to_string()).unwrap();
    dir
}

/// Copies a directory's files (one level) into a fresh temp dir the test may modify.
pub fn copy_dir(src: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
        }
    }
    dir
}

/// Greedy decoding of exactly `n` tokens (EOS ignored), as the fixture's references were made.
pub fn greedy(n: usize) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: n,
        sampling: Sampling::Greedy,
        eos_token_ids: vec![],
        ignore_eos: true,
    }
}

/// The sparse engine's logits for every position of `rows` (all of one length), fed to one
/// cache in chunks of the given lengths (a prefill, then single tokens, ...), as `[b, s, v]`
/// values: what incremental decoding sees.
pub fn engine_logits_in_chunks<Bk: burn::tensor::backend::Backend>(
    model: &skipgpt_model::LlamaForCausalLM<Bk>,
    rows: &[Vec<u32>],
    chunks: &[usize],
    routing: skipgpt_model::Routing,
) -> Vec<f32> {
    use skipgpt_model::engine::{sparse_forward, LogitRows, SparseCache};
    let (b, s) = (rows.len(), rows[0].len());
    assert_eq!(chunks.iter().sum::<usize>(), s, "the chunks cover the rows");
    let mut cache = SparseCache::new(b, model.config.num_hidden_layers);
    let mut pieces = Vec::new();
    let mut pos = 0;
    for &len in chunks {
        let chunk: Vec<Vec<u32>> = rows.iter().map(|r| r[pos..pos + len].to_vec()).collect();
        let out = sparse_forward(model, &chunk, &mut cache, routing, LogitRows::All).unwrap();
        let v = out.logits.dims()[1];
        pieces.push(out.logits.reshape([b, len, v]));
        pos += len;
    }
    assert!((0..b).all(|i| cache.seq_len(i) == s));
    to_vec(Tensor::cat(pieces, 1))
}

/// Every router tensor of a model (as its checkpoint stores them, f32), flattened in name order.
pub fn router_values<Bk: burn::tensor::backend::Backend>(
    model: &skipgpt_model::LlamaForCausalLM<Bk>,
) -> Vec<f32> {
    model
        .export_routers()
        .values()
        .flat_map(|t| {
            t.bytes()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Asserts that `text` (an error message, a report) mentions every one of `words`.
#[track_caller]
pub fn assert_mentions(text: &str, words: &[&str]) {
    for w in words {
        assert!(text.contains(w), "{w:?} is not in: {text}");
    }
}
