//! Reading and writing safetensors files, with errors that name the file and the tensor.
//!
//! Files are memory-mapped, so a multi-gigabyte checkpoint is never copied whole into memory:
//! each tensor is converted to f32 as it is handed to the backend.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use burn::tensor::{backend::Backend, Tensor, TensorData};
use safetensors::tensor::{Dtype, Metadata, TensorInfo};
use safetensors::SafeTensors;

use crate::error::{ModelError, Result};

/// One opened safetensors file.
pub struct TensorFile {
    path: PathBuf,
    bytes: memmap2::Mmap,
    /// Where tensor data starts: 8-byte length prefix plus the JSON header.
    data_start: usize,
    metadata: Metadata,
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
            Dtype::F32 => raw
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::BF16 => raw
                .chunks_exact(2)
                .map(|b| half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
                .collect(),
            Dtype::F16 => raw
                .chunks_exact(2)
                .map(|b| half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
                .collect(),
            Dtype::F64 => raw
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().expect("8-byte chunk")) as f32)
                .collect(),
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
            Dtype::I64 => raw
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().expect("8-byte chunk")))
                .collect(),
            Dtype::I32 => raw
                .chunks_exact(4)
                .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64)
                .collect(),
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
fn tensor_in<B: Backend, const D: usize>(
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

/// The weights of a checkpoint: one file or several shards named by an index.
pub struct WeightSet {
    files: Vec<TensorFile>,
    /// Tensor name → index into `files`.
    location: HashMap<String, usize>,
    /// What the model's matrices (projections, embeddings) are held in once loaded.
    matrix_dtype: StoreDtype,
}

impl WeightSet {
    /// Opens `model.safetensors.index.json` and its shards, or else `model.safetensors`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        if index.exists() {
            return Self::open_index(&index);
        }
        let single = dir.join("model.safetensors");
        if !single.exists() {
            return Err(ModelError::MissingFile {
                path: single,
                what: "not found, and there is no model.safetensors.index.json for a sharded checkpoint either",
            });
        }
        Self::open_files(&[single])
    }

    /// Opens the given files as one set; a name found in two files is an error.
    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut location = HashMap::new();
        for path in paths {
            let file = TensorFile::open(path)?;
            for name in file.names() {
                if let Some(prev) = location.insert(name.clone(), files.len()) {
                    let prev: &TensorFile = &files[prev];
                    return Err(ModelError::Safetensors {
                        path: path.clone(),
                        message: format!("tensor `{name}` is also in {}", prev.path.display()),
                    });
                }
            }
            files.push(file);
        }
        Ok(WeightSet {
            files,
            location,
            matrix_dtype: StoreDtype::F32,
        })
    }

    fn open_index(index: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(index).map_err(|e| ModelError::io(index, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ModelError::Config {
                path: index.to_path_buf(),
                message: e.to_string(),
            })?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| ModelError::Config {
                path: index.to_path_buf(),
                message: "missing key `weight_map` (an object of tensor name → shard file)".into(),
            })?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut shards: Vec<String> = Vec::new();
        for (name, file) in map {
            let file = file.as_str().ok_or_else(|| ModelError::Config {
                path: index.to_path_buf(),
                message: format!("`weight_map.{name}` must be a file name"),
            })?;
            if !shards.iter().any(|s| s == file) {
                shards.push(file.to_string());
            }
        }
        shards.sort();
        let paths: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
        let set = Self::open_files(&paths)?;
        // The index must agree with the shards, or a tensor could silently come from elsewhere.
        for (name, file) in map {
            let expected = dir.join(file.as_str().unwrap_or_default());
            match set.location.get(name) {
                Some(&i) if set.files[i].path == expected => {}
                _ => {
                    return Err(ModelError::MissingTensor {
                        name: name.clone(),
                        searched: format!(
                            "{} (listed there by {})",
                            expected.display(),
                            index.display()
                        ),
                    })
                }
            }
        }
        Ok(set)
    }

    /// Holds the matrices read through [`WeightSet::matrix`] and
    /// [`WeightSet::tensor_transposed`] in `dtype` (see [`crate::precision`]); vectors (norms,
    /// biases) stay f32.
    pub fn with_matrix_dtype(mut self, dtype: StoreDtype) -> Self {
        self.matrix_dtype = dtype;
        self
    }

    fn file_of(&self, name: &str) -> Result<&TensorFile> {
        match self.location.get(name) {
            Some(&i) => Ok(&self.files[i]),
            None => Err(ModelError::MissingTensor {
                name: name.to_string(),
                searched: self
                    .files
                    .iter()
                    .map(|f| f.path.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    /// The shape of tensor `name`, or an error naming the files searched.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        self.file_of(name)?.shape(name)
    }

    /// A float tensor of exactly `shape`.
    pub fn tensor<B: Backend, const D: usize>(
        &self,
        name: &str,
        shape: [usize; D],
        device: &B::Device,
    ) -> Result<Tensor<B, D>> {
        self.file_of(name)?.tensor(name, shape, device)
    }

    /// A `[rows, cols]` matrix as a contiguous `[cols, rows]` tensor (see
    /// [`TensorFile::tensor_transposed`]).
    pub fn tensor_transposed<B: Backend>(
        &self,
        name: &str,
        shape: [usize; 2],
        device: &B::Device,
    ) -> Result<Tensor<B, 2>> {
        self.file_of(name)?
            .tensor_transposed_as(name, shape, self.matrix_dtype, device)
    }

    /// A weight matrix of exactly `shape`, held in the set's matrix dtype.
    pub fn matrix<B: Backend>(
        &self,
        name: &str,
        shape: [usize; 2],
        device: &B::Device,
    ) -> Result<Tensor<B, 2>> {
        self.file_of(name)?
            .tensor_as(name, shape, self.matrix_dtype, device)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.location.keys().map(String::as_str)
    }

    /// Number of stored values across all tensors, and the storage dtypes seen (sorted).
    pub fn summary(&self) -> (usize, Vec<String>) {
        let mut count = 0;
        let mut dtypes = std::collections::BTreeSet::new();
        for file in &self.files {
            for info in file.metadata.tensors().values() {
                count += info.shape.iter().product::<usize>();
                dtypes.insert(format!("{:?}", info.dtype));
            }
        }
        (count, dtypes.into_iter().collect())
    }

    /// The files behind this set.
    pub fn paths(&self) -> Vec<&Path> {
        self.files.iter().map(|f| f.path()).collect()
    }
}

/// `[rows, cols]` row-major → `[cols, rows]` row-major, in cache-sized tiles.
pub fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const TILE: usize = 32;
    let mut out = vec![0.0f32; values.len()];
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                for c in c0..(c0 + TILE).min(cols) {
                    out[c * rows + r] = values[r * cols + c];
                }
            }
        }
    }
    out
}

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
    crate::atomic::atomic_write(path, &bytes)
}

#[cfg(test)]
mod tests {
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
}
