//! Weight matrices kept in llama.cpp's block formats (Q8_0, Q4_K, ...), read in place from the
//! memory-mapped GGUF they came from: a quantized model takes the memory of its file, not of
//! its dequantized copy.
//!
//! Only the CPU backend computes with them ([`keeps_quantized`]): its products go to
//! [`skipgpt_kernels::quant`], which quantizes the activation rows to 8 bits and takes integer
//! dot products with the blocks. Every other backend (and training, whose autodiff tensors
//! are of another type) gets the matrices dequantized at load.

use std::ops::Range;
use std::sync::Arc;

use burn::tensor::{backend::Backend, Tensor, TensorData};
use skipgpt_kernels::quant::{self, QuantMatrix, QuantType};

/// Whether weights loaded for `B` stay in their block format: on the CPU backend itself, not
/// under autodiff (nothing trains a quantized weight; an adapter trains beside it).
pub fn keeps_quantized<B: Backend>() -> bool {
    crate::dispatch::engine_kernels::<B>()
}

/// A matrix `[n, d]` (HF's `[out, in]`) in a block format, read in place from a mapped file:
/// stored row `r` holds the weights of output `r`, or, with `order`, of the output that
/// `order` puts there (llama.cpp's q/k row order, undone on the products rather than by
/// copying the rows).
#[derive(Clone)]
pub struct QuantWeight {
    kind: QuantType,
    map: Arc<memmap2::Mmap>,
    range: Range<usize>,
    /// Output `r` is stored row `order[r]`.
    order: Option<Arc<[usize]>>,
    n: usize,
    d: usize,
}

impl std::fmt::Debug for QuantWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "QuantWeight({}, [{}, {}])",
            self.kind.name(),
            self.n,
            self.d
        )
    }
}

impl QuantWeight {
    /// The blocks at `range` of `map`, or `None` when they do not hold `[n, d]` of `kind`.
    pub fn mapped(
        kind: QuantType,
        map: Arc<memmap2::Mmap>,
        range: Range<usize>,
        [n, d]: [usize; 2],
    ) -> Option<Self> {
        let w = QuantWeight {
            kind,
            map,
            range,
            order: None,
            n,
            d,
        };
        w.matrix().is_consistent().then_some(w)
    }

    /// The same matrix with its rows reordered: row `r` of the result is row `order[r]`.
    ///
    /// # Panics
    /// When `order` is not a permutation of the rows.
    pub fn with_rows(&self, order: &[usize]) -> Self {
        let mut seen = vec![false; self.n];
        for &r in order {
            assert!(
                r < self.n && !std::mem::replace(&mut seen[r], true),
                "a row order"
            );
        }
        assert_eq!(order.len(), self.n, "a row order");
        let order: Arc<[usize]> = match &self.order {
            Some(old) => order.iter().map(|&r| old[r]).collect(),
            None => order.into(),
        };
        QuantWeight {
            order: Some(order),
            ..self.clone()
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.map[self.range.clone()]
    }

    /// Stored row of output `r`.
    fn stored_row(&self, r: usize) -> usize {
        self.order.as_ref().map_or(r, |order| order[r])
    }

    /// `y` (`[rows, n]` in stored order) in output order.
    fn reordered(&self, y: Vec<f32>) -> Vec<f32> {
        let Some(order) = &self.order else {
            return y;
        };
        y.chunks(self.n.max(1))
            .flat_map(|row| order.iter().map(move |&r| row[r]))
            .collect()
    }

    /// What the kernels read.
    pub fn matrix(&self) -> QuantMatrix<'_> {
        QuantMatrix {
            kind: self.kind,
            bytes: self.bytes(),
            n: self.n,
            d: self.d,
        }
    }

    pub fn kind(&self) -> QuantType {
        self.kind
    }

    /// `[n, d]`: outputs, inputs.
    pub fn dims(&self) -> [usize; 2] {
        [self.n, self.d]
    }

    /// Bytes of the blocks.
    pub fn size(&self) -> usize {
        self.bytes().len()
    }

    /// Every value, `[n, d]` row-major, as f32.
    pub fn dequantize(&self) -> Vec<f32> {
        if self.order.is_none() {
            // the stored order is the output order: the blocks in one pass
            return quant::dequantize(self.kind, self.bytes());
        }
        self.rows(&(0..self.n).collect::<Vec<_>>())
    }

    /// Rows `ids` dequantized, `[ids.len(), d]` row-major: an embedding lookup.
    pub fn rows(&self, ids: &[usize]) -> Vec<f32> {
        let row = self.kind.row_bytes(self.d);
        let bytes = self.bytes();
        ids.iter()
            .map(|&r| self.stored_row(r))
            .flat_map(|r| quant::dequantize(self.kind, &bytes[r * row..(r + 1) * row]))
            .collect()
    }

    /// `x · Wᵀ`, in f32.
    ///
    /// # Shapes
    /// - x: `[..., d]`
    /// - output: `[..., n]`
    pub fn forward<B: Backend, const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        Self::forward_many(&[self], x).remove(0)
    }

    /// `x · Wᵀ` for several matrices of the same input width (q, k and v; gate and up): `x`
    /// quantized once, and all their rows in one parallel pass.
    ///
    /// # Shapes
    /// - x: `[..., d]`
    /// - output: `[..., n_k]` per matrix
    pub fn forward_many<B: Backend, const D: usize>(
        weights: &[&Self],
        x: Tensor<B, D>,
    ) -> Vec<Tensor<B, D>> {
        let dims = x.dims();
        let rows = dims[..D - 1].iter().product::<usize>();
        let device = x.device();
        let values = x
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .expect("f32 activations");
        let matrices: Vec<QuantMatrix<'_>> = weights.iter().map(|w| w.matrix()).collect();
        let ys = quant::rows_times_quantized_many(&values, rows, &matrices);
        ys.into_iter()
            .zip(weights)
            .map(|(y, w)| {
                let mut dims = dims;
                dims[D - 1] = w.n;
                Tensor::from_data(TensorData::new(w.reordered(y), dims), &device)
            })
            .collect()
    }
}
