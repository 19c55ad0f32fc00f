//! The engine's attention step: keys and values for the rows the layer stores, queries and the
//! output projection only for the rows that execute, and attention of every sequence's queries
//! over its own cache.

use burn::tensor::{backend::Backend, Bool, Tensor, TensorData};
use skipgpt_kernels::attention::QueryRow;

use super::cache::LayerCache;
use super::forward::{Call, Heads};
use super::rows::{add_rows, gather_rows, index_tensor};
use super::stats::Ledger;
use crate::config::LlamaConfig;
use crate::llama::{grouped_query_attention, Attention, DecoderLayer, KeyMask};
use crate::lora::LoraLinear;
use crate::router::KvPolicy;

/// The attention step of one layer: stores the keys and values of the rows the cache keeps
/// (every row under `keep`, the executing ones under `drop`), and adds the attention output of
/// the executing rows (`exec[i]`) into the residual stream.
///
/// # Shapes
/// - x, output: `[rows, hidden]`
pub(super) fn attention_step<B: Backend>(
    layer: &DecoderLayer<B>,
    x: Tensor<B, 2>,
    exec: &[bool],
    call: &Call<'_, B>,
    store: &mut LayerCache<B>,
    ledger: &mut Ledger,
) -> Tensor<B, 2> {
    let n = exec.len();
    let executing: Vec<usize> = (0..n).filter(|&i| exec[i]).collect();
    // rows whose keys and values this layer stores, and where the executing ones sit in them
    let (kv_rows, q_local): (Vec<usize>, Vec<usize>) = match call.layer_routing.kv_policy {
        KvPolicy::Keep => ((0..n).collect(), executing.clone()),
        KvPolicy::Drop => (executing.clone(), (0..executing.len()).collect()),
    };
    ledger.attention(n, kv_rows.len(), executing.len());
    if kv_rows.is_empty() {
        return x;
    }
    let cfg = call.config;
    let (nh, nkv, hd) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    );
    let xn = layer
        .input_layernorm
        .forward(gather_rows(x.clone(), &kv_rows));
    let (q, k, v) = project(&layer.self_attn, xn, &q_local);
    let m = kv_rows.len();
    let k = call.rotate(k.reshape([m, nkv, hd]), &kv_rows, Heads::KeyValues);
    let seqs: Vec<usize> = kv_rows.iter().map(|&r| call.rows[r].0).collect();
    let positions: Vec<usize> = kv_rows.iter().map(|&r| call.rows[r].1).collect();
    store.append(
        k,
        v.reshape([m, nkv, hd]),
        &seqs,
        &positions,
        call.kv_dtype,
        &call.device,
    );
    let Some(q) = q else {
        return x;
    };
    let q = call.rotate(
        q.reshape([executing.len(), nh, hd]),
        &executing,
        Heads::Queries,
    );
    let queries: Vec<(usize, usize)> = executing.iter().map(|&r| call.rows[r]).collect();
    let (out, visible) = attend_batched(q, store, &queries, cfg);
    ledger.attended(visible);
    add_rows(x, &executing, layer.self_attn.o_proj.forward(out))
}

/// Queries for rows `q_local` of `xn` (none when that is no row), keys and values for all of
/// them; when every row has a query (a dense step) the three are projected together.
///
/// # Shapes
/// - xn: `[m, hidden]`
/// - output: q `[q_local.len(), heads * head_dim]`, k and v `[m, kv_heads * head_dim]`
#[allow(clippy::type_complexity)]
fn project<B: Backend>(
    attn: &Attention<B>,
    xn: Tensor<B, 2>,
    q_local: &[usize],
) -> (Option<Tensor<B, 2>>, Tensor<B, 2>, Tensor<B, 2>) {
    if q_local.len() == xn.dims()[0] {
        let [q, k, v]: [Tensor<B, 2>; 3] =
            LoraLinear::forward_many(&[&attn.q_proj, &attn.k_proj, &attn.v_proj], xn)
                .try_into()
                .expect("three projections");
        return (Some(q), k, v);
    }
    let [k, v]: [Tensor<B, 2>; 2] =
        LoraLinear::forward_many(&[&attn.k_proj, &attn.v_proj], xn.clone())
            .try_into()
            .expect("two projections");
    let q = (!q_local.is_empty()).then(|| attn.q_proj.forward(gather_rows(xn, q_local)));
    (q, k, v)
}

/// Grouped-query attention of every sequence's executing queries over that sequence's
/// stored keys, as one batched computation over the sequences that have queries.
///
/// On the CPU backend the kernels take every query row over the stretch of slots it sees.
/// Elsewhere queries are padded to the largest count per sequence and keys are the whole
/// reserved buffer; a mask hides padding, later positions and keys outside the sliding window.
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
    if let Some(done) = attend_with_kernels(&q, store, queries, config) {
        return done;
    }
    let (nh, nkv, hd) = (
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
    );
    let groups = QueryGroups::of(queries);
    let (mask, visible) = key_mask::<B>(store, queries, &groups, nh / nkv, config, &q.device());
    let q = groups
        .pad(q)
        .reshape([groups.seqs.len(), groups.q_max, nh, hd])
        .swap_dims(1, 2)
        .reshape([groups.seqs.len(), nkv, nh / nkv * groups.q_max, hd]);
    let (k, v) = cached_keys_values(store, &groups, nkv, hd, &q);
    // the gated path's kernel (no mask when every query sees every slot: the GPU backends'
    // flash kernel needs none)
    let out = grouped_query_attention(q, k, v, mask, nh)
        .reshape([groups.seqs.len() * groups.q_max, nh * hd]);
    (groups.unpad(out), visible)
}

/// [`attend_batched`] on the CPU backend's kernels: every query row over the stretch of slots
/// it sees, no mask; `None` on other backends.
fn attend_with_kernels<B: Backend>(
    q: &Tensor<B, 3>,
    store: &LayerCache<B>,
    queries: &[(usize, usize)],
    config: &LlamaConfig,
) -> Option<(Tensor<B, 2>, usize)> {
    if !crate::dispatch::engine_kernels::<B>() {
        return None;
    }
    let kv = store
        .kv
        .as_ref()
        .expect("queries store their own keys first");
    let ranges: Vec<QueryRow> = queries
        .iter()
        .map(|&(s, p)| QueryRow {
            seq: s,
            keys: visible_slots(config, &store.positions[s], p),
        })
        .collect();
    let nkv = config.num_key_value_heads;
    let out = crate::dispatch::attend(q, kv, (nkv, store.capacity), &ranges)?;
    Some((out, ranges.iter().map(|r| r.keys.len()).sum()))
}

/// The sequences that have queries, padded to the same number of query rows.
struct QueryGroups {
    /// (sequence, first query in `queries`, query count), by sequence.
    seqs: Vec<(usize, usize, usize)>,
    /// The largest query count.
    q_max: usize,
}

impl QueryGroups {
    fn of(queries: &[(usize, usize)]) -> Self {
        let mut seqs: Vec<(usize, usize, usize)> = Vec::new();
        for (j, &(s, _)) in queries.iter().enumerate() {
            match seqs.last_mut() {
                Some(last) if last.0 == s => last.2 += 1,
                _ => seqs.push((s, j, 1)),
            }
        }
        let q_max = seqs.iter().map(|t| t.2).max().unwrap_or(0);
        QueryGroups { seqs, q_max }
    }

    fn padded(&self) -> bool {
        self.seqs.iter().any(|t| t.2 != self.q_max)
    }

    /// `q` with each sequence's last query repeated up to `q_max` rows.
    ///
    /// # Shapes
    /// - q: `[queries, heads, hd]`
    /// - output: `[sequences * q_max, heads, hd]`
    fn pad<B: Backend>(&self, q: Tensor<B, 3>) -> Tensor<B, 3> {
        if !self.padded() {
            return q;
        }
        let idx: Vec<usize> = self
            .seqs
            .iter()
            .flat_map(|&(_, first, count)| (0..self.q_max).map(move |a| first + a.min(count - 1)))
            .collect();
        let device = q.device();
        q.select(0, index_tensor::<B>(&idx, &device))
    }

    /// The padded rows of `out` dropped again.
    ///
    /// # Shapes
    /// - out: `[sequences * q_max, d]`
    /// - output: `[queries, d]`
    fn unpad<B: Backend>(&self, out: Tensor<B, 2>) -> Tensor<B, 2> {
        if !self.padded() {
            return out;
        }
        let q_max = self.q_max;
        let keep: Vec<usize> = self
            .seqs
            .iter()
            .enumerate()
            .flat_map(|(i, &(_, _, count))| (0..count).map(move |a| i * q_max + a))
            .collect();
        let device = out.device();
        out.select(0, index_tensor::<B>(&keep, &device))
    }
}

/// The mask of the keys each (padded) query may not see, one row per stacked (head, query) row
/// shared by all key/value heads (the backend's attention broadcasts it instead of a copy per
/// head), or none when every query sees every slot (the cache exactly full); and the number of
/// visible (query, key) pairs.
///
/// # Shapes
/// - output: `[sequences, 1, n_rep * q_max, capacity]`
fn key_mask<B: Backend>(
    store: &LayerCache<B>,
    queries: &[(usize, usize)],
    groups: &QueryGroups,
    n_rep: usize,
    config: &LlamaConfig,
    device: &B::Device,
) -> (Option<KeyMask<B>>, usize) {
    let (q_max, k_max) = (groups.q_max, store.capacity);
    // [n_seq, q_max, k_max], true where a query may not look. Every query sees at least its
    // own key; a padded query row repeats the sequence's last query (as `pad` does) and is
    // dropped after.
    let mut hidden = vec![true; groups.seqs.len() * q_max * k_max];
    let mut visible = 0;
    for (i, &(s, first, count)) in groups.seqs.iter().enumerate() {
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
    let mask = hidden.contains(&true).then(|| {
        let rows: Vec<bool> = hidden
            .chunks(q_max * k_max)
            .flat_map(|seq| std::iter::repeat_n(seq, n_rep).flatten().copied())
            .collect();
        KeyMask::Hidden(Tensor::<B, 4, Bool>::from_data(
            TensorData::new(rows, [groups.seqs.len(), 1, n_rep * q_max, k_max]),
            device,
        ))
    });
    (mask, visible)
}

/// The cached keys and values of the sequences with queries, read whole and in place, in the
/// queries' type (a half-precision cache widened: the backends' attention takes one type).
///
/// # Shapes
/// - output: `[sequences, kv_heads, capacity, hd]` each
fn cached_keys_values<B: Backend>(
    store: &LayerCache<B>,
    groups: &QueryGroups,
    nkv: usize,
    hd: usize,
    q: &Tensor<B, 4>,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let (ck, cv) = store
        .kv
        .as_ref()
        .expect("queries store their own keys first");
    let batch = store.positions.len();
    let all_seqs = groups.seqs.len() == batch;
    let seq_idx = index_tensor::<B>(
        &groups.seqs.iter().map(|t| t.0).collect::<Vec<_>>(),
        &q.device(),
    );
    let take = |t: &Tensor<B, 2>| {
        let t = t.clone().reshape([batch, nkv, store.capacity, hd]);
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
    (take(ck), take(cv))
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
