//! The model crate's integration tests, one binary: parity with HF transformers on the
//! fixtures, checkpoints, routing, the sparse engine, the CPU backend's kernels, GGUF import,
//! GGUF files run quantized, LoRA, and chat templates against transformers'. Helpers come from `skipgpt-test-support`.

mod chat_templates;
mod checkpoint;
mod comparisons;
mod engine;
// the CPU backend's fast paths exist only with the `flex` feature (on in a workspace build)
#[cfg(feature = "flex")]
mod flex_kernels;
mod gguf;
mod lora;
mod parity;
#[cfg(feature = "flex")]
mod quantized;
mod routing;
