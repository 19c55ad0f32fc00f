//! f32 rows into block formats, as llama.cpp's reference quantizers write them
//! (`quantize_row_q8_0_ref`, `quantize_row_q4_0_ref`, `quantize_row_q4_1_ref` in
//! `ggml-quants.c`): what
//! `skipgpt quantize` writes and the tests build quantized models from.

use half::f16;

use super::QuantType;

/// Values per block of the formats quantized here.
const BLOCK: usize = 32;

/// The formats [`quantize`] writes.
pub const QUANTIZABLE: [QuantType; 3] = [QuantType::Q8_0, QuantType::Q4_0, QuantType::Q4_1];

/// `values` (whole 32-value blocks) in `kind`, or `None` for a format not in [`QUANTIZABLE`]
/// or a length that is no whole number of blocks.
pub fn quantize(kind: QuantType, values: &[f32]) -> Option<Vec<u8>> {
    if !values.len().is_multiple_of(BLOCK) {
        return None;
    }
    let block: fn(&[f32], &mut Vec<u8>) = match kind {
        QuantType::Q8_0 => q8_0,
        QuantType::Q4_0 => q4_0,
        QuantType::Q4_1 => q4_1,
        _ => return None,
    };
    let mut out = Vec::with_capacity(values.len() / BLOCK * kind.block_bytes());
    for chunk in values.chunks_exact(BLOCK) {
        block(chunk, &mut out);
    }
    Some(out)
}

/// `d = max|x| / 127`, `q = round(x / d)`.
fn q8_0(x: &[f32], out: &mut Vec<u8>) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
    out.extend(x.iter().map(|&v| (v * inv).round() as i8 as u8));
}

/// `d = m / −8` for `m` the value of largest magnitude, `q = min(15, ⌊x / d + 8.5⌋)`; value
/// `j` in the low nibble of byte `j`, value `j + 16` in its high nibble.
fn q4_0(x: &[f32], out: &mut Vec<u8>) {
    let max = x
        .iter()
        .fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    let d = max / -8.0;
    let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
    let nibble = |v: f32| ((v * inv + 8.5) as i8).min(15) as u8;
    out.extend((0..16).map(|j| nibble(x[j]) | (nibble(x[j + 16]) << 4)));
}

/// `d = (max − min) / 15`, `m = min`, `q = min(15, ⌊(x − m) / d + 0.5⌋)`, nibbles as Q4_0.
fn q4_1(x: &[f32], out: &mut Vec<u8>) {
    let (min, max) = x
        .iter()
        .fold((f32::MAX, f32::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let d = (max - min) / 15.0;
    let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
    out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
    let nibble = |v: f32| (((v - min) * inv + 0.5) as i8).min(15) as u8;
    out.extend((0..16).map(|j| nibble(x[j]) | (nibble(x[j + 16]) << 4)));
}
