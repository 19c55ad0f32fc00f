//! Values that are valid JSON but not a usable model are refused, naming the file, the key and
//! the value; a config that contradicts its weights is refused; tensors the model does not use
//! are named in a warning.

mod common;

use common::*;
use skipgpt_model::load_pretrained;

/// The tiny model with `config.json` edited by `edit`.
fn with_config(edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let dir = copy_dir(&tiny().join("model"));
    let path = dir.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&path, cfg.to_string()).unwrap();
    dir
}

fn load_error(dir: &tempfile::TempDir) -> String {
    match load_pretrained::<B>(dir.path(), &device()) {
        Ok(_) => panic!("{} loaded", dir.path().display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn out_of_range_config_values_are_named() {
    for (key, value, needle) in [
        ("rope_theta", serde_json::json!(0), "rope_theta"),
        ("rope_theta", serde_json::json!(-10000.0), "rope_theta"),
        ("rms_norm_eps", serde_json::json!(-1e-5), "rms_norm_eps"),
        (
            "max_position_embeddings",
            serde_json::json!(0),
            "max_position_embeddings",
        ),
        ("head_dim", serde_json::json!(0), "head_dim"),
        ("hidden_size", serde_json::json!(0), "hidden_size"),
    ] {
        let dir = with_config(|c| c[key] = value.clone());
        let err = load_error(&dir);
        assert!(
            err.contains(needle) && err.contains("config.json"),
            "{key} = {value}: {err}"
        );
    }
    let dir = with_config(|c| {
        c["rope_scaling"] = serde_json::json!({"rope_type": "linear", "factor": 0.0})
    });
    let err = load_error(&dir);
    assert!(err.contains("rope_scaling.factor"), "{err}");
}

#[test]
fn fewer_layers_in_the_config_than_in_the_weights_is_an_error() {
    let dir = with_config(|c| c["num_hidden_layers"] = 2.into());
    let err = load_error(&dir);
    assert!(
        err.contains("num_hidden_layers") && err.contains("layer 2"),
        "{err}"
    );
    // inspect checks the same, and the shapes, without loading the weights
    let dir = with_config(|c| c["intermediate_size"] = 1_000_000_000_000u64.into());
    let out = skipgpt(&["inspect", "--model", dir.path().to_str().unwrap()]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("gate_proj") && err.contains("does not describe the weights"),
        "{err}"
    );
}

#[test]
fn a_target_sparsity_outside_zero_to_one_is_refused() {
    let dir = copy_dir(&tiny().join("model-routed"));
    // the fixture's routers come with the default config; write it out, saying 1.5
    let mut cfg: serde_json::Value =
        serde_json::from_str(&skipgpt_model::RoutingConfig::new().to_json()).unwrap();
    cfg["target_sparsity"] = 1.5.into();
    std::fs::write(dir.path().join("skipgpt.json"), cfg.to_string()).unwrap();
    let err = load_error(&dir);
    assert!(
        err.contains("target_sparsity") && err.contains("1.5") && err.contains("skipgpt.json"),
        "{err}"
    );
}

#[test]
fn tensors_the_model_does_not_use_are_named_in_a_warning() {
    use skipgpt_model::safetensors_io::{write_safetensors, OwnedTensor, TensorFile};
    use skipgpt_model::StoreDtype;
    let dir = copy_dir(&tiny().join("model"));
    let path = dir.path().join("model.safetensors");
    let file = TensorFile::open(&path).unwrap();
    let mut tensors = std::collections::BTreeMap::new();
    for name in file.names() {
        let (values, shape) = file.read_f32(&name).unwrap();
        tensors.insert(name, OwnedTensor::from_f32(&values, shape, StoreDtype::F32));
    }
    drop(file);
    tensors.insert(
        "model.layers.0.self_attn.extra_scale".into(),
        OwnedTensor::from_f32(&[1.0], vec![1], StoreDtype::F32),
    );
    write_safetensors(&path, &tensors, None).unwrap();
    let pretrained = load_pretrained::<B>(dir.path(), &device()).unwrap();
    assert_eq!(
        pretrained.unused_tensors,
        vec!["model.layers.0.self_attn.extra_scale".to_string()]
    );
    let out = skipgpt(&[
        "generate",
        "--model",
        dir.path().to_str().unwrap(),
        "--prompt-ids",
        "1,2",
        "--max-new-tokens",
        "1",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("warning") && stderr(&out).contains("extra_scale"),
        "{}",
        stderr(&out)
    );
}

/// Messages that name the problem: a directory where a file belongs, a header entry whose
/// bytes do not hold its tensor, a JSON file that is not a tokenizer.
#[test]
fn broken_files_are_described_by_what_is_wrong() {
    use skipgpt_model::safetensors_io::TensorFile;
    // model.safetensors is a directory
    let dir = copy_dir(&tiny().join("model"));
    let weights = dir.path().join("model.safetensors");
    let original = std::fs::read(&weights).unwrap();
    std::fs::remove_file(&weights).unwrap();
    std::fs::create_dir(&weights).unwrap();
    let err = load_error(&dir);
    assert!(err.contains("is a directory"), "{err}");
    std::fs::remove_dir(&weights).unwrap();

    // one tensor's byte range too short for its shape: the message names it
    let len = u64::from_le_bytes(original[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&original[8..8 + len]).unwrap();
    let name = "model.norm.weight";
    let offsets = header[name]["data_offsets"].clone();
    let (start, end) = (offsets[0].as_u64().unwrap(), offsets[1].as_u64().unwrap());
    header[name]["shape"] = serde_json::json!([(end - start) / 4 + 1]);
    let mut text = serde_json::to_vec(&header).unwrap();
    text.resize(text.len().div_ceil(8) * 8, b' ');
    let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
    bytes.extend(&text);
    bytes.extend(&original[8 + len..]);
    std::fs::write(&weights, bytes).unwrap();
    let err = TensorFile::open(&weights).err().unwrap().to_string();
    assert!(err.contains(name) && err.contains("data_offsets"), "{err}");

    // tokenizer.json that is JSON but not a tokenizer
    let dir = copy_dir(&tiny().join("model"));
    std::fs::write(dir.path().join("tokenizer.json"), r#"{"hello": 1}"#).unwrap();
    let err = load_error(&dir);
    assert!(err.contains("not a tokenizer.json"), "{err}");

    // `logits --input` a directory
    let out = tempfile::tempdir().unwrap();
    let model = tiny().join("model");
    let output = out.path().join("o.safetensors");
    let args = logits_args(model.to_str().unwrap(), out.path(), &output);
    assert_clean_failure(&args, &["is a directory"]);
}
