//! The products against an f64 reference, on every instruction set this CPU has.

use super::*;

use crate::test_values::values;

/// The products in f64 from the weights as stored (already rounded to their type).
fn reference(x: &[f32], m: usize, w: &[f32], d_in: usize, d_out: usize) -> Vec<f32> {
    let mut y = vec![0.0f32; m * d_out];
    for r in 0..m {
        for j in 0..d_out {
            let s: f64 = (0..d_in)
                .map(|i| x[r * d_in + i] as f64 * w[i * d_out + j] as f64)
                .sum();
            y[r * d_out + j] = s as f32;
        }
    }
    y
}

fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0; w.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = w[r * cols + c];
        }
    }
    t
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
            "{what}: value {k}: {g} against {w}"
        );
    }
}

/// Shapes with whole vectors, ragged tails, fewer columns than a vector, matrices large
/// enough to be split into bands (on more than one thread) whose partial sums are added,
/// and row counts that leave partial blocks of rows and of outputs (blocks of 4 rows
/// against 1, 2 or 4 outputs).
const SHAPES: [(usize, usize, usize); 9] = [
    (1, 64, 48),
    (3, 37, 29),
    (1, 5, 7),
    (8, 130, 1000),
    (2, 576, 1536),
    (1, 1536, 577),
    (5, 48, 7),
    (17, 576, 70),
    (33, 40, 131),
];

#[test]
fn every_type_and_shape_matches_the_plain_product() {
    for (k, &(m, d_in, d_out)) in SHAPES.iter().enumerate() {
        let x = values(m * d_in, k as u32);
        let w = values(d_in * d_out, 100 + k as u32);
        let halves: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
        let bhalves: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let as_f32 = |h: &[f16]| h.iter().map(|v| v.to_f32()).collect::<Vec<_>>();
        let bas_f32 = |h: &[bf16]| h.iter().map(|v| v.to_f32()).collect::<Vec<_>>();
        let cases: [(WeightSlice, Vec<f32>, &str); 3] = [
            (WeightSlice::F32(&w), w.clone(), "f32"),
            (WeightSlice::F16(&halves), as_f32(&halves), "f16"),
            (WeightSlice::Bf16(&bhalves), bas_f32(&bhalves), "bf16"),
        ];
        for (slice, exact, name) in cases {
            let want = reference(&x, m, &exact, d_in, d_out);
            let what = format!("{name} {m}x{d_in}x{d_out}");
            for isa in Isa::available() {
                let out_in = false;
                let got = one_product(
                    isa,
                    &x,
                    m,
                    Matrix {
                        w: slice,
                        d_in,
                        d_out,
                        out_in,
                    },
                );
                assert_close(&got, &want, &format!("{what} {isa:?}"));
            }
            // the same product with W stored the other way round
            let t = transpose(&exact, d_in, d_out);
            let (t16, tb16): (Vec<f16>, Vec<bf16>) = (
                t.iter().map(|&v| f16::from_f32(v)).collect(),
                t.iter().map(|&v| bf16::from_f32(v)).collect(),
            );
            let t_slice = match slice {
                WeightSlice::F32(_) => WeightSlice::F32(&t),
                WeightSlice::F16(_) => WeightSlice::F16(&t16),
                WeightSlice::Bf16(_) => WeightSlice::Bf16(&tb16),
            };
            let what = format!("{what}, transposed");
            for isa in Isa::available() {
                let (w, out_in) = (t_slice, true);
                let got = one_product(
                    isa,
                    &x,
                    m,
                    Matrix {
                        w,
                        d_in,
                        d_out,
                        out_in,
                    },
                );
                assert_close(&got, &want, &format!("{what} {isa:?}"));
            }
        }
    }
}

#[test]
fn several_matrices_in_one_pass_each_get_their_own_product() {
    // q, k, v-like projections of the same rows: both layouts, all three types, one large
    // enough to be split into bands, on a pool of several threads so the bands of different
    // matrices really are interleaved among tasks
    let (m, d_in) = (3, 576);
    let x = values(m * d_in, 7);
    let outs = [1536, 64, 192, 5];
    let ws: Vec<Vec<f32>> = outs
        .iter()
        .enumerate()
        .map(|(k, &o)| values(d_in * o, 50 + k as u32))
        .collect();
    let halves: Vec<f16> = ws[1].iter().map(|&v| f16::from_f32(v)).collect();
    let t2: Vec<bf16> = transpose(&ws[2], d_in, outs[2])
        .iter()
        .map(|&v| bf16::from_f32(v))
        .collect();
    let t0 = transpose(&ws[0], d_in, outs[0]);
    let matrices = [
        Matrix {
            w: WeightSlice::F32(&t0),
            d_in,
            d_out: outs[0],
            out_in: true,
        },
        Matrix {
            w: WeightSlice::F16(&halves),
            d_in,
            d_out: outs[1],
            out_in: false,
        },
        Matrix {
            w: WeightSlice::Bf16(&t2),
            d_in,
            d_out: outs[2],
            out_in: true,
        },
        Matrix {
            w: WeightSlice::F32(&ws[3]),
            d_in,
            d_out: outs[3],
            out_in: false,
        },
    ];
    let exact: Vec<Vec<f32>> = vec![
        ws[0].clone(),
        halves.iter().map(|v| v.to_f32()).collect(),
        transpose(
            &t2.iter().map(|v| v.to_f32()).collect::<Vec<_>>(),
            outs[2],
            d_in,
        ),
        ws[3].clone(),
    ];
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .unwrap();
    for isa in Isa::available() {
        let ys = pool.install(|| rows_times_matrices_on(isa, &x, m, &matrices));
        assert_eq!(ys.len(), matrices.len());
        for (k, y) in ys.iter().enumerate() {
            let want = reference(&x, m, &exact[k], d_in, outs[k]);
            assert_close(y, &want, &format!("matrix {k} {isa:?}"));
        }
    }
    assert!(rows_times_matrices(&x, m, &[]).is_empty());
}

#[test]
fn large_products_are_split_into_bands_and_small_ones_are_not() {
    // SmolLM2's down projection: 1536 rows of 576 values, shared among the threads
    let band = block_size(1536, 576);
    let threads = rayon::current_num_threads();
    assert_eq!(band % 16, 0);
    assert!(band * 576 >= MIN_VALUES_PER_TASK);
    if threads > 1 {
        assert!(band < 1536, "one band of {band} rows for {threads} threads");
    }
    // a small product stays one task
    assert_eq!(block_size(48, 64), 48);
}
