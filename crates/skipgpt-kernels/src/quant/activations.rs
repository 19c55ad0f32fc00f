//! The activation rows quantized with AVX2, eight values an instruction: the bytes, scales and
//! sums of [`Q8Row::quantize`] (ggml's `quantize_row_q8_0`) and [`Q8Row::quantize_k`]
//! (`quantize_row_q8_K`) exactly, as a test checks. A prompt's products quantize every row
//! once per product, which the plain loops spent a tenth of a prompt's time on.

use std::arch::x86_64::*;

use super::{q8_0_scales, q8_k_scales, Q8Row, QuantType, K_BLOCK, Q8_BLOCK};

/// `x` quantized for weights of `kind`, as [`Q8Row::quantize_for`].
///
/// # Safety
/// The CPU has AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quantize_for(kind: QuantType, x: &[f32]) -> Q8Row {
    if kind.is_k() {
        quantize_k(x)
    } else {
        quantize_q8_0(x)
    }
}

#[inline(always)]
unsafe fn quantize_q8_0(x: &[f32]) -> Q8Row {
    assert_eq!(x.len() % Q8_BLOCK, 0, "a whole number of 32-value blocks");
    let mut row = Q8Row::with_capacity(x.len());
    for block in x.chunks_exact(Q8_BLOCK) {
        let v = load_block(block);
        let amax = largest_magnitude(&v);
        let (d, inv) = q8_0_scales(amax);
        row.push_block(d, &round_block(&v, inv, -127));
    }
    row
}

#[inline(always)]
unsafe fn quantize_k(x: &[f32]) -> Q8Row {
    assert_eq!(x.len() % K_BLOCK, 0, "a whole number of 256-value blocks");
    let mut row = Q8Row::with_capacity(x.len());
    for block in x.chunks_exact(K_BLOCK) {
        let mut groups = [[_mm256_setzero_ps(); 4]; K_BLOCK / Q8_BLOCK];
        let mut amax = 0.0f32;
        for (g, values) in groups.iter_mut().zip(block.chunks_exact(Q8_BLOCK)) {
            *g = load_block(values);
            amax = amax.max(largest_magnitude(g));
        }
        // the first value of that magnitude, with its sign (as the plain loop keeps it)
        let max = block
            .iter()
            .copied()
            .find(|v| v.abs() == amax)
            .unwrap_or(0.0);
        let (d, iscale) = q8_k_scales(max);
        for g in &groups {
            row.push_block(d, &round_block(g, iscale, -128));
        }
    }
    row
}

// (loops rather than `std::array::from_fn`: a closure would not inherit the caller's
// target features, and its intrinsics would become calls)
#[inline(always)]
unsafe fn load_block(block: &[f32]) -> [__m256; 4] {
    let mut v = [_mm256_setzero_ps(); 4];
    for (i, v) in v.iter_mut().enumerate() {
        *v = _mm256_loadu_ps(block.as_ptr().add(8 * i));
    }
    v
}

/// The largest |v| of 32 values.
#[inline(always)]
unsafe fn largest_magnitude(v: &[__m256; 4]) -> f32 {
    let m = _mm256_max_ps(_mm256_max_ps(v[0], v[1]), _mm256_max_ps(v[2], v[3]));
    let less = _mm256_min_ps(_mm256_min_ps(v[0], v[1]), _mm256_min_ps(v[2], v[3]));
    // |v| at its largest is the largest value or minus the smallest
    let m = _mm256_max_ps(m, _mm256_sub_ps(_mm256_setzero_ps(), less));
    let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)))
}

/// 32 values times `scale`, rounded half to even, kept within `low..=127`, as bytes.
#[inline(always)]
unsafe fn round_block(v: &[__m256; 4], scale: f32, low: i32) -> [i8; Q8_BLOCK] {
    let s = _mm256_set1_ps(scale);
    let (lo, hi) = (_mm256_set1_epi32(low), _mm256_set1_epi32(127));
    let mut q = [_mm256_setzero_si256(); 4];
    for (q, &v) in q.iter_mut().zip(v) {
        let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(v, s),
        );
        *q = _mm256_max_epi32(_mm256_min_epi32(_mm256_cvtps_epi32(r), hi), lo);
    }
    // the packs work within 128-bit lanes: put the eight groups of four back in order
    let bytes = _mm256_packs_epi16(
        _mm256_packs_epi32(q[0], q[1]),
        _mm256_packs_epi32(q[2], q[3]),
    );
    let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    let mut out = [0i8; Q8_BLOCK];
    _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, bytes);
    out
}
