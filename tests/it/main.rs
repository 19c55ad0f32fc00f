//! The root package's integration tests, one binary: the `skipgpt` command line, evaluation
//! and baselines, training from the command line, bad input, the server, and SmolLM2 (the real model;
//! `--include-ignored`).

mod baselines;
mod cli;
mod cli_models;
mod common;
mod eval;
mod serve;
mod smollm2;
mod train_cli;
mod validation;
