//! One safetensors file, memory-mapped, its tensors read by name and checked against their
//! header.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::{backend::Backend, Tensor, TensorData};
use safetensors::tensor::{Dtype, Metadata, TensorInfo};
use safetensors::SafeTensors;

use super::{transpose, StoreDtype};
use crate::error::{ModelError, Result};

/// One opened safetensors file.
pub struct TensorFile {
    pub(super) path: PathBuf,
    bytes: memmap2::Mmap,
    /// Where tensor data starts: 8-byte length prefix plus the JSON header.
    data_start: usize,
    pub(super) metadata: Metadata,
}

impl TensorFile {
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_dir() {
            return Err(ModelError::MissingFile {
                path: path.to_path_buf(),
                what: "is a directory, expected a safetensors file",
            });
        }
        let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
        // SAFETY: the map is read-only; a checkpoint changing under us while loading is outside
        // what any loader can defend against (the same trade-off candle and transformers make).
        let bytes = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        let (header_len, metadata) =
            SafeTensors::read_metadata(&bytes).map_err(|e| ModelError::Safetensors {
                path: path.to_path_buf(),
                message: match e {
                    // the crate does not say which tensor: find it in the header
                    safetensors::SafeTensorError::TensorInvalidInfo => {
                        inconsistent_tensor(&bytes).unwrap_or_else(|| describe_st_error(&e))
                    }
                    _ => describe_st_error(&e),
                },
            })?;
        Ok(TensorFile {
            path: path.to_path_buf(),
            bytes,
            data_start: 8 + header_len,
            metadata,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.metadata.tensors().into_keys().collect();
        names.sort();
        names
    }

    pub fn contains(&self, name: &str) -> bool {
        self.metadata.info(name).is_some()
    }

    fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.metadata
            .info(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_string(),
                searched: self.path.display().to_string(),
            })
    }

    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.info(name)?.shape.clone())
    }

    fn raw(&self, info: &TensorInfo) -> &[u8] {
        let (start, end) = info.data_offsets;
        &self.bytes[self.data_start + start..self.data_start + end]
    }

    /// A floating-point tensor (f32, bf16, f16 or f64) as f32 values with its shape.
    pub fn read_f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let info = self.info(name)?;
        let raw = self.raw(info);
        let values = match info.dtype {
            Dtype::F32 => each(raw, f32::from_le_bytes),
            Dtype::BF16 => each(raw, |b| half::bf16::from_le_bytes(b).to_f32()),
            Dtype::F16 => each(raw, |b| half::f16::from_le_bytes(b).to_f32()),
            Dtype::F64 => each(raw, |b| f64::from_le_bytes(b) as f32),
            other => {
                return Err(self.dtype_error(name, "a float type (F32, BF16, F16, F64)", other))
            }
        };
        self.release(info);
        Ok((values, info.shape.clone()))
    }

    /// Lets the kernel drop the file pages of a tensor that has been copied out, so that a
    /// loaded model is resident once (its tensors), not twice (tensors and mapped file). The
    /// pages are read again from the file if the tensor is read again.
    fn release(&self, info: &TensorInfo) {
        let (start, end) = info.data_offsets;
        // SAFETY: the map is a read-only, file-backed map: dropping its pages loses nothing,
        // and no slice of them outlives this call's caller (the values were copied).
        let _ = unsafe {
            self.bytes.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                self.data_start + start,
                end - start,
            )
        };
    }

    /// An integer tensor (i64 or i32) as i64 values with its shape.
    pub fn read_i64(&self, name: &str) -> Result<(Vec<i64>, Vec<usize>)> {
        let info = self.info(name)?;
        let raw = self.raw(info);
        let values = match info.dtype {
            Dtype::I64 => each(raw, i64::from_le_bytes),
            Dtype::I32 => each(raw, |b| i32::from_le_bytes(b) as i64),
            other => return Err(self.dtype_error(name, "I64 or I32", other)),
        };
        Ok((values, info.shape.clone()))
    }

    /// A float tensor of exactly `shape`, on `device`, in the backend's float type.
    pub fn tensor<B: Backend, const D: usize>(
        &self,
        name: &str,
        shape: [usize; D],
        device: &B::Device,
    ) -> Result<Tensor<B, D>> {
        let values = self.values_of_shape(name, &shape)?;
        Ok(Tensor::from_data(TensorData::new(values, shape), device))
    }

    /// A matrix stored `[rows, cols]`, transposed on the host into a contiguous `[cols, rows]`
    /// tensor: linear layers keep Burn's `[d_in, d_out]` layout without a strided view that
    /// kernels would copy on every call.
    pub fn tensor_transposed<B: Backend>(
        &self,
        name: &str,
        [rows, cols]: [usize; 2],
        device: &B::Device,
    ) -> Result<Tensor<B, 2>> {
        self.tensor_transposed_as(name, [rows, cols], StoreDtype::F32, device)
    }

    /// [`TensorFile::tensor_transposed`], held in `dtype` (rounded on the host, so the f32 copy
    /// never reaches the device).
    pub fn tensor_transposed_as<B: Backend>(
        &self,
        name: &str,
        [rows, cols]: [usize; 2],
        dtype: StoreDtype,
        device: &B::Device,
    ) -> Result<Tensor<B, 2>> {
        let values = self.values_of_shape(name, &[rows, cols])?;
        let data = TensorData::new(transpose(&values, rows, cols), [cols, rows]);
        drop(values);
        Ok(tensor_in(data, dtype, device))
    }

    /// [`TensorFile::tensor`], held in `dtype`.
    pub fn tensor_as<B: Backend, const D: usize>(
        &self,
        name: &str,
        shape: [usize; D],
        dtype: StoreDtype,
        device: &B::Device,
    ) -> Result<Tensor<B, D>> {
        let values = self.values_of_shape(name, &shape)?;
        Ok(tensor_in(TensorData::new(values, shape), dtype, device))
    }

    fn values_of_shape(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let found = self.shape(name)?;
        if found != shape {
            return Err(ModelError::ShapeMismatch {
                path: self.path.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
                found,
            });
        }
        Ok(self.read_f32(name)?.0)
    }

    fn dtype_error(&self, name: &str, expected: &str, found: Dtype) -> ModelError {
        ModelError::DtypeMismatch {
            path: self.path.clone(),
            name: name.to_string(),
            expected: expected.to_string(),
            found: format!("{found:?}"),
        }
    }
}

fn describe_st_error(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::MetadataIncompleteBuffer => {
            "the file is shorter than its header says (truncated or still being written?)".into()
        }
        E::HeaderTooSmall | E::InvalidHeaderLength => {
            "the header is missing or cut short (truncated file?)".into()
        }
        other => other.to_string(),
    }
}

/// The first tensor of a safetensors header whose byte range does not hold its shape and dtype,
/// or does not start where the previous one ended, described; `None` if the header cannot be
/// read or every entry is consistent.
fn inconsistent_tensor(bytes: &[u8]) -> Option<String> {
    let len = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let header: HashMap<String, serde_json::Value> =
        serde_json::from_slice(bytes.get(8..8usize.checked_add(len)?)?).ok()?;
    // the crate's own entry type, so dtype names and sizes are its
    let mut entries: Vec<(String, TensorInfo)> = header
        .into_iter()
        .filter(|(k, _)| k != "__metadata__")
        .map(|(k, v)| Some((k, serde_json::from_value(v).ok()?)))
        .collect::<Option<_>>()?;
    entries.sort_by_key(|(_, t)| t.data_offsets);
    let mut end = 0;
    for (name, t) in entries {
        let (start, stop) = t.data_offsets;
        if start != end {
            return Some(format!(
                "tensor `{name}` starts at byte {start} of the data, expected {end} (where the previous one ends)"
            ));
        }
        let needed = t
            .shape
            .iter()
            .try_fold(t.dtype.bitsize(), |n, &d| n.checked_mul(d))
            .map(|bits| bits.div_ceil(8));
        if stop.checked_sub(start) != needed {
            return Some(format!(
                "tensor `{name}` ({:?}, shape {:?} = {} bytes) has data_offsets [{start}, {stop}]",
                t.dtype,
                t.shape,
                needed.map_or("more than 2^64".into(), |n| n.to_string())
            ));
        }
        end = stop;
    }
    None
}

/// f32 host values as a tensor held in `dtype` (f32: the backend's default float tensor).
pub(crate) fn tensor_in<B: Backend, const D: usize>(
    data: TensorData,
    dtype: StoreDtype,
    device: &B::Device,
) -> Tensor<B, D> {
    match dtype {
        StoreDtype::F32 => Tensor::from_data(data, device),
        half => {
            let dtype = half.burn_dtype();
            Tensor::from_data(data.convert_dtype(dtype), (device, dtype))
        }
    }
}

/// `raw` read as little-endian values of `N` bytes each, each turned into a `T` by `value`.
fn each<T, const N: usize>(raw: &[u8], value: impl Fn([u8; N]) -> T) -> Vec<T> {
    let whole = |b: &[u8]| b.try_into().expect("chunks_exact gives N bytes");
    raw.chunks_exact(N).map(|b| value(whole(b))).collect()
}
