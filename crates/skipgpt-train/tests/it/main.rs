//! The training crate's integration tests, one binary: gradient checkpointing against the
//! whole graph, and runs through burn-train's learner (sparsity, pretraining, resuming).

mod checkpointing;
mod fit;
