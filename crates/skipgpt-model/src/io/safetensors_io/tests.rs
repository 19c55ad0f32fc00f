//! Round trips through every stored type, and the errors of broken files.

use std::collections::BTreeMap;

use super::*;

#[test]
fn write_then_read_all_dtypes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.safetensors");
    let vals = [1.0f32, -2.5, 0.15625, 3.0e-3];
    let mut map = BTreeMap::new();
    for (name, dt) in [
        ("f32", StoreDtype::F32),
        ("bf16", StoreDtype::BF16),
        ("f16", StoreDtype::F16),
    ] {
        map.insert(
            name.to_string(),
            OwnedTensor::from_f32(&vals, vec![2, 2], dt),
        );
    }
    map.insert("ids".into(), OwnedTensor::from_i64(&[1, -2, 3], vec![3]));
    write_safetensors(&path, &map, None).unwrap();
    let f = TensorFile::open(&path).unwrap();
    assert_eq!(f.read_f32("f32").unwrap(), (vals.to_vec(), vec![2, 2]));
    let (bf, _) = f.read_f32("bf16").unwrap();
    for (a, b) in vals.iter().zip(&bf) {
        assert!((a - b).abs() <= a.abs() / 128.0, "{a} vs {b}");
    }
    assert_eq!(f.read_i64("ids").unwrap().0, vec![1, -2, 3]);
    let err = f.read_f32("ids").unwrap_err().to_string();
    assert!(err.contains("ids") && err.contains("I64"), "{err}");
    let err = f.read_f32("nope").unwrap_err().to_string();
    assert!(
        err.contains("nope") && err.contains("t.safetensors"),
        "{err}"
    );
}

#[test]
fn truncated_file_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.safetensors");
    let mut map = BTreeMap::new();
    map.insert(
        "w".to_string(),
        OwnedTensor::from_f32(&[0.0; 64], vec![64], StoreDtype::F32),
    );
    write_safetensors(&path, &map, None).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    for cut in [4, 20, bytes.len() - 10] {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let err = TensorFile::open(&path)
            .err()
            .expect("truncated file must fail")
            .to_string();
        assert!(
            err.contains("t.safetensors") && err.contains("trunc"),
            "{err}"
        );
    }
}
