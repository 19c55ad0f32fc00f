//! The SkipGPT block: a pre-norm LLaMA decoder layer whose attention and MLP are each gated
//! by a router, `h = x + g_a·Attn(norm1(x))`, `y = h + g_m·MLP(norm2(h))`.
//!
//! This is the gated (training and reference) form: every module runs and a skipped token's
//! output is multiplied by zero, which is what gradients need. Inference that skips the work
//! for real is [`crate::sparse`], which takes the same decisions from the same routers.

use burn::module::Module;
use burn::tensor::{backend::Backend, Tensor};

use super::layers::{Attention, AttentionContext, Mlp, RmsNorm};
use crate::config::LlamaConfig;
use crate::lora::LoraLinear;
use crate::router::{KvPolicy, MlpRouterInput, Router, Routing};

/// One pre-norm transformer block, `h = x + Attn(norm(x))`, `y = h + MLP(norm(h))`, with the
/// SkipGPT routers that gate its two modules.
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

/// How one layer routes: taken from the model's [`crate::RoutingConfig`] for every forward pass.
#[derive(Debug, Clone, Copy)]
pub struct LayerRouting {
    pub routing: Routing,
    pub mlp_router_input: MlpRouterInput,
    pub kv_policy: KvPolicy,
}

impl LayerRouting {
    /// Whether the routers decide at all ([`Routing::Dense`] runs every module).
    pub fn is_routed(&self) -> bool {
        self.routing != Routing::Dense
    }

    /// The state the MLP router reads: the post-attention one (the paper) or the block input
    /// (the reference code).
    pub fn mlp_router_reads<T>(&self, post_attn: T, block_input: T) -> T {
        match self.mlp_router_input {
            MlpRouterInput::PostAttn => post_attn,
            MlpRouterInput::BlockInput => block_input,
        }
    }
}

/// Who decides whether a token runs one module of a layer. The gated forward and the sparse
/// engine both ask the layer, so they take the same decisions from the same routers.
pub enum Decider<'a, B: Backend> {
    /// Every token runs it: no router, or dense routing.
    Everyone,
    /// This router decides.
    Router(&'a Router<B>),
    /// The attention router's decision (`granularity = layer`: one router gates both modules).
    SameAsAttention,
}

/// A layer's output and, when routed, its gates `[batch, seq]` (1 = executed).
pub struct LayerOutput<B: Backend> {
    /// `y`, the layer's output.
    pub hidden: Tensor<B, 3>,
    /// `h`, the residual stream between attention and the MLP (Block Influence measures
    /// attention by it).
    pub post_attention: Tensor<B, 3>,
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

    /// Who decides which tokens run attention.
    pub fn attn_decider(&self, routing: &LayerRouting) -> Decider<'_, B> {
        match (&self.attn_router, routing.is_routed()) {
            (Some(r), true) => Decider::Router(r),
            _ => Decider::Everyone,
        }
    }

    /// Who decides which tokens run the MLP.
    pub fn mlp_decider(&self, routing: &LayerRouting) -> Decider<'_, B> {
        match (&self.mlp_router, &self.attn_router, routing.is_routed()) {
            (Some(r), _, true) => Decider::Router(r),
            (None, Some(_), true) => Decider::SameAsAttention,
            _ => Decider::Everyone,
        }
    }

    pub(super) fn init(c: &LlamaConfig, device: &B::Device) -> Self {
        DecoderLayer {
            self_attn: Attention::init(c, device),
            mlp: Mlp::init(c, device),
            input_layernorm: RmsNorm::new(c.hidden_size, c.rms_norm_eps, device),
            post_attention_layernorm: RmsNorm::new(c.hidden_size, c.rms_norm_eps, device),
            attn_router: None,
            mlp_router: None,
        }
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
        routing: &LayerRouting,
        noise: Option<&[Tensor<B, 3>; 2]>,
    ) -> LayerOutput<B> {
        let [attn_noise, mlp_noise] = match noise {
            Some([a, m]) => [Some(a.clone()), Some(m.clone())],
            None => [None, None],
        };
        let attn_gate = match self.attn_decider(routing) {
            Decider::Router(r) => Some(r.gate(x.clone(), routing.routing, attn_noise)),
            Decider::Everyone | Decider::SameAsAttention => None,
        };
        // kv_policy = drop: a token that skips attention lends no key/value to the others.
        let visible = match routing.kv_policy {
            KvPolicy::Drop => attn_gate.clone().map(Tensor::detach),
            KvPolicy::Keep => None,
        };
        let attn = self
            .self_attn
            .forward(self.input_layernorm.forward(x.clone()), ctx, visible);
        let h = match &attn_gate {
            Some(g) => x.clone() + attn * g.clone().unsqueeze_dim(2),
            None => x.clone() + attn,
        };
        let mlp_gate = match self.mlp_decider(routing) {
            Decider::Router(r) => {
                let input = routing.mlp_router_reads(h.clone(), x);
                Some(r.gate(input, routing.routing, mlp_noise))
            }
            Decider::SameAsAttention => attn_gate.clone(),
            Decider::Everyone => None,
        };
        let mlp = self
            .mlp
            .forward(self.post_attention_layernorm.forward(h.clone()));
        let hidden = match &mlp_gate {
            Some(g) => h.clone() + mlp * g.clone().unsqueeze_dim(2),
            None => h.clone() + mlp,
        };
        LayerOutput {
            hidden,
            post_attention: h,
            attn_gate,
            mlp_gate,
        }
    }
}
