//! A GGUF rewritten with its matrices in another type, as `llama-quantize` does: every 2-D
//! tensor whose rows are whole blocks of the target type is dequantized and quantized again
//! (`skipgpt_kernels::quant::quantize`); norms and other vectors, and matrices whose rows are
//! no whole number of blocks, keep the type and bytes they had. The metadata (architecture,
//! hyperparameters, tokenizer, chat template) is carried over unchanged but for
//! `general.file_type`, which names the new type, and `general.quantization_version`.
//!
//! A tensor is read from the map, converted and written before the next one is read, so memory
//! holds one tensor's values at a time.

use std::collections::BTreeMap;
use std::path::Path;

use half::f16;
use skipgpt_kernels::quant::quantize;

use super::quant::GgmlType;
use super::reader::{GgufFile, GgufValue, TensorInfo};
use super::writer::{write_gguf, TensorPlan};
use super::GgufError;

/// The types `skipgpt quantize` writes.
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantizeTarget {
    #[cfg_attr(feature = "clap", value(name = "q8_0"))]
    Q8_0,
    #[cfg_attr(feature = "clap", value(name = "q4_0"))]
    Q4_0,
    #[cfg_attr(feature = "clap", value(name = "q4_1"))]
    Q4_1,
    F16,
    F32,
}

impl QuantizeTarget {
    /// The tensor type the matrices get.
    pub fn tensor_type(self) -> GgmlType {
        match self {
            QuantizeTarget::Q8_0 => GgmlType::Q8_0,
            QuantizeTarget::Q4_0 => GgmlType::Q4_0,
            QuantizeTarget::Q4_1 => GgmlType::Q4_1,
            QuantizeTarget::F16 => GgmlType::F16,
            QuantizeTarget::F32 => GgmlType::F32,
        }
    }

    /// llama.cpp's `llama_ftype` for `general.file_type` (`LLAMA_FTYPE_MOSTLY_*`).
    pub fn file_type(self) -> u32 {
        match self {
            QuantizeTarget::F32 => 0,
            QuantizeTarget::F16 => 1,
            QuantizeTarget::Q4_0 => 2,
            QuantizeTarget::Q4_1 => 3,
            QuantizeTarget::Q8_0 => 7,
        }
    }
}

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

/// Writes `source` with its matrices in `target` to `out`. `progress(done, total, tensor)` is
/// called after each tensor with the source bytes handled so far.
pub fn quantize_gguf(
    source: &Path,
    out: &Path,
    target: QuantizeTarget,
    progress: &mut dyn FnMut(u64, u64, &str),
) -> Result<QuantizeReport, GgufError> {
    let gguf = GgufFile::open(source)?;
    if same_file(source, out) {
        return Err(GgufError::Invalid {
            path: out.to_path_buf(),
            message: "the output is the input file; write the quantized model to another path"
                .into(),
        });
    }
    let plan: Vec<TensorPlan> = gguf
        .tensors
        .iter()
        .map(|t| TensorPlan {
            name: t.name.clone(),
            dims: t.dims.clone(),
            kind: new_type(t, target),
        })
        .collect();
    let metadata = metadata(&gguf, target);
    let mut report = QuantizeReport {
        conversions: BTreeMap::new(),
        bytes_read: 0,
        bytes_written: 0,
        requantized: 0,
    };
    let total: u64 = gguf
        .tensors
        .iter()
        .map(|t| gguf.tensor_bytes(t).len() as u64)
        .sum();
    report.bytes_written = write_gguf(out, &metadata, &plan, &mut |i| {
        let (t, to) = (&gguf.tensors[i], plan[i].kind);
        let bytes = convert(&gguf, t, to)?;
        let what = if to == t.kind {
            format!("{} kept", t.kind.name())
        } else {
            format!("{} → {}", t.kind.name(), to.name())
        };
        *report.conversions.entry(what).or_default() += 1;
        if to != t.kind && t.kind.block_format().is_some() && to.block_format().is_some() {
            report.requantized += 1;
        }
        report.bytes_read += gguf.tensor_bytes(t).len() as u64;
        progress(report.bytes_read, total, &t.name);
        Ok(bytes)
    })?;
    Ok(report)
}

/// The type a tensor is written in: the target for a matrix whose rows are whole blocks of
/// it, its own type otherwise.
fn new_type(t: &TensorInfo, target: QuantizeTarget) -> GgmlType {
    let to = target.tensor_type();
    let whole_blocks = t.dims[0].is_multiple_of(to.block_elements() as u64);
    if t.dims.len() == 2 && whole_blocks {
        to
    } else {
        t.kind
    }
}

/// A tensor's bytes in `to`: its own bytes where the type stays, else its values converted.
fn convert(gguf: &GgufFile, t: &TensorInfo, to: GgmlType) -> Result<Vec<u8>, GgufError> {
    if to == t.kind {
        return Ok(gguf.tensor_bytes(t).to_vec());
    }
    let values = gguf.tensor_f32(t);
    if let Some(bad) = values.iter().position(|v| !v.is_finite()) {
        return Err(GgufError::BadTensor {
            path: gguf.path().to_path_buf(),
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

/// The source's metadata, with the file type set to the target's (and the alignment left to
/// the writer's default).
fn metadata(gguf: &GgufFile, target: QuantizeTarget) -> Vec<(String, GgufValue)> {
    let mut meta: Vec<(String, GgufValue)> = gguf
        .metadata
        .iter()
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "general.alignment" | "general.file_type" | "general.quantization_version"
            )
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    // llama.cpp reads keys by name; the architecture goes first as its converter writes it
    meta.sort_by_key(|(k, _)| k != "general.architecture");
    meta.push((
        "general.file_type".into(),
        GgufValue::U32(target.file_type()),
    ));
    if target.tensor_type().block_format().is_some() {
        meta.push(("general.quantization_version".into(), GgufValue::U32(2)));
    }
    meta
}

/// Whether two paths name one file (the second need not exist).
fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}
