//! The CPU backend's (burn-flex's) fast paths, built with the crate's `flex` feature (the
//! CLI's `cpu` feature turns it on): where the model's tensors are on burn-flex, its hot
//! operations go to `skipgpt-kernels`, on plain slices, instead of Burn's:
//!
//! - **decoding and short-prompt products** ([`rows_times_weight`], [`rows_times_weight_t`]):
//!   products of at most [`MAX_ROWS`] f32 rows stream each weight once over every core
//!   ([`skipgpt_kernels::matvec`]; burn-flex gives a small product to gemm on one core, packs both
//!   operands on every product and widens f16/bf16 operands whole first). Longer prefills of
//!   half-precision weights widen the weights and take gemm's f32 kernels;
//! - **the engine's attention** ([`attend`], [`skipgpt_kernels::attention`]): every query row over the
//!   stretch of its cache it sees, on every core;
//! - **RMSNorm, the rotary rotation and SwiGLU** ([`rms_norm`], [`rotate`], [`swiglu`],
//!   [`skipgpt_kernels::ops`]): one pass each instead of four to seven tensor operations;
//! - **the engine's cache append** ([`write_rows`]), in place.
//!
//! Anything else (another backend, autodiff's tensors, which are of another type, a strided or
//! half-precision input) declines with `None`, and [`crate::dispatch`], the only module of the
//! model that calls this one, runs Burn's operations instead: the model stays generic over the
//! backend, the CPU backend being recognised by its type at run time. The tests call these
//! paths directly and compare each with Burn's operations on the reference backend.

use std::any::{Any, TypeId};

use burn::tensor::{backend::Backend, DType, Tensor, TensorData, TensorPrimitive};
use burn_flex::{Flex, FlexTensor};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use crate::dispatch::{MAX_ROWS, MAX_ROWS_IN_OUT};
use skipgpt_kernels::attention::{self, KvCache, QueryRow};
use skipgpt_kernels::matvec::{
    rows_times_matrices, rows_times_matrix_t, widens_in_registers, Matrix, WeightSlice,
};

/// `x · W` for `W` held `[in, out]` (Burn's `Linear` layout, contiguous) or as a transposed view
/// of a contiguous `[out, in]` ([`crate::dispatch::holds_weights_out_in`]), in f32, or `None` where Burn's
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
    let dims = x.dims();
    let m = dims[..D - 1].iter().product::<usize>();
    if m <= MAX_ROWS {
        if let Some(mut ys) = rows_times_weights(x, std::slice::from_ref(w)) {
            return Some(ys.remove(0));
        }
        if m <= MAX_ROWS_IN_OUT {
            return None;
        }
    }
    // more rows than the kernels take (for this layout): half-precision weights widened
    if w.dims()[0] != dims[D - 1] {
        return None;
    }
    many_rows_times_half_weight(x, w)
}

/// `x · W` for each of `weights` (each as [`rows_times_weight`] takes it) in one parallel pass
/// ([`skipgpt_kernels::matvec::rows_times_matrices`]): the projections of a decoding step that read the
/// same rows (q, k and v; gate and up). `None` where any of them would not take the kernels.
///
/// # Shapes
/// - x: `[..., in]`
/// - each weight: `[in, out_k]`
/// - output: `[..., out_k]` per weight
pub fn rows_times_weights<B: Backend, const D: usize>(
    x: &Tensor<B, D>,
    weights: &[Tensor<B, 2>],
) -> Option<Vec<Tensor<B, D>>> {
    let dims = x.dims();
    let d_in = dims[D - 1];
    let m = dims[..D - 1].iter().product::<usize>();
    if !eligible::<B>(m, x.dtype()) || weights.iter().any(|w| w.dims()[0] != d_in) {
        return None;
    }
    let xs = as_flex(x)?;
    let rows = xs.as_slice::<f32>()?;
    // each weight in storage order: contiguous [in, out], or a transposed view of a
    // contiguous [out, in]
    let stored: Vec<(FlexTensor, bool)> = weights
        .iter()
        .map(|w| match as_flex(w)? {
            f if weights_of(&f).is_some() => Some((f, false)),
            _ => as_flex(&w.clone().transpose()).map(|f| (f, true)),
        })
        .collect::<Option<_>>()?;
    if m > MAX_ROWS_IN_OUT && stored.iter().any(|(_, out_in)| !out_in) {
        return None;
    }
    let matrices: Vec<Matrix<'_>> = stored
        .iter()
        .zip(weights)
        .map(|((f, out_in), w)| {
            let [d_in, d_out] = w.dims();
            Some(Matrix {
                w: weights_of(f)?,
                d_in,
                d_out,
                out_in: *out_in,
            })
        })
        .collect::<Option<_>>()?;
    let ys = rows_times_matrices(rows, m, &matrices);
    let device = x.device();
    Some(
        ys.into_iter()
            .zip(&matrices)
            .map(|(y, mat)| {
                let mut shape = dims;
                shape[D - 1] = mat.d_out;
                Tensor::from_data(TensorData::new(y, shape), &device)
            })
            .collect(),
    )
}

/// `x · Wᵀ` for `W` stored `[out, in]` (the tied head reads the embedding table so), in f32,
/// or `None` where Burn's matmul should run.
///
/// # Shapes
/// - x: `[rows, in]`
/// - w: `[out, in]`
/// - output: `[rows, out]`
pub fn rows_times_weight_t<B: Backend>(x: &Tensor<B, 2>, w: &Tensor<B, 2>) -> Option<Tensor<B, 2>> {
    let [m, d] = x.dims();
    let [n, w_d] = w.dims();
    if w_d != d || !eligible::<B>(m, x.dtype()) {
        return None;
    }
    let (xs, ws) = (as_flex(x)?, as_flex(w)?);
    let y = rows_times_matrix_t(xs.as_slice::<f32>()?, m, weights_of(&ws)?, n, d);
    Some(Tensor::from_data(TensorData::new(y, [m, n]), &x.device()))
}

/// The sparse engine's attention on the CPU backend ([`skipgpt_kernels::attention`]), or `None`
/// where the backend's attention op should run. `rows` gives, for every query row, its
/// sequence and the range of cache slots it sees.
///
/// # Shapes
/// - q: `[rows, heads, head_dim]`
/// - k, v: `[batch * kv_heads * capacity, head_dim]` (the engine's cache)
/// - output: `[rows, heads * head_dim]`
pub fn attend<B: Backend>(
    q: &Tensor<B, 3>,
    k: &Tensor<B, 2>,
    v: &Tensor<B, 2>,
    kv_heads: usize,
    capacity: usize,
    rows: &[QueryRow],
) -> Option<Tensor<B, 2>> {
    let [n, heads, hd] = q.dims();
    if !is_flex::<B>()
        || q.dtype() != DType::F32
        || k.dtype() != v.dtype()
        || n != rows.len()
        || k.dims()[1] != hd
    {
        return None;
    }
    let (qs, ks, vs) = (as_flex(q)?, as_flex(k)?, as_flex(v)?);
    let cache = KvCache {
        k: weights_any(&ks)?,
        v: weights_any(&vs)?,
        kv_heads,
        capacity,
        head_dim: hd,
    };
    let scale = (hd as f32).powf(-0.5);
    let y = attention::attend(qs.as_slice::<f32>()?, heads, rows, cache, scale);
    Some(Tensor::from_data(
        TensorData::new(y, [n, heads * hd]),
        &q.device(),
    ))
}

/// RMSNorm of every row ([`skipgpt_kernels::ops::rms_norm`]), or `None` where the tensor
/// operations should run.
///
/// # Shapes
/// - x: `[..., dim]`
/// - weight: `[dim]`
/// - output: like x
pub fn rms_norm<B: Backend, const D: usize>(
    x: &Tensor<B, D>,
    weight: &Tensor<B, 1>,
    eps: f64,
) -> Option<Tensor<B, D>> {
    elementwise(&[flat(x), weight.clone()], x.dims(), |v| {
        skipgpt_kernels::ops::rms_norm(v[0], v[1], eps as f32)
    })
}

/// The rotary rotation of every head of every row ([`skipgpt_kernels::ops::rotate`]), or
/// `None` where the tensor operations should run.
///
/// # Shapes
/// - x: `[rows, heads, head_dim]`
/// - cos, sin: `[rows, head_dim]` (`RotaryEmbedding::cos_sin_at`)
/// - output: like x
pub fn rotate<B: Backend>(
    x: &Tensor<B, 3>,
    cos: &Tensor<B, 2>,
    sin: &Tensor<B, 2>,
) -> Option<Tensor<B, 3>> {
    let [_, heads, head_dim] = x.dims();
    elementwise(&[flat(x), flat(cos), flat(sin)], x.dims(), |v| {
        skipgpt_kernels::ops::rotate(v[0], heads, head_dim, v[1], v[2])
    })
}

/// `silu(gate) · up` ([`skipgpt_kernels::ops::swiglu`]), or `None` where the tensor operations
/// should run.
///
/// # Shapes
/// - gate, up, output: `[..., width]`
pub fn swiglu<B: Backend, const D: usize>(
    gate: &Tensor<B, D>,
    up: &Tensor<B, D>,
) -> Option<Tensor<B, D>> {
    if gate.dims() != up.dims() {
        return None;
    }
    elementwise(&[flat(gate), flat(up)], gate.dims(), |v| {
        skipgpt_kernels::ops::swiglu(v[0], v[1])
    })
}

/// `t`'s values as one row (a view when `t` is contiguous).
fn flat<B: Backend, const D: usize>(t: &Tensor<B, D>) -> Tensor<B, 1> {
    let n = t.dims().iter().product::<usize>();
    t.clone().reshape([n])
}

/// `x · W` for many f32 rows and a half-precision `W` (a prefill with `--dtype f16|bf16`):
/// `W` widened to f32 ([`skipgpt_kernels::matvec::widen_to_f32`]) and multiplied by gemm's f32
/// kernels, the rows unrounded. `None` for f32 weights, which Burn's matmul takes as they
/// are.
fn many_rows_times_half_weight<B: Backend, const D: usize>(
    x: &Tensor<B, D>,
    w: &Tensor<B, 2>,
) -> Option<Tensor<B, D>> {
    if !is_flex::<B>() || x.dtype() != DType::F32 || !matches!(w.dtype(), DType::F16 | DType::BF16)
    {
        return None;
    }
    let [d_in, d_out] = w.dims();
    // in storage order: [in, out] contiguous, or the transposed view of [out, in]
    let transposed = !is_contiguous(w);
    let stored = if transposed {
        w.clone().transpose()
    } else {
        w.clone()
    };
    let flex = as_flex(&stored)?;
    let wide = skipgpt_kernels::matvec::widen_to_f32(weights_any(&flex)?);
    let wide = Tensor::<B, 2>::from_data(TensorData::new(wide, stored.dims()), &w.device());
    let wide = if transposed { wide.transpose() } else { wide };
    let dims = x.dims();
    let rows = x
        .clone()
        .reshape([dims[..D - 1].iter().product::<usize>(), d_in]);
    let mut out = dims;
    out[D - 1] = d_out;
    Some(rows.matmul(wide).reshape(out))
}

/// `cache` with `rows` written into its rows `slots`, in place, converted to the cache's type
/// (f32, f16 or bf16): the engine's cache append on the CPU backend. Burn's indexed writes
/// return a new tensor, and burn-flex's copy the whole buffer to make it, so appending one
/// token to a cache copied every stored key and value of every layer on every step. `Err`
/// gives `cache` back unchanged where this does not apply: another backend, a strided or
/// shared buffer (a cloned cache keeps its own copy), rows that are not f32.
///
/// # Shapes
/// - cache: `[slots, width]`
/// - rows: `[slots.len(), width]`
///
/// # Panics
/// When a slot is past the cache's rows or the widths differ.
pub fn write_rows<B: Backend>(
    cache: Tensor<B, 2>,
    slots: &[usize],
    rows: &Tensor<B, 2>,
) -> Result<Tensor<B, 2>, Tensor<B, 2>> {
    let [n, width] = cache.dims();
    assert_eq!(rows.dims(), [slots.len(), width], "rows to write");
    assert!(slots.iter().all(|&s| s < n), "a slot past the {n} rows");
    if !is_flex::<B>() || rows.dtype() != DType::F32 {
        return Err(cache);
    }
    let Some(src) = as_flex(rows) else {
        return Err(cache);
    };
    let Some(src) = src.as_slice::<f32>() else {
        return Err(cache);
    };
    let mut dst = into_flex(cache)?;
    if !dst.is_contiguous() || dst.layout().start_offset() != 0 || !dst.is_unique() {
        return Err(from_flex(dst));
    }
    let rows_of = |s: usize| s * width..(s + 1) * width;
    match dst.dtype() {
        DType::F32 => {
            let d = dst.try_storage_mut::<f32>().expect("unique");
            for (i, &s) in slots.iter().enumerate() {
                d[rows_of(s)].copy_from_slice(&src[rows_of(i)]);
            }
        }
        DType::F16 => {
            let d = dst.try_storage_mut::<f16>().expect("unique");
            for (i, &s) in slots.iter().enumerate() {
                d[rows_of(s)].convert_from_f32_slice(&src[rows_of(i)]);
            }
        }
        DType::BF16 => {
            let d = dst.try_storage_mut::<bf16>().expect("unique");
            for (i, &s) in slots.iter().enumerate() {
                d[rows_of(s)].convert_from_f32_slice(&src[rows_of(i)]);
            }
        }
        _ => return Err(from_flex(dst)),
    }
    Ok(from_flex(dst))
}

/// A contiguous weight's values in their stored type, whatever the CPU.
fn weights_any(w: &FlexTensor) -> Option<WeightSlice<'_>> {
    match w.dtype() {
        DType::F32 => w.as_slice::<f32>().map(WeightSlice::F32),
        DType::F16 => w.as_slice::<f16>().map(WeightSlice::F16),
        DType::BF16 => w.as_slice::<bf16>().map(WeightSlice::Bf16),
        _ => None,
    }
}

/// `op` on the values of `inputs` (all f32, contiguous, on the CPU backend), its result
/// shaped `shape`; `None` otherwise.
fn elementwise<B: Backend, const D: usize>(
    inputs: &[Tensor<B, 1>],
    shape: [usize; D],
    op: impl FnOnce(&[&[f32]]) -> Vec<f32>,
) -> Option<Tensor<B, D>> {
    if !is_flex::<B>() || inputs.iter().any(|t| t.dtype() != DType::F32) {
        return None;
    }
    let flex: Vec<FlexTensor> = inputs.iter().map(as_flex).collect::<Option<_>>()?;
    let slices: Vec<&[f32]> = flex
        .iter()
        .map(|t| t.as_slice::<f32>())
        .collect::<Option<_>>()?;
    let y = op(&slices);
    Some(Tensor::from_data(
        TensorData::new(y, shape),
        &inputs[0].device(),
    ))
}

/// Whether `t` is a burn-flex tensor whose values lie contiguous in storage order.
pub(crate) fn is_contiguous<B: Backend, const D: usize>(t: &Tensor<B, D>) -> bool {
    as_flex(t).is_some_and(|f| f.is_contiguous() && f.layout().start_offset() == 0)
}

/// Whether `B` is the CPU backend (autodiff's wrapper of it is another type).
pub fn is_flex<B: Backend>() -> bool {
    TypeId::of::<B>() == TypeId::of::<Flex>()
}

/// On the CPU backend, f32 rows, few of them.
fn eligible<B: Backend>(rows: usize, dtype: DType) -> bool {
    is_flex::<B>() && (1..=MAX_ROWS).contains(&rows) && dtype == DType::F32
}

/// The tensor's burn-flex primitive, taken (not shared: writing in place needs the only
/// handle), or the tensor back where it is not one.
fn into_flex<B: Backend, const D: usize>(t: Tensor<B, D>) -> Result<FlexTensor, Tensor<B, D>> {
    match t.into_primitive() {
        TensorPrimitive::Float(p) => match (Box::new(p) as Box<dyn Any>).downcast::<FlexTensor>() {
            Ok(f) => Ok(*f),
            Err(p) => {
                let p = p
                    .downcast::<B::FloatTensorPrimitive>()
                    .expect("its own type");
                Err(Tensor::from_primitive(TensorPrimitive::Float(*p)))
            }
        },
        q => Err(Tensor::from_primitive(q)),
    }
}

/// [`into_flex`] back. `B` must be [`Flex`].
fn from_flex<B: Backend, const D: usize>(t: FlexTensor) -> Tensor<B, D> {
    let p = *(Box::new(t) as Box<dyn Any>)
        .downcast::<B::FloatTensorPrimitive>()
        .expect("B is Flex");
    Tensor::from_primitive(TensorPrimitive::Float(p))
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
fn weights_of(w: &FlexTensor) -> Option<WeightSlice<'_>> {
    match w.dtype() {
        DType::F32 => w.as_slice::<f32>().map(WeightSlice::F32),
        DType::F16 if widens_in_registers() => w.as_slice::<f16>().map(WeightSlice::F16),
        DType::BF16 => w.as_slice::<bf16>().map(WeightSlice::Bf16),
        _ => None,
    }
}
