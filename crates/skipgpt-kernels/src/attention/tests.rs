//! Attention against an f64 reference, on every instruction set this CPU has.

use super::*;

use half::{bf16, f16};

use crate::test_values::values;

/// The same attention in f64, one query row and head at a time, over the cache's values
/// `ck`, `cv` as f32 (`c` gives the shapes).
fn reference(
    q: &[f32],
    heads: usize,
    rows: &[QueryRow],
    (c, ck, cv): (&KvCache<'_>, &[f32], &[f32]),
    scale: f32,
) -> Vec<f32> {
    let hd = c.head_dim;
    let n_rep = heads / c.kv_heads;
    let mut y = vec![0.0f32; rows.len() * heads * hd];
    for (i, r) in rows.iter().enumerate() {
        for h in 0..heads {
            let base = c.base(r.seq, h / n_rep);
            let qv = &q[(i * heads + h) * hd..][..hd];
            let scores: Vec<f64> = r
                .keys
                .clone()
                .map(|j| {
                    let k = &ck[base + j * hd..][..hd];
                    qv.iter()
                        .zip(k)
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum::<f64>()
                        * scale as f64
                })
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f64 = e.iter().sum();
            for d in 0..hd {
                let v: f64 = r
                    .keys
                    .clone()
                    .zip(&e)
                    .map(|(j, w)| w * cv[base + j * hd + d] as f64)
                    .sum();
                y[(i * heads + h) * hd + d] = (v / total) as f32;
            }
        }
    }
    y
}

#[test]
fn exp_matches_the_standard_library() {
    for isa in Isa::available() {
        let mut x: Vec<f32> = (0..2000).map(|i| -(i as f32) * 0.05).collect();
        x.extend([-87.0, -0.0, -1e-7, -100.0]);
        let want: Vec<f32> = x.iter().map(|v| v.exp()).collect();
        let total = exp_shifted(isa, &mut x, 0.0);
        for (k, (g, w)) in x.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 3e-7 * w.max(1e-30) || (g - w).abs() < 1e-37,
                "{isa:?} value {k}: {g} against {w}"
            );
        }
        let want_total: f32 = want.iter().sum();
        assert!((total - want_total).abs() < 1e-5 * want_total);
    }
}

/// A cache of `kv_heads` heads of `head_dim` values at `capacity` slots, held in f32.
fn f32_cache<'a>(
    k: &'a [f32],
    v: &'a [f32],
    kv_heads: usize,
    capacity: usize,
    head_dim: usize,
) -> KvCache<'a> {
    let (k, v) = (WeightSlice::F32(k), WeightSlice::F32(v));
    KvCache {
        k,
        v,
        kv_heads,
        capacity,
        head_dim,
    }
}

#[test]
fn causal_prefill_ragged_batches_and_windows_match_the_reference() {
    let (hd, kv_heads, heads, cap) = (16, 2, 6, 320);
    let batch = 3;
    let k = values(batch * kv_heads * cap * hd, 1);
    let v = values(batch * kv_heads * cap * hd, 2);
    let cache = f32_cache(&k, &v, kv_heads, cap, hd);
    // a causal prefill of 300 tokens (several blocks and key chunks), a decoding row, a
    // sliding window of 40 slots, and a sequence of 1 slot
    let mut rows: Vec<QueryRow> = (0..300)
        .map(|p| QueryRow {
            seq: 0,
            keys: 0..p + 1,
        })
        .collect();
    rows.push(QueryRow {
        seq: 1,
        keys: 0..17,
    });
    rows.extend((0..70usize).map(|p| QueryRow {
        seq: 2,
        keys: (p + 1).saturating_sub(40)..p + 1,
    }));
    rows.push(QueryRow { seq: 1, keys: 0..1 });
    let q = values(rows.len() * heads * hd, 3);
    let scale = 0.25;
    // the same cache held in f16 and bf16: the reference reads the rounded values
    let (k16, v16): (Vec<f16>, Vec<f16>) = (
        k.iter().map(|&x| f16::from_f32(x)).collect(),
        v.iter().map(|&x| f16::from_f32(x)).collect(),
    );
    let (kb16, vb16): (Vec<bf16>, Vec<bf16>) = (
        k.iter().map(|&x| bf16::from_f32(x)).collect(),
        v.iter().map(|&x| bf16::from_f32(x)).collect(),
    );
    let widen16 = |h: &[f16]| h.iter().map(|x| x.to_f32()).collect::<Vec<_>>();
    let widenb16 = |h: &[bf16]| h.iter().map(|x| x.to_f32()).collect::<Vec<_>>();
    let held = |k, v| KvCache { k, v, ..cache };
    let (f16s, bf16s) = (
        held(WeightSlice::F16(&k16), WeightSlice::F16(&v16)),
        held(WeightSlice::Bf16(&kb16), WeightSlice::Bf16(&vb16)),
    );
    let caches = [
        (cache, k.clone(), v.clone(), "f32"),
        (f16s, widen16(&k16), widen16(&v16), "f16"),
        (bf16s, widenb16(&kb16), widenb16(&vb16), "bf16"),
    ];
    for (cache, ck, cv, name) in caches {
        let want = reference(&q, heads, &rows, (&cache, &ck, &cv), scale);
        for isa in Isa::available() {
            let got = attend_on(isa, &q, heads, &rows, cache, scale);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                    "{name} cache, {isa:?} value {i} (row {}): {g} against {w}",
                    i / (heads * hd)
                );
            }
        }
    }
}

#[test]
fn rows_are_grouped_into_blocks_of_one_sequence() {
    // a block never mixes sequences: a one-slot sequence between two long ones keeps
    // its own answer (its single value), whatever its neighbours see
    let (hd, kv_heads, heads, cap) = (4, 1, 1, 64);
    let k = values(2 * cap * hd, 5);
    let mut v = values(2 * cap * hd, 6);
    v[cap * hd..cap * hd + hd].copy_from_slice(&[1.0, 2.0, 3.0, 4.0]);
    let cache = f32_cache(&k, &v, kv_heads, cap, hd);
    let rows = vec![
        QueryRow {
            seq: 0,
            keys: 0..50,
        },
        QueryRow { seq: 1, keys: 0..1 },
        QueryRow {
            seq: 0,
            keys: 0..51,
        },
    ];
    let q = values(3 * hd, 7);
    let got = attend(&q, heads, &rows, cache, 1.0);
    assert_eq!(&got[hd..2 * hd], &[1.0, 2.0, 3.0, 4.0]);
}
