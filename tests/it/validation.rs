//! Values that are valid JSON but not a usable model are refused, naming the file, the key and
//! the value; a config that contradicts its weights is refused; tensors the model does not use
//! are named in a warning.

use std::path::Path;

use crate::common::*;
use skipgpt_model::load_pretrained;

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
        let dir = edit_config(|c| c[key] = value.clone());
        let err = load_error(&dir);
        assert!(
            err.contains(needle) && err.contains("config.json"),
            "{key} = {value}: {err}"
        );
    }
    let dir = edit_config(|c| {
        c["rope_scaling"] = serde_json::json!({"rope_type": "linear", "factor": 0.0})
    });
    let err = load_error(&dir);
    assert!(err.contains("rope_scaling.factor"), "{err}");
}

#[test]
fn fewer_layers_in_the_config_than_in_the_weights_is_an_error() {
    let dir = edit_config(|c| c["num_hidden_layers"] = 2.into());
    let err = load_error(&dir);
    assert_mentions(&err, &["num_hidden_layers", "layer 2"]);
    // inspect checks the same, and the shapes, without loading the weights
    let dir = edit_config(|c| c["intermediate_size"] = 1_000_000_000_000u64.into());
    let out = skipgpt(&["inspect", "--model", dir.path().to_str().unwrap()]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_mentions(&err, &["gate_proj", "does not describe the weights"]);
}

#[test]
fn a_target_sparsity_outside_zero_to_one_is_refused() {
    let dir = copy_dir(&tiny().join("model-routed"));
    // the fixture's routers come with the default config; write it out, saying 1.5
    let mut cfg = default_routing_json();
    cfg["target_sparsity"] = 1.5.into();
    write_routing(&dir, &cfg);
    let err = load_error(&dir);
    assert_mentions(&err, &["target_sparsity", "1.5", "skipgpt.json"]);
}

#[test]
fn a_skipgpt_json_from_before_target_unit_counts_modules() {
    let dir = copy_dir(&tiny().join("model-routed"));
    let mut cfg = default_routing_json();
    cfg.as_object_mut().unwrap().remove("target_unit").unwrap();
    write_routing(&dir, &cfg);
    let model = load_pretrained::<B>(dir.path(), &device()).unwrap();
    let routing = model.model.routing_config.expect("routers load");
    assert_eq!(routing.target_unit, skipgpt_model::SparsityUnit::Modules);
    // and an unknown unit is named
    cfg["target_unit"] = "flops".into();
    write_routing(&dir, &cfg);
    let err = load_error(&dir);
    assert_mentions(&err, &["flops", "skipgpt.json"]);
}

#[test]
fn tensors_the_model_does_not_use_are_named_in_a_warning() {
    use skipgpt_model::io::safetensors_io::{write_safetensors, OwnedTensor, TensorFile};
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
    use skipgpt_model::io::safetensors_io::TensorFile;
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

/// Issue 17, class 9: a seeded mutation loop over what users hand the program, asserting that
/// nothing panics: every mutated `config.json` value, safetensors header byte and GGUF header
/// byte either loads or gives an error with a message. `SKIPGPT_MUTATIONS` sets the number of
/// mutations per kind (CI: the default 150; a long run: `SKIPGPT_MUTATIONS=5000`), and
/// `SKIPGPT_MUTATION_SEED` the seed (default 17).
#[test]
fn mutated_inputs_never_panic() {
    use rand::{rngs::StdRng, Rng, SeedableRng};
    use skipgpt_model::io::gguf::{import_gguf, ImportOptions};
    let n: usize = std::env::var("SKIPGPT_MUTATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150);
    let seed: u64 = std::env::var("SKIPGPT_MUTATION_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(17);
    let mut rng = StdRng::seed_from_u64(seed);
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut panics: Vec<String> = Vec::new();
    let mut refused = 0usize;
    let mut check =
        |what: String, f: &mut dyn FnMut() -> Option<String>| match std::panic::catch_unwind(
            std::panic::AssertUnwindSafe(f),
        ) {
            Ok(Some(message)) if message.trim().is_empty() => {
                panics.push(format!("{what}: an error without a message"))
            }
            Ok(Some(_)) => refused += 1,
            Ok(None) => {}
            Err(p) => panics.push(format!(
                "{what}: panicked: {}",
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            )),
        };
    let load = |dir: &Path| -> Option<String> {
        load_pretrained::<B>(dir, &device())
            .err()
            .map(|e| e.to_string())
    };

    // config.json: one key set to a hostile value
    let values = [
        serde_json::json!(0),
        serde_json::json!(-1),
        serde_json::json!(1e308),
        serde_json::json!(-0.0),
        serde_json::json!(0.5),
        serde_json::json!(1u64 << 40),
        serde_json::json!("text"),
        serde_json::json!(null),
        serde_json::json!([]),
        serde_json::json!({}),
        serde_json::json!(true),
        serde_json::json!({"rope_type": "dynamic", "factor": -2}),
    ];
    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny().join("model/config.json")).unwrap())
            .unwrap();
    let keys: Vec<String> = base.as_object().unwrap().keys().cloned().collect();
    let dir = copy_dir(&tiny().join("model"));
    for _ in 0..n {
        let mut cfg = base.clone();
        let key = &keys[rng.random_range(0..keys.len())];
        let value = values[rng.random_range(0..values.len())].clone();
        cfg[key] = value.clone();
        std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
        check(format!("config.json {key} = {value}"), &mut || {
            load(dir.path())
        });
    }
    std::fs::write(dir.path().join("config.json"), base.to_string()).unwrap();

    // model.safetensors: one byte of the length prefix or header replaced
    let weights = std::fs::read(tiny().join("model/model.safetensors")).unwrap();
    let header_end = 8 + u64::from_le_bytes(weights[..8].try_into().unwrap()) as usize;
    for _ in 0..n {
        let mut bytes = weights.clone();
        let at = rng.random_range(0..header_end);
        bytes[at] = rng.random();
        std::fs::write(dir.path().join("model.safetensors"), &bytes).unwrap();
        check(format!("model.safetensors byte {at}"), &mut || {
            load(dir.path())
        });
    }

    // GGUF: one byte of the header (metadata and tensor infos) replaced
    let gguf_dir = tempfile::tempdir().unwrap();
    let gguf = crate::common::gguf_writer::llama_tiny_gguf(&tiny().join("model")).to_bytes();
    let path = gguf_dir.path().join("m.gguf");
    // the header is what precedes the tensor data: about the first tenth of this file
    let header = (gguf.len() / 10).max(64).min(gguf.len());
    for i in 0..n {
        let mut bytes = gguf.clone();
        let at = rng.random_range(0..header);
        bytes[at] = rng.random();
        std::fs::write(&path, &bytes).unwrap();
        let out = gguf_dir.path().join(format!("out{i}"));
        check(format!("gguf byte {at}"), &mut || {
            import_gguf(&path, &out, &ImportOptions::default(), &mut |_, _, _| {})
                .err()
                .map(|e| e.to_string())
        });
    }
    std::panic::set_hook(quiet);
    eprintln!(
        "{} mutated inputs (seed {seed}): {refused} refused with a message, the rest loaded",
        3 * n
    );
    // the mutations must bite: most of them make the input unusable
    assert!(
        refused > n,
        "only {refused} of {} mutations were refused",
        3 * n
    );
    assert!(
        panics.is_empty(),
        "{} of {} mutations (seed {seed}) panicked or gave no message:\n{}",
        panics.len(),
        3 * n,
        panics.join("\n")
    );
}

/// The default `skipgpt.json` as JSON, to be changed by a test and written out.
fn default_routing_json() -> serde_json::Value {
    serde_json::from_str(&skipgpt_model::RoutingConfig::new().to_json()).unwrap()
}

/// `cfg` written as the model directory's `skipgpt.json`.
fn write_routing(dir: &tempfile::TempDir, cfg: &serde_json::Value) {
    std::fs::write(dir.path().join("skipgpt.json"), cfg.to_string()).unwrap();
}
