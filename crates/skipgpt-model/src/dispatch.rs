//! The one place the model chooses how its hot operations run: on the CPU backend (burn-flex)
//! the kernels of `skipgpt-kernels`, through [`crate::flex_kernels`]; everywhere else (another
//! backend, autodiff's tensors, a strided or half-precision input the kernels decline) Burn's
//! tensor operations, written here beside the fast path they stand in for. The rest of the
//! crate calls this module and gets a tensor back; it never asks which backend it runs on.
//!
//! Three groups:
//! - **operations with a tensor result** ([`rms_norm`], [`swiglu`], [`times_weight`],
//!   [`times_weights`], [`times_weight_t`], [`write_rows`]): each tries the kernel, else runs
//!   Burn's operations;
//! - **the engine's strategy on the CPU** ([`engine_kernels`] and what it enables: [`attend`],
//!   [`rotate`], prefill in pieces of [`MAX_ROWS`] rows, [`in_pool`]): the engine keeps a
//!   different attention and rotation for the GPU backends (padded batches through the
//!   backend's attention op, cached rotary tables), so these say `None` and the engine takes
//!   that path;
//! - **weight layout at load** ([`holds_weights_out_in`], [`hold_weight`]).

use burn::tensor::{activation, backend::Backend, IndexingUpdateOp, Tensor};
use skipgpt_kernels::attention::QueryRow;

#[cfg(feature = "flex")]
use crate::flex_kernels as flex;

/// Most activation rows a product is taken on the CPU backend's kernels for: decoding steps
/// (one row per sequence, routed modules fewer) and short prompts. The kernels multiply each
/// weight vector with blocks of rows held in registers and read every weight once, where gemm
/// packs both operands on every product; past a few hundred rows the rows no longer stay in
/// the cache while a weight row streams past and gemm is ahead (the crossover is measured in
/// `docs/benchmarks.md`, "Where the kernels hand over to gemm").
pub const MAX_ROWS: usize = 128;

/// Most activation rows a product with a weight held `[in, out]` is taken on the kernels for:
/// that layout's kernel ([`skipgpt_kernels::matvec::rows_times_matrix`]) adds scaled weight
/// rows into every output row, so its traffic grows with the rows (at 16 rows it was no faster
/// than gemm). The CPU backend holds the model's weights `[out, in]`
/// ([`holds_weights_out_in`]).
pub const MAX_ROWS_IN_OUT: usize = 8;

/// Whether linear weights on `B` are held as checkpoints store them, `[out, in]`, and seen as
/// Burn's `[in, out]` through a transposed view: on the CPU backend, with or without autodiff.
///
/// A decoding product then reads each output's weights as one contiguous row and takes dot
/// products with it, faster than adding up the rows of an `[in, out]` matrix
/// (`docs/benchmarks.md`, "Weights as checkpoints store them"). gemm (prefill, training) reads either layout
/// without copying, and no weight is transposed at load. Other backends keep a contiguous
/// `[in, out]`: burn-ndarray copies a strided weight in every product.
pub fn holds_weights_out_in<B: Backend>(device: &B::Device) -> bool {
    matches!(B::name(device).as_str(), "flex" | "autodiff<flex>")
}

/// `w` (`[in, out]`, any layout) in the layout [`holds_weights_out_in`] asks of `B`: a
/// transposed view of a contiguous `[out, in]` on the CPU backend (copied there once if it is
/// not one already), unchanged elsewhere. For weights made in place (merging an adapter).
pub fn hold_weight<B: Backend>(w: Tensor<B, 2>) -> Tensor<B, 2> {
    let device = w.device();
    if !holds_weights_out_in::<B>(&device) {
        return w;
    }
    let out_in = w.transpose();
    #[cfg(feature = "flex")]
    if flex::is_contiguous(&out_in) {
        return out_in.transpose();
    }
    Tensor::<B, 2>::from_data(out_in.into_data(), &device).transpose()
}

/// Runs an engine call of `rows` token rows on the CPU backend's threads; elsewhere (GPU
/// backends) where it is called.
///
/// - A decoding step or a short prompt (at most [`MAX_ROWS`] rows, the products' kernels) runs
///   as a [`skipgpt_kernels::thread_team`]: its ~200 parallel products find the pool's other
///   threads spinning instead of asleep.
/// - A longer call (prefill) runs on a thread of rayon's pool, where its gemm products and
///   burn-flex's operations share the pool as usual. (A thread outside the pool that starts
///   parallel work hands it over and sleeps until it is done; inside, it takes part.)
pub fn in_pool<B: Backend, R: Send>(rows: usize, f: impl FnOnce() -> R + Send) -> R {
    if engine_kernels::<B>() {
        if rows <= MAX_ROWS {
            return skipgpt_kernels::thread_team::run(f);
        }
        // `scope` runs its body on a pool thread (at once if this is one)
        return rayon::scope(|_| f());
    }
    f()
}

/// RMSNorm of every row.
///
/// # Shapes
/// - x: `[..., dim]`
/// - weight: `[dim]`
/// - output: like x
pub fn rms_norm<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, D> {
    #[cfg(feature = "flex")]
    if let Some(y) = flex::rms_norm(&x, &weight, eps) {
        return y;
    }
    let rms = (x.clone().powi_scalar(2).mean_dim(D - 1) + eps).sqrt();
    x / rms * weight.unsqueeze()
}

/// `silu(gate) · up`, the SwiGLU MLP's inner activation.
///
/// # Shapes
/// - gate, up, output: `[..., width]`
pub fn swiglu<B: Backend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    #[cfg(feature = "flex")]
    if let Some(hidden) = flex::swiglu(&gate, &up) {
        return hidden;
    }
    activation::silu(gate) * up
}

/// `x · W` for a weight held `[in, out]` (contiguous, or the CPU backend's transposed view of
/// `[out, in]`), in `x`'s type: a half-precision weight is multiplied in its own type, its
/// input rows cast to it and the result cast back ([`crate::precision`]).
///
/// # Shapes
/// - x: `[..., in]`
/// - w: `[in, out]`
/// - output: `[..., out]`
pub fn times_weight<B: Backend, const D: usize>(x: Tensor<B, D>, w: Tensor<B, 2>) -> Tensor<B, D> {
    #[cfg(feature = "flex")]
    if let Some(y) = flex::rows_times_weight(&x, &w) {
        return y;
    }
    // one 2-D product of every row: Burn's `linear` would reshape the weight to x's rank,
    // which copies a weight held as a transposed view on every call, and its backward pass
    // copies a contiguous one
    let (x_dtype, w_dtype) = (x.dtype(), w.dtype());
    let dims = x.dims();
    let (d_in, d_out) = (dims[D - 1], w.dims()[1]);
    let rows = x.reshape([dims[..D - 1].iter().product::<usize>(), d_in]);
    let y = if x_dtype == w_dtype {
        rows.matmul(w)
    } else {
        rows.cast(w_dtype).matmul(w).cast(x_dtype)
    };
    let mut out = dims;
    out[D - 1] = d_out;
    y.reshape(out)
}

/// [`times_weight`] for each of `weights` that read the same rows (q, k and v; gate and up):
/// on the CPU backend one parallel pass over all of them.
///
/// # Shapes
/// - x: `[..., in]`
/// - each weight: `[in, out_k]`
/// - output: `[..., out_k]` per weight
pub fn times_weights<B: Backend, const D: usize>(
    x: &Tensor<B, D>,
    weights: &[Tensor<B, 2>],
) -> Vec<Tensor<B, D>> {
    #[cfg(feature = "flex")]
    if let Some(products) = flex::rows_times_weights(x, weights) {
        return products;
    }
    weights
        .iter()
        .map(|w| times_weight(x.clone(), w.clone()))
        .collect()
}

/// `x · Wᵀ` for a weight stored `[out, in]` (the tied head reads the embedding table so), in
/// `x`'s type.
///
/// # Shapes
/// - x: `[rows, in]`
/// - w: `[out, in]`
/// - output: `[rows, out]`
pub fn times_weight_t<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 2>) -> Tensor<B, 2> {
    #[cfg(feature = "flex")]
    if let Some(y) = flex::rows_times_weight_t(&x, &w) {
        return y;
    }
    crate::precision::matmul_weight_rows(w, x).transpose()
}

/// `cache` with `rows` written into its rows `slots` (zero until then), in the cache's type:
/// in place on the CPU backend, a new tensor elsewhere.
///
/// # Shapes
/// - cache: `[slots, width]`
/// - rows: `[slots.len(), width]`
pub fn write_rows<B: Backend>(
    cache: Tensor<B, 2>,
    slots: &[usize],
    rows: Tensor<B, 2>,
) -> Tensor<B, 2> {
    #[cfg(feature = "flex")]
    let cache = match flex::write_rows(cache, slots, &rows) {
        Ok(written) => return written,
        Err(cache) => cache,
    };
    let ids = crate::engine::index_tensor::<B>(slots, &cache.device());
    let rows = rows.cast(cache.dtype());
    cache.select_assign(0, ids, rows, IndexingUpdateOp::Add)
}

/// Whether the engine runs on the CPU backend's kernels ([`attend`], [`rotate`], pieces of
/// [`MAX_ROWS`] rows) rather than its batched tensor path. Also whether quantized weights stay
/// in their blocks: only those kernels read them.
pub fn engine_kernels<B: Backend>() -> bool {
    #[cfg(feature = "flex")]
    return flex::is_flex::<B>();
    #[cfg(not(feature = "flex"))]
    false
}

/// The engine's attention on the CPU backend: every query row over the stretch of cache slots
/// it sees (`rows`), in a cache of `kv_heads` heads and `capacity` slots a sequence. `None`
/// where [`engine_kernels`] is false.
///
/// # Shapes
/// - q: `[rows, heads, head_dim]`
/// - kv: keys and values, each `[batch * kv_heads * capacity, head_dim]` (the engine's cache)
/// - output: `[rows, heads * head_dim]`
pub fn attend<B: Backend>(
    q: &Tensor<B, 3>,
    kv: &(Tensor<B, 2>, Tensor<B, 2>),
    (kv_heads, capacity): (usize, usize),
    rows: &[QueryRow],
) -> Option<Tensor<B, 2>> {
    #[cfg(feature = "flex")]
    return flex::attend(q, &kv.0, &kv.1, kv_heads, capacity, rows);
    #[cfg(not(feature = "flex"))]
    {
        let _ = (q, kv, kv_heads, capacity, rows);
        None
    }
}

/// The rotary rotation of every head of every row in one pass on the CPU backend. `None`
/// elsewhere.
///
/// # Shapes
/// - x: `[rows, heads, head_dim]`
/// - cos, sin: `[rows, head_dim]`
/// - output: like x
pub fn rotate<B: Backend>(
    x: &Tensor<B, 3>,
    cos: &Tensor<B, 2>,
    sin: &Tensor<B, 2>,
) -> Option<Tensor<B, 3>> {
    #[cfg(feature = "flex")]
    return flex::rotate(x, cos, sin);
    #[cfg(not(feature = "flex"))]
    {
        let _ = (x, cos, sin);
        None
    }
}
