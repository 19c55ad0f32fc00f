//! Tensors held in the type they are written in, and writing them as one safetensors file.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use burn::tensor::{backend::Backend, Tensor};
use safetensors::tensor::Dtype;

use crate::error::{ModelError, Result};

/// Storage precision for floats written to safetensors.
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreDtype {
    #[default]
    F32,
    BF16,
    F16,
}

impl StoreDtype {
    pub fn hf_name(self) -> &'static str {
        match self {
            StoreDtype::F32 => "float32",
            StoreDtype::BF16 => "bfloat16",
            StoreDtype::F16 => "float16",
        }
    }
}

/// A tensor ready to be written: its bytes are already little-endian in `dtype`.
#[derive(Debug, Clone)]
pub struct OwnedTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl OwnedTensor {
    pub fn from_f32(values: &[f32], shape: Vec<usize>, dtype: StoreDtype) -> Self {
        let (dtype, bytes) = match dtype {
            StoreDtype::F32 => (
                Dtype::F32,
                values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            StoreDtype::BF16 => (
                Dtype::BF16,
                values
                    .iter()
                    .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                    .collect(),
            ),
            StoreDtype::F16 => (
                Dtype::F16,
                values
                    .iter()
                    .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                    .collect(),
            ),
        };
        OwnedTensor {
            dtype,
            shape,
            bytes,
        }
    }

    /// The first NaN or infinite element of a float tensor, with its value.
    pub fn first_non_finite(&self) -> Option<(usize, f32)> {
        let values: Box<dyn Iterator<Item = f32> + '_> = match self.dtype {
            Dtype::F32 => Box::new(
                self.bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            ),
            Dtype::F16 => Box::new(
                self.bytes
                    .chunks_exact(2)
                    .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
            ),
            Dtype::BF16 => Box::new(
                self.bytes
                    .chunks_exact(2)
                    .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
            ),
            _ => return None,
        };
        values.enumerate().find(|(_, v)| !v.is_finite())
    }

    /// The encoded little-endian bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn from_i64(values: &[i64], shape: Vec<usize>) -> Self {
        OwnedTensor {
            dtype: Dtype::I64,
            shape,
            bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    /// Any backend float tensor, read back to the host.
    pub fn from_tensor<B: Backend, const D: usize>(t: Tensor<B, D>, dtype: StoreDtype) -> Self {
        let shape = t.dims().to_vec();
        let values: Vec<f32> = t
            .into_data()
            .convert::<f32>()
            .into_vec()
            .expect("converted to f32 above");
        Self::from_f32(&values, shape, dtype)
    }
}

impl safetensors::View for &OwnedTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Writes `tensors` to `path` atomically: a crash mid-write leaves the old file intact.
pub fn write_safetensors(
    path: &Path,
    tensors: &BTreeMap<String, OwnedTensor>,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    // a NaN or infinite weight is never saved: whatever produced it (a diverged run) is a
    // failure to report, not a model to keep
    for (name, t) in tensors {
        if let Some((i, v)) = t.first_non_finite() {
            return Err(ModelError::Safetensors {
                path: path.to_path_buf(),
                message: format!(
                    "refusing to write tensor `{name}`: element {i} is {v} (the values are not finite)"
                ),
            });
        }
    }
    let bytes = safetensors::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), metadata)
        .map_err(|e| ModelError::Safetensors {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    crate::io::atomic_write::atomic_write(path, &bytes)
}
