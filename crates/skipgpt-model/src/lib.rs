//! # skipgpt-model
//!
//! A LLaMA-family decoder on Burn, generic over the backend, that loads and saves Hugging Face
//! checkpoints: the base on which SkipGPT routers, LoRA and sparse execution are built.
//!
//! - [`config`]: `config.json` (transformers 4.x and 5.x layouts) → [`LlamaConfig`];
//! - [`llama`]: the model, its modules named like the HF weight keys;
//! - [`router`]: the SkipGPT routers, their gates (Gumbel, straight-through, deterministic,
//!   sampled) and their configuration (`skipgpt.json`);
//! - [`linear`]: one linear layer's weights in the HF layout, initialised, loaded and saved;
//! - [`lora`]: LoRA adapters on the projections, merging, and the PEFT adapter format;
//! - [`precision`]: f16/bf16 weights against the f32 residual stream;
//! - [`quantized`]: weights kept in llama.cpp's block formats, read in place from a GGUF;
//! - [`dispatch`]: the one place the hot operations choose between the CPU backend's kernels
//!   and Burn's tensor operations; [`flex_kernels`] hands the CPU backend's (burn-flex)
//!   tensors to `skipgpt-kernels` (decoding products, the engine's attention, the small
//!   operations, on every core);
//! - [`rope`]: rotary embeddings with default, linear, dynamic and llama3 scaling;
//! - [`io`]: everything that touches files: model directories ([`io::checkpoint`],
//!   [`io::safetensors_io`]), writes that never lose what was there ([`io::atomic_write`]), and
//!   llama.cpp's GGUF files ([`io::gguf`]);
//! - [`engine`]: the sparse engine, which skips what the routers skip;
//! - [`tokenizer`], [`chat_template`], [`generate`]: text in (a conversation in the model's
//!   own chat format), text out;
//! - [`error`]: [`ModelError`], each variant naming the file, key or tensor at fault.

pub mod chat_template;
pub mod config;
pub mod dispatch;
pub mod engine;
pub mod error;
#[cfg(feature = "flex")]
pub mod flex_kernels;
pub mod generate;
pub mod io;
pub mod linear;
pub mod llama;
pub mod lora;
pub mod precision;
pub mod quantized;
pub mod rope;
pub mod router;

pub mod tokenizer;

pub use chat_template::{ChatMessage, ChatTemplate};
pub use config::{LlamaConfig, RopeScaling};
pub use error::{ModelError, Result};
pub use generate::{generate, GenerateOptions, Sampling};
pub use io::checkpoint::{
    attach_routers, load_config, load_pretrained, load_pretrained_as, load_routing_config,
    save_pretrained, save_routers, Pretrained,
};
pub use io::safetensors_io::StoreDtype;
pub use llama::{CausalLmOutput, LlamaForCausalLM};
pub use lora::{load_peft_adapter, save_peft_adapter, LoraConfig, PeftAdapter};
pub use router::{
    Granularity, KvPolicy, MlpRouterInput, RouterInit, RouterNoise, RouterVariant, Routing,
    RoutingConfig, SparsityUnit,
};
pub use tokenizer::Tokenizer;
