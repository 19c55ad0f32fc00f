//! Deterministic test inputs shared by the kernels' unit tests (matvec, attention, ops):
//! no random crate, the same values on every machine.

/// A xorshift stream seeded by `seed`; `salt` keeps the streams of different uses apart.
pub(crate) fn xorshift(seed: u32, salt: u32) -> impl Iterator<Item = u32> {
    let mut s = seed.wrapping_mul(2654435761).wrapping_add(salt);
    std::iter::repeat_with(move || {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        s
    })
}

/// `n` values in `[-half_width, half_width)` from a xorshift generator seeded by `seed`.
pub(crate) fn values_within(n: usize, seed: u32, half_width: f32) -> Vec<f32> {
    let unit = |s: u32| s as f32 / u32::MAX as f32;
    let values = xorshift(seed, 1).map(|s| unit(s) * (2.0 * half_width) - half_width);
    values.take(n).collect()
}

/// `n` values in `[-1, 1)`.
pub(crate) fn values(n: usize, seed: u32) -> Vec<f32> {
    values_within(n, seed, 1.0)
}
