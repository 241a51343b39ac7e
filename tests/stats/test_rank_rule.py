"""The rank rule (k relative to the short side) and geometry_status, on planted spectra whose
principal set is known, against masks and counts computed independently in numpy float64."""

import math

import numpy as np
import pytest
import torch

from rlvr_ray.engine.config import Params
from rlvr_ray.stats.principal import RANK_FRAC, rank_for
from rlvr_ray.stats.spectral import MIN_SIGMA_GAP, base_geometry, run_geometry


def _np_top(score: np.ndarray, fraction: float) -> np.ndarray:
    """Reference tie rule: sort by (score desc, flat index asc), keep floor(f * n + 0.5)."""
    flat = score.reshape(-1)
    order = np.lexsort((np.arange(flat.size), -flat))
    out = np.zeros(flat.size, dtype=bool)
    out[order[: math.floor(fraction * flat.size + 0.5)]] = True
    return out.reshape(score.shape)


def _planted(m: int, n: int, sigma: np.ndarray, seed: int) -> torch.Tensor:
    """bf16 W0 = U diag(sigma) V^T [m, n] with random orthonormal U, V."""
    rng = np.random.default_rng(seed)
    p = min(m, n)
    u = np.linalg.qr(rng.standard_normal((m, p)))[0]
    v = np.linalg.qr(rng.standard_normal((n, p)))[0]
    return torch.from_numpy((u * sigma) @ v.T).to(torch.bfloat16)


def _gapped_spectrum(p: int, k: int) -> np.ndarray:
    """k large singular values, then a drop by half: the top-k subspace is sharply defined,
    and the tail holds about as much energy as the top (so W0_k is far from W0)."""
    return np.concatenate([np.linspace(1.0, 0.6, k), np.linspace(0.3, 0.05, p - k)])


@pytest.mark.parametrize(
    ("shape", "k"),
    [
        ((64, 64), 3),
        ((256, 1536), 11),
        ((1536, 1536), 64),
        ((1536, 8960), 64),
        ((4096, 4096), 171),
        ((5120, 4096), 171),
        ((4, 7), 1),
        ((1, 300), 1),
    ],
)
def test_rank_rule_on_real_widths(shape, k):
    assert rank_for(shape) == k == max(1, math.floor(0.0417 * min(shape) + 0.5))
    assert Params().ks(shape) == (k, k)


def test_absolute_k_overrides_the_rule_and_is_clipped():
    assert rank_for((1536, 1536), 64) == 64 and rank_for((64, 64), 64) == 64
    assert rank_for((32, 64), 64) == 32 and rank_for((4096, 4096), None, 0.25) == 1024
    assert Params(rank_k=8, spectral_frac=0.25).ks((256, 512)) == (8, 64)
    assert abs(RANK_FRAC * 1536 - 64) < 0.1


def test_overlaps_on_a_planted_spectrum_equal_numpy_counts():
    m, n = 120, 200  # p = 120: the rule gives k = floor(0.0417 * 120 + 0.5) = 5
    k = rank_for((m, n))
    assert k == 5
    w0 = _planted(m, n, _gapped_spectrum(m, k), seed=1)
    rng = np.random.default_rng(2)
    mask = rng.random((m, n)) < 0.3
    w1 = torch.where(torch.from_numpy(mask), w0.view(torch.int16) + 1, w0.view(torch.int16))
    w1 = w1.view(torch.bfloat16)

    w = w0.double().numpy()  # the reference: numpy float64 on the decoded bf16 values
    u, s, vh = np.linalg.svd(w, full_matrices=False)
    princ = _np_top(np.abs((u[:, :k] * s[:k]) @ vh[:k]), 0.5)
    low = _np_top(-np.abs(w), 0.5)
    n_changed = int(mask.sum())

    base = base_geometry(w0)
    g = run_geometry(base, w1, torch.from_numpy(mask))
    np.testing.assert_array_equal(base.princ_mask.numpy(), princ)
    np.testing.assert_array_equal(base.low_mask.numpy(), low)
    assert (g.rank_k, g.spectral_k, g.geometry_status) == (5, 5, "ok")
    assert g.overlap_princ == int((princ & mask).sum()) / n_changed
    assert g.overlap_low == int((low & mask).sum()) / n_changed
    assert g.overlap_princ_not_low == int((princ & ~low & mask).sum()) / n_changed
    assert g.princ_density == int(princ.sum()) / princ.size == 0.5
    assert g.sigma_gap == pytest.approx((s[k - 1] - s[k]) / s[k - 1], rel=1e-9)
    assert g.sigma_gap > 0.45  # planted: 0.6 -> 0.3
    # M_princ is not the complement of M_low at k well below p: they share entries
    assert g.princ_not_low_density == int((princ & ~low).sum()) / princ.size < 0.45


def test_k_at_the_full_rank_is_flagged():
    w0 = _planted(64, 64, _gapped_spectrum(64, 3), seed=3)
    mask = torch.ones(64, 64, dtype=torch.bool)
    # k = 64 on a 64-wide matrix: W0_k = W0 and the top-k subspace is the whole space
    g = run_geometry(base_geometry(w0, rank_k=64, spectral_k=64), w0, mask)
    assert (g.rank_k, g.geometry_status, g.sigma_gap) == (64, "k_not_below_rank", 1.0)
    assert g.overlap_princ + g.overlap_low == pytest.approx(1.0, abs=1e-3)

    # the boundary: k = p / 4 is allowed, one more is not
    def status(rank_k: int, spectral_k: int) -> str:
        return run_geometry(base_geometry(w0, rank_k, 0.5, spectral_k), w0, mask).geometry_status

    assert status(16, 3) != "k_not_below_rank" and status(3, 16) != "k_not_below_rank"
    assert status(17, 3) == status(3, 17) == "k_not_below_rank"
    assert status(3, 3) == "ok"


def test_flat_spectrum_has_no_top_k_subspace():
    # an orthogonal matrix times 0.02: every singular value equal, no gap anywhere
    rng = np.random.default_rng(4)
    q = np.linalg.qr(rng.standard_normal((96, 96)))[0] * 0.02
    w0 = torch.from_numpy(q).to(torch.float32)
    g = run_geometry(base_geometry(w0), w0, torch.ones(96, 96, dtype=torch.bool))
    s = np.linalg.svd(q.astype(np.float32).astype(np.float64), compute_uv=False)
    assert g.rank_k == 4 and g.geometry_status == "small_gap"
    assert g.sigma_gap == pytest.approx((s[3] - s[4]) / s[3], abs=1e-12)
    assert g.sigma_gap < MIN_SIGMA_GAP
    # the same matrix with a planted gap after k = 4 is fine
    w_gap = _planted(96, 96, _gapped_spectrum(96, 4), seed=5)
    g_gap = run_geometry(base_geometry(w_gap), w_gap, torch.ones(96, 96, dtype=torch.bool))
    assert g_gap.geometry_status == "ok"
