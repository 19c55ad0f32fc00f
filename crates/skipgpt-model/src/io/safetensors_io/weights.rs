//! A checkpoint's weights: one file or several shards named by an index, each tensor
//! converted as it is handed to the backend.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::{backend::Backend, Tensor};

use super::{StoreDtype, TensorFile};
use crate::error::{ModelError, Result};

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

    /// Tensor `name` as f32 values (from whatever float dtype is stored) and its shape.
    pub fn read_f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        self.file_of(name)?.read_f32(name)
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
