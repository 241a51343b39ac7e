"""The precision gate against a numpy float64 reference on planted masters that straddle the
half-ULP threshold (exact ties included: round-to-nearest-even)."""

from __future__ import annotations

import numpy as np
import torch

from rlvr_ray.io.schema import GATE_BIN_EDGES
from rlvr_ray.stats.gate import gate_stats, half_ulp_ratio, merge


def bf16_value(bits: np.ndarray) -> np.ndarray:
    """int16 bf16 patterns -> float64 values (the pattern is the top half of a float32)."""
    return ((bits.astype(np.uint16).astype(np.uint32)) << 16).view(np.float32).astype(np.float64)


def rne_bits(master: np.ndarray) -> np.ndarray:
    """float32 -> bf16 patterns by round-to-nearest-even on the bits (finite inputs)."""
    u = master.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16).view(np.int16)


def spacing(w0: np.ndarray, toward_zero: np.ndarray) -> np.ndarray:
    """The bf16 gap at w0 on the master's side, from the exponent (np.frexp): 2^(e - 8) for
    |w0| in [2^(e-1), 2^e); half that below an exact power of two; 2^-133 among subnormals."""
    _, e = np.frexp(np.abs(w0))
    gap = np.ldexp(1.0, np.maximum(e - 1, -126) - 7)
    power = (np.abs(w0) == np.ldexp(1.0, e - 1)) & (e - 1 > -126)
    gap = np.where(toward_zero & power, gap / 2, gap)
    return np.where(w0 == 0, 2.0**-133, gap)


def planted():
    """Base patterns, masters at chosen multiples f of half a ULP on either side, and the
    rounded checkpoint; plus w0 = 0, powers of two, negatives and subnormals."""
    rng = np.random.default_rng(7)
    w0 = rng.normal(0, 0.02, 600).astype(np.float32)
    w0 = np.concatenate([w0, [0.0, -0.0, 0.5, -0.25, 1.0, 2.0**-130, -(2.0**-128), 3.0e38]])
    bits0 = rne_bits(w0.astype(np.float32))
    v0 = bf16_value(bits0)
    fs = np.array([0.0, 0.5, 1 - 2**-10, 1.0, 1 + 2**-10, 1.5, 2.0, 3.0, 7.0, 40.0])
    f = np.resize(fs, v0.size * 2)
    sign = np.repeat([1.0, -1.0], v0.size)
    v0 = np.tile(v0, 2)
    bits0 = np.tile(bits0, 2)
    toward = (v0 != 0) & (np.sign(v0) != sign)
    master = (v0 + sign * f * spacing(v0, toward) / 2).astype(np.float32)
    assert np.all(master.astype(np.float64) == v0 + sign * f * spacing(v0, toward) / 2)
    keep = np.isfinite(master)
    return bits0[keep], master[keep], f[keep]


def test_ratio_is_the_planted_multiple_of_half_an_ulp():
    bits0, master, f = planted()
    ratio = half_ulp_ratio(torch.from_numpy(bits0), torch.from_numpy(master)).numpy()
    np.testing.assert_array_equal(ratio, f)


def test_counts_match_numpy_reference():
    bits0, master, f = planted()
    bits1 = rne_bits(master)
    bits1[::37] = bits0[::37]  # a checkpoint that kept some base values whatever the master
    v0, v1 = bf16_value(bits0), bf16_value(bits1)
    moved = master.astype(np.float64) != v0
    d = np.abs(master.astype(np.float64) - v0)
    toward = (v0 != 0) & (np.sign(master - v0) != np.sign(v0))
    ratio = d / (spacing(v0, toward) / 2)
    edges = np.array(GATE_BIN_EDGES[1:])
    hist = np.bincount(np.searchsorted(edges, ratio[moved], side="right"), minlength=len(edges) + 1)

    got = gate_stats(*(torch.from_numpy(x) for x in (bits0, bits1, master)), GATE_BIN_EDGES)
    assert got.numel == bits0.size
    assert got.n_moved == int(moved.sum()) == int((f > 0).sum())
    assert got.n_erased == int((moved & (v1 == v0)).sum())
    assert got.n_below == int((moved & (ratio < 1)).sum()) == int(((f > 0) & (f < 1)).sum())
    assert got.n_ties == int((ratio == 1).sum()) == int((f == 1).sum())
    assert got.hist == hist.tolist()
    assert got.n_round_mismatch == int((rne_bits(master) != bits1).sum())
    assert got.erased_share == got.n_erased / got.n_moved


def test_rounded_checkpoint_erases_exactly_the_moves_below_half_an_ulp_and_even_ties():
    bits0, master, f = planted()
    bits1 = rne_bits(master)  # the checkpoint a pipeline saves: bf16(master)
    got = gate_stats(*(torch.from_numpy(x) for x in (bits0, bits1, master)), GATE_BIN_EDGES)
    even = (bits0.astype(np.int64) & 1) == 0
    # hand count: moves below half a ULP, and ties whose base pattern is even (nearest-even)
    assert got.n_erased == int(((f > 0) & (f < 1)).sum() + ((f == 1) & even).sum())
    assert 0 < int(((f == 1) & even).sum()) < int((f == 1).sum())  # both tie outcomes planted
    assert got.n_round_mismatch == 0


def test_windows_merge_to_the_whole_and_nonfinite_masters_are_set_aside():
    bits0, master, _ = planted()
    bits1 = rne_bits(master)
    master = master.copy()
    master[[3, 10]] = [np.nan, np.inf]
    t = [torch.from_numpy(x) for x in (bits0, bits1, master)]
    whole = gate_stats(*t, GATE_BIN_EDGES)
    parts = [
        gate_stats(*(x[a : a + 100] for x in t), GATE_BIN_EDGES) for a in range(0, bits0.size, 100)
    ]
    acc = parts[0]
    for p in parts[1:]:
        acc = merge(acc, p)
    assert acc == whole
    assert whole.n_nonfinite == 2 and whole.numel == bits0.size
    assert sum(whole.hist) == whole.n_moved
