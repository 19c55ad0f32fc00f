//! f32 rows into the K formats, as llama.cpp's reference quantizers write them without an
//! importance matrix (`quantize_row_q4_K_ref`, `quantize_row_q5_K_ref`,
//! `quantize_row_q6_K_ref` in `ggml-quants.c`, which `llama-quantize` calls): each sub-block's
//! scale is searched to minimise a weighted squared error, the scales are then quantized
//! themselves (6 bits against one f16 per block for Q4_K and Q5_K, 8 bits for Q6_K) and the
//! values rounded again against the rounded scales. The arithmetic follows ggml's term by term
//! (the order of every product, its round-half-to-even `nearest_int`), so a file quantized here
//! holds the bytes `llama-quantize` writes from the same values.

use half::f16;

/// Values per K block.
pub(super) const K: usize = 256;

/// ggml's `nearest_int`: `x` rounded half to even by adding 1.5·2²³ (|x| < 2²²).
fn nearest_int(x: f32) -> i32 {
    let v = x + 12_582_912.0;
    (v.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// One 32-value sub-block's levels `0..=nmax` with a scale and a minimum (ggml's
/// `make_qkx2_quants`): from the range's own scale, `nstep + 1` other scales are tried and the
/// best by the `weights`-weighted squared error kept. Returns the scale and the minimum
/// negated, as ggml stores it.
fn scale_and_min(
    x: &[f32],
    weights: &[f32; 32],
    nmax: i32,
    search: (f32, f32, i32),
    levels: &mut [u8],
) -> (f32, f32) {
    let (rmin, rdelta, nstep) = search;
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..32 {
        min = if x[i] < min { x[i] } else { min };
        max = if x[i] > max { x[i] } else { max };
        sum_w += weights[i];
        sum_x += weights[i] * x[i];
    }
    min = min.min(0.0);
    if max == min {
        levels.fill(0);
        return (0.0, -min);
    }
    let level = |iscale: f32, v: f32, min: f32| nearest_int(iscale * (v - min)).clamp(0, nmax);
    let iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..32 {
        let l = level(iscale, x[i], min);
        levels[i] = l as u8;
        let diff = scale * l as f32 + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    let mut aux = [0u8; 32];
    for is in 0..=nstep {
        let iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..32 {
            let l = level(iscale, x[i], min);
            aux[i] = l as u8;
            let (w, l) = (weights[i], l as f32);
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det <= 0.0 {
            continue;
        }
        let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
        let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
        if this_min > 0.0 {
            this_min = 0.0;
            this_scale = sum_xl / sum_l2;
        }
        let mut error = 0.0f32;
        for i in 0..32 {
            let diff = this_scale * aux[i] as f32 + this_min - x[i];
            error += weights[i] * (diff * diff);
        }
        if error < best_error {
            levels.copy_from_slice(&aux);
            best_error = error;
            scale = this_scale;
            min = this_min;
        }
    }
    (scale, -min)
}

/// One 16-value sub-block's signed levels `-nmax..nmax` (stored `+ nmax`) with a scale (ggml's
/// `make_qx_quants`, weights `x²`): the range's scale and 18 around it, the best kept.
fn signed_scale(x: &[f32], nmax: i32, levels: &mut [u8]) -> f32 {
    let mut max = 0.0f32;
    let mut amax = 0.0f32;
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < 1e-15 {
        levels.fill(0);
        return 0.0;
    }
    let level = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let sums = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
        for &v in x {
            let l = level(iscale, v) as f32;
            let w = v * v;
            sumlx += w * v * l;
            suml2 += w * l * l;
        }
        (sumlx, suml2)
    };
    let mut iscale = -(nmax as f32) / max;
    for (slot, &v) in levels.iter_mut().zip(x) {
        *slot = (level(iscale, v) + nmax) as u8;
    }
    let (sumlx, suml2) = sums(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in (-9..=9).filter(|&is| is != 0) {
        iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (slot, &v) in levels.iter_mut().zip(x) {
                *slot = (level(iscale, v) + nmax) as u8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// Q4_K (`five_bits` false: `d, dmin: f16, scales: [u8; 12], qs: [u8; 128]`) or Q5_K (`d,
/// dmin, scales, qh: [u8; 32], qs`): eight 32-value sub-blocks, each with a 6-bit scale and
/// minimum against the block's two f16s.
pub(super) fn q4_k_or_q5_k(x: &[f32], out: &mut Vec<u8>, five_bits: bool) {
    let (nmax, search) = if five_bits {
        (31, (-0.5, 0.1, 15))
    } else {
        (15, (-1.0, 0.1, 20))
    };
    let mut levels = [0u8; K];
    let (mut scales, mut mins) = ([0.0f32; 8], [0.0f32; 8]);
    for j in 0..8 {
        let sub = &x[32 * j..32 * (j + 1)];
        let mut sum_x2 = 0.0f32;
        for &v in sub {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        let weights: [f32; 32] = std::array::from_fn(|l| av_x + sub[l].abs());
        let sub_levels = &mut levels[32 * j..32 * (j + 1)];
        (scales[j], mins[j]) = scale_and_min(sub, &weights, nmax, search, sub_levels);
    }
    let max_scale = scales
        .iter()
        .fold(0.0f32, |m, &s| if s > m { s } else { m });
    let max_min = mins.iter().fold(0.0f32, |m, &s| if s > m { s } else { m });
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut packed = [0u8; 12];
    for j in 0..8 {
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    let d = f16::from_f32(max_scale / 63.0);
    let dmin = f16::from_f32(max_min / 63.0);
    for j in 0..8 {
        let (sc, m) = super::blocks::scale_min_k4(j, &packed);
        let dj = d.to_f32() * sc as f32;
        if dj == 0.0 {
            continue;
        }
        let dm = dmin.to_f32() * m as f32;
        for i in 32 * j..32 * (j + 1) {
            levels[i] = nearest_int((x[i] + dm) / dj).clamp(0, nmax) as u8;
        }
    }
    out.extend_from_slice(&d.to_le_bytes());
    out.extend_from_slice(&dmin.to_le_bytes());
    out.extend_from_slice(&packed);
    if five_bits {
        // the fifth bit of value `64·p + j` in bit `2p` of `qh[j]`, of `64·p + 32 + j` in `2p + 1`
        let mut qh = [0u8; 32];
        for (p, group) in levels.chunks_exact(64).enumerate() {
            for j in 0..32 {
                qh[j] |= ((group[j] >> 4) << (2 * p)) | ((group[j + 32] >> 4) << (2 * p + 1));
            }
        }
        out.extend_from_slice(&qh);
    }
    for group in levels.chunks_exact(64) {
        out.extend((0..32).map(|l| (group[l] & 0xF) | ((group[l + 32] & 0xF) << 4)));
    }
}

/// Q6_K `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`: sixteen 16-value sub-blocks
/// of 6-bit values, each with an 8-bit scale against the block's f16.
pub(super) fn q6_k(x: &[f32], out: &mut Vec<u8>) {
    let mut levels = [0u8; K];
    let mut scales = [0.0f32; 16];
    let (mut max_scale, mut max_abs_scale) = (0.0f32, 0.0f32);
    for (ib, scale) in scales.iter_mut().enumerate() {
        let range = 16 * ib..16 * (ib + 1);
        *scale = signed_scale(&x[range.clone()], 32, &mut levels[range]);
        if scale.abs() > max_abs_scale {
            max_abs_scale = scale.abs();
            max_scale = *scale;
        }
    }
    if max_abs_scale < 1e-15 {
        out.extend(std::iter::repeat_n(0u8, 210));
        return;
    }
    let iscale = -128.0 / max_scale;
    let d = f16::from_f32(1.0 / iscale);
    let quantized: [i8; 16] =
        std::array::from_fn(|ib| nearest_int(iscale * scales[ib]).min(127) as i8);
    for (j, &sc) in quantized.iter().enumerate() {
        let dj = d.to_f32() * sc as f32;
        if dj == 0.0 {
            continue;
        }
        for i in 16 * j..16 * (j + 1) {
            levels[i] = (nearest_int(x[i] / dj).clamp(-32, 31) + 32) as u8;
        }
    }
    // a half of 128 values: the low nibbles of values l and l + 64 share `ql[l]`, of l + 32
    // and l + 96 `ql[l + 32]`; the four values' high two bits share `qh[l]`
    let (mut ql, mut qh) = (Vec::with_capacity(128), Vec::with_capacity(64));
    for half in levels.chunks_exact(128) {
        let low = |a: usize, b: usize| (half[a] & 0xF) | ((half[b] & 0xF) << 4);
        ql.extend((0..32).map(|l| low(l, l + 64)));
        ql.extend((0..32).map(|l| low(l + 32, l + 96)));
        qh.extend((0..32).map(|l| {
            (half[l] >> 4)
                | ((half[l + 32] >> 4) << 2)
                | ((half[l + 64] >> 4) << 4)
                | ((half[l + 96] >> 4) << 6)
        }));
    }
    out.extend_from_slice(&ql);
    out.extend_from_slice(&qh);
    out.extend(quantized.iter().map(|&s| s as u8));
    out.extend_from_slice(&d.to_le_bytes());
}
