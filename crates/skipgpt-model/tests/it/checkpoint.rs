//! Saving and reloading model directories.

use skipgpt_model::io::safetensors_io::TensorFile;
use skipgpt_model::{load_pretrained, save_pretrained, LlamaConfig, StoreDtype};
use skipgpt_test_support::*;

#[test]
fn f32_round_trip_is_exact() {
    let model = load_pretrained::<B>(&tiny().join("model"), &device()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    save_pretrained(
        &model.model,
        model.tokenizer.as_ref(),
        dir.path(),
        StoreDtype::F32,
    )
    .unwrap();
    let again = load_pretrained::<B>(dir.path(), &device()).unwrap();
    assert_eq!(again.model.config, model.model.config);
    assert!(again.tokenizer.is_some());
    let ids = ids_tensor(&reference(&tiny()), "input_ids");
    let a = to_vec(model.model.forward(ids.clone()));
    let b = to_vec(again.model.forward(ids));
    assert_eq!(a, b);
    // no temporary files left behind
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
}

#[test]
fn bf16_storage_rounds_each_weight() {
    let model = load_pretrained::<B>(&tiny().join("model"), &device()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    save_pretrained(&model.model, None, dir.path(), StoreDtype::BF16).unwrap();
    let again = load_pretrained::<B>(dir.path(), &device()).unwrap();
    assert_eq!(again.model.config.dtype, "bfloat16");
    let orig = TensorFile::open(&tiny().join("model/model.safetensors")).unwrap();
    let saved = TensorFile::open(&dir.path().join("model.safetensors")).unwrap();
    assert_eq!(orig.names(), saved.names());
    let name = "model.layers.0.self_attn.q_proj.weight";
    let (a, _) = orig.read_f32(name).unwrap();
    let (b, _) = saved.read_f32(name).unwrap();
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(half::bf16::from_f32(*x).to_f32(), *y);
    }
}

#[test]
fn tied_head_is_not_stored_and_reloads() {
    let mut cfg = LlamaConfig::tiny(512);
    cfg.tie_word_embeddings = true;
    let model = cfg.init::<B>(&device());
    assert!(model.lm_head.is_none());
    let dir = tempfile::tempdir().unwrap();
    save_pretrained(&model, None, dir.path(), StoreDtype::F32).unwrap();
    let file = TensorFile::open(&dir.path().join("model.safetensors")).unwrap();
    assert!(!file.contains("lm_head.weight"));
    assert_eq!(file.names().len(), 2 + 9 * 3);
    let again = load_pretrained::<B>(dir.path(), &device()).unwrap();
    let ids = ids_tensor(&reference(&tiny()), "input_ids");
    assert_eq!(
        to_vec(model.forward(ids.clone())),
        to_vec(again.model.forward(ids))
    );
}

#[test]
fn shard_index_naming_a_missing_file_is_an_error() {
    let src = variant("llama3_tied_bf16_sharded").join("model");
    let dir = copy_dir(&src);
    std::fs::remove_file(dir.path().join("model-00002-of-00003.safetensors")).unwrap();
    let err = load_pretrained::<B>(dir.path(), &device())
        .err()
        .expect("must fail")
        .to_string();
    assert!(err.contains("model-00002-of-00003.safetensors"), "{err}");
}
