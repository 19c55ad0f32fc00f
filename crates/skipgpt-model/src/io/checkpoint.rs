//! A model directory in the Hugging Face layout: `config.json`, `model.safetensors` (or shards
//! with `model.safetensors.index.json`) and `tokenizer.json`.
//!
//! A SkipGPT model directory adds `routers.safetensors` (router weights, f32, named
//! `model.layers.{i}.attn_router.*` / `.mlp_router.*`) and `skipgpt.json` (the
//! [`RoutingConfig`]). Without `skipgpt.json`, routers are read with the default config.

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::io::atomic_write::atomic_write;
use crate::io::safetensors_io::{write_safetensors, StoreDtype, WeightSet};
use crate::llama::LlamaForCausalLM;
use crate::router::RoutingConfig;
use crate::tokenizer::Tokenizer;

/// A model loaded from a directory, with its tokenizer when the directory has one.
pub struct Pretrained<B: Backend> {
    pub model: LlamaForCausalLM<B>,
    pub tokenizer: Option<Tokenizer>,
    pub dir: PathBuf,
    /// Tensors of the checkpoint that the model does not use (a caller should warn of them).
    pub unused_tensors: Vec<String>,
}

/// Checks the weights' names against the config: a layer the config does not have is an error
/// (a config that says fewer layers than the weights hold would silently drop some); other
/// tensors the model does not read are returned, sorted.
fn unused_tensors(config: &LlamaConfig, weights: &WeightSet, dir: &Path) -> Result<Vec<String>> {
    let n = config.num_hidden_layers;
    let mut unused = Vec::new();
    for name in weights.names() {
        if let Some(rest) = name.strip_prefix("model.layers.") {
            let layer = rest.split('.').next().and_then(|i| i.parse::<usize>().ok());
            if let Some(i) = layer.filter(|&i| i >= n) {
                return Err(ModelError::Config {
                    path: dir.join("config.json"),
                    message: format!(
                        "`num_hidden_layers` is {n}, but the weights hold layer {i} (tensor `{name}`)"
                    ),
                });
            }
            if layer.is_some() && known_layer_tensor(rest.split_once('.').map_or("", |p| p.1)) {
                continue;
            }
        }
        let top = [
            "model.embed_tokens.weight",
            "model.norm.weight",
            "lm_head.weight",
        ];
        if top.contains(&name) && !(name == "lm_head.weight" && config.tie_word_embeddings) {
            continue;
        }
        unused.push(name.to_string());
    }
    unused.sort();
    Ok(unused)
}

/// Checks, without reading any weight, that the config describes the weights: the shapes of
/// the embedding and of every layer's projections and norms, and no layer beyond the config's.
/// A config that contradicts its weights is an error naming the tensor and both shapes.
pub fn check_config_against_weights(dir: &Path) -> Result<LlamaConfig> {
    let c = load_config(dir)?;
    let w = WeightSet::open_dir(dir)?;
    unused_tensors(&c, &w, dir)?;
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let (q, kv) = (
        c.num_attention_heads * c.head_dim,
        c.num_key_value_heads * c.head_dim,
    );
    let mut expected: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![c.vocab_size, h]),
        ("model.norm.weight".into(), vec![h]),
    ];
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        for (name, shape) in [
            ("self_attn.q_proj.weight", vec![q, h]),
            ("self_attn.k_proj.weight", vec![kv, h]),
            ("self_attn.v_proj.weight", vec![kv, h]),
            ("self_attn.o_proj.weight", vec![h, q]),
            ("mlp.gate_proj.weight", vec![i, h]),
            ("mlp.up_proj.weight", vec![i, h]),
            ("mlp.down_proj.weight", vec![h, i]),
            ("input_layernorm.weight", vec![h]),
            ("post_attention_layernorm.weight", vec![h]),
        ] {
            expected.push((format!("{p}.{name}"), shape));
        }
    }
    if !c.tie_word_embeddings {
        expected.push(("lm_head.weight".into(), vec![c.vocab_size, h]));
    }
    for (name, shape) in expected {
        let found = w.shape(&name)?;
        if found != shape {
            return Err(ModelError::Config {
                path: dir.join("config.json"),
                message: format!(
                    "does not describe the weights: tensor `{name}` has shape {found:?}, the config implies {shape:?}"
                ),
            });
        }
    }
    Ok(c)
}

/// A tensor of one decoder layer that [`LlamaForCausalLM::load`] reads (biases included: the
/// config decides which are present, and a missing one is an error there).
fn known_layer_tensor(name: &str) -> bool {
    let projections = [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ];
    matches!(
        name,
        "input_layernorm.weight" | "post_attention_layernorm.weight"
    ) || projections
        .iter()
        .any(|p| name == format!("{p}.weight") || name == format!("{p}.bias"))
}

fn check_dir(dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        return Err(ModelError::MissingFile {
            path: dir.to_path_buf(),
            what: "model directory not found (expected a folder with config.json and model.safetensors)",
        });
    }
    Ok(())
}

/// Reads `DIR/config.json`.
pub fn load_config(dir: &Path) -> Result<LlamaConfig> {
    check_dir(dir)?;
    LlamaConfig::from_hf_file(&dir.join("config.json"))
}

/// Loads config, weights and (if present) tokenizer from a HF model directory.
pub fn load_pretrained<B: Backend>(dir: &Path, device: &B::Device) -> Result<Pretrained<B>> {
    load_pretrained_as(dir, device, StoreDtype::F32)
}

/// [`load_pretrained`] with the projection and embedding matrices held in `dtype` whatever the
/// file stores (see [`crate::precision`]); routers, norms and biases stay f32. `dir` may also
/// be a GGUF file, run as it is ([`crate::io::gguf::load_gguf`]).
pub fn load_pretrained_as<B: Backend>(
    dir: &Path,
    device: &B::Device,
    dtype: StoreDtype,
) -> Result<Pretrained<B>> {
    if crate::io::gguf::is_gguf(dir) {
        return crate::io::gguf::load_gguf(dir, device, dtype);
    }
    crate::precision::check_supported::<B>(dtype, device)?;
    let config = load_config(dir)?;
    let weights = WeightSet::open_dir(dir)?.with_matrix_dtype(dtype);
    let unused_tensors = unused_tensors(&config, &weights, dir)?;
    let mut model = LlamaForCausalLM::load(&config, &weights, device)?;
    if let Some(routing) = load_routing_config(dir)? {
        let routers = WeightSet::open_files(&[dir.join(ROUTERS_FILE)])?;
        model = model.load_routers(routing, &routers)?;
    }
    let tok_path = dir.join("tokenizer.json");
    let tokenizer = if tok_path.exists() {
        Some(Tokenizer::from_file(&tok_path)?)
    } else {
        None
    };
    if let Some(tok) = &tokenizer {
        if tok.vocab_size() > config.vocab_size {
            return Err(ModelError::Config {
                path: tok_path,
                message: format!(
                    "the tokenizer has {} tokens but config.json's vocab_size is {}",
                    tok.vocab_size(),
                    config.vocab_size
                ),
            });
        }
    }
    Ok(Pretrained {
        model,
        tokenizer,
        dir: dir.to_path_buf(),
        unused_tensors,
    })
}

/// Router weights of a SkipGPT model directory.
pub const ROUTERS_FILE: &str = "routers.safetensors";
/// Routing configuration of a SkipGPT model directory.
pub const ROUTING_FILE: &str = "skipgpt.json";

/// The routing configuration of a SkipGPT model directory: `None` for a dense one, the
/// defaults when `routers.safetensors` comes without `skipgpt.json`, and an error for a
/// `skipgpt.json` without routers.
pub fn load_routing_config(dir: &Path) -> Result<Option<RoutingConfig>> {
    let routers = dir.join(ROUTERS_FILE);
    let routing_json = dir.join(ROUTING_FILE);
    match (routers.exists(), routing_json.exists()) {
        (true, true) => RoutingConfig::from_file(&routing_json).map(Some),
        (true, false) => Ok(Some(RoutingConfig::new())),
        (false, true) => Err(ModelError::MissingFile {
            path: routers,
            what: "not found, but skipgpt.json says this is a SkipGPT model",
        }),
        (false, false) => Ok(None),
    }
}

/// Attaches the routers of `dir` (`skipgpt.json` and `routers.safetensors`, as published under
/// `models/`) to `model`, a directory's or a GGUF's, replacing any it has. Routers made for
/// another model are refused ([`LlamaForCausalLM::load_routers`]).
pub fn attach_routers<B: Backend>(
    model: LlamaForCausalLM<B>,
    dir: &Path,
) -> Result<LlamaForCausalLM<B>> {
    if !dir.is_dir() {
        return Err(ModelError::MissingFile {
            path: dir.to_path_buf(),
            what: "routers directory not found (expected a folder with skipgpt.json and routers.safetensors)",
        });
    }
    let Some(routing) = load_routing_config(dir)? else {
        return Err(ModelError::MissingFile {
            path: dir.join(ROUTERS_FILE),
            what: "not found: a routers directory holds routers.safetensors and skipgpt.json",
        });
    };
    let routers = WeightSet::open_files(&[dir.join(ROUTERS_FILE)])?;
    model.load_routers(routing, &routers)
}

/// Writes only the routers and `skipgpt.json` of a routed model into `dir`.
pub fn save_routers<B: Backend>(model: &LlamaForCausalLM<B>, dir: &Path) -> Result<()> {
    let Some(routing) = &model.routing_config else {
        return Err(ModelError::InvalidInput(
            "the model has no routers to save".into(),
        ));
    };
    write_safetensors(&dir.join(ROUTERS_FILE), &model.export_routers(), None)?;
    atomic_write(&dir.join(ROUTING_FILE), routing.to_json().as_bytes())
}

/// Writes a HF model directory (single `model.safetensors`), each file atomically; a routed
/// model also gets `routers.safetensors` and `skipgpt.json`.
pub fn save_pretrained<B: Backend>(
    model: &LlamaForCausalLM<B>,
    tokenizer: Option<&Tokenizer>,
    dir: &Path,
    dtype: StoreDtype,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let mut config = model.config.clone();
    config.dtype = dtype.hf_name().to_string();
    let json = serde_json::to_string_pretty(&config.to_hf_json()).expect("config serialises");
    let metadata = [("format".to_string(), "pt".to_string())]
        .into_iter()
        .collect();
    write_safetensors(
        &dir.join("model.safetensors"),
        &model.export(dtype),
        Some(metadata),
    )?;
    if let Some(tok) = tokenizer {
        tok.save(&dir.join("tokenizer.json"))?;
    }
    if model.routing_config.is_some() {
        save_routers(model, dir)?;
    }
    // config last: a directory with a config is a complete checkpoint
    atomic_write(&dir.join("config.json"), json.as_bytes())
}
