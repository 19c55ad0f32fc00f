//! Loading and saving the decoder's weights under their Hugging Face names
//! (`model.layers.3.self_attn.q_proj.weight`). Every expected tensor must be there with the
//! shape the config implies; the reader names the tensor and the file when one is not.
//!
//! Why by hand and not through burn-store's module snapshots (as llama-burn does): burn-store
//! 0.21's `SafetensorsStore` reads one file, and HF checkpoints above a few GB come as shards
//! under `model.safetensors.index.json`, which `WeightSet` maps tensor by tensor; its errors
//! say "Tensor not found: NAME" without the file or the shape the config implies; and the
//! checkpoint's names are not one module tree's (a tied head has no `lm_head.weight`, Qwen2
//! adds biases, routers and PEFT adapters live in files of their own with their own names).
//! Remapping and filtering would absorb the names, not the shards or the messages. The
//! per-module `load`/`export` pairs below are each a few lines over `WeightSet`.

use std::collections::BTreeMap;

use burn::module::Param;
use burn::nn::Embedding;
use burn::tensor::{backend::Backend, Tensor, TensorData};

use super::{Attention, DecoderLayer, LlamaForCausalLM, LlamaModel, Mlp, RmsNorm};
use crate::config::LlamaConfig;
use crate::error::Result;
use crate::io::safetensors_io::{OwnedTensor, StoreDtype};
use crate::io::weight_source::WeightSource;
use crate::linear::export_with_weight;
use crate::lora::LoraLinear;
use crate::quantized::{keeps_quantized, QuantWeight};
use crate::rope::RotaryEmbedding;
use crate::router::Routing;

impl<B: Backend> RmsNorm<B> {
    pub(super) fn load(
        w: &impl WeightSource,
        name: &str,
        dim: usize,
        eps: f64,
        device: &B::Device,
    ) -> Result<Self> {
        Ok(RmsNorm {
            weight: Param::from_tensor(w.tensor(&format!("{name}.weight"), [dim], device)?),
            eps,
        })
    }
}

impl<B: Backend> Attention<B> {
    pub(super) fn load(
        c: &LlamaConfig,
        w: &impl WeightSource,
        p: &str,
        device: &B::Device,
    ) -> Result<Self> {
        let (h, q, kv) = (
            c.hidden_size,
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        );
        Ok(Attention {
            q_proj: LoraLinear::load(w, &format!("{p}.q_proj"), [h, q], c.qkv_bias, device)?,
            k_proj: LoraLinear::load(w, &format!("{p}.k_proj"), [h, kv], c.qkv_bias, device)?,
            v_proj: LoraLinear::load(w, &format!("{p}.v_proj"), [h, kv], c.qkv_bias, device)?,
            o_proj: LoraLinear::load(w, &format!("{p}.o_proj"), [q, h], c.o_bias, device)?,
            num_heads: c.num_attention_heads,
            num_kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
        })
    }
}

impl<B: Backend> Mlp<B> {
    pub(super) fn load(
        c: &LlamaConfig,
        w: &impl WeightSource,
        p: &str,
        device: &B::Device,
    ) -> Result<Self> {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        Ok(Mlp {
            gate_proj: LoraLinear::load(w, &format!("{p}.gate_proj"), [h, i], c.mlp_bias, device)?,
            up_proj: LoraLinear::load(w, &format!("{p}.up_proj"), [h, i], c.mlp_bias, device)?,
            down_proj: LoraLinear::load(w, &format!("{p}.down_proj"), [i, h], c.mlp_bias, device)?,
        })
    }
}

impl<B: Backend> DecoderLayer<B> {
    pub(super) fn load(
        c: &LlamaConfig,
        w: &impl WeightSource,
        p: &str,
        device: &B::Device,
    ) -> Result<Self> {
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

    pub(super) fn export(
        &self,
        out: &mut BTreeMap<String, OwnedTensor>,
        p: &str,
        dtype: StoreDtype,
    ) {
        for (module, name, lin) in self.projections() {
            export_projection(out, &format!("{p}.{module}.{name}"), lin, dtype);
        }
        out.insert(
            format!("{p}.input_layernorm.weight"),
            OwnedTensor::from_tensor(self.input_layernorm.weight.val(), dtype),
        );
        out.insert(
            format!("{p}.post_attention_layernorm.weight"),
            OwnedTensor::from_tensor(self.post_attention_layernorm.weight.val(), dtype),
        );
    }
}

impl<B: Backend> LlamaForCausalLM<B> {
    /// Builds the model from HF-named weights. Every expected tensor must be present with the
    /// exact shape the config implies.
    pub fn load(config: &LlamaConfig, w: &impl WeightSource, device: &B::Device) -> Result<Self> {
        let c = config;
        let (embed_tokens, embed_quantized) = load_embedding(c, w, device)?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| DecoderLayer::load(c, w, &format!("model.layers.{i}"), device))
            .collect::<Result<Vec<_>>>()?;
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            let dims = [c.hidden_size, c.vocab_size];
            Some(LoraLinear::load(w, "lm_head", dims, false, device)?)
        };
        Ok(LlamaForCausalLM {
            model: LlamaModel {
                embed_tokens,
                embed_quantized,
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

    /// Every weight under its HF name, ready for `model.safetensors`.
    pub fn export(&self, dtype: StoreDtype) -> BTreeMap<String, OwnedTensor> {
        let mut out = BTreeMap::new();
        out.insert(
            "model.embed_tokens.weight".into(),
            OwnedTensor::from_tensor(self.model.dense_embedding(), dtype),
        );
        for (i, layer) in self.model.layers.iter().enumerate() {
            layer.export(&mut out, &format!("model.layers.{i}"), dtype);
        }
        out.insert(
            "model.norm.weight".into(),
            OwnedTensor::from_tensor(self.model.norm.weight.val(), dtype),
        );
        if let Some(head) = &self.lm_head {
            export_projection(&mut out, "lm_head", head, dtype);
        }
        out
    }
}

/// The embedding table `[vocab, hidden]`: kept in its block format where the source stores it
/// so and the backend computes with it (the `Embedding` then holds `[vocab, 0]`).
fn load_embedding<B: Backend>(
    c: &LlamaConfig,
    w: &impl WeightSource,
    device: &B::Device,
) -> Result<(Embedding<B>, Option<QuantWeight>)> {
    let (name, shape) = ("model.embed_tokens.weight", [c.vocab_size, c.hidden_size]);
    if keeps_quantized::<B>() {
        if let Some(table) = w.quantized(name, shape)? {
            let weight = Param::from_tensor(Tensor::zeros([c.vocab_size, 0], device));
            return Ok((Embedding { weight }, Some(table)));
        }
    }
    let weight = Param::from_tensor(w.matrix::<B>(name, shape, device)?);
    Ok((Embedding { weight }, None))
}

/// Writes a projection's HF weight (a quantized one dequantized) and bias.
fn export_projection<B: Backend>(
    out: &mut BTreeMap<String, OwnedTensor>,
    name: &str,
    lin: &LoraLinear<B>,
    dtype: StoreDtype,
) {
    export_with_weight(out, name, lin.dense_weight(), &lin.base_layer, dtype);
}

impl<B: Backend> LlamaModel<B> {
    /// The embedding table `[vocab, hidden]` as a float tensor (a quantized one dequantized).
    pub fn dense_embedding(&self) -> Tensor<B, 2> {
        match &self.embed_quantized {
            Some(table) => {
                let device = self.embed_tokens.weight.device();
                Tensor::from_data(TensorData::new(table.dequantize(), table.dims()), &device)
            }
            None => self.embed_tokens.weight.val(),
        }
    }
}
