//! Weights of every block format against a prompt's many activation rows, eight weight rows
//! at a time, on CPUs with VNNI: the prompt's (prefill's) product.
//!
//! The one-weight-row loop (`fused`) spends about seven instructions on each pair of
//! 32-value blocks (one weight block, one activation block): the sign moved across, one dot
//! product, and a conversion and scaling of its sum. Here a task's weight rows are first
//! interleaved in groups of eight, as llama.cpp's repacked layouts are: every value unpacked
//! to a signed byte, and four bytes of each of the eight rows side by side, so that one
//! `vpdpbusd` multiplies four activation bytes, broadcast, with four bytes of all eight rows
//! at once, and one conversion and one multiply-add scale the sums of eight rows together.
//!
//! - The activations go in unsigned (`q + 128`), which `vpdpbusd` needs on that side; each
//!   unit's weight sum times 128, kept with the group, takes the excess back out, so the
//!   integer sums are exact.
//! - A unit is the values that share one weight scale: 32, or 16 for Q6_K. Where a format
//!   adds an offset per unit (Q4_1, Q5_1, and the K formats' minimums), the activations'
//!   scaled sums over the unit ([`Q8Row::scaled_sums`]) take it into account, one multiply-add
//!   for the eight rows.
//!
//! The interleaving is made per task, for the task's band of rows, into scratch memory that
//! stays in the core's cache: it costs one pass over the band's bytes, which a prompt's rows
//! then read many times over.

use std::arch::x86_64::*;

use super::blocks::{unpack, Unpacked};
use super::{Kernel, Q8Row, QuantType, Q8_BLOCK};

/// Weight rows interleaved together.
pub(super) const GROUP: usize = 8;

/// Activation rows multiplied with each interleaved group at once.
const TILE: usize = 4;

/// The fewest activation rows for which interleaving pays for its pass over the weights.
const MIN_ROWS: usize = 16;

/// Whether `kernel` multiplies `m` rows with weights through this module.
pub(super) fn applies(kernel: Kernel, m: usize) -> bool {
    m >= MIN_ROWS && matches!(kernel, Kernel::AvxVnni | Kernel::Avx512Vnni)
}

/// The activation rows as `vpdpbusd` takes them: each byte plus 128, as an unsigned byte.
pub(super) fn unsigned_rows(rows: &[Q8Row]) -> Vec<Vec<u8>> {
    rows.iter()
        .map(|r| r.qs.iter().map(|&q| (q as u8) ^ 0x80).collect())
        .collect()
}

/// Eight weight rows interleaved, unit by unit (`unit` values that share a scale): the eight
/// rows' scales, their sums times 128 and their offsets, and their values as signed bytes,
/// four at a time (`qs[8 unit u + 32 k + 4 r + j]` is row `r`'s value `unit u + 4 k + j`).
#[derive(Default)]
pub(super) struct Group {
    unit: usize,
    scales: Vec<f32>,
    excess: Vec<i32>,
    /// Empty for formats without offsets.
    offsets: Vec<f32>,
    qs: Vec<u8>,
}

impl Group {
    /// Fills the group from eight rows of `blocks` blocks of `kind` each, `rows[r]` row `r`'s
    /// bytes.
    pub(super) fn fill(&mut self, kind: QuantType, rows: [&[u8]; GROUP], blocks: usize) {
        let (values, size) = (kind.block_values(), kind.block_bytes());
        self.unit = if kind == QuantType::Q6K { 16 } else { 32 };
        let units = values / self.unit;
        let offsets = matches!(
            kind,
            QuantType::Q4_1 | QuantType::Q5_1 | QuantType::Q4K | QuantType::Q5K
        );
        self.scales.resize(blocks * units * GROUP, 0.0);
        self.excess.resize(blocks * units * GROUP, 0);
        self.offsets
            .resize(if offsets { self.scales.len() } else { 0 }, 0.0);
        self.qs.resize(blocks * values * GROUP, 0);
        if values == Q8_BLOCK {
            // SAFETY: interleaving is only chosen on VNNI CPUs, which all have AVX2 and F16C
            return unsafe { self.fill_small(kind, rows, blocks) };
        }
        let mut block = Unpacked::default();
        for b in 0..blocks {
            for (r, row) in rows.iter().enumerate() {
                unpack(kind, &row[b * size..(b + 1) * size], &mut block);
                debug_assert_eq!(block.group, self.unit);
                for j in 0..units {
                    self.put_unit(b * units + j, r, &block, j);
                }
            }
        }
    }

    /// [`Group::fill`] for the 32-value formats: each block decoded in registers as the
    /// one-row loop decodes it, its sum taken there too, and its bytes moved four at a time.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn fill_small(&mut self, kind: QuantType, rows: [&[u8]; GROUP], blocks: usize) {
        let size = kind.block_bytes();
        let mut bytes = [0u8; Q8_BLOCK];
        for b in 0..blocks {
            for (r, row) in rows.iter().enumerate() {
                let (w, d, m) = super::fused::decode_small(kind, row.as_ptr().add(b * size));
                _mm256_storeu_si256(bytes.as_mut_ptr() as *mut __m256i, w);
                self.scales[b * GROUP + r] = d;
                self.excess[b * GROUP + r] = 128 * signed_byte_sum(w);
                if !self.offsets.is_empty() {
                    // w = d·q + m
                    self.offsets[b * GROUP + r] = -m;
                }
                let to = self.qs.as_mut_ptr().add(b * GROUP * Q8_BLOCK + 4 * r);
                for k in 0..Q8_BLOCK / 4 {
                    let four = (bytes.as_ptr().add(4 * k) as *const u32).read_unaligned();
                    (to.add(32 * k) as *mut u32).write_unaligned(four);
                }
            }
        }
    }

    /// Unit `j` of the unpacked `block` as unit `u` of row `r`.
    fn put_unit(&mut self, u: usize, r: usize, block: &Unpacked, j: usize) {
        let unit = self.unit;
        let q = &block.q[j * unit..(j + 1) * unit];
        self.scales[u * GROUP + r] = block.scale[j];
        self.excess[u * GROUP + r] = 128 * q.iter().map(|&v| v as i32).sum::<i32>();
        if !self.offsets.is_empty() {
            self.offsets[u * GROUP + r] = block.offset[j];
        }
        for k in 0..unit / 4 {
            let at = u * GROUP * unit + 32 * k + 4 * r;
            for (slot, &v) in self.qs[at..at + 4].iter_mut().zip(&q[4 * k..4 * k + 4]) {
                *slot = v as u8;
            }
        }
    }
}

/// Rows `start..end` of `w`, in whole groups of eight from `start`, times every activation
/// row, into `band` (`[rows, end - start]`, row-major). Returns the first weight row left to
/// the caller (fewer than eight remain).
///
/// # Safety
/// [`applies`] chose `kernel`; `activations` are the rows quantized for `w.kind`
/// ([`Q8Row::quantize_for`]) and the same rows made [`unsigned_rows`].
pub(super) unsafe fn band(
    kernel: Kernel,
    w: &super::QuantMatrix<'_>,
    (start, end): (usize, usize),
    activations: (&[Vec<u8>], &[Q8Row]),
    band: &mut [f32],
) -> usize {
    let (blocks, len) = (w.d / w.kind.block_values(), end - start);
    let mut group = Group::default();
    let mut out = vec![[0.0f32; GROUP]; activations.1.len()];
    let mut first = start;
    while first + GROUP <= end {
        group.fill(w.kind, std::array::from_fn(|j| w.row(first + j)), blocks);
        match kernel {
            Kernel::AvxVnni => tiles_avx_vnni(&group, activations, &mut out),
            _ => tiles_avx512_vnni(&group, activations, &mut out),
        }
        for (i, o) in out.iter().enumerate() {
            let at = i * len + first - start;
            band[at..at + GROUP].copy_from_slice(o);
        }
        first += GROUP;
    }
    first
}

/// The sum of 32 signed bytes: their unsigned sum (each plus 128) less 32·128.
#[inline(always)]
unsafe fn signed_byte_sum(w: __m256i) -> i32 {
    let sums = _mm256_sad_epu8(
        _mm256_xor_si256(w, _mm256_set1_epi8(0x80u8 as i8)),
        _mm256_setzero_si256(),
    );
    let pair = _mm_add_epi64(
        _mm256_castsi256_si128(sums),
        _mm256_extracti128_si256(sums, 1),
    );
    (_mm_cvtsi128_si64(pair) + _mm_extract_epi64(pair, 1)) as i32 - 32 * 128
}

/// Sums four unsigned-by-signed byte products into each i32 lane of `acc`.
trait Dpbusd {
    unsafe fn add(acc: __m256i, unsigned: __m256i, signed: __m256i) -> __m256i;
}

struct AvxVnni;

impl Dpbusd for AvxVnni {
    #[inline(always)]
    unsafe fn add(acc: __m256i, unsigned: __m256i, signed: __m256i) -> __m256i {
        _mm256_dpbusd_avx_epi32(acc, unsigned, signed)
    }
}

struct Avx512Vnni;

impl Dpbusd for Avx512Vnni {
    #[inline(always)]
    unsafe fn add(acc: __m256i, unsigned: __m256i, signed: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(acc, unsigned, signed)
    }
}

#[target_feature(enable = "avx2,fma,avxvnni")]
unsafe fn tiles_avx_vnni(group: &Group, rows: (&[Vec<u8>], &[Q8Row]), out: &mut [[f32; GROUP]]) {
    tiles::<AvxVnni>(group, rows, out)
}

#[target_feature(enable = "avx2,fma,avx512vnni,avx512vl")]
unsafe fn tiles_avx512_vnni(group: &Group, rows: (&[Vec<u8>], &[Q8Row]), out: &mut [[f32; GROUP]]) {
    tiles::<Avx512Vnni>(group, rows, out)
}

/// Every activation row against the group, in tiles of [`TILE`], one copy of the loop per
/// unit size and offset or not.
#[inline(always)]
unsafe fn tiles<D: Dpbusd>(
    group: &Group,
    (unsigned, rows): (&[Vec<u8>], &[Q8Row]),
    out: &mut [[f32; GROUP]],
) {
    let mut i = 0;
    while i < rows.len() {
        let n = (rows.len() - i).min(TILE);
        let x = Tile {
            unsigned: &unsigned[i..i + n],
            rows: &rows[i..i + n],
        };
        let o = &mut out[i..i + n];
        macro_rules! tile {
            ($unit:literal, $offsets:literal) => {
                match n {
                    4 => tile::<D, 4, $unit, $offsets>(group, x, o),
                    3 => tile::<D, 3, $unit, $offsets>(group, x, o),
                    2 => tile::<D, 2, $unit, $offsets>(group, x, o),
                    _ => tile::<D, 1, $unit, $offsets>(group, x, o),
                }
            };
        }
        match (group.unit, group.offsets.is_empty()) {
            (16, true) => tile!(16, false),
            (16, false) => tile!(16, true),
            (_, true) => tile!(32, false),
            (_, false) => tile!(32, true),
        }
        i += n;
    }
}

/// A tile's activation rows, unsigned and as quantized.
#[derive(Clone, Copy)]
struct Tile<'a> {
    unsigned: &'a [Vec<u8>],
    rows: &'a [Q8Row],
}

/// `R` activation rows against the group's eight weight rows, unit by unit: `U / 4`
/// `vpdpbusd` per activation row (four of its bytes broadcast against four of each weight
/// row's), then one subtraction, conversion and multiply-add (and with `OFFSETS` one more)
/// for all eight weight rows.
#[inline(always)]
unsafe fn tile<D: Dpbusd, const R: usize, const U: usize, const OFFSETS: bool>(
    group: &Group,
    x: Tile<'_>,
    out: &mut [[f32; GROUP]],
) {
    let mut a = [std::ptr::null::<u8>(); R];
    let mut d = [std::ptr::null::<f32>(); R];
    let mut sums16 = [std::ptr::null::<f32>(); R];
    for r in 0..R {
        a[r] = x.unsigned[r].as_ptr();
        d[r] = x.rows[r].d.as_ptr();
        sums16[r] = x.rows[r].scaled_sums.as_ptr();
    }
    let (qs, scales, excess, offsets) = (
        group.qs.as_ptr(),
        group.scales.as_ptr(),
        group.excess.as_ptr(),
        group.offsets.as_ptr(),
    );
    let mut acc = [_mm256_setzero_ps(); R];
    for u in 0..group.scales.len() / GROUP {
        let mut sums = [_mm256_setzero_si256(); R];
        for k in 0..U / 4 {
            let w = _mm256_loadu_si256(qs.add(GROUP * U * u + 32 * k) as *const __m256i);
            for r in 0..R {
                let v = (a[r].add(U * u + 4 * k) as *const i32).read_unaligned();
                sums[r] = D::add(sums[r], _mm256_set1_epi32(v), w);
            }
        }
        let excess = _mm256_loadu_si256(excess.add(GROUP * u) as *const __m256i);
        let scales = _mm256_loadu_ps(scales.add(GROUP * u));
        for r in 0..R {
            let exact = _mm256_cvtepi32_ps(_mm256_sub_epi32(sums[r], excess));
            let scale = _mm256_mul_ps(scales, _mm256_set1_ps(*d[r].add(U * u / Q8_BLOCK)));
            acc[r] = _mm256_fmadd_ps(exact, scale, acc[r]);
            if OFFSETS {
                // w = scale·q − offset: take offset × (the unit's activations, scaled) away
                let s = sums16[r].add(U * u / 16);
                let sum = if U == 32 { *s + *s.add(1) } else { *s };
                let offsets = _mm256_loadu_ps(offsets.add(GROUP * u));
                acc[r] = _mm256_fnmadd_ps(offsets, _mm256_set1_ps(sum), acc[r]);
            }
        }
    }
    for r in 0..R {
        _mm256_storeu_ps(out[r].as_mut_ptr(), acc[r]);
    }
}
