//! Products with weights kept in llama.cpp's quantized block formats, read in place (from a
//! memory-mapped GGUF): no dequantized copy of a matrix is ever made.
//!
//! Each activation row is quantized once per product to 8 bits ([`Q8Row`]: one f32 scale per
//! 32 values, and the integer sum of every 16), then multiplied with each weight block in
//! integer dot products: on AVX2 straight from the block's bytes (`fused`), elsewhere through
//! the plain loop that unpacks a block to small integers with a scale (and an offset) per
//! group of 16 or 32 (`blocks`), which the tests hold every vector kernel to. llama.cpp computes the same way (`ggml_vec_dot_*_q8_*`); its
//! activations for the K-quants carry one scale per 256 values, these one per 32.
//!
//! - [`QuantType`]: the block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K), byte
//!   for byte as GGUF stores them (llama.cpp quantizes rows that are no multiple of 256 values,
//!   SmolLM2's among them, to Q5_0, Q5_1 or Q8_0 where a K format was asked for);
//! - [`dequantize`]: a block format back to f32 (what other backends load);
//! - [`quantize`]: f32 rows into Q8_0 or Q4_0 blocks;
//! - [`rows_times_quantized`]: `x · Wᵀ` for `W` stored `[n, d]` in a block format, on every
//!   core.

mod blocks;
#[cfg(target_arch = "x86_64")]
mod fused;
mod quantize;
#[cfg(test)]
mod tests;

use crate::isa::Isa;
use crate::thread_team::par_map;
pub use blocks::Unpacked;
pub use quantize::{quantize, QUANTIZABLE};

/// A llama.cpp block format. The discriminants are ggml's type codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantType {
    Q4_0 = 2,
    Q4_1 = 3,
    Q5_0 = 6,
    Q5_1 = 7,
    Q8_0 = 8,
    Q4K = 12,
    Q5K = 13,
    Q6K = 14,
}

impl QuantType {
    /// Every format, in ggml's order.
    pub const ALL: [QuantType; 8] = [
        QuantType::Q4_0,
        QuantType::Q4_1,
        QuantType::Q5_0,
        QuantType::Q5_1,
        QuantType::Q8_0,
        QuantType::Q4K,
        QuantType::Q5K,
        QuantType::Q6K,
    ];

    /// The format of ggml type `code`, if it is one of these.
    pub fn from_ggml(code: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|t| *t as u32 == code)
    }

    /// ggml's name of the format.
    pub fn name(self) -> &'static str {
        match self {
            QuantType::Q4_0 => "Q4_0",
            QuantType::Q4_1 => "Q4_1",
            QuantType::Q5_0 => "Q5_0",
            QuantType::Q5_1 => "Q5_1",
            QuantType::Q8_0 => "Q8_0",
            QuantType::Q4K => "Q4_K",
            QuantType::Q5K => "Q5_K",
            QuantType::Q6K => "Q6_K",
        }
    }

    /// Values per block.
    pub fn block_values(self) -> usize {
        match self {
            QuantType::Q4_0
            | QuantType::Q4_1
            | QuantType::Q5_0
            | QuantType::Q5_1
            | QuantType::Q8_0 => 32,
            QuantType::Q4K | QuantType::Q5K | QuantType::Q6K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            QuantType::Q4_0 => 18,
            QuantType::Q4_1 => 20,
            QuantType::Q5_0 => 22,
            QuantType::Q5_1 => 24,
            QuantType::Q8_0 => 34,
            QuantType::Q4K => 144,
            QuantType::Q5K => 176,
            QuantType::Q6K => 210,
        }
    }

    /// Bytes of a row of `d` values (`d` a multiple of [`Self::block_values`]).
    pub fn row_bytes(self, d: usize) -> usize {
        d / self.block_values() * self.block_bytes()
    }
}

/// A weight matrix `[n, d]` in a block format: row `r` is bytes
/// `r·row_bytes(d) .. (r+1)·row_bytes(d)`.
#[derive(Clone, Copy, Debug)]
pub struct QuantMatrix<'a> {
    pub kind: QuantType,
    pub bytes: &'a [u8],
    pub n: usize,
    pub d: usize,
}

impl QuantMatrix<'_> {
    /// Whether the bytes hold exactly `n` rows of `d` values, `d` a whole number of blocks.
    pub fn is_consistent(&self) -> bool {
        self.d.is_multiple_of(self.kind.block_values())
            && self.bytes.len() == self.n * self.kind.row_bytes(self.d)
    }

    fn row(&self, r: usize) -> &[u8] {
        let len = self.kind.row_bytes(self.d);
        &self.bytes[r * len..(r + 1) * len]
    }
}

/// The values of `bytes` (whole blocks of `kind`), as f32.
pub fn dequantize(kind: QuantType, bytes: &[u8]) -> Vec<f32> {
    let mut out = Vec::with_capacity(bytes.len() / kind.block_bytes() * kind.block_values());
    let mut unpacked = Unpacked::default();
    for block in bytes.chunks_exact(kind.block_bytes()) {
        blocks::unpack(kind, block, &mut unpacked);
        let values = kind.block_values();
        let groups = unpacked.q[..values].chunks(unpacked.group);
        for (q, (scale, offset)) in groups.zip(unpacked.scale.iter().zip(&unpacked.offset)) {
            out.extend(q.iter().map(|&q| scale * q as f32 - offset));
        }
    }
    out
}

/// An activation row quantized to 8 bits: `x[i] ≈ d[i / 32] · qs[i]`, `sums[k]` the sum of
/// `qs[16k .. 16k + 16]` (what a weight group's offset multiplies), and `scaled_sums[k]` that
/// sum times its block's scale.
#[derive(Clone, Debug, Default)]
pub struct Q8Row {
    pub d: Vec<f32>,
    pub qs: Vec<i8>,
    pub sums: Vec<i32>,
    pub scaled_sums: Vec<f32>,
}

/// Values per activation scale.
pub const Q8_BLOCK: usize = 32;

impl Q8Row {
    /// `x` (a multiple of 32 values) quantized: each block of 32 scaled so that its largest
    /// magnitude becomes 127.
    pub fn quantize(x: &[f32]) -> Self {
        assert_eq!(x.len() % Q8_BLOCK, 0, "a whole number of 32-value blocks");
        let mut row = Q8Row {
            d: Vec::with_capacity(x.len() / Q8_BLOCK),
            qs: Vec::with_capacity(x.len()),
            sums: Vec::with_capacity(x.len() / 16),
            scaled_sums: Vec::with_capacity(x.len() / 16),
        };
        for block in x.chunks_exact(Q8_BLOCK) {
            let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            row.d.push(d);
            let start = row.qs.len();
            row.qs.extend(
                block
                    .iter()
                    .map(|&v| (v * inv).round().clamp(-127.0, 127.0) as i8),
            );
            for half in row.qs[start..].chunks(16) {
                let sum: i32 = half.iter().map(|&q| q as i32).sum();
                row.sums.push(sum);
                row.scaled_sums.push(d * sum as f32);
            }
        }
        row
    }
}

/// `y = x · Wᵀ`: `m` rows of `x` (`[m, d]`, row-major) times `W` (`[n, d]` in a block format).
/// Returns `y` as `[m, n]`, row-major. Each row of `x` is quantized once; the weight rows are
/// shared out over the cores, each read once for all `m` rows.
///
/// # Panics
/// When `x` is not `m·d` long or `w` is not consistent ([`QuantMatrix::is_consistent`]).
pub fn rows_times_quantized(x: &[f32], m: usize, w: QuantMatrix<'_>) -> Vec<f32> {
    rows_times_quantized_on(Isa::detect(), x, m, &[w]).remove(0)
}

/// [`rows_times_quantized`] for several matrices of the same input width (q, k and v; gate and
/// up): `x` quantized once, and the rows of all of them shared out in one parallel pass, so
/// that a decoding step waits for the cores once rather than once per matrix.
///
/// # Panics
/// As [`rows_times_quantized`], or when the matrices differ in `d`.
pub fn rows_times_quantized_many(x: &[f32], m: usize, ws: &[QuantMatrix<'_>]) -> Vec<Vec<f32>> {
    rows_times_quantized_on(Isa::detect(), x, m, ws)
}

fn rows_times_quantized_on(isa: Isa, x: &[f32], m: usize, ws: &[QuantMatrix<'_>]) -> Vec<Vec<f32>> {
    let Some(d) = ws.first().map(|w| w.d) else {
        return Vec::new();
    };
    assert_eq!(x.len(), m * d, "x is [m, d]");
    for w in ws {
        assert!(
            w.is_consistent() && w.d == d,
            "{:?} bytes do not hold [{}, {}] (inputs {d})",
            w.kind,
            w.n,
            w.d
        );
    }
    let rows: Vec<Q8Row> = x.chunks(d.max(1)).take(m).map(Q8Row::quantize).collect();
    // (matrix, first row, end row) of each task
    let tasks: Vec<(usize, usize, usize)> = ws
        .iter()
        .enumerate()
        .flat_map(|(k, w)| {
            let per_task = band_rows(w, ws.len());
            (0..w.n.div_ceil(per_task))
                .map(move |t| (k, t * per_task, ((t + 1) * per_task).min(w.n)))
        })
        .collect();
    let bands = par_map(tasks.len(), |t| {
        let (k, start, end) = tasks[t];
        let w = ws[k];
        let mut unpacked = Unpacked::default();
        let mut out = vec![0.0f32; (end - start) * m];
        for (r, dots) in (start..end).zip(out.chunks_mut(m.max(1))) {
            blocks::dot_rows(isa, w.kind, w.row(r), &rows, dots, &mut unpacked);
        }
        out
    });
    let mut ys: Vec<Vec<f32>> = ws.iter().map(|w| vec![0.0f32; m * w.n]).collect();
    for (&(k, start, end), band) in tasks.iter().zip(bands) {
        let (y, n) = (&mut ys[k], ws[k].n);
        if m == 1 {
            y[start..end].copy_from_slice(&band);
            continue;
        }
        for (j, v) in band.into_iter().enumerate() {
            let (r, i) = (start + j / m.max(1), j % m.max(1));
            y[i * n + r] = v;
        }
    }
    ys
}

/// Weight rows per task: enough bytes per task that a hand-off costs little against reading
/// them, and several tasks per thread so that a slow thread takes fewer.
fn band_rows(w: &QuantMatrix<'_>, matrices: usize) -> usize {
    const MIN_BYTES_PER_TASK: usize = 32 * 1024;
    let threads = rayon::current_num_threads().max(1);
    let row_bytes = w.kind.row_bytes(w.d).max(1);
    let by_bytes = MIN_BYTES_PER_TASK.div_ceil(row_bytes);
    let by_threads = w.n.div_ceil((threads * 4).div_ceil(matrices));
    by_bytes.max(by_threads).clamp(1, w.n.max(1))
}
