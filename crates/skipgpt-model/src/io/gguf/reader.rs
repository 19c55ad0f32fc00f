//! The GGUF container (versions 2 and 3): header, metadata, tensor infos and the aligned data
//! section, read from a memory map. Nothing is copied until a tensor's bytes are asked for.
//!
//! Layout (little-endian): magic `GGUF`, `u32` version, `u64` tensor count, `u64` metadata
//! count; then the metadata (key string, `u32` value type, value); then per tensor its name,
//! `u32` dimension count, `u64` dimensions (fastest-varying first), `u32` ggml type and `u64`
//! offset into the data section, which starts at the next multiple of `general.alignment`
//! (32 by default). Strings are a `u64` length and UTF-8 bytes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::quant::GgmlType;
use super::GgufError;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    /// The GGUF name of the value's type, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            GgufValue::U8(_) => "uint8",
            GgufValue::I8(_) => "int8",
            GgufValue::U16(_) => "uint16",
            GgufValue::I16(_) => "int16",
            GgufValue::U32(_) => "uint32",
            GgufValue::I32(_) => "int32",
            GgufValue::F32(_) => "float32",
            GgufValue::Bool(_) => "bool",
            GgufValue::String(_) => "string",
            GgufValue::Array(_) => "array",
            GgufValue::U64(_) => "uint64",
            GgufValue::I64(_) => "int64",
            GgufValue::F64(_) => "float64",
        }
    }

    /// Any integer type as `u64`, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer or float type as `f64`.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v.into()),
            GgufValue::F64(v) => Some(v),
            GgufValue::I8(v) => Some(v.into()),
            GgufValue::I16(v) => Some(v.into()),
            GgufValue::I32(v) => Some(v.into()),
            GgufValue::I64(v) => Some(v as f64),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
}

/// Where one tensor lies and what it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// GGUF order: the fastest-varying dimension first (the reverse of PyTorch's shape).
    pub dims: Vec<u64>,
    pub kind: GgmlType,
    /// Offset from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    pub fn num_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Bytes the tensor takes in its type (whole blocks; checked when a file is opened).
    pub fn byte_len(&self) -> u64 {
        self.num_elements() / self.kind.block_elements() as u64 * self.kind.block_bytes() as u64
    }

    /// The shape as PyTorch and safetensors write it (slowest-varying first).
    pub fn torch_shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// An open GGUF file.
pub struct GgufFile {
    path: PathBuf,
    map: std::sync::Arc<memmap2::Mmap>,
    pub version: u32,
    pub metadata: BTreeMap<String, GgufValue>,
    /// In file order.
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    data_start: u64,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// A bounds-checked little-endian reader over the mapped bytes.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8], GgufError> {
        let end = (self.pos as u64).checked_add(n);
        match end {
            Some(end) if end <= self.bytes.len() as u64 => {
                let s = &self.bytes[self.pos..end as usize];
                self.pos = end as usize;
                Ok(s)
            }
            _ => Err(GgufError::Truncated {
                path: self.path.to_path_buf(),
                offset: self.pos as u64,
                needed: n,
                size: self.bytes.len() as u64,
                what: what(),
            }),
        }
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N], GgufError> {
        Ok(self.take(N as u64, what)?.try_into().expect("N bytes"))
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String, GgufError> {
        let len = self.u64(what)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| GgufError::Malformed {
            path: self.path.to_path_buf(),
            message: format!("{} is not valid UTF-8", what()),
        })
    }

    fn value(&mut self, kind: u32, what: &dyn Fn() -> String) -> Result<GgufValue, GgufError> {
        Ok(match kind {
            0 => GgufValue::U8(self.array::<1>(what)?[0]),
            1 => GgufValue::I8(self.array::<1>(what)?[0] as i8),
            2 => GgufValue::U16(u16::from_le_bytes(self.array(what)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array(what)?)),
            4 => GgufValue::U32(self.u32(what)?),
            5 => GgufValue::I32(i32::from_le_bytes(self.array(what)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array(what)?)),
            7 => match self.array::<1>(what)?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => {
                    return Err(GgufError::Malformed {
                        path: self.path.to_path_buf(),
                        message: format!("{}: bool byte {b} (expected 0 or 1)", what()),
                    })
                }
            },
            8 => GgufValue::String(self.string(what)?),
            9 => {
                let inner = self.u32(what)?;
                let count = self.u64(what)?;
                // every element takes at least one byte: a count beyond the file is corrupt,
                // and must not make us reserve memory for it
                let left = (self.bytes.len() - self.pos) as u64;
                if count > left {
                    return Err(GgufError::Truncated {
                        path: self.path.to_path_buf(),
                        offset: self.pos as u64,
                        needed: count,
                        size: self.bytes.len() as u64,
                        what: format!("{} (an array of {count} elements)", what()),
                    });
                }
                let mut items = Vec::with_capacity(count as usize);
                for i in 0..count {
                    items.push(self.value(inner, &|| format!("{}[{i}]", what()))?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(self.u64(what)?),
            11 => GgufValue::I64(i64::from_le_bytes(self.array(what)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array(what)?)),
            other => {
                return Err(GgufError::Malformed {
                    path: self.path.to_path_buf(),
                    message: format!("{}: unknown metadata value type {other} (0-12)", what()),
                })
            }
        })
    }
}

impl GgufFile {
    /// Opens and parses `path`; tensor data stays in the map until asked for.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; a file truncated by someone else while we read it is
        // the same hazard every mmap-based loader (safetensors, llama.cpp) accepts.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Self::parse(path, map)
    }

    fn parse(path: &Path, map: memmap2::Mmap) -> Result<Self, GgufError> {
        let mut c = Cursor {
            bytes: &map,
            pos: 0,
            path,
        };
        let magic = c.array::<4>(&|| "the magic number".into())?;
        if &magic != b"GGUF" {
            return Err(GgufError::BadMagic {
                path: path.to_path_buf(),
                found: magic,
            });
        }
        let version = c.u32(&|| "the version".into())?;
        if version != 2 && version != 3 {
            let hint = if version.swap_bytes() == 2 || version.swap_bytes() == 3 {
                " (this is a big-endian GGUF; only little-endian files are supported)"
            } else if version == 1 {
                " (GGUF v1 used 32-bit counts; convert the file with a current llama.cpp)"
            } else {
                ""
            };
            return Err(GgufError::UnsupportedVersion {
                path: path.to_path_buf(),
                version,
                hint,
            });
        }
        let n_tensors = c.u64(&|| "the tensor count".into())?;
        let n_kv = c.u64(&|| "the metadata count".into())?;
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = c.string(&|| format!("metadata key #{i}"))?;
            let kind = c.u32(&|| format!("the type of metadata `{key}`"))?;
            let value = c.value(kind, &|| format!("metadata `{key}`"))?;
            metadata.insert(key, value);
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => {
                    return Err(GgufError::Malformed {
                        path: path.to_path_buf(),
                        message: format!(
                            "metadata `general.alignment` is {v:?}; expected a power of two"
                        ),
                    })
                }
            },
        };
        let mut tensors = Vec::new();
        for i in 0..n_tensors {
            let name = c.string(&|| format!("the name of tensor #{i}"))?;
            let n_dims = c.u32(&|| format!("the dimension count of tensor `{name}`"))?;
            if n_dims == 0 || n_dims > 4 {
                return Err(GgufError::Malformed {
                    path: path.to_path_buf(),
                    message: format!("tensor `{name}` has {n_dims} dimensions (expected 1-4)"),
                });
            }
            let dims = (0..n_dims)
                .map(|d| c.u64(&|| format!("dimension {d} of tensor `{name}`")))
                .collect::<Result<Vec<_>, _>>()?;
            let code = c.u32(&|| format!("the type of tensor `{name}`"))?;
            let offset = c.u64(&|| format!("the offset of tensor `{name}`"))?;
            let kind =
                GgmlType::from_code(code).ok_or_else(|| GgufError::UnsupportedTensorType {
                    path: path.to_path_buf(),
                    tensor: name.clone(),
                    kind: GgmlType::name_of(code),
                })?;
            tensors.push(TensorInfo {
                name,
                dims,
                kind,
                offset,
            });
        }
        let data_start = (c.pos as u64)
            .div_ceil(alignment)
            .checked_mul(alignment)
            .ok_or_else(|| GgufError::Malformed {
                path: path.to_path_buf(),
                message: format!(
                    "the data section, aligned to {alignment} bytes, starts past any file"
                ),
            })?;
        let file = GgufFile {
            path: path.to_path_buf(),
            map: std::sync::Arc::new(map),
            version,
            metadata,
            tensors,
            alignment,
            data_start,
        };
        for t in &file.tensors {
            file.check_tensor(t)?;
        }
        Ok(file)
    }

    /// The tensor's size is a whole number of blocks, its offset aligned, its bytes present.
    fn check_tensor(&self, t: &TensorInfo) -> Result<(), GgufError> {
        let bad = |message: String| GgufError::BadTensor {
            path: self.path.clone(),
            name: t.name.clone(),
            message,
        };
        let n = t
            .dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or_else(|| bad(format!("dimensions {:?} overflow", t.dims)))?;
        let block = t.kind.block_elements() as u64;
        if !t.dims[0].is_multiple_of(block) {
            return Err(bad(format!(
                "its rows of {} elements are not whole {} blocks of {block}",
                t.dims[0],
                t.kind.name()
            )));
        }
        if !t.offset.is_multiple_of(self.alignment) {
            return Err(bad(format!(
                "offset {} is not a multiple of the alignment {}",
                t.offset, self.alignment
            )));
        }
        // checked: every number here comes from the file
        let bytes = (n / block).checked_mul(t.kind.block_bytes() as u64);
        let end = bytes.and_then(|b| self.data_start.checked_add(t.offset)?.checked_add(b));
        let bytes = bytes.unwrap_or(u64::MAX);
        if end.is_none_or(|end| end > self.map.len() as u64) {
            return Err(GgufError::Truncated {
                path: self.path.clone(),
                offset: self.data_start.saturating_add(t.offset),
                needed: bytes,
                size: self.map.len() as u64,
                what: format!("the data of tensor `{}`", t.name),
            });
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw (possibly quantized) bytes of a tensor.
    pub fn tensor_bytes(&self, t: &TensorInfo) -> &[u8] {
        &self.map[self.tensor_range(t)] // in bounds: checked when the file was opened
    }

    /// Where a tensor's bytes lie in [`GgufFile::shared_map`].
    pub fn tensor_range(&self, t: &TensorInfo) -> std::ops::Range<usize> {
        let start = (self.data_start + t.offset) as usize;
        start..start + t.byte_len() as usize
    }

    /// The mapped file, for weights read in place for as long as a model lives
    /// ([`crate::quantized::QuantWeight`]).
    pub fn shared_map(&self) -> std::sync::Arc<memmap2::Mmap> {
        self.map.clone()
    }

    /// A tensor's values as f32, dequantized.
    pub fn tensor_f32(&self, t: &TensorInfo) -> Vec<f32> {
        t.kind.dequantize(self.tensor_bytes(t))
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    fn wrong_type(&self, key: &str, expected: &'static str, found: &GgufValue) -> GgufError {
        GgufError::KeyType {
            path: self.path.clone(),
            key: key.to_string(),
            expected,
            found: found.type_name(),
        }
    }

    fn missing(&self, key: &str) -> GgufError {
        GgufError::MissingKey {
            path: self.path.clone(),
            key: key.to_string(),
        }
    }

    pub fn string(&self, key: &str) -> Result<&str, GgufError> {
        match self.get(key) {
            Some(GgufValue::String(s)) => Ok(s),
            Some(v) => Err(self.wrong_type(key, "string", v)),
            None => Err(self.missing(key)),
        }
    }

    /// A non-negative integer, of whichever integer type the writer chose.
    pub fn uint(&self, key: &str) -> Result<u64, GgufError> {
        let v = self.get(key).ok_or_else(|| self.missing(key))?;
        v.as_u64()
            .ok_or_else(|| self.wrong_type(key, "a non-negative integer", v))
    }

    pub fn float(&self, key: &str) -> Result<f64, GgufError> {
        let v = self.get(key).ok_or_else(|| self.missing(key))?;
        v.as_f64()
            .ok_or_else(|| self.wrong_type(key, "a number", v))
    }

    pub fn bool(&self, key: &str) -> Result<bool, GgufError> {
        match self.get(key) {
            Some(GgufValue::Bool(b)) => Ok(*b),
            Some(v) => Err(self.wrong_type(key, "bool", v)),
            None => Err(self.missing(key)),
        }
    }

    pub fn array(&self, key: &str) -> Result<&[GgufValue], GgufError> {
        match self.get(key) {
            Some(GgufValue::Array(a)) => Ok(a),
            Some(v) => Err(self.wrong_type(key, "array", v)),
            None => Err(self.missing(key)),
        }
    }

    /// An array of strings.
    pub fn strings(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        self.array(key)?
            .iter()
            .map(|v| match v {
                GgufValue::String(s) => Ok(s.as_str()),
                v => Err(self.wrong_type(key, "array of strings", v)),
            })
            .collect()
    }

    /// An array of integers.
    pub fn ints(&self, key: &str) -> Result<Vec<i64>, GgufError> {
        self.array(key)?
            .iter()
            .map(|v| match *v {
                GgufValue::I32(x) => Ok(x.into()),
                GgufValue::I64(x) => Ok(x),
                ref v => v
                    .as_u64()
                    .and_then(|x| i64::try_from(x).ok())
                    .ok_or_else(|| self.wrong_type(key, "array of integers", v)),
            })
            .collect()
    }

    /// An optional key: `Ok(None)` when absent, an error when present with the wrong type.
    pub fn optional<'a, T>(
        &'a self,
        key: &str,
        read: impl Fn(&'a Self, &str) -> Result<T, GgufError>,
    ) -> Result<Option<T>, GgufError> {
        if self.get(key).is_some() {
            read(self, key).map(Some)
        } else {
            Ok(None)
        }
    }
}
