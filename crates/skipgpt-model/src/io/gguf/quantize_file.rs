//! A GGUF (or a LLaMA model directory, as `convert_hf_to_gguf.py` would write it) rewritten
//! with its matrices in another type, as `llama-quantize` does: each matrix gets the type
//! llama.cpp would give it ([`tensor_types`]) and is dequantized and quantized again
//! (`skipgpt_kernels::quant::quantize`, byte for byte llama.cpp's reference quantizers);
//! norms and other vectors keep the type and bytes they had. The metadata (architecture,
//! hyperparameters, tokenizer, chat template) is carried over unchanged but for
//! `general.file_type`, which names the new type, and `general.quantization_version`.
//!
//! A tensor is read from the map, converted and written before the next one is read, so memory
//! holds one tensor's values at a time.

use std::collections::BTreeMap;
use std::path::Path;

use half::f16;
use skipgpt_kernels::quant::quantize;

use super::export::DirAsGguf;
use super::quant::GgmlType;
use super::reader::{GgufFile, GgufValue, TensorInfo};
use super::tensor_types::tensor_types;
pub use super::tensor_types::QuantizeTarget;
use super::writer::{write_gguf, TensorPlan};
use super::GgufError;

/// What a quantization did.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizeReport {
    /// Tensor count per conversion, e.g. `{"Q4_1 → Q8_0": 210, "F32 kept": 61}`.
    pub conversions: BTreeMap<String, usize>,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Tensors quantized from another block format: their values are the source's rounded
    /// values, rounded again, so the file cannot be more accurate than the source (written
    /// as F32 or F16 they are only dequantized, and do not count).
    pub requantized: usize,
}

/// What is quantized: a GGUF file, or a model directory seen as the GGUF llama.cpp's
/// converter would write from it.
enum Source {
    File(GgufFile),
    Dir(DirAsGguf),
}

impl Source {
    fn open(path: &Path) -> Result<Self, GgufError> {
        Ok(if path.is_dir() {
            Source::Dir(DirAsGguf::open(path)?)
        } else {
            Source::File(GgufFile::open(path)?)
        })
    }

    fn path(&self) -> &Path {
        match self {
            Source::File(g) => g.path(),
            Source::Dir(d) => d.path(),
        }
    }

    fn tensors(&self) -> &[TensorInfo] {
        match self {
            Source::File(g) => &g.tensors,
            Source::Dir(d) => &d.tensors,
        }
    }

    fn metadata(&self) -> Vec<(String, GgufValue)> {
        match self {
            Source::File(g) => g.metadata.clone().into_iter().collect(),
            Source::Dir(d) => d.metadata.clone(),
        }
    }

    /// Tensor `i` in `to`: its own bytes where the type stays, else its values converted.
    fn convert(&self, i: usize, to: GgmlType) -> Result<Vec<u8>, GgufError> {
        let t = &self.tensors()[i];
        let values = match self {
            Source::File(g) if to == t.kind => return Ok(g.tensor_bytes(t).to_vec()),
            Source::File(g) => g.tensor_f32(t),
            Source::Dir(d) => d.values(i)?,
        };
        if let Some(bad) = values.iter().position(|v| !v.is_finite()) {
            return Err(GgufError::BadTensor {
                path: self.path().to_path_buf(),
                name: t.name.clone(),
                message: format!("element {bad} is {}", values[bad]),
            });
        }
        Ok(match to {
            GgmlType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            GgmlType::F16 => values
                .iter()
                .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                .collect(),
            _ => {
                let format = to.block_format().expect("a quantized target");
                quantize(format, &values).expect("rows of whole blocks of a quantizable format")
            }
        })
    }
}

/// Writes `source` (a GGUF file, or a LLaMA model directory) with its matrices in `target` to
/// `out`. `progress(done, total, tensor)` is called after each tensor with the source bytes
/// handled so far.
pub fn quantize_gguf(
    source: &Path,
    out: &Path,
    target: QuantizeTarget,
    progress: &mut dyn FnMut(u64, u64, &str),
) -> Result<QuantizeReport, GgufError> {
    let src = Source::open(source)?;
    if same_file(source, out) {
        return Err(GgufError::Invalid {
            path: out.to_path_buf(),
            message: "the output is the input file; write the quantized model to another path"
                .into(),
        });
    }
    let tensors = src.tensors();
    let plan: Vec<TensorPlan> = tensors
        .iter()
        .zip(tensor_types(tensors, target))
        .map(|(t, kind)| TensorPlan {
            name: t.name.clone(),
            dims: t.dims.clone(),
            kind,
        })
        .collect();
    let metadata = metadata(src.metadata(), target);
    let mut report = QuantizeReport {
        conversions: BTreeMap::new(),
        bytes_read: 0,
        bytes_written: 0,
        requantized: 0,
    };
    let total: u64 = tensors.iter().map(TensorInfo::byte_len).sum();
    report.bytes_written = write_gguf(out, &metadata, &plan, &mut |i| {
        let (t, to) = (&tensors[i], plan[i].kind);
        let bytes = src.convert(i, to)?;
        let what = if to == t.kind {
            format!("{} kept", t.kind.name())
        } else {
            format!("{} → {}", t.kind.name(), to.name())
        };
        *report.conversions.entry(what).or_default() += 1;
        if to != t.kind && t.kind.block_format().is_some() && to.block_format().is_some() {
            report.requantized += 1;
        }
        report.bytes_read += t.byte_len();
        progress(report.bytes_read, total, &t.name);
        Ok(bytes)
    })?;
    Ok(report)
}

/// The source's metadata, with the file type set to the target's (and the alignment left to
/// the writer's default).
fn metadata(source: Vec<(String, GgufValue)>, target: QuantizeTarget) -> Vec<(String, GgufValue)> {
    let mut meta: Vec<(String, GgufValue)> = source
        .into_iter()
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "general.alignment" | "general.file_type" | "general.quantization_version"
            )
        })
        .collect();
    // llama.cpp reads keys by name; the architecture goes first as its converter writes it
    meta.sort_by_key(|(k, _)| k != "general.architecture");
    meta.push((
        "general.file_type".into(),
        GgufValue::U32(target.file_type()),
    ));
    // written whatever the type, as llama-quantize does
    meta.push(("general.quantization_version".into(), GgufValue::U32(2)));
    meta
}

/// Whether two paths name one file (the second need not exist).
fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}
