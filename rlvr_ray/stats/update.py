"""Rank and direction of a fine-tuning update dW = W1 - W0.

Pure torch, device-agnostic. For base W0 [m, n] and run W1 (bf16 values, so dW is exact in
float64), with s the singular values of dW (descending, p = min(m, n)):

- update_rank: numerical rank, numpy's ``matrix_rank`` default: #{s_i > s_1 * max(m, n) * eps},
  eps = float64 machine epsilon (2.2e-16); 0 for dW = 0;
- update_stable_rank: ||dW||_F^2 / ||dW||_2^2 = sum s_i^2 / s_1^2 (in [1, p]);
- update_effective_rank: exp(-sum p_i log p_i), p_i = s_i / sum s (Roy & Vetterli 2007; 0 log 0
  = 0; in [1, p]);
- update_energy_left, update_energy_right: ||U_k^T dW||_F^2 / ||dW||_F^2 and
  ||dW V_k||_F^2 / ||dW||_F^2, the share of the update's energy inside the base's top-k left
  (right) singular subspace (k = spectral_k); an update with no preferred direction puts k / m
  (k / n) there.
The ratios are NaN when dW = 0.

s comes from one float64 ``svdvals`` of dW (LAPACK gesdd, values only): the rank needs singular
values down to eps * s_1, and the Gram route (eigvalsh of dW^T dW) resolves them only down to
~sqrt(eps) * s_1 = 1.5e-8 s_1, so it cannot tell an exactly low-rank update from a full-rank one
(benchmarks/update_rank.py measures both).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rlvr_ray.stats.spectral import BaseGeometry, stable_rank

EPS = torch.finfo(torch.float64).eps


def numerical_rank(sigma: torch.Tensor, shape: tuple[int, int]) -> int:
    """Singular values [p] of a matrix of ``shape`` -> numpy ``matrix_rank``'s default count:
    #{sigma_i > max(sigma) * max(shape) * eps(float64)}."""
    if sigma.numel() == 0:
        return 0
    tol = float(sigma.max()) * max(shape) * EPS
    return int((sigma > tol).sum())


def effective_rank(sigma: torch.Tensor) -> float:
    """Singular values [p] -> exp(entropy of p_i = sigma_i / sum sigma) (NaN for a zero matrix)."""
    s = sigma.to(torch.float64).clamp(min=0.0)
    total = float(s.sum())
    if not total > 0:
        return math.nan
    p = s[s > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


@dataclass(frozen=True)
class UpdateGeometry:
    """Rank and direction of dW = W1 - W0 (see the module docstring); ratios NaN for dW = 0."""

    update_rank: int
    update_stable_rank: float
    update_effective_rank: float
    update_energy_left: float
    update_energy_right: float


def update_geometry(base: BaseGeometry, w0: torch.Tensor, w1: torch.Tensor) -> UpdateGeometry:
    """BaseGeometry of W0, W0 and W1 [m, n] (bf16 or any float dtype) -> UpdateGeometry,
    computed in float64 on the base's device; the top-k subspaces are the base's cached ones."""
    if tuple(w0.shape) != base.shape or tuple(w1.shape) != base.shape:
        raise ValueError(
            f"shape mismatch: base {base.shape}, W0 {tuple(w0.shape)}, W1 {tuple(w1.shape)}"
        )
    device, k = base.sigma.device, base.spectral_k
    dw = w1.to(device, torch.float64) - w0.to(device, torch.float64)
    tall = dw.T if base.transposed else dw
    energy = float(tall.square().sum())
    if not math.isfinite(energy):
        raise ValueError("update W1 - W0 has NaN or Inf entries")
    sigma = torch.linalg.svdvals(tall)
    if energy > 0:
        tall_left = float((base.u.T @ tall).square().sum()) / energy
        tall_right = float((tall @ base.v[:, :k]).square().sum()) / energy
    else:
        tall_left = tall_right = math.nan
    left, right = (tall_right, tall_left) if base.transposed else (tall_left, tall_right)
    return UpdateGeometry(
        update_rank=numerical_rank(sigma, tuple(dw.shape)),
        update_stable_rank=stable_rank(sigma),
        update_effective_rank=effective_rank(sigma),
        update_energy_left=left,
        update_energy_right=right,
    )
