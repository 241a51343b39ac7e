"""The fused CPU pass and the torch path against each other and an independent numpy computation,
on the hard cases: sign flips, +0/-0, subnormals, huge steps."""

import numpy as np
import pytest
import torch

from rlvr_ray.lab.planted import bf16_bits_to_f64, f32_to_bf16_bits, move_ulps
from rlvr_ray.stats import kernels
from rlvr_ray.stats.consistency import ConsistencyAccumulator
from rlvr_ray.stats.group import GroupAccumulator
from rlvr_ray.stats.masks import MaskAccumulator, base_stats

pytestmark = pytest.mark.skipif(kernels.njit is None, reason="numba is not installed")
EDGES = (1, 2, 3, 4, 5, 9, 17, 65)


def hard_pair(shape, seed):
    """Base and run patterns with every hard case: sign flips, +0/-0, subnormals, huge steps."""
    rng = np.random.default_rng(seed)
    b0 = f32_to_bf16_bits(rng.standard_normal(shape).astype(np.float32) * 0.02)
    b0.flat[::97] = 0x0000
    b0.flat[1::97] = 0x8000
    b0.flat[2::97] = 0x0001  # smallest subnormal
    mask = rng.random(shape) < 0.35
    steps = rng.choice([1, 1, 1, 2, 3, 4, 7, 12, 40, 300], size=shape) * rng.choice(
        [-1, 1], size=shape
    )
    b1 = move_ulps(b0, mask, steps)
    b1.flat[::97] = 0x8000  # +0 -> -0: unchanged
    b1.flat[3::89] ^= 0x8000  # sign flips of nonzero values
    return b0, b1


def torch_path(b0, b1, chunk_rows, map_size=8):
    rows, cols = b0.shape
    acc = MaskAccumulator(rows, cols, EDGES, map_size=map_size)
    t0, t1 = torch.from_numpy(b0.view(np.int16)), torch.from_numpy(b1.view(np.int16))
    planes_all = []
    edges = sorted({*range(0, rows, chunk_rows), rows})  # chunks straddle the map's row bins
    for a, b in zip(edges[:-1], edges[1:]):
        planes = [torch.zeros(b - a, cols, dtype=torch.int16)]
        acc.add(t0[a:b], t1[a:b], planes, 5)
        planes_all.append(planes[0])
    assert acc.nonfinite() == 0
    return acc.finish(), torch.cat(planes_all).numpy().view(np.uint16)


def fused_path(b0, b1, chunk_rows, map_size=8):
    rows, cols = b0.shape
    acc = GroupAccumulator(rows, cols, 1, [], EDGES, map_size=map_size)
    flat = np.empty(2 * chunk_rows * cols, dtype=np.int16)
    off = np.array([0, chunk_rows * cols], dtype=np.int64)
    for a in range(0, rows, chunk_rows):
        b = min(a + chunk_rows, rows)
        flat[: (b - a) * cols] = b0[a:b].reshape(-1).view(np.int16)
        flat[off[1] : off[1] + (b - a) * cols] = b1[a:b].reshape(-1).view(np.int16)
        acc.add(flat, off, b - a)
    acc.finish()
    assert acc.nonfinite(0) == acc.nonfinite(1) == 0
    return acc.mask_stats(0), acc.base_sumsq


@pytest.mark.parametrize("shape,chunk_rows", [((64, 300), 7), ((5, 1030), 2), ((200, 17), 64)])
def test_fused_pass_equals_torch_path_and_numpy(shape, chunk_rows):
    b0, b1 = hard_pair(shape, sum(shape))
    k, base_ss = fused_path(b0, b1, chunk_rows)
    t, tplane = torch_path(b0, b1, chunk_rows)
    # numpy reference: ordered keys, steps, float64 updates
    key = lambda b: np.where(b >= 0x8000, -(b.astype(np.int64) & 0x7FFF), b.astype(np.int64))  # noqa: E731
    s = np.abs(key(b1) - key(b0))
    m = s != 0
    ref_hist = [int(((s >= lo) & (s < hi)).sum()) for lo, hi in zip(EDGES, [*EDGES[1:], 1 << 40])]
    d = bf16_bits_to_f64(b1) - bf16_bits_to_f64(b0)
    for st in (k, t):
        assert st.n_changed == int(m.sum())
        assert st.ulp_hist == ref_hist
        assert st.ulp_max == int(s.max())
        assert st.max_abs_update == float(np.abs(d).max())
        assert st.update_sumsq == pytest.approx(float((d * d).sum()), rel=1e-13)
        np.testing.assert_array_equal(np.asarray(st.row_ratio), m.mean(axis=1))
        np.testing.assert_array_equal(np.asarray(st.col_ratio), m.mean(axis=0))
        np.testing.assert_array_equal(st.row_counts, m.sum(axis=1))
    assert np.array_equal(k.pooled, t.pooled.numpy())  # numpy: the fused pass's
    assert ref_hist[-1] > 0 and ref_hist[0] > 0  # the rare large-step loop was exercised
    assert s.max() >= 1024  # and the rows whose updates need float64 differences
    np.testing.assert_array_equal(tplane, m.astype(np.uint16) << 5)
    assert base_ss == pytest.approx(float((bf16_bits_to_f64(b0) ** 2).sum()), rel=1e-13)


def test_nonfinite_run_is_reported():
    b0, b1 = hard_pair((6, 40), 1)
    b1[2, 3] = 0x7FC0  # NaN
    b1[4, 5] = 0xFF80  # -Inf
    acc = MaskAccumulator(6, 40, EDGES)
    acc.add(torch.from_numpy(b0.view(np.int16)), torch.from_numpy(b1.view(np.int16)))
    assert acc.nonfinite() == 2
    g = GroupAccumulator(6, 40, 1, [], EDGES)
    g.add(np.concatenate([b0.reshape(-1), b1.reshape(-1)]).view(np.int16), np.array([0, 240]), 6)
    assert (g.nonfinite(0), g.nonfinite(1)) == (0, 2)


def test_base_stats():
    b0, _ = hard_pair((33, 70), 2)
    b0[1, 1] = 0x7F80  # +Inf
    t = torch.from_numpy(b0.view(np.int16))
    assert int(base_stats(t)[1]) == 1
    b0[1, 1] = 0
    ss, nf = base_stats(t)
    assert int(nf) == 0
    assert float(ss) == pytest.approx(float((bf16_bits_to_f64(b0) ** 2).sum()), rel=1e-13)


@pytest.mark.parametrize("R", [3, 12, 13])
def test_plane_histogram(R):
    rng = np.random.default_rng(R)
    masks = rng.random((R, 37, 29)) < 0.4
    plane = sum(masks[k].astype(np.int64) << k for k in range(R)).astype(np.uint16)
    acc = ConsistencyAccumulator(R, 37, 29)
    for a in range(0, 37, 10):  # ragged chunks
        acc.add([torch.from_numpy(plane[a : a + 10].view(np.int16).copy())])
    counts, got_inter = acc._counts()
    count = masks.sum(0)
    assert counts == [int((count == c).sum()) for c in range(R + 1)]
    inter = np.einsum("aij,bij->ab", masks.astype(np.int64), masks.astype(np.int64))
    np.testing.assert_array_equal(got_inter, inter)


def test_runs_past_16_set_bits_of_a_second_plane():
    """Run 21 of a group is bit 5 of plane 1."""
    b0, b1 = hard_pair((9, 50), 4)
    t0, t1 = torch.from_numpy(b0.view(np.int16)), torch.from_numpy(b1.view(np.int16))
    changed = b0 != b1
    changed &= ((b0 | b1) & 0x7FFF) != 0
    planes = [torch.zeros(9, 50, dtype=torch.int16) for _ in range(2)]
    MaskAccumulator(9, 50, EDGES).add(t0, t1, planes, 21)
    assert not planes[0].any()
    np.testing.assert_array_equal(planes[1].numpy().view(np.uint16), changed.astype(np.uint16) << 5)
