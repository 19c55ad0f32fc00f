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
    rows_times_matrix_on(Isa::detect(), x, m, w, d_in, d_out)
}

fn rows_times_matrix_on(
    isa: Isa,
    x: &[f32],
    m: usize,
    w: WeightSlice<'_>,
    d_in: usize,
    d_out: usize,
) -> Vec<f32> {
    let mat = Matrix {
        w,
        d_in,
        d_out,
        out_in: false,
    };
    rows_times_matrices_on(isa, x, m, &[mat]).remove(0)
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
    rows_times_matrix_t_on(Isa::detect(), x, m, w, n, d)
}

fn rows_times_matrix_t_on(
    isa: Isa,
    x: &[f32],
    m: usize,
    w: WeightSlice<'_>,
    n: usize,
    d: usize,
) -> Vec<f32> {
    let mat = Matrix {
        w,
        d_in: d,
        d_out: n,
        out_in: true,
    };
    rows_times_matrices_on(isa, x, m, &[mat]).remove(0)
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
mod simd {
    //! The x86-64 loops. Each loads 16 (AVX-512) or 8 (AVX2) weights, widens them to f32 and
    //! multiplies-adds them into f32 accumulators.

    use std::arch::x86_64::*;

    use half::{bf16, f16};

    use super::{Band, Dots, Widen};

    /// Loading 16 or 8 consecutive weights as f32 lanes.
    pub trait Lanes: Sized {
        /// f32 itself: loading needs no widening instruction.
        const IS_F32: bool = false;
        /// # Safety
        /// AVX-512F is available and `p..p+16` is readable.
        unsafe fn load16(p: *const Self) -> __m512;
        /// # Safety
        /// AVX2 and F16C are available and `p..p+8` is readable.
        unsafe fn load8(p: *const Self) -> __m256;
    }

    impl Lanes for f32 {
        const IS_F32: bool = true;
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn load16(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
        #[inline]
        #[target_feature(enable = "avx2")]
        unsafe fn load8(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
    }

    impl Lanes for f16 {
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn load16(p: *const f16) -> __m512 {
            _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
        }
        #[inline]
        #[target_feature(enable = "avx2,f16c")]
        unsafe fn load8(p: *const f16) -> __m256 {
            _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
        }
    }

    impl Lanes for bf16 {
        // bf16 is the upper half of an f32: widen each 16-bit value and shift it up
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn load16(p: *const bf16) -> __m512 {
            let wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast()));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(wide))
        }
        #[inline]
        #[target_feature(enable = "avx2")]
        unsafe fn load8(p: *const bf16) -> __m256 {
            let wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(wide))
        }
    }

    macro_rules! band_kernel {
        ($name:ident, $feature:literal, $lanes:literal, $load:ident,
         $loadu:ident, $storeu:ident, $set1:ident, $fmadd:ident) => {
            /// # Safety
            /// The CPU has the named features; `w` holds `d_in·d_out` values and `acc`
            /// `m·d_out` (checked by the caller).
            #[target_feature(enable = $feature)]
            pub unsafe fn $name<W: Widen + Lanes>(b: &Band<'_>, w: &[W], acc: &mut [f32]) {
                // one row of W at a time, read in order: a single stream the prefetcher follows
                // (taking several rows per pass to save accumulator traffic measured slower)
                let whole = b.d_out / $lanes * $lanes;
                for i in b.rows.clone() {
                    let row = w.as_ptr().add(i * b.d_out);
                    for r in 0..b.m {
                        let x = $set1(*b.x.get_unchecked(r * b.d_in + i));
                        let a = acc.as_mut_ptr().add(r * b.d_out);
                        let mut j = 0;
                        while j < whole {
                            $storeu(a.add(j), $fmadd(x, W::$load(row.add(j)), $loadu(a.add(j))));
                            j += $lanes;
                        }
                    }
                }
                if whole < b.d_out {
                    b.scalar(w, acc, whole);
                }
            }
        };
    }

    band_kernel!(
        band_avx512,
        "avx512f",
        16,
        load16,
        _mm512_loadu_ps,
        _mm512_storeu_ps,
        _mm512_set1_ps,
        _mm512_fmadd_ps
    );
    band_kernel!(
        band_avx2,
        "avx2,fma,f16c",
        8,
        load8,
        _mm256_loadu_ps,
        _mm256_storeu_ps,
        _mm256_set1_ps,
        _mm256_fmadd_ps
    );

    /// `$name` runs a [`Dots`] task.
    ///
    /// - One row of x (decoding a single sequence: reading the weights bounds it) takes one
    ///   row of W at a time, a single stream of memory, which the prefetcher follows best,
    ///   with two accumulators over alternate vectors to hide the multiply-add latency.
    /// - Several rows of x (batched decoding, a short prompt: arithmetic and loads bound it)
    ///   take blocks of `RW` rows of W against up to 4 rows of x, `RW · 4` accumulators in
    ///   registers: each weight vector is loaded and widened once per block, each row vector
    ///   once per `RW` weight rows. `RW` is `$outputs_f32` for f32 weights and 2 for f16/bf16,
    ///   whose widening costs an instruction per vector (best of the blocks tried on
    ///   SmolLM2's matrices at 8 and 16 rows, `examples/bench_matvec`).
    ///
    /// `$block` is one block, its sizes fixed so that its accumulators stay in registers.
    macro_rules! dots_kernel {
        ($name:ident, $block:ident, $feature:literal, $lanes:literal, $outputs_f32:literal,
         $load:ident, $loadu:ident, $zero:ident, $add:ident, $fmadd:ident, $hsum:ident) => {
            /// # Safety
            /// The CPU has the named features; `w` holds every row of `t.outputs` (`t.d` values
            /// each), `t.x` holds `t.m · t.d` values and `out` `t.m · t.outputs.len()`.
            #[target_feature(enable = $feature)]
            pub unsafe fn $name<W: Widen + Lanes>(t: &Dots<'_>, w: &[W], out: &mut [f32]) {
                let len = t.outputs.len();
                if t.m == 1 {
                    for k in 0..len {
                        $block::<W, 1, 1>(t, w, out, k, 0);
                    }
                    return;
                }
                let outputs = if W::IS_F32 { $outputs_f32 } else { 2 };
                let mut k = 0;
                while k < len {
                    // a full block of W's rows, or the task's last rows one at a time
                    let rw = if len - k >= outputs { outputs } else { 1 };
                    let mut r = 0;
                    while r < t.m {
                        let rx = (t.m - r).min(4);
                        macro_rules! rows {
                            ($rw:literal) => {
                                match rx {
                                    4 => $block::<W, $rw, 4>(t, w, out, k, r),
                                    3 => $block::<W, $rw, 3>(t, w, out, k, r),
                                    2 => $block::<W, $rw, 2>(t, w, out, k, r),
                                    _ => $block::<W, $rw, 1>(t, w, out, k, r),
                                }
                            };
                        }
                        match rw {
                            4 => rows!(4),
                            2 => rows!(2),
                            _ => rows!(1),
                        }
                        r += rx;
                    }
                    k += rw;
                }
            }

            /// Outputs `k..k + RW` of the task for rows `r..r + RX` of x.
            ///
            /// # Safety
            /// As for the task; `k + RW <= t.outputs.len()` and `r + RX <= t.m`.
            #[inline]
            #[target_feature(enable = $feature)]
            unsafe fn $block<W: Widen + Lanes, const RW: usize, const RX: usize>(
                t: &Dots<'_>,
                w: &[W],
                out: &mut [f32],
                k: usize,
                r: usize,
            ) {
                let (d, len) = (t.d, t.outputs.len());
                let whole = d / $lanes * $lanes;
                let w0 = w.as_ptr().add((t.outputs.start + k) * d);
                let x0 = t.x.as_ptr().add(r * d);
                let mut sums = [[0.0f32; RX]; RW];
                if RW == 1 && RX == 1 {
                    let (mut s0, mut s1) = ($zero(), $zero());
                    let mut c = 0;
                    while c + 2 * $lanes <= whole {
                        s0 = $fmadd($loadu(x0.add(c)), W::$load(w0.add(c)), s0);
                        s1 = $fmadd($loadu(x0.add(c + $lanes)), W::$load(w0.add(c + $lanes)), s1);
                        c += 2 * $lanes;
                    }
                    if c < whole {
                        s0 = $fmadd($loadu(x0.add(c)), W::$load(w0.add(c)), s0);
                    }
                    sums[0][0] = $hsum($add(s0, s1));
                } else {
                    let mut acc = [[$zero(); RX]; RW];
                    let mut c = 0;
                    while c < whole {
                        let mut wv = [$zero(); RW];
                        for (i, v) in wv.iter_mut().enumerate() {
                            *v = W::$load(w0.add(i * d + c));
                        }
                        for j in 0..RX {
                            let xv = $loadu(x0.add(j * d + c));
                            for i in 0..RW {
                                acc[i][j] = $fmadd(xv, wv[i], acc[i][j]);
                            }
                        }
                        c += $lanes;
                    }
                    for (sum, a) in sums.iter_mut().zip(&acc) {
                        for (s, &v) in sum.iter_mut().zip(a) {
                            *s = $hsum(v);
                        }
                    }
                }
                // the columns past the last whole vector, and the results
                for (i, sum) in sums.into_iter().enumerate() {
                    for (j, mut s) in sum.into_iter().enumerate() {
                        for c in whole..d {
                            s += *x0.add(j * d + c) * (*w0.add(i * d + c)).widen();
                        }
                        *out.get_unchecked_mut((r + j) * len + k + i) = s;
                    }
                }
            }
        };
    }

    dots_kernel!(
        dots_avx512,
        dots_block_avx512,
        "avx512f",
        16,
        4,
        load16,
        _mm512_loadu_ps,
        _mm512_setzero_ps,
        _mm512_add_ps,
        _mm512_fmadd_ps,
        _mm512_reduce_add_ps
    );
    // 16 vector registers: blocks of 2 x 4 (8 accumulators) for every type
    dots_kernel!(
        dots_avx2,
        dots_block_avx2,
        "avx2,fma,f16c",
        8,
        2,
        load8,
        _mm256_loadu_ps,
        _mm256_setzero_ps,
        _mm256_add_ps,
        _mm256_fmadd_ps,
        hsum256
    );

    /// The sum of the 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn hsum256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
    }
}

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
mod tests {
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
                    let got = rows_times_matrix_on(isa, &x, m, slice, d_in, d_out);
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
                    let got = rows_times_matrix_t_on(isa, &x, m, t_slice, d_out, d_in);
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
}
