//! Gradient checkpointing per decoder layer computes the gradients the whole graph computes:
//! router tuning (Gumbel gates, the sparsity term coupling every gate), the coupled
//! one-router-per-layer variant, pretraining (every weight, embeddings and head included) and
//! LoRA adapters.

use burn::module::{Module, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use skipgpt_model::{
    Granularity, LlamaConfig, LlamaForCausalLM, LoraConfig, MlpRouterInput, RoutingConfig,
    StoreDtype,
};
use skipgpt_train::loader::LmBatch;
use skipgpt_train::loss::SparsityLossConfig;
use skipgpt_train::step::LmTrainer;
use skipgpt_train::Objective;

use skipgpt_test_support::{max_abs_diff, router_values};

type Inner = burn::backend::NdArray<f32>;
type B = burn::backend::Autodiff<Inner>;

fn batch() -> LmBatch<B> {
    let device = Default::default();
    let rows: Vec<Vec<u32>> = (0..3u32)
        .map(|r| (0..=20u32).map(|i| (r * 37 + i * 11) % 97).collect())
        .collect();
    let seqs: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
    LmBatch {
        temperature: 2.5,
        noise_seed: 1234,
        loss_scale: 0.5,
        ..LmBatch::from_sequences(&seqs, &device)
    }
}

fn base(seed: u64) -> LlamaForCausalLM<B> {
    let device = Default::default();
    B::seed(&device, seed);
    let model = LlamaConfig::tiny(100).init::<B>(&device);
    // draw every lazily initialised parameter now, so that clones share them
    let _ = model.export(StoreDtype::F32);
    model
}

fn routed(routing: RoutingConfig) -> LlamaForCausalLM<B> {
    let model = base(3);
    B::seed(&Default::default(), 4);
    let model = model.with_new_routers(routing).freeze_base();
    let _ = model.export(StoreDtype::F32);
    model
}

/// The gradient of every parameter that has one, by parameter path.
fn named_grads(model: &LlamaForCausalLM<B>, grads: &GradientsParams) -> Vec<(String, Vec<f32>)> {
    struct Collect<'a> {
        grads: &'a GradientsParams,
        path: Vec<String>,
        out: Vec<(String, Vec<f32>)>,
    }
    impl burn::module::ModuleVisitor<B> for Collect<'_> {
        fn enter_module(&mut self, name: &str, _container: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.get::<Inner, D>(param.id) {
                let v = g.into_data().convert::<f32>().into_vec().unwrap();
                self.out.push((self.path.join("."), v));
            }
        }
    }
    let mut c = Collect {
        grads,
        path: Vec::new(),
        out: Vec::new(),
    };
    model.visit(&mut c);
    c.out
}

/// Full and checkpointed gradients of one batch agree; returns how many tensors had one.
fn check(model: LlamaForCausalLM<B>, objective: Objective) -> Vec<String> {
    let trainer = LmTrainer::new(model, objective);
    let batch = batch();
    let (loss, full_out) = trainer.forward_loss(&batch, true);
    let full = GradientsParams::from_grads((loss * batch.loss_scale).backward(), &trainer);
    let (ckpt, ckpt_out) = trainer.checkpointed_step(&batch);

    let (a, b) = (
        named_grads(&trainer.model, &full),
        named_grads(&trainer.model, &ckpt),
    );
    let names: Vec<String> = a.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(
        names,
        b.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(),
        "the same parameters get gradients"
    );
    assert!(!names.is_empty());
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        let scale = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = max_abs_diff(x, y);
        assert!(scale > 0.0, "{name}: zero gradient");
        assert!(d <= 1e-4 * scale, "{name}: differs by {d} (scale {scale})");
    }
    // the loss and skip statistics are the same numbers
    let stats = |o: skipgpt_train::step::StepOutput<B>| {
        use burn::train::metric::ItemLazy;
        let s = o.sync();
        [s.loss, s.lm_loss, s.attn_skip, s.mlp_skip]
    };
    let (s1, s2) = (stats(full_out), stats(ckpt_out));
    for (x, y) in s1.iter().zip(&s2) {
        assert!((x - y).abs() < 1e-5, "{s1:?} vs {s2:?}");
    }
    names
}

#[test]
fn router_tuning_gradients_are_the_same() {
    let objective = Objective::Sparsity(SparsityLossConfig::new().with_target(0.3));
    let names = check(routed(RoutingConfig::new()), objective.clone());
    // only routers train: 3 layers × 2 routers × (weight, bias)
    assert_eq!(names.len(), 12, "{names:?}");
    assert!(names.iter().all(|n| n.contains("router")), "{names:?}");
    // the MLP router reading the block input, and separate targets per module kind
    let separate = Objective::Sparsity(
        SparsityLossConfig::new()
            .with_attn_target(Some(0.4))
            .with_mlp_target(Some(0.1)),
    );
    check(
        routed(RoutingConfig::new().with_mlp_router_input(MlpRouterInput::BlockInput)),
        separate,
    );
}

#[test]
fn coupled_router_gradients_are_the_same() {
    let objective = Objective::Sparsity(SparsityLossConfig::new());
    let names = check(
        routed(RoutingConfig::new().with_granularity(Granularity::Layer)),
        objective,
    );
    assert_eq!(names.len(), 6, "{names:?}");
}

#[test]
fn pretraining_gradients_are_the_same() {
    let names = check(base(8), Objective::Lm);
    for part in ["embed_tokens", "lm_head", "norm", "q_proj", "down_proj"] {
        assert!(names.iter().any(|n| n.contains(part)), "{part}: {names:?}");
    }
}

#[test]
fn lora_gradients_are_the_same() {
    // without dropout: the two paths draw their masks differently (per layer when
    // checkpointing), so with dropout they compute the same function of other masks
    let cfg = LoraConfig {
        dropout: 0.0,
        ..LoraConfig::default()
    };
    let device = burn::backend::ndarray::NdArrayDevice::default();
    B::seed(&device, 5);
    let model = routed(RoutingConfig::new())
        .no_grad()
        .with_lora(cfg)
        .unwrap();
    // B starts at zero, which makes A's gradient zero: move B off zero first
    let model = model.map(&mut NudgeLoraB);
    let names = check(model, Objective::Lm);
    assert!(names.iter().all(|n| n.contains("lora")), "{names:?}");
    assert_eq!(names.len(), 3 * 3 * 2, "{names:?}");
}

/// Sets every `lora_b` to small non-zero values.
struct NudgeLoraB;

impl burn::module::ModuleMapper<B> for NudgeLoraB {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let dims = tensor.dims();
        // lora_b is [rank, out] with rank 16 and nothing else in the model is that shape and
        // zero
        let is_zero = tensor.clone().abs().max().into_scalar() == 0.0;
        let tensor = if D == 2 && dims[0] == 16 && is_zero {
            let n: usize = dims.iter().product();
            let values: Vec<f32> = (0..n).map(|i| ((i % 7) as f32 - 3.0) * 0.01).collect();
            Tensor::from_data(TensorData::new(values, dims), &tensor.device()).require_grad()
        } else {
            tensor
        };
        Param::from_mapped_value(id, tensor, mapper)
    }
}

/// Through burn-train: a router-tuning run with `checkpoint_layers` ends where the run without
/// it ends.
#[test]
fn a_checkpointed_run_trains_the_same_routers() {
    use skipgpt_train::data::PackedDataset;
    use skipgpt_train::{fit, RunDir, TrainOptions};
    let seq_len = 16;
    let data = PackedDataset {
        seq_len,
        sequences: (0..12u32)
            .map(|s| {
                (0..=seq_len as u32)
                    .map(|i| (s * 13 + i * 7) % 97)
                    .collect()
            })
            .collect(),
    };
    let dir = tempfile::tempdir().unwrap();
    let start = routed(RoutingConfig::new());
    let device = burn::backend::ndarray::NdArrayDevice::default();
    let go = |checkpoint_layers: bool| {
        let opts = TrainOptions {
            steps: 6,
            batch_size: 3,
            lr: 1e-2,
            checkpoint_every: 3,
            valid_sequences: 3,
            quiet: true,
            checkpoint_layers,
            ..TrainOptions::default()
        };
        let run = RunDir {
            path: dir.path().join(format!("ckpt-{checkpoint_layers}")),
            resume: false,
            label: "t".into(),
        };
        let objective = Objective::Sparsity(SparsityLossConfig::new().with_target(0.4));
        let model = fit(
            start.clone(),
            objective,
            data.clone(),
            data.clone(),
            &opts,
            &run,
            &[device],
        )
        .unwrap();
        router_values(&model)
    };
    let (plain, ckpt) = (go(false), go(true));
    let before = router_values(&start);
    let moved = max_abs_diff(&before, &plain);
    let d = max_abs_diff(&plain, &ckpt);
    assert!(moved > 1e-3, "{moved}");
    assert!(
        d < 1e-4 * moved.max(1.0),
        "checkpointed routers differ by {d}"
    );
}
