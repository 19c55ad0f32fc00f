//! The model crate's files: reading and writing Hugging Face model directories
//! ([`checkpoint`], [`safetensors_io`]), llama.cpp's GGUF files ([`gguf`]), and the one way
//! this project writes a user's file ([`atomic_write`]: a temporary name, then a rename).
//! The model's loaders read either through a [`weight_source::WeightSource`].

pub mod atomic_write;
pub mod checkpoint;
pub mod gguf;
pub mod safetensors_io;
pub mod weight_source;
