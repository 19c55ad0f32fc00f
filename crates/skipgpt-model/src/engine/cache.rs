//! The engine's key/value cache: per sequence and layer, in preallocated buffers the
//! attention reads in place.

use burn::tensor::{backend::Backend, DType, Tensor};

use crate::dispatch;
use crate::error::{ModelError, Result};

/// Cache rows are allocated in blocks of this many tokens per sequence, so a growing cache is
/// copied once per block rather than once per token, and holds at most one block of padding.
const CACHE_BLOCK: usize = 64;

/// One layer's keys and values for every sequence of the batch, in preallocated buffers.
///
/// Sequence `s`'s `j`-th stored token for key/value head `h` lives in row
/// `(s * kv_heads + h) * capacity + j` of `k` and `v`: the buffers are `[batch, kv_heads,
/// capacity, head_dim]`, the layout attention reads, so it reads them in place instead of
/// copying every stored key and value on every step. Rows past a sequence's stored count are
/// zero and hidden from attention by its mask. A new entry is written in place on the CPU
/// backend ([`crate::dispatch::write_rows`]); elsewhere it is added into its zero row, the one
/// indexed update every backend implements.
///
/// The buffers hold f32, or f16/bf16 where the model's matrices are held so
/// ([`cache_dtype`]).
#[derive(Debug, Clone)]
pub(super) struct LayerCache<B: Backend> {
    /// `[batch * kv_heads * capacity, head_dim]` each, rotated keys and values.
    pub(super) kv: Option<(Tensor<B, 2>, Tensor<B, 2>)>,
    /// Rows reserved per sequence and head.
    pub(super) capacity: usize,
    /// Per sequence: the position of each stored token, in storage order.
    pub(super) positions: Vec<Vec<usize>>,
}

impl<B: Backend> LayerCache<B> {
    fn new(batch: usize) -> Self {
        LayerCache {
            kv: None,
            capacity: 0,
            positions: vec![Vec::new(); batch],
        }
    }

    /// Forgets sequence `s`'s entries and zeroes their rows.
    fn reset_sequence(&mut self, s: usize) {
        if self.positions[s].is_empty() {
            return;
        }
        self.positions[s].clear();
        if let Some((k, v)) = self.kv.take() {
            let [_, hd] = k.dims();
            let (lanes, cap) = (self.positions.len(), self.capacity);
            let zero = |t: Tensor<B, 2>| {
                let heads = t.dims()[0] / cap / lanes;
                let t = t.reshape([lanes * heads, cap, hd]);
                let zeros = Tensor::zeros([heads, cap, hd], (&t.device(), t.dtype()));
                t.slice_assign([s * heads..(s + 1) * heads, 0..cap, 0..hd], zeros)
                    .reshape([lanes * heads * cap, hd])
            };
            self.kv = Some((zero(k), zero(v)));
        }
    }

    /// Makes room for `needed` entries per sequence, growing by whole blocks of `dtype`.
    fn reserve(
        &mut self,
        needed: usize,
        [heads, hd]: [usize; 2],
        dtype: DType,
        device: &B::Device,
    ) {
        if needed <= self.capacity {
            return;
        }
        let (lanes, old) = (self.positions.len() * heads, self.capacity);
        let cap = needed.div_ceil(CACHE_BLOCK) * CACHE_BLOCK;
        let grow = |t: Option<Tensor<B, 2>>| {
            let zeros = Tensor::<B, 3>::zeros([lanes, cap - old, hd], (device, dtype));
            let t = match t {
                None => zeros,
                Some(t) => Tensor::cat(vec![t.reshape([lanes, old, hd]), zeros], 1),
            };
            t.reshape([lanes * cap, hd])
        };
        let (k, v) = self.kv.take().unzip();
        self.kv = Some((grow(k), grow(v)));
        self.capacity = cap;
    }

    /// Stores `k`, `v` (`[m, kv_heads, head_dim]`, f32) for entries whose sequences are
    /// `seqs` (sorted by sequence, `m` long) at `pos` positions, in buffers of `dtype`.
    pub(super) fn append(
        &mut self,
        k: Tensor<B, 3>,
        v: Tensor<B, 3>,
        seqs: &[usize],
        pos: &[usize],
        dtype: DType,
        device: &B::Device,
    ) {
        let [m, heads, hd] = k.dims();
        let mut added = vec![0usize; self.positions.len()];
        for &s in seqs {
            added[s] += 1;
        }
        let needed = (0..added.len())
            .map(|s| self.positions[s].len() + added[s])
            .max()
            .unwrap_or(0);
        self.reserve(needed, [heads, hd], dtype, device);
        // rows of `k.reshape([m * heads, hd])`, token-major, and where each one goes
        let mut slots = Vec::with_capacity(m * heads);
        for (&s, &p) in seqs.iter().zip(pos) {
            let j = self.positions[s].len();
            self.positions[s].push(p);
            slots.extend((0..heads).map(|h| (s * heads + h) * self.capacity + j));
        }
        let (ck, cv) = self.kv.take().expect("reserved above");
        self.kv = Some((
            dispatch::write_rows(ck, &slots, k.reshape([m * heads, hd])),
            dispatch::write_rows(cv, &slots, v.reshape([m * heads, hd])),
        ));
    }
}

/// The type the engine's cache holds keys and values in, for a model whose matrices are held
/// in `weights`: f16 or bf16 with half-precision matrices (half the memory, and half the bytes
/// attention reads; llama.cpp keeps its cache in f16 too), f32 otherwise. Attention widens
/// them back to f32 for its scores, softmax and weighted sum.
pub fn cache_dtype(weights: DType) -> DType {
    match weights {
        DType::F16 | DType::BF16 => weights,
        _ => DType::F32,
    }
}

/// Per-sequence, per-layer key/value caches of the sparse engine.
///
/// Under `kv_policy = drop` a layer stores only the tokens that executed attention there, so
/// its buffers grow with its own execution count, not with the sequence length.
#[derive(Debug, Clone)]
pub struct SparseCache<B: Backend> {
    /// Positions consumed by each sequence.
    pub(super) lens: Vec<usize>,
    pub(super) layers: Vec<LayerCache<B>>,
}

impl<B: Backend> SparseCache<B> {
    pub fn new(batch: usize, num_layers: usize) -> Self {
        SparseCache {
            lens: vec![0; batch],
            layers: (0..num_layers).map(|_| LayerCache::new(batch)).collect(),
        }
    }

    /// Refuses a call whose batch is not the one this cache was made for.
    pub(super) fn check_batch(&self, sequences: usize) -> Result<()> {
        if sequences != self.lens.len() {
            return Err(ModelError::InvalidInput(format!(
                "{sequences} sequences given to a cache made for {}",
                self.lens.len()
            )));
        }
        Ok(())
    }

    /// Counts `tokens[s]` as consumed by sequence `s`.
    pub(super) fn advance(&mut self, tokens: &[Vec<u32>]) {
        for (len, t) in self.lens.iter_mut().zip(tokens) {
            *len += t.len();
        }
    }

    /// Empties sequence `s`'s caches, so that its slot can take a new sequence (a server's
    /// finished request making room for the next) while the others keep theirs. Its rows are
    /// zeroed: backends other than the CPU add new entries into zero rows.
    pub fn reset_sequence(&mut self, s: usize) -> Result<()> {
        self.check_slot(s)?;
        self.lens[s] = 0;
        for layer in &mut self.layers {
            layer.reset_sequence(s);
        }
        Ok(())
    }

    /// Refuses a slot this cache does not have.
    fn check_slot(&self, s: usize) -> Result<()> {
        if s >= self.lens.len() {
            return Err(ModelError::InvalidInput(format!(
                "sequence {s} of a cache made for {}",
                self.lens.len()
            )));
        }
        Ok(())
    }

    /// Positions sequence `s` has consumed (its next token's position).
    pub fn seq_len(&self, s: usize) -> usize {
        self.lens[s]
    }

    /// Stored key/value entries (tokens × layers), over all sequences.
    pub fn entries(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| &l.positions)
            .map(Vec::len)
            .sum()
    }

    /// Bytes per stored value: 4 in f32, 2 in f16/bf16 ([`cache_dtype`]; 4 while empty).
    pub fn value_bytes(&self) -> usize {
        self.layers
            .iter()
            .find_map(|l| l.kv.as_ref().map(|(k, _)| k.dtype().size()))
            .unwrap_or(4)
    }

    /// Bytes of the stored keys and values.
    pub fn bytes(&self, kv_heads: usize, head_dim: usize) -> usize {
        self.entries() * 2 * kv_heads * head_dim * self.value_bytes()
    }

    /// Bytes of the buffers holding them, padding included.
    pub fn allocated_bytes(&self, kv_heads: usize, head_dim: usize) -> usize {
        let rows: usize = self
            .layers
            .iter()
            .map(|l| l.capacity * l.positions.len())
            .sum();
        rows * 2 * kv_heads * head_dim * self.value_bytes()
    }

    /// Bytes a dense cache of the same type would hold for the same positions: every token at
    /// every layer.
    pub fn dense_bytes(&self, kv_heads: usize, head_dim: usize) -> usize {
        self.lens.iter().sum::<usize>()
            * self.layers.len()
            * 2
            * kv_heads
            * head_dim
            * self.value_bytes()
    }
}
