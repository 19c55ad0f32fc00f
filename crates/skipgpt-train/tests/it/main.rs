//! The training crate's integration tests, one binary: gradient checkpointing against the
//! whole graph, runs through burn-train's learner (sparsity, pretraining, resuming), and the
//! wgpu backend against the CPU (parity, the engine, a router-tuning step).

mod checkpointing;
mod fit;
mod wgpu;
