//! A LLaMA GGUF file → a Hugging Face model directory that every command (and transformers)
//! loads: `config.json`, `model.safetensors`, `tokenizer.json`, `tokenizer_config.json`.
//!
//! The weights are streamed: the safetensors header is written from the tensor infos alone,
//! then each tensor is dequantized, un-permuted, converted and appended, so memory holds one
//! tensor at a time. Every file is written under a temporary name and renamed into place.
//!
//! llama.cpp's converter reorders the rows of `q_proj` and `k_proj` within each head (from
//! HF's "first half, second half" rotary layout to interleaved pairs); [`unpermute_rows`] undoes
//! that, as transformers does when it loads a GGUF.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde_json::{json, Value};

use super::config::llama_config;
use super::reader::{GgufFile, TensorInfo};
use super::tokenizer::{tokenizer_config, tokenizer_from_gguf};
use super::GgufError;
use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::io::atomic_write::atomic_write;
use crate::io::safetensors_io::{OwnedTensor, StoreDtype};

/// How to import.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// The dtype of `model.safetensors`.
    pub dtype: StoreDtype,
    /// Replace the model files of an existing directory.
    pub overwrite: bool,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            dtype: StoreDtype::F32,
            overwrite: false,
        }
    }
}

/// What an import did.
#[derive(Debug, Clone)]
pub struct ImportReport {
    pub config: LlamaConfig,
    pub tensors: usize,
    /// Tensor count per GGUF type, e.g. `{"Q4_1": 210, "F32": 61, "Q8_0": 1}`.
    pub source_types: BTreeMap<String, usize>,
    /// GGUF tensors that have no place in the HF model (named, so a user can tell).
    pub ignored: Vec<String>,
    pub bytes_written: u64,
    pub files: Vec<PathBuf>,
}

/// One output tensor: where it comes from and what it must look like.
pub(super) struct Planned<'a> {
    pub(super) hf_name: String,
    pub(super) source: &'a TensorInfo,
    pub(super) shape: Vec<usize>,
    /// Row permutation to undo: the number of heads of a q or k projection.
    pub(super) unpermute_heads: Option<usize>,
}

/// Imports `gguf_path` into `out` (created if needed). `progress(done, total, tensor)` is called
/// after each tensor with the source bytes handled so far.
pub fn import_gguf(
    gguf_path: &Path,
    out: &Path,
    opts: &ImportOptions,
    progress: &mut dyn FnMut(u64, u64, &str),
) -> Result<ImportReport> {
    let gguf = GgufFile::open(gguf_path)?;
    let config = llama_config(&gguf, opts.dtype)?;
    let (plan, ignored) = plan_tensors(&gguf, &config)?;
    let (tokenizer, special) = tokenizer_from_gguf(&gguf)?;

    if !opts.overwrite {
        for name in [
            "config.json",
            "model.safetensors",
            "model.safetensors.index.json",
        ] {
            let p = out.join(name);
            if p.exists() {
                return Err(ModelError::InvalidInput(format!(
                    "{} already exists: import into a new directory, or pass --overwrite to replace its model files",
                    p.display()
                )));
            }
        }
    }
    std::fs::create_dir_all(out).map_err(|e| ModelError::io(out, e))?;

    let weights = out.join("model.safetensors");
    let bytes_written = write_streamed(&gguf, &plan, &weights, opts.dtype, progress)?;

    // the tokenizer must parse with the library every command loads it with
    let text = serde_json::to_string(&tokenizer).expect("tokenizer JSON serialises");
    tokenizers::Tokenizer::from_str(&text).map_err(|e| ModelError::Tokenizer {
        path: gguf_path.to_path_buf(),
        message: format!("the tokenizer rebuilt from tokenizer.ggml.* does not load: {e}"),
    })?;
    let files = [
        ("tokenizer.json", text),
        (
            "tokenizer_config.json",
            pretty(&tokenizer_config(&special, config.max_position_embeddings)),
        ),
        (
            "generation_config.json",
            pretty(&generation_config(&config)),
        ),
        // last: a directory with a config.json is a model; it appears once the rest is there
        ("config.json", pretty(&config.to_hf_json())),
    ];
    for (name, text) in &files {
        atomic_write(&out.join(name), text.as_bytes())?;
    }
    let mut source_types = BTreeMap::new();
    for p in &plan {
        *source_types
            .entry(p.source.kind.name().to_string())
            .or_insert(0) += 1;
    }
    Ok(ImportReport {
        tensors: plan.len(),
        source_types,
        ignored,
        bytes_written,
        files: std::iter::once(weights)
            .chain(files.iter().map(|(n, _)| out.join(n)))
            .collect(),
        config,
    })
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).expect("JSON serialises") + "\n"
}

fn generation_config(c: &LlamaConfig) -> Value {
    let eos = match c.eos_token_ids.as_slice() {
        [one] => json!(one),
        many => json!(many),
    };
    json!({"bos_token_id": c.bos_token_id, "eos_token_id": eos})
}

/// A tensor the HF model has: its GGUF source name and what it must look like.
struct Spec {
    gguf: String,
    hf: String,
    shape: Vec<usize>,
    unpermute_heads: Option<usize>,
    /// The config says the model has it (a bias is optional, the projections are not).
    present: bool,
}

/// A dimension of a decoder layer's tensors.
#[derive(Clone, Copy)]
enum Dim {
    Hidden,
    /// Query heads × head size.
    Q,
    /// Key/value heads × head size.
    Kv,
    Intermediate,
}

/// Whose heads a tensor's rows are permuted within (llama.cpp's rotary layout).
#[derive(Clone, Copy)]
enum Heads {
    None,
    Query,
    KeyValue,
}

/// When the config says a tensor is there.
#[derive(Clone, Copy)]
enum Present {
    Always,
    QkvBias,
    OutputBias,
    MlpBias,
}

/// Every tensor of a decoder layer: GGUF name, HF name (after `blk.{l}.` and
/// `model.layers.{l}.`), shape, permuted heads, presence.
const LAYER_TENSORS: [(&str, &str, &[Dim], Heads, Present); 16] = {
    use Dim::*;
    use Present::*;
    [
        (
            "attn_norm.weight",
            "input_layernorm.weight",
            &[Hidden],
            Heads::None,
            Always,
        ),
        (
            "attn_q.weight",
            "self_attn.q_proj.weight",
            &[Q, Hidden],
            Heads::Query,
            Always,
        ),
        (
            "attn_k.weight",
            "self_attn.k_proj.weight",
            &[Kv, Hidden],
            Heads::KeyValue,
            Always,
        ),
        (
            "attn_v.weight",
            "self_attn.v_proj.weight",
            &[Kv, Hidden],
            Heads::None,
            Always,
        ),
        (
            "attn_output.weight",
            "self_attn.o_proj.weight",
            &[Hidden, Q],
            Heads::None,
            Always,
        ),
        (
            "ffn_norm.weight",
            "post_attention_layernorm.weight",
            &[Hidden],
            Heads::None,
            Always,
        ),
        (
            "ffn_gate.weight",
            "mlp.gate_proj.weight",
            &[Intermediate, Hidden],
            Heads::None,
            Always,
        ),
        (
            "ffn_up.weight",
            "mlp.up_proj.weight",
            &[Intermediate, Hidden],
            Heads::None,
            Always,
        ),
        (
            "ffn_down.weight",
            "mlp.down_proj.weight",
            &[Hidden, Intermediate],
            Heads::None,
            Always,
        ),
        (
            "attn_q.bias",
            "self_attn.q_proj.bias",
            &[Q],
            Heads::Query,
            QkvBias,
        ),
        (
            "attn_k.bias",
            "self_attn.k_proj.bias",
            &[Kv],
            Heads::KeyValue,
            QkvBias,
        ),
        (
            "attn_v.bias",
            "self_attn.v_proj.bias",
            &[Kv],
            Heads::None,
            QkvBias,
        ),
        (
            "attn_output.bias",
            "self_attn.o_proj.bias",
            &[Hidden],
            Heads::None,
            OutputBias,
        ),
        (
            "ffn_gate.bias",
            "mlp.gate_proj.bias",
            &[Intermediate],
            Heads::None,
            MlpBias,
        ),
        (
            "ffn_up.bias",
            "mlp.up_proj.bias",
            &[Intermediate],
            Heads::None,
            MlpBias,
        ),
        (
            "ffn_down.bias",
            "mlp.down_proj.bias",
            &[Hidden],
            Heads::None,
            MlpBias,
        ),
    ]
};

/// Every tensor of a LLaMA model with `c`'s shape, under its GGUF and its HF name.
fn llama_specs(c: &LlamaConfig) -> Vec<Spec> {
    let size = |d: &Dim| match d {
        Dim::Hidden => c.hidden_size,
        Dim::Q => c.num_attention_heads * c.head_dim,
        Dim::Kv => c.num_key_value_heads * c.head_dim,
        Dim::Intermediate => c.intermediate_size,
    };
    let top = |gguf: &str, hf: &str, present| Spec {
        gguf: gguf.into(),
        hf: hf.into(),
        shape: if gguf.ends_with("norm.weight") {
            vec![c.hidden_size]
        } else {
            vec![c.vocab_size, c.hidden_size]
        },
        unpermute_heads: None,
        present,
    };
    let mut specs = vec![
        top("token_embd.weight", "model.embed_tokens.weight", true),
        top("output_norm.weight", "model.norm.weight", true),
        top("output.weight", "lm_head.weight", !c.tie_word_embeddings),
    ];
    for l in 0..c.num_hidden_layers {
        for (gguf, hf, dims, heads, present) in LAYER_TENSORS {
            specs.push(Spec {
                gguf: format!("blk.{l}.{gguf}"),
                hf: format!("model.layers.{l}.{hf}"),
                shape: dims.iter().map(size).collect(),
                unpermute_heads: match heads {
                    Heads::None => None,
                    Heads::Query => Some(c.num_attention_heads),
                    Heads::KeyValue => Some(c.num_key_value_heads),
                },
                present: match present {
                    Present::Always => true,
                    Present::QkvBias => c.qkv_bias,
                    Present::OutputBias => c.o_bias,
                    Present::MlpBias => c.mlp_bias,
                },
            });
        }
    }
    specs
}

/// Maps every GGUF tensor to its HF name and expected shape; returns the tensors left over.
pub(super) fn plan_tensors<'a>(
    g: &'a GgufFile,
    c: &LlamaConfig,
) -> Result<(Vec<Planned<'a>>, Vec<String>), GgufError> {
    let mut plan = Vec::new();
    for s in llama_specs(c) {
        let Some(t) = g.tensor(&s.gguf) else {
            if s.present {
                return Err(GgufError::MissingTensor {
                    path: g.path().to_path_buf(),
                    name: s.gguf,
                    needed_for: s.hf,
                });
            }
            continue;
        };
        if !s.present {
            // a bias on one layer but not on layer 0 would be silently dropped otherwise
            return Err(GgufError::Invalid {
                path: g.path().to_path_buf(),
                message: format!(
                    "tensor `{}` is present but layer 0 has no such tensor",
                    s.gguf
                ),
            });
        }
        if t.torch_shape() != s.shape {
            return Err(GgufError::TensorShape {
                path: g.path().to_path_buf(),
                name: s.gguf,
                expected: s.shape,
                found: t.torch_shape(),
            });
        }
        plan.push(Planned {
            hf_name: s.hf,
            source: t,
            shape: s.shape,
            unpermute_heads: s.unpermute_heads,
        });
    }
    let used: std::collections::HashSet<&str> =
        plan.iter().map(|p| p.source.name.as_str()).collect();
    let ignored = g
        .tensors
        .iter()
        .map(|t| t.name.as_str())
        // rope_freqs was read into the config's RoPE scaling
        .filter(|n| !used.contains(n) && *n != "rope_freqs.weight")
        .map(str::to_string)
        .collect();
    plan.sort_by(|a, b| a.hf_name.cmp(&b.hf_name));
    Ok((plan, ignored))
}

/// Undoes llama.cpp's `permute(w, n_head)`: within each head of `rows / heads` rows, GGUF row
/// `2i + j` holds HF row `j·half + i` (j in {0, 1}, i < half). `cols` is 1 for a bias.
pub fn unpermute_rows(w: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    unpermuted_order(w.len() / cols, heads)
        .into_iter()
        .flat_map(|src| &w[src * cols..(src + 1) * cols])
        .copied()
        .collect()
}

/// llama.cpp's `permute(w, n_head)` itself, as `convert_hf_to_gguf.py` applies it (HF rows to
/// GGUF rows): the inverse of [`unpermute_rows`].
pub fn permute_rows(w: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; w.len()];
    for (hf, gguf) in unpermuted_order(w.len() / cols, heads)
        .into_iter()
        .enumerate()
    {
        out[gguf * cols..(gguf + 1) * cols].copy_from_slice(&w[hf * cols..(hf + 1) * cols]);
    }
    out
}

/// For every HF row of a q or k projection of `rows` rows, the GGUF row that holds it (see
/// [`unpermute_rows`]).
pub fn unpermuted_order(rows: usize, heads: usize) -> Vec<usize> {
    let head = rows / heads;
    let half = head / 2;
    (0..rows)
        .map(|dst| {
            let (hd, local) = (dst / head, dst % head);
            let (j, i) = (local / half, local % half);
            hd * head + 2 * i + j
        })
        .collect()
}

fn dtype_tag(d: StoreDtype) -> (&'static str, usize) {
    match d {
        StoreDtype::F32 => ("F32", 4),
        StoreDtype::F16 => ("F16", 2),
        StoreDtype::BF16 => ("BF16", 2),
    }
}

/// Writes `model.safetensors` one tensor at a time: the header (names, shapes, offsets) first,
/// from the plan alone, then each tensor's bytes.
fn write_streamed(
    g: &GgufFile,
    plan: &[Planned],
    path: &Path,
    dtype: StoreDtype,
    progress: &mut dyn FnMut(u64, u64, &str),
) -> Result<u64> {
    let (tag, elem) = dtype_tag(dtype);
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".into(),
        json!({"format": "pt", "source": g.path().file_name().map(|n| n.to_string_lossy().into_owned())}),
    );
    let mut offset = 0usize;
    for p in plan {
        let n = p.shape.iter().product::<usize>() * elem;
        header.insert(
            p.hf_name.clone(),
            json!({"dtype": tag, "shape": p.shape, "data_offsets": [offset, offset + n]}),
        );
        offset += n;
    }
    let mut head = serde_json::to_vec(&Value::Object(header)).expect("header serialises");
    // the data section starts 8-aligned, as the safetensors writer pads it
    head.resize(head.len().div_ceil(8) * 8, b' ');

    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".model.safetensors.{}.tmp", std::process::id()));
    let io = |e| ModelError::io(path, e);
    let result = (|| -> Result<()> {
        let mut f =
            std::io::BufWriter::with_capacity(1 << 22, std::fs::File::create(&tmp).map_err(io)?);
        f.write_all(&(head.len() as u64).to_le_bytes())
            .map_err(io)?;
        f.write_all(&head).map_err(io)?;
        let total: u64 = plan
            .iter()
            .map(|p| g.tensor_bytes(p.source).len() as u64)
            .sum();
        let mut done = 0u64;
        for p in plan {
            let mut values = g.tensor_f32(p.source);
            if let Some(heads) = p.unpermute_heads {
                let cols = if p.shape.len() == 2 { p.shape[1] } else { 1 };
                values = unpermute_rows(&values, heads, cols);
            }
            if let Some(bad) = values.iter().position(|v| !v.is_finite()) {
                return Err(GgufError::BadTensor {
                    path: g.path().to_path_buf(),
                    name: p.source.name.clone(),
                    message: format!("element {bad} dequantizes to {}", values[bad]),
                }
                .into());
            }
            let t = OwnedTensor::from_f32(&values, p.shape.clone(), dtype);
            f.write_all(t.bytes()).map_err(io)?;
            done += g.tensor_bytes(p.source).len() as u64;
            progress(done, total, &p.hf_name);
        }
        let file = f.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map(|()| 8 + head.len() as u64 + offset as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llama.cpp's permute, as `convert_hf_to_gguf.py` writes it.
    fn permute(w: &[f32], heads: usize, cols: usize) -> Vec<f32> {
        let head = w.len() / cols / heads;
        let half = head / 2;
        let mut out = vec![0.0; w.len()];
        for hd in 0..heads {
            for j in 0..2 {
                for i in 0..half {
                    let src = hd * head + j * half + i; // HF row
                    let dst = hd * head + 2 * i + j;
                    out[dst * cols..(dst + 1) * cols]
                        .copy_from_slice(&w[src * cols..(src + 1) * cols]);
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        let (heads, head, cols) = (3, 8, 5);
        let w: Vec<f32> = (0..heads * head * cols).map(|x| x as f32).collect();
        let p = permute(&w, heads, cols);
        assert_ne!(p, w);
        assert_eq!(unpermute_rows(&p, heads, cols), w);
        // head 0, GGUF row 1 (i 0, j 1) is HF row 4 (= half)
        assert_eq!(p[cols..2 * cols], w[4 * cols..5 * cols]);
        // and the exporter's permute is the converter's
        assert_eq!(permute_rows(&w, heads, cols), p);
    }
}
