//! The x86-64 loops of [`super`], compiled for AVX-512 and for AVX2 with FMA and F16C; the
//! caller picks one with [`crate::isa::Isa::detect`]. Each loads 16 (AVX-512) or 8 (AVX2)
//! weights, widens them to f32 and multiplies-adds them into f32 accumulators.

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
                    crate::prefetch::ask_ahead(w0.add(c), 2 * $lanes * std::mem::size_of::<W>());
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
