//! ggml tensor types and their dequantization to f32, following `ggml-quants.c`
//! (`dequantize_row_*`) block by block: F32, F16 and BF16 here, the block formats through
//! `skipgpt_kernels::quant`, whose products run on them in place. Tested against `gguf.quants` from the `gguf` PyPI
//! package (`tests/fixtures/gguf-quants`).
//!
//! Every quantized type stores blocks of a fixed number of elements, each with its own scale
//! (and minimum, for the `_1` and K types); the K-quants group 256 elements into a super-block
//! with 6-bit (Q4_K, Q5_K) or 8-bit (Q6_K) sub-block scales.

use half::{bf16, f16};
use skipgpt_kernels::quant::QuantType;

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

    /// ggml's code of the type, as a GGUF tensor info stores it.
    pub fn code(self) -> u32 {
        (0..NAMES.len() as u32)
            .find(|&c| Self::from_code(c) == Some(self))
            .expect("every type has a code")
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

    /// The block format of `skipgpt_kernels::quant` this type is, if it is one (their products
    /// run on the blocks in place).
    pub fn block_format(self) -> Option<QuantType> {
        match self {
            GgmlType::Q4_0 => Some(QuantType::Q4_0),
            GgmlType::Q4_1 => Some(QuantType::Q4_1),
            GgmlType::Q5_0 => Some(QuantType::Q5_0),
            GgmlType::Q5_1 => Some(QuantType::Q5_1),
            GgmlType::Q8_0 => Some(QuantType::Q8_0),
            GgmlType::Q4K => Some(QuantType::Q4K),
            GgmlType::Q5K => Some(QuantType::Q5K),
            GgmlType::Q6K => Some(QuantType::Q6K),
            _ => None,
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
        if let Some(format) = self.block_format() {
            return skipgpt_kernels::quant::dequantize(format, bytes);
        }
        let mut out = Vec::with_capacity(bytes.len() / bb * self.block_elements());
        for block in bytes.chunks_exact(bb) {
            match self {
                GgmlType::F32 => out.push(f32::from_le_bytes(block.try_into().unwrap())),
                GgmlType::F16 => out.push(half(block, 0)),
                GgmlType::BF16 => {
                    out.push(bf16::from_le_bytes([block[0], block[1]]).to_f32());
                }
                other => unreachable!("{} is a block format of skipgpt-kernels", other.name()),
            }
        }
        out
    }
}

/// The f16 at byte `at`.
fn half(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
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
                assert_eq!(t.code(), code);
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
