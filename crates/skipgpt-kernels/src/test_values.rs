//! Deterministic test inputs shared by the kernels' unit tests (matvec, attention, ops):
//! no random crate, the same values on every machine.

/// `n` values in `[-half_width, half_width)` from a xorshift generator seeded by `seed`.
pub(crate) fn values_within(n: usize, seed: u32, half_width: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32) * (2.0 * half_width) - half_width
        })
        .collect()
}

/// `n` values in `[-1, 1)`.
pub(crate) fn values(n: usize, seed: u32) -> Vec<f32> {
    values_within(n, seed, 1.0)
}
