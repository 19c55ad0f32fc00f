//! Q8_0, Q4_0 and Q5_0 weights (one scale per 32 signed values) against a prompt's many
//! activation rows, eight weight rows at a time, on CPUs with VNNI: the prompt's (prefill's)
//! product.
//!
//! The one-weight-row loop (`fused`) spends seven instructions on each pair of 32-value blocks
//! (one weight block, one activation block): the sign moved across, one dot product, and a
//! conversion and scaling of its sum. Here a task's weight rows are first interleaved in
//! groups of eight (as llama.cpp's repacked layouts are), each value as a signed byte whatever
//! its format packs it in: four bytes of each of the eight
//! rows side by side, so that one `vpdpbusd` multiplies four activation bytes, broadcast,
//! with four bytes of all eight rows at once, and one conversion and one multiply-add scale
//! the sums of eight rows together. The activations go in unsigned (`q + 128`), which
//! `vpdpbusd` needs on that side; each weight block's sum times 128, kept with the group,
//! takes the excess back out, so the integer sums are exact.
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

/// Whether `kernel` multiplies `m` rows with weights of `kind` through this module.
pub(super) fn applies(kernel: Kernel, kind: QuantType, m: usize) -> bool {
    matches!(kind, QuantType::Q8_0 | QuantType::Q4_0 | QuantType::Q5_0)
        && m >= MIN_ROWS
        && matches!(kernel, Kernel::AvxVnni | Kernel::Avx512Vnni)
}

/// The activation rows as `vpdpbusd` takes them: each byte plus 128, as an unsigned byte.
pub(super) fn unsigned_rows(rows: &[Q8Row]) -> Vec<Vec<u8>> {
    rows.iter()
        .map(|r| r.qs.iter().map(|&q| (q as u8) ^ 0x80).collect())
        .collect()
}

/// Eight weight rows interleaved: per block, their scales, their sums times 128, and their
/// values as signed bytes four at a time (`qs[256 b + 32 k + 4 r + j]` is row `r`'s value
/// `32 b + 4 k + j`).
#[derive(Default)]
pub(super) struct Group {
    scales: Vec<f32>,
    excess: Vec<i32>,
    qs: Vec<u8>,
}

impl Group {
    /// Fills the group from eight rows of `blocks` blocks of `kind` each (a format [`applies`]
    /// takes), `rows[r]` row `r`'s bytes.
    pub(super) fn fill(&mut self, kind: QuantType, rows: [&[u8]; GROUP], blocks: usize) {
        self.scales.clear();
        self.excess.clear();
        self.qs.resize(blocks * GROUP * Q8_BLOCK, 0);
        let size = kind.block_bytes();
        let mut block = Unpacked::default();
        for b in 0..blocks {
            for (r, row) in rows.iter().enumerate() {
                let bytes = &row[b * size..(b + 1) * size];
                let values: &[u8] = if kind == QuantType::Q8_0 {
                    // already signed bytes after the scale: no unpacking
                    block.scale[0] = half::f16::from_le_bytes([bytes[0], bytes[1]]).to_f32();
                    &bytes[2..]
                } else {
                    unpack(kind, bytes, &mut block);
                    // SAFETY: i8 and u8 have the same size and alignment
                    unsafe { std::slice::from_raw_parts(block.q.as_ptr().cast(), Q8_BLOCK) }
                };
                self.scales.push(block.scale[0]);
                self.excess
                    .push(128 * values.iter().map(|&q| q as i8 as i32).sum::<i32>());
                for k in 0..Q8_BLOCK / 4 {
                    let at = b * GROUP * Q8_BLOCK + 32 * k + 4 * r;
                    self.qs[at..at + 4].copy_from_slice(&values[4 * k..4 * k + 4]);
                }
            }
        }
    }
}

/// `out[i][r]` = weight row `r` of `group` · activation row `i` (`unsigned[i]`, scales
/// `rows[i].d`), for every activation row.
///
/// # Safety
/// The CPU has the features of `kernel` ([`applies`] chose it); the group holds `blocks`
/// blocks and each activation row `blocks · 32` values.
pub(super) unsafe fn group_times_rows(
    kernel: Kernel,
    group: &Group,
    blocks: usize,
    (unsigned, rows): (&[Vec<u8>], &[Q8Row]),
    out: &mut [[f32; GROUP]],
) {
    match kernel {
        Kernel::AvxVnni => tiles_avx_vnni(group, blocks, unsigned, rows, out),
        _ => tiles_avx512_vnni(group, blocks, unsigned, rows, out),
    }
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
unsafe fn tiles_avx_vnni(
    group: &Group,
    blocks: usize,
    unsigned: &[Vec<u8>],
    rows: &[Q8Row],
    out: &mut [[f32; GROUP]],
) {
    tiles::<AvxVnni>(group, blocks, unsigned, rows, out)
}

#[target_feature(enable = "avx2,fma,avx512vnni,avx512vl")]
unsafe fn tiles_avx512_vnni(
    group: &Group,
    blocks: usize,
    unsigned: &[Vec<u8>],
    rows: &[Q8Row],
    out: &mut [[f32; GROUP]],
) {
    tiles::<Avx512Vnni>(group, blocks, unsigned, rows, out)
}

#[inline(always)]
unsafe fn tiles<D: Dpbusd>(
    group: &Group,
    blocks: usize,
    unsigned: &[Vec<u8>],
    rows: &[Q8Row],
    out: &mut [[f32; GROUP]],
) {
    let mut i = 0;
    while i < rows.len() {
        let n = (rows.len() - i).min(TILE);
        let (u, r, o) = (&unsigned[i..i + n], &rows[i..i + n], &mut out[i..i + n]);
        match n {
            4 => tile::<D, 4>(group, blocks, u, r, o),
            3 => tile::<D, 3>(group, blocks, u, r, o),
            2 => tile::<D, 2>(group, blocks, u, r, o),
            _ => tile::<D, 1>(group, blocks, u, r, o),
        }
        i += n;
    }
}

/// `R` activation rows against the group's eight weight rows: per block, eight `vpdpbusd`
/// per activation row (four of its bytes broadcast against four of each weight row's), then
/// one subtraction, conversion and multiply-add for all eight weight rows.
#[inline(always)]
unsafe fn tile<D: Dpbusd, const R: usize>(
    group: &Group,
    blocks: usize,
    unsigned: &[Vec<u8>],
    rows: &[Q8Row],
    out: &mut [[f32; GROUP]],
) {
    let a: [*const u8; R] = std::array::from_fn(|r| unsigned[r].as_ptr());
    let d: [*const f32; R] = std::array::from_fn(|r| rows[r].d.as_ptr());
    let (qs, scales, excess) = (
        group.qs.as_ptr(),
        group.scales.as_ptr(),
        group.excess.as_ptr(),
    );
    let mut acc = [_mm256_setzero_ps(); R];
    for b in 0..blocks {
        let mut sums = [_mm256_setzero_si256(); R];
        for k in 0..Q8_BLOCK / 4 {
            let w = _mm256_loadu_si256(qs.add(GROUP * Q8_BLOCK * b + 32 * k) as *const __m256i);
            for r in 0..R {
                let x = (a[r].add(Q8_BLOCK * b + 4 * k) as *const i32).read_unaligned();
                sums[r] = D::add(sums[r], _mm256_set1_epi32(x), w);
            }
        }
        let excess = _mm256_loadu_si256(excess.add(GROUP * b) as *const __m256i);
        let scales = _mm256_loadu_ps(scales.add(GROUP * b));
        for r in 0..R {
            let exact = _mm256_cvtepi32_ps(_mm256_sub_epi32(sums[r], excess));
            let scale = _mm256_mul_ps(scales, _mm256_set1_ps(*d[r].add(b)));
            acc[r] = _mm256_fmadd_ps(exact, scale, acc[r]);
        }
    }
    for r in 0..R {
        _mm256_storeu_ps(out[r].as_mut_ptr(), acc[r]);
    }
}

/// Rows `start..end` of `w`, in whole groups of eight from `start`, times every
/// activation row, into `band` (`[rows, end - start]`, row-major). Returns the first weight
/// row left to the caller (fewer than eight remain).
///
/// # Safety
/// As [`group_times_rows`]: [`applies`] chose `kernel` for `w`.
pub(super) unsafe fn band(
    kernel: Kernel,
    w: &super::QuantMatrix<'_>,
    (start, end): (usize, usize),
    activations: (&[Vec<u8>], &[Q8Row]),
    band: &mut [f32],
) -> usize {
    let (blocks, len) = (w.d / Q8_BLOCK, end - start);
    let mut group = Group::default();
    let mut out = vec![[0.0f32; GROUP]; activations.1.len()];
    let mut first = start;
    while first + GROUP <= end {
        group.fill(w.kind, std::array::from_fn(|j| w.row(first + j)), blocks);
        group_times_rows(kernel, &group, blocks, activations, &mut out);
        for (i, o) in out.iter().enumerate() {
            let at = i * len + first - start;
            band[at..at + GROUP].copy_from_slice(o);
        }
        first += GROUP;
    }
    first
}
