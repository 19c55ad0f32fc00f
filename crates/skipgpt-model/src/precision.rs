//! Half-precision weights: projection and embedding matrices held in f16 or bf16, used against
//! an f32 residual stream.
//!
//! Decoding one token reads every weight once, so on most hardware its time is the weight bytes
//! over the memory bandwidth: halving the bytes nearly halves the time. Only the large matrices
//! go to half precision, and the sparse engine's key/value cache with them
//! ([`crate::engine::cache_dtype`]: half its memory, widened back to f32 as attention reads it).
//! The residual stream, RMSNorm (its statistics and weight), the routers, RoPE, attention
//! (scores, softmax and the weighted sum), LoRA adapters and the logits' consumers stay f32:
//! each matrix product casts its input rows to the weight's type, multiplies there, and casts
//! the result back to f32 (as llama.cpp does with f16 weights). The price is one rounding of
//! each projection's input and output to half precision. On the CPU backend products of up to
//! [`crate::dispatch::MAX_ROWS`] rows (decoding, prompts, which the engine feeds in pieces of
//! that many rows) take the kernels instead ([`crate::dispatch`]): they widen the weights to
//! f32 in registers and round nothing.

use burn::nn::{Embedding, Linear};
use burn::tensor::{backend::Backend, DType, Int, Tensor};

use crate::error::{ModelError, Result};
use crate::io::safetensors_io::StoreDtype;

impl StoreDtype {
    /// The Burn dtype of the same name.
    pub fn burn_dtype(self) -> DType {
        match self {
            StoreDtype::F32 => DType::F32,
            StoreDtype::F16 => DType::F16,
            StoreDtype::BF16 => DType::BF16,
        }
    }

    /// Bytes per value.
    pub fn size(self) -> usize {
        self.burn_dtype().size()
    }
}

/// Refuses a weight dtype that backend `B` cannot compute in on `device`, naming both (burn's
/// ndarray backend has no half types; WebGPU has no bf16).
pub fn check_supported<B: Backend>(dtype: StoreDtype, device: &B::Device) -> Result<()> {
    if B::supports_dtype(device, dtype.burn_dtype()) {
        Ok(())
    } else {
        Err(ModelError::InvalidInput(format!(
            "the {} backend cannot compute in {} on {device:?}; use another --dtype or --backend",
            B::name(device),
            dtype.hf_name(),
        )))
    }
}

/// `w · xᵀ` for a weight stored `[out, in]` (the tied output head reads the embedding this way),
/// returned in `x`'s type.
///
/// # Shapes
/// - w: `[out, in]`
/// - x: `[rows, in]`
/// - output: `[out, rows]`
pub fn matmul_weight_rows<B: Backend>(w: Tensor<B, 2>, x: Tensor<B, 2>) -> Tensor<B, 2> {
    let (x_dtype, w_dtype) = (x.dtype(), w.dtype());
    if x_dtype == w_dtype {
        w.matmul(x.transpose())
    } else {
        w.matmul(x.cast(w_dtype).transpose()).cast(x_dtype)
    }
}

/// A linear layer whose weight may be held in half precision: the product is taken in the
/// weight's type, then the result (back in `x`'s type) gets the bias, which stays f32. With a
/// weight in `x`'s type this is exactly `Linear::forward`.
///
/// # Shapes
/// - x: `[..., in]`
/// - output: `[..., out]`
pub fn linear_forward<B: Backend, const D: usize>(
    linear: &Linear<B>,
    x: Tensor<B, D>,
) -> Tensor<B, D> {
    let y = crate::dispatch::times_weight(x, linear.weight.val());
    match &linear.bias {
        Some(b) => y + b.val().unsqueeze(),
        None => y,
    }
}

/// Embedding rows, in f32 whatever the table is held in.
///
/// # Shapes
/// - ids: `[batch, seq]`
/// - output: `[batch, seq, hidden]`
pub fn embed<B: Backend>(embedding: &Embedding<B>, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
    let x = embedding.forward(ids);
    match x.dtype() {
        DType::F32 => x,
        _ => x.cast(DType::F32),
    }
}
