"""NSS and principal angles against a float64 numpy SVD + scipy.linalg.subspace_angles."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from safetensors.torch import load_file, save_file
from spectral_ref import _check_against_reference, _powerlaw_bf16, _ulp_update

from rlvr_ray.stats.spectral import (
    BaseGeometry,
    base_geometry,
    cache_bytes,
    eigh_top_subspace,
    normalized_spectral_shift,
    principal_angles,
    run_geometry,
    top_subspace,
)


def test_principal_angles_tiny_known_angles():
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(200, 10, generator=gen, dtype=torch.float64))
    qa, perp = q[:, :5], q[:, 5:]
    theta = torch.tensor([1e-9, 1e-7, 1e-5, 3e-3, 0.2], dtype=torch.float64)
    qb = qa * theta.cos() + perp * theta.sin()
    got = principal_angles(qa, qb)
    np.testing.assert_allclose(got.numpy(), theta.flip(0).numpy(), rtol=1e-9)
    ref = scipy.linalg.subspace_angles(qa.numpy(), qb.numpy())
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-6)
    naive = torch.acos((qa.T @ qb).diagonal().clamp(max=1)).min()  # what arccos would give
    assert abs(float(naive) - 1e-9) > 1e-9


def test_principal_angles_large_known_angles():
    gen = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(50, 8, generator=gen, dtype=torch.float64))
    theta = torch.tensor([0.1, 0.7, 0.9, 1.5], dtype=torch.float64)
    qb = q[:, :4] * theta.cos() + q[:, 4:] * theta.sin()
    got = principal_angles(q[:, :4], qb)
    np.testing.assert_allclose(got.numpy(), [1.5, 0.9, 0.7, 0.1], rtol=1e-12)


def test_nss_hand_example():
    s0 = torch.tensor([3.0, 4.0])
    s1 = torch.tensor([3.0, 4.5])
    assert normalized_spectral_shift(s0, s1) == pytest.approx(0.1)
    assert math.isnan(normalized_spectral_shift(torch.zeros(2), s1))


@pytest.mark.parametrize("method", ["krylov", "eigh"])
@pytest.mark.parametrize(
    ("shape", "k"), [((192, 192), 16), ((320, 96), 24), ((48, 256), 16), ((96, 160), 40)]
)
def test_ulp_update_matches_float64_reference(shape, k, method):
    w0 = _powerlaw_bf16(*shape, seed=10)
    w1 = _ulp_update(w0, seed=11)
    out = _check_against_reference(w0, w1, k, 1e-4, 1e-6, method)
    assert 1e-6 < out.nss < 1e-3  # an RL-sized shift: the test is not vacuous
    assert out.angle_error_bound < 2.01e-3 * max(out.max_angle_left, out.max_angle_right)


def test_sft_like_update_matches_reference():
    w0 = _powerlaw_bf16(160, 128, seed=20)
    gen = torch.Generator().manual_seed(21)
    w1 = (w0.double() + 0.006 * torch.randn(160, 128, generator=gen, dtype=torch.float64)).to(
        torch.bfloat16
    )
    out = _check_against_reference(w0, w1, 16, angle_rtol=2.01e-3, nss_rtol=1e-9)
    assert 0.1 < out.max_angle_right < 1.5
    assert out.nss > 1e-2


def test_top_subspace_krylov_is_certified():
    w0 = _powerlaw_bf16(256, 256, seed=30).double()
    w1 = _ulp_update(w0.to(torch.bfloat16), seed=31).double()
    lam0, v0 = torch.linalg.eigh(w0.T @ w0)
    lam0, v0 = lam0.flip(0), v0.flip(1)
    g = w1.T @ w1
    lam, v = torch.linalg.eigh(g)
    lam, v = lam.flip(0), v.flip(1)
    q, bound = top_subspace(g, lam, v0[:, :48], 32)  # the base's top 48 only, as cached
    exact_err = float(principal_angles(v[:, :32], q)[0])
    assert exact_err <= bound < 2e-3 * float(principal_angles(v0[:, :32], q)[0])
    np.testing.assert_allclose((q.T @ q).numpy(), np.eye(32), atol=1e-13)


def _planted(m: int, n: int, sigma: torch.Tensor, seed: int) -> torch.Tensor:
    """float64 [m, n] with exactly these singular values (random orthonormal bases)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, n, generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64)).Q
    return (u * sigma) @ v.T


def test_top_subspace_falls_back_to_eigh_at_a_near_degenerate_gap():
    sigma = torch.arange(1, 129, dtype=torch.float64) ** -0.5
    sigma[16] = sigma[15]  # W1's 16th and 17th singular values tie: no top-16 subspace
    w1 = _planted(300, 128, sigma, seed=80)
    noise = torch.randn(300, 128, generator=torch.Generator().manual_seed(81), dtype=torch.float64)
    w0 = w1 + 1e-4 * noise
    v0 = torch.linalg.svd(w0, full_matrices=False).Vh[:24].T
    g = w1.T @ w1
    lam = torch.linalg.eigvalsh(g).flip(0)
    assert float(lam[15] - lam[16]) < 1e-12 * float(lam[0])  # a tie up to rounding
    q, bound = top_subspace(g, lam, v0, 16)
    _, q_eigh, bound_eigh = eigh_top_subspace(g, 16)
    assert bound == bound_eigh and bound > 1e-3  # eigh's certificate, and it certifies nothing
    assert torch.equal(q, q_eigh)


@pytest.mark.parametrize("kind", ["rl", "sft"])
def test_certified_bound_holds_on_a_planted_spectrum(kind):
    sigma = 2.0 * torch.arange(1, 97, dtype=torch.float64) ** -0.7 + 0.1
    w0 = _planted(400, 96, sigma, seed=90).to(torch.bfloat16)
    if kind == "rl":
        w1 = _ulp_update(w0, seed=91)
    else:
        noise = 0.2 * torch.randn(400, 96, generator=torch.Generator().manual_seed(92))
        w1 = (w0.double() + noise * w0.double().std()).to(torch.bfloat16)
    base = base_geometry(w0, spectral_k=8)
    out = run_geometry(base, w1, w1.view(torch.int16) != w0.view(torch.int16))
    u0, s0, vh0 = np.linalg.svd(w0.double().numpy(), full_matrices=False)
    u1, s1, vh1 = np.linalg.svd(w1.double().numpy(), full_matrices=False)
    left = scipy.linalg.subspace_angles(u0[:, :8], u1[:, :8])
    right = scipy.linalg.subspace_angles(vh0[:8].T, vh1[:8].T)
    assert out.angle_error_bound < 1e-2 * right[0]  # certified to the bar, not just bounded
    assert np.abs(out.angle_left.numpy() - left).max() <= out.angle_error_bound
    assert np.abs(out.angle_right.numpy() - right).max() <= out.angle_error_bound
    nss = np.linalg.norm(s1 - s0) / np.linalg.norm(s0)
    assert out.nss == pytest.approx(nss, rel=1e-9)


def test_cache_entry_is_a_fraction_of_the_base():
    w0 = _powerlaw_bf16(1024, 256, seed=95)
    base = base_geometry(w0)  # k = 11 of p = 256: 19 right vectors kept, not 256
    d = base.to_tensors()
    assert base.v.shape == (256, 19) and base.u.shape == (1024, 11)
    expected = 8 * (256 + 256 * 19 + 1024 * 11) + 2 * (1024 * 256 // 8) + 8 * 5 + 1
    assert cache_bytes(d) == expected  # sigma, v, u; the masks at one bit; the scalars, shape
    assert cache_bytes(d) < 0.5 * 2 * w0.numel()  # under half the base's bf16 bytes
    restored = BaseGeometry.from_tensors(d)
    assert torch.equal(restored.princ_mask, base.princ_mask)
    assert torch.equal(restored.low_mask, base.low_mask)


def test_identical_run_and_empty_mask():
    w0 = _powerlaw_bf16(128, 96, seed=40)
    out = run_geometry(base_geometry(w0, spectral_k=8), w0, torch.zeros(128, 96, dtype=torch.bool))
    assert out.nss == 0.0
    assert out.max_angle_left < 1e-10 and out.max_angle_right < 1e-10
    assert math.isnan(out.overlap_princ) and math.isnan(out.overlap_low)
    assert out.princ_density == 0.5 and out.low_density == 0.5


def test_clipping_and_bad_input():
    w0 = _powerlaw_bf16(6, 20, seed=50)
    assert base_geometry(w0).rank_k == 1  # the relative default: floor(0.0417 * 6 + 0.5) -> 1
    base = base_geometry(w0, rank_k=64, spectral_k=64)  # absolute k is clipped to min(m, n)
    assert (base.rank_k, base.spectral_k, base.sigma_base.shape) == (6, 6, (6,))
    out = run_geometry(base, _ulp_update(w0, seed=51), torch.ones(6, 20, dtype=torch.bool))
    assert out.max_angle_right > 0.0 and out.max_angle_left < 1e-12  # left space is all of R^6
    with pytest.raises(ValueError):
        base_geometry(torch.ones(10))
    with pytest.raises(ValueError):
        base_geometry(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError):
        run_geometry(base, torch.ones(20, 6), torch.ones(20, 6, dtype=torch.bool))
    bad = w0.float()
    bad[2, 3] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        run_geometry(base, bad, torch.ones(6, 20, dtype=torch.bool))


def test_serialization_round_trip(tmp_path):
    w0 = _powerlaw_bf16(80, 120, seed=60)
    w1 = _ulp_update(w0, seed=61)
    mask = w1.view(torch.int16) != w0.view(torch.int16)
    base = base_geometry(w0, rank_k=7, alpha=0.3, spectral_k=9)
    save_file(base.to_tensors(), tmp_path / "base.safetensors")
    restored = BaseGeometry.from_tensors(load_file(tmp_path / "base.safetensors"))
    assert (restored.rank_k, restored.spectral_k, restored.alpha) == (7, 9, 0.3)
    assert restored.transposed and restored.shape == (80, 120)
    a, b = run_geometry(base, w1, mask), run_geometry(restored, w1, mask)
    assert a.nss == b.nss and a.overlap_princ == b.overlap_princ
    assert torch.equal(a.angle_left, b.angle_left) and torch.equal(a.angle_right, b.angle_right)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(896, 896), (4864, 896), (896, 4864)])
def test_real_shapes_match_reference(shape):
    w0 = _powerlaw_bf16(*shape, seed=70)
    w1 = _ulp_update(w0, seed=71)
    _check_against_reference(w0, w1, 64, 1e-4, 1e-6)
    _check_against_reference(w0, w1, 64, 1e-4, 1e-6, method="eigh")
