//! A GGUF run as it is on the CPU backend: the tiny fixture quantized to Q8_0 and Q4_0 keeps
//! its matrices in blocks, and computes what its dequantized import computes, with and without
//! routers; routers and adapters attach to it; routers made for another model are refused.

use std::path::Path;

use burn::tensor::{Int, Tensor};
use skipgpt_kernels::quant::QuantType;
use skipgpt_model::io::gguf::{import_gguf, load_gguf, ImportOptions};
use skipgpt_model::{
    attach_routers, generate, load_pretrained, save_routers, LlamaConfig, LlamaForCausalLM,
    Routing, RoutingConfig, StoreDtype,
};
use skipgpt_test_support::gguf_writer::{llama_tiny_gguf, write_tiny_gguf};
use skipgpt_test_support::*;

type Flex = burn::backend::Flex;

fn flex() -> burn::backend::flex::FlexDevice {
    burn::backend::flex::FlexDevice
}

/// The tiny fixture as a GGUF quantized to `kind`, in `dir`.
fn quantized_gguf(dir: &Path, kind: QuantType) -> std::path::PathBuf {
    let path = dir.join(format!("tiny-{}.gguf", kind.name()));
    let mut g = llama_tiny_gguf(&tiny().join("model"));
    g.quantize_matrices(kind);
    g.write(&path);
    path
}

/// The same file imported (every matrix dequantized to f32) and loaded.
fn dequantized(gguf: &Path, dir: &Path) -> LlamaForCausalLM<Flex> {
    let out = dir.join("imported");
    let opts = ImportOptions::default();
    import_gguf(gguf, &out, &opts, &mut |_, _, _| {}).unwrap();
    load_pretrained::<Flex>(&out, &flex()).unwrap().model
}

fn logits(model: &LlamaForCausalLM<Flex>, ids: &[Vec<u32>]) -> Vec<f32> {
    let flat: Vec<i64> = ids.iter().flatten().map(|&t| t as i64).collect();
    let input = Tensor::<Flex, 1, Int>::from_ints(flat.as_slice(), &flex())
        .reshape([ids.len(), ids[0].len()]);
    to_vec(model.forward(input))
}

/// Largest difference over largest magnitude.
fn relative_diff(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    max_abs_diff(a, b) / scale
}

fn prompts() -> Vec<Vec<u32>> {
    ids_rows(&reference(&tiny()), "greedy_prompt")
}

#[test]
fn a_quantized_gguf_keeps_its_matrices_in_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = quantized_gguf(dir.path(), QuantType::Q8_0);
    let model = load_gguf::<Flex>(&gguf, &flex(), StoreDtype::F32)
        .unwrap()
        .model;
    let layer = &model.model.layers[0];
    for proj in [&layer.self_attn.q_proj, &layer.mlp.gate_proj] {
        let q = proj
            .quantized
            .as_ref()
            .expect("a Q8_0 matrix kept in blocks");
        assert_eq!(q.kind(), QuantType::Q8_0);
        assert_eq!(
            proj.base_layer.weight.dims(),
            [64, 0],
            "no dequantized copy"
        );
    }
    // rows of 176 values are no whole number of blocks: left f32
    assert!(layer.mlp.down_proj.quantized.is_none());
    assert_eq!(layer.mlp.down_proj.dims(), [176, 64]);
    assert!(model.model.embed_quantized.is_some());
    assert!(model.lm_head.as_ref().unwrap().quantized.is_some());
    // the reference backend dequantizes at load
    let other = load_gguf::<B>(&gguf, &device(), StoreDtype::F32)
        .unwrap()
        .model;
    assert!(other.model.layers[0].self_attn.q_proj.quantized.is_none());
    assert!(other.model.embed_quantized.is_none());
}

#[test]
fn a_quantized_gguf_computes_what_its_dequantized_import_computes() {
    let dir = tempfile::tempdir().unwrap();
    for kind in [QuantType::Q8_0, QuantType::Q4_0] {
        let gguf = quantized_gguf(dir.path(), kind);
        let quantized = load_gguf::<Flex>(&gguf, &flex(), StoreDtype::F32)
            .unwrap()
            .model;
        let sub = tempfile::tempdir().unwrap();
        let reference = dequantized(&gguf, sub.path());
        let ids = prompts();
        // the only difference: activations rounded to 8 bits before each product
        let d = relative_diff(&logits(&quantized, &ids), &logits(&reference, &ids));
        assert!(d < 0.02, "{kind:?}: logits differ by {d} of their range");
        let len = ids[0].len();
        let engine = engine_logits_in_chunks(&quantized, &ids, &[len - 2, 1, 1], Routing::Dense);
        let d = relative_diff(
            &engine,
            &engine_logits_in_chunks(&reference, &ids, &[len - 2, 1, 1], Routing::Dense),
        );
        assert!(d < 0.02, "{kind:?}: the engine's logits differ by {d}");
        assert_eq!(
            generate(&quantized, &ids, &greedy(12)).unwrap(),
            generate(&reference, &ids, &greedy(12)).unwrap(),
            "{kind:?}: greedy tokens"
        );
    }
}

#[test]
fn routing_on_a_quantized_model_matches_its_dequantized_copy() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = quantized_gguf(dir.path(), QuantType::Q8_0);
    let routers = tiny().join("model-routed");
    let quantized = load_gguf::<Flex>(&gguf, &flex(), StoreDtype::F32)
        .unwrap()
        .model;
    let quantized = attach_routers(quantized, &routers).unwrap();
    let reference = attach_routers(dequantized(&gguf, dir.path()), &routers).unwrap();
    assert_eq!(quantized.routing, Routing::Deterministic);
    let ids = prompts();
    let len = ids[0].len();
    let input = |m: &LlamaForCausalLM<Flex>| {
        let flat: Vec<i64> = ids.iter().flatten().map(|&t| t as i64).collect();
        let t = Tensor::<Flex, 1, Int>::from_ints(flat.as_slice(), &flex());
        m.forward_full(t.reshape([ids.len(), len]), false)
    };
    let (q, r) = (input(&quantized), input(&reference));
    // the routers decide (nearly) alike on the two copies' hidden states ...
    let gates = |o: &skipgpt_model::CausalLmOutput<Flex>| -> Vec<f32> {
        o.attn_gates
            .iter()
            .chain(&o.mlp_gates)
            .flat_map(|g| to_vec(g.clone()))
            .collect()
    };
    let (gq, gr) = (gates(&q), gates(&r));
    let same = gq.iter().zip(&gr).filter(|(a, b)| a == b).count();
    assert!(
        same as f32 >= 0.9 * gr.len() as f32,
        "{same} of {} decisions alike",
        gr.len()
    );
    assert!(
        gr.contains(&0.0),
        "the routers skip something (else this compares nothing)"
    );
    // ... and the engine, which skips the blocks for real, computes what the gated reference
    // computes on the same quantized weights
    let engine =
        engine_logits_in_chunks(&quantized, &ids, &[len - 2, 1, 1], Routing::Deterministic);
    let d = relative_diff(&engine, &to_vec(q.logits));
    assert!(d < 1e-4, "the engine and the gated forward differ by {d}");
}

#[test]
fn an_adapter_on_a_quantized_base_stays_unmerged_and_adds_its_term() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = quantized_gguf(dir.path(), QuantType::Q8_0);
    let adapter = skipgpt_model::load_peft_adapter(&fixtures().join("peft-lora")).unwrap();
    let quantized = load_gguf::<Flex>(&gguf, &flex(), StoreDtype::F32)
        .unwrap()
        .model
        .load_lora(&adapter)
        .unwrap()
        .merge_lora();
    let targeted = &quantized.model.layers[0].self_attn.q_proj;
    assert!(targeted.quantized.is_some() && targeted.lora.is_some());
    let reference = dequantized(&gguf, dir.path())
        .load_lora(&adapter)
        .unwrap()
        .merge_lora();
    let ids = prompts();
    let d = relative_diff(&logits(&quantized, &ids), &logits(&reference, &ids));
    assert!(
        d < 0.02,
        "logits with the adapter differ by {d} of their range"
    );
}

#[test]
fn routers_made_for_another_model_are_refused_naming_the_mismatch() {
    let tiny_model = || {
        load_pretrained::<B>(&tiny().join("model"), &device())
            .unwrap()
            .model
    };
    let other_routers = |edit: fn(&mut LlamaConfig)| {
        let mut config = tiny_model().config.clone();
        edit(&mut config);
        let model = config
            .init::<B>(&device())
            .with_new_routers(RoutingConfig::new());
        let dir = tempfile::tempdir().unwrap();
        save_routers(&model, dir.path()).unwrap();
        dir
    };
    let fewer_layers = other_routers(|c| c.num_hidden_layers = 2);
    let err = attach_routers(tiny_model(), fewer_layers.path())
        .unwrap_err()
        .to_string();
    assert_mentions(
        &err,
        &[
            "routers for 2 layers, but the model has 3",
            "routers.safetensors",
        ],
    );
    let narrower = other_routers(|c| c.hidden_size = 32);
    let err = attach_routers(tiny_model(), narrower.path())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("reads 32 values, but the model's hidden size is 64"),
        "{err}"
    );
    let empty = tempfile::tempdir().unwrap();
    let err = attach_routers(tiny_model(), empty.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("routers.safetensors"), "{err}");
}

#[test]
fn quantize_writes_the_blocks_llama_quantize_would_and_carries_the_metadata_over() {
    use skipgpt_model::io::gguf::{quantize_gguf, GgufFile, GgufValue, QuantizeTarget};
    let dir = tempfile::tempdir().unwrap();
    let source = write_tiny_gguf(dir.path(), "tiny-f32.gguf");
    let out = dir.path().join("tiny-q8_0.gguf");
    let report = quantize_gguf(&source, &out, QuantizeTarget::Q8_0, &mut |_, _, _| {}).unwrap();
    // 3 layers × 6 matrices with 64-value rows, the embedding and the output; the 3 down
    // projections' rows of 176 are no whole number of blocks: F16, as llama-quantize falls
    // back; the 7 norms keep F32
    assert_eq!(report.conversions["F32 → Q8_0"], 3 * 6 + 2);
    assert_eq!(report.conversions["F32 → F16"], 3);
    assert_eq!(report.conversions["F32 kept"], 7);
    assert_eq!(report.requantized, 0);
    assert_eq!(report.bytes_written, std::fs::metadata(&out).unwrap().len());

    // the same bytes as the reference quantizer gives, tensor by tensor
    let written = GgufFile::open(&out).unwrap();
    let expected_path = dir.path().join("expected.gguf");
    let mut expected = llama_tiny_gguf(&tiny().join("model"));
    expected.quantize_matrices(QuantType::Q8_0);
    expected.matrices_to_f16();
    expected.write(&expected_path);
    let expected = GgufFile::open(&expected_path).unwrap();
    assert_eq!(written.tensors.len(), expected.tensors.len());
    for t in &expected.tensors {
        let w = written.tensor(&t.name).expect("every tensor written");
        assert_eq!((w.kind, &w.dims), (t.kind, &t.dims), "{}", t.name);
        assert_eq!(
            written.tensor_bytes(w),
            expected.tensor_bytes(t),
            "{}",
            t.name
        );
    }
    // every key but the file type carried over, tokenizer and chat template included
    let original = GgufFile::open(&source).unwrap();
    for (key, value) in &original.metadata {
        assert_eq!(written.get(key), Some(value), "{key}");
    }
    assert_eq!(written.get("general.file_type"), Some(&GgufValue::U32(7)));
    assert_eq!(
        written.get("general.quantization_version"),
        Some(&GgufValue::U32(2))
    );

    // and it runs as the reference quantizer's file does
    let ids = prompts();
    let load = |p: &Path| {
        load_gguf::<Flex>(p, &flex(), StoreDtype::F32)
            .unwrap()
            .model
    };
    assert_eq!(
        logits(&load(&out), &ids),
        logits(&load(&expected_path), &ids)
    );
}

/// Each type moves the logits by what its precision allows: F16 least, Q8_0 next, the 5-bit
/// types more, the 4-bit types most (the tiny model's 64-value rows are two blocks each, so
/// the bits show).
#[test]
fn each_quantized_type_moves_the_logits_by_its_precision() {
    use skipgpt_model::io::gguf::{quantize_gguf, QuantizeTarget};
    let dir = tempfile::tempdir().unwrap();
    let source = write_tiny_gguf(dir.path(), "tiny-f32.gguf");
    let load = |p: &Path| {
        load_gguf::<Flex>(p, &flex(), StoreDtype::F32)
            .unwrap()
            .model
    };
    let ids = prompts();
    let reference = logits(&load(&source), &ids);
    let mut diff = std::collections::BTreeMap::new();
    for target in [
        QuantizeTarget::F16,
        QuantizeTarget::Q8_0,
        QuantizeTarget::Q5_1,
        QuantizeTarget::Q5_0,
        QuantizeTarget::Q4_1,
        QuantizeTarget::Q4_0,
    ] {
        let out = dir.path().join(format!("tiny-{target:?}.gguf"));
        quantize_gguf(&source, &out, target, &mut |_, _, _| {}).unwrap();
        let d = relative_diff(&logits(&load(&out), &ids), &reference);
        eprintln!("{target:?}: logits differ by {d} of their range");
        diff.insert(format!("{target:?}"), d);
    }
    assert!(diff["F16"] > 0.0 && diff["F16"] < 2e-3, "{diff:?}");
    assert!(
        diff["Q8_0"] > diff["F16"] && diff["Q8_0"] < 0.05,
        "{diff:?}"
    );
    for five_bit in ["Q5_0", "Q5_1"] {
        assert!(
            diff[five_bit] > diff["Q8_0"] && diff[five_bit] < 0.3,
            "{diff:?}"
        );
    }
    for four_bit in ["Q4_0", "Q4_1"] {
        let most_five_bit = diff["Q5_0"].max(diff["Q5_1"]);
        assert!(
            diff[four_bit] > most_five_bit && diff[four_bit] < 0.5,
            "{diff:?}"
        );
    }
}

#[test]
fn quantize_refuses_to_overwrite_its_input_and_names_a_broken_source() {
    use skipgpt_model::io::gguf::{quantize_gguf, QuantizeTarget};
    let dir = tempfile::tempdir().unwrap();
    let source = write_tiny_gguf(dir.path(), "tiny.gguf");
    let before = std::fs::read(&source).unwrap();
    let err = quantize_gguf(&source, &source, QuantizeTarget::Q8_0, &mut |_, _, _| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("the output is the input file"), "{err}");
    assert_eq!(std::fs::read(&source).unwrap(), before);

    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &before[..before.len() / 2]).unwrap();
    let out = dir.path().join("out.gguf");
    let err = quantize_gguf(&truncated, &out, QuantizeTarget::Q8_0, &mut |_, _, _| {})
        .unwrap_err()
        .to_string();
    assert_mentions(&err, &["truncated.gguf", "truncated"]);
    assert!(!out.exists(), "nothing written");
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(left.len(), 2, "no temporary file left behind");
}

/// `quantize --model DIR`: the directory seen as llama.cpp's converter writes it (q/k rows
/// permuted, GGUF names) quantizes to the same tensors as the converted file does, and its
/// hyperparameters and tokenizer come back from the GGUF as they were.
#[test]
fn a_model_directory_quantizes_to_what_its_converted_gguf_quantizes_to() {
    use skipgpt_model::io::gguf::{gguf_file_tokenizer, quantize_gguf, GgufFile, QuantizeTarget};
    let dir = tempfile::tempdir().unwrap();
    let model_dir = tiny().join("model");
    let converted = dir.path().join("converted.gguf");
    llama_tiny_gguf(&model_dir).write(&converted);
    let q8 = |source: &Path, name: &str| {
        let out = dir.path().join(name);
        quantize_gguf(source, &out, QuantizeTarget::Q8_0, &mut |_, _, _| {}).unwrap();
        GgufFile::open(&out).unwrap()
    };
    let (ours, theirs) = (q8(&model_dir, "dir.gguf"), q8(&converted, "file.gguf"));
    assert_eq!(ours.tensors.len(), theirs.tensors.len());
    for t in &theirs.tensors {
        let o = ours.tensor(&t.name).expect("every tensor exported");
        assert_eq!((o.kind, &o.dims), (t.kind, &t.dims), "{}", t.name);
        assert_eq!(ours.tensor_bytes(o), theirs.tensor_bytes(t), "{}", t.name);
    }

    // the F32 export runs as the directory does, with the directory's tokenizer
    let f32_out = dir.path().join("dir-f32.gguf");
    quantize_gguf(&model_dir, &f32_out, QuantizeTarget::F32, &mut |_, _, _| {}).unwrap();
    let from_gguf = load_gguf::<Flex>(&f32_out, &flex(), StoreDtype::F32)
        .unwrap()
        .model;
    let from_dir = load_pretrained::<Flex>(&model_dir, &flex()).unwrap().model;
    assert_eq!(from_gguf.config.num_key_value_heads, 2);
    // GGUF keeps the epsilon in f32
    let eps = from_dir.config.rms_norm_eps as f32;
    assert_eq!(from_gguf.config.rms_norm_eps as f32, eps);
    let ids = prompts();
    let d = max_abs_diff(&logits(&from_gguf, &ids), &logits(&from_dir, &ids));
    assert!(d < 1e-4, "logits differ by {d}");
    let text = "the old dog keeps 12 long roads";
    let dir_tokenizer = skipgpt_model::Tokenizer::from_file(&model_dir.join("tokenizer.json"));
    assert_eq!(
        gguf_file_tokenizer(&f32_out).unwrap().encode(text).unwrap(),
        dir_tokenizer.unwrap().encode(text).unwrap()
    );
}

#[test]
fn a_directory_with_rope_scaling_is_refused_naming_the_key() {
    use skipgpt_model::io::gguf::{quantize_gguf, QuantizeTarget};
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(tiny().join("model").join(f), model.join(f)).unwrap();
    }
    let config = std::fs::read_to_string(tiny().join("model/config.json")).unwrap();
    let scaled = config.replace(
        "\"rope_scaling\": null",
        "\"rope_scaling\": {\"type\": \"linear\", \"factor\": 2.0}",
    );
    std::fs::write(model.join("config.json"), scaled).unwrap();
    let out = dir.path().join("out.gguf");
    let err = quantize_gguf(&model, &out, QuantizeTarget::Q8_0, &mut |_, _, _| {})
        .expect_err("refused")
        .to_string();
    assert_mentions(&err, &["rope_scaling", "convert_hf_to_gguf"]);
    assert!(!out.exists());
}
