//! One block of each format unpacked to small integers, and the dot product of a weight row
//! with a quantized activation row, block by block. The layouts follow ggml's `block_*`
//! structs (`ggml-common.h`), little-endian.

use half::f16;

#[cfg(target_arch = "x86_64")]
use super::fused;
use super::{Kernel, Q8Row, QuantType, Q8_BLOCK};

/// A block's weights as `w[i] = scale[g] · q[i] − offset[g]`, `g = i / group`.
#[derive(Clone, Debug)]
pub struct Unpacked {
    pub q: [i8; 256],
    /// Values per group: 32 (one group per 32-value block, and Q4_K, Q5_K) or 16 (Q6_K).
    pub group: usize,
    pub scale: [f32; 16],
    pub offset: [f32; 16],
}

impl Default for Unpacked {
    fn default() -> Self {
        Unpacked {
            q: [0; 256],
            group: 32,
            scale: [0.0; 16],
            offset: [0.0; 16],
        }
    }
}

fn half_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Unpacks one block of `kind` (`bytes` exactly one block long) into `out`.
pub fn unpack(kind: QuantType, bytes: &[u8], out: &mut Unpacked) {
    debug_assert_eq!(bytes.len(), kind.block_bytes());
    match kind {
        QuantType::Q8_0 => q8_0(bytes, out),
        QuantType::Q4_0 => q4_0(bytes, out),
        QuantType::Q4_1 => q4_1(bytes, out),
        QuantType::Q5_0 => q5_0(bytes, out),
        QuantType::Q5_1 => q5_1(bytes, out),
        QuantType::Q4K => q4_k(bytes, out, false),
        QuantType::Q5K => q4_k(bytes, out, true),
        QuantType::Q6K => q6_k(bytes, out),
    }
}

/// `d: f16, qs: [i8; 32]`.
fn q8_0(b: &[u8], out: &mut Unpacked) {
    out.group = 32;
    out.scale[0] = half_at(b, 0);
    out.offset[0] = 0.0;
    for (q, &byte) in out.q.iter_mut().zip(&b[2..34]) {
        *q = byte as i8;
    }
}

/// The 32 nibbles of 16 bytes: value `j` is the low nibble of byte `j`, value `j + 16` its
/// high nibble.
fn nibbles(qs: &[u8], q: &mut [i8], minus: i8) {
    for (j, &byte) in qs.iter().enumerate() {
        q[j] = (byte & 0x0F) as i8 - minus;
        q[j + 16] = (byte >> 4) as i8 - minus;
    }
}

/// `d: f16, qs: [u8; 16]`: `w = d · (nibble − 8)`.
fn q4_0(b: &[u8], out: &mut Unpacked) {
    out.group = 32;
    out.scale[0] = half_at(b, 0);
    out.offset[0] = 0.0;
    nibbles(&b[2..18], &mut out.q[..32], 8);
}

/// `d: f16, m: f16, qs: [u8; 16]`: `w = d · nibble + m`.
fn q4_1(b: &[u8], out: &mut Unpacked) {
    out.group = 32;
    out.scale[0] = half_at(b, 0);
    out.offset[0] = -half_at(b, 2);
    nibbles(&b[4..20], &mut out.q[..32], 0);
}

/// 32 five-bit values: the nibbles of `qs` (as [`nibbles`] orders them) with their fifth bit
/// from the 32 bits of `qh` (bit `j` for value `j`), minus `minus`.
fn five_bits(qh: &[u8], qs: &[u8], q: &mut [i8], minus: i8) {
    let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    for (j, &byte) in qs.iter().enumerate() {
        let high = |k: usize| (((qh >> k) & 1) << 4) as u8;
        q[j] = ((byte & 0x0F) | high(j)) as i8 - minus;
        q[j + 16] = ((byte >> 4) | high(j + 16)) as i8 - minus;
    }
}

/// `d: f16, qh: [u8; 4], qs: [u8; 16]`: `w = d · (q − 16)`.
fn q5_0(b: &[u8], out: &mut Unpacked) {
    out.group = 32;
    out.scale[0] = half_at(b, 0);
    out.offset[0] = 0.0;
    five_bits(&b[2..6], &b[6..22], &mut out.q[..32], 16);
}

/// `d, m: f16, qh: [u8; 4], qs: [u8; 16]`: `w = d · q + m`.
fn q5_1(b: &[u8], out: &mut Unpacked) {
    out.group = 32;
    out.scale[0] = half_at(b, 0);
    out.offset[0] = -half_at(b, 2);
    five_bits(&b[4..8], &b[8..24], &mut out.q[..32], 0);
}

/// Sub-block `j`'s 6-bit scale and minimum from the 12 packed bytes of Q4_K and Q5_K.
pub(super) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Q4_K `d, dmin: f16, scales: [u8; 12], qs: [u8; 128]`, or with `five_bits` Q5_K, which has
/// `qh: [u8; 32]` (the fifth bits) before `qs`: eight sub-blocks of 32,
/// `w = d · sc[j] · q − dmin · m[j]`.
fn q4_k(b: &[u8], out: &mut Unpacked, five_bits: bool) {
    let (d, dmin) = (half_at(b, 0), half_at(b, 2));
    let scales = &b[4..16];
    let (qh, qs) = if five_bits {
        (&b[16..48], &b[48..176])
    } else {
        (&b[0..0], &b[16..144])
    };
    out.group = 32;
    for chunk in 0..4 {
        let bytes = &qs[32 * chunk..32 * chunk + 32];
        for (l, &byte) in bytes.iter().enumerate() {
            let (mut lo, mut hi) = (byte & 0x0F, byte >> 4);
            if five_bits {
                lo |= ((qh[l] >> (2 * chunk)) & 1) << 4;
                hi |= ((qh[l] >> (2 * chunk + 1)) & 1) << 4;
            }
            out.q[64 * chunk + l] = lo as i8;
            out.q[64 * chunk + 32 + l] = hi as i8;
        }
    }
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, scales);
        out.scale[j] = d * sc as f32;
        out.offset[j] = dmin * m as f32;
    }
}

/// `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`: sixteen sub-blocks of 16,
/// `w = d · scale[j] · (q − 32)` with 6-bit `q` (4 low bits in `ql`, 2 high bits in `qh`).
fn q6_k(b: &[u8], out: &mut Unpacked) {
    let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = half_at(b, 208);
    out.group = 16;
    for half in 0..2 {
        let (ql, qh) = (&ql[64 * half..], &qh[32 * half..]);
        let q = &mut out.q[128 * half..];
        for l in 0..32 {
            let six = |low: u8, shift: u32| (low | (((qh[l] >> shift) & 3) << 4)) as i8 - 32;
            q[l] = six(ql[l] & 0x0F, 0);
            q[l + 32] = six(ql[l + 32] & 0x0F, 2);
            q[l + 64] = six(ql[l] >> 4, 4);
            q[l + 96] = six(ql[l + 32] >> 4, 6);
        }
    }
    for (j, &s) in scales.iter().enumerate() {
        out.scale[j] = d * (s as i8) as f32;
        out.offset[j] = 0.0;
    }
}

/// The dot products of one weight row (whole blocks of `kind`) with each quantized activation
/// row of the same length, into `out` (one per row). Each weight block is unpacked once for all
/// the rows; `unpacked` is scratch space.
pub(crate) fn dot_rows(
    kernel: Kernel,
    kind: QuantType,
    weights: &[u8],
    rows: &[Q8Row],
    out: &mut [f32],
    unpacked: &mut Unpacked,
) {
    // SAFETY: `Kernel::available` found the CPU features each loop is built for; the row is
    // whole blocks and each of `rows` as long as it
    #[cfg(target_arch = "x86_64")]
    match kernel {
        Kernel::AvxVnni => return unsafe { fused::rows_avx_vnni(kind, weights, rows, out) },
        Kernel::Avx512Vnni => return unsafe { fused::rows_avx512_vnni(kind, weights, rows, out) },
        Kernel::Avx2 => return unsafe { fused::rows_avx2(kind, weights, rows, out) },
        Kernel::Plain => {}
    }
    unpacked_rows(kind, weights, rows, out, unpacked);
}

/// [`dot_rows`] for any format: each block unpacked to small integers, then one integer dot
/// product per group and row: the plain loop every vector kernel is tested against.
fn unpacked_rows(
    kind: QuantType,
    weights: &[u8],
    rows: &[Q8Row],
    out: &mut [f32],
    unpacked: &mut Unpacked,
) {
    let values = kind.block_values();
    out.fill(0.0);
    for (b, block) in weights.chunks_exact(kind.block_bytes()).enumerate() {
        unpack(kind, block, unpacked);
        let group = unpacked.group;
        for (x, sum) in rows.iter().zip(out.iter_mut()) {
            for g in 0..values / group {
                let start = b * values + g * group;
                let q = &unpacked.q[g * group..(g + 1) * group];
                let dot = int_dot(q, &x.qs[start..start + group]);
                let sums: i32 = x.sums[start / 16..(start + group) / 16].iter().sum();
                let d = x.d[start / Q8_BLOCK];
                *sum += d * (unpacked.scale[g] * dot as f32 - unpacked.offset[g] * sums as f32);
            }
        }
    }
}

/// Σ a·b over two equally long i8 slices, exact in i32.
fn int_dot(a: &[i8], b: &[i8]) -> i32 {
    a.iter().zip(b).map(|(&x, &y)| x as i32 * y as i32).sum()
}
