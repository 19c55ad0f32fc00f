//! The sparse engine: SkipGPT inference that does not compute what the routers skip.
//!
//! The gated forward ([`LlamaForCausalLM::forward_routed`]) computes every module for every
//! token and multiplies skipped outputs by zero, as the reference code does. Here every layer
//! instead asks its routers which tokens execute, gathers those rows, runs the module on them
//! only and adds the result back into the residual stream:
//!
//! - **attention, `kv_policy = keep`**: every token's keys and values are projected (the others
//!   attend to them), but only executing tokens get a query, an attention row and the output
//!   projection;
//! - **attention, `kv_policy = drop`**: a skipping token is not projected at all and leaves no
//!   entry in that layer's cache, which holds only the tokens that executed there;
//! - **MLP**: only executing tokens go through gate/up/down.
//!
//! Tokens are handled as a flat list of rows (sequence, position), so a batch may mix sequences
//! of different lengths, and each sequence keeps its own per-layer cache. [`EngineStats`] counts
//! the floating-point work done and the weight bytes read, next to what the dense model would
//! have needed.

use burn::tensor::{backend::Backend, Bool, DType, IndexingUpdateOp, Int, Tensor, TensorData};

use crate::config::LlamaConfig;
use crate::cpu_attention::QueryRow;
use crate::error::{ModelError, Result};
use crate::generate::GenerateOptions;
use crate::llama::{grouped_query_attention, Decider, KeyMask, LlamaForCausalLM};
use crate::lora::LoraLinear;
use crate::router::{gate_from_logits, KvPolicy, Router, Routing};

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
/// backend ([`crate::cpu_fast::write_rows`]); elsewhere it is added into its zero row, the one
/// indexed update every backend implements.
///
/// The buffers hold f32, or f16/bf16 where the model's matrices are held so
/// ([`cache_dtype`]).
#[derive(Debug, Clone)]
struct LayerCache<B: Backend> {
    /// `[batch * kv_heads * capacity, head_dim]` each, rotated keys and values.
    kv: Option<(Tensor<B, 2>, Tensor<B, 2>)>,
    /// Rows reserved per sequence and head.
    capacity: usize,
    /// Per sequence: the position of each stored token, in storage order.
    positions: Vec<Vec<usize>>,
}

impl<B: Backend> LayerCache<B> {
    fn new(batch: usize) -> Self {
        LayerCache {
            kv: None,
            capacity: 0,
            positions: vec![Vec::new(); batch],
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
    fn append(
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
            write_rows(ck, &slots, k.reshape([m * heads, hd])),
            write_rows(cv, &slots, v.reshape([m * heads, hd])),
        ));
    }
}

/// `cache` with `rows` written into its rows `slots` (zero until then).
fn write_rows<B: Backend>(
    cache: Tensor<B, 2>,
    slots: &[usize],
    rows: Tensor<B, 2>,
) -> Tensor<B, 2> {
    match crate::cpu_fast::write_rows(cache, slots, &rows) {
        Ok(cache) => cache,
        Err(cache) => {
            let device = cache.device();
            let rows = rows.cast(cache.dtype());
            cache.select_assign(
                0,
                index_tensor::<B>(slots, &device),
                rows,
                IndexingUpdateOp::Add,
            )
        }
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
    lens: Vec<usize>,
    layers: Vec<LayerCache<B>>,
}

impl<B: Backend> SparseCache<B> {
    pub fn new(batch: usize, num_layers: usize) -> Self {
        SparseCache {
            lens: vec![0; batch],
            layers: (0..num_layers).map(|_| LayerCache::new(batch)).collect(),
        }
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

/// Which rows get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitRows {
    /// Every new token (scoring, `logits`).
    All,
    /// The last new token of each sequence (generation).
    Last,
}

/// Work done by the engine, next to what the dense model would have done for the same tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EngineStats {
    /// Token positions processed.
    pub tokens: usize,
    /// (token, layer) attention executions, and how many there were in all.
    pub attn_executed: usize,
    pub attn_total: usize,
    pub mlp_executed: usize,
    pub mlp_total: usize,
    /// Floating-point operations (2 per multiply-add) of the decoder and head.
    pub flops: f64,
    pub dense_flops: f64,
    /// Weight bytes read: a module's weights are read once per forward call if any token uses
    /// them (4 bytes per parameter, 2 for half-precision weights).
    pub weight_bytes: f64,
    pub dense_weight_bytes: f64,
}

impl EngineStats {
    /// Dense cost / routed cost in FLOPs: the speedup perfect skipping would give.
    pub fn ideal_speedup(&self) -> f64 {
        self.dense_flops / self.flops.max(1.0)
    }

    /// Dense weight bytes / weight bytes read: the speedup perfect skipping would give where
    /// reading the weights, not arithmetic, bounds the time (decoding a batch on most hardware).
    /// A module's weights are saved only when no token of the call executes it.
    pub fn weight_ideal_speedup(&self) -> f64 {
        self.dense_weight_bytes / self.weight_bytes.max(1.0)
    }

    pub fn attn_skip(&self) -> f64 {
        1.0 - self.attn_executed as f64 / self.attn_total.max(1) as f64
    }

    pub fn mlp_skip(&self) -> f64 {
        1.0 - self.mlp_executed as f64 / self.mlp_total.max(1) as f64
    }

    pub fn add(&mut self, o: &EngineStats) {
        self.tokens += o.tokens;
        self.attn_executed += o.attn_executed;
        self.attn_total += o.attn_total;
        self.mlp_executed += o.mlp_executed;
        self.mlp_total += o.mlp_total;
        self.flops += o.flops;
        self.dense_flops += o.dense_flops;
        self.weight_bytes += o.weight_bytes;
        self.dense_weight_bytes += o.dense_weight_bytes;
    }
}

/// What one engine call returns.
pub struct SparseOutput<B: Backend> {
    /// `[rows, vocab]`, rows as [`LogitRows`] asked: all new tokens in sequence order, or the
    /// last of each sequence that had new tokens.
    pub logits: Tensor<B, 2>,
    /// Per layer, per new token (sequence order): did attention / the MLP execute.
    pub attn_gates: Vec<Vec<bool>>,
    pub mlp_gates: Vec<Vec<bool>>,
    pub stats: EngineStats,
}

/// Runs `tokens[s]` (new tokens of sequence `s`, possibly none) through the model, skipping
/// what the routers skip, and appends them to `cache`.
///
/// `routing` is the model's routing mode: [`Routing::Dense`] executes everything (the dense
/// baseline, through the same code), `Deterministic` and `Sample` route. Gumbel training gates
/// are not an inference mode.
///
/// On the CPU backend a call of more than [`crate::cpu_fast::MAX_ROWS`] rows (a long prompt,
/// a batch of prompts) runs as consecutive pieces of at most that many rows, in the order of
/// the rows, each one attending to the cache the pieces before it filled (as llama.cpp splits
/// a prompt into micro-batches): the products keep to the kernels that read every weight once
/// ([`crate::cpu_fast`]), and the call's buffers stay those of one piece.
pub fn sparse_forward<B: Backend>(
    model: &LlamaForCausalLM<B>,
    tokens: &[Vec<u32>],
    cache: &mut SparseCache<B>,
    routing: Routing,
    logit_rows: LogitRows,
) -> Result<SparseOutput<B>> {
    let rows = tokens.iter().map(Vec::len).sum();
    let piece = crate::cpu_fast::MAX_ROWS;
    if crate::cpu_fast::runs_engine_kernels::<B>() && rows > piece {
        return forward_in_pieces(model, tokens, cache, routing, logit_rows, piece);
    }
    crate::cpu_fast::in_pool::<B, _>(rows, || {
        sparse_forward_here(model, tokens, cache, routing, logit_rows)
    })
}

/// [`sparse_forward`] as consecutive pieces of at most `piece` rows (sequence-major, as the
/// call's rows are ordered), their outputs joined: the same rows, gates and statistics, and
/// for [`LogitRows::Last`] the row of each sequence's last token, from the piece that holds it.
fn forward_in_pieces<B: Backend>(
    model: &LlamaForCausalLM<B>,
    tokens: &[Vec<u32>],
    cache: &mut SparseCache<B>,
    routing: Routing,
    logit_rows: LogitRows,
    piece: usize,
) -> Result<SparseOutput<B>> {
    if tokens.len() != cache.lens.len() {
        return Err(ModelError::InvalidInput(format!(
            "{} sequences given to a cache made for {}",
            tokens.len(),
            cache.lens.len()
        )));
    }
    // each sequence's length once all its tokens are in
    let ends: Vec<usize> = tokens
        .iter()
        .zip(&cache.lens)
        .map(|(t, len)| len + t.len())
        .collect();
    let mut pieces: Vec<Vec<Vec<u32>>> = Vec::new();
    let mut current = vec![Vec::new(); tokens.len()];
    let mut count = 0;
    for (s, t) in tokens.iter().enumerate() {
        for &id in t {
            current[s].push(id);
            count += 1;
            if count == piece {
                pieces.push(std::mem::replace(
                    &mut current,
                    vec![Vec::new(); tokens.len()],
                ));
                count = 0;
            }
        }
    }
    if count > 0 {
        pieces.push(current);
    }
    let (mut logits, mut attn_gates, mut mlp_gates) = (Vec::new(), Vec::new(), Vec::new());
    let mut stats = EngineStats::default();
    for part in &pieces {
        let rows = part.iter().map(Vec::len).sum();
        let out = crate::cpu_fast::in_pool::<B, _>(rows, || {
            sparse_forward_here(model, part, cache, routing, logit_rows)
        })?;
        let out_logits = match logit_rows {
            LogitRows::All => Some(out.logits),
            LogitRows::Last => {
                // one row per sequence present, in sequence order: keep those whose last
                // token this piece held
                let ended: Vec<usize> = (0..part.len())
                    .filter(|&s| !part[s].is_empty())
                    .enumerate()
                    .filter(|&(_, s)| cache.lens[s] == ends[s])
                    .map(|(row, _)| row)
                    .collect();
                (!ended.is_empty()).then(|| gather_rows(out.logits, &ended))
            }
        };
        logits.extend(out_logits);
        if attn_gates.is_empty() {
            (attn_gates, mlp_gates) = (out.attn_gates, out.mlp_gates);
        } else {
            for (all, more) in attn_gates.iter_mut().zip(out.attn_gates) {
                all.extend(more);
            }
            for (all, more) in mlp_gates.iter_mut().zip(out.mlp_gates) {
                all.extend(more);
            }
        }
        stats.add(&out.stats);
    }
    Ok(SparseOutput {
        logits: Tensor::cat(logits, 0),
        attn_gates,
        mlp_gates,
        stats,
    })
}

fn sparse_forward_here<B: Backend>(
    model: &LlamaForCausalLM<B>,
    tokens: &[Vec<u32>],
    cache: &mut SparseCache<B>,
    routing: Routing,
    logit_rows: LogitRows,
) -> Result<SparseOutput<B>> {
    let cfg = &model.config;
    let device = model.device();
    if tokens.len() != cache.lens.len() {
        return Err(ModelError::InvalidInput(format!(
            "{} sequences given to a cache made for {}",
            tokens.len(),
            cache.lens.len()
        )));
    }
    if matches!(routing, Routing::Gumbel { .. }) {
        return Err(ModelError::InvalidInput(
            "the sparse engine serves deterministic or sampled routing, not Gumbel training gates"
                .into(),
        ));
    }
    // the rows of this call: (sequence, position), sequence-major
    let rows: Vec<(usize, usize)> = tokens
        .iter()
        .enumerate()
        .flat_map(|(s, t)| (0..t.len()).map(move |i| (s, i)))
        .map(|(s, i)| (s, cache.lens[s] + i))
        .collect();
    let n = rows.len();
    if n == 0 {
        return Err(ModelError::InvalidInput("no tokens to process".into()));
    }
    let ids: Vec<i64> = tokens.iter().flatten().map(|&t| t as i64).collect();
    crate::generate::validate_ids(&ids, cfg.vocab_size, "input")?;
    let (h, nh, nkv, hd) = (
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    );
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, n]), &device);
    let mut x: Tensor<B, 2> =
        crate::precision::embed(&model.model.embed_tokens, ids).reshape([n, h]);
    let positions: Vec<usize> = rows.iter().map(|r| r.1).collect();
    let (cos, sin) = model.rope.cos_sin_at::<B>(&positions, &device);
    // the tables repeated to [n, heads * hd] for the queries and the keys, made when first
    // needed (the CPU backend rotates from the [n, hd] tables directly)
    let tables = |heads| {
        (
            crate::rope::repeat_for_heads(&cos, heads),
            crate::rope::repeat_for_heads(&sin, heads),
        )
    };
    let (q_tables, kv_tables) = (std::cell::OnceCell::new(), std::cell::OnceCell::new());
    let cpu_kernels = crate::cpu_fast::runs_engine_kernels::<B>();
    let layer_routing = model.layer_routing(routing);
    let kv_policy = layer_routing.kv_policy;
    let window = cfg.sliding_window.unwrap_or(usize::MAX);
    // bytes per weight as held (f32, or f16/bf16 with `--dtype`), and the cache's type
    let weight_dtype = model.model.embed_tokens.weight.val().dtype();
    let weight_size = weight_dtype.size() as f64;
    let kv_dtype = cache_dtype(weight_dtype);
    let cost = Costs::new(cfg, weight_size);
    // the dense model: every token attends to every earlier position (within the window)
    let dense_attn_flops: f64 = positions
        .iter()
        .map(|&p| (p + 1).min(window) as f64 * cost.attn_per_key)
        .sum();
    let mut stats = EngineStats {
        tokens: n,
        ..Default::default()
    };
    let (mut attn_gates, mut mlp_gates) = (Vec::new(), Vec::new());

    for (l, layer) in model.model.layers.iter().enumerate() {
        // ---- attention
        let attn_exec = match layer.attn_decider(&layer_routing) {
            Decider::Router(r) => decide(r, x.clone(), routing),
            Decider::Everyone | Decider::SameAsAttention => vec![true; n],
        };
        let exec: Vec<usize> = (0..n).filter(|&i| attn_exec[i]).collect();
        let block_input = x.clone();
        // rows whose keys and values this layer stores
        let kv_rows: Vec<usize> = match kv_policy {
            KvPolicy::Keep => (0..n).collect(),
            KvPolicy::Drop => exec.clone(),
        };
        stats.attn_total += n;
        stats.attn_executed += exec.len();
        stats.flops += (kv_rows.len() as f64) * cost.kv_proj + (exec.len() as f64) * cost.q_o_proj;
        stats.dense_flops += n as f64 * (cost.kv_proj + cost.q_o_proj) + dense_attn_flops;
        stats.dense_weight_bytes += cost.attn_bytes;
        if !kv_rows.is_empty() {
            stats.weight_bytes += cost.kv_bytes;
        }
        if !exec.is_empty() {
            stats.weight_bytes += cost.attn_bytes - cost.kv_bytes;
        }
        if !kv_rows.is_empty() {
            let attn = &layer.self_attn;
            let xn = layer
                .input_layernorm
                .forward(gather_rows(x.clone(), &kv_rows));
            // [rows, heads, hd], each row rotated at its own position
            let rot =
                |t: Tensor<B, 3>,
                 which: &[usize],
                 repeated: &std::cell::OnceCell<(Tensor<B, 2>, Tensor<B, 2>)>| {
                    if cpu_kernels {
                        let (c, s) = (
                            gather_rows(cos.clone(), which),
                            gather_rows(sin.clone(), which),
                        );
                        if let Some(rotated) = crate::cpu_fast::rotate(&t, &c, &s) {
                            return rotated;
                        }
                    }
                    let tables = repeated.get_or_init(|| tables(t.dims()[1]));
                    crate::rope::apply_rotary_rows(
                        t,
                        gather_rows(tables.0.clone(), which),
                        gather_rows(tables.1.clone(), which),
                    )
                };
            let m = kv_rows.len();
            // queries: executing rows, located inside kv_rows; when they are all of them (a
            // dense step, `drop`), q, k and v are projected together
            let q_local: Vec<usize> = match kv_policy {
                KvPolicy::Keep => exec.clone(),
                KvPolicy::Drop => (0..exec.len()).collect(),
            };
            let (q, k, v) = if exec.len() == m {
                let [q, k, v]: [Tensor<B, 2>; 3] =
                    LoraLinear::forward_many(&[&attn.q_proj, &attn.k_proj, &attn.v_proj], xn)
                        .try_into()
                        .expect("three projections");
                (Some(q), k, v)
            } else {
                let [k, v]: [Tensor<B, 2>; 2] =
                    LoraLinear::forward_many(&[&attn.k_proj, &attn.v_proj], xn.clone())
                        .try_into()
                        .expect("two projections");
                let q = (!exec.is_empty()).then(|| attn.q_proj.forward(gather_rows(xn, &q_local)));
                (q, k, v)
            };
            let k = rot(k.reshape([m, nkv, hd]), &kv_rows, &kv_tables);
            let v = v.reshape([m, nkv, hd]);
            let q = q.map(|q| rot(q.reshape([exec.len(), nh, hd]), &exec, &q_tables));
            // store the new keys/values, then attend for the executing queries of every
            // sequence at once
            let store = &mut cache.layers[l];
            let kv_seqs: Vec<usize> = kv_rows.iter().map(|&r| rows[r].0).collect();
            let kv_pos: Vec<usize> = kv_rows.iter().map(|&r| rows[r].1).collect();
            store.append(k, v, &kv_seqs, &kv_pos, kv_dtype, &device);
            if let Some(q) = q {
                let queries: Vec<(usize, usize)> = exec.iter().map(|&r| rows[r]).collect();
                let (out, visible) = attend_batched(q, store, &queries, cfg);
                stats.flops += visible as f64 * cost.attn_per_key;
                x = add_rows(x, &exec, attn.o_proj.forward(out));
            }
        }

        // ---- MLP
        let mlp_exec = match layer.mlp_decider(&layer_routing) {
            Decider::Router(r) => decide(
                r,
                layer_routing.mlp_router_reads(x.clone(), block_input),
                routing,
            ),
            Decider::SameAsAttention => attn_exec.clone(),
            Decider::Everyone => vec![true; n],
        };
        let mlp_rows: Vec<usize> = (0..n).filter(|&i| mlp_exec[i]).collect();
        stats.mlp_total += n;
        stats.mlp_executed += mlp_rows.len();
        stats.flops += mlp_rows.len() as f64 * cost.mlp;
        stats.dense_flops += n as f64 * cost.mlp;
        stats.dense_weight_bytes += cost.mlp_bytes;
        if !mlp_rows.is_empty() {
            stats.weight_bytes += cost.mlp_bytes;
            let hsel = layer
                .post_attention_layernorm
                .forward(gather_rows(x.clone(), &mlp_rows));
            x = add_rows(x, &mlp_rows, layer.mlp.forward(hsel));
        }
        if layer_routing.is_routed() {
            let routers =
                usize::from(layer.attn_router.is_some()) + usize::from(layer.mlp_router.is_some());
            stats.flops += (n * routers) as f64 * cost.router;
        }
        attn_gates.push(attn_exec);
        mlp_gates.push(mlp_exec);
    }

    let out_rows: Vec<usize> = match logit_rows {
        LogitRows::All => (0..n).collect(),
        LogitRows::Last => (0..n)
            .filter(|&i| i + 1 == n || rows[i + 1].0 != rows[i].0)
            .collect(),
    };
    stats.flops += out_rows.len() as f64 * cost.head;
    stats.dense_flops += out_rows.len() as f64 * cost.head;
    stats.weight_bytes += cost.head_bytes;
    stats.dense_weight_bytes += cost.head_bytes;
    let x = if out_rows.len() == n {
        x
    } else {
        x.select(0, index_tensor::<B>(&out_rows, &device))
    };
    let logits = model.head(model.model.norm.forward(x).unsqueeze::<3>());
    let [_, r, v] = logits.dims();
    let logits = logits.reshape([r, v]);
    for (s, t) in tokens.iter().enumerate() {
        cache.lens[s] += t.len();
    }
    Ok(SparseOutput {
        logits,
        attn_gates,
        mlp_gates,
        stats,
    })
}

/// Continues each prompt (lengths may differ) by up to `opts.max_new_tokens` tokens with the
/// sparse engine and its per-sequence caches. Returns the new tokens (a sequence that stopped
/// at EOS includes it), the work done, and the cache (for its size).
pub fn generate_sparse<B: Backend>(
    model: &LlamaForCausalLM<B>,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    routing: Routing,
) -> Result<(Vec<Vec<u32>>, EngineStats, SparseCache<B>)> {
    generate_sparse_with(model, prompts, opts, routing, |_, _| {})
}

/// [`generate_sparse`], calling `on_token(sequence, token)` as each token is chosen (to stream
/// text as it comes). A request past the model's context is refused
/// ([`crate::generate::check_context`]).
pub fn generate_sparse_with<B: Backend>(
    model: &LlamaForCausalLM<B>,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    routing: Routing,
    mut on_token: impl FnMut(usize, u32),
) -> Result<(Vec<Vec<u32>>, EngineStats, SparseCache<B>)> {
    let mut cache = SparseCache::new(prompts.len(), model.config.num_hidden_layers);
    let mut stats = EngineStats::default();
    let out = crate::generate::decode_loop(
        &model.config,
        prompts,
        opts,
        |inputs| {
            let step = sparse_forward(model, inputs, &mut cache, routing, LogitRows::Last)?;
            stats.add(&step.stats);
            // rows come in sequence order, one per sequence that had input
            Ok(step
                .logits
                .into_data()
                .convert::<f32>()
                .into_vec()
                .expect("f32 after convert"))
        },
        &mut on_token,
    )?;
    Ok((out, stats, cache))
}

/// The routers' decisions for every row: execute or not.
fn decide<B: Backend>(router: &Router<B>, x: Tensor<B, 2>, routing: Routing) -> Vec<bool> {
    let [n, h] = x.dims();
    let logits = router.logits(x.reshape([1, n, h]));
    if routing == Routing::Deterministic {
        // execute iff logit 0 > logit 1, compared here (the decisions come here anyway)
        let logits: Vec<f32> = logits
            .into_data()
            .convert::<f32>()
            .into_vec()
            .expect("f32 logits");
        return logits.chunks(2).map(|l| l[0] > l[1]).collect();
    }
    let gates = gate_from_logits(logits, routing, None);
    gates
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("f32 gates")
        .into_iter()
        .map(|g| g > 0.5)
        .collect()
}

/// Rows `which` (sorted, distinct) of `t`; no copy when that is all of them.
fn gather_rows<B: Backend>(t: Tensor<B, 2>, which: &[usize]) -> Tensor<B, 2> {
    if which.len() == t.dims()[0] {
        t
    } else {
        let device = t.device();
        t.select(0, index_tensor::<B>(which, &device))
    }
}

/// `x` with `update`'s rows added to its rows `which` (sorted, distinct): the scatter back
/// into the residual stream.
fn add_rows<B: Backend>(x: Tensor<B, 2>, which: &[usize], update: Tensor<B, 2>) -> Tensor<B, 2> {
    if which.len() == x.dims()[0] {
        x + update
    } else {
        let device = x.device();
        x.select_assign(
            0,
            index_tensor::<B>(which, &device),
            update,
            IndexingUpdateOp::Add,
        )
    }
}

fn index_tensor<B: Backend>(idx: &[usize], device: &B::Device) -> Tensor<B, 1, Int> {
    let v: Vec<i64> = idx.iter().map(|&i| i as i64).collect();
    Tensor::from_data(TensorData::new(v, [idx.len()]), device)
}

/// Grouped-query attention of every sequence's executing queries over that sequence's
/// stored keys, as one batched computation over the sequences that have queries.
///
/// Queries are padded to the largest count per sequence and keys to the longest stored
/// sequence; a mask hides padding, later positions and keys outside the sliding window.
/// Returns the attention output rows in the order of `queries`, and the number of visible
/// (query, key) pairs (the work a dense kernel without padding would do).
///
/// # Shapes
/// - q: `[e, heads, hd]`, one row per entry of `queries` = (sequence, position), sorted by
///   sequence
/// - output: `[e, heads * hd]`
fn attend_batched<B: Backend>(
    q: Tensor<B, 3>,
    store: &LayerCache<B>,
    queries: &[(usize, usize)],
    config: &LlamaConfig,
) -> (Tensor<B, 2>, usize) {
    let (nh, nkv, hd) = (
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
    );
    let device = q.device();
    let batch = store.positions.len();
    let (ck, cv) = store
        .kv
        .as_ref()
        .expect("queries store their own keys first");
    // the CPU backend: every query row over the stretch of slots it sees, no mask
    if crate::cpu_fast::runs_engine_kernels::<B>() {
        let ranges: Vec<QueryRow> = queries
            .iter()
            .map(|&(s, p)| QueryRow {
                seq: s,
                keys: visible_slots(config, &store.positions[s], p),
            })
            .collect();
        if let Some(out) = crate::cpu_fast::attend(&q, ck, cv, nkv, store.capacity, &ranges) {
            let visible = ranges.iter().map(|r| r.keys.len()).sum();
            return (out, visible);
        }
    }
    // the sequences with queries, and where each one's queries start in `q`
    let mut seqs: Vec<(usize, usize, usize)> = Vec::new(); // (sequence, first, count)
    for (j, &(s, _)) in queries.iter().enumerate() {
        match seqs.last_mut() {
            Some(last) if last.0 == s => last.2 += 1,
            _ => seqs.push((s, j, 1)),
        }
    }
    let n_seq = seqs.len();
    let q_max = seqs.iter().map(|t| t.2).max().unwrap_or(0);
    // every reserved slot: the buffers are read whole, in place, and the mask hides the
    // slots a sequence has not filled
    let k_max = store.capacity;

    // [n_seq, q_max, k_max], true where a query may not look. Every query sees at least its
    // own key; a padded query row repeats the sequence's last query (as `q` does below) and
    // is dropped after.
    let mut hidden = vec![true; n_seq * q_max * k_max];
    let mut visible = 0;
    for (i, &(s, first, count)) in seqs.iter().enumerate() {
        for (a, &(_, p)) in queries[first..first + count].iter().enumerate() {
            let row = &mut hidden[(i * q_max + a) * k_max..][..k_max];
            for (slot, &kp) in store.positions[s].iter().enumerate() {
                if config.sees(p, kp) {
                    row[slot] = false;
                    visible += 1;
                }
            }
        }
        let last = (i * q_max + count - 1) * k_max;
        for a in count..q_max {
            hidden.copy_within(last..last + k_max, (i * q_max + a) * k_max);
        }
    }
    let n_rep = nh / nkv;
    // no mask at all when every query sees every slot (the cache exactly full)
    let mask = hidden.contains(&true).then(|| {
        // one row per stacked (head, query) row, shared by all key/value heads: the backend's
        // attention broadcasts it instead of a copy per head
        let rows: Vec<bool> = hidden
            .chunks(q_max * k_max)
            .flat_map(|seq| std::iter::repeat_n(seq, n_rep).flatten().copied())
            .collect();
        KeyMask::Hidden(Tensor::<B, 4, Bool>::from_data(
            TensorData::new(rows, [n_seq, 1, n_rep * q_max, k_max]),
            &device,
        ))
    });

    // queries [n_seq, kv_heads, n_rep * q_max, hd]: heads sharing a key/value head are
    // stacked along the query axis, as in the dense path
    let padded = seqs.iter().any(|t| t.2 != q_max);
    let q = if padded {
        let idx: Vec<usize> = seqs
            .iter()
            .flat_map(|&(_, first, count)| (0..q_max).map(move |a| first + a.min(count - 1)))
            .collect();
        q.select(0, index_tensor::<B>(&idx, &device))
    } else {
        q
    };
    let q =
        q.reshape([n_seq, q_max, nh, hd])
            .swap_dims(1, 2)
            .reshape([n_seq, nkv, n_rep * q_max, hd]);

    // keys and values [n_seq, kv_heads, k_max, hd] of those sequences
    let all_seqs = n_seq == batch;
    let seq_idx = index_tensor::<B>(&seqs.iter().map(|t| t.0).collect::<Vec<_>>(), &device);
    // (a half-precision cache widened to the queries' f32: the backends' attention takes one
    // type)
    let take = |t: &Tensor<B, 2>| {
        let t = t.clone().reshape([batch, nkv, k_max, hd]);
        let t = if all_seqs {
            t
        } else {
            t.select(0, seq_idx.clone())
        };
        if t.dtype() == q.dtype() {
            t
        } else {
            t.cast(q.dtype())
        }
    };
    let (k, v) = (take(ck), take(cv));

    // the gated path's kernel (no mask when every query sees every slot: the GPU backends'
    // flash kernel needs none)
    let out = grouped_query_attention(q, k, v, mask, nh).reshape([n_seq * q_max, nh * hd]);
    let out = if padded {
        let keep: Vec<usize> = seqs
            .iter()
            .enumerate()
            .flat_map(|(i, &(_, _, count))| (0..count).map(move |a| i * q_max + a))
            .collect();
        out.select(0, index_tensor::<B>(&keep, &device))
    } else {
        out
    };
    (out, visible)
}

/// The cache slots a query at position `p` sees: those of earlier (or its own) positions
/// within the sliding window. A sequence's slots hold increasing positions, so they are one
/// contiguous stretch.
fn visible_slots(config: &LlamaConfig, positions: &[usize], p: usize) -> std::ops::Range<usize> {
    debug_assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "slots out of order"
    );
    let end = positions.partition_point(|&kp| kp <= p);
    let start = match config.sliding_window {
        Some(w) => positions.partition_point(|&kp| kp + w <= p),
        None => 0,
    };
    start..end
}

/// FLOPs and bytes of the pieces of one layer, per token.
struct Costs {
    kv_proj: f64,
    q_o_proj: f64,
    /// Per (query, visible key): scores and weighted values over all heads.
    attn_per_key: f64,
    mlp: f64,
    router: f64,
    head: f64,
    kv_bytes: f64,
    attn_bytes: f64,
    mlp_bytes: f64,
    head_bytes: f64,
}

impl Costs {
    fn new(c: &crate::config::LlamaConfig, weight_size: f64) -> Self {
        let h = c.hidden_size as f64;
        let q = (c.num_attention_heads * c.head_dim) as f64;
        let kv = (c.num_key_value_heads * c.head_dim) as f64;
        let i = c.intermediate_size as f64;
        let v = c.vocab_size as f64;
        let kv_bias = if c.qkv_bias { 2.0 * kv } else { 0.0 };
        Costs {
            kv_proj: 2.0 * 2.0 * h * kv,
            q_o_proj: 2.0 * 2.0 * h * q,
            attn_per_key: 2.0 * 2.0 * q,
            mlp: 2.0 * 3.0 * h * i,
            router: 2.0 * 2.0 * h,
            head: 2.0 * h * v,
            kv_bytes: weight_size * (2.0 * h * kv + kv_bias),
            attn_bytes: weight_size * c.attention_params() as f64,
            mlp_bytes: weight_size * c.mlp_params() as f64,
            head_bytes: weight_size * h * v,
        }
    }
}
