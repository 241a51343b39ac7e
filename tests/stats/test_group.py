"""The fused group pass (base + R runs at once) against an independent numpy computation."""

from itertools import combinations

import numpy as np
import pytest
from test_kernels import EDGES, hard_pair

from rlvr_ray.lab.planted import bf16_bits_to_f64
from rlvr_ray.stats import kernels
from rlvr_ray.stats.group import GroupAccumulator

pytestmark = pytest.mark.skipif(kernels.njit is None, reason="numba is not installed")


def key(b):
    return np.where(b >= 0x8000, -(b.astype(np.int64) & 0x7FFF), b.astype(np.int64))


def bin_edges(n, k):
    return [i * n // k for i in range(k + 1)]


@pytest.mark.parametrize(
    "R,members,step,piece",
    [
        (2, [0, 1], 5, None),
        (4, [1, 2, 3], 2, None),
        (5, [0, 2, 3, 4], 3, None),
        (6, [0, 1, 2, 3, 5], 4, None),
        (6, list(range(6)), 9, None),
        (8, list(range(8)), 64, None),
        (18, list(range(1, 18)), 7, None),
        (3, [], 4, None),
        (18, list(range(1, 18)), 23, 100),
        (33, list(range(1, 33)), 23, 50),
    ],
)
def test_group_pass_matches_numpy(R, members, step, piece):
    """Tallies (<= 4 members), pairs of patterns per increment (5-6), one per increment
    (7-16), bit planes and M M^T (> 16), no consensus; windows of ``step`` rows straddling
    the map's row bins. ``piece``: the float32 pieces of M M^T shrunk from 2^18 coordinates,
    so that a whole tensor handed in at once (23 rows) is cut into kernel calls of 2 rows
    (and of 1 row, narrower than a row) as a tensor above 2^18 elements is."""
    rows, cols = 23, 41
    b0, _ = hard_pair((rows, cols), R)
    runs = [
        hard_pair((rows, cols), R)[1] if k % 3 else hard_pair((rows, cols), 100 + k)[1]
        for k in range(R)
    ]
    runs = [
        np.where(np.random.default_rng(k).random((rows, cols)) < 0.5, r, b0).astype(np.uint16)
        for k, r in enumerate(runs)
    ]
    acc = GroupAccumulator(rows, cols, R, members, EDGES, map_size=4, piece_numel=piece)
    assert (acc.hist.shape == (2, 6)) == (2 <= len(members) <= 4)  # the tallies' path
    flat = np.empty((R + 1) * step * cols, dtype=np.int16)
    off = np.arange(R + 1, dtype=np.int64) * step * cols
    for a in range(0, rows, step):
        b = min(a + step, rows)
        for k, x in enumerate([b0, *runs]):
            flat[off[k] : off[k] + (b - a) * cols] = x[a:b].reshape(-1).view(np.int16)
        acc.add(flat, off, b - a)
    acc.finish()
    masks = []
    re, ce = bin_edges(rows, 4), bin_edges(cols, 4)
    for r, b1 in enumerate(runs):
        s = np.abs(key(b1) - key(b0))
        m = s != 0
        masks.append(m)
        d = bf16_bits_to_f64(b1) - bf16_bits_to_f64(b0)
        st = acc.mask_stats(r)
        assert st.n_changed == int(m.sum())
        assert st.ulp_hist == [
            int(((s >= lo) & (s < hi)).sum()) for lo, hi in zip(EDGES, [*EDGES[1:], 1 << 40])
        ]
        assert st.ulp_max == int(s.max())
        assert st.max_abs_update == float(np.abs(d).max())
        assert st.update_sumsq == pytest.approx(float((d * d).sum()), rel=1e-13)
        np.testing.assert_array_equal(st.row_counts, m.sum(1))
        np.testing.assert_array_equal(st.col_counts, m.sum(0))
        pooled = [
            [m[re[i] : re[i + 1], ce[j] : ce[j + 1]].mean() for j in range(4)] for i in range(4)
        ]
        np.testing.assert_allclose(st.pooled, pooled, rtol=1e-15)
    assert acc.base_sumsq == pytest.approx(float((bf16_bits_to_f64(b0) ** 2).sum()), rel=1e-13)
    assert acc.nonfinite(0) == 0 and not any(acc.nonfinite(k + 1) for k in range(R))
    cs = acc.consistency()
    if len(members) < 2:
        assert cs is None
        return
    mm = np.stack([masks[k] for k in members]).astype(np.int64)
    count = mm.sum(0)
    assert cs.consensus_counts == [int((count == c).sum()) for c in range(len(members) + 1)]
    for a, b in combinations(range(len(members)), 2):
        assert cs.intersections[(a, b)] == int((mm[a] & mm[b]).sum())
    assert cs.sizes == [int(x.sum()) for x in mm]
    np.testing.assert_allclose(cs.row_consensus, count.mean(1) / len(members), rtol=1e-15)


def test_group_pass_counts_nonfinite_per_copy():
    b0, b1 = hard_pair((6, 40), 1)
    b2 = b1.copy()
    b1[2, 3] = 0x7FC0  # NaN
    b1[4, 5] = 0xFF80  # -Inf
    b0[0, 0] = 0x7F80  # +Inf in the base
    acc = GroupAccumulator(6, 40, 2, [0, 1], EDGES)
    flat = np.concatenate([x.reshape(-1) for x in (b0, b1, b2)]).view(np.int16)
    acc.add(flat, np.array([0, 240, 480], dtype=np.int64), 6)
    assert [acc.nonfinite(k) for k in range(3)] == [1, 2, 0]


def test_ulp_edges_must_start_1_2_3_4():
    """The kernel counts steps >= 2, 3, 4 as differences of sums of min(steps, k): other
    leading edges are refused by name; a prefix (two bins) is counted right."""
    with pytest.raises(ValueError, match=r"must start 1, 2 .* go on 3, 4 .*not \(1, 2, 4, 8\)"):
        GroupAccumulator(3, 5, 2, [0, 1], (1, 2, 4, 8))
    with pytest.raises(ValueError, match=r"the first bin is the 1-ULP count.*not \(1,\)"):
        GroupAccumulator(3, 5, 2, [0, 1], (1,))
    rows, cols = 7, 9
    b0, b1 = hard_pair((rows, cols), 3)
    acc = GroupAccumulator(rows, cols, 1, [], (1, 2))
    flat = np.concatenate([b0.reshape(-1), b1.reshape(-1)]).view(np.int16)
    acc.add(flat, np.array([0, rows * cols], dtype=np.int64), rows)
    acc.finish()
    s = np.abs(key(b1) - key(b0))
    assert acc.mask_stats(0).ulp_hist == [int((s == 1).sum()), int((s >= 2).sum())]
