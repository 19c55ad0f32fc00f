//! The decoder's small operations in one pass each, on plain f32 slices: RMSNorm, the rotary
//! rotation and SwiGLU's `silu(gate) · up`.
//!
//! Spelled in Burn's tensor operations each is four to seven operations, every one a pass
//! over the rows and a fresh buffer (RMSNorm: square, mean, add, square root, divide,
//! multiply). A decoding step runs about 150 of them on a few rows, where each costs a few
//! microseconds of dispatch and allocation for almost no arithmetic; a prefill runs them on
//! megabytes. Here each is one loop over its rows that the compiler vectorises (compiled for
//! AVX-512 and AVX2 as well as plain x86-64, picked at run time), split over rayon's threads
//! when the rows are many. the model crate's `flex_kernels` routes the CPU backend's tensors here; other
//! backends keep the tensor operations, which the tests compare these against.

use rayon::prelude::*;

use crate::isa::Isa;

/// Values below which an operation runs on the calling thread (a decoding step's rows):
/// handing out the work would cost more than it saves.
const PARALLEL_MIN_VALUES: usize = 1 << 16;

/// Runs `row_op(input_row_index, output_row)` for every row of `out` (`width` values each),
/// in parallel over blocks of rows when there are many.
fn for_rows(out: &mut [f32], width: usize, row_op: impl Fn(usize, &mut [f32]) + Sync) {
    if width == 0 {
        return;
    }
    if out.len() < PARALLEL_MIN_VALUES {
        for (r, row) in out.chunks_mut(width).enumerate() {
            row_op(r, row);
        }
    } else {
        // blocks of rows of about 16K values: few tasks, each long enough to be worth it
        let per_block = (PARALLEL_MIN_VALUES / 4).div_ceil(width).max(1);
        out.par_chunks_mut(per_block * width)
            .enumerate()
            .for_each(|(b, block)| {
                for (k, row) in block.chunks_mut(width).enumerate() {
                    row_op(b * per_block + k, row);
                }
            });
    }
}

/// `x / sqrt(mean(x²) + eps) · weight` for every row of `x` (`[rows, dim]`, `dim` =
/// `weight.len()`); the sum of squares in f32, as transformers computes it.
///
/// # Panics
/// When `x.len()` is not a multiple of `weight.len()`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let dim = weight.len();
    assert!(
        dim > 0 && x.len().is_multiple_of(dim),
        "rows of {dim} values"
    );
    let isa = Isa::detect();
    let mut out = vec![0.0f32; x.len()];
    for_rows(&mut out, dim, |r, row| {
        rms_norm_row(isa, &x[r * dim..(r + 1) * dim], weight, eps, row)
    });
    out
}

/// `x · cos + rotate_half(x) · sin` for every head of every row: `x` is `[rows, heads,
/// head_dim]`, `cos` and `sin` `[rows, head_dim]` (one row of angles per token, the same for
/// every head; each half of a head shares the other's angles, as `RotaryEmbedding` builds
/// them). `rotate_half` is `[-x₂, x₁]` of the halves `x₁`, `x₂`.
///
/// # Panics
/// When the lengths disagree with the shapes or `head_dim` is odd.
pub fn rotate(x: &[f32], heads: usize, head_dim: usize, cos: &[f32], sin: &[f32]) -> Vec<f32> {
    let width = heads * head_dim;
    let rows = x.len() / width.max(1);
    assert!(
        head_dim.is_multiple_of(2)
            && x.len() == rows * width
            && cos.len() == rows * head_dim
            && sin.len() == cos.len(),
        "[rows, {heads}, {head_dim}] rotated by [rows, {head_dim}] tables"
    );
    let isa = Isa::detect();
    let mut out = vec![0.0f32; x.len()];
    for_rows(&mut out, width, |r, row| {
        let (c, s) = (
            &cos[r * head_dim..(r + 1) * head_dim],
            &sin[r * head_dim..(r + 1) * head_dim],
        );
        let input = &x[r * width..(r + 1) * width];
        for (xh, oh) in input.chunks(head_dim).zip(row.chunks_mut(head_dim)) {
            rotate_head(isa, xh, c, s, oh);
        }
    });
    out
}

/// `silu(gate) · up`, `silu(g) = g · sigmoid(g)`, elementwise.
///
/// # Panics
/// When the lengths differ.
pub fn swiglu(gate: &[f32], up: &[f32]) -> Vec<f32> {
    assert_eq!(gate.len(), up.len(), "gate and up");
    let isa = Isa::detect();
    let mut out = vec![0.0f32; gate.len()];
    // rows of 1024 values: the blocks `for_rows` splits are whole rows
    const ROW: usize = 1024;
    for_rows(&mut out, ROW, |r, row| {
        let from = r * ROW;
        let to = from + row.len();
        swiglu_run(isa, &gate[from..to], &up[from..to], row)
    });
    out
}

/// `$name(isa, args)` dispatching to `$body` compiled for AVX-512, AVX2 + FMA, or plain.
macro_rules! multiversion {
    ($name:ident, $body:ident, ($($arg:ident: $ty:ty),*)) => {
        fn $name(isa: Isa, $($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn wide($($arg: $ty),*) {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn narrow($($arg: $ty),*) {
                    $body($($arg),*)
                }
                match isa {
                    // SAFETY: `Isa::detect` found the features
                    Isa::Avx512 => return unsafe { wide($($arg),*) },
                    Isa::Avx2 => return unsafe { narrow($($arg),*) },
                    Isa::Plain => {}
                }
            }
            let _ = isa;
            $body($($arg),*)
        }
    };
}

multiversion!(rms_norm_row, rms_norm_body, (x: &[f32], w: &[f32], eps: f32, out: &mut [f32]));
multiversion!(rotate_head, rotate_body, (x: &[f32], cos: &[f32], sin: &[f32], out: &mut [f32]));
multiversion!(swiglu_run, swiglu_body, (gate: &[f32], up: &[f32], out: &mut [f32]));

#[inline(always)]
fn rms_norm_body(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    // sixteen partial sums, so that the additions vectorise
    let mut sums = [0.0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for (s, v) in sums.iter_mut().zip(c) {
            *s += v * v;
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
    let sum = sums.iter().sum::<f32>() + tail;
    let scale = 1.0 / (sum / x.len() as f32 + eps).sqrt();
    for ((o, v), g) in out.iter_mut().zip(x).zip(w) {
        *o = v * scale * g;
    }
}

#[inline(always)]
fn rotate_body(x: &[f32], cos: &[f32], sin: &[f32], out: &mut [f32]) {
    let half = x.len() / 2;
    let (x1, x2) = x.split_at(half);
    let (o1, o2) = out.split_at_mut(half);
    let (c1, c2) = cos.split_at(half);
    let (s1, s2) = sin.split_at(half);
    for i in 0..half {
        o1[i] = x1[i] * c1[i] - x2[i] * s1[i];
        o2[i] = x2[i] * c2[i] + x1[i] * s2[i];
    }
}

#[inline(always)]
fn swiglu_body(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        // sigmoid from e^-|g| (never overflows): 1/(1+e) for g >= 0, e/(1+e) below
        let e = crate::attention::exp_nonpositive(-g.abs());
        let sigmoid = if g >= 0.0 { 1.0 } else { e } / (1.0 + e);
        *o = g * sigmoid * u;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values in [-4, 4).
    fn values(n: usize, seed: u32) -> Vec<f32> {
        crate::test_values::values_within(n, seed, 4.0)
    }

    fn assert_close(got: &[f32], want: &[f64], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (k, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (*g as f64 - w).abs() <= 2e-6 * (1.0 + w.abs()),
                "{what}: value {k}: {g} against {w}"
            );
        }
    }

    #[test]
    fn the_operations_match_f64_on_every_instruction_set_and_size() {
        // a few rows (decoding, one thread) and many (prefill, split over threads), with
        // widths that leave vector tails
        for (rows, dim) in [(1, 576), (3, 37), (700, 576), (129, 100)] {
            let x = values(rows * dim, 1);
            let w = values(dim, 2);
            let want: Vec<f64> = x
                .chunks(dim)
                .flat_map(|row| {
                    let ms = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / dim as f64;
                    let scale = 1.0 / (ms + 1e-5).sqrt();
                    row.iter()
                        .zip(&w)
                        .map(move |(v, g)| *v as f64 * scale * *g as f64)
                        .collect::<Vec<_>>()
                })
                .collect();
            for isa in Isa::available() {
                let mut got = vec![0.0; x.len()];
                for (r, out) in got.chunks_mut(dim).enumerate() {
                    rms_norm_row(isa, &x[r * dim..(r + 1) * dim], &w, 1e-5, out);
                }
                assert_close(&got, &want, &format!("rms_norm {rows}x{dim} {isa:?}"));
            }
            assert_close(
                &rms_norm(&x, &w, 1e-5),
                &want,
                &format!("rms_norm {rows}x{dim}"),
            );

            let up = values(rows * dim, 3);
            let want: Vec<f64> = x
                .iter()
                .zip(&up)
                .map(|(&g, &u)| {
                    let g = g as f64;
                    g / (1.0 + (-g).exp()) * u as f64
                })
                .collect();
            for isa in Isa::available() {
                let mut got = vec![0.0; x.len()];
                swiglu_run(isa, &x, &up, &mut got);
                assert_close(&got, &want, &format!("swiglu {rows}x{dim} {isa:?}"));
            }
            assert_close(&swiglu(&x, &up), &want, &format!("swiglu {rows}x{dim}"));
        }
        // the sigmoid's far ends stay finite
        let far = swiglu(&[-200.0, 200.0, 0.0], &[1.0, 1.0, 1.0]);
        assert!(far[0] <= 0.0 && far[0] > -1e-30, "silu(-200) = {}", far[0]);
        assert_eq!(&far[1..], &[200.0, 0.0]);
    }

    #[test]
    fn rotation_matches_rotate_half_per_head() {
        for (rows, heads, hd) in [(1, 9, 64), (5, 3, 16), (300, 4, 64)] {
            let x = values(rows * heads * hd, 4);
            let angles = values(rows * hd / 2, 5);
            // each half of a head shares the angles, as RotaryEmbedding builds them
            let table = |f: fn(f64) -> f64| -> Vec<f32> {
                (0..rows)
                    .flat_map(|r| {
                        let a = &angles[r * hd / 2..(r + 1) * hd / 2];
                        a.iter().chain(a).map(move |&v| f(v as f64) as f32)
                    })
                    .collect()
            };
            let (cos, sin) = (table(f64::cos), table(f64::sin));
            let mut want = vec![0.0f64; x.len()];
            for r in 0..rows {
                for h in 0..heads {
                    let base = (r * heads + h) * hd;
                    for i in 0..hd {
                        let rotated = if i < hd / 2 {
                            -(x[base + i + hd / 2] as f64)
                        } else {
                            x[base + i - hd / 2] as f64
                        };
                        want[base + i] = x[base + i] as f64 * cos[r * hd + i] as f64
                            + rotated * sin[r * hd + i] as f64;
                    }
                }
            }
            assert_close(
                &rotate(&x, heads, hd, &cos, &sin),
                &want,
                &format!("rotate {rows}x{heads}x{hd}"),
            );
            for isa in Isa::available() {
                let mut got = vec![0.0; hd];
                rotate_head(isa, &x[..hd], &cos[..hd], &sin[..hd], &mut got);
                assert_close(&got, &want[..hd], &format!("rotate_head {isa:?}"));
            }
        }
    }
}
