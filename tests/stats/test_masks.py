"""Mask statistics against an independent numpy computation on uint16 bf16 patterns."""

import numpy as np
import pytest
import torch

from rlvr_ray.lab.planted import bf16_bits_to_f64, f32_to_bf16_bits, move_ulps
from rlvr_ray.stats.masks import (
    bf16_bits,
    gini_counts,
    mask_stats,
    nonfinite_count,
    ulp_steps,
    update_mask,
)


def t16(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.view(np.int16).copy())


def np_mask(b0, b1):
    return (b0 != b1) & (((b0 | b1) & 0x7FFF) != 0)


def test_signed_zero_is_unchanged_and_sign_flip_is_a_change():
    b0 = np.array([0x0000, 0x8000, 0x3F80, 0x3F80, 0x0000, 0x0001], dtype=np.uint16)
    b1 = np.array([0x8000, 0x0000, 0x3F80, 0xBF80, 0x0001, 0x8001], dtype=np.uint16)
    assert update_mask(t16(b0), t16(b1)).tolist() == [False, False, False, True, True, True]
    # 1.0 -> -1.0 crosses 2 * 0x3F80 values; +min subnormal -> -min subnormal is 2 steps
    assert ulp_steps(t16(b0), t16(b1)).tolist() == [0, 0, 0, 2 * 0x3F80, 1, 2]


def test_fp32_is_rounded_to_nearest_even_like_numpy():
    x = np.random.default_rng(0).standard_normal(10_000).astype(np.float32)
    bits, rounded = bf16_bits(torch.from_numpy(x))
    assert rounded
    assert np.array_equal(bits.numpy().view(np.uint16), f32_to_bf16_bits(x))


def test_nonfinite_counts_nan_and_inf():
    w = torch.tensor([1.0, float("nan"), float("inf"), -float("inf"), 0.0]).to(torch.bfloat16)
    assert nonfinite_count(bf16_bits(w)[0]) == 3


@pytest.mark.parametrize("shape", [(37, 53), (1, 200), (300, 7)])
def test_mask_stats_match_numpy(shape):
    rng = np.random.default_rng(3)
    b0 = f32_to_bf16_bits(rng.standard_normal(shape).astype(np.float32) * 0.02)
    b0.flat[:5] = 0  # some zeros, flipped to -0 below (must stay unchanged)
    mask = rng.random(shape) < 0.3
    steps = rng.integers(1, 5, size=shape) * rng.choice([-1, 1], size=shape)
    b1 = move_ulps(b0, mask, steps)
    b1.flat[:5] = 0x8000
    w0 = t16(b0).view(torch.bfloat16)
    w1 = t16(b1).view(torch.bfloat16)
    st = mask_stats(w0, w1, ulp_edges=(1, 2, 3, 5), map_size=8)

    m = np_mask(b0, b1)
    assert st.n_changed == int(m.sum())
    np.testing.assert_array_equal(st.row_ratio.numpy(), m.mean(axis=1))
    np.testing.assert_array_equal(st.col_ratio.numpy(), m.mean(axis=0))
    k = lambda b: np.where(b >= 0x8000, -(b.astype(np.int64) & 0x7FFF), b.astype(np.int64))  # noqa: E731
    s = np.abs(k(b1) - k(b0))[m]
    assert st.ulp1 == int((s == 1).sum())
    assert st.ulp_hist == [
        int((s == 1).sum()),
        int((s == 2).sum()),
        int(((s >= 3) & (s < 5)).sum()),
        int((s >= 5).sum()),
    ]
    assert st.ulp_max == int(s.max())
    d = bf16_bits_to_f64(b1) - bf16_bits_to_f64(b0)
    assert st.update_sumsq == pytest.approx(float((d**2).sum()), rel=1e-12)
    assert st.max_abs_update == float(np.abs(d).max())
    # pooled map: mean of the mask over each block of the 8 x 8 (or smaller) grid
    rows, cols = m.shape
    re_ = [i * rows // min(8, rows) for i in range(min(8, rows) + 1)]
    ce = [j * cols // min(8, cols) for j in range(min(8, cols) + 1)]
    ref = np.array([[m[a:b, c:d].mean() for c, d in zip(ce, ce[1:])] for a, b in zip(re_, re_[1:])])
    np.testing.assert_allclose(st.pooled.numpy(), ref, rtol=1e-12)


def test_gini_known_values():
    assert gini_counts(np.array([1, 1, 1, 1])) == 0.0
    assert gini_counts(np.array([0, 0, 0, 1])) == 0.75
    x = np.random.default_rng(1).integers(0, 1000, 101)
    # mean absolute difference definition: sum_ij |xi - xj| / (2 n^2 mean)
    ref = np.abs(x[:, None] - x[None, :]).sum() / (2 * len(x) ** 2 * x.mean())
    assert gini_counts(x) == pytest.approx(ref, rel=1e-12)
    assert gini_counts(np.zeros(5, dtype=np.int64)) is None


def test_gini_of_counts_is_exact():
    """Counts sorted by counting, ranks x values summed in integers: the correctly rounded
    Gini, checked with exact fractions."""
    from fractions import Fraction

    rng = np.random.default_rng(3)
    for c in (
        rng.integers(0, 900, 4864),
        rng.integers(0, 3, 17),
        np.array([0, 0, 0, 5]),
        np.array([7, 7, 7]),
        np.array([0, 1]),
    ):
        xs = sorted(int(v) for v in c)
        n, total = len(xs), sum(xs)
        exact = Fraction(2 * sum((i + 1) * v for i, v in enumerate(xs)), n * total) - Fraction(
            n + 1, n
        )
        assert gini_counts(c) == float(exact)
    assert gini_counts(np.zeros(4, dtype=np.int64)) is None
    assert gini_counts(np.array([0, 0, 0, 1])) == 0.75


def test_gini_of_counts_past_int64_stays_exact():
    """a zeros and b entries of K have Gini a / (a + b) exactly; with n x total >= 2^62 the
    rank sum leaves int64 (Python ints take it), below it stays there."""
    a, b = 3 << 20, 1 << 20  # n = 2^22
    for k in (1 << 19, 1 << 21):  # n x total = 2^61 (int64), 2^63 (Python ints)
        c = np.concatenate([np.zeros(a, np.int64), np.full(b, k, np.int64)])
        assert gini_counts(c) == 0.75
        assert gini_counts(c[::-1]) == 0.75


@pytest.mark.parametrize(
    ("dtype", "nonfinite"), [(torch.float8_e4m3fn, 0x7F), (torch.float8_e5m2, 0x7C)]
)
def test_fp8_patterns_every_pair(dtype, nonfinite):
    """Every pair of FP8 patterns: changed iff the patterns differ and are not +0/-0; ULP steps
    = distance of sign-magnitude keys; NaN/Inf (magnitude >= ``nonfinite``) counted as such."""
    from rlvr_ray.stats.masks import fp8_bits

    p = np.arange(256, dtype=np.uint8)
    p0, p1 = np.repeat(p, 256), np.tile(p, 256)
    bits = lambda a: fp8_bits(torch.from_numpy(a).view(dtype))  # noqa: E731
    b0, b1 = bits(p0), bits(p1)
    finite = ((p0 & 0x7F) < nonfinite) & ((p1 & 0x7F) < nonfinite)
    key = lambda a: np.where(a & 0x80, -(a & 0x7F).astype(int), (a & 0x7F).astype(int))  # noqa: E731
    changed = (p0 != p1) & (((p0 | p1) & 0x7F) != 0)
    got = update_mask(b0, b1).numpy()
    assert (got[finite] == changed[finite]).all()
    steps = ulp_steps(b0, b1).numpy()
    assert (steps[finite] == np.abs(key(p1) - key(p0))[finite]).all()
    assert nonfinite_count(bits(p)) == 2 * (0x80 - nonfinite)


@pytest.mark.slow
def test_counts_exact_in_a_row_above_2_24_elements():
    """A vector of 2^25 + 1 elements is one chunk of one row (the torch path cuts chunks by
    rows): its changed count, ULP histogram and row count are exact integers, as numpy counts
    them, though the counts of 1 ULP and >= 1 ULP exceed what a float32 sum holds exactly."""
    n = (1 << 25) + 1
    rng = np.random.default_rng(7)
    b0 = rng.integers(0x3C00, 0x3F00, n, dtype=np.uint16)
    steps = np.ones(n, dtype=np.uint16)  # odd counts above 2^24: not float32 numbers
    steps[rng.choice(n, 1002, replace=False)] = [0, 0, *[2] * 1000]
    b1 = b0 + steps
    w0, w1 = t16(b0).view(torch.bfloat16), t16(b1).view(torch.bfloat16)
    st = mask_stats(w0, w1, ulp_edges=(1, 2, 3))
    assert st.n_changed == n - 2 == int((steps > 0).sum())
    assert st.ulp_hist == [n - 1002, 1000, 0]
    assert st.row_counts.tolist() == [n - 2]
