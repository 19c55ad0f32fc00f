//! f32 rows into block formats, as llama.cpp's reference quantizers write them
//! (`quantize_row_*_ref` in `ggml-quants.c`; the K formats in `quantize_k`): what
//! `skipgpt quantize` writes and the tests build quantized models from.

use half::f16;

use super::quantize_k::{q4_k_or_q5_k, q6_k};
use super::QuantType;
use crate::thread_team::par_map;

/// Blocks quantized per parallel task (the K formats' scale searches make quantizing a
/// model's matrices worth spreading over the cores).
const BLOCKS_PER_TASK: usize = 256;

/// `values` (whole blocks of `kind`) in `kind`, or `None` for a length that is no whole
/// number of blocks.
pub fn quantize(kind: QuantType, values: &[f32]) -> Option<Vec<u8>> {
    let per_block = kind.block_values();
    if !values.len().is_multiple_of(per_block) {
        return None;
    }
    let block: fn(&[f32], &mut Vec<u8>) = match kind {
        QuantType::Q8_0 => q8_0,
        QuantType::Q4_0 => q4_0,
        QuantType::Q4_1 => q4_1,
        QuantType::Q5_0 => q5_0,
        QuantType::Q5_1 => q5_1,
        QuantType::Q4K => |x, out| q4_k_or_q5_k(x, out, false),
        QuantType::Q5K => |x, out| q4_k_or_q5_k(x, out, true),
        QuantType::Q6K => q6_k,
    };
    let per_task = per_block * BLOCKS_PER_TASK;
    let tasks = par_map(values.len().div_ceil(per_task), |t| {
        let chunk = &values[t * per_task..((t + 1) * per_task).min(values.len())];
        let mut out = Vec::with_capacity(chunk.len() / per_block * kind.block_bytes());
        for block_values in chunk.chunks_exact(per_block) {
            block(block_values, &mut out);
        }
        out
    });
    Some(tasks.concat())
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
    let max = largest_magnitude(x);
    let d = max / -8.0;
    let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
    let nibble = |v: f32| ((v * inv + 8.5) as i8).min(15) as u8;
    out.extend((0..16).map(|j| nibble(x[j]) | (nibble(x[j + 16]) << 4)));
}

/// Q5_0: `d = m / −16` for `m` the value of largest magnitude, `q = min(31, ⌊x / d + 16.5⌋)`;
/// the low four bits as Q4_0's nibbles, the fifth bit of value `j` in bit `j` of a `u32`.
fn q5_0(x: &[f32], out: &mut Vec<u8>) {
    let max = largest_magnitude(x);
    let d = max / -16.0;
    let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
    let q: Vec<u8> = x
        .iter()
        .map(|&v| ((v * inv + 16.5) as i8).min(31) as u8)
        .collect();
    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
    five_bit_values(&q, out);
}

/// Q5_1: `d = (max − min) / 31`, `m = min`, `q = ⌊(x − m) / d + 0.5⌋`, bits as Q5_0.
fn q5_1(x: &[f32], out: &mut Vec<u8>) {
    let (min, max) = range(x);
    let d = (max - min) / 31.0;
    let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
    let q: Vec<u8> = x.iter().map(|&v| ((v - min) * inv + 0.5) as u8).collect();
    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
    out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
    five_bit_values(&q, out);
}

/// 32 five-bit values: their fifth bits as a little-endian `u32`, then nibbles as Q4_0's.
fn five_bit_values(q: &[u8], out: &mut Vec<u8>) {
    let high = q
        .iter()
        .enumerate()
        .fold(0u32, |h, (j, &v)| h | (u32::from((v >> 4) & 1) << j));
    out.extend_from_slice(&high.to_le_bytes());
    out.extend((0..16).map(|j| (q[j] & 0xF) | ((q[j + 16] & 0xF) << 4)));
}

/// `d = (max − min) / 15`, `m = min`, `q = min(15, ⌊(x − m) / d + 0.5⌋)`, nibbles as Q4_0.
fn q4_1(x: &[f32], out: &mut Vec<u8>) {
    let (min, max) = range(x);
    let d = (max - min) / 15.0;
    let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
    out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
    let nibble = |v: f32| (((v - min) * inv + 0.5) as i8).min(15) as u8;
    out.extend((0..16).map(|j| nibble(x[j]) | (nibble(x[j + 16]) << 4)));
}

/// The value of largest magnitude (the first of equals), as ggml's quantizers pick it.
fn largest_magnitude(x: &[f32]) -> f32 {
    x.iter()
        .fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m })
}

/// The smallest and the largest value.
fn range(x: &[f32]) -> (f32, f32) {
    x.iter()
        .fold((f32::MAX, f32::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)))
}
