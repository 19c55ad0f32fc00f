//! Times one decoding step's matrix products on SmolLM2's shapes (30 layers of q, k, v, o,
//! gate, up and down, and the tied 49152 x 576 head) with random weights: burn-flex's matmul
//! against the crate's kernels (`skipgpt_kernels::matvec`) with the layers' weights held
//! `[in, out]` (rows of W added up) and `[out, in]` (a dot product per output, the layout the
//! CPU backend loads), at f32, f16 and bf16, for a given number of rows. Run as the engine runs a decoding step (`thread_team::run`):
//!
//! `cargo run --release --features bench --example bench_matvec -- [ROWS]` (default 1; `RAYON_NUM_THREADS` sets
//! the threads). Prints the best of 8 passes, in ms.

use std::time::Instant;

use burn::backend::Flex;
use burn::tensor::{DType, Distribution, Tensor, TensorData};
use skipgpt_kernels::matvec::{rows_times_matrix, rows_times_matrix_t, WeightSlice};

/// `[in, out]` of one layer's projections.
const LAYER: [(usize, usize); 7] = [
    (576, 576),
    (576, 192),
    (576, 192),
    (576, 576),
    (576, 1536),
    (576, 1536),
    (1536, 576),
];
const LAYERS: usize = 30;
const VOCAB: usize = 49152;
const PASSES: usize = 8;

fn slice(data: &TensorData) -> WeightSlice<'_> {
    match data.dtype {
        DType::F32 => WeightSlice::F32(data.as_slice().unwrap()),
        DType::F16 => WeightSlice::F16(data.as_slice().unwrap()),
        _ => WeightSlice::Bf16(data.as_slice().unwrap()),
    }
}

/// Burn's product as the model takes it: rows cast to the weight's type and the result back.
fn burn_product(x: Tensor<Flex, 2>, w: Tensor<Flex, 2>) -> Tensor<Flex, 2> {
    match w.dtype() {
        DType::F32 => x.matmul(w),
        dtype => x.cast(dtype).matmul(w).cast(DType::F32),
    }
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

fn run(rows: usize) {
    let device = Default::default();
    let random =
        |shape: [usize; 2]| Tensor::<Flex, 2>::random(shape, Distribution::Default, &device);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let mats: Vec<Tensor<Flex, 2>> = (0..LAYERS)
            .flat_map(|_| LAYER.iter().map(|&(i, o)| random([i, o]).cast(dtype)))
            .collect();
        let head = random([VOCAB, 576]).cast(dtype);
        let xs = [random([rows, 576]), random([rows, 1536])];
        let input = |d_in: usize| &xs[usize::from(d_in != 576)];
        let datas: Vec<TensorData> = mats.iter().map(|t| t.to_data()).collect();
        let head_data = head.to_data();
        let rows_of: Vec<Vec<f32>> = xs.iter().map(|x| x.to_data().to_vec().unwrap()).collect();
        let burn_layers = best_ms(|| {
            for w in &mats {
                let y = burn_product(input(w.dims()[0]).clone(), w.clone());
                std::hint::black_box(y.into_primitive());
            }
        });
        let burn_head = best_ms(|| {
            // the tied head as the model takes it: [vocab, hidden] · rowsᵀ
            let y = match dtype {
                DType::F32 => head.clone().matmul(xs[0].clone().transpose()),
                _ => head
                    .clone()
                    .matmul(xs[0].clone().cast(dtype).transpose())
                    .cast(DType::F32),
            };
            std::hint::black_box(y.into_primitive());
        });
        let kernel_layers = best_ms(|| {
            for d in &datas {
                let (i, o) = (d.shape[0], d.shape[1]);
                let x = &rows_of[usize::from(i != 576)];
                std::hint::black_box(rows_times_matrix(x, rows, slice(d), i, o));
            }
        });
        // the layout the model holds its weights in on this backend: [out, in], a dot product
        // per output (`flex_kernels::holds_weights_out_in`)
        let out_in: Vec<TensorData> = (0..LAYERS)
            .flat_map(|_| {
                LAYER
                    .iter()
                    .map(|&(i, o)| random([o, i]).cast(dtype).into_data())
            })
            .collect();
        let kernel_layers_out_in = best_ms(|| {
            for d in &out_in {
                let (o, i) = (d.shape[0], d.shape[1]);
                let x = &rows_of[usize::from(i != 576)];
                std::hint::black_box(rows_times_matrix_t(x, rows, slice(d), o, i));
            }
        });
        let kernel_head = best_ms(|| {
            let y = rows_times_matrix_t(&rows_of[0], rows, slice(&head_data), VOCAB, 576);
            std::hint::black_box(y);
        });
        println!(
            "{dtype:?}, {rows} rows: burn-flex layers {burn_layers:.2} ms + head {burn_head:.2} ms | \
             kernels layers [in, out] {kernel_layers:.2} ms, [out, in] {kernel_layers_out_in:.2} ms \
             + head {kernel_head:.2} ms"
        );
    }
}

/// One step's layer products with the weights in llama.cpp block formats (`[out, in]`, read in
/// place by `skipgpt_kernels::quant`), against the same shapes at f32.
fn run_quantized(rows: usize) {
    use skipgpt_kernels::quant::{rows_times_quantized, QuantMatrix, QuantType};
    let xs: Vec<Vec<f32>> = [576usize, 1536]
        .iter()
        .map(|&d| {
            (0..rows * d)
                .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
                .collect()
        })
        .collect();
    // the K formats only where a row is whole 256-value blocks: SmolLM2's down projections
    let kinds = [
        QuantType::Q8_0,
        QuantType::Q5_0,
        QuantType::Q4_0,
        QuantType::Q4K,
        QuantType::Q6K,
    ];
    for kind in kinds {
        // random blocks with small finite f16 scales where the format keeps them
        let scales: &[usize] = match kind {
            QuantType::Q4K => &[0, 2],
            QuantType::Q6K => &[208],
            _ => &[0],
        };
        let mats: Vec<(Vec<u8>, usize, usize)> = (0..LAYERS)
            .flat_map(|l| {
                LAYER.iter().map(move |&(i, o)| {
                    let mut b: Vec<u8> = (0..o * kind.row_bytes(i))
                        .map(|k| ((k * 31 + l * 17) % 251) as u8)
                        .collect();
                    for block in b.chunks_exact_mut(kind.block_bytes()) {
                        for &at in scales {
                            let scale = half::f16::from_f32(0.01).to_le_bytes();
                            block[at..at + 2].copy_from_slice(&scale);
                        }
                    }
                    (b, o, i)
                })
            })
            .filter(|(_, _, i)| i % kind.block_values() == 0)
            .collect();
        let bytes: usize = mats.iter().map(|m| m.0.len()).sum();
        let ms = best_ms(|| {
            for (b, o, i) in &mats {
                let w = QuantMatrix {
                    kind,
                    bytes: b,
                    n: *o,
                    d: *i,
                };
                let x = &xs[usize::from(*i != 576)];
                std::hint::black_box(rows_times_quantized(x, rows, w));
            }
        });
        println!(
            "{}, {rows} rows: kernels layers [out, in] {ms:.2} ms ({:.1} MB of weights)",
            kind.name(),
            bytes as f64 / 1e6
        );
    }
}

fn main() {
    let rows = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("ROWS: a positive integer"))
        .unwrap_or(1);
    skipgpt_kernels::thread_team::run(|| {
        run(rows);
        run_quantized(rows);
    });
}
