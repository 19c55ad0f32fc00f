//! Asking for weights ahead of the loop that reads them. A decoding step reads every weight
//! once, from memory, in runs that the hardware prefetcher follows only to the end of each
//! page; asked for a page ahead, the next page is on its way in time (docs/benchmarks.md has
//! the distances tried). The quantized and the dense one-row loops both ask.

use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};

/// How far ahead of the bytes being read the loops ask.
const AHEAD: usize = 4096;

/// Asks for the cache lines of the `bytes` bytes that lie [`AHEAD`] bytes past `p`.
///
/// # Safety
/// None beyond the caller's own: a prefetch is a hint, harmless at any address (past the
/// weights' end it does nothing).
#[inline(always)]
pub(crate) unsafe fn ask_ahead<T>(p: *const T, bytes: usize) {
    let p = p.cast::<i8>().wrapping_add(AHEAD);
    let mut line = 0;
    while line < bytes {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(line));
        line += 64;
    }
}
