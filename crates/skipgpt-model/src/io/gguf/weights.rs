//! A LLaMA GGUF file run as it is: its tensors under their Hugging Face names
//! ([`GgufWeights`], a [`WeightSource`]), and the whole model with its tokenizer ([`load_gguf`]).
//! Quantized matrices are kept in their blocks, read in place from the map, where the backend
//! computes with them ([`crate::quantized::keeps_quantized`]); float tensors, and every tensor
//! on other backends, are dequantized and held as a model directory's would be.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;

use burn::tensor::{backend::Backend, Tensor, TensorData};

use super::config::llama_config;
use super::import::{plan_tensors, unpermute_rows, unpermuted_order};
use super::reader::{GgufFile, TensorInfo};
use super::tokenizer::{tokenizer_config, tokenizer_from_gguf};
use super::GgufError;
use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::io::checkpoint::Pretrained;
use crate::io::safetensors_io::{tensor_in, transpose, StoreDtype};
use crate::io::weight_source::WeightSource;
use crate::llama::LlamaForCausalLM;
use crate::quantized::QuantWeight;
use crate::tokenizer::Tokenizer;

/// One HF tensor: where it lies in the file, and the q/k row order to undo (its head count).
struct Entry {
    info: TensorInfo,
    unpermute_heads: Option<usize>,
}

/// A GGUF's tensors by HF name.
pub struct GgufWeights {
    gguf: GgufFile,
    entries: HashMap<String, Entry>,
    matrix_dtype: StoreDtype,
}

impl GgufWeights {
    /// The tensors of `gguf` as the model `config` reads them, float matrices held in
    /// `matrix_dtype`. Also returns the file's tensors the model does not use.
    pub fn new(
        gguf: GgufFile,
        config: &LlamaConfig,
        matrix_dtype: StoreDtype,
    ) -> Result<(Self, Vec<String>)> {
        let (plan, ignored) = plan_tensors(&gguf, config)?;
        let entries = plan
            .into_iter()
            .map(|p| {
                let entry = Entry {
                    info: p.source.clone(),
                    unpermute_heads: p.unpermute_heads,
                };
                (p.hf_name, entry)
            })
            .collect();
        let weights = GgufWeights {
            gguf,
            entries,
            matrix_dtype,
        };
        Ok((weights, ignored))
    }

    fn entry(&self, name: &str, shape: &[usize]) -> Result<&Entry> {
        let entry = self
            .entries
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_string(),
                searched: self.gguf.path().display().to_string(),
            })?;
        let found = entry.info.torch_shape();
        if found != shape {
            return Err(ModelError::ShapeMismatch {
                path: self.gguf.path().to_path_buf(),
                name: format!("{name} (GGUF `{}`)", entry.info.name),
                expected: shape.to_vec(),
                found,
            });
        }
        Ok(entry)
    }

    /// The values of `name`, dequantized, in HF's row order.
    fn values(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let entry = self.entry(name, shape)?;
        let values = self.gguf.tensor_f32(&entry.info);
        Ok(match entry.unpermute_heads {
            Some(heads) => {
                let cols = shape.get(1).copied().unwrap_or(1);
                unpermute_rows(&values, heads, cols)
            }
            None => values,
        })
    }
}

impl WeightSource for GgufWeights {
    fn tensor<B: Backend, const D: usize>(
        &self,
        name: &str,
        shape: [usize; D],
        device: &B::Device,
    ) -> Result<Tensor<B, D>> {
        let values = self.values(name, &shape)?;
        Ok(Tensor::from_data(TensorData::new(values, shape), device))
    }

    fn matrix<B: Backend>(
        &self,
        name: &str,
        shape: [usize; 2],
        device: &B::Device,
    ) -> Result<Tensor<B, 2>> {
        let values = self.values(name, &shape)?;
        Ok(tensor_in(
            TensorData::new(values, shape),
            self.matrix_dtype,
            device,
        ))
    }

    fn tensor_transposed<B: Backend>(
        &self,
        name: &str,
        [rows, cols]: [usize; 2],
        device: &B::Device,
    ) -> Result<Tensor<B, 2>> {
        let values = self.values(name, &[rows, cols])?;
        let data = TensorData::new(transpose(&values, rows, cols), [cols, rows]);
        Ok(tensor_in(data, self.matrix_dtype, device))
    }

    fn quantized(&self, name: &str, shape: [usize; 2]) -> Result<Option<QuantWeight>> {
        let entry = self.entry(name, &shape)?;
        let Some(kind) = entry.info.kind.block_format() else {
            return Ok(None);
        };
        let range = self.gguf.tensor_range(&entry.info);
        let weight =
            QuantWeight::mapped(kind, self.gguf.shared_map(), range, shape).ok_or_else(|| {
                GgufError::BadTensor {
                    path: self.gguf.path().to_path_buf(),
                    name: entry.info.name.clone(),
                    message: format!(
                        "its {} bytes do not hold {shape:?} in {} blocks",
                        self.gguf.tensor_range(&entry.info).len(),
                        kind.name()
                    ),
                }
            })?;
        Ok(Some(match entry.unpermute_heads {
            Some(heads) => weight.with_rows(&unpermuted_order(shape[0], heads)),
            None => weight,
        }))
    }
}

/// Whether `path` is a GGUF file (by its name), not a model directory.
pub fn is_gguf(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        && !path.is_dir()
}

/// The model, tokenizer and chat settings of a LLaMA GGUF, run as it is: quantized matrices
/// stay in their blocks where the backend computes with them, float matrices are held in
/// `dtype`.
pub fn load_gguf<B: Backend>(
    path: &Path,
    device: &B::Device,
    dtype: StoreDtype,
) -> Result<Pretrained<B>> {
    crate::precision::check_supported::<B>(dtype, device)?;
    let gguf = GgufFile::open(path)?;
    let config = llama_config(&gguf, dtype)?;
    let tokenizer = gguf_tokenizer(&gguf)?;
    let (weights, unused_tensors) = GgufWeights::new(gguf, &config, dtype)?;
    let model = LlamaForCausalLM::load(&config, &weights, device)?;
    Ok(Pretrained {
        model,
        tokenizer: Some(tokenizer),
        dir: path.to_path_buf(),
        unused_tensors,
    })
}

/// The tokenizer rebuilt from `tokenizer.ggml.*`.
fn gguf_tokenizer(gguf: &GgufFile) -> Result<Tokenizer> {
    let (tokenizer, _) = tokenizer_from_gguf(gguf)?;
    let text = serde_json::to_string(&tokenizer).expect("tokenizer JSON serialises");
    let inner = tokenizers::Tokenizer::from_str(&text).map_err(|e| ModelError::Tokenizer {
        path: gguf.path().to_path_buf(),
        message: format!("the tokenizer rebuilt from tokenizer.ggml.* does not load: {e}"),
    })?;
    Ok(Tokenizer::from_inner(inner, gguf.path().to_path_buf()))
}

/// The tokenizer a GGUF carries (`tokenizer.ggml.*`), without loading its weights.
pub fn gguf_file_tokenizer(path: &Path) -> Result<Tokenizer> {
    gguf_tokenizer(&GgufFile::open(path)?)
}

/// What a model directory's `tokenizer_config.json` would say of a GGUF (its chat template and
/// special tokens).
pub fn gguf_tokenizer_config(path: &Path) -> Result<serde_json::Value> {
    let gguf = GgufFile::open(path)?;
    let config = llama_config(&gguf, StoreDtype::F32)?;
    let (_, special) = tokenizer_from_gguf(&gguf)?;
    Ok(tokenizer_config(&special, config.max_position_embeddings))
}
