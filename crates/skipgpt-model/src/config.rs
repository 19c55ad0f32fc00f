//! Model configuration, and how it is read from (and written to) a Hugging Face `config.json`.
//!
//! Two layouts are accepted:
//! - transformers 4.x: `rope_theta` and `rope_scaling` at the top level, `torch_dtype`;
//! - transformers 5.x: `rope_parameters` (holding `rope_theta` and the scaling) and `dtype`.
//!
//! Only `llama`, `mistral` and `qwen2` checkpoints are accepted: they share the LLaMA block
//! (RMSNorm, RoPE, grouped-query attention, SwiGLU MLP) and differ in biases and defaults.

use std::path::Path;

use burn::config::Config;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{ModelError, Result};

/// How rotary position frequencies are rescaled for contexts longer than the pretraining one.
/// Mirrors `rope_type` in transformers' `ROPE_INIT_FUNCTIONS`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Plain RoPE.
    #[default]
    Default,
    /// Position interpolation: every frequency divided by `factor`.
    Linear { factor: f64 },
    /// Dynamic NTK: the base grows with the sequence length once it exceeds
    /// `max_position_embeddings`.
    Dynamic { factor: f64 },
    /// LLaMA 3.1: low frequencies divided by `factor`, high ones kept, a smooth ramp between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

/// The architecture of a LLaMA-family decoder.
#[derive(Config, Debug, PartialEq)]
pub struct LlamaConfig {
    /// `llama`, `mistral` or `qwen2`: recorded so a saved checkpoint keeps its identity.
    #[config(default = "\"llama\".to_string()")]
    pub model_type: String,
    /// Number of token ids.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP's inner layer.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (grouped-query attention when smaller than the query heads).
    pub num_key_value_heads: usize,
    /// Width of one attention head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    #[config(default = 1e-5)]
    pub rms_norm_eps: f64,
    /// RoPE base.
    #[config(default = 10000.0)]
    pub rope_theta: f64,
    /// RoPE frequency rescaling.
    #[config(default = "RopeScaling::Default")]
    pub rope_scaling: RopeScaling,
    /// Context length the model was trained for.
    #[config(default = 2048)]
    pub max_position_embeddings: usize,
    /// Bias on the q, k and v projections (Qwen2, or LLaMA's `attention_bias`).
    #[config(default = false)]
    pub qkv_bias: bool,
    /// Bias on the output projection (LLaMA's `attention_bias`; Qwen2 has none).
    #[config(default = false)]
    pub o_bias: bool,
    /// Bias on the MLP projections (LLaMA's `mlp_bias`).
    #[config(default = false)]
    pub mlp_bias: bool,
    /// Output head shares the embedding matrix.
    #[config(default = false)]
    pub tie_word_embeddings: bool,
    /// Mistral-style sliding-window attention: a token sees at most this many positions.
    #[config(default = "None")]
    pub sliding_window: Option<usize>,
    #[config(default = "None")]
    pub bos_token_id: Option<u32>,
    /// Generation stops at any of these.
    #[config(default = "Vec::new()")]
    pub eos_token_ids: Vec<u32>,
    /// The dtype the weights were stored in (`float32`, `bfloat16`, `float16`).
    #[config(default = "\"float32\".to_string()")]
    pub dtype: String,
}

const SUPPORTED: [&str; 3] = ["llama", "mistral", "qwen2"];

impl LlamaConfig {
    /// A tiny configuration used by the CPU demo and the tests.
    pub fn tiny(vocab_size: usize) -> Self {
        LlamaConfig::new(vocab_size, 64, 176, 3, 4, 2, 16)
    }

    /// Query heads that share one key/value head.
    pub fn kv_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Reads `DIR/config.json` (or the given file).
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_hf_json(&text, path)
    }

    /// Parses the text of a HF `config.json`; `path` is only used in error messages. Each key
    /// is checked by its own method of [`HfKeys`], whose error names the key at fault.
    pub fn from_hf_json(text: &str, path: &Path) -> Result<Self> {
        let file: HfConfigFile = crate::error::from_json_text(text, path)?;
        let keys = HfKeys { file: &file, path };
        let model_type = keys.model_type()?;
        let hidden_size = keys.positive_int("hidden_size", file.hidden_size)?;
        let (num_attention_heads, num_key_value_heads, head_dim) = keys.heads(hidden_size)?;
        keys.activation()?;
        let (rope_theta, rope_scaling) = keys.rope()?;
        let (qkv_bias, o_bias) = keys.attention_biases(&model_type);
        Ok(LlamaConfig {
            vocab_size: keys.positive_int("vocab_size", file.vocab_size)?,
            hidden_size,
            intermediate_size: keys.positive_int("intermediate_size", file.intermediate_size)?,
            num_hidden_layers: keys.positive_int("num_hidden_layers", file.num_hidden_layers)?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: keys
                .positive_number("rms_norm_eps", file.rms_norm_eps.unwrap_or(1e-6))?,
            rope_theta,
            rope_scaling,
            max_position_embeddings: keys.max_position_embeddings()?,
            qkv_bias,
            o_bias,
            mlp_bias: file.mlp_bias.unwrap_or(false),
            tie_word_embeddings: file.tie_word_embeddings.unwrap_or(false),
            sliding_window: keys.sliding_window(&model_type),
            bos_token_id: file.bos_token_id,
            eos_token_ids: keys.eos_token_ids(),
            dtype: keys.dtype(),
            model_type,
        })
    }

    /// The config as a transformers 4.x `config.json` (the layout every version still reads).
    pub fn to_hf_json(&self) -> Value {
        let arch = match self.model_type.as_str() {
            "mistral" => "MistralForCausalLM",
            "qwen2" => "Qwen2ForCausalLM",
            _ => "LlamaForCausalLM",
        };
        let rope_scaling = match &self.rope_scaling {
            RopeScaling::Default => Value::Null,
            other => serde_json::to_value(other).expect("rope scaling serialises"),
        };
        let eos = match self.eos_token_ids.as_slice() {
            [] => Value::Null,
            [one] => (*one).into(),
            many => many.to_vec().into(),
        };
        serde_json::json!({
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": self.qkv_bias,
            "mlp_bias": self.mlp_bias,
            "tie_word_embeddings": self.tie_word_embeddings,
            "sliding_window": self.sliding_window,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "torch_dtype": self.dtype,
        })
    }

    /// Whether the token at position `query` attends to the one at `key`: causal, and within
    /// the sliding window when the model has one. The gated forward and the sparse engine
    /// both mask with this.
    pub fn sees(&self, query: usize, key: usize) -> bool {
        key <= query && self.sliding_window.is_none_or(|w| query - key < w)
    }

    /// Parameters of one attention module (q, k, v, o projections and their biases): what a
    /// token that skips attention does not use.
    pub fn attention_params(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        h * q
            + 2 * h * kv
            + q * h
            + if self.qkv_bias { q + 2 * kv } else { 0 }
            + if self.o_bias { h } else { 0 }
    }

    /// Parameters of one MLP module (gate, up, down projections and their biases).
    pub fn mlp_params(&self) -> usize {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        3 * h * i + if self.mlp_bias { 2 * i + h } else { 0 }
    }

    /// Number of parameters of the dense model.
    pub fn num_params(&self) -> usize {
        let (h, v) = (self.hidden_size, self.vocab_size);
        let layer = self.attention_params() + self.mlp_params() + 2 * h;
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + self.num_hidden_layers * layer + h + head
    }
}

/// The keys of a HF `config.json` this project reads (every other key is ignored). serde checks
/// their types, and an error names the key's path; presence, ranges and the relations between
/// keys are checked in [`LlamaConfig::from_hf_json`].
#[derive(Deserialize)]
struct HfConfigFile {
    model_type: Option<String>,
    vocab_size: Option<u64>,
    hidden_size: Option<u64>,
    intermediate_size: Option<u64>,
    num_hidden_layers: Option<u64>,
    num_attention_heads: Option<u64>,
    num_key_value_heads: Option<u64>,
    head_dim: Option<u64>,
    hidden_act: Option<String>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    /// Checked by [`parse_rope_scaling`], which names the sub-key at fault.
    rope_scaling: Option<Value>,
    /// transformers 5.x: theta and the scaling together.
    rope_parameters: Option<Value>,
    max_position_embeddings: Option<u64>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    tie_word_embeddings: Option<bool>,
    sliding_window: Option<u64>,
    use_sliding_window: Option<bool>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<EosTokenIds>,
    dtype: Option<String>,
    torch_dtype: Option<String>,
}

/// `eos_token_id`: one id or a list of them.
#[derive(Deserialize)]
#[serde(untagged, expecting = "an integer or a list of integers")]
enum EosTokenIds {
    One(u32),
    Many(Vec<u32>),
}

/// The keys of a `config.json`, each read and checked on its own; errors name the file and key.
struct HfKeys<'a> {
    file: &'a HfConfigFile,
    path: &'a Path,
}

impl HfKeys<'_> {
    fn error(&self, message: String) -> ModelError {
        ModelError::Config {
            path: self.path.to_path_buf(),
            message,
        }
    }

    /// `model_type`, one this crate runs.
    fn model_type(&self) -> Result<String> {
        let Some(model_type) = self.file.model_type.clone() else {
            return Err(self.error("missing key `model_type` (a string)".into()));
        };
        if !SUPPORTED.contains(&model_type.as_str()) {
            return Err(ModelError::UnsupportedArchitecture {
                path: self.path.to_path_buf(),
                model_type,
            });
        }
        Ok(model_type)
    }

    /// A required key holding a positive integer.
    fn positive_int(&self, key: &str, v: Option<u64>) -> Result<usize> {
        match v {
            None => Err(self.error(format!("missing required key `{key}` (a positive integer)"))),
            Some(0) => Err(self.error(format!("key `{key}` must be a positive integer, got 0"))),
            Some(n) => Ok(n as usize),
        }
    }

    /// A number JSON allows but the model cannot use (zero, negative) would give NaN or empty
    /// output: refused.
    fn positive_number(&self, key: &str, v: f64) -> Result<f64> {
        if v.is_finite() && v > 0.0 {
            Ok(v)
        } else {
            Err(self.error(format!("`{key}` must be a positive number, got {v}")))
        }
    }

    /// (`num_attention_heads`, `num_key_value_heads`, `head_dim`): the key/value heads divide
    /// the query heads, and the head size (given, or the hidden size over the heads) is even
    /// for RoPE.
    fn heads(&self, hidden_size: usize) -> Result<(usize, usize, usize)> {
        let file = self.file;
        let heads = self.positive_int("num_attention_heads", file.num_attention_heads)?;
        let kv_heads = file.num_key_value_heads.map_or(heads, |n| n as usize);
        if kv_heads == 0 || heads % kv_heads != 0 {
            return Err(self.error(format!(
                "`num_attention_heads` ({heads}) must be a multiple of `num_key_value_heads` ({kv_heads})"
            )));
        }
        let head_dim = match file.head_dim {
            Some(d) => d as usize,
            None if !hidden_size.is_multiple_of(heads) => {
                return Err(self.error(format!(
                    "`hidden_size` ({hidden_size}) is not divisible by `num_attention_heads` ({heads}) and no `head_dim` is given"
                )))
            }
            None => hidden_size / heads,
        };
        if head_dim % 2 != 0 {
            return Err(self.error(format!("`head_dim` must be even for RoPE, got {head_dim}")));
        }
        if head_dim == 0 {
            return Err(self.error("`head_dim` must be a positive integer, got 0".into()));
        }
        Ok((heads, kv_heads, head_dim))
    }

    /// `hidden_act`: SwiGLU's SiLU only.
    fn activation(&self) -> Result<()> {
        match &self.file.hidden_act {
            Some(act) if act != "silu" => Err(ModelError::Unsupported {
                path: self.path.to_path_buf(),
                key: "hidden_act".into(),
                value: act.clone(),
                expected: "only \"silu\" (SwiGLU) is supported".into(),
            }),
            _ => Ok(()),
        }
    }

    /// RoPE's theta and scaling: transformers 5.x nests both in `rope_parameters`, 4.x keeps
    /// them on top.
    fn rope(&self) -> Result<(f64, RopeScaling)> {
        let file = self.file;
        let params = file.rope_parameters.as_ref().filter(|v| !v.is_null());
        let theta = match params.and_then(|p| p.get("rope_theta")) {
            Some(v) => v.as_f64().ok_or_else(|| {
                self.error(format!(
                    "`rope_parameters.rope_theta` must be a number, got {v}"
                ))
            })?,
            None => file.rope_theta.unwrap_or(10000.0),
        };
        let (scaling_key, scaling) = match params {
            Some(p) => ("rope_parameters", Some(p)),
            None => (
                "rope_scaling",
                file.rope_scaling.as_ref().filter(|v| !v.is_null()),
            ),
        };
        let scaling = match scaling {
            None => RopeScaling::Default,
            Some(v) => parse_rope_scaling(v, scaling_key, self.path)?,
        };
        Ok((self.positive_number("rope_theta", theta)?, scaling))
    }

    /// (q/k/v bias, output bias): Qwen2 always biases q, k and v and never the output.
    fn attention_biases(&self, model_type: &str) -> (bool, bool) {
        let bias = self.file.attention_bias.unwrap_or(false);
        if model_type == "qwen2" {
            (true, false)
        } else {
            (bias, bias)
        }
    }

    /// Mistral's window; Qwen2 configs carry one that applies only with `use_sliding_window`.
    fn sliding_window(&self, model_type: &str) -> Option<usize> {
        let file = self.file;
        let window = file.sliding_window.map(|n| n as usize);
        match model_type {
            "mistral" => window,
            "qwen2" if file.use_sliding_window.unwrap_or(false) => window,
            _ => None,
        }
    }

    fn max_position_embeddings(&self) -> Result<usize> {
        match self.file.max_position_embeddings {
            Some(0) => {
                Err(self
                    .error("`max_position_embeddings` must be a positive integer, got 0".into()))
            }
            other => Ok(other.map_or(2048, |n| n as usize)),
        }
    }

    /// `eos_token_id`: none, one or several.
    fn eos_token_ids(&self) -> Vec<u32> {
        match &self.file.eos_token_id {
            None => Vec::new(),
            Some(EosTokenIds::One(id)) => vec![*id],
            Some(EosTokenIds::Many(ids)) => ids.clone(),
        }
    }

    /// `dtype` (5.x) or `torch_dtype` (4.x), f32 when neither is given.
    fn dtype(&self) -> String {
        let file = self.file;
        file.dtype
            .clone()
            .or_else(|| file.torch_dtype.clone())
            .unwrap_or_else(|| "float32".into())
    }
}

fn parse_rope_scaling(v: &Value, key: &str, path: &Path) -> Result<RopeScaling> {
    let unsupported = |value: String, expected: &str| ModelError::Unsupported {
        path: path.to_path_buf(),
        key: key.to_string(),
        value,
        expected: expected.to_string(),
    };
    // 4.x wrote `type`, later versions `rope_type`.
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |field: &str| -> Result<f64> {
        v.get(field)
            .and_then(Value::as_f64)
            .filter(|x| x.is_finite() && *x > 0.0)
            .ok_or_else(|| ModelError::Config {
                path: path.to_path_buf(),
                message: format!(
                    "`{key}.{field}` is required for rope type {kind:?} (a positive number), got {}",
                    v.get(field).map_or("nothing".into(), Value::to_string)
                ),
            })
    };
    Ok(match kind {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear {
            factor: num("factor")?,
        },
        "dynamic" => RopeScaling::Dynamic {
            factor: num("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
        },
        other => {
            return Err(unsupported(
                format!("{other:?}"),
                "rope type must be default, linear, dynamic or llama3",
            ))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<LlamaConfig> {
        LlamaConfig::from_hf_json(text, Path::new("config.json"))
    }

    const BASE: &str = r#"{"model_type":"llama","vocab_size":32,"hidden_size":16,
        "intermediate_size":24,"num_hidden_layers":2,"num_attention_heads":4"#;

    #[test]
    fn defaults_follow_transformers() {
        let c = parse(&format!("{BASE}}}")).unwrap();
        assert_eq!(c.num_key_value_heads, 4);
        assert_eq!(c.head_dim, 4);
        assert_eq!(c.rope_theta, 10000.0);
        assert_eq!(c.rope_scaling, RopeScaling::Default);
        assert!(!c.tie_word_embeddings);
    }

    #[test]
    fn v4_and_v5_layouts_agree() {
        let v4 = parse(&format!(
            r#"{BASE},"rope_theta":500000.0,"rope_scaling":{{"rope_type":"llama3","factor":8.0,
            "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}},
            "torch_dtype":"bfloat16"}}"#
        ))
        .unwrap();
        let v5 = parse(&format!(
            r#"{BASE},"rope_parameters":{{"rope_type":"llama3","rope_theta":500000.0,"factor":8.0,
            "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}},
            "dtype":"bfloat16"}}"#
        ))
        .unwrap();
        assert_eq!(v4, v5);
        assert_eq!(v4.rope_theta, 500000.0);
        assert_eq!(v4.dtype, "bfloat16");
        assert!(matches!(v4.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
    }

    #[test]
    fn old_type_key_is_read() {
        let c = parse(&format!(
            r#"{BASE},"rope_scaling":{{"type":"linear","factor":2.0}}}}"#
        ))
        .unwrap();
        assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 2.0 });
    }

    #[test]
    fn qwen2_has_qkv_bias_only() {
        let c = parse(&format!("{}}}", BASE.replace("llama", "qwen2"))).unwrap();
        assert!(c.qkv_bias && !c.o_bias);
    }

    #[test]
    fn missing_and_bad_keys_are_named() {
        let err = parse(r#"{"model_type":"llama","vocab_size":32}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("hidden_size"), "{err}");
        let err = parse(&format!(
            r#"{BASE},"rope_scaling":{{"rope_type":"yarn","factor":2.0}}}}"#
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("yarn") && err.contains("rope_scaling"),
            "{err}"
        );
        // wrong types, named by their key
        let err = parse(&format!(r#"{BASE},"rms_norm_eps":"small"}}"#))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`rms_norm_eps`") && err.contains("invalid type"),
            "{err}"
        );
        let err = parse(&format!(r#"{BASE},"eos_token_id":"</s>"}}"#))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`eos_token_id`") && err.contains("list of integers"),
            "{err}"
        );
        let c = parse(&format!(
            r#"{BASE},"eos_token_id":[1,2],"bos_token_id":null}}"#
        ))
        .unwrap();
        assert_eq!(c.eos_token_ids, vec![1, 2]);
        let err = parse(&format!("{}}}", BASE.replace("llama", "gpt2"))).unwrap_err();
        assert!(
            matches!(err, ModelError::UnsupportedArchitecture { ref model_type, .. } if model_type == "gpt2")
        );
        assert!(err.to_string().contains("unsupported architecture"));
    }

    #[test]
    fn json_round_trip() {
        let mut c = LlamaConfig::tiny(512);
        c.rope_scaling = RopeScaling::Dynamic { factor: 2.0 };
        c.eos_token_ids = vec![1, 2];
        let text = c.to_hf_json().to_string();
        assert_eq!(parse(&text).unwrap(), c);
    }

    #[test]
    fn param_count_matches_fixture() {
        // reference.json: "params": 204224 for the llama-tiny fixture.
        let c = LlamaConfig::tiny(512);
        assert_eq!(c.num_params(), 204224);
    }
}
