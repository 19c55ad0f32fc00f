//! Weight rows in every block format multiplied on AVX2 without unpacking to memory: each
//! block's weights go straight from its bytes into registers, 32 at a time, meet the
//! activations' 32 bytes in one integer dot product ([`PairDot`]: `maddubs` then `madd`, or
//! one `vpdpbusd` where the CPU has VNNI), and add into eight f32 lanes scaled by both sides'
//! scales. A block is decoded once for a tile of
//! activation rows (a prompt's), not once per row. The decoding follows llama.cpp's
//! `ggml_vec_dot_*` for AVX2 (`ggml-cpu/arch/x86/quants.c`).
//!
//! `maddubs` multiplies unsigned by signed bytes. Signed weights (Q8_0, Q4_0, Q5_0) move
//! their sign onto the activations first; the other formats' weights are unsigned as stored,
//! and what they lack (Q4_1's and the K formats' minimum, Q6_K's 32) is added back through the
//! activations' scaled sums per 16 values ([`Q8Row::scaled_sums`]), once per group rather
//! than per value. The K formats add a block's eight groups up in integers first.

use std::arch::x86_64::*;

use super::{Q8Row, QuantType};

/// Activation rows that share each decoded weight block.
const TILE: usize = 4;

/// 32 unsigned bytes times 32 signed bytes, the products added up in fours into eight i32
/// lanes. Neither form saturates here: a pair of products is at most 128·127·2.
pub(super) trait PairDot {
    unsafe fn dot(w: __m256i, a: __m256i) -> __m256i;
}

/// AVX2: `maddubs` into i16 pairs, `madd` by ones into i32.
pub(super) struct Maddubs;

impl PairDot for Maddubs {
    #[inline(always)]
    unsafe fn dot(w: __m256i, a: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), _mm256_set1_epi16(1))
    }
}

/// AVX-VNNI's `vpdpbusd` (VEX-encoded).
pub(super) struct AvxVnni;

impl PairDot for AvxVnni {
    #[inline(always)]
    unsafe fn dot(w: __m256i, a: __m256i) -> __m256i {
        _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), w, a)
    }
}

/// AVX-512 VNNI's `vpdpbusd` on 256-bit registers (CPUs with AVX-512 VNNI but no AVX-VNNI).
pub(super) struct Avx512Vnni;

impl PairDot for Avx512Vnni {
    #[inline(always)]
    unsafe fn dot(w: __m256i, a: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, a)
    }
}

/// `out[r]` = the weight row (whole blocks of `kind`) · `rows[r]`.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `weights` must be whole blocks of `kind` and each of
/// `rows` exactly as long as they hold. For the K formats the rows must carry one scale per
/// 256 values ([`Q8Row::quantize_for`] quantizes them so).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn rows_avx2(kind: QuantType, weights: &[u8], rows: &[Q8Row], out: &mut [f32]) {
    rows_with::<Maddubs>(kind, weights, rows, out)
}

/// [`rows_avx2`] with AVX-VNNI's dot product.
///
/// # Safety
/// As [`rows_avx2`], and the CPU must have AVX-VNNI.
#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
pub(super) unsafe fn rows_avx_vnni(
    kind: QuantType,
    weights: &[u8],
    rows: &[Q8Row],
    out: &mut [f32],
) {
    rows_with::<AvxVnni>(kind, weights, rows, out)
}

/// [`rows_avx2`] with AVX-512 VNNI's dot product.
///
/// # Safety
/// As [`rows_avx2`], and the CPU must have AVX-512 VNNI and VL.
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
pub(super) unsafe fn rows_avx512_vnni(
    kind: QuantType,
    weights: &[u8],
    rows: &[Q8Row],
    out: &mut [f32],
) {
    rows_with::<Avx512Vnni>(kind, weights, rows, out)
}

#[inline(always)]
unsafe fn rows_with<D: PairDot>(kind: QuantType, weights: &[u8], rows: &[Q8Row], out: &mut [f32]) {
    // one copy of the loops per format, so that no format is chosen inside them
    match kind {
        QuantType::Q8_0 => tiles::<D>(QuantType::Q8_0, weights, rows, out),
        QuantType::Q4_0 => tiles::<D>(QuantType::Q4_0, weights, rows, out),
        QuantType::Q4_1 => tiles::<D>(QuantType::Q4_1, weights, rows, out),
        QuantType::Q5_0 => tiles::<D>(QuantType::Q5_0, weights, rows, out),
        QuantType::Q5_1 => tiles::<D>(QuantType::Q5_1, weights, rows, out),
        QuantType::Q4K => tiles::<D>(QuantType::Q4K, weights, rows, out),
        QuantType::Q5K => tiles::<D>(QuantType::Q5K, weights, rows, out),
        QuantType::Q6K => tiles::<D>(QuantType::Q6K, weights, rows, out),
    }
}

/// `rows` in tiles of [`TILE`], the last one shorter, each tile's size known to the loop.
#[inline(always)]
unsafe fn tiles<D: PairDot>(kind: QuantType, weights: &[u8], rows: &[Q8Row], out: &mut [f32]) {
    // one tile reads the weight row once, from memory: ask for it ahead (several tiles read
    // it again from the cache, where asking only costs)
    let ahead = rows.len() <= TILE;
    for (tile, outs) in rows.chunks(TILE).zip(out.chunks_mut(TILE)) {
        match tile.len() {
            4 => tile_rows::<D, 4>(kind, weights, tile, outs, ahead),
            3 => tile_rows::<D, 3>(kind, weights, tile, outs, ahead),
            2 => tile_rows::<D, 2>(kind, weights, tile, outs, ahead),
            _ => tile_rows::<D, 1>(kind, weights, tile, outs, ahead),
        }
    }
}

/// Where a tile's `R` activation rows are, read through pointers so that the loops load no
/// vector headers.
struct Tile<const R: usize> {
    qs: [*const i8; R],
    d: [*const f32; R],
    scaled_sums: [*const f32; R],
}

impl<const R: usize> Tile<R> {
    fn new(rows: &[Q8Row]) -> Self {
        Tile {
            qs: std::array::from_fn(|r| rows[r].qs.as_ptr()),
            d: std::array::from_fn(|r| rows[r].d.as_ptr()),
            scaled_sums: std::array::from_fn(|r| rows[r].scaled_sums.as_ptr()),
        }
    }
}

#[inline(always)]
unsafe fn tile_rows<D: PairDot, const R: usize>(
    kind: QuantType,
    weights: &[u8],
    rows: &[Q8Row],
    out: &mut [f32],
    ahead: bool,
) {
    let tile = Tile::<R>::new(rows);
    let (acc, offsets) = if kind.is_k() {
        k_blocks(kind, weights, &tile, ahead)
    } else {
        small_blocks::<D, R>(kind, weights, &tile, ahead)
    };
    for r in 0..R {
        out[r] = horizontal_sum(acc[r]) + offsets[r];
    }
}

/// The 32-value formats: one scale (and for Q4_1 and Q5_1 an offset) per block. Returns each
/// row's eight partial sums and its offset term.
#[inline(always)]
unsafe fn small_blocks<D: PairDot, const R: usize>(
    kind: QuantType,
    weights: &[u8],
    x: &Tile<R>,
    ahead: bool,
) -> ([__m256; R], [f32; R]) {
    let unsigned = matches!(kind, QuantType::Q4_1 | QuantType::Q5_1);
    let size = kind.block_bytes();
    let mut acc = [_mm256_setzero_ps(); R];
    let mut offsets = [0.0f32; R];
    for b in 0..weights.len() / size {
        if ahead {
            crate::prefetch::ask_ahead(weights.as_ptr().add(b * size), 1);
        }
        let (w, d_w, m_w) = decode_small(kind, weights.as_ptr().add(b * size));
        let w_abs = if unsigned { w } else { _mm256_sign_epi8(w, w) };
        for r in 0..R {
            let a = _mm256_loadu_si256(x.qs[r].add(32 * b) as *const __m256i);
            let a = if unsigned { a } else { _mm256_sign_epi8(a, w) };
            let sums = D::dot(w_abs, a);
            let scale = _mm256_set1_ps(d_w * *x.d[r].add(b));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc[r]);
            if unsigned {
                // Σ (d·q + m)·a = d·Σ q·a + m·Σ a
                let s = x.scaled_sums[r].add(2 * b);
                offsets[r] += m_w * (*s + *s.add(1));
            }
        }
    }
    (acc, offsets)
}

/// One 32-value block's weights as bytes (signed for Q8_0, Q4_0 and Q5_0, unsigned for Q4_1
/// and Q5_1), its scale and (Q4_1, Q5_1) its offset.
#[inline(always)]
pub(super) unsafe fn decode_small(kind: QuantType, p: *const u8) -> (__m256i, f32, f32) {
    let halves = _mm_cvtph_ps(_mm_cvtsi32_si128((p as *const i32).read_unaligned()));
    let first = _mm_cvtss_f32(halves);
    let second = || _mm_cvtss_f32(_mm_shuffle_ps(halves, halves, 1));
    match kind {
        QuantType::Q4_0 => (
            _mm256_sub_epi8(nibbles(p.add(2)), _mm256_set1_epi8(8)),
            first,
            0.0,
        ),
        QuantType::Q4_1 => (nibbles(p.add(4)), first, second()),
        QuantType::Q5_0 => {
            // a clear fifth bit means q − 16 < 0: 0xF0 | nibble is that value as a signed byte
            let high = _mm256_andnot_si256(bits(p.add(2)), _mm256_set1_epi8(0xF0u8 as i8));
            (_mm256_or_si256(nibbles(p.add(6)), high), first, 0.0)
        }
        QuantType::Q5_1 => {
            let high = _mm256_and_si256(bits(p.add(4)), _mm256_set1_epi8(0x10));
            (_mm256_or_si256(nibbles(p.add(8)), high), first, second())
        }
        _ => (_mm256_loadu_si256(p.add(2) as *const __m256i), first, 0.0),
    }
}

/// The 32 nibbles of 16 bytes: byte `j` holds value `j` (low nibble) and `j + 16` (high).
#[inline(always)]
unsafe fn nibbles(p: *const u8) -> __m256i {
    let bytes = _mm_loadu_si128(p as *const __m128i);
    let mask = _mm_set1_epi8(0x0F);
    let low = _mm_and_si128(bytes, mask);
    let high = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
    _mm256_set_m128i(high, low)
}

/// The 32 bits at `p` (little-endian) as 32 bytes: 0xFF where bit `j` is set, else 0.
#[inline(always)]
unsafe fn bits(p: *const u8) -> __m256i {
    let word = (p as *const i32).read_unaligned();
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(word),
        _mm256_set_epi64x(
            0x0303030303030303,
            0x0202020202020202,
            0x0101010101010101,
            0,
        ),
    );
    // byte j keeps bit j % 8 of its word byte; every other bit is forced to one
    let others = _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe);
    _mm256_cmpeq_epi8(_mm256_or_si256(spread, others), _mm256_set1_epi64x(-1))
}

/// A 256-value block decoded for [`k_blocks`]: eight groups of 32 unsigned weights, each
/// group's pair products multiplied by its integer scales `mul` (Q4_K's and Q5_K's 6-bit
/// scale, or Q6_K's two 8-bit scales of 16 values), the block's integer sum scaled by `scale`,
/// less `off16[k]` times the activations' sum over values `16k .. 16k + 16`.
struct KBlock {
    w: [__m256i; 8],
    mul: [__m256i; 8],
    scale: f32,
    off16: [__m256; 2],
}

/// The K formats: 256-value blocks of eight 32-value groups (Q4_K, Q5_K) or sixteen of 16
/// (Q6_K), against activations with one scale per 256 values ([`Q8Row::quantize_k`], as
/// llama.cpp's `block_q8_K`): a block's groups add up in integers, and the block is
/// converted and scaled once. Returns each row's eight partial sums and its offset term.
///
/// The integer sums cannot overflow: a pair product is at most 63·127·2 (Q6_K), times a
/// scale of at most 128, twice, over eight groups, is under 2³¹.
#[inline(always)]
unsafe fn k_blocks<const R: usize>(
    kind: QuantType,
    weights: &[u8],
    x: &Tile<R>,
    ahead: bool,
) -> ([__m256; R], [f32; R]) {
    let size = kind.block_bytes();
    let mut acc = [_mm256_setzero_ps(); R];
    let mut lost = [_mm256_setzero_ps(); R];
    for b in 0..weights.len() / size {
        let block = weights.get_unchecked(b * size..(b + 1) * size);
        if ahead {
            crate::prefetch::ask_ahead(block.as_ptr(), size);
        }
        let k = match kind {
            QuantType::Q6K => decode_q6_k(block),
            _ => decode_q4_k(block, kind == QuantType::Q5K),
        };
        for r in 0..R {
            let qs = x.qs[r].add(256 * b);
            let mut dots = _mm256_setzero_si256();
            for g in 0..8 {
                let a = _mm256_loadu_si256(qs.add(32 * g) as *const __m256i);
                let group = _mm256_madd_epi16(_mm256_maddubs_epi16(k.w[g], a), k.mul[g]);
                dots = _mm256_add_epi32(dots, group);
            }
            let scale = _mm256_set1_ps(k.scale * *x.d[r].add(8 * b));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), scale, acc[r]);
            // what the offsets take away, against the activations' sums per 16 (scaled)
            let sums = x.scaled_sums[r].add(16 * b);
            lost[r] = _mm256_fmadd_ps(k.off16[0], _mm256_loadu_ps(sums), lost[r]);
            lost[r] = _mm256_fmadd_ps(k.off16[1], _mm256_loadu_ps(sums.add(8)), lost[r]);
        }
    }
    (acc, std::array::from_fn(|r| -horizontal_sum(lost[r])))
}

/// Q4_K (`d, dmin: f16, scales: [u8; 12], qs: [u8; 128]`) or, `five`, Q5_K (`qh: [u8; 32]`
/// before `qs`): group `2c` is the low nibbles of `qs[32c..32c + 32]`, group `2c + 1` their
/// high nibbles, the fifth bits bits `2c` and `2c + 1` of `qh`; `w = d·sc·q − dmin·m`.
#[inline(always)]
unsafe fn decode_q4_k(b: &[u8], five: bool) -> KBlock {
    let halves = _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from_le_bytes([
        b[0], b[1], b[2], b[3],
    ])));
    let d = _mm_cvtss_f32(halves);
    let dmin = _mm_cvtss_f32(_mm_shuffle_ps(halves, halves, 1));
    let (qh, qs) = if five {
        (
            _mm256_loadu_si256(b.as_ptr().add(16) as *const __m256i),
            &b[48..176],
        )
    } else {
        (_mm256_setzero_si256(), &b[16..144])
    };
    let low = _mm256_set1_epi8(0x0F);
    let mut k = KBlock {
        w: [_mm256_setzero_si256(); 8],
        mul: [_mm256_setzero_si256(); 8],
        scale: d,
        off16: [_mm256_setzero_ps(); 2],
    };
    for c in 0..4 {
        let bytes = _mm256_loadu_si256(qs.as_ptr().add(32 * c) as *const __m256i);
        k.w[2 * c] = _mm256_and_si256(bytes, low);
        k.w[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low);
        if five {
            for half in 0..2 {
                let bit = _mm256_set1_epi8((1u8 << (2 * c + half)) as i8);
                let set = _mm256_cmpeq_epi8(_mm256_and_si256(qh, bit), bit);
                let high = _mm256_and_si256(set, _mm256_set1_epi8(0x10));
                k.w[2 * c + half] = _mm256_or_si256(k.w[2 * c + half], high);
            }
        }
    }
    let mut off16 = [0.0f32; 16];
    for j in 0..8 {
        let (sc, m) = super::blocks::scale_min_k4(j, &b[4..16]);
        k.mul[j] = _mm256_set1_epi16(sc as i16);
        off16[2 * j] = dmin * m as f32;
        off16[2 * j + 1] = dmin * m as f32;
    }
    k.off16 = [
        _mm256_loadu_ps(off16.as_ptr()),
        _mm256_loadu_ps(off16.as_ptr().add(8)),
    ];
    k
}

/// Q6_K (`ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`): in each half of 128 values,
/// groups 0 and 2 are the low and high nibbles of `ql[0..32]`, groups 1 and 3 those of
/// `ql[32..64]`, with two high bits each from `qh` (bits 0–1, 2–3, 4–5, 6–7 for groups 0–3);
/// `w = d·scale·(q − 32)`, one scale per 16 values.
#[inline(always)]
unsafe fn decode_q6_k(b: &[u8]) -> KBlock {
    let d = half::f16::from_le_bytes([b[208], b[209]]).to_f32();
    let scales = &b[192..208];
    let (low, two) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x30));
    let mut k = KBlock {
        w: [_mm256_setzero_si256(); 8],
        mul: [_mm256_setzero_si256(); 8],
        scale: d,
        off16: [_mm256_setzero_ps(); 2],
    };
    for half in 0..2 {
        let p = b.as_ptr();
        let ql_a = _mm256_loadu_si256(p.add(64 * half) as *const __m256i);
        let ql_b = _mm256_loadu_si256(p.add(64 * half + 32) as *const __m256i);
        let qh = _mm256_loadu_si256(p.add(128 + 32 * half) as *const __m256i);
        // the epi16 shifts carry bits across bytes, but only into bits the masks drop
        let w = &mut k.w[4 * half..4 * half + 4];
        w[0] = _mm256_or_si256(
            _mm256_and_si256(ql_a, low),
            _mm256_and_si256(_mm256_slli_epi16(qh, 4), two),
        );
        w[1] = _mm256_or_si256(
            _mm256_and_si256(ql_b, low),
            _mm256_and_si256(_mm256_slli_epi16(qh, 2), two),
        );
        w[2] = _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16(ql_a, 4), low),
            _mm256_and_si256(qh, two),
        );
        w[3] = _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16(ql_b, 4), low),
            _mm256_and_si256(_mm256_srli_epi16(qh, 2), two),
        );
    }
    let mut off16 = [0.0f32; 16];
    for g in 0..8 {
        let (first, second) = (scales[2 * g] as i8, scales[2 * g + 1] as i8);
        k.mul[g] = _mm256_set_m128i(_mm_set1_epi16(second as i16), _mm_set1_epi16(first as i16));
        off16[2 * g] = 32.0 * d * first as f32;
        off16[2 * g + 1] = 32.0 * d * second as f32;
    }
    k.off16 = [
        _mm256_loadu_ps(off16.as_ptr()),
        _mm256_loadu_ps(off16.as_ptr().add(8)),
    ];
    k
}

#[target_feature(enable = "avx2")]
unsafe fn horizontal_sum(acc: __m256) -> f32 {
    let half = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    let half = _mm_add_ps(half, _mm_movehl_ps(half, half));
    _mm_cvtss_f32(_mm_add_ss(half, _mm_shuffle_ps(half, half, 1)))
}
