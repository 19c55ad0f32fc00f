//! ggml tensor types and their dequantization to f32, following `ggml-quants.c`
//! (`dequantize_row_*`) block by block. Tested against `gguf.quants` from the `gguf` PyPI
//! package (`tests/fixtures/gguf-quants`).
//!
//! Every quantized type stores blocks of a fixed number of elements, each with its own scale
//! (and minimum, for the `_1` and K types); the K-quants group 256 elements into a super-block
//! with 6-bit (Q4_K, Q5_K) or 8-bit (Q6_K) sub-block scales.

use half::{bf16, f16};

/// The tensor types this reader dequantizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

/// Elements in a K-quant super-block.
const QK_K: usize = 256;

/// ggml's type names by code, for messages about types we do not read.
const NAMES: [&str; 42] = [
    "F32",
    "F16",
    "Q4_0",
    "Q4_1",
    "Q4_2",
    "Q4_3",
    "Q5_0",
    "Q5_1",
    "Q8_0",
    "Q8_1",
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
    "Q8_K",
    "IQ2_XXS",
    "IQ2_XS",
    "IQ3_XXS",
    "IQ1_S",
    "IQ4_NL",
    "IQ3_S",
    "IQ2_S",
    "IQ4_XS",
    "I8",
    "I16",
    "I32",
    "I64",
    "F64",
    "IQ1_M",
    "BF16",
    "Q4_0_4_4",
    "Q4_0_4_8",
    "Q4_0_8_8",
    "TQ1_0",
    "TQ2_0",
    "IQ4_NL_4_4",
    "IQ4_NL_4_8",
    "IQ4_NL_8_8",
    "MXFP4",
    "NVFP4",
    "Q1_0",
];

impl GgmlType {
    pub fn from_code(code: u32) -> Option<Self> {
        Some(match code {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// ggml's name of a type code, known to this reader or not.
    pub fn name_of(code: u32) -> String {
        NAMES
            .get(code as usize)
            .map(|n| n.to_string())
            .unwrap_or_else(|| format!("type {code}"))
    }

    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::BF16 => "BF16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q5K => "Q5_K",
            GgmlType::Q6K => "Q6_K",
        }
    }

    /// Elements per block.
    pub fn block_elements(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => {
                32
            }
            GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => QK_K,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 2 + 16,
            GgmlType::Q4_1 => 2 + 2 + 16,
            GgmlType::Q5_0 => 2 + 4 + 16,
            GgmlType::Q5_1 => 2 + 2 + 4 + 16,
            GgmlType::Q8_0 => 2 + 32,
            GgmlType::Q4K => 2 + 2 + 12 + QK_K / 2,
            GgmlType::Q5K => 2 + 2 + 12 + QK_K / 8 + QK_K / 2,
            GgmlType::Q6K => QK_K / 2 + QK_K / 4 + QK_K / 16 + 2,
        }
    }

    /// Dequantizes whole blocks: `bytes.len()` must be a multiple of [`Self::block_bytes`].
    pub fn dequantize(self, bytes: &[u8]) -> Vec<f32> {
        let bb = self.block_bytes();
        assert_eq!(
            bytes.len() % bb,
            0,
            "{} data is not whole blocks",
            self.name()
        );
        let mut out = Vec::with_capacity(bytes.len() / bb * self.block_elements());
        for block in bytes.chunks_exact(bb) {
            match self {
                GgmlType::F32 => out.push(f32::from_le_bytes(block.try_into().unwrap())),
                GgmlType::F16 => out.push(half(block, 0)),
                GgmlType::BF16 => {
                    out.push(bf16::from_le_bytes([block[0], block[1]]).to_f32());
                }
                GgmlType::Q4_0 => q4_0(block, &mut out),
                GgmlType::Q4_1 => q4_1(block, &mut out),
                GgmlType::Q5_0 => q5_0(block, &mut out),
                GgmlType::Q5_1 => q5_1(block, &mut out),
                GgmlType::Q8_0 => q8_0(block, &mut out),
                GgmlType::Q4K => q4_k(block, &mut out),
                GgmlType::Q5K => q5_k(block, &mut out),
                GgmlType::Q6K => q6_k(block, &mut out),
            }
        }
        out
    }
}

/// The f16 at byte `at`.
fn half(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// `{d: f16, qs: [u8; 16]}`: element j is `(nibble - 8)·d`, low nibbles first.
fn q4_0(b: &[u8], out: &mut Vec<f32>) {
    let d = half(b, 0);
    let qs = &b[2..18];
    out.extend(qs.iter().map(|&q| ((q & 0x0F) as i32 - 8) as f32 * d));
    out.extend(qs.iter().map(|&q| ((q >> 4) as i32 - 8) as f32 * d));
}

/// `{d, m: f16, qs: [u8; 16]}`: `nibble·d + m`.
fn q4_1(b: &[u8], out: &mut Vec<f32>) {
    let (d, m) = (half(b, 0), half(b, 2));
    let qs = &b[4..20];
    out.extend(qs.iter().map(|&q| (q & 0x0F) as f32 * d + m));
    out.extend(qs.iter().map(|&q| (q >> 4) as f32 * d + m));
}

/// The 5-bit values of a Q5 block: nibbles of `qs` with the fifth bit from `qh`.
fn five_bit(qh: &[u8], qs: &[u8]) -> [u8; 32] {
    let qh = u32::from_le_bytes(qh.try_into().unwrap());
    let mut v = [0u8; 32];
    for j in 0..16 {
        let h0 = (((qh >> j) << 4) & 0x10) as u8;
        let h1 = ((qh >> (j + 12)) & 0x10) as u8;
        v[j] = (qs[j] & 0x0F) | h0;
        v[j + 16] = (qs[j] >> 4) | h1;
    }
    v
}

/// `{d: f16, qh: u32, qs: [u8; 16]}`: `(q5 - 16)·d`.
fn q5_0(b: &[u8], out: &mut Vec<f32>) {
    let d = half(b, 0);
    out.extend(
        five_bit(&b[2..6], &b[6..22])
            .iter()
            .map(|&q| (q as i32 - 16) as f32 * d),
    );
}

/// `{d, m: f16, qh: u32, qs: [u8; 16]}`: `q5·d + m`.
fn q5_1(b: &[u8], out: &mut Vec<f32>) {
    let (d, m) = (half(b, 0), half(b, 2));
    out.extend(
        five_bit(&b[4..8], &b[8..24])
            .iter()
            .map(|&q| q as f32 * d + m),
    );
}

/// `{d: f16, qs: [i8; 32]}`: `q·d`.
fn q8_0(b: &[u8], out: &mut Vec<f32>) {
    let d = half(b, 0);
    out.extend(b[2..34].iter().map(|&q| q as i8 as f32 * d));
}

/// Scale and minimum of sub-block `j` (0..8) from the 12 packed bytes of Q4_K/Q5_K: the first
/// four sub-blocks keep 6 bits in the low bits of bytes 0-7, the last four spread theirs over
/// bytes 8-11 and the top two bits of bytes 0-7.
fn scale_min_k4(j: usize, q: &[u8]) -> (f32, f32) {
    let (sc, m) = if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    };
    (sc as f32, m as f32)
}

/// `{d, dmin: f16, scales: [u8; 12], qs: [u8; 128]}`: 8 sub-blocks of 32, each
/// `d·sc·nibble - dmin·m`; a run of 32 bytes holds two sub-blocks (low nibbles, then high).
fn q4_k(b: &[u8], out: &mut Vec<f32>) {
    let (d, dmin) = (half(b, 0), half(b, 2));
    let scales = &b[4..16];
    let qs = &b[16..144];
    for (pair, q) in qs.chunks_exact(32).enumerate() {
        let (s1, m1) = scale_min_k4(2 * pair, scales);
        let (s2, m2) = scale_min_k4(2 * pair + 1, scales);
        let (d1, m1, d2, m2) = (d * s1, dmin * m1, d * s2, dmin * m2);
        out.extend(q.iter().map(|&x| d1 * (x & 0x0F) as f32 - m1));
        out.extend(q.iter().map(|&x| d2 * (x >> 4) as f32 - m2));
    }
}

/// `{d, dmin: f16, scales: [u8; 12], qh: [u8; 32], qs: [u8; 128]}`: as Q4_K, with a fifth bit
/// per element from `qh` (bit 2·pair for the low nibbles, 2·pair + 1 for the high ones).
fn q5_k(b: &[u8], out: &mut Vec<f32>) {
    let (d, dmin) = (half(b, 0), half(b, 2));
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for (pair, q) in qs.chunks_exact(32).enumerate() {
        let (s1, m1) = scale_min_k4(2 * pair, scales);
        let (s2, m2) = scale_min_k4(2 * pair + 1, scales);
        let (d1, m1, d2, m2) = (d * s1, dmin * m1, d * s2, dmin * m2);
        let (u1, u2) = (1u8 << (2 * pair), 1u8 << (2 * pair + 1));
        out.extend(
            q.iter()
                .zip(qh)
                .map(|(&x, &h)| d1 * ((x & 0x0F) + if h & u1 != 0 { 16 } else { 0 }) as f32 - m1),
        );
        out.extend(
            q.iter()
                .zip(qh)
                .map(|(&x, &h)| d2 * ((x >> 4) + if h & u2 != 0 { 16 } else { 0 }) as f32 - m2),
        );
    }
}

/// `{ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16}`: 6-bit values (4 low bits from
/// `ql`, 2 high bits from `qh`) minus 32, times `d` and an 8-bit scale per 16 elements. Each
/// half of 128 elements reads 64 bytes of `ql`, 32 of `qh` and 8 scales.
fn q6_k(b: &[u8], out: &mut Vec<f32>) {
    let d = half(b, 208);
    let start = out.len();
    out.resize(start + QK_K, 0.0);
    let y = &mut out[start..];
    for n in 0..2 {
        let ql = &b[64 * n..64 * n + 64];
        let qh = &b[128 + 32 * n..128 + 32 * n + 32];
        let sc = &b[192 + 8 * n..192 + 8 * n + 8];
        let y = &mut y[128 * n..128 * n + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_sizes_match_ggml() {
        // ggml's type_traits: Q4_K 144, Q5_K 176, Q6_K 210 bytes per 256 elements
        assert_eq!(GgmlType::Q4K.block_bytes(), 144);
        assert_eq!(GgmlType::Q5K.block_bytes(), 176);
        assert_eq!(GgmlType::Q6K.block_bytes(), 210);
        assert_eq!(GgmlType::Q5_1.block_bytes(), 24);
        for code in 0..40 {
            if let Some(t) = GgmlType::from_code(code) {
                assert_eq!(GgmlType::name_of(code), t.name());
            }
        }
        assert_eq!(GgmlType::name_of(10), "Q2_K");
        assert_eq!(GgmlType::name_of(999), "type 999");
    }

    #[test]
    fn q8_0_by_hand() {
        let mut b = vec![0u8; 34];
        b[..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        for (i, q) in b[2..].iter_mut().enumerate() {
            *q = (i as i8 - 16) as u8;
        }
        let v = GgmlType::Q8_0.dequantize(&b);
        assert_eq!(v.len(), 32);
        assert_eq!(v[0], -8.0);
        assert_eq!(v[31], 7.5);
    }
}
