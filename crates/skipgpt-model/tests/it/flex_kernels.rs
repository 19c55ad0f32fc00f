//! The CPU backend's fast paths (`skipgpt_model::flex_kernels`, kernels in `skipgpt-kernels`):
//! products of at most `MAX_ROWS` rows on burn-flex take the kernels, for f32, f16 and bf16
//! weights in either layout, and give what the plain product gives; larger ones and other
//! backends keep Burn's matmul; a model decoding, or prefilling a long prompt in pieces, on the
//! CPU backend gives the reference backend's logits.

use burn::module::Param;
use burn::nn::Linear;
use burn::tensor::{DType, Distribution, Tensor};
use skipgpt_kernels::matvec::widens_in_registers;
use skipgpt_model::dispatch::{hold_weight, holds_weights_out_in, MAX_ROWS, MAX_ROWS_IN_OUT};
use skipgpt_model::engine::generate_sparse;
use skipgpt_model::flex_kernels::{rows_times_weight, rows_times_weight_t};
use skipgpt_model::precision::linear_forward;
use skipgpt_model::{load_pretrained, Routing};
use skipgpt_test_support::*;

type Flex = burn::backend::Flex;

fn flex() -> burn::backend::flex::FlexDevice {
    burn::backend::flex::FlexDevice
}

/// `x · W (+ b)` in f64 from the values as stored.
fn plain(x: &[f32], rows: usize, w: &[f32], d_in: usize, d_out: usize, b: &[f32]) -> Vec<f32> {
    let mut y = Vec::with_capacity(rows * d_out);
    for r in 0..rows {
        for j in 0..d_out {
            let s: f64 = (0..d_in)
                .map(|i| x[r * d_in + i] as f64 * w[i * d_out + j] as f64)
                .sum();
            y.push((s + b.get(j).copied().unwrap_or(0.0) as f64) as f32);
        }
    }
    y
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
            "{what}: value {k}: {g} against {w}"
        );
    }
}

#[test]
fn small_products_take_the_kernels_and_match_the_plain_product() {
    // 200 outputs: whole vectors of 16 and 8 and a ragged tail
    let (d_in, d_out) = (96, 200);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let w =
            Tensor::<Flex, 2>::random([d_in, d_out], Distribution::Default, &flex()).cast(dtype);
        let bias = Tensor::<Flex, 1>::random([d_out], Distribution::Default, &flex());
        let linear = Linear {
            weight: Param::from_tensor(w.clone()),
            bias: Some(Param::from_tensor(bias.clone())),
        };
        let stored = to_vec(w.clone().cast(DType::F32));
        for rows in [1, 3, MAX_ROWS_IN_OUT, MAX_ROWS_IN_OUT + 1, MAX_ROWS + 1] {
            let what = format!("{dtype:?}, {rows} rows");
            let x = Tensor::<Flex, 2>::random([rows, d_in], Distribution::Default, &flex());
            let want = plain(
                &to_vec(x.clone()),
                rows,
                &stored,
                d_in,
                d_out,
                &to_vec(bias.clone()),
            );
            let kernels = rows_times_weight(&x, &w);
            // more rows of this layout ([in, out]): half-precision weights are widened for
            // gemm's f32 kernels, f32 ones go to Burn's matmul as they are
            let taken = rows <= MAX_ROWS_IN_OUT || dtype != DType::F32;
            assert_eq!(kernels.is_some(), taken, "{what}: which path");
            if let Some(y) = kernels {
                let want = plain(&to_vec(x.clone()), rows, &stored, d_in, d_out, &[]);
                assert_close(&to_vec(y), &want, &format!("{what}, kernels"));
            }
            // what the model calls: nothing is rounded but the weights
            let y = linear_forward(&linear, x.clone());
            assert_eq!(y.dims(), [rows, d_out]);
            assert_close(&to_vec(y), &want, &format!("{what}, linear_forward"));
        }
        // rows in a 3-D batch are rows all the same
        let x = Tensor::<Flex, 3>::random([2, 3, d_in], Distribution::Default, &flex());
        let y = rows_times_weight(&x, &w).expect("6 rows take the kernels");
        assert_eq!(y.dims(), [2, 3, d_out]);
        let want = plain(&to_vec(x), 6, &stored, d_in, d_out, &[]);
        assert_close(&to_vec(y), &want, &format!("{dtype:?}, [2, 3, in]"));

        // the transposed layout (the tied head): W stored [out, in]
        let wt = Tensor::<Flex, 2>::from_data(w.clone().transpose().to_data(), &flex());
        let x = Tensor::<Flex, 2>::random([2, d_in], Distribution::Default, &flex());
        let y = rows_times_weight_t(&x, &wt).expect("2 rows take the kernels");
        let want = plain(&to_vec(x), 2, &stored, d_in, d_out, &[]);
        assert_close(&to_vec(y), &want, &format!("{dtype:?}, transposed"));
    }
}

#[test]
fn weights_held_as_checkpoints_store_them_take_the_kernels_too() {
    // the CPU backend's layout of loaded weights: a transposed view of a contiguous [out, in]
    let (d_in, d_out) = (96, 200);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let out_in =
            Tensor::<Flex, 2>::random([d_out, d_in], Distribution::Default, &flex()).cast(dtype);
        let w = out_in.clone().transpose();
        let stored = to_vec(w.clone().cast(DType::F32));
        for rows in [1, 5, MAX_ROWS] {
            let x = Tensor::<Flex, 2>::random([rows, d_in], Distribution::Default, &flex());
            let y = rows_times_weight(&x, &w);
            if dtype == DType::F16 && !widens_in_registers() {
                // f16 without vector widening keeps gemm's f16 kernels (`weights_of`)
                assert!(y.is_none(), "{rows} rows, f16 without F16C");
                continue;
            }
            let y = y.expect("a transposed contiguous weight");
            let want = plain(&to_vec(x), rows, &stored, d_in, d_out, &[]);
            assert_close(
                &to_vec(y),
                &want,
                &format!("{dtype:?}, {rows} rows, [out, in]"),
            );
        }
        // gemm's product (more rows) reads the same view
        if dtype == DType::F32 {
            let x = Tensor::<Flex, 2>::random([MAX_ROWS + 3, d_in], Distribution::Default, &flex());
            let linear = Linear {
                weight: Param::from_tensor(w.clone()),
                bias: None,
            };
            let want = plain(&to_vec(x.clone()), MAX_ROWS + 3, &stored, d_in, d_out, &[]);
            assert_close(
                &to_vec(linear_forward(&linear, x)),
                &want,
                "gemm, [out, in]",
            );
        }
    }
    // a weight made in place (a merged adapter) is put in that layout once
    let made = Tensor::<Flex, 2>::random([d_in, d_out], Distribution::Default, &flex());
    let held = hold_weight(made.clone());
    assert_eq!(to_vec(held.clone()), to_vec(made.clone()));
    let x = Tensor::<Flex, 2>::random([2, d_in], Distribution::Default, &flex());
    let want = plain(&to_vec(x.clone()), 2, &to_vec(made), d_in, d_out, &[]);
    assert_close(
        &to_vec(rows_times_weight(&x, &held).unwrap()),
        &want,
        "held",
    );
    // which backends hold weights so
    assert!(holds_weights_out_in::<Flex>(&flex()));
    assert!(holds_weights_out_in::<burn::backend::Autodiff<Flex>>(
        &flex()
    ));
    assert!(!holds_weights_out_in::<B>(&device()));
}

#[test]
fn other_backends_other_strided_weights_and_f16_rows_keep_burns_product() {
    let w = Tensor::<B, 2>::random([32, 48], Distribution::Default, &device());
    let x = Tensor::<B, 2>::random([1, 32], Distribution::Default, &device());
    assert!(rows_times_weight(&x, &w).is_none(), "burn-ndarray");
    // columns cut out of a wider matrix are contiguous in neither layout
    let w = Tensor::<Flex, 2>::random([32, 96], Distribution::Default, &flex()).narrow(1, 0, 48);
    let x = Tensor::<Flex, 2>::random([1, 32], Distribution::Default, &flex());
    assert!(rows_times_weight(&x, &w).is_none(), "a strided weight");
    let w = Tensor::<Flex, 2>::random([32, 48], Distribution::Default, &flex());
    assert!(
        rows_times_weight(&x.cast(DType::F16), &w).is_none(),
        "rows in half precision"
    );
}

/// The CPU backend's loaded model holds the checkpoint's values (in its own layout) and gives
/// the reference backend's logits over a prefill longer than `MAX_ROWS` rows (run as two
/// pieces, the second starting inside the second sequence), with several attention blocks on
/// both threads, then single tokens; with a sliding window, the engine's key ranges agree
/// with the reference backend's mask and with the gated forward.
#[test]
fn a_long_prefill_on_the_cpu_backend_gives_the_reference_backends_logits() {
    let dir = tiny().join("model-routed");
    let mut on_flex = load_pretrained::<Flex>(&dir, &flex()).unwrap().model;
    let mut on_ndarray = load_pretrained::<B>(&dir, &device()).unwrap().model;
    assert_eq!(
        to_vec(
            on_flex.model.layers[1]
                .self_attn
                .q_proj
                .base_layer
                .weight
                .val()
        ),
        to_vec(
            on_ndarray.model.layers[1]
                .self_attn
                .q_proj
                .base_layer
                .weight
                .val()
        )
    );
    let vocab = on_flex.config.vocab_size as u32;
    let rows: Vec<Vec<u32>> = (0..2u32)
        .map(|s| {
            (0..100u32)
                .map(|i| (i * 37 + s * 101 + 7) % vocab)
                .collect()
        })
        .collect();
    let chunks = [90, 1, 9];
    assert!(2 * chunks[0] > MAX_ROWS && chunks[0] < MAX_ROWS);
    for window in [None, Some(5)] {
        on_flex.config.sliding_window = window;
        on_ndarray.config.sliding_window = window;
        for routing in [Routing::Dense, Routing::Deterministic] {
            let a = engine_logits_in_chunks(&on_flex, &rows, &chunks, routing);
            let b = engine_logits_in_chunks(&on_ndarray, &rows, &chunks, routing);
            let d = max_abs_diff(&a, &b);
            assert!(
                d < 1e-4,
                "window {window:?}, {routing:?}: logits differ by {d}"
            );
        }
        // the gated forward (every module, gates multiplied) is the reference of the engine
        let ids = burn::tensor::Tensor::<B, 2, burn::tensor::Int>::from_data(
            burn::tensor::TensorData::new(
                rows.iter().flatten().map(|&t| t as i64).collect::<Vec<_>>(),
                [2, 100],
            ),
            &device(),
        );
        let gated = to_vec(on_ndarray.forward_routed(ids, Routing::Dense, false).logits);
        let engine = engine_logits_in_chunks(&on_flex, &rows, &chunks, Routing::Dense);
        let d = max_abs_diff(&gated, &engine);
        assert!(
            d < 1e-4,
            "window {window:?}: engine against the gated forward: {d}"
        );
    }
}

/// Ragged prompts decode together on the CPU backend to the reference backend's tokens; their
/// prefill (136 rows) runs as two pieces, the first ending inside the second prompt, so each
/// prompt's next token comes from the piece that holds its last token.
#[test]
fn ragged_batches_decode_on_the_cpu_backend_as_on_the_reference_backend() {
    let dir = tiny().join("model-routed");
    let on_flex = load_pretrained::<Flex>(&dir, &flex()).unwrap().model;
    let on_ndarray = load_pretrained::<B>(&dir, &device()).unwrap().model;
    let prompts = vec![
        vec![1u32, 5, 9, 2, 7],
        (0..130).map(|i| i * 3 % 500).collect(),
        vec![4],
    ];
    assert!(prompts.iter().map(Vec::len).sum::<usize>() > MAX_ROWS);
    for routing in [Routing::Dense, Routing::Deterministic] {
        let (a, _, _) = generate_sparse(&on_flex, &prompts, &greedy(12), routing).unwrap();
        let (b, _, _) = generate_sparse(&on_ndarray, &prompts, &greedy(12), routing).unwrap();
        assert_eq!(a, b, "{routing:?}");
    }
}

/// The tiny routed model decoding token by token on burn-flex (every product through the
/// kernels) and on burn-ndarray (Burn's products) gives the same logits at every step.
#[test]
fn decoding_on_the_cpu_backend_gives_the_reference_backends_logits() {
    let dir = tiny().join("model-routed");
    let on_flex = load_pretrained::<Flex>(&dir, &flex()).unwrap().model;
    let on_ndarray = load_pretrained::<B>(&dir, &device()).unwrap().model;
    let rows = vec![
        vec![1u32, 5, 9, 2, 7, 3, 11, 4],
        vec![6, 8, 2, 2, 13, 1, 5, 9],
    ];
    // a prefill of 3 tokens per sequence (6 rows: the kernels), then single tokens
    let chunks = [3, 1, 1, 1, 1, 1];
    for routing in [Routing::Dense, Routing::Deterministic] {
        let a = engine_logits_in_chunks(&on_flex, &rows, &chunks, routing);
        let b = engine_logits_in_chunks(&on_ndarray, &rows, &chunks, routing);
        let d = max_abs_diff(&a, &b);
        assert!(d < 1e-4, "{routing:?}: logits differ by {d}");
    }
}

/// The CPU backend writes new keys and values into the cache in place. A cloned cache (two
/// continuations of one prompt) shares its buffers until one of them writes: each clone must
/// then continue as if it had its own cache from the start.
#[test]
fn a_cloned_cache_continues_independently_of_its_original() {
    use skipgpt_model::engine::{sparse_forward, LogitRows, SparseCache};
    let dir = tiny().join("model-routed");
    let model = load_pretrained::<Flex>(&dir, &flex()).unwrap().model;
    let layers = model.config.num_hidden_layers;
    let step = |cache: &mut SparseCache<Flex>, ids: &[u32]| {
        to_vec(
            sparse_forward(
                &model,
                &[ids.to_vec()],
                cache,
                Routing::Dense,
                LogitRows::Last,
            )
            .unwrap()
            .logits,
        )
    };
    let prompt = [1u32, 5, 9, 2, 7, 3];
    let mut original = SparseCache::new(1, layers);
    step(&mut original, &prompt);
    let mut clone = original.clone();
    // the original goes on with [11, 12], the clone with [40, 41]
    let a = [step(&mut original, &[11]), step(&mut original, &[12])];
    let b = [step(&mut clone, &[40]), step(&mut clone, &[41])];
    for (continuation, got) in [([11u32, 12], a), ([40, 41], b)] {
        let mut fresh = SparseCache::new(1, layers);
        step(&mut fresh, &prompt);
        for (t, g) in continuation.iter().zip(&got) {
            let want = step(&mut fresh, &[*t]);
            assert_eq!(g, &want, "continuation {continuation:?}");
        }
    }
}

/// With half-precision matrices the engine keeps its cache in the same half type (half the
/// bytes). At f16 (11 significant bits) the tiny model still decodes as at f32; bf16's 8 bits
/// move its near-ties (SmolLM2's agreement at both is in `tests/it/smollm2/mod.rs`).
#[test]
fn half_precision_weights_keep_a_half_precision_cache() {
    use skipgpt_model::{load_pretrained_as, StoreDtype};
    let dir = tiny().join("model-routed");
    let prompts = vec![vec![1u32, 5, 9, 2, 7], vec![3, 4]];
    let at = |dtype| {
        let model = load_pretrained_as::<Flex>(&dir, &flex(), dtype)
            .unwrap()
            .model;
        let (tokens, _, cache) =
            generate_sparse(&model, &prompts, &greedy(8), Routing::Dense).unwrap();
        let [kv, hd] = [model.config.num_key_value_heads, model.config.head_dim];
        (tokens, cache.value_bytes(), cache.bytes(kv, hd))
    };
    let (t32, size32, bytes32) = at(StoreDtype::F32);
    assert_eq!(size32, 4);
    for dtype in [StoreDtype::F16, StoreDtype::BF16] {
        let (tokens, size, bytes) = at(dtype);
        assert_eq!(size, 2, "{dtype:?}");
        assert_eq!(2 * bytes, bytes32, "{dtype:?}");
        if dtype == StoreDtype::F16 {
            assert_eq!(tokens, t32);
        }
    }
}
