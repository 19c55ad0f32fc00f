//! A minimal GGUF v3 writer for the tests: the tiny fixture as a GGUF file (as llama.cpp's
//! converter would write it, q/k rows permuted), and broken files for the error tests.

use std::path::{Path, PathBuf};

use skipgpt_kernels::quant::{quantize, QuantType};
use skipgpt_model::io::safetensors_io::TensorFile;

/// A metadata value (the types the tests need).
#[derive(Debug, Clone)]
pub enum Meta {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
}

pub struct Tensor {
    pub name: String,
    /// GGUF order (fastest-varying first).
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    pub data: Vec<u8>,
}

#[derive(Default)]
pub struct GgufBuilder {
    pub meta: Vec<(String, Meta)>,
    pub tensors: Vec<Tensor>,
}

fn string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

impl GgufBuilder {
    pub fn set(&mut self, key: &str, value: Meta) {
        self.meta.retain(|(k, _)| k != key);
        self.meta.push((key.to_string(), value));
    }

    pub fn remove_tensor(&mut self, name: &str) {
        self.tensors.retain(|t| t.name != name);
    }

    /// An f32 tensor of PyTorch shape `shape`.
    pub fn f32(&mut self, name: &str, shape: &[usize], values: &[f32]) {
        self.tensors.push(Tensor {
            name: name.into(),
            dims: shape.iter().rev().map(|&d| d as u64).collect(),
            ggml_type: 0,
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        });
    }

    /// Every f32 matrix whose rows are whole 32-value blocks, in `kind` (Q8_0 or Q4_0); the
    /// rest (norms, rows of other lengths) stays f32.
    pub fn quantize_matrices(&mut self, kind: QuantType) {
        for t in self.tensors.iter_mut() {
            if t.ggml_type != 0 || t.dims.len() != 2 || t.dims[0] % 32 != 0 {
                continue;
            }
            let values: Vec<f32> = t
                .data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            t.data = quantize(kind, &values).expect("rows of whole blocks");
            t.ggml_type = kind as u32;
        }
    }

    /// Every f32 matrix left in F16: what `llama-quantize` does with the matrices whose rows
    /// are no whole number of blocks.
    pub fn matrices_to_f16(&mut self) {
        for t in self.tensors.iter_mut() {
            if t.ggml_type != 0 || t.dims.len() != 2 {
                continue;
            }
            t.data = (t.data.chunks_exact(4))
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .flat_map(|v| half::f16::from_f32(v).to_le_bytes())
                .collect();
            t.ggml_type = 1;
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.meta.len() as u64).to_le_bytes());
        for (k, v) in &self.meta {
            string(&mut out, k);
            match v {
                Meta::U32(x) => {
                    out.extend(4u32.to_le_bytes());
                    out.extend(x.to_le_bytes());
                }
                Meta::F32(x) => {
                    out.extend(6u32.to_le_bytes());
                    out.extend(x.to_le_bytes());
                }
                Meta::Bool(x) => {
                    out.extend(7u32.to_le_bytes());
                    out.push(*x as u8);
                }
                Meta::Str(s) => {
                    out.extend(8u32.to_le_bytes());
                    string(&mut out, s);
                }
                Meta::Strs(items) => {
                    out.extend(9u32.to_le_bytes());
                    out.extend(8u32.to_le_bytes());
                    out.extend((items.len() as u64).to_le_bytes());
                    for s in items {
                        string(&mut out, s);
                    }
                }
                Meta::I32s(items) => {
                    out.extend(9u32.to_le_bytes());
                    out.extend(5u32.to_le_bytes());
                    out.extend((items.len() as u64).to_le_bytes());
                    for x in items {
                        out.extend(x.to_le_bytes());
                    }
                }
            }
        }
        let align = 32usize;
        let mut offset = 0usize;
        for t in &self.tensors {
            string(&mut out, &t.name);
            out.extend((t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(t.ggml_type.to_le_bytes());
            out.extend((offset as u64).to_le_bytes());
            offset += t.data.len().div_ceil(align) * align;
        }
        out.resize(out.len().div_ceil(align) * align, 0);
        for t in &self.tensors {
            out.extend(&t.data);
            out.resize(out.len().div_ceil(align) * align, 0);
        }
        out
    }

    pub fn write(&self, path: &Path) {
        std::fs::write(path, self.to_bytes()).unwrap();
    }
}

/// llama.cpp's `permute`: HF row `j·half + i` of each head goes to row `2i + j`. Written apart
/// from the model crate's `permute_rows` on purpose: the tests' converter is a second opinion.
pub fn permute(w: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    let head = w.len() / cols / heads;
    let half = head / 2;
    let mut out = vec![0.0; w.len()];
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..half {
                let (src, dst) = (h * head + j * half + i, h * head + 2 * i + j);
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// `tests/fixtures/llama-tiny/model` as llama.cpp would convert it: f32 tensors under GGUF
/// names, q/k permuted, the config under `llama.*`, the tokenizer under `tokenizer.ggml.*`.
pub fn llama_tiny_gguf(model_dir: &Path) -> GgufBuilder {
    let w = TensorFile::open(&model_dir.join("model.safetensors")).unwrap();
    let (heads, kv_heads, layers) = (4usize, 2usize, 3usize);
    let mut g = GgufBuilder::default();
    g.set("general.architecture", Meta::Str("llama".into()));
    g.set("general.name", Meta::Str("llama-tiny".into()));
    for (k, v) in [
        ("llama.block_count", layers as u32),
        ("llama.context_length", 256),
        ("llama.embedding_length", 64),
        ("llama.feed_forward_length", 176),
        ("llama.attention.head_count", heads as u32),
        ("llama.attention.head_count_kv", kv_heads as u32),
        ("llama.rope.dimension_count", 16),
        ("llama.vocab_size", 512),
    ] {
        g.set(k, Meta::U32(v));
    }
    g.set("llama.rope.freq_base", Meta::F32(10000.0));
    g.set("llama.attention.layer_norm_rms_epsilon", Meta::F32(1e-5));

    let mut add = |gguf_name: &str, hf_name: &str, permute_heads: Option<usize>| {
        let (values, shape) = w.read_f32(hf_name).unwrap();
        let values = match permute_heads {
            Some(h) => permute(&values, h, shape[1]),
            None => values,
        };
        g.f32(gguf_name, &shape, &values);
    };
    add("token_embd.weight", "model.embed_tokens.weight", None);
    add("output_norm.weight", "model.norm.weight", None);
    add("output.weight", "lm_head.weight", None);
    for l in 0..layers {
        let hf = |s: &str| format!("model.layers.{l}.{s}");
        let blk = |s: &str| format!("blk.{l}.{s}");
        add(
            &blk("attn_norm.weight"),
            &hf("input_layernorm.weight"),
            None,
        );
        add(
            &blk("attn_q.weight"),
            &hf("self_attn.q_proj.weight"),
            Some(heads),
        );
        add(
            &blk("attn_k.weight"),
            &hf("self_attn.k_proj.weight"),
            Some(kv_heads),
        );
        add(&blk("attn_v.weight"), &hf("self_attn.v_proj.weight"), None);
        add(
            &blk("attn_output.weight"),
            &hf("self_attn.o_proj.weight"),
            None,
        );
        add(
            &blk("ffn_norm.weight"),
            &hf("post_attention_layernorm.weight"),
            None,
        );
        add(&blk("ffn_gate.weight"), &hf("mlp.gate_proj.weight"), None);
        add(&blk("ffn_up.weight"), &hf("mlp.up_proj.weight"), None);
        add(&blk("ffn_down.weight"), &hf("mlp.down_proj.weight"), None);
    }

    // the byte-level BPE of tokenizer.json, as llama.cpp stores it
    let tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model_dir.join("tokenizer.json")).unwrap())
            .unwrap();
    let vocab = tok["model"]["vocab"].as_object().unwrap();
    let mut tokens = vec![String::new(); vocab.len()];
    for (t, id) in vocab {
        tokens[id.as_u64().unwrap() as usize] = t.clone();
    }
    let mut types = vec![1i32; tokens.len()];
    for a in tok["added_tokens"].as_array().unwrap() {
        types[a["id"].as_u64().unwrap() as usize] = 3;
    }
    let merges = tok["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            serde_json::Value::Array(pair) => format!(
                "{} {}",
                pair[0].as_str().unwrap(),
                pair[1].as_str().unwrap()
            ),
            other => other.as_str().unwrap().to_string(),
        })
        .collect();
    g.set("tokenizer.ggml.model", Meta::Str("gpt2".into()));
    g.set("tokenizer.ggml.pre", Meta::Str("gpt2".into()));
    g.set("tokenizer.ggml.tokens", Meta::Strs(tokens));
    g.set("tokenizer.ggml.token_type", Meta::I32s(types));
    g.set("tokenizer.ggml.merges", Meta::Strs(merges));
    g.set("tokenizer.ggml.bos_token_id", Meta::U32(0));
    g.set("tokenizer.ggml.eos_token_id", Meta::U32(1));
    g.set("tokenizer.ggml.add_bos_token", Meta::Bool(false));
    g.set(
        "tokenizer.chat_template",
        Meta::Str("{% for m in messages %}{{ m['content'] }}{% endfor %}".into()),
    );
    g
}

/// The tiny fixture model written as the GGUF file `name` in `dir`: its path.
pub fn write_tiny_gguf(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    llama_tiny_gguf(&crate::tiny().join("model")).write(&path);
    path
}
