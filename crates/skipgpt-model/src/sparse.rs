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

use burn::tensor::{activation, backend::Backend, IndexingUpdateOp, Int, Tensor, TensorData};

use crate::error::{ModelError, Result};
use crate::generate::{pick, GenerateOptions, Sampling};
use crate::llama::{LlamaForCausalLM, MASKED};
use crate::router::{gate_from_logits, KvPolicy, MlpRouterInput, Router, Routing};

/// One layer's cache of one sequence: rotated keys and values of the tokens stored there.
#[derive(Debug, Clone)]
struct LayerStore<B: Backend> {
    /// `[kv_heads, stored, head_dim]` each.
    kv: Option<(Tensor<B, 3>, Tensor<B, 3>)>,
    /// Position of each stored token.
    positions: Vec<usize>,
}

/// Per-sequence, per-layer key/value caches of the sparse engine.
#[derive(Debug, Clone)]
pub struct SparseCache<B: Backend> {
    /// Positions consumed by each sequence.
    lens: Vec<usize>,
    /// `[sequence][layer]`
    layers: Vec<Vec<LayerStore<B>>>,
}

impl<B: Backend> SparseCache<B> {
    pub fn new(batch: usize, num_layers: usize) -> Self {
        SparseCache {
            lens: vec![0; batch],
            layers: (0..batch)
                .map(|_| {
                    (0..num_layers)
                        .map(|_| LayerStore {
                            kv: None,
                            positions: Vec::new(),
                        })
                        .collect()
                })
                .collect(),
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
            .flatten()
            .map(|l| l.positions.len())
            .sum()
    }

    /// Bytes of the stored keys and values, at 4 bytes per value.
    pub fn bytes(&self, kv_heads: usize, head_dim: usize) -> usize {
        self.entries() * 2 * kv_heads * head_dim * 4
    }

    /// Bytes a dense cache would hold for the same positions: every token at every layer.
    pub fn dense_bytes(&self, kv_heads: usize, head_dim: usize) -> usize {
        let layers = self.layers.first().map_or(0, Vec::len);
        self.lens.iter().sum::<usize>() * layers * 2 * kv_heads * head_dim * 4
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
    /// them (4 bytes per parameter).
    pub weight_bytes: f64,
    pub dense_weight_bytes: f64,
}

impl EngineStats {
    /// Dense cost / routed cost in FLOPs: the speedup perfect skipping would give.
    pub fn ideal_speedup(&self) -> f64 {
        self.dense_flops / self.flops.max(1.0)
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
pub fn sparse_forward<B: Backend>(
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
    let mut x: Tensor<B, 2> = model.model.embed_tokens.forward(ids).reshape([n, h]);
    let positions: Vec<usize> = rows.iter().map(|r| r.1).collect();
    let (cos, sin) = model.rope.cos_sin_at::<B>(&positions, &device);
    let (routed, kv_policy, mlp_input) = match &model.routing_config {
        Some(rc) if routing != Routing::Dense => (true, rc.kv_policy, rc.mlp_router_input),
        _ => (false, KvPolicy::Keep, MlpRouterInput::PostAttn),
    };
    let window = cfg.sliding_window.unwrap_or(usize::MAX);
    let cost = Costs::new(cfg);
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
        let attn_exec = match (&layer.attn_router, routed) {
            (Some(r), true) => decide(r, x.clone(), routing),
            _ => vec![true; n],
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
            let kv_idx = index_tensor::<B>(&kv_rows, &device);
            let xn = layer
                .input_layernorm
                .forward(x.clone().select(0, kv_idx.clone()));
            let rot = |t: Tensor<B, 3>, idx: Tensor<B, 1, Int>| {
                // [rows, heads, hd] -> rotate with each row's own position
                let [r, heads, d] = t.dims();
                let c = cos.clone().select(0, idx.clone());
                let s = sin.clone().select(0, idx);
                let t4 = t.swap_dims(0, 1).reshape([1, heads, r, d]);
                crate::rope::apply_rotary(t4, &c, &s)
                    .reshape([heads, r, d])
                    .swap_dims(0, 1)
            };
            let m = kv_rows.len();
            let k = rot(
                attn.k_proj.forward(xn.clone()).reshape([m, nkv, hd]),
                kv_idx.clone(),
            );
            let v = attn.v_proj.forward(xn.clone()).reshape([m, nkv, hd]);
            // queries: executing rows, located inside kv_rows
            let q_local: Vec<usize> = match kv_policy {
                KvPolicy::Keep => exec.clone(),
                KvPolicy::Drop => (0..exec.len()).collect(),
            };
            let q = if exec.is_empty() {
                None
            } else {
                let e = exec.len();
                let q_in = xn.select(0, index_tensor::<B>(&q_local, &device));
                Some(rot(
                    attn.q_proj.forward(q_in).reshape([e, nh, hd]),
                    index_tensor::<B>(&exec, &device),
                ))
            };
            // per sequence: store the new keys/values, attend for the executing queries
            let seq_kv_all = by_sequence(&kv_rows, &rows, tokens.len());
            let seq_q_all = by_sequence(&exec, &rows, tokens.len());
            let mut outs = Vec::new();
            for (s, (seq_kv, seq_q)) in seq_kv_all.into_iter().zip(seq_q_all).enumerate() {
                let store = &mut cache.layers[s][l];
                if !seq_kv.is_empty() {
                    let idx = index_tensor::<B>(&seq_kv, &device);
                    let k_new = k.clone().select(0, idx.clone()).swap_dims(0, 1);
                    let v_new = v.clone().select(0, idx).swap_dims(0, 1);
                    store.kv = Some(match store.kv.take() {
                        Some((pk, pv)) => (
                            Tensor::cat(vec![pk, k_new], 1),
                            Tensor::cat(vec![pv, v_new], 1),
                        ),
                        None => (k_new, v_new),
                    });
                    store
                        .positions
                        .extend(seq_kv.iter().map(|&j| rows[kv_rows[j]].1));
                }
                if seq_q.is_empty() {
                    continue;
                }
                let (sk, sv) = store
                    .kv
                    .clone()
                    .expect("an executing token stores its own key");
                let q_pos: Vec<usize> = seq_q.iter().map(|&j| rows[exec[j]].1).collect();
                let (mask, visible) = causal_mask(&q_pos, &store.positions, window);
                stats.flops += visible as f64 * cost.attn_per_key;
                let e = seq_q.len();
                let qs = q
                    .as_ref()
                    .expect("queries exist")
                    .clone()
                    .select(0, index_tensor::<B>(&seq_q, &device));
                outs.push(attend(qs, sk, sv, mask, nh, nkv, hd, e, &device));
            }
            if !outs.is_empty() {
                let out = attn.o_proj.forward(Tensor::cat(outs, 0));
                x = x.select_assign(
                    0,
                    index_tensor::<B>(&exec, &device),
                    out,
                    IndexingUpdateOp::Add,
                );
            }
        }

        // ---- MLP
        let mlp_exec = match (&layer.mlp_router, &layer.attn_router, routed) {
            (Some(r), _, true) => {
                let input = match mlp_input {
                    MlpRouterInput::PostAttn => x.clone(),
                    MlpRouterInput::BlockInput => block_input,
                };
                decide(r, input, routing)
            }
            // one router per layer gates both modules
            (None, Some(_), true) => attn_exec.clone(),
            _ => vec![true; n],
        };
        let mlp_rows: Vec<usize> = (0..n).filter(|&i| mlp_exec[i]).collect();
        stats.mlp_total += n;
        stats.mlp_executed += mlp_rows.len();
        stats.flops += mlp_rows.len() as f64 * cost.mlp;
        stats.dense_flops += n as f64 * cost.mlp;
        stats.dense_weight_bytes += cost.mlp_bytes;
        if !mlp_rows.is_empty() {
            stats.weight_bytes += cost.mlp_bytes;
            let idx = index_tensor::<B>(&mlp_rows, &device);
            let hsel = layer
                .post_attention_layernorm
                .forward(x.clone().select(0, idx.clone()));
            x = x.select_assign(0, idx, layer.mlp.forward(hsel), IndexingUpdateOp::Add);
        }
        if routed {
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
    use rand::SeedableRng;
    crate::generate::validate_sampling(&opts.sampling)?;
    if prompts.iter().any(Vec::is_empty) {
        return Err(ModelError::InvalidInput(
            "a prompt is empty: give at least one token".into(),
        ));
    }
    let b = prompts.len();
    let mut cache = SparseCache::new(b, model.config.num_hidden_layers);
    let mut rng = match opts.sampling {
        Sampling::Sample { seed, .. } => Some(rand::rngs::StdRng::seed_from_u64(seed)),
        Sampling::Greedy => None,
    };
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); b];
    let mut done = vec![false; b];
    let mut stats = EngineStats::default();
    let mut input: Vec<Vec<u32>> = prompts.to_vec();
    for _ in 0..opts.max_new_tokens {
        let step = sparse_forward(model, &input, &mut cache, routing, LogitRows::Last)?;
        stats.add(&step.stats);
        let v = model.config.vocab_size;
        let last: Vec<f32> = step
            .logits
            .into_data()
            .convert::<f32>()
            .into_vec()
            .expect("f32 after convert");
        // rows come in sequence order, one per sequence that had input
        let active: Vec<usize> = (0..b).filter(|&s| !input[s].is_empty()).collect();
        let mut next = vec![Vec::new(); b];
        for (row, &s) in last.chunks_exact(v).zip(&active) {
            let token = pick(row, &opts.sampling, rng.as_mut());
            out[s].push(token);
            if !opts.ignore_eos && opts.eos_token_ids.contains(&token) {
                done[s] = true;
            } else {
                next[s] = vec![token];
            }
        }
        if done.iter().all(|&d| d) {
            break;
        }
        input = next;
    }
    Ok((out, stats, cache))
}

/// The routers' decisions for every row: execute or not.
fn decide<B: Backend>(router: &Router<B>, x: Tensor<B, 2>, routing: Routing) -> Vec<bool> {
    let [n, h] = x.dims();
    let gates = gate_from_logits(router.logits(x.reshape([1, n, h])), routing, None);
    gates
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("f32 gates")
        .into_iter()
        .map(|g| g > 0.5)
        .collect()
}

/// Splits positions `j` into `subset` (sorted rows) by the sequence of row `subset[j]`.
fn by_sequence(subset: &[usize], rows: &[(usize, usize)], batch: usize) -> Vec<Vec<usize>> {
    let mut out = vec![Vec::new(); batch];
    for (j, &row) in subset.iter().enumerate() {
        out[rows[row].0].push(j);
    }
    out
}

fn index_tensor<B: Backend>(idx: &[usize], device: &B::Device) -> Tensor<B, 1, Int> {
    let v: Vec<i64> = idx.iter().map(|&i| i as i64).collect();
    Tensor::from_data(TensorData::new(v, [idx.len()]), device)
}

/// Additive mask `[queries, keys]` and the number of visible (query, key) pairs.
fn causal_mask(q_pos: &[usize], k_pos: &[usize], window: usize) -> (Vec<f32>, usize) {
    let mut mask = Vec::with_capacity(q_pos.len() * k_pos.len());
    let mut visible = 0;
    for &p in q_pos {
        for &k in k_pos {
            let ok = k <= p && p - k < window;
            visible += usize::from(ok);
            mask.push(if ok { 0.0 } else { MASKED });
        }
    }
    (mask, visible)
}

/// Grouped-query attention of one sequence's executing queries over its stored keys.
///
/// # Shapes
/// - q: `[e, heads, hd]`; k, v: `[kv_heads, m, hd]`; mask: `e * m` values
/// - output: `[e, heads * hd]`
#[allow(clippy::too_many_arguments)]
fn attend<B: Backend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    mask: Vec<f32>,
    nh: usize,
    nkv: usize,
    hd: usize,
    e: usize,
    device: &B::Device,
) -> Tensor<B, 2> {
    let m = k.dims()[1];
    let n_rep = nh / nkv;
    // heads sharing a key/value head are stacked along the query axis, as in the dense path
    let q = q.swap_dims(0, 1).reshape([nkv, n_rep * e, hd]);
    let mask = Tensor::<B, 2>::from_data(TensorData::new(mask, [e, m]), device)
        .repeat_dim(0, n_rep)
        .unsqueeze::<3>();
    let scores = q.matmul(k.swap_dims(1, 2)) * (hd as f64).powf(-0.5) + mask;
    activation::softmax(scores, 2)
        .matmul(v)
        .reshape([nh, e, hd])
        .swap_dims(0, 1)
        .reshape([e, nh * hd])
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
    fn new(c: &crate::config::LlamaConfig) -> Self {
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
            kv_bytes: 4.0 * (2.0 * h * kv + kv_bias),
            attn_bytes: 4.0 * c.attention_params() as f64,
            mlp_bytes: 4.0 * c.mlp_params() as f64,
            head_bytes: 4.0 * h * v,
        }
    }
}
