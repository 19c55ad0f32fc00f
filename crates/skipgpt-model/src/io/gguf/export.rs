//! A LLaMA model directory (`config.json`, safetensors, `tokenizer.json`,
//! `tokenizer_config.json`) seen as the GGUF that llama.cpp's `convert_hf_to_gguf.py` would
//! write from it: the `llama.*` hyperparameters, the byte-level BPE under `tokenizer.ggml.*`
//! (its pre-tokenizer named as llama.cpp names it), the chat template, and the tensors under
//! GGUF names with the q/k rows permuted, read one at a time. `skipgpt quantize` writes it
//! quantized without an intermediate file.
//!
//! Refused with a message: rope scaling (llama.cpp's LLaMA 3 frequency table is not written),
//! bias terms, and a tokenizer that is not byte-level BPE with a pre-tokenizer llama.cpp
//! knows. Routers are not part of a GGUF: they are attached at run time with `--routers`.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::import::permute_rows;
use super::quant::GgmlType;
use super::reader::{GgufValue, TensorInfo};
use super::tokenizer::pre_name_of;
use super::GgufError;
use crate::config::{LlamaConfig, RopeScaling};
use crate::io::checkpoint::load_config;
use crate::io::safetensors_io::WeightSet;

/// llama.cpp's token types.
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// A model directory as GGUF metadata and tensors (all F32: each is read and converted when
/// it is written).
pub struct DirAsGguf {
    dir: PathBuf,
    weights: WeightSet,
    pub metadata: Vec<(String, GgufValue)>,
    pub tensors: Vec<TensorInfo>,
    /// Per tensor: its HF name, and the head count to permute its rows by (q and k).
    sources: Vec<(String, Option<usize>)>,
}

impl DirAsGguf {
    pub fn open(dir: &Path) -> Result<Self, GgufError> {
        let invalid = |message: String| GgufError::Invalid {
            path: dir.to_path_buf(),
            message,
        };
        let config = load_config(dir).map_err(|e| invalid(e.to_string()))?;
        if config.rope_scaling != RopeScaling::Default {
            return Err(invalid(format!(
                "config.json: rope_scaling {:?} is not written to GGUF by skipgpt; convert with llama.cpp's convert_hf_to_gguf.py",
                config.rope_scaling
            )));
        }
        if config.qkv_bias || config.o_bias || config.mlp_bias {
            return Err(invalid(
                "config.json: bias terms are not written to GGUF by skipgpt; convert with llama.cpp's convert_hf_to_gguf.py".into(),
            ));
        }
        let weights = WeightSet::open_dir(dir).map_err(|e| invalid(e.to_string()))?;
        let mut metadata = hyperparameters(dir, &config);
        metadata.extend(tokenizer_metadata(dir, &config)?);
        let mut sources = Vec::new();
        let mut tensors = Vec::new();
        for (gguf, hf, permute) in tensor_names(&config) {
            let shape = weights.shape(&hf).map_err(|e| invalid(e.to_string()))?;
            tensors.push(TensorInfo {
                name: gguf,
                dims: shape.iter().rev().map(|&d| d as u64).collect(),
                kind: GgmlType::F32,
                offset: 0,
            });
            sources.push((hf, permute));
        }
        Ok(DirAsGguf {
            dir: dir.to_path_buf(),
            weights,
            metadata,
            tensors,
            sources,
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Tensor `i`'s values in GGUF order (q and k rows permuted as llama.cpp expects).
    pub fn values(&self, i: usize) -> Result<Vec<f32>, GgufError> {
        let (name, permute) = &self.sources[i];
        let (values, shape) = self
            .weights
            .read_f32(name)
            .map_err(|e| GgufError::BadTensor {
                path: self.dir.clone(),
                name: name.clone(),
                message: e.to_string(),
            })?;
        Ok(match permute {
            Some(heads) => permute_rows(&values, *heads, shape[1]),
            None => values,
        })
    }
}

/// `llama.*` and `general.*` as `convert_hf_to_gguf.py` writes them for a LLaMA model.
fn hyperparameters(dir: &Path, c: &LlamaConfig) -> Vec<(String, GgufValue)> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let u32s = [
        ("llama.block_count", c.num_hidden_layers),
        ("llama.context_length", c.max_position_embeddings),
        ("llama.embedding_length", c.hidden_size),
        ("llama.feed_forward_length", c.intermediate_size),
        ("llama.attention.head_count", c.num_attention_heads),
        ("llama.attention.head_count_kv", c.num_key_value_heads),
        ("llama.rope.dimension_count", c.head_dim),
        ("llama.attention.key_length", c.head_dim),
        ("llama.attention.value_length", c.head_dim),
        ("llama.vocab_size", c.vocab_size),
    ];
    let mut meta = vec![
        (
            "general.architecture".into(),
            GgufValue::String("llama".into()),
        ),
        ("general.name".into(), GgufValue::String(name)),
    ];
    meta.extend(u32s.map(|(k, v)| (k.to_string(), GgufValue::U32(v as u32))));
    meta.push((
        "llama.rope.freq_base".into(),
        GgufValue::F32(c.rope_theta as f32),
    ));
    let eps = GgufValue::F32(c.rms_norm_eps as f32);
    meta.push(("llama.attention.layer_norm_rms_epsilon".into(), eps));
    meta
}

/// (GGUF name, HF name, heads to permute q/k rows by) for every tensor of the model.
fn tensor_names(c: &LlamaConfig) -> Vec<(String, String, Option<usize>)> {
    let mut t = vec![(
        "token_embd.weight".to_string(),
        "model.embed_tokens.weight".to_string(),
        None,
    )];
    for l in 0..c.num_hidden_layers {
        let layer = [
            ("attn_norm", "input_layernorm", None),
            ("attn_q", "self_attn.q_proj", Some(c.num_attention_heads)),
            ("attn_k", "self_attn.k_proj", Some(c.num_key_value_heads)),
            ("attn_v", "self_attn.v_proj", None),
            ("attn_output", "self_attn.o_proj", None),
            ("ffn_norm", "post_attention_layernorm", None),
            ("ffn_gate", "mlp.gate_proj", None),
            ("ffn_up", "mlp.up_proj", None),
            ("ffn_down", "mlp.down_proj", None),
        ];
        for (gguf, hf, permute) in layer {
            let names = (
                format!("blk.{l}.{gguf}.weight"),
                format!("model.layers.{l}.{hf}.weight"),
            );
            t.push((names.0, names.1, permute));
        }
    }
    t.push((
        "output_norm.weight".into(),
        "model.norm.weight".into(),
        None,
    ));
    if !c.tie_word_embeddings {
        t.push(("output.weight".into(), "lm_head.weight".into(), None));
    }
    t
}

/// `tokenizer.ggml.*` and `tokenizer.chat_template` from `tokenizer.json` and
/// `tokenizer_config.json`.
fn tokenizer_metadata(dir: &Path, c: &LlamaConfig) -> Result<Vec<(String, GgufValue)>, GgufError> {
    let path = dir.join("tokenizer.json");
    let invalid = |message: String| GgufError::Invalid {
        path: path.clone(),
        message,
    };
    let text = std::fs::read_to_string(&path).map_err(|source| GgufError::Io {
        path: path.clone(),
        source,
    })?;
    let tok: Value = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    if tok["model"]["type"] != "BPE" {
        return Err(invalid(format!(
            "model.type {} is not byte-level BPE, the only tokenizer skipgpt writes to GGUF",
            tok["model"]["type"]
        )));
    }
    let pre = pre_name_of(&tok["pre_tokenizer"]).ok_or_else(|| {
        invalid(format!(
            "pre_tokenizer {} is not one llama.cpp names; convert with convert_hf_to_gguf.py",
            tok["pre_tokenizer"]
        ))
    })?;
    let vocab = tok["model"]["vocab"]
        .as_object()
        .ok_or_else(|| invalid("model.vocab is not a map of tokens to ids".into()))?;
    let mut tokens = vec![String::new(); vocab.len().max(c.vocab_size)];
    let mut types = vec![NORMAL; tokens.len()];
    let mut place = |token: &str, id: &Value, kind: i32| -> Result<(), GgufError> {
        let id = (id.as_u64())
            .filter(|&id| (id as usize) < tokens.len())
            .ok_or_else(|| {
                invalid(format!(
                    "token {token:?} has id {id}, outside the vocabulary"
                ))
            })?;
        tokens[id as usize] = token.to_string();
        types[id as usize] = kind;
        Ok(())
    };
    for (token, id) in vocab {
        place(token, id, NORMAL)?;
    }
    for added in tok["added_tokens"].as_array().into_iter().flatten() {
        let kind = if added["special"] == true {
            CONTROL
        } else {
            USER_DEFINED
        };
        place(added["content"].as_str().unwrap_or(""), &added["id"], kind)?;
    }
    // ids the tokenizer leaves unused (an embedding padded past the vocabulary), as
    // convert_hf_to_gguf.py fills them: distinct names, llama.cpp's UNUSED type
    for (id, token) in tokens.iter_mut().enumerate() {
        if token.is_empty() {
            *token = format!("[PAD{id}]");
            types[id] = UNUSED;
        }
    }
    let merges: Vec<GgufValue> = (tok["model"]["merges"].as_array().into_iter().flatten())
        .map(|m| match m {
            Value::Array(pair) => format!(
                "{} {}",
                pair[0].as_str().unwrap_or(""),
                pair[1].as_str().unwrap_or("")
            ),
            other => other.as_str().unwrap_or("").to_string(),
        })
        .map(GgufValue::String)
        .collect();
    let strings = |v: Vec<String>| GgufValue::Array(v.into_iter().map(GgufValue::String).collect());
    let mut meta = vec![
        (
            "tokenizer.ggml.model".to_string(),
            GgufValue::String("gpt2".into()),
        ),
        ("tokenizer.ggml.pre".into(), GgufValue::String(pre.into())),
        ("tokenizer.ggml.tokens".into(), strings(tokens.clone())),
        (
            "tokenizer.ggml.token_type".into(),
            GgufValue::Array(types.into_iter().map(GgufValue::I32).collect()),
        ),
        ("tokenizer.ggml.merges".into(), GgufValue::Array(merges)),
    ];
    let settings: Value = std::fs::read_to_string(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);
    let id_of = |key: &str| -> Option<u32> {
        let content = match &settings[key] {
            Value::String(s) => Some(s.as_str()),
            Value::Object(o) => o.get("content").and_then(Value::as_str),
            _ => None,
        }?;
        tokens.iter().position(|t| t == content).map(|i| i as u32)
    };
    let bos = id_of("bos_token").or(c.bos_token_id);
    let eos = id_of("eos_token").or(c.eos_token_ids.first().copied());
    for (key, id) in [
        ("tokenizer.ggml.bos_token_id", bos),
        ("tokenizer.ggml.eos_token_id", eos),
        ("tokenizer.ggml.unknown_token_id", id_of("unk_token")),
        ("tokenizer.ggml.padding_token_id", id_of("pad_token")),
    ] {
        if let Some(id) = id {
            meta.push((key.into(), GgufValue::U32(id)));
        }
    }
    if let Some(add) = settings["add_bos_token"].as_bool() {
        meta.push(("tokenizer.ggml.add_bos_token".into(), GgufValue::Bool(add)));
    }
    if let Some(template) = settings["chat_template"].as_str() {
        let template = GgufValue::String(template.into());
        meta.push(("tokenizer.chat_template".into(), template));
    }
    Ok(meta)
}
