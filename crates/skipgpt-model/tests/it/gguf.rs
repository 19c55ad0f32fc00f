//! GGUF import: dequantization against gguf-py's reference, the tiny fixture round-tripped
//! through a GGUF file (weights, q/k permutation, tokenizer), dtypes, and the errors a broken
//! or unsupported file must produce. The real model (SmolLM2) is in `tests/it/smollm2/`.

use std::path::Path;

use skipgpt_model::io::gguf::{import_gguf, GgmlType, ImportOptions};
use skipgpt_model::{generate, load_pretrained, StoreDtype, Tokenizer};
use skipgpt_test_support::gguf_writer::{llama_tiny_gguf, write_tiny_gguf, GgufBuilder, Meta};
use skipgpt_test_support::*;

fn import(gguf: &Path, out: &Path, dtype: StoreDtype) -> skipgpt_model::Result<()> {
    let opts = ImportOptions {
        dtype,
        overwrite: false,
    };
    import_gguf(gguf, out, &opts, &mut |_, _, _| {}).map(drop)
}

/// The error of importing `g`, as text.
fn import_error(g: &GgufBuilder) -> String {
    import_bytes_error(&g.to_bytes())
}

fn import_bytes_error(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.gguf");
    std::fs::write(&file, bytes).unwrap();
    let err = import(&file, &dir.path().join("out"), StoreDtype::F32)
        .expect_err("a broken file must not import")
        .to_string();
    assert!(err.contains("bad.gguf"), "the error names the file: {err}");
    assert!(
        !dir.path().join("out/config.json").exists(),
        "a failed import leaves no model behind"
    );
    err
}

#[test]
fn dequantization_matches_gguf_py() {
    let bytes = std::fs::read(fixtures().join("gguf-quants/quants.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for (code, name) in [
        (1, "F16"),
        (30, "BF16"),
        (2, "Q4_0"),
        (3, "Q4_1"),
        (6, "Q5_0"),
        (7, "Q5_1"),
        (8, "Q8_0"),
        (12, "Q4_K"),
        (13, "Q5_K"),
        (14, "Q6_K"),
    ] {
        let kind = GgmlType::from_code(code).unwrap();
        assert_eq!(kind.name(), name);
        let raw = file.tensor(&format!("{name}.bytes")).unwrap();
        let expected: Vec<f32> = file
            .tensor(&format!("{name}.values"))
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let got = kind.dequantize(raw.data());
        assert_eq!(got.len(), expected.len(), "{name}: element count");
        let scale = expected.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert!(scale > 0.0, "{name}: the vectors are not all zero");
        // gguf-py computes in float32 with numpy, in another order for the K-quants
        let d = max_abs_diff(&got, &expected);
        assert!(d <= 1e-6 * scale, "{name}: max |Δ| {d} (scale {scale})");
    }
}

/// What `skipgpt quantize` writes: the blocks gguf-py's quantizers (ggml-quants.c's reference
/// ones) make of the same values. A block may differ where a value lies within rounding of a
/// half step (numpy and Rust divide alike, but f16 scales round ties the same only mostly).
#[test]
fn quantization_matches_gguf_py() {
    let bytes = std::fs::read(fixtures().join("gguf-quants/quants.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let source: Vec<f32> = file
        .tensor("source")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    // gguf-py quantizes the 32-value formats (the K formats' bytes in the fixture are random
    // blocks for dequantization; their quantizer is checked against llama.cpp's own in
    // skipgpt-kernels)
    use skipgpt_kernels::quant::QuantType;
    let quantized_by_gguf_py = [
        QuantType::Q8_0,
        QuantType::Q4_0,
        QuantType::Q4_1,
        QuantType::Q5_0,
        QuantType::Q5_1,
    ];
    for kind in quantized_by_gguf_py {
        let ours = skipgpt_kernels::quant::quantize(kind, &source).unwrap();
        let theirs = file.tensor(&format!("{}.bytes", kind.name())).unwrap();
        let size = kind.block_bytes();
        let differ = ours
            .chunks(size)
            .zip(theirs.data().chunks(size))
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(
            differ,
            0,
            "{}: {differ} of {} blocks differ",
            kind.name(),
            ours.len() / size
        );
    }
}

/// The tiny model written as a GGUF into `dir` and imported from it at f32: (the GGUF, the
/// imported model directory).
fn import_tiny(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let gguf = write_tiny_gguf(dir, "tiny.gguf");
    let out = dir.join("model");
    import(&gguf, &out, StoreDtype::F32).unwrap();
    (gguf, out)
}

#[test]
fn tiny_gguf_imports_to_the_same_model() {
    let dir = tempfile::tempdir().unwrap();
    let (_, out) = import_tiny(dir.path());
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(out.join(f).exists(), "{f} written");
    }
    let model = load_pretrained::<B>(&out, &device()).unwrap().model;
    let r = reference(&tiny());
    let out_full = model.forward_full(ids_tensor(&r, "input_ids"), true);
    let d = diff_with(out_full.logits, &r, "logits");
    // f32 in, f32 out: the import is exact, and q/k come back in HF's row order
    assert!(d < 1e-4, "logits differ by {d}");
    let prompts = ids_rows(&r, "greedy_prompt");
    assert_eq!(
        generate(&model, &prompts, &greedy(16)).unwrap(),
        ids_rows(&r, "greedy_tokens")
    );
    // the same tensors as the original checkpoint, to the bit
    let a = skipgpt_model::io::safetensors_io::TensorFile::open(&out.join("model.safetensors"))
        .unwrap();
    let b = skipgpt_model::io::safetensors_io::TensorFile::open(
        &tiny().join("model/model.safetensors"),
    )
    .unwrap();
    let mut names = a.names();
    names.sort();
    let mut expected = b.names();
    expected.sort();
    assert_eq!(names, expected);
    for n in &names {
        assert_eq!(a.read_f32(n).unwrap(), b.read_f32(n).unwrap(), "{n}");
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["num_key_value_heads"], 2);
    assert_eq!(config["tie_word_embeddings"], false);
    assert_eq!(config["eos_token_id"], 1);
    let tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(tc["eos_token"], "<|end_of_text|>");
    assert!(tc["chat_template"].as_str().unwrap().contains("messages"));
}

#[test]
fn tiny_gguf_tokenizer_matches_tokenizer_json() {
    let dir = tempfile::tempdir().unwrap();
    let (_, out) = import_tiny(dir.path());
    let original = Tokenizer::from_file(&tiny().join("model/tokenizer.json")).unwrap();
    let imported = Tokenizer::from_file(&out.join("tokenizer.json")).unwrap();
    assert_eq!(imported.vocab_size(), original.vocab_size());
    let texts: Vec<String> = serde_json::from_str::<serde_json::Value>(
        &std::fs::read_to_string(tiny().join("reference.json")).unwrap(),
    )
    .unwrap()["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .chain([
            "  spaces,\ttabs\nand 12345 digits; naïve — 日本".to_string(),
            "<|begin_of_text|>the end<|end_of_text|>".to_string(),
        ])
        .collect();
    for t in &texts {
        let (a, _) = original.encode_plain(t).unwrap();
        let (b, _) = imported.encode_plain(t).unwrap();
        assert_eq!(a, b, "{t:?}");
        assert_eq!(imported.decode(&b).unwrap(), original.decode(&a).unwrap());
    }
    let (ids, _) = imported
        .encode_plain("<|begin_of_text|>x<|end_of_text|>")
        .unwrap();
    assert_eq!(
        (ids[0], *ids.last().unwrap()),
        (0, 1),
        "control tokens are single tokens"
    );
}

#[test]
fn half_precision_imports_round_the_weights() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = write_tiny_gguf(dir.path(), "tiny.gguf");
    let r = reference(&tiny());
    for (dtype, name, tol) in [
        (StoreDtype::F16, "float16", 2e-2),
        (StoreDtype::BF16, "bfloat16", 1e-1),
    ] {
        let out = dir.path().join(name);
        import(&gguf, &out, dtype).unwrap();
        let config = skipgpt_model::load_config(&out).unwrap();
        assert_eq!(config.dtype, name);
        let model = load_pretrained::<B>(&out, &device()).unwrap().model;
        let d = diff_with(model.forward(ids_tensor(&r, "input_ids")), &r, "logits");
        assert!(d > 0.0 && d < tol, "{name}: logits differ by {d}");
    }
}

#[test]
fn existing_model_is_not_replaced_without_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let (gguf, out) = import_tiny(dir.path());
    let before = std::fs::read(out.join("model.safetensors")).unwrap();
    let err = import(&gguf, &out, StoreDtype::F16)
        .unwrap_err()
        .to_string();
    assert_mentions(&err, &["already exists", "--overwrite"]);
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        before
    );
    let opts = ImportOptions {
        dtype: StoreDtype::F16,
        overwrite: true,
    };
    import_gguf(&gguf, &out, &opts, &mut |_, _, _| {}).unwrap();
    assert!(std::fs::read(out.join("model.safetensors")).unwrap().len() < before.len());
}

#[test]
fn broken_files_are_named_errors() {
    let good = llama_tiny_gguf(&tiny().join("model"));
    let bytes = good.to_bytes();

    let mut bad = bytes.clone();
    bad[..4].copy_from_slice(b"GGML");
    let e = import_bytes_error(&bad);
    assert_mentions(&e, &["not a GGUF file", "GGML"]);

    let mut v1 = bytes.clone();
    v1[4..8].copy_from_slice(&1u32.to_le_bytes());
    let e = import_bytes_error(&v1);
    assert!(e.contains("version 1"), "{e}");
    let mut be = bytes.clone();
    be[4..8].copy_from_slice(&3u32.to_be_bytes());
    assert!(import_bytes_error(&be).contains("big-endian"));

    // truncated in the header, the metadata, the tensor infos and the data
    for cut in [2, 10, 200, bytes.len() / 2, bytes.len() - 8] {
        let e = import_bytes_error(&bytes[..cut]);
        assert!(e.contains("truncated"), "cut at {cut}: {e}");
    }
    let e = import_bytes_error(&bytes[..bytes.len() - 8]);
    assert!(
        e.contains("blk.2.ffn_up.weight") || e.contains("tensor `"),
        "{e}"
    );
}

#[test]
fn unsupported_or_inconsistent_models_are_named_errors() {
    type Break = fn(&mut GgufBuilder);
    // (how the tiny model's GGUF is broken, the words its import error must hold)
    let cases: [(Break, &[&str]); 8] = [
        // type 10 is Q2_K
        (
            |g| g.tensors[0].ggml_type = 10,
            &["token_embd.weight", "Q2_K"],
        ),
        (
            |g| g.set("general.architecture", Meta::Str("gpt2".into())),
            &["general.architecture", "gpt2", "llama"],
        ),
        (
            |g| g.remove_tensor("blk.1.ffn_up.weight"),
            &["blk.1.ffn_up.weight", "not found"],
        ),
        (
            |g| {
                let t = g
                    .tensors
                    .iter_mut()
                    .find(|t| t.name == "blk.0.attn_k.weight");
                let t = t.expect("the tiny model's blk.0.attn_k.weight");
                t.dims = vec![t.dims[1], t.dims[0]];
            },
            &["blk.0.attn_k.weight", "[32, 64]"],
        ),
        (
            |g| g.set("llama.embedding_length", Meta::Str("64".into())),
            &["llama.embedding_length", "string"],
        ),
        (
            |g| g.meta.retain(|(k, _)| k != "llama.block_count"),
            &["llama.block_count", "missing"],
        ),
        (
            |g| g.set("tokenizer.ggml.model", Meta::Str("llama".into())),
            &["tokenizer.ggml.model", "SentencePiece"],
        ),
        (
            |g| g.set("tokenizer.ggml.pre", Meta::Str("mystery".into())),
            &["tokenizer.ggml.pre", "mystery", "smollm"],
        ),
    ];
    for (k, (break_it, words)) in cases.iter().enumerate() {
        let mut g = llama_tiny_gguf(&tiny().join("model"));
        break_it(&mut g);
        let e = import_error(&g);
        for w in *words {
            assert!(e.contains(w), "case {k}: {w:?} in {e}");
        }
    }
}

#[test]
fn pre_tokenizers_split_as_llama_cpp_groups_them() {
    use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};
    let dir = tempfile::tempdir().unwrap();
    // how "abc 12345" is cut before merging: GPT-2 keeps digit runs, SmolLM splits every
    // digit, LLaMA 3 groups digits by three, Qwen2 splits every digit
    for (pre, expected) in [
        ("gpt2", vec!["abc", "Ġ12345"]),
        ("smollm", vec!["abc", "Ġ", "1", "2", "3", "4", "5"]),
        ("llama-bpe", vec!["abc", "Ġ", "123", "45"]),
        ("qwen2", vec!["abc", "Ġ", "1", "2", "3", "4", "5"]),
    ] {
        let mut g = llama_tiny_gguf(&tiny().join("model"));
        g.set("tokenizer.ggml.pre", Meta::Str(pre.into()));
        let gguf = dir.path().join(format!("{pre}.gguf"));
        g.write(&gguf);
        let out = dir.path().join(pre);
        import(&gguf, &out, StoreDtype::F32).unwrap();
        let tok = Tokenizer::from_file(&out.join("tokenizer.json")).unwrap();
        let mut text = PreTokenizedString::from("abc 12345");
        tok.inner()
            .get_pre_tokenizer()
            .expect("a pre-tokenizer")
            .pre_tokenize(&mut text)
            .unwrap();
        let pieces: Vec<String> = text
            .get_splits(OffsetReferential::Original, OffsetType::Byte)
            .into_iter()
            .map(|(s, _, _)| s.to_string())
            .collect();
        assert_eq!(pieces, expected, "pre = {pre}");
    }
}
