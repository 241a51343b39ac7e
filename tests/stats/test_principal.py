"""Principal / low-magnitude masks and overlaps against independent numpy references."""

import math

import numpy as np
import pytest
import torch

from rlvr_ray.stats.principal import (
    density,
    low_magnitude_mask,
    mask_overlaps,
    overlap,
    principal_mask,
    top_fraction_mask,
)
from rlvr_ray.stats.spectral import base_geometry


def _np_top(score: np.ndarray, fraction: float) -> np.ndarray:
    """Reference tie rule: sort by (score desc, flat index asc), keep floor(f * n + 0.5)."""
    flat = score.reshape(-1)
    order = np.lexsort((np.arange(flat.size), -flat))
    out = np.zeros(flat.size, dtype=bool)
    out[order[: math.floor(fraction * flat.size + 0.5)]] = True
    return out.reshape(score.shape)


def _bf16_matrix(m: int, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(m, n, generator=gen) * 0.02).to(torch.bfloat16)


def test_top_fraction_ties_go_to_lowest_flat_index():
    score = torch.tensor([[1.0, 3.0, 3.0], [3.0, 0.0, 3.0]])
    # 3 of 6 entries; four tie at 3.0: flat indices 1, 2, 3 win, 5 loses
    expected = torch.tensor([[False, True, True], [True, False, False]])
    assert torch.equal(top_fraction_mask(score, 0.5), expected)


def test_top_fraction_counts():
    score = torch.zeros(5)
    assert int(top_fraction_mask(score, 0.5).sum()) == 3  # floor(2.5 + 0.5)
    assert int(top_fraction_mask(score, 0.0).sum()) == 0
    assert int(top_fraction_mask(score, 1.0).sum()) == 5
    assert top_fraction_mask(score, 0.5).tolist() == [True, True, True, False, False]
    with pytest.raises(ValueError):
        top_fraction_mask(score, 1.5)


@pytest.mark.parametrize("alpha", [0.5, 0.3, 0.77])
def test_low_mask_matches_reference_with_bf16_ties(alpha):
    w0 = _bf16_matrix(48, 40, seed=1)
    mag = w0.double().abs().numpy()
    assert np.unique(mag).size < mag.size / 2  # bf16 magnitudes tie a lot
    got = low_magnitude_mask(w0, alpha).numpy()
    np.testing.assert_array_equal(got, _np_top(-mag, alpha))
    assert got.sum() == math.floor(alpha * mag.size + 0.5)


def test_principal_mask_matches_numpy_svd():
    w0 = _bf16_matrix(40, 30, seed=2)
    w = w0.double().numpy()
    u, s, vh = np.linalg.svd(w, full_matrices=False)
    w0k = (u[:, :5] * s[:5]) @ vh[:5]
    got = principal_mask(w0, rank_k=5, alpha=0.5).numpy()
    np.testing.assert_array_equal(got, _np_top(np.abs(w0k), 0.5))
    # k is clipped to min(m, n): the full-rank reconstruction is W0 itself
    full = principal_mask(w0, rank_k=1000, alpha=0.25).numpy()
    np.testing.assert_array_equal(full, _np_top(np.abs(w), 0.25))


@pytest.mark.parametrize("shape", [(40, 30), (12, 50)])
def test_base_geometry_masks(shape):
    w0 = _bf16_matrix(*shape, seed=3)
    base = base_geometry(w0, rank_k=4, alpha=0.4, spectral_k=3)
    w = w0.double().numpy()
    u, s, vh = np.linalg.svd(w, full_matrices=False)
    w0k = (u[:, :4] * s[:4]) @ vh[:4]
    np.testing.assert_array_equal(base.princ_mask.numpy(), _np_top(np.abs(w0k), 0.4))
    np.testing.assert_array_equal(base.low_mask.numpy(), _np_top(-np.abs(w), 0.4))


def test_overlaps_hand_example():
    princ = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    low = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    out = mask_overlaps(princ, low, mask)
    assert out == {
        "overlap_princ": 2 / 3,
        "overlap_low": 2 / 3,
        "overlap_princ_not_low": 1 / 3,
        "princ_density": 3 / 8,
        "low_density": 4 / 8,
        "princ_not_low_density": 2 / 8,
    }
    assert math.isnan(overlap(princ, torch.zeros_like(mask)))
    assert math.isnan(density(torch.zeros(0, dtype=torch.bool)))
