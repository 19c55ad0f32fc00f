//! Products with weights kept in llama.cpp's quantized block formats, read in place (from a
//! memory-mapped GGUF): no dequantized copy of a matrix is ever made.
//!
//! Each activation row is quantized once per product to 8 bits ([`Q8Row`]: one scale per
//! 32 or 256 values, as llama.cpp quantizes them, and the integer sum of every 16), then
//! multiplied with each weight block in integer dot products: on AVX2 straight from the
//! block's bytes (`fused`; with AVX-VNNI or AVX-512 VNNI where the CPU has them, see
//! [`Kernel`]), elsewhere through the plain loop that unpacks a block to small
//! integers with a scale (and an offset) per group of 16 or 32 (`blocks`), which the tests
//! hold every vector kernel to. llama.cpp computes the same way (`ggml_vec_dot_*_q8_*`).
//! A prompt's many rows on a VNNI CPU meet eight weight rows at once instead, interleaved
//! per task (`interleaved`, as llama.cpp's repacked layouts); the activations are quantized
//! with AVX2 where the CPU has it (`activations`).
//!
//! - [`QuantType`]: the block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K), byte
//!   for byte as GGUF stores them (llama.cpp quantizes rows that are no multiple of 256 values,
//!   SmolLM2's among them, to Q5_0, Q5_1 or Q8_0 where a K format was asked for);
//! - [`dequantize`]: a block format back to f32 (what other backends load);
//! - [`quantize`]: f32 rows into any of them, as `llama-quantize` writes them;
//! - [`rows_times_quantized`]: `x · Wᵀ` for `W` stored `[n, d]` in a block format, on every
//!   core.

#[cfg(target_arch = "x86_64")]
mod activations;
mod blocks;
#[cfg(target_arch = "x86_64")]
mod fused;
#[cfg(target_arch = "x86_64")]
mod interleaved;
mod quantize;
mod quantize_k;
#[cfg(test)]
mod tests;

use crate::isa::Isa;
use crate::thread_team::par_map;

/// The loop that multiplies weight blocks with quantized activations, widest first. The
/// vector loops are one code (`fused`) built three ways, differing in the instruction that
/// adds up 32 byte products in fours: `vpdpbusd` (AVX-VNNI, or AVX-512 VNNI on 256-bit
/// registers) does in one instruction what AVX2 does in two (`maddubs`, then `madd`), as
/// llama.cpp's `mul_sum_us8_pairs_float` does when built for such a CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    #[cfg(target_arch = "x86_64")]
    AvxVnni,
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Plain,
}

impl Kernel {
    /// The widest this CPU runs, found once.
    fn detect() -> Kernel {
        static FOUND: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *FOUND.get_or_init(|| Kernel::available()[0])
    }

    /// Every one this CPU runs, widest first: the tests hold each to the plain loop.
    fn available() -> Vec<Kernel> {
        #[allow(unused_mut)]
        let mut found = Vec::new();
        #[cfg(target_arch = "x86_64")]
        if Isa::available().contains(&Isa::Avx2) {
            if is_x86_feature_detected!("avxvnni") {
                found.push(Kernel::AvxVnni);
            }
            if is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl") {
                found.push(Kernel::Avx512Vnni);
            }
            found.push(Kernel::Avx2);
        }
        found.push(Kernel::Plain);
        found
    }
}
pub use blocks::Unpacked;
pub use quantize::quantize;

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

    /// Whether this is a K format (256-value blocks), whose products take activations with one
    /// scale per 256 values ([`Q8Row::quantize_k`]).
    pub fn is_k(self) -> bool {
        self.block_values() == K_BLOCK
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
///
/// The rows are quantized as llama.cpp quantizes the activations for each weight format
/// ([`Q8Row::quantize_for`]), so that a GGUF computes here what it computes there: to
/// `block_q8_0` (one scale per 32 values, kept in f16) for the 32-value formats, to
/// `block_q8_K` (one f32 scale per 256) for the K formats, whose scale is then repeated for
/// each 32 values.
#[derive(Clone, Debug, Default)]
pub struct Q8Row {
    pub d: Vec<f32>,
    pub qs: Vec<i8>,
    pub sums: Vec<i32>,
    pub scaled_sums: Vec<f32>,
}

/// Values per activation scale.
pub const Q8_BLOCK: usize = 32;

/// Values per K-format block, and per activation scale for them.
const K_BLOCK: usize = 256;

impl Q8Row {
    /// `x` quantized for products with weights of `kind` (its length a multiple of the
    /// format's block).
    #[inline(always)]
    pub fn quantize_for(kind: QuantType, x: &[f32]) -> Self {
        if kind.is_k() {
            Self::quantize_k(x)
        } else {
            Self::quantize(x)
        }
    }

    /// `x` (a multiple of 32 values) quantized as ggml's `quantize_row_q8_0`: each block of 32
    /// scaled so that its largest magnitude becomes 127 (rounded half to even), the scale kept
    /// in f16.
    #[inline(always)]
    pub fn quantize(x: &[f32]) -> Self {
        assert_eq!(x.len() % Q8_BLOCK, 0, "a whole number of 32-value blocks");
        let mut row = Self::with_capacity(x.len());
        for block in x.chunks_exact(Q8_BLOCK) {
            let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let (d, inv) = q8_0_scales(amax);
            let mut qs = [0i8; Q8_BLOCK];
            for (q, &v) in qs.iter_mut().zip(block) {
                *q = (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8;
            }
            row.push_block(d, &qs);
        }
        row
    }

    /// `x` (a multiple of 256 values) quantized as ggml's `quantize_row_q8_K`: each block of
    /// 256 scaled by `−127 / v`, `v` its value of largest magnitude (rounded half to even),
    /// the scale kept in f32 (negative where `v` is positive, as ggml has it).
    #[inline(always)]
    pub fn quantize_k(x: &[f32]) -> Self {
        assert_eq!(x.len() % K_BLOCK, 0, "a whole number of 256-value blocks");
        let mut row = Self::with_capacity(x.len());
        for block in x.chunks_exact(K_BLOCK) {
            let max = block
                .iter()
                .fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
            let (d, iscale) = q8_k_scales(max);
            for group in block.chunks_exact(Q8_BLOCK) {
                let mut qs = [0i8; Q8_BLOCK];
                for (q, &v) in qs.iter_mut().zip(group) {
                    *q = (iscale * v).round_ties_even().min(127.0) as i8;
                }
                row.push_block(d, &qs);
            }
        }
        row
    }

    fn with_capacity(len: usize) -> Self {
        Q8Row {
            d: Vec::with_capacity(len / Q8_BLOCK),
            qs: Vec::with_capacity(len),
            sums: Vec::with_capacity(len / 16),
            scaled_sums: Vec::with_capacity(len / 16),
        }
    }

    /// Appends 32 quantized values of scale `d`.
    fn push_block(&mut self, d: f32, qs: &[i8; Q8_BLOCK]) {
        self.qs.extend_from_slice(qs);
        self.d.push(d);
        for half in qs.chunks(16) {
            let sum: i32 = half.iter().map(|&q| q as i32).sum();
            self.sums.push(sum);
            self.scaled_sums.push(d * sum as f32);
        }
    }
}

/// A `block_q8_0`'s scale for a block whose largest magnitude is `amax` (kept in f16), and
/// the multiplier that takes its values to at most ±127; shared by every quantizer of rows.
#[inline(always)]
fn q8_0_scales(amax: f32) -> (f32, f32) {
    let d = half::f16::from_f32(amax / 127.0).to_f32();
    (d, if amax > 0.0 { 127.0 / amax } else { 0.0 })
}

/// A `block_q8_K`'s scale for a block whose value of largest magnitude is `max` (negative
/// where `max` is positive, as ggml has it), and the multiplier `−127 / max`.
#[inline(always)]
fn q8_k_scales(max: f32) -> (f32, f32) {
    if max == 0.0 {
        return (0.0, 0.0);
    }
    let iscale = -127.0 / max;
    (1.0 / iscale, iscale)
}

/// `y = x · Wᵀ`: `m` rows of `x` (`[m, d]`, row-major) times `W` (`[n, d]` in a block format).
/// Returns `y` as `[m, n]`, row-major. Each row of `x` is quantized once; the weight rows are
/// shared out over the cores, each read once for all `m` rows.
///
/// # Panics
/// When `x` is not `m·d` long or `w` is not consistent ([`QuantMatrix::is_consistent`]).
pub fn rows_times_quantized(x: &[f32], m: usize, w: QuantMatrix<'_>) -> Vec<f32> {
    rows_times_quantized_on(Kernel::detect(), x, m, &[w]).remove(0)
}

/// [`rows_times_quantized`] for several matrices of the same input width (q, k and v; gate and
/// up): `x` quantized once, and the rows of all of them shared out in one parallel pass, so
/// that a decoding step waits for the cores once rather than once per matrix.
///
/// # Panics
/// As [`rows_times_quantized`], or when the matrices differ in `d`.
pub fn rows_times_quantized_many(x: &[f32], m: usize, ws: &[QuantMatrix<'_>]) -> Vec<Vec<f32>> {
    rows_times_quantized_on(Kernel::detect(), x, m, ws)
}

fn rows_times_quantized_on(
    kernel: Kernel,
    x: &[f32],
    m: usize,
    ws: &[QuantMatrix<'_>],
) -> Vec<Vec<f32>> {
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
    // each row quantized once per way the matrices need it (K formats or not)
    let quantized = |kind: QuantType| quantize_rows(kernel, kind, x, m, d);
    let needs = |k: bool| ws.iter().find(|w| w.kind.is_k() == k);
    let small_rows = needs(false).map(|w| quantized(w.kind)).unwrap_or_default();
    let k_rows = needs(true).map(|w| quantized(w.kind)).unwrap_or_default();
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
    // a prompt's rows on a VNNI CPU: weight rows eight at a time, against the activations
    // made unsigned
    #[cfg(target_arch = "x86_64")]
    let unsigned = interleaved::applies(kernel, m).then(|| {
        (
            interleaved::unsigned_rows(&small_rows),
            interleaved::unsigned_rows(&k_rows),
        )
    });
    // each task's outputs as `[m, rows of its band]`, so that putting them in place copies
    // whole runs of a row
    let bands = par_map(tasks.len(), |t| {
        let (k, start, end) = tasks[t];
        let (w, len) = (ws[k], end - start);
        let rows = if w.kind.is_k() { &k_rows } else { &small_rows };
        let mut unpacked = Unpacked::default();
        let mut dots = vec![0.0f32; m];
        let mut band = vec![0.0f32; len * m];
        #[allow(unused_mut)]
        let mut first = start;
        #[cfg(target_arch = "x86_64")]
        if let Some((small, k)) = &unsigned {
            let unsigned = if w.kind.is_k() { k } else { small };
            // SAFETY: `applies` chose the kernel; the rows are quantized for this format
            first =
                unsafe { interleaved::band(kernel, &w, (start, end), (unsigned, rows), &mut band) };
        }
        for r in first..end {
            blocks::dot_rows(kernel, w.kind, w.row(r), rows, &mut dots, &mut unpacked);
            for (i, &v) in dots.iter().enumerate() {
                band[i * len + r - start] = v;
            }
        }
        band
    });
    let mut ys: Vec<Vec<f32>> = ws.iter().map(|w| vec![0.0f32; m * w.n]).collect();
    for (&(k, start, end), band) in tasks.iter().zip(bands) {
        let (y, n, len) = (&mut ys[k], ws[k].n, end - start);
        for (i, run) in band.chunks_exact(len.max(1)).enumerate() {
            y[i * n + start..i * n + end].copy_from_slice(run);
        }
    }
    ys
}

/// The `m` rows of `x` (`[m, d]`) quantized for weights of `kind`, shared out over the
/// cores in groups of rows (a prompt's rows would otherwise be quantized on one core while
/// the others wait).
fn quantize_rows(kernel: Kernel, kind: QuantType, x: &[f32], m: usize, d: usize) -> Vec<Q8Row> {
    const ROWS_PER_TASK: usize = 16;
    let groups = par_map(m.div_ceil(ROWS_PER_TASK), |t| {
        let rows = t * ROWS_PER_TASK..((t + 1) * ROWS_PER_TASK).min(m);
        rows.map(|i| quantize_row(kernel, kind, &x[i * d..(i + 1) * d]))
            .collect::<Vec<_>>()
    });
    groups.into_iter().flatten().collect()
}

fn quantize_row(kernel: Kernel, kind: QuantType, x: &[f32]) -> Q8Row {
    #[cfg(target_arch = "x86_64")]
    if kernel != Kernel::Plain {
        // SAFETY: every vector kernel needs AVX2, FMA and F16C (`Kernel::available`)
        return unsafe { activations::quantize_for(kind, x) };
    }
    let _ = kernel;
    Q8Row::quantize_for(kind, x)
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
