"""Update rank, stable and effective rank, energy shares and spectrum metrics against numpy."""

import math

import numpy as np
import pytest
import torch

from rlvr_ray.stats.spectral import base_geometry, run_geometry, stable_rank
from rlvr_ray.stats.update import (
    effective_rank,
    numerical_rank,
    rank_error_bounds,
    update_geometry,
    update_singular_values,
)


def np_effective_rank(s):
    p = s[s > 0] / s.sum()
    return np.exp(-(p * np.log(p)).sum())


def test_numerical_rank_uses_numpy_tolerance():
    """Singular values straddling numpy's default tolerance s_1 * max(m, n) * eps."""
    rng = np.random.default_rng(0)
    u = np.linalg.qr(rng.standard_normal((64, 48)))[0]
    v = np.linalg.qr(rng.standard_normal((48, 48)))[0]
    tol = 64 * np.finfo(np.float64).eps  # 1.4e-14 with s_1 = 1
    s = np.array([1.0, 1e-6, 1e-10, 30 * tol, 0.05 * tol] + [0.0] * 43)
    a = (u * s) @ v.T
    got = numerical_rank(torch.linalg.svdvals(torch.from_numpy(a)), a.shape)
    assert got == np.linalg.matrix_rank(a) == 4
    assert numerical_rank(torch.zeros(5, dtype=torch.float64), (5, 7)) == 0


def test_stable_and_effective_rank_hand_examples():
    assert stable_rank(torch.tensor([4.0, 3.0])) == pytest.approx(25 / 16, rel=1e-15)
    assert effective_rank(torch.tensor([2.0, 2.0, 0.0])) == pytest.approx(2.0, rel=1e-15)
    assert effective_rank(torch.tensor([5.0, 0.0])) == 1.0
    assert math.isnan(stable_rank(torch.zeros(3))) and math.isnan(effective_rank(torch.zeros(3)))


def integer_bf16(shape, rng):
    """bf16 W0 = k / 16, |k| <= 100: exact in bf16, so W0 + (small integers) / 16 is too."""
    return rng.integers(-100, 101, shape).astype(np.float64) / 16


@pytest.mark.parametrize("shape", [(48, 32), (24, 56)])
@pytest.mark.parametrize("rank", [1, 7, None])
def test_update_geometry_matches_numpy(shape, rank):
    rng = np.random.default_rng(3)
    w0 = integer_bf16(shape, rng)
    if rank is None:  # dense random integers: full rank
        dw = rng.integers(-3, 4, shape) / 16
    else:
        dw = (rng.integers(-2, 3, (shape[0], rank)) @ rng.integers(-2, 3, (rank, shape[1]))) / 16
    w1 = w0 + dw
    t0, t1 = (torch.from_numpy(w).to(torch.bfloat16) for w in (w0, w1))
    assert np.array_equal(t1.double().numpy() - t0.double().numpy(), dw)  # the planted dW exactly
    k = 4
    base = base_geometry(t0, rank_k=3, spectral_k=k)
    got = update_geometry(base, t0, t1)
    u0, s0, vt0 = np.linalg.svd(w0)
    s = np.linalg.svd(dw, compute_uv=False)
    assert got.update_rank == np.linalg.matrix_rank(dw) == (rank or min(shape))
    assert got.update_stable_rank == pytest.approx((s**2).sum() / s[0] ** 2, rel=1e-10)
    assert got.update_effective_rank == pytest.approx(np_effective_rank(s), rel=1e-10)
    energy = (dw**2).sum()
    left = (np.linalg.norm(u0[:, :k].T @ dw) ** 2) / energy
    right = (np.linalg.norm(dw @ vt0[:k].T) ** 2) / energy
    assert got.update_energy_left == pytest.approx(left, rel=1e-10)
    assert got.update_energy_right == pytest.approx(right, rel=1e-10)
    # spectrum metrics of W0 and W1 come with run_geometry
    g = run_geometry(base, t1, t1.view(torch.int16) != t0.view(torch.int16))
    s1 = np.linalg.svd(w1, compute_uv=False)
    assert g.sigma_max_base == pytest.approx(s0[0], rel=1e-10)
    assert g.sigma_max_run == pytest.approx(s1[0], rel=1e-10)
    assert g.stable_rank_base == pytest.approx((s0**2).sum() / s0[0] ** 2, rel=1e-10)
    assert g.stable_rank_run == pytest.approx((s1**2).sum() / s1[0] ** 2, rel=1e-10)
    np.testing.assert_allclose(g.sigma_run_all.numpy(), s1, rtol=1e-9)


def test_unchanged_run_has_rank_zero_and_nan_ratios():
    t0 = torch.from_numpy(integer_bf16((20, 12), np.random.default_rng(0))).to(torch.bfloat16)
    got = update_geometry(base_geometry(t0, rank_k=2, spectral_k=2), t0, t0.clone())
    assert got.update_rank == 0
    assert all(
        math.isnan(x)
        for x in (
            got.update_stable_rank,
            got.update_effective_rank,
            got.update_energy_left,
            got.update_energy_right,
        )
    )


def planted(shape, sigma, rng):
    """float64 [m, n] with singular values ``sigma`` (descending, length min(m, n))."""
    m, n = shape
    u = np.linalg.qr(rng.standard_normal((m, len(sigma))))[0]
    v = np.linalg.qr(rng.standard_normal((n, len(sigma))))[0]
    return (u * sigma) @ v.T


@pytest.mark.parametrize("shape", [(96, 64), (40, 72)])
def test_gram_route_certifies_full_rank_within_its_bounds(shape):
    """A dense bf16 update takes the Gram route; every bound holds against numpy float64."""
    rng = np.random.default_rng(11)
    w0 = integer_bf16(shape, rng)
    dw = rng.integers(-3, 4, shape) / 16
    t0, t1 = (torch.from_numpy(w).to(torch.bfloat16) for w in (w0, w0 + dw))
    tall = torch.from_numpy(dw.T if shape[0] < shape[1] else dw)
    energy = float(tall.square().sum())
    spectrum = update_singular_values(tall, energy)
    s = np.linalg.svd(dw, compute_uv=False)
    assert spectrum.route == "gram"
    assert np.abs(spectrum.sigma.numpy() ** 2 - s**2).max() <= spectrum.delta
    assert (np.abs(spectrum.sigma.numpy() - s) <= spectrum.sigma_error().numpy()).all()
    got = update_geometry(base_geometry(t0, rank_k=3, spectral_k=4), t0, t1)
    assert got.update_rank == np.linalg.matrix_rank(dw) == min(shape)
    stable_bound, effective_bound = rank_error_bounds(spectrum, energy, max(shape))
    stable, effective = (s**2).sum() / s[0] ** 2, np_effective_rank(s)
    assert abs(got.update_stable_rank - stable) <= stable_bound * stable
    assert abs(got.update_effective_rank - effective) <= effective_bound * effective
    assert max(stable_bound, effective_bound) < 1e-10
    ref = update_geometry(base_geometry(t0, rank_k=3, spectral_k=4), t0, t1, method="svdvals")
    assert ref.update_rank == got.update_rank
    assert (
        abs(got.update_effective_rank - ref.update_effective_rank)
        <= 2 * effective_bound * effective
    )
    with pytest.raises(ValueError, match="method must be one of"):
        update_geometry(base_geometry(t0, rank_k=3, spectral_k=4), t0, t1, method="gram")


@pytest.mark.parametrize(
    ("smallest", "rank"),
    [(1e-12, 48), (1e-15, 47), (0.0, 47)],  # numpy's tolerance here: 96 * eps = 2.1e-14
)
def test_update_rank_falls_back_to_svdvals_when_the_gram_cannot_decide(smallest, rank):
    """Singular values below the Gram's resolution (~sqrt(eps) s_1): svdvals, numpy's count."""
    rng = np.random.default_rng(2)
    dw = planted((96, 48), np.r_[np.linspace(1.0, 0.5, 47), smallest], rng)
    spectrum = update_singular_values(torch.from_numpy(dw), float((dw**2).sum()))
    assert spectrum.route == "svd"
    assert math.isnan(rank_error_bounds(spectrum, float((dw**2).sum()), 96)[0])
    t0, t1 = torch.zeros(96, 48, dtype=torch.float64), torch.from_numpy(dw)
    got = update_geometry(base_geometry(t1, rank_k=3, spectral_k=4), t0, t1)
    assert got.update_rank == np.linalg.matrix_rank(dw) == rank


def test_well_conditioned_float64_update_takes_the_gram_route():
    """sigma_min / sigma_1 = 1e-3: resolved by the Gram, so certified; numpy's rank."""
    rng = np.random.default_rng(4)
    dw = planted((96, 48), np.geomspace(1.0, 1e-3, 48), rng)
    spectrum = update_singular_values(torch.from_numpy(dw), float((dw**2).sum()))
    assert spectrum.route == "gram"
    np.testing.assert_allclose(
        spectrum.sigma.numpy(), np.linalg.svd(dw, compute_uv=False), rtol=1e-9, atol=0
    )
    assert update_singular_values(torch.zeros(64, 48, dtype=torch.float64), 0.0).route == "zero"


def test_a_square_update_goes_to_svdvals_at_once():
    """A square-ish dW (long side < GRAM_MIN_ASPECT x short side) skips the Gram: the same
    well-conditioned update that certifies when tall takes 'svd' when square; numpy's values."""
    rng = np.random.default_rng(4)
    for shape, route in [((48, 48), "svd"), ((71, 48), "svd"), ((72, 48), "gram")]:
        dw = planted(shape, np.geomspace(1.0, 1e-3, 48), rng)
        spectrum = update_singular_values(torch.from_numpy(dw), float((dw**2).sum()))
        assert spectrum.route == route, shape
        np.testing.assert_allclose(
            spectrum.sigma.numpy(), np.linalg.svd(dw, compute_uv=False), rtol=1e-9, atol=0
        )
