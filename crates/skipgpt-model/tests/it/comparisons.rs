//! The tests' own comparison: `max_abs_diff` (skipgpt-test-support), on which every parity
//! test's `diff < tol` rests, fails on a non-finite value instead of passing it.

use skipgpt_test_support::max_abs_diff;

#[test]
fn max_abs_diff_is_the_largest_difference_of_finite_values() {
    assert_eq!(max_abs_diff(&[1.0, -2.0, 3.0], &[1.5, -2.0, 0.0]), 3.0);
    assert_eq!(max_abs_diff(&[], &[]), 0.0);
}

#[test]
fn max_abs_diff_fails_every_comparison_on_a_non_finite_value() {
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        for (a, b) in [([0.0, bad, 0.0], [0.0; 3]), ([0.0; 3], [bad, 0.0, 0.0])] {
            let d = max_abs_diff(&a, &b);
            assert!(d.is_nan(), "{bad} gave {d}");
            // what a test asserts, `diff < tol` or `diff > tol`, is false either way
            assert_eq!(d.partial_cmp(&1e30), None, "{bad}: {d} compares");
        }
    }
    // equal infinities are still refused: a model's output never holds one
    assert!(max_abs_diff(&[f32::INFINITY], &[f32::INFINITY]).is_nan());
    // a NaN early is not forgotten by a larger finite difference later
    assert!(max_abs_diff(&[f32::NAN, 100.0], &[0.0, 0.0]).is_nan());
}
