//! Products of a few activation rows with a large weight matrix, on every core: the work of a
//! decoding step on a CPU.
//!
//! Decoding one token multiplies one row by every weight matrix of the model, so its time is
//! the weight bytes over the memory bandwidth. burn-flex hands such a product to gemm on one
//! core (it parallelises only products above about 192³ multiply-adds), and widens f16/bf16
//! operands whole before multiplying. These kernels read each weight once, in storage order,
//! split over rayon's threads, and widen f16/bf16 weights to f32 in registers as they stream
//! past, accumulating in f32. They work on plain slices and know nothing of Burn;
//! the model crate's `flex_kernels` routes the CPU backend's small products here.
//!
//! Two layouts:
//! - [`rows_times_matrix`]: `x · W` with `W` stored `[in, out]` (Burn's `Linear` layout); each
//!   task takes a band of `W`'s rows (a contiguous stretch of memory) and adds its partial sums
//!   for every output column; the partial sums are added at the end;
//! - [`rows_times_matrix_t`]: `x · Wᵀ` with `W` stored `[out, in]` (the tied output head reads
//!   the embedding table so); each task takes a band of `W`'s rows and their dot products.
//!
//! On x86-64 the loops are compiled three times (AVX-512, AVX2 with FMA and F16C, and plain
//! Rust) and the widest the CPU supports is picked at run time.

use std::ops::Range;

use half::{bf16, f16};

use crate::isa::Isa;

/// A weight matrix's values, in the type they are stored in.
#[derive(Clone, Copy, Debug)]
pub enum WeightSlice<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Bf16(&'a [bf16]),
}

/// `$body` with `$w` bound to the slice in its stored type (the kernels are generic over it).
macro_rules! typed {
    ($slice:expr, $w:ident => $body:expr) => {
        match $slice {
            WeightSlice::F32($w) => $body,
            WeightSlice::F16($w) => $body,
            WeightSlice::Bf16($w) => $body,
        }
    };
}

impl WeightSlice<'_> {
    pub fn len(&self) -> usize {
        typed!(self, w => w.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Weight values per task below which splitting a product costs more in thread hand-offs than
/// it gains in bandwidth (64K values: about 10 µs of reading at f32).
const MIN_VALUES_PER_TASK: usize = 64 * 1024;

/// Tasks per thread a product is split into (where its size allows): the threads claim them as
/// they go, so one that started late or was slowed down takes fewer. With one task per thread,
/// the decoding step's leader waited for its helper 3-5% of the time (its helper picks up each
/// product a little after the leader); with four, 1.8% (SmolLM2, 2 threads, `perf`).
const TASKS_PER_THREAD: usize = 4;

/// Rows of `W` per task: an even share of `n` rows among [`TASKS_PER_THREAD`] tasks per thread
/// (rounded up to a multiple of 16), and no fewer than hold [`MIN_VALUES_PER_TASK`] weight
/// values.
fn block_size(n: usize, values_per_output: usize) -> usize {
    let threads = rayon::current_num_threads().max(1) * TASKS_PER_THREAD;
    let share = n.div_ceil(threads).div_ceil(16) * 16;
    let floor = MIN_VALUES_PER_TASK
        .div_ceil(values_per_output.max(1))
        .div_ceil(16)
        * 16;
    share.max(floor).min(n).max(1)
}

/// One matrix of [`rows_times_matrices`] and how it is stored.
#[derive(Clone, Copy, Debug)]
pub struct Matrix<'a> {
    pub w: WeightSlice<'a>,
    pub d_in: usize,
    pub d_out: usize,
    /// Stored `[d_out, d_in]`, a row per output (checkpoints' layout, the tied head), rather
    /// than `[d_in, d_out]` (Burn's `Linear` layout).
    pub out_in: bool,
}

/// `y = x · W` for each of `matrices`: `m` rows of `x` (`[m, d_in]`, row-major, the same for
/// every matrix) times each `W`. Returns each `y` as `[m, d_out]`, row-major.
///
/// All the products are one parallel pass: their bands of rows are the tasks of one
/// [`crate::thread_team::par_map`], so several projections of the same rows (q, k and v; gate and up)
/// cost one hand-over between threads instead of one each.
///
/// # Panics
/// When a matrix's `d_in` is not `x`'s width or its slice is not `d_in·d_out` long (callers
/// check shapes first).
pub fn rows_times_matrices(x: &[f32], m: usize, matrices: &[Matrix<'_>]) -> Vec<Vec<f32>> {
    rows_times_matrices_on(Isa::detect(), x, m, matrices)
}

fn rows_times_matrices_on(isa: Isa, x: &[f32], m: usize, matrices: &[Matrix<'_>]) -> Vec<Vec<f32>> {
    // the tasks: (matrix, band of its stored rows)
    let mut tasks: Vec<(usize, Range<usize>)> = Vec::new();
    for (k, mat) in matrices.iter().enumerate() {
        assert_eq!(x.len(), m * mat.d_in, "activation rows");
        assert_eq!(mat.w.len(), mat.d_in * mat.d_out, "weight matrix");
        let (rows, per_row) = if mat.out_in {
            (mat.d_out, mat.d_in)
        } else {
            (mat.d_in, mat.d_out)
        };
        let band = block_size(rows, per_row);
        tasks.extend(
            (0..rows)
                .step_by(band)
                .map(|i| (k, i..(i + band).min(rows))),
        );
    }
    let results = crate::thread_team::par_map(tasks.len(), |t| {
        let (k, rows) = &tasks[t];
        let mat = &matrices[*k];
        if mat.out_in {
            // the outputs `rows`: `[m, rows.len()]`
            let mut out = vec![0.0f32; m * rows.len()];
            let dots = Dots {
                x,
                m,
                d: mat.d_in,
                outputs: rows.clone(),
            };
            typed!(mat.w, w => dots.run(isa, w, &mut out));
            out
        } else {
            // one contiguous band of W's rows over all columns into partial sums of its own,
            // added below. (Splitting the columns instead makes every task read short pieces
            // of every row; on SmolLM2's matrices that ran at half the bandwidth.)
            let mut acc = vec![0.0f32; m * mat.d_out];
            let band = Band {
                x,
                m,
                d_in: mat.d_in,
                d_out: mat.d_out,
                rows: rows.clone(),
            };
            typed!(mat.w, w => band.run(isa, w, &mut acc));
            acc
        }
    });
    let mut ys: Vec<Option<Vec<f32>>> = vec![None; matrices.len()];
    for ((k, rows), out) in tasks.iter().zip(results) {
        let mat = &matrices[*k];
        let slot = &mut ys[*k];
        // a product's first task: its partial sums, or its outputs if it covers them all
        if slot.is_none() && (!mat.out_in || rows.len() == mat.d_out) {
            *slot = Some(out);
            continue;
        }
        let y = slot.get_or_insert_with(|| vec![0.0f32; m * mat.d_out]);
        if mat.out_in {
            let (n, len) = (mat.d_out, rows.len());
            for r in 0..m {
                y[r * n + rows.start..r * n + rows.end]
                    .copy_from_slice(&out[r * len..(r + 1) * len]);
            }
        } else {
            for (total, part) in y.iter_mut().zip(out) {
                *total += part;
            }
        }
    }
    ys.into_iter()
        .zip(matrices)
        .map(|(y, mat)| y.unwrap_or_else(|| vec![0.0f32; m * mat.d_out]))
        .collect()
}

/// `y = x · W`: `m` rows of `x` (`[m, d_in]`, row-major) times `W` stored `[d_in, d_out]`.
/// Returns `y` as `[m, d_out]`, row-major ([`rows_times_matrices`] of one matrix).
///
/// # Panics
/// When the slices' lengths are not `m·d_in` and `d_in·d_out` (callers check shapes first).
pub fn rows_times_matrix(
    x: &[f32],
    m: usize,
    w: WeightSlice<'_>,
    d_in: usize,
    d_out: usize,
) -> Vec<f32> {
    let out_in = false;
    one_product(
        Isa::detect(),
        x,
        m,
        Matrix {
            w,
            d_in,
            d_out,
            out_in,
        },
    )
}

/// `y = x · Wᵀ`: `m` rows of `x` (`[m, d]`) times `W` stored `[n, d]` (each output is a dot
/// product with one row of `W`). Returns `y` as `[m, n]`, row-major.
///
/// # Panics
/// When the slices' lengths are not `m·d` and `n·d`.
pub fn rows_times_matrix_t(
    x: &[f32],
    m: usize,
    w: WeightSlice<'_>,
    n: usize,
    d: usize,
) -> Vec<f32> {
    let (d_in, d_out, out_in) = (d, n, true);
    one_product(
        Isa::detect(),
        x,
        m,
        Matrix {
            w,
            d_in,
            d_out,
            out_in,
        },
    )
}

/// `m` rows of `x` times one matrix, with the loops of `isa`.
fn one_product(isa: Isa, x: &[f32], m: usize, matrix: Matrix<'_>) -> Vec<f32> {
    rows_times_matrices_on(isa, x, m, &[matrix]).remove(0)
}

/// The weights as f32, in their storage order, converted on every core (f16 through the CPU's
/// conversion instructions where it has them, bf16 by a 16-bit shift).
///
/// A prefill multiplies hundreds of rows by each matrix: arithmetic, not reading the weights,
/// bounds it, and gemm's f32 kernels run about 1.2x faster than its f16 ones on CPUs without
/// f16 arithmetic (burn-flex has no bf16 kernel at all). Widening a matrix costs about 1% of
/// such a product.
pub fn widen_to_f32(w: WeightSlice<'_>) -> Vec<f32> {
    use half::slice::HalfFloatSliceExt;
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    let mut out = vec![0.0f32; w.len()];
    match w {
        WeightSlice::F32(w) => out.copy_from_slice(w),
        WeightSlice::F16(w) => out
            .par_chunks_mut(CHUNK)
            .zip(w.par_chunks(CHUNK))
            .for_each(|(o, h)| h.convert_to_f32_slice(o)),
        WeightSlice::Bf16(w) => out
            .par_chunks_mut(CHUNK)
            .zip(w.par_chunks(CHUNK))
            .for_each(|(o, h)| h.convert_to_f32_slice(o)),
    }
    out
}

/// Whether this CPU runs one of the vector loops (AVX-512, or AVX2 with FMA and F16C). Without
/// one, f16 weights are converted one value at a time (in software on some targets); f32 and
/// bf16 loops are plain arithmetic the compiler vectorises everywhere.
pub fn widens_in_registers() -> bool {
    Isa::detect() != Isa::Plain
}

/// A weight type the kernels widen to f32.
trait Widen: Copy + Send + Sync {
    fn widen(self) -> f32;
}

impl Widen for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl Widen for f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

impl Widen for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

/// One task of [`rows_times_matrix`]: the partial sums over a band of `W`'s rows.
struct Band<'a> {
    x: &'a [f32],
    m: usize,
    d_in: usize,
    d_out: usize,
    rows: Range<usize>,
}

impl Band<'_> {
    /// `acc[r, :] += Σ_{i in rows} x[r, i] · W[i, :]`, `acc` being `[m, d_out]`.
    fn run<W: Widen + simd::Lanes>(&self, isa: Isa, w: &[W], acc: &mut [f32]) {
        match isa {
            // SAFETY: `Isa::detect` found the features; indices stay within the slices'
            // lengths, which `rows_times_matrix` asserted
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { simd::band_avx512(self, w, acc) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { simd::band_avx2(self, w, acc) },
            Isa::Plain => self.scalar(w, acc, 0),
        }
    }

    /// Columns `from..d_out`, one value at a time: every column where no SIMD path applies,
    /// the tail past the last whole vector otherwise.
    fn scalar<W: Widen>(&self, w: &[W], acc: &mut [f32], from: usize) {
        let columns = self.d_out - from;
        if columns < 8 {
            // a few columns (a router's two logits, a tail): one running sum per column down
            // the band's rows, instead of a short inner loop per weight row
            let band = &w[self.rows.start * self.d_out..self.rows.end * self.d_out];
            for r in 0..self.m {
                let x = &self.x[r * self.d_in..(r + 1) * self.d_in][self.rows.clone()];
                for j in from..self.d_out {
                    let column = band[j..].iter().step_by(self.d_out);
                    let sum: f32 = x.iter().zip(column).map(|(a, b)| a * b.widen()).sum();
                    acc[r * self.d_out + j] += sum;
                }
            }
            return;
        }
        for i in self.rows.clone() {
            let row = &w[i * self.d_out..(i + 1) * self.d_out];
            for r in 0..self.m {
                let xi = self.x[r * self.d_in + i];
                let a = &mut acc[r * self.d_out..(r + 1) * self.d_out];
                for j in from..self.d_out {
                    a[j] += xi * row[j].widen();
                }
            }
        }
    }
}

/// One task of [`rows_times_matrix_t`]: `outputs` (rows of `W`) for every row of `x`.
struct Dots<'a> {
    x: &'a [f32],
    m: usize,
    d: usize,
    outputs: Range<usize>,
}

impl Dots<'_> {
    /// `out[r, k] = x[r, :] · W[outputs.start + k, :]`, `out` being `[m, outputs.len()]`.
    ///
    /// The vector loops multiply each weight vector, loaded and widened once, with a block of
    /// rows of `x` (up to 8 with AVX-512, 4 with AVX2) whose products accumulate in registers:
    /// with several rows (batched decoding, a short prompt) the loop does not reload and
    /// rewiden the weights for every row.
    fn run<W: Widen + simd::Lanes>(&self, isa: Isa, w: &[W], out: &mut [f32]) {
        match isa {
            // SAFETY: `Isa::detect` found the features; `rows_times_matrices` asserted the
            // slices' lengths, and `outputs` lies within W's rows
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { simd::dots_avx512(self, w, out) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { simd::dots_avx2(self, w, out) },
            Isa::Plain => self.scalar(w, out),
        }
    }

    fn scalar<W: Widen>(&self, w: &[W], out: &mut [f32]) {
        let len = self.outputs.len();
        for (k, v) in self.outputs.clone().enumerate() {
            let row = &w[v * self.d..(v + 1) * self.d];
            for r in 0..self.m {
                let x = &self.x[r * self.d..(r + 1) * self.d];
                out[r * len + k] = x.iter().zip(row).map(|(a, b)| a * b.widen()).sum();
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod simd;

#[cfg(not(target_arch = "x86_64"))]
mod simd {
    /// Elsewhere the kernels run their plain loops, which the compiler vectorises for the
    /// target it builds for.
    pub trait Lanes {}
    impl Lanes for f32 {}
    impl Lanes for half::f16 {}
    impl Lanes for half::bf16 {}
}

#[cfg(test)]
mod tests;
