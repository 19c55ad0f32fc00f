//! SkipGPT routers: a tiny classifier per module that decides, per token, whether the module
//! runs. Logit 0 means EXECUTE, logit 1 means SKIP (the reference code's convention).
//!
//! Routers read the raw residual stream (not the normed state), in f32.

use std::path::Path;

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::tensor::{activation, backend::Backend, Distribution, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::io::safetensors_io::{OwnedTensor, StoreDtype, WeightSet};
use crate::linear::{export_linear, load_linear};
use crate::precision::linear_forward;

/// The router network.
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RouterVariant {
    /// `Linear(hidden, 2)`: the paper's router (≈0.008% of LLaMA-2-7B's parameters).
    #[default]
    Linear,
    /// `Linear(hidden, hidden/4) → ReLU → Linear(hidden/4, 2)`: the reference code's router.
    Mlp,
}

/// What the MLP router reads.
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum MlpRouterInput {
    /// The state after the attention residual, `h` (the paper).
    #[default]
    PostAttn,
    /// The block input `x`, as the published code does (both routers read the same state).
    BlockInput,
}

/// How many routers a layer has.
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Granularity {
    /// One router before attention and one before the MLP (SkipGPT).
    #[default]
    Module,
    /// One router per layer, reading the block input, gating both modules together
    /// (the MoD-D style baseline).
    Layer,
}

/// What a token that skips attention means for the other tokens.
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum KvPolicy {
    /// The skipped token still lends its keys and values to the others (the paper).
    #[default]
    Keep,
    /// The skipped token is invisible to later tokens' attention at that layer, so its keys and
    /// values need not be computed or cached. Must be trained the way it is served.
    Drop,
}

/// Where a new router starts (stage 1 only: a trained router's weights say everything).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RouterInit {
    /// Kaiming-uniform weights and zero biases, as the reference code initialises them. Each
    /// decision starts as a coin flip on the token's state: about half of all modules are
    /// skipped at random at the first step. A 2.6M-parameter toy model absorbs that; a real
    /// pretrained model does not (SmolLM2's perplexity goes from 75 to 10⁵).
    #[default]
    Paper,
    /// Starts from the dense model: the output layer's weights are zero and its bias favours
    /// EXECUTE by `margin` logits, so every module runs with probability σ(margin) whatever the
    /// token (95% for the default margin of 3), and the sparsity loss pushes skipping up from
    /// there. The weights still get gradients (∂logit/∂w = x), so routers learn per token.
    Execute { margin: f64 },
}

impl RouterInit {
    /// The execute-biased start with its default margin.
    pub const EXECUTE: RouterInit = RouterInit::Execute { margin: 3.0 };
}

/// What a sparsity target counts.
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SparsityUnit {
    /// (token, module) executions, every module weighted equally: the reference code's loss.
    #[default]
    Modules,
    /// Parameters: a skipped attention counts its attention weights, a skipped MLP its MLP
    /// weights. The paper's tables report this ("Param skip").
    Params,
}

impl SparsityUnit {
    /// The weight of attention in the global skip rate, for the loss: `None` for modules
    /// (½ each), a layer's attention share of its routed parameters for `Params`.
    pub fn attn_share(self, config: &crate::LlamaConfig) -> Option<f64> {
        match self {
            SparsityUnit::Modules => None,
            SparsityUnit::Params => {
                let (a, m) = (config.attention_params(), config.mlp_params());
                Some(a as f64 / (a + m) as f64)
            }
        }
    }
}

/// Everything about routing that a SkipGPT checkpoint records in `skipgpt.json`.
#[derive(Config, Debug, PartialEq)]
pub struct RoutingConfig {
    #[config(default = "RouterVariant::Linear")]
    pub router: RouterVariant,
    #[config(default = "MlpRouterInput::PostAttn")]
    pub mlp_router_input: MlpRouterInput,
    #[config(default = "Granularity::Module")]
    pub granularity: Granularity,
    #[config(default = "KvPolicy::Keep")]
    pub kv_policy: KvPolicy,
    /// Fraction the routers were trained to skip, counted in `target_unit`.
    #[config(default = 0.25)]
    pub target_sparsity: f64,
    /// What `target_sparsity` counts (files written before this field count modules).
    #[config(default = "SparsityUnit::Modules")]
    pub target_unit: SparsityUnit,
}

impl RoutingConfig {
    /// Reads `skipgpt.json`; unknown values name the key and the accepted ones.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let bad = |e: serde_json::Error| ModelError::Config {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let mut value: serde_json::Value = serde_json::from_str(&text).map_err(bad)?;
        // written before the unit was recorded: those routers were trained counting modules
        // (burn's `Config` deserialiser does not apply `#[config(default)]` to a missing key)
        if let Some(fields) = value.as_object_mut() {
            fields
                .entry("target_unit")
                .or_insert_with(|| serde_json::json!("modules"));
        }
        let config: Self = serde_json::from_value(value).map_err(bad)?;
        let t = config.target_sparsity;
        if !(0.0..=1.0).contains(&t) {
            return Err(ModelError::Config {
                path: path.to_path_buf(),
                message: format!("`target_sparsity` must be a fraction in [0, 1], got {t}"),
            });
        }
        Ok(config)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("routing config serialises")
    }
}

/// How gates are computed in a forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Routing {
    /// Routers ignored: every module runs.
    #[default]
    Dense,
    /// Execute iff logit0 > logit1 (inference default).
    Deterministic,
    /// Each decision drawn from the router's softmax (the reference code's inference).
    Sample,
    /// Training: hard Gumbel-softmax with a straight-through estimator. The forward value is
    /// exactly 0 or 1; the gradient is that of the soft probability of EXECUTE.
    Gumbel { temperature: f64 },
}

/// One router: `[.., hidden] -> [.., 2]` logits.
#[derive(Module, Debug)]
pub struct Router<B: Backend> {
    /// The hidden layer of the `mlp` variant.
    pub fc1: Option<Linear<B>>,
    /// The output layer: the whole router for the `linear` variant.
    pub fc2: Linear<B>,
}

impl<B: Backend> Router<B> {
    /// A new router, started as `init` says (see [`RouterInit`]).
    pub fn init(
        variant: RouterVariant,
        hidden: usize,
        init: RouterInit,
        device: &B::Device,
    ) -> Self {
        let layer = |d_in: usize, d_out: usize, relu: bool| {
            LinearConfig::new(d_in, d_out)
                .with_initializer(Initializer::KaimingUniform {
                    gain: if relu { 2f64.sqrt() } else { 1.0 },
                    fan_out_only: false,
                })
                .init::<B>(device)
        };
        // Draw the weights now rather than lazily at first use, so that the random stream a
        // router's initialisation consumes does not depend on when it is first run.
        let zero_bias = |mut l: Linear<B>| {
            l.weight = Param::from_tensor(l.weight.val());
            l.bias = l.bias.map(|b| Param::from_tensor(b.val().zeros_like()));
            l
        };
        // the decision layer: random (paper) or silent with an EXECUTE bias
        let output = |d_in: usize| match init {
            RouterInit::Paper => zero_bias(layer(d_in, 2, false)),
            RouterInit::Execute { margin } => {
                let half = (margin / 2.0) as f32;
                Linear {
                    weight: Param::from_tensor(Tensor::zeros([d_in, 2], device)),
                    bias: Some(Param::from_tensor(Tensor::from_data(
                        TensorData::new(vec![half, -half], [2]),
                        device,
                    ))),
                }
            }
        };
        match variant {
            RouterVariant::Linear => Router {
                fc1: None,
                fc2: output(hidden),
            },
            RouterVariant::Mlp => Router {
                fc1: Some(zero_bias(layer(hidden, hidden / 4, true))),
                fc2: output(hidden / 4),
            },
        }
    }

    /// A router that ignores its input and always decides the same way: a zero weight and a
    /// bias of ±1. Static pruning (a removed layer or module) expressed as routing, so that it
    /// is evaluated, saved and served exactly like a trained router.
    pub fn constant(execute: bool, hidden: usize, device: &B::Device) -> Self {
        let bias = if execute { [1.0f32, -1.0] } else { [-1.0, 1.0] };
        Router {
            fc1: None,
            fc2: Linear {
                weight: Param::from_tensor(Tensor::zeros([hidden, 2], device)),
                bias: Some(Param::from_tensor(Tensor::from_data(
                    TensorData::new(bias.to_vec(), [2]),
                    device,
                ))),
            },
        }
    }

    /// Adds `delta` to the SKIP logit's bias: a positive shift makes every token more likely
    /// to skip, and keeps the router's ranking of tokens (calibration, see
    /// `skipgpt_eval::calibrate`).
    pub fn shift_skip_bias(&mut self, delta: f64) {
        let device = self.fc2.weight.device();
        let shift = Tensor::from_data(TensorData::new(vec![0.0f32, delta as f32], [2]), &device);
        let bias = match self.fc2.bias.take() {
            Some(b) => b.val() + shift,
            None => shift,
        };
        self.fc2.bias = Some(Param::from_tensor(bias));
    }

    /// Weight names: `{p}.weight`/`{p}.bias` for `linear` (the fixture's layout),
    /// `{p}.fc1.*` and `{p}.fc2.*` for `mlp`.
    pub fn load(
        variant: RouterVariant,
        hidden: usize,
        w: &WeightSet,
        p: &str,
        device: &B::Device,
    ) -> Result<Self> {
        Ok(match variant {
            RouterVariant::Linear => Router {
                fc1: None,
                fc2: load_linear(w, p, hidden, 2, true, device)?,
            },
            RouterVariant::Mlp => Router {
                fc1: Some(load_linear(
                    w,
                    &format!("{p}.fc1"),
                    hidden,
                    hidden / 4,
                    true,
                    device,
                )?),
                fc2: load_linear(w, &format!("{p}.fc2"), hidden / 4, 2, true, device)?,
            },
        })
    }

    pub fn export(&self, out: &mut std::collections::BTreeMap<String, OwnedTensor>, p: &str) {
        match &self.fc1 {
            None => export_linear(out, p, &self.fc2, StoreDtype::F32),
            Some(fc1) => {
                export_linear(out, &format!("{p}.fc1"), fc1, StoreDtype::F32);
                export_linear(out, &format!("{p}.fc2"), &self.fc2, StoreDtype::F32);
            }
        }
    }

    /// # Shapes
    /// - x: `[batch, seq, hidden]`
    /// - output: `[batch, seq, 2]` (EXECUTE, SKIP)
    pub fn logits(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let x = match &self.fc1 {
            Some(fc1) => activation::relu(linear_forward(fc1, x)),
            None => x,
        };
        linear_forward(&self.fc2, x)
    }

    /// The gate of every token: 1.0 = execute, 0.0 = skip.
    ///
    /// # Shapes
    /// - x: `[batch, seq, hidden]`
    /// - output: `[batch, seq]`
    ///
    /// `noise` (`[batch, seq, 2]`, standard Gumbel) is used by the random modes instead of a
    /// draw from the backend's generator.
    pub fn gate(
        &self,
        x: Tensor<B, 3>,
        routing: Routing,
        noise: Option<Tensor<B, 3>>,
    ) -> Tensor<B, 2> {
        gate_from_logits(self.logits(x), routing, noise)
    }
}

/// Turns router logits `[batch, seq, 2]` into gates `[batch, seq]`. The random modes use
/// `noise` when given, else draw it from the backend's generator.
pub fn gate_from_logits<B: Backend>(
    logits: Tensor<B, 3>,
    routing: Routing,
    noise: Option<Tensor<B, 3>>,
) -> Tensor<B, 2> {
    let [b, t, _] = logits.dims();
    let device = logits.device();
    let noise = || noise.unwrap_or_else(|| gumbel_noise::<B>([b, t, 2], &device));
    match routing {
        Routing::Dense => Tensor::ones([b, t], &device),
        Routing::Deterministic => execute_wins(logits),
        // argmax(z + Gumbel noise) is a draw from softmax(z)
        Routing::Sample => execute_wins(logits + noise()),
        Routing::Gumbel { temperature } => straight_through_gate(logits, noise(), temperature),
    }
}

/// Gumbel noise for every router of a forward pass, drawn on the host from a seed: a pure
/// function of the seed, so a training step draws the same noise whatever else the process
/// does with the backend's generator (parallel runs, a resumed run).
#[derive(Debug, Clone)]
pub struct RouterNoise<B: Backend> {
    /// Per layer: the attention router's and the MLP router's noise, `[batch, seq, 2]` each.
    pub layers: Vec<[Tensor<B, 3>; 2]>,
}

impl<B: Backend> RouterNoise<B> {
    pub fn from_seed(
        seed: u64,
        layers: usize,
        batch: usize,
        seq: usize,
        device: &B::Device,
    ) -> Self {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut draw = || {
            let values: Vec<f32> = (0..batch * seq * 2)
                .map(|_| {
                    let u: f64 = rng.random_range(1e-10..1.0 - 1e-7);
                    -(-(u.ln())).ln() as f32
                })
                .collect();
            Tensor::from_data(TensorData::new(values, [batch, seq, 2]), device)
        };
        RouterNoise {
            layers: (0..layers).map(|_| [draw(), draw()]).collect(),
        }
    }
}

/// 1.0 where logit 0 (EXECUTE) is larger than logit 1 (SKIP), else 0.0.
///
/// # Shapes
/// - logits: `[batch, seq, 2]`
/// - output: `[batch, seq]`
fn execute_wins<B: Backend>(logits: Tensor<B, 3>) -> Tensor<B, 2> {
    let [b, t, _] = logits.dims();
    let execute = logits.clone().slice([0..b, 0..t, 0..1]);
    let skip = logits.slice([0..b, 0..t, 1..2]);
    execute.greater(skip).float().reshape([b, t])
}

/// Hard Gumbel-softmax with a straight-through estimator, given the noise.
///
/// Forward: exactly 1.0 where `argmax(logits + noise)` is EXECUTE, else 0.0.
/// Backward: the gradient of the soft probability `softmax((logits + noise) / τ)[0]`.
///
/// # Shapes
/// - logits, noise: `[batch, seq, 2]`
/// - output: `[batch, seq]`
pub fn straight_through_gate<B: Backend>(
    logits: Tensor<B, 3>,
    noise: Tensor<B, 3>,
    temperature: f64,
) -> Tensor<B, 2> {
    let [b, t, _] = logits.dims();
    let noisy = logits + noise;
    let hard = execute_wins(noisy.clone().detach());
    let soft = activation::softmax(noisy / temperature, 2);
    let p_exec = soft.slice([0..b, 0..t, 0..1]).reshape([b, t]);
    // hard + (p - p): exactly the hard value forward (p - p is exactly 0), p's gradient backward.
    hard + (p_exec.clone() - p_exec.detach())
}

/// Checkpoint names of a layer's routers under `model.layers.{i}.`: the attention slot (with
/// `granularity = layer`, the layer's only router) and the MLP slot.
pub fn router_names(granularity: Granularity) -> (&'static str, Option<&'static str>) {
    match granularity {
        Granularity::Module => ("attn_router", Some("mlp_router")),
        Granularity::Layer => ("router", None),
    }
}

/// Standard Gumbel noise `-ln(-ln U)`, U uniform in (0, 1).
fn gumbel_noise<B: Backend>(shape: [usize; 3], device: &B::Device) -> Tensor<B, 3> {
    let u = Tensor::<B, 3>::random(shape, Distribution::Uniform(1e-10, 1.0 - 1e-7), device);
    u.log().neg().log().neg()
}
