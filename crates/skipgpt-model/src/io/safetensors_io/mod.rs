//! Reading and writing safetensors files, with errors that name the file and the tensor.
//!
//! Files are memory-mapped, so a multi-gigabyte checkpoint is never copied whole into memory:
//! each tensor is converted to f32 as it is handed to the backend.
//!
//! - [`file`]: one file, its tensors read by name ([`TensorFile`]);
//! - [`weights`]: a checkpoint's files or shards, loaded onto a backend ([`WeightSet`]);
//! - [`write`]: tensors in a chosen type, written to a file ([`write_safetensors`]).

mod file;
mod weights;
mod write;

pub(crate) use file::tensor_in;
pub use file::TensorFile;
pub use weights::{transpose, WeightSet};
pub use write::{write_safetensors, OwnedTensor, StoreDtype};

#[cfg(test)]
mod tests;
