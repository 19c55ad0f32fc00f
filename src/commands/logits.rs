//! `skipgpt logits`: a model's logits (and hidden states) for token ids from a safetensors file,
//! through the sparse engine or the dense-gated reference.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Result};
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use clap::Args;
use skipgpt_model::engine::{sparse_forward, LogitRows, SparseCache};
use skipgpt_model::generate::validate_ids;
use skipgpt_model::io::safetensors_io::{write_safetensors, OwnedTensor, TensorFile};
use skipgpt_model::StoreDtype;

use crate::args::{EngineArgs, RoutingArgs};
use crate::backend::BackendKind;
use crate::commands::{apply_routing, print_gate_rates, print_stats, routes, use_sparse};
use crate::with_backend;

#[derive(Args, Debug)]
pub struct LogitsArgs {
    #[command(flatten)]
    pub model: crate::args::ModelArgs,
    /// safetensors file holding `input_ids`, i64 [batch, seq].
    #[arg(long)]
    pub input: PathBuf,
    /// safetensors file to write `logits`, f32 [batch, seq, vocab], to.
    #[arg(long)]
    pub output: PathBuf,
    /// Also write `hidden_states.{k}` (embeddings, then every layer's output); uses the
    /// dense-gated engine.
    #[arg(long)]
    pub hidden_states: bool,
    #[command(flatten)]
    pub routing: RoutingArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
}

pub fn run(backend: BackendKind, args: LogitsArgs) -> Result<()> {
    with_backend!(backend, |B, device| logits_on::<B>(&args, &device))
}

fn logits_on<B: Backend>(args: &LogitsArgs, device: &B::Device) -> Result<()> {
    let input = TensorFile::open(&args.input)?;
    let (ids, shape) = input.read_i64("input_ids")?;
    let [b, s] = shape[..] else {
        bail!(
            "{}: `input_ids` must be 2-D [batch, seq], got shape {shape:?}",
            args.input.display()
        );
    };
    if b == 0 || s == 0 {
        bail!(
            "{}: `input_ids` is empty (shape {shape:?})",
            args.input.display()
        );
    }
    let pretrained = args.model.load::<B>(device)?;
    let mut model = pretrained.model;
    apply_routing(&mut model, &args.routing, device);
    validate_ids(
        &ids,
        model.config.vocab_size,
        &format!("{}: input_ids", args.input.display()),
    )?;
    let layers = model.config.num_hidden_layers;
    let v = model.config.vocab_size;
    let mut tensors = BTreeMap::new();
    let f32_tensor = |t: Tensor<B, 3>| OwnedTensor::from_tensor(t, StoreDtype::F32);
    if use_sparse(&args.engine) && !args.hidden_states {
        let rows: Vec<Vec<u32>> = ids
            .chunks(s)
            .map(|r| r.iter().map(|&i| i as u32).collect())
            .collect();
        let mut cache = SparseCache::new(b, layers);
        let out = sparse_forward(&model, &rows, &mut cache, model.routing, LogitRows::All)?;
        if args.engine.stats {
            print_stats(&out.stats, None);
        }
        tensors.insert("logits".into(), f32_tensor(out.logits.reshape([b, s, v])));
        // the 0/1 decisions as [layers, batch, seq], for a model that routes
        let gates = if routes(&model) {
            vec![("attn_gates", out.attn_gates), ("mlp_gates", out.mlp_gates)]
        } else {
            vec![]
        };
        for (name, gates) in gates {
            let flat: Vec<f32> = gates
                .into_iter()
                .flatten()
                .map(|g| f32::from(u8::from(g)))
                .collect();
            tensors.insert(
                name.into(),
                OwnedTensor::from_f32(&flat, vec![layers, b, s], StoreDtype::F32),
            );
        }
    } else {
        let input_ids: Tensor<B, 2, Int> = Tensor::from_data(TensorData::new(ids, [b, s]), device);
        let out = model.forward_full(input_ids, args.hidden_states);
        if args.engine.stats {
            print_gate_rates(&out.attn_gates, &out.mlp_gates);
        }
        tensors.insert("logits".into(), f32_tensor(out.logits));
        for (k, h) in out.hidden_states.into_iter().enumerate() {
            tensors.insert(format!("hidden_states.{k}"), f32_tensor(h));
        }
        // routed: the 0/1 decisions as [layers, batch, seq]
        for (name, gates) in [("attn_gates", out.attn_gates), ("mlp_gates", out.mlp_gates)] {
            if !gates.is_empty() {
                tensors.insert(name.into(), f32_tensor(Tensor::stack::<3>(gates, 0)));
            }
        }
    }
    write_safetensors(&args.output, &tensors, None)?;
    eprintln!("wrote logits [{b}, {s}, {v}] to {}", args.output.display());
    Ok(())
}
