//! # skipgpt-kernels
//!
//! The CPU kernels of skipgpt's decoding engine, on plain slices: no Burn, no model, no
//! allocation beyond their outputs. The model crate's `flex_kernels` hands the CPU backend's
//! tensors to them; anything else that holds `f32`/`f16`/`bf16` slices can call them directly.
//!
//! - [`matvec`]: a few activation rows times a large weight matrix (the products of a decoding
//!   step), f16/bf16 weights widened in registers;
//! - [`attention`]: causal attention of a few query rows over a key/value cache;
//! - [`ops`]: RMSNorm, rotary embeddings and SwiGLU on rows;
//! - [`quant`]: products with weights kept in llama.cpp's quantized block formats, read in
//!   place;
//! - [`thread_team`]: a decoding step's threads, kept awake between its parallel products;
//! - [`isa`]: the instruction sets the loops are compiled for, picked at run time.

pub mod attention;
pub mod isa;
pub mod matvec;
pub mod ops;
#[cfg(target_arch = "x86_64")]
mod prefetch;
pub mod quant;
#[cfg(test)]
mod test_values;
pub mod thread_team;
