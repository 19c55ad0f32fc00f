//! What the model's loaders read weights from, under their Hugging Face names: a model
//! directory's safetensors ([`WeightSet`]) or a GGUF file as it is
//! ([`crate::io::gguf::GgufWeights`]), whose quantized matrices can stay in their blocks.

use burn::tensor::{backend::Backend, Tensor};

use crate::error::Result;
use crate::io::safetensors_io::WeightSet;
use crate::quantized::QuantWeight;

/// Weights by HF name, each of exactly the shape asked for (an error names the tensor and the
/// file otherwise).
pub trait WeightSource {
    /// A float tensor (a norm, a bias), in f32.
    fn tensor<B: Backend, const D: usize>(
        &self,
        name: &str,
        shape: [usize; D],
        device: &B::Device,
    ) -> Result<Tensor<B, D>>;

    /// A weight matrix `[rows, cols]` as stored, held in the source's matrix dtype.
    fn matrix<B: Backend>(
        &self,
        name: &str,
        shape: [usize; 2],
        device: &B::Device,
    ) -> Result<Tensor<B, 2>>;

    /// A weight matrix `[rows, cols]` as a contiguous `[cols, rows]` tensor.
    fn tensor_transposed<B: Backend>(
        &self,
        name: &str,
        shape: [usize; 2],
        device: &B::Device,
    ) -> Result<Tensor<B, 2>>;

    /// The matrix `[rows, cols]` in its block format, where the source stores it so; `None`
    /// for a float matrix.
    fn quantized(&self, name: &str, shape: [usize; 2]) -> Result<Option<QuantWeight>>;
}

impl WeightSource for WeightSet {
    fn tensor<B: Backend, const D: usize>(
        &self,
        name: &str,
        shape: [usize; D],
        device: &B::Device,
    ) -> Result<Tensor<B, D>> {
        WeightSet::tensor(self, name, shape, device)
    }

    fn matrix<B: Backend>(
        &self,
        name: &str,
        shape: [usize; 2],
        device: &B::Device,
    ) -> Result<Tensor<B, 2>> {
        WeightSet::matrix(self, name, shape, device)
    }

    fn tensor_transposed<B: Backend>(
        &self,
        name: &str,
        shape: [usize; 2],
        device: &B::Device,
    ) -> Result<Tensor<B, 2>> {
        WeightSet::tensor_transposed(self, name, shape, device)
    }

    /// Safetensors hold no block formats.
    fn quantized(&self, _name: &str, _shape: [usize; 2]) -> Result<Option<QuantWeight>> {
        Ok(None)
    }
}
