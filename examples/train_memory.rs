//! Activation memory of one router-tuning step, measured, and extrapolated to a 7B model.
//!
//! `cargo run --release --features bench --example train_memory`
//!
//! A counting allocator records the peak of live heap bytes during one training step (forward,
//! sparsity loss, backward) of a frozen LLaMA with SkipGPT routers on the CPU backend, above
//! what was live before the step (weights, batch). Small models of varied shape are measured,
//! with and without `--checkpoint-layers`, and a linear model of the peak is fitted by least
//! squares on the terms the graph can hold:
//!
//! - whole graph: `L·s·h`, `L·s·f`, `L·n·s²` (attention scores per head), `s·V` (logits), `s·h`
//! - per-layer checkpointing: `L·s·h` (the saved layer inputs), one layer's `s·h`, `s·f`,
//!   `n·s²`, and `s·V`
//!
//! (L layers, s tokens, h hidden, f intermediate, n heads, V vocabulary; batch 1.) The fitted
//! bytes per term then give the activation memory of LLaMA-2-7B at sequence 2048. The same
//! graph on a GPU backend stores the same tensors; the GPU allocator's pooling and
//! fragmentation come on top and are not modelled.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use burn::tensor::backend::Backend;
use burn::train::TrainStep;
use skipgpt_model::{LlamaConfig, RoutingConfig, StoreDtype};
use skipgpt_train::loader::LmBatch;
use skipgpt_train::loss::SparsityLossConfig;
use skipgpt_train::step::LmTrainer;
use skipgpt_train::Objective;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

type B = burn::backend::Autodiff<burn::backend::NdArray<f32>>;

#[derive(Debug, Clone, Copy)]
struct Shape {
    layers: usize,
    hidden: usize,
    inter: usize,
    heads: usize,
    seq: usize,
    vocab: usize,
}

/// Peak bytes above the baseline during one training step.
fn measure(s: Shape, checkpoint_layers: bool) -> f64 {
    let device = Default::default();
    B::seed(&device, 0);
    let config = LlamaConfig::new(
        s.vocab,
        s.hidden,
        s.inter,
        s.layers,
        s.heads,
        s.heads,
        s.hidden / s.heads,
    );
    let model = config
        .init::<B>(&device)
        .with_new_routers(RoutingConfig::new())
        .freeze_base();
    let _ = model.export(StoreDtype::F32);
    let trainer = LmTrainer::new(model, Objective::Sparsity(SparsityLossConfig::new()))
        .with_checkpoint_layers(checkpoint_layers);
    let row: Vec<u32> = (0..=s.seq as u32)
        .map(|i| (i * 7 + 3) % s.vocab as u32)
        .collect();
    let batch = LmBatch {
        temperature: 3.0,
        noise_seed: 1,
        ..LmBatch::<B>::from_sequences(&[row.as_slice()], &device)
    };
    // a warm-up step, so that one-off allocations (thread pools, caches) are not counted
    drop(trainer.step(batch.clone()));
    let base = LIVE.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    let out = trainer.step(batch);
    let peak = PEAK.load(Ordering::SeqCst);
    drop(out);
    (peak - base) as f64
}

fn features(s: Shape, checkpoint_layers: bool) -> Vec<f64> {
    let (l, h, f, n, t, v) = (
        s.layers as f64,
        s.hidden as f64,
        s.inter as f64,
        s.heads as f64,
        s.seq as f64,
        s.vocab as f64,
    );
    if checkpoint_layers {
        vec![l * t * h, t * h, t * f, n * t * t, t * v]
    } else {
        vec![l * t * h, l * t * f, l * n * t * t, t * v, t * h]
    }
}

const NAMES_FULL: [&str; 5] = ["L·s·h", "L·s·f", "L·n·s²", "s·V", "s·h"];
const NAMES_CKPT: [&str; 5] = ["L·s·h", "s·h", "s·f", "n·s²", "s·V"];

/// Least squares `x = argmin |A x - y|` by the normal equations (5 unknowns).
fn least_squares(rows: &[Vec<f64>], y: &[f64]) -> Vec<f64> {
    let k = rows[0].len();
    // scale the columns so that the normal equations are well conditioned
    let scale: Vec<f64> = (0..k)
        .map(|j| rows.iter().map(|r| r[j].abs()).fold(0.0, f64::max).max(1.0))
        .collect();
    let mut m = vec![vec![0.0; k + 1]; k];
    for (r, &yi) in rows.iter().zip(y) {
        for i in 0..k {
            for j in 0..k {
                m[i][j] += r[i] / scale[i] * r[j] / scale[j];
            }
            m[i][k] += r[i] / scale[i] * yi;
        }
    }
    for c in 0..k {
        let p = (c..k)
            .max_by(|&a, &b| m[a][c].abs().total_cmp(&m[b][c].abs()))
            .unwrap();
        m.swap(c, p);
        let pivot = m[c].clone();
        for (r, row) in m.iter_mut().enumerate() {
            if r != c {
                let f = row[c] / pivot[c];
                for (x, p) in row.iter_mut().zip(&pivot).skip(c) {
                    *x -= f * p;
                }
            }
        }
    }
    (0..k).map(|i| m[i][k] / m[i][i] / scale[i]).collect()
}

fn gib(bytes: f64) -> String {
    format!("{:.1} GiB", bytes / (1u64 << 30) as f64)
}

fn main() {
    let base = Shape {
        layers: 2,
        hidden: 128,
        inter: 352,
        heads: 4,
        seq: 128,
        vocab: 512,
    };
    let shapes = [
        base,
        Shape { layers: 4, ..base },
        Shape { layers: 6, ..base },
        Shape {
            hidden: 256,
            heads: 8,
            ..base
        },
        Shape {
            hidden: 256,
            ..base
        },
        Shape { inter: 704, ..base },
        Shape { heads: 8, ..base },
        Shape { seq: 256, ..base },
        Shape { seq: 64, ..base },
        Shape {
            vocab: 2048,
            ..base
        },
        Shape {
            layers: 4,
            seq: 256,
            heads: 2,
            ..base
        },
        Shape {
            layers: 3,
            hidden: 192,
            inter: 512,
            heads: 6,
            seq: 192,
            vocab: 1024,
        },
    ];
    // LLaMA-2-7B, one sequence of 2048 tokens
    let llama7b = Shape {
        layers: 32,
        hidden: 4096,
        inter: 11008,
        heads: 32,
        seq: 2048,
        vocab: 32000,
    };
    let weights_7b = 6.738e9;
    println!("# Activation memory of one router-tuning step (f32, batch 1)\n");
    for checkpoint_layers in [false, true] {
        let names = if checkpoint_layers {
            NAMES_CKPT
        } else {
            NAMES_FULL
        };
        println!(
            "## {}\n",
            if checkpoint_layers {
                "--checkpoint-layers"
            } else {
                "whole graph (default)"
            }
        );
        println!("| L | h | f | n | s | V | measured | fitted | error |");
        println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
        let measured: Vec<f64> = shapes
            .iter()
            .map(|&s| measure(s, checkpoint_layers))
            .collect();
        let rows: Vec<Vec<f64>> = shapes
            .iter()
            .map(|&s| features(s, checkpoint_layers))
            .collect();
        let coef = least_squares(&rows, &measured);
        for ((s, m), r) in shapes.iter().zip(&measured).zip(&rows) {
            let fit: f64 = r.iter().zip(&coef).map(|(a, b)| a * b).sum();
            println!(
                "| {} | {} | {} | {} | {} | {} | {:.2} MiB | {:.2} MiB | {:+.1}% |",
                s.layers,
                s.hidden,
                s.inter,
                s.heads,
                s.seq,
                s.vocab,
                m / 1048576.0,
                fit / 1048576.0,
                100.0 * (fit - m) / m
            );
        }
        println!();
        let terms: Vec<String> = names
            .iter()
            .zip(&coef)
            .map(|(n, c)| format!("{:.2} f32 per {n}", c / 4.0))
            .collect();
        println!("Fitted: {}\n", terms.join(", "));
        let act: f64 = features(llama7b, checkpoint_layers)
            .iter()
            .zip(&coef)
            .map(|(a, b)| a * b)
            .sum();
        println!(
            "LLaMA-2-7B, s = 2048: activations {} in f32; with f32 weights ({}) {}; with bf16 \
             weights ({}) and f32 activations {}; everything bf16 {}\n",
            gib(act),
            gib(weights_7b * 4.0),
            gib(act + weights_7b * 4.0),
            gib(weights_7b * 2.0),
            gib(act + weights_7b * 2.0),
            gib(act / 2.0 + weights_7b * 2.0),
        );
    }
}
