//! The quantized products against f64 references: the exact product of the dequantized
//! weights with the quantized activations (what the integer arithmetic must give), and the
//! product with the activations as they were (off by no more than the activations' rounding).

use half::f16;

use super::*;
use crate::test_values::{values, xorshift};

/// Deterministic bytes from a xorshift generator.
fn bytes(n: usize, seed: u32) -> Vec<u8> {
    xorshift(seed, 7).map(|s| (s >> 24) as u8).take(n).collect()
}

/// `blocks` random blocks of `kind` whose f16 scales are small and finite (random bytes
/// elsewhere: every bit pattern of the quantized values is a valid block).
fn random_blocks(kind: QuantType, blocks: usize, seed: u32) -> Vec<u8> {
    let mut b = bytes(blocks * kind.block_bytes(), seed);
    let scales: &[usize] = match kind {
        QuantType::Q8_0 | QuantType::Q4_0 | QuantType::Q5_0 => &[0],
        QuantType::Q4_1 | QuantType::Q5_1 | QuantType::Q4K | QuantType::Q5K => &[0, 2],
        QuantType::Q6K => &[208],
    };
    let scale_values = values(blocks * 2, seed + 1);
    for (i, block) in b.chunks_exact_mut(kind.block_bytes()).enumerate() {
        for (k, &at) in scales.iter().enumerate() {
            let v = 0.02 + 0.01 * scale_values[2 * i + k];
            block[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
        }
    }
    b
}

/// The activations as the kernels see them, back in f64.
fn dequantized(row: &Q8Row) -> Vec<f64> {
    row.qs
        .iter()
        .enumerate()
        .map(|(i, &q)| row.d[i / Q8_BLOCK] as f64 * q as f64)
        .collect()
}

#[test]
fn every_format_unpacks_to_the_documented_block_sizes() {
    for kind in QuantType::ALL {
        let b = random_blocks(kind, 3, 1);
        assert_eq!(
            dequantize(kind, &b).len(),
            3 * kind.block_values(),
            "{kind:?}"
        );
        assert_eq!(QuantType::from_ggml(kind as u32), Some(kind));
    }
    assert_eq!(QuantType::from_ggml(0), None);
}

#[test]
fn q8_0_and_q4_0_dequantize_by_hand() {
    // d = 0.5, values 0..32 as bytes
    let mut q8 = f16::from_f32(0.5).to_le_bytes().to_vec();
    q8.extend((0..32).map(|i| (i as i8 - 16) as u8));
    let want: Vec<f32> = (0..32).map(|i| 0.5 * (i as f32 - 16.0)).collect();
    assert_eq!(dequantize(QuantType::Q8_0, &q8), want);
    // Q4_0: byte j holds value j (low nibble) and value j + 16 (high nibble), minus 8
    let mut q4 = f16::from_f32(2.0).to_le_bytes().to_vec();
    q4.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let got = dequantize(QuantType::Q4_0, &q4);
    for j in 0..16 {
        assert_eq!(got[j], 2.0 * (j as f32 - 8.0));
        assert_eq!(got[j + 16], 2.0 * (15.0 - j as f32 - 8.0));
    }
}

#[test]
fn activations_round_to_within_half_a_step() {
    let x = values(512, 3);
    for (row, rounded_scale) in [(Q8Row::quantize(&x), true), (Q8Row::quantize_k(&x), false)] {
        let back = dequantized(&row);
        for (i, (&v, &b)) in x.iter().zip(&back).enumerate() {
            let step = row.d[i / Q8_BLOCK].abs() as f64;
            // the 32-value blocks keep their scale in f16: up to 127 of its rounding more
            let slack = if rounded_scale {
                127.0 * step * 2f64.powi(-11)
            } else {
                0.0
            };
            assert!(
                (v as f64 - b).abs() <= 0.5 * step + slack + 1e-7,
                "{i}: {v} against {b}"
            );
        }
        for (k, &sum) in row.sums.iter().enumerate() {
            let want: i32 = row.qs[16 * k..16 * k + 16].iter().map(|&q| q as i32).sum();
            assert_eq!(sum, want);
            let scaled = row.d[k / 2] * sum as f32;
            assert_eq!(row.scaled_sums[k], scaled);
        }
    }
    // the K formats' activations: one scale per 256, the value of largest magnitude at ±127
    let k = Q8Row::quantize_k(&x);
    for (b, block) in k.d.chunks(8).enumerate() {
        assert!(block.iter().all(|&d| d == block[0]), "block {b}");
        let peak = k.qs[256 * b..256 * (b + 1)]
            .iter()
            .map(|q| q.unsigned_abs())
            .max();
        assert_eq!(peak, Some(127), "block {b}");
    }
    // all zeros: a zero scale and zero values, no NaN
    for zero in [Q8Row::quantize(&[0.0; 256]), Q8Row::quantize_k(&[0.0; 256])] {
        assert_eq!((zero.d[0], zero.qs.iter().all(|&q| q == 0)), (0.0, true));
    }
}

#[test]
fn every_format_multiplies_like_its_dequantized_weights() {
    for kind in QuantType::ALL {
        // 9 rows: two whole tiles of the fused kernels and one row over; 17 rows against 19: a
        // prompt's product, Q8_0's weight rows interleaved in two groups of eight, three over
        for (m, n, blocks) in [(1, 5, 1), (3, 7, 2), (2, 33, 4), (9, 3, 2), (17, 19, 3)] {
            let d = blocks * kind.block_values();
            let w = random_blocks(kind, n * blocks, 10 + n as u32);
            let x = values(m * d, 20 + m as u32);
            let matrix = QuantMatrix {
                kind,
                bytes: &w,
                n,
                d,
            };
            for kernel in Kernel::available() {
                let got = rows_times_quantized_on(kernel, &x, m, &[matrix]).remove(0);
                let what = format!("{kind:?} {kernel:?} m {m} n {n} d {d}");
                check_product(&got, &x, (&dequantize(kind, &w), kind), [m, n, d], &what);
            }
        }
    }
}

#[test]
fn several_matrices_in_one_pass_give_each_ones_own_product() {
    let d = 512;
    let kinds = [QuantType::Q5_0, QuantType::Q6K, QuantType::Q8_0];
    let weights: Vec<Vec<u8>> = kinds
        .iter()
        .zip([7usize, 300, 1])
        .map(|(&kind, n)| random_blocks(kind, n * d / kind.block_values(), n as u32))
        .collect();
    let matrices: Vec<QuantMatrix> = kinds
        .iter()
        .zip(&weights)
        .map(|(&kind, bytes)| QuantMatrix {
            kind,
            bytes,
            n: bytes.len() / kind.row_bytes(d),
            d,
        })
        .collect();
    for m in [1, 5] {
        let x = values(m * d, 3);
        let together = super::rows_times_quantized_many(&x, m, &matrices);
        for (k, matrix) in matrices.iter().enumerate() {
            assert_eq!(
                together[k],
                rows_times_quantized(&x, m, *matrix),
                "matrix {k}, m {m}"
            );
        }
    }
}

/// `got` (`[m, n]`) against the f64 products of `x` (`[m, d]`) with the dequantized weights
/// `wf` (`[n, d]`, of format `kind`): exact up to f32 rounding with the activations as
/// quantized, and within the activations' rounding of the product with `x` itself.
fn check_product(
    got: &[f32],
    x: &[f32],
    (wf, kind): (&[f32], QuantType),
    [m, n, d]: [usize; 3],
    what: &str,
) {
    // half a step, and what a scale kept in f16 adds (up to 127 of its rounding)
    let rounding = 0.5 + 127.0 * 2f64.powi(-11);
    for i in 0..m {
        let xr = &x[i * d..(i + 1) * d];
        let q = Q8Row::quantize_for(kind, xr);
        let xq = dequantized(&q);
        for r in 0..n {
            let wr = &wf[r * d..(r + 1) * d];
            let exact: f64 = wr.iter().zip(&xq).map(|(&a, &b)| a as f64 * b).sum();
            let size: f64 = wr
                .iter()
                .zip(&xq)
                .map(|(&a, &b)| (a as f64 * b).abs())
                .sum();
            let y = got[i * n + r] as f64;
            let at = format!("{what}: [{i}, {r}]");
            assert!(
                (y - exact).abs() <= 1e-5 * size + 1e-6,
                "{at}: {y} against {exact}"
            );
            let true_dot: f64 = wr.iter().zip(xr).map(|(&a, &b)| a as f64 * b as f64).sum();
            let bound: f64 = wr
                .iter()
                .enumerate()
                .map(|(k, &a)| a.abs() as f64 * rounding * q.d[k / Q8_BLOCK].abs() as f64)
                .sum();
            assert!(
                (y - true_dot).abs() <= bound * 1.001 + 1e-5 * size + 1e-6,
                "{at}: {y} against {true_dot} (bound {bound})"
            );
        }
    }
}

#[test]
#[should_panic(expected = "do not hold")]
fn a_matrix_of_the_wrong_size_is_refused() {
    let w = random_blocks(QuantType::Q8_0, 3, 1);
    let matrix = QuantMatrix {
        kind: QuantType::Q8_0,
        bytes: &w,
        n: 2,
        d: 32,
    };
    rows_times_quantized(&[0.0; 32], 1, matrix);
}

#[test]
fn the_vector_kernels_keep_the_extremes_exact() {
    // Q8_0 blocks of scale 1 whose weights are all −128, −127 or 127, against activations that
    // quantize to ±127: the pairs' i16 sums at their largest (128·127·2) must not saturate
    let one = half::f16::from_f32(1.0).to_le_bytes();
    for weight in [-128i8, -127, 127] {
        for sign in [-1.0f32, 1.0] {
            let mut w = one.to_vec();
            w.extend(std::iter::repeat_n(weight as u8, 32));
            // eight identical weight rows (a whole interleaved group) against one row, and
            // against a prompt's 16 (where the activations go in unsigned)
            let w = w.repeat(8);
            let matrix = QuantMatrix {
                kind: QuantType::Q8_0,
                bytes: &w,
                n: 8,
                d: 32,
            };
            let want = sign * weight as f32 * 32.0;
            for m in [1, 16] {
                let x = vec![sign; 32 * m];
                for kernel in Kernel::available() {
                    let got = rows_times_quantized_on(kernel, &x, m, &[matrix]).remove(0);
                    for y in got {
                        assert!(
                            (y - want).abs() <= 1e-3 * want.abs(),
                            "{kernel:?} {weight} {sign} m {m}: {y}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn quantized_rows_come_back_within_a_step_of_each_value() {
    let x = values(32 * 8, 5);
    for kind in [QuantType::Q8_0, QuantType::Q4_0, QuantType::Q4_1] {
        let blocks = quantize(kind, &x).expect("whole blocks");
        assert_eq!(blocks.len(), 8 * kind.block_bytes(), "{kind:?}");
        let back = dequantize(kind, &blocks);
        for (block, (orig, got)) in x.chunks(32).zip(back.chunks(32)).enumerate() {
            let scale = f16::from_le_bytes([
                blocks[block * kind.block_bytes()],
                blocks[block * kind.block_bytes() + 1],
            ])
            .to_f32()
            .abs();
            let amax = orig.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            for (a, b) in orig.iter().zip(got) {
                // half a quantization step (a whole one on Q4_0's clipped side: the largest
                // magnitude maps to -8, its opposite to at most +7), and the f16 rounding of
                // the scale over 127 steps and of Q4_1's minimum
                let steps = if kind == QuantType::Q4_0 { 1.0 } else { 0.5 };
                let bound = steps * scale + (127.0 * scale + amax) * 1e-3;
                assert!((a - b).abs() <= bound, "{kind:?}: {a} came back as {b}");
            }
        }
    }
}

#[test]
fn every_format_quantizes_a_row_to_within_its_precision() {
    let x = values(256 * 8, 11);
    let rms = |v: &mut dyn Iterator<Item = f32>| {
        let (sum, n) = v.fold((0.0f64, 0usize), |(s, n), e| {
            (s + (e as f64).powi(2), n + 1)
        });
        (sum / n as f64).sqrt()
    };
    let signal = rms(&mut x.iter().copied());
    // the relative error of uniform rounding to the format's steps, with room for the scales'
    // own rounding: about 2^-bits
    for (kind, most) in [
        (QuantType::Q8_0, 0.006),
        (QuantType::Q6K, 0.02),
        (QuantType::Q5_0, 0.05),
        (QuantType::Q5_1, 0.04),
        (QuantType::Q5K, 0.04),
        (QuantType::Q4_0, 0.1),
        (QuantType::Q4_1, 0.08),
        (QuantType::Q4K, 0.08),
    ] {
        let blocks = quantize(kind, &x).expect("whole blocks");
        assert_eq!(
            blocks.len(),
            x.len() / kind.block_values() * kind.block_bytes()
        );
        let back = dequantize(kind, &blocks);
        let error = rms(&mut x.iter().zip(&back).map(|(a, b)| a - b)) / signal;
        assert!(error <= most, "{kind:?}: relative error {error}");
        assert!(error > 0.0, "{kind:?}: no rounding at all is not plausible");
    }
}

/// The input of `tools/ggml_quant_golden.py`, value for value: 21 256-value blocks (mixed
/// sub-block scales; all positive; a zero sub-block and an outlier; all zero; two constant
/// halves; 16 blocks whose scale changes every 16 values), each value a small integer over a
/// power of two.
fn golden_input() -> Vec<f32> {
    let pseudo = |i: u64| (((i * 2654435761) % (1 << 32)) >> 20) as f32 / 2048.0 - 1.0;
    let mut x: Vec<f32> = (0..256)
        .map(|i| pseudo(i) * 2f32.powi((i / 32 % 4) as i32 - 2))
        .collect();
    x.extend((256..512).map(|i| pseudo(i).abs() + 0.25));
    let mut third: Vec<f32> = std::iter::repeat_n(0.0, 32)
        .chain((544..768).map(pseudo))
        .collect();
    third[40] = 8.0;
    x.extend(third);
    x.extend(std::iter::repeat_n(0.0, 256));
    x.extend(std::iter::repeat_n(0.5, 128).chain(std::iter::repeat_n(-0.25, 128)));
    x.extend((1280..1280 + 16 * 256).map(|i| pseudo(i) * 2f32.powi((i / 16 % 5) as i32 - 2)));
    x
}

#[test]
fn every_format_quantizes_to_the_bytes_llama_cpp_writes() {
    let x = golden_input();
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/ggml_quant");
    for kind in QuantType::ALL {
        let file = format!("{fixtures}/{}.bin", kind.name().to_lowercase());
        let want = std::fs::read(&file).unwrap_or_else(|e| panic!("{file}: {e}"));
        let got = quantize(kind, &x).expect("whole blocks");
        assert_eq!(got.len(), want.len(), "{kind:?}");
        let first = got.iter().zip(&want).position(|(a, b)| a != b);
        assert_eq!(first, None, "{kind:?}: the first byte that differs");
    }
}

#[test]
fn q8_0_matches_llama_cpp_on_a_block_written_by_hand() {
    let mut x = [0.0f32; 32];
    x[0] = 1.27;
    x[1] = -0.635;
    x[2] = 0.004;
    let blocks = quantize(QuantType::Q8_0, &x).unwrap();
    assert_eq!(
        f16::from_le_bytes([blocks[0], blocks[1]]),
        f16::from_f32(0.01)
    );
    assert_eq!(&blocks[2..5], &[127u8, (-64i8) as u8, 0]);
    assert!(quantize(QuantType::Q8_0, &x[..31]).is_none());
    assert!(
        quantize(QuantType::Q6K, &x).is_none(),
        "32 values are no K block"
    );
}

#[test]
fn every_vector_kernel_gives_the_same_products_bit_for_bit() {
    // at a decoding step's few rows the VNNI loops differ from the AVX2 loop only in how the
    // byte products are added up into i32 lanes, which neither saturates: the results must
    // be identical, not close (a prompt's Q8_0 rows take the interleaved loop, which adds
    // its floats in another order)
    let vector: Vec<Kernel> = Kernel::available()
        .into_iter()
        .filter(|k| *k != Kernel::Plain)
        .collect();
    for kind in QuantType::ALL {
        let (m, n, blocks) = (6, 9, 3);
        let d = blocks * kind.block_values();
        let w = random_blocks(kind, n * blocks, 40);
        let x = values(m * d, 41);
        let matrix = QuantMatrix {
            kind,
            bytes: &w,
            n,
            d,
        };
        let products: Vec<Vec<f32>> = vector
            .iter()
            .map(|&k| rows_times_quantized_on(k, &x, m, &[matrix]).remove(0))
            .collect();
        for (k, p) in vector.iter().zip(&products).skip(1) {
            assert_eq!(p, &products[0], "{kind:?}: {k:?} against {:?}", vector[0]);
        }
    }
}

#[test]
fn the_vector_quantizer_writes_the_plain_quantizers_rows() {
    // a block of zeros, and two values of the largest magnitude with opposite signs (the K
    // quantizer keeps the first one's sign)
    let mut x = values(3 * 256, 7);
    x[256..288].fill(0.0);
    x[300] = -9.0;
    x[301] = 9.0;
    for kernel in Kernel::available() {
        for kind in [QuantType::Q8_0, QuantType::Q4K] {
            let plain = Q8Row::quantize_for(kind, &x);
            let got = super::quantize_row(kernel, kind, &x);
            let what = format!("{kernel:?} {kind:?}");
            assert_eq!(got.qs, plain.qs, "{what}: values");
            assert_eq!(got.d, plain.d, "{what}: scales");
            assert_eq!(got.sums, plain.sums, "{what}: sums");
            assert_eq!(got.scaled_sums, plain.scaled_sums, "{what}: scaled sums");
        }
    }
}
