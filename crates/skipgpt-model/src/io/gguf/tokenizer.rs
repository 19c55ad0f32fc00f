//! A Hugging Face `tokenizer.json` rebuilt from a GGUF file's `tokenizer.ggml.*` metadata.
//!
//! Supported: `tokenizer.ggml.model = gpt2`, the byte-level BPE of GPT-2, LLaMA 3, Qwen2,
//! SmolLM and StarCoder, with the pre-tokenizer that `tokenizer.ggml.pre` names. The splitting
//! rules are llama.cpp's (`llama-vocab.cpp`), written the way the models' own `tokenizer.json`
//! files write them. Control tokens (type 3) become special added tokens and user-defined
//! tokens (type 4) plain added tokens, so `<|im_start|>` in a text is one token, as in
//! transformers and llama.cpp.

use serde_json::{json, Map, Value};

use super::{GgufError, GgufFile};

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

/// LLaMA 3 (tiktoken cl100k-style): digits in groups of at most three.
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2: as LLaMA 3, with every digit on its own.
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How a byte-level BPE vocabulary splits text before merging.
#[derive(Clone, Copy)]
enum Split {
    /// GPT-2's rule (contractions, letters, digits, other symbols, whitespace).
    Gpt2,
    /// Every digit on its own, then GPT-2's rule (SmolLM, StarCoder).
    DigitsThenGpt2,
    Llama3,
    Qwen2,
}

/// `tokenizer.ggml.pre` values and the split each stands for, grouped as llama.cpp groups
/// them.
const PRE: [(&[&str], Split); 4] = [
    (&["default", "gpt2", "gpt-2", "mpt", "olmo"], Split::Gpt2),
    (
        &[
            "smollm",
            "starcoder",
            "refact",
            "command-r",
            "codeshell",
            "exaone",
            "minerva",
        ],
        Split::DigitsThenGpt2,
    ),
    (
        &["llama3", "llama-v3", "llama-bpe", "falcon3"],
        Split::Llama3,
    ),
    (&["qwen2", "deepseek-r1-qwen"], Split::Qwen2),
];

fn supported_pre() -> String {
    let names: Vec<&str> = PRE.iter().flat_map(|(n, _)| n.iter().copied()).collect();
    format!("supported: {}", names.join(", "))
}

fn byte_level(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

fn split(regex: &str) -> Value {
    json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false})
}

/// The pre-tokenizer for a `tokenizer.ggml.pre` value, and whether BPE skips the merges for
/// words already in the vocabulary (LLaMA 3's `ignore_merges`).
fn pre_tokenizer(gguf: &GgufFile, pre: &str) -> Result<(Value, bool), GgufError> {
    let kind = PRE
        .iter()
        .find(|(names, _)| names.contains(&pre))
        .map(|(_, kind)| *kind)
        .ok_or_else(|| GgufError::Unsupported {
            path: gguf.path().to_path_buf(),
            key: "tokenizer.ggml.pre".into(),
            value: pre.into(),
            supported: supported_pre(),
        })?;
    Ok(split_json(kind))
}

/// The `tokenizer.ggml.pre` name of a `tokenizer.json` pre-tokenizer written as these rules
/// write it (the models' own files write them so), or `None` for another.
pub(super) fn pre_name_of(pre_tokenizer: &Value) -> Option<&'static str> {
    let canonical = [
        (Split::Gpt2, "gpt2"),
        (Split::DigitsThenGpt2, "smollm"),
        (Split::Llama3, "llama-bpe"),
        (Split::Qwen2, "qwen2"),
    ];
    canonical
        .into_iter()
        .find(|(kind, _)| split_json(*kind).0 == *pre_tokenizer)
        .map(|(_, name)| name)
}

fn split_json(kind: Split) -> (Value, bool) {
    match kind {
        Split::Gpt2 => (byte_level(true), false),
        Split::DigitsThenGpt2 => (
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
            false,
        ),
        Split::Llama3 => (
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_REGEX), byte_level(false)]}),
            true,
        ),
        Split::Qwen2 => (
            json!({"type": "Sequence", "pretokenizers": [split(QWEN2_REGEX), byte_level(false)]}),
            false,
        ),
    }
}

/// The special tokens and chat settings `tokenizer_config.json` records.
#[derive(Debug, Clone, PartialEq)]
pub struct SpecialTokens {
    pub bos: Option<(u32, String)>,
    pub eos: Option<(u32, String)>,
    pub unk: Option<(u32, String)>,
    pub pad: Option<(u32, String)>,
    pub add_bos: bool,
    pub add_eos: bool,
    pub chat_template: Option<String>,
}

/// `tokenizer.json` (as a JSON value) and the special tokens, from the GGUF metadata.
pub fn tokenizer_from_gguf(gguf: &GgufFile) -> Result<(Value, SpecialTokens), GgufError> {
    let path = gguf.path().to_path_buf();
    let model = gguf.string("tokenizer.ggml.model")?;
    if model != "gpt2" {
        let why = if model == "llama" {
            "SentencePiece (LLaMA 1/2, Mistral v0.1) is not supported yet; supported: gpt2 (byte-level BPE)"
        } else {
            "supported: gpt2 (byte-level BPE)"
        };
        return Err(GgufError::Unsupported {
            path,
            key: "tokenizer.ggml.model".into(),
            value: model.into(),
            supported: why.into(),
        });
    }
    let pre = gguf
        .optional("tokenizer.ggml.pre", |g, k| g.string(k))?
        .unwrap_or("default");
    let (pre_tokenizer, ignore_merges) = pre_tokenizer(gguf, pre)?;
    let tokens = gguf.strings("tokenizer.ggml.tokens")?;
    let merges = gguf.strings("tokenizer.ggml.merges")?;
    let types = gguf
        .optional("tokenizer.ggml.token_type", |g, k| g.ints(k))?
        .unwrap_or_else(|| vec![1; tokens.len()]);
    if types.len() != tokens.len() {
        return Err(GgufError::Invalid {
            path,
            message: format!(
                "tokenizer.ggml.token_type has {} entries for {} tokens",
                types.len(),
                tokens.len()
            ),
        });
    }
    for (i, m) in merges.iter().enumerate() {
        if m.split(' ').count() != 2 {
            return Err(GgufError::Invalid {
                path,
                message: format!(
                    "tokenizer.ggml.merges[{i}] = {m:?} is not two tokens separated by one space"
                ),
            });
        }
    }

    let mut vocab = Map::new();
    for (id, tok) in tokens.iter().enumerate() {
        // a repeated string keeps its first id, as a HF vocabulary would
        vocab.entry(tok.to_string()).or_insert(json!(id));
    }
    let added: Vec<Value> = types
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == CONTROL || t == USER_DEFINED)
        .map(|(id, &t)| {
            json!({"id": id, "content": tokens[id], "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": t == CONTROL})
        })
        .collect();

    let token_id = |key: &str| -> Result<Option<(u32, String)>, GgufError> {
        let Some(id) = gguf.optional(key, |g, k| g.uint(k))? else {
            return Ok(None);
        };
        let tok = tokens.get(id as usize).ok_or_else(|| GgufError::Invalid {
            path: gguf.path().to_path_buf(),
            message: format!("{key} = {id} is outside the {} tokens", tokens.len()),
        })?;
        Ok(Some((id as u32, tok.to_string())))
    };
    let special = SpecialTokens {
        bos: token_id("tokenizer.ggml.bos_token_id")?,
        eos: token_id("tokenizer.ggml.eos_token_id")?,
        unk: token_id("tokenizer.ggml.unknown_token_id")?,
        pad: token_id("tokenizer.ggml.padding_token_id")?,
        // llama.cpp adds a BOS for gpt2-type vocabularies only when the file asks for it
        add_bos: gguf
            .optional("tokenizer.ggml.add_bos_token", |g, k| g.bool(k))?
            .unwrap_or(false),
        add_eos: gguf
            .optional("tokenizer.ggml.add_eos_token", |g, k| g.bool(k))?
            .unwrap_or(false),
        chat_template: gguf
            .optional("tokenizer.chat_template", |g, k| g.string(k))?
            .map(str::to_string),
    };
    let post_processor = post_processor(gguf, &special)?;
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": ignore_merges,
            "vocab": vocab, "merges": merges,
        },
    });
    Ok((tokenizer, special))
}

/// BOS/EOS added around a sequence when the file asks for them; otherwise the byte-level
/// processor (offsets only), as GPT-2-style `tokenizer.json` files have.
fn post_processor(gguf: &GgufFile, s: &SpecialTokens) -> Result<Value, GgufError> {
    if !s.add_bos && !s.add_eos {
        return Ok(
            json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true}),
        );
    }
    let need = |t: &Option<(u32, String)>, key: &str| {
        t.clone().ok_or_else(|| GgufError::MissingKey {
            path: gguf.path().to_path_buf(),
            key: key.into(),
        })
    };
    let mut single = Vec::new();
    let mut special_tokens = Map::new();
    let mut piece = |t: (u32, String)| {
        special_tokens.insert(
            t.1.clone(),
            json!({"id": t.1, "ids": [t.0], "tokens": [t.1]}),
        );
        json!({"SpecialToken": {"id": t.1, "type_id": 0}})
    };
    if s.add_bos {
        single.push(piece(need(&s.bos, "tokenizer.ggml.bos_token_id")?));
    }
    single.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
    if s.add_eos {
        single.push(piece(need(&s.eos, "tokenizer.ggml.eos_token_id")?));
    }
    let mut pair = single.clone();
    pair.extend(single.iter().map(|p| {
        if p.get("Sequence").is_some() {
            json!({"Sequence": {"id": "B", "type_id": 1}})
        } else {
            p.clone()
        }
    }));
    Ok(
        json!({"type": "TemplateProcessing", "single": single, "pair": pair,
              "special_tokens": special_tokens}),
    )
}

/// `tokenizer_config.json`: the special tokens by name, the chat template, and the class
/// transformers should load (`tokenizer.json` carries everything else).
pub fn tokenizer_config(special: &SpecialTokens, model_max_length: usize) -> Value {
    let name = |t: &Option<(u32, String)>| t.as_ref().map(|(_, s)| json!(s)).unwrap_or(Value::Null);
    let mut c = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name(&special.bos),
        "eos_token": name(&special.eos),
        "unk_token": name(&special.unk),
        "pad_token": name(&special.pad),
        "add_bos_token": special.add_bos,
        "add_eos_token": special.add_eos,
        "clean_up_tokenization_spaces": false,
        "model_max_length": model_max_length,
    });
    if let Some(t) = &special.chat_template {
        c["chat_template"] = json!(t);
    }
    c
}
