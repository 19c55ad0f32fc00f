//! The CPU backend's (burn-flex's) decoding products, taken by [`crate::matvec`]'s kernels.
//!
//! A decoding step multiplies a few activation rows by every weight matrix. burn-flex gives
//! such a product to gemm on one core, and runs f16 and bf16 products by widening whole
//! operands first; measured on SmolLM2's matrices (`examples/bench_matvec`, one row, layers and
//! head), `matvec` streams the weights over every core in about 0.75x (f32), 0.7x (f16) and
//! 0.15x (bf16) of burn-flex's time. Every product that is on the CPU backend, has at most [`MAX_ROWS`] f32
//! rows and a contiguous weight comes here; any other (a prefill, another backend, autodiff's
//! tensors, which are of another type) keeps Burn's own matmul. The model stays generic over
//! the backend: the CPU backend is recognised by its type at run time.
//!
//! Built with the crate's `flex` feature (the CLI's `cpu` feature turns it on); without it
//! every function here declines and Burn's matmul runs.

use burn::tensor::{backend::Backend, Tensor};

/// Most activation rows a product is taken here for. Decoding steps have one row per
/// sequence, routed modules fewer; at 8 rows the kernels still took 0.8x of burn-flex's time at
/// f32 on SmolLM2's matrices (`examples/bench_matvec -- 8`), at 16 rows 1.1x: there arithmetic
/// matters more than reading the weights.
pub const MAX_ROWS: usize = 8;

/// `x · W` for `W` stored `[in, out]` (Burn's `Linear` layout), in f32, or `None` where Burn's
/// matmul should run.
///
/// # Shapes
/// - x: `[..., in]`
/// - w: `[in, out]`
/// - output: `[..., out]`
pub fn rows_times_weight<B: Backend, const D: usize>(
    x: &Tensor<B, D>,
    w: &Tensor<B, 2>,
) -> Option<Tensor<B, D>> {
    #[cfg(feature = "flex")]
    return flex::rows_times_weight(x, w);
    #[cfg(not(feature = "flex"))]
    {
        let _ = (x, w);
        None
    }
}

/// `x · Wᵀ` for `W` stored `[out, in]` (the tied head reads the embedding table so), in f32,
/// or `None` where Burn's matmul should run.
///
/// # Shapes
/// - x: `[rows, in]`
/// - w: `[out, in]`
/// - output: `[rows, out]`
pub fn rows_times_weight_t<B: Backend>(x: &Tensor<B, 2>, w: &Tensor<B, 2>) -> Option<Tensor<B, 2>> {
    #[cfg(feature = "flex")]
    return flex::rows_times_weight_t(x, w);
    #[cfg(not(feature = "flex"))]
    {
        let _ = (x, w);
        None
    }
}

/// Runs `f` on a thread of rayon's pool when `B` is the CPU backend, else where it is called.
///
/// A thread outside the pool that starts parallel work hands it to the pool and sleeps until it
/// is done; inside the pool it takes part and its partner is often still awake. A decoding step
/// starts some 200 parallel products, and running the step inside the pool made SmolLM2's f32
/// decoding about 20% faster (39 -> 47 tok/s, 2 threads). GPU backends keep their caller's
/// thread.
pub fn in_pool<B: Backend, R: Send>(f: impl FnOnce() -> R + Send) -> R {
    #[cfg(feature = "flex")]
    if flex::is_flex::<B>() {
        // `scope` runs its body on a pool thread (at once if this is one)
        return rayon::scope(|_| f());
    }
    f()
}

#[cfg(feature = "flex")]
mod flex {
    use std::any::{Any, TypeId};

    use burn::tensor::{backend::Backend, DType, Tensor, TensorData, TensorPrimitive};
    use burn_flex::{Flex, FlexTensor};
    use half::{bf16, f16};

    use super::MAX_ROWS;
    use crate::matvec::{rows_times_matrix, rows_times_matrix_t, widens_in_registers, WeightSlice};

    pub fn rows_times_weight<B: Backend, const D: usize>(
        x: &Tensor<B, D>,
        w: &Tensor<B, 2>,
    ) -> Option<Tensor<B, D>> {
        let dims = x.dims();
        let d_in = dims[D - 1];
        let m = dims[..D - 1].iter().product::<usize>();
        let [w_in, d_out] = w.dims();
        if w_in != d_in || !eligible::<B>(m, x.dtype()) {
            return None;
        }
        let (xs, ws) = (as_flex(x)?, as_flex(w)?);
        let y = rows_times_matrix(xs.as_slice::<f32>()?, m, weights(&ws)?, d_in, d_out);
        let mut shape = dims;
        shape[D - 1] = d_out;
        Some(Tensor::from_data(TensorData::new(y, shape), &x.device()))
    }

    pub fn rows_times_weight_t<B: Backend>(
        x: &Tensor<B, 2>,
        w: &Tensor<B, 2>,
    ) -> Option<Tensor<B, 2>> {
        let [m, d] = x.dims();
        let [n, w_d] = w.dims();
        if w_d != d || !eligible::<B>(m, x.dtype()) {
            return None;
        }
        let (xs, ws) = (as_flex(x)?, as_flex(w)?);
        let y = rows_times_matrix_t(xs.as_slice::<f32>()?, m, weights(&ws)?, n, d);
        Some(Tensor::from_data(TensorData::new(y, [m, n]), &x.device()))
    }

    /// Whether `B` is the CPU backend (autodiff's wrapper of it is another type).
    pub fn is_flex<B: Backend>() -> bool {
        TypeId::of::<B>() == TypeId::of::<Flex>()
    }

    /// On the CPU backend, f32 rows, few of them.
    fn eligible<B: Backend>(rows: usize, dtype: DType) -> bool {
        is_flex::<B>() && (1..=MAX_ROWS).contains(&rows) && dtype == DType::F32
    }

    /// The tensor's burn-flex primitive (a reference-counted handle: no values are copied).
    fn as_flex<B: Backend, const D: usize>(t: &Tensor<B, D>) -> Option<FlexTensor> {
        match t.clone().into_primitive() {
            TensorPrimitive::Float(p) => (Box::new(p) as Box<dyn Any>)
                .downcast::<FlexTensor>()
                .ok()
                .map(|b| *b),
            TensorPrimitive::QFloat(_) => None,
        }
    }

    /// A contiguous weight's values in their stored type; `None` for a strided view, another
    /// type, or f16 on a CPU without the vector loops that widen it (converting f16 one value
    /// at a time is slower than gemm's own f16 kernels; bf16 widens by a shift anywhere, and
    /// burn-flex has no bf16 kernel).
    fn weights(w: &FlexTensor) -> Option<WeightSlice<'_>> {
        match w.dtype() {
            DType::F32 => w.as_slice::<f32>().map(WeightSlice::F32),
            DType::F16 if widens_in_registers() => w.as_slice::<f16>().map(WeightSlice::F16),
            DType::BF16 => w.as_slice::<bf16>().map(WeightSlice::Bf16),
            _ => None,
        }
    }
}
