//! The sparse engine against dense on one model: shared by `bench_sparse` (CPU and any
//! backend) and `gpu_check` (CUDA, f32 and bf16).
//!
//! The routers are random linear maps whose biases are calibrated, layer by layer, so that a
//! chosen fraction of tokens skips each module. Dense and routed runs happen in the same
//! process, on the same inputs, and every speedup is a ratio of times measured here.

// each example that includes this file uses a part of it
#![allow(dead_code)]

use burn::module::Param;
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use skipgpt_model::engine::{generate_sparse, sparse_forward, LogitRows, SparseCache};
use skipgpt_model::{
    GenerateOptions, KvPolicy, LlamaForCausalLM, MlpRouterInput, Routing, RoutingConfig, Sampling,
};

/// What one (batch, target skip) point measured. Throughputs are tokens per second.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EngineRow {
    pub batch: usize,
    pub target_skip: f64,
    pub attn_skip: f64,
    pub mlp_skip: f64,
    pub prefill_dense: f64,
    pub prefill_routed: f64,
    /// FLOP ratio dense / routed of the prefill.
    pub prefill_ideal: f64,
    pub decode_dense: f64,
    pub decode_routed: f64,
    pub decode_ideal: f64,
    /// Weight-byte ratio dense / routed of the decode (what bounds batch-1 decode).
    pub decode_weight_ideal: f64,
    /// KV cache kept / dense, with the keep and the drop policy (and drop's attention skip).
    pub kv_keep: f64,
    pub kv_drop: f64,
    pub kv_drop_attn_skip: f64,
}

/// Deterministic prompts: `batch` rows of `len` token ids below `vocab`.
pub fn prompts(batch: usize, len: usize, vocab: usize) -> Vec<Vec<u32>> {
    (0..batch)
        .map(|s| {
            (0..len)
                .map(|i| ((i * 31 + s * 17 + 5) % vocab.min(4000)) as u32)
                .collect()
        })
        .collect()
}

/// Prefill `prompts`, then decode `decode` steps from their first 16 tokens, dense and routed
/// at `skip`; each time the median of `repeats` runs after one warm-up.
pub fn measure<B: Backend>(
    base: &LlamaForCausalLM<B>,
    prompts: &[Vec<u32>],
    skip: f64,
    decode: usize,
    repeats: usize,
) -> EngineRow {
    let device = base.device();
    let (batch, prefill) = (prompts.len(), prompts[0].len());
    let layers = base.config.num_hidden_layers;
    let keep = calibrated(base, skip, KvPolicy::Keep, prompts);
    // calibrated on its own: hiding keys changes what the later routers see
    let drop = calibrated(base, skip, KvPolicy::Drop, prompts);
    let mut dense = keep.clone();
    dense.routing = Routing::Dense;

    // prefill: the dense model's forward vs the sparse engine
    let ids: Vec<i64> = prompts.iter().flatten().map(|&t| t as i64).collect();
    let input =
        || Tensor::<B, 2, Int>::from_data(TensorData::new(ids.clone(), [batch, prefill]), &device);
    let t_dense = median(repeats, || {
        let _ = dense.forward(input()).into_data();
    });
    let mut stats = None;
    let t_routed = median(repeats, || {
        let mut cache = SparseCache::new(batch, layers);
        let out = sparse_forward(
            &keep,
            prompts,
            &mut cache,
            Routing::Deterministic,
            LogitRows::All,
        )
        .unwrap();
        let _ = out.logits.into_data();
        stats = Some(out.stats);
    });
    let s = stats.unwrap();

    // decode: the same engine executing every module is the baseline
    let opts = GenerateOptions {
        max_new_tokens: decode,
        sampling: Sampling::Greedy,
        eos_token_ids: vec![],
        ignore_eos: true,
    };
    let short: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| p[..16.min(p.len())].to_vec())
        .collect();
    let t_dense_dec = median(repeats, || {
        let _ = generate_sparse(&keep, &short, &opts, Routing::Dense).unwrap();
    });
    let mut dec_stats = None;
    let t_routed_dec = median(repeats, || {
        let (_, st, _) = generate_sparse(&keep, &short, &opts, Routing::Deterministic).unwrap();
        dec_stats = Some(st);
    });
    let ds = dec_stats.unwrap();

    let kv = |m: &LlamaForCausalLM<B>| {
        let mut cache = SparseCache::new(batch, layers);
        let out = sparse_forward(
            m,
            prompts,
            &mut cache,
            Routing::Deterministic,
            LogitRows::Last,
        )
        .unwrap();
        let (kvh, hd) = (m.config.num_key_value_heads, m.config.head_dim);
        (
            cache.bytes(kvh, hd) as f64 / cache.dense_bytes(kvh, hd) as f64,
            out.stats.attn_skip(),
        )
    };
    let (kv_keep, _) = kv(&keep);
    let (kv_drop, kv_drop_attn_skip) = kv(&drop);
    let prefill_tokens = (batch * prefill) as f64;
    let dec_tokens = (batch * decode) as f64;
    EngineRow {
        batch,
        target_skip: skip,
        attn_skip: s.attn_skip(),
        mlp_skip: s.mlp_skip(),
        prefill_dense: prefill_tokens / t_dense,
        prefill_routed: prefill_tokens / t_routed,
        prefill_ideal: s.ideal_speedup(),
        decode_dense: dec_tokens / t_dense_dec,
        decode_routed: dec_tokens / t_routed_dec,
        decode_ideal: ds.ideal_speedup(),
        decode_weight_ideal: ds.weight_ideal_speedup(),
        kv_keep,
        kv_drop,
        kv_drop_attn_skip,
    }
}

pub use skipgpt_eval::speed::median_seconds as median;

/// `base` with random linear routers reading the block input, each router's bias set so that
/// a fraction `skip` of the calibration tokens skips its module.
///
/// One pass over the layers (the gated forward, no logits, one prompt at a time): layer `l`'s
/// routers are calibrated on its block input with the layers before it already routed, then
/// the layer runs. (A forward pass of the whole text per layer, logits included, made the
/// benchmark's routed processes peak at 790 MB on SmolLM2 at f32, 706 MB at f16, where the
/// timed parts needed 582 and 313.)
pub fn calibrated<B: Backend>(
    base: &LlamaForCausalLM<B>,
    skip: f64,
    kv: KvPolicy,
    prompts: &[Vec<u32>],
) -> LlamaForCausalLM<B> {
    let device = base.device();
    let routing = RoutingConfig::new()
        .with_mlp_router_input(MlpRouterInput::BlockInput)
        .with_kv_policy(kv)
        .with_target_sparsity(skip);
    B::seed(&device, 11);
    let mut model = base.clone().with_new_routers(routing);
    let t = prompts[0].len();
    let ctx = model.attention_context(t);
    let layer_routing = model.layer_routing(Routing::Deterministic);
    // the block input of layer l for each prompt, the layers before it routed (one prompt at a
    // time: the buffers of a short prompt, not of the whole calibration text)
    let mut xs: Vec<Tensor<B, 3>> = prompts
        .iter()
        .map(|p| {
            let ids: Vec<i64> = p.iter().map(|&x| x as i64).collect();
            let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, t]), &device);
            model.model.embed(ids)
        })
        .collect();
    for l in 0..model.config.num_hidden_layers {
        let layer = &mut model.model.layers[l];
        for router in [layer.attn_router.as_mut(), layer.mlp_router.as_mut()]
            .into_iter()
            .flatten()
        {
            let w = router.fc2.weight.val(); // [hidden, 2]
            let hdim = w.dims()[0];
            let direction = w.clone().slice([0..hdim, 0..1]) - w.slice([0..hdim, 1..2]);
            let mut sorted: Vec<f32> = xs
                .iter()
                .flat_map(|x| {
                    x.clone()
                        .reshape([t, hdim])
                        .matmul(direction.clone())
                        .into_data()
                        .convert::<f32>()
                        .into_vec::<f32>()
                        .unwrap()
                })
                .collect();
            sorted.sort_by(f32::total_cmp);
            // skip iff diff + bias < 0: put the bias at the `skip` quantile
            let bias = if skip <= 0.0 {
                1e6
            } else {
                -sorted[((skip * sorted.len() as f64) as usize).min(sorted.len() - 1)]
            };
            router.fc2.bias = Some(Param::from_tensor(Tensor::from_data(
                TensorData::new(vec![bias, 0.0f32], [2]),
                &device,
            )));
        }
        let layer = &model.model.layers[l];
        xs = xs
            .into_iter()
            .map(|x| layer.forward(x, &ctx, &layer_routing, None).hidden)
            .collect();
    }
    model.routing = Routing::Deterministic;
    model
}
