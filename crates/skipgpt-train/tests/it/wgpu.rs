//! The same parity tests on the `wgpu` backend: dense and routed logits against the HF
//! fixtures, greedy generation (gated and through the sparse engine), and one step of router
//! tuning against the CPU backend.
//!
//! In CI these run on Mesa's software Vulkan driver (lavapipe), which `.ci/run` installs.
//! Without any wgpu adapter they print why they did nothing, unless `SKIPGPT_REQUIRE_WGPU=1`
//! (set by `.ci/run`), which turns a missing adapter into a failure.
//!
//! Tolerance: logits within `GPU_TOL` = 1e-3 of the reference, 10x the CPU tests' 1e-4. GPU
//! kernels reduce in a different order (tiled matmuls, tree reductions in softmax and RMSNorm)
//! and may use faster `exp`/`rsqrt`; on a real GPU, matmuls may also run through TF32-like
//! units. lavapipe itself lands within 2e-6 (`docs/backends.md`). Gates and greedy tokens
//! are discrete and must be equal.

use std::sync::OnceLock;

use burn::backend::wgpu::{Wgpu, WgpuDevice};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use skipgpt_model::engine::{generate_sparse, sparse_forward, LogitRows, SparseCache};
use skipgpt_model::io::safetensors_io::TensorFile;
use skipgpt_model::{generate, load_pretrained, LlamaForCausalLM, Routing};
use skipgpt_test_support::{diff_with, ids_rows, reference, tiny, to_vec};
use skipgpt_train::data::PackedDataset;
use skipgpt_train::loss::SparsityLossConfig;
use skipgpt_train::probe::router_gradients;
use skipgpt_train::{fit, Objective, RunDir, TrainOptions};

type W = Wgpu;
type Cpu = skipgpt_test_support::B;

const GPU_TOL: f32 = 1e-3;

/// The default wgpu device if an adapter can start, else `None` (or a panic when
/// `SKIPGPT_REQUIRE_WGPU=1`).
fn wgpu_device(test: &str) -> Option<WgpuDevice> {
    static STARTED: OnceLock<Result<(), String>> = OnceLock::new();
    let device = WgpuDevice::default();
    let started = STARTED.get_or_init(|| {
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let r = std::panic::catch_unwind(|| {
            Tensor::<W, 1>::ones([4], &WgpuDevice::default())
                .sum()
                .into_scalar()
        });
        std::panic::set_hook(hook);
        match r {
            Ok(4.0) => Ok(()),
            Ok(s) => Err(format!("a sum of four ones gave {s}")),
            Err(p) => Err(p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into())),
        }
    });
    match started {
        Ok(()) => Some(device),
        Err(why) if std::env::var("SKIPGPT_REQUIRE_WGPU").is_ok_and(|v| v == "1") => {
            panic!("{test}: no usable wgpu adapter ({why}); install mesa-vulkan-drivers")
        }
        Err(why) => {
            eprintln!(
                "{test}: NOT RUN: no usable wgpu adapter ({why}). Install a Vulkan driver \
                 (Debian: mesa-vulkan-drivers libvulkan1) or set SKIPGPT_REQUIRE_WGPU=1 to fail."
            );
            None
        }
    }
}

fn ids<Bk: Backend>(file: &TensorFile, name: &str, device: &Bk::Device) -> Tensor<Bk, 2, Int> {
    let (ids, shape) = file.read_i64(name).unwrap();
    Tensor::from_data(TensorData::new(ids, [shape[0], shape[1]]), device)
}

/// `model-routed` with its default `skipgpt.json` (MLP router reads the post-attention state).
fn routed<Bk: Backend>(device: &Bk::Device) -> LlamaForCausalLM<Bk> {
    load_pretrained::<Bk>(&tiny().join("model-routed"), device)
        .unwrap()
        .model
}

#[test]
fn wgpu_dense_logits_hidden_states_and_greedy_match_hf() {
    let Some(device) = wgpu_device("wgpu dense parity") else {
        return;
    };
    let model = load_pretrained::<W>(&tiny().join("model"), &device)
        .unwrap()
        .model;
    let r = reference(&tiny());
    let out = model.forward_full(ids::<W>(&r, "input_ids", &device), true);
    for (k, h) in out.hidden_states.into_iter().enumerate() {
        let d = diff_with(h, &r, &format!("hidden_states.{k}"));
        assert!(d < GPU_TOL, "hidden_states.{k} differs by {d}");
    }
    let d = diff_with(out.logits, &r, "logits");
    eprintln!("wgpu dense: max |Δ logits| = {d:e}");
    assert!(d < GPU_TOL, "dense logits differ by {d}");

    let prompts = ids_rows(&r, "greedy_prompt");
    let got = generate(&model, &prompts, &skipgpt_test_support::greedy(8)).unwrap();
    let expected: Vec<Vec<u32>> = ids_rows(&r, "greedy_tokens")
        .into_iter()
        .map(|t| t[..8].to_vec())
        .collect();
    assert_eq!(got, expected, "greedy tokens through the KV cache");
}

#[test]
fn wgpu_routed_logits_gates_and_sparse_engine_match_hf() {
    let Some(device) = wgpu_device("wgpu routed parity") else {
        return;
    };
    let model = routed::<W>(&device);
    let r = reference(&tiny());
    let mode = "post_attn";

    // the gated computation
    let out = model.forward_full(ids::<W>(&r, "input_ids", &device), false);
    let d = diff_with(out.logits, &r, &format!("routed.{mode}.logits"));
    eprintln!("wgpu routed (gated): max |Δ logits| = {d:e}");
    assert!(d < GPU_TOL, "routed logits differ by {d}");
    for (name, gates) in [("attn_gates", out.attn_gates), ("mlp_gates", out.mlp_gates)] {
        let got = to_vec(Tensor::stack::<3>(gates, 0));
        let (expected, _) = r.read_f32(&format!("routed.{mode}.{name}")).unwrap();
        assert_eq!(got, expected, "{name}");
    }

    // the sparse engine, which really skips
    let rows = ids_rows(&r, "input_ids");
    let mut cache = SparseCache::new(rows.len(), model.config.num_hidden_layers);
    let sparse = sparse_forward(
        &model,
        &rows,
        &mut cache,
        Routing::Deterministic,
        LogitRows::All,
    )
    .unwrap();
    let [n, v] = sparse.logits.dims();
    let logits = sparse.logits.reshape([rows.len(), n / rows.len(), v]);
    let d = diff_with(logits, &r, &format!("routed.{mode}.logits"));
    eprintln!("wgpu routed (sparse engine): max |Δ logits| = {d:e}");
    assert!(d < GPU_TOL, "sparse-engine logits differ by {d}");
    let (expected, _) = r.read_f32(&format!("routed.{mode}.attn_gates")).unwrap();
    let got: Vec<f32> = sparse
        .attn_gates
        .iter()
        .flatten()
        .map(|&g| g as u8 as f32)
        .collect();
    assert_eq!(got, expected, "sparse-engine attention gates");
    assert!(sparse.stats.flops < sparse.stats.dense_flops);

    // a few greedy steps, gated and sparse
    let prompts = ids_rows(&r, "greedy_prompt");
    let expected: Vec<Vec<u32>> = ids_rows(&r, &format!("routed.{mode}.greedy_tokens"))
        .into_iter()
        .map(|t| t[..8].to_vec())
        .collect();
    let opts = skipgpt_test_support::greedy(8);
    assert_eq!(generate(&model, &prompts, &opts).unwrap(), expected);
    let (tokens, _, _) = generate_sparse(&model, &prompts, &opts, Routing::Deterministic).unwrap();
    assert_eq!(tokens, expected, "sparse-engine greedy tokens");
}

/// Every router's output weight, flattened, layer by layer.
fn router_weights<Bk: Backend>(model: &LlamaForCausalLM<Bk>) -> Vec<f32> {
    model
        .model
        .layers
        .iter()
        .flat_map(|l| [&l.attn_router, &l.mlp_router])
        .flat_map(|r| to_vec(r.as_ref().unwrap().fc2.weight.val()))
        .collect()
}

/// Stage-1 loss and router gradients of the fixture's batch, with fixed Gumbel noise.
fn router_tuning_grads<Bk: burn::tensor::backend::AutodiffBackend>(
    device: &Bk::Device,
) -> (f32, Vec<f32>) {
    let rows = ids_rows(&reference(&tiny()), "input_ids");
    router_gradients(routed::<Bk>(device), &rows, device)
}

#[test]
fn wgpu_router_tuning_step_matches_the_cpu() {
    let Some(device) = wgpu_device("wgpu router tuning") else {
        return;
    };
    // the Gumbel noise is drawn on the host from the batch's seed: both backends see the same
    let (cpu_loss, cpu_grads) = router_tuning_grads::<Autodiff<Cpu>>(&Default::default());
    let (gpu_loss, gpu_grads) = router_tuning_grads::<Autodiff<W>>(&device);
    assert!(cpu_loss.is_finite() && cpu_grads.iter().any(|g| *g != 0.0));
    assert!(
        (cpu_loss - gpu_loss).abs() < 1e-4 * cpu_loss.abs().max(1.0),
        "loss: cpu {cpu_loss}, wgpu {gpu_loss}"
    );
    let scale = cpu_grads.iter().fold(0.0f32, |m, g| m.max(g.abs()));
    let d = skipgpt_test_support::max_abs_diff(&cpu_grads, &gpu_grads);
    eprintln!("wgpu router gradients: max |Δ| = {d:e} (max |g| = {scale:e})");
    assert!(
        d <= 1e-3 * scale,
        "router gradients differ by {d} (scale {scale})"
    );

    // one optimizer step through burn-train's learner, on each backend
    let tmp = tempfile::tempdir().unwrap();
    let step = |label: &str| -> (RunDir, TrainOptions) {
        let run = RunDir {
            path: tmp.path().join(label),
            resume: false,
            label: label.into(),
        };
        let opts = TrainOptions {
            steps: 1,
            batch_size: 2,
            checkpoint_every: 1,
            valid_sequences: 2,
            quiet: true,
            ..TrainOptions::default()
        };
        (run, opts)
    };
    let seq_len = 16;
    let data = PackedDataset {
        seq_len,
        sequences: (0..4u32)
            .map(|s| {
                (0..=seq_len as u32)
                    .map(|i| (s * 31 + i * 7) % 200)
                    .collect()
            })
            .collect(),
    };
    let objective = Objective::Sparsity(SparsityLossConfig::new());
    let (run, opts) = step("cpu");
    let cpu = fit(
        routed::<Autodiff<Cpu>>(&Default::default()).freeze_base(),
        objective.clone(),
        data.clone(),
        data.clone(),
        &opts,
        &run,
        &[Default::default()],
    )
    .unwrap();
    let (run, opts) = step("wgpu");
    let gpu = fit(
        routed::<Autodiff<W>>(&device).freeze_base(),
        objective,
        data.clone(),
        data,
        &opts,
        &run,
        std::slice::from_ref(&device),
    )
    .unwrap();
    let w0 = router_weights(&routed::<Cpu>(&Default::default()));
    let (w_cpu, gpu_after) = (router_weights(&cpu), router_weights(&gpu));
    let moved = skipgpt_test_support::max_abs_diff(&w0, &w_cpu);
    assert!(moved > 1e-4, "one step changed the routers by only {moved}");
    let d = skipgpt_test_support::max_abs_diff(&w_cpu, &gpu_after);
    eprintln!("wgpu one learner step: routers within {d:e} of the CPU's (moved {moved:e})");
    assert!(
        d < 0.05 * moved,
        "router weights after one step differ by {d}"
    );
    // the frozen base is untouched on the GPU too
    assert_eq!(
        to_vec(gpu.model.embed_tokens.weight.val()),
        to_vec(routed::<W>(&device).model.embed_tokens.weight.val())
    );
}
