//! # skipgpt-model
//!
//! A LLaMA-family decoder on Burn, generic over the backend, that loads and saves Hugging Face
//! checkpoints: the base on which SkipGPT routers, LoRA and sparse execution are built.
//!
//! - [`config`]: `config.json` (transformers 4.x and 5.x layouts) → [`LlamaConfig`];
//! - [`llama`]: the model, its modules named like the HF weight keys;
//! - [`lora`]: LoRA adapters on the projections, merging, and the PEFT adapter format;
//! - [`precision`]: f16/bf16 weights against the f32 residual stream;
//! - [`flex_kernels`]: the CPU backend's (burn-flex) tensors handed to `skipgpt-kernels`
//!   (decoding products, the engine's attention, the small operations, on every core);
//! - [`rope`]: rotary embeddings with default, linear, dynamic and llama3 scaling;
//! - [`checkpoint`] and [`safetensors_io`]: reading/writing model directories;
//! - [`atomic`]: writing a user's files without losing what was there;
//! - [`gguf`]: llama.cpp's GGUF files (dequantized) into a HF model directory;
//! - [`tokenizer`], [`chat_template`], [`generate`]: text in (a conversation in the model's
//!   own chat format), text out.

pub mod atomic;
pub mod chat_template;
pub mod checkpoint;
pub mod config;
pub mod engine;
pub mod error;
pub mod flex_kernels;
pub mod generate;
pub mod gguf;
pub mod linear;
pub mod llama;
pub mod lora;
pub mod precision;
pub mod rope;
pub mod router;
pub mod safetensors_io;

pub mod tokenizer;

pub use chat_template::{ChatMessage, ChatTemplate};
pub use checkpoint::{
    load_config, load_pretrained, load_pretrained_as, load_routing_config, save_pretrained,
    save_routers, Pretrained,
};
pub use config::{LlamaConfig, RopeScaling};
pub use error::{ModelError, Result};
pub use generate::{generate, GenerateOptions, Sampling};
pub use llama::{CausalLmOutput, LlamaForCausalLM};
pub use lora::{load_peft_adapter, save_peft_adapter, LoraConfig, PeftAdapter};
pub use router::{
    Granularity, KvPolicy, MlpRouterInput, RouterInit, RouterNoise, RouterVariant, Routing,
    RoutingConfig, SparsityUnit,
};
pub use safetensors_io::StoreDtype;
pub use tokenizer::Tokenizer;
