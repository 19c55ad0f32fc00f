//! Key/value cache for incremental decoding.
//!
//! Each layer keeps the rotated keys and the values of every token seen so far, so a decode
//! step only projects the new token and attends over the stored ones.

use burn::tensor::{backend::Backend, Tensor};

/// The cached keys and values of one layer.
#[derive(Debug, Clone, Default)]
pub struct LayerKv<B: Backend> {
    /// `[batch, kv_heads, cached, head_dim]` each.
    kv: Option<(Tensor<B, 4>, Tensor<B, 4>)>,
    /// `[batch, cached]`: 0 for tokens whose keys are hidden (`kv_policy = drop`).
    visible: Option<Tensor<B, 2>>,
}

impl<B: Backend> LayerKv<B> {
    /// Appends new keys/values (and their visibility, if tracked) and returns everything
    /// cached, new ones included.
    ///
    /// # Shapes
    /// - k, v: `[batch, kv_heads, new, head_dim]`; visible: `[batch, new]`
    /// - output: `[batch, kv_heads, cached + new, head_dim]` twice; `[batch, cached + new]`
    pub fn append(
        &mut self,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        visible: Option<Tensor<B, 2>>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>, Option<Tensor<B, 2>>) {
        let (k, v) = match self.kv.take() {
            Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
            None => (k, v),
        };
        // A cache is either always routed with kv_policy = drop or never: visibility is
        // tracked from the first step or not at all.
        let visible = match (self.visible.take(), visible) {
            (Some(old), Some(new)) => Some(Tensor::cat(vec![old, new], 1)),
            (_, new) => new,
        };
        self.kv = Some((k.clone(), v.clone()));
        self.visible = visible.clone();
        (k, v, visible)
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.kv.as_ref().map_or(0, |(k, _)| k.dims()[2])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The cache of a whole model: one [`LayerKv`] per layer plus the number of positions consumed.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    layers: Vec<LayerKv<B>>,
    len: usize,
}

impl<B: Backend> KvCache<B> {
    pub fn new(num_layers: usize) -> Self {
        KvCache {
            layers: (0..num_layers)
                .map(|_| LayerKv {
                    kv: None,
                    visible: None,
                })
                .collect(),
            len: 0,
        }
    }

    /// Positions already processed: the next token's position.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn layer(&mut self, i: usize) -> &mut LayerKv<B> {
        &mut self.layers[i]
    }

    /// Marks `n` more positions as consumed (after every layer has appended them).
    pub fn advance(&mut self, n: usize) {
        self.len += n;
    }
}
