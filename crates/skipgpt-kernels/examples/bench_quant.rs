//! The quantized products of one SmolLM2-135M layer (q, k and v in one pass, o, gate and up in
//! one pass, down) with random weights, timed alone: the kernels' share of a decoding step
//! (1 row) or of a prompt (512 rows), without the engine around them. Best of several passes,
//! so that a noisy machine shows the kernel rather than the noise.
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo run --release -p skipgpt-kernels --example bench_quant -- 1 512
//! ```

use std::time::Instant;

use skipgpt_kernels::quant::{quantize, rows_times_quantized_many, QuantMatrix, QuantType};

const PASSES: usize = 8;
const HIDDEN: usize = 576;
const KV: usize = 192;
const FFN: usize = 1536;

/// One layer's products: groups of matrices `[n, d]` that share an input.
const LAYER: [&[(usize, usize)]; 4] = [
    &[(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN)],
    &[(HIDDEN, HIDDEN)],
    &[(FFN, HIDDEN), (FFN, HIDDEN)],
    &[(HIDDEN, FFN)],
];

/// The format of a matrix `d` values wide: Q8_0 throughout, or Q4_K where the rows hold
/// whole 256-value blocks and Q5_0 where they do not (as llama-quantize's Q4_K_M falls back).
fn format(mix: &str, d: usize) -> QuantType {
    match mix {
        "q8_0" => QuantType::Q8_0,
        _ if d.is_multiple_of(256) => QuantType::Q4K,
        _ => QuantType::Q5_0,
    }
}

/// Deterministic values in about [-1, 1] (xorshift).
fn values(len: usize, mut state: u64) -> Vec<f32> {
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn best_ms(mut pass: impl FnMut()) -> f64 {
    (0..PASSES)
        .map(|_| {
            let start = Instant::now();
            pass();
            start.elapsed().as_secs_f64() * 1e3
        })
        .fold(f64::MAX, f64::min)
}

/// A quantized matrix `[n, d]` and its bytes.
struct Owned {
    kind: QuantType,
    bytes: Vec<u8>,
    n: usize,
    d: usize,
}

impl Owned {
    fn view(&self) -> QuantMatrix<'_> {
        QuantMatrix {
            kind: self.kind,
            bytes: &self.bytes,
            n: self.n,
            d: self.d,
        }
    }
}

fn run(mix: &str, rows: usize) {
    let groups: Vec<Vec<Owned>> = LAYER
        .iter()
        .enumerate()
        .map(|(g, shapes)| {
            shapes
                .iter()
                .enumerate()
                .map(|(k, &(n, d))| {
                    let kind = format(mix, d);
                    let w = values(n * d, 1 + (g * 8 + k) as u64);
                    let bytes = quantize(kind, &w).expect("whole blocks");
                    Owned { kind, bytes, n, d }
                })
                .collect()
        })
        .collect();
    let inputs: Vec<Vec<f32>> = LAYER
        .iter()
        .map(|shapes| values(rows * shapes[0].1, 99))
        .collect();
    let ms = best_ms(|| {
        for (group, x) in groups.iter().zip(&inputs) {
            let ws: Vec<QuantMatrix<'_>> = group.iter().map(Owned::view).collect();
            std::hint::black_box(rows_times_quantized_many(x, rows, &ws));
        }
    });
    let threads = rayon::current_num_threads();
    println!(
        "{mix}, {rows} rows, {threads} threads: one layer's products {ms:.3} ms (30 layers: {:.1} tok/s)",
        rows as f64 / (30.0 * ms / 1e3)
    );
}

fn main() {
    let rows: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("row counts"))
        .collect();
    for mix in ["q8_0", "q4_k_m"] {
        for &r in if rows.is_empty() {
            &[1, 512][..]
        } else {
            &rows
        } {
            run(mix, r);
        }
    }
}
