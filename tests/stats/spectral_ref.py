"""Shared by the spectral tests (CPU and GPU): test matrices and the float64 reference."""

from dataclasses import replace

import numpy as np
import pytest
import scipy.linalg
import torch

from rlvr_ray.stats.spectral import base_geometry, run_geometry


def _powerlaw_bf16(m: int, n: int, seed: int) -> torch.Tensor:
    """bf16 [m, n] with singular values ~ (i + 1)^-0.6 + 0.05, like trained weights."""
    gen = torch.Generator().manual_seed(seed)
    p = min(m, n)
    u = torch.linalg.qr(torch.randn(m, p, generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, p, generator=gen, dtype=torch.float64)).Q
    s = torch.arange(1, p + 1, dtype=torch.float64) ** -0.6 + 0.05
    w = (u * s) @ v.T
    return (w * (0.02 / w.pow(2).mean().sqrt())).to(torch.bfloat16)


def _ulp_update(w0: torch.Tensor, seed: int, share: float = 0.4) -> torch.Tensor:
    """Move `share` of the bf16 entries by +-1..3 ULPs (raw bit-pattern steps)."""
    gen = torch.Generator().manual_seed(seed)
    bits = w0.view(torch.int16)
    pick = (torch.rand(w0.shape, generator=gen) < share) & ((bits & 0x7FFF) > 8)
    steps = torch.randint(1, 4, w0.shape, generator=gen, dtype=torch.int16)
    sign = torch.where(torch.rand(w0.shape, generator=gen) < 0.5, -1, 1).to(torch.int16)
    return torch.where(pick, bits + sign * steps, bits).view(torch.bfloat16)


def _reference(w0: torch.Tensor, w1: torch.Tensor, k: int):
    """float64 numpy SVD of the decoded bf16 values -> (nss, sigma1, angles left, right)."""
    u0, s0, vh0 = np.linalg.svd(w0.double().numpy(), full_matrices=False)
    u1, s1, vh1 = np.linalg.svd(w1.double().numpy(), full_matrices=False)
    nss = np.linalg.norm(s1 - s0) / np.linalg.norm(s0)
    left = scipy.linalg.subspace_angles(u0[:, :k], u1[:, :k])
    right = scipy.linalg.subspace_angles(vh0[:k].T, vh1[:k].T)
    return nss, s1[:k], left, right


def _check_against_reference(w0, w1, k, angle_rtol, nss_rtol, method="krylov", device="cpu"):
    """Geometry of (w0, w1) computed on ``device`` against the CPU float64 reference."""
    base = base_geometry(w0.to(device), rank_k=8, spectral_k=k)
    mask = w1.view(torch.int16) != w0.view(torch.int16)
    out = run_geometry(base, w1.to(device), mask.to(device), method)
    out = replace(
        out,
        angle_left=out.angle_left.cpu(),
        angle_right=out.angle_right.cpu(),
        sigma_run=out.sigma_run.cpu(),
    )
    nss, s1, left, right = _reference(w0, w1, k)
    assert out.nss == pytest.approx(nss, rel=nss_rtol)
    assert out.max_angle_left == pytest.approx(left[0], rel=angle_rtol)
    assert out.max_angle_right == pytest.approx(right[0], rel=angle_rtol)
    tol = out.angle_error_bound + 1e-12
    np.testing.assert_allclose(out.angle_left.numpy(), left, rtol=0, atol=tol)
    np.testing.assert_allclose(out.angle_right.numpy(), right, rtol=0, atol=tol)
    np.testing.assert_allclose(out.sigma_run.numpy(), s1, rtol=1e-12)
    return out
