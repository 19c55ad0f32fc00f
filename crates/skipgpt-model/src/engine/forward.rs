//! One engine call: the rows it processes, and the layer loop, which reads like the method: per
//! layer an attention step and an MLP step, each executed or skipped per row.

use std::cell::OnceCell;

use burn::tensor::{backend::Backend, DType, Int, Tensor, TensorData};

use super::attention::attention_step;
use super::rows::{add_rows, decide, gather_rows, index_tensor};
use super::stats::Ledger;
use super::{cache_dtype, LogitRows, SparseCache, SparseOutput};
use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::llama::{Decider, DecoderLayer, LayerRouting, LlamaForCausalLM};
use crate::router::Routing;

/// What every layer of one call shares: its rows, their rotary tables, and how the cache keeps
/// keys and values.
pub(super) struct Call<'a, B: Backend> {
    pub(super) config: &'a LlamaConfig,
    /// (sequence, position) of each row, sequence-major.
    pub(super) rows: Vec<(usize, usize)>,
    /// Each row's position (what the rotary tables and the dense cost are computed at).
    positions: Vec<usize>,
    /// How every layer routes (the cache's `kv_policy` among it).
    pub(super) layer_routing: LayerRouting,
    /// The type the model's matrices are held in, and the cache keys and values in
    /// ([`cache_dtype`]).
    weight_dtype: DType,
    pub(super) kv_dtype: DType,
    pub(super) device: B::Device,
    /// Rotary tables at each row's position, `[n, head_dim]`.
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
    /// The tables repeated to `[n, heads * head_dim]` for queries and for keys, made when first
    /// needed (the CPU backend's kernels rotate from the `[n, head_dim]` tables directly).
    q_tables: OnceCell<(Tensor<B, 2>, Tensor<B, 2>)>,
    kv_tables: OnceCell<(Tensor<B, 2>, Tensor<B, 2>)>,
}

/// Which of a call's repeated rotary tables a rotation reads.
#[derive(Clone, Copy)]
pub(super) enum Heads {
    Queries,
    KeyValues,
}

impl<'a, B: Backend> Call<'a, B> {
    fn new(
        model: &'a LlamaForCausalLM<B>,
        tokens: &[Vec<u32>],
        cache: &SparseCache<B>,
        routing: Routing,
    ) -> Self {
        let rows: Vec<(usize, usize)> = tokens
            .iter()
            .enumerate()
            .flat_map(|(s, t)| (0..t.len()).map(move |i| (s, i)))
            .map(|(s, i)| (s, cache.lens[s] + i))
            .collect();
        let device = model.device();
        let positions: Vec<usize> = rows.iter().map(|r| r.1).collect();
        let (cos, sin) = model.rope.cos_sin_at::<B>(&positions, &device);
        let weight_dtype = model.model.embed_tokens.weight.val().dtype();
        Call {
            config: &model.config,
            rows,
            positions,
            layer_routing: model.layer_routing(routing),
            weight_dtype,
            kv_dtype: cache_dtype(weight_dtype),
            device,
            cos,
            sin,
            q_tables: OnceCell::new(),
            kv_tables: OnceCell::new(),
        }
    }

    /// `t`, rows `which` of the call, each rotated at its own position.
    ///
    /// # Shapes
    /// - t: `[which.len(), heads, head_dim]`
    /// - output: the same
    pub(super) fn rotate(&self, t: Tensor<B, 3>, which: &[usize], heads: Heads) -> Tensor<B, 3> {
        if crate::dispatch::engine_kernels::<B>() {
            let (c, s) = (
                gather_rows(self.cos.clone(), which),
                gather_rows(self.sin.clone(), which),
            );
            if let Some(rotated) = crate::dispatch::rotate(&t, &c, &s) {
                return rotated;
            }
        }
        let cell = match heads {
            Heads::Queries => &self.q_tables,
            Heads::KeyValues => &self.kv_tables,
        };
        let (cos, sin) = cell.get_or_init(|| {
            let n = t.dims()[1];
            (
                crate::rope::repeat_for_heads(&self.cos, n),
                crate::rope::repeat_for_heads(&self.sin, n),
            )
        });
        crate::rope::apply_rotary_rows(
            t,
            gather_rows(cos.clone(), which),
            gather_rows(sin.clone(), which),
        )
    }
}

/// [`super::sparse_forward_shifted`] on one piece of rows.
pub(super) fn forward_rows<B: Backend>(
    model: &LlamaForCausalLM<B>,
    tokens: &[Vec<u32>],
    cache: &mut SparseCache<B>,
    (routing, skip_shifts): (Routing, Option<&[f64]>),
    logit_rows: LogitRows,
) -> Result<SparseOutput<B>> {
    cache.check_batch(tokens.len())?;
    if matches!(routing, Routing::Gumbel { .. }) {
        return Err(ModelError::InvalidInput(
            "the sparse engine serves deterministic or sampled routing, not Gumbel training gates"
                .into(),
        ));
    }
    let mut x = embed(model, tokens, &model.device())?;
    let call = Call::new(model, tokens, cache, routing);
    let weight_size = call.weight_dtype.size() as f64;
    let mut ledger = Ledger::new(&model.config, weight_size, &call.positions);
    let layer_routing = call.layer_routing;
    let row_shifts: Option<Vec<f32>> =
        skip_shifts.map(|s| call.rows.iter().map(|&(seq, _)| s[seq] as f32).collect());
    let row_shifts = row_shifts.as_deref();
    let (mut attn_gates, mut mlp_gates) = (Vec::new(), Vec::new());
    for (layer, store) in model.model.layers.iter().zip(&mut cache.layers) {
        let block_input = x.clone();
        let attn_exec = match layer.attn_decider(&layer_routing) {
            Decider::Router(r) => decide(r, x.clone(), routing, row_shifts),
            Decider::Everyone | Decider::SameAsAttention => vec![true; call.rows.len()],
        };
        x = attention_step(layer, x, &attn_exec, &call, store, &mut ledger);
        let reads = (&x, block_input);
        let mlp_exec = mlp_decisions(layer, &layer_routing, reads, &attn_exec, row_shifts);
        x = mlp_step(layer, x, &mlp_exec, &mut ledger);
        if layer_routing.is_routed() {
            let routers =
                usize::from(layer.attn_router.is_some()) + usize::from(layer.mlp_router.is_some());
            ledger.routers(call.rows.len(), routers);
        }
        attn_gates.push(attn_exec);
        mlp_gates.push(mlp_exec);
    }
    let logits = head(model, x, &call, logit_rows, &mut ledger);
    cache.advance(tokens);
    Ok(SparseOutput {
        logits,
        attn_gates,
        mlp_gates,
        stats: ledger.stats,
    })
}

/// The call's tokens embedded, one row each.
///
/// # Shapes
/// - output: `[rows, hidden]`
fn embed<B: Backend>(
    model: &LlamaForCausalLM<B>,
    tokens: &[Vec<u32>],
    device: &B::Device,
) -> Result<Tensor<B, 2>> {
    let ids: Vec<i64> = tokens.iter().flatten().map(|&t| t as i64).collect();
    let n = ids.len();
    if n == 0 {
        return Err(ModelError::InvalidInput("no tokens to process".into()));
    }
    crate::generate::validate_ids(&ids, model.config.vocab_size, "input")?;
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, n]), device);
    Ok(model
        .model
        .embed(ids)
        .reshape([n, model.config.hidden_size]))
}

/// Which rows execute the MLP: its router's decisions on what it reads (the stream after
/// attention or the block's input), attention's, or all.
fn mlp_decisions<B: Backend>(
    layer: &DecoderLayer<B>,
    layer_routing: &LayerRouting,
    (x, block_input): (&Tensor<B, 2>, Tensor<B, 2>),
    attn_exec: &[bool],
    row_shifts: Option<&[f32]>,
) -> Vec<bool> {
    match layer.mlp_decider(layer_routing) {
        Decider::Router(r) => decide(
            r,
            layer_routing.mlp_router_reads(x.clone(), block_input),
            layer_routing.routing,
            row_shifts,
        ),
        Decider::SameAsAttention => attn_exec.to_vec(),
        Decider::Everyone => vec![true; attn_exec.len()],
    }
}

/// The MLP step: the executing rows through norm and MLP, added back into the residual stream.
///
/// # Shapes
/// - x, output: `[rows, hidden]`
fn mlp_step<B: Backend>(
    layer: &DecoderLayer<B>,
    x: Tensor<B, 2>,
    exec: &[bool],
    ledger: &mut Ledger,
) -> Tensor<B, 2> {
    let rows: Vec<usize> = (0..exec.len()).filter(|&i| exec[i]).collect();
    ledger.mlp(exec.len(), rows.len());
    if rows.is_empty() {
        return x;
    }
    let h = layer
        .post_attention_layernorm
        .forward(gather_rows(x.clone(), &rows));
    add_rows(x, &rows, layer.mlp.forward(h))
}

/// Final norm and output head over the rows that get logits.
///
/// # Shapes
/// - x: `[rows, hidden]`
/// - output: `[rows with logits, vocab]`
fn head<B: Backend>(
    model: &LlamaForCausalLM<B>,
    x: Tensor<B, 2>,
    call: &Call<'_, B>,
    logit_rows: LogitRows,
    ledger: &mut Ledger,
) -> Tensor<B, 2> {
    let (rows, n) = (&call.rows, call.rows.len());
    let out_rows: Vec<usize> = match logit_rows {
        LogitRows::All => (0..n).collect(),
        LogitRows::Last => (0..n)
            .filter(|&i| i + 1 == n || rows[i + 1].0 != rows[i].0)
            .collect(),
    };
    ledger.head(out_rows.len());
    let x = if out_rows.len() == n {
        x
    } else {
        x.select(0, index_tensor::<B>(&out_rows, &call.device))
    };
    let logits = model.head(model.model.norm.forward(x).unsqueeze::<3>());
    let [_, r, v] = logits.dims();
    logits.reshape([r, v])
}
