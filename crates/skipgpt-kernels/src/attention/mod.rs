//! The sparse engine's attention on the CPU: every query row against the stretch of its
//! sequence's cached keys that it sees, on every core.
//!
//! burn-flex's attention op runs all (batch, head) pairs one after another on one thread, and
//! takes a boolean mask that it reads for every (query, key) pair: it computes the scores of key
//! tiles a causal query cannot see and hides them afterwards. In a 512-token prefill of
//! SmolLM2 that was a fifth of the samples, on one of the two cores. Here:
//!
//! - each query row names the slots of the cache it sees as one range (`keys`). The engine
//!   stores a sequence's keys in position order, so what a causal (or sliding-window) query
//!   sees is always one contiguous stretch; keys outside it are never multiplied;
//! - work is split into tasks of up to [`QUERY_BLOCK`] consecutive query rows of one sequence
//!   and one key/value head, run in parallel ([`crate::thread_team::par_map`]);
//! - each task runs a flash-style loop over chunks of [`KEY_CHUNK`] keys, each chunk read (and
//!   widened from a half-precision cache) once for every query head of its key/value head:
//!   scores by gemm, an online softmax (running maximum and sum, f32), and the weighted values
//!   by gemm;
//! - queries are read and outputs written token-major (`[rows, heads * head_dim]`, what the
//!   projections produce and consume), so nothing is transposed around the kernel.
//!
//! It works on plain slices and knows nothing of Burn; the model crate's `flex_kernels` routes the CPU
//! backend's engine attention here.

use std::ops::Range;

use half::slice::HalfFloatSliceExt;

use crate::isa::Isa;
use crate::matvec::WeightSlice;

/// Query rows per task: large enough for gemm to run near its peak, small enough that a causal
/// block's union of key ranges wastes little (at most one block's worth of keys per row).
pub const QUERY_BLOCK: usize = 32;

/// Keys per step of the online softmax: the scores of one chunk (`QUERY_BLOCK × KEY_CHUNK`
/// f32, 32 KB) stay in L1/L2 between the two products.
pub const KEY_CHUNK: usize = 256;

/// Below this many multiply-adds in all, the tasks run on the calling thread: handing them to
/// the pool costs more than it saves (a decoding step of one sequence is about 10⁵).
const PARALLEL_MIN_MACS: usize = 1 << 16;

/// One query row: the sequence whose cache it reads and the cache slots it sees.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueryRow {
    pub seq: usize,
    pub keys: Range<usize>,
}

/// A layer's cache as the engine holds it: `[batch, kv_heads, capacity, head_dim]` keys and
/// values, row-major, in f32 or (with half-precision weights) f16/bf16. Half-precision
/// stretches are widened to f32 a chunk of keys at a time, so scores, softmax and the weighted
/// sum stay f32.
#[derive(Clone, Copy, Debug)]
pub struct KvCache<'a> {
    pub k: WeightSlice<'a>,
    pub v: WeightSlice<'a>,
    pub kv_heads: usize,
    pub capacity: usize,
    pub head_dim: usize,
}

impl KvCache<'_> {
    /// Offset of slot 0 of `(seq, kv_head)`.
    fn base(&self, seq: usize, kv_head: usize) -> usize {
        (seq * self.kv_heads + kv_head) * self.capacity * self.head_dim
    }
}

/// `values[from..to]` as f32: the cache's own memory when it is f32, else widened into
/// `scratch`.
fn as_f32<'s>(
    values: WeightSlice<'s>,
    from: usize,
    to: usize,
    scratch: &'s mut Vec<f32>,
) -> &'s [f32] {
    let widened = |scratch: &'s mut Vec<f32>, convert: &dyn Fn(&mut [f32])| -> &'s [f32] {
        scratch.resize(to - from, 0.0);
        convert(scratch);
        scratch
    };
    match values {
        WeightSlice::F32(v) => &v[from..to],
        WeightSlice::F16(v) => widened(scratch, &|out| v[from..to].convert_to_f32_slice(out)),
        WeightSlice::Bf16(v) => widened(scratch, &|out| v[from..to].convert_to_f32_slice(out)),
    }
}

/// `softmax(q·kᵀ · scale) · v` for every query row and head, each row over its own key range.
///
/// `q` is `[rows, heads, head_dim]` (token-major, rows in the order of `rows`, rows of one
/// sequence consecutive for the tasks to group them); `heads` is a multiple of the cache's
/// `kv_heads` (grouped-query attention: query head `h` reads key/value head
/// `h / (heads / kv_heads)`). Returns `[rows, heads * head_dim]`.
///
/// # Panics
/// When the slices' lengths disagree with the shapes, a key range is empty or runs past the
/// capacity, or `heads` is not a multiple of `kv_heads` (callers check shapes first).
pub fn attend(
    q: &[f32],
    heads: usize,
    rows: &[QueryRow],
    cache: KvCache<'_>,
    scale: f32,
) -> Vec<f32> {
    attend_on(Isa::detect(), q, heads, rows, cache, scale)
}

fn attend_on(
    isa: Isa,
    q: &[f32],
    heads: usize,
    rows: &[QueryRow],
    cache: KvCache<'_>,
    scale: f32,
) -> Vec<f32> {
    let hd = cache.head_dim;
    let width = heads * hd;
    assert_eq!(q.len(), rows.len() * width, "query rows");
    assert!(
        cache.kv_heads > 0 && heads.is_multiple_of(cache.kv_heads),
        "{heads} query heads over {} key/value heads",
        cache.kv_heads
    );
    let lane = cache.capacity * hd;
    assert_eq!(cache.k.len(), cache.v.len(), "keys and values");
    assert_eq!(cache.k.len() % (cache.kv_heads * lane).max(1), 0, "cache");
    let batch = cache.k.len() / (cache.kv_heads * lane).max(1);
    for r in rows {
        assert!(
            r.seq < batch && r.keys.start < r.keys.end && r.keys.end <= cache.capacity,
            "query row {r:?} against a cache of {batch} sequences x {} slots",
            cache.capacity
        );
    }

    // tasks: (block of consecutive rows of one sequence, key/value head), each for every
    // query head that reads that key/value head
    let mut blocks: Vec<Range<usize>> = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        match blocks.last_mut() {
            Some(b) if rows[b.start].seq == r.seq && b.len() < QUERY_BLOCK => b.end = i + 1,
            _ => blocks.push(i..i + 1),
        }
    }
    let tasks: Vec<(Range<usize>, usize)> = blocks
        .iter()
        .flat_map(|b| (0..cache.kv_heads).map(move |g| (b.clone(), g)))
        .collect();
    let n_rep = heads / cache.kv_heads;
    let run = |(block, g): &(Range<usize>, usize)| {
        let task = Task {
            q,
            width,
            rows: &rows[block.clone()],
            first: block.start,
            heads: g * n_rep..(g + 1) * n_rep,
            kv: cache.base(rows[block.start].seq, *g),
            cache,
            scale,
        };
        task.run(isa)
    };
    let macs: usize = rows.iter().map(|r| r.keys.len()).sum::<usize>() * width * 2;
    let outs: Vec<Vec<f32>> = if macs < PARALLEL_MIN_MACS {
        tasks.iter().map(run).collect()
    } else {
        crate::thread_team::par_map(tasks.len(), |i| run(&tasks[i]))
    };

    // each task's output is [n_rep, rows, hd]
    let mut y = vec![0.0f32; rows.len() * width];
    for ((block, g), out) in tasks.iter().zip(outs) {
        for (k, head_out) in out.chunks(block.len() * hd).enumerate() {
            let h = g * n_rep + k;
            for (i, r) in block.clone().enumerate() {
                y[r * width + h * hd..][..hd].copy_from_slice(&head_out[i * hd..(i + 1) * hd]);
            }
        }
    }
    y
}

/// One block of query rows of one sequence, for the query heads that share one key/value
/// head: each chunk of that head's keys and values is read (and, from a half-precision cache,
/// widened) once for all of them.
struct Task<'a> {
    q: &'a [f32],
    /// `heads * head_dim`: the stride between query rows (and output rows).
    width: usize,
    rows: &'a [QueryRow],
    /// Index of `rows[0]` among all query rows.
    first: usize,
    /// The query heads.
    heads: Range<usize>,
    /// Offset of this sequence's key/value head in the cache.
    kv: usize,
    cache: KvCache<'a>,
    scale: f32,
}

/// The online softmax of one query head over a block of rows: the weighted values so far
/// (`[rows, head_dim]`), and each row's running maximum score and sum of exponentials.
struct HeadState {
    acc: Vec<f32>,
    row_max: Vec<f32>,
    row_sum: Vec<f32>,
}

impl Task<'_> {
    /// The block's output for each of its heads, `[heads, rows, head_dim]`.
    fn run(&self, isa: Isa) -> Vec<f32> {
        let (m, hd) = (self.rows.len(), self.cache.head_dim);
        let lo = self.rows.iter().map(|r| r.keys.start).min().unwrap_or(0);
        let hi = self.rows.iter().map(|r| r.keys.end).max().unwrap_or(0);
        let mut states: Vec<HeadState> = self
            .heads
            .clone()
            .map(|_| HeadState {
                acc: vec![0.0f32; m * hd],
                row_max: vec![f32::NEG_INFINITY; m],
                row_sum: vec![0.0f32; m],
            })
            .collect();
        let mut scores = vec![0.0f32; m * KEY_CHUNK.min(hi - lo)];
        // a chunk of keys and values widened to f32 (a half-precision cache)
        let (mut k_wide, mut v_wide) = (Vec::new(), Vec::new());
        let mut start = lo;
        while start < hi {
            let end = (start + KEY_CHUNK).min(hi);
            let (from, to) = (self.kv + start * hd, self.kv + end * hd);
            let keys = as_f32(self.cache.k, from, to, &mut k_wide);
            let values = as_f32(self.cache.v, from, to, &mut v_wide);
            for (head, state) in self.heads.clone().zip(&mut states) {
                self.chunk(isa, head, state, &mut scores, start..end, keys, values);
            }
            start = end;
        }
        let mut out = Vec::with_capacity(states.len() * m * hd);
        for state in states {
            for (i, row) in state.acc.chunks(hd).enumerate() {
                let inv = 1.0 / state.row_sum[i];
                out.extend(row.iter().map(|a| a * inv));
            }
        }
        out
    }

    /// One chunk of keys (`slots`; `keys` and `values` hold their `[len, head_dim]`) for one
    /// query head: scores, the online softmax's update, and the weighted values.
    #[allow(clippy::too_many_arguments)]
    fn chunk(
        &self,
        isa: Isa,
        head: usize,
        state: &mut HeadState,
        scores: &mut [f32],
        slots: Range<usize>,
        keys: &[f32],
        values: &[f32],
    ) {
        let (m, hd) = (self.rows.len(), self.cache.head_dim);
        let (start, end, len) = (slots.start, slots.end, slots.len());
        let q = &self.q[self.first * self.width + head * hd..];
        let s = &mut scores[..m * len];
        // s = scale · q_block · K[start..end]ᵀ
        // SAFETY: q holds m rows of `width` from its offset (the head's hd values lie
        // inside each); `keys` holds the chunk's `len` slots of hd
        unsafe {
            gemm::gemm(
                m,
                len,
                hd,
                s.as_mut_ptr(),
                1,
                len as isize,
                false,
                q.as_ptr(),
                1,
                self.width as isize,
                keys.as_ptr(),
                hd as isize,
                1,
                0.0,
                self.scale,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        for (i, r) in self.rows.iter().enumerate() {
            let row = &mut s[i * len..(i + 1) * len];
            let (a, b) = (
                r.keys.start.clamp(start, end) - start,
                r.keys.end.clamp(start, end) - start,
            );
            if a >= b {
                // nothing of this chunk is visible to the row
                row.fill(0.0);
                continue;
            }
            row[..a].fill(0.0);
            row[b..].fill(0.0);
            let seen = &mut row[a..b];
            let chunk_max = seen.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let new_max = state.row_max[i].max(chunk_max);
            let sum = exp_shifted(isa, seen, new_max);
            if state.row_max[i] > f32::NEG_INFINITY {
                let correction = (state.row_max[i] - new_max).exp();
                state.row_sum[i] *= correction;
                state.acc[i * hd..(i + 1) * hd]
                    .iter_mut()
                    .for_each(|a| *a *= correction);
            }
            state.row_sum[i] += sum;
            state.row_max[i] = new_max;
        }
        // acc += s · V[start..end]
        // SAFETY: as above; `acc` is [m, hd] and `s` [m, len]
        unsafe {
            gemm::gemm(
                m,
                hd,
                len,
                state.acc.as_mut_ptr(),
                1,
                hd as isize,
                true,
                s.as_ptr(),
                1,
                len as isize,
                values.as_ptr(),
                1,
                hd as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    }
}

/// `x[i] = exp(x[i] - shift)` for every `i`, returning the sum. Every `x[i] <= shift`, so each
/// result lies in (0, 1].
fn exp_shifted(isa: Isa, x: &mut [f32], shift: f32) -> f32 {
    match isa {
        // SAFETY: `Isa::detect` found the features
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { exp_shifted_avx512(x, shift) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { exp_shifted_avx2(x, shift) },
        Isa::Plain => exp_shifted_body(x, shift),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_shifted_avx512(x: &mut [f32], shift: f32) -> f32 {
    exp_shifted_body(x, shift)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_shifted_avx2(x: &mut [f32], shift: f32) -> f32 {
    exp_shifted_body(x, shift)
}

/// The loop of [`exp_shifted`], plain arithmetic the compiler vectorises for the instruction
/// set of its caller (a call of `f32::exp` per value would not vectorise). Eight partial sums,
/// so that the additions vectorise too.
#[inline(always)]
fn exp_shifted_body(x: &mut [f32], shift: f32) -> f32 {
    let mut sums = [0.0f32; 8];
    let mut chunks = x.chunks_exact_mut(8);
    for c in &mut chunks {
        for (v, s) in c.iter_mut().zip(sums.iter_mut()) {
            *v = exp_nonpositive(*v - shift);
            *s += *v;
        }
    }
    let mut sum: f32 = sums.iter().sum();
    for v in chunks.into_remainder() {
        *v = exp_nonpositive(*v - shift);
        sum += *v;
    }
    sum
}

/// `e^x` for `x <= 0` (Cephes' `expf`: `x = n·ln 2 + r`, a degree-6 polynomial in `r`, `2^n`
/// built in the exponent bits), within about 2 ulp. Inputs below -87.3 give about 1e-38 instead
/// of a smaller number or zero: nothing next to the row's maximum, whose term is 1.
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 in two parts, so that n·LN2_HI is exact
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // adding and subtracting 1.5·2^23 rounds to the nearest integer in plain arithmetic
    const ROUND: f32 = 12_582_912.0;
    let x = x.max(-87.3);
    let n = (x * LOG2_E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 0.166_666_65;
    let p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

#[cfg(test)]
mod tests;
