//! A LLaMA-family decoder (LLaMA, Mistral, Qwen2) generic over any Burn backend.
//!
//! Module and field names follow the Hugging Face weight keys
//! (`model.layers.3.self_attn.q_proj.weight`), so loading and saving are a walk over the tree.
//! Linear weights are stored the Burn way, `[d_in, d_out]`: HF's `[d_out, d_in]` is transposed
//! on the way in and out.

use std::collections::BTreeMap;

use burn::module::{Module, Param};
use burn::nn::{Embedding, EmbeddingConfig, Initializer, Linear, LinearConfig};
use burn::tensor::{activation, backend::Backend, Int, Tensor, TensorData};

use crate::cache::KvCache;
use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::lora::{
    export_adapter, load_adapter, AdapterTensors, LoraAdapter, LoraConfig, LoraLinear, PeftAdapter,
};
use crate::rope::{apply_rotary, RotaryEmbedding};
use crate::router::{
    router_names, KvPolicy, MlpRouterInput, Router, RouterInit, RouterNoise, Routing, RoutingConfig,
};
use crate::safetensors_io::{OwnedTensor, StoreDtype, WeightSet};

/// Standard deviation of the normal initialisation (transformers' `initializer_range`).
const INIT_STD: f64 = 0.02;

fn init_linear<B: Backend>(d_in: usize, d_out: usize, bias: bool, device: &B::Device) -> Linear<B> {
    LinearConfig::new(d_in, d_out)
        .with_bias(bias)
        .with_initializer(Initializer::Normal {
            mean: 0.0,
            std: INIT_STD,
        })
        .init(device)
}

/// Loads HF `{name}.weight` `[d_out, d_in]` (and `{name}.bias`) into a Burn linear layer.
pub(crate) fn load_linear<B: Backend>(
    w: &WeightSet,
    name: &str,
    d_in: usize,
    d_out: usize,
    bias: bool,
    device: &B::Device,
) -> Result<Linear<B>> {
    let weight = w.tensor_transposed::<B>(&format!("{name}.weight"), [d_out, d_in], device)?;
    let bias = if bias {
        Some(Param::from_tensor(w.tensor::<B, 1>(
            &format!("{name}.bias"),
            [d_out],
            device,
        )?))
    } else {
        None
    };
    Ok(Linear {
        weight: Param::from_tensor(weight),
        bias,
    })
}

pub(crate) fn export_linear<B: Backend>(
    out: &mut BTreeMap<String, OwnedTensor>,
    name: &str,
    linear: &Linear<B>,
    dtype: StoreDtype,
) {
    out.insert(
        format!("{name}.weight"),
        OwnedTensor::from_tensor(linear.weight.val().transpose(), dtype),
    );
    if let Some(b) = &linear.bias {
        out.insert(
            format!("{name}.bias"),
            OwnedTensor::from_tensor(b.val(), dtype),
        );
    }
}

/// Root-mean-square layer norm: `x / sqrt(mean(x²) + eps) * weight`.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    pub fn new(dim: usize, eps: f64, device: &B::Device) -> Self {
        RmsNorm {
            weight: Param::from_tensor(Tensor::ones([dim], device)),
            eps,
        }
    }

    fn load(w: &WeightSet, name: &str, dim: usize, eps: f64, device: &B::Device) -> Result<Self> {
        Ok(RmsNorm {
            weight: Param::from_tensor(w.tensor(&format!("{name}.weight"), [dim], device)?),
            eps,
        })
    }

    /// # Shapes
    /// - x: `[..., dim]`
    /// - output: like x
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let rms = (x.clone().powi_scalar(2).mean_dim(D - 1) + self.eps).sqrt();
        x / rms * self.weight.val().unsqueeze()
    }
}

/// Added to an attention score to hide a key. Finite, so that two masks can be summed and a
/// row with every key hidden still gives a finite (and then gated-off) output.
pub const MASKED: f32 = -1e9;

/// Per-forward inputs every layer shares: rotary tables and the additive attention mask.
pub struct AttentionContext<B: Backend> {
    pub cos: Tensor<B, 2>,
    pub sin: Tensor<B, 2>,
    /// `[query, key]`: 0 where a query may look, [`MASKED`] where it may not.
    pub mask: Tensor<B, 2>,
}

/// Multi-head attention with grouped key/value heads and rotary positions.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub q_proj: LoraLinear<B>,
    pub k_proj: LoraLinear<B>,
    pub v_proj: LoraLinear<B>,
    pub o_proj: LoraLinear<B>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl<B: Backend> Attention<B> {
    fn init(c: &LlamaConfig, device: &B::Device) -> Self {
        let (h, q, kv) = (
            c.hidden_size,
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        );
        Attention {
            q_proj: init_linear(h, q, c.qkv_bias, device).into(),
            k_proj: init_linear(h, kv, c.qkv_bias, device).into(),
            v_proj: init_linear(h, kv, c.qkv_bias, device).into(),
            o_proj: init_linear(q, h, c.o_bias, device).into(),
            num_heads: c.num_attention_heads,
            num_kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
        }
    }

    fn load(c: &LlamaConfig, w: &WeightSet, p: &str, device: &B::Device) -> Result<Self> {
        let (h, q, kv) = (
            c.hidden_size,
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        );
        Ok(Attention {
            q_proj: load_linear(w, &format!("{p}.q_proj"), h, q, c.qkv_bias, device)?.into(),
            k_proj: load_linear(w, &format!("{p}.k_proj"), h, kv, c.qkv_bias, device)?.into(),
            v_proj: load_linear(w, &format!("{p}.v_proj"), h, kv, c.qkv_bias, device)?.into(),
            o_proj: load_linear(w, &format!("{p}.o_proj"), q, h, c.o_bias, device)?.into(),
            num_heads: c.num_attention_heads,
            num_kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
        })
    }

    fn export(&self, out: &mut BTreeMap<String, OwnedTensor>, p: &str, dtype: StoreDtype) {
        for (name, lin) in [
            ("q_proj", &self.q_proj),
            ("k_proj", &self.k_proj),
            ("v_proj", &self.v_proj),
            ("o_proj", &self.o_proj),
        ] {
            export_linear(out, &format!("{p}.{name}"), &lin.base_layer, dtype);
        }
    }

    /// Keys and values of `x`, rotated, before they enter the cache.
    ///
    /// # Shapes
    /// - x: `[batch, seq, hidden]`
    /// - output: `[batch, kv_heads, seq, head_dim]` twice
    fn project_kv(
        &self,
        x: Tensor<B, 3>,
        ctx: &AttentionContext<B>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [b, t, _] = x.dims();
        let k = self
            .k_proj
            .forward(x.clone())
            .reshape([b, t, self.num_kv_heads, self.head_dim])
            .swap_dims(1, 2);
        let v = self
            .v_proj
            .forward(x)
            .reshape([b, t, self.num_kv_heads, self.head_dim])
            .swap_dims(1, 2);
        (apply_rotary(k, &ctx.cos, &ctx.sin), v)
    }

    /// # Shapes
    /// - x: `[batch, seq, hidden]` (already normed)
    /// - output: `[batch, seq, hidden]`
    ///
    /// With a cache, `x` holds only the new tokens; their keys and values are appended and the
    /// queries attend over everything cached so far.
    ///
    /// `visible` (`[batch, seq]`, 1 or 0) hides the keys of the new tokens marked 0 from every
    /// query (`kv_policy = drop`); the cache remembers it for later steps.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        ctx: &AttentionContext<B>,
        cache: Option<&mut crate::cache::LayerKv<B>>,
        visible: Option<Tensor<B, 2>>,
    ) -> Tensor<B, 3> {
        let [b, t, _] = x.dims();
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let q = self
            .q_proj
            .forward(x.clone())
            .reshape([b, t, nh, hd])
            .swap_dims(1, 2);
        let q = apply_rotary(q, &ctx.cos, &ctx.sin);
        let (k, v) = self.project_kv(x, ctx);
        let (k, v, visible) = match cache {
            Some(cache) => cache.append(k, v, visible),
            None => (k, v, visible),
        };
        // Grouped-query attention without copying K/V: the `n_rep` query heads that share a
        // key/value head are stacked along the sequence axis, `[b, kv, n_rep * t, hd]`.
        let n_rep = nh / nkv;
        let q = q.reshape([b, nkv, n_rep * t, hd]);
        let scale = (hd as f64).powf(-0.5);
        let mut mask = ctx.mask.clone().repeat_dim(0, n_rep).unsqueeze::<4>();
        if let Some(visible) = visible {
            let total = visible.dims()[1];
            let hidden_keys = (visible.neg() + 1.0) * MASKED;
            mask = mask + hidden_keys.reshape([b, 1, 1, total]);
        }
        let scores = q.matmul(k.swap_dims(2, 3)) * scale + mask;
        let probs = activation::softmax(scores, 3);
        let out = probs
            .matmul(v)
            .reshape([b, nh, t, hd])
            .swap_dims(1, 2)
            .reshape([b, t, nh * hd]);
        self.o_proj.forward(out)
    }
}

/// SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub gate_proj: LoraLinear<B>,
    pub up_proj: LoraLinear<B>,
    pub down_proj: LoraLinear<B>,
}

impl<B: Backend> Mlp<B> {
    fn init(c: &LlamaConfig, device: &B::Device) -> Self {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        Mlp {
            gate_proj: init_linear(h, i, c.mlp_bias, device).into(),
            up_proj: init_linear(h, i, c.mlp_bias, device).into(),
            down_proj: init_linear(i, h, c.mlp_bias, device).into(),
        }
    }

    fn load(c: &LlamaConfig, w: &WeightSet, p: &str, device: &B::Device) -> Result<Self> {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        Ok(Mlp {
            gate_proj: load_linear(w, &format!("{p}.gate_proj"), h, i, c.mlp_bias, device)?.into(),
            up_proj: load_linear(w, &format!("{p}.up_proj"), h, i, c.mlp_bias, device)?.into(),
            down_proj: load_linear(w, &format!("{p}.down_proj"), i, h, c.mlp_bias, device)?.into(),
        })
    }

    fn export(&self, out: &mut BTreeMap<String, OwnedTensor>, p: &str, dtype: StoreDtype) {
        for (name, lin) in [
            ("gate_proj", &self.gate_proj),
            ("up_proj", &self.up_proj),
            ("down_proj", &self.down_proj),
        ] {
            export_linear(out, &format!("{p}.{name}"), &lin.base_layer, dtype);
        }
    }

    /// # Shapes
    /// - x: `[..., hidden]`
    /// - output: `[..., hidden]`
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let gate = activation::silu(self.gate_proj.forward(x.clone()));
        self.down_proj.forward(gate * self.up_proj.forward(x))
    }
}

/// One pre-norm transformer block: `h = x + Attn(norm(x))`, `y = h + MLP(norm(h))`.
#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    pub self_attn: Attention<B>,
    pub mlp: Mlp<B>,
    pub input_layernorm: RmsNorm<B>,
    pub post_attention_layernorm: RmsNorm<B>,
    /// SkipGPT router before attention (with `granularity = layer`, the layer's only router).
    pub attn_router: Option<Router<B>>,
    /// SkipGPT router before the MLP (`granularity = module` only).
    pub mlp_router: Option<Router<B>>,
}

/// How one layer routes: taken from the model's [`RoutingConfig`] for every forward pass.
#[derive(Debug, Clone, Copy)]
pub struct LayerRouting {
    pub routing: Routing,
    pub mlp_router_input: MlpRouterInput,
    pub kv_policy: KvPolicy,
}

/// A layer's output and, when routed, its gates `[batch, seq]` (1 = executed).
pub struct LayerOutput<B: Backend> {
    pub hidden: Tensor<B, 3>,
    pub attn_gate: Option<Tensor<B, 2>>,
    pub mlp_gate: Option<Tensor<B, 2>>,
}

impl<B: Backend> DecoderLayer<B> {
    /// Every projection with its path below the layer (`self_attn.q_proj`) and its HF name.
    pub fn projections_mut(&mut self) -> [(&'static str, &'static str, &mut LoraLinear<B>); 7] {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        [
            ("self_attn", "q_proj", &mut a.q_proj),
            ("self_attn", "k_proj", &mut a.k_proj),
            ("self_attn", "v_proj", &mut a.v_proj),
            ("self_attn", "o_proj", &mut a.o_proj),
            ("mlp", "gate_proj", &mut m.gate_proj),
            ("mlp", "up_proj", &mut m.up_proj),
            ("mlp", "down_proj", &mut m.down_proj),
        ]
    }

    /// Read-only [`DecoderLayer::projections_mut`].
    pub fn projections(&self) -> [(&'static str, &'static str, &LoraLinear<B>); 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [
            ("self_attn", "q_proj", &a.q_proj),
            ("self_attn", "k_proj", &a.k_proj),
            ("self_attn", "v_proj", &a.v_proj),
            ("self_attn", "o_proj", &a.o_proj),
            ("mlp", "gate_proj", &m.gate_proj),
            ("mlp", "up_proj", &m.up_proj),
            ("mlp", "down_proj", &m.down_proj),
        ]
    }

    fn init(c: &LlamaConfig, device: &B::Device) -> Self {
        DecoderLayer {
            self_attn: Attention::init(c, device),
            mlp: Mlp::init(c, device),
            input_layernorm: RmsNorm::new(c.hidden_size, c.rms_norm_eps, device),
            post_attention_layernorm: RmsNorm::new(c.hidden_size, c.rms_norm_eps, device),
            attn_router: None,
            mlp_router: None,
        }
    }

    fn load(c: &LlamaConfig, w: &WeightSet, p: &str, device: &B::Device) -> Result<Self> {
        Ok(DecoderLayer {
            self_attn: Attention::load(c, w, &format!("{p}.self_attn"), device)?,
            mlp: Mlp::load(c, w, &format!("{p}.mlp"), device)?,
            input_layernorm: RmsNorm::load(
                w,
                &format!("{p}.input_layernorm"),
                c.hidden_size,
                c.rms_norm_eps,
                device,
            )?,
            post_attention_layernorm: RmsNorm::load(
                w,
                &format!("{p}.post_attention_layernorm"),
                c.hidden_size,
                c.rms_norm_eps,
                device,
            )?,
            attn_router: None,
            mlp_router: None,
        })
    }

    fn export(&self, out: &mut BTreeMap<String, OwnedTensor>, p: &str, dtype: StoreDtype) {
        self.self_attn.export(out, &format!("{p}.self_attn"), dtype);
        self.mlp.export(out, &format!("{p}.mlp"), dtype);
        out.insert(
            format!("{p}.input_layernorm.weight"),
            OwnedTensor::from_tensor(self.input_layernorm.weight.val(), dtype),
        );
        out.insert(
            format!("{p}.post_attention_layernorm.weight"),
            OwnedTensor::from_tensor(self.post_attention_layernorm.weight.val(), dtype),
        );
    }

    /// The gated block: `h = x + g_a·Attn(norm1(x))`, `y = h + g_m·MLP(norm2(h))`.
    /// Without routers, or with [`Routing::Dense`], both gates are 1 and none is returned.
    ///
    /// # Shapes
    /// - x: `[batch, seq, hidden]`
    /// - output: `[batch, seq, hidden]`, gates `[batch, seq]`
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        ctx: &AttentionContext<B>,
        cache: Option<&mut crate::cache::LayerKv<B>>,
        routing: &LayerRouting,
        noise: Option<&[Tensor<B, 3>; 2]>,
    ) -> LayerOutput<B> {
        let routed = routing.routing != Routing::Dense;
        let [attn_noise, mlp_noise] = match noise {
            Some([a, m]) => [Some(a.clone()), Some(m.clone())],
            None => [None, None],
        };
        let attn_gate = match (&self.attn_router, routed) {
            (Some(r), true) => Some(r.gate(x.clone(), routing.routing, attn_noise)),
            _ => None,
        };
        // kv_policy = drop: a token that skips attention lends no key/value to the others.
        let visible = match routing.kv_policy {
            KvPolicy::Drop => attn_gate.clone().map(Tensor::detach),
            KvPolicy::Keep => None,
        };
        let attn =
            self.self_attn
                .forward(self.input_layernorm.forward(x.clone()), ctx, cache, visible);
        let h = match &attn_gate {
            Some(g) => x.clone() + attn * g.clone().unsqueeze_dim(2),
            None => x.clone() + attn,
        };
        let mlp_gate = match (&self.mlp_router, &self.attn_router, routed) {
            (Some(r), _, true) => {
                let input = match routing.mlp_router_input {
                    MlpRouterInput::PostAttn => h.clone(),
                    MlpRouterInput::BlockInput => x,
                };
                Some(r.gate(input, routing.routing, mlp_noise))
            }
            // one router per layer gates both modules
            (None, Some(_), true) => attn_gate.clone(),
            _ => None,
        };
        let mlp = self
            .mlp
            .forward(self.post_attention_layernorm.forward(h.clone()));
        let hidden = match &mlp_gate {
            Some(g) => h + mlp * g.clone().unsqueeze_dim(2),
            None => h + mlp,
        };
        LayerOutput {
            hidden,
            attn_gate,
            mlp_gate,
        }
    }
}

/// The decoder stack without the output head (HF's `model.` prefix).
#[derive(Module, Debug)]
pub struct LlamaModel<B: Backend> {
    pub embed_tokens: Embedding<B>,
    pub layers: Vec<DecoderLayer<B>>,
    pub norm: RmsNorm<B>,
}

/// What a forward pass returns.
pub struct CausalLmOutput<B: Backend> {
    /// Per layer, when routed: 1.0 where the token executed attention, 0.0 where it skipped.
    /// `[batch, seq]` each; with `granularity = layer` equal to `mlp_gates`.
    pub attn_gates: Vec<Tensor<B, 2>>,
    /// Per layer, when routed: the MLP decisions, `[batch, seq]` each.
    pub mlp_gates: Vec<Tensor<B, 2>>,
    /// `[batch, seq, vocab]`
    pub logits: Tensor<B, 3>,
    /// When asked for: the embeddings, then the output of every layer, each
    /// `[batch, seq, hidden]`, exactly as transformers' `output_hidden_states`: the last entry
    /// is taken *after* the final norm (the input of the head).
    pub hidden_states: Vec<Tensor<B, 3>>,
}

/// A causal language model: decoder plus output head (tied to the embeddings or not).
#[derive(Module, Debug)]
pub struct LlamaForCausalLM<B: Backend> {
    pub model: LlamaModel<B>,
    /// `None` when the head is tied to `model.embed_tokens`.
    pub lm_head: Option<Linear<B>>,
    #[module(skip)]
    pub config: LlamaConfig,
    #[module(skip)]
    pub rope: RotaryEmbedding,
    /// Present when the model carries SkipGPT routers (`skipgpt.json`).
    #[module(skip)]
    pub routing_config: Option<RoutingConfig>,
    /// Present when the projections carry LoRA adapters (see [`LlamaForCausalLM::with_lora`]).
    #[module(skip)]
    pub lora_config: Option<LoraConfig>,
    /// How [`LlamaForCausalLM::forward`] routes: deterministic for a routed model unless
    /// changed (`--dense`, `--routing sample`, or Gumbel during training).
    #[module(skip)]
    pub routing: Routing,
}

impl LlamaConfig {
    /// A randomly initialised model (normal(0, 0.02) weights, unit norms), as transformers does.
    pub fn init<B: Backend>(&self, device: &B::Device) -> LlamaForCausalLM<B> {
        let embed_tokens = EmbeddingConfig::new(self.vocab_size, self.hidden_size)
            .with_initializer(Initializer::Normal {
                mean: 0.0,
                std: INIT_STD,
            })
            .init(device);
        LlamaForCausalLM {
            model: LlamaModel {
                embed_tokens,
                layers: (0..self.num_hidden_layers)
                    .map(|_| DecoderLayer::init(self, device))
                    .collect(),
                norm: RmsNorm::new(self.hidden_size, self.rms_norm_eps, device),
            },
            lm_head: (!self.tie_word_embeddings)
                .then(|| init_linear(self.hidden_size, self.vocab_size, false, device)),
            config: self.clone(),
            rope: RotaryEmbedding::new(self),
            routing_config: None,
            lora_config: None,
            routing: Routing::Dense,
        }
    }
}

impl<B: Backend> LlamaForCausalLM<B> {
    /// Builds the model from HF-named weights. Every expected tensor must be present with the
    /// exact shape the config implies.
    pub fn load(config: &LlamaConfig, w: &WeightSet, device: &B::Device) -> Result<Self> {
        let c = config;
        let embed = w.matrix::<B>(
            "model.embed_tokens.weight",
            [c.vocab_size, c.hidden_size],
            device,
        )?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| DecoderLayer::load(c, w, &format!("model.layers.{i}"), device))
            .collect::<Result<Vec<_>>>()?;
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(load_linear(
                w,
                "lm_head",
                c.hidden_size,
                c.vocab_size,
                false,
                device,
            )?)
        };
        Ok(LlamaForCausalLM {
            model: LlamaModel {
                embed_tokens: Embedding {
                    weight: Param::from_tensor(embed),
                },
                layers,
                norm: RmsNorm::load(w, "model.norm", c.hidden_size, c.rms_norm_eps, device)?,
            },
            lm_head,
            config: c.clone(),
            rope: RotaryEmbedding::new(c),
            routing_config: None,
            lora_config: None,
            routing: Routing::Dense,
        })
    }

    /// Adds freshly initialised routers (replacing any; the paper's start, [`RouterInit::Paper`])
    /// and switches to deterministic routing.
    pub fn with_new_routers(self, routing: RoutingConfig) -> Self {
        self.with_new_routers_from(routing, RouterInit::Paper)
    }

    /// New routers for every layer, started as `init` says.
    pub fn with_new_routers_from(mut self, routing: RoutingConfig, init: RouterInit) -> Self {
        let device = self.device();
        let h = self.config.hidden_size;
        let (_, mlp_slot) = router_names(routing.granularity);
        for layer in self.model.layers.iter_mut() {
            layer.attn_router = Some(Router::init(routing.router, h, init, &device));
            layer.mlp_router = mlp_slot.map(|_| Router::init(routing.router, h, init, &device));
        }
        self.routing_config = Some(routing);
        self.routing = Routing::Deterministic;
        self
    }

    /// Static pruning as routing: layer `i` runs attention iff `attn_exec[i]` and its MLP iff
    /// `mlp_exec[i]`, for every token (constant routers). Skipped attention leaves no keys or
    /// values (`kv_policy = drop`): nothing reads them, so nothing computes or caches them.
    pub fn with_static_routes(mut self, attn_exec: &[bool], mlp_exec: &[bool]) -> Result<Self> {
        let layers = self.config.num_hidden_layers;
        if attn_exec.len() != layers || mlp_exec.len() != layers {
            return Err(ModelError::InvalidInput(format!(
                "static routes for {} attention and {} MLP modules, the model has {layers} layers",
                attn_exec.len(),
                mlp_exec.len()
            )));
        }
        let device = self.device();
        let h = self.config.hidden_size;
        for (i, layer) in self.model.layers.iter_mut().enumerate() {
            layer.attn_router = Some(Router::constant(attn_exec[i], h, &device));
            layer.mlp_router = Some(Router::constant(mlp_exec[i], h, &device));
        }
        let (pa, pm) = (self.config.attention_params(), self.config.mlp_params());
        let skipped: usize = attn_exec.iter().filter(|&&e| !e).count() * pa
            + mlp_exec.iter().filter(|&&e| !e).count() * pm;
        self.routing_config = Some(
            RoutingConfig::new()
                .with_kv_policy(KvPolicy::Drop)
                .with_mlp_router_input(MlpRouterInput::BlockInput)
                .with_target_sparsity(skipped as f64 / (layers * (pa + pm)) as f64),
        );
        self.routing = Routing::Deterministic;
        Ok(self)
    }

    /// Loads routers saved by [`LlamaForCausalLM::export_routers`] (`routers.safetensors`).
    pub fn load_routers(mut self, routing: RoutingConfig, w: &WeightSet) -> Result<Self> {
        let device = self.device();
        let h = self.config.hidden_size;
        let (attn_slot, mlp_slot) = router_names(routing.granularity);
        for (i, layer) in self.model.layers.iter_mut().enumerate() {
            let load = |name: &str| {
                Router::load(
                    routing.router,
                    h,
                    w,
                    &format!("model.layers.{i}.{name}"),
                    &device,
                )
            };
            layer.attn_router = Some(load(attn_slot)?);
            layer.mlp_router = mlp_slot.map(load).transpose()?;
        }
        self.routing_config = Some(routing);
        self.routing = Routing::Deterministic;
        Ok(self)
    }

    /// The router weights under their checkpoint names (f32).
    pub fn export_routers(&self) -> BTreeMap<String, OwnedTensor> {
        let mut out = BTreeMap::new();
        let Some(routing) = &self.routing_config else {
            return out;
        };
        let (attn_slot, mlp_slot) = router_names(routing.granularity);
        for (i, layer) in self.model.layers.iter().enumerate() {
            let slots = [
                (&layer.attn_router, Some(attn_slot)),
                (&layer.mlp_router, mlp_slot),
            ];
            for (router, name) in slots {
                if let (Some(r), Some(name)) = (router, name) {
                    r.export(&mut out, &format!("model.layers.{i}.{name}"));
                }
            }
        }
        out
    }

    /// Attaches fresh LoRA adapters (A small and random, B zero: the function is unchanged)
    /// to the projections `cfg` targets, replacing any adapters there were.
    ///
    /// The adapters require gradients whatever the rest does: freeze first (`no_grad()` for
    /// stage 2, [`LlamaForCausalLM::freeze_base`] for the joint variant), then attach.
    pub fn with_lora(mut self, cfg: LoraConfig) -> Result<Self> {
        cfg.validate()?;
        let device = self.device();
        for layer in self.model.layers.iter_mut() {
            for (_, name, proj) in layer.projections_mut() {
                proj.lora = cfg.applies_to(name).then(|| {
                    let [d_in, d_out] = proj.dims();
                    LoraAdapter::init(d_in, d_out, &cfg, &device)
                });
            }
        }
        self.lora_config = Some(cfg);
        Ok(self)
    }

    /// Attaches the adapters of a PEFT directory (see [`crate::lora::load_peft_adapter`]).
    /// Every targeted projection of every layer must be there with the right shape, and the
    /// file may hold nothing else.
    pub fn load_lora(mut self, adapter: &PeftAdapter) -> Result<Self> {
        let cfg = adapter.config.clone();
        let device = self.device();
        let mut expected = 0;
        for (i, layer) in self.model.layers.iter_mut().enumerate() {
            for (block, name, proj) in layer.projections_mut() {
                proj.lora = if cfg.applies_to(name) {
                    expected += 2;
                    let module = format!("model.layers.{i}.{block}.{name}");
                    Some(load_adapter(
                        &adapter.weights,
                        &module,
                        proj.dims(),
                        &cfg,
                        &device,
                    )?)
                } else {
                    None
                };
            }
        }
        let found: Vec<&str> = adapter.weights.names().collect();
        if found.len() != expected {
            let first_unknown = found
                .iter()
                .find(|n| {
                    !(0..self.config.num_hidden_layers)
                        .any(|i| n.starts_with(&format!("base_model.model.model.layers.{i}.")))
                })
                .map_or(String::new(), |n| format!(", e.g. `{n}`"));
            return Err(ModelError::InvalidInput(format!(
                "{}: {} adapter tensors, expected {expected} ({} layers × {} targets × A and B){first_unknown}",
                adapter.dir.display(),
                found.len(),
                self.config.num_hidden_layers,
                cfg.targets.len()
            )));
        }
        self.lora_config = Some(cfg);
        Ok(self)
    }

    /// The adapters under their PEFT names (`[r, in]` and `[out, r]`, f32).
    pub fn export_lora(&self) -> AdapterTensors {
        let mut out = AdapterTensors::new();
        for (i, layer) in self.model.layers.iter().enumerate() {
            for (block, name, proj) in layer.projections() {
                if let Some(adapter) = &proj.lora {
                    export_adapter(
                        &mut out,
                        &format!("model.layers.{i}.{block}.{name}"),
                        adapter,
                    );
                }
            }
        }
        out
    }

    /// Folds every adapter into its base weight: a plain model computing the same function.
    pub fn merge_lora(mut self) -> Self {
        for layer in self.model.layers.iter_mut() {
            for (_, _, proj) in layer.projections_mut() {
                proj.merge();
            }
        }
        self.lora_config = None;
        self
    }

    /// Number of adapter parameters.
    pub fn lora_params(&self) -> usize {
        self.model
            .layers
            .iter()
            .flat_map(|l| l.projections())
            .filter_map(|(_, _, p)| p.lora.as_ref())
            .map(|a| a.num_params())
            .sum()
    }

    /// Stage 1 (router tuning): every base weight stops requiring gradients; routers keep
    /// theirs, so an optimizer can only move the routers.
    pub fn freeze_base(mut self) -> Self {
        let routers: Vec<_> = self
            .model
            .layers
            .iter_mut()
            .map(|l| (l.attn_router.take(), l.mlp_router.take()))
            .collect();
        self = self.no_grad();
        for (layer, (a, m)) in self.model.layers.iter_mut().zip(routers) {
            layer.attn_router = a;
            layer.mlp_router = m;
        }
        self
    }

    /// Number of router parameters.
    pub fn router_params(&self) -> usize {
        self.model
            .layers
            .iter()
            .flat_map(|l| [&l.attn_router, &l.mlp_router])
            .flatten()
            .map(|r| r.num_params())
            .sum()
    }

    /// Every weight under its HF name, ready for `model.safetensors`.
    pub fn export(&self, dtype: StoreDtype) -> BTreeMap<String, OwnedTensor> {
        let mut out = BTreeMap::new();
        out.insert(
            "model.embed_tokens.weight".into(),
            OwnedTensor::from_tensor(self.model.embed_tokens.weight.val(), dtype),
        );
        for (i, layer) in self.model.layers.iter().enumerate() {
            layer.export(&mut out, &format!("model.layers.{i}"), dtype);
        }
        out.insert(
            "model.norm.weight".into(),
            OwnedTensor::from_tensor(self.model.norm.weight.val(), dtype),
        );
        if let Some(head) = &self.lm_head {
            export_linear(&mut out, "lm_head", head, dtype);
        }
        out
    }

    pub fn device(&self) -> B::Device {
        self.model.embed_tokens.weight.val().device()
    }

    /// Rotary tables and causal (optionally sliding-window) mask for `len` new tokens after
    /// `start` cached ones.
    pub fn attention_context(&self, start: usize, len: usize) -> AttentionContext<B> {
        let device = self.device();
        let (cos, sin) = self.rope.cos_sin(start, len, &device);
        let total = start + len;
        let window = self.config.sliding_window.unwrap_or(usize::MAX);
        let mut mask = Vec::with_capacity(len * total);
        for i in 0..len {
            let pos = start + i;
            for j in 0..total {
                let visible = j <= pos && pos - j < window;
                mask.push(if visible { 0.0f32 } else { MASKED });
            }
        }
        let mask = Tensor::from_data(TensorData::new(mask, [len, total]), &device);
        AttentionContext { cos, sin, mask }
    }

    /// Logits for every position.
    ///
    /// # Shapes
    /// - input_ids: `[batch, seq]`
    /// - output: `[batch, seq, vocab]`
    pub fn forward(
        &self,
        input_ids: Tensor<B, 2, Int>,
        cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        self.forward_full(input_ids, cache, false).logits
    }

    /// The forward pass with the model's own routing mode, optionally keeping every layer's
    /// output.
    pub fn forward_full(
        &self,
        input_ids: Tensor<B, 2, Int>,
        cache: Option<&mut KvCache<B>>,
        output_hidden_states: bool,
    ) -> CausalLmOutput<B> {
        self.forward_routed(input_ids, cache, self.routing, output_hidden_states)
    }

    /// The forward pass with an explicit routing mode (ignored when there are no routers).
    pub fn forward_routed(
        &self,
        input_ids: Tensor<B, 2, Int>,
        cache: Option<&mut KvCache<B>>,
        routing: Routing,
        output_hidden_states: bool,
    ) -> CausalLmOutput<B> {
        self.forward_with_noise(input_ids, cache, routing, output_hidden_states, None)
    }

    /// [`LlamaForCausalLM::forward_routed`] with the random routing modes drawing from
    /// `noise` rather than from the backend's generator (training: reproducible steps).
    pub fn forward_with_noise(
        &self,
        input_ids: Tensor<B, 2, Int>,
        mut cache: Option<&mut KvCache<B>>,
        routing: Routing,
        output_hidden_states: bool,
        noise: Option<&RouterNoise<B>>,
    ) -> CausalLmOutput<B> {
        let [_, t] = input_ids.dims();
        let start = cache.as_ref().map_or(0, |c| c.len());
        let ctx = self.attention_context(start, t);
        let layer_routing = self.layer_routing(routing);
        let mut x = crate::precision::embed(&self.model.embed_tokens, input_ids);
        let mut hidden_states = Vec::new();
        let (mut attn_gates, mut mlp_gates) = (Vec::new(), Vec::new());
        for (i, layer) in self.model.layers.iter().enumerate() {
            if output_hidden_states {
                hidden_states.push(x.clone());
            }
            let out = layer.forward(
                x,
                &ctx,
                cache.as_deref_mut().map(|c| c.layer(i)),
                &layer_routing,
                noise.map(|n| &n.layers[i]),
            );
            x = out.hidden;
            attn_gates.extend(out.attn_gate);
            mlp_gates.extend(out.mlp_gate);
        }
        if let Some(c) = cache {
            c.advance(t);
        }
        let x = self.model.norm.forward(x);
        if output_hidden_states {
            hidden_states.push(x.clone());
        }
        CausalLmOutput {
            logits: self.head(x),
            hidden_states,
            attn_gates,
            mlp_gates,
        }
    }

    /// What every layer needs to know to route with `routing` (dense without routers).
    pub fn layer_routing(&self, routing: Routing) -> LayerRouting {
        match &self.routing_config {
            Some(rc) => LayerRouting {
                routing,
                mlp_router_input: rc.mlp_router_input,
                kv_policy: rc.kv_policy,
            },
            None => LayerRouting {
                routing: Routing::Dense,
                mlp_router_input: MlpRouterInput::default(),
                kv_policy: KvPolicy::default(),
            },
        }
    }

    /// The output projection, `[.., hidden] -> [.., vocab]`.
    pub fn head(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.lm_head {
            Some(head) => crate::precision::linear_forward(head, x),
            None => {
                // [vocab, hidden] · [hidden, rows]: the tied embedding is read in its stored
                // layout (a transposed view of it would be copied by some backends on every
                // call); only the few activation rows are transposed
                let [b, t, h] = x.dims();
                let w = self.model.embed_tokens.weight.val();
                let vocab = w.dims()[0];
                crate::precision::matmul_weight_rows(w, x.reshape([b * t, h]))
                    .transpose()
                    .reshape([b, t, vocab])
            }
        }
    }

    pub fn new_cache(&self) -> KvCache<B> {
        KvCache::new(self.config.num_hidden_layers)
    }
}
