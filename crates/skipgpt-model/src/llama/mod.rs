//! A LLaMA-family decoder (LLaMA, Mistral, Qwen2) generic over any Burn backend.
//!
//! Module and field names follow the Hugging Face weight keys
//! (`model.layers.3.self_attn.q_proj.weight`), so loading and saving are a walk over the tree.
//! Linear weights are stored the Burn way, `[d_in, d_out]`: HF's `[d_out, d_in]` is transposed
//! on the way in and out.
//!
//! - [`layers`]: RMSNorm, attention and the MLP;
//! - [`block`]: the decoder layer, gated by its SkipGPT routers;
//! - this file: the model, its forward passes and the output head;
//! - [`weights`]: loading and saving the weights under their HF names;
//! - [`routers`], [`adapters`]: attaching SkipGPT routers and LoRA adapters.

pub mod adapters;
pub mod block;
pub mod layers;
pub mod routers;
pub mod weights;

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, Initializer};
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};

pub use block::{Decider, DecoderLayer, LayerOutput, LayerRouting};
pub(crate) use layers::{grouped_query_attention, KeyMask};
pub use layers::{Attention, AttentionContext, Mlp, RmsNorm, MASKED};

use crate::config::LlamaConfig;
use crate::linear::{init_linear, INIT_STD};
use crate::lora::{LoraConfig, LoraLinear};
use crate::quantized::QuantWeight;
use crate::rope::RotaryEmbedding;
use crate::router::{RouterNoise, Routing, RoutingConfig};

/// The decoder stack without the output head (HF's `model.` prefix).
#[derive(Module, Debug)]
pub struct LlamaModel<B: Backend> {
    pub embed_tokens: Embedding<B>,
    /// The embedding table in a block format (a model run from a quantized GGUF on the CPU
    /// backend), in place of `embed_tokens`' (then `[vocab, 0]`): rows are dequantized as
    /// they are looked up, and a tied head multiplies with the blocks.
    pub embed_quantized: Option<QuantWeight>,
    pub layers: Vec<DecoderLayer<B>>,
    pub norm: RmsNorm<B>,
}

impl<B: Backend> LlamaModel<B> {
    /// The embeddings of `ids`, in f32.
    ///
    /// # Shapes
    /// - ids: `[batch, seq]`
    /// - output: `[batch, seq, hidden]`
    pub fn embed(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let Some(table) = &self.embed_quantized else {
            return crate::precision::embed(&self.embed_tokens, ids);
        };
        let [b, t] = ids.dims();
        let device = ids.device();
        let rows: Vec<usize> = ids
            .into_data()
            .convert::<i64>()
            .into_vec::<i64>()
            .expect("integer ids")
            .into_iter()
            .map(|id| id as usize)
            .collect();
        let hidden = table.dims()[1];
        Tensor::from_data(TensorData::new(table.rows(&rows), [b, t, hidden]), &device)
    }
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
    pub lm_head: Option<LoraLinear<B>>,
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
                embed_quantized: None,
                layers: (0..self.num_hidden_layers)
                    .map(|_| DecoderLayer::init(self, device))
                    .collect(),
                norm: RmsNorm::new(self.hidden_size, self.rms_norm_eps, device),
            },
            lm_head: (!self.tie_word_embeddings)
                .then(|| init_linear(self.hidden_size, self.vocab_size, false, device).into()),
            config: self.clone(),
            rope: RotaryEmbedding::new(self),
            routing_config: None,
            lora_config: None,
            routing: Routing::Dense,
        }
    }
}

impl<B: Backend> LlamaForCausalLM<B> {
    pub fn device(&self) -> B::Device {
        self.model.embed_tokens.weight.val().device()
    }

    /// Rotary tables and causal (optionally sliding-window) mask for a sequence of `len`
    /// tokens from position 0.
    pub fn attention_context(&self, len: usize) -> AttentionContext<B> {
        let device = self.device();
        let (cos, sin) = self.rope.cos_sin(0, len, &device);
        let mut mask = Vec::with_capacity(len * len);
        for query in 0..len {
            for key in 0..len {
                let visible = self.config.sees(query, key);
                mask.push(if visible { 0.0f32 } else { MASKED });
            }
        }
        let mask = Tensor::from_data(TensorData::new(mask, [len, len]), &device);
        AttentionContext { cos, sin, mask }
    }

    /// Logits for every position. The gated forward passes read the whole sequence and keep
    /// no cache: they are what training differentiates and the reference the sparse engine
    /// ([`crate::sparse`], which decodes incrementally) is tested against.
    ///
    /// # Shapes
    /// - input_ids: `[batch, seq]`
    /// - output: `[batch, seq, vocab]`
    pub fn forward(&self, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.forward_full(input_ids, false).logits
    }

    /// The forward pass with the model's own routing mode, optionally keeping every layer's
    /// output.
    pub fn forward_full(
        &self,
        input_ids: Tensor<B, 2, Int>,
        output_hidden_states: bool,
    ) -> CausalLmOutput<B> {
        self.forward_routed(input_ids, self.routing, output_hidden_states)
    }

    /// The forward pass with an explicit routing mode (ignored when there are no routers).
    pub fn forward_routed(
        &self,
        input_ids: Tensor<B, 2, Int>,
        routing: Routing,
        output_hidden_states: bool,
    ) -> CausalLmOutput<B> {
        self.forward_with_noise(input_ids, routing, output_hidden_states, None)
    }

    /// [`LlamaForCausalLM::forward_routed`] with the random routing modes drawing from
    /// `noise` rather than from the backend's generator (training: reproducible steps).
    pub fn forward_with_noise(
        &self,
        input_ids: Tensor<B, 2, Int>,
        routing: Routing,
        output_hidden_states: bool,
        noise: Option<&RouterNoise<B>>,
    ) -> CausalLmOutput<B> {
        let [_, t] = input_ids.dims();
        let ctx = self.attention_context(t);
        let layer_routing = self.layer_routing(routing);
        let mut x = self.model.embed(input_ids);
        let mut hidden_states = Vec::new();
        let (mut attn_gates, mut mlp_gates) = (Vec::new(), Vec::new());
        for (i, layer) in self.model.layers.iter().enumerate() {
            if output_hidden_states {
                hidden_states.push(x.clone());
            }
            let out = layer.forward(x, &ctx, &layer_routing, noise.map(|n| &n.layers[i]));
            x = out.hidden;
            attn_gates.extend(out.attn_gate);
            mlp_gates.extend(out.mlp_gate);
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

    /// The output projection, `[.., hidden] -> [.., vocab]`.
    pub fn head(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        match (&self.lm_head, &self.model.embed_quantized) {
            (Some(head), _) => head.forward(x),
            (None, Some(table)) => table.forward(x),
            (None, None) => {
                // [vocab, hidden] · [hidden, rows]: the tied embedding is read in its stored
                // layout (a transposed view of it would be copied by some backends on every
                // call); only the few activation rows are transposed
                let [b, t, h] = x.dims();
                let w = self.model.embed_tokens.weight.val();
                let vocab = w.dims()[0];
                let x = x.reshape([b * t, h]);
                crate::dispatch::times_weight_t(x, w).reshape([b, t, vocab])
            }
        }
    }
}
