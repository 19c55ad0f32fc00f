//! GGUF v3 as llama.cpp writes it ([`super::reader`] reads the same layout): the header, the
//! metadata, the tensor infos with offsets computed from the plan alone, then each tensor's
//! bytes at the next aligned offset, asked for one tensor at a time so that memory holds one
//! tensor. The file appears under its name only once it is whole (a temporary sibling renamed
//! into place), so an interrupted write leaves what was there before.

use std::io::Write;
use std::path::Path;

use super::quant::GgmlType;
use super::reader::GgufValue;
use super::GgufError;

/// The data alignment written (GGUF's default; llama.cpp writes it too).
pub const ALIGNMENT: u64 = 32;

/// One tensor to write: its name, GGUF dimensions (fastest-varying first) and type.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorPlan {
    pub name: String,
    pub dims: Vec<u64>,
    pub kind: GgmlType,
}

impl TensorPlan {
    /// The bytes the tensor's data takes.
    pub fn byte_len(&self) -> u64 {
        let elements: u64 = self.dims.iter().product();
        elements / self.kind.block_elements() as u64 * self.kind.block_bytes() as u64
    }
}

fn string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// The GGUF type code of a value (arrays: 9).
fn value_code(v: &GgufValue) -> u32 {
    match v {
        GgufValue::U8(_) => 0,
        GgufValue::I8(_) => 1,
        GgufValue::U16(_) => 2,
        GgufValue::I16(_) => 3,
        GgufValue::U32(_) => 4,
        GgufValue::I32(_) => 5,
        GgufValue::F32(_) => 6,
        GgufValue::Bool(_) => 7,
        GgufValue::String(_) => 8,
        GgufValue::Array(_) => 9,
        GgufValue::U64(_) => 10,
        GgufValue::I64(_) => 11,
        GgufValue::F64(_) => 12,
    }
}

/// A value without its type code (an array's elements share the first one's type; an empty
/// array is written as an array of strings, which is what empty arrays in llama.cpp's files hold).
fn value(out: &mut Vec<u8>, v: &GgufValue) {
    match v {
        GgufValue::U8(x) => out.push(*x),
        GgufValue::I8(x) => out.push(*x as u8),
        GgufValue::U16(x) => out.extend(x.to_le_bytes()),
        GgufValue::I16(x) => out.extend(x.to_le_bytes()),
        GgufValue::U32(x) => out.extend(x.to_le_bytes()),
        GgufValue::I32(x) => out.extend(x.to_le_bytes()),
        GgufValue::F32(x) => out.extend(x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(*x as u8),
        GgufValue::String(s) => string(out, s),
        GgufValue::Array(items) => {
            out.extend(items.first().map_or(8, value_code).to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for item in items {
                value(out, item);
            }
        }
        GgufValue::U64(x) => out.extend(x.to_le_bytes()),
        GgufValue::I64(x) => out.extend(x.to_le_bytes()),
        GgufValue::F64(x) => out.extend(x.to_le_bytes()),
    }
}

/// Everything before the data section: header, metadata, tensor infos and the padding.
pub fn header_bytes(metadata: &[(String, GgufValue)], tensors: &[TensorPlan]) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((metadata.len() as u64).to_le_bytes());
    for (key, v) in metadata {
        string(&mut out, key);
        out.extend(value_code(v).to_le_bytes());
        value(&mut out, v);
    }
    let mut offset = 0u64;
    for t in tensors {
        string(&mut out, &t.name);
        out.extend((t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            out.extend(d.to_le_bytes());
        }
        out.extend(t.kind.code().to_le_bytes());
        out.extend(offset.to_le_bytes());
        offset = (offset + t.byte_len()).next_multiple_of(ALIGNMENT);
    }
    out.resize((out.len() as u64).next_multiple_of(ALIGNMENT) as usize, 0);
    out
}

/// Writes a GGUF to `path`: `data(i)` gives tensor `i`'s bytes, which must be
/// [`TensorPlan::byte_len`] long. Metadata `general.alignment` must be absent or
/// [`ALIGNMENT`]. Returns the bytes written.
pub fn write_gguf(
    path: &Path,
    metadata: &[(String, GgufValue)],
    tensors: &[TensorPlan],
    data: &mut dyn FnMut(usize) -> Result<Vec<u8>, GgufError>,
) -> Result<u64, GgufError> {
    let io = |source| GgufError::Io {
        path: path.to_path_buf(),
        source,
    };
    let head = header_bytes(metadata, tensors);
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.unwrap_or_default(),
        std::process::id()
    ));
    let result = (|| -> Result<u64, GgufError> {
        let file = std::fs::File::create(&tmp).map_err(io)?;
        let mut f = std::io::BufWriter::with_capacity(1 << 22, file);
        f.write_all(&head).map_err(io)?;
        let mut written = head.len() as u64;
        for (i, t) in tensors.iter().enumerate() {
            let bytes = data(i)?;
            if bytes.len() as u64 != t.byte_len() {
                return Err(GgufError::BadTensor {
                    path: path.to_path_buf(),
                    name: t.name.clone(),
                    message: format!(
                        "{} bytes given for a {} tensor of {:?} elements, which takes {}",
                        bytes.len(),
                        t.kind.name(),
                        t.dims,
                        t.byte_len()
                    ),
                });
            }
            f.write_all(&bytes).map_err(io)?;
            let padded = (bytes.len() as u64).next_multiple_of(ALIGNMENT);
            let pad = if i + 1 < tensors.len() {
                padded - bytes.len() as u64
            } else {
                0
            };
            f.write_all(&vec![0u8; pad as usize]).map_err(io)?;
            written += bytes.len() as u64 + pad;
        }
        let file = f.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)?;
        Ok(written)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
